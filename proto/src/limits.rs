//! Default limits. Every limit has a unit last in its name; configs may lower or raise the
//! defaults, but the codecs always take the limit as an argument so the config wins.

/// Largest client packet (header + body) a server accepts from a client.
pub const FRAME_BYTES_MAX: u32 = 64 * 1024;
/// Largest op 7 auth body.
pub const AUTH_BYTES_MAX: u32 = 4 * 1024;
/// Auth must arrive this long after connect.
pub const AUTH_MS_MAX: u64 = 5_000;
/// A connection silent this long is dropped.
pub const HEARTBEAT_TIMEOUT_MS: u64 = 60_000;
/// Largest decompressed size of a `ver 2`/`ver 3` container (brotli/zlib bomb guard).
pub const DECOMPRESSED_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Largest single pushed message body.
pub const MESSAGE_BYTES_MAX: u32 = 64 * 1024;
/// Largest link frame (broker <-> edge).
pub const LINK_FRAME_BYTES_MAX: u32 = 8 * 1024 * 1024;
/// Largest ingest frame (caller <-> broker).
pub const INGEST_FRAME_BYTES_MAX: u32 = 1024 * 1024;
/// Largest WebSocket message (after reassembly of fragments) accepted from a client.
pub const WS_MESSAGE_BYTES_MAX: usize = 64 * 1024;
/// Largest WebSocket upgrade request head.
pub const WS_HANDSHAKE_BYTES_MAX: usize = 8 * 1024;
/// Longest device id.
pub const DEVICE_BYTES_MAX: usize = 64;
/// Longest token string.
pub const TOKEN_BYTES_MAX: usize = 200;
