//! User and device routing by presence (`route_by_presence`, on by default) against test edges
//! over real link sockets: a batch goes only to the edges that hold the user, and a connection
//! the broker learns of after the push (it authenticated on its edge before the edge's
//! presence report arrived) still gets it, once (crate::catchup).

mod common;

use broker::{IngestClient, Message};
use common::{config, unpack, TestEdge, KEY, WAIT};
use proto::id::{AreaId, DeviceId, Priority, RoomId, Scope, UserId};
use proto::link::{LinkFrame, PresenceBatch, PresenceEvent, PresenceKind, Transport};
use std::time::Duration;

/// Long enough for a batch that is coming to arrive on loopback; what must not come is
/// checked over it.
const QUIET: Duration = Duration::from_millis(400);

fn enter(conn: u64, uid: u64, device: &str) -> PresenceEvent {
    PresenceEvent {
        kind: PresenceKind::Enter,
        conn,
        uid: UserId(uid),
        device: DeviceId(device.into()),
        room: RoomId(1),
        area: AreaId(0),
        transport: Transport::Tcp,
    }
}

/// Reports `events` on the presence link and waits until the broker has handled them.
fn report(edge: &mut TestEdge, events: Vec<PresenceEvent>) {
    edge.send(
        0,
        Priority::Low,
        &LinkFrame::Presence(PresenceBatch {
            incarnation: 1,
            events,
        }),
    );
    edge.sync(0);
}

fn edge(broker: &broker::Handle, node: &str) -> TestEdge {
    let mut e = TestEdge::connect(broker.link_addr(), node);
    // A room subscription gives the edge its encodings (brotli).
    e.sub_room(1);
    e
}

fn next_user_batch(edge: &mut TestEdge, timeout: Duration) -> Option<(Scope, Vec<Vec<u8>>)> {
    let (_, _, b) = edge.next_batch(timeout)?;
    let (_, bodies) = unpack(&b);
    Some((b.scope, bodies))
}

#[test]
fn a_push_before_the_broker_knew_of_the_connection_reaches_it_once() {
    assert!(broker::Config::default().route_by_presence, "on by default");
    let broker = broker::start(config()).unwrap();
    let mut a = edge(&broker, "edge-a");
    let mut b = edge(&broker, "edge-b");
    report(&mut a, vec![enter(1, 5, "dev-5")]);
    report(&mut b, vec![enter(1, 6, "dev-6")]);
    let mut c = IngestClient::connect(broker.ingest_addr(), KEY).unwrap();

    // Narrowed: user 5's push reaches edge-a only.
    c.push(&Message::user(5, &b"{\"n\":1}"[..])).unwrap();
    assert_eq!(
        next_user_batch(&mut a, WAIT),
        Some((Scope::User(UserId(5)), vec![b"{\"n\":1}".to_vec()]))
    );
    b.expect_no_batch(QUIET);

    // User 7 has just authenticated on edge-b, which has not reported it yet: its push goes
    // nowhere now...
    c.push(&Message::user(7, &b"{\"n\":2}"[..])).unwrap();
    c.push(&Message::device("dev-7", &b"{\"n\":3}"[..]))
        .unwrap();
    b.expect_no_batch(QUIET);
    // ...and reaches edge-b when its report arrives, in push order.
    report(&mut b, vec![enter(2, 7, "dev-7")]);
    assert_eq!(
        next_user_batch(&mut b, WAIT),
        Some((Scope::User(UserId(7)), vec![b"{\"n\":2}".to_vec()]))
    );
    assert_eq!(
        next_user_batch(&mut b, WAIT),
        Some((
            Scope::Device(DeviceId("dev-7".into())),
            vec![b"{\"n\":3}".to_vec()]
        ))
    );
    // Once: a second connection of user 7 on edge-b gets nothing again (the edge fans the
    // first copy out to every connection it holds), and edge-a never gets it.
    report(&mut b, vec![enter(3, 7, "dev-7b")]);
    b.expect_no_batch(QUIET);
    a.expect_no_batch(Duration::ZERO);

    // After that, user 7's pushes go to edge-b directly.
    c.push(&Message::user(7, &b"{\"n\":4}"[..])).unwrap();
    assert_eq!(
        next_user_batch(&mut b, WAIT),
        Some((Scope::User(UserId(7)), vec![b"{\"n\":4}".to_vec()]))
    );
    a.expect_no_batch(QUIET);
    let metrics = String::from_utf8(
        common::http(broker.http_addr(), "GET", "/metrics", None, b"")
            .2
            .to_vec(),
    )
    .unwrap();
    assert!(
        metrics.contains("barrage_broker_presence_catchup_sent_total 2"),
        "{metrics}"
    );
    broker.shutdown();
}

#[test]
fn a_report_later_than_the_catchup_window_does_not_get_the_push() {
    let mut cfg = config();
    cfg.presence_catchup_ms = 200;
    let broker = broker::start(cfg).unwrap();
    let mut a = edge(&broker, "edge-a");
    report(&mut a, vec![enter(1, 5, "dev-5")]);
    let mut c = IngestClient::connect(broker.ingest_addr(), KEY).unwrap();
    c.push(&Message::user(9, &b"{\"n\":1}"[..])).unwrap();
    a.expect_no_batch(QUIET);
    // QUIET (400 ms) is past the 200 ms window: the held batch is gone.
    report(&mut a, vec![enter(2, 9, "dev-9")]);
    a.expect_no_batch(QUIET);
    broker.shutdown();
}
