//! A Prometheus text-format writer. Each role keeps its counters in plain per-shard structs
//! (no atomics on hot paths where a shard owns them) and renders them through this writer.
//!
//! Output follows the text exposition format 0.0.4: label values escape `\`, `"` and newline;
//! HELP text escapes `\` and newline; non-finite values print as `NaN`, `+Inf`, `-Inf`.

use std::fmt::Write;

/// The `Content-Type` to serve this text with.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

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
        if value.is_nan() {
            self.out.push_str("NaN");
        } else if value.is_infinite() {
            self.out.push_str(if value > 0.0 { "+Inf" } else { "-Inf" });
        } else if value.fract() == 0.0 && value.abs() < 1e15 {
            // Integral counters print without a trailing ".0" or exponent.
            let _ = write!(self.out, "{}", value as i64);
        } else {
            let _ = write!(self.out, "{value}");
        }
        self.out.push('\n');
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
