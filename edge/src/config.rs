//! The edge's configuration: every field has a default and a doc line; unknown fields are an
//! error so a typo in `edge.toml` fails loudly instead of silently keeping a default.

use crate::EdgeError;
use net::runtime::{Driver, Pin};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Edge configuration (`barrage edge --config edge.toml`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Shard (runtime thread) count; 0 means one per core.
    pub shards: usize,
    /// Client TCP listen address (Bilibili packets over raw TCP).
    pub tcp_addr: String,
    /// Client WebSocket listen address.
    pub ws_addr: String,
    /// Client WebSocket-over-TLS (WSS) listen address; served only when `tls_cert_path` and
    /// `tls_key_path` are set.
    pub wss_addr: String,
    /// Client TLS-over-TCP listen address (Bilibili packets in TLS, for app clients); empty (the
    /// default) turns it off. Needs `tls_cert_path`.
    pub tls_tcp_addr: String,
    /// PEM certificate chain for WSS; empty turns WSS off. Reloaded by `POST /admin/reload-tls`.
    pub tls_cert_path: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `tls_cert_path`.
    pub tls_key_path: String,
    /// TLS handshakes in flight per shard; past it new WSS clients are closed at accept.
    pub tls_handshakes_max: usize,
    /// Client UDP address (docs/protocol-udp.md), one `SO_REUSEPORT` socket per shard; empty
    /// (the library default) turns UDP off. 2246 is its port: `barrage up` and
    /// `examples/edge.toml` serve `0.0.0.0:2246` / `127.0.0.1:2246`.
    pub udp_addr: String,
    /// Largest datagram either side sends (1200 fits the smallest IPv6 path MTU, so nothing
    /// fragments); a client datagram above it is dropped (`oversized`).
    pub udp_payload_bytes_max: usize,
    /// Datagrams a second one source IP may send to a shard (bursts of twice that), checked
    /// before anything is parsed or allocated; 0 turns the limit off.
    pub udp_datagrams_per_addr_per_s: u32,
    /// The only WebSocket path served; other paths get 404.
    pub ws_path: String,
    /// Admin HTTP address (`/healthz`, `/metrics`, `/admin/drain`).
    pub admin_addr: String,
    /// Broker edge-link addresses (`host:port`); empty runs the edge without a broker.
    pub broker_addrs: Vec<String>,
    /// Control HTTP address for registration heartbeats; `None` disables them. Several
    /// replicas, comma-separated (`host:port,host:port`): the edge heartbeats each.
    pub control_addr: Option<String>,
    /// Interval between heartbeats to control.
    pub control_heartbeat_ms: u64,
    /// Cluster mode: link to the live brokers control lists in its heartbeat answers
    /// (brokers heartbeat control), following joins and departures; `broker_addrs` are only
    /// the links until control lists any.
    pub brokers_from_control: bool,
    /// This node's id (in link HELLO and control heartbeats).
    pub node_id: String,
    /// This node's region (in link HELLO and control heartbeats).
    pub region: String,
    /// Host name clients should connect to (sent to control).
    pub public_host: String,
    /// Token verification keys, `"ID:SECRET,ID:SECRET"` (proto::token::KeySet::parse).
    pub token_keys: String,
    /// Auth (op 7) must arrive this long after connect.
    pub auth_ms_max: u64,
    /// A connection that sends nothing for this long is dropped.
    pub heartbeat_timeout_ms: u64,
    /// A WebSocket upgrade head must be complete this long after connect (slowloris guard).
    pub handshake_ms_max: u64,
    /// Largest client packet (header + body).
    pub frame_bytes_max: u32,
    /// Largest op 7 auth body.
    pub auth_bytes_max: u32,
    /// Largest WebSocket message from a client (after fragment reassembly).
    pub ws_message_bytes_max: usize,
    /// Largest WebSocket upgrade request head.
    pub ws_handshake_bytes_max: usize,
    /// Per-connection send queue bound; past it low-priority batches are dropped.
    pub send_queue_bytes_max: usize,
    /// A connection whose queue stays over the bound this long is closed.
    pub stuck_ms_max: u64,
    /// Resume (DESIGN §11): how long the broker's answer may take; past it the client gets
    /// a `BARRAGE_SYNC` with `recovered:false` and its held live batches.
    pub resume_ms_max: u64,
    /// Resume: live batches held for one resuming connection; past it the resume falls back
    /// as on a timeout.
    pub resume_hold_bytes_max: usize,
    /// Resume: answers outstanding per shard; a resume past it falls back at once.
    pub resumes_pending_max: usize,
    /// Client connections the node holds at most; 0 means the fd limit minus the reserve kept
    /// for links, admin and control. Past it new clients are refused with a reconnect hint.
    pub conns_max: u64,
    /// Client connections per remote address (node-wide, enforced per shard as
    /// `ceil(conns_per_addr_max / shards)`); 0 disables the cap (NAT gateways share addresses).
    pub conns_per_addr_max: u32,
    /// Connections per shard that have not authenticated yet; more are refused at accept.
    pub pending_handshakes_max: usize,
    /// Distinct rooms per shard; an auth into a new room past this is refused.
    pub rooms_max: usize,
    /// Read buffer for an authenticated TLS connection (clients only send tiny packets
    /// upstream). Plain TCP and WebSocket connections share the shard's one read buffer.
    pub read_buffer_bytes: usize,
    /// Read buffer of a TLS connection while the handshakes and auth are read.
    pub handshake_read_buffer_bytes: usize,
    /// Timer wheel resolution.
    pub timer_tick_ms: u64,
    /// Entries per cross-shard ring (one ring per ordered pair of shards).
    pub ring_entries: usize,
    /// Largest broker link frame accepted.
    pub link_frame_bytes_max: u32,
    /// Link PING interval.
    pub link_ping_ms: u64,
    /// A link silent this long is dead and reconnected.
    pub link_dead_ms: u64,
    /// Reconnect backoff floor.
    pub link_backoff_ms_min: u64,
    /// Reconnect backoff cap.
    pub link_backoff_ms_max: u64,
    /// Interval of local viewer COUNTS sent to the brokers.
    pub counts_interval_ms: u64,
    /// Report every connection's enter and exit to the brokers (presence, docs/presence.md).
    pub presence: bool,
    /// Presence enters and exits are sent to the brokers in one batch this often.
    pub presence_batch_ms: u64,
    /// While draining, connections closed per second (across the node).
    pub drain_close_per_s: u64,
    /// A drain (SIGTERM) ends this long after it started at the latest, closing whoever is left;
    /// keep it under the unit's `TimeoutStopSec` (120 s) so systemd never has to SIGKILL.
    pub drain_ms_max: u64,
    /// Listen backlog.
    pub backlog: i32,
    /// Runtime driver; `BARRAGE_DRIVER=uring|legacy|auto` overrides.
    pub driver: Driver,
    /// Under the io_uring driver, write plain (TCP and WebSocket) client sockets through one
    /// io_uring per shard: one `WRITEV` entry per write, a fan-out round's writes submitted
    /// together. `false`, the epoll driver, or a ring that cannot be set up: one `writev` call
    /// per write. Each shard logs which it uses. Off by default until it is measured ahead of
    /// epoll per CPU-second (docs/benchmarks.md, "Edge data path by readiness").
    pub uring_client_writes: bool,
    /// Log filter in `RUST_LOG` syntax (`info`, `warn,edge=debug`); empty keeps `RUST_LOG` (or
    /// `info`). A reload (SIGHUP, `POST /admin/reload`) applies a new value.
    pub log_level: String,
    /// Where shard threads run: `true` (shard i on CPU i mod cores), `false`, or the CPUs shards
    /// may use (`[2, 3]` or `"2-3"`), leaving the others to the NIC's interrupts.
    pub pin: Pin,
    /// Let another process bind the same client ports (`SO_REUSEPORT` across processes). Off:
    /// a port another process holds fails with "address in use". On only for a zero-downtime
    /// restart, where the new edge binds while the old one drains (docs/operations.md).
    pub reuse_port_across_processes: bool,
    /// The key this node proves it holds on its broker links (the broker's `link_keys` entry
    /// for this `node_id`, or its `*` entry). Empty: links are not authenticated, which a
    /// broker accepts from loopback only.
    pub link_key: String,
    /// Sent as `Authorization: Bearer <edge_key>` with control heartbeats (control's `edge_key`).
    pub edge_key: String,
    /// Required as `Authorization: Bearer <admin_key>` by mutating admin endpoints
    /// (`POST /admin/drain`). Empty: those endpoints answer only when `admin_addr` is loopback.
    pub admin_key: String,
    /// Admin HTTP admission: deadlines, per-address cap, reserved slots (`[http]`, see
    /// `net::http::Limits`).
    pub http: net::http::Limits,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            shards: net::runtime::cores(),
            tcp_addr: "0.0.0.0:2243".into(),
            ws_addr: "0.0.0.0:2244".into(),
            wss_addr: "0.0.0.0:2245".into(),
            tls_tcp_addr: String::new(),
            tls_cert_path: String::new(),
            tls_key_path: String::new(),
            tls_handshakes_max: 256,
            udp_addr: String::new(),
            udp_payload_bytes_max: proto::udp::UDP_PAYLOAD_BYTES_MAX,
            udp_datagrams_per_addr_per_s: 200,
            ws_path: "/sub".into(),
            admin_addr: "127.0.0.1:9243".into(),
            broker_addrs: Vec::new(),
            control_addr: None,
            control_heartbeat_ms: 2_000,
            brokers_from_control: false,
            node_id: "edge-1".into(),
            region: "local".into(),
            public_host: "127.0.0.1".into(),
            token_keys: String::new(),
            auth_ms_max: proto::limits::AUTH_MS_MAX,
            heartbeat_timeout_ms: proto::limits::HEARTBEAT_TIMEOUT_MS,
            handshake_ms_max: 3_000,
            frame_bytes_max: proto::limits::FRAME_BYTES_MAX,
            auth_bytes_max: proto::limits::AUTH_BYTES_MAX,
            ws_message_bytes_max: proto::limits::WS_MESSAGE_BYTES_MAX,
            ws_handshake_bytes_max: proto::limits::WS_HANDSHAKE_BYTES_MAX,
            send_queue_bytes_max: 256 * 1024,
            stuck_ms_max: 10_000,
            resume_ms_max: crate::resume::RESUME_MS_MAX,
            resume_hold_bytes_max: crate::resume::RESUME_HOLD_BYTES_MAX,
            resumes_pending_max: crate::resume::RESUMES_PENDING_MAX,
            conns_max: 0,
            conns_per_addr_max: 0,
            pending_handshakes_max: 4_096,
            rooms_max: 100_000,
            read_buffer_bytes: 32,
            handshake_read_buffer_bytes: 1_024,
            timer_tick_ms: 50,
            ring_entries: 8_192,
            link_frame_bytes_max: proto::limits::LINK_FRAME_BYTES_MAX,
            link_ping_ms: 5_000,
            link_dead_ms: 15_000,
            link_backoff_ms_min: 100,
            link_backoff_ms_max: 5_000,
            counts_interval_ms: 1_000,
            presence: true,
            presence_batch_ms: crate::presence::PRESENCE_BATCH_MS,
            drain_close_per_s: 2_000,
            drain_ms_max: 110_000,
            backlog: 4_096,
            driver: Driver::Auto,
            uring_client_writes: false,
            pin: Pin::Cores,
            log_level: String::new(),
            reuse_port_across_processes: false,
            link_key: String::new(),
            edge_key: String::new(),
            admin_key: String::new(),
            http: net::http::Limits::default(),
        }
    }
}

impl Config {
    /// Refuses weak secrets when a listener is reachable from outside the host, warns about
    /// them on loopback (what `start` checks; `barrage config check` runs it too).
    pub fn check_secrets(&self) -> Result<(), crate::EdgeError> {
        crate::admin::check_secrets(self)
    }

    /// Reads and checks a TOML file (defaults below it, no environment); unknown fields are an
    /// error. `barrage edge` loads through [`net::config::load`] with every layer.
    pub fn from_toml_file(path: &Path) -> Result<Config, EdgeError> {
        net::config::load(&net::config::Sources::file(path))
            .map_err(|e| EdgeError::Config(e.to_string()))
    }

    /// Parses and checks TOML text; unknown fields are an error.
    pub fn from_toml_str(text: &str) -> Result<Config, EdgeError> {
        net::config::load(&net::config::Sources::text(text))
            .map_err(|e| EdgeError::Config(e.to_string()))
    }

    /// Whether this edge links to brokers at all (a static list, or control's in cluster mode).
    pub fn links_brokers(&self) -> bool {
        !self.broker_addrs.is_empty() || (self.brokers_from_control && self.control_addr.is_some())
    }

    /// Shard count with 0 resolved to the core count.
    pub fn shard_count(&self) -> usize {
        if self.shards == 0 {
            net::runtime::cores()
        } else {
            self.shards
        }
    }

    /// Checks values that would make the edge misbehave rather than fail.
    pub fn validate(&self) -> Result<(), EdgeError> {
        let bad = |m: &str| Err(EdgeError::Config(m.to_string()));
        if self.shard_count() > 64 {
            return bad("shards must be at most 64");
        }
        if self.timer_tick_ms == 0 {
            return bad("timer_tick_ms must be > 0");
        }
        if self.read_buffer_bytes < 16 || self.handshake_read_buffer_bytes < 16 {
            return bad("read buffers must be at least 16 bytes");
        }
        if self.ring_entries < 16 {
            return bad("ring_entries must be at least 16");
        }
        if self.link_backoff_ms_min == 0 || self.link_backoff_ms_max < self.link_backoff_ms_min {
            return bad("link backoff must satisfy 0 < min <= max");
        }
        if self.udp_payload_bytes_max < 256 || self.udp_payload_bytes_max > 65_507 {
            return bad("udp_payload_bytes_max must be within 256..=65507");
        }
        if self.send_queue_bytes_max == 0 {
            return bad("send_queue_bytes_max must be > 0");
        }
        Ok(())
    }
}

impl net::config::Layered for Config {
    const ROLE: &'static str = "edge";

    fn check(&self) -> Result<(), String> {
        self.validate().map_err(|e| match e {
            EdgeError::Config(m) => m,
            other => other.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_roundtrip_through_toml() {
        let c = Config::default();
        let text = toml::to_string(&c).unwrap();
        let back = Config::from_toml_str(&text).unwrap();
        assert_eq!(back.tcp_addr, "0.0.0.0:2243");
        assert_eq!(back.ws_addr, "0.0.0.0:2244");
        assert_eq!(back.admin_addr, "127.0.0.1:9243");
        assert_eq!(back.auth_ms_max, 5_000);
        assert_eq!(back.heartbeat_timeout_ms, 60_000);
        back.validate().unwrap();
    }

    #[test]
    fn unknown_field_is_an_error() {
        assert!(Config::from_toml_str("shards = 2\nshardz = 3\n").is_err());
        let c = Config::from_toml_str("shards = 2\ndriver = \"legacy\"\n").unwrap();
        assert_eq!(c.shards, 2);
        assert_eq!(c.driver, Driver::Legacy);
    }
}
