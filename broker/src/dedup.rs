//! Idempotent pushes: a push carrying an idempotency key (ingest `KeyedPush`, HTTP
//! `Idempotency-Key`) is remembered with its msg id for `idempotency_window_ms`; the same key
//! from the same API key again within the window gets that msg id back and is not queued twice.
//! Sans-io: takes `now`.
//!
//! Invariants:
//! - Only accepted pushes are remembered: a refused one (rate, size, overload) may be retried
//!   with the same key and is judged afresh.
//! - The table holds at most `keys_max` entries; when it is full of unexpired entries a new
//!   keyed push is refused `Overloaded` (retry later), never accepted without its key, so a
//!   retry can never become a silent duplicate.
//! - Entries expire in insertion order, so expiry is a pop from the front.

use crate::policy::KeyId;
use proto::id::MsgId;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

type Entry = (KeyId, String);

/// The remembered keyed pushes of one shard.
#[derive(Debug)]
pub struct Dedup {
    by_key: HashMap<Entry, MsgId>,
    order: VecDeque<(Instant, Entry)>,
    window: Duration,
    keys_max: usize,
}

/// What to do with a keyed push.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// Already accepted within the window: answer with this msg id, queue nothing.
    Before(MsgId),
    /// New: accept it, then [`Dedup::remember`] it.
    New,
    /// The table is full of live entries: refuse (`Overloaded`).
    Full,
}

impl Dedup {
    pub fn new(window_ms: u64, keys_max: usize) -> Dedup {
        Dedup {
            by_key: HashMap::new(),
            order: VecDeque::new(),
            window: Duration::from_millis(window_ms),
            keys_max,
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            if now.saturating_duration_since(*at) < self.window {
                break;
            }
            if let Some((_, entry)) = self.order.pop_front() {
                self.by_key.remove(&entry);
            }
        }
    }

    /// Looks a key up.
    pub fn check(&mut self, api_key: KeyId, idem: &str, now: Instant) -> Seen {
        self.expire(now);
        if let Some(id) = self.by_key.get(&(api_key, idem.to_string())) {
            return Seen::Before(*id);
        }
        if self.by_key.len() >= self.keys_max {
            return Seen::Full;
        }
        Seen::New
    }

    /// Remembers an accepted keyed push.
    pub fn remember(&mut self, api_key: KeyId, idem: &str, msg_id: MsgId, now: Instant) {
        let entry = (api_key, idem.to_string());
        if self.by_key.insert(entry.clone(), msg_id).is_none() {
            self.order.push_back((now, entry));
        }
    }

    /// Keys remembered now.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(n: usize) -> KeyId {
        KeyId::for_tests(n)
    }

    #[test]
    fn a_retry_within_the_window_gets_the_first_id() {
        let t0 = Instant::now();
        let mut d = Dedup::new(1_000, 10);
        assert_eq!(d.check(k(0), "a", t0), Seen::New);
        d.remember(k(0), "a", MsgId(7), t0);
        assert_eq!(
            d.check(k(0), "a", t0 + Duration::from_millis(999)),
            Seen::Before(MsgId(7))
        );
        // Another API key's "a" is another push.
        assert_eq!(d.check(k(1), "a", t0), Seen::New);
        // After the window it is new again, and forgotten.
        assert_eq!(
            d.check(k(0), "a", t0 + Duration::from_millis(1_000)),
            Seen::New
        );
        assert!(d.is_empty());
    }

    #[test]
    fn a_full_table_refuses_instead_of_forgetting() {
        let t0 = Instant::now();
        let mut d = Dedup::new(1_000, 2);
        d.remember(k(0), "a", MsgId(1), t0);
        d.remember(k(0), "b", MsgId(2), t0);
        assert_eq!(d.check(k(0), "c", t0), Seen::Full);
        assert_eq!(d.check(k(0), "a", t0), Seen::Before(MsgId(1)));
        assert_eq!(d.check(k(0), "c", t0 + Duration::from_secs(2)), Seen::New);
        assert_eq!(d.len(), 0);
    }
}
