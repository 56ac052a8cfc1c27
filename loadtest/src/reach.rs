//! `barrage loadtest reach` (issue 9): the measured final delivery rate of high-reach messages
//! against `1-(1-r)^(n+1)`.
//!
//! N viewers log in as users 1..N (`POST /v1/connect` with the control key) with `"ack": true`.
//! The publisher sends `--messages` high-reach pushes to each user over the ingest socket. Each
//! viewer **ignores** a received copy (neither processes nor ACKs it) with probability `1 - r`
//! (`--reach-success`), processes and ACKs it otherwise, and drops duplicates by msg id
//! (counted). With `--reconnect-per-s`, viewers drop their connection and open a new one at that
//! total rate. After the last push it waits `--settle-ms` (at least the retry window) and reports,
//! per message, whether some copy was processed: the delivery rate, the messages never
//! delivered, duplicates seen.
//!
//! Blocking threads, one per viewer: the point is the broker's resend logic, not edge load.

use crate::client::{self, blocking, Ticket};
use crate::corpus::SplitMix64;
use crate::publisher::IngestConn;
use proto::id::{Priority, Reach, Scope, UserId};
use proto::ingest::Push;
use proto::packet::StreamDecoder;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Most viewers (one thread each).
pub const REACH_VIEWERS_MAX: u32 = 2_000;

#[derive(clap::Args, Debug, Clone)]
pub struct ReachArgs {
    /// Control's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub control: String,
    /// Control's API key (viewers log in as users).
    #[arg(long, env = "BARRAGE_CONTROL_KEY", hide_env_values = true)]
    pub control_key: String,
    /// The broker's ingest socket.
    #[arg(long, default_value = "127.0.0.1:7400")]
    pub ingest: String,
    /// The broker's API key.
    #[arg(long, env = "BARRAGE_API_KEY", hide_env_values = true)]
    pub api_key: String,
    /// Viewers (users 1..N).
    #[arg(long, default_value_t = 200)]
    pub viewers: u32,
    /// High-reach pushes per user.
    #[arg(long, default_value_t = 20)]
    pub messages: u32,
    /// Probability that a viewer processes (and ACKs) a received copy.
    #[arg(long, default_value_t = 0.9)]
    pub reach_success: f64,
    /// The broker's `reach_retries` (for the expected rate only).
    #[arg(long, default_value_t = 2)]
    pub retries: u32,
    /// Connection drops per second over all viewers (each reconnects at once).
    #[arg(long, default_value_t = 0.0)]
    pub reconnect_per_s: f64,
    /// Pushes per second (all users together).
    #[arg(long, default_value_t = 500)]
    pub rate: u32,
    /// Ingest connections pushing at once (each on its own thread, the pushes split between them).
    #[arg(long, default_value_t = 1)]
    pub ingest_conns: u32,
    /// Pushes each ingest connection sends before reading their answers (1: one at a time).
    #[arg(long, default_value_t = 1)]
    pub pipeline: u32,
    /// Wait after the last push before counting in milliseconds (>= the broker's retry window,
    /// `reach_retry_ms * (reach_retries + 1)`).
    #[arg(long, default_value_t = 10_000)]
    pub settle_ms: u64,
    /// The room viewers sit in.
    #[arg(long, default_value_t = 1000)]
    pub room: u64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

#[derive(Default)]
struct Tally {
    /// msg ids processed at least once.
    processed: Mutex<HashSet<u64>>,
    copies: AtomicU64,
    duplicates: AtomicU64,
    ignored: AtomicU64,
    reconnects: AtomicU64,
}

fn connect(t: &Ticket, uid: u64, device: &str) -> anyhow::Result<TcpStream> {
    let mut body = client::auth_body(uid, t.room, 0, &t.token, device);
    body.ack = true;
    blocking::open(
        blocking::first_edge(t)?,
        &proto::auth::auth_request(&body),
        Duration::from_millis(200),
    )
}

fn viewer(
    args: &ReachArgs,
    uid: u64,
    drop_p: f64,
    tally: &Tally,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let device = format!("reach-{uid}");
    let t = client::fetch_blocking(
        &args.control,
        args.room,
        uid,
        &device,
        Some(&args.control_key),
        false,
        Duration::from_secs(5),
    )?;
    let mut rng = SplitMix64::new(args.seed ^ uid.wrapping_mul(0x9e37_79b9));
    let mut seen = HashSet::new();
    let mut s = connect(&t, uid, &device)?;
    let mut packets = StreamDecoder::new(proto::limits::LINK_FRAME_BYTES_MAX);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut next_hb = Instant::now();
    let mut next_drop = Instant::now() + Duration::from_millis(200);
    while !stop.load(Relaxed) {
        if Instant::now() >= next_hb {
            s.write_all(&proto::auth::heartbeat_request())?;
            next_hb = Instant::now() + Duration::from_secs(20);
        }
        if drop_p > 0.0 && Instant::now() >= next_drop {
            next_drop = Instant::now() + Duration::from_millis(200);
            if rng.unit() < drop_p {
                tally.reconnects.fetch_add(1, Relaxed);
                s = connect(&t, uid, &device)?;
                packets = StreamDecoder::new(proto::limits::LINK_FRAME_BYTES_MAX);
            }
        }
        if !blocking::fill(&mut s, &mut packets, &mut chunk).unwrap_or(false) {
            // Closed or broken: the user comes back (the broker resends what was not ACKed).
            s = connect(&t, uid, &device)?;
            packets = StreamDecoder::new(proto::limits::LINK_FRAME_BYTES_MAX);
        }
        while let Ok(Some(p)) = packets.next_packet() {
            for i in blocking::notifications(&p) {
                #[derive(serde::Deserialize)]
                struct Id {
                    msg_id: Option<String>,
                }
                let Some(id) = serde_json::from_slice::<Id>(&i.body)
                    .ok()
                    .and_then(|x| x.msg_id)
                    .and_then(|x| x.parse::<u64>().ok())
                else {
                    continue;
                };
                tally.copies.fetch_add(1, Relaxed);
                if seen.contains(&id) {
                    // Processed before: a duplicate, dropped (ACKed again, the first ACK may
                    // have been lost).
                    tally.duplicates.fetch_add(1, Relaxed);
                    s.write_all(&proto::auth::ack_request(id))?;
                    continue;
                }
                if rng.unit() >= args.reach_success {
                    tally.ignored.fetch_add(1, Relaxed);
                    continue;
                }
                seen.insert(id);
                if let Ok(mut p) = tally.processed.lock() {
                    p.insert(id);
                }
                s.write_all(&proto::auth::ack_request(id))?;
            }
        }
    }
    Ok(())
}

/// One ingest connection's share: `pipeline` pushes written, then their answers read, paced at
/// one push per `gap`. Returns (msg id -> uid) of the accepted ones and the refused count.
fn publish(
    args: &ReachArgs,
    mine: &[(u32, u64)],
    pipeline: usize,
    gap: Duration,
    started: Instant,
) -> anyhow::Result<(Vec<(u64, u64)>, u64)> {
    let mut ingest = IngestConn::connect(&args.ingest, &args.api_key)?;
    let mut pushed = Vec::with_capacity(mine.len());
    let mut refused = 0u64;
    let mut k = 0u64;
    for chunk in mine.chunks(pipeline) {
        let mut uids = HashMap::new();
        for &(m, uid) in chunk {
            let body = format!(r#"{{"cmd":"REACH_TEST","m":{m},"uid":{uid}}}"#);
            let req = ingest.send_push(Push {
                req_id: 0,
                scope: Scope::User(UserId(uid)),
                priority: Priority::High,
                reach: Reach::High,
                ttl_ms: 0,
                body: body.into_bytes(),
            });
            uids.insert(req, uid);
        }
        ingest.flush()?;
        for _ in chunk {
            let (req, result) = ingest.recv()?;
            match result {
                Ok(id) => pushed.push((id.0, uids.get(&req).copied().unwrap_or(0))),
                Err(_) => refused += 1,
            }
        }
        k += chunk.len() as u64;
        let due = started + gap.mul_f64(k as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    Ok((pushed, refused))
}

pub fn run(args: &ReachArgs) -> anyhow::Result<()> {
    let n = args.viewers.clamp(1, REACH_VIEWERS_MAX);
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    // Per viewer, per 200 ms tick.
    let drop_p = args.reconnect_per_s / f64::from(n) / 5.0;
    let mut threads = Vec::new();
    for uid in 1..=u64::from(n) {
        let (a, t, s) = (args.clone(), tally.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            if let Err(e) = viewer(&a, uid, drop_p, &t, &s) {
                eprintln!("viewer {uid}: {e:#}");
            }
        }));
    }
    // Let every viewer connect and its presence reach the broker.
    std::thread::sleep(Duration::from_secs(2));
    // Every (message, user) pair, dealt round-robin to the ingest connections.
    let conns = args.ingest_conns.clamp(1, 256) as usize;
    let mut work: Vec<Vec<(u32, u64)>> = vec![Vec::new(); conns];
    let mut k = 0usize;
    for m in 0..args.messages {
        for uid in 1..=u64::from(n) {
            work[k % conns].push((m, uid));
            k += 1;
        }
    }
    let gap = Duration::from_secs_f64(conns as f64 / f64::from(args.rate.max(1)));
    let pipeline = args.pipeline.clamp(1, 4096) as usize;
    let started = Instant::now();
    let mut publishers = Vec::new();
    for mine in work {
        let a = args.clone();
        publishers.push(std::thread::spawn(move || {
            publish(&a, &mine, pipeline, gap, started)
        }));
    }
    let mut pushed: HashMap<u64, u64> = HashMap::new();
    let mut refused = 0u64;
    for p in publishers {
        let (ids, r) = p
            .join()
            .map_err(|_| anyhow::anyhow!("publisher panicked"))??;
        pushed.extend(ids);
        refused += r;
    }
    let push_s = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(args.settle_ms));
    stop.store(true, Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let processed = tally
        .processed
        .lock()
        .map(|p| p.clone())
        .unwrap_or_default();
    let delivered = pushed.keys().filter(|id| processed.contains(id)).count();
    let total = pushed.len().max(1);
    let rate = delivered as f64 / total as f64;
    let r = args.reach_success;
    let want = 1.0 - (1.0 - r).powi(args.retries as i32 + 1);
    let sd = (want * (1.0 - want) / total as f64).sqrt();
    let report = serde_json::json!({
        "scenario": "reach",
        "viewers": n,
        "messages": pushed.len(),
        "refused": refused,
        "push_s": push_s,
        "ingest_conns": conns,
        "pipeline": pipeline,
        "accepted_per_s": pushed.len() as f64 / push_s.max(1e-9),
        "reach_success": r,
        "retries": args.retries,
        "reconnect_per_s": args.reconnect_per_s,
        "reconnects": tally.reconnects.load(Relaxed),
        "delivered": delivered,
        "never_delivered": pushed.len() - delivered,
        "delivery_rate": rate,
        "expected_rate": want,
        "expected_sd": sd,
        "copies_seen": tally.copies.load(Relaxed),
        "copies_ignored": tally.ignored.load(Relaxed),
        "duplicates_dropped": tally.duplicates.load(Relaxed),
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
