//! Presence (issue 10, DESIGN §6): who is in which room across the fleet, even when an edge dies.
//! Sans-io: edges' reports, lease renewals and `now` in; counts, queries and an event log out.
//!
//! # Rules
//! - **Records.** Every authenticated connection an edge reports is one [`Record`], keyed by
//!   (edge node id, connection id). Edges report in batches ([`Presence::apply`]), never one
//!   call per event.
//! - **Idempotent.** An enter for a connection already held is a duplicate: ignored, whatever it
//!   says (the first report wins), and counted. An exit for a connection not held is ignored and
//!   counted.
//! - **Viewers.** The unit the business sees is a *viewer of a room*: a logged-in user is one
//!   viewer of a room however many connections (devices, tabs) it has there; the room keeps the
//!   connection count as well. A guest (uid 0) is one viewer per device id (buvid); a guest with
//!   an empty device id cannot be recognised again, so it is one viewer per connection.
//! - **Events.** An `enter` event is logged when a viewer goes from no connection in a room to
//!   one; an `exit` when it goes back to none. Per (viewer, room) the events therefore alternate,
//!   starting with `enter`.
//! - **Flap compensation.** When a viewer's last connection to a room ends, its exit is held for
//!   `grace_ms` (default [`PRESENCE_GRACE_MS`]); the viewer still counts during that time. If
//!   the same viewer enters the same room *from the same device* before then, the held exit is
//!   dropped and nothing is logged: a reconnecting app makes no exit/enter pair. An enter from
//!   another device logs the held exit first, then the enter. Guests without a device id, and
//!   held exits past `pending_exits_max`, exit at once.
//! - **Leases.** Each edge's records live under a lease renewed by its link heartbeat
//!   ([`Presence::renew`]) and by every batch it sends. At `lease_ms` (default
//!   [`PRESENCE_LEASE_MS`]: the link timeout plus a ping) without one, [`Presence::poll`] ends every record
//!   of the edge at once, without grace (its viewers had a whole lease to reconnect elsewhere).
//! - **Incarnations.** An edge that restarts keeps its node id and reports a higher incarnation.
//!   The first report of a new incarnation ends all records of the old one *with* grace, so the
//!   viewers it re-reports (its clients reconnecting) are compensated and nothing is counted
//!   twice. Reports of an older incarnation than the current one are stale and refused.
//!   [`Presence::sync`] replaces an edge's whole record set (after a link reconnect).
//! - **Event log.** Every event gets the next `seq` (1, 2, 3, ... with no gap). The log keeps
//!   the last `events_max`; a reader resumes with [`Presence::events_after`] (SSE
//!   `Last-Event-ID`), filtered by rooms or areas, and is told when it fell behind the log.
//!
//! # Bounds
//! Records (the sum of every edge's connections, and so the user index) are capped by
//! `records_max`, edges by `edges_max`, held exits and their timers by `pending_exits_max`, the
//! log by `events_max`. Rooms exist only while they hold a record or a held exit, so there are
//! at most `records_max + pending_exits_max`. Pages and top lists are capped by
//! [`PAGE_USERS_MAX`] and [`TOP_ROOMS_MAX`].

use proto::id::{AreaId, DeviceId, RoomId, UserId};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

/// Default `presence_grace_ms`: a viewer that reconnects within this long makes no exit/enter pair.
pub const PRESENCE_GRACE_MS: u64 = 5_000;
/// Default `presence_lease_ms`: the default `link_dead_ms` (15 s) plus one 5 s link ping, so a
/// silent edge's link is cut before its presence ends (see `Config::presence_lease_ms`).
pub const PRESENCE_LEASE_MS: u64 = 20_000;
/// Default `presence_records_max`: connections held fleet-wide by one broker.
pub const PRESENCE_RECORDS_MAX: usize = 4_000_000;
/// Default `presence_edges_max`: edge nodes with a lease at once.
pub const PRESENCE_EDGES_MAX: usize = 4_096;
/// Default `presence_pending_exits_max`: exits held for flap compensation at once.
pub const PRESENCE_PENDING_EXITS_MAX: usize = 200_000;
/// Default `presence_events_max`: events kept for readers that resume (SSE `Last-Event-ID`).
pub const PRESENCE_EVENTS_MAX: usize = 100_000;
/// Most users one room page returns.
pub const PAGE_USERS_MAX: usize = 1_000;
/// Most rooms one top list returns.
pub const TOP_ROOMS_MAX: usize = 1_000;
/// Most events one [`Presence::events_after`] call returns.
pub const EVENTS_PAGE_MAX: usize = 10_000;

/// An edge node, by the node id of its link `Hello`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EdgeId(pub String);

/// One run of an edge process; a restarted edge reports a higher one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Incarnation(pub u64);

/// A connection id, unique within one edge incarnation while the connection lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// How the client is connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    Tcp,
    Ws,
    Wss,
    Udp,
}

impl Transport {
    /// Stable name for JSON and metrics labels.
    pub fn label(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Ws => "ws",
            Transport::Wss => "wss",
            Transport::Udp => "udp",
        }
    }
}

/// The limits of one [`Presence`]; every field is a config value of the broker.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub grace_ms: u64,
    pub lease_ms: u64,
    pub records_max: usize,
    pub edges_max: usize,
    pub pending_exits_max: usize,
    pub events_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            grace_ms: PRESENCE_GRACE_MS,
            lease_ms: PRESENCE_LEASE_MS,
            records_max: PRESENCE_RECORDS_MAX,
            edges_max: PRESENCE_EDGES_MAX,
            pending_exits_max: PRESENCE_PENDING_EXITS_MAX,
            events_max: PRESENCE_EVENTS_MAX,
        }
    }
}

/// An edge's report that a connection authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enter {
    pub conn: ConnId,
    pub uid: UserId,
    pub device: DeviceId,
    pub room: RoomId,
    pub area: AreaId,
    pub transport: Transport,
}

/// One entry of an edge's batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Report {
    Enter(Enter),
    Exit(ConnId),
}

/// A live connection as presence holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub uid: UserId,
    pub device: DeviceId,
    pub room: RoomId,
    pub area: AreaId,
    pub edge: EdgeId,
    pub incarnation: Incarnation,
    pub conn: ConnId,
    pub transport: Transport,
    pub since: Instant,
}

/// Why a report was refused as a whole.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PresenceError {
    /// A new edge would pass `edges_max`; its reports are refused until a lease ends.
    #[error("presence holds edges_max edges already")]
    EdgesFull,
    /// The report comes from an older incarnation of the edge than the one already reporting.
    #[error("report from incarnation {got} of edge {edge}, which is at {current}")]
    Stale {
        edge: String,
        got: u64,
        current: u64,
    },
}

/// What one batch changed (for metrics; the events themselves go to the log).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// New records.
    pub entered: u32,
    /// Records ended.
    pub exited: u32,
    /// Enters for a connection already held.
    pub duplicates: u32,
    /// Exits for a connection not held.
    pub unknown_exits: u32,
    /// Enters refused because `records_max` was reached.
    pub refused: u32,
}

/// Counters over the life of a [`Presence`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub duplicate_enters: u64,
    pub unknown_exits: u64,
    pub refused_records_full: u64,
    pub stale_reports: u64,
    pub flaps_compensated: u64,
    pub leases_expired: u64,
    /// Exits logged at once because `pending_exits_max` held exits were waiting.
    pub pending_full: u64,
    /// Events pushed out of the log by newer ones (readers further behind see `missed`).
    pub events_evicted: u64,
}

/// `enter` or `exit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    Enter,
    Exit,
}

impl EventKind {
    pub fn label(self) -> &'static str {
        match self {
            EventKind::Enter => "enter",
            EventKind::Exit => "exit",
        }
    }
}

/// One business-visible event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// 1, 2, 3, ... over the life of this `Presence`; the SSE `id:`.
    pub seq: u64,
    pub kind: EventKind,
    pub uid: UserId,
    pub device: DeviceId,
    pub room: RoomId,
    pub area: AreaId,
    /// The edge of the connection that made the transition.
    pub edge: EdgeId,
    /// The connection that made the transition.
    pub conn: ConnId,
    pub transport: Transport,
    pub at: Instant,
}

/// Which events a reader wants: empty lists mean all; otherwise an event matches if its room is
/// in `rooms` or its area in `areas`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub rooms: Vec<RoomId>,
    pub areas: Vec<AreaId>,
}

impl Filter {
    pub fn matches(&self, e: &Event) -> bool {
        (self.rooms.is_empty() && self.areas.is_empty())
            || self.rooms.contains(&e.room)
            || self.areas.contains(&e.area)
    }
}

/// A page of the event log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventsPage {
    pub events: Vec<Event>,
    /// The seq to pass as `after` next time (the last seq examined, matching or not).
    pub next_after: u64,
    /// Events after the reader's `after` were already evicted: it has a gap.
    pub missed: bool,
}

/// A room as a query sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomView {
    pub room: RoomId,
    /// Users and guests, each once, including viewers whose exit is held for grace.
    pub viewers: u32,
    /// Live connections.
    pub connections: u32,
    /// Logged-in users in uid order, after the page's `after`, at most the page's `limit`.
    pub users: Vec<UserId>,
    /// Pass as `after` for the next page; `None` on the last page.
    pub next_after: Option<UserId>,
}

/// A room in the top list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoomCount {
    pub room: RoomId,
    pub viewers: u32,
    pub connections: u32,
}

/// Who a viewer is, for counting. `User` sorts first so a room's users page by uid.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum ViewerKey {
    User(UserId),
    Device(DeviceId),
    Conn(EdgeId, ConnId),
}

impl ViewerKey {
    fn of(uid: UserId, device: &DeviceId, edge: &EdgeId, conn: ConnId) -> ViewerKey {
        if !uid.is_guest() {
            ViewerKey::User(uid)
        } else if !device.0.is_empty() {
            ViewerKey::Device(device.clone())
        } else {
            ViewerKey::Conn(edge.clone(), conn)
        }
    }
}

/// An exit held for grace: what the exit event will say.
#[derive(Clone, Debug)]
struct Held {
    deadline: Instant,
    uid: UserId,
    device: DeviceId,
    area: AreaId,
    edge: EdgeId,
    conn: ConnId,
    transport: Transport,
}

#[derive(Debug, Default)]
struct Viewer {
    conns: u32,
    /// Some only while `conns == 0`.
    held: Option<Held>,
}

#[derive(Debug)]
struct Room {
    connections: u32,
    viewers: BTreeMap<ViewerKey, Viewer>,
}

#[derive(Debug)]
struct Edge {
    incarnation: Incarnation,
    expires: Instant,
    records: HashMap<ConnId, Record>,
}

/// How a record ends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The connection closed (or its edge restarted): hold the viewer's exit for grace.
    Grace,
    /// The edge's lease expired: exit now.
    Now,
}

/// The presence state of one broker.
#[derive(Debug)]
pub struct Presence {
    limits: Limits,
    edges: HashMap<EdgeId, Edge>,
    rooms: HashMap<RoomId, Room>,
    /// Logged-in users' connections, for the user query.
    users: HashMap<UserId, BTreeSet<(EdgeId, ConnId)>>,
    /// Connections by (non-empty) device id, for routing device pushes.
    devices: HashMap<DeviceId, BTreeSet<(EdgeId, ConnId)>>,
    /// Held exits by deadline.
    held: BTreeSet<(Instant, RoomId, ViewerKey)>,
    records: usize,
    log: VecDeque<Event>,
    next_seq: u64,
    stats: Stats,
}

impl Presence {
    pub fn new(limits: Limits) -> Presence {
        Presence {
            limits,
            edges: HashMap::new(),
            rooms: HashMap::new(),
            users: HashMap::new(),
            devices: HashMap::new(),
            held: BTreeSet::new(),
            records: 0,
            log: VecDeque::new(),
            next_seq: 1,
            stats: Stats::default(),
        }
    }

    /// Renews `edge`'s lease (link heartbeat). A new edge starts a lease; a higher incarnation
    /// first ends every record of the old one, with grace.
    pub fn renew(
        &mut self,
        edge: &EdgeId,
        incarnation: Incarnation,
        now: Instant,
    ) -> Result<(), PresenceError> {
        let expires = now + ms(self.limits.lease_ms);
        let full = self.edges.len() >= self.limits.edges_max;
        match self.edges.get_mut(edge) {
            Some(e) if e.incarnation == incarnation => {
                e.expires = expires;
                Ok(())
            }
            Some(e) if e.incarnation > incarnation => {
                self.stats.stale_reports += 1;
                Err(PresenceError::Stale {
                    edge: edge.0.clone(),
                    got: incarnation.0,
                    current: e.incarnation.0,
                })
            }
            Some(_) => {
                self.end_edge(edge, Ending::Grace, now);
                self.edges
                    .insert(edge.clone(), Edge::new(incarnation, expires));
                Ok(())
            }
            None if full => Err(PresenceError::EdgesFull),
            None => {
                self.edges
                    .insert(edge.clone(), Edge::new(incarnation, expires));
                Ok(())
            }
        }
    }

    /// Applies one batch of an edge's reports, in order. The batch also renews the lease.
    pub fn apply(
        &mut self,
        edge: &EdgeId,
        incarnation: Incarnation,
        reports: &[Report],
        now: Instant,
    ) -> Result<Applied, PresenceError> {
        self.renew(edge, incarnation, now)?;
        let mut applied = Applied::default();
        for r in reports {
            match r {
                Report::Enter(enter) => self.enter(edge, incarnation, enter, now, &mut applied),
                Report::Exit(conn) => {
                    if self.end_record(edge, *conn, Ending::Grace, now) {
                        applied.exited += 1;
                    } else {
                        applied.unknown_exits += 1;
                        self.stats.unknown_exits += 1;
                    }
                }
            }
        }
        Ok(applied)
    }

    /// Replaces `edge`'s records by `live` (its full list, after a link reconnect): records not
    /// listed end with grace, listed ones already held are kept as they are.
    pub fn sync(
        &mut self,
        edge: &EdgeId,
        incarnation: Incarnation,
        live: &[Enter],
        now: Instant,
    ) -> Result<Applied, PresenceError> {
        self.renew(edge, incarnation, now)?;
        let mut applied = Applied::default();
        let keep: HashSet<ConnId> = live.iter().map(|e| e.conn).collect();
        let gone: Vec<ConnId> = self
            .edges
            .get(edge)
            .map(|e| {
                e.records
                    .keys()
                    .filter(|c| !keep.contains(c))
                    .copied()
                    .collect()
            })
            .unwrap_or_default();
        for conn in gone {
            if self.end_record(edge, conn, Ending::Grace, now) {
                applied.exited += 1;
            }
        }
        for enter in live {
            self.enter(edge, incarnation, enter, now, &mut applied);
        }
        Ok(applied)
    }

    /// Replaces `edge`'s whole record set with `live` as [`Presence::sync`] does, except that a
    /// held connection whose report differs (another user, device or room under the same
    /// connection id: the edge restarted and reused it) is ended with grace and entered
    /// again. For another region's edges (`crate::mirror`): their announcements are whole
    /// sets, from any of that region's brokers, and carry no incarnation.
    pub fn replace(
        &mut self,
        edge: &EdgeId,
        incarnation: Incarnation,
        live: &[Enter],
        now: Instant,
    ) -> Result<Applied, PresenceError> {
        self.renew(edge, incarnation, now)?;
        let mut applied = Applied::default();
        let keep: HashMap<ConnId, &Enter> = live.iter().map(|e| (e.conn, e)).collect();
        let gone: Vec<ConnId> = self
            .edges
            .get(edge)
            .map(|e| {
                let mut gone: Vec<ConnId> = e
                    .records
                    .values()
                    .filter(|r| match keep.get(&r.conn) {
                        Some(n) => n.uid != r.uid || n.device != r.device || n.room != r.room,
                        None => true,
                    })
                    .map(|r| r.conn)
                    .collect();
                gone.sort_unstable();
                gone
            })
            .unwrap_or_default();
        for conn in gone {
            if self.end_record(edge, conn, Ending::Grace, now) {
                applied.exited += 1;
            }
        }
        for enter in live {
            let held = self
                .edges
                .get(edge)
                .is_some_and(|e| e.records.contains_key(&enter.conn));
            if !held {
                self.enter(edge, incarnation, enter, now, &mut applied);
            }
        }
        Ok(applied)
    }

    /// The live connections of `edge` as reports (in connection order), to announce them.
    pub fn edge_records(&self, edge: &EdgeId) -> Vec<Enter> {
        let Some(e) = self.edges.get(edge) else {
            return Vec::new();
        };
        let mut v: Vec<Enter> = e
            .records
            .values()
            .map(|r| Enter {
                conn: r.conn,
                uid: r.uid,
                device: r.device.clone(),
                room: r.room,
                area: r.area,
                transport: r.transport,
            })
            .collect();
        v.sort_unstable_by_key(|e| e.conn);
        v
    }

    /// Ends expired leases (every record of the edge, at once) and logs held exits whose grace
    /// is over.
    pub fn poll(&mut self, now: Instant) {
        let expired: Vec<EdgeId> = self
            .edges
            .iter()
            .filter(|(_, e)| e.expires <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for edge in expired {
            self.stats.leases_expired += 1;
            self.end_edge(&edge, Ending::Now, now);
            self.edges.remove(&edge);
        }
        while let Some(first) = self.held.first() {
            if first.0 > now {
                break;
            }
            let Some((_, room, key)) = self.held.pop_first() else {
                break;
            };
            self.log_held_exit(room, &key, now);
        }
    }

    /// Moves every lease's end `by` later: the broker itself did not run for that long (a
    /// stopped or starved process), so the edges' renewals sat unread in its sockets and the
    /// silence is not theirs. Without this a broker paused longer than the lease ends every
    /// edge's records and cuts healthy links when it resumes.
    pub fn defer_leases(&mut self, by: Duration) {
        for e in self.edges.values_mut() {
            e.expires += by;
        }
    }

    /// When [`Presence::poll`] has work next.
    pub fn next_deadline(&self) -> Option<Instant> {
        let lease = self.edges.values().map(|e| e.expires).min();
        let held = self.held.first().map(|h| h.0);
        match (lease, held) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn enter(
        &mut self,
        edge: &EdgeId,
        incarnation: Incarnation,
        e: &Enter,
        now: Instant,
        applied: &mut Applied,
    ) {
        let Some(state) = self.edges.get_mut(edge) else {
            return;
        };
        if state.records.contains_key(&e.conn) {
            applied.duplicates += 1;
            self.stats.duplicate_enters += 1;
            return;
        }
        if self.records >= self.limits.records_max {
            applied.refused += 1;
            self.stats.refused_records_full += 1;
            return;
        }
        let record = Record {
            uid: e.uid,
            device: e.device.clone(),
            room: e.room,
            area: e.area,
            edge: edge.clone(),
            incarnation,
            conn: e.conn,
            transport: e.transport,
            since: now,
        };
        state.records.insert(e.conn, record.clone());
        self.records += 1;
        applied.entered += 1;
        if !e.uid.is_guest() {
            self.users
                .entry(e.uid)
                .or_default()
                .insert((edge.clone(), e.conn));
        }
        if !e.device.0.is_empty() {
            self.devices
                .entry(e.device.clone())
                .or_default()
                .insert((edge.clone(), e.conn));
        }
        let key = ViewerKey::of(e.uid, &e.device, edge, e.conn);
        let room = self.rooms.entry(e.room).or_insert_with(|| Room {
            connections: 0,
            viewers: BTreeMap::new(),
        });
        room.connections += 1;
        let viewer = room.viewers.entry(key.clone()).or_default();
        viewer.conns += 1;
        if viewer.conns > 1 {
            return;
        }
        match viewer.held.take() {
            None => self.log(EventKind::Enter, &record, now),
            Some(held) => {
                self.held.remove(&(held.deadline, e.room, key));
                if held.device == e.device {
                    self.stats.flaps_compensated += 1;
                } else {
                    self.log_exit_of(&held, e.room, now);
                    self.log(EventKind::Enter, &record, now);
                }
            }
        }
    }

    /// Ends one record; false if the edge holds no such connection.
    fn end_record(&mut self, edge: &EdgeId, conn: ConnId, ending: Ending, now: Instant) -> bool {
        let Some(record) = self
            .edges
            .get_mut(edge)
            .and_then(|e| e.records.remove(&conn))
        else {
            return false;
        };
        self.forget(record, ending, now);
        true
    }

    /// Ends every record of `edge` (which stays in the map; callers replace or remove it).
    fn end_edge(&mut self, edge: &EdgeId, ending: Ending, now: Instant) {
        let Some(e) = self.edges.get_mut(edge) else {
            return;
        };
        let mut records: Vec<Record> = e.records.drain().map(|(_, r)| r).collect();
        // Deterministic event order whatever the hash map's.
        records.sort_by_key(|r| r.conn);
        for r in records {
            self.forget(r, ending, now);
        }
    }

    /// Takes a removed record out of the room, viewer and user indexes.
    fn forget(&mut self, r: Record, ending: Ending, now: Instant) {
        self.records -= 1;
        if !r.uid.is_guest() {
            if let Some(set) = self.users.get_mut(&r.uid) {
                set.remove(&(r.edge.clone(), r.conn));
                if set.is_empty() {
                    self.users.remove(&r.uid);
                }
            }
        }
        if let Some(set) = self.devices.get_mut(&r.device) {
            set.remove(&(r.edge.clone(), r.conn));
            if set.is_empty() {
                self.devices.remove(&r.device);
            }
        }
        let key = ViewerKey::of(r.uid, &r.device, &r.edge, r.conn);
        let Some(room) = self.rooms.get_mut(&r.room) else {
            return;
        };
        room.connections = room.connections.saturating_sub(1);
        let Some(viewer) = room.viewers.get_mut(&key) else {
            return;
        };
        viewer.conns = viewer.conns.saturating_sub(1);
        if viewer.conns > 0 {
            return;
        }
        let can_hold = ending == Ending::Grace
            && !matches!(key, ViewerKey::Conn(..))
            && self.held.len() < self.limits.pending_exits_max;
        if can_hold {
            let deadline = now + ms(self.limits.grace_ms);
            viewer.held = Some(Held {
                deadline,
                uid: r.uid,
                device: r.device.clone(),
                area: r.area,
                edge: r.edge.clone(),
                conn: r.conn,
                transport: r.transport,
            });
            self.held.insert((deadline, r.room, key));
            return;
        }
        if ending == Ending::Grace && !matches!(key, ViewerKey::Conn(..)) {
            self.stats.pending_full += 1;
        }
        room.viewers.remove(&key);
        if room.viewers.is_empty() {
            self.rooms.remove(&r.room);
        }
        self.log(EventKind::Exit, &r, now);
    }

    /// Logs the exit of a held viewer whose grace ended.
    fn log_held_exit(&mut self, room_id: RoomId, key: &ViewerKey, now: Instant) {
        let Some(room) = self.rooms.get_mut(&room_id) else {
            return;
        };
        let Some(held) = room.viewers.get_mut(key).and_then(|v| v.held.take()) else {
            return;
        };
        room.viewers.remove(key);
        if room.viewers.is_empty() {
            self.rooms.remove(&room_id);
        }
        self.log_exit_of(&held, room_id, now);
    }

    fn log_exit_of(&mut self, held: &Held, room: RoomId, now: Instant) {
        self.push_event(Event {
            seq: 0,
            kind: EventKind::Exit,
            uid: held.uid,
            device: held.device.clone(),
            room,
            area: held.area,
            edge: held.edge.clone(),
            conn: held.conn,
            transport: held.transport,
            at: now,
        });
    }

    fn log(&mut self, kind: EventKind, r: &Record, now: Instant) {
        self.push_event(Event {
            seq: 0,
            kind,
            uid: r.uid,
            device: r.device.clone(),
            room: r.room,
            area: r.area,
            edge: r.edge.clone(),
            conn: r.conn,
            transport: r.transport,
            at: now,
        });
    }

    fn push_event(&mut self, mut e: Event) {
        e.seq = self.next_seq;
        self.next_seq += 1;
        self.log.push_back(e);
        while self.log.len() > self.limits.events_max {
            self.log.pop_front();
            self.stats.events_evicted += 1;
        }
    }

    /// Events with a seq above `after` that match `filter`, at most `limit` (capped by
    /// [`EVENTS_PAGE_MAX`]). `after = 0` reads from the oldest event held.
    pub fn events_after(&self, after: u64, filter: &Filter, limit: usize) -> EventsPage {
        let limit = limit.min(EVENTS_PAGE_MAX);
        let oldest = self.log.front().map_or(self.next_seq, |e| e.seq);
        // A reader is behind if events after its `after` were evicted, or ahead if it holds a
        // seq this log never gave (a broker restart begins again at 1): both read from the oldest.
        let missed = (after > 0 && after.saturating_add(1) < oldest) || after > self.last_seq();
        let start = if missed { 0 } else { after };
        // Seqs in the log are consecutive, so the first one after `start` is found by index.
        let skip =
            usize::try_from(start.saturating_add(1).saturating_sub(oldest)).unwrap_or(usize::MAX);
        let mut events = Vec::new();
        let mut next_after = start.max(oldest.saturating_sub(1));
        for e in self.log.iter().skip(skip) {
            if events.len() >= limit {
                break;
            }
            next_after = e.seq;
            if filter.matches(e) {
                events.push(e.clone());
            }
        }
        EventsPage {
            events,
            next_after,
            missed,
        }
    }

    /// The seq of the oldest event held (`last_seq() + 1` when none is).
    pub fn first_seq(&self) -> u64 {
        self.log.front().map_or(self.next_seq, |e| e.seq)
    }

    /// The seq of the newest event (0 before the first).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// A room's counts and one page of its logged-in users, in uid order after `after`.
    pub fn room(&self, room: RoomId, after: Option<UserId>, limit: usize) -> RoomView {
        let limit = limit.min(PAGE_USERS_MAX);
        let Some(r) = self.rooms.get(&room) else {
            return RoomView {
                room,
                viewers: 0,
                connections: 0,
                users: Vec::new(),
                next_after: None,
            };
        };
        let from = match after {
            Some(uid) => std::ops::Bound::Excluded(ViewerKey::User(uid)),
            None => std::ops::Bound::Unbounded,
        };
        let mut users = Vec::new();
        let mut more = false;
        for key in r
            .viewers
            .range((from, std::ops::Bound::Unbounded))
            .map(|(k, _)| k)
        {
            let ViewerKey::User(uid) = key else {
                break;
            };
            if users.len() == limit {
                more = true;
                break;
            }
            users.push(*uid);
        }
        RoomView {
            room,
            viewers: u32::try_from(r.viewers.len()).unwrap_or(u32::MAX),
            connections: r.connections,
            next_after: if more { users.last().copied() } else { None },
            users,
        }
    }

    /// Every live connection of a logged-in user, by (edge, connection id).
    pub fn user(&self, uid: UserId) -> Vec<&Record> {
        let Some(set) = self.users.get(&uid) else {
            return Vec::new();
        };
        set.iter()
            .filter_map(|(edge, conn)| self.edges.get(edge)?.records.get(conn))
            .collect()
    }

    /// The `n` rooms with the most viewers (ties: more connections, then lower room id first).
    pub fn top(&self, n: usize) -> Vec<RoomCount> {
        let n = n.min(TOP_ROOMS_MAX);
        let mut all: Vec<RoomCount> = self
            .rooms
            .iter()
            .map(|(room, r)| RoomCount {
                room: *room,
                viewers: u32::try_from(r.viewers.len()).unwrap_or(u32::MAX),
                connections: r.connections,
            })
            .collect();
        let order = |a: &RoomCount, b: &RoomCount| {
            (b.viewers, b.connections, a.room).cmp(&(a.viewers, a.connections, b.room))
        };
        if all.len() > n && n > 0 {
            all.select_nth_unstable_by(n - 1, order);
            all.truncate(n);
        } else if n == 0 {
            all.clear();
        }
        all.sort_unstable_by(order);
        all
    }

    /// The edges holding a connection of a logged-in user.
    pub fn edges_of_user(&self, uid: UserId) -> BTreeSet<&EdgeId> {
        self.users
            .get(&uid)
            .map(|s| s.iter().map(|(e, _)| e).collect())
            .unwrap_or_default()
    }

    /// The edges holding a connection of a device.
    pub fn edges_of_device(&self, device: &DeviceId) -> BTreeSet<&EdgeId> {
        self.devices
            .get(device)
            .map(|s| s.iter().map(|(e, _)| e).collect())
            .unwrap_or_default()
    }

    /// The incarnation of `edge`'s lease, if it holds one.
    pub fn incarnation(&self, edge: &EdgeId) -> Option<Incarnation> {
        self.edges.get(edge).map(|e| e.incarnation)
    }

    /// Rooms with at least one viewer (or a held exit).
    pub fn rooms(&self) -> usize {
        self.rooms.len()
    }

    /// Live records (connections) held.
    pub fn records(&self) -> usize {
        self.records
    }

    /// Edges with a lease.
    pub fn edges(&self) -> usize {
        self.edges.len()
    }

    /// Exits held for grace.
    pub fn held_exits(&self) -> usize {
        self.held.len()
    }

    /// Events held in the log for readers that resume (at most `events_max`).
    pub fn events_held(&self) -> usize {
        self.log.len()
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }
}

impl Edge {
    fn new(incarnation: Incarnation, expires: Instant) -> Edge {
        Edge {
            incarnation,
            expires,
            records: HashMap::new(),
        }
    }
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

#[cfg(test)]
mod tests;
