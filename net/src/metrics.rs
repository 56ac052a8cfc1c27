//! A Prometheus text-format writer. Each role keeps its counters in plain per-shard structs
//! (no atomics on hot paths where a shard owns them) and renders them through this writer.
//!
//! Output follows the text exposition format 0.0.4: label values escape `\`, `"` and newline;
//! HELP text escapes `\` and newline; non-finite values print as `NaN`, `+Inf`, `-Inf`.

use std::fmt::Write;
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

/// Appends Prometheus text exposition.
#[derive(Default)]
pub struct Writer {
    pub out: String,
}

impl Writer {
    /// `# HELP` and `# TYPE` lines for a family.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        self.out.push_str("# HELP ");
        self.out.push_str(name);
        self.out.push(' ');
        for c in help.chars() {
            match c {
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                c => self.out.push(c),
            }
        }
        self.out.push('\n');
        self.out.push_str("# TYPE ");
        self.out.push_str(name);
        self.out.push(' ');
        self.out.push_str(kind);
        self.out.push('\n');
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

    /// One histogram series, the sum of `parts` (per-shard histograms with the same bounds),
    /// each value multiplied by `scale` (1e-6 turns microseconds into seconds).
    pub fn histogram(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        parts: &[&Histogram],
        scale: f64,
    ) {
        let Some(first) = parts.first() else { return };
        let mut cumulative = 0u64;
        let bucket = format!("{name}_bucket");
        for (i, bound) in first.bounds.iter().map(Some).chain([None]).enumerate() {
            cumulative += parts
                .iter()
                .map(|h| h.counts.get(i).map_or(0, |c| c.load(Relaxed)))
                .sum::<u64>();
            let le = match bound {
                Some(b) => format_value(*b as f64 * scale),
                None => "+Inf".to_string(),
            };
            let mut l: Vec<(&str, &str)> = labels.to_vec();
            l.push(("le", &le));
            self.sample(&bucket, &l, cumulative as f64);
        }
        let sum: u64 = parts.iter().map(|h| h.sum.load(Relaxed)).sum();
        self.sample(&format!("{name}_sum"), labels, sum as f64 * scale);
        self.sample(&format!("{name}_count"), labels, cumulative as f64);
    }

    /// One sample line: `name{k="v",...} value`.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(k);
                self.out.push_str("=\"");
                for c in v.chars() {
                    match c {
                        '\\' => self.out.push_str("\\\\"),
                        '"' => self.out.push_str("\\\""),
                        '\n' => self.out.push_str("\\n"),
                        c => self.out.push(c),
                    }
                }
                self.out.push('"');
            }
            self.out.push('}');
        }
        self.out.push(' ');
        self.out.push_str(&format_value(value));
        self.out.push('\n');
    }
}

fn format_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_string()
    } else if value.is_infinite() {
        (if value > 0.0 { "+Inf" } else { "-Inf" }).to_string()
    } else if value.fract() == 0.0 && value.abs() < 1e15 {
        // Integral counters print without a trailing ".0" or exponent.
        format!("{}", value as i64)
    } else {
        let mut s = String::new();
        let _ = write!(s, "{value}");
        s
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
        w.sample("barrage_ratio", &[], 0.5);
        w.sample("barrage_x", &[], f64::INFINITY);
        w.sample("barrage_y", &[], f64::NAN);
        assert_eq!(
            w.out,
            "# HELP barrage_conns Open connections.\\nPer shard \\\\ role.\n\
             # TYPE barrage_conns gauge\n\
             barrage_conns{shard=\"0\",room=\"a\\\"b\\\\c\\nd\"} 42\n\
             barrage_ratio 0.5\n\
             barrage_x +Inf\n\
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
        w.histogram("h_seconds", &[("route", "x")], &[&a, &b], 0.001);
        assert_eq!(
            w.out,
            "h_seconds_bucket{route=\"x\",le=\"0.01\"} 2\n\
             h_seconds_bucket{route=\"x\",le=\"0.1\"} 3\n\
             h_seconds_bucket{route=\"x\",le=\"+Inf\"} 4\n\
             h_seconds_sum{route=\"x\"} 1.065\n\
             h_seconds_count{route=\"x\"} 4\n"
        );
    }

    #[test]
    fn process_metrics_read_this_process() {
        let mut w = Writer::default();
        write_process(&mut w, "test");
        assert!(w.out.contains("barrage_build_info{version="));
        let line = w
            .out
            .lines()
            .find(|l| l.starts_with("process_open_fds "))
            .unwrap();
        let fds: f64 = line.split(' ').nth(1).unwrap().parse().unwrap();
        assert!(fds >= 3.0, "{line}");
        let rss = w
            .out
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
            w.out,
            "# HELP barrage_t_total T.\n# TYPE barrage_t_total counter\nbarrage_t_total{k=\"a\"} 1\nbarrage_t_total 2\n"
        );
    }
}
