//! One sandbox per session: an X server, a home, a runtime directory and a process group,
//! all gone when the session ends.
//!
//! * `Xvfb` from Debian on the first free display number from [`SandboxConfig::first_display`]
//!   (its lock file arbitrates between sessions and nodes), 24-bit, MIT-SHM, XTEST and
//!   DAMAGE, no TCP, and a fresh MIT-MAGIC-COOKIE so that one session's title cannot read
//!   or drive another session's screen;
//! * the title in its own process group, with a clean environment (`PATH`, `LANG`, the
//!   spec's variables, then `DISPLAY`, `XAUTHORITY`, `HOME`, `XDG_RUNTIME_DIR`, `USER`),
//!   as an unprivileged user (`pylon-title`, else `nobody`) when the node runs as root,
//!   its output in `title.log` in the session's directory;
//! * [`Sandbox::stop`]: SIGTERM to the group, SIGKILL to whatever is left after the grace
//!   period, then the X server; the session's directory is removed.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Errors starting a sandbox.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SandboxError {
    /// The title's program is not on this node.
    #[error("the title's program {0:?} is not installed on this node")]
    NotFound(String),
    /// `Xvfb` is missing.
    #[error("Xvfb not found ({0}): install the xvfb package")]
    NoXvfb(String),
    /// No display number was free.
    #[error("no free X display number from :{0} on")]
    NoDisplay(u32),
    /// The X server did not come up.
    #[error("Xvfb on :{display} did not start: {reason}")]
    XServer {
        /// Display number.
        display: u32,
        /// Why.
        reason: String,
    },
    /// The session directory or the title could not be set up.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SandboxError {
    let what = what.into();
    move |source| SandboxError::Io { what, source }
}

/// How to run one title.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// Program: absolute path, or a name found on `PATH`.
    pub command: String,
    /// Arguments.
    pub args: Vec<String>,
    /// Working directory (default: the session's home).
    pub workdir: Option<PathBuf>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Screen width.
    pub width: u32,
    /// Screen height.
    pub height: u32,
    /// Virtual gamepads to present (at most [`crate::pad::MAX_PADS`]; through `LD_PRELOAD`,
    /// see [`crate::pad`]).
    pub gamepads: u8,
}

/// The spec's variable that turns the Vulkan present layer off for a title
/// (`PYLON_CAPTURE=xshm`: its screen is grabbed with XShm, as for OpenGL titles).
pub const CAPTURE_ENV: &str = "PYLON_CAPTURE";

/// The node's settings for sandboxes.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Where session directories are made.
    pub sessions_dir: PathBuf,
    /// The X server binary.
    pub xvfb: PathBuf,
    /// First display number tried.
    pub first_display: u32,
    /// Display numbers tried at most.
    pub displays: u32,
    /// Time for the X server to accept connections.
    pub xvfb_timeout: Duration,
    /// Time between SIGTERM and SIGKILL when stopping.
    pub stop_grace: Duration,
    /// The Vulkan present layer's library ([`crate::capture::find_layer`]); `None`: titles
    /// are captured with XShm only.
    pub vk_layer: Option<PathBuf>,
    /// Debian's `pulseaudio`, for each session's own sound server; `None` (not installed,
    /// or the node's `--no-audio`): titles play silently.
    pub pulseaudio: Option<PathBuf>,
}

impl SandboxConfig {
    /// Defaults under `sessions_dir`.
    pub fn new(sessions_dir: PathBuf) -> Self {
        Self {
            sessions_dir,
            xvfb: PathBuf::from("Xvfb"),
            first_display: 100,
            displays: 400,
            xvfb_timeout: Duration::from_secs(10),
            stop_grace: Duration::from_secs(3),
            vk_layer: crate::capture::find_layer(),
            pulseaudio: resolve_command("pulseaudio"),
        }
    }
}

/// `command` as a runnable file: an absolute or relative path that exists, or the first
/// match on `PATH`. `None` when the node does not have it.
pub fn resolve_command(command: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let runnable = |p: &Path| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if command.contains('/') {
        let p = PathBuf::from(command);
        return runnable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin:/usr/games".into());
    std::env::split_paths(&path).map(|dir| dir.join(command)).find(|p| runnable(p))
}

/// The user titles run as when the node runs as root: `pylon-title` if it exists, else
/// `nobody`. `None` when the node is not root (titles then run as the node's user).
pub fn title_user() -> Option<(u32, u32)> {
    if !rustix::process::geteuid().is_root() {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let find = |name: &str| {
        passwd.lines().find_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            (f.first() == Some(&name)).then(|| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?))).flatten()
        })
    };
    Some(find("pylon-title").or_else(|| find("nobody")).unwrap_or((65534, 65534)))
}

/// A random MIT-MAGIC-COOKIE-1.
fn cookie() -> Result<[u8; 16], SandboxError> {
    let mut c = [0u8; 16];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut c)).map_err(io("reading /dev/urandom"))?;
    Ok(c)
}

/// An Xauthority file with one entry for `display`, family "wild" (any address).
fn xauthority(display: u32, cookie: &[u8; 16]) -> Vec<u8> {
    let mut out = vec![0xff, 0xff];
    let number = display.to_string();
    for field in [&b""[..], number.as_bytes(), b"MIT-MAGIC-COOKIE-1", cookie] {
        out.extend_from_slice(&u16::try_from(field.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(field);
    }
    out
}

/// How the title ended, when it did on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TitleExit {
    /// The title's process exited.
    Exited(String),
    /// The session's X server died.
    XServerDied(String),
}

impl std::fmt::Display for TitleExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exited(how) => write!(f, "the game {how}"),
            Self::XServerDied(how) => write!(f, "the session's display server {how}"),
        }
    }
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(0), _) => "exited".into(),
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => "ended".into(),
    }
}

/// What stopping a sandbox took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StopReport {
    /// Processes of the title's group were still running at the stop and got SIGTERM.
    pub terminated: bool,
    /// Some ignored SIGTERM for the whole grace period and were killed.
    pub killed: bool,
}

/// A running session sandbox.
#[derive(Debug)]
pub struct Sandbox {
    dir: PathBuf,
    display: u32,
    cookie: [u8; 16],
    xvfb: Child,
    title: Child,
    pgid: rustix::process::Pid,
    grace: Duration,
    exit: Option<TitleExit>,
    pads: Vec<crate::pad::PadServer>,
    capture: Option<crate::capture::CaptureServer>,
    /// The session's PulseAudio server and its socket directory.
    pulse: Option<(Child, PathBuf)>,
    /// How to start it again if it dies: the binary and the title's user.
    pulse_again: Option<(PathBuf, Option<(u32, u32)>)>,
    stopped: bool,
}

impl Sandbox {
    /// Starts the X server and the title for session `session`.
    pub fn start(config: &SandboxConfig, session: &str, spec: &LaunchSpec) -> Result<Self, SandboxError> {
        let program = resolve_command(&spec.command).ok_or_else(|| SandboxError::NotFound(spec.command.clone()))?;
        let xvfb = resolve_command(&config.xvfb.to_string_lossy())
            .ok_or_else(|| SandboxError::NoXvfb(config.xvfb.display().to_string()))?;
        let safe: String =
            session.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(64).collect::<String>();
        let dir = config.sessions_dir.join(if safe.is_empty() { "session".to_string() } else { safe });
        let _ = std::fs::remove_dir_all(&dir);
        let (home, runtime) = (dir.join("home"), dir.join("runtime"));
        for d in [&dir, &home, &runtime] {
            std::fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
        }
        let user = title_user();
        let chmod = |p: &Path, mode: u32| {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
                .map_err(io(format!("chmod {}", p.display())))
        };
        chmod(&dir, 0o711)?;
        chmod(&runtime, 0o700)?;
        chmod(&home, 0o700)?;
        if let Some((uid, gid)) = user {
            for d in [&home, &runtime] {
                std::os::unix::fs::chown(d, Some(uid), Some(gid)).map_err(io(format!("chown {}", d.display())))?;
            }
        }
        let cookie = cookie()?;
        // Gamepads: the shim and the pads' sockets exist before the title looks for them.
        let mut pads = Vec::new();
        let mut shim = None;
        if spec.gamepads > 0 {
            let path = dir.join("libpylon-pad.so");
            std::fs::write(&path, crate::pad::SHIM).map_err(io("writing the gamepad shim"))?;
            chmod(&path, 0o644)?;
            for n in 0..spec.gamepads.min(crate::pad::MAX_PADS) {
                pads.push(crate::pad::PadServer::bind(&runtime, n, user).map_err(io("creating a gamepad socket"))?);
            }
            shim = Some(path);
        }
        // The Vulkan present layer: its manifest in the session, its socket in the runtime dir.
        let capture = match (&config.vk_layer, spec.env.get(CAPTURE_ENV).map(String::as_str)) {
            (Some(library), None | Some("auto" | "layer")) => Some(Self::prepare_layer(library, &dir, &runtime, user)?),
            _ => None,
        };
        let (mut xvfb, display) = Self::start_xvfb(config, &xvfb, &dir, spec, &cookie, user)?;
        let layer = capture.as_ref().map(|c| (dir.join("vulkan"), c.path().to_path_buf()));
        // Sound: the session's own PulseAudio server, before the title looks for it.
        let pulse = config.pulseaudio.as_deref().and_then(|pa| {
            match Self::start_pulse(pa, &dir, &home, &runtime, display, user) {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::warn!("the session has no sound server, the title plays silently: {e}");
                    None
                }
            }
        });
        let pulse_server = pulse.as_ref().map(|(_, d)| d.join("native"));
        let title = Self::spawn_title(
            &program,
            &dir,
            &home,
            &runtime,
            display,
            spec,
            user,
            shim.as_deref(),
            layer,
            pulse_server.as_deref(),
        )
        .and_then(|title| match rustix::process::Pid::from_raw(title.id() as i32) {
            Some(pgid) => Ok((title, pgid)),
            None => Err(SandboxError::Io { what: "the title's process id".into(), source: std::io::Error::other("0") }),
        });
        let (title, pgid) = match title {
            Ok(t) => t,
            Err(e) => {
                if let Some((mut p, socket_dir)) = pulse {
                    let _ = p.kill();
                    let _ = p.wait();
                    let _ = std::fs::remove_dir_all(socket_dir);
                }
                let _ = xvfb.kill();
                let _ = xvfb.wait();
                let _ = std::fs::remove_file(format!("/tmp/.X{display}-lock"));
                let _ = std::fs::remove_file(format!("/tmp/.X11-unix/X{display}"));
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let sandbox = Sandbox {
            dir: dir.clone(),
            display,
            cookie,
            xvfb,
            title,
            pgid,
            grace: config.stop_grace,
            exit: None,
            pads,
            capture,
            pulse,
            pulse_again: config.pulseaudio.clone().map(|p| (p, user)),
            stopped: false,
        };
        let number = display;
        tracing::info!(x_display = number, dir = %dir.display(), title = %program.display(), "session sandbox started");
        Ok(sandbox)
    }

    /// Writes the layer's manifest into `dir/vulkan` and binds the capture socket.
    fn prepare_layer(
        library: &Path,
        dir: &Path,
        runtime: &Path,
        user: Option<(u32, u32)>,
    ) -> Result<crate::capture::CaptureServer, SandboxError> {
        use std::os::unix::fs::PermissionsExt as _;
        let layers = dir.join("vulkan");
        std::fs::create_dir_all(&layers).map_err(io("creating the layer's directory"))?;
        std::fs::set_permissions(&layers, std::fs::Permissions::from_mode(0o755)).map_err(io("chmod vulkan"))?;
        // The title's user must be able to read the library.
        let readable = library.metadata().is_ok_and(|m| m.permissions().mode() & 0o004 != 0);
        let library = if user.is_some() && !readable {
            let copy = layers.join(crate::capture::LAYER_LIBRARY);
            std::fs::copy(library, &copy).map_err(io("copying the capture layer"))?;
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o644)).map_err(io("chmod the layer"))?;
            copy
        } else {
            library.to_path_buf()
        };
        let manifest = layers.join("pylon_capture.json");
        std::fs::write(&manifest, crate::capture::manifest(&library)).map_err(io("writing the layer's manifest"))?;
        std::fs::set_permissions(&manifest, std::fs::Permissions::from_mode(0o644))
            .map_err(io("chmod the manifest"))?;
        crate::capture::CaptureServer::bind(runtime, user).map_err(io("creating the capture socket"))
    }

    /// Starts the session's PulseAudio server (as the title's user, its own process group)
    /// with one null sink, `pylon`, the node reads the monitor of. Its socket lives in
    /// `/tmp/.pylon-pulse-DISPLAY` (0700, the title's user's): socket paths must stay short.
    fn start_pulse(
        pulseaudio: &Path,
        dir: &Path,
        home: &Path,
        runtime: &Path,
        display: u32,
        user: Option<(u32, u32)>,
    ) -> Result<(Child, PathBuf), SandboxError> {
        use std::os::unix::fs::PermissionsExt as _;
        let socket_dir = PathBuf::from(format!("/tmp/.pylon-pulse-{display}"));
        let _ = std::fs::remove_dir_all(&socket_dir);
        std::fs::create_dir(&socket_dir).map_err(io("creating the sound server's directory"))?;
        std::fs::set_permissions(&socket_dir, std::fs::Permissions::from_mode(0o700)).map_err(io("chmod pulse"))?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&socket_dir, Some(uid), Some(gid)).map_err(io("chown pulse"))?;
        }
        let socket = socket_dir.join("native");
        let script = dir.join("pulse.pa");
        std::fs::write(
            &script,
            format!(
                "load-module module-native-protocol-unix socket={} auth-anonymous=1\n\
                 load-module module-null-sink sink_name=pylon rate=48000 channels=2 \
                 sink_properties=device.description=Pylon\n\
                 set-default-sink pylon\n",
                socket.display()
            ),
        )
        .map_err(io("writing the sound server's configuration"))?;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).map_err(io("chmod pulse.pa"))?;
        let log = std::fs::File::create(dir.join("pulse.log")).map_err(io("creating pulse.log"))?;
        let mut cmd = Command::new(pulseaudio);
        cmd.args(["-n", "-F"])
            .arg(&script)
            .args([
                "--daemonize=no",
                "--exit-idle-time=-1",
                "--use-pid-file=no",
                "--disable-shm=yes",
                "--log-target=stderr",
                "--log-level=warning",
            ])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()))
            .env("HOME", home)
            .env("XDG_RUNTIME_DIR", runtime)
            .env("DISPLAY", format!(":{display}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0);
        if let Some((uid, gid)) = user {
            cmd.uid(uid).gid(gid);
        }
        let mut child = cmd.spawn().map_err(io("starting pulseaudio"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                return Ok((child, socket_dir));
            }
            if let Ok(Some(status)) = child.try_wait() {
                let _ = std::fs::remove_dir_all(&socket_dir);
                let why = std::fs::read_to_string(dir.join("pulse.log")).unwrap_or_default();
                return Err(SandboxError::Io {
                    what: format!("pulseaudio {}: {}", describe(status), why.trim()),
                    source: std::io::Error::other("the sound server stopped"),
                });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_dir_all(&socket_dir);
                return Err(SandboxError::Io {
                    what: "pulseaudio did not open its socket".into(),
                    source: std::io::Error::from(std::io::ErrorKind::TimedOut),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn start_xvfb(
        config: &SandboxConfig,
        xvfb: &Path,
        dir: &Path,
        spec: &LaunchSpec,
        cookie: &[u8; 16],
        user: Option<(u32, u32)>,
    ) -> Result<(Child, u32), SandboxError> {
        let mut last = String::new();
        for display in config.first_display..config.first_display + config.displays {
            if Path::new(&format!("/tmp/.X{display}-lock")).exists()
                || Path::new(&format!("/tmp/.X11-unix/X{display}")).exists()
            {
                continue;
            }
            let auth = dir.join("Xauthority");
            std::fs::write(&auth, xauthority(display, cookie)).map_err(io("writing the X authority file"))?;
            if let Some((uid, gid)) = user {
                std::os::unix::fs::chown(&auth, Some(uid), Some(gid)).map_err(io("chown Xauthority"))?;
            }
            let log = std::fs::File::create(dir.join("xvfb.log")).map_err(io("creating xvfb.log"))?;
            let mut child = Command::new(xvfb)
                .arg(format!(":{display}"))
                .args(["-screen", "0", &format!("{}x{}x24", spec.width, spec.height)])
                .args(["-nolisten", "tcp", "-noreset", "-auth"])
                .arg(&auth)
                .args(["+extension", "MIT-SHM", "+extension", "XTEST", "+extension", "DAMAGE"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .process_group(0)
                .spawn()
                .map_err(io("starting Xvfb"))?;
            let deadline = Instant::now() + config.xvfb_timeout;
            let socket = PathBuf::from(format!("/tmp/.X11-unix/X{display}"));
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    last = format!(
                        "{} ({})",
                        describe(status),
                        std::fs::read_to_string(dir.join("xvfb.log")).unwrap_or_default().trim()
                    );
                    // Another server took this number first: try the next.
                    break;
                }
                // Ours only if the lock names our server: another session starting at the
                // same moment may have taken this number, and its socket answers too.
                let locked_by = std::fs::read_to_string(format!("/tmp/.X{display}-lock"))
                    .ok()
                    .and_then(|pid| pid.trim().parse::<u32>().ok());
                if locked_by.is_some_and(|pid| pid != child.id()) {
                    let _ = child.kill();
                    let _ = child.wait();
                    last = format!("display :{display} was taken by another server");
                    break;
                }
                if locked_by == Some(child.id())
                    && socket.exists()
                    && std::os::unix::net::UnixStream::connect(&socket).is_ok()
                {
                    return Ok((child, display));
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(SandboxError::XServer { display, reason: "no connection within the deadline".into() });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let number = display;
            tracing::debug!(x_display = number, "Xvfb did not start here: {last}");
        }
        if last.is_empty() {
            Err(SandboxError::NoDisplay(config.first_display))
        } else {
            Err(SandboxError::XServer { display: config.first_display, reason: last })
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn_title(
        program: &Path,
        dir: &Path,
        home: &Path,
        runtime: &Path,
        display: u32,
        spec: &LaunchSpec,
        user: Option<(u32, u32)>,
        shim: Option<&Path>,
        layer: Option<(PathBuf, PathBuf)>,
        pulse: Option<&Path>,
    ) -> Result<Child, SandboxError> {
        let log = std::fs::File::create(dir.join("title.log")).map_err(io("creating title.log"))?;
        let err = log.try_clone().map_err(io("creating title.log"))?;
        let mut cmd = Command::new(program);
        cmd.args(&spec.args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin:/usr/games".into()))
            .env("LANG", "C.UTF-8")
            .envs(&spec.env)
            .env("DISPLAY", format!(":{display}"))
            .env("XAUTHORITY", dir.join("Xauthority"))
            .env("HOME", home)
            .env("XDG_RUNTIME_DIR", runtime)
            .env("USER", if user.is_some() { "pylon-title" } else { "pylon" })
            .current_dir(spec.workdir.as_deref().unwrap_or(home))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .process_group(0);
        if let Some(shim) = shim {
            let devices: Vec<String> =
                (0..spec.gamepads.min(crate::pad::MAX_PADS)).map(crate::pad::device_path).collect();
            cmd.env("LD_PRELOAD", shim).env("PYLON_PAD_DIR", runtime).env("SDL_JOYSTICK_DEVICE", devices.join(":"));
        }
        if let Some(socket) = pulse {
            // PulseAudio clients find the session's server; ALSA-only titles reach it
            // through the pulse plugin (libasound2-plugins), ALSA's default with it.
            let mut server = std::ffi::OsString::from("unix:");
            server.push(socket);
            cmd.env("PULSE_SERVER", server);
        }
        if let Some((manifests, socket)) = layer {
            // An explicit layer, found through VK_LAYER_PATH (which replaces the default
            // explicit-layer directories, so those follow ours) and enabled by name.
            let mut path = manifests.into_os_string();
            path.push(":/etc/vulkan/explicit_layer.d:/usr/share/vulkan/explicit_layer.d");
            let layers = match spec.env.get("VK_INSTANCE_LAYERS") {
                Some(other) if !other.is_empty() => format!("{}:{other}", crate::capture::LAYER_NAME),
                _ => crate::capture::LAYER_NAME.to_string(),
            };
            cmd.env("VK_LAYER_PATH", path).env("VK_INSTANCE_LAYERS", layers).env(crate::capture::SOCKET_ENV, socket);
        }
        if let Some((uid, gid)) = user {
            // std drops the supplementary groups too when root changes the uid.
            cmd.uid(uid).gid(gid);
        }
        cmd.spawn().map_err(io(format!("starting {}", program.display())))
    }

    /// Restarts the session's PulseAudio server if it died (at the same socket, where the
    /// node's capture finds it again). Returns how it ended, when it had.
    pub fn revive_sound(&mut self) -> Option<String> {
        let (child, _) = self.pulse.as_mut()?;
        let status = child.try_wait().ok().flatten()?;
        let how = describe(status);
        let (binary, user) = self.pulse_again.clone()?;
        let (home, runtime) = (self.dir.join("home"), self.dir.join("runtime"));
        if let Some((_, dir)) = self.pulse.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
        match Self::start_pulse(&binary, &self.dir, &home, &runtime, self.display, user) {
            Ok(p) => self.pulse = Some(p),
            Err(e) => tracing::warn!("the session's sound server could not restart: {e}"),
        }
        Some(how)
    }

    /// The session's PulseAudio server (`unix:/…/native`), when it has one.
    pub fn audio_server(&self) -> Option<String> {
        self.pulse.as_ref().map(|(_, dir)| format!("unix:{}", dir.join("native").display()))
    }

    /// The session's capture socket, when the title runs with the Vulkan present layer
    /// (taken once, by the frame path).
    pub fn take_capture(&mut self) -> Option<crate::capture::CaptureServer> {
        self.capture.take()
    }

    /// The session's virtual gamepads (taken once, by whoever injects input).
    pub fn take_pads(&mut self) -> Vec<crate::pad::PadServer> {
        std::mem::take(&mut self.pads)
    }

    /// The session's X display (`:101`).
    pub fn display(&self) -> String {
        format!(":{}", self.display)
    }

    /// The session's X authority cookie (what the node connects with).
    pub fn cookie(&self) -> &[u8; 16] {
        &self.cookie
    }

    /// The session's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The title's process id (its group's id too).
    pub fn title_pid(&self) -> u32 {
        self.title.id()
    }

    /// The X server's process id.
    pub fn xvfb_pid(&self) -> u32 {
        self.xvfb.id()
    }

    /// How the title ended, once it did (never blocks).
    pub fn exited(&mut self) -> Option<TitleExit> {
        if self.exit.is_none() {
            if let Ok(Some(status)) = self.title.try_wait() {
                self.exit = Some(TitleExit::Exited(describe(status)));
            } else if let Ok(Some(status)) = self.xvfb.try_wait() {
                self.exit = Some(TitleExit::XServerDied(describe(status)));
            }
        }
        self.exit.clone()
    }

    /// The last `n` bytes the title wrote to its output.
    pub fn log_tail(&self, n: usize) -> String {
        let log = std::fs::read(self.dir.join("title.log")).unwrap_or_default();
        String::from_utf8_lossy(log.get(log.len().saturating_sub(n)..).unwrap_or_default()).trim().to_string()
    }

    fn group_alive(&self) -> bool {
        rustix::process::test_kill_process_group(self.pgid).is_ok()
    }

    /// Stops the title (SIGTERM to its group, SIGKILL after the grace period), then the X
    /// server, and removes the session's directory. Dropping a sandbox does the same (a
    /// panic or an early return never leaves a title running).
    pub fn stop(mut self) -> StopReport {
        self.shutdown()
    }

    fn shutdown(&mut self) -> StopReport {
        if self.stopped {
            return StopReport::default();
        }
        self.stopped = true;
        self.pads.clear();
        self.capture = None;
        let mut report = StopReport::default();
        // Reap the leader first if it already exited; the group may live on without it.
        let _ = self.title.try_wait();
        if self.group_alive() {
            report.terminated = true;
            let _ = rustix::process::kill_process_group(self.pgid, rustix::process::Signal::TERM);
            let deadline = Instant::now() + self.grace;
            while self.group_alive() && Instant::now() < deadline {
                let _ = self.title.try_wait();
                std::thread::sleep(Duration::from_millis(20));
            }
            if self.group_alive() {
                report.killed = true;
                let _ = rustix::process::kill_process_group(self.pgid, rustix::process::Signal::KILL);
            }
        }
        let _ = self.title.wait();
        if let Some((mut pulse, socket_dir)) = self.pulse.take() {
            if let Some(pid) = rustix::process::Pid::from_raw(pulse.id() as i32) {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::TERM);
            }
            let deadline = Instant::now() + Duration::from_secs(2);
            while !matches!(pulse.try_wait(), Ok(Some(_))) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = pulse.kill();
            let _ = pulse.wait();
            let _ = std::fs::remove_dir_all(socket_dir);
        }
        // Xvfb leads its own group; SIGTERM lets it remove its lock file and socket.
        if let Some(pid) = rustix::process::Pid::from_raw(self.xvfb.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !matches!(self.xvfb.try_wait(), Ok(Some(_))) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.xvfb.kill();
        let _ = self.xvfb.wait();
        let _ = std::fs::remove_file(format!("/tmp/.X{}-lock", self.display));
        let _ = std::fs::remove_file(format!("/tmp/.X11-unix/X{}", self.display));
        let _ = std::fs::remove_dir_all(&self.dir);
        tracing::info!(x_display = self.display, ?report, "session sandbox removed");
        report
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.shutdown();
    }
}
