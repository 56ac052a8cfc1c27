//! Resume after reconnect and `BARRAGE_SYNC`, the edge's half (issue 9, DESIGN §11). Sans-io:
//! the shard core calls in with ids, batches and `now`; this module decides what a resuming
//! connection is sent and in which order.
//!
//! ```text
//! auth with "ack" or "resume" --> seated, live batches HELD, REPLAY posted to the link hub
//! REPLAYED (req)              --> replayed batches, held room batches the replay does not
//!                                 cover, BARRAGE_SYNC, the rest of the held batches, live
//! resume_ms_max, hold over     --> BARRAGE_SYNC recovered:false (a fallback), held batches, live
//! resume_hold_bytes_max, no
//! broker link, shard full
//! ```
//!
//! Why holding is enough for "no gap, no duplicate": the broker answers a REPLAY in the turn it
//! routes the room's batches and on the same link (proto::link::replay), and the hub forwards
//! batches and the answer to this shard through one FIFO ring. So every low-priority batch
//! of the room this connection was handed before the answer has a seq `<=` the answer's
//! `seq` and is in the replay (or counted `missed`), and every later one has a greater seq.
//!
//! Invariants:
//! - A connection is pending at most once; [`Resumes::forget`] runs when it is unseated, so
//!   a reused slab key never inherits a hold.
//! - Held bytes per connection stay within `resume_hold_bytes_max`, pending connections per
//!   shard within `resumes_pending_max`; past either the resume falls back, it never blocks.
//! - Every pending resume ends, by answer or by `resume_ms_max`, with exactly one sync.

use crate::core::ConnId;
use crate::node::ShardIdx;
use bytes::Bytes;
use proto::id::{Encoding, Priority, RoomId, Scope};
use proto::link::replay::{Answer, Request};
use proto::link::Batch;
use proto::sync::{Epoch, ResumeField, Sync};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// Default of `resume_ms_max`: a broker answers in one shard turn, so this only bites when
/// the link is down or the broker is stalled.
pub const RESUME_MS_MAX: u64 = 2_000;
/// Default of `resume_hold_bytes_max` (per connection).
pub const RESUME_HOLD_BYTES_MAX: usize = 1024 * 1024;
/// Default of `resumes_pending_max` (per shard).
pub const RESUMES_PENDING_MAX: usize = 4_096;
/// Rooms whose last known epoch a shard remembers (for fallback syncs); past it the memory
/// starts over.
pub const EPOCHS_KNOWN_MAX: usize = 65_536;
/// The epoch a fallback sync names when the edge has never heard the room's: any resume
/// from it is answered as another epoch (`recovered:false`), never as a position.
pub const EPOCH_UNKNOWN: &str = "unknown";

/// How a sync was produced (a metrics label each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// No `resume` asked (only `"ack":true`): told the epoch and seq.
    Fresh,
    /// Every batch after the client's seq was replayed.
    Recovered,
    /// Answered, but something was missed (beyond history, other epoch, seq ahead).
    Partial,
    /// The `resume` field was malformed: ignored, answered `recovered:false`.
    Malformed,
    /// No answer within `resume_ms_max`.
    Timeout,
    /// The held live batches went over `resume_hold_bytes_max`.
    Overflow,
    /// The shard had `resumes_pending_max` resumes outstanding.
    Full,
    /// No broker link could take the request.
    Unlinked,
}

impl Outcome {
    pub const ALL: [Outcome; 8] = [
        Outcome::Fresh,
        Outcome::Recovered,
        Outcome::Partial,
        Outcome::Malformed,
        Outcome::Timeout,
        Outcome::Overflow,
        Outcome::Full,
        Outcome::Unlinked,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Fresh => "fresh",
            Outcome::Recovered => "recovered",
            Outcome::Partial => "partial",
            Outcome::Malformed => "malformed",
            Outcome::Timeout => "timeout",
            Outcome::Overflow => "overflow",
            Outcome::Full => "full",
            Outcome::Unlinked => "unlinked",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// A live batch held for a pending connection, already framed for its transport.
struct Held {
    bytes: Bytes,
    /// The batch's seq when it is a low-priority batch of the connection's room (the only
    /// ones a replay can cover).
    room_seq: Option<u32>,
}

struct Pending {
    id: ConnId,
    req: u64,
    room: RoomId,
    resume: ResumeField,
    began: Instant,
    deadline: Instant,
    held: Vec<Held>,
    held_bytes: usize,
}

/// What to send a connection whose resume ended, in this order: each of `replayed` (client
/// packets, to frame), each of `before` (framed), the sync packet, each of `after` (framed).
#[derive(Debug)]
pub struct Finish {
    pub id: ConnId,
    pub replayed: Vec<Bytes>,
    pub before: Vec<Bytes>,
    pub sync: Sync,
    pub after: Vec<Bytes>,
    pub outcome: Outcome,
    /// From the auth to the end of the resume.
    pub took: Duration,
}

impl Finish {
    /// A replayed batch could not be queued: it is missed after all.
    pub fn lost_one(&mut self) {
        self.sync.missed = self.sync.missed.saturating_add(1);
        self.sync.recovered = false;
        if self.outcome == Outcome::Recovered {
            self.outcome = Outcome::Partial;
        }
    }
}

/// Limits (from the config).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub ms_max: u64,
    pub hold_bytes_max: usize,
    pub pending_max: usize,
}

/// One shard's outstanding resumes.
pub struct Resumes {
    limits: Limits,
    shard: ShardIdx,
    next_req: u64,
    /// By slab key of the connection.
    pending: HashMap<u32, Pending>,
    /// Request id -> slab key.
    reqs: HashMap<u64, u32>,
    /// The last epoch a broker named for each room (what a fallback sync says).
    epochs: HashMap<RoomId, Epoch>,
    /// Connections that asked for syncs, by room: told again when a broker link comes back
    /// and names the room's epoch (issue 17 defect 2).
    syncing: HashMap<RoomId, HashSet<u32>>,
    sync_room: HashMap<u32, RoomId>,
}

/// What [`Resumes::begin`] decided.
#[derive(Debug)]
pub enum Begin {
    /// Post this REPLAY to the link hub; live batches are held meanwhile.
    Ask(Request),
    /// Answer at once (no room for another pending resume).
    Now(Finish),
}

impl Resumes {
    pub fn new(shard: ShardIdx, limits: Limits) -> Resumes {
        Resumes {
            limits,
            shard,
            next_req: 1,
            pending: HashMap::new(),
            reqs: HashMap::new(),
            epochs: HashMap::new(),
            syncing: HashMap::new(),
            sync_room: HashMap::new(),
        }
    }

    /// Connections waiting for an answer.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Whether live batches for the connection at slab `key` must be held. One branch on the
    /// fan-out path when nothing is pending.
    #[inline]
    pub fn holds(&self, key: u32) -> bool {
        !self.pending.is_empty() && self.pending.contains_key(&key)
    }

    /// The connection `id` authenticated into `room` with `resume` (and wants a sync).
    pub fn begin(
        &mut self,
        id: ConnId,
        room: RoomId,
        encoding: Encoding,
        resume: ResumeField,
        now: Instant,
    ) -> Begin {
        self.forget(id.key() as u32);
        self.syncing
            .entry(room)
            .or_default()
            .insert(id.key() as u32);
        self.sync_room.insert(id.key() as u32, room);
        let p = Pending {
            id,
            req: 0,
            room,
            resume,
            began: now,
            deadline: now + Duration::from_millis(self.limits.ms_max),
            held: Vec::new(),
            held_bytes: 0,
        };
        if self.pending.len() >= self.limits.pending_max {
            return Begin::Now(self.fallback(p, Outcome::Full, now));
        }
        // Requests are unique per node: the shard in the top 16 bits.
        let req = ((self.shard as u64) << 48) | (self.next_req & ((1 << 48) - 1));
        self.next_req += 1;
        let request = Request {
            req,
            room,
            encoding,
            resume: p.resume.clone(),
        };
        self.reqs.insert(req, id.key() as u32);
        self.pending.insert(id.key() as u32, Pending { req, ..p });
        Begin::Ask(request)
    }

    /// Holds a live batch for the pending connection at `key`, framed as `bytes`. Returns a
    /// fallback when the hold would go over its bound (then `bytes` is the last of `after`).
    pub fn hold(&mut self, key: u32, batch: &Batch, bytes: Bytes, now: Instant) -> Option<Finish> {
        let p = self.pending.get_mut(&key)?;
        let room_seq = match (&batch.scope, batch.priority) {
            // The outer header's seq (broker::compress::outer_seq).
            (Scope::Room(r), Priority::Low) if *r == p.room => {
                Some((batch.seq & u64::from(proto::sync::ROOM_SEQ_MAX)) as u32)
            }
            _ => None,
        };
        p.held_bytes += bytes.len();
        p.held.push(Held { bytes, room_seq });
        if p.held_bytes <= self.limits.hold_bytes_max {
            return None;
        }
        let p = self.take(key)?;
        Some(self.fallback(p, Outcome::Overflow, now))
    }

    /// The hub's answer to request `req` (`None`: no broker link could take it).
    pub fn on_answer(&mut self, req: u64, answer: Option<Answer>, now: Instant) -> Option<Finish> {
        let key = self.reqs.get(&req).copied()?;
        let p = self.take(key)?;
        let Some(a) = answer else {
            return Some(self.fallback(p, Outcome::Unlinked, now));
        };
        if a.room != p.room {
            // Not what was asked: a broker bug; the client still gets a sync.
            return Some(self.fallback(p, Outcome::Unlinked, now));
        }
        self.learn(a.room, &a.sync.epoch);
        let outcome = match (&p.resume, a.sync.recovered) {
            (ResumeField::Absent, _) => Outcome::Fresh,
            (ResumeField::Malformed(_), _) => Outcome::Malformed,
            (ResumeField::Valid(_), true) => Outcome::Recovered,
            (ResumeField::Valid(_), false) => Outcome::Partial,
        };
        let mut sync = a.sync;
        if matches!(p.resume, ResumeField::Malformed(_)) {
            sync.recovered = false;
        }
        let covered = a.batches.last().map(|b| b.0 & proto::sync::ROOM_SEQ_MAX);
        // What the client already has: its own position, when the epoch is the room's.
        let has = match &p.resume {
            ResumeField::Valid(r) if r.epoch == sync.epoch => Some(r.seq),
            _ => None,
        };
        let (mut before, mut after) = (Vec::new(), Vec::new());
        for h in p.held {
            match h.room_seq {
                Some(s) if covered.is_some_and(|c| s <= c) || has.is_some_and(|n| s <= n) => {}
                Some(s) if s <= sync.seq => before.push(h.bytes),
                _ => after.push(h.bytes),
            }
        }
        Some(Finish {
            id: p.id,
            replayed: a.batches.into_iter().map(|b| b.1).collect(),
            before,
            sync,
            after,
            outcome,
            took: now.saturating_duration_since(p.began),
        })
    }

    /// Resumes past `resume_ms_max` fall back.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<Finish>) {
        if self.pending.is_empty() {
            return;
        }
        let due: Vec<u32> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(k, _)| *k)
            .collect();
        for key in due {
            if let Some(p) = self.take(key) {
                out.push(self.fallback(p, Outcome::Timeout, now));
            }
        }
    }

    /// The connection at `key` left (closed or unseated): drop its hold; a late answer is
    /// ignored.
    pub fn forget(&mut self, key: u32) {
        self.take(key);
        if let Some(room) = self.sync_room.remove(&key) {
            if let Some(set) = self.syncing.get_mut(&room) {
                set.remove(&key);
                if set.is_empty() {
                    self.syncing.remove(&room);
                }
            }
        }
    }

    /// A broker link came back and named `room`'s epoch: the slab keys of the connections
    /// in the room to tell (those still waiting for their own answer get it there).
    pub fn on_epoch(&mut self, room: RoomId, epoch: &Epoch, out: &mut Vec<u32>) {
        self.learn(room, epoch);
        if let Some(set) = self.syncing.get(&room) {
            out.extend(set.iter().filter(|k| !self.pending.contains_key(k)));
        }
    }

    fn take(&mut self, key: u32) -> Option<Pending> {
        let p = self.pending.remove(&key)?;
        self.reqs.remove(&p.req);
        Some(p)
    }

    fn learn(&mut self, room: RoomId, epoch: &Epoch) {
        if self.epochs.get(&room) == Some(epoch) {
            return;
        }
        if self.epochs.len() >= EPOCHS_KNOWN_MAX {
            self.epochs.clear();
        }
        self.epochs.insert(room, epoch.clone());
    }

    /// The sync of a resume the broker did not answer: `recovered:false` for any resume
    /// (what was lost is not known here), the held batches after it. `seq` is the one before
    /// the first held room batch (the client's position when none is held); `missed` counts
    /// the batches between the client's seq and that one when the epoch is known to be the
    /// same, else 0.
    fn fallback(&mut self, p: Pending, outcome: Outcome, now: Instant) -> Finish {
        let client = p.resume.valid().cloned();
        let known = self.epochs.get(&p.room).cloned();
        let epoch = known
            .clone()
            .or_else(|| client.as_ref().map(|r| r.epoch.clone()))
            .unwrap_or_else(|| {
                Epoch::new(EPOCH_UNKNOWN).unwrap_or_else(|_| Epoch::from_parts(0, 0))
            });
        let first = p.held.iter().find_map(|h| h.room_seq);
        let seq = match (first, &client) {
            (Some(f), _) => f.saturating_sub(1),
            (None, Some(r)) => r.seq,
            (None, None) => 0,
        };
        let missed = match (&client, first, &known) {
            (Some(r), Some(f), Some(k)) if *k == r.epoch => {
                u64::from(f.saturating_sub(1).saturating_sub(r.seq))
            }
            _ => 0,
        };
        Finish {
            id: p.id,
            replayed: Vec::new(),
            before: Vec::new(),
            sync: Sync {
                epoch,
                seq,
                recovered: matches!(p.resume, ResumeField::Absent),
                missed,
            },
            after: p.held.into_iter().map(|h| h.bytes).collect(),
            outcome,
            took: now.saturating_duration_since(p.began),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::sync::Resume;

    const ROOM: RoomId = RoomId(7);

    fn limits() -> Limits {
        Limits {
            ms_max: 100,
            hold_bytes_max: 10,
            pending_max: 2,
        }
    }

    fn batch(seq: u32, priority: Priority) -> Batch {
        Batch {
            scope: Scope::Room(ROOM),
            priority,
            seq: seq.into(),
            first_msg_id: proto::id::MsgId(0),
            msg_count: 1,
            encoding: Encoding::Plain,
            flushed_at_us: 0,
            packet: Bytes::from_static(b"p"),
        }
    }

    fn resume(epoch: &str, seq: u32) -> ResumeField {
        ResumeField::Valid(Resume {
            epoch: Epoch::new(epoch).unwrap(),
            seq,
        })
    }

    fn answer(req: u64, epoch: &str, seq: u32, replayed: &[u32], recovered: bool) -> Answer {
        Answer {
            req,
            room: ROOM,
            encoding: Encoding::Plain,
            sync: Sync {
                epoch: Epoch::new(epoch).unwrap(),
                seq,
                recovered,
                missed: 0,
            },
            batches: replayed
                .iter()
                .map(|s| (*s, Bytes::from(format!("r{s}"))))
                .collect(),
        }
    }

    fn ask(r: &mut Resumes, key: u32, resume: ResumeField, now: Instant) -> u64 {
        match r.begin(ConnId::for_test(key, 1), ROOM, Encoding::Plain, resume, now) {
            Begin::Ask(req) => req.req,
            Begin::Now(f) => panic!("fell back: {:?}", f.outcome),
        }
    }

    fn names(b: &[Bytes]) -> Vec<String> {
        b.iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect()
    }

    #[test]
    fn replay_then_uncovered_then_sync_then_newer() {
        let now = Instant::now();
        let mut r = Resumes::new(3, limits());
        let req = ask(&mut r, 1, resume("e-1", 4), now);
        assert_eq!(req >> 48, 3);
        assert!(r.holds(1) && !r.holds(2));
        // Held while asking: 4 (the client had it), 5 (covered), high priority, 8 (newer).
        for (seq, p, tag) in [
            (4, Priority::Low, "h4"),
            (5, Priority::Low, "h5"),
            (1, Priority::High, "hi"),
            (8, Priority::Low, "h8"),
        ] {
            assert!(r.hold(1, &batch(seq, p), Bytes::from(tag), now).is_none());
        }
        let f = r
            .on_answer(req, Some(answer(req, "e-1", 7, &[5, 6, 7], true)), now)
            .unwrap();
        assert_eq!(names(&f.replayed), ["r5", "r6", "r7"]);
        assert!(f.before.is_empty());
        assert_eq!(names(&f.after), ["hi", "h8"]);
        assert_eq!((f.sync.seq, f.sync.recovered), (7, true));
        assert_eq!(f.outcome, Outcome::Recovered);
        assert!(r.is_empty());
        // A late duplicate answer is ignored.
        assert!(r
            .on_answer(req, Some(answer(req, "e-1", 7, &[], true)), now)
            .is_none());
    }

    #[test]
    fn fresh_client_keeps_held_batches_before_the_sync() {
        let now = Instant::now();
        let mut r = Resumes::new(0, limits());
        let req = ask(&mut r, 1, ResumeField::Absent, now);
        r.hold(1, &batch(3, Priority::Low), Bytes::from("h3"), now);
        r.hold(1, &batch(4, Priority::Low), Bytes::from("h4"), now);
        let f = r
            .on_answer(req, Some(answer(req, "e-1", 3, &[], true)), now)
            .unwrap();
        assert_eq!(names(&f.before), ["h3"]);
        assert_eq!(names(&f.after), ["h4"]);
        assert_eq!(f.outcome, Outcome::Fresh);
    }

    #[test]
    fn timeout_overflow_and_full_fall_back_with_the_gap() {
        let t0 = Instant::now();
        let mut r = Resumes::new(0, limits());
        // Learn the room's epoch from one answer.
        let req = ask(&mut r, 1, ResumeField::Absent, t0);
        r.on_answer(req, Some(answer(req, "e-1", 2, &[], true)), t0);

        ask(&mut r, 1, resume("e-1", 2), t0);
        r.hold(1, &batch(6, Priority::Low), Bytes::from("h6"), t0);
        let mut out = Vec::new();
        r.expire(t0 + Duration::from_millis(99), &mut out);
        assert!(out.is_empty());
        r.expire(t0 + Duration::from_millis(100), &mut out);
        let f = out.pop().unwrap();
        assert_eq!(f.outcome, Outcome::Timeout);
        // 3, 4 and 5 are gone: said, not hidden.
        assert_eq!(
            (
                f.sync.epoch.as_str(),
                f.sync.seq,
                f.sync.recovered,
                f.sync.missed
            ),
            ("e-1", 5, false, 3)
        );
        assert_eq!(names(&f.after), ["h6"]);

        ask(&mut r, 2, resume("e-1", 2), t0);
        assert!(r
            .hold(2, &batch(3, Priority::Low), Bytes::from("123456"), t0)
            .is_none());
        let f = r
            .hold(2, &batch(4, Priority::Low), Bytes::from("123456"), t0)
            .unwrap();
        assert_eq!(f.outcome, Outcome::Overflow);
        assert_eq!(f.after.len(), 2);
        assert!(!r.holds(2));

        ask(&mut r, 3, ResumeField::Absent, t0);
        ask(&mut r, 4, ResumeField::Absent, t0);
        match r.begin(
            ConnId::for_test(5, 1),
            ROOM,
            Encoding::Plain,
            resume("x", 1),
            t0,
        ) {
            Begin::Now(f) => {
                assert_eq!(f.outcome, Outcome::Full);
                assert!(!f.sync.recovered);
            }
            Begin::Ask(_) => panic!("over resumes_pending_max"),
        }
    }

    #[test]
    fn malformed_is_never_recovered_and_unknown_room_names_no_position() {
        let now = Instant::now();
        let mut r = Resumes::new(0, limits());
        let req = ask(
            &mut r,
            1,
            ResumeField::Malformed(proto::sync::ResumeError::Seq),
            now,
        );
        let f = r
            .on_answer(req, Some(answer(req, "e-1", 9, &[], true)), now)
            .unwrap();
        assert_eq!((f.outcome, f.sync.recovered), (Outcome::Malformed, false));
        let mut r = Resumes::new(0, limits());
        let req = ask(&mut r, 1, resume("old", 3), now);
        let f = r.on_answer(req, None, now).unwrap();
        assert_eq!(f.outcome, Outcome::Unlinked);
        // The client's own epoch, never a claim it is current: recovered is false.
        assert_eq!((f.sync.epoch.as_str(), f.sync.recovered), ("old", false));
        r.forget(1);
        assert!(r.is_empty());
    }
}
