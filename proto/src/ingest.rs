//! Ingest frames: business caller <-> broker over persistent TCP, pipelined.
//!
//! ```text
//! u32 frame_len (bytes after this field) | u8 version (= 1) | u8 kind | payload
//! ```
//! The caller sends `Auth` first, then any number of `Push` requests without waiting; the
//! broker answers each request with a `Status` carrying the same `req_id` (answers may come
//! out of order across rooms; match them by `req_id`).
//!
//! Framing, strings and scopes are encoded exactly as in [`crate::link`]; the payload of each
//! [`kind`] is documented byte by byte in `docs/protocol-link-ingest.md`.
//!
//! # Invariants
//! - `frame_len` is checked against the caller's limit as soon as its 4 bytes are in.
//! - [`decode`] returns `Incomplete` until the whole frame is in, then `Version`, `Kind` or
//!   `Malformed`; a frame must be used up exactly (trailing bytes are `Malformed`).
//!
//! CONTRACT: broker and loadtest use these; keep them.

use crate::id::{AreaId, MsgId, Priority, Reach, RoomId, Scope};
use crate::link::wire;

pub const INGEST_VERSION: u8 = 1;

/// Longest idempotency key (ingest `KeyedPush`, HTTP `Idempotency-Key`), bytes.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Push {
    pub req_id: u64,
    pub scope: Scope,
    pub priority: Priority,
    pub reach: Reach,
    /// How long the message stays deliverable (high-reach resends stop after it); 0 = default.
    pub ttl_ms: u32,
    /// The op 5 body, a JSON object, delivered verbatim.
    pub body: Vec<u8>,
}

/// Why a push was refused. Each variant says whose fault it was and whether to retry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// No valid API key on this connection (caller's fault; fix the key).
    #[error("unauthorized")]
    Unauthorized,
    /// The key may not push to this scope (caller's fault).
    #[error("forbidden scope")]
    ForbiddenScope,
    /// Body larger than `message_bytes_max` (caller's fault).
    #[error("message too large")]
    TooLarge,
    /// Over the key's or the room's rate (retry after the given delay).
    #[error("rate limited, retry after {retry_after_ms} ms")]
    RateLimited { retry_after_ms: u32 },
    /// Not a JSON object, bad scope, bad field (caller's fault).
    #[error("invalid: {0}")]
    Invalid(String),
    /// The broker's queue is full (broker's state; retry with backoff).
    #[error("overloaded")]
    Overloaded,
}

impl PushError {
    pub fn label(&self) -> &'static str {
        match self {
            PushError::Unauthorized => "unauthorized",
            PushError::ForbiddenScope => "forbidden_scope",
            PushError::TooLarge => "too_large",
            PushError::RateLimited { .. } => "rate_limited",
            PushError::Invalid(_) => "invalid",
            PushError::Overloaded => "overloaded",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IngestFrame {
    /// Caller -> broker, first: the API key for this connection. Answered by a `Status`
    /// with `Ok(MsgId(0))` or `Err(Unauthorized)`.
    Auth { req_id: u64, api_key: String },
    /// Caller -> broker.
    Push(Push),
    /// Caller -> broker: a push that may be retried. A second push with the same key (per API
    /// key, within the broker's dedup window) is answered with the first one's msg id and not
    /// delivered again. Key: 1..=[`IDEMPOTENCY_KEY_BYTES_MAX`] bytes of UTF-8.
    KeyedPush { idempotency_key: String, push: Push },
    /// Broker -> caller.
    Status {
        req_id: u64,
        result: Result<MsgId, PushError>,
    },
    /// Caller -> broker (a key with the `presence` scope): stream presence events on this
    /// connection, those of the listed rooms or areas (both empty: all), after seq `after`
    /// (`None`: from the newest on). Answered by a `Status` whose msg id is the seq the
    /// stream starts after; then `PresenceEvent` frames. A second one replaces the first.
    Subscribe {
        req_id: u64,
        after: Option<u64>,
        rooms: Vec<RoomId>,
        areas: Vec<AreaId>,
    },
    /// Broker -> caller: one presence event, the JSON object of the SSE stream's `data:`.
    PresenceEvent { json: Vec<u8> },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    #[error("incomplete ingest frame")]
    Incomplete,
    #[error("ingest frame longer than the limit")]
    TooLong,
    #[error("unsupported ingest version")]
    Version,
    #[error("unknown ingest frame kind")]
    Kind,
    #[error("malformed ingest frame")]
    Malformed,
}

/// Frame kinds (the byte after the version).
pub mod kind {
    pub const AUTH: u8 = 1;
    pub const PUSH: u8 = 2;
    pub const STATUS: u8 = 3;
    /// A PUSH payload preceded by the idempotency key (u16 length + UTF-8).
    pub const KEYED_PUSH: u8 = 4;
    /// u64 req_id | u8 from (0 newest, 1 after) | u64 after | u32 n, n x u64 room |
    /// u32 n, n x u32 area.
    pub const SUBSCRIBE: u8 = 5;
    /// u32 n | n bytes of JSON.
    pub const PRESENCE_EVENT: u8 = 6;
}

/// Result codes in a `Status` frame: `OK` is followed by the msg id, the others are
/// [`PushError`] variants.
pub mod code {
    pub const OK: u8 = 0;
    pub const UNAUTHORIZED: u8 = 1;
    pub const FORBIDDEN_SCOPE: u8 = 2;
    pub const TOO_LARGE: u8 = 3;
    /// Followed by u32 `retry_after_ms`.
    pub const RATE_LIMITED: u8 = 4;
    /// Followed by a string (u16 length + UTF-8).
    pub const INVALID: u8 = 5;
    pub const OVERLOADED: u8 = 6;
}

/// Bytes before the payload: u32 frame_len, u8 version, u8 kind.
pub const FRAME_HEADER_LEN: usize = 6;

/// Appends the encoded frame to `out`.
pub fn encode(frame: &IngestFrame, out: &mut Vec<u8>) {
    match frame {
        IngestFrame::Auth { req_id, api_key } => {
            let start = wire::begin(out, INGEST_VERSION, kind::AUTH);
            out.extend_from_slice(&req_id.to_be_bytes());
            wire::put_str(out, api_key);
            wire::end(out, start);
        }
        IngestFrame::Push(push) => {
            let start = wire::begin(out, INGEST_VERSION, kind::PUSH);
            put_push(out, push);
            wire::end(out, start);
        }
        IngestFrame::KeyedPush {
            idempotency_key,
            push,
        } => {
            let start = wire::begin(out, INGEST_VERSION, kind::KEYED_PUSH);
            wire::put_str(out, idempotency_key);
            put_push(out, push);
            wire::end(out, start);
        }
        IngestFrame::Status { req_id, result } => {
            let start = wire::begin(out, INGEST_VERSION, kind::STATUS);
            out.extend_from_slice(&req_id.to_be_bytes());
            match result {
                Ok(msg_id) => {
                    out.push(code::OK);
                    out.extend_from_slice(&msg_id.0.to_be_bytes());
                }
                Err(PushError::Unauthorized) => out.push(code::UNAUTHORIZED),
                Err(PushError::ForbiddenScope) => out.push(code::FORBIDDEN_SCOPE),
                Err(PushError::TooLarge) => out.push(code::TOO_LARGE),
                Err(PushError::RateLimited { retry_after_ms }) => {
                    out.push(code::RATE_LIMITED);
                    out.extend_from_slice(&retry_after_ms.to_be_bytes());
                }
                Err(PushError::Invalid(why)) => {
                    out.push(code::INVALID);
                    wire::put_str(out, why);
                }
                Err(PushError::Overloaded) => out.push(code::OVERLOADED),
            }
            wire::end(out, start);
        }
        IngestFrame::Subscribe {
            req_id,
            after,
            rooms,
            areas,
        } => {
            let start = wire::begin(out, INGEST_VERSION, kind::SUBSCRIBE);
            out.extend_from_slice(&req_id.to_be_bytes());
            out.push(u8::from(after.is_some()));
            out.extend_from_slice(&after.unwrap_or(0).to_be_bytes());
            let n = wire::put_count(out, rooms.len());
            for r in rooms.iter().take(n) {
                out.extend_from_slice(&r.0.to_be_bytes());
            }
            let n = wire::put_count(out, areas.len());
            for a in areas.iter().take(n) {
                out.extend_from_slice(&a.0.to_be_bytes());
            }
            wire::end(out, start);
        }
        IngestFrame::PresenceEvent { json } => {
            let start = wire::begin(out, INGEST_VERSION, kind::PRESENCE_EVENT);
            let n = wire::put_count(out, json.len());
            out.extend_from_slice(&json[..n.min(json.len())]);
            wire::end(out, start);
        }
    }
}

/// The PUSH payload (also the tail of KEYED_PUSH).
fn put_push(out: &mut Vec<u8>, push: &Push) {
    out.extend_from_slice(&push.req_id.to_be_bytes());
    wire::put_scope(out, &push.scope);
    out.push(push.priority as u8);
    out.push(push.reach as u8);
    out.extend_from_slice(&push.ttl_ms.to_be_bytes());
    // A body over 4 GiB cannot be framed; its length saturates and the receiver
    // refuses the frame as too long rather than misreading it.
    let n = u32::try_from(push.body.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(&push.body);
}

fn read_push(r: &mut wire::Reader<'_>) -> Result<Push, IngestError> {
    let req_id = r.u64()?;
    let scope = r.scope()?;
    let priority = Priority::from_u8(r.u8()?).ok_or(wire::Malformed)?;
    let reach = Reach::from_u8(r.u8()?).ok_or(wire::Malformed)?;
    let ttl_ms = r.u32()?;
    let n = usize::try_from(r.u32()?).map_err(|_| IngestError::Malformed)?;
    // `bytes` checks `n` against what is left before the copy allocates.
    let body = r.bytes(n)?.to_vec();
    Ok(Push {
        req_id,
        scope,
        priority,
        reach,
        ttl_ms,
        body,
    })
}

/// Decodes the first frame in `buf`: the frame and bytes used.
pub fn decode(buf: &[u8], frame_bytes_max: u32) -> Result<(IngestFrame, usize), IngestError> {
    let total = frame_len(buf, frame_bytes_max)?;
    let frame = buf.get(..total).ok_or(IngestError::Incomplete)?;
    // `frame_len` guarantees at least version and kind after the length field.
    let (version, kind_byte) = (frame[4], frame[5]);
    if version != INGEST_VERSION {
        return Err(IngestError::Version);
    }
    let mut r = wire::Reader::new(&frame[FRAME_HEADER_LEN..]);
    let decoded = match kind_byte {
        kind::AUTH => IngestFrame::Auth {
            req_id: r.u64()?,
            api_key: r.string()?,
        },
        kind::PUSH => IngestFrame::Push(read_push(&mut r)?),
        kind::KEYED_PUSH => {
            let idempotency_key = r.string()?;
            if idempotency_key.is_empty() || idempotency_key.len() > IDEMPOTENCY_KEY_BYTES_MAX {
                return Err(IngestError::Malformed);
            }
            IngestFrame::KeyedPush {
                idempotency_key,
                push: read_push(&mut r)?,
            }
        }
        kind::STATUS => {
            let req_id = r.u64()?;
            let result = match r.u8()? {
                code::OK => Ok(MsgId(r.u64()?)),
                code::UNAUTHORIZED => Err(PushError::Unauthorized),
                code::FORBIDDEN_SCOPE => Err(PushError::ForbiddenScope),
                code::TOO_LARGE => Err(PushError::TooLarge),
                code::RATE_LIMITED => Err(PushError::RateLimited {
                    retry_after_ms: r.u32()?,
                }),
                code::INVALID => Err(PushError::Invalid(r.string()?)),
                code::OVERLOADED => Err(PushError::Overloaded),
                _ => return Err(IngestError::Malformed),
            };
            IngestFrame::Status { req_id, result }
        }
        kind::SUBSCRIBE => {
            let req_id = r.u64()?;
            let from = r.u8()?;
            let after = r.u64()?;
            let after = match from {
                0 if after == 0 => None,
                1 => Some(after),
                _ => return Err(IngestError::Malformed),
            };
            let n = r.count(8)?;
            let mut rooms = Vec::with_capacity(n);
            for _ in 0..n {
                rooms.push(RoomId(r.u64()?));
            }
            let n = r.count(4)?;
            let mut areas = Vec::with_capacity(n);
            for _ in 0..n {
                areas.push(AreaId(r.u32()?));
            }
            IngestFrame::Subscribe {
                req_id,
                after,
                rooms,
                areas,
            }
        }
        kind::PRESENCE_EVENT => {
            let n = r.count(1)?;
            IngestFrame::PresenceEvent {
                json: r.bytes(n)?.to_vec(),
            }
        }
        _ => return Err(IngestError::Kind),
    };
    r.finish()?;
    Ok((decoded, total))
}

/// How long the frame at the front of `buf` is in total, once its 4-byte length is in
/// (`Incomplete` before), checking the limit against `frame_len` (the bytes after the length
/// field). Lets a reader size its buffer before the frame is in.
pub fn frame_len(buf: &[u8], frame_bytes_max: u32) -> Result<usize, IngestError> {
    wire::frame_len(buf, frame_bytes_max).map_err(IngestError::from)
}

impl From<wire::Malformed> for IngestError {
    fn from(_: wire::Malformed) -> Self {
        IngestError::Malformed
    }
}

impl From<wire::FrameError> for IngestError {
    fn from(e: wire::FrameError) -> Self {
        match e {
            wire::FrameError::Incomplete => IngestError::Incomplete,
            wire::FrameError::TooLong => IngestError::TooLong,
            wire::FrameError::Malformed => IngestError::Malformed,
        }
    }
}
