//! What the relay benchmarks share: synthetic WebRTC viewers (str0m clients timing each
//! packet by the kernel's receive timestamp), the relay's signalling, and reading
//! processes' CPU and memory and relays' histograms.

use anyhow::{Context, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use str0m::change::SdpAnswer;
use str0m::media::{Direction, MediaKind};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

/// A key naming an RTP payload, to match one packet across senders and viewers.
pub fn payload_key(payload: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    payload.hash(&mut h);
    h.finish()
}

/// One synthetic viewer: a str0m client on its own UDP socket.
pub struct Viewer {
    pub rtc: Rtc,
    socket: UdpSocket,
    local: SocketAddr,
}

impl Viewer {
    pub async fn new() -> anyhow::Result<Self> {
        Self::on("127.0.0.1".parse()?).await
    }

    /// A viewer whose socket is bound to `ip` (one of this machine's addresses).
    pub async fn on(ip: std::net::IpAddr) -> anyhow::Result<Self> {
        let socket = UdpSocket::bind(SocketAddr::new(ip, 0)).await?;
        let local = socket.local_addr()?;
        let mut rtc = RtcConfig::new().set_rtp_mode(true).build(Instant::now());
        rtc.add_local_candidate(Candidate::host(local, "udp")?);
        Ok(Self { rtc, socket, local })
    }

    /// Drives the session until `stop`, handing every RTP packet's payload to `on_rtp`
    /// with its arrival. A packet's arrival is the kernel's receive timestamp of its
    /// datagram (SO_TIMESTAMPNS), so what is timed is the relay's added delay plus
    /// loopback, not this client's own scheduling and decryption on a busy machine.
    pub async fn run(
        mut self,
        mut on_rtp: impl FnMut(&[u8], Instant),
        mut stop: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        use std::os::fd::AsRawFd;
        let mut buf = vec![0u8; 2048];
        nix::sys::socket::setsockopt(&self.socket, nix::sys::socket::sockopt::ReceiveTimestampns, &true)?;
        let mut arrival = Instant::now();
        loop {
            let timeout = match self.rtc.poll_output()? {
                Output::Timeout(t) => t,
                Output::Transmit(t) => {
                    let _ = self.socket.send_to(&t.contents, t.destination).await;
                    continue;
                }
                Output::Event(Event::RtpPacket(p)) => {
                    // Decrypted from the datagram just handled.
                    on_rtp(&p.payload, arrival);
                    continue;
                }
                Output::Event(_) => continue,
            };
            tokio::select! {
                r = self.socket.readable() => {
                    r?;
                    let fd = self.socket.as_raw_fd();
                    let Ok((n, from, at)) = self.socket.try_io(tokio::io::Interest::READABLE, || recv_timestamped(fd, &mut buf)) else {
                        continue;
                    };
                    arrival = at;
                    if let Ok(receive) = Receive::new(Protocol::Udp, from, self.local, &buf[..n]) {
                        self.rtc.handle_input(Input::Receive(Instant::now(), receive))?;
                    }
                }
                _ = tokio::time::sleep_until(timeout.into()) => {
                    self.rtc.handle_input(Input::Timeout(Instant::now()))?;
                }
                _ = stop.changed() => return Ok(()),
            }
        }
    }
}

/// Receives one datagram with its kernel receive time (SO_TIMESTAMPNS, wall clock)
/// mapped onto `Instant`.
fn recv_timestamped(fd: std::os::fd::RawFd, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr, Instant)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg};
    let mut cmsg = nix::cmsg_space!(nix::sys::time::TimeSpec);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg =
        recvmsg::<SockaddrStorage>(fd, &mut iov, Some(&mut cmsg), MsgFlags::empty()).map_err(std::io::Error::from)?;
    let (now, wall) = (Instant::now(), std::time::SystemTime::now());
    let mut at = now;
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmTimestampns(ts) = c {
            let kernel = std::time::UNIX_EPOCH + Duration::from(ts);
            // How long ago the kernel took it, on the wall clock read just now.
            at = now.checked_sub(wall.duration_since(kernel).unwrap_or_default()).unwrap_or(now);
        }
    }
    let from = msg
        .address
        .and_then(|a| a.as_sockaddr_in().map(|a| SocketAddr::V4((*a).into())))
        .ok_or_else(|| std::io::Error::other("datagram without an IPv4 source"))?;
    Ok((msg.bytes, from, at))
}

/// Connects a viewer to a Pylon relay through its signalling WebSocket (with the
/// indexer's session `token` in a pool, which decides the role there), and drives it
/// until `stop` (see [`Viewer::run`]).
pub async fn pylon_viewer(
    http: SocketAddr,
    token: Option<String>,
    on_rtp: impl FnMut(&[u8], Instant),
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut v = Viewer::new().await?;
    let mut change = v.rtc.sdp_api();
    change.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
    let (offer, pending) = change.apply().ok_or_else(|| anyhow!("no offer"))?;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{http}/ws")).await?;
    let mut msg = serde_json::json!({"type": "offer", "sdp": offer.to_sdp_string(), "role": "spectator"});
    if let Some(token) = token {
        msg["token"] = token.into();
    }
    ws.send(Message::Text(msg.to_string().into())).await?;
    let answer = loop {
        let Some(Ok(Message::Text(text))) = ws.next().await else { bail!("signalling closed") };
        let v: serde_json::Value = serde_json::from_str(&text)?;
        match v["type"].as_str() {
            Some("answer") => break v["sdp"].as_str().unwrap_or_default().to_string(),
            Some("error") => bail!("relay refused: {}", v["message"]),
            _ => {}
        }
    };
    v.rtc.sdp_api().accept_answer(pending, SdpAnswer::from_sdp_string(&answer)?)?;
    // The WebSocket stays open for the whole session: closing it ends the viewer.
    let result = v.run(on_rtp, stop).await;
    drop(ws);
    result
}

/// CPU seconds (user + system) a process has used.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    Ok(ticks / 100.0)
}

/// Resident memory of a process, KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS"))
}

/// The value at quantile `p` of sorted microseconds, in ms.
pub fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

/// The cumulative buckets of histogram `name` (e.g. `pylon_relay_forward_seconds`) on the
/// `/metrics` of `http`: (upper bound s, count).
pub async fn buckets(http: SocketAddr, name: &str) -> Vec<(f64, f64)> {
    let text = match reqwest::get(format!("http://{http}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    let prefix = format!("{name}_bucket");
    text.lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

/// What was observed between two readings of [`buckets`].
pub fn bucket_delta(before: &[(f64, f64)], after: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after.iter().zip(before).map(|((le, a), (_, b))| (*le, a - b)).collect()
}

/// The upper bound (ms) of the bucket holding quantile `q` of cumulative buckets.
pub fn bucket_quantile(cumulative: &[(f64, f64)], q: f64) -> f64 {
    let total = cumulative.last().map_or(0.0, |(_, n)| *n);
    cumulative.iter().find(|(_, n)| *n >= q * total).map_or(f64::NAN, |(le, _)| le * 1000.0)
}

/// A free loopback TCP port (for a child process to bind).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").map(|l| l.local_addr().map_or(0, |a| a.port())).unwrap_or(0)
}

/// A binary built beside this one (`cargo build --release -p …`).
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()?.parent().ok_or_else(|| anyhow!("no binary directory"))?.join(name);
    if !path.exists() {
        bail!("{} not found: build it with `cargo build --release` (the Makefile's bench targets do)", path.display());
    }
    Ok(path)
}

/// The sum of a metric's samples on the `/metrics` of `http` (0 when unreachable).
pub async fn metric(http: SocketAddr, name: &str) -> f64 {
    let text = reqwest::get(format!("http://{http}/metrics")).await.ok();
    let text = match text {
        Some(r) => r.text().await.unwrap_or_default(),
        None => String::new(),
    };
    text.lines().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// Waits until `http` accepts TCP connections.
pub async fn wait_listening(http: SocketAddr, what: &str) -> anyhow::Result<()> {
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(http).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(anyhow!("{what} never listened on {http}")).context("starting the benchmark's processes")
}
