//! Matching a player to a relay and a render node: I/O-free, deterministic, explained.
//!
//! The expected click-to-photon of a candidate pair is
//! `client↔relay RTT + relay↔node RTT + the node's expected encode time`; the pair with
//! the lowest wins, among nodes that are ready (not draining or gone), have a free slot,
//! have the title installed, meet the title's GPU class and the player's price limit, and
//! relays that are healthy with room for a viewer. Ties (within [`TIE_MS`]) go to the
//! cheaper node. Every rejection is counted by reason, so "no match" says why.
//!
//! Every relay the player measured is a candidate, not only those already linked to a
//! node: a node links to the relay its session was matched to when the indexer tells it
//! (its heartbeat's answer). Until that relay has measured its RTT to the node, the
//! relay↔node RTT is taken as the farthest any relay of the pool measured to that node
//! ([`NodeCandidate::farthest_rtt_ms`]) — pessimistic, so a measured pair wins unless the
//! player is clearly nearer the other relay.

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
    /// The farthest RTT any relay of the pool measured to it, ms (see [`farthest_rtts`]):
    /// what a relay not linked to it yet is assumed to be. `None`: no relay reaches it.
    pub farthest_rtt_ms: Option<f64>,
}

/// Each node's farthest RTT measured by any of `relays`, ms.
pub fn farthest_rtts<'a>(relays: impl IntoIterator<Item = &'a RelayCandidate>) -> BTreeMap<String, f64> {
    let mut farthest: BTreeMap<String, f64> = BTreeMap::new();
    for relay in relays {
        for (node, rtt) in relay.node_rtt_ms.iter().filter(|(_, r)| r.is_finite() && **r >= 0.0) {
            let far = farthest.entry(node.clone()).or_insert(*rtt);
            *far = far.max(*rtt);
        }
    }
    farthest
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
    /// Whether the relay has measured its RTT to the node (they are linked); `false` when
    /// the relay↔node RTT was estimated and the node is yet to link to the relay.
    pub linked: bool,
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

/// Whether a candidate at `expected` ms and `price` beats the best so far (`(expected,
/// price)`): clearly faster, or as fast (within [`TIE_MS`]) and cheaper.
fn beats(best: Option<(f64, f64)>, expected: f64, price: f64) -> bool {
    match best {
        None => true,
        Some((e, p)) => expected < e - TIE_MS || ((expected - e).abs() <= TIE_MS && price < p),
    }
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
    // (expected, price, relay, node, the relay↔node RTT, measured)
    let mut best: Option<(f64, f64, &RelayCandidate, &NodeCandidate, f64, bool)> = None;
    let mut considered = 0usize;
    // The relays that may take the player, with its RTT to each.
    let mut eligible: Vec<(&RelayCandidate, f64, bool)> = Vec::new();
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
            if beats(best.map(|b| (b.0, b.1)), expected, node.price_per_hour) {
                best = Some((expected, node.price_per_hour, relay, node, *node_rtt, true));
            }
        }
        eligible.push((relay, client_rtt, reachable));
    }
    // The node best reached through a relay not linked to it yet, by its farthest RTT.
    let mut unlinked: Option<(f64, &NodeCandidate, f64)> = None;
    for node in &usable_nodes {
        let Some(rtt) = node.farthest_rtt_ms.filter(|r| r.is_finite() && *r >= 0.0) else { continue };
        let cost = rtt + node.encode_ms.max(0.0);
        if beats(unlinked.map(|(c, n, _)| (c, n.price_per_hour)), cost, node.price_per_hour) {
            unlinked = Some((cost, node, rtt));
        }
    }
    for (relay, client_rtt, reachable) in eligible {
        match unlinked {
            Some((cost, node, rtt)) if !relay.node_rtt_ms.contains_key(&node.id) => {
                considered += 1;
                let expected = client_rtt + cost;
                if beats(best.map(|b| (b.0, b.1)), expected, node.price_per_hour) {
                    best = Some((expected, node.price_per_hour, relay, node, rtt, false));
                }
            }
            _ if !reachable => reject(&mut rejected, "relay cannot reach a usable node"),
            _ => {}
        }
    }
    match best {
        Some((expected_ms, price, relay, node, rtt, linked)) => Ok(Match {
            relay: relay.id.clone(),
            node: node.id.clone(),
            expected_ms,
            reason: format!(
                "lowest expected latency {expected_ms:.1} ms (client→{} {:.1} ms, →{} {rtt:.1} ms{}, encode {:.1} ms) \
                 at {price:.2}/h among {considered} pairs",
                relay.id,
                req.client_rtt_ms.get(&relay.id).copied().unwrap_or_default(),
                node.id,
                if linked { "" } else { " estimated: not linked yet" },
                node.encode_ms
            ),
            linked,
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
            farthest_rtt_ms: None,
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
        let unmeasured = relay("unmeasured", &[]);
        let req = request(&[("sick", 1.0), ("full", 1.0), ("blind", 1.0), ("nan", f64::NAN)]);
        let err = select(&req, &nodes, &[sick, full, blind, unmeasured]).unwrap_err();
        assert_eq!(err.rejected.get("relay unhealthy"), Some(&1));
        assert_eq!(err.rejected.get("relay full"), Some(&1));
        assert_eq!(err.rejected.get("relay cannot reach a usable node"), Some(&1));
        assert_eq!(err.rejected.get("relay not measured by the client"), Some(&1));
        assert!(select(&request(&[]), &[], &[]).unwrap_err().summary.contains("no node registered"));
    }

    #[test]
    fn a_relay_the_node_is_not_linked_to_wins_when_the_player_is_clearly_nearer_it() {
        // The node is linked to "home" and "away" (measured 5 and 30 ms), not to "edge".
        let relays = [relay("home", &[("n", 5.0)]), relay("away", &[("n", 30.0)]), relay("edge", &[])];
        let farthest = farthest_rtts(&relays);
        assert_eq!(farthest.get("n"), Some(&30.0));
        let nodes = [NodeCandidate { farthest_rtt_ms: farthest.get("n").copied(), ..node("n", 1.0) }];
        // The player is 60 ms from home, 40 from away, 2 from edge: edge, by the node's
        // farthest measured RTT (30 ms): 2 + 30 + 3 against 60 + 5 + 3.
        let m = select(&request(&[("home", 60.0), ("away", 40.0), ("edge", 2.0)]), &nodes, &relays).unwrap();
        assert_eq!((m.relay.as_str(), m.linked), ("edge", false), "{m:?}");
        assert!((m.expected_ms - 35.0).abs() < 1e-9, "{m:?}");
        assert!(m.reason.contains("estimated"), "{}", m.reason);
        // Not clearly nearer edge than a linked relay: the measured pair wins (8 + 5 + 3
        // against 2 + 30 + 3).
        let m = select(&request(&[("home", 8.0), ("edge", 2.0)]), &nodes, &relays).unwrap();
        assert_eq!((m.relay.as_str(), m.linked), ("home", true), "{m:?}");
        // A node no relay measured is reached through none.
        let lost = [NodeCandidate { farthest_rtt_ms: None, ..node("n", 1.0) }];
        let err = select(&request(&[("edge", 2.0)]), &lost, &relays).unwrap_err();
        assert_eq!(err.rejected.get("relay cannot reach a usable node"), Some(&1), "{err:?}");
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
