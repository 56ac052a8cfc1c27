//! Weak secrets (issue 17, defect 5): refused where strangers can reach the role, warned
//! about on loopback.

use crate::common::*;

/// Regression: a 1-byte token key and the examples' `change-me` secrets were accepted.
/// Nothing binds here: the check runs before any listener is opened.
#[test]
fn weak_secrets_are_refused_off_loopback() {
    let cases = [
        ("control", "http_addr = \"0.0.0.0:0\"\ntoken_keys = \"x\"\n".to_string()),
        (
            "control",
            "http_addr = \"0.0.0.0:0\"\ntoken_keys = \"1:change-me-old-secret-0123456789,2:change-me-new-secret-0123456789\"\n".to_string(),
        ),
        (
            "broker",
            "ingest_addr = \"0.0.0.0:0\"\napi_keys = [{ key = \"short\" }]\n".to_string(),
        ),
        (
            "broker",
            format!("link_addr = \"0.0.0.0:0\"\nlink_keys = [\"edge-1:tiny\"]\napi_keys = [{{ key = \"{STRONG}\" }}]\n"),
        ),
        (
            "edge",
            "tcp_addr = \"0.0.0.0:0\"\nws_addr = \"127.0.0.1:0\"\nadmin_addr = \"127.0.0.1:0\"\ntoken_keys = \"1:x\"\n".to_string(),
        ),
    ];
    for (role, toml) in cases {
        match start(role, &toml) {
            Started::Exited(status, err) => {
                assert!(!status.success(), "{role}");
                assert!(err.contains("refused"), "{role}: {err}");
            }
            Started::Up(_) => panic!("{role} started with a weak secret:\n{toml}"),
        }
    }
}

/// On loopback (a developer's machine, the tests) a weak secret starts with a warning.
#[test]
fn weak_secrets_on_loopback_start_with_a_warning() {
    let role = start_ok(
        "control",
        "http_addr = \"127.0.0.1:0\"\ntoken_keys = \"1:short-secret\"\ndriver = \"legacy\"\n",
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut lines = Vec::new();
    while std::time::Instant::now() < deadline {
        if let Ok(l) = role
            .stderr
            .recv_timeout(std::time::Duration::from_millis(100))
        {
            lines.push(l);
            if lines
                .iter()
                .any(|l| l.contains("token_keys") && l.contains("loopback"))
            {
                return;
            }
        }
    }
    panic!("no warning about the weak key: {lines:?}");
}
