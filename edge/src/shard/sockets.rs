//! The shard's plain client sockets (TCP and WebSocket), driven by readiness: one epoll
//! instance per shard ([`net::sys::Poller`]), one task that waits on it for all of them, and
//! one read buffer for the whole shard. An idle connection holds a slot of a few bytes here
//! (its socket and generation), and no task, no future and no read buffer of its own.
//!
//! Writes go out from [`flush`], called by [`Shard::pump`] for each connection the core has
//! bytes for: one `writev` of every queued buffer, straight away, no task woken. What the
//! kernel does not take (a full socket buffer) waits in [`Pending`], held only while a
//! write is partial, and goes on when epoll says the socket is writable; meanwhile new
//! batches queue in the core and go out together in the next write (a slow reader gets
//! fewer, larger writes, not a longer queue of small ones).
//!
//! Under the io_uring driver (and `uring_client_writes`), [`flush`] does not call `writev`:
//! it pushes one `WRITEV` entry to the shard's own ring ([`net::sys::WriteRing`], beside the
//! epoll instance), and [`submit`], called once per `pump` round, hands every write of the
//! round to the kernel with one `io_uring_enter` and takes the completions (the ring's fd is
//! registered in the epoll instance too, for completions that come later). A completion
//! that took everything is `on_written`; a short one goes on from the byte it stopped at as
//! the next ring write; a full socket buffer (`WouldBlock`: the sockets are non-blocking)
//! goes on as a partial write by readiness, like above. Reads stay on readiness.
//!
//! Invariants:
//! - A connection is in `slots` from [`adopt`] until [`close`], which removes it from epoll,
//!   closes the socket and reports `on_closed` exactly once. With a ring write in flight the
//!   ring takes the socket and the buffers and frees them at the completion (never before).
//! - A connection has at most one of: a ring write in flight, a `Pending` write.
//! - A connection has write interest in epoll iff it has a `Pending` write; the core counts
//!   that write as in flight until the last byte is taken (`on_written`).
//! - Readiness is level-triggered: one read per event, and what is left is reported again.
//! - No `RefCell` borrow of `Sockets` is held across a call into the core (the core may not
//!   call back, but `pump` does flush).

use super::{unix_s, Shard};
use crate::core::{ConnId, Transmit};
use crate::session::CloseReason;
use bytes::Bytes;
use net::sys::{Poller, Ready, RingDone, WriteRing};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// Bytes one read takes at most (the shard's one read buffer): a WebSocket upgrade or a
/// burst of heartbeats fits; more stays in the kernel and is reported again.
pub(crate) const READ_BYTES_MAX: usize = 16 * 1024;
/// Readiness events handled before the task yields to the shard's other tasks.
const EVENTS_PER_TURN_MAX: usize = 1_024;
/// Submission entries of a shard's write ring: a round with more writes submits every this
/// many (the ring floor gains nothing past ~256 per `io_uring_enter`, docs/benchmarks.md).
const RING_ENTRIES: u32 = 256;
/// The epoll key of the ring's descriptor (no connection has it: keys are slab indexes).
const RING_KEY: u64 = u64::MAX;
/// Spare buffer lists kept for ring writes (each in-flight write holds one).
const SPARE_BUFS_MAX: usize = 256;

/// One plain connection's socket.
struct Slot {
    fd: OwnedFd,
    gen: u32,
}

/// A write the kernel took only in part.
struct Pending {
    bufs: Vec<Bytes>,
    /// Bytes of `bufs` already written.
    done: usize,
}

/// The shard's plain sockets. See the module docs.
pub(crate) struct Sockets {
    poller: Poller,
    /// By slab key (the core's keys are dense, so this stays as long as the slab).
    slots: Vec<Option<Slot>>,
    /// Partial writes, by slab key (only while one is partial).
    pending: HashMap<u32, Pending>,
    read_buf: Vec<u8>,
    /// The buffer list of the next write, reused (a partial write keeps its own).
    bufs: Vec<Bytes>,
    /// The write ring (io_uring driver), or None: `writev` calls.
    ring: Option<WriteRing>,
    /// Completions taken from the ring, handled outside the borrow (reused).
    done: Vec<RingDone>,
    /// Buffer lists for ring writes, back from their completions.
    spare: Vec<Vec<Bytes>>,
}

impl Sockets {
    /// `ring`: try to write through an io_uring of our own (else, or when that fails,
    /// `writev` calls). Logs which one shard `shard` uses.
    pub fn new(shard: usize, ring: bool) -> std::io::Result<Sockets> {
        let poller = Poller::new()?;
        let ring = match ring {
            false => None,
            true => match WriteRing::new(RING_ENTRIES)
                .and_then(|r| poller.add(r.as_raw_fd(), RING_KEY, false).map(|()| r))
            {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(shard, error = %e, "cannot set up the client write ring, writing with writev");
                    None
                }
            },
        };
        tracing::info!(
            shard,
            writes = if ring.is_some() { "io_uring" } else { "writev" },
            "client sockets: reads by epoll readiness"
        );
        Ok(Sockets {
            poller,
            slots: Vec::new(),
            pending: HashMap::new(),
            read_buf: Vec::new(),
            bufs: Vec::new(),
            ring,
            done: Vec::new(),
            spare: Vec::new(),
        })
    }

    /// Whether `id` is a plain connection of ours (else a task owns its socket).
    pub fn owns(&self, id: ConnId) -> bool {
        self.fd(id).is_some()
    }

    fn fd(&self, id: ConnId) -> Option<RawFd> {
        match self.slots.get(id.key()) {
            Some(Some(s)) if s.gen == id.gen() => Some(s.fd.as_raw_fd()),
            _ => None,
        }
    }
}

/// Takes over the socket of the admitted connection `id`: non-blocking, registered for reads.
/// On failure the connection is closed (counted as an I/O close).
pub(crate) fn adopt(shard: &Shard, id: ConnId, stream: std::net::TcpStream) {
    let res = stream.set_nonblocking(true).and_then(|()| {
        let fd = OwnedFd::from(stream);
        shard
            .sockets
            .borrow()
            .poller
            .add(fd.as_raw_fd(), id.to_bits(), false)
            .map(|()| fd)
    });
    let fd = match res {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(shard = shard.id, error = %e, "cannot register a client socket");
            shard.core.borrow_mut().on_closed(id, CloseReason::Io);
            return;
        }
    };
    let mut s = shard.sockets.borrow_mut();
    if s.slots.len() <= id.key() {
        s.slots.resize_with(id.key() + 1, || None);
    }
    s.slots[id.key()] = Some(Slot { fd, gen: id.gen() });
}

/// Writes what the core has for `id` now, as far as the kernel takes it; closes it when the
/// core says so. Called by `pump` for each connection `poll_transmit` names.
pub(crate) fn flush(shard: &Shard, id: ConnId) {
    loop {
        let Some(fd) = shard.sockets.borrow().fd(id) else {
            return;
        };
        let mut bufs = std::mem::take(&mut shard.sockets.borrow_mut().bufs);
        let t = shard.core.borrow_mut().take_transmit(id, &mut bufs);
        let written = match t {
            Transmit::Idle => Ok(None),
            Transmit::Close => Err(()),
            Transmit::Write => {
                bufs = match push_ring(shard, id, fd, bufs) {
                    Ok(()) => return,
                    Err(b) => b,
                };
                let total: usize = bufs.iter().map(Bytes::len).sum();
                match write_some(fd, &bufs, 0) {
                    Ok(n) if n == total => Ok(Some(n)),
                    Ok(n) => return wait_writable(shard, id, fd, bufs, n),
                    Err(_) => Err(()),
                }
            }
        };
        bufs.clear();
        shard.sockets.borrow_mut().bufs = bufs;
        match written {
            Ok(None) => return,
            Ok(Some(n)) => shard.core.borrow_mut().on_written(id, n),
            Err(()) => return close(shard, id, CloseReason::Io),
        }
    }
}

/// Hands the write of `id` to the ring (submitted with the round's others by [`submit`]);
/// gives the buffers back when there is no ring or it cannot take the entry.
fn push_ring(shard: &Shard, id: ConnId, fd: RawFd, bufs: Vec<Bytes>) -> Result<(), Vec<Bytes>> {
    let mut s = shard.sockets.borrow_mut();
    let s = &mut *s;
    let Some(r) = s.ring.as_mut() else {
        return Err(bufs);
    };
    r.push(fd, id.to_bits(), bufs, 0)?;
    // The list went with the write; the next one starts from a spare.
    s.bufs = s.spare.pop().unwrap_or_default();
    shard.node.metrics[shard.id].ring_writes.inc();
    Ok(())
}

/// Submits the ring writes of this round (one `io_uring_enter`) and handles the completions
/// there are; returns whether there were any (the core may have more to send then).
pub(crate) fn submit(shard: &Shard) -> bool {
    let mut done = {
        let mut s = shard.sockets.borrow_mut();
        let s = &mut *s;
        let Some(r) = s.ring.as_mut() else {
            return false;
        };
        match r.submit() {
            Ok(0) => {}
            Ok(_) => shard.node.metrics[shard.id].ring_submits.inc(),
            // The entries stay queued and go with the next submit; completions are still
            // reaped below (a full completion queue is the usual cause).
            Err(e) => {
                tracing::debug!(shard = shard.id, error = %e, "client write ring submit failed")
            }
        }
        let mut done = std::mem::take(&mut s.done);
        let freed = r.orphans_freed();
        r.reap(&mut done);
        let freed = r.orphans_freed() - freed;
        if freed > 0 {
            shard.node.metrics[shard.id].ring_orphans_freed.add(freed);
        }
        done
    };
    let any = !done.is_empty();
    for d in done.drain(..) {
        on_ring_done(shard, d);
    }
    shard.sockets.borrow_mut().done = done;
    any
}

/// One ring write of a live connection completed: all of it tells the core; a short one
/// goes on from the byte it stopped at as the next ring write; a full socket buffer
/// (`WouldBlock`) goes on as a partial write by epoll readiness; an error closes the
/// connection, counted.
fn on_ring_done(shard: &Shard, d: RingDone) {
    let id = ConnId::from_bits(d.token);
    let Some(fd) = shard.sockets.borrow().fd(id) else {
        return;
    };
    let total: usize = d.bufs.iter().map(Bytes::len).sum();
    let done = match d.result {
        Ok(n) if n > 0 || d.skip == total => d.skip + n,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ) =>
        {
            return wait_writable(shard, id, fd, d.bufs, d.skip);
        }
        res => {
            shard.node.metrics[shard.id].ring_write_errors.inc();
            tracing::debug!(shard = shard.id, result = ?res, "client ring write failed");
            return close(shard, id, CloseReason::Io);
        }
    };
    if done < total {
        let res = shard
            .sockets
            .borrow_mut()
            .ring
            .as_mut()
            .map(|r| r.push(fd, d.token, d.bufs, done));
        return match res {
            Some(Ok(())) => shard.node.metrics[shard.id].ring_writes.inc(),
            Some(Err(bufs)) => wait_writable(shard, id, fd, bufs, done),
            None => {}
        };
    }
    let mut bufs = d.bufs;
    bufs.clear();
    {
        let mut s = shard.sockets.borrow_mut();
        if s.spare.len() < SPARE_BUFS_MAX {
            s.spare.push(bufs);
        }
    }
    shard.core.borrow_mut().on_written(id, total);
}

/// `writev` until the kernel stops taking bytes; `Ok(n)` with `n` short of the total means
/// the socket buffer is full.
fn write_some(fd: RawFd, bufs: &[Bytes], mut done: usize) -> std::io::Result<usize> {
    let total: usize = bufs.iter().map(Bytes::len).sum();
    while done < total {
        match net::sys::writev(fd, bufs, done) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Parks the rest of a partial write until the socket is writable.
fn wait_writable(shard: &Shard, id: ConnId, fd: RawFd, bufs: Vec<Bytes>, done: usize) {
    let res = {
        let mut s = shard.sockets.borrow_mut();
        s.pending.insert(id.key() as u32, Pending { bufs, done });
        s.poller.modify(fd, id.to_bits(), true)
    };
    if res.is_err() {
        close(shard, id, CloseReason::Io);
    }
}

/// The socket of `id` is writable: goes on with its partial write; once done, the core hears
/// of all of it and may hand out the next one.
fn on_writable(shard: &Shard, id: ConnId) {
    let (fd, p) = {
        let mut s = shard.sockets.borrow_mut();
        let Some(fd) = s.fd(id) else { return };
        let Some(p) = s.pending.remove(&(id.key() as u32)) else {
            return;
        };
        (fd, p)
    };
    let total: usize = p.bufs.iter().map(Bytes::len).sum();
    match write_some(fd, &p.bufs, p.done) {
        Ok(n) if n == total => {
            let res = shard
                .sockets
                .borrow()
                .poller
                .modify(fd, id.to_bits(), false);
            if res.is_err() {
                return close(shard, id, CloseReason::Io);
            }
            shard.core.borrow_mut().on_written(id, total);
            flush(shard, id);
        }
        Ok(n) => {
            let mut s = shard.sockets.borrow_mut();
            s.pending.insert(
                id.key() as u32,
                Pending {
                    bufs: p.bufs,
                    done: n,
                },
            );
        }
        Err(_) => close(shard, id, CloseReason::Io),
    }
}

/// The socket of `id` is readable (or hung up): one read, handed to the core.
fn on_readable(shard: &Shard, id: ConnId) {
    let res = {
        let mut s = shard.sockets.borrow_mut();
        let Some(fd) = s.fd(id) else { return };
        let s = &mut *s;
        if s.read_buf.len() < READ_BYTES_MAX {
            s.read_buf.resize(READ_BYTES_MAX, 0);
        }
        net::sys::read(fd, &mut s.read_buf)
    };
    match res {
        Ok(0) => close(shard, id, CloseReason::PeerClosed),
        Ok(n) => {
            // The buffer is taken out for the call: the core never calls back into us, but
            // `pump` (after this) does.
            let buf = std::mem::take(&mut shard.sockets.borrow_mut().read_buf);
            shard
                .core
                .borrow_mut()
                .on_bytes(id, &buf[..n], Instant::now(), unix_s());
            shard.sockets.borrow_mut().read_buf = buf;
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ) => {}
        Err(_) => close(shard, id, CloseReason::Io),
    }
}

/// Closes the socket of `id` (dropping any partial write) and tells the core, once. A ring
/// write in flight keeps the socket and its buffers in the ring until its completion.
pub(crate) fn close(shard: &Shard, id: ConnId, reason: CloseReason) {
    let fd = {
        let mut s = shard.sockets.borrow_mut();
        let s = &mut *s;
        let Some(fd) = s.fd(id) else { return };
        let _ = s.poller.delete(fd);
        s.pending.remove(&(id.key() as u32));
        let slot = s.slots.get_mut(id.key()).and_then(Option::take);
        match (slot, s.ring.as_mut()) {
            (Some(slot), Some(r)) => r.orphan(id.to_bits(), slot.fd).err(),
            (slot, _) => slot.map(|s| s.fd),
        }
    };
    drop(fd);
    shard.core.borrow_mut().on_closed(id, reason);
}

/// Closes every plain socket the core has already let go of or that must close now (the
/// shell's part of a shutdown).
pub(crate) fn close_all(shard: &Shard, reason: CloseReason) {
    let ids: Vec<ConnId> = {
        let s = shard.sockets.borrow();
        s.slots
            .iter()
            .enumerate()
            .filter_map(|(k, s)| {
                s.as_ref()
                    .map(|s| ConnId::from_bits(u64::from(s.gen) << 32 | k as u64))
            })
            .collect()
    };
    for id in ids {
        close(shard, id, reason);
    }
    // The cancels of orphaned writes go out now.
    submit(shard);
}

/// The readiness loop of one shard: waits for the epoll instance (through the runtime, so
/// the shard's other tasks run meanwhile), then handles what is ready, until the node stops.
pub(crate) async fn run(shard: Rc<Shard>) {
    let waiter =
        match shard.sockets.borrow().poller.try_clone_fd().and_then(|fd| {
            monoio::net::UnixStream::from_std(std::os::unix::net::UnixStream::from(fd))
        }) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(shard = shard.id, error = %e, "cannot wait on the client poller");
                return;
            }
        };
    let mut ready: Vec<Ready> = Vec::with_capacity(net::sys::POLL_EVENTS_MAX);
    loop {
        // An epoll descriptor is readable while any registration is ready; monoio waits for
        // that with its own epoll (legacy) or a PollAdd (io_uring).
        if let Err(e) = waiter.readable(false).await {
            tracing::error!(shard = shard.id, error = %e, "client poller wait failed");
            return;
        }
        if shard.node.stop.load(Ordering::Acquire) {
            return;
        }
        let mut handled = 0;
        loop {
            ready.clear();
            let got = shard.sockets.borrow_mut().poller.wait(&mut ready);
            let n = match got {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(shard = shard.id, error = %e, "client poller failed");
                    return;
                }
            };
            for r in &ready {
                if r.key == RING_KEY {
                    // Completions: `pump` below takes them.
                    continue;
                }
                let id = ConnId::from_bits(r.key);
                if r.write {
                    on_writable(&shard, id);
                }
                if r.read {
                    on_readable(&shard, id);
                }
            }
            shard.pump();
            handled += n;
            if n < net::sys::POLL_EVENTS_MAX || handled >= EVENTS_PER_TURN_MAX {
                break;
            }
        }
        if handled >= EVENTS_PER_TURN_MAX {
            YieldNow(false).await;
        }
    }
}

/// Lets the shard's other tasks run once.
struct YieldNow(bool);

impl std::future::Future for YieldNow {
    type Output = ();
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.0 {
            return std::task::Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}
