//! Edge links: the handshake thread, the bounded per-link send queue, and the per-link
//! reader and writer tasks that run on the owning shard.
//!
//! Invariants:
//! - A link ends on the shard its `Hello` names (`link_shard`); a Hello naming a shard that
//!   does not exist closes the connection.
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

/// Starts the thread that accepts edge connections and hands each, after its Hello, to its shard.
pub(crate) fn spawn_acceptor(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("broker-link-accept".into())
        .spawn(move || loop {
            let accepted = listener.accept();
            if shared.stop.load(Relaxed) {
                return;
            }
            let stream = match accepted {
                Ok((s, _)) => s,
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
                shared.link_handshakes_failed.fetch_add(1, Relaxed);
                continue;
            }
            shared.link_handshakes.fetch_add(1, Relaxed);
            let shared2 = shared.clone();
            // A thread per handshake so one silent peer cannot hold up the others; bounded above.
            let spawned = std::thread::Builder::new()
                .name("broker-link-hello".into())
                .spawn(move || {
                    if handshake(stream, &shared2).is_err() {
                        shared2.link_handshakes_failed.fetch_add(1, Relaxed);
                    }
                    shared2.link_handshakes.fetch_sub(1, Relaxed);
                });
            if spawned.is_err() {
                shared.link_handshakes.fetch_sub(1, Relaxed);
                shared.link_handshakes_failed.fetch_add(1, Relaxed);
            }
        })
}

#[derive(Debug)]
struct BadHello;

fn handshake(mut stream: std::net::TcpStream, shared: &Shared) -> Result<(), BadHello> {
    stream
        .set_read_timeout(Some(Duration::from_millis(
            shared.config.link_hello_ms_max.max(1),
        )))
        .map_err(|_| BadHello)?;
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).map_err(|_| BadHello)?;
    let n = u32::from_be_bytes(len);
    if n > HELLO_BYTES_MAX {
        return Err(BadHello);
    }
    let mut frame = vec![0u8; 4 + n as usize];
    frame[..4].copy_from_slice(&len);
    stream.read_exact(&mut frame[4..]).map_err(|_| BadHello)?;
    let hello = match proto::link::decode(&Bytes::from(frame), HELLO_BYTES_MAX + 4) {
        Ok((LinkFrame::Hello(h), _)) => h,
        _ => return Err(BadHello),
    };
    if hello.link_shard >= shared.shards {
        return Err(BadHello);
    }
    stream.set_read_timeout(None).map_err(|_| BadHello)?;
    stream.set_nonblocking(true).map_err(|_| BadHello)?;
    let _ = stream.set_nodelay(true);
    let inbox = &shared.inboxes[hello.link_shard as usize];
    inbox
        .links_tx
        .send(NewLink { stream, hello })
        .map_err(|_| BadHello)?;
    inbox.notify.notify();
    Ok(())
}

/// The broker's reply Hello on a link of `shard`.
pub(crate) fn reply_hello(shared: &Shared, shard: u16, edge: &Hello) -> LinkFrame {
    LinkFrame::Hello(Hello {
        node_id: shared.config.node_id.clone(),
        region: String::new(),
        shards: shared.shards,
        link_shard: shard,
        priority: edge.priority,
        capabilities: proto::link::caps::ZLIB | proto::link::caps::PLAIN,
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
}

impl Conn {
    /// Queues `out` and wakes the writer; `Err` means the link must be cut as slow.
    pub fn send(&self, out: Out) -> Result<(), Overflow> {
        self.queue.borrow_mut().push(out)?;
        self.wake.notify();
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
