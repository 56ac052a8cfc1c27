//! # proto: every wire format barrage speaks, and nothing else
//!
//! No sockets, no clocks, no threads: each module turns bytes into typed values and back.
//! The I/O crates (`edge`, `broker`, `control`, `loadtest`) own the sockets.
//!
//! # Layout
//! - [`id`]: newtypes for the identifiers that cross the wire (`RoomId`, `UserId`, `MsgId`, ...)
//!   and the small enums every frame shares (`Scope`, `Priority`, `Encoding`, `Reach`).
//! - [`limits`]: the default limits every codec enforces, named with units last.
//! - [`packet`]: the Bilibili live client packet (16-byte big-endian header) and its
//!   incremental stream decoder.
//! - [`container`]: `ver 2` (zlib) and `ver 3` (brotli) bodies holding a run of packets.
//! - [`auth`]: the op 7 auth body, the op 8 reply and the op 3 heartbeat reply.
//! - [`sync`]: delivery extensions: room epochs, `resume`, `BARRAGE_SYNC`, `msg_id` injection.
//! - [`ws`]: server-side WebSocket (RFC 6455): upgrade handshake and frames.
//! - [`link`]: broker <-> edge frames over persistent TCP.
//! - [`ingest`]: business caller <-> broker request/response frames.
//! - [`token`]: HMAC-SHA256 client tokens with key rotation.
//! - [`udp`]: the UDP transport's datagrams: cookie handshake, sessions, split batches.
//!
//! # Invariants
//! - Every decoder distinguishes "need more bytes" (`Incomplete`) from "this peer is broken"
//!   (`Invalid`), and checks every length against a limit *before* allocating.
//! - Nothing here panics on any input; the fuzz targets in `fuzz/` hold us to it.
#![forbid(unsafe_code)]

pub mod auth;
pub mod container;
pub mod id;
pub mod ingest;
pub mod limits;
pub mod link;
pub mod packet;
pub mod sync;
pub mod token;
pub mod udp;
pub mod ws;
