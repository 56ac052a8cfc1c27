//! Issue 17's smaller defects on the broker, over real sockets: idempotent retries (HTTP
//! `Idempotency-Key` and ingest `KEYED_PUSH`), failed-Auth limits, the JSON error shape with
//! 405 and a sized 413, and bodies that strict client parsers would choke on.

mod common;

use common::*;
use proto::id::{MsgId, Priority, Reach, Scope};
use proto::ingest::{self, IngestFrame, Push, PushError};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A POST with an `Idempotency-Key`; returns (status, body JSON).
fn post_keyed(addr: SocketAddr, path: &str, idem: &str, body: &str) -> (u16, serde_json::Value) {
    let mut s = TcpStream::connect_timeout(&addr, WAIT).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer {KEY}\r\n\
         Idempotency-Key: {idem}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let split = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&resp[..split]).to_string();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, json(&resp[split + 4..]))
}

/// A raw ingest connection: send frames, read Status frames (None once closed).
struct Raw(TcpStream, Vec<u8>);

impl Raw {
    fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect_timeout(&addr, WAIT).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        Raw(s, Vec::new())
    }
    fn send(&mut self, f: &IngestFrame) {
        let mut out = Vec::new();
        ingest::encode(f, &mut out);
        let _ = self.0.write_all(&out);
    }
    fn status(&mut self) -> Option<(u64, Result<MsgId, PushError>)> {
        loop {
            if let Ok((f, used)) = ingest::decode(&self.1, 1 << 20) {
                self.1.drain(..used);
                if let IngestFrame::Status { req_id, result } = f {
                    return Some((req_id, result));
                }
                continue;
            }
            let mut buf = [0u8; 4096];
            match self.0.read(&mut buf) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.1.extend_from_slice(&buf[..n]),
            }
        }
    }
}

fn auth(req_id: u64, key: &str) -> IngestFrame {
    IngestFrame::Auth {
        req_id,
        api_key: key.into(),
    }
}

fn keyed(req_id: u64, idem: &str, room: u64) -> IngestFrame {
    IngestFrame::KeyedPush {
        idempotency_key: idem.into(),
        push: Push {
            req_id,
            scope: Scope::Room(proto::id::RoomId(room)),
            priority: Priority::Low,
            reach: Reach::BestEffort,
            ttl_ms: 0,
            body: b"{\"cmd\":\"DANMU_MSG\"}".to_vec(),
        },
    }
}

/// Regression: a push retried after a client timeout was delivered twice. With the same key
/// within the window, the retry gets the first msg_id and the edge sees one message.
#[test]
fn a_retried_push_with_the_same_key_is_delivered_once() {
    let broker = broker::start(config()).unwrap();
    let mut edge = TestEdge::connect(broker.link_addr(), "e1");
    edge.sub_room(7);
    edge.sync(0);
    edge.sync(1);
    let web = broker.http_addr();
    let (s1, a) = post_keyed(web, "/v1/push/room/7", "order-1", "{\"n\":1}");
    let (s2, b) = post_keyed(web, "/v1/push/room/7", "order-1", "{\"n\":1}");
    assert_eq!((s1, s2), (202, 202));
    assert_eq!(a["msg_id"], b["msg_id"], "the retry got another msg id");
    // The same key over the ingest socket (another API path, same key space per API key).
    let mut raw = Raw::connect(broker.ingest_addr());
    raw.send(&auth(1, KEY));
    raw.send(&keyed(2, "order-2", 7));
    raw.send(&keyed(3, "order-2", 7));
    raw.send(&keyed(4, "order-3", 7));
    assert_eq!(raw.status().map(|s| s.1), Some(Ok(MsgId(0))));
    let (_, r2) = raw.status().unwrap();
    let (_, r3) = raw.status().unwrap();
    let (_, r4) = raw.status().unwrap();
    assert_eq!(r2, r3);
    assert_ne!(r2, r4);
    // Three distinct messages reach the edge, and nothing more.
    edge.batches_with(3);
    edge.expect_no_batch(Duration::from_millis(300));
    let m = broker.metrics_text();
    assert_eq!(
        metric(&m, "barrage_broker_pushes_deduplicated_total"),
        2.0,
        "{m}"
    );
    // A bad key is refused before anything is remembered.
    let (s, v) = post_keyed(web, "/v1/push/room/7", &"k".repeat(65), "{}");
    assert_eq!((s, v["error"].as_str()), (400, Some("invalid")));
}

/// Regression: nothing limited failed Auths. Now a connection gets `ingest_auth_failures_max`
/// tries, and an address `ingest_auth_failures_per_addr_max` per minute, after which even the
/// right key is refused from it.
#[test]
fn failed_auths_are_limited_per_connection_and_per_address() {
    let mut cfg = config();
    cfg.ingest_auth_failures_max = 3;
    cfg.ingest_auth_failures_per_addr_max = 4;
    let broker = broker::start(cfg).unwrap();
    let mut c = Raw::connect(broker.ingest_addr());
    for i in 0..5 {
        c.send(&auth(i, "guess"));
    }
    for _ in 0..3 {
        assert_eq!(c.status().map(|s| s.1), Some(Err(PushError::Unauthorized)));
    }
    assert_eq!(c.status(), None, "closed after the third failure");
    let mut c = Raw::connect(broker.ingest_addr());
    c.send(&auth(1, "guess"));
    assert_eq!(c.status().map(|s| s.1), Some(Err(PushError::Unauthorized)));
    // The address used its 4 failures: the right key is refused too, and the socket closed.
    let mut c = Raw::connect(broker.ingest_addr());
    c.send(&auth(1, KEY));
    assert_eq!(c.status().map(|s| s.1), Some(Err(PushError::Unauthorized)));
    assert_eq!(c.status(), None);
}

/// One JSON error shape, 405 for a wrong method, a 413 that states size and limit, and
/// bodies with invalid UTF-8 or absurd nesting refused.
#[test]
fn errors_are_json_with_405_and_a_sized_413() {
    let mut cfg = config();
    cfg.message_bytes_max = 100;
    cfg.http_body_bytes_max = 1024;
    let broker = broker::start(cfg).unwrap();
    let web = broker.http_addr();
    let (s, h, b) = http(web, "GET", "/v1/push/room/1", Some(KEY), b"");
    assert_eq!(
        (s, json(&b)["error"].as_str()),
        (405, Some("method_not_allowed"))
    );
    assert!(h.iter().any(|(k, v)| k == "allow" && v == "POST"), "{h:?}");
    let big = format!("{{\"a\":\"{}\"}}", "x".repeat(200));
    let (s, _, b) = http(web, "POST", "/v1/push/room/1", Some(KEY), big.as_bytes());
    let v = json(&b);
    assert_eq!((s, v["error"].as_str()), (413, Some("too_large")));
    assert!(
        v["message"].as_str().unwrap().contains("the limit is 100"),
        "{v}"
    );
    // Above the HTTP body cap (and above 8 MiB over it) the 413 is JSON too.
    let (s, _, b) = http(web, "POST", "/v1/push/room/1", Some(KEY), &vec![b'x'; 2048]);
    assert_eq!((s, json(&b)["error"].as_str()), (413, Some("too_large")));
    let (s, _, b) = http(
        web,
        "POST",
        "/v1/push/room/1",
        Some(KEY),
        b"{\"a\":\"\xff\"}",
    );
    assert_eq!((s, json(&b)["error"].as_str()), (400, Some("invalid")));
    // 86 bytes, under message_bytes_max, nested 41 deep.
    let deep = format!("{{\"a\":{}{}}}", "[".repeat(40), "]".repeat(40));
    let (s, _, b) = http(web, "POST", "/v1/push/room/1", Some(KEY), deep.as_bytes());
    assert_eq!((s, json(&b)["error"].as_str()), (400, Some("invalid")));
    let (s, _, b) = http(web, "GET", "/nope", None, b"");
    assert_eq!((s, json(&b)["error"].as_str()), (404, Some("not_found")));
}

/// Regression (issue 17, defect 2, its hold half): a freshly started broker accepted pushes
/// before any edge had linked, counted them `unrouted` and dropped them. With
/// `startup_hold_ms`, a push accepted before the edge re-linked reaches it once it has.
#[test]
fn pushes_accepted_before_the_edges_relink_are_held_then_routed() {
    let mut cfg = config();
    cfg.shards = 1;
    cfg.startup_hold_ms = 5_000;
    let broker = broker::start(cfg).unwrap();
    let (s, _, b) = http(
        broker.http_addr(),
        "POST",
        "/v1/push/room/9",
        Some(KEY),
        b"{\"n\":1}",
    );
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
    // The edge comes back a moment later and re-sends its interest.
    std::thread::sleep(Duration::from_millis(200));
    let mut edge = TestEdge::connect(broker.link_addr(), "e1");
    edge.sub_room(9);
    let got = edge.batches_with(1);
    assert_eq!(got.len(), 1);
    let m = broker.metrics_text();
    assert_eq!(
        metric(&m, "barrage_broker_batches_unrouted_total"),
        0.0,
        "{m}"
    );
}
