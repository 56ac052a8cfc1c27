//! Cluster mode (issue 12, DESIGN §10): the broker on the NATS JetStream backbone.
//!
//! With `backbone = "nats://..."` set, an accepted push is not queued on this broker's shard:
//! it is published to the backbone stream (partition by scope, [`backbone::partition_of`]) and
//! answered only after JetStream's publish ack. Whichever broker holds the partition's lease
//! consumes it: the [`feeder`] thread decodes each delivery and puts it on the owning shard's
//! queue exactly as an embedded-mode push is queued, so aggregation, compression and routing are
//! the same code in both modes. The shard acknowledges a message to JetStream once the edge
//! links the batch that holds it went to have confirmed receiving it ([`Acks`]).
//!
//! # Ids and keys
//! - `msg_id = id_base + stream sequence` ([`backbone::Backbone::id_base`]): unique across the
//!   cluster without coordination, and a retried publish that JetStream reports a duplicate
//!   gets the first one's sequence, so the same msg id.
//! - `Nats-Msg-Id`: `k<key index>.<idempotency key>` for a keyed push (so a caller retrying on
//!   another broker is deduplicated by JetStream within `cluster.dedup_window_ms`), otherwise
//!   `<node id>.<process start µs>.<counter>` (unique per process life, so a restarted broker
//!   never collides with its previous life's keys inside the window).
//! - The payload is the push re-encoded as a `proto::ingest` Push frame (req id 0), so scope,
//!   priority, reach and ttl travel with the body in a format that is already specified.
//!
//! # Acks
//! Every delivery's [`AckToken`] travels to the shard that owns the scope before the message
//! itself (its own channel, drained first), and waits in that shard's [`Acks`] until the
//! message's batch was handed to the links ([`Acks::handed`]); then it waits for the edges:
//! each link it went to confirms it (`LinkFrame::Confirm`, cumulative per link seq) and once
//! all have, it is acked ([`crate::confirm`]). A batch nobody watches is acked at once; one
//! whose link ended (or refused it as slow) before confirming is NAK'd with a delay of
//! `cluster.ack_wait_ms` (counted, `barrage_broker_backbone_unconfirmed_total`), so JetStream
//! delivers it again once the edge has re-linked. That is the low-reach rule: a broker killed
//! with SIGKILL at any point before the edges have the batch has not acked it.
//!
//! # High reach
//! A consumed `reach=high` message (issue 9) does not go to a shard queue: the feeder hands it
//! to the [`crate::courier`] ([`Cluster::track_high`]), which tracks it exactly as an embedded
//! push (first send and resends every `reach_retry_ms` to every edge holding the user or
//! device, until an ACK, the ttl or the last try), and its token waits in [`Cluster`]'s reach
//! table. When the courier ends the message, shard 0 calls [`Cluster::reach_ended`], which
//! acks it to JetStream. So a broker killed before the client's ACK leaves it unacked and the
//! partition's next owner tracks and sends it again (the client may see it twice: same msg id,
//! dropped by msg id). The msg id is `id_base + stream sequence`, the same on every broker, so
//! the ACK of either copy ends it. The ttl counts from the message's JetStream publish time
//! (`backbone::Delivery::published_us`, [`ttl_left_ms`]), the same on every owner, so a
//! takeover does not restart it; one consumed past its ttl is acked and counted
//! (`barrage_broker_backbone_reach_expired_total`), not sent. A redelivery of a
//! message this broker still tracks (its in-progress acks stopped at `progress_ms_max`) only
//! replaces its token; one it already ended is acked at once.
//!
//! While a message waits (backbone sink, feeder, shard queue, aggregation window, or a
//! high-reach message awaiting a client ACK), the backbone thread sends JetStream in-progress acks for it
//! every `cluster.ack_wait_ms / 4` (see `backbone::thread`), so a backlog longer than
//! `ack_wait_ms` does not make JetStream redeliver it; after `cluster.progress_ms_max` it is
//! let go and counted (`barrage_broker_backbone_progress_expired_total`). That is the choice
//! the issue asks for (in-progress acks rather than a per-partition checkpoint): JetStream keeps
//! exact per-message ack state, so a takeover redelivers only what was not finished.
//!
//! # Regions
//! With `cluster.regions` set (issue 13, [`backbone::region`]), this region's pushes go to its
//! origin stream and the partitions are read from a work stream that sources every region's
//! origin stream, so a push accepted in any region is consumed by one broker in each region
//! and delivered to that region's viewers. The msg id is the origin's (the same in every
//! region). A message another region accepted is dropped (acked, counted in
//! `barrage_broker_backbone_stale_dropped_total`) when it is low priority and older than
//! `cluster.cross_region_max_lag_ms` (a backlog after a partition); a high-reach one is tracked
//! with what is left of its ttl counted from the origin's publish time. A high-reach push is
//! also copied straight into every other region's origin stream before it is answered
//! ([`backbone::Backbone::publish_everywhere`]), so a region that goes dark right after
//! accepting it does not take it along (a region that could not store its copy is counted in
//! `barrage_broker_backbone_region_copies_missing_total`). Order: one partition's
//! messages from one origin keep their origin order; two origins interleave as the sources
//! copy them (a room sees region A's pushes in A's order and B's in B's order, not one total
//! order).
//!
//! # Epochs on owner change
//! When this broker takes a partition's lease, every room of it that this broker had seen
//! (it owned the room before) starts a new epoch in its history ([`crate::history::History::new_owner`]);
//! a room it never had is new here anyway (the epoch names this broker's `boot`). So a room's
//! epoch changes whenever its owner does, and a resuming client is never told "recovered"
//! across batches another broker sent. The seq goes on from this broker's last one for the
//! room (1 for a room new here). The notice reaches each shard before any message of the
//! partition (the feeder sends it first; the shard takes it with the ack tokens, before its
//! queues).
//!
//! # Invariants
//! - A push is answered with a msg id only after JetStream stored it; a backbone that is down,
//!   busy or slow is answered `Overloaded` (503 with Retry-After): accepted means stored.
//! - A message is acked only after every edge link its batch went to confirmed receiving it: a
//!   broker killed before that leaves it unacked, and the partition's next owner gets it again
//!   (counted as `barrage_broker_backbone_redelivered_total`).

use crate::batcher::Message;
use crate::confirm::{Confirms, Handoff, Resolved};
use crate::ingest::owner;
use crate::route::LinkId;
use crate::Shared;
use backbone::{AckKind, AckToken, Backbone, BrokerId, Event, PublishError};
use crossbeam_channel::{Receiver, Sender};
use proto::id::{MsgId, Priority};
use proto::ingest::{IngestFrame, Push, PushError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the feeder looks at the stop flag while it waits.
const FEEDER_POLL_MS: u64 = 100;
/// A high-reach message the courier refused (its bounds are full) goes back to JetStream for
/// this long before it is redelivered.
const REACH_NAK_MS: u64 = 1_000;

/// A consumed message's ack token on its way to the shard that owns its scope.
type Token = (MsgId, AckToken);

/// Counters of cluster mode (rendered under `barrage_broker_backbone_*`).
#[derive(Debug, Default)]
pub struct ClusterMetrics {
    /// Publishes JetStream stored (including ones it reported as duplicates).
    pub published: AtomicU64,
    /// Publishes JetStream reported as duplicates of a stored message (a retry).
    pub duplicates: AtomicU64,
    /// Publishes refused, by reason: down, busy, timeout, refused, closed.
    pub publish_failed: [AtomicU64; 5],
    /// Messages consumed from held partitions.
    pub consumed: AtomicU64,
    /// Of those, messages that may have been delivered before (a takeover or an expired ack).
    pub redelivered: AtomicU64,
    /// Messages acked to JetStream.
    pub acked: AtomicU64,
    /// Consumed messages that did not decode (acked and dropped; only a foreign publisher on
    /// the stream's subjects makes them).
    pub bad_payload: AtomicU64,
    /// Partitions this broker holds now.
    pub partitions_held: AtomicI64,
    /// Partitions taken (a lease won), over the broker's life.
    pub partitions_taken: AtomicU64,
    /// Rooms that started a new epoch because this broker took them over.
    pub epochs_started: AtomicU64,
    /// Messages consumed that another region accepted (federation, issue 13).
    pub cross_region: AtomicU64,
    /// High-reach pushes another region did not store a copy of before the answer (dark or
    /// partitioned; it sources them when it is back).
    pub copies_missing: AtomicU64,
    /// Second copies of one push consumed and dropped (a key stored in two regions' origins).
    pub region_copies_dropped: AtomicU64,
    /// Messages from another region dropped as stale: `[low priority older than
    /// cluster.cross_region_max_lag_ms, high reach whose ttl ran out on the way]`.
    pub stale_dropped: [AtomicU64; 2],
    /// Consumed messages whose batch waits for edge confirmations (gauge).
    pub confirm_waiting: AtomicI64,
    /// CONFIRM frames received from edges.
    pub confirms: AtomicU64,
    /// Consumed messages given back to JetStream because a link their batch was queued on
    /// ended (or refused it) before confirming it.
    pub unconfirmed: AtomicU64,
    /// High-reach messages consumed after their ttl (counted from the JetStream publish
    /// time): acked, not sent.
    pub reach_expired: AtomicU64,
}

/// With regions: the presence mirror (see [`crate::mirror`]) on its own thread until the
/// broker stops: hears the other regions' announcements (applied to the roster as they come)
/// and announces this region's edges every [`crate::mirror::MIRROR_FLUSH_MS`].
pub(crate) fn mirror(shared: Arc<Shared>) {
    let Some(cluster) = shared.cluster.as_ref() else {
        return;
    };
    let config = &shared.config;
    let (tx, rx) = crossbeam_channel::bounded(crate::mirror::MIRROR_QUEUE_MAX);
    cluster.backbone.hear(tx);
    shared.roster.mirror_on();
    let mut inbox = crate::mirror::Inbox::new(&config.region);
    let mut outbox =
        crate::mirror::Outbox::new(&config.region, &config.node_id, config.presence_lease_ms());
    let every = Duration::from_millis(crate::mirror::MIRROR_FLUSH_MS);
    let mut next = Instant::now();
    while !shared.stop.load(std::sync::atomic::Ordering::Relaxed) {
        match rx.recv_timeout(next.saturating_duration_since(Instant::now())) {
            Ok(payload) => shared.roster.hear(&mut inbox, &payload, Instant::now()),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(every);
            }
        }
        let now = Instant::now();
        if now < next {
            continue;
        }
        next = now + every;
        for a in shared.roster.announcements(&mut outbox, now) {
            match serde_json::to_vec(&a) {
                Ok(json) => cluster.backbone.announce(json.into()),
                Err(e) => tracing::warn!(error = %e, "presence announcement not encoded"),
            }
        }
    }
}

/// Reasons of `publish_failed`, in index order.
pub const PUBLISH_FAILED_REASONS: [&str; 5] = ["down", "busy", "timeout", "refused", "closed"];

/// The backbone as the broker uses it: publish, ack, and the per-shard ack-token channels.
pub(crate) struct Cluster {
    backbone: Backbone,
    /// `Nats-Msg-Id` prefix of unkeyed pushes: `<node id>.<process start µs>.`.
    key_prefix: String,
    next_key: AtomicU64,
    /// Per shard: (msg id, token) of consumed messages on their way to that shard.
    tokens: Vec<(Sender<Token>, Receiver<Token>)>,
    /// Per shard: partitions this broker just took (their rooms start a new epoch).
    taken: Vec<(Sender<backbone::Partition>, Receiver<backbone::Partition>)>,
    /// Tokens of consumed high-reach messages the courier tracks (see the module doc).
    reach: Mutex<HashMap<MsgId, AckToken>>,
    /// `cluster.cross_region_max_lag_ms`.
    max_lag_ms: u64,
    /// NAK delay of a message whose link ended unconfirmed (`cluster.ack_wait_ms`): by then
    /// the edge has re-linked and re-sent its interest.
    redeliver_ms: u64,
    pub metrics: ClusterMetrics,
}

/// A publish on its way: resolve it with [`Cluster::finish`].
pub(crate) struct Publishing(backbone::Publish);

impl Cluster {
    /// The broker's edges have linked: partitions may move to it (see `crate::announce`).
    pub(crate) fn joined(&self) {
        self.backbone.joined();
    }

    /// Connects to the backbone (creating the stream and the lease bucket when absent) and
    /// starts leasing. The returned receiver is the feeder's: hand it to [`feeder`].
    pub fn start(
        config: &crate::Config,
        shards: usize,
    ) -> Result<(Cluster, Receiver<Event>), crate::BrokerError> {
        let bad = |m: String| crate::BrokerError::Config(m);
        let me = BrokerId::new(&config.node_id).ok_or_else(|| {
            bad(format!(
                "node_id {:?}: in cluster mode it names the broker in the lease bucket, so it \
                 must be 1..=64 bytes of [A-Za-z0-9_-] and unique in the cluster",
                config.node_id
            ))
        })?;
        let mut c = config.cluster.clone();
        c.servers = config.backbone.clone();
        c.region = config.region.clone();
        if config.control_addr.is_none() {
            // No edge list to wait for (crate::announce ends the join wait).
            c.join_wait_ms_max = 0;
        }
        let redeliver_ms = c.ack_wait_ms;
        let (sink, rx, _notify) = backbone::Sink::new(c.delivery_queue_max);
        let backbone = Backbone::start(c, me, vec![sink])
            .map_err(|e| bad(format!("{e} (backbone = {:?})", config.backbone)))?;
        let start_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros())
            .unwrap_or(0);
        Ok((
            Cluster {
                backbone,
                key_prefix: format!("{}.{start_us}.", config.node_id),
                next_key: AtomicU64::new(1),
                tokens: (0..shards)
                    .map(|_| crossbeam_channel::unbounded())
                    .collect(),
                taken: (0..shards)
                    .map(|_| crossbeam_channel::unbounded())
                    .collect(),
                reach: Mutex::new(HashMap::new()),
                max_lag_ms: config.cluster.cross_region_max_lag_ms,
                redeliver_ms,
                metrics: ClusterMetrics::default(),
            },
            rx,
        ))
    }

    /// Publishes an accepted push. `idem` is the caller's idempotency key (with its API key's
    /// index), when it gave one.
    pub fn publish(&self, idem: Option<(usize, &str)>, push: Push) -> Publishing {
        let partition = backbone::partition_of(&push.scope, self.backbone.partitions());
        let key = match idem {
            Some((key_index, idem)) => dedup_key(key_index, idem),
            None => format!("{}{}", self.key_prefix, self.next_key.fetch_add(1, Relaxed)),
        };
        let high = push.reach == proto::id::Reach::High;
        let mut payload = Vec::with_capacity(push.body.len() + 64);
        proto::ingest::encode(&IngestFrame::Push(push), &mut payload);
        // High reach must not be lost with a region: stored in every reachable one before
        // the answer (see the module doc, Regions).
        Publishing(match high {
            true => self
                .backbone
                .publish_everywhere(partition, &key, payload.into()),
            false => self.backbone.publish(partition, &key, payload.into()),
        })
    }

    /// Waits for JetStream's answer: the msg id, or `Overloaded` (a retry is safe).
    pub async fn finish(&self, p: Publishing) -> Result<MsgId, PushError> {
        let m = &self.metrics;
        match p.0.await {
            Ok(a) => {
                m.published.fetch_add(1, Relaxed);
                if a.duplicate {
                    m.duplicates.fetch_add(1, Relaxed);
                }
                m.copies_missing.fetch_add(a.copies_missing as u64, Relaxed);
                Ok(MsgId(a.msg_id))
            }
            Err(e) => {
                let i = match e {
                    PublishError::Down => 0,
                    PublishError::Full => 1,
                    PublishError::Timeout => 2,
                    PublishError::Refused(_) | PublishError::BadKey => 3,
                    PublishError::Closed => 4,
                };
                m.publish_failed[i].fetch_add(1, Relaxed);
                tracing::debug!(error = %e, "backbone publish refused: answered overloaded");
                Err(PushError::Overloaded)
            }
        }
    }

    /// A consumed high-reach message: tracked by the courier (which shard 0 drives), its token
    /// kept until the courier ends it ([`Cluster::reach_ended`]). See the module doc.
    /// `published_us`: when it was first stored, in its origin region for another region's
    /// push (see `cross_region`), so its ttl counts from there and a backlog after a takeover
    /// or a partition is sent only while the ttl lasts; `foreign`: accepted in another region.
    #[allow(clippy::too_many_arguments)]
    fn track_high(
        &self,
        shared: &Shared,
        msg_id: MsgId,
        push: Push,
        token: AckToken,
        published_us: u64,
        foreign: bool,
    ) {
        use crate::courier::Status;
        match shared.courier.status(msg_id) {
            Status::Pending { .. } => {
                // Redelivered while still tracked here: ack the newest delivery when it ends.
                self.reach_tokens().insert(msg_id, token);
                return;
            }
            Status::Unknown => {}
            Status::Acked | Status::Expired | Status::Exhausted => {
                self.ack(token, AckKind::Ack);
                return;
            }
        }
        let target = crate::courier::target_of(&push.scope);
        let body = crate::courier::with_msg_id(&push.body, msg_id);
        let (Some(target), Ok(body)) = (target, body) else {
            // Checked before publishing ([`check_high`]): only a foreign publisher gets here.
            self.metrics.bad_payload.fetch_add(1, Relaxed);
            self.ack(token, AckKind::Ack);
            return;
        };
        let ttl_ms = shared.courier.ttl_ms(push.ttl_ms);
        let Some(ttl_ms) = ttl_left_ms(ttl_ms, published_us, crate::unix_us()) else {
            // Expired before this owner got it (a long takeover, a backlog): done.
            match foreign {
                true => self.metrics.stale_dropped[1].fetch_add(1, Relaxed),
                false => self.metrics.reach_expired.fetch_add(1, Relaxed),
            };
            self.ack(token, AckKind::Ack);
            return;
        };
        self.reach_tokens().insert(msg_id, token);
        match shared.courier.accept(msg_id, target, body.into(), ttl_ms) {
            Ok(_) => {
                if let Some(inbox) = shared.inboxes.first() {
                    inbox.notify.notify();
                }
            }
            Err(_) => {
                // The courier's bounds are full (counted there): JetStream keeps it for later.
                if let Some(token) = self.reach_tokens().remove(&msg_id) {
                    self.ack(
                        token,
                        AckKind::Nak {
                            delay_ms: REACH_NAK_MS,
                        },
                    );
                }
            }
        }
    }

    /// High-reach messages the courier ended (ACK, expiry, exhaustion): acked to JetStream,
    /// so no later owner sends them again. Ids this broker did not consume are skipped.
    pub fn reach_ended(&self, ids: &[MsgId]) {
        if ids.is_empty() {
            return;
        }
        let tokens: Vec<AckToken> = {
            let mut table = self.reach_tokens();
            ids.iter().filter_map(|id| table.remove(id)).collect()
        };
        for token in tokens {
            self.ack(token, AckKind::Ack);
        }
    }

    fn reach_tokens(&self) -> std::sync::MutexGuard<'_, HashMap<MsgId, AckToken>> {
        self.reach.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Acknowledges a delivery (any thread).
    pub fn ack(&self, token: AckToken, kind: AckKind) {
        if kind == AckKind::Ack {
            self.metrics.acked.fetch_add(1, Relaxed);
        }
        self.backbone.ack(token, kind);
    }

    /// Moves the ack tokens sent to shard `index` into its table (before it drains its queues,
    /// so every queued message it takes has its token there), and starts a new epoch for the
    /// rooms of partitions this broker just took (see the module doc).
    pub fn take_tokens(
        &self,
        index: usize,
        acks: &mut Acks,
        history: &mut crate::history::History,
    ) {
        if let Some((_, rx)) = self.taken.get(index) {
            let mut moved = Vec::new();
            while let Ok(p) = rx.try_recv() {
                moved.push(p);
            }
            if !moved.is_empty() {
                let n = self.backbone.partitions();
                let started = history.new_owner(|room| {
                    moved.contains(&backbone::partition_of(&proto::id::Scope::Room(room), n))
                });
                self.metrics
                    .epochs_started
                    .fetch_add(started as u64, Relaxed);
            }
        }
        if let Some((_, rx)) = self.tokens.get(index) {
            while let Ok((id, token)) = rx.try_recv() {
                acks.pending.insert(id, token);
            }
        }
    }

    /// Whether the backbone takes this broker's writes now (see [`backbone::Health`]): told to
    /// control in every heartbeat and answered by `/readyz`.
    pub fn health(&self) -> backbone::Health {
        self.backbone.health(Instant::now())
    }

    /// Stops consuming and releases this broker's leases, so the others take its partitions
    /// at once rather than after `lease_ms`. Unacked messages go to the next owners.
    pub fn shutdown(&self) {
        self.backbone.shutdown();
    }

    pub fn metrics_text(&self, w: &mut net::metrics::Writer) {
        let m = &self.metrics;
        let counters: [(&str, &str, &AtomicU64); 10] = [
            (
                "barrage_broker_backbone_confirms_total",
                "CONFIRM frames received from edges (each confirms every batch of its link so far).",
                &m.confirms,
            ),
            (
                "barrage_broker_backbone_unconfirmed_total",
                "Consumed messages given back to JetStream (NAK, redelivered after \
                 cluster.ack_wait_ms) because a link their batch was queued on ended before \
                 confirming it.",
                &m.unconfirmed,
            ),
            (
                "barrage_broker_backbone_reach_expired_total",
                "High-reach messages consumed after their ttl, counted from the JetStream \
                 publish time (acked, not sent).",
                &m.reach_expired,
            ),
            (
                "barrage_broker_backbone_epochs_started_total",
                "Rooms that started a new epoch because this broker took their partition over.",
                &m.epochs_started,
            ),
            (
                "barrage_broker_backbone_published_total",
                "Pushes JetStream stored (answered with a msg id).",
                &m.published,
            ),
            (
                "barrage_broker_backbone_duplicates_total",
                "Publishes JetStream reported as duplicates of a stored one (retries).",
                &m.duplicates,
            ),
            (
                "barrage_broker_backbone_consumed_total",
                "Messages consumed from the partitions this broker held.",
                &m.consumed,
            ),
            (
                "barrage_broker_backbone_redelivered_total",
                "Consumed messages that may have been delivered before (takeover, expired ack).",
                &m.redelivered,
            ),
            (
                "barrage_broker_backbone_acked_total",
                "Messages acked to JetStream after every edge link their batch went to confirmed it.",
                &m.acked,
            ),
            (
                "barrage_broker_backbone_bad_payload_total",
                "Consumed messages that did not decode (acked and dropped).",
                &m.bad_payload,
            ),
        ];
        let stats = self.backbone.stats();
        let progress: [(&str, &str, &AtomicU64); 5] = [
            (
                "barrage_broker_backbone_progress_acks_total",
                "In-progress acks sent for consumed messages still waiting to be handed to the \
                 links (they keep JetStream from redelivering them after cluster.ack_wait_ms).",
                &stats.progress_sent,
            ),
            (
                "barrage_broker_backbone_progress_expired_total",
                "Consumed messages that waited longer than cluster.progress_ms_max: let go, so \
                 JetStream redelivers them.",
                &stats.progress_expired,
            ),
            (
                "barrage_broker_presence_mirror_heard_total",
                "Other regions' presence announcements heard and handed to the mirror.",
                &stats.heard,
            ),
            (
                "barrage_broker_presence_mirror_heard_dropped_total",
                "Other regions' presence announcements dropped: the mirror's queue \
                 (MIRROR_QUEUE_MAX) was full.",
                &stats.heard_dropped,
            ),
            (
                "barrage_broker_presence_mirror_unsent_total",
                "Presence announcements not published: not connected to NATS.",
                &stats.announce_dropped,
            ),
        ];
        for (name, help, v) in counters.into_iter().chain(progress) {
            w.family(name, "counter", help);
            w.sample(name, &[], v.load(Relaxed) as f64);
        }
        w.family(
            "barrage_broker_backbone_cross_region_total",
            "counter",
            "Messages consumed that another region accepted (regions federation).",
        );
        w.sample(
            "barrage_broker_backbone_cross_region_total",
            &[],
            m.cross_region.load(Relaxed) as f64,
        );
        w.family(
            "barrage_broker_backbone_region_copies_missing_total",
            "counter",
            "High-reach pushes accepted while another region did not store its copy (dark or \
             partitioned: it sources them when it is back).",
        );
        w.sample(
            "barrage_broker_backbone_region_copies_missing_total",
            &[],
            m.copies_missing.load(Relaxed) as f64,
        );
        w.family(
            "barrage_broker_backbone_region_copies_dropped_total",
            "counter",
            "Second copies of one push dropped at consumption (one idempotency key stored in two \
             regions, or a high-reach copy).",
        );
        w.sample(
            "barrage_broker_backbone_region_copies_dropped_total",
            &[],
            m.region_copies_dropped.load(Relaxed) as f64,
        );
        w.family(
            "barrage_broker_backbone_stale_dropped_total",
            "counter",
            "Messages from another region dropped as stale, by kind: low (low priority older \
             than cluster.cross_region_max_lag_ms), reach (high reach whose ttl ran out).",
        );
        for (i, kind) in ["low", "reach"].iter().enumerate() {
            w.sample(
                "barrage_broker_backbone_stale_dropped_total",
                &[("kind", kind)],
                m.stale_dropped[i].load(Relaxed) as f64,
            );
        }
        w.family(
            "barrage_broker_backbone_publish_failed_total",
            "counter",
            "Publishes answered overloaded, by reason (down, busy, timeout, refused, closed).",
        );
        for (i, r) in PUBLISH_FAILED_REASONS.iter().enumerate() {
            w.sample(
                "barrage_broker_backbone_publish_failed_total",
                &[("reason", r)],
                m.publish_failed[i].load(Relaxed) as f64,
            );
        }
        w.family(
            "barrage_broker_backbone_confirm_waiting",
            "gauge",
            "Consumed messages whose batch is on edge links and waits for their confirmation.",
        );
        w.sample(
            "barrage_broker_backbone_confirm_waiting",
            &[],
            m.confirm_waiting.load(Relaxed) as f64,
        );
        w.family(
            "barrage_broker_backbone_up",
            "gauge",
            "1 while the backbone takes this broker's writes (connected, and its live entry \
             stored within cluster.lease_ms); 0 makes /readyz answer 503 and control stop \
             assigning this region if no other broker of it is up.",
        );
        w.sample(
            "barrage_broker_backbone_up",
            &[],
            f64::from(u8::from(self.health() == backbone::Health::Up)),
        );
        w.family(
            "barrage_broker_backbone_partitions_held",
            "gauge",
            "Backbone partitions this broker holds the lease of.",
        );
        w.sample(
            "barrage_broker_backbone_partitions_held",
            &[],
            m.partitions_held.load(Relaxed) as f64,
        );
        w.family(
            "barrage_broker_backbone_partitions_taken_total",
            "counter",
            "Partition leases this broker won (start, rebalance, takeover).",
        );
        w.sample(
            "barrage_broker_backbone_partitions_taken_total",
            &[],
            m.partitions_taken.load(Relaxed) as f64,
        );
    }
}

/// How long ago another region accepted `d` (0 for this region's own and without regions),
/// counting it as cross-region.
fn cross_region_age(cluster: &Cluster, d: &backbone::Delivery) -> u64 {
    match &d.origin {
        Some(o) if o.foreign => {
            cluster.metrics.cross_region.fetch_add(1, Relaxed);
            o.age_ms(backbone::region::now_ms())
        }
        _ => 0,
    }
}

/// The `Nats-Msg-Id` of a keyed push: scoped by API key, the caller's key verbatim when it is
/// printable ASCII, otherwise a hash of it (JetStream header values are ASCII).
fn dedup_key(key_index: usize, idem: &str) -> String {
    if idem.bytes().all(|b| b.is_ascii_graphic()) {
        format!("k{key_index}.{idem}")
    } else {
        let h1 = backbone::partition::hash(idem.as_bytes());
        let h2 = backbone::partition::hash(&[idem.as_bytes(), b"#"].concat());
        format!("k{key_index}.h{h1:016x}{h2:016x}")
    }
}

/// One shard's ack tokens of consumed messages: those whose batch is not made yet, and those
/// whose batch waits for the edges' confirmations ([`crate::confirm`]).
#[derive(Default)]
pub(crate) struct Acks {
    pending: HashMap<MsgId, AckToken>,
    confirms: Confirms<AckToken>,
    /// This shard's share of `confirm_waiting`, as last added to it.
    reported: usize,
}

impl Acks {
    /// The batch holding `ids` was handed to the edge links as `handoff` says: acked at once
    /// when no confirming link got it (nobody watching), otherwise once every link it went to
    /// confirmed it. The low-priority rule; see the module doc for high reach.
    pub fn handed(&mut self, cluster: &Cluster, ids: &[MsgId], handoff: &Handoff, now: Instant) {
        let tokens: Vec<AckToken> = ids
            .iter()
            .filter_map(|id| self.pending.remove(id))
            .collect();
        if tokens.is_empty() {
            return;
        }
        let mut out = Resolved::default();
        self.confirms.hand(tokens, handoff, now, &mut out);
        self.settle(cluster, out);
    }

    /// `link` confirmed its batches through `through` (checked by the link first).
    pub fn confirmed(&mut self, cluster: &Cluster, link: LinkId, through: u64) {
        cluster.metrics.confirms.fetch_add(1, Relaxed);
        let mut out = Resolved::default();
        self.confirms.confirmed(link, through, &mut out);
        self.settle(cluster, out);
    }

    /// `link` ended: what it had not confirmed goes back to JetStream.
    pub fn link_down(&mut self, cluster: &Cluster, link: LinkId) {
        let mut out = Resolved::default();
        self.confirms.link_down(link, &mut out);
        self.settle(cluster, out);
    }

    /// When the oldest batch `link` has not confirmed was queued on it.
    pub fn oldest_unconfirmed(&self, link: LinkId) -> Option<Instant> {
        self.confirms.oldest(link)
    }

    fn settle(&mut self, cluster: &Cluster, out: Resolved<AckToken>) {
        for token in out.ack {
            cluster.ack(token, AckKind::Ack);
        }
        if !out.redeliver.is_empty() {
            cluster
                .metrics
                .unconfirmed
                .fetch_add(out.redeliver.len() as u64, Relaxed);
            let delay_ms = cluster.redeliver_ms;
            for token in out.redeliver {
                cluster.ack(token, AckKind::Nak { delay_ms });
            }
        }
        let waiting = self.confirms.waiting();
        cluster
            .metrics
            .confirm_waiting
            .fetch_add(waiting as i64 - self.reported as i64, Relaxed);
        self.reported = waiting;
    }
}

/// What is left of a high-reach message's `ttl_ms` at `now_us`, counted from its JetStream
/// publish time (`None`: expired). The publish time is JetStream's clock and `now_us` this
/// broker's: exact on one host, NTP-close across hosts; a broker clock behind JetStream's
/// gives at most the full ttl (never more), and an unknown publish time (0) the full ttl.
pub(crate) fn ttl_left_ms(ttl_ms: u64, published_us: u64, now_us: u64) -> Option<u64> {
    if published_us == 0 {
        return Some(ttl_ms);
    }
    let age_ms = now_us.saturating_sub(published_us) / 1_000;
    ttl_ms.checked_sub(age_ms).filter(|left| *left > 0)
}

/// What a `reach=high` push must be before it is published (the owner adds the `msg_id` field
/// when it consumes it, so a push it would refuse is refused here, before it is stored).
pub(crate) fn check_high(push: &Push) -> Result<(), PushError> {
    if crate::courier::target_of(&push.scope).is_none() {
        return Err(PushError::Invalid(
            "reach=high applies to user (uid != 0) and device scopes".into(),
        ));
    }
    crate::courier::with_msg_id(&push.body, MsgId(0)).map(|_| ())
}

/// The feeder thread: takes the backbone's deliveries and queues each on the shard that owns
/// its scope, as an embedded-mode push is queued. Waits (does not drop) while that queue is
/// full: JetStream holds the rest (`cluster.ack_pending_max` per partition).
pub(crate) fn feeder(shared: Arc<Shared>, rx: Receiver<Event>) {
    let Some(cluster) = shared.cluster.as_ref() else {
        return;
    };
    let m = &cluster.metrics;
    let poll = Duration::from_millis(FEEDER_POLL_MS);
    let mut seen = backbone::region::SeenKeys::new(
        shared.config.cluster.dedup_window_ms,
        backbone::region::SEEN_KEYS_MAX,
    );
    loop {
        if shared.stop.load(Relaxed) {
            return;
        }
        let event = match rx.recv_timeout(poll) {
            Ok(e) => e,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        };
        let d = match event {
            Event::Owned(p) => {
                // Before any message of it: the shards start its rooms' new epoch first.
                for (tx, _) in &cluster.taken {
                    let _ = tx.send(p);
                }
                for inbox in &shared.inboxes {
                    inbox.notify.notify();
                }
                m.partitions_held.fetch_add(1, Relaxed);
                m.partitions_taken.fetch_add(1, Relaxed);
                tracing::info!(partition = p.0, "backbone partition taken");
                continue;
            }
            Event::Released(p) => {
                m.partitions_held.fetch_sub(1, Relaxed);
                tracing::info!(partition = p.0, "backbone partition released");
                continue;
            }
            Event::Message(d) => d,
        };
        m.consumed.fetch_add(1, Relaxed);
        if d.redelivered {
            m.redelivered.fetch_add(1, Relaxed);
        }
        let push = match proto::ingest::decode(&d.payload, u32::MAX) {
            Ok((IngestFrame::Push(p), _)) => p,
            _ => {
                m.bad_payload.fetch_add(1, Relaxed);
                cluster.ack(d.ack, AckKind::Ack);
                continue;
            }
        };
        if let (Some(_), Some(key)) = (&d.origin, &d.key) {
            // Regions: a second copy of one push (see backbone::region, Deduplication).
            if seen.is_copy(key, d.sequence, Instant::now()) {
                m.region_copies_dropped.fetch_add(1, Relaxed);
                cluster.ack(d.ack, AckKind::Ack);
                continue;
            }
        }
        let msg_id = MsgId(d.msg_id);
        let age_ms = cross_region_age(cluster, &d);
        if push.reach == proto::id::Reach::High {
            let published_us = match &d.origin {
                Some(o) if o.foreign => o.published_ms.saturating_mul(1_000),
                _ => d.published_us,
            };
            let foreign = d.origin.as_ref().is_some_and(|o| o.foreign);
            cluster.track_high(&shared, msg_id, push, d.ack, published_us, foreign);
            continue;
        }
        if push.priority == Priority::Low && age_ms > cluster.max_lag_ms {
            // A backlog from another region after a partition: too old to matter live.
            m.stale_dropped[0].fetch_add(1, Relaxed);
            cluster.ack(d.ack, AckKind::Ack);
            continue;
        }
        let shard = usize::from(owner(&push.scope, shared.shards));
        let (Some(inbox), Some((tokens, _))) =
            (shared.inboxes.get(shard), cluster.tokens.get(shard))
        else {
            continue;
        };
        let _ = tokens.send((msg_id, d.ack));
        let mut msg = Message {
            scope: push.scope,
            priority: push.priority,
            msg_id,
            body: push.body,
            // This broker's clock starts here: the accepting broker's is not on the wire.
            accepted: Instant::now(),
        };
        let tx = match msg.priority {
            Priority::High => &inbox.high_tx,
            Priority::Low => &inbox.low_tx,
        };
        loop {
            match tx.send_timeout(msg, poll) {
                Ok(()) => break,
                Err(crossbeam_channel::SendTimeoutError::Timeout(back)) => {
                    inbox.notify.notify();
                    if shared.stop.load(Relaxed) {
                        return;
                    }
                    msg = back;
                }
                Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => return,
            }
        }
        inbox.notify.notify();
    }
}

#[cfg(test)]
mod tests {
    use super::ttl_left_ms;

    #[test]
    fn the_ttl_counts_from_the_publish_time() {
        let published = 1_000_000_000;
        assert_eq!(ttl_left_ms(5_000, published, published), Some(5_000));
        assert_eq!(
            ttl_left_ms(5_000, published, published + 2_000_000),
            Some(3_000),
            "2 s after the publish (a takeover) leaves 3 s, not a fresh 5 s"
        );
        assert_eq!(ttl_left_ms(5_000, published, published + 5_000_000), None);
        assert_eq!(ttl_left_ms(5_000, published, published + 9_000_000), None);
        assert_eq!(
            ttl_left_ms(5_000, published, published - 3_000_000),
            Some(5_000),
            "a clock behind JetStream's never gives more than the ttl"
        );
        assert_eq!(ttl_left_ms(5_000, 0, published), Some(5_000), "unknown");
    }
}
