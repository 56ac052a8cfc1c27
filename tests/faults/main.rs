//! # The fault suite: real `barrage` processes on loopback, attacked the way a bad day would.
//!
//! Each test starts the roles it needs as child processes (`barrage control|broker|edge
//! --config FILE`, ports 0, addresses read from their first stdout line), does something
//! hostile from chosen loopback addresses (127.0.0.0/8 is all ours), and checks that the
//! role kept serving everyone else. Every wait is bounded; children are killed and reaped on
//! every path. The matrix of what is covered, with figures, is docs/reliability.md.
//!
//! - [`http`]: slowloris heads and stalled bodies on every HTTP port (control, broker, edge
//!   admin), per-address floods, a full public side that still lets health checks and edge
//!   heartbeats in.
//! - [`link`]: link impersonation (no key, wrong key, another node's key) and handshake-slot
//!   exhaustion.
//! - [`secrets`]: weak secrets refused off loopback, warned about on it.
//! - [`crash`]: kill -9 and SIGSTOP/SIGCONT of each role under load (the delivery model of
//!   [`cluster`] judges every run).
//! - [`network`]: partitions and random loss in a network namespace (nftables), delay and
//!   mid-batch resets through a proxy of ours ([`proxy`]).
//! - [`capacity`]: an edge under a small fd limit, a mass reconnect, the soak.
//! - [`memory`]: memory pressure through the bounded queues: slow viewers and a slow link.
//! - [`datadir`]: the broker's default data directory: one per node and port, found again after kill -9.

mod capacity;
mod cluster;
mod common;
mod crash;
mod datadir;
mod http;
mod link;
mod memory;
mod netns;
mod network;
#[path = "../common/ports.rs"]
mod ports;
mod proxy;
mod secrets;
