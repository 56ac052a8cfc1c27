//! Process and socket set-up. The one module allowed `unsafe`: each block is a plain libc
//! call on stack-owned memory, with a `// SAFETY:` comment.
#![allow(unsafe_code)]

use std::net::SocketAddr;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the new soft limit.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit that outlives the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let want = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `want` is a valid rlimit that outlives the call; the kernel only reads it.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
    }
    // `rlim_t` is u64 on Linux but not on every libc target.
    #[allow(clippy::unnecessary_cast)]
    Ok(lim.rlim_cur as u64)
}

/// A non-blocking std listener with `SO_REUSEADDR`, and `SO_REUSEPORT` when `reuse_port`,
/// backlog `backlog`. Convert with `monoio::net::TcpListener::from_std`.
pub fn listener(
    addr: SocketAddr,
    reuse_port: bool,
    backlog: i32,
) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    if reuse_port {
        sock.set_reuse_port(true)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(backlog)?;
    Ok(sock.into())
}

/// Resident set size of this process in bytes (from /proc/self/statm); 0 when unreadable.
pub fn rss_bytes() -> u64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf reads a constant; it has no memory arguments.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages.saturating_mul(if page > 0 { page as u64 } else { 4096 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nofile_limit_raises() {
        let n = raise_nofile_limit().unwrap();
        assert!(n >= 1024, "{n}");
    }

    #[test]
    fn reuse_port_listeners_share_a_port() {
        let a = listener("127.0.0.1:0".parse().unwrap(), true, 128).unwrap();
        let addr = a.local_addr().unwrap();
        let b = listener(addr, true, 128).unwrap();
        assert_eq!(b.local_addr().unwrap(), addr);
        // Without SO_REUSEPORT a second bind to a live listener fails.
        assert!(listener(addr, false, 128).is_err());
    }

    #[test]
    fn rss_is_nonzero() {
        assert!(rss_bytes() > 1024 * 1024);
    }
}

/// Shared buffers (`Bytes`) handed to one vectored write (`writev`, or io_uring's `WRITEV`)
/// without copying them: the iovec array points into the buffers, which this value owns for
/// as long as the runtime holds it.
pub struct IoVecs {
    bufs: Vec<bytes::Bytes>,
    iovecs: Vec<libc::iovec>,
}

impl IoVecs {
    /// Takes the buffers (empty ones are skipped: they add nothing to a write).
    pub fn new(bufs: Vec<bytes::Bytes>) -> IoVecs {
        let bufs: Vec<bytes::Bytes> = bufs.into_iter().filter(|b| !b.is_empty()).collect();
        let iovecs = bufs
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        IoVecs { bufs, iovecs }
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.bufs.iter().map(|b| b.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.bufs.is_empty()
    }

    /// Gives the buffers back.
    pub fn into_inner(self) -> Vec<bytes::Bytes> {
        self.bufs
    }
}

/// Writes every byte of `bufs` with vectored writes, resuming a partial write at the exact
/// byte it stopped (the written buffers are dropped, the first unfinished one is sliced: no
/// copy). Returns the bytes written or the first error.
///
/// Not monoio's `write_vectored_all`: its resume (monoio 0.2.4, `IoVecMeta::consume`) shortens
/// a partly written iovec without advancing its base, so the start of that buffer is sent
/// again, and hands the kernel the iovec count of the whole array from the advanced offset,
/// reading past its end: a slow reader got a corrupt stream, and the writer `EFAULT` or
/// whatever memory those stray iovecs pointed at (tests/faults/memory.rs found it).
pub async fn write_all_bufs<W: monoio::io::AsyncWriteRent>(
    w: &mut W,
    mut bufs: Vec<bytes::Bytes>,
) -> std::io::Result<usize> {
    bufs.retain(|b| !b.is_empty());
    let mut written = 0;
    while !bufs.is_empty() {
        let (res, v) = w.writev(IoVecs::new(bufs)).await;
        bufs = v.into_inner();
        match res {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                written += n;
                advance(&mut bufs, n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

/// Drops the first `n` bytes of `bufs` (whole buffers, then a slice of the next).
fn advance(bufs: &mut Vec<bytes::Bytes>, mut n: usize) {
    let mut done = 0;
    for b in bufs.iter_mut() {
        if n >= b.len() {
            n -= b.len();
            done += 1;
        } else {
            *b = b.slice(n..);
            break;
        }
    }
    bufs.drain(..done);
}

// SAFETY: each iovec points at the bytes of the `Bytes` at the same index, which `self` owns
// and never mutates, so the pointers stay valid and the memory stays readable for as long as
// the runtime holds `self` (moving `IoVecs` moves the two `Vec` headers, not their heap data,
// and a `Bytes`' data never moves). `iovecs` is built once and never changed, so the array
// pointer and its length are stable too. The kernel only reads through them (a write).
unsafe impl monoio::buf::IoVecBuf for IoVecs {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        self.iovecs.as_ptr()
    }

    fn read_iovec_len(&self) -> usize {
        self.iovecs.len()
    }
}

#[cfg(test)]
mod iovec_tests {
    use super::*;
    use monoio::io::{AsyncReadRentExt, AsyncWriteRentExt};

    #[test]
    fn advance_drops_whole_buffers_then_slices() {
        let mut b: Vec<bytes::Bytes> = ["ab", "cde", "f"]
            .iter()
            .map(|s| bytes::Bytes::from_static(s.as_bytes()))
            .collect();
        advance(&mut b, 3);
        assert_eq!(b, vec![&b"de"[..], &b"f"[..]]);
        advance(&mut b, 0);
        assert_eq!(b.len(), 2);
        advance(&mut b, 3);
        assert!(b.is_empty());
    }

    /// Hundreds of distinct buffers written to a reader with a small receive buffer that reads
    /// slowly, so nearly every writev is partial and resumed mid-buffer and mid-array: the
    /// reader gets exactly the concatenation, under both drivers.
    #[test]
    fn partial_vectored_writes_resume_at_the_exact_byte() {
        let mut drivers = vec![crate::runtime::Driver::Legacy];
        if monoio::utils::detect_uring() {
            drivers.push(crate::runtime::Driver::Uring);
        }
        for d in drivers {
            crate::runtime::block_on(d, async {
                let l = monoio::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let addr = l.local_addr().unwrap();
                let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                    .unwrap();
                sock.set_recv_buffer_size(4096).unwrap();
                sock.connect(&addr.into()).unwrap();
                let slow: std::net::TcpStream = sock.into();
                let (mut s, _) = l.accept().await.unwrap();
                {
                    use std::os::fd::AsRawFd;
                    let size: libc::c_int = 4096;
                    // SAFETY: setsockopt on our own open socket with a valid c_int option.
                    let r = unsafe {
                        libc::setsockopt(
                            s.as_raw_fd(),
                            libc::SOL_SOCKET,
                            libc::SO_SNDBUF,
                            &size as *const libc::c_int as *const libc::c_void,
                            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                        )
                    };
                    assert_eq!(r, 0);
                }
                // 300 buffers of 1..=1500 bytes, each byte a function of its position.
                let mut want = Vec::new();
                let bufs: Vec<bytes::Bytes> = (0..300usize)
                    .map(|i| {
                        let b: Vec<u8> = (0..1 + (i * 7919) % 1500)
                            .map(|j| ((want.len() + j) % 251) as u8)
                            .collect();
                        want.extend_from_slice(&b);
                        bytes::Bytes::from(b)
                    })
                    .collect();
                let total = want.len();
                let reader = std::thread::spawn(move || {
                    use std::io::Read;
                    let mut slow = slow;
                    let mut got = Vec::new();
                    let mut buf = [0u8; 1000];
                    while got.len() < total {
                        let n = slow.read(&mut buf).unwrap();
                        assert!(n > 0, "closed early");
                        got.extend_from_slice(&buf[..n]);
                        std::thread::sleep(std::time::Duration::from_micros(200));
                    }
                    got
                });
                let n = write_all_bufs(&mut s, bufs).await.unwrap();
                assert_eq!(n, total);
                let got = reader.join().unwrap();
                assert!(got == want, "the stream differs from what was written");
            });
        }
    }

    /// Several shared buffers in one vectored write arrive in order and unchanged, under both
    /// drivers; the buffers come back unchanged (no copy was made of them).
    #[test]
    fn vectored_write_of_shared_buffers() {
        let mut drivers = vec![crate::runtime::Driver::Legacy];
        if monoio::utils::detect_uring() {
            drivers.push(crate::runtime::Driver::Uring);
        }
        for d in drivers {
            crate::runtime::block_on(d, async {
                let l = monoio::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let addr = l.local_addr().unwrap();
                let mut c = monoio::net::TcpStream::connect(addr).await.unwrap();
                let (mut s, _) = l.accept().await.unwrap();
                let big = bytes::Bytes::from(vec![7u8; 300_000]);
                let bufs = vec![
                    bytes::Bytes::from_static(b"head"),
                    bytes::Bytes::new(),
                    big.clone(),
                    bytes::Bytes::from_static(b"tail"),
                ];
                let v = IoVecs::new(bufs);
                assert_eq!(v.len(), 300_008);
                let reader = monoio::spawn(async move {
                    let (r, got) = s.read_exact(vec![0u8; 300_008]).await;
                    r.unwrap();
                    got
                });
                // 300 KB does not fit the socket buffer at once: a partial writev is resumed.
                let (r, v) = c.write_vectored_all(v).await;
                assert_eq!(r.unwrap(), 300_008);
                let got = reader.await;
                assert_eq!(&got[..4], b"head");
                assert!(got[4..300_004].iter().all(|b| *b == 7));
                assert_eq!(&got[300_004..], b"tail");
                assert_eq!(v.into_inner()[1].as_ptr(), big.as_ptr());
            });
        }
    }
}

/// Datagrams handed to the kernel per `sendmmsg` call at most.
pub const SEND_DATAGRAMS_MAX: usize = 64;

/// Sends each `(to, bytes)` as one datagram on the non-blocking UDP socket `fd` with one
/// `sendmmsg` (up to [`SEND_DATAGRAMS_MAX`] of them): one syscall for a shard's fan-out burst
/// instead of one per viewer. Returns how many the kernel took (at least one), or the error
/// of the first datagram (`WouldBlock` when the socket buffer is full).
pub fn send_datagrams(
    fd: std::os::fd::RawFd,
    out: &[(SocketAddr, bytes::Bytes)],
) -> std::io::Result<usize> {
    let n = out.len().min(SEND_DATAGRAMS_MAX);
    if n == 0 {
        return Ok(0);
    }
    let addrs: Vec<socket2::SockAddr> = out[..n]
        .iter()
        .map(|(a, _)| socket2::SockAddr::from(*a))
        .collect();
    let mut iovs: Vec<libc::iovec> = out[..n]
        .iter()
        .map(|(_, b)| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: an all-zero mmsghdr is a valid value (null pointers, zero lengths).
    let mut msgs: Vec<libc::mmsghdr> = (0..n).map(|_| unsafe { std::mem::zeroed() }).collect();
    for ((m, a), iov) in msgs.iter_mut().zip(&addrs).zip(iovs.iter_mut()) {
        let h = &mut m.msg_hdr;
        h.msg_name = a.as_ptr() as *mut libc::c_void;
        h.msg_namelen = a.len();
        h.msg_iov = iov;
        h.msg_iovlen = 1;
    }
    // SAFETY: `msgs` holds `n` initialised headers whose name and iovec pointers point into
    // `addrs`, `iovs` and the `Bytes` of `out`, all alive and unmoved until the call returns;
    // the kernel only reads them (and writes `msg_len`).
    let r = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), n as libc::c_uint, 0) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// Readiness of one registration, as [`Poller::wait`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ready {
    /// The registration's key (what [`Poller::add`] was given).
    pub key: u64,
    /// Readable, or the peer hung up or the socket has an error (a read says which).
    pub read: bool,
    /// Writable (only while write interest is on), or an error.
    pub write: bool,
}

/// Readiness events taken per [`Poller::wait`] call at most.
pub const POLL_EVENTS_MAX: usize = 256;

/// One epoll instance of level-triggered socket registrations, each with a `u64` key.
/// Edge shards drive their plain client sockets with it: readiness instead of one in-flight
/// read per connection, so an idle connection holds no task and no read buffer.
pub struct Poller {
    fd: std::os::fd::OwnedFd,
    events: Vec<libc::epoll_event>,
}

impl Poller {
    pub fn new() -> std::io::Result<Poller> {
        use std::os::fd::FromRawFd;
        // SAFETY: epoll_create1 has no memory arguments.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Poller {
            // SAFETY: `fd` is a new descriptor that nothing else owns.
            fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) },
            events: Vec::with_capacity(POLL_EVENTS_MAX),
        })
    }

    /// A second descriptor of the same epoll instance: readable while any registration is
    /// ready, so a runtime can wait for it like a socket (monoio: a `UnixStream` over it).
    pub fn try_clone_fd(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        self.fd.try_clone()
    }

    fn ctl(
        &self,
        op: libc::c_int,
        fd: std::os::fd::RawFd,
        key: u64,
        write: bool,
    ) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP) as u32
                | if write { libc::EPOLLOUT as u32 } else { 0 },
            u64: key,
        };
        // SAFETY: `ev` is a valid epoll_event on the stack that outlives the call (the kernel
        // copies it); `fd` is checked by the kernel (EBADF), no memory is passed for it.
        if unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Registers `fd` under `key`, for reads (and writes when `write`).
    pub fn add(&self, fd: std::os::fd::RawFd, key: u64, write: bool) -> std::io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, key, write)
    }

    /// Turns write interest of a registered `fd` on or off.
    pub fn modify(&self, fd: std::os::fd::RawFd, key: u64, write: bool) -> std::io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, key, write)
    }

    /// Removes `fd` (closing it removes it too; this is for a socket that lives on).
    pub fn delete(&self, fd: std::os::fd::RawFd) -> std::io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, false)
    }

    /// Appends what is ready now (up to [`POLL_EVENTS_MAX`]) to `out`, without waiting;
    /// returns how many.
    pub fn wait(&mut self, out: &mut Vec<Ready>) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd;
        self.events.clear();
        // SAFETY: `events` has capacity for POLL_EVENTS_MAX entries, which the kernel writes at
        // most; the length is set to what it reports, all of which it initialised.
        let n = unsafe {
            let n = libc::epoll_wait(
                self.fd.as_raw_fd(),
                self.events.as_mut_ptr(),
                POLL_EVENTS_MAX as libc::c_int,
                0,
            );
            if n < 0 {
                let e = std::io::Error::last_os_error();
                return match e.kind() {
                    std::io::ErrorKind::Interrupted => Ok(0),
                    _ => Err(e),
                };
            }
            self.events.set_len(n as usize);
            n as usize
        };
        let (inp, out_mask, bad) = (
            (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            libc::EPOLLOUT as u32,
            (libc::EPOLLERR | libc::EPOLLHUP) as u32,
        );
        out.extend(self.events.iter().map(|e| {
            let flags = e.events;
            Ready {
                key: e.u64,
                read: flags & (inp | bad) != 0,
                write: flags & (out_mask | bad) != 0,
            }
        }));
        Ok(n)
    }
}

/// A non-blocking `read` of `fd` into `buf`.
pub fn read(fd: std::os::fd::RawFd, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: `buf` is valid, writable memory of `buf.len()` bytes for the whole call.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// One non-blocking `writev` of the shared buffers `bufs`, skipping the first `skip` bytes
/// (what an earlier partial write took); at most [`WRITEV_BUFS_MAX`] buffers per call.
/// Returns the bytes the kernel took. No copy is made of the buffers.
pub fn writev(
    fd: std::os::fd::RawFd,
    bufs: &[bytes::Bytes],
    mut skip: usize,
) -> std::io::Result<usize> {
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; WRITEV_BUFS_MAX];
    let mut n = 0;
    for b in bufs {
        if skip >= b.len() {
            skip -= b.len();
            continue;
        }
        if n == WRITEV_BUFS_MAX {
            break;
        }
        let rest = &b[skip..];
        skip = 0;
        iov[n] = libc::iovec {
            iov_base: rest.as_ptr() as *mut libc::c_void,
            iov_len: rest.len(),
        };
        n += 1;
    }
    if n == 0 {
        return Ok(0);
    }
    // SAFETY: the first `n` iovecs point into the `Bytes` of `bufs`, borrowed (alive and
    // unchanged) for the whole call; the kernel only reads through them.
    let r = unsafe { libc::writev(fd, iov.as_ptr(), n as libc::c_int) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// Buffers per [`writev`] call at most (far below `IOV_MAX`, 1024).
pub const WRITEV_BUFS_MAX: usize = 64;

#[cfg(test)]
mod poller_tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;

    /// A connected loopback pair: (client, non-blocking server side).
    pub(super) fn pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        s.set_nonblocking(true).unwrap();
        (c, s)
    }

    /// Readiness by key, reads until WouldBlock, write interest on and off, EOF as readable.
    #[test]
    fn readiness_reads_and_writes() {
        let mut p = Poller::new().unwrap();
        let (mut c, s) = pair();
        p.add(s.as_raw_fd(), 42, false).unwrap();
        let mut out = Vec::new();
        assert_eq!(p.wait(&mut out).unwrap(), 0, "nothing sent yet");
        c.write_all(b"hello").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while p.wait(&mut out).unwrap() == 0 {
            assert!(std::time::Instant::now() < deadline);
        }
        assert_eq!(
            out[0],
            Ready {
                key: 42,
                read: true,
                write: false
            }
        );
        let mut buf = [0u8; 16];
        assert_eq!(read(s.as_raw_fd(), &mut buf).unwrap(), 5);
        assert_eq!(&buf[..5], b"hello");
        let e = read(s.as_raw_fd(), &mut buf).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        out.clear();
        assert_eq!(
            p.wait(&mut out).unwrap(),
            0,
            "level-triggered: drained is quiet"
        );
        p.modify(s.as_raw_fd(), 42, true).unwrap();
        assert_eq!(p.wait(&mut out).unwrap(), 1);
        assert!(out[0].write && !out[0].read);
        p.modify(s.as_raw_fd(), 42, false).unwrap();
        out.clear();
        assert_eq!(p.wait(&mut out).unwrap(), 0);
        drop(c);
        while p.wait(&mut out).unwrap() == 0 {
            assert!(std::time::Instant::now() < deadline);
        }
        assert!(out[0].read);
        assert_eq!(read(s.as_raw_fd(), &mut buf).unwrap(), 0, "EOF");
        p.delete(s.as_raw_fd()).unwrap();
    }

    /// A partial write resumes at the byte it stopped at: each call writes the buffers from
    /// `skip` on, across buffer boundaries, in order.
    #[test]
    fn writev_skips_what_was_written() {
        let (mut c, s) = pair();
        let bufs = [
            bytes::Bytes::from_static(b"ab"),
            bytes::Bytes::from_static(b"cde"),
            bytes::Bytes::from_static(b"f"),
        ];
        let mut sent = 0;
        for skip in [0usize, 1, 2, 4, 5, 6] {
            sent += writev(s.as_raw_fd(), &bufs, skip).unwrap();
        }
        assert_eq!(sent, 6 + 5 + 4 + 2 + 1);
        let mut got = vec![0u8; sent];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"abcdefbcdefcdefeff");
    }
}

/// The std socket of a monoio stream that nothing else shares (a just-accepted one): it
/// leaves the runtime's driver and is the caller's to drive (edge shards: [`Poller`]).
///
/// # Panics
/// When the stream is shared (split halves alive): monoio refuses to give up the fd.
pub fn into_std(stream: monoio::net::TcpStream) -> std::net::TcpStream {
    use std::os::fd::{FromRawFd, IntoRawFd};
    let fd = stream.into_raw_fd();
    // SAFETY: `into_raw_fd` gives up monoio's only reference to `fd` (deregistered from its
    // driver, not closed), so the std stream is its one owner from here on.
    unsafe { std::net::TcpStream::from_raw_fd(fd) }
}

/// `user_data` of the ring's own cancel requests (never a caller's token).
const RING_CANCEL_TOKEN: u64 = u64::MAX;
/// Completion queue entries per submission queue entry of a [`WriteRing`].
const RING_CQ_PER_SQ: u32 = 16;
/// Overflow flushes per [`WriteRing::reap`] at most (each moves a queue's worth).
const RING_REAP_ROUNDS_MAX: usize = 64;
/// Rounds of waiting for the ring's writes when it is dropped before their buffers are leaked
/// instead (never on a live path: a write to a non-blocking socket completes at once).
const RING_DROP_WAITS_MAX: usize = 100;

/// One vectored write the ring holds: the buffers and the iovec array pointing into them,
/// owned here until the kernel's completion is reaped.
struct Flight {
    bufs: Vec<bytes::Bytes>,
    /// Points into `bufs` from `skip` on; a boxed slice, so its address survives moves.
    /// Never read here: it is held for the kernel, which reads it.
    _iov: Box<[libc::iovec]>,
    /// Bytes of `bufs` already written before this write (not part of it).
    skip: usize,
    /// Set when the caller let go of the connection: the socket stays open (its number
    /// cannot be reused) until the completion, then closes with this.
    orphan_fd: Option<std::os::fd::OwnedFd>,
}

/// A finished ring write, as [`WriteRing::reap`] hands it back.
#[derive(Debug)]
pub struct RingDone {
    /// The caller's token given to [`WriteRing::push`].
    pub token: u64,
    /// The buffers of the write, all of them (the caller resumes a partial write from
    /// `skip + n`, exactly like [`writev`]'s resume).
    pub bufs: Vec<bytes::Bytes>,
    /// Bytes of `bufs` written before this write.
    pub skip: usize,
    /// Bytes this write took, or the error (`WouldBlock` when the socket buffer was full).
    pub result: std::io::Result<usize>,
}

/// An io_uring instance of one shard for its plain sockets' writes: one `WRITEV` SQE per
/// write, many submitted with one `io_uring_enter`, the buffers (shared `Bytes`, no copy)
/// held here until each completion is reaped. Its descriptor is readable while completions
/// wait, so the shard's [`Poller`] can watch it like a socket.
///
/// The sockets must be non-blocking: then a write completes as soon as it is submitted (with
/// what the socket buffer took, or `WouldBlock`), the way a `writev` call would.
pub struct WriteRing {
    ring: io_uring::IoUring,
    /// Writes in flight (pushed, submitted or not, completion not reaped) by token.
    flights: std::collections::HashMap<u64, Flight>,
    /// SQEs pushed since the last submit.
    unsubmitted: usize,
    /// Completions of orphaned writes reaped (their buffers and sockets freed).
    orphans_freed: u64,
}

impl WriteRing {
    /// A ring of `entries` submission slots (a write more than that per round submits early).
    pub fn new(entries: u32) -> std::io::Result<WriteRing> {
        // Not COOP_TASKRUN: a completion that comes later (a write the kernel parked on a
        // full socket) must reach the queue without our next `io_uring_enter`, so that the
        // ring's fd turns readable for the poller.
        // The completion queue holds many rounds of submissions (writes parked on slow
        // readers complete whenever); past it, completions overflow and `reap` fetches them.
        let ring = io_uring::IoUring::builder()
            .setup_single_issuer()
            .setup_cqsize(entries.saturating_mul(RING_CQ_PER_SQ))
            .build(entries)
            .or_else(|_| io_uring::IoUring::new(entries))?;
        Ok(WriteRing {
            ring,
            flights: std::collections::HashMap::new(),
            unsubmitted: 0,
            orphans_freed: 0,
        })
    }

    /// The ring's descriptor, to be polled for readability (completions waiting).
    pub fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.ring.as_raw_fd()
    }

    /// Whether a write under `token` is in flight.
    pub fn in_flight(&self, token: u64) -> bool {
        self.flights.contains_key(&token)
    }

    /// Writes in flight, orphans included.
    pub fn flights(&self) -> usize {
        self.flights.len()
    }

    /// Orphaned writes whose completion came and whose buffers and socket were freed.
    pub fn orphans_freed(&self) -> u64 {
        self.orphans_freed
    }

    /// Queues one `WRITEV` of `bufs` from byte `skip` on (at most [`WRITEV_BUFS_MAX`]
    /// buffers; the rest is a partial write) to the non-blocking socket `fd`, under `token`.
    /// It goes to the kernel at the next [`submit`](Self::submit) (or now, when the queue is
    /// full). The caller keeps `fd` open until the completion is reaped or hands it over with
    /// [`orphan`](Self::orphan). Gives `bufs` back when `token` already has a write in flight
    /// or is the ring's own, or the ring cannot take the entry.
    pub fn push(
        &mut self,
        fd: std::os::fd::RawFd,
        token: u64,
        bufs: Vec<bytes::Bytes>,
        skip: usize,
    ) -> Result<(), Vec<bytes::Bytes>> {
        if token == RING_CANCEL_TOKEN || self.flights.contains_key(&token) {
            return Err(bufs);
        }
        let mut rest = skip;
        let mut iov = Vec::with_capacity(bufs.len().min(WRITEV_BUFS_MAX));
        for b in &bufs {
            if rest >= b.len() {
                rest -= b.len();
                continue;
            }
            if iov.len() == WRITEV_BUFS_MAX {
                break;
            }
            let part = &b[rest..];
            rest = 0;
            iov.push(libc::iovec {
                iov_base: part.as_ptr() as *mut libc::c_void,
                iov_len: part.len(),
            });
        }
        let iov = iov.into_boxed_slice();
        let sqe =
            io_uring::opcode::Writev::new(io_uring::types::Fd(fd), iov.as_ptr(), iov.len() as u32)
                .build()
                .user_data(token);
        // SAFETY: the SQE points at `iov` (a boxed slice: its heap address does not change
        // when the box moves into `flights`), whose entries point into the `Bytes` of `bufs`;
        // both are stored in `flights` under `token` right below and leave it only in `reap`,
        // after the kernel posted this write's completion, or in `drop`, which waits for every
        // completion first (or leaks what it could not wait for). `Bytes` data never moves and
        // is never written through a shared handle, and the kernel only reads it. `fd` is the
        // caller's open socket, kept open (by the caller or by `orphan`) until the completion.
        if !self.push_sqe(&sqe) {
            return Err(bufs);
        }
        self.flights.insert(
            token,
            Flight {
                bufs,
                _iov: iov,
                skip,
                orphan_fd: None,
            },
        );
        Ok(())
    }

    /// Pushes one SQE, submitting first when the queue is full; false if it cannot.
    fn push_sqe(&mut self, sqe: &io_uring::squeue::Entry) -> bool {
        for _ in 0..2 {
            // SAFETY: see the callers: what the entry points at lives until its completion.
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                self.unsubmitted += 1;
                return true;
            }
            if self.submit().is_err() {
                return false;
            }
        }
        false
    }

    /// Hands the ring the socket of a connection the caller is done with while its write is
    /// in flight: the socket stays open and the buffers alive until the completion, which is
    /// then dropped (counted in [`orphans_freed`](Self::orphans_freed)) with them. The write
    /// is also cancelled, should the kernel have parked it. Gives `fd` back when `token` has
    /// no write in flight (the caller closes it then).
    pub fn orphan(
        &mut self,
        token: u64,
        fd: std::os::fd::OwnedFd,
    ) -> Result<(), std::os::fd::OwnedFd> {
        let Some(f) = self.flights.get_mut(&token) else {
            return Err(fd);
        };
        f.orphan_fd = Some(fd);
        let cancel = io_uring::opcode::AsyncCancel::new(token)
            .build()
            .user_data(RING_CANCEL_TOKEN);
        // SAFETY: a cancel request points at no memory (the target is named by user_data).
        let _ = self.push_sqe(&cancel);
        Ok(())
    }

    /// Submits what was pushed since the last submit (one `io_uring_enter`); returns how many.
    pub fn submit(&mut self) -> std::io::Result<usize> {
        if self.unsubmitted == 0 {
            return Ok(0);
        }
        loop {
            match self.ring.submit() {
                Ok(n) => {
                    self.unsubmitted = self.unsubmitted.saturating_sub(n);
                    return Ok(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Moves the completions waiting now to `out` (orphans' are freed here, not handed out).
    /// No system call, unless completions overflowed the queue: then one `io_uring_enter`
    /// moves them in (an overflow flag that stays up keeps the ring's fd readable).
    pub fn reap(&mut self, out: &mut Vec<RingDone>) {
        for _ in 0..RING_REAP_ROUNDS_MAX {
            self.reap_queue(out);
            if !self.ring.submission().cq_overflow() {
                return;
            }
            // `submit` sets GETEVENTS while the overflow flag is up, which flushes them.
            match self.ring.submit() {
                Ok(n) => self.unsubmitted = self.unsubmitted.saturating_sub(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    fn reap_queue(&mut self, out: &mut Vec<RingDone>) {
        let mut cq = self.ring.completion();
        cq.sync();
        for c in &mut cq {
            let token = c.user_data();
            if token == RING_CANCEL_TOKEN {
                continue;
            }
            let Some(f) = self.flights.remove(&token) else {
                continue;
            };
            if f.orphan_fd.is_some() {
                self.orphans_freed += 1;
                continue;
            }
            let r = c.result();
            out.push(RingDone {
                token,
                bufs: f.bufs,
                skip: f.skip,
                result: if r < 0 {
                    Err(std::io::Error::from_raw_os_error(-r))
                } else {
                    Ok(r as usize)
                },
            });
        }
    }
}

impl Drop for WriteRing {
    /// Waits for the completion of every write in flight before the buffers go; what does
    /// not complete in time is leaked, never freed under the kernel.
    fn drop(&mut self) {
        let mut done = Vec::new();
        for _ in 0..RING_DROP_WAITS_MAX {
            done.clear();
            self.reap(&mut done);
            if self.flights.is_empty() {
                return;
            }
            let _ = self.submit();
            let _ = self.ring.submitter().submit_with_args(
                1,
                &io_uring::types::SubmitArgs::new()
                    .timespec(&io_uring::types::Timespec::new().nsec(10_000_000)),
            );
        }
        for (_, f) in self.flights.drain() {
            std::mem::forget(f);
        }
    }
}

#[cfg(test)]
mod ring_tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;

    use super::poller_tests::pair;

    fn reap_one(r: &mut WriteRing) -> RingDone {
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while out.is_empty() {
            assert!(std::time::Instant::now() < deadline, "no completion");
            r.submit().unwrap();
            r.reap(&mut out);
        }
        out.pop().unwrap()
    }

    /// Many sockets written in one submit; a write resumed from `skip` sends the rest only.
    #[test]
    fn writes_of_many_sockets_in_one_submit() {
        let mut r = WriteRing::new(32).unwrap();
        let pairs: Vec<_> = (0..20).map(|_| pair()).collect();
        for (i, (_, s)) in pairs.iter().enumerate() {
            let bufs = vec![
                bytes::Bytes::from(format!("conn{i:02}-")),
                bytes::Bytes::from_static(b"tail"),
            ];
            r.push(s.as_raw_fd(), i as u64, bufs, 2).unwrap();
        }
        assert!(r.push(pairs[0].1.as_raw_fd(), 0, Vec::new(), 0).is_err());
        let mut out = Vec::new();
        assert_eq!(
            r.submit().unwrap(),
            20,
            "one io_uring_enter for all of them"
        );
        assert_eq!(r.submit().unwrap(), 0);
        r.reap(&mut out);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while out.len() < 20 {
            assert!(std::time::Instant::now() < deadline, "completions missing");
            r.reap(&mut out);
        }
        assert_eq!(r.flights(), 0);
        for d in &out {
            assert_eq!(d.result.as_ref().unwrap(), &9);
        }
        for (i, (mut c, _)) in pairs.into_iter().enumerate() {
            let mut got = [0u8; 9];
            c.read_exact(&mut got).unwrap();
            assert_eq!(&got, format!("nn{i:02}-tail").as_bytes());
        }
    }

    /// More writes than the completion queue holds, submitted without reaping in between
    /// (a big fan-out round): the overflowed completions are fetched, none is lost.
    #[test]
    fn completions_past_the_queue_are_not_lost() {
        let mut r = WriteRing::new(2).unwrap();
        let pairs: Vec<_> = (0..100).map(|_| pair()).collect();
        for (i, (_, s)) in pairs.iter().enumerate() {
            r.push(
                s.as_raw_fd(),
                i as u64,
                vec![bytes::Bytes::from_static(b"x")],
                0,
            )
            .unwrap();
        }
        r.submit().unwrap();
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while out.len() < 100 {
            assert!(std::time::Instant::now() < deadline, "{} of 100", out.len());
            r.reap(&mut out);
        }
        assert_eq!(r.flights(), 0);
    }

    /// A write larger than the socket buffer completes short; the rest, pushed again to a
    /// socket that stays full, is orphaned (before it was even submitted): the ring keeps the
    /// socket open until the write's completion (it is cancelled if the kernel parked it),
    /// then frees it and the buffers, and does not hand the completion out.
    #[test]
    fn short_write_then_orphan() {
        let mut r = WriteRing::new(8).unwrap();
        let (mut c, s) = pair();
        let big = bytes::Bytes::from(vec![1u8; 8 << 20]);
        r.push(s.as_raw_fd(), 1, vec![big.clone()], 0).unwrap();
        let d = reap_one(&mut r);
        let n = *d.result.as_ref().unwrap();
        assert!(
            n > 0 && n < big.len(),
            "8 MiB fit a loopback socket buffer? {n}"
        );
        assert_eq!(d.skip, 0);
        r.push(s.as_raw_fd(), 1, d.bufs, n).unwrap();
        let fd = std::os::fd::OwnedFd::from(s);
        let raw = fd.as_raw_fd();
        assert!(r.orphan(1, fd).is_ok());
        // SAFETY: fcntl F_GETFD on a descriptor number; no memory is passed.
        assert!(
            unsafe { libc::fcntl(raw, libc::F_GETFD) } >= 0,
            "closed early"
        );
        assert!(
            r.orphan(2, std::os::fd::OwnedFd::from(pair().1)).is_err(),
            "no such write"
        );
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while r.flights() > 0 {
            assert!(std::time::Instant::now() < deadline, "orphan not completed");
            r.submit().unwrap();
            r.reap(&mut out);
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(out.is_empty(), "an orphan's completion is not handed out");
        assert_eq!(r.orphans_freed(), 1);
        // The socket is closed now: the reader reaches EOF after what was written.
        let mut buf = vec![0u8; 1 << 16];
        c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        while c.read(&mut buf).unwrap() > 0 {}
    }
}
