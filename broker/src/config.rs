//! The broker's configuration: a TOML file whose every field has a default.
//!
//! Secrets (`api_keys`) live here too; keep the file readable by the service user only.
//! Limits are named with their unit last; `0` means "no limit" only where a field says so.

use crate::BrokerError;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::Path;

/// A push scope kind, as API keys name it in `scopes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScopeKind {
    Room,
    Area,
    Global,
    User,
    Device,
    /// Not a push scope: reading presence (`/v1/presence/...`). Never in [`ScopeKind::ALL`]; a
    /// key has it only when listed.
    Presence,
}

impl ScopeKind {
    /// Every kind, in wire-tag order.
    pub const ALL: [ScopeKind; 5] = [
        ScopeKind::Room,
        ScopeKind::Area,
        ScopeKind::Global,
        ScopeKind::User,
        ScopeKind::Device,
    ];

    /// The kind of a scope.
    pub fn of(scope: &proto::id::Scope) -> ScopeKind {
        use proto::id::Scope;
        match scope {
            Scope::Room(_) => ScopeKind::Room,
            Scope::Area(_) => ScopeKind::Area,
            Scope::Global => ScopeKind::Global,
            Scope::User(_) => ScopeKind::User,
            Scope::Device(_) => ScopeKind::Device,
        }
    }

    /// Bit of this kind in a scope set.
    pub fn bit(self) -> u8 {
        1 << (self as u8)
    }

    pub fn label(self) -> &'static str {
        match self {
            ScopeKind::Room => "room",
            ScopeKind::Area => "area",
            ScopeKind::Global => "global",
            ScopeKind::User => "user",
            ScopeKind::Device => "device",
            ScopeKind::Presence => "presence",
        }
    }
}

/// One `[[api_keys]]` entry: a business caller's key, what it may push to and how fast.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// The secret the caller presents (ingest `Auth` frame or `Authorization: Bearer`).
    pub key: String,
    /// Scopes this key may push to.
    #[serde(default = "all_scopes")]
    pub scopes: Vec<ScopeKind>,
    /// Sustained pushes per second allowed to this key (token bucket refill); 0 = unlimited.
    #[serde(default = "default_key_rate_per_s")]
    pub rate_per_s: f64,
    /// Pushes this key may make at once after being idle (token bucket size).
    #[serde(default = "default_key_burst")]
    pub burst: f64,
}

fn all_scopes() -> Vec<ScopeKind> {
    ScopeKind::ALL.to_vec()
}
fn default_key_rate_per_s() -> f64 {
    10_000.0
}
fn default_key_burst() -> f64 {
    20_000.0
}

/// `data_dir` value for the per-node default directory (see [`Config::data_dir`]).
pub const DATA_DIR_AUTO: &str = "auto";
/// `data_dir` value for memory only.
pub const DATA_DIR_NONE: &str = "none";

impl Config {
    /// The directory of the durable high-reach log, `None` for memory only (see the field).
    pub fn data_dir(&self) -> Result<Option<std::path::PathBuf>, BrokerError> {
        self.data_dir_in(&net::state::dir())
    }

    /// [`Config::data_dir`] with `auto` under `state` (tests).
    pub fn data_dir_in(
        &self,
        state: &std::path::Path,
    ) -> Result<Option<std::path::PathBuf>, BrokerError> {
        match self.data_dir.trim() {
            DATA_DIR_NONE => Ok(None),
            DATA_DIR_AUTO if self.cluster_mode() || self.ingest_addr.port() == 0 => Ok(None),
            DATA_DIR_AUTO => Ok(Some(state.join(format!(
                "broker-{}-{}",
                net::state::path_part(&self.node_id),
                self.ingest_addr.port()
            )))),
            "" => Err(BrokerError::Config(
                "data_dir is empty: write \"auto\" (the per-node default), \"none\" (memory only) \
                 or a directory"
                    .into(),
            )),
            dir => Ok(Some(std::path::PathBuf::from(dir))),
        }
    }

    /// `presence_lease_ms`, with 0 resolved to `link_dead_ms + link_ping_ms`: the broker cuts
    /// a silent link at `link_dead_ms` first, and the lease ends the records of an edge that
    /// did not come back within one more ping (see [`Config::presence_lease_ms`]'s field).
    pub fn presence_lease_ms(&self) -> u64 {
        match self.presence_lease_ms {
            0 => self.link_dead_ms.saturating_add(self.link_ping_ms),
            ms => ms,
        }
    }
}

impl ApiKey {
    /// A key allowed every scope at the default rate (handy for tests and `barrage up`).
    pub fn all_scopes(key: &str) -> ApiKey {
        ApiKey {
            key: key.to_string(),
            scopes: all_scopes(),
            rate_per_s: default_key_rate_per_s(),
            burst: default_key_burst(),
        }
    }
}

/// The broker's configuration.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This broker's name, sent to edges in the link `Hello`.
    pub node_id: String,
    /// Broker shards (one monoio runtime thread each); 0 = one per core.
    pub shards: usize,
    /// Where shard threads run: `true` (shard i on CPU i mod cores), `false`, or the CPUs shards
    /// may use (`[2, 3]` or `"2-3"`).
    pub pin: net::runtime::Pin,
    /// Let another process bind the same ingest port (`SO_REUSEPORT` across processes). Off: a
    /// port another process holds fails with "address in use". On only for a restart.
    pub reuse_port_across_processes: bool,
    /// monoio driver (`auto`, `uring`, `legacy`); `BARRAGE_DRIVER` overrides it.
    pub driver: net::runtime::Driver,
    /// Log filter in `RUST_LOG` syntax (`info`, `warn,edge=debug`); empty keeps `RUST_LOG` (or
    /// `info`). A reload (SIGHUP, `POST /admin/reload`) applies a new value.
    pub log_level: String,
    /// Ingest socket (persistent, pipelined `proto::ingest` frames).
    pub ingest_addr: SocketAddr,
    /// Edge links (`proto::link` frames).
    pub link_addr: SocketAddr,
    /// HTTP API (push, healthz, metrics).
    pub http_addr: SocketAddr,
    /// Required as `Authorization: Bearer <admin_key>` by `POST /admin/reload`. Empty: reload
    /// over HTTP answers only when `http_addr` is loopback (SIGHUP always works).
    pub admin_key: String,
    /// API keys of business callers. Empty: every push is refused as unauthorized.
    pub api_keys: Vec<ApiKey>,
    /// Pushes per second allowed into one room, area or the global scope, summed over all keys
    /// (token bucket refill; the bucket holds `room_burst`); 0 = unlimited.
    pub room_rate_per_s: f64,
    /// Size of the per-room token bucket.
    pub room_burst: f64,
    /// Most rooms the per-room rate limiter tracks at once, per shard (each shard limits the
    /// rooms it owns; idle full buckets are forgotten first).
    pub rooms_max: usize,
    /// Largest message body accepted, bytes.
    pub message_bytes_max: u32,
    /// Messages each shard queues per priority between ingest and aggregation; past it pushes
    /// are refused as `Overloaded`. 0 refuses every push (a maintenance switch).
    pub queue_messages_max: usize,
    /// Aggregation window: a scope flushes at most once per window unless a batch fills up;
    /// a quiet scope flushes at once. 0 = one batch per message.
    pub batch_window_ms: u64,
    /// A batch flushes once its message bodies reach this many bytes.
    pub batch_bytes_max: usize,
    /// A batch flushes once it holds this many messages.
    pub batch_messages_max: usize,
    /// Brotli quality 0..=11 for batches whose inner packets take at least
    /// `brotli_small_bytes_max` bytes (see docs/operations-broker.md for the measurement).
    pub brotli_quality: u32,
    /// Brotli quality for smaller batches (one or two messages: quiet rooms), where the
    /// encoder's fixed set-up cost dominates and a high quality buys little.
    pub brotli_quality_small: u32,
    /// Inner bytes below which a batch counts as small.
    pub brotli_small_bytes_max: usize,
    /// Largest brotli window, log2 (10..=24); each batch uses the smallest window that holds it.
    pub brotli_lgwin: u32,
    /// Bytes queued towards one edge link before the link is cut (a slow edge never blocks a shard).
    pub link_queue_bytes_max: usize,
    /// Largest link frame accepted from an edge.
    pub link_frame_bytes_max: u32,
    /// An edge must finish its link handshake (Hello, and the key proof when `link_keys` is
    /// set) this soon after connecting.
    pub link_hello_ms_max: u64,
    /// Edge link handshakes in progress at once; more connections are closed at once.
    pub link_handshakes_max: usize,
    /// Edge link handshakes in progress at once from one peer address.
    pub link_handshakes_per_addr_max: usize,
    /// Link keys, `"node_id:secret"` (the key that node must prove it holds) or `"*:secret"`
    /// (any node id). Empty: links are not authenticated and only loopback peers may link.
    /// Secrets: 32 bytes or more (see docs/protocol-link-ingest.md).
    pub link_keys: Vec<String>,
    /// The broker pings each link this often.
    pub link_ping_ms: u64,
    /// A link silent this long is dead and cut.
    pub link_dead_ms: u64,
    /// Fleet-wide online counts go back to edges this often.
    pub counts_interval_ms: u64,
    /// Rooms that get `{"cmd":"ONLINE_RANK_COUNT","data":{"count":N}}` pushed every
    /// `count_push_ms` when their fleet-wide count changed.
    pub count_push_rooms: Vec<u64>,
    /// Every room gets the count pushes (not only `count_push_rooms`).
    pub count_push_all_rooms: bool,
    /// How often count pushes are considered; 0 turns them off.
    pub count_push_ms: u64,
    /// A viewer whose last connection to a room ends and who comes back from the same device
    /// within this long makes no exit/enter pair (presence flap compensation).
    pub presence_grace_ms: u64,
    /// An edge's presence records end (with exits) this long after its last link heartbeat or
    /// report; 0 means `link_dead_ms + link_ping_ms`. Never below `link_dead_ms`: a lease that
    /// ended first would end the records of an edge whose link is still deemed alive (and its
    /// next ping would then cut the link), so the lease would be a second, shorter link timeout.
    pub presence_lease_ms: u64,
    /// User and device batches go only to the edges presence says hold that user or device
    /// (and to edges that do not report presence). A connection younger than one presence
    /// report is covered by the catch-up (`presence_catchup_ms`).
    pub route_by_presence: bool,
    /// With `route_by_presence`: a user or device batch kept from an edge is held this long,
    /// and sent to that edge if it reports an enter for the user or device meanwhile (a
    /// connection that authenticated before the broker heard of it). Must exceed the edges'
    /// `presence_batch_ms` plus a link round trip; 0 turns the catch-up off.
    pub presence_catchup_ms: u64,
    /// Body bytes the catch-up holds at most; past it the oldest batch is dropped and counted.
    pub presence_catchup_bytes_max: usize,
    /// Connections presence holds fleet-wide; enters past it are refused and counted.
    pub presence_records_max: usize,
    /// Edge nodes with a presence lease at once.
    pub presence_edges_max: usize,
    /// Exits held for flap compensation at once; past it exits are logged at once.
    pub presence_pending_exits_max: usize,
    /// Presence events kept for readers that resume (`/v1/presence/events?after=`).
    pub presence_events_max: usize,
    /// Presence event streams (SSE and ingest subscriptions) open at once; more are refused.
    pub presence_streams_max: usize,
    /// A presence stream whose consumer falls this many events behind the newest (not counting
    /// the backlog it asked for) is cut and counted: a stalled consumer costs a bounded amount.
    pub presence_stream_lag_events_max: u64,
    /// Largest ingest frame accepted.
    pub ingest_frame_bytes_max: u32,
    /// Ingest connections open at once per shard; more are closed at once.
    pub ingest_connections_max: usize,
    /// An ingest connection must authenticate this soon after connecting.
    pub ingest_auth_ms_max: u64,
    /// Failed `Auth` frames one ingest connection may send; the last is answered, then the
    /// connection is closed.
    pub ingest_auth_failures_max: u32,
    /// Failed `Auth` frames one peer address may send per minute; past it every `Auth` from
    /// that address is refused unchecked until the minute is over.
    pub ingest_auth_failures_per_addr_max: u32,
    /// Largest HTTP request body, bytes (a `/v1/push/batch` request holds many messages).
    pub http_body_bytes_max: usize,
    /// After a start, each shard holds accepted pushes (does not route them) for at most this
    /// long, or until `STARTUP_SETTLE_MS` after its first edge link, so pushes accepted before the
    /// edges re-linked and re-sent interest are routed instead of lost as unrouted. Pushes past
    /// the queue bound meanwhile are refused `overloaded`. 0 = off.
    pub startup_hold_ms: u64,
    /// Resume history: batches kept per room (issue 9).
    pub history_batches_max: usize,
    /// Resume history: a batch older than this is dropped.
    pub history_ms_max: u64,
    /// Resume history: bytes of all held batches of one broker shard together.
    pub history_bytes_max: usize,
    /// High reach: how long a message without `ttl_ms` is kept (resent, or waiting for its
    /// user to connect), ms.
    pub reach_ttl_ms_default: u64,
    /// High reach: the cap on a push's `ttl_ms`.
    pub reach_ttl_ms_max: u64,
    /// High reach: the wait for a client ACK before a resend, ms.
    pub reach_retry_ms: u64,
    /// High reach: resends after the first try (the `n` of `1-(1-r)^(n+1)`).
    pub reach_retries: u32,
    /// High reach: messages in flight or waiting per user or device; past it a push to that
    /// target is refused `overloaded` (the oldest are never dropped for newer ones).
    pub reach_target_entries_max: usize,
    /// High reach: body bytes in flight or waiting per user or device.
    pub reach_target_bytes_max: usize,
    /// High reach: messages in flight or waiting per broker.
    pub reach_entries_max: usize,
    /// High reach: body bytes in flight or waiting per broker.
    pub reach_bytes_max: usize,
    /// Directory of the durable high-reach log (`--data-dir`): an accepted high-reach push is
    /// synced there before it is answered and reloaded after a restart. `"auto"` (default):
    /// `<state dir>/broker-<node_id>-<ingest port>` (state dir: `$STATE_DIRECTORY`,
    /// `$XDG_STATE_HOME/barrage`, `~/.local/state/barrage`), memory only in cluster mode
    /// (JetStream keeps accepted pushes) or on an ephemeral ingest port (nothing could find the
    /// directory again). `"none"`: memory only (a restart loses the messages in flight).
    pub data_dir: String,
    /// How long an idempotency key is remembered: a push retried with the same key within it
    /// is answered with the first msg id and not delivered twice.
    pub idempotency_window_ms: u64,
    /// Idempotency keys remembered per shard; when full of live keys a keyed push is refused
    /// `overloaded` (retry later) rather than accepted unprotected.
    pub idempotency_keys_max: usize,
    /// Most messages in one `/v1/push/batch` request.
    pub http_batch_messages_max: usize,
    /// HTTP admission: deadlines, per-address cap, reserved slots (`[http]`, see `net::http::Limits`).
    pub http: net::http::Limits,
    /// Cluster mode: the NATS servers of the JetStream backbone, `nats://host:port[,...]`
    /// (`--backbone`). Empty (the default): embedded mode, no NATS at all. With it set, every
    /// accepted push is stored in JetStream before it is answered, and `node_id` must be unique
    /// among the brokers (see docs/operations.md, "Cluster mode").
    pub backbone: String,
    /// Cluster mode settings (`[cluster]`: stream, partitions, replicas, leases, acks); read
    /// only when `backbone` is set.
    pub cluster: backbone::Config,
    /// This broker's region (control lists it to the edges of the same region).
    pub region: String,
    /// Control's HTTP address (`host:port`): when set, the broker heartbeats
    /// `POST /v1/brokers/heartbeat` there every `control_heartbeat_ms`, and edges with
    /// `brokers_from_control` link to it without a static `broker_addrs` (cluster mode).
    /// Several control replicas, comma-separated: the broker heartbeats each.
    pub control_addr: Option<String>,
    /// Heartbeat interval to control (control forgets a broker silent for its `edge_ttl_ms`).
    pub control_heartbeat_ms: u64,
    /// Control's `edge_key`, sent as the heartbeat's bearer (empty: control must see a
    /// loopback peer).
    pub control_key: String,
    /// The host edges and ingest clients reach this broker at, as told to control; empty:
    /// the IP `link_addr` is bound to (127.0.0.1 when that is the unspecified address).
    pub advertise_host: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: "broker-1".to_string(),
            shards: 0,
            pin: net::runtime::Pin::Cores,
            log_level: String::new(),
            reuse_port_across_processes: false,
            driver: net::runtime::Driver::Auto,
            ingest_addr: SocketAddr::from(([127, 0, 0, 1], 7400)),
            link_addr: SocketAddr::from(([127, 0, 0, 1], 7401)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 7480)),
            admin_key: String::new(),
            api_keys: Vec::new(),
            room_rate_per_s: 2_000.0,
            room_burst: 4_000.0,
            rooms_max: 1_000_000,
            message_bytes_max: proto::limits::MESSAGE_BYTES_MAX,
            queue_messages_max: 65_536,
            batch_window_ms: 50,
            batch_bytes_max: 16 * 1024,
            batch_messages_max: 40,
            brotli_quality: 5,
            brotli_quality_small: 2,
            brotli_small_bytes_max: 2048,
            brotli_lgwin: 15,
            link_queue_bytes_max: 32 * 1024 * 1024,
            link_frame_bytes_max: proto::limits::LINK_FRAME_BYTES_MAX,
            link_hello_ms_max: 2_000,
            link_handshakes_max: 64,
            link_handshakes_per_addr_max: 4,
            link_keys: Vec::new(),
            link_ping_ms: 5_000,
            link_dead_ms: 15_000,
            counts_interval_ms: 1_000,
            route_by_presence: true,
            presence_catchup_ms: crate::catchup::PRESENCE_CATCHUP_MS,
            presence_catchup_bytes_max: crate::catchup::PRESENCE_CATCHUP_BYTES_MAX,
            count_push_rooms: Vec::new(),
            count_push_all_rooms: false,
            count_push_ms: crate::online::COUNT_PUSH_MS,
            presence_grace_ms: crate::presence::PRESENCE_GRACE_MS,
            presence_lease_ms: 0,
            presence_records_max: crate::presence::PRESENCE_RECORDS_MAX,
            presence_edges_max: crate::presence::PRESENCE_EDGES_MAX,
            presence_pending_exits_max: crate::presence::PRESENCE_PENDING_EXITS_MAX,
            presence_events_max: crate::presence::PRESENCE_EVENTS_MAX,
            presence_streams_max: crate::roster::PRESENCE_STREAMS_MAX,
            presence_stream_lag_events_max: crate::roster::PRESENCE_STREAM_LAG_EVENTS_MAX,
            ingest_frame_bytes_max: proto::limits::INGEST_FRAME_BYTES_MAX,
            ingest_connections_max: 4_096,
            ingest_auth_ms_max: 5_000,
            ingest_auth_failures_max: 3,
            ingest_auth_failures_per_addr_max: 20,
            http_body_bytes_max: 4 * 1024 * 1024,
            http_batch_messages_max: 1_000,
            idempotency_window_ms: 60_000,
            startup_hold_ms: 0,
            history_batches_max: crate::history::HISTORY_BATCHES_MAX,
            history_ms_max: crate::history::HISTORY_MS_MAX,
            history_bytes_max: crate::history::HISTORY_BYTES_MAX,
            idempotency_keys_max: 100_000,
            reach_ttl_ms_default: crate::reach::REACH_TTL_MS_DEFAULT,
            reach_ttl_ms_max: crate::reach::REACH_TTL_MS_MAX,
            reach_retry_ms: crate::reach::REACH_RETRY_MS,
            reach_retries: crate::reach::REACH_RETRIES,
            reach_target_entries_max: crate::reach::REACH_TARGET_ENTRIES_MAX,
            reach_target_bytes_max: crate::reach::REACH_TARGET_BYTES_MAX,
            reach_entries_max: crate::reach::REACH_ENTRIES_MAX,
            reach_bytes_max: crate::reach::REACH_BYTES_MAX,
            data_dir: DATA_DIR_AUTO.to_string(),
            http: net::http::Limits::default(),
            backbone: String::new(),
            cluster: backbone::Config::default(),
            region: "local".into(),
            control_addr: None,
            control_heartbeat_ms: 1_000,
            control_key: String::new(),
            advertise_host: String::new(),
        }
    }
}

impl Config {
    /// Reads and checks a TOML config file (defaults below it, no environment).
    /// `barrage broker` loads through [`net::config::load`] with every layer.
    pub fn from_toml_file(path: &Path) -> Result<Config, BrokerError> {
        net::config::load(&net::config::Sources::file(path))
            .map_err(|e| BrokerError::Config(e.to_string()))
    }

    /// Parses and checks TOML text.
    pub fn from_toml_str(text: &str) -> Result<Config, BrokerError> {
        net::config::load(&net::config::Sources::text(text))
            .map_err(|e| BrokerError::Config(e.to_string()))
    }

    /// Checks values that would make the broker misbehave rather than just be slow.
    pub fn validate(&self) -> Result<(), BrokerError> {
        let bad = |m: &str| Err(BrokerError::Config(m.to_string()));
        if self.brotli_quality > 11 || self.brotli_quality_small > 11 {
            return bad("brotli_quality and brotli_quality_small must be 0..=11");
        }
        if !(10..=24).contains(&self.brotli_lgwin) {
            return bad("brotli_lgwin must be 10..=24");
        }
        if self.reach_retry_ms == 0 || self.reach_ttl_ms_default == 0 || self.reach_ttl_ms_max == 0
        {
            return bad(
                "reach_retry_ms, reach_ttl_ms_default and reach_ttl_ms_max must be at least 1",
            );
        }
        if self.batch_messages_max == 0 || self.batch_bytes_max == 0 {
            return bad("batch_messages_max and batch_bytes_max must be at least 1");
        }
        if self.message_bytes_max == 0 {
            return bad("message_bytes_max must be at least 1");
        }
        if self.shards > u16::MAX as usize {
            return bad("shards must fit in u16");
        }
        for k in &self.api_keys {
            if k.key.is_empty() {
                return bad("api_keys: empty key");
            }
            if k.rate_per_s < 0.0
                || k.burst < 0.0
                || !k.rate_per_s.is_finite()
                || !k.burst.is_finite()
            {
                return bad("api_keys: rate_per_s and burst must be finite and >= 0");
            }
        }
        if self.room_rate_per_s < 0.0
            || self.room_burst < 0.0
            || !self.room_rate_per_s.is_finite()
            || !self.room_burst.is_finite()
        {
            return bad("room_rate_per_s and room_burst must be finite and >= 0");
        }
        if self.link_ping_ms == 0 || self.link_dead_ms <= self.link_ping_ms {
            return bad("link_dead_ms must be above link_ping_ms > 0");
        }
        if self.presence_lease_ms != 0 && self.presence_lease_ms < self.link_dead_ms {
            return bad(
                "presence_lease_ms must be 0 (link_dead_ms + link_ping_ms) or at least link_dead_ms: \
                 a shorter lease ends a live edge's presence before its link is declared dead",
            );
        }
        self.data_dir_in(std::path::Path::new("/"))?;
        if self.counts_interval_ms == 0 {
            return bad("counts_interval_ms must be at least 1");
        }
        if self.presence_events_max == 0 || self.presence_edges_max == 0 {
            return bad("presence_events_max and presence_edges_max must be at least 1");
        }
        if self.cluster_mode() {
            // The backbone reads the region from the broker's own `region` field.
            let cluster = backbone::Config {
                region: self.region.clone(),
                ..self.cluster.clone()
            };
            cluster
                .check()
                .map_err(|m| BrokerError::Config(format!("cluster: {m}")))?;
        }
        Ok(())
    }

    /// Refuses weak secrets (API keys, link keys) when any listener is reachable from outside
    /// the host, warns about them when all are on loopback (see `net::secret`). Returns the
    /// parsed link key table.
    pub fn check_secrets(&self) -> Result<proto::link::handshake::KeyTable, BrokerError> {
        let addrs = [
            self.ingest_addr.to_string(),
            self.link_addr.to_string(),
            self.http_addr.to_string(),
        ];
        let public = net::secret::any_public(addrs.iter().map(String::as_str));
        let judge = |what: &str, secret: &str| {
            net::secret::require_strong(public, what, net::secret::check(secret))
                .map_err(BrokerError::Config)
        };
        for (i, k) in self.api_keys.iter().enumerate() {
            judge(&format!("api_keys[{i}]"), &k.key)?;
        }
        if !self.admin_key.is_empty() {
            judge("admin_key", &self.admin_key)?;
        }
        for e in &self.link_keys {
            let (node, secret) = e.split_once(':').unwrap_or(("?", ""));
            judge(&format!("link_keys entry for {node:?}"), secret)?;
        }
        if !self.http_addr.ip().to_canonical().is_loopback() {
            tracing::warn!(http_addr = %self.http_addr, "the HTTP API is not on loopback: /metrics and /healthz are readable by anyone who reaches it");
        }
        if self.link_keys.is_empty() && !self.link_addr.ip().to_canonical().is_loopback() {
            tracing::warn!(link_addr = %self.link_addr, "link_keys is empty: edge links are unauthenticated and only loopback peers may link");
        }
        proto::link::handshake::KeyTable::parse(&self.link_keys).map_err(BrokerError::Config)
    }

    /// True when `backbone` names NATS servers (cluster mode).
    pub fn cluster_mode(&self) -> bool {
        !self.backbone.trim().is_empty()
    }

    /// The high-reach tracker's limits from the `reach_*` fields.
    pub fn reach_limits(&self) -> crate::reach::Limits {
        crate::reach::Limits {
            ttl_ms_default: self.reach_ttl_ms_default,
            ttl_ms_max: self.reach_ttl_ms_max,
            retry_ms: self.reach_retry_ms,
            retries: self.reach_retries,
            target_entries_max: self.reach_target_entries_max,
            target_bytes_max: self.reach_target_bytes_max,
            entries_max: self.reach_entries_max,
            bytes_max: self.reach_bytes_max,
        }
    }

    /// The shard count actually used (`shards`, or the core count when 0).
    pub fn shard_count(&self) -> usize {
        if self.shards == 0 {
            net::runtime::cores().clamp(1, u16::MAX as usize)
        } else {
            self.shards
        }
    }
}

impl net::config::Layered for Config {
    const ROLE: &'static str = "broker";

    fn check(&self) -> Result<(), String> {
        self.validate().map_err(|e| match e {
            BrokerError::Config(m) => m,
            other => other.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_roundtrip() {
        let c = Config::default();
        c.validate().unwrap();
        let text = toml::to_string(&c).unwrap();
        let back = Config::from_toml_str(&text).unwrap();
        assert_eq!(back.batch_window_ms, 50);
        assert_eq!(back.ingest_addr, c.ingest_addr);
    }

    #[test]
    fn the_default_data_dir_is_per_node_and_port_and_never_shared_by_ephemeral_ports() {
        let state = std::path::Path::new("/state");
        let mut c = Config::default();
        assert_eq!(
            c.data_dir_in(state).unwrap(),
            Some(state.join("broker-broker-1-7400"))
        );
        c.node_id = "../b 2".into();
        c.ingest_addr.set_port(7500);
        assert_eq!(
            c.data_dir_in(state).unwrap(),
            Some(state.join("broker-.._b_2-7500"))
        );
        c.ingest_addr.set_port(0);
        assert_eq!(c.data_dir_in(state).unwrap(), None);
        c.ingest_addr.set_port(7500);
        c.backbone = "nats://127.0.0.1:4222".into();
        assert_eq!(c.data_dir_in(state).unwrap(), None, "cluster: JetStream");
        c.data_dir = "/d".into();
        assert_eq!(c.data_dir_in(state).unwrap(), Some("/d".into()));
        c.data_dir = "none".into();
        assert_eq!(c.data_dir_in(state).unwrap(), None);
        c.data_dir = "".into();
        assert!(c.validate().is_err());
    }

    #[test]
    fn a_presence_lease_shorter_than_the_link_timeout_is_refused() {
        let mut c = Config::default();
        assert_eq!(c.presence_lease_ms(), c.link_dead_ms + c.link_ping_ms);
        c.presence_lease_ms = c.link_dead_ms - 1;
        assert!(c.validate().is_err());
        c.presence_lease_ms = c.link_dead_ms;
        c.validate().unwrap();
    }

    #[test]
    fn parses_keys_and_rejects_unknown_fields() {
        let c = Config::from_toml_str(
            r#"
            shards = 2
            [[api_keys]]
            key = "k1"
            scopes = ["room", "area"]
            rate_per_s = 5
            burst = 10
            [[api_keys]]
            key = "k2"
            "#,
        )
        .unwrap();
        assert_eq!(c.api_keys.len(), 2);
        assert_eq!(c.api_keys[0].scopes, vec![ScopeKind::Room, ScopeKind::Area]);
        assert_eq!(c.api_keys[1].scopes.len(), 5);
        assert!(Config::from_toml_str("bogus = 1").is_err());
        assert!(Config::from_toml_str("[[api_keys]]\nkey = \"a\"\nratee = 1").is_err());
        assert!(Config::from_toml_str("brotli_quality = 12").is_err());
    }
}
