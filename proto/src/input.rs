//! Player input: a compact, versioned binary format for keyboard, mouse, gamepad and
//! touch events, sent by the browser over WebRTC DataChannels, forwarded unchanged by the
//! relay (which checks size, role and rate) and applied by the render node.
//!
//! Every message is one DataChannel message (or one QUIC datagram/stream frame) and
//! starts with the same 10-byte header; all integers are big endian.
//!
//! | field     | size | meaning                                                     |
//! |-----------|------|-------------------------------------------------------------|
//! | version   | 1    | [`INPUT_VERSION`] (1)                                        |
//! | type      | 1    | event type, below                                           |
//! | seq       | 4    | sequence number, +1 per message from this client            |
//! | time_ms   | 4    | client timestamp, ms (`performance.now()` truncated, wraps)  |
//!
//! | type | event          | body                                                                        | size |
//! |------|----------------|-----------------------------------------------------------------------------|------|
//! | 1    | `KeyDown`      | key u16 (index in [`KEY_CODES`]), modifiers u8 (1 shift, 2 ctrl, 4 alt, 8 meta) | 3 |
//! | 2    | `KeyUp`        | same as `KeyDown`                                                           | 3    |
//! | 3    | `MouseMove`    | x u16, y u16 (video pixels), dx i16, dy i16 (relative, under pointer lock)   | 8    |
//! | 4    | `MouseButton`  | button u8 (0 left, 1 middle, 2 right, 3 back, 4 forward), down u8 (0/1)      | 2    |
//! | 5    | `MouseWheel`   | dx f32, dy f32 (pixels, fractional; finite, \|v\| ≤ 10 000)                  | 8    |
//! | 6    | `Gamepad`      | pad u8 (0–3), connected u8, n u8 (≤ 32) then n button values u8 (0–255), m u8 (≤ 8) then m axes i16 | 4+n+2m |
//! | 7    | `Touch`        | phase u8 (0 start, 1 move, 2 end, 3 cancel), n u8 (1–10) then n × (id u8, x u16, y u16) | 2+5n |
//! | 8    | `Capacity`     | seed 32 bytes, n u16: a checker's proof-of-capacity challenge ([`crate::capacity`]); the node answers it only in a checker's session | 34 |
//!
//! A message is at most [`MAX_INPUT_MESSAGE`] bytes. Anything else — unknown version or
//! type, wrong length, out-of-range values, NaN — is an [`InputError`], never a panic.

use thiserror::Error;

/// Version of the input format.
pub const INPUT_VERSION: u8 = 1;
/// Bytes of the common header.
pub const INPUT_HEADER_LEN: usize = 10;
/// Largest valid message (a full gamepad state).
pub const MAX_INPUT_MESSAGE: usize = INPUT_HEADER_LEN + 4 + MAX_GAMEPAD_BUTTONS + 2 * MAX_GAMEPAD_AXES;
/// Gamepads a player may use at once.
pub const MAX_GAMEPADS: u8 = 4;
/// Buttons per gamepad.
pub const MAX_GAMEPAD_BUTTONS: usize = 32;
/// Axes per gamepad.
pub const MAX_GAMEPAD_AXES: usize = 8;
/// Simultaneous touch points.
pub const MAX_TOUCH_POINTS: usize = 10;
/// Largest wheel delta accepted, in pixels.
pub const MAX_WHEEL_DELTA: f32 = 10_000.0;

/// `KeyboardEvent.code` values, indexed by the key number on the wire. The web client
/// holds the same table (`web-client/input.js`); a test keeps the two equal.
pub const KEY_CODES: &[&str] = &[
    "KeyA",
    "KeyB",
    "KeyC",
    "KeyD",
    "KeyE",
    "KeyF",
    "KeyG",
    "KeyH",
    "KeyI",
    "KeyJ",
    "KeyK",
    "KeyL",
    "KeyM",
    "KeyN",
    "KeyO",
    "KeyP",
    "KeyQ",
    "KeyR",
    "KeyS",
    "KeyT",
    "KeyU",
    "KeyV",
    "KeyW",
    "KeyX",
    "KeyY",
    "KeyZ",
    "Digit0",
    "Digit1",
    "Digit2",
    "Digit3",
    "Digit4",
    "Digit5",
    "Digit6",
    "Digit7",
    "Digit8",
    "Digit9",
    "Escape",
    "F1",
    "F2",
    "F3",
    "F4",
    "F5",
    "F6",
    "F7",
    "F8",
    "F9",
    "F10",
    "F11",
    "F12",
    "Backquote",
    "Minus",
    "Equal",
    "Backspace",
    "Tab",
    "BracketLeft",
    "BracketRight",
    "Backslash",
    "CapsLock",
    "Semicolon",
    "Quote",
    "Enter",
    "ShiftLeft",
    "ShiftRight",
    "Comma",
    "Period",
    "Slash",
    "ControlLeft",
    "ControlRight",
    "AltLeft",
    "AltRight",
    "MetaLeft",
    "MetaRight",
    "Space",
    "ContextMenu",
    "ArrowUp",
    "ArrowDown",
    "ArrowLeft",
    "ArrowRight",
    "Insert",
    "Delete",
    "Home",
    "End",
    "PageUp",
    "PageDown",
    "PrintScreen",
    "ScrollLock",
    "Pause",
    "NumLock",
    "Numpad0",
    "Numpad1",
    "Numpad2",
    "Numpad3",
    "Numpad4",
    "Numpad5",
    "Numpad6",
    "Numpad7",
    "Numpad8",
    "Numpad9",
    "NumpadAdd",
    "NumpadSubtract",
    "NumpadMultiply",
    "NumpadDivide",
    "NumpadDecimal",
    "NumpadEnter",
    "IntlBackslash",
];

/// The wire number of a `KeyboardEvent.code`, if Pylon knows it.
pub fn key_index(code: &str) -> Option<u16> {
    KEY_CODES.iter().position(|c| *c == code).and_then(|i| u16::try_from(i).ok())
}

/// Why a message was rejected.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum InputError {
    /// Shorter than its type requires.
    #[error("input message truncated")]
    Truncated,
    /// Longer than its type allows (or than [`MAX_INPUT_MESSAGE`]).
    #[error("input message of {0} bytes is too long")]
    TooLong(usize),
    /// Another format version.
    #[error("unsupported input version {0}")]
    Version(u8),
    /// An unknown event type.
    #[error("unknown input type {0}")]
    UnknownType(u8),
    /// A field outside its range (the name says which).
    #[error("input field {0} out of range")]
    OutOfRange(&'static str),
}

/// Touch phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TouchPhase {
    /// Fingers went down.
    Start,
    /// Fingers moved.
    Move,
    /// Fingers lifted.
    End,
    /// The browser cancelled the touches.
    Cancel,
}

/// One touch point in video pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TouchPoint {
    /// Identifier, stable while the finger is down.
    pub id: u8,
    /// Horizontal position.
    pub x: u16,
    /// Vertical position.
    pub y: u16,
}

/// An input event.
#[derive(Debug, Clone, PartialEq)]
pub enum InputEvent {
    /// A key went down. `key` indexes [`KEY_CODES`].
    KeyDown {
        /// Key number.
        key: u16,
        /// Modifier bits.
        modifiers: u8,
    },
    /// A key went up.
    KeyUp {
        /// Key number.
        key: u16,
        /// Modifier bits.
        modifiers: u8,
    },
    /// The mouse moved.
    MouseMove {
        /// Absolute position, video pixels.
        x: u16,
        /// Absolute position, video pixels.
        y: u16,
        /// Relative motion (pointer lock).
        dx: i16,
        /// Relative motion (pointer lock).
        dy: i16,
    },
    /// A mouse button changed.
    MouseButton {
        /// Button number (0–4).
        button: u8,
        /// Pressed or released.
        down: bool,
    },
    /// The wheel turned.
    MouseWheel {
        /// Horizontal delta, pixels.
        dx: f32,
        /// Vertical delta, pixels.
        dy: f32,
    },
    /// The full state of one gamepad.
    Gamepad {
        /// Pad number (0–3).
        pad: u8,
        /// Whether it is connected.
        connected: bool,
        /// Button values, 0–255 (analog triggers use the whole range).
        buttons: Vec<u8>,
        /// Axes, −32767..=32767.
        axes: Vec<i16>,
    },
    /// Touch points changed.
    Touch {
        /// What happened.
        phase: TouchPhase,
        /// The points concerned.
        points: Vec<TouchPoint>,
    },
    /// A checker's proof-of-capacity challenge (not a game input: the node answers it on its
    /// GPU, and only inside a checker's session). Decoding checks only the wire; the size is
    /// judged by [`crate::capacity::Challenge::new`].
    Capacity {
        /// The challenge's seed.
        seed: [u8; 32],
        /// Matrix size.
        n: u16,
    },
}

/// A message: header fields and the event.
#[derive(Debug, Clone, PartialEq)]
pub struct InputMessage {
    /// Sequence number.
    pub seq: u32,
    /// Client timestamp, ms.
    pub time_ms: u32,
    /// The event.
    pub event: InputEvent,
}

/// A cursor over a message body that never reads past the end.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u8(&mut self) -> Result<u8, InputError> {
        let (&b, rest) = self.0.split_first().ok_or(InputError::Truncated)?;
        self.0 = rest;
        Ok(b)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], InputError> {
        let (head, rest) = self.0.split_at_checked(N).ok_or(InputError::Truncated)?;
        self.0 = rest;
        head.try_into().map_err(|_| InputError::Truncated)
    }
    fn u16(&mut self) -> Result<u16, InputError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn i16(&mut self) -> Result<i16, InputError> {
        Ok(i16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, InputError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn f32(&mut self) -> Result<f32, InputError> {
        Ok(f32::from_be_bytes(self.array()?))
    }
    fn finish(&self, total: usize) -> Result<(), InputError> {
        if self.0.is_empty() { Ok(()) } else { Err(InputError::TooLong(total)) }
    }
}

fn check(ok: bool, field: &'static str) -> Result<(), InputError> {
    if ok { Ok(()) } else { Err(InputError::OutOfRange(field)) }
}

impl InputMessage {
    /// Serialises the message. Values outside the format's ranges are clamped so that
    /// encoding never produces a message [`Self::decode`] would refuse.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(INPUT_VERSION);
        out.push(self.event.type_byte());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.time_ms.to_be_bytes());
        match &self.event {
            InputEvent::KeyDown { key, modifiers } | InputEvent::KeyUp { key, modifiers } => {
                let key = (*key).min(KEY_CODES.len().saturating_sub(1) as u16);
                out.extend_from_slice(&key.to_be_bytes());
                out.push(modifiers & 0x0f);
            }
            InputEvent::MouseMove { x, y, dx, dy } => {
                for v in [x.to_be_bytes(), y.to_be_bytes(), dx.to_be_bytes(), dy.to_be_bytes()] {
                    out.extend_from_slice(&v);
                }
            }
            InputEvent::MouseButton { button, down } => {
                out.push((*button).min(4));
                out.push(u8::from(*down));
            }
            InputEvent::MouseWheel { dx, dy } => {
                for v in [dx, dy] {
                    let v = if v.is_finite() { v.clamp(-MAX_WHEEL_DELTA, MAX_WHEEL_DELTA) } else { 0.0 };
                    out.extend_from_slice(&v.to_be_bytes());
                }
            }
            InputEvent::Gamepad { pad, connected, buttons, axes } => {
                out.push((*pad).min(MAX_GAMEPADS - 1));
                out.push(u8::from(*connected));
                let buttons = buttons.get(..buttons.len().min(MAX_GAMEPAD_BUTTONS)).unwrap_or_default();
                out.push(buttons.len() as u8);
                out.extend_from_slice(buttons);
                let axes = axes.get(..axes.len().min(MAX_GAMEPAD_AXES)).unwrap_or_default();
                out.push(axes.len() as u8);
                for a in axes {
                    out.extend_from_slice(&(*a).max(-32767).to_be_bytes());
                }
            }
            InputEvent::Touch { phase, points } => {
                out.push(*phase as u8);
                let points = points.get(..points.len().min(MAX_TOUCH_POINTS)).unwrap_or_default();
                out.push(points.len() as u8);
                for p in points {
                    out.push(p.id);
                    out.extend_from_slice(&p.x.to_be_bytes());
                    out.extend_from_slice(&p.y.to_be_bytes());
                }
            }
            InputEvent::Capacity { seed, n } => {
                out.extend_from_slice(seed);
                out.extend_from_slice(&n.to_be_bytes());
            }
        }
    }

    /// Parses and validates one message.
    pub fn decode(buf: &[u8]) -> Result<Self, InputError> {
        let (mut r, kind) = start(buf)?;
        let seq = r.u32()?;
        let time_ms = r.u32()?;
        let event = match kind {
            1 | 2 => {
                let key = r.u16()?;
                check(usize::from(key) < KEY_CODES.len(), "key")?;
                let modifiers = r.u8()?;
                check(modifiers < 16, "modifiers")?;
                if kind == 1 { InputEvent::KeyDown { key, modifiers } } else { InputEvent::KeyUp { key, modifiers } }
            }
            3 => InputEvent::MouseMove { x: r.u16()?, y: r.u16()?, dx: r.i16()?, dy: r.i16()? },
            4 => {
                let button = r.u8()?;
                check(button <= 4, "button")?;
                let down = r.u8()?;
                check(down <= 1, "down")?;
                InputEvent::MouseButton { button, down: down == 1 }
            }
            5 => {
                let (dx, dy) = (r.f32()?, r.f32()?);
                for v in [dx, dy] {
                    check(v.is_finite() && v.abs() <= MAX_WHEEL_DELTA, "wheel")?;
                }
                InputEvent::MouseWheel { dx, dy }
            }
            6 => {
                let pad = r.u8()?;
                check(pad < MAX_GAMEPADS, "pad")?;
                let connected = r.u8()?;
                check(connected <= 1, "connected")?;
                let n = usize::from(r.u8()?);
                check(n <= MAX_GAMEPAD_BUTTONS, "buttons")?;
                let buttons = (0..n).map(|_| r.u8()).collect::<Result<Vec<_>, _>>()?;
                let m = usize::from(r.u8()?);
                check(m <= MAX_GAMEPAD_AXES, "axes")?;
                let axes = (0..m).map(|_| r.i16()).collect::<Result<Vec<_>, _>>()?;
                check(axes.iter().all(|a| *a >= -32767), "axis")?;
                InputEvent::Gamepad { pad, connected: connected == 1, buttons, axes }
            }
            7 => {
                let phase = match r.u8()? {
                    0 => TouchPhase::Start,
                    1 => TouchPhase::Move,
                    2 => TouchPhase::End,
                    3 => TouchPhase::Cancel,
                    _ => return Err(InputError::OutOfRange("phase")),
                };
                let n = usize::from(r.u8()?);
                check((1..=MAX_TOUCH_POINTS).contains(&n), "touch points")?;
                let points = (0..n)
                    .map(|_| Ok(TouchPoint { id: r.u8()?, x: r.u16()?, y: r.u16()? }))
                    .collect::<Result<Vec<_>, InputError>>()?;
                InputEvent::Touch { phase, points }
            }
            8 => InputEvent::Capacity { seed: r.array()?, n: r.u16()? },
            other => return Err(InputError::UnknownType(other)),
        };
        r.finish(buf.len())?;
        Ok(InputMessage { seq, time_ms, event })
    }

    /// Whether this event may be dropped when a newer one of the same kind follows
    /// (mouse motion): such events travel on the unreliable channel.
    pub fn is_supersedable(&self) -> bool {
        matches!(self.event, InputEvent::MouseMove { .. })
    }
}

impl InputEvent {
    fn type_byte(&self) -> u8 {
        match self {
            InputEvent::KeyDown { .. } => 1,
            InputEvent::KeyUp { .. } => 2,
            InputEvent::MouseMove { .. } => 3,
            InputEvent::MouseButton { .. } => 4,
            InputEvent::MouseWheel { .. } => 5,
            InputEvent::Gamepad { .. } => 6,
            InputEvent::Touch { .. } => 7,
            InputEvent::Capacity { .. } => 8,
        }
    }
}

/// Checks the size and version and reads the type; the reader is left at `seq`.
fn start(buf: &[u8]) -> Result<(Reader<'_>, u8), InputError> {
    if buf.len() > MAX_INPUT_MESSAGE {
        return Err(InputError::TooLong(buf.len()));
    }
    let mut r = Reader(buf);
    let version = r.u8()?;
    if version != INPUT_VERSION {
        return Err(InputError::Version(version));
    }
    let kind = r.u8()?;
    Ok((r, kind))
}

/// Reads only the header: version, type, sequence number and client time. The relay
/// uses this to check and count input without interpreting it.
pub fn peek_header(buf: &[u8]) -> Result<(u8, u32, u32), InputError> {
    let (mut r, kind) = start(buf)?;
    if !(1..=8).contains(&kind) {
        return Err(InputError::UnknownType(kind));
    }
    Ok((kind, r.u32()?, r.u32()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<InputEvent> {
        vec![
            InputEvent::KeyDown { key: key_index("KeyW").unwrap(), modifiers: 3 },
            InputEvent::KeyUp { key: key_index("Space").unwrap(), modifiers: 0 },
            InputEvent::MouseMove { x: 1279, y: 719, dx: -300, dy: 12 },
            InputEvent::MouseButton { button: 2, down: true },
            InputEvent::MouseWheel { dx: 0.5, dy: -120.25 },
            InputEvent::Gamepad {
                pad: 3,
                connected: true,
                buttons: vec![0, 255, 128],
                axes: vec![-32767, 0, 32767, 5],
            },
            InputEvent::Gamepad { pad: 0, connected: false, buttons: vec![], axes: vec![] },
            InputEvent::Touch {
                phase: TouchPhase::Move,
                points: vec![TouchPoint { id: 1, x: 10, y: 20 }, TouchPoint { id: 7, x: 640, y: 360 }],
            },
            InputEvent::Capacity { seed: [0xa5; 32], n: 512 },
        ]
    }

    #[test]
    fn round_trip_every_type() {
        for (i, event) in samples().into_iter().enumerate() {
            let msg = InputMessage { seq: i as u32 * 1_000_000, time_ms: u32::MAX - i as u32, event };
            let mut buf = Vec::new();
            msg.encode(&mut buf);
            assert!(buf.len() <= MAX_INPUT_MESSAGE);
            let back = InputMessage::decode(&buf).unwrap();
            assert_eq!(back, msg);
            let mut again = Vec::new();
            back.encode(&mut again);
            assert_eq!(again, buf, "parse → serialise is identical");
            assert_eq!(peek_header(&buf).unwrap(), (msg.event.type_byte(), msg.seq, msg.time_ms));
        }
    }

    #[test]
    fn hostile_values_are_refused() {
        let header = |kind: u8| vec![1, kind, 0, 0, 0, 1, 0, 0, 0, 2];
        let with = |kind: u8, body: &[u8]| [header(kind), body.to_vec()].concat();
        assert_eq!(InputMessage::decode(&with(1, &[0xff, 0xff, 0])), Err(InputError::OutOfRange("key")));
        let nan = f32::NAN.to_be_bytes();
        assert_eq!(InputMessage::decode(&with(5, &[nan, nan].concat())), Err(InputError::OutOfRange("wheel")));
        let huge = 1e30f32.to_be_bytes();
        assert_eq!(InputMessage::decode(&with(5, &[huge, huge].concat())), Err(InputError::OutOfRange("wheel")));
        assert_eq!(InputMessage::decode(&with(6, &[9, 1, 0, 0])), Err(InputError::OutOfRange("pad")));
        assert_eq!(InputMessage::decode(&with(6, &[0, 1, 200])), Err(InputError::OutOfRange("buttons")));
        assert_eq!(InputMessage::decode(&with(6, &[0, 1, 0, 1, 0x80, 0x00])), Err(InputError::OutOfRange("axis")));
        // 10,000 touch points do not even fit the count byte; 11 is already refused.
        assert_eq!(InputMessage::decode(&with(7, &[0, 11])), Err(InputError::OutOfRange("touch points")));
        assert_eq!(InputMessage::decode(&with(7, &[0, 0])), Err(InputError::OutOfRange("touch points")));
        assert_eq!(InputMessage::decode(&with(4, &[1, 1, 0])), Err(InputError::TooLong(13)));
        assert_eq!(InputMessage::decode(&with(9, &[])), Err(InputError::UnknownType(9)));
        assert_eq!(InputMessage::decode(&[2, 1]), Err(InputError::Version(2)));
        assert_eq!(InputMessage::decode(&vec![1; 2000]), Err(InputError::TooLong(2000)));
        // Encoding clamps instead of producing a message the decoder would refuse.
        let msg = InputMessage {
            seq: 0,
            time_ms: 0,
            event: InputEvent::Touch {
                phase: TouchPhase::Start,
                points: vec![TouchPoint { id: 0, x: 0, y: 0 }; 10_000],
            },
        };
        let mut buf = Vec::new();
        msg.encode(&mut buf);
        assert!(
            matches!(InputMessage::decode(&buf).unwrap().event, InputEvent::Touch { ref points, .. } if points.len() == 10)
        );
    }

    #[test]
    fn length_sweep_never_panics() {
        for kind in 0..=8u8 {
            for len in 0..1500usize {
                let mut buf = vec![1, kind];
                buf.extend((0..len.saturating_sub(2)).map(|i| (i * 37 + usize::from(kind)) as u8));
                buf.truncate(len);
                let _ = InputMessage::decode(&buf);
                let _ = peek_header(&buf);
            }
        }
    }

    #[test]
    fn key_table_matches_the_web_client() {
        let js = include_str!("../../web-client/input.js");
        let start = js.find("KEY_CODES = [").expect("KEY_CODES in input.js") + "KEY_CODES = [".len();
        let end = start + js[start..].find("];").expect("end of KEY_CODES");
        let js_codes: Vec<&str> =
            js[start..end].split(',').map(|s| s.trim().trim_matches('\'')).filter(|s| !s.is_empty()).collect();
        assert_eq!(js_codes, KEY_CODES);
    }
}
