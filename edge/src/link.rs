//! Broker links, client side (proto::link): HELLO, PING every `link_ping_ms`, dead after
//! `link_dead_ms` of silence, reconnect with capped jittered backoff, and the node's interest.
//!
//! All links of the node terminate on the link shard (shard 0), which also owns the
//! node-wide [`NodeInterest`]. Per broker address the first link is (broker shard 0, Low);
//! its HELLO reply names the broker's shard count, and then one link per (broker shard,
//! priority) runs. SUB/UNSUB/COUNTS for a room go on the Low link of the broker shard that owns
//! the room (`proto::link::shard_of_room`).
//!
//! In cluster mode (`brokers_from_control`) the set of brokers follows control's list
//! ([`Hub::follow_control`]): a broker control lists is linked, one it stops listing is
//! unlinked (its tasks end, its link metrics go), and one that comes back gets fresh links.
//!
//! Invariants:
//! - On every (re)connect of a Low link, the full interest it owns is re-sent before anything
//!   else, so a broker that lost us never misses a room silently.
//! - A SUB/UNSUB produced while a link is down is not queued: the re-send on connect covers it.
//! - The backoff grows exponentially from `link_backoff_ms_min` to `link_backoff_ms_max`, with
//!   jitter in [delay/2, delay], and resets after a successful HELLO.

use crate::index::EncodingSet;
use crate::interest::{NodeInterest, Update};
use crate::metrics::{DropReason, LinkMetrics};
use crate::node::{Msg, Node, ShardIdx};
use monoio::io::{AsyncWriteRentExt, Splitable};
use monoio::net::TcpStream;
use net::framed::{FramedRead, ReadError};
use net::wake::Notify;
use proto::id::{Priority, RoomId, Scope};
use proto::link::{self as wire, caps, Batch, Hello, Interest, LinkError, LinkFrame};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Connect attempts give up after this long (then back off).
const CONNECT_MS_MAX: u64 = 3_000;
/// Read buffer growth step for link frames: also what one read takes at most, so under the
/// io_uring driver (one read op, then the shard runs) how many batches one fan-out round
/// carries in a backlog (docs/benchmarks.md, "Edge data path by readiness").
const LINK_READ_BYTES: usize = 64 * 1024;
/// Messages the hub holds for the shards until the link shard's shell moves them to the
/// rings; past it batches are dropped (counted as `outbox`; viewers see the seq gap).
pub const HUB_OUTBOX_MSGS_MAX: usize = 16_384;
/// Encoded frames waiting for one link's writer; past it the link is cut and reconnected
/// (the re-sent interest on connect makes up for what was lost).
pub const LINK_OUT_BYTES_MAX: usize = 16 * 1024 * 1024;

/// One broker link: which broker (index in `broker_addrs`), which broker shard, which priority.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LinkId {
    pub broker: u16,
    pub broker_shard: u16,
    pub priority: Priority,
}

/// Capped exponential backoff with jitter (sans-io: the caller supplies randomness).
#[derive(Clone, Debug)]
pub struct Backoff {
    min_ms: u64,
    max_ms: u64,
    attempt: u32,
}

impl Backoff {
    pub fn new(min_ms: u64, max_ms: u64) -> Backoff {
        Backoff {
            min_ms: min_ms.max(1),
            max_ms: max_ms.max(min_ms.max(1)),
            attempt: 0,
        }
    }

    /// The next delay; `rand` is any random u64 (jitter picks within [delay/2, delay]).
    pub fn next_delay(&mut self, rand: u64) -> Duration {
        let exp = self.min_ms.saturating_mul(1u64 << self.attempt.min(20));
        let cap = exp.min(self.max_ms);
        self.attempt = self.attempt.saturating_add(1);
        let half = cap / 2;
        Duration::from_millis(half + rand % (cap - half + 1))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// One link: (broker, broker shard, priority).
pub(crate) struct Slot {
    id: LinkId,
    /// Encoded frames waiting for the writer.
    out: RefCell<Vec<u8>>,
    wake: Arc<Notify>,
    up: Cell<bool>,
    metrics: Arc<LinkMetrics>,
    /// The last seq of each stream seen on this link, kept across reconnects.
    seqs: RefCell<StreamSeqs>,
    /// The broker asked for CONFIRM frames on this connection (cluster mode).
    confirm: Cell<bool>,
    /// BATCH frames received on this connection, and the count last confirmed.
    received: Cell<u64>,
    confirmed: Cell<u64>,
}

/// What a stream's next seq says about the batches before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqStep {
    /// The next one (or the first seen, or a scope without a stream seq).
    InOrder,
    /// This many batches never arrived on the link.
    Gap(u64),
    /// The seq went back: the broker restarted (a new epoch).
    Restart,
}

/// Streams whose last seq is remembered; past it the memory starts over (a gap in a stream
/// dropped from it then goes uncounted here; the viewer still sees it).
pub const STREAM_SEQS_MAX: usize = 65_536;

/// The last seq per stream on one link, so the loss across a link outage is counted where it
/// happens (sans-io).
#[derive(Debug, Default)]
pub struct StreamSeqs {
    last: std::collections::HashMap<proto::id::Scope, u64>,
}

impl StreamSeqs {
    pub fn see(&mut self, scope: &proto::id::Scope, seq: u64) -> SeqStep {
        if seq == 0 {
            return SeqStep::InOrder;
        }
        if self.last.len() >= STREAM_SEQS_MAX && !self.last.contains_key(scope) {
            self.last.clear();
        }
        match self.last.insert(scope.clone(), seq) {
            Some(prev) if seq <= prev => SeqStep::Restart,
            Some(prev) if seq > prev + 1 => SeqStep::Gap(seq - prev - 1),
            _ => SeqStep::InOrder,
        }
    }
}

impl Slot {
    /// A BATCH frame arrived: counted, and confirmed by the writer when it next runs, so every
    /// batch of one socket read shares one CONFIRM (proto::link::LinkFrame::Confirm).
    fn batch_received(&self) {
        if self.confirm.get() {
            self.received.set(self.received.get() + 1);
            self.wake.notify();
        }
    }

    /// Appends the CONFIRM the received batches call for, if any (the writer, before a write).
    fn confirm_into(&self, out: &mut Vec<u8>) {
        let through = self.received.get();
        if through > self.confirmed.get() {
            self.confirmed.set(through);
            wire::encode(&LinkFrame::Confirm { through }, out);
            self.metrics.frames_out.inc();
            self.metrics.confirms.inc();
        }
    }

    fn send(&self, frame: &LinkFrame) {
        if !self.up.get() {
            return;
        }
        let mut out = self.out.borrow_mut();
        if out.len() > LINK_OUT_BYTES_MAX {
            // The broker stopped reading: cut the link (the writer sees `up` false).
            self.up.set(false);
            out.clear();
            drop(out);
            self.wake.notify();
            return;
        }
        wire::encode(frame, &mut out);
        self.metrics.frames_out.inc();
        self.wake.notify();
    }
}

struct Broker {
    /// Stable per address for the edge's life (the presence reporter's index).
    index: u16,
    addr: String,
    /// Control stopped listing it: its link tasks end and do not reconnect.
    gone: Cell<bool>,
    /// The broker's shard count (0 until its first HELLO).
    shards: Cell<u16>,
    slots: RefCell<Vec<Rc<Slot>>>,
}

impl Broker {
    fn low_slot(&self, broker_shard: u16) -> Option<Rc<Slot>> {
        self.slots
            .borrow()
            .iter()
            .find(|s| s.id.broker_shard == broker_shard && s.id.priority == Priority::Low)
            .cloned()
    }

    fn owner(&self, interest: &Interest) -> u16 {
        let n = self.shards.get().max(1);
        match interest {
            Interest::Room(r) => wire::shard_of_room(*r, n),
            Interest::Area(a) => wire::shard_of_area(*a, n),
        }
    }
}

/// The link shard's view of every broker and the node's interest. It talks to the shards
/// only through its outbox, which the link shard's shell moves to the rings.
pub(crate) struct Hub {
    node: Arc<Node>,
    /// The link shard's index.
    shard: ShardIdx,
    /// Every broker linked now, and (`gone`) the ones unlinked, each at its `index`.
    brokers: RefCell<Vec<Rc<Broker>>>,
    interest: RefCell<NodeInterest>,
    outbox: RefCell<VecDeque<(ShardIdx, Msg)>>,
    /// The node's live presence records and what each broker has not been told yet.
    presence: RefCell<crate::presence::Reporter>,
    next_counts: Cell<Instant>,
    stopped: Cell<bool>,
    /// REPLAY requests sent and not yet answered by every broker asked (crate::resume).
    replays: RefCell<std::collections::HashMap<u64, Replaying>>,
    /// Rooms whose broker link just came up: their batches wait here until the broker names
    /// the room's epoch (issue 17 defect 2), so clients get the sync before the batches.
    relinking: RefCell<std::collections::HashMap<RoomId, Relinking>>,
    next_req: Cell<u64>,
}

/// A room waiting for its epoch after a (re)link.
struct Relinking {
    req: u64,
    held: Vec<Batch>,
    since: Instant,
}

/// Request ids of the hub's own REPLAYs (shard requests carry the shard in bits 48..64, and
/// shards are far fewer than this).
const HUB_REQ_BASE: u64 = 0xFFFF << 48;
/// Batches held per relinking room; past it the room is released without its epoch.
pub const RELINK_HOLD_BATCHES_MAX: usize = 1_024;

/// One REPLAY asked of one or more brokers (cluster mode links every broker).
struct Replaying {
    /// The shard that asked.
    shard: ShardIdx,
    /// Brokers still to answer.
    waiting: usize,
    /// The answer of the broker that holds the room (the one furthest along).
    best: Option<wire::replay::Answer>,
    sent: Instant,
}

/// Unanswered REPLAYs the hub remembers; past it (or past twice `resume_ms_max`: the shard
/// has fallen back long since) the oldest are forgotten.
pub const HUB_REPLAYS_MAX: usize = 65_536;

impl Hub {
    pub fn new(node: Arc<Node>, shard: ShardIdx) -> Hub {
        let brokers: Vec<Rc<Broker>> = node
            .config
            .broker_addrs
            .iter()
            .enumerate()
            .map(|(i, a)| {
                Rc::new(Broker {
                    index: i as u16,
                    addr: a.clone(),
                    gone: Cell::new(false),
                    shards: Cell::new(0),
                    slots: RefCell::new(Vec::new()),
                })
            })
            .collect();
        Hub {
            presence: RefCell::new(crate::presence::Reporter::new(
                brokers.len(),
                crate::presence::unix_us(),
            )),
            interest: RefCell::new(NodeInterest::new(node.shards)),
            outbox: RefCell::new(VecDeque::new()),
            next_counts: Cell::new(Instant::now()),
            shard,
            brokers: RefCell::new(brokers),
            stopped: Cell::new(false),
            replays: RefCell::new(std::collections::HashMap::new()),
            relinking: RefCell::new(std::collections::HashMap::new()),
            next_req: Cell::new(0),
            node,
        }
    }

    /// Spawns the first link of each broker and the COUNTS task (on the link shard's runtime).
    pub fn start(self: &Rc<Self>) {
        for b in self.live_brokers() {
            let slot = new_slot(&self.node, &b, 0, Priority::Low);
            monoio::spawn(run_link(self.clone(), b, slot));
        }
        if self.node.config.links_brokers() {
            monoio::spawn(counts_loop(self.clone()));
            if self.node.config.presence {
                monoio::spawn(presence_loop(self.clone()));
            }
        }
    }

    /// A message from a shard for the hub (`Msg::is_for_hub`).
    pub fn on_msg(&self, msg: Msg) {
        match msg {
            Msg::Interest {
                from,
                interest,
                set,
            } => self.on_interest(from, interest, set),
            Msg::Counts { from, counts } => self.interest.borrow_mut().set_counts(from, counts),
            Msg::Presence(events) => self.presence.borrow_mut().on_events(events),
            Msg::Acks(acks) => self.send_acks(&acks),
            Msg::Replay { from, request } => self.replay(from, request),
            _ => {}
        }
    }

    /// High-reach ACKs to every broker's presence link (shard 0, the owner of user and device
    /// scopes), one frame each, written together. Lost if that link is down: the broker then
    /// resends, and the client ACKs again.
    fn send_acks(&self, acks: &[(proto::id::UserId, proto::id::DeviceId, proto::id::MsgId)]) {
        for b in self.brokers.borrow().iter() {
            let Some(slot) = b.low_slot(0) else { continue };
            for (uid, device, msg_id) in acks {
                slot.send(&LinkFrame::Ack {
                    uid: *uid,
                    device: device.clone(),
                    msg_id: *msg_id,
                });
            }
        }
    }

    /// The next message for a shard (the link shard's shell moves it to the ring).
    pub fn poll_msg(&self) -> Option<(ShardIdx, Msg)> {
        self.outbox.borrow_mut().pop_front()
    }

    /// The brokers linked now (not `gone`).
    fn live_brokers(&self) -> Vec<Rc<Broker>> {
        self.brokers
            .borrow()
            .iter()
            .filter(|b| !b.gone.get())
            .cloned()
            .collect()
    }

    /// Cluster mode: makes the linked brokers exactly the set control listed last (taken from
    /// `Node::broker_set`). New addresses get a link (and the full interest on connect);
    /// unlisted ones are unlinked; one listed again is linked afresh under its old index.
    pub fn follow_control(self: &Rc<Self>) {
        // A replica's list counts for three of its heartbeats.
        let fresh = Duration::from_millis(self.node.config.control_heartbeat_ms.max(100) * 3);
        let set = match self.node.broker_set.lock() {
            Ok(mut s) => s.take(Instant::now(), fresh),
            Err(_) => None,
        };
        let Some(set) = set else { return };
        let mut added = Vec::new();
        {
            let mut brokers = self.brokers.borrow_mut();
            for b in brokers.iter() {
                if !b.gone.get() && !set.contains(&b.addr) {
                    tracing::info!(broker = %b.addr, "control no longer lists the broker: unlinking");
                    b.gone.set(true);
                    for s in b.slots.borrow().iter() {
                        s.wake.notify();
                    }
                    self.presence.borrow_mut().down(b.index as usize);
                }
            }
            for addr in &set {
                let known = brokers.iter().position(|b| &b.addr == addr);
                if known.is_some_and(|i| !brokers[i].gone.get()) {
                    continue;
                }
                let index = match known {
                    Some(i) => i,
                    None => {
                        if brokers.len() >= usize::from(u16::MAX) {
                            tracing::warn!(broker = %addr, "too many distinct broker addresses; not linking");
                            continue;
                        }
                        let i = self
                            .presence
                            .borrow_mut()
                            .add_broker(crate::presence::unix_us());
                        debug_assert_eq!(i, brokers.len());
                        brokers.push(Rc::new(Broker {
                            index: i as u16,
                            addr: addr.clone(),
                            gone: Cell::new(true),
                            shards: Cell::new(0),
                            slots: RefCell::new(Vec::new()),
                        }));
                        i
                    }
                };
                // A fresh Broker: the old one's tasks (if any) still see theirs `gone`.
                let b = Rc::new(Broker {
                    index: index as u16,
                    addr: addr.clone(),
                    gone: Cell::new(false),
                    shards: Cell::new(0),
                    slots: RefCell::new(Vec::new()),
                });
                tracing::info!(broker = %addr, "control lists a broker: linking");
                brokers[index] = b.clone();
                added.push(b);
            }
        }
        for b in added {
            let slot = new_slot(&self.node, &b, 0, Priority::Low);
            monoio::spawn(run_link(self.clone(), b, slot));
        }
    }

    /// Every `counts_interval_ms`: tells every shard the node's viewer counts (heartbeat
    /// replies use them until, or without, the brokers' fleet-wide counts).
    pub fn on_tick(&self, now: Instant) {
        if now < self.next_counts.get() {
            return;
        }
        let every = Duration::from_millis(self.node.config.counts_interval_ms.max(1));
        self.next_counts.set(now + every);
        let stale = Duration::from_millis(self.node.config.resume_ms_max.saturating_mul(2));
        self.replays
            .borrow_mut()
            .retain(|_, r| now.saturating_duration_since(r.sent) <= stale);
        let late: Vec<RoomId> = self
            .relinking
            .borrow()
            .iter()
            .filter(|(_, r)| now.saturating_duration_since(r.since) > stale / 2)
            .map(|(room, _)| *room)
            .collect();
        for room in late {
            self.release(room, None);
        }
        let node = Arc::new(self.interest.borrow().node_counts());
        for t in 0..self.node.shards {
            self.post(t, Msg::NodeCounts(node.clone()));
        }
    }

    fn post(&self, to: ShardIdx, msg: Msg) {
        let mut out = self.outbox.borrow_mut();
        if out.len() >= HUB_OUTBOX_MSGS_MAX {
            self.node.metrics[self.shard].dropped(DropReason::Outbox, 1);
            return;
        }
        out.push_back((to, msg));
        drop(out);
        // The link shard's shell moves the outbox on its next wake.
        self.node.notify[self.shard].notify();
    }

    pub fn stop(&self) {
        self.stopped.set(true);
        for b in self.brokers.borrow().iter() {
            for s in b.slots.borrow().iter() {
                s.wake.notify();
            }
        }
    }

    /// A shard's encoding set for an interest changed.
    fn on_interest(&self, from: ShardIdx, interest: Interest, set: EncodingSet) {
        let update = self
            .interest
            .borrow_mut()
            .update(from, interest.clone(), set);
        let Some(update) = update else { return };
        let frame = match update {
            Update::Sub(set) => LinkFrame::Sub {
                interest: interest.clone(),
                encodings: set.bits(),
            },
            Update::Unsub => LinkFrame::Unsub {
                interest: interest.clone(),
            },
        };
        for b in self.live_brokers() {
            if let Some(slot) = b.low_slot(b.owner(&interest)) {
                slot.send(&frame);
            }
        }
    }

    /// Sends a shard's REPLAY on the Low link of the room's broker shard of every broker that
    /// is up: the link that carries the room's live batches, so the answer sits between the
    /// batches it covers and the later ones (proto::link::replay). No link up: answered
    /// `None` at once (the shard falls back).
    fn replay(&self, from: ShardIdx, request: wire::replay::Request) {
        let interest = Interest::Room(request.room);
        let frame = LinkFrame::Replay(request.clone());
        let mut waiting = 0;
        for b in self.brokers.borrow().iter() {
            if let Some(slot) = b.low_slot(b.owner(&interest)).filter(|s| s.up.get()) {
                slot.send(&frame);
                waiting += 1;
            }
        }
        let mut replays = self.replays.borrow_mut();
        if waiting == 0 || replays.len() >= HUB_REPLAYS_MAX {
            drop(replays);
            self.post(
                from,
                Msg::Replayed {
                    req: request.req,
                    answer: None,
                },
            );
            return;
        }
        replays.insert(
            request.req,
            Replaying {
                shard: from,
                waiting,
                best: None,
                sent: Instant::now(),
            },
        );
    }

    /// A broker's REPLAYED: once every broker asked has answered, the asking shard gets the
    /// answer with the highest seq (the broker that owns the room; others know it at seq 0).
    fn on_replayed(&self, a: wire::replay::Answer) {
        if a.req >= HUB_REQ_BASE {
            let ours = self
                .relinking
                .borrow()
                .get(&a.room)
                .is_some_and(|r| r.req == a.req);
            if ours {
                self.release(a.room, Some(a.sync));
            }
            return;
        }
        let mut replays = self.replays.borrow_mut();
        let Some(r) = replays.get_mut(&a.req) else {
            return;
        };
        let req = a.req;
        r.waiting = r.waiting.saturating_sub(1);
        if r.best.as_ref().is_none_or(|b| a.sync.seq > b.sync.seq) {
            r.best = Some(a);
        }
        if r.waiting > 0 {
            return;
        }
        let Some(r) = replays.remove(&req) else {
            return;
        };
        drop(replays);
        self.post(
            r.shard,
            Msg::Replayed {
                req,
                answer: r.best.map(Box::new),
            },
        );
    }

    /// A Low link came up and re-sent its interest: ask for the epoch of each of its rooms,
    /// holding their batches until the answer (one broker only: with several, each names its
    /// own epoch and the owner's is not known here).
    fn relinked(&self, slot: &Slot, rooms: &[RoomId]) {
        if self.brokers.borrow().len() != 1 {
            return;
        }
        let now = Instant::now();
        for room in rooms {
            let n = self.next_req.get().wrapping_add(1);
            self.next_req.set(n);
            let req = HUB_REQ_BASE | (n & ((1 << 48) - 1));
            slot.send(&LinkFrame::Replay(wire::replay::Request {
                req,
                room: *room,
                encoding: proto::id::Encoding::Plain,
                resume: proto::sync::ResumeField::Absent,
            }));
            let old = self.relinking.borrow_mut().insert(
                *room,
                Relinking {
                    req,
                    held: Vec::new(),
                    since: now,
                },
            );
            if let Some(old) = old {
                for b in old.held {
                    self.dispatch(b);
                }
            }
        }
    }

    /// Ends a room's relink: every shard learns its epoch (when the broker named it), then
    /// gets the held batches. The sync's seq is the one before the first held batch, so a
    /// client's position continues exactly there.
    fn release(&self, room: RoomId, sync: Option<proto::sync::Sync>) {
        let Some(r) = self.relinking.borrow_mut().remove(&room) else {
            return;
        };
        if let Some(mut sync) = sync {
            if let Some(first) = r
                .held
                .iter()
                .find(|b| b.priority == Priority::Low)
                .map(|b| (b.seq & u64::from(proto::sync::ROOM_SEQ_MAX)) as u32)
            {
                sync.seq = first.saturating_sub(1);
            }
            sync.recovered = false;
            sync.missed = 0;
            let sync = Arc::new(sync);
            for t in 0..self.node.shards {
                self.post(
                    t,
                    Msg::Epoch {
                        room,
                        sync: sync.clone(),
                    },
                );
            }
        }
        for b in r.held {
            self.dispatch(b);
        }
    }

    /// Routes a batch to the shards with viewers wanting it.
    fn dispatch(&self, batch: Batch) {
        // Read apart from the `if let`: a borrow in its scrutinee lives through the whole
        // statement (edition 2021), and the hold below borrows mutably.
        let relinking = !self.relinking.borrow().is_empty();
        if let (Scope::Room(room), true) = (&batch.scope, relinking) {
            let room = *room;
            let mut relinking = self.relinking.borrow_mut();
            if let Some(r) = relinking.get_mut(&room) {
                if r.held.len() < RELINK_HOLD_BATCHES_MAX {
                    r.held.push(batch);
                    return;
                }
                drop(relinking);
                self.release(room, None);
            }
        }
        let e = batch.encoding;
        let targets: Vec<usize> = match &batch.scope {
            Scope::Room(r) => self
                .interest
                .borrow()
                .shards_for(&Interest::Room(*r), e)
                .collect(),
            Scope::Area(a) => self
                .interest
                .borrow()
                .shards_for(&Interest::Area(*a), e)
                .collect(),
            // No node-wide user/device map: every shard looks the scope up in its own
            // reach index, as for global batches.
            Scope::Global | Scope::User(_) | Scope::Device(_) => (0..self.node.shards).collect(),
        };
        let batch = Arc::new(batch);
        for t in targets {
            self.post(t, Msg::Batch(batch.clone()));
        }
    }

    fn broadcast_counts(&self, counts: Vec<(RoomId, u32)>) {
        let c = Arc::new(counts);
        for t in 0..self.node.shards {
            self.post(t, Msg::FleetCounts(c.clone()));
        }
    }
}

fn new_slot(node: &Node, b: &Broker, broker_shard: u16, priority: Priority) -> Rc<Slot> {
    let metrics = Arc::new(LinkMetrics {
        broker: b.addr.clone(),
        broker_shard,
        priority: if priority == Priority::High {
            "high"
        } else {
            "low"
        },
        ..Default::default()
    });
    if let Ok(mut l) = node.links.lock() {
        l.push(metrics.clone());
    }
    let slot = Rc::new(Slot {
        id: LinkId {
            broker: b.index,
            broker_shard,
            priority,
        },
        out: RefCell::new(Vec::new()),
        wake: Notify::new(),
        up: Cell::new(false),
        metrics,
        seqs: RefCell::new(StreamSeqs::default()),
        confirm: Cell::new(false),
        received: Cell::new(0),
        confirmed: Cell::new(0),
    });
    b.slots.borrow_mut().push(slot.clone());
    slot
}

fn hello(node: &Node, broker_shard: u16, priority: Priority) -> LinkFrame {
    LinkFrame::Hello(Hello {
        node_id: node.config.node_id.clone(),
        region: node.config.region.clone(),
        shards: node.shards as u16,
        link_shard: broker_shard,
        priority,
        capabilities: caps::ZLIB
            | caps::PLAIN
            | caps::CONFIRM
            | if node.config.presence {
                caps::PRESENCE
            } else {
                0
            },
    })
}

async fn run_link(hub: Rc<Hub>, broker: Rc<Broker>, slot: Rc<Slot>) {
    let cfg = &hub.node.config;
    let mut backoff = Backoff::new(cfg.link_backoff_ms_min, cfg.link_backoff_ms_max);
    loop {
        if stopped(&hub) {
            return;
        }
        if broker.gone.get() {
            // Unlinked (control no longer lists it): this task ends, its metrics go.
            broker.slots.borrow_mut().retain(|s| !Rc::ptr_eq(s, &slot));
            if let Ok(mut l) = hub.node.links.lock() {
                l.retain(|m| !Arc::ptr_eq(m, &slot.metrics));
            }
            return;
        }
        slot.metrics.connects.inc();
        match serve_link(&hub, &broker, &slot, &mut backoff).await {
            Ok(()) => {
                tracing::info!(broker = %broker.addr, shard = slot.id.broker_shard, "broker link closed")
            }
            Err(e) => {
                tracing::info!(broker = %broker.addr, shard = slot.id.broker_shard, error = %e, "broker link down")
            }
        }
        slot.up.set(false);
        if slot.metrics.up.get() == 1 {
            slot.metrics.downs.inc();
        }
        slot.metrics.up.set(0);
        slot.out.borrow_mut().clear();
        if is_presence_link(&slot.id) && !broker.gone.get() {
            hub.presence.borrow_mut().down(broker.index as usize);
        }
        if stopped(&hub) {
            return;
        }
        if broker.gone.get() {
            continue;
        }
        let d = backoff.next_delay(rand::random());
        monoio::time::sleep(d).await;
    }
}

fn stopped(hub: &Hub) -> bool {
    hub.node.stop.load(Ordering::Acquire) || hub.stopped.get()
}

#[derive(Debug, thiserror::Error)]
enum LinkFail {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out")]
    Timeout,
    #[error("protocol: {0}")]
    Proto(#[from] LinkError),
    #[error("peer closed")]
    Closed,
    #[error("silent past link_dead_ms")]
    Dead,
    #[error("expected HELLO")]
    NoHello,
    #[error("the broker stopped reading: output over LINK_OUT_BYTES_MAX")]
    Backlog,
    #[error("link authentication: {0}")]
    Auth(#[from] wire::handshake::HandshakeError),
}

impl LinkFail {
    fn from_read(e: ReadError<LinkError>) -> LinkFail {
        match e {
            ReadError::Closed => LinkFail::Closed,
            ReadError::Stopped => LinkFail::Timeout,
            ReadError::Io(e) => LinkFail::Io(e),
            ReadError::Frame(e) => LinkFail::Proto(e),
        }
    }
}

async fn serve_link(
    hub: &Rc<Hub>,
    broker: &Rc<Broker>,
    slot: &Rc<Slot>,
    backoff: &mut Backoff,
) -> Result<(), LinkFail> {
    let cfg = &hub.node.config;
    let stream = monoio::time::timeout(
        Duration::from_millis(CONNECT_MS_MAX),
        TcpStream::connect(broker.addr.as_str()),
    )
    .await
    .map_err(|_| LinkFail::Timeout)??;
    let _ = stream.set_nodelay(true);
    let (rd, mut wr) = stream.into_split();
    let mut first = Vec::new();
    wire::encode(
        &hello(&hub.node, slot.id.broker_shard, slot.id.priority),
        &mut first,
    );
    // With a link key, a Challenge follows the Hello (proto::link::handshake).
    let mut auth = (!cfg.link_key.is_empty()).then(|| {
        let key = wire::handshake::LinkKey::new(cfg.link_key.as_bytes());
        let (hs, challenge) = wire::handshake::EdgeHandshake::start(key, &first, rand::random());
        wire::encode(&challenge, &mut first);
        hs
    });
    let (res, _) = wr.write_all(first).await;
    res?;
    let max = cfg.link_frame_bytes_max;
    let mut frames = FramedRead::new(rd, net::framed::link_decoder(max), LINK_READ_BYTES);
    let dead = Duration::from_millis(cfg.link_dead_ms);
    // The HELLO reply, once the broker proved it holds the link key (each read is cancelled,
    // not dropped, at the deadline).
    let frame = loop {
        let f = frames
            .next(monoio::time::sleep(dead))
            .await
            .map_err(LinkFail::from_read)?;
        let Some(hs) = auth.as_mut().filter(|h| !h.is_done()) else {
            break f;
        };
        if let wire::handshake::EdgeStep::Done(proof) = hs.on_frame(&f)? {
            let mut out = Vec::new();
            proof.iter().for_each(|p| wire::encode(p, &mut out));
            wr.write_all(out).await.0?;
        }
    };
    let LinkFrame::Hello(h) = frame else {
        return Err(LinkFail::NoHello);
    };
    backoff.reset();
    // Batches are counted per connection; the broker says whether it wants them confirmed.
    slot.confirm.set(h.capabilities & caps::CONFIRM != 0);
    slot.received.set(0);
    slot.confirmed.set(0);
    if slot.id.broker_shard == 0 && slot.id.priority == Priority::Low {
        let before = broker.shards.get();
        broker.shards.set(h.shards.max(1));
        if before == 0 {
            // First contact: open the remaining links.
            for s in 0..h.shards.max(1) {
                for p in [Priority::Low, Priority::High] {
                    if s == 0 && p == Priority::Low {
                        continue;
                    }
                    let sl = new_slot(&hub.node, broker, s, p);
                    monoio::spawn(run_link(hub.clone(), broker.clone(), sl));
                }
            }
        } else if before != h.shards.max(1) {
            tracing::warn!(broker = %broker.addr, before, now = h.shards, "broker shard count changed; restart the edge to re-map links");
        }
    }
    slot.up.set(true);
    slot.metrics.up.set(1);
    hub.node
        .linked
        .store(true, std::sync::atomic::Ordering::Release);
    tracing::info!(broker = %broker.addr, shard = slot.id.broker_shard, priority = ?slot.id.priority, "broker link up");
    if slot.id.priority == Priority::Low {
        let frames: Vec<LinkFrame> = hub
            .interest
            .borrow()
            .all()
            .filter(|(i, _)| broker.owner(i) == slot.id.broker_shard)
            .map(|(i, set)| LinkFrame::Sub {
                interest: i.clone(),
                encodings: set.bits(),
            })
            .collect();
        for f in &frames {
            slot.send(f);
        }
        let rooms: Vec<RoomId> = frames
            .iter()
            .filter_map(|f| match f {
                LinkFrame::Sub {
                    interest: Interest::Room(r),
                    ..
                } => Some(*r),
                _ => None,
            })
            .collect();
        hub.relinked(slot, &rooms);
    }
    if is_presence_link(&slot.id) && cfg.presence {
        // Every live record again, under a new incarnation (crate::presence).
        let batches = hub
            .presence
            .borrow_mut()
            .relinked(broker.index as usize, crate::presence::unix_us());
        for b in batches {
            slot.send(&LinkFrame::Presence(b));
        }
    }
    let last_rx = Cell::new(Instant::now());
    let reader = async {
        loop {
            // Runs until the link ends; the select below drops it only when the link is torn
            // down, when what it might have read no longer matters.
            let f = frames
                .next(std::future::pending())
                .await
                .map_err(LinkFail::from_read)?;
            last_rx.set(Instant::now());
            on_frame(hub, slot, f);
        }
    };
    let writer = async {
        loop {
            if !slot.up.get() {
                return Err(LinkFail::Backlog);
            }
            let mut out = std::mem::take(&mut *slot.out.borrow_mut());
            slot.confirm_into(&mut out);
            if out.is_empty() {
                if stopped(hub) || broker.gone.get() {
                    return Ok::<(), LinkFail>(());
                }
                slot.wake.notified().await;
                continue;
            }
            let (res, mut back) = wr.write_all(out).await;
            res?;
            // Reuse the allocation when nothing new arrived meanwhile.
            back.clear();
            let mut o = slot.out.borrow_mut();
            if o.is_empty() {
                *o = back;
            }
        }
    };
    let ping_every = Duration::from_millis(cfg.link_ping_ms.max(1));
    let pinger = async {
        let mut nonce = 0u64;
        loop {
            monoio::time::sleep(ping_every.min(dead / 2)).await;
            if stopped(hub) || broker.gone.get() {
                return Ok::<(), LinkFail>(());
            }
            if last_rx.get().elapsed() > dead {
                return Err(LinkFail::Dead);
            }
            nonce += 1;
            slot.send(&LinkFrame::Ping { nonce });
        }
    };
    monoio::select! {
        r = reader => r,
        r = writer => r,
        r = pinger => r,
    }
}

fn on_frame(hub: &Hub, slot: &Slot, f: LinkFrame) {
    match f {
        LinkFrame::Batch(b) => {
            slot.metrics.batches_in.inc();
            slot.metrics.bytes_in.add(b.packet.len() as u64);
            slot.batch_received();
            match slot.seqs.borrow_mut().see(&b.scope, b.seq) {
                SeqStep::InOrder => {}
                SeqStep::Gap(n) => slot.metrics.seq_gaps.add(n),
                SeqStep::Restart => slot.metrics.seq_restarts.inc(),
            }
            hub.dispatch(b);
        }
        LinkFrame::Counts(c) => hub.broadcast_counts(c),
        LinkFrame::Ping { nonce } => slot.send(&LinkFrame::Pong { nonce }),
        LinkFrame::Pong { .. }
        | LinkFrame::Hello(_)
        | LinkFrame::Challenge { .. }
        | LinkFrame::Proof { .. } => {}
        // Edge -> broker frames arriving here are a broker bug; ignore rather than drop the link.
        LinkFrame::Sub { .. }
        | LinkFrame::Unsub { .. }
        | LinkFrame::Presence(_)
        | LinkFrame::Ack { .. }
        | LinkFrame::Confirm { .. }
        | LinkFrame::Replay(_) => {}
        LinkFrame::Replayed(a) => hub.on_replayed(a),
    }
}

/// Presence goes to each broker on its (shard 0, Low) link, the owner of user scopes.
fn is_presence_link(id: &LinkId) -> bool {
    id.broker_shard == 0 && id.priority == Priority::Low
}

/// Sends each broker the presence events pending for it every `presence_batch_ms`.
async fn presence_loop(hub: Rc<Hub>) {
    let every = Duration::from_millis(hub.node.config.presence_batch_ms.max(1));
    loop {
        monoio::time::sleep(every).await;
        if stopped(&hub) {
            return;
        }
        for b in hub.live_brokers() {
            let Some(slot) = b.low_slot(0) else { continue };
            let batches = hub
                .presence
                .borrow_mut()
                .flush(b.index as usize, crate::presence::unix_us());
            for batch in batches {
                slot.send(&LinkFrame::Presence(batch));
            }
        }
        let r = hub.presence.borrow();
        let (stats, m) = (r.stats(), &hub.node.metrics[hub.shard]);
        m.presence_records.set(r.live() as u64);
        m.presence_frames.set(stats.frames);
        m.presence_rereports.set(stats.rereports);
    }
}

/// Sends the node's viewer counts to each broker shard every `counts_interval_ms`.
async fn counts_loop(hub: Rc<Hub>) {
    let every = Duration::from_millis(hub.node.config.counts_interval_ms.max(1));
    loop {
        monoio::time::sleep(every).await;
        if stopped(&hub) {
            return;
        }
        let counts = hub.interest.borrow().node_counts();
        for b in hub.live_brokers() {
            let n = b.shards.get();
            if n == 0 {
                continue;
            }
            for s in 0..n {
                let mine: Vec<(RoomId, u32)> = counts
                    .iter()
                    .filter(|(r, _)| wire::shard_of_room(*r, n) == s)
                    .copied()
                    .collect();
                if let Some(slot) = b.low_slot(s) {
                    slot.send(&LinkFrame::Counts(mine));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_seqs_count_gaps_and_restarts() {
        use proto::id::Scope;
        let mut s = StreamSeqs::default();
        let (a, b) = (Scope::Room(RoomId(1)), Scope::Room(RoomId(2)));
        assert_eq!(s.see(&a, 1), SeqStep::InOrder);
        assert_eq!(s.see(&a, 2), SeqStep::InOrder);
        assert_eq!(s.see(&b, 7), SeqStep::InOrder, "first seen");
        assert_eq!(s.see(&a, 5), SeqStep::Gap(2));
        assert_eq!(s.see(&a, 1), SeqStep::Restart);
        assert_eq!(s.see(&a, 2), SeqStep::InOrder);
        assert_eq!(
            s.see(&Scope::User(proto::id::UserId(3)), 0),
            SeqStep::InOrder
        );
    }

    #[test]
    fn backoff_grows_caps_and_resets() {
        let mut b = Backoff::new(100, 5_000);
        let mut last_cap = 0;
        for i in 0..12 {
            let lo = b.clone().next_delay(0).as_millis() as u64;
            let hi = b.clone().next_delay(u64::MAX - 1).as_millis() as u64;
            let cap = (100u64 << i).min(5_000);
            assert!(
                lo >= cap / 2 && hi <= cap,
                "attempt {i}: {lo}..{hi} vs cap {cap}"
            );
            assert!(cap >= last_cap);
            last_cap = cap;
            b.next_delay(12345);
        }
        assert_eq!(last_cap, 5_000);
        b.reset();
        assert!(b.next_delay(7).as_millis() <= 100);
    }
}
