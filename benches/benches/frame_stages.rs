//! Criterion benchmarks of the frame-path stages at 1280×720: render, render + NV12
//! conversion, readback, encode and packetize. `make frame-path` reports the same stages
//! inside the running pipeline, with the glue ratio.

use criterion::{Criterion, criterion_group, criterion_main};
use pylon_gpu::{FrameRenderer, RendererConfig, Work};
use pylon_proto::h264::H264Packetizer;
use pylon_server::encode::{EncoderChoice, EncoderConfig, VideoEncoder, load_nv12};
use pylon_server::scene::{DemoScene, SPACE};
use std::hint::black_box;
use std::time::Duration;

const W: u32 = 1280;
const H: u32 = 720;

fn stages(c: &mut Criterion) {
    let mut renderer =
        match FrameRenderer::new(&RendererConfig { width: W, height: H, gpu: None, slots: 1, clear_color: SPACE }) {
            Ok(r) => r,
            Err(e) => panic!("no Vulkan device: {e}"),
        };
    let mut scene = DemoScene::new(W, H, 0x5eed);
    let mut t = 0.0f32;
    let mut group = c.benchmark_group("frame_720p");
    group.sample_size(30).measurement_time(Duration::from_secs(4));
    group.bench_function("render", |b| {
        b.iter(|| {
            t += 1.0 / 60.0;
            scene.advance(t);
            renderer
                .submit(0, scene.vertices(), Work::RenderOnly)
                .and_then(|_| renderer.wait(0, Duration::from_secs(5)))
        })
    });
    group.bench_function("render_convert", |b| {
        b.iter(|| {
            t += 1.0 / 60.0;
            scene.advance(t);
            renderer
                .submit(0, scene.vertices(), Work::RenderAndConvert)
                .and_then(|_| renderer.wait(0, Duration::from_secs(5)))
        })
    });
    let config = EncoderConfig {
        width: W,
        height: H,
        fps: 60,
        bitrate: 6_000_000,
        keyframe_interval: 0,
        choice: EncoderChoice::Auto,
    };
    let mut encoder = VideoEncoder::open(&config).unwrap_or_else(|e| panic!("{e}"));
    let mut frame = encoder.new_input_frame();
    let nv12 = renderer.nv12(0).unwrap_or_default().to_vec();
    group.bench_function("readback", |b| b.iter(|| load_nv12(&mut frame, black_box(&nv12))));
    let mut pts = 0i64;
    let mut last = Vec::new();
    group.bench_function("encode", |b| {
        b.iter(|| {
            pts += 1;
            if let Ok(Some(au)) = encoder.encode(&mut frame, pts, pts == 1) {
                last = au.data;
            }
        })
    });
    let mut packetizer = H264Packetizer::new(1200, 102, 1, 0);
    group.bench_function("packetize", |b| {
        b.iter(|| {
            packetizer.packetize(black_box(&last), 0, |p| {
                black_box(p);
            })
        })
    });
    group.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);
