//! # broker: ingest, aggregate, compress once, distribute
//!
//! Business callers push messages over the ingest socket ([`ingest`], [`client`]) or the HTTP
//! API ([`http`]); the broker checks them ([`policy`]), gives each a `msg_id`, and hands each to
//! the shard that owns its scope. Each shard aggregates its rooms' messages ([`batcher`]),
//! encodes every batch once per encoding some edge asked for ([`compress`]), and queues the same
//! bytes to every edge link with viewers of the scope ([`route`], [`link`]).
//!
//! # Layout
//! - [`config`]: the TOML config, every field defaulted.
//! - [`policy`]: API keys, scopes, token buckets, body checks (sans-io).
//! - [`batcher`]: the per-scope flush rule of DESIGN §5 (sans-io, virtual time in tests).
//! - [`compress`]: inner packets and the outer brotli/zlib/plain packet of a batch.
//! - [`route`]: edge links, their interest, fleet-wide counts (sans-io).
//! - [`presence`]: who is in which room: records, leases, flap grace, the event log (sans-io).
//! - [`mirror`]: presence across regions: this region's edges' record sets announced on core
//!   NATS, the other regions' applied under per-(region, edge) leases (sans-io).
//! - [`roster`]: presence wired: edges' PRESENCE frames and heartbeats in, lease expiry on
//!   shard 0, the `/v1/presence/...` API, user/device routing to the edges that hold them
//!   (`route_by_presence`, on by default).
//! - [`catchup`]: user/device batches held briefly for an edge that reports the user late
//!   (sans-io), so narrowing by presence loses nothing sending to every edge delivered.
//! - [`online`]: `ONLINE_RANK_COUNT` pushes to the rooms that ask for them (sans-io).
//! - [`feed`]: presence event streams for consumers: Server-Sent Events and ingest
//!   subscriptions, resumable by seq, cut when a consumer stalls.
//! - [`link`]: the edge link server: a handshake thread, then per-link reader/writer tasks on
//!   the owning shard with a bounded queue.
//! - [`ingest`]: the ingest socket server and the accept path shared with HTTP.
//! - [`http`]: the HTTP API (push, healthz, metrics).
//! - [`client`]: [`IngestClient`], a blocking pipelined client of the ingest socket.
//! - [`shard`]: one shard's event loop (queues -> batcher -> compress -> links).
//! - [`metrics`]: counters and their Prometheus rendering.
//! - [`history`]: per-room resume history (sans-io); each shard records its rooms' batches
//!   and answers the edges' REPLAY frames from it.
//! - [`reach`], [`store`]: issue 9's high-reach building blocks (sans-io tracker, durable log).
//! - [`courier`]: high reach wired: tracker and log behind one lock, fed by the push path,
//!   the edges' presence and ACKs, drained by shard 0 (which owns user and device scopes).
//! - [`stop`]: a shard-local stop latch.
//! - [`announce`]: heartbeats to control (`control_addr`), so edges learn the brokers.
//! - [`cluster`]: cluster mode (`backbone` set): publish to NATS JetStream before answering,
//!   consume the partitions this broker leases into the same shard queues, ack once confirmed.
//! - [`confirm`]: cluster mode's batch confirmations (sans-io): a consumed message is acked
//!   to JetStream only once every edge link its batch went to has confirmed it.
//!
//! # Threads and invariants
//! - `shards` monoio runtime threads. Shard `i` owns the rooms with `shard_of_room(r) == i`, the
//!   areas with `shard_of_area(a) == i`, and (shard 0) the global, user and device scopes. It
//!   owns their batches, seqs and the edge links that edges open to it. Nothing of it is shared.
//! - Ingest connections and HTTP requests run on every shard (`SO_REUSEPORT`); they validate on
//!   their own thread (key, scope, size, JSON shape and the key's rate without a lock; the
//!   target's rate under the owning shard's `Rates` lock, never a broker-wide one) and pass each accepted message through a bounded crossbeam channel per
//!   (owning shard, priority), then wake the owner with a `net::wake::Notify`. A full channel
//!   refuses the push (`Overloaded`) before the caller gets a `msg_id`: nothing accepted is
//!   dropped by the broker's queues.
//! - One plain thread accepts edge links and reads their `Hello`, then passes the socket to the
//!   shard the Hello names.
#![forbid(unsafe_code)]

mod announce;
pub mod batcher;
pub mod catchup;
pub mod client;
pub mod cluster;
pub mod compress;
pub mod config;
pub mod confirm;
pub mod courier;
pub mod dedup;
pub mod feed;
pub mod history;
pub mod http;
pub mod ingest;
pub mod link;
pub mod metrics;
pub mod mirror;
pub mod online;
pub mod policy;
pub mod presence;
pub mod reach;
pub mod roster;
pub mod route;
pub mod shard;
pub mod stop;
pub mod store;

pub use client::{ClientError, IngestClient, Message};
pub use config::{ApiKey, Config, ScopeKind};

use crossbeam_channel::{Receiver, Sender};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The config file is unreadable or holds a bad value (operator's fault).
    #[error("config: {0}")]
    Config(String),
    /// A listener could not be bound or a thread not started (host's state).
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// A new edge link, handshake done, on its way to its shard.
pub(crate) struct NewLink {
    pub stream: std::net::TcpStream,
    pub hello: proto::link::Hello,
    pub peer: SocketAddr,
}

/// What other threads may send a shard.
pub(crate) struct Inbox {
    pub high_tx: Sender<batcher::Message>,
    pub high_rx: Receiver<batcher::Message>,
    pub low_tx: Sender<batcher::Message>,
    pub low_rx: Receiver<batcher::Message>,
    pub links_tx: Sender<NewLink>,
    pub links_rx: Receiver<NewLink>,
    pub notify: Arc<net::wake::Notify>,
}

/// State every thread of one broker shares (read-mostly).
pub(crate) struct Shared {
    pub config: Config,
    pub shards: u16,
    /// Every receiving thread checks pushes against a snapshot of it; a reload swaps it whole
    /// (new keys, scopes, rates; the key rate buckets start full again).
    pub policy: net::reload::Live<policy::Policy>,
    /// What a reload runs (the binary registers "config"; TLS registers its certificates).
    pub hooks: net::reload::Hooks,
    /// The per-target rate buckets, one per owning shard (taken by pushes to that shard only).
    pub rates: Vec<Mutex<policy::Rates>>,
    pub next_msg_id: AtomicU64,
    /// Names this broker run in every room epoch (random per start): a restart is visible to
    /// clients as a new epoch.
    pub boot: u64,
    pub inboxes: Vec<Inbox>,
    pub ingest_metrics: metrics::IngestMetrics,
    pub shard_metrics: Vec<metrics::ShardMetrics>,
    pub link_handshakes_failed: AtomicU64,
    pub link_handshakes: AtomicU64,
    pub stop: AtomicBool,
    /// The HTTP servers' admission counters (every shard's server counts here).
    pub http_stats: Arc<net::http::Stats>,
    /// Link keys by node id (empty: loopback edges link unauthenticated).
    pub link_keys: proto::link::handshake::KeyTable,
    /// Link handshakes in progress per peer address.
    pub link_handshakes_by_addr: link::PerAddr,
    /// Link handshakes refused, by [`link::Refused`].
    pub link_refused: [AtomicU64; 3],
    /// Failed ingest `Auth`s per peer address (taken only on an `Auth` frame).
    pub auth_failures: Mutex<ingest::AuthFailures>,
    /// Keyed pushes remembered, per owning shard (taken only by keyed pushes).
    pub dedup: Vec<Mutex<dedup::Dedup>>,
    /// Per shard: its busiest rooms (viewers, most first), refreshed every
    /// `counts_interval_ms`, for `GET /v1/rooms/top` (taken once a tick and per request).
    pub top_rooms: Vec<Mutex<Vec<(proto::id::RoomId, u64)>>>,
    /// Presence: edges' records, leases, the event log (one per broker, behind its own lock).
    pub roster: roster::Roster,
    /// Cluster mode's backbone (`None`: embedded mode).
    pub cluster: Option<cluster::Cluster>,
    /// High reach: tracker and durable log (see [`courier`]).
    pub courier: courier::Courier,
}

/// Rooms each shard keeps in its busiest-rooms snapshot (and the most `/v1/rooms/top` lists).
pub const TOP_ROOMS_MAX: usize = 100;

impl Shared {
    pub fn metrics_text(&self) -> String {
        let queues: Vec<(usize, usize)> = self
            .inboxes
            .iter()
            .map(|i| (i.high_rx.len(), i.low_rx.len()))
            .collect();
        let mut text = metrics::render(
            &self.ingest_metrics,
            &self.shard_metrics,
            &queues,
            self.link_handshakes_failed.load(Ordering::Relaxed),
            self.link_handshakes.load(Ordering::Relaxed),
        );
        let mut w = net::metrics::Writer::default();
        self.http_stats.write_metrics(&mut w, "barrage_broker");
        w.metric(
            "barrage_broker_queue_messages_max",
            "gauge",
            "Messages each (shard, priority) queue holds at most (queue_messages_max); past it pushes are refused as overloaded.",
            &[(&[], self.config.queue_messages_max as f64)],
        );
        net::metrics::write_process(&mut w, "broker");
        w.family(
            "barrage_broker_link_handshakes_refused_total",
            "counter",
            "Edge link handshakes refused, by reason (slots, per_addr, auth).",
        );
        for (i, r) in link::REFUSED_REASONS.iter().enumerate() {
            w.sample(
                "barrage_broker_link_handshakes_refused_total",
                &[("reason", r)],
                self.link_refused[i].load(Ordering::Relaxed) as f64,
            );
        }
        self.roster.write_metrics(&mut w);
        self.courier.write_metrics(&mut w);
        if let Some(c) = &self.cluster {
            c.metrics_text(&mut w);
        }
        text.push_str(&w.finish());
        text
    }
}

/// Config fields a reload applies; every other change needs a restart (docs/operations.md).
pub const LIVE_FIELDS: [&str; 2] = ["api_keys", "log_level"];

/// A running broker.
pub struct Handle {
    ingest_addr: SocketAddr,
    link_addr: SocketAddr,
    http_addr: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Handle {
    /// The bound ingest socket address.
    pub fn ingest_addr(&self) -> SocketAddr {
        self.ingest_addr
    }
    /// The bound edge link address.
    pub fn link_addr(&self) -> SocketAddr {
        self.link_addr
    }
    /// The bound HTTP API address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }
    /// The shard count edges see in the link `Hello`.
    pub fn shards(&self) -> u16 {
        self.shared.shards
    }
    /// The Prometheus text `GET /metrics` serves.
    pub fn metrics_text(&self) -> String {
        self.shared.metrics_text()
    }

    /// The reload hooks SIGHUP and `POST /admin/reload` run (register TLS reload here).
    pub fn reload_hooks(&self) -> net::reload::Hooks {
        self.shared.hooks.clone()
    }

    /// Applies what of `loaded` can change live (API keys with their scopes and rates, the
    /// room rates) and says what else changed and needs a restart.
    pub fn reloader(&self) -> impl Fn(&Config) -> Result<String, String> + Send + Sync + 'static {
        let shared = self.shared.clone();
        move |loaded| {
            loaded.validate().map_err(|e| e.to_string())?;
            // Only the keys change: every other field of the policy stays as started.
            let mut live = shared.config.clone();
            live.api_keys = loaded.api_keys.clone();
            shared
                .policy
                .store(policy::Policy::new(&live, std::time::Instant::now()));
            let applied = vec![format!("api_keys ({} keys)", loaded.api_keys.len())];
            let restart = net::reload::fields_needing_restart(&shared.config, loaded, &LIVE_FIELDS);
            Ok(net::reload::summary(&applied, &restart))
        }
    }

    /// Stops every thread and closes every socket; returns once they have ended.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        self.shared.stop.store(true, Ordering::SeqCst);
        for inbox in &self.shared.inboxes {
            inbox.notify.notify();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Cluster mode: release the leases now, so the other brokers take this one's partitions
        // at once. What the edges had not confirmed is unacked (or NAK'd) and goes to them.
        if let Some(c) = &self.shared.cluster {
            c.shutdown();
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Binds `n` listeners on `addr` with `SO_REUSEPORT` (all on the port the first one got).
fn bind_group(
    addr: SocketAddr,
    n: usize,
    what: &str,
    across_processes: bool,
) -> Result<Vec<std::net::TcpListener>, BrokerError> {
    net::runtime::shard_listeners(addr, n, 1024, across_processes).map_err(|source| {
        BrokerError::Io {
            what: format!("bind {what} {addr}"),
            source,
        }
    })
}

/// Microseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The first msg id: microseconds since the epoch, so ids keep increasing across restarts as
/// long as the broker accepts fewer than a million messages a second on average.
fn first_msg_id() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(1)
        .max(1)
}

/// Starts a broker: binds every listener, spawns its threads, returns once listening.
pub fn start(config: Config) -> Result<Handle, BrokerError> {
    config.validate()?;
    let link_keys = config.check_secrets()?;
    match net::sys::raise_nofile_limit() {
        Ok(n) => tracing::info!(
            nofile = n,
            "file descriptor limit (edge links + ingest and HTTP connections)"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot raise the file descriptor limit"),
    }
    let n = config.shard_count();
    let across = config.reuse_port_across_processes;
    let ingest = bind_group(config.ingest_addr, n, "ingest", across)?;
    let http = bind_group(config.http_addr, n, "http", across)?;
    let link_io = |source| BrokerError::Io {
        what: format!("bind link {}", config.link_addr),
        source,
    };
    let link_listener = net::sys::listener(config.link_addr, false, 1024).map_err(link_io)?;
    let addr_of = |l: &std::net::TcpListener, what: &str| {
        l.local_addr().map_err(|source| BrokerError::Io {
            what: format!("local addr of {what}"),
            source,
        })
    };
    let ingest_addr = addr_of(&ingest[0], "ingest")?;
    let http_addr = addr_of(&http[0], "http")?;
    let link_addr = addr_of(&link_listener, "link")?;

    let (cluster, deliveries) = if config.cluster_mode() {
        let (c, rx) = cluster::Cluster::start(&config, n)?;
        (Some(c), Some(rx))
    } else {
        (None, None)
    };
    let data_dir = config.data_dir()?;
    let (courier, logged_id_max) =
        courier::Courier::open(config.reach_limits(), data_dir.as_deref()).map_err(|e| {
            let d = data_dir.as_deref().unwrap_or(std::path::Path::new("-"));
            BrokerError::Config(format!("data_dir {}: {e}", d.display()))
        })?;
    match &data_dir {
        Some(d) => tracing::info!(data_dir = %d.display(), "high-reach log on disk"),
        None => tracing::info!(
            data_dir = %config.data_dir,
            "high-reach log in memory only (a restart forgets high-reach messages in flight)"
        ),
    }
    let inboxes = (0..n)
        .map(|_| {
            let (high_tx, high_rx) = crossbeam_channel::bounded(config.queue_messages_max);
            let (low_tx, low_rx) = crossbeam_channel::bounded(config.queue_messages_max);
            let (links_tx, links_rx) = crossbeam_channel::unbounded();
            Inbox {
                high_tx,
                high_rx,
                low_tx,
                low_rx,
                links_tx,
                links_rx,
                notify: net::wake::Notify::new(),
            }
        })
        .collect();
    let shared = Arc::new(Shared {
        policy: net::reload::Live::new(policy::Policy::new(&config, std::time::Instant::now())),
        hooks: Default::default(),
        rates: (0..n)
            .map(|_| Mutex::new(policy::Rates::new(&config)))
            .collect(),
        shards: n as u16,
        // Above every id the reach log has seen, so a reloaded message's id is never reused.
        next_msg_id: AtomicU64::new(first_msg_id().max(logged_id_max.map_or(0, |m| m.0 + 1))),
        boot: rand::random(),
        inboxes,
        ingest_metrics: Default::default(),
        shard_metrics: (0..n).map(|_| Default::default()).collect(),
        link_handshakes_failed: AtomicU64::new(0),
        link_handshakes: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        http_stats: Default::default(),
        link_keys,
        link_handshakes_by_addr: Default::default(),
        link_refused: Default::default(),
        auth_failures: Default::default(),
        top_rooms: (0..n).map(|_| Mutex::new(Vec::new())).collect(),
        dedup: (0..n)
            .map(|_| {
                Mutex::new(dedup::Dedup::new(
                    config.idempotency_window_ms,
                    config.idempotency_keys_max,
                ))
            })
            .collect(),
        roster: roster::Roster::new(&config),
        cluster,
        courier,
        config,
    });

    let mut threads = Vec::new();
    let acceptor =
        link::spawn_acceptor(link_listener, shared.clone()).map_err(|source| BrokerError::Io {
            what: "spawn link acceptor".into(),
            source,
        })?;
    threads.push(acceptor);
    if !shared.config.cluster.regions.is_empty() && shared.cluster.is_some() {
        let s = shared.clone();
        let mirror = std::thread::Builder::new()
            .name("broker-mirror".into())
            .spawn(move || cluster::mirror(s))
            .map_err(|source| BrokerError::Io {
                what: "spawn presence mirror".into(),
                source,
            })?;
        threads.push(mirror);
    }
    if let Some(rx) = deliveries {
        let s = shared.clone();
        let feeder = std::thread::Builder::new()
            .name("broker-feeder".into())
            .spawn(move || cluster::feeder(s, rx))
            .map_err(|source| BrokerError::Io {
                what: "spawn backbone feeder".into(),
                source,
            })?;
        threads.push(feeder);
    }

    if data_dir.is_some() {
        // The reach log's group commit (see courier::Courier::run_log).
        let s = shared.clone();
        let log = std::thread::Builder::new()
            .name("broker-reach-log".into())
            .spawn(move || {
                let wake = || {
                    if let Some(inbox) = s.inboxes.first() {
                        inbox.notify.notify();
                    }
                };
                s.courier.run_log(&s.stop, wake)
            })
            .map_err(|source| BrokerError::Io {
                what: "spawn reach log thread".into(),
                source,
            })?;
        threads.push(log);
    }

    let addrs = announce::Addrs {
        link: link_addr,
        ingest: ingest_addr,
        http: http_addr,
    };
    let announcer = announce::spawn(shared.clone(), addrs).map_err(|source| BrokerError::Io {
        what: "spawn control heartbeat".into(),
        source,
    })?;
    threads.extend(announcer);

    let listeners: Mutex<Vec<Option<(std::net::TcpListener, std::net::TcpListener)>>> =
        Mutex::new(ingest.into_iter().zip(http).map(Some).collect());
    let shared2 = shared.clone();
    let driver = net::runtime::Driver::from_env_or(shared.config.driver);
    let spawned = net::runtime::spawn_shards("broker", n, driver, shared.config.pin, move |i| {
        let taken = match listeners.lock() {
            Ok(mut g) => g.get_mut(i).and_then(Option::take),
            Err(p) => p.into_inner().get_mut(i).and_then(Option::take),
        };
        shard::run(i, shared2.clone(), taken)
    });
    let mut handle = Handle {
        ingest_addr,
        link_addr,
        http_addr,
        shared,
        threads,
    };
    match spawned {
        Ok(ts) => handle.threads.extend(ts),
        Err(source) => {
            handle.stop_and_join();
            return Err(BrokerError::Io {
                what: "spawn shards".into(),
                source,
            });
        }
    }
    tracing::info!(%ingest_addr, %link_addr, %http_addr, shards = n, "broker listening");
    Ok(handle)
}
