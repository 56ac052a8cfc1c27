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
//! CONTRACT: edge, broker and loadtest use these types; keep them.

use crate::id::{AreaId, DeviceId, Encoding, MsgId, Priority, RoomId, Scope, UserId};
use bytes::Bytes;

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
    /// For user/device scopes, 0.
    pub seq: u64,
    /// First msg id in the batch; the batch holds `msg_count` consecutive-in-batch messages.
    pub first_msg_id: MsgId,
    pub msg_count: u32,
    /// Encoding of `packet` (the outer client packet's `ver`).
    pub encoding: Encoding,
    /// The complete client bytes: one outer `op 5` packet (or for plain, the packets back to back).
    pub packet: Bytes,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PresenceKind {
    Enter = 0,
    Exit = 1,
    /// Lease renewal for a live connection (driven by heartbeats).
    Renew = 2,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresenceEvent {
    pub kind: PresenceKind,
    pub uid: UserId,
    pub device: DeviceId,
    pub room: RoomId,
    /// Edge-local connection id (opaque to the broker, unique per edge node while live).
    pub conn: u64,
}

/// All link frames.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkFrame {
    /// Both directions, first frame.
    Hello(Hello),
    /// Edge -> broker: this node now has viewers of `interest` wanting these encodings
    /// (a set of [`Encoding::bit`]). Re-sent with a new set when it changes.
    Sub { interest: Interest, encodings: u8 },
    /// Edge -> broker: no more viewers of `interest` on this node.
    Unsub { interest: Interest },
    /// Broker -> edge.
    Batch(Batch),
    /// Edge -> broker: connection enter/exit/renew events.
    Presence(Vec<PresenceEvent>),
    /// Edge -> broker: this node's viewer count per room; broker -> edge: fleet-wide online count per room.
    Counts(Vec<(RoomId, u32)>),
    /// Edge -> broker: a client acknowledged a high-reach message.
    Ack { uid: UserId, device: DeviceId, msg_id: MsgId },
    Ping { nonce: u64 },
    Pong { nonce: u64 },
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

/// Appends the encoded frame to `out`.
pub fn encode(frame: &LinkFrame, out: &mut Vec<u8>) {
    todo!()
}

/// Encodes a BATCH frame's header (everything before the packet bytes) so a sender can write
/// header and shared packet bytes with two writes and no copy. `header ++ batch.packet` equals
/// `encode(&LinkFrame::Batch(batch))`.
pub fn encode_batch_header(batch: &Batch, out: &mut Vec<u8>) {
    todo!()
}

/// Decodes the first frame from `buf`: the frame and bytes used. `buf` is a `Bytes` so a
/// batch's packet is a zero-copy slice of it.
pub fn decode(buf: &Bytes, frame_bytes_max: u32) -> Result<(LinkFrame, usize), LinkError> {
    todo!()
}

/// How long the frame at the front of `buf` is in total, once its 4-byte length is in
/// (`Incomplete` before), checking the limit. Lets a reader size its buffer.
pub fn frame_len(buf: &[u8], frame_bytes_max: u32) -> Result<usize, LinkError> {
    todo!()
}

/// Which broker shard owns a room, given the broker's shard count (from its `Hello`).
/// Broker and edge must agree, so it lives here. Global, user and device scopes belong to shard 0.
pub fn shard_of_room(room: RoomId, broker_shards: u16) -> u16 {
    todo!()
}

/// Which broker shard owns an area.
pub fn shard_of_area(area: AreaId, broker_shards: u16) -> u16 {
    todo!()
}

#[allow(unused)]
fn _uses(_: UserId, _: DeviceId) {}
