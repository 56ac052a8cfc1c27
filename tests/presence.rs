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
    broker_with(lease_ms, GRACE_MS, "")
}

/// A broker with `extra` top-level config lines.
fn broker_with(lease_ms: u64, grace_ms: u64, extra: &str) -> Role {
    let toml = format!(
        "link_ping_ms = 200\nlink_dead_ms = 1000\ncounts_interval_ms = 100\n{extra}\n\
         presence_grace_ms = {grace_ms}\npresence_lease_ms = {lease_ms}\nroute_by_presence = true\n\
         [[api_keys]]\nkey = \"{READER}\"\nscopes = [\"room\", \"presence\"]\n\
         [[api_keys]]\nkey = \"{PUSHER}\"\nscopes = [\"room\", \"user\"]\n"
    );
    let base = "shards = 1\npin = false\ndriver = \"legacy\"\ningest_addr = \"127.0.0.1:0\"\n\
                link_addr = \"127.0.0.1:0\"\nhttp_addr = \"127.0.0.1:0\"\n";
    start_ok("broker", &format!("{base}{toml}\n{}", http_table(HEAD_MS)))
}

fn edge(node: &str, links: SocketAddr, extra: &str) -> Role {
    // `extra` may set presence_batch_ms itself.
    let batch = match extra.contains("presence_batch_ms") {
        true => "",
        false => "presence_batch_ms = 50\n",
    };
    let toml = format!(
        "node_id = \"{node}\"\nbroker_addrs = [\"{links}\"]\nlink_ping_ms = 200\n\
         link_dead_ms = 1000\n{batch}link_backoff_ms_min = 50\n\
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
    // A grace long enough that a loaded machine both sees the held exit and reconnects inside it.
    const FLAP_GRACE_MS: u64 = 3_000;
    let b = broker_with(LEASE_MS, FLAP_GRACE_MS, "");
    let (links, http) = (b.addrs[1], b.addrs[2]);
    let e1 = edge("p-flap", links, "");
    let v = viewer(e1.addrs[0], 9, "dev-9", 200);
    wait_room(http, 200, 1, 1);
    let seq = last_seq(http);
    // Reconnect from the same device well within the grace. Wait until the broker holds the
    // exit (the viewer still counted, no connection) so the reconnect is a flap, not an overlap
    // of two connections (the edge may seat the new one before it reads the old one's close).
    drop(v);
    wait_room(http, 200, 1, 0);
    let held_at = Instant::now();
    let v = viewer(e1.addrs[0], 9, "dev-9", 200);
    wait_room(http, 200, 1, 1);
    // Past the grace: still nothing for the business.
    let past_grace = held_at + Duration::from_millis(FLAP_GRACE_MS + 400);
    std::thread::sleep(past_grace.saturating_duration_since(Instant::now()));
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
    push_user(http, 31, r#"{"cmd":"DM","text":"hi 31"}"#);
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

/// Pushes `body` to user `uid` over the broker's HTTP API; asserts it was accepted (202).
fn push_user(http: SocketAddr, uid: u64, body: &str) {
    let req = format!(
        "POST /v1/push/user/{uid} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {PUSHER}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (head, _) = request_from([127, 0, 0, 1], http, &req).expect("push");
    assert_eq!(status(&head), 202, "{head}");
}

/// The race that kept `route_by_presence` off by default: a connection pushed to right after
/// its auth, before its edge's presence report (here 1 s later) told the broker, used to miss
/// the push (narrowed away). The broker's catch-up (broker::catchup) sends it when the report
/// arrives.
#[test]
fn a_user_push_right_after_auth_reaches_the_connection_before_its_presence_report() {
    let b = broker(LEASE_MS);
    let (links, http) = (b.addrs[1], b.addrs[2]);
    let e1 = edge("p-f1", links, "presence_batch_ms = 1000");
    // The edge reports presence (it is known to hold someone), so narrowing applies to it.
    let _bob = viewer(e1.addrs[0], 42, "dev-42", 600);
    wait_room(http, 600, 1, 1);
    let mut alice = viewer(e1.addrs[0], 41, "dev-41", 600);
    push_user(http, 41, r#"{"cmd":"DM","text":"hi 41"}"#);
    let got = alice
        .next_message(Instant::now() + WAIT)
        .expect("alice gets the push sent before the broker knew of her");
    assert!(got.contains("hi 41"), "{got}");
    let m = procs::metrics(http);
    assert_eq!(
        procs::metric(&m, "barrage_broker_presence_catchup_sent_total"),
        Some(1.0),
        "{m}"
    );
    drop(e1);
}

/// A Server-Sent Events reader over a raw socket: the response head, then chunked body bytes
/// decoded and split into messages.
struct Sse {
    s: std::net::TcpStream,
    /// Raw bytes not yet de-chunked.
    raw: Vec<u8>,
    /// De-chunked text not yet split into messages.
    text: String,
}

/// One SSE message: its `event:` (None = message), `id:` and `data:`.
#[derive(Debug)]
struct SseMsg {
    event: Option<String>,
    id: Option<u64>,
    data: Value,
}

impl Sse {
    /// Opens `GET path` with `Accept: text/event-stream`; `Err((status, body))` when refused.
    fn open(
        http: SocketAddr,
        path: &str,
        key: &str,
        last_event_id: Option<u64>,
    ) -> Result<Sse, (u16, Value)> {
        use std::io::Write;
        let mut s = procs::connect_from([127, 0, 0, 1], http);
        let resume = last_event_id
            .map(|id| format!("Last-Event-ID: {id}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
             Accept: text/event-stream\r\n{resume}\r\n"
        );
        s.write_all(req.as_bytes()).expect("request");
        let mut sse = Sse {
            s,
            raw: Vec::new(),
            text: String::new(),
        };
        let deadline = Instant::now() + WAIT;
        let head = loop {
            if let Some(i) = sse.raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&sse.raw[..i]).to_string();
                sse.raw.drain(..i + 4);
                break head;
            }
            assert!(sse.fill(deadline), "no response head");
        };
        let code = status(&head);
        if code != 200 {
            let body = String::from_utf8_lossy(&sse.raw).to_string();
            let json = body
                .find('{')
                .and_then(|i| {
                    serde_json::from_str(body[i..].trim_end_matches(['\r', '\n', '0'])).ok()
                })
                .unwrap_or(Value::Null);
            return Err((code, json));
        }
        assert!(head.contains("text/event-stream"), "{head}");
        Ok(sse)
    }

    /// Reads more bytes; false at EOF or the deadline.
    fn fill(&mut self, deadline: Instant) -> bool {
        use std::io::Read;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        self.s.set_read_timeout(Some(left)).ok();
        let mut buf = [0u8; 8192];
        match self.s.read(&mut buf) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.raw.extend_from_slice(&buf[..n]);
                true
            }
        }
    }

    /// Moves whole chunks from `raw` to `text`.
    fn dechunk(&mut self) {
        loop {
            let Some(eol) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let size_line = String::from_utf8_lossy(&self.raw[..eol]).to_string();
            let size = usize::from_str_radix(size_line.trim(), 16).expect("chunk size");
            if self.raw.len() < eol + 2 + size + 2 {
                return;
            }
            let data = self.raw[eol + 2..eol + 2 + size].to_vec();
            self.raw.drain(..eol + 2 + size + 2);
            self.text.push_str(&String::from_utf8_lossy(&data));
        }
    }

    /// The next message (comments and `retry:` skipped), or None by the deadline / at EOF.
    fn next(&mut self, deadline: Instant) -> Option<SseMsg> {
        loop {
            self.dechunk();
            while let Some(i) = self.text.find("\n\n") {
                let block: String = self.text.drain(..i + 2).collect();
                let mut msg = SseMsg {
                    event: None,
                    id: None,
                    data: Value::Null,
                };
                let mut has_data = false;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        msg.event = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        msg.id = v.parse().ok();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        msg.data = serde_json::from_str(v).expect("data is JSON");
                        has_data = true;
                    }
                }
                if has_data {
                    return Some(msg);
                }
            }
            if !self.fill(deadline) {
                return None;
            }
        }
    }
}

#[test]
fn sse_events_resume_with_last_event_id_without_a_gap_and_say_when_they_cannot() {
    let b = broker(LEASE_MS);
    let (links, http) = (b.addrs[1], b.addrs[2]);
    let e1 = edge("p-sse", links, "");
    let deadline = || Instant::now() + WAIT;
    let mut sse = Sse::open(http, "/v1/presence/events?rooms=700", READER, None).expect("open");
    let _elsewhere = viewer(e1.addrs[0], 40, "dev-40", 701);
    let a = viewer(e1.addrs[0], 41, "dev-41", 700);
    let first = sse.next(deadline()).expect("an enter");
    assert_eq!(first.data["type"], "enter", "{first:?}");
    assert_eq!(first.data["uid"], 41, "the room filter holds: {first:?}");
    assert_eq!(first.data["room"], 700);
    assert_eq!(first.id, first.data["seq"].as_u64(), "id: is the seq");
    let id = first.id.expect("id");
    drop(sse);

    // While no one listens: uid 41 leaves (its exit after the grace), uid 42 enters.
    drop(a);
    let _c = viewer(e1.addrs[0], 42, "dev-42", 700);
    wait_room(http, 700, 1, 1);
    // Resume from the last id seen: the two events, in seq order, nothing before.
    let mut sse =
        Sse::open(http, "/v1/presence/events?rooms=700", READER, Some(id)).expect("resume");
    let mut got = vec![];
    while got.len() < 2 {
        let m = sse.next(deadline()).expect("resumed events");
        assert!(m.id.expect("id") > id, "{m:?}");
        got.push((
            m.data["type"].as_str().unwrap_or_default().to_string(),
            m.data["uid"].as_u64().unwrap_or_default(),
        ));
    }
    got.sort();
    assert_eq!(got, vec![pair("enter", 42), pair("exit", 41)]);
    drop(sse);

    // An id this broker never gave (a restart began seqs again at 1): said first, clearly.
    let mut sse = Sse::open(http, "/v1/presence/events", READER, Some(1 << 40)).expect("open");
    let m = sse.next(deadline()).expect("missed");
    assert_eq!(m.event.as_deref(), Some("missed"), "{m:?}");
    assert_eq!(m.data["after"], 1u64 << 40, "{m:?}");
    assert_eq!(m.data["oldest"], 1, "{m:?}");
    // ... then the log from its oldest event.
    let m = sse.next(deadline()).expect("oldest event");
    assert_eq!(m.data["seq"], 1, "{m:?}");

    // Refusals are the API's usual answers, before any stream starts.
    for (key, path, want) in [
        (PUSHER, "/v1/presence/events", 403),
        ("nope", "/v1/presence/events", 401),
        (READER, "/v1/presence/events?rooms=-1", 400),
        (
            READER,
            "/v1/presence/events?after=99999999999999999999999",
            400,
        ),
    ] {
        let (code, body) = Sse::open(http, path, key, None).err().expect("refused");
        assert_eq!(code, want, "{path} with {key}: {body}");
    }
    let m = procs::metrics(http);
    assert_eq!(
        procs::metric(&m, "barrage_broker_presence_streams_opened_total"),
        Some(3.0),
        "{m}"
    );
}

#[test]
fn an_ingest_subscriber_gets_the_same_events_filtered_by_area() {
    let b = broker(LEASE_MS);
    let (ingest, links, http) = (b.addrs[0], b.addrs[1], b.addrs[2]);
    let e1 = edge("p-ing", links, "");
    // A key without the presence scope is refused.
    let mut pusher = broker::IngestClient::connect(ingest, PUSHER).expect("connect");
    let refused = pusher.subscribe(None, &[], &[3]).expect_err("refused");
    assert!(
        matches!(
            refused.push_error(),
            Some(proto::ingest::PushError::ForbiddenScope)
        ),
        "{refused}"
    );
    let mut sub = broker::IngestClient::connect(ingest, READER).expect("connect");
    let start = sub.subscribe(None, &[], &[3]).expect("subscribe");
    assert_eq!(
        start,
        last_seq(http),
        "the stream starts at the newest event"
    );
    // Viewers are in area 3 (see `viewer`): both rooms match the area filter.
    let _a = viewer(e1.addrs[0], 51, "dev-51", 800);
    let _b = viewer(e1.addrs[0], 52, "dev-52", 801);
    let mut seen = vec![];
    while seen.len() < 2 {
        let e: Value = serde_json::from_slice(&sub.next_event().expect("event")).expect("JSON");
        assert_eq!(e["type"], "enter", "{e}");
        assert!(e["seq"].as_u64().expect("seq") > start, "{e}");
        seen.push(e["uid"].as_u64().expect("uid"));
    }
    seen.sort();
    assert_eq!(seen, vec![51, 52]);
    // Pushing on the same connection still works, statuses and events interleaved.
    sub.push(&broker::Message::room(800, r#"{"cmd":"X"}"#))
        .expect("a push on a subscribed connection");
}

#[test]
fn a_stalled_sse_consumer_is_cut_at_its_bound_and_counted() {
    // Exits at once (no grace) so every viewer makes two events; a small lag bound.
    let b = broker_with(LEASE_MS, 0, "presence_stream_lag_events_max = 50");
    let (links, http) = (b.addrs[1], b.addrs[2]);
    let e1 = edge("p-stall", links, "");
    // A consumer whose receive window is tiny and that never reads.
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    sock.set_recv_buffer_size(4096).expect("rcvbuf");
    sock.connect_timeout(&http.into(), Duration::from_secs(5))
        .expect("connect");
    let mut stalled: std::net::TcpStream = sock.into();
    {
        use std::io::Write;
        let req = format!(
            "GET /v1/presence/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {READER}\r\n\
             Accept: text/event-stream\r\n\r\n"
        );
        stalled.write_all(req.as_bytes()).expect("request");
    }
    let stalled_count =
        |m: &str| procs::metric(m, "barrage_broker_presence_streams_stalled_total").unwrap_or(0.0);
    wait_for("the stream is open", || {
        let m = procs::metrics(http);
        match procs::metric(&m, "barrage_broker_presence_streams") {
            Some(n) if n >= 1.0 => Ok(()),
            _ => Err(m),
        }
    });
    // Churn viewers until the broker gives up on the consumer (its buffers fill first).
    let mut uid = 1_000;
    let cut = loop {
        for _ in 0..100 {
            uid += 1;
            drop(viewer(e1.addrs[0], uid, &format!("{uid:0>60}"), 900));
        }
        let m = procs::metrics(http);
        if stalled_count(&m) >= 1.0 {
            break true;
        }
        if uid > 30_000 {
            break false;
        }
    };
    assert!(cut, "the stalled consumer was never cut");
    // Its connection is closed: reading what was buffered ends in EOF.
    assert!(
        procs::closed_within(&mut stalled, WAIT),
        "the cut connection is closed"
    );
    // Others are unaffected: a new stream opens and gets new events.
    let mut sse = Sse::open(http, "/v1/presence/events?rooms=901", READER, None).expect("open");
    let _v = viewer(e1.addrs[0], 7, "dev-7", 901);
    let m = sse.next(Instant::now() + WAIT).expect("event");
    assert_eq!(m.data["uid"], 7, "{m:?}");
}

#[test]
fn online_rank_count_is_pushed_to_a_listed_room_when_it_changes() {
    let b = broker_with(
        LEASE_MS,
        GRACE_MS,
        "count_push_rooms = [950]\ncount_push_ms = 200",
    );
    let links = b.addrs[1];
    let e1 = edge("p-count", links, "counts_interval_ms = 100");
    let mut a = viewer(e1.addrs[0], 61, "dev-61", 950);
    let mut other = viewer(e1.addrs[0], 62, "dev-62", 951);
    let count_of = |v: &mut Viewer, want: u64| {
        let deadline = Instant::now() + WAIT;
        loop {
            let msg = v
                .next_message(deadline)
                .unwrap_or_else(|| panic!("no ONLINE_RANK_COUNT of {want}"));
            let j: Value = serde_json::from_str(&msg).expect("JSON");
            assert_eq!(j["cmd"], "ONLINE_RANK_COUNT", "{msg}");
            if j["data"]["count"] == want {
                return;
            }
        }
    };
    count_of(&mut a, 1);
    let _b = viewer(e1.addrs[0], 63, "dev-63", 950);
    count_of(&mut a, 2);
    // Room 951 is not listed: nothing arrives there.
    assert_eq!(
        other.next_message(Instant::now() + Duration::from_millis(600)),
        None
    );
}

/// `barrage loadtest churn --presence-check`: after churning, with connections still open
/// (a hold longer than the run), the broker's presence equals the connections open.
#[test]
fn a_churn_run_ends_with_presence_equal_to_the_connections_open() {
    let control = start_ok(
        "control",
        &procs::control_toml(&format!("api_keys = [\"{READER}\"]"), HEAD_MS),
    );
    let chttp = control.addrs[0];
    let b = broker(LEASE_MS);
    let (ingest, links, http) = (b.addrs[0], b.addrs[1], b.addrs[2]);
    let _e = edge(
        "p-churn",
        links,
        &format!(
            "control_addr = \"{chttp}\"\npublic_host = \"127.0.0.1\"\ncontrol_heartbeat_ms = 200"
        ),
    );
    wait_for("control lists the edge", || {
        let (head, body) = request_from(
            [127, 0, 0, 1],
            chttp,
            &procs::get("/xlive/web-room/v1/index/getDanmuInfo?id=1000&type=0"),
        )
        .ok_or("no answer")?;
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        match v["data"]["host_list"].as_array() {
            Some(l) if !l.is_empty() => Ok(()),
            _ => Err(format!("{head} {v}")),
        }
    });
    let json = procs::temp_file("churn.json", "");
    let out = std::process::Command::new(procs::BIN)
        .args(["loadtest", "churn", "--control"])
        .arg(format!("http://{chttp}"))
        .arg("--broker-http")
        .arg(http.to_string())
        .arg("--ingest")
        .arg(ingest.to_string())
        .args([
            "--api-key",
            READER,
            "--rooms",
            "3",
            "--connects-per-s",
            "100",
        ])
        .args([
            "--hold-ms",
            "60000",
            "--duration-ms",
            "2000",
            "--warmup-ms",
            "0",
        ])
        .args(["--threads", "1", "--presence-check", "--json"])
        .arg(&json.0)
        .output()
        .expect("run loadtest");
    let report: Value =
        serde_json::from_slice(&std::fs::read(&json.0).unwrap_or_default()).unwrap_or(Value::Null);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let p = &report["presence"];
    assert_eq!(p["equal"], true, "{p}");
    assert!(p["open_connections"].as_u64().unwrap_or(0) >= 50, "{p}");
    assert_eq!(p["open_connections"], p["presence_connections"], "{p}");
}
