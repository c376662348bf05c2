// Captures keyboard, mouse, gamepad and touch input on the player page and sends it in
// Pylon's binary input format (proto/src/input.rs documents it). Mouse motion goes on an
// unordered, unreliable channel (a lost move is superseded by the next); everything else
// on a reliable, ordered one.

// KeyboardEvent.code values by wire number: must equal proto's KEY_CODES (a Rust test checks).
export const KEY_CODES = [
  'KeyA', 'KeyB', 'KeyC', 'KeyD', 'KeyE', 'KeyF', 'KeyG', 'KeyH', 'KeyI', 'KeyJ', 'KeyK', 'KeyL', 'KeyM', 'KeyN',
  'KeyO', 'KeyP', 'KeyQ', 'KeyR', 'KeyS', 'KeyT', 'KeyU', 'KeyV', 'KeyW', 'KeyX', 'KeyY', 'KeyZ', 'Digit0',
  'Digit1', 'Digit2', 'Digit3', 'Digit4', 'Digit5', 'Digit6', 'Digit7', 'Digit8', 'Digit9', 'Escape', 'F1', 'F2',
  'F3', 'F4', 'F5', 'F6', 'F7', 'F8', 'F9', 'F10', 'F11', 'F12', 'Backquote', 'Minus', 'Equal', 'Backspace', 'Tab',
  'BracketLeft', 'BracketRight', 'Backslash', 'CapsLock', 'Semicolon', 'Quote', 'Enter', 'ShiftLeft', 'ShiftRight',
  'Comma', 'Period', 'Slash', 'ControlLeft', 'ControlRight', 'AltLeft', 'AltRight', 'MetaLeft', 'MetaRight', 'Space',
  'ContextMenu', 'ArrowUp', 'ArrowDown', 'ArrowLeft', 'ArrowRight', 'Insert', 'Delete', 'Home', 'End', 'PageUp',
  'PageDown', 'PrintScreen', 'ScrollLock', 'Pause', 'NumLock', 'Numpad0', 'Numpad1', 'Numpad2', 'Numpad3',
  'Numpad4', 'Numpad5', 'Numpad6', 'Numpad7', 'Numpad8', 'Numpad9', 'NumpadAdd', 'NumpadSubtract',
  'NumpadMultiply', 'NumpadDivide', 'NumpadDecimal', 'NumpadEnter', 'IntlBackslash',
];
const KEY_INDEX = new Map(KEY_CODES.map((c, i) => [c, i]));

const T = { KeyDown: 1, KeyUp: 2, MouseMove: 3, MouseButton: 4, MouseWheel: 5, Gamepad: 6, Touch: 7 };
const TOUCH_PHASE = { touchstart: 0, touchmove: 1, touchend: 2, touchcancel: 3 };

const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));

/** Builds messages with the common header; `seq` grows by one per message. */
export class InputEncoder {
  constructor() {
    this.seq = 0;
    /** client time (ms) of each sent sequence number, for click-to-photon. */
    this.sentAt = new Map();
    /** sequence numbers of presses (key, button, touch start): the click-to-photon samples. */
    this.presses = new Set();
  }

  message(type, bodyLen, fill) {
    const buf = new ArrayBuffer(10 + bodyLen);
    const v = new DataView(buf);
    const seq = ++this.seq >>> 0;
    const now = performance.now();
    v.setUint8(0, 1);
    v.setUint8(1, type);
    v.setUint32(2, seq);
    v.setUint32(6, Math.floor(now) >>> 0);
    fill(v, 10);
    this.sentAt.set(seq, now);
    const press = type === T.KeyDown || (type === T.MouseButton && v.getUint8(11) === 1)
      || (type === T.Touch && v.getUint8(10) === 0);
    if (press) this.presses.add(seq);
    if (this.sentAt.size > 512) {
      const oldest = this.sentAt.keys().next().value;
      this.sentAt.delete(oldest);
      this.presses.delete(oldest);
    }
    return buf;
  }

  key(down, code, e) {
    const key = KEY_INDEX.get(code);
    if (key === undefined) return null;
    const mods = (e.shiftKey ? 1 : 0) | (e.ctrlKey ? 2 : 0) | (e.altKey ? 4 : 0) | (e.metaKey ? 8 : 0);
    return this.message(down ? T.KeyDown : T.KeyUp, 3, (v, o) => {
      v.setUint16(o, key);
      v.setUint8(o + 2, mods);
    });
  }

  mouseMove(x, y, dx, dy) {
    return this.message(T.MouseMove, 8, (v, o) => {
      v.setUint16(o, clamp(Math.round(x), 0, 65535));
      v.setUint16(o + 2, clamp(Math.round(y), 0, 65535));
      v.setInt16(o + 4, clamp(Math.round(dx), -32767, 32767));
      v.setInt16(o + 6, clamp(Math.round(dy), -32767, 32767));
    });
  }

  mouseButton(button, down) {
    return this.message(T.MouseButton, 2, (v, o) => {
      v.setUint8(o, clamp(button, 0, 4));
      v.setUint8(o + 1, down ? 1 : 0);
    });
  }

  wheel(dx, dy) {
    const f = (x) => (Number.isFinite(x) ? clamp(x, -10000, 10000) : 0);
    return this.message(T.MouseWheel, 8, (v, o) => {
      v.setFloat32(o, f(dx));
      v.setFloat32(o + 4, f(dy));
    });
  }

  gamepad(pad, connected, buttons, axes) {
    const b = buttons.slice(0, 32);
    const a = axes.slice(0, 8);
    return this.message(T.Gamepad, 4 + b.length + 2 * a.length, (v, o) => {
      v.setUint8(o, pad);
      v.setUint8(o + 1, connected ? 1 : 0);
      v.setUint8(o + 2, b.length);
      b.forEach((x, i) => v.setUint8(o + 3 + i, clamp(Math.round(x * 255), 0, 255)));
      const ao = o + 3 + b.length;
      v.setUint8(ao, a.length);
      a.forEach((x, i) => v.setInt16(ao + 1 + 2 * i, clamp(Math.round(x * 32767), -32767, 32767)));
    });
  }

  touch(phase, points) {
    const p = points.slice(0, 10);
    if (p.length === 0) return null;
    return this.message(T.Touch, 2 + 5 * p.length, (v, o) => {
      v.setUint8(o, phase);
      v.setUint8(o + 1, p.length);
      p.forEach((t, i) => {
        v.setUint8(o + 2 + 5 * i, t.id & 0xff);
        v.setUint16(o + 3 + 5 * i, clamp(Math.round(t.x), 0, 65535));
        v.setUint16(o + 5 + 5 * i, clamp(Math.round(t.y), 0, 65535));
      });
    });
  }
}

/** Browser shortcuts that would take the player out of the game; suppressed while playing. */
const SUPPRESSED = new Set(['Tab', 'Backspace', 'F1', 'F3', 'F5', 'F6', 'F7', 'F12', 'Space', 'ArrowUp', 'ArrowDown',
  'ArrowLeft', 'ArrowRight', 'PageUp', 'PageDown', 'Home', 'End', 'Quote', 'Slash', 'ContextMenu']);

/**
 * Wires input capture to `video` and sends through `send(buffer, reliable)`.
 * Returns a function that detaches every listener.
 */
export function captureInput(video, send) {
  const enc = new InputEncoder();
  const held = new Set();
  const pads = new Map();
  const off = [];
  const on = (target, type, fn, opts) => {
    target.addEventListener(type, fn, opts);
    off.push(() => target.removeEventListener(type, fn, opts));
  };
  const out = (buf, reliable = true) => {
    if (buf) send(buf, reliable);
  };
  // Position in video pixels, whatever size the element is shown at.
  const toVideo = (clientX, clientY) => {
    const r = video.getBoundingClientRect();
    const sx = (video.videoWidth || r.width) / (r.width || 1);
    const sy = (video.videoHeight || r.height) / (r.height || 1);
    return [(clientX - r.left) * sx, (clientY - r.top) * sy];
  };

  on(window, 'keydown', (e) => {
    if (SUPPRESSED.has(e.code) || e.ctrlKey || e.metaKey) e.preventDefault();
    if (e.repeat) return;
    held.add(e.code);
    out(enc.key(true, e.code, e));
  });
  on(window, 'keyup', (e) => {
    e.preventDefault();
    held.delete(e.code);
    out(enc.key(false, e.code, e));
  });
  // Keys held when the page loses focus would stay down forever in the game.
  const releaseAll = () => {
    for (const code of held) out(enc.key(false, code, {}));
    held.clear();
  };
  on(window, 'blur', releaseAll);
  on(document, 'visibilitychange', () => {
    if (document.hidden) releaseAll();
  });

  on(video, 'click', () => {
    if (document.pointerLockElement !== video && video.requestPointerLock) {
      const p = video.requestPointerLock();
      if (p && p.catch) p.catch(() => {});
    }
  });
  // Moves: `pointerrawupdate`, where the browser has it (Chromium, in secure contexts:
  // https and localhost), is dispatched as soon as the mouse moves; `mousemove` waits for
  // the next animation frame, up to a whole display refresh (16.7 ms at 60 Hz) that a game
  // stream cannot afford. Touch has its own handlers below.
  const move = (e) => {
    if (e.pointerType === 'touch') return;
    const [x, y] = toVideo(e.clientX, e.clientY);
    out(enc.mouseMove(x, y, e.movementX || 0, e.movementY || 0), false);
  };
  on(video, 'onpointerrawupdate' in window ? 'pointerrawupdate' : 'mousemove', move);
  on(video, 'mousedown', (e) => {
    e.preventDefault();
    out(enc.mouseButton(e.button, true));
  });
  on(window, 'mouseup', (e) => out(enc.mouseButton(e.button, false)));
  on(video, 'contextmenu', (e) => e.preventDefault());
  on(video, 'wheel', (e) => {
    e.preventDefault();
    const scale = e.deltaMode === 1 ? 16 : e.deltaMode === 2 ? 800 : 1;
    out(enc.wheel(e.deltaX * scale, e.deltaY * scale));
  }, { passive: false });

  const touches = (e) => Array.from(e.changedTouches, (t) => {
    const [x, y] = toVideo(t.clientX, t.clientY);
    return { id: t.identifier, x, y };
  });
  for (const type of Object.keys(TOUCH_PHASE)) {
    on(video, type, (e) => {
      e.preventDefault();
      out(enc.touch(TOUCH_PHASE[type], touches(e)), type !== 'touchmove');
    }, { passive: false });
  }

  // Gamepads: polled every animation frame, only changes sent. The next poll is scheduled
  // first, so one failed send (a channel closing under us) cannot stop gamepad input for
  // the rest of the session.
  let raf = 0;
  const poll = () => {
    raf = requestAnimationFrame(poll);
    const list = navigator.getGamepads ? navigator.getGamepads() : [];
    for (let i = 0; i < 4; i++) {
      const gp = list[i];
      const state = gp && gp.connected
        ? JSON.stringify([gp.buttons.map((b) => Math.round(b.value * 255)), gp.axes.map((a) => Math.round(a * 32767))])
        : null;
      if (state !== (pads.get(i) ?? null)) {
        try {
          if (state === null) out(enc.gamepad(i, false, [], []));
          else out(enc.gamepad(i, true, gp.buttons.map((b) => b.value), Array.from(gp.axes)));
          pads.set(i, state);
        } catch (e) {
          // Not recorded as sent: the next frame tries again.
          console.warn('gamepad input not sent', e);
        }
      }
    }
  };
  raf = requestAnimationFrame(poll);
  off.push(() => cancelAnimationFrame(raf));

  return { encoder: enc, detach: () => off.forEach((f) => f()), releaseAll };
}
