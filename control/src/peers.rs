//! Control across regions (issue 13): each control polls the registry of every other region's
//! control (`peers`) and merges what it hears into its own, so it can send a client to another
//! region's edges when the client's region has none, and tell whether a region's brokers live.
//!
//! Why polling over HTTP rather than a replicated NATS KV bucket: control is not on the
//! message path and does not link to NATS today; a region whose NATS is down (the very
//! failure cross-region assignment exists for) must still be judged by what its control says,
//! and a region whose control is unreachable is judged dark by the same clock that judges a
//! silent edge dead. Each control exports only what heartbeats it directly, so nothing is
//! relayed twice and there is no replication loop to converge (docs/operations-control.md).
//!
//! Sans-io: [`Peers`] records outcomes the shell's poll tasks hand it, with `now` passed in;
//! the registries it feeds are the same sans-io [`crate::registry`] and [`crate::brokers`].
//!
//! Invariants: a peer's word never overrides a fresher heartbeat heard here; an entry is
//! learned with the age the peer reported, so a peer that stops answering has its edges age
//! out like silent ones (no sweep of its own); bad entries are skipped and counted, a bad
//! answer changes nothing.

use crate::brokers::{BrokerBeat, Brokers};
use crate::registry::{Heartbeat, Registry};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// The path peers poll.
pub const REGISTRY_PATH: &str = "/v1/registry";
/// One poll may take this long.
pub const POLL_REQUEST_MS_MAX: u64 = 2_000;
/// A peer is counted up while its last good answer is younger than this many poll intervals.
pub const UP_POLLS: u32 = 3;

/// One edge in a registry export.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportEdge {
    #[serde(flatten)]
    pub heartbeat: Heartbeat,
    pub last_seen_ms_ago: u64,
}

/// One broker in a registry export.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportBroker {
    #[serde(flatten)]
    pub beat: BrokerBeat,
    pub last_seen_ms_ago: u64,
}

/// One token key as peers compare them: its id and fingerprint, never the secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyPrint {
    pub id: u32,
    pub fingerprint: String,
}

/// `GET /v1/registry`: what heartbeats this control directly, for the other regions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Export {
    pub region: String,
    pub edges: Vec<ExportEdge>,
    pub brokers: Vec<ExportBroker>,
    /// The token key set this control signs with (the newest id signs).
    pub token_keys: Vec<KeyPrint>,
}

/// The fingerprints of a key set, as exported.
pub fn key_prints(keys: &proto::token::KeySet) -> Vec<KeyPrint> {
    keys.fingerprints()
        .into_iter()
        .map(|(id, fingerprint)| KeyPrint { id, fingerprint })
        .collect()
}

/// What one peer last said, for metrics and logs.
#[derive(Debug)]
pub struct Peer {
    pub addr: String,
    /// The region the peer said it serves (empty until it answers).
    pub region: String,
    last_ok: Option<Instant>,
    pub polls_ok: u64,
    pub polls_failed: u64,
    /// Entries of its answers refused (bad fields, registry full).
    pub entries_refused: u64,
    /// Whether its token key set equals ours (ids and fingerprints); `None` before it answers.
    pub keys_match: Option<bool>,
    failing: bool,
}

/// Every peer control, in `peers` order.
#[derive(Debug)]
pub struct Peers {
    pub list: Vec<Peer>,
    up_for: Duration,
}

impl Peers {
    pub fn new(addrs: &[String], poll: Duration) -> Peers {
        Peers {
            list: addrs
                .iter()
                .map(|a| Peer {
                    addr: a.clone(),
                    region: String::new(),
                    last_ok: None,
                    polls_ok: 0,
                    polls_failed: 0,
                    entries_refused: 0,
                    keys_match: None,
                    failing: false,
                })
                .collect(),
            up_for: poll * UP_POLLS,
        }
    }

    /// Whether peer `i` answered well within the last [`UP_POLLS`] intervals.
    pub fn up(&self, i: usize, now: Instant) -> bool {
        self.list
            .get(i)
            .and_then(|p| p.last_ok)
            .is_some_and(|t| now.saturating_duration_since(t) < self.up_for)
    }

    /// Takes one poll's outcome: the body of a 200, or why there was none. A good answer is
    /// merged into `edges` and `brokers`; `ours` are this control's key prints.
    pub fn answered(
        &mut self,
        i: usize,
        outcome: Result<Vec<u8>, String>,
        ours: &[KeyPrint],
        edges: &mut Registry,
        brokers: &mut Brokers,
        now: Instant,
    ) {
        let Some(peer) = self.list.get_mut(i) else {
            return;
        };
        let export = outcome.and_then(|body| {
            serde_json::from_slice::<Export>(&body).map_err(|e| format!("bad answer: {e}"))
        });
        let export = match export {
            Ok(x) => x,
            Err(e) => {
                peer.polls_failed += 1;
                if !peer.failing {
                    tracing::warn!(peer = %peer.addr, error = %e, "peer control poll failed; its region ages out if this lasts");
                }
                peer.failing = true;
                return;
            }
        };
        if peer.failing || peer.last_ok.is_none() {
            tracing::info!(peer = %peer.addr, region = %export.region, edges = export.edges.len(), brokers = export.brokers.len(), "peer control answers");
        }
        peer.failing = false;
        peer.polls_ok += 1;
        peer.last_ok = Some(now);
        peer.region = export.region.chars().take(64).collect();
        let matched = export.token_keys == ours;
        if peer.keys_match != Some(matched) && !matched {
            tracing::warn!(peer = %peer.addr, ours = ?ours.iter().map(|k| k.id).collect::<Vec<_>>(), theirs = ?export.token_keys.iter().map(|k| k.id).collect::<Vec<_>>(), "peer control signs with another token key set: tokens of one region may be refused in the other until rotation reaches both");
        }
        peer.keys_match = Some(matched);
        let age = |ms: u64| Duration::from_millis(ms);
        for e in export.edges {
            if edges
                .learn(e.heartbeat, age(e.last_seen_ms_ago), &peer.addr, now)
                .is_err()
            {
                peer.entries_refused += 1;
            }
        }
        for b in export.brokers {
            if brokers
                .learn(b.beat, age(b.last_seen_ms_ago), &peer.addr, now)
                .is_err()
            {
                peer.entries_refused += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(3);

    fn export(region: &str, edge_age_ms: u64) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "region": region,
            "edges": [
                {"node_id": "b-e1", "region": region, "host": "10.2.0.1", "tcp_port": 1, "ws_port": 2,
                 "connections": 0, "capacity": 10, "state": "up", "last_seen_ms_ago": edge_age_ms},
                {"node_id": "", "region": region, "host": "x", "tcp_port": 1, "ws_port": 2,
                 "connections": 0, "capacity": 10, "last_seen_ms_ago": 0}
            ],
            "brokers": [
                {"node_id": "b-b1", "region": region, "link": "10.2.0.2:1", "ingest": "10.2.0.2:2",
                 "http": "http://10.2.0.2:3", "last_seen_ms_ago": 0}
            ],
            "token_keys": [{"id": 1, "fingerprint": "00"}]
        }))
        .unwrap()
    }

    /// Every prefix and every one-byte corruption of a good answer: no panic, and the
    /// registries stay within what a good answer could have put there.
    #[test]
    fn mangled_answers_never_panic() {
        let t0 = Instant::now();
        let good = export("b", 100);
        let ours: [KeyPrint; 0] = [];
        let mut inputs: Vec<Vec<u8>> = (0..good.len()).map(|n| good[..n].to_vec()).collect();
        for i in 0..good.len() {
            for b in [b'"', b'{', b'9', 0xff, b'-'] {
                let mut m = good.clone();
                m[i] = b;
                inputs.push(m);
            }
        }
        for input in inputs {
            let mut peers = Peers::new(&["b:1".into()], Duration::from_secs(1));
            let mut edges = Registry::new(TTL, TTL * 10, 100);
            let mut brokers = Brokers::new(TTL, TTL * 10);
            peers.answered(0, Ok(input), &ours, &mut edges, &mut brokers, t0);
            let p = &peers.list[0];
            assert_eq!(p.polls_ok + p.polls_failed, 1);
            assert!(edges.len() <= 2 && brokers.list(t0).len() <= 1);
        }
    }

    #[test]
    fn a_good_answer_is_merged_a_bad_one_changes_nothing() {
        let t0 = Instant::now();
        let mut peers = Peers::new(&["b:1".into()], Duration::from_secs(1));
        let mut edges = Registry::new(TTL, TTL * 10, 100);
        let mut brokers = Brokers::new(TTL, TTL * 10);
        let ours = [KeyPrint {
            id: 1,
            fingerprint: "00".into(),
        }];
        peers.answered(
            0,
            Err("connection refused".into()),
            &ours,
            &mut edges,
            &mut brokers,
            t0,
        );
        peers.answered(0, Ok(b"{".to_vec()), &ours, &mut edges, &mut brokers, t0);
        assert_eq!((peers.list[0].polls_failed, edges.len()), (2, 0));
        assert!(!peers.up(0, t0));
        peers.answered(0, Ok(export("b", 100)), &ours, &mut edges, &mut brokers, t0);
        let p = &peers.list[0];
        assert_eq!(
            (
                p.polls_ok,
                p.entries_refused,
                p.keys_match,
                p.region.as_str()
            ),
            (1, 1, Some(true), "b")
        );
        assert!(peers.up(0, t0));
        assert!(!peers.up(0, t0 + Duration::from_secs(3)));
        let listed = edges.list(t0);
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].peer.as_deref(), Some("b:1"));
        assert_eq!(listed[0].last_seen_ms_ago, 100);
        assert!(brokers.region_ok("b", t0));
        assert!(!brokers.region_ok("b", t0 + TTL));
        // Another key set: noticed.
        let theirs = [KeyPrint {
            id: 2,
            fingerprint: "11".into(),
        }];
        peers.answered(0, Ok(export("b", 0)), &theirs, &mut edges, &mut brokers, t0);
        assert_eq!(peers.list[0].keys_match, Some(false));
    }
}
