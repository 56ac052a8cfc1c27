//! Measurements, not tests: run in release and read the output.
//!
//! ```text
//! cargo test -p broker --release --test bench -- --ignored --nocapture --test-threads 1
//! ```

mod common;

use broker::{IngestClient, Message};
use common::corpus::Corpus;
use common::*;
use proto::container::{fit_lgwin, BrotliParams};
use proto::id::Priority;
use proto::link::{Hello, Interest, LinkFrame};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

fn inner_run(bodies: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in bodies {
        proto::packet::encode(0, 5, 0, b, &mut out);
    }
    out
}

/// CPU seconds this thread has used (utime + stime from /proc, 10 ms ticks): the machine is
/// shared, so wall time would measure the neighbours too.
fn thread_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ut: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let st: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    (ut + st) / 100.0
}

/// Runs `f` over `inputs` until at least `min` CPU time has passed; returns
/// (input MB per CPU-second, average output bytes).
fn measure(inputs: &[Vec<u8>], min: Duration, mut f: impl FnMut(&[u8]) -> usize) -> (f64, f64) {
    let (mut bytes_in, mut bytes_out, mut n) = (0usize, 0usize, 0usize);
    let c0 = thread_cpu();
    while thread_cpu() - c0 < min.as_secs_f64() {
        for i in inputs {
            bytes_out += f(i);
            bytes_in += i.len();
            n += 1;
        }
    }
    (
        bytes_in as f64 / (thread_cpu() - c0) / 1e6,
        bytes_out as f64 / n as f64,
    )
}

#[test]
#[ignore]
fn compression_sweep() {
    let mut corpus = Corpus::new(42);
    let sample: Vec<Vec<u8>> = (0..10_000).map(|_| corpus.next_body()).collect();
    let avg = sample.iter().map(Vec::len).sum::<usize>() as f64 / sample.len() as f64;
    println!("corpus: {} messages, average body {avg:.0} B", sample.len());
    let min = Duration::from_millis(500);
    println!(
        "{:>5} {:>8} | {:>12} | brotli q: out B (saving vs zlib) MB/s",
        "msgs", "inner B", "zlib B MB/s"
    );
    for n in [1usize, 2, 5, 10, 20, 40] {
        let inputs: Vec<Vec<u8>> = sample.chunks(n).take(200).map(inner_run).collect();
        let inner = inputs.iter().map(Vec::len).sum::<usize>() as f64 / inputs.len() as f64;
        let (zs, zout) = measure(&inputs, min, |i| proto::container::zlib_compress(i).len());
        let mut line = format!("{n:>5} {inner:>8.0} | {zout:>6.0} {zs:>5.0} |");
        for q in [1u32, 2, 3, 4, 5, 6, 7, 9] {
            let (bs, bout) = measure(&inputs, min, |i| {
                proto::container::brotli_compress(
                    i,
                    BrotliParams {
                        quality: q,
                        lgwin: fit_lgwin(i.len(), 16),
                    },
                )
                .len()
            });
            line.push_str(&format!(
                " q{q}: {bout:.0} ({:+.0}%) {bs:.0}",
                (bout / zout - 1.0) * 100.0
            ));
        }
        println!("{line}");
    }
    // The window: fitted vs the default 22, quality 5, 40 messages.
    let inputs: Vec<Vec<u8>> = sample.chunks(40).take(100).map(inner_run).collect();
    for lgwin in [0u32, 16, 22] {
        let (s, out) = measure(&inputs, min, |i| {
            let w = if lgwin == 0 {
                fit_lgwin(i.len(), 24)
            } else {
                lgwin
            };
            proto::container::brotli_compress(
                i,
                BrotliParams {
                    quality: 5,
                    lgwin: w,
                },
            )
            .len()
        });
        println!(
            "40 msgs q5 lgwin {}: {out:.0} B at {s:.0} MB/s",
            if lgwin == 0 {
                "fitted".to_string()
            } else {
                lgwin.to_string()
            }
        );
    }
}

/// Reads one link (no decompression) and counts the messages in BATCH frames.
fn count_messages(mut s: std::net::TcpStream, want: u64) -> (u64, u64) {
    let mut buf = Vec::with_capacity(1 << 20);
    let mut chunk = vec![0u8; 1 << 16];
    let (mut msgs, mut bytes) = (0u64, 0u64);
    while msgs < want {
        let n = match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        bytes += n as u64;
        buf.extend_from_slice(&chunk[..n]);
        let mut at = 0;
        while let Ok(len) = proto::link::frame_len(&buf[at..], u32::MAX) {
            if buf.len() - at < len {
                break;
            }
            // kind byte at offset 5; BATCH carries msg_count somewhere in its header: decode it.
            let frame = bytes::Bytes::copy_from_slice(&buf[at..at + len]);
            match proto::link::decode(&frame, u32::MAX) {
                Ok((LinkFrame::Batch(b), _)) => msgs += b.msg_count as u64,
                Ok((LinkFrame::Ping { nonce }, _)) => {
                    let mut out = Vec::new();
                    proto::link::encode(&LinkFrame::Pong { nonce }, &mut out);
                    let _ = s.write_all(&out);
                }
                _ => {}
            }
            at += len;
        }
        buf.drain(..at);
    }
    (msgs, bytes)
}

fn thread_cpu_secs(name_prefix: &str) -> f64 {
    let tick = 100.0; // USER_HZ on Linux
    let mut total = 0.0;
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    for t in dir.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !comm.trim().starts_with(name_prefix) {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
        let f: Vec<&str> = after.split_whitespace().collect();
        // fields after ')' start at state (3rd field overall): utime is field 14, stime 15.
        let ut: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        let st: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        total += (ut + st) / tick;
    }
    total
}

/// One broker shard, one edge link watching every room: messages per second accepted,
/// aggregated, compressed (brotli) and sent, and per CPU-second of the shard thread.
fn throughput(label: &str, messages: u64, rooms: u64, tweak: impl FnOnce(&mut broker::Config)) {
    let mut cfg = config();
    tweak(&mut cfg);
    cfg.shards = 1;
    cfg.queue_messages_max = 1 << 16;
    // The edge reader shares the cores with the broker; do not cut it for falling behind.
    cfg.link_queue_bytes_max = 1 << 30;
    let broker = broker::start(cfg).unwrap();
    // A raw edge link: Hello, SUB every room, then count.
    let mut s = std::net::TcpStream::connect(broker.link_addr()).unwrap();
    let mut out = Vec::new();
    proto::link::encode(
        &LinkFrame::Hello(Hello {
            node_id: "bench".into(),
            region: "".into(),
            shards: 1,
            link_shard: 0,
            priority: Priority::Low,
            capabilities: 0,
        }),
        &mut out,
    );
    for r in 0..rooms {
        proto::link::encode(
            &LinkFrame::Sub {
                interest: Interest::Room(proto::id::RoomId(r)),
                encodings: 4,
            },
            &mut out,
        );
    }
    s.write_all(&out).unwrap();
    eventually("subs", || {
        metric(&broker.metrics_text(), "barrage_broker_rooms_watched") >= rooms as f64
    });
    let reader = s.try_clone().unwrap();
    let counter = std::thread::spawn(move || count_messages(reader, messages));

    let mut corpus = Corpus::new(7);
    let msgs: Vec<Message> = (0..messages)
        .map(|i| Message::room(i % rooms, corpus.next_body()))
        .collect();
    let body_bytes: usize = msgs.iter().map(|m| m.body.len()).sum();
    let cpu0 = thread_cpu_secs("broker-0");
    let t0 = Instant::now();
    let mut c = IngestClient::connect(broker.ingest_addr(), KEY).unwrap();
    for chunk in msgs.chunks(10_000) {
        for r in c.push_many(chunk).unwrap() {
            r.unwrap();
        }
    }
    let (got, link_bytes) = counter.join().unwrap();
    let all = t0.elapsed();
    let cpu = thread_cpu_secs("broker-0") - cpu0;
    let text = broker.metrics_text();
    assert_eq!(got, messages, "{text}");
    let batches = metric(&text, "barrage_broker_batches_total");
    println!(
        "{label}: {messages} msgs ({:.0} B avg) into {rooms} rooms, {batches} batches ({:.1} msgs/batch): \
         {:.0} msg/s end to end (client, broker and edge reader share 2 cores); \
         shard thread CPU {cpu:.2} s = {:.0} msg per CPU-second; link bytes {:.1}% of bodies",
        body_bytes as f64 / messages as f64,
        messages as f64 / batches,
        messages as f64 / all.as_secs_f64(),
        messages as f64 / cpu,
        link_bytes as f64 / body_bytes as f64 * 100.0
    );
    broker.shutdown();
}

#[test]
#[ignore]
fn broker_throughput_hot_rooms() {
    throughput("hot rooms", 200_000, 100, |_| {});
}

#[test]
#[ignore]
fn broker_throughput_quiet_rooms() {
    throughput("quiet rooms", 100_000, 20_000, |_| {});
}

/// The same with `brotli_quality` (5) for every batch size: what `brotli_quality_small` saves.
#[test]
#[ignore]
fn broker_throughput_quiet_rooms_one_quality() {
    throughput("quiet rooms, q5 for all", 100_000, 20_000, |c| {
        c.brotli_small_bytes_max = 0
    });
}

/// Hot rooms with quality 4 for comparison.
#[test]
#[ignore]
fn broker_throughput_hot_rooms_q4() {
    throughput("hot rooms, q4", 200_000, 100, |c| c.brotli_quality = 4);
}
