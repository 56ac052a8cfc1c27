//! Simulated viewers: one monoio runtime per thread, each thread owning its share of connections.
//!
//! A connection does what a real client does: ticket from control, TCP connect (from one of the
//! configured loopback source addresses) or WebSocket upgrade on `/sub`, op 7 auth with
//! `protover`, heartbeats every `heartbeat_ms`, and decoding of every batch. Per message it records
//! the latency (publish time in the body's `lt` field to decode here) and the room sequence.
//!
//! Layout: [`Receiver`] is the sans-io part (bytes in, events out); [`DecodeCache`] lets all
//! connections of a thread share the decompression of identical batch bytes (every viewer of a
//! room receives the same bytes, and decompressing them 19,000 times would make the tool the
//! bottleneck it is meant to measure); the rest is the thin monoio shell and the thread loop.
//!
//! Invariants: every await that waits on the network has a timeout or ends at the thread's stop;
//! a connection's failure is counted by reason and affects only that connection.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use monoio::io::{AsyncReadRent, AsyncWriteRentExt, Splitable};
use proto::packet::{self, op, ver, DecodeError};
use proto::ws::{FrameDecoder, Message, Opcode};
use serde::{Deserialize, Serialize};

use crate::cli::Transport;
use crate::client::{self, Ticket};
use crate::corpus::{find_lt, SplitMix64};
use crate::stats::{SeqTracker, Stats};

mod udp;

/// Read buffer per connection. Batches are a few KB; the decoders keep any partial packet.
const READ_BUF_BYTES: usize = 4096;
/// Largest packet or WebSocket message accepted from the edge.
const FRAME_BYTES_MAX: u32 = 8 * 1024 * 1024;
/// Decompressed bytes allowed per batch.
const DECOMPRESSED_BYTES_MAX: usize = proto::limits::DECOMPRESSED_BYTES_MAX;
/// Distinct batches a thread's decode cache keeps before it starts over.
const DECODE_CACHE_ENTRIES_MAX: usize = 512;
/// How often a thread checks its stop flag and the step, and ships a stats window.
const TICK_MS: u64 = 100;
const WINDOW_MS: u64 = 1000;

/// State shared by every viewer thread and the coordinator (and mirrored into child processes).
#[derive(Debug)]
pub struct Shared {
    pub stop: AtomicBool,
    /// The measurement step windows belong to (0: not measured: ramp, warm-up, drain).
    pub step: AtomicU32,
    /// Set when the publisher starts: connections authenticated before it expect seq 0.
    pub publishing: AtomicBool,
    /// Per room index: sequence numbers issued by the publisher (0..issued).
    pub issued: Vec<AtomicU64>,
    /// Per room index: of those, refused by the broker (never delivered to anyone).
    pub rejected: Vec<AtomicU64>,
    /// Churn opens no new connection while set (the presence check counts what is open).
    pub paused: AtomicBool,
}

impl Shared {
    pub fn new(rooms: usize) -> Arc<Shared> {
        Arc::new(Shared {
            stop: AtomicBool::new(false),
            step: AtomicU32::new(0),
            publishing: AtomicBool::new(false),
            issued: (0..rooms).map(|_| AtomicU64::new(0)).collect(),
            rejected: (0..rooms).map(|_| AtomicU64::new(0)).collect(),
            paused: AtomicBool::new(false),
        })
    }
}

/// Settings every connection of a run shares.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ViewerCfg {
    pub control: String,
    pub control_key: Option<String>,
    pub danmu_info: bool,
    /// One ticket per room per thread instead of one per connection (faster ramps; the edge
    /// sees the same tokens a shared link would give).
    pub ticket_per_room: bool,
    pub protover: u32,
    pub heartbeat_ms: u64,
    pub connect_timeout_ms: u64,
    pub allow_remote: bool,
    pub decode_cache: bool,
    /// Spread connections over every edge the ticket lists (connection i takes edge i mod n)
    /// instead of the first: the way to load several edge processes from one ticket.
    pub spread_edges: bool,
    pub driver: net::runtime::Driver,
    /// UDP viewers: percent of received data datagrams dropped on purpose.
    #[serde(default)]
    pub udp_loss_pct: f64,
}

/// One planned connection.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConnSpec {
    pub room_idx: u32,
    pub room: u64,
    pub ws: bool,
    /// Datagrams instead of a stream (`ws` is then false).
    #[serde(default)]
    pub udp: bool,
    pub source: IpAddr,
    pub uid: u64,
    /// Which of the ticket's edges to use when spreading (`spread_edges`).
    pub edge_pick: u32,
}

/// What a thread does.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Mode {
    /// Open `conns` at `ramp_per_s` and hold them until stop.
    Hold {
        conns: Vec<ConnSpec>,
        ramp_per_s: f64,
    },
    /// Open short-lived connections at `connects_per_s`, each held `hold_ms`, until stop.
    Churn {
        rooms: Vec<u64>,
        sources: Vec<IpAddr>,
        transport: Transport,
        connects_per_s: f64,
        hold_ms: u64,
        seed: u64,
    },
}

/// A thread's plan.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ThreadPlan {
    pub thread: u32,
    pub mode: Mode,
}

/// What threads send to the coordinator.
#[derive(Debug, Serialize, Deserialize)]
pub enum Report {
    /// The stats of the last window, for `step`; `live` = connections open now; `attempted` =
    /// connections started so far.
    Window {
        thread: u32,
        step: u32,
        live: u64,
        attempted: u64,
        stats: Box<Stats>,
    },
    /// Final: stats since the last window including the `missing` count, sent once after stop.
    Done {
        thread: u32,
        step: u32,
        stats: Box<Stats>,
    },
}

/// Microseconds since the Unix epoch (the publisher stamps the same clock).
pub fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A decoded batch: per inner message its `(ts_us, seq)`, `None` for a message without `lt`.
pub type Decoded = Rc<Vec<Option<(u64, u64)>>>;

/// Shares decompression of identical batch bytes among a thread's connections. A hit is only
/// taken when the stored bytes are equal to the new ones, so a collision cannot mislead it.
#[derive(Default)]
pub struct DecodeCache {
    map: HashMap<u64, (u16, Vec<u8>, Decoded)>,
    pub hits: u64,
    pub misses: u64,
}

impl DecodeCache {
    /// `seq` is the outer packet's sequence (the batch seq), part of the cheap fingerprint that
    /// picks the slot; equality of the whole body decides a hit.
    pub fn decode(
        &mut self,
        v: u16,
        seq: u32,
        body: &[u8],
        enabled: bool,
    ) -> Result<Decoded, &'static str> {
        if !enabled {
            return decode_batch(v, body);
        }
        // Hashing every byte of every batch on every connection would cost more than the
        // comparison below; the ends and the length tell batches apart well enough to pick a slot.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (v, seq, body.len()).hash(&mut h);
        body[..body.len().min(32)].hash(&mut h);
        body[body.len().saturating_sub(32)..].hash(&mut h);
        let key = h.finish();
        if let Some((cv, cb, d)) = self.map.get(&key) {
            if *cv == v && cb == body {
                self.hits += 1;
                return Ok(d.clone());
            }
        }
        self.misses += 1;
        let d = decode_batch(v, body)?;
        if self.map.len() >= DECODE_CACHE_ENTRIES_MAX {
            self.map.clear();
        }
        self.map.insert(key, (v, body.to_vec(), d.clone()));
        Ok(d)
    }
}

/// Decompresses a `ver 2`/`ver 3` body and finds each inner message's `lt`.
fn decode_batch(v: u16, body: &[u8]) -> Result<Decoded, &'static str> {
    let inner = proto::container::unpack(v, op::NOTIFICATION, 0, body, DECOMPRESSED_BYTES_MAX)
        .map_err(|_| "bad_batch")?;
    Ok(Rc::new(
        inner
            .iter()
            .filter(|p| p.op == op::NOTIFICATION)
            .map(|p| find_lt(&p.body))
            .collect(),
    ))
}

/// What a [`Receiver`] saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    AuthReply(i64),
    HeartbeatReply(u32),
    /// One outer op-5 packet (a batch, or one plain message).
    Batch,
    /// A message with our measurement field.
    Message {
        ts_us: u64,
        seq: u64,
    },
    /// A message without it.
    Foreign,
    /// The server closed the WebSocket.
    Closed,
}

/// Sans-io receive side of one connection: TCP stream or WebSocket frames, then packets.
///
/// The TCP path decodes packets straight from the read buffer and keeps only a trailing partial
/// packet: at hundreds of thousands of batches per second, copying each batch twice (into a
/// stream buffer, then into an owned packet) would cost the tool more than the edge spends.
pub struct Receiver {
    ws: Option<(FrameDecoder, Vec<u8>)>,
    /// Bytes of an incomplete TCP packet.
    partial: Vec<u8>,
}

impl Receiver {
    pub fn new(ws: bool) -> Self {
        Receiver {
            ws: ws.then(|| {
                (
                    FrameDecoder::new_client_side(FRAME_BYTES_MAX as usize),
                    Vec::new(),
                )
            }),
            partial: Vec::new(),
        }
    }

    /// Feeds received bytes; pushes what they completed to `out`. An error means the stream
    /// is broken (its label is the disconnect reason).
    pub fn feed(
        &mut self,
        bytes: &[u8],
        cache: &mut DecodeCache,
        cache_on: bool,
        out: &mut Vec<Event>,
    ) -> Result<(), &'static str> {
        match &mut self.ws {
            Some((dec, buf)) => {
                buf.extend_from_slice(bytes);
                let mut pos = 0;
                let result = loop {
                    let (used, r) = dec.decode_slice(&buf[pos..]);
                    pos += used;
                    match r {
                        Ok(Some(Message::Binary(payload))) => {
                            let mut rest = &payload[..];
                            while !rest.is_empty() {
                                let (p, used) = packet::decode(rest, FRAME_BYTES_MAX)
                                    .map_err(|_| "bad_packet")?;
                                handle_packet(p.ver, p.op, p.seq, p.body, cache, cache_on, out)?;
                                rest = &rest[used..];
                            }
                        }
                        Ok(Some(Message::Close(..))) => {
                            out.push(Event::Closed);
                            break Ok(());
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => break Ok(()),
                        Err(_) => break Err("bad_ws_frame"),
                    }
                };
                buf.drain(..pos);
                result
            }
            None => {
                let owned;
                let mut rest: &[u8] = if self.partial.is_empty() {
                    bytes
                } else {
                    self.partial.extend_from_slice(bytes);
                    owned = std::mem::take(&mut self.partial);
                    &owned
                };
                loop {
                    match packet::decode(rest, FRAME_BYTES_MAX) {
                        Ok((p, used)) => {
                            handle_packet(p.ver, p.op, p.seq, p.body, cache, cache_on, out)?;
                            rest = &rest[used..];
                        }
                        Err(DecodeError::Incomplete) => {
                            self.partial.extend_from_slice(rest);
                            return Ok(());
                        }
                        Err(DecodeError::Invalid(_)) => return Err("bad_packet"),
                    }
                }
            }
        }
    }
}

fn handle_packet(
    v: u16,
    o: u32,
    seq: u32,
    body: &[u8],
    cache: &mut DecodeCache,
    cache_on: bool,
    out: &mut Vec<Event>,
) -> Result<(), &'static str> {
    match o {
        op::AUTH_REPLY => {
            let code = serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|j| j.get("code").and_then(|c| c.as_i64()))
                .unwrap_or(i64::MIN);
            out.push(Event::AuthReply(code));
        }
        op::HEARTBEAT_REPLY => {
            let n = body
                .first_chunk::<4>()
                .map_or(0, |b| u32::from_be_bytes(*b));
            out.push(Event::HeartbeatReply(n));
        }
        op::NOTIFICATION => {
            out.push(Event::Batch);
            match v {
                ver::ZLIB | ver::BROTLI => {
                    let d = cache.decode(v, seq, body, cache_on)?;
                    for m in d.iter() {
                        out.push(match m {
                            Some((ts_us, seq)) => Event::Message {
                                ts_us: *ts_us,
                                seq: *seq,
                            },
                            None => Event::Foreign,
                        });
                    }
                }
                _ => out.push(match find_lt(body) {
                    Some((ts_us, seq)) => Event::Message { ts_us, seq },
                    None => Event::Foreign,
                }),
            }
        }
        _ => {}
    }
    Ok(())
}

/// Per-connection state the thread keeps for the final accounting.
struct ConnState {
    room_idx: u32,
    /// `None` until the first message when the connection joined after publishing began.
    tracker: Option<SeqTracker>,
    open: bool,
}

/// Everything a viewer thread shares among its tasks.
struct Ctx {
    shared: Arc<Shared>,
    cfg: ViewerCfg,
    window: RefCell<Stats>,
    conns: RefCell<Vec<ConnState>>,
    cache: RefCell<DecodeCache>,
    tickets: RefCell<HashMap<u64, Ticket>>,
    rng: RefCell<SplitMix64>,
    live: Cell<u64>,
    attempted: Cell<u64>,
    /// Open UDP sessions by connection index: each gets a bye when the run stops (their
    /// tasks are dropped with the thread's runtime, so they cannot send it themselves).
    udp_sessions: RefCell<HashMap<usize, (Rc<monoio::net::udp::UdpSocket>, proto::udp::SessionId)>>,
}

/// A boxed error label for the failure maps.
type Fail = String;

/// Opens a TCP connection from `source` (bound before connect, so many loopback sources can
/// spread the 4-tuple space) to `dst`.
async fn connect_from(source: IpAddr, dst: SocketAddr) -> Result<monoio::net::TcpStream, Fail> {
    use socket2::{Domain, Protocol, Socket, Type};
    let io = |e: std::io::Error| io_label("tcp", &e);
    let sock =
        Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP)).map_err(io)?;
    sock.set_nonblocking(true).map_err(io)?;
    // Ports of earlier runs linger in TIME_WAIT on the client side; SO_REUSEADDR lets bind()
    // take them again (connect still refuses a 4-tuple that is actually in use).
    sock.set_reuse_address(true).map_err(io)?;
    if !source.is_unspecified() {
        sock.bind(&SocketAddr::new(source, 0).into())
            .map_err(|e| io_label("bind", &e))?;
    }
    match sock.connect(&dst.into()) {
        Ok(()) => {}
        Err(e)
            if e.raw_os_error() == Some(libc::EINPROGRESS)
                || e.kind() == std::io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(io(e)),
    }
    // monoio's io_uring driver expects blocking sockets (it never sees EAGAIN); epoll wants
    // non-blocking ones, which `from_std` ensures. The connect already under way is unaffected.
    if net::runtime::driver_in_use() == "uring" {
        sock.set_nonblocking(false).map_err(io)?;
    }
    let std: std::net::TcpStream = sock.into();
    let mut stream = monoio::net::TcpStream::from_std(std).map_err(io)?;
    stream.writable(false).await.map_err(io)?;
    if stream.peer_addr().is_err() {
        // The connect failed; a read returns its pending error (SO_ERROR) without needing a
        // second descriptor (which, with thousands of connects pending, would double the fds).
        let (r, _) = stream.read(Vec::with_capacity(1)).await;
        return Err(match r {
            Err(e) => io(e),
            Ok(_) => "tcp_not_connected".into(),
        });
    }
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// A failure label from an I/O error: its kind, and the errno when the kind says little.
fn io_label(what: &str, e: &std::io::Error) -> String {
    let kind = format!("{:?}", e.kind()).to_lowercase();
    match e.raw_os_error() {
        Some(n) if kind == "uncategorized" || kind == "other" => format!("{what}_errno_{n}"),
        _ => format!("{what}_{kind}"),
    }
}

fn is_loopback_or_allowed(addr: &SocketAddr, allow_remote: bool) -> bool {
    allow_remote || addr.ip().is_loopback()
}

/// WebSocket upgrade on `/sub`; returns any bytes read past the response head.
async fn ws_upgrade(
    stream: &mut monoio::net::TcpStream,
    host: &SocketAddr,
    rng: &mut SplitMix64,
) -> Result<Vec<u8>, Fail> {
    let mut key_bytes = [0u8; 16];
    key_bytes[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
    key_bytes[8..].copy_from_slice(&rng.next_u64().to_le_bytes());
    let key = client::ws_key(key_bytes);
    let req = client::ws_upgrade_request(&host.to_string(), &key);
    let (r, _) = stream.write_all(req.into_bytes()).await;
    r.map_err(|e| format!("ws_write_{:?}", e.kind()).to_lowercase())?;
    let mut head = Vec::new();
    loop {
        let (r, buf) = stream.read(Vec::with_capacity(1024)).await;
        match r {
            Ok(0) => return Err("ws_upgrade_eof".into()),
            Ok(_) => head.extend_from_slice(&buf),
            Err(e) => return Err(format!("ws_read_{:?}", e.kind()).to_lowercase()),
        }
        match client::ws_upgrade_response(&head, &key) {
            Ok(Some(end)) => return Ok(head[end..].to_vec()),
            Ok(None) => {}
            Err(e) => return Err(e.label().into()),
        }
    }
}

/// Wraps a client packet for the transport.
fn frame_out(ws: bool, pkt: Vec<u8>, rng: &mut SplitMix64) -> Vec<u8> {
    if ws {
        let m = rng.next_u64().to_le_bytes();
        proto::ws::encode_client_frame(Opcode::Binary, &pkt, [m[0], m[1], m[2], m[3]])
    } else {
        pkt
    }
}

/// Gets a ticket (cached per room when configured).
async fn ticket_for(ctx: &Ctx, room: u64, uid: u64) -> Result<Ticket, Fail> {
    if ctx.cfg.ticket_per_room {
        if let Some(t) = ctx.tickets.borrow().get(&room) {
            return Ok(t.clone());
        }
    }
    let t0 = Instant::now();
    let device = format!("LT{uid:016X}");
    let t = client::fetch(
        &ctx.cfg.control,
        room,
        uid,
        &device,
        ctx.cfg.control_key.as_deref(),
        ctx.cfg.danmu_info,
        Duration::from_millis(ctx.cfg.connect_timeout_ms),
    )
    .await
    .map_err(|e| e.label())?;
    ctx.window
        .borrow_mut()
        .ticket
        .record_us(t0.elapsed().as_micros() as u64);
    if ctx.cfg.ticket_per_room {
        ctx.tickets.borrow_mut().insert(room, t.clone());
    }
    Ok(t)
}

/// An authenticated connection, ready to read.
struct Open {
    stream: monoio::net::TcpStream,
    rx: Receiver,
    /// Bytes already read past the handshake (fed before the next read).
    pending: Vec<u8>,
}

/// Ticket, connect, upgrade, auth; the auth reply must arrive within the connect timeout.
async fn open(ctx: &Ctx, spec: &ConnSpec) -> Result<Open, Fail> {
    let ticket = ticket_for(ctx, spec.room, spec.uid).await?;
    let edge = if ctx.cfg.spread_edges {
        // Control orders edges by load, which differs between tickets; spread over a fixed
        // order so connection i always lands on the same edge whatever ticket it holds.
        let mut edges: Vec<&client::Edge> = ticket.edges.iter().collect();
        edges.sort_by(|a, b| (&a.host, a.tcp_port).cmp(&(&b.host, b.tcp_port)));
        edges
            .get(spec.edge_pick as usize % edges.len().max(1))
            .copied()
    } else {
        ticket.edges.first()
    }
    .ok_or("control_no_edge")?;
    let dst = edge.addr(spec.ws).ok_or("edge_no_port")?;
    if !is_loopback_or_allowed(&dst, ctx.cfg.allow_remote) {
        return Err("edge_not_loopback".into());
    }
    let t0 = Instant::now();
    let timeout = Duration::from_millis(ctx.cfg.connect_timeout_ms);
    let fut = async {
        let mut stream = connect_from(spec.source, dst).await?;
        let mut rx = Receiver::new(spec.ws);
        let mut pending = if spec.ws {
            let mut rng = ctx.rng.borrow().clone();
            ctx.rng.borrow_mut().next_u64();
            ws_upgrade(&mut stream, &dst, &mut rng).await?
        } else {
            Vec::new()
        };
        let uid = if ctx.cfg.control_key.is_some() {
            spec.uid
        } else {
            0
        };
        let device = format!("LT{:016X}", spec.uid);
        let auth = client::auth_body(uid, spec.room, ctx.cfg.protover, &ticket.token, &device);
        let pkt = frame_out(
            spec.ws,
            proto::auth::auth_request(&auth),
            &mut ctx.rng.borrow_mut(),
        );
        let (r, _) = stream.write_all(pkt).await;
        r.map_err(|e| format!("auth_write_{:?}", e.kind()).to_lowercase())?;
        // Read until the auth reply; anything after it in the same read stays pending.
        let mut events = Vec::new();
        loop {
            if !pending.is_empty() {
                let bytes = std::mem::take(&mut pending);
                let mut cache = ctx.cache.borrow_mut();
                rx.feed(&bytes, &mut cache, ctx.cfg.decode_cache, &mut events)?;
                ctx.window.borrow_mut().bytes_read += bytes.len() as u64;
            }
            if let Some(code) = events.iter().find_map(|e| {
                if let Event::AuthReply(c) = e {
                    Some(*c)
                } else {
                    None
                }
            }) {
                if code != 0 {
                    return Err(format!("auth_code_{code}"));
                }
                return Ok(Open {
                    stream,
                    rx,
                    pending: Vec::new(),
                });
            }
            if events.contains(&Event::Closed) {
                return Err("closed_before_auth".into());
            }
            events.clear();
            let (r, buf) = stream.read(Vec::with_capacity(READ_BUF_BYTES)).await;
            match r {
                Ok(0) => return Err("closed_before_auth".into()),
                Ok(_) => pending = buf,
                Err(e) => return Err(format!("auth_read_{:?}", e.kind()).to_lowercase()),
            }
        }
    };
    let out = match monoio::time::timeout(timeout, fut).await {
        Ok(r) => r?,
        Err(_) => return Err("auth_timeout".into()),
    };
    let mut w = ctx.window.borrow_mut();
    w.connect.record_us(t0.elapsed().as_micros() as u64);
    w.connects_ok += 1;
    Ok(out)
}

/// Applies received events to the connection's tracker and the thread's window.
fn apply(ctx: &Ctx, idx: usize, events: &mut Vec<Event>, now_us: u64) {
    let mut w = ctx.window.borrow_mut();
    let mut conns = ctx.conns.borrow_mut();
    let Some(c) = conns.get_mut(idx) else { return };
    for e in events.drain(..) {
        match e {
            Event::Message { ts_us, seq } => {
                w.latency.record_us(now_us.saturating_sub(ts_us));
                let t = c
                    .tracker
                    .get_or_insert_with(|| SeqTracker::starting_at(seq));
                let before = (t.delivered, t.duplicates, t.out_of_order, t.gap_events);
                t.record(seq);
                w.delivered += t.delivered - before.0;
                w.duplicates += t.duplicates - before.1;
                w.out_of_order += t.out_of_order - before.2;
                w.gap_events += t.gap_events - before.3;
            }
            Event::Foreign => w.foreign += 1,
            Event::Batch => w.batches += 1,
            Event::HeartbeatReply(_) => w.heartbeat_replies += 1,
            Event::AuthReply(_) | Event::Closed => {}
        }
    }
}

/// Tells a connection's heartbeat task that the connection is gone, waking it at once (so a
/// closed connection's write half, and with it the socket, is released now, not at the next
/// heartbeat: churn would otherwise pile up descriptors for `heartbeat_ms`).
#[derive(Default)]
struct CloseSignal {
    closed: Cell<bool>,
    waker: Cell<Option<std::task::Waker>>,
}

impl CloseSignal {
    fn close(&self) {
        self.closed.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Sleeps for `d`; `true` if the connection closed first.
    async fn sleep_or_closed(&self, d: Duration) -> bool {
        use std::future::Future;
        use std::task::Poll;
        let mut sleep = std::pin::pin!(monoio::time::sleep(d));
        std::future::poll_fn(|cx| {
            if self.closed.get() {
                return Poll::Ready(true);
            }
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(false);
            }
            self.waker.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await
    }
}

/// Reads until the connection ends or the thread stops; heartbeats run in their own task.
async fn hold(ctx: Rc<Ctx>, idx: usize, spec: ConnSpec, o: Open, hold_for: Option<Duration>) {
    let Open {
        stream,
        mut rx,
        pending,
    } = o;
    let (mut rd, mut wr) = stream.into_split();
    let closed = Rc::new(CloseSignal::default());
    {
        let (ctx, closed, ws) = (ctx.clone(), closed.clone(), spec.ws);
        monoio::spawn(async move {
            let every = Duration::from_millis(ctx.cfg.heartbeat_ms.max(1));
            loop {
                if closed.sleep_or_closed(every).await || ctx.shared.stop.load(Ordering::Relaxed) {
                    return;
                }
                let pkt = frame_out(
                    ws,
                    proto::auth::heartbeat_request(),
                    &mut ctx.rng.borrow_mut(),
                );
                let (r, _) = wr.write_all(pkt).await;
                if r.is_err() {
                    return;
                }
            }
        });
    }
    let mut events = Vec::new();
    if !pending.is_empty() {
        let r = rx.feed(
            &pending,
            &mut ctx.cache.borrow_mut(),
            ctx.cfg.decode_cache,
            &mut events,
        );
        apply(&ctx, idx, &mut events, unix_us());
        if let Err(why) = r {
            ctx.window.borrow_mut().disconnect(why);
            closed.close();
            conn_closed(&ctx, idx);
            return;
        }
    }
    let deadline = hold_for.map(|d| Instant::now() + d);
    let mut buf = Vec::with_capacity(READ_BUF_BYTES);
    let why: String = loop {
        let read = rd.read(buf);
        let (r, b) = match deadline {
            Some(d) => {
                match monoio::time::timeout(d.saturating_duration_since(Instant::now()), read).await
                {
                    Ok(x) => x,
                    // Churn: the hold is over; a normal close, not a failure.
                    Err(_) => break String::new(),
                }
            }
            None => read.await,
        };
        buf = b;
        match r {
            Ok(0) => break "closed_by_server".into(),
            Ok(n) => {
                let now = unix_us();
                ctx.window.borrow_mut().bytes_read += n as u64;
                let r = rx.feed(
                    &buf[..n],
                    &mut ctx.cache.borrow_mut(),
                    ctx.cfg.decode_cache,
                    &mut events,
                );
                let closed_ws = events.contains(&Event::Closed);
                apply(&ctx, idx, &mut events, now);
                if let Err(why) = r {
                    break why.into();
                }
                if closed_ws {
                    break "ws_closed_by_server".into();
                }
                buf.clear();
            }
            Err(e) => break format!("read_{:?}", e.kind()).to_lowercase(),
        }
        if ctx.shared.stop.load(Ordering::Relaxed) {
            break String::new();
        }
    };
    closed.close();
    if !why.is_empty() && !ctx.shared.stop.load(Ordering::Relaxed) {
        ctx.window.borrow_mut().disconnect(why);
    }
    conn_closed(&ctx, idx);
}

fn conn_closed(ctx: &Ctx, idx: usize) {
    if let Some(c) = ctx.conns.borrow_mut().get_mut(idx) {
        c.open = false;
    }
    ctx.live.set(ctx.live.get().saturating_sub(1));
}

/// One held connection, start to end.
async fn run_conn(ctx: Rc<Ctx>, idx: usize, spec: ConnSpec, hold_for: Option<Duration>) {
    ctx.attempted.set(ctx.attempted.get() + 1);
    if spec.udp {
        return udp::run(ctx, idx, spec, hold_for).await;
    }
    match open(&ctx, &spec).await {
        Ok(o) => {
            if let Some(c) = ctx.conns.borrow_mut().get_mut(idx) {
                c.open = true;
                // Joined before the first publish: every message must arrive, from seq 0.
                if !ctx.shared.publishing.load(Ordering::Acquire) {
                    c.tracker = Some(SeqTracker::starting_at(0));
                }
            }
            ctx.live.set(ctx.live.get() + 1);
            hold(ctx, idx, spec, o, hold_for).await;
        }
        Err(why) => ctx.window.borrow_mut().fail(why),
    }
}

/// Runs one viewer thread to completion, sending windows and a final report to `tx`.
pub fn run_thread(
    plan: ThreadPlan,
    cfg: ViewerCfg,
    shared: Arc<Shared>,
    tx: crossbeam_channel::Sender<Report>,
) {
    let driver = net::runtime::Driver::from_env_or(cfg.driver);
    net::runtime::block_on(driver, thread_main(plan, cfg, shared, tx));
}

async fn thread_main(
    plan: ThreadPlan,
    cfg: ViewerCfg,
    shared: Arc<Shared>,
    tx: crossbeam_channel::Sender<Report>,
) {
    let thread = plan.thread;
    let ctx = Rc::new(Ctx {
        shared: shared.clone(),
        rng: RefCell::new(SplitMix64::new(0x5eed ^ u64::from(thread))),
        cfg,
        window: RefCell::new(Stats::default()),
        conns: RefCell::new(Vec::new()),
        cache: RefCell::new(DecodeCache::default()),
        tickets: RefCell::new(HashMap::new()),
        live: Cell::new(0),
        attempted: Cell::new(0),
        udp_sessions: RefCell::new(HashMap::new()),
    });
    // The spawner paces connection starts; the loop below ships windows.
    {
        let ctx = ctx.clone();
        monoio::spawn(async move {
            match plan.mode {
                Mode::Hold { conns, ramp_per_s } => {
                    let start = Instant::now();
                    let rate = ramp_per_s.max(0.001);
                    for (i, spec) in conns.into_iter().enumerate() {
                        if ctx.shared.stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let due = start + Duration::from_secs_f64(i as f64 / rate);
                        let now = Instant::now();
                        if due > now {
                            monoio::time::sleep(due - now).await;
                        }
                        ctx.conns.borrow_mut().push(ConnState {
                            room_idx: spec.room_idx,
                            tracker: None,
                            open: false,
                        });
                        monoio::spawn(run_conn(ctx.clone(), i, spec, None));
                    }
                }
                Mode::Churn {
                    rooms,
                    sources,
                    transport,
                    connects_per_s,
                    hold_ms,
                    seed,
                } => {
                    let start = Instant::now();
                    let rate = connects_per_s.max(0.001);
                    let mut rng = SplitMix64::new(seed ^ (u64::from(thread) << 32));
                    let mut i = 0u64;
                    while !ctx.shared.stop.load(Ordering::Relaxed) {
                        if ctx.shared.paused.load(Ordering::Relaxed) {
                            monoio::time::sleep(Duration::from_millis(TICK_MS)).await;
                            continue;
                        }
                        let due = start + Duration::from_secs_f64(i as f64 / rate);
                        let now = Instant::now();
                        if due > now {
                            monoio::time::sleep(due - now).await;
                        }
                        let ws = match transport {
                            Transport::Tcp | Transport::Udp => false,
                            Transport::Ws => true,
                            Transport::Mix => i % 2 == 1,
                        };
                        let spec = ConnSpec {
                            room_idx: 0,
                            room: *rng.pick(&rooms),
                            ws,
                            udp: transport == Transport::Udp,
                            source: *rng.pick(&sources),
                            uid: rng.range(1, u64::from(u32::MAX)),
                            edge_pick: i as u32,
                        };
                        // Churned connections are not tracked for loss: index past the table.
                        monoio::spawn(run_conn(
                            ctx.clone(),
                            usize::MAX,
                            spec,
                            Some(Duration::from_millis(hold_ms)),
                        ));
                        i += 1;
                    }
                }
            }
        });
    }
    let mut last_step = shared.step.load(Ordering::Relaxed);
    let mut last_ship = Instant::now();
    loop {
        monoio::time::sleep(Duration::from_millis(TICK_MS)).await;
        let stop = shared.stop.load(Ordering::Acquire);
        let step = shared.step.load(Ordering::Relaxed);
        if stop {
            // The edge frees the UDP sessions now instead of at expiry (docs/protocol-udp.md,
            // "Bye"): one datagram each, not retransmitted.
            let byes: Vec<_> = ctx.udp_sessions.borrow_mut().drain().collect();
            for (_, (sock, session)) in byes {
                let _ = sock.send(proto::udp::bye_datagram(session)).await;
            }
            // Final accounting: missing messages of every connection that was open from before
            // the first publish until now.
            let mut w = ctx.window.take();
            for c in ctx.conns.borrow().iter() {
                if let (true, Some(t)) = (c.open, &c.tracker) {
                    let i = c.room_idx as usize;
                    let issued = shared
                        .issued
                        .get(i)
                        .map_or(0, |a| a.load(Ordering::Acquire));
                    let rejected = shared
                        .rejected
                        .get(i)
                        .map_or(0, |a| a.load(Ordering::Acquire));
                    w.missing += t.missing(issued).saturating_sub(rejected);
                }
            }
            let _ = tx.send(Report::Done {
                thread,
                step: last_step,
                stats: Box::new(w),
            });
            return;
        }
        if step != last_step || last_ship.elapsed() >= Duration::from_millis(WINDOW_MS) {
            let w = ctx.window.take();
            let _ = tx.send(Report::Window {
                thread,
                step: last_step,
                live: ctx.live.get(),
                attempted: ctx.attempted.get(),
                stats: Box::new(w),
            });
            last_step = step;
            last_ship = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::container::{encode_outer, BrotliParams};
    use proto::id::Encoding;

    fn batch(seqs: &[u64], enc: Encoding) -> Vec<u8> {
        let mut inner = Vec::new();
        for &s in seqs {
            let body = crate::corpus::with_lt(b"{\"cmd\":\"DANMU_MSG\"}", 1000 + s, s);
            packet::encode(ver::PLAIN, op::NOTIFICATION, 0, &body, &mut inner);
        }
        encode_outer(enc, &inner, 7, BrotliParams::default())
    }

    #[test]
    fn tcp_receiver_decodes_batches_split_anywhere() {
        let mut bytes = proto::auth::auth_reply(0);
        bytes.extend(batch(&[0, 1, 2], Encoding::Brotli));
        bytes.extend(proto::auth::heartbeat_reply(42));
        bytes.extend(batch(&[3], Encoding::Zlib));
        bytes.extend(batch(&[4, 5], Encoding::Plain));
        for cut in [1usize, 7, 16, 50, bytes.len() - 1] {
            let mut rx = Receiver::new(false);
            let mut cache = DecodeCache::default();
            let mut out = Vec::new();
            rx.feed(&bytes[..cut], &mut cache, true, &mut out).unwrap();
            rx.feed(&bytes[cut..], &mut cache, true, &mut out).unwrap();
            let seqs: Vec<u64> = out
                .iter()
                .filter_map(|e| {
                    if let Event::Message { seq, .. } = e {
                        Some(*seq)
                    } else {
                        None
                    }
                })
                .collect();
            assert_eq!(seqs, vec![0, 1, 2, 3, 4, 5], "cut {cut}");
            assert_eq!(out[0], Event::AuthReply(0));
            assert!(out.contains(&Event::HeartbeatReply(42)));
            assert!(out.contains(&Event::Message {
                ts_us: 1003,
                seq: 3
            }));
        }
    }

    #[test]
    fn ws_receiver_reads_server_frames() {
        let mut bytes = proto::ws::server_frame(Opcode::Binary, &proto::auth::auth_reply(-101));
        bytes.extend(proto::ws::server_frame(
            Opcode::Binary,
            &batch(&[9, 10], Encoding::Brotli),
        ));
        bytes.extend(proto::ws::close_frame(1000, "bye"));
        let mut rx = Receiver::new(true);
        let mut cache = DecodeCache::default();
        let mut out = Vec::new();
        for b in bytes.chunks(5) {
            rx.feed(b, &mut cache, true, &mut out).unwrap();
        }
        assert_eq!(out[0], Event::AuthReply(-101));
        assert!(out.contains(&Event::Message {
            ts_us: 1009,
            seq: 9
        }));
        assert!(out.contains(&Event::Message {
            ts_us: 1010,
            seq: 10
        }));
        assert_eq!(out.last(), Some(&Event::Closed));
        // A masked (client) frame from the server is a protocol error.
        let mut rx = Receiver::new(true);
        let bad = proto::ws::encode_client_frame(Opcode::Binary, b"x", [1, 2, 3, 4]);
        assert!(rx.feed(&bad, &mut cache, true, &mut out).is_err());
    }

    #[test]
    fn decode_cache_shares_identical_batches_only() {
        let mut cache = DecodeCache::default();
        let a = batch(&[1, 2], Encoding::Brotli);
        let b = batch(&[3], Encoding::Brotli);
        let (pa, _) = packet::decode(&a, u32::MAX).unwrap();
        let (pb, _) = packet::decode(&b, u32::MAX).unwrap();
        let d1 = cache.decode(pa.ver, pa.seq, pa.body, true).unwrap();
        let d2 = cache.decode(pa.ver, pa.seq, pa.body, true).unwrap();
        let d3 = cache.decode(pb.ver, pb.seq, pb.body, true).unwrap();
        assert!(Rc::ptr_eq(&d1, &d2));
        assert_eq!(d3.as_slice(), &[Some((1003, 3))]);
        assert_eq!((cache.hits, cache.misses), (1, 2));
        assert!(cache.decode(ver::BROTLI, 1, b"garbage", true).is_err());
        // Same fingerprint (length, ends, seq) but different middle: not a hit.
        let mut c2 = DecodeCache::default();
        let x = vec![b'a'; 100];
        let mut y = x.clone();
        y[50] = b'b';
        assert!(c2.decode(ver::PLAIN, 1, &x, true).is_ok());
        assert!(c2.decode(ver::PLAIN, 1, &y, true).is_ok());
        assert_eq!((c2.hits, c2.misses), (0, 2));
    }
}
