//! The broker registry (cluster mode, issue 12): which brokers are alive, so edges can link to
//! every one of them without a static list.
//!
//! Brokers started with `control_addr` heartbeat `POST /v1/brokers/heartbeat` every
//! `control_heartbeat_ms`, like edges do; control answers every edge heartbeat with the live
//! brokers of the edge's region, and the edge links to exactly that set (edge `link.rs`).
//! Control's registry is the one source of the broker set (not the backbone's KV bucket):
//! edges already talk to control, and a broker that cannot reach control is one edges could
//! not be told about anyway.
//!
//! Sans-io like [`crate::registry`]: every call takes `now`. Liveness reuses the edge timers
//! (`edge_ttl_ms`, `edge_forget_ms`): a broker silent for `edge_ttl_ms` is no longer listed to
//! edges, which then drop their links to it.
//!
//! Invariants: at most [`BROKERS_MAX`] entries; fields are length-checked; a dead broker is
//! never handed to an edge.

use crate::registry::{HOST_BYTES_MAX, NODE_ID_BYTES_MAX, REGION_BYTES_MAX};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Most brokers one control tracks (a cluster is a handful to a few dozen).
pub const BROKERS_MAX: usize = 1024;

/// What a broker sends every `control_heartbeat_ms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerBeat {
    pub node_id: String,
    pub region: String,
    /// `host:port` edges link to.
    pub link: String,
    /// `host:port` of the ingest socket (for ingest clients and operators).
    pub ingest: String,
    /// `http://host:port` of the push API.
    pub http: String,
    /// Shutting down: edges keep their links until it is gone, no one new should pick it.
    #[serde(default)]
    pub draining: bool,
    /// Cluster mode: its backbone (NATS JetStream) does not take its writes, so it can neither
    /// accept nor deliver. It is not counted for assigning its region (like a draining one);
    /// edges keep their links to it. Absent (false) from embedded brokers.
    #[serde(default)]
    pub backbone_down: bool,
}

/// One broker as an edge learns it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerLink {
    pub node_id: String,
    pub link: String,
}

/// One broker as operators see it (`GET /v1/brokers`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ListedBroker {
    #[serde(flatten)]
    pub beat: BrokerBeat,
    pub alive: bool,
    pub last_seen_ms_ago: u64,
    /// The peer control (another region's) this broker was learned from; absent for a broker
    /// that heartbeats this control itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
}

/// One broker's registry entry.
#[derive(Debug)]
struct Entry {
    beat: BrokerBeat,
    seen: Instant,
    /// `Some(peer)`: learned from that peer control, not heartbeated here.
    peer: Option<String>,
}

/// Why a broker heartbeat was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BrokerBeatError {
    #[error("broker heartbeat field {0} is empty or too long")]
    BadField(&'static str),
    #[error("broker registry full")]
    Full,
}

#[derive(Debug)]
pub struct Brokers {
    entries: HashMap<String, Entry>,
    /// Regions that have had a broker (bounded like `entries`): such a region needs a live
    /// one to be assigned; a region never seen with one runs without (embedded brokers).
    regions_with_brokers: std::collections::BTreeSet<String>,
    ttl: Duration,
    forget: Duration,
}

impl Brokers {
    pub fn new(ttl: Duration, forget: Duration) -> Brokers {
        Brokers {
            entries: HashMap::new(),
            regions_with_brokers: Default::default(),
            ttl,
            forget: forget.max(ttl),
        }
    }

    /// Records a heartbeat; returns whether the broker was new (or back from the dead).
    pub fn heartbeat(&mut self, b: BrokerBeat, now: Instant) -> Result<bool, BrokerBeatError> {
        self.sweep(now);
        self.record(b, now, None, now)
    }

    /// Records a broker another region's control `peer` heard from `age` ago; a fresher
    /// heartbeat here wins, an entry older than the forget time is ignored.
    pub fn learn(
        &mut self,
        b: BrokerBeat,
        age: Duration,
        peer: &str,
        now: Instant,
    ) -> Result<(), BrokerBeatError> {
        // Older than this clock can say (a host up for less than `age`): not worth keeping.
        match now.checked_sub(age) {
            Some(seen) if age < self.forget => self.record(b, seen, Some(peer), now).map(|_| ()),
            _ => check(&b),
        }
    }

    /// One broker heard at `seen`, here (`peer` None) or from a peer control: a heartbeat here
    /// always replaces the entry, a peer's word only when fresher. True when new or revived.
    fn record(
        &mut self,
        b: BrokerBeat,
        seen: Instant,
        peer: Option<&str>,
        now: Instant,
    ) -> Result<bool, BrokerBeatError> {
        check(&b)?;
        let full = self.entries.len() >= BROKERS_MAX;
        if !self.entries.contains_key(&b.node_id)
            && full
            && (peer.is_some() || !self.evict_peer_entry())
        {
            return Err(BrokerBeatError::Full);
        }
        self.note_region(&b.region);
        let ttl = self.ttl;
        let fresh = Entry {
            beat: b,
            seen,
            peer: peer.map(str::to_string),
        };
        match self.entries.get_mut(&fresh.beat.node_id) {
            Some(e) if peer.is_some() && e.seen >= seen => Ok(false),
            Some(e) => {
                let revived = now.saturating_duration_since(e.seen) >= ttl;
                *e = fresh;
                Ok(revived)
            }
            None => {
                self.entries.insert(fresh.beat.node_id.clone(), fresh);
                Ok(true)
            }
        }
    }

    /// Forgets the stalest broker learned from a peer, to make room for one heartbeating here.
    fn evict_peer_entry(&mut self) -> bool {
        let stalest = self
            .entries
            .iter()
            .filter(|(_, e)| e.peer.is_some())
            .min_by_key(|(_, e)| e.seen)
            .map(|(id, _)| id.clone());
        stalest.is_some_and(|id| self.entries.remove(&id).is_some())
    }

    fn note_region(&mut self, region: &str) {
        if !self.regions_with_brokers.contains(region)
            && self.regions_with_brokers.len() < BROKERS_MAX
        {
            self.regions_with_brokers.insert(region.to_string());
        }
    }

    /// Whether `region` may be assigned as far as brokers go: it has a live broker that is not
    /// draining and whose backbone is up, or it never had a broker (its edges run on embedded
    /// brokers control does not see).
    pub fn region_ok(&self, region: &str, now: Instant) -> bool {
        !self.regions_with_brokers.contains(region)
            || self
                .entries
                .values()
                .any(|e| e.beat.region == region && self.serving(e, now))
    }

    /// Alive, not draining, and its backbone up: it can accept and deliver pushes.
    fn serving(&self, e: &Entry, now: Instant) -> bool {
        !e.beat.draining
            && !e.beat.backbone_down
            && now.saturating_duration_since(e.seen) < self.ttl
    }

    /// Whether a broker of `region` was ever heard of.
    pub fn knows_region(&self, region: &str) -> bool {
        self.regions_with_brokers.contains(region)
    }

    /// Every region that has had a broker.
    pub fn regions(&self) -> impl Iterator<Item = &str> {
        self.regions_with_brokers.iter().map(String::as_str)
    }

    fn sweep(&mut self, now: Instant) {
        let forget = self.forget;
        self.entries
            .retain(|_, e| now.saturating_duration_since(e.seen) < forget);
    }

    /// The live brokers of `region` an edge links to, sorted by node id: only brokers that
    /// heartbeat this control (an edge links within its region, whose brokers heartbeat every
    /// control replica of it). Draining brokers stay listed: their links carry what they still
    /// deliver until they stop.
    pub fn links(&self, region: &str, now: Instant) -> Vec<BrokerLink> {
        let mut out: Vec<BrokerLink> = self
            .entries
            .values()
            .filter(|e| {
                e.peer.is_none()
                    && e.beat.region == region
                    && now.saturating_duration_since(e.seen) < self.ttl
            })
            .map(|e| BrokerLink {
                node_id: e.beat.node_id.clone(),
                link: e.beat.link.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        out
    }

    /// Every known broker, sorted by node id.
    pub fn list(&mut self, now: Instant) -> Vec<ListedBroker> {
        self.sweep(now);
        let mut out: Vec<ListedBroker> = self
            .entries
            .values()
            .map(|e| {
                let ago = now.saturating_duration_since(e.seen);
                ListedBroker {
                    beat: e.beat.clone(),
                    alive: ago < self.ttl,
                    last_seen_ms_ago: u64::try_from(ago.as_millis()).unwrap_or(u64::MAX),
                    peer: e.peer.clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.beat.node_id.cmp(&b.beat.node_id));
        out
    }

    /// The brokers that heartbeat this control itself (what peers poll), sorted by node id.
    pub fn local(&mut self, now: Instant) -> Vec<ListedBroker> {
        let mut all = self.list(now);
        all.retain(|b| b.peer.is_none());
        all
    }

    /// Counts for metrics: (alive with a working backbone, alive with its backbone down, dead).
    pub fn counts(&self, now: Instant) -> (usize, usize, usize) {
        let (mut up, mut down) = (0, 0);
        for e in self.entries.values() {
            if now.saturating_duration_since(e.seen) < self.ttl {
                match e.beat.backbone_down {
                    false => up += 1,
                    true => down += 1,
                }
            }
        }
        (up, down, self.entries.len() - up - down)
    }
}

/// Field lengths of a broker beat, heard here or from a peer.
fn check(b: &BrokerBeat) -> Result<(), BrokerBeatError> {
    let field = |name, v: &str, max| {
        if v.is_empty() || v.len() > max {
            Err(BrokerBeatError::BadField(name))
        } else {
            Ok(())
        }
    };
    field("node_id", &b.node_id, NODE_ID_BYTES_MAX)?;
    field("region", &b.region, REGION_BYTES_MAX)?;
    field("link", &b.link, HOST_BYTES_MAX + 6)?;
    field("ingest", &b.ingest, HOST_BYTES_MAX + 6)?;
    field("http", &b.http, HOST_BYTES_MAX + 14)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(id: &str, region: &str) -> BrokerBeat {
        BrokerBeat {
            node_id: id.into(),
            region: region.into(),
            link: format!("10.0.0.1:{}", 7000 + id.len()),
            ingest: "10.0.0.1:7100".into(),
            http: "http://10.0.0.1:7200".into(),
            draining: false,
            backbone_down: false,
        }
    }

    #[test]
    fn edges_learn_live_brokers_of_their_region_and_lose_dead_ones() {
        let t0 = Instant::now();
        let mut r = Brokers::new(Duration::from_secs(3), Duration::from_secs(10));
        assert!(r.heartbeat(beat("b2", "eu"), t0).unwrap());
        assert!(r.heartbeat(beat("b1", "eu"), t0).unwrap());
        assert!(r.heartbeat(beat("b3", "us"), t0).unwrap());
        let ids = |v: Vec<BrokerLink>| v.into_iter().map(|b| b.node_id).collect::<Vec<_>>();
        assert_eq!(ids(r.links("eu", t0)), ["b1", "b2"]);
        // b1 keeps beating, b2 goes silent past the ttl: edges stop being told about it.
        let t1 = t0 + Duration::from_secs(4);
        assert!(!r
            .heartbeat(beat("b1", "eu"), t1 - Duration::from_secs(2))
            .unwrap());
        assert_eq!(ids(r.links("eu", t1)), ["b1"]);
        assert_eq!(r.counts(t1), (1, 0, 2));
        // Back from the dead is reported as new; forgotten after edge_forget.
        assert!(r.heartbeat(beat("b2", "eu"), t1).unwrap());
        let t2 = t1 + Duration::from_secs(11);
        assert!(r.list(t2).is_empty());
    }

    #[test]
    fn a_region_that_had_brokers_needs_a_live_one() {
        let t0 = Instant::now();
        let mut r = Brokers::new(Duration::from_secs(3), Duration::from_secs(10));
        assert!(
            r.region_ok("eu", t0),
            "no broker ever: embedded brokers, fine"
        );
        r.learn(beat("b1", "eu"), Duration::from_secs(1), "peer:1", t0)
            .unwrap();
        assert!(r.region_ok("eu", t0));
        assert!(
            r.links("eu", t0).is_empty(),
            "edges link to brokers heard here only"
        );
        assert!(r.local(t0).is_empty());
        let t1 = t0 + Duration::from_secs(2);
        assert!(!r.region_ok("eu", t1), "its only broker went silent");
        let mut d = beat("b2", "eu");
        d.draining = true;
        r.heartbeat(d, t1).unwrap();
        assert!(!r.region_ok("eu", t1), "draining brokers do not count");
        let mut down = beat("b3", "eu");
        down.backbone_down = true;
        r.heartbeat(down.clone(), t1).unwrap();
        assert!(
            !r.region_ok("eu", t1),
            "nor brokers whose NATS is gone: they can neither accept nor deliver"
        );
        assert_eq!(r.counts(t1), (1, 1, 1), "b2 draining is up, b1 dead");
        assert_eq!(
            r.links("eu", t1).len(),
            2,
            "edges keep their links to both (draining, backbone down)"
        );
        down.backbone_down = false;
        r.heartbeat(down, t1).unwrap();
        assert!(r.region_ok("eu", t1), "its backbone is back");
        // Forgotten brokers still leave the region needing one.
        let t2 = t1 + Duration::from_secs(11);
        assert!(r.list(t2).is_empty());
        assert!(!r.region_ok("eu", t2));
        assert!(r.knows_region("eu"));
    }

    #[test]
    fn bad_fields_are_refused() {
        let mut r = Brokers::new(Duration::from_secs(3), Duration::from_secs(10));
        let mut b = beat("b1", "eu");
        b.link = String::new();
        assert_eq!(
            r.heartbeat(b, Instant::now()),
            Err(BrokerBeatError::BadField("link"))
        );
        let mut b = beat("b1", "eu");
        b.node_id = "x".repeat(NODE_ID_BYTES_MAX + 1);
        assert_eq!(
            r.heartbeat(b, Instant::now()),
            Err(BrokerBeatError::BadField("node_id"))
        );
    }
}
