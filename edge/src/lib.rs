//! # edge: the access layer
//!
//! Holds viewers' connections (TCP and WebSocket, Bilibili live packets), authenticates them
//! locally with the shared token keys, answers heartbeats, and writes the broker's batches to
//! every viewer of a room with shared bytes. One shard (monoio runtime, io_uring or epoll) per
//! core; a connection lives and dies on the shard that accepted it.
//!
//! # Layout
//! - [`config`]: `Config` (every field defaulted and documented; unknown fields are errors).
//! - [`node`]: what the shards of a node share (`Node`, `Msg`, the rings).
//! - [`core`]: the sans-io shard core: admission, sessions, seating, queues, timers, drain,
//!   fan-out; inputs with `now`, outputs polled. Every decision a shard makes is here.
//! - [`resume`]: sans-io resume after reconnect: hold a resuming connection's live batches,
//!   then replay, `BARRAGE_SYNC`, held batches (or a fallback sync on timeout).
//! - [`session`]: sans-io per-connection state machine (handshake -> auth -> live -> closed).
//! - [`wheel`]: sans-io hashed timing wheel (auth, handshake, heartbeat, stuck deadlines).
//! - [`index`]: per-shard room -> members (lanes per encoding and transport), area -> rooms.
//! - [`interest`]: node-wide "which shards want room R / area A", owned by the link shard.
//! - [`fanout`]: which members of a shard get a batch (a pure function of the indexes) and
//!   the shared bytes per transport (one WS frame per shard).
//! - [`queue`]: one connection's send queue (zero or one buffer inline, a backlog allocated
//!   only while it lasts).
//! - `shard`: the monoio shell per core around one `ShardCore`: listeners, rings, the clock;
//!   plain sockets driven by readiness (`shard::sockets`, no task per connection), a task per
//!   TLS connection.
//! - [`acks`]: high-reach op 1000 ACKs: who opted in, the per-connection rate, resends only
//!   to those (sans-io).
//! - [`link`]: broker link client (HELLO, PING, reconnect with backoff, SUB/UNSUB/COUNTS); its
//!   hub talks to the shards through an outbox.
//! - `admin`: `/healthz`, `/metrics`, `/admin/drain` on its own thread.
//! - `control`: heartbeats to control.
//!
//! # Threads
//! `shards` shard threads + one admin thread. Shard 0 is also the link shard: it owns every
//! broker link and the node-wide interest. Shards talk only through `rtrb` rings (one per
//! ordered pair) woken by `net::wake::Notify`; nothing on the data path is shared mutably.
#![forbid(unsafe_code)]

pub mod acks;
pub mod config;
pub mod core;
pub mod fanout;
pub mod index;
pub mod interest;
pub mod link;
pub mod metrics;
pub mod node;
pub mod presence;
pub mod queue;
pub mod reach;
pub mod resume;
pub mod session;
pub mod tls;
pub mod udp;
pub mod wheel;

mod admin;
mod control;
mod shard;

pub use config::Config;
pub use shard::conn_entry_bytes;

use node::Node;
use shard::Plumbing;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// File descriptors kept back from the connection capacity for what must keep working when
/// viewers fill the rest: listeners, broker links, admin (`/healthz`), control heartbeats,
/// rings, logs, and refused clients being told to come back.
pub const FD_RESERVE: u64 = 100;
/// `Handle::shutdown` waits this long for threads before leaving them behind.
const SHUTDOWN_MS_MAX: u64 = 5_000;

/// Why the edge could not start.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// The configuration is unreadable or invalid.
    #[error("config: {0}")]
    Config(String),
    /// An address did not parse or resolve.
    #[error("address {0}: {1}")]
    Addr(String, String),
    /// Binding a listener or spawning a thread failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The TLS certificate or key could not be loaded.
    #[error("tls: {0}")]
    Tls(#[from] net::tls::TlsError),
    /// WSS is off (no `tls_cert_path`).
    #[error("tls: WSS is off (tls_cert_path is empty)")]
    TlsOff,
    /// The token key spec did not parse.
    #[error("token_keys: {0}")]
    Keys(#[from] proto::token::TokenError),
}

/// A running edge.
pub struct Handle {
    tcp_addr: SocketAddr,
    ws_addr: SocketAddr,
    wss_addr: Option<SocketAddr>,
    tls_tcp_addr: Option<SocketAddr>,
    udp_addr: Option<SocketAddr>,
    admin_addr: SocketAddr,
    node: Arc<Node>,
    admin_stop: Arc<net::wake::Notify>,
    threads: Vec<JoinHandle<()>>,
}

impl Handle {
    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp_addr
    }
    pub fn ws_addr(&self) -> SocketAddr {
        self.ws_addr
    }
    /// The WSS address, when `tls_cert_path` is set.
    pub fn wss_addr(&self) -> Option<SocketAddr> {
        self.wss_addr
    }
    /// The TLS-over-TCP address, when `tls_tcp_addr` is set.
    pub fn tls_tcp_addr(&self) -> Option<SocketAddr> {
        self.tls_tcp_addr
    }
    /// The UDP address, when `udp_addr` is set.
    pub fn udp_addr(&self) -> Option<SocketAddr> {
        self.udp_addr
    }
    /// A handle that reloads the TLS certificate (for SIGHUP), when WSS is on.
    pub fn tls(&self) -> Option<tls::Tls> {
        self.node.tls.clone()
    }
    /// Same as `POST /admin/reload-tls`: reads the certificate and key again for new
    /// handshakes (open connections keep theirs). Returns the new fingerprint.
    pub fn reload_tls(&self) -> Result<String, EdgeError> {
        admin::reload_tls(&self.node)
    }
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }
    /// Open client connections across shards.
    pub fn connections(&self) -> u64 {
        self.node.connections()
    }
    /// Connections this process can hold (soft fd limit minus a reserve).
    pub fn capacity(&self) -> u64 {
        self.node.capacity
    }
    /// The Prometheus text `/metrics` serves.
    pub fn metrics_text(&self) -> String {
        admin::render(&self.node)
    }
    /// Same as `POST /admin/drain`.
    pub fn drain(&self) {
        admin::drain(&self.node);
    }
    /// `None` when `/readyz` answers 200; else why not.
    pub fn not_ready(&self) -> Option<&'static str> {
        admin::not_ready(&self.node)
    }
    /// The reload hooks SIGHUP and `POST /admin/reload` run (register TLS reload here).
    pub fn reload_hooks(&self) -> net::reload::Hooks {
        self.node.hooks.clone()
    }
    /// What applies the live part of a newly loaded config (the token key set: new viewers
    /// are checked against it, viewers already in stay) and says what else changed and needs
    /// a restart. The binary's "config" reload hook calls it.
    pub fn reloader(&self) -> impl Fn(&Config) -> Result<String, String> + Send + Sync + 'static {
        let node = self.node.clone();
        move |loaded| apply_reload(&node, loaded)
    }

    /// Stops everything and joins the threads (bounded by `SHUTDOWN_MS_MAX`).
    pub fn shutdown(self) {
        self.node.stop.store(true, Ordering::Release);
        for n in &self.node.notify {
            n.notify();
        }
        self.admin_stop.notify();
        let (tx, rx) = std::sync::mpsc::channel();
        let threads = self.threads;
        std::thread::spawn(move || {
            for t in threads {
                let _ = t.join();
            }
            let _ = tx.send(());
        });
        if rx
            .recv_timeout(Duration::from_millis(SHUTDOWN_MS_MAX))
            .is_err()
        {
            tracing::warn!("edge threads did not stop in time; leaving them behind");
        }
    }
}

/// Config fields a reload applies; every other change needs a restart (docs/operations.md).
pub const LIVE_FIELDS: [&str; 2] = ["token_keys", "log_level"];

fn apply_reload(node: &Node, loaded: &Config) -> Result<String, String> {
    loaded.validate().map_err(|e| e.to_string())?;
    let mut applied = Vec::new();
    let keys = if loaded.token_keys.trim().is_empty() {
        proto::token::KeySet::default()
    } else {
        proto::token::KeySet::parse(&loaded.token_keys).map_err(|e| format!("token_keys: {e}"))?
    };
    // Always swapped: a rotated secret under the same id is a change no id list shows.
    applied.push(format!("token_keys {keys:?}"));
    node.keys.store(keys);
    let restart = net::reload::fields_needing_restart(&node.config, loaded, &LIVE_FIELDS);
    Ok(net::reload::summary(&applied, &restart))
}

fn resolve(addr: &str) -> Result<SocketAddr, EdgeError> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .map_err(|e| EdgeError::Addr(addr.to_string(), e.to_string()))?
        .next()
        .ok_or_else(|| EdgeError::Addr(addr.to_string(), "no address".into()))
}

/// Binds one `SO_REUSEPORT` listener per shard on the same port (port 0 resolved by the first).
fn bind_all(
    addr: &str,
    n: usize,
    config: &Config,
) -> Result<(Vec<std::net::TcpListener>, SocketAddr), EdgeError> {
    let v = net::runtime::shard_listeners(
        resolve(addr)?,
        n,
        config.backlog,
        config.reuse_port_across_processes,
    )?;
    let bound = v[0].local_addr()?;
    Ok((v, bound))
}

/// The WSS certificate, if one is configured (both paths or neither).
fn load_tls(config: &Config) -> Result<Option<tls::Tls>, EdgeError> {
    match (
        config.tls_cert_path.is_empty(),
        config.tls_key_path.is_empty(),
    ) {
        (true, true) => Ok(None),
        (false, false) => {
            let t = tls::Tls::load(
                std::path::Path::new(&config.tls_cert_path),
                std::path::Path::new(&config.tls_key_path),
            )?;
            tracing::info!(cert = %config.tls_cert_path, fingerprint = %t.fingerprint(), "WSS certificate loaded");
            Ok(Some(t))
        }
        _ => Err(EdgeError::Config(
            "tls_cert_path and tls_key_path must be set together".into(),
        )),
    }
}

/// Starts the edge: binds every listener, spawns the shards and the admin thread, and returns
/// once all of them listen.
pub fn start(config: Config) -> Result<Handle, EdgeError> {
    config.validate()?;
    admin::check_secrets(&config)?;
    let keys = if config.token_keys.trim().is_empty() {
        tracing::warn!("token_keys is empty: every auth will be refused");
        proto::token::KeySet::default()
    } else {
        proto::token::KeySet::parse(&config.token_keys)?
    };
    let nofile = match net::sys::raise_nofile_limit() {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the fd limit");
            1024
        }
    };
    let fd_capacity = nofile.saturating_sub(FD_RESERVE);
    let capacity = match config.conns_max {
        0 => fd_capacity,
        n => n.min(fd_capacity),
    };
    let n = config.shard_count();
    let driver = net::runtime::Driver::from_env_or(config.driver);
    tracing::info!(
        fd_limit = nofile,
        capacity,
        shards = n,
        ?driver,
        "edge starting"
    );

    let (tcp, tcp_addr) = bind_all(&config.tcp_addr, n, &config)?;
    let (ws, ws_addr) = bind_all(&config.ws_addr, n, &config)?;
    let tls = load_tls(&config)?;
    let (wss, wss_addr) = match tls {
        Some(_) => {
            let (v, a) = bind_all(&config.wss_addr, n, &config)?;
            (v.into_iter().map(Some).collect(), Some(a))
        }
        None => ((0..n).map(|_| None).collect::<Vec<_>>(), None),
    };
    let (tls_tcp, tls_tcp_addr) = match (&tls, config.tls_tcp_addr.is_empty()) {
        (_, true) => ((0..n).map(|_| None).collect::<Vec<_>>(), None),
        (None, false) => {
            return Err(EdgeError::Config(
                "tls_tcp_addr needs tls_cert_path and tls_key_path".into(),
            ))
        }
        (Some(_), false) => {
            let (v, a) = bind_all(&config.tls_tcp_addr, n, &config)?;
            (v.into_iter().map(Some).collect(), Some(a))
        }
    };
    let (udp, udp_addr) = if config.udp_addr.is_empty() {
        ((0..n).map(|_| None).collect::<Vec<_>>(), None)
    } else {
        let v = udp::bind_sockets(
            resolve(&config.udp_addr)?,
            n,
            config.reuse_port_across_processes,
        )?;
        let a = v[0].local_addr()?;
        (v.into_iter().map(Some).collect(), Some(a))
    };
    let admin_listener = net::sys::listener(resolve(&config.admin_addr)?, false, 128)?;
    let admin_addr = admin_listener.local_addr()?;

    let rings = node::rings(n, config.ring_entries);
    let mut node = Node::new(config, keys, capacity);
    if let Some(t) = &tls {
        // SIGHUP and `POST /admin/reload` read the certificate again too, as
        // `POST /admin/reload-tls` does; open connections keep theirs.
        let t = t.clone();
        node.hooks.register("tls", move || {
            t.reload()
                .map(|fp| format!("certificate reloaded, fingerprint {fp}"))
                .map_err(|e| e.to_string())
        });
    }
    node.tls = tls;
    let node = Arc::new(node);
    let plumbing: Vec<Mutex<Option<Plumbing>>> = rings
        .into_iter()
        .zip(tcp.into_iter().zip(ws).zip(wss.into_iter().zip(tls_tcp)))
        .zip(udp)
        .map(|(((tx, rx), ((tcp, ws), (wss, tls_tcp))), udp)| {
            Mutex::new(Some(Plumbing {
                tx,
                rx,
                tcp,
                ws,
                wss,
                tls_tcp,
                udp,
            }))
        })
        .collect();
    let plumbing = Arc::new(plumbing);
    let node2 = node.clone();
    let mut threads = net::runtime::spawn_shards("edge", n, driver, node.config.pin, move |i| {
        let p = plumbing
            .get(i)
            .and_then(|m| m.lock().ok())
            .and_then(|mut g| g.take());
        let node = node2.clone();
        async move {
            let Some(p) = p else { return };
            match shard::Shard::new(i, node, p.tx, p.rx) {
                Ok(s) => shard::run(s, p.tcp, p.ws, p.wss, p.tls_tcp, p.udp).await,
                Err(e) => tracing::error!(shard = i, error = %e, "cannot start the shard"),
            }
        }
    })?;

    let admin_stop = net::wake::Notify::new();
    let (node3, stop3) = (node.clone(), admin_stop.clone());
    let ports = control::Ports {
        tcp: tcp_addr.port(),
        ws: ws_addr.port(),
        wss: wss_addr.map_or(0, |a| a.port()),
        tls_tcp: tls_tcp_addr.map_or(0, |a| a.port()),
        udp: udp_addr.map_or(0, |a| a.port()),
    };
    threads.push(
        std::thread::Builder::new()
            .name("edge-admin".into())
            .spawn(move || {
                net::runtime::block_on(net::runtime::Driver::Legacy, async move {
                    let l = match monoio::net::TcpListener::from_std(admin_listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(error = %e, "admin listener");
                            return;
                        }
                    };
                    if let Some(c) = node3.config.control_addr.clone() {
                        let replicas = c.split(',').map(str::trim).filter(|a| !a.is_empty());
                        for (i, a) in replicas.enumerate() {
                            monoio::spawn(control::heartbeat_loop(
                                node3.clone(),
                                a.to_string(),
                                i,
                                ports,
                            ));
                        }
                    }
                    let stop = async move { stop3.notified().await };
                    let cfg = admin::serve_config(&node3);
                    let handler = admin::handler(node3.clone(), cfg.stats.clone());
                    net::http::serve_with(l, handler, cfg, stop).await;
                })
            })?,
    );
    tracing::info!(%tcp_addr, %ws_addr, ?wss_addr, ?tls_tcp_addr, ?udp_addr, %admin_addr, "edge listening");
    Ok(Handle {
        tcp_addr,
        ws_addr,
        wss_addr,
        tls_tcp_addr,
        udp_addr,
        admin_addr,
        node,
        admin_stop,
        threads,
    })
}
