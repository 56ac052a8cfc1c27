//! The op 7 auth body, the op 8 auth reply and the op 3 heartbeat reply.
//!
//! CONTRACT: used by edge and loadtest; keep the signatures.

use serde::{Deserialize, Serialize};

/// The op 7 auth body as real clients send it:
/// `{"uid":N,"roomid":N,"protover":3,"platform":"web","type":2,"key":"<token>","buvid":"<device>"}`.
/// Unknown fields are ignored (clients add their own). Our extensions are optional fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct AuthBody {
    #[serde(default)]
    pub uid: u64,
    pub roomid: u64,
    #[serde(default)]
    pub protover: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<u32>,
    #[serde(default)]
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buvid: Option<String>,
    /// Extension: the client ACKs high-reach messages (`msg_id` in the op 5 body).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ack: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("auth body is not valid JSON of the expected shape")]
    Malformed,
    #[error("auth body larger than auth_bytes_max")]
    TooLarge,
}

/// Auth reply codes.
pub const AUTH_OK: i32 = 0;
pub const AUTH_BAD_TOKEN: i32 = -101;

/// Parses an op 7 body (accepts numbers given as strings too, as some clients send `"roomid":"123"`).
pub fn parse_auth(body: &[u8], auth_bytes_max: u32) -> Result<AuthBody, AuthError> {
    todo!()
}

/// The complete op 8 packet: `ver 1`, seq 1, body `{"code":N}`.
pub fn auth_reply(code: i32) -> Vec<u8> {
    todo!()
}

/// The complete op 3 heartbeat reply: exactly 20 bytes, `ver 1`, seq 1, body = big-endian online count.
pub fn heartbeat_reply(online: u32) -> [u8; 20] {
    todo!()
}

/// The complete op 2 heartbeat a client sends (`ver 1`, seq 1, body `[object Object]` as the web client does).
pub fn heartbeat_request() -> Vec<u8> {
    todo!()
}

/// The complete op 7 packet a client sends (`ver 1`, seq 1).
pub fn auth_request(body: &AuthBody) -> Vec<u8> {
    todo!()
}
