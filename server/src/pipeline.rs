//! The frame path: paced render → GPU colour conversion → readback → encode → packetize.
//!
//! Two threads, so that rendering keeps its cadence while encoding runs:
//!
//! * the **render thread** owns the Vulkan [`FrameRenderer`] and the [`DemoScene`]. At
//!   each tick of a steady clock it advances the scene to the tick's time and submits the
//!   frame into the next ring slot; while waiting for the next tick it collects finished
//!   slots in order and copies each NV12 picture into a free encoder input frame.
//!   If every slot is still on the GPU, or no input frame is free (the encoder is behind),
//!   the frame is dropped at the source and counted, never queued;
//! * the **encode thread** encodes each frame (a keyframe when one was requested),
//!   packetizes it into RTP and hands the packets to the network task, then returns the
//!   input frame to the pool.

use crate::capture::LayerSource;
use crate::encode::{EncodeError, EncoderConfig, VideoEncoder, load_nv12};
use crate::metrics::{CapturePath, ServerMetrics};
use crate::scene::{DemoScene, SPACE};
use bytes::Bytes;
use ffmpeg_next::frame;
use pylon_gpu::{FrameRenderer, GpuError, Picture, PixelOrder, RendererConfig, Work};
use pylon_proto::VIDEO_CLOCK_RATE;
use pylon_proto::framing::FrameInfo;
use pylon_proto::h264::H264Packetizer;
use pylon_proto::input::InputMessage;
use pylon_title::x11::{Applied, X11Session};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc::error::TrySendError;

/// RTP payload type used between node and relay (the relay rewrites it per viewer).
pub const RTP_PAYLOAD_TYPE: u8 = 102;
/// An early frame (started by input) comes at least this fraction of a frame interval
/// after the previous one.
const EARLY_FRAME_MIN_GAP: f64 = 0.5;
/// A title's present-layer frame is converted as soon as it is announced, but never
/// sooner than this part of a frame interval after the previous one (the stream's frame
/// rate caps a title that presents faster).
const LAYER_FRAME_MIN_GAP: f64 = 0.9;
/// The render thread sleeps until this long before a tick, then yields until it is due.
const WAKE_SPIN: Duration = Duration::from_micros(300);
/// How often a resting render thread looks at its stop flag.
const IDLE_POLL: Duration = Duration::from_millis(250);
/// A studio title's unchanged screen is still sent this often, so a viewer who joins or
/// asks for a keyframe gets a picture soon.
const TITLE_REFRESH: Duration = Duration::from_millis(250);
/// Input frames circulating between the render and encode threads. Two lets the render
/// thread fill one while the encoder works on the other; more would only add queueing.
const INPUT_FRAMES: usize = 2;

/// Settings of the frame path.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Picture width.
    pub width: u32,
    /// Picture height.
    pub height: u32,
    /// Frames per second.
    pub fps: u32,
    /// `--gpu`: substring of the Vulkan device name to use.
    pub gpu: Option<String>,
    /// Ring slots on the GPU.
    pub slots: usize,
    /// Encoder settings.
    pub encoder: EncoderConfig,
    /// Largest RTP packet, header included.
    pub max_rtp_packet: usize,
    /// Seed of the demo scene.
    pub seed: u32,
    /// Start a frame as soon as input arrives (at least half an interval after the
    /// previous one) instead of waiting for the next tick.
    pub early_frames: bool,
    /// Stream sound too (the demo's synthesised sound, a title's PulseAudio server);
    /// `--no-audio` turns it off. Without GStreamer the node streams video only.
    pub audio: bool,
    /// Tests of the checker only: the demo as a dishonest node would stream it. `None`
    /// in every real node (the binary has no way to set it).
    pub fake: Option<Fake>,
}

/// How a dishonest node fakes its stream (for the checker's tests): each streams a live
/// H.264 picture at the configured size through the real frame path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fake {
    /// One picture, repeated at the full rate; input ignored.
    Static,
    /// A recording of the demo left alone (its first [`REPLAY_LOOP`], played over and over);
    /// input ignored.
    Replay,
    /// The demo, answering input, rendered at half the rate it advertises.
    Slow,
    /// Input ignored, in the demo and in studio titles, which play on by themselves: a
    /// live picture that does not answer the player, as a recording of the title would
    /// look (and harder to tell from the real title than a recording, being live).
    Deaf,
}

/// The length of the [`Fake::Replay`] recording.
pub const REPLAY_LOOP: Duration = Duration::from_secs(4);

/// What the pipeline found when it started, for logs and the stream description.
#[derive(Debug, Clone)]
pub struct PipelineInfo {
    /// Vulkan device name.
    pub gpu_name: String,
    /// Why that device was chosen.
    pub gpu_reason: String,
    /// Its device-local memory, MiB.
    pub gpu_memory_mb: u64,
    /// GPU class for matching: 2 discrete, 1 integrated or virtual, 0 CPU renderer.
    pub gpu_class: u8,
    /// Encoder in use.
    pub encoder: &'static str,
    /// What encoder probing found.
    pub encoder_probe: Vec<String>,
}

/// Errors starting the pipeline.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// The GPU could not be set up.
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// The encoder could not be opened.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// A thread could not be started or died during start-up.
    #[error("pipeline thread failed: {0}")]
    Thread(String),
}

/// What the frame path hands to the network task, in order.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// One RTP packet; the first packet of each frame carries the frame's capture time.
    Rtp(Bytes, Option<SystemTime>),
    /// After a frame's packets: the input it is the first to reflect.
    FrameInfo(FrameInfo),
    /// One audio RTP packet (Opus) and its capture time on the node's wall clock.
    AudioRtp(Bytes, SystemTime),
}

/// A player input message as it reached the node.
#[derive(Debug, Clone)]
pub struct ReceivedInput {
    /// The validated message.
    pub message: InputMessage,
    /// When it arrived.
    pub arrived: Instant,
}

/// Where the time of one frame went, reported per frame to an optional observer
/// (benchmarks and diagnostics).
#[derive(Debug, Clone, Copy)]
pub struct FrameTiming {
    /// Frame number.
    pub index: u64,
    /// Submit to fence: rendering and NV12 conversion on the GPU.
    pub render: Duration,
    /// Copy of the NV12 picture out of the readback buffer.
    pub readback: Duration,
    /// Waiting for the encode thread.
    pub queued: Duration,
    /// Encoding.
    pub encode: Duration,
    /// Packetizing and handing packets to the network task.
    pub packetize: Duration,
    /// From the frame's tick to its last packet handed to the network task.
    pub total: Duration,
    /// Encoded size.
    pub bytes: usize,
    /// Whether it was a keyframe.
    pub keyframe: bool,
}

/// What the render thread shows.
pub enum SourceCommand {
    /// No session: nothing is rendered, captured or encoded until the next command (a
    /// node in a pool between sessions).
    Idle,
    /// The built-in demo (rendered by the node itself).
    Demo,
    /// A studio title's X screen, captured; `shown` turns true at its first drawn frame.
    Title {
        /// The session's screen (XShm capture and input).
        screen: Box<X11Session>,
        /// The title's Vulkan present layer, when it runs with one: its frames are used
        /// instead of the screen's once it sends a ring the renderer can import.
        layer: Option<Box<LayerSource>>,
        /// Set once the title has drawn a frame.
        shown: Arc<AtomicBool>,
        /// The session's PulseAudio server (`unix:…`), whose null sink the title plays
        /// into; `None`: the title is silent.
        audio: Option<String>,
    },
}

impl std::fmt::Debug for SourceCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Idle => f.write_str("Idle"),
            Self::Demo => f.write_str("Demo"),
            Self::Title { screen, .. } => f.debug_tuple("Title").field(screen).finish(),
        }
    }
}

/// Handle to the running frame path. Dropping it stops both threads.
#[derive(Debug)]
pub struct Pipeline {
    sources: mpsc::Sender<SourceCommand>,
    stop: Arc<AtomicBool>,
    keyframe: Arc<AtomicBool>,
    bitrate: Arc<AtomicU64>,
    inputs: mpsc::Sender<ReceivedInput>,
    threads: Vec<JoinHandle<()>>,
    info: PipelineInfo,
    /// The audio thread (stopped after the render thread, which commands it).
    _audio: Option<crate::audio::Audio>,
}

struct EncodeJob {
    frame: frame::Video,
    index: u64,
    tick: Instant,
    media_time: Duration,
    reflects: Option<(u32, Instant)>,
    render: Duration,
    readback: Duration,
    queued_at: Instant,
    /// Set on the first frame after the node left `Idle`: when it did.
    woke: Option<Instant>,
}

impl Pipeline {
    /// Starts the render and encode threads. Packets go to `packets`; when it is full
    /// they are dropped and counted (the network task is behind or disconnected).
    pub fn start(
        config: PipelineConfig,
        metrics: ServerMetrics,
        packets: tokio::sync::mpsc::Sender<Outgoing>,
    ) -> Result<Self, PipelineError> {
        Self::start_observed(config, metrics, packets, None)
    }

    /// Like [`Self::start`], also sending each frame's [`FrameTiming`] to `timings`.
    pub fn start_observed(
        config: PipelineConfig,
        metrics: ServerMetrics,
        packets: tokio::sync::mpsc::Sender<Outgoing>,
        timings: Option<mpsc::Sender<FrameTiming>>,
    ) -> Result<Self, PipelineError> {
        let stop = Arc::new(AtomicBool::new(false));
        let keyframe = Arc::new(AtomicBool::new(true));
        let bitrate = Arc::new(AtomicU64::new(config.encoder.bitrate));
        // Opened on a thread of its own name: the encoder's worker threads (libx264's slice
        // threads) take the name of the thread that opens it, so they show as `pylon-x264`
        // in `top -H` and in the benchmarks' CPU figures, not as whoever started the node.
        let encoder = {
            let config = config.encoder.clone();
            std::thread::Builder::new()
                .name("pylon-x264".into())
                .spawn(move || VideoEncoder::open(&config))
                .map_err(|e| PipelineError::Thread(e.to_string()))?
                .join()
                .map_err(|_| PipelineError::Thread("opening the encoder panicked".into()))??
        };
        let (pool_tx, pool_rx) = mpsc::channel::<frame::Video>();
        for _ in 0..INPUT_FRAMES {
            pool_tx.send(encoder.new_input_frame()).map_err(|e| PipelineError::Thread(e.to_string()))?;
        }
        let (job_tx, job_rx) = mpsc::channel::<EncodeJob>();
        let encoder_name = encoder.name();
        let encoder_probe = encoder.probe_log().to_vec();

        let (ready_tx, ready_rx) = mpsc::channel::<Result<(String, String, u64, u8), GpuError>>();
        let (input_tx, input_rx) = mpsc::channel::<ReceivedInput>();
        let (source_tx, source_rx) = mpsc::channel::<SourceCommand>();
        let audio = if config.audio {
            match crate::audio::Audio::start(packets.clone(), metrics.clone()) {
                Ok(a) => Some(a),
                Err(e) => {
                    tracing::warn!("no sound: {e}");
                    None
                }
            }
        } else {
            tracing::info!("sound is off (--no-audio)");
            None
        };
        let render = {
            let (stop, metrics, config) = (stop.clone(), metrics.clone(), config.clone());
            let control = RenderControl {
                stop,
                keyframe: keyframe.clone(),
                sources: source_rx,
                audio: audio.as_ref().map(crate::audio::Audio::link),
            };
            std::thread::Builder::new()
                .name("pylon-render".into())
                .spawn(move || render_thread(config, metrics, control, pool_rx, job_tx, ready_tx, input_rx))
                .map_err(|e| PipelineError::Thread(e.to_string()))?
        };
        let (gpu_name, gpu_reason, gpu_memory_mb, gpu_class) = match ready_rx.recv() {
            Ok(Ok(names)) => names,
            Ok(Err(e)) => {
                let _ = render.join();
                return Err(e.into());
            }
            Err(_) => return Err(PipelineError::Thread("render thread exited during start-up".into())),
        };
        let encode = {
            let (stop, keyframe, metrics) = (stop.clone(), (keyframe.clone(), bitrate.clone()), metrics.clone());
            let packetizer =
                H264Packetizer::new(config.max_rtp_packet, RTP_PAYLOAD_TYPE, rand_u32(), rand_u32() as u16);
            std::thread::Builder::new()
                .name("pylon-encode".into())
                .spawn(move || {
                    encode_thread(encoder, packetizer, metrics, stop, keyframe, job_rx, pool_tx, packets, timings)
                })
                .map_err(|e| PipelineError::Thread(e.to_string()))?
        };
        Ok(Pipeline {
            sources: source_tx,
            stop,
            keyframe,
            bitrate,
            inputs: input_tx,
            threads: vec![render, encode],
            _audio: audio,
            info: PipelineInfo { gpu_name, gpu_reason, gpu_memory_mb, gpu_class, encoder: encoder_name, encoder_probe },
        })
    }

    /// What the pipeline runs on.
    pub fn info(&self) -> &PipelineInfo {
        &self.info
    }

    /// A flag that, once set, makes the next encoded frame a keyframe.
    pub fn keyframe_flag(&self) -> Arc<AtomicBool> {
        self.keyframe.clone()
    }

    /// The encoder's target bitrate, bit/s: what the player's network allows (set from the
    /// relay's congestion feedback), applied from the next frame on.
    pub fn bitrate_target(&self) -> Arc<AtomicU64> {
        self.bitrate.clone()
    }

    /// Where validated player input goes; it is applied before the next frame renders.
    pub fn input_sender(&self) -> mpsc::Sender<ReceivedInput> {
        self.inputs.clone()
    }

    /// Where to say what the stream shows: the demo, or a session's title.
    pub fn source_sender(&self) -> mpsc::Sender<SourceCommand> {
        self.sources.clone()
    }

    /// Whether both threads are still running.
    pub fn is_running(&self) -> bool {
        self.threads.iter().all(|t| !t.is_finished())
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A random 32-bit value for SSRCs and initial sequence numbers (RFC 3550 §5.1 wants
/// them unpredictable); the std hasher is randomly keyed per process.
pub(crate) fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: Mutex<u64> = Mutex::new(0);
    let mut n = COUNTER.lock().unwrap_or_else(|e| e.into_inner());
    *n += 1;
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(*n);
    h.finish() as u32
}

struct InFlight {
    slot: usize,
    index: u64,
    tick: Instant,
    media_time: Duration,
    submitted: Instant,
    /// Highest input sequence number this frame is the first to reflect, and when the
    /// oldest input it reflects arrived.
    reflects: Option<(u32, Instant)>,
    /// Set on the first frame after the node left `Idle`: when it did.
    woke: Option<Instant>,
    /// The title's ring image this frame was converted from.
    imported: Option<u8>,
}

/// What the render thread is told from outside.
struct RenderControl {
    stop: Arc<AtomicBool>,
    keyframe: Arc<AtomicBool>,
    sources: mpsc::Receiver<SourceCommand>,
    audio: Option<crate::audio::AudioLink>,
}

/// What the stream shows now.
enum Source {
    Idle,
    Demo,
    Title {
        screen: Box<X11Session>,
        layer: Option<Box<LayerSource>>,
        shown: Arc<AtomicBool>,
        last_grab: Option<Instant>,
    },
}

impl Source {
    /// Switches to what `command` says, releasing a title's held keys first; the sound
    /// follows.
    fn switch(&mut self, command: SourceCommand, keyframe: &AtomicBool, audio: Option<&crate::audio::AudioLink>) {
        use crate::audio::AudioCommand;
        if let Some(a) = audio {
            a.command(match &command {
                SourceCommand::Idle => AudioCommand::Idle,
                SourceCommand::Demo => AudioCommand::Demo,
                SourceCommand::Title { audio: Some(server), .. } => AudioCommand::Title { server: server.clone() },
                SourceCommand::Title { audio: None, .. } => AudioCommand::Idle,
            });
        }
        if let Source::Title { screen, .. } = self {
            let _ = screen.release_all();
        }
        // A title's imported ring goes with its session (the renderer drops it when the
        // next ring comes; frames in flight finish first).
        *self = match command {
            SourceCommand::Idle => {
                tracing::info!("no session: the node rests (nothing rendered or encoded)");
                Source::Idle
            }
            SourceCommand::Demo => {
                tracing::info!("streaming the built-in demo");
                Source::Demo
            }
            SourceCommand::Title { screen, layer, shown, .. } => {
                let (w, h) = screen.size();
                let how = if layer.is_some() {
                    "XShm until its Vulkan present layer sends frames"
                } else {
                    "XShm, paced by XDamage; no present layer"
                };
                tracing::info!(
                    capture_path = "xshm",
                    "streaming a studio title's screen ({w}x{h}); capture path: {how}"
                );
                Source::Title { screen, layer, shown, last_grab: None }
            }
        };
        // The picture changes completely: start it with a keyframe.
        keyframe.store(true, Ordering::Relaxed);
    }
}

#[allow(clippy::too_many_arguments)]
fn render_thread(
    config: PipelineConfig,
    metrics: ServerMetrics,
    control: RenderControl,
    pool: mpsc::Receiver<frame::Video>,
    jobs: mpsc::Sender<EncodeJob>,
    ready: mpsc::Sender<Result<(String, String, u64, u8), GpuError>>,
    inputs: mpsc::Receiver<ReceivedInput>,
) {
    let renderer = FrameRenderer::new(&RendererConfig {
        width: config.width,
        height: config.height,
        gpu: config.gpu.clone(),
        slots: config.slots,
        clear_color: SPACE,
    });
    let mut renderer = match renderer {
        Ok(r) => {
            let info = r.device_info();
            let class = match info.kind {
                pylon_gpu::DeviceKind::Discrete => 2,
                pylon_gpu::DeviceKind::Integrated | pylon_gpu::DeviceKind::Virtual => 1,
                _ => 0,
            };
            let _ = ready.send(Ok((info.name.clone(), r.choice_reason().to_owned(), info.memory_mb, class)));
            r
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut scene = DemoScene::new(config.width, config.height, config.seed);
    let fake = config.fake;
    let slowdown = if fake == Some(Fake::Slow) { 2.0 } else { 1.0 };
    let interval = Duration::from_secs_f64(slowdown / f64::from(config.fps.max(1)));
    let mut replay_at = Duration::ZERO;
    // An input may start a frame early, but never sooner than this after the previous one,
    // so the encoder and the viewer's decoder are never asked for bursts.
    let min_gap = interval.mul_f64(EARLY_FRAME_MIN_GAP);
    let layer_gap = interval.mul_f64(LAYER_FRAME_MIN_GAP);
    let start = Instant::now();
    let mut next_due = start;
    let mut last_submit: Option<Instant> = None;
    let mut index: u64 = 0;
    let mut in_flight: VecDeque<InFlight> = VecDeque::new();
    let mut input =
        InputState { ignore: matches!(fake, Some(Fake::Static | Fake::Replay | Fake::Deaf)), ..Default::default() };
    let mut source = Source::Demo;
    let RenderControl { stop, keyframe, sources, audio } = control;
    if let Some(a) = &audio {
        a.command(crate::audio::AudioCommand::Demo);
    }
    // When the node last left `Idle`: the first frame after it measures the wake-up.
    let mut woke: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        while let Ok(command) = sources.try_recv() {
            let was_idle = matches!(source, Source::Idle);
            source.switch(command, &keyframe, audio.as_ref());
            if was_idle && !matches!(source, Source::Idle) {
                woke = Some(Instant::now());
                next_due = Instant::now();
            }
        }
        if matches!(source, Source::Idle) && in_flight.is_empty() {
            // Resting: block until told what to show (or, now and then, to look at `stop`).
            // Input arriving now belongs to no session.
            while inputs.try_recv().is_ok() {
                metrics.input_rejected.get_or_create(&crate::metrics::DropReason { reason: "no_session" }).inc();
            }
            match sources.recv_timeout(IDLE_POLL) {
                Ok(command) => {
                    source.switch(command, &keyframe, audio.as_ref());
                    if !matches!(source, Source::Idle) {
                        woke = Some(Instant::now());
                        next_due = Instant::now();
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(IDLE_POLL),
            }
            continue;
        }
        // Until the tick is due (or an input arrives and pacing allows an early frame),
        // apply input and collect finished frames, oldest first so order holds.
        let early = loop {
            while let Ok(i) = inputs.try_recv() {
                input.apply(&mut scene, &mut source, i, &metrics);
            }
            // Frames the GPU has finished, without waiting: a frame about to start must see
            // its slot free (a loop that only started frames and never looked would find
            // every slot busy for ever).
            if let Err(e) = collect(&mut renderer, &mut in_flight, &mut source, Duration::ZERO, &pool, &jobs, &metrics)
            {
                tracing::error!("GPU failure, stopping the render loop: {e}");
                return;
            }
            let now = Instant::now();
            if now >= next_due {
                break false;
            }
            // A title draws on its own clock: an early grab would not show the input yet.
            let input_waiting = config.early_frames && matches!(source, Source::Demo) && input.unreflected.is_some();
            // A title's present layer announces each frame: it is converted at once (the
            // node follows the title's clock), within the same pacing as input.
            let layer = match &mut source {
                Source::Title { layer: Some(l), .. } => {
                    l.poll(&mut renderer, &metrics);
                    l.active().then_some(l.has_pending())
                }
                _ => None,
            };
            // An early frame needs a free slot; with none, this waits for the GPU below.
            let slot_free = !renderer.in_flight((index % renderer.slot_count() as u64) as usize);
            let frame_waiting = (input_waiting || layer == Some(true)) && slot_free;
            // A title's frames come at its own rate, the stream's at most.
            let gap = if input_waiting { min_gap } else { layer_gap };
            if frame_waiting && last_submit.is_none_or(|t| now - t >= gap) {
                break true;
            }
            // Short waits while frames are in flight or input is pending, so neither
            // waits behind the other.
            let wait = if frame_waiting {
                last_submit.map_or(Duration::ZERO, |t| (t + gap).saturating_duration_since(now))
            } else if layer.is_some() {
                // Look at the layer's socket every millisecond.
                (next_due - now).min(Duration::from_millis(1) + WAKE_SPIN)
            } else {
                next_due - now
            };
            if !in_flight.is_empty() {
                let wait = wait.min(Duration::from_millis(1));
                if let Err(e) = collect(&mut renderer, &mut in_flight, &mut source, wait, &pool, &jobs, &metrics) {
                    tracing::error!("GPU failure, stopping the render loop: {e}");
                    return;
                }
            } else if wait > WAKE_SPIN {
                // Sleep until just before the tick: the OS wakes threads late by tens to
                // hundreds of microseconds, which would otherwise delay every frame.
                match inputs.recv_timeout(wait - WAKE_SPIN) {
                    Ok(i) => input.apply(&mut scene, &mut source, i, &metrics),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(wait - WAKE_SPIN),
                }
            } else {
                std::thread::yield_now();
            }
        };
        let now = Instant::now();
        let tick = if early { now } else { next_due };
        // A tick missed by more than a whole interval is skipped, not caught up in a burst.
        let late = now.saturating_duration_since(tick);
        if late > interval {
            let skipped = (late.as_secs_f64() / interval.as_secs_f64()) as u64;
            for _ in 0..skipped {
                metrics.drop_frame("late");
            }
            next_due = now;
            continue;
        }
        next_due = tick + interval;
        let slot = (index % renderer.slot_count() as u64) as usize;
        if renderer.in_flight(slot) {
            metrics.drop_frame("gpu_behind");
            index += 1;
            continue;
        }
        if early {
            metrics.early_frames.inc();
        }
        let media_time = tick - start;
        let mut imported = None;
        match &mut source {
            // Told to rest with frames in flight: they finish, nothing new starts.
            Source::Idle => continue,
            Source::Demo => {
                match fake {
                    // Frozen on its first picture.
                    Some(Fake::Static) => scene.advance(0.5),
                    Some(Fake::Replay) => {
                        let at = Duration::from_secs_f64(media_time.as_secs_f64() % REPLAY_LOOP.as_secs_f64());
                        if at < replay_at {
                            scene = DemoScene::new(config.width, config.height, config.seed);
                        }
                        replay_at = at;
                        scene.advance(at.as_secs_f32());
                    }
                    Some(Fake::Slow | Fake::Deaf) | None => scene.advance(media_time.as_secs_f32()),
                }
                if let Some(a) = &audio {
                    let (shots, hits) = scene.take_sounds();
                    for _ in 0..shots {
                        a.play(crate::audio::DemoSound::Shot);
                    }
                    for _ in 0..hits {
                        a.play(crate::audio::DemoSound::Hit);
                    }
                }
                if let Err(e) = renderer.submit(slot, scene.vertices(), Work::RenderAndConvert) {
                    tracing::error!("GPU failure, stopping the render loop: {e}");
                    return;
                }
            }
            Source::Title { screen, layer, shown, last_grab } => {
                let damaged = match screen.damaged() {
                    Ok(d) => d,
                    Err(e) => {
                        // The session's X server is gone; the session runner ends it.
                        tracing::warn!("lost the title's screen: {e}");
                        source.switch(SourceCommand::Demo, &keyframe, audio.as_ref());
                        continue;
                    }
                };
                let refresh = shown.load(Ordering::Relaxed) && last_grab.is_none_or(|t| now - t >= TITLE_REFRESH);
                if let Some(l) = layer.as_mut().filter(|l| l.active()) {
                    // Frames from the title's present layer: converted straight from the
                    // imported image, no grab.
                    let Some(image) = l.take(refresh) else {
                        metrics.title_unchanged.inc();
                        continue;
                    };
                    let submitted = Instant::now();
                    if let Err(e) = renderer.submit_imported(slot, usize::from(image)) {
                        tracing::error!("GPU failure, stopping the render loop: {e}");
                        return;
                    }
                    metrics.observe("capture", submitted.elapsed());
                    metrics.capture_frames.get_or_create(&CapturePath { path: "layer" }).inc();
                    shown.store(true, Ordering::Relaxed);
                    *last_grab = Some(now);
                    imported = Some(image);
                } else {
                    if !damaged && !refresh {
                        // Nothing new on the screen: no frame (the encoder and the network rest).
                        metrics.title_unchanged.inc();
                        continue;
                    }
                    let grabbed = Instant::now();
                    let submitted = screen.grab().map_err(|e| e.to_string()).and_then(|g| {
                        let picture = Picture {
                            width: g.width,
                            height: g.height,
                            stride: g.stride,
                            pixels: g.pixels,
                            order: PixelOrder::Bgrx,
                        };
                        renderer.submit_upload(slot, picture).map_err(|e| e.to_string())
                    });
                    if let Err(e) = submitted {
                        tracing::warn!("capturing the title's screen failed: {e}");
                        source.switch(SourceCommand::Demo, &keyframe, audio.as_ref());
                        continue;
                    }
                    metrics.observe("capture", grabbed.elapsed());
                    metrics.capture_frames.get_or_create(&CapturePath { path: "xshm" }).inc();
                    if damaged {
                        shown.store(true, Ordering::Relaxed);
                    }
                    *last_grab = Some(now);
                }
            }
        }
        let reflects = input.unreflected.take().map(|arrival| (input.applied_seq, arrival));
        if let Some((_, arrival)) = reflects {
            // The input's wait for its frame to start (pacing, a busy slot).
            metrics.observe("input_wait", now.saturating_duration_since(arrival));
        }
        in_flight.push_back(InFlight {
            slot,
            index,
            tick,
            media_time,
            submitted: now,
            reflects,
            woke: woke.take(),
            imported,
        });
        last_submit = Some(now);
        index += 1;
    }
}

/// Input applied to the scene and not yet in a rendered frame.
#[derive(Debug, Default)]
struct InputState {
    /// A fake that does not answer input (it still counts it, as if it had).
    ignore: bool,
    applied_seq: u32,
    /// Arrival of the oldest input applied since the last frame was submitted.
    unreflected: Option<Instant>,
}

impl InputState {
    fn apply(&mut self, scene: &mut DemoScene, source: &mut Source, input: ReceivedInput, metrics: &ServerMetrics) {
        match source {
            // No session: the input has no game to go to.
            Source::Idle => {
                metrics.input_rejected.get_or_create(&crate::metrics::DropReason { reason: "no_session" }).inc();
                return;
            }
            Source::Demo | Source::Title { .. } if self.ignore => {}
            Source::Demo => {
                scene.apply(&input.message.event);
                metrics.keys_held.set(scene.keys_held() as i64);
            }
            Source::Title { screen, .. } => {
                match screen.apply(&input.message.event) {
                    Ok(Applied::Injected) => {}
                    Ok(Applied::Unsupported) => {
                        metrics
                            .input_rejected
                            .get_or_create(&crate::metrics::DropReason { reason: "unsupported" })
                            .inc();
                        return;
                    }
                    Err(e) => {
                        tracing::warn!("injecting input into the title failed: {e}");
                        return;
                    }
                }
                metrics.keys_held.set(screen.held() as i64);
            }
        }
        metrics.input_applied.inc();
        self.applied_seq = self.applied_seq.max(input.message.seq);
        self.unreflected.get_or_insert(input.arrived);
    }
}

/// Finishes the frames in flight that the GPU has completed, oldest first (so order
/// holds), waiting up to `wait` for the oldest.
fn collect(
    renderer: &mut FrameRenderer,
    in_flight: &mut VecDeque<InFlight>,
    source: &mut Source,
    mut wait: Duration,
    pool: &mpsc::Receiver<frame::Video>,
    jobs: &mpsc::Sender<EncodeJob>,
    metrics: &ServerMetrics,
) -> Result<(), GpuError> {
    while let Some(front) = in_flight.front() {
        if !renderer.poll(front.slot, wait)? {
            return Ok(());
        }
        wait = Duration::ZERO;
        if let Some(done) = in_flight.pop_front() {
            if let (Some(image), Source::Title { layer: Some(l), .. }) = (done.imported, &mut *source) {
                l.converted(image);
            }
            finish(renderer, done, pool, jobs, metrics);
        }
    }
    Ok(())
}

/// Reads back a finished slot into a free encoder input frame and queues it.
fn finish(
    renderer: &FrameRenderer,
    done: InFlight,
    pool: &mpsc::Receiver<frame::Video>,
    jobs: &mpsc::Sender<EncodeJob>,
    metrics: &ServerMetrics,
) {
    metrics.frames_rendered.inc();
    let rendered = Instant::now();
    let render = rendered - done.submitted;
    metrics.observe("render", render);
    let Ok(mut frame) = pool.try_recv() else {
        metrics.drop_frame("encoder_behind");
        return;
    };
    if let Some(nv12) = renderer.nv12(done.slot)
        && let Err(e) = load_nv12(&mut frame, nv12)
    {
        tracing::error!("readback failed: {e}");
    }
    let readback = rendered.elapsed();
    metrics.observe("readback", readback);
    let _ = jobs.send(EncodeJob {
        frame,
        index: done.index,
        tick: done.tick,
        media_time: done.media_time,
        reflects: done.reflects,
        render,
        readback,
        queued_at: Instant::now(),
        woke: done.woke,
    });
}

#[allow(clippy::too_many_arguments)]
fn encode_thread(
    mut encoder: VideoEncoder,
    mut packetizer: H264Packetizer,
    metrics: ServerMetrics,
    stop: Arc<AtomicBool>,
    (keyframe, bitrate): (Arc<AtomicBool>, Arc<AtomicU64>),
    jobs: mpsc::Receiver<EncodeJob>,
    pool: mpsc::Sender<frame::Video>,
    packets: tokio::sync::mpsc::Sender<Outgoing>,
    timings: Option<mpsc::Sender<FrameTiming>>,
) {
    let rtp_base = rand_u32();
    metrics.target_bitrate_bps.set(encoder.bitrate() as i64);
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut job) = jobs.recv_timeout(Duration::from_millis(100)) else {
            continue;
        };
        let want_key = keyframe.swap(false, Ordering::Relaxed);
        let target = bitrate.load(Ordering::Relaxed);
        if target != encoder.bitrate() {
            encoder.set_bitrate(target);
            metrics.target_bitrate_bps.set(target as i64);
        }
        let started = Instant::now();
        let queued = started - job.queued_at;
        metrics.observe("encode_queue", queued);
        let encoded = encoder.encode(&mut job.frame, job.index as i64, want_key);
        let encoded_at = Instant::now();
        metrics.observe("encode", encoded_at - started);
        let _ = pool.send(job.frame);
        let au = match encoded {
            Ok(Some(au)) => au,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!("dropping frame {}: {e}", job.index);
                metrics.drop_frame("encode_error");
                if want_key {
                    keyframe.store(true, Ordering::Relaxed);
                }
                continue;
            }
        };
        metrics.frames_encoded.inc();
        if au.keyframe {
            metrics.keyframes.inc();
        }
        // RTP time follows the frame's media time, so early frames get their true timestamp.
        let ticks = (job.media_time.as_secs_f64() * f64::from(VIDEO_CLOCK_RATE)) as u64;
        let timestamp = rtp_base.wrapping_add(ticks as u32);
        let mut lost = false;
        // Wall-clock time of the frame's tick, for the abs-capture-time extension.
        let mut capture = SystemTime::now().checked_sub(job.tick.elapsed());
        packetizer.packetize(&au.data, timestamp, |rtp| {
            let len = rtp.len() as u64;
            match packets.try_send(Outgoing::Rtp(Bytes::copy_from_slice(rtp), capture.take())) {
                Ok(()) => {
                    metrics.rtp_packets_sent.inc();
                    metrics.rtp_bytes_sent.inc_by(len);
                }
                Err(TrySendError::Full(_)) | Err(TrySendError::Closed(_)) => {
                    lost = true;
                    metrics
                        .rtp_packets_dropped
                        .get_or_create(&crate::metrics::PacketDrop { reason: "queue_full" })
                        .inc();
                }
            }
        });
        if lost {
            // A frame with missing packets breaks every frame after it until a keyframe.
            keyframe.store(true, Ordering::Relaxed);
        }
        let done = Instant::now();
        if let Some((input_seq, arrival)) = job.reflects {
            let us = |d: Duration| u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
            let info = FrameInfo {
                rtp_timestamp: timestamp,
                input_seq,
                render_us: us(job.render),
                encode_us: us(encoded_at - started),
                node_us: us(done.saturating_duration_since(arrival)),
            };
            metrics.observe("input_to_packets", done.saturating_duration_since(arrival));
            let _ = packets.try_send(Outgoing::FrameInfo(info));
        }
        metrics.observe("packetize", done - encoded_at);
        metrics.observe("frame_path", done - job.tick);
        if let Some(woke) = job.woke {
            // From leaving `Idle` (a session started) to the first frame's packets sent.
            metrics.observe("wake", done.saturating_duration_since(woke));
        }
        if let Some(t) = &timings {
            let _ = t.send(FrameTiming {
                index: job.index,
                render: job.render,
                readback: job.readback,
                queued,
                encode: encoded_at - started,
                packetize: done - encoded_at,
                total: done - job.tick,
                bytes: au.data.len(),
                keyframe: au.keyframe,
            });
        }
    }
}
