//! A session's X screen: frames out (XShm grabs paced by XDamage) and input in (XTest).
//!
//! The frame is read into shared memory the node maps (a memfd passed to the X server
//! with MIT-SHM 1.2 `AttachFd`), so a grab is one request and the server's copy — no
//! pixels over the socket. DAMAGE tells whether anything was drawn since the last grab:
//! an unchanged screen costs nothing.

use crate::keymap;
use pylon_proto::input::{InputEvent, KEY_CODES, TouchPhase};
use std::collections::BTreeSet;
use std::os::fd::OwnedFd;
use x11rb::connection::Connection;
use x11rb::protocol::Event;
use x11rb::protocol::damage::{self, ConnectionExt as _};
use x11rb::protocol::shm::{self, ConnectionExt as _};
use x11rb::protocol::xfixes::ConnectionExt as _;
use x11rb::protocol::xproto::{self, ConnectionExt as _, ImageFormat};
use x11rb::protocol::xtest::ConnectionExt as _;
use x11rb::rust_connection::RustConnection;

/// What went wrong with the session's X server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum X11Error {
    /// The display could not be reached.
    #[error("cannot connect to X display {display}: {reason}")]
    Connect {
        /// The display name.
        display: String,
        /// Why.
        reason: String,
    },
    /// The connection broke (the X server died).
    #[error("X connection failed: {0}")]
    Connection(#[from] x11rb::errors::ConnectionError),
    /// A request failed.
    #[error("X request failed: {0}")]
    Reply(#[from] x11rb::errors::ReplyError),
    /// No resource id was left, or the connection failed.
    #[error("X request failed: {0}")]
    Id(#[from] x11rb::errors::ReplyOrIdError),
    /// The server lacks an extension the session needs.
    #[error("the X server has no {0} extension")]
    MissingExtension(&'static str),
    /// The shared memory could not be set up.
    #[error("shared memory: {0}")]
    Shm(#[from] std::io::Error),
    /// The screen's pixel format is not 32 bits a pixel, 24 deep.
    #[error("unsupported X screen format: depth {depth}, {bits} bits a pixel")]
    Format {
        /// Screen depth.
        depth: u8,
        /// Bits a pixel.
        bits: u8,
    },
}

/// Wheel pixels (the browser's `deltaY` in pixel mode) per X wheel click.
const WHEEL_STEP: f32 = 50.0;

/// What [`X11Session::apply`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Injected.
    Injected,
    /// Not something this path carries (gamepads go through the joystick shim).
    Unsupported,
}

/// A session's X screen.
pub struct X11Session {
    conn: RustConnection,
    root: xproto::Window,
    width: u16,
    height: u16,
    video: (u32, u32),
    shm_seg: shm::Seg,
    map: memmap2::MmapMut,
    damage: damage::Damage,
    damaged: bool,
    mapped: bool,
    keys_held: BTreeSet<u8>,
    buttons_held: BTreeSet<u8>,
    wheel: (f32, f32),
    touch: Option<u8>,
    pads: Vec<crate::pad::PadServer>,
}

impl std::fmt::Debug for X11Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X11Session").field("width", &self.width).field("height", &self.height).finish()
    }
}

/// One grabbed frame: `height` rows of `stride` bytes, BGRX.
#[derive(Debug)]
pub struct Grab<'a> {
    /// Pixels wide.
    pub width: u32,
    /// Rows.
    pub height: u32,
    /// Bytes a row.
    pub stride: usize,
    /// The pixels.
    pub pixels: &'a [u8],
}

impl X11Session {
    /// Connects to display number `display` with its MIT-MAGIC-COOKIE-1 `cookie`; input
    /// coordinates arrive in a picture of `video` pixels and are scaled to the screen.
    pub fn connect(display: u32, cookie: &[u8; 16], video: (u32, u32)) -> Result<Self, X11Error> {
        let failed = |reason: String| X11Error::Connect { display: format!(":{display}"), reason };
        let socket = std::os::unix::net::UnixStream::connect(format!("/tmp/.X11-unix/X{display}"))
            .map_err(|e| failed(e.to_string()))?;
        let (stream, _) =
            x11rb::rust_connection::DefaultStream::from_unix_stream(socket).map_err(|e| failed(e.to_string()))?;
        let conn = RustConnection::connect_to_stream_with_auth_info(
            stream,
            0,
            b"MIT-MAGIC-COOKIE-1".to_vec(),
            cookie.to_vec(),
        )
        .map_err(|e| failed(e.to_string()))?;
        let screen_num = 0;
        let display = format!(":{display}");
        let screen = conn
            .setup()
            .roots
            .get(screen_num)
            .ok_or_else(|| X11Error::Connect { display: display.to_string(), reason: "no such screen".into() })?;
        let (root, width, height, depth) =
            (screen.root, screen.width_in_pixels, screen.height_in_pixels, screen.root_depth);
        let bits = conn.setup().pixmap_formats.iter().find(|f| f.depth == depth).map_or(0, |f| f.bits_per_pixel);
        if depth != 24 || bits != 32 {
            return Err(X11Error::Format { depth, bits });
        }
        let has = |name: &'static str| -> Result<(), X11Error> {
            let present = conn.query_extension(name.as_bytes())?.reply()?.present;
            if present { Ok(()) } else { Err(X11Error::MissingExtension(name)) }
        };
        has("MIT-SHM")?;
        has("DAMAGE")?;
        has("XTEST")?;
        has("XFIXES")?;
        // Versions must be negotiated before the extensions' requests are used.
        let shm_version = conn.shm_query_version()?.reply()?;
        if (shm_version.major_version, shm_version.minor_version) < (1, 2) {
            return Err(X11Error::MissingExtension("MIT-SHM 1.2 (AttachFd)"));
        }
        conn.xfixes_query_version(5, 0)?.reply()?;
        conn.damage_query_version(1, 1)?.reply()?;
        conn.xtest_get_version(2, 2)?.reply()?;

        let size = usize::from(width) * usize::from(height) * 4;
        let fd: OwnedFd =
            rustix::fs::memfd_create("pylon-capture", rustix::fs::MemfdFlags::CLOEXEC).map_err(std::io::Error::from)?;
        rustix::fs::ftruncate(&fd, size as u64).map_err(std::io::Error::from)?;
        let file = std::fs::File::from(fd);
        // SAFETY: the memfd is this process's own, sized above and never truncated again;
        // the only other writer is the X server, into the segment it was given, during
        // a GetImage request this session waits for before reading the mapping.
        let map = unsafe { memmap2::MmapOptions::new().len(size).map_mut(&file)? };
        let shm_seg = conn.generate_id()?;
        conn.shm_attach_fd(shm_seg, OwnedFd::from(file), false)?.check()?;
        let damage = conn.generate_id()?;
        conn.damage_create(damage, root, damage::ReportLevel::NON_EMPTY)?.check()?;
        // Top-level windows mapping: until one is, the title has shown nothing.
        let events = xproto::ChangeWindowAttributesAux::new().event_mask(xproto::EventMask::SUBSTRUCTURE_NOTIFY);
        conn.change_window_attributes(root, &events)?.check()?;
        let mapped = conn
            .query_tree(root)?
            .reply()?
            .children
            .iter()
            .filter_map(|w| conn.get_window_attributes(*w).ok()?.reply().ok())
            .any(|a| a.map_state == xproto::MapState::VIEWABLE);
        Ok(Self {
            conn,
            root,
            width,
            height,
            video,
            shm_seg,
            map,
            damage,
            // Nothing is drawn until the title draws: a title that never does is seen.
            damaged: false,
            mapped,
            keys_held: BTreeSet::new(),
            buttons_held: BTreeSet::new(),
            wheel: (0.0, 0.0),
            touch: None,
            pads: Vec::new(),
        })
    }

    /// Gamepad events go to these virtual pads (pad `n` of the browser to `pads[n]`).
    pub fn attach_pads(&mut self, pads: Vec<crate::pad::PadServer>) {
        self.pads = pads;
    }

    /// The screen's size.
    pub fn size(&self) -> (u32, u32) {
        (u32::from(self.width), u32::from(self.height))
    }

    /// Whether the title drew since the last grab: a window of it is on the screen and
    /// something was drawn (reads pending events; never blocks).
    pub fn damaged(&mut self) -> Result<bool, X11Error> {
        for p in &mut self.pads {
            p.accept();
        }
        while let Some(event) = self.conn.poll_for_event()? {
            match event {
                Event::DamageNotify(_) => self.damaged = true,
                Event::MapNotify(map) => {
                    self.mapped = true;
                    self.damaged = true;
                    // No window manager runs here: give the title's newest top-level
                    // window the keyboard, as a kiosk WM would (SDL ignores focus that
                    // only follows the pointer).
                    if !map.override_redirect {
                        self.conn.set_input_focus(xproto::InputFocus::PARENT, map.window, x11rb::CURRENT_TIME)?;
                        self.conn.flush()?;
                    }
                }
                _ => {}
            }
        }
        Ok(self.damaged && self.mapped)
    }

    /// Grabs the whole screen into the shared memory and returns it.
    pub fn grab(&mut self) -> Result<Grab<'_>, X11Error> {
        // Subtract first: what is drawn during the grab damages the screen again.
        self.conn.damage_subtract(self.damage, x11rb::NONE, x11rb::NONE)?;
        self.damaged = false;
        self.conn
            .shm_get_image(
                self.root,
                0,
                0,
                self.width,
                self.height,
                u32::MAX,
                ImageFormat::Z_PIXMAP.into(),
                self.shm_seg,
                0,
            )?
            .reply()?;
        Ok(Grab {
            width: u32::from(self.width),
            height: u32::from(self.height),
            stride: usize::from(self.width) * 4,
            pixels: &self.map,
        })
    }

    fn scale(&self, x: u16, y: u16) -> (i16, i16) {
        let sx = |v: u16, video: u32, screen: u16| {
            let v = u64::from(v) * u64::from(screen) / u64::from(video.max(1));
            i16::try_from(v.min(u64::from(screen.saturating_sub(1)))).unwrap_or(i16::MAX)
        };
        (sx(x, self.video.0, self.width), sx(y, self.video.1, self.height))
    }

    fn fake(&self, kind: u8, detail: u8, x: i16, y: i16) -> Result<(), X11Error> {
        self.conn.xtest_fake_input(kind, detail, x11rb::CURRENT_TIME, self.root, x, y, 0)?;
        Ok(())
    }

    fn key(&mut self, key: u16, down: bool) -> Result<Applied, X11Error> {
        let Some(code) = KEY_CODES.get(usize::from(key)).and_then(|c| keymap::evdev(c)) else {
            return Ok(Applied::Unsupported);
        };
        let keycode = u8::try_from(code + 8).unwrap_or(0);
        if down {
            self.keys_held.insert(keycode);
            self.fake(xproto::KEY_PRESS_EVENT, keycode, 0, 0)?;
        } else if self.keys_held.remove(&keycode) {
            self.fake(xproto::KEY_RELEASE_EVENT, keycode, 0, 0)?;
        }
        Ok(Applied::Injected)
    }

    fn button(&mut self, button: u8, down: bool) -> Result<(), X11Error> {
        if down {
            self.buttons_held.insert(button);
            self.fake(xproto::BUTTON_PRESS_EVENT, button, 0, 0)
        } else if self.buttons_held.remove(&button) {
            self.fake(xproto::BUTTON_RELEASE_EVENT, button, 0, 0)
        } else {
            Ok(())
        }
    }

    fn click(&mut self, button: u8) -> Result<(), X11Error> {
        self.fake(xproto::BUTTON_PRESS_EVENT, button, 0, 0)?;
        self.fake(xproto::BUTTON_RELEASE_EVENT, button, 0, 0)
    }

    /// Injects one player input event; the requests are flushed before it returns.
    pub fn apply(&mut self, event: &InputEvent) -> Result<Applied, X11Error> {
        let applied = match event {
            InputEvent::KeyDown { key, .. } => self.key(*key, true)?,
            InputEvent::KeyUp { key, .. } => self.key(*key, false)?,
            InputEvent::MouseMove { x, y, dx, dy } => {
                if *dx != 0 || *dy != 0 {
                    // Pointer lock: relative motion (what SDL2's relative mode reads, as
                    // XI2 raw motion from the XTEST device).
                    self.fake(xproto::MOTION_NOTIFY_EVENT, 1, *dx, *dy)?;
                } else {
                    let (sx, sy) = self.scale(*x, *y);
                    self.fake(xproto::MOTION_NOTIFY_EVENT, 0, sx, sy)?;
                }
                Applied::Injected
            }
            InputEvent::MouseButton { button, down } => {
                // Browser buttons: 0 left, 1 middle, 2 right, 3 back, 4 forward.
                let Some(b) = [1u8, 2, 3, 8, 9].get(usize::from(*button)).copied() else {
                    return Ok(Applied::Unsupported);
                };
                self.button(b, *down)?;
                Applied::Injected
            }
            InputEvent::MouseWheel { dx, dy } => {
                self.wheel.0 += dx;
                self.wheel.1 += dy;
                while self.wheel.1.abs() >= WHEEL_STEP {
                    let down = self.wheel.1 > 0.0;
                    self.click(if down { 5 } else { 4 })?;
                    self.wheel.1 -= WHEEL_STEP.copysign(self.wheel.1);
                }
                while self.wheel.0.abs() >= WHEEL_STEP {
                    let right = self.wheel.0 > 0.0;
                    self.click(if right { 7 } else { 6 })?;
                    self.wheel.0 -= WHEEL_STEP.copysign(self.wheel.0);
                }
                Applied::Injected
            }
            // Not a game input: the node answers it itself (never reaches a title).
            InputEvent::Capacity { .. } => Applied::Unsupported,
            InputEvent::Touch { phase, points } => {
                // The first finger is the pointer; its press is the left button.
                for p in points {
                    if self.touch.is_some_and(|id| id != p.id) {
                        continue;
                    }
                    let (sx, sy) = self.scale(p.x, p.y);
                    match phase {
                        TouchPhase::Start => {
                            self.touch = Some(p.id);
                            self.fake(xproto::MOTION_NOTIFY_EVENT, 0, sx, sy)?;
                            self.button(1, true)?;
                        }
                        TouchPhase::Move => self.fake(xproto::MOTION_NOTIFY_EVENT, 0, sx, sy)?,
                        TouchPhase::End | TouchPhase::Cancel => {
                            self.touch = None;
                            self.button(1, false)?;
                        }
                    }
                }
                Applied::Injected
            }
            InputEvent::Gamepad { pad, connected, buttons, axes } => match self.pads.get_mut(usize::from(*pad)) {
                Some(p) => {
                    p.apply(*connected, buttons, axes);
                    Applied::Injected
                }
                None => Applied::Unsupported,
            },
        };
        self.conn.flush()?;
        Ok(applied)
    }

    /// Keys and buttons still held (the player left or the page lost focus).
    pub fn held(&self) -> usize {
        self.keys_held.len() + self.buttons_held.len()
    }

    /// Releases every key and button still held.
    pub fn release_all(&mut self) -> Result<(), X11Error> {
        for key in std::mem::take(&mut self.keys_held) {
            self.fake(xproto::KEY_RELEASE_EVENT, key, 0, 0)?;
        }
        for button in std::mem::take(&mut self.buttons_held) {
            self.fake(xproto::BUTTON_RELEASE_EVENT, button, 0, 0)?;
        }
        self.touch = None;
        for p in &mut self.pads {
            p.apply(false, &[], &[]);
        }
        self.conn.flush()?;
        Ok(())
    }
}
