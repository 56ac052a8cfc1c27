//! Server-side WebSocket (RFC 6455): the upgrade handshake and frames.
//!
//! CONTRACT: used by edge and loadtest (loadtest also needs the client side of framing:
//! `encode_client_frame`, and a server-frame decoder via `FrameDecoder::new_client_side`).
//!
//! # Invariants
//! - Nothing here panics on any input bytes; every failure is a typed error that names the close
//!   code (or HTTP status) to answer with.
//! - The decoder checks every length against `message_bytes_max` from the frame *header*, before it
//!   waits for or copies the payload, so a peer cannot make us buffer more than the limit plus one
//!   frame header.
//! - Server frames are never masked and always FIN (we never fragment); client frames are always
//!   masked. A decoder built for one side refuses the other side's framing.
//! - After the decoder returns an error the connection is dead: its state is unspecified and the
//!   caller must send the close code and drop the peer.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

/// RFC 6455 section 1.3: appended to the client key before hashing.
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Control frame payloads are at most this long (RFC 6455 section 5.5).
const CONTROL_PAYLOAD_BYTES_MAX: usize = 125;
/// Headers we are willing to look at in an upgrade head; more is a broken or hostile client.
const HANDSHAKE_HEADERS_MAX: usize = 64;
/// Longest frame header: 2 + 8 (64-bit length) + 4 (mask).
const FRAME_HEADER_BYTES_MAX: usize = 14;

/// Close codes we send.
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const MESSAGE_TOO_BIG: u16 = 1009;

    /// Whether a peer may send `code` in a close frame (RFC 6455 section 7.4): the defined codes
    /// except the ones reserved for local use (1004-1006, 1015), the IANA-registered 1012-1014
    /// (service restart, try again later, bad gateway), plus the ranges 3000-4999.
    pub fn is_valid_received(code: u16) -> bool {
        matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

/// Opcodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opcode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl Opcode {
    /// The 4-bit wire value.
    pub fn code(self) -> u8 {
        match self {
            Opcode::Continuation => 0x0,
            Opcode::Text => 0x1,
            Opcode::Binary => 0x2,
            Opcode::Close => 0x8,
            Opcode::Ping => 0x9,
            Opcode::Pong => 0xA,
        }
    }

    /// Parses the 4-bit wire value; reserved opcodes are `None`.
    pub fn from_code(code: u8) -> Option<Opcode> {
        match code {
            0x0 => Some(Opcode::Continuation),
            0x1 => Some(Opcode::Text),
            0x2 => Some(Opcode::Binary),
            0x8 => Some(Opcode::Close),
            0x9 => Some(Opcode::Ping),
            0xA => Some(Opcode::Pong),
            _ => None,
        }
    }

    /// Close, Ping and Pong: at most 125 bytes, never fragmented, may interleave a fragmented message.
    pub fn is_control(self) -> bool {
        matches!(self, Opcode::Close | Opcode::Ping | Opcode::Pong)
    }
}

/// A parsed, valid upgrade request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upgrade {
    pub path: String,
    /// `Sec-WebSocket-Key`.
    pub key: String,
    /// The first offered subprotocol, if any (we echo none).
    pub protocols: Vec<String>,
    /// Value of `X-Forwarded-For` if present (for logs only).
    pub forwarded_for: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// Need more bytes (head not complete yet).
    #[error("incomplete handshake")]
    Incomplete,
    /// Head larger than the limit.
    #[error("handshake head too large")]
    TooLarge,
    /// Not a valid HTTP/1.1 GET upgrade to websocket version 13 (answer 400).
    #[error("bad upgrade request: {0}")]
    Bad(&'static str),
}

/// Finds the end of an HTTP head (`\r\n\r\n`) in `buf`; returns the head length including it.
fn head_len(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Whether a comma-separated header value contains `token` (ASCII case-insensitive).
fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Parses an upgrade request head from `buf`; returns it and the head length.
pub fn parse_upgrade(
    buf: &[u8],
    head_bytes_max: usize,
) -> Result<(Upgrade, usize), HandshakeError> {
    // Look for the end of the head only within the limit, so a client trickling an endless head
    // costs us at most `head_bytes_max` bytes of scanning per call and is refused as soon as it
    // has sent more than the limit.
    let window = &buf[..buf.len().min(head_bytes_max)];
    let len = match head_len(window) {
        Some(len) => len,
        None if buf.len() >= head_bytes_max => return Err(HandshakeError::TooLarge),
        None => return Err(HandshakeError::Incomplete),
    };
    let mut headers = [httparse::EMPTY_HEADER; HANDSHAKE_HEADERS_MAX];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(&buf[..len]) {
        Ok(httparse::Status::Complete(_)) => {}
        // Cannot happen once `\r\n\r\n` is in the slice, but never trust that with a panic.
        Ok(httparse::Status::Partial) => return Err(HandshakeError::Bad("unterminated head")),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HandshakeError::Bad("too many headers"))
        }
        Err(_) => return Err(HandshakeError::Bad("malformed HTTP request")),
    }
    if req.method != Some("GET") {
        return Err(HandshakeError::Bad("method is not GET"));
    }
    if req.version != Some(1) {
        return Err(HandshakeError::Bad("version is not HTTP/1.1"));
    }
    let path = req.path.ok_or(HandshakeError::Bad("no path"))?.to_owned();

    let mut upgrade_ok = false;
    let mut connection_ok = false;
    let mut version_ok = false;
    let mut key: Option<String> = None;
    let mut protocols = Vec::new();
    let mut forwarded_for = None;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade_ok |= has_token(h.value, "websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            connection_ok |= has_token(h.value, "upgrade");
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            version_ok = h.value.trim_ascii() == b"13";
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            if key.is_some() {
                return Err(HandshakeError::Bad("duplicate Sec-WebSocket-Key"));
            }
            let text = std::str::from_utf8(h.value.trim_ascii())
                .map_err(|_| HandshakeError::Bad("Sec-WebSocket-Key is not ASCII"))?;
            match BASE64.decode(text) {
                Ok(raw) if raw.len() == 16 => key = Some(text.to_owned()),
                _ => {
                    return Err(HandshakeError::Bad(
                        "Sec-WebSocket-Key is not base64 of 16 bytes",
                    ))
                }
            }
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            if let Ok(text) = std::str::from_utf8(h.value) {
                protocols.extend(
                    text.split(',')
                        .map(str::trim)
                        .filter(|p| !p.is_empty())
                        .map(str::to_owned),
                );
            }
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            forwarded_for = std::str::from_utf8(h.value)
                .ok()
                .map(|v| v.trim().to_owned());
        }
    }
    if !upgrade_ok {
        return Err(HandshakeError::Bad("missing Upgrade: websocket"));
    }
    if !connection_ok {
        return Err(HandshakeError::Bad("missing Connection: upgrade"));
    }
    if !version_ok {
        return Err(HandshakeError::Bad("Sec-WebSocket-Version is not 13"));
    }
    let key = key.ok_or(HandshakeError::Bad("missing Sec-WebSocket-Key"))?;
    Ok((
        Upgrade {
            path,
            key,
            protocols,
            forwarded_for,
        },
        len,
    ))
}

/// `Sec-WebSocket-Accept` for a key: base64(SHA-1(key + GUID)).
pub fn accept_key(key: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.as_bytes());
    ctx.update(ACCEPT_GUID.as_bytes());
    BASE64.encode(ctx.finish().as_ref())
}

/// The complete `101 Switching Protocols` response.
pub fn upgrade_response(key: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(key)
    )
    .into_bytes()
}

/// A complete HTTP error response (e.g. 400, 404, 503) with a short text body, `Connection: close`.
pub fn http_error_response(status: u16, reason: &str) -> Vec<u8> {
    // The reason lands in the status line: drop control characters so it cannot split the head.
    let reason: String = reason.chars().filter(|c| !c.is_control()).collect();
    let body = format!("{status} {reason}\n");
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Builds an unmasked server frame header (FIN set) for a payload of `len` bytes: 2, 4 or 10
/// bytes. Build it once per batch and send it before the shared payload to every connection.
pub fn server_frame_header(opcode: Opcode, len: usize) -> ([u8; 10], usize) {
    let mut h = [0u8; 10];
    let used = write_header(&mut h, true, opcode, false, len);
    (h, used)
}

/// Writes FIN/opcode, the mask bit and the minimal length encoding; returns bytes written (2, 4 or 10).
fn write_header(h: &mut [u8; 10], fin: bool, opcode: Opcode, masked: bool, len: usize) -> usize {
    h[0] = (u8::from(fin) << 7) | opcode.code();
    let mask_bit = u8::from(masked) << 7;
    if len <= 125 {
        // Fits in 7 bits by the branch condition.
        h[1] = mask_bit | len as u8;
        2
    } else if let Ok(len16) = u16::try_from(len) {
        h[1] = mask_bit | 126;
        h[2..4].copy_from_slice(&len16.to_be_bytes());
        4
    } else {
        h[1] = mask_bit | 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// A complete unmasked server frame (header + payload).
pub fn server_frame(opcode: Opcode, payload: &[u8]) -> Vec<u8> {
    let (h, used) = server_frame_header(opcode, payload.len());
    let mut out = Vec::with_capacity(used + payload.len());
    out.extend_from_slice(&h[..used]);
    out.extend_from_slice(payload);
    out
}

/// The close payload: code then the reason cut at a char boundary so the whole fits 125 bytes.
fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut cut = reason.len().min(CONTROL_PAYLOAD_BYTES_MAX - 2);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = Vec::with_capacity(2 + cut);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    payload
}

/// A complete server close frame with code and reason (reason truncated to fit 125 bytes).
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    server_frame(Opcode::Close, &close_payload(code, reason))
}

/// A complete masked client frame (for our own clients: loadtest, tail, tests).
pub fn encode_client_frame(opcode: Opcode, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    encode_client_fragment(opcode, true, payload, mask)
}

/// A masked client frame with an explicit FIN bit, to send a message in fragments (first frame
/// with the data opcode, the rest [`Opcode::Continuation`], the last with `fin`).
pub fn encode_client_fragment(opcode: Opcode, fin: bool, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut h = [0u8; 10];
    let used = write_header(&mut h, fin, opcode, true, payload.len());
    let mut out = Vec::with_capacity(used + 4 + payload.len());
    out.extend_from_slice(&h[..used]);
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask);
    out
}

/// A masked client close frame (code + reason, reason truncated to fit 125 bytes).
pub fn encode_client_close(code: u16, reason: &str, mask: [u8; 4]) -> Vec<u8> {
    encode_client_frame(Opcode::Close, &close_payload(code, reason), mask)
}

/// XORs `data` with the 4-byte key, the key's phase starting at `data[0]`.
fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    // Word-at-a-time keeps unmasking a 64 KiB message cheap without unsafe code.
    let word = u32::from_ne_bytes(mask);
    let mut chunks = data.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

/// A message or control frame delivered by the decoder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// A complete (reassembled) binary message.
    Binary(Vec<u8>),
    /// A complete text message (valid UTF-8).
    Text(String),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    /// Close with optional code and reason.
    Close(Option<u16>, String),
}

/// A protocol violation; the value says which close code to send.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// 1002: unmasked client frame, reserved bits, bad opcode, control frame > 125 or
    /// fragmented, bad continuation, bad close code.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// 1007: text or close reason not UTF-8.
    #[error("invalid payload")]
    InvalidPayload,
    /// 1009: message larger than the limit.
    #[error("message too big")]
    TooBig,
}

impl FrameError {
    pub fn close_code(&self) -> u16 {
        match self {
            FrameError::Protocol(_) => close::PROTOCOL_ERROR,
            FrameError::InvalidPayload => close::INVALID_PAYLOAD,
            FrameError::TooBig => close::MESSAGE_TOO_BIG,
        }
    }
}

/// A validated frame header.
struct FrameHeader {
    fin: bool,
    opcode: Opcode,
    mask: Option<[u8; 4]>,
    /// Header length in bytes (including the mask key).
    header_len: usize,
    /// Payload length, already checked against the limit so it fits in `usize`.
    payload_len: usize,
}

/// Incremental frame decoder with fragment reassembly. Checks lengths before allocating.
#[derive(Debug)]
pub struct FrameDecoder {
    message_bytes_max: usize,
    expect_masked: bool,
    /// The data opcode (Text or Binary) and payload so far of a message whose last frame has not
    /// arrived yet; `None` between messages.
    partial: Option<(Opcode, Vec<u8>)>,
}

impl FrameDecoder {
    /// Server side: client frames must be masked.
    pub fn new(message_bytes_max: usize) -> Self {
        FrameDecoder {
            message_bytes_max,
            expect_masked: true,
            partial: None,
        }
    }

    /// Client side (loadtest, tail): server frames must not be masked.
    pub fn new_client_side(message_bytes_max: usize) -> Self {
        FrameDecoder {
            message_bytes_max,
            expect_masked: false,
            partial: None,
        }
    }

    /// Parses and validates the header at the front of `buf`; `Ok(None)` if it is not all there.
    fn header(&self, buf: &[u8]) -> Result<Option<FrameHeader>, FrameError> {
        let (b0, b1) = match buf {
            [b0, b1, ..] => (*b0, *b1),
            _ => return Ok(None),
        };
        if b0 & 0x70 != 0 {
            return Err(FrameError::Protocol("reserved bits set"));
        }
        let fin = b0 & 0x80 != 0;
        let opcode = Opcode::from_code(b0 & 0x0F).ok_or(FrameError::Protocol("reserved opcode"))?;
        let masked = b1 & 0x80 != 0;
        if masked != self.expect_masked {
            return Err(FrameError::Protocol(if self.expect_masked {
                "client frame not masked"
            } else {
                "server frame masked"
            }));
        }
        let len7 = b1 & 0x7F;
        if opcode.is_control() {
            if !fin {
                return Err(FrameError::Protocol("fragmented control frame"));
            }
            if usize::from(len7) > CONTROL_PAYLOAD_BYTES_MAX {
                return Err(FrameError::Protocol("control frame longer than 125 bytes"));
            }
        } else {
            match (opcode, &self.partial) {
                (Opcode::Continuation, None) => {
                    return Err(FrameError::Protocol("continuation without a message start"))
                }
                (Opcode::Text | Opcode::Binary, Some(_)) => {
                    return Err(FrameError::Protocol(
                        "new message inside a fragmented message",
                    ))
                }
                _ => {}
            }
        }
        let (len, mut at) = match len7 {
            126 => match buf.get(2..4) {
                Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
                None => return Ok(None),
            },
            127 => match buf.get(2..10) {
                Some(b) => {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    let len = u64::from_be_bytes(a);
                    if len >> 63 != 0 {
                        return Err(FrameError::Protocol("64-bit length with the high bit set"));
                    }
                    (len, 10)
                }
                None => return Ok(None),
            },
            n => (u64::from(n), 2),
        };
        // The limit applies to the reassembled message, checked now so we never wait for (or
        // buffer) a payload we would refuse anyway. Control frames are bounded by 125 above.
        let so_far = self.partial.as_ref().map_or(0, |(_, p)| p.len());
        let payload_len = match usize::try_from(len) {
            Ok(l) if opcode.is_control() || l <= self.message_bytes_max.saturating_sub(so_far) => l,
            _ => return Err(FrameError::TooBig),
        };
        let mask = if masked {
            match buf.get(at..at + 4) {
                Some(m) => {
                    at += 4;
                    Some([m[0], m[1], m[2], m[3]])
                }
                None => return Ok(None),
            }
        } else {
            None
        };
        debug_assert!(at <= FRAME_HEADER_BYTES_MAX);
        Ok(Some(FrameHeader {
            fin,
            opcode,
            mask,
            header_len: at,
            payload_len,
        }))
    }

    /// No message is partly received (a decoder in this state may be dropped and made anew
    /// with the same limit without losing anything).
    pub fn is_between_messages(&self) -> bool {
        self.partial.is_none()
    }

    /// Decodes the next message from `buf`, consuming bytes from its front (`buf.drain(..n)`
    /// or equivalent). `Ok(None)` means more bytes are needed.
    pub fn decode(&mut self, buf: &mut Vec<u8>) -> Result<Option<Message>, FrameError> {
        let (consumed, result) = self.decode_slice(buf);
        buf.drain(..consumed);
        result
    }

    /// Like [`FrameDecoder::decode`] but leaves the buffer alone and says how many bytes from the
    /// front of `buf` it consumed (fragments of a still-open message count as consumed). A caller
    /// with many small messages in one read loops over `&buf[pos..]` and drains once per read,
    /// instead of moving the rest of the buffer once per message.
    pub fn decode_slice(&mut self, buf: &[u8]) -> (usize, Result<Option<Message>, FrameError>) {
        let mut pos = 0;
        loop {
            let h = match self.header(&buf[pos..]) {
                Ok(Some(h)) => h,
                Ok(None) => return (pos, Ok(None)),
                Err(e) => return (pos, Err(e)),
            };
            let frame_len = h.header_len.saturating_add(h.payload_len);
            let Some(frame) = buf.get(pos..pos.saturating_add(frame_len)) else {
                return (pos, Ok(None));
            };
            let payload = &frame[h.header_len..];
            pos += frame_len;
            if h.opcode.is_control() {
                let mut payload = payload.to_vec();
                if let Some(m) = h.mask {
                    apply_mask(&mut payload, m);
                }
                return (pos, control_message(h.opcode, payload).map(Some));
            }
            // Data frame. Unfragmented and nothing pending: one copy into the message's own Vec.
            // Fragments are appended to the pending message and unmasked in place there.
            let (opcode, mut data) = match self.partial.take() {
                Some(p) => p,
                None => (
                    h.opcode,
                    Vec::with_capacity(if h.fin { h.payload_len } else { 0 }),
                ),
            };
            let start = data.len();
            data.extend_from_slice(payload);
            if let Some(m) = h.mask {
                apply_mask(&mut data[start..], m);
            }
            if !h.fin {
                self.partial = Some((opcode, data));
                continue;
            }
            let message = match opcode {
                Opcode::Text => String::from_utf8(data)
                    .map(|s| Some(Message::Text(s)))
                    .map_err(|_| FrameError::InvalidPayload),
                _ => Ok(Some(Message::Binary(data))),
            };
            return (pos, message);
        }
    }

    /// Whether a fragmented message is partly received.
    pub fn in_message(&self) -> bool {
        self.partial.is_some()
    }
}

/// Builds a control message from its unmasked payload, validating close frames.
fn control_message(opcode: Opcode, payload: Vec<u8>) -> Result<Message, FrameError> {
    match opcode {
        Opcode::Ping => Ok(Message::Ping(payload)),
        Opcode::Pong => Ok(Message::Pong(payload)),
        _ => match payload.as_slice() {
            [] => Ok(Message::Close(None, String::new())),
            [_] => Err(FrameError::Protocol("close payload of 1 byte")),
            [hi, lo, reason @ ..] => {
                let code = u16::from_be_bytes([*hi, *lo]);
                if !close::is_valid_received(code) {
                    return Err(FrameError::Protocol("invalid close code"));
                }
                let reason = std::str::from_utf8(reason).map_err(|_| FrameError::InvalidPayload)?;
                Ok(Message::Close(Some(code), reason.to_owned()))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_matches_bytewise_xor_at_every_length() {
        let mask = [1, 2, 4, 8];
        for len in 0..11 {
            let data: Vec<u8> = (0..len as u8).map(|b| b.wrapping_mul(37)).collect();
            let mut fast = data.clone();
            apply_mask(&mut fast, mask);
            let slow: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            assert_eq!(fast, slow, "len {len}");
        }
    }

    #[test]
    fn opcode_codes_round_trip() {
        for code in 0u8..16 {
            if let Some(op) = Opcode::from_code(code) {
                assert_eq!(op.code(), code);
            }
        }
        assert_eq!(Opcode::from_code(3), None);
    }

    #[test]
    fn fragment_is_held_until_fin() {
        let mut dec = FrameDecoder::new(16);
        let mut buf = encode_client_fragment(Opcode::Binary, false, b"ab", [9; 4]);
        assert_eq!(dec.decode(&mut buf), Ok(None));
        assert!(dec.in_message());
        assert!(buf.is_empty());
    }
}
