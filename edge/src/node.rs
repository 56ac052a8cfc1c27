//! Node-wide types: what every shard of one edge process shares, and what shards say to each
//! other.
//!
//! [`Node`] is created once by [`crate::start`] and shared read-mostly (`Arc`): the config, the
//! token keys, per-shard counters (single writer each), and the node flags (stop, draining).
//! [`Msg`] travels between shards over one `rtrb` ring per ordered pair ([`rings`]), woken by
//! the destination's [`Notify`].
//!
//! Invariants: nothing here is mutated on a shard's data path except its own counters; a ring
//! carries batches by `Arc` (never copied).

use crate::config::Config;
use crate::metrics::{LinkMetrics, ShardMetrics};
use crate::session::Limits;
use net::reload::{Hooks, Live};
use net::wake::Notify;
use proto::id::RoomId;
use proto::link::{Batch, Interest};
use proto::token::KeySet;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A shard's index in the node (0 is the link shard).
pub type ShardIdx = usize;

/// Messages between shards (one `rtrb` ring per ordered pair).
#[derive(Debug)]
pub enum Msg {
    /// A batch to fan out (link shard -> viewer shards); shared, never copied.
    Batch(Arc<Batch>),
    /// Viewer shard -> link shard: this shard's encoding set for an interest changed.
    Interest {
        from: ShardIdx,
        interest: Interest,
        set: crate::index::EncodingSet,
    },
    /// Viewer shard -> link shard: this shard's viewer count per room.
    Counts {
        from: ShardIdx,
        counts: Vec<(RoomId, u32)>,
    },
    /// Viewer shard -> link shard: presence enters and exits, in order (crate::presence).
    Presence(Vec<proto::link::PresenceEvent>),
    /// Link shard -> viewer shards: fleet-wide online counts from the brokers.
    FleetCounts(Arc<Vec<(RoomId, u32)>>),
    /// Link shard -> every shard: this node's viewer count per room (heartbeat replies use it
    /// until, or without, the brokers' fleet-wide counts).
    NodeCounts(Arc<Vec<(RoomId, u32)>>),
    /// A datagram of a UDP session another shard owns (the session id names it): after a NAT
    /// rebinding the kernel's 4-tuple hash may deliver it to any shard's socket.
    Datagram {
        from: std::net::SocketAddr,
        bytes: Box<[u8]>,
    },
}

impl Msg {
    /// Messages the link shard's hub handles (the rest go to a shard core).
    pub fn is_for_hub(&self) -> bool {
        matches!(
            self,
            Msg::Interest { .. } | Msg::Counts { .. } | Msg::Presence(_)
        )
    }
}

/// State shared by every thread of the node.
pub struct Node {
    pub config: Config,
    pub limits: Limits,
    /// Token keys; SIGHUP and `POST /admin/reload` swap them (viewers already in stay).
    pub keys: Live<KeySet>,
    /// What a reload runs (the binary registers "config", TLS registers its certificates).
    pub hooks: Hooks,
    pub shards: usize,
    pub stop: AtomicBool,
    pub draining: AtomicBool,
    /// Set once the first broker link is up (`/readyz` answers 503 before).
    pub linked: AtomicBool,
    /// Per shard: wakes its inbox (ring traffic, drain, stop).
    pub notify: Vec<Arc<Notify>>,
    pub metrics: Vec<Arc<ShardMetrics>>,
    pub links: Mutex<Vec<Arc<LinkMetrics>>>,
    /// Client connections this process may hold: the fd limit minus a reserve for links,
    /// admin and control (or `conns_max` when lower). Viewers past it are refused.
    pub capacity: u64,
    pub started: Instant,
    /// Certificates and server config for WSS; `None` when WSS is off.
    pub tls: Option<crate::tls::Tls>,
    /// The UDP cookie and session-id secret: one per node (random at start), so any shard
    /// verifies a cookie another one minted.
    pub udp_key: proto::udp::CookieKey,
}

impl Node {
    /// A node for `config` (its shard count resolved), with no connections yet.
    pub fn new(config: Config, keys: KeySet, capacity: u64) -> Node {
        let shards = config.shard_count();
        let limits = Limits {
            frame_bytes_max: config.frame_bytes_max,
            auth_bytes_max: config.auth_bytes_max,
            ws_message_bytes_max: config.ws_message_bytes_max,
            ws_handshake_bytes_max: config.ws_handshake_bytes_max,
            ws_path: config.ws_path.clone(),
        };
        Node {
            limits,
            keys: Live::new(keys),
            hooks: Hooks::default(),
            shards,
            stop: Default::default(),
            draining: Default::default(),
            linked: Default::default(),
            notify: (0..shards).map(|_| Notify::new()).collect(),
            metrics: (0..shards)
                .map(|_| Arc::new(ShardMetrics::default()))
                .collect(),
            links: Mutex::new(Vec::new()),
            capacity,
            started: Instant::now(),
            tls: None,
            udp_key: proto::udp::CookieKey::new(&rand::random::<[u8; 32]>()),
            config,
        }
    }

    /// Open client connections across shards.
    pub fn connections(&self) -> u64 {
        self.metrics
            .iter()
            .map(|m| m.conns_tcp.get() + m.conns_ws.get() + m.conns_udp.get())
            .sum()
    }
}

/// One shard's producers (indexed by destination; None at its own index) and consumers.
pub type RingEnds = (Vec<Option<rtrb::Producer<Msg>>>, Vec<rtrb::Consumer<Msg>>);

/// Builds the ring matrix: `out[i]` holds shard i's producers and consumers.
pub fn rings(n: usize, entries: usize) -> Vec<RingEnds> {
    let mut out: Vec<RingEnds> = (0..n)
        .map(|_| ((0..n).map(|_| None).collect(), Vec::new()))
        .collect();
    for from in 0..n {
        for to in 0..n {
            if from != to {
                let (p, c) = rtrb::RingBuffer::new(entries);
                out[from].0[to] = Some(p);
                out[to].1.push(c);
            }
        }
    }
    out
}
