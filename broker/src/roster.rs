//! Presence, wired (issue 10): the broker's one [`Presence`] behind a lock, fed by the edges'
//! PRESENCE frames and link heartbeats, expired by shard 0's clock, read by the HTTP API
//! (`/v1/presence/...`, a key with the `presence` scope) and used to send user and device
//! pushes only to the edges that hold that user or device.
//!
//! # Invariants
//! - Every edge node reports on its (broker shard 0, Low) link; every frame it sends renews its
//!   lease there. The lock is taken once per PRESENCE frame or PING, per shard-0 tick and per
//!   user/device batch, never across an `.await`.
//! - An edge whose lease expired while its link stayed up (a long stall) would keep sending
//!   deltas for records the broker already ended: its next PING is answered by cutting the link
//!   ([`Renewal::Lost`]), and the edge re-links and re-reports everything.
//! - Routing narrows only for nodes that report presence: a node that never sent a PRESENCE
//!   frame (presence off, an older build) keeps getting every user and device batch.

use crate::metrics::Cut;
use crate::mirror;
use crate::policy::KeyId;
use crate::presence::{
    self, Applied, EdgeId, Enter, Event, Filter, Incarnation, Limits, Presence, Report,
};
use crate::{Config, ScopeKind, Shared};
use net::http::{Request, Response};
use proto::id::{AreaId, RoomId, Scope, UserId};
use proto::link::{PresenceBatch, PresenceKind};
use serde_json::json;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Default `presence_streams_max`: event streams open at once.
pub const PRESENCE_STREAMS_MAX: usize = 64;
/// Default `presence_stream_lag_events_max`: how far behind a stream's consumer may fall.
pub const PRESENCE_STREAM_LAG_EVENTS_MAX: u64 = 10_000;
/// Rooms or areas one events filter may name.
pub const FILTER_IDS_MAX: usize = 256;
/// Default page sizes of the HTTP API.
pub const ROOM_PAGE_DEFAULT: usize = 100;
pub const TOP_DEFAULT: usize = 10;
pub const EVENTS_PAGE_DEFAULT: usize = 1_000;

/// The incarnation another region's edges are held under here: their announcements are
/// whole sets and carry none of their own (see [`crate::mirror`]).
const REMOTE_INCARNATION: Incarnation = Incarnation(1);

/// What a heartbeat did to an edge's lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Renewal {
    /// Renewed, or the node does not report presence.
    Ok,
    /// The lease expired while the link stayed up: cut the link so the edge re-reports.
    Lost,
}

struct Inner {
    presence: Presence,
    /// Nodes that reported presence at least once (their lease may have expired since).
    reporting: HashSet<EdgeId>,
    /// Open event streams (SSE and ingest subscriptions), told of new events.
    followers: Vec<Arc<Follower>>,
    /// The last seq followers were told of.
    told: u64,
    /// Set when the mirror runs (regions): local edges changed since the mirror last looked.
    mirrored: bool,
    changed: HashSet<EdgeId>,
}

/// One open event stream as the roster sees it: how far its consumer has read, and how to
/// wake it or cut it. The consumer side is [`crate::feed::Feed`].
pub struct Follower {
    id: u64,
    /// The seq the stream was opened at; events up to it are a backlog read from the log and
    /// do not count against the lag.
    start: u64,
    /// The last seq the consumer has taken or skipped (published by the consumer).
    pub(crate) cursor: AtomicU64,
    /// `cursor` as the roster saw it when it last told this follower (under the roster's lock).
    seen: AtomicU64,
    /// Set once when the roster cuts the stream (it fell `lag_max` events behind).
    pub(crate) cut: AtomicBool,
    /// Wakes the consumer: new events, or the cut.
    pub(crate) wake: Arc<net::wake::Notify>,
    /// Wakes the connection's watcher on a cut (SSE: the HTTP connection task).
    pub(crate) cut_signal: Arc<net::wake::Notify>,
}

/// Why a stream could not be opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FollowError {
    /// `presence_streams_max` streams are open.
    Full,
}

/// Counters of the wiring (the state machine's own are in [`presence::Stats`]).
#[derive(Default)]
struct Counters {
    frames: AtomicU64,
    enters: AtomicU64,
    exits: AtomicU64,
    refused_frames: AtomicU64,
    leases_lost: AtomicU64,
    queries: AtomicU64,
    query_errors: AtomicU64,
    narrowed_batches: AtomicU64,
    streams_opened: AtomicU64,
    streams_refused: AtomicU64,
    streams_stalled: AtomicU64,
    streams_open: AtomicU64,
    next_follower: AtomicU64,
    count_pushes: AtomicU64,
    catchup_kept: AtomicU64,
    catchup_sent: AtomicU64,
    catchup_dropped: AtomicU64,
    catchup_bytes: AtomicU64,
    mirror_announced: AtomicU64,
    mirror_sets: AtomicU64,
    mirror_renewals: AtomicU64,
    mirror_bad: AtomicU64,
    mirror_parts_dropped: AtomicU64,
    mirror_refused: AtomicU64,
}

/// The broker's presence. See the module docs.
pub struct Roster {
    inner: Mutex<Inner>,
    counters: Counters,
    streams_max: usize,
    lag_max: u64,
}

impl Roster {
    pub fn new(config: &Config) -> Roster {
        let limits = Limits {
            grace_ms: config.presence_grace_ms,
            lease_ms: config.presence_lease_ms(),
            records_max: config.presence_records_max,
            edges_max: config.presence_edges_max,
            pending_exits_max: config.presence_pending_exits_max,
            events_max: config.presence_events_max,
        };
        Roster {
            inner: Mutex::new(Inner {
                presence: Presence::new(limits),
                reporting: HashSet::new(),
                followers: Vec::new(),
                told: 0,
                mirrored: false,
                changed: HashSet::new(),
            }),
            counters: Counters::default(),
            streams_max: config.presence_streams_max,
            lag_max: config.presence_stream_lag_events_max,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves consistent enough state to read.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One PRESENCE frame from node `node`.
    pub fn on_report(&self, node: &str, batch: PresenceBatch, now: Instant) {
        self.counters.frames.fetch_add(1, Relaxed);
        let reports: Vec<Report> = batch
            .events
            .into_iter()
            .map(|e| match e.kind {
                PresenceKind::Enter => Report::Enter(Enter {
                    conn: presence::ConnId(e.conn),
                    uid: e.uid,
                    device: e.device,
                    room: e.room,
                    area: e.area,
                    transport: transport(e.transport),
                }),
                PresenceKind::Exit => Report::Exit(presence::ConnId(e.conn)),
            })
            .collect();
        let edge = EdgeId(node.to_string());
        let mut inner = self.lock();
        match inner
            .presence
            .apply(&edge, Incarnation(batch.incarnation), &reports, now)
        {
            Ok(Applied {
                entered, exited, ..
            }) => {
                self.counters.enters.fetch_add(u64::from(entered), Relaxed);
                self.counters.exits.fetch_add(u64::from(exited), Relaxed);
                if inner.mirrored {
                    inner.changed.insert(edge.clone());
                }
                inner.reporting.insert(edge);
            }
            Err(e) => {
                self.counters.refused_frames.fetch_add(1, Relaxed);
                tracing::warn!(node, error = %e, "presence report refused");
            }
        }
        self.tell(&mut inner);
    }

    /// A link heartbeat (PING) from node `node`.
    pub fn on_ping(&self, node: &str, now: Instant) -> Renewal {
        let edge = EdgeId(node.to_string());
        let mut inner = self.lock();
        match inner.presence.incarnation(&edge) {
            Some(inc) => {
                let _ = inner.presence.renew(&edge, inc, now);
                self.tell(&mut inner);
                Renewal::Ok
            }
            None if inner.reporting.remove(&edge) => {
                self.counters.leases_lost.fetch_add(1, Relaxed);
                Renewal::Lost
            }
            None => Renewal::Ok,
        }
    }

    /// Ends expired leases and held exits past their grace (shard 0's clock).
    pub fn poll(&self, now: Instant) {
        let mut inner = self.lock();
        inner.presence.poll(now);
        self.tell(&mut inner);
    }

    /// Starts noting which of this region's edges changed, for [`Roster::announcements`].
    pub fn mirror_on(&self) {
        self.lock().mirrored = true;
    }

    /// This region's presence announcements due at `now` (see [`crate::mirror`]): whole sets
    /// of edges that changed (or every `MIRROR_FULL_MS`), renewals of the others.
    pub fn announcements(
        &self,
        out: &mut mirror::Outbox,
        now: Instant,
    ) -> Vec<mirror::Announcement> {
        let mut inner = self.lock();
        let changed = std::mem::take(&mut inner.changed);
        let inner = &*inner;
        let mut local: Vec<&EdgeId> = inner
            .reporting
            .iter()
            .filter(|e| inner.presence.incarnation(e).is_some())
            .collect();
        local.sort_unstable();
        let mut v = Vec::new();
        for edge in local {
            if out.set_due(edge, changed.contains(edge), now) {
                v.extend(out.set(edge, &inner.presence.edge_records(edge), now));
            } else if let Some(a) = out.renew(edge, now) {
                v.push(a);
            }
        }
        out.retain(|e| inner.reporting.contains(e) && inner.presence.incarnation(e).is_some());
        self.counters
            .mirror_announced
            .fetch_add(v.len() as u64, Relaxed);
        v
    }

    /// One announcement heard from another region (see [`crate::mirror`]).
    pub fn hear(&self, inbox: &mut mirror::Inbox, payload: &[u8], now: Instant) {
        let apply = inbox.hear(payload);
        let c = &self.counters;
        c.mirror_bad.store(inbox.stats.bad, Relaxed);
        c.mirror_parts_dropped
            .store(inbox.stats.parts_dropped, Relaxed);
        let mut inner = self.lock();
        let done = match apply {
            mirror::Apply::Set(edge, set) => {
                c.mirror_sets.fetch_add(1, Relaxed);
                inner
                    .presence
                    .replace(&edge, REMOTE_INCARNATION, &set, now)
                    .map(|_| ())
            }
            mirror::Apply::Renew(edge) => {
                c.mirror_renewals.fetch_add(1, Relaxed);
                // A renewal of an edge whose set never arrived here waits for the next set.
                match inner.presence.incarnation(&edge) {
                    Some(inc) => inner.presence.renew(&edge, inc, now),
                    None => Ok(()),
                }
            }
            mirror::Apply::Nothing => Ok(()),
        };
        if let Err(e) = done {
            c.mirror_refused.fetch_add(1, Relaxed);
            tracing::warn!(error = %e, "presence announcement refused");
        }
        self.tell(&mut inner);
    }

    /// Tells every follower of new events; cuts (and counts) those that made no progress
    /// since the last time they were told while more than `lag_max` events behind what they
    /// were told then, past their backlog. A consumer that keeps reading is never cut, however
    /// large a burst (an edge's lease ending logs all its exits at once).
    fn tell(&self, inner: &mut Inner) {
        let last = inner.presence.last_seq();
        if last == inner.told {
            return;
        }
        let told = std::mem::replace(&mut inner.told, last);
        let lag_max = self.lag_max;
        inner.followers.retain(|f| {
            let cursor = f.cursor.load(Relaxed);
            let read = cursor.max(f.start);
            let stuck = f.seen.swap(cursor, Relaxed) == cursor;
            if stuck && told.saturating_sub(read) > lag_max {
                f.cut.store(true, Relaxed);
                f.wake.notify();
                f.cut_signal.notify();
                self.counters.streams_stalled.fetch_add(1, Relaxed);
                tracing::info!(
                    follower = f.id,
                    behind = last - read,
                    "presence stream cut: consumer too slow"
                );
                false
            } else {
                f.wake.notify();
                true
            }
        });
    }

    /// Opens an event stream: events with a seq above `after` are read from the log (the
    /// caller's backlog), later ones as they happen. `None` starts at the newest event.
    pub(crate) fn follow(&self, after: Option<u64>) -> Result<(Arc<Follower>, u64), FollowError> {
        let mut inner = self.lock();
        if inner.followers.len() >= self.streams_max {
            self.counters.streams_refused.fetch_add(1, Relaxed);
            return Err(FollowError::Full);
        }
        let last = inner.presence.last_seq();
        let f = Arc::new(Follower {
            id: self.counters.next_follower.fetch_add(1, Relaxed),
            start: last,
            cursor: AtomicU64::new(after.unwrap_or(last)),
            seen: AtomicU64::new(u64::MAX),
            cut: AtomicBool::new(false),
            wake: net::wake::Notify::new(),
            cut_signal: net::wake::Notify::new(),
        });
        inner.followers.push(f.clone());
        self.counters.streams_opened.fetch_add(1, Relaxed);
        self.counters.streams_open.fetch_add(1, Relaxed);
        Ok((f, after.unwrap_or(last)))
    }

    /// Closes a stream (its consumer left, or it was cut).
    pub(crate) fn unfollow(&self, f: &Follower) {
        let mut inner = self.lock();
        inner.followers.retain(|g| g.id != f.id);
        self.counters.streams_open.fetch_sub(1, Relaxed);
    }

    /// A page of the log for a stream (see [`Presence::events_after`]) and the oldest seq held.
    pub(crate) fn read(
        &self,
        after: u64,
        filter: &Filter,
        limit: usize,
    ) -> (presence::EventsPage, u64) {
        let inner = self.lock();
        let page = inner.presence.events_after(after, filter, limit);
        (page, inner.presence.first_seq())
    }

    /// See [`crate::presence::Presence::defer_leases`].
    pub fn defer_leases(&self, by: std::time::Duration) {
        self.lock().presence.defer_leases(by);
    }

    /// When [`Roster::poll`] has work next.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.lock().presence.next_deadline()
    }

    /// Keeps, of `targets` (edge links for a user or device batch), the links of nodes that
    /// hold that user or device, and those of nodes that do not report presence.
    pub fn narrow<T>(&self, scope: &Scope, targets: &mut Vec<T>, node_of: impl Fn(&T) -> String) {
        let inner = self.lock();
        let holders = match scope {
            Scope::User(uid) => inner.presence.edges_of_user(*uid),
            Scope::Device(d) => inner.presence.edges_of_device(d),
            _ => return,
        };
        let before = targets.len();
        targets.retain(|t| {
            let node = EdgeId(node_of(t));
            holders.contains(&node) || !inner.reporting.contains(&node)
        });
        if targets.len() < before {
            self.counters.narrowed_batches.fetch_add(1, Relaxed);
        }
    }

    /// Shard 0's catch-up counters (see crate::catchup), for the metrics.
    pub fn catchup_stats(&self, s: crate::catchup::Stats, bytes: usize) {
        let c = &self.counters;
        c.catchup_kept.store(s.kept, Relaxed);
        c.catchup_sent.store(s.sent, Relaxed);
        c.catchup_dropped.store(s.dropped_full, Relaxed);
        c.catchup_bytes.store(bytes as u64, Relaxed);
    }

    /// Appends the presence metrics.
    pub fn write_metrics(&self, w: &mut net::metrics::Writer) {
        let (records, edges, rooms, held, events, stats) = {
            let inner = self.lock();
            let p = &inner.presence;
            let events = p.events_held();
            (
                p.records(),
                p.edges(),
                p.rooms(),
                p.held_exits(),
                events,
                p.stats(),
            )
        };
        let gauge = |w: &mut net::metrics::Writer, name: &str, help: &str, v: f64| {
            w.family(name, "gauge", help);
            w.sample(name, &[], v);
        };
        gauge(
            w,
            "barrage_broker_presence_records",
            "Live connections presence holds (fleet-wide, as edges reported them).",
            records as f64,
        );
        gauge(
            w,
            "barrage_broker_presence_edges",
            "Edge nodes with a presence lease.",
            edges as f64,
        );
        gauge(
            w,
            "barrage_broker_presence_rooms",
            "Rooms with at least one viewer.",
            rooms as f64,
        );
        gauge(
            w,
            "barrage_broker_presence_held_exits",
            "Exits held for flap compensation.",
            held as f64,
        );
        gauge(
            w,
            "barrage_broker_presence_events",
            "Events held in the log for readers that resume (at most presence_events_max).",
            events as f64,
        );
        let c = &self.counters;
        let counter = |w: &mut net::metrics::Writer, name: &str, help: &str, v: u64| {
            w.family(name, "counter", help);
            w.sample(name, &[], v as f64);
        };
        counter(
            w,
            "barrage_broker_presence_frames_total",
            "PRESENCE frames received from edges.",
            c.frames.load(Relaxed),
        );
        counter(
            w,
            "barrage_broker_presence_frames_refused_total",
            "PRESENCE frames refused (stale incarnation or presence_edges_max).",
            c.refused_frames.load(Relaxed),
        );
        counter(
            w,
            "barrage_broker_presence_records_entered_total",
            "Records created by edge reports.",
            c.enters.load(Relaxed),
        );
        counter(
            w,
            "barrage_broker_presence_records_exited_total",
            "Records ended by edge reports.",
            c.exits.load(Relaxed),
        );
        counter(
            w,
            "barrage_broker_presence_leases_lost_total",
            "Links cut because their edge's presence lease had expired (the edge re-reports).",
            c.leases_lost.load(Relaxed),
        );
        counter(
            w,
            "barrage_broker_presence_queries_total",
            "Presence API requests answered.",
            c.queries.load(Relaxed),
        );
        counter(
            w,
            "barrage_broker_presence_query_errors_total",
            "Presence API requests refused (auth, scope, bad parameters).",
            c.query_errors.load(Relaxed),
        );
        gauge(
            w,
            "barrage_broker_presence_streams",
            "Presence event streams open (SSE and ingest subscriptions).",
            c.streams_open.load(Relaxed) as f64,
        );
        counter(
            w,
            "barrage_broker_presence_streams_opened_total",
            "Presence event streams opened.",
            c.streams_opened.load(Relaxed),
        );
        counter(
            w,
            "barrage_broker_presence_streams_refused_total",
            "Presence event streams refused at presence_streams_max.",
            c.streams_refused.load(Relaxed),
        );
        counter(
            w,
            "barrage_broker_presence_streams_stalled_total",
            "Presence event streams cut because their consumer fell presence_stream_lag_events_max events behind.",
            c.streams_stalled.load(Relaxed),
        );
        counter(
            w,
            "barrage_broker_count_pushes_total",
            "ONLINE_RANK_COUNT messages pushed to rooms (count_push_rooms, count_push_all_rooms).",
            c.count_pushes.load(Relaxed),
        );
        counter(
            w,
            "barrage_broker_presence_narrowed_batches_total",
            "User and device batches sent to fewer edges thanks to presence.",
            c.narrowed_batches.load(Relaxed),
        );
        counter(
            w,
            "barrage_broker_presence_catchup_kept_total",
            "Narrowed user and device batches held for edges that report the user late.",
            c.catchup_kept.load(Relaxed),
        );
        counter(
            w,
            "barrage_broker_presence_catchup_sent_total",
            "Held batches sent to an edge after it reported a late enter.",
            c.catchup_sent.load(Relaxed),
        );
        counter(
            w,
            "barrage_broker_presence_catchup_dropped_total",
            "Held batches dropped before their window ended (presence_catchup_bytes_max).",
            c.catchup_dropped.load(Relaxed),
        );
        gauge(
            w,
            "barrage_broker_presence_catchup_bytes",
            "Bytes held for late enters.",
            c.catchup_bytes.load(Relaxed) as f64,
        );
        for (name, help, v) in [
            (
                "barrage_broker_presence_duplicate_enters_total",
                "Enters for a connection already held (ignored).",
                stats.duplicate_enters,
            ),
            (
                "barrage_broker_presence_unknown_exits_total",
                "Exits for a connection not held (ignored).",
                stats.unknown_exits,
            ),
            (
                "barrage_broker_presence_refused_records_total",
                "Enters refused at presence_records_max.",
                stats.refused_records_full,
            ),
            (
                "barrage_broker_presence_stale_reports_total",
                "Reports from an older incarnation of an edge (refused).",
                stats.stale_reports,
            ),
            (
                "barrage_broker_presence_flaps_compensated_total",
                "Reconnects within presence_grace_ms that made no exit/enter pair.",
                stats.flaps_compensated,
            ),
            (
                "barrage_broker_presence_leases_expired_total",
                "Edge leases that expired (every record of the edge exited).",
                stats.leases_expired,
            ),
            (
                "barrage_broker_presence_events_evicted_total",
                "Events pushed out of the log by newer ones.",
                stats.events_evicted,
            ),
            (
                "barrage_broker_presence_mirror_announced_total",
                "Presence announcements of this region's edges sent to the other regions (set parts and renewals).",
                c.mirror_announced.load(Relaxed),
            ),
            (
                "barrage_broker_presence_mirror_sets_total",
                "Whole edge record sets applied from other regions.",
                c.mirror_sets.load(Relaxed),
            ),
            (
                "barrage_broker_presence_mirror_renewals_total",
                "Lease renewals of other regions' edges applied.",
                c.mirror_renewals.load(Relaxed),
            ),
            (
                "barrage_broker_presence_mirror_bad_total",
                "Presence announcements that did not parse or broke a limit (dropped).",
                c.mirror_bad.load(Relaxed),
            ),
            (
                "barrage_broker_presence_mirror_parts_dropped_total",
                "Parts of other regions' record sets dropped (a lost part, or MIRROR_PENDING_RECORDS_MAX).",
                c.mirror_parts_dropped.load(Relaxed),
            ),
            (
                "barrage_broker_presence_mirror_refused_total",
                "Other regions' sets or renewals presence refused (presence_edges_max).",
                c.mirror_refused.load(Relaxed),
            ),
        ] {
            counter(w, name, help, v);
        }
    }

    /// Serves `GET /v1/presence/{rest}` (the path after `/v1/presence/`).
    pub(crate) fn http(&self, shared: &Shared, req: &Request, rest: &str) -> Response {
        let r = self.query(shared, req, rest);
        match r {
            Ok(v) => {
                self.counters.queries.fetch_add(1, Relaxed);
                Response::json(200, &v)
            }
            Err(resp) => {
                self.counters.query_errors.fetch_add(1, Relaxed);
                resp
            }
        }
    }

    fn query(
        &self,
        shared: &Shared,
        req: &Request,
        rest: &str,
    ) -> Result<serde_json::Value, Response> {
        check_key(shared, req)?;
        let (what, arg) = rest.split_once('/').unwrap_or((rest, ""));
        let inner = self.lock();
        let p = &inner.presence;
        match (what, arg) {
            ("room", id) => {
                let room = RoomId(parse_u64(id, "room")?);
                let after = match req.query_param("after") {
                    None | Some("") => None,
                    Some(a) => Some(UserId(parse_u64(a, "after")?)),
                };
                let limit = parse_limit(req, ROOM_PAGE_DEFAULT, presence::PAGE_USERS_MAX)?;
                let v = p.room(room, after, limit);
                Ok(json!({
                    "room": v.room.0,
                    "viewers": v.viewers,
                    "connections": v.connections,
                    "users": v.users.iter().map(|u| u.0).collect::<Vec<_>>(),
                    "next_after": v.next_after.map(|u| u.0),
                }))
            }
            ("user", id) => {
                let uid = UserId(parse_u64(id, "uid")?);
                if uid.0 == 0 {
                    return Err(bad("uid 0 is every guest; ask by room instead"));
                }
                let now = Instant::now();
                let conns: Vec<serde_json::Value> = p
                    .user(uid)
                    .into_iter()
                    .map(|r| {
                        json!({
                            "room": r.room.0,
                            "area": r.area.0,
                            "edge": r.edge.0,
                            "transport": r.transport.label(),
                            "device": r.device.0,
                            "connected_ms": now.saturating_duration_since(r.since).as_millis() as u64,
                        })
                    })
                    .collect();
                Ok(json!({"uid": uid.0, "connections": conns}))
            }
            ("top", "") => {
                let limit = parse_limit(req, TOP_DEFAULT, presence::TOP_ROOMS_MAX)?;
                let rooms: Vec<serde_json::Value> = p
                    .top(limit)
                    .into_iter()
                    .map(|r| {
                        json!({"room": r.room.0, "viewers": r.viewers, "connections": r.connections})
                    })
                    .collect();
                // Fleet-wide totals: every live connection, and every room with a viewer.
                Ok(json!({
                    "rooms": rooms,
                    "connections": p.records(),
                    "rooms_total": p.rooms(),
                }))
            }
            ("events", "") => {
                let after = parse_after(req)?.unwrap_or(0);
                let filter = parse_filter(req)?;
                let limit = parse_limit(req, EVENTS_PAGE_DEFAULT, presence::EVENTS_PAGE_MAX)?;
                let page = p.events_after(after, &filter, limit);
                Ok(json!({
                    "events": page.events.iter().map(event_json).collect::<Vec<_>>(),
                    "next_after": page.next_after,
                    "missed": page.missed,
                    "last_seq": p.last_seq(),
                }))
            }
            _ => Err(Response::error(
                404,
                "not_found",
                "presence endpoints: room/{room}, user/{uid}, top, events",
            )),
        }
    }
}

impl Roster {
    /// Counts `ONLINE_RANK_COUNT` messages pushed (see crate::online).
    pub(crate) fn count_pushes(&self, n: usize) {
        self.counters.count_pushes.fetch_add(n as u64, Relaxed);
    }

    /// Counts a presence request answered (`ok`) or refused.
    pub(crate) fn count_query(&self, ok: bool) {
        let c = if ok {
            &self.counters.queries
        } else {
            &self.counters.query_errors
        };
        c.fetch_add(1, Relaxed);
    }
}

/// The request's key must be known and hold the `presence` scope.
pub(crate) fn check_key(shared: &Shared, req: &Request) -> Result<(), Response> {
    let key = authorize(shared, req)?;
    if !shared.policy.load().allows(key, ScopeKind::Presence) {
        return Err(Response::error(
            403,
            "forbidden_scope",
            "this API key lacks the presence scope",
        ));
    }
    Ok(())
}

/// Where an events reader resumes: `?after=` or, failing that, `Last-Event-ID`.
pub(crate) fn parse_after(req: &Request) -> Result<Option<u64>, Response> {
    match (req.query_param("after"), req.header("last-event-id")) {
        (Some(a), _) | (None, Some(a)) if !a.trim().is_empty() => {
            parse_u64(a.trim(), "after").map(Some)
        }
        _ => Ok(None),
    }
}

/// `?rooms=1,2&areas=3`.
pub(crate) fn parse_filter(req: &Request) -> Result<Filter, Response> {
    filter_of(
        parse_ids(req.query_param("rooms"), "rooms")?,
        parse_ids(req.query_param("areas"), "areas")?,
    )
    .map_err(|e| bad(&e))
}

/// A filter from raw ids (HTTP query or ingest `SUBSCRIBE`), checked.
pub(crate) fn filter_of(rooms: Vec<u64>, areas: Vec<u64>) -> Result<Filter, String> {
    if rooms.len() > FILTER_IDS_MAX || areas.len() > FILTER_IDS_MAX {
        return Err(format!(
            "at most {FILTER_IDS_MAX} rooms and {FILTER_IDS_MAX} areas"
        ));
    }
    Ok(Filter {
        rooms: rooms.into_iter().map(RoomId).collect(),
        areas: areas
            .into_iter()
            .map(|a| u32::try_from(a).map(AreaId))
            .collect::<Result<_, _>>()
            .map_err(|_| "area ids are below 2^32".to_string())?,
    })
}

fn authorize(shared: &Shared, req: &Request) -> Result<KeyId, Response> {
    let Some(k) = req.bearer() else {
        return Err(Response::error(
            401,
            "unauthorized",
            "send Authorization: Bearer <api key>",
        ));
    };
    shared
        .policy
        .load()
        .authenticate(k)
        .map_err(|_| Response::error(401, "unauthorized", "unknown API key"))
}

fn bad(message: &str) -> Response {
    Response::error(400, "invalid", message)
}

fn parse_u64(s: &str, what: &str) -> Result<u64, Response> {
    s.parse::<u64>()
        .map_err(|_| bad(&format!("{what} must be a whole number from 0 to 2^64-1")))
}

fn parse_limit(req: &Request, default: usize, max: usize) -> Result<usize, Response> {
    match req.query_param("limit") {
        None | Some("") => Ok(default),
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(bad(&format!("limit must be from 1 to {max}"))),
        },
    }
}

fn parse_ids(v: Option<&str>, what: &str) -> Result<Vec<u64>, Response> {
    let Some(v) = v.filter(|v| !v.is_empty()) else {
        return Ok(Vec::new());
    };
    let ids: Vec<u64> = v
        .split(',')
        .map(|s| parse_u64(s.trim(), what))
        .collect::<Result<_, _>>()?;
    if ids.len() > FILTER_IDS_MAX {
        return Err(bad(&format!("at most {FILTER_IDS_MAX} {what}")));
    }
    Ok(ids)
}

pub(crate) fn event_json(e: &Event) -> serde_json::Value {
    json!({
        "seq": e.seq,
        "type": e.kind.label(),
        "uid": e.uid.0,
        "device": e.device.0,
        "room": e.room.0,
        "area": e.area.0,
        "edge": e.edge.0,
        "transport": e.transport.label(),
    })
}

fn transport(t: proto::link::Transport) -> presence::Transport {
    match t {
        proto::link::Transport::Tcp => presence::Transport::Tcp,
        proto::link::Transport::Ws => presence::Transport::Ws,
        proto::link::Transport::Wss => presence::Transport::Wss,
        proto::link::Transport::Udp => presence::Transport::Udp,
    }
}

/// The cut reason for a lost lease (a link that must re-link to re-report).
pub const LEASE_LOST_CUT: Cut = Cut::Dead;
