//! The per-connection state machine, sans-io: bytes in, actions out.
//!
//! ```text
//! WS:  Handshake --101--> AwaitAuth --op 8 {"code":0}--> Live
//! TCP:                    AwaitAuth --op 8 {"code":0}--> Live
//! any state --violation / peer close--> Closed (final bytes in the Close action)
//! ```
//! The shell (`shard`) owns the socket, the clock and the room index; this type only parses
//! and decides. Auth replies are built by the shell (it may still refuse the join, e.g. at
//! `rooms_max`), everything else that answers the peer comes out framed for its transport.
//!
//! Invariants:
//! - After a `Close` action the session emits nothing more and ignores input.
//! - Every byte sequence leads to actions or a `Close`, never a panic; limits are checked by
//!   the proto decoders before they buffer (`frame_bytes_max`, `ws_message_bytes_max`,
//!   `ws_handshake_bytes_max`, `auth_bytes_max`).
//! - Idle sessions hold no heap beyond what the decoders keep (they shrink when drained).

use proto::auth::{self, AuthError};
use proto::id::{AreaId, DeviceId, Encoding, MsgId, RoomId, UserId};
use proto::packet::{op, Invalid, OwnedPacket, StreamDecoder};
use proto::token::{KeySet, TokenError};
use proto::ws::{self, FrameDecoder, FrameError, HandshakeError, Message, Opcode};

/// RFC 6455 §7.4.1 1003 "unsupported data", the code for a message type an endpoint does not
/// take (1008 is for policy violations with no more specific code): we take binary only.
pub const WS_UNSUPPORTED_DATA: u16 = 1003;

/// The client transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Ws,
    /// Datagrams (`crate::udp`): packets arrive whole, replies go out as datagrams.
    Udp,
}

impl Transport {
    pub fn label(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Ws => "ws",
            Transport::Udp => "udp",
        }
    }
}

/// Limits a session enforces (from the config).
#[derive(Clone, Debug)]
pub struct Limits {
    pub frame_bytes_max: u32,
    pub auth_bytes_max: u32,
    pub ws_message_bytes_max: usize,
    pub ws_handshake_bytes_max: usize,
    pub ws_path: String,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            frame_bytes_max: proto::limits::FRAME_BYTES_MAX,
            auth_bytes_max: proto::limits::AUTH_BYTES_MAX,
            ws_message_bytes_max: proto::limits::WS_MESSAGE_BYTES_MAX,
            ws_handshake_bytes_max: proto::limits::WS_HANDSHAKE_BYTES_MAX,
            ws_path: "/sub".into(),
        }
    }
}

/// What the session needs from its surroundings for one input.
pub struct Ctx<'a> {
    pub limits: &'a Limits,
    pub keys: &'a KeySet,
    /// Unix seconds (token expiry).
    pub now_s: u64,
}

/// Why an auth was refused (a metrics label each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthFail {
    /// Body not JSON of the expected shape, or above `auth_bytes_max`.
    Malformed,
    /// Token did not verify.
    Token(TokenError),
    /// Body roomid differs from the token's room.
    RoomMismatch,
    /// Body uid differs from the token's uid (non-guest token).
    UidMismatch,
}

impl AuthFail {
    pub const ALL: [AuthFail; 7] = [
        AuthFail::Malformed,
        AuthFail::Token(TokenError::Malformed),
        AuthFail::Token(TokenError::UnknownKey),
        AuthFail::Token(TokenError::BadMac),
        AuthFail::Token(TokenError::Expired),
        AuthFail::RoomMismatch,
        AuthFail::UidMismatch,
    ];

    pub fn label(self) -> &'static str {
        match self {
            AuthFail::Malformed => "body_malformed",
            AuthFail::Token(TokenError::Malformed) => "token_malformed",
            AuthFail::Token(TokenError::UnknownKey) => "token_unknown_key",
            AuthFail::Token(TokenError::BadMac) => "token_bad_mac",
            AuthFail::Token(TokenError::Expired) => "token_expired",
            AuthFail::RoomMismatch => "room_mismatch",
            AuthFail::UidMismatch => "uid_mismatch",
        }
    }

    pub fn index(self) -> usize {
        Self::ALL.iter().position(|a| *a == self).unwrap_or(0)
    }
}

/// Why a connection closed (a metrics label each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer closed (EOF, reset or a WS close frame).
    PeerClosed,
    /// Malformed client packet (bad header_len, too short).
    BadPacket,
    /// Client packet above `frame_bytes_max`.
    PacketTooLong,
    /// WebSocket protocol violation (unmasked, bad opcode, bad close code, control frame too big...).
    WsProtocol,
    /// WebSocket message above `ws_message_bytes_max`.
    WsTooBig,
    /// WebSocket text frame or invalid UTF-8 (we take binary only).
    WsBadData,
    /// Bad upgrade request (not a GET upgrade, wrong version, missing key).
    BadHandshake,
    /// Upgrade for a path other than `ws_path`.
    BadPath,
    /// Upgrade head above `ws_handshake_bytes_max`.
    HandshakeTooLarge,
    /// Upgrade head not complete within `handshake_ms_max` (slowloris).
    HandshakeTimeout,
    /// A packet other than op 7 before auth.
    NotAuthed,
    /// Auth refused (see `AuthFail` counters).
    AuthFailed,
    /// No auth within `auth_ms_max`.
    AuthTimeout,
    /// Silent for `heartbeat_timeout_ms`.
    HeartbeatTimeout,
    /// Send queue over `send_queue_bytes_max` for `stuck_ms_max` (the client stopped reading).
    Stuck,
    /// Too many pending handshakes on the shard (`pending_handshakes_max`).
    Overloaded,
    /// The shard is at `rooms_max`.
    RoomsFull,
    /// The node is at its connection capacity (fd limit minus the reserve, or `conns_max`):
    /// refused at accept with a reconnect hint.
    Capacity,
    /// The peer's address holds `conns_per_addr_max` connections already.
    AddrLimit,
    /// Drain or shutdown.
    Shutdown,
    /// TLS failure (bad record, handshake refused, decrypt error; see `tls_failed`).
    Tls,
    /// Socket error.
    Io,
}

impl CloseReason {
    pub const ALL: [CloseReason; 22] = [
        CloseReason::PeerClosed,
        CloseReason::BadPacket,
        CloseReason::PacketTooLong,
        CloseReason::WsProtocol,
        CloseReason::WsTooBig,
        CloseReason::WsBadData,
        CloseReason::BadHandshake,
        CloseReason::BadPath,
        CloseReason::HandshakeTooLarge,
        CloseReason::HandshakeTimeout,
        CloseReason::NotAuthed,
        CloseReason::AuthFailed,
        CloseReason::AuthTimeout,
        CloseReason::HeartbeatTimeout,
        CloseReason::Stuck,
        CloseReason::Overloaded,
        CloseReason::RoomsFull,
        CloseReason::Capacity,
        CloseReason::AddrLimit,
        CloseReason::Shutdown,
        CloseReason::Tls,
        CloseReason::Io,
    ];

    pub fn label(self) -> &'static str {
        match self {
            CloseReason::PeerClosed => "peer_closed",
            CloseReason::BadPacket => "bad_packet",
            CloseReason::PacketTooLong => "packet_too_long",
            CloseReason::WsProtocol => "ws_protocol",
            CloseReason::WsTooBig => "ws_too_big",
            CloseReason::WsBadData => "ws_bad_data",
            CloseReason::BadHandshake => "bad_handshake",
            CloseReason::BadPath => "bad_path",
            CloseReason::HandshakeTooLarge => "handshake_too_large",
            CloseReason::HandshakeTimeout => "handshake_timeout",
            CloseReason::NotAuthed => "not_authed",
            CloseReason::AuthFailed => "auth_failed",
            CloseReason::AuthTimeout => "auth_timeout",
            CloseReason::HeartbeatTimeout => "heartbeat_timeout",
            CloseReason::Stuck => "stuck",
            CloseReason::Overloaded => "overloaded",
            CloseReason::RoomsFull => "rooms_full",
            CloseReason::Capacity => "capacity",
            CloseReason::AddrLimit => "addr_limit",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Tls => "tls",
            CloseReason::Io => "io",
        }
    }

    pub fn index(self) -> usize {
        Self::ALL.iter().position(|a| *a == self).unwrap_or(0)
    }

    /// The WebSocket close code sent for this reason.
    pub fn ws_code(self) -> u16 {
        match self {
            CloseReason::PeerClosed => ws::close::NORMAL,
            CloseReason::BadPacket => ws::close::INVALID_PAYLOAD,
            CloseReason::PacketTooLong | CloseReason::WsTooBig => ws::close::MESSAGE_TOO_BIG,
            CloseReason::WsProtocol => ws::close::PROTOCOL_ERROR,
            CloseReason::WsBadData => WS_UNSUPPORTED_DATA,
            CloseReason::NotAuthed
            | CloseReason::AuthFailed
            | CloseReason::AuthTimeout
            | CloseReason::Stuck
            | CloseReason::BadHandshake
            | CloseReason::BadPath
            | CloseReason::HandshakeTooLarge
            | CloseReason::HandshakeTimeout => ws::close::POLICY_VIOLATION,
            CloseReason::HeartbeatTimeout
            | CloseReason::Shutdown
            | CloseReason::Tls
            | CloseReason::Io => ws::close::GOING_AWAY,
            // 1013 "try again later" is only IANA-registered, and strict decoders (ours included)
            // refuse it; 1008 is understood everywhere.
            CloseReason::Overloaded
            | CloseReason::RoomsFull
            | CloseReason::Capacity
            | CloseReason::AddrLimit => ws::close::POLICY_VIOLATION,
        }
    }
}

/// A successful auth: what the shell needs to seat the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authed {
    pub uid: UserId,
    pub device: DeviceId,
    pub room: RoomId,
    pub area: AreaId,
    pub encoding: Encoding,
    /// The client ACKs high-reach messages.
    pub ack: bool,
    /// The `resume` extension as parsed (DESIGN §11); malformed ones are answered by
    /// `crate::resume`, the auth stays valid.
    pub resume: proto::sync::ResumeField,
    /// The client gets a `BARRAGE_SYNC` after op 8 (`ack`, `sync` or `resume`).
    pub sync: bool,
}

/// What the shell must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Write these bytes (already framed for the transport).
    Send(Vec<u8>),
    /// Auth verified: seat the connection, then send `session.frame(&auth::auth_reply(0))`.
    Authed(Authed),
    /// The client sent a heartbeat: reply with `session.frame(&auth::heartbeat_reply(online))`.
    Heartbeat,
    /// The client acknowledged a high-reach message.
    Ack(MsgId),
    /// Write `bytes` (may be empty), then close. Nothing follows.
    Close {
        reason: CloseReason,
        auth_fail: Option<AuthFail>,
        bytes: Vec<u8>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Handshake,
    AwaitAuth,
    Live,
    Closed,
}

/// WebSocket-only state, boxed so a TCP session does not pay for it, and held only while
/// there is something in it (the upgrade head, part of a frame or of a message): an idle WS
/// connection, between heartbeats, holds none (the idle-memory target of issue 14).
#[derive(Debug)]
struct WsState {
    /// Raw bytes not yet decoded into frames (the upgrade head while handshaking).
    raw: Vec<u8>,
    frames: FrameDecoder,
}

/// One client connection's protocol state.
#[derive(Debug)]
pub struct Session {
    state: State,
    /// A UDP session (in the padding after `state`: TCP sessions pay nothing for it).
    udp: bool,
    /// A WebSocket session (also in the padding: the flag outlives `ws`, which is dropped
    /// whenever it is empty).
    websocket: bool,
    packets: StreamDecoder,
    ws: Option<Box<WsState>>,
}

impl Session {
    pub fn new(transport: Transport, limits: &Limits) -> Session {
        match transport {
            Transport::Tcp | Transport::Udp => Session {
                state: State::AwaitAuth,
                udp: transport == Transport::Udp,
                websocket: false,
                packets: StreamDecoder::new(limits.frame_bytes_max),
                ws: None,
            },
            Transport::Ws => Session {
                state: State::Handshake,
                udp: false,
                websocket: true,
                packets: StreamDecoder::new(limits.frame_bytes_max),
                ws: Some(Box::new(WsState {
                    raw: Vec::new(),
                    frames: FrameDecoder::new(limits.ws_message_bytes_max),
                })),
            },
        }
    }

    pub fn transport(&self) -> Transport {
        if self.websocket {
            Transport::Ws
        } else if self.udp {
            Transport::Udp
        } else {
            Transport::Tcp
        }
    }

    pub fn is_handshaking(&self) -> bool {
        self.state == State::Handshake
    }

    pub fn is_live(&self) -> bool {
        self.state == State::Live
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Frames one complete client packet for this transport: as is on TCP, one binary
    /// message on WS (so an op 3 reply is always its own message).
    pub fn frame(&self, packet: &[u8]) -> Vec<u8> {
        match self.websocket {
            false => packet.to_vec(),
            true => ws::server_frame(Opcode::Binary, packet),
        }
    }

    /// The bytes to send when the shell closes this session itself (timeouts, drain, stuck),
    /// and marks it closed.
    pub fn close(&mut self, reason: CloseReason) -> Vec<u8> {
        let was = self.state;
        self.state = State::Closed;
        match (self.websocket, was) {
            (_, State::Closed) => Vec::new(),
            (true, State::Handshake) => ws::http_error_response(408, "Request Timeout"),
            (true, _) => ws::close_frame(reason.ws_code(), reason.label()),
            (false, _) => Vec::new(),
        }
    }

    /// Heap bytes held (for the memory budget).
    pub fn heap_bytes(&self) -> usize {
        self.packets.capacity_bytes()
            + self
                .ws
                .as_ref()
                .map_or(0, |w| std::mem::size_of::<WsState>() + w.raw.capacity())
    }

    /// Feeds received bytes; appends what to do to `out`.
    pub fn on_bytes(&mut self, input: &[u8], ctx: &Ctx<'_>, out: &mut Vec<Action>) {
        if self.state == State::Closed {
            return;
        }
        if !self.websocket {
            self.packets.feed(input);
            self.drain_packets(ctx, out);
            self.release_idle(ctx);
            return;
        }
        self.ws
            .get_or_insert_with(|| {
                Box::new(WsState {
                    raw: Vec::new(),
                    frames: FrameDecoder::new(ctx.limits.ws_message_bytes_max),
                })
            })
            .raw
            .extend_from_slice(input);
        if self.state == State::Handshake && !self.handshake(ctx, out) {
            return;
        }
        self.drain_frames(ctx, out);
        // An idle WS connection keeps no WS state at all (it comes back with the next bytes).
        if self
            .ws
            .as_ref()
            .is_some_and(|w| w.raw.is_empty() && w.frames.is_between_messages())
        {
            self.ws = None;
        }
        self.release_idle(ctx);
    }

    /// Idle cost: once every received byte is decoded, hold no buffer at all (the auth packet
    /// alone would otherwise pin a few hundred bytes per connection for its whole life).
    fn release_idle(&mut self, ctx: &Ctx<'_>) {
        if self.packets.buffered_len() == 0 && self.packets.capacity_bytes() > 0 {
            self.packets = StreamDecoder::new(ctx.limits.frame_bytes_max);
        }
    }

    fn close_with(
        &mut self,
        reason: CloseReason,
        auth_fail: Option<AuthFail>,
        mut bytes: Vec<u8>,
        out: &mut Vec<Action>,
    ) {
        if self.websocket && self.state != State::Handshake {
            bytes.extend_from_slice(&ws::close_frame(reason.ws_code(), reason.label()));
        }
        self.state = State::Closed;
        out.push(Action::Close {
            reason,
            auth_fail,
            bytes,
        });
    }

    /// Returns true once the handshake is done (and frames may follow).
    fn handshake(&mut self, ctx: &Ctx<'_>, out: &mut Vec<Action>) -> bool {
        let Some(w) = self.ws.as_mut() else {
            return false;
        };
        match ws::parse_upgrade(&w.raw, ctx.limits.ws_handshake_bytes_max) {
            Err(HandshakeError::Incomplete) => {
                if w.raw.len() > ctx.limits.ws_handshake_bytes_max {
                    self.close_with(
                        CloseReason::HandshakeTooLarge,
                        None,
                        ws::http_error_response(431, "Request Header Fields Too Large"),
                        out,
                    );
                }
                false
            }
            Err(HandshakeError::TooLarge) => {
                self.close_with(
                    CloseReason::HandshakeTooLarge,
                    None,
                    ws::http_error_response(431, "Request Header Fields Too Large"),
                    out,
                );
                false
            }
            Err(HandshakeError::Bad(_)) => {
                self.close_with(
                    CloseReason::BadHandshake,
                    None,
                    ws::http_error_response(400, "Bad Request"),
                    out,
                );
                false
            }
            Ok((up, used)) => {
                let path = up.path.split('?').next().unwrap_or("");
                if path != ctx.limits.ws_path {
                    self.close_with(
                        CloseReason::BadPath,
                        None,
                        ws::http_error_response(404, "Not Found"),
                        out,
                    );
                    return false;
                }
                w.raw.drain(..used.min(w.raw.len()));
                out.push(Action::Send(ws::upgrade_response(&up.key)));
                self.state = State::AwaitAuth;
                true
            }
        }
    }

    fn drain_frames(&mut self, ctx: &Ctx<'_>, out: &mut Vec<Action>) {
        while self.state != State::Closed {
            let Some(w) = self.ws.as_mut() else { return };
            match w.frames.decode(&mut w.raw) {
                Ok(None) => return,
                Ok(Some(Message::Binary(payload))) => {
                    self.packets.feed(&payload);
                    self.drain_packets(ctx, out);
                }
                Ok(Some(Message::Text(_))) => {
                    self.close_with(CloseReason::WsBadData, None, Vec::new(), out)
                }
                Ok(Some(Message::Ping(p))) => {
                    out.push(Action::Send(ws::server_frame(Opcode::Pong, &p)))
                }
                Ok(Some(Message::Pong(_))) => {}
                Ok(Some(Message::Close(_, _))) => {
                    // Echo a normal close; the peer is done.
                    self.state = State::Closed;
                    out.push(Action::Close {
                        reason: CloseReason::PeerClosed,
                        auth_fail: None,
                        bytes: ws::close_frame(ws::close::NORMAL, ""),
                    });
                }
                Err(e) => {
                    let reason = match e {
                        FrameError::Protocol(_) => CloseReason::WsProtocol,
                        FrameError::InvalidPayload => CloseReason::WsBadData,
                        FrameError::TooBig => CloseReason::WsTooBig,
                    };
                    // The frame error names its own code (1002/1007/1009); use it.
                    let bytes = ws::close_frame(e.close_code(), reason.label());
                    self.state = State::Closed;
                    out.push(Action::Close {
                        reason,
                        auth_fail: None,
                        bytes,
                    });
                }
            }
        }
    }

    fn drain_packets(&mut self, ctx: &Ctx<'_>, out: &mut Vec<Action>) {
        while self.state != State::Closed {
            match self.packets.next_packet() {
                Ok(None) => return,
                Ok(Some(p)) => self.on_packet(p, ctx, out),
                Err(inv) => {
                    let reason = if inv == Invalid::TooLong {
                        CloseReason::PacketTooLong
                    } else {
                        CloseReason::BadPacket
                    };
                    self.close_with(reason, None, Vec::new(), out);
                }
            }
        }
    }

    fn on_packet(&mut self, p: OwnedPacket, ctx: &Ctx<'_>, out: &mut Vec<Action>) {
        match (self.state, p.op) {
            (State::AwaitAuth, op::AUTH) => match verify(&p.body, ctx) {
                Ok(a) => {
                    self.state = State::Live;
                    out.push(Action::Authed(a));
                }
                Err(f) => {
                    let reply = self.frame(&auth::auth_reply(auth::AUTH_BAD_TOKEN));
                    self.close_with(CloseReason::AuthFailed, Some(f), reply, out);
                }
            },
            (State::AwaitAuth, _) => self.close_with(CloseReason::NotAuthed, None, Vec::new(), out),
            (State::Live, op::HEARTBEAT) => out.push(Action::Heartbeat),
            (State::Live, op::ACK) => {
                if let Ok(b) = <[u8; 8]>::try_from(p.body.as_slice()) {
                    out.push(Action::Ack(MsgId(u64::from_be_bytes(b))));
                }
            }
            // A repeated auth or an op we do not know: clients add their own; ignore.
            (State::Live, _) => {}
            (State::Handshake | State::Closed, _) => {}
        }
    }
}

/// Verifies an op 7 body: the token, and that the body's room (and uid, for non-guest
/// tokens) matches the token's claims.
pub fn verify(body: &[u8], ctx: &Ctx<'_>) -> Result<Authed, AuthFail> {
    let ext = auth::parse_auth_ext(body, ctx.limits.auth_bytes_max).map_err(|e| match e {
        AuthError::Malformed | AuthError::TooLarge => AuthFail::Malformed,
    })?;
    let sync = ext.wants_sync();
    let b = ext.body;
    let t = ctx
        .keys
        .verify(&b.key, ctx.now_s)
        .map_err(AuthFail::Token)?;
    let c = t.claims;
    if b.roomid != c.room.0 {
        return Err(AuthFail::RoomMismatch);
    }
    if !c.uid.is_guest() && b.uid != c.uid.0 {
        return Err(AuthFail::UidMismatch);
    }
    // The token's device claim wins; a token without one falls back to the body's buvid.
    let device = if c.device.0.is_empty() {
        DeviceId(b.buvid.unwrap_or_default())
    } else {
        c.device
    };
    Ok(Authed {
        uid: c.uid,
        device,
        room: c.room,
        area: c.area,
        encoding: Encoding::from_protover(b.protover),
        ack: b.ack,
        resume: ext.resume,
        sync,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::auth::AuthBody;
    use proto::packet;
    use proto::token::Claims;

    fn keys() -> KeySet {
        KeySet::new(&[(1, b"0123456789abcdef0123".to_vec())])
    }

    fn token(keys: &KeySet, uid: u64, room: u64, exp: u64) -> String {
        keys.sign(&Claims {
            uid: UserId(uid),
            device: DeviceId("dev".into()),
            room: RoomId(room),
            area: AreaId(4),
            expires_at_s: exp,
        })
    }

    fn auth_pkt(uid: u64, room: u64, key: String, protover: u32) -> Vec<u8> {
        auth::auth_request(&AuthBody {
            uid,
            roomid: room,
            protover,
            key,
            ..Default::default()
        })
    }

    fn run(s: &mut Session, bytes: &[u8], keys: &KeySet) -> Vec<Action> {
        let limits = Limits::default();
        let ctx = Ctx {
            limits: &limits,
            keys,
            now_s: 1_000,
        };
        let mut out = Vec::new();
        s.on_bytes(bytes, &ctx, &mut out);
        out
    }

    fn closed_with(actions: &[Action]) -> Option<(CloseReason, Option<AuthFail>)> {
        actions.iter().find_map(|a| match a {
            Action::Close {
                reason, auth_fail, ..
            } => Some((*reason, *auth_fail)),
            _ => None,
        })
    }

    #[test]
    fn tcp_auth_then_heartbeat_byte_by_byte() {
        let k = keys();
        let mut s = Session::new(Transport::Tcp, &Limits::default());
        let mut input = auth_pkt(7, 42, token(&k, 7, 42, 2_000), 3);
        input.extend(auth::heartbeat_request());
        let mut got = Vec::new();
        for b in &input {
            got.extend(run(&mut s, &[*b], &k));
        }
        assert_eq!(got.len(), 2, "{got:?}");
        match &got[0] {
            Action::Authed(a) => {
                assert_eq!(
                    (a.uid, a.room, a.area, a.encoding),
                    (UserId(7), RoomId(42), AreaId(4), Encoding::Brotli)
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(got[1], Action::Heartbeat);
        assert!(s.is_live());
    }

    #[test]
    fn guest_token_binds_room_only() {
        let k = keys();
        let mut s = Session::new(Transport::Tcp, &Limits::default());
        let a = run(&mut s, &auth_pkt(999, 42, token(&k, 0, 42, 2_000), 2), &k);
        assert!(
            matches!(&a[0], Action::Authed(x) if x.uid == UserId(0) && x.encoding == Encoding::Zlib)
        );
    }

    #[test]
    fn auth_failures_reply_minus_101_and_close() {
        let k = keys();
        let other = KeySet::new(&[(2, b"another-secret-key-xx".to_vec())]);
        let cases: Vec<(Vec<u8>, AuthFail)> = vec![
            (
                auth_pkt(7, 42, token(&k, 7, 42, 10), 3),
                AuthFail::Token(TokenError::Expired),
            ),
            (
                auth_pkt(7, 43, token(&k, 7, 42, 2_000), 3),
                AuthFail::RoomMismatch,
            ),
            (
                auth_pkt(8, 42, token(&k, 7, 42, 2_000), 3),
                AuthFail::UidMismatch,
            ),
            (
                auth_pkt(7, 42, token(&other, 7, 42, 2_000), 3),
                AuthFail::Token(TokenError::UnknownKey),
            ),
            (
                auth_pkt(7, 42, "garbage".into(), 3),
                AuthFail::Token(TokenError::Malformed),
            ),
            (
                packet::encode_vec(1, op::AUTH, 1, b"{not json"),
                AuthFail::Malformed,
            ),
        ];
        for (pkt, want) in cases {
            let mut s = Session::new(Transport::Tcp, &Limits::default());
            let a = run(&mut s, &pkt, &k);
            assert_eq!(a.len(), 1, "{a:?}");
            match &a[0] {
                Action::Close {
                    reason,
                    auth_fail,
                    bytes,
                } => {
                    assert_eq!(*reason, CloseReason::AuthFailed);
                    assert_eq!(*auth_fail, Some(want));
                    assert_eq!(bytes, &auth::auth_reply(-101));
                }
                other => panic!("{other:?}"),
            }
            assert!(
                run(&mut s, &auth::heartbeat_request(), &k).is_empty(),
                "closed ignores input"
            );
        }
    }

    #[test]
    fn bad_packets_close() {
        let k = keys();
        let mut s = Session::new(Transport::Tcp, &Limits::default());
        // header_len 15
        let mut p = packet::encode_vec(1, op::HEARTBEAT, 1, b"x");
        p[5] = 15;
        assert_eq!(
            closed_with(&run(&mut s, &p, &k)),
            Some((CloseReason::BadPacket, None))
        );
        let mut s = Session::new(Transport::Tcp, &Limits::default());
        let mut p = packet::encode_vec(1, op::HEARTBEAT, 1, b"x");
        p[0..4].copy_from_slice(&(10_000_000u32).to_be_bytes());
        assert_eq!(
            closed_with(&run(&mut s, &p, &k)),
            Some((CloseReason::PacketTooLong, None))
        );
        let mut s = Session::new(Transport::Tcp, &Limits::default());
        assert_eq!(
            closed_with(&run(&mut s, &auth::heartbeat_request(), &k)),
            Some((CloseReason::NotAuthed, None))
        );
    }

    fn ws_upgrade(path: &str) -> Vec<u8> {
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").into_bytes()
    }

    #[test]
    fn ws_upgrade_auth_heartbeat_ping_close() {
        let k = keys();
        let mut s = Session::new(Transport::Ws, &Limits::default());
        let mut input = ws_upgrade("/sub");
        input.extend(ws::encode_client_frame(
            Opcode::Binary,
            &auth_pkt(7, 42, token(&k, 7, 42, 2_000), 0),
            [1, 2, 3, 4],
        ));
        input.extend(ws::encode_client_frame(
            Opcode::Binary,
            &auth::heartbeat_request(),
            [5, 6, 7, 8],
        ));
        input.extend(ws::encode_client_frame(Opcode::Ping, b"hi", [5, 6, 7, 8]));
        let a = run(&mut s, &input, &k);
        assert_eq!(a.len(), 4, "{a:?}");
        assert_eq!(
            a[0],
            Action::Send(ws::upgrade_response("dGhlIHNhbXBsZSBub25jZQ=="))
        );
        assert!(matches!(&a[1], Action::Authed(x) if x.encoding == Encoding::Plain));
        assert_eq!(a[2], Action::Heartbeat);
        assert_eq!(a[3], Action::Send(ws::server_frame(Opcode::Pong, b"hi")));
        let hb = s.frame(&auth::heartbeat_reply(5));
        assert_eq!(
            hb,
            ws::server_frame(Opcode::Binary, &auth::heartbeat_reply(5))
        );
        let a = run(
            &mut s,
            &ws::encode_client_frame(Opcode::Close, &1000u16.to_be_bytes(), [1, 1, 1, 1]),
            &k,
        );
        assert_eq!(closed_with(&a), Some((CloseReason::PeerClosed, None)));
    }

    /// An idle WS session holds no WS state; a frame split across reads, and a message split
    /// across frames, keep it until they are whole, and decode as if it had stayed.
    #[test]
    fn idle_ws_session_holds_no_ws_state() {
        let k = keys();
        let mut s = Session::new(Transport::Ws, &Limits::default());
        assert!(s.ws.is_some(), "handshaking");
        let mut input = ws_upgrade("/sub");
        input.extend(ws::encode_client_frame(
            Opcode::Binary,
            &auth_pkt(7, 42, token(&k, 7, 42, 2_000), 0),
            [1, 2, 3, 4],
        ));
        let a = run(&mut s, &input, &k);
        assert!(matches!(&a[1], Action::Authed(_)), "{a:?}");
        assert!(s.ws.is_none(), "idle after auth");
        assert_eq!(s.heap_bytes(), 0);
        assert_eq!(s.transport(), Transport::Ws, "still a WS session");
        let hb = ws::encode_client_frame(Opcode::Binary, &auth::heartbeat_request(), [5, 6, 7, 8]);
        assert!(run(&mut s, &hb[..3], &k).is_empty());
        assert!(s.ws.is_some(), "part of a frame");
        assert_eq!(run(&mut s, &hb[3..], &k), vec![Action::Heartbeat]);
        assert!(s.ws.is_none());
        let req = auth::heartbeat_request();
        let (a, b) = req.split_at(5);
        let first = ws::encode_client_fragment(Opcode::Binary, false, a, [1, 1, 1, 1]);
        let last = ws::encode_client_fragment(Opcode::Continuation, true, b, [2, 2, 2, 2]);
        assert!(run(&mut s, &first, &k).is_empty());
        assert!(s.ws.is_some(), "part of a message");
        assert_eq!(run(&mut s, &last, &k), vec![Action::Heartbeat]);
        assert!(s.ws.is_none());
        assert_eq!(
            s.close(CloseReason::HeartbeatTimeout),
            ws::close_frame(
                CloseReason::HeartbeatTimeout.ws_code(),
                CloseReason::HeartbeatTimeout.label()
            )
        );
    }

    #[test]
    fn ws_violations_close_with_codes() {
        let k = keys();
        let up = ws_upgrade("/sub");
        let mut unmasked = ws::server_frame(Opcode::Binary, b"abc");
        let mut bad_opcode = ws::encode_client_frame(Opcode::Binary, b"abc", [1, 2, 3, 4]);
        bad_opcode[0] = 0x80 | 0x3;
        let big_ping = ws::encode_client_frame(Opcode::Ping, &[0u8; 126], [1, 2, 3, 4]);
        let bad_close = ws::encode_client_frame(Opcode::Close, &999u16.to_be_bytes(), [1, 2, 3, 4]);
        let text = ws::encode_client_frame(Opcode::Text, b"hello", [1, 2, 3, 4]);
        let cases = [
            (std::mem::take(&mut unmasked), CloseReason::WsProtocol),
            (bad_opcode, CloseReason::WsProtocol),
            (big_ping, CloseReason::WsProtocol),
            (bad_close, CloseReason::WsProtocol),
            (text, CloseReason::WsBadData),
        ];
        for (frame, want) in cases {
            let mut s = Session::new(Transport::Ws, &Limits::default());
            let mut input = up.clone();
            input.extend(frame);
            let a = run(&mut s, &input, &k);
            assert_eq!(closed_with(&a), Some((want, None)), "{a:?}");
            if want == CloseReason::WsBadData {
                // A text message: close 1003, as docs/protocol-ws-token.md says.
                let Some(Action::Close { bytes, .. }) = a.last() else {
                    panic!("{a:?}")
                };
                assert_eq!(bytes[2..4], 1003u16.to_be_bytes());
            }
        }
        let mut s = Session::new(Transport::Ws, &Limits::default());
        let a = run(&mut s, &ws_upgrade("/other"), &k);
        assert_eq!(closed_with(&a), Some((CloseReason::BadPath, None)));
        let mut s = Session::new(Transport::Ws, &Limits::default());
        let a = run(&mut s, b"POST /sub HTTP/1.1\r\nHost: x\r\n\r\n", &k);
        assert_eq!(closed_with(&a), Some((CloseReason::BadHandshake, None)));
        let mut s = Session::new(Transport::Ws, &Limits::default());
        let a = run(&mut s, &vec![b'a'; 20_000], &k);
        assert_eq!(
            closed_with(&a),
            Some((CloseReason::HandshakeTooLarge, None))
        );
    }

    proptest::proptest! {
        /// Arbitrary bytes, in arbitrary chunks, after a valid start or not: the session never
        /// panics, and after a Close it emits nothing more.
        #[test]
        fn random_input_never_panics(
            ws in proptest::bool::ANY,
            valid_start in proptest::bool::ANY,
            chunks in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..300), 0..20),
        ) {
            let k = keys();
            let mut s = Session::new(if ws { Transport::Ws } else { Transport::Tcp }, &Limits::default());
            if valid_start && ws {
                run(&mut s, &ws_upgrade("/sub"), &k);
            }
            let mut closed = false;
            for c in chunks {
                let a = run(&mut s, &c, &k);
                if closed {
                    proptest::prop_assert!(a.is_empty());
                }
                if closed_with(&a).is_some() {
                    closed = true;
                }
            }
        }
    }
}
