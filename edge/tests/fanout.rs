//! Room fan-out over TCP and WebSocket from a test broker, byte for byte and in order; SUB on
//! the first viewer, UNSUB on the last, interest re-sent after a link drop; heartbeat replies.
//! Every test runs under both drivers.

mod common;

use common::*;
use net::runtime::Driver;
use proto::id::{AreaId, Encoding, RoomId, Scope};
use proto::link::Interest;
use std::time::Duration;

const ROOMS: [u64; 2] = [100, 101];
const PROTOVERS: [u32; 3] = [3, 2, 0];

fn latest_sub(seen: &[Seen], room: u64) -> Option<u8> {
    seen.iter().rev().find_map(|s| match s {
        Seen::Sub(Interest::Room(r), e) if r.0 == room => Some(*e),
        Seen::Unsub(Interest::Room(r)) if r.0 == room => Some(0),
        _ => None,
    })
}

fn fanout_body(driver: Driver) {
    let broker = TestBroker::start(1);
    let edge = edge::start(edge_config(driver, vec![broker.addr_string()])).unwrap();
    broker.wait_links(2);
    const N: usize = 6;
    let mut clients = Vec::new();
    for i in 0..2 * N {
        let ws = i % 2 == 1;
        let room = ROOMS[(i / 2) % 2];
        let protover = PROTOVERS[(i / 4) % 3];
        let mut c = Client::connect(edge.tcp_addr(), edge.ws_addr(), ws);
        c.auth_ok(1000 + i as u64, room, protover, 7);
        clients.push((c, room, protover));
    }
    // Every room subscribed with the union of its viewers' encodings.
    for room in ROOMS {
        let want = clients
            .iter()
            .filter(|(_, r, _)| *r == room)
            .fold(0u8, |b, (_, _, p)| b | encoding_of(*p).bit());
        broker.wait_seen("SUB with all encodings", |s| {
            latest_sub(s, room) == Some(want)
        });
    }
    broker.wait_seen("area SUB", |s| {
        s.iter()
            .any(|x| matches!(x, Seen::Sub(Interest::Area(AreaId(7)), _)))
    });
    for (c, _, _) in clients.iter_mut() {
        let online = c.heartbeat();
        assert!(online >= 1, "local count of the room on the shard");
    }
    const K: u64 = 25;
    let mut sent = Vec::new();
    for seq in 1..=K {
        for room in ROOMS {
            for p in PROTOVERS {
                let b = room_batch(room, seq, encoding_of(p), 50 + (seq as usize * 37) % 900);
                broker.send(&b);
                sent.push(b);
            }
        }
    }
    for (c, room, protover) in clients.iter_mut() {
        let enc = encoding_of(*protover);
        for b in sent
            .iter()
            .filter(|b| b.scope == Scope::Room(RoomId(*room)) && b.encoding == enc)
        {
            let got = if c.ws {
                match c.recv(WAIT) {
                    Got::Bytes(x) => x,
                    other => panic!("ws viewer of {room}: {other:?} instead of batch {}", b.seq),
                }
            } else {
                c.recv_exact(b.packet.len(), WAIT).expect("tcp batch bytes")
            };
            assert_eq!(
                got,
                &b.packet[..],
                "room {room} seq {} encoding {enc:?} ws {}",
                b.seq,
                c.ws
            );
            // Decode as a client would; brotli/zlib bodies hold the DANMU packet.
            let h = proto::packet::parse_header(&got).unwrap();
            let inner = proto::container::unpack(
                h.ver,
                h.op,
                h.seq,
                &got[16..h.packet_len as usize],
                1 << 20,
            )
            .unwrap();
            let text = String::from_utf8(inner[0].body.clone()).unwrap();
            assert!(text.contains(&format!("\"seq\":{}", b.seq)), "{text}");
        }
        assert_eq!(
            c.recv(Duration::from_millis(50)),
            Got::Timeout,
            "nothing beyond the batches of its room and encoding"
        );
    }
    // Fleet-wide COUNTS from the broker win over the local count in heartbeat replies.
    broker.send_counts(vec![(RoomId(100), 12_345), (RoomId(101), 777)]);
    for (c, room, _) in clients.iter_mut() {
        let want = if *room == 100 { 12_345 } else { 777 };
        eventually("fleet count in heartbeat", || c.heartbeat() == want);
    }
    // The edge reported its local viewer counts.
    broker.wait_seen("COUNTS", |s| s.iter().any(|x| matches!(x, Seen::Counts(c) if c.iter().map(|(_, n)| n).sum::<u32>() == 2 * N as u32)));
    let m = edge.metrics_text();
    assert_eq!(metric_sum(&m, "barrage_edge_connections"), (2 * N) as f64);
    assert_eq!(metric_sum(&m, "barrage_edge_auth_ok_total"), (2 * N) as f64);
    assert!(metric_sum(&m, "barrage_edge_sends_total") >= (2 * N) as f64 * K as f64);
    assert_eq!(
        metric(&m, "barrage_edge_drops_total{reason=\"queue_full\"}"),
        0.0
    );
    edge.shutdown();
}

#[test]
fn fanout_tcp_and_ws_uring() {
    with_driver(Driver::Uring, fanout_body);
}

#[test]
fn fanout_tcp_and_ws_legacy() {
    with_driver(Driver::Legacy, fanout_body);
}

fn interest_body(driver: Driver) {
    let broker = TestBroker::start(1);
    let edge = edge::start(edge_config(driver, vec![broker.addr_string()])).unwrap();
    broker.wait_links(2);
    let mut a = Client::tcp(edge.tcp_addr());
    a.auth_ok(1, 500, 3, 9);
    broker.wait_seen("SUB on first viewer", |s| {
        latest_sub(s, 500) == Some(Encoding::Brotli.bit())
    });
    let mut b = Client::ws(edge.ws_addr());
    b.auth_ok(2, 500, 2, 9);
    broker.wait_seen("re-SUB with zlib added", |s| {
        latest_sub(s, 500) == Some(Encoding::Brotli.bit() | Encoding::Zlib.bit())
    });
    // The broker loses the link; the edge reconnects and re-sends its whole interest.
    broker.clear_seen();
    broker.drop_links(true);
    std::thread::sleep(Duration::from_millis(300));
    broker.accept_again();
    broker.wait_links(2);
    broker.wait_seen("interest re-sent after reconnect", |s| {
        latest_sub(s, 500) == Some(Encoding::Brotli.bit() | Encoding::Zlib.bit())
            && s.iter()
                .any(|x| matches!(x, Seen::Sub(Interest::Area(AreaId(9)), _)))
    });
    // Batches flow again after the reconnect.
    let batch = room_batch(500, 1, Encoding::Brotli, 100);
    broker.send(&batch);
    assert_eq!(
        a.recv_exact(batch.packet.len(), WAIT).unwrap(),
        &batch.packet[..]
    );
    drop(b);
    broker.wait_seen("re-SUB without zlib", |s| {
        latest_sub(s, 500) == Some(Encoding::Brotli.bit())
    });
    drop(a);
    broker.wait_seen("UNSUB on last viewer", |s| latest_sub(s, 500) == Some(0));
    broker.wait_seen("area UNSUB", |s| {
        s.iter()
            .any(|x| matches!(x, Seen::Unsub(Interest::Area(AreaId(9)))))
    });
    let m = edge.metrics_text();
    assert!(
        metric_sum(&m, "barrage_edge_link_connects_total") >= 4.0,
        "{m}"
    );
    edge.shutdown();
}

#[test]
fn interest_sub_unsub_resend_uring() {
    with_driver(Driver::Uring, interest_body);
}

#[test]
fn interest_sub_unsub_resend_legacy() {
    with_driver(Driver::Legacy, interest_body);
}

/// Area and global batches reach every viewer of the area / node.
fn scopes_body(driver: Driver) {
    let broker = TestBroker::start(1);
    let edge = edge::start(edge_config(driver, vec![broker.addr_string()])).unwrap();
    broker.wait_links(2);
    let mut in_area = Client::tcp(edge.tcp_addr());
    in_area.auth_ok(1, 600, 0, 3);
    let mut other = Client::ws(edge.ws_addr());
    other.auth_ok(2, 601, 0, 4);
    broker.wait_seen("area SUB", |s| {
        s.iter()
            .any(|x| matches!(x, Seen::Sub(Interest::Area(AreaId(3)), _)))
    });
    broker.wait_seen("area SUB", |s| {
        s.iter()
            .any(|x| matches!(x, Seen::Sub(Interest::Area(AreaId(4)), _)))
    });
    let mut area = room_batch(600, 1, Encoding::Plain, 10);
    area.scope = Scope::Area(AreaId(3));
    broker.send(&area);
    let mut global = room_batch(0, 2, Encoding::Plain, 10);
    global.scope = Scope::Global;
    broker.send(&global);
    let got = in_area.recv_exact(area.packet.len(), WAIT);
    assert_eq!(
        got.as_deref(),
        Some(&area.packet[..]),
        "metrics: {}",
        edge.metrics_text()
    );
    let got = in_area.recv_exact(global.packet.len(), WAIT);
    assert_eq!(
        got.as_deref(),
        Some(&global.packet[..]),
        "metrics: {}",
        edge.metrics_text()
    );
    assert_eq!(other.recv(WAIT), Got::Bytes(global.packet.to_vec()));
    assert_eq!(other.recv(Duration::from_millis(50)), Got::Timeout);
    edge.shutdown();
}

#[test]
fn area_and_global_scopes_uring() {
    with_driver(Driver::Uring, scopes_body);
}

#[test]
fn area_and_global_scopes_legacy() {
    with_driver(Driver::Legacy, scopes_body);
}

/// A viewer that stops reading makes its writes partial (the kernel takes part of a `writev`,
/// the rest waits for the socket to be writable) while more batches queue behind; once it reads
/// again it gets every byte of every batch, in order, with several batches per write, and a
/// viewer that kept reading is not held up meanwhile.
fn partial_writes_body(driver: Driver) {
    // 8 MiB in all: more than the edge's socket send buffer can grow to (`tcp_wmem` max,
    // 4 MiB by default), so writes to the paused viewer go partial.
    // Batches of 16 KiB: several fit one transmit (`WRITE_BYTES_MAX`, 64 KiB).
    const BATCHES: u64 = 512;
    let broker = TestBroker::start(1);
    let mut cfg = edge_config(driver, vec![broker.addr_string()]);
    cfg.shards = 1;
    cfg.send_queue_bytes_max = 16 * 1024 * 1024;
    cfg.stuck_ms_max = 60_000;
    cfg.uring_client_writes = true;
    let edge = edge::start(cfg).unwrap();
    broker.wait_links(2);
    // A small receive buffer, but not tiny: with a 4 KiB window and delayed ACKs the paused
    // viewer would read so slowly that it timed out its heartbeat.
    let mut paused = Client::tcp(edge.tcp_addr());
    let _ = socket2::SockRef::from(&paused.stream).set_recv_buffer_size(64 * 1024);
    paused.auth_ok(1, 300, 0, 1);
    let mut reading = Client::ws(edge.ws_addr());
    reading.auth_ok(2, 300, 0, 1);
    broker.wait_seen("SUB", |s| s.iter().any(|x| matches!(x, Seen::Sub(..))));
    let batches: Vec<_> = (1..=BATCHES)
        .map(|s| big_plain_batch(300, s, 16 * 1024))
        .collect();
    for b in &batches {
        broker.send(b);
        // The reading viewer keeps up while the other one's writes stall.
        match reading.recv(WAIT) {
            Got::Bytes(x) => assert!(x == b.packet[..], "batch {} intact", b.seq),
            other => panic!("reading viewer, batch {}: {other:?}", b.seq),
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    for b in &batches {
        let Some(got) = paused.recv_exact(b.packet.len(), WAIT) else {
            panic!("batch {} not received\n{}", b.seq, edge.metrics_text());
        };
        assert!(
            got == b.packet[..],
            "batch {} arrives whole and in order",
            b.seq
        );
    }
    let m = edge.metrics_text();
    let (sends, writes) = (
        metric_sum(&m, "barrage_edge_sends_total"),
        metric_sum(&m, "barrage_edge_writes_total"),
    );
    assert!(
        writes < sends,
        "batches coalesced into fewer writes: {writes} for {sends}"
    );
    if driver == Driver::Uring {
        // Under io_uring the writes went through the shard's ring (uring_client_writes), so
        // the partial ones above were ring completions resumed.
        assert!(
            metric_sum(&m, "barrage_edge_ring_writes_total") > 0.0,
            "{m}"
        );
        assert_eq!(metric_sum(&m, "barrage_edge_ring_write_errors_total"), 0.0);
    }
    edge.shutdown();
}

#[test]
fn partial_writes_resume_in_order_uring() {
    with_driver(Driver::Uring, partial_writes_body);
}

#[test]
fn partial_writes_resume_in_order_legacy() {
    with_driver(Driver::Legacy, partial_writes_body);
}
