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

    fn pair() -> (std::net::TcpStream, std::net::TcpStream) {
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
