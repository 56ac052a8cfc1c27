//! High reach and offline messages end to end (issue 9): a broker and edges as real `barrage`
//! processes on loopback, real viewers that opt in with `"ack": true` and ACK with op 1000.
//! Short retry windows so each test runs in a few seconds. Every wait polls for the state it
//! wants within a bound; "no more resends" is asserted on the broker's resend counter after it
//! has logged the ACK (exact), never on a quiet socket for some time.

mod common;
#[path = "faults/common.rs"]
mod procs;

use common::{Event, Viewer};
use procs::{
    edge_toml, http_table, request_from, start, start_ok, status, Role, Started, HEAD_MS, STRONG,
};
use proto::id::{AreaId, DeviceId, RoomId, UserId};
use proto::token::{Claims, KeySet};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const KEY: &str = "reach-test-key-0123456789abcdef0123456789abcdef";
const RETRY_MS: u64 = 300;
const WAIT: Duration = Duration::from_secs(20);

#[path = "common/ports.rs"]
mod ports;
use ports::free_port;

struct Ports {
    ingest: u16,
    link: u16,
    http: u16,
}

fn broker_with(ports: Option<&Ports>, extra: &str) -> Role {
    let (i, l, h) = ports.map_or((0, 0, 0), |p| (p.ingest, p.link, p.http));
    let toml = format!(
        "shards = 1\npin = false\ndriver = \"legacy\"\ningest_addr = \"127.0.0.1:{i}\"\n\
         link_addr = \"127.0.0.1:{l}\"\nhttp_addr = \"127.0.0.1:{h}\"\n\
         link_ping_ms = 200\nlink_dead_ms = 1000\nreach_retry_ms = {RETRY_MS}\n{extra}\n\
         [[api_keys]]\nkey = \"{KEY}\"\nscopes = [\"room\", \"user\", \"device\"]\n\n{}",
        http_table(HEAD_MS)
    );
    start_ok("broker", &toml)
}

fn edge(node: &str, links: SocketAddr) -> Role {
    let toml = format!(
        "node_id = \"{node}\"\nbroker_addrs = [\"{links}\"]\nlink_ping_ms = 200\n\
         link_dead_ms = 1000\npresence_batch_ms = 50\nlink_backoff_ms_min = 50\n\
         link_backoff_ms_max = 200\n"
    );
    start_ok("edge", &edge_toml(&toml, HEAD_MS))
}

/// A viewer of room 1 on `edge`, authenticated as `uid` from `device`, opted in when `ack`.
fn viewer(edge: SocketAddr, uid: u64, device: &str, ack: bool) -> Viewer {
    let keys = KeySet::parse(&format!("1:{STRONG}")).expect("keys");
    let token = keys.sign(&Claims {
        uid: UserId(uid),
        device: DeviceId(device.into()),
        room: RoomId(1),
        area: AreaId(3),
        expires_at_s: common::unix_now_s() + 600,
    });
    let mut v = Viewer::tcp(edge);
    let mut body = loadtest::client::auth_body(uid, 1, 3, &token, device);
    body.ack = ack;
    assert_eq!(v.auth(&body), 0, "auth of uid {uid}");
    v
}

fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (head, body) = request_from([127, 0, 0, 1], addr, &req).expect("response");
    (
        status(&head),
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

/// Pushes a high-reach message to `uid`; returns its msg id.
fn push_high(addr: SocketAddr, uid: u64, ttl_ms: Option<u64>, n: u32) -> u64 {
    let ttl = ttl_ms.map(|t| format!("&ttl_ms={t}")).unwrap_or_default();
    let (s, v) = http(
        addr,
        "POST",
        &format!("/v1/push/user/{uid}?reach=high{ttl}"),
        &format!(r#"{{"cmd":"GIFT_RECEIPT","n":{n}}}"#),
    );
    assert_eq!(s, 202, "{v}");
    v["msg_id"].as_str().expect("msg_id").parse().expect("u64")
}

fn state(addr: SocketAddr, msg: u64) -> Value {
    let (s, v) = http(addr, "GET", &format!("/v1/reach/{msg}"), "");
    assert_eq!(s, 200, "{v}");
    v
}

fn wait_for(what: &str, mut f: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + WAIT;
    loop {
        match f() {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => panic!("{what}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(30)),
        }
    }
}

fn wait_state(addr: SocketAddr, msg: u64, want: &str) -> Value {
    let mut last = Value::Null;
    wait_for(&format!("msg {msg} {want}"), || {
        last = state(addr, msg);
        if last["state"] == want {
            Ok(())
        } else {
            Err(last.to_string())
        }
    });
    last
}

/// The next op 5 body carrying a `msg_id`, as (msg id, body).
fn next_reach(v: &mut Viewer) -> (u64, Value) {
    let deadline = Instant::now() + WAIT;
    loop {
        let m = v.next_message(deadline).expect("a high-reach message");
        let body: Value = serde_json::from_str(&m).expect("JSON body");
        if let Some(id) = body["msg_id"].as_str() {
            return (id.parse().expect("decimal msg_id"), body);
        }
    }
}

/// Every message delivered before the reply to a heartbeat sent now (a connection's bytes
/// keep their order, so anything fanned out to it earlier comes first).
fn messages_before_heartbeat(v: &mut Viewer) -> Vec<String> {
    v.send_packet(&proto::auth::heartbeat_request());
    let deadline = Instant::now() + WAIT;
    let mut out = Vec::new();
    loop {
        match v.next_event(deadline) {
            Some(Event::Online(_)) => return out,
            Some(Event::Message(m)) => out.push(m),
            Some(Event::Closed) | None => panic!("no heartbeat reply"),
            Some(_) => {}
        }
    }
}

fn ack(v: &mut Viewer, msg: u64) {
    v.send_packet(&proto::auth::ack_request(msg));
}

fn metric(addr: SocketAddr, sample: &str) -> f64 {
    procs::metric(&procs::metrics(addr), sample).unwrap_or(0.0)
}

/// Waits until the edge has reported `records` connections (a push sent before the broker
/// heard of them waits for the report, so this only keeps the tests' timing plain).
fn wait_presence(edge_admin: SocketAddr, records: f64) {
    wait_for("the edge reported its connections", || {
        let m = procs::metrics(edge_admin);
        match procs::metric(&m, "barrage_edge_presence_records{shard=\"0\"}") {
            Some(n) if n >= records => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
}

#[test]
fn an_unacked_message_follows_the_user_to_a_new_connection_and_an_ack_ends_it() {
    let b = broker_with(None, "reach_retries = 20");
    let (links, api) = (b.addrs[1], b.addrs[2]);
    let e1 = edge("r-e1", links);
    let e2 = edge("r-e2", links);
    let mut first = viewer(e1.addrs[0], 7, "dev-a", true);
    wait_presence(e1.addrs[2], 1.0);
    let msg = push_high(api, 7, None, 1);
    let (got, body) = next_reach(&mut first);
    assert_eq!(got, msg);
    assert_eq!(
        body["cmd"], "GIFT_RECEIPT",
        "the rest of the body is verbatim"
    );
    assert_eq!(body["n"], 1);
    // Closed without an ACK; the user comes back on the other edge and gets it again.
    drop(first);
    let mut second = viewer(e2.addrs[0], 7, "dev-b", true);
    let (again, _) = next_reach(&mut second);
    assert_eq!(again, msg, "the resend keeps its msg id");
    assert!(state(api, msg)["attempts"].as_u64().unwrap_or(0) >= 2);
    ack(&mut second, msg);
    wait_state(api, msg, "acked");
    let resends = metric(api, "barrage_broker_reach_resends_total");
    // Several retry windows later the broker has sent nothing more.
    std::thread::sleep(Duration::from_millis(4 * RETRY_MS));
    assert_eq!(
        metric(api, "barrage_broker_reach_resends_total"),
        resends,
        "no resend after the ACK"
    );
    assert_eq!(metric(api, "barrage_broker_reach_acked_total"), 1.0);
    drop((e1, e2));
}

#[test]
fn both_connections_of_a_user_get_it_resends_skip_those_that_did_not_opt_in() {
    let b = broker_with(None, "reach_retries = 20");
    let (links, api) = (b.addrs[1], b.addrs[2]);
    let e1 = edge("r2-e1", links);
    let e2 = edge("r2-e2", links);
    let mut a = viewer(e1.addrs[0], 8, "dev-a", true);
    let mut b2 = viewer(e2.addrs[0], 8, "dev-b", true);
    let mut plain = viewer(e1.addrs[0], 8, "dev-c", false);
    wait_presence(e1.addrs[2], 2.0);
    wait_presence(e2.addrs[2], 1.0);
    let msg = push_high(api, 8, None, 2);
    assert_eq!(next_reach(&mut a).0, msg);
    assert_eq!(next_reach(&mut b2).0, msg);
    assert_eq!(
        next_reach(&mut plain).0,
        msg,
        "a client that did not opt in gets the message once, msg_id included"
    );
    // Nobody ACKs: the opted-in connections get resends, the other one does not.
    assert_eq!(next_reach(&mut a).0, msg);
    let late = messages_before_heartbeat(&mut plain);
    assert!(
        late.iter().all(|m| !m.contains("msg_id")),
        "no resend to a connection without \"ack\": {late:?}"
    );
    // An ACK from one connection ends it for every connection of the user.
    ack(&mut b2, msg);
    wait_state(api, msg, "acked");
    let resends = metric(api, "barrage_broker_reach_resends_total");
    std::thread::sleep(Duration::from_millis(4 * RETRY_MS));
    assert_eq!(metric(api, "barrage_broker_reach_resends_total"), resends);
    drop((e1, e2));
}

#[test]
fn expiry_ends_the_resends() {
    let b = broker_with(None, "reach_retries = 50");
    let (links, api) = (b.addrs[1], b.addrs[2]);
    let e = edge("r3-e1", links);
    let mut v = viewer(e.addrs[0], 9, "dev-a", true);
    wait_presence(e.addrs[2], 1.0);
    let msg = push_high(api, 9, Some(4 * RETRY_MS), 3);
    assert_eq!(next_reach(&mut v).0, msg);
    assert_eq!(next_reach(&mut v).0, msg, "resent while unacknowledged");
    wait_state(api, msg, "expired");
    let resends = metric(api, "barrage_broker_reach_resends_total");
    std::thread::sleep(Duration::from_millis(3 * RETRY_MS));
    assert_eq!(metric(api, "barrage_broker_reach_resends_total"), resends);
    assert_eq!(metric(api, "barrage_broker_reach_expired_total"), 1.0);
    // An ACK after the end is ignored and counted.
    ack(&mut v, msg);
    wait_for("late ACK counted", || {
        let n = metric(
            api,
            "barrage_broker_reach_acks_ignored_total{reason=\"unknown\"}",
        );
        if n >= 1.0 {
            Ok(())
        } else {
            Err(n.to_string())
        }
    });
    drop(e);
}

#[test]
fn an_offline_user_receives_on_connect_and_after_a_broker_kill_and_restart() {
    let dir = std::env::temp_dir().join(format!("barrage-reach-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ports = Ports {
        ingest: free_port(),
        link: free_port(),
        http: free_port(),
    };
    let data = format!("data_dir = \"{}\"", dir.display());
    let mut b = broker_with(Some(&ports), &data);
    let (links, api) = (b.addrs[1], b.addrs[2]);
    let e = edge("r4-e1", links);
    // Offline: kept, waiting for a connect.
    let early = push_high(api, 11, None, 4);
    assert_eq!(state(api, early)["attempts"], 0, "nobody to send to yet");
    let mut v = viewer(e.addrs[0], 11, "dev-a", true);
    assert_eq!(next_reach(&mut v).0, early, "delivered on connect");
    ack(&mut v, early);
    wait_state(api, early, "acked");
    drop(v);
    // Accepted for an offline user, then the broker is killed before anyone connects.
    let kept = push_high(api, 12, None, 5);
    b.child.kill().expect("kill -9");
    let _ = b.child.wait();
    let b2 = broker_with(Some(&ports), &data);
    assert_eq!(b2.addrs[2], api);
    assert_eq!(
        metric(api, "barrage_broker_reach_reloaded_total"),
        1.0,
        "the acked message is not reloaded, the other one is"
    );
    let mut w = viewer(e.addrs[0], 12, "dev-b", true);
    let (got, body) = next_reach(&mut w);
    assert_eq!(got, kept, "delivered after the restart");
    assert_eq!(body["n"], 5);
    ack(&mut w, kept);
    wait_state(api, kept, "acked");
    drop((e, b2));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_second_broker_on_the_same_data_dir_fails_at_start_naming_it_and_the_holder() {
    let dir = std::env::temp_dir().join(format!("barrage-reach-lock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = format!("data_dir = \"{}\"", dir.display());
    let first = broker_with(None, &data);
    let toml = format!(
        "shards = 1\npin = false\ningest_addr = \"127.0.0.1:0\"\nlink_addr = \"127.0.0.1:0\"\n\
         http_addr = \"127.0.0.1:0\"\n{data}\n[[api_keys]]\nkey = \"{KEY}\"\n\n{}",
        http_table(HEAD_MS)
    );
    match start("broker", &toml) {
        Started::Up(_) => panic!("a second broker started on a data_dir in use"),
        Started::Exited(s, err) => {
            assert!(!s.success(), "{err}");
            assert!(err.contains(&dir.display().to_string()), "{err}");
            assert!(err.contains(&format!("pid {}", first.child.id())), "{err}");
        }
    }
    // The lock dies with its holder, even by kill -9: the directory is usable again.
    drop(first);
    drop(broker_with(None, &data));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_acks_and_bad_pushes_are_refused_or_ignored_and_counted() {
    let b = broker_with(None, "reach_retries = 20");
    let (links, api) = (b.addrs[1], b.addrs[2]);
    let e = edge("r5-e1", links);
    let admin = e.addrs[2];
    let mut mine = viewer(e.addrs[0], 21, "dev-a", true);
    let mut other = viewer(e.addrs[0], 22, "dev-b", true);
    let mut plain = viewer(e.addrs[0], 23, "dev-c", false);
    wait_presence(admin, 3.0);
    let msg = push_high(api, 21, None, 6);
    assert_eq!(next_reach(&mut mine).0, msg);
    // Someone else's msg id, an unknown one: ignored, counted; the message stays pending.
    ack(&mut other, msg);
    ack(&mut mine, 1);
    wait_for("bad ACKs counted", || {
        let m = procs::metrics(api);
        let nope = procs::metric(
            &m,
            "barrage_broker_reach_acks_ignored_total{reason=\"not_yours\"}",
        );
        let unknown = procs::metric(
            &m,
            "barrage_broker_reach_acks_ignored_total{reason=\"unknown\"}",
        );
        if nope == Some(1.0) && unknown == Some(1.0) {
            Ok(())
        } else {
            Err(format!("{nope:?} {unknown:?}"))
        }
    });
    assert_eq!(state(api, msg)["state"], "pending");
    // A malformed ACK (3 bytes) and one from a client that did not opt in: ignored.
    mine.send_packet(&proto::packet::encode_vec(
        1,
        proto::packet::op::ACK,
        1,
        &[1, 2, 3],
    ));
    ack(&mut plain, msg);
    // A flood: far past the per-connection rate; the excess is dropped at the edge.
    for i in 0..500u64 {
        ack(&mut other, 1_000_000 + i);
    }
    wait_for("edge counts", || {
        let m = procs::metrics(admin);
        let limited = procs::metric(&m, "barrage_edge_acks_rate_limited_total{shard=\"0\"}");
        let plain = procs::metric(&m, "barrage_edge_acks_not_opted_in_total{shard=\"0\"}");
        if limited.unwrap_or(0.0) >= 1.0 && plain == Some(1.0) {
            Ok(())
        } else {
            Err(format!("{limited:?} {plain:?}"))
        }
    });
    // Every connection is still served, and the message still ends with its owner's ACK.
    assert!(messages_before_heartbeat(&mut other)
        .iter()
        .all(|m| !m.contains("GIFT")));
    let _ = messages_before_heartbeat(&mut plain);
    ack(&mut mine, msg);
    wait_state(api, msg, "acked");
    // A huge op 1000 is a packet past the edge's limit: that connection alone is closed.
    let huge = proto::packet::encode_vec(1, proto::packet::op::ACK, 1, &vec![0u8; 1 << 20]);
    plain.send_packet(&huge);
    assert!(
        plain.closed_by(Instant::now() + WAIT),
        "oversized packet closes its sender"
    );
    let _ = messages_before_heartbeat(&mut mine);
    // Pushes high reach does not apply to, or that already carry a msg_id.
    for (path, body) in [
        ("/v1/push/room/1?reach=high", r#"{"a":1}"#),
        ("/v1/push/user/0?reach=high", r#"{"a":1}"#),
        ("/v1/push/user/21?reach=high", r#"{"msg_id":"5"}"#),
        ("/v1/push/user/21?reach=maybe", r#"{"a":1}"#),
    ] {
        let (s, v) = http(api, "POST", path, body);
        assert_eq!(s, 400, "{path}: {v}");
    }
    let (s, v) = http(api, "GET", "/v1/reach/not-a-number", "");
    assert_eq!(s, 400, "{v}");
    assert_eq!(state(api, 42)["state"], "unknown");
    drop(e);
}

#[test]
fn a_target_past_its_bound_is_refused_overloaded_not_dropped() {
    let b = broker_with(None, "reach_target_entries_max = 2");
    let api = b.addrs[2];
    push_high(api, 31, None, 1);
    push_high(api, 31, None, 2);
    let (s, v) = http(
        api,
        "POST",
        "/v1/push/user/31?reach=high",
        r#"{"cmd":"GIFT_RECEIPT"}"#,
    );
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["error"], "overloaded");
    // Another user is not affected.
    push_high(api, 32, None, 3);
    assert_eq!(
        metric(api, "barrage_broker_reach_refused_total{bound=\"target\"}"),
        1.0
    );
}

/// `barrage up` as its own process, killed with SIGKILL on drop.
struct Up(std::process::Child);

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `barrage up` with a data dir and waits for its "ready" line.
fn up(offset: u16, data: &std::path::Path, tls: &std::path::Path) -> Up {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let mut child = Command::new(procs::BIN)
        .env("BARRAGE_TLS_DIR", tls)
        .env("RUST_LOG", "warn")
        .args([
            "up",
            "--api-key",
            KEY,
            "--token-secret",
            STRONG,
            "--ports-offset",
        ])
        .arg(offset.to_string())
        .arg("--data-dir")
        .arg(data)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn up");
    let mut err = child.stderr.take().expect("stderr");
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + WAIT;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(l) if l == "ready" => return Up(child),
            _ if Instant::now() > deadline => panic!("up never became ready"),
            _ => {}
        }
        if let Ok(Some(s)) = child.try_wait() {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut err, &mut text);
            panic!("up exited: {s}: {text}");
        }
    }
}

#[test]
fn up_with_a_data_dir_keeps_a_message_across_kill_9_and_tail_ack_acks_it() {
    // Below the ephemeral port range for every port `up` opens (admin 9243 + offset < 32768).
    let offset = 16_000 + (std::process::id() % 300) as u16 * 10;
    let tmp = std::env::temp_dir().join(format!("barrage-reach-up-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let (data, tls) = (tmp.join("data"), tmp.join("tls"));
    let api: SocketAddr = ([127, 0, 0, 1], 7480 + offset).into();
    let first = up(offset, &data, &tls);
    let msg = push_high(api, 7, None, 1);
    drop(first); // SIGKILL
                 // Other ports for the second life: the killed process's accepted connections leave
                 // TIME_WAIT entries on control's port, which control cannot bind over (no SO_REUSEADDR).
    let offset = offset + 5;
    let api: SocketAddr = ([127, 0, 0, 1], 7480 + offset).into();
    let _again = up(offset, &data, &tls);
    assert_eq!(
        state(api, msg)["state"],
        "pending",
        "reloaded after kill -9"
    );
    let tail = std::process::Command::new(procs::BIN)
        .env("BARRAGE_CONTROL_KEY", KEY)
        .args(["tail", "--room", "1", "--uid", "7", "--ack", "--count", "1"])
        .args(["--timeout-ms", "20000", "--control"])
        .arg(format!("http://127.0.0.1:{}", 8080 + offset))
        .output()
        .expect("run tail");
    let out = String::from_utf8_lossy(&tail.stdout);
    assert!(
        tail.status.success(),
        "{out} {}",
        String::from_utf8_lossy(&tail.stderr)
    );
    assert!(out.contains(&format!("\"msg_id\":\"{msg}\"")), "{out}");
    wait_state(api, msg, "acked");
    let _ = std::fs::remove_dir_all(&tmp);
}
