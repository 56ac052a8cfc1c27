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
//! hyper's own header-read timeout is off: it needs a `Send` timer, which monoio's is not.

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

impl Response {
    /// JSON response with `Content-Type: application/json`.
    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        Response {
            status,
            headers: vec![("content-type".to_string(), "application/json".to_string())],
            body: value.to_string().into_bytes(),
        }
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

fn to_hyper(resp: Response) -> hyper::Response<Full<Bytes>> {
    let mut out = hyper::Response::new(Full::new(Bytes::from(resp.body)));
    *out.status_mut() = hyper::StatusCode::from_u16(resp.status)
        .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    let h = out.headers_mut();
    for (k, v) in resp.headers {
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

fn too_large() -> Response {
    Response::text(413, "request body too large\n")
}

/// Reads the whole request (enforcing the body cap) and runs the handler.
async fn handle(
    req: hyper::Request<Incoming>,
    handler: Handler,
    body_bytes_max: usize,
    peer: Option<std::net::SocketAddr>,
) -> Response {
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let drain_limit = (body_bytes_max as u64).saturating_add(OVERSIZE_DRAIN_BYTES_MAX);
    if declared.is_some_and(|n| n > drain_limit) {
        // Far too big to be worth reading: answer now and close. The client may see a reset
        // instead of the 413 if it is still writing.
        return too_large().with_header("connection", "close");
    }
    let (parts, mut body) = req.into_parts();
    let mut buf: Vec<u8> = Vec::new();
    let mut seen: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                return Response::text(400, format!("bad request body: {e}\n"))
                    .with_header("connection", "close")
            }
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen = seen.saturating_add(data.len() as u64);
        if seen > drain_limit {
            return too_large().with_header("connection", "close");
        }
        if seen <= body_bytes_max as u64 {
            buf.extend_from_slice(&data);
        }
    }
    if seen > body_bytes_max as u64 {
        // Body fully drained: the 413 reaches the client and the connection stays usable.
        return too_large();
    }
    let body = buf;
    let request = Request {
        method: parts.method.as_str().to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(parse_query).unwrap_or_default(),
        headers: header_pairs(&parts.headers),
        body,
        peer,
    };
    handler(request).await
}

/// A hyper IO that stamps the time of its last read or write, for the idle check.
struct Tracked<T> {
    inner: T,
    last_io: Rc<std::cell::Cell<std::time::Instant>>,
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if r.is_ready() {
            self.last_io.set(std::time::Instant::now());
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
            self.last_io.set(std::time::Instant::now());
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

/// Resolves once the connection has had no request in flight and no I/O for `idle`.
async fn idle_watch(
    last_io: Rc<std::cell::Cell<std::time::Instant>>,
    in_flight: Rc<std::cell::Cell<usize>>,
    idle: Duration,
) {
    loop {
        let since = last_io.get().elapsed();
        if in_flight.get() == 0 && since >= idle {
            return;
        }
        let wait = if in_flight.get() > 0 {
            idle
        } else {
            idle.saturating_sub(since)
        };
        monoio::time::sleep(wait.max(Duration::from_millis(1))).await;
    }
}

/// Decrements the in-flight count even when hyper drops the request future.
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

/// Limits of one [`serve_with`] call.
#[derive(Clone, Copy, Debug)]
pub struct ServeConfig {
    /// Request bodies above this get 413 without calling the handler.
    pub body_bytes_max: usize,
    /// See [`SERVER_IDLE_MS`].
    pub idle_ms: u64,
    /// See [`SERVER_CONNS_MAX`].
    pub conns_max: usize,
}

impl ServeConfig {
    pub fn new(body_bytes_max: usize) -> ServeConfig {
        ServeConfig {
            body_bytes_max,
            idle_ms: SERVER_IDLE_MS,
            conns_max: SERVER_CONNS_MAX,
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

/// [`serve`] with every limit explicit.
pub async fn serve_with(
    listener: monoio::net::TcpListener,
    handler: Handler,
    cfg: ServeConfig,
    stop: impl Future<Output = ()>,
) {
    let body_bytes_max = cfg.body_bytes_max;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let open = Rc::new(std::cell::Cell::new(0usize));
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
        if open.get() >= cfg.conns_max {
            tracing::warn!(%peer, conns_max = cfg.conns_max, "too many http connections, closing new one");
            continue;
        }
        let _ = stream.set_nodelay(true);
        let io = match stream.into_poll_io() {
            Ok(s) => TokioIo::new(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot switch connection to poll-io");
                continue;
            }
        };
        let handler = handler.clone();
        let mut stop_rx = stop_rx.clone();
        let open_guard = InFlight::enter(&open);
        monoio::spawn(async move {
            let _open = open_guard;
            let last_io = Rc::new(std::cell::Cell::new(std::time::Instant::now()));
            let in_flight = Rc::new(std::cell::Cell::new(0usize));
            let io = Tracked {
                inner: io,
                last_io: last_io.clone(),
            };
            let svc_in_flight = in_flight.clone();
            let svc = hyper::service::service_fn(move |req| {
                let handler = handler.clone();
                let guard = InFlight::enter(&svc_in_flight);
                async move {
                    let resp = to_hyper(handle(req, handler, body_bytes_max, Some(peer)).await);
                    drop(guard);
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let mut conn = pin!(hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(io, svc));
            let res = monoio::select! {
                r = conn.as_mut() => r,
                _ = idle_watch(last_io, in_flight, Duration::from_millis(cfg.idle_ms)) => {
                    tracing::debug!(%peer, "closing idle http connection");
                    Ok(())
                }
                _ = stop_rx.wait_for(|s| *s) => {
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
