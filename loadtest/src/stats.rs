//! The report maths: per-connection sequence tracking (gaps, duplicates, out-of-order), latency
//! histograms that merge across threads and processes, counters by reason, and zipf weights.
//!
//! Invariants:
//! - A [`SeqTracker`] counts each sequence number at most once as delivered; anything seen again
//!   is a duplicate, anything that fills an earlier gap is out-of-order. Its memory is bounded by
//!   [`GAPS_TRACKED_MAX`] ranges: older gaps beyond that are given up as lost.
//! - [`Stats`] is a commutative monoid under [`Stats::merge`] (the order threads or child
//!   processes report in does not change the totals), and it round-trips through JSON.

use std::collections::BTreeMap;

use base64::Engine;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Gap ranges one connection remembers; beyond this the oldest gap is counted lost for good.
pub const GAPS_TRACKED_MAX: usize = 64;
/// Highest latency the histograms record (60 s in µs); larger values are clamped to it.
pub const LATENCY_US_MAX: u64 = 60_000_000;

/// Per-connection delivery accounting over one room's message sequence (`lt.seq`).
#[derive(Clone, Debug, Default)]
pub struct SeqTracker {
    /// Next sequence number expected (everything below is delivered or in `gaps`).
    next: u64,
    /// Missing half-open ranges `[from, to)` below `next`, oldest first.
    gaps: Vec<(u64, u64)>,
    /// Gap messages given up when `gaps` overflowed.
    lost: u64,
    pub delivered: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    /// Messages that opened a gap (a jump ahead), for early warning in the progress line.
    pub gap_events: u64,
}

impl SeqTracker {
    /// A tracker that expects the sequence to start at `first`.
    pub fn starting_at(first: u64) -> Self {
        SeqTracker {
            next: first,
            ..Default::default()
        }
    }

    /// Records one received sequence number.
    pub fn record(&mut self, seq: u64) {
        if seq == self.next {
            self.next += 1;
            self.delivered += 1;
        } else if seq > self.next {
            self.gaps.push((self.next, seq));
            self.gap_events += 1;
            if self.gaps.len() > GAPS_TRACKED_MAX {
                let (a, b) = self.gaps.remove(0);
                self.lost += b - a;
            }
            self.next = seq + 1;
            self.delivered += 1;
        } else if let Some(i) = self.gaps.iter().position(|&(a, b)| a <= seq && seq < b) {
            // A late arrival filling a gap: split the range around it.
            let (a, b) = self.gaps[i];
            match (seq == a, seq + 1 == b) {
                (true, true) => {
                    self.gaps.remove(i);
                }
                (true, false) => self.gaps[i].0 = seq + 1,
                (false, true) => self.gaps[i].1 = seq,
                (false, false) => {
                    self.gaps[i].1 = seq;
                    self.gaps.insert(i + 1, (seq + 1, b));
                }
            }
            self.out_of_order += 1;
            self.delivered += 1;
        } else {
            self.duplicates += 1;
        }
    }

    /// Messages missing so far, given that the sender accepted sequence numbers below `sent`
    /// (trailing messages never received count as missing).
    pub fn missing(&self, sent: u64) -> u64 {
        let open: u64 = self.gaps.iter().map(|(a, b)| b - a).sum();
        open + self.lost + sent.saturating_sub(self.next)
    }

    /// The next sequence number expected.
    pub fn next(&self) -> u64 {
        self.next
    }
}

/// A latency histogram in microseconds, 3 significant digits.
#[derive(Clone, Debug)]
pub struct Latency(pub Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        // 1 µs .. 60 s at 3 significant digits: constant, valid bounds (no input reaches this).
        #[allow(clippy::expect_used)]
        Latency(
            Histogram::new_with_bounds(1, LATENCY_US_MAX, 3)
                .expect("constant histogram bounds are valid"),
        )
    }
}

impl Latency {
    pub fn record_us(&mut self, us: u64) {
        let _ = self.0.record(us.clamp(1, LATENCY_US_MAX));
    }

    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides (both made by `default`), so `add` cannot fail.
        let _ = self.0.add(&other.0);
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// Value at quantile `q` in milliseconds (0 when empty).
    pub fn ms_at(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn summary(&self) -> LatencySummary {
        LatencySummary {
            count: self.count(),
            p50_ms: self.ms_at(0.5),
            p90_ms: self.ms_at(0.9),
            p99_ms: self.ms_at(0.99),
            p999_ms: self.ms_at(0.999),
            max_ms: if self.0.is_empty() {
                0.0
            } else {
                self.0.max() as f64 / 1000.0
            },
            mean_ms: if self.0.is_empty() {
                0.0
            } else {
                self.0.mean() / 1000.0
            },
        }
    }

    /// Serialized (hdrhistogram V2 + deflate, base64) for shipping between processes.
    pub fn to_base64(&self) -> String {
        let mut buf = Vec::new();
        let mut ser = hdrhistogram::serialization::V2DeflateSerializer::new();
        if hdrhistogram::serialization::Serializer::serialize(&mut ser, &self.0, &mut buf).is_err()
        {
            return String::new();
        }
        base64::engine::general_purpose::STANDARD.encode(buf)
    }

    pub fn from_base64(s: &str) -> Option<Latency> {
        if s.is_empty() {
            return Some(Latency::default());
        }
        let bytes = base64::engine::general_purpose::STANDARD.decode(s).ok()?;
        let h: Histogram<u64> = hdrhistogram::serialization::Deserializer::new()
            .deserialize(&mut &bytes[..])
            .ok()?;
        let mut l = Latency::default();
        l.0.add(&h).ok()?;
        Some(l)
    }
}

impl Serialize for Latency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for Latency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Latency::from_base64(&s).ok_or_else(|| serde::de::Error::custom("bad histogram"))
    }
}

/// Percentiles of a [`Latency`], for reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

/// Everything one thread (or process) measured over some interval; merged by addition.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Stats {
    /// Publish to decode at the viewer.
    pub latency: Latency,
    /// TCP connect (+ WS upgrade) to auth reply.
    pub connect: Latency,
    /// The control request (token and edge list).
    pub ticket: Latency,
    pub connects_ok: u64,
    /// Connect failures by reason.
    pub connect_failures: BTreeMap<String, u64>,
    /// Established connections that ended early, by reason.
    pub disconnects: BTreeMap<String, u64>,
    pub delivered: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub gap_events: u64,
    /// Final count, filled at the end: messages the publisher had accepted and a viewer
    /// connected throughout never received.
    pub missing: u64,
    /// Notification messages without our `lt` field (not ours, or another scope's).
    pub foreign: u64,
    /// Bytes read from the sockets (TCP payload, including WS framing).
    pub bytes_read: u64,
    /// Outer (top-level) op-5 packets received.
    pub batches: u64,
    pub heartbeat_replies: u64,
    /// UDP: data datagrams dropped on purpose (`--udp-loss-pct`).
    #[serde(default)]
    pub udp_dropped: u64,
    /// UDP: datagrams from the edge that did not decode (counted, dropped).
    #[serde(default)]
    pub udp_bad: u64,
}

impl Stats {
    pub fn fail(&mut self, reason: impl Into<String>) {
        *self.connect_failures.entry(reason.into()).or_default() += 1;
    }

    pub fn disconnect(&mut self, reason: impl Into<String>) {
        *self.disconnects.entry(reason.into()).or_default() += 1;
    }

    pub fn merge(&mut self, o: &Stats) {
        self.latency.merge(&o.latency);
        self.connect.merge(&o.connect);
        self.ticket.merge(&o.ticket);
        self.connects_ok += o.connects_ok;
        for (k, v) in &o.connect_failures {
            *self.connect_failures.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.disconnects {
            *self.disconnects.entry(k.clone()).or_default() += v;
        }
        self.delivered += o.delivered;
        self.duplicates += o.duplicates;
        self.out_of_order += o.out_of_order;
        self.gap_events += o.gap_events;
        self.missing += o.missing;
        self.foreign += o.foreign;
        self.bytes_read += o.bytes_read;
        self.batches += o.batches;
        self.heartbeat_replies += o.heartbeat_replies;
        self.udp_dropped += o.udp_dropped;
        self.udp_bad += o.udp_bad;
    }

    pub fn connect_failures_total(&self) -> u64 {
        self.connect_failures.values().sum()
    }
}

/// Zipf weights for `n` ranks with exponent `s` (s = 0: uniform), normalised to sum 1.
pub fn zipf_weights(n: usize, s: f64) -> Vec<f64> {
    let raw: Vec<f64> = (1..=n).map(|k| 1.0 / (k as f64).powf(s)).collect();
    let total: f64 = raw.iter().sum();
    raw.into_iter().map(|w| w / total).collect()
}

/// Splits `total` into integer counts proportional to `weights` (largest remainder), so the
/// counts sum to exactly `total`.
pub fn apportion(total: u64, weights: &[f64]) -> Vec<u64> {
    let wsum: f64 = weights.iter().sum();
    if weights.is_empty() || wsum <= 0.0 {
        return vec![0; weights.len()];
    }
    let exact: Vec<f64> = weights.iter().map(|w| total as f64 * w / wsum).collect();
    let mut counts: Vec<u64> = exact.iter().map(|e| e.floor() as u64).collect();
    let mut rest = total - counts.iter().sum::<u64>();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| {
        (exact[b] - exact[b].floor())
            .total_cmp(&(exact[a] - exact[a].floor()))
            .then(a.cmp(&b))
    });
    for i in order {
        if rest == 0 {
            break;
        }
        counts[i] += 1;
        rest -= 1;
    }
    counts
}

/// A sampler over weights (cumulative table + binary search).
#[derive(Clone, Debug)]
pub struct WeightedPicker {
    cumulative: Vec<f64>,
}

impl WeightedPicker {
    pub fn new(weights: &[f64]) -> Self {
        let mut acc = 0.0;
        let mut cumulative: Vec<f64> = weights
            .iter()
            .map(|w| {
                acc += w;
                acc
            })
            .collect();
        if let Some(last) = cumulative.last_mut() {
            *last = f64::INFINITY;
        }
        WeightedPicker { cumulative }
    }

    /// The index for a uniform `u` in [0, 1).
    pub fn pick(&self, u: f64) -> usize {
        let total = match self.cumulative.len() {
            0 => return 0,
            n if n >= 2 => self.cumulative[n - 2] + (1.0 - self.cumulative[n - 2]),
            _ => 1.0,
        };
        let x = u * total;
        self.cumulative
            .partition_point(|&c| c <= x)
            .min(self.cumulative.len() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::SplitMix64;

    #[test]
    fn in_order_delivery_has_no_loss() {
        let mut t = SeqTracker::starting_at(0);
        for s in 0..100 {
            t.record(s);
        }
        assert_eq!(
            (t.delivered, t.duplicates, t.out_of_order, t.missing(100)),
            (100, 0, 0, 0)
        );
        // Two more accepted but not yet received count as missing.
        assert_eq!(t.missing(102), 2);
    }

    #[test]
    fn gaps_duplicates_and_late_arrivals() {
        let mut t = SeqTracker::starting_at(0);
        for s in [0, 1, 2, 5, 6, 2, 3, 9, 4, 4, 7] {
            t.record(s);
        }
        // Received 0..=7 and 9; 8 is missing; a second 2 and a second 4 are duplicates;
        // 3, 4 and 7 arrived after later numbers.
        assert_eq!(t.delivered, 9);
        assert_eq!(t.duplicates, 2);
        assert_eq!(t.out_of_order, 3);
        assert_eq!(t.gap_events, 2);
        assert_eq!(t.missing(10), 1);
        assert_eq!(t.missing(12), 3);
    }

    #[test]
    fn splitting_a_gap_in_the_middle() {
        let mut t = SeqTracker::starting_at(10);
        t.record(20);
        t.record(15);
        assert_eq!(t.missing(21), 9);
        t.record(15);
        assert_eq!(t.duplicates, 1);
        for s in 10..20 {
            t.record(s);
        }
        assert_eq!(t.missing(21), 0);
        assert_eq!(t.duplicates, 2, "15 was seen three times");
        assert_eq!(t.delivered, 11);
    }

    #[test]
    fn gap_memory_is_bounded_and_overflow_counts_as_lost() {
        let mut t = SeqTracker::starting_at(0);
        for i in 0..(GAPS_TRACKED_MAX as u64 + 10) {
            t.record(i * 2 + 1);
        }
        assert!(t.gaps.len() <= GAPS_TRACKED_MAX);
        let n = GAPS_TRACKED_MAX as u64 + 10;
        assert_eq!(t.missing(2 * n), n);
        // A very late arrival of a forgotten gap counts as a duplicate, never as a second delivery.
        t.record(0);
        assert_eq!(t.delivered, n);
    }

    #[test]
    fn histograms_merge_across_threads_like_one() {
        let mut rng = SplitMix64::new(9);
        let values: Vec<u64> = (0..20_000).map(|_| 1 + rng.below(2_000_000)).collect();
        let mut whole = Latency::default();
        let mut parts = vec![Latency::default(); 4];
        for (i, &v) in values.iter().enumerate() {
            whole.record_us(v);
            parts[i % 4].record_us(v);
        }
        let mut merged = Latency::default();
        for p in &parts {
            merged.merge(p);
        }
        assert_eq!(merged.count(), 20_000);
        assert_eq!(merged.summary(), whole.summary());
        // And through the wire form used by child processes.
        let back = Latency::from_base64(&merged.to_base64()).unwrap();
        assert_eq!(back.summary(), whole.summary());
    }

    #[test]
    fn stats_merge_is_order_independent_and_survives_json() {
        let mut a = Stats {
            delivered: 5,
            ..Default::default()
        };
        a.fail("refused");
        a.latency.record_us(1000);
        let mut b = Stats {
            delivered: 7,
            duplicates: 1,
            ..Default::default()
        };
        b.fail("refused");
        b.fail("auth");
        b.latency.record_us(3000);
        let mut ab = a.clone();
        ab.merge(&b);
        let mut ba = b.clone();
        ba.merge(&a);
        let ab: Stats = serde_json::from_str(&serde_json::to_string(&ab).unwrap()).unwrap();
        assert_eq!(ab.delivered, 12);
        assert_eq!(ab.connect_failures.get("refused"), Some(&2));
        assert_eq!(ab.connect_failures, ba.connect_failures);
        assert_eq!(ab.latency.summary(), ba.latency.summary());
        assert_eq!(ab.latency.count(), 2);
    }

    #[test]
    fn zipf_weights_and_sampling_are_sane() {
        let w = zipf_weights(1000, 1.1);
        assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert!(w.windows(2).all(|p| p[0] >= p[1]), "non-increasing");
        // Rank 1 vs rank 2 is 2^1.1.
        assert!((w[0] / w[1] - 2f64.powf(1.1)).abs() < 1e-9);
        let picker = WeightedPicker::new(&w);
        let mut rng = SplitMix64::new(4);
        let n = 200_000;
        let mut hits = vec![0u64; 1000];
        for _ in 0..n {
            hits[picker.pick(rng.unit())] += 1;
        }
        for rank in [0usize, 1, 9] {
            let expect = w[rank] * n as f64;
            let got = hits[rank] as f64;
            assert!(
                (got - expect).abs() < 5.0 * expect.sqrt() + 5.0,
                "rank {rank}: {got} vs {expect}"
            );
        }
        assert_eq!(zipf_weights(4, 0.0), vec![0.25; 4]);
    }

    #[test]
    fn apportion_sums_exactly() {
        let w = zipf_weights(1000, 1.1);
        let c = apportion(19_000, &w);
        assert_eq!(c.iter().sum::<u64>(), 19_000);
        assert!(c[0] > c[999]);
        assert_eq!(apportion(10, &[1.0, 1.0, 1.0]).iter().sum::<u64>(), 10);
        assert_eq!(apportion(5, &[]), Vec::<u64>::new());
    }
}
