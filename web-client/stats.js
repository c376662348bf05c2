// Reads the video receiver's statistics from getStats() once a second and shows them.

/** Turns two successive inbound-rtp reports into the numbers the overlay shows. */
export function summarize(report, previous) {
  const s = {
    width: report.frameWidth ?? 0,
    height: report.frameHeight ?? 0,
    framesDecoded: report.framesDecoded ?? 0,
    framesDropped: report.framesDropped ?? 0,
    fps: report.framesPerSecond ?? 0,
    packetsLost: report.packetsLost ?? 0,
    nackCount: report.nackCount ?? 0,
    pliCount: report.pliCount ?? 0,
    freezeCount: report.freezeCount ?? 0,
    jitterBufferMs: 0,
    rttMs: 0,
    decodeMs: 0,
    bitrateKbps: 0,
  };
  if (report.jitterBufferEmittedCount > 0) {
    s.jitterBufferMs = (1000 * report.jitterBufferDelay) / report.jitterBufferEmittedCount;
  }
  if (report.framesDecoded > 0 && report.totalDecodeTime !== undefined) {
    s.decodeMs = (1000 * report.totalDecodeTime) / report.framesDecoded;
  }
  if (previous && report.timestamp > previous.timestamp) {
    const bits = 8 * (report.bytesReceived - previous.bytesReceived);
    s.bitrateKbps = bits / (report.timestamp - previous.timestamp);
    // Decoded fps over the last interval, for browsers without framesPerSecond.
    if (!report.framesPerSecond) {
      s.fps = (1000 * (report.framesDecoded - previous.framesDecoded)) / (report.timestamp - previous.timestamp);
    }
  }
  return s;
}

/** The audio receiver's numbers from two successive inbound-rtp reports. */
export function summarizeAudio(report, previous) {
  const a = {
    packetsReceived: report.packetsReceived ?? 0,
    packetsLost: report.packetsLost ?? 0,
    audioLevel: report.audioLevel ?? 0,
    totalAudioEnergy: report.totalAudioEnergy ?? 0,
    concealedSamples: report.concealedSamples ?? 0,
    totalSamplesReceived: report.totalSamplesReceived ?? 0,
    jitterBufferMs: 0,
    bitrateKbps: 0,
  };
  if (report.jitterBufferEmittedCount > 0) {
    a.jitterBufferMs = (1000 * report.jitterBufferDelay) / report.jitterBufferEmittedCount;
  }
  if (previous && report.timestamp > previous.timestamp) {
    a.bitrateKbps = (8 * (report.bytesReceived - previous.bytesReceived)) / (report.timestamp - previous.timestamp);
  }
  return a;
}

/** Capture time on the node (ms) of RTP timestamp `ts`, from a {ts, ms} pair and the clock rate. */
const captured = (ts, ref, rate) => ref.ms + (1000 * ((ts - ref.ts) | 0)) / rate;

/**
 * How far the sound being played is ahead of the picture being shown, in ms of the node's
 * capture clock (negative: the sound trails). Each receiver's newest synchronization source
 * pairs the local time it last delivered a frame with that frame's RTP timestamp; the
 * relay's `clock` message maps both streams' RTP timestamps to capture times on the node.
 */
export function playoutOffset(videoReceiver, audioReceiver, clock) {
  const [v] = videoReceiver.getSynchronizationSources();
  const [a] = audioReceiver.getSynchronizationSources();
  if (!v || !a || !clock) return undefined;
  const sound = captured(a.rtpTimestamp, clock.audio, 48000) - a.timestamp;
  const picture = captured(v.rtpTimestamp, clock.video, 90000) - v.timestamp;
  return sound - picture;
}

export function format(s, latency) {
  const lines = [
    `${s.width}×${s.height}  ${s.fps.toFixed(0)} fps`,
    `${(s.bitrateKbps / 1000).toFixed(2)} Mb/s`,
    `jitter buffer ${s.jitterBufferMs.toFixed(1)} ms`,
    `decode ${s.decodeMs.toFixed(1)} ms`,
    `lost ${s.packetsLost}  nack ${s.nackCount}  pli ${s.pliCount}  freezes ${s.freezeCount}`,
    `network rtt ${s.rttMs.toFixed(1)} ms`,
  ];
  if (s.relay) lines.push(s.relay);
  if (s.audio) {
    const offset = s.avOffsetMs === undefined ? '' : `  A/V offset ${s.avOffsetMs.toFixed(0)} ms`;
    const held = s.pictureHoldMs > 0 ? `  (picture held ${s.pictureHoldMs} ms for sync)` : '';
    lines.push(`audio ${s.audio.bitrateKbps.toFixed(0)} kb/s  jitter buffer ${s.audio.jitterBufferMs.toFixed(1)} ms${offset}${held}`);
  }
  if (latency && latency.age) {
    lines.push(`picture age ${latency.age.p50.toFixed(1)} ms p50  ${latency.age.p99.toFixed(1)} ms p99 (capture → screen)`);
  }
  if (latency && latency.count > 0) {
    lines.push(`click-to-photon p50 ${latency.p50.toFixed(1)} ms  p95 ${latency.p95.toFixed(1)} ms  (${latency.count})`);
  }
  if (latency && latency.node) {
    const n = latency.node;
    lines.push(`node: render ${n.render_ms.toFixed(1)}  encode ${n.encode_ms.toFixed(1)}  input→sent ${n.node_ms.toFixed(1)} ms`);
    lines.push(`relay ${(n.relay_ms ?? 0).toFixed(2)} ms`);
  }
  const p = latency && latency.lastPress;
  if (p && p.network !== undefined) {
    const f = (v) => v.toFixed(1);
    lines.push(`last press ${f(p.total)} ms: network ${f(p.network)} · node ${f(p.node)} (render ${f(p.render)}, encode ${f(p.encode)})`);
    lines.push(`  · relay ${f(p.relay)} · jitter buffer ${f(p.jitterBuffer)} · decode ${f(p.decode)} · display ${f(p.display)}`);
  }
  return lines.join('\n');
}

/**
 * Polls `pc` every second; calls `onStats(summary)` and writes the overlay into `element`.
 * `latency()` gives the click-to-photon summary to show.
 */
export function watchStats(pc, element, onStats, latency = () => null) {
  let previous = null;
  let previousAudio = null;
  const timer = setInterval(async () => {
    if (pc.connectionState === 'closed') {
      clearInterval(timer);
      return;
    }
    const stats = await pc.getStats();
    let rttMs = 0;
    for (const report of stats.values()) {
      if (report.type === 'candidate-pair' && report.nominated && report.currentRoundTripTime !== undefined) {
        rttMs = 1000 * report.currentRoundTripTime;
      }
    }
    let audio = null;
    for (const report of stats.values()) {
      if (report.type === 'inbound-rtp' && report.kind === 'audio') {
        audio = summarizeAudio(report, previousAudio);
        previousAudio = report;
      }
    }
    for (const report of stats.values()) {
      if (report.type === 'inbound-rtp' && report.kind === 'video') {
        const s = summarize(report, previous);
        s.rttMs = rttMs;
        if (audio) s.audio = audio;
        s.latency = latency();
        previous = report;
        onStats(s);
        element.textContent = format(s, s.latency);
      }
    }
  }, 1000);
  return () => clearInterval(timer);
}
