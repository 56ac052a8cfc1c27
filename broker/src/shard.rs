//! One broker shard: drains its ingest queues (High before Low) into the batcher, encodes each
//! flushed batch once per encoding its edges asked for, and queues it on those edges' links.
//! It also serves its share of ingest and HTTP connections and owns the links edges open to it.
//!
//! Invariants: all state lives in one `State` behind an `Rc<RefCell<_>>` on this thread, and no
//! borrow of it is held across an `.await`. A batch nobody watches is neither compressed nor
//! sent (its seq still advances, so edges that join later see consecutive seqs from then on).

use crate::batcher::{Batcher, Flush, Limits};
use crate::compress::{outer_seq, Compressor, Settings};
use crate::history::History;
use crate::link::{self, Conn, LinkQueue, Out};
use crate::metrics::Cut;
use crate::route::{LinkId, Route, Target};
use crate::stop::{yield_now, Stop};
use crate::{Inbox, NewLink, Shared};
use bytes::Bytes;
use monoio::io::Splitable;
use proto::id::{Encoding, MsgId, Priority, RoomId, Scope};
use proto::link::{Batch, LinkFrame};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Messages taken from the queues per loop turn before letting link writers run.
const DRAIN_MESSAGES_MAX: usize = 4096;
/// Driver parks at shutdown so queued socket closes reach the kernel (see `run`).
const SHUTDOWN_PARKS: usize = 4;
/// How late past its planned wake shard 0 may run before the delay is taken for a stall of the
/// broker itself (see [`crate::presence::Presence::defer_leases`]).
const LATE_SLACK: Duration = Duration::from_millis(50);
const SHUTDOWN_PARK_MS: u64 = 5;
/// Read buffer step for link readers.
const LINK_READ_BYTES: usize = 8 * 1024;

pub(crate) struct State {
    index: u16,
    shared: Arc<Shared>,
    batcher: Batcher,
    route: Route,
    /// Resume history of this shard's rooms (low-priority room batches).
    history: History,
    compressor: Compressor,
    links: HashMap<LinkId, Rc<Conn>>,
    next_link: LinkId,
    flushes: Vec<Flush>,
    targets: Vec<Target>,
    cuts: Vec<LinkId>,
    next_counts: Instant,
    next_ping: Instant,
    ping_nonce: u64,
    /// After a start with `startup_hold_ms`, the queues are not drained until this instant, or
    /// until [`STARTUP_SETTLE_MS`] after the first edge link, so pushes accepted before the
    /// edges re-linked and re-sent interest are routed, not lost as unrouted.
    hold_until: Option<Instant>,
    /// When the first edge link came up on this shard.
    first_link_at: Option<Instant>,
    /// Cluster mode: ack tokens of consumed messages not yet confirmed by the edges.
    acks: crate::cluster::Acks,
    /// Msg ids of the batch being handed on (cluster mode only).
    handed: Vec<proto::id::MsgId>,
    /// The confirming links the last delivered batch was queued on (crate::confirm).
    handoff: crate::confirm::Handoff,
    /// Scopes of links that ended lately (cluster mode; crate::confirm::Orphans).
    orphans: Option<crate::confirm::Orphans>,
    /// `ONLINE_RANK_COUNT` pushes (`None`: off).
    announcer: Option<crate::online::Announcer>,
    /// Shard 0 with `route_by_presence`: user/device batches held for late enters.
    catchup: Option<crate::catchup::Catchup>,
}

/// After the first edge link of a held shard, how long it waits for that edge's interest
/// (sent right after the handshake) before it routes what it holds.
pub const STARTUP_SETTLE_MS: u64 = 300;

impl State {
    fn new(index: u16, shared: Arc<Shared>, now: Instant) -> State {
        let c = &shared.config;
        State {
            index,
            batcher: Batcher::new(Limits {
                window: Duration::from_millis(c.batch_window_ms),
                bytes_max: c.batch_bytes_max,
                messages_max: c.batch_messages_max,
            }),
            route: Route::new(),
            history: History::new(
                crate::history::Limits {
                    batches_max: c.history_batches_max,
                    ms_max: c.history_ms_max,
                    bytes_max: c.history_bytes_max,
                },
                shared.boot,
            ),
            compressor: Compressor::new(Settings {
                quality: c.brotli_quality,
                quality_small: c.brotli_quality_small,
                small_bytes_max: c.brotli_small_bytes_max,
                lgwin_max: c.brotli_lgwin,
            }),
            links: HashMap::new(),
            next_link: 1,
            flushes: Vec::new(),
            targets: Vec::new(),
            cuts: Vec::new(),
            next_counts: now + Duration::from_millis(c.counts_interval_ms),
            next_ping: now + Duration::from_millis(c.link_ping_ms),
            ping_nonce: 0,
            hold_until: (c.startup_hold_ms > 0)
                .then(|| now + Duration::from_millis(c.startup_hold_ms)),
            first_link_at: None,
            acks: Default::default(),
            handed: Vec::new(),
            handoff: Default::default(),
            orphans: shared.cluster.is_some().then(|| {
                crate::confirm::Orphans::new(std::time::Duration::from_millis(c.link_dead_ms))
            }),
            announcer: crate::online::Announcer::new(
                c.count_push_ms,
                if c.count_push_all_rooms {
                    crate::online::Rooms::All
                } else {
                    crate::online::Rooms::Listed(
                        c.count_push_rooms.iter().copied().map(RoomId).collect(),
                    )
                },
                now,
            ),
            catchup: (index == 0 && c.route_by_presence && c.presence_catchup_ms > 0).then(|| {
                crate::catchup::Catchup::new(
                    Duration::from_millis(c.presence_catchup_ms),
                    c.presence_catchup_bytes_max,
                )
            }),
            shared,
        }
    }

    fn metrics(&self) -> &crate::metrics::ShardMetrics {
        &self.shared.shard_metrics[self.index as usize]
    }

    /// Ends a link (idempotent): forgets its interest, stops its tasks.
    fn cut(&mut self, id: LinkId, reason: Cut) {
        let Some(conn) = self.links.remove(&id) else {
            return;
        };
        if let Some(orphans) = self.orphans.as_mut() {
            // Its rooms stay "watched, re-linking" for a while (crate::confirm::Orphans).
            orphans.link_ended(self.route.watched_through(id), Instant::now());
        }
        self.route.link_down(id);
        if let Some(c) = self.shared.cluster.as_ref() {
            // What it had not confirmed goes back to JetStream (crate::confirm).
            self.acks.link_down(c, id);
        }
        if self.index == 0 && conn.priority == Priority::Low {
            // The presence link: none of the node's connections is reachable through us now.
            self.shared.courier.edge_down(&conn.node_id);
        }
        conn.stop.fire();
        let m = &self.shared.shard_metrics[self.index as usize];
        m.cut(reason);
        match conn.priority {
            Priority::Low => m.links_low.fetch_sub(1, Relaxed),
            Priority::High => m.links_high.fetch_sub(1, Relaxed),
        };
        tracing::debug!(shard = self.index, link = id, node = %conn.node_id, ?reason, "link cut");
    }

    fn send(&mut self, id: LinkId, out: Out) {
        if let Some(conn) = self.links.get(&id) {
            if conn.send(out).is_err() {
                self.cut(id, Cut::Slow);
            }
        }
    }

    /// When the startup hold ends (`None`: not holding).
    fn hold_end(&self) -> Option<Instant> {
        let until = self.hold_until?;
        Some(match self.first_link_at {
            Some(t) => until.min(t + Duration::from_millis(STARTUP_SETTLE_MS)),
            None => until,
        })
    }

    /// True while the startup hold lasts; ends it (and says so) once it is over.
    fn holding(&mut self, now: Instant) -> bool {
        match self.hold_end() {
            Some(end) if now < end => true,
            Some(_) => {
                self.hold_until = None;
                tracing::info!(
                    shard = self.index,
                    links = self.links.len(),
                    "startup hold over: routing queued pushes"
                );
                false
            }
            None => false,
        }
    }

    /// Takes queued messages (High first), runs the batcher, delivers what flushed.
    /// Returns true when the budget ran out with messages still queued.
    fn drain(&mut self, inbox: &Inbox, now: Instant) -> bool {
        let mut flushes = std::mem::take(&mut self.flushes);
        let cluster = self.shared.clone();
        let cluster = cluster.cluster.as_ref();
        if let Some(c) = cluster {
            c.take_tokens(usize::from(self.index), &mut self.acks, &mut self.history);
        }
        let mut budget = DRAIN_MESSAGES_MAX;
        while budget > 0 {
            let Ok(m) = inbox.high_rx.try_recv() else {
                break;
            };
            self.batcher.push(m, now, &mut flushes);
            budget -= 1;
        }
        while budget > 0 {
            let Ok(m) = inbox.low_rx.try_recv() else {
                break;
            };
            self.batcher.push(m, now, &mut flushes);
            budget -= 1;
        }
        self.batcher.poll(now, &mut flushes);
        for f in flushes.drain(..) {
            self.hand_on(f, now);
        }
        self.flushes = flushes;
        self.metrics()
            .pending_messages
            .store(self.batcher.pending_messages() as u64, Relaxed);
        budget == 0
    }

    /// Delivers a flushed batch; in cluster mode its messages are then acked to JetStream once
    /// the links it went to confirm it (crate::cluster, Acks): the one place a consumed
    /// low-reach message is acked.
    fn hand_on(&mut self, f: Flush, now: Instant) {
        let Some(shared) = self.shared.cluster.is_some().then(|| self.shared.clone()) else {
            self.deliver(f, now);
            return;
        };
        self.handed.clear();
        self.handed.extend_from_slice(&f.msg_ids);
        let scope = f.scope.clone();
        self.deliver(f, now);
        if self.handoff.links.is_empty() && !self.handed.is_empty() {
            if let Some(orphans) = self.orphans.as_mut() {
                if orphans.holds(&scope, now) {
                    // Nobody watches it now, but an edge that did is re-linking: give it back.
                    self.handoff.lost = true;
                }
            }
        }
        if let Some(c) = shared.cluster.as_ref() {
            self.acks.handed(c, &self.handed, &self.handoff, now);
        }
    }

    /// Encodes one batch for the encodings its edges want and queues it on their links.
    fn deliver(&mut self, flush: Flush, now: Instant) {
        self.handoff.clear();
        let m = &self.shared.shard_metrics[self.index as usize];
        m.batches.fetch_add(1, Relaxed);
        m.messages_batched
            .fetch_add(flush.msg_ids.len() as u64, Relaxed);
        m.flushed(&flush);
        self.targets.clear();
        self.route
            .targets(&flush.scope, flush.priority, &mut self.targets);
        // With route_by_presence: the nodes that get this batch, when narrowing kept it from
        // some (the catch-up then holds it for their late enters).
        let mut narrowed: Option<Vec<String>> = None;
        if self.shared.config.route_by_presence
            && matches!(flush.scope, Scope::User(_) | Scope::Device(_))
        {
            let links = &self.links;
            let node_of = |t: &Target| {
                links
                    .get(&t.link)
                    .map(|c| c.node_id.clone())
                    .unwrap_or_default()
            };
            let before = self.targets.len();
            self.shared
                .roster
                .narrow(&flush.scope, &mut self.targets, node_of);
            if self.targets.len() < before {
                narrowed = Some(self.targets.iter().map(node_of).collect());
            }
        }
        let mut encodings = self.targets.iter().fold(0u8, |acc, t| acc | t.encodings);
        if self.targets.is_empty() {
            m.batches_unrouted.fetch_add(1, Relaxed);
        }
        // Low-priority room batches are kept for resume; a room nobody watches is still
        // encoded while it holds history (a viewer that just left may come back).
        let resumable = match (&flush.scope, flush.priority) {
            (Scope::Room(r), Priority::Low) => Some(*r),
            _ => None,
        };
        if let Some(room) = resumable {
            encodings |= self.history.encodings_held(room);
        }
        if encodings == 0 {
            if let Some(room) = resumable {
                self.history
                    .skip(room, outer_seq(flush.priority, flush.seq), now);
            }
            self.hold_for_late_enters(flush, narrowed, now);
            return;
        }
        let encoded = self.compressor.encode(&flush, encodings);
        if let Some(us) = self.compressor.last_brotli_us {
            m.brotli_encode_us.observe(us);
        }
        if let Some(room) = resumable {
            self.history.record(
                room,
                outer_seq(flush.priority, flush.seq),
                encoded.clone(),
                now,
            );
            self.metrics()
                .history_bytes
                .store(self.history.bytes() as u64, Relaxed);
        }
        let targets = std::mem::take(&mut self.targets);
        self.write(&flush, &encoded, &targets);
        self.targets = targets;
        self.hold_for_late_enters(flush, narrowed, now);
    }

    /// Queues one encoded batch on `targets`' links (each gets the encodings it asked for);
    /// a link whose queue is full is cut as slow.
    fn write(&mut self, flush: &Flush, encoded: &crate::compress::Encoded, targets: &[Target]) {
        let m = &self.shared.shard_metrics[self.index as usize];
        let mut frames: [Option<(Bytes, Bytes)>; 3] = [None, None, None];
        let mut header = Vec::with_capacity(64);
        // Wall-clock, not `now`: the edge subtracts it from its own wall clock.
        let flushed_at_us = crate::unix_us();
        for (slot, e) in [Encoding::Plain, Encoding::Zlib, Encoding::Brotli]
            .into_iter()
            .enumerate()
        {
            let Some(packet) = encoded.get(e) else {
                continue;
            };
            m.encoded(e, encoded.inner_bytes, packet.len());
            let batch = Batch {
                scope: flush.scope.clone(),
                priority: flush.priority,
                seq: flush.seq,
                first_msg_id: flush.msg_ids.first().copied().unwrap_or_default(),
                msg_count: flush.msg_ids.len() as u32,
                encoding: e,
                flushed_at_us,
                packet: packet.clone(),
            };
            header.clear();
            proto::link::encode_batch_header(&batch, &mut header);
            frames[slot] = Some((Bytes::copy_from_slice(&header), packet.clone()));
        }
        for t in targets {
            let Some(conn) = self.links.get(&t.link) else {
                continue;
            };
            for (slot, e) in [Encoding::Plain, Encoding::Zlib, Encoding::Brotli]
                .into_iter()
                .enumerate()
            {
                if t.encodings & e.bit() == 0 {
                    continue;
                }
                let Some((header, packet)) = &frames[slot] else {
                    continue;
                };
                let len = header.len() + packet.len();
                if conn
                    .send(Out::Batch {
                        header: header.clone(),
                        packet: packet.clone(),
                    })
                    .is_err()
                {
                    self.cuts.push(t.link);
                    self.handoff.lost = true;
                    break;
                }
                m.link_batches_sent.fetch_add(1, Relaxed);
                m.link_bytes_sent.fetch_add(len as u64, Relaxed);
            }
            if conn.confirms && self.cuts.last() != Some(&t.link) {
                self.handoff.links.push((t.link, conn.batches.get()));
            }
        }
        let cuts = std::mem::take(&mut self.cuts);
        for id in &cuts {
            self.cut(*id, Cut::Slow);
        }
        self.cuts = cuts;
    }

    /// Hands a user/device batch that narrowing kept from some edge to the catch-up.
    fn hold_for_late_enters(&mut self, flush: Flush, narrowed: Option<Vec<String>>, now: Instant) {
        let (Some(c), Some(sent)) = (self.catchup.as_mut(), narrowed) else {
            return;
        };
        c.keep(flush, sent, now);
        self.shared.roster.catchup_stats(c.stats(), c.bytes());
    }

    /// Node `node` reported `batch` (shard 0): sends it the held user/device batches of the
    /// users and devices it entered that it does not have yet, before any later batch of
    /// theirs (this thread flushes them all).
    fn late_enters(&mut self, node: &str, scopes: &[Scope], now: Instant) {
        let Some(c) = self.catchup.as_mut() else {
            return;
        };
        let mut due = Vec::new();
        c.take(node, scopes, now, &mut due);
        self.shared.roster.catchup_stats(c.stats(), c.bytes());
        for flush in due {
            let mut targets = Vec::new();
            self.route
                .targets(&flush.scope, flush.priority, &mut targets);
            targets.retain(|t| self.links.get(&t.link).is_some_and(|c| c.node_id == node));
            let encodings = targets.iter().fold(0u8, |acc, t| acc | t.encodings);
            if encodings == 0 {
                continue;
            }
            let encoded = self.compressor.encode(&flush, encodings);
            self.write(&flush, &encoded, &targets);
        }
    }

    /// Handles one frame from an edge. `Err` cuts the link.
    fn on_frame(&mut self, id: LinkId, frame: LinkFrame) -> Result<(), Cut> {
        self.metrics().link_frames_in.fetch_add(1, Relaxed);
        match frame {
            LinkFrame::Sub {
                interest,
                encodings,
            } => self.route.sub(id, &interest, encodings),
            LinkFrame::Unsub { interest } => self.route.unsub(id, &interest),
            LinkFrame::Counts(counts) => self.route.counts(id, &counts),
            LinkFrame::Ping { nonce } => {
                if self.renew_presence(id) == crate::roster::Renewal::Lost {
                    return Err(crate::roster::LEASE_LOST_CUT);
                }
                self.send(
                    id,
                    Out::Frame(link::frame_bytes(&LinkFrame::Pong { nonce })),
                )
            }
            LinkFrame::Pong { .. } => {}
            LinkFrame::Presence(batch) => {
                if let Some(conn) = self.links.get(&id) {
                    let node = conn.node_id.clone();
                    if self.index == 0 {
                        self.shared.courier.on_presence(&node, &batch);
                    }
                    let entered = match self.catchup {
                        Some(_) => crate::catchup::entered(&batch),
                        None => Vec::new(),
                    };
                    let now = Instant::now();
                    self.shared.roster.on_report(&node, batch, now);
                    if !entered.is_empty() {
                        self.late_enters(&node, &entered, now);
                    }
                }
            }
            // High-reach ACKs go to shard 0 (the owner of user and device scopes); one on
            // another shard is ignored like an unknown msg id.
            LinkFrame::Ack {
                uid,
                device,
                msg_id,
            } => {
                if self.index == 0 {
                    self.shared.courier.ack(msg_id, uid, &device);
                    self.reach_ended();
                } else {
                    self.shared
                        .courier
                        .metrics
                        .ack_unknown
                        .fetch_add(1, Relaxed);
                }
            }
            LinkFrame::Replay(req) => self.replay(id, &req),
            LinkFrame::Confirm { through } => {
                let Some(conn) = self.links.get(&id) else {
                    return Ok(());
                };
                conn.confirm(through).map_err(|_| Cut::Protocol)?;
                if let Some(c) = self.shared.cluster.as_ref() {
                    self.acks.confirmed(c, id, through);
                }
            }
            LinkFrame::Hello(_)
            | LinkFrame::Batch(_)
            | LinkFrame::Replayed(_)
            | LinkFrame::Challenge { .. }
            | LinkFrame::Proof { .. } => return Err(Cut::Protocol),
        }
        Ok(())
    }

    /// High reach (shard 0): runs the courier's timers and writes its sends, each a
    /// one-message user/device batch in every encoding, on the High link of each edge that
    /// holds the target. The link `seq` is the try number (crate::courier).
    fn reach(&mut self, now: Instant) {
        let mut sends = Vec::new();
        self.shared.courier.poll(now, &mut sends);
        self.reach_ended();
        let all = Encoding::Plain.bit() | Encoding::Zlib.bit() | Encoding::Brotli.bit();
        for s in sends {
            let flush = crate::batcher::Flush {
                scope: s.scope.clone(),
                priority: Priority::High,
                seq: 0,
                msg_ids: vec![s.msg],
                bodies: vec![s.body.to_vec()],
                oldest: None,
            };
            let encoded = self.compressor.encode(&flush, all);
            let mut frames = Vec::with_capacity(3);
            for e in [Encoding::Plain, Encoding::Zlib, Encoding::Brotli] {
                let Some(packet) = encoded.get(e) else {
                    continue;
                };
                let batch = Batch {
                    scope: s.scope.clone(),
                    priority: Priority::High,
                    seq: u64::from(s.attempt),
                    first_msg_id: s.msg,
                    msg_count: 1,
                    encoding: e,
                    flushed_at_us: crate::unix_us(),
                    packet: packet.clone(),
                };
                let mut header = Vec::with_capacity(64);
                proto::link::encode_batch_header(&batch, &mut header);
                frames.push((Bytes::from(header), packet.clone()));
            }
            for node in &s.nodes {
                let Some(link) = self.route.node_link(node, Priority::High) else {
                    continue;
                };
                for (header, packet) in &frames {
                    self.send(
                        link,
                        Out::Batch {
                            header: header.clone(),
                            packet: packet.clone(),
                        },
                    );
                }
            }
        }
    }

    /// High reach (shard 0): the messages the courier ended (ACK, expiry, exhaustion); in
    /// cluster mode this is where they are acked to JetStream (crate::cluster::Cluster::reach_ended).
    fn reach_ended(&self) {
        let mut ended = Vec::new();
        self.shared.courier.take_ended(&mut ended);
        if let Some(c) = &self.shared.cluster {
            c.reach_ended(&ended);
        }
    }

    /// A PING renews the presence lease of the node on its presence link (shard 0, Low).
    fn renew_presence(&self, id: LinkId) -> crate::roster::Renewal {
        match self.links.get(&id) {
            Some(conn) if self.index == 0 && conn.priority == Priority::Low => {
                self.shared.roster.on_ping(&conn.node_id, Instant::now())
            }
            _ => crate::roster::Renewal::Ok,
        }
    }

    /// Answers an edge's REPLAY on the link it came on. Same turn as the batch routing, same
    /// link as the room's live batches: the answer sits between the batches it covers and
    /// the ones after it (proto::link::replay).
    fn replay(&mut self, id: LinkId, req: &proto::link::replay::Request) {
        let frame_max = self.shared.config.link_frame_bytes_max as usize;
        let (answer, outcome) = self.history.answer(req, frame_max, Instant::now());
        self.metrics().replay(outcome, answer.batches.len() as u64);
        self.send(
            id,
            Out::Frame(link::frame_bytes(&LinkFrame::Replayed(answer))),
        );
    }

    /// Periodic work: fleet counts to edges, pings, dead links, gauges.
    fn tick(&mut self, now: Instant) {
        let c = &self.shared.config;
        let (counts_every, ping_every, dead_after) = (
            Duration::from_millis(c.counts_interval_ms),
            Duration::from_millis(c.link_ping_ms),
            Duration::from_millis(c.link_dead_ms),
        );
        if now >= self.next_counts {
            self.next_counts = now + counts_every;
            if let Some(top) = self.shared.top_rooms.get(self.index as usize) {
                let rooms = self.route.top(crate::TOP_ROOMS_MAX);
                *top.lock().unwrap_or_else(|p| p.into_inner()) = rooms;
            }
            let mut out = Vec::new();
            self.route.fleet_counts(&mut out);
            for (id, counts) in out {
                self.send(
                    id,
                    Out::Frame(link::frame_bytes(&LinkFrame::Counts(counts))),
                );
            }
        }
        if now >= self.next_ping {
            self.next_ping = now + ping_every;
            self.ping_nonce += 1;
            let ping = link::frame_bytes(&LinkFrame::Ping {
                nonce: self.ping_nonce,
            });
            let ids: Vec<LinkId> = self.links.keys().copied().collect();
            for id in ids {
                // Silent, or (cluster mode) not confirming what it was sent: both bound how
                // long a consumed message waits on one edge (crate::confirm).
                let unconfirmed = self
                    .acks
                    .oldest_unconfirmed(id)
                    .is_some_and(|t| now.saturating_duration_since(t) > dead_after);
                let silent = self.links.get(&id).map(|c| {
                    unconfirmed || now.saturating_duration_since(c.last_rx.get()) > dead_after
                });
                match silent {
                    Some(true) => self.cut(id, Cut::Dead),
                    Some(false) => self.send(id, Out::Frame(ping.clone())),
                    None => {}
                }
            }
        }
        if self.index == 0 {
            self.shared.roster.poll(now);
            self.reach(now);
        }
        self.announce(now);
        let m = &self.shared.shard_metrics[self.index as usize];
        m.edges.store(self.route.edges() as u64, Relaxed);
        m.rooms_watched
            .store(self.route.rooms_watched() as u64, Relaxed);
    }

    /// Pushes the rooms' changed online counts into their batches (see crate::online).
    fn announce(&mut self, now: Instant) {
        let Some(a) = self.announcer.as_mut() else {
            return;
        };
        let due = a.poll(now, self.route.totals());
        if due.is_empty() {
            return;
        }
        let mut flushes = Vec::new();
        self.shared.roster.count_pushes(due.len());
        for (room, count) in due {
            let msg = crate::batcher::Message {
                scope: Scope::Room(room),
                priority: Priority::Low,
                msg_id: MsgId(self.shared.next_msg_id.fetch_add(1, Relaxed)),
                body: crate::online::body(count),
                accepted: now,
            };
            self.batcher.push(msg, now, &mut flushes);
        }
        for f in flushes {
            self.hand_on(f, now);
        }
    }

    fn next_wake(&mut self) -> Instant {
        let mut t = self.next_counts.min(self.next_ping);
        if let Some(a) = &self.announcer {
            t = t.min(a.next_deadline());
        }
        if self.index == 0 {
            if let Some(d) = self.shared.roster.next_deadline() {
                t = t.min(d);
            }
            if let Some(d) = self.shared.courier.next_deadline() {
                t = t.min(d);
            }
        }
        match self.batcher.next_deadline() {
            Some(d) => d.min(t),
            None => t,
        }
    }
}

/// Runs shard `index` until the broker stops.
pub(crate) async fn run(
    index: usize,
    shared: Arc<Shared>,
    listeners: Option<(std::net::TcpListener, std::net::TcpListener)>,
) {
    let stop = Stop::new();
    if let Some((ingest_listener, http_listener)) = listeners {
        monoio::spawn(crate::ingest::serve(
            ingest_listener,
            shared.clone(),
            stop.clone(),
        ));
        monoio::spawn(crate::http::serve(
            http_listener,
            shared.clone(),
            stop.clone(),
        ));
    }
    let state = Rc::new(RefCell::new(State::new(
        index as u16,
        shared.clone(),
        Instant::now(),
    )));
    let inbox = &shared.inboxes[index];
    loop {
        if shared.stop.load(Relaxed) {
            break;
        }
        while let Ok(new) = inbox.links_rx.try_recv() {
            add_link(&state, new);
        }
        let now = Instant::now();
        let held = state.borrow_mut().holding(now);
        let more = !held && state.borrow_mut().drain(inbox, now);
        state.borrow_mut().tick(Instant::now());
        if more {
            yield_now().await;
            continue;
        }
        let mut wake = state.borrow_mut().next_wake();
        if let Some(end) = state.borrow().hold_end() {
            wake = wake.min(end);
        }
        let wait = wake.saturating_duration_since(Instant::now());
        if wait.is_zero() {
            yield_now().await;
            continue;
        }
        monoio::select! {
            _ = inbox.notify.notified() => {},
            _ = monoio::time::sleep(wait) => {},
        }
        // Woken well past the planned wake: the process was stopped or starved, and the
        // links' renewals have not been read yet; the stall does not count against leases.
        let late = Instant::now().saturating_duration_since(wake);
        if index == 0 && late > LATE_SLACK {
            shared.roster.defer_leases(late);
        }
    }
    {
        let mut st = state.borrow_mut();
        let ids: Vec<LinkId> = st.links.keys().copied().collect();
        for id in ids {
            st.cut(id, Cut::Shutdown);
        }
    }
    stop.fire();
    // Let the tasks see the stop and drop their sockets, then park the driver a few times:
    // under io_uring a dropped socket is closed by a queued op, which only reaches the kernel
    // when the ring is submitted. Ending the runtime first would leak the fds (and a leaked
    // SO_REUSEPORT listener would keep taking connections nobody accepts).
    for _ in 0..8 {
        yield_now().await;
    }
    for _ in 0..SHUTDOWN_PARKS {
        monoio::time::sleep(Duration::from_millis(SHUTDOWN_PARK_MS)).await;
    }
}

fn add_link(state: &Rc<RefCell<State>>, new: NewLink) {
    let NewLink {
        stream,
        hello,
        peer,
    } = new;
    let stream = match monoio::net::TcpStream::from_std(stream) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot adopt edge link");
            return;
        }
    };
    let mut st = state.borrow_mut();
    if st.first_link_at.is_none() {
        st.first_link_at = Some(Instant::now());
    }
    let id = st.next_link;
    st.next_link += 1;
    let conn = Rc::new(Conn {
        id,
        node_id: hello.node_id.clone(),
        priority: hello.priority,
        queue: RefCell::new(LinkQueue::new(st.shared.config.link_queue_bytes_max)),
        wake: net::wake::Notify::new(),
        stop: Stop::new(),
        last_rx: Cell::new(Instant::now()),
        confirms: link::confirms(&st.shared, &hello),
        batches: Cell::new(0),
        confirmed: Cell::new(0),
    });
    let up = st.route.link_up(&hello.node_id, hello.priority, id);
    st.links.insert(id, conn.clone());
    {
        let m = st.metrics();
        match hello.priority {
            Priority::Low => m.links_low.fetch_add(1, Relaxed),
            Priority::High => m.links_high.fetch_add(1, Relaxed),
        };
    }
    if let Some(old) = up.replaced {
        // Counted as barrage_broker_link_cuts_total{reason="replaced"}. Normal after an edge restart;
        // repeated, it means two processes claim one node id (or a stolen key).
        tracing::warn!(node = %hello.node_id, %peer, priority = ?hello.priority, replaced = old, "edge link replaced by a new link of the same node id");
        st.cut(old, Cut::Replaced);
    }
    let reply = link::reply_hello(&st.shared, st.index, &hello);
    // The queue is empty: the Hello always fits.
    let _ = conn.send(Out::Frame(link::frame_bytes(&reply)));
    let frame_max = st.shared.config.link_frame_bytes_max;
    drop(st);
    tracing::debug!(link = id, node = %hello.node_id, priority = ?hello.priority, "link up");
    let (rd, wr) = stream.into_split();
    {
        let (state, conn) = (state.clone(), conn.clone());
        monoio::spawn(async move {
            let reason = link::writer(conn.clone(), wr).await;
            state.borrow_mut().cut(conn.id, reason);
        });
    }
    let state = state.clone();
    monoio::spawn(async move {
        if let Some(reason) = reader(&state, &conn, rd, frame_max).await {
            state.borrow_mut().cut(conn.id, reason);
        }
    });
}

/// Reads frames from an edge until the link ends; `None` when it was cut elsewhere (the read
/// in flight is then cancelled by `net::framed`, not dropped).
async fn reader(
    state: &Rc<RefCell<State>>,
    conn: &Rc<Conn>,
    rd: monoio::net::tcp::TcpOwnedReadHalf,
    frame_max: u32,
) -> Option<Cut> {
    use net::framed::{link_decoder, FramedRead, ReadError};
    let mut frames = FramedRead::new(rd, link_decoder(frame_max), LINK_READ_BYTES);
    loop {
        let frame = match frames.next(conn.stop.wait()).await {
            Ok(f) => f,
            Err(ReadError::Stopped) => return None,
            Err(ReadError::Closed | ReadError::Io(_)) => return Some(Cut::Closed),
            Err(ReadError::Frame(_)) => return Some(Cut::Protocol),
        };
        conn.last_rx.set(Instant::now());
        if let Err(c) = state.borrow_mut().on_frame(conn.id, frame) {
            return Some(c);
        }
        if conn.stop.is_fired() {
            return None;
        }
    }
}
