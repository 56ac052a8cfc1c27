//! Every refusal path, over the ingest socket and over HTTP, and what is counted.

mod common;

use broker::{ApiKey, ClientError, IngestClient, Message, ScopeKind};
use common::*;
use proto::id::RoomId;
use proto::ingest::PushError;
use std::time::Duration;

fn refused(r: Result<proto::id::MsgId, ClientError>) -> PushError {
    match r {
        Err(ClientError::Rejected(e)) => e,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn bad_key_forbidden_scope_too_large_not_an_object() {
    let mut cfg = config();
    cfg.api_keys.push(ApiKey {
        key: "rooms-only".into(),
        scopes: vec![ScopeKind::Room],
        rate_per_s: 0.0,
        burst: 0.0,
    });
    cfg.message_bytes_max = 1024;
    let broker = broker::start(cfg).unwrap();
    let (ingest, web) = (broker.ingest_addr(), broker.http_addr());

    // Bad key.
    match IngestClient::connect(ingest, "wrong") {
        Err(ClientError::Rejected(PushError::Unauthorized)) => {}
        Err(e) => panic!("expected Unauthorized, got {e:?}"),
        Ok(_) => panic!("a bad key connected"),
    }
    let (s, _, b) = http(web, "POST", "/v1/push/room/1", Some("wrong"), b"{}");
    assert_eq!((s, json(&b)["error"].as_str()), (401, Some("unauthorized")));
    let (s, _, _) = http(web, "POST", "/v1/push/room/1", None, b"{}");
    assert_eq!(s, 401);

    // Forbidden scope.
    let mut rooms_only = IngestClient::connect(ingest, "rooms-only").unwrap();
    assert_eq!(
        refused(rooms_only.push(&Message::global(&b"{}"[..]))),
        PushError::ForbiddenScope
    );
    assert!(
        rooms_only.push(&Message::room(1, &b"{}"[..])).is_ok(),
        "the connection survives a refusal"
    );
    let (s, _, b) = http(web, "POST", "/v1/push/area/2", Some("rooms-only"), b"{}");
    assert_eq!(
        (s, json(&b)["error"].as_str()),
        (403, Some("forbidden_scope"))
    );

    // Too large.
    let big = format!("{{\"cmd\":\"DANMU_MSG\",\"pad\":\"{}\"}}", "x".repeat(2000));
    let mut c = IngestClient::connect(ingest, KEY).unwrap();
    assert_eq!(
        refused(c.push(&Message::room(1, big.clone()))),
        PushError::TooLarge
    );
    let (s, _, b) = http(web, "POST", "/v1/push/room/1", Some(KEY), big.as_bytes());
    assert_eq!((s, json(&b)["error"].as_str()), (413, Some("too_large")));

    // Not a JSON object.
    for bad in [&b"[1,2,3]"[..], b"\"text\"", b"{\"a\":", b"not json"] {
        assert!(matches!(
            refused(c.push(&Message::room(1, bad))),
            PushError::Invalid(_)
        ));
        let (s, _, b) = http(web, "POST", "/v1/push/room/1", Some(KEY), bad);
        assert_eq!((s, json(&b)["error"].as_str()), (400, Some("invalid")));
    }
    // Bad target or query.
    let (s, _, _) = http(web, "POST", "/v1/push/room/abc", Some(KEY), b"{}");
    assert_eq!(s, 400);
    let (s, _, _) = http(
        web,
        "POST",
        "/v1/push/room/1?priority=urgent",
        Some(KEY),
        b"{}",
    );
    assert_eq!(s, 400);
    let (s, _, _) = http(web, "GET", "/v1/nothing", Some(KEY), b"");
    assert_eq!(s, 404);

    let text = broker.metrics_text();
    assert_eq!(
        metric(
            &text,
            "barrage_broker_pushes_rejected_total{reason=\"unauthorized\"}"
        ),
        3.0
    );
    assert_eq!(
        metric(
            &text,
            "barrage_broker_pushes_rejected_total{reason=\"forbidden_scope\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &text,
            "barrage_broker_pushes_rejected_total{reason=\"too_large\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &text,
            "barrage_broker_pushes_rejected_total{reason=\"invalid\"}"
        ),
        10.0
    );
    assert_eq!(
        metric(
            &text,
            "barrage_broker_pushes_accepted_total{via=\"socket\"}"
        ),
        1.0
    );
    broker.shutdown();
}

#[test]
fn rate_limits_per_key_and_per_room_with_retry_after() {
    let mut cfg = config();
    cfg.api_keys = vec![
        ApiKey {
            key: "slow".into(),
            scopes: ScopeKind::ALL.to_vec(),
            rate_per_s: 0.5,
            burst: 2.0,
        },
        ApiKey::all_scopes(KEY),
    ];
    cfg.room_rate_per_s = 0.5;
    cfg.room_burst = 3.0;
    let broker = broker::start(cfg).unwrap();
    let mut slow = IngestClient::connect(broker.ingest_addr(), "slow").unwrap();
    slow.push(&Message::room(1, &b"{}"[..])).unwrap();
    slow.push(&Message::room(2, &b"{}"[..])).unwrap();
    match refused(slow.push(&Message::room(3, &b"{}"[..]))) {
        PushError::RateLimited { retry_after_ms } => {
            assert!((1..=2000).contains(&retry_after_ms), "{retry_after_ms}")
        }
        e => panic!("{e:?}"),
    }
    let (s, h, b) = http(
        broker.http_addr(),
        "POST",
        "/v1/push/room/3",
        Some("slow"),
        b"{}",
    );
    assert_eq!((s, json(&b)["error"].as_str()), (429, Some("rate_limited")));
    let retry: u64 = header(&h, "retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "{retry}");

    // The room cap binds every key: room 1 already took one push, two more fill it.
    let mut fast = IngestClient::connect(broker.ingest_addr(), KEY).unwrap();
    fast.push(&Message::room(1, &b"{}"[..])).unwrap();
    fast.push(&Message::room(1, &b"{}"[..])).unwrap();
    assert!(matches!(
        refused(fast.push(&Message::room(1, &b"{}"[..]))),
        PushError::RateLimited { .. }
    ));
    fast.push(&Message::room(4, &b"{}"[..])).unwrap();
    broker.shutdown();
}

#[test]
fn full_queue_is_overloaded() {
    let mut cfg = config();
    // A zero-capacity queue refuses every push: the deterministic way to fill it.
    cfg.queue_messages_max = 0;
    let broker = broker::start(cfg).unwrap();
    let mut c = IngestClient::connect(broker.ingest_addr(), KEY).unwrap();
    assert_eq!(
        refused(c.push(&Message::room(1, &b"{}"[..]))),
        PushError::Overloaded
    );
    let (s, h, b) = http(
        broker.http_addr(),
        "POST",
        "/v1/push/room/1",
        Some(KEY),
        b"{}",
    );
    assert_eq!((s, json(&b)["error"].as_str()), (503, Some("overloaded")));
    assert_eq!(header(&h, "retry-after"), Some("1"));
    assert_eq!(
        metric(
            &broker.metrics_text(),
            "barrage_broker_pushes_rejected_total{reason=\"overloaded\"}"
        ),
        2.0
    );
    broker.shutdown();
}

/// With a tiny queue and a burst of pipelined pushes some are refused; every accepted one
/// (and only those) reaches the edge.
#[test]
fn nothing_accepted_is_lost_under_overload() {
    let mut cfg = config();
    cfg.queue_messages_max = 4;
    cfg.batch_window_ms = 5;
    let broker = broker::start(cfg).unwrap();
    let mut edge = TestEdge::connect(broker.link_addr(), "edge-o");
    edge.sub_room(1);
    let mut c = IngestClient::connect(broker.ingest_addr(), KEY).unwrap();
    let msgs: Vec<Message> = (0..3000).map(|i| Message::room(1, danmu(1, i))).collect();
    let results = c.push_many(&msgs).unwrap();
    let accepted: Vec<Vec<u8>> = msgs
        .iter()
        .zip(&results)
        .filter(|(_, r)| r.is_ok())
        .map(|(m, _)| m.body.clone())
        .collect();
    let refused = results
        .iter()
        .filter(|r| matches!(r, Err(PushError::Overloaded)))
        .count();
    assert_eq!(
        accepted.len() + refused,
        msgs.len(),
        "only Overloaded refusals expected"
    );
    let got: Vec<Vec<u8>> = edge
        .batches_with(accepted.len())
        .iter()
        .flat_map(|(_, _, b)| unpack(b).1)
        .collect();
    assert_eq!(got, accepted);
    edge.expect_no_batch(Duration::from_millis(100));
    eprintln!("accepted {} refused {refused}", accepted.len());
    let _ = RoomId(1);
    broker.shutdown();
}

#[test]
fn client_reconnects_after_the_connection_breaks() {
    let broker = broker::start(config()).unwrap();
    let addr = broker.ingest_addr();
    let mut c = IngestClient::connect(addr, KEY).unwrap();
    c.push(&Message::room(1, &b"{}"[..])).unwrap();
    // A malformed frame closes only that peer's connection.
    {
        use std::io::Write;
        let mut raw = std::net::TcpStream::connect(addr).unwrap();
        raw.write_all(&[0, 0, 0, 2, 9, 9]).unwrap();
    }
    eventually("the broker to drop the malformed connection", || {
        metric(
            &broker.metrics_text(),
            "barrage_broker_ingest_protocol_errors_total",
        ) >= 1.0
    });
    c.push(&Message::room(1, &b"{}"[..])).unwrap();
    broker.shutdown();

    // The broker restarts on the same port: the client's old connection is dead, and the
    // next push reconnects and succeeds.
    let mut cfg = config();
    cfg.ingest_addr = addr;
    let broker2 = broker::start(cfg).unwrap();
    c.push(&Message::room(1, &b"{}"[..])).unwrap();
    assert!(c.is_connected());
    assert_eq!(
        metric(
            &broker2.metrics_text(),
            "barrage_broker_pushes_accepted_total{via=\"socket\"}"
        ),
        1.0
    );
    broker2.shutdown();
}

#[test]
fn an_ingest_connection_must_authenticate_in_time() {
    let mut cfg = config();
    cfg.ingest_auth_ms_max = 200;
    let broker = broker::start(cfg).unwrap();
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(broker.ingest_addr()).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut b = [0u8; 64];
    // Closed without a word once the deadline passes.
    assert_eq!(s.read(&mut b).unwrap_or(0), 0);
    assert_eq!(
        metric(
            &broker.metrics_text(),
            "barrage_broker_ingest_protocol_errors_total"
        ),
        1.0
    );
    broker.shutdown();
}
