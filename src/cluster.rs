//! `barrage cluster`: a local cluster on loopback, every part its own process (issue 12).
//!
//! Starts `nats-server -js` (from PATH or /usr/sbin) in a temporary directory, control, N
//! brokers on the JetStream backbone (heartbeating control) and M edges that link to every
//! broker control lists (`brokers_from_control`), each a child process of this binary. Prints
//! every endpoint once all are healthy (with `--json`: exactly one JSON line), then waits for
//! SIGINT/SIGTERM and stops them all (edges, brokers, control, NATS), removing the directory.
//!
//! A child that dies meanwhile (a failover run kills brokers with SIGKILL on purpose) is
//! logged, not restarted. Ports are free loopback ports picked at start.

use anyhow::{bail, Context};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the cluster may take to become healthy.
const READY_MS_MAX: u64 = 30_000;
/// How long children get to stop after SIGTERM before SIGKILL.
const STOP_MS_MAX: u64 = 5_000;
/// Heartbeat interval of brokers and edges to control (fast, so joins and deaths show quickly).
const HEARTBEAT_MS: u64 = 500;
/// Control's liveness window for edges and brokers.
const TTL_MS: u64 = 2_000;

#[derive(clap::Args, Debug)]
pub struct ClusterArgs {
    /// Brokers on the backbone.
    #[arg(long, default_value_t = 3)]
    pub brokers: usize,
    /// Edges, each linked to every broker.
    #[arg(long, default_value_t = 2)]
    pub edges: usize,
    /// Control replicas (soft state: every edge and broker heartbeats each of them).
    #[arg(long, default_value_t = 1)]
    pub controls: usize,
    /// NATS servers: 1 is a single JetStream server; more form one NATS cluster with routes
    /// (3 is the production shape: the stream survives losing one node).
    #[arg(long, default_value_t = 1)]
    pub nats: usize,
    /// Stream and lease bucket replicas (`cluster.replicas`); default 3 with 3 or more NATS
    /// servers, else 1. At most `--nats`.
    #[arg(long)]
    pub replicas: Option<usize>,
    /// Backbone partitions (`cluster.partitions`).
    #[arg(long, default_value_t = 64)]
    pub partitions: u16,
    /// Broker lease time, ms (`cluster.lease_ms`): how long a killed broker's rooms wait.
    #[arg(long, default_value_t = 3_000)]
    pub lease_ms: u64,
    /// Shards per broker and per edge.
    #[arg(long, default_value_t = 1)]
    pub shards: usize,
    /// Regions, each with its own NATS (JetStream domain = region name; the first region's
    /// NATS takes the others' leafnode connections), controls, brokers and edges.
    #[arg(long, default_value_t = 1)]
    pub regions: usize,
    /// Region names, comma-separated (default `local` for one region, `r1,r2,...` for more).
    #[arg(long)]
    pub region_names: Option<String>,
    /// Brokers' `cluster.cross_region_max_lag_ms` (default: the broker's, 10000).
    #[arg(long)]
    pub cross_region_max_lag_ms: Option<u64>,
    /// The first region's leafnode port (default: a free one). For partition tests.
    #[arg(long, hide = true)]
    pub leaf_port: Option<u16>,
    /// The URL the other regions' NATS dial for the leafnode (default: the first region's
    /// leafnode port). A partition test points it at a proxy it can cut.
    #[arg(long, hide = true)]
    pub leaf_url: Option<String>,
    /// Start only this region of the federation `--region-names` lists (its brokers still
    /// source every region): one `barrage cluster` per host or network namespace, the others
    /// joining the first region's leafnode through `--leaf-url`.
    #[arg(long)]
    pub only_region: Option<String>,
    /// Address the first region's leafnode listens on (default 127.0.0.1; 0.0.0.0 when other
    /// regions run elsewhere).
    #[arg(long, default_value = "127.0.0.1")]
    pub leaf_host: String,
    /// A broker config value `KEY=VALUE` (TOML) for every broker, as `barrage broker --set`
    /// takes it; repeatable (e.g. `--broker-set room_rate_per_s=0` for a benchmark).
    #[arg(long = "broker-set", value_name = "KEY=VALUE")]
    pub broker_sets: Vec<String>,
    /// Print one JSON line with every endpoint once all are healthy (for scripts).
    #[arg(long)]
    pub json: bool,
    /// API key for control and the brokers; random when not given.
    #[arg(long, env = "BARRAGE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Token secret, or a key set `ID:SECRET,ID:SECRET`; random when not given.
    #[arg(long, env = "BARRAGE_TOKEN_SECRET", hide_env_values = true)]
    pub token_secret: Option<String>,
}

/// A child process, SIGKILLed on drop if still running.
pub struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A port free right now on every local address, from below the kernel's ephemeral range
/// (32768-60999 by default): a port asked of the kernel with port 0 comes from that range, where
/// any outgoing connection on the host may take it before the child binds it.
fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = (std::process::id() % 97) * 123;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + (start + n) % SPAN) as u16;
        if TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port in {FIRST}..{}", FIRST + SPAN)
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn nats_bin() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path).chain([PathBuf::from("/usr/sbin")]) {
        let p = dir.join("nats-server");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "nats-server is not installed (cluster mode runs on NATS JetStream): \
         `apt-get install nats-server` (Debian/Ubuntu), or put nats-server 2.9+ on PATH"
    )
}

/// `--set` pairs for a role, string values quoted as TOML basic strings.
fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

fn secret() -> String {
    use rand::RngCore;
    let mut b = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Waits until `ok()` or the deadline; the error names `what`.
fn wait_for(
    deadline: Instant,
    what: &str,
    procs: &mut [Proc],
    ok: impl Fn() -> bool,
) -> anyhow::Result<()> {
    loop {
        if ok() {
            return Ok(());
        }
        for p in procs.iter_mut() {
            if let Ok(Some(status)) = p.child.try_wait() {
                bail!(
                    "{} exited while starting ({status}); its log is above",
                    p.name
                );
            }
        }
        if Instant::now() >= deadline {
            bail!("{what} not ready within {READY_MS_MAX} ms");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `GET path` on `addr`: the status code, or None.
fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    http_get(addr, path).map(|(s, _)| s)
}

fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.split(' ').nth(1)?.parse().ok()?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// Whether the edge's `/metrics` shows a link up to each of `links` (`barrage_edge_link_up`).
fn linked_to_all(admin: SocketAddr, links: &[String]) -> bool {
    let Some((200, text)) = http_get(admin, "/metrics") else {
        return false;
    };
    links.iter().all(|link| {
        let quoted = format!("\"{link}\"");
        text.lines().any(|l| {
            l.starts_with("barrage_edge_link_up")
                && l.contains(&quoted)
                && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) == Some(1.0)
        })
    })
}

/// One NATS cluster to start (a region's, for `--regions`): `nodes` servers named
/// `<name>-<i>`, joined by routes when there is more than one, each with JetStream in a
/// directory of its own.
pub struct NatsPlan<'a> {
    /// Cluster name, and the prefix of each server's name.
    pub name: &'a str,
    pub nodes: usize,
    /// Node `i` (from 0) listens for clients on `port_base + 3i`, routes on `port_base + 3i + 1`
    /// and monitoring on `port_base + 3i + 2`; `None` picks free ports.
    pub port_base: Option<u16>,
    /// JetStream domain of these servers (regions), if any.
    pub domain: Option<&'a str>,
    /// Config text appended to every node's file, e.g. a `gateway {}` or `leafnodes {}` block.
    pub extra_conf: &'a str,
}

/// A NATS server [`start_nats`] started; its process is in the caller's list.
#[derive(Clone, Debug)]
pub struct NatsNode {
    pub name: String,
    pub client: SocketAddr,
    /// The route listener; `None` for a single server (no cluster block).
    pub route: Option<SocketAddr>,
    pub monitor: SocketAddr,
    pub pid: u32,
}

impl NatsNode {
    pub fn url(&self) -> String {
        format!("nats://{}", self.client)
    }
}

/// Every node's client URL, comma-separated: the brokers' `--backbone`.
pub fn nats_urls(nodes: &[NatsNode]) -> String {
    nodes
        .iter()
        .map(NatsNode::url)
        .collect::<Vec<_>>()
        .join(",")
}

/// One server's config file: JetStream in `store`, and with `routes` a cluster block listing
/// every node's route (its own included; NATS ignores a route to itself).
fn nats_conf(
    plan: &NatsPlan,
    node: &str,
    client: SocketAddr,
    monitor: SocketAddr,
    store: &Path,
    route: Option<(SocketAddr, &[SocketAddr])>,
) -> String {
    let mut c = format!(
        "server_name: {}\nlisten: {}\nhttp: {}\njetstream {{\n  store_dir: {}\n",
        q(node),
        q(&client.to_string()),
        q(&monitor.to_string()),
        q(&store.display().to_string()),
    );
    if let Some(domain) = plan.domain {
        c += &format!("  domain: {}\n", q(domain));
    }
    c += "}\n";
    if let Some((listen, routes)) = route {
        let routes = routes
            .iter()
            .map(|r| q(&format!("nats://{r}")))
            .collect::<Vec<_>>()
            .join(", ");
        c += &format!(
            "cluster {{\n  name: {}\n  listen: {}\n  routes: [{routes}]\n}}\n",
            q(plan.name),
            q(&listen.to_string()),
        );
    }
    c + plan.extra_conf
}

/// Starts the servers of `plan` (each a child in `procs`, with its files under `dir`) and waits
/// until every one is healthy: its monitoring `/healthz` answers 200, which for a cluster means
/// JetStream has a meta leader, so a stream at R3 can be created right away.
pub fn start_nats(
    nats: &Path,
    dir: &Path,
    plan: &NatsPlan,
    deadline: Instant,
    procs: &mut Vec<Proc>,
) -> anyhow::Result<Vec<NatsNode>> {
    if plan.nodes == 0 {
        bail!("a NATS cluster needs at least one node");
    }
    let port = |i: usize, k: usize| -> anyhow::Result<u16> {
        match plan.port_base {
            Some(base) => u16::try_from(usize::from(base) + 3 * i + k)
                .context("NATS port base too high for the node count"),
            None => free_port(),
        }
    };
    let mut ports = Vec::new();
    for i in 0..plan.nodes {
        ports.push((
            loopback(port(i, 0)?),
            loopback(port(i, 1)?),
            loopback(port(i, 2)?),
        ));
    }
    let routes: Vec<SocketAddr> = ports.iter().map(|p| p.1).collect();
    let mut nodes = Vec::new();
    for (i, &(client, route, monitor)) in ports.iter().enumerate() {
        let name = format!("{}-nats-{}", plan.name, i + 1);
        let store = dir.join(&name);
        std::fs::create_dir_all(&store).with_context(|| format!("creating {}", store.display()))?;
        let route = (plan.nodes > 1).then_some((route, routes.as_slice()));
        let conf = dir.join(format!("{name}.conf"));
        std::fs::write(
            &conf,
            nats_conf(plan, &name, client, monitor, &store, route),
        )
        .with_context(|| format!("writing {}", conf.display()))?;
        let child = Command::new(nats)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", nats.display()))?;
        let pid = child.id();
        procs.push(Proc {
            name: name.clone(),
            child,
        });
        nodes.push(NatsNode {
            name,
            client,
            route: route.map(|r| r.0),
            monitor,
            pid,
        });
    }
    for n in &nodes {
        wait_for(deadline, &n.name, procs, || {
            http_status(n.monitor, "/healthz") == Some(200)
        })?;
    }
    Ok(nodes)
}

struct Role {
    args: Vec<String>,
    name: String,
}

fn spawn(exe: &Path, role: Role, quiet_stdout: bool) -> anyhow::Result<Proc> {
    let mut cmd = Command::new(exe);
    cmd.args(&role.args)
        .stdin(Stdio::null())
        .stdout(if quiet_stdout {
            Stdio::null()
        } else {
            Stdio::inherit()
        })
        .stderr(Stdio::inherit());
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "warn");
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", role.name))?;
    Ok(Proc {
        name: role.name,
        child,
    })
}

fn sets(pairs: &[(&str, String)]) -> Vec<String> {
    pairs
        .iter()
        .flat_map(|(k, v)| ["--set".to_string(), format!("{k}={v}")])
        .collect()
}

pub fn run(args: ClusterArgs) -> anyhow::Result<()> {
    if args.brokers == 0 || args.edges == 0 || args.controls == 0 || args.nats == 0 {
        bail!("--brokers, --edges, --controls and --nats must be at least 1");
    }
    if args.replicas.unwrap_or(1) == 0 || args.replicas.unwrap_or(0) > args.nats.min(5) {
        bail!("--replicas must be between 1 and --nats (JetStream allows at most 5)");
    }
    let nats = nats_bin()?;
    let exe = std::env::current_exe().context("finding this binary")?;
    let mut shutdown = crate::up::Shutdown::register()?;
    let dir = std::env::temp_dir().join(format!("barrage-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = run_in(&args, &nats, &exe, &dir, &mut shutdown);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(
    args: &ClusterArgs,
    nats: &Path,
    exe: &Path,
    dir: &Path,
    shutdown: &mut crate::up::Shutdown,
) -> anyhow::Result<()> {
    let names = region_names(args)?;
    let keys = Keys {
        api_key: args.api_key.clone().unwrap_or_else(secret),
        token_keys: args
            .token_secret
            .clone()
            .map(|s| if s.contains(':') { s } else { format!("1:{s}") })
            .unwrap_or_else(|| format!("1:{}", secret())),
        edge_key: secret(),
        fleet_key: secret(),
    };
    let replicas = args.replicas.unwrap_or(if args.nats >= 3 { 3 } else { 1 });
    let deadline = Instant::now() + Duration::from_millis(READY_MS_MAX);
    // Started in this order, stopped in the reverse one.
    let mut procs: Vec<Proc> = Vec::new();

    // Every region's control address first: controls of each region poll the others'.
    let control_addrs: Vec<Vec<SocketAddr>> = names
        .iter()
        .map(|_| {
            (0..args.controls)
                .map(|_| free_port().map(loopback))
                .collect()
        })
        .collect::<anyhow::Result<_>>()?;
    // The first region's leafnode port (None: each of its servers picks one, read back from
    // its monitor) and the URLs the other regions dial.
    let mut leaf = if names.len() > 1 {
        let port = match (args.leaf_port, args.nats) {
            (Some(p), _) => Some(p),
            (None, 1) => Some(free_port()?),
            (None, _) => None,
        };
        let urls = match (&args.leaf_url, port) {
            (Some(url), _) => vec![url.clone()],
            (None, Some(port)) => vec![format!("nats-leaf://127.0.0.1:{port}")],
            (None, None) => Vec::new(),
        };
        Some((port, urls))
    } else {
        None
    };
    if let Some(only) = &args.only_region {
        if !names.contains(only) {
            bail!("--only-region {only:?} is not one of the regions {names:?}");
        }
    }
    let mut up = Vec::new();
    for (i, name) in names.iter().enumerate() {
        if args.only_region.as_ref().is_some_and(|o| o != name) {
            continue;
        }
        let plan = RegionPlan {
            name,
            all: &names,
            hub: i == 0,
            leaf: leaf.as_ref(),
            controls: &control_addrs[i],
            // With --only-region the other regions' controls run elsewhere, at addresses
            // this process does not know: none to poll.
            peer_controls: control_addrs
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i && args.only_region.is_none())
                .flat_map(|(_, a)| a.iter().copied())
                .collect(),
            replicas,
        };
        let region = start_region(args, nats, exe, dir, &keys, &plan, deadline, &mut procs)?;
        if let Some((None, urls)) = &mut leaf {
            if urls.is_empty() {
                // The hub's servers picked their leafnode ports: the others dial all of them.
                *urls = leaf_urls(&region.nats)?;
            }
        }
        up.push(region);
    }

    let out = serde_json::json!({
        "regions": up.iter().map(|r| r.json(replicas)).collect::<Vec<_>>(),
    });
    if args.json {
        println!("{out}");
    } else {
        for r in &up {
            r.print(args, replicas);
        }
        println!("  api key  {}", keys.api_key);
        println!(
            "  try: barrage push --ingest {} --api-key {} --room 1 '{{\"cmd\":\"HI\"}}'",
            up.iter()
                .flat_map(|r| r.brokers.iter().map(|b| b.ingest.to_string()))
                .collect::<Vec<_>>()
                .join(","),
            keys.api_key
        );
        println!("Ctrl-C stops every process.");
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();

    // Report children that die (a failover run kills brokers on purpose) until a signal.
    let mut reported = vec![false; procs.len()];
    watch(&mut procs, &mut reported, shutdown);
    stop_all(&mut procs);
    Ok(())
}

/// The region names: `--region-names`, else `local` for one region and `r1..rN` for more.
fn region_names(args: &ClusterArgs) -> anyhow::Result<Vec<String>> {
    let names: Vec<String> = match &args.region_names {
        Some(list) => list.split(',').map(|s| s.trim().to_owned()).collect(),
        None if args.regions <= 1 => vec!["local".into()],
        None => (1..=args.regions).map(|i| format!("r{i}")).collect(),
    };
    if names.is_empty() || args.regions == 0 {
        bail!("--regions must be at least 1");
    }
    if args.region_names.is_some() && names.len() != args.regions && args.regions != 1 {
        bail!(
            "--region-names lists {} regions, --regions says {}",
            names.len(),
            args.regions
        );
    }
    if names.len() > 1 {
        backbone::region::check(&names[0], &names)
            .map_err(|e| anyhow::anyhow!("--region-names: {e}"))?;
        if args.nats > 1 && args.leaf_port.is_some() {
            bail!("--leaf-port needs --nats 1 (several servers cannot share one port)");
        }
    }
    Ok(names)
}

/// The leafnode URL of each of the hub's servers, read from its monitor (`/varz`).
fn leaf_urls(nodes: &[NatsNode]) -> anyhow::Result<Vec<String>> {
    nodes
        .iter()
        .map(|n| {
            let (_, body) = http_get(n.monitor, "/varz").context("NATS monitor")?;
            // One JSON value, whatever chunk framing is around it (the monitor chunks 1.1 answers).
            let body = body.trim_start_matches(|c: char| c != '{');
            let v: serde_json::Value = serde_json::Deserializer::from_str(body)
                .into_iter()
                .next()
                .context("empty NATS /varz")?
                .context("NATS /varz")?;
            let port = v["leaf"]["port"]
                .as_u64()
                .context("no leafnode port in /varz")?;
            Ok(format!("nats-leaf://127.0.0.1:{port}"))
        })
        .collect()
}

/// Keys every region shares: one API key, one token key set (tokens are valid in every
/// region), one edge key.
struct Keys {
    api_key: String,
    token_keys: String,
    edge_key: String,
    /// Opens the fleet lists only: what each region's control polls the others with.
    fleet_key: String,
}

/// What one region is started with.
struct RegionPlan<'a> {
    name: &'a str,
    /// Every region's name (this one's included).
    all: &'a [String],
    /// The first region: its NATS listens for the others' leafnode connections.
    hub: bool,
    /// With several regions: the hub's leafnode port (None: each server picks one) and the
    /// URLs the others dial.
    leaf: Option<&'a (Option<u16>, Vec<String>)>,
    controls: &'a [SocketAddr],
    peer_controls: Vec<SocketAddr>,
    replicas: usize,
}

struct BrokerUp {
    node_id: String,
    ingest: SocketAddr,
    link: SocketAddr,
    http: SocketAddr,
    pid: u32,
}

struct EdgeUp {
    node_id: String,
    tcp: SocketAddr,
    ws: SocketAddr,
    admin: SocketAddr,
    pid: u32,
}

/// A region once every process of it is healthy.
struct RegionUp {
    name: String,
    nats: Vec<NatsNode>,
    controls: Vec<(SocketAddr, u32)>,
    brokers: Vec<BrokerUp>,
    edges: Vec<EdgeUp>,
}

impl RegionUp {
    fn json(&self, replicas: usize) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "control": format!("http://{}", self.controls[0].0),
            "control_pid": self.controls[0].1,
            "controls": self.controls.iter().map(|(a, pid)| serde_json::json!({
                "http": format!("http://{a}"),
                "pid": pid,
            })).collect::<Vec<_>>(),
            "brokers": self.brokers.iter().map(|b| serde_json::json!({
                "node_id": b.node_id,
                "http": format!("http://{}", b.http),
                "ingest": b.ingest.to_string(),
                "link": b.link.to_string(),
                "pid": b.pid,
            })).collect::<Vec<_>>(),
            "edges": self.edges.iter().map(|e| serde_json::json!({
                "node_id": e.node_id,
                "tcp": e.tcp.to_string(),
                "ws": e.ws.to_string(),
                "wss": null,
                "admin": format!("http://{}", e.admin),
                "pid": e.pid,
            })).collect::<Vec<_>>(),
            "nats": self.nats.iter().map(|n| serde_json::json!({
                "name": n.name,
                "url": n.url(),
                "route": n.route.map(|r| format!("nats://{r}")),
                "monitor": format!("http://{}", n.monitor),
                "pid": n.pid,
            })).collect::<Vec<_>>(),
            "replicas": replicas,
        })
    }

    fn print(&self, args: &ClusterArgs, replicas: usize) {
        println!(
            "barrage cluster: region {}: {} brokers, {} edges on NATS JetStream ({}, stream R{replicas})",
            self.name,
            args.brokers,
            args.edges,
            nats_urls(&self.nats)
        );
        for n in &self.nats {
            println!(
                "  {}  {}  monitor http://{}  pid {}",
                n.name,
                n.url(),
                n.monitor,
                n.pid
            );
        }
        for (i, (a, pid)) in self.controls.iter().enumerate() {
            println!("  control-{}  http://{a}  pid {pid}  (POST /v1/connect, GET /v1/brokers, GET /v1/edges)", i + 1);
        }
        for b in &self.brokers {
            println!(
                "  {}  http://{}  ingest {}  pid {}",
                b.node_id, b.http, b.ingest, b.pid
            );
        }
        for e in &self.edges {
            println!(
                "  {}    tcp {}  ws ws://{}/sub  admin http://{}  pid {}",
                e.node_id, e.tcp, e.ws, e.admin, e.pid
            );
        }
    }
}

/// Starts one region: its NATS (with regions: JetStream domain = region name, joined to the
/// hub region by a leafnode), its controls, brokers and edges, and waits until all are healthy.
#[allow(clippy::too_many_arguments)]
fn start_region(
    args: &ClusterArgs,
    nats: &Path,
    exe: &Path,
    dir: &Path,
    keys: &Keys,
    plan: &RegionPlan,
    deadline: Instant,
    procs: &mut Vec<Proc>,
) -> anyhow::Result<RegionUp> {
    let federated = plan.all.len() > 1;
    // Node ids are unique across regions (control registries and dedup keys span them).
    let prefix = if federated {
        format!("{}-", plan.name)
    } else {
        String::new()
    };
    let leaf_conf = match plan.leaf {
        Some((Some(port), urls)) if plan.hub => {
            // The hub tells its leafnodes where to reconnect: the URL they dial (a partition
            // test puts a proxy there), not the port it listens on.
            let url = urls.first().map_or("", String::as_str);
            let advertise = url.rsplit("//").next().unwrap_or(url);
            format!(
                "leafnodes {{\n  listen: {}\n  advertise: {}\n}}\n",
                q(&format!("{}:{port}", args.leaf_host)),
                q(advertise)
            )
        }
        Some((None, _)) if plan.hub => format!(
            "leafnodes {{\n  listen: {}\n}}\n",
            q(&format!("{}:-1", args.leaf_host))
        ),
        Some((_, urls)) => format!(
            "leafnodes {{\n  remotes: [ {{ urls: [{}] }} ]\n}}\n",
            urls.iter().map(|u| q(u)).collect::<Vec<_>>().join(", ")
        ),
        None => String::new(),
    };
    let nats_nodes = start_nats(
        nats,
        dir,
        &NatsPlan {
            name: plan.name,
            nodes: args.nats,
            port_base: None,
            domain: federated.then_some(plan.name),
            extra_conf: &leaf_conf,
        },
        deadline,
        procs,
    )?;
    let backbone = nats_urls(&nats_nodes);

    let mut controls = Vec::new();
    for (i, addr) in plan.controls.iter().enumerate() {
        let mut set = vec![
            ("http_addr", q(&addr.to_string())),
            ("api_keys", format!("[{}]", q(&keys.api_key))),
            ("token_keys", q(&keys.token_keys)),
            ("edge_key", q(&keys.edge_key)),
            ("edge_ttl_ms", TTL_MS.to_string()),
            ("edge_forget_ms", (TTL_MS * 30).to_string()),
        ];
        if federated {
            set.extend(control_region_sets(plan, keys));
        }
        procs.push(spawn(
            exe,
            Role {
                name: format!("{prefix}control-{}", i + 1),
                args: [vec!["control".to_string()], sets(&set)].concat(),
            },
            true,
        )?);
        controls.push((*addr, procs.last().map_or(0, Proc::pid)));
    }
    for (addr, _) in &controls {
        let addr = *addr;
        wait_for(deadline, "control", procs, || {
            http_status(addr, "/healthz") == Some(200)
        })?;
    }
    // Edges and brokers heartbeat every replica of their region's control.
    let control_list = controls
        .iter()
        .map(|c| c.0.to_string())
        .collect::<Vec<_>>()
        .join(",");

    // One link key per edge, bound to its node id, known to every broker of the region.
    let edge_ids: Vec<String> = (1..=args.edges)
        .map(|i| format!("{prefix}edge-{i}"))
        .collect();
    let link_keys: Vec<(String, String)> = edge_ids.iter().map(|e| (e.clone(), secret())).collect();
    let link_keys_toml = format!(
        "[{}]",
        link_keys
            .iter()
            .map(|(e, k)| q(&format!("{e}:{k}")))
            .collect::<Vec<_>>()
            .join(",")
    );
    let regions_toml = format!(
        "[{}]",
        plan.all.iter().map(|r| q(r)).collect::<Vec<_>>().join(",")
    );
    let mut brokers = Vec::new();
    for i in 1..=args.brokers {
        let (ingest, link, http) = (
            loopback(free_port()?),
            loopback(free_port()?),
            loopback(free_port()?),
        );
        let node_id = format!("{prefix}broker-{i}");
        let mut set = vec![
            ("node_id", q(&node_id)),
            ("region", q(plan.name)),
            ("shards", args.shards.to_string()),
            ("pin", "false".into()),
            ("ingest_addr", q(&ingest.to_string())),
            ("link_addr", q(&link.to_string())),
            ("http_addr", q(&http.to_string())),
            ("api_keys", format!("[{{key={}}}]", q(&keys.api_key))),
            ("link_keys", link_keys_toml.clone()),
            ("control_addr", q(&control_list)),
            ("control_key", q(&keys.edge_key)),
            ("control_heartbeat_ms", HEARTBEAT_MS.to_string()),
            ("link_ping_ms", "500".into()),
            ("link_dead_ms", "2000".into()),
            ("cluster.partitions", args.partitions.to_string()),
            ("cluster.lease_ms", args.lease_ms.to_string()),
            ("cluster.replicas", plan.replicas.to_string()),
        ];
        if federated {
            set.push(("cluster.regions", regions_toml.clone()));
            if let Some(lag) = args.cross_region_max_lag_ms {
                set.push(("cluster.cross_region_max_lag_ms", lag.to_string()));
            }
        }
        let mut a = vec!["broker".to_string(), "--backbone".into(), backbone.clone()];
        a.extend(sets(&set));
        // Given after the defaults above, so they override them.
        for kv in &args.broker_sets {
            a.extend(["--set".to_string(), kv.clone()]);
        }
        procs.push(spawn(
            exe,
            Role {
                name: node_id.clone(),
                args: a,
            },
            true,
        )?);
        let pid = procs.last().map_or(0, Proc::pid);
        brokers.push(BrokerUp {
            node_id,
            ingest,
            link,
            http,
            pid,
        });
    }
    for b in &brokers {
        let http = b.http;
        wait_for(deadline, &b.node_id, procs, || {
            http_status(http, "/healthz") == Some(200)
        })?;
    }
    // Every broker in every control's registry before the edges ask for it.
    wait_for(deadline, "broker registration", procs, || {
        controls.iter().all(|c| {
            http_get(c.0, "/v1/brokers").is_some_and(|(s, body)| {
                s == 200 && body.matches("\"alive\":true").count() >= args.brokers
            })
        })
    })?;

    let mut edges = Vec::new();
    for (id, key) in &link_keys {
        let (tcp, ws, admin) = (
            loopback(free_port()?),
            loopback(free_port()?),
            loopback(free_port()?),
        );
        let a = [
            vec!["edge".to_string()],
            sets(&[
                ("node_id", q(id)),
                ("region", q(plan.name)),
                ("shards", args.shards.to_string()),
                ("pin", "false".into()),
                ("tcp_addr", q(&tcp.to_string())),
                ("ws_addr", q(&ws.to_string())),
                ("admin_addr", q(&admin.to_string())),
                ("public_host", q("127.0.0.1")),
                ("token_keys", q(&keys.token_keys)),
                ("control_addr", q(&control_list)),
                ("control_heartbeat_ms", HEARTBEAT_MS.to_string()),
                ("edge_key", q(&keys.edge_key)),
                ("link_key", q(key)),
                ("brokers_from_control", "true".into()),
                ("link_ping_ms", "500".into()),
                ("link_dead_ms", "2000".into()),
                ("link_backoff_ms_max", "1000".into()),
            ]),
        ]
        .concat();
        procs.push(spawn(
            exe,
            Role {
                name: id.clone(),
                args: a,
            },
            true,
        )?);
        let pid = procs.last().map_or(0, Proc::pid);
        edges.push(EdgeUp {
            node_id: id.clone(),
            tcp,
            ws,
            admin,
            pid,
        });
    }
    let links: Vec<String> = brokers.iter().map(|b| b.link.to_string()).collect();
    for e in &edges {
        let admin = e.admin;
        // Ready = linked to every broker (learned from control) and registered with control.
        wait_for(deadline, &e.node_id, procs, || {
            http_status(admin, "/readyz") == Some(200) && linked_to_all(admin, &links)
        })?;
    }
    wait_for(deadline, "edge registration", procs, || {
        controls.iter().all(|c| {
            http_get(c.0, "/v1/edges").is_some_and(|(s, body)| {
                s == 200 && body.matches("\"state\":\"up\"").count() >= args.edges
            })
        })
    })?;
    Ok(RegionUp {
        name: plan.name.to_owned(),
        nats: nats_nodes,
        controls,
        brokers,
        edges,
    })
}

/// A region's control with others: its region (clients naming none are its own), the other
/// regions' controls it polls for their edges (fallbacks in `host_list`), with the shared
/// fleet key that opens their lists and nothing else.
fn control_region_sets(plan: &RegionPlan, keys: &Keys) -> Vec<(&'static str, String)> {
    let peers = plan
        .peer_controls
        .iter()
        .map(|a| q(&a.to_string()))
        .collect::<Vec<_>>()
        .join(",");
    vec![
        ("region", q(plan.name)),
        ("default_region", q(plan.name)),
        ("peers", format!("[{peers}]")),
        ("peer_key", q(&keys.fleet_key)),
        ("fleet_keys", format!("[{}]", q(&keys.fleet_key))),
        ("peer_poll_ms", HEARTBEAT_MS.to_string()),
    ]
}

/// Waits for SIGINT/SIGTERM, logging each child that exits meanwhile.
fn watch(procs: &mut [Proc], reported: &mut [bool], shutdown: &mut crate::up::Shutdown) {
    loop {
        // A pending SIGINT/SIGTERM ends the wait at once (SIGHUP is not caught here).
        if matches!(
            shutdown.drain_until(Instant::now(), || 1),
            crate::up::Drained::Interrupted(_)
        ) {
            return;
        }
        for (i, p) in procs.iter_mut().enumerate() {
            if reported[i] {
                continue;
            }
            if let Ok(Some(status)) = p.child.try_wait() {
                reported[i] = true;
                eprintln!(
                    "barrage cluster: {} (pid {}) exited: {status}",
                    p.name,
                    p.pid()
                );
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGTERM to every child in reverse start order, SIGKILL after [`STOP_MS_MAX`].
fn stop_all(procs: &mut Vec<Proc>) {
    for p in procs.iter_mut().rev() {
        // kill(1) for SIGTERM (this crate forbids unsafe code, so no kill(2)); without it, the
        // child is killed outright.
        let termed = Command::new("kill")
            .args(["-TERM", &p.pid().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !termed {
            let _ = p.child.kill();
        }
    }
    let deadline = Instant::now() + Duration::from_millis(STOP_MS_MAX);
    while Instant::now() < deadline
        && procs
            .iter_mut()
            .any(|p| matches!(p.child.try_wait(), Ok(None)))
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Drop SIGKILLs what is left.
    while let Some(p) = procs.pop() {
        drop(p);
    }
}
