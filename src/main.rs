//! `barrage`: one binary for every role.
//!
//! - `up`: control, broker and one edge in one process on loopback (the quick start).
//! - `cluster`: NATS JetStream, control, brokers and edges as separate processes on loopback.
//! - `edge | broker | control [--config FILE] [--set FIELD=VALUE]...`: one role alone, for real
//!   deployments; config layers are defaults < file < `BARRAGE_<ROLE>_<FIELD>` < `--set`.
//! - `config defaults ROLE | config check ROLE FILE`: a complete commented config; a check.
//! - `doctor`: compares this host with the tuning kit (`tuning/`).
//! - `push`: push one message through the broker's ingest socket.
//! - `tail`: our reference client; prints every message of a room as JSON lines.
//! - `loadtest`: the load generator (the `loadtest` crate).
//!
//! Exit codes (scripts rely on them; docs/operations.md lists them): see [`exit::Exit`].
#![forbid(unsafe_code)]

mod cluster;
mod config;
mod doctor;
mod exit;
mod push;
mod tail;
mod up;

use anyhow::Context;
use clap::{Parser, Subcommand};
use net::config::Layered;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "barrage",
    version,
    about = "A push system for live streaming (Bilibili live danmaku protocol).",
    after_help = exit::HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run control, broker and one edge in this process, on loopback.
    Up(up::UpArgs),
    /// Run a local cluster: NATS JetStream, control, N brokers, M edges as separate processes.
    Cluster(cluster::ClusterArgs),
    /// Run an edge (client connections).
    Edge(RoleArgs),
    /// Run a broker (ingest, aggregation, distribution).
    Broker(BrokerArgs),
    /// Run control (tokens, edge registry, discovery).
    Control(RoleArgs),
    /// Print a role's complete default config, or check a config file.
    Config(config::ConfigArgs),
    /// Compare this host with the tuning kit; exit 1 when something would cap capacity.
    Doctor(doctor::DoctorArgs),
    /// Push one message through a broker's ingest socket.
    Push(push::PushArgs),
    /// Connect to a room like a viewer and print every message as one JSON line.
    Tail(tail::TailArgs),
    /// Load-test a running stack, or run the compression benchmark.
    Loadtest(Box<loadtest::Args>),
}

#[derive(clap::Args, Debug)]
struct RoleArgs {
    /// TOML config file (`barrage config defaults ROLE` prints one); every field has a default.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Overrides one field, above the file and the environment (repeatable): `--set shards=4`.
    #[arg(long = "set", value_name = "FIELD=VALUE")]
    set: Vec<String>,
}

#[derive(clap::Args, Debug)]
struct BrokerArgs {
    #[command(flatten)]
    role: RoleArgs,
    /// Cluster mode: the NATS JetStream servers, `nats://host:port[,host:port...]` (the
    /// config's `backbone`; above every other layer).
    #[arg(long)]
    backbone: Option<String>,
    /// Directory of the durable high-reach log (the config's `data_dir`): accepted high-reach
    /// pushes survive a crash and are delivered after a restart on the same directory.
    /// `auto` (default): `<state dir>/broker-<node_id>-<ingest port>`; `none`: memory only.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

impl BrokerArgs {
    /// The role args with `--backbone` as one more `--set` (the last, so it wins).
    fn into_role(mut self) -> anyhow::Result<RoleArgs> {
        if let Some(b) = self.backbone {
            let quoted = serde_json::to_string(&b)?;
            self.role.set.push(format!("backbone={quoted}"));
        }
        if let Some(d) = self.data_dir {
            let quoted = serde_json::to_string(&d.to_string_lossy())?;
            self.role.set.push(format!("data_dir={quoted}"));
        }
        Ok(self.role)
    }
}

fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let start = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| tracing_subscriber::EnvFilter::try_new(s).is_ok())
        .unwrap_or_else(|| "info".to_string());
    let (filter, handle) =
        tracing_subscriber::reload::Layer::new(tracing_subscriber::EnvFilter::new(&start));
    // stderr: stdout belongs to `tail`'s JSON lines and `push`'s msg ids.
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .init();
    // A role's `log_level` (at start and on reload) swaps the filter; empty restores `start`.
    net::reload::set_log_filter_fn(move |s| {
        let s = if s.trim().is_empty() {
            start.as_str()
        } else {
            s
        };
        let f = tracing_subscriber::EnvFilter::try_new(s)
            .map_err(|e| format!("log_level {s:?}: {e}"))?;
        handle.reload(f).map_err(|e| format!("log_level: {e}"))
    });
}

fn main() -> std::process::ExitCode {
    if let Some((old, new)) = loadtest::cli::renamed_flag(std::env::args_os().skip(1)) {
        eprintln!("error: {old} was renamed {new} (milliseconds: multiply the value by 1000)");
        return exit::Exit::Usage.into();
    }
    // clap exits with 2 on a usage error by itself.
    let cli = Cli::parse();
    init_logging();
    match run(cli.command) {
        Ok(code) => code.into(),
        Err(e) => {
            // One readable line, each cause said once; not a backtrace: these are operators' errors.
            eprintln!("error: {}", exit::message(&e));
            exit::classify(&e).into()
        }
    }
}

fn run(command: Command) -> anyhow::Result<exit::Exit> {
    match command {
        Command::Up(args) => up::run(args)?,
        Command::Cluster(args) => cluster::run(args)?,
        Command::Edge(args) => serve::<edge::Config, _>(&args, |c| {
            let (rate_per_s, bound_ms) = (c.drain_close_per_s.max(1), c.drain_ms_max);
            let h = edge::start(c).context("starting the edge")?;
            let reload = Reload {
                hooks: h.reload_hooks(),
                apply: Box::new(h.reloader()),
            };
            let banner = format!(
                "edge: tcp {}, ws {}, admin http://{}",
                h.tcp_addr(),
                h.ws_addr(),
                h.admin_addr()
            );
            let drain = Drain {
                start: edge::Handle::drain,
                remaining: edge::Handle::connections,
                rate_per_s,
                bound_ms,
            };
            Ok((h, banner, edge::Handle::shutdown, Some(drain), Some(reload)))
        })?,
        Command::Broker(args) => serve::<broker::Config, _>(&args.into_role()?, |c| {
            let h = broker::start(c).context("starting the broker")?;
            let reload = Reload {
                hooks: h.reload_hooks(),
                apply: Box::new(h.reloader()),
            };
            let banner = format!(
                "broker: ingest {}, links {}, http://{}",
                h.ingest_addr(),
                h.link_addr(),
                h.http_addr()
            );
            Ok((h, banner, broker::Handle::shutdown, None, Some(reload)))
        })?,
        Command::Control(args) => serve::<control::Config, _>(&args, |c| {
            let h = control::start(c).context("starting control")?;
            let reload = Reload {
                hooks: h.reload_hooks(),
                apply: Box::new(h.reloader()),
            };
            let banner = format!("control: http://{}", h.http_addr());
            Ok((h, banner, control::Handle::shutdown, None, Some(reload)))
        })?,
        Command::Config(args) => return config::run(args),
        Command::Doctor(args) => return doctor::run(args),
        Command::Push(args) => push::run(args)?,
        Command::Tail(args) => tail::run(args)?,
        Command::Loadtest(args) => loadtest::run(*args)?,
    }
    Ok(exit::Exit::Ok)
}

/// Added to the time a drain should take at its close rate, for stragglers.
const DRAIN_MARGIN_MS: u64 = 5_000;

/// How a role that holds viewers drains before it stops.
struct Drain<H> {
    /// Stop accepting and close connections gradually.
    start: fn(&H),
    /// Connections still open.
    remaining: fn(&H) -> u64,
    /// Connections the role closes per second while draining.
    rate_per_s: u64,
    /// The longest a drain may take, whatever the connection count (`drain_ms_max`).
    bound_ms: u64,
}

/// How a role reloads: its hooks (SIGHUP and `POST /admin/reload` run them) and what applies
/// the live part of a newly loaded config (the runner registers that as the "config" hook).
struct Reload<C> {
    hooks: net::reload::Hooks,
    apply: Apply<C>,
}

/// Applies the live part of a loaded config: `Ok(what changed)` or `Err(why nothing did)`.
type Apply<C> = Box<dyn Fn(&C) -> Result<String, String> + Send + Sync>;

/// What starting a role gives back: its handle, the line printed once it listens, how it
/// stops, how it drains first (roles without viewers stop at once), and how it reloads.
type Started<H, C> = (H, String, fn(H), Option<Drain<H>>, Option<Reload<C>>);

/// A role's config as the runner needs it beyond loading.
trait RoleConfig: Layered + 'static {
    /// The `log_level` field.
    fn log_level(&self) -> &str;
}

impl RoleConfig for edge::Config {
    fn log_level(&self) -> &str {
        &self.log_level
    }
}
impl RoleConfig for broker::Config {
    fn log_level(&self) -> &str {
        &self.log_level
    }
}
impl RoleConfig for control::Config {
    fn log_level(&self) -> &str {
        &self.log_level
    }
}

/// Runs one server role: loads its config through every layer, starts it, prints where it
/// listens, and on SIGTERM or SIGINT drains (when the role has viewers) and stops; a second
/// signal stops at once. The same for every role, so a new role or a new config field needs
/// nothing here.
fn serve<C: RoleConfig, H>(
    args: &RoleArgs,
    start: impl FnOnce(C) -> anyhow::Result<Started<H, C>>,
) -> anyhow::Result<()> {
    let config: C = net::config::load(&net::config::Sources::process(
        args.config.as_deref(),
        &args.set,
    ))?;
    net::reload::set_log_filter(config.log_level()).map_err(anyhow::Error::msg)?;
    let mut signals = up::Shutdown::register()?;
    let (handle, banner, stop, drain, reload) = start(config)?;
    if let Some(Reload { hooks, apply }) = reload {
        // The same layers as at start, read again: the file, the environment (a `*_file`
        // secret's file too) and the flags.
        let (file, set) = (args.config.clone(), args.set.clone());
        hooks.register("config", move || {
            let loaded: C =
                net::config::load(&net::config::Sources::process(file.as_deref(), &set))
                    .map_err(|e| exit::message(&anyhow::Error::new(e)))?;
            net::reload::set_log_filter(loaded.log_level())?;
            apply(&loaded)
        });
        signals.reload_on_hup(move || {
            hooks.run();
        })?;
    }
    println!("{banner}");
    signals.wait();
    if let Some(d) = drain {
        let open = (d.remaining)(&handle);
        let expected_ms = open.saturating_mul(1000) / d.rate_per_s;
        let bound_ms = (expected_ms + DRAIN_MARGIN_MS).min(d.bound_ms);
        eprintln!(
            "draining {open} connections (at most {} s); a second signal stops at once",
            bound_ms / 1000
        );
        (d.start)(&handle);
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(bound_ms);
        match signals.drain_until(deadline, || (d.remaining)(&handle)) {
            up::Drained::Empty => eprintln!("drained"),
            up::Drained::TimedOut(left) => {
                eprintln!("drain time is up, closing {left} connections")
            }
            up::Drained::Interrupted(sig) => eprintln!("signal {sig} again: stopping now"),
        }
    }
    stop(handle);
    Ok(())
}
