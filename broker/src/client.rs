//! [`IngestClient`]: a blocking client of the ingest socket, usable from any plain thread.
//!
//! It authenticates on connect, pipelines requests (send many, then read their statuses by
//! `req_id`), and reconnects when the connection breaks.
//!
//! # Failover (cluster mode, issue 12)
//! A client may hold several broker addresses ([`IngestClient::connect_any`], `barrage push
//! --ingest a,b,c`). When a connection breaks or a status does not come in time, the client
//! moves to the next address (round robin from the one that failed) and re-sends what was
//! unanswered **with the same idempotency key** (ingest `KeyedPush`): a broker that had
//! accepted the first attempt answers the retry with the first msg id (in cluster mode
//! JetStream deduplicates by `Nats-Msg-Id` across brokers, within `cluster.dedup_window_ms`;
//! embedded, the broker's own table within `idempotency_window_ms`), so a retry is not a
//! duplicate.
//!
//! - [`IngestClient::push`] always sends a key (generated: a random client prefix and a
//!   counter) and tries every address once more before giving up.
//! - [`IngestClient::push_many`] keys its messages and fails over only when the client has
//!   more than one address; with one, an I/O failure fails the call as before (a keyed flood
//!   would fill an embedded broker's dedup table).
//! - [`IngestClient::send`]/[`IngestClient::recv`] never retry.

use proto::id::{AreaId, DeviceId, MsgId, Priority, Reach, RoomId, Scope, UserId};
use proto::ingest::{IngestError, IngestFrame, Push, PushError};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Default time to wait for a connect or a status.
pub const CLIENT_TIMEOUT_MS: u64 = 10_000;
/// Requests in flight at once in [`IngestClient::push_many`].
pub const PIPELINE_DEPTH: usize = 256;

/// Why a push did not get a `msg_id`.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The broker refused the push (see [`PushError`] for whose fault and whether to retry).
    #[error("refused: {0}")]
    Rejected(#[from] PushError),
    /// Connecting, reading or writing failed (the connection is dropped; the next call reconnects).
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// No status within the timeout.
    #[error("timed out waiting for the broker")]
    Timeout,
    /// The broker sent something that is not a valid answer.
    #[error("protocol: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The broker's refusal, if that is what this is.
    pub fn push_error(&self) -> Option<&PushError> {
        match self {
            ClientError::Rejected(e) => Some(e),
            _ => None,
        }
    }
}

/// One message to push (a `Push` without its `req_id`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub scope: Scope,
    pub priority: Priority,
    pub reach: Reach,
    /// 0 = the broker's default.
    pub ttl_ms: u32,
    /// The op 5 body: a JSON object, delivered verbatim.
    pub body: Vec<u8>,
}

impl Message {
    /// A low-priority, best-effort message to `scope`.
    pub fn new(scope: Scope, body: impl Into<Vec<u8>>) -> Message {
        Message {
            scope,
            priority: Priority::Low,
            reach: Reach::BestEffort,
            ttl_ms: 0,
            body: body.into(),
        }
    }
    pub fn room(room: u64, body: impl Into<Vec<u8>>) -> Message {
        Message::new(Scope::Room(RoomId(room)), body)
    }
    pub fn area(area: u32, body: impl Into<Vec<u8>>) -> Message {
        Message::new(Scope::Area(AreaId(area)), body)
    }
    pub fn global(body: impl Into<Vec<u8>>) -> Message {
        Message::new(Scope::Global, body)
    }
    pub fn user(uid: u64, body: impl Into<Vec<u8>>) -> Message {
        Message::new(Scope::User(UserId(uid)), body)
    }
    pub fn device(device: &str, body: impl Into<Vec<u8>>) -> Message {
        Message::new(Scope::Device(DeviceId(device.to_string())), body)
    }
    pub fn priority(mut self, priority: Priority) -> Message {
        self.priority = priority;
        self
    }
    pub fn reach(mut self, reach: Reach) -> Message {
        self.reach = reach;
        self
    }
    pub fn ttl_ms(mut self, ttl_ms: u32) -> Message {
        self.ttl_ms = ttl_ms;
        self
    }
}

/// A status as read: the request it answers and its result.
type Answer = (u64, Result<MsgId, PushError>);

struct Conn {
    stream: TcpStream,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    /// Requests sent whose status has not been read.
    in_flight: usize,
    /// Statuses read while looking for another `req_id`.
    early: HashMap<u64, Result<MsgId, PushError>>,
    /// Presence events read while looking for a status (after a `subscribe`).
    events: std::collections::VecDeque<Vec<u8>>,
}

/// A pipelined, authenticated connection to a broker's ingest socket.
pub struct IngestClient {
    addrs: Vec<SocketAddr>,
    /// The address tried first on the next connect (the one after a failed one).
    current: usize,
    /// Generated idempotency keys: `<key_prefix><counter>`.
    key_prefix: String,
    next_key: u64,
    api_key: String,
    timeout: Duration,
    next_req_id: u64,
    conn: Option<Conn>,
}

impl IngestClient {
    /// Connects to `addr` and authenticates with `api_key`. A bad key is
    /// `Err(ClientError::Rejected(PushError::Unauthorized))`.
    pub fn connect(addr: impl ToSocketAddrs, api_key: &str) -> Result<IngestClient, ClientError> {
        let addrs: Vec<SocketAddr> = addr.to_socket_addrs()?.collect();
        IngestClient::connect_addrs(addrs, api_key)
    }

    /// Connects to the first broker of `addrs` (`host:port`, comma-separated) that answers,
    /// and fails over between them (see the module doc).
    pub fn connect_any(addrs: &str, api_key: &str) -> Result<IngestClient, ClientError> {
        let mut all = Vec::new();
        for a in addrs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            all.extend(a.to_socket_addrs()?);
        }
        IngestClient::connect_addrs(all, api_key)
    }

    fn connect_addrs(addrs: Vec<SocketAddr>, api_key: &str) -> Result<IngestClient, ClientError> {
        if addrs.is_empty() {
            return Err(ClientError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "no address",
            )));
        }
        let mut c = IngestClient {
            addrs,
            current: 0,
            key_prefix: format!("c{:016x}.", rand::random::<u64>()),
            next_key: 1,
            api_key: api_key.to_string(),
            timeout: Duration::from_millis(CLIENT_TIMEOUT_MS),
            next_req_id: 1,
            conn: None,
        };
        c.reconnect()?;
        Ok(c)
    }

    /// Sets the connect/status timeout (default [`CLIENT_TIMEOUT_MS`]).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout.max(Duration::from_millis(1));
        if let Some(c) = &self.conn {
            let _ = c.stream.set_read_timeout(Some(self.timeout));
            let _ = c.stream.set_write_timeout(Some(self.timeout));
        }
    }

    /// Drops the connection and makes the next connect start at the next address.
    fn fail_over(&mut self) {
        self.conn = None;
        self.current = (self.current + 1) % self.addrs.len().max(1);
    }

    fn reconnect(&mut self) -> Result<(), ClientError> {
        self.conn = None;
        let mut last = None;
        let n = self.addrs.len();
        for i in 0..n {
            let at = (self.current + i) % n;
            match TcpStream::connect_timeout(&self.addrs[at], self.timeout) {
                Ok(s) => {
                    last = None;
                    self.current = at;
                    s.set_nodelay(true)?;
                    s.set_read_timeout(Some(self.timeout))?;
                    s.set_write_timeout(Some(self.timeout))?;
                    self.conn = Some(Conn {
                        stream: s,
                        rbuf: Vec::with_capacity(4096),
                        wbuf: Vec::new(),
                        in_flight: 0,
                        early: HashMap::new(),
                        events: Default::default(),
                    });
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        if let Some(e) = last {
            return Err(ClientError::Io(e));
        }
        let req_id = self.take_req_id();
        let auth = IngestFrame::Auth {
            req_id,
            api_key: self.api_key.clone(),
        };
        self.write_frame(&auth)?;
        match self.wait_for(req_id) {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                self.conn = None;
                Err(ClientError::Rejected(e))
            }
            Err(e) => Err(e),
        }
    }

    fn take_req_id(&mut self) -> u64 {
        let id = self.next_req_id;
        self.next_req_id += 1;
        id
    }

    fn write_frame(&mut self, frame: &IngestFrame) -> Result<(), ClientError> {
        let Some(c) = self.conn.as_mut() else {
            return Err(ClientError::Io(std::io::ErrorKind::NotConnected.into()));
        };
        c.wbuf.clear();
        proto::ingest::encode(frame, &mut c.wbuf);
        let r = c.stream.write_all(&c.wbuf);
        match r {
            Ok(()) => {
                c.in_flight += 1;
                Ok(())
            }
            Err(e) => {
                self.conn = None;
                Err(e.into())
            }
        }
    }

    /// Subscribes this connection to presence events (a key with the `presence` scope) of
    /// `rooms` or `areas` (both empty: all), after seq `after` (`None`: from the newest on).
    /// Returns the seq the stream starts after; read the events with
    /// [`IngestClient::next_event`]. The subscription lives on this connection: after an
    /// error, subscribe again with the last seq seen.
    pub fn subscribe(
        &mut self,
        after: Option<u64>,
        rooms: &[u64],
        areas: &[u32],
    ) -> Result<u64, ClientError> {
        if self.conn.is_none() {
            self.reconnect()?;
        }
        let req_id = self.take_req_id();
        self.write_frame(&IngestFrame::Subscribe {
            req_id,
            after,
            rooms: rooms.iter().copied().map(RoomId).collect(),
            areas: areas.iter().copied().map(AreaId).collect(),
        })?;
        match self.wait_for(req_id)? {
            Ok(MsgId(at)) => Ok(at),
            Err(e) => Err(ClientError::Rejected(e)),
        }
    }

    /// The next presence event of the subscription (one JSON object), waiting up to the
    /// client's timeout ([`ClientError::Timeout`]; the connection stays usable then).
    pub fn next_event(&mut self) -> Result<Vec<u8>, ClientError> {
        loop {
            let Some(c) = self.conn.as_mut() else {
                return Err(ClientError::Io(std::io::ErrorKind::NotConnected.into()));
            };
            if let Some(e) = c.events.pop_front() {
                return Ok(e);
            }
            // Any status that comes first is kept for `recv`.
            match self.read_frame() {
                Ok(Some((id, r))) => {
                    if let Some(c) = self.conn.as_mut() {
                        c.early.insert(id, r);
                    }
                }
                Ok(None) => {}
                Err(ClientError::Timeout) => return Err(ClientError::Timeout),
                Err(e) => {
                    self.conn = None;
                    return Err(e);
                }
            }
        }
    }

    /// Sends one push without waiting; returns its `req_id` (read its status with [`IngestClient::recv`]).
    /// Reconnects first if the connection is broken (statuses still owed by the old one are lost).
    pub fn send(&mut self, msg: &Message) -> Result<u64, ClientError> {
        self.send_keyed(msg, None)
    }

    /// [`IngestClient::send`] with an idempotency key (1..=`IDEMPOTENCY_KEY_BYTES_MAX` bytes):
    /// a second push with the same key within the dedup window gets the first one's msg id.
    pub fn send_keyed(&mut self, msg: &Message, key: Option<&str>) -> Result<u64, ClientError> {
        if self.conn.is_none() {
            self.reconnect()?;
        }
        let req_id = self.take_req_id();
        let push = Push {
            req_id,
            scope: msg.scope.clone(),
            priority: msg.priority,
            reach: msg.reach,
            ttl_ms: msg.ttl_ms,
            body: msg.body.clone(),
        };
        let frame = match key {
            Some(k) => IngestFrame::KeyedPush {
                idempotency_key: k.to_string(),
                push,
            },
            None => IngestFrame::Push(push),
        };
        self.write_frame(&frame)?;
        Ok(req_id)
    }

    /// A fresh generated idempotency key.
    fn new_key(&mut self) -> String {
        let k = format!("{}{}", self.key_prefix, self.next_key);
        self.next_key += 1;
        k
    }

    /// Reads the next status: `(req_id, msg id or refusal)`.
    pub fn recv(&mut self) -> Result<(u64, Result<MsgId, PushError>), ClientError> {
        if let Some(c) = self.conn.as_mut() {
            if let Some(&k) = c.early.keys().next() {
                let r = c.early.remove(&k).unwrap_or(Err(PushError::Overloaded));
                return Ok((k, r));
            }
        }
        let r = self.read_status();
        if r.is_err() {
            self.conn = None;
        }
        r
    }

    fn read_status(&mut self) -> Result<(u64, Result<MsgId, PushError>), ClientError> {
        loop {
            if let Some(status) = self.read_frame()? {
                return Ok(status);
            }
        }
    }

    /// Reads one frame: a status is returned, a presence event queued (`None`).
    fn read_frame(&mut self) -> Result<Option<Answer>, ClientError> {
        let Some(c) = self.conn.as_mut() else {
            return Err(ClientError::Io(std::io::ErrorKind::NotConnected.into()));
        };
        loop {
            match proto::ingest::decode(&c.rbuf, proto::limits::INGEST_FRAME_BYTES_MAX) {
                Ok((frame, used)) => {
                    c.rbuf.drain(..used);
                    return match frame {
                        IngestFrame::Status { req_id, result } => {
                            c.in_flight = c.in_flight.saturating_sub(1);
                            Ok(Some((req_id, result)))
                        }
                        IngestFrame::PresenceEvent { json } => {
                            c.events.push_back(json);
                            Ok(None)
                        }
                        other => Err(ClientError::Protocol(format!(
                            "unexpected frame from broker: {other:?}"
                        ))),
                    };
                }
                Err(IngestError::Incomplete) => {}
                Err(e) => return Err(ClientError::Protocol(e.to_string())),
            }
            let mut chunk = [0u8; 8192];
            match c.stream.read(&mut chunk) {
                Ok(0) => return Err(ClientError::Io(std::io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => c.rbuf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(ClientError::Timeout)
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Reads statuses until the one for `req_id`, keeping the others for [`IngestClient::recv`].
    fn wait_for(&mut self, req_id: u64) -> Result<Result<MsgId, PushError>, ClientError> {
        if let Some(r) = self.conn.as_mut().and_then(|c| c.early.remove(&req_id)) {
            return Ok(r);
        }
        loop {
            let (id, r) = match self.read_status() {
                Ok(v) => v,
                Err(e) => {
                    self.conn = None;
                    return Err(e);
                }
            };
            if id == req_id {
                return Ok(r);
            }
            if let Some(c) = self.conn.as_mut() {
                c.early.insert(id, r);
            }
        }
    }

    /// Pushes one message and waits for its `msg_id`, under a generated idempotency key. When
    /// the connection breaks or times out first, re-sends it with the same key to the next
    /// address (each address once more, at least one retry; see the module doc).
    pub fn push(&mut self, msg: &Message) -> Result<MsgId, ClientError> {
        let key = self.new_key();
        self.push_keyed(msg, &key)
    }

    /// [`IngestClient::push`] under the caller's idempotency key.
    pub fn push_keyed(&mut self, msg: &Message, key: &str) -> Result<MsgId, ClientError> {
        let mut retries = self.addrs.len().max(2);
        loop {
            let attempt = self
                .send_keyed(msg, Some(key))
                .and_then(|id| self.wait_for(id));
            match attempt {
                Ok(r) => return r.map_err(ClientError::Rejected),
                Err(ClientError::Io(_) | ClientError::Timeout) if retries > 0 => {
                    retries -= 1;
                    self.fail_over();
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Pushes many messages pipelined ([`PIPELINE_DEPTH`] in flight); results in input order.
    /// With one address an I/O failure fails the whole call (some of the messages may have
    /// been accepted); with several, the unanswered ones are re-sent under their keys to the
    /// next broker (see the module doc), up to once per address in a row without progress.
    pub fn push_many(
        &mut self,
        msgs: &[Message],
    ) -> Result<Vec<Result<MsgId, PushError>>, ClientError> {
        let failover = self.addrs.len() > 1;
        let keys: Vec<String> = if failover {
            msgs.iter().map(|_| self.new_key()).collect()
        } else {
            Vec::new()
        };
        let mut results: Vec<Option<Result<MsgId, PushError>>> = vec![None; msgs.len()];
        let mut index_of: HashMap<u64, usize> = HashMap::new();
        // Messages to (re-)send, in order; the unanswered ones go back here on a failover.
        let mut todo: std::collections::VecDeque<usize> = (0..msgs.len()).collect();
        let mut done = 0;
        let mut retries = self.addrs.len();
        while done < msgs.len() {
            let step = (|| {
                while index_of.len() < PIPELINE_DEPTH {
                    let Some(&i) = todo.front() else { break };
                    let id = self.send_keyed(&msgs[i], keys.get(i).map(String::as_str))?;
                    todo.pop_front();
                    index_of.insert(id, i);
                }
                self.recv()
            })();
            match step {
                Ok((id, r)) => {
                    if let Some(i) = index_of.remove(&id) {
                        results[i] = Some(r);
                        done += 1;
                        retries = self.addrs.len();
                    }
                }
                Err(ClientError::Io(_) | ClientError::Timeout) if failover && retries > 0 => {
                    retries -= 1;
                    self.fail_over();
                    let mut lost: Vec<usize> = index_of.drain().map(|(_, i)| i).collect();
                    lost.sort_unstable();
                    for i in lost.into_iter().rev() {
                        todo.push_front(i);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or(Err(PushError::Overloaded)))
            .collect())
    }

    /// Requests sent on the current connection whose status has not been read.
    pub fn in_flight(&self) -> usize {
        self.conn.as_ref().map_or(0, |c| c.in_flight)
    }

    /// True while a connection is open.
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }
}
