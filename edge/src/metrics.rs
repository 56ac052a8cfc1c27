//! Counters. Each shard owns one [`ShardMetrics`] and is its only writer; the admin thread only
//! reads. A single writer means an increment is a relaxed load and store (no locked RMW on the
//! hot path); readers may see a value a moment old, which is all Prometheus needs.

use crate::session::{AuthFail, CloseReason};
use crate::tls::TlsFail;
use net::metrics::Histogram;
use std::sync::atomic::{AtomicU64, Ordering};

/// A single-writer counter or gauge.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }
    #[inline]
    pub fn dec(&self) {
        self.0.store(
            self.0.load(Ordering::Relaxed).saturating_sub(1),
            Ordering::Relaxed,
        );
    }
    #[inline]
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Why a batch was not delivered to a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The connection's send queue was over `send_queue_bytes_max` (low priority only).
    QueueFull,
    /// The cross-shard ring was full.
    RingFull,
    /// A scope the edge cannot route yet (user/device).
    Unroutable,
    /// A shard's outbox to other shards was at `OUTBOX_MSGS_MAX` (counts reports first).
    Outbox,
}

impl DropReason {
    pub const ALL: [DropReason; 4] = [
        DropReason::QueueFull,
        DropReason::RingFull,
        DropReason::Unroutable,
        DropReason::Outbox,
    ];
    pub fn label(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::RingFull => "ring_full",
            DropReason::Unroutable => "unroutable",
            DropReason::Outbox => "outbox",
        }
    }
    fn index(self) -> usize {
        self as usize
    }
}

/// One shard's counters.
#[derive(Debug, Default)]
pub struct ShardMetrics {
    pub conns_tcp: Counter,
    pub conns_ws: Counter,
    pub accepted: Counter,
    pub auth_ok: Counter,
    pub auth_failed: [Counter; AuthFail::ALL.len()],
    pub closes: [Counter; CloseReason::ALL.len()],
    pub heartbeats: Counter,
    pub acks: Counter,
    /// op 1000 from connections that did not send `"ack": true` (ignored).
    pub acks_not_opted_in: Counter,
    /// op 1000 past the connection's ACK rate (dropped, crate::acks).
    pub acks_rate_limited: Counter,
    /// Batches this shard fanned out.
    pub batches_in: Counter,
    /// Bytes of batches received (once per batch per shard).
    pub batch_bytes_in: Counter,
    /// Sends queued to connections (one per batch per viewer).
    pub sends: Counter,
    /// Bytes written to clients.
    pub bytes_out: Counter,
    /// Writes to clients (one `writev` of every queued buffer each): `sends / writes` is how
    /// many batches a write carries, which is how a hot room degrades.
    pub writes: Counter,
    /// Of `writes`, those that went to the kernel as `WRITEV` SQEs on the shard's ring
    /// (`ring_writes`, io_uring driver only), not as `writev` calls.
    pub ring_writes: Counter,
    /// `io_uring_enter` calls that submitted ring writes: `ring_writes / ring_submits` is
    /// writes per system call.
    pub ring_submits: Counter,
    /// Ring writes that failed with an error other than a full socket buffer (each closed
    /// its connection, counted as an I/O close too).
    pub ring_write_errors: Counter,
    /// Ring writes whose connection closed while they were in flight: their buffers and
    /// socket were freed when the completion came.
    pub ring_orphans_freed: Counter,
    pub drops: [Counter; DropReason::ALL.len()],
    pub rooms: Counter,
    pub pending_handshakes: Counter,
    /// `accept()` failures (EMFILE, ENFILE, ENOBUFS...): the shard backs off accepting.
    pub accept_errors: Counter,
    /// One batch's fan-out on this shard: from the shard taking it to every viewer's bytes
    /// queued, µs. Writes follow at once on the same thread, so this is the edge's share of
    /// "flushed by the broker -> written to the viewer" short of the kernel.
    pub fanout_us: Histogram,
    /// From the broker's flush of a batch (its `flushed_at_us` stamp) to this shard having
    /// queued it to every viewer, µs, by the two hosts' wall clocks: exact on one host, as
    /// close as NTP keeps them across hosts. A stamp in the future (clock skew) is not observed.
    pub flush_to_write_us: Histogram,
    /// Processing of the bytes that authenticated a connection (token check included), µs.
    pub auth_us: Histogram,
    /// Resumes and syncs by outcome (`crate::resume::Outcome`).
    pub resumes: [Counter; crate::resume::Outcome::ALL.len()],
    /// `BARRAGE_SYNC`s sent to connected clients when a broker link came back (new epoch).
    pub epoch_syncs: Counter,
    /// Batches replayed to resuming connections.
    pub resume_replayed: Counter,
    /// From a resuming connection's auth to its `BARRAGE_SYNC` queued, µs.
    pub resume_us: Histogram,
    /// Link shard only: connections the presence reporter holds (crate::presence).
    pub presence_records: Counter,
    /// Link shard only: PRESENCE frames queued to brokers.
    pub presence_frames: Counter,
    /// Link shard only: full re-reports (each re-link, or an overflowing pending list).
    pub presence_rereports: Counter,
    /// WSS connections open (also counted in `conns_ws`).
    pub conns_wss: Counter,
    /// TLS-over-TCP connections open (also counted in `conns_tcp`).
    pub conns_tls_tcp: Counter,
    /// TLS handshakes in flight (capped by `tls_handshakes_max`).
    pub tls_handshaking: Counter,
    /// TLS handshakes completed.
    pub tls_handshakes: Counter,
    /// close_notify records written on connections the edge closed itself.
    pub tls_close_notify: Counter,
    /// Edge-side closes whose close_notify was not written (the peer did not take it within
    /// the write bound, or too many closes were in flight): the peer saw a bare FIN or RST.
    pub tls_close_notify_failed: Counter,
    /// TLS connections failed or refused, by why.
    pub tls_failed: [Counter; TlsFail::ALL.len()],
    /// UDP sessions open.
    pub conns_udp: Counter,
    /// Datagrams received on this shard's UDP socket (forwarded ones too).
    pub udp_datagrams_in: Counter,
    /// Datagrams sent.
    pub udp_datagrams_out: Counter,
    /// Datagrams passed to the shard that owns their session.
    pub udp_forwarded: Counter,
    /// Sessions their client ended with a bye (op 1004).
    pub udp_byes: Counter,
    /// Sessions moved to a new address the client proved (NAT rebinding).
    pub udp_migrations: Counter,
    /// `send_to` failures (the datagram is lost, as on the network).
    pub udp_send_errors: Counter,
    /// Datagrams dropped, by `crate::udp::DROP_LABELS`.
    pub udp_dropped: [Counter; crate::udp::DROP_LABELS.len()],
}

impl ShardMetrics {
    pub fn auth_failed(&self, f: AuthFail) {
        self.auth_failed[f.index()].inc();
    }
    pub fn closed(&self, r: CloseReason) {
        self.closes[r.index()].inc();
    }
    pub fn dropped(&self, r: DropReason, n: u64) {
        self.drops[r.index()].add(n);
    }
    pub fn drops_of(&self, r: DropReason) -> u64 {
        self.drops[r.index()].get()
    }
    pub fn tls_failed(&self, f: TlsFail) {
        self.tls_failed[f.index()].inc();
    }
    pub fn udp_dropped(&self, label: &str) {
        self.udp_dropped[crate::udp::drop_index(label)].inc();
    }
    pub fn closes_of(&self, r: CloseReason) -> u64 {
        self.closes[r.index()].get()
    }
}

/// State of one broker link, for `/metrics`.
#[derive(Debug, Default)]
pub struct LinkMetrics {
    pub broker: String,
    pub broker_shard: u16,
    pub priority: &'static str,
    pub up: Counter,
    pub connects: Counter,
    pub batches_in: Counter,
    pub bytes_in: Counter,
    pub frames_out: Counter,
    /// The link was up and went down (dead, closed, reset, cut for backlog).
    pub downs: Counter,
    /// Batches the broker's stream seq skipped on this link (sent while the link was down or
    /// lost with it): the loss a viewer sees as a seq gap, counted where it happens.
    pub seq_gaps: Counter,
    /// A stream's seq went back (a restarted broker: a new epoch).
    pub seq_restarts: Counter,
    /// CONFIRM frames sent (only to a broker in cluster mode).
    pub confirms: Counter,
}
