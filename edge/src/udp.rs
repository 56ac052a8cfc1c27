//! The UDP transport on the edge shards (issue 11; the wire is `proto::udp` and
//! `docs/protocol-udp.md`), sans-io: the per-address rate limit, the session table, the
//! datagrams of a batch, and the labels of every dropped datagram. [`crate::core`] makes the
//! decisions with these; the shell (`shard`) only receives and sends datagrams.
//!
//! Invariants:
//! - The rate limit runs before anything else and allocates nothing per address: a fixed
//!   table of token buckets indexed by a keyed hash of the source IP ([`RATE_SLOTS`]), so a
//!   flood from one address (or from many forged ones) costs a hash and a table slot.
//! - Before an address has echoed a cookie minted for it, nothing larger than the datagram it
//!   sent goes back to it (`proto::udp::admit` decides; the core sends only what it returns).
//! - A session is in the table iff its connection is in the core's slab; the core removes both
//!   together (`on_closed`).
//! - Every datagram of a batch is at most `udp_payload_bytes_max` and decodable alone.

use bytes::Bytes;
use proto::container::{self, BrotliParams};
use proto::id::Encoding;
use proto::packet::{self, HEADER_LEN};
use proto::udp::{self as wire, SessionId, PART_PACKET_BYTES};
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::{IpAddr, SocketAddr};

/// Token buckets per shard for the per-address rate limit (24 bytes each). Two addresses that
/// hash to one slot share it until one of them goes quiet; the table never grows.
pub const RATE_SLOTS: usize = 4_096;
/// Datagrams waiting for the shard's socket; past it low-priority batch datagrams are dropped
/// (the viewer sees the gap) and, at [`UDP_OUTBOX_HIGH_FACTOR`] times it, everything. An entry
/// is an address and a shared `Bytes` (64 B; the datagram itself is built once per batch per
/// shard), so this is at most 16 MiB of entries: a burst of 100 batches to 2,500 viewers.
pub const UDP_OUTBOX_DATAGRAMS_MAX: usize = 262_144;
/// High-priority datagrams and replies may fill the outbox up to this factor of the bound.
pub const UDP_OUTBOX_HIGH_FACTOR: usize = 4;

/// Why a datagram was dropped: the labels of `barrage_edge_udp_dropped_total`. The first
/// eleven are `proto::udp::Dropped::label` values.
pub const DROP_LABELS: [&str; 14] = [
    "empty",
    "truncated",
    "oversized",
    "header_len",
    "too_short",
    "too_many_packets",
    "unexpected",
    "bad_body",
    "forged_cookie",
    "unknown_session",
    "reply_too_large",
    // Over `udp_datagrams_per_addr_per_s` (before any parsing).
    "rate_limited",
    // The shard's outbox was full (low priority first; the viewer sees a gap).
    "outbox_full",
    // A batch that could not be cut into datagrams (bad container from upstream).
    "unsplittable",
];

/// The index of a drop label in [`DROP_LABELS`] (the last one for an unknown label).
pub fn drop_index(label: &str) -> usize {
    DROP_LABELS
        .iter()
        .position(|l| *l == label)
        .unwrap_or(DROP_LABELS.len() - 1)
}

#[derive(Clone, Copy, Default)]
struct Slot {
    /// Hash of the address holding the slot, `| 1` so an empty slot (0) never matches.
    tag: u64,
    /// Tokens times 1000.
    milli_tokens: u64,
    last_ms: u64,
}

/// Token buckets per source IP in a fixed table (see the module invariants).
pub struct RateLimit {
    slots: Box<[Slot]>,
    hasher: std::collections::hash_map::RandomState,
    per_s: u64,
    burst: u64,
}

impl RateLimit {
    /// `per_s` datagrams a second per address, bursts of `burst`; 0 turns the limit off.
    pub fn new(per_s: u32, burst: u32) -> RateLimit {
        RateLimit {
            slots: vec![Slot::default(); RATE_SLOTS].into_boxed_slice(),
            hasher: Default::default(),
            per_s: u64::from(per_s),
            burst: u64::from(burst.max(1)),
        }
    }

    /// Takes a token for `ip` at `now_ms`; false: over the limit, drop the datagram.
    pub fn allow(&mut self, ip: IpAddr, now_ms: u64) -> bool {
        if self.per_s == 0 {
            return true;
        }
        let h = self.hasher.hash_one(ip);
        let cap = self.burst * 1000;
        let s = &mut self.slots[(h as usize) % RATE_SLOTS];
        if s.tag != h | 1 {
            *s = Slot {
                tag: h | 1,
                milli_tokens: cap,
                last_ms: now_ms,
            };
        }
        // per_s tokens per 1000 ms is per_s milli-tokens per ms.
        let refill = now_ms.saturating_sub(s.last_ms).saturating_mul(self.per_s);
        s.milli_tokens = s.milli_tokens.saturating_add(refill).min(cap);
        s.last_ms = now_ms;
        if s.milli_tokens < 1000 {
            return false;
        }
        s.milli_tokens -= 1000;
        true
    }
}

/// A UDP session as the shard holds it: its connection (slab key and generation, as the core
/// names them) and the address it is reached at now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<C> {
    pub conn: C,
    pub addr: SocketAddr,
}

/// The shard's sessions, by id and by connection key.
pub struct Sessions<C> {
    by_id: HashMap<SessionId, Entry<C>>,
    by_key: HashMap<u32, SessionId>,
}

impl<C: Copy> Default for Sessions<C> {
    fn default() -> Self {
        Sessions {
            by_id: HashMap::new(),
            by_key: HashMap::new(),
        }
    }
}

impl<C: Copy> Sessions<C> {
    pub fn get(&self, s: SessionId) -> Option<Entry<C>> {
        self.by_id.get(&s).copied()
    }

    /// The current address of session `s` (what `proto::udp::admit` asks).
    pub fn addr(&self, s: SessionId) -> Option<SocketAddr> {
        self.by_id.get(&s).map(|e| e.addr)
    }

    /// The session of connection `key`.
    pub fn of_key(&self, key: u32) -> Option<SessionId> {
        self.by_key.get(&key).copied()
    }

    /// The address of connection `key`.
    pub fn addr_of_key(&self, key: u32) -> Option<SocketAddr> {
        self.of_key(key).and_then(|s| self.addr(s))
    }

    pub fn insert(&mut self, s: SessionId, key: u32, conn: C, addr: SocketAddr) {
        self.by_id.insert(s, Entry { conn, addr });
        self.by_key.insert(key, s);
    }

    /// The client proved `addr` (NAT rebinding): the session is reached there from now on.
    pub fn move_to(&mut self, s: SessionId, addr: SocketAddr) {
        if let Some(e) = self.by_id.get_mut(&s) {
            e.addr = addr;
        }
    }

    pub fn remove_key(&mut self, key: u32) {
        if let Some(s) = self.by_key.remove(&key) {
            self.by_id.remove(&s);
        }
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// Why a batch could not be cut into datagrams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unsplittable;

/// The datagrams of one batch (`packet`: the outer client packet as TCP viewers get it): one
/// `[part 0/1][packet]` when it fits `payload_max`, else the inner packets re-packed by
/// `proto::udp::split_batch` into self-contained parts. Built once per batch per shard.
pub fn datagrams(
    packet: &[u8],
    encoding: Encoding,
    payload_max: usize,
) -> Result<Vec<Bytes>, Unsplittable> {
    let h = packet::parse_header(packet).map_err(|_| Unsplittable)?;
    let seq = h.seq;
    if PART_PACKET_BYTES + packet.len() <= payload_max {
        let mut d = wire::part_packet(seq, 0, 1, 0);
        d.extend_from_slice(packet);
        return Ok(vec![Bytes::from(d)]);
    }
    let inner = match encoding {
        // Plain batches are the inner packets back to back already.
        Encoding::Plain => packet.to_vec(),
        Encoding::Zlib | Encoding::Brotli => {
            let body = packet
                .get(HEADER_LEN..h.packet_len as usize)
                .ok_or(Unsplittable)?;
            let cap = proto::limits::DECOMPRESSED_BYTES_MAX;
            match encoding {
                Encoding::Zlib => container::zlib_decompress(body, cap),
                _ => container::brotli_decompress(body, cap),
            }
            .map_err(|_| Unsplittable)?
        }
    };
    let parts = wire::split_batch(&inner, encoding, seq, payload_max, BrotliParams::default())
        .map_err(|_| Unsplittable)?;
    Ok(parts.into_iter().map(Bytes::from).collect())
}

/// Binds one UDP socket per shard on `addr` with `SO_REUSEPORT` (port 0 resolved by the
/// first): the kernel picks the socket by a hash of the 4-tuple, so one client address stays
/// on one shard. Unless `across_processes`, a port another process holds is an error.
pub fn bind_sockets(
    addr: SocketAddr,
    n: usize,
    across_processes: bool,
) -> std::io::Result<Vec<std::net::UdpSocket>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let one = |a: SocketAddr, reuse: bool| -> std::io::Result<std::net::UdpSocket> {
        let s = Socket::new(Domain::for_address(a), Type::DGRAM, Some(Protocol::UDP))?;
        if reuse {
            s.set_reuse_port(true)?;
        }
        s.set_nonblocking(true)?;
        s.bind(&a.into())?;
        Ok(s.into())
    };
    if !across_processes && addr.port() != 0 {
        // Fails if anyone holds the port (a socket without SO_REUSEPORT cannot share it).
        drop(one(addr, false).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("udp {addr}: {e} (another barrage process holds it?)"),
            )
        })?);
    }
    let first = one(addr, true)?;
    let bound = first.local_addr()?;
    let mut out = vec![first];
    for _ in 1..n.max(1) {
        out.push(one(bound, true)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_allows_the_burst_then_the_rate() {
        let mut r = RateLimit::new(10, 20);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let ok = (0..30).filter(|_| r.allow(ip, 1_000)).count();
        assert_eq!(ok, 20, "the burst");
        assert!(r.allow(other, 1_000), "another address has its own bucket");
        // 10 per second: 500 ms later, 5 more.
        let ok = (0..30).filter(|_| r.allow(ip, 1_500)).count();
        assert_eq!(ok, 5);
        let mut off = RateLimit::new(0, 0);
        assert!((0..10_000).all(|_| off.allow(ip, 0)));
    }

    #[test]
    fn a_small_batch_is_one_datagram_a_large_one_is_split() {
        let inner: Vec<u8> = (0..3)
            .flat_map(|i| packet::encode_vec(0, 5, 7, format!("{{\"i\":{i}}}").as_bytes()))
            .collect();
        let outer = container::encode_outer(Encoding::Brotli, &inner, 7, BrotliParams::default());
        let d = datagrams(&outer, Encoding::Brotli, 1200).unwrap();
        assert_eq!(d.len(), 1);
        let wire::ServerDatagram::Data(p) = wire::decode_server(&d[0], 1200).unwrap() else {
            panic!("not data")
        };
        assert_eq!((p.seq, p.part, p.parts, p.container), (7, 0, 1, &outer[..]));

        // 40 incompressible-ish messages of 300 B: many parts, each alone decodable.
        let inner: Vec<u8> = (0..40u32)
            .flat_map(|i| {
                let body: String = (0..300)
                    .map(|j| char::from(b'a' + ((i * 7919 + j * 31) % 26) as u8))
                    .collect();
                packet::encode_vec(0, 5, 9, format!("{{\"t\":\"{body}\"}}").as_bytes())
            })
            .collect();
        let outer = container::encode_outer(Encoding::Plain, &inner, 9, BrotliParams::default());
        let d = datagrams(&outer, Encoding::Plain, 1200).unwrap();
        assert!(d.len() > 5, "{}", d.len());
        let mut got = 0;
        for (i, x) in d.iter().enumerate() {
            assert!(x.len() <= 1200);
            let wire::ServerDatagram::Data(p) = wire::decode_server(x, 1200).unwrap() else {
                panic!("not data")
            };
            assert_eq!((p.seq, p.part as usize, p.parts as usize), (9, i, d.len()));
            got += container::unpack_container(0, p.container, 1 << 20)
                .unwrap()
                .len();
        }
        assert_eq!(got, 40);
        assert_eq!(datagrams(b"junk", Encoding::Plain, 1200), Err(Unsplittable));
    }

    #[test]
    fn sessions_by_id_and_key() {
        let mut s: Sessions<u64> = Sessions::default();
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        s.insert(SessionId(5), 3, 99, a);
        assert_eq!(s.addr_of_key(3), Some(a));
        s.move_to(SessionId(5), b);
        assert_eq!(s.addr(SessionId(5)), Some(b));
        s.remove_key(3);
        assert!(s.is_empty() && s.get(SessionId(5)).is_none());
    }
}
