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
    entries: HashMap<String, (BrokerBeat, Instant)>,
    ttl: Duration,
    forget: Duration,
}

impl Brokers {
    pub fn new(ttl: Duration, forget: Duration) -> Brokers {
        Brokers {
            entries: HashMap::new(),
            ttl,
            forget: forget.max(ttl),
        }
    }

    /// Records a heartbeat; returns whether the broker was new (or back from the dead).
    pub fn heartbeat(&mut self, b: BrokerBeat, now: Instant) -> Result<bool, BrokerBeatError> {
        let check = |name, v: &str, max| {
            if v.is_empty() || v.len() > max {
                Err(BrokerBeatError::BadField(name))
            } else {
                Ok(())
            }
        };
        check("node_id", &b.node_id, NODE_ID_BYTES_MAX)?;
        check("region", &b.region, REGION_BYTES_MAX)?;
        check("link", &b.link, HOST_BYTES_MAX + 6)?;
        check("ingest", &b.ingest, HOST_BYTES_MAX + 6)?;
        check("http", &b.http, HOST_BYTES_MAX + 14)?;
        self.sweep(now);
        let ttl = self.ttl;
        let full = self.entries.len() >= BROKERS_MAX;
        match self.entries.get_mut(&b.node_id) {
            Some(e) => {
                let revived = now.saturating_duration_since(e.1) >= ttl;
                *e = (b, now);
                Ok(revived)
            }
            None if full => Err(BrokerBeatError::Full),
            None => {
                self.entries.insert(b.node_id.clone(), (b, now));
                Ok(true)
            }
        }
    }

    fn sweep(&mut self, now: Instant) {
        let forget = self.forget;
        self.entries
            .retain(|_, e| now.saturating_duration_since(e.1) < forget);
    }

    /// The live brokers of `region` an edge links to, sorted by node id. Draining brokers stay
    /// listed: their links carry what they still deliver until they stop.
    pub fn links(&self, region: &str, now: Instant) -> Vec<BrokerLink> {
        let mut out: Vec<BrokerLink> = self
            .entries
            .values()
            .filter(|(b, seen)| {
                b.region == region && now.saturating_duration_since(*seen) < self.ttl
            })
            .map(|(b, _)| BrokerLink {
                node_id: b.node_id.clone(),
                link: b.link.clone(),
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
            .map(|(b, seen)| {
                let ago = now.saturating_duration_since(*seen);
                ListedBroker {
                    beat: b.clone(),
                    alive: ago < self.ttl,
                    last_seen_ms_ago: u64::try_from(ago.as_millis()).unwrap_or(u64::MAX),
                }
            })
            .collect();
        out.sort_by(|a, b| a.beat.node_id.cmp(&b.beat.node_id));
        out
    }

    /// (alive, dead) counts for metrics.
    pub fn counts(&self, now: Instant) -> (usize, usize) {
        let alive = self
            .entries
            .values()
            .filter(|(_, seen)| now.saturating_duration_since(*seen) < self.ttl)
            .count();
        (alive, self.entries.len() - alive)
    }
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
        assert_eq!(r.counts(t1), (1, 2));
        // Back from the dead is reported as new; forgotten after edge_forget.
        assert!(r.heartbeat(beat("b2", "eu"), t1).unwrap());
        let t2 = t1 + Duration::from_secs(11);
        assert!(r.list(t2).is_empty());
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
