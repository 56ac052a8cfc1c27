//! The backbone thread: one plain thread running a current-thread tokio runtime with the
//! `async-nats` client. Shard threads reach it through [`Backbone`] (any thread, no runtime
//! needed); it reaches them through one crossbeam channel per [`Sink`] plus the sink's
//! `net::wake::Notify`, the same bridge the broker's shards already use between themselves.
//!
//! # What runs on it
//! - Publishes: each one a task that waits for JetStream's publish ack (bounded by
//!   `publish_ms_max`), then answers the caller's [`Publish`].
//! - The lease shell: drives [`crate::lease::Leases`] with the KV bucket (heartbeats, create,
//!   update by revision, delete by revision) and the bucket's watch of live brokers.
//! - One consumer task per held partition: a durable pull consumer `p<n>` with explicit acks,
//!   forwarding each message, in stream order, to the partition's sink.
//! - In-progress acks: every message forwarded and not yet acked (or nak'd) is in the
//!   [`Working`] table; every `ack_wait_ms / 4` the thread sends `+WPI` for each one that waited
//!   at least that long, so a message queued behind a backlog (sink, the broker's shard queues,
//!   the aggregation window) is not redelivered while it is still on its way. One that waited
//!   `progress_ms_max` is let go (dropped from the table, counted in [`Stats`]): JetStream
//!   redelivers it after `ack_wait_ms`, so a message the broker lost track of is not held
//!   forever. Not covered: messages the client has pulled but this thread has not yet taken from
//!   the consumer (at most one pull batch per partition, while its sink is full).
//!
//! # Invariants
//! - A caller is answered `Ok` only after JetStream stored the message (or reported it a
//!   duplicate of a stored one). Every other outcome is an error the broker answers
//!   `Overloaded`: nothing is accepted and then dropped. A timed-out publish may still have been
//!   stored; a retry with the same dedup key within `dedup_window_ms` is then reported as a
//!   duplicate, not stored twice.
//! - A sink sees, for one partition: `Owned`, its messages in stream order, then `Released`
//!   (after which no message of that ownership follows). Partition `p` goes to sink
//!   `p mod sinks`.
//! - Dropping a [`Backbone`] without [`Backbone::close`] ends the thread without releasing
//!   anything, exactly like a crash: its leases expire after `lease_ms`, and JetStream
//!   redelivers its unacked messages to the next owner after `ack_wait_ms`.

use crate::config::Config;
use crate::lease::{Action, Leases};
use crate::partition::{BrokerId, Partition};
use crate::region;
use async_nats::jetstream::{self, consumer::pull, kv, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use net::wake::Notify;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

/// Longest dedup key, in bytes (a NATS header value).
pub const DEDUP_KEY_BYTES_MAX: usize = 128;

/// Wait before a partition's consumer retries after its pull failed (connection blip).
const CONSUMER_RETRY_MS: u64 = 200;

/// Longest wait for one JetStream API request at start before it is tried again (within
/// `setup_ms_max`). A stream whose replicas are still electing a leader does not answer at
/// all, and the client's own request timeout (10 s) made a three-server `barrage cluster`
/// start take 11 s instead of 2 whenever two brokers raced to create the stream, and fail
/// past its 30 s when such waits added up under load.
const SETUP_TRY_MS_MAX: u64 = 1_000;

/// Idle heartbeat a partition's pull asks for; two missed end the pull and the consumer starts
/// again. A pull sent to a consumer that is gone or has no leader yet (right after a takeover's
/// delete and create) is lost without an answer: with the client's default (15 s) that room was
/// silent for 30 s more (one room in a failover run, 34 s after the kill instead of 4).
const PULL_HEARTBEAT_MS: u64 = 1_000;

/// Longest wait for one request of a partition consumer's start (info, delete, create). Longer
/// than [`SETUP_TRY_MS_MAX`]: an R3 consumer's create is answered once its own group has
/// elected a leader, which took over 1 s on a loaded machine, and a pull sent before that is
/// lost (costing two heartbeats).
const CONSUMER_TRY_MS_MAX: u64 = 3_000;

/// How long one pull request waits on the server for messages before the client sends another.
const PULL_EXPIRES_MS: u64 = 5_000;

/// Pause between setup tries.
const SETUP_RETRY_MS: u64 = 200;

/// Wait between tries to hand an event to a full sink.
const SINK_FULL_RETRY_MS: u64 = 1;

/// Consumed messages not yet acked: reply subject -> (partition, when it was forwarded).
type Working = Arc<Mutex<HashMap<String, (Partition, Instant)>>>;

/// Counters of the backbone thread (read them through [`Backbone::stats`]).
#[derive(Debug, Default)]
pub struct Stats {
    /// In-progress acks (`+WPI`) sent for messages waiting to be handed off.
    pub progress_sent: AtomicU64,
    /// Messages that waited longer than `progress_ms_max`: no more in-progress acks, so
    /// JetStream redelivers them after `ack_wait_ms`.
    pub progress_expired: AtomicU64,
    /// Set by [`Backbone::joined`]: the broker's edges have linked, partitions may be taken.
    pub joined: std::sync::atomic::AtomicBool,
    /// Presence announcements not published: not connected to NATS (the next one repairs it).
    pub announce_dropped: AtomicU64,
    /// Other regions' presence announcements dropped because the broker's queue was full.
    pub heard_dropped: AtomicU64,
    /// Other regions' presence announcements handed to the broker.
    pub heard: AtomicU64,
    /// The client lost its server and has not reconnected yet (the client's own events).
    pub disconnected: std::sync::atomic::AtomicBool,
    /// When JetStream last stored this broker's live entry in the lease bucket (or, before the
    /// first one, when the stream and the bucket were set up): what [`Backbone::health`] reads.
    stored_at: Mutex<Option<Instant>>,
}

impl Stats {
    /// JetStream stored this broker's live entry (a heartbeat sent at `at`).
    fn stored(&self, at: Instant) {
        let mut s = self.stored_at.lock().unwrap_or_else(|e| e.into_inner());
        *s = Some(s.map_or(at, |prev| prev.max(at)));
    }

    /// When JetStream last stored this broker's live entry.
    pub fn stored_at(&self) -> Option<Instant> {
        *self.stored_at.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The backbone as this broker sees it ([`Backbone::health`]): a broker that cannot publish
/// answers every push `Overloaded` and consumes nothing, so control does not assign its region
/// and its `/readyz` says 503 while it is not [`Health::Up`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Connected, and JetStream stored this broker's live entry within `lease_ms`.
    Up,
    /// The client is not connected to any NATS server (killed, partitioned, misaddressed).
    Disconnected,
    /// Connected, but JetStream has not stored this broker's live entry for `lease_ms` (three
    /// heartbeats in a row failed: JetStream off, no quorum, store full or too slow).
    Stalled,
}

impl Health {
    /// A short reason for `/readyz` and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Up => "up",
            Health::Disconnected => "disconnected",
            Health::Stalled => "stalled",
        }
    }
}

/// Why the backbone could not start.
#[derive(Debug, thiserror::Error)]
pub enum BackboneError {
    /// A config value is out of range (operator's fault).
    #[error("backbone config: {0}")]
    Config(String),
    /// No NATS server answered within `connect_ms_max` (the backbone is down or misaddressed).
    #[error("backbone connect: {0}")]
    Connect(String),
    /// The stream or the lease bucket could not be created or read within `setup_ms_max`
    /// (JetStream off, a NATS cluster without a quorum, or a conflicting existing config); the
    /// message names which and the last answer.
    #[error("backbone setup: {0}")]
    Setup(String),
    /// The thread could not be started (host's state).
    #[error("backbone thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// Why a publish was not accepted. The broker answers each one `Overloaded`; a retry with
/// the same dedup key is safe.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The client is not connected to any NATS server.
    #[error("backbone down")]
    Down,
    /// `publish_pending_max` publishes are already waiting for their ack.
    #[error("backbone busy")]
    Full,
    /// No publish ack within `publish_ms_max`.
    #[error("backbone publish timed out")]
    Timeout,
    /// JetStream refused the message (stream full, no stream).
    #[error("backbone refused: {0}")]
    Refused(String),
    /// The dedup key is empty, too long or holds a control byte (caller's fault).
    #[error("bad dedup key")]
    BadKey,
    /// The backbone thread has ended.
    #[error("backbone closed")]
    Closed,
}

/// JetStream's answer to an accepted publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// The message's sequence in the stream.
    pub sequence: u64,
    /// The dedup key was seen within the dedup window: this publish was not stored again.
    pub duplicate: bool,
    /// The push's msg id, the same on every broker of every region ([`crate::region`]).
    pub msg_id: u64,
    /// [`Backbone::publish_everywhere`]: other regions that did not store their copy (dark or
    /// partitioned; they source it from here when they are back).
    pub copies_missing: usize,
}

/// The idempotency key of a publish, sent as `Nats-Msg-Id`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DedupKey(String);

impl DedupKey {
    /// 1 to [`DEDUP_KEY_BYTES_MAX`] printable ASCII bytes, no spaces.
    pub fn new(key: &str) -> Option<DedupKey> {
        let ok = !key.is_empty()
            && key.len() <= DEDUP_KEY_BYTES_MAX
            && key.bytes().all(|b| b.is_ascii_graphic());
        ok.then(|| DedupKey(key.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Where to send a delivered message's acknowledgement (its JetStream reply subject).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AckToken(async_nats::Subject);

/// How a delivery is acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckKind {
    /// Done: never redeliver (low priority: after its batch went to the edge links).
    Ack,
    /// Still working: restart the `ack_wait_ms` clock (high reach: while a client ACK is awaited).
    Progress,
    /// Give it back: redeliver after `delay_ms`.
    Nak { delay_ms: u64 },
}

/// A message of a held partition.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub partition: Partition,
    /// The message's sequence in the stream.
    pub sequence: u64,
    /// Deliveries of this message by the current consumer: more than 1 after an expired
    /// `ack_wait_ms`. A takeover starts a new consumer, so see `redelivered`.
    pub delivered: i64,
    /// This message may have been delivered before: `delivered > 1`, or it was already stored
    /// when this broker took the partition over from an owner that had been sent messages (a
    /// takeover; conservative). The broker counts these; high-reach clients drop duplicates by
    /// msg_id.
    pub redelivered: bool,
    /// The publish's dedup key, when it had one.
    pub key: Option<String>,
    /// The push's msg id, the same on every broker of every region ([`crate::region`]).
    pub msg_id: u64,
    /// Where and when it was accepted (with regions; `None` without, or from a foreign
    /// publisher).
    pub origin: Option<crate::region::Origin>,
    /// When JetStream stored the message, microseconds since the Unix epoch (JetStream's clock,
    /// from the delivery's ack subject; 0 if it was not readable). The same on every delivery
    /// and every broker, so a time-to-live counted from it does not restart when a partition
    /// changes owner.
    pub published_us: u64,
    pub payload: Bytes,
    pub ack: AckToken,
}

/// What the backbone tells an owning thread.
#[derive(Clone, Debug)]
pub enum Event {
    /// This broker now holds the partition's lease; its messages follow.
    Owned(Partition),
    /// One message, in stream order within its partition.
    Message(Delivery),
    /// The partition is no longer held; no more of its messages follow.
    Released(Partition),
}

/// One owning thread's inbox: a bounded channel and the notify that wakes its loop.
#[derive(Clone)]
pub struct Sink {
    pub tx: crossbeam_channel::Sender<Event>,
    pub notify: Arc<Notify>,
}

impl Sink {
    /// A sink of `capacity` and the receiving end for its thread.
    pub fn new(capacity: usize) -> (Sink, crossbeam_channel::Receiver<Event>, Arc<Notify>) {
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        let notify = Notify::new();
        (
            Sink {
                tx,
                notify: notify.clone(),
            },
            rx,
            notify,
        )
    }
}

/// The answer to one publish: a future for a shard's loop, or [`Publish::wait`] on a plain
/// thread. Runtime-agnostic (a tokio oneshot needs no tokio runtime to be awaited).
pub struct Publish(PublishInner);

enum PublishInner {
    Now(Option<Result<Accepted, PublishError>>),
    Later(oneshot::Receiver<Result<Accepted, PublishError>>),
}

impl Publish {
    /// Blocks the calling thread until the answer (never call it on a shard's loop).
    pub fn wait(self) -> Result<Accepted, PublishError> {
        match self.0 {
            PublishInner::Now(r) => r.unwrap_or(Err(PublishError::Closed)),
            PublishInner::Later(rx) => rx.blocking_recv().unwrap_or(Err(PublishError::Closed)),
        }
    }
}

impl Future for Publish {
    type Output = Result<Accepted, PublishError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().0 {
            PublishInner::Now(r) => Poll::Ready(r.take().unwrap_or(Err(PublishError::Closed))),
            PublishInner::Later(rx) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or(Err(PublishError::Closed))),
        }
    }
}

enum Command {
    Publish {
        partition: Partition,
        key: DedupKey,
        payload: Bytes,
        reply: oneshot::Sender<Result<Accepted, PublishError>>,
        permit: OwnedSemaphorePermit,
        /// Also copy it into every other region's origin stream.
        everywhere: bool,
    },
    Ack(AckToken, AckKind),
    /// A presence announcement of this region (core NATS, at most once).
    Announce(Bytes),
    /// Hand every other region's presence announcements to this channel.
    Hear(crossbeam_channel::Sender<Bytes>),
    Flush(oneshot::Sender<()>),
    Close(oneshot::Sender<()>),
}

/// The handle shard threads use. Cheap calls, never blocking (except [`Publish::wait`],
/// [`Backbone::flush`] and [`Backbone::close`]).
pub struct Backbone {
    tx: mpsc::UnboundedSender<Command>,
    permits: Arc<Semaphore>,
    partitions: u16,
    id_base: u64,
    /// `lease_ms`: the bound of [`Backbone::health`].
    lease: Duration,
    stats: Arc<Stats>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Backbone {
    /// Connects, creates the stream and the lease bucket when absent, and starts the thread.
    /// Partition `p`'s events go to `sinks[p % sinks.len()]`.
    pub fn start(
        config: Config,
        me: BrokerId,
        sinks: Vec<Sink>,
    ) -> Result<Backbone, BackboneError> {
        config.check().map_err(BackboneError::Config)?;
        if sinks.is_empty() {
            return Err(BackboneError::Config("no sink".into()));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<u64, BackboneError>>();
        let partitions = config.partitions;
        let lease = config.lease();
        let permits = Arc::new(Semaphore::new(config.publish_pending_max));
        let stats = Arc::new(Stats::default());
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("backbone".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(BackboneError::Thread(e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    match Shell::connect(config, me, sinks, thread_stats).await {
                        Ok(shell) => {
                            let _ = ready_tx.send(Ok(shell.id_base()));
                            shell.run(rx).await;
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                });
            })?;
        match ready_rx.recv() {
            Ok(Ok(id_base)) => Ok(Backbone {
                tx,
                permits,
                partitions,
                id_base,
                lease,
                stats,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(BackboneError::Setup(
                    "backbone thread ended during setup".into(),
                ))
            }
        }
    }

    /// The number of partitions (for [`crate::partition::partition_of`]).
    pub fn partitions(&self) -> u16 {
        self.partitions
    }

    /// A number every broker of the cluster reads alike and that grows when the stream is made
    /// again: the stream's creation time in microseconds since the epoch. `id_base + sequence`
    /// names a message uniquely across the cluster (and across a re-made stream, as long as
    /// the old one stored fewer than a million messages a second on average).
    pub fn id_base(&self) -> u64 {
        self.id_base
    }

    /// Ends the join wait (`join_wait_ms_max`): the edges have linked to this broker, so it
    /// may take partitions now (within one lease period).
    pub fn joined(&self) {
        self.stats
            .joined
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the backbone takes this broker's writes at `now`: connected, and the live entry
    /// it heartbeats every `lease_ms / 3` stored by JetStream within `lease_ms` (the bound
    /// other brokers use to count this one alive).
    pub fn health(&self, now: Instant) -> Health {
        if self.stats.disconnected.load(Relaxed) {
            return Health::Disconnected;
        }
        match self.stats.stored_at() {
            Some(at) if now.saturating_duration_since(at) < self.lease => Health::Up,
            _ => Health::Stalled,
        }
    }

    /// The backbone thread's counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Publishes `payload` to `partition` with `key` as its `Nats-Msg-Id`. The answer comes
    /// only after JetStream's publish ack; see [`PublishError`] for the rest.
    pub fn publish(&self, partition: Partition, key: &str, payload: Bytes) -> Publish {
        self.publish_to(partition, key, payload, false)
    }

    /// [`Backbone::publish`], and with regions also a copy straight into every other region's
    /// origin stream (through the leafnode), answered once those answered too or
    /// `publish_ms_max` passed: so a push stored here is, when the answer comes, already in
    /// every reachable region, and a region that goes dark right after does not take it along.
    /// For high reach (rare, and must not be lost). A region that did not store its copy is
    /// counted in [`Accepted::copies_missing`]; it sources the push when it is back.
    pub fn publish_everywhere(&self, partition: Partition, key: &str, payload: Bytes) -> Publish {
        self.publish_to(partition, key, payload, true)
    }

    fn publish_to(
        &self,
        partition: Partition,
        key: &str,
        payload: Bytes,
        everywhere: bool,
    ) -> Publish {
        let now = |r| Publish(PublishInner::Now(Some(r)));
        let Some(key) = DedupKey::new(key) else {
            return now(Err(PublishError::BadKey));
        };
        if partition.0 >= self.partitions {
            return now(Err(PublishError::Refused(format!(
                "partition {partition} out of range"
            ))));
        }
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            return now(Err(PublishError::Full));
        };
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Publish {
            partition,
            key,
            payload,
            reply,
            permit,
            everywhere,
        };
        if self.tx.send(cmd).is_err() {
            return now(Err(PublishError::Closed));
        }
        Publish(PublishInner::Later(rx))
    }

    /// Acknowledges a delivery (from any thread; sent in order with other acks).
    pub fn ack(&self, token: AckToken, kind: AckKind) {
        let _ = self.tx.send(Command::Ack(token, kind));
    }

    /// With regions: publishes one presence announcement of this region on
    /// `<presence_subject>.<region>` (core NATS, at most once, crossing the leafnodes; see
    /// `broker::mirror`). Not connected: dropped and counted (announcements repeat).
    pub fn announce(&self, payload: Bytes) {
        let _ = self.tx.send(Command::Announce(payload));
    }

    /// With regions: subscribes to every other region's presence announcements and hands each
    /// payload to `tx` (full: dropped and counted in [`Stats::heard_dropped`]).
    pub fn hear(&self, tx: crossbeam_channel::Sender<Bytes>) {
        let _ = self.tx.send(Command::Hear(tx));
    }

    /// Waits until every ack handed in before this call has been written to the server.
    pub fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Flush(tx)).is_ok() {
            let _ = rx.blocking_recv();
        }
    }

    /// Stops consuming, releases every lease (so others take over at once, not after
    /// `lease_ms`), and ends the thread.
    pub fn close(mut self) {
        self.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// [`Backbone::close`] through a shared reference: stops consuming, releases every lease
    /// and ends the thread (later calls answer `Closed`). Returns once the leases are released.
    pub fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Close(tx)).is_ok() {
            let _ = rx.blocking_recv();
        }
    }
}

impl Drop for Backbone {
    /// Ends the thread without releasing anything (see the module doc: like a crash).
    fn drop(&mut self) {
        let (tx, _) = mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The state the backbone thread owns.
struct Shell {
    config: Config,
    me: BrokerId,
    sinks: Vec<Sink>,
    client: async_nats::Client,
    js: jetstream::Context,
    stream: stream::Stream,
    /// Msg id base: the creation time (µs) of the stream pushes are published to.
    id_base: u64,
    kv: kv::Store,
    leases: Leases,
    consumers: HashMap<Partition, tokio::task::JoinHandle<()>>,
    /// Other regions' presence announcements, and where they go (see [`Backbone::hear`]).
    hearing: Option<(async_nats::Subscriber, crossbeam_channel::Sender<Bytes>)>,
    working: Working,
    stats: Arc<Stats>,
}

impl Shell {
    async fn connect(
        config: Config,
        me: BrokerId,
        sinks: Vec<Sink>,
        stats: Arc<Stats>,
    ) -> Result<Shell, BackboneError> {
        let servers: Vec<&str> = config
            .servers
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if servers.is_empty() {
            return Err(BackboneError::Config("backbone.servers is empty".into()));
        }
        let connect = Duration::from_millis(config.connect_ms_max);
        let events = stats.clone();
        let options = async_nats::ConnectOptions::new()
            .connection_timeout(connect)
            .name(format!("barrage-broker-{me}"))
            .event_callback(move |event| {
                let events = events.clone();
                async move {
                    match event {
                        async_nats::Event::Disconnected
                            if !events.disconnected.swap(true, Relaxed) =>
                        {
                            tracing::warn!(
                                "backbone disconnected: pushes are refused until it is back"
                            );
                        }
                        async_nats::Event::Connected
                            if events.disconnected.swap(false, Relaxed) =>
                        {
                            tracing::info!("backbone reconnected");
                        }
                        _ => {}
                    }
                }
            });
        let client = tokio::time::timeout(connect, options.connect(servers))
            .await
            .map_err(|_| BackboneError::Connect("timed out".into()))?
            .map_err(|e| BackboneError::Connect(e.to_string()))?;
        let js = jetstream::new(client.clone());
        let deadline = Instant::now() + Duration::from_millis(config.setup_ms_max);
        let work = stream::Config {
            name: config.stream.clone(),
            subjects: vec![format!("{}.*", config.subject_prefix)],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            num_replicas: config.replicas,
            duplicate_window: Duration::from_millis(config.dedup_window_ms),
            max_bytes: config.stream_bytes_max,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        };
        let (stream, id_base) = if config.federated() {
            // See crate::region: the origin stream takes this region's publishes, the work
            // stream sources every region's origin stream.
            let origin = stream::Config {
                name: origin_stream(&config, &config.region),
                subjects: vec![format!("{}.{}.*", config.subject_prefix, config.region)],
                retention: stream::RetentionPolicy::Limits,
                max_age: Duration::from_millis(config.origin_age_ms),
                discard: stream::DiscardPolicy::Old,
                ..work.clone()
            };
            let origin = stream_made(&js, origin, deadline).await?;
            let sources = config
                .regions
                .iter()
                .map(|r| stream::Source {
                    name: origin_stream(&config, r),
                    external: (*r != config.region).then(|| stream::External {
                        api_prefix: format!("$JS.{r}.API"),
                        delivery_prefix: None,
                    }),
                    ..Default::default()
                })
                .collect();
            let work = stream::Config {
                name: format!("{}_{}", config.stream, config.region),
                subjects: Vec::new(),
                sources: Some(sources),
                ..work
            };
            let mut stream = stream_made(&js, work.clone(), deadline).await?;
            // A region added to (or removed from) `cluster.regions` since the stream was made:
            // its sources follow the config.
            let names = |c: &stream::Config| {
                let mut n: Vec<String> =
                    c.sources.iter().flatten().map(|s| s.name.clone()).collect();
                n.sort();
                n
            };
            if names(&stream.cached_info().config) != names(&work) {
                let what = format!("sources of stream {}", work.name);
                set_up(deadline, &what, || js.update_stream(&work)).await?;
                stream = set_up(deadline, &what, || js.get_stream(&work.name)).await?;
            }
            (stream, created_us(&origin))
        } else {
            let stream = stream_made(&js, work, deadline).await?;
            let base = created_us(&stream);
            (stream, base)
        };
        // The bucket's stream is made here with the KV conventions (what `create_key_value`
        // would send): async-nats 0.51's `create_key_value` first reads the account info in a
        // shape nats-server 2.9 does not answer, so it fails there.
        let lease = config.lease();
        let bucket = config.lease_bucket_name();
        stream_made(
            &js,
            stream::Config {
                name: format!("KV_{bucket}"),
                subjects: vec![format!("$KV.{bucket}.>")],
                max_messages_per_subject: 1,
                max_age: lease,
                duplicate_window: lease,
                storage: stream::StorageType::File,
                num_replicas: config.replicas,
                allow_rollup: true,
                deny_delete: true,
                allow_direct: true,
                discard: stream::DiscardPolicy::New,
                ..Default::default()
            },
            deadline,
        )
        .await?;
        let what = format!("lease bucket {bucket}");
        let kv = set_up(deadline, &what, || js.get_key_value(&bucket)).await?;
        let mut leases = Leases::new(
            me.clone(),
            config.partitions,
            config.lease(),
            Instant::now(),
        );
        stats.stored(Instant::now());
        if config.join_wait_ms_max > 0 {
            leases.hold(Instant::now() + Duration::from_millis(config.join_wait_ms_max));
        }
        Ok(Shell {
            config,
            me,
            sinks,
            client,
            js,
            stream,
            id_base,
            kv,
            leases,
            consumers: HashMap::new(),
            hearing: None,
            working: Arc::default(),
            stats,
        })
    }

    fn id_base(&self) -> u64 {
        self.id_base
    }

    /// One presence announcement heard: another region's goes to the broker; this region's
    /// own (every broker of it publishes) are not for it.
    fn on_heard(&mut self, heard: Option<async_nats::Message>) {
        let Some((_, tx)) = &self.hearing else {
            return;
        };
        let Some(m) = heard else {
            // The subscription ended (the client closed): stop hearing.
            self.hearing = None;
            return;
        };
        if m.subject.rsplit('.').next() == Some(self.config.region.as_str()) {
            return;
        }
        match tx.try_send(m.payload) {
            Ok(()) => self.stats.heard.fetch_add(1, Relaxed),
            Err(_) => self.stats.heard_dropped.fetch_add(1, Relaxed),
        };
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        let mut watch = self.kv.watch("b.>").await.ok();
        let progress_on = self.config.progress_ms_max > 0;
        let mut progress = tokio::time::interval(self.progress_every());
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = self.leases.next_deadline(Instant::now());
            let sleep = tokio::time::sleep_until(deadline.into());
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(Command::Close(done)) => {
                        let acts = self.leases.close();
                        self.apply(acts).await;
                        let _ = self.client.flush().await;
                        let _ = done.send(());
                        return;
                    }
                    Some(cmd) => self.command(cmd).await,
                    // Dropped without close: end like a crash.
                    None => return,
                },
                entry = next_entry(&mut watch) => match entry {
                    Some(e) => {
                        if let Some(b) = e.key.strip_prefix("b.").and_then(BrokerId::new) {
                            match e.operation {
                                kv::Operation::Put => self.leases.on_seen(b, Instant::now()),
                                kv::Operation::Delete | kv::Operation::Purge => {
                                    self.leases.on_left(&b)
                                }
                            }
                        }
                    }
                    // The watch ended (connection lost): start a new one on the next turn.
                    None => {
                        tokio::time::sleep(Duration::from_millis(CONSUMER_RETRY_MS)).await;
                        watch = self.kv.watch("b.>").await.ok();
                    }
                },
                heard = next_heard(&mut self.hearing) => self.on_heard(heard),
                _ = progress.tick(), if progress_on => self.progress().await,
                _ = sleep => {}
            }
            if self.stats.joined.load(std::sync::atomic::Ordering::Relaxed) {
                self.leases.unhold();
            }
            let acts = self.leases.poll(Instant::now());
            self.apply(acts).await;
        }
    }

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Publish {
                partition,
                key,
                payload,
                reply,
                permit,
                everywhere,
            } => {
                if self.client.connection_state() != async_nats::connection::State::Connected {
                    let _ = reply.send(Err(PublishError::Down));
                    return;
                }
                let js = self.js.clone();
                let subject = self.config.publish_subject(partition);
                let wait = Duration::from_millis(self.config.publish_ms_max);
                let (id_base, region) = (self.id_base, self.config.region.clone());
                let federated = self.config.federated();
                let others: Vec<String> = match everywhere && federated {
                    true => self
                        .config
                        .regions
                        .iter()
                        .filter(|r| **r != region)
                        .map(|r| format!("{}.{r}.{}", self.config.subject_prefix, partition.0))
                        .collect(),
                    false => Vec::new(),
                };
                tokio::spawn(async move {
                    let mut headers = async_nats::HeaderMap::new();
                    let nats_id = match federated {
                        // See crate::region, Deduplication.
                        true => region::nats_msg_id(&region, key.as_str(), false),
                        false => key.as_str().to_owned(),
                    };
                    headers.insert(async_nats::header::NATS_MESSAGE_ID, nats_id.as_str());
                    if federated {
                        headers.insert(region::HEADER_KEY, key.as_str());
                        headers.insert(region::HEADER_REGION, region.as_str());
                        let now = region::now_ms().to_string();
                        headers.insert(region::HEADER_ORIGIN_MS, now.as_str());
                        headers.insert(region::HEADER_ID_BASE, id_base.to_string().as_str());
                    }
                    let publish = async {
                        js.publish_with_headers(subject, headers.clone(), payload.clone())
                            .await
                            .map_err(|e| e.to_string())?
                            .await
                            .map_err(|e| e.to_string())
                    };
                    let mut r = match tokio::time::timeout(wait, publish).await {
                        Ok(Ok(ack)) => Ok(Accepted {
                            sequence: ack.sequence,
                            duplicate: ack.duplicate,
                            msg_id: if federated {
                                region::msg_id(&region, id_base, ack.sequence)
                            } else {
                                id_base.wrapping_add(ack.sequence)
                            },
                            copies_missing: 0,
                        }),
                        Ok(Err(e)) => Err(PublishError::Refused(e)),
                        Err(_) => Err(PublishError::Timeout),
                    };
                    if let (Ok(a), false) = (&mut r, others.is_empty()) {
                        // The copies name the msg id this region answers (their own origin
                        // sequence would give another one) and keep the dedup key, so each
                        // work stream keeps whichever copy reaches it first.
                        headers.insert(region::HEADER_MSG_ID, a.msg_id.to_string().as_str());
                        let copy_id = region::nats_msg_id(&region, key.as_str(), true);
                        headers.insert(async_nats::header::NATS_MESSAGE_ID, copy_id.as_str());
                        let copies = others.into_iter().map(|subject| {
                            let (js, headers, payload) =
                                (js.clone(), headers.clone(), payload.clone());
                            async move {
                                let copy = async {
                                    js.publish_with_headers(subject, headers, payload)
                                        .await
                                        .ok()?
                                        .await
                                        .ok()
                                };
                                matches!(tokio::time::timeout(wait, copy).await, Ok(Some(_)))
                            }
                        });
                        let stored = futures_util::future::join_all(copies).await;
                        a.copies_missing = stored.iter().filter(|ok| !**ok).count();
                    }
                    let _ = reply.send(r);
                    drop(permit);
                });
            }
            Command::Ack(token, kind) => {
                if kind != AckKind::Progress {
                    lock(&self.working).remove(token.0.as_str());
                }
                let body: Bytes = match kind {
                    AckKind::Ack => Bytes::from_static(b"+ACK"),
                    AckKind::Progress => Bytes::from_static(b"+WPI"),
                    AckKind::Nak { delay_ms } => Bytes::from(format!(
                        "-NAK {{\"delay\":{}}}",
                        u128::from(delay_ms) * 1_000_000
                    )),
                };
                if let Err(e) = self.client.publish(token.0, body).await {
                    tracing::warn!(error = %e, "backbone ack not sent; JetStream will redeliver");
                }
            }
            Command::Announce(payload) => {
                let subject = self.config.presence_announce_subject();
                let up = self.client.connection_state() == async_nats::connection::State::Connected;
                if !up {
                    self.stats.announce_dropped.fetch_add(1, Relaxed);
                    return;
                }
                // Spawned: a slow connection must not hold up acks and publishes behind it.
                let (client, stats) = (self.client.clone(), self.stats.clone());
                tokio::spawn(async move {
                    if client.publish(subject, payload).await.is_err() {
                        stats.announce_dropped.fetch_add(1, Relaxed);
                    }
                });
            }
            Command::Hear(tx) => {
                let subject = format!("{}.*", self.config.presence_subject);
                match self.client.subscribe(subject).await {
                    Ok(sub) => self.hearing = Some((sub, tx)),
                    Err(e) => tracing::warn!(error = %e, "presence subscription failed"),
                }
            }
            Command::Flush(done) => {
                let _ = self.client.flush().await;
                let _ = done.send(());
            }
            Command::Close(_) => {}
        }
    }

    /// The period of in-progress acks: a quarter of `ack_wait_ms`, so a message gets its first
    /// one at most half `ack_wait_ms` after it was forwarded, with room for a late tick.
    fn progress_every(&self) -> Duration {
        Duration::from_millis((self.config.ack_wait_ms / 4).max(10))
    }

    /// Sends `+WPI` for every forwarded, unacked message that waited at least one period, and
    /// lets go of those that waited `progress_ms_max` (see the module doc).
    async fn progress(&mut self) {
        let now = Instant::now();
        let due = self.progress_every();
        let max = Duration::from_millis(self.config.progress_ms_max);
        let mut expired = 0;
        let mut send = Vec::new();
        lock(&self.working).retain(|subject, (_, since)| {
            let age = now.saturating_duration_since(*since);
            if age >= max {
                expired += 1;
                return false;
            }
            if age >= due {
                send.push(subject.clone());
            }
            true
        });
        self.stats.progress_expired.fetch_add(expired, Relaxed);
        if expired > 0 {
            tracing::warn!(
                messages = expired,
                "backbone messages waited progress_ms_max; JetStream will redeliver them"
            );
        }
        for subject in send {
            let body = Bytes::from_static(b"+WPI");
            if self.client.publish(subject, body).await.is_err() {
                break;
            }
            self.stats.progress_sent.fetch_add(1, Relaxed);
        }
    }

    /// Carries out lease actions, feeding each result back into the core.
    async fn apply(&mut self, acts: Vec<Action>) {
        let mut todo: std::collections::VecDeque<Action> = acts.into();
        let wait = self.config.lease() / 5;
        while let Some(act) = todo.pop_front() {
            let sent = Instant::now();
            // Disconnected: fail KV requests at once rather than wait out each timeout, which
            // would hold up the publishes queued behind this loop.
            let down = self.client.connection_state() != async_nats::connection::State::Connected;
            match act {
                Action::Heartbeat if down => self.leases.on_heartbeat(false, sent),
                Action::Acquire(p) | Action::Renew(p, _) if down => self.leases.on_failed(p, sent),
                Action::Release(p, _) if down => self.leases.on_released(p, sent),
                Action::Leave if down => {}
                Action::Heartbeat => {
                    let key = format!("b.{}", self.me);
                    let ok = matches!(
                        tokio::time::timeout(wait, self.kv.put(key, Bytes::new())).await,
                        Ok(Ok(_))
                    );
                    if ok {
                        self.stats.stored(sent);
                    }
                    self.leases.on_heartbeat(ok, sent);
                }
                Action::Acquire(p) => {
                    let value = Bytes::from(self.me.as_str().to_owned());
                    match tokio::time::timeout(wait, self.kv.create(lease_key(p), value)).await {
                        Ok(Ok(rev)) => todo.extend(self.leases.on_acquired(p, rev, sent)),
                        Ok(Err(e)) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                            todo.extend(self.leases.on_refused(p, Instant::now()))
                        }
                        _ => self.leases.on_failed(p, Instant::now()),
                    }
                }
                Action::Renew(p, revision) => {
                    let value = Bytes::from(self.me.as_str().to_owned());
                    let update = self.kv.update(lease_key(p), value, revision);
                    match tokio::time::timeout(wait, update).await {
                        Ok(Ok(rev)) => self.leases.on_renewed(p, rev, sent),
                        Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                            todo.extend(self.leases.on_refused(p, Instant::now()))
                        }
                        _ => self.leases.on_failed(p, Instant::now()),
                    }
                }
                Action::Release(p, revision) => {
                    let delete = self.kv.delete_expect_revision(lease_key(p), Some(revision));
                    let _ = tokio::time::timeout(wait, delete).await;
                    self.leases.on_released(p, Instant::now());
                }
                Action::Leave => {
                    let leave = self.kv.delete(format!("b.{}", self.me));
                    let _ = tokio::time::timeout(wait, leave).await;
                }
                Action::Start(p) => {
                    let sink = self.sink(p);
                    send(&sink, Event::Owned(p)).await;
                    let working = self.working.clone();
                    let task = consume(
                        self.stream.clone(),
                        self.config.clone(),
                        self.id_base,
                        p,
                        sink,
                        working,
                    );
                    self.consumers.insert(p, tokio::spawn(task));
                }
                Action::Stop(p) => {
                    if let Some(task) = self.consumers.remove(&p) {
                        task.abort();
                        let _ = task.await;
                    }
                    // Its next owner gets what is left; in-progress acks would not reach it.
                    lock(&self.working).retain(|_, (q, _)| *q != p);
                    send(&self.sink(p), Event::Released(p)).await;
                }
            }
        }
    }

    fn sink(&self, p: Partition) -> Sink {
        self.sinks[usize::from(p.0) % self.sinks.len()].clone()
    }
}

/// The working table, even if a thread panicked holding it (its entries stay valid).
fn lock(w: &Working) -> std::sync::MutexGuard<'_, HashMap<String, (Partition, Instant)>> {
    w.lock().unwrap_or_else(|e| e.into_inner())
}

/// The origin stream of `region` (see [`crate::region`]).
fn origin_stream(config: &Config, region: &str) -> String {
    format!("{}_ORIGIN_{region}", config.stream)
}

/// A stream's creation time, µs since the epoch (the msg id base).
fn created_us(stream: &stream::Stream) -> u64 {
    let created = stream.cached_info().created.unix_timestamp_nanos() / 1_000;
    u64::try_from(created).unwrap_or(0)
}

fn lease_key(p: Partition) -> String {
    format!("p.{}", p.0)
}

/// The next presence announcement heard (pending forever while not hearing).
async fn next_heard(
    hearing: &mut Option<(async_nats::Subscriber, crossbeam_channel::Sender<Bytes>)>,
) -> Option<async_nats::Message> {
    match hearing {
        Some((sub, _)) => sub.next().await,
        None => std::future::pending().await,
    }
}

async fn next_entry(watch: &mut Option<kv::Watch>) -> Option<kv::Entry> {
    match watch {
        Some(w) => match w.next().await {
            Some(Ok(e)) => Some(e),
            _ => {
                *watch = None;
                None
            }
        },
        None => None,
    }
}

/// Hands `event` to its sink, waiting while the sink is full. A sink whose thread is gone
/// drops it (the broker is shutting down).
async fn send(sink: &Sink, mut event: Event) {
    loop {
        match sink.tx.try_send(event) {
            Ok(()) => {
                sink.notify.notify();
                return;
            }
            Err(crossbeam_channel::TrySendError::Full(e)) => {
                event = e;
                sink.notify.notify();
                tokio::time::sleep(Duration::from_millis(SINK_FULL_RETRY_MS)).await;
            }
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => return,
        }
    }
}

/// The consumer of one held partition, until aborted. Retries after errors.
///
/// Each ownership starts with a new consumer: the old one (a dead or departed owner's) is
/// deleted and `p<n>` created again, delivering everything still in the partition from the
/// start. With work-queue retention an acked message is gone from the stream, so what remains
/// is exactly what no owner finished, and a fresh consumer delivers it in stream order at once.
/// Reusing the old consumer would also work but redelivers only after each message's
/// `ack_wait_ms`, in the order those expire. The lease invariant makes the delete safe: the
/// previous owner has stopped before this one starts.
async fn consume(
    stream: stream::Stream,
    config: Config,
    id_base: u64,
    p: Partition,
    sink: Sink,
    working: Working,
) {
    let mut takeover = Takeover::default();
    loop {
        let r = consume_once(&stream, &config, id_base, p, &sink, &working, &mut takeover);
        let r = r.await;
        if let Err(e) = r {
            tracing::warn!(partition = p.0, error = %e, "backbone consumer failed; retrying");
        }
        tokio::time::sleep(Duration::from_millis(CONSUMER_RETRY_MS)).await;
    }
}

/// What the start of one ownership's consumer has done so far, kept across its tries.
#[derive(Default)]
struct Takeover {
    /// Messages up to this stream sequence may have reached a previous owner (the highest
    /// read by any try).
    seen_before: Option<u64>,
    /// The previous owner's consumer, by its creation time (ns), when there was one.
    old_created_ns: Option<i128>,
    /// The previous owner's consumer is gone (deleted by us, or there was none).
    deleted: bool,
}

/// One JetStream request of a consumer's start (its answer, error or not), bounded by
/// [`CONSUMER_TRY_MS_MAX`]: a request the cluster does not answer (a group electing its
/// leader) fails this try after 3 s instead of the client's 10 s, and the consumer tries again.
async fn within<F: Future>(what: &str, f: F) -> Result<F::Output, String> {
    tokio::time::timeout(Duration::from_millis(CONSUMER_TRY_MS_MAX), f)
        .await
        .map_err(|_| format!("{what}: no answer within {CONSUMER_TRY_MS_MAX} ms"))
}

async fn consume_once(
    stream: &stream::Stream,
    config: &Config,
    id_base: u64,
    p: Partition,
    sink: &Sink,
    working: &Working,
    takeover: &mut Takeover,
) -> Result<(), String> {
    let name = format!("p{}", p.0);
    if !takeover.deleted {
        // A previous owner that was sent anything may have been sent any message stored
        // before now (JetStream's delivered sequence does not bound it once redeliveries
        // happened), so those are marked `redelivered`: a conservative "maybe seen".
        match within("consumer info", stream.consumer_info(&name)).await? {
            Ok(info) => {
                takeover.old_created_ns = Some(info.created.unix_timestamp_nanos());
                if info.delivered.consumer_sequence > 0 {
                    let mut stream = stream.clone();
                    let last = within("stream info", stream.info())
                        .await?
                        .map_err(|e| format!("stream info: {e}"))?
                        .state
                        .last_sequence;
                    takeover.seen_before = takeover.seen_before.max(Some(last));
                }
            }
            // Not found is fine (first owner ever, or an earlier try deleted it).
            Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => {}
            Err(e) => return Err(format!("consumer info: {e}")),
        }
        if let Err(e) = within("consumer delete", stream.delete_consumer(&name)).await? {
            let not_found = matches!(
                e.kind(),
                jetstream::stream::ConsumerErrorKind::JetStream(ref j)
                    if j.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND
            );
            if !not_found {
                return Err(format!("consumer delete: {e}"));
            }
        }
        takeover.deleted = true;
    }
    let seen_before = takeover.seen_before.unwrap_or(0);
    let consumer: jetstream::consumer::PullConsumer = within(
        "consumer create",
        stream.get_or_create_consumer(
            &name,
            pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: config.filter_subject(p),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_millis(config.ack_wait_ms),
                max_ack_pending: config.ack_pending_max,
                deliver_policy: jetstream::consumer::DeliverPolicy::All,
                ..Default::default()
            },
        ),
    )
    .await?
    .map_err(|e| format!("consumer create: {e}"))?;
    // Right after the delete, a server that has not applied it yet may still answer for the
    // previous owner's consumer; pulling from it then hangs until it is gone and the pull's
    // idle heartbeat is missed (30 s). Seen as one room silent for 34 s after a broker kill.
    if takeover.old_created_ns == Some(consumer.cached_info().created.unix_timestamp_nanos()) {
        return Err(
            "the previous owner's consumer is still listed; its delete is not applied yet".into(),
        );
    }
    let mut messages = consumer
        .stream()
        .expires(Duration::from_millis(PULL_EXPIRES_MS))
        .heartbeat(Duration::from_millis(PULL_HEARTBEAT_MS))
        .messages()
        .await
        .map_err(|e| e.to_string())?;
    while let Some(m) = messages.next().await {
        let m = m.map_err(|e| e.to_string())?;
        let (sequence, delivered, published_us) = match m.info() {
            Ok(info) => (
                info.stream_sequence,
                info.delivered,
                u64::try_from(info.published.unix_timestamp_nanos() / 1_000).unwrap_or(0),
            ),
            Err(e) => return Err(e.to_string()),
        };
        let Some(reply) = m.reply.clone() else {
            continue;
        };
        let header = |name: &str| m.headers.as_ref()?.get(name).map(|v| v.as_str());
        // With regions the caller's key travels in its own header (see crate::region).
        let key = header(region::HEADER_KEY)
            .or_else(|| header(async_nats::header::NATS_MESSAGE_ID.as_ref()))
            .map(str::to_owned);
        let origin = if config.federated() {
            region::Origin::parse(
                &config.region,
                header(region::HEADER_REGION),
                header(region::HEADER_ORIGIN_MS),
                header(region::HEADER_ID_BASE),
                header(region::HEADER_SOURCE),
                header(region::HEADER_MSG_ID),
            )
        } else {
            None
        };
        let msg_id = origin
            .as_ref()
            .map_or(id_base.wrapping_add(sequence), |o| o.msg_id);
        if config.progress_ms_max > 0 {
            lock(working).insert(reply.as_str().to_owned(), (p, Instant::now()));
        }
        let delivery = Delivery {
            partition: p,
            sequence,
            delivered,
            redelivered: delivered > 1 || sequence <= seen_before,
            key,
            msg_id,
            origin,
            published_us,
            payload: m.payload.clone(),
            ack: AckToken(reply),
        };
        send(sink, Event::Message(delivery)).await;
    }
    Ok(())
}

/// `get_or_create_stream` until it succeeds or `deadline` (see [`set_up`]): brokers starting
/// together race to create the stream, and the loser's request is refused ("subjects overlap
/// with an existing stream") or not answered at all (the stream's replicas are still electing
/// a leader) although the stream it wants exists a moment later.
async fn stream_made(
    js: &jetstream::Context,
    config: stream::Config,
    deadline: Instant,
) -> Result<jetstream::stream::Stream, BackboneError> {
    let what = format!("stream {} (R{})", config.name, config.num_replicas);
    set_up(deadline, &what, || js.get_or_create_stream(config.clone())).await
}

/// Runs the setup request `op` until it succeeds or `deadline`, each try bounded by
/// [`SETUP_TRY_MS_MAX`]. Only idempotent requests go through here (get, create with the same
/// config, update to the same config), so a try that timed out but took effect is harmless.
/// The error names `what` and the last failure.
async fn set_up<T, E, F, Fut>(deadline: Instant, what: &str, mut op: F) -> Result<T, BackboneError>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let started = Instant::now();
    let mut tries: u64 = 0;
    loop {
        let budget = deadline.saturating_duration_since(Instant::now()).clamp(
            Duration::from_millis(SETUP_RETRY_MS),
            Duration::from_millis(SETUP_TRY_MS_MAX),
        );
        tries += 1;
        // Whether the cluster looked leaderless: no answer, or JetStream's 503.
        let (error, leaderless) = match tokio::time::timeout(budget, op()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => {
                let e = e.to_string();
                let unavailable = e.contains("code 503");
                (e, unavailable)
            }
            Err(_) => (format!("no answer within {} ms", budget.as_millis()), true),
        };
        let pause = Duration::from_millis(SETUP_RETRY_MS);
        if Instant::now() + pause >= deadline {
            let hint = if leaderless {
                "; a NATS cluster answers only once its meta leader and the stream's leader \
                 are elected: are a majority of its servers up and routed to each other?"
            } else {
                ""
            };
            return Err(BackboneError::Setup(format!(
                "{what} not ready after {} ms and {tries} tries (last: {error}){hint}",
                started.elapsed().as_millis()
            )));
        }
        tracing::debug!(what, tries, %error, "backbone setup not ready; trying again");
        tokio::time::sleep(pause).await;
    }
}
