//! Server-side WebSocket (RFC 6455): the upgrade handshake and frames.
//!
//! CONTRACT: used by edge and loadtest (loadtest also needs the client side of framing:
//! `encode_client_frame`, and a server-frame decoder via `FrameDecoder::new_client_side`).

/// Close codes we send.
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const MESSAGE_TOO_BIG: u16 = 1009;
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

/// Parses an upgrade request head from `buf`; returns it and the head length.
pub fn parse_upgrade(buf: &[u8], head_bytes_max: usize) -> Result<(Upgrade, usize), HandshakeError> {
    todo!()
}

/// `Sec-WebSocket-Accept` for a key: base64(SHA-1(key + GUID)).
pub fn accept_key(key: &str) -> String {
    todo!()
}

/// The complete `101 Switching Protocols` response.
pub fn upgrade_response(key: &str) -> Vec<u8> {
    todo!()
}

/// A complete HTTP error response (e.g. 400, 404, 503) with a short text body, `Connection: close`.
pub fn http_error_response(status: u16, reason: &str) -> Vec<u8> {
    todo!()
}

/// Builds an unmasked server frame header (FIN set) for a payload of `len` bytes: 2, 4 or 10
/// bytes. Build it once per batch and send it before the shared payload to every connection.
pub fn server_frame_header(opcode: Opcode, len: usize) -> ([u8; 10], usize) {
    todo!()
}

/// A complete unmasked server frame (header + payload).
pub fn server_frame(opcode: Opcode, payload: &[u8]) -> Vec<u8> {
    todo!()
}

/// A complete server close frame with code and reason (reason truncated to fit 125 bytes).
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    todo!()
}

/// A complete masked client frame (for our own clients: loadtest, tail, tests).
pub fn encode_client_frame(opcode: Opcode, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    todo!()
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

/// Incremental frame decoder with fragment reassembly. Checks lengths before allocating.
#[derive(Debug)]
pub struct FrameDecoder {
    // implementation-defined fields
    message_bytes_max: usize,
    expect_masked: bool,
}

impl FrameDecoder {
    /// Server side: client frames must be masked.
    pub fn new(message_bytes_max: usize) -> Self {
        todo!()
    }

    /// Client side (loadtest, tail): server frames must not be masked.
    pub fn new_client_side(message_bytes_max: usize) -> Self {
        todo!()
    }

    /// Decodes the next message from `buf`, consuming bytes from its front (`buf.drain(..n)`
    /// or equivalent). `Ok(None)` means more bytes are needed.
    pub fn decode(&mut self, buf: &mut Vec<u8>) -> Result<Option<Message>, FrameError> {
        todo!()
    }
}
