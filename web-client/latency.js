// Click-to-photon: from an input event to the requestVideoFrameCallback of the first
// frame shown that reflects it. The node tells the player, for the first frame that
// reflects new input, that frame's RTP timestamp and the highest input sequence number it
// reflects (over the input channel). Every later frame reflects that input too, so the
// photon is the first frame *presented* whose timestamp is not before it: when two frames
// land in one display refresh the browser shows only the second, and that is the one the
// player sees.

const WINDOW = 100;

/** RTP timestamps compared modulo 2^32: whether `a` is at or after `b`. */
const notBefore = (a, b) => ((a - b) >>> 0) < 0x80000000;

export class LatencyTracker {
  constructor(encoder) {
    this.encoder = encoder;
    this.frames = []; // presented frames, in order: {ts, shown}
    this.pending = []; // frame infos not yet seen on screen, in order
    this.measured = 0; // highest input seq already measured
    this.samples = []; // click-to-photon, ms
    this.breakdown = null;
  }

  /** A frame reached the screen (requestVideoFrameCallback). */
  onFrame(now, metadata) {
    if (metadata.rtpTimestamp === undefined) return;
    const frame = { ts: metadata.rtpTimestamp, shown: metadata.expectedDisplayTime ?? now };
    this.frames.push(frame);
    if (this.frames.length > 600) this.frames.shift();
    while (this.pending.length > 0 && notBefore(frame.ts, this.pending[0].ts)) {
      this.resolve(this.pending.shift(), frame.shown);
    }
  }

  /** The node's {ts, seq, render_ms, encode_ms, node_ms, relay_ms} for a frame. */
  onInfo(info) {
    const shown = this.frames.find((f) => notBefore(f.ts, info.ts));
    if (shown && this.pending.length === 0) this.resolve(info, shown.shown);
    else this.pending.push(info);
    if (this.pending.length > 600) this.pending.shift();
  }

  resolve(info, shown) {
    if (info.seq <= this.measured) return;
    // Every input up to info.seq is on screen for the first time; presses (not moves or
    // releases) are the samples.
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
