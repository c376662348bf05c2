//! Studio titles on a render node.
//!
//! * [`sandbox`]: one sandbox per session — its own X server (Debian's `Xvfb`, one display
//!   number per session, with MIT-SHM, XTEST and DAMAGE), its own `HOME` and
//!   `XDG_RUNTIME_DIR`, the title in its own process group (as an unprivileged user when
//!   the node runs as root), supervised, and everything removed when the session ends;
//! * [`capture`]: the session's capture socket for the title's Vulkan present layer
//!   (`pylon-vklayer`), with the checks that keep a hostile title from hurting the node;
//! * [`x11`]: the session's X screen as a frame source (XShm grabs paced by XDamage) and
//!   an input sink (XTest: keys, absolute and relative pointer motion, buttons, wheel,
//!   touch as the pointer);
//! * [`keymap`]: `KeyboardEvent.code` → Linux evdev key codes (X keycode = evdev + 8);
//! * [`pad`]: virtual Xbox pads without `/dev/uinput` (an `LD_PRELOAD` shim that presents
//!   evdev devices fed over a per-session socket).

pub mod capture;
pub mod keymap;
pub mod pad;
pub mod sandbox;
pub mod x11;
