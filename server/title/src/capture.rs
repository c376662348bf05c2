//! The node's end of a session's capture link: the Unix `SOCK_SEQPACKET` socket in the
//! session's runtime directory that the title's Vulkan present layer
//! (`libpylon_vklayer.so`, `VK_LAYER_PYLON_capture`) connects to, and the layer's manifest.
//!
//! The title is not trusted. Messages are parsed by [`pylon_proto::capture`] (a bad one is
//! reported as [`CaptureEvent::Malformed`], counted by the node and dropped); at most
//! [`MAX_PER_POLL`] messages are read per poll; only the newest connection is kept; the
//! descriptors of a ring must be as many as its images, and a descriptor that is a
//! regular file (Mesa's memfd) must be at least as long as its image's allocation and
//! sealed against shrinking, so that the title cannot truncate memory the node has mapped.

use std::mem::MaybeUninit;
use std::os::fd::{AsFd as _, OwnedFd};
use std::path::{Path, PathBuf};

use pylon_proto::capture::{self, LayerMessage, NodeMessage, Ring};

/// The layer's name, as its manifest declares it.
pub const LAYER_NAME: &str = "VK_LAYER_PYLON_capture";
/// The layer's library file name.
pub const LAYER_LIBRARY: &str = "libpylon_vklayer.so";
/// The socket's file name in the session's runtime directory.
pub const SOCKET_NAME: &str = "pylon-capture.sock";
/// The variable telling the layer where the socket is.
pub const SOCKET_ENV: &str = "PYLON_CAPTURE_SOCKET";
/// Most messages read per poll.
pub const MAX_PER_POLL: usize = 64;

/// Where the node looks for the layer's library: `$PYLON_VKLAYER`, next to the node's
/// executable (and in its `deps/`, where cargo builds it for tests), then `../lib/pylon`
/// beside it, `/usr/local/lib/pylon` and `/usr/lib/pylon`.
pub fn find_layer() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PYLON_VKLAYER") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let exe_dir = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf));
    let mut candidates = Vec::new();
    if let Some(dir) = exe_dir {
        candidates.push(dir.join(LAYER_LIBRARY));
        candidates.push(dir.join("deps").join(LAYER_LIBRARY));
        candidates.push(dir.join("../lib/pylon").join(LAYER_LIBRARY));
    }
    candidates.push(PathBuf::from("/usr/local/lib/pylon").join(LAYER_LIBRARY));
    candidates.push(PathBuf::from("/usr/lib/pylon").join(LAYER_LIBRARY));
    candidates.into_iter().find(|p| p.is_file()).and_then(|p| p.canonicalize().ok())
}

/// The layer's manifest (an explicit layer: enabled by `VK_INSTANCE_LAYERS`).
pub fn manifest(library: &Path) -> String {
    let path = library.to_string_lossy().replace('\\', "\\\\").replace('"', "\\\"");
    format!(
        r#"{{
  "file_format_version": "1.1.2",
  "layer": {{
    "name": "{LAYER_NAME}",
    "type": "GLOBAL",
    "library_path": "{path}",
    "api_version": "1.3.0",
    "implementation_version": "1",
    "description": "Pylon: hands each presented frame to the render node"
  }}
}}
"#
    )
}

/// What the layer said.
#[derive(Debug)]
pub enum CaptureEvent {
    /// A layer connected (replacing any earlier connection).
    Connected,
    /// A ring of exported images, with its descriptors (checked).
    Ring {
        /// The description.
        ring: Ring,
        /// One per image.
        fds: Vec<OwnedFd>,
    },
    /// A frame is ready in a ring image.
    Frame {
        /// Ring generation.
        generation: u32,
        /// Image index.
        image: u8,
        /// The layer's present count.
        seq: u64,
        /// When the title presented it (`CLOCK_MONOTONIC`, ns).
        presented_ns: u64,
    },
    /// A message was refused (dropped).
    Malformed(String),
    /// The layer closed the link (the title destroyed its device, or exited).
    Closed,
}

/// The listening socket and the layer's connection.
#[derive(Debug)]
pub struct CaptureServer {
    path: PathBuf,
    listener: OwnedFd,
    conn: Option<OwnedFd>,
}

impl CaptureServer {
    /// Listens at `dir/`[`SOCKET_NAME`], owned by `owner` (the title's user) when given.
    pub fn bind(dir: &Path, owner: Option<(u32, u32)>) -> std::io::Result<Self> {
        use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
        let path = dir.join(SOCKET_NAME);
        let _ = std::fs::remove_file(&path);
        let listener = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )?;
        let (_dir, short) = short_path(&path)?;
        rustix::net::bind(&listener, &SocketAddrUnix::new(&short)?)?;
        rustix::net::listen(&listener, 4)?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
        }
        Ok(Self { path, listener, conn: None })
    }

    /// The socket's path (what [`SOCKET_ENV`] says).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a layer is connected.
    pub fn connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Takes new connections and reads what the layer sent (never blocks).
    pub fn poll(&mut self, out: &mut Vec<CaptureEvent>) {
        use rustix::net::SocketFlags;
        // The newest connection wins (a launcher's, then the game's); a title cannot make
        // the node hold more than one.
        for _ in 0..4 {
            match rustix::net::accept_with(&self.listener, SocketFlags::CLOEXEC | SocketFlags::NONBLOCK) {
                Ok(conn) => {
                    self.conn = Some(conn);
                    out.push(CaptureEvent::Connected);
                }
                Err(_) => break,
            }
        }
        for _ in 0..MAX_PER_POLL {
            let Some(conn) = self.conn.as_ref() else { return };
            match receive(conn) {
                Ok(Some(event)) => {
                    let closed = matches!(event, CaptureEvent::Closed);
                    out.push(event);
                    if closed {
                        self.conn = None;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    out.push(CaptureEvent::Malformed(format!("reading the capture socket: {e}")));
                    out.push(CaptureEvent::Closed);
                    self.conn = None;
                }
            }
        }
    }

    /// Sends `message` to the layer; a failure drops the connection.
    pub fn send(&mut self, message: NodeMessage) {
        let Some(conn) = self.conn.as_ref() else { return };
        let bytes = message.encode();
        let flags = rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL;
        if rustix::net::send(conn, &bytes, flags).is_err() {
            self.conn = None;
        }
    }
}

/// `path` short enough for a socket address (108 bytes): itself, or, when longer, the
/// same file reached through `/proc/self/fd/N/` of its directory opened `O_PATH` (kept open
/// in the returned descriptor while the path is used).
pub fn short_path(path: &Path) -> std::io::Result<(Option<OwnedFd>, PathBuf)> {
    use std::os::unix::ffi::OsStrExt as _;
    if path.as_os_str().as_bytes().len() < 100 {
        return Ok((None, path.to_path_buf()));
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(std::io::Error::other("a socket path without a directory"));
    };
    let fd = rustix::fs::open(
        dir,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    let short = PathBuf::from(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd))).join(name);
    Ok((Some(fd), short))
}

impl Drop for CaptureServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One message, `Ok(None)` when none is waiting.
fn receive(conn: &OwnedFd) -> std::io::Result<Option<CaptureEvent>> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags};
    let mut buf = [0u8; capture::MAX_MESSAGE + 1];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(capture::MAX_RING as usize))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = match rustix::net::recvmsg(
        conn,
        &mut [std::io::IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC,
    ) {
        Ok(r) => r,
        Err(rustix::io::Errno::AGAIN) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut fds: Vec<OwnedFd> = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = message {
            fds.extend(rights);
        }
    }
    if received.bytes == 0 && fds.is_empty() {
        return Ok(Some(CaptureEvent::Closed));
    }
    if received.flags.intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC) || received.bytes > capture::MAX_MESSAGE {
        return Ok(Some(CaptureEvent::Malformed("an oversized capture message".into())));
    }
    let message = match LayerMessage::decode(buf.get(..received.bytes).unwrap_or_default()) {
        Ok(m) => m,
        Err(e) => return Ok(Some(CaptureEvent::Malformed(e.to_string()))),
    };
    if fds.len() != message.descriptors() {
        return Ok(Some(CaptureEvent::Malformed(format!(
            "{} descriptors with a message that carries {}",
            fds.len(),
            message.descriptors()
        ))));
    }
    Ok(Some(match message {
        LayerMessage::Ring(ring) => {
            for (fd, &size) in fds.iter().zip(&ring.sizes) {
                if let Err(why) = check_descriptor(fd, size) {
                    return Ok(Some(CaptureEvent::Malformed(why)));
                }
            }
            CaptureEvent::Ring { ring, fds }
        }
        LayerMessage::Frame { generation, image, seq, presented_ns } => {
            CaptureEvent::Frame { generation, image, seq, presented_ns }
        }
    }))
}

/// A ring image's descriptor, as the node will map it: a regular file (memfd) must hold
/// the whole allocation and be sealed against shrinking (the node seals it if the title
/// did not, and refuses a file that cannot be sealed).
pub fn check_descriptor(fd: &OwnedFd, size: u64) -> Result<(), String> {
    use rustix::fs::{FileType, SealFlags};
    let stat = rustix::fs::fstat(fd.as_fd()).map_err(|e| format!("a ring descriptor: {e}"))?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
        // A driver object (dma-buf, a GPU driver's handle): the driver checks the import.
        return Ok(());
    }
    if u64::try_from(stat.st_size).unwrap_or(0) < size {
        return Err(format!("a ring image's memory holds {} bytes, not the {size} announced", stat.st_size));
    }
    let seals =
        rustix::fs::fcntl_get_seals(fd.as_fd()).map_err(|e| format!("a ring image's memory is not sealable ({e})"))?;
    if !seals.contains(SealFlags::SHRINK) {
        rustix::fs::fcntl_add_seals(fd.as_fd(), SealFlags::SHRINK)
            .map_err(|e| format!("a ring image's memory cannot be sealed against shrinking ({e})"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd(len: u64, seal: bool) -> OwnedFd {
        use rustix::fs::{MemfdFlags, SealFlags};
        let flags = if seal { MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING } else { MemfdFlags::CLOEXEC };
        let fd = rustix::fs::memfd_create("ring", flags).unwrap();
        rustix::fs::ftruncate(&fd, len).unwrap();
        if seal {
            rustix::fs::fcntl_add_seals(&fd, SealFlags::SEAL).unwrap_or(());
        }
        fd
    }

    #[test]
    fn descriptors_that_could_shrink_or_are_short_are_refused() {
        // Sealable and long enough: the node seals it.
        let fd = memfd(4096, false);
        assert!(check_descriptor(&fd, 4096).is_err(), "a memfd without sealing");
        let fd = rustix::fs::memfd_create("ring", rustix::fs::MemfdFlags::ALLOW_SEALING).unwrap();
        rustix::fs::ftruncate(&fd, 8192).unwrap();
        assert!(check_descriptor(&fd, 4096).is_ok());
        assert!(rustix::fs::fcntl_get_seals(&fd).unwrap().contains(rustix::fs::SealFlags::SHRINK));
        assert!(rustix::fs::ftruncate(&fd, 100).is_err(), "sealed against shrinking");
        // Too short for what was announced.
        assert!(check_descriptor(&fd, 1 << 20).is_err());
        // A file on disk cannot be sealed.
        let file = tempfile::tempfile().unwrap();
        file.set_len(8192).unwrap();
        assert!(check_descriptor(&OwnedFd::from(file), 4096).is_err());
        // A descriptor that is not a file is left to the driver.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(check_descriptor(&OwnedFd::from(a), 4096).is_ok());
        let _ = memfd(0, true);
    }

    fn client(path: &Path) -> OwnedFd {
        use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
        let fd =
            rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None).unwrap();
        let (_dir, short) = short_path(path).unwrap();
        rustix::net::connect(&fd, &SocketAddrUnix::new(short).unwrap()).unwrap();
        fd
    }

    #[test]
    fn sockets_in_deep_directories_still_bind_and_connect() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a".repeat(60)).join("b".repeat(60));
        std::fs::create_dir_all(&deep).unwrap();
        let mut server = CaptureServer::bind(&deep, None).unwrap();
        assert!(server.path().as_os_str().len() > 108);
        let _layer = client(server.path());
        let mut events = Vec::new();
        server.poll(&mut events);
        assert!(matches!(events.first(), Some(CaptureEvent::Connected)), "{events:?}");
    }

    fn send(fd: &OwnedFd, bytes: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]) {
        use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(8))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() {
            assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
        }
        rustix::net::sendmsg(fd, &[std::io::IoSlice::new(bytes)], &mut control, SendFlags::empty()).unwrap();
    }

    #[test]
    fn a_hostile_layer_gets_counted_drops_and_the_node_keeps_going() {
        let dir = tempfile::tempdir().unwrap();
        let mut server = CaptureServer::bind(dir.path(), None).unwrap();
        let mut events = Vec::new();
        server.poll(&mut events);
        assert!(events.is_empty(), "nothing before a connection");
        let layer = client(server.path());
        let ring = Ring {
            generation: 1,
            width: 64,
            height: 32,
            format: capture::FORMAT_BGRA8,
            memory_type: 0,
            sizes: vec![64 * 32 * 4; 2],
            device_uuid: [0; 16],
            driver_uuid: [0; 16],
        };
        let good = || {
            let fd = rustix::fs::memfd_create("ring", rustix::fs::MemfdFlags::ALLOW_SEALING).unwrap();
            rustix::fs::ftruncate(&fd, 64 * 32 * 4).unwrap();
            fd
        };
        let (a, b) = (good(), good());
        // Garbage; a ring with one descriptor for two images; a ring whose memory is short;
        // a frame with a descriptor it should not carry; then a good ring and a frame.
        send(&layer, b"garbage", &[]);
        send(&layer, &LayerMessage::Ring(ring.clone()).encode(), &[a.as_fd()]);
        let short = rustix::fs::memfd_create("short", rustix::fs::MemfdFlags::ALLOW_SEALING).unwrap();
        send(&layer, &LayerMessage::Ring(ring.clone()).encode(), &[a.as_fd(), short.as_fd()]);
        let frame = LayerMessage::Frame { generation: 1, image: 1, seq: 5, presented_ns: 9 };
        send(&layer, &frame.encode(), &[a.as_fd()]);
        send(&layer, &[0u8; 200], &[]);
        send(&layer, &LayerMessage::Ring(ring.clone()).encode(), &[a.as_fd(), b.as_fd()]);
        send(&layer, &frame.encode(), &[]);
        server.poll(&mut events);
        let malformed = events.iter().filter(|e| matches!(e, CaptureEvent::Malformed(_))).count();
        assert_eq!(malformed, 5, "{events:?}");
        assert!(matches!(events.first(), Some(CaptureEvent::Connected)));
        assert!(
            matches!(&events[events.len() - 2], CaptureEvent::Ring { ring: r, fds } if *r == ring && fds.len() == 2)
        );
        assert!(matches!(events.last(), Some(CaptureEvent::Frame { generation: 1, image: 1, seq: 5, .. })));
        // The node's release reaches the layer.
        server.send(NodeMessage::Release { generation: 1, image: 1 });
        let mut buf = [0u8; 64];
        let n = rustix::io::read(&layer, &mut buf).unwrap();
        assert_eq!(NodeMessage::decode(&buf[..n]).unwrap(), NodeMessage::Release { generation: 1, image: 1 });
        // A flood is read at most MAX_PER_POLL messages at a time.
        for _ in 0..MAX_PER_POLL + 10 {
            send(&layer, &frame.encode(), &[]);
        }
        events.clear();
        server.poll(&mut events);
        assert_eq!(events.len(), MAX_PER_POLL);
        // The layer goes away.
        drop(layer);
        events.clear();
        server.poll(&mut events);
        server.poll(&mut events);
        assert!(matches!(events.last(), Some(CaptureEvent::Closed)), "{events:?}");
        assert!(!server.connected());
    }

    #[test]
    fn the_manifest_names_the_library() {
        let m = manifest(Path::new("/opt/pylon/lib\"x.so"));
        assert!(m.contains(LAYER_NAME));
        assert!(m.contains(r#""library_path": "/opt/pylon/lib\"x.so""#));
    }
}
