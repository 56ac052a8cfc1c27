//! The high-reach tracker (issue 9, DESIGN §6). Sans-io: accepted messages, connects,
//! disconnects, ACKs and `now` in; "send message M to edges E" and "tracking of M ended" out.
//!
//! A tracked message is for one target, a user or a device. Its life:
//! - **first try**: at [`Tracker::track`] if the target has a connection on some edge, else when
//!   it next connects ([`Tracker::connect`]); a send goes to *every* edge where the target has a
//!   connection at that moment, so it follows a user who reconnected elsewhere;
//! - **resends**: `retry_ms` after each try with no ACK, at most `retries` times (the article's
//!   n). A resend that finds the target with no connection waits for its next connect, and does
//!   not use up a try;
//! - **end**: an ACK from any connection of the target ([`Tracker::ack`]); `retry_ms` after the
//!   last try without one ([`End::Exhausted`]); or its ttl ([`End::Expired`]), whichever is first.
//!
//! An ACK for a message that is not tracked (never was, already ended) or that is someone
//! else's is ignored and counted: no peer can end another's message.
//!
//! Bounds: tracked messages (waiting ones included) are limited per target and per tracker
//! (one per broker shard), in entries and in body bytes. Past a bound [`Tracker::track`]
//! refuses the message (`overloaded`): nothing is accepted and then forgotten.
//!
//! Invariants: `entries`, `targets[..].msgs` and the byte counters always agree; every entry has
//! exactly one live timer (the earlier of its next try and its expiry) and the heap may hold
//! stale ones, skipped when popped; `Send` actions list edges in ascending order, without
//! duplicates, and never an empty list.

use bytes::Bytes;
use proto::id::{DeviceId, MsgId, UserId};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::time::{Duration, Instant};

/// Default of `reach_ttl_ms_default`: how long a message without `ttl_ms` is kept.
pub const REACH_TTL_MS_DEFAULT: u64 = 300_000;
/// Default of `reach_ttl_ms_max`: the cap on a requested `ttl_ms`.
pub const REACH_TTL_MS_MAX: u64 = 3_600_000;
/// Default of `reach_retry_ms`: the wait for an ACK before a resend.
pub const REACH_RETRY_MS: u64 = 2_000;
/// Default of `reach_retries`: resends after the first try.
pub const REACH_RETRIES: u32 = 2;
/// Default of `reach_target_entries_max`: tracked messages per user or device.
pub const REACH_TARGET_ENTRIES_MAX: usize = 256;
/// Default of `reach_target_bytes_max`: tracked body bytes per user or device.
pub const REACH_TARGET_BYTES_MAX: usize = 1024 * 1024;
/// Default of `reach_entries_max`: tracked messages per broker shard.
pub const REACH_ENTRIES_MAX: usize = 200_000;
/// Default of `reach_bytes_max`: tracked body bytes per broker shard.
pub const REACH_BYTES_MAX: usize = 256 * 1024 * 1024;

/// Tracker limits (config fields of the same names with the `reach_` prefix).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub ttl_ms_default: u64,
    pub ttl_ms_max: u64,
    pub retry_ms: u64,
    pub retries: u32,
    pub target_entries_max: usize,
    pub target_bytes_max: usize,
    pub entries_max: usize,
    pub bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            ttl_ms_default: REACH_TTL_MS_DEFAULT,
            ttl_ms_max: REACH_TTL_MS_MAX,
            retry_ms: REACH_RETRY_MS,
            retries: REACH_RETRIES,
            target_entries_max: REACH_TARGET_ENTRIES_MAX,
            target_bytes_max: REACH_TARGET_BYTES_MAX,
            entries_max: REACH_ENTRIES_MAX,
            bytes_max: REACH_BYTES_MAX,
        }
    }
}

impl Limits {
    /// The ttl a message gets: the requested one (default if none), within `1..=ttl_ms_max`.
    pub fn ttl_ms(&self, requested: Option<u64>) -> u64 {
        requested
            .unwrap_or(self.ttl_ms_default)
            .clamp(1, self.ttl_ms_max.max(1))
    }
}

/// An edge node as the shell numbers them (its index in the route table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EdgeId(pub u32);

/// Who a high-reach message is for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    User(UserId),
    Device(DeviceId),
}

/// Why tracking of a message ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// A connection of its target ACKed it.
    Acked,
    /// Its ttl passed first.
    Expired,
    /// `retry_ms` passed after the last try without an ACK.
    Exhausted,
}

/// What the shell must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send `body` (the delivered object, `msg_id` field included) to `target`'s connections
    /// on each of `edges`. `attempt` is 1 for the first try.
    Send {
        msg: MsgId,
        target: Target,
        edges: Vec<EdgeId>,
        attempt: u32,
        body: Bytes,
    },
    /// Tracking ended without an ACK (the shell logs it in the store).
    Ended { msg: MsgId, end: End },
}

/// Which bound refused a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The target already has `target_entries_max` messages or `target_bytes_max` bytes
    /// tracked (caller's load: retry later).
    #[error("overloaded: too many messages in flight for this user or device")]
    TargetFull,
    /// The shard already tracks `entries_max` messages or `bytes_max` bytes (our load).
    #[error("overloaded: too many high-reach messages in flight")]
    ShardFull,
    /// The msg id is already tracked (a reload that replays an entry twice: internal).
    #[error("msg id already tracked")]
    Duplicate,
}

/// What an ACK did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckOutcome {
    /// It ended the message's tracking.
    Acked,
    /// No such message is tracked (unknown, already ACKed, ended): ignored, counted.
    Unknown,
    /// The message is someone else's: ignored, counted.
    NotYours,
}

/// Counters for the metrics page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub tracked: u64,
    pub sends: u64,
    pub acked: u64,
    pub expired: u64,
    pub exhausted: u64,
    pub ack_unknown: u64,
    pub ack_not_yours: u64,
    pub refused_target: u64,
    pub refused_shard: u64,
}

struct Entry {
    target: Target,
    body: Bytes,
    /// Tries made so far.
    attempts: u32,
    /// The next try, or `None` while waiting for the target to connect.
    next: Option<Instant>,
    expires: Instant,
}

impl Entry {
    fn deadline(&self) -> Instant {
        self.next.map_or(self.expires, |n| n.min(self.expires))
    }
}

#[derive(Default)]
struct TargetState {
    /// Connections per edge (only edges with at least one).
    edges: BTreeMap<EdgeId, u32>,
    /// Tracked messages, in acceptance order.
    msgs: BTreeSet<MsgId>,
    bytes: usize,
}

/// The high-reach messages of one broker shard.
pub struct Tracker {
    limits: Limits,
    entries: HashMap<MsgId, Entry>,
    targets: HashMap<Target, TargetState>,
    timers: BinaryHeap<Reverse<(Instant, MsgId)>>,
    bytes: usize,
    stats: Stats,
}

impl Tracker {
    /// A `retry_ms` of 0 is taken as 1 so a try always waits for its ACK.
    pub fn new(limits: Limits) -> Tracker {
        Tracker {
            limits: Limits {
                retry_ms: limits.retry_ms.max(1),
                ..limits
            },
            entries: HashMap::new(),
            targets: HashMap::new(),
            timers: BinaryHeap::new(),
            bytes: 0,
            stats: Stats::default(),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Starts tracking an accepted message for `ttl_ms` (see [`Limits::ttl_ms`]); the first
    /// try goes out now if the target is connected. On `Err` nothing is kept.
    pub fn track(
        &mut self,
        msg: MsgId,
        target: Target,
        body: Bytes,
        ttl_ms: u64,
        now: Instant,
        out: &mut Vec<Action>,
    ) -> Result<(), Refused> {
        if self.entries.contains_key(&msg) {
            return Err(Refused::Duplicate);
        }
        let len = body.len();
        let (count, bytes) = self
            .targets
            .get(&target)
            .map_or((0, 0), |t| (t.msgs.len(), t.bytes));
        if count >= self.limits.target_entries_max || bytes + len > self.limits.target_bytes_max {
            self.stats.refused_target += 1;
            return Err(Refused::TargetFull);
        }
        if self.entries.len() >= self.limits.entries_max || self.bytes + len > self.limits.bytes_max
        {
            self.stats.refused_shard += 1;
            return Err(Refused::ShardFull);
        }
        let t = self.targets.entry(target.clone()).or_default();
        t.msgs.insert(msg);
        t.bytes += len;
        self.bytes += len;
        self.stats.tracked += 1;
        let expires = now + Duration::from_millis(ttl_ms);
        self.entries.insert(
            msg,
            Entry {
                target,
                body,
                attempts: 0,
                next: None,
                expires,
            },
        );
        self.try_send(msg, now, out);
        self.arm(msg);
        Ok(())
    }

    /// A connection of `target` authenticated on `edge`: waiting messages go out now.
    pub fn connect(&mut self, target: &Target, edge: EdgeId, now: Instant, out: &mut Vec<Action>) {
        let t = self.targets.entry(target.clone()).or_default();
        *t.edges.entry(edge).or_insert(0) += 1;
        let waiting: Vec<MsgId> = t
            .msgs
            .iter()
            .copied()
            .filter(|m| self.entries.get(m).is_some_and(|e| e.next.is_none()))
            .collect();
        for msg in waiting {
            self.try_send(msg, now, out);
            self.arm(msg);
        }
    }

    /// A connection of `target` on `edge` closed. One call per earlier `connect`; extra calls
    /// are ignored.
    pub fn disconnect(&mut self, target: &Target, edge: EdgeId) {
        let Some(t) = self.targets.get_mut(target) else {
            return;
        };
        if let Some(n) = t.edges.get_mut(&edge) {
            *n -= 1;
            if *n == 0 {
                t.edges.remove(&edge);
            }
        }
        self.forget_if_idle(target);
    }

    /// Every connection on `edge` is gone (its link dropped).
    pub fn edge_down(&mut self, edge: EdgeId) {
        let mut idle = Vec::new();
        for (target, t) in &mut self.targets {
            if t.edges.remove(&edge).is_some() && t.edges.is_empty() && t.msgs.is_empty() {
                idle.push(target.clone());
            }
        }
        for target in idle {
            self.targets.remove(&target);
        }
    }

    /// An op 1000 ACK for `msg` from a connection of `user` (guest: 0) on device `device`.
    pub fn ack(&mut self, msg: MsgId, user: UserId, device: Option<&DeviceId>) -> AckOutcome {
        let Some(e) = self.entries.get(&msg) else {
            self.stats.ack_unknown += 1;
            return AckOutcome::Unknown;
        };
        let yours = match &e.target {
            Target::User(u) => !u.is_guest() && *u == user,
            Target::Device(d) => Some(d) == device,
        };
        if !yours {
            self.stats.ack_not_yours += 1;
            return AckOutcome::NotYours;
        }
        self.remove(msg);
        self.stats.acked += 1;
        AckOutcome::Acked
    }

    /// Resends and endings due at `now`.
    pub fn poll(&mut self, now: Instant, out: &mut Vec<Action>) {
        while let Some(&Reverse((at, msg))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(e) = self.entries.get(&msg) else {
                continue;
            };
            if e.deadline() != at {
                continue; // stale: the entry was re-armed since
            }
            let end = if now >= e.expires {
                Some(End::Expired)
            } else if e.attempts > self.limits.retries {
                Some(End::Exhausted)
            } else {
                None
            };
            match end {
                None => {
                    self.try_send(msg, now, out);
                    self.arm(msg);
                }
                Some(end) => {
                    self.remove(msg);
                    match end {
                        End::Expired => self.stats.expired += 1,
                        _ => self.stats.exhausted += 1,
                    }
                    out.push(Action::Ended { msg, end });
                }
            }
        }
    }

    /// The earliest time [`Tracker::poll`] has work (possibly a stale, earlier one).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    /// Drops a message just tracked whose acceptance failed later (its log append), without
    /// counting an end. Unknown ids are ignored.
    pub fn forget(&mut self, msg: MsgId) {
        if self.entries.contains_key(&msg) {
            self.remove(msg);
            self.stats.tracked = self.stats.tracked.saturating_sub(1);
        }
    }

    /// Tries made so far for a tracked message (`None`: not tracked).
    pub fn attempts(&self, msg: MsgId) -> Option<u32> {
        self.entries.get(&msg).map(|e| e.attempts)
    }

    /// How long a tracked message has left before it expires (`None`: not tracked).
    pub fn expires_in(&self, msg: MsgId, now: Instant) -> Option<Duration> {
        self.entries
            .get(&msg)
            .map(|e| e.expires.saturating_duration_since(now))
    }

    /// Messages tracked (waiting ones included).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Body bytes tracked.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// One try to every edge of the target, or wait for a connect if it has none.
    fn try_send(&mut self, msg: MsgId, now: Instant, out: &mut Vec<Action>) {
        let Some(e) = self.entries.get_mut(&msg) else {
            return;
        };
        let edges: Vec<EdgeId> = self
            .targets
            .get(&e.target)
            .map(|t| t.edges.keys().copied().collect())
            .unwrap_or_default();
        if edges.is_empty() {
            e.next = None;
            return;
        }
        e.attempts += 1;
        e.next = Some(now + Duration::from_millis(self.limits.retry_ms));
        self.stats.sends += 1;
        out.push(Action::Send {
            msg,
            target: e.target.clone(),
            edges,
            attempt: e.attempts,
            body: e.body.clone(),
        });
    }

    fn arm(&mut self, msg: MsgId) {
        if let Some(e) = self.entries.get(&msg) {
            self.timers.push(Reverse((e.deadline(), msg)));
        }
    }

    fn remove(&mut self, msg: MsgId) {
        let Some(e) = self.entries.remove(&msg) else {
            return;
        };
        self.bytes -= e.body.len();
        if let Some(t) = self.targets.get_mut(&e.target) {
            t.msgs.remove(&msg);
            t.bytes -= e.body.len();
        }
        self.forget_if_idle(&e.target);
    }

    fn forget_if_idle(&mut self, target: &Target) {
        if self
            .targets
            .get(target)
            .is_some_and(|t| t.edges.is_empty() && t.msgs.is_empty())
        {
            self.targets.remove(target);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const U: Target = Target::User(UserId(7));
    const E1: EdgeId = EdgeId(1);
    const E2: EdgeId = EdgeId(2);

    fn ms(t0: Instant, n: u64) -> Instant {
        t0 + Duration::from_millis(n)
    }

    fn limits() -> Limits {
        Limits::default()
    }

    /// (msg, edges, attempt) of each Send; `Ended` as attempt 0 and no edges.
    fn sends(out: &[Action]) -> Vec<(u64, Vec<u32>, u32)> {
        out.iter()
            .map(|a| match a {
                Action::Send {
                    msg,
                    edges,
                    attempt,
                    ..
                } => (msg.0, edges.iter().map(|e| e.0).collect(), *attempt),
                Action::Ended { msg, .. } => (msg.0, vec![], 0),
            })
            .collect()
    }

    fn body() -> Bytes {
        Bytes::from_static(br#"{"msg_id":"1","cmd":"GIFT_RECEIPT"}"#)
    }

    #[test]
    fn a_resend_follows_the_user_to_a_new_connection_and_an_ack_stops_it() {
        let t0 = Instant::now();
        let mut t = Tracker::new(limits());
        let mut out = Vec::new();
        t.connect(&U, E1, t0, &mut out);
        t.track(MsgId(1), U, body(), 60_000, t0, &mut out).unwrap();
        assert_eq!(sends(&out), [(1, vec![1], 1)]);
        t.disconnect(&U, E1);
        out.clear();
        t.poll(ms(t0, 2000), &mut out);
        assert!(out.is_empty(), "nobody to send to: wait, keep the try");
        t.connect(&U, E2, ms(t0, 2500), &mut out);
        assert_eq!(sends(&out), [(1, vec![2], 2)]);
        assert_eq!(t.ack(MsgId(1), UserId(7), None), AckOutcome::Acked);
        out.clear();
        t.poll(ms(t0, 100_000), &mut out);
        assert!(out.is_empty());
        assert!(t.is_empty());
        assert_eq!((t.stats().sends, t.stats().acked), (2, 1));
    }

    #[test]
    fn unacked_messages_are_resent_n_times_then_end() {
        let t0 = Instant::now();
        let mut t = Tracker::new(limits());
        let mut out = Vec::new();
        t.connect(&U, E1, t0, &mut out);
        t.connect(&U, E2, t0, &mut out);
        t.connect(&U, E2, t0, &mut out); // two connections on E2: one send to E2
        t.track(MsgId(3), U, body(), 60_000, t0, &mut out).unwrap();
        for n in [1999, 2000, 3999, 4000, 5999, 6000] {
            t.poll(ms(t0, n), &mut out);
        }
        assert_eq!(
            sends(&out),
            [
                (3, vec![1, 2], 1),
                (3, vec![1, 2], 2),
                (3, vec![1, 2], 3),
                (3, vec![], 0)
            ]
        );
        assert_eq!(
            out.last(),
            Some(&Action::Ended {
                msg: MsgId(3),
                end: End::Exhausted
            })
        );
        assert!(t.is_empty());
    }

    #[test]
    fn expiry_stops_resends_and_offline_messages_wait_until_ttl() {
        let t0 = Instant::now();
        let mut t = Tracker::new(limits());
        let mut out = Vec::new();
        t.connect(&U, E1, t0, &mut out);
        t.track(MsgId(1), U, body(), 3000, t0, &mut out).unwrap();
        t.poll(ms(t0, 2000), &mut out);
        t.poll(ms(t0, 3000), &mut out);
        assert_eq!(
            sends(&out),
            [(1, vec![1], 1), (1, vec![1], 2), (1, vec![], 0)]
        );
        assert_eq!(t.stats().expired, 1);

        // Offline: kept, delivered on connect, in acceptance order.
        let d = Target::Device(DeviceId("dev-9".into()));
        out.clear();
        t.track(MsgId(5), d.clone(), body(), 10_000, t0, &mut out)
            .unwrap();
        t.track(MsgId(4), d.clone(), body(), 100, t0, &mut out)
            .unwrap();
        t.track(MsgId(6), d.clone(), body(), 10_000, t0, &mut out)
            .unwrap();
        assert!(out.is_empty());
        t.poll(ms(t0, 9000), &mut out);
        assert_eq!(sends(&out), [(4, vec![], 0)], "msg 4 expired offline");
        out.clear();
        t.connect(&d, E2, ms(t0, 9000), &mut out);
        assert_eq!(sends(&out), [(5, vec![2], 1), (6, vec![2], 1)]);
        // A device target is ACKed by its device, whatever the user.
        assert_eq!(
            t.ack(MsgId(5), UserId::GUEST, Some(&DeviceId("dev-9".into()))),
            AckOutcome::Acked
        );
        out.clear();
        t.poll(ms(t0, 10_000), &mut out);
        assert_eq!(sends(&out), [(6, vec![], 0)]);
    }

    #[test]
    fn acks_for_unknown_or_foreign_messages_are_ignored_and_counted() {
        let t0 = Instant::now();
        let mut t = Tracker::new(limits());
        let mut out = Vec::new();
        t.track(MsgId(1), U, body(), 60_000, t0, &mut out).unwrap();
        let d = Target::Device(DeviceId("d".into()));
        t.track(MsgId(2), d, body(), 60_000, t0, &mut out).unwrap();
        assert_eq!(t.ack(MsgId(9), UserId(7), None), AckOutcome::Unknown);
        assert_eq!(t.ack(MsgId(1), UserId(8), None), AckOutcome::NotYours);
        assert_eq!(
            t.ack(MsgId(2), UserId(7), Some(&DeviceId("e".into()))),
            AckOutcome::NotYours
        );
        let guest = Target::User(UserId::GUEST);
        t.track(MsgId(3), guest, body(), 60_000, t0, &mut out)
            .unwrap();
        assert_eq!(t.ack(MsgId(3), UserId::GUEST, None), AckOutcome::NotYours);
        assert_eq!(t.ack(MsgId(1), UserId(7), None), AckOutcome::Acked);
        assert_eq!(t.ack(MsgId(1), UserId(7), None), AckOutcome::Unknown);
        let s = t.stats();
        assert_eq!((s.ack_unknown, s.ack_not_yours, s.acked), (2, 3, 1));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn bounds_refuse_and_free_up() {
        let t0 = Instant::now();
        let mut t = Tracker::new(Limits {
            target_entries_max: 2,
            target_bytes_max: 100,
            entries_max: 3,
            bytes_max: 1000,
            ..limits()
        });
        let mut out = Vec::new();
        let b = |n: usize| Bytes::from(vec![b'x'; n]);
        t.track(MsgId(1), U, b(10), 1000, t0, &mut out).unwrap();
        t.track(MsgId(2), U, b(10), 1000, t0, &mut out).unwrap();
        assert_eq!(
            t.track(MsgId(3), U, b(10), 1000, t0, &mut out),
            Err(Refused::TargetFull)
        );
        let v = Target::User(UserId(8));
        assert_eq!(
            t.track(MsgId(3), v.clone(), b(101), 1000, t0, &mut out),
            Err(Refused::TargetFull)
        );
        t.track(MsgId(3), v.clone(), b(100), 1000, t0, &mut out)
            .unwrap();
        let w = Target::User(UserId(9));
        assert_eq!(
            t.track(MsgId(4), w.clone(), b(1), 1000, t0, &mut out),
            Err(Refused::ShardFull)
        );
        assert_eq!(
            t.track(MsgId(1), w.clone(), b(1), 1000, t0, &mut out),
            Err(Refused::Duplicate)
        );
        assert_eq!((t.len(), t.bytes()), (3, 120));
        t.ack(MsgId(3), UserId(8), None);
        t.track(MsgId(4), w, b(1), 1000, t0, &mut out).unwrap();
        let s = t.stats();
        assert_eq!((s.refused_target, s.refused_shard, s.tracked), (2, 1, 4));
    }

    #[test]
    fn ttl_defaults_and_caps() {
        let l = limits();
        assert_eq!(l.ttl_ms(None), REACH_TTL_MS_DEFAULT);
        assert_eq!(l.ttl_ms(Some(0)), 1);
        assert_eq!(l.ttl_ms(Some(u64::MAX)), REACH_TTL_MS_MAX);
        assert_eq!(l.ttl_ms(Some(5000)), 5000);
    }

    #[test]
    fn a_dropped_edge_takes_its_connections() {
        let t0 = Instant::now();
        let mut t = Tracker::new(limits());
        let mut out = Vec::new();
        t.connect(&U, E1, t0, &mut out);
        t.connect(&U, E1, t0, &mut out);
        t.edge_down(E1);
        t.track(MsgId(1), U, body(), 5000, t0, &mut out).unwrap();
        assert!(out.is_empty());
        t.disconnect(&U, E1); // late close from the dead edge: ignored
        t.connect(&U, E2, t0, &mut out);
        assert_eq!(sends(&out), [(1, vec![2], 1)]);
    }

    // ---- the tracker against a model that scans every entry every millisecond ----

    const IDENTITIES: [(u64, Option<&str>); 3] = [(1, Some("x")), (2, None), (0, Some("d"))];

    fn target(i: u8) -> Target {
        match i {
            0 => Target::User(UserId(1)),
            1 => Target::User(UserId(2)),
            _ => Target::Device(DeviceId("d".into())),
        }
    }

    #[derive(Clone, Debug)]
    enum Ev {
        Track { target: u8, len: u8, ttl_ms: u16 },
        Connect { target: u8, edge: u8 },
        Disconnect { target: u8, edge: u8 },
        EdgeDown { edge: u8 },
        Ack { pick: u8, from: u8 },
        Advance { ms: u16 },
    }

    fn ev() -> impl Strategy<Value = Ev> {
        prop_oneof![
            3 => (0..3u8, 0..50u8, 1..3000u16).prop_map(|(target, len, ttl_ms)| Ev::Track { target, len, ttl_ms }),
            2 => (0..3u8, 0..3u8).prop_map(|(target, edge)| Ev::Connect { target, edge }),
            2 => (0..3u8, 0..3u8).prop_map(|(target, edge)| Ev::Disconnect { target, edge }),
            1 => (0..3u8).prop_map(|edge| Ev::EdgeDown { edge }),
            2 => (any::<u8>(), 0..3u8).prop_map(|(pick, from)| Ev::Ack { pick, from }),
            4 => (0..1500u16).prop_map(|ms| Ev::Advance { ms }),
        ]
    }

    struct MEntry {
        msg: u64,
        target: u8,
        len: usize,
        attempts: u32,
        next: Option<u64>,
        expires: u64,
    }

    /// The obvious implementation: a list, scanned in msg order at every millisecond.
    struct Model {
        l: Limits,
        entries: Vec<MEntry>,
        conns: BTreeMap<(u8, u8), u32>,
        log: Vec<(u64, String)>,
    }

    impl Model {
        fn edges(&self, target: u8) -> Vec<u8> {
            self.conns
                .iter()
                .filter(|(k, n)| k.0 == target && **n > 0)
                .map(|(k, _)| k.1)
                .collect()
        }

        fn try_send(&mut self, i: usize, now: u64) {
            let edges = self.edges(self.entries[i].target);
            let e = &mut self.entries[i];
            if edges.is_empty() {
                e.next = None;
                return;
            }
            e.attempts += 1;
            e.next = Some(now + self.l.retry_ms);
            self.log
                .push((now, format!("send {} {:?} {}", e.msg, edges, e.attempts)));
        }

        fn tick(&mut self, now: u64) {
            let mut i = 0;
            while i < self.entries.len() {
                let e = &self.entries[i];
                if now >= e.expires {
                    self.log.push((now, format!("end {} Expired", e.msg)));
                    self.entries.remove(i);
                    continue;
                }
                if e.next == Some(now) {
                    if e.attempts > self.l.retries {
                        self.log.push((now, format!("end {} Exhausted", e.msg)));
                        self.entries.remove(i);
                        continue;
                    }
                    self.try_send(i, now);
                }
                i += 1;
            }
        }
    }

    fn log_of(out: &[Action], at: u64, log: &mut Vec<(u64, String)>) {
        for a in out {
            log.push((
                at,
                match a {
                    Action::Send {
                        msg,
                        edges,
                        attempt,
                        ..
                    } => format!(
                        "send {} {:?} {attempt}",
                        msg.0,
                        edges.iter().map(|e| e.0 as u8).collect::<Vec<_>>()
                    ),
                    Action::Ended { msg, end } => format!("end {} {end:?}", msg.0),
                },
            ));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn matches_the_model(evs in prop::collection::vec(ev(), 1..80), retries in 0..4u32) {
            let l = Limits {
                ttl_ms_default: 1000,
                ttl_ms_max: 2500,
                retry_ms: 300,
                retries,
                target_entries_max: 3,
                target_bytes_max: 80,
                entries_max: 6,
                bytes_max: 150,
            };
            let t0 = Instant::now();
            let mut t = Tracker::new(l);
            let mut m = Model { l, entries: Vec::new(), conns: BTreeMap::new(), log: Vec::new() };
            let mut log = Vec::new();
            let mut out = Vec::new();
            let mut now = 0u64;
            let mut next_msg = 1u64;
            let mut bodies: HashMap<u64, Bytes> = HashMap::new();
            let evs = evs.into_iter().chain([Ev::Advance { ms: 6000 }]);
            for ev in evs {
                match ev {
                    Ev::Advance { ms } => {
                        let until = now + u64::from(ms);
                        while let Some(d) = t.next_deadline().filter(|d| *d <= ms_at(t0, until)) {
                            out.clear();
                            t.poll(d, &mut out);
                            log_of(&out, (d - t0).as_millis() as u64, &mut log);
                            check_bodies(&out, &bodies)?;
                        }
                        for n in now + 1..=until {
                            m.tick(n);
                        }
                        now = until;
                    }
                    Ev::Track { target: ti, len, ttl_ms } => {
                        let msg = next_msg;
                        next_msg += 1;
                        let body = Bytes::from(vec![msg as u8; len.into()]);
                        bodies.insert(msg, body.clone());
                        let ttl = l.ttl_ms(Some(ttl_ms.into()));
                        out.clear();
                        let got = t.track(MsgId(msg), target(ti), body, ttl, ms_at(t0, now), &mut out);
                        log_of(&out, now, &mut log);
                        let count = m.entries.iter().filter(|e| e.target == ti).count();
                        let bytes: usize = m.entries.iter().filter(|e| e.target == ti).map(|e| e.len).sum();
                        let all: usize = m.entries.iter().map(|e| e.len).sum();
                        let want = if count >= l.target_entries_max || bytes + usize::from(len) > l.target_bytes_max {
                            Err(Refused::TargetFull)
                        } else if m.entries.len() >= l.entries_max || all + usize::from(len) > l.bytes_max {
                            Err(Refused::ShardFull)
                        } else {
                            m.entries.push(MEntry { msg, target: ti, len: len.into(), attempts: 0, next: None, expires: now + ttl });
                            let i = m.entries.len() - 1;
                            m.try_send(i, now);
                            Ok(())
                        };
                        prop_assert_eq!(got, want);
                    }
                    Ev::Connect { target: ti, edge } => {
                        out.clear();
                        t.connect(&target(ti), EdgeId(edge.into()), ms_at(t0, now), &mut out);
                        log_of(&out, now, &mut log);
                        *m.conns.entry((ti, edge)).or_insert(0) += 1;
                        for i in 0..m.entries.len() {
                            if m.entries[i].target == ti && m.entries[i].next.is_none() {
                                m.try_send(i, now);
                            }
                        }
                    }
                    Ev::Disconnect { target: ti, edge } => {
                        t.disconnect(&target(ti), EdgeId(edge.into()));
                        if let Some(n) = m.conns.get_mut(&(ti, edge)) {
                            *n = n.saturating_sub(1);
                        }
                    }
                    Ev::EdgeDown { edge } => {
                        t.edge_down(EdgeId(edge.into()));
                        m.conns.retain(|k, _| k.1 != edge);
                    }
                    Ev::Ack { pick, from } => {
                        // Mostly messages issued so far; sometimes one never issued.
                        let msg = u64::from(pick) % (next_msg + 2);
                        let (user, device) = IDENTITIES[usize::from(from)];
                        let device = device.map(|d| DeviceId(d.into()));
                        let got = t.ack(MsgId(msg), UserId(user), device.as_ref());
                        let want = match m.entries.iter().position(|e| e.msg == msg) {
                            None => AckOutcome::Unknown,
                            Some(i) if m.entries[i].target == from => {
                                m.entries.remove(i);
                                AckOutcome::Acked
                            }
                            Some(_) => AckOutcome::NotYours,
                        };
                        prop_assert_eq!(got, want);
                    }
                }
                prop_assert_eq!(t.len(), m.entries.len());
                prop_assert_eq!(t.bytes(), m.entries.iter().map(|e| e.len).sum::<usize>());
            }
            let mut a = log;
            let mut b = m.log;
            a.sort();
            b.sort();
            prop_assert_eq!(a, b);
            prop_assert!(t.is_empty(), "every message ends within its ttl");
        }
    }

    fn ms_at(t0: Instant, n: u64) -> Instant {
        ms(t0, n)
    }

    fn check_bodies(out: &[Action], bodies: &HashMap<u64, Bytes>) -> Result<(), TestCaseError> {
        for a in out {
            if let Action::Send {
                msg, body, edges, ..
            } = a
            {
                prop_assert_eq!(Some(body), bodies.get(&msg.0));
                prop_assert!(!edges.is_empty());
            }
        }
        Ok(())
    }

    // ---- delivery rate: a seeded simulation of clients that ignore a try with probability 1-r ----

    /// A user's client in the simulation: it processes (and ACKs 50 ms later) each received
    /// copy with probability `r`, and ignores it otherwise.
    struct Client {
        r: f64,
        rng: rand::rngs::StdRng,
        acks: std::collections::VecDeque<(Instant, MsgId)>,
        processed: std::collections::HashSet<MsgId>,
    }

    impl Client {
        fn receive(&mut self, out: &mut Vec<Action>, now: Instant) {
            use rand::Rng;
            for a in out.drain(..) {
                if let Action::Send { msg, .. } = a {
                    if self.rng.gen_bool(self.r) {
                        self.processed.insert(msg);
                        self.acks.push_back((now + Duration::from_millis(50), msg));
                    }
                }
            }
        }

        /// Runs the tracker's timers and this client's ACKs in time order up to `until`.
        fn run_until(&mut self, t: &mut Tracker, until: Instant, out: &mut Vec<Action>) {
            loop {
                let ack = self.acks.front().map(|a| a.0).filter(|a| *a <= until);
                let poll = t.next_deadline().filter(|d| *d <= until);
                match (ack, poll) {
                    (Some(a), p) if p.is_none_or(|p| a <= p) => {
                        if let Some((_, msg)) = self.acks.pop_front() {
                            t.ack(msg, UserId(7), None);
                        }
                    }
                    (_, Some(p)) => {
                        t.poll(p, out);
                        self.receive(out, p);
                    }
                    _ => return,
                }
            }
        }
    }

    /// Tracks `messages` for one user, one every 10 ms; with `reconnect` the user hops to
    /// another edge after a 1-500 ms gap, at 20 per second. Returns the fraction of messages
    /// its client processed at least once.
    fn simulate(r: f64, retries: u32, messages: u64, seed: u64, reconnect: bool) -> f64 {
        use rand::{Rng, SeedableRng};
        let l = Limits {
            retries,
            entries_max: usize::MAX,
            bytes_max: usize::MAX,
            target_entries_max: usize::MAX,
            target_bytes_max: usize::MAX,
            ..Limits::default()
        };
        let t0 = Instant::now();
        let mut t = Tracker::new(l);
        let mut c = Client {
            r,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            acks: Default::default(),
            processed: Default::default(),
        };
        let mut out = Vec::new();
        let mut edge = EdgeId(0);
        let mut now = t0;
        t.connect(&U, edge, now, &mut out);
        for i in 0..messages {
            t.track(MsgId(i), U, body(), 60_000, now, &mut out).unwrap();
            c.receive(&mut out, now);
            now += Duration::from_millis(10);
            c.run_until(&mut t, now, &mut out);
            if reconnect && c.rng.gen_bool(0.2) {
                t.disconnect(&U, edge);
                edge = EdgeId((edge.0 + 1) % 4);
                now += Duration::from_millis(c.rng.gen_range(1..500));
                c.run_until(&mut t, now, &mut out);
                t.connect(&U, edge, now, &mut out);
                c.receive(&mut out, now);
            }
        }
        c.run_until(&mut t, now + Duration::from_secs(30), &mut out);
        assert!(t.is_empty(), "every message ended");
        assert_eq!(
            t.stats().expired,
            0,
            "the ttl must not cut the retry window"
        );
        c.processed.len() as f64 / messages as f64
    }

    /// Final delivery with per-try success r and n retries is 1-(1-r)^(n+1) (DESIGN §6). The
    /// bound is 6 standard deviations of a binomial proportion: a seeded run is deterministic,
    /// and any seed misses it with probability below 1e-8.
    const SEED: u64 = 1;

    #[test]
    fn delivery_rate_matches_one_minus_one_minus_r_to_the_n_plus_one() {
        let messages = 10_000u64;
        for (r, n, reconnect) in [
            (0.5, 2, false),
            (0.9, 2, false),
            (0.5, 2, true),
            (0.3, 4, true),
        ] {
            let want = 1.0 - (1.0f64 - r).powi(n as i32 + 1);
            let sd = (want * (1.0 - want) / messages as f64).sqrt();
            let got = simulate(r, n, messages, SEED, reconnect);
            assert!(
                (got - want).abs() <= 6.0 * sd,
                "r={r} n={n} reconnect={reconnect}: {got} vs {want} (sd {sd})"
            );
        }
    }
}
