//! Slowloris, stalled bodies and floods on every HTTP port (issue 17, defect 3).

use crate::common::*;
use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The three HTTP servers, each alone, with [`http_table`] limits: (name, address, a path that
/// takes a body, its reserved health path).
fn servers(head_ms: u64) -> (Vec<Role>, Vec<(&'static str, SocketAddr, &'static str)>) {
    let control = start_ok("control", &control_toml("", head_ms));
    let broker = start_ok("broker", &broker_toml("", head_ms));
    let edge = start_ok("edge", &edge_toml("", head_ms));
    let ports = vec![
        ("control", control.addrs[0], "/v1/connect"),
        ("broker", broker.addrs[2], "/v1/push/room/1"),
        ("edge admin", edge.addrs[2], "/admin/drain"),
    ];
    (vec![control, broker, edge], ports)
}

/// Regression: a request that declares a body and sends part of it was never timed out (4,100
/// of them locked control out). Now: 408 within the body deadline, on every port.
#[test]
fn stalled_bodies_get_408_on_every_http_port() {
    let (_roles, ports) = servers(HEAD_MS);
    for (name, addr, path) in ports {
        let t = Instant::now();
        let mut s = connect_from([127, 0, 0, 2], addr);
        s.write_all(
            format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
                .as_bytes(),
        )
        .unwrap();
        let (head, body) = read_response(&mut s).unwrap_or_else(|| panic!("{name}: no answer"));
        assert_eq!(status(&head), 408, "{name}: {head}");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "body_timeout", "{name}");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{name}: {:?}",
            t.elapsed()
        );
        assert!(
            closed_within(&mut s, Duration::from_secs(2)),
            "{name}: left open"
        );
        println!("{name}: stalled body answered 408 after {:?}", t.elapsed());
    }
}

/// Regression: a head dribbled a byte at a time held its connection forever.
#[test]
fn slowloris_heads_are_closed_on_every_http_port() {
    let (_roles, ports) = servers(HEAD_MS);
    for (name, addr, _) in ports {
        let t = Instant::now();
        let mut s = connect_from([127, 0, 0, 2], addr);
        let mut closed = false;
        for b in b"GET /healthz HTTP/1.1\r\nX-Slow: "
            .iter()
            .chain([b'a'; 64].iter())
        {
            if s.write_all(&[*b]).is_err() {
                closed = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
            if t.elapsed() > Duration::from_secs(3) {
                break;
            }
        }
        closed = closed || closed_within(&mut s, Duration::from_secs(2));
        assert!(
            closed,
            "{name}: a slow head was still open after {:?}",
            t.elapsed()
        );
        println!("{name}: slow head closed after {:?}", t.elapsed());
    }
}

/// One address opening many connections gets 503 + Retry-After past its cap; another address
/// is served meanwhile.
#[test]
fn a_flood_from_one_address_leaves_the_others_served() {
    // Held connections stay silent on purpose: a head deadline longer than the test.
    let (_roles, ports) = servers(10_000);
    for (name, addr, _) in ports {
        let held: Vec<_> = (0..16)
            .map(|_| connect_from([127, 0, 0, 4], addr))
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        let mut refused = 0;
        for _ in 0..10 {
            if let Some((head, _)) = request_from([127, 0, 0, 4], addr, &get("/healthz")) {
                if status(&head) == 503 && head.to_ascii_lowercase().contains("retry-after:") {
                    refused += 1;
                }
            }
        }
        assert_eq!(refused, 10, "{name}: the 17th+ connections of one address");
        let (head, _) = request_from([127, 0, 0, 5], addr, &get("/healthz"))
            .unwrap_or_else(|| panic!("{name}: another address got no answer"));
        assert_eq!(status(&head), 200, "{name}: {head}");
        drop(held);
    }
}

/// Regression: with every public slot taken (stalled connections from many addresses), health
/// checks and edge heartbeats still get through on the reserved slots; the public paths are
/// answered 503 + Retry-After rather than left hanging.
#[test]
fn a_full_control_still_takes_health_checks_and_heartbeats() {
    let control = start_ok("control", &control_toml("", 10_000));
    let addr = control.addrs[0];
    // 56 = conns_max - conns_reserved, 8 addresses x 7: under the per-address cap of 16.
    let held: Vec<_> = (0..56u8)
        .map(|i| connect_from([127, 0, 2, 10 + i / 7], addr))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let body = r#"{"room":1}"#;
    let connect = format!(
        "POST /v1/connect HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (head, _) = request_from([127, 0, 3, 1], addr, &connect).expect("an answer, not a hang");
    assert_eq!(status(&head), 503, "{head}");
    assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
    let (head, _) = request_from([127, 0, 3, 1], addr, &get("/healthz")).expect("healthz");
    assert_eq!(status(&head), 200, "{head}");
    let hb = r#"{"node_id":"e1","region":"local","host":"127.0.0.1","tcp_port":1,"ws_port":2,"wss_port":0,"connections":0,"capacity":10,"draining":false}"#;
    let beat = format!(
        "POST /v1/edges/heartbeat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{hb}",
        hb.len()
    );
    let (head, _) = request_from([127, 0, 0, 1], addr, &beat).expect("heartbeat");
    assert_eq!(status(&head), 200, "{head}");
    drop(held);
    let m = metrics(addr);
    assert!(
        metric(
            &m,
            "barrage_control_http_refused_total{reason=\"reserved\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{m}"
    );
}

/// The issue's own attack at full size, by hand (`cargo test --test faults -- --ignored
/// --nocapture stalled_flood`): 4,100 connections from one address that declare a body and send
/// none, against control with its default limits; then discovery and a heartbeat from another
/// address. Before the fix this locked control out for everyone.
#[test]
#[ignore]
fn stalled_flood_of_4100_does_not_lock_control_out() {
    let control = start_ok(
        "control",
        &format!("http_addr = \"127.0.0.1:0\"\ntoken_keys = \"1:{STRONG}\"\ndriver = \"legacy\"\n"),
    );
    let addr = control.addrs[0];
    let t = Instant::now();
    let mut held = Vec::new();
    for _ in 0..4_100 {
        let mut s = connect_from([127, 0, 0, 2], addr);
        let _ = s.write_all(b"POST /v1/connect HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n");
        held.push(s);
    }
    println!("4100 stalled connections opened in {:?}", t.elapsed());
    let t = Instant::now();
    let (head, _) = request_from(
        [127, 0, 0, 3],
        addr,
        &get("/xlive/web-room/v1/index/getDanmuInfo?id=1&type=0"),
    )
    .expect("discovery answered");
    assert_eq!(status(&head), 200, "{head}");
    println!(
        "discovery from another address during the flood: 200 in {:?}",
        t.elapsed()
    );
    let m = metrics(addr);
    let per_addr = metric(
        &m,
        "barrage_control_http_refused_total{reason=\"per_addr\"}",
    )
    .unwrap_or(0.0);
    println!("refused per address: {per_addr} (cap 256 per address)");
    assert!(per_addr >= 3_800.0, "{per_addr}");
    // The stalled bodies are answered 408 within the body deadline.
    std::thread::sleep(Duration::from_millis(5_500));
    let m = metrics(addr);
    let body_timeouts = metric(
        &m,
        "barrage_control_http_refused_total{reason=\"body_timeout\"}",
    )
    .unwrap_or(0.0);
    println!("stalled bodies answered 408 after 5.5 s: {body_timeouts}");
    assert!(body_timeouts >= 250.0, "{body_timeouts}");
    drop(held);
}
