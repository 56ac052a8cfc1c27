//! Bad input, timeouts and slow readers: each closes that peer only, with the right code or
//! reply, and is counted in /metrics. Every test runs under both drivers.

mod common;

use common::*;
use net::runtime::Driver;
use proto::auth;
use proto::id::Encoding;
use proto::packet;
use proto::ws::{self, Opcode};
use std::time::Duration;

const ROOM: u64 = 42;

/// A viewer that must stay healthy while its neighbours misbehave.
fn healthy(edge: &edge::Handle, ws: bool) -> Client {
    let mut c = Client::connect(edge.tcp_addr(), edge.ws_addr(), ws);
    c.auth_ok(1, ROOM, 0, 1);
    c
}

fn ws_with(edge: &edge::Handle, frame: &[u8]) -> Client {
    let mut c = Client::ws(edge.ws_addr());
    c.write(frame);
    c
}

fn bad_input_body(driver: Driver) {
    let broker = TestBroker::start(1);
    let edge = edge::start(edge_config(driver, vec![broker.addr_string()])).unwrap();
    broker.wait_links(2);
    let mut good_tcp = healthy(&edge, false);
    let mut good_ws = healthy(&edge, true);

    // Malformed packet (header_len 15) on TCP: closed.
    let mut c = Client::tcp(edge.tcp_addr());
    let mut p = auth::heartbeat_request();
    p[4..6].copy_from_slice(&15u16.to_be_bytes());
    c.write(&p);
    assert_eq!(c.expect_closed(), None);

    // Oversized packet (packet_len above frame_bytes_max) on TCP: closed from the header alone.
    let mut c = Client::tcp(edge.tcp_addr());
    let mut p = auth::heartbeat_request();
    p[0..4].copy_from_slice(&(10_000_000u32).to_be_bytes());
    c.write(&p[..16]);
    assert_eq!(c.expect_closed(), None);

    // The same inside a WebSocket message: 1009.
    let mut c = ws_with(
        &edge,
        &ws::encode_client_frame(Opcode::Binary, &p[..16], [1, 2, 3, 4]),
    );
    assert_eq!(c.expect_closed(), Some(ws::close::MESSAGE_TOO_BIG));

    // Oversized WebSocket frame (length in the header above ws_message_bytes_max): 1009.
    let mut big = vec![0x82u8, 0xFF];
    big.extend_from_slice(&(1u64 << 40).to_be_bytes());
    big.extend_from_slice(&[1, 2, 3, 4]);
    let mut c = ws_with(&edge, &big);
    assert_eq!(c.expect_closed(), Some(ws::close::MESSAGE_TOO_BIG));

    // Unmasked client frame: 1002.
    let mut c = ws_with(
        &edge,
        &ws::server_frame(Opcode::Binary, &auth::heartbeat_request()),
    );
    assert_eq!(c.expect_closed(), Some(ws::close::PROTOCOL_ERROR));

    // Reserved opcode 0x3: 1002.
    let mut f = ws::encode_client_frame(Opcode::Binary, b"abc", [1, 2, 3, 4]);
    f[0] = 0x80 | 0x3;
    let mut c = ws_with(&edge, &f);
    assert_eq!(c.expect_closed(), Some(ws::close::PROTOCOL_ERROR));

    // Close with a code that must not be sent (1005): 1002.
    let mut c = ws_with(
        &edge,
        &ws::encode_client_frame(Opcode::Close, &1005u16.to_be_bytes(), [1, 2, 3, 4]),
    );
    assert_eq!(c.expect_closed(), Some(ws::close::PROTOCOL_ERROR));

    // Control frame longer than 125 bytes: 1002.
    let mut c = ws_with(
        &edge,
        &ws::encode_client_frame(Opcode::Ping, &[0u8; 126], [1, 2, 3, 4]),
    );
    assert_eq!(c.expect_closed(), Some(ws::close::PROTOCOL_ERROR));

    // Text message: 1003 (binary only).
    let mut c = ws_with(
        &edge,
        &ws::encode_client_frame(Opcode::Text, b"hi", [1, 2, 3, 4]),
    );
    assert_eq!(c.expect_closed(), Some(1003));

    // Wrong path: 404; not an upgrade: 400.
    let mut c = Client::ws_raw(edge.ws_addr());
    c.write(&ws_upgrade_request("/nope"));
    assert!(c.read_http_head().unwrap().starts_with("HTTP/1.1 404"));
    let mut c = Client::ws_raw(edge.ws_addr());
    c.write(b"GET /sub HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(c.read_http_head().unwrap().starts_with("HTTP/1.1 400"));

    // Packet before auth: closed.
    let mut c = Client::tcp(edge.tcp_addr());
    c.send_packet(&auth::heartbeat_request());
    assert_eq!(c.expect_closed(), None);

    // Auth failures: op 8 {"code":-101}, then close (WS: close 1008 after the reply).
    let failures: Vec<(Vec<u8>, &str)> = vec![
        (
            auth_packet(1, ROOM, 0, "not-a-token".into()),
            "token_malformed",
        ),
        (
            auth_packet(1, ROOM, 0, expired_token(1, ROOM)),
            "token_expired",
        ),
        (
            auth_packet(1, ROOM + 1, 0, token(1, ROOM, 1)),
            "room_mismatch",
        ),
        (auth_packet(2, ROOM, 0, token(1, ROOM, 1)), "uid_mismatch"),
        (
            packet::encode_vec(1, packet::op::AUTH, 1, b"{\"roomid\":"),
            "body_malformed",
        ),
    ];
    for ws in [false, true] {
        for (pkt, _) in &failures {
            let mut c = Client::connect(edge.tcp_addr(), edge.ws_addr(), ws);
            c.send_packet(pkt);
            assert_eq!(c.recv(WAIT), Got::Bytes(auth::auth_reply(-101)));
            assert_eq!(
                c.expect_closed(),
                if ws {
                    Some(ws::close::POLICY_VIOLATION)
                } else {
                    None
                }
            );
        }
    }
    // A guest token (uid 0) binds the room only: any body uid is accepted.
    let mut guest = Client::tcp(edge.tcp_addr());
    assert_eq!(
        guest.auth(12345, ROOM, 0, token(0, ROOM, 1)),
        auth::auth_reply(0)
    );

    // The healthy viewers saw none of it.
    let batch = room_batch(ROOM, 1, Encoding::Plain, 64);
    broker.wait_seen("SUB", |s| s.iter().any(|x| matches!(x, Seen::Sub(..))));
    broker.send(&batch);
    assert_eq!(
        good_tcp.recv_exact(batch.packet.len(), WAIT).unwrap(),
        &batch.packet[..]
    );
    assert_eq!(good_ws.recv(WAIT), Got::Bytes(batch.packet.to_vec()));
    // Without fleet COUNTS from the broker, heartbeats report the node's viewers of the room
    // (summed over shards): the two healthy viewers and the guest.
    eventually("node-wide online count", || {
        good_tcp.heartbeat() == 3 && good_ws.heartbeat() == 3
    });

    let m = edge.metrics_text();
    for (_, label) in &failures {
        assert_eq!(
            metric(
                &m,
                &format!("barrage_edge_auth_failed_total{{reason=\"{label}\"}}")
            ),
            2.0,
            "{label}\n{m}"
        );
    }
    let closes = |r: &str| metric(&m, &format!("barrage_edge_closes_total{{reason=\"{r}\"}}"));
    assert_eq!(closes("bad_packet"), 1.0, "{m}");
    assert_eq!(closes("packet_too_long"), 2.0, "{m}");
    assert_eq!(closes("ws_too_big"), 1.0, "{m}");
    assert_eq!(closes("ws_protocol"), 4.0, "{m}");
    assert_eq!(closes("ws_bad_data"), 1.0, "{m}");
    assert_eq!(closes("bad_path"), 1.0, "{m}");
    assert_eq!(closes("bad_handshake"), 1.0, "{m}");
    assert_eq!(closes("not_authed"), 1.0, "{m}");
    assert_eq!(closes("auth_failed"), 10.0, "{m}");
    edge.shutdown();
}

#[test]
fn bad_input_closes_only_that_peer_uring() {
    with_driver(Driver::Uring, bad_input_body);
}

#[test]
fn bad_input_closes_only_that_peer_legacy() {
    with_driver(Driver::Legacy, bad_input_body);
}

fn timeouts_body(driver: Driver) {
    let mut cfg = edge_config(driver, vec![]);
    cfg.auth_ms_max = 400;
    cfg.handshake_ms_max = 300;
    cfg.heartbeat_timeout_ms = 700;
    let edge = edge::start(cfg).unwrap();

    // No auth within auth_ms_max: closed (WS after the upgrade: 1008).
    let mut silent_tcp = Client::tcp(edge.tcp_addr());
    let mut silent_ws = Client::ws(edge.ws_addr());
    // Slowloris: an upgrade head that never completes: 408 at handshake_ms_max.
    let mut slow = Client::ws_raw(edge.ws_addr());
    slow.write(b"GET /sub HTTP/1.1\r\nHost: x\r\n");
    // Authenticated, then silent: dropped after heartbeat_timeout_ms; a peer that keeps
    // heartbeating stays.
    let mut quiet = Client::tcp(edge.tcp_addr());
    quiet.auth_ok(1, ROOM, 0, 1);
    let mut quiet_ws = Client::ws(edge.ws_addr());
    quiet_ws.auth_ok(2, ROOM, 0, 1);
    let mut alive = Client::ws(edge.ws_addr());
    alive.auth_ok(3, ROOM, 0, 1);

    assert!(slow.read_http_head().unwrap().starts_with("HTTP/1.1 408"));
    assert_eq!(silent_tcp.expect_closed(), None);
    assert_eq!(silent_ws.expect_closed(), Some(ws::close::POLICY_VIOLATION));
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_millis(1500) {
        alive.heartbeat();
        std::thread::sleep(Duration::from_millis(150));
    }
    assert_eq!(quiet.expect_closed(), None);
    assert_eq!(quiet_ws.expect_closed(), Some(ws::close::GOING_AWAY));
    // Node-wide counts are refreshed every counts_interval_ms.
    eventually("only the live viewer remains in the room", || {
        alive.heartbeat() == 1
    });

    let m = edge.metrics_text();
    let closes = |r: &str| metric(&m, &format!("barrage_edge_closes_total{{reason=\"{r}\"}}"));
    assert_eq!(closes("auth_timeout"), 2.0, "{m}");
    assert_eq!(closes("handshake_timeout"), 1.0, "{m}");
    assert_eq!(closes("heartbeat_timeout"), 2.0, "{m}");
    assert_eq!(metric_sum(&m, "barrage_edge_connections"), 1.0, "{m}");
    edge.shutdown();
}

#[test]
fn timeouts_uring() {
    with_driver(Driver::Uring, timeouts_body);
}

#[test]
fn timeouts_legacy() {
    with_driver(Driver::Legacy, timeouts_body);
}

fn pending_cap_body(driver: Driver) {
    let mut cfg = edge_config(driver, vec![]);
    cfg.shards = 1;
    cfg.pending_handshakes_max = 2;
    cfg.rooms_max = 1;
    let edge = edge::start(cfg).unwrap();
    let mut a = Client::tcp(edge.tcp_addr());
    let _b = Client::ws_raw(edge.ws_addr());
    eventually("two pending handshakes", || {
        metric_sum(&edge.metrics_text(), "barrage_edge_pending_handshakes") == 2.0
    });
    // Over the cap: refused at accept (WS gets a 503, TCP a close).
    let mut c = Client::ws_raw(edge.ws_addr());
    assert!(c.read_http_head().unwrap().starts_with("HTTP/1.1 503"));
    let mut d = Client::tcp(edge.tcp_addr());
    assert_eq!(d.expect_closed(), None);
    // Authenticating frees a slot.
    a.auth_ok(1, ROOM, 0, 1);
    let mut e = Client::tcp(edge.tcp_addr());
    e.auth_ok(2, ROOM, 0, 1);
    // rooms_max = 1: a second room on the shard is refused with -101.
    let mut f = Client::ws(edge.ws_addr());
    assert_eq!(
        f.auth(3, ROOM + 1, 0, token(3, ROOM + 1, 1)),
        auth::auth_reply(-101)
    );
    assert_eq!(f.expect_closed(), Some(ws::close::POLICY_VIOLATION));
    let m = edge.metrics_text();
    assert_eq!(
        metric(&m, "barrage_edge_closes_total{reason=\"overloaded\"}"),
        2.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "barrage_edge_closes_total{reason=\"rooms_full\"}"),
        1.0,
        "{m}"
    );
    edge.shutdown();
}

#[test]
fn pending_handshakes_and_rooms_capped_uring() {
    with_driver(Driver::Uring, pending_cap_body);
}

#[test]
fn pending_handshakes_and_rooms_capped_legacy() {
    with_driver(Driver::Legacy, pending_cap_body);
}

fn slow_reader_body(driver: Driver) {
    let broker = TestBroker::start(1);
    let mut cfg = edge_config(driver, vec![broker.addr_string()]);
    cfg.send_queue_bytes_max = 512 * 1024;
    cfg.stuck_ms_max = 300;
    let edge = edge::start(cfg).unwrap();
    broker.wait_links(2);
    let mut stalled = Client::tcp(edge.tcp_addr());
    stalled.auth_ok(1, ROOM, 0, 1);
    // Small kernel buffers on the stalled side fill sooner.
    let _ = socket2::SockRef::from(&stalled.stream).set_recv_buffer_size(4096);
    let good = Client::ws(edge.ws_addr());
    let mut good = good;
    good.auth_ok(2, ROOM, 0, 1);
    broker.wait_seen("SUB", |s| s.iter().any(|x| matches!(x, Seen::Sub(..))));
    const BATCHES: u64 = 400;
    const BYTES: usize = 32 * 1024;
    let batches: Vec<_> = (1..=BATCHES)
        .map(|s| big_plain_batch(ROOM, s, BYTES))
        .collect();
    // The sender keeps at most WINDOW batches ahead of what the reading viewer has taken, so
    // that viewer's queue never nears `send_queue_bytes_max` however slowly a loaded machine
    // runs this thread; the stalled viewer, reading nothing, still overflows its queue.
    const WINDOW: u64 = 4;
    let taken = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sender = {
        let batches = batches.clone();
        let b = std::sync::Arc::new(broker);
        let b2 = b.clone();
        let taken = taken.clone();
        (
            std::thread::spawn(move || {
                for x in &batches {
                    let deadline = std::time::Instant::now() + WAIT;
                    while x.seq > taken.load(std::sync::atomic::Ordering::Acquire) + WINDOW
                        && std::time::Instant::now() < deadline
                    {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    b2.send(x);
                }
            }),
            b,
        )
    };
    // The reading viewer gets every batch, in order, while the other one is stuck.
    for b in &batches {
        match good.recv(WAIT) {
            Got::Bytes(x) => {
                assert_eq!(x.len(), b.packet.len());
                taken.store(b.seq, std::sync::atomic::Ordering::Release);
            }
            other => panic!(
                "good viewer lost batch {}: {other:?}\n{}",
                b.seq,
                edge.metrics_text()
            ),
        }
    }
    sender.0.join().unwrap();
    eventually("stuck viewer closed", || {
        metric(
            &edge.metrics_text(),
            "barrage_edge_closes_total{reason=\"stuck\"}",
        ) == 1.0
    });
    let m = edge.metrics_text();
    assert!(
        metric(&m, "barrage_edge_drops_total{reason=\"queue_full\"}") >= 1.0,
        "{m}"
    );
    assert!(good.heartbeat() >= 1);
    // The stalled viewer, reading at last, finds its connection closed.
    // The edge let go of it (the kernel still flushes or times out what it had queued: a
    // graceful close; an abortive close needs SO_LINGER on the fd, see operations-edge.md).
    eventually("stuck viewer removed", || {
        metric_sum(&edge.metrics_text(), "barrage_edge_connections") == 1.0
    });
    edge.shutdown();
    drop(sender.1);
}

#[test]
fn slow_reader_is_dropped_without_blocking_others_uring() {
    with_driver(Driver::Uring, slow_reader_body);
}

#[test]
fn slow_reader_is_dropped_without_blocking_others_legacy() {
    with_driver(Driver::Legacy, slow_reader_body);
}
