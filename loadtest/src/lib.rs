//! # loadtest: the load generator and measuring tool (`barrage loadtest`)
//!
//! Simulates viewers and publishers against a real stack and measures what a team needs before
//! a big event: how many viewers a fleet holds, how fast a danmaku reaches them, what it costs,
//! and what breaks first.
//!
//! # Layout
//! - [`cli`]: the `clap` arguments (`Args`, one subcommand per scenario, shared `Common` flags).
//! - [`corpus`]: a seeded generator of realistic danmaku bodies (`DANMU_MSG`, `SEND_GIFT`, ...)
//!   and the `"lt"` measurement field (publish time, room sequence) publishers append.
//! - [`compress`]: the compression table (zlib vs brotli per batch size, brotli MB/s per quality).
//! - [`client`]: the client side shared with `barrage tail` and the tests: control URL, ticket
//!   (token and edge list, as a real client gets them), WebSocket upgrade, auth body.
//! - [`viewer`]: the simulated viewers: a sans-io receiver plus a thread-per-core monoio shell.
//! - [`publisher`]: paced pushes over the ingest socket or the HTTP API.
//! - [`stats`]: the report maths (sequence gaps/duplicates, histograms that merge, zipf).
//! - [`procstat`]: server CPU and memory from `/proc`.
//! - [`reach`], [`priority`], [`resume`]: the delivery-guarantee scenarios of issue 9 (blocking
//!   threads, one per viewer, and their own reports).
//! - [`run`]: the coordinator: plan, phases, progress line, child worker processes.
//! - [`report`]: the JSON report and its human table.
//! - [`charts`]: `--charts DIR`: SVG charts over run time by step, and `.hgrm` per step.
//! - [`progress`]: the progress bars on a terminal.
//!
//! Data flow: viewer threads (and worker processes, as JSON lines) ship a [`stats::Stats`] window
//! once per second, tagged with the measurement step; the coordinator merges them by step. Loss
//! is counted once, at the end, against the publisher's per-room sequence counts.
//!
//! # Invariants
//! - Every run is bounded (duration, counts) and stops by itself.
//! - Targets that are not loopback are refused unless `--allow-remote` is given.
#![forbid(unsafe_code)]
// serde_json::json! recurses once per token; the SEND_GIFT body is a big literal.
#![recursion_limit = "512"]

pub mod charts;
pub mod cli;
pub mod client;
pub mod compress;
pub mod corpus;
pub mod plan;
pub mod priority;
pub mod procstat;
pub mod progress;
pub mod publisher;
pub mod reach;
pub mod report;
pub mod resume;
pub mod run;
pub mod stats;
pub mod viewer;

pub use cli::Args;

use cli::Scenario;

/// Runs one `barrage loadtest` subcommand to completion.
pub fn run(args: Args) -> anyhow::Result<()> {
    match args.scenario {
        Scenario::Compress(c) => compress::run(&c),
        Scenario::Corpus(c) => {
            let mut corpus = corpus::Corpus::new(c.seed);
            let mut total = 0usize;
            for _ in 0..c.count {
                let b = corpus.next_body();
                total += b.len();
                println!("{}", String::from_utf8_lossy(&b));
            }
            eprintln!(
                "{} messages, average {} bytes",
                c.count,
                total / c.count.max(1)
            );
            Ok(())
        }
        Scenario::Idle(a) => {
            let json = serde_json::json!({ "common": &a.common });
            run::run(&a.common, run::Kind::Idle, "idle", json).map(|_| ())
        }
        Scenario::Fanout(a) => {
            let mut common = a.common.clone();
            common.rooms = 1;
            let json = serde_json::json!({ "common": &common, "rates": &a.rates, "step_ms": a.step_ms, "p99_ms_max": a.p99_ms_max });
            let kind = run::Kind::Publish {
                steps: a.rates.clone(),
                step_ms: a.step_ms,
                p99_ms_max: a.p99_ms_max,
                zipf: 0.0,
                publish_zipf: false,
            };
            run::run(&common, kind, "fanout", json).map(|_| ())
        }
        Scenario::Rooms(a) => {
            let json = serde_json::json!({ "common": &a.common, "zipf": a.zipf, "rate": a.rate, "publish_uniform": a.publish_uniform });
            let kind = run::Kind::Publish {
                steps: vec![a.rate],
                step_ms: a.common.duration_ms,
                p99_ms_max: u64::MAX,
                zipf: a.zipf,
                publish_zipf: !a.publish_uniform,
            };
            run::run(&a.common, kind, "rooms", json).map(|_| ())
        }
        Scenario::Churn(a) => {
            let json = serde_json::json!({ "common": &a.common, "connects_per_s": a.connects_per_s, "hold_ms": a.hold_ms });
            let kind = run::Kind::Churn {
                connects_per_s: a.connects_per_s,
                hold_ms: a.hold_ms,
            };
            let report = run::run(&a.common, kind, "churn", json)?;
            match report.presence {
                Some(p) if !p.equal => anyhow::bail!(
                    "presence {} != {} connections open{}",
                    p.presence_connections
                        .map_or("unknown".into(), |n| n.to_string()),
                    p.open_connections,
                    p.error.map_or(String::new(), |e| format!(" ({e})"))
                ),
                _ => Ok(()),
            }
        }
        Scenario::Plan(a) => plan::run(&a),
        Scenario::Reach(a) => reach::run(&a),
        Scenario::Priority(a) => priority::run(&a),
        Scenario::Resume(a) => resume::run(&a).map(|_| ()),
        Scenario::Worker => run::worker(),
    }
}
