//! Pushes in, batches out: a real broker on loopback, a test edge on its link port.

mod common;

use broker::{IngestClient, Message};
use common::*;
use proto::id::{AreaId, Encoding, Priority, RoomId, Scope};
use proto::link::{Interest, LinkFrame};
use std::collections::BTreeMap;
use std::time::Duration;

/// Per room: bodies in arrival order, and the batch seqs, checked consecutive from `first_seq`.
fn by_room(
    batches: &[(u16, Priority, proto::link::Batch)],
) -> BTreeMap<u64, (Vec<Vec<u8>>, Vec<u64>)> {
    let mut out: BTreeMap<u64, (Vec<Vec<u8>>, Vec<u64>)> = BTreeMap::new();
    for (shard, _, b) in batches {
        let Scope::Room(r) = b.scope else {
            panic!("unexpected scope {:?}", b.scope)
        };
        assert_eq!(
            *shard,
            proto::link::shard_of_room(r, 2),
            "room {r} batch on the wrong shard"
        );
        let (seqs, bodies) = unpack(b);
        assert!(
            seqs.iter().all(|s| *s as u64 == b.seq),
            "outer seq {seqs:?} != batch seq {}",
            b.seq
        );
        assert_eq!(bodies.len(), b.msg_count as usize);
        let e = out.entry(r.0).or_default();
        e.0.extend(bodies);
        e.1.push(b.seq);
    }
    out
}

#[test]
fn socket_pushes_arrive_in_order_with_consecutive_seq() {
    let broker = broker::start(config()).unwrap();
    let mut edge = TestEdge::connect(broker.link_addr(), "edge-a");
    assert_eq!(edge.shards, 2);
    let rooms = [1u64, 2, 3, 4, 5];
    for r in rooms {
        edge.sub_room(r);
    }
    let mut client = IngestClient::connect(broker.ingest_addr(), KEY).unwrap();
    let mut sent: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
    let mut msgs = Vec::new();
    for i in 0..300 {
        let room = rooms[i % rooms.len()];
        let body = danmu(room, i);
        sent.entry(room).or_default().push(body.clone());
        msgs.push(Message::room(room, body));
    }
    let results = client.push_many(&msgs).unwrap();
    let ids: Vec<u64> = results.into_iter().map(|r| r.unwrap().0).collect();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "msg ids must be unique");

    let batches = edge.batches_with(300);
    let got = by_room(&batches);
    assert_eq!(got.keys().copied().collect::<Vec<_>>(), rooms.to_vec());
    for (room, (bodies, seqs)) in got {
        assert_eq!(
            bodies, sent[&room],
            "room {room}: bodies differ or out of order"
        );
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "room {room}: seqs not consecutive"
        );
    }
    // Every batch names its messages: first id is one we were given.
    for (_, _, b) in &batches {
        assert!(ids.contains(&b.first_msg_id.0));
    }
    edge.expect_no_batch(Duration::from_millis(200));
    broker.shutdown();
}

#[test]
fn http_pushes_arrive_like_socket_pushes() {
    let broker = broker::start(config()).unwrap();
    let mut edge = TestEdge::connect(broker.link_addr(), "edge-h");
    edge.sub_room(7);
    edge.sub(Interest::Area(AreaId(3)), Encoding::Brotli.bit());
    let mut sent = Vec::new();
    for i in 0..20 {
        let body = danmu(7, i);
        let (status, _, resp) = http(
            broker.http_addr(),
            "POST",
            "/v1/push/room/7",
            Some(KEY),
            &body,
        );
        assert_eq!(status, 202, "{}", String::from_utf8_lossy(&resp));
        let v = json(&resp);
        assert!(v["msg_id"].as_str().unwrap().parse::<u64>().unwrap() > 0);
        sent.push(body);
    }
    let got = by_room(&edge.batches_with(20));
    assert_eq!(got[&7].0, sent);
    assert_eq!(got[&7].1, (1..=got[&7].1.len() as u64).collect::<Vec<_>>());

    // Batch endpoint: per-item results in order, one bad item does not spoil the rest.
    let req = br#"{"messages":[
        {"scope":"room","target":7,"priority":"low","body":{"cmd":"A","n":1}},
        {"scope":"room","target":7,"body":[1,2]},
        {"scope":"area","target":3,"priority":"high","body":{"cmd":"B"}},
        {"scope":"bogus","target":1,"body":{}}
    ]}"#;
    let (status, _, resp) = http(broker.http_addr(), "POST", "/v1/push/batch", Some(KEY), req);
    assert_eq!(status, 200);
    let v = json(&resp);
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 4);
    assert!(results[0]["msg_id"].is_string());
    assert_eq!(results[1]["error"], "invalid");
    assert!(results[2]["msg_id"].is_string());
    assert_eq!(results[3]["error"], "invalid");
    let batches = edge.batches_with(2);
    let mut bodies: Vec<(Scope, Priority, Vec<u8>)> = Vec::new();
    for (_, p, b) in &batches {
        for body in unpack(b).1 {
            bodies.push((b.scope.clone(), *p, body));
        }
    }
    bodies.sort_by_key(|(s, _, _)| s.tag());
    assert_eq!(
        bodies[0],
        (
            Scope::Room(RoomId(7)),
            Priority::Low,
            br#"{"cmd":"A","n":1}"#.to_vec()
        )
    );
    assert_eq!(
        bodies[1],
        (
            Scope::Area(AreaId(3)),
            Priority::High,
            br#"{"cmd":"B"}"#.to_vec()
        )
    );

    let (status, _, resp) = http(broker.http_addr(), "GET", "/healthz", None, b"");
    assert_eq!((status, json(&resp)["ok"].as_bool()), (200, Some(true)));
    let (status, _, resp) = http(broker.http_addr(), "GET", "/metrics", None, b"");
    assert_eq!(status, 200);
    let text = String::from_utf8(resp).unwrap();
    assert_eq!(
        metric(&text, "barrage_broker_pushes_accepted_total{via=\"http\"}"),
        22.0
    );
    assert!(
        metric(
            &text,
            "barrage_broker_encoded_batches_total{encoding=\"brotli\"}"
        ) >= 2.0
    );
    broker.shutdown();
}

#[test]
fn interest_routing_sends_a_room_only_to_its_watchers() {
    let broker = broker::start(config()).unwrap();
    let mut a = TestEdge::connect(broker.link_addr(), "edge-a");
    let mut b = TestEdge::connect(broker.link_addr(), "edge-b");
    // Room 3 is watched by nobody; markers are rooms on the same shard as 3 watched by both,
    // so a wrongly routed room-3 batch would arrive before the marker.
    let shard3 = proto::link::shard_of_room(RoomId(3), 2);
    let marker = (100..)
        .find(|r| proto::link::shard_of_room(RoomId(*r), 2) == shard3)
        .unwrap();
    a.sub_room(1);
    b.sub_room(2);
    a.sub_room(marker);
    b.sub_room(marker);
    let mut c = IngestClient::connect(broker.ingest_addr(), KEY).unwrap();
    for room in [1, 2, 3] {
        c.push(&Message::room(room, danmu(room, 0))).unwrap();
    }
    c.push(&Message::room(marker, danmu(marker, 0))).unwrap();
    for (edge, own) in [(&mut a, 1u64), (&mut b, 2u64)] {
        let batches = edge.batches_with(2);
        let mut rooms: Vec<u64> = batches
            .iter()
            .map(|(_, _, b)| match b.scope {
                Scope::Room(r) => r.0,
                ref s => panic!("{s:?}"),
            })
            .collect();
        rooms.sort();
        assert_eq!(rooms, vec![own, marker], "{}", edge.node_id);
    }
    let text = broker.metrics_text();
    assert_eq!(metric(&text, "barrage_broker_batches_unrouted_total"), 1.0);
    // Unsubscribing stops delivery.
    a.unsub(Interest::Room(RoomId(1)));
    c.push(&Message::room(1, danmu(1, 1))).unwrap();
    a.expect_no_batch(Duration::from_millis(300));
    broker.shutdown();
}

#[test]
fn link_dropped_and_restored_mid_stream() {
    let broker = broker::start(config()).unwrap();
    let mut edge = TestEdge::connect(broker.link_addr(), "edge-r");
    let room = 11u64;
    let shard = proto::link::shard_of_room(RoomId(room), 2);
    edge.sub_room(room);
    let mut c = IngestClient::connect(broker.ingest_addr(), KEY).unwrap();
    let push = |c: &mut IngestClient, from: usize, n: usize| {
        let msgs: Vec<Message> = (from..from + n)
            .map(|i| Message::room(room, danmu(room, i)))
            .collect();
        for r in c.push_many(&msgs).unwrap() {
            r.unwrap();
        }
        msgs.into_iter().map(|m| m.body).collect::<Vec<_>>()
    };
    let first = push(&mut c, 0, 10);
    let got = by_room(&edge.batches_with(10));
    assert_eq!(got[&room].0, first);
    let last_seq = *got[&room].1.last().unwrap();

    edge.drop_link(shard, Priority::Low);
    eventually("the broker to see the link drop", || {
        metric(
            &broker.metrics_text(),
            "barrage_broker_link_cuts_total{reason=\"closed\"}",
        ) >= 1.0
    });
    // Pushed while the edge has no link: accepted, not delivered (the seq still advances).
    push(&mut c, 10, 5);
    eventually("the outage batches to flush", || {
        metric(
            &broker.metrics_text(),
            "barrage_broker_batches_unrouted_total",
        ) >= 1.0
    });

    edge.open(shard, Priority::Low);
    edge.sub_room(room);
    let third = push(&mut c, 15, 10);
    let got = by_room(&edge.batches_with(10));
    assert_eq!(got[&room].0, third, "delivery resumes after re-SUB");
    let seqs = &got[&room].1;
    assert!(
        seqs[0] > last_seq + 1,
        "the outage shows as a seq gap: {last_seq} -> {}",
        seqs[0]
    );
    assert_eq!(
        seqs.to_vec(),
        (seqs[0]..seqs[0] + seqs.len() as u64).collect::<Vec<_>>()
    );
    broker.shutdown();
}

#[test]
fn pushes_within_a_window_arrive_as_one_batch() {
    let mut cfg = config();
    // Long enough that the pipelined pushes below all land inside it on any machine.
    cfg.batch_window_ms = 3_000;
    let broker = broker::start(cfg).unwrap();
    let mut edge = TestEdge::connect(broker.link_addr(), "edge-w");
    edge.sub_room(5);
    let mut c = IngestClient::connect(broker.ingest_addr(), KEY).unwrap();
    c.push(&Message::room(5, danmu(5, 0))).unwrap();
    // The quiet room flushed at once.
    let (_, _, first) = edge.next_batch(WAIT).unwrap();
    assert_eq!((first.seq, first.msg_count), (1, 1));
    let msgs: Vec<Message> = (1..=8).map(|i| Message::room(5, danmu(5, i))).collect();
    for r in c.push_many(&msgs).unwrap() {
        r.unwrap();
    }
    let (_, _, second) = edge.next_batch(WAIT).unwrap();
    assert_eq!((second.seq, second.msg_count), (2, 8));
    assert_eq!(
        unpack(&second).1,
        msgs.iter().map(|m| m.body.clone()).collect::<Vec<_>>()
    );
    broker.shutdown();
}

#[test]
fn batch_caps_split_a_hot_room() {
    let mut cfg = config();
    cfg.batch_window_ms = 3_000;
    cfg.batch_messages_max = 4;
    let broker = broker::start(cfg).unwrap();
    let mut edge = TestEdge::connect(broker.link_addr(), "edge-cap");
    edge.sub_room(6);
    let mut c = IngestClient::connect(broker.ingest_addr(), KEY).unwrap();
    let msgs: Vec<Message> = (0..9).map(|i| Message::room(6, danmu(6, i))).collect();
    for r in c.push_many(&msgs).unwrap() {
        r.unwrap();
    }
    // 1 at once (quiet), then two full batches of 4 without waiting for the window.
    let counts: Vec<u32> = edge
        .batches_with(9)
        .iter()
        .map(|(_, _, b)| b.msg_count)
        .collect();
    assert_eq!(counts, vec![1, 4, 4]);
    broker.shutdown();
}

#[test]
fn high_priority_travels_on_the_high_link() {
    let broker = broker::start(config()).unwrap();
    let mut edge = TestEdge::connect(broker.link_addr(), "edge-p");
    edge.sub_room(9);
    let shard = proto::link::shard_of_room(RoomId(9), 2);
    let mut c = IngestClient::connect(broker.ingest_addr(), KEY).unwrap();
    c.push(&Message::room(9, &b"{\"cmd\":\"PK_INVITE\"}"[..]).priority(Priority::High))
        .unwrap();
    let (s, p, b) = edge.next_batch(WAIT).unwrap();
    assert_eq!(
        (s, p, b.priority, b.seq),
        (shard, Priority::High, Priority::High, 1)
    );
    let (seqs, bodies) = unpack(&b);
    assert_eq!(seqs, vec![0x8000_0001]);
    assert_eq!(bodies, vec![b"{\"cmd\":\"PK_INVITE\"}".to_vec()]);
    c.push(&Message::room(9, danmu(9, 0))).unwrap();
    let (s, p, b) = edge.next_batch(WAIT).unwrap();
    assert_eq!(
        (s, p, b.priority, b.seq),
        (shard, Priority::Low, Priority::Low, 1)
    );
    assert_eq!(unpack(&b).0, vec![1]);
    broker.shutdown();
}

#[test]
fn encodings_follow_what_edges_asked_for() {
    let broker = broker::start(config()).unwrap();
    let mut a = TestEdge::connect(broker.link_addr(), "edge-z");
    let mut b = TestEdge::connect(broker.link_addr(), "edge-br");
    a.sub(
        Interest::Room(RoomId(4)),
        Encoding::Zlib.bit() | Encoding::Plain.bit(),
    );
    b.sub_room(4);
    let mut c = IngestClient::connect(broker.ingest_addr(), KEY).unwrap();
    let body = danmu(4, 0);
    c.push(&Message::room(4, body.clone())).unwrap();
    let mut got_a = vec![a.next_batch(WAIT).unwrap().2, a.next_batch(WAIT).unwrap().2];
    got_a.sort_by_key(|b| b.encoding);
    assert_eq!(
        got_a.iter().map(|b| b.encoding).collect::<Vec<_>>(),
        vec![Encoding::Plain, Encoding::Zlib]
    );
    for batch in &got_a {
        assert_eq!(unpack(batch), (vec![1], vec![body.clone()]));
    }
    let got_b = b.next_batch(WAIT).unwrap().2;
    assert_eq!(got_b.encoding, Encoding::Brotli);
    assert_eq!(unpack(&got_b), (vec![1], vec![body]));
    a.expect_no_batch(Duration::from_millis(200));
    b.expect_no_batch(Duration::from_millis(1));
    broker.shutdown();
}

#[test]
fn global_reaches_every_edge_and_counts_are_summed() {
    let broker = broker::start(config()).unwrap();
    let mut a = TestEdge::connect(broker.link_addr(), "edge-g1");
    let mut b = TestEdge::connect(broker.link_addr(), "edge-g2");
    a.sub_room(1);
    b.sub_room(1);
    let mut c = IngestClient::connect(broker.ingest_addr(), KEY).unwrap();
    c.push(&Message::global(&b"{\"cmd\":\"NOTICE_MSG\"}"[..]))
        .unwrap();
    for e in [&mut a, &mut b] {
        let (shard, _, batch) = e.next_batch(WAIT).unwrap();
        assert_eq!(
            (shard, batch.scope.clone(), batch.seq),
            (0, Scope::Global, 1)
        );
    }
    let shard = proto::link::shard_of_room(RoomId(1), 2);
    a.send(
        shard,
        Priority::Low,
        &LinkFrame::Counts(vec![(RoomId(1), 3)]),
    );
    b.send(
        shard,
        Priority::Low,
        &LinkFrame::Counts(vec![(RoomId(1), 4)]),
    );
    for e in [&mut a, &mut b] {
        let mut seen = None;
        eventually("fleet counts", || {
            if let Some(ev) = e.next_event(Duration::from_millis(100)) {
                if let LinkFrame::Counts(cs) = ev.frame {
                    seen = cs.iter().find(|(r, _)| *r == RoomId(1)).map(|(_, n)| *n);
                }
            }
            seen == Some(7)
        });
    }
    broker.shutdown();
}
