//! Batch confirmations (cluster mode, sans-io): which consumed JetStream messages wait for
//! which edge links to confirm their batch, and what to do with them when the links answer.
//!
//! A shard that hands a batch to its edge links records, per link, the link's BATCH count
//! right after it queued the batch (the link seq); the edge confirms cumulatively
//! (`proto::link::LinkFrame::Confirm`, "received through link seq N"). The batch's messages
//! (their ack tokens, one [`Group`]) are acked to JetStream only when every link they were
//! queued on has confirmed through its seq. So a broker killed with SIGKILL while a batch is
//! still in its link queues, its socket buffers or the network has not acked it, and the
//! partition's next owner delivers it (the gap `docs/guarantees.md` used to state).
//!
//! # Rules
//! - A batch queued on no confirming link (nobody watching it, or only edges that cannot
//!   confirm) is resolved `ack` at once, as before confirmations existed.
//! - A batch that could not be queued on one of its links (the link was cut as slow) is `lost`
//!   from the start: when its other links have answered it is resolved `redeliver`.
//! - A link that ends with batches unconfirmed resolves each of their groups as `redeliver`
//!   once the group's other links have answered: the message goes back to JetStream (a NAK
//!   with a delay, so the edge that lost its link has re-linked and re-sent its interest
//!   before the redelivery), never acked on the word of the links that did confirm.
//! - A link no longer known here (cut, gone from the shard's registry of links) holds nothing
//!   back: its entries are resolved when it is cut.
//!
//! # Bounds
//! What waits is bounded by JetStream: a partition's consumer delivers at most
//! `cluster.ack_pending_max` messages not yet acked, and every token here is one of those. One
//! group per batch with tokens, one entry per (group, link). In-progress acks keep long waits
//! from being redelivered (`backbone::thread`), and the shard cuts a link whose oldest
//! unconfirmed batch is older than `link_dead_ms` ([`Confirms::oldest`]).
//!
//! # Invariants
//! - Every token handed in comes out exactly once, as `ack` or `redeliver`.
//! - A link's entries are in link-seq order (a shard queues batches on a link in order).

use crate::route::LinkId;
use std::collections::{HashMap, VecDeque};
use std::time::Instant;

/// The messages of one batch and how many links have yet to confirm it.
struct Group<T> {
    tokens: Vec<T>,
    waiting: usize,
    /// A link it was meant for never got it, or ended before confirming.
    lost: bool,
}

/// One link's unconfirmed batches: (link seq, group, when queued), in seq order.
type Waits = VecDeque<(u64, u64, Instant)>;

/// What became of tokens whose groups resolved.
#[derive(Debug)]
pub struct Resolved<T> {
    /// Every link confirmed the batch: ack to JetStream.
    pub ack: Vec<T>,
    /// A link ended (or was cut) before confirming: give back to JetStream.
    pub redeliver: Vec<T>,
}

impl<T> Default for Resolved<T> {
    fn default() -> Self {
        Resolved {
            ack: Vec::new(),
            redeliver: Vec::new(),
        }
    }
}

/// A batch handed to the links: the confirming links it was queued on, each with its link
/// seq after the batch, and whether a link it was meant for refused it.
#[derive(Debug, Default)]
pub struct Handoff {
    pub links: Vec<(LinkId, u64)>,
    pub lost: bool,
}

impl Handoff {
    pub fn clear(&mut self) {
        self.links.clear();
        self.lost = false;
    }
}

/// One shard's messages waiting for confirmations.
pub struct Confirms<T> {
    groups: HashMap<u64, Group<T>>,
    links: HashMap<LinkId, Waits>,
    next_group: u64,
    /// Tokens in `groups`.
    tokens: usize,
}

impl<T> Default for Confirms<T> {
    fn default() -> Self {
        Confirms {
            groups: HashMap::new(),
            links: HashMap::new(),
            next_group: 0,
            tokens: 0,
        }
    }
}

impl<T> Confirms<T> {
    /// A batch holding `tokens` was handed on as `handoff` says.
    pub fn hand(&mut self, tokens: Vec<T>, handoff: &Handoff, now: Instant, out: &mut Resolved<T>) {
        if tokens.is_empty() {
            return;
        }
        if handoff.links.is_empty() {
            if handoff.lost {
                out.redeliver.extend(tokens);
            } else {
                out.ack.extend(tokens);
            }
            return;
        }
        let id = self.next_group;
        self.next_group += 1;
        for (link, seq) in &handoff.links {
            self.links
                .entry(*link)
                .or_default()
                .push_back((*seq, id, now));
        }
        self.tokens += tokens.len();
        self.groups.insert(
            id,
            Group {
                tokens,
                waiting: handoff.links.len(),
                lost: handoff.lost,
            },
        );
    }

    /// `link` confirmed every batch through link seq `through`.
    pub fn confirmed(&mut self, link: LinkId, through: u64, out: &mut Resolved<T>) {
        let Some(waits) = self.links.get_mut(&link) else {
            return;
        };
        let mut done = Vec::new();
        while let Some(&(seq, group, _)) = waits.front() {
            if seq > through {
                break;
            }
            waits.pop_front();
            done.push(group);
        }
        if waits.is_empty() {
            self.links.remove(&link);
        }
        for group in done {
            self.answered(group, false, out);
        }
    }

    /// `link` ended: whatever it had not confirmed will not be.
    pub fn link_down(&mut self, link: LinkId, out: &mut Resolved<T>) {
        let Some(waits) = self.links.remove(&link) else {
            return;
        };
        for (_, group, _) in waits {
            self.answered(group, true, out);
        }
    }

    /// When the oldest batch `link` has not confirmed was queued.
    pub fn oldest(&self, link: LinkId) -> Option<Instant> {
        self.links.get(&link)?.front().map(|w| w.2)
    }

    /// Tokens waiting for a confirmation.
    pub fn waiting(&self) -> usize {
        self.tokens
    }

    fn answered(&mut self, id: u64, lost: bool, out: &mut Resolved<T>) {
        let Some(g) = self.groups.get_mut(&id) else {
            return;
        };
        g.lost |= lost;
        g.waiting -= 1;
        if g.waiting > 0 {
            return;
        }
        let Some(g) = self.groups.remove(&id) else {
            return;
        };
        self.tokens -= g.tokens.len();
        if g.lost {
            out.redeliver.extend(g.tokens);
        } else {
            out.ack.extend(g.tokens);
        }
    }
}

/// Rooms and areas whose watching link ended recently (cluster mode): a batch for one of them
/// that finds nobody watching is given back to JetStream (a NAK with a delay) rather than
/// acked, so an edge that is re-linking and has not re-sent its interest yet still gets it.
/// Without this, a message redelivered because its link ended unconfirmed could arrive
/// before the edge's interest and be acked unsent. An entry lasts `grace` (`link_dead_ms`:
/// an edge that has not re-linked by then is gone), and at most [`Orphans::MAX`] are held
/// (beyond that a scope is treated as before: nobody watching, acked).
pub struct Orphans {
    until: HashMap<proto::id::Scope, Instant>,
    grace: std::time::Duration,
}

impl Orphans {
    pub const MAX: usize = 65_536;

    pub fn new(grace: std::time::Duration) -> Orphans {
        Orphans {
            until: HashMap::new(),
            grace,
        }
    }

    /// A link that watched `scopes` ended at `now`.
    pub fn link_ended(&mut self, scopes: impl IntoIterator<Item = proto::id::Scope>, now: Instant) {
        if self.until.len() >= Self::MAX {
            self.until.retain(|_, t| *t > now);
        }
        let until = now + self.grace;
        for scope in scopes {
            if self.until.len() >= Self::MAX {
                break;
            }
            self.until.insert(scope, until);
        }
    }

    /// Whether a batch for `scope` that nobody watches at `now` should be given back.
    pub fn holds(&mut self, scope: &proto::id::Scope, now: Instant) -> bool {
        match self.until.get(scope) {
            Some(&t) if t > now => true,
            Some(_) => {
                self.until.remove(scope);
                false
            }
            None => false,
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.until.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn handoff(links: &[(LinkId, u64)], lost: bool) -> Handoff {
        Handoff {
            links: links.to_vec(),
            lost,
        }
    }

    #[test]
    fn acked_only_when_every_link_confirmed() {
        let now = Instant::now();
        let mut c = Confirms::default();
        let mut out = Resolved::default();
        c.hand(
            vec![1, 2],
            &handoff(&[(10, 1), (11, 5)], false),
            now,
            &mut out,
        );
        c.hand(vec![3], &handoff(&[(10, 2)], false), now, &mut out);
        assert!(out.ack.is_empty() && out.redeliver.is_empty());
        assert_eq!(c.waiting(), 3);
        c.confirmed(10, 2, &mut out);
        assert_eq!(
            out.ack,
            vec![3],
            "link 11 has not confirmed the first batch"
        );
        c.confirmed(11, 4, &mut out);
        assert_eq!(out.ack, vec![3]);
        c.confirmed(11, 5, &mut out);
        assert_eq!(out.ack, vec![3, 1, 2]);
        assert_eq!(c.waiting(), 0);
        assert_eq!(c.oldest(10), None);
    }

    #[test]
    fn a_link_that_ends_unconfirmed_gives_its_batches_back() {
        let now = Instant::now();
        let mut c = Confirms::default();
        let mut out = Resolved::default();
        c.hand(vec![1], &handoff(&[(10, 1), (11, 1)], false), now, &mut out);
        c.hand(vec![2], &handoff(&[(10, 2)], false), now, &mut out);
        c.confirmed(11, 1, &mut out);
        c.link_down(10, &mut out);
        assert!(out.ack.is_empty());
        assert_eq!(out.redeliver, vec![1, 2]);
        // A later confirmation of a gone link changes nothing.
        c.confirmed(10, 2, &mut out);
        assert_eq!(out.redeliver.len(), 2);
        assert_eq!(c.waiting(), 0);
    }

    #[test]
    fn nobody_watching_acks_at_once_and_a_refused_link_redelivers() {
        let now = Instant::now();
        let mut c = Confirms::default();
        let mut out = Resolved::default();
        c.hand(vec![1], &handoff(&[], false), now, &mut out);
        c.hand(vec![2], &handoff(&[], true), now, &mut out);
        c.hand(vec![3], &handoff(&[(7, 1)], true), now, &mut out);
        assert_eq!(out.ack, vec![1]);
        assert_eq!(out.redeliver, vec![2]);
        c.confirmed(7, 1, &mut out);
        assert_eq!(out.redeliver, vec![2, 3], "lost on one link: not acked");
        c.hand(
            Vec::<i32>::new(),
            &handoff(&[(7, 2)], false),
            now,
            &mut Resolved::default(),
        );
        assert_eq!(c.oldest(7), None, "no tokens, nothing waits");
    }

    proptest! {
        /// Every token comes out exactly once, whatever the order of confirmations and cuts;
        /// acked only if every link it went to confirmed it before ending.
        #[test]
        fn every_token_resolves_once(ops in proptest::collection::vec((0u8..3, 0u64..4, 0u64..6), 0..60)) {
            let now = Instant::now();
            let mut c = Confirms::default();
            let mut out = Resolved::default();
            let mut sent = [0u64; 4];
            let mut alive = [true; 4];
            let mut next = 0u32;
            for (op, link, n) in ops {
                let l = link as usize;
                match op {
                    0 => {
                        let links: Vec<(LinkId, u64)> = (0..4u64)
                            .filter(|k| alive[*k as usize] && (n >> (k % 3)) & 1 == 1)
                            .map(|k| { sent[k as usize] += 1; (k, sent[k as usize]) })
                            .collect();
                        c.hand(vec![next], &Handoff { links, lost: n == 5 }, now, &mut out);
                        next += 1;
                    }
                    1 => c.confirmed(link, sent[l].min(n), &mut out),
                    _ => { c.link_down(link, &mut out); alive[l] = false; }
                }
            }
            for k in 0..4 { c.link_down(k, &mut out); }
            let mut all: Vec<u32> = out.ack.iter().chain(&out.redeliver).copied().collect();
            all.sort_unstable();
            prop_assert_eq!(all, (0..next).collect::<Vec<_>>());
            prop_assert_eq!(c.waiting(), 0);
        }
    }

    #[test]
    fn an_orphaned_scope_is_held_for_its_grace_then_forgotten() {
        use proto::id::{AreaId, RoomId, Scope};
        let t0 = Instant::now();
        let mut o = Orphans::new(std::time::Duration::from_secs(5));
        o.link_ended([Scope::Room(RoomId(1)), Scope::Area(AreaId(2))], t0);
        assert!(o.holds(
            &Scope::Room(RoomId(1)),
            t0 + std::time::Duration::from_secs(4)
        ));
        assert!(o.holds(&Scope::Area(AreaId(2)), t0));
        assert!(!o.holds(&Scope::Room(RoomId(3)), t0));
        assert!(!o.holds(
            &Scope::Room(RoomId(1)),
            t0 + std::time::Duration::from_secs(6)
        ));
        assert_eq!(o.len(), 1, "an expired entry is dropped when looked at");
    }

    #[test]
    fn orphans_are_bounded() {
        use proto::id::{RoomId, Scope};
        let t0 = Instant::now();
        let mut o = Orphans::new(std::time::Duration::from_secs(5));
        o.link_ended(
            (0..Orphans::MAX as u64 + 10).map(|r| Scope::Room(RoomId(r))),
            t0,
        );
        assert_eq!(o.len(), Orphans::MAX);
        // Once they expire, room is made again.
        o.link_ended(
            [Scope::Room(RoomId(u64::MAX))],
            t0 + std::time::Duration::from_secs(6),
        );
        assert_eq!(o.len(), 1);
    }
}
