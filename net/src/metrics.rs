//! Metrics exposition. Each role keeps its counters in plain per-shard structs (relaxed
//! atomics, one writer each) and describes them on every scrape through [`Writer`], which
//! hands them to `prometheus-client` as a collector and encodes the Prometheus text format
//! 0.0.4 with it (escaping, `_total` on counters, histogram buckets). [`Histogram`] is our
//! own fixed-bucket histogram: recording is three relaxed adds, reading happens at scrape.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The `Content-Type` to serve this text with.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A `GET /metrics` answer: 200, the text, and exactly one `Content-Type`.
pub fn response(text: String) -> crate::http::Response {
    crate::http::Response {
        status: 200,
        headers: vec![("content-type".to_string(), CONTENT_TYPE.to_string())],
        body: text.into_bytes(),
    }
}

/// Bucket bounds in microseconds for latencies from 50 µs to 10 s.
pub const LATENCY_US_BOUNDS: [u64; 14] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
    10_000_000,
];
/// Bucket bounds for counts of messages in a batch.
pub const MESSAGES_BOUNDS: [u64; 10] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024];
/// Bucket bounds for sizes in bytes, 64 B to 1 MiB.
pub const BYTES_BOUNDS: [u64; 9] = [
    64, 256, 1024, 4096, 16_384, 65_536, 262_144, 1_048_576, 4_194_304,
];

/// A histogram with fixed integer buckets (microseconds, bytes, messages), recorded with
/// relaxed atomic adds so any thread may observe into it; rendered at scrape time. An
/// observation costs one bucket search over at most 14 bounds and three relaxed adds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    /// `counts[i]` counts observations `<= bounds[i]` and `> bounds[i-1]`; the last is `+Inf`.
    counts: Box<[AtomicU64]>,
    sum: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [u64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    /// A latency histogram (microsecond buckets, rendered in seconds).
    pub fn latency() -> Histogram {
        Histogram::new(&LATENCY_US_BOUNDS)
    }

    #[inline]
    pub fn observe(&self, v: u64) {
        let i = self.bounds.partition_point(|b| *b < v);
        if let Some(c) = self.counts.get(i) {
            c.fetch_add(1, Relaxed);
        }
        self.sum.fetch_add(v, Relaxed);
    }

    /// Records the time since `start` in microseconds.
    #[inline]
    pub fn observe_since(&self, start: std::time::Instant) {
        self.observe(start.elapsed().as_micros().min(u128::from(u64::MAX)) as u64);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Relaxed)).sum()
    }
}

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram::latency()
    }
}

/// Collects metric families at scrape time and encodes them with `prometheus-client`'s
/// Prometheus text (0.0.4) encoder. The roles keep their counters in their own structs (relaxed
/// atomics, one writer each) and describe them here on every scrape, as a `prometheus-client`
/// collector would: nothing on a hot path touches this type.
#[derive(Debug, Default)]
pub struct Writer {
    families: Vec<Family>,
}

/// One metric family as the roles describe it.
#[derive(Debug)]
struct Family {
    name: String,
    kind: MetricType,
    help: String,
    samples: Vec<(Vec<(String, String)>, Value)>,
}

#[derive(Debug)]
enum Value {
    Number(f64),
    /// Per-bucket (not cumulative) counts, upper bounds ascending, the last `+Inf`.
    Histogram {
        sum: f64,
        count: u64,
        buckets: Vec<(f64, u64)>,
    },
}

fn kind_of(kind: &str) -> MetricType {
    match kind {
        "counter" => MetricType::Counter,
        "histogram" => MetricType::Histogram,
        "gauge" => MetricType::Gauge,
        _ => MetricType::Unknown,
    }
}

fn owned(labels: &[(&str, &str)]) -> Vec<(String, String)> {
    labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Writer {
    /// Starts a family (its `# HELP` and `# TYPE`); samples of `name` follow.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        self.families.push(Family {
            name: name.to_string(),
            kind: kind_of(kind),
            help: help.to_string(),
            samples: Vec::new(),
        });
    }

    /// A whole family: its `# HELP`/`# TYPE` lines, then one sample per `(labels, value)`.
    pub fn metric(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        samples: &[(&[(&str, &str)], f64)],
    ) {
        self.family(name, kind, help);
        for (labels, value) in samples {
            self.sample(name, labels, *value);
        }
    }

    /// The family `name` (the latest started), started untyped when there is none.
    fn family_of(&mut self, name: &str) -> &mut Family {
        let found = self.families.iter().rposition(|f| f.name == name);
        let i = match found {
            Some(i) => i,
            None => {
                self.family(name, "unknown", "");
                self.families.len() - 1
            }
        };
        &mut self.families[i]
    }

    /// One sample: `name{k="v",...} value`.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.family_of(name)
            .samples
            .push((owned(labels), Value::Number(value)));
    }

    /// One histogram series, the sum of `parts` (per-shard histograms with the same bounds),
    /// each bound and the sum multiplied by `scale` (1e-6 turns microseconds into seconds).
    pub fn histogram(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        parts: &[&Histogram],
        scale: f64,
    ) {
        let Some(first) = parts.first() else { return };
        let mut buckets = Vec::with_capacity(first.bounds.len() + 1);
        for (i, bound) in first.bounds.iter().map(Some).chain([None]).enumerate() {
            let n: u64 = parts
                .iter()
                .map(|h| h.counts.get(i).map_or(0, |c| c.load(Relaxed)))
                .sum();
            // Rounded to 12 decimals so 50 µs prints as 5e-5, not 4.9999999999999996e-5.
            let le = bound.map_or(f64::INFINITY, |b| (*b as f64 * scale * 1e12).round() / 1e12);
            buckets.push((le, n));
        }
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = parts.iter().map(|h| h.sum.load(Relaxed)).sum::<u64>() as f64 * scale;
        self.family_of(name).samples.push((
            owned(labels),
            Value::Histogram {
                sum,
                count,
                buckets,
            },
        ));
    }

    /// The exposition text of every family so far (Prometheus text format 0.0.4).
    pub fn finish(self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Families(self.families)));
        let mut out = String::new();
        // Writing to a String cannot fail; an encoder error would be a bug in a name.
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        out
    }
}

/// The families of one scrape, as a `prometheus-client` collector.
#[derive(Debug)]
struct Families(Vec<Family>);

impl Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.0 {
            // The encoder appends `_total` to a counter's name itself.
            let name = match f.kind {
                MetricType::Counter => f.name.strip_suffix("_total").unwrap_or(&f.name),
                _ => f.name.as_str(),
            };
            let mut family = encoder.encode_descriptor(name, &f.help, None, f.kind)?;
            for (labels, value) in &f.samples {
                let mut m = family.encode_family(labels)?;
                match value {
                    Value::Histogram {
                        sum,
                        count,
                        buckets,
                    } => m.encode_histogram::<NoLabelSet>(*sum, *count, buckets, None)?,
                    Value::Number(v) => {
                        let integral = v.fract() == 0.0 && v.abs() < 1e15;
                        match (f.kind, integral) {
                            (MetricType::Counter, true) if *v >= 0.0 => {
                                m.encode_counter::<NoLabelSet, _, u64>(&(*v as u64), None)?
                            }
                            (MetricType::Counter, _) => {
                                m.encode_counter::<NoLabelSet, _, f64>(v, None)?
                            }
                            (_, true) => m.encode_gauge(&(*v as i64))?,
                            (_, false) => m.encode_gauge(v)?,
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// `process_*` metrics of this process (Linux `/proc/self`), as the Prometheus client
/// libraries name them, plus `barrage_build_info`.
pub fn write_process(w: &mut Writer, role: &str) {
    w.family(
        "barrage_build_info",
        "gauge",
        "Always 1; the labels say which build and role this process runs.",
    );
    w.sample(
        "barrage_build_info",
        &[("version", env!("CARGO_PKG_VERSION")), ("role", role)],
        1.0,
    );
    let Some(p) = ProcessStats::read() else {
        return;
    };
    let fams: [(&str, &str, &str, f64); 6] = [
        (
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time spent in seconds.",
            p.cpu_s,
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            p.rss_bytes,
        ),
        (
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            p.vsize_bytes,
        ),
        (
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            p.open_fds,
        ),
        (
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            p.max_fds,
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            p.start_time_s,
        ),
    ];
    for (name, kind, help, v) in fams {
        w.metric(name, kind, help, &[(&[], v)]);
    }
    w.metric(
        "process_threads",
        "gauge",
        "Number of OS threads in the process.",
        &[(&[], p.threads)],
    );
}

/// What `/proc/self` says about this process.
struct ProcessStats {
    cpu_s: f64,
    rss_bytes: f64,
    vsize_bytes: f64,
    open_fds: f64,
    max_fds: f64,
    start_time_s: f64,
    threads: f64,
}

impl ProcessStats {
    fn read() -> Option<ProcessStats> {
        // Clock ticks and page size are 100 and 4096 on every Linux we run on (x86_64, aarch64).
        const TICKS_PER_S: f64 = 100.0;
        const PAGE_BYTES: f64 = 4096.0;
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // Field numbers per proc(5), minus 3 (pid and comm are gone, state is index 0).
        let (utime, stime, threads, starttime, vsize, rss) =
            (num(11), num(12), num(17), num(19), num(20), num(21));
        let boot_s = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        let open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count()) as f64;
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Max open files"))
                    .and_then(|l| l.split_whitespace().nth(3))
                    .and_then(|v| v.parse::<f64>().ok())
            })
            .unwrap_or(0.0);
        Some(ProcessStats {
            cpu_s: (utime + stime) / TICKS_PER_S,
            rss_bytes: rss * PAGE_BYTES,
            vsize_bytes: vsize,
            open_fds,
            max_fds,
            start_time_s: boot_s + starttime / TICKS_PER_S,
            threads,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_escapes() {
        let mut w = Writer::default();
        w.family(
            "barrage_conns",
            "gauge",
            "Open connections.\nPer shard \\ role.",
        );
        w.sample(
            "barrage_conns",
            &[("shard", "0"), ("room", "a\"b\\c\nd")],
            42.0,
        );
        w.metric("barrage_ratio", "gauge", "R.", &[(&[], 0.5)]);
        w.metric("barrage_x", "gauge", "X.", &[(&[], f64::INFINITY)]);
        // A sample without a family is kept, untyped.
        w.sample("barrage_y", &[], f64::NAN);
        assert_eq!(
            w.finish(),
            "# HELP barrage_conns Open connections.\\nPer shard \\\\ role.\n\
             # TYPE barrage_conns gauge\n\
             barrage_conns{shard=\"0\",room=\"a\\\"b\\\\c\\nd\"} 42\n\
             # HELP barrage_ratio R.\n\
             # TYPE barrage_ratio gauge\n\
             barrage_ratio 0.5\n\
             # HELP barrage_x X.\n\
             # TYPE barrage_x gauge\n\
             barrage_x +Inf\n\
             # HELP barrage_y \n\
             # TYPE barrage_y untyped\n\
             barrage_y NaN\n"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_summed_over_parts() {
        static B: [u64; 2] = [10, 100];
        let (a, b) = (Histogram::new(&B), Histogram::new(&B));
        a.observe(5);
        a.observe(10);
        b.observe(50);
        b.observe(1000);
        let mut w = Writer::default();
        w.family("h_seconds", "histogram", "H.");
        w.histogram("h_seconds", &[("route", "x")], &[&a, &b], 0.001);
        assert_eq!(
            w.finish(),
            "# HELP h_seconds H.\n# TYPE h_seconds histogram\n\
             h_seconds_bucket{route=\"x\",le=\"0.01\"} 2\n\
             h_seconds_bucket{route=\"x\",le=\"0.1\"} 3\n\
             h_seconds_bucket{route=\"x\",le=\"+Inf\"} 4\n\
             h_seconds_sum{route=\"x\"} 1.065\n\
             h_seconds_count{route=\"x\"} 4\n"
        );
    }

    /// What one observation costs next to the relaxed counter add the hot paths already make:
    /// `cargo test -p net --release --lib observe_cost -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn observe_cost() {
        const N: u64 = 20_000_000;
        let h = Histogram::latency();
        let c = AtomicU64::new(0);
        let t = std::time::Instant::now();
        for i in 0..N {
            c.fetch_add(std::hint::black_box(i) & 1, Relaxed);
        }
        let counter_ns = t.elapsed().as_nanos() as f64 / N as f64;
        let t = std::time::Instant::now();
        for i in 0..N {
            h.observe(std::hint::black_box(i) % 20_000);
        }
        let observe_ns = t.elapsed().as_nanos() as f64 / N as f64;
        let t = std::time::Instant::now();
        for _ in 0..N / 10 {
            h.observe_since(std::hint::black_box(t));
        }
        let since_ns = t.elapsed().as_nanos() as f64 / (N / 10) as f64;
        println!(
            "relaxed add {counter_ns:.1} ns, observe {observe_ns:.1} ns, observe_since (clock read) {since_ns:.1} ns"
        );
        assert_eq!(h.count(), N + N / 10);
    }

    #[test]
    fn process_metrics_read_this_process() {
        let mut w = Writer::default();
        write_process(&mut w, "test");
        let out = w.finish();
        assert!(out.contains("barrage_build_info{version="), "{out}");
        let line = out
            .lines()
            .find(|l| l.starts_with("process_open_fds "))
            .unwrap();
        let fds: f64 = line.split(' ').nth(1).unwrap().parse().unwrap();
        assert!(fds >= 3.0, "{line}");
        let rss = out
            .lines()
            .find(|l| l.starts_with("process_resident_memory_bytes "))
            .unwrap();
        assert!(!rss.ends_with(" 0"), "{rss}");
    }

    #[test]
    fn metric_writes_the_family_then_each_sample() {
        let mut w = Writer::default();
        w.metric(
            "barrage_t_total",
            "counter",
            "T.",
            &[(&[("k", "a")], 1.0), (&[], 2.0)],
        );
        assert_eq!(
            w.finish(),
            "# HELP barrage_t_total T.\n# TYPE barrage_t_total counter\nbarrage_t_total{k=\"a\"} 1\nbarrage_t_total 2\n"
        );
    }
}
