//! `barrage up`: control, broker and one edge in one process, wired together on loopback.
//!
//! Start order is control, broker, edge: the edge links to the broker and heartbeats to
//! control, so both must listen first. Shutdown runs in the reverse order.

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How long `up` waits for the edge's first heartbeat to reach control before saying ready.
const EDGE_REGISTER_MS_MAX: u64 = 10_000;

#[derive(clap::Args, Clone, Debug, Default)]
pub struct UpArgs {
    /// TOML file with [control], [broker] and [edge] sections (see examples/up.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// API key for control (`POST /v1/connect`) and the broker (push); random when not given.
    #[arg(long, env = "BARRAGE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Token secret, or a key set `ID:SECRET,ID:SECRET`; random when not given.
    #[arg(long, env = "BARRAGE_TOKEN_SECRET", hide_env_values = true)]
    pub token_secret: Option<String>,
    /// Added to every listening port, so several stacks can run on one host.
    #[arg(long, default_value_t = 0)]
    pub ports_offset: u16,
    /// Turn off the room page's demo send box (`POST /demo/send`), on by default in `up`.
    #[arg(long)]
    pub no_demo: bool,
    /// Where `up` keeps the self-signed WSS certificate it makes when `[edge]` names none
    /// (kept across restarts, so its fingerprint stays the same). Default: the state directory
    /// (`$STATE_DIRECTORY`, else `$XDG_STATE_HOME/barrage`, else `~/.local/state/barrage`).
    #[arg(long, env = "BARRAGE_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Directory of the broker's durable high-reach log (`[broker] data_dir`): accepted
    /// high-reach pushes survive `kill -9` and are delivered after `up` starts again with the
    /// same directory. Default (`auto`): `<state dir>/broker-<node_id>-<ingest port>`, so
    /// several `up` stacks on one host (`--ports-offset`) never share a log; `none`: memory only.
    #[arg(long, env = "BARRAGE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

/// The `up` config file: one section per role, each defaulted as that role's own file is.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpConfig {
    pub control: control::Config,
    pub broker: broker::Config,
    pub edge: edge::Config,
}

impl Default for UpConfig {
    fn default() -> Self {
        // Loopback only: `up` is for a developer's machine.
        let edge = edge::Config {
            tcp_addr: "127.0.0.1:2243".into(),
            ws_addr: "127.0.0.1:2244".into(),
            wss_addr: "127.0.0.1:2245".into(),
            udp_addr: "127.0.0.1:2246".into(),
            ..edge::Config::default()
        };
        UpConfig {
            control: control::Config::default(),
            broker: broker::Config::default(),
            edge,
        }
    }
}

impl net::config::Layered for UpConfig {
    const ROLE: &'static str = "up";

    fn check(&self) -> Result<(), String> {
        let c = <control::Config as net::config::Layered>::check(&self.control);
        let b = <broker::Config as net::config::Layered>::check(&self.broker);
        let e = <edge::Config as net::config::Layered>::check(&self.edge);
        c.map_err(|m| format!("[control] {m}"))?;
        b.map_err(|m| format!("[broker] {m}"))?;
        e.map_err(|m| format!("[edge] {m}"))
    }
}

/// SIGINT/SIGTERM (and SIGHUP for a role that reloads), registered before anything starts so
/// an early signal is not lost.
pub struct Shutdown {
    signals: signal_hook::iterator::Signals,
    /// Run on SIGHUP (set by a role runner); without one SIGHUP is not caught.
    on_reload: Option<Box<dyn Fn()>>,
}

/// How often a drain looks at the signals and the connections left.
const DRAIN_POLL_MS: u64 = 50;

/// How a drain ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Drained {
    /// No connection left.
    Empty,
    /// The time bound passed with connections left.
    TimedOut(u64),
    /// A second signal: stop at once.
    Interrupted(i32),
}

impl Shutdown {
    pub fn register() -> anyhow::Result<Shutdown> {
        let signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
            .context("installing signal handlers")?;
        Ok(Shutdown {
            signals,
            on_reload: None,
        })
    }

    /// Also catches SIGHUP, which runs `reload` (while waiting and while draining).
    pub fn reload_on_hup(&mut self, reload: impl Fn() + 'static) -> anyhow::Result<()> {
        self.signals
            .add_signal(SIGHUP)
            .context("installing the SIGHUP handler")?;
        self.on_reload = Some(Box::new(reload));
        Ok(())
    }

    /// Runs the reload for a SIGHUP; `false` for a stopping signal.
    fn reloaded(&self, sig: i32) -> bool {
        if sig != SIGHUP {
            return false;
        }
        tracing::info!("SIGHUP: reloading");
        if let Some(r) = &self.on_reload {
            r();
        }
        true
    }

    /// Blocks until SIGINT or SIGTERM (running the reload on each SIGHUP meanwhile).
    pub fn wait(&mut self) {
        loop {
            let Some(sig) = self.signals.forever().next() else {
                return;
            };
            if !self.reloaded(sig) {
                tracing::info!(signal = sig, "shutting down");
                return;
            }
        }
    }

    /// After the first signal: waits until `remaining()` is 0, `deadline` passes, or a second
    /// SIGINT/SIGTERM arrives (which means "stop now").
    pub fn drain_until(&mut self, deadline: Instant, remaining: impl Fn() -> u64) -> Drained {
        loop {
            let pending: Vec<i32> = self.signals.pending().collect();
            if let Some(sig) = pending.into_iter().find(|s| !self.reloaded(*s)) {
                return Drained::Interrupted(sig);
            }
            let left = remaining();
            if left == 0 {
                return Drained::Empty;
            }
            if Instant::now() >= deadline {
                return Drained::TimedOut(left);
            }
            std::thread::sleep(Duration::from_millis(DRAIN_POLL_MS));
        }
    }
}

fn random_secret(bytes: usize) -> String {
    use rand::RngCore;
    let mut b = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn offset_addr(a: SocketAddr, by: u16) -> anyhow::Result<SocketAddr> {
    if a.port() == 0 || by == 0 {
        return Ok(a);
    }
    let Some(p) = a.port().checked_add(by) else {
        bail!("--ports-offset {by} moves port {} past 65535", a.port())
    };
    Ok(SocketAddr::new(a.ip(), p))
}

fn offset_str(a: &str, by: u16) -> anyhow::Result<String> {
    let parsed: SocketAddr = a
        .parse()
        .with_context(|| format!("--ports-offset needs IP:PORT addresses, got {a:?}"))?;
    Ok(offset_addr(parsed, by)?.to_string())
}

/// Secrets `up` made at random because neither its flags nor its file gave one. A reload wires
/// the new config with the same ones, so a SIGHUP never rotates a key nobody asked to rotate.
#[derive(Clone, Debug, Default)]
pub struct Made {
    api_key: Option<String>,
    token_keys: Option<String>,
    link_key: Option<String>,
    edge_key: Option<String>,
}

/// Applies flags and fills in what connects the three roles. Each secret neither gives is taken
/// from `made` when it holds one, else made at random and kept there.
pub fn wire(mut c: UpConfig, args: &UpArgs, made: &mut Made) -> anyhow::Result<UpConfig> {
    let by = args.ports_offset;
    c.control.http_addr = offset_addr(c.control.http_addr, by)?;
    c.broker.ingest_addr = offset_addr(c.broker.ingest_addr, by)?;
    c.broker.link_addr = offset_addr(c.broker.link_addr, by)?;
    c.broker.http_addr = offset_addr(c.broker.http_addr, by)?;
    c.edge.tcp_addr = offset_str(&c.edge.tcp_addr, by)?;
    c.edge.ws_addr = offset_str(&c.edge.ws_addr, by)?;
    c.edge.wss_addr = offset_str(&c.edge.wss_addr, by)?;
    if !c.edge.tls_tcp_addr.is_empty() {
        c.edge.tls_tcp_addr = offset_str(&c.edge.tls_tcp_addr, by)?;
    }
    if !c.edge.udp_addr.is_empty() {
        c.edge.udp_addr = offset_str(&c.edge.udp_addr, by)?;
    }
    c.edge.admin_addr = offset_str(&c.edge.admin_addr, by)?;

    // One API key for both control and the broker, unless the file set them.
    let key = match &args.api_key {
        Some(k) => Some(k.clone()),
        None if c.control.api_keys.is_empty() && c.broker.api_keys.is_empty() => Some(
            made.api_key
                .get_or_insert_with(|| random_secret(16))
                .clone(),
        ),
        None => None,
    };
    if let Some(k) = key {
        c.control.api_keys = vec![k.clone()];
        c.broker.api_keys = vec![broker::ApiKey::all_scopes(&k)];
    } else if c.control.api_keys.is_empty() {
        c.control.api_keys = c.broker.api_keys.iter().map(|k| k.key.clone()).collect();
    } else if c.broker.api_keys.is_empty() {
        c.broker.api_keys = c
            .control
            .api_keys
            .iter()
            .map(|k| broker::ApiKey::all_scopes(k))
            .collect();
    }
    // Control and the edge must share the token keys.
    let keys = match &args.token_secret {
        Some(s) => s.clone(),
        None if !c.control.token_keys.is_empty() => c.control.token_keys.clone(),
        None if !c.edge.token_keys.is_empty() => c.edge.token_keys.clone(),
        None => made
            .token_keys
            .get_or_insert_with(|| format!("1:{}", random_secret(32)))
            .clone(),
    };
    c.control.token_keys = keys.clone();
    c.edge.token_keys = keys;
    // The edge proves itself to the broker with a link key bound to its node id, and to
    // control with the edge key; both are made here unless the file set them.
    if c.broker.link_keys.is_empty() && c.edge.link_key.is_empty() {
        let k = made
            .link_key
            .get_or_insert_with(|| random_secret(32))
            .clone();
        c.broker.link_keys = vec![format!("{}:{k}", c.edge.node_id)];
        c.edge.link_key = k;
    }
    if c.control.edge_key.is_empty() && c.edge.edge_key.is_empty() {
        let k = made
            .edge_key
            .get_or_insert_with(|| random_secret(32))
            .clone();
        c.control.edge_key = k.clone();
        c.edge.edge_key = k;
    }
    if let Some(d) = &args.data_dir {
        c.broker.data_dir = d.to_string_lossy().into_owned();
    }
    wire_pages(&mut c, args);
    Ok(c)
}

/// The room page's demo box and the console push through this broker and read this edge's
/// admin endpoint (docs/operations-control.md, `[pages]`), unless the file said otherwise.
fn wire_pages(c: &mut UpConfig, args: &UpArgs) {
    let p = &mut c.control.pages;
    p.demo_send = !args.no_demo;
    if p.broker_http.is_empty() {
        p.broker_http = c.broker.http_addr.to_string();
    }
    if p.broker_key.is_empty() {
        p.broker_key = c
            .broker
            .api_keys
            .first()
            .map(|k| k.key.clone())
            .unwrap_or_default();
    }
    if p.edge_admins.is_empty() {
        p.edge_admins = vec![control::pages::EdgeAdmin {
            node_id: c.edge.node_id.clone(),
            addr: c.edge.admin_addr.clone(),
        }];
    }
    if p.edge_admin_key.is_empty() {
        p.edge_admin_key = c.edge.admin_key.clone();
    }
}

/// The default home of `up`'s self-signed certificate.
fn default_tls_dir() -> PathBuf {
    net::state::dir()
}

/// WSS for `up`: the certificate the file names, else a self-signed one for `localhost` and
/// `127.0.0.1` (made once, then reused). Returns what to print about it.
pub fn ensure_tls(c: &mut UpConfig, args: &UpArgs) -> anyhow::Result<String> {
    if !c.edge.tls_cert_path.is_empty() || !c.edge.tls_key_path.is_empty() {
        return Ok(format!("certificate {}", c.edge.tls_cert_path));
    }
    let dir = args.tls_dir.clone().unwrap_or_else(default_tls_dir);
    let made = net::tls::self_signed(&dir)
        .with_context(|| format!("making a self-signed certificate in {}", dir.display()))?;
    c.edge.tls_cert_path = made.cert_path.display().to_string();
    c.edge.tls_key_path = made.key_path.display().to_string();
    Ok(format!(
        "self-signed certificate {} ({}), SHA-256 {}",
        made.cert_path.display(),
        if made.created { "new" } else { "kept" },
        made.fingerprint
    ))
}

/// The running stack.
pub struct Stack {
    pub control: control::Handle,
    pub broker: broker::Handle,
    pub edge: edge::Handle,
}

impl Stack {
    /// Starts control, broker and edge in that order; the edge gets the others' real addresses.
    pub fn start(mut c: UpConfig) -> anyhow::Result<Stack> {
        let control = control::start(c.control.clone()).context("starting control")?;
        let broker = broker::start(c.broker.clone()).context("starting the broker")?;
        c.edge.broker_addrs = vec![broker.link_addr().to_string()];
        c.edge.control_addr = Some(control.http_addr().to_string());
        let edge = edge::start(c.edge.clone()).context("starting the edge")?;
        Ok(Stack {
            control,
            broker,
            edge,
        })
    }

    /// Registers a "config" hook on each role that reads `up`'s config again (file and
    /// `BARRAGE_UP_*`), wires it as at start (same flags, the same secrets `made` holds, the
    /// addresses the roles really listen on) and applies that role's section. SIGHUP runs all
    /// three; `POST /admin/reload` on one role's port runs that role's. Returns the hooks.
    pub fn reload_hooks(&self, args: &UpArgs, made: &Made) -> Vec<net::reload::Hooks> {
        let (link, control) = (self.broker.link_addr(), self.control.http_addr());
        let load = {
            let (args, made) = (args.clone(), made.clone());
            move || -> Result<UpConfig, String> {
                let base: UpConfig =
                    net::config::load(&net::config::Sources::process(args.config.as_deref(), &[]))
                        .map_err(|e| e.to_string())?;
                let mut c = wire(base, &args, &mut made.clone()).map_err(|e| format!("{e:#}"))?;
                ensure_tls(&mut c, &args).map_err(|e| format!("{e:#}"))?;
                c.edge.broker_addrs = vec![link.to_string()];
                c.edge.control_addr = Some(control.to_string());
                Ok(c)
            }
        };
        let load = std::sync::Arc::new(load);
        let (l, apply) = (load.clone(), self.control.reloader());
        self.control
            .reload_hooks()
            .register("config", move || apply(&(*l)()?.control));
        let (l, apply) = (load.clone(), self.broker.reloader());
        self.broker
            .reload_hooks()
            .register("config", move || apply(&(*l)()?.broker));
        let (l, apply) = (load, self.edge.reloader());
        self.edge
            .reload_hooks()
            .register("config", move || apply(&(*l)()?.edge));
        vec![
            self.control.reload_hooks(),
            self.broker.reload_hooks(),
            self.edge.reload_hooks(),
        ]
    }

    pub fn shutdown(self) {
        self.edge.shutdown();
        self.broker.shutdown();
        self.control.shutdown();
    }
}

/// Polls control until it lists a live edge, so "ready" means `tail` works at once.
fn wait_for_edge(control: SocketAddr, api_key: &str) -> bool {
    let deadline = Instant::now() + Duration::from_millis(EDGE_REGISTER_MS_MAX);
    let addr = control.to_string();
    let bearer = format!("Bearer {api_key}");
    while Instant::now() < deadline {
        let res = net::runtime::block_on(net::runtime::Driver::Legacy, async {
            let h = [("authorization", bearer.as_str())];
            net::http::request(&addr, "GET", "/v1/edges", &h, b"", Duration::from_secs(2)).await
        });
        if let Ok(r) = res {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&r.body) {
                let up = v["edges"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|e| e["state"] == "up"));
                if up {
                    return true;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    // Layers as for every role: defaults < file < BARRAGE_UP_<SECTION>__<FIELD>; flags below.
    let base: UpConfig =
        net::config::load(&net::config::Sources::process(args.config.as_deref(), &[]))?;
    let mut made = Made::default();
    let mut c = wire(base, &args, &mut made)?;
    let tls_note = ensure_tls(&mut c, &args)?;
    let mut signals = Shutdown::register()?;
    let api_key = c.control.api_keys.first().cloned().unwrap_or_default();
    let token_keys = c.control.token_keys.clone();
    let stack = Stack::start(c)?;
    let hooks = stack.reload_hooks(&args, &made);
    signals.reload_on_hup(move || {
        for h in &hooks {
            h.run();
        }
    })?;
    let ctl = stack.control.http_addr();
    let ingest = stack.broker.ingest_addr();
    let bhttp = stack.broker.http_addr();
    if !wait_for_edge(ctl, &api_key) {
        tracing::warn!(
            "the edge has not registered with control yet; tail may find no edge for a moment"
        );
    }
    println!("barrage is up: control, broker and one edge in this process. Ctrl-C stops it.");
    println!();
    println!("  control   http://{ctl}   (POST /v1/connect, GET /xlive/web-room/v1/index/getDanmuInfo?id=ROOM, GET /v1/edges)");
    println!("  broker    ingest {ingest}   HTTP http://{bhttp} (POST /v1/push/room/ROOM)   edge links {}", stack.broker.link_addr());
    println!(
        "  edge      tcp {}   ws ws://{}/sub   admin http://{}",
        stack.edge.tcp_addr(),
        stack.edge.ws_addr(),
        stack.edge.admin_addr()
    );
    if let Some(wss) = stack.edge.wss_addr() {
        println!(
            "  wss       wss://localhost:{}/sub   {tls_note}",
            wss.port()
        );
    }
    if let Some(udp) = stack.edge.udp_addr() {
        println!("  udp       {udp}   (barrage tail --transport udp, docs/protocol-udp.md)");
    }
    println!("  api key   {api_key}");
    println!("  token keys {token_keys}");
    println!();
    println!("Open in a browser:");
    println!("  room 1    http://{ctl}/room/1");
    println!("  console   http://{ctl}/console#key={api_key}");
    println!("Watch room 1 in a terminal:");
    println!("  barrage tail --room 1 --control http://{ctl}");
    println!("Push to it:");
    println!("  barrage push --ingest {ingest} --api-key {api_key} --room 1 '{{\"cmd\":\"DANMU_MSG\",\"info\":[[0],\"hello\",[1,\"me\"]]}}'");
    println!("  curl -H 'Authorization: Bearer {api_key}' -d '{{\"cmd\":\"DANMU_MSG\",\"info\":[[0],\"hi\",[1,\"me\"]]}}' http://{bhttp}/v1/push/room/1");
    println!("ready");
    signals.wait();
    stack.shutdown();
    println!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wiring_shares_keys_and_offsets_ports() {
        let args = UpArgs {
            api_key: Some("k".into()),
            token_secret: Some("s3cret-s3cret-s3cret".into()),
            ports_offset: 10,
            ..UpArgs::default()
        };
        let c = wire(UpConfig::default(), &args, &mut Made::default()).unwrap();
        assert_eq!(c.control.http_addr.port(), 8090);
        assert_eq!(c.broker.ingest_addr.port(), 7410);
        assert_eq!(c.edge.tcp_addr, "127.0.0.1:2253");
        assert_eq!(c.edge.ws_addr, "127.0.0.1:2254");
        assert_eq!(c.edge.udp_addr, "127.0.0.1:2256");
        assert_eq!(c.control.api_keys, ["k"]);
        assert_eq!(c.broker.api_keys[0].key, "k");
        assert_eq!(c.control.token_keys, c.edge.token_keys);
        assert!(c.control.pages.demo_send, "up turns the demo box on");
        assert_eq!(c.control.pages.broker_http, "127.0.0.1:7490");
        assert_eq!(c.control.pages.broker_key, "k");
        assert_eq!(c.control.pages.edge_admins[0].addr, "127.0.0.1:9253");

        let mut made = Made::default();
        let random = wire(UpConfig::default(), &UpArgs::default(), &mut made).unwrap();
        assert_eq!(random.control.api_keys.len(), 1);
        assert_eq!(random.control.api_keys[0].len(), 32);
        assert_eq!(random.broker.api_keys[0].key, random.control.api_keys[0]);
        assert!(random.control.token_keys.starts_with("1:"));
        assert_eq!(random.control.token_keys, random.edge.token_keys);
        // The link key is made, bound to the edge's node id, and shared; so is the edge key.
        assert_eq!(random.edge.link_key.len(), 64);
        assert_eq!(
            random.broker.link_keys,
            [format!("{}:{}", random.edge.node_id, random.edge.link_key)]
        );
        assert_eq!(random.control.edge_key, random.edge.edge_key);
        assert_eq!(random.edge.edge_key.len(), 64);
        // A reload wires with the same `made`: the same secrets, nothing rotated by accident.
        let again = wire(UpConfig::default(), &UpArgs::default(), &mut made).unwrap();
        assert_eq!(
            serde_json::to_value(&again).unwrap(),
            serde_json::to_value(&random).unwrap()
        );
    }

    #[test]
    fn up_file_sections_parse() {
        let c: UpConfig =
            toml::from_str("[control]\ntoken_ttl_ms = 60000\n[edge]\nshards = 1\n").unwrap();
        assert_eq!(c.control.token_ttl_ms, 60_000);
        assert_eq!(c.edge.shards, 1);
        assert!(toml::from_str::<UpConfig>("[nope]\n").is_err());
    }
}
