//! Presence reporting, edge side (issue 10, DESIGN §6): which connections this node holds,
//! told to every broker in batches. Sans-io; the link hub ([`crate::link`]) owns one
//! [`Reporter`] on the link shard and moves its batches onto the links.
//!
//! Shard cores report a connection when it is seated (authenticated, in a room) and when it
//! leaves ([`enter`], [`exit`]), through the ring to the link shard ([`crate::node::Msg`]); the
//! reporter keeps the node's live records and, per broker, the events not sent yet.
//!
//! # Invariants
//! - **Batched.** Events wait in a broker's pending list until the hub flushes it (every
//!   `presence_batch_ms`), then go out as PRESENCE frames of at most [`FRAME_EVENTS_MAX`]
//!   events: under churn, one frame per flush, not one per event.
//! - **Re-report on re-link.** Each broker's link has an incarnation; every time the link comes
//!   up again ([`Reporter::relinked`]) it is raised (and it starts at the process's start time
//!   in microseconds, so a restarted edge is higher too), the pending list is dropped and every
//!   live record is re-sent as an enter. The broker ends the old incarnation's records with
//!   grace and counts the re-reported ones once: nothing is counted twice, nothing is lost.
//! - **Bounded.** A broker's pending list holds at most [`PENDING_EVENTS_MAX`]; past it the list
//!   is dropped and the next flush re-reports everything under a new incarnation (as a re-link
//!   does). Records are bounded by the node's connections.
//! - Events for a broker whose link is down are not kept: the re-report on re-link covers them.

use crate::core::ConnId;
use proto::id::{AreaId, DeviceId, RoomId, UserId};
use proto::link::{PresenceBatch, PresenceEvent, PresenceKind, Transport};
use std::collections::HashMap;

/// Events per PRESENCE frame (about 100 bytes each with a full-length device id: far below
/// the link frame limit).
pub const FRAME_EVENTS_MAX: usize = 4_096;
/// Events waiting for one broker before the reporter gives up on the list and re-reports
/// everything instead.
pub const PENDING_EVENTS_MAX: usize = 65_536;
/// Default `presence_batch_ms`: how often the hub flushes pending events.
pub const PRESENCE_BATCH_MS: u64 = 100;

/// Microseconds since the Unix epoch (incarnations: a restarted process starts above the last).
pub fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(1)
}

/// The node-wide id of a connection: shard, generation (low 20 bits) and slab key. Unique on
/// the node while the connection lives (a slot is reused only after its exit was reported).
pub fn conn_id(shard: usize, id: ConnId) -> u64 {
    ((shard as u64 & 0xFFF) << 52) | ((u64::from(id.gen()) & 0xF_FFFF) << 32) | id.key() as u64
}

/// The presence transport of a client transport.
pub fn transport(t: crate::session::Transport) -> Transport {
    match t {
        crate::session::Transport::Tcp => Transport::Tcp,
        crate::session::Transport::Ws => Transport::Ws,
        crate::session::Transport::Udp => Transport::Udp,
    }
}

/// The enter a shard core reports when it seats a connection.
pub fn enter(
    conn: u64,
    uid: UserId,
    device: DeviceId,
    room: RoomId,
    area: AreaId,
    transport: Transport,
) -> PresenceEvent {
    PresenceEvent {
        kind: PresenceKind::Enter,
        conn,
        uid,
        device,
        room,
        area,
        transport,
    }
}

/// The exit a shard core reports when a seated connection leaves. Only `conn` counts: the
/// reporter fills in the rest from the enter (the core keeps no copy per connection).
pub fn exit(conn: u64) -> PresenceEvent {
    PresenceEvent {
        kind: PresenceKind::Exit,
        conn,
        uid: UserId(0),
        device: DeviceId(String::new()),
        room: RoomId(0),
        area: AreaId(0),
        transport: Transport::Tcp,
    }
}

#[derive(Debug, Default)]
struct Outgoing {
    up: bool,
    incarnation: u64,
    /// The pending list overflowed: re-report everything on the next flush.
    resync: bool,
    pending: Vec<PresenceEvent>,
}

/// Counters for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub events: u64,
    pub frames: u64,
    pub rereports: u64,
    pub overflows: u64,
}

/// The node's live records and what each broker has not been told yet. See the module docs.
#[derive(Debug)]
pub struct Reporter {
    records: HashMap<u64, PresenceEvent>,
    brokers: Vec<Outgoing>,
    stats: Stats,
}

impl Reporter {
    /// A reporter for `brokers` links; `start_us` (the process start, in microseconds since
    /// the Unix epoch) is below every incarnation this process will use.
    pub fn new(brokers: usize, start_us: u64) -> Reporter {
        Reporter {
            records: HashMap::new(),
            brokers: (0..brokers)
                .map(|_| Outgoing {
                    incarnation: start_us,
                    ..Outgoing::default()
                })
                .collect(),
            stats: Stats::default(),
        }
    }

    /// Events from a shard core, in its order.
    pub fn on_events(&mut self, events: Vec<PresenceEvent>) {
        for ev in events {
            let ev = match ev.kind {
                PresenceKind::Enter => {
                    self.records.insert(ev.conn, ev.clone());
                    ev
                }
                PresenceKind::Exit => match self.records.remove(&ev.conn) {
                    Some(mut enter) => {
                        enter.kind = PresenceKind::Exit;
                        enter
                    }
                    // Never entered (or entered before a reporter existed): nothing to undo.
                    None => continue,
                },
            };
            self.stats.events += 1;
            for b in self.brokers.iter_mut().filter(|b| b.up && !b.resync) {
                if b.pending.len() >= PENDING_EVENTS_MAX {
                    b.pending = Vec::new();
                    b.resync = true;
                    self.stats.overflows += 1;
                } else {
                    b.pending.push(ev.clone());
                }
            }
        }
    }

    /// Broker `broker`'s presence link is up (again): the frames to send first, re-reporting
    /// every live record under a new incarnation `>= now_us`.
    pub fn relinked(&mut self, broker: usize, now_us: u64) -> Vec<PresenceBatch> {
        let Some(b) = self.brokers.get_mut(broker) else {
            return Vec::new();
        };
        b.up = true;
        b.resync = false;
        b.pending.clear();
        b.incarnation = b.incarnation.saturating_add(1).max(now_us);
        let incarnation = b.incarnation;
        self.stats.rereports += 1;
        // Deterministic order (tests and captures read better).
        let mut all: Vec<&PresenceEvent> = self.records.values().collect();
        all.sort_by_key(|e| e.conn);
        let mut frames: Vec<PresenceBatch> = all
            .chunks(FRAME_EVENTS_MAX)
            .map(|c| PresenceBatch {
                incarnation,
                events: c.iter().map(|e| (*e).clone()).collect(),
            })
            .collect();
        if frames.is_empty() {
            // An empty report still tells the broker the new incarnation (ending the old
            // one's records at once rather than at lease expiry).
            frames.push(PresenceBatch {
                incarnation,
                events: Vec::new(),
            });
        }
        self.stats.frames += frames.len() as u64;
        frames
    }

    /// Broker `broker`'s presence link went down: stop collecting for it.
    pub fn down(&mut self, broker: usize) {
        if let Some(b) = self.brokers.get_mut(broker) {
            b.up = false;
            b.pending = Vec::new();
        }
    }

    /// The frames to send broker `broker` now (none when nothing is pending or it is down).
    pub fn flush(&mut self, broker: usize, now_us: u64) -> Vec<PresenceBatch> {
        let Some(b) = self.brokers.get_mut(broker) else {
            return Vec::new();
        };
        if !b.up {
            return Vec::new();
        }
        if b.resync {
            return self.relinked(broker, now_us);
        }
        let pending = std::mem::take(&mut b.pending);
        let incarnation = b.incarnation;
        let frames: Vec<PresenceBatch> = pending
            .chunks(FRAME_EVENTS_MAX)
            .map(|c| PresenceBatch {
                incarnation,
                events: c.to_vec(),
            })
            .collect();
        self.stats.frames += frames.len() as u64;
        frames
    }

    /// Live connections reported.
    pub fn live(&self) -> usize {
        self.records.len()
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(conn: u64, uid: u64) -> PresenceEvent {
        enter(
            conn,
            UserId(uid),
            DeviceId(format!("d{conn}")),
            RoomId(1),
            AreaId(2),
            Transport::Tcp,
        )
    }

    #[test]
    fn events_are_batched_per_flush_and_exits_carry_the_enter() {
        let mut r = Reporter::new(1, 10);
        assert_eq!(r.relinked(0, 0)[0].events.len(), 0);
        r.on_events(vec![ev(1, 7), ev(2, 8)]);
        r.on_events(vec![exit(1), exit(99)]);
        let frames = r.flush(0, 0);
        assert_eq!(frames.len(), 1);
        let kinds: Vec<(PresenceKind, u64, u64)> = frames[0]
            .events
            .iter()
            .map(|e| (e.kind, e.conn, e.uid.0))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (PresenceKind::Enter, 1, 7),
                (PresenceKind::Enter, 2, 8),
                (PresenceKind::Exit, 1, 7)
            ]
        );
        assert!(r.flush(0, 0).is_empty());
        assert_eq!(r.live(), 1);
    }

    #[test]
    fn relink_rereports_live_records_under_a_higher_incarnation() {
        let mut r = Reporter::new(2, 1_000);
        let first = r.relinked(0, 0)[0].incarnation;
        assert!(first > 1_000);
        r.on_events(vec![ev(1, 7), ev(2, 8), exit(2)]);
        r.down(0);
        r.on_events(vec![ev(3, 9)]);
        assert!(r.flush(0, 0).is_empty(), "nothing is kept while down");
        let again = r.relinked(0, 0);
        assert_eq!(again.len(), 1);
        assert!(again[0].incarnation > first);
        let conns: Vec<u64> = again[0].events.iter().map(|e| e.conn).collect();
        assert_eq!(conns, vec![1, 3]);
        // A broker never linked gets nothing; its first link re-reports the same records.
        assert!(r.flush(1, 0).is_empty());
        assert_eq!(r.relinked(1, 5_000)[0].incarnation, 5_000);
    }

    #[test]
    fn an_overflowing_pending_list_turns_into_a_rereport() {
        let mut r = Reporter::new(1, 0);
        r.relinked(0, 0);
        for i in 0..(PENDING_EVENTS_MAX as u64 + 10) {
            r.on_events(vec![ev(i, i)]);
        }
        let frames = r.flush(0, 0);
        let total: usize = frames.iter().map(|f| f.events.len()).sum();
        assert_eq!(total, PENDING_EVENTS_MAX + 10);
        assert!(frames.iter().all(|f| f.events.len() <= FRAME_EVENTS_MAX));
        assert_eq!(r.stats().overflows, 1);
    }

    #[test]
    fn conn_ids_differ_by_shard() {
        let a = conn_id(0, ConnId::for_test(5, 1));
        let b = conn_id(1, ConnId::for_test(5, 1));
        assert_ne!(a, b);
    }
}
