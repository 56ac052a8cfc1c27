//! Link frames: broker <-> edge over persistent TCP.
//!
//! ```text
//! u32 frame_len (bytes after this field) | u8 version (= 1) | u8 kind | payload
//! ```
//! All integers big-endian; strings are u16 length + UTF-8; lists are u32 count + items.
//! Handshake: the edge opens a link and sends `Hello` (its node id, its shard count, the
//! `link_shard` = broker shard it wants, and the `priority` this link carries); the broker hands
//! the connection to that broker shard, which answers with its own `Hello` (`shards` = the
//! broker's shard count). The edge's first link is (shard 0, Low); from the reply it learns the
//! broker's shard count and opens one link per (broker shard, priority). Rooms map to broker
//! shards with [`shard_of_room`]; SUB/UNSUB/COUNTS/PRESENCE travel on the Low link of the owning
//! broker shard, which uses the interest for both of that edge's links. Either side sends PING
//! every 5 s; a link silent for 15 s is dead.
//!
//! Authentication ([`handshake`]): an edge holding a link key sends `Challenge` (its nonce)
//! right after its `Hello`; the broker answers `Challenge` (its nonce) and `Proof` (an HMAC
//! over both nonces and the Hello), the edge checks it and answers its own `Proof`; only then
//! does the broker hand the link to a shard and reply `Hello`. See [`handshake`] for the MACs.
//!
//! Payload layouts (one [`kind`] each) are documented byte by byte in
//! `docs/protocol-link-ingest.md`. Scopes and interests are a [`Scope::tag`] byte then the value
//! (room u64, area u32, global nothing, user u64, device string); `Batch.packet` runs to the end
//! of the frame, so a sender writes [`encode_batch_header`] and the shared packet bytes
//! without copying them.
//!
//! # Invariants
//! - `frame_len` counts the bytes after the length field and is checked against the caller's
//!   limit as soon as the 4 length bytes are in, before anything is buffered or allocated.
//! - [`decode`] returns `Incomplete` until the whole frame is in, and only then `Version`,
//!   `Kind` or `Malformed`; a list count is checked against the bytes left before allocating.
//! - [`shard_of_room`] / [`shard_of_area`] are a fixed function of their inputs; changing them
//!   is a wire-protocol change (broker and edge of different builds must agree).
//!
//! CONTRACT: edge, broker and loadtest use these types; keep them.

use crate::id::{AreaId, DeviceId, Encoding, MsgId, Priority, RoomId, Scope, UserId};
use bytes::Bytes;

pub mod handshake;
pub mod replay;

/// Link protocol version carried in every frame.
pub const LINK_VERSION: u8 = 1;

/// Capability bits in `Hello`.
pub mod caps {
    /// Sender can make/use `ver 2` zlib batches.
    pub const ZLIB: u32 = 1;
    /// Sender can make/use `ver 0` plain batches.
    pub const PLAIN: u32 = 2;
    /// High-reach: msg ids, ACKs and resends.
    pub const HIGH_REACH: u32 = 4;
    /// Presence events.
    pub const PRESENCE: u32 = 8;
    /// Batch confirmations (`Confirm`): in an edge's `Hello`, it can send them; in the broker's
    /// reply, it wants them on this link (cluster mode: it acks JetStream only once they come).
    pub const CONFIRM: u32 = 16;
}

/// What a SUB/UNSUB is about.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Interest {
    Room(RoomId),
    Area(AreaId),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub node_id: String,
    pub region: String,
    /// Number of shards (cores) the sender runs.
    pub shards: u16,
    /// Which broker shard this link is for (edge -> broker) / which shard answered.
    pub link_shard: u16,
    /// The priority class this link carries.
    pub priority: Priority,
    pub capabilities: u32,
}

/// A batch of client packets for one scope, ready to write to clients as is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub scope: Scope,
    pub priority: Priority,
    /// Sequence number of this batch in its scope's stream (room/area/global), from 1.
    /// For user/device scopes, 0, except a high-reach try: 1 for the first, 2.. for resends
    /// (which an edge gives only to connections that opted in with `"ack": true`).
    pub seq: u64,
    /// First msg id in the batch; the batch holds `msg_count` consecutive-in-batch messages.
    pub first_msg_id: MsgId,
    pub msg_count: u32,
    /// Encoding of `packet` (the outer client packet's `ver`).
    pub encoding: Encoding,
    /// When the broker flushed the batch, microseconds since the Unix epoch (0: unknown). The
    /// edge observes "flushed -> written" from it, which is only as right as the two hosts'
    /// clocks agree (exact on one host; NTP-close across hosts).
    pub flushed_at_us: u64,
    /// The complete client bytes: one outer `op 5` packet (or for plain, the packets back to back).
    pub packet: Bytes,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PresenceKind {
    Enter = 0,
    Exit = 1,
}

/// How a reported connection reaches its edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    Tcp = 0,
    Ws = 1,
    Wss = 2,
    Udp = 3,
}

impl Transport {
    pub fn from_u8(b: u8) -> Option<Transport> {
        match b {
            0 => Some(Transport::Tcp),
            1 => Some(Transport::Ws),
            2 => Some(Transport::Wss),
            3 => Some(Transport::Udp),
            _ => None,
        }
    }
}

/// One connection's enter or exit. An exit repeats what the enter said (the broker keys on
/// `conn` and ignores the rest).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresenceEvent {
    pub kind: PresenceKind,
    /// Edge-local connection id (opaque to the broker, unique per edge node while live).
    pub conn: u64,
    pub uid: UserId,
    pub device: DeviceId,
    pub room: RoomId,
    pub area: AreaId,
    pub transport: Transport,
}

/// An edge's presence report: its events in order, under the incarnation of its link to this
/// broker. A higher incarnation than the broker holds replaces every record of the edge (the
/// edge re-reports all its live connections after each re-link, see `docs/presence.md`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresenceBatch {
    pub incarnation: u64,
    pub events: Vec<PresenceEvent>,
}

/// All link frames.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkFrame {
    /// Both directions, first frame.
    Hello(Hello),
    /// Edge -> broker: this node now has viewers of `interest` wanting these encodings
    /// (a set of [`Encoding::bit`]). Re-sent with a new set when it changes.
    Sub {
        interest: Interest,
        encodings: u8,
    },
    /// Edge -> broker: no more viewers of `interest` on this node.
    Unsub {
        interest: Interest,
    },
    /// Broker -> edge.
    Batch(Batch),
    /// Edge -> broker: connection enter/exit events (the link heartbeat renews the lease).
    Presence(PresenceBatch),
    /// Edge -> broker: this node's viewer count per room; broker -> edge: fleet-wide online count per room.
    Counts(Vec<(RoomId, u32)>),
    /// Edge -> broker: a client acknowledged a high-reach message.
    Ack {
        uid: UserId,
        device: DeviceId,
        msg_id: MsgId,
    },
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    /// Link authentication, both directions: the sender's fresh random nonce.
    Challenge {
        nonce: [u8; handshake::NONCE_BYTES],
    },
    /// Link authentication, both directions: the sender's HMAC (see [`handshake`]).
    Proof {
        mac: [u8; handshake::MAC_BYTES],
    },
    /// Edge -> broker: send what a room sent after a seq ([`replay`]).
    Replay(replay::Request),
    /// Broker -> edge: the answer to a `Replay` ([`replay`]).
    Replayed(replay::Answer),
    /// Edge -> broker, on a link whose broker asked for it ([`caps::CONFIRM`]): the edge has
    /// received the first `through` BATCH frames the broker sent on this link (counted from 1 on
    /// each connection). Cumulative, so one frame confirms any number of batches and a lost
    /// or coalesced one costs nothing.
    Confirm {
        through: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("incomplete link frame")]
    Incomplete,
    #[error("link frame longer than the limit")]
    TooLong,
    #[error("unsupported link version")]
    Version,
    #[error("unknown link frame kind")]
    Kind,
    #[error("malformed link frame")]
    Malformed,
}

/// Frame kinds (the byte after the version).
pub mod kind {
    pub const HELLO: u8 = 1;
    pub const SUB: u8 = 2;
    pub const UNSUB: u8 = 3;
    pub const BATCH: u8 = 4;
    pub const PRESENCE: u8 = 5;
    pub const COUNTS: u8 = 6;
    pub const ACK: u8 = 7;
    pub const PING: u8 = 8;
    pub const PONG: u8 = 9;
    pub const CHALLENGE: u8 = 10;
    pub const PROOF: u8 = 11;
    pub const CONFIRM: u8 = 12;
    pub const REPLAY: u8 = 16;
    pub const REPLAYED: u8 = 17;
}

/// Bytes before the payload: u32 frame_len, u8 version, u8 kind.
pub const FRAME_HEADER_LEN: usize = 6;

/// Smallest encoded presence event: kind u8, conn u64, uid u64, device (u16 len, empty),
/// room u64, area u32, transport u8.
const PRESENCE_EVENT_BYTES_MIN: usize = 1 + 8 + 8 + 2 + 8 + 4 + 1;
/// Encoded size of one `(RoomId, u32)` count.
const COUNT_BYTES: usize = 8 + 4;

/// Appends the encoded frame to `out`.
pub fn encode(frame: &LinkFrame, out: &mut Vec<u8>) {
    if let LinkFrame::Batch(batch) = frame {
        encode_batch_header(batch, out);
        out.extend_from_slice(&batch.packet);
        return;
    }
    let start = wire::begin(out, LINK_VERSION, frame_kind(frame));
    match frame {
        LinkFrame::Hello(h) => {
            wire::put_str(out, &h.node_id);
            wire::put_str(out, &h.region);
            out.extend_from_slice(&h.shards.to_be_bytes());
            out.extend_from_slice(&h.link_shard.to_be_bytes());
            out.push(h.priority as u8);
            out.extend_from_slice(&h.capabilities.to_be_bytes());
        }
        LinkFrame::Sub {
            interest,
            encodings,
        } => {
            put_interest(out, interest);
            out.push(*encodings);
        }
        LinkFrame::Unsub { interest } => put_interest(out, interest),
        // Handled above: the header is shared with `encode_batch_header`.
        LinkFrame::Batch(_) => {}
        LinkFrame::Presence(batch) => {
            out.extend_from_slice(&batch.incarnation.to_be_bytes());
            let n = wire::put_count(out, batch.events.len());
            for ev in batch.events.iter().take(n) {
                out.push(ev.kind as u8);
                out.extend_from_slice(&ev.conn.to_be_bytes());
                out.extend_from_slice(&ev.uid.0.to_be_bytes());
                wire::put_str(out, &ev.device.0);
                out.extend_from_slice(&ev.room.0.to_be_bytes());
                out.extend_from_slice(&ev.area.0.to_be_bytes());
                out.push(ev.transport as u8);
            }
        }
        LinkFrame::Counts(counts) => {
            let n = wire::put_count(out, counts.len());
            for (room, count) in counts.iter().take(n) {
                out.extend_from_slice(&room.0.to_be_bytes());
                out.extend_from_slice(&count.to_be_bytes());
            }
        }
        LinkFrame::Ack {
            uid,
            device,
            msg_id,
        } => {
            out.extend_from_slice(&uid.0.to_be_bytes());
            wire::put_str(out, &device.0);
            out.extend_from_slice(&msg_id.0.to_be_bytes());
        }
        LinkFrame::Ping { nonce } | LinkFrame::Pong { nonce } => {
            out.extend_from_slice(&nonce.to_be_bytes());
        }
        LinkFrame::Confirm { through } => out.extend_from_slice(&through.to_be_bytes()),
        LinkFrame::Challenge { nonce } => out.extend_from_slice(nonce),
        LinkFrame::Proof { mac } => out.extend_from_slice(mac),
        LinkFrame::Replay(r) => replay::encode_request(r, out),
        LinkFrame::Replayed(a) => replay::encode_answer(a, out),
    }
    wire::end(out, start);
}

/// Encodes a BATCH frame's header (everything before the packet bytes) so a sender can write
/// header and shared packet bytes with two writes and no copy. `header ++ batch.packet` equals
/// `encode(&LinkFrame::Batch(batch))`.
pub fn encode_batch_header(batch: &Batch, out: &mut Vec<u8>) {
    let start = wire::begin(out, LINK_VERSION, kind::BATCH);
    wire::put_scope(out, &batch.scope);
    out.push(batch.priority as u8);
    out.extend_from_slice(&batch.seq.to_be_bytes());
    out.extend_from_slice(&batch.first_msg_id.0.to_be_bytes());
    out.extend_from_slice(&batch.msg_count.to_be_bytes());
    out.push(batch.encoding as u8);
    out.extend_from_slice(&batch.flushed_at_us.to_be_bytes());
    // The length field covers the packet bytes the caller writes next. A packet so large the
    // length saturates is rejected by the receiver as TooLong rather than misframed silently.
    let len = (out.len() - start - 4).saturating_add(batch.packet.len());
    wire::patch_len(out, start, len);
}

/// Decodes the first frame from `buf`: the frame and bytes used. `buf` is a `Bytes` so a
/// batch's packet is a zero-copy slice of it.
pub fn decode(buf: &Bytes, frame_bytes_max: u32) -> Result<(LinkFrame, usize), LinkError> {
    let total = frame_len(buf, frame_bytes_max)?;
    let frame = buf.get(..total).ok_or(LinkError::Incomplete)?;
    // `frame_len` guarantees at least version and kind after the length field.
    let (version, kind_byte) = (frame[4], frame[5]);
    if version != LINK_VERSION {
        return Err(LinkError::Version);
    }
    let mut r = wire::Reader::new(&frame[FRAME_HEADER_LEN..]);
    let decoded = match kind_byte {
        kind::HELLO => LinkFrame::Hello(Hello {
            node_id: r.string()?,
            region: r.string()?,
            shards: r.u16()?,
            link_shard: r.u16()?,
            priority: Priority::from_u8(r.u8()?).ok_or(wire::Malformed)?,
            capabilities: r.u32()?,
        }),
        kind::SUB => LinkFrame::Sub {
            interest: interest(&mut r)?,
            encodings: r.u8()?,
        },
        kind::UNSUB => LinkFrame::Unsub {
            interest: interest(&mut r)?,
        },
        kind::BATCH => {
            let scope = r.scope()?;
            let priority = Priority::from_u8(r.u8()?).ok_or(wire::Malformed)?;
            let seq = r.u64()?;
            let first_msg_id = MsgId(r.u64()?);
            let msg_count = r.u32()?;
            let encoding = Encoding::from_u8(r.u8()?).ok_or(wire::Malformed)?;
            let flushed_at_us = r.u64()?;
            let packet_start = FRAME_HEADER_LEN + r.pos();
            // The packet runs to the end of the frame: take it and leave nothing for `finish`.
            r.rest();
            LinkFrame::Batch(Batch {
                scope,
                priority,
                seq,
                first_msg_id,
                msg_count,
                encoding,
                flushed_at_us,
                packet: buf.slice(packet_start..total),
            })
        }
        kind::PRESENCE => {
            let incarnation = r.u64()?;
            let n = r.count(PRESENCE_EVENT_BYTES_MIN)?;
            let mut events = Vec::with_capacity(n);
            for _ in 0..n {
                let kind = match r.u8()? {
                    0 => PresenceKind::Enter,
                    1 => PresenceKind::Exit,
                    _ => return Err(LinkError::Malformed),
                };
                events.push(PresenceEvent {
                    kind,
                    conn: r.u64()?,
                    uid: UserId(r.u64()?),
                    device: DeviceId(r.string()?),
                    room: RoomId(r.u64()?),
                    area: AreaId(r.u32()?),
                    transport: Transport::from_u8(r.u8()?).ok_or(LinkError::Malformed)?,
                });
            }
            LinkFrame::Presence(PresenceBatch {
                incarnation,
                events,
            })
        }
        kind::COUNTS => {
            let n = r.count(COUNT_BYTES)?;
            let mut counts = Vec::with_capacity(n);
            for _ in 0..n {
                counts.push((RoomId(r.u64()?), r.u32()?));
            }
            LinkFrame::Counts(counts)
        }
        kind::ACK => LinkFrame::Ack {
            uid: UserId(r.u64()?),
            device: DeviceId(r.string()?),
            msg_id: MsgId(r.u64()?),
        },
        kind::PING => LinkFrame::Ping { nonce: r.u64()? },
        kind::PONG => LinkFrame::Pong { nonce: r.u64()? },
        kind::CONFIRM => LinkFrame::Confirm { through: r.u64()? },
        kind::CHALLENGE => LinkFrame::Challenge { nonce: r.array()? },
        kind::PROOF => LinkFrame::Proof { mac: r.array()? },
        kind::REPLAY => LinkFrame::Replay(replay::decode_request(&mut r)?),
        kind::REPLAYED => LinkFrame::Replayed(replay::decode_answer(&mut r)?),
        _ => return Err(LinkError::Kind),
    };
    r.finish()?;
    Ok((decoded, total))
}

/// How long the frame at the front of `buf` is in total, once its 4-byte length is in
/// (`Incomplete` before), checking the limit. Lets a reader size its buffer.
///
/// The limit applies to `frame_len` (the bytes after the length field); a frame too short to
/// hold version and kind is `Malformed`.
pub fn frame_len(buf: &[u8], frame_bytes_max: u32) -> Result<usize, LinkError> {
    wire::frame_len(buf, frame_bytes_max).map_err(LinkError::from)
}

/// Which broker shard owns a room, given the broker's shard count (from its `Hello`).
/// Broker and edge must agree, so it lives here. Global, user and device scopes belong to shard 0.
///
/// Stable: `((room * 0x9E37_79B9_7F4A_7C15) mod 2^64 >> 32) % shards`, with `shards == 0`
/// treated as 1. Changing it is a protocol change.
pub fn shard_of_room(room: RoomId, broker_shards: u16) -> u16 {
    shard_of(room.0, broker_shards)
}

/// Which broker shard owns an area. Same stable hash as [`shard_of_room`] on the area id.
pub fn shard_of_area(area: AreaId, broker_shards: u16) -> u16 {
    shard_of(u64::from(area.0), broker_shards)
}

/// Fibonacci hashing: consecutive room ids (common: rooms are allocated in order) spread
/// evenly, and the high bits it keeps are well mixed.
fn shard_of(x: u64, shards: u16) -> u16 {
    const GOLDEN_64: u64 = 0x9E37_79B9_7F4A_7C15;
    let shards = u64::from(shards.max(1));
    let h = x.wrapping_mul(GOLDEN_64) >> 32;
    // `h % shards < shards <= u16::MAX`, so the conversion never fails.
    u16::try_from(h % shards).unwrap_or(0)
}

fn frame_kind(frame: &LinkFrame) -> u8 {
    match frame {
        LinkFrame::Hello(_) => kind::HELLO,
        LinkFrame::Sub { .. } => kind::SUB,
        LinkFrame::Unsub { .. } => kind::UNSUB,
        LinkFrame::Batch(_) => kind::BATCH,
        LinkFrame::Presence(_) => kind::PRESENCE,
        LinkFrame::Counts(_) => kind::COUNTS,
        LinkFrame::Ack { .. } => kind::ACK,
        LinkFrame::Ping { .. } => kind::PING,
        LinkFrame::Pong { .. } => kind::PONG,
        LinkFrame::Challenge { .. } => kind::CHALLENGE,
        LinkFrame::Proof { .. } => kind::PROOF,
        LinkFrame::Replay(_) => kind::REPLAY,
        LinkFrame::Replayed(_) => kind::REPLAYED,
        LinkFrame::Confirm { .. } => kind::CONFIRM,
    }
}

/// An interest is encoded like the matching [`Scope`] (same tag byte and value).
fn put_interest(out: &mut Vec<u8>, interest: &Interest) {
    match interest {
        Interest::Room(room) => wire::put_scope(out, &Scope::Room(*room)),
        Interest::Area(area) => wire::put_scope(out, &Scope::Area(*area)),
    }
}

fn interest(r: &mut wire::Reader<'_>) -> Result<Interest, wire::Malformed> {
    match r.scope()? {
        Scope::Room(room) => Ok(Interest::Room(room)),
        Scope::Area(area) => Ok(Interest::Area(area)),
        _ => Err(wire::Malformed),
    }
}

impl From<wire::Malformed> for LinkError {
    fn from(_: wire::Malformed) -> Self {
        LinkError::Malformed
    }
}

impl From<wire::FrameError> for LinkError {
    fn from(e: wire::FrameError) -> Self {
        match e {
            wire::FrameError::Incomplete => LinkError::Incomplete,
            wire::FrameError::TooLong => LinkError::TooLong,
            wire::FrameError::Malformed => LinkError::Malformed,
        }
    }
}

/// Byte-level pieces shared by the link and ingest codecs (both use the same framing, string,
/// list and scope encodings). Lives here, not in its own module, so the two codecs stay one
/// unit of ownership.
pub(crate) mod wire {
    use crate::id::{AreaId, DeviceId, RoomId, Scope, UserId};

    /// A payload shorter than its fields, a bad enum byte, invalid UTF-8 or trailing bytes.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) struct Malformed;

    /// Outcome of reading the length prefix.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum FrameError {
        Incomplete,
        TooLong,
        Malformed,
    }

    /// Bytes of `frame_len` that version and kind take; a shorter frame is malformed.
    const VERSION_KIND_LEN: u32 = 2;

    /// Total frame size (length field included) once the 4 length bytes are in.
    pub(crate) fn frame_len(buf: &[u8], frame_bytes_max: u32) -> Result<usize, FrameError> {
        let Some(len_bytes) = buf.get(..4) else {
            return Err(FrameError::Incomplete);
        };
        let len = u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
        if len > frame_bytes_max {
            return Err(FrameError::TooLong);
        }
        if len < VERSION_KIND_LEN {
            return Err(FrameError::Malformed);
        }
        usize::try_from(len)
            .ok()
            .and_then(|l| l.checked_add(4))
            .ok_or(FrameError::TooLong)
    }

    /// Writes a placeholder length, version and kind; returns where the frame starts.
    pub(crate) fn begin(out: &mut Vec<u8>, version: u8, kind: u8) -> usize {
        let start = out.len();
        out.extend_from_slice(&[0, 0, 0, 0, version, kind]);
        start
    }

    /// Fills in the length of the frame that began at `start` and ends at `out.len()`.
    pub(crate) fn end(out: &mut [u8], start: usize) {
        let len = out.len() - start - 4;
        patch_len(out, start, len);
    }

    pub(crate) fn patch_len(out: &mut [u8], start: usize, len: usize) {
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// u16 length + UTF-8. A string over 65535 bytes is cut at the last char boundary that
    /// fits: every string we send (node ids, regions, device ids, keys, error texts) is far
    /// shorter, and a cut string still decodes.
    pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
        let mut n = s.len().min(usize::from(u16::MAX));
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        let len = u16::try_from(n).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&s.as_bytes()[..n]);
    }

    /// Writes a u32 list count; returns how many items the caller must write after it.
    pub(crate) fn put_count(out: &mut Vec<u8>, len: usize) -> usize {
        let n = u32::try_from(len).unwrap_or(u32::MAX);
        out.extend_from_slice(&n.to_be_bytes());
        usize::try_from(n).unwrap_or(len)
    }

    pub(crate) fn put_scope(out: &mut Vec<u8>, scope: &Scope) {
        out.push(scope.tag());
        match scope {
            Scope::Room(room) => out.extend_from_slice(&room.0.to_be_bytes()),
            Scope::Area(area) => out.extend_from_slice(&area.0.to_be_bytes()),
            Scope::Global => {}
            Scope::User(uid) => out.extend_from_slice(&uid.0.to_be_bytes()),
            Scope::Device(device) => put_str(out, &device.0),
        }
    }

    /// A cursor over one frame's payload; every read is bounds-checked.
    pub(crate) struct Reader<'a> {
        buf: &'a [u8],
        pos: usize,
    }

    impl<'a> Reader<'a> {
        pub(crate) fn new(buf: &'a [u8]) -> Self {
            Reader { buf, pos: 0 }
        }

        pub(crate) fn pos(&self) -> usize {
            self.pos
        }

        fn remaining(&self) -> usize {
            self.buf.len() - self.pos
        }

        pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
            let end = self.pos.checked_add(n).ok_or(Malformed)?;
            let s = self.buf.get(self.pos..end).ok_or(Malformed)?;
            self.pos = end;
            Ok(s)
        }

        /// Everything left.
        pub(crate) fn rest(&mut self) -> &'a [u8] {
            let s = &self.buf[self.pos..];
            self.pos = self.buf.len();
            s
        }

        pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], Malformed> {
            let mut a = [0u8; N];
            a.copy_from_slice(self.bytes(N)?);
            Ok(a)
        }

        pub(crate) fn u8(&mut self) -> Result<u8, Malformed> {
            Ok(self.array::<1>()?[0])
        }

        pub(crate) fn u16(&mut self) -> Result<u16, Malformed> {
            self.array().map(u16::from_be_bytes)
        }

        pub(crate) fn u32(&mut self) -> Result<u32, Malformed> {
            self.array().map(u32::from_be_bytes)
        }

        pub(crate) fn u64(&mut self) -> Result<u64, Malformed> {
            self.array().map(u64::from_be_bytes)
        }

        pub(crate) fn string(&mut self) -> Result<String, Malformed> {
            let n = self.u16()?;
            let b = self.bytes(usize::from(n))?;
            std::str::from_utf8(b)
                .map(str::to_owned)
                .map_err(|_| Malformed)
        }

        /// A u32 list count, refused unless `count * item_bytes_min` bytes are left, so a lying
        /// count cannot make the caller allocate.
        pub(crate) fn count(&mut self, item_bytes_min: usize) -> Result<usize, Malformed> {
            let n = usize::try_from(self.u32()?).map_err(|_| Malformed)?;
            let need = n.checked_mul(item_bytes_min).ok_or(Malformed)?;
            if need > self.remaining() {
                return Err(Malformed);
            }
            Ok(n)
        }

        pub(crate) fn scope(&mut self) -> Result<Scope, Malformed> {
            Ok(match self.u8()? {
                0 => Scope::Room(RoomId(self.u64()?)),
                1 => Scope::Area(AreaId(self.u32()?)),
                2 => Scope::Global,
                3 => Scope::User(UserId(self.u64()?)),
                4 => Scope::Device(DeviceId(self.string()?)),
                _ => return Err(Malformed),
            })
        }

        /// The payload must be used up exactly.
        pub(crate) fn finish(&self) -> Result<(), Malformed> {
            if self.pos == self.buf.len() {
                Ok(())
            } else {
                Err(Malformed)
            }
        }
    }
}
