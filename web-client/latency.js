// Click-to-photon: from an input event to the requestVideoFrameCallback of the first
// frame that reflects it. The node tells the player, per frame, the highest input
// sequence number the frame reflects (by RTP timestamp, over the input channel); the
// page knows when it sent each input and when each frame was presented.

const WINDOW = 100;

export class LatencyTracker {
  constructor(encoder) {
    this.encoder = encoder;
    this.frames = new Map(); // rtpTimestamp → presentation time (ms)
    this.infos = new Map(); // rtpTimestamp → frame info from the node
    this.measured = 0; // highest input seq already measured
    this.samples = []; // click-to-photon, ms
    this.breakdown = null;
  }

  /** A frame reached the screen (requestVideoFrameCallback). */
  onFrame(now, metadata) {
    if (metadata.rtpTimestamp === undefined) return;
    const shown = metadata.expectedDisplayTime ?? now;
    this.frames.set(metadata.rtpTimestamp, shown);
    this.match(metadata.rtpTimestamp);
    if (this.frames.size > 600) this.frames.delete(this.frames.keys().next().value);
  }

  /** The node's {ts, seq, render_ms, encode_ms, node_ms} for a frame. */
  onInfo(info) {
    this.infos.set(info.ts, info);
    if (this.infos.size > 600) this.infos.delete(this.infos.keys().next().value);
    this.match(info.ts);
  }

  match(ts) {
    const shown = this.frames.get(ts);
    const info = this.infos.get(ts);
    if (shown === undefined || info === undefined || info.seq <= this.measured) return;
    // Every input up to info.seq shows for the first time in this frame; the newest
    // "press" among them is the sample (moves are not clicks).
    for (let seq = this.measured + 1; seq <= info.seq; seq++) {
      const sent = this.encoder.sentAt.get(seq);
      if (sent !== undefined && this.encoder.presses.has(seq)) {
        this.samples.push(shown - sent);
        if (this.samples.length > WINDOW) this.samples.shift();
      }
    }
    this.measured = info.seq;
    this.breakdown = info;
  }

  percentile(p) {
    if (this.samples.length === 0) return null;
    const sorted = [...this.samples].sort((a, b) => a - b);
    return sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))];
  }

  summary() {
    return {
      p50: this.percentile(0.5),
      p95: this.percentile(0.95),
      count: this.samples.length,
      node: this.breakdown,
    };
  }
}
