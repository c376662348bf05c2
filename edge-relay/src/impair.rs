//! A user-space UDP impairment proxy, for testing a link when the kernel has no `netem`:
//! random or bursty loss, delay, jitter, reordering and a bandwidth cap, seeded so a run
//! can be repeated. Put it between browsers and a relay (start the relay with
//! `--advertise-addr` set to the proxy's address), or between a render node and a relay.
//!
//! Each client address gets its own upstream socket, so replies find their way back. The
//! model of each direction is [`pylon_proto::impair::Impairment`]; this module only moves
//! datagrams.

use pylon_proto::impair::{Impairment, LossModel};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

/// What to do to the traffic (both directions alike, each with its own random stream).
#[derive(Debug, Clone)]
pub struct ImpairConfig {
    /// Loss model.
    pub loss: LossModel,
    /// One-way base delay.
    pub delay: Duration,
    /// Extra delay, uniform in `0..jitter` (order kept).
    pub jitter: Duration,
    /// Chance that a packet is overtaken by later ones.
    pub reorder: f64,
    /// Bandwidth cap per direction, bit/s (`None`: unlimited). Packets that would wait
    /// more than [`QUEUE_LIMIT`] in the bottleneck queue are dropped, as `tbf` does.
    pub rate_bps: Option<u64>,
    /// Seed of the random streams.
    pub seed: u64,
}

/// Longest a packet may queue behind the bandwidth cap before it is dropped.
pub const QUEUE_LIMIT: Duration = Duration::from_millis(100);

/// Counters of a running proxy.
#[derive(Debug, Default)]
pub struct ImpairStats {
    /// Datagrams received.
    pub received: AtomicU64,
    /// Datagrams dropped by the loss model.
    pub lost: AtomicU64,
    /// Datagrams dropped by the bandwidth cap.
    pub overflow: AtomicU64,
    /// Datagrams delivered.
    pub delivered: AtomicU64,
}

/// A running proxy.
#[derive(Debug, Clone)]
pub struct ImpairHandle {
    /// Where clients send to.
    pub listen: SocketAddr,
    /// Its counters.
    pub stats: Arc<ImpairStats>,
}

struct Direction {
    model: Impairment,
    rate_bps: Option<u64>,
    link_free_at: Instant,
}

impl Direction {
    fn new(config: &ImpairConfig, seed: u64, now: Instant) -> Self {
        Self {
            model: Impairment::new(seed, config.loss, config.delay, config.jitter, config.reorder),
            rate_bps: config.rate_bps,
            link_free_at: now,
        }
    }

    /// When a datagram of `len` bytes entering at `now` comes out, or why it does not.
    fn admit(&mut self, now: Instant, len: usize, stats: &ImpairStats) -> Option<Instant> {
        let mut sent = now;
        if let Some(rate) = self.rate_bps.filter(|r| *r > 0) {
            let start = self.link_free_at.max(now);
            if start.saturating_duration_since(now) > QUEUE_LIMIT {
                stats.overflow.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            let serialise = Duration::from_secs_f64((len as f64 + 28.0) * 8.0 / rate as f64);
            self.link_free_at = start + serialise;
            sent = self.link_free_at;
        }
        match self.model.on_packet(sent) {
            Some(at) => Some(at),
            None => {
                stats.lost.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }
}

/// A datagram waiting for its delivery time. `to_client` says which way it goes.
struct Pending {
    at: Instant,
    order: u64,
    client: SocketAddr,
    to_client: bool,
    data: Vec<u8>,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.order) == (other.at, other.order)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.order).cmp(&(other.at, other.order))
    }
}

struct Client {
    upstream: Arc<UdpSocket>,
    to_target: Direction,
    to_client: Direction,
}

/// Binds `listen` and forwards to `target` until `shutdown`. Returns once bound.
pub async fn start(
    listen: SocketAddr,
    target: SocketAddr,
    config: ImpairConfig,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<ImpairHandle> {
    // Large kernel buffers: a keyframe is a burst, and the proxy must not be the one losing it.
    let std_socket = crate::egress::big_buffer_socket(listen, 4 << 20).map_err(std::io::Error::other)?;
    let socket = UdpSocket::from_std(std_socket)?;
    let handle = ImpairHandle { listen: socket.local_addr()?, stats: Arc::default() };
    tokio::spawn(run(socket, target, config, handle.stats.clone(), shutdown));
    Ok(handle)
}

async fn run(
    socket: UdpSocket,
    target: SocketAddr,
    config: ImpairConfig,
    stats: Arc<ImpairStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut clients: HashMap<SocketAddr, Client> = HashMap::new();
    let (from_target_tx, mut from_target_rx) = mpsc::channel::<(SocketAddr, Vec<u8>)>(4096);
    let mut queue: BinaryHeap<Reverse<Pending>> = BinaryHeap::new();
    let mut order = 0u64;
    let mut buf = vec![0u8; 65536];
    loop {
        let next = queue.peek().map(|Reverse(p)| p.at).unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            r = socket.recv_from(&mut buf) => {
                let Ok((n, client)) = r else { continue };
                let now = Instant::now();
                stats.received.fetch_add(1, Ordering::Relaxed);
                if !clients.contains_key(&client) {
                    let bind: SocketAddr = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap_or(target);
                    let Ok(upstream) = UdpSocket::bind(bind).await else { continue };
                    if upstream.connect(target).await.is_err() {
                        continue;
                    }
                    let upstream = Arc::new(upstream);
                    let (rx_socket, tx) = (upstream.clone(), from_target_tx.clone());
                    let mut stop = shutdown.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65536];
                        loop {
                            tokio::select! {
                                r = rx_socket.recv(&mut buf) => match r {
                                    Ok(n) => {
                                        if tx.send((client, buf.get(..n).unwrap_or_default().to_vec())).await.is_err() { break; }
                                    }
                                    Err(_) => continue,
                                },
                                _ = crate::stopped(&mut stop) => break,
                            }
                        }
                    });
                    let seed = config.seed ^ (clients.len() as u64).wrapping_mul(0x9e37_79b9);
                    clients.insert(client, Client {
                        upstream,
                        to_target: Direction::new(&config, seed, now),
                        to_client: Direction::new(&config, seed ^ 0x5555, now),
                    });
                }
                let Some(c) = clients.get_mut(&client) else { continue };
                if let Some(at) = c.to_target.admit(now, n, &stats) {
                    order += 1;
                    queue.push(Reverse(Pending { at, order, client, to_client: false, data: buf.get(..n).unwrap_or_default().to_vec() }));
                }
            }
            Some((client, data)) = from_target_rx.recv() => {
                let now = Instant::now();
                stats.received.fetch_add(1, Ordering::Relaxed);
                let Some(c) = clients.get_mut(&client) else { continue };
                if let Some(at) = c.to_client.admit(now, data.len(), &stats) {
                    order += 1;
                    queue.push(Reverse(Pending { at, order, client, to_client: true, data }));
                }
            }
            _ = tokio::time::sleep_until(next.into()) => {
                let now = Instant::now();
                while queue.peek().is_some_and(|Reverse(p)| p.at <= now) {
                    let Some(Reverse(p)) = queue.pop() else { break };
                    let sent = if p.to_client {
                        socket.send_to(&p.data, p.client).await.is_ok()
                    } else {
                        match clients.get(&p.client) {
                            Some(c) => c.upstream.send(&p.data).await.is_ok(),
                            None => false,
                        }
                    };
                    if sent {
                        stats.delivered.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            _ = crate::stopped(&mut shutdown) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let _ = s.send_to(&buf[..n], from).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn forwards_both_ways_with_delay_and_loss() {
        let target = echo_server().await;
        let (_stop, stop_rx) = watch::channel(false);
        let config = ImpairConfig {
            loss: LossModel::Random(0.1),
            delay: Duration::from_millis(20),
            jitter: Duration::ZERO,
            reorder: 0.0,
            rate_bps: None,
            seed: 1,
        };
        let proxy = start("127.0.0.1:0".parse().unwrap(), target, config, stop_rx).await.unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let t0 = Instant::now();
        client.send_to(b"first", proxy.listen).await.unwrap();
        let mut buf = [0u8; 64];
        // Retry the first exchange if the model lost it.
        let mut got = tokio::time::timeout(Duration::from_millis(500), client.recv_from(&mut buf)).await;
        while got.is_err() {
            client.send_to(b"first", proxy.listen).await.unwrap();
            got = tokio::time::timeout(Duration::from_millis(500), client.recv_from(&mut buf)).await;
        }
        let (n, from) = got.unwrap().unwrap();
        assert_eq!((&buf[..n], from), (&b"first"[..], proxy.listen));
        assert!(t0.elapsed() >= Duration::from_millis(40), "20 ms each way");
        // Paced, so that no kernel buffer on the way drops what the model let through.
        let mut echoed = 0;
        for i in 0..500u32 {
            client.send_to(&i.to_be_bytes(), proxy.listen).await.unwrap();
            if i % 10 == 9 {
                while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(2), client.recv_from(&mut buf)).await {
                    echoed += 1;
                }
            }
        }
        while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(300), client.recv_from(&mut buf)).await {
            echoed += 1;
        }
        // Each echo crosses the proxy twice: about 0.9² of 500 come back.
        assert!((330..470).contains(&echoed), "{echoed} of 500 echoed");
        let (received, lost) = (proxy.stats.received.load(Ordering::Relaxed), proxy.stats.lost.load(Ordering::Relaxed));
        let share = lost as f64 / received as f64;
        assert!((0.06..0.14).contains(&share), "{lost} of {received} lost");
    }

    #[tokio::test]
    async fn a_bandwidth_cap_paces_and_drops_the_excess() {
        let target = echo_server().await;
        let (_stop, stop_rx) = watch::channel(false);
        let config = ImpairConfig {
            loss: LossModel::None,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            reorder: 0.0,
            rate_bps: Some(1_000_000),
            seed: 1,
        };
        let proxy = start("127.0.0.1:0".parse().unwrap(), target, config, stop_rx).await.unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        // 400 × 1000 bytes at once is 3.3 Mbit: a 1 Mbit/s link with a 100 ms queue takes ~13.
        for _ in 0..400 {
            client.send_to(&[0u8; 1000], proxy.listen).await.unwrap();
        }
        let mut buf = [0u8; 2048];
        let mut echoed = 0;
        while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(400), client.recv_from(&mut buf)).await {
            echoed += 1;
        }
        assert!((8..30).contains(&echoed), "{echoed} fit through the cap");
        let over = proxy.stats.overflow.load(Ordering::Relaxed);
        assert!(over > 250, "{over} dropped at the cap");
    }
}
