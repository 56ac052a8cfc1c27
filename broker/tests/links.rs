//! Edge link failure paths: a slow edge is cut without holding up others; bad handshakes.

mod common;

use broker::{IngestClient, Message};
use bytes::Bytes;
use common::*;
use proto::id::{Encoding, Priority, RoomId};
use proto::link::{Hello, Interest, LinkFrame};
use rand::{Rng, SeedableRng};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn hello(node: &str, shard: u16) -> Vec<u8> {
    let mut out = Vec::new();
    proto::link::encode(
        &LinkFrame::Hello(Hello {
            node_id: node.into(),
            region: String::new(),
            shards: 1,
            link_shard: shard,
            priority: Priority::Low,
            capabilities: 0,
        }),
        &mut out,
    );
    out
}

#[test]
fn a_slow_edge_is_cut_and_the_others_keep_receiving() {
    let mut cfg = config();
    // Above one round of pushes (10 x 60 KB), so only a link that stops reading overflows.
    cfg.link_queue_bytes_max = 1024 * 1024;
    cfg.message_bytes_max = 64 * 1024;
    let broker = broker::start(cfg).unwrap();
    let room = 1u64;
    let shard = proto::link::shard_of_room(RoomId(room), 2);

    // The stalled edge: handshake, SUB for plain (incompressible on the wire), then never read.
    let mut stalled = TcpStream::connect(broker.link_addr()).unwrap();
    stalled.write_all(&hello("stalled", shard)).unwrap();
    let mut sub = Vec::new();
    proto::link::encode(
        &LinkFrame::Sub {
            interest: Interest::Room(RoomId(room)),
            encodings: Encoding::Plain.bit(),
        },
        &mut sub,
    );
    stalled.write_all(&sub).unwrap();

    let mut healthy = TestEdge::connect(broker.link_addr(), "healthy");
    healthy.sub_room(room);

    // Random-hex bodies, 600 KB a round, until the stalled link overflows its buffers and queue.
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut c = IngestClient::connect(broker.ingest_addr(), KEY).unwrap();
    let mut pushed = 0;
    while metric(
        &broker.metrics_text(),
        "barrage_broker_link_cuts_total{reason=\"slow\"}",
    ) < 1.0
    {
        assert!(pushed < 1000, "the stalled link was never cut");
        let pad: String = (0..60_000)
            .map(|_| char::from(b"0123456789abcdef"[rng.gen_range(0..16)]))
            .collect();
        let msgs: Vec<Message> = (0..10)
            .map(|_| Message::room(room, format!("{{\"cmd\":\"X\",\"pad\":\"{pad}\"}}")))
            .collect();
        for r in c.push_many(&msgs).unwrap() {
            r.unwrap();
        }
        pushed += 10;
        // Keep the healthy edge drained so only the stalled one falls behind.
        let mut n = 0;
        while n < 10 {
            match healthy.next_batch(WAIT) {
                Some(b) => n += b.2.msg_count,
                None => panic!("healthy edge starved after {n}: {}", broker.metrics_text()),
            }
        }
    }
    // The healthy edge still gets new messages.
    c.push(&Message::room(room, &b"{\"cmd\":\"AFTER\"}"[..]))
        .unwrap();
    let last = healthy.batches_with(1);
    assert_eq!(unpack(&last[0].2).1, vec![b"{\"cmd\":\"AFTER\"}".to_vec()]);
    assert_eq!(
        metric(
            &broker.metrics_text(),
            "barrage_broker_link_cuts_total{reason=\"slow\"}"
        ),
        1.0,
        "only the stalled link is cut"
    );
    // The stalled socket is closed by the broker: reading it to the end finishes.
    stalled.set_read_timeout(Some(WAIT)).unwrap();
    let mut sink = vec![0u8; 1 << 20];
    loop {
        match stalled.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) => panic!("stalled link not closed: {e}"),
        }
    }
    broker.shutdown();
}

#[test]
fn bad_handshakes_are_closed_and_counted() {
    let broker = broker::start(config()).unwrap();
    // A Hello for a shard the broker does not have.
    let mut s = TcpStream::connect(broker.link_addr()).unwrap();
    s.write_all(&hello("x", 9)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut b = [0u8; 16];
    assert_eq!(s.read(&mut b).unwrap_or(0), 0);
    // Garbage instead of a Hello.
    let mut s = TcpStream::connect(broker.link_addr()).unwrap();
    s.write_all(&[0, 0, 0, 3, 1, 99, 0]).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    assert_eq!(s.read(&mut b).unwrap_or(0), 0);
    // A huge declared length is refused before anything is buffered.
    let mut s = TcpStream::connect(broker.link_addr()).unwrap();
    s.write_all(&[0x7f, 0xff, 0xff, 0xff]).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    assert_eq!(s.read(&mut b).unwrap_or(0), 0);
    eventually("3 failed handshakes", || {
        metric(
            &broker.metrics_text(),
            "barrage_broker_link_handshakes_failed_total",
        ) >= 3.0
    });
    // A Batch frame from an edge is a protocol error that cuts only that link.
    let mut edge = TestEdge::connect(broker.link_addr(), "ok");
    edge.sub_room(1);
    let mut bad = TcpStream::connect(broker.link_addr()).unwrap();
    bad.write_all(&hello("bad", 0)).unwrap();
    let mut frame = Vec::new();
    proto::link::encode(
        &LinkFrame::Batch(proto::link::Batch {
            scope: proto::id::Scope::Global,
            priority: Priority::Low,
            seq: 1,
            first_msg_id: proto::id::MsgId(1),
            msg_count: 1,
            encoding: Encoding::Plain,
            flushed_at_us: 0,
            packet: Bytes::from_static(b"x"),
        }),
        &mut frame,
    );
    bad.write_all(&frame).unwrap();
    eventually("the protocol cut", || {
        metric(
            &broker.metrics_text(),
            "barrage_broker_link_cuts_total{reason=\"protocol\"}",
        ) >= 1.0
    });
    let mut c = IngestClient::connect(broker.ingest_addr(), KEY).unwrap();
    c.push(&Message::room(1, &b"{}"[..])).unwrap();
    assert_eq!(edge.batches_with(1).len(), 1);
    let _ = Duration::ZERO;
    broker.shutdown();
}

#[test]
fn a_silent_link_is_cut_as_dead() {
    let mut cfg = config();
    cfg.link_ping_ms = 50;
    cfg.link_dead_ms = 300;
    let broker = broker::start(cfg).unwrap();
    // Handshake, then never send another byte (the broker's pings go unanswered).
    let mut s = TcpStream::connect(broker.link_addr()).unwrap();
    s.write_all(&hello("mute", 0)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut sink = vec![0u8; 4096];
    loop {
        match s.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) => panic!("silent link not closed: {e}"),
        }
    }
    assert_eq!(
        metric(
            &broker.metrics_text(),
            "barrage_broker_link_cuts_total{reason=\"dead\"}"
        ),
        1.0
    );
    // A link that answers pings (the test edge does) stays up past link_dead_ms.
    let mut edge = TestEdge::connect(broker.link_addr(), "talkative");
    edge.sub_room(1);
    std::thread::sleep(Duration::from_millis(600));
    let mut c = IngestClient::connect(broker.ingest_addr(), KEY).unwrap();
    c.push(&Message::room(1, &b"{}"[..])).unwrap();
    assert_eq!(edge.batches_with(1).len(), 1);
    assert_eq!(
        metric(
            &broker.metrics_text(),
            "barrage_broker_link_cuts_total{reason=\"dead\"}"
        ),
        1.0
    );
    broker.shutdown();
}

/// An embedded broker never asks for batch confirmations (its reply Hello lacks the capability,
/// even to an edge offering them), and a CONFIRM it did not ask for cuts only that link, counted
/// as a protocol error.
#[test]
fn an_unasked_confirm_is_a_protocol_error() {
    let broker = broker::start(config()).unwrap();
    let mut s = TcpStream::connect(broker.link_addr()).unwrap();
    let mut out = Vec::new();
    proto::link::encode(
        &LinkFrame::Hello(Hello {
            node_id: "confirming".into(),
            region: String::new(),
            shards: 1,
            link_shard: 0,
            priority: Priority::Low,
            capabilities: proto::link::caps::CONFIRM,
        }),
        &mut out,
    );
    s.write_all(&out).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut frame = len.to_vec();
    frame.resize(4 + u32::from_be_bytes(len) as usize, 0);
    s.read_exact(&mut frame[4..]).unwrap();
    let Ok((LinkFrame::Hello(reply), _)) = proto::link::decode(&Bytes::from(frame), 4096) else {
        panic!("a Hello reply");
    };
    assert_eq!(reply.capabilities & proto::link::caps::CONFIRM, 0);
    let mut confirm = Vec::new();
    proto::link::encode(&LinkFrame::Confirm { through: 0 }, &mut confirm);
    s.write_all(&confirm).unwrap();
    eventually("the protocol cut", || {
        metric(
            &broker.metrics_text(),
            "barrage_broker_link_cuts_total{reason=\"protocol\"}",
        ) >= 1.0
    });
    let mut b = [0u8; 64];
    while matches!(s.read(&mut b), Ok(n) if n > 0) {}
    broker.shutdown();
}
