//! Command-line arguments of `barrage loadtest`: one subcommand per scenario, sharing
//! [`Common`] flags. Every scenario is bounded by `--duration-ms` (and counts) and stops by itself.

use std::path::PathBuf;

/// `barrage loadtest <scenario> [flags]`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum Scenario {
    /// Hold N idle connections; report server memory per connection.
    Idle(IdleArgs),
    /// One hot room, every viewer in it, publish rate stepped up until p99 > 1 s or loss.
    Fanout(FanoutArgs),
    /// Many rooms, viewers spread by a zipf (or uniform) distribution, steady publish rate.
    Rooms(RoomsArgs),
    /// Connect/disconnect storm: connects per second and connect-time percentiles.
    Churn(ChurnArgs),
    /// The compression table: zlib vs brotli for batches of 2/10/20/40 messages, and MB/s.
    Compress(CompressArgs),
    /// Prints corpus messages (one JSON object per line) and their average size.
    Corpus(CorpusArgs),
    /// High reach: users that ignore a copy with probability 1-r; the final delivery rate
    /// against 1-(1-r)^(n+1), duplicates, messages never delivered.
    Reach(crate::reach::ReachArgs),
    /// A low-priority flood and a steady high-priority stream to one room: p50/p99 of each
    /// (run again with --no-flood for the baseline).
    Priority(crate::priority::PriorityArgs),
    /// Viewers drop and resume (`"resume"` in the auth) during a steady room stream:
    /// resumes recovered, batches replayed, gaps, duplicates, connect->sync p50/p99 vs fresh.
    Resume(crate::resume::ResumeArgs),
    /// Cores and hosts a fleet needs for a target audience, from measured per-core figures.
    Plan(crate::plan::PlanArgs),
    /// Internal: a child process running its share of viewers (spawned when N exceeds one
    /// process's descriptor budget); reads its plan as JSON on stdin, writes its report on stdout.
    #[command(hide = true)]
    Worker,
}

/// How viewers reach the edge.
#[derive(
    clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Tcp,
    Ws,
    /// Half TCP, half WebSocket (alternating).
    Mix,
    /// Datagrams (docs/protocol-udp.md): cookie handshake, parts decoded alone, losses are
    /// gaps (with `--udp-loss-pct` dropping received datagrams on purpose).
    Udp,
}

/// How publishers reach the broker.
#[derive(
    clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum PublishVia {
    /// The persistent, pipelined ingest socket.
    Ingest,
    /// The HTTP API (`POST /v1/push/room/{room}`).
    Http,
}

/// Flags every live scenario shares.
#[derive(clap::Args, Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Common {
    /// Control's HTTP address (tokens and edge lists come from it, as for a real client).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub control: String,
    /// Control API key: with it viewers get tokens from `POST /v1/connect` (logged-in users);
    /// without it from `getDanmuInfo` (guests).
    #[arg(long, env = "BARRAGE_CONTROL_KEY", hide_env_values = true)]
    pub control_key: Option<String>,
    /// The broker's ingest socket.
    #[arg(long, default_value = "127.0.0.1:7400")]
    pub ingest: String,
    /// The broker's HTTP API (used with `--publish-via http`).
    #[arg(long, default_value = "127.0.0.1:7480")]
    pub broker_http: String,
    /// Broker API key for publishing.
    #[arg(
        long,
        env = "BARRAGE_API_KEY",
        default_value = "",
        hide_env_values = true
    )]
    pub api_key: String,
    #[arg(long, value_enum, default_value = "ingest")]
    pub publish_via: PublishVia,
    /// Number of viewer connections.
    #[arg(long, default_value_t = 1000)]
    pub viewers: u32,
    /// Room ids used are `room_base .. room_base + rooms`.
    #[arg(long, default_value_t = 1)]
    pub rooms: u32,
    #[arg(long, default_value_t = 1000)]
    pub room_base: u64,
    #[arg(long, value_enum, default_value = "tcp")]
    pub transport: Transport,
    /// `protover` in the auth body: 3 brotli, 2 zlib, 0 plain.
    #[arg(long, default_value_t = 3)]
    pub protover: u32,
    /// New connections per second while ramping up (all threads together).
    #[arg(long, default_value_t = 2000)]
    pub ramp_per_s: u32,
    /// Measured run time after the ramp and warm-up.
    #[arg(long, default_value_t = 10_000)]
    pub duration_ms: u64,
    /// Time after the ramp before measuring starts.
    #[arg(long, default_value_t = 2_000)]
    pub warmup_ms: u64,
    /// Heartbeat interval of each viewer.
    #[arg(long, default_value_t = 30_000)]
    pub heartbeat_ms: u64,
    /// Viewer threads per process (default: available cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Connections per viewer process; above it, child processes are spawned.
    #[arg(long, default_value_t = 19_000)]
    pub per_process: u32,
    /// Server pids to sample CPU and RSS from (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub pids: Vec<u32>,
    /// Server process names (as in /proc/<pid>/comm, or a substring of the command line) to sample.
    #[arg(long, value_delimiter = ',')]
    pub procs: Vec<String>,
    /// Local source addresses for viewer sockets, used round-robin (spreads the 4-tuple space).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    pub sources: Vec<String>,
    /// Write the JSON report here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Churn: at the end, stop opening connections and check that the broker's presence
    /// (`--broker-http`, an `--api-key` with the `presence` scope) equals the connections
    /// open; the run fails when it does not.
    #[arg(long)]
    #[serde(default)]
    pub presence_check: bool,
    /// Write SVG charts (latency, deliveries/s, server CPU per million deliveries,
    /// connections, over time by step) and each step's latency histogram (`.hgrm`) here.
    #[arg(long)]
    pub charts: Option<PathBuf>,
    /// Allow targets that are not loopback.
    #[arg(long)]
    pub allow_remote: bool,
    /// Seed for the corpus and room choice.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Connect timeout per attempt (TCP connect + auth reply).
    #[arg(long, default_value_t = 5000)]
    pub connect_timeout_ms: u64,
    /// Get tickets from `getDanmuInfo` (guests) instead of `POST /v1/connect`.
    #[arg(long)]
    pub danmu_info: bool,
    /// One control request per room per load thread instead of one per connection
    /// (faster ramps when control is not what is being measured).
    #[arg(long)]
    pub ticket_per_room: bool,
    /// Spread connections over every edge control lists in a ticket (connection i takes edge
    /// i mod n) instead of always the first; for loading several edge processes.
    #[arg(long)]
    pub spread_edges: bool,
    /// `--transport udp`: percent of received data datagrams dropped before decoding, to see
    /// how low priority behaves on a lossy network (the loss shows as missing and gaps).
    #[arg(long, default_value_t = 0.0)]
    pub udp_loss_pct: f64,
    /// Decompress every batch on every connection instead of once per identical batch per thread.
    #[arg(long)]
    pub no_decode_cache: bool,
    /// monoio driver of the load threads: auto, uring or legacy (BARRAGE_DRIVER overrides).
    #[arg(long, default_value = "auto", value_parser = parse_driver)]
    pub driver: net::runtime::Driver,
}

fn parse_driver(s: &str) -> Result<net::runtime::Driver, String> {
    net::runtime::Driver::parse(s)
        .ok_or_else(|| format!("unknown driver {s}: auto, uring or legacy"))
}

#[derive(clap::Args, Debug, Clone)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: Common,
}

#[derive(clap::Args, Debug, Clone)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: Common,
    /// Publish rates (messages/s into the room) to step through; one step per `--step-ms`.
    #[arg(long, value_delimiter = ',', default_value = "100")]
    pub rates: Vec<u32>,
    /// Time per rate step (the first `--warmup-ms` of the first step are not measured).
    #[arg(long, default_value_t = 10_000)]
    pub step_ms: u64,
    /// Stop stepping when a step's p99 exceeds this.
    #[arg(long, default_value_t = 1000)]
    pub p99_ms_max: u64,
}

#[derive(clap::Args, Debug, Clone)]
pub struct RoomsArgs {
    #[command(flatten)]
    pub common: Common,
    /// Zipf exponent for viewers per room (0 = uniform).
    #[arg(long, default_value_t = 1.1)]
    pub zipf: f64,
    /// Total publish rate (messages/s, all rooms).
    #[arg(long, default_value_t = 1000)]
    pub rate: u32,
    /// Publish the same rate into every room; by default rooms get messages with the same zipf
    /// weights as viewers (hot rooms are also busy rooms).
    #[arg(long)]
    pub publish_uniform: bool,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ChurnArgs {
    #[command(flatten)]
    pub common: Common,
    /// Target connects per second (each connection is closed after `--hold-ms`).
    #[arg(long, default_value_t = 1000)]
    pub connects_per_s: u32,
    /// How long each churned connection stays open after its auth reply.
    #[arg(long, default_value_t = 1000)]
    pub hold_ms: u64,
}

#[derive(clap::Args, Debug, Clone)]
pub struct CompressArgs {
    /// Batches measured per batch size (averaged).
    #[arg(long, default_value_t = 200)]
    pub batches: usize,
    /// Batch sizes (messages per batch).
    #[arg(long, value_delimiter = ',', default_value = "2,10,20,40")]
    pub sizes: Vec<usize>,
    /// Brotli qualities to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4,5,6,7,8,9,10,11")]
    pub qualities: Vec<u32>,
    /// Brotli quality for the size table.
    #[arg(long, default_value_t = 5)]
    pub quality: u32,
    /// Milliseconds of compression per speed measurement.
    #[arg(long, default_value_t = 400)]
    pub bench_ms: u64,
    /// Batch size (messages) for the speed measurements.
    #[arg(long, default_value_t = 20)]
    pub speed_batch: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write the JSON report here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct CorpusArgs {
    /// How many messages.
    #[arg(long, default_value_t = 20)]
    pub count: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Flags renamed so that every duration is in milliseconds (issue 15), old name first: loadtest's
/// and `barrage tail`'s (`--timeout-s`), checked by both binaries before clap parses. An old
/// flag is refused naming the new one: the unit changed with the name, so its number would be
/// 1000 times too small, and a silent fallback to the default would hide that.
pub const RENAMED_FLAGS: &[(&str, &str)] = &[
    ("--duration-s", "--duration-ms"),
    ("--warmup-s", "--warmup-ms"),
    ("--heartbeat-s", "--heartbeat-ms"),
    ("--step-s", "--step-ms"),
    ("--timeout-s", "--timeout-ms"),
];

/// The first renamed flag among `args` (up to a `--`), as (old, new).
pub fn renamed_flag(
    args: impl Iterator<Item = std::ffi::OsString>,
) -> Option<(&'static str, &'static str)> {
    args.map(|a| a.to_string_lossy().into_owned())
        .take_while(|a| a != "--")
        .find_map(|a| {
            let name = a.split('=').next().unwrap_or_default().to_string();
            RENAMED_FLAGS.iter().find(|(old, _)| *old == name).copied()
        })
}

#[cfg(test)]
mod renamed_tests {
    use super::renamed_flag;

    fn args(a: &[&str]) -> impl Iterator<Item = std::ffi::OsString> {
        a.iter()
            .map(std::ffi::OsString::from)
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn old_duration_flags_are_found_in_both_spellings() {
        assert_eq!(
            renamed_flag(args(&["idle", "--step-s", "3"])),
            Some(("--step-s", "--step-ms"))
        );
        assert_eq!(
            renamed_flag(args(&["--warmup-s=1"])),
            Some(("--warmup-s", "--warmup-ms"))
        );
        assert_eq!(renamed_flag(args(&["--duration-ms", "3000"])), None);
        assert_eq!(renamed_flag(args(&["push", "--", "--step-s"])), None);
    }
}
