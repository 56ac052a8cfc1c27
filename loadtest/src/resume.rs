//! `barrage loadtest resume` (issue 9): viewers that lose their connection during a steady room
//! stream and resume where they were.
//!
//! N viewers (`--viewers`) sit in `--rooms` rooms with `"sync":true`; once every viewer has its
//! first `BARRAGE_SYNC`, the publisher streams `--rate` low-priority messages/s into each room
//! for `--duration-ms`. Each viewer drops its connection `--resumes` times at random moments,
//! stays away a random `0..=--down-ms-max`, and reconnects with `"resume":{epoch,seq}` from its
//! [`Position`]. Right before each resume it also opens a fresh `"sync":true` connection (no
//! resume) and closes it after its sync: the baseline for the connect -> `BARRAGE_SYNC` time,
//! under the same load.
//!
//! Counted per run: resumes, resumes the sync called recovered, batches replayed (received
//! between op 8 and the sync), batch gaps and duplicates as [`Position`] sees them, and, end to
//! end, published messages a viewer never received and messages it received twice (each body
//! carries its room's message index). Connect -> sync p50/p99 for resumes and fresh connects.
//!
//! Blocking threads, one per viewer: the point is resume correctness and its cost, not edge load.

use crate::client::blocking::{self, fill};
use crate::client::{self, Position, Seen, Ticket};
use crate::corpus::SplitMix64;
use crate::publisher::IngestConn;
use proto::id::{Priority, Reach, RoomId, Scope};
use proto::ingest::Push;
use proto::packet::{op, ver, OwnedPacket, StreamDecoder};
use std::collections::HashSet;
use std::io::Write;
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Most viewers (one thread each).
pub const RESUME_VIEWERS_MAX: u32 = 2_000;
/// Longest wait for a `BARRAGE_SYNC` after connecting.
const SYNC_WAIT_MS_MAX: u64 = 5_000;
/// Publisher tick: pushes due within it are written together.
const TICK_MS: u64 = 5;

#[derive(clap::Args, Debug, Clone)]
pub struct ResumeArgs {
    /// Control's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub control: String,
    /// Control's API key (viewers log in as users 1..N); guests without it.
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
    /// Viewers are spread over rooms `room_base .. room_base + rooms`.
    #[arg(long, default_value_t = 4)]
    pub rooms: u32,
    #[arg(long, default_value_t = 1000)]
    pub room_base: u64,
    /// Messages per second into each room.
    #[arg(long, default_value_t = 100)]
    pub rate: u32,
    /// Drops and resumes per viewer, at random moments of the run.
    #[arg(long, default_value_t = 5)]
    pub resumes: u32,
    /// Longest time a viewer stays away before resuming (uniform from 0).
    #[arg(long, default_value_t = 500)]
    pub down_ms_max: u64,
    /// Publishing time; drops fall in its first 90%.
    #[arg(long, default_value_t = 10_000)]
    pub duration_ms: u64,
    /// Wait after the last push before counting.
    #[arg(long, default_value_t = 1_000)]
    pub settle_ms: u64,
    /// Compression asked for (3 brotli, 2 zlib, 0 plain).
    #[arg(long, default_value_t = 3)]
    pub protover: u32,
    /// Write the JSON report here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// The report (also the JSON, field for field).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ResumeReport {
    pub scenario: String,
    pub viewers: u32,
    pub rooms: u32,
    pub rate_per_room: u32,
    pub duration_ms: u64,
    /// Drops asked per viewer (drops still pending when the run stops are not made).
    pub resumes_per_viewer: u32,
    pub down_ms_max: u64,
    pub published: u64,
    pub refused: u64,
    /// Resumes answered with a sync.
    pub resumes: u64,
    /// Of those, syncs that said `recovered:true`.
    pub recovered: u64,
    /// Sum of the syncs' `missed`.
    pub missed: u64,
    /// Batches received between op 8 and the sync of a resume.
    pub replayed_batches: u64,
    /// Batches missing in a viewer's seq (Position gaps).
    pub gaps: u64,
    /// Batches at or before a viewer's position (dropped).
    pub dups: u64,
    /// Published messages a viewer never received (over all viewers).
    pub messages_lost: u64,
    /// Messages a viewer received twice in batches that were not duplicates.
    pub messages_dup: u64,
    /// Fresh `"sync":true` connects measured (the baseline).
    pub fresh_connects: u64,
    pub resume_sync_p50_ms: f64,
    pub resume_sync_p99_ms: f64,
    pub fresh_sync_p50_ms: f64,
    pub fresh_sync_p99_ms: f64,
    /// Connects, auths or syncs that failed or timed out.
    pub errors: u64,
}

impl ResumeReport {
    /// The human table.
    pub fn render(&self) -> String {
        let mut s = format!(
            "resume: {} viewers in {} rooms, {} msg/s per room for {} ms, {} drops each (away up to {} ms), {} published ({} refused)\n",
            self.viewers,
            self.rooms,
            self.rate_per_room,
            self.duration_ms,
            self.resumes_per_viewer,
            self.down_ms_max,
            self.published,
            self.refused
        );
        let rows: [(&str, String); 10] = [
            ("resumes", self.resumes.to_string()),
            ("recovered", self.recovered.to_string()),
            ("missed (sync)", self.missed.to_string()),
            ("replayed batches", self.replayed_batches.to_string()),
            ("gaps (batches)", self.gaps.to_string()),
            ("dups (batches)", self.dups.to_string()),
            ("messages lost", self.messages_lost.to_string()),
            ("messages twice", self.messages_dup.to_string()),
            ("fresh connects", self.fresh_connects.to_string()),
            ("errors", self.errors.to_string()),
        ];
        for (k, v) in rows {
            s.push_str(&format!("  {k:<18}{v:>10}\n"));
        }
        s.push_str(&format!(
            "  {:<18}{:>10}{:>10}\n  {:<18}{:>10.2}{:>10.2}\n  {:<18}{:>10.2}{:>10.2}\n",
            "connect->sync ms",
            "p50",
            "p99",
            "resume",
            self.resume_sync_p50_ms,
            self.resume_sync_p99_ms,
            "fresh (baseline)",
            self.fresh_sync_p50_ms,
            self.fresh_sync_p99_ms
        ));
        s
    }
}

#[derive(Default)]
struct Tally {
    resumes: AtomicU64,
    recovered: AtomicU64,
    missed: AtomicU64,
    replayed: AtomicU64,
    gaps: AtomicU64,
    dups: AtomicU64,
    messages_lost: AtomicU64,
    messages_dup: AtomicU64,
    errors: AtomicU64,
    /// Viewers that have their first sync (the publisher waits for all).
    ready: AtomicU64,
    resume_us: Mutex<Vec<u64>>,
    fresh_us: Mutex<Vec<u64>>,
}

/// What a viewer knows of its room's stream.
struct Viewer {
    position: Position,
    /// Message indices received (from batches that were not duplicates).
    seen: HashSet<u64>,
    packets: StreamDecoder,
}

/// A connection that got its sync: the stream, and how long connect -> sync took.
struct Synced {
    stream: TcpStream,
    took: Duration,
}

fn open(
    addr: std::net::SocketAddr,
    body: &proto::auth::AuthBody,
    resume: Option<&proto::sync::Resume>,
) -> anyhow::Result<TcpStream> {
    blocking::open(
        addr,
        &proto::auth::auth_request_ext(body, resume, true),
        Duration::from_millis(100),
    )
}

fn sync_of(p: &OwnedPacket) -> Option<proto::sync::Sync> {
    if p.op == op::NOTIFICATION && p.ver == ver::PLAIN {
        proto::sync::parse_sync(&p.body)
    } else {
        None
    }
}

impl Viewer {
    /// Every complete packet read so far: syncs move the position, batches are counted.
    fn drain(&mut self, tally: &Tally) -> anyhow::Result<()> {
        while let Some(p) = self.packets.next_packet()? {
            if let Some(sync) = sync_of(&p) {
                self.position.on_sync(&sync);
            } else if p.op == op::NOTIFICATION {
                self.on_batch(&p, tally);
            }
        }
        Ok(())
    }

    /// A room batch: position, then its messages.
    fn on_batch(&mut self, p: &OwnedPacket, tally: &Tally) {
        match self.position.on_batch(p.seq) {
            Seen::Duplicate => {
                tally.dups.fetch_add(1, Relaxed);
                return;
            }
            Seen::Gap(n) => {
                tally.gaps.fetch_add(u64::from(n), Relaxed);
            }
            Seen::New => {}
        }
        let Ok(inner) = proto::container::unpack(
            p.ver,
            p.op,
            p.seq,
            &p.body,
            proto::limits::DECOMPRESSED_BYTES_MAX,
        ) else {
            tally.errors.fetch_add(1, Relaxed);
            return;
        };
        for i in inner.iter().filter(|i| i.op == op::NOTIFICATION) {
            #[derive(serde::Deserialize)]
            struct Index {
                i: u64,
            }
            if let Ok(x) = serde_json::from_slice::<Index>(&i.body) {
                if !self.seen.insert(x.i) {
                    tally.messages_dup.fetch_add(1, Relaxed);
                }
            }
        }
    }

    /// Connects (resuming from the position when `resume`), reads up to and including the
    /// sync, counting batches that came before it as replayed.
    fn connect(
        &mut self,
        addr: std::net::SocketAddr,
        body: &proto::auth::AuthBody,
        resume: bool,
        tally: &Tally,
        chunk: &mut [u8],
    ) -> anyhow::Result<Synced> {
        let started = Instant::now();
        let r = if resume { self.position.resume() } else { None };
        let mut s = open(addr, body, r.as_ref())?;
        self.packets = StreamDecoder::new(proto::limits::LINK_FRAME_BYTES_MAX);
        let deadline = started + Duration::from_millis(SYNC_WAIT_MS_MAX);
        let mut replayed = 0;
        while Instant::now() < deadline {
            if !fill(&mut s, &mut self.packets, chunk)? {
                anyhow::bail!("the edge closed the connection before the sync");
            }
            while let Some(p) = self.packets.next_packet()? {
                if let Some(sync) = sync_of(&p) {
                    let took = started.elapsed();
                    if resume {
                        tally.resumes.fetch_add(1, Relaxed);
                        tally
                            .recovered
                            .fetch_add(u64::from(sync.recovered), Relaxed);
                        tally.missed.fetch_add(sync.missed, Relaxed);
                        tally.replayed.fetch_add(replayed, Relaxed);
                    }
                    self.position.on_sync(&sync);
                    return Ok(Synced { stream: s, took });
                }
                if p.op == op::NOTIFICATION {
                    replayed += 1;
                    self.on_batch(&p, tally);
                }
            }
        }
        anyhow::bail!("no BARRAGE_SYNC within {SYNC_WAIT_MS_MAX} ms")
    }
}

/// A fresh `"sync":true` connect, closed after its sync: the baseline time.
fn fresh(
    addr: std::net::SocketAddr,
    body: &proto::auth::AuthBody,
    chunk: &mut [u8],
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut s = open(addr, body, None)?;
    let mut packets = StreamDecoder::new(proto::limits::LINK_FRAME_BYTES_MAX);
    let deadline = started + Duration::from_millis(SYNC_WAIT_MS_MAX);
    while Instant::now() < deadline {
        if !fill(&mut s, &mut packets, chunk)? {
            anyhow::bail!("the edge closed the connection before the sync");
        }
        while let Some(p) = packets.next_packet()? {
            if sync_of(&p).is_some() {
                return Ok(started.elapsed());
            }
        }
    }
    anyhow::bail!("no BARRAGE_SYNC within {SYNC_WAIT_MS_MAX} ms")
}

struct Shared {
    tally: Tally,
    /// Set when publishing starts (drop moments are drawn from it).
    started: Mutex<Option<Instant>>,
    stop: AtomicBool,
    /// Messages published per room (index = room - room_base), final once `stop` is set.
    published: Mutex<Vec<u64>>,
}

fn ticket(args: &ResumeArgs, room: u64, uid: u64, device: &str) -> anyhow::Result<Ticket> {
    let (uid, key) = match &args.control_key {
        Some(k) => (uid, Some(k.as_str())),
        None => (0, None),
    };
    Ok(client::fetch_blocking(
        &args.control,
        room,
        uid,
        device,
        key,
        false,
        Duration::from_secs(5),
    )?)
}

fn viewer(args: &ResumeArgs, uid: u64, sh: &Shared) -> anyhow::Result<()> {
    let tally = &sh.tally;
    let room = args.room_base + uid % u64::from(args.rooms.max(1));
    let device = format!("resume-{uid}");
    let t = ticket(args, room, uid, &device)?;
    let e = t
        .edges
        .first()
        .ok_or_else(|| anyhow::anyhow!("no edge in the ticket"))?;
    let addr = e
        .addr(false)
        .ok_or_else(|| anyhow::anyhow!("cannot resolve {}", e.host))?;
    let uid_in_body = if args.control_key.is_some() { uid } else { 0 };
    let body = client::auth_body(uid_in_body, room, args.protover, &t.token, &device);
    let mut v = Viewer {
        position: Position::default(),
        seen: HashSet::new(),
        packets: StreamDecoder::new(proto::limits::LINK_FRAME_BYTES_MAX),
    };
    let mut chunk = vec![0u8; 64 * 1024];
    let mut s = v.connect(addr, &body, false, tally, &mut chunk)?.stream;
    tally.ready.fetch_add(1, Relaxed);
    // Drop moments: uniform over the first 90% of the publishing time.
    let started = loop {
        if let Ok(g) = sh.started.lock() {
            if let Some(t) = *g {
                break t;
            }
        }
        if sh.stop.load(Relaxed) {
            return Ok(());
        }
        let _ = fill(&mut s, &mut v.packets, &mut chunk)?;
        v.drain(tally)?;
    };
    let mut rng = SplitMix64::new(args.seed ^ uid.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let window = args.duration_ms * 9 / 10;
    let mut drops: Vec<Instant> = (0..args.resumes)
        .map(|_| started + Duration::from_millis(rng.below(window.max(1))))
        .collect();
    drops.sort();
    drops.reverse();
    let mut next_hb = Instant::now();
    while !sh.stop.load(Relaxed) {
        if Instant::now() >= next_hb {
            s.write_all(&proto::auth::heartbeat_request())?;
            next_hb = Instant::now() + Duration::from_secs(20);
        }
        if drops.last().is_some_and(|d| Instant::now() >= *d) {
            drops.pop();
            drop(s);
            std::thread::sleep(Duration::from_millis(rng.range(0, args.down_ms_max)));
            match fresh(addr, &body, &mut chunk) {
                Ok(took) => {
                    if let Ok(mut f) = tally.fresh_us.lock() {
                        f.push(took.as_micros() as u64);
                    }
                }
                Err(_) => {
                    tally.errors.fetch_add(1, Relaxed);
                }
            }
            let synced = v.connect(addr, &body, true, tally, &mut chunk)?;
            if let Ok(mut r) = tally.resume_us.lock() {
                r.push(synced.took.as_micros() as u64);
            }
            s = synced.stream;
            continue;
        }
        if !fill(&mut s, &mut v.packets, &mut chunk)? {
            anyhow::bail!("the edge closed the connection");
        }
        v.drain(tally)?;
    }
    let published = sh
        .published
        .lock()
        .map(|p| p[(room - args.room_base) as usize])
        .unwrap_or(0);
    let got = v.seen.iter().filter(|i| **i < published).count() as u64;
    tally
        .messages_lost
        .fetch_add(published.saturating_sub(got), Relaxed);
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

/// Runs the scenario; prints the table, writes `--json`, and returns the report.
pub fn run(args: &ResumeArgs) -> anyhow::Result<ResumeReport> {
    let n = args.viewers.clamp(1, RESUME_VIEWERS_MAX);
    let rooms = args.rooms.max(1);
    let sh = Arc::new(Shared {
        tally: Tally::default(),
        started: Mutex::new(None),
        stop: AtomicBool::new(false),
        published: Mutex::new(vec![0; rooms as usize]),
    });
    let threads: Vec<_> = (1..=u64::from(n))
        .map(|uid| {
            let (a, sh) = (args.clone(), sh.clone());
            std::thread::spawn(move || {
                if let Err(e) = viewer(&a, uid, &sh) {
                    sh.tally.errors.fetch_add(1, Relaxed);
                    eprintln!("viewer {uid}: {e:#}");
                }
            })
        })
        .collect();
    // Publish only once every viewer is in (its first sync), so each sees the stream from
    // message 0; bounded, a viewer that failed is counted in errors.
    let deadline = Instant::now() + Duration::from_secs(30);
    while sh.tally.ready.load(Relaxed) + sh.tally.errors.load(Relaxed) < u64::from(n)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut ingest = IngestConn::connect(&args.ingest, &args.api_key)?;
    let started = Instant::now();
    if let Ok(mut g) = sh.started.lock() {
        *g = Some(started);
    }
    let end = started + Duration::from_millis(args.duration_ms);
    let mut sent = vec![0u64; rooms as usize];
    let mut refused = 0u64;
    while Instant::now() < end {
        let due = (started.elapsed().as_secs_f64() * f64::from(args.rate)) as u64;
        let mut inflight = 0;
        for (r, k) in sent.iter_mut().enumerate() {
            while *k < due {
                let room = args.room_base + r as u64;
                ingest.send_push(Push {
                    req_id: 0,
                    scope: Scope::Room(RoomId(room)),
                    priority: Priority::Low,
                    reach: Reach::BestEffort,
                    ttl_ms: 0,
                    body: format!(r#"{{"cmd":"DANMU_MSG","r":{room},"i":{k}}}"#).into_bytes(),
                });
                *k += 1;
                inflight += 1;
            }
        }
        ingest.flush()?;
        for _ in 0..inflight {
            if ingest.recv()?.1.is_err() {
                refused += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(TICK_MS));
    }
    if let Ok(mut p) = sh.published.lock() {
        p.clone_from(&sent);
    }
    std::thread::sleep(Duration::from_millis(args.settle_ms));
    sh.stop.store(true, Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let t = &sh.tally;
    let mut resume_us = t.resume_us.lock().map(|v| v.clone()).unwrap_or_default();
    let mut fresh_us = t.fresh_us.lock().map(|v| v.clone()).unwrap_or_default();
    let report = ResumeReport {
        scenario: "resume".into(),
        viewers: n,
        rooms,
        rate_per_room: args.rate,
        duration_ms: args.duration_ms,
        resumes_per_viewer: args.resumes,
        down_ms_max: args.down_ms_max,
        published: sent.iter().sum(),
        refused,
        resumes: t.resumes.load(Relaxed),
        recovered: t.recovered.load(Relaxed),
        missed: t.missed.load(Relaxed),
        replayed_batches: t.replayed.load(Relaxed),
        gaps: t.gaps.load(Relaxed),
        dups: t.dups.load(Relaxed),
        messages_lost: t.messages_lost.load(Relaxed),
        messages_dup: t.messages_dup.load(Relaxed),
        fresh_connects: fresh_us.len() as u64,
        resume_sync_p50_ms: pct(&mut resume_us, 0.5),
        resume_sync_p99_ms: pct(&mut resume_us, 0.99),
        fresh_sync_p50_ms: pct(&mut fresh_us, 0.5),
        fresh_sync_p99_ms: pct(&mut fresh_us, 0.99),
        errors: t.errors.load(Relaxed),
    };
    print!("{}", report.render());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(report)
}
