//! A hashed timing wheel: auth deadlines, heartbeat timeouts, stuck and handshake deadlines.
//!
//! Sans-io: time is whatever `now` the caller passes. Insert is O(1) (push into the slot of the
//! deadline's tick); cancel is O(1) and lazy: entries carry generation-checked connection ids
//! (see [`crate::shard`]), so the owner simply ignores an expired entry whose connection is gone
//! or whose deadline moved. That keeps a heartbeat O(1) too: it only updates the connection's
//! `last_seen`, and the heartbeat entry re-arms itself when it fires early.
//!
//! Invariants: an entry never fires before its deadline (deadlines round *up* to the next
//! tick); it fires at the first `advance` whose `now` is at or past its tick; entries whose
//! deadline lies beyond one revolution stay in their slot until their tick comes round.

use std::time::{Duration, Instant};

/// Slots per revolution; a power of two so the slot is a mask of the tick.
const SLOTS: usize = 512;

/// A timing wheel of items `T` (small copyable ids).
#[derive(Debug)]
pub struct Wheel<T> {
    start: Instant,
    tick_ms: u64,
    /// The last tick processed by `advance`.
    current: u64,
    slots: Vec<Vec<(u64, T)>>,
    len: usize,
}

impl<T: Copy> Wheel<T> {
    /// A wheel with the given resolution, starting at `start`.
    pub fn new(start: Instant, tick: Duration) -> Self {
        let tick_ms = (tick.as_millis() as u64).max(1);
        Wheel {
            start,
            tick_ms,
            current: 0,
            slots: (0..SLOTS).map(|_| Vec::new()).collect(),
            len: 0,
        }
    }

    /// Entries waiting (including lazily cancelled ones).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Milliseconds from `start` to the last tick processed.
    pub fn current_tick_ms(&self) -> u64 {
        self.current * self.tick_ms
    }

    fn tick_of_ceil(&self, t: Instant) -> u64 {
        let ms = t.saturating_duration_since(self.start).as_millis() as u64;
        ms.div_ceil(self.tick_ms)
    }

    fn tick_of_floor(&self, t: Instant) -> u64 {
        let ms = t.saturating_duration_since(self.start).as_millis() as u64;
        ms / self.tick_ms
    }

    /// Schedules `item` at `deadline`. A deadline already past fires on the next `advance`.
    pub fn insert(&mut self, deadline: Instant, item: T) {
        let tick = self.tick_of_ceil(deadline).max(self.current + 1);
        self.slots[(tick as usize) & (SLOTS - 1)].push((tick, item));
        self.len += 1;
    }

    /// Moves time to `now`, appending every item whose deadline has passed to `out`.
    pub fn advance(&mut self, now: Instant, out: &mut Vec<T>) {
        let target = self.tick_of_floor(now);
        if target <= self.current {
            return;
        }
        let steps = (target - self.current).min(SLOTS as u64);
        for i in 1..=steps {
            let slot = ((self.current + i) as usize) & (SLOTS - 1);
            let entries = &mut self.slots[slot];
            let mut j = 0;
            while j < entries.len() {
                if entries[j].0 <= target {
                    let (_, item) = entries.swap_remove(j);
                    out.push(item);
                    self.len -= 1;
                } else {
                    j += 1;
                }
            }
            // A burst of timers (a mass connect) must not pin memory forever.
            if entries.is_empty() && entries.capacity() > 64 {
                entries.shrink_to(8);
            }
        }
        self.current = target;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_at_deadline_not_before() {
        let t0 = Instant::now();
        let mut w = Wheel::new(t0, Duration::from_millis(10));
        w.insert(t0 + Duration::from_millis(95), 1u32);
        w.insert(t0 + Duration::from_millis(10), 2u32);
        let mut out = Vec::new();
        w.advance(t0 + Duration::from_millis(9), &mut out);
        assert!(out.is_empty());
        w.advance(t0 + Duration::from_millis(10), &mut out);
        assert_eq!(out, vec![2]);
        out.clear();
        w.advance(t0 + Duration::from_millis(99), &mut out);
        assert!(out.is_empty(), "95 ms rounds up to tick 10 (100 ms)");
        w.advance(t0 + Duration::from_millis(100), &mut out);
        assert_eq!(out, vec![1]);
        assert!(w.is_empty());
    }

    #[test]
    fn beyond_one_revolution_and_big_jumps() {
        let t0 = Instant::now();
        let tick = Duration::from_millis(1);
        let mut w = Wheel::new(t0, tick);
        // Same slot, different revolutions.
        w.insert(t0 + Duration::from_millis(5), 1u32);
        w.insert(t0 + Duration::from_millis(5 + SLOTS as u64), 2u32);
        w.insert(t0 + Duration::from_millis(5 + 3 * SLOTS as u64), 3u32);
        let mut out = Vec::new();
        w.advance(t0 + Duration::from_millis(6), &mut out);
        assert_eq!(out, vec![1]);
        out.clear();
        w.advance(t0 + Duration::from_millis(6 + SLOTS as u64), &mut out);
        assert_eq!(out, vec![2]);
        out.clear();
        // A jump of many revolutions at once still fires everything due.
        w.advance(t0 + Duration::from_secs(100), &mut out);
        assert_eq!(out, vec![3]);
    }

    #[test]
    fn past_deadline_fires_next_advance() {
        let t0 = Instant::now();
        let mut w = Wheel::new(t0, Duration::from_millis(10));
        let mut out = Vec::new();
        w.advance(t0 + Duration::from_millis(50), &mut out);
        w.insert(t0, 7u32);
        w.advance(t0 + Duration::from_millis(55), &mut out);
        assert!(out.is_empty());
        w.advance(t0 + Duration::from_millis(60), &mut out);
        assert_eq!(out, vec![7]);
    }

    /// Random inserts and advances against a sorted-list model: same items fire in the same
    /// `advance` call.
    #[test]
    fn matches_model() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let t0 = Instant::now();
        let tick_ms = 5;
        let mut w = Wheel::new(t0, Duration::from_millis(tick_ms));
        let mut model: Vec<(u64, u32)> = Vec::new();
        let mut now_ms = 0u64;
        for id in 0..5_000u32 {
            if rng.gen_bool(0.6) {
                let d = now_ms + rng.gen_range(0..10_000);
                w.insert(t0 + Duration::from_millis(d), id);
                let tick = d.div_ceil(tick_ms).max(now_ms / tick_ms + 1);
                model.push((tick, id));
            } else {
                now_ms += rng.gen_range(0..400);
                let mut out = Vec::new();
                w.advance(t0 + Duration::from_millis(now_ms), &mut out);
                out.sort();
                let target = now_ms / tick_ms;
                let mut due: Vec<u32> = model
                    .iter()
                    .filter(|(t, _)| *t <= target)
                    .map(|(_, i)| *i)
                    .collect();
                due.sort();
                model.retain(|(t, _)| *t > target);
                assert_eq!(out, due);
            }
        }
        assert_eq!(w.len(), model.len());
    }
}
