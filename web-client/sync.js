// Keeps the sound from trailing the picture by more than the eye notices, at the least cost
// to the picture's latency.
//
// By default the relay sends sound and picture as separate streams, so Chromium plays each
// as soon as it can: the picture is not held back for lip sync. The sound's jitter buffer
// (NetEq) sizes itself from how unevenly packets arrive; on a busy machine or network it
// can grow to 60-100 ms, and the sound then trails the picture by that much. This guard
// compares what both streams are playing on the node's capture clock (`playoutOffset`)
// and, only while the sound is audible and trails by more than `TOLERANCE_MS`, asks the
// relay to hold the picture (its playout delay for this viewer) just enough to bring it
// back within bounds. A sound that keeps up costs the picture nothing.

/**
 * Sound trailing the picture by up to this much (as the streams' playout compares) is left
 * alone. ITU-R BT.1359 puts the detectable trail at 45 ms; the sound's way out (the audio
 * device's buffer) adds to what is measured here, the picture's (compositor) less.
 */
export const TOLERANCE_MS = 15;
/** Updates ignored at the start: the sound's jitter buffer starts full and drains. */
export const WARM_UP = 4;
/** The most the guard holds the picture: past this, late sound is better than a late picture. */
export const MAX_HOLD_MS = 150;
/** How much of a hold no longer needed is released per update (a sudden drop jerks the picture). */
export const RELEASE_MS = 30;

/**
 * The picture hold to apply next, from the one in force and the measured offset.
 * `offsetMs` is the sound's playout minus the picture's (negative: the sound trails),
 * measured with `holdMs` in force; `heard` is whether the player hears the sound at all.
 */
export function nextHold(holdMs, offsetMs, heard) {
  let want = 0;
  if (heard && Number.isFinite(offsetMs)) {
    // How far the sound would trail a picture that is not held.
    const trail = holdMs - offsetMs;
    want = Math.min(MAX_HOLD_MS, Math.max(0, trail - TOLERANCE_MS));
  }
  return want >= holdMs ? want : Math.max(want, holdMs - RELEASE_MS);
}

/** Applies `nextHold` once per stats update; `send(ms)` asks the relay for a new hold. */
export class SyncGuard {
  constructor(send) {
    this.send = send;
    this.holdMs = 0;
    // Updates to skip: the first offset after a change may predate it.
    this.settling = 0;
    // The last minute's [offset, hold] per update (`pylon.sync.history`: the console, tests).
    this.history = [];
    this.recent = [];
  }

  update(offsetMs, heard) {
    this.history.push([offsetMs, this.holdMs]);
    if (this.history.length > 60) this.history.shift();
    if (this.history.length <= WARM_UP) return this.holdMs;
    if (this.settling > 0) {
      this.settling--;
      this.recent = [];
      return this.holdMs;
    }
    // The median of the last three readings: one stalled update moves nothing.
    if (Number.isFinite(offsetMs)) this.recent.push(offsetMs);
    if (this.recent.length > 3) this.recent.shift();
    const median = [...this.recent].sort((x, y) => x - y)[Math.floor(this.recent.length / 2)];
    // The relay holds in whole 10 ms steps (the playout-delay extension's unit).
    const hold = 10 * Math.round(nextHold(this.holdMs, median, heard) / 10);
    if (hold !== this.holdMs && this.send(hold)) {
      this.holdMs = hold;
      this.settling = 1;
    }
    return this.holdMs;
  }
}
