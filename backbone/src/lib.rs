//! # backbone: cluster mode building blocks on NATS JetStream
//!
//! In cluster mode (DESIGN §10, issue 12) every accepted push is published to a JetStream
//! stream partitioned by scope key and answered only after JetStream's publish ack; each
//! partition is consumed by exactly one broker, which holds it by a lease in a JetStream KV
//! bucket. This crate holds those pieces; the broker does not use it yet (see
//! docs/architecture.md, "Cluster mode building blocks").
//!
//! # Layout
//! - [`partition`]: the stable scope -> partition hash and the rendezvous owner choice (pure).
//! - [`config`]: the `[backbone]` config table.
//! - [`region`]: federation of regions (stream layout, origin headers, msg ids; pure).
//! - [`lease`]: the lease state machine (sans-io: events and `now` in, actions out).
//! - [`thread`]: the backbone thread, the [`Backbone`] handle shards use, publish, consume and
//!   the lease shell.
//!
//! # Why `async-nats` on its own thread, and why a crate of its own
//! JetStream's publish acks, durable pull consumers, ack kinds, KV create/update by revision
//! and watches are a large protocol surface with reconnect and flow-control rules of their
//! own; `async-nats` is the NATS maintainers' client and covers all of it. It needs tokio, so
//! it runs on one dedicated thread with a current-thread tokio runtime; the monoio shards
//! reach it through channels and answers that any executor can await, and it reaches them
//! through crossbeam channels plus `net::wake::Notify`. A client of our own on monoio would
//! save that one thread hop per publish but would re-implement JetStream's API, which no
//! measurement here asks for. The crate is separate from `broker` so that tokio, rustls and the
//! NATS client stay out of the broker's graph (and its build) until cluster mode is wired in,
//! and so its NATS tests run alone with `cargo test -p backbone`.
//!
//! # Invariants
//! - No tokio type crosses the public API; every call on [`Backbone`] is safe from a monoio
//!   shard (none blocks except [`Publish::wait`], [`Backbone::flush`] and [`Backbone::close`]).
//! - Partition numbers and rendezvous scores are stable across processes (documented hashes).
#![forbid(unsafe_code)]

pub mod config;
pub mod lease;
pub mod partition;
pub mod region;
pub mod thread;

pub use config::Config;
pub use partition::{partition_of, BrokerId, Partition};
pub use thread::{
    Accepted, AckKind, AckToken, Backbone, BackboneError, Delivery, Event, Health, Publish,
    PublishError, Sink, Stats,
};
