//! `loadtest`: the load generator on its own (`loadtest loadtest <scenario> ...`, the same
//! arguments as `barrage loadtest`), for hosts that only generate load and for the tests of
//! the child-process path (which re-exec the running binary with `loadtest worker`).
#![forbid(unsafe_code)]

use clap::Parser;

#[derive(Parser)]
#[command(name = "loadtest", about = "barrage's load generator")]
enum Cli {
    /// Run a scenario (same as `barrage loadtest`).
    Loadtest(loadtest::Args),
}

fn main() -> anyhow::Result<()> {
    if let Some((old, new)) = loadtest::cli::renamed_flag(std::env::args_os().skip(1)) {
        eprintln!("error: {old} was renamed {new} (milliseconds: multiply the value by 1000)");
        std::process::exit(2);
    }
    let Cli::Loadtest(args) = Cli::parse();
    loadtest::run(args)
}
