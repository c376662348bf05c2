//! Sound: each session's audio as Opus over RTP, on the node's clock.
//!
//! One audio thread per node runs a GStreamer pipeline for what the stream shows:
//! * the demo: its sound events (shots, hits) synthesised here and pushed through
//!   `appsrc`;
//! * a studio title: the monitor of the null sink of the session's own PulseAudio server
//!   (`pulsesrc`, 10 ms latency time, 20 ms buffer);
//! * nothing while the node rests.
//!
//! Both go through `opusenc` (48 kHz stereo, 10 ms frames, restricted low delay, in-band
//! FEC, complexity [`OPUS_COMPLEXITY`]) into an `appsink` whose callback, on GStreamer's
//! streaming thread, turns each Opus packet into one RTP packet (payload type
//! [`OPUS_PT`], 48 kHz timestamps) with its capture time on the node's wall clock — the
//! same clock video frames carry — and goes to the uplink as
//! [`Outgoing::AudioRtp`](crate::pipeline::Outgoing::AudioRtp). A capture pipeline that
//! fails (PulseAudio died) is rebuilt after [`RESTART_AFTER`]; video never waits for sound.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use pylon_proto::rtp::RtpHeader;

use crate::metrics::ServerMetrics;
use crate::pipeline::Outgoing;

/// RTP payload type of Opus (the browser's usual one, which the relay offers).
pub const OPUS_PT: u8 = 111;
/// RTP clock rate of Opus (RFC 7587: always 48 kHz).
pub const AUDIO_CLOCK_RATE: u32 = 48_000;
/// Samples per channel in one 10 ms frame.
const FRAME_SAMPLES: usize = 480;
/// The audio thread's nice value for the demo's sound (lower is sooner; the frame path runs at 0).
const AUDIO_NICE: i32 = -10;
/// A failed capture pipeline is rebuilt this long after.
pub const RESTART_AFTER: Duration = Duration::from_secs(1);

/// Why audio could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AudioError {
    /// GStreamer (or one of its plugins) is missing or failed.
    #[error("GStreamer: {0} (install gstreamer1.0-plugins-base and gstreamer1.0-pulseaudio)")]
    Gstreamer(String),
}

/// What the audio thread plays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AudioCommand {
    /// Nothing (the node rests).
    Idle,
    /// The demo's synthesised sound.
    Demo,
    /// A title's PulseAudio server (`unix:/…/native`): its null sink's monitor.
    Title {
        /// The server's address.
        server: String,
    },
}

/// A sound event of the demo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DemoSound {
    /// The ship fired.
    Shot,
    /// A bullet hit an asteroid.
    Hit,
}

/// The render thread's handle on the audio thread.
#[derive(Debug, Clone)]
pub struct AudioLink {
    commands: mpsc::Sender<AudioCommand>,
    sounds: mpsc::Sender<DemoSound>,
}

impl AudioLink {
    /// Where the sound comes from now.
    pub fn command(&self, command: AudioCommand) {
        let _ = self.commands.send(command);
    }

    /// A sound of the demo.
    pub fn play(&self, sound: DemoSound) {
        let _ = self.sounds.send(sound);
    }
}

/// The running audio thread. Dropping it stops the thread.
#[derive(Debug)]
pub struct Audio {
    commands: mpsc::Sender<AudioCommand>,
    sounds: mpsc::Sender<DemoSound>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Audio {
    /// Initialises GStreamer and starts the audio thread (resting until told what to play).
    pub fn start(packets: tokio::sync::mpsc::Sender<Outgoing>, metrics: ServerMetrics) -> Result<Self, AudioError> {
        gst::init().map_err(|e| AudioError::Gstreamer(e.to_string()))?;
        for element in ["opusenc", "appsrc", "appsink", "audioconvert"] {
            if gst::ElementFactory::find(element).is_none() {
                return Err(AudioError::Gstreamer(format!("the {element} element is missing")));
            }
        }
        let (commands, command_rx) = mpsc::channel();
        let (sounds, sound_rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("pylon-audio".into())
                .spawn(move || audio_thread(command_rx, sound_rx, packets, metrics, stop))
                .map_err(|e| AudioError::Gstreamer(e.to_string()))?
        };
        Ok(Self { commands, sounds, stop, thread: Some(thread) })
    }

    /// Where the sound comes from now.
    pub fn command(&self, command: AudioCommand) {
        let _ = self.commands.send(command);
    }

    /// What the render thread holds: where to send commands and the demo's sound events.
    pub fn link(&self) -> AudioLink {
        AudioLink { commands: self.commands.clone(), sounds: self.sounds.clone() }
    }
}

impl Drop for Audio {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.commands.send(AudioCommand::Idle);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The demo's sound: a few decaying voices mixed into 10 ms stereo frames.
#[derive(Debug, Default)]
pub struct Synth {
    voices: Vec<Voice>,
    noise: u32,
}

#[derive(Debug, Clone, Copy)]
struct Voice {
    sound: DemoSound,
    /// Samples played so far.
    at: usize,
    phase: f32,
}

impl Synth {
    /// Starts a sound.
    pub fn play(&mut self, sound: DemoSound) {
        // A burst of shots never piles up more than a few voices.
        if self.voices.len() >= 8 {
            self.voices.remove(0);
        }
        self.voices.push(Voice { sound, at: 0, phase: 0.0 });
    }

    /// Whether anything sounds.
    pub fn silent(&self) -> bool {
        self.voices.is_empty()
    }

    /// The next 10 ms: interleaved stereo S16LE.
    pub fn render(&mut self) -> Vec<u8> {
        let rate = AUDIO_CLOCK_RATE as f32;
        let mut out = Vec::with_capacity(FRAME_SAMPLES * 4);
        for _ in 0..FRAME_SAMPLES {
            let mut mix = 0.0f32;
            for v in &mut self.voices {
                let t = v.at as f32 / rate;
                mix += match v.sound {
                    // A 90 ms laser: a falling square-ish tone.
                    DemoSound::Shot => {
                        let freq = 1400.0 - 9000.0 * t;
                        v.phase += freq / rate;
                        let wave = if v.phase.fract() < 0.5 { 1.0 } else { -1.0 };
                        0.25 * wave * (1.0 - t / 0.09).max(0.0)
                    }
                    // A 250 ms crunch: decaying noise.
                    DemoSound::Hit => {
                        self.noise = self.noise.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                        let white = (self.noise >> 9) as f32 / (1u32 << 23) as f32 * 2.0 - 1.0;
                        0.4 * white * (-t * 14.0).exp()
                    }
                };
                v.at += 1;
            }
            let s = (mix.clamp(-1.0, 1.0) * 32767.0) as i16;
            out.extend_from_slice(&s.to_le_bytes());
            out.extend_from_slice(&s.to_le_bytes());
        }
        let rate = AUDIO_CLOCK_RATE as usize;
        self.voices.retain(|v| match v.sound {
            DemoSound::Shot => v.at < rate * 9 / 100,
            DemoSound::Hit => v.at < rate / 4,
        });
        out
    }
}

/// One built GStreamer pipeline.
struct Running {
    pipeline: gst::Pipeline,
    _src: Option<gst_app::AppSrc>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

/// Whatever a title's sound server delivers, as the encoder takes it.
const CONVERT: &str = "audioconvert ! audioresample ! audio/x-raw,format=S16LE,rate=48000,channels=2";
/// The Opus encoder's complexity (0–10): libopus's default, 10. `opus-cost` (`make
/// bench-opus`) measured the others: 9 costs the same within its noise (± 5 %), 5–7 save
/// 15–25 % on a busy sound but nothing on silence (the demo's usual sound) and drop encoder
/// tools, for under 0.2 % of a core; the encoding is about a quarter of the audio thread's
/// CPU, pacing it every 10 ms most of the rest.
pub const OPUS_COMPLEXITY: u8 = 10;

/// The `opusenc` element as the node runs it, at `complexity`.
pub fn opusenc(complexity: u8) -> String {
    format!(
        "opusenc frame-size=10 audio-type=restricted-lowdelay inband-fec=true packet-loss-percentage=10 \
         bitrate=96000 complexity={complexity}"
    )
}

/// The encoder into the appsink whose callback packetizes.
fn encode() -> String {
    format!("{} ! appsink name=sink sync=false max-buffers=50 drop=true", opusenc(OPUS_COMPLEXITY))
}

/// Builds and starts the pipeline for `command`; each encoded packet goes from the
/// appsink's callback to `packets`.
fn build(command: &AudioCommand, mut packets: PacketSink, demo: &Arc<Mutex<DemoFeed>>) -> Result<Running, AudioError> {
    let desc = match command {
        AudioCommand::Idle => return Err(AudioError::Gstreamer("nothing to play".into())),
        // The synthesiser makes what the encoder takes: no converter.
        AudioCommand::Demo => format!(
            "appsrc name=src is-live=true format=time \
             caps=audio/x-raw,format=S16LE,rate=48000,channels=2,layout=interleaved ! {}",
            encode()
        ),
        AudioCommand::Title { server } => format!(
            "pulsesrc server=\"{server}\" device=pylon.monitor buffer-time=20000 latency-time=10000 \
             do-timestamp=true client-name=pylon-node ! {CONVERT} ! {}",
            encode()
        ),
    };
    let pipeline = gst::parse::launch(&desc)
        .map_err(|e| AudioError::Gstreamer(e.to_string()))?
        .downcast::<gst::Pipeline>()
        .map_err(|_| AudioError::Gstreamer("not a pipeline".into()))?;
    // Timestamps on the monotonic system clock: the capture time is base time + PTS.
    pipeline.use_clock(Some(&gst::SystemClock::obtain()));
    let sink = pipeline
        .by_name("sink")
        .and_then(|s| s.downcast::<gst_app::AppSink>().ok())
        .ok_or_else(|| AudioError::Gstreamer("no appsink".into()))?;
    let src = pipeline.by_name("src").and_then(|s| s.downcast::<gst_app::AppSrc>().ok());
    sink.set_callbacks(gst_app::AppSinkCallbacks::builder().new_sample(move |sink| packets.take(sink)).build());
    if let Some(src) = &src {
        // The demo: the appsrc's own streaming thread asks for each chunk, waits until it
        // is due, then converts and encodes it — one thread wakes up per 10 ms, no queue.
        let feed = demo.clone();
        let clock = gst::SystemClock::obtain();
        src.set_callbacks(
            gst_app::AppSrcCallbacks::builder()
                .need_data(move |src, _| {
                    let wait = DemoFeed::lock(&feed).wait();
                    std::thread::sleep(wait);
                    let (chunk, late) = DemoFeed::lock(&feed).chunk();
                    // Stamped with when the chunk was due, not when this thread got to it: a
                    // late wake-up must not shift the sound against the picture's clock.
                    let due = clock.time().nseconds().saturating_sub(late.as_nanos() as u64);
                    let base = src.base_time().map_or(0, gst::ClockTime::nseconds);
                    let mut buffer = gst::Buffer::from_mut_slice(chunk);
                    if let Some(b) = buffer.get_mut() {
                        b.set_pts(gst::ClockTime::from_nseconds(due.saturating_sub(base)));
                        b.set_duration(gst::ClockTime::from_mseconds(10));
                    }
                    let _ = src.push_buffer(buffer);
                })
                .build(),
        );
    }
    pipeline.set_state(gst::State::Playing).map_err(|e| AudioError::Gstreamer(e.to_string()))?;
    Ok(Running { pipeline, _src: src })
}

/// Makes the calling thread a real-time audio thread, or failing that one at nice
/// [`AUDIO_NICE`]; a node without the right keeps the normal priority.
fn raise_priority() {
    use thread_priority::{
        RealtimeThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy, set_thread_priority_and_policy,
        thread_native_id,
    };
    let priority = ThreadPriority::Crossplatform(5u8.try_into().unwrap_or_default());
    let policy = ThreadSchedulePolicy::Realtime(RealtimeThreadSchedulePolicy::RoundRobin);
    match set_thread_priority_and_policy(thread_native_id(), priority, policy) {
        Ok(()) => tracing::debug!("audio thread: real-time (round-robin)"),
        Err(e) => {
            tracing::debug!("audio thread: no real-time priority ({e:?}), trying nice {AUDIO_NICE}");
            if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), AUDIO_NICE) {
                tracing::debug!("audio thread keeps its priority: {e}");
            }
        }
    }
}

/// Back to the normal policy and nice 0 (after the demo's sound, for a title's).
fn normal_priority() {
    use thread_priority::{
        NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy, set_thread_priority_and_policy,
        thread_native_id,
    };
    let policy = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Other);
    let _ = set_thread_priority_and_policy(thread_native_id(), ThreadPriority::Min, policy);
    let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 0);
}

/// RTP packetization of Opus frames (one frame a packet, RFC 7587). Timestamps count
/// samples: each packet's is the previous one's plus the previous packet's duration (from
/// its TOC byte), so the receiver's jitter buffer sees no gaps or overlaps; they are set
/// from the capture clock at the start and whenever that clock is more than
/// [`RESYNC_SAMPLES`] away (a restarted pipeline, dropped input).
#[derive(Debug)]
pub struct OpusPacketizer {
    ssrc: u32,
    sequence: u16,
    next: Option<u32>,
}

/// How much later than the previous packet's end a packet may be captured before it counts
/// as an underrun: 10 ms.
const UNDERRUN_SLACK_NS: u64 = 10_000_000;

/// Samples (at 48 kHz) the running timestamp may drift from the capture clock: 100 ms.
pub const RESYNC_SAMPLES: u32 = 4_800;

/// Samples per channel at 48 kHz an Opus packet decodes to (RFC 6716 §3.1), `None` for an
/// empty or malformed packet.
pub fn opus_samples(packet: &[u8]) -> Option<u32> {
    let toc = *packet.first()?;
    let config = toc >> 3;
    // Frame duration in units of 2.5 ms.
    let units = match config {
        0..=11 => [4, 8, 16, 24][usize::from(config % 4)],
        12..=15 => [4, 8][usize::from(config % 2)],
        _ => [1, 2, 4, 8][usize::from(config % 4)],
    };
    let frames = match toc & 3 {
        0 => 1,
        1 | 2 => 2,
        _ => u32::from(*packet.get(1)? & 0x3f),
    };
    Some(frames * units * 120)
}

impl OpusPacketizer {
    /// A packetizer for the stream `ssrc`.
    pub fn new(ssrc: u32) -> Self {
        Self { ssrc, sequence: crate::pipeline::rand_u32() as u16, next: None }
    }

    /// One RTP packet for `opus` captured at `capture_ns` on the monotonic clock.
    pub fn packet(&mut self, opus: &[u8], capture_ns: u64) -> Vec<u8> {
        let clock = (u128::from(capture_ns) * u128::from(AUDIO_CLOCK_RATE) / 1_000_000_000) as u32;
        let timestamp = match self.next {
            Some(next) if clock.wrapping_sub(next).min(next.wrapping_sub(clock)) <= RESYNC_SAMPLES => next,
            _ => clock,
        };
        self.next = Some(timestamp.wrapping_add(opus_samples(opus).unwrap_or(480)));
        let mut out = Vec::with_capacity(12 + opus.len());
        RtpHeader { marker: false, payload_type: OPUS_PT, sequence: self.sequence, timestamp, ssrc: self.ssrc }
            .write(&mut out);
        out.extend_from_slice(opus);
        self.sequence = self.sequence.wrapping_add(1);
        out
    }
}

/// The demo's sound, handed to the appsrc a 10 ms chunk at a time when it is due.
#[derive(Debug)]
struct DemoFeed {
    synth: Synth,
    /// The render thread's sound events.
    sounds: mpsc::Receiver<DemoSound>,
    next_chunk: Option<Instant>,
}

impl DemoFeed {
    fn new(sounds: mpsc::Receiver<DemoSound>) -> Self {
        Self { synth: Synth::default(), sounds, next_chunk: None }
    }

    /// The feed, also after a panic elsewhere (its state stays usable).
    fn lock(feed: &Mutex<DemoFeed>) -> std::sync::MutexGuard<'_, DemoFeed> {
        feed.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts over (a new pipeline): silence, the first chunk at once.
    fn reset(&mut self) {
        self.synth = Synth::default();
        self.next_chunk = None;
        while self.sounds.try_recv().is_ok() {}
    }

    /// How long until the next chunk is due.
    fn wait(&self) -> Duration {
        self.next_chunk.map_or(Duration::ZERO, |t| t.saturating_duration_since(Instant::now()))
    }

    /// The next 10 ms chunk (with the sounds reported since the last one) and how late it
    /// is. More than 100 ms late (the machine stalled), it starts over from now instead of
    /// catching up in a burst.
    fn chunk(&mut self) -> (Vec<u8>, Duration) {
        while let Ok(s) = self.sounds.try_recv() {
            self.synth.play(s);
        }
        let now = Instant::now();
        let mut due = self.next_chunk.unwrap_or(now);
        if now.saturating_duration_since(due) > Duration::from_millis(100) {
            due = now;
        }
        self.next_chunk = Some(due + Duration::from_millis(10));
        (self.synth.render(), now.saturating_duration_since(due))
    }
}

/// Hands the encoder's packets to the uplink, on GStreamer's streaming thread (the one
/// that encoded them): no thread of ours wakes up per packet.
struct PacketSink {
    /// One RTP stream for the node's whole life (sequence numbers run on across rebuilds).
    packetizer: Arc<Mutex<OpusPacketizer>>,
    packets: tokio::sync::mpsc::Sender<Outgoing>,
    metrics: ServerMetrics,
    clock: gst::Clock,
    /// The capture time at which the previous packet's sound ended (ns, monotonic clock).
    expected_ns: Option<u64>,
    /// Whether the streaming thread runs as a real-time audio thread (see
    /// [`PacketSink::take`]); set on it with the first packet.
    realtime: bool,
    prioritised: bool,
}

impl PacketSink {
    fn take(&mut self, sink: &gst_app::AppSink) -> Result<gst::FlowSuccess, gst::FlowError> {
        if !self.prioritised {
            // The thread that captures (or asks for the demo's chunks), encodes and hands
            // packets over: set on the thread itself, since GStreamer's pool threads are
            // reused from pipeline to pipeline and need not have been started by ours.
            if self.realtime {
                raise_priority();
            } else {
                normal_priority();
            }
            self.prioritised = true;
        }
        let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
        let Some(buffer) = sample.buffer() else { return Ok(gst::FlowSuccess::Ok) };
        let Ok(map) = buffer.map_readable() else { return Ok(gst::FlowSuccess::Ok) };
        let base = sink.base_time().map_or(0, gst::ClockTime::nseconds);
        let captured = base + buffer.pts().map_or(0, gst::ClockTime::nseconds);
        // The capture time on the wall clock: now, less how long ago it was captured.
        let age = Duration::from_nanos(self.clock.time().nseconds().saturating_sub(captured));
        let wall = SystemTime::now().checked_sub(age).unwrap_or_else(SystemTime::now);
        let duration_ns =
            u64::from(opus_samples(map.as_slice()).unwrap_or(480)) * 1_000_000_000 / u64::from(AUDIO_CLOCK_RATE);
        if self.expected_ns.is_some_and(|e| captured > e + UNDERRUN_SLACK_NS) {
            self.metrics.audio_underruns.inc();
        }
        self.expected_ns = Some(captured + duration_ns);
        let rtp = match self.packetizer.lock() {
            Ok(mut p) => p.packet(map.as_slice(), captured),
            Err(poisoned) => poisoned.into_inner().packet(map.as_slice(), captured),
        };
        // Capture (the buffer's timestamp) to the packet leaving for the network: the
        // node's share of glass-to-ear (capture buffer, encoder delay, hand-over).
        self.metrics.observe("audio_capture_to_send", age);
        self.metrics.audio_packets.inc();
        self.metrics.audio_bytes.inc_by(rtp.len() as u64);
        if self.packets.try_send(Outgoing::AudioRtp(Bytes::from(rtp), wall)).is_err() {
            self.metrics.rtp_packets_dropped.get_or_create(&crate::metrics::PacketDrop { reason: "queue_full" }).inc();
        }
        Ok(gst::FlowSuccess::Ok)
    }
}

/// How long the audio thread waits between looks at its pipeline's bus (the packets do not
/// need the thread: the demo's chunks are asked for and its packets leave from GStreamer's
/// streaming thread, a title's from the capture thread).
const BUS_POLL: Duration = Duration::from_millis(100);

fn audio_thread(
    commands: mpsc::Receiver<AudioCommand>,
    sounds: mpsc::Receiver<DemoSound>,
    packets: tokio::sync::mpsc::Sender<Outgoing>,
    metrics: ServerMetrics,
    stop: Arc<AtomicBool>,
) {
    let clock = gst::SystemClock::obtain();
    let packetizer = Arc::new(Mutex::new(OpusPacketizer::new(crate::pipeline::rand_u32())));
    let demo = Arc::new(Mutex::new(DemoFeed::new(sounds)));
    let reset_demo = || DemoFeed::lock(&demo).reset();
    let mut want = AudioCommand::Idle;
    let mut running: Option<Running> = None;
    let mut retry_at: Option<Instant> = None;
    // A command that arrived while the thread waited.
    let mut arrived: Option<AudioCommand> = None;
    while !stop.load(Ordering::Relaxed) {
        // What to play.
        let mut changed = false;
        for c in arrived.take().into_iter().chain(commands.try_iter()) {
            if c != want {
                want = c;
                changed = true;
            }
        }
        if changed {
            running = None;
            retry_at = Some(Instant::now());
        }
        if want == AudioCommand::Idle {
            reset_demo();
            arrived = commands.recv_timeout(Duration::from_millis(250)).ok();
            continue;
        }
        if running.is_none() && retry_at.is_some_and(|t| Instant::now() >= t) {
            reset_demo();
            let sink = PacketSink {
                packetizer: packetizer.clone(),
                packets: packets.clone(),
                metrics: metrics.clone(),
                clock: clock.clone(),
                expected_ns: None,
                // The demo's sound is paced by GStreamer's streaming thread asking for
                // chunks: it must not wait behind the frame path on a busy machine (a late
                // packet makes the browser's jitter buffer grow for everyone after it), so
                // that thread runs as real-time audio threads do (round-robin, priority 5,
                // PulseAudio's default) where the node may (root, or CAP_SYS_NICE), else at
                // nice -10 where it may. It uses a few % of a core. A title's sound is paced
                // by its PulseAudio server: its thread keeps the normal priority, so the
                // title's own CPU is not taken.
                realtime: want == AudioCommand::Demo,
                prioritised: false,
            };
            match build(&want, sink, &demo) {
                Ok(r) => {
                    tracing::info!(source = ?want, "sound: Opus 48 kHz stereo, 10 ms frames");
                    running = Some(r);
                    retry_at = None;
                }
                Err(e) => {
                    metrics.audio_errors.inc();
                    tracing::warn!(source = ?want, "sound could not start: {e}; retrying in {RESTART_AFTER:?}");
                    retry_at = Some(Instant::now() + RESTART_AFTER);
                }
            }
        }
        let Some(r) = running.as_ref() else {
            arrived = commands.recv_timeout(Duration::from_millis(20)).ok();
            continue;
        };
        // A failed pipeline (PulseAudio gone, a broken device) is rebuilt.
        let failed =
            r.pipeline.bus().and_then(|bus| bus.pop_filtered(&[gst::MessageType::Error, gst::MessageType::Eos])).map(
                |m| match m.view() {
                    gst::MessageView::Error(e) => e.error().to_string(),
                    _ => "end of stream".to_string(),
                },
            );
        if let Some(why) = failed {
            metrics.audio_errors.inc();
            tracing::warn!(source = ?want, "sound stopped: {why}; restarting in {RESTART_AFTER:?}");
            running = None;
            retry_at = Some(Instant::now() + RESTART_AFTER);
            continue;
        }
        arrived = commands.recv_timeout(BUS_POLL).ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_synth_sounds_only_after_an_event_and_then_falls_silent() {
        let mut s = Synth::default();
        assert!(s.render().iter().all(|b| *b == 0), "silence before any event");
        s.play(DemoSound::Shot);
        s.play(DemoSound::Hit);
        let loud = s.render();
        assert!(loud.chunks(2).any(|c| i16::from_le_bytes([c[0], c[1]]).abs() > 1000), "a shot is audible");
        for _ in 0..30 {
            s.render();
        }
        assert!(s.silent(), "voices end");
        assert!(s.render().iter().all(|b| *b == 0));
    }

    #[test]
    fn opus_packets_count_samples_and_resync_to_the_capture_clock_after_a_gap() {
        // TOC config 18: CELT, 10 ms; 3: SILK 60 ms; code 3 with 2 frames of 20 ms (config 1).
        assert_eq!(opus_samples(&[18 << 3]), Some(480));
        assert_eq!(opus_samples(&[19 << 3]), Some(960));
        assert_eq!(opus_samples(&[3 << 3]), Some(2880));
        assert_eq!(opus_samples(&[(1 << 3) | 3, 2]), Some(1920));
        assert_eq!(opus_samples(&[]), None);
        let frame = [18u8 << 3, 1, 2];
        let mut p = OpusPacketizer::new(7);
        let a = p.packet(&frame, 1_000_000_000);
        // Captured 7 ms later (input timestamps jitter): still exactly one frame later.
        let b = p.packet(&frame, 1_007_000_000);
        let ts = |x: &[u8]| pylon_proto::rtp::RtpPacket::parse(x).unwrap().header.timestamp;
        assert_eq!(ts(&b).wrapping_sub(ts(&a)), 480);
        // Half a second of nothing: back on the capture clock.
        let c = p.packet(&frame, 1_500_000_000);
        assert_eq!(ts(&c), (1_500_000_000u128 * 48_000 / 1_000_000_000) as u32);
        let a = p.packet(&[4], 2_000_000_000);
        let b = p.packet(&[4], 2_010_000_000);
        let (ha, hb) =
            (pylon_proto::rtp::RtpPacket::parse(&a).unwrap(), pylon_proto::rtp::RtpPacket::parse(&b).unwrap());
        assert_eq!(ha.header.payload_type, OPUS_PT);
        assert_eq!(hb.header.timestamp.wrapping_sub(ha.header.timestamp), 480, "10 ms at 48 kHz");
        assert_eq!(hb.header.sequence, ha.header.sequence.wrapping_add(1));
        assert_eq!(ha.payload, &[4]);
    }

    #[test]
    fn the_demo_sound_is_encoded_to_opus_and_handed_to_the_uplink_as_rtp() {
        if gst::init().is_err() || gst::ElementFactory::find("opusenc").is_none() {
            panic!("GStreamer with opusenc is required (gstreamer1.0-plugins-base)");
        }
        let (packets, mut rx) = tokio::sync::mpsc::channel(64);
        let metrics = ServerMetrics::new();
        let sink = PacketSink {
            packetizer: Arc::new(Mutex::new(OpusPacketizer::new(9))),
            packets,
            metrics: metrics.clone(),
            clock: gst::SystemClock::obtain(),
            expected_ns: None,
            realtime: false,
            prioritised: false,
        };
        let (sounds, sound_rx) = mpsc::channel();
        sounds.send(DemoSound::Shot).unwrap();
        let started = Instant::now();
        let _r = build(&AudioCommand::Demo, sink, &Arc::new(Mutex::new(DemoFeed::new(sound_rx)))).unwrap();
        let mut sizes = Vec::new();
        let mut sequences = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while sequences.len() < 10 {
            assert!(Instant::now() < deadline, "Opus packets: {} of 10", sequences.len());
            match rx.try_recv() {
                Ok(Outgoing::AudioRtp(rtp, _)) => {
                    let p = pylon_proto::rtp::RtpPacket::parse(&rtp).unwrap();
                    assert_eq!((p.header.payload_type, p.header.ssrc), (OPUS_PT, 9));
                    assert_eq!(opus_samples(p.payload), Some(480), "10 ms frames");
                    sequences.push(p.header.sequence);
                    sizes.push(p.payload.len());
                }
                Ok(_) => panic!("not audio"),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        // Paced: ten 10 ms chunks take about 100 ms, not a burst.
        assert!(started.elapsed() >= Duration::from_millis(80), "paced: {:?}", started.elapsed());
        assert!(sequences.windows(2).all(|w| w[1] == w[0].wrapping_add(1)), "{sequences:?}");
        // The shot is in the first chunks and sounds for 90 ms; silence encodes to a few bytes.
        assert!(sizes.iter().take(5).all(|&n| n > 20), "the shot is encoded: {sizes:?}");
        assert!(metrics.audio_packets.get() >= 10, "counted: {}", metrics.audio_packets.get());
    }
}
