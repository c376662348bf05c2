//! `opus-cost`: what the node's Opus encoder costs at each complexity, and what it gives.
//!
//! The node's own encoder (`pylon_server::audio::opusenc`: 48 kHz stereo, 10 ms frames,
//! restricted low delay, in-band FEC, 96 kb/s) encodes the same sound at each complexity
//! asked for, in this process, as fast as it goes:
//! * a busy game: the demo's synthesiser with a shot every 150 ms and a hit every 600 ms,
//!   sounding all the time (the worst case: silence costs less);
//! * silence (the demo between shots).
//!
//! For each it reports the CPU seconds per second of sound and its ratio to libopus's
//! default complexity 10 measured in the same run, and the fidelity of a tonal sound (a
//! chord and the demo's shots): GStreamer's `opusdec` decodes its packets and the
//! signal-to-noise ratio is taken against the input, aligned on the codec's delay. Then it
//! runs the node's own sound (`pylon_server::audio::Audio`) on the demo's silence in real
//! time, which shows what waking every 10 ms adds to the encoding itself.
//! Prints a table, then as its last line one JSON object. A benchmark, not a test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use clap::Parser;
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use pylon_server::audio::{Audio, AudioCommand, DemoSound, OPUS_COMPLEXITY, Synth, opusenc};
use pylon_server::metrics::ServerMetrics;
use pylon_server::pipeline::Outgoing;

#[macro_use]
#[path = "../../edge-relay/tests/common/mod.rs"]
mod common;

/// The CPU and fidelity of the node's Opus encoder at each complexity.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Seconds of sound each encoding takes in.
    #[arg(long, default_value_t = 120)]
    seconds: u64,
    /// The complexities to measure (libopus's default, 10, is always the baseline).
    #[arg(long, value_delimiter = ',', default_values_t = [10u8, 9, 7, 6, 5])]
    complexity: Vec<u8>,
    /// Encodings of each kind at each complexity; the least CPU of them counts (what the
    /// encoder needs, not what the machine's neighbours took).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Seconds to run the node's own sound in real time (its audio thread playing the
    /// demo's silence, a 10 ms chunk when due, each packet taken in the `appsink`'s
    /// callback): what pacing adds to the encoding itself. 0: none.
    #[arg(long, default_value_t = 30)]
    realtime_seconds: u64,
}

/// `seconds` of the demo's sound: busy (shots and hits throughout) or silent.
fn sound(seconds: u64, busy: bool) -> Vec<Vec<u8>> {
    let mut synth = Synth::default();
    (0..seconds * 100)
        .map(|i| {
            if busy && i % 15 == 0 {
                synth.play(DemoSound::Shot);
            }
            if busy && i % 60 == 30 {
                synth.play(DemoSound::Hit);
            }
            synth.render()
        })
        .collect()
}

/// `seconds` of tonal sound, whose waveform a good encoding keeps (the demo's hits are
/// noise, which a perceptual codec rebuilds by its energy alone, so no waveform measure
/// says anything about them): a chord with a slow vibrato, and the demo's shots over it.
fn tonal(seconds: u64) -> Vec<Vec<u8>> {
    let mut synth = Synth::default();
    let rate = 48_000.0f64;
    let mut n = 0u64;
    let mut phases = [0.0f64; 4];
    (0..seconds * 100)
        .map(|i| {
            if i % 40 == 0 {
                synth.play(DemoSound::Shot);
            }
            let shots = synth.render();
            shots
                .chunks_exact(4)
                .flat_map(|frame| {
                    let t = n as f64 / rate;
                    n += 1;
                    let mut chord = 0.0;
                    for (k, (phase, f)) in phases.iter_mut().zip([220.0, 277.2, 329.6, 440.0]).enumerate() {
                        *phase += f * (1.0 + 0.003 * (2.0 * std::f64::consts::PI * 5.0 * t).sin()) / rate;
                        chord += 0.08 / (k as f64 + 1.0) * (2.0 * std::f64::consts::PI * *phase).sin();
                    }
                    let shot = f64::from(i16::from_le_bytes([frame[0], frame[1]])) / 32768.0;
                    let s = ((chord + shot).clamp(-1.0, 1.0) * 32767.0) as i16;
                    let [a, b] = s.to_le_bytes();
                    [a, b, a, b]
                })
                .collect()
        })
        .collect()
}

/// Runs `desc` (an `appsrc name=src` … `appsink name=sink` pipeline), pushes `chunks`
/// through it as fast as it takes them, and returns what came out of the sink.
fn run_pipeline(desc: &str, chunks: &[Vec<u8>], duration_ns: u64) -> Vec<Vec<u8>> {
    let pipeline = gst::parse::launch(desc).expect("the pipeline builds").downcast::<gst::Pipeline>().unwrap();
    let src = pipeline.by_name("src").unwrap().downcast::<gst_app::AppSrc>().unwrap();
    let sink = pipeline.by_name("sink").unwrap().downcast::<gst_app::AppSink>().unwrap();
    pipeline.set_state(gst::State::Playing).expect("the pipeline plays");
    let out = std::thread::spawn(move || {
        let mut out = Vec::new();
        while let Ok(sample) = sink.pull_sample() {
            if let Some(buffer) = sample.buffer()
                && let Ok(map) = buffer.map_readable()
            {
                out.push(map.to_vec());
            }
        }
        out
    });
    for (i, chunk) in chunks.iter().enumerate() {
        let mut buffer = gst::Buffer::from_slice(chunk.clone());
        if let Some(b) = buffer.get_mut() {
            b.set_pts(gst::ClockTime::from_nseconds(i as u64 * duration_ns));
            b.set_duration(gst::ClockTime::from_nseconds(duration_ns));
        }
        src.push_buffer(buffer).expect("the pipeline takes the buffer");
    }
    src.end_of_stream().expect("end of stream");
    let out = out.join().expect("the sink's reader");
    pipeline.set_state(gst::State::Null).expect("the pipeline stops");
    out
}

/// The Opus packets of `chunks` at `complexity`, and the CPU seconds they took.
fn encode(chunks: &[Vec<u8>], complexity: u8) -> (Vec<Vec<u8>>, f64) {
    let desc = format!(
        "appsrc name=src is-live=false format=time block=true max-bytes=192000 \
         caps=audio/x-raw,format=S16LE,rate=48000,channels=2,layout=interleaved ! {} ! \
         appsink name=sink sync=false",
        opusenc(complexity)
    );
    let cpu = common::process_cpu();
    let packets = run_pipeline(&desc, chunks, 10_000_000);
    (packets, common::process_cpu() - cpu)
}

/// Runs the node's own sound ([`Audio`], playing the demo, which nobody fires at: silence)
/// for `seconds`; the CPU seconds its threads ([`common::is_audio_thread`], as
/// `audio-latency` counts them) took per second.
fn realtime(seconds: u64) -> f64 {
    let (packets, mut sent) = tokio::sync::mpsc::channel::<Outgoing>(1024);
    let audio = Audio::start(packets, ServerMetrics::new()).expect("the node's sound starts");
    audio.command(AudioCommand::Demo);
    // The uplink's part: take the packets and count them.
    let counter = std::thread::spawn(move || {
        let mut n = 0u64;
        while sent.blocking_recv().is_some() {
            n += 1;
        }
        n
    });
    let audio_cpu =
        || common::thread_cpu().iter().filter(|(name, _)| common::is_audio_thread(name)).map(|(_, s)| s).sum::<f64>();
    // Let it start, then measure.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (cpu, t0) = (audio_cpu(), std::time::Instant::now());
    std::thread::sleep(std::time::Duration::from_secs(seconds));
    let (cpu, wall) = (audio_cpu() - cpu, t0.elapsed().as_secs_f64());
    drop(audio);
    let sent = counter.join().expect("the packet counter");
    eprintln!("real time: {sent} packets in {wall:.1} s (with the start), {cpu:.2} s of CPU");
    cpu / wall
}

/// The packets decoded by `opusdec`: interleaved stereo samples.
fn decode(packets: &[Vec<u8>]) -> Vec<i16> {
    let desc = "appsrc name=src is-live=false format=time block=true max-bytes=64000 \
                caps=audio/x-opus,channel-mapping-family=0,channels=2,rate=48000 ! opusdec plc=false ! \
                audio/x-raw,format=S16LE,rate=48000,channels=2 ! appsink name=sink sync=false";
    run_pipeline(desc, packets, 10_000_000).concat().chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect()
}

/// Signal-to-noise ratio (dB) of `decoded` against `input` (interleaved stereo), at the lag
/// (in sample frames, up to 20 ms) where they match best.
fn snr_db(input: &[i16], decoded: &[i16]) -> (f64, usize) {
    let score = |lag: usize| -> (f64, f64) {
        let n = input.len().min(decoded.len().saturating_sub(lag * 2));
        let (mut signal, mut noise) = (0.0f64, 0.0f64);
        for i in 0..n {
            let x = f64::from(input[i]);
            let e = x - f64::from(decoded[i + lag * 2]);
            signal += x * x;
            noise += e * e;
        }
        (signal, noise)
    };
    let (lag, (signal, noise)) =
        (0..=960).map(|lag| (lag, score(lag))).min_by(|a, b| a.1.1.total_cmp(&b.1.1)).unwrap_or((0, (0.0, 1.0)));
    (10.0 * (signal / noise.max(1.0)).log10(), lag)
}

fn main() {
    let args = Args::parse();
    gst::init().expect("GStreamer");
    let mut complexities = args.complexity.clone();
    if !complexities.contains(&10) {
        complexities.insert(0, 10);
    }
    eprintln!(
        "synthesising {} s each of a busy game's sound, silence and a tonal sound; encoding the first two {} times \
         and the tonal one once at complexity {:?}…",
        args.seconds, args.repeats, complexities
    );
    let busy = sound(args.seconds, true);
    let silent = sound(args.seconds, false);
    let music = tonal(args.seconds);
    let input: Vec<i16> = music.concat().chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect();
    let audio_seconds = args.seconds as f64;
    let mut rows = Vec::new();
    for &c in &complexities {
        let mut busy_cpu = f64::INFINITY;
        let mut silent_cpu = f64::INFINITY;
        for _ in 0..args.repeats {
            busy_cpu = busy_cpu.min(encode(&busy, c).1);
            silent_cpu = silent_cpu.min(encode(&silent, c).1);
        }
        let packets = encode(&music, c).0;
        let bytes: usize = packets.iter().map(Vec::len).sum();
        let (snr, lag) = snr_db(&input, &decode(&packets));
        eprintln!("complexity {c}: busy {busy_cpu:.2} s, silence {silent_cpu:.2} s of CPU, SNR {snr:.1} dB");
        rows.push((c, busy_cpu / audio_seconds, silent_cpu / audio_seconds, snr, lag, bytes, packets.len()));
    }
    let paced = (args.realtime_seconds > 0).then(|| {
        eprintln!("running the node's sound on the demo's silence for {} s…", args.realtime_seconds);
        realtime(args.realtime_seconds)
    });
    let base = rows.iter().find(|r| r.0 == 10).map_or((1.0, 1.0), |r| (r.1, r.2));
    println!(
        "The node's Opus encoder (48 kHz stereo, 10 ms, restricted low delay, FEC, 96 kb/s), {} s of sound",
        args.seconds
    );
    println!(
        "{:>10} {:>16} {:>9} {:>16} {:>9} {:>9} {:>10}",
        "complexity", "busy % of core", "vs 10", "silence % core", "vs 10", "tonal SNR", "kb/s"
    );
    for &(c, busy, silent, snr, _, bytes, _) in &rows {
        println!(
            "{:>10} {:>16.3} {:>9.2} {:>16.3} {:>9.2} {:>9.1} {:>10.1}{}",
            c,
            100.0 * busy,
            busy / base.0,
            100.0 * silent,
            silent / base.1,
            snr,
            bytes as f64 * 8.0 / audio_seconds / 1000.0,
            if c == OPUS_COMPLEXITY { "  ← the node's" } else { "" }
        );
    }
    if let Some(paced) = paced {
        let offline = rows.iter().find(|r| r.0 == OPUS_COMPLEXITY).map_or(f64::NAN, |r| r.2);
        println!(
            "the node's sound on silence in real time: {:.3} % of a core ({:.1} × the same encoding as fast as it goes)",
            100.0 * paced,
            paced / offline
        );
    }
    let json: Vec<_> = rows
        .iter()
        .map(|&(c, busy, silent, snr, lag, bytes, packets)| {
            serde_json::json!({
                "complexity": c, "busy_core_pct": 100.0 * busy, "busy_vs_10": busy / base.0,
                "silence_core_pct": 100.0 * silent, "silence_vs_10": silent / base.1,
                "snr_db": snr, "delay_samples": lag, "kbps": bytes as f64 * 8.0 / audio_seconds / 1000.0,
                "packets": packets,
            })
        })
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "seconds": args.seconds, "node_complexity": OPUS_COMPLEXITY, "rows": json,
            "realtime_silence_core_pct": paced.map(|p| 100.0 * p),
        })
    );
}
