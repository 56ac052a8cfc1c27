//! Cluster mode through the real binary (issue 12): a `nats-server -js` on a free port, two
//! `barrage broker --backbone` processes, and control plus one edge (linked to both brokers)
//! in this process. A broker is killed with SIGKILL mid-run; every push accepted before or
//! after must still reach the viewer.
//!
//! `./scripts/test.sh` installs nats-server and sets `BARRAGE_REQUIRE_NATS=1`, so the test
//! fails there rather than skip when it is missing.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A child process killed (SIGKILL) on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `nats-server -js` on a free port (None: not installed and not required).
fn nats(dir: &std::path::Path) -> Option<(Proc, SocketAddr)> {
    nats_at(dir, free_port())
}

fn nats_at(dir: &std::path::Path, port: u16) -> Option<(Proc, SocketAddr)> {
    let bin = if std::path::Path::new("/usr/sbin/nats-server").exists() {
        "/usr/sbin/nats-server"
    } else {
        "nats-server"
    };
    let child = Command::new(bin)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match child {
        Ok(c) => {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let p = Proc(c);
            wait_listening(addr);
            Some((p, addr))
        }
        Err(e) => {
            assert!(
                std::env::var_os("BARRAGE_REQUIRE_NATS").is_none(),
                "nats-server required but not runnable: {e}"
            );
            eprintln!("nats-server not installed ({e}); skipping");
            None
        }
    }
}

struct Broker {
    proc: Proc,
    ingest: SocketAddr,
    link: SocketAddr,
    http: SocketAddr,
}

fn broker(name: &str, nats: SocketAddr) -> Broker {
    let (ingest, link, http) = (free_port(), free_port(), free_port());
    let set = |kv: String| ["--set".to_string(), kv];
    let mut args = vec![
        "broker".to_string(),
        "--backbone".into(),
        format!("nats://{nats}"),
    ];
    for kv in [
        format!("node_id=\"{name}\""),
        "shards=1".into(),
        "pin=false".into(),
        format!("ingest_addr=\"127.0.0.1:{ingest}\""),
        format!("link_addr=\"127.0.0.1:{link}\""),
        format!("http_addr=\"127.0.0.1:{http}\""),
        format!("api_keys=[{{key=\"{API_KEY}\"}}]"),
        "cluster.partitions=8".into(),
        "cluster.lease_ms=1500".into(),
        "cluster.ack_wait_ms=1000".into(),
        "batch_window_ms=5".into(),
    ] {
        args.extend(set(kv));
    }
    let child = Command::new(env!("CARGO_BIN_EXE_barrage"))
        .args(&args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("barrage broker starts");
    let b = Broker {
        proc: Proc(child),
        ingest: SocketAddr::from(([127, 0, 0, 1], ingest)),
        link: SocketAddr::from(([127, 0, 0, 1], link)),
        http: SocketAddr::from(([127, 0, 0, 1], http)),
    };
    wait_listening(b.http);
    b
}

/// Pushes `n` numbered messages to `room` through `http`, retrying 503s (a backbone answer
/// while a partition moves is never a loss: it was not accepted). Returns the numbers accepted.
fn push_numbered(http: SocketAddr, room: u64, from: u64, n: u64) -> Vec<u64> {
    let auth = format!("Bearer {API_KEY}");
    let mut accepted = Vec::new();
    for i in from..from + n {
        let deadline = Instant::now() + WAIT;
        loop {
            let (status, v) = http_json(
                http,
                "POST",
                &format!("/v1/push/room/{room}"),
                &[("Authorization", auth.as_str())],
                &format!(r#"{{"cmd":"N","n":{i}}}"#),
            );
            if status == 202 {
                assert!(v["msg_id"].as_str().is_some(), "{v}");
                accepted.push(i);
                break;
            }
            assert_eq!(status, 503, "only overloaded may refuse: {v}");
            assert!(Instant::now() < deadline, "backbone never recovered");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    accepted
}

fn get_text(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn a_broker_killed_with_sigkill_loses_no_accepted_push() {
    let dir = std::env::temp_dir().join(format!("barrage-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let Some((_nats, nats_addr)) = nats(&dir) else {
        return;
    };
    let mut a = broker("b-one", nats_addr);
    let b = broker("b-two", nats_addr);

    let control = control::start(control_config(KEYS_V1)).expect("control starts");
    let mut ec = edge_config("edge-1", KEYS_V1, a.link, control.http_addr());
    ec.broker_addrs = vec![a.link.to_string(), b.link.to_string()];
    let _edge = edge::start(ec).expect("edge starts");
    let deadline = Instant::now() + WAIT;
    loop {
        let v = http_json(control.http_addr(), "GET", "/v1/edges", &[], "").1;
        let up = v["edges"].as_array().is_some_and(|a| {
            a.iter()
                .any(|e| e["node_id"] == "edge-1" && e["state"] == "up")
        });
        if up {
            break;
        }
        assert!(Instant::now() < deadline, "edge never registered: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Viewers in several rooms, so both brokers own some of them.
    let rooms: Vec<u64> = (1..=6).map(|r| 7000 + r).collect();
    let mut viewers = Vec::new();
    for &room in &rooms {
        let t = connect_ticket(control.http_addr(), room, room);
        let e = &t.edges[0];
        let addr: SocketAddr = format!(
            "{}:{}",
            e["host"].as_str().unwrap(),
            e["tcp_port"].as_u64().unwrap()
        )
        .parse()
        .unwrap();
        let mut v = Viewer::tcp(addr);
        assert_eq!(v.auth(&auth_body(room, room, &t.token)), 0);
        warm_up(b.ingest, room, &mut [&mut v]);
        viewers.push(v);
    }

    // Before, during and after the kill: pushes through the surviving broker's API.
    let mut sent: Vec<Vec<u64>> = Vec::new();
    for &room in &rooms {
        sent.push(push_numbered(b.http, room, 0, 20));
    }
    let _ = a.proc.0.kill(); // SIGKILL
    let _ = a.proc.0.wait();
    let _ = (a.ingest, a.http);
    for (i, &room) in rooms.iter().enumerate() {
        sent[i].extend(push_numbered(b.http, room, 20, 20));
    }

    let deadline = Instant::now() + WAIT;
    for (i, v) in viewers.iter_mut().enumerate() {
        let want: BTreeSet<u64> = sent[i].iter().copied().collect();
        let mut got = BTreeSet::new();
        while got.len() < want.len() && Instant::now() < deadline {
            if let Some(m) = v.next_message(deadline) {
                if let Some(n) = serde_json::from_str::<serde_json::Value>(&m)
                    .ok()
                    .and_then(|j| j["n"].as_u64())
                {
                    got.insert(n);
                }
            }
        }
        let missing: Vec<_> = want.difference(&got).collect();
        assert!(missing.is_empty(), "room {}: missing {missing:?}", rooms[i]);
    }
    // The survivor took over every partition (so the dead broker's rooms were delivered by it).
    let metrics = get_text(b.http, "/metrics");
    assert!(
        metrics.contains("barrage_broker_backbone_partitions_held 8"),
        "survivor holds every partition:\n{}",
        metrics
            .lines()
            .filter(|l| l.starts_with("barrage_broker_backbone"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    drop(b);
    control.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_backbone_that_is_down_is_answered_503_then_recovers() {
    let dir = std::env::temp_dir().join(format!("barrage-cluster-down-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let Some((nats_proc, nats_addr)) = nats(&dir) else {
        return;
    };
    let b = broker("b-down", nats_addr);
    let auth = format!("Bearer {API_KEY}");
    let push = || {
        http_json(
            b.http,
            "POST",
            "/v1/push/room/1",
            &[("Authorization", auth.as_str())],
            r#"{"cmd":"X"}"#,
        )
    };
    assert_eq!(push().0, 202);
    drop(nats_proc);
    let (status, v) = push();
    assert_eq!(status, 503, "backbone down: overloaded, not accepted: {v}");
    assert_eq!(v["error"], "overloaded", "{v}");
    let (_nats, _) = nats_at(&dir, nats_addr.port()).expect("nats restarts");
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, v) = push();
        if status == 202 {
            break;
        }
        assert_eq!(status, 503, "{v}");
        assert!(Instant::now() < deadline, "never recovered");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(b);
    let _ = std::fs::remove_dir_all(&dir);
}
