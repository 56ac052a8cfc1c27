//! Online counts pushed to viewers (issue 10): for the rooms that ask for it, the shard that
//! owns a room pushes `{"cmd":"ONLINE_RANK_COUNT","data":{"count":N}}` to it every
//! `count_push_ms`, when the count changed since the last push. Sans-io: `now` and the
//! shard's fleet-wide counts in, the pushes to make out.
//!
//! # Rules
//! - The count is the one op 3 heartbeat replies carry: the room's connections fleet-wide, as
//!   the edges last reported them (`crate::route`).
//! - A room is announced when its count differs from the last one announced (the first time:
//!   when it has a count above 0). A room nobody watches any more is forgotten, not announced
//!   (nobody would receive it); if it fills again it is announced afresh.
//! - Which rooms: `count_push_rooms`, or every room with `count_push_all_rooms`. Off (no
//!   timer at all) when neither names a room or `count_push_ms` is 0.

use proto::id::RoomId;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// Default `count_push_ms`.
pub const COUNT_PUSH_MS: u64 = 5_000;

/// The body of one count push.
pub fn body(count: u64) -> Vec<u8> {
    format!(r#"{{"cmd":"ONLINE_RANK_COUNT","data":{{"count":{count}}}}}"#).into_bytes()
}

/// Which rooms get count pushes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rooms {
    All,
    Listed(HashSet<RoomId>),
}

/// One shard's count pushes.
#[derive(Debug)]
pub struct Announcer {
    every: Duration,
    rooms: Rooms,
    /// The count last announced per room.
    sent: HashMap<RoomId, u64>,
    next: Instant,
}

impl Announcer {
    /// `None` when count pushes are off.
    pub fn new(every_ms: u64, rooms: Rooms, now: Instant) -> Option<Announcer> {
        let off = every_ms == 0 || matches!(&rooms, Rooms::Listed(r) if r.is_empty());
        if off {
            return None;
        }
        let every = Duration::from_millis(every_ms);
        Some(Announcer {
            every,
            rooms,
            sent: HashMap::new(),
            next: now + every,
        })
    }

    /// When [`Announcer::poll`] has work next.
    pub fn next_deadline(&self) -> Instant {
        self.next
    }

    /// Past the deadline: the (room, count) pushes to make now, in room order. `counts` lists
    /// the shard's rooms with their fleet-wide counts (rooms without viewers may be absent).
    pub fn poll(
        &mut self,
        now: Instant,
        counts: impl Iterator<Item = (RoomId, u64)>,
    ) -> Vec<(RoomId, u64)> {
        if now < self.next {
            return Vec::new();
        }
        self.next = now + self.every;
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for (room, n) in counts {
            let wanted = match &self.rooms {
                Rooms::All => true,
                Rooms::Listed(r) => r.contains(&room),
            };
            if !wanted || n == 0 {
                continue;
            }
            seen.insert(room);
            if self.sent.insert(room, n) != Some(n) {
                out.push((room, n));
            }
        }
        self.sent.retain(|r, _| seen.contains(r));
        out.sort_unstable();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rooms(ids: &[u64]) -> Rooms {
        Rooms::Listed(ids.iter().copied().map(RoomId).collect())
    }

    #[test]
    fn announces_changes_only_at_the_interval() {
        let t0 = Instant::now();
        let mut a = Announcer::new(1_000, rooms(&[1, 2]), t0).expect("on");
        let counts = |v: &[(u64, u64)]| {
            v.iter()
                .map(|(r, n)| (RoomId(*r), *n))
                .collect::<Vec<_>>()
                .into_iter()
        };
        // Before the first deadline: nothing.
        assert_eq!(a.poll(t0, counts(&[(1, 5)])), vec![]);
        let t1 = t0 + Duration::from_millis(1_000);
        // Room 3 is not listed.
        assert_eq!(
            a.poll(t1, counts(&[(1, 5), (2, 7), (3, 9)])),
            vec![(RoomId(1), 5), (RoomId(2), 7)]
        );
        assert_eq!(a.next_deadline(), t1 + Duration::from_millis(1_000));
        // Unchanged: nothing; changed: once.
        let t2 = t1 + Duration::from_millis(1_000);
        assert_eq!(a.poll(t2, counts(&[(1, 5), (2, 8)])), vec![(RoomId(2), 8)]);
        // Room 1 emptied: forgotten, not announced; it is announced again when it fills.
        let t3 = t2 + Duration::from_millis(1_000);
        assert_eq!(a.poll(t3, counts(&[(2, 8)])), vec![]);
        let t4 = t3 + Duration::from_millis(1_000);
        assert_eq!(a.poll(t4, counts(&[(1, 5), (2, 8)])), vec![(RoomId(1), 5)]);
    }

    #[test]
    fn all_rooms_and_off() {
        let t0 = Instant::now();
        assert!(Announcer::new(0, Rooms::All, t0).is_none());
        assert!(Announcer::new(1_000, rooms(&[]), t0).is_none());
        let mut a = Announcer::new(10, Rooms::All, t0).expect("on");
        let t1 = t0 + Duration::from_millis(10);
        assert_eq!(
            a.poll(t1, [(RoomId(9), 1), (RoomId(4), 0)].into_iter()),
            vec![(RoomId(9), 1)]
        );
        assert_eq!(
            body(12),
            br#"{"cmd":"ONLINE_RANK_COUNT","data":{"count":12}}"#.to_vec()
        );
    }
}
