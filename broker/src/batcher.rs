//! Per-scope aggregation (DESIGN §5). Sans-io: pushes and `now` in, flushed batches out.
//!
//! Flush rule, per (scope, priority) stream:
//! - a message for a stream that has not flushed within the last `batch_window_ms` flushes at
//!   once (a quiet room pays no latency);
//! - otherwise it waits until the window since the last flush ends ([`Batcher::poll`]), unless
//!   the pending batch reaches `batch_bytes_max` body bytes or `batch_messages_max` messages first;
//! - a message that would take a non-empty pending batch past `batch_bytes_max` first flushes
//!   what is pending, so batches stay under the byte cap unless one message alone exceeds it;
//! - `batch_window_ms = 0` flushes every message on its own.
//!
//! Invariants: each room/area/global stream numbers its batches 1, 2, 3, ... with no gap, per
//! priority; messages leave in the order they were pushed. User and device pushes are not
//! aggregated (each is its own batch, seq 0) so a batch's `first_msg_id` names its one message,
//! which high-reach ACKs need. Stream states are kept for the broker's life so a room's seq
//! never restarts (about 100 bytes per stream ever pushed to).

use proto::id::{MsgId, Priority, Scope};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant};

/// One accepted message on its way into a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub scope: Scope,
    pub priority: Priority,
    pub msg_id: MsgId,
    pub body: Vec<u8>,
    /// When ingest accepted it (the flush latency histogram starts here).
    pub accepted: Instant,
}

/// A flushed batch: the stream, its seq, and its messages in push order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flush {
    pub scope: Scope,
    pub priority: Priority,
    /// Stream seq from 1 (0 for user/device scopes).
    pub seq: u64,
    pub msg_ids: Vec<MsgId>,
    pub bodies: Vec<Vec<u8>>,
    /// When ingest accepted the batch's oldest message (`None` in tests that build a flush).
    pub oldest: Option<Instant>,
}

impl Flush {
    pub fn body_bytes(&self) -> usize {
        self.bodies.iter().map(Vec::len).sum()
    }
}

/// Aggregation limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub window: Duration,
    pub bytes_max: usize,
    pub messages_max: usize,
}

#[derive(Default)]
struct Stream {
    scope: Option<Scope>,
    last_flush: Option<Instant>,
    next_seq: u64,
    msg_ids: Vec<MsgId>,
    bodies: Vec<Vec<u8>>,
    pending_bytes: usize,
    /// Accept time of the oldest pending message.
    oldest: Option<Instant>,
}

type Key = (Scope, Priority);

/// Aggregates messages of many streams.
pub struct Batcher {
    limits: Limits,
    streams: HashMap<Key, Stream>,
    /// (deadline, ordinal) for streams with pending messages; stale entries are skipped on pop.
    /// The ordinal keeps equal deadlines FIFO and names the stream in `armed`.
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    armed: HashMap<u64, Key>,
    ordinal: u64,
    pending_messages: usize,
}

impl Batcher {
    pub fn new(limits: Limits) -> Batcher {
        Batcher {
            limits: Limits {
                messages_max: limits.messages_max.max(1),
                bytes_max: limits.bytes_max.max(1),
                ..limits
            },
            streams: HashMap::new(),
            deadlines: BinaryHeap::new(),
            armed: HashMap::new(),
            ordinal: 0,
            pending_messages: 0,
        }
    }

    /// Adds a message; appends any batches that must leave now to `out`.
    pub fn push(&mut self, msg: Message, now: Instant, out: &mut Vec<Flush>) {
        if matches!(msg.scope, Scope::User(_) | Scope::Device(_)) {
            out.push(Flush {
                scope: msg.scope,
                priority: msg.priority,
                seq: 0,
                msg_ids: vec![msg.msg_id],
                bodies: vec![msg.body],
                oldest: Some(msg.accepted),
            });
            return;
        }
        let key = (msg.scope, msg.priority);
        let limits = self.limits;
        let stream = self.streams.entry(key.clone()).or_default();
        if stream.scope.is_none() {
            stream.scope = Some(key.0.clone());
            stream.next_seq = 1;
        }
        // Keep batches under the byte cap: flush what is pending before it would overflow.
        if !stream.bodies.is_empty() && stream.pending_bytes + msg.body.len() > limits.bytes_max {
            self.pending_messages -= stream.bodies.len();
            out.push(take(stream, key.1, now));
        }
        stream.pending_bytes += msg.body.len();
        stream.oldest.get_or_insert(msg.accepted);
        stream.msg_ids.push(msg.msg_id);
        stream.bodies.push(msg.body);
        self.pending_messages += 1;
        let quiet = match stream.last_flush {
            None => true,
            Some(t) => now.saturating_duration_since(t) >= limits.window,
        };
        if quiet
            || stream.pending_bytes >= limits.bytes_max
            || stream.bodies.len() >= limits.messages_max
        {
            self.pending_messages -= stream.bodies.len();
            out.push(take(stream, key.1, now));
        } else if stream.bodies.len() == 1 {
            // First pending message since the last flush: arm the window deadline.
            let deadline = stream.last_flush.map_or(now, |t| t + limits.window);
            self.ordinal += 1;
            self.deadlines.push(Reverse((deadline, self.ordinal)));
            self.armed.insert(self.ordinal, key);
        }
    }

    /// Appends the batches whose window has ended by `now` to `out`.
    pub fn poll(&mut self, now: Instant, out: &mut Vec<Flush>) {
        while let Some(Reverse((deadline, _))) = self.deadlines.peek() {
            if *deadline > now {
                break;
            }
            let Some(Reverse((deadline, ordinal))) = self.deadlines.pop() else {
                break;
            };
            let Some(key) = self.armed.remove(&ordinal) else {
                continue;
            };
            let Some(stream) = self.streams.get_mut(&key) else {
                continue;
            };
            // Stale entry: the stream flushed early (size cap) and may have re-armed later.
            let live = !stream.bodies.is_empty()
                && window_ends_by(stream.last_flush, self.limits.window, deadline);
            if live {
                self.pending_messages -= stream.bodies.len();
                out.push(take(stream, key.1, now));
            }
        }
    }

    /// When [`Batcher::poll`] next has work (None: nothing pending).
    pub fn next_deadline(&mut self) -> Option<Instant> {
        // Drop stale heads so the caller does not wake for nothing.
        while let Some(Reverse((deadline, ordinal))) = self.deadlines.peek() {
            let live = self
                .armed
                .get(ordinal)
                .and_then(|key| self.streams.get(key))
                .is_some_and(|s| {
                    !s.bodies.is_empty()
                        && window_ends_by(s.last_flush, self.limits.window, *deadline)
                });
            if live {
                return Some(*deadline);
            }
            let ordinal = *ordinal;
            self.deadlines.pop();
            self.armed.remove(&ordinal);
        }
        None
    }

    /// Messages waiting in pending batches.
    pub fn pending_messages(&self) -> usize {
        self.pending_messages
    }

    /// Streams (scope, priority) ever seen.
    pub fn streams(&self) -> usize {
        self.streams.len()
    }
}

/// True when the window since `last_flush` ends by `at` (a heap entry for `at` is still live).
fn window_ends_by(last_flush: Option<Instant>, window: Duration, at: Instant) -> bool {
    match last_flush {
        None => true,
        Some(t) => t + window <= at,
    }
}

fn take(stream: &mut Stream, priority: Priority, now: Instant) -> Flush {
    let seq = stream.next_seq;
    stream.next_seq += 1;
    stream.last_flush = Some(now);
    stream.pending_bytes = 0;
    Flush {
        scope: stream.scope.clone().unwrap_or(Scope::Global),
        priority,
        seq,
        msg_ids: std::mem::take(&mut stream.msg_ids),
        bodies: std::mem::take(&mut stream.bodies),
        oldest: stream.oldest.take(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::id::{AreaId, RoomId, UserId};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn limits() -> Limits {
        Limits {
            window: ms(50),
            bytes_max: 100,
            messages_max: 4,
        }
    }

    struct T {
        b: Batcher,
        next_id: u64,
        t0: Instant,
    }

    impl T {
        fn new(limits: Limits) -> T {
            T {
                b: Batcher::new(limits),
                next_id: 1,
                t0: Instant::now(),
            }
        }
        fn push(&mut self, scope: Scope, priority: Priority, len: usize, at_ms: u64) -> Vec<Flush> {
            let mut out = Vec::new();
            let msg = Message {
                scope,
                priority,
                msg_id: MsgId(self.next_id),
                body: vec![b'x'; len],
                accepted: self.t0 + ms(at_ms),
            };
            self.next_id += 1;
            self.b.push(msg, self.t0 + ms(at_ms), &mut out);
            out
        }
        fn poll(&mut self, at_ms: u64) -> Vec<Flush> {
            let mut out = Vec::new();
            self.b.poll(self.t0 + ms(at_ms), &mut out);
            out
        }
        fn deadline_ms(&mut self) -> Option<u64> {
            self.b
                .next_deadline()
                .map(|d| d.duration_since(self.t0).as_millis() as u64)
        }
    }

    const R1: Scope = Scope::Room(RoomId(1));
    const LOW: Priority = Priority::Low;

    fn ids(f: &Flush) -> Vec<u64> {
        f.msg_ids.iter().map(|m| m.0).collect()
    }

    #[test]
    fn quiet_room_flushes_at_once_then_waits_for_the_window() {
        let mut t = T::new(limits());
        let f = t.push(R1.clone(), LOW, 10, 0);
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].seq, ids(&f[0])), (1, vec![1]));
        assert!(t.push(R1.clone(), LOW, 10, 10).is_empty());
        assert!(t.push(R1.clone(), LOW, 10, 20).is_empty());
        assert_eq!(t.deadline_ms(), Some(50));
        assert!(t.poll(49).is_empty());
        let f = t.poll(50);
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].seq, ids(&f[0])), (2, vec![2, 3]));
        assert_eq!(t.deadline_ms(), None);
        assert_eq!(t.b.pending_messages(), 0);
        // 100 ms after the last flush the room is quiet again.
        let f = t.push(R1.clone(), LOW, 10, 150);
        assert_eq!((f[0].seq, ids(&f[0])), (3, vec![4]));
    }

    #[test]
    fn caps_flush_early_and_rearm_the_window() {
        let mut t = T::new(limits());
        t.push(R1.clone(), LOW, 10, 0);
        // messages_max = 4
        for i in 0..3 {
            assert!(t.push(R1.clone(), LOW, 10, 1 + i).is_empty());
        }
        let f = t.push(R1.clone(), LOW, 10, 5);
        assert_eq!((f[0].seq, ids(&f[0])), (2, vec![2, 3, 4, 5]));
        // The window restarts at the early flush (5 ms): the next one waits until 55.
        assert!(t.push(R1.clone(), LOW, 10, 6).is_empty());
        assert_eq!(t.deadline_ms(), Some(55));
        assert!(t.poll(50).is_empty());
        assert_eq!(ids(&t.poll(55)[0]), vec![6]);
        // bytes_max = 100: 60 pending, a 50-byte message flushes the 60 first.
        assert!(t.push(R1.clone(), LOW, 60, 60).is_empty());
        let f = t.push(R1.clone(), LOW, 50, 61);
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].seq, ids(&f[0]), f[0].body_bytes()), (4, vec![7], 60));
        // A message alone over the cap leaves at once.
        let f = t.push(R1.clone(), LOW, 500, 62);
        assert_eq!(
            f.iter().map(ids).collect::<Vec<_>>(),
            vec![vec![8], vec![9]]
        );
        assert_eq!(f.iter().map(|f| f.seq).collect::<Vec<_>>(), vec![5, 6]);
    }

    #[test]
    fn streams_are_independent_per_scope_and_priority() {
        let mut t = T::new(limits());
        let a1 = Scope::Area(AreaId(1));
        assert_eq!(t.push(R1.clone(), LOW, 1, 0)[0].seq, 1);
        assert_eq!(t.push(R1.clone(), Priority::High, 1, 0)[0].seq, 1);
        assert_eq!(t.push(a1.clone(), LOW, 1, 0)[0].seq, 1);
        assert_eq!(t.push(Scope::Global, LOW, 1, 0)[0].seq, 1);
        assert!(t.push(R1.clone(), LOW, 1, 1).is_empty());
        assert!(t.push(a1.clone(), LOW, 1, 2).is_empty());
        let f = t.poll(60);
        assert_eq!(f.len(), 2);
        assert_eq!((f[0].scope.clone(), f[0].seq), (R1, 2));
        assert_eq!((f[1].scope.clone(), f[1].seq), (a1, 2));
        assert_eq!(t.b.streams(), 4);
    }

    #[test]
    fn user_scopes_are_never_aggregated() {
        let mut t = T::new(limits());
        for i in 0..3 {
            let f = t.push(Scope::User(UserId(7)), LOW, 5, i);
            assert_eq!((f.len(), f[0].seq, f[0].msg_ids.len()), (1, 0, 1));
        }
        assert_eq!(t.b.streams(), 0);
    }

    #[test]
    fn zero_window_flushes_every_message() {
        let mut t = T::new(Limits {
            window: Duration::ZERO,
            ..limits()
        });
        for i in 0..5 {
            let f = t.push(R1.clone(), LOW, 5, 0);
            assert_eq!((f.len(), f[0].seq), (1, i + 1));
        }
        assert_eq!(t.deadline_ms(), None);
    }

    /// A hot room: one message per ms for a second. Every message leaves exactly once, in
    /// order, seqs are consecutive, and no batch leaves sooner than a window after the last
    /// unless it is full.
    #[test]
    fn hot_room_keeps_order_and_cadence() {
        let mut t = T::new(Limits {
            window: ms(50),
            bytes_max: 1 << 20,
            messages_max: 1000,
        });
        let mut got: Vec<Flush> = Vec::new();
        for i in 0..1000 {
            got.extend(t.poll(i));
            got.extend(t.push(R1.clone(), LOW, 10, i));
        }
        got.extend(t.poll(2000));
        let all: Vec<u64> = got.iter().flat_map(ids).collect();
        assert_eq!(all, (1..=1000).collect::<Vec<_>>());
        let seqs: Vec<u64> = got.iter().map(|f| f.seq).collect();
        assert_eq!(seqs, (1..=got.len() as u64).collect::<Vec<_>>());
        // 1000 ms / 50 ms window, plus the first immediate flush.
        assert!(got.len() <= 22, "{} batches", got.len());
    }

    proptest::proptest! {
        /// Any interleaving of pushes and polls over a few rooms: every message leaves exactly
        /// once, in push order per stream; seqs are 1, 2, 3, ... per stream; no batch exceeds the
        /// caps unless it is one message.
        #[test]
        fn batches_keep_every_invariant(
            events in proptest::collection::vec((0u8..4, 0usize..150, 0u64..40, proptest::bool::ANY), 1..300),
            window_ms in 0u64..60,
        ) {
            let limits = Limits { window: ms(window_ms), bytes_max: 200, messages_max: 5 };
            let mut t = T::new(limits);
            let mut now = 0u64;
            let mut pushed: std::collections::HashMap<(Scope, Priority), Vec<u64>> = Default::default();
            let mut got: Vec<(u64, Flush)> = Vec::new();
            for (room, len, dt, high) in events {
                now += dt;
                for f in t.poll(now) {
                    got.push((now, f));
                }
                let scope = Scope::Room(RoomId(room as u64));
                let p = if high { Priority::High } else { LOW };
                pushed.entry((scope.clone(), p)).or_default().push(t.next_id);
                for f in t.push(scope, p, len, now) {
                    got.push((now, f));
                }
            }
            for f in t.poll(now + 1000) {
                got.push((now + 1000, f));
            }
            proptest::prop_assert_eq!(t.b.pending_messages(), 0);
            let mut seen: std::collections::HashMap<(Scope, Priority), (Vec<u64>, Vec<u64>)> = Default::default();
            for (_, f) in &got {
                let e = seen.entry((f.scope.clone(), f.priority)).or_default();
                e.0.extend(ids(f));
                e.1.push(f.seq);
                proptest::prop_assert!(!f.msg_ids.is_empty());
                proptest::prop_assert!(f.msg_ids.len() <= 5);
                proptest::prop_assert!(f.msg_ids.len() == 1 || f.body_bytes() <= 200);
            }
            proptest::prop_assert_eq!(seen.len(), pushed.len());
            for (k, want) in &pushed {
                let (ids, seqs) = &seen[k];
                proptest::prop_assert_eq!(ids, want);
                proptest::prop_assert_eq!(seqs.clone(), (1..=seqs.len() as u64).collect::<Vec<_>>());
            }
        }
    }
}
