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
//! Invariants:
//! - A connection is in `slots` from [`adopt`] until [`close`], which removes it from epoll,
//!   closes the socket and reports `on_closed` exactly once.
//! - A connection has write interest in epoll iff it has a `Pending` write; the core counts
//!   that write as in flight until the last byte is taken (`on_written`).
//! - Readiness is level-triggered: one read per event, and what is left is reported again.
//! - No `RefCell` borrow of `Sockets` is held across a call into the core (the core may not
//!   call back, but `pump` does flush).

use super::{unix_s, Shard};
use crate::core::{ConnId, Transmit};
use crate::session::CloseReason;
use bytes::Bytes;
use net::sys::{Poller, Ready};
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
}

impl Sockets {
    pub fn new() -> std::io::Result<Sockets> {
        Ok(Sockets {
            poller: Poller::new()?,
            slots: Vec::new(),
            pending: HashMap::new(),
            read_buf: Vec::new(),
            bufs: Vec::new(),
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

/// Closes the socket of `id` (dropping any partial write) and tells the core, once.
pub(crate) fn close(shard: &Shard, id: ConnId, reason: CloseReason) {
    let slot = {
        let mut s = shard.sockets.borrow_mut();
        let Some(fd) = s.fd(id) else { return };
        let _ = s.poller.delete(fd);
        s.pending.remove(&(id.key() as u32));
        s.slots.get_mut(id.key()).and_then(Option::take)
    };
    drop(slot);
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
