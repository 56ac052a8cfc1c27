//! The Bilibili live client packet: a 16-byte big-endian header, then the body.
//!
//! ```text
//! u32 packet_len (header + body) | u16 header_len (= 16) | u16 ver | u32 op | u32 seq | body
//! ```
//! CONTRACT (implemented by the proto packet work): the types and signatures below are used by
//! edge, broker and loadtest; keep them.

/// Header length; every packet's `header_len` field must equal it.
pub const HEADER_LEN: usize = 16;

/// `ver` values.
pub mod ver {
    pub const PLAIN: u16 = 0;
    pub const HEARTBEAT: u16 = 1;
    pub const ZLIB: u16 = 2;
    pub const BROTLI: u16 = 3;
}

/// `op` values (goim's table uses 0..=17; ours must not collide).
pub mod op {
    pub const HEARTBEAT: u32 = 2;
    pub const HEARTBEAT_REPLY: u32 = 3;
    pub const NOTIFICATION: u32 = 5;
    pub const AUTH: u32 = 7;
    pub const AUTH_REPLY: u32 = 8;
    /// Extension (C->S): ACK of a high-reach message; body = big-endian u64 msg id.
    /// goim's table ends at 17; ours start at 1000 so they never collide.
    pub const ACK: u32 = 1000;
}

/// A parsed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub packet_len: u32,
    pub header_len: u16,
    pub ver: u16,
    pub op: u32,
    pub seq: u32,
}

/// A packet borrowing its body from the input buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet<'a> {
    pub ver: u16,
    pub op: u32,
    pub seq: u32,
    pub body: &'a [u8],
}

/// An owned packet (what container decoding yields).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedPacket {
    pub ver: u16,
    pub op: u32,
    pub seq: u32,
    pub body: Vec<u8>,
}

/// Why a packet could not be decoded. Not boxed: this is the hot path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not enough bytes yet; read more and try again. Not an error of the peer.
    #[error("incomplete packet")]
    Incomplete,
    /// The peer sent something that is not a packet; close it.
    #[error("invalid packet: {0}")]
    Invalid(Invalid),
}

/// What exactly was invalid (for metrics labels and logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// `header_len` was not 16.
    #[error("header_len is not 16")]
    HeaderLen,
    /// `packet_len` smaller than the header.
    #[error("packet_len shorter than the header")]
    TooShort,
    /// `packet_len` above the receiver's `frame_bytes_max`.
    #[error("packet_len above frame_bytes_max")]
    TooLong,
}

impl Invalid {
    /// A short stable label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Invalid::HeaderLen => "header_len",
            Invalid::TooShort => "too_short",
            Invalid::TooLong => "too_long",
        }
    }
}

/// Encodes one packet, appending to `out`.
pub fn encode(ver: u16, op: u32, seq: u32, body: &[u8], out: &mut Vec<u8>) {
    todo!()
}

/// Encodes one packet into a new vector.
pub fn encode_vec(ver: u16, op: u32, seq: u32, body: &[u8]) -> Vec<u8> {
    todo!()
}

/// Parses a header from the first 16 bytes of `buf` without checking limits.
pub fn parse_header(buf: &[u8]) -> Result<Header, DecodeError> {
    todo!()
}

/// Decodes the first packet in `buf`: returns it and the number of bytes it used.
/// `frame_bytes_max` caps `packet_len`; it is checked as soon as the header is in,
/// so a peer cannot make us buffer more than that.
pub fn decode(buf: &[u8], frame_bytes_max: u32) -> Result<(Packet<'_>, usize), DecodeError> {
    todo!()
}

/// Incremental stream decoder over a growable buffer: feed bytes as they arrive, take
/// packets as they complete. Its buffer starts small and grows only while a larger
/// packet is being read (idle connections stay cheap), then shrinks back.
#[derive(Debug)]
pub struct StreamDecoder {
    // implementation-defined fields
    frame_bytes_max: u32,
    buf: Vec<u8>,
    start: usize,
}

impl StreamDecoder {
    pub fn new(frame_bytes_max: u32) -> Self {
        todo!()
    }

    /// Appends received bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        todo!()
    }

    /// Returns the next complete packet, `Ok(None)` if more bytes are needed, or the
    /// reason the stream is invalid (then the peer must be closed; the decoder is poisoned).
    pub fn next_packet(&mut self) -> Result<Option<OwnedPacket>, Invalid> {
        todo!()
    }

    /// Bytes buffered but not yet decoded.
    pub fn buffered_len(&self) -> usize {
        todo!()
    }

    /// Bytes of heap the decoder holds (for the per-connection memory budget).
    pub fn capacity_bytes(&self) -> usize {
        todo!()
    }
}
