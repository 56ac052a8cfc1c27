//! Ports for processes a test starts on fixed addresses (a role that restarts must come back
//! on the same port, so port 0 does not do).
//!
//! A port asked of the kernel with port 0 comes from the ephemeral range (32768-60999 by
//! default), where any outgoing connection of a concurrent test may take it between our check
//! and the role's bind ("Address already in use"). These come from below that range, spread by
//! process id so test binaries running at once rarely try the same ones, and are checked free
//! on every address before they are handed out.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

const FIRST: u32 = 20_000;
const SPAN: u32 = 12_000;

/// A TCP port free right now on every local address, outside the ephemeral range.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = (std::process::id() % 97) * 123;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + (start + n) % SPAN) as u16;
        if TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{}", FIRST + SPAN);
}
