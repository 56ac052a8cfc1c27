//! Node-wide interest: which shards have viewers of room R / area A, and in which encodings.
//!
//! Owned by the link shard (shard 0) alone; every other shard tells it by event (over its ring)
//! when its own encoding set for a room or area changes (first viewer, last viewer, a new
//! encoding). The union over shards is what the node SUBscribes with at the broker.
//!
//! Invariants: an entry exists iff some shard has a non-zero set for it; `union` is always
//! the OR of the per-shard sets.

use crate::index::EncodingSet;
use proto::id::{Encoding, RoomId};
use proto::link::Interest;
use std::collections::HashMap;

#[derive(Debug, Clone)]
struct Entry {
    /// Encoding set per shard (index = shard).
    per_shard: Vec<EncodingSet>,
    union: EncodingSet,
}

/// What the node must tell the brokers after an update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Update {
    /// SUB with this (new) encoding set.
    Sub(EncodingSet),
    /// UNSUB: no viewers left on the node.
    Unsub,
}

/// The node-wide interest map plus the latest per-shard viewer counts.
#[derive(Debug)]
pub struct NodeInterest {
    shards: usize,
    map: HashMap<Interest, Entry>,
    /// Latest viewer counts per shard (replaced wholesale by each shard's report).
    counts: Vec<Vec<(RoomId, u32)>>,
}

impl NodeInterest {
    pub fn new(shards: usize) -> Self {
        NodeInterest {
            shards,
            map: HashMap::new(),
            counts: vec![Vec::new(); shards],
        }
    }

    /// Records that `shard` now wants `interest` in `set` (0 = no viewers). Returns what to
    /// send to the brokers, if the node-wide set changed.
    pub fn update(&mut self, shard: usize, interest: Interest, set: EncodingSet) -> Option<Update> {
        if shard >= self.shards {
            return None;
        }
        match self.map.get_mut(&interest) {
            None if set.is_empty() => None,
            None => {
                let mut per_shard = vec![EncodingSet::EMPTY; self.shards];
                per_shard[shard] = set;
                self.map.insert(
                    interest,
                    Entry {
                        per_shard,
                        union: set,
                    },
                );
                Some(Update::Sub(set))
            }
            Some(e) => {
                e.per_shard[shard] = set;
                let union = e.per_shard.iter().fold(EncodingSet::EMPTY, |a, b| a | *b);
                let before = e.union;
                e.union = union;
                if union.is_empty() {
                    self.map.remove(&interest);
                    Some(Update::Unsub)
                } else if union != before {
                    Some(Update::Sub(union))
                } else {
                    None
                }
            }
        }
    }

    /// Shards with viewers of `interest` wanting `encoding`.
    pub fn shards_for(
        &self,
        interest: &Interest,
        encoding: Encoding,
    ) -> impl Iterator<Item = usize> + '_ {
        self.map.get(interest).into_iter().flat_map(move |e| {
            e.per_shard
                .iter()
                .enumerate()
                .filter(move |(_, s)| s.contains(encoding))
                .map(|(i, _)| i)
        })
    }

    /// Every interest with its node-wide set (what a reconnected link re-sends).
    pub fn all(&self) -> impl Iterator<Item = (&Interest, EncodingSet)> + '_ {
        self.map.iter().map(|(k, e)| (k, e.union))
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Replaces a shard's viewer counts.
    pub fn set_counts(&mut self, shard: usize, counts: Vec<(RoomId, u32)>) {
        if let Some(c) = self.counts.get_mut(shard) {
            *c = counts;
        }
    }

    /// Node-wide viewer count per room (sum over shards).
    pub fn node_counts(&self) -> Vec<(RoomId, u32)> {
        let mut sum: HashMap<RoomId, u32> = HashMap::new();
        for c in &self.counts {
            for (r, n) in c {
                *sum.entry(*r).or_default() += n;
            }
        }
        let mut v: Vec<_> = sum.into_iter().collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::id::AreaId;

    #[test]
    fn sub_on_first_unsub_on_last_resub_on_new_encoding() {
        let mut n = NodeInterest::new(3);
        let r = Interest::Room(RoomId(5));
        let br = EncodingSet::of(Encoding::Brotli);
        let z = EncodingSet::of(Encoding::Zlib);
        assert_eq!(n.update(1, r.clone(), br), Some(Update::Sub(br)));
        assert_eq!(n.update(2, r.clone(), br), None);
        assert_eq!(n.update(0, r.clone(), z), Some(Update::Sub(br | z)));
        assert_eq!(
            n.shards_for(&r, Encoding::Brotli).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(
            n.shards_for(&r, Encoding::Zlib).collect::<Vec<_>>(),
            vec![0]
        );
        assert_eq!(
            n.update(0, r.clone(), EncodingSet::EMPTY),
            Some(Update::Sub(br))
        );
        assert_eq!(n.update(1, r.clone(), EncodingSet::EMPTY), None);
        assert_eq!(
            n.update(2, r.clone(), EncodingSet::EMPTY),
            Some(Update::Unsub)
        );
        assert!(n.is_empty());
        assert_eq!(
            n.update(2, Interest::Area(AreaId(1)), EncodingSet::EMPTY),
            None
        );
        assert_eq!(
            n.update(9, Interest::Area(AreaId(1)), br),
            None,
            "unknown shard ignored"
        );
    }

    #[test]
    fn counts_sum_over_shards() {
        let mut n = NodeInterest::new(2);
        n.set_counts(0, vec![(RoomId(1), 3), (RoomId(2), 1)]);
        n.set_counts(1, vec![(RoomId(1), 4)]);
        assert_eq!(n.node_counts(), vec![(RoomId(1), 7), (RoomId(2), 1)]);
        n.set_counts(1, vec![]);
        assert_eq!(n.node_counts(), vec![(RoomId(1), 3), (RoomId(2), 1)]);
    }
}
