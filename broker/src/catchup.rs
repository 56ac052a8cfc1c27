//! Late enters under `route_by_presence` (sans-io): a user or device batch narrowed away from
//! an edge is kept for a short window, and sent to that edge when it reports an enter for the
//! user or device within the window.
//!
//! Why: an edge reports its connections in batches (`presence_batch_ms` on the edge, plus a
//! link round trip), so a connection that has authenticated is unknown to the broker for up to
//! a report. Narrowing by presence alone lost the best-effort pushes flushed in that time to a
//! fresh connection, which sending to every edge did not. With the catch-up, every batch an
//! edge would have received without narrowing reaches it, provided its enter arrives within
//! `presence_catchup_ms` of the flush (docs/guarantees.md).
//!
//! # Rules
//! - Only batches that narrowing kept from some edge are held; each remembers the nodes that
//!   already have it, and is sent at most once more to any node (no duplicate on an edge).
//! - Per scope, batches are taken in flush order, and the caller (shard 0, which owns user and
//!   device scopes and reads the presence link) sends them before any later batch of the
//!   scope, so an edge never sees a user's batches out of order.
//! - Bounded: a batch older than `window` is dropped; past `bytes_max` body bytes the oldest is
//!   dropped and counted (`dropped_full`).

use crate::batcher::Flush;
use proto::id::Scope;
use proto::link::{PresenceBatch, PresenceKind};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Default `presence_catchup_ms`: twenty of the edge's default 100 ms presence batches.
pub const PRESENCE_CATCHUP_MS: u64 = 2_000;
/// Default `presence_catchup_bytes_max`: body bytes held for late enters.
pub const PRESENCE_CATCHUP_BYTES_MAX: usize = 16 << 20;
/// What one held batch costs beyond its bodies (the flush, its queue entries).
const KEPT_OVERHEAD_BYTES: usize = 128;

struct Kept {
    at: Instant,
    flush: Flush,
    /// Edge nodes that have this batch.
    sent: Vec<String>,
}

/// Counters (read by the metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Batches held for a late enter.
    pub kept: u64,
    /// Sends of a held batch to an edge that reported a late enter.
    pub sent: u64,
    /// Held batches dropped because `bytes_max` was reached before their window ended.
    pub dropped_full: u64,
}

/// The held batches of shard 0. See the module docs.
pub struct Catchup {
    window: Duration,
    bytes_max: usize,
    bytes: usize,
    kept: HashMap<Scope, VecDeque<Kept>>,
    /// Every held batch's scope in flush order (the front of each scope's queue is the oldest
    /// of that scope, so popping here pops there).
    order: VecDeque<Scope>,
    stats: Stats,
}

/// The user and device scopes a presence report enters (a logged-in user's uid, a non-empty
/// device id), in report order.
pub fn entered(batch: &PresenceBatch) -> Vec<Scope> {
    let mut out = Vec::new();
    for e in &batch.events {
        if e.kind != PresenceKind::Enter {
            continue;
        }
        if e.uid.0 != 0 {
            out.push(Scope::User(e.uid));
        }
        if !e.device.0.is_empty() {
            out.push(Scope::Device(e.device.clone()));
        }
    }
    out
}

fn cost(f: &Flush) -> usize {
    f.body_bytes() + KEPT_OVERHEAD_BYTES
}

impl Catchup {
    pub fn new(window: Duration, bytes_max: usize) -> Catchup {
        Catchup {
            window,
            bytes_max,
            bytes: 0,
            kept: HashMap::new(),
            order: VecDeque::new(),
            stats: Stats::default(),
        }
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Body bytes held (plus overhead).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Holds `flush` (a user or device batch that narrowing kept from some edge); `sent` are
    /// the nodes it went to.
    pub fn keep(&mut self, flush: Flush, sent: Vec<String>, now: Instant) {
        self.expire(now);
        if self.window.is_zero() {
            return;
        }
        let scope = flush.scope.clone();
        self.bytes += cost(&flush);
        self.kept.entry(scope.clone()).or_default().push_back(Kept {
            at: now,
            flush,
            sent,
        });
        self.order.push_back(scope);
        self.stats.kept += 1;
        while self.bytes > self.bytes_max && self.pop_oldest() {
            self.stats.dropped_full += 1;
        }
    }

    /// Node `node` reported enters for `scopes`: appends to `out`, per scope in flush order,
    /// every held batch of those scopes it does not have yet, and marks it as sent there.
    pub fn take(&mut self, node: &str, scopes: &[Scope], now: Instant, out: &mut Vec<Flush>) {
        self.expire(now);
        let mut seen: Vec<&Scope> = Vec::with_capacity(scopes.len());
        for scope in scopes {
            if seen.contains(&scope) {
                continue;
            }
            seen.push(scope);
            let Some(q) = self.kept.get_mut(scope) else {
                continue;
            };
            for k in q.iter_mut() {
                if k.sent.iter().any(|n| n == node) {
                    continue;
                }
                k.sent.push(node.to_string());
                out.push(k.flush.clone());
                self.stats.sent += 1;
            }
        }
    }

    /// Drops what is older than the window.
    fn expire(&mut self, now: Instant) {
        loop {
            let Some(scope) = self.order.front() else {
                return;
            };
            let at = self
                .kept
                .get(scope)
                .and_then(|q| q.front())
                .map_or(now, |k| k.at);
            if now.saturating_duration_since(at) < self.window {
                return;
            }
            self.pop_oldest();
        }
    }

    /// Drops the oldest held batch; false when nothing is held.
    fn pop_oldest(&mut self) -> bool {
        let Some(scope) = self.order.pop_front() else {
            return false;
        };
        if let Some(q) = self.kept.get_mut(&scope) {
            if let Some(k) = q.pop_front() {
                self.bytes -= cost(&k.flush);
            }
            if q.is_empty() {
                self.kept.remove(&scope);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::id::{DeviceId, MsgId, Priority, UserId};

    fn flush(scope: Scope, id: u64) -> Flush {
        Flush {
            scope,
            priority: Priority::Low,
            seq: 0,
            msg_ids: vec![MsgId(id)],
            bodies: vec![vec![b'x'; 100]],
            oldest: None,
        }
    }

    fn ids(out: &[Flush]) -> Vec<u64> {
        out.iter().map(|f| f.msg_ids[0].0).collect()
    }

    const U7: Scope = Scope::User(UserId(7));

    #[test]
    fn a_late_enter_takes_its_scopes_batches_in_order_once_per_node() {
        let t0 = Instant::now();
        let mut c = Catchup::new(Duration::from_secs(2), 1 << 20);
        c.keep(flush(U7, 1), vec!["a".into()], t0);
        c.keep(flush(Scope::User(UserId(8)), 2), vec![], t0);
        c.keep(flush(U7, 3), vec![], t0);
        let mut out = Vec::new();
        // "a" had batch 1 already: only 3.
        c.take("a", &[U7], t0, &mut out);
        assert_eq!(ids(&out), vec![3]);
        out.clear();
        c.take("b", &[U7.clone(), U7], t0, &mut out);
        assert_eq!(ids(&out), vec![1, 3]);
        out.clear();
        // A second enter of the same user on the same node: nothing twice.
        c.take("b", &[U7], t0, &mut out);
        c.take("a", &[U7], t0, &mut out);
        assert!(out.is_empty());
        let d = Scope::Device(DeviceId("d".into()));
        c.take("b", &[d], t0, &mut out);
        assert!(out.is_empty());
        assert_eq!(c.stats().sent, 3);
    }

    #[test]
    fn the_window_and_the_byte_bound_drop_the_oldest() {
        let t0 = Instant::now();
        let mut c = Catchup::new(Duration::from_millis(500), 3 * (100 + KEPT_OVERHEAD_BYTES));
        for i in 0..4 {
            c.keep(flush(U7, i), vec![], t0 + Duration::from_millis(100 * i));
        }
        assert_eq!(c.stats().dropped_full, 1);
        let mut out = Vec::new();
        // At 650 ms, batches 0 and 1 (kept at 0 and 100 ms) are past the window.
        c.take("a", &[U7], t0 + Duration::from_millis(650), &mut out);
        assert_eq!(ids(&out), vec![2, 3]);
        c.expire(t0 + Duration::from_secs(5));
        assert_eq!((c.bytes(), c.kept.len(), c.order.len()), (0, 0, 0));
    }

    #[test]
    fn a_zero_window_holds_nothing() {
        let t0 = Instant::now();
        let mut c = Catchup::new(Duration::ZERO, 1 << 20);
        c.keep(flush(U7, 1), vec![], t0);
        let mut out = Vec::new();
        c.take("a", &[U7], t0, &mut out);
        assert!(out.is_empty());
        assert_eq!(c.bytes(), 0);
    }
}
