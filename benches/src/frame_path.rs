//! `frame-path`: where a frame's time goes on this machine.
//!
//! 1. Runs the real frame path (paced render thread → readback → encode thread →
//!    packetizer → network queue) for `--frames` frames and records each frame's stages.
//! 2. On the same frames (same scene, same timestamps, a fresh encoder, the same pacing),
//!    measures render alone (submit to fence) and encode alone (the encoder on pictures
//!    already in memory), each stage by itself with nothing around it.
//! 3. Reports per-stage medians, the sustained frame rate, and the glue ratio
//!    `whole frame path ÷ (render alone + encode alone)`; the last line is one JSON object.
//!
//! With `--title PROGRAM [--title-arg ARG…]` it measures a captured studio title instead,
//! run in a session sandbox (Xvfb at the stream's size). In one run the real frame path
//! shows, one after the other, the demo, the title through its Vulkan present layer (its
//! frames imported and converted to NV12 with no CPU copy; skipped when the layer is not
//! built, and reported as such when the title is not a Vulkan one), and the title with
//! the layer off (XShm grabs paced by DAMAGE, uploaded and converted). The report says, per
//! path, the render thread's capture step and the GPU stage, so what capture adds per
//! frame over the demo's direct path; the XShm stages are also measured alone — grab,
//! upload + convert, encode — for the glue ratios.
//!
//! "Render alone" is the GPU's whole work on a frame — the scene drawn straight into
//! NV12's two planes and copied out — submitted and waited for on its own: colour
//! conversion is rendering work, not glue. What remains in the ratio is the glue —
//! synchronisation with the render thread, readback, copies, queueing, packetizing. The
//! ratio against RGBA drawing only is reported too (`draw_only_ratio`), and the planes
//! against the path before them, RGBA drawing then the NV12 compute pass, in the same run
//! (`planes_ratio`).

use anyhow::Context;
use clap::Parser;
use pylon_gpu::{FrameRenderer, RendererConfig, Work};
use pylon_server::encode::{EncoderChoice, EncoderConfig, VideoEncoder, load_nv12};
use pylon_server::metrics::ServerMetrics;
use pylon_server::pipeline::{FrameTiming, Pipeline, PipelineConfig};
use pylon_server::scene::{DemoScene, SPACE};
use std::time::{Duration, Instant};

/// Per-stage timing of the Pylon frame path.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Frames to measure (after a warm-up of 30).
    #[arg(long, default_value_t = 600)]
    frames: u64,
    /// Picture size.
    #[arg(long, default_value_t = 1280)]
    width: u32,
    /// Picture size.
    #[arg(long, default_value_t = 720)]
    height: u32,
    /// Frame rate of the paced run.
    #[arg(long, default_value_t = 60)]
    fps: u32,
    /// Encoder: auto (NVENC if present, else libx264), nvenc or x264.
    #[arg(long, default_value = "auto")]
    encoder: String,
    /// Measure a captured studio title: this program, run in a session sandbox.
    #[arg(long)]
    title: Option<String>,
    /// An argument of the title's program (repeatable).
    #[arg(long = "title-arg", allow_hyphen_values = true)]
    title_args: Vec<String>,
}

const WARMUP: u64 = 30;
const SEED: u32 = 0x5eed;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let choice = match args.encoder.as_str() {
        "nvenc" => EncoderChoice::Nvenc,
        "x264" => EncoderChoice::X264,
        _ => EncoderChoice::Auto,
    };
    let encoder_config = EncoderConfig {
        width: args.width,
        height: args.height,
        fps: args.fps,
        bitrate: 6_000_000,
        keyframe_interval: 0,
        choice,
    };

    if let Some(program) = args.title.clone() {
        return title_mode(&args, &program, &encoder_config);
    }

    // 1. The real, paced frame path.
    let total_frames = WARMUP + args.frames;
    eprintln!("frame path: {} frames at {}x{} {} fps…", total_frames, args.width, args.height, args.fps);
    let (packet_tx, mut packet_rx) = tokio::sync::mpsc::channel(1 << 16);
    let drain = std::thread::spawn(move || {
        let mut n = 0u64;
        while packet_rx.blocking_recv().is_some() {
            n += 1;
        }
        n
    });
    let (timing_tx, timing_rx) = std::sync::mpsc::channel::<FrameTiming>();
    let metrics = ServerMetrics::new();
    let pipeline = Pipeline::start_observed(
        PipelineConfig {
            width: args.width,
            height: args.height,
            fps: args.fps,
            gpu: None,
            slots: 3,
            encoder: encoder_config.clone(),
            max_rtp_packet: 1200,
            seed: SEED,
            early_frames: true,
            audio: false,
            fake: None,
        },
        metrics.clone(),
        packet_tx,
        Some(timing_tx),
    )
    .context("starting the frame path")?;
    let info = pipeline.info().clone();
    let mut timings = Vec::new();
    let started = Instant::now();
    while (timings.len() as u64) < total_frames {
        let t = timing_rx.recv_timeout(Duration::from_secs(10)).context("the frame path stalled")?;
        timings.push(t);
    }
    let elapsed = started.elapsed();
    drop(pipeline);
    let packets = drain.join().unwrap_or(0);
    let measured: Vec<FrameTiming> = timings.iter().copied().filter(|t| t.index >= WARMUP).collect();
    let indices: Vec<u64> = measured.iter().map(|t| t.index).collect();
    let dropped = metrics
        .render()
        .lines()
        .filter(|l| l.starts_with("pylon_server_frames_dropped_total"))
        .map(|l| l.to_string())
        .collect::<Vec<_>>();

    // 2. Render alone and encode alone, on the same frames.
    eprintln!("stages alone on the same {} frames…", indices.len());
    let mut renderer = FrameRenderer::new(&RendererConfig {
        width: args.width,
        height: args.height,
        gpu: None,
        slots: 1,
        clear_color: SPACE,
    })?;
    let mut encoder = VideoEncoder::open(&encoder_config)?;
    let mut frame = encoder.new_input_frame();
    let mut scene = DemoScene::new(args.width, args.height, SEED);
    let (mut draw_alone, mut render_alone, mut encode_alone) = (Vec::new(), Vec::new(), Vec::new());
    let mut rgba_convert_alone = Vec::new();
    let mut first = true;
    // Paced like the pipeline (one frame per tick), so both runs see the same machine:
    // caches, clock speed and thread wake-ups after an idle gap.
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.fps));
    let paced_start = Instant::now();
    for (n, &index) in indices.iter().enumerate() {
        let due = paced_start + interval.mul_f64(n as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        scene.advance(index as f32 / args.fps as f32);
        // The whole GPU stage first, as in the pipeline (nothing warms it up).
        let t0 = Instant::now();
        renderer.submit(0, scene.vertices(), Work::RenderAndConvert)?;
        renderer.wait(0, Duration::from_secs(5))?;
        let t1 = Instant::now();
        load_nv12(&mut frame, renderer.nv12(0).unwrap_or_default())?;
        let t2 = Instant::now();
        encoder.encode(&mut frame, index as i64, first)?;
        let t3 = Instant::now();
        first = false;
        // Drawing in RGBA without the conversion, for the draw-only figure.
        renderer.submit(0, scene.vertices(), Work::RenderOnly)?;
        renderer.wait(0, Duration::from_secs(5))?;
        let t4 = Instant::now();
        // The baseline: RGBA drawing, then the NV12 compute pass.
        renderer.submit(0, scene.vertices(), Work::RenderThenConvert)?;
        renderer.wait(0, Duration::from_secs(5))?;
        render_alone.push(t1 - t0);
        encode_alone.push(t3 - t2);
        draw_alone.push(t4 - t3);
        rgba_convert_alone.push(t4.elapsed());
    }

    // 3. Report.
    let stage = |f: fn(&FrameTiming) -> Duration| median(measured.iter().map(f).collect());
    let whole = stage(|t| t.total);
    let whole_p95 = percentile(measured.iter().map(|t| t.total).collect(), 0.95);
    let (draw_alone, render_alone, encode_alone) = (median(draw_alone), median(render_alone), median(encode_alone));
    let rgba_convert_alone = median(rgba_convert_alone);
    let convert_alone = render_alone.saturating_sub(draw_alone);
    let planes_ratio = ms(render_alone) / ms(rgba_convert_alone);
    let alone = render_alone + encode_alone;
    let draw_only_ratio = ms(whole) / ms(draw_alone + encode_alone);
    let ratio = ms(whole) / ms(alone);
    let fps = total_frames as f64 / elapsed.as_secs_f64();
    let bytes: usize = measured.iter().map(|t| t.bytes).sum();
    let kbps = bytes as f64 * 8.0 / (measured.len() as f64 / f64::from(args.fps)) / 1000.0;
    println!(
        "Pylon frame path, {}x{} @ {} fps, GPU: {}, encoder: {}",
        args.width, args.height, args.fps, info.gpu_name, info.encoder
    );
    println!("{:<34} {:>9}", "stage (median per frame)", "ms");
    println!("{:<34} {:>9.3}", "render to NV12 (GPU)", ms(stage(|t| t.render)));
    println!("{:<34} {:>9.3}", "readback (copy to encoder frame)", ms(stage(|t| t.readback)));
    println!("{:<34} {:>9.3}", "queue to encoder", ms(stage(|t| t.queued)));
    println!("{:<34} {:>9.3}", "encode", ms(stage(|t| t.encode)));
    println!("{:<34} {:>9.3}", "packetize + hand to network", ms(stage(|t| t.packetize)));
    println!("{:<34} {:>9.3}  (p95 {:.3})", "whole frame path (tick → packets)", ms(whole), ms(whole_p95));
    println!("{:<34} {:>9.3}", "render alone (NV12 planes, GPU)", ms(render_alone));
    println!("{:<34} {:>9.3}", "  over RGBA drawing only", ms(convert_alone));
    println!("{:<34} {:>9.3}", "RGBA draw only", ms(draw_alone));
    println!("{:<34} {:>9.3}", "RGBA draw + NV12 compute pass", ms(rgba_convert_alone));
    println!("{:<34} {:>9.3}", "encode alone", ms(encode_alone));
    println!(
        "sustained: {:.1} fps over {:.1} s, {} RTP packets, {:.0} kbit/s",
        fps,
        elapsed.as_secs_f64(),
        packets,
        kbps
    );
    for d in &dropped {
        println!("{d}");
    }
    println!("glue ratio (whole ÷ (render alone + encode alone)): {ratio:.3}  (target ≤ 1.15)");
    println!("draw-only ratio (whole ÷ (draw only + encode alone)): {draw_only_ratio:.3}");
    println!("planes ratio (NV12 planes ÷ RGBA draw + compute pass, alone): {planes_ratio:.3}");
    println!(
        "{}",
        serde_json::json!({
            "width": args.width, "height": args.height, "fps_target": args.fps,
            "gpu": info.gpu_name, "encoder": info.encoder,
            "render_ms": ms(stage(|t| t.render)), "readback_ms": ms(stage(|t| t.readback)),
            "encode_ms": ms(stage(|t| t.encode)), "packetize_ms": ms(stage(|t| t.packetize)),
            "whole_ms": ms(whole), "whole_p95_ms": ms(whole_p95), "render_alone_ms": ms(render_alone), "encode_alone_ms": ms(encode_alone),
            "draw_only_ms": ms(draw_alone), "convert_alone_ms": ms(convert_alone),
            "rgba_convert_alone_ms": ms(rgba_convert_alone), "planes_ratio": planes_ratio,
            "sustained_fps": fps, "glue_ratio": ratio, "draw_only_ratio": draw_only_ratio,
        })
    );
    Ok(())
}

/// One paced run of the real frame path showing `source`.
struct PathRun {
    measured: Vec<FrameTiming>,
    metrics: ServerMetrics,
    elapsed: Duration,
    total: u64,
    info: pylon_server::pipeline::PipelineInfo,
}

impl PathRun {
    fn stage(&self, f: fn(&FrameTiming) -> Duration) -> Duration {
        median(self.measured.iter().map(f).collect())
    }

    /// A metric's value from the run's registry (first line starting with `prefix`).
    fn metric(&self, prefix: &str) -> f64 {
        self.metrics.render().lines().find_map(|l| l.strip_prefix(prefix)?.trim().parse::<f64>().ok()).unwrap_or(0.0)
    }

    /// Mean CPU time of the render thread's capture step (grab + upload, or the
    /// imported frame's submission).
    fn capture_cpu(&self) -> Duration {
        let sum = self.metric("pylon_server_stage_seconds_sum{stage=\"capture\"} ");
        let count = self.metric("pylon_server_stage_seconds_count{stage=\"capture\"} ");
        Duration::from_secs_f64(if count > 0.0 { sum / count } else { 0.0 })
    }

    fn fps(&self) -> f64 {
        self.total as f64 / self.elapsed.as_secs_f64()
    }
}

fn run_path(
    args: &Args,
    encoder_config: &EncoderConfig,
    source: pylon_server::pipeline::SourceCommand,
) -> anyhow::Result<PathRun> {
    let total = WARMUP + args.frames;
    let (packet_tx, mut packet_rx) = tokio::sync::mpsc::channel(1 << 16);
    let drain = std::thread::spawn(move || while packet_rx.blocking_recv().is_some() {});
    let (timing_tx, timing_rx) = std::sync::mpsc::channel::<FrameTiming>();
    let metrics = ServerMetrics::new();
    let pipeline = Pipeline::start_observed(
        PipelineConfig {
            width: args.width,
            height: args.height,
            fps: args.fps,
            gpu: None,
            slots: 3,
            encoder: encoder_config.clone(),
            max_rtp_packet: 1200,
            seed: SEED,
            early_frames: true,
            audio: false,
            fake: None,
        },
        metrics.clone(),
        packet_tx,
        Some(timing_tx),
    )?;
    pipeline.source_sender().send(source).map_err(|_| anyhow::anyhow!("the render thread is gone"))?;
    let info = pipeline.info().clone();
    let mut timings = Vec::new();
    let started = Instant::now();
    while (timings.len() as u64) < total {
        timings.push(timing_rx.recv_timeout(Duration::from_secs(10)).context("the frame path stalled")?);
    }
    let elapsed = started.elapsed();
    drop(pipeline);
    let _ = drain.join();
    let measured = timings.into_iter().filter(|t| t.index >= WARMUP).collect();
    Ok(PathRun { measured, metrics, elapsed, total, info })
}

/// The captured-title measurement (see the module's documentation).
fn title_mode(args: &Args, program: &str, encoder_config: &EncoderConfig) -> anyhow::Result<()> {
    use pylon_gpu::{Picture, PixelOrder};
    use pylon_server::capture::LayerSource;
    use pylon_server::pipeline::SourceCommand;
    use pylon_title::sandbox::{CAPTURE_ENV, LaunchSpec, Sandbox, SandboxConfig};
    use pylon_title::x11::X11Session;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    let dir = std::env::temp_dir().join(format!("pylon-frame-path-{}", std::process::id()));
    let spec = |layer: bool| LaunchSpec {
        command: program.to_string(),
        args: args.title_args.clone(),
        workdir: None,
        env: [("SDL_AUDIODRIVER".to_string(), "dummy".to_string())]
            .into_iter()
            .chain((!layer).then(|| (CAPTURE_ENV.to_string(), "xshm".to_string())))
            .collect(),
        width: args.width,
        height: args.height,
        gamepads: 0,
    };
    let config = SandboxConfig::new(dir.clone());
    match &config.vk_layer {
        Some(l) => eprintln!("present layer: {}", l.display()),
        None => eprintln!("no present layer found (build pylon-vklayer); only XShm is measured"),
    }
    // A session of the title, waited for until it shows a frame.
    let start = |layer: bool| -> anyhow::Result<(Sandbox, X11Session)> {
        let sandbox =
            Sandbox::start(&config, if layer { "frame-path-layer" } else { "frame-path-xshm" }, &spec(layer))?;
        let number: u32 = sandbox.display().trim_start_matches(':').parse().unwrap_or(0);
        let mut probe = X11Session::connect(number, sandbox.cookie(), (args.width, args.height))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !probe.damaged()? {
            anyhow::ensure!(Instant::now() < deadline, "{program} showed nothing within 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_secs(1));
        Ok((sandbox, probe))
    };
    let total_frames = WARMUP + args.frames;

    // 1. The real frame path: the demo, the title through its present layer, the title
    // through XShm — one after the other in this run.
    eprintln!("frame path on the demo: {total_frames} frames at {}x{} {} fps…", args.width, args.height, args.fps);
    let demo = run_path(args, encoder_config, SourceCommand::Demo)?;
    let layer = if config.vk_layer.is_some() {
        eprintln!("frame path on {program} through its present layer…");
        let (mut sandbox, screen) = start(true)?;
        let layer = sandbox.take_capture().map(|c| Box::new(LayerSource::new(c)));
        let shown = Arc::new(AtomicBool::new(false));
        let run = run_path(
            args,
            encoder_config,
            SourceCommand::Title { screen: Box::new(screen), layer, shown, audio: None },
        );
        sandbox.stop();
        Some(run?)
    } else {
        None
    };
    let layer_frames = layer.as_ref().map_or(0.0, |r| r.metric("pylon_server_capture_frames_total{path=\"layer\"} "));
    eprintln!("frame path on {program} through XShm…");
    let (sandbox, screen) = start(false)?;
    let number: u32 = sandbox.display().trim_start_matches(':').parse().unwrap_or(0);
    let connect = || X11Session::connect(number, sandbox.cookie(), (args.width, args.height));
    let result = (|| -> anyhow::Result<()> {
        let shown = Arc::new(AtomicBool::new(false));
        let xshm = run_path(
            args,
            encoder_config,
            SourceCommand::Title { screen: Box::new(screen), layer: None, shown, audio: None },
        )?;

        // 2. Alone, on the title's frames: grab, upload + convert, encode; and the demo's
        // render + convert, in the same run.
        eprintln!("stages alone on {} frames…", xshm.measured.len());
        let mut screen = connect()?;
        let mut renderer = FrameRenderer::new(&RendererConfig {
            width: args.width,
            height: args.height,
            gpu: None,
            slots: 1,
            clear_color: SPACE,
        })?;
        let mut encoder = VideoEncoder::open(encoder_config)?;
        let mut frame = encoder.new_input_frame();
        let mut scene = DemoScene::new(args.width, args.height, SEED);
        let (mut grab, mut convert, mut encode, mut demo_alone) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let interval = Duration::from_secs_f64(1.0 / f64::from(args.fps));
        let paced_start = Instant::now();
        for n in 0..xshm.measured.len() {
            let due = paced_start + interval.mul_f64(n as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let _ = screen.damaged()?;
            let t0 = Instant::now();
            let g = screen.grab()?;
            let t1 = Instant::now();
            let picture = Picture {
                width: g.width,
                height: g.height,
                stride: g.stride,
                pixels: g.pixels,
                order: PixelOrder::Bgrx,
            };
            renderer.submit_upload(0, picture)?;
            renderer.wait(0, Duration::from_secs(5))?;
            let t2 = Instant::now();
            load_nv12(&mut frame, renderer.nv12(0).unwrap_or_default())?;
            let t3 = Instant::now();
            encoder.encode(&mut frame, n as i64, n == 0)?;
            let t4 = Instant::now();
            scene.advance(n as f32 / args.fps as f32);
            renderer.submit(0, scene.vertices(), Work::RenderAndConvert)?;
            renderer.wait(0, Duration::from_secs(5))?;
            grab.push(t1 - t0);
            convert.push(t2 - t1);
            encode.push(t4 - t3);
            demo_alone.push(t4.elapsed());
        }
        let (grab, convert, encode, demo_alone) = (median(grab), median(convert), median(encode), median(demo_alone));

        // 3. Report. What capture adds is judged in the frame path itself: the render
        // stage runs from the tick (so it holds the render thread's capture step — grab and
        // upload, or the imported frame's submission — and the GPU's work) to the fence,
        // against the same stage of the demo (its scene's submission and rendering).
        let gpu = |r: &PathRun| r.stage(|t| t.render);
        let demo_gpu = gpu(&demo);
        let adds = |r: &PathRun| ms(gpu(r)) - ms(demo_gpu);
        let glue = |r: &PathRun| ms(r.stage(|t| t.total)) / ms(gpu(r) + encode);
        println!(
            "Pylon captured-title frame path, {program} at {}x{} @ {} fps, GPU: {}, encoder: {}",
            args.width, args.height, args.fps, xshm.info.gpu_name, xshm.info.encoder
        );
        println!("{:<48} {:>9} {:>9} {:>9}", "stage (median per frame, in the frame path)", "demo", "layer", "xshm");
        let cell =
            |r: Option<&PathRun>, f: &dyn Fn(&PathRun) -> f64| r.map_or("-".to_string(), |r| format!("{:.3}", f(r)));
        let row = |name: &str, f: &dyn Fn(&PathRun) -> f64| {
            println!(
                "{:<48} {:>9} {:>9} {:>9}",
                name,
                cell(Some(&demo), f),
                cell(layer.as_ref(), f),
                cell(Some(&xshm), f)
            );
        };
        row("capture step on the render thread (CPU, mean)", &|r| ms(r.capture_cpu()));
        row("tick → NV12 ready (capture or render + convert)", &|r| ms(gpu(r)));
        row("encode", &|r| ms(r.stage(|t| t.encode)));
        row("whole frame path (tick → packets)", &|r| ms(r.stage(|t| t.total)));
        row("sustained frames/s", &|r| r.fps());
        println!("{:<48} {:>9.3}", "XShm grab alone", ms(grab));
        println!("{:<48} {:>9.3}", "upload + NV12 convert alone", ms(convert));
        println!("{:<48} {:>9.3}", "encode alone", ms(encode));
        println!("{:<48} {:>9.3}", "demo render + NV12 convert alone", ms(demo_alone));
        match &layer {
            Some(l) if layer_frames > 0.0 => println!(
                "capture adds {:.3} ms per frame over the demo's direct path with the layer ({layer_frames} frames \
                 imported), {:.3} ms with XShm",
                adds(l),
                adds(&xshm)
            ),
            _ => println!(
                "the title sent no frames through the present layer (not a Vulkan title?); capture adds {:.3} ms \
                 per frame with XShm",
                adds(&xshm)
            ),
        }
        println!(
            "pacing: with XShm a drawn frame waits at most one tick ({:.1} ms) for its grab; with the layer it is \
             converted when the title presents (the socket is read every millisecond)",
            ms(interval)
        );
        let layer_glue = layer.as_ref().map(glue);
        println!(
            "glue ratio (whole ÷ (tick → NV12 + encode alone)): layer {}, xshm {:.3}",
            layer_glue.map_or("-".into(), |g| format!("{g:.3}")),
            glue(&xshm)
        );
        println!(
            "{}",
            serde_json::json!({
                "title": program, "width": args.width, "height": args.height, "fps_target": args.fps,
                "gpu": xshm.info.gpu_name, "encoder": xshm.info.encoder,
                "demo_gpu_ms": ms(demo_gpu), "demo_whole_ms": ms(demo.stage(|t| t.total)),
                "layer_frames": layer_frames,
                "layer_capture_cpu_ms": layer.as_ref().map(|r| ms(r.capture_cpu())),
                "layer_gpu_ms": layer.as_ref().map(|r| ms(gpu(r))),
                "layer_whole_ms": layer.as_ref().map(|r| ms(r.stage(|t| t.total))),
                "layer_adds_ms": layer.as_ref().filter(|_| layer_frames > 0.0).map(adds),
                "layer_glue_ratio": layer_glue,
                "xshm_capture_cpu_ms": ms(xshm.capture_cpu()), "xshm_gpu_ms": ms(gpu(&xshm)),
                "xshm_whole_ms": ms(xshm.stage(|t| t.total)), "xshm_adds_ms": adds(&xshm),
                "xshm_glue_ratio": glue(&xshm),
                "grab_ms": ms(grab), "upload_convert_ms": ms(convert), "encode_ms": ms(encode),
                "demo_render_convert_ms": ms(demo_alone), "tick_ms": ms(interval),
            })
        );
        Ok(())
    })();
    sandbox.stop();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
