//! `barrage`: one binary for every role.
//!
//! - `up`: control, broker and one edge in one process on loopback (the quick start).
//! - `edge | broker | control --config FILE`: one role alone, for real deployments.
//! - `push`: push one message through the broker's ingest socket.
//! - `tail`: our reference client; prints every message of a room as JSON lines.
//! - `loadtest`: the load generator (the `loadtest` crate).
#![forbid(unsafe_code)]

mod push;
mod tail;
mod up;

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "barrage",
    version,
    about = "A push system for live streaming (Bilibili live danmaku protocol)."
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
    /// Push one message through a broker's ingest socket.
    Push(push::PushArgs),
    /// Connect to a room like a viewer and print every message as one JSON line.
    Tail(tail::TailArgs),
    /// Load-test a running stack, or run the compression benchmark.
    Loadtest(Box<loadtest::Args>),
}

#[derive(clap::Args, Debug)]
struct RoleArgs {
    /// TOML config file (see examples/); every field has a default.
    #[arg(long)]
    config: Option<PathBuf>,
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
    let cli = Cli::parse();
    init_logging();
    match run(cli.command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One readable line (with causes), not a backtrace: these are operators' errors.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Up(args) => up::run(args),
        Command::Edge(args) => {
            let config = match &args.config {
                Some(p) => edge::Config::from_toml_file(p)?,
                None => edge::Config::default(),
            };
            let signals = up::Shutdown::register()?;
            let h = edge::start(config).context("starting the edge")?;
            println!(
                "edge: tcp {}, ws {}, admin http://{}",
                h.tcp_addr(),
                h.ws_addr(),
                h.admin_addr()
            );
            signals.wait();
            h.shutdown();
            Ok(())
        }
        Command::Broker(args) => {
            let config = match &args.config {
                Some(p) => broker::Config::from_toml_file(p)?,
                None => broker::Config::default(),
            };
            let signals = up::Shutdown::register()?;
            let h = broker::start(config).context("starting the broker")?;
            println!(
                "broker: ingest {}, links {}, http://{}",
                h.ingest_addr(),
                h.link_addr(),
                h.http_addr()
            );
            signals.wait();
            h.shutdown();
            Ok(())
        }
        Command::Control(args) => {
            let config = match &args.config {
                Some(p) => control::Config::from_toml_file(p)?,
                None => control::Config::default(),
            };
            let signals = up::Shutdown::register()?;
            let h = control::start(config).context("starting control")?;
            println!("control: http://{}", h.http_addr());
            signals.wait();
            h.shutdown();
            Ok(())
        }
        Command::Push(args) => push::run(args),
        Command::Tail(args) => tail::run(args),
        Command::Loadtest(args) => loadtest::run(*args),
    }
}
