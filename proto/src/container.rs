//! Nested containers: an outer packet whose body is a run of complete inner packets,
//! either plain (`ver 0`, packets back to back at top level), zlib (`ver 2`, RFC 1950)
//! or brotli (`ver 3`). This nesting *is* the aggregation format.
//!
//! CONTRACT: signatures used by broker, edge and loadtest; keep them.

use crate::id::Encoding;
use crate::packet::OwnedPacket;

/// Brotli encoder settings; the broker picks them by measurement (see docs/benchmarks.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BrotliParams {
    /// 0..=11.
    pub quality: u32,
    /// log2 of the window, 10..=24; fit it to the input (a few-KB batch needs no 4 MiB window).
    pub lgwin: u32,
}

impl Default for BrotliParams {
    fn default() -> Self {
        BrotliParams { quality: 5, lgwin: 16 }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ContainerError {
    /// The compressed body is not valid zlib/brotli.
    #[error("corrupt compressed body")]
    Corrupt,
    /// Decompressing would exceed the cap (a compression bomb).
    #[error("decompressed size above the cap")]
    TooLarge,
    /// The decompressed bytes are not a run of complete packets.
    #[error("inner packets malformed")]
    BadInner,
    /// The outer packet's `ver` is not 0, 2 or 3.
    #[error("not a container version")]
    NotContainer,
}

/// Builds the complete outer packet (`op 5`, the given encoding's `ver`, header `seq` = `seq`)
/// whose body is `inner`, a run of complete encoded packets. For `Encoding::Plain` the result is
/// `inner` with the `seq` field of each top-level packet set to `seq` (plain packets are sent
/// back to back at top level, as Bilibili does).
///
/// The outer `seq` carries the batch's stream sequence number (our gap-detection extension;
/// Bilibili clients ignore it): low-priority batches use the room seq, high-priority batches
/// `0x8000_0000 | seq`.
pub fn encode_outer(encoding: Encoding, inner: &[u8], seq: u32, brotli: BrotliParams) -> Vec<u8> {
    todo!()
}

/// Compresses with brotli (exposed for the compression bench).
pub fn brotli_compress(input: &[u8], params: BrotliParams) -> Vec<u8> {
    todo!()
}

/// Compresses with zlib at the default level (exposed for the compression bench).
pub fn zlib_compress(input: &[u8]) -> Vec<u8> {
    todo!()
}

/// Decompresses a brotli body, failing with `TooLarge` past `cap_bytes`.
pub fn brotli_decompress(input: &[u8], cap_bytes: usize) -> Result<Vec<u8>, ContainerError> {
    todo!()
}

/// Decompresses a zlib body, failing with `TooLarge` past `cap_bytes`.
pub fn zlib_decompress(input: &[u8], cap_bytes: usize) -> Result<Vec<u8>, ContainerError> {
    todo!()
}

/// Splits a top-level packet into the packets a client sees: for `ver 2`/`ver 3`, the
/// decompressed inner packets (recursively, as clients do, to a depth of 2); for anything
/// else the packet itself. `cap_bytes` bounds total decompressed bytes.
pub fn unpack(ver: u16, op: u32, seq: u32, body: &[u8], cap_bytes: usize) -> Result<Vec<OwnedPacket>, ContainerError> {
    todo!()
}
