//! A small HTTP/1.1 server and client on monoio (hyper underneath), for admin, API and
//! control endpoints. Not a hot path; keep-alive on, bodies capped.
//!
//! The monoio stream is switched to poll-io mode (`into_poll_io`), which implements tokio's
//! `AsyncRead`/`AsyncWrite`; hyper-util's `TokioIo` adapts that to hyper. Everything runs on
//! the current thread: connection futures are `monoio::spawn`ed (no executor needed for http1).
//!
//! Invariants: a request body above `body_bytes_max` never reaches the handler: it gets 413
//! (drained first when at most [`OVERSIZE_DRAIN_BYTES_MAX`] over, so the client sees the
//! status; answered at once and closed when bigger); an error on one
//! connection ends only that connection; when `serve`'s `stop` resolves, the accept loop ends
//! and every open connection finishes its in-flight request and closes (graceful shutdown,
//! bounded by [`SHUTDOWN_GRACE_MS`]; this continues in the background after `serve` returns,
//! as long as the runtime runs). A connection idle for [`SERVER_IDLE_MS`] (no request in flight,
//! no bytes moved) is closed; at most [`SERVER_CONNS_MAX`] connections are open per `serve`.
//! hyper's own header-read timeout is off: it needs a `Send` timer, which monoio's is not, so
//! this module keeps its own deadlines.
//!
//! # Admission (what a stranger cannot take from everyone else)
//! - A request head must be complete within [`HEAD_MS_MAX`] of the connection opening or of the
//!   first byte after the previous response (slowloris); a body must keep up a minimum rate:
//!   all of it within [`BODY_GRACE_MS`] plus `bytes / BODY_BYTES_PER_S_MIN` (stalled bodies get
//!   408 and the connection closes).
//! - One peer address holds at most [`SERVER_CONNS_PER_ADDR_MAX`] connections; past it, and past
//!   `conns_max`, a new connection is answered `503` with `Retry-After` and closed, rather than
//!   closed unanswered (at most [`REFUSALS_MAX`] of those answers are being written at once).
//! - The last [`SERVER_CONNS_RESERVED`] connection slots are a reserve: a connection that lands
//!   in it is served only for the role's `reserved_paths` (health checks, edge heartbeats) and
//!   must send its head within [`RESERVED_HEAD_MS_MAX`]; any other path gets 503 + Retry-After.
//!   So a full public side never locks out liveness probes or the fleet's own heartbeats.
//! - A streamed response ([`Streamed`], Server-Sent Events) holds its connection until its
//!   chunks end, the client leaves, its `cut` resolves (the role decided the consumer is too
//!   slow: the connection is closed at once, whatever hyper was waiting to write) or `serve`
//!   stops (streams are closed without the graceful wait). It must write something at least
//!   every `idle_ms` (a comment line for SSE), or the idle deadline closes it.
//! - Every error this module answers itself is one JSON shape, `{"error":"<label>","message":"..."}`
//!   ([`Response::error`]), which the roles use for theirs too.

use std::future::Future;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use monoio::io::IntoPollIo;

/// How long an open connection may take to finish after `serve`'s `stop` resolved.
pub const SHUTDOWN_GRACE_MS: u64 = 5_000;
/// Largest response body [`request`] accepts; a bigger one is an `Http` error.
pub const CLIENT_BODY_BYTES_MAX: usize = 64 * 1024 * 1024;
/// A server connection with no request in flight and no bytes moved for this long is closed,
/// so idle or stalled clients cannot pin file descriptors forever.
pub const SERVER_IDLE_MS: u64 = 60_000;
/// Open server connections per `serve` call; beyond it new connections are closed at once.
pub const SERVER_CONNS_MAX: usize = 4_096;
/// A body over the cap by at most this much is read and discarded before the 413, so a client
/// still writing it sees the 413 rather than a reset; beyond it the server answers and closes.
pub const OVERSIZE_DRAIN_BYTES_MAX: u64 = 8 * 1024 * 1024;
/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
pub const ACCEPT_ERROR_BACKOFF_MS: u64 = 50;
/// A request head must be complete this long after the connection opened, or after the first
/// byte of it arrived on a kept-alive connection.
pub const HEAD_MS_MAX: u64 = 10_000;
/// The head deadline of a connection that landed in the reserved slots (see module docs).
pub const RESERVED_HEAD_MS_MAX: u64 = 2_000;
/// A request body may take this long plus `bytes / BODY_BYTES_PER_S_MIN` seconds.
pub const BODY_GRACE_MS: u64 = 5_000;
/// The slowest body rate served; a slower body gets 408.
pub const BODY_BYTES_PER_S_MIN: u64 = 16 * 1024;
/// Open connections one peer address may hold per `serve` call.
pub const SERVER_CONNS_PER_ADDR_MAX: usize = 256;
/// Connection slots, out of `conns_max`, kept for the role's reserved paths.
pub const SERVER_CONNS_RESERVED: usize = 64;
/// `Retry-After` of a 503 this module answers, seconds.
pub const RETRY_AFTER_S: u32 = 1;
/// Refusal answers (a 503 written at accept) in flight at once; past it, new connections over
/// a limit are closed unanswered (the answers themselves must not become the flood).
pub const REFUSALS_MAX: usize = 256;
/// How long writing one refusal answer may take.
pub const REFUSAL_WRITE_MS_MAX: u64 = 1_000;

/// A request with its whole body read (capped by the server's `body_bytes_max`).
#[derive(Clone, Debug, Default)]
pub struct Request {
    pub method: String,
    /// Path without the query (as sent, not percent-decoded).
    pub path: String,
    /// Decoded query pairs in order.
    pub query: Vec<(String, String)>,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The peer address.
    pub peer: Option<std::net::SocketAddr>,
}

impl Request {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// The first query parameter called `name` (exact match).
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    /// The token of `Authorization: Bearer <token>`.
    pub fn bearer(&self) -> Option<&str> {
        let v = self.header("authorization")?.trim();
        let (scheme, token) = v.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let token = token.trim();
        (!token.is_empty()).then_some(token)
    }
}

#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Whether `req` may use an admin endpoint: its bearer must be `admin_key`; with no key set,
/// only while the admin listener (`addr_field`, named in the refusal) is not public.
pub fn admin_allowed(
    req: &Request,
    admin_key: &str,
    public: bool,
    addr_field: &str,
) -> Result<(), Response> {
    let key = admin_key.as_bytes();
    if key.is_empty() {
        if public {
            return Err(Response::error(
                403,
                "forbidden",
                &format!("{addr_field} is not loopback: set admin_key to use admin endpoints"),
            ));
        }
        return Ok(());
    }
    let given = req.bearer().unwrap_or("").as_bytes();
    if crate::secret::ct_eq(given, key) {
        Ok(())
    } else {
        Err(Response::error(
            401,
            "unauthorized",
            "a valid admin key is needed (Authorization: Bearer <admin_key>)",
        ))
    }
}

impl Response {
    /// JSON response with `Content-Type: application/json`.
    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        Response {
            status,
            headers: vec![("content-type".to_string(), "application/json".to_string())],
            body: value.to_string().into_bytes(),
        }
    }
    /// The one error shape of every role: `{"error":"<label>","message":"<for people>"}`.
    /// `label` is a stable snake_case word a program may match on.
    pub fn error(status: u16, label: &str, message: &str) -> Response {
        Response::json(
            status,
            &serde_json::json!({"error": label, "message": message}),
        )
    }
    /// A 503 (or 429) with `Retry-After`.
    pub fn retry_after(status: u16, label: &str, message: &str, after_s: u32) -> Response {
        Response::error(status, label, message).with_header("retry-after", &after_s.to_string())
    }
    /// Plain text response.
    pub fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            headers: vec![(
                "content-type".to_string(),
                "text/plain; charset=utf-8".to_string(),
            )],
            body: body.into().into_bytes(),
        }
    }
    pub fn with_header(mut self, name: &str, value: &str) -> Response {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
    /// The first header called `name` (case-insensitive); response headers from [`request`]
    /// are lower-cased.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T>>>;
pub type Handler = Rc<dyn Fn(Request) -> BoxFuture<Response>>;

/// The chunks of a streamed response body, produced while the connection is open.
pub trait Chunks {
    /// The next chunk; `Ready(None)` ends the body (and, with it, the connection).
    fn poll_chunk(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Option<Vec<u8>>>;
}

/// A response whose body is written as it is produced (Server-Sent Events).
pub struct Streamed {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub chunks: Box<dyn Chunks>,
    /// Resolves when the connection must be closed at once (a consumer that stopped reading:
    /// hyper would otherwise wait on its full socket until the idle deadline).
    pub cut: BoxFuture<()>,
}

/// Decides, before the role's [`Handler`], whether a request is answered by a stream:
/// `None` for an ordinary request, `Some(Err(response))` for a refused stream.
#[derive(Clone)]
pub struct StreamRoute(pub std::sync::Arc<RouteStream>);

/// What a [`StreamRoute`] calls (see there).
pub type RouteStream = dyn Fn(&Request) -> Option<Result<Streamed, Response>> + Send + Sync;

impl std::fmt::Debug for StreamRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamRoute")
    }
}

/// What a request is answered with.
enum Reply {
    Full(Response),
    Stream(Streamed),
}

impl From<Response> for Reply {
    fn from(r: Response) -> Reply {
        Reply::Full(r)
    }
}

/// The body type handed to hyper: a whole body, or a stream of chunks.
enum Out {
    Full(Full<Bytes>),
    Stream(Box<dyn Chunks>),
}

impl hyper::body::Body for Out {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            Out::Full(b) => Pin::new(b).poll_frame(cx),
            Out::Stream(c) => c
                .poll_chunk(cx)
                .map(|c| c.map(|v| Ok(hyper::body::Frame::data(Bytes::from(v))))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Out::Full(b) => b.is_end_stream(),
            Out::Stream(_) => false,
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            Out::Full(b) => b.size_hint(),
            Out::Stream(_) => hyper::body::SizeHint::default(),
        }
    }
}

/// Percent-decodes a query component (`+` is a space). Invalid escapes are kept as written;
/// invalid UTF-8 is replaced, never an error: a bad query is the handler's to judge.
fn decode_component(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Splits `a=1&b=x%20y` into decoded pairs; a key without `=` gets an empty value.
pub fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode_component(k), decode_component(v)),
            None => (decode_component(p), String::new()),
        })
        .collect()
}

fn to_hyper(resp: Response) -> hyper::Response<Out> {
    with_head(
        Out::Full(Full::new(Bytes::from(resp.body))),
        resp.status,
        resp.headers,
    )
}

fn with_head<B>(body: B, status: u16, headers: Vec<(String, String)>) -> hyper::Response<B> {
    let mut out = hyper::Response::new(body);
    *out.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    let h = out.headers_mut();
    for (k, v) in headers {
        match (
            hyper::header::HeaderName::from_bytes(k.as_bytes()),
            hyper::header::HeaderValue::from_str(&v),
        ) {
            (Ok(k), Ok(v)) => {
                h.append(k, v);
            }
            _ => tracing::warn!(name = %k, "dropping invalid response header"),
        }
    }
    out
}

fn too_large(seen: u64, limit: usize) -> Response {
    Response::error(
        413,
        "too_large",
        &format!("request body is at least {seen} bytes; the limit is {limit} bytes"),
    )
}

fn unavailable(message: &str) -> Response {
    Response::retry_after(503, "overloaded", message, RETRY_AFTER_S)
        .with_header("connection", "close")
}

/// What one connection's request handling needs to know besides the request.
struct Ctx {
    handler: Handler,
    cfg: Rc<ServeConfig>,
    peer: Option<std::net::SocketAddr>,
    /// The connection landed in the reserved slots: only `reserved_paths` are served.
    reserved_only: bool,
}

/// Reads the whole request (enforcing the body cap and the body deadline) and runs the handler.
async fn handle(req: hyper::Request<Incoming>, ctx: &Ctx) -> Reply {
    let request = match read_request(req, ctx).await {
        Ok(r) => r,
        Err(refusal) => return refusal.into(),
    };
    if let Some(route) = &ctx.cfg.stream {
        match (route.0)(&request) {
            Some(Ok(s)) => return Reply::Stream(s),
            Some(Err(refusal)) => return refusal.into(),
            None => {}
        }
    }
    (ctx.handler)(request).await.into()
}

async fn read_request(req: hyper::Request<Incoming>, ctx: &Ctx) -> Result<Request, Response> {
    let body_bytes_max = ctx.cfg.body_bytes_max;
    if ctx.reserved_only
        && !ctx
            .cfg
            .reserved_paths
            .iter()
            .any(|p| p.as_str() == req.uri().path())
    {
        ctx.cfg.stats.count(&ctx.cfg.stats.refused_reserved);
        return Err(unavailable(
            "the server is full; only health checks and heartbeats are served",
        ));
    }
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let drain_limit = (body_bytes_max as u64).saturating_add(OVERSIZE_DRAIN_BYTES_MAX);
    if let Some(n) = declared.filter(|n| *n > drain_limit) {
        // Far too big to be worth reading: answer now and close. The client may see a reset
        // instead of the 413 if it is still writing.
        ctx.cfg.stats.count(&ctx.cfg.stats.too_large);
        return Err(too_large(n, body_bytes_max).with_header("connection", "close"));
    }
    let (parts, mut body) = req.into_parts();
    let mut buf: Vec<u8> = Vec::new();
    let mut seen: u64 = 0;
    let started = std::time::Instant::now();
    let limits = &ctx.cfg.limits;
    let rate = limits.body_bytes_per_s_min.max(1);
    loop {
        // The minimum rate: by now the peer must have sent `(elapsed - grace) * rate` bytes.
        let allowed = Duration::from_millis(limits.body_grace_ms)
            + Duration::from_millis(seen.saturating_mul(1000) / rate);
        let left = allowed.saturating_sub(started.elapsed());
        let frame = match monoio::time::timeout(left, body.frame()).await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(_) => {
                ctx.cfg.stats.count(&ctx.cfg.stats.body_timeouts);
                return Err(Response::error(
                    408,
                    "body_timeout",
                    &format!(
                        "request body slower than {rate} bytes/s after {} ms of grace",
                        limits.body_grace_ms
                    ),
                )
                .with_header("connection", "close"));
            }
        };
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                return Err(
                    Response::error(400, "bad_request", &format!("bad request body: {e}"))
                        .with_header("connection", "close"),
                )
            }
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen = seen.saturating_add(data.len() as u64);
        if seen > drain_limit {
            ctx.cfg.stats.count(&ctx.cfg.stats.too_large);
            return Err(too_large(seen, body_bytes_max).with_header("connection", "close"));
        }
        if seen <= body_bytes_max as u64 {
            buf.extend_from_slice(&data);
        }
    }
    if seen > body_bytes_max as u64 {
        // Body fully drained: the 413 reaches the client and the connection stays usable.
        ctx.cfg.stats.count(&ctx.cfg.stats.too_large);
        return Err(too_large(seen, body_bytes_max));
    }
    let body = buf;
    Ok(Request {
        method: parts.method.as_str().to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(parse_query).unwrap_or_default(),
        headers: header_pairs(&parts.headers),
        body,
        peer: ctx.peer,
    })
}

/// The timing of one connection, shared by its IO wrapper, its service and its watch.
struct ConnClock {
    /// Last read or write that made progress.
    last_io: std::cell::Cell<std::time::Instant>,
    /// Requests being handled (hyper may pipeline, so a count).
    in_flight: std::cell::Cell<usize>,
    /// When the head now being read started: the accept, or the first byte read while no
    /// request was in flight. `None` while a request is handled or the connection is idle.
    head_since: std::cell::Cell<Option<std::time::Instant>>,
    /// The `cut` of the stream this connection is writing, if any.
    cut: std::cell::RefCell<Option<BoxFuture<()>>>,
    /// The connection task's waker, woken when a stream (and its `cut`) starts.
    cut_waker: std::cell::RefCell<Option<std::task::Waker>>,
}

impl ConnClock {
    fn streaming(&self) -> bool {
        self.cut.borrow().is_some()
    }

    /// Hands a stream's `cut` to the connection task.
    fn start_stream(&self, cut: BoxFuture<()>) {
        *self.cut.borrow_mut() = Some(cut);
        if let Some(w) = self.cut_waker.borrow_mut().take() {
            w.wake();
        }
    }
}

/// Resolves when the stream the connection is writing must be cut.
async fn cut_wait(clock: Rc<ConnClock>) {
    std::future::poll_fn(|cx| {
        let mut slot = clock.cut.borrow_mut();
        match slot.as_mut() {
            Some(cut) => cut.as_mut().poll(cx),
            None => {
                *clock.cut_waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    })
    .await
}

/// A hyper IO that stamps the time of its last read or write, for the deadlines.
struct Tracked<T> {
    inner: T,
    clock: Rc<ConnClock>,
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if r.is_ready() {
            let now = std::time::Instant::now();
            let c = &self.clock;
            c.last_io.set(now);
            if c.in_flight.get() == 0 && c.head_since.get().is_none() {
                c.head_since.set(Some(now));
            }
        }
        r
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if r.is_ready() {
            self.clock.last_io.set(std::time::Instant::now());
        }
        r
    }
    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Why the watch ended a connection.
#[derive(Debug)]
enum Expired {
    /// No request in flight and no I/O for `idle_ms`.
    Idle,
    /// A head took longer than its deadline.
    Head,
}

/// Resolves when the connection must close: idle too long, or a head too slow. A request in
/// flight is bounded by the body deadline in [`handle`] and by the handler itself.
async fn watch(clock: Rc<ConnClock>, idle: Duration, head: Duration) -> Expired {
    loop {
        let wait = if clock.in_flight.get() > 0 {
            head.min(idle)
        } else {
            let idle_left = idle.saturating_sub(clock.last_io.get().elapsed());
            if idle_left.is_zero() {
                return Expired::Idle;
            }
            match clock.head_since.get() {
                Some(t) => {
                    let head_left = head.saturating_sub(t.elapsed());
                    if head_left.is_zero() {
                        return Expired::Head;
                    }
                    head_left.min(idle_left)
                }
                None => idle_left,
            }
        };
        monoio::time::sleep(wait.max(Duration::from_millis(1))).await;
    }
}

/// Decrements a count even when hyper drops the request future.
struct InFlight(Rc<std::cell::Cell<usize>>);

impl InFlight {
    fn enter(c: &Rc<std::cell::Cell<usize>>) -> InFlight {
        c.set(c.get() + 1);
        InFlight(c.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

/// A request in flight on a [`ConnClock`]: while one is, the head deadline does not run.
struct Handling(Rc<ConnClock>);

impl Handling {
    fn enter(c: &Rc<ConnClock>) -> Handling {
        c.in_flight.set(c.in_flight.get() + 1);
        c.head_since.set(None);
        Handling(c.clone())
    }
}

impl Drop for Handling {
    fn drop(&mut self) {
        let c = &self.0.in_flight;
        c.set(c.get().saturating_sub(1));
    }
}

/// One open connection per peer address, counted; the entry goes when the count reaches 0.
struct PerAddr {
    counts: Rc<std::cell::RefCell<std::collections::HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl Drop for PerAddr {
    fn drop(&mut self) {
        let mut m = self.counts.borrow_mut();
        if let Some(n) = m.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// The limits of one HTTP server that an operator may tune (a `[http]` table in each role's
/// config). Every field has a default; see the constants for what each does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// See [`SERVER_IDLE_MS`].
    pub idle_ms: u64,
    /// See [`SERVER_CONNS_MAX`].
    pub conns_max: usize,
    /// See [`SERVER_CONNS_PER_ADDR_MAX`].
    pub conns_per_addr_max: usize,
    /// See [`SERVER_CONNS_RESERVED`].
    pub conns_reserved: usize,
    /// See [`HEAD_MS_MAX`].
    pub head_ms_max: u64,
    /// See [`RESERVED_HEAD_MS_MAX`].
    pub reserved_head_ms_max: u64,
    /// See [`BODY_GRACE_MS`].
    pub body_grace_ms: u64,
    /// See [`BODY_BYTES_PER_S_MIN`].
    pub body_bytes_per_s_min: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            idle_ms: SERVER_IDLE_MS,
            conns_max: SERVER_CONNS_MAX,
            conns_per_addr_max: SERVER_CONNS_PER_ADDR_MAX,
            conns_reserved: SERVER_CONNS_RESERVED,
            head_ms_max: HEAD_MS_MAX,
            reserved_head_ms_max: RESERVED_HEAD_MS_MAX,
            body_grace_ms: BODY_GRACE_MS,
            body_bytes_per_s_min: BODY_BYTES_PER_S_MIN,
        }
    }
}

/// What the admission refused or timed out, for a role's `/metrics`. Shared across threads
/// (a role may serve on several), so atomics.
#[derive(Debug, Default)]
pub struct Stats {
    /// New connections answered 503 because `conns_max` was reached.
    pub refused_full: std::sync::atomic::AtomicU64,
    /// New connections answered 503 because their address held `conns_per_addr_max`.
    pub refused_per_addr: std::sync::atomic::AtomicU64,
    /// Requests on a reserved slot for a path that is not reserved (503).
    pub refused_reserved: std::sync::atomic::AtomicU64,
    /// Connections closed because a head was not complete in time.
    pub head_timeouts: std::sync::atomic::AtomicU64,
    /// Requests answered 408 because the body was slower than the minimum rate.
    pub body_timeouts: std::sync::atomic::AtomicU64,
    /// Requests answered 413 because the body was over `body_bytes_max`.
    pub too_large: std::sync::atomic::AtomicU64,
}

impl Stats {
    fn count(&self, c: &std::sync::atomic::AtomicU64) {
        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Writes the counters as one family `<prefix>_http_refused_total{reason=...}`.
    pub fn write_metrics(&self, w: &mut crate::metrics::Writer, prefix: &str) {
        use std::sync::atomic::Ordering::Relaxed;
        let name = format!("{prefix}_http_refused_total");
        w.metric(
            &name,
            "counter",
            "HTTP connections or requests refused by admission, by reason.",
            &[
                (
                    &[("reason", "full")],
                    self.refused_full.load(Relaxed) as f64,
                ),
                (
                    &[("reason", "per_addr")],
                    self.refused_per_addr.load(Relaxed) as f64,
                ),
                (
                    &[("reason", "reserved")],
                    self.refused_reserved.load(Relaxed) as f64,
                ),
                (
                    &[("reason", "head_timeout")],
                    self.head_timeouts.load(Relaxed) as f64,
                ),
                (
                    &[("reason", "body_timeout")],
                    self.body_timeouts.load(Relaxed) as f64,
                ),
                (
                    &[("reason", "too_large")],
                    self.too_large.load(Relaxed) as f64,
                ),
            ],
        );
    }
}

/// Everything one [`serve_with`] call needs to know.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Request bodies above this get 413 without calling the handler.
    pub body_bytes_max: usize,
    pub limits: Limits,
    /// Paths served on a reserved slot (exact match), e.g. `/healthz` and heartbeats.
    pub reserved_paths: Vec<String>,
    /// Where admission counts what it refused.
    pub stats: std::sync::Arc<Stats>,
    /// Requests answered by a stream (see [`StreamRoute`]); none by default.
    pub stream: Option<StreamRoute>,
}

impl ServeConfig {
    pub fn new(body_bytes_max: usize) -> ServeConfig {
        ServeConfig {
            body_bytes_max,
            limits: Limits::default(),
            reserved_paths: vec!["/healthz".to_string()],
            stats: Default::default(),
            stream: None,
        }
    }
}

/// Serves HTTP/1.1 on `listener` until `stop` resolves, calling `handler` per request.
/// Bodies above `body_bytes_max` get 413 without calling the handler.
pub async fn serve(
    listener: monoio::net::TcpListener,
    handler: Handler,
    body_bytes_max: usize,
    stop: impl Future<Output = ()>,
) {
    serve_with(listener, handler, ServeConfig::new(body_bytes_max), stop).await
}

/// Answers a connection that is over a limit with a 503 and closes it, without holding up
/// the accept loop; past [`REFUSALS_MAX`] answers in flight it is closed unanswered.
fn refuse(
    stream: monoio::net::TcpStream,
    refusing: &Rc<std::cell::Cell<usize>>,
    message: &'static str,
) {
    if refusing.get() >= REFUSALS_MAX {
        return;
    }
    let guard = InFlight::enter(refusing);
    monoio::spawn(async move {
        use monoio::io::AsyncWriteRentExt;
        let _guard = guard;
        let body = serde_json::json!({"error": "overloaded", "message": message}).to_string();
        let text = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
             retry-after: {RETRY_AFTER_S}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut stream = stream;
        let _ = monoio::time::timeout(
            Duration::from_millis(REFUSAL_WRITE_MS_MAX),
            stream.write_all(text.into_bytes()),
        )
        .await;
    });
}

/// [`serve`] with every limit explicit.
pub async fn serve_with(
    listener: monoio::net::TcpListener,
    handler: Handler,
    cfg: ServeConfig,
    stop: impl Future<Output = ()>,
) {
    let cfg = Rc::new(cfg);
    let limits = cfg.limits;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let open = Rc::new(std::cell::Cell::new(0usize));
    let refusing = Rc::new(std::cell::Cell::new(0usize));
    let per_addr: Rc<std::cell::RefCell<std::collections::HashMap<std::net::IpAddr, usize>>> =
        Default::default();
    let public_max = limits.conns_max.saturating_sub(limits.conns_reserved);
    let mut stop = pin!(stop);
    loop {
        let accepted = monoio::select! {
            _ = &mut stop => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                monoio::time::sleep(Duration::from_millis(ACCEPT_ERROR_BACKOFF_MS)).await;
                continue;
            }
        };
        if open.get() >= limits.conns_max {
            cfg.stats.count(&cfg.stats.refused_full);
            tracing::debug!(%peer, conns_max = limits.conns_max, "http server full");
            refuse(stream, &refusing, "the server is full; retry later");
            continue;
        }
        let ip = peer.ip().to_canonical();
        let held = per_addr.borrow().get(&ip).copied().unwrap_or(0);
        if held >= limits.conns_per_addr_max {
            cfg.stats.count(&cfg.stats.refused_per_addr);
            tracing::debug!(%peer, conns_per_addr_max = limits.conns_per_addr_max, "too many http connections from one address");
            refuse(stream, &refusing, "too many connections from your address");
            continue;
        }
        let reserved_only = open.get() >= public_max;
        let _ = stream.set_nodelay(true);
        let io = match stream.into_poll_io() {
            Ok(s) => TokioIo::new(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot switch connection to poll-io");
                continue;
            }
        };
        *per_addr.borrow_mut().entry(ip).or_insert(0) += 1;
        let addr_guard = PerAddr {
            counts: per_addr.clone(),
            ip,
        };
        let ctx = Rc::new(Ctx {
            handler: handler.clone(),
            cfg: cfg.clone(),
            peer: Some(peer),
            reserved_only,
        });
        let mut stop_rx = stop_rx.clone();
        let open_guard = InFlight::enter(&open);
        let head = Duration::from_millis(if reserved_only {
            limits.head_ms_max.min(limits.reserved_head_ms_max)
        } else {
            limits.head_ms_max
        });
        monoio::spawn(async move {
            let _open = open_guard;
            let _addr = addr_guard;
            let now = std::time::Instant::now();
            let clock = Rc::new(ConnClock {
                last_io: std::cell::Cell::new(now),
                in_flight: std::cell::Cell::new(0),
                head_since: std::cell::Cell::new(Some(now)),
                cut: Default::default(),
                cut_waker: Default::default(),
            });
            let io = Tracked {
                inner: io,
                clock: clock.clone(),
            };
            let svc_clock = clock.clone();
            let cut_clock = clock.clone();
            let stats = ctx.cfg.stats.clone();
            let svc = hyper::service::service_fn(move |req| {
                let ctx = ctx.clone();
                let guard = Handling::enter(&svc_clock);
                let clock = svc_clock.clone();
                async move {
                    let resp = match handle(req, &ctx).await {
                        Reply::Full(r) => to_hyper(r),
                        Reply::Stream(s) => {
                            clock.start_stream(s.cut);
                            let mut headers = s.headers;
                            // One stream per connection: its cut must not outlive it.
                            headers.push(("connection".to_string(), "close".to_string()));
                            with_head(Out::Stream(s.chunks), s.status, headers)
                        }
                    };
                    drop(guard);
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let mut conn = pin!(hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(io, svc));
            let res = monoio::select! {
                r = conn.as_mut() => r,
                why = watch(clock, Duration::from_millis(limits.idle_ms), head) => {
                    if matches!(why, Expired::Head) {
                        stats.count(&stats.head_timeouts);
                    }
                    tracing::debug!(%peer, ?why, "closing http connection");
                    Ok(())
                }
                _ = cut_wait(cut_clock.clone()) => {
                    tracing::debug!(%peer, "stream cut");
                    Ok(())
                }
                _ = stop_rx.wait_for(|s| *s) => {
                    if cut_clock.streaming() {
                        // A stream never finishes on its own: close it now.
                        return;
                    }
                    conn.as_mut().graceful_shutdown();
                    match monoio::time::timeout(Duration::from_millis(SHUTDOWN_GRACE_MS), conn.as_mut()).await {
                        Ok(r) => r,
                        Err(_) => Ok(()),
                    }
                }
            };
            if let Err(e) = res {
                tracing::debug!(%peer, error = %e, "http connection ended with error");
            }
        });
    }
    let _ = stop_tx.send(true);
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect/io: {0}")]
    Io(#[from] std::io::Error),
    #[error("http: {0}")]
    Http(String),
    #[error("timed out")]
    Timeout,
}

async fn request_inner(
    addr: &str,
    method: &str,
    path_and_query: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Response, ClientError> {
    let stream = monoio::net::TcpStream::connect(addr).await?;
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(stream.into_poll_io()?);
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(io)
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?;

    let method = hyper::Method::from_bytes(method.as_bytes())
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let mut builder = hyper::Request::builder().method(method).uri(path_and_query);
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        builder = builder.header(hyper::header::HOST, addr);
    }
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let req = builder
        .body(Full::new(Bytes::copy_from_slice(body)))
        .map_err(|e| ClientError::Http(e.to_string()))?;

    let exchange = async move {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, CLIENT_BODY_BYTES_MAX)
            .collect()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?
            .to_bytes()
            .to_vec();
        Ok::<_, ClientError>(Response {
            status: parts.status.as_u16(),
            headers: header_pairs(&parts.headers),
            body,
        })
    };
    // Drive the connection and the exchange together on this task (no spawn), so nothing
    // outlives the call: when the exchange is done, or the caller's timeout drops us, the
    // connection is dropped and closed. A connection error surfaces through the exchange.
    let mut conn = pin!(conn);
    let mut exchange = pin!(exchange);
    let mut conn_done = false;
    std::future::poll_fn(|cx| {
        if !conn_done {
            if let Poll::Ready(r) = conn.as_mut().poll(cx) {
                conn_done = true;
                if let Err(e) = r {
                    tracing::debug!(error = %e, "http client connection error");
                }
            }
        }
        exchange.as_mut().poll(cx)
    })
    .await
}

/// One request to `addr` (host:port) with a timeout; a new connection per call.
pub async fn request(
    addr: &str,
    method: &str,
    path_and_query: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: std::time::Duration,
) -> Result<Response, ClientError> {
    match monoio::time::timeout(
        timeout,
        request_inner(addr, method, path_and_query, headers, body),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(ClientError::Timeout),
    }
}

/// Header names (lower-cased by hyper) and values as owned strings; a value that is not UTF-8
/// is kept lossily rather than failing the whole message.
fn header_pairs(headers: &hyper::HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        assert_eq!(
            parse_query("a=1&b=x%20y+z&flag&&c=%zz&d=%4"),
            vec![
                ("a".to_string(), "1".to_string()),
                ("b".to_string(), "x y z".to_string()),
                ("flag".to_string(), String::new()),
                ("c".to_string(), "%zz".to_string()),
                ("d".to_string(), "%4".to_string()),
            ]
        );
        assert_eq!(
            parse_query("k%3D=%E2%9C%93"),
            vec![("k=".to_string(), "\u{2713}".to_string())]
        );
    }

    #[test]
    fn bearer_and_headers() {
        let mut r = Request {
            headers: vec![("authorization".into(), "bearer  abc ".into())],
            ..Default::default()
        };
        assert_eq!(r.bearer(), Some("abc"));
        assert_eq!(r.header("Authorization"), Some("bearer  abc "));
        r.headers[0].1 = "Basic abc".into();
        assert_eq!(r.bearer(), None);
        r.headers[0].1 = "Bearer ".into();
        assert_eq!(r.bearer(), None);
        r.query = vec![("x".into(), "1".into())];
        assert_eq!(r.query_param("x"), Some("1"));
        assert_eq!(r.query_param("y"), None);
    }

    #[test]
    fn bad_status_and_header_do_not_panic() {
        let h = to_hyper(
            Response::text(1000, "x")
                .with_header("bad name", "v")
                .with_header("ok", "bad\nvalue"),
        );
        assert_eq!(h.status(), hyper::StatusCode::INTERNAL_SERVER_ERROR);
        assert!(h.headers().get("ok").is_none());
        let j = Response::json(201, &serde_json::json!({"a": 1}));
        assert_eq!(j.body, br#"{"a":1}"#);
        assert_eq!(j.header("Content-Type"), Some("application/json"));
    }
}
