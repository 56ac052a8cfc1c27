//! Presence end to end (issue 10): one broker and several edges as real `barrage` processes on
//! loopback, real viewers, and the business API (`/v1/presence/...`). Short leases and grace
//! so each test runs in a few seconds; every wait is bounded and polls for the state it wants
//! (no assertion depends on how fast the machine is).

mod common;
#[path = "faults/common.rs"]
mod procs;

use common::Viewer;
use procs::{edge_toml, http_table, request_from, start_ok, status, Role, HEAD_MS, STRONG};
use proto::id::{AreaId, DeviceId, RoomId, UserId};
use proto::token::{Claims, KeySet};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// A key with the presence scope, and one without.
const READER: &str = "presence-reader-key-0123456789abcdef0123456789";
const PUSHER: &str = "push-only-key-0123456789abcdef0123456789abcdef";
const GRACE_MS: u64 = 800;
const LEASE_MS: u64 = 1_500;
const WAIT: Duration = Duration::from_secs(20);

fn broker(lease_ms: u64) -> Role {
    let toml = format!(
        "link_ping_ms = 200\nlink_dead_ms = 1000\ncounts_interval_ms = 100\n\
         presence_grace_ms = {GRACE_MS}\npresence_lease_ms = {lease_ms}\nroute_by_presence = true\n\
         [[api_keys]]\nkey = \"{READER}\"\nscopes = [\"room\", \"presence\"]\n\
         [[api_keys]]\nkey = \"{PUSHER}\"\nscopes = [\"room\", \"user\"]\n"
    );
    let base = "shards = 1\npin = false\ndriver = \"legacy\"\ningest_addr = \"127.0.0.1:0\"\n\
                link_addr = \"127.0.0.1:0\"\nhttp_addr = \"127.0.0.1:0\"\n";
    start_ok("broker", &format!("{base}{toml}\n{}", http_table(HEAD_MS)))
}

fn edge(node: &str, links: SocketAddr, extra: &str) -> Role {
    let toml = format!(
        "node_id = \"{node}\"\nbroker_addrs = [\"{links}\"]\nlink_ping_ms = 200\n\
         link_dead_ms = 1000\npresence_batch_ms = 50\nlink_backoff_ms_min = 50\n\
         link_backoff_ms_max = 200\n{extra}"
    );
    start_ok("edge", &edge_toml(&toml, HEAD_MS))
}

/// A viewer of `room` on `edge` (its TCP address), authenticated as `uid` from `device`.
fn viewer(edge: SocketAddr, uid: u64, device: &str, room: u64) -> Viewer {
    let keys = KeySet::parse(&format!("1:{STRONG}")).expect("keys");
    let token = keys.sign(&Claims {
        uid: UserId(uid),
        device: DeviceId(device.into()),
        room: RoomId(room),
        area: AreaId(3),
        expires_at_s: common::unix_now_s() + 600,
    });
    let mut v = Viewer::tcp(edge);
    let body = loadtest::client::auth_body(uid, room, 3, &token, device);
    assert_eq!(v.auth(&body), 0, "auth of uid {uid}");
    v
}

/// `GET path` on the broker's HTTP API with `key`: (status, JSON body).
fn get(http: SocketAddr, path: &str, key: Option<&str>) -> (u16, Value) {
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
    let (head, body) = request_from([127, 0, 0, 1], http, &req).expect("response");
    (
        status(&head),
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

fn room(http: SocketAddr, room: u64) -> Value {
    let (s, v) = get(http, &format!("/v1/presence/room/{room}"), Some(READER));
    assert_eq!(s, 200, "{v}");
    v
}

/// Polls until `f` holds, or panics with what it last saw.
fn wait_for(what: &str, mut f: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + WAIT;
    loop {
        match f() {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => panic!("{what}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn wait_room(http: SocketAddr, id: u64, viewers: u64, connections: u64) -> Value {
    let mut last = Value::Null;
    wait_for(
        &format!("room {id} at {viewers} viewers / {connections} connections"),
        || {
            last = room(http, id);
            if last["viewers"] == viewers && last["connections"] == connections {
                Ok(())
            } else {
                Err(last.to_string())
            }
        },
    );
    last
}

/// Every event after `after` for `room`: (type, uid) in order.
fn events(http: SocketAddr, after: u64, room: u64) -> Vec<(String, u64)> {
    let (s, v) = get(
        http,
        &format!("/v1/presence/events?after={after}&rooms={room}"),
        Some(READER),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["missed"], false, "{v}");
    v["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap_or_default().to_string(),
                e["uid"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect()
}

fn last_seq(http: SocketAddr) -> u64 {
    let (_, v) = get(http, "/v1/presence/events?limit=1", Some(READER));
    v["last_seq"].as_u64().expect("last_seq")
}

fn pair(kind: &str, uid: u64) -> (String, u64) {
    (kind.to_string(), uid)
}

#[test]
fn viewers_on_two_edges_are_counted_per_user_and_exit_once() {
    let b = broker(LEASE_MS);
    let (links, http) = (b.addrs[1], b.addrs[2]);
    let e1 = edge("p-e1", links, "");
    let e2 = edge("p-e2", links, "");
    let a = viewer(e1.addrs[0], 7, "dev-7", 100);
    let bob = viewer(e2.addrs[0], 8, "dev-8", 100);
    // User 7 again, from a second device on the other edge: one viewer, two connections.
    let a2 = viewer(e2.addrs[0], 7, "dev-7b", 100);
    let v = wait_room(http, 100, 2, 3);
    wait_for("edge 2 reports holding two connections", || {
        let m = procs::metrics(e2.addrs[2]);
        if procs::metric(&m, "barrage_edge_presence_records{shard=\"0\"}") == Some(2.0) {
            Ok(())
        } else {
            Err(m)
        }
    });
    assert_eq!(v["users"], serde_json::json!([7, 8]));
    let (s, u) = get(http, "/v1/presence/user/7", Some(READER));
    assert_eq!(s, 200);
    let mut edges: Vec<&str> = u["connections"]
        .as_array()
        .expect("connections")
        .iter()
        .map(|c| c["edge"].as_str().unwrap_or_default())
        .collect();
    edges.sort();
    assert_eq!(edges, ["p-e1", "p-e2"], "{u}");
    let (_, top) = get(http, "/v1/presence/top?limit=5", Some(READER));
    assert_eq!(top["rooms"][0]["room"], 100, "{top}");
    // The two edges report independently: their enters may come in either order.
    let mut first = events(http, 0, 100);
    first.sort();
    assert_eq!(first, vec![pair("enter", 7), pair("enter", 8)]);

    // The second device leaves: still one viewer, no event. Then bob leaves for good: his exit
    // is held for the grace, then logged exactly once.
    drop(a2);
    wait_room(http, 100, 2, 2);
    drop(bob);
    wait_room(http, 100, 1, 1);
    let all = events(http, 0, 100);
    assert_eq!(all.len(), 3, "{all:?}");
    assert_eq!(all[2], pair("exit", 8), "{all:?}");
    // The first page of the room is paged by uid.
    let (_, page) = get(http, "/v1/presence/room/100?after=7&limit=1", Some(READER));
    assert_eq!(page["users"], serde_json::json!([]), "{page}");
    drop(a);
    wait_room(http, 100, 0, 0);
    drop((e1, e2));
}

#[test]
fn presence_api_refuses_bad_keys_and_bad_ids_with_clear_errors() {
    let b = broker(LEASE_MS);
    let http = b.addrs[2];
    let cases: [(&str, Option<&str>, u16, &str); 9] = [
        ("/v1/presence/room/1", None, 401, "unauthorized"),
        ("/v1/presence/room/1", Some("nope"), 401, "unauthorized"),
        ("/v1/presence/room/1", Some(PUSHER), 403, "forbidden_scope"),
        ("/v1/presence/room/-1", Some(READER), 400, "invalid"),
        (
            "/v1/presence/room/99999999999999999999999",
            Some(READER),
            400,
            "invalid",
        ),
        ("/v1/presence/user/0", Some(READER), 400, "invalid"),
        ("/v1/presence/top?limit=0", Some(READER), 400, "invalid"),
        (
            "/v1/presence/events?rooms=1,x",
            Some(READER),
            400,
            "invalid",
        ),
        ("/v1/presence/nothing", Some(READER), 404, "not_found"),
    ];
    for (path, key, want, label) in cases {
        let (s, v) = get(http, path, key);
        assert_eq!((s, v["error"].as_str()), (want, Some(label)), "{path}: {v}");
    }
    let (s, v) = get(http, "/v1/presence/room/18446744073709551615", Some(READER));
    assert_eq!((s, &v["viewers"]), (200, &serde_json::json!(0)), "{v}");
    let m = procs::metrics(http);
    assert!(
        procs::metric(&m, "barrage_broker_presence_query_errors_total").unwrap_or(0.0) >= 9.0,
        "{m}"
    );
}

#[test]
fn a_flapping_viewer_makes_no_events() {
    let b = broker(LEASE_MS);
    let (links, http) = (b.addrs[1], b.addrs[2]);
    let e1 = edge("p-flap", links, "");
    let v = viewer(e1.addrs[0], 9, "dev-9", 200);
    wait_room(http, 200, 1, 1);
    let seq = last_seq(http);
    // Reconnect from the same device well within the grace.
    drop(v);
    let v = viewer(e1.addrs[0], 9, "dev-9", 200);
    wait_room(http, 200, 1, 1);
    // Past the grace: still nothing for the business.
    std::thread::sleep(Duration::from_millis(GRACE_MS + 400));
    assert_eq!(events(http, seq, 200), vec![]);
    let m = procs::metrics(http);
    assert!(
        procs::metric(&m, "barrage_broker_presence_flaps_compensated_total").unwrap_or(0.0) >= 1.0,
        "{m}"
    );
    drop(v);
}

#[test]
fn kill_9_of_an_edge_exits_its_viewers_after_the_lease_and_a_restart_enters_them_once() {
    let b = broker(LEASE_MS);
    let (links, http) = (b.addrs[1], b.addrs[2]);
    let mut e1 = edge("p-k1", links, "");
    let e2 = edge("p-k2", links, "");
    let v11 = viewer(e1.addrs[0], 11, "dev-11", 300);
    let v12 = viewer(e1.addrs[0], 12, "dev-12", 300);
    let v13 = viewer(e2.addrs[0], 13, "dev-13", 300);
    wait_room(http, 300, 3, 3);
    let seq = last_seq(http);

    e1.child.kill().expect("kill -9");
    let _ = e1.child.wait();
    drop((v11, v12));
    wait_room(http, 300, 1, 1);
    let mut exits = events(http, seq, 300);
    exits.sort();
    assert_eq!(exits, vec![pair("exit", 11), pair("exit", 12)]);

    // The same node id comes back; its viewers reconnect: one enter each.
    let seq = last_seq(http);
    let e1 = edge("p-k1", links, "");
    let v11 = viewer(e1.addrs[0], 11, "dev-11", 300);
    let v12 = viewer(e1.addrs[0], 12, "dev-12", 300);
    wait_room(http, 300, 3, 3);
    std::thread::sleep(Duration::from_millis(GRACE_MS + 400));
    let mut enters = events(http, seq, 300);
    enters.sort();
    assert_eq!(enters, vec![pair("enter", 11), pair("enter", 12)]);
    drop((v11, v12, v13, e2));
}

#[test]
fn an_edge_that_relinks_rereports_without_counting_twice() {
    // A lease longer than the link's dead time: the broker cuts the stalled edge's links, the
    // edge re-links and re-reports under a new incarnation before the lease ends.
    let b = broker(4_000);
    let (links, http) = (b.addrs[1], b.addrs[2]);
    let e1 = edge("p-r1", links, "");
    let viewers: Vec<Viewer> = (21..24)
        .map(|uid| viewer(e1.addrs[0], uid, &format!("dev-{uid}"), 400))
        .collect();
    wait_room(http, 400, 3, 3);
    let seq = last_seq(http);
    let frames = |m: &str| procs::metric(m, "barrage_broker_presence_frames_total").unwrap_or(0.0);
    let before = frames(&procs::metrics(http));

    let pid = e1.child.id().to_string();
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .map(|s| s.success());
        assert_eq!(ok.ok(), Some(true), "kill {sig}");
    };
    signal("-STOP");
    // Past the broker's link_dead_ms (1000): it cuts the links.
    std::thread::sleep(Duration::from_millis(1_500));
    signal("-CONT");
    let m = procs::metrics(http);
    assert!(
        procs::metric(&m, "barrage_broker_link_cuts_total{reason=\"dead\"}").unwrap_or(0.0) >= 1.0,
        "{m}"
    );
    // The re-report arrives (a new PRESENCE frame), the room stays at 3 and, past the grace,
    // the business saw nothing.
    wait_for("a re-report", || {
        let m = procs::metrics(http);
        if frames(&m) > before {
            Ok(())
        } else {
            Err(m)
        }
    });
    wait_room(http, 400, 3, 3);
    std::thread::sleep(Duration::from_millis(GRACE_MS + 400));
    wait_room(http, 400, 3, 3);
    assert_eq!(events(http, seq, 400), vec![]);
    drop(viewers);
}

#[test]
fn a_user_push_goes_only_to_the_edge_that_holds_the_user() {
    let b = broker(LEASE_MS);
    let (links, http) = (b.addrs[1], b.addrs[2]);
    let e1 = edge("p-u1", links, "");
    let e2 = edge("p-u2", links, "");
    let mut alice = viewer(e1.addrs[0], 31, "dev-31", 500);
    let _other = viewer(e2.addrs[0], 32, "dev-32", 500);
    wait_room(http, 500, 2, 2);
    let body = r#"{"cmd":"DM","text":"hi 31"}"#;
    let req = format!(
        "POST /v1/push/user/31 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {PUSHER}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (head, _) = request_from([127, 0, 0, 1], http, &req).expect("push");
    assert_eq!(status(&head), 202, "{head}");
    let got = alice
        .next_message(Instant::now() + WAIT)
        .expect("alice gets her push");
    assert!(got.contains("hi 31"), "{got}");
    let m = procs::metrics(http);
    assert_eq!(
        procs::metric(&m, "barrage_broker_presence_narrowed_batches_total"),
        Some(1.0),
        "the batch skipped the edge without user 31: {m}"
    );
    drop((e1, e2));
}
