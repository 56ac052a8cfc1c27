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

/// Regression: `/admin/drain` took no credential. With `admin_key` set it needs the bearer.
#[test]
fn admin_drain_needs_the_admin_key() {
    let edge = start_ok(
        "edge",
        &edge_toml(&format!("admin_key = \"{STRONG}\""), HEAD_MS),
    );
    let admin = edge.addrs[2];
    let drain = |auth: &str| {
        let req = format!(
            "POST /admin/drain HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n{auth}\r\n"
        );
        let (head, _) = request_from([127, 0, 0, 1], admin, &req).expect("an answer");
        status(&head)
    };
    assert_eq!(drain(""), 401);
    assert_eq!(drain("Authorization: Bearer wrong\r\n"), 401);
    assert_eq!(drain(&format!("Authorization: Bearer {STRONG}\r\n")), 200);
}

/// Regression: edges had no way to authenticate their heartbeats, so a control with an
/// `edge_key` never listed them (and one without took any process's word). Now the edge sends
/// its `edge_key`: the right key registers, a wrong one is refused and counted.
#[test]
fn edge_heartbeats_carry_the_edge_key() {
    let control = start_ok(
        "control",
        &control_toml(&format!("edge_key = \"{STRONG}\""), HEAD_MS),
    );
    let ctl = control.addrs[0];
    let good = edge_toml(
        &format!("node_id = \"good\"\nedge_key = \"{STRONG}\"\ncontrol_addr = \"{ctl}\"\ncontrol_heartbeat_ms = 100"),
        HEAD_MS,
    );
    let bad = edge_toml(
        &format!("node_id = \"bad\"\nedge_key = \"{}\"\ncontrol_addr = \"{ctl}\"\ncontrol_heartbeat_ms = 100", STRONG.replace('6', "7")),
        HEAD_MS,
    );
    let _good = start_ok("edge", &good);
    let _bad = start_ok("edge", &bad);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, body) = request_from([127, 0, 0, 1], ctl, &get("/v1/edges")).expect("edges");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let ids: Vec<&str> = v["edges"]
            .as_array()
            .map(|a| a.iter().filter_map(|e| e["node_id"].as_str()).collect())
            .unwrap_or_default();
        let refused = metric(
            &metrics(ctl),
            "barrage_control_heartbeats_total{outcome=\"refused\"}",
        )
        .unwrap_or(0.0);
        if ids.contains(&"good") && refused >= 2.0 {
            assert!(!ids.contains(&"bad"), "{v}");
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{v} refused={refused}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
