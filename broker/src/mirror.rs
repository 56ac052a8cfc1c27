//! Presence across regions (issue 13, sans-io): every region's presence holds the viewers of
//! every region, so a user who moves from region A to region B (A died, or the client walked
//! its `host_list`) is one viewer throughout and makes no exit/enter pair.
//!
//! # How
//! - **Announce.** Each broker of a federated region announces its region's edges' record
//!   sets on the core NATS subject `<cluster.presence_subject>.<region>` (through the
//!   backbone thread; the subject crosses the leafnodes as the stream sources do). An edge's
//!   whole set goes out when it changed ([`Outbox`], at most once per [`MIRROR_FLUSH_MS`]) and
//!   every [`MIRROR_FULL_MS`] anyway (that repairs a lost announcement); in between a small
//!   `renew` every `presence_lease_ms / 4` keeps the edge's lease in the other regions.
//! - **Apply.** Every broker of every other region hears them ([`Inbox`]) and applies a whole
//!   set with [`Presence::replace`] under the edge id `<region>/<edge>` and one lease per
//!   such edge (`presence_lease_ms`, renewed by every announcement). From there the rules of
//!   [`crate::presence`] hold as for local edges: a user is one viewer however many
//!   connections it has, in whichever regions, so its connection in region B keeps the
//!   viewer while its record from dead region A waits for the lease to end, and a record that
//!   left a set ends with grace.
//! - **Several brokers per region** each announce the same edges (each holds the whole view
//!   of its region). Any of them may be applied: the sets converge within a flush, and a
//!   record missing from one broker's set for less than `presence_grace_ms` is compensated
//!   like a flap.
//!
//! # Why core NATS and whole sets, not a stream of deltas
//! Presence is state, not a log: a region that was away needs the current sets, not the
//! history, and a stream replayed after a partition would apply old records. Whole sets make
//! every announcement idempotent and self-repairing, so the at-most-once delivery of core
//! NATS costs at most [`MIRROR_FULL_MS`] of a wrong view, never a lasting one. The cost is an
//! edge's whole set per change per flush; a set is split in parts of
//! [`MIRROR_RECORDS_PER_PART`] records.
//!
//! # Bounds
//! Remote records and edges count against the same `presence_records_max` and
//! `presence_edges_max` as local ones. Parts of sets being assembled are capped by
//! [`MIRROR_PENDING_RECORDS_MAX`]; announcements queued for the broker by
//! [`MIRROR_QUEUE_MAX`]. Past either, announcements are dropped and counted; the next full set
//! repairs the view.

use crate::presence::{ConnId, EdgeId, Enter, Transport};
use proto::id::{AreaId, DeviceId, RoomId, UserId};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How often the mirror thread hears and announces.
pub const MIRROR_FLUSH_MS: u64 = 250;
/// An edge's whole set is announced at least this often, changed or not.
pub const MIRROR_FULL_MS: u64 = 10_000;
/// Records in one announcement (a part of a set): 45 to 170 KB of JSON, far under NATS's
/// default 1 MB payload.
pub const MIRROR_RECORDS_PER_PART: usize = 1_000;
/// Parts of one set at most (so a set holds at most 4M records).
pub const MIRROR_PARTS_MAX: u32 = 4_096;
/// Records held in sets not yet complete, over every remote edge.
pub const MIRROR_PENDING_RECORDS_MAX: usize = 1_000_000;
/// Announcements heard and not yet applied (the channel from the backbone thread).
pub const MIRROR_QUEUE_MAX: usize = 4_096;
/// Longest edge or broker name in an announcement, bytes.
pub const MIRROR_NAME_BYTES_MAX: usize = 128;

/// Wire version of an announcement.
const VERSION: u8 = 1;

/// What an announcement says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// One part of the edge's whole record set.
    Set,
    /// The edge is alive and its set unchanged: renew its lease.
    Renew,
}

/// One record: `[conn, uid, device, room, area, transport]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wire(u64, u64, String, u64, u64, String);

/// One presence announcement, JSON on `<presence_subject>.<region>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    pub v: u8,
    pub region: String,
    pub broker: String,
    pub edge: String,
    pub kind: Kind,
    /// The announcing broker's set number for this edge (parts of one set share it).
    #[serde(default)]
    pub set: u64,
    #[serde(default)]
    pub part: u32,
    #[serde(default)]
    pub parts: u32,
    #[serde(default)]
    pub records: Vec<Wire>,
}

/// Counters of the mirror (rendered as `barrage_broker_presence_mirror_*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Announcements sent (parts and renewals).
    pub announced: u64,
    /// Whole sets applied from other regions.
    pub sets_applied: u64,
    /// Renewals applied.
    pub renewals: u64,
    /// Announcements that did not parse or break a limit.
    pub bad: u64,
    /// Parts dropped: out of order (a lost part) or past `MIRROR_PENDING_RECORDS_MAX`.
    pub parts_dropped: u64,
    /// Sets or renewals presence refused (`presence_edges_max`).
    pub refused: u64,
}

/// What an edge looks like from this broker's announcing side.
#[derive(Debug)]
struct Sent {
    set: u64,
    full_at: Instant,
    renewed_at: Instant,
}

/// The announcing side: which of this region's edges to announce now, and how.
#[derive(Debug)]
pub struct Outbox {
    region: String,
    broker: String,
    renew_every: Duration,
    sent: HashMap<EdgeId, Sent>,
    next_set: u64,
}

impl Outbox {
    pub fn new(region: &str, broker: &str, lease_ms: u64) -> Outbox {
        Outbox {
            region: region.to_owned(),
            broker: broker.to_owned(),
            renew_every: Duration::from_millis((lease_ms / 4).max(1)),
            sent: HashMap::new(),
            next_set: 1,
        }
    }

    /// Whether `edge`'s whole set is due: it changed since the last one, or the last one is
    /// older than [`MIRROR_FULL_MS`], or none went out yet.
    pub fn set_due(&self, edge: &EdgeId, changed: bool, now: Instant) -> bool {
        match self.sent.get(edge) {
            None => true,
            Some(s) => changed || now.saturating_duration_since(s.full_at) >= ms(MIRROR_FULL_MS),
        }
    }

    /// `edge`'s whole set, as announcements (one per [`MIRROR_RECORDS_PER_PART`]; one empty
    /// part for an empty set).
    pub fn set(&mut self, edge: &EdgeId, records: &[Enter], now: Instant) -> Vec<Announcement> {
        let set = self.next_set;
        self.next_set += 1;
        self.sent.insert(
            edge.clone(),
            Sent {
                set,
                full_at: now,
                renewed_at: now,
            },
        );
        let chunks: Vec<&[Enter]> = match records.is_empty() {
            true => vec![&[]],
            false => records.chunks(MIRROR_RECORDS_PER_PART).collect(),
        };
        let parts = u32::try_from(chunks.len()).unwrap_or(u32::MAX);
        chunks
            .into_iter()
            .enumerate()
            .map(|(i, chunk)| Announcement {
                v: VERSION,
                region: self.region.clone(),
                broker: self.broker.clone(),
                edge: edge.0.clone(),
                kind: Kind::Set,
                set,
                part: u32::try_from(i).unwrap_or(u32::MAX),
                parts,
                records: chunk.iter().map(wire).collect(),
            })
            .collect()
    }

    /// A renewal of `edge` when one is due (and no set went out since).
    pub fn renew(&mut self, edge: &EdgeId, now: Instant) -> Option<Announcement> {
        let s = self.sent.get_mut(edge)?;
        if now.saturating_duration_since(s.renewed_at) < self.renew_every {
            return None;
        }
        s.renewed_at = now;
        Some(Announcement {
            v: VERSION,
            region: self.region.clone(),
            broker: self.broker.clone(),
            edge: edge.0.clone(),
            kind: Kind::Renew,
            set: s.set,
            part: 0,
            parts: 0,
            records: Vec::new(),
        })
    }

    /// Forgets edges this broker no longer holds (their lease ended here): the other regions'
    /// leases end on their own, one lease later, since another broker of this region may still
    /// hold the edge and announce it.
    pub fn retain(&mut self, live: impl Fn(&EdgeId) -> bool) {
        self.sent.retain(|e, _| live(e));
    }
}

/// A set being assembled from its parts.
#[derive(Debug)]
struct Pending {
    broker: String,
    set: u64,
    parts: u32,
    got: u32,
    records: Vec<Enter>,
}

/// What an announcement heard asks of presence.
#[derive(Debug, PartialEq, Eq)]
pub enum Apply {
    /// Replace the remote edge's records by this whole set.
    Set(EdgeId, Vec<Enter>),
    /// Renew the remote edge's lease.
    Renew(EdgeId),
    /// Nothing yet (a part of a set) or nothing at all (dropped, counted).
    Nothing,
}

/// The hearing side: parses announcements, assembles sets, says what to apply.
#[derive(Debug)]
pub struct Inbox {
    me: String,
    pending: HashMap<EdgeId, Pending>,
    pending_records: usize,
    pub stats: Stats,
}

impl Inbox {
    /// `me`: this broker's region (its own announcements are not applied).
    pub fn new(me: &str) -> Inbox {
        Inbox {
            me: me.to_owned(),
            pending: HashMap::new(),
            pending_records: 0,
            stats: Stats::default(),
        }
    }

    /// One announcement's payload. Bad input is counted, never a panic.
    pub fn hear(&mut self, payload: &[u8]) -> Apply {
        let Some(a) = parse(payload).filter(|a| a.region != self.me) else {
            self.stats.bad += 1;
            return Apply::Nothing;
        };
        let edge = remote_edge(&a.region, &a.edge);
        match a.kind {
            Kind::Renew => Apply::Renew(edge),
            Kind::Set => self.part(edge, a),
        }
    }

    fn part(&mut self, edge: EdgeId, a: Announcement) -> Apply {
        let mut records = Vec::with_capacity(a.records.len());
        for w in &a.records {
            match unwire(w) {
                Some(e) => records.push(e),
                None => {
                    self.stats.bad += 1;
                    return Apply::Nothing;
                }
            }
        }
        if a.part == 0 {
            self.drop_pending(&edge);
            if a.parts == 1 {
                return Apply::Set(edge, records);
            }
            if self.pending_records + records.len() > MIRROR_PENDING_RECORDS_MAX {
                self.stats.parts_dropped += 1;
                return Apply::Nothing;
            }
            self.pending_records += records.len();
            self.pending.insert(
                edge,
                Pending {
                    broker: a.broker,
                    set: a.set,
                    parts: a.parts,
                    got: 1,
                    records,
                },
            );
            return Apply::Nothing;
        }
        let fits = self.pending_records + records.len() <= MIRROR_PENDING_RECORDS_MAX;
        let next = self.pending.get(&edge).is_some_and(|p| {
            p.broker == a.broker && p.set == a.set && p.parts == a.parts && p.got == a.part
        });
        if !next || !fits {
            self.stats.parts_dropped += 1;
            self.drop_pending(&edge);
            return Apply::Nothing;
        }
        self.pending_records += records.len();
        let Some(p) = self.pending.get_mut(&edge) else {
            return Apply::Nothing;
        };
        p.records.extend(records);
        p.got += 1;
        if p.got < p.parts {
            return Apply::Nothing;
        }
        match self.pending.remove(&edge) {
            Some(p) => {
                self.pending_records -= p.records.len();
                Apply::Set(edge, p.records)
            }
            None => Apply::Nothing,
        }
    }

    fn drop_pending(&mut self, edge: &EdgeId) {
        if let Some(p) = self.pending.remove(edge) {
            self.pending_records -= p.records.len();
        }
    }

    /// Records held in sets not yet complete.
    pub fn pending_records(&self) -> usize {
        self.pending_records
    }
}

/// The presence edge id of another region's edge.
pub fn remote_edge(region: &str, edge: &str) -> EdgeId {
    EdgeId(format!("{region}/{edge}"))
}

/// Parses and checks one announcement.
pub fn parse(payload: &[u8]) -> Option<Announcement> {
    let a: Announcement = serde_json::from_slice(payload).ok()?;
    let name_ok = |n: &str| !n.is_empty() && n.len() <= MIRROR_NAME_BYTES_MAX;
    let ok = a.v == VERSION
        && backbone::region::valid_name(&a.region)
        && name_ok(&a.edge)
        && name_ok(&a.broker)
        && a.records.len() <= MIRROR_RECORDS_PER_PART
        && match a.kind {
            Kind::Set => a.parts >= 1 && a.parts <= MIRROR_PARTS_MAX && a.part < a.parts,
            Kind::Renew => a.records.is_empty(),
        };
    ok.then_some(a)
}

fn wire(e: &Enter) -> Wire {
    Wire(
        e.conn.0,
        e.uid.0,
        e.device.0.clone(),
        e.room.0,
        u64::from(e.area.0),
        e.transport.label().to_owned(),
    )
}

fn unwire(w: &Wire) -> Option<Enter> {
    let transport = match w.5.as_str() {
        "tcp" => Transport::Tcp,
        "ws" => Transport::Ws,
        "wss" => Transport::Wss,
        "udp" => Transport::Udp,
        _ => return None,
    };
    if w.2.len() > proto::limits::DEVICE_BYTES_MAX {
        return None;
    }
    Some(Enter {
        conn: ConnId(w.0),
        uid: UserId(w.1),
        device: DeviceId(w.2.clone()),
        room: RoomId(w.3),
        area: AreaId(w.4.try_into().ok()?),
        transport,
    })
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::{EventKind, Filter, Incarnation, Limits, Presence};

    fn enter(conn: u64, uid: u64, room: u64) -> Enter {
        Enter {
            conn: ConnId(conn),
            uid: UserId(uid),
            device: DeviceId(format!("d{uid}")),
            room: RoomId(room),
            area: AreaId(1),
            transport: Transport::Tcp,
        }
    }

    fn bytes(a: &Announcement) -> Vec<u8> {
        serde_json::to_vec(a).unwrap()
    }

    fn kinds(p: &Presence) -> Vec<(EventKind, u64)> {
        p.events_after(0, &Filter::default(), 100)
            .events
            .iter()
            .map(|e| (e.kind, e.uid.0))
            .collect()
    }

    #[test]
    fn a_set_round_trips_in_parts_and_a_lost_part_drops_it() {
        let t0 = Instant::now();
        let edge = EdgeId("e1".into());
        let mut out = Outbox::new("r1", "b1", 20_000);
        let records: Vec<Enter> = (0..2_500).map(|i| enter(i, i + 1, 7)).collect();
        let parts = out.set(&edge, &records, t0);
        assert_eq!(parts.len(), 3);
        // The size the docs state: a full part of 1,000 records (64-byte device ids, large ids)
        // stays far under NATS's default 1 MB payload.
        let big: Vec<Enter> = (0..MIRROR_RECORDS_PER_PART as u64)
            .map(|i| Enter {
                device: DeviceId("d".repeat(proto::limits::DEVICE_BYTES_MAX)),
                ..enter(u64::MAX - i, u64::MAX - i, u64::MAX - i)
            })
            .collect();
        let part = bytes(&out.set(&EdgeId("e9".into()), &big, t0)[0]);
        assert!(part.len() < 200_000, "{} bytes", part.len());
        let mut inbox = Inbox::new("r2");
        assert_eq!(inbox.hear(&bytes(&parts[0])), Apply::Nothing);
        assert_eq!(inbox.hear(&bytes(&parts[1])), Apply::Nothing);
        assert_eq!(
            inbox.hear(&bytes(&parts[2])),
            Apply::Set(EdgeId("r1/e1".into()), records.clone())
        );
        assert_eq!(inbox.pending_records(), 0);
        // A lost middle part: the set is dropped and counted, nothing applied.
        let parts = out.set(&edge, &records, t0);
        assert_eq!(inbox.hear(&bytes(&parts[0])), Apply::Nothing);
        assert_eq!(inbox.hear(&bytes(&parts[2])), Apply::Nothing);
        assert_eq!(inbox.stats.parts_dropped, 1);
        assert_eq!(inbox.pending_records(), 0);
        // Its own region's announcements and garbage are refused and counted.
        let mut own = Inbox::new("r1");
        assert_eq!(own.hear(&bytes(&parts[0])), Apply::Nothing);
        assert_eq!(own.hear(b"{not json"), Apply::Nothing);
        assert_eq!(
            own.hear(br#"{"v":1,"region":"a.b","broker":"b","edge":"e","kind":"renew"}"#),
            Apply::Nothing
        );
        assert_eq!(own.stats.bad, 3);
    }

    #[test]
    fn renewals_are_due_every_quarter_lease_and_sets_on_change_or_every_full_period() {
        let t0 = Instant::now();
        let edge = EdgeId("e1".into());
        let mut out = Outbox::new("r1", "b1", 20_000);
        assert!(out.set_due(&edge, false, t0), "never sent");
        out.set(&edge, &[], t0);
        assert!(!out.set_due(&edge, false, t0));
        assert!(out.set_due(&edge, true, t0));
        assert!(out.renew(&edge, t0 + ms(4_000)).is_none());
        assert!(out.renew(&edge, t0 + ms(5_000)).is_some());
        assert!(out.set_due(&edge, false, t0 + ms(MIRROR_FULL_MS)));
    }

    /// The move the mirror exists for: a user seen in region 1 through the mirror connects to
    /// region 2 while region 1's record is still under its lease (region 1 died): no event;
    /// the lease ends: no event; the user leaves: one exit after the grace.
    #[test]
    fn a_user_who_moves_regions_makes_no_pair_and_exits_once() {
        let t0 = Instant::now();
        let limits = Limits::default();
        let mut p = Presence::new(limits);
        let mut inbox = Inbox::new("r2");
        let mut out = Outbox::new("r1", "b1", limits.lease_ms);
        for a in out.set(&EdgeId("e1".into()), &[enter(1, 42, 7)], t0) {
            let Apply::Set(edge, set) = inbox.hear(&bytes(&a)) else {
                panic!("a one-part set applies at once");
            };
            p.replace(&edge, Incarnation(1), &set, t0).unwrap();
        }
        assert_eq!(kinds(&p), [(EventKind::Enter, 42)]);
        assert_eq!(p.room(RoomId(7), None, 10).viewers, 1);
        // Region 1 dies; the user reaches region 2's edge.
        let t1 = t0 + ms(1_000);
        p.apply(
            &EdgeId("e2".into()),
            Incarnation(9),
            &[crate::presence::Report::Enter(enter(5, 42, 7))],
            t1,
        )
        .unwrap();
        assert_eq!(p.room(RoomId(7), None, 10).viewers, 1);
        // Region 1's lease ends (no renewal came); region 2's edge renews its own.
        let t2 = t0 + ms(limits.lease_ms);
        p.renew(&EdgeId("e2".into()), Incarnation(9), t2).unwrap();
        p.poll(t2);
        assert_eq!(p.room(RoomId(7), None, 10).connections, 1);
        assert_eq!(kinds(&p), [(EventKind::Enter, 42)], "no pair");
        // The user leaves for good: one exit after the grace.
        p.apply(
            &EdgeId("e2".into()),
            Incarnation(9),
            &[crate::presence::Report::Exit(ConnId(5))],
            t2,
        )
        .unwrap();
        let t3 = t2 + ms(limits.grace_ms);
        p.renew(&EdgeId("e2".into()), Incarnation(9), t3).unwrap();
        p.poll(t3);
        assert_eq!(kinds(&p), [(EventKind::Enter, 42), (EventKind::Exit, 42)]);
    }

    /// A user leaves a live region 1's edge and reaches region 2's from the same device within
    /// the grace: region 1's next set drops the record (held for grace), region 2's enter takes
    /// the held exit back. No event either way.
    #[test]
    fn a_user_who_leaves_a_live_region_within_the_grace_makes_no_pair() {
        let t0 = Instant::now();
        let mut p = Presence::new(Limits::default());
        let remote = EdgeId("r1/e1".into());
        p.replace(&remote, Incarnation(1), &[enter(1, 42, 7)], t0)
            .unwrap();
        let t1 = t0 + ms(500);
        p.replace(&remote, Incarnation(1), &[], t1).unwrap();
        p.apply(
            &EdgeId("e2".into()),
            Incarnation(9),
            &[crate::presence::Report::Enter(enter(5, 42, 7))],
            t1 + ms(1_000),
        )
        .unwrap();
        p.poll(t1 + ms(Limits::default().grace_ms * 2));
        assert_eq!(kinds(&p), [(EventKind::Enter, 42)]);
        assert_eq!(p.stats().flaps_compensated, 1);
    }

    #[test]
    fn replace_reenters_a_reused_connection_id_and_keeps_the_rest() {
        let t0 = Instant::now();
        let mut p = Presence::new(Limits::default());
        let edge = EdgeId("r1/e1".into());
        p.replace(
            &edge,
            Incarnation(1),
            &[enter(1, 42, 7), enter(2, 43, 7)],
            t0,
        )
        .unwrap();
        // Same set again (another broker of region 1): nothing changes.
        p.replace(
            &edge,
            Incarnation(1),
            &[enter(1, 42, 7), enter(2, 43, 7)],
            t0,
        )
        .unwrap();
        assert_eq!(p.records(), 2);
        // Connection 2 now is user 44 (the edge restarted and reused the id).
        p.replace(
            &edge,
            Incarnation(1),
            &[enter(1, 42, 7), enter(2, 44, 7)],
            t0,
        )
        .unwrap();
        assert_eq!(p.user(UserId(44)).len(), 1);
        assert!(p.user(UserId(43)).is_empty());
        assert_eq!(p.records(), 2);
    }
}
