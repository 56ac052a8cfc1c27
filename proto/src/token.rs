//! Client tokens: HMAC-SHA256 over compact binary claims, URL-safe, under 200 bytes,
//! verified in constant time against a key set so keys can rotate.
//!
//! CONTRACT: used by control (sign), edge (verify) and tests; keep the signatures.
//!
//! # Format
//! `<key_id>.<claims>.<tag>`: `key_id` in decimal ASCII (digits only), `claims` and `tag` in
//! base64url without padding. `tag` = HMAC-SHA256(secret of `key_id`, `"<key_id>.<claims>"`),
//! 32 bytes. The claims are, big-endian with explicit sizes:
//!
//! | bytes | field |
//! |---|---|
//! | 1 | format version (1) |
//! | 8 | uid (u64) |
//! | 8 | room (u64) |
//! | 4 | area (u32) |
//! | 8 | expires_at_s (u64, unix seconds) |
//! | 1 | device length `n` (≤ [`DEVICE_BYTES_MAX`]) |
//! | n | device (UTF-8) |
//!
//! A 64-byte device id gives 94 claim bytes → 126 base64 chars; with a 43-char tag and a
//! 10-digit key id the token is at most 181 bytes.
//!
//! # Invariants
//! - The MAC is checked (in constant time, `ring::hmac::verify`) before a single claim byte is
//!   parsed, so claims are only ever read from bytes the key holder wrote.
//! - `verify` never panics; any parse failure is [`TokenError::Malformed`].
//! - Secrets never reach `Debug` output or logs: `Key` and `KeySet` print only key ids.

use crate::id::{AreaId, DeviceId, RoomId, UserId};
use crate::limits::{DEVICE_BYTES_MAX, TOKEN_BYTES_MAX};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;
use ring::hmac;
use std::fmt;

/// First claims byte; a new layout gets a new value so old edges refuse it as malformed.
const CLAIMS_VERSION: u8 = 1;
/// Claims bytes before the device id.
const CLAIMS_FIXED_BYTES: usize = 1 + 8 + 8 + 4 + 8 + 1;
/// HMAC-SHA256 output.
const TAG_BYTES: usize = 32;
/// `u32::MAX` has 10 decimal digits.
const KEY_ID_DIGITS_MAX: usize = 10;

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

impl Claims {
    /// The binary claims; `None` if the device id is longer than [`DEVICE_BYTES_MAX`].
    pub fn encode(&self) -> Option<Vec<u8>> {
        let device = self.device.0.as_bytes();
        if device.len() > DEVICE_BYTES_MAX {
            return None;
        }
        let mut out = Vec::with_capacity(CLAIMS_FIXED_BYTES + device.len());
        out.push(CLAIMS_VERSION);
        out.extend_from_slice(&self.uid.0.to_be_bytes());
        out.extend_from_slice(&self.room.0.to_be_bytes());
        out.extend_from_slice(&self.area.0.to_be_bytes());
        out.extend_from_slice(&self.expires_at_s.to_be_bytes());
        // Fits in u8: DEVICE_BYTES_MAX (64) < 256, checked above.
        out.push(device.len() as u8);
        out.extend_from_slice(device);
        Some(out)
    }

    /// Parses binary claims; exact length, known version, device ≤ limit and UTF-8.
    pub fn decode(bytes: &[u8]) -> Result<Claims, TokenError> {
        let mut r = Reader(bytes);
        if r.take::<1>()? != [CLAIMS_VERSION] {
            return Err(TokenError::Malformed);
        }
        let uid = u64::from_be_bytes(r.take()?);
        let room = u64::from_be_bytes(r.take()?);
        let area = u32::from_be_bytes(r.take()?);
        let expires_at_s = u64::from_be_bytes(r.take()?);
        let [n] = r.take::<1>()?;
        let n = usize::from(n);
        if n > DEVICE_BYTES_MAX || r.0.len() != n {
            return Err(TokenError::Malformed);
        }
        let device = std::str::from_utf8(r.0).map_err(|_| TokenError::Malformed)?;
        Ok(Claims {
            uid: UserId(uid),
            device: DeviceId(device.to_owned()),
            room: RoomId(room),
            area: AreaId(area),
            expires_at_s,
        })
    }
}

/// Big-endian field reader that fails with `Malformed` instead of panicking.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], TokenError> {
        let (head, rest) = self
            .0
            .split_first_chunk::<N>()
            .ok_or(TokenError::Malformed)?;
        self.0 = rest;
        Ok(*head)
    }
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

/// Shortest secret (token key, link key, API key, edge key) a role accepts where strangers can
/// reach it: 32 bytes, the HMAC-SHA256 block half and what `barrage up` generates.
pub const SECRET_BYTES_MIN: usize = 32;

/// Secrets shipped in examples and docs, or typed by hand in a hurry. A role refuses them like
/// a short secret, wherever they appear in the value (case-insensitive).
pub const SECRET_PLACEHOLDERS: [&str; 6] = [
    "change-me",
    "changeme",
    "replace-me",
    "placeholder",
    "example",
    "password",
];

/// Why a secret is too weak to guard anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WeakSecret {
    /// Fewer than [`SECRET_BYTES_MIN`] bytes.
    #[error("secret is {0} bytes; at least 32 are needed")]
    Short(usize),
    /// Contains a known placeholder such as `change-me`.
    #[error("secret contains the placeholder {0:?}; generate a random one")]
    Placeholder(&'static str),
}

/// Checks one secret's strength: at least [`SECRET_BYTES_MIN`] bytes and no placeholder.
pub fn check_secret(secret: &[u8]) -> Result<(), WeakSecret> {
    let lower = String::from_utf8_lossy(secret).to_ascii_lowercase();
    if let Some(p) = SECRET_PLACEHOLDERS.iter().find(|p| lower.contains(*p)) {
        return Err(WeakSecret::Placeholder(p));
    }
    if secret.len() < SECRET_BYTES_MIN {
        return Err(WeakSecret::Short(secret.len()));
    }
    Ok(())
}

/// Checks every secret of a token key spec (`"ID:SECRET,..."` or a bare secret); the error
/// names the key id, never the secret.
pub fn check_key_spec(spec: &str) -> Result<(), String> {
    let spec = spec.trim();
    if !spec.contains(':') {
        return check_secret(spec.as_bytes()).map_err(|e| format!("key 1: {e}"));
    }
    for item in spec.split(',') {
        let (id, secret) = item.trim().split_once(':').unwrap_or(("?", item));
        check_secret(secret.as_bytes()).map_err(|e| format!("key {}: {e}", id.trim()))?;
    }
    Ok(())
}

/// One signing key.
#[derive(Clone)]
pub struct Key {
    pub id: u32,
    key: hmac::Key,
}

impl Key {
    pub fn new(id: u32, secret: &[u8]) -> Key {
        Key {
            id,
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// A set of keys: signs with the newest (highest id), verifies with any.
#[derive(Clone, Default)]
pub struct KeySet {
    /// Sorted by id, ids unique; the last one signs.
    keys: Vec<Key>,
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySet").field("ids", &self.ids()).finish()
    }
}

impl KeySet {
    /// Builds a set from `(key_id, secret)` pairs. Secrets are arbitrary bytes (≥ 16 recommended).
    /// If an id repeats, the last pair wins.
    pub fn new(keys: &[(u32, Vec<u8>)]) -> KeySet {
        let mut out: Vec<Key> = Vec::with_capacity(keys.len());
        for (id, secret) in keys {
            out.retain(|k| k.id != *id);
            out.push(Key::new(*id, secret));
        }
        out.sort_by_key(|k| k.id);
        KeySet { keys: out }
    }

    /// Parses a secret spec as written in configs and CLI flags: `"ID:SECRET,ID:SECRET"` or a bare
    /// `"SECRET"` (key id 1).
    ///
    /// A spec is the list form when it contains `:`; then every item must be `ID:SECRET` with a
    /// decimal id, a non-empty secret and no repeated id. Otherwise the whole spec (trimmed) is one
    /// secret, which must not be empty or contain `,`. Errors are `Malformed`.
    pub fn parse(spec: &str) -> Result<KeySet, TokenError> {
        let spec = spec.trim();
        if spec.is_empty() {
            return Err(TokenError::Malformed);
        }
        if !spec.contains(':') {
            if spec.contains(',') {
                return Err(TokenError::Malformed);
            }
            return Ok(KeySet::new(&[(1, spec.as_bytes().to_vec())]));
        }
        let mut pairs: Vec<(u32, Vec<u8>)> = Vec::new();
        for item in spec.split(',') {
            let (id, secret) = item.trim().split_once(':').ok_or(TokenError::Malformed)?;
            let id = parse_key_id(id.trim()).ok_or(TokenError::Malformed)?;
            if secret.is_empty() || pairs.iter().any(|(i, _)| *i == id) {
                return Err(TokenError::Malformed);
            }
            pairs.push((id, secret.as_bytes().to_vec()));
        }
        Ok(KeySet::new(&pairs))
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key ids, ascending (for logs and metrics; never the secrets).
    pub fn ids(&self) -> Vec<u32> {
        self.keys.iter().map(|k| k.id).collect()
    }

    /// One fingerprint per key, `(id, 16 hex digits)`, ascending by id: the first 8 bytes of
    /// the key's HMAC over a fixed label. Two sets agree on a key exactly when id and
    /// fingerprint agree, so controls of different regions can compare key sets (rotation
    /// reached every region) without sending a secret; the MAC reveals nothing about it.
    pub fn fingerprints(&self) -> Vec<(u32, String)> {
        self.keys
            .iter()
            .map(|k| {
                let tag = hmac::sign(&k.key, FINGERPRINT_LABEL);
                let hex = tag.as_ref()[..8]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                (k.id, hex)
            })
            .collect()
    }

    /// Signs claims with the newest key.
    ///
    /// Returns an empty string (which every `verify` refuses as `Malformed`) when the set is empty
    /// or the device id is longer than [`DEVICE_BYTES_MAX`]; use [`KeySet::try_sign`] to see why.
    pub fn sign(&self, claims: &Claims) -> String {
        self.try_sign(claims).unwrap_or_default()
    }

    /// Signs claims with the newest key: `UnknownKey` if the set is empty, `Malformed` if the
    /// device id is too long.
    pub fn try_sign(&self, claims: &Claims) -> Result<String, TokenError> {
        let key = self.keys.last().ok_or(TokenError::UnknownKey)?;
        let claims = claims.encode().ok_or(TokenError::Malformed)?;
        let mut token = format!("{}.{}", key.id, B64URL.encode(claims));
        let tag = hmac::sign(&key.key, token.as_bytes());
        token.push('.');
        token.push_str(&B64URL.encode(tag.as_ref()));
        debug_assert!(token.len() <= TOKEN_BYTES_MAX);
        Ok(token)
    }

    /// Verifies a token at unix time `now_s`.
    pub fn verify(&self, token: &str, now_s: u64) -> Result<VerifiedToken, TokenError> {
        if token.len() > TOKEN_BYTES_MAX {
            return Err(TokenError::Malformed);
        }
        let (signed, tag_b64) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let (id_text, claims_b64) = signed.split_once('.').ok_or(TokenError::Malformed)?;
        let key_id = parse_key_id(id_text).ok_or(TokenError::Malformed)?;
        let tag = B64URL.decode(tag_b64).map_err(|_| TokenError::Malformed)?;
        if tag.len() != TAG_BYTES {
            return Err(TokenError::Malformed);
        }
        let key = self
            .keys
            .binary_search_by_key(&key_id, |k| k.id)
            .map(|i| &self.keys[i])
            .map_err(|_| TokenError::UnknownKey)?;
        hmac::verify(&key.key, signed.as_bytes(), &tag).map_err(|_| TokenError::BadMac)?;
        // Only now are the claims bytes trusted enough to parse.
        let raw = B64URL
            .decode(claims_b64)
            .map_err(|_| TokenError::Malformed)?;
        let claims = Claims::decode(&raw)?;
        if now_s > claims.expires_at_s {
            return Err(TokenError::Expired);
        }
        Ok(VerifiedToken { claims, key_id })
    }
}

/// What [`KeySet::fingerprints`] MACs.
const FINGERPRINT_LABEL: &[u8] = b"barrage token key fingerprint v1";

/// A decimal key id: ASCII digits only (no sign, no spaces), at most 10 digits, fits in u32.
fn parse_key_id(text: &str) -> Option<u32> {
    if text.is_empty()
        || text.len() > KEY_ID_DIGITS_MAX
        || !text.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    text.parse().ok()
}

#[cfg(test)]
mod strength_tests {
    use super::*;

    #[test]
    fn short_and_placeholder_secrets_are_weak() {
        assert_eq!(check_secret(b"x"), Err(WeakSecret::Short(1)));
        assert_eq!(check_secret(&[7u8; 31]), Err(WeakSecret::Short(31)));
        assert_eq!(check_secret(&[7u8; 32]), Ok(()));
        assert_eq!(
            check_secret(b"1:change-me-old-secret-0123456789xx"),
            Err(WeakSecret::Placeholder("change-me"))
        );
        assert_eq!(
            check_secret(b"0123456789PASSWORD0123456789abcdef"),
            Err(WeakSecret::Placeholder("password"))
        );
        let good = "3f1c9a0b7d2e4f6a8c0e1b3d5f7a9c2e";
        assert_eq!(check_key_spec(good), Ok(()));
        assert_eq!(check_key_spec(&format!("1:{good},2:{good}")), Ok(()));
        let e = check_key_spec(&format!("1:{good},7:short")).unwrap_err();
        assert!(e.starts_with("key 7:"), "{e}");
        assert!(!e.contains("short"), "the secret must not be echoed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_id_digits_only() {
        assert_eq!(parse_key_id("0"), Some(0));
        assert_eq!(parse_key_id("4294967295"), Some(u32::MAX));
        for bad in [
            "",
            "+1",
            "-1",
            " 1",
            "1 ",
            "4294967296",
            "00000000001",
            "1a",
        ] {
            assert_eq!(parse_key_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn fingerprints_tell_keys_apart_by_id_and_secret() {
        let a = KeySet::parse("1:first-secret-0123456789,2:second-secret-0123456789").unwrap();
        let same = KeySet::parse("2:second-secret-0123456789,1:first-secret-0123456789").unwrap();
        let other = KeySet::parse("1:first-secret-0123456789,2:another-secret-012345678").unwrap();
        assert_eq!(a.fingerprints(), same.fingerprints());
        let (fa, fo) = (a.fingerprints(), other.fingerprints());
        assert_eq!(fa[0], fo[0]);
        assert_eq!(fa[1].0, fo[1].0);
        assert_ne!(fa[1].1, fo[1].1, "same id, another secret");
        assert_eq!(fa[0].1.len(), 16);
        assert!(!fa[0].1.contains("first"));
    }

    #[test]
    fn claims_layout_is_fixed() {
        let c = Claims {
            uid: UserId(1),
            device: DeviceId("ab".into()),
            room: RoomId(2),
            area: AreaId(3),
            expires_at_s: 4,
        };
        let b = c.encode().unwrap_or_default();
        assert_eq!(b.len(), CLAIMS_FIXED_BYTES + 2);
        assert_eq!(&b[..9], &[1, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(&b[b.len() - 3..], &[2, b'a', b'b']);
        assert_eq!(Claims::decode(&b), Ok(c));
    }
}
