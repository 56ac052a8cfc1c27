//! # control: tokens, the edge registry, and Bilibili-compatible discovery
//!
//! # Layout
//! - [`config`]: the TOML configuration, every field defaulted.
//! - [`region`]: the CIDR table mapping client addresses to regions.
//! - [`room`]: the room table (short ids, streamer uids, areas; strict or open).
//! - [`registry`]: edges, their heartbeats, expiry and assignment (sans-io, `now` passed in).
//! - [`issuer`]: token issuing with the newest key of the key set.
//! - [`peers`]: the other regions' controls, polled for their registries (issue 13).
//! - [`api`]: the HTTP handlers as a plain `request -> response` function over the above.
//! - [`pages`]: the room page, the demo send box and the operator console (HTML, JS, JSON).
//! - this file: the monoio shell, one HTTP thread on `net::http::serve`.
//!
//! # Invariants
//! - Control is not on the message path: clients call it once per connect, edges every
//!   `control_heartbeat_ms`. One thread and one `RefCell` are enough, and keep every piece of
//!   state single-owner.
//! - Edges verify tokens locally; control never has to be up for an authenticated client to
//!   stay connected, only for new tokens and fresh edge lists.
#![forbid(unsafe_code)]

pub mod api;
pub mod brokers;
pub mod config;
pub mod issuer;
pub mod pages;
pub mod peers;
pub mod region;
pub mod registry;
pub mod room;

pub use config::Config;

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Listen backlog of the HTTP socket.
pub const HTTP_BACKLOG: i32 = 1024;
/// How long `start` waits for the HTTP thread to report that it is serving.
pub const START_MS_MAX: u64 = 10_000;

/// Why control could not start.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The configuration is invalid (file unreadable, bad TOML, bad keys or CIDRs). Fix the config.
    #[error("config: {0}")]
    Config(String),
    /// The HTTP address could not be bound (in use, no permission).
    #[error("bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The HTTP thread or its runtime failed to start.
    #[error("start: {0}")]
    Start(String),
}

/// Stop signal shared by the handle and the HTTP thread.
struct Stop {
    flag: AtomicBool,
    notify: Arc<net::wake::Notify>,
}

/// A running control service. Dropping it shuts it down too.
pub struct Handle {
    http_addr: SocketAddr,
    stop: Arc<Stop>,
    thread: Option<JoinHandle<()>>,
    keys: Arc<net::reload::Live<api::Keys>>,
    hooks: net::reload::Hooks,
    config: Config,
}

/// Config fields a reload applies; every other change needs a restart (docs/operations.md).
pub const LIVE_FIELDS: [&str; 3] = ["api_keys", "token_keys", "log_level"];

impl Handle {
    /// The bound HTTP address (the real port when the config said 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The reload hooks SIGHUP and `POST /admin/reload` run.
    pub fn reload_hooks(&self) -> net::reload::Hooks {
        self.hooks.clone()
    }

    /// What applies the live part of a newly loaded config (API keys; the token keys control
    /// signs with, and `token_ttl_ms` with them) and says what else changed and needs a restart.
    pub fn reloader(&self) -> impl Fn(&Config) -> Result<String, String> + Send + Sync + 'static {
        let (keys, running) = (self.keys.clone(), self.config.clone());
        move |loaded| {
            loaded.validate().map_err(|e| e.to_string())?;
            let mut live = running.clone();
            live.api_keys = loaded.api_keys.clone();
            live.token_keys = loaded.token_keys.clone();
            keys.store(api::Keys::new(&live).map_err(|e| e.to_string())?);
            let applied = vec![
                format!("api_keys ({} keys)", loaded.api_keys.len()),
                "token_keys".to_string(),
            ];
            let restart = net::reload::fields_needing_restart(&running, loaded, &LIVE_FIELDS);
            Ok(net::reload::summary(&applied, &restart))
        }
    }

    /// Stops serving and joins the HTTP thread.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.flag.store(true, Ordering::Release);
        self.stop.notify.notify();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("control HTTP thread panicked");
            }
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Unix time in seconds (0 if the clock is before 1970, which only a broken host reports).
fn unix_now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Where and how the other regions' controls are polled.
#[derive(Clone)]
struct PeerPoll {
    addrs: Vec<String>,
    key: String,
    every: Duration,
}

/// Polls peer `i`'s registry every `every` until control stops, handing each outcome to the
/// API state (sans-io merge in `peers`). The first poll is immediate, so a control that
/// starts knows the other regions within one round trip.
async fn poll_peer(api: Rc<RefCell<api::Api>>, poll: PeerPoll, i: usize, stop: Arc<Stop>) {
    let addr = poll.addrs[i].clone();
    let bearer = format!("Bearer {}", poll.key);
    let mut headers = Vec::new();
    if !poll.key.is_empty() {
        headers.push(("authorization", bearer.as_str()));
    }
    while !stop.flag.load(Ordering::Acquire) {
        let res = net::http::request(
            &addr,
            "GET",
            peers::REGISTRY_PATH,
            &headers,
            b"",
            Duration::from_millis(peers::POLL_REQUEST_MS_MAX),
        )
        .await;
        let outcome = match res {
            Ok(r) if r.status == 200 => Ok(r.body),
            Ok(r) => Err(format!("status {}", r.status)),
            Err(e) => Err(e.to_string()),
        };
        api.borrow_mut().peer_answered(i, outcome, Instant::now());
        // Sleep in short steps so shutdown is prompt.
        let mut left = poll.every;
        while !left.is_zero() && !stop.flag.load(Ordering::Acquire) {
            let step = left.min(Duration::from_millis(100));
            monoio::time::sleep(step).await;
            left -= step;
        }
    }
}

/// Binds, spawns the HTTP thread and returns once it is serving.
pub fn start(config: Config) -> Result<Handle, ControlError> {
    config.validate()?;
    config.check_secrets()?;
    let api = api::Api::new(&config)?;
    let (keys, hooks) = (api.live_keys(), api.reload_hooks());
    let listener = net::sys::listener(config.http_addr, false, HTTP_BACKLOG).map_err(|source| {
        ControlError::Bind {
            addr: config.http_addr,
            source,
        }
    })?;
    let http_addr = listener.local_addr().map_err(|source| ControlError::Bind {
        addr: config.http_addr,
        source,
    })?;
    let stop = Arc::new(Stop {
        flag: AtomicBool::new(false),
        notify: net::wake::Notify::new(),
    });
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let stop2 = stop.clone();
    let pages_config = config.pages.clone();
    let peer_poll = PeerPoll {
        addrs: config.peers.clone(),
        key: config.peer_key.clone(),
        every: Duration::from_millis(config.peer_poll_ms),
    };
    let mut serve_cfg = net::http::ServeConfig::new(config.body_bytes_max);
    serve_cfg.limits = config.http;
    // When the public side is full, liveness probes and the fleet's own heartbeats still get in.
    serve_cfg.reserved_paths = api::RESERVED_PATHS.iter().map(|p| p.to_string()).collect();
    serve_cfg.stats = api.http_stats();
    let driver = net::runtime::Driver::from_env_or(config.driver);
    let thread = std::thread::Builder::new()
        .name("control-http".into())
        .spawn(move || {
            net::runtime::block_on(driver, async move {
                let listener = match monoio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let api = Rc::new(RefCell::new(api));
                for i in 0..peer_poll.addrs.len() {
                    monoio::spawn(poll_peer(api.clone(), peer_poll.clone(), i, stop2.clone()));
                }
                let pages = Rc::new(pages::Pages::new(&pages_config, Instant::now()));
                let handler: net::http::Handler = Rc::new(move |req: net::http::Request| {
                    if pages::Pages::serves(&req.path) {
                        let (pages, api) = (pages.clone(), api.clone());
                        return Box::pin(async move {
                            let (started, route) =
                                (std::time::Instant::now(), pages::Pages::route(&req.path));
                            let resp = pages.handle(req, &api).await;
                            api.borrow_mut().observe_page(route, resp.status, started);
                            resp
                        });
                    }
                    let resp = api.borrow_mut().handle(&req, Instant::now(), unix_now_s());
                    Box::pin(async move { resp }) as net::http::BoxFuture<net::http::Response>
                });
                let _ = ready_tx.send(Ok(()));
                let stopped = async {
                    while !stop2.flag.load(Ordering::Acquire) {
                        stop2.notify.notified().await;
                    }
                };
                net::http::serve_with(listener, handler, serve_cfg, stopped).await;
            });
        })
        .map_err(|e| ControlError::Start(e.to_string()))?;
    let mut handle = Handle {
        http_addr,
        stop,
        thread: Some(thread),
        keys,
        hooks,
        config,
    };
    match ready_rx.recv_timeout(Duration::from_millis(START_MS_MAX)) {
        Ok(Ok(())) => {
            tracing::info!(addr = %http_addr, "control listening");
            Ok(handle)
        }
        Ok(Err(e)) => {
            handle.stop_and_join();
            Err(ControlError::Start(e))
        }
        Err(_) => {
            // The thread died (runtime could not be built) or hung before serving.
            // Detach rather than join: a hung thread must not hang the caller too.
            handle.stop.flag.store(true, Ordering::Release);
            handle.stop.notify.notify();
            drop(handle.thread.take());
            Err(ControlError::Start("HTTP thread did not start".into()))
        }
    }
}
