//! The compression bench: the article's table (zlib vs brotli for batches of 2/10/20/40
//! messages) on the corpus, and compression speed per core at each brotli quality.
//!
//! "Original" is the inner run of op-5 packets exactly as the broker compresses it: each body
//! with its 16-byte header. Compressed sizes are the compressed bodies (the outer packet adds
//! 16 bytes to each, the same for both). Batches are consecutive corpus messages, like a room's
//! pending batch; every figure is the mean over `--batches` batches.

use std::time::{Duration, Instant};

use proto::container::{brotli_compress, fit_lgwin, zlib_compress, BrotliParams, BROTLI_LGWIN_MAX};
use proto::packet::{self, op, ver};
use serde::Serialize;

use crate::cli::CompressArgs;
use crate::corpus::Corpus;

/// The article's figures, for the side-by-side column: (messages, original, zlib, brotli).
pub const ARTICLE: [(usize, u64, u64, u64); 4] = [
    (2, 1126, 468, 390),
    (10, 4706, 1728, 1423),
    (20, 9505, 2674, 2172),
    (40, 19387, 3161, 2488),
];

/// One row of the size table.
#[derive(Clone, Debug, Serialize)]
pub struct SizeRow {
    pub messages: usize,
    pub batches: usize,
    pub original_bytes: f64,
    pub zlib_bytes: f64,
    pub brotli_bytes: f64,
    pub zlib_ratio: f64,
    pub brotli_ratio: f64,
    /// 1 - brotli/zlib, in percent.
    pub brotli_saving_pct: f64,
    /// Brotli at quality 11 (the library default and the densest), for comparison: the
    /// article does not say which quality it used.
    pub brotli_q11_bytes: f64,
    pub brotli_q11_saving_pct: f64,
}

/// One row of the speed table.
#[derive(Clone, Debug, Serialize)]
pub struct SpeedRow {
    /// "brotli" or "zlib".
    pub codec: String,
    /// Brotli quality (zlib: its default level, 6).
    pub quality: u32,
    /// Input MB (10^6 bytes) compressed per CPU-second of one core.
    pub mb_per_s: f64,
    /// Batches per second on one core.
    pub batches_per_s: f64,
    /// Mean compressed size of a `speed_batch` batch.
    pub compressed_bytes: f64,
    /// original / compressed for those batches.
    pub ratio: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub scenario: &'static str,
    pub seed: u64,
    pub brotli_quality: u32,
    pub sizes: Vec<SizeRow>,
    pub speed_batch_messages: usize,
    pub speed: Vec<SpeedRow>,
}

/// A batch as the broker builds it: the op-5 packets back to back.
fn batch(corpus: &mut Corpus, messages: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..messages {
        packet::encode(
            ver::PLAIN,
            op::NOTIFICATION,
            0,
            &corpus.next_body(),
            &mut out,
        );
    }
    out
}

/// Brotli parameters with the window fitted to the batch (the broker does the same).
fn params(quality: u32, input_len: usize) -> BrotliParams {
    BrotliParams {
        quality,
        lgwin: fit_lgwin(input_len, BROTLI_LGWIN_MAX),
    }
}

/// The size table for each batch size.
pub fn size_table(seed: u64, sizes: &[usize], batches: usize, quality: u32) -> Vec<SizeRow> {
    let mut rows = Vec::new();
    for &n in sizes {
        let mut corpus = Corpus::new(seed);
        let (mut orig, mut z, mut b, mut b11) = (0u64, 0u64, 0u64, 0u64);
        for _ in 0..batches.max(1) {
            let input = batch(&mut corpus, n);
            orig += input.len() as u64;
            z += zlib_compress(&input).len() as u64;
            b += brotli_compress(&input, params(quality, input.len())).len() as u64;
            b11 += brotli_compress(&input, params(11, input.len())).len() as u64;
        }
        let k = batches.max(1) as f64;
        let (o, zz, bb) = (orig as f64 / k, z as f64 / k, b as f64 / k);
        let bb11 = b11 as f64 / k;
        rows.push(SizeRow {
            messages: n,
            batches: batches.max(1),
            original_bytes: o,
            zlib_bytes: zz,
            brotli_bytes: bb,
            zlib_ratio: o / zz,
            brotli_ratio: o / bb,
            brotli_saving_pct: 100.0 * (1.0 - bb / zz),
            brotli_q11_bytes: bb11,
            brotli_q11_saving_pct: 100.0 * (1.0 - bb11 / zz),
        });
    }
    rows
}

/// Compresses a rotating set of batches for about `bench` and returns the speed row.
fn measure(codec: &str, quality: u32, inputs: &[Vec<u8>], bench: Duration) -> SpeedRow {
    let compress = |input: &[u8]| -> usize {
        if codec == "zlib" {
            zlib_compress(input).len()
        } else {
            brotli_compress(input, params(quality, input.len())).len()
        }
    };
    // One untimed pass warms caches and the allocator.
    let (mut in_bytes, mut out_bytes, mut count) = (0u64, 0u64, 0u64);
    for i in inputs {
        compress(i);
    }
    // Per core means per CPU-second of this thread: the machine may be shared, and wall time
    // would charge us for other processes' turns on the core.
    let start = Instant::now();
    let cpu_start = crate::procstat::thread_cpu_ns();
    let mut elapsed = Duration::ZERO;
    while elapsed < bench {
        for i in inputs {
            out_bytes += compress(i) as u64;
            in_bytes += i.len() as u64;
            count += 1;
        }
        elapsed = start.elapsed();
    }
    let secs = match (cpu_start, crate::procstat::thread_cpu_ns()) {
        (Some(a), Some(b)) if b > a => (b - a) as f64 / 1e9,
        _ => elapsed.as_secs_f64(),
    }
    .max(1e-9);
    SpeedRow {
        codec: codec.to_string(),
        quality,
        mb_per_s: in_bytes as f64 / secs / 1e6,
        batches_per_s: count as f64 / secs,
        compressed_bytes: out_bytes as f64 / count.max(1) as f64,
        ratio: in_bytes as f64 / out_bytes.max(1) as f64,
    }
}

/// Speed per quality on batches of `batch_messages`, plus zlib.
pub fn speed_table(
    seed: u64,
    batch_messages: usize,
    qualities: &[u32],
    bench: Duration,
) -> Vec<SpeedRow> {
    let mut corpus = Corpus::new(seed);
    let inputs: Vec<Vec<u8>> = (0..64)
        .map(|_| batch(&mut corpus, batch_messages))
        .collect();
    let mut rows: Vec<SpeedRow> = qualities
        .iter()
        .map(|&q| measure("brotli", q, &inputs, bench))
        .collect();
    rows.push(measure("zlib", 6, &inputs, bench));
    rows
}

pub fn build(args: &CompressArgs) -> Report {
    Report {
        scenario: "compress",
        seed: args.seed,
        brotli_quality: args.quality,
        sizes: size_table(args.seed, &args.sizes, args.batches, args.quality),
        speed_batch_messages: args.speed_batch,
        speed: speed_table(
            args.seed,
            args.speed_batch,
            &args.qualities,
            Duration::from_millis(args.bench_ms),
        ),
    }
}

/// The human tables (markdown, so they paste into docs/benchmarks.md).
pub fn render(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Sizes (mean per batch, brotli quality {}, window fitted to the batch):\n",
        r.brotli_quality
    );
    let _ = writeln!(
        s,
        "| messages | original B | zlib B | brotli B | zlib ratio | brotli ratio | brotli saves | brotli q11 B (saves) | article: orig / zlib / brotli (saves) |"
    );
    let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for row in &r.sizes {
        let article = ARTICLE
            .iter()
            .find(|a| a.0 == row.messages)
            .map(|a| {
                format!(
                    "{} / {} / {} ({:.1} %)",
                    a.1,
                    a.2,
                    a.3,
                    100.0 * (1.0 - a.3 as f64 / a.2 as f64)
                )
            })
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.1} % | {:.0} ({:.1} %) | {} |",
            row.messages,
            row.original_bytes,
            row.zlib_bytes,
            row.brotli_bytes,
            row.zlib_ratio,
            row.brotli_ratio,
            row.brotli_saving_pct,
            row.brotli_q11_bytes,
            row.brotli_q11_saving_pct,
            article
        );
    }
    let _ = writeln!(
        s,
        "\nSpeed per core (per CPU-second of the compressing thread), batches of {} messages:\n",
        r.speed_batch_messages
    );
    let _ = writeln!(
        s,
        "| codec | quality | MB/s | batches/s | compressed B | ratio |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|");
    for row in &r.speed {
        let _ = writeln!(
            s,
            "| {} | {} | {:.1} | {:.0} | {:.0} | {:.2} |",
            row.codec,
            row.quality,
            row.mb_per_s,
            row.batches_per_s,
            row.compressed_bytes,
            row.ratio
        );
    }
    s
}

pub fn run(args: &CompressArgs) -> anyhow::Result<()> {
    let report = build(args);
    println!("{}", render(&report));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_table_counts_headers_and_compresses() {
        let rows = size_table(1, &[2, 40], 20, 5);
        assert_eq!(rows.len(), 2);
        for r in &rows {
            // Each message carries its 16-byte header.
            assert!(r.original_bytes > 16.0 * r.messages as f64);
            assert!(r.zlib_bytes < r.original_bytes && r.brotli_bytes < r.original_bytes);
        }
        assert!(
            rows[1].brotli_ratio > rows[0].brotli_ratio,
            "bigger batches compress better"
        );
    }

    #[test]
    fn a_batch_is_a_run_of_op5_packets() {
        let mut c = Corpus::new(2);
        let b = batch(&mut c, 5);
        let packets = proto::container::unpack_container(ver::PLAIN, &b, usize::MAX).unwrap();
        assert_eq!(packets.len(), 5);
        assert!(packets
            .iter()
            .all(|p| p.op == op::NOTIFICATION && p.ver == ver::PLAIN));
    }
}
