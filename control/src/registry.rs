//! The edge registry: what each edge last reported, whether it is still alive, and which
//! edges a client should be sent to.
//!
//! Sans-io: every call takes `now: Instant`; nothing here reads a clock or owns a timer.
//! Liveness is computed from `last_seen` on every call, so an edge is out of the assignment
//! list the moment its heartbeat is `edge_ttl` old, with no sweep task to fall behind.
//!
//! Invariants: at most `edges_max` entries; an entry silent for `edge_forget` (≥ `edge_ttl`)
//! is removed on the next call that touches the registry; assignment never returns a dead,
//! draining or full edge.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Longest node id, region name and host name accepted in a heartbeat.
pub const NODE_ID_BYTES_MAX: usize = 64;
pub const REGION_BYTES_MAX: usize = 64;
pub const HOST_BYTES_MAX: usize = 255;

/// What an edge sends every `control_heartbeat_ms` (`POST /v1/edges/heartbeat`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub node_id: String,
    pub region: String,
    /// The host clients should connect to (public name or address).
    pub host: String,
    pub tcp_port: u16,
    pub ws_port: u16,
    /// 0 when the edge has no WSS listener.
    #[serde(default)]
    pub wss_port: u16,
    /// 0 when the edge serves no TLS over raw TCP (`tls_tcp_addr`).
    #[serde(default)]
    pub tls_tcp_port: u16,
    /// 0 when the edge serves no UDP (`udp_addr`, docs/protocol-udp.md).
    #[serde(default)]
    pub udp_port: u16,
    /// Client connections open now.
    pub connections: u64,
    /// Connections the edge can hold in total (from its fd limit and config).
    pub capacity: u64,
    /// The edge is shutting down or being drained by ops: keep existing clients, send no new ones.
    #[serde(default)]
    pub draining: bool,
}

/// Why a heartbeat was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeartbeatError {
    /// Empty or too long node id, region or host. The edge's fault; fix its config.
    #[error("heartbeat field {0} is empty or too long")]
    BadField(&'static str),
    /// A new edge would exceed `edges_max`. Ours: raise the limit or forget dead edges sooner.
    #[error("edge registry full")]
    Full,
}

/// An edge's state as listed by `GET /v1/edges`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EdgeState {
    /// Heartbeating, not draining, has spare capacity: assignable.
    Up,
    /// Heartbeating but asked not to get new clients.
    Draining,
    /// Heartbeating, no spare capacity.
    Full,
    /// No heartbeat within `edge_ttl`; listed until forgotten.
    Dead,
}

/// One edge handed to a client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Assigned {
    pub node_id: String,
    pub host: String,
    pub tcp_port: u16,
    pub ws_port: u16,
    pub wss_port: u16,
    /// 0: not served.
    pub tls_tcp_port: u16,
    /// 0: not served.
    pub udp_port: u16,
    pub region: String,
}

/// One edge as listed for operators.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Listed {
    #[serde(flatten)]
    pub heartbeat: Heartbeat,
    pub state: EdgeState,
    pub last_seen_ms_ago: u64,
    /// Clients sent here as first choice since its last heartbeat (counted into its load).
    pub assigned_since_heartbeat: u64,
}

#[derive(Clone, Debug)]
struct Entry {
    hb: Heartbeat,
    last_seen: Instant,
    /// Clients sent here as first choice since the last heartbeat. The heartbeat's load is up
    /// to `control_heartbeat_ms` old; counting our own assignments keeps a connect burst from
    /// all landing on the one edge that looked emptiest at the last report.
    assigned_since_heartbeat: u64,
}

impl Entry {
    fn spare(&self) -> u64 {
        self.hb
            .capacity
            .saturating_sub(self.hb.connections)
            .saturating_sub(self.assigned_since_heartbeat)
    }

    fn state(&self, now: Instant, ttl: Duration) -> EdgeState {
        if now.saturating_duration_since(self.last_seen) >= ttl {
            EdgeState::Dead
        } else if self.hb.draining {
            EdgeState::Draining
        } else if self.spare() == 0 {
            EdgeState::Full
        } else {
            EdgeState::Up
        }
    }
}

/// The live list of edges.
#[derive(Debug)]
pub struct Registry {
    edges: HashMap<String, Entry>,
    edge_ttl: Duration,
    edge_forget: Duration,
    edges_max: usize,
}

impl Registry {
    /// `edge_forget` below `edge_ttl` is raised to it (an edge is dead before it is forgotten).
    pub fn new(edge_ttl: Duration, edge_forget: Duration, edges_max: usize) -> Registry {
        Registry {
            edges: HashMap::new(),
            edge_ttl,
            edge_forget: edge_forget.max(edge_ttl),
            edges_max,
        }
    }

    /// Records a heartbeat; returns whether the edge was new (or back from the dead).
    pub fn heartbeat(&mut self, hb: Heartbeat, now: Instant) -> Result<bool, HeartbeatError> {
        check_field("node_id", &hb.node_id, NODE_ID_BYTES_MAX)?;
        check_field("region", &hb.region, REGION_BYTES_MAX)?;
        check_field("host", &hb.host, HOST_BYTES_MAX)?;
        self.forget(now);
        let ttl = self.edge_ttl;
        match self.edges.get_mut(&hb.node_id) {
            Some(e) => {
                let revived = e.state(now, ttl) == EdgeState::Dead;
                e.hb = hb;
                e.last_seen = now;
                e.assigned_since_heartbeat = 0;
                Ok(revived)
            }
            None => {
                if self.edges.len() >= self.edges_max {
                    return Err(HeartbeatError::Full);
                }
                self.edges.insert(
                    hb.node_id.clone(),
                    Entry {
                        hb,
                        last_seen: now,
                        assigned_since_heartbeat: 0,
                    },
                );
                Ok(true)
            }
        }
    }

    /// Drops entries silent for `edge_forget`.
    pub fn forget(&mut self, now: Instant) {
        let forget = self.edge_forget;
        self.edges
            .retain(|_, e| now.saturating_duration_since(e.last_seen) < forget);
    }

    /// Up to `n` edges for a client of `region`: that region's assignable edges with the most
    /// spare capacity first; when the region has none, every other region's, the same way.
    /// Ties break on node id so the answer is deterministic. The first edge returned is counted
    /// as one more connection until its next heartbeat.
    pub fn assign(&mut self, region: &str, n: usize, now: Instant) -> Vec<Assigned> {
        self.forget(now);
        let ttl = self.edge_ttl;
        let mut up: Vec<&mut Entry> = self
            .edges
            .values_mut()
            .filter(|e| e.state(now, ttl) == EdgeState::Up)
            .collect();
        if up.iter().any(|e| e.hb.region == region) {
            up.retain(|e| e.hb.region == region);
        }
        up.sort_by(|a, b| {
            b.spare()
                .cmp(&a.spare())
                .then_with(|| a.hb.node_id.cmp(&b.hb.node_id))
        });
        up.truncate(n);
        if let Some(first) = up.first_mut() {
            first.assigned_since_heartbeat = first.assigned_since_heartbeat.saturating_add(1);
        }
        up.iter()
            .map(|e| Assigned {
                node_id: e.hb.node_id.clone(),
                host: e.hb.host.clone(),
                tcp_port: e.hb.tcp_port,
                ws_port: e.hb.ws_port,
                wss_port: e.hb.wss_port,
                tls_tcp_port: e.hb.tls_tcp_port,
                udp_port: e.hb.udp_port,
                region: e.hb.region.clone(),
            })
            .collect()
    }

    /// Every known edge with its state, sorted by node id.
    pub fn list(&mut self, now: Instant) -> Vec<Listed> {
        self.forget(now);
        let ttl = self.edge_ttl;
        let mut out: Vec<Listed> = self
            .edges
            .values()
            .map(|e| Listed {
                heartbeat: e.hb.clone(),
                state: e.state(now, ttl),
                last_seen_ms_ago: u64::try_from(
                    now.saturating_duration_since(e.last_seen).as_millis(),
                )
                .unwrap_or(u64::MAX),
                assigned_since_heartbeat: e.assigned_since_heartbeat,
            })
            .collect();
        out.sort_by(|a, b| a.heartbeat.node_id.cmp(&b.heartbeat.node_id));
        out
    }

    /// Edge count per state, for metrics.
    pub fn counts(&self, now: Instant) -> [(EdgeState, usize); 4] {
        let mut c = [
            (EdgeState::Up, 0),
            (EdgeState::Draining, 0),
            (EdgeState::Full, 0),
            (EdgeState::Dead, 0),
        ];
        for e in self.edges.values() {
            let s = e.state(now, self.edge_ttl);
            for slot in c.iter_mut() {
                if slot.0 == s {
                    slot.1 += 1;
                }
            }
        }
        c
    }

    pub fn len(&self) -> usize {
        self.edges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.edges.is_empty()
    }
}

fn check_field(name: &'static str, v: &str, max: usize) -> Result<(), HeartbeatError> {
    if v.is_empty() || v.len() > max {
        return Err(HeartbeatError::BadField(name));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_millis(6000);

    fn hb(id: &str, region: &str, connections: u64, capacity: u64) -> Heartbeat {
        Heartbeat {
            node_id: id.into(),
            region: region.into(),
            host: format!("{id}.example"),
            tcp_port: 2243,
            ws_port: 2244,
            wss_port: 0,
            tls_tcp_port: 0,
            udp_port: 0,
            connections,
            capacity,
            draining: false,
        }
    }

    fn ids(v: &[Assigned]) -> Vec<&str> {
        v.iter().map(|a| a.node_id.as_str()).collect()
    }

    #[test]
    fn most_spare_capacity_first_up_to_n() {
        let t0 = Instant::now();
        let mut r = Registry::new(TTL, TTL * 10, 100);
        r.heartbeat(hb("a", "sh", 900, 1000), t0).unwrap();
        r.heartbeat(hb("b", "sh", 100, 1000), t0).unwrap();
        r.heartbeat(hb("c", "sh", 500, 1000), t0).unwrap();
        r.heartbeat(hb("d", "sh", 0, 50), t0).unwrap();
        r.heartbeat(hb("e", "bj", 0, 100_000), t0).unwrap();
        let got = r.assign("sh", 3, t0);
        assert_eq!(ids(&got), ["b", "c", "a"]);
        assert_eq!(got[0].host, "b.example");
        assert_eq!(got[0].region, "sh");
        // Equal spare capacity: node id order (b's heartbeat resets what was counted for it).
        r.heartbeat(hb("b", "sh", 100, 1000), t0).unwrap();
        r.heartbeat(hb("c", "sh", 100, 1000), t0).unwrap();
        assert_eq!(ids(&r.assign("sh", 2, t0)), ["b", "c"]);
    }

    #[test]
    fn a_connect_burst_spreads_before_the_next_heartbeat() {
        let t0 = Instant::now();
        let mut r = Registry::new(TTL, TTL * 10, 100);
        r.heartbeat(hb("a", "x", 0, 100), t0).unwrap();
        r.heartbeat(hb("b", "x", 2, 100), t0).unwrap();
        let firsts: Vec<String> = (0..6)
            .map(|_| r.assign("x", 3, t0)[0].node_id.clone())
            .collect();
        // a starts 2 emptier: it takes the first two, then they alternate (ties by node id).
        assert_eq!(firsts, ["a", "a", "a", "b", "a", "b"]);
        // The heartbeat's real load replaces the estimate.
        r.heartbeat(hb("b", "x", 0, 100), t0).unwrap();
        r.heartbeat(hb("a", "x", 50, 100), t0).unwrap();
        assert_eq!(r.assign("x", 3, t0)[0].node_id, "b");
        // A full edge by estimate is not assigned until its heartbeat says otherwise.
        let mut r = Registry::new(TTL, TTL * 10, 100);
        r.heartbeat(hb("tiny", "x", 0, 2), t0).unwrap();
        assert_eq!(r.assign("x", 3, t0).len(), 1);
        assert_eq!(r.assign("x", 3, t0).len(), 1);
        assert_eq!(r.assign("x", 3, t0), vec![]);
        r.heartbeat(hb("tiny", "x", 1, 2), t0).unwrap();
        assert_eq!(r.assign("x", 3, t0).len(), 1);
    }

    #[test]
    fn other_regions_only_when_the_region_has_none() {
        let t0 = Instant::now();
        let mut r = Registry::new(TTL, TTL * 10, 100);
        r.heartbeat(hb("bj1", "bj", 0, 10), t0).unwrap();
        r.heartbeat(hb("gz1", "gz", 0, 20), t0).unwrap();
        assert_eq!(ids(&r.assign("sh", 3, t0)), ["gz1", "bj1"]);
        r.heartbeat(hb("sh1", "sh", 9, 10), t0).unwrap();
        assert_eq!(ids(&r.assign("sh", 3, t0)), ["sh1"]);
        // A region whose only edge is draining counts as having none.
        let mut d = hb("sh1", "sh", 9, 10);
        d.draining = true;
        r.heartbeat(d, t0).unwrap();
        assert_eq!(ids(&r.assign("sh", 3, t0)), ["gz1", "bj1"]);
    }

    #[test]
    fn draining_and_full_edges_are_not_assigned() {
        let t0 = Instant::now();
        let mut r = Registry::new(TTL, TTL * 10, 100);
        let mut d = hb("drain", "x", 0, 1000);
        d.draining = true;
        r.heartbeat(d, t0).unwrap();
        r.heartbeat(hb("full", "x", 1000, 1000), t0).unwrap();
        r.heartbeat(hb("over", "x", 1200, 1000), t0).unwrap();
        r.heartbeat(hb("ok", "x", 990, 1000), t0).unwrap();
        assert_eq!(ids(&r.assign("x", 3, t0)), ["ok"]);
        let states: Vec<(String, EdgeState)> = r
            .list(t0)
            .into_iter()
            .map(|l| (l.heartbeat.node_id, l.state))
            .collect();
        assert_eq!(
            states,
            [
                ("drain".to_string(), EdgeState::Draining),
                ("full".to_string(), EdgeState::Full),
                ("ok".to_string(), EdgeState::Up),
                ("over".to_string(), EdgeState::Full),
            ]
        );
    }

    #[test]
    fn silent_edges_expire_then_are_forgotten_and_can_come_back() {
        let t0 = Instant::now();
        let mut r = Registry::new(TTL, TTL * 2, 100);
        assert!(r.heartbeat(hb("a", "x", 0, 10), t0).unwrap());
        assert!(!r
            .heartbeat(hb("a", "x", 0, 10), t0 + Duration::from_millis(1000))
            .unwrap());
        r.heartbeat(hb("b", "x", 5, 10), t0).unwrap();
        // b's last heartbeat is at t0: alive just before the TTL, dead at it.
        let almost = t0 + TTL - Duration::from_millis(1);
        assert_eq!(ids(&r.assign("x", 3, almost)), ["a", "b"]);
        let at_ttl = t0 + TTL;
        assert_eq!(ids(&r.assign("x", 3, at_ttl)), ["a"]);
        let listed = r.list(at_ttl);
        assert_eq!(listed[1].heartbeat.node_id, "b");
        assert_eq!(listed[1].state, EdgeState::Dead);
        assert_eq!(listed[1].last_seen_ms_ago, 6000);
        assert_eq!(r.counts(at_ttl)[3], (EdgeState::Dead, 1));
        // Forgotten after edge_forget.
        r.list(t0 + TTL * 2);
        assert_eq!(r.len(), 1);
        // A dead edge that heartbeats again is assignable again and reported as revived.
        let late = t0 + Duration::from_millis(1000) + TTL;
        assert_eq!(r.assign("x", 3, late), vec![]);
        assert!(r.heartbeat(hb("a", "x", 0, 10), late).unwrap());
        assert_eq!(ids(&r.assign("x", 3, late)), ["a"]);
    }

    #[test]
    fn limits_and_bad_fields() {
        let t0 = Instant::now();
        let mut r = Registry::new(TTL, TTL, 2);
        r.heartbeat(hb("a", "x", 0, 10), t0).unwrap();
        r.heartbeat(hb("b", "x", 0, 10), t0).unwrap();
        assert_eq!(
            r.heartbeat(hb("c", "x", 0, 10), t0),
            Err(HeartbeatError::Full)
        );
        // Updating a known edge is fine when full.
        assert_eq!(r.heartbeat(hb("a", "x", 1, 10), t0), Ok(false));
        // Once the others are forgotten there is room again.
        assert_eq!(r.heartbeat(hb("c", "x", 0, 10), t0 + TTL), Ok(true));
        assert_eq!(
            r.heartbeat(hb("", "x", 0, 10), t0),
            Err(HeartbeatError::BadField("node_id"))
        );
        assert_eq!(
            r.heartbeat(hb(&"n".repeat(65), "x", 0, 10), t0),
            Err(HeartbeatError::BadField("node_id"))
        );
        assert_eq!(
            r.heartbeat(hb("z", "", 0, 10), t0),
            Err(HeartbeatError::BadField("region"))
        );
        let mut h = hb("z", "x", 0, 10);
        h.host.clear();
        assert_eq!(r.heartbeat(h, t0), Err(HeartbeatError::BadField("host")));
    }
}
