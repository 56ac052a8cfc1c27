//! Per-room batch history for resume after reconnect (issue 9, DESIGN §11). Sans-io: batches
//! and `now` in, the batches to replay and the `BARRAGE_SYNC` answer out.
//!
//! A room keeps its last [`Limits::batches_max`] low-priority batches, none older than
//! [`Limits::ms_max`], in the encodings the broker produced, while all rooms together stay within
//! [`Limits::bytes_max`] (past it the globally oldest batch goes first).
//!
//! Epochs: a room's epoch is `"<boot as 16 hex digits>-<generation>"`. `boot` is chosen at random
//! by the broker at start, so every restart starts every room over; the generation grows when
//! the room's seq does not continue its last one (seq wrap at 2^31, a stream that restarted), and
//! the room's held batches are dropped then. A room never recorded is in generation 0 at seq 0,
//! so answering a client costs no state. The batch whose seq wraps to 0 starts a new epoch and
//! is not held (no client can ask for "after seq 0" of it).
//!
//! What [`History::replay_after`] answers (`last` = the room's last seq, `from` = the seq after
//! which the client needs batches):
//!
//! | request                          | replayed                         | `recovered`  | `missed`                 |
//! |----------------------------------|----------------------------------|--------------|--------------------------|
//! | no `resume`                      | nothing                          | true         | 0                        |
//! | malformed `resume`               | nothing                          | false        | 0                        |
//! | same epoch, `seq` = N <= last    | held batches in N+1..=last       | missed == 0  | (last - N) - replayed    |
//! | same epoch, N > last (ahead)     | nothing                          | false        | 0                        |
//! | other epoch (restart, wrap)      | held batches of this epoch       | false        | (last - base) - replayed |
//!
//! (`base` = the seq before the epoch's first.) A held batch lacking the client's encoding is
//! not replayed and counts as missed. `seq` in the answer is always the room's last seq: the
//! live stream continues after it.
//!
//! Invariants: the shell records a batch and answers resumes on the same shard thread, and
//! subscribes the connection to the live stream in the same turn as it answers, so replay and
//! live stream meet with no gap and no duplicate. Memory: the held bytes never exceed
//! `bytes_max` after [`History::record`] returns; per room ~64 bytes of metadata stay for the
//! broker's life, like the batcher's streams.

use crate::compress::Encoded;
use bytes::Bytes;
use proto::id::{Encoding, RoomId};
use proto::sync::{Epoch, ResumeField, Sync, ROOM_SEQ_MAX};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Default of `history_batches_max`.
pub const HISTORY_BATCHES_MAX: usize = 64;
/// Default of `history_ms_max`.
pub const HISTORY_MS_MAX: u64 = 30_000;
/// Default of `history_bytes_max` (all rooms of one broker shard together).
pub const HISTORY_BYTES_MAX: usize = 64 * 1024 * 1024;

/// History limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Batches kept per room.
    pub batches_max: usize,
    /// Age past which a batch is dropped.
    pub ms_max: u64,
    /// Bytes of all held encodings, all rooms together.
    pub bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            batches_max: HISTORY_BATCHES_MAX,
            ms_max: HISTORY_MS_MAX,
            bytes_max: HISTORY_BYTES_MAX,
        }
    }
}

/// How a resume request was answered (a metrics label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// No `resume` in the auth body.
    Fresh,
    /// Every batch after the client's seq was replayed (possibly none).
    Recovered,
    /// Some batches were no longer held (beyond history, or not in the client's encoding).
    Partial,
    /// The client's epoch is not the room's: what it lost before is unknown.
    OtherEpoch,
    /// The client's seq is ahead of the room's: its state is not ours.
    Ahead,
    /// The `resume` field was malformed and ignored.
    Malformed,
}

/// The answer to a resume: the outer packets to send after op 8, in order, then `sync`.
#[derive(Clone, Debug)]
pub struct Replay {
    /// (outer header seq, packet), oldest first.
    pub batches: Vec<(u32, Bytes)>,
    pub sync: Sync,
    pub outcome: Outcome,
}

struct Held {
    seq: u32,
    encoded: Encoded,
    bytes: usize,
}

#[derive(Default)]
struct Room {
    generation: u64,
    /// The seq before this epoch's first batch.
    base: u32,
    last: u32,
    held: VecDeque<Held>,
}

/// A held batch in global age order: (recorded at, room, generation, seq).
type Aged = (Instant, RoomId, u64, u32);

/// The history of every room of one broker shard.
pub struct History {
    limits: Limits,
    boot: u64,
    rooms: HashMap<RoomId, Room>,
    /// Every held batch in the order recorded; entries whose batch a room already dropped are
    /// skipped when they reach the front.
    aged: VecDeque<Aged>,
    bytes: usize,
}

impl History {
    /// `boot` names this broker run in every epoch; pick it at random at start.
    pub fn new(limits: Limits, boot: u64) -> History {
        History {
            limits,
            boot,
            rooms: HashMap::new(),
            aged: VecDeque::new(),
            bytes: 0,
        }
    }

    /// Keeps the low-priority batch `seq` (its outer header seq) of `room`.
    pub fn record(&mut self, room: RoomId, seq: u32, encoded: Encoded, now: Instant) {
        self.expire(now);
        let r = self.rooms.entry(room).or_default();
        let seq = seq & ROOM_SEQ_MAX;
        if seq == 0 || seq != r.last + 1 {
            // The seq does not continue: a new epoch, the old batches are not comparable.
            for h in r.held.drain(..) {
                self.bytes -= h.bytes;
            }
            r.generation += 1;
            r.base = seq.saturating_sub(1);
        }
        r.last = seq;
        if seq == 0 {
            // The batch at the wrap: "after seq 0" means "from the start", so it cannot be
            // asked for; the epoch starts over at it.
            return;
        }
        let bytes = [Encoding::Brotli, Encoding::Zlib, Encoding::Plain]
            .iter()
            .filter_map(|&e| encoded.get(e).map(Bytes::len))
            .sum::<usize>();
        if self.limits.batches_max == 0 {
            return;
        }
        r.held.push_back(Held {
            seq,
            encoded,
            bytes,
        });
        self.bytes += bytes;
        self.aged.push_back((now, room, r.generation, seq));
        while r.held.len() > self.limits.batches_max {
            if let Some(h) = r.held.pop_front() {
                self.bytes -= h.bytes;
            }
        }
        while self.bytes > self.limits.bytes_max {
            if !self.drop_oldest() {
                break;
            }
        }
    }

    /// Notes batch `seq` of `room` that is not kept (nobody watched it and the room held
    /// nothing to resume): the room's seq moves on, and what it held is dropped so that what
    /// it holds stays one run of consecutive seqs ending at the last. A client resuming
    /// across it is told `missed`, never handed a gap.
    pub fn skip(&mut self, room: RoomId, seq: u32, now: Instant) {
        self.expire(now);
        let r = self.rooms.entry(room).or_default();
        let seq = seq & ROOM_SEQ_MAX;
        if seq == 0 || seq != r.last + 1 {
            r.generation += 1;
            r.base = seq.saturating_sub(1);
        }
        r.last = seq;
        for h in r.held.drain(..) {
            self.bytes -= h.bytes;
        }
    }

    /// The encodings (a set of [`Encoding::bit`]) of the room's newest held batch, 0 when it
    /// holds none. The shell encodes an unwatched room's batch in these while the room still
    /// holds history (a viewer that left a moment ago may resume), and skips it otherwise.
    pub fn encodings_held(&self, room: RoomId) -> u8 {
        let Some(h) = self.rooms.get(&room).and_then(|r| r.held.back()) else {
            return 0;
        };
        [Encoding::Brotli, Encoding::Zlib, Encoding::Plain]
            .into_iter()
            .filter(|&e| h.encoded.get(e).is_some())
            .fold(0, |acc, e| acc | e.bit())
    }

    /// The link answer to a REPLAY: [`History::replay_after`], keeping only the newest
    /// batches that fit in a frame of `frame_bytes_max` (the older ones count as missed).
    pub fn answer(
        &mut self,
        req: &proto::link::replay::Request,
        frame_bytes_max: usize,
        now: Instant,
    ) -> (proto::link::replay::Answer, Outcome) {
        use proto::link::replay::{answer_batch_bytes, answer_overhead_bytes, Answer};
        let mut r = self.replay_after(req.room, &req.resume, req.encoding, now);
        let mut bytes = answer_overhead_bytes(&r.sync.epoch);
        let mut keep = 0;
        for (_, b) in r.batches.iter().rev() {
            let n = answer_batch_bytes(b);
            if bytes + n > frame_bytes_max {
                break;
            }
            bytes += n;
            keep += 1;
        }
        let cut = r.batches.len() - keep;
        if cut > 0 {
            r.batches.drain(..cut);
            r.sync.missed += cut as u64;
            r.sync.recovered = false;
            r.outcome = Outcome::Partial;
        }
        (
            Answer {
                req: req.req,
                room: req.room,
                encoding: req.encoding,
                sync: r.sync,
                batches: r.batches,
            },
            r.outcome,
        )
    }

    /// The room's epoch and last seq (what a client without `resume` is told).
    pub fn current(&self, room: RoomId) -> (Epoch, u32) {
        match self.rooms.get(&room) {
            Some(r) => (self.epoch_of(r.generation), r.last),
            None => (self.epoch_of(0), 0),
        }
    }

    /// What to send a client of `room` that authenticated with `resume`, in `encoding`.
    pub fn replay_after(
        &mut self,
        room: RoomId,
        resume: &ResumeField,
        encoding: Encoding,
        now: Instant,
    ) -> Replay {
        self.expire(now);
        let (epoch, last) = self.current(room);
        let answer = |recovered, missed, outcome| Replay {
            batches: Vec::new(),
            sync: Sync {
                epoch: epoch.clone(),
                seq: last,
                recovered,
                missed,
            },
            outcome,
        };
        let r = match resume {
            ResumeField::Absent => return answer(true, 0, Outcome::Fresh),
            ResumeField::Malformed(_) => return answer(false, 0, Outcome::Malformed),
            ResumeField::Valid(r) => r,
        };
        let base = self.rooms.get(&room).map_or(0, |r| r.base);
        let (from, outcome) = if r.epoch != epoch {
            (base, Outcome::OtherEpoch)
        } else if r.seq > last {
            return answer(false, 0, Outcome::Ahead);
        } else {
            // A seq below the epoch's base names batches this epoch never had.
            (r.seq.max(base), Outcome::Recovered)
        };
        let batches: Vec<(u32, Bytes)> = self
            .rooms
            .get(&room)
            .map(|rm| {
                rm.held
                    .iter()
                    .filter(|h| h.seq > from)
                    .filter_map(|h| h.encoded.get(encoding).map(|b| (h.seq, b.clone())))
                    .collect()
            })
            .unwrap_or_default();
        let missed = u64::from(last.saturating_sub(from)).saturating_sub(batches.len() as u64);
        let outcome = match outcome {
            Outcome::Recovered if missed > 0 => Outcome::Partial,
            o => o,
        };
        let mut out = answer(outcome == Outcome::Recovered, missed, outcome);
        out.batches = batches;
        out
    }

    /// Bytes of all held encodings.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Cluster mode: this broker just took over the rooms `moved` says (their backbone
    /// partition's lease). Each such room starts a new epoch here: what it held is from before
    /// another broker owned it, so a client resuming in the old epoch is told what it may have
    /// missed rather than "recovered". The seq goes on from this broker's last one. Returns
    /// how many rooms changed epoch.
    pub fn new_owner(&mut self, moved: impl Fn(RoomId) -> bool) -> usize {
        let mut n = 0;
        for (room, r) in self.rooms.iter_mut() {
            if !moved(*room) {
                continue;
            }
            for h in r.held.drain(..) {
                self.bytes -= h.bytes;
            }
            r.generation += 1;
            r.base = r.last;
            n += 1;
        }
        n
    }

    /// Batches held, all rooms.
    pub fn batches(&self) -> usize {
        self.rooms.values().map(|r| r.held.len()).sum()
    }

    fn epoch_of(&self, generation: u64) -> Epoch {
        Epoch::from_parts(self.boot, generation)
    }

    /// Drops every batch older than `ms_max`.
    fn expire(&mut self, now: Instant) {
        let ms_max = Duration::from_millis(self.limits.ms_max);
        while let Some(&(at, ..)) = self.aged.front() {
            if now.saturating_duration_since(at) < ms_max {
                break;
            }
            self.drop_oldest();
        }
    }

    /// Drops the batch at the front of the age queue if its room still holds it. False when
    /// the queue is empty.
    fn drop_oldest(&mut self) -> bool {
        let Some((_, room, generation, seq)) = self.aged.pop_front() else {
            return false;
        };
        if let Some(r) = self.rooms.get_mut(&room) {
            let front = r.held.front().map(|h| h.seq);
            if r.generation == generation && front == Some(seq) {
                if let Some(h) = r.held.pop_front() {
                    self.bytes -= h.bytes;
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proto::sync::{Resume, ResumeError};

    const ROOM: RoomId = RoomId(7);

    /// A batch whose brotli form names its room and seq (the bytes are what a client gets).
    fn enc(seq: u32, len: usize) -> Encoded {
        let mut b = format!("b{seq}:").into_bytes();
        b.resize(len.max(b.len()), b'.');
        Encoded {
            brotli: Some(Bytes::from(b)),
            ..Encoded::default()
        }
    }

    fn seq_of(b: &Bytes) -> u32 {
        let s = std::str::from_utf8(b).unwrap();
        s[1..s.find(':').unwrap()].parse().unwrap()
    }

    fn resume(h: &History, room: RoomId, seq: u32) -> ResumeField {
        ResumeField::Valid(Resume {
            epoch: h.current(room).0,
            seq,
        })
    }

    fn filled(limits: Limits, n: u32, t0: Instant) -> History {
        let mut h = History::new(limits, 0xab);
        for s in 1..=n {
            h.record(ROOM, s, enc(s, 10), t0);
        }
        h
    }

    fn seqs(r: &Replay) -> Vec<u32> {
        r.batches.iter().map(|(_, b)| seq_of(b)).collect()
    }

    #[test]
    fn replays_exactly_the_missed_batches() {
        let t0 = Instant::now();
        let mut h = filled(Limits::default(), 10, t0);
        let r = h.replay_after(ROOM, &resume(&h, ROOM, 7), Encoding::Brotli, t0);
        assert_eq!(seqs(&r), [8, 9, 10]);
        assert_eq!(r.outcome, Outcome::Recovered);
        assert_eq!(
            r.sync,
            Sync {
                epoch: Epoch::new("00000000000000ab-0").unwrap(),
                seq: 10,
                recovered: true,
                missed: 0
            }
        );
        let r = h.replay_after(ROOM, &resume(&h, ROOM, 10), Encoding::Brotli, t0);
        assert!(r.batches.is_empty());
        assert!(r.sync.recovered);
    }

    #[test]
    fn beyond_history_reports_what_is_missed() {
        let t0 = Instant::now();
        let limits = Limits {
            batches_max: 4,
            ..Limits::default()
        };
        let mut h = filled(limits, 10, t0);
        let r = h.replay_after(ROOM, &resume(&h, ROOM, 2), Encoding::Brotli, t0);
        assert_eq!(seqs(&r), [7, 8, 9, 10]);
        assert_eq!(
            (r.sync.recovered, r.sync.missed, r.sync.seq),
            (false, 4, 10)
        );
        assert_eq!(r.outcome, Outcome::Partial);
    }

    #[test]
    fn old_batches_age_out() {
        let t0 = Instant::now();
        let limits = Limits {
            ms_max: 1000,
            ..Limits::default()
        };
        let mut h = History::new(limits, 1);
        for s in 1..=10u32 {
            h.record(
                ROOM,
                s,
                enc(s, 10),
                t0 + Duration::from_millis(200 * u64::from(s)),
            );
        }
        // At 2100 ms, batches recorded at or before 1100 ms (seq <= 5) are older than 1000 ms.
        let r = h.replay_after(
            ROOM,
            &resume(&h, ROOM, 0),
            Encoding::Brotli,
            t0 + Duration::from_millis(2100),
        );
        assert_eq!(seqs(&r), [6, 7, 8, 9, 10]);
        assert_eq!(r.sync.missed, 5);
        let r = h.replay_after(
            ROOM,
            &resume(&h, ROOM, 3),
            Encoding::Brotli,
            t0 + Duration::from_secs(60),
        );
        assert!(r.batches.is_empty());
        assert_eq!((r.sync.missed, r.sync.recovered), (7, false));
        assert_eq!((h.bytes(), h.batches()), (0, 0));
    }

    #[test]
    fn another_epoch_replays_this_epoch_and_is_not_recovered() {
        let t0 = Instant::now();
        let mut h = filled(Limits::default(), 3, t0);
        let before = History::new(Limits::default(), 0x99).current(ROOM).0;
        let asked = ResumeField::Valid(Resume {
            epoch: before,
            seq: 50,
        });
        let r = h.replay_after(ROOM, &asked, Encoding::Brotli, t0);
        assert_eq!(seqs(&r), [1, 2, 3]);
        assert_eq!((r.sync.recovered, r.sync.missed, r.sync.seq), (false, 0, 3));
        assert_eq!(r.outcome, Outcome::OtherEpoch);
    }

    #[test]
    fn a_room_taken_over_starts_a_new_epoch_and_its_seq_goes_on() {
        let t0 = Instant::now();
        let mut h = filled(Limits::default(), 3, t0);
        let stays = RoomId(8);
        h.record(stays, 1, enc(1, 10), t0);
        let before = h.current(ROOM).0;
        let stays_before = h.current(stays).0;
        assert_eq!(h.new_owner(|r| r == ROOM), 1);
        let (after, last) = h.current(ROOM);
        assert_ne!(after, before, "the owner changed: a new epoch");
        assert_eq!(last, 3, "the seq goes on");
        assert_eq!(h.current(stays).0, stays_before);
        // The new epoch continues at 4; a client of the old epoch is not told "recovered".
        h.record(ROOM, 4, enc(4, 10), t0);
        assert_eq!(h.current(ROOM), (after, 4));
        let asked = ResumeField::Valid(Resume {
            epoch: before,
            seq: 3,
        });
        let r = h.replay_after(ROOM, &asked, Encoding::Brotli, t0);
        assert_eq!((seqs(&r), r.outcome), (vec![4], Outcome::OtherEpoch));
    }

    #[test]
    fn a_seq_that_does_not_continue_starts_a_new_epoch() {
        let t0 = Instant::now();
        let mut h = filled(Limits::default(), 5, t0);
        let old = h.current(ROOM).0;
        h.record(ROOM, 1, enc(1, 10), t0); // the stream restarted
        h.record(ROOM, 2, enc(2, 10), t0);
        let (new, last) = h.current(ROOM);
        assert_ne!(new, old);
        assert_eq!((new.as_str(), last), ("00000000000000ab-1", 2));
        assert_eq!(h.batches(), 2);
        let asked = ResumeField::Valid(Resume { epoch: old, seq: 5 });
        let r = h.replay_after(ROOM, &asked, Encoding::Brotli, t0);
        assert_eq!((seqs(&r), r.outcome), (vec![1, 2], Outcome::OtherEpoch));
        // The wrap: 2^31 - 1 is followed by 0, which starts over and is not held.
        h.record(ROOM, 3, enc(3, 10), t0);
        let mut w = History::new(Limits::default(), 2);
        w.record(ROOM, ROOM_SEQ_MAX - 1, enc(1, 10), t0);
        w.record(ROOM, ROOM_SEQ_MAX, enc(2, 10), t0);
        let e = w.current(ROOM).0;
        w.record(ROOM, 0, enc(0, 10), t0);
        w.record(ROOM, 1, enc(1, 10), t0);
        assert_ne!(w.current(ROOM).0, e);
        assert_eq!(w.current(ROOM).1, 1);
        assert_eq!(w.batches(), 1);
    }

    #[test]
    fn ahead_malformed_and_absent() {
        let t0 = Instant::now();
        let mut h = filled(Limits::default(), 4, t0);
        let r = h.replay_after(ROOM, &resume(&h, ROOM, 5), Encoding::Brotli, t0);
        assert!(r.batches.is_empty());
        assert_eq!(
            (r.sync.recovered, r.sync.missed, r.sync.seq, r.outcome),
            (false, 0, 4, Outcome::Ahead)
        );
        let bad = ResumeField::Malformed(ResumeError::Seq);
        let r = h.replay_after(ROOM, &bad, Encoding::Brotli, t0);
        assert_eq!(
            (r.sync.recovered, r.sync.missed, r.outcome),
            (false, 0, Outcome::Malformed)
        );
        let r = h.replay_after(ROOM, &ResumeField::Absent, Encoding::Brotli, t0);
        assert!(r.batches.is_empty());
        assert_eq!(
            (r.sync.recovered, r.sync.missed, r.sync.seq, r.outcome),
            (true, 0, 4, Outcome::Fresh)
        );
        // A room never recorded: generation 0, seq 0, no state created.
        let r = h.replay_after(RoomId(99), &ResumeField::Absent, Encoding::Brotli, t0);
        assert_eq!(
            (r.sync.epoch.as_str(), r.sync.seq),
            ("00000000000000ab-0", 0)
        );
    }

    #[test]
    fn a_missing_encoding_counts_as_missed() {
        let t0 = Instant::now();
        let mut h = filled(Limits::default(), 3, t0);
        h.record(
            ROOM,
            4,
            Encoded {
                plain: Some(Bytes::from_static(b"b4:")),
                ..Encoded::default()
            },
            t0,
        );
        let r = h.replay_after(ROOM, &resume(&h, ROOM, 1), Encoding::Brotli, t0);
        assert_eq!(seqs(&r), [2, 3]);
        assert_eq!((r.sync.missed, r.outcome), (1, Outcome::Partial));
        let r = h.replay_after(ROOM, &resume(&h, ROOM, 1), Encoding::Plain, t0);
        assert_eq!((seqs(&r), r.sync.missed), (vec![4], 2));
    }

    #[test]
    fn the_byte_budget_drops_the_globally_oldest_first() {
        let t0 = Instant::now();
        let limits = Limits {
            bytes_max: 100,
            ..Limits::default()
        };
        let mut h = History::new(limits, 3);
        let (a, b) = (RoomId(1), RoomId(2));
        h.record(a, 1, enc(1, 40), t0);
        h.record(b, 1, enc(1, 40), t0);
        h.record(a, 2, enc(2, 40), t0); // 120 > 100: a's seq 1 goes
        assert_eq!(h.bytes(), 80);
        let r = h.replay_after(a, &resume(&h, a, 0), Encoding::Brotli, t0);
        assert_eq!((seqs(&r), r.sync.missed), (vec![2], 1));
        let r = h.replay_after(b, &resume(&h, b, 0), Encoding::Brotli, t0);
        assert_eq!(seqs(&r), [1]);
        // One batch above the whole budget is not kept at all.
        h.record(b, 2, enc(2, 500), t0);
        assert!(h.bytes() <= 100);
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// Advance the clock, then record the next seq of a room (or restart its stream).
        Record {
            room: u8,
            advance_ms: u16,
            len: u8,
            restart: bool,
        },
        /// Advance the clock, then resume a room from `back` batches before its last.
        Resume {
            room: u8,
            advance_ms: u16,
            back: u8,
            stale_epoch: bool,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..3u8, 0..400u16, 1..60u8, prop::bool::weighted(0.05))
                .prop_map(|(room, advance_ms, len, restart)| Op::Record { room, advance_ms, len, restart }),
            1 => (0..3u8, 0..400u16, 0..20u8, prop::bool::weighted(0.2))
                .prop_map(|(room, advance_ms, back, stale_epoch)| Op::Resume { room, advance_ms, back, stale_epoch }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        /// Against a model that keeps every record: a resume replays exactly the records of the
        /// room's epoch after the asked seq that are among its last `batches_max`, younger than
        /// `ms_max`; the budget holds; replayed + missed always covers the asked span.
        #[test]
        fn matches_a_model_that_keeps_everything(ops in prop::collection::vec(op(), 1..120), budget in 200..4000usize) {
            let limits = Limits { batches_max: 8, ms_max: 3000, bytes_max: budget };
            let mut h = History::new(limits, 5);
            let t0 = Instant::now();
            let mut now = t0;
            // Per room: (epoch, every (seq, at, len) of the epoch).
            let mut model: HashMap<u8, (Epoch, Vec<(u32, Instant)>)> = HashMap::new();
            let mut epochs_seen = Vec::new();
            for op in ops {
                match op {
                    Op::Record { room, advance_ms, len, restart } => {
                        now += Duration::from_millis(u64::from(advance_ms));
                        let m = model.entry(room).or_insert_with(|| (h.current(RoomId(room.into())).0, Vec::new()));
                        let seq = if restart { 1 } else { m.1.last().map_or(1, |l| l.0 + 1) };
                        h.record(RoomId(room.into()), seq, enc(seq, len.into()), now);
                        let epoch = h.current(RoomId(room.into())).0;
                        if epoch != m.0 {
                            epochs_seen.push(m.0.clone());
                            *m = (epoch, Vec::new());
                        }
                        m.1.push((seq, now));
                        prop_assert!(h.bytes() <= budget);
                    }
                    Op::Resume { room, advance_ms, back, stale_epoch } => {
                        now += Duration::from_millis(u64::from(advance_ms));
                        let id = RoomId(room.into());
                        let (epoch, last) = h.current(id);
                        let asked_epoch = match (stale_epoch, epochs_seen.last()) {
                            (true, Some(e)) if *e != epoch => e.clone(),
                            _ => epoch.clone(),
                        };
                        let asked = last.saturating_sub(back.into());
                        let r = h.replay_after(id, &ResumeField::Valid(Resume { epoch: asked_epoch.clone(), seq: asked }), Encoding::Brotli, now);
                        let got = seqs(&r);
                        let recs = model.get(&room).map(|m| m.1.clone()).unwrap_or_default();
                        let from = if asked_epoch == epoch { asked } else { recs.first().map_or(0, |f| f.0 - 1) };
                        let may: Vec<u32> = recs.iter().rev().take(limits.batches_max).rev()
                            .filter(|(s, at)| *s > from && now.saturating_duration_since(*at) < Duration::from_millis(limits.ms_max))
                            .map(|(s, _)| *s).collect();
                        // The budget may have dropped an oldest prefix of what the model allows.
                        prop_assert!(may.ends_with(&got), "got {:?} may {:?}", got, may);
                        prop_assert_eq!(got.len() as u64 + r.sync.missed, u64::from(last - from));
                        prop_assert_eq!(r.sync.seq, last);
                        prop_assert_eq!(r.sync.recovered, asked_epoch == epoch && r.sync.missed == 0);
                        if budget >= 3 * 8 * 64 {
                            prop_assert_eq!(got, may);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_skipped_batch_drops_the_run_and_counts_as_missed() {
        let t0 = Instant::now();
        let mut h = filled(Limits::default(), 3, t0);
        assert_ne!(h.encodings_held(ROOM), 0);
        let epoch = h.current(ROOM).0;
        h.skip(ROOM, 4, t0);
        assert_eq!(h.encodings_held(ROOM), 0);
        assert_eq!(h.current(ROOM), (epoch, 4), "a skip continues the epoch");
        let r = h.replay_after(ROOM, &resume(&h, ROOM, 1), Encoding::Brotli, t0);
        assert!(r.batches.is_empty());
        assert_eq!((r.sync.recovered, r.sync.missed), (false, 3));
    }

    #[test]
    fn an_answer_keeps_the_newest_batches_that_fit_a_frame() {
        let t0 = Instant::now();
        let mut h = filled(Limits::default(), 5, t0);
        let req = proto::link::replay::Request {
            req: 1,
            room: ROOM,
            encoding: Encoding::Brotli,
            resume: resume(&h, ROOM, 0),
        };
        let (all, o) = h.answer(&req, 1 << 20, t0);
        assert_eq!((all.batches.len(), o), (5, Outcome::Recovered));
        let epoch = h.current(ROOM).0;
        let room_for_two = proto::link::replay::answer_overhead_bytes(&epoch) + 2 * (8 + 10);
        let (two, o) = h.answer(&req, room_for_two, t0);
        assert_eq!(
            two.batches.iter().map(|b| b.0).collect::<Vec<_>>(),
            vec![4, 5]
        );
        assert_eq!(
            (two.sync.recovered, two.sync.missed, o),
            (false, 3, Outcome::Partial)
        );
    }
}
