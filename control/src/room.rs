//! The room table: real ids, short ids, streamer uids and areas.
//!
//! Invariant: a lookup by a real room id wins over a short id with the same number, as on
//! Bilibili, where short ids are small numbers and real ids large ones. Room 0 never exists.

use crate::config::RoomEntry;
use std::collections::HashMap;

/// What the room endpoints and token issuing need to know about a room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoomInfo {
    pub room_id: u64,
    /// 0 when the room has none.
    pub short_id: u64,
    /// The streamer; 0 when unknown.
    pub uid: u64,
    pub area: u32,
}

/// Rooms from the config.
#[derive(Clone, Debug, Default)]
pub struct RoomTable {
    by_id: HashMap<u64, RoomInfo>,
    /// short id -> real id.
    by_short: HashMap<u64, u64>,
    strict: bool,
}

impl RoomTable {
    pub fn new(entries: &[RoomEntry], strict: bool) -> RoomTable {
        let mut t = RoomTable {
            strict,
            ..RoomTable::default()
        };
        for e in entries {
            t.by_id.insert(
                e.room_id,
                RoomInfo {
                    room_id: e.room_id,
                    short_id: e.short_id,
                    uid: e.uid,
                    area: e.area,
                },
            );
            if e.short_id != 0 {
                t.by_short.insert(e.short_id, e.room_id);
            }
        }
        t
    }

    /// Resolves a room id or short id. Unknown rooms are themselves (area 0) unless strict.
    pub fn resolve(&self, id: u64) -> Option<RoomInfo> {
        if id == 0 {
            return None;
        }
        if let Some(r) = self.by_id.get(&id) {
            return Some(*r);
        }
        if let Some(r) = self.by_short.get(&id).and_then(|real| self.by_id.get(real)) {
            return Some(*r);
        }
        if self.strict {
            return None;
        }
        Some(RoomInfo {
            room_id: id,
            short_id: 0,
            uid: 0,
            area: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(strict: bool) -> RoomTable {
        RoomTable::new(
            &[
                RoomEntry {
                    room_id: 21_000,
                    short_id: 5,
                    uid: 9,
                    area: 2,
                },
                RoomEntry {
                    room_id: 5,
                    short_id: 0,
                    uid: 1,
                    area: 1,
                },
                RoomEntry {
                    room_id: 30_000,
                    short_id: 7,
                    uid: 3,
                    area: 4,
                },
            ],
            strict,
        )
    }

    #[test]
    fn real_ids_then_short_ids_then_unknown() {
        let t = table(false);
        assert_eq!(t.resolve(21_000).map(|r| r.area), Some(2));
        // 5 is both a real id and a short id: the real room wins.
        assert_eq!(t.resolve(5).map(|r| r.room_id), Some(5));
        assert_eq!(
            t.resolve(7),
            Some(RoomInfo {
                room_id: 30_000,
                short_id: 7,
                uid: 3,
                area: 4
            })
        );
        assert_eq!(
            t.resolve(123),
            Some(RoomInfo {
                room_id: 123,
                short_id: 0,
                uid: 0,
                area: 0
            })
        );
        assert_eq!(t.resolve(0), None);
    }

    #[test]
    fn strict_tables_refuse_unknown_rooms() {
        let t = table(true);
        assert_eq!(t.resolve(123), None);
        assert_eq!(t.resolve(7).map(|r| r.room_id), Some(30_000));
    }
}
