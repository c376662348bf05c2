//! Matching a player to a relay and a render node: I/O-free, deterministic, explained.
//!
//! The expected click-to-photon of a candidate pair is
//! `client↔relay RTT + relay↔node RTT + the node's expected encode time`; the pair with
//! the lowest wins, among nodes that are ready (not draining or gone), have a free slot,
//! have the title installed, meet the title's GPU class and the player's price limit, and
//! relays that are healthy with room for a viewer. Ties (within [`TIE_MS`]) go to the
//! cheaper node. Every rejection is counted by reason, so "no match" says why.

use std::collections::BTreeMap;

/// Expected latencies closer than this are a tie, broken by price.
pub const TIE_MS: f64 = 1.0;

/// A render node's state in the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// Takes new sessions.
    Ready,
    /// Finishing its sessions, takes no new ones.
    Draining,
    /// Stopped heartbeating.
    Gone,
}

/// What the selector knows of a render node.
#[derive(Debug, Clone)]
pub struct NodeCandidate {
    /// Node id.
    pub id: String,
    /// Ready, draining or gone.
    pub state: NodeState,
    /// Sessions it can run at once.
    pub capacity: u32,
    /// Sessions it runs now.
    pub sessions: u32,
    /// Titles installed and ready.
    pub titles: Vec<String>,
    /// GPU class (higher is more capable).
    pub gpu_class: u8,
    /// Price per GPU-hour.
    pub price_per_hour: f64,
    /// Expected encode time per frame, ms (NVENC ≈ 1, libx264 at 720p ≈ 3–5).
    pub encode_ms: f64,
}

/// What the selector knows of a relay.
#[derive(Debug, Clone)]
pub struct RelayCandidate {
    /// Relay id.
    pub id: String,
    /// Whether it heartbeats.
    pub healthy: bool,
    /// Viewers it can serve.
    pub capacity: u32,
    /// Viewers now.
    pub viewers: u32,
    /// RTT to each node it has measured, ms.
    pub node_rtt_ms: BTreeMap<String, f64>,
}

/// A player's request.
#[derive(Debug, Clone)]
pub struct MatchRequest {
    /// Title wanted.
    pub title: String,
    /// The title's minimum GPU class.
    pub min_gpu_class: u8,
    /// Highest price per GPU-hour the player accepts.
    pub max_price_per_hour: Option<f64>,
    /// RTT the client measured to each candidate relay, ms.
    pub client_rtt_ms: BTreeMap<String, f64>,
}

/// The chosen pair and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Match {
    /// Relay id.
    pub relay: String,
    /// Node id.
    pub node: String,
    /// Expected click-to-photon contribution of the path, ms.
    pub expected_ms: f64,
    /// How the winner compared, for logs and the API.
    pub reason: String,
}

/// Why nothing matched.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("no capacity in your region for {title:?}: {summary}")]
pub struct NoMatch {
    /// The title asked for.
    pub title: String,
    /// Counts of rejections by reason, e.g. `3 nodes full, 1 relay unreachable`.
    pub summary: String,
    /// The same counts, machine-readable.
    pub rejected: BTreeMap<&'static str, usize>,
}

/// Picks the relay and node that minimise expected latency.
pub fn select(req: &MatchRequest, nodes: &[NodeCandidate], relays: &[RelayCandidate]) -> Result<Match, NoMatch> {
    let mut rejected: BTreeMap<&'static str, usize> = BTreeMap::new();
    let reject =
        |rejected: &mut BTreeMap<&'static str, usize>, why: &'static str| *rejected.entry(why).or_default() += 1;
    let usable_nodes: Vec<&NodeCandidate> = nodes
        .iter()
        .filter(|n| {
            let why = match n.state {
                NodeState::Gone => Some("node gone"),
                NodeState::Draining => Some("node draining"),
                NodeState::Ready if n.sessions >= n.capacity => Some("node full"),
                NodeState::Ready if !n.titles.contains(&req.title) => Some("node lacks the title"),
                NodeState::Ready if n.gpu_class < req.min_gpu_class => Some("node GPU too small"),
                NodeState::Ready if req.max_price_per_hour.is_some_and(|max| n.price_per_hour > max) => {
                    Some("node over the price limit")
                }
                NodeState::Ready => None,
            };
            if let Some(why) = why {
                reject(&mut rejected, why);
            }
            why.is_none()
        })
        .collect();
    let usable: std::collections::HashMap<&str, &NodeCandidate> =
        usable_nodes.iter().map(|n| (n.id.as_str(), *n)).collect();
    let mut best: Option<(f64, f64, &RelayCandidate, &NodeCandidate)> = None;
    let mut considered = 0usize;
    // Only relays the client measured, and through each only the nodes it measured: the
    // cost grows with what was measured, not with the size of the pool.
    for relay in relays {
        let Some(client_rtt) = req.client_rtt_ms.get(&relay.id).copied().filter(|r| r.is_finite() && *r >= 0.0) else {
            reject(&mut rejected, "relay not measured by the client");
            continue;
        };
        if !relay.healthy {
            reject(&mut rejected, "relay unhealthy");
            continue;
        }
        if relay.viewers >= relay.capacity {
            reject(&mut rejected, "relay full");
            continue;
        }
        let mut reachable = false;
        for (node_id, node_rtt) in &relay.node_rtt_ms {
            let Some(node) = usable.get(node_id.as_str()) else { continue };
            if !node_rtt.is_finite() || *node_rtt < 0.0 {
                continue;
            }
            reachable = true;
            considered += 1;
            let expected = client_rtt + node_rtt + node.encode_ms.max(0.0);
            let better = match best {
                None => true,
                Some((e, price, _, _)) => {
                    expected < e - TIE_MS || ((expected - e).abs() <= TIE_MS && node.price_per_hour < price)
                }
            };
            if better {
                best = Some((expected, node.price_per_hour, relay, node));
            }
        }
        if !reachable {
            reject(&mut rejected, "relay cannot reach a usable node");
        }
    }
    match best {
        Some((expected_ms, price, relay, node)) => Ok(Match {
            relay: relay.id.clone(),
            node: node.id.clone(),
            expected_ms,
            reason: format!(
                "lowest expected latency {expected_ms:.1} ms (client→{} {:.1} ms, →{} {:.1} ms, encode {:.1} ms) \
                 at {price:.2}/h among {considered} pairs",
                relay.id,
                req.client_rtt_ms.get(&relay.id).copied().unwrap_or_default(),
                node.id,
                relay.node_rtt_ms.get(&node.id).copied().unwrap_or_default(),
                node.encode_ms
            ),
        }),
        None => {
            if usable_nodes.is_empty() && rejected.is_empty() {
                reject(&mut rejected, "no node registered");
            }
            let summary = rejected.iter().map(|(why, n)| format!("{n} × {why}")).collect::<Vec<_>>().join(", ");
            Err(NoMatch { title: req.title.clone(), summary, rejected })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, price: f64) -> NodeCandidate {
        NodeCandidate {
            id: id.into(),
            state: NodeState::Ready,
            capacity: 4,
            sessions: 0,
            titles: vec!["demo".into()],
            gpu_class: 2,
            price_per_hour: price,
            encode_ms: 3.0,
        }
    }

    fn relay(id: &str, rtts: &[(&str, f64)]) -> RelayCandidate {
        RelayCandidate {
            id: id.into(),
            healthy: true,
            capacity: 100,
            viewers: 0,
            node_rtt_ms: rtts.iter().map(|(n, r)| (n.to_string(), *r)).collect(),
        }
    }

    fn request(rtts: &[(&str, f64)]) -> MatchRequest {
        MatchRequest {
            title: "demo".into(),
            min_gpu_class: 1,
            max_price_per_hour: None,
            client_rtt_ms: rtts.iter().map(|(r, v)| (r.to_string(), *v)).collect(),
        }
    }

    #[test]
    fn nearest_relay_wins() {
        let nodes = [node("n1", 1.0)];
        let relays = [relay("far", &[("n1", 2.0)]), relay("near", &[("n1", 10.0)])];
        let m = select(&request(&[("far", 80.0), ("near", 5.0)]), &nodes, &relays).unwrap();
        assert_eq!((m.relay.as_str(), m.node.as_str()), ("near", "n1"));
        assert!((m.expected_ms - 18.0).abs() < 1e-9);
        assert!(m.reason.contains("near"), "{}", m.reason);
    }

    #[test]
    fn full_draining_gone_titleless_and_pricey_nodes_are_skipped() {
        let mut full = node("full", 0.1);
        full.sessions = 4;
        let draining = NodeCandidate { state: NodeState::Draining, ..node("draining", 0.1) };
        let gone = NodeCandidate { state: NodeState::Gone, ..node("gone", 0.1) };
        let no_title = NodeCandidate { titles: vec!["other".into()], ..node("no-title", 0.1) };
        let small = NodeCandidate { gpu_class: 0, ..node("small", 0.1) };
        let pricey = node("pricey", 9.0);
        let ok = node("ok", 2.0);
        let nodes = [full, draining, gone, no_title, small, pricey, ok];
        let all: Vec<(&str, f64)> = nodes.iter().map(|n| (n.id.as_str(), 1.0)).collect();
        let relays = [relay("r", &all)];
        let mut req = request(&[("r", 5.0)]);
        req.max_price_per_hour = Some(5.0);
        let m = select(&req, &nodes, &relays).unwrap();
        assert_eq!(m.node, "ok");
        // Without "ok", nothing matches, and the answer says why.
        let err = select(&req, &nodes[..6], &relays).unwrap_err();
        assert_eq!(err.rejected.get("node full"), Some(&1));
        assert_eq!(err.rejected.get("node draining"), Some(&1));
        assert_eq!(err.rejected.get("node gone"), Some(&1));
        assert_eq!(err.rejected.get("node lacks the title"), Some(&1));
        assert_eq!(err.rejected.get("node GPU too small"), Some(&1));
        assert_eq!(err.rejected.get("node over the price limit"), Some(&1));
        assert!(err.to_string().starts_with("no capacity in your region"), "{err}");
    }

    #[test]
    fn ties_go_to_the_cheaper_node() {
        let nodes = [node("dear", 3.0), node("cheap", 1.0)];
        let relays = [relay("r", &[("dear", 10.0), ("cheap", 10.5)])];
        assert_eq!(select(&request(&[("r", 5.0)]), &nodes, &relays).unwrap().node, "cheap");
        // A clear latency win beats price.
        let relays = [relay("r", &[("dear", 10.0), ("cheap", 20.0)])];
        assert_eq!(select(&request(&[("r", 5.0)]), &nodes, &relays).unwrap().node, "dear");
    }

    #[test]
    fn unhealthy_full_or_unmeasured_relays_are_skipped() {
        let nodes = [node("n", 1.0)];
        let sick = RelayCandidate { healthy: false, ..relay("sick", &[("n", 1.0)]) };
        let full = RelayCandidate { viewers: 100, ..relay("full", &[("n", 1.0)]) };
        let blind = relay("blind", &[]);
        let unmeasured = relay("unmeasured", &[("n", 1.0)]);
        let req = request(&[("sick", 1.0), ("full", 1.0), ("blind", 1.0), ("nan", f64::NAN)]);
        let err = select(&req, &nodes, &[sick, full, blind, unmeasured]).unwrap_err();
        assert_eq!(err.rejected.get("relay unhealthy"), Some(&1));
        assert_eq!(err.rejected.get("relay full"), Some(&1));
        assert_eq!(err.rejected.get("relay cannot reach a usable node"), Some(&1));
        assert_eq!(err.rejected.get("relay not measured by the client"), Some(&1));
        assert!(select(&request(&[]), &[], &[]).unwrap_err().summary.contains("no node registered"));
    }

    #[test]
    fn ten_thousand_nodes_still_pick_the_best() {
        let nodes: Vec<NodeCandidate> = (0..10_000).map(|i| node(&format!("n{i}"), 1.0 + (i % 7) as f64)).collect();
        let relays: Vec<RelayCandidate> = (0..10)
            .map(|r| {
                let rtts: Vec<(String, f64)> = nodes
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (n.id.clone(), 5.0 + ((i * 31 + r * 17) % 97) as f64))
                    .collect();
                RelayCandidate { node_rtt_ms: rtts.into_iter().collect(), ..relay(&format!("r{r}"), &[]) }
            })
            .collect();
        let req = request(
            &(0..10)
                .map(|r| (["r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7", "r8", "r9"][r], 3.0))
                .collect::<Vec<_>>(),
        );
        let m = select(&req, &nodes, &relays).unwrap();
        assert!((m.expected_ms - (3.0 + 5.0 + 3.0)).abs() <= TIE_MS, "{m:?}");
    }
}
