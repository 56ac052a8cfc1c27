//! The coordinator of a live scenario: plans connections over processes and threads, drives the
//! phases (ramp, warm-up, measured steps, drain), prints a progress line once per second, samples
//! the server processes, and builds the report.
//!
//! Processes: above `--per-process` connections (one process's descriptor budget), the viewers
//! run in child processes of this same binary (`loadtest worker`), which read their plan and
//! commands on stdin and write their reports as JSON lines on stdout; the coordinator merges them
//! exactly as it merges its own threads.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use crossbeam_channel::{Receiver, Sender};
use serde::{Deserialize, Serialize};

use crate::charts::{Point, Timeline};
use crate::cli::{Common, Transport};
use crate::procstat::{self, Sampler, Totals};
use crate::progress::Progress;
use crate::publisher::{Publisher, PublisherCfg};
use crate::report::{self, Connects, Machine, Step, Totals2};
use crate::stats::{apportion, zipf_weights, Stats};
use crate::viewer::{self, ConnSpec, Mode, Report as Msg, Shared, ThreadPlan, ViewerCfg};

/// Overrides the binary spawned for worker processes (default: the running one).
pub const WORKER_EXE_ENV: &str = "BARRAGE_LOADTEST_EXE";
/// Thread ids of child `i` start at `i * THREAD_IDS_PER_PROCESS`.
const THREAD_IDS_PER_PROCESS: u32 = 1000;
/// Time after the publisher stops for in-flight batches to arrive before loss is counted.
pub const DRAIN_MS: u64 = 2000;
/// The drain goes on while messages still arrive, up to this long.
pub const DRAIN_MS_MAX: u64 = 20_000;
/// After a step ends, time for the threads' last window of it to arrive.
const STEP_FLUSH_MS: u64 = 300;

/// What a scenario wants from the run.
#[derive(Clone, Debug)]
pub enum Kind {
    Idle,
    /// Publish steps: a rate each, `step_ms` long, stop when p99 > `p99_ms_max` or loss appears.
    Publish {
        steps: Vec<u32>,
        step_ms: u64,
        p99_ms_max: u64,
        zipf: f64,
        publish_zipf: bool,
    },
    Churn {
        connects_per_s: u32,
        hold_ms: u64,
    },
}

/// The plan a child process gets on its first stdin line.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerPlan {
    pub cfg: ViewerCfg,
    pub rooms: usize,
    pub threads: Vec<ThreadPlan>,
}

/// Checks that `addr` (host:port or URL) is loopback unless remote targets are allowed.
pub fn check_target(what: &str, addr: &str, allow_remote: bool) -> anyhow::Result<()> {
    if allow_remote {
        return Ok(());
    }
    let hp = crate::client::host_port(addr);
    let addrs: Vec<SocketAddr> = hp
        .to_socket_addrs()
        .with_context(|| format!("{what}: cannot resolve {hp}"))?
        .collect();
    if addrs.is_empty() || addrs.iter().any(|a| !a.ip().is_loopback()) {
        bail!("{what} {hp} is not a loopback address; pass --allow-remote to load a remote target");
    }
    Ok(())
}

/// Merges thread reports as they arrive.
#[derive(Default)]
struct Agg {
    live: BTreeMap<u32, u64>,
    attempted: BTreeMap<u32, u64>,
    per_step: BTreeMap<u32, Stats>,
    total: Stats,
    /// Since the last progress line.
    recent: Stats,
    done: usize,
    open_peak: u64,
}

impl Agg {
    fn take(&mut self, m: Msg) {
        let (step, stats) = match m {
            Msg::Window {
                thread,
                step,
                live,
                attempted,
                stats,
            } => {
                self.live.insert(thread, live);
                self.attempted.insert(thread, attempted);
                (step, stats)
            }
            Msg::Done { step, stats, .. } => {
                self.done += 1;
                (step, stats)
            }
        };
        self.per_step.entry(step).or_default().merge(&stats);
        self.total.merge(&stats);
        self.recent.merge(&stats);
        self.open_peak = self.open_peak.max(self.live());
    }

    fn live(&self) -> u64 {
        self.live.values().sum()
    }

    fn attempted(&self) -> u64 {
        self.attempted.values().sum()
    }
}

/// A running set of viewer threads and child processes.
struct Fleet {
    shared: Arc<Shared>,
    rx: Receiver<Msg>,
    threads: Vec<std::thread::JoinHandle<()>>,
    children: Vec<(Child, ChildStdin)>,
    n_threads: usize,
}

impl Fleet {
    fn start(plans: Vec<Vec<ThreadPlan>>, cfg: &ViewerCfg, rooms: usize) -> anyhow::Result<Fleet> {
        let shared = Shared::new(rooms);
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut fleet = Fleet {
            shared: shared.clone(),
            rx,
            threads: Vec::new(),
            children: Vec::new(),
            n_threads: 0,
        };
        if plans.len() == 1 {
            for plan in plans.into_iter().flatten() {
                fleet.n_threads += 1;
                let (cfg, shared, tx) = (cfg.clone(), shared.clone(), tx.clone());
                fleet.threads.push(
                    std::thread::Builder::new()
                        .name(format!("viewer-{}", plan.thread))
                        .spawn(move || viewer::run_thread(plan, cfg, shared, tx))?,
                );
            }
            return Ok(fleet);
        }
        // Workers are this same binary (`barrage` or `loadtest`) in its hidden `loadtest worker`
        // mode; `BARRAGE_LOADTEST_EXE` names another one (the tests use the crate's own binary).
        let exe = match std::env::var_os(WORKER_EXE_ENV) {
            Some(p) => std::path::PathBuf::from(p),
            None => std::env::current_exe()?,
        };
        for threads in plans {
            fleet.n_threads += threads.len();
            let plan = WorkerPlan {
                cfg: cfg.clone(),
                rooms,
                threads,
            };
            let mut child = Command::new(&exe)
                .args(["loadtest", "worker"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("spawning {} loadtest worker", exe.display()))?;
            let mut stdin = child.stdin.take().context("child stdin")?;
            let stdout = child.stdout.take().context("child stdout")?;
            writeln!(stdin, "{}", serde_json::to_string(&plan)?)?;
            stdin.flush()?;
            let tx: Sender<Msg> = tx.clone();
            fleet.threads.push(std::thread::spawn(move || {
                for line in std::io::BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    match serde_json::from_str::<Msg>(&line) {
                        Ok(m) => {
                            let _ = tx.send(m);
                        }
                        Err(e) => eprintln!("loadtest: bad worker line ({e}): {line:.200}"),
                    }
                }
            }));
            fleet.children.push((child, stdin));
        }
        Ok(fleet)
    }

    /// This process and its workers: the load generator's own CPU.
    fn load_pids(&self) -> Vec<u32> {
        let mut v = vec![std::process::id()];
        v.extend(self.children.iter().map(|(c, _)| c.id()));
        v
    }

    fn command(&mut self, line: &str) {
        for (_, stdin) in &mut self.children {
            let _ = writeln!(stdin, "{line}");
            let _ = stdin.flush();
        }
    }

    fn set_step(&mut self, step: u32) {
        self.shared.step.store(step, Ordering::Release);
        self.command(&format!("step {step}"));
    }

    /// Churn stops opening connections (those open stay until their hold ends).
    fn pause(&mut self) {
        self.shared.paused.store(true, Ordering::Release);
        self.command("pause");
    }

    fn set_publishing(&mut self) {
        self.shared.publishing.store(true, Ordering::Release);
        self.command("publishing");
    }

    /// Stops every viewer after giving the children the publisher's final counts.
    fn stop(&mut self) {
        let load = |v: &Vec<std::sync::atomic::AtomicU64>| -> Vec<u64> {
            v.iter().map(|a| a.load(Ordering::Acquire)).collect()
        };
        let issued = load(&self.shared.issued);
        let rejected = load(&self.shared.rejected);
        self.command(&format!(
            "stop {} {}",
            serde_json::to_string(&issued).unwrap_or_default(),
            serde_json::to_string(&rejected).unwrap_or_default()
        ));
        self.shared.stop.store(true, Ordering::Release);
    }
}

/// The coordinator's view of one run.
struct Run<'a> {
    common: &'a Common,
    fleet: Fleet,
    agg: Agg,
    sampler: Sampler,
    target: u64,
    last_progress: Instant,
    phase: &'static str,
    publisher: Option<Publisher>,
    /// The measured step now (0: ramp, warm-up, drain), for the charts.
    step: u32,
    started: Instant,
    /// Server CPU seconds at the last progress second.
    last_cpu_s: f64,
    timeline: Timeline,
    bars: Progress,
}

impl Run<'_> {
    /// Receives reports for `d`, printing progress once per second.
    fn pump(&mut self, d: Duration) {
        let end = Instant::now() + d;
        loop {
            let now = Instant::now();
            if now >= end {
                break;
            }
            let wait = (end - now).min(Duration::from_millis(100));
            if let Ok(m) = self.fleet.rx.recv_timeout(wait) {
                self.agg.take(m);
                while let Ok(m) = self.fleet.rx.try_recv() {
                    self.agg.take(m);
                }
            }
            if self.last_progress.elapsed() >= Duration::from_secs(1) {
                self.progress();
            }
        }
    }

    fn progress(&mut self) {
        let secs = self.last_progress.elapsed().as_secs_f64().max(0.001);
        let r = std::mem::take(&mut self.agg.recent);
        let published = self.publisher.as_ref().map(|p| p.stats().sent);
        let deliveries_per_s = r.delivered as f64 / secs;
        let cpu_s = self.sampler.now().cpu_s;
        let cpu_delta = cpu_s - self.last_cpu_s;
        self.last_cpu_s = cpu_s;
        let has_pids = !self.sampler.pids().is_empty();
        self.timeline.push(Point {
            t_s: self.started.elapsed().as_secs_f64(),
            step: self.step,
            p50_ms: r.latency.ms_at(0.5),
            p99_ms: r.latency.ms_at(0.99),
            deliveries_per_s,
            connections: self.agg.live(),
            server_cpu_s_per_million: (has_pids && r.delivered > 0)
                .then(|| cpu_delta / r.delivered as f64 * 1e6),
        });
        let figures = format!(
            "{:.0} msgs/s delivered | p99 {:.1} ms | gaps {} dups {}{}",
            deliveries_per_s,
            r.latency.ms_at(0.99),
            self.agg.total.gap_events,
            self.agg.total.duplicates,
            published.map_or(String::new(), |p| format!(" | published {p}")),
        );
        if self.bars.visible() {
            self.bars.update(
                self.agg.live(),
                self.agg.total.connect_failures_total(),
                self.started.elapsed().as_secs(),
                self.phase,
                &figures,
            );
        } else {
            eprintln!(
                "[{:>7}] connected {}/{} (failed {}) | {figures}",
                self.phase,
                self.agg.live(),
                self.target,
                self.agg.total.connect_failures_total(),
            );
        }
        self.last_progress = Instant::now();
    }

    /// Tells the viewers which step their windows belong to, and remembers it for the charts.
    fn set_step(&mut self, step: u32) {
        self.step = step;
        self.fleet.set_step(step);
    }

    /// Churn's end: stops opening connections, then compares the connections open now with
    /// the broker's presence (`GET /v1/presence/top`, total `connections`) until two readings
    /// in a row agree and did not change, or [`PRESENCE_SETTLE_MS`] pass.
    fn presence_check(&mut self) -> report::PresenceCheck {
        self.fleet.pause();
        let started = Instant::now();
        let mut last: Option<(u64, Option<u64>)> = None;
        loop {
            // A window from every thread (they ship every WINDOW_MS) before reading `live`.
            self.pump(Duration::from_millis(PRESENCE_READ_MS));
            let open = self.agg.live();
            let presence = presence_connections(&self.common.broker_http, &self.common.api_key);
            let now = (open, presence.as_ref().ok().copied());
            let settled = last == Some(now) && now.1 == Some(open);
            let out_of_time = started.elapsed() >= Duration::from_millis(PRESENCE_SETTLE_MS);
            if settled || out_of_time {
                let check = report::PresenceCheck {
                    open_connections: open,
                    presence_connections: now.1,
                    equal: now.1 == Some(open),
                    error: presence.err().map(|e| e.to_string()),
                    settle_ms: started.elapsed().as_millis() as u64,
                };
                self.bars.println(&format!(
                    "presence: {} connections open, broker presence {} -> {}",
                    open,
                    now.1.map_or("unknown".into(), |p| p.to_string()),
                    if check.equal { "equal" } else { "DIFFERENT" }
                ));
                return check;
            }
            last = Some(now);
        }
    }

    /// Waits until every planned connection has either opened or failed (or the ramp times out).
    fn ramp(&mut self, ramp_per_s: u32) -> f64 {
        let start = Instant::now();
        let limit =
            Duration::from_secs_f64(self.target as f64 / f64::from(ramp_per_s.max(1)) * 2.0 + 15.0);
        while start.elapsed() < limit {
            self.pump(Duration::from_millis(200));
            let settled = self.agg.total.connects_ok + self.agg.total.connect_failures_total();
            if settled >= self.target && self.agg.attempted() >= self.target {
                break;
            }
        }
        start.elapsed().as_secs_f64()
    }

    /// Waits at least [`DRAIN_MS`] for batches still on their way, and longer (up to
    /// [`DRAIN_MS_MAX`]) while deliveries keep arriving: loss is counted only after this.
    fn drain(&mut self) {
        let start = Instant::now();
        let mut last = self.agg.total.delivered;
        let mut quiet_since = Instant::now();
        while start.elapsed() < Duration::from_millis(DRAIN_MS_MAX) {
            self.pump(Duration::from_millis(250));
            if self.agg.total.delivered != last {
                last = self.agg.total.delivered;
                quiet_since = Instant::now();
            }
            if start.elapsed() >= Duration::from_millis(DRAIN_MS)
                && quiet_since.elapsed() >= Duration::from_millis(1500)
            {
                break;
            }
        }
    }

    fn stop_viewers(&mut self) {
        self.fleet.stop();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.agg.done < self.fleet.n_threads && Instant::now() < deadline {
            if let Ok(m) = self.fleet.rx.recv_timeout(Duration::from_millis(200)) {
                self.agg.take(m);
            }
        }
        for (mut child, stdin) in self.fleet.children.drain(..) {
            drop(stdin);
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        for t in self.fleet.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// About how long a run takes: ramp at `--ramp-per-s`, warm-up, the steps or `--duration-ms`,
/// and the drain (the progress bar's length; it grows if the run takes longer).
fn planned_s(common: &Common, kind: &Kind, target: u64) -> u64 {
    let ramp = target / u64::from(common.ramp_per_s.max(1));
    let measured = match kind {
        Kind::Publish { steps, step_ms, .. } => steps.len() as u64 * step_ms,
        _ => common.duration_ms,
    };
    ramp + (common.warmup_ms + measured + DRAIN_MS) / 1000
}

/// CPU seconds of each pid now.
fn cpu_by_pid(pids: &[u32]) -> BTreeMap<u32, f64> {
    pids.iter()
        .map(|&p| (p, procstat::read(&[p]).cpu_s))
        .collect()
}

fn cpu_delta(a: &BTreeMap<u32, f64>, b: &BTreeMap<u32, f64>) -> BTreeMap<u32, f64> {
    b.iter()
        .map(|(p, v)| (*p, v - a.get(p).copied().unwrap_or(0.0)))
        .collect()
}

fn step_of(
    stats: &Stats,
    step: u32,
    rate: u32,
    secs: f64,
    published: u64,
    cpu: f64,
    has_pids: bool,
) -> Step {
    let disconnects: u64 = stats.disconnects.values().sum();
    Step {
        step,
        rate_target: rate,
        seconds: secs,
        published_per_s: published as f64 / secs,
        delivered: stats.delivered,
        deliveries_per_s: stats.delivered as f64 / secs,
        latency: stats.latency.summary(),
        gap_events: stats.gap_events,
        duplicates: stats.duplicates,
        out_of_order: stats.out_of_order,
        disconnects,
        connects_ok: stats.connects_ok,
        connects_per_s: stats.connects_ok as f64 / secs,
        connect_ms: stats.connect.summary(),
        connect_failures: stats.connect_failures_total(),
        bytes_per_delivery: if stats.delivered > 0 {
            stats.bytes_read as f64 / stats.delivered as f64
        } else {
            0.0
        },
        server_cpu_s: cpu,
        server_cpu_s_per_million: (has_pids && stats.delivered > 0)
            .then(|| cpu / stats.delivered as f64 * 1e6),
        server_cores: cpu / secs,
        server_cpu_s_by_pid: BTreeMap::new(),
        loadtest_cpu_s: 0.0,
    }
}

fn parse_sources(common: &Common) -> anyhow::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for s in &common.sources {
        let ip: IpAddr = s
            .trim()
            .parse()
            .with_context(|| format!("--sources: {s} is not an IP address"))?;
        if !common.allow_remote && !ip.is_loopback() {
            bail!("--sources {ip} is not loopback; pass --allow-remote");
        }
        out.push(ip);
    }
    if out.is_empty() {
        out.push(IpAddr::from([127, 0, 0, 1]));
    }
    Ok(out)
}

/// Runs a live scenario and returns its report (also printed, and written to `--json`).
/// Why a run's memory per connection is not a measurement, if it is not: the loaded sample
/// must see exactly the planned connections, all authenticated. Failed or retried handshakes
/// leave heap behind in the server (glibc keeps what it touched), and the delta would be
/// divided by fewer connections; such runs read 15-35 % high here. `None` also when there is
/// nothing to measure (no pids, churn).
fn memory_withheld(has_pids: bool, target: u64, failed: u64, open: u64) -> Option<String> {
    (has_pids && target > 0 && (failed > 0 || open != target)).then(|| {
        format!("{failed} connects failed, {open} of {target} open; rerun (slower --ramp-per-s, fresh servers)")
    })
}

pub fn run(
    common: &Common,
    kind: Kind,
    scenario: &str,
    args_json: serde_json::Value,
) -> anyhow::Result<report::Report> {
    check_target("--control", &common.control, common.allow_remote)?;
    if matches!(kind, Kind::Publish { .. }) {
        let addr = match common.publish_via {
            crate::cli::PublishVia::Ingest => &common.ingest,
            crate::cli::PublishVia::Http => &common.broker_http,
        };
        check_target("broker", addr, common.allow_remote)?;
    }
    let sources = parse_sources(common)?;
    let _ = net::sys::raise_nofile_limit();
    let started_at_unix_s = viewer::unix_us() / 1_000_000;

    // Rooms and their weights.
    let n_rooms = common.rooms.max(1) as usize;
    let rooms: Vec<u64> = (0..n_rooms as u64).map(|i| common.room_base + i).collect();
    let (zipf, publish_zipf) = match &kind {
        Kind::Publish {
            zipf, publish_zipf, ..
        } => (*zipf, *publish_zipf),
        _ => (0.0, false),
    };
    let weights = zipf_weights(n_rooms, zipf);

    // Plan: connections over processes and threads.
    let threads_per_process = common.threads.unwrap_or_else(net::runtime::cores).max(1);
    let target = match &kind {
        Kind::Churn { .. } => 0,
        _ => u64::from(common.viewers),
    };
    let processes = match &kind {
        Kind::Churn { .. } => 1,
        _ => (target.div_ceil(u64::from(common.per_process.max(1)))).max(1) as usize,
    };
    let n_threads_total = processes * threads_per_process;
    let mut plans: Vec<Vec<ThreadPlan>> = Vec::new();
    match &kind {
        Kind::Churn {
            connects_per_s,
            hold_ms,
        } => {
            plans.push(
                (0..threads_per_process)
                    .map(|t| ThreadPlan {
                        thread: t as u32,
                        mode: Mode::Churn {
                            rooms: rooms.clone(),
                            sources: sources.clone(),
                            transport: common.transport,
                            connects_per_s: f64::from(*connects_per_s) / threads_per_process as f64,
                            hold_ms: *hold_ms,
                            seed: common.seed,
                        },
                    })
                    .collect(),
            );
        }
        _ => {
            let counts = apportion(target, &weights);
            let mut conns: Vec<Vec<Vec<ConnSpec>>> =
                vec![vec![Vec::new(); threads_per_process]; processes];
            let mut i: u64 = 0;
            // Round-robin over rooms so every room fills during the ramp, not one after another.
            let mut left = counts.clone();
            while i < target {
                for (r, l) in left.iter_mut().enumerate() {
                    if *l == 0 {
                        continue;
                    }
                    *l -= 1;
                    let ws = match common.transport {
                        Transport::Tcp | Transport::Udp => false,
                        Transport::Ws => true,
                        Transport::Mix => i % 2 == 1,
                    };
                    let spec = ConnSpec {
                        room_idx: r as u32,
                        room: rooms[r],
                        ws,
                        udp: common.transport == Transport::Udp,
                        source: sources[(i as usize) % sources.len()],
                        uid: 1_000_000 + common.seed * 10_000_000 + i,
                        edge_pick: i as u32,
                    };
                    let p = (i as usize) % processes;
                    let t = (i as usize / processes) % threads_per_process;
                    conns[p][t].push(spec);
                    i += 1;
                }
            }
            let ramp = f64::from(common.ramp_per_s.max(1)) / n_threads_total as f64;
            for (p, per_thread) in conns.into_iter().enumerate() {
                plans.push(
                    per_thread
                        .into_iter()
                        .enumerate()
                        .map(|(t, conns)| ThreadPlan {
                            thread: p as u32 * THREAD_IDS_PER_PROCESS + t as u32,
                            mode: Mode::Hold {
                                conns,
                                ramp_per_s: ramp,
                            },
                        })
                        .collect(),
                );
            }
        }
    }

    let cfg = ViewerCfg {
        control: common.control.clone(),
        control_key: common.control_key.clone(),
        danmu_info: common.danmu_info,
        ticket_per_room: common.ticket_per_room,
        protover: common.protover,
        heartbeat_ms: common.heartbeat_ms,
        connect_timeout_ms: common.connect_timeout_ms,
        allow_remote: common.allow_remote,
        decode_cache: !common.no_decode_cache,
        spread_edges: common.spread_edges,
        driver: common.driver,
        udp_loss_pct: common.udp_loss_pct.clamp(0.0, 100.0),
    };

    let mut pids = common.pids.clone();
    if !common.procs.is_empty() {
        pids.extend(procstat::find_pids(&common.procs));
    }
    pids.sort_unstable();
    pids.dedup();
    if !common.procs.is_empty() && pids.is_empty() {
        eprintln!(
            "loadtest: no process matched --procs {:?}; server cost will not be reported",
            common.procs
        );
    }
    let sampler = Sampler::start(pids.clone(), Duration::from_millis(500));
    let baseline = sampler.now();

    let fleet = Fleet::start(plans, &cfg, n_rooms)?;
    let mut run = Run {
        common,
        fleet,
        agg: Agg::default(),
        sampler,
        target,
        last_progress: Instant::now(),
        phase: "ramp",
        publisher: None,
        step: 0,
        started: Instant::now(),
        last_cpu_s: baseline.cpu_s,
        timeline: Timeline::default(),
        bars: Progress::new(
            common.json.is_some(),
            target,
            planned_s(common, &kind, target),
        ),
    };
    let has_pids = !pids.is_empty();
    let mut steps = Vec::new();
    let mut stop_reason = "completed".to_string();
    let mut loaded = Totals::default();
    let mut ramp_s = 0.0;
    let mut pub_stats = None;
    let mut presence = None;

    let result: anyhow::Result<()> = (|| {
        match &kind {
            Kind::Idle => {
                ramp_s = run.ramp(common.ramp_per_s);
                run.phase = "warmup";
                run.pump(Duration::from_millis(common.warmup_ms));
                loaded = run.sampler.now();
                run.phase = "hold";
                run.set_step(1);
                let c0 = run.sampler.now();
                let t0 = Instant::now();
                run.pump(Duration::from_millis(common.duration_ms));
                run.set_step(0);
                run.pump(Duration::from_millis(STEP_FLUSH_MS));
                let cpu = run.sampler.now().cpu_s - c0.cpu_s;
                let s = run.agg.per_step.get(&1).cloned().unwrap_or_default();
                steps.push(step_of(
                    &s,
                    1,
                    0,
                    t0.elapsed().as_secs_f64(),
                    0,
                    cpu,
                    has_pids,
                ));
            }
            Kind::Churn { .. } => {
                run.phase = "churn";
                run.set_step(1);
                let c0 = run.sampler.now();
                let l0 = procstat::read(&run.fleet.load_pids()).cpu_s;
                let t0 = Instant::now();
                run.pump(Duration::from_millis(common.duration_ms));
                run.set_step(0);
                let secs = t0.elapsed().as_secs_f64();
                let lcpu = procstat::read(&run.fleet.load_pids()).cpu_s - l0;
                run.pump(Duration::from_millis(STEP_FLUSH_MS));
                loaded = run.sampler.now();
                let cpu = loaded.cpu_s - c0.cpu_s;
                let s = run.agg.per_step.get(&1).cloned().unwrap_or_default();
                let mut st = step_of(&s, 1, 0, secs, 0, cpu, has_pids);
                st.loadtest_cpu_s = lcpu;
                steps.push(st);
                if common.presence_check {
                    presence = Some(run.presence_check());
                }
            }
            Kind::Publish {
                steps: rates,
                step_ms,
                p99_ms_max,
                ..
            } => {
                ramp_s = run.ramp(common.ramp_per_s);
                loaded = run.sampler.now();
                let pub_weights = if publish_zipf {
                    weights.clone()
                } else {
                    vec![1.0; n_rooms]
                };
                let pcfg = PublisherCfg {
                    via: common.publish_via,
                    ingest: common.ingest.clone(),
                    broker_http: common.broker_http.clone(),
                    api_key: common.api_key.clone(),
                    rooms: rooms.clone(),
                    weights: pub_weights,
                    seed: common.seed,
                };
                run.fleet.set_publishing();
                let first = rates.first().copied().unwrap_or(0);
                run.publisher = Some(Publisher::start(pcfg, run.fleet.shared.clone(), first)?);
                run.phase = "warmup";
                run.pump(Duration::from_millis(common.warmup_ms));
                for (k, &rate) in rates.iter().enumerate() {
                    let step = k as u32 + 1;
                    if let Some(p) = &run.publisher {
                        p.rate.store(rate, Ordering::Relaxed);
                    }
                    run.phase = "measure";
                    run.set_step(step);
                    let c0 = run.sampler.now();
                    let by0 = cpu_by_pid(run.sampler.pids());
                    let l0 = procstat::read(&run.fleet.load_pids()).cpu_s;
                    let p0 = run.publisher.as_ref().map_or(0, |p| p.stats().sent);
                    let t0 = Instant::now();
                    run.pump(Duration::from_millis(*step_ms));
                    let secs = t0.elapsed().as_secs_f64();
                    let cpu = run.sampler.now().cpu_s - c0.cpu_s;
                    let lcpu = procstat::read(&run.fleet.load_pids()).cpu_s - l0;
                    let published = run.publisher.as_ref().map_or(0, |p| p.stats().sent) - p0;
                    // The next step (or none) starts; the last windows of this one arrive.
                    run.set_step(if k + 1 < rates.len() { step + 1 } else { 0 });
                    run.pump(Duration::from_millis(STEP_FLUSH_MS));
                    let s = run.agg.per_step.get(&step).cloned().unwrap_or_default();
                    let mut st = step_of(&s, step, rate, secs, published, cpu, has_pids);
                    st.server_cpu_s_by_pid = cpu_delta(&by0, &cpu_by_pid(run.sampler.pids()));
                    st.loadtest_cpu_s = lcpu;
                    run.bars.println(&format!(
                        "step {step}: rate {rate}/s -> {:.0} deliveries/s, p50 {:.1} ms, p99 {:.1} ms, gaps {}, dups {}",
                        st.deliveries_per_s, st.latency.p50_ms, st.latency.p99_ms, st.gap_events, st.duplicates
                    ));
                    let over = st.latency.p99_ms > *p99_ms_max as f64;
                    let lossy = st.gap_events > 0 || st.duplicates > 0 || st.disconnects > 0;
                    steps.push(st);
                    if over || lossy {
                        stop_reason = if over {
                            format!("step {step}: p99 above {p99_ms_max} ms")
                        } else {
                            format!("step {step}: messages missing, duplicated or connections lost")
                        };
                        break;
                    }
                }
                if let Some(p) = run.publisher.take() {
                    pub_stats = Some(p.stop());
                }
                run.set_step(0);
                run.phase = "drain";
                run.drain();
            }
        }
        Ok(())
    })();
    if let Some(p) = run.publisher.take() {
        pub_stats = Some(p.stop());
    }
    let end = run.sampler.now();
    let open_at_end = run.agg.live();
    run.phase = "stop";
    run.stop_viewers();
    run.bars.finish();
    result?;

    let total = &run.agg.total;
    let open = open_at_end.max(1) as f64;
    let withheld = memory_withheld(
        has_pids,
        target,
        total.connect_failures_total(),
        open_at_end,
    );
    let per_conn = |a: u64, b: u64| {
        (has_pids && target > 0 && withheld.is_none()).then(|| (a as f64 - b as f64) / open)
    };
    let report = report::Report {
        scenario: scenario.to_string(),
        started_at_unix_s,
        machine: Machine {
            loadtest_driver: match net::runtime::Driver::from_env_or(common.driver) {
                net::runtime::Driver::Uring => "uring".into(),
                net::runtime::Driver::Legacy => "legacy".into(),
                net::runtime::Driver::Auto => net::runtime::driver_in_use().into(),
            },
            ..Machine::here()
        },
        args: args_json,
        processes: run.fleet.children.len().max(processes),
        threads_per_process,
        connects: Connects {
            target,
            ok: total.connects_ok,
            failures: total.connect_failures.clone(),
            open_peak: run.agg.open_peak,
            ramp_ms: ramp_s * 1000.0,
            connect_ms: total.connect.summary(),
            ticket_ms: total.ticket.summary(),
        },
        steps,
        totals: Totals2::from_stats(total),
        publisher: pub_stats,
        presence,
        server: report::Server {
            pids,
            baseline,
            loaded,
            end,
            peak: run.sampler.peak(),
            rss_per_connection_bytes: per_conn(loaded.rss_bytes, baseline.rss_bytes),
            anon_per_connection_bytes: per_conn(loaded.anon_bytes, baseline.anon_bytes),
            per_connection_withheld: withheld,
        },
        stop_reason,
    };
    println!("{}", report::render(&report));
    if let Some(dir) = &run.common.charts {
        let latency = run
            .agg
            .per_step
            .iter()
            .map(|(step, s)| (*step, s.latency.clone()))
            .collect();
        let rates = report
            .steps
            .iter()
            .map(|s| (s.step, s.rate_target))
            .collect();
        let files = crate::charts::write(dir, &run.timeline, &latency, &rates)?;
        eprintln!("charts: {} in {}", files.join(", "), dir.display());
    }
    if let Some(path) = &run.common.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

/// How long churn's presence check waits for the open connections and presence to agree.
pub const PRESENCE_SETTLE_MS: u64 = 15_000;
/// Between two readings of the presence check (more than a viewer window).
pub const PRESENCE_READ_MS: u64 = 1_300;

/// The broker's fleet-wide presence connections (`GET /v1/presence/top?limit=1`, a key with
/// the `presence` scope).
fn presence_connections(broker_http: &str, api_key: &str) -> anyhow::Result<u64> {
    use std::io::{Read, Write};
    let addr = broker_http
        .trim_start_matches("http://")
        .trim_end_matches('/');
    let sock = addr
        .to_socket_addrs()?
        .next()
        .context("broker_http resolves to nothing")?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET /v1/presence/top?limit=1 HTTP/1.1\r\nHost: {addr}\r\n\
         Authorization: Bearer {api_key}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP head")?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200"),
        "presence query: {}",
        head.lines().next().unwrap_or_default()
    );
    let v: serde_json::Value = serde_json::from_str(body.trim())?;
    v["connections"]
        .as_u64()
        .context("presence answer without connections")
}

/// The child-process side: `loadtest worker` (plan on the first stdin line, then commands).
pub fn worker() -> anyhow::Result<()> {
    let _ = net::sys::raise_nofile_limit();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let first = lines.next().context("worker: no plan on stdin")??;
    let plan: WorkerPlan = serde_json::from_str(&first).context("worker: bad plan")?;
    let shared = Shared::new(plan.rooms);
    let (tx, rx) = crossbeam_channel::unbounded::<Msg>();
    let n = plan.threads.len();
    let mut handles = Vec::new();
    for t in plan.threads {
        let (cfg, shared, tx) = (plan.cfg.clone(), shared.clone(), tx.clone());
        handles.push(std::thread::spawn(move || {
            viewer::run_thread(t, cfg, shared, tx)
        }));
    }
    drop(tx);
    // Reports go out as JSON lines; the writer ends when every thread has sent `Done`.
    let writer = std::thread::spawn(move || {
        let out = std::io::stdout();
        let mut done = 0;
        for m in rx {
            if matches!(m, Msg::Done { .. }) {
                done += 1;
            }
            let mut o = out.lock();
            let _ = serde_json::to_writer(&mut o, &m);
            let _ = writeln!(o);
            let _ = o.flush();
            if done == n {
                break;
            }
        }
    });
    for line in lines {
        let Ok(line) = line else { break };
        let mut parts = line.splitn(3, ' ');
        match parts.next() {
            Some("step") => {
                if let Some(v) = parts.next().and_then(|s| s.parse().ok()) {
                    shared.step.store(v, Ordering::Release);
                }
            }
            Some("publishing") => shared.publishing.store(true, Ordering::Release),
            Some("pause") => shared.paused.store(true, Ordering::Release),
            Some("stop") => {
                let issued: Vec<u64> = parts
                    .next()
                    .and_then(|s| serde_json::from_str(s).ok())
                    .unwrap_or_default();
                let rejected: Vec<u64> = parts
                    .next()
                    .and_then(|s| serde_json::from_str(s).ok())
                    .unwrap_or_default();
                for (a, v) in shared.issued.iter().zip(issued) {
                    a.store(v, Ordering::Release);
                }
                for (a, v) in shared.rejected.iter().zip(rejected) {
                    a.store(v, Ordering::Release);
                }
                break;
            }
            _ => {}
        }
    }
    // Stdin closed or "stop": either way the run is over.
    shared.stop.store(true, Ordering::Release);
    for h in handles {
        let _ = h.join();
    }
    let _ = writer.join();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_per_connection_needs_every_connection() {
        assert_eq!(memory_withheld(true, 19_000, 0, 19_000), None);
        assert!(memory_withheld(true, 19_000, 3, 19_000).is_some());
        assert!(memory_withheld(true, 38_000, 0, 29_866).is_some());
        // Nothing sampled, or nothing planned (churn): no figure and no complaint.
        assert_eq!(memory_withheld(false, 19_000, 5, 10), None);
        assert_eq!(memory_withheld(true, 0, 5, 10), None);
    }

    #[test]
    fn remote_targets_need_the_flag() {
        assert!(check_target("control", "http://127.0.0.1:8080", false).is_ok());
        assert!(check_target("broker", "127.0.0.1:7400", false).is_ok());
        assert!(check_target("control", "http://10.1.2.3:8080", false).is_err());
        assert!(check_target("control", "http://10.1.2.3:8080", true).is_ok());
    }
}
