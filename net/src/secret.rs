//! Where weak secrets are refused: a role that strangers can reach refuses a secret shorter
//! than [`proto::token::SECRET_BYTES_MIN`] or a known placeholder at start; a role bound only
//! to loopback (a developer's machine, the tests) starts with a warning per weak secret.
//! Metrics and admin endpoints bound to a non-loopback address get a warning too.

use std::net::SocketAddr;

/// True when any of `addrs` is reachable from outside the host (not loopback). An address
/// that does not parse counts as public: better a refusal than a silent exposure.
pub fn any_public<'a>(addrs: impl IntoIterator<Item = &'a str>) -> bool {
    addrs.into_iter().any(|a| match a.parse::<SocketAddr>() {
        Ok(a) => !a.ip().to_canonical().is_loopback(),
        Err(_) => true,
    })
}

/// Judges the result of a strength check of the secret called `what`: an error when the role
/// is `public`, a warning (and Ok) when it is not.
pub fn require_strong(public: bool, what: &str, check: Result<(), String>) -> Result<(), String> {
    match check {
        Ok(()) => Ok(()),
        Err(e) if public => Err(format!(
            "{what}: {e} (refused because this role listens on a non-loopback address)"
        )),
        Err(e) => {
            tracing::warn!("{what}: {e}; accepted only because every listener is on loopback");
            Ok(())
        }
    }
}

/// Equal-length secrets compare in time independent of where they differ (a length mismatch
/// returns at once: lengths are not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The strength check of one plain secret, as [`require_strong`] takes it.
pub fn check(secret: &str) -> Result<(), String> {
    proto::token::check_secret(secret.as_bytes()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_roles_refuse_and_loopback_roles_warn() {
        assert!(!any_public(["127.0.0.1:80", "[::1]:9"]));
        assert!(any_public(["127.0.0.1:80", "0.0.0.0:9"]));
        assert!(any_public(["not an address"]));
        assert!(require_strong(true, "k", check("short")).is_err());
        assert!(require_strong(false, "k", check("short")).is_ok());
        assert!(require_strong(true, "k", check(&"a1".repeat(16))).is_ok());
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}
