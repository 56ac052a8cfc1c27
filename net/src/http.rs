//! A small HTTP/1.1 server and client on monoio (hyper underneath), for admin, API and
//! control endpoints. Not a hot path; keep-alive on, bodies capped.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

/// A request with its whole body read (capped by the server's `body_bytes_max`).
#[derive(Clone, Debug, Default)]
pub struct Request {
    pub method: String,
    /// Path without the query.
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
    pub fn header(&self, name: &str) -> Option<&str> {
        todo!()
    }
    pub fn query_param(&self, name: &str) -> Option<&str> {
        todo!()
    }
    /// The token of `Authorization: Bearer <token>`.
    pub fn bearer(&self) -> Option<&str> {
        todo!()
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
        todo!()
    }
    /// Plain text response.
    pub fn text(status: u16, body: impl Into<String>) -> Response {
        todo!()
    }
    pub fn with_header(mut self, name: &str, value: &str) -> Response {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
}

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T>>>;
pub type Handler = Rc<dyn Fn(Request) -> BoxFuture<Response>>;

/// Serves HTTP/1.1 on `listener` until `stop` resolves, calling `handler` per request.
/// Bodies above `body_bytes_max` get 413 without calling the handler.
pub async fn serve(listener: monoio::net::TcpListener, handler: Handler, body_bytes_max: usize, stop: impl Future<Output = ()>) {
    todo!()
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

/// One request to `addr` (host:port) with a timeout; a new connection per call.
pub async fn request(addr: &str, method: &str, path_and_query: &str, headers: &[(&str, &str)], body: &[u8], timeout: std::time::Duration) -> Result<Response, ClientError> {
    todo!()
}
