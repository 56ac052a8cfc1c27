//! `barrage`: one binary for every role.
//!
//! - `up`: control, broker and one edge in one process on loopback (the quick start).
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
    /// Run an edge (client connections).
    Edge(RoleArgs),
    /// Run a broker (ingest, aggregation, distribution).
    Broker(RoleArgs),
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

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // stderr: stdout belongs to `tail`'s JSON lines and `push`'s msg ids.
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn main() -> std::process::ExitCode {
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
        Command::Edge(args) => serve::<edge::Config, _>(&args, |c| {
            let h = edge::start(c).context("starting the edge")?;
            let banner = format!(
                "edge: tcp {}, ws {}, admin http://{}",
                h.tcp_addr(),
                h.ws_addr(),
                h.admin_addr()
            );
            Ok((h, banner, edge::Handle::shutdown))
        })?,
        Command::Broker(args) => serve::<broker::Config, _>(&args, |c| {
            let h = broker::start(c).context("starting the broker")?;
            let banner = format!(
                "broker: ingest {}, links {}, http://{}",
                h.ingest_addr(),
                h.link_addr(),
                h.http_addr()
            );
            Ok((h, banner, broker::Handle::shutdown))
        })?,
        Command::Control(args) => serve::<control::Config, _>(&args, |c| {
            let h = control::start(c).context("starting control")?;
            let banner = format!("control: http://{}", h.http_addr());
            Ok((h, banner, control::Handle::shutdown))
        })?,
        Command::Config(args) => return config::run(args),
        Command::Doctor(args) => return doctor::run(args),
        Command::Push(args) => push::run(args)?,
        Command::Tail(args) => tail::run(args)?,
        Command::Loadtest(args) => loadtest::run(*args)?,
    }
    Ok(exit::Exit::Ok)
}

/// What starting a role gives back: its handle, the line printed once it listens, and how it
/// stops.
type Started<H> = (H, String, fn(H));

/// Runs one server role: loads its config through every layer, starts it, prints where it
/// listens, and stops it on SIGINT or SIGTERM. The same for every role, so a new role or a new
/// config field needs nothing here.
fn serve<C: Layered, H>(
    args: &RoleArgs,
    start: impl FnOnce(C) -> anyhow::Result<Started<H>>,
) -> anyhow::Result<()> {
    let config: C = net::config::load(&net::config::Sources::process(
        args.config.as_deref(),
        &args.set,
    ))?;
    let signals = up::Shutdown::register()?;
    let (handle, banner, stop) = start(config)?;
    println!("{banner}");
    signals.wait();
    stop(handle);
    Ok(())
}
