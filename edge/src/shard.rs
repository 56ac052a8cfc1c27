//! The monoio shell of one shard (one per core): it owns the sockets, the rings and the
//! clock, and moves bytes and events between them and the sans-io [`ShardCore`], which makes
//! every decision.
//!
//! Plain client sockets (TCP and WebSocket) have no task of their own: [`sockets`] drives
//! them all by readiness (one epoll instance per shard, one read buffer), and writes what the
//! core has for a connection ([`ShardCore::poll_transmit`]) at once, in one `writev`, from
//! [`Shard::pump`]. So an idle connection holds its slab entry, its index entries and a
//! socket slot, nothing else (docs/operations-edge.md, "Idle memory").
//!
//! A TLS connection (WSS, TLS over TCP) has one task. It reads into a small buffer and hands
//! the plaintext to the core; when the core has bytes for it the shell wakes the task, which
//! takes all of them at once and drives the one write in flight (a boxed future that owns the
//! write half, so an idle connection holds no writer).
//!
//! Invariants:
//! - Only this shard's thread touches its core, rings and task table (`Rc`/`RefCell`, no
//!   locks). No `RefCell` borrow is held across an `.await` or across a call into the core
//!   that may call back.
//! - After every input to the core the shell calls [`Shard::pump`], which drains the core's
//!   outputs (writers to wake, messages for other shards) until none are left.
//! - A task calls `on_closed` exactly once, when it ends; the core keeps the slot until then,
//!   so a slot key is never reused while its task lives.

use crate::core::{ConnId, ShardCore, Transmit};
use crate::link::Hub;
use crate::session::{CloseReason, Transport};
use crate::tls::{TlsConn, TlsFail};
use bytes::Bytes;
use monoio::io::{
    AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf, Splitable,
};
use monoio::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

pub(crate) use crate::node::{Msg, Node};

mod sockets;

/// The inbox re-checks node flags at least this often even without a notify.
const INBOX_POLL_MS: u64 = 100;
/// Refused clients being told why (each holds an fd until its hint is written or times out);
/// past this a refused client is closed without the hint, so refusals cannot eat the reserve.
const REFUSALS_IN_FLIGHT_MAX: usize = 64;
/// TLS closes writing their close_notify (counted with the refusals: each holds the fd of a
/// connection the core has already let go of, for at most the write and linger bounds). A
/// drain closes `drain_close_per_s` at a time; past this a close is a bare FIN, counted.
const TLS_CLOSES_IN_FLIGHT_MAX: usize = 1_024;
/// A refusal hint may take this long to write.
const REFUSE_WRITE_MS_MAX: u64 = 500;
/// After the hint and a FIN, what the refused client sends is read and dropped until it
/// closes, at most this long (so the close is not an RST that could take the hint with it).
const REFUSE_LINGER_MS_MAX: u64 = 200;
/// Accept back-off after an error (EMFILE, ENFILE, ENOBUFS): from this...
const ACCEPT_BACKOFF_MS_MIN: u64 = 10;
/// ...doubling up to this, reset by the next successful accept.
const ACCEPT_BACKOFF_MS_MAX: u64 = 1_000;
/// At most one "accept failed" log line per listener per this long (the rest are counted).
const ACCEPT_LOG_MS_MIN: u64 = 10_000;
/// The UDP sender waits this long when the socket's send buffer is full.
const UDP_BLOCKED_MS: u64 = 1;
/// Shutdown waits this long for close frames to go out.
const SHUTDOWN_FLUSH_MS_MAX: u64 = 200;

/// One shard's ring ends and listeners, handed to its thread.
pub(crate) struct Plumbing {
    /// Producer to each other shard (None at our own index).
    pub tx: Vec<Option<rtrb::Producer<Msg>>>,
    pub rx: Vec<rtrb::Consumer<Msg>>,
    pub tcp: std::net::TcpListener,
    pub ws: std::net::TcpListener,
    /// WSS, when a certificate is configured.
    pub wss: Option<std::net::TcpListener>,
    /// TLS over raw TCP, when `tls_tcp_addr` is set.
    pub tls_tcp: Option<std::net::TcpListener>,
    /// This shard's UDP socket, when `udp_addr` is set.
    pub udp: Option<std::net::UdpSocket>,
}

/// A shard: one core and the I/O around it.
pub(crate) struct Shard {
    pub id: usize,
    pub node: Arc<Node>,
    core: RefCell<ShardCore>,
    /// The link shard's hub (links to the brokers, node-wide interest).
    hub: Option<Rc<Hub>>,
    tx: RefCell<Vec<Option<rtrb::Producer<Msg>>>>,
    rx: RefCell<Vec<rtrb::Consumer<Msg>>>,
    /// Waker of each connection's task, by slab key (bounded by the slab).
    tasks: RefCell<Vec<Option<Waker>>>,
    accepting: Cell<bool>,
    accept_wakers: RefCell<Vec<Waker>>,
    refusing: Cell<usize>,
    /// The UDP sender task, parked until the core has datagrams.
    udp_sender: RefCell<Option<Waker>>,
    /// The plain (TCP and WebSocket) client sockets, driven by readiness.
    sockets: RefCell<sockets::Sockets>,
}

type ReadHalf = OwnedReadHalf<TcpStream>;
type WriteHalf = OwnedWriteHalf<TcpStream>;
type WriteFut = Pin<Box<dyn Future<Output = (WriteHalf, std::io::Result<usize>)>>>;
type ReadFut = Pin<Box<dyn Future<Output = (ReadHalf, monoio::BufResult<usize, Vec<u8>>)>>>;

/// The write side of a connection: idle (holding the half) or one write in flight.
enum Writer {
    Idle(WriteHalf),
    Busy(WriteFut),
    Gone,
}

impl Shard {
    pub fn new(
        id: usize,
        node: Arc<Node>,
        tx: Vec<Option<rtrb::Producer<Msg>>>,
        rx: Vec<rtrb::Consumer<Msg>>,
    ) -> std::io::Result<Rc<Shard>> {
        let hub = (id == 0).then(|| Rc::new(Hub::new(node.clone(), id)));
        let ring = node.config.uring_client_writes && net::runtime::driver_in_use() == "uring";
        let sockets = RefCell::new(sockets::Sockets::new(id, ring)?);
        Ok(Rc::new(Shard {
            id,
            core: RefCell::new(ShardCore::new(id, node.clone(), Instant::now())),
            hub,
            tx: RefCell::new(tx),
            rx: RefCell::new(rx),
            tasks: RefCell::new(Vec::new()),
            accepting: Cell::new(true),
            accept_wakers: RefCell::new(Vec::new()),
            refusing: Cell::new(0),
            udp_sender: RefCell::new(None),
            sockets,
            node,
        }))
    }

    fn cfg(&self) -> &crate::config::Config {
        &self.node.config
    }

    /// Drains the core's and the hub's outputs: wakes writers, moves messages to the rings.
    fn pump(&self) {
        loop {
            let mut more = false;
            loop {
                let id = self.core.borrow_mut().poll_transmit();
                let Some(id) = id else { break };
                let plain = self.sockets.borrow().owns(id);
                if plain {
                    sockets::flush(self, id);
                } else if let Some(Some(w)) = self.tasks.borrow().get(id.key()) {
                    w.wake_by_ref();
                }
            }
            // The round's ring writes go to the kernel together; their completions may let
            // the core hand out more.
            if sockets::submit(self) {
                more = true;
            }
            loop {
                let m = self.core.borrow_mut().poll_msg();
                let Some((to, msg)) = m else { break };
                self.route(to, msg);
                more = true;
            }
            if let Some(h) = &self.hub {
                while let Some((to, msg)) = h.poll_msg() {
                    self.route(to, msg);
                    more = true;
                }
            }
            if self.core.borrow().has_datagrams() {
                if let Some(w) = self.udp_sender.borrow_mut().take() {
                    w.wake();
                }
            }
            if !more {
                return;
            }
        }
    }

    /// Delivers a message: here (to the hub or the core) or into the ring to shard `to`.
    fn route(&self, to: usize, msg: Msg) {
        if to == self.id {
            self.deliver(msg);
            return;
        }
        let res = {
            let mut tx = self.tx.borrow_mut();
            match tx.get_mut(to).and_then(Option::as_mut) {
                Some(p) => p.push(msg),
                None => return,
            }
        };
        match res {
            Ok(()) => self.node.notify[to].notify(),
            Err(rtrb::PushError::Full(msg)) => {
                self.core.borrow_mut().on_msg_refused(to, msg);
                self.node.notify[to].notify();
            }
        }
    }

    fn deliver(&self, msg: Msg) {
        match (&self.hub, msg) {
            (Some(h), msg) if msg.is_for_hub() => h.on_msg(msg),
            (_, Msg::Datagram { from, bytes }) => {
                self.core
                    .borrow_mut()
                    .on_datagram(&bytes, from, Instant::now(), unix_s(), true);
            }
            (_, msg) => self.core.borrow_mut().on_msg(msg, Instant::now()),
        }
    }

    /// Drains every inbound ring.
    fn drain_inbox(&self) {
        let n = self.rx.borrow().len();
        for i in 0..n {
            loop {
                let msg = match self.rx.borrow_mut().get_mut(i).map(|c| c.pop()) {
                    Some(Ok(m)) => m,
                    _ => break,
                };
                self.deliver(msg);
            }
        }
        self.pump();
    }

    fn set_waker(&self, key: usize, cx: &Context<'_>) {
        let mut tasks = self.tasks.borrow_mut();
        if tasks.len() <= key {
            tasks.resize(key + 1, None);
        }
        match &tasks[key] {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => tasks[key] = Some(cx.waker().clone()),
        }
    }

    fn stop_accepting(&self) {
        self.accepting.set(false);
        for w in self.accept_wakers.borrow_mut().drain(..) {
            w.wake();
        }
    }
}

/// Size of one connection's slab entry (for the memory report).
pub fn conn_entry_bytes() -> usize {
    crate::core::conn_entry_bytes()
}

/// Wall-clock seconds (token expiry, UDP cookies).
fn unix_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---- UDP ----

/// Receives this shard's datagrams into one buffer and hands each to the core. The buffer is
/// one byte larger than `udp_payload_bytes_max`, so a larger datagram shows as oversized.
async fn udp_recv_loop(shard: Rc<Shard>, sock: Rc<monoio::net::udp::UdpSocket>) {
    let mut buf = vec![0u8; shard.cfg().udp_payload_bytes_max + 1];
    loop {
        let (res, b) = sock.recv_from(buf).await;
        buf = b;
        match res {
            Ok((n, from)) => {
                let input = &buf[..n.min(buf.len())];
                shard
                    .core
                    .borrow_mut()
                    .on_datagram(input, from, Instant::now(), unix_s(), false);
                shard.pump();
            }
            Err(e) => {
                // ICMP errors of earlier sends surface here (ECONNREFUSED); nothing to close.
                tracing::debug!(shard = shard.id, error = %e, "udp recv");
                shard.node.metrics[shard.id].udp_send_errors.inc();
            }
        }
        if shard.node.stop.load(Ordering::Acquire) {
            return;
        }
    }
}

/// Sends what the core queued for the UDP socket, up to `SEND_DATAGRAMS_MAX` datagrams per
/// `sendmmsg`, parked while the outbox is empty. The socket is non-blocking: a full socket
/// buffer (`WouldBlock`) waits a moment and tries again; any other error loses that datagram
/// (counted), as the network would.
async fn udp_send_loop(shard: Rc<Shard>, sock: Rc<monoio::net::udp::UdpSocket>) {
    use std::os::fd::AsRawFd;
    let fd = sock.as_raw_fd();
    let mut batch: Vec<(std::net::SocketAddr, Bytes)> = Vec::new();
    loop {
        {
            let mut core = shard.core.borrow_mut();
            while batch.len() < net::sys::SEND_DATAGRAMS_MAX {
                match core.poll_datagram() {
                    Some(d) => batch.push(d),
                    None => break,
                }
            }
        }
        if batch.is_empty() {
            if shard.node.stop.load(Ordering::Acquire) {
                return;
            }
            UdpParked(&shard).await;
            continue;
        }
        let mut sent = 0;
        while sent < batch.len() {
            match net::sys::send_datagrams(fd, &batch[sent..]) {
                Ok(n) => sent += n.max(1),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    monoio::time::sleep(Duration::from_millis(UDP_BLOCKED_MS)).await;
                }
                Err(_) => {
                    shard.node.metrics[shard.id].udp_send_errors.inc();
                    sent += 1;
                }
            }
        }
        batch.clear();
    }
}

/// Waits until the core has datagrams (woken by `Shard::pump`).
struct UdpParked<'a>(&'a Shard);

impl Future for UdpParked<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.core.borrow().has_datagrams() || self.0.node.stop.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        *self.0.udp_sender.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }
}

// ---- tasks ----

/// Runs one shard until the node stops.
pub(crate) async fn run(
    shard: Rc<Shard>,
    tcp: std::net::TcpListener,
    ws: std::net::TcpListener,
    wss: Option<std::net::TcpListener>,
    tls_tcp: Option<std::net::TcpListener>,
    udp: Option<std::net::UdpSocket>,
) {
    tracing::info!(
        shard = shard.id,
        driver = net::runtime::driver_in_use(),
        "edge shard started"
    );
    match (
        monoio::net::TcpListener::from_std(tcp),
        monoio::net::TcpListener::from_std(ws),
    ) {
        (Ok(t), Ok(w)) => {
            monoio::spawn(accept_loop(shard.clone(), t, Transport::Tcp, false));
            monoio::spawn(accept_loop(shard.clone(), w, Transport::Ws, false));
        }
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(shard = shard.id, error = %e, "cannot register listeners");
            return;
        }
    }
    for (l, transport) in [(wss, Transport::Ws), (tls_tcp, Transport::Tcp)] {
        let Some(l) = l else { continue };
        match monoio::net::TcpListener::from_std(l) {
            Ok(l) => {
                monoio::spawn(accept_loop(shard.clone(), l, transport, true));
            }
            Err(e) => {
                tracing::error!(shard = shard.id, error = %e, "cannot register a TLS listener")
            }
        }
    }
    if let Some(u) = udp {
        match monoio::net::udp::UdpSocket::from_std(u) {
            Ok(u) => {
                let u = Rc::new(u);
                monoio::spawn(udp_recv_loop(shard.clone(), u.clone()));
                monoio::spawn(udp_send_loop(shard.clone(), u));
            }
            Err(e) => {
                tracing::error!(shard = shard.id, error = %e, "cannot register the UDP socket")
            }
        }
    }
    monoio::spawn(tick_loop(shard.clone()));
    monoio::spawn(sockets::run(shard.clone()));
    if let Some(h) = &shard.hub {
        h.start();
    }
    let notify = shard.node.notify[shard.id].clone();
    let mut draining = false;
    loop {
        let _ =
            monoio::time::timeout(Duration::from_millis(INBOX_POLL_MS), notify.notified()).await;
        shard.drain_inbox();
        if shard.node.stop.load(Ordering::Acquire) {
            break;
        }
        if !draining && shard.node.draining.load(Ordering::Acquire) {
            draining = true;
            shard.stop_accepting();
            shard.core.borrow_mut().start_drain();
        }
    }
    shard.stop_accepting();
    shard
        .core
        .borrow_mut()
        .close_some(usize::MAX, CloseReason::Shutdown, Instant::now());
    shard.pump();
    // Let close frames go out; connections that do not take them are dropped with the runtime.
    let deadline = Instant::now() + Duration::from_millis(SHUTDOWN_FLUSH_MS_MAX);
    // (and close_notify records: `refusing` counts their tasks.)
    while (!shard.core.borrow().is_empty() || shard.refusing.get() > 0) && Instant::now() < deadline
    {
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
    sockets::close_all(&shard, CloseReason::Shutdown);
    if let Some(h) = &shard.hub {
        h.stop();
    }
    tracing::info!(shard = shard.id, "edge shard stopped");
}

/// Waits until the shard stops accepting.
struct AcceptStop<'a>(&'a Shard);

impl Future for AcceptStop<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if !self.0.accepting.get() {
            return Poll::Ready(());
        }
        self.0.accept_wakers.borrow_mut().push(cx.waker().clone());
        Poll::Pending
    }
}

/// Capped exponential back-off for a failing `accept()`, and a rate-limited log line.
#[derive(Debug, Default)]
struct AcceptBackoff {
    delay_ms: u64,
    last_log: Option<Instant>,
    suppressed: u64,
}

impl AcceptBackoff {
    /// An accept failed at `now`: how long to wait, and whether to log (with the count of
    /// failures not logged since the last line).
    fn failed(&mut self, now: Instant) -> (Duration, Option<u64>) {
        let due = self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= Duration::from_millis(ACCEPT_LOG_MS_MIN));
        let log = if due {
            self.last_log = Some(now);
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        };
        let d = self.delay_ms.max(ACCEPT_BACKOFF_MS_MIN);
        self.delay_ms = (d * 2).min(ACCEPT_BACKOFF_MS_MAX);
        (Duration::from_millis(d), log)
    }

    fn succeeded(&mut self) {
        self.delay_ms = 0;
    }
}

/// Accepts clients of one listener; `tls`: each connection starts with a TLS handshake (WSS).
async fn accept_loop(
    shard: Rc<Shard>,
    listener: monoio::net::TcpListener,
    transport: Transport,
    tls: bool,
) {
    let mut backoff = AcceptBackoff::default();
    loop {
        let accepted = monoio::select! {
            r = listener.accept() => Some(r),
            _ = AcceptStop(&shard) => None,
        };
        let Some(res) = accepted else { break };
        let now = Instant::now();
        let (stream, peer) = match res {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: the pending connection stays in the backlog; back off
                // instead of spinning on it, so links, admin and control keep their share.
                shard.node.metrics[shard.id].accept_errors.inc();
                let (d, log) = backoff.failed(now);
                if let Some(suppressed) = log {
                    let fds = matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE));
                    tracing::warn!(shard = shard.id, error = %e, out_of_fds = fds, suppressed, "accept failed; backing off");
                }
                monoio::time::sleep(d).await;
                continue;
            }
        };
        backoff.succeeded();
        let m = &shard.node.metrics[shard.id];
        if tls && m.tls_handshaking.get() as usize >= shard.cfg().tls_handshakes_max {
            // Handshakes cost CPU: past the cap a new client is closed at once (it retries).
            m.tls_failed(TlsFail::Overloaded);
            m.closed(CloseReason::Overloaded);
            drop(stream);
            continue;
        }
        let admitted = shard.core.borrow_mut().on_accept(transport, peer.ip(), now);
        match admitted {
            Ok(id) => {
                let _ = stream.set_nodelay(true);
                if !tls {
                    sockets::adopt(&shard, id, net::sys::into_std(stream));
                    shard.pump();
                    continue;
                }
                let conn_tls = match tls_conn(&shard, tls, transport) {
                    Ok(t) => t,
                    Err(()) => {
                        shard.core.borrow_mut().on_closed(id, CloseReason::Tls);
                        shard.pump();
                        continue;
                    }
                };
                monoio::spawn(ConnTask::new(shard.clone(), id, stream, conn_tls));
            }
            Err(refused) => {
                // A refused WSS client cannot be told why in plaintext: it is just closed.
                if !tls
                    && !refused.bytes.is_empty()
                    && shard.refusing.get() < REFUSALS_IN_FLIGHT_MAX
                {
                    shard.refusing.set(shard.refusing.get() + 1);
                    monoio::spawn(refuse(shard.clone(), stream, refused.bytes));
                }
            }
        }
    }
}

/// The TLS state of a new WSS connection (counted), or `None` for a plain one.
fn tls_conn(shard: &Shard, tls: bool, transport: Transport) -> Result<Option<Box<TlsConn>>, ()> {
    if !tls {
        return Ok(None);
    }
    let m = &shard.node.metrics[shard.id];
    let Some(t) = shard.node.tls.as_ref() else {
        return Err(());
    };
    match TlsConn::new(t.config.clone()) {
        Ok(mut c) => {
            m.tls_handshaking.inc();
            c.over_ws = transport == Transport::Ws;
            match c.over_ws {
                true => m.conns_wss.inc(),
                false => m.conns_tls_tcp.inc(),
            }
            Ok(Some(Box::new(c)))
        }
        Err(f) => {
            m.tls_failed(f);
            Err(())
        }
    }
}

/// Writes a refused client its reconnect hint (bounded in time), then closes the lingering
/// way: FIN after the hint, then what the client sent is read and dropped until it closes
/// (bounded). Closing with its auth request unread would send an RST, and a client whose
/// stack takes the RST before its read drops the hint with it (seen in tests/faults).
async fn refuse(shard: Rc<Shard>, mut stream: TcpStream, hint: Vec<u8>) {
    use monoio::io::AsyncWriteRent;
    let written = monoio::time::timeout(Duration::from_millis(REFUSE_WRITE_MS_MAX), async {
        stream.write_all(hint).await.0?;
        stream.shutdown().await
    })
    .await;
    if matches!(written, Ok(Ok(()))) {
        let _ = monoio::time::timeout(Duration::from_millis(REFUSE_LINGER_MS_MAX), async {
            let mut buf = vec![0u8; 512];
            loop {
                let (res, b) = stream.read(buf).await;
                buf = b;
                if !matches!(res, Ok(n) if n > 0) {
                    return;
                }
            }
        })
        .await;
    }
    drop(stream);
    shard.refusing.set(shard.refusing.get().saturating_sub(1));
}

/// Writes a TLS alert on a failed connection's write half (bounded in time), then closes the
/// lingering way, as [`refuse`] does: FIN, then what the peer still sends is read and dropped
/// (bounded), so the close is not an RST that could take the alert with it.
async fn write_alert(shard: Rc<Shard>, mut rd: ReadHalf, mut half: WriteHalf, alert: Vec<u8>) {
    let written = monoio::time::timeout(Duration::from_millis(REFUSE_WRITE_MS_MAX), async {
        half.write_all(alert).await.0?;
        half.shutdown().await
    })
    .await;
    if matches!(written, Ok(Ok(()))) {
        let _ = monoio::time::timeout(Duration::from_millis(REFUSE_LINGER_MS_MAX), async {
            let mut buf = vec![0u8; 512];
            loop {
                let (res, b) = rd.read(buf).await;
                buf = b;
                if !matches!(res, Ok(n) if n > 0) {
                    return;
                }
            }
        })
        .await;
    }
    drop((rd, half));
    shard.refusing.set(shard.refusing.get().saturating_sub(1));
}

/// Ends a TLS connection the edge closes itself: lets the write in flight finish, writes
/// close_notify and the FIN (all within [`REFUSE_WRITE_MS_MAX`]), then reads and drops what
/// the peer still sends until it closes (bounded), as [`write_alert`] does. Counted either way.
async fn write_close_notify(
    shard: Rc<Shard>,
    read: Option<ReadFut>,
    writer: Writer,
    record: Vec<u8>,
) {
    let written = monoio::time::timeout(Duration::from_millis(REFUSE_WRITE_MS_MAX), async {
        let mut half = match writer {
            Writer::Idle(h) => h,
            Writer::Busy(f) => {
                let (h, res) = f.await;
                res?;
                h
            }
            Writer::Gone => return Err(std::io::ErrorKind::NotConnected.into()),
        };
        half.write_all(record).await.0?;
        half.shutdown().await?;
        Ok::<_, std::io::Error>(half)
    })
    .await;
    let m = &shard.node.metrics[shard.id];
    match written {
        Ok(Ok(half)) => {
            m.tls_close_notify.inc();
            if let Some(read) = read {
                let _ = monoio::time::timeout(Duration::from_millis(REFUSE_LINGER_MS_MAX), async {
                    let (mut rd, (mut res, mut buf)) = read.await;
                    while matches!(res, Ok(n) if n > 0) {
                        buf.clear();
                        (res, buf) = rd.read(buf).await;
                    }
                })
                .await;
            }
            drop(half);
        }
        _ => m.tls_close_notify_failed.inc(),
    }
    shard.refusing.set(shard.refusing.get().saturating_sub(1));
}

/// Reads into `buf` with the read half moved in, so the future owns everything it needs and
/// can live in a box next to the task (no self-reference).
fn read_owned(mut rd: ReadHalf, buf: Vec<u8>) -> ReadFut {
    Box::pin(async move {
        let r = rd.read(buf).await;
        (rd, r)
    })
}

/// Writes every buffer in order, all of them in one vectored write of the shared buffers (no
/// copy; a partial write is resumed); returns the bytes written.
fn write_owned(mut wr: WriteHalf, mut bufs: Vec<Bytes>) -> WriteFut {
    Box::pin(async move {
        if bufs.len() == 1 {
            let one = bufs.pop().unwrap_or_default();
            let (res, _) = wr.write_all(one).await;
            return (wr, res);
        }
        let res = net::sys::write_all_bufs(&mut wr, bufs).await;
        (wr, res)
    })
}

/// One connection's task, written by hand so its state is exactly these fields (an `async fn`
/// kept several hundred bytes of generator state per idle connection).
struct ConnTask {
    shard: Rc<Shard>,
    id: ConnId,
    read: Option<ReadFut>,
    writer: Writer,
    /// WSS: the TLS state (boxed: a plain connection pays one pointer).
    tls: Option<Box<TlsConn>>,
    /// WSS: plaintext bytes the write in flight carries (what the core queued), reported to
    /// the core instead of the wire bytes.
    busy_plain: usize,
}

impl ConnTask {
    fn new(shard: Rc<Shard>, id: ConnId, stream: TcpStream, tls: Option<Box<TlsConn>>) -> ConnTask {
        let (rd, wr) = stream.into_split();
        let buf = Vec::with_capacity(shard.cfg().handshake_read_buffer_bytes);
        ConnTask {
            shard,
            id,
            read: Some(read_owned(rd, buf)),
            writer: Writer::Idle(wr),
            tls,
            busy_plain: 0,
        }
    }

    /// WSS: feeds wire bytes to TLS and the plaintext to the core.
    fn on_tls_bytes(&mut self, input: &[u8], now: Instant, unix_s: u64) -> Result<(), TlsFail> {
        let Some(t) = self.tls.as_mut() else {
            return Ok(());
        };
        let was = t.is_handshaking();
        let mut plain = Vec::new();
        let res = t.on_received(input, &mut plain);
        if was && !t.is_handshaking() {
            let m = &self.shard.node.metrics[self.shard.id];
            m.tls_handshaking.dec();
            m.tls_handshakes.inc();
        }
        if !plain.is_empty() {
            self.shard
                .core
                .borrow_mut()
                .on_bytes(self.id, &plain, now, unix_s);
            self.shard.pump();
        }
        res
    }

    /// TLS failed: writes the alert rustls queued (if any) from a task of its own, bounded in
    /// time like a refusal hint, so the peer learns why before the close.
    fn send_alert(&mut self, rd: ReadHalf) {
        let Some(alert) = self.tls.as_mut().and_then(|t| t.take_wire()) else {
            return;
        };
        if self.shard.refusing.get() >= REFUSALS_IN_FLIGHT_MAX {
            return;
        }
        if let Writer::Idle(half) = std::mem::replace(&mut self.writer, Writer::Gone) {
            self.shard.refusing.set(self.shard.refusing.get() + 1);
            monoio::spawn(write_alert(self.shard.clone(), rd, half, alert));
        }
    }

    /// The core closes the connection (its reason is counted already). TLS: close_notify
    /// after everything written so far, then the FIN, from a task of its own bounded like an
    /// alert (it waits for the write in flight, so a stuck reader costs at most the bound).
    fn close_by_edge(&mut self) -> Poll<()> {
        // Records still waiting in `wire` (a KeyUpdate answer) go first: close_notify is
        // sealed after them, under the key they switched to.
        let record = self.tls.as_mut().and_then(|t| {
            let mut out = t.take_wire().unwrap_or_default();
            out.extend(t.close_notify()?);
            Some(out)
        });
        if let Some(record) = record {
            let m = &self.shard.node.metrics[self.shard.id];
            if self.shard.refusing.get() < TLS_CLOSES_IN_FLIGHT_MAX {
                self.shard.refusing.set(self.shard.refusing.get() + 1);
                let writer = std::mem::replace(&mut self.writer, Writer::Gone);
                let read = self.read.take();
                monoio::spawn(write_close_notify(self.shard.clone(), read, writer, record));
            } else {
                m.tls_close_notify_failed.inc();
            }
        }
        self.finish(CloseReason::Io)
    }

    fn finish(&mut self, reason: CloseReason) -> Poll<()> {
        // Dropping in-flight ops cancels them (monoio async-cancel); the socket is done anyway.
        self.read = None;
        self.writer = Writer::Gone;
        if let Some(t) = self.tls.take() {
            let m = &self.shard.node.metrics[self.shard.id];
            if t.is_handshaking() {
                m.tls_handshaking.dec();
            }
            match t.over_ws {
                true => m.conns_wss.dec(),
                false => m.conns_tls_tcp.dec(),
            }
        }
        self.shard.core.borrow_mut().on_closed(self.id, reason);
        if let Some(w) = self.shard.tasks.borrow_mut().get_mut(self.id.key()) {
            *w = None;
        }
        self.shard.pump();
        Poll::Ready(())
    }
}

impl Future for ConnTask {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let shard = this.shard.clone();
        let id = this.id;
        loop {
            // A hard close wins over a write in flight (a stuck peer never completes it).
            if shard.core.borrow().must_close(id) {
                return this.close_by_edge();
            }
            if let Writer::Busy(f) = &mut this.writer {
                if let Poll::Ready((half, res)) = f.as_mut().poll(cx) {
                    this.writer = Writer::Idle(half);
                    match res {
                        Ok(n) => {
                            let n = match this.tls {
                                Some(_) => std::mem::take(&mut this.busy_plain),
                                None => n,
                            };
                            if n > 0 || this.tls.is_none() {
                                shard.core.borrow_mut().on_written(id, n);
                            }
                        }
                        Err(_) => return this.finish(CloseReason::Io),
                    }
                }
            }
            if matches!(this.writer, Writer::Idle(_)) {
                // WSS: handshake records go first (the core has nothing to say before them).
                if let Some(wire) = this.tls.as_mut().and_then(|t| t.take_wire()) {
                    if let Writer::Idle(half) = std::mem::replace(&mut this.writer, Writer::Gone) {
                        this.busy_plain = 0;
                        this.writer = Writer::Busy(write_owned(half, vec![Bytes::from(wire)]));
                    }
                    continue;
                }
                let mut bufs = Vec::new();
                let t = shard.core.borrow_mut().take_transmit(id, &mut bufs);
                match t {
                    Transmit::Write => {
                        if let Some(tls) = this.tls.as_mut() {
                            if tls.is_handshaking() {
                                // The core closes a stalled handshake (its deadline covers TLS
                                // and the upgrade) and counted why; there is no key to send
                                // its reply with.
                                return this.finish(CloseReason::HandshakeTimeout);
                            }
                            this.busy_plain = bufs.iter().map(Bytes::len).sum();
                            match tls.encrypt(&bufs) {
                                Ok(wire) => bufs = vec![Bytes::from(wire)],
                                Err(f) => {
                                    shard.node.metrics[shard.id].tls_failed(f);
                                    return this.finish(CloseReason::Tls);
                                }
                            }
                        }
                        if let Writer::Idle(half) =
                            std::mem::replace(&mut this.writer, Writer::Gone)
                        {
                            this.writer = Writer::Busy(write_owned(half, bufs));
                        }
                        continue;
                    }
                    Transmit::Close => return this.close_by_edge(),
                    Transmit::Idle => {}
                }
            }
            shard.set_waker(id.key(), cx);
            let Some(r) = this.read.as_mut() else {
                return this.finish(CloseReason::Io);
            };
            let (rd, res, mut buf) = match r.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready((rd, (res, buf))) => (rd, res, buf),
            };
            this.read = None;
            let n = match res {
                Ok(0) => return this.finish(CloseReason::PeerClosed),
                Err(_) => return this.finish(CloseReason::Io),
                Ok(n) => n,
            };
            let unix_s = unix_s();
            let input = &buf[..n.min(buf.len())];
            if this.tls.is_some() {
                if let Err(f) = this.on_tls_bytes(input, Instant::now(), unix_s) {
                    shard.node.metrics[shard.id].tls_failed(f);
                    let reason = match f {
                        TlsFail::PeerClosed => CloseReason::PeerClosed,
                        _ => CloseReason::Tls,
                    };
                    this.send_alert(rd);
                    return this.finish(reason);
                }
            } else {
                shard
                    .core
                    .borrow_mut()
                    .on_bytes(id, input, Instant::now(), unix_s);
                shard.pump();
            }
            buf.clear();
            let mut small = shard.cfg().read_buffer_bytes;
            if this.tls.is_some() {
                small = small.max(crate::tls::TLS_READ_BUFFER_BYTES_MIN);
            }
            if buf.capacity() > small && shard.core.borrow().is_live(id) {
                // Idle cost: once authenticated, clients only send heartbeats.
                buf = Vec::with_capacity(small);
            }
            this.read = Some(read_owned(rd, buf));
        }
    }
}

async fn tick_loop(shard: Rc<Shard>) {
    let tick = Duration::from_millis(shard.cfg().timer_tick_ms.max(1));
    loop {
        let at = shard.core.borrow().poll_timeout();
        let wait = at
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(1), tick);
        monoio::time::sleep(wait).await;
        if shard.node.stop.load(Ordering::Acquire) {
            return;
        }
        let now = Instant::now();
        shard.core.borrow_mut().on_timeout(now);
        if let Some(h) = &shard.hub {
            if shard.node.config.brokers_from_control {
                h.follow_control();
            }
            h.on_tick(now);
        }
        shard.pump();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_backoff_doubles_caps_resets_and_logs_once_per_interval() {
        let t0 = Instant::now();
        let mut b = AcceptBackoff::default();
        let mut delays = Vec::new();
        let mut logs = Vec::new();
        for i in 0..10u64 {
            let (d, log) = b.failed(t0 + Duration::from_millis(i));
            delays.push(d.as_millis() as u64);
            logs.push(log);
        }
        assert_eq!(delays, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        assert_eq!(logs[0], Some(0));
        assert!(logs[1..].iter().all(Option::is_none), "{logs:?}");
        // The next line after the interval says how many were not logged.
        let (_, log) = b.failed(t0 + Duration::from_millis(ACCEPT_LOG_MS_MIN + 1));
        assert_eq!(log, Some(9));
        b.succeeded();
        assert_eq!(b.failed(t0).0, Duration::from_millis(ACCEPT_BACKOFF_MS_MIN));
    }
}
