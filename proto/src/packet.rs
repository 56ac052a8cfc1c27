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

/// How much buffer capacity a [`StreamDecoder`] keeps between packets. Above it the buffer is
/// released once drained, so one large packet does not pin memory on an idle connection.
pub const STREAM_IDLE_CAPACITY_BYTES_MAX: usize = 256;

/// Encodes one packet, appending to `out`.
///
/// The body length plus the header must fit the `u32` length field; callers bound bodies by
/// `message_bytes_max` (far below 4 GiB), so the length saturates rather than wraps if they do not.
pub fn encode(ver: u16, op: u32, seq: u32, body: &[u8], out: &mut Vec<u8>) {
    let packet_len = u32::try_from(HEADER_LEN + body.len()).unwrap_or(u32::MAX);
    out.reserve(HEADER_LEN + body.len());
    out.extend_from_slice(&packet_len.to_be_bytes());
    out.extend_from_slice(&(HEADER_LEN as u16).to_be_bytes());
    out.extend_from_slice(&ver.to_be_bytes());
    out.extend_from_slice(&op.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(body);
}

/// Encodes one packet into a new vector.
pub fn encode_vec(ver: u16, op: u32, seq: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    encode(ver, op, seq, body, &mut out);
    out
}

/// Parses a header from the first 16 bytes of `buf` without checking limits.
pub fn parse_header(buf: &[u8]) -> Result<Header, DecodeError> {
    let Some(h) = buf.first_chunk::<HEADER_LEN>() else {
        return Err(DecodeError::Incomplete);
    };
    Ok(Header {
        packet_len: u32::from_be_bytes([h[0], h[1], h[2], h[3]]),
        header_len: u16::from_be_bytes([h[4], h[5]]),
        ver: u16::from_be_bytes([h[6], h[7]]),
        op: u32::from_be_bytes([h[8], h[9], h[10], h[11]]),
        seq: u32::from_be_bytes([h[12], h[13], h[14], h[15]]),
    })
}

/// Checks a parsed header against the protocol and `frame_bytes_max`; returns the packet length.
fn check_header(h: &Header, frame_bytes_max: u32) -> Result<usize, Invalid> {
    if usize::from(h.header_len) != HEADER_LEN {
        return Err(Invalid::HeaderLen);
    }
    if (h.packet_len as usize) < HEADER_LEN {
        return Err(Invalid::TooShort);
    }
    if h.packet_len > frame_bytes_max {
        return Err(Invalid::TooLong);
    }
    Ok(h.packet_len as usize)
}

/// Decodes the first packet in `buf`: returns it and the number of bytes it used.
/// `frame_bytes_max` caps `packet_len`; it is checked as soon as the header is in,
/// so a peer cannot make us buffer more than that.
pub fn decode(buf: &[u8], frame_bytes_max: u32) -> Result<(Packet<'_>, usize), DecodeError> {
    let h = parse_header(buf)?;
    let len = check_header(&h, frame_bytes_max).map_err(DecodeError::Invalid)?;
    let Some(body) = buf.get(HEADER_LEN..len) else {
        return Err(DecodeError::Incomplete);
    };
    Ok((
        Packet {
            ver: h.ver,
            op: h.op,
            seq: h.seq,
            body,
        },
        len,
    ))
}

/// Incremental stream decoder over a growable buffer: feed bytes as they arrive, take
/// packets as they complete. Its buffer starts small and grows only while a larger
/// packet is being read (idle connections stay cheap), then shrinks back.
///
/// Invariants: `start <= buf.len()`; bytes before `start` are already decoded and are
/// dropped at the next `feed`; once `poisoned`, no packet is ever returned again.
#[derive(Debug)]
pub struct StreamDecoder {
    // implementation-defined fields
    frame_bytes_max: u32,
    buf: Vec<u8>,
    start: usize,
    poisoned: Option<Invalid>,
}

impl StreamDecoder {
    pub fn new(frame_bytes_max: u32) -> Self {
        // No allocation until the first byte: most connections sit idle between heartbeats.
        StreamDecoder {
            frame_bytes_max,
            buf: Vec::new(),
            start: 0,
            poisoned: None,
        }
    }

    /// Appends received bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.poisoned.is_some() || bytes.is_empty() {
            return;
        }
        if self.start > 0 {
            // Compact before growing so the buffer holds at most one partial packet plus `bytes`.
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Returns the next complete packet, `Ok(None)` if more bytes are needed, or the
    /// reason the stream is invalid (then the peer must be closed; the decoder is poisoned).
    pub fn next_packet(&mut self) -> Result<Option<OwnedPacket>, Invalid> {
        if let Some(why) = self.poisoned {
            return Err(why);
        }
        let pending = self.buf.get(self.start..).unwrap_or_default();
        match decode(pending, self.frame_bytes_max) {
            Ok((p, used)) => {
                let packet = OwnedPacket {
                    ver: p.ver,
                    op: p.op,
                    seq: p.seq,
                    body: p.body.to_vec(),
                };
                self.start += used;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                    if self.buf.capacity() > STREAM_IDLE_CAPACITY_BYTES_MAX {
                        // A large packet just completed: give its memory back.
                        self.buf = Vec::new();
                    }
                }
                Ok(Some(packet))
            }
            Err(DecodeError::Incomplete) => Ok(None),
            Err(DecodeError::Invalid(why)) => {
                self.poisoned = Some(why);
                self.buf = Vec::new();
                self.start = 0;
                Err(why)
            }
        }
    }

    /// Bytes buffered but not yet decoded.
    pub fn buffered_len(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Bytes of heap the decoder holds (for the per-connection memory budget).
    pub fn capacity_bytes(&self) -> usize {
        self.buf.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_fields_are_big_endian() {
        let p = encode_vec(ver::PLAIN, op::NOTIFICATION, 0x0102_0304, b"{}");
        assert_eq!(
            &p[..16],
            &[0, 0, 0, 18, 0, 16, 0, 0, 0, 0, 0, 5, 1, 2, 3, 4]
        );
        assert_eq!(&p[16..], b"{}");
    }

    #[test]
    fn decode_reports_incomplete_until_the_last_byte() {
        let p = encode_vec(ver::PLAIN, op::NOTIFICATION, 1, b"hello");
        for cut in 0..p.len() {
            assert_eq!(
                decode(&p[..cut], 1024),
                Err(DecodeError::Incomplete),
                "cut {cut}"
            );
        }
        let (pk, used) = decode(&p, 1024).unwrap();
        assert_eq!(used, p.len());
        assert_eq!(pk.body, b"hello");
    }

    #[test]
    fn decode_rejects_bad_headers() {
        let mut p = encode_vec(0, 5, 1, b"x");
        p[5] = 12;
        assert_eq!(
            decode(&p, 1024),
            Err(DecodeError::Invalid(Invalid::HeaderLen))
        );
        let mut p = encode_vec(0, 5, 1, b"x");
        p[3] = 15;
        assert_eq!(
            decode(&p, 1024),
            Err(DecodeError::Invalid(Invalid::TooShort))
        );
        let p = encode_vec(0, 5, 1, &[0; 100]);
        assert_eq!(decode(&p, 115), Err(DecodeError::Invalid(Invalid::TooLong)));
        assert!(decode(&p, 116).is_ok());
    }

    #[test]
    fn too_long_is_detected_from_the_header_alone() {
        let mut d = StreamDecoder::new(1024);
        let p = encode_vec(0, 5, 1, &[0; 2000]);
        d.feed(&p[..16]);
        assert_eq!(d.next_packet(), Err(Invalid::TooLong));
        // Poisoned: further bytes are ignored and the error sticks.
        d.feed(&p[16..]);
        assert_eq!(d.next_packet(), Err(Invalid::TooLong));
        assert_eq!(d.buffered_len(), 0);
        assert_eq!(d.capacity_bytes(), 0);
    }

    #[test]
    fn stream_decoder_is_cheap_idle_and_shrinks_after_a_large_packet() {
        let mut d = StreamDecoder::new(64 * 1024);
        assert_eq!(d.capacity_bytes(), 0);
        let big = encode_vec(0, 5, 1, &[7; 30_000]);
        for chunk in big.chunks(1000) {
            d.feed(chunk);
        }
        assert!(d.capacity_bytes() >= 30_000);
        let got = d.next_packet().unwrap().unwrap();
        assert_eq!(got.body.len(), 30_000);
        assert_eq!(d.next_packet(), Ok(None));
        assert!(
            d.capacity_bytes() <= STREAM_IDLE_CAPACITY_BYTES_MAX,
            "{}",
            d.capacity_bytes()
        );
    }

    #[test]
    fn stream_decoder_yields_back_to_back_packets() {
        let mut d = StreamDecoder::new(1024);
        let mut bytes = encode_vec(1, 2, 1, b"[object Object]");
        encode(1, 7, 1, b"{\"roomid\":1}", &mut bytes);
        bytes.extend_from_slice(&encode_vec(0, 5, 9, b"")[..10]);
        d.feed(&bytes);
        assert_eq!(d.next_packet().unwrap().unwrap().op, 2);
        assert_eq!(d.next_packet().unwrap().unwrap().op, 7);
        assert_eq!(d.next_packet(), Ok(None));
        assert_eq!(d.buffered_len(), 10);
    }
}
