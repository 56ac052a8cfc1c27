//! Counters of one broker, rendered as Prometheus text on `GET /metrics`.
//!
//! Counters are relaxed atomics: ingest runs on every shard, and `/metrics` may be served by
//! any shard, so a plain per-shard struct could not be read. Each shard-owned counter has
//! exactly one writer (its shard), so they never contend.

use net::metrics::Histogram;
use proto::id::Encoding;
use proto::ingest::PushError;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Rejection reasons, in label order.
pub const REJECT_REASONS: [&str; 6] = [
    "unauthorized",
    "forbidden_scope",
    "too_large",
    "rate_limited",
    "invalid",
    "overloaded",
];

/// Why a link was cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// The edge closed it or the socket failed.
    Closed = 0,
    /// Its queue passed `link_queue_bytes_max`.
    Slow = 1,
    /// Silent past `link_dead_ms`.
    Dead = 2,
    /// The edge sent something the link protocol forbids.
    Protocol = 3,
    /// A newer link from the same node and priority took its place.
    Replaced = 4,
    /// The broker is shutting down.
    Shutdown = 5,
}

pub const CUT_REASONS: [&str; 6] = ["closed", "slow", "dead", "protocol", "replaced", "shutdown"];

fn reject_index(e: &PushError) -> usize {
    match e {
        PushError::Unauthorized => 0,
        PushError::ForbiddenScope => 1,
        PushError::TooLarge => 2,
        PushError::RateLimited { .. } => 3,
        PushError::Invalid(_) => 4,
        PushError::Overloaded => 5,
    }
}

fn encoding_index(e: Encoding) -> usize {
    match e {
        Encoding::Brotli => 0,
        Encoding::Zlib => 1,
        Encoding::Plain => 2,
    }
}

const ENCODING_LABELS: [&str; 3] = ["brotli", "zlib", "plain"];

/// Process-wide ingest counters.
#[derive(Default)]
pub struct IngestMetrics {
    /// [ingest socket, http]
    pub accepted: [AtomicU64; 2],
    pub rejected: [AtomicU64; 6],
    pub connections: AtomicU64,
    pub connections_refused: AtomicU64,
    pub protocol_errors: AtomicU64,
    /// Keyed pushes answered with an earlier msg id (retries not delivered twice).
    pub deduplicated: AtomicU64,
}

impl IngestMetrics {
    pub fn reject(&self, e: &PushError) {
        self.rejected[reject_index(e)].fetch_add(1, Relaxed);
    }
}

/// Counters of one shard (written by that shard only).
pub struct ShardMetrics {
    pub messages_batched: AtomicU64,
    pub batches: AtomicU64,
    /// Batches nobody watched (not compressed, not sent).
    pub batches_unrouted: AtomicU64,
    /// Per encoding: batches made, inner bytes in, outer bytes out.
    pub encoded: [AtomicU64; 3],
    pub encoded_in_bytes: [AtomicU64; 3],
    pub encoded_out_bytes: [AtomicU64; 3],
    /// Batch frames and bytes queued to links.
    pub link_batches_sent: AtomicU64,
    pub link_bytes_sent: AtomicU64,
    pub links_low: AtomicU64,
    pub links_high: AtomicU64,
    pub link_cuts: [AtomicU64; 6],
    pub link_frames_in: AtomicU64,
    pub edges: AtomicU64,
    pub rooms_watched: AtomicU64,
    pub pending_messages: AtomicU64,
    /// Push accepted by ingest -> its batch flushed (the batch's oldest message), µs.
    pub accept_to_flush_us: Histogram,
    /// Messages and inner bytes per flushed batch.
    pub batch_messages: Histogram,
    pub batch_bytes: Histogram,
    /// Time brotli took to encode one batch, µs.
    pub brotli_encode_us: Histogram,
    /// Resume: REPLAY answers by outcome (`REPLAY_OUTCOMES`) and batches replayed.
    pub replays: [AtomicU64; 6],
    pub replayed_batches: AtomicU64,
    /// Bytes the resume history holds.
    pub history_bytes: AtomicU64,
}

impl Default for ShardMetrics {
    fn default() -> ShardMetrics {
        ShardMetrics {
            messages_batched: Default::default(),
            batches: Default::default(),
            batches_unrouted: Default::default(),
            encoded: Default::default(),
            encoded_in_bytes: Default::default(),
            encoded_out_bytes: Default::default(),
            link_batches_sent: Default::default(),
            link_bytes_sent: Default::default(),
            links_low: Default::default(),
            links_high: Default::default(),
            link_cuts: Default::default(),
            link_frames_in: Default::default(),
            edges: Default::default(),
            rooms_watched: Default::default(),
            pending_messages: Default::default(),
            accept_to_flush_us: Histogram::latency(),
            batch_messages: Histogram::new(&net::metrics::MESSAGES_BOUNDS),
            batch_bytes: Histogram::new(&net::metrics::BYTES_BOUNDS),
            brotli_encode_us: Histogram::latency(),
            replays: Default::default(),
            replayed_batches: Default::default(),
            history_bytes: Default::default(),
        }
    }
}

/// Labels of `barrage_broker_replays_total`, indexed like [`ShardMetrics::replays`].
pub const REPLAY_OUTCOMES: [&str; 6] = [
    "fresh",
    "recovered",
    "partial",
    "other_epoch",
    "ahead",
    "malformed",
];

impl ShardMetrics {
    pub fn encoded(&self, e: Encoding, in_bytes: usize, out_bytes: usize) {
        let i = encoding_index(e);
        self.encoded[i].fetch_add(1, Relaxed);
        self.encoded_in_bytes[i].fetch_add(in_bytes as u64, Relaxed);
        self.encoded_out_bytes[i].fetch_add(out_bytes as u64, Relaxed);
    }

    /// Records a flushed batch in the histograms.
    pub fn flushed(&self, flush: &crate::batcher::Flush) {
        if let Some(t) = flush.oldest {
            self.accept_to_flush_us.observe_since(t);
        }
        self.batch_messages.observe(flush.msg_ids.len() as u64);
        self.batch_bytes.observe(flush.body_bytes() as u64);
    }

    pub fn replay(&self, o: crate::history::Outcome, batches: u64) {
        use crate::history::Outcome;
        let i = match o {
            Outcome::Fresh => 0,
            Outcome::Recovered => 1,
            Outcome::Partial => 2,
            Outcome::OtherEpoch => 3,
            Outcome::Ahead => 4,
            Outcome::Malformed => 5,
        };
        self.replays[i].fetch_add(1, Relaxed);
        self.replayed_batches.fetch_add(batches, Relaxed);
    }

    pub fn cut(&self, c: Cut) {
        self.link_cuts[c as usize].fetch_add(1, Relaxed);
    }
}

/// A histogram family: name, help, which histogram of a shard, scale to the exported unit.
type HistogramFamily = (
    &'static str,
    &'static str,
    fn(&ShardMetrics) -> &Histogram,
    f64,
);

/// Renders every counter. `queues[shard] = (high depth, low depth)`.
pub fn render(
    ingest: &IngestMetrics,
    shards: &[ShardMetrics],
    queues: &[(usize, usize)],
    link_handshakes_failed: u64,
    link_handshakes: u64,
) -> String {
    let mut w = net::metrics::Writer::default();
    let get = |a: &AtomicU64| a.load(Relaxed) as f64;
    w.family(
        "barrage_broker_pushes_accepted_total",
        "counter",
        "Pushes accepted (given a msg_id), by ingest path.",
    );
    w.sample(
        "barrage_broker_pushes_accepted_total",
        &[("via", "socket")],
        get(&ingest.accepted[0]),
    );
    w.sample(
        "barrage_broker_pushes_accepted_total",
        &[("via", "http")],
        get(&ingest.accepted[1]),
    );
    w.family(
        "barrage_broker_pushes_rejected_total",
        "counter",
        "Pushes refused, by reason.",
    );
    for (i, r) in REJECT_REASONS.iter().enumerate() {
        w.sample(
            "barrage_broker_pushes_rejected_total",
            &[("reason", r)],
            get(&ingest.rejected[i]),
        );
    }
    w.family(
        "barrage_broker_ingest_connections",
        "gauge",
        "Open ingest socket connections.",
    );
    w.sample(
        "barrage_broker_ingest_connections",
        &[],
        get(&ingest.connections),
    );
    w.family(
        "barrage_broker_pushes_deduplicated_total",
        "counter",
        "Pushes with an idempotency key seen before within the window: answered, not queued.",
    );
    w.sample(
        "barrage_broker_pushes_deduplicated_total",
        &[],
        get(&ingest.deduplicated),
    );
    w.family(
        "barrage_broker_ingest_connections_refused_total",
        "counter",
        "Ingest connections closed at once (over ingest_connections_max).",
    );
    w.sample(
        "barrage_broker_ingest_connections_refused_total",
        &[],
        get(&ingest.connections_refused),
    );
    w.family(
        "barrage_broker_ingest_protocol_errors_total",
        "counter",
        "Ingest connections closed for a malformed frame or a missing Auth.",
    );
    w.sample(
        "barrage_broker_ingest_protocol_errors_total",
        &[],
        get(&ingest.protocol_errors),
    );

    w.family(
        "barrage_broker_queue_messages",
        "gauge",
        "Messages waiting between ingest and aggregation, per shard and priority.",
    );
    for (i, (hi, lo)) in queues.iter().enumerate() {
        let s = i.to_string();
        w.sample(
            "barrage_broker_queue_messages",
            &[("shard", &s), ("priority", "high")],
            *hi as f64,
        );
        w.sample(
            "barrage_broker_queue_messages",
            &[("shard", &s), ("priority", "low")],
            *lo as f64,
        );
    }
    let sum =
        |f: &dyn Fn(&ShardMetrics) -> &AtomicU64| shards.iter().map(|s| get(f(s))).sum::<f64>();
    w.family(
        "barrage_broker_pending_messages",
        "gauge",
        "Messages waiting in pending batches (inside the aggregation window).",
    );
    w.sample(
        "barrage_broker_pending_messages",
        &[],
        sum(&|s| &s.pending_messages),
    );
    w.family(
        "barrage_broker_messages_batched_total",
        "counter",
        "Messages that left in a batch.",
    );
    w.sample(
        "barrage_broker_messages_batched_total",
        &[],
        sum(&|s| &s.messages_batched),
    );
    w.family(
        "barrage_broker_batches_total",
        "counter",
        "Batches flushed.",
    );
    w.sample("barrage_broker_batches_total", &[], sum(&|s| &s.batches));
    w.family(
        "barrage_broker_batches_unrouted_total",
        "counter",
        "Batches of scopes no edge watched (neither compressed nor sent).",
    );
    w.sample(
        "barrage_broker_batches_unrouted_total",
        &[],
        sum(&|s| &s.batches_unrouted),
    );
    w.family(
        "barrage_broker_replays_total",
        "counter",
        "Edge REPLAY requests (resume) answered, by outcome.",
    );
    for (i, o) in REPLAY_OUTCOMES.iter().enumerate() {
        w.sample(
            "barrage_broker_replays_total",
            &[("outcome", o)],
            sum(&|s| &s.replays[i]),
        );
    }
    w.family(
        "barrage_broker_replayed_batches_total",
        "counter",
        "Batches sent to edges in REPLAYED answers.",
    );
    w.sample(
        "barrage_broker_replayed_batches_total",
        &[],
        sum(&|s| &s.replayed_batches),
    );
    w.family(
        "barrage_broker_history_bytes",
        "gauge",
        "Bytes the resume history holds (all shards).",
    );
    w.sample(
        "barrage_broker_history_bytes",
        &[],
        sum(&|s| &s.history_bytes),
    );
    w.family(
        "barrage_broker_encoded_batches_total",
        "counter",
        "Batch encodings made, by encoding.",
    );
    for (i, e) in ENCODING_LABELS.iter().enumerate() {
        w.sample(
            "barrage_broker_encoded_batches_total",
            &[("encoding", e)],
            shards.iter().map(|s| get(&s.encoded[i])).sum(),
        );
    }
    w.family(
        "barrage_broker_encoded_in_bytes_total",
        "counter",
        "Uncompressed inner packet bytes encoded, by encoding.",
    );
    for (i, e) in ENCODING_LABELS.iter().enumerate() {
        w.sample(
            "barrage_broker_encoded_in_bytes_total",
            &[("encoding", e)],
            shards.iter().map(|s| get(&s.encoded_in_bytes[i])).sum(),
        );
    }
    w.family(
        "barrage_broker_encoded_out_bytes_total",
        "counter",
        "Outer packet bytes produced, by encoding.",
    );
    for (i, e) in ENCODING_LABELS.iter().enumerate() {
        w.sample(
            "barrage_broker_encoded_out_bytes_total",
            &[("encoding", e)],
            shards.iter().map(|s| get(&s.encoded_out_bytes[i])).sum(),
        );
    }
    w.family(
        "barrage_broker_link_batches_sent_total",
        "counter",
        "BATCH frames queued to edge links.",
    );
    w.sample(
        "barrage_broker_link_batches_sent_total",
        &[],
        sum(&|s| &s.link_batches_sent),
    );
    w.family(
        "barrage_broker_link_sent_bytes_total",
        "counter",
        "Bytes of BATCH frames queued to edge links.",
    );
    w.sample(
        "barrage_broker_link_sent_bytes_total",
        &[],
        sum(&|s| &s.link_bytes_sent),
    );
    w.family(
        "barrage_broker_links",
        "gauge",
        "Edge links up, by priority.",
    );
    w.sample(
        "barrage_broker_links",
        &[("priority", "low")],
        sum(&|s| &s.links_low),
    );
    w.sample(
        "barrage_broker_links",
        &[("priority", "high")],
        sum(&|s| &s.links_high),
    );
    w.family(
        "barrage_broker_link_cuts_total",
        "counter",
        "Edge links ended, by reason.",
    );
    for (i, r) in CUT_REASONS.iter().enumerate() {
        w.sample(
            "barrage_broker_link_cuts_total",
            &[("reason", r)],
            shards.iter().map(|s| get(&s.link_cuts[i])).sum(),
        );
    }
    w.family(
        "barrage_broker_link_handshakes",
        "gauge",
        "Edge connections waiting for their Hello (links in the handshake state).",
    );
    w.sample(
        "barrage_broker_link_handshakes",
        &[],
        link_handshakes as f64,
    );
    w.family(
        "barrage_broker_link_handshakes_failed_total",
        "counter",
        "Edge connections closed before a valid Hello.",
    );
    w.sample(
        "barrage_broker_link_handshakes_failed_total",
        &[],
        link_handshakes_failed as f64,
    );
    w.family(
        "barrage_broker_link_frames_in_total",
        "counter",
        "Frames received from edges.",
    );
    w.sample(
        "barrage_broker_link_frames_in_total",
        &[],
        sum(&|s| &s.link_frames_in),
    );
    w.family(
        "barrage_broker_edges",
        "gauge",
        "Edge nodes with a link, summed over shards.",
    );
    w.sample("barrage_broker_edges", &[], sum(&|s| &s.edges));
    w.family(
        "barrage_broker_rooms_watched",
        "gauge",
        "Rooms with viewers on some edge, summed over shards.",
    );
    w.sample(
        "barrage_broker_rooms_watched",
        &[],
        sum(&|s| &s.rooms_watched),
    );
    let hist: [HistogramFamily; 4] = [
        (
            "barrage_broker_accept_to_flush_seconds",
            "Push accepted by ingest -> its batch flushed (oldest message of the batch).",
            |s| &s.accept_to_flush_us,
            1e-6,
        ),
        (
            "barrage_broker_batch_messages",
            "Messages per flushed batch.",
            |s| &s.batch_messages,
            1.0,
        ),
        (
            "barrage_broker_batch_bytes",
            "Body bytes per flushed batch (before compression).",
            |s| &s.batch_bytes,
            1.0,
        ),
        (
            "barrage_broker_brotli_encode_seconds",
            "Time brotli took to encode one batch.",
            |s| &s.brotli_encode_us,
            1e-6,
        ),
    ];
    for (name, help, get, scale) in hist {
        w.family(name, "histogram", help);
        let parts: Vec<&Histogram> = shards.iter().map(get).collect();
        w.histogram(name, &[], &parts, scale);
    }
    w.finish()
}
