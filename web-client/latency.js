// Click-to-photon: from an input event to the requestVideoFrameCallback of the first
// frame shown that reflects it. The node tells the player, for the first frame that
// reflects new input, that frame's RTP timestamp and the highest input sequence number it
// reflects (over the input channel). Every later frame reflects that input too, so the
// photon is the first frame *presented* whose timestamp is not before it: when two frames
// land in one display refresh the browser shows only the second, and that is the one the
// player sees.

const WINDOW = 100;

/**
 * When a frame given to requestVideoFrameCallback reaches the screen: its
 * expectedDisplayTime, but not before the refresh that runs the callback (`now`): headless
 * Chromium sometimes gives the refresh before it, earlier than the frame's presentation and
 * even than its last packet's arrival. The page exposes it as `pylon.displayTime` for the
 * benches and tests that watch frames themselves.
 */
export const displayTime = (now, metadata) => Math.max(metadata.expectedDisplayTime ?? now, now);

/** RTP timestamps compared modulo 2^32: whether `a` is at or after `b`. */
const notBefore = (a, b) => ((a - b) >>> 0) < 0x80000000;

export class LatencyTracker {
  constructor(encoder) {
    this.encoder = encoder;
    this.frames = []; // presented frames, in order: {ts, shown}
    this.pending = []; // frame infos not yet seen on screen, in order
    this.measured = 0; // highest input seq already measured
    this.samples = []; // click-to-photon, ms
    // Capture on the node → on screen, ms, per frame (the relay stamps each frame's capture
    // time; Chromium puts it on this page's clock as captureTime): the picture's age.
    this.ages = [];
    // Every input's first frame on screen (moves too), by sequence number: sent → shown, ms
    // (what the node announced; `make latency` compares it with what the pixels show).
    this.announced = new Map();
    this.breakdown = null;
  }

  /** A frame reached the screen (requestVideoFrameCallback). */
  onFrame(now, metadata) {
    if (metadata.rtpTimestamp === undefined) return;
    const shown = displayTime(now, metadata);
    if (metadata.captureTime !== undefined) {
      this.ages.push(shown - metadata.captureTime);
      if (this.ages.length > 300) this.ages.shift();
    }
    const frame = {
      ts: metadata.rtpTimestamp,
      shown,
      // Last packet received, decoded (processingDuration), handed to the compositor.
      received: metadata.receiveTime,
      decodeMs: metadata.processingDuration !== undefined ? 1000 * metadata.processingDuration : undefined,
      presented: metadata.presentationTime,
    };
    this.frames.push(frame);
    if (this.frames.length > 600) this.frames.shift();
    while (this.pending.length > 0 && notBefore(frame.ts, this.pending[0].ts)) {
      this.resolve(this.pending.shift(), frame);
    }
  }

  /** The node's {ts, seq, render_ms, encode_ms, node_ms, relay_ms} for a frame. */
  onInfo(info) {
    const shown = this.frames.find((f) => notBefore(f.ts, info.ts));
    if (shown && this.pending.length === 0) this.resolve(info, shown);
    else this.pending.push(info);
    if (this.pending.length > 600) this.pending.shift();
  }

  resolve(info, frame) {
    if (info.seq <= this.measured) return;
    const shown = frame.shown;
    let press = null;
    // Every input up to info.seq is on screen for the first time; presses (not moves or
    // releases) are the samples.
    for (let seq = this.measured + 1; seq <= info.seq; seq++) {
      const sent = this.encoder.sentAt.get(seq);
      if (sent !== undefined) {
        this.announced.set(seq, shown - sent);
        if (this.announced.size > 1000) this.announced.delete(this.announced.keys().next().value);
      }
      if (sent !== undefined && this.encoder.presses.has(seq)) {
        press = sent;
        this.samples.push(shown - sent);
        if (this.samples.length > WINDOW) this.samples.shift();
      }
    }
    this.measured = info.seq;
    this.breakdown = info;
    if (press !== null) this.lastPress = LatencyTracker.split(shown - press, info, frame);
  }

  /**
   * Where one press's milliseconds went, each part from a measured timestamp or duration:
   * the node's (input arrival → its frame's packets sent, of which render and encode) and
   * the relay's (arrival → kernel) from the frame announcement; the browser's from
   * requestVideoFrameCallback (last packet received → decoded → presented → displayed).
   * What remains is network: the input's way to the node and the frame's way back.
   */
  static split(total, info, frame) {
    const parts = { total, node: info.node_ms, render: info.render_ms, encode: info.encode_ms, relay: info.relay_ms ?? 0 };
    if (frame.received !== undefined) {
      // Chromium coarsens these times (and may date a frame's presentation before its last
      // packet's arrival), so every part is kept within what it belongs to: none is negative,
      // and they still add up to the press's time.
      const browser = Math.max(0, frame.shown - frame.received);
      parts.decode = frame.decodeMs ?? 0;
      // Presented → expected on screen; Chromium may expect a late-submitted frame on screen
      // slightly before it was submitted: no wait, then.
      parts.display = frame.presented !== undefined ? Math.min(browser, Math.max(0, frame.shown - frame.presented)) : 0;
      // Received → handed to the decoder (what is left of received → displayed). Chromium's
      // decode time can start before the last packet's arrival (and its times are coarsened),
      // so decode may exceed what is left: then the buffer held nothing, and decode is the
      // part of it after the last packet.
      parts.jitterBuffer = Math.max(0, browser - parts.decode - parts.display);
      parts.decode = browser - parts.display - parts.jitterBuffer;
      parts.network = total - parts.node - parts.relay - browser;
    }
    return parts;
  }

  percentile(p, samples = this.samples) {
    if (samples.length === 0) return null;
    const sorted = [...samples].sort((a, b) => a - b);
    return sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))];
  }

  summary() {
    return {
      p50: this.percentile(0.5),
      p95: this.percentile(0.95),
      count: this.samples.length,
      node: this.breakdown,
      lastPress: this.lastPress ?? null,
      // The picture's age on screen (capture → display), over the last 300 frames.
      age: this.ages.length > 0 ? { p50: this.percentile(0.5, this.ages), p99: this.percentile(0.99, this.ages) } : null,
    };
  }
}
