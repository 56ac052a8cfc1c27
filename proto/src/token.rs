//! Client tokens: HMAC-SHA256 over compact binary claims, URL-safe, under 200 bytes,
//! verified in constant time against a key set so keys can rotate.
//!
//! CONTRACT: used by control (sign), edge (verify) and tests; keep the signatures.

use crate::id::{AreaId, DeviceId, RoomId, UserId};

/// What a token says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    pub uid: UserId,
    pub device: DeviceId,
    pub room: RoomId,
    pub area: AreaId,
    /// Unix seconds after which the token is refused.
    pub expires_at_s: u64,
}

/// A verified token: only [`KeySet::verify`] makes one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedToken {
    pub claims: Claims,
    pub key_id: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token malformed")]
    Malformed,
    #[error("token signed with an unknown key id")]
    UnknownKey,
    #[error("token MAC does not verify")]
    BadMac,
    #[error("token expired")]
    Expired,
}

impl TokenError {
    pub fn label(self) -> &'static str {
        match self {
            TokenError::Malformed => "malformed",
            TokenError::UnknownKey => "unknown_key",
            TokenError::BadMac => "bad_mac",
            TokenError::Expired => "expired",
        }
    }
}

/// One signing key.
#[derive(Clone)]
pub struct Key {
    pub id: u32,
    // implementation-defined: ring::hmac::Key
}

/// A set of keys: signs with the newest (highest id), verifies with any.
#[derive(Clone, Default)]
pub struct KeySet {
    // implementation-defined
}

impl KeySet {
    /// Builds a set from `(key_id, secret)` pairs. Secrets are arbitrary bytes (≥ 16 recommended).
    pub fn new(keys: &[(u32, Vec<u8>)]) -> KeySet {
        todo!()
    }

    /// Parses a secret spec as written in configs and CLI flags: `"ID:SECRET,ID:SECRET"` or a bare
    /// `"SECRET"` (key id 1).
    pub fn parse(spec: &str) -> Result<KeySet, TokenError> {
        todo!()
    }

    pub fn is_empty(&self) -> bool {
        todo!()
    }

    /// Signs claims with the newest key.
    pub fn sign(&self, claims: &Claims) -> String {
        todo!()
    }

    /// Verifies a token at unix time `now_s`.
    pub fn verify(&self, token: &str, now_s: u64) -> Result<VerifiedToken, TokenError> {
        todo!()
    }
}
