//! A Prometheus text-format writer. Each role keeps its counters in plain per-shard structs
//! (no atomics on hot paths where a shard owns them) and renders them through this writer.

/// Appends Prometheus text exposition.
#[derive(Default)]
pub struct Writer {
    pub out: String,
}

impl Writer {
    /// `# HELP` and `# TYPE` lines for a family.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        todo!()
    }
    /// One sample line: `name{k="v",...} value`.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        todo!()
    }
}
