//! Ingest frames: business caller <-> broker over persistent TCP, pipelined.
//!
//! ```text
//! u32 frame_len (bytes after this field) | u8 version (= 1) | u8 kind | payload
//! ```
//! The caller sends `Auth` first, then any number of `Push` requests without waiting; the
//! broker answers each request with a `Status` carrying the same `req_id` (answers may come
//! out of order across rooms; match them by `req_id`).
//!
//! CONTRACT: broker and loadtest use these; keep them.

use crate::id::{MsgId, Priority, Reach, Scope};

pub const INGEST_VERSION: u8 = 1;

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
    /// Broker -> caller.
    Status { req_id: u64, result: Result<MsgId, PushError> },
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

pub fn encode(frame: &IngestFrame, out: &mut Vec<u8>) {
    todo!()
}

/// Decodes the first frame in `buf`: the frame and bytes used.
pub fn decode(buf: &[u8], frame_bytes_max: u32) -> Result<(IngestFrame, usize), IngestError> {
    todo!()
}
