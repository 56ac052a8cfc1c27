//! Process and socket set-up.

use std::net::SocketAddr;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the new soft limit.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    todo!()
}

/// A non-blocking std listener with `SO_REUSEADDR`, and `SO_REUSEPORT` when `reuse_port`,
/// backlog `backlog`. Convert with `monoio::net::TcpListener::from_std`.
pub fn listener(addr: SocketAddr, reuse_port: bool, backlog: i32) -> std::io::Result<std::net::TcpListener> {
    todo!()
}

/// Resident set size of this process in bytes (from /proc/self/statm).
pub fn rss_bytes() -> u64 {
    todo!()
}
