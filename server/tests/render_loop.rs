//! The frame path on the real renderer (lavapipe here) and encoder: a flood of input never
//! stalls it, even when every GPU slot is busy when the input arrives.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use pylon_proto::input::{InputEvent, InputMessage, key_index};
use pylon_server::encode::{EncoderChoice, EncoderConfig};
use pylon_server::metrics::ServerMetrics;
use pylon_server::pipeline::{Pipeline, PipelineConfig, ReceivedInput};
use std::time::{Duration, Instant};

fn counter(metrics: &ServerMetrics, prefix: &str) -> f64 {
    metrics
        .render()
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One ring slot: right after each frame starts, its slot is the one the next frame needs,
/// so every input arrives while the GPU is busy. The render loop used to start an early
/// frame, find the slot busy, count a drop and try again at once, for ever, never looking
/// at the GPU's fence again: the stream froze after the first key press on a loaded machine.
#[test]
fn input_while_every_gpu_slot_is_busy_never_stalls_the_frames() {
    let (width, height, fps) = (320, 180, 60);
    let metrics = ServerMetrics::new();
    let (packets, mut packet_rx) = tokio::sync::mpsc::channel(4096);
    let config = PipelineConfig {
        width,
        height,
        fps,
        gpu: None,
        slots: 1,
        encoder: EncoderConfig {
            width,
            height,
            fps,
            bitrate: 1_000_000,
            keyframe_interval: fps * 10,
            choice: EncoderChoice::Auto,
        },
        max_rtp_packet: 1200,
        seed: 7,
        early_frames: true,
        audio: false,
        fake: None,
    };
    let pipeline = Pipeline::start(config, metrics.clone(), packets).expect("frame path starts (Vulkan + encoder)");
    let drain = std::thread::spawn(move || while packet_rx.blocking_recv().is_some() {});
    let inputs = pipeline.input_sender();
    let key = key_index("ArrowUp").unwrap();
    // Two seconds of input every 2 ms, pressing and releasing thrust.
    let start = Instant::now();
    let mut seq = 0u32;
    while start.elapsed() < Duration::from_secs(2) {
        seq += 1;
        let event = if seq % 2 == 1 {
            InputEvent::KeyDown { key, modifiers: 0 }
        } else {
            InputEvent::KeyUp { key, modifiers: 0 }
        };
        let message = InputMessage { seq, time_ms: seq * 2, event };
        inputs.send(ReceivedInput { message, arrived: Instant::now() }).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    let rendered_then = counter(&metrics, "pylon_server_frames_rendered");
    std::thread::sleep(Duration::from_millis(500));
    let rendered = counter(&metrics, "pylon_server_frames_rendered");
    let busy = counter(&metrics, "pylon_server_frames_dropped_total{reason=\"gpu_behind\"}");
    let applied = counter(&metrics, "pylon_server_input_applied");
    eprintln!("under input: {applied} inputs applied, {rendered} frames rendered, {busy} dropped for a busy GPU");
    assert!(pipeline.is_running(), "the frame path stopped");
    assert!(applied >= 500.0, "the input reached the scene: {applied} applied");
    // 2.5 s at 60 fps is 150 ticks; a loaded two-core machine may render half of them.
    assert!(rendered >= 40.0, "frames kept coming under input: {rendered} rendered");
    assert!(rendered > rendered_then, "frames kept coming after it: {rendered_then} then {rendered}");
    // A busy slot costs at most the tick it was due for, not a spin.
    assert!(busy <= 200.0, "{busy} frames dropped for a busy GPU in 2.5 s: the render loop spins");
    drop(inputs);
    drop(pipeline);
    drain.join().unwrap();
}
