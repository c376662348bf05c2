//! Virtual gamepads without `/dev/uinput`: the node serves each pad on a Unix socket in
//! the session's runtime directory, and `libpylon-pad.so` (built from `shim/pad.c`,
//! loaded into the title with `LD_PRELOAD`) makes `/dev/input/pylon-padN` an evdev
//! device whose events come from that socket. SDL2 finds it through
//! `SDL_JOYSTICK_DEVICE`. The browser's standard gamepad mapping becomes an Xbox 360 pad:
//! face buttons, shoulders, sticks as `ABS_X/Y/RX/RY`, triggers as `ABS_Z/RZ`, the d-pad
//! as the hat.

use std::io::Write as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// The shim, built with the crate.
pub const SHIM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libpylon-pad.so"));
/// Pads a session can have (`PADS` in `shim/pad.c`: `/dev/input/pylon-pad0..3`).
pub const MAX_PADS: u8 = 4;
/// Where a title finds pad `n`.
pub fn device_path(n: u8) -> String {
    format!("/dev/input/pylon-pad{n}")
}

const EV_SYN: u16 = 0;
const EV_KEY: u16 = 1;
const EV_ABS: u16 = 3;
const ABS_X: u16 = 0;
const ABS_Y: u16 = 1;
const ABS_Z: u16 = 2;
const ABS_RX: u16 = 3;
const ABS_RY: u16 = 4;
const ABS_RZ: u16 = 5;
const ABS_HAT0X: u16 = 0x10;
const ABS_HAT0Y: u16 = 0x11;

/// Browser standard-mapping button → evdev key code (`None`: an axis, see `state`).
const BUTTON_KEYS: [Option<u16>; 17] = [
    Some(0x130), // A
    Some(0x131), // B
    Some(0x133), // X
    Some(0x134), // Y
    Some(0x136), // LB
    Some(0x137), // RB
    None,        // LT: ABS_Z
    None,        // RT: ABS_RZ
    Some(0x13a), // Back
    Some(0x13b), // Start
    Some(0x13d), // left stick
    Some(0x13e), // right stick
    None,        // d-pad up: hat
    None,        // d-pad down
    None,        // d-pad left
    None,        // d-pad right
    Some(0x13c), // Home
];

/// What the pad reports: evdev (type, code) → value.
type State = std::collections::BTreeMap<(u16, u16), i32>;

fn state(connected: bool, buttons: &[u8], axes: &[i16]) -> State {
    let mut s = State::new();
    let b = |i: usize| if connected { buttons.get(i).copied().unwrap_or(0) } else { 0 };
    let pressed = |i: usize| i32::from(b(i) > 127);
    for (i, key) in BUTTON_KEYS.iter().enumerate() {
        if let Some(code) = key {
            s.insert((EV_KEY, *code), pressed(i));
        }
    }
    s.insert((EV_ABS, ABS_Z), i32::from(b(6)));
    s.insert((EV_ABS, ABS_RZ), i32::from(b(7)));
    s.insert((EV_ABS, ABS_HAT0Y), pressed(13) - pressed(12));
    s.insert((EV_ABS, ABS_HAT0X), pressed(15) - pressed(14));
    let a = |i: usize| if connected { i32::from(axes.get(i).copied().unwrap_or(0)) } else { 0 };
    for (i, code) in [ABS_X, ABS_Y, ABS_RX, ABS_RY].into_iter().enumerate() {
        s.insert((EV_ABS, code), a(i));
    }
    s
}

/// One `struct input_event` (x86_64 and other LP64 Linux: 16 bytes of time, then type,
/// code, value).
fn event(out: &mut Vec<u8>, kind: u16, code: u16, value: i32) {
    out.extend_from_slice(&[0u8; 16]);
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&code.to_ne_bytes());
    out.extend_from_slice(&value.to_ne_bytes());
}

/// One virtual pad: its socket, the titles' open devices, its last state.
#[derive(Debug)]
pub struct PadServer {
    path: PathBuf,
    listener: UnixListener,
    clients: Vec<UnixStream>,
    state: State,
}

impl PadServer {
    /// Listens for pad `n` in `dir` (the session's runtime directory), owned by `owner`.
    pub fn bind(dir: &Path, n: u8, owner: Option<(u32, u32)>) -> std::io::Result<Self> {
        let path = dir.join(format!("pad{n}.sock"));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        listener.set_nonblocking(true)?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
        }
        Ok(Self { path, listener, clients: Vec::new(), state: state(false, &[], &[]) })
    }

    /// Takes the title's pending opens of the device (never blocks).
    pub fn accept(&mut self) {
        while let Ok((stream, _)) = self.listener.accept() {
            if stream.set_nonblocking(true).is_ok() {
                self.clients.push(stream);
            }
        }
    }

    /// Devices the title holds open.
    pub fn opened(&self) -> usize {
        self.clients.len()
    }

    /// The browser's pad changed: writes what changed, then a sync, to every open device.
    /// Returns the events written (0: nothing changed).
    pub fn apply(&mut self, connected: bool, buttons: &[u8], axes: &[i16]) -> usize {
        self.accept();
        let next = state(connected, buttons, axes);
        let mut out = Vec::new();
        let mut n = 0;
        for (&(kind, code), &value) in &next {
            if self.state.get(&(kind, code)) != Some(&value) {
                event(&mut out, kind, code, value);
                n += 1;
            }
        }
        self.state = next;
        if n == 0 {
            return 0;
        }
        event(&mut out, EV_SYN, 0, 0);
        // A title that stops reading loses events (the socket's buffer is its queue),
        // never the node's time.
        self.clients.retain_mut(|c| match c.write(&out) {
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
        });
        n
    }
}

impl Drop for PadServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_browser_mapping_becomes_an_xbox_pad() {
        let mut buttons = [0u8; 17];
        buttons[0] = 255; // A
        buttons[7] = 200; // right trigger
        buttons[12] = 255; // d-pad up
        let s = state(true, &buttons, &[-32767, 100, 0, 32767]);
        assert_eq!(s[&(EV_KEY, 0x130)], 1);
        assert_eq!(s[&(EV_KEY, 0x131)], 0);
        assert_eq!(s[&(EV_ABS, ABS_RZ)], 200);
        assert_eq!(s[&(EV_ABS, ABS_HAT0Y)], -1);
        assert_eq!(s[&(EV_ABS, ABS_X)], -32767);
        assert_eq!(s[&(EV_ABS, ABS_RY)], 32767);
        // A disconnected pad rests.
        assert!(state(false, &buttons, &[5, 5, 5, 5]).values().all(|v| *v == 0));
        let mut out = Vec::new();
        event(&mut out, EV_KEY, 0x130, 1);
        assert_eq!(out.len(), 24);
        assert!(!SHIM.is_empty() && SHIM.starts_with(b"\x7fELF"), "the shim is a shared object");
    }
}
