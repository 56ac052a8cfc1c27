//! The monoio shell of one shard (one per core): listeners, connections, timers, the inbox.
//!
//! Per connection there is exactly one task. It reads into a small buffer, feeds the sans-io
//! [`Session`], and, while the connection's send queue is not empty, also drives the one write
//! in flight (a boxed future that owns the write half, so an idle connection holds no writer).
//! Everything else about a connection lives in its slab entry ([`Conn`]).
//!
//! Invariants:
//! - Only this shard's thread touches its slab, index, wheel and queues (`Rc`/`RefCell`, no
//!   locks). No `RefCell` borrow is held across an `.await`.
//! - A connection id is (slab key, generation); timers and writers check the generation, so a
//!   stale timer for a reused slot does nothing.
//! - A connection is in the room index iff it is authenticated and not closing: closing
//!   unseats it at once, so fan-out never queues to a closing connection.
//! - Send queues are bounded by `send_queue_bytes_max` for low-priority batches; replies and
//!   close frames bypass the bound (they are tiny and bounded by the input rate).

use crate::config::Config;
use crate::fanout;
use crate::index::{Lane, RoomIndex};
use crate::interest::NodeInterest;
use crate::link::Hub;
use crate::metrics::{DropReason, ShardMetrics};
use crate::reach::ReachIndex;
use crate::session::{Action, Authed, CloseReason, Ctx, Limits, Session, Transport};
use crate::wheel::Wheel;
use bytes::Bytes;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;
use net::wake::Notify;
use proto::auth;
use proto::id::{Priority, RoomId};
use proto::link::{Batch, Interest};
use proto::token::KeySet;
use slab::Slab;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// How long a closing connection may take to flush its last bytes (auth reply, close frame).
const CLOSE_FLUSH_MS_MAX: u64 = 1_000;
/// The inbox re-checks node flags at least this often even without a notify.
const INBOX_POLL_MS: u64 = 100;
/// High-priority batches may exceed the queue bound up to this factor before they drop too.
const HIGH_PRIORITY_QUEUE_FACTOR: usize = 4;

/// Messages between shards (one `rtrb` ring per ordered pair).
pub(crate) enum Msg {
    /// A batch to fan out (link shard -> viewer shards); shared, never copied.
    Batch(Arc<Batch>),
    /// Viewer shard -> link shard: this shard's encoding set for an interest changed.
    Interest {
        from: usize,
        interest: Interest,
        set: u8,
    },
    /// Viewer shard -> link shard: this shard's viewer count per room.
    Counts {
        from: usize,
        counts: Vec<(RoomId, u32)>,
    },
    /// Link shard -> viewer shards: fleet-wide online counts from the brokers.
    FleetCounts(Arc<Vec<(RoomId, u32)>>),
    /// Shard 0 -> every shard: this node's viewer count per room (heartbeat replies use it
    /// until, or without, the brokers' fleet-wide counts).
    NodeCounts(Arc<Vec<(RoomId, u32)>>),
}

/// State shared by every thread of the node.
pub(crate) struct Node {
    pub config: Config,
    pub limits: Limits,
    pub keys: KeySet,
    pub shards: usize,
    pub stop: AtomicBool,
    pub draining: AtomicBool,
    /// Per shard: wakes its inbox (ring traffic, drain, stop).
    pub notify: Vec<Arc<Notify>>,
    pub metrics: Vec<Arc<ShardMetrics>>,
    pub links: Mutex<Vec<Arc<crate::metrics::LinkMetrics>>>,
    /// Connections this process can hold (fd limit minus a reserve).
    pub capacity: u64,
    pub started: Instant,
}

impl Node {
    pub fn connections(&self) -> u64 {
        self.metrics
            .iter()
            .map(|m| m.conns_tcp.get() + m.conns_ws.get())
            .sum()
    }
}

/// One shard's ring ends.
pub(crate) struct Plumbing {
    /// Producer to each other shard (None at our own index).
    pub tx: Vec<Option<rtrb::Producer<Msg>>>,
    pub rx: Vec<rtrb::Consumer<Msg>>,
    pub tcp: std::net::TcpListener,
    pub ws: std::net::TcpListener,
}

/// One shard's producers (indexed by destination; None at its own index) and consumers.
pub(crate) type RingEnds = (Vec<Option<rtrb::Producer<Msg>>>, Vec<rtrb::Consumer<Msg>>);

/// Builds the ring matrix: `out[i]` holds shard i's producers and consumers.
pub(crate) fn rings(n: usize, entries: usize) -> Vec<RingEnds> {
    let mut out: Vec<RingEnds> = (0..n)
        .map(|_| ((0..n).map(|_| None).collect(), Vec::new()))
        .collect();
    for from in 0..n {
        for to in 0..n {
            if from != to {
                let (p, c) = rtrb::RingBuffer::new(entries);
                out[from].0[to] = Some(p);
                out[to].1.push(c);
            }
        }
    }
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TimerKind {
    Auth,
    Handshake,
    Heartbeat,
    Stuck,
    Closing,
}

#[derive(Clone, Copy, Debug)]
struct Timer {
    key: u32,
    gen: u32,
    kind: TimerKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Closing {
    Open,
    /// Write what is queued, then close.
    AfterFlush,
    /// Close now; drop whatever is queued.
    Now,
}

#[derive(Clone, Copy, Debug)]
struct Seat {
    room: RoomId,
    lane: Lane,
}

/// One connection's slab entry. Budgeted: see docs/operations-edge.md.
struct Conn {
    gen: u32,
    session: Session,
    seat: Option<Seat>,
    /// Milliseconds since the shard epoch of the last byte received.
    last_seen_ms: u32,
    /// Milliseconds since the shard epoch (plus one, so 0 means "not stuck") when the queue
    /// first went over the bound.
    stuck_since_ms: u32,
    closing: Closing,
    /// Counted in `pending_handshakes` (not yet authenticated).
    pending: bool,
    queued_bytes: u32,
    queue: VecDeque<Bytes>,
    waker: Option<Waker>,
}

/// A shard: everything one core owns.
pub(crate) struct Shard {
    pub id: usize,
    pub node: Arc<Node>,
    epoch: Instant,
    conns: RefCell<Slab<Conn>>,
    next_gen: Cell<u32>,
    pub index: RefCell<RoomIndex>,
    /// uid/device -> members, for user and device batches.
    pub reach: RefCell<ReachIndex>,
    wheel: RefCell<Wheel<Timer>>,
    tx: RefCell<Vec<Option<rtrb::Producer<Msg>>>>,
    rx: RefCell<Vec<rtrb::Consumer<Msg>>>,
    /// Control messages that found their ring full; retried every tick (never dropped).
    backlog: RefCell<VecDeque<(usize, Msg)>>,
    /// Fleet-wide online counts (from the brokers' COUNTS) for rooms with viewers here.
    fleet: RefCell<HashMap<RoomId, u32>>,
    /// Node-wide viewer counts (from shard 0) for rooms with viewers here.
    node_counts: RefCell<HashMap<RoomId, u32>>,
    /// Shard 0 only: node-wide interest and per-shard viewer counts.
    pub interest: Option<RefCell<NodeInterest>>,
    pub hub: Option<Rc<Hub>>,
    actions: RefCell<Vec<Action>>,
    accepting: Cell<bool>,
    accept_wakers: RefCell<Vec<Waker>>,
}

type ReadHalf = OwnedReadHalf<TcpStream>;
type WriteFut = Pin<Box<dyn Future<Output = (OwnedWriteHalf<TcpStream>, std::io::Result<usize>)>>>;
type ReadFut = Pin<Box<dyn Future<Output = (ReadHalf, monoio::BufResult<usize, Vec<u8>>)>>>;

/// The write side of a connection: idle (holding the half) or one write in flight.
enum Writer {
    Idle(OwnedWriteHalf<TcpStream>),
    Busy(WriteFut),
    Gone,
}

enum Fire {
    Close(CloseReason),
    Force,
    Rearm(u64),
    Nothing,
}

enum Ev {
    Read(ReadHalf, std::io::Result<usize>, Vec<u8>),
    Done,
}

impl Shard {
    pub fn new(
        id: usize,
        node: Arc<Node>,
        tx: Vec<Option<rtrb::Producer<Msg>>>,
        rx: Vec<rtrb::Consumer<Msg>>,
    ) -> Rc<Shard> {
        let epoch = Instant::now();
        let hub =
            (id == 0 && !node.config.broker_addrs.is_empty()).then(|| Rc::new(Hub::new(&node)));
        Rc::new(Shard {
            id,
            epoch,
            conns: RefCell::new(Slab::new()),
            next_gen: Cell::new(1),
            index: RefCell::new(RoomIndex::new()),
            reach: RefCell::new(ReachIndex::new()),
            wheel: RefCell::new(Wheel::new(
                epoch,
                Duration::from_millis(node.config.timer_tick_ms),
            )),
            tx: RefCell::new(tx),
            rx: RefCell::new(rx),
            backlog: RefCell::new(VecDeque::new()),
            fleet: RefCell::new(HashMap::new()),
            node_counts: RefCell::new(HashMap::new()),
            interest: (id == 0).then(|| RefCell::new(NodeInterest::new(node.shards))),
            hub,
            actions: RefCell::new(Vec::new()),
            accepting: Cell::new(true),
            accept_wakers: RefCell::new(Vec::new()),
            node,
        })
    }

    pub fn m(&self) -> &ShardMetrics {
        &self.node.metrics[self.id]
    }

    fn now_ms(&self, now: Instant) -> u32 {
        now.saturating_duration_since(self.epoch).as_millis() as u32
    }

    fn cfg(&self) -> &Config {
        &self.node.config
    }

    // ---- cross-shard messages ----

    /// Sends a message to shard `to` (or handles it here when `to` is us).
    pub fn send_to(&self, to: usize, msg: Msg) {
        if to == self.id {
            self.on_msg(msg);
            return;
        }
        let res = {
            let mut tx = self.tx.borrow_mut();
            match tx.get_mut(to).and_then(Option::as_mut) {
                Some(p) => p.push(msg),
                None => return,
            }
        };
        match res {
            Ok(()) => self.node.notify[to].notify(),
            Err(rtrb::PushError::Full(msg)) => match msg {
                Msg::Batch(b) => {
                    // Best effort: a full ring means the viewer shard is far behind; the
                    // clients see the gap in the room seq.
                    self.m().dropped(DropReason::RingFull, 1);
                    drop(b);
                    self.node.notify[to].notify();
                }
                other => self.backlog.borrow_mut().push_back((to, other)),
            },
        }
    }

    fn retry_backlog(&self) {
        let pending: Vec<(usize, Msg)> = self.backlog.borrow_mut().drain(..).collect();
        for (to, msg) in pending {
            self.send_to(to, msg);
        }
    }

    /// Drains every inbound ring.
    fn drain_inbox(&self) {
        let n = self.rx.borrow().len();
        for i in 0..n {
            loop {
                let msg = {
                    let mut rx = self.rx.borrow_mut();
                    match rx.get_mut(i).map(|c| c.pop()) {
                        Some(Ok(m)) => m,
                        _ => break,
                    }
                };
                self.on_msg(msg);
            }
        }
    }

    fn on_msg(&self, msg: Msg) {
        match msg {
            Msg::Batch(b) => fanout::fan_out(self, &b),
            Msg::Interest {
                from,
                interest,
                set,
            } => {
                if let (Some(h), Some(i)) = (&self.hub, &self.interest) {
                    h.on_interest(i, from, interest, set);
                }
            }
            Msg::Counts { from, counts } => {
                if let Some(i) = &self.interest {
                    i.borrow_mut().set_counts(from, counts);
                }
            }
            Msg::FleetCounts(c) => self.keep_counts(&self.fleet, &c),
            Msg::NodeCounts(c) => self.keep_counts(&self.node_counts, &c),
        }
    }

    /// Replaces a count map with the entries for rooms that have viewers on this shard.
    fn keep_counts(&self, map: &RefCell<HashMap<RoomId, u32>>, counts: &[(RoomId, u32)]) {
        let index = self.index.borrow();
        let mut m = map.borrow_mut();
        m.clear();
        for (r, n) in counts {
            if index.has_room(*r) {
                m.insert(*r, *n);
            }
        }
    }

    fn to_link(&self, msg: Msg) {
        if self.node.config.broker_addrs.is_empty() {
            return;
        }
        self.send_to(0, msg);
    }

    // ---- connections ----

    /// Registers an accepted connection; returns its id, or None when refused.
    fn admit(&self, transport: Transport, now: Instant) -> Result<(usize, u32), CloseReason> {
        let m = self.m();
        if !self.accepting.get() || self.node.draining.load(Ordering::Relaxed) {
            return Err(CloseReason::Shutdown);
        }
        if m.pending_handshakes.get() as usize >= self.cfg().pending_handshakes_max {
            return Err(CloseReason::Overloaded);
        }
        let gen = self.next_gen.get();
        self.next_gen.set(gen.wrapping_add(1).max(1));
        let now_ms = self.now_ms(now);
        let conn = Conn {
            gen,
            session: Session::new(transport, &self.node.limits),
            seat: None,
            last_seen_ms: now_ms,
            stuck_since_ms: 0,
            closing: Closing::Open,
            pending: true,
            queued_bytes: 0,
            queue: VecDeque::new(),
            waker: None,
        };
        let key = self.conns.borrow_mut().insert(conn);
        m.pending_handshakes.inc();
        m.accepted.inc();
        match transport {
            Transport::Tcp => m.conns_tcp.inc(),
            Transport::Ws => m.conns_ws.inc(),
        }
        let mut wheel = self.wheel.borrow_mut();
        wheel.insert(
            now + Duration::from_millis(self.cfg().auth_ms_max),
            Timer {
                key: key as u32,
                gen,
                kind: TimerKind::Auth,
            },
        );
        if transport == Transport::Ws {
            wheel.insert(
                now + Duration::from_millis(self.cfg().handshake_ms_max),
                Timer {
                    key: key as u32,
                    gen,
                    kind: TimerKind::Handshake,
                },
            );
        }
        Ok((key, gen))
    }

    /// Removes a finished connection (its task has ended).
    fn remove(&self, key: usize, gen: u32) {
        let conn = {
            let mut conns = self.conns.borrow_mut();
            match conns.get(key) {
                Some(c) if c.gen == gen => conns.remove(key),
                _ => return,
            }
        };
        if conn.closing == Closing::Open {
            // Reached only when the peer went away first.
            self.m().closed(CloseReason::PeerClosed);
        }
        self.unseat(key, conn.seat);
        let m = self.m();
        if conn.pending {
            m.pending_handshakes.dec();
        }
        match conn.session.transport() {
            Transport::Tcp => m.conns_tcp.dec(),
            Transport::Ws => m.conns_ws.dec(),
        }
    }

    fn unseat(&self, key: usize, seat: Option<Seat>) {
        let Some(seat) = seat else { return };
        self.reach.borrow_mut().leave(key as u32);
        let change = self
            .index
            .borrow_mut()
            .leave(key as u32, seat.room, seat.lane);
        if let Some(c) = change {
            self.emit_change(seat.room, c);
        }
    }

    fn emit_change(&self, room: RoomId, c: crate::index::Change) {
        if let Some(set) = c.room {
            if set == 0 {
                self.fleet.borrow_mut().remove(&room);
                self.node_counts.borrow_mut().remove(&room);
            }
            self.m().rooms.set(self.index.borrow().room_count() as u64);
            self.to_link(Msg::Interest {
                from: self.id,
                interest: Interest::Room(room),
                set,
            });
        }
        if let Some(set) = c.area_set {
            self.to_link(Msg::Interest {
                from: self.id,
                interest: Interest::Area(c.area),
                set,
            });
        }
    }

    /// Starts closing a connection: unseat now, flush `bytes` (if any), then close.
    fn begin_close(&self, key: usize, reason: CloseReason, bytes: Vec<u8>, now: Instant) {
        let seat = {
            let mut conns = self.conns.borrow_mut();
            let Some(c) = conns.get_mut(key) else { return };
            if c.closing != Closing::Open {
                return;
            }
            if !bytes.is_empty() {
                c.queued_bytes = c.queued_bytes.saturating_add(bytes.len() as u32);
                c.queue.push_back(Bytes::from(bytes));
                c.closing = Closing::AfterFlush;
                self.wheel.borrow_mut().insert(
                    now + Duration::from_millis(CLOSE_FLUSH_MS_MAX),
                    Timer {
                        key: key as u32,
                        gen: c.gen,
                        kind: TimerKind::Closing,
                    },
                );
            } else {
                c.closing = Closing::Now;
            }
            if let Some(w) = c.waker.take() {
                w.wake();
            }
            c.seat.take()
        };
        self.m().closed(reason);
        self.unseat(key, seat);
    }

    /// Closes a connection from the shell side (timeouts, drain, stuck).
    fn close_conn(&self, key: usize, reason: CloseReason, now: Instant) {
        let bytes = {
            let mut conns = self.conns.borrow_mut();
            let Some(c) = conns.get_mut(key) else { return };
            if c.closing != Closing::Open {
                return;
            }
            if reason == CloseReason::Stuck {
                // The peer is not reading: a close frame would only queue behind the rest.
                c.queue.clear();
                c.queued_bytes = 0;
                c.session.close(reason);
                Vec::new()
            } else {
                c.session.close(reason)
            }
        };
        self.begin_close(key, reason, bytes, now);
    }

    /// Queues bytes for a connection. `bounded`: apply `send_queue_bytes_max` (batches).
    /// Returns false if the bytes were dropped.
    pub fn enqueue(
        &self,
        key: usize,
        bytes: Bytes,
        priority: Priority,
        bounded: bool,
        now: Instant,
    ) -> bool {
        let max = self.cfg().send_queue_bytes_max;
        let mut conns = self.conns.borrow_mut();
        let Some(c) = conns.get_mut(key) else {
            return false;
        };
        if c.closing != Closing::Open {
            return false;
        }
        if bounded {
            let cap = if priority == Priority::High {
                max.saturating_mul(HIGH_PRIORITY_QUEUE_FACTOR)
            } else {
                max
            };
            if c.queued_bytes as usize + bytes.len() > cap {
                if c.stuck_since_ms == 0 {
                    c.stuck_since_ms = self.now_ms(now).saturating_add(1);
                    self.wheel.borrow_mut().insert(
                        now + Duration::from_millis(self.cfg().stuck_ms_max),
                        Timer {
                            key: key as u32,
                            gen: c.gen,
                            kind: TimerKind::Stuck,
                        },
                    );
                }
                drop(conns);
                self.m().dropped(DropReason::QueueFull, 1);
                return false;
            }
        }
        c.queued_bytes = c.queued_bytes.saturating_add(bytes.len() as u32);
        c.queue.push_back(bytes);
        if c.queue.len() == 1 {
            if let Some(w) = &c.waker {
                w.wake_by_ref();
            }
        }
        true
    }

    fn reply(&self, key: usize, bytes: Vec<u8>, now: Instant) {
        self.enqueue(key, Bytes::from(bytes), Priority::High, false, now);
    }

    /// Handles bytes read from a connection.
    fn on_input(&self, key: usize, input: &[u8], now: Instant) {
        let mut actions = std::mem::take(&mut *self.actions.borrow_mut());
        {
            let mut conns = self.conns.borrow_mut();
            let Some(c) = conns.get_mut(key) else { return };
            c.last_seen_ms = self.now_ms(now);
            let now_s = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let ctx = Ctx {
                limits: &self.node.limits,
                keys: &self.node.keys,
                now_s,
            };
            c.session.on_bytes(input, &ctx, &mut actions);
        }
        for a in actions.drain(..) {
            match a {
                Action::Send(b) => self.reply(key, b, now),
                Action::Authed(a) => self.seat(key, a, now),
                Action::Heartbeat => {
                    self.m().heartbeats.inc();
                    let reply = {
                        let conns = self.conns.borrow();
                        let Some(c) = conns.get(key) else { continue };
                        let online = c.seat.map_or(0, |s| self.online(s.room));
                        c.session.frame(&auth::heartbeat_reply(online))
                    };
                    self.reply(key, reply, now);
                }
                Action::Ack(_) => self.m().acks.inc(),
                Action::Close {
                    reason,
                    auth_fail,
                    bytes,
                } => {
                    if let Some(f) = auth_fail {
                        self.m().auth_failed(f);
                    }
                    self.begin_close(key, reason, bytes, now);
                }
            }
        }
        *self.actions.borrow_mut() = actions;
    }

    /// Online count for a heartbeat reply: fleet-wide if the brokers told us, else this
    /// node's (at least this shard's current count, as the node figure lags a report).
    fn online(&self, room: RoomId) -> u32 {
        if let Some(n) = self.fleet.borrow().get(&room) {
            return *n;
        }
        let local = self.index.borrow().room_len(room) as u32;
        self.node_counts
            .borrow()
            .get(&room)
            .map_or(local, |n| (*n).max(local))
    }

    fn seat(&self, key: usize, a: Authed, now: Instant) {
        let full = {
            let index = self.index.borrow();
            !index.has_room(a.room) && index.room_count() >= self.cfg().rooms_max
        };
        if full {
            let bytes = {
                let mut conns = self.conns.borrow_mut();
                let Some(c) = conns.get_mut(key) else { return };
                let mut b = c.session.frame(&auth::auth_reply(auth::AUTH_BAD_TOKEN));
                b.extend(c.session.close(CloseReason::RoomsFull));
                b
            };
            self.begin_close(key, CloseReason::RoomsFull, bytes, now);
            return;
        }
        let (reply, lane, gen) = {
            let mut conns = self.conns.borrow_mut();
            let Some(c) = conns.get_mut(key) else { return };
            let lane = Lane::new(a.encoding, c.session.transport() == Transport::Ws);
            c.seat = Some(Seat { room: a.room, lane });
            if c.pending {
                c.pending = false;
                self.m().pending_handshakes.dec();
            }
            (
                c.session.frame(&auth::auth_reply(auth::AUTH_OK)),
                lane,
                c.gen,
            )
        };
        self.m().auth_ok.inc();
        let change = self
            .index
            .borrow_mut()
            .join(key as u32, a.room, a.area, lane);
        self.emit_change(a.room, change);
        self.reach
            .borrow_mut()
            .join(key as u32, a.uid.0, &a.device.0);
        self.reply(key, reply, now);
        self.wheel.borrow_mut().insert(
            now + Duration::from_millis(self.cfg().heartbeat_timeout_ms),
            Timer {
                key: key as u32,
                gen,
                kind: TimerKind::Heartbeat,
            },
        );
    }

    /// Polls one connection: drives its write in flight, then its read.
    fn poll_conn(
        &self,
        key: usize,
        gen: u32,
        cx: &mut Context<'_>,
        writer: &mut Writer,
        read: &mut Option<ReadFut>,
    ) -> Poll<Ev> {
        // A hard close wins over a write in flight (a stuck peer never completes it).
        if self
            .conns
            .borrow()
            .get(key)
            .is_none_or(|c| c.gen != gen || c.closing == Closing::Now)
        {
            return Poll::Ready(Ev::Done);
        }
        loop {
            if let Writer::Busy(f) = writer {
                match f.as_mut().poll(cx) {
                    Poll::Pending => break,
                    Poll::Ready((half, res)) => {
                        *writer = Writer::Idle(half);
                        let mut conns = self.conns.borrow_mut();
                        let Some(c) = conns.get_mut(key).filter(|c| c.gen == gen) else {
                            return Poll::Ready(Ev::Done);
                        };
                        match res {
                            Ok(n) => {
                                c.queued_bytes = c.queued_bytes.saturating_sub(n as u32);
                                self.m().bytes_out.add(n as u64);
                                if c.queued_bytes as usize <= self.cfg().send_queue_bytes_max {
                                    c.stuck_since_ms = 0;
                                }
                            }
                            Err(_) => {
                                c.closing = Closing::Now;
                                return Poll::Ready(Ev::Done);
                            }
                        }
                    }
                }
            }
            let next = {
                let mut conns = self.conns.borrow_mut();
                let Some(c) = conns.get_mut(key).filter(|c| c.gen == gen) else {
                    return Poll::Ready(Ev::Done);
                };
                if c.closing == Closing::Now {
                    return Poll::Ready(Ev::Done);
                }
                match c.waker.as_ref() {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => c.waker = Some(cx.waker().clone()),
                }
                match c.queue.pop_front() {
                    Some(b) => b,
                    None if c.closing == Closing::AfterFlush => {
                        c.closing = Closing::Now;
                        return Poll::Ready(Ev::Done);
                    }
                    None => break,
                }
            };
            let Writer::Idle(mut half) = std::mem::replace(writer, Writer::Gone) else {
                break;
            };
            *writer = Writer::Busy(Box::pin(async move {
                let (res, _) = half.write_all(next).await;
                (half, res)
            }));
        }
        let Some(r) = read.as_mut() else {
            return Poll::Ready(Ev::Done);
        };
        match r.as_mut().poll(cx) {
            Poll::Ready((rd, (res, buf))) => {
                *read = None;
                Poll::Ready(Ev::Read(rd, res, buf))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// The lane of a seated, open connection (None when closing or gone).
    pub fn lane_of(&self, key: usize) -> Option<Lane> {
        self.conns
            .borrow()
            .get(key)
            .filter(|c| c.closing == Closing::Open)
            .and_then(|c| c.seat.map(|s| s.lane))
    }

    fn is_live(&self, key: usize) -> bool {
        self.conns
            .borrow()
            .get(key)
            .is_some_and(|c| c.session.is_live())
    }

    // ---- timers ----

    fn on_tick(&self, now: Instant) {
        let mut fired = Vec::new();
        self.wheel.borrow_mut().advance(now, &mut fired);
        let now_ms = self.now_ms(now) as u64;
        for t in fired {
            let key = t.key as usize;
            let fire = {
                let conns = self.conns.borrow();
                let Some(c) = conns.get(key).filter(|c| c.gen == t.gen) else {
                    continue;
                };
                self.fire(t.kind, c, now_ms)
            };
            match fire {
                Fire::Close(reason) => self.close_conn(key, reason, now),
                Fire::Force => self.force_close(key),
                Fire::Rearm(at_ms) => self
                    .wheel
                    .borrow_mut()
                    .insert(self.epoch + Duration::from_millis(at_ms), t),
                Fire::Nothing => {}
            }
        }
    }

    /// Decides what an expired timer means for its (still live) connection.
    fn fire(&self, kind: TimerKind, c: &Conn, now_ms: u64) -> Fire {
        if kind == TimerKind::Closing {
            return if c.closing == Closing::AfterFlush {
                Fire::Force
            } else {
                Fire::Nothing
            };
        }
        if c.closing != Closing::Open {
            return Fire::Nothing;
        }
        match kind {
            TimerKind::Auth if !c.session.is_live() => Fire::Close(if c.session.is_handshaking() {
                CloseReason::HandshakeTimeout
            } else {
                CloseReason::AuthTimeout
            }),
            TimerKind::Handshake if c.session.is_handshaking() => {
                Fire::Close(CloseReason::HandshakeTimeout)
            }
            TimerKind::Heartbeat => {
                let due = c.last_seen_ms as u64 + self.cfg().heartbeat_timeout_ms;
                if now_ms >= due {
                    Fire::Close(CloseReason::HeartbeatTimeout)
                } else {
                    Fire::Rearm(due)
                }
            }
            TimerKind::Stuck => match c.stuck_since_ms {
                0 => Fire::Nothing,
                since => {
                    let due = since as u64 - 1 + self.cfg().stuck_ms_max;
                    if now_ms >= due {
                        Fire::Close(CloseReason::Stuck)
                    } else {
                        Fire::Rearm(due)
                    }
                }
            },
            _ => Fire::Nothing,
        }
    }

    fn force_close(&self, key: usize) {
        let mut conns = self.conns.borrow_mut();
        if let Some(c) = conns.get_mut(key) {
            c.closing = Closing::Now;
            if let Some(w) = c.waker.take() {
                w.wake();
            }
        }
    }

    /// Closes up to `n` live connections (drain) ; returns how many remain.
    fn drain_some(&self, n: usize, reason: CloseReason, now: Instant) -> usize {
        let keys: Vec<usize> = {
            let conns = self.conns.borrow();
            conns
                .iter()
                .filter(|(_, c)| c.closing == Closing::Open)
                .map(|(k, _)| k)
                .take(n)
                .collect()
        };
        for k in &keys {
            self.close_conn(*k, reason, now);
        }
        self.conns
            .borrow()
            .iter()
            .filter(|(_, c)| c.closing == Closing::Open)
            .count()
    }

    /// Sends this shard's viewer counts to shard 0; shard 0 then tells every shard the node's.
    fn report_counts(&self) {
        let counts: Vec<(RoomId, u32)> = self
            .index
            .borrow()
            .rooms()
            .map(|(r, n)| (r, n as u32))
            .collect();
        self.send_to(
            0,
            Msg::Counts {
                from: self.id,
                counts,
            },
        );
        if let Some(i) = &self.interest {
            let node = Arc::new(i.borrow().node_counts());
            for t in 0..self.node.shards {
                self.send_to(t, Msg::NodeCounts(node.clone()));
            }
        }
    }

    fn stop_accepting(&self) {
        self.accepting.set(false);
        for w in self.accept_wakers.borrow_mut().drain(..) {
            w.wake();
        }
    }
}

/// Size of one connection's slab entry (for the memory report).
pub fn conn_entry_bytes() -> usize {
    std::mem::size_of::<Conn>()
}

// ---- tasks ----

/// Runs one shard until the node stops.
pub(crate) async fn run(shard: Rc<Shard>, tcp: std::net::TcpListener, ws: std::net::TcpListener) {
    tracing::info!(
        shard = shard.id,
        driver = net::runtime::driver_in_use(),
        "edge shard started"
    );
    match (
        monoio::net::TcpListener::from_std(tcp),
        monoio::net::TcpListener::from_std(ws),
    ) {
        (Ok(t), Ok(w)) => {
            monoio::spawn(accept_loop(shard.clone(), t, Transport::Tcp));
            monoio::spawn(accept_loop(shard.clone(), w, Transport::Ws));
        }
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(shard = shard.id, error = %e, "cannot register listeners");
            return;
        }
    }
    monoio::spawn(tick_loop(shard.clone()));
    if let Some(h) = shard.hub.clone() {
        h.start(&shard);
    }
    let notify = shard.node.notify[shard.id].clone();
    let mut draining = false;
    loop {
        let _ =
            monoio::time::timeout(Duration::from_millis(INBOX_POLL_MS), notify.notified()).await;
        shard.drain_inbox();
        if shard.node.stop.load(Ordering::Acquire) {
            break;
        }
        if !draining && shard.node.draining.load(Ordering::Acquire) {
            draining = true;
            shard.stop_accepting();
        }
    }
    shard.stop_accepting();
    let now = Instant::now();
    shard.drain_some(usize::MAX, CloseReason::Shutdown, now);
    // Let close frames go out; connections that do not take them are dropped with the runtime.
    let deadline = Instant::now() + Duration::from_millis(200);
    while !shard.conns.borrow().is_empty() && Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
    if let Some(h) = &shard.hub {
        h.stop();
    }
    tracing::info!(shard = shard.id, "edge shard stopped");
}

/// Waits until the shard stops accepting.
struct AcceptStop<'a>(&'a Shard);

impl Future for AcceptStop<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if !self.0.accepting.get() {
            return Poll::Ready(());
        }
        self.0.accept_wakers.borrow_mut().push(cx.waker().clone());
        Poll::Pending
    }
}

async fn accept_loop(shard: Rc<Shard>, listener: monoio::net::TcpListener, transport: Transport) {
    loop {
        let accepted = monoio::select! {
            r = listener.accept() => Some(r),
            _ = AcceptStop(&shard) => None,
        };
        let Some(res) = accepted else { break };
        let (stream, _peer) = match res {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off a little instead of spinning.
                tracing::warn!(shard = shard.id, error = %e, "accept failed");
                monoio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let now = Instant::now();
        match shard.admit(transport, now) {
            Ok((key, gen)) => {
                let _ = stream.set_nodelay(true);
                monoio::spawn(ConnTask::new(shard.clone(), key, gen, stream));
            }
            Err(reason) => {
                shard.m().closed(reason);
                if transport == Transport::Ws {
                    monoio::spawn(refuse(stream));
                }
            }
        }
    }
}

/// Best-effort 503 to a WebSocket client refused at accept.
async fn refuse(mut stream: TcpStream) {
    let resp = proto::ws::http_error_response(503, "Service Unavailable");
    let _ = monoio::time::timeout(Duration::from_millis(500), stream.write_all(resp)).await;
}

/// Reads into `buf` with the read half moved in, so the future owns everything it needs and
/// can live in a box next to the task (no self-reference).
fn read_owned(mut rd: ReadHalf, buf: Vec<u8>) -> ReadFut {
    Box::pin(async move {
        let r = rd.read(buf).await;
        (rd, r)
    })
}

/// One connection's task, written by hand so its state is exactly these fields (an `async fn`
/// kept several hundred bytes of generator state per idle connection).
struct ConnTask {
    shard: Rc<Shard>,
    key: u32,
    gen: u32,
    read: Option<ReadFut>,
    writer: Writer,
}

impl ConnTask {
    fn new(shard: Rc<Shard>, key: usize, gen: u32, stream: TcpStream) -> ConnTask {
        let (rd, wr) = stream.into_split();
        let buf = Vec::with_capacity(shard.cfg().handshake_read_buffer_bytes);
        ConnTask {
            shard,
            key: key as u32,
            gen,
            read: Some(read_owned(rd, buf)),
            writer: Writer::Idle(wr),
        }
    }

    fn finish(&mut self) {
        // Dropping in-flight ops cancels them (monoio async-cancel); the peer is done anyway.
        self.read = None;
        self.writer = Writer::Gone;
        self.shard.remove(self.key as usize, self.gen);
    }
}

impl Future for ConnTask {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let key = this.key as usize;
        loop {
            match this
                .shard
                .poll_conn(key, this.gen, cx, &mut this.writer, &mut this.read)
            {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ev::Done)
                | Poll::Ready(Ev::Read(_, Ok(0), _))
                | Poll::Ready(Ev::Read(_, Err(_), _)) => {
                    this.finish();
                    return Poll::Ready(());
                }
                Poll::Ready(Ev::Read(rd, Ok(n), mut buf)) => {
                    this.shard
                        .on_input(key, &buf[..n.min(buf.len())], Instant::now());
                    buf.clear();
                    let small = this.shard.cfg().read_buffer_bytes;
                    if buf.capacity() > small && this.shard.is_live(key) {
                        // Idle cost: once authenticated, clients only send heartbeats.
                        buf = Vec::with_capacity(small);
                    }
                    this.read = Some(read_owned(rd, buf));
                }
            }
        }
    }
}

async fn tick_loop(shard: Rc<Shard>) {
    let tick = Duration::from_millis(shard.cfg().timer_tick_ms);
    let counts_every = Duration::from_millis(shard.cfg().counts_interval_ms.max(1));
    let mut last_counts = Instant::now();
    // Per-shard share of the node's drain rate, per tick.
    let per_tick = ((shard.cfg().drain_close_per_s * shard.cfg().timer_tick_ms)
        / (1000 * shard.node.shards as u64))
        .max(1) as usize;
    loop {
        monoio::time::sleep(tick).await;
        if shard.node.stop.load(Ordering::Acquire) {
            return;
        }
        let now = Instant::now();
        shard.on_tick(now);
        shard.retry_backlog();
        if now.duration_since(last_counts) >= counts_every {
            last_counts = now;
            shard.report_counts();
        }
        if shard.node.draining.load(Ordering::Relaxed) {
            shard.drain_some(per_tick, CloseReason::Shutdown, now);
        }
    }
}
