//! Per-shard room index: room -> members, area -> rooms. O(1) join and leave, no locks (the
//! shard that owns it is its only reader and writer).
//!
//! Members of a room are split into *lanes*, one per (encoding, transport): a batch arrives in
//! one encoding, so fan-out walks exactly the lanes that want it and sends each lane the same
//! bytes (raw packet for TCP, one prebuilt WebSocket frame for WS) with no per-member branch.
//!
//! Invariants:
//! - A member is in at most one lane of one room at a time; `pos[member]` is its index in that
//!   lane's vector (kept exact by swap-remove).
//! - A room exists iff it has at least one member; an area entry exists iff it has a room.
//! - A room's area is the area of its first viewer's token (later tokens that disagree do not
//!   move it: one room, one area).

use proto::id::{AreaId, Encoding, RoomId};
use std::collections::HashMap;

/// A set of encodings (which compressions some viewers asked for). On the link wire it is the
/// bitmask of [`Encoding::bit`]; in code it is this type, so a set is never confused with a
/// count or an id.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EncodingSet(u8);

impl EncodingSet {
    /// No encoding: nobody wants it.
    pub const EMPTY: EncodingSet = EncodingSet(0);

    /// The set holding only `e`.
    pub fn of(e: Encoding) -> EncodingSet {
        EncodingSet(e.bit())
    }

    /// From the link wire's bitmask (unknown bits are dropped).
    pub fn from_bits(bits: u8) -> EncodingSet {
        EncodingSet(bits & (Encoding::Plain.bit() | Encoding::Zlib.bit() | Encoding::Brotli.bit()))
    }

    /// The link wire's bitmask.
    pub fn bits(self) -> u8 {
        self.0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn contains(self, e: Encoding) -> bool {
        self.0 & e.bit() != 0
    }

    /// Both sets together.
    pub fn union(self, other: EncodingSet) -> EncodingSet {
        EncodingSet(self.0 | other.0)
    }
}

impl std::ops::BitOr for EncodingSet {
    type Output = EncodingSet;
    fn bitor(self, rhs: EncodingSet) -> EncodingSet {
        self.union(rhs)
    }
}

/// Lanes per room: 3 encodings x 3 kinds of bytes (TCP packets, WS frames, UDP datagrams).
pub const LANES: usize = 9;

/// Which lane a member sits in: encoding * 3 + kind (0 TCP, 1 WS, 2 UDP).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Lane(pub u8);

impl Lane {
    pub fn new(encoding: Encoding, ws: bool) -> Lane {
        Lane(encoding_index(encoding) * 3 + u8::from(ws))
    }

    /// The UDP lane of an encoding (its members get the batch as datagrams).
    pub fn udp(encoding: Encoding) -> Lane {
        Lane(encoding_index(encoding) * 3 + 2)
    }

    pub fn encoding(self) -> Encoding {
        match self.0 / 3 {
            0 => Encoding::Plain,
            1 => Encoding::Zlib,
            _ => Encoding::Brotli,
        }
    }

    pub fn is_ws(self) -> bool {
        self.0 % 3 == 1
    }

    pub fn is_udp(self) -> bool {
        self.0 % 3 == 2
    }
}

fn encoding_index(e: Encoding) -> u8 {
    match e {
        Encoding::Plain => 0,
        Encoding::Zlib => 1,
        Encoding::Brotli => 2,
    }
}

/// The three lanes (TCP, WS, UDP) carrying an encoding.
pub fn lanes_of(e: Encoding) -> [Lane; 3] {
    let i = encoding_index(e) * 3;
    [Lane(i), Lane(i + 1), Lane(i + 2)]
}

#[derive(Debug, Default)]
struct Room {
    lanes: [Vec<u32>; LANES],
    area: AreaId,
    /// Index of this room in its area's room list.
    area_pos: u32,
}

impl Room {
    fn len(&self) -> usize {
        self.lanes.iter().map(Vec::len).sum()
    }

    fn encodings(&self) -> EncodingSet {
        let mut set = EncodingSet::EMPTY;
        for (i, l) in self.lanes.iter().enumerate() {
            if !l.is_empty() {
                set = set | EncodingSet::of(Lane(i as u8).encoding());
            }
        }
        set
    }
}

/// What a join or leave changed, for the node-wide interest (SUB/UNSUB). `None` = unchanged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// The room's new encoding set on this shard (empty = no viewers left).
    pub room: Option<EncodingSet>,
    /// The area the room is filed under.
    pub area: AreaId,
    /// The area's new encoding set on this shard (empty = no viewers left in the area).
    pub area_set: Option<EncodingSet>,
}

/// Per-shard room index over members named by `u32` keys (slab indexes).
#[derive(Debug, Default)]
pub struct RoomIndex {
    rooms: HashMap<RoomId, Room>,
    areas: HashMap<AreaId, Vec<RoomId>>,
    pos: Vec<u32>,
    members: usize,
}

impl RoomIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Rooms with at least one member.
    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    /// Members in all rooms.
    pub fn member_count(&self) -> usize {
        self.members
    }

    pub fn has_room(&self, room: RoomId) -> bool {
        self.rooms.contains_key(&room)
    }

    /// Members of a room on this shard.
    pub fn room_len(&self, room: RoomId) -> usize {
        self.rooms.get(&room).map_or(0, Room::len)
    }

    /// Encoding set wanted by this shard's viewers of `room` (0 when none).
    pub fn room_encodings(&self, room: RoomId) -> EncodingSet {
        self.rooms
            .get(&room)
            .map_or(EncodingSet::EMPTY, Room::encodings)
    }

    /// Encoding set wanted by this shard's viewers of any room in `area`.
    pub fn area_encodings(&self, area: AreaId) -> EncodingSet {
        self.areas.get(&area).map_or(EncodingSet::EMPTY, |rs| {
            rs.iter()
                .filter_map(|r| self.rooms.get(r))
                .fold(EncodingSet::EMPTY, |b, r| b | r.encodings())
        })
    }

    /// The area a room is filed under on this shard.
    pub fn room_area(&self, room: RoomId) -> Option<AreaId> {
        self.rooms.get(&room).map(|r| r.area)
    }

    /// Members of one lane of a room.
    pub fn lane(&self, room: RoomId, lane: Lane) -> &[u32] {
        self.rooms
            .get(&room)
            .map_or(&[], |r| &r.lanes[lane.0 as usize])
    }

    /// Rooms of an area on this shard.
    pub fn rooms_in_area(&self, area: AreaId) -> &[RoomId] {
        self.areas.get(&area).map_or(&[], Vec::as_slice)
    }

    /// Every room on this shard with its member count.
    pub fn rooms(&self) -> impl Iterator<Item = (RoomId, usize)> + '_ {
        self.rooms.iter().map(|(id, r)| (*id, r.len()))
    }

    /// Every (room, area) pair on this shard.
    pub fn room_areas(&self) -> impl Iterator<Item = (RoomId, AreaId)> + '_ {
        self.rooms.iter().map(|(id, r)| (*id, r.area))
    }

    /// Adds `member` to `room` in `lane`. The caller guarantees the member is in no room.
    pub fn join(&mut self, member: u32, room: RoomId, area: AreaId, lane: Lane) -> Change {
        let m = member as usize;
        if self.pos.len() <= m {
            self.pos.resize(m + 1, 0);
        }
        let room_before = self.room_encodings(room);
        let room_after = room_before | EncodingSet::of(lane.encoding());
        let area = self.rooms.get(&room).map_or(area, |r| r.area);
        // Only a change of the room's set can change the area's; skip the O(rooms) walk otherwise.
        let area_before = if room_before != room_after {
            self.area_encodings(area)
        } else {
            EncodingSet::EMPTY
        };
        let r = self.rooms.entry(room).or_default();
        if room_before.is_empty() {
            r.area = area;
            let list = self.areas.entry(area).or_default();
            r.area_pos = list.len() as u32;
            list.push(room);
        }
        let l = &mut r.lanes[lane.0 as usize];
        self.pos[m] = l.len() as u32;
        l.push(member);
        self.members += 1;
        if room_before == room_after {
            return Change {
                room: None,
                area,
                area_set: None,
            };
        }
        let area_after = area_before | room_after;
        Change {
            room: Some(room_after),
            area,
            area_set: (area_after != area_before).then_some(area_after),
        }
    }

    /// Removes `member` from `room`'s `lane`. Returns `None` if it was not there.
    pub fn leave(&mut self, member: u32, room: RoomId, lane: Lane) -> Option<Change> {
        let m = member as usize;
        let p = *self.pos.get(m)? as usize;
        let r = self.rooms.get(&room)?;
        if r.lanes[lane.0 as usize].get(p) != Some(&member) {
            return None;
        }
        let room_before = r.encodings();
        let area = r.area;
        let r = self.rooms.get_mut(&room)?;
        let l = &mut r.lanes[lane.0 as usize];
        l.swap_remove(p);
        if let Some(moved) = l.get(p) {
            self.pos[*moved as usize] = p as u32;
        }
        self.members -= 1;
        let room_after = r.encodings();
        if room_before == room_after {
            return Some(Change {
                room: None,
                area,
                area_set: None,
            });
        }
        let area_pos = r.area_pos as usize;
        let area_before = self.area_encodings_with(area, room, room_before);
        if room_after.is_empty() {
            // Last member: drop the room and unlink it from its area in O(1).
            self.rooms.remove(&room);
            if let Some(list) = self.areas.get_mut(&area) {
                if list.get(area_pos) == Some(&room) {
                    list.swap_remove(area_pos);
                    if let Some(moved) = list.get(area_pos).copied() {
                        if let Some(mr) = self.rooms.get_mut(&moved) {
                            mr.area_pos = area_pos as u32;
                        }
                    }
                }
                if list.is_empty() {
                    self.areas.remove(&area);
                }
            }
        }
        let area_after = self.area_encodings(area);
        Some(Change {
            room: Some(room_after),
            area,
            area_set: (area_after != area_before).then_some(area_after),
        })
    }

    /// The area's encodings computed as if `room` had `room_set`.
    fn area_encodings_with(
        &self,
        area: AreaId,
        room: RoomId,
        room_set: EncodingSet,
    ) -> EncodingSet {
        self.areas.get(&area).map_or(EncodingSet::EMPTY, |rs| {
            rs.iter().fold(EncodingSet::EMPTY, |b, r| {
                if *r == room {
                    b | room_set
                } else {
                    b | self
                        .rooms
                        .get(r)
                        .map_or(EncodingSet::EMPTY, Room::encodings)
                }
            })
        })
    }

    /// Bytes of heap the index holds per member (for the memory budget report).
    pub fn heap_bytes(&self) -> usize {
        let lanes: usize = self
            .rooms
            .values()
            .map(|r| r.lanes.iter().map(|l| l.capacity() * 4).sum::<usize>())
            .sum();
        lanes + self.pos.capacity() * 4 + self.rooms.capacity() * (std::mem::size_of::<Room>() + 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{HashMap, HashSet};

    #[test]
    fn join_leave_reports_first_and_last() {
        let mut ix = RoomIndex::new();
        let r = RoomId(9);
        let a = AreaId(1);
        let br = Lane::new(Encoding::Brotli, false);
        let c = ix.join(1, r, a, br);
        assert_eq!(c.room, Some(EncodingSet::of(Encoding::Brotli)));
        assert_eq!(c.area_set, Some(EncodingSet::of(Encoding::Brotli)));
        let c = ix.join(2, r, a, Lane::new(Encoding::Brotli, true));
        assert_eq!(c.room, None);
        let c = ix.join(3, r, a, Lane::new(Encoding::Plain, true));
        assert_eq!(
            c.room,
            Some(EncodingSet::of(Encoding::Brotli) | EncodingSet::of(Encoding::Plain))
        );
        assert_eq!(
            c.area_set,
            Some(EncodingSet::of(Encoding::Brotli) | EncodingSet::of(Encoding::Plain))
        );
        assert_eq!(ix.room_len(r), 3);
        ix.leave(3, r, Lane::new(Encoding::Plain, true)).unwrap();
        ix.leave(1, r, br).unwrap();
        assert_eq!(ix.lane(r, Lane::new(Encoding::Brotli, true)), &[2]);
        let c = ix.leave(2, r, Lane::new(Encoding::Brotli, true)).unwrap();
        assert_eq!(c.room, Some(EncodingSet::EMPTY));
        assert_eq!(c.area_set, Some(EncodingSet::EMPTY));
        assert_eq!(ix.room_count(), 0);
        assert!(ix.rooms_in_area(a).is_empty());
        // Leaving twice is refused, not corrupting.
        assert!(ix.leave(2, r, br).is_none());
    }

    #[derive(Clone, Debug)]
    enum Op {
        Join {
            member: u32,
            room: u64,
            area: u32,
            lane: u8,
        },
        Leave {
            member: u32,
        },
        Publish {
            room: u64,
            enc: u8,
        },
        PublishArea {
            area: u32,
            enc: u8,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u32..40, 0u64..6, 0u32..3, 0u8..6).prop_map(|(member, room, area, lane)| Op::Join { member, room, area, lane }),
            2 => (0u32..40).prop_map(|member| Op::Leave { member }),
            2 => (0u64..6, 0u8..3).prop_map(|(room, enc)| Op::Publish { room, enc }),
            1 => (0u32..3, 0u8..3).prop_map(|(area, enc)| Op::PublishArea { area, enc }),
        ]
    }

    fn enc(i: u8) -> Encoding {
        [Encoding::Plain, Encoding::Zlib, Encoding::Brotli][i as usize]
    }

    proptest! {
        /// The index against a simple model (room -> set of members) under random joins,
        /// leaves (disconnects) and publishes: identical recipient sets, identical
        /// first/last signals.
        #[test]
        fn index_matches_model(ops in proptest::collection::vec(op(), 1..300)) {
            let mut ix = RoomIndex::new();
            // member -> (room, lane); room -> members; room -> area (first joiner's)
            let mut seat: HashMap<u32, (RoomId, Lane)> = HashMap::new();
            let mut model: HashMap<RoomId, HashSet<u32>> = HashMap::new();
            let mut room_area: HashMap<RoomId, AreaId> = HashMap::new();
            for op in ops {
                match op {
                    Op::Join { member, room, area, lane } => {
                        if seat.contains_key(&member) { continue; }
                        let (room, lane) = (RoomId(room), Lane(lane));
                        let was_empty = model.get(&room).is_none_or(|s| s.is_empty());
                        if was_empty { room_area.insert(room, AreaId(area)); }
                        let c = ix.join(member, room, AreaId(area), lane);
                        if was_empty { prop_assert!(c.room.is_some()); }
                        model.entry(room).or_default().insert(member);
                        seat.insert(member, (room, lane));
                    }
                    Op::Leave { member } => {
                        let Some((room, lane)) = seat.remove(&member) else {
                            continue;
                        };
                        let c = ix.leave(member, room, lane).unwrap();
                        let set = model.get_mut(&room).unwrap();
                        set.remove(&member);
                        prop_assert_eq!(c.room == Some(EncodingSet::EMPTY), set.is_empty());
                        if set.is_empty() { model.remove(&room); room_area.remove(&room); }
                    }
                    Op::Publish { room, enc: e } => {
                        let room = RoomId(room);
                        let mut got: Vec<u32> = lanes_of(enc(e)).iter().flat_map(|l| ix.lane(room, *l).iter().copied()).collect();
                        got.sort();
                        let mut want: Vec<u32> = model.get(&room).map(|s| s.iter().copied().filter(|m| seat[m].1.encoding() == enc(e)).collect()).unwrap_or_default();
                        want.sort();
                        prop_assert_eq!(got, want);
                    }
                    Op::PublishArea { area, enc: e } => {
                        let area = AreaId(area);
                        let mut got: Vec<u32> = Vec::new();
                        for r in ix.rooms_in_area(area) {
                            for l in lanes_of(enc(e)) {
                                got.extend_from_slice(ix.lane(*r, l));
                            }
                        }
                        got.sort();
                        let mut want: Vec<u32> = seat.iter().filter(|(_, (r, l))| room_area.get(r) == Some(&area) && l.encoding() == enc(e)).map(|(m, _)| *m).collect();
                        want.sort();
                        prop_assert_eq!(got, want);
                    }
                }
                prop_assert_eq!(ix.room_count(), model.len());
                prop_assert_eq!(ix.member_count(), seat.len());
            }
        }
    }
}
