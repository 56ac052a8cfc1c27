//! The edge registry: what each edge last reported, whether it is still alive, and which
//! edges a client should be sent to.
//!
//! Sans-io: every call takes `now: Instant`; nothing here reads a clock or owns a timer.
//! Liveness is computed from `last_seen` on every call, so an edge is out of the assignment
//! list the moment its heartbeat is `edge_ttl` old, with no sweep task to fall behind.
//!
//! Invariants: at most `edges_max` entries; an entry silent for `edge_forget` (≥ `edge_ttl`)
//! is removed on the next call that touches the registry; assignment never returns a dead,
//! draining or full edge; edges learned from peer controls (other regions) never keep an edge
//! that heartbeats here out (the stalest one is forgotten to make room).

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
    /// The peer control (another region's) this edge was learned from; absent for an edge
    /// that heartbeats this control itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
}

/// What an edge of a region is assigned as: the client's own region, or another one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// The first edge is in the client's region.
    Home,
    /// The client's region had no assignable edge (or is unhealthy): another region's first.
    Fallback,
    /// No edge anywhere.
    Empty,
}

/// How [`Registry::assign`] picks edges across regions.
pub struct Plan<'a> {
    /// The client's region.
    pub region: &'a str,
    /// Regions to fall back to, best first (`region_fallbacks`); regions not named follow,
    /// most spare capacity first.
    pub order: &'a [String],
    /// Edges handed out in total.
    pub n: usize,
    /// Of those, how many go to other regions when the client's region has edges (so a
    /// client whose region goes dark has somewhere to go before it asks control again).
    pub fallback_edges: usize,
    /// Whether a region may be assigned at all (its brokers are alive).
    pub region_ok: &'a dyn Fn(&str) -> bool,
}

#[derive(Clone, Debug)]
struct Entry {
    hb: Heartbeat,
    last_seen: Instant,
    /// `Some(peer)`: learned from that peer control's registry, not heartbeated here.
    peer: Option<String>,
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
        self.forget(now);
        self.record(hb, now, None, now)
    }

    /// Records an edge another region's control `peer` heard from `age` ago. An edge that
    /// heartbeats this control more recently keeps its own entry; an entry already older
    /// than `edge_forget` is ignored (the peer is about to forget it too).
    pub fn learn(
        &mut self,
        hb: Heartbeat,
        age: Duration,
        peer: &str,
        now: Instant,
    ) -> Result<(), HeartbeatError> {
        // Older than this clock can say (a host up for less than `age`): not worth keeping.
        match now.checked_sub(age) {
            Some(seen) if age < self.edge_forget => {
                self.record(hb, seen, Some(peer), now).map(|_| ())
            }
            _ => check_fields(&hb),
        }
    }

    /// One entry heard at `seen`, here (`peer` None) or from a peer control. A heartbeat here
    /// always replaces the entry; a peer's word only when it is fresher. True when the edge is
    /// new or back from the dead.
    fn record(
        &mut self,
        hb: Heartbeat,
        seen: Instant,
        peer: Option<&str>,
        now: Instant,
    ) -> Result<bool, HeartbeatError> {
        check_fields(&hb)?;
        let ttl = self.edge_ttl;
        let full = self.edges.len() >= self.edges_max;
        if !self.edges.contains_key(&hb.node_id)
            && full
            && (peer.is_some() || !self.evict_peer_entry())
        {
            return Err(HeartbeatError::Full);
        }
        let fresh = Entry {
            hb,
            last_seen: seen,
            peer: peer.map(str::to_string),
            assigned_since_heartbeat: 0,
        };
        match self.edges.get_mut(&fresh.hb.node_id) {
            Some(e) if peer.is_some() && e.last_seen >= seen => Ok(false),
            Some(e) => {
                let revived = e.state(now, ttl) == EdgeState::Dead;
                *e = fresh;
                Ok(revived)
            }
            None => {
                self.edges.insert(fresh.hb.node_id.clone(), fresh);
                Ok(true)
            }
        }
    }

    /// Makes room for an edge heartbeating here by forgetting the stalest edge learned from a
    /// peer: other regions' edges never crowd out our own. False when there is none.
    fn evict_peer_entry(&mut self) -> bool {
        let stalest = self
            .edges
            .iter()
            .filter(|(_, e)| e.peer.is_some())
            .min_by_key(|(_, e)| e.last_seen)
            .map(|(id, _)| id.clone());
        stalest.is_some_and(|id| self.edges.remove(&id).is_some())
    }

    /// Drops entries silent for `edge_forget`.
    pub fn forget(&mut self, now: Instant) {
        let forget = self.edge_forget;
        self.edges
            .retain(|_, e| now.saturating_duration_since(e.last_seen) < forget);
    }

    /// Up to `plan.n` edges for a client of `plan.region`: that region's assignable edges with
    /// the most spare capacity first, then `plan.fallback_edges` of the next-best regions'
    /// (more when the client's region has fewer than its share); when the client's region has
    /// none, or `plan.region_ok` says it may not be assigned, only other regions'. Regions are
    /// tried in `plan.order`, then by most spare capacity; ties break on names, so the answer
    /// is deterministic. The first edge returned is counted as one more connection until its
    /// next heartbeat.
    pub fn assign(&mut self, plan: &Plan<'_>, now: Instant) -> (Vec<Assigned>, Choice) {
        self.forget(now);
        let ttl = self.edge_ttl;
        // (region, spare, node id) of every assignable edge.
        let mut up: Vec<(&str, u64, &str)> = self
            .edges
            .values()
            .filter(|e| e.state(now, ttl) == EdgeState::Up && (plan.region_ok)(&e.hb.region))
            .map(|e| (e.hb.region.as_str(), e.spare(), e.hb.node_id.as_str()))
            .collect();
        up.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.2.cmp(b.2)));
        let (home, others): (Vec<_>, Vec<_>) = up.into_iter().partition(|e| e.0 == plan.region);
        // Other regions, best first: the configured order, then by total spare capacity.
        let mut regions: Vec<(&str, u64)> = Vec::new();
        for e in &others {
            match regions.iter_mut().find(|r| r.0 == e.0) {
                Some(r) => r.1 = r.1.saturating_add(e.1),
                None => regions.push((e.0, e.1)),
            }
        }
        let rank = |r: &str| plan.order.iter().position(|o| o == r).unwrap_or(usize::MAX);
        regions.sort_by(|a, b| {
            rank(a.0)
                .cmp(&rank(b.0))
                .then_with(|| b.1.cmp(&a.1))
                .then_with(|| a.0.cmp(b.0))
        });
        let fallbacks = regions
            .iter()
            .flat_map(|r| others.iter().filter(move |e| e.0 == r.0));
        let n = plan.n;
        let reserved = if others.is_empty() {
            0
        } else {
            plan.fallback_edges.min(n.saturating_sub(1))
        };
        let mut picked: Vec<String> = home
            .iter()
            .take(n - reserved)
            .map(|e| e.2.to_string())
            .collect();
        let room = if plan.fallback_edges == 0 && !home.is_empty() {
            0
        } else {
            n.saturating_sub(picked.len())
        };
        picked.extend(fallbacks.take(room).map(|e| e.2.to_string()));
        let choice = match (home.is_empty(), picked.is_empty()) {
            (_, true) => Choice::Empty,
            (false, false) => Choice::Home,
            (true, false) => Choice::Fallback,
        };
        if let Some(first) = picked.first().and_then(|id| self.edges.get_mut(id)) {
            first.assigned_since_heartbeat = first.assigned_since_heartbeat.saturating_add(1);
        }
        let out = picked
            .iter()
            .filter_map(|id| self.edges.get(id))
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
            .collect();
        (out, choice)
    }

    /// Whether an edge of `region` is known (alive or not, heard here or from a peer).
    pub fn knows_region(&self, region: &str) -> bool {
        self.edges.values().any(|e| e.hb.region == region)
    }

    /// Up edges per region (for metrics), sorted by region.
    pub fn up_by_region(&self, now: Instant) -> Vec<(String, usize)> {
        let mut out: std::collections::BTreeMap<&str, usize> = Default::default();
        for e in self.edges.values() {
            let n = out.entry(e.hb.region.as_str()).or_default();
            if e.state(now, self.edge_ttl) == EdgeState::Up {
                *n += 1;
            }
        }
        out.into_iter().map(|(r, n)| (r.to_string(), n)).collect()
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
                peer: e.peer.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.heartbeat.node_id.cmp(&b.heartbeat.node_id));
        out
    }

    /// The edges that heartbeat this control itself (what peers of other regions poll),
    /// sorted by node id.
    pub fn local(&mut self, now: Instant) -> Vec<Listed> {
        let mut all = self.list(now);
        all.retain(|l| l.peer.is_none());
        all
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

/// The lengths of a heartbeat's names, heard here or from a peer.
fn check_fields(hb: &Heartbeat) -> Result<(), HeartbeatError> {
    check_field("node_id", &hb.node_id, NODE_ID_BYTES_MAX)?;
    check_field("region", &hb.region, REGION_BYTES_MAX)?;
    check_field("host", &hb.host, HOST_BYTES_MAX)
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

    /// `n` edges for `region`, no edge reserved for other regions, every region healthy.
    fn pick(r: &mut Registry, region: &str, n: usize, now: Instant) -> Vec<Assigned> {
        r.assign(
            &Plan {
                region,
                order: &[],
                n,
                fallback_edges: 0,
                region_ok: &|_| true,
            },
            now,
        )
        .0
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
        let got = pick(&mut r, "sh", 3, t0);
        assert_eq!(ids(&got), ["b", "c", "a"]);
        assert_eq!(got[0].host, "b.example");
        assert_eq!(got[0].region, "sh");
        // Equal spare capacity: node id order (b's heartbeat resets what was counted for it).
        r.heartbeat(hb("b", "sh", 100, 1000), t0).unwrap();
        r.heartbeat(hb("c", "sh", 100, 1000), t0).unwrap();
        assert_eq!(ids(&pick(&mut r, "sh", 2, t0)), ["b", "c"]);
    }

    #[test]
    fn a_connect_burst_spreads_before_the_next_heartbeat() {
        let t0 = Instant::now();
        let mut r = Registry::new(TTL, TTL * 10, 100);
        r.heartbeat(hb("a", "x", 0, 100), t0).unwrap();
        r.heartbeat(hb("b", "x", 2, 100), t0).unwrap();
        let firsts: Vec<String> = (0..6)
            .map(|_| pick(&mut r, "x", 3, t0)[0].node_id.clone())
            .collect();
        // a starts 2 emptier: it takes the first two, then they alternate (ties by node id).
        assert_eq!(firsts, ["a", "a", "a", "b", "a", "b"]);
        // The heartbeat's real load replaces the estimate.
        r.heartbeat(hb("b", "x", 0, 100), t0).unwrap();
        r.heartbeat(hb("a", "x", 50, 100), t0).unwrap();
        assert_eq!(pick(&mut r, "x", 3, t0)[0].node_id, "b");
        // A full edge by estimate is not assigned until its heartbeat says otherwise.
        let mut r = Registry::new(TTL, TTL * 10, 100);
        r.heartbeat(hb("tiny", "x", 0, 2), t0).unwrap();
        assert_eq!(pick(&mut r, "x", 3, t0).len(), 1);
        assert_eq!(pick(&mut r, "x", 3, t0).len(), 1);
        assert_eq!(pick(&mut r, "x", 3, t0), vec![]);
        r.heartbeat(hb("tiny", "x", 1, 2), t0).unwrap();
        assert_eq!(pick(&mut r, "x", 3, t0).len(), 1);
    }

    #[test]
    fn other_regions_only_when_the_region_has_none() {
        let t0 = Instant::now();
        let mut r = Registry::new(TTL, TTL * 10, 100);
        r.heartbeat(hb("bj1", "bj", 0, 10), t0).unwrap();
        r.heartbeat(hb("gz1", "gz", 0, 20), t0).unwrap();
        assert_eq!(ids(&pick(&mut r, "sh", 3, t0)), ["gz1", "bj1"]);
        r.heartbeat(hb("sh1", "sh", 9, 10), t0).unwrap();
        assert_eq!(ids(&pick(&mut r, "sh", 3, t0)), ["sh1"]);
        // A region whose only edge is draining counts as having none.
        let mut d = hb("sh1", "sh", 9, 10);
        d.draining = true;
        r.heartbeat(d, t0).unwrap();
        assert_eq!(ids(&pick(&mut r, "sh", 3, t0)), ["gz1", "bj1"]);
    }

    #[test]
    fn home_region_first_then_the_next_best_regions_as_fallbacks() {
        let t0 = Instant::now();
        let mut r = Registry::new(TTL, TTL * 10, 100);
        for (id, region, conns) in [
            ("sh1", "sh", 0),
            ("sh2", "sh", 5),
            ("sh3", "sh", 7),
            ("bj1", "bj", 0),
            ("gz1", "gz", 0),
            ("gz2", "gz", 1),
        ] {
            r.heartbeat(hb(id, region, conns, 100), t0).unwrap();
        }
        fn run(
            r: &mut Registry,
            order: &[&str],
            fallback_edges: usize,
            ok: &dyn Fn(&str) -> bool,
            now: Instant,
        ) -> (Vec<String>, Choice) {
            let order: Vec<String> = order.iter().map(|s| s.to_string()).collect();
            let (got, choice) = r.assign(
                &Plan {
                    region: "sh",
                    order: &order,
                    n: 3,
                    fallback_edges,
                    region_ok: ok,
                },
                now,
            );
            (got.into_iter().map(|a| a.node_id).collect(), choice)
        }
        // One slot for the region with the most spare capacity (gz: 199 over bj's 100).
        let (got, choice) = run(&mut r, &[], 1, &|_| true, t0);
        assert_eq!(
            (got, choice),
            (vec!["sh1".into(), "sh2".into(), "gz1".into()], Choice::Home)
        );
        // A configured order beats spare capacity.
        let (got, _) = run(&mut r, &["bj"], 2, &|_| true, t0);
        assert_eq!(got, ["sh1", "bj1", "gz1"]);
        // An unhealthy home region (its brokers are gone) is not assigned at all.
        let (got, choice) = run(&mut r, &["bj"], 1, &|r| r != "sh", t0);
        assert_eq!(
            (got, choice),
            (
                vec!["bj1".into(), "gz1".into(), "gz2".into()],
                Choice::Fallback
            )
        );
        // Nothing anywhere.
        assert_eq!(run(&mut r, &[], 1, &|_| false, t0), (vec![], Choice::Empty));
    }

    #[test]
    fn peers_edges_are_learned_but_a_fresher_heartbeat_wins() {
        let t0 = Instant::now();
        let mut r = Registry::new(TTL, TTL * 2, 100);
        r.heartbeat(hb("a1", "a", 0, 10), t0).unwrap();
        r.learn(
            hb("b1", "b", 0, 10),
            Duration::from_millis(500),
            "peer-b:80",
            t0,
        )
        .unwrap();
        // A peer's older word about our own edge changes nothing.
        r.learn(
            hb("a1", "a", 9, 10),
            Duration::from_millis(1),
            "peer-b:80",
            t0,
        )
        .unwrap();
        let listed = r.list(t0);
        assert_eq!(listed[0].heartbeat.connections, 0);
        assert_eq!(listed[0].peer, None);
        assert_eq!(listed[1].peer.as_deref(), Some("peer-b:80"));
        assert_eq!(listed[1].last_seen_ms_ago, 500);
        // Only edges heartbeating here are exported to peers (no loops between regions).
        let local: Vec<_> = r
            .local(t0)
            .into_iter()
            .map(|l| l.heartbeat.node_id)
            .collect();
        assert_eq!(local, ["a1"]);
        // A peer that stops answering: its edges age out like silent ones.
        let later = t0 + TTL;
        r.heartbeat(hb("a1", "a", 0, 10), later).unwrap();
        assert_eq!(ids(&pick(&mut r, "b", 3, later)), ["a1"]);
        assert!(!r.knows_region("c"));
        assert!(r.knows_region("b"));
        // A full registry makes room for an edge heartbeating here by forgetting a peer's.
        let mut small = Registry::new(TTL, TTL * 2, 2);
        small.heartbeat(hb("a1", "a", 0, 10), t0).unwrap();
        small
            .learn(hb("b1", "b", 0, 10), Duration::ZERO, "peer-b:80", t0)
            .unwrap();
        assert_eq!(
            small.learn(hb("b2", "b", 0, 10), Duration::ZERO, "peer-b:80", t0),
            Err(HeartbeatError::Full)
        );
        assert_eq!(small.heartbeat(hb("a2", "a", 0, 10), t0), Ok(true));
        let left: Vec<_> = small
            .list(t0)
            .into_iter()
            .map(|l| l.heartbeat.node_id)
            .collect();
        assert_eq!(left, ["a1", "a2"]);
        assert_eq!(
            small.heartbeat(hb("a3", "a", 0, 10), t0),
            Err(HeartbeatError::Full)
        );
        // Too old to keep: ignored. Bad fields: refused.
        r.learn(hb("b2", "b", 0, 10), TTL * 2, "peer-b:80", t0)
            .unwrap();
        assert_eq!(r.len(), 2);
        assert!(r
            .learn(hb("", "b", 0, 10), Duration::ZERO, "p", t0)
            .is_err());
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
        assert_eq!(ids(&pick(&mut r, "x", 3, t0)), ["ok"]);
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
        assert_eq!(ids(&pick(&mut r, "x", 3, almost)), ["a", "b"]);
        let at_ttl = t0 + TTL;
        assert_eq!(ids(&pick(&mut r, "x", 3, at_ttl)), ["a"]);
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
        assert_eq!(pick(&mut r, "x", 3, late), vec![]);
        assert!(r.heartbeat(hb("a", "x", 0, 10), late).unwrap());
        assert_eq!(ids(&pick(&mut r, "x", 3, late)), ["a"]);
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
