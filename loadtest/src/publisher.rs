//! The publisher: pushes corpus bodies, each stamped with `"lt":{"ts_us":..,"seq":..}` (publish
//! time and the room's sequence), at a target total rate spread over rooms by weight, through the
//! broker's ingest socket (proto::ingest frames, pipelined: a small blocking client of our own, so
//! the tool depends only on the wire contract) or its HTTP API.
//!
//! Invariants: one publisher thread owns every room's sequence, so sequence numbers are issued in
//! push order; `Shared::issued[room]` counts the numbers issued and `Shared::rejected[room]` those
//! the broker refused (a refused number never reaches anyone, so viewers do not count it as lost).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::id::{MsgId, Priority, Reach, RoomId, Scope};
use proto::ingest::{IngestError, IngestFrame, Push, PushError};
use serde::{Deserialize, Serialize};

use crate::cli::PublishVia;
use crate::corpus::{with_lt, Corpus, SplitMix64};
use crate::stats::WeightedPicker;
use crate::viewer::{unix_us, Shared};

/// Pushes in flight on the ingest socket before the publisher waits for statuses.
const PIPELINE_DEPTH: usize = 128;
/// Corpus bodies generated up front and cycled (generation must not pace the publisher).
const BODY_POOL: usize = 2048;
/// Pacing tick.
const TICK_US: u64 = 1000;
/// Most messages sent in one tick after a stall (bounded catch-up).
const BURST_MAX: f64 = 2000.0;

#[derive(Clone, Debug)]
pub struct PublisherCfg {
    pub via: PublishVia,
    pub ingest: String,
    pub broker_http: String,
    pub api_key: String,
    /// Room ids, index = room index of [`Shared`].
    pub rooms: Vec<u64>,
    /// Relative publish weight per room.
    pub weights: Vec<f64>,
    pub seed: u64,
}

/// What the publisher did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PubStats {
    pub sent: u64,
    pub accepted: u64,
    pub rejected: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
    pub body_bytes: u64,
}

/// Control of a running publisher.
pub struct Publisher {
    /// Target messages per second (all rooms together); 0 pauses.
    pub rate: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<PubStats>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Publisher {
    pub fn start(cfg: PublisherCfg, shared: Arc<Shared>, rate: u32) -> anyhow::Result<Publisher> {
        let rate = Arc::new(AtomicU32::new(rate));
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(PubStats::default()));
        let (r, s, st) = (rate.clone(), stop.clone(), stats.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        // The sink is made on the publisher thread (an HTTP sink holds a thread-bound runtime);
        // the caller still learns at once whether the broker let us in.
        let handle = std::thread::Builder::new()
            .name("publisher".into())
            .spawn(move || {
                let mut sink = match Sink::connect(&cfg) {
                    Ok(sink) => {
                        let _ = ready_tx.send(Ok(()));
                        sink
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                publish_loop(&cfg, &shared, &r, &s, &st, &mut sink);
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Publisher {
                rate,
                stop,
                stats,
                handle: Some(handle),
            }),
            Ok(Err(e)) => {
                let _ = handle.join();
                anyhow::bail!("publisher: {e}")
            }
            Err(_) => {
                let _ = handle.join();
                anyhow::bail!("publisher thread ended before connecting")
            }
        }
    }

    pub fn stats(&self) -> PubStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Stops pushing, waits for the outstanding statuses, returns the totals.
    pub fn stop(mut self) -> PubStats {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.stats()
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A pipelined ingest connection: frames are buffered and written once per tick.
pub(crate) struct IngestConn {
    stream: std::net::TcpStream,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    next_req: u64,
}

impl IngestConn {
    pub(crate) fn connect(addr: &str, api_key: &str) -> anyhow::Result<IngestConn> {
        use std::net::ToSocketAddrs;
        let a = addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| anyhow::anyhow!("no address for {addr}"))?;
        let stream = std::net::TcpStream::connect_timeout(&a, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut c = IngestConn {
            stream,
            rbuf: Vec::new(),
            wbuf: Vec::new(),
            next_req: 1,
        };
        proto::ingest::encode(
            &IngestFrame::Auth {
                req_id: 0,
                api_key: api_key.to_string(),
            },
            &mut c.wbuf,
        );
        c.flush()?;
        match c.recv()? {
            (0, Ok(_)) => Ok(c),
            (_, Err(e)) => anyhow::bail!("ingest auth refused: {e}"),
            (id, Ok(_)) => anyhow::bail!("ingest answered request {id} before auth"),
        }
    }

    /// Buffers one push; returns its request id.
    fn send(&mut self, room: u64, body: Vec<u8>) -> u64 {
        let req_id = self.next_req;
        self.next_req += 1;
        let push = Push {
            req_id,
            scope: Scope::Room(RoomId(room)),
            priority: Priority::Low,
            reach: Reach::BestEffort,
            ttl_ms: 0,
            body,
        };
        proto::ingest::encode(&IngestFrame::Push(push), &mut self.wbuf);
        req_id
    }

    /// Buffers one push as given (its `req_id` replaced); returns the request id.
    pub(crate) fn send_push(&mut self, mut push: Push) -> u64 {
        push.req_id = self.next_req;
        self.next_req += 1;
        proto::ingest::encode(&IngestFrame::Push(push), &mut self.wbuf);
        self.next_req - 1
    }

    pub(crate) fn flush(&mut self) -> std::io::Result<()> {
        use std::io::Write;
        let r = self.stream.write_all(&self.wbuf);
        self.wbuf.clear();
        r
    }

    pub(crate) fn recv(&mut self) -> anyhow::Result<(u64, Result<MsgId, PushError>)> {
        use std::io::Read;
        loop {
            match proto::ingest::decode(&self.rbuf, proto::limits::INGEST_FRAME_BYTES_MAX) {
                Ok((frame, used)) => {
                    self.rbuf.drain(..used);
                    match frame {
                        IngestFrame::Status { req_id, result } => return Ok((req_id, result)),
                        other => anyhow::bail!("unexpected ingest frame {other:?}"),
                    }
                }
                Err(IngestError::Incomplete) => {}
                Err(e) => anyhow::bail!("bad ingest frame: {e}"),
            }
            let mut chunk = [0u8; 8192];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                anyhow::bail!("broker closed the ingest connection");
            }
            self.rbuf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Where pushes go.
enum Sink {
    Ingest(Box<IngestConn>),
    Http {
        addr: String,
        auth: String,
        rt: Box<monoio::Runtime<monoio::time::TimeDriver<monoio::LegacyDriver>>>,
    },
}

impl Sink {
    fn connect(cfg: &PublisherCfg) -> anyhow::Result<Sink> {
        Ok(match cfg.via {
            PublishVia::Ingest => Sink::Ingest(Box::new(
                IngestConn::connect(&cfg.ingest, &cfg.api_key)
                    .map_err(|e| anyhow::anyhow!("ingest {}: {e}", cfg.ingest))?,
            )),
            PublishVia::Http => Sink::Http {
                addr: cfg.broker_http.clone(),
                auth: format!("Bearer {}", cfg.api_key),
                rt: Box::new(
                    monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                        .enable_timer()
                        .build()?,
                ),
            },
        })
    }
}

fn count(map: &mut BTreeMap<String, u64>, k: &str) {
    *map.entry(k.to_string()).or_default() += 1;
}

fn publish_loop(
    cfg: &PublisherCfg,
    shared: &Shared,
    rate: &AtomicU32,
    stop: &AtomicBool,
    stats: &Mutex<PubStats>,
    sink: &mut Sink,
) {
    let mut corpus = Corpus::new(cfg.seed);
    let pool: Vec<Vec<u8>> = (0..BODY_POOL).map(|_| corpus.next_body()).collect();
    let picker = WeightedPicker::new(&cfg.weights);
    let mut rng = SplitMix64::new(cfg.seed ^ 0x9b1);
    let mut next_seq = vec![0u64; cfg.rooms.len()];
    let mut in_flight: HashMap<u64, usize> = HashMap::new();
    let mut budget = 0.0f64;
    let mut last = Instant::now();
    let mut i = 0usize;
    let mut local = PubStats::default();
    shared.publishing.store(true, Ordering::Release);
    let mut broken = false;
    loop {
        let stopping = stop.load(Ordering::Acquire);
        if broken && !stopping {
            // Reconnect once per tick; pushes wait (the budget keeps accruing, bounded).
            match Sink::connect(cfg) {
                Ok(s) => {
                    *sink = s;
                    broken = false;
                }
                Err(e) => {
                    count(&mut local.errors, &format!("reconnect: {e}"));
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
        }
        let now = Instant::now();
        let r = f64::from(rate.load(Ordering::Relaxed));
        budget =
            (budget + r * now.duration_since(last).as_secs_f64()).min(BURST_MAX.max(r / 100.0));
        last = now;
        while !stopping && budget >= 1.0 && in_flight.len() < PIPELINE_DEPTH {
            budget -= 1.0;
            let room_idx = picker.pick(rng.unit());
            let room = cfg.rooms[room_idx];
            let seq = next_seq[room_idx];
            next_seq[room_idx] += 1;
            shared.issued[room_idx].store(next_seq[room_idx], Ordering::Release);
            let body = with_lt(&pool[i % pool.len()], unix_us(), seq);
            i += 1;
            local.sent += 1;
            local.body_bytes += body.len() as u64;
            match sink {
                Sink::Ingest(c) => {
                    in_flight.insert(c.send(room, body), room_idx);
                }
                Sink::Http { addr, auth, rt } => {
                    let path = format!("/v1/push/room/{room}");
                    let headers = [
                        ("authorization", auth.as_str()),
                        ("content-type", "application/json"),
                    ];
                    let res = rt.block_on(net::http::request(
                        addr,
                        "POST",
                        &path,
                        &headers,
                        &body,
                        Duration::from_secs(10),
                    ));
                    match res {
                        Ok(resp) if resp.status == 202 || resp.status == 200 => local.accepted += 1,
                        Ok(resp) => {
                            count(&mut local.rejected, &format!("http_{}", resp.status));
                            shared.rejected[room_idx].fetch_add(1, Ordering::AcqRel);
                        }
                        Err(e) => {
                            count(&mut local.errors, &format!("http: {e}"));
                            shared.rejected[room_idx].fetch_add(1, Ordering::AcqRel);
                        }
                    }
                }
            }
        }
        // Collect the statuses of what was sent (they come back within a millisecond or so).
        if let Sink::Ingest(c) = sink {
            if let Err(e) = c.flush() {
                count(&mut local.errors, &format!("send: {e}"));
                broken = true;
            }
            while !in_flight.is_empty() {
                match c.recv() {
                    Ok((req, result)) => {
                        let Some(room_idx) = in_flight.remove(&req) else {
                            continue;
                        };
                        match result {
                            Ok(_) => local.accepted += 1,
                            Err(e) => {
                                count(&mut local.rejected, e.label());
                                shared.rejected[room_idx].fetch_add(1, Ordering::AcqRel);
                            }
                        }
                    }
                    Err(e) => {
                        // The connection broke: statuses still owed are unknown; count them as
                        // refused (not delivered) so they are not blamed on the fan-out.
                        count(&mut local.errors, &format!("recv: {e}"));
                        for (_, room_idx) in in_flight.drain() {
                            shared.rejected[room_idx].fetch_add(1, Ordering::AcqRel);
                        }
                        broken = true;
                    }
                }
            }
        }
        if let Ok(mut s) = stats.lock() {
            *s = local.clone();
        }
        if stopping {
            return;
        }
        std::thread::sleep(Duration::from_micros(TICK_US));
    }
}
