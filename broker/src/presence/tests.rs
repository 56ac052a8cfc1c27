//! Presence rules one by one, then a proptest against a plain model under random batches,
//! restarts, silences and virtual time.

use super::*;
use std::collections::BTreeMap;

const GRACE_MS: u64 = 5_000;
const LEASE_MS: u64 = 15_000;

struct T {
    p: Presence,
    base: Instant,
    now_ms: u64,
}

impl T {
    fn new() -> T {
        T::with(Limits {
            grace_ms: GRACE_MS,
            lease_ms: LEASE_MS,
            ..Limits::default()
        })
    }

    fn with(limits: Limits) -> T {
        T {
            p: Presence::new(limits),
            base: Instant::now(),
            now_ms: 0,
        }
    }

    fn now(&self) -> Instant {
        self.base + ms(self.now_ms)
    }

    fn at(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        let now = self.now();
        self.p.poll(now);
    }

    fn batch(&mut self, edge: &str, inc: u64, reports: &[Report]) -> Applied {
        let now = self.now();
        self.p
            .apply(&edge_id(edge), Incarnation(inc), reports, now)
            .unwrap()
    }

    fn events(&self) -> Vec<(EventKind, u64, String, u64)> {
        self.p
            .events_after(0, &Filter::default(), EVENTS_PAGE_MAX)
            .events
            .iter()
            .map(|e| (e.kind, e.uid.0, e.device.0.clone(), e.room.0))
            .collect()
    }

    fn counts(&self, room: u64) -> (u32, u32) {
        let v = self.p.room(RoomId(room), None, 0);
        (v.viewers, v.connections)
    }
}

fn ev(kind: EventKind, uid: u64, device: &str, room: u64) -> (EventKind, u64, String, u64) {
    (kind, uid, device.to_string(), room)
}

fn edge_id(s: &str) -> EdgeId {
    EdgeId(s.to_string())
}

fn enter(conn: u64, uid: u64, device: &str, room: u64) -> Report {
    Report::Enter(enter_of(conn, uid, device, room))
}

fn enter_of(conn: u64, uid: u64, device: &str, room: u64) -> Enter {
    Enter {
        conn: ConnId(conn),
        uid: UserId(uid),
        device: DeviceId(device.to_string()),
        room: RoomId(room),
        area: AreaId((room % 2) as u32),
        transport: Transport::Ws,
    }
}

fn exit(conn: u64) -> Report {
    Report::Exit(ConnId(conn))
}

use EventKind::{Enter as IN, Exit as OUT};

#[test]
fn enter_counts_once_and_a_duplicate_enter_changes_nothing() {
    let mut t = T::new();
    let a = t.batch("e1", 1, &[enter(1, 7, "a", 100), enter(1, 7, "a", 100)]);
    assert_eq!((a.entered, a.duplicates), (1, 1));
    // The same connection again, even claiming another room: the first report wins.
    let a = t.batch("e1", 1, &[enter(1, 7, "a", 200)]);
    assert_eq!(a.duplicates, 1);
    assert_eq!(t.counts(100), (1, 1));
    assert_eq!(t.counts(200), (0, 0));
    assert_eq!(t.events(), vec![ev(IN, 7, "a", 100)]);
    assert_eq!(t.p.stats().duplicate_enters, 2);
}

#[test]
fn exit_without_enter_is_ignored() {
    let mut t = T::new();
    let a = t.batch("e1", 1, &[exit(9)]);
    assert_eq!((a.exited, a.unknown_exits), (0, 1));
    t.batch("e1", 1, &[enter(1, 7, "a", 100)]);
    // Another edge's connection 1 is not this one.
    let a = t.batch("e2", 1, &[exit(1)]);
    assert_eq!(a.unknown_exits, 1);
    assert_eq!(t.counts(100), (1, 1));
    assert_eq!(t.events().len(), 1);
}

#[test]
fn a_user_with_several_connections_is_one_viewer() {
    let mut t = T::new();
    t.batch("e1", 1, &[enter(1, 7, "a", 100), enter(2, 7, "b", 100)]);
    t.batch("e2", 1, &[enter(1, 7, "a", 100)]);
    assert_eq!(t.counts(100), (1, 3));
    assert_eq!(t.p.room(RoomId(100), None, 10).users, vec![UserId(7)]);
    assert_eq!(t.events(), vec![ev(IN, 7, "a", 100)]);
    // Leaving on two of three connections is no exit; the last one starts the grace.
    t.batch("e1", 1, &[exit(1), exit(2)]);
    assert_eq!(t.counts(100), (1, 1));
    t.batch("e2", 1, &[exit(1)]);
    assert_eq!(t.counts(100), (1, 0), "held for grace, still a viewer");
    t.at(GRACE_MS - 1);
    assert_eq!(t.events().len(), 1);
    t.at(GRACE_MS);
    assert_eq!(t.events(), vec![ev(IN, 7, "a", 100), ev(OUT, 7, "a", 100)]);
    assert_eq!(t.counts(100), (0, 0));
    assert_eq!(t.p.top(10), vec![], "an empty room is forgotten");
}

#[test]
fn guests_count_per_device_or_per_connection_without_one() {
    let mut t = T::new();
    t.batch(
        "e1",
        1,
        &[
            enter(1, 0, "a", 100),
            enter(2, 0, "a", 100),
            enter(3, 0, "b", 100),
            enter(4, 0, "", 100),
            enter(5, 0, "", 100),
        ],
    );
    assert_eq!(t.counts(100), (4, 5));
    assert_eq!(
        t.p.room(RoomId(100), None, 10).users,
        vec![],
        "guests are not listed"
    );
    // A guest without a device cannot be recognised again: it exits at once.
    t.batch("e1", 1, &[exit(4)]);
    assert_eq!(t.counts(100), (3, 4));
    assert_eq!(t.events().last(), Some(&ev(OUT, 0, "", 100)));
    // A guest with a device is compensated like a user.
    t.batch("e1", 1, &[exit(3)]);
    t.at(1_000);
    t.batch("e1", 1, &[enter(6, 0, "b", 100)]);
    assert_eq!(t.p.stats().flaps_compensated, 1);
    assert_eq!(t.events().len(), 5);
}

#[test]
fn a_flap_within_grace_makes_no_event_pair() {
    let mut t = T::new();
    t.batch("e1", 1, &[enter(1, 7, "a", 100)]);
    t.at(10_000);
    t.batch("e1", 1, &[exit(1)]);
    t.at(10_000 + GRACE_MS - 1);
    // Same user, room and device, on another edge and connection: a flap.
    t.batch("e2", 1, &[enter(2, 7, "a", 100)]);
    t.at(20_000);
    assert_eq!(t.events(), vec![ev(IN, 7, "a", 100)]);
    assert_eq!(t.counts(100), (1, 1));
    assert_eq!(t.p.stats().flaps_compensated, 1);
    assert_eq!(t.p.held_exits(), 0);
}

#[test]
fn another_device_within_grace_is_an_exit_then_an_enter() {
    let mut t = T::new();
    t.batch("e1", 1, &[enter(1, 7, "a", 100)]);
    t.batch("e1", 1, &[exit(1)]);
    t.at(1_000);
    t.batch("e1", 1, &[enter(2, 7, "b", 100)]);
    assert_eq!(
        t.events(),
        vec![
            ev(IN, 7, "a", 100),
            ev(OUT, 7, "a", 100),
            ev(IN, 7, "b", 100)
        ]
    );
    t.at(10_000);
    assert_eq!(
        t.events().len(),
        3,
        "the held exit was logged once, not again"
    );
}

#[test]
fn reentering_after_grace_is_an_exit_then_an_enter() {
    let mut t = T::new();
    t.batch("e1", 1, &[enter(1, 7, "a", 100), exit(1)]);
    t.at(GRACE_MS);
    t.batch("e1", 1, &[enter(2, 7, "a", 100)]);
    assert_eq!(
        t.events(),
        vec![
            ev(IN, 7, "a", 100),
            ev(OUT, 7, "a", 100),
            ev(IN, 7, "a", 100)
        ]
    );
}

#[test]
fn an_expired_lease_ends_every_record_of_the_edge_at_once() {
    let mut t = T::new();
    t.batch(
        "e1",
        1,
        &[
            enter(1, 7, "a", 100),
            enter(2, 8, "a", 100),
            enter(3, 0, "g", 200),
        ],
    );
    t.batch("e2", 1, &[enter(1, 8, "b", 100)]);
    for now in (5_000..=20_000).step_by(5_000) {
        t.at(now);
        let at = t.now();
        t.p.renew(&edge_id("e2"), Incarnation(1), at).unwrap();
    }
    // e1 last renewed at 0: expired at LEASE_MS; e2 renewed every 5 s lives on.
    assert_eq!(t.p.edges(), 1);
    assert_eq!(t.counts(100), (1, 1), "user 8 stays through e2");
    assert_eq!(t.counts(200), (0, 0));
    let exits: Vec<_> = t.events().into_iter().filter(|e| e.0 == OUT).collect();
    assert_eq!(exits, vec![ev(OUT, 7, "a", 100), ev(OUT, 0, "g", 200)]);
    let e = t.p.events_after(0, &Filter::default(), 100).events;
    assert!(e
        .iter()
        .filter(|e| e.kind == OUT)
        .all(|e| e.at == t.base + ms(LEASE_MS)));
    assert_eq!(t.p.stats().leases_expired, 1);
    assert_eq!(t.p.records(), 1);
}

#[test]
fn renewing_keeps_the_lease() {
    let mut t = T::new();
    t.batch("e1", 1, &[enter(1, 7, "a", 100)]);
    assert_eq!(t.p.next_deadline(), Some(t.base + ms(LEASE_MS)));
    t.at(LEASE_MS - 1);
    let now = t.now();
    t.p.renew(&edge_id("e1"), Incarnation(1), now).unwrap();
    t.at(2 * LEASE_MS - 2);
    assert_eq!(t.counts(100), (1, 1));
    t.at(2 * LEASE_MS - 1);
    assert_eq!(t.counts(100), (0, 0));
}

#[test]
fn a_stall_of_the_broker_does_not_count_against_leases() {
    let mut t = T::new();
    t.batch("e1", 1, &[enter(1, 7, "a", 100)]);
    // The broker did not run for 500 ms: the lease ends that much later, and no sooner.
    t.p.defer_leases(ms(500));
    t.at(LEASE_MS + 499);
    assert_eq!(t.counts(100), (1, 1));
    t.at(LEASE_MS + 500);
    assert_eq!(t.counts(100), (0, 0));
    assert_eq!(t.p.stats().leases_expired, 1);
}

#[test]
fn a_restarted_edge_reports_again_and_nothing_counts_twice() {
    let mut t = T::new();
    t.batch("e1", 1, &[enter(1, 7, "a", 100), enter(2, 0, "g", 100)]);
    t.at(2_000);
    // Restart: connection ids start over, the same viewers come back.
    let a = t.batch("e1", 2, &[enter(1, 0, "g", 100), enter(2, 7, "a", 100)]);
    assert_eq!(a.entered, 2);
    assert_eq!(t.counts(100), (2, 2));
    t.at(60_000);
    assert_eq!(t.p.records(), 0, "the lease ran out since");
    let v: Vec<_> = t.events().into_iter().filter(|e| e.0 == IN).collect();
    assert_eq!(v.len(), 2, "no enter logged twice: {:?}", t.events());
    // A late batch of the old incarnation is refused.
    let now = t.now();
    t.p.renew(&edge_id("e1"), Incarnation(3), now).unwrap();
    let err =
        t.p.apply(&edge_id("e1"), Incarnation(2), &[enter(5, 9, "a", 1)], now)
            .unwrap_err();
    assert!(matches!(
        err,
        PresenceError::Stale {
            got: 2,
            current: 3,
            ..
        }
    ));
    assert_eq!(t.p.stats().stale_reports, 1);
}

#[test]
fn a_restarted_edge_whose_viewers_do_not_return_exits_them_after_grace() {
    let mut t = T::new();
    t.batch("e1", 1, &[enter(1, 7, "a", 100)]);
    t.batch("e1", 2, &[]);
    assert_eq!(t.counts(100), (1, 0));
    t.at(GRACE_MS);
    assert_eq!(t.events(), vec![ev(IN, 7, "a", 100), ev(OUT, 7, "a", 100)]);
}

#[test]
fn sync_replaces_the_edge_record_set() {
    let mut t = T::new();
    t.batch("e1", 1, &[enter(1, 7, "a", 100), enter(2, 8, "a", 100)]);
    let now = t.now();
    let a =
        t.p.sync(
            &edge_id("e1"),
            Incarnation(1),
            &[enter_of(2, 8, "a", 100), enter_of(3, 9, "a", 100)],
            now,
        )
        .unwrap();
    assert_eq!((a.exited, a.entered, a.duplicates), (1, 1, 1));
    t.at(GRACE_MS);
    let users = t.p.room(RoomId(100), None, 10).users;
    assert_eq!(users, vec![UserId(8), UserId(9)]);
    assert_eq!(t.counts(100), (2, 2));
}

#[test]
fn the_event_log_resumes_after_a_seq_filters_and_reports_gaps() {
    let mut t = T::with(Limits {
        events_max: 4,
        ..Limits::default()
    });
    for i in 0..3u64 {
        t.batch("e1", 1, &[enter(i, 10 + i, "a", 100 + i)]);
    }
    let all = t.p.events_after(0, &Filter::default(), 100);
    assert_eq!(
        all.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!((all.next_after, all.missed), (3, false));
    // Resume after 1, rooms filter.
    let f = Filter {
        rooms: vec![RoomId(102)],
        areas: vec![],
    };
    let page = t.p.events_after(1, &f, 100);
    assert_eq!(
        page.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![3]
    );
    assert_eq!(page.next_after, 3);
    // Area filter: rooms 100 and 102 are area 0.
    let f = Filter {
        rooms: vec![],
        areas: vec![AreaId(0)],
    };
    let page = t.p.events_after(0, &f, 100);
    assert_eq!(
        page.events.iter().map(|e| e.room.0).collect::<Vec<_>>(),
        vec![100, 102]
    );
    // A limit stops the page; next_after continues it.
    let page = t.p.events_after(0, &Filter::default(), 2);
    assert_eq!(page.next_after, 2);
    assert_eq!(
        t.p.events_after(page.next_after, &Filter::default(), 2)
            .events[0]
            .seq,
        3
    );
    // Past events_max the oldest go; a reader still at 1 has missed some.
    for i in 3..6u64 {
        t.batch("e1", 1, &[enter(i, 10 + i, "a", 100 + i)]);
    }
    assert_eq!(t.p.last_seq(), 6);
    let page = t.p.events_after(1, &Filter::default(), 100);
    assert!(page.missed);
    assert_eq!(page.events.first().map(|e| e.seq), Some(3));
    assert!(!t.p.events_after(2, &Filter::default(), 100).missed);
    assert_eq!(t.p.stats().events_evicted, 2);
    assert_eq!(t.p.events_held(), 4, "the log holds events_max, no more");
    // An id this log never gave (a consumer of a previous broker life) reads from the oldest.
    let page = t.p.events_after(99, &Filter::default(), 100);
    assert!(page.missed);
    assert_eq!(page.events.len(), 4);
    // Nothing new: an empty page that stays where it was.
    let page = t.p.events_after(6, &Filter::default(), 100);
    assert_eq!(
        (page.events.len(), page.next_after, page.missed),
        (0, 6, false)
    );
}

#[test]
fn room_pages_users_in_uid_order() {
    let mut t = T::new();
    let reports: Vec<Report> = (0..25u64)
        .map(|i| enter(i, 1_000 - i * 10, "a", 5))
        .collect();
    t.batch("e1", 1, &reports);
    t.batch("e1", 1, &[enter(100, 0, "g", 5)]);
    let first = t.p.room(RoomId(5), None, 10);
    assert_eq!((first.viewers, first.connections), (26, 26));
    assert_eq!(first.users.len(), 10);
    assert_eq!(first.users[0], UserId(760));
    let mut all = first.users.clone();
    let mut after = first.next_after;
    while let Some(a) = after {
        let page = t.p.room(RoomId(5), Some(a), 10);
        all.extend(&page.users);
        after = page.next_after;
    }
    let want: Vec<UserId> = (0..25u64).rev().map(|i| UserId(1_000 - i * 10)).collect();
    assert_eq!(all, want);
    // An uid between two users starts after it; a huge one gives an empty last page.
    assert_eq!(t.p.room(RoomId(5), Some(UserId(1_000)), 10).users, vec![]);
    assert_eq!(
        t.p.room(RoomId(5), Some(UserId(u64::MAX)), 10).next_after,
        None
    );
    assert_eq!(
        t.p.room(RoomId(5), Some(UserId(985)), 10).users,
        vec![UserId(990), UserId(1_000)]
    );
}

#[test]
fn user_lists_rooms_edges_and_transports() {
    let mut t = T::new();
    t.batch("e1", 1, &[enter(1, 7, "a", 100)]);
    let mut udp = enter_of(4, 7, "b", 200);
    udp.transport = Transport::Udp;
    t.batch("e2", 1, &[Report::Enter(udp), enter(5, 8, "b", 200)]);
    let got: Vec<_> =
        t.p.user(UserId(7))
            .iter()
            .map(|r| (r.room.0, r.edge.0.clone(), r.transport))
            .collect();
    assert_eq!(
        got,
        vec![
            (100, "e1".to_string(), Transport::Ws),
            (200, "e2".to_string(), Transport::Udp)
        ]
    );
    assert!(
        t.p.user(UserId(0)).is_empty(),
        "guests are not indexed by uid"
    );
    t.batch("e2", 1, &[exit(4)]);
    assert_eq!(t.p.user(UserId(7)).len(), 1);
}

#[test]
fn top_lists_the_busiest_rooms() {
    let mut t = T::new();
    let mut conn = 0;
    let mut reports = Vec::new();
    for (room, viewers) in [(1u64, 3u64), (2, 5), (3, 1), (4, 5), (5, 2)] {
        for v in 0..viewers {
            conn += 1;
            reports.push(enter(conn, 1 + v, "a", room));
        }
    }
    // Room 4 gets a second connection of one viewer: same viewers as room 2, more connections.
    reports.push(enter(99, 1, "b", 4));
    t.batch("e1", 1, &reports);
    let top: Vec<_> =
        t.p.top(3)
            .iter()
            .map(|r| (r.room.0, r.viewers, r.connections))
            .collect();
    assert_eq!(top, vec![(4, 5, 6), (2, 5, 5), (1, 3, 3)]);
    assert_eq!(t.p.top(100).len(), 5);
    assert!(t.p.top(0).is_empty());
}

#[test]
fn limits_refuse_cleanly() {
    let mut t = T::with(Limits {
        records_max: 2,
        edges_max: 1,
        pending_exits_max: 1,
        ..Limits::default()
    });
    let a = t.batch(
        "e1",
        1,
        &[
            enter(1, 1, "a", 1),
            enter(2, 2, "a", 1),
            enter(3, 3, "a", 1),
        ],
    );
    assert_eq!((a.entered, a.refused), (2, 1));
    assert_eq!(t.p.stats().refused_records_full, 1);
    let now = t.now();
    assert_eq!(
        t.p.apply(&edge_id("e2"), Incarnation(1), &[], now),
        Err(PresenceError::EdgesFull)
    );
    // One exit may be held; the second is logged at once.
    t.batch("e1", 1, &[exit(1), exit(2)]);
    assert_eq!(t.p.held_exits(), 1);
    assert_eq!(t.p.stats().pending_full, 1);
    assert_eq!(t.events().iter().filter(|e| e.0 == OUT).count(), 1);
}

#[test]
fn next_deadline_is_the_earliest_of_leases_and_held_exits() {
    let mut t = T::new();
    assert_eq!(t.p.next_deadline(), None);
    t.batch("e1", 1, &[enter(1, 7, "a", 100)]);
    t.at(1_000);
    t.batch("e1", 1, &[exit(1)]);
    assert_eq!(t.p.next_deadline(), Some(t.base + ms(1_000 + GRACE_MS)));
    t.at(1_000 + GRACE_MS);
    assert_eq!(t.p.next_deadline(), Some(t.base + ms(1_000 + LEASE_MS)));
}

// ---- the model ----

/// One step of a random run. Edges, connections, users, devices and rooms come from small
/// ranges so that collisions (duplicates, flaps, shared viewers) are frequent.
#[derive(Clone, Debug)]
enum Step {
    /// A batch from an edge: (enter?, conn, uid, device, room) each.
    Batch(u8, Vec<(bool, u8, u8, u8, u8)>),
    Renew(u8),
    /// The edge restarts with a new incarnation and re-reports some of its viewers.
    Restart(u8, Vec<(u8, u8, u8, u8)>),
    Advance(u16),
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    let rec = (any::<bool>(), 0u8..6, 0u8..4, 0u8..3, 0u8..3);
    prop_oneof![
        4 => (0u8..3, proptest::collection::vec(rec, 1..5)).prop_map(|(e, v)| Step::Batch(e, v)),
        2 => (0u8..3).prop_map(Step::Renew),
        1 => (0u8..3, proptest::collection::vec((0u8..6, 0u8..4, 0u8..3, 0u8..3), 0..4))
            .prop_map(|(e, v)| Step::Restart(e, v)),
        3 => (0u16..80).prop_map(Step::Advance),
    ]
}

/// The plain model: the set of live connections, with the same lease rule.
#[derive(Default)]
struct Model {
    /// edge -> (incarnation, lease expiry in ms)
    edges: BTreeMap<u8, (u64, u64)>,
    /// (edge, conn) -> (uid, device, room)
    live: BTreeMap<(u8, u8), (u8, u8, u8)>,
}

impl Model {
    fn live_viewers(&self, room: u8) -> BTreeSet<ViewerKey> {
        self.live
            .iter()
            .filter(|(_, v)| v.2 == room)
            .map(|((e, c), (u, d, _))| key_of(*e, *c, *u, *d))
            .collect()
    }
}

fn key_of(edge: u8, conn: u8, uid: u8, device: u8) -> ViewerKey {
    ViewerKey::of(
        UserId(uid as u64),
        &dev(device),
        &EdgeId(format!("e{edge}")),
        ConnId(conn as u64),
    )
}

fn dev(d: u8) -> DeviceId {
    // Device 0 is the empty id (a guest that cannot be recognised).
    DeviceId(if d == 0 {
        String::new()
    } else {
        format!("d{d}")
    })
}

fn model_enter(conn: u8, uid: u8, device: u8, room: u8) -> Enter {
    Enter {
        conn: ConnId(conn as u64),
        uid: UserId(uid as u64),
        device: dev(device),
        room: RoomId(room as u64),
        area: AreaId(room as u32 % 2),
        transport: Transport::Tcp,
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
    /// Under any run: connection counts equal the model's at every step; every viewer the
    /// model holds is counted; each room's viewer count equals the viewers its event stream
    /// has entered and not exited; per (viewer, room) events alternate enter/exit; seqs have
    /// no gap; once everything settles, viewers and users equal the model's exactly.
    #[test]
    fn presence_matches_the_model(steps in proptest::collection::vec(step(), 1..80)) {
        const GRACE: u64 = 30;
        const LEASE: u64 = 100;
        let mut t = T::with(Limits { grace_ms: GRACE, lease_ms: LEASE, ..Limits::default() });
        let mut m = Model::default();
        let mut open: BTreeMap<(ViewerKey, u64), bool> = BTreeMap::new();
        let mut seen = 0u64;
        for s in steps {
            let now = t.now();
            match s {
                Step::Batch(e, recs) => {
                    let inc = m.edges.get(&e).map_or(1, |x| x.0);
                    m.edges.insert(e, (inc, t.now_ms + LEASE));
                    let reports: Vec<Report> = recs.iter().map(|&(is_enter, c, u, d, r)| {
                        if is_enter {
                            m.live.entry((e, c)).or_insert((u, d, r));
                            Report::Enter(model_enter(c, u, d, r))
                        } else {
                            m.live.remove(&(e, c));
                            Report::Exit(ConnId(c as u64))
                        }
                    }).collect();
                    t.p.apply(&EdgeId(format!("e{e}")), Incarnation(inc), &reports, now).unwrap();
                }
                Step::Renew(e) => {
                    let inc = m.edges.get(&e).map_or(1, |x| x.0);
                    m.edges.insert(e, (inc, t.now_ms + LEASE));
                    t.p.renew(&EdgeId(format!("e{e}")), Incarnation(inc), now).unwrap();
                }
                Step::Restart(e, recs) => {
                    let inc = m.edges.get(&e).map_or(1, |x| x.0 + 1);
                    m.edges.insert(e, (inc, t.now_ms + LEASE));
                    m.live.retain(|k, _| k.0 != e);
                    let live: Vec<Enter> = recs.iter().map(|&(c, u, d, r)| {
                        m.live.entry((e, c)).or_insert((u, d, r));
                        model_enter(c, u, d, r)
                    }).collect();
                    t.p.sync(&EdgeId(format!("e{e}")), Incarnation(inc), &live, now).unwrap();
                }
                Step::Advance(dt) => {
                    let now_ms = t.now_ms + dt as u64;
                    let dead: Vec<u8> = m.edges.iter().filter(|(_, x)| x.1 <= now_ms).map(|(e, _)| *e).collect();
                    for e in dead {
                        m.edges.remove(&e);
                        m.live.retain(|k, _| k.0 != e);
                    }
                    t.at(now_ms);
                }
            }
            // Follow the event stream.
            let page = t.p.events_after(seen, &Filter::default(), EVENTS_PAGE_MAX);
            proptest::prop_assert!(!page.missed);
            for e in &page.events {
                proptest::prop_assert_eq!(e.seq, seen + 1);
                seen = e.seq;
                let key = ViewerKey::of(e.uid, &e.device, &e.edge, e.conn);
                let was = open.insert((key, e.room.0), e.kind == EventKind::Enter).unwrap_or(false);
                proptest::prop_assert_eq!(was, e.kind == EventKind::Exit, "events alternate: {:?}", e);
            }
            proptest::prop_assert_eq!(t.p.records(), m.live.len());
            for room in 0u8..3 {
                let v = t.p.room(RoomId(room as u64), None, PAGE_USERS_MAX);
                let conns = m.live.values().filter(|x| x.2 == room).count();
                proptest::prop_assert_eq!(v.connections as usize, conns);
                let entered: BTreeSet<ViewerKey> = open.iter()
                    .filter(|((_, r), o)| *r == room as u64 && **o)
                    .map(|((k, _), _)| k.clone()).collect();
                proptest::prop_assert_eq!(v.viewers as usize, entered.len());
                let live = m.live_viewers(room);
                proptest::prop_assert!(live.is_subset(&entered), "live {:?} entered {:?}", live, entered);
            }
        }
        // Settle: every lease and every grace runs out.
        let end = t.now_ms + LEASE + GRACE;
        for e in m.edges.keys() {
            let at = t.base + ms(end - 1);
            let inc = m.edges[e].0;
            t.p.renew(&EdgeId(format!("e{e}")), Incarnation(inc), at).unwrap();
        }
        t.at(end);
        proptest::prop_assert_eq!(t.p.held_exits(), 0);
        let page = t.p.events_after(seen, &Filter::default(), EVENTS_PAGE_MAX);
        for e in &page.events {
            let key = ViewerKey::of(e.uid, &e.device, &e.edge, e.conn);
            open.insert((key, e.room.0), e.kind == EventKind::Enter);
        }
        for room in 0u8..3 {
            let live = m.live_viewers(room);
            let entered: BTreeSet<ViewerKey> = open.iter()
                .filter(|((_, r), o)| *r == room as u64 && **o)
                .map(|((k, _), _)| k.clone()).collect();
            proptest::prop_assert_eq!(&live, &entered);
            let v = t.p.room(RoomId(room as u64), None, PAGE_USERS_MAX);
            proptest::prop_assert_eq!(v.viewers as usize, live.len());
            let users: Vec<UserId> = live.iter().filter_map(|k| match k {
                ViewerKey::User(u) => Some(*u),
                _ => None,
            }).collect();
            proptest::prop_assert_eq!(v.users, users);
        }
    }
}
