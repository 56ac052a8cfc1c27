//! `barrage loadtest priority` (issue 9): does high priority stay fast under a low-priority
//! flood? N viewers sit in one room; the publisher sends a steady high-priority stream
//! (`--high-rate`) and, unless `--no-flood`, a low-priority flood (`--low-rate`, `--low-bytes`
//! each) to the same room. Every body carries its push time; viewers report the latency of each
//! priority (p50/p99), and what they received of each. Run it once with the flood and once
//! with `--no-flood` for the baseline.
//!
//! Blocking threads, one per viewer; the publisher pipelines pushes on one ingest connection.

use crate::client::{self, blocking};
use crate::publisher::IngestConn;
use proto::id::{Priority, Reach, RoomId, Scope};
use proto::ingest::Push;
use proto::packet::StreamDecoder;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Most viewers (one thread each).
pub const PRIORITY_VIEWERS_MAX: u32 = 1_000;
/// Publisher tick: pushes due within it are written together.
const TICK_MS: u64 = 5;

#[derive(clap::Args, Debug, Clone)]
pub struct PriorityArgs {
    /// Control's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub control: String,
    /// Control's API key (viewers log in as users 1..N); guests via getDanmuInfo without it.
    #[arg(long, env = "BARRAGE_CONTROL_KEY", hide_env_values = true)]
    pub control_key: Option<String>,
    /// The broker's ingest socket.
    #[arg(long, default_value = "127.0.0.1:7400")]
    pub ingest: String,
    /// The broker's API key.
    #[arg(long, env = "BARRAGE_API_KEY", hide_env_values = true)]
    pub api_key: String,
    #[arg(long, default_value_t = 100)]
    pub viewers: u32,
    #[arg(long, default_value_t = 1000)]
    pub room: u64,
    /// High-priority pushes per second.
    #[arg(long, default_value_t = 20)]
    pub high_rate: u32,
    /// Low-priority pushes per second (the flood).
    #[arg(long, default_value_t = 4000)]
    pub low_rate: u32,
    /// Body bytes of each low-priority push (padding).
    #[arg(long, default_value_t = 1000)]
    pub low_bytes: usize,
    /// Baseline: the high-priority stream alone.
    #[arg(long)]
    pub no_flood: bool,
    /// How long the measured part runs, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub duration_ms: u64,
    /// Compression asked for (3 brotli, 2 zlib, 0 plain).
    #[arg(long, default_value_t = 3)]
    pub protover: u32,
}

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[derive(Default)]
struct Latencies {
    high: Mutex<Vec<u64>>,
    low: Mutex<Vec<u64>>,
    low_received: AtomicU64,
    high_received: AtomicU64,
}

fn viewer(args: &PriorityArgs, uid: u64, lat: &Latencies, stop: &AtomicBool) -> anyhow::Result<()> {
    let device = format!("prio-{uid}");
    let (uid, key) = match &args.control_key {
        Some(k) => (uid, Some(k.as_str())),
        None => (0, None),
    };
    let t = client::fetch_blocking(
        &args.control,
        args.room,
        uid,
        &device,
        key,
        key.is_none(),
        Duration::from_secs(5),
    )?;
    let room = if t.room == 0 { args.room } else { t.room };
    let body = client::auth_body(uid, room, args.protover, &t.token, &device);
    let mut s = blocking::open(
        blocking::first_edge(&t)?,
        &proto::auth::auth_request(&body),
        Duration::from_millis(200),
    )?;
    let mut packets = StreamDecoder::new(proto::limits::LINK_FRAME_BYTES_MAX);
    let mut chunk = vec![0u8; 256 * 1024];
    let (mut high, mut low) = (Vec::new(), Vec::new());
    let mut next_hb = Instant::now();
    while !stop.load(Relaxed) {
        if Instant::now() >= next_hb {
            s.write_all(&proto::auth::heartbeat_request())?;
            next_hb = Instant::now() + Duration::from_secs(20);
        }
        if !blocking::fill(&mut s, &mut packets, &mut chunk)? {
            anyhow::bail!("edge closed the connection");
        }
        while let Ok(Some(p)) = packets.next_packet() {
            let now = unix_us();
            for i in blocking::notifications(&p) {
                #[derive(serde::Deserialize)]
                struct Stamp {
                    p: String,
                    t: u64,
                }
                let Ok(st) = serde_json::from_slice::<Stamp>(&i.body) else {
                    continue;
                };
                let us = now.saturating_sub(st.t);
                if st.p == "h" {
                    high.push(us);
                } else {
                    low.push(us);
                }
            }
        }
    }
    lat.high_received.fetch_add(high.len() as u64, Relaxed);
    lat.low_received.fetch_add(low.len() as u64, Relaxed);
    if let Ok(mut h) = lat.high.lock() {
        h.extend(high);
    }
    if let Ok(mut l) = lat.low.lock() {
        l.extend(low);
    }
    Ok(())
}

fn pct(v: &mut [u64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v[i.min(v.len() - 1)] as f64 / 1000.0
}

pub fn run(args: &PriorityArgs) -> anyhow::Result<()> {
    let n = args.viewers.clamp(1, PRIORITY_VIEWERS_MAX);
    let lat = Arc::new(Latencies::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for uid in 1..=u64::from(n) {
        let (a, l, s) = (args.clone(), lat.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            if let Err(e) = viewer(&a, uid, &l, &s) {
                eprintln!("viewer {uid}: {e:#}");
            }
        }));
    }
    std::thread::sleep(Duration::from_secs(2));
    let mut ingest = IngestConn::connect(&args.ingest, &args.api_key)?;
    let pad = "x".repeat(args.low_bytes.saturating_sub(40));
    let started = Instant::now();
    let end = started + Duration::from_millis(args.duration_ms);
    let (mut high_sent, mut low_sent, mut refused) = (0u64, 0u64, 0u64);
    let low_rate = if args.no_flood { 0 } else { args.low_rate };
    while Instant::now() < end {
        let elapsed = started.elapsed().as_secs_f64();
        let high_due = (elapsed * f64::from(args.high_rate)) as u64;
        let low_due = (elapsed * f64::from(low_rate)) as u64;
        let mut inflight = 0;
        let push = |ingest: &mut IngestConn, priority: Priority, body: String| {
            ingest.send_push(Push {
                req_id: 0,
                scope: Scope::Room(RoomId(args.room)),
                priority,
                reach: Reach::BestEffort,
                ttl_ms: 0,
                body: body.into_bytes(),
            });
        };
        while high_sent < high_due {
            push(
                &mut ingest,
                Priority::High,
                format!(r#"{{"cmd":"PK","p":"h","t":{}}}"#, unix_us()),
            );
            high_sent += 1;
            inflight += 1;
        }
        while low_sent < low_due {
            push(
                &mut ingest,
                Priority::Low,
                format!(
                    r#"{{"cmd":"DANMU_MSG","p":"l","t":{},"x":"{pad}"}}"#,
                    unix_us()
                ),
            );
            low_sent += 1;
            inflight += 1;
        }
        ingest.flush()?;
        for _ in 0..inflight {
            if ingest.recv()?.1.is_err() {
                refused += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(TICK_MS));
    }
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let mut high = lat.high.lock().map(|v| v.clone()).unwrap_or_default();
    let mut low = lat.low.lock().map(|v| v.clone()).unwrap_or_default();
    let report = serde_json::json!({
        "scenario": "priority",
        "viewers": n,
        "flood": !args.no_flood,
        "high_sent": high_sent,
        "low_sent": low_sent,
        "refused": refused,
        "high_received": lat.high_received.load(Relaxed),
        "low_received": lat.low_received.load(Relaxed),
        "high_p50_ms": pct(&mut high, 0.5),
        "high_p99_ms": pct(&mut high, 0.99),
        "low_p50_ms": pct(&mut low, 0.5),
        "low_p99_ms": pct(&mut low, 0.99),
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
