//! Partitions of the backbone stream, the stable hash that picks one for a scope, and the
//! rendezvous hash that picks a partition's preferred owner among the live brokers.
//!
//! Both functions are pure and stable across processes, versions and machines: every broker of
//! a cluster must compute the same answer, so they hash bytes with a fixed function, never with
//! `std`'s randomly seeded hasher.
//!
//! - `hash(bytes) = mix64(fnv1a64(bytes))`: FNV-1a 64 (offset `0xcbf29ce484222325`, prime
//!   `0x100000001b3`) followed by the splitmix64 finalizer, so the low bits that `mod` keeps are
//!   well mixed even for short numeric keys.
//! - A scope's key bytes are one tag byte then the id: room `b'r'` then the u64 big-endian, area
//!   `b'a'` then the u32 big-endian, user `b'u'` then the u64 big-endian, device `b'd'` then the
//!   device id's UTF-8. Its partition is `hash(key) mod partitions`. Global pushes go to
//!   [`GLOBAL_PARTITION`]. So every push of one room (or area, user, device) lands in one
//!   partition, in order.
//! - Rendezvous: `score(broker, p) = mix64(hash(broker id bytes) ^ mix64(p + 1))`; the preferred
//!   owner of `p` is the live broker with the highest score (ties, which need a 64-bit
//!   collision, go to the smaller id). Adding a broker moves to it exactly the partitions where
//!   it scores highest (about 1/N); removing one moves only the partitions it owned.

use proto::id::Scope;
use std::fmt;

/// The partition that every global push goes to.
pub const GLOBAL_PARTITION: Partition = Partition(0);

/// Longest broker id, in bytes (it is part of a KV key).
pub const BROKER_ID_BYTES_MAX: usize = 64;

/// One partition of the backbone stream, `0..partitions`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Partition(pub u16);

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A broker of the cluster, as named in the lease bucket: 1 to [`BROKER_ID_BYTES_MAX`] bytes of
/// `[A-Za-z0-9_-]` (a KV key token).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BrokerId(String);

impl BrokerId {
    /// Checks the id's length and alphabet.
    pub fn new(id: &str) -> Option<BrokerId> {
        let ok = !id.is_empty()
            && id.len() <= BROKER_ID_BYTES_MAX
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        ok.then(|| BrokerId(id.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BrokerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// FNV-1a 64 of `bytes`.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The splitmix64 finalizer: a bijection that spreads every input bit over every output bit.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The stable hash of the module doc.
pub fn hash(bytes: &[u8]) -> u64 {
    mix64(fnv1a64(bytes))
}

/// The partition a push to `scope` is published to, with `partitions` > 0.
pub fn partition_of(scope: &Scope, partitions: u16) -> Partition {
    let partitions = u64::from(partitions.max(1));
    let mut key = [0u8; 9];
    let h = match scope {
        Scope::Global => return GLOBAL_PARTITION,
        Scope::Room(r) => {
            key[0] = b'r';
            key[1..9].copy_from_slice(&r.0.to_be_bytes());
            hash(&key)
        }
        Scope::Area(a) => {
            key[0] = b'a';
            key[1..5].copy_from_slice(&a.0.to_be_bytes());
            hash(&key[..5])
        }
        Scope::User(u) => {
            key[0] = b'u';
            key[1..9].copy_from_slice(&u.0.to_be_bytes());
            hash(&key)
        }
        Scope::Device(d) => {
            let mut bytes = Vec::with_capacity(1 + d.0.len());
            bytes.push(b'd');
            bytes.extend_from_slice(d.0.as_bytes());
            hash(&bytes)
        }
    };
    // The remainder is below `partitions`, itself a u16.
    Partition((h % partitions) as u16)
}

/// The rendezvous score of `broker` for `partition` (higher wins).
pub fn score(broker: &BrokerId, partition: Partition) -> u64 {
    mix64(hash(broker.0.as_bytes()) ^ mix64(u64::from(partition.0) + 1))
}

/// The preferred owner of `partition` among `live` (None when no broker is live).
pub fn preferred_owner<'a, I>(partition: Partition, live: I) -> Option<&'a BrokerId>
where
    I: IntoIterator<Item = &'a BrokerId>,
{
    live.into_iter()
        .map(|b| (score(b, partition), b))
        .max_by(|(sa, a), (sb, b)| sa.cmp(sb).then_with(|| b.cmp(a)))
        .map(|(_, b)| b)
}

/// The NATS subject of `partition` under `prefix` (`barrage.p` gives `barrage.p.7`).
pub fn subject(prefix: &str, partition: Partition) -> String {
    format!("{prefix}.{}", partition.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proto::id::{AreaId, DeviceId, RoomId, UserId};

    fn b(s: &str) -> BrokerId {
        BrokerId::new(s).unwrap()
    }

    /// Golden values: another implementation (or a later version) must reproduce these.
    #[test]
    fn hash_is_the_documented_function() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(mix64(0), 0);
        assert_eq!(hash(b"a"), mix64(0xaf63_dc4c_8601_ec8c));
        assert_eq!(partition_of(&Scope::Global, 64), GLOBAL_PARTITION);
        let room = partition_of(&Scope::Room(RoomId(1001)), 64);
        let mut key = vec![b'r'];
        key.extend_from_slice(&1001u64.to_be_bytes());
        assert_eq!(u64::from(room.0), hash(&key) % 64);
        let dev = partition_of(&Scope::Device(DeviceId("buvid-x".into())), 64);
        assert_eq!(u64::from(dev.0), hash(b"dbuvid-x") % 64);
    }

    #[test]
    fn broker_ids_are_kv_tokens() {
        assert!(BrokerId::new("broker-1_a").is_some());
        for bad in ["", "a.b", "a b", "a*", "a>", &"x".repeat(65)] {
            assert!(BrokerId::new(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn rooms_spread_over_partitions() {
        let mut counts = [0u32; 64];
        for r in 0..64_000u64 {
            counts[partition_of(&Scope::Room(RoomId(r)), 64).0 as usize] += 1;
        }
        // 1000 expected each; a bad hash of sequential ids piles them up.
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }

    proptest! {
        #[test]
        fn partition_is_in_range(room: u64, area: u32, user: u64, dev in ".{0,40}", parts in 1u16..1024) {
            for s in [Scope::Room(RoomId(room)), Scope::Area(AreaId(area)), Scope::User(UserId(user)),
                      Scope::Device(DeviceId(dev.clone())), Scope::Global] {
                prop_assert!(partition_of(&s, parts).0 < parts);
            }
        }

        /// Adding a broker moves only partitions to it, and about 1/N of them; removing one
        /// moves only the partitions it owned.
        #[test]
        fn rendezvous_moves_little(ids in proptest::collection::btree_set("[a-z0-9]{1,12}", 1..8), new in "[A-Z]{1,8}") {
            const PARTITIONS: u16 = 1024;
            let live: Vec<BrokerId> = ids.iter().map(|s| b(s)).collect();
            let newcomer = b(&new);
            let mut grown = live.clone();
            grown.push(newcomer.clone());
            let mut moved = 0u32;
            for p in (0..PARTITIONS).map(Partition) {
                let before = preferred_owner(p, &live).unwrap();
                let after = preferred_owner(p, &grown).unwrap();
                if before != after {
                    prop_assert_eq!(after, &newcomer);
                    moved += 1;
                }
            }
            // Expected PARTITIONS / (N+1); twice that is many standard deviations away.
            let expected = u32::from(PARTITIONS) / grown.len() as u32;
            prop_assert!(moved <= 2 * expected, "moved {} of {}, expected about {}", moved, PARTITIONS, expected);
            prop_assert!(moved >= expected / 2, "moved {} of {}, expected about {}", moved, PARTITIONS, expected);

            // Removing the first broker moves only its own partitions.
            let gone = &live[0];
            let shrunk: Vec<BrokerId> = live[1..].to_vec();
            for p in (0..PARTITIONS).map(Partition) {
                let before = preferred_owner(p, &live).unwrap();
                if let Some(after) = preferred_owner(p, &shrunk) {
                    if before != gone {
                        prop_assert_eq!(before, after);
                    }
                }
            }
        }
    }
}
