//! `barrage push`: one message through the broker's ingest socket; prints its `msg_id`.

use anyhow::{bail, Context};
use broker::{IngestClient, Message};
use proto::id::{Priority, Reach};
use std::io::Read;

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("scope").required(true).args(["room", "area", "global", "user", "device"])))]
pub struct PushArgs {
    /// Push to every viewer of this room.
    #[arg(long)]
    room: Option<u64>,
    /// Push to every room of this area.
    #[arg(long)]
    area: Option<u32>,
    /// Push to every connection.
    #[arg(long)]
    global: bool,
    /// Push to every connection of this uid.
    #[arg(long)]
    user: Option<u64>,
    /// Push to one device id (works for guests).
    #[arg(long)]
    device: Option<String>,
    /// Priority class: high travels on its own queues and links.
    #[arg(long, value_enum, default_value = "low")]
    priority: PriorityArg,
    /// High-reach delivery (msg_id, client ACK, resend); user and device scopes.
    #[arg(long)]
    high_reach: bool,
    /// Time to live for high-reach resends, ms (0: the broker's default).
    #[arg(long, default_value_t = 0)]
    ttl_ms: u32,
    /// The broker's ingest socket; several, comma-separated, to fail over between brokers
    /// (cluster mode: the push is re-sent under the same idempotency key, never doubled).
    #[arg(long, default_value = "127.0.0.1:7400")]
    ingest: String,
    /// API key (broker `api_keys`).
    #[arg(long, env = "BARRAGE_API_KEY", hide_env_values = true)]
    api_key: String,
    /// The message: a JSON object delivered verbatim as the op 5 body; `-` reads stdin.
    body: String,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum PriorityArg {
    High,
    Low,
}

pub fn run(args: PushArgs) -> anyhow::Result<()> {
    let body = if args.body == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the body from stdin")?;
        s
    } else {
        args.body.clone()
    };
    let body = body.trim();
    // Catch a shell-quoting mistake here rather than as a broker refusal.
    if !matches!(
        serde_json::from_str::<serde_json::Value>(body),
        Ok(serde_json::Value::Object(_))
    ) {
        bail!("the body must be a JSON object, e.g. '{{\"cmd\":\"DANMU_MSG\",\"info\":[[0],\"hi\",[1,\"me\"]]}}'");
    }
    let msg = if let Some(r) = args.room {
        Message::room(r, body.as_bytes())
    } else if let Some(a) = args.area {
        Message::area(a, body.as_bytes())
    } else if args.global {
        Message::global(body.as_bytes())
    } else if let Some(u) = args.user {
        Message::user(u, body.as_bytes())
    } else if let Some(d) = &args.device {
        Message::device(d, body.as_bytes())
    } else {
        bail!("pick one scope: --room, --area, --global, --user or --device");
    };
    let msg = msg
        .priority(match args.priority {
            PriorityArg::High => Priority::High,
            PriorityArg::Low => Priority::Low,
        })
        .reach(if args.high_reach {
            Reach::High
        } else {
            Reach::BestEffort
        })
        .ttl_ms(args.ttl_ms);
    let mut client = IngestClient::connect_any(&args.ingest, &args.api_key)
        .with_context(|| format!("connecting to ingest {}", args.ingest))?;
    // The error already says "refused: <why>"; a context would say it twice.
    let id = client.push(&msg)?;
    println!("{}", id.0);
    Ok(())
}
