//! WSS vs WS benchmarks (issue 11), not tests (ignored; they report numbers):
//!
//! ```text
//! cargo test --release -p edge --test bench_wss -- --ignored --nocapture --exact bench_wss_idle_memory_ws
//! cargo test --release -p edge --test bench_wss -- --ignored --nocapture --exact bench_wss_idle_memory_wss
//! cargo test --release -p edge --test bench_wss -- --ignored --nocapture --exact bench_wss_fanout_ws
//! cargo test --release -p edge --test bench_wss -- --ignored --nocapture --exact bench_wss_fanout_wss
//! ```
//! Run each in its own process (as above): the idle figure is the RSS growth of this process
//! (the edge) per authenticated idle viewer, so nothing else may have run in it.
//! - `bench_wss_idle_memory_*`: `BENCH_IDLE_CONNS` (default 5,000) WebSocket viewers, plain or
//!   over TLS 1.3, held by a child process (this binary re-executed as `wss_viewers_helper`).
//! - `bench_wss_fanout_*`: one shard, `BENCH_VIEWERS` (2,000) viewers of one room that drain
//!   their sockets without decrypting, `BENCH_BATCHES` (500) batches of 900 B; sends per second
//!   of wall time and per CPU-second of the edge process. The WSS figure includes sealing every
//!   send for its connection (TLS keys are per connection).

mod common;

use common::*;
use net::runtime::Driver;
use proto::id::Encoding;
use proto::ws::{self, Opcode};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ROOM: u64 = 78;

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

/// A plain or TLS byte stream for the viewers' setup.
enum Wire {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Wire {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Wire::Plain(s) => s.read(b),
            Wire::Tls(t) => t.read(b),
        }
    }
    fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            Wire::Plain(s) => s.write_all(b),
            Wire::Tls(t) => t.write_all(b),
        }
    }
    fn socket(self) -> TcpStream {
        match self {
            Wire::Plain(s) => s,
            Wire::Tls(t) => t.sock,
        }
    }
}

/// Connects one viewer: (TLS,) upgrade, auth; returns its socket once authenticated.
fn viewer(
    addr: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
    uid: u64,
) -> std::io::Result<(TcpStream, Option<rustls::ClientConnection>)> {
    let sock = TcpStream::connect(addr)?;
    sock.set_nodelay(true)?;
    let mut w = match tls {
        Some(cfg) => {
            let c = rustls::ClientConnection::new(
                cfg.clone(),
                rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            )
            .map_err(std::io::Error::other)?;
            Wire::Tls(Box::new(rustls::StreamOwned::new(c, sock)))
        }
        None => Wire::Plain(sock),
    };
    w.write_all(&ws_upgrade_request("/sub"))?;
    let auth = auth_packet(uid, ROOM, 0, token(uid, ROOM, 1));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    let mut sent = false;
    // 101 head, then the auth reply (26 bytes in a 2-byte-header binary frame).
    loop {
        let head_end = buf.windows(4).position(|x| x == b"\r\n\r\n").map(|p| p + 4);
        if let Some(end) = head_end {
            if !sent {
                w.write_all(&ws::encode_client_frame(
                    Opcode::Binary,
                    &auth,
                    [9, 8, 7, 6],
                ))?;
                sent = true;
            }
            if buf.len() >= end + 28 {
                break;
            }
        }
        let n = w.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::other("closed during setup"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(match w {
        Wire::Tls(t) => {
            let t = *t;
            (t.sock, Some(t.conn))
        }
        w => (w.socket(), None),
    })
}

fn client_config(ca: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in net::tls::load_certs(std::path::Path::new(ca)).unwrap() {
        roots.add(c).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(net::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// The child side: `VIEWERS_N` viewers (TLS when `VIEWERS_CA` is set), set up one by one;
/// prints `READY n`, then idles, or (mode `read`) drains every socket raw until killed.
#[test]
#[ignore]
fn wss_viewers_helper() {
    let Ok(addr) = std::env::var("VIEWERS_ADDR") else {
        return;
    };
    let n = env_usize("VIEWERS_N", 1000);
    let read_mode = std::env::var("VIEWERS_MODE").as_deref() == Ok("read");
    let tls = std::env::var("VIEWERS_CA")
        .ok()
        .map(|ca| client_config(&ca));
    let _ = net::sys::raise_nofile_limit();
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        std::process::exit(0);
    });
    let mut socks = Vec::with_capacity(n);
    let mut states = Vec::with_capacity(n);
    for i in 0..n {
        match viewer(&addr, tls.as_ref(), i as u64 + 1) {
            Ok((s, c)) => {
                socks.push(s);
                states.push(c);
            }
            Err(e) => eprintln!("viewer {i}: {e}"),
        }
    }
    println!("READY {}", socks.len());
    if !read_mode {
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    // Drain raw bytes (no decryption: the edge's cost is what is measured).
    for s in &socks {
        s.set_nonblocking(true).unwrap();
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut got = 0;
        for s in socks.iter_mut() {
            while let Ok(k) = s.read(&mut buf) {
                if k == 0 {
                    break;
                }
                got += k;
            }
        }
        if got == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn spawn_viewers(
    addr: std::net::SocketAddr,
    n: usize,
    mode: &str,
    ca: Option<&std::path::Path>,
) -> Child {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args([
        "--ignored",
        "--exact",
        "wss_viewers_helper",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("VIEWERS_ADDR", addr.to_string())
    .env("VIEWERS_N", n.to_string())
    .env("VIEWERS_MODE", mode)
    .stdout(Stdio::piped())
    .stdin(Stdio::piped());
    if let Some(ca) = ca {
        cmd.env("VIEWERS_CA", ca);
    }
    let mut child = cmd.spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    loop {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            let _ = child.kill();
            panic!("viewers exited before READY");
        }
        if let Some(rest) = line.trim().split("READY ").nth(1) {
            assert_eq!(rest.parse::<usize>().unwrap(), n, "viewers authenticated");
            break;
        }
    }
    child
}

/// An edge with WSS on (WS too); returns it and the CA file.
fn start(shards: usize, brokers: Vec<String>) -> (edge::Handle, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("edge-bench-wss-{}", std::process::id()));
    let made = net::tls::self_signed(&dir).unwrap();
    let mut cfg = edge::Config {
        wss_addr: "127.0.0.1:0".into(),
        tls_cert_path: made.cert_path.display().to_string(),
        tls_key_path: made.key_path.display().to_string(),
        ..edge_config(Driver::Auto, brokers)
    };
    cfg.shards = shards;
    cfg.timer_tick_ms = 50;
    cfg.send_queue_bytes_max = 1 << 30;
    (edge::start(cfg).unwrap(), made.cert_path)
}

fn idle_memory(wss: bool) {
    let n = env_usize("BENCH_IDLE_CONNS", 5_000);
    let (edge, ca) = start(2, vec![]);
    let addr = if wss {
        edge.wss_addr().unwrap()
    } else {
        edge.ws_addr()
    };
    std::thread::sleep(Duration::from_millis(300));
    let rss0 = net::sys::rss_bytes();
    let mut child = spawn_viewers(addr, n, "idle", wss.then_some(ca.as_path()));
    while edge.connections() as usize != n {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    let rss1 = net::sys::rss_bytes();
    println!(
        "BENCH wss_idle_memory transport={} conns={n} rss_before={rss0} rss_after={rss1} bytes_per_conn={:.0}",
        if wss { "wss" } else { "ws" },
        rss1.saturating_sub(rss0) as f64 / n as f64
    );
    let _ = child.kill();
    let _ = child.wait();
    edge.shutdown();
}

fn fanout(wss: bool) {
    let viewers = env_usize("BENCH_VIEWERS", 2_000);
    let batches = env_usize("BENCH_BATCHES", 500);
    let broker = TestBroker::start(1);
    let (edge, ca) = start(1, vec![broker.addr_string()]);
    broker.wait_links(2);
    let addr = if wss {
        edge.wss_addr().unwrap()
    } else {
        edge.ws_addr()
    };
    let mut child = spawn_viewers(addr, viewers, "read", wss.then_some(ca.as_path()));
    broker.wait_seen("SUB", |s| s.iter().any(|x| matches!(x, Seen::Sub(..))));
    let bs: Vec<_> = (1..=batches as u64)
        .map(|s| room_batch(ROOM, s, Encoding::Plain, 900))
        .collect();
    let sends_want = (viewers * batches) as f64;
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    for b in &bs {
        broker.send(b);
    }
    // Every send written (bytes_out counts plaintext on both transports).
    let len = bs[0].packet.len();
    let per_send = (len + if len < 126 { 2 } else { 4 }) as f64;
    let deadline = Instant::now() + Duration::from_secs(300);
    while metric_sum(&edge.metrics_text(), "barrage_edge_bytes_out_total") < sends_want * per_send {
        assert!(Instant::now() < deadline, "fan-out did not finish");
        std::thread::sleep(Duration::from_millis(2));
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let m = edge.metrics_text();
    let sends = metric_sum(&m, "barrage_edge_sends_total");
    let writes = metric_sum(&m, "barrage_edge_writes_total");
    println!(
        "BENCH wss_fanout transport={} viewers={viewers} batches={batches} batch_bytes={len} sends={sends} wall_s={wall:.3} sends_per_s={:.0} edge_cpu_s={cpu:.3} sends_per_cpu_s={:.0} batches_per_write={:.1}",
        if wss { "wss" } else { "ws" },
        sends / wall,
        sends / cpu.max(1e-9),
        sends / writes.max(1.0),
    );
    let _ = child.kill();
    let _ = child.wait();
    edge.shutdown();
}

#[test]
#[ignore]
fn bench_wss_idle_memory_ws() {
    idle_memory(false);
}

#[test]
#[ignore]
fn bench_wss_idle_memory_wss() {
    idle_memory(true);
}

#[test]
#[ignore]
fn bench_wss_fanout_ws() {
    fanout(false);
}

#[test]
#[ignore]
fn bench_wss_fanout_wss() {
    fanout(true);
}
