//! Resume over the link: a real broker on loopback, a test edge sends REPLAY and checks what
//! REPLAYED holds (issue 9), and where it sits among the room's live batches.

mod common;

use broker::{IngestClient, Message};
use common::*;
use proto::id::{Encoding, Priority, RoomId};
use proto::link::replay::{Answer, Request};
use proto::link::{Interest, LinkFrame};
use proto::sync::{Epoch, Resume, ResumeError, ResumeField};
use std::time::Duration;

const ROOM: u64 = 11;

fn replay(edge: &mut TestEdge, req: u64, resume: ResumeField) -> Answer {
    let shard = edge.shard_of(&Interest::Room(RoomId(ROOM)));
    edge.send(
        shard,
        Priority::Low,
        &LinkFrame::Replay(Request {
            req,
            room: RoomId(ROOM),
            encoding: Encoding::Brotli,
            resume,
        }),
    );
    loop {
        let ev = edge
            .next_event(Duration::from_secs(10))
            .expect("no REPLAYED");
        if let LinkFrame::Replayed(a) = ev.frame {
            assert_eq!((a.req, a.room), (req, RoomId(ROOM)));
            return a;
        }
    }
}

/// One push per batch: each waits for its batch, so seqs are 1, 2, 3...
fn push_batches(edge: &mut TestEdge, client: &mut IngestClient, n: usize) {
    for i in 0..n {
        client
            .push_many(&[Message::room(ROOM, danmu(ROOM, i))])
            .unwrap();
        edge.batches_with(1);
    }
}

#[test]
fn replay_answers_exactly_the_missed_batches_then_live_continues() {
    let mut cfg = config();
    cfg.history_batches_max = 4;
    let broker = broker::start(cfg).unwrap();
    let mut edge = TestEdge::connect(broker.link_addr(), "edge-r");
    edge.sub_room(ROOM);
    let mut client = IngestClient::connect(broker.ingest_addr(), KEY).unwrap();
    push_batches(&mut edge, &mut client, 6);

    // No resume: the current epoch and seq, nothing replayed.
    let fresh = replay(&mut edge, 1, ResumeField::Absent);
    assert_eq!(
        (fresh.sync.seq, fresh.sync.recovered, fresh.sync.missed),
        (6, true, 0)
    );
    assert!(fresh.batches.is_empty());
    let epoch = fresh.sync.epoch.clone();

    // Within history: exactly 5 and 6, the bytes the live stream carried.
    let a = replay(
        &mut edge,
        2,
        ResumeField::Valid(Resume {
            epoch: epoch.clone(),
            seq: 4,
        }),
    );
    assert_eq!(
        a.batches.iter().map(|b| b.0).collect::<Vec<_>>(),
        vec![5, 6]
    );
    assert_eq!((a.sync.seq, a.sync.recovered, a.sync.missed), (6, true, 0));

    // Beyond history (4 held: 3..=6): from 1, seq 2 is missed.
    let b = replay(
        &mut edge,
        3,
        ResumeField::Valid(Resume {
            epoch: epoch.clone(),
            seq: 1,
        }),
    );
    assert_eq!(
        b.batches.iter().map(|b| b.0).collect::<Vec<_>>(),
        vec![3, 4, 5, 6]
    );
    assert_eq!((b.sync.recovered, b.sync.missed), (false, 1));

    // Another epoch (a previous broker run): not recovered, every unheld batch missed.
    let c = replay(
        &mut edge,
        4,
        ResumeField::Valid(Resume {
            epoch: Epoch::new("0000000000000000-0").unwrap(),
            seq: 6,
        }),
    );
    assert_eq!((c.sync.recovered, c.sync.missed), (false, 2));
    assert_ne!(c.sync.epoch.as_str(), "0000000000000000-0");

    // Ahead of the room and malformed: nothing replayed, not recovered.
    let d = replay(
        &mut edge,
        5,
        ResumeField::Valid(Resume {
            epoch: epoch.clone(),
            seq: 99,
        }),
    );
    assert!(d.batches.is_empty() && !d.sync.recovered);
    let e = replay(&mut edge, 6, ResumeField::Malformed(ResumeError::Seq));
    assert!(e.batches.is_empty() && !e.sync.recovered);

    // The next live batch continues right after the answer's seq.
    client
        .push_many(&[Message::room(ROOM, danmu(ROOM, 99))])
        .unwrap();
    let (_, _, live) = edge
        .next_batch(Duration::from_secs(10))
        .expect("live batch");
    assert_eq!(live.seq, 7);

    let m = broker.metrics_text();
    assert_eq!(
        metric(&m, "barrage_broker_replays_total{outcome=\"recovered\"}"),
        1.0
    );
    assert_eq!(
        metric(&m, "barrage_broker_replays_total{outcome=\"partial\"}"),
        1.0
    );
    assert_eq!(
        metric(&m, "barrage_broker_replays_total{outcome=\"malformed\"}"),
        1.0
    );
    broker.shutdown();
}

#[test]
fn a_room_left_a_moment_ago_keeps_its_history() {
    let broker = broker::start(config()).unwrap();
    let mut edge = TestEdge::connect(broker.link_addr(), "edge-l");
    edge.sub_room(ROOM);
    let mut client = IngestClient::connect(broker.ingest_addr(), KEY).unwrap();
    push_batches(&mut edge, &mut client, 2);
    // The last viewer left: the edge unsubscribes, pushes go on.
    edge.unsub(Interest::Room(RoomId(ROOM)));
    client
        .push_many(&[Message::room(ROOM, danmu(ROOM, 3))])
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    edge.sub_room(ROOM);
    let now = replay(&mut edge, 1, ResumeField::Absent);
    let a = replay(
        &mut edge,
        2,
        ResumeField::Valid(Resume {
            epoch: now.sync.epoch,
            seq: 2,
        }),
    );
    assert_eq!(a.batches.iter().map(|b| b.0).collect::<Vec<_>>(), vec![3]);
    assert!(a.sync.recovered);
    broker.shutdown();
}
