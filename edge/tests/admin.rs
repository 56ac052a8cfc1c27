//! Admin HTTP (`/healthz`, `/metrics`, `/admin/drain`) and the control heartbeat, under both
//! drivers.

mod common;

use common::*;
use net::runtime::Driver;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A minimal control stand-in: answers every request `200 {"ok":true}` and keeps the bodies.
fn fake_control() -> (String, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut buf = Vec::new();
            let mut tmp = [0u8; 4096];
            // Read head + body (Content-Length).
            while let Ok(n) = s.read(&mut tmp) {
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&tmp[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        s2.lock().unwrap().push(format!(
                            "{}\n{}",
                            head.lines().next().unwrap_or(""),
                            body
                        ));
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\nConnection: close\r\n\r\n{\"ok\":true}");
                        break;
                    }
                }
            }
        }
    });
    (addr, seen)
}

fn admin_body(driver: Driver) {
    let (control, seen) = fake_control();
    let mut cfg = edge_config(driver, vec![]);
    cfg.control_addr = Some(control);
    cfg.control_heartbeat_ms = 100;
    cfg.node_id = "edge-test".into();
    cfg.drain_close_per_s = 100;
    let edge = edge::start(cfg).unwrap();
    let (status, body) = http_get(edge.admin_addr(), "/healthz");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"ok\":true"), "{body}");
    let mut viewers: Vec<Client> = (0..4)
        .map(|i| {
            let mut c = Client::connect(edge.tcp_addr(), edge.ws_addr(), i % 2 == 0);
            c.auth_ok(i as u64 + 1, 9, 0, 1);
            c
        })
        .collect();
    let (status, m) = http_get(edge.admin_addr(), "/metrics");
    assert_eq!(status, 200);
    assert_eq!(metric_sum(&m, "barrage_edge_connections"), 4.0, "{m}");
    assert_eq!(metric_sum(&m, "barrage_edge_auth_ok_total"), 4.0, "{m}");
    for fam in [
        "barrage_edge_closes_total",
        "barrage_edge_drops_total",
        "barrage_edge_auth_failed_total",
        "barrage_edge_heartbeats_total",
        "barrage_edge_bytes_out_total",
    ] {
        assert!(m.contains(&format!("# TYPE {fam}")), "{fam} missing");
    }
    // Control hears about us, with our ports and load.
    eventually("control heartbeat with 4 connections", || {
        seen.lock().unwrap().iter().any(|b| {
            b.starts_with("POST /v1/edges/heartbeat")
                && b.contains("\"node_id\":\"edge-test\"")
                && b.contains(&format!("\"tcp_port\":{}", edge.tcp_addr().port()))
                && b.contains("\"connections\":4")
                && b.contains("\"draining\":false")
        })
    });
    // Drain: no new connections, clients closed (WS with 1001), control told.
    let (status, body) = http(edge.admin_addr(), "POST", "/admin/drain");
    assert_eq!(status, 200, "{body}");
    for c in viewers.iter_mut() {
        let code = c.expect_closed();
        if c.ws {
            assert_eq!(code, Some(proto::ws::close::GOING_AWAY));
        }
    }
    eventually("control told draining", || {
        seen.lock()
            .unwrap()
            .iter()
            .any(|b| b.contains("\"draining\":true"))
    });
    // The listeners are closed: new connections are refused.
    eventually("listeners closed", || {
        std::net::TcpStream::connect(edge.tcp_addr()).is_err()
            && std::net::TcpStream::connect(edge.ws_addr()).is_err()
    });
    let (_, m) = http_get(edge.admin_addr(), "/metrics");
    assert_eq!(metric(&m, "barrage_edge_draining"), 1.0);
    assert_eq!(
        metric(&m, "barrage_edge_closes_total{reason=\"shutdown\"}"),
        4.0,
        "{m}"
    );
    let (status, _) = http_get(edge.admin_addr(), "/nope");
    assert_eq!(status, 404);
    edge.shutdown();
}

#[test]
fn admin_and_control_uring() {
    with_driver(Driver::Uring, admin_body);
}

#[test]
fn admin_and_control_legacy() {
    with_driver(Driver::Legacy, admin_body);
}

#[test]
fn config_file_and_unknown_fields() {
    let dir = std::env::temp_dir().join(format!("edge-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("edge.toml");
    std::fs::write(
        &p,
        "shards = 1\ntcp_addr = \"127.0.0.1:0\"\nauth_ms_max = 1234\n",
    )
    .unwrap();
    let c = edge::Config::from_toml_file(&p).unwrap();
    assert_eq!((c.shards, c.auth_ms_max), (1, 1234));
    std::fs::write(&p, "shards = 1\nauth_ms = 1234\n").unwrap();
    assert!(edge::Config::from_toml_file(&p).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}
