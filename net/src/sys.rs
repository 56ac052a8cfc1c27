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
