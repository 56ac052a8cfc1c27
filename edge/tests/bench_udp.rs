//! UDP fan-out benchmark (issue 11), not a test (ignored; it reports numbers):
//!
//! ```text
//! BENCH_VIEWERS=1000 BENCH_BATCHES=300 cargo test --release -p edge --test bench_udp -- --ignored --nocapture --exact bench_udp_fanout
//! BENCH_VIEWERS=1000 BENCH_BATCHES=300 cargo test --release -p edge --test bench -- --ignored --nocapture --exact bench_fanout_legacy   # the TCP baseline
//! ```
//! One shard, `BENCH_VIEWERS` UDP viewers of one room (plain encoding, so a 900-byte batch is
//! one datagram each), `BENCH_BATCHES` batches from a test broker. The viewers live in this
//! process but never read after their handshake (the kernel drops what overflows their socket
//! buffers), so the CPU of this process during the fan-out is the edge's. Reports datagrams
//! sent per second of wall time and per CPU-second, and how many the shard's outbox dropped.

mod common;

use common::*;
use net::runtime::Driver;
use proto::id::Encoding;
use proto::udp::{self as wire, ServerDatagram};
use std::net::UdpSocket;
use std::time::{Duration, Instant};

const ROOM: u64 = 79;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = s.rsplit_once(')').map(|(_, a)| a).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn viewer(to: std::net::SocketAddr, uid: u64) -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let auth = auth_packet(uid, ROOM, 0, token(uid, ROOM, 1));
    let mut b = [0u8; 2048];
    s.send_to(&auth, to).unwrap();
    let n = s.recv(&mut b).unwrap();
    let ServerDatagram::Cookie(c) = wire::decode_server(&b[..n], 1200).unwrap() else {
        panic!("no cookie")
    };
    let mut hello = wire::cookie_datagram(&c);
    hello.extend_from_slice(&auth);
    s.send_to(&hello, to).unwrap();
    let n = s.recv(&mut b).unwrap();
    assert!(matches!(
        wire::decode_server(&b[..n], 1200),
        Ok(ServerDatagram::AuthReply {
            session: Some(_),
            ..
        })
    ));
    s
}

#[test]
#[ignore]
fn bench_udp_fanout() {
    let viewers = env_usize("BENCH_VIEWERS", 1_000);
    let batches = env_usize("BENCH_BATCHES", 300);
    let broker = TestBroker::start(1);
    let edge = edge::start(edge::Config {
        shards: 1,
        udp_addr: "127.0.0.1:0".into(),
        udp_datagrams_per_addr_per_s: 0,
        ..edge_config(Driver::Auto, vec![broker.addr_string()])
    })
    .unwrap();
    broker.wait_links(2);
    let to = edge.udp_addr().unwrap();
    let socks: Vec<UdpSocket> = (0..viewers).map(|i| viewer(to, 1_000 + i as u64)).collect();
    broker.wait_seen("SUB", |s| s.iter().any(|x| matches!(x, Seen::Sub(..))));
    let bs: Vec<_> = (1..=batches as u64)
        .map(|s| room_batch(ROOM, s, Encoding::Plain, 900))
        .collect();
    let want = (viewers * batches) as f64;
    let base = metric_sum(&edge.metrics_text(), "barrage_edge_udp_datagrams_out_total");
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    for b in &bs {
        broker.send(b);
    }
    let done = |m: &str| {
        metric_sum(m, "barrage_edge_udp_datagrams_out_total") - base
            + metric(m, "barrage_edge_udp_dropped_total{reason=\"outbox_full\"}")
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    while done(&edge.metrics_text()) < want {
        assert!(Instant::now() < deadline, "fan-out did not finish");
        std::thread::sleep(Duration::from_millis(2));
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let m = edge.metrics_text();
    let sent = metric_sum(&m, "barrage_edge_udp_datagrams_out_total") - base;
    let dropped = metric(&m, "barrage_edge_udp_dropped_total{reason=\"outbox_full\"}");
    println!(
        "BENCH udp_fanout driver={} viewers={viewers} batches={batches} batch_bytes={} datagrams_sent={sent} outbox_dropped={dropped} wall_s={wall:.3} sends_per_s={:.0} process_cpu_s={cpu:.3} sends_per_cpu_s={:.0}",
        std::env::var("BARRAGE_DRIVER").unwrap_or_else(|_| "auto".into()),
        bs[0].packet.len(),
        sent / wall,
        sent / cpu.max(1e-9),
    );
    drop(socks);
    edge.shutdown();
}
