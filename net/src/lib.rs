//! # net: the thin I/O shell shared by every role
//!
//! monoio runtimes (one per core, pinned, io_uring or epoll), `SO_REUSEPORT` listeners,
//! the file-descriptor limit, a small HTTP/1.1 server and client (hyper on monoio) for the
//! admin, API and control endpoints, a Prometheus text writer, and TLS server configs with
//! reloadable certificates (`tls`), and a compact TLS 1.3 record layer for connections past their handshake (`record`). No protocol logic.
//!
//! CONTRACT: edge, broker, control and loadtest use the signatures below; keep them.
// `deny`, not `forbid`: `sys` alone opts back in for its libc calls (each with `// SAFETY:`).
#![deny(unsafe_code)]

pub mod config;
pub mod framed;
pub mod http;
pub mod metrics;
pub mod record;
pub mod reload;
pub mod runtime;
pub mod secret;
pub mod state;
pub mod sys;
pub mod tls;
pub mod wake;
