//! The shard core, sans-io: every decision one shard makes, with no sockets, no clock and no
//! wakers (quinn-proto is the model; [`crate::shard`] is the monoio shell around it).
//!
//! Inputs, each with the `now` the shell read once:
//! - [`ShardCore::on_accept`] a new socket (admitted or refused, with a reconnect hint),
//! - [`ShardCore::on_bytes`] bytes a connection sent,
//! - [`ShardCore::on_written`] bytes the kernel took, [`ShardCore::on_closed`] a socket gone,
//! - [`ShardCore::on_msg`] a message from another shard (batches, counts),
//! - [`ShardCore::on_timeout`] time passed (timers, counts, drain).
//!
//! Outputs, polled until `None` after every input:
//! - [`ShardCore::poll_transmit`] a connection with bytes to write or a close to carry out; the
//!   owner of its write half then takes the bytes with [`ShardCore::take_transmit`] (all queued
//!   buffers at once, up to [`WRITE_BUFS_MAX`], for one vectored write),
//! - [`ShardCore::poll_msg`] a message for another shard (or for this shard's link hub),
//! - [`ShardCore::poll_timeout`] when to call `on_timeout` next.
//!
//! Invariants:
//! - Time is `u64` milliseconds since the core's epoch ([`Millis`]): no wrap in the life of a
//!   process (a `u32` wrapped after 49.7 days and then never closed a silent connection).
//! - A [`ConnId`] is (slab key, generation); every input and timer checks the generation, so
//!   a stale id for a reused slot does nothing.
//! - A connection is in the room and reach indexes iff it is authenticated and not closing:
//!   closing unseats it at once, so fan-out never queues to a closing connection.
//! - At most one write per connection is in flight; a connection is in the ready queue at
//!   most once (so the queue is bounded by the slab).
//! - Every queue that grows with input has a named bound: send queues by
//!   `send_queue_bytes_max` (replies by [`REPLY_QUEUE_FACTOR`] times it), the outbox by
//!   [`OUTBOX_MSGS_MAX`], the per-address map by the connections it counts.

use crate::fanout::{Frames, Target};
use crate::index::{EncodingSet, Lane, RoomIndex};
use crate::metrics::{DropReason, ShardMetrics};
use crate::node::{Msg, Node, ShardIdx};
use crate::queue::SendQueue;
use crate::reach::ReachIndex;
use crate::session::{Action, Authed, CloseReason, Ctx, Session, Transport};
use crate::wheel::Wheel;
use bytes::Bytes;
use proto::auth;
use proto::id::{Priority, RoomId};
use proto::link::{Batch, Interest};
use slab::Slab;
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a closing connection may take to flush its last bytes (auth reply, close frame).
pub const CLOSE_FLUSH_MS_MAX: u64 = 1_000;
/// High-priority batches may exceed the queue bound up to this factor before they drop too.
pub const HIGH_PRIORITY_QUEUE_FACTOR: usize = 4;
/// Replies (auth, heartbeat) bypass the batch bound up to this factor of it; a client that
/// sends heartbeats without reading the replies is stuck past that.
pub const REPLY_QUEUE_FACTOR: usize = 4;
/// Buffers handed out per transmit (one `writev`; far below IOV_MAX).
pub const WRITE_BUFS_MAX: usize = 64;
/// Bytes handed out per transmit (at least one buffer). Bytes in flight count against the
/// queue bound until `on_written`, so a large transmit would make the bound coarse: a reader
/// that keeps up could see batches dropped while one big write drains.
pub const WRITE_BYTES_MAX: usize = 64 * 1024;
/// Messages waiting for a full ring; past this, counts are dropped (the next report
/// replaces them) and then anything (counted as `outbox`).
pub const OUTBOX_MSGS_MAX: usize = 8_192;
/// A client refused at capacity is told to come back after this long.
pub const REFUSE_RETRY_S: u64 = 5;
/// The op 8 code of a refusal at capacity: "try again later" (another edge or after
/// `retry_after_s`). Clients that do not know it treat it like any failed auth: reconnect.
pub const AUTH_RETRY_LATER: i32 = -503;

/// Milliseconds since the core's epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Millis(pub u64);

/// A connection on one shard: slab key plus generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnId {
    key: u32,
    gen: u32,
}

impl ConnId {
    /// The slab key (dense: the shell may index a side table with it).
    pub fn key(self) -> usize {
        self.key as usize
    }

    /// The generation of the slot (presence makes node-wide ids of key and generation).
    pub fn gen(self) -> u32 {
        self.gen
    }

    /// Key and generation in one word (an epoll registration's key).
    pub fn to_bits(self) -> u64 {
        u64::from(self.gen) << 32 | u64::from(self.key)
    }

    /// The id [`ConnId::to_bits`] made (a stale one is harmless: every input checks it).
    pub fn from_bits(bits: u64) -> ConnId {
        ConnId {
            key: bits as u32,
            gen: (bits >> 32) as u32,
        }
    }

    #[cfg(test)]
    pub(crate) fn for_test(key: u32, gen: u32) -> ConnId {
        ConnId { key, gen }
    }
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
    id: ConnId,
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
    closing: Closing,
    /// Counted in `pending_handshakes` (not yet authenticated).
    pending: bool,
    /// A write is in flight (taken with `take_transmit`, not yet `on_written`).
    in_flight: bool,
    /// In the ready queue.
    ready: bool,
    queued_bytes: u32,
    seat: Option<Seat>,
    last_seen: Millis,
    /// When the queue first went over the bound, plus one ms (0: not stuck). Not an
    /// `Option<Millis>`: that doubles the field in every slab entry.
    stuck_since_ms: u64,
    session: Session,
    queue: SendQueue,
    /// High-priority batches at the front of `queue`: a new one goes after them and ahead of
    /// every queued low-priority batch (issue 9, priority isolation). Each queued buffer is a
    /// whole packet (or WS frame) never partly written, so reordering them is safe; the two
    /// priorities have their own seq spaces, so clients see no false gap.
    high_front: u16,
}

/// Why a connection was refused at accept, and what to tell it before closing.
#[derive(Debug)]
pub struct Refused {
    pub reason: CloseReason,
    /// The reconnect hint: an op 8 `{"code":-503,"retry_after_s":N}` on TCP, an HTTP 503 with
    /// `Retry-After` on WebSocket. Empty when the peer gets a plain close.
    pub bytes: Vec<u8>,
}

/// What the owner of a connection's write half does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Transmit {
    /// Write the buffers appended to `bufs`, then report with `on_written`.
    Write,
    /// Nothing to write.
    Idle,
    /// Close the socket now (drop any write in flight), then report with `on_closed`.
    Close,
}

/// One shard's state. See the module docs.
pub struct ShardCore {
    id: ShardIdx,
    node: Arc<Node>,
    epoch: Instant,
    conns: Slab<Conn>,
    next_gen: u32,
    index: RoomIndex,
    reach: ReachIndex,
    /// High-reach ACK state (opted-in connections, ACKs for the brokers).
    acks: crate::acks::Acks,
    wheel: Wheel<Timer>,
    /// Fleet-wide online counts (from the brokers' COUNTS) for rooms with viewers here.
    fleet: HashMap<RoomId, u32>,
    /// Node-wide viewer counts (from the link shard) for rooms with viewers here.
    node_counts: HashMap<RoomId, u32>,
    per_addr: HashMap<IpAddr, u32>,
    /// The peer of each connection counted in `per_addr` (only while the cap is on), kept here
    /// rather than in every slab entry.
    peers: HashMap<u32, IpAddr>,
    ready: VecDeque<ConnId>,
    outbox: VecDeque<(ShardIdx, Msg)>,
    /// Messages a full ring refused; moved back to the outbox on the next timeout.
    retry: Vec<(ShardIdx, Msg)>,
    draining: bool,
    /// Presence enters and exits not yet posted to the link hub (one message per `poll_msg`).
    presence: Vec<proto::link::PresenceEvent>,
    next_counts: Millis,
    actions: Vec<Action>,
    targets: Vec<Target>,
    /// Resuming connections whose live batches are held (crate::resume).
    resumes: crate::resume::Resumes,
    /// UDP: sessions, the per-address rate limit and the datagrams waiting for the socket.
    udp: UdpState,
}

/// One shard's UDP state (see `crate::udp`).
struct UdpState {
    sessions: crate::udp::Sessions<ConnId>,
    limit: crate::udp::RateLimit,
    out: VecDeque<(SocketAddr, Bytes)>,
}

impl ShardCore {
    /// A core for shard `id` of `node`, whose clock starts at `now`.
    pub fn new(id: ShardIdx, node: Arc<Node>, now: Instant) -> ShardCore {
        let tick = Duration::from_millis(node.config.timer_tick_ms);
        ShardCore {
            id,
            epoch: now,
            conns: Slab::new(),
            next_gen: 1,
            index: RoomIndex::new(),
            reach: ReachIndex::new(),
            acks: Default::default(),
            wheel: Wheel::new(now, tick),
            fleet: HashMap::new(),
            node_counts: HashMap::new(),
            per_addr: HashMap::new(),
            peers: HashMap::new(),
            ready: VecDeque::new(),
            outbox: VecDeque::new(),
            retry: Vec::new(),
            draining: false,
            presence: Vec::new(),
            next_counts: Millis(node.config.counts_interval_ms.max(1)),
            actions: Vec::new(),
            targets: Vec::new(),
            resumes: crate::resume::Resumes::new(
                id,
                crate::resume::Limits {
                    ms_max: node.config.resume_ms_max,
                    hold_bytes_max: node.config.resume_hold_bytes_max,
                    pending_max: node.config.resumes_pending_max,
                },
            ),
            udp: UdpState {
                sessions: Default::default(),
                limit: crate::udp::RateLimit::new(
                    node.config.udp_datagrams_per_addr_per_s,
                    node.config.udp_datagrams_per_addr_per_s.saturating_mul(2),
                ),
                out: VecDeque::new(),
            },
            node,
        }
    }

    pub fn id(&self) -> ShardIdx {
        self.id
    }

    fn m(&self) -> &ShardMetrics {
        &self.node.metrics[self.id]
    }

    fn ms(&self, now: Instant) -> Millis {
        Millis(now.saturating_duration_since(self.epoch).as_millis() as u64)
    }

    fn at(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }

    fn get(&self, id: ConnId) -> Option<&Conn> {
        self.conns.get(id.key()).filter(|c| c.gen == id.gen)
    }

    fn get_mut(&mut self, id: ConnId) -> Option<&mut Conn> {
        self.conns.get_mut(id.key()).filter(|c| c.gen == id.gen)
    }

    /// Open connections on this shard (closing ones included until `on_closed`).
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Authenticated connections seated in a room.
    pub fn seated(&self) -> usize {
        self.index.member_count()
    }

    /// Whether `id` is still a connection here (not yet reported closed).
    pub fn contains(&self, id: ConnId) -> bool {
        self.get(id).is_some()
    }

    /// Whether the session of `id` is authenticated (its read buffer can shrink).
    pub fn is_live(&self, id: ConnId) -> bool {
        self.get(id).is_some_and(|c| c.session.is_live())
    }

    /// Whether the shell must drop the socket of `id` now (also when it is gone).
    pub fn must_close(&self, id: ConnId) -> bool {
        self.get(id).is_none_or(|c| c.closing == Closing::Now)
    }

    /// Bytes queued and not yet written for `id`.
    pub fn queued_bytes(&self, id: ConnId) -> usize {
        self.get(id).map_or(0, |c| c.queued_bytes as usize)
    }

    /// This shard's viewers of `room`.
    pub fn room_len(&self, room: RoomId) -> usize {
        self.index.room_len(room)
    }

    // ---- connections ----

    /// A socket was accepted from `peer`. Returns its id, or why it is refused and what to
    /// tell it (the shell writes that, bounded in time, and closes).
    pub fn on_accept(
        &mut self,
        transport: Transport,
        peer: IpAddr,
        now: Instant,
    ) -> Result<ConnId, Refused> {
        if let Err(reason) = self.admit(peer) {
            self.m().closed(reason);
            return Err(Refused {
                reason,
                bytes: refusal_bytes(transport, reason),
            });
        }
        Ok(self.open(transport, peer, now))
    }

    /// A new connection in the slab (admission already passed).
    fn open(&mut self, transport: Transport, peer: IpAddr, now: Instant) -> ConnId {
        let gen = self.next_gen;
        self.next_gen = gen.wrapping_add(1).max(1);
        let cap_on = self.node.config.conns_per_addr_max > 0;
        let conn = Conn {
            gen,
            closing: Closing::Open,
            pending: true,
            in_flight: false,
            ready: false,
            queued_bytes: 0,
            seat: None,
            last_seen: self.ms(now),
            stuck_since_ms: 0,
            session: Session::new(transport, &self.node.limits),
            queue: SendQueue::Empty,
            high_front: 0,
        };
        let id = ConnId {
            key: self.conns.insert(conn) as u32,
            gen,
        };
        if cap_on {
            *self.per_addr.entry(peer).or_default() += 1;
            self.peers.insert(id.key, peer);
        }
        let m = self.m();
        m.pending_handshakes.inc();
        m.accepted.inc();
        match transport {
            Transport::Tcp => m.conns_tcp.inc(),
            Transport::Ws => m.conns_ws.inc(),
            Transport::Udp => m.conns_udp.inc(),
        }
        let cfg = &self.node.config;
        let (auth_at, hs_at) = (
            now + Duration::from_millis(cfg.auth_ms_max),
            now + Duration::from_millis(cfg.handshake_ms_max),
        );
        // One timer per connection, re-armed as the next kind when it fires (handshake, then
        // auth, then heartbeat): a mass connect holds one wheel entry per connection, not three.
        if transport == Transport::Ws && hs_at < auth_at {
            self.arm(id, TimerKind::Handshake, hs_at);
        } else {
            self.arm(id, TimerKind::Auth, auth_at);
        }
        id
    }

    /// The admission rules, cheapest first: drain, node capacity (keeps the fd reserve for
    /// links, admin and control), unauthenticated backlog, per-address cap.
    fn admit(&self, peer: IpAddr) -> Result<(), CloseReason> {
        let cfg = &self.node.config;
        if self.draining
            || self
                .node
                .draining
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err(CloseReason::Shutdown);
        }
        if self.node.connections() >= self.node.capacity {
            return Err(CloseReason::Capacity);
        }
        if self.m().pending_handshakes.get() as usize >= cfg.pending_handshakes_max {
            return Err(CloseReason::Overloaded);
        }
        if cfg.conns_per_addr_max > 0 {
            let per_shard = cfg
                .conns_per_addr_max
                .div_ceil(self.node.shards.max(1) as u32);
            if self.per_addr.get(&peer).copied().unwrap_or(0) >= per_shard {
                return Err(CloseReason::AddrLimit);
            }
        }
        Ok(())
    }

    /// The socket of `id` is gone (EOF, error, or after `Transmit::Close`). `reason` is
    /// counted only when the core had not closed it itself.
    pub fn on_closed(&mut self, id: ConnId, reason: CloseReason) {
        if self.get(id).is_none() {
            return;
        }
        let conn = self.conns.remove(id.key());
        if conn.closing == Closing::Open {
            self.m().closed(reason);
        }
        self.unseat(id, conn.seat);
        if let Some(p) = self.peers.remove(&id.key) {
            if let Some(n) = self.per_addr.get_mut(&p) {
                *n -= 1;
                if *n == 0 {
                    self.per_addr.remove(&p);
                }
            }
        }
        let m = self.m();
        if conn.pending {
            m.pending_handshakes.dec();
        }
        match conn.session.transport() {
            Transport::Tcp => m.conns_tcp.dec(),
            Transport::Ws => m.conns_ws.dec(),
            Transport::Udp => {
                m.conns_udp.dec();
                self.udp.sessions.remove_key(id.key);
            }
        }
    }

    /// Bytes received from `id`. `unix_s` is wall-clock seconds (token expiry).
    pub fn on_bytes(&mut self, id: ConnId, input: &[u8], now: Instant, unix_s: u64) {
        let now_ms = self.ms(now);
        let mut actions = std::mem::take(&mut self.actions);
        {
            let node = self.node.clone();
            let shard = self.id;
            let Some(c) = self.get_mut(id) else { return };
            c.last_seen = now_ms;
            // A snapshot: a reload (SIGHUP) swaps the set for the next bytes, not mid-auth.
            let keys = node.keys.load();
            // Timed only before auth: a seated viewer's heartbeats read no clock here.
            let auth_started = c.seat.is_none().then(Instant::now);
            let ctx = Ctx {
                limits: &node.limits,
                keys: &keys,
                now_s: unix_s,
            };
            c.session.on_bytes(input, &ctx, &mut actions);
            if let Some(t) = auth_started {
                if actions.iter().any(|a| matches!(a, Action::Authed(_))) {
                    node.metrics[shard].auth_us.observe_since(t);
                }
            }
        }
        for a in actions.drain(..) {
            match a {
                Action::Send(b) => self.reply(id, b, now),
                Action::Authed(a) => self.seat(id, a, now),
                Action::Heartbeat => {
                    self.m().heartbeats.inc();
                    let Some(c) = self.get(id) else { continue };
                    let online = c.seat.map_or(0, |s| self.online(s.room));
                    let reply = c.session.frame(&auth::heartbeat_reply(online));
                    self.reply(id, reply, now);
                }
                Action::Ack(msg) => match self.acks.on_ack(id.key, msg, now_ms.0) {
                    crate::acks::Outcome::Forwarded => self.m().acks.inc(),
                    crate::acks::Outcome::NotOptedIn => self.m().acks_not_opted_in.inc(),
                    crate::acks::Outcome::RateLimited => self.m().acks_rate_limited.inc(),
                },
                Action::Close {
                    reason,
                    auth_fail,
                    bytes,
                } => {
                    if let Some(f) = auth_fail {
                        self.m().auth_failed(f);
                    }
                    self.begin_close(id, reason, bytes, now);
                }
            }
        }
        self.actions = actions;
    }

    /// The kernel took `n` bytes of the write in flight of `id`.
    pub fn on_written(&mut self, id: ConnId, n: usize) {
        let max = self.node.config.send_queue_bytes_max;
        let Some(c) = self.get_mut(id) else { return };
        c.in_flight = false;
        c.queued_bytes = c.queued_bytes.saturating_sub(n as u32);
        if c.queued_bytes as usize <= max {
            c.stuck_since_ms = 0;
        }
        let more = !c.queue.is_empty() || c.closing != Closing::Open;
        self.m().bytes_out.add(n as u64);
        if more {
            self.mark_ready(id);
        }
    }

    /// The next connection whose writer has work (bytes or a close). Each connection is
    /// returned at most once until its writer calls `take_transmit`.
    pub fn poll_transmit(&mut self) -> Option<ConnId> {
        while let Some(id) = self.ready.pop_front() {
            if let Some(c) = self.get_mut(id) {
                if c.ready {
                    c.ready = false;
                    return Some(id);
                }
            }
        }
        None
    }

    /// Hands the writer of `id` what is queued (up to [`WRITE_BUFS_MAX`] buffers and
    /// [`WRITE_BYTES_MAX`] bytes, at least one buffer) or tells it to close.
    pub fn take_transmit(&mut self, id: ConnId, bufs: &mut Vec<Bytes>) -> Transmit {
        let Some(c) = self.get_mut(id) else {
            return Transmit::Close;
        };
        c.ready = false;
        if c.closing == Closing::Now {
            return Transmit::Close;
        }
        if c.in_flight {
            return Transmit::Idle;
        }
        if c.queue.is_empty() {
            if c.closing == Closing::AfterFlush {
                c.closing = Closing::Now;
                return Transmit::Close;
            }
            return Transmit::Idle;
        }
        let mut bytes = 0;
        while let Some(b) = c.queue.front() {
            if !bufs.is_empty()
                && (bufs.len() >= WRITE_BUFS_MAX || bytes + b.len() > WRITE_BYTES_MAX)
            {
                break;
            }
            bytes += b.len();
            if let Some(b) = c.queue.pop_front() {
                bufs.push(b);
                c.high_front = c.high_front.saturating_sub(1);
            }
        }
        c.in_flight = true;
        self.m().writes.inc();
        Transmit::Write
    }

    /// Schedules timer `kind` of `id` at `at`.
    fn arm(&mut self, id: ConnId, kind: TimerKind, at: Instant) {
        self.wheel.insert(at, Timer { id, kind });
    }

    fn mark_ready(&mut self, id: ConnId) {
        let Some(c) = self.get_mut(id) else { return };
        // A UDP session has no writer: its bytes went to the datagram outbox.
        if c.ready || c.session.transport() == Transport::Udp {
            return;
        }
        if c.in_flight && c.closing != Closing::Now {
            // The writer comes back with `on_written` and looks again.
            return;
        }
        c.ready = true;
        self.ready.push_back(id);
    }

    /// Queues bytes for a connection. `bounded`: apply `send_queue_bytes_max` (batches).
    /// Returns false if the bytes were dropped.
    fn enqueue(
        &mut self,
        id: ConnId,
        bytes: Bytes,
        priority: Priority,
        bounded: bool,
        now: Instant,
    ) -> bool {
        let max = self.node.config.send_queue_bytes_max;
        let stuck_ms = self.node.config.stuck_ms_max;
        let now_ms = self.ms(now);
        let Some(c) = self.get_mut(id) else {
            return false;
        };
        if c.closing != Closing::Open {
            return false;
        }
        if c.session.transport() == Transport::Udp {
            return self.udp_enqueue(id, bytes, priority, bounded);
        }
        let cap = match (bounded, priority) {
            (false, _) => max.saturating_mul(REPLY_QUEUE_FACTOR),
            (true, Priority::High) => max.saturating_mul(HIGH_PRIORITY_QUEUE_FACTOR),
            (true, _) => max,
        };
        if c.queued_bytes as usize + bytes.len() > cap {
            if c.stuck_since_ms == 0 {
                c.stuck_since_ms = now_ms.0 + 1;
                self.arm(id, TimerKind::Stuck, now + Duration::from_millis(stuck_ms));
            }
            if bounded {
                self.m().dropped(DropReason::QueueFull, 1);
            }
            return false;
        }
        c.queued_bytes = c.queued_bytes.saturating_add(bytes.len() as u32);
        if bounded && priority == Priority::High && c.high_front < u16::MAX {
            // The high lane: ahead of queued low-priority batches, behind earlier high ones.
            let at = usize::from(c.high_front).min(c.queue.len());
            c.queue.insert(at, bytes);
            c.high_front += 1;
        } else {
            c.queue.push_back(bytes);
        }
        self.mark_ready(id);
        true
    }

    fn reply(&mut self, id: ConnId, bytes: Vec<u8>, now: Instant) {
        self.enqueue(id, Bytes::from(bytes), Priority::High, false, now);
    }

    /// Starts closing: unseat now, flush `bytes` (if any), then close.
    fn begin_close(&mut self, id: ConnId, reason: CloseReason, bytes: Vec<u8>, now: Instant) {
        if self
            .get(id)
            .is_some_and(|c| c.closing == Closing::Open && c.session.transport() == Transport::Udp)
        {
            return self.close_udp(id, reason, bytes);
        }
        let flush = !bytes.is_empty();
        let seat = {
            let Some(c) = self.get_mut(id) else { return };
            if c.closing != Closing::Open {
                return;
            }
            if flush {
                c.queued_bytes = c.queued_bytes.saturating_add(bytes.len() as u32);
                c.queue.push_back(Bytes::from(bytes));
                c.closing = Closing::AfterFlush;
            } else {
                c.closing = Closing::Now;
            }
            c.seat.take()
        };
        if flush {
            self.arm(
                id,
                TimerKind::Closing,
                now + Duration::from_millis(CLOSE_FLUSH_MS_MAX),
            );
        }
        self.mark_ready(id);
        self.m().closed(reason);
        self.unseat(id, seat);
    }

    /// Closes a connection for a reason of the core's own (timeouts, drain, stuck).
    fn close_conn(&mut self, id: ConnId, reason: CloseReason, now: Instant) {
        let bytes = {
            let Some(c) = self.get_mut(id) else { return };
            if c.closing != Closing::Open {
                return;
            }
            if reason == CloseReason::Stuck {
                // The peer is not reading: a close frame would only queue behind the rest.
                c.queue.clear();
                c.high_front = 0;
                c.queued_bytes = 0;
                c.session.close(reason);
                Vec::new()
            } else {
                c.session.close(reason)
            }
        };
        self.begin_close(id, reason, bytes, now);
    }

    fn unseat(&mut self, id: ConnId, seat: Option<Seat>) {
        let Some(seat) = seat else { return };
        self.resumes.forget(id.key);
        self.report_presence(crate::presence::exit(crate::presence::conn_id(self.id, id)));
        self.reach.leave(id.key);
        self.acks.leave(id.key);
        if let Some(c) = self.index.leave(id.key, seat.room, seat.lane) {
            self.emit_change(seat.room, c);
        }
    }

    fn emit_change(&mut self, room: RoomId, c: crate::index::Change) {
        if let Some(set) = c.room {
            if set.is_empty() {
                self.fleet.remove(&room);
                self.node_counts.remove(&room);
            }
            self.m().rooms.set(self.index.room_count() as u64);
            self.tell_link(Interest::Room(room), set);
        }
        if let Some(set) = c.area_set {
            self.tell_link(Interest::Area(c.area), set);
        }
    }

    fn tell_link(&mut self, interest: Interest, set: EncodingSet) {
        if !self.node.config.links_brokers() {
            return;
        }
        let from = self.id;
        self.post(
            0,
            Msg::Interest {
                from,
                interest,
                set,
            },
        );
    }

    /// Online count for a heartbeat reply: fleet-wide if the brokers told us, else this
    /// node's (at least this shard's current count, as the node figure lags a report).
    fn online(&self, room: RoomId) -> u32 {
        if let Some(n) = self.fleet.get(&room) {
            return *n;
        }
        let local = self.index.room_len(room) as u32;
        self.node_counts
            .get(&room)
            .map_or(local, |n| (*n).max(local))
    }

    fn seat(&mut self, id: ConnId, a: Authed, now: Instant) {
        let rooms_max = self.node.config.rooms_max;
        if !self.index.has_room(a.room) && self.index.room_count() >= rooms_max {
            let Some(c) = self.get_mut(id) else { return };
            let mut b = c.session.frame(&auth::auth_reply(auth::AUTH_BAD_TOKEN));
            b.extend(c.session.close(CloseReason::RoomsFull));
            self.begin_close(id, CloseReason::RoomsFull, b, now);
            return;
        }
        let udp = self.udp.sessions.of_key(id.key);
        let (reply, lane, was_pending) = {
            let Some(c) = self.get_mut(id) else { return };
            let lane = match c.session.transport() {
                Transport::Udp => Lane::udp(a.encoding),
                t => Lane::new(a.encoding, t == Transport::Ws),
            };
            c.seat = Some(Seat { room: a.room, lane });
            let was_pending = std::mem::replace(&mut c.pending, false);
            let reply = match udp {
                // Over UDP the op 8 carries the session id the client echoes from now on.
                Some(s) => proto::udp::hello_ok(s),
                None => c.session.frame(&auth::auth_reply(auth::AUTH_OK)),
            };
            (reply, lane, was_pending)
        };
        if was_pending {
            self.m().pending_handshakes.dec();
        }
        self.m().auth_ok.inc();
        let change = self.index.join(id.key, a.room, a.area, lane);
        self.emit_change(a.room, change);
        self.reach.join(id.key, a.uid.0, &a.device.0);
        self.acks.join(id.key, a.uid, &a.device, a.ack);
        if let Some(c) = self.get(id) {
            let t = crate::presence::transport(c.session.transport());
            let conn = crate::presence::conn_id(self.id, id);
            let ev = crate::presence::enter(conn, a.uid, a.device, a.room, a.area, t);
            self.report_presence(ev);
        }
        self.reply(id, reply, now);
        if a.sync {
            self.begin_resume(id, a.room, a.encoding, a.resume, now);
        }
        // Normally no heartbeat timer here: the connection's auth timer becomes it when it
        // fires (`fire`), so an authenticated connection holds one wheel entry.
        if heartbeat_before_auth(&self.node.config) {
            self.arm(
                id,
                TimerKind::Heartbeat,
                now + Duration::from_millis(self.node.config.heartbeat_timeout_ms),
            );
        }
    }

    // ---- UDP ----

    /// A datagram from `from`: received on this shard's socket, or `forwarded` by the shard
    /// whose socket the kernel picked. `unix_s` is wall-clock seconds (cookies, token expiry).
    pub fn on_datagram(
        &mut self,
        bytes: &[u8],
        from: SocketAddr,
        now: Instant,
        unix_s: u64,
        forwarded: bool,
    ) {
        use proto::udp::Admit;
        let now_ms = self.ms(now).0;
        if !forwarded {
            self.m().udp_datagrams_in.inc();
            // Before anything is parsed or allocated: a flood costs a hash and a table slot.
            if !self.udp.limit.allow(from.ip(), now_ms) {
                self.m().udp_dropped("rate_limited");
                return;
            }
            if let Some(s) = proto::udp::session_of_datagram(bytes) {
                let owner = usize::from(s.shard());
                if owner != self.id && owner < self.node.shards {
                    self.m().udp_forwarded.inc();
                    self.post(
                        owner,
                        Msg::Datagram {
                            from,
                            bytes: bytes.into(),
                        },
                    );
                    return;
                }
            }
        }
        let admitted = {
            let sessions = &self.udp.sessions;
            proto::udp::admit(
                &self.node.udp_key,
                bytes,
                from,
                |s| sessions.addr(s),
                self.id as u16,
                unix_s,
                self.node.config.udp_payload_bytes_max,
            )
        };
        match admitted {
            // A cookie for an address not yet validated: `admit` made sure it is no larger
            // than what the address sent.
            Admit::Reply(b) => self.udp_send(from, Bytes::from(b)),
            Admit::Drop(d) => self.m().udp_dropped(d.label()),
            Admit::Auth { session, auth } => {
                let pkt = proto::packet::encode_vec(auth.ver, auth.op, auth.seq, auth.body);
                self.udp_hello(session, &pkt, from, now, unix_s);
            }
            Admit::Requests { session, requests } => {
                self.udp_requests(session, &requests, now, unix_s)
            }
            Admit::Bye { session } => self.udp_bye(session, from),
            Admit::Migrate { session, requests } => {
                self.m().udp_migrations.inc();
                self.udp.sessions.move_to(session, from);
                self.udp_requests(session, &requests, now, unix_s);
            }
        }
    }

    /// A validated hello: a new session (admission, then the auth as on TCP), or a retransmit
    /// of one whose op 8 was lost (the same cookie names the same session).
    fn udp_hello(
        &mut self,
        session: proto::udp::SessionId,
        auth_packet: &[u8],
        from: SocketAddr,
        now: Instant,
        unix_s: u64,
    ) {
        if let Some(e) = self.udp.sessions.get(session) {
            if self.is_live(e.conn) {
                self.udp_send(e.addr, Bytes::from(proto::udp::hello_ok(session)));
            }
            return;
        }
        if let Err(reason) = self.admit(from.ip()) {
            self.m().closed(reason);
            self.udp_send(from, Bytes::from(refusal_bytes(Transport::Udp, reason)));
            return;
        }
        let id = self.open(Transport::Udp, from.ip(), now);
        self.udp.sessions.insert(session, id.key, id, from);
        self.on_bytes(id, auth_packet, now, unix_s);
    }

    /// The client ended its session (`admit` checked it is the session's, see
    /// docs/protocol-udp.md, "Bye"): it is freed now, as a TCP close (the viewer leaves the
    /// index, presence reports the exit), and the answer goes to the address that sent it.
    fn udp_bye(&mut self, session: proto::udp::SessionId, from: SocketAddr) {
        let Some(e) = self.udp.sessions.get(session) else {
            return;
        };
        self.m().udp_byes.inc();
        self.close_udp(e.conn, CloseReason::PeerClosed, Vec::new());
        self.udp_send(from, Bytes::from(proto::udp::bye_reply()));
    }

    /// The requests (heartbeats, ACKs) of a session datagram, fed to its session as on TCP.
    fn udp_requests(
        &mut self,
        session: proto::udp::SessionId,
        requests: &[proto::packet::Packet<'_>],
        now: Instant,
        unix_s: u64,
    ) {
        let Some(e) = self.udp.sessions.get(session) else {
            return;
        };
        let mut input = Vec::new();
        for p in requests {
            proto::packet::encode(p.ver, p.op, p.seq, p.body, &mut input);
        }
        // Even an empty one counts as a sign of life (it keeps the session open).
        self.on_bytes(e.conn, &input, now, unix_s);
    }

    /// Queues a datagram for a session (bounded: see `crate::udp::UDP_OUTBOX_DATAGRAMS_MAX`).
    fn udp_enqueue(&mut self, id: ConnId, bytes: Bytes, priority: Priority, bounded: bool) -> bool {
        let Some(addr) = self.udp.sessions.addr_of_key(id.key) else {
            return false;
        };
        let max = crate::udp::UDP_OUTBOX_DATAGRAMS_MAX;
        let cap = match (bounded, priority) {
            (true, Priority::Low) => max,
            _ => max * crate::udp::UDP_OUTBOX_HIGH_FACTOR,
        };
        if self.udp.out.len() >= cap {
            self.m().udp_dropped("outbox_full");
            if bounded {
                self.m().dropped(DropReason::QueueFull, 1);
            }
            return false;
        }
        self.udp.out.push_back((addr, bytes));
        true
    }

    fn udp_send(&mut self, to: SocketAddr, bytes: Bytes) {
        let cap = crate::udp::UDP_OUTBOX_DATAGRAMS_MAX * crate::udp::UDP_OUTBOX_HIGH_FACTOR;
        if self.udp.out.len() >= cap {
            self.m().udp_dropped("outbox_full");
            return;
        }
        self.udp.out.push_back((to, bytes));
    }

    /// Closes a UDP session at once (there is no socket to flush): its last bytes (an auth
    /// refusal) go out as one datagram, then it leaves the slab and the session table.
    fn close_udp(&mut self, id: ConnId, reason: CloseReason, bytes: Vec<u8>) {
        let seat = {
            let Some(c) = self.get_mut(id) else { return };
            c.closing = Closing::Now;
            c.seat.take()
        };
        if !bytes.is_empty() {
            if let Some(addr) = self.udp.sessions.addr_of_key(id.key) {
                self.udp_send(addr, Bytes::from(bytes));
            }
        }
        self.m().closed(reason);
        self.unseat(id, seat);
        self.on_closed(id, reason);
    }

    /// The next datagram for the shard's UDP socket.
    pub fn poll_datagram(&mut self) -> Option<(SocketAddr, Bytes)> {
        let d = self.udp.out.pop_front()?;
        let m = self.m();
        m.udp_datagrams_out.inc();
        m.bytes_out.add(d.1.len() as u64);
        Some(d)
    }

    /// Whether datagrams wait for the socket.
    pub fn has_datagrams(&self) -> bool {
        !self.udp.out.is_empty()
    }

    /// UDP sessions on this shard.
    pub fn udp_sessions(&self) -> usize {
        self.udp.sessions.len()
    }

    // ---- messages ----

    /// A message from another shard (or from this shard's link hub).
    pub fn on_msg(&mut self, msg: Msg, now: Instant) {
        match msg {
            Msg::Batch(b) => self.fan_out(&b, now),
            Msg::FleetCounts(c) => keep_counts(&self.index, &mut self.fleet, &c),
            Msg::NodeCounts(c) => keep_counts(&self.index, &mut self.node_counts, &c),
            Msg::Epoch { room, sync } => self.tell_epoch(room, &sync, now),
            Msg::Replayed { req, answer } => {
                if let Some(f) = self.resumes.on_answer(req, answer.map(|a| *a), now) {
                    self.finish_resume(f, now);
                }
            }
            // Needs the wall clock (cookies): the shell calls `on_datagram` for these.
            Msg::Datagram { .. } => {}
            // The link hub's business; the shell routes them there.
            Msg::Interest { .. }
            | Msg::Counts { .. }
            | Msg::Presence(_)
            | Msg::Acks(_)
            | Msg::Replay { .. } => {}
        }
    }

    /// The next message for another shard (`to` may be this shard: its link hub).
    pub fn poll_msg(&mut self) -> Option<(ShardIdx, Msg)> {
        if self.outbox.is_empty() && !self.presence.is_empty() {
            return Some((0, Msg::Presence(std::mem::take(&mut self.presence))));
        }
        if self.outbox.is_empty() && self.node.config.links_brokers() {
            if let Some(acks) = self.acks.take() {
                return Some((0, Msg::Acks(acks)));
            }
        }
        self.outbox.pop_front()
    }

    /// Queues a presence event for the link hub (when presence is on and there is a broker).
    fn report_presence(&mut self, ev: proto::link::PresenceEvent) {
        if self.node.config.presence && self.node.config.links_brokers() {
            self.presence.push(ev);
        }
    }

    /// The ring to `to` was full: batches are dropped (counted; viewers see the gap in the
    /// room seq), anything else is retried on the next timeout.
    pub fn on_msg_refused(&mut self, to: ShardIdx, msg: Msg) {
        match msg {
            Msg::Batch(_) => self.m().dropped(DropReason::RingFull, 1),
            other => self.retry.push((to, other)),
        }
    }

    fn post(&mut self, to: ShardIdx, msg: Msg) {
        if self.outbox.len() + self.retry.len() >= OUTBOX_MSGS_MAX {
            // Counts are periodic: the next report supersedes them.
            let before = self.outbox.len();
            self.outbox
                .retain(|(_, m)| !matches!(m, Msg::Counts { .. }));
            let freed = before - self.outbox.len();
            if freed == 0 {
                self.m().dropped(DropReason::Outbox, 1);
                return;
            }
            self.m().dropped(DropReason::Outbox, freed as u64);
        }
        self.outbox.push_back((to, msg));
    }

    /// Fans a batch out to this shard's viewers of its scope (bytes shared, see `fanout`).
    fn fan_out(&mut self, batch: &Batch, now: Instant) {
        let started = Instant::now();
        let m = &self.node.metrics[self.id];
        m.batches_in.inc();
        m.batch_bytes_in.add(batch.packet.len() as u64);
        let mut targets = std::mem::take(&mut self.targets);
        targets.clear();
        crate::fanout::targets(&self.index, &self.reach, batch, &mut targets);
        let mut frames = Frames::new(&batch.packet);
        let payload_max = self.node.config.udp_payload_bytes_max;
        let mut sends = 0u64;
        let resend = crate::acks::is_resend(batch);
        for t in &targets {
            let (key, lane) = match *t {
                Target::Lane(k, lane) => (k, lane),
                // A high-reach resend: only for connections that ACK (crate::acks).
                Target::Reach(k) if resend && !self.acks.gets_resends(k) => continue,
                Target::Reach(k) => {
                    let lane = self
                        .conns
                        .get(k as usize)
                        .filter(|c| c.closing == Closing::Open)
                        .and_then(|c| c.seat.map(|s| s.lane));
                    match lane {
                        Some(l) if l.encoding() == batch.encoding => (k, l),
                        _ => continue,
                    }
                }
            };
            let Some(gen) = self.conns.get(key as usize).map(|c| c.gen) else {
                continue;
            };
            if lane.is_udp() {
                let Some(dgs) = frames.udp(batch.encoding, payload_max) else {
                    self.m().udp_dropped("unsplittable");
                    continue;
                };
                let mut all = true;
                for d in dgs {
                    all &= self.enqueue(ConnId { key, gen }, d.clone(), batch.priority, true, now);
                }
                sends += u64::from(all);
                continue;
            }
            let bytes = if lane.is_ws() {
                frames.ws()
            } else {
                frames.tcp.clone()
            };
            if self.resumes.holds(key) {
                if let Some(f) = self.resumes.hold(key, batch, bytes, now) {
                    self.finish_resume(f, now);
                }
                continue;
            }
            if self.enqueue(ConnId { key, gen }, bytes, batch.priority, true, now) {
                sends += 1;
            }
        }
        self.targets = targets;
        self.m().sends.add(sends);
        self.m().fanout_us.observe_since(started);
        if batch.flushed_at_us != 0 {
            if let Some(us) = crate::presence::unix_us().checked_sub(batch.flushed_at_us) {
                self.m().flush_to_write_us.observe(us);
            }
        }
    }

    // ---- time ----

    /// When `on_timeout` should run next (at the latest).
    pub fn poll_timeout(&self) -> Instant {
        let tick = self.node.config.timer_tick_ms.max(1);
        let counts = self.at(self.next_counts.0);
        if self.wheel.is_empty() && !self.draining {
            return counts;
        }
        let now = self.wheel.current_tick_ms();
        counts.min(self.at(now + tick))
    }

    /// Time passed: fire timers, report counts, close a share of connections when draining.
    pub fn on_timeout(&mut self, now: Instant) {
        let now_ms = self.ms(now);
        let mut fired = Vec::new();
        self.wheel.advance(now, &mut fired);
        let mut i = 0;
        while let Some(&t) = fired.get(i) {
            i += 1;
            let Some(c) = self.get(t.id) else { continue };
            match self.fire(t.kind, c, now_ms) {
                Fire::Close(reason) => self.close_conn(t.id, reason, now),
                Fire::Force => {
                    if let Some(c) = self.get_mut(t.id) {
                        c.closing = Closing::Now;
                    }
                    self.mark_ready(t.id);
                }
                Fire::Rearm(at) => self.wheel.insert(self.at(at.0), t),
                // Already due (time jumped past it): it fires in this same call.
                Fire::Then(kind, at) if at <= now_ms => fired.push(Timer { id: t.id, kind }),
                Fire::Then(kind, at) => self.wheel.insert(self.at(at.0), Timer { id: t.id, kind }),
                Fire::Nothing => {}
            }
        }
        for (to, msg) in std::mem::take(&mut self.retry) {
            self.outbox.push_back((to, msg));
        }
        if !self.resumes.is_empty() {
            let mut done = Vec::new();
            self.resumes.expire(now, &mut done);
            for f in done {
                self.finish_resume(f, now);
            }
        }
        if now_ms >= self.next_counts {
            let every = self.node.config.counts_interval_ms.max(1);
            self.next_counts = Millis(now_ms.0 + every);
            self.report_counts();
        }
        if self.draining
            || self
                .node
                .draining
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            self.draining = true;
            let cfg = &self.node.config;
            let per_tick = ((cfg.drain_close_per_s * cfg.timer_tick_ms)
                / (1000 * self.node.shards.max(1) as u64))
                .max(1) as usize;
            self.close_some(per_tick, CloseReason::Shutdown, now);
        }
    }

    /// Decides what an expired timer means for its (still present) connection.
    fn fire(&self, kind: TimerKind, c: &Conn, now: Millis) -> Fire {
        let cfg = &self.node.config;
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
            // The chain of a connection's one timer: handshake, then auth, then heartbeat
            // (unless `seat` armed the heartbeat itself: see `heartbeat_before_auth`).
            TimerKind::Auth if heartbeat_before_auth(cfg) => Fire::Nothing,
            TimerKind::Auth => Fire::Then(
                TimerKind::Heartbeat,
                Millis(c.last_seen.0.saturating_add(cfg.heartbeat_timeout_ms)),
            ),
            TimerKind::Handshake if c.session.is_handshaking() => {
                Fire::Close(CloseReason::HandshakeTimeout)
            }
            TimerKind::Handshake => Fire::Then(
                TimerKind::Auth,
                Millis(now.0 + cfg.auth_ms_max.saturating_sub(cfg.handshake_ms_max)),
            ),
            TimerKind::Heartbeat => {
                let due = Millis(c.last_seen.0.saturating_add(cfg.heartbeat_timeout_ms));
                if now >= due {
                    Fire::Close(CloseReason::HeartbeatTimeout)
                } else {
                    Fire::Rearm(due)
                }
            }
            TimerKind::Stuck => match c.stuck_since_ms {
                0 => Fire::Nothing,
                since_plus_one => {
                    let due = Millis((since_plus_one - 1).saturating_add(cfg.stuck_ms_max));
                    if now >= due {
                        Fire::Close(CloseReason::Stuck)
                    } else {
                        Fire::Rearm(due)
                    }
                }
            },
            _ => Fire::Nothing,
        }
    }

    /// Starts a drain: refuse new connections, close the open ones gradually on timeouts.
    pub fn start_drain(&mut self) {
        self.draining = true;
    }

    /// Closes up to `n` open connections; returns how many remain open.
    pub fn close_some(&mut self, n: usize, reason: CloseReason, now: Instant) -> usize {
        let ids: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.closing == Closing::Open)
            .map(|(k, c)| ConnId {
                key: k as u32,
                gen: c.gen,
            })
            .take(n)
            .collect();
        for id in ids {
            self.close_conn(id, reason, now);
        }
        self.conns
            .iter()
            .filter(|(_, c)| c.closing == Closing::Open)
            .count()
    }

    // ---- resume (crate::resume) ----

    /// A connection that sent `ack` or `resume` was seated: hold its live batches and ask the
    /// brokers what it missed (or answer at once when there is no broker or no room).
    fn begin_resume(
        &mut self,
        id: ConnId,
        room: RoomId,
        encoding: proto::id::Encoding,
        resume: proto::sync::ResumeField,
        now: Instant,
    ) {
        match self.resumes.begin(id, room, encoding, resume, now) {
            crate::resume::Begin::Ask(request) => {
                // Not `broker_addrs` alone: in cluster mode the brokers come from control, and
                // with that test every resume there fell back as unlinked (epoch "unknown").
                if !self.node.config.links_brokers() {
                    if let Some(f) = self.resumes.on_answer(request.req, None, now) {
                        self.finish_resume(f, now);
                    }
                    return;
                }
                let from = self.id;
                self.post(0, Msg::Replay { from, request });
            }
            crate::resume::Begin::Now(f) => self.finish_resume(f, now),
        }
    }

    /// A broker link came back: every connection of `room` that asked for syncs learns the
    /// room's epoch before the room's next batch (crate::resume).
    fn tell_epoch(&mut self, room: RoomId, sync: &proto::sync::Sync, now: Instant) {
        let mut keys = Vec::new();
        self.resumes.on_epoch(room, &sync.epoch, &mut keys);
        let packet = proto::sync::sync_packet(sync);
        for key in keys {
            let Some(c) = self.conns.get(key as usize) else {
                continue;
            };
            let id = ConnId { key, gen: c.gen };
            let bytes = c.session.frame(&packet);
            self.reply(id, bytes, now);
            self.m().epoch_syncs.inc();
        }
    }

    /// Queues what an ended resume sends: replayed batches, uncovered held ones, the sync,
    /// the newer held ones (crate::resume::Finish).
    fn finish_resume(&mut self, mut f: crate::resume::Finish, now: Instant) {
        let Some(c) = self.get(f.id) else { return };
        let replayed: Vec<Bytes> = f
            .replayed
            .iter()
            .map(|p| Bytes::from(c.session.frame(p)))
            .collect();
        let mut sent = 0u64;
        for b in replayed {
            // Past the reply bound a replayed batch is missed, and the sync says so.
            if self.enqueue(f.id, b, Priority::Low, false, now) {
                sent += 1;
            } else {
                f.lost_one();
            }
        }
        for b in std::mem::take(&mut f.before) {
            self.enqueue(f.id, b, Priority::Low, true, now);
        }
        let Some(c) = self.get(f.id) else { return };
        let sync = c.session.frame(&proto::sync::sync_packet(&f.sync));
        self.reply(f.id, sync, now);
        for b in std::mem::take(&mut f.after) {
            self.enqueue(f.id, b, Priority::Low, true, now);
        }
        let m = self.m();
        m.resumes[f.outcome.index()].inc();
        m.resume_replayed.add(sent);
        m.resume_us
            .observe(f.took.as_micros().min(u128::from(u64::MAX)) as u64);
    }

    /// Sends this shard's viewer counts to the link shard.
    fn report_counts(&mut self) {
        let counts: Vec<(RoomId, u32)> = self.index.rooms().map(|(r, n)| (r, n as u32)).collect();
        let from = self.id;
        self.post(0, Msg::Counts { from, counts });
    }
}

/// A heartbeat timeout shorter than the auth deadline (tests and simulations) would be late
/// if the auth timer became the heartbeat timer: then each gets its own.
fn heartbeat_before_auth(cfg: &crate::config::Config) -> bool {
    cfg.heartbeat_timeout_ms < cfg.auth_ms_max
}

enum Fire {
    Close(CloseReason),
    Force,
    Rearm(Millis),
    /// The timer becomes the connection's next one (one wheel entry per connection).
    Then(TimerKind, Millis),
    Nothing,
}

/// Replaces a count map with the entries for rooms that have viewers on this shard.
fn keep_counts(index: &RoomIndex, map: &mut HashMap<RoomId, u32>, counts: &[(RoomId, u32)]) {
    map.clear();
    for (r, n) in counts {
        if index.has_room(*r) {
            map.insert(*r, *n);
        }
    }
}

/// What a refused client is told before the close.
fn refusal_bytes(transport: Transport, reason: CloseReason) -> Vec<u8> {
    let retry = match reason {
        CloseReason::Capacity | CloseReason::Overloaded | CloseReason::AddrLimit => REFUSE_RETRY_S,
        // Draining: the edge is going away; come back to another one at once.
        _ => 0,
    };
    match transport {
        Transport::Tcp | Transport::Udp => {
            let body = format!("{{\"code\":{AUTH_RETRY_LATER},\"retry_after_s\":{retry}}}");
            proto::packet::encode_vec(
                proto::packet::ver::HEARTBEAT,
                proto::packet::op::AUTH_REPLY,
                1,
                body.as_bytes(),
            )
        }
        Transport::Ws => {
            let body = "503 Service Unavailable\n";
            format!(
                "HTTP/1.1 503 Service Unavailable\r\nRetry-After: {retry}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        }
    }
}

/// Size of one connection's slab entry (for the memory report).
pub fn conn_entry_bytes() -> usize {
    std::mem::size_of::<Conn>()
}

#[cfg(test)]
mod harness;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;
