//! The UDP transport's datagrams (issue 11): the same 16-byte client packets, a few of them back
//! to back in one datagram, plus three ops of ours for the handshake, the session and the parts of
//! a split batch. Stateless: the address-validation cookie is a MAC, the session id derives from
//! it, and [`admit`] decides what to do with a client datagram from its bytes, its source address,
//! the session table's answer and `now_s`. `docs/protocol-udp.md` shows each datagram in hex.
//!
//! # Datagrams
//! ```text
//! C->S hello      [op 7 auth]                       -> [op 1001 cookie]            (≤ request size)
//! C->S hello      [op 1001 cookie][op 7 auth]       -> [op 8 reply][op 1002 session]
//! C->S session    [op 1002 session][op 2 | op 1000] -> [op 3 count] / nothing
//! C->S bye        [op 1002 session][op 1004 bye]    -> [op 1004 bye]; the session is gone
//! C->S rebinding  [op 1002 session][..] from a new address -> [op 1001 cookie] (≤ request size);
//!                 [op 1002 session][op 1001 cookie][..] from it -> the session moves there
//! S->C data       [op 1003 part][op 5 container]    one per datagram, each decodable alone
//! ```
//!
//! # Invariants
//! - Before an address has echoed a cookie minted for it, the server's answer is never larger
//!   than the datagram that caused it ([`admit`] returns the reply only if it fits): a spoofed
//!   source cannot be used to amplify.
//! - A cookie is bound to the source address (IP and port) and a time bucket of
//!   [`UDP_COOKIE_BUCKET_S`]; it verifies in the bucket it was minted in and the next one only.
//!   Replayed from another address it fails the MAC; replayed later it is expired; replayed from
//!   the same address in time it names the same session (the session id derives from the
//!   cookie), so it can neither open a second session nor earn a larger reply.
//! - A session id carries the shard that owns it in its top 16 bits, so a datagram the kernel's
//!   `SO_REUSEPORT` hash sends to another shard (after a NAT rebinding) can be forwarded.
//! - Every data datagram is at most `udp_payload_bytes_max` bytes, holds whole inner packets,
//!   and names the room seq and its part; a lost datagram is a visible gap.
//! - Decoders check every length before use and never panic (fuzzed: `fuzz/fuzz_targets/udp.rs`).

use crate::container::{self, BrotliParams};
use crate::id::Encoding;
use crate::packet::{self, op, ver, Header, Packet, HEADER_LEN};
use ring::hmac;
use std::net::SocketAddr;

/// Default `udp_payload_bytes_max`: the largest datagram payload either side sends. 1200 bytes
/// fit the smallest IPv6 path MTU (1280) with the IP and UDP headers, so nothing fragments.
pub const UDP_PAYLOAD_BYTES_MAX: usize = 1200;
/// Most packets one client datagram may hold (session, cookie, then a few requests).
pub const UDP_PACKETS_PER_DATAGRAM_MAX: usize = 4;
/// Width of a cookie's time bucket; a cookie verifies for one to two buckets.
pub const UDP_COOKIE_BUCKET_S: u64 = 10;
/// Default `udp_heartbeat_ms`: keeps NAT mappings open (most expire UDP after 30 s or more).
pub const UDP_HEARTBEAT_MS: u64 = 20_000;
/// Most parts one batch may be split into (the part fields are u16; this keeps a batch under
/// about 1 MB of datagrams).
pub const UDP_PARTS_MAX: usize = 1024;

/// Our ops for UDP. goim's table is 0..=17 and op 1000 is our ACK; these follow it.
pub mod udp_op {
    /// Both ways: the address-validation cookie (S->C: issue; C->S: echo).
    pub const COOKIE: u32 = 1001;
    /// Both ways: the session id (S->C after op 8: assign; C->S: first packet of every datagram).
    pub const SESSION: u32 = 1002;
    /// S->C: the part header before each data container.
    pub const PART: u32 = 1003;
    /// C->S, after `[op 1002 session]`: the client ends its session (empty body). S->C: the
    /// edge freed it (empty body; a lost one is not resent, the session is gone either way).
    pub const BYE: u32 = 1004;
}

/// Cookie body: u32 time bucket, then the first 16 bytes of the HMAC-SHA256.
pub const COOKIE_BODY_BYTES: usize = 4 + COOKIE_MAC_BYTES;
const COOKIE_MAC_BYTES: usize = 16;
/// Session body: u64.
pub const SESSION_BODY_BYTES: usize = 8;
/// Part body: u16 part, u16 parts, u16 flags.
pub const PART_BODY_BYTES: usize = 6;
/// Bytes of the part packet in front of every data container.
pub const PART_PACKET_BYTES: usize = HEADER_LEN + PART_BODY_BYTES;

/// Part flags.
pub mod part_flag {
    /// The inner packet of this part does not fit `udp_payload_bytes_max` even alone and was not
    /// sent: the client knows which message it lacks and can fetch it another way.
    pub const TOO_LARGE: u16 = 1;
}

/// Why a datagram was dropped. Every variant is the peer's fault; none is retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    /// The datagram holds no packet at all.
    #[error("empty datagram")]
    Empty,
    /// A packet's `packet_len` runs past the end of the datagram, or fewer than 16 bytes remain.
    #[error("truncated packet in datagram")]
    Truncated,
    /// The datagram is larger than `udp_payload_bytes_max`.
    #[error("datagram larger than udp_payload_bytes_max")]
    Oversized,
    /// A packet's `header_len` is not 16.
    #[error("header_len is not 16")]
    HeaderLen,
    /// A packet's `packet_len` is smaller than its header.
    #[error("packet_len shorter than the header")]
    TooShort,
    /// More than `UDP_PACKETS_PER_DATAGRAM_MAX` packets.
    #[error("too many packets in one datagram")]
    TooManyPackets,
    /// The packets are not one of the datagram shapes of this transport.
    #[error("unexpected packet sequence")]
    Unexpected,
    /// A cookie, session or part body has the wrong length.
    #[error("bad body length for a UDP control packet")]
    BadBody,
}

impl DatagramError {
    /// A short stable label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            DatagramError::Empty => "empty",
            DatagramError::Truncated => "truncated",
            DatagramError::Oversized => "oversized",
            DatagramError::HeaderLen => "header_len",
            DatagramError::TooShort => "too_short",
            DatagramError::TooManyPackets => "too_many_packets",
            DatagramError::Unexpected => "unexpected",
            DatagramError::BadBody => "bad_body",
        }
    }
}

/// Splits a datagram into its packets. A datagram is complete, so a short packet is
/// `Truncated`, never "incomplete".
pub fn packets(datagram: &[u8], payload_max: usize) -> Result<Vec<Packet<'_>>, DatagramError> {
    if datagram.len() > payload_max {
        return Err(DatagramError::Oversized);
    }
    if datagram.is_empty() {
        return Err(DatagramError::Empty);
    }
    let mut out = Vec::new();
    let mut rest = datagram;
    while !rest.is_empty() {
        if out.len() == UDP_PACKETS_PER_DATAGRAM_MAX {
            return Err(DatagramError::TooManyPackets);
        }
        let h: Header = packet::parse_header(rest).map_err(|_| DatagramError::Truncated)?;
        if usize::from(h.header_len) != HEADER_LEN {
            return Err(DatagramError::HeaderLen);
        }
        let len = h.packet_len as usize;
        if len < HEADER_LEN {
            return Err(DatagramError::TooShort);
        }
        let Some(body) = rest.get(HEADER_LEN..len) else {
            return Err(DatagramError::Truncated);
        };
        out.push(Packet {
            ver: h.ver,
            op: h.op,
            seq: h.seq,
            body,
        });
        rest = &rest[len..];
    }
    Ok(out)
}

/// A session id: the owning shard in the top 16 bits, 48 bits of MAC below.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl SessionId {
    /// The shard that owns the session.
    pub fn shard(self) -> u16 {
        (self.0 >> 48) as u16
    }
}

/// An address-validation cookie as it travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cookie {
    pub bucket: u32,
    pub mac: [u8; COOKIE_MAC_BYTES],
}

impl Cookie {
    fn body(&self) -> [u8; COOKIE_BODY_BYTES] {
        let mut b = [0u8; COOKIE_BODY_BYTES];
        b[..4].copy_from_slice(&self.bucket.to_be_bytes());
        b[4..].copy_from_slice(&self.mac);
        b
    }

    fn parse(body: &[u8]) -> Result<Cookie, DatagramError> {
        let Some((bucket, mac)) = body
            .split_first_chunk::<4>()
            .and_then(|(b, m)| Some((*b, <[u8; COOKIE_MAC_BYTES]>::try_from(m).ok()?)))
        else {
            return Err(DatagramError::BadBody);
        };
        Ok(Cookie {
            bucket: u32::from_be_bytes(bucket),
            mac,
        })
    }
}

/// Why a cookie was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CookieError {
    /// The MAC does not match this address and bucket: forged, or minted for another address.
    #[error("cookie MAC does not verify for this address")]
    Forged,
    /// Minted more than one bucket ago (or in the future).
    #[error("cookie expired")]
    Expired,
}

/// The secret behind cookies and session ids; one per edge node, shared by its shards, so any
/// shard verifies a cookie another one minted.
pub struct CookieKey {
    key: hmac::Key,
}

impl CookieKey {
    pub fn new(secret: &[u8]) -> CookieKey {
        CookieKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    fn mac(&self, bucket: u32, addr: SocketAddr) -> [u8; COOKIE_MAC_BYTES] {
        let mut msg = [0u8; 1 + 4 + 16 + 2];
        msg[1..5].copy_from_slice(&bucket.to_be_bytes());
        let n = match addr {
            SocketAddr::V4(a) => {
                msg[0] = 4;
                msg[5..9].copy_from_slice(&a.ip().octets());
                9
            }
            SocketAddr::V6(a) => {
                msg[0] = 6;
                msg[5..21].copy_from_slice(&a.ip().octets());
                21
            }
        };
        msg[n..n + 2].copy_from_slice(&addr.port().to_be_bytes());
        let tag = hmac::sign(&self.key, &msg[..n + 2]);
        let mut out = [0u8; COOKIE_MAC_BYTES];
        out.copy_from_slice(&tag.as_ref()[..COOKIE_MAC_BYTES]);
        out
    }

    /// The cookie for `addr` at `now_s` (any seconds clock the node's shards share).
    pub fn mint(&self, addr: SocketAddr, now_s: u64) -> Cookie {
        let bucket = bucket_of(now_s);
        Cookie {
            bucket,
            mac: self.mac(bucket, addr),
        }
    }

    /// Checks a cookie echoed from `addr`: right MAC, minted in this bucket or the previous one.
    pub fn verify(&self, cookie: &Cookie, addr: SocketAddr, now_s: u64) -> Result<(), CookieError> {
        let want = self.mac(cookie.bucket, addr);
        // Constant time: the comparison must not tell an attacker how many bytes matched.
        let diff = want
            .iter()
            .zip(cookie.mac.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return Err(CookieError::Forged);
        }
        let now = bucket_of(now_s);
        if cookie.bucket > now || now - cookie.bucket > 1 {
            return Err(CookieError::Expired);
        }
        Ok(())
    }

    /// The session id a verified cookie opens on `shard`: the same cookie always names the
    /// same session, so a retransmitted hello cannot open a second one.
    pub fn session_of(&self, cookie: &Cookie, shard: u16) -> SessionId {
        let mut msg = [0u8; 8 + COOKIE_BODY_BYTES];
        msg[..8].copy_from_slice(b"session\0");
        msg[8..].copy_from_slice(&cookie.body());
        let tag = hmac::sign(&self.key, &msg);
        let mut low = [0u8; 8];
        low[2..].copy_from_slice(&tag.as_ref()[..6]);
        SessionId(u64::from(shard) << 48 | u64::from_be_bytes(low))
    }
}

fn bucket_of(now_s: u64) -> u32 {
    u32::try_from(now_s / UDP_COOKIE_BUCKET_S).unwrap_or(u32::MAX)
}

/// A client datagram, parsed into one of the shapes of this transport.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientDatagram<'a> {
    /// `[op 1001 cookie]? [op 7 auth]`: a handshake.
    Hello {
        cookie: Option<Cookie>,
        auth: Packet<'a>,
    },
    /// `[op 1002 session] [op 1001 cookie]? [request]*`: a datagram of a session; requests are
    /// op 2 heartbeats and op 1000 ACKs (the caller ignores other ops, as on TCP).
    Session {
        session: SessionId,
        cookie: Option<Cookie>,
        requests: Vec<Packet<'a>>,
    },
}

/// Parses a client datagram.
pub fn decode_client(
    datagram: &[u8],
    payload_max: usize,
) -> Result<ClientDatagram<'_>, DatagramError> {
    let ps = packets(datagram, payload_max)?;
    let mut it = ps.into_iter().peekable();
    let Some(first) = it.next() else {
        return Err(DatagramError::Empty);
    };
    match first.op {
        op::AUTH if it.peek().is_none() => Ok(ClientDatagram::Hello {
            cookie: None,
            auth: first,
        }),
        udp_op::COOKIE => {
            let cookie = Cookie::parse(first.body)?;
            match (it.next(), it.next()) {
                (Some(auth), None) if auth.op == op::AUTH => Ok(ClientDatagram::Hello {
                    cookie: Some(cookie),
                    auth,
                }),
                _ => Err(DatagramError::Unexpected),
            }
        }
        udp_op::SESSION => {
            let session = SessionId(u64::from_be_bytes(
                <[u8; SESSION_BODY_BYTES]>::try_from(first.body)
                    .map_err(|_| DatagramError::BadBody)?,
            ));
            let cookie = match it.peek() {
                Some(p) if p.op == udp_op::COOKIE => {
                    let c = Cookie::parse(p.body)?;
                    it.next();
                    Some(c)
                }
                _ => None,
            };
            let requests: Vec<Packet<'_>> = it.collect();
            if requests
                .iter()
                .any(|p| matches!(p.op, op::AUTH | udp_op::COOKIE | udp_op::SESSION))
            {
                return Err(DatagramError::Unexpected);
            }
            Ok(ClientDatagram::Session {
                session,
                cookie,
                requests,
            })
        }
        _ => Err(DatagramError::Unexpected),
    }
}

/// What the server does with a client datagram, decided by [`admit`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admit<'a> {
    /// Send these bytes back to the source (a cookie); never larger than the datagram.
    Reply(Vec<u8>),
    /// The address is validated: verify the token in `auth`; on success make (or, if it exists,
    /// keep) `session` and send [`hello_ok`]; on failure send [`hello_refused`].
    Auth {
        session: SessionId,
        auth: Packet<'a>,
    },
    /// The client ends `session` (a bye from the session's address, or from a new address
    /// with a cookie minted for it): free it now and send [`bye_reply`].
    Bye { session: SessionId },
    /// A datagram of a live session from its own address.
    Requests {
        session: SessionId,
        requests: Vec<Packet<'a>>,
    },
    /// The session's client proved a new address (NAT rebinding): move the session there, then
    /// serve `requests`.
    Migrate {
        session: SessionId,
        requests: Vec<Packet<'a>>,
    },
    /// Drop the datagram and count the reason.
    Drop(Dropped),
}

/// Why [`admit`] dropped a datagram (metrics labels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// Not a datagram of this transport.
    Malformed(DatagramError),
    /// A cookie that does not verify for this address.
    Forged,
    /// The session id is not in the table.
    UnknownSession,
    /// The answer would be larger than the datagram (the client must pad its hello).
    ReplyTooLarge,
}

impl Dropped {
    pub fn label(self) -> &'static str {
        match self {
            Dropped::Malformed(e) => e.label(),
            Dropped::Forged => "forged_cookie",
            Dropped::UnknownSession => "unknown_session",
            Dropped::ReplyTooLarge => "reply_too_large",
        }
    }
}

/// Decides what to do with a client datagram. `session_addr` looks a session up in the
/// shard's table (its current address); `shard` is this shard's index.
pub fn admit<'a>(
    key: &CookieKey,
    datagram: &'a [u8],
    from: SocketAddr,
    session_addr: impl Fn(SessionId) -> Option<SocketAddr>,
    shard: u16,
    now_s: u64,
    payload_max: usize,
) -> Admit<'a> {
    let d = match decode_client(datagram, payload_max) {
        Ok(d) => d,
        Err(e) => return Admit::Drop(Dropped::Malformed(e)),
    };
    let challenge = || {
        let reply = cookie_datagram(&key.mint(from, now_s));
        if reply.len() <= datagram.len() {
            Admit::Reply(reply)
        } else {
            Admit::Drop(Dropped::ReplyTooLarge)
        }
    };
    match d {
        ClientDatagram::Hello { cookie: None, .. } => challenge(),
        ClientDatagram::Hello {
            cookie: Some(c),
            auth,
        } => match key.verify(&c, from, now_s) {
            Ok(()) => Admit::Auth {
                session: key.session_of(&c, shard),
                auth,
            },
            // An old cookie from the right address: a fresh one lets the client go on.
            Err(CookieError::Expired) => challenge(),
            Err(CookieError::Forged) => Admit::Drop(Dropped::Forged),
        },
        ClientDatagram::Session {
            session,
            cookie,
            requests,
        } => match session_addr(session) {
            None => Admit::Drop(Dropped::UnknownSession),
            // The session id (48 bits of MAC, only ever sent to the address that proved it
            // receives there) from the session's address, as for any request: a spoofer that
            // does not know the id cannot end someone else's session.
            Some(addr) if addr == from && is_bye(&requests) => Admit::Bye { session },
            Some(addr) if addr == from => Admit::Requests { session, requests },
            Some(_) => match cookie.map(|c| key.verify(&c, from, now_s)) {
                Some(Ok(())) if is_bye(&requests) => Admit::Bye { session },
                Some(Ok(())) => Admit::Migrate { session, requests },
                None | Some(Err(CookieError::Expired)) => challenge(),
                Some(Err(CookieError::Forged)) => Admit::Drop(Dropped::Forged),
            },
        },
    }
}

fn is_bye(requests: &[Packet<'_>]) -> bool {
    requests.iter().any(|p| p.op == udp_op::BYE)
}

/// `[op 1001 cookie]`: the server's challenge.
pub fn cookie_datagram(cookie: &Cookie) -> Vec<u8> {
    packet::encode_vec(ver::HEARTBEAT, udp_op::COOKIE, 1, &cookie.body())
}

/// `[op 1001 cookie][op 7 auth]`: the client's hello with the echoed cookie.
pub fn hello_datagram(cookie: Option<&Cookie>, auth_body: &[u8]) -> Vec<u8> {
    let mut out = match cookie {
        Some(c) => cookie_datagram(c),
        None => Vec::new(),
    };
    packet::encode(ver::HEARTBEAT, op::AUTH, 1, auth_body, &mut out);
    out
}

/// `[op 8 {"code":0}][op 1002 session]`.
pub fn hello_ok(session: SessionId) -> Vec<u8> {
    let mut out = crate::auth::auth_reply(0);
    packet::encode(
        ver::HEARTBEAT,
        udp_op::SESSION,
        1,
        &session.0.to_be_bytes(),
        &mut out,
    );
    out
}

/// `[op 8 {"code":-101}]`: the token was refused.
pub fn hello_refused() -> Vec<u8> {
    crate::auth::auth_reply(-101)
}

/// `[op 1002 session][op 1001 cookie]?` followed by `requests` (already encoded packets).
pub fn session_datagram(session: SessionId, cookie: Option<&Cookie>, requests: &[u8]) -> Vec<u8> {
    let mut out = packet::encode_vec(ver::HEARTBEAT, udp_op::SESSION, 1, &session.0.to_be_bytes());
    if let Some(c) = cookie {
        packet::encode(ver::HEARTBEAT, udp_op::COOKIE, 1, &c.body(), &mut out);
    }
    out.extend_from_slice(requests);
    out
}

/// `[op 1002 session][op 1004 bye]`: the client ends its session.
pub fn bye_datagram(session: SessionId) -> Vec<u8> {
    session_datagram(
        session,
        None,
        &packet::encode_vec(ver::HEARTBEAT, udp_op::BYE, 1, &[]),
    )
}

/// `[op 1004 bye]`: the server's answer to a bye (16 bytes, less than the 40 received).
pub fn bye_reply() -> Vec<u8> {
    packet::encode_vec(ver::HEARTBEAT, udp_op::BYE, 1, &[])
}

/// One part of a batch as a client reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part<'a> {
    /// The room seq of the batch (the outer packet's seq).
    pub seq: u32,
    pub part: u16,
    pub parts: u16,
    pub flags: u16,
    /// The outer packet (`op 5`, `ver 0/2/3`) with this part's inner packets; for plain, the
    /// inner packets themselves. Empty if `flags` has [`part_flag::TOO_LARGE`].
    pub container: &'a [u8],
}

/// A server datagram as a client reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerDatagram<'a> {
    Cookie(Cookie),
    /// op 8 with its JSON body, and the session if the auth succeeded.
    AuthReply {
        body: &'a [u8],
        session: Option<SessionId>,
    },
    /// op 3: the room's online count.
    HeartbeatReply(u32),
    Data(Part<'a>),
    /// op 1004: the session the client ended is gone.
    Bye,
}

/// Parses a server datagram (clients, `barrage tail`, loadtest).
pub fn decode_server(
    datagram: &[u8],
    payload_max: usize,
) -> Result<ServerDatagram<'_>, DatagramError> {
    if datagram.len() > payload_max {
        return Err(DatagramError::Oversized);
    }
    // A data datagram may hold more packets than a client one (plain encoding), so only its
    // first packet is split off here; the container is checked by its own decoder.
    let (first, used) = match packet::decode(datagram, u32::MAX) {
        Ok(x) => x,
        Err(packet::DecodeError::Incomplete) if datagram.is_empty() => {
            return Err(DatagramError::Empty)
        }
        Err(packet::DecodeError::Incomplete) => return Err(DatagramError::Truncated),
        Err(packet::DecodeError::Invalid(packet::Invalid::HeaderLen)) => {
            return Err(DatagramError::HeaderLen)
        }
        Err(packet::DecodeError::Invalid(_)) => return Err(DatagramError::TooShort),
    };
    let rest = &datagram[used..];
    match first.op {
        udp_op::COOKIE if rest.is_empty() => Ok(ServerDatagram::Cookie(Cookie::parse(first.body)?)),
        udp_op::BYE if rest.is_empty() && first.body.is_empty() => Ok(ServerDatagram::Bye),
        op::AUTH_REPLY => {
            let session = if rest.is_empty() {
                None
            } else {
                let ps = packets(rest, payload_max)?;
                match ps.as_slice() {
                    [s] if s.op == udp_op::SESSION => Some(SessionId(u64::from_be_bytes(
                        <[u8; SESSION_BODY_BYTES]>::try_from(s.body)
                            .map_err(|_| DatagramError::BadBody)?,
                    ))),
                    _ => return Err(DatagramError::Unexpected),
                }
            };
            Ok(ServerDatagram::AuthReply {
                body: first.body,
                session,
            })
        }
        op::HEARTBEAT_REPLY if rest.is_empty() => {
            Ok(ServerDatagram::HeartbeatReply(u32::from_be_bytes(
                <[u8; 4]>::try_from(first.body).map_err(|_| DatagramError::BadBody)?,
            )))
        }
        udp_op::PART => {
            let b: [u8; PART_BODY_BYTES] =
                first.body.try_into().map_err(|_| DatagramError::BadBody)?;
            let part = Part {
                seq: first.seq,
                part: u16::from_be_bytes([b[0], b[1]]),
                parts: u16::from_be_bytes([b[2], b[3]]),
                flags: u16::from_be_bytes([b[4], b[5]]),
                container: rest,
            };
            let too_large = part.flags & part_flag::TOO_LARGE != 0;
            if part.part >= part.parts || too_large != rest.is_empty() {
                return Err(DatagramError::Unexpected);
            }
            // The container must be whole packets, the first an op 5.
            if !too_large {
                let mut at = 0;
                while at < rest.len() {
                    let (p, n) = packet::decode(&rest[at..], u32::MAX).map_err(|e| match e {
                        packet::DecodeError::Incomplete => DatagramError::Truncated,
                        packet::DecodeError::Invalid(packet::Invalid::HeaderLen) => {
                            DatagramError::HeaderLen
                        }
                        packet::DecodeError::Invalid(_) => DatagramError::TooShort,
                    })?;
                    if p.op != op::NOTIFICATION {
                        return Err(DatagramError::Unexpected);
                    }
                    at += n;
                }
            }
            Ok(ServerDatagram::Data(part))
        }
        _ => Err(DatagramError::Unexpected),
    }
}

/// `[op 1003 part]` for part `part` of `parts` of the batch with room seq `seq`; the container
/// follows it in the datagram.
pub fn part_packet(seq: u32, part: u16, parts: u16, flags: u16) -> Vec<u8> {
    let mut body = [0u8; PART_BODY_BYTES];
    body[..2].copy_from_slice(&part.to_be_bytes());
    body[2..4].copy_from_slice(&parts.to_be_bytes());
    body[4..].copy_from_slice(&flags.to_be_bytes());
    packet::encode_vec(ver::HEARTBEAT, udp_op::PART, seq, &body)
}

/// The session a datagram names in its first packet, read from its first 24 bytes without
/// parsing the rest: the receiving shard forwards a datagram of another shard's session
/// before deciding anything else about it.
pub fn session_of_datagram(datagram: &[u8]) -> Option<SessionId> {
    let h = packet::parse_header(datagram).ok()?;
    if h.op != udp_op::SESSION || h.packet_len as usize != HEADER_LEN + SESSION_BODY_BYTES {
        return None;
    }
    let b = datagram.get(HEADER_LEN..HEADER_LEN + SESSION_BODY_BYTES)?;
    Some(SessionId(u64::from_be_bytes(b.try_into().ok()?)))
}

/// How full the first guess of a compressed part aims to be: a run compresses a little worse
/// alone than inside the whole batch, so aiming at the budget itself would mostly miss once.
const SPLIT_FILL: f64 = 0.9;

/// Why a batch could not be split.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    /// The inner bytes are not a run of complete op 5 packets (our own encoding: a bug upstream).
    #[error("batch is not a run of complete op 5 packets")]
    BadInner,
    /// `payload_max` leaves no room for a container.
    #[error("udp_payload_bytes_max too small for a part")]
    PayloadTooSmall,
    /// The batch needs more than `UDP_PARTS_MAX` datagrams.
    #[error("batch needs more than UDP_PARTS_MAX datagrams")]
    TooManyParts,
}

/// Splits a batch (`inner`: its run of inner packets, as the broker aggregates them) into
/// datagrams of at most `payload_max` bytes: each is `[op 1003 part][container]`, the container
/// holding whole inner packets in `encoding` with the room `seq`, so each datagram is decodable
/// alone. An inner packet that does not fit even alone becomes a part flagged
/// [`part_flag::TOO_LARGE`] with no container: it is not sent over UDP, and the client sees
/// which part it lacks. Compressed encodings are packed greedily: each part starts from the
/// ratio the previous attempt showed and shrinks until it fits, about two compressions a part.
pub fn split_batch(
    inner: &[u8],
    encoding: Encoding,
    seq: u32,
    payload_max: usize,
    brotli: BrotliParams,
) -> Result<Vec<Vec<u8>>, SplitError> {
    let budget = payload_max
        .checked_sub(PART_PACKET_BYTES + HEADER_LEN)
        .filter(|b| *b > 0)
        .ok_or(SplitError::PayloadTooSmall)?;
    // Packet boundaries.
    let mut bounds = vec![0usize];
    let mut at = 0;
    while at < inner.len() {
        let (p, n) = packet::decode(&inner[at..], u32::MAX).map_err(|_| SplitError::BadInner)?;
        // Clients take only notifications from a part (`decode_server`); anything else here
        // is a bug upstream, refused rather than sent.
        if p.op != op::NOTIFICATION {
            return Err(SplitError::BadInner);
        }
        at += n;
        bounds.push(at);
    }
    let container_max = payload_max - PART_PACKET_BYTES;
    // (container bytes, or None for a too-large packet)
    let mut parts: Vec<Option<Vec<u8>>> = Vec::new();
    let mut start = 0; // index into bounds
    let last = bounds.len() - 1;
    // Compressed bytes per uncompressed byte, learned as we go. The whole batch is tried first:
    // most batches fit one datagram, and if not, its ratio is the first guess.
    let mut ratio = 1.0f64;
    if encoding != Encoding::Plain && last > 0 {
        let whole = container::encode_outer(encoding, inner, seq, brotli);
        if whole.len() <= container_max {
            parts.push(Some(whole));
            start = last;
        } else {
            ratio = (whole.len() - HEADER_LEN) as f64 / inner.len() as f64;
        }
    }
    while start < last {
        if parts.len() >= UDP_PARTS_MAX {
            return Err(SplitError::TooManyParts);
        }
        // First guess: as many packets as the ratio says fit (at least one).
        let target = if encoding == Encoding::Plain {
            container_max as f64
        } else {
            (budget as f64 * SPLIT_FILL / ratio.max(0.05)).max(1.0)
        };
        let mut end = start + 1;
        while end < last && (bounds[end + 1] - bounds[start]) as f64 <= target {
            end += 1;
        }
        loop {
            let run = &inner[bounds[start]..bounds[end]];
            let c = container::encode_outer(encoding, run, seq, brotli);
            if c.len() <= container_max {
                if encoding != Encoding::Plain {
                    ratio = (c.len() - HEADER_LEN) as f64 / run.len() as f64;
                }
                parts.push(Some(c));
                break;
            }
            if end == start + 1 {
                parts.push(None);
                break;
            }
            // Shrink in proportion to the excess, by at least one packet.
            let over = c.len() as f64 / container_max as f64;
            let keep = ((end - start) as f64 / over).floor() as usize;
            end = start + keep.clamp(1, end - start - 1);
        }
        start = end;
    }
    let count = u16::try_from(parts.len()).map_err(|_| SplitError::TooManyParts)?;
    Ok(parts
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let flags = if c.is_none() { part_flag::TOO_LARGE } else { 0 };
            let mut out = part_packet(seq, i as u16, count, flags);
            if let Some(c) = c {
                out.extend_from_slice(&c);
            }
            out
        })
        .collect())
}

#[cfg(test)]
mod tests;
