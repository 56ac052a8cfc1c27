//! Per-shard user and device index: uid -> members and device -> members, for user-scope and
//! device-scope batches. O(1) join and leave, no locks (the owning shard is its only user).
//!
//! Members of one user (or device) form an intrusive doubly linked list threaded through a
//! per-member array indexed by the member key (slab index); the maps hold only the list head.
//! That keeps an idle connection's cost to one 32-byte link record plus its share of the two
//! maps (12-byte buckets), with no per-user heap allocation.
//!
//! Devices are keyed by a 64-bit keyed SipHash (`RandomState`, random per shard) of the device
//! id, not by the string: two distinct devices colliding (probability about n^2 / 2^65 for n
//! devices on a shard, ~3e-10 at 100k) would each also receive the other's device pushes.
//! The key is random per process, so a client choosing its `buvid` cannot aim a collision at
//! another device. Hash value 0 is remapped to 1 so 0 can mean "no device".
//!
//! Invariants:
//! - A member is in the user list of `links[m].uid` iff that uid != 0, and in the device list
//!   of `links[m].dev` iff that hash != 0; a member that left has both at 0.
//! - A map entry exists iff its list is non-empty, and points at the list head (`prev == NIL`).

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;

const NIL: u32 = u32::MAX;

/// Map key: a u64 as two u32 halves, so a bucket (key, head) is 12 bytes, not 16 (alignment 4).
type Key = [u32; 2];

fn key(x: u64) -> Key {
    [(x >> 32) as u32, x as u32]
}

#[derive(Clone, Copy, Debug)]
struct Links {
    uid: u64,
    dev: u64,
    u_next: u32,
    u_prev: u32,
    d_next: u32,
    d_prev: u32,
}

const EMPTY: Links = Links {
    uid: 0,
    dev: 0,
    u_next: NIL,
    u_prev: NIL,
    d_next: NIL,
    d_prev: NIL,
};

/// Which of the two lists.
#[derive(Clone, Copy)]
enum Kind {
    User,
    Device,
}

/// Per-shard uid/device -> members index.
#[derive(Debug)]
pub struct ReachIndex {
    users: HashMap<Key, u32>,
    devices: HashMap<Key, u32>,
    links: Vec<Links>,
    hasher: RandomState,
}

impl Default for ReachIndex {
    fn default() -> Self {
        Self::new()
    }
}

impl ReachIndex {
    pub fn new() -> Self {
        ReachIndex {
            users: HashMap::new(),
            devices: HashMap::new(),
            links: Vec::new(),
            hasher: RandomState::new(),
        }
    }

    /// The 64-bit key of a device id; 0 for no device.
    pub fn device_key(&self, device: &str) -> u64 {
        if device.is_empty() {
            return 0;
        }
        self.hasher.hash_one(device.as_bytes()).max(1)
    }

    /// Users with at least one member on this shard.
    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// Devices with at least one member on this shard.
    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    /// Adds `member` under `uid` (0 = guest: not indexed) and `device` (empty: not indexed).
    /// A member already present is moved (left first).
    pub fn join(&mut self, member: u32, uid: u64, device: &str) {
        let dev = self.device_key(device);
        self.leave(member);
        if uid == 0 && dev == 0 {
            return;
        }
        let m = member as usize;
        if self.links.len() <= m {
            self.links.resize(m + 1, EMPTY);
        }
        self.links[m].uid = uid;
        self.links[m].dev = dev;
        if uid != 0 {
            self.push(Kind::User, member, uid);
        }
        if dev != 0 {
            self.push(Kind::Device, member, dev);
        }
    }

    /// Removes `member` from its lists; a no-op when it is in none.
    pub fn leave(&mut self, member: u32) {
        let Some(l) = self.links.get(member as usize).copied() else {
            return;
        };
        if l.uid != 0 {
            self.unlink(Kind::User, member, l.uid);
        }
        if l.dev != 0 {
            self.unlink(Kind::Device, member, l.dev);
        }
        self.links[member as usize] = EMPTY;
    }

    /// Appends every member of `uid` to `out` (nothing for the guest uid 0).
    pub fn user_members(&self, uid: u64, out: &mut Vec<u32>) {
        if uid == 0 {
            return;
        }
        self.walk(Kind::User, self.users.get(&key(uid)).copied(), out);
    }

    /// Appends every member of `device` to `out` (nothing for an empty id).
    pub fn device_members(&self, device: &str, out: &mut Vec<u32>) {
        let dev = self.device_key(device);
        if dev == 0 {
            return;
        }
        self.walk(Kind::Device, self.devices.get(&key(dev)).copied(), out);
    }

    fn walk(&self, kind: Kind, head: Option<u32>, out: &mut Vec<u32>) {
        let mut cur = head.unwrap_or(NIL);
        // Bounded by the member count even if the lists were ever corrupted.
        let mut budget = self.links.len();
        while cur != NIL && budget > 0 {
            out.push(cur);
            budget -= 1;
            cur = match self.links.get(cur as usize) {
                Some(l) => match kind {
                    Kind::User => l.u_next,
                    Kind::Device => l.d_next,
                },
                None => NIL,
            };
        }
    }

    fn map(&mut self, kind: Kind) -> &mut HashMap<Key, u32> {
        match kind {
            Kind::User => &mut self.users,
            Kind::Device => &mut self.devices,
        }
    }

    fn next_prev(&mut self, kind: Kind, m: u32) -> (&mut u32, &mut u32) {
        let l = &mut self.links[m as usize];
        match kind {
            Kind::User => (&mut l.u_next, &mut l.u_prev),
            Kind::Device => (&mut l.d_next, &mut l.d_prev),
        }
    }

    /// Pushes `member` at the head of `key`'s list.
    fn push(&mut self, kind: Kind, member: u32, k: u64) {
        let old = self.map(kind).insert(key(k), member).unwrap_or(NIL);
        {
            let (next, prev) = self.next_prev(kind, member);
            *next = old;
            *prev = NIL;
        }
        if old != NIL {
            *self.next_prev(kind, old).1 = member;
        }
    }

    fn unlink(&mut self, kind: Kind, member: u32, k: u64) {
        let (next, prev) = {
            let (n, p) = self.next_prev(kind, member);
            (*n, *p)
        };
        if prev == NIL {
            if next == NIL {
                self.map(kind).remove(&key(k));
            } else {
                self.map(kind).insert(key(k), next);
            }
        } else {
            *self.next_prev(kind, prev).0 = next;
        }
        if next != NIL {
            *self.next_prev(kind, next).1 = prev;
        }
    }

    /// Bytes of heap the index holds (for the memory budget report).
    pub fn heap_bytes(&self) -> usize {
        self.links.capacity() * std::mem::size_of::<Links>()
            + (self.users.capacity() + self.devices.capacity()) * 13
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn users(ix: &ReachIndex, uid: u64) -> Vec<u32> {
        let mut v = Vec::new();
        ix.user_members(uid, &mut v);
        v.sort();
        v
    }

    fn devices(ix: &ReachIndex, d: &str) -> Vec<u32> {
        let mut v = Vec::new();
        ix.device_members(d, &mut v);
        v.sort();
        v
    }

    #[test]
    fn guest_and_empty_device_are_not_indexed() {
        let mut ix = ReachIndex::new();
        ix.join(0, 0, "");
        ix.join(1, 0, "d");
        ix.join(2, 7, "");
        assert!(users(&ix, 0).is_empty());
        assert!(devices(&ix, "").is_empty());
        assert_eq!(devices(&ix, "d"), vec![1]);
        assert_eq!(users(&ix, 7), vec![2]);
        ix.leave(1);
        ix.leave(1);
        ix.leave(99);
        assert_eq!(ix.device_count(), 0);
        ix.leave(2);
        assert_eq!(ix.user_count(), 0);
    }

    proptest! {
        /// Against a model (member -> (uid, device)) under random joins and leaves.
        #[test]
        fn reach_matches_model(ops in proptest::collection::vec((0u32..30, 0u64..5, 0u8..4, any::<bool>()), 1..300)) {
            let mut ix = ReachIndex::new();
            let mut model: HashMap<u32, (u64, String)> = HashMap::new();
            let dev = |d: u8| if d == 0 { String::new() } else { format!("dev-{d}") };
            for (m, uid, d, join) in ops {
                if join {
                    ix.join(m, uid, &dev(d));
                    model.insert(m, (uid, dev(d)));
                } else {
                    ix.leave(m);
                    model.remove(&m);
                }
                for u in 0..5u64 {
                    let mut want: Vec<u32> = model.iter().filter(|(_, (x, _))| *x == u && u != 0).map(|(m, _)| *m).collect();
                    want.sort();
                    prop_assert_eq!(users(&ix, u), want);
                }
                for d in 0..4u8 {
                    let mut want: Vec<u32> = model.iter().filter(|(_, (_, x))| *x == dev(d) && d != 0).map(|(m, _)| *m).collect();
                    want.sort();
                    prop_assert_eq!(devices(&ix, &dev(d)), want);
                }
            }
        }
    }
}
