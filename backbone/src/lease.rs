//! Partition leases (sans-io): which partitions this broker should hold, when to acquire,
//! renew and release them, and when to stop consuming one. The shell ([`crate::thread`])
//! carries out the [`Action`]s on the KV bucket and reports results back with the time it
//! *sent* each request.
//!
//! # Rules
//! - A broker is live while its `b.<id>` entry was seen within `lease` (every broker puts its
//!   own every `lease / 3`). This broker counts itself live until it closes.
//! - The preferred owner of a partition is the rendezvous winner over the live brokers
//!   ([`crate::partition::preferred_owner`]). A broker tries to acquire (create-if-absent) only
//!   the partitions it prefers, and gives back (stop consuming, then delete by revision) a held
//!   one whose preferred owner is another live broker.
//! - Nothing is acquired during the first `lease / 3` after start: by then every live broker has
//!   put its entry at least once, so a new broker does not grab partitions it would hand back.
//!
//! # Invariant (one consumer per partition)
//! The server drops a lease entry `lease` after it *stored* the last renewal; this broker stops
//! consuming a partition at `sent + lease - margin`, where `sent` is when it *sent* that renewal,
//! earlier than the server stored it. So by the time another broker can create the key, the old
//! holder has stopped, as long as the two clocks run at about the same rate (they measure only
//! durations, never compare timestamps). A renewal the server refuses (wrong revision) means
//! the lease was lost: stop at once.

use crate::partition::{preferred_owner, BrokerId, Partition};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What the shell must do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Put this broker's live entry `b.<id>`; report with [`Leases::on_heartbeat`].
    Heartbeat,
    /// Create `p.<n>` if absent; report with [`Leases::on_acquired`] or [`Leases::on_refused`].
    Acquire(Partition),
    /// Update `p.<n>` expecting `revision`; report with [`Leases::on_renewed`] or
    /// [`Leases::on_refused`] (or nothing, when it timed out: the next poll retries).
    Renew(Partition, u64),
    /// Delete `p.<n>` expecting `revision` (after [`Action::Stop`]); report with
    /// [`Leases::on_released`].
    Release(Partition, u64),
    /// Delete this broker's live entry (it is closing), so others need not wait for it to age out.
    Leave,
    /// Start consuming the partition: this broker holds its lease.
    Start(Partition),
    /// Stop consuming the partition now: its lease is lost, lapsed or being released.
    Stop(Partition),
}

/// One partition as this broker sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    /// Not held; an acquire may be tried from `retry_at`.
    Free { retry_at: Instant },
    /// A create is in flight.
    Acquiring,
    /// Held at `revision`; renew from `renew_at`; stop consuming at `valid_until`.
    Held {
        revision: u64,
        renew_at: Instant,
        valid_until: Instant,
        renewing: bool,
    },
    /// A delete is in flight.
    Releasing,
}

/// The lease state machine of one broker.
#[derive(Debug)]
pub struct Leases {
    me: BrokerId,
    lease: Duration,
    /// Renewal and heartbeat period: `lease / 3`.
    period: Duration,
    /// Held leases are treated as gone this much before `sent + lease`.
    margin: Duration,
    /// Wait after a refused acquire before trying again.
    retry: Duration,
    /// No acquire before this (see the module doc).
    settle_until: Instant,
    /// While set and not passed, nothing is acquired: the broker is joining and waits for its
    /// edges to link first ([`Leases::hold`]).
    hold_until: Option<Instant>,
    live: BTreeMap<BrokerId, Instant>,
    slots: Vec<Slot>,
    heartbeat_at: Instant,
    heartbeat_pending: bool,
    closing: bool,
}

impl Leases {
    /// A broker `me` that just started at `now`, over `partitions` partitions.
    pub fn new(me: BrokerId, partitions: u16, lease: Duration, now: Instant) -> Leases {
        let period = lease / 3;
        Leases {
            me,
            lease,
            period,
            margin: lease / 10,
            retry: lease / 10,
            settle_until: now + period,
            hold_until: None,
            live: BTreeMap::new(),
            slots: vec![Slot::Free { retry_at: now }; usize::from(partitions)],
            heartbeat_at: now,
            heartbeat_pending: false,
            closing: false,
        }
    }

    /// A live entry of `broker` was seen (from the bucket's watch).
    pub fn on_seen(&mut self, broker: BrokerId, now: Instant) {
        self.live.insert(broker, now);
    }

    /// `broker`'s live entry was deleted: it closed.
    pub fn on_left(&mut self, broker: &BrokerId) {
        self.live.remove(broker);
    }

    /// This broker's live entry was put (`ok`) or not, by a request sent at `sent`.
    pub fn on_heartbeat(&mut self, ok: bool, sent: Instant) {
        self.heartbeat_pending = false;
        if ok {
            self.live.insert(self.me.clone(), sent);
        }
    }

    /// The create of `p` succeeded at `revision`; it was sent at `sent`.
    pub fn on_acquired(&mut self, p: Partition, revision: u64, sent: Instant) -> Vec<Action> {
        let Some(slot) = self.slots.get_mut(usize::from(p.0)) else {
            return Vec::new();
        };
        if *slot != Slot::Acquiring {
            return Vec::new();
        }
        *slot = Slot::Held {
            revision,
            renew_at: sent + self.period,
            valid_until: sent + self.lease - self.margin,
            renewing: false,
        };
        vec![Action::Start(p)]
    }

    /// The renewal of `p` succeeded at `revision`; it was sent at `sent`.
    pub fn on_renewed(&mut self, p: Partition, revision: u64, sent: Instant) {
        if let Some(Slot::Held { renewing: true, .. }) = self.slots.get(usize::from(p.0)) {
            self.slots[usize::from(p.0)] = Slot::Held {
                revision,
                renew_at: sent + self.period,
                valid_until: sent + self.lease - self.margin,
                renewing: false,
            };
        }
    }

    /// The server refused a create or a renewal of `p`: someone else holds it.
    pub fn on_refused(&mut self, p: Partition, now: Instant) -> Vec<Action> {
        let Some(slot) = self.slots.get_mut(usize::from(p.0)) else {
            return Vec::new();
        };
        let was_held = matches!(slot, Slot::Held { .. });
        *slot = Slot::Free {
            retry_at: now + self.retry,
        };
        if was_held {
            vec![Action::Stop(p)]
        } else {
            Vec::new()
        }
    }

    /// A create or renewal of `p` got no answer (timeout, connection down).
    pub fn on_failed(&mut self, p: Partition, now: Instant) {
        match self.slots.get_mut(usize::from(p.0)) {
            Some(slot @ Slot::Acquiring) => {
                *slot = Slot::Free {
                    retry_at: now + self.retry,
                }
            }
            Some(Slot::Held { renewing, .. }) => *renewing = false,
            _ => {}
        }
    }

    /// The delete of `p` finished (done or not: the entry expires anyway).
    pub fn on_released(&mut self, p: Partition, now: Instant) {
        if let Some(slot @ Slot::Releasing) = self.slots.get_mut(usize::from(p.0)) {
            *slot = Slot::Free {
                retry_at: now + self.retry,
            };
        }
    }

    /// Stop everything: every held partition is stopped and released.
    pub fn close(&mut self) -> Vec<Action> {
        self.closing = true;
        let mut out = Vec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if let Slot::Held { revision, .. } = *slot {
                let p = Partition(i as u16);
                out.push(Action::Stop(p));
                out.push(Action::Release(p, revision));
                *slot = Slot::Releasing;
            }
        }
        out.push(Action::Leave);
        out
    }

    /// The live brokers at `now` (this one included until it closes).
    pub fn live(&self, now: Instant) -> Vec<BrokerId> {
        let mut out: Vec<BrokerId> = self
            .live
            .iter()
            .filter(|(_, &seen)| now.saturating_duration_since(seen) < self.lease)
            .map(|(b, _)| b.clone())
            .collect();
        if !self.closing && !out.contains(&self.me) {
            out.push(self.me.clone());
        }
        out
    }

    /// The partitions this broker holds now.
    pub fn held(&self) -> Vec<Partition> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s, Slot::Held { .. }))
            .map(|(i, _)| Partition(i as u16))
            .collect()
    }

    /// Acquires nothing before `until` (unless [`Leases::unhold`] comes first). A broker that
    /// joins a running cluster holds until the edges have linked to it, so no partition moves
    /// to it while it would find nobody watching the rooms (and ack their messages unsent).
    pub fn hold(&mut self, until: Instant) {
        self.hold_until = Some(until);
    }

    /// Ends [`Leases::hold`]: acquisitions start at the next poll (after the settle time).
    pub fn unhold(&mut self) {
        self.hold_until = None;
    }

    /// Everything due at `now`.
    pub fn poll(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if self.closing {
            return out;
        }
        self.live
            .retain(|_, seen| now.saturating_duration_since(*seen) < self.lease * 2);
        if !self.heartbeat_pending && now >= self.heartbeat_at {
            self.heartbeat_pending = true;
            self.heartbeat_at = now + self.period;
            out.push(Action::Heartbeat);
        }
        let live = self.live(now);
        let settled = now >= self.settle_until && self.hold_until.is_none_or(|h| now >= h);
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let p = Partition(i as u16);
            let preferred = preferred_owner(p, &live);
            let mine = preferred == Some(&self.me);
            match *slot {
                Slot::Held { valid_until, .. } if now >= valid_until => {
                    out.push(Action::Stop(p));
                    *slot = Slot::Free {
                        retry_at: now + self.retry,
                    };
                }
                Slot::Held { revision, .. } if !mine => {
                    out.push(Action::Stop(p));
                    out.push(Action::Release(p, revision));
                    *slot = Slot::Releasing;
                }
                Slot::Held {
                    revision,
                    renew_at,
                    ref mut renewing,
                    ..
                } if now >= renew_at && !*renewing => {
                    *renewing = true;
                    out.push(Action::Renew(p, revision));
                }
                Slot::Free { retry_at } if mine && settled && now >= retry_at => {
                    *slot = Slot::Acquiring;
                    out.push(Action::Acquire(p));
                }
                _ => {}
            }
        }
        out
    }

    /// The next time after `now` that [`Leases::poll`] has something to do, if no event
    /// arrives before. The shell also polls after every event.
    pub fn next_deadline(&self, now: Instant) -> Instant {
        let mut next = self.heartbeat_at.max(now);
        let mut consider = |t: Instant| {
            if t > now && t < next {
                next = t;
            }
        };
        consider(self.settle_until);
        if let Some(h) = self.hold_until {
            consider(h);
        }
        for slot in &self.slots {
            match *slot {
                Slot::Free { retry_at } => consider(retry_at),
                Slot::Held {
                    renew_at,
                    valid_until,
                    renewing,
                    ..
                } => {
                    consider(valid_until);
                    if !renewing {
                        consider(renew_at);
                    }
                }
                Slot::Acquiring | Slot::Releasing => {}
            }
        }
        // A live entry ageing out may make this broker preferred.
        for seen in self.live.values() {
            consider(*seen + self.lease);
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LEASE: Duration = Duration::from_millis(3_000);

    fn b(s: &str) -> BrokerId {
        BrokerId::new(s).unwrap()
    }

    /// Carries out actions as a perfect KV would, for one broker at a time: the shared map is
    /// the bucket (partition -> (holder, revision, stored_at)).
    struct Bucket {
        entries: BTreeMap<u16, (BrokerId, u64, Instant)>,
        live: BTreeMap<BrokerId, Instant>,
        revision: u64,
    }

    impl Bucket {
        fn new() -> Bucket {
            Bucket {
                entries: BTreeMap::new(),
                live: BTreeMap::new(),
                revision: 0,
            }
        }

        fn expire(&mut self, now: Instant) {
            self.entries.retain(|_, (_, _, at)| now - *at < LEASE);
            self.live.retain(|_, at| now - *at < LEASE);
        }

        /// One broker's turn: poll, then apply each action at once.
        fn step(&mut self, l: &mut Leases, now: Instant, consuming: &mut Vec<Partition>) {
            self.expire(now);
            for (id, at) in &self.live {
                l.on_seen(id.clone(), *at);
            }
            let mut todo = l.poll(now);
            while let Some(a) = todo.pop() {
                match a {
                    Action::Heartbeat => {
                        self.live.insert(l.me.clone(), now);
                        l.on_heartbeat(true, now);
                    }
                    Action::Acquire(p) => {
                        if self.entries.contains_key(&p.0) {
                            todo.extend(l.on_refused(p, now));
                        } else {
                            self.revision += 1;
                            self.entries.insert(p.0, (l.me.clone(), self.revision, now));
                            todo.extend(l.on_acquired(p, self.revision, now));
                        }
                    }
                    Action::Renew(p, rev) => match self.entries.get(&p.0) {
                        Some((_, r, _)) if *r == rev => {
                            self.revision += 1;
                            self.entries.insert(p.0, (l.me.clone(), self.revision, now));
                            l.on_renewed(p, self.revision, now);
                        }
                        _ => todo.extend(l.on_refused(p, now)),
                    },
                    Action::Release(p, rev) => {
                        if matches!(self.entries.get(&p.0), Some((_, r, _)) if *r == rev) {
                            self.entries.remove(&p.0);
                        }
                        l.on_released(p, now);
                    }
                    Action::Leave => {
                        self.live.remove(&l.me);
                    }
                    Action::Start(p) => consuming.push(p),
                    Action::Stop(p) => consuming.retain(|&q| q != p),
                }
            }
        }
    }

    #[test]
    fn one_broker_takes_everything_after_settling() {
        let t0 = Instant::now();
        let mut l = Leases::new(b("a"), 8, LEASE, t0);
        let mut bucket = Bucket::new();
        let mut c = Vec::new();
        bucket.step(&mut l, t0, &mut c);
        assert!(c.is_empty(), "nothing before settling");
        bucket.step(&mut l, t0 + LEASE / 3, &mut c);
        assert_eq!(c.len(), 8);
        // Renewals keep it for a long time.
        for i in 1..100 {
            bucket.step(
                &mut l,
                t0 + LEASE / 3 + Duration::from_millis(500) * i,
                &mut c,
            );
        }
        assert_eq!(c.len(), 8);
        assert_eq!(l.held().len(), 8);
    }

    /// A held broker acquires nothing until unheld, and a hold that is never ended runs out.
    #[test]
    fn a_hold_delays_acquiring_until_unheld_or_run_out() {
        let t0 = Instant::now();
        let mut bucket = Bucket::new();
        let mut l = Leases::new(b("a"), 8, LEASE, t0);
        l.hold(t0 + LEASE * 10);
        let mut c = Vec::new();
        for i in 0..10 {
            bucket.step(&mut l, t0 + LEASE / 3 * i, &mut c);
        }
        assert!(c.is_empty(), "nothing while held");
        l.unhold();
        bucket.step(&mut l, t0 + LEASE * 4, &mut c);
        assert_eq!(c.len(), 8);

        let mut bucket = Bucket::new();
        let mut l = Leases::new(b("b"), 8, LEASE, t0);
        l.hold(t0 + LEASE);
        let mut c = Vec::new();
        bucket.step(&mut l, t0 + LEASE / 2, &mut c);
        assert!(c.is_empty(), "nothing while held");
        bucket.step(&mut l, t0 + LEASE, &mut c);
        assert_eq!(c.len(), 8, "the hold ran out");
    }

    /// Two brokers split the partitions; one dies (stops stepping); the other takes its
    /// partitions only after the dead one's leases expired, and never two consume one.
    #[test]
    fn split_then_takeover_after_ttl() {
        const P: u16 = 32;
        let t0 = Instant::now();
        let mut a = Leases::new(b("a"), P, LEASE, t0);
        let mut bb = Leases::new(b("b"), P, LEASE, t0);
        let mut bucket = Bucket::new();
        let (mut ca, mut cb) = (Vec::new(), Vec::new());
        let tick = Duration::from_millis(100);
        let mut now = t0;
        for _ in 0..40 {
            bucket.step(&mut a, now, &mut ca);
            bucket.step(&mut bb, now, &mut cb);
            assert!(
                ca.iter().all(|p| !cb.contains(p)),
                "a partition consumed twice"
            );
            now += tick;
        }
        assert_eq!(ca.len() + cb.len(), usize::from(P));
        assert!(!ca.is_empty() && !cb.is_empty(), "{ca:?} {cb:?}");
        let b_had = cb.clone();
        // b dies: its consumers stop with it, its entries stay until they expire.
        let died = now;
        let mut taken_at = None;
        for _ in 0..80 {
            bucket.step(&mut a, now, &mut ca);
            if b_had.iter().any(|p| ca.contains(p)) && taken_at.is_none() {
                taken_at = Some(now);
            }
            now += tick;
        }
        assert_eq!(ca.len(), usize::from(P));
        let waited = taken_at.unwrap() - died;
        assert!(waited >= LEASE / 2, "took over after {waited:?}");
    }

    /// A broker joining takes its preferred partitions once the old holder hands them back.
    #[test]
    fn join_moves_partitions_to_the_newcomer() {
        const P: u16 = 32;
        let t0 = Instant::now();
        let mut a = Leases::new(b("a"), P, LEASE, t0);
        let mut bucket = Bucket::new();
        let (mut ca, mut cb) = (Vec::new(), Vec::new());
        let tick = Duration::from_millis(100);
        let mut now = t0;
        for _ in 0..20 {
            bucket.step(&mut a, now, &mut ca);
            now += tick;
        }
        assert_eq!(ca.len(), usize::from(P));
        let mut bb = Leases::new(b("b"), P, LEASE, now);
        for _ in 0..40 {
            bucket.step(&mut a, now, &mut ca);
            bucket.step(&mut bb, now, &mut cb);
            assert!(ca.iter().all(|p| !cb.contains(p)));
            now += tick;
        }
        let live = [b("a"), b("b")];
        for p in (0..P).map(Partition) {
            let want_b = preferred_owner(p, &live) == Some(&b("b"));
            assert_eq!(cb.contains(&p), want_b, "{p}");
        }
    }

    #[test]
    fn close_stops_and_releases_everything() {
        let t0 = Instant::now();
        let mut l = Leases::new(b("a"), 4, LEASE, t0);
        let mut bucket = Bucket::new();
        let mut c = Vec::new();
        bucket.step(&mut l, t0 + LEASE, &mut c);
        assert_eq!(c.len(), 4);
        let acts = l.close();
        assert_eq!(
            acts.iter().filter(|a| matches!(a, Action::Stop(_))).count(),
            4
        );
        assert_eq!(
            acts.iter()
                .filter(|a| matches!(a, Action::Release(..)))
                .count(),
            4
        );
        assert_eq!(acts.last(), Some(&Action::Leave));
        assert!(l.poll(t0 + LEASE * 2).is_empty());
    }

    #[test]
    fn a_lapsed_lease_stops_consuming() {
        let t0 = Instant::now();
        let mut l = Leases::new(b("a"), 1, LEASE, t0);
        let t1 = t0 + LEASE / 3;
        let _ = l.poll(t1);
        assert_eq!(
            l.on_acquired(Partition(0), 7, t1),
            vec![Action::Start(Partition(0))]
        );
        let acts = l.poll(t1 + LEASE / 3);
        assert!(acts.contains(&Action::Renew(Partition(0), 7)));
        l.on_failed(Partition(0), t1 + LEASE / 3);
        // No answer to any renewal: stop before the server could hand it to someone else.
        let acts = l.poll(t1 + LEASE - LEASE / 10);
        assert!(acts.contains(&Action::Stop(Partition(0))), "{acts:?}");
    }

    proptest! {
        /// Random results and timings never panic and never report a partition both free and
        /// consumed; the deadline is never in the past after a poll.
        #[test]
        fn random_events_keep_state_sane(ops in proptest::collection::vec((0u8..6, 0u16..8, 0u64..2_000), 1..200)) {
            let t0 = Instant::now();
            let mut l = Leases::new(b("me"), 8, LEASE, t0);
            let mut now = t0;
            let mut consuming = std::collections::BTreeSet::new();
            for (op, p, dt) in ops {
                now += Duration::from_millis(dt);
                let p = Partition(p);
                let acts = match op {
                    0 => l.poll(now),
                    1 => l.on_acquired(p, dt, now),
                    2 => l.on_refused(p, now),
                    3 => { l.on_failed(p, now); Vec::new() }
                    4 => { l.on_renewed(p, dt, now); Vec::new() }
                    _ => { l.on_seen(b("other"), now); Vec::new() }
                };
                for a in acts {
                    match a {
                        Action::Start(p) => prop_assert!(consuming.insert(p)),
                        Action::Stop(p) => prop_assert!(consuming.remove(&p)),
                        _ => {}
                    }
                }
                let held: std::collections::BTreeSet<_> = l.held().into_iter().collect();
                prop_assert_eq!(&held, &consuming);
            }
        }
    }
}
