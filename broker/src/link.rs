//! Edge links: the handshake thread, the bounded per-link send queue, and the per-link
//! reader and writer tasks that run on the owning shard.
//!
//! Invariants:
//! - A link ends on the shard its `Hello` names (`link_shard`); a Hello naming a shard that
//!   does not exist closes the connection.
//! - With `link_keys` set, a link reaches a shard only after the edge proved it holds the key
//!   of the node id its Hello names (`proto::link::handshake`); without keys, only loopback
//!   peers may link. The whole handshake has `link_hello_ms_max`; at most
//!   `link_handshakes_max` run at once and `link_handshakes_per_addr_max` per peer address, so
//!   a stranger holding handshakes open cannot keep a real edge from re-linking. Refusals are
//!   counted by reason and logged at most once a second.
//! - Nothing a shard does waits for an edge: batches are queued, and a queue past
//!   `link_queue_bytes_max` cuts the link (counted as `slow`). The edge reconnects and
//!   re-sends its interest; the clients see the loss as a gap in the room seq.
//! - A batch is queued as its frame header plus the shared packet bytes. The writer gathers
//!   queued frames into one send, copying packets up to `COPY_BYTES_MAX` (cheaper than a send
//!   each) and writing larger ones straight from the shared buffer (no copy per link).

use crate::metrics::Cut;
use crate::route::LinkId;
use crate::stop::Stop;
use crate::{NewLink, Shared};
use bytes::Bytes;
use proto::link::{Hello, LinkFrame};
use std::collections::VecDeque;
use std::io::Read;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

/// How often the link acceptor looks for new connections and for the stop flag.
const ACCEPT_POLL_MS: u64 = 20;
/// Largest Hello accepted by the handshake thread (a Hello is two short strings and a few ints).
const HELLO_BYTES_MAX: u32 = 4 * 1024;

/// One thing to write on a link.
#[derive(Clone, Debug)]
pub enum Out {
    /// A complete encoded frame.
    Frame(Bytes),
    /// A BATCH frame as header + shared packet bytes.
    Batch { header: Bytes, packet: Bytes },
}

impl Out {
    pub fn len(&self) -> usize {
        match self {
            Out::Frame(f) => f.len(),
            Out::Batch { header, packet } => header.len() + packet.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The queue is past its byte limit; the link must be cut.
#[derive(Debug, PartialEq, Eq)]
pub struct Overflow;

/// A bounded FIFO of frames towards one edge (sans-io).
#[derive(Debug)]
pub struct LinkQueue {
    items: VecDeque<Out>,
    bytes: usize,
    bytes_max: usize,
}

impl LinkQueue {
    pub fn new(bytes_max: usize) -> LinkQueue {
        LinkQueue {
            items: VecDeque::new(),
            bytes: 0,
            bytes_max,
        }
    }

    /// Queues `out`, or refuses when it would take the queue past its limit.
    pub fn push(&mut self, out: Out) -> Result<(), Overflow> {
        let len = out.len();
        if self.bytes + len > self.bytes_max {
            return Err(Overflow);
        }
        self.bytes += len;
        self.items.push_back(out);
        Ok(())
    }

    pub fn pop(&mut self) -> Option<Out> {
        let out = self.items.pop_front()?;
        self.bytes -= out.len();
        Some(out)
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// Encodes a frame into shareable bytes.
pub fn frame_bytes(frame: &LinkFrame) -> Bytes {
    let mut v = Vec::new();
    proto::link::encode(frame, &mut v);
    Bytes::from(v)
}

/// Why a link handshake was refused (the `reason` label of
/// `barrage_broker_link_handshakes_refused_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// `link_handshakes_max` handshakes were already in progress.
    Slots = 0,
    /// The peer's address already had `link_handshakes_per_addr_max` in progress.
    PerAddr = 1,
    /// The peer did not prove it holds the link key of the node id it named (or, with no
    /// `link_keys`, it is not on loopback).
    Auth = 2,
}

pub const REFUSED_REASONS: [&str; 3] = ["slots", "per_addr", "auth"];

/// A log line about refused handshakes at most this often, so a flood cannot flood the log.
const REFUSED_LOG_MS_MIN: u64 = 1_000;

/// Handshakes in progress per peer address; the entry goes when its count reaches 0.
pub(crate) type PerAddr = std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>;

fn per_addr_change(map: &PerAddr, ip: std::net::IpAddr, up: bool) {
    let mut m = match map.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    if up {
        *m.entry(ip).or_insert(0) += 1;
    } else if let Some(n) = m.get_mut(&ip) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            m.remove(&ip);
        }
    }
}

fn per_addr_get(map: &PerAddr, ip: std::net::IpAddr) -> usize {
    let m = match map.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    m.get(&ip).copied().unwrap_or(0)
}

/// Counts a refusal and logs it, at most once per [`REFUSED_LOG_MS_MIN`].
fn refused(
    shared: &Shared,
    why: Refused,
    peer: std::net::SocketAddr,
    last_log: &mut Option<std::time::Instant>,
) {
    shared.link_refused[why as usize].fetch_add(1, Relaxed);
    if last_log.is_none_or(|t| t.elapsed() >= Duration::from_millis(REFUSED_LOG_MS_MIN)) {
        *last_log = Some(std::time::Instant::now());
        tracing::warn!(%peer, reason = REFUSED_REASONS[why as usize], "edge link handshake refused (logged at most once a second; see barrage_broker_link_handshakes_refused_total)");
    }
}

/// Starts the thread that accepts edge connections and hands each, after its Hello, to its shard.
pub(crate) fn spawn_acceptor(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("broker-link-accept".into())
        .spawn(move || {
            let mut last_log = None;
            loop {
                let accepted = listener.accept();
                if shared.stop.load(Relaxed) {
                    return;
                }
                let (stream, peer) = match accepted {
                    Ok(s) => s,
                    // The listener is non-blocking so the stop flag is seen within one poll even
                    // if nothing ever connects again (edges connect rarely; the poll costs nothing).
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(ACCEPT_POLL_MS));
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "link accept failed");
                        std::thread::sleep(Duration::from_millis(ACCEPT_POLL_MS));
                        continue;
                    }
                };
                // Accepted sockets inherit nothing from the listener on Linux, but be explicit:
                // the handshake uses blocking reads with a timeout.
                if stream.set_nonblocking(false).is_err() {
                    shared.link_handshakes_failed.fetch_add(1, Relaxed);
                    continue;
                }
                if shared.link_handshakes.load(Relaxed) >= shared.config.link_handshakes_max as u64 {
                    refused(&shared, Refused::Slots, peer, &mut last_log);
                    continue;
                }
                let ip = peer.ip().to_canonical();
                if per_addr_get(&shared.link_handshakes_by_addr, ip)
                    >= shared.config.link_handshakes_per_addr_max
                {
                    refused(&shared, Refused::PerAddr, peer, &mut last_log);
                    continue;
                }
                shared.link_handshakes.fetch_add(1, Relaxed);
                per_addr_change(&shared.link_handshakes_by_addr, ip, true);
                let shared2 = shared.clone();
                // A thread per handshake so one silent peer cannot hold up the others; bounded above.
                let spawned = std::thread::Builder::new()
                    .name("broker-link-hello".into())
                    .spawn(move || {
                        match handshake(stream, peer, &shared2) {
                            Ok(()) => {}
                            Err(HelloFail::Auth(e)) => {
                                shared2.link_refused[Refused::Auth as usize].fetch_add(1, Relaxed);
                                tracing::warn!(%peer, error = %e, "edge link failed authentication");
                            }
                            Err(HelloFail::Bad) => {
                                shared2.link_handshakes_failed.fetch_add(1, Relaxed);
                            }
                        }
                        per_addr_change(&shared2.link_handshakes_by_addr, ip, false);
                        shared2.link_handshakes.fetch_sub(1, Relaxed);
                    });
                if spawned.is_err() {
                    per_addr_change(&shared.link_handshakes_by_addr, ip, false);
                    shared.link_handshakes.fetch_sub(1, Relaxed);
                    shared.link_handshakes_failed.fetch_add(1, Relaxed);
                }
            }
        })
}

/// Why a handshake ended without a link.
#[derive(Debug)]
enum HelloFail {
    /// Timeout, socket error, malformed or unexpected frame.
    Bad,
    /// The peer did not authenticate.
    Auth(proto::link::handshake::HandshakeError),
}

impl From<proto::link::handshake::HandshakeError> for HelloFail {
    fn from(e: proto::link::handshake::HandshakeError) -> Self {
        HelloFail::Auth(e)
    }
}

/// Reads one whole frame during the handshake (blocking, under the socket's read timeout);
/// returns it with its bytes (the Hello's bytes are what the proofs cover).
fn read_handshake_frame(stream: &mut std::net::TcpStream) -> Result<(LinkFrame, Bytes), HelloFail> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).map_err(|_| HelloFail::Bad)?;
    let n = u32::from_be_bytes(len);
    if n > HELLO_BYTES_MAX {
        return Err(HelloFail::Bad);
    }
    let mut frame = vec![0u8; 4 + n as usize];
    frame[..4].copy_from_slice(&len);
    stream
        .read_exact(&mut frame[4..])
        .map_err(|_| HelloFail::Bad)?;
    let frame = Bytes::from(frame);
    match proto::link::decode(&frame, HELLO_BYTES_MAX + 4) {
        Ok((f, _)) => Ok((f, frame)),
        Err(_) => Err(HelloFail::Bad),
    }
}

fn handshake(
    mut stream: std::net::TcpStream,
    peer: std::net::SocketAddr,
    shared: &Shared,
) -> Result<(), HelloFail> {
    use proto::link::handshake::{BrokerHandshake, HandshakeError};
    // One deadline for the whole handshake, however the peer paces its bytes.
    let deadline =
        std::time::Instant::now() + Duration::from_millis(shared.config.link_hello_ms_max.max(1));
    let left = || {
        deadline
            .saturating_duration_since(std::time::Instant::now())
            .max(Duration::from_millis(1))
    };
    let timeouts = |s: &std::net::TcpStream, d: Duration| {
        s.set_read_timeout(Some(d))
            .and_then(|_| s.set_write_timeout(Some(d)))
            .map_err(|_| HelloFail::Bad)
    };
    timeouts(&stream, left())?;
    let (frame, hello_bytes) = read_handshake_frame(&mut stream)?;
    let LinkFrame::Hello(hello) = frame else {
        return Err(HelloFail::Bad);
    };
    if hello.link_shard >= shared.shards {
        return Err(HelloFail::Bad);
    }
    if shared.link_keys.is_empty() {
        // No keys configured: only a peer on this host may link, unauthenticated.
        if !peer.ip().to_canonical().is_loopback() {
            return Err(HandshakeError::Unauthenticated.into());
        }
    } else {
        timeouts(&stream, left())?;
        // A peer that sends no CHALLENGE after its HELLO (an old or keyless edge, a stranger)
        // is refused as unauthenticated.
        let (challenge, _) = read_handshake_frame(&mut stream)
            .map_err(|_| HelloFail::Auth(HandshakeError::Unauthenticated))?;
        let key = shared
            .link_keys
            .key_for(&hello.node_id)
            .ok_or(HandshakeError::UnknownNode)?;
        let (hs, reply) =
            BrokerHandshake::start(key.clone(), &hello_bytes, &challenge, rand::random())?;
        let mut out = Vec::new();
        for f in &reply {
            proto::link::encode(f, &mut out);
        }
        timeouts(&stream, left())?;
        std::io::Write::write_all(&mut stream, &out).map_err(|_| HelloFail::Bad)?;
        timeouts(&stream, left())?;
        let (proof, _) = read_handshake_frame(&mut stream)?;
        hs.finish(&proof)?;
    }
    stream.set_read_timeout(None).map_err(|_| HelloFail::Bad)?;
    stream.set_write_timeout(None).map_err(|_| HelloFail::Bad)?;
    stream.set_nonblocking(true).map_err(|_| HelloFail::Bad)?;
    let _ = stream.set_nodelay(true);
    let inbox = &shared.inboxes[hello.link_shard as usize];
    inbox
        .links_tx
        .send(NewLink {
            stream,
            hello,
            peer,
        })
        .map_err(|_| HelloFail::Bad)?;
    inbox.notify.notify();
    Ok(())
}

/// Whether a link confirms its batches (`proto::link::LinkFrame::Confirm`): only in cluster
/// mode, where an ack to JetStream waits for them, and only with an edge that can. An embedded
/// broker never asks, so its links carry no CONFIRM frames at all.
pub(crate) fn confirms(shared: &Shared, edge: &Hello) -> bool {
    shared.cluster.is_some() && edge.capabilities & proto::link::caps::CONFIRM != 0
}

/// The broker's reply Hello on a link of `shard`.
pub(crate) fn reply_hello(shared: &Shared, shard: u16, edge: &Hello) -> LinkFrame {
    let confirm = if confirms(shared, edge) {
        proto::link::caps::CONFIRM
    } else {
        0
    };
    LinkFrame::Hello(Hello {
        node_id: shared.config.node_id.clone(),
        region: String::new(),
        shards: shared.shards,
        link_shard: shard,
        priority: edge.priority,
        capabilities: proto::link::caps::ZLIB | proto::link::caps::PLAIN | confirm,
    })
}

/// A link as its shard sees it.
pub(crate) struct Conn {
    pub id: LinkId,
    pub node_id: String,
    pub priority: proto::id::Priority,
    pub queue: std::cell::RefCell<LinkQueue>,
    /// Wakes the writer task (same thread; `Notify` is used for its latch semantics).
    pub wake: Arc<net::wake::Notify>,
    /// Fired when the link is cut: ends its reader and writer.
    pub stop: Stop,
    /// Last time anything arrived from the edge.
    pub last_rx: std::cell::Cell<std::time::Instant>,
    /// The edge confirms the batches of this link ([`confirms`]).
    pub confirms: bool,
    /// BATCH frames queued on this link: the link seq of the last one.
    pub batches: std::cell::Cell<u64>,
    /// The highest link seq the edge confirmed.
    pub confirmed: std::cell::Cell<u64>,
}

/// A CONFIRM the link protocol forbids: the link is cut as `protocol`.
#[derive(Debug, PartialEq, Eq)]
pub struct BadConfirm;

impl Conn {
    /// Queues `out` and wakes the writer; `Err` means the link must be cut as slow.
    pub fn send(&self, out: Out) -> Result<(), Overflow> {
        let batch = matches!(out, Out::Batch { .. });
        self.queue.borrow_mut().push(out)?;
        if batch {
            self.batches.set(self.batches.get() + 1);
        }
        self.wake.notify();
        Ok(())
    }

    /// The edge confirmed the batches through `through`: refused if the link does not
    /// confirm, if it goes back, or if it names a batch not sent (which would ack messages
    /// nobody received).
    pub fn confirm(&self, through: u64) -> Result<(), BadConfirm> {
        if !self.confirms || through < self.confirmed.get() || through > self.batches.get() {
            return Err(BadConfirm);
        }
        self.confirmed.set(through);
        Ok(())
    }
}

/// Bytes the writer gathers into one write.
const WRITE_BYTES_MAX: usize = 64 * 1024;
/// Packets up to this size are copied into the gathered write; larger ones are written from
/// the shared buffer. Measured (`broker_throughput_quiet_rooms`): for one-message batches of a
/// few hundred bytes, a copy costs far less than the extra send it saves.
const COPY_BYTES_MAX: usize = 4 * 1024;

impl LinkQueue {
    /// Moves queued frames into `buf` (up to about `WRITE_BYTES_MAX`), copying small packets.
    /// Returns a large packet that must be written, uncopied, right after `buf`.
    pub fn gather(&mut self, buf: &mut Vec<u8>) -> Option<Bytes> {
        while buf.len() < WRITE_BYTES_MAX {
            match self.pop()? {
                Out::Frame(f) => buf.extend_from_slice(&f),
                Out::Batch { header, packet } => {
                    buf.extend_from_slice(&header);
                    if packet.len() > COPY_BYTES_MAX {
                        return Some(packet);
                    }
                    buf.extend_from_slice(&packet);
                }
            }
        }
        None
    }
}

/// Writes the queue to the socket until the link is cut or the socket fails.
pub(crate) async fn writer(
    conn: std::rc::Rc<Conn>,
    mut wr: monoio::net::tcp::TcpOwnedWriteHalf,
) -> Cut {
    use monoio::io::AsyncWriteRentExt;
    let mut buf: Vec<u8> = Vec::with_capacity(WRITE_BYTES_MAX + COPY_BYTES_MAX);
    loop {
        buf.clear();
        let big = conn.queue.borrow_mut().gather(&mut buf);
        if buf.is_empty() && big.is_none() {
            if conn.stop.is_fired() {
                return Cut::Closed;
            }
            monoio::select! {
                _ = conn.wake.notified() => {},
                _ = conn.stop.wait() => return Cut::Closed,
            }
            continue;
        }
        let write = async {
            let (r, b) = wr.write_all(std::mem::take(&mut buf)).await;
            buf = b;
            if r.is_err() {
                return false;
            }
            match big {
                Some(packet) => wr.write_all(packet).await.0.is_ok(),
                None => true,
            }
        };
        // A stuck edge must not keep a cut link's task (and socket) alive.
        let ok = monoio::select! {
            ok = write => ok,
            _ = conn.stop.wait() => return Cut::Closed,
        };
        if !ok {
            return Cut::Closed;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_is_bounded_in_bytes() {
        let mut q = LinkQueue::new(10);
        q.push(Out::Frame(Bytes::from_static(b"12345"))).unwrap();
        q.push(Out::Batch {
            header: Bytes::from_static(b"12"),
            packet: Bytes::from_static(b"345"),
        })
        .unwrap();
        assert_eq!(q.bytes(), 10);
        assert_eq!(q.push(Out::Frame(Bytes::from_static(b"x"))), Err(Overflow));
        assert_eq!(q.pop().map(|o| o.len()), Some(5));
        assert_eq!(q.bytes(), 5);
        q.push(Out::Frame(Bytes::from_static(b"x"))).unwrap();
        assert_eq!(q.pop().map(|o| o.len()), Some(5));
        assert_eq!(q.pop().map(|o| o.len()), Some(1));
        assert!(q.is_empty());
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn gather_copies_small_packets_and_hands_back_large_ones() {
        let mut q = LinkQueue::new(1 << 20);
        let big = Bytes::from(vec![7u8; COPY_BYTES_MAX + 1]);
        q.push(Out::Frame(Bytes::from_static(b"f1"))).unwrap();
        q.push(Out::Batch {
            header: Bytes::from_static(b"h1"),
            packet: Bytes::from_static(b"p1"),
        })
        .unwrap();
        q.push(Out::Batch {
            header: Bytes::from_static(b"h2"),
            packet: big.clone(),
        })
        .unwrap();
        q.push(Out::Frame(Bytes::from_static(b"f3"))).unwrap();
        let mut buf = Vec::new();
        let got = q.gather(&mut buf);
        assert_eq!(buf, b"f1h1p1h2");
        // The large packet is the very same shared buffer, not a copy.
        assert_eq!(got.as_ref().map(|b| b.as_ptr()), Some(big.as_ptr()));
        buf.clear();
        assert_eq!(q.gather(&mut buf), None);
        assert_eq!(buf, b"f3");
        assert_eq!(q.bytes(), 0);
    }
}
