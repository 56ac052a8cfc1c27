//! Benchmarks, not tests (ignored; they report numbers and assert only that the run worked):
//!
//! ```text
//! CARGO_TARGET_DIR=... cargo test --release -p edge --test bench -- --ignored --nocapture --test-threads=1 bench_
//! ```
//! - `bench_idle_memory_*`: RSS delta of the edge process per idle authenticated connection at
//!   `BENCH_IDLE_CONNS` (default 19,000) connections, TCP (or WebSocket with `BENCH_IDLE_WS=1`),
//!   every connection a different logged-in user and device (the user/device index's worst
//!   case). The viewers run in a child process (this
//!   test binary re-executed as `viewers_helper`) because one process may hold only 20,000 fds.
//! - `bench_fanout_*`: one shard, `BENCH_VIEWERS` TCP viewers of one room in a child process,
//!   `BENCH_BATCHES` batches from a test broker; reports sends per second of wall time and per
//!   CPU-second of the edge process (the test process: the shard thread, the test broker and
//!   this thread's metrics polling). `BENCH_URING_WRITES=1|0` turns `uring_client_writes` on
//!   or off.
//! - `bench_floor_write`: the kernel's floor for the same work: one thread `write()`s the same
//!   bytes (the fan-out batch's packet size) to `BENCH_VIEWERS` loopback sockets, round after
//!   round, while a reader thread (epoll) drains them eagerly; reports sends per second and
//!   per CPU-second of the writing thread. Nothing of ours runs on the write path, so the gap
//!   between this and `bench_fanout_*` is our own overhead.
//! - `bench_floor_uring`: the same work with the ring driven directly (`io-uring` crate, no
//!   runtime): each round pushes one `SEND` SQE per socket and submits them together (one
//!   `io_uring_enter` per `BENCH_URING_BATCH` sends), then reaps the completions. The prototype
//!   of "drive the ring directly for the data path": how far below the `write()` floor the ring
//!   can take a send's CPU cost, with nothing else in the way.

mod common;

use common::*;
use monoio::io::{AsyncReadRent, AsyncReadRentExt, AsyncWriteRentExt};
use net::runtime::Driver;
use proto::id::Encoding;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ROOM: u64 = 77;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Starts the viewers child process and waits for its READY line.
fn spawn_viewers(
    addr: std::net::SocketAddr,
    n: usize,
    mode: &str,
) -> (Child, BufReader<std::process::ChildStdout>) {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "--ignored",
            "--exact",
            "viewers_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("VIEWERS_ADDR", addr.to_string())
        .env("VIEWERS_N", n.to_string())
        .env("VIEWERS_MODE", mode)
        .stdout(Stdio::piped())
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            let _ = child.kill();
            panic!("viewers exited before READY");
        }
        // libtest prints "test viewers_helper ... " before the test's own output.
        if let Some(rest) = line.trim().split("READY ").nth(1) {
            let got: usize = rest.parse().unwrap();
            assert_eq!(got, n, "viewers authenticated");
            break;
        }
        assert!(Instant::now() < deadline, "viewers not ready in time");
    }
    (child, out)
}

/// The child side: `VIEWERS_N` TCP viewers of ROOM; prints `READY n` once all are authenticated,
/// then idles (or reads everything, mode `read`) until killed.
#[test]
#[ignore]
fn viewers_helper() {
    let Ok(addr) = std::env::var("VIEWERS_ADDR") else {
        return;
    };
    let n = env_usize("VIEWERS_N", 1000);
    let mode = std::env::var("VIEWERS_MODE").unwrap_or_default();
    let read_mode = mode == "read";
    let ws = mode == "ws-idle";
    let _ = net::sys::raise_nofile_limit();
    // Die with the parent: it holds our stdin open while it lives.
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        std::process::exit(0);
    });
    net::runtime::block_on(Driver::Legacy, async move {
        let ready = std::rc::Rc::new(std::cell::Cell::new(0usize));
        const WAVE: usize = 500;
        let mut started = 0;
        while started < n {
            let wave = WAVE.min(n - started);
            let target = ready.get() + wave;
            for i in started..started + wave {
                let (addr, ready) = (addr.clone(), ready.clone());
                monoio::spawn(async move {
                    let mut s = match monoio::net::TcpStream::connect(addr.as_str()).await {
                        Ok(s) => s,
                        Err(e) => {
                            eprintln!("viewer {i}: connect: {e}");
                            return;
                        }
                    };
                    let auth =
                        auth_packet(i as u64 + 1, ROOM, 0, token_own_device(i as u64 + 1, ROOM));
                    let (r, b) = if ws {
                        ws_auth(&mut s, auth).await
                    } else {
                        let (r, _) = s.write_all(auth).await;
                        if r.is_err() {
                            return;
                        }
                        let (r, b) = s.read_exact(vec![0u8; 26]).await;
                        (r.map(|_| ()), b)
                    };
                    if r.is_err() || b != proto::auth::auth_reply(0) {
                        eprintln!("viewer {i}: auth: {r:?} {b:?}");
                        return;
                    }
                    ready.set(ready.get() + 1);
                    let mut buf = vec![0u8; if read_mode { 16 * 1024 } else { 16 }];
                    loop {
                        let (r, b) = s.read(buf).await;
                        buf = b;
                        if !matches!(r, Ok(n) if n > 0) {
                            return;
                        }
                    }
                });
            }
            started += wave;
            let deadline = Instant::now() + Duration::from_secs(30);
            while ready.get() < target && Instant::now() < deadline {
                monoio::time::sleep(Duration::from_millis(5)).await;
            }
            eprintln!("viewers: {} ready", ready.get());
        }
        println!("READY {}", ready.get());
        loop {
            monoio::time::sleep(Duration::from_secs(3600)).await;
        }
    });
}

/// A WebSocket viewer's upgrade and auth: returns the auth reply's payload.
async fn ws_auth(s: &mut monoio::net::TcpStream, auth: Vec<u8>) -> (std::io::Result<()>, Vec<u8>) {
    let (r, _) = s.write_all(ws_upgrade_request("/sub")).await;
    if let Err(e) = r {
        return (Err(e), Vec::new());
    }
    // The 101 head, then the reply frame: 2 header bytes and the 26-byte auth reply.
    let mut got = Vec::new();
    let head_end = loop {
        let (r, b) = s.read(vec![0u8; 512]).await;
        match r {
            Ok(n) if n > 0 => got.extend_from_slice(&b[..n]),
            Ok(_) => return (Err(std::io::ErrorKind::UnexpectedEof.into()), got),
            Err(e) => return (Err(e), got),
        }
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    got.drain(..head_end);
    let f = proto::ws::encode_client_frame(proto::ws::Opcode::Binary, &auth, [1, 2, 3, 4]);
    let (r, _) = s.write_all(f).await;
    if let Err(e) = r {
        return (Err(e), Vec::new());
    }
    while got.len() < 28 {
        let (r, b) = s.read(vec![0u8; 64]).await;
        match r {
            Ok(n) if n > 0 => got.extend_from_slice(&b[..n]),
            Ok(_) => return (Err(std::io::ErrorKind::UnexpectedEof.into()), got),
            Err(e) => return (Err(e), got),
        }
    }
    (Ok(()), got[2..28].to_vec())
}

fn idle_memory(driver: Driver) {
    let n = env_usize("BENCH_IDLE_CONNS", 19_000);
    let mut cfg = edge_config(driver, vec![]);
    cfg.shards = env_usize("BENCH_SHARDS", 2);
    cfg.timer_tick_ms = 50;
    let edge = edge::start(cfg).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let rss0 = net::sys::rss_bytes();
    let ws = std::env::var("BENCH_IDLE_WS").is_ok_and(|v| v == "1");
    let (mut child, _out) = match ws {
        true => spawn_viewers(edge.ws_addr(), n, "ws-idle"),
        false => spawn_viewers(edge.tcp_addr(), n, "idle"),
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while edge.connections() as usize != n {
        assert!(Instant::now() < deadline, "connections not seated");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    let rss1 = net::sys::rss_bytes();
    let per = (rss1.saturating_sub(rss0)) as f64 / n as f64;
    println!(
        "BENCH idle_memory driver={} transport={} conns={} rss_before={} rss_after={} bytes_per_conn={:.0} (conn slab entry {} bytes)",
        format!("{driver:?}").to_lowercase(),
        if ws { "ws" } else { "tcp" },
        n,
        rss0,
        rss1,
        per,
        edge::conn_entry_bytes()
    );
    let _ = child.kill();
    let _ = child.wait();
    edge.shutdown();
}

/// CPU seconds (user + system) of this process so far.
fn cpu_seconds() -> f64 {
    stat_cpu_seconds("/proc/self/stat")
}

/// CPU seconds (user + system) of the calling thread so far.
fn thread_cpu_seconds() -> f64 {
    stat_cpu_seconds("/proc/thread-self/stat")
}

/// utime + stime of a `/proc/.../stat` file, in seconds.
fn stat_cpu_seconds(path: &str) -> f64 {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let after = s.rsplit_once(')').map(|(_, a)| a).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the ')' split.
    (ticks(11) + ticks(12)) / 100.0
}

fn fanout(driver: Driver) {
    let viewers = env_usize("BENCH_VIEWERS", 2_000);
    let batches = env_usize("BENCH_BATCHES", 500);
    let broker = TestBroker::start(1);
    let mut cfg = edge_config(driver, vec![broker.addr_string()]);
    cfg.shards = 1;
    // Measure the send path, not the drop path: the queue holds shared handles only.
    cfg.send_queue_bytes_max = 1 << 30;
    // `BENCH_URING_WRITES=1`: client writes through the shard's ring (io_uring driver).
    if let Ok(v) = std::env::var("BENCH_URING_WRITES") {
        cfg.uring_client_writes = v == "1";
    }
    let cfg_ring = cfg.uring_client_writes;
    let edge = edge::start(cfg).unwrap();
    broker.wait_links(2);
    let (mut child, _out) = spawn_viewers(edge.tcp_addr(), viewers, "read");
    broker.wait_seen("SUB", |s| s.iter().any(|x| matches!(x, Seen::Sub(..))));
    let bs: Vec<_> = (1..=batches as u64)
        .map(|s| room_batch(ROOM, s, Encoding::Plain, 900))
        .collect();
    let len = bs[0].packet.len();
    let want_bytes = (viewers * batches * len) as f64;
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    for b in &bs {
        broker.send(b);
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while metric_sum(&edge.metrics_text(), "barrage_edge_bytes_out_total") < want_bytes {
        assert!(Instant::now() < deadline, "fan-out did not finish");
        std::thread::sleep(Duration::from_millis(2));
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let m = edge.metrics_text();
    let sends = metric_sum(&m, "barrage_edge_sends_total");
    let writes = metric_sum(&m, "barrage_edge_writes_total");
    println!(
        "BENCH fanout driver={} uring_client_writes={} viewers={viewers} batches={batches} batch_bytes={len} sends={sends} wall_s={wall:.3} sends_per_s={:.0} edge_cpu_s={cpu:.3} sends_per_cpu_s={:.0} batches_per_write={:.1} drops={}",
        format!("{driver:?}").to_lowercase(),
        cfg_ring,
        sends / wall,
        sends / cpu.max(1e-9),
        sends / writes.max(1.0),
        metric_sum(&m, "barrage_edge_drops_total")
    );
    let _ = child.kill();
    let _ = child.wait();
    edge.shutdown();
}

#[test]
#[ignore]
fn bench_idle_memory_uring() {
    with_driver(Driver::Uring, idle_memory);
}

#[test]
#[ignore]
fn bench_idle_memory_legacy() {
    with_driver(Driver::Legacy, idle_memory);
}

#[test]
#[ignore]
fn bench_fanout_uring() {
    with_driver(Driver::Uring, fanout);
}

#[test]
#[ignore]
fn bench_fanout_legacy() {
    with_driver(Driver::Legacy, fanout);
}

#[test]
#[ignore]
fn bench_floor_write() {
    use std::io::Write;
    let viewers = env_usize("BENCH_VIEWERS", 2_000);
    let rounds = env_usize("BENCH_BATCHES", 500);
    let len = room_batch(ROOM, 1, Encoding::Plain, 900).packet.len();
    let (mut socks, stop, reader) = floor_sockets(viewers);
    let payload = vec![0x5au8; len];
    let cpu0 = thread_cpu_seconds();
    let t0 = Instant::now();
    for _ in 0..rounds {
        for s in socks.iter_mut() {
            s.write_all(&payload).unwrap();
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = thread_cpu_seconds() - cpu0;
    let sends = (viewers * rounds) as f64;
    println!(
        "BENCH floor_write viewers={viewers} rounds={rounds} bytes={len} sends={sends} wall_s={wall:.3} sends_per_s={:.0} writer_cpu_s={cpu:.3} sends_per_cpu_s={:.0}",
        sends / wall,
        sends / cpu.max(1e-9)
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(socks);
    let _ = reader.join();
}

/// Connects `viewers` loopback sockets to a reader thread that drains them eagerly; returns
/// the server-side sockets, the stop flag and the reader.
fn floor_sockets(
    viewers: usize,
) -> (
    Vec<std::net::TcpStream>,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<()>,
) {
    let _ = net::sys::raise_nofile_limit();
    // A backlog that holds every connect at once: with the default 128 a connect whose SYNs
    // were dropped could time out and leave the accept loop below waiting forever.
    let l = net::sys::listener("127.0.0.1:0".parse().unwrap(), false, 65_535).unwrap();
    l.set_nonblocking(false).unwrap();
    let addr = l.local_addr().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let reader = std::thread::spawn(move || {
        net::runtime::block_on(Driver::Legacy, async move {
            for _ in 0..viewers {
                let stop = stop2.clone();
                monoio::spawn(async move {
                    let Ok(mut s) = monoio::net::TcpStream::connect(addr).await else {
                        return;
                    };
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let (r, b) = s.read(buf).await;
                        buf = b;
                        if !matches!(r, Ok(n) if n > 0)
                            || stop.load(std::sync::atomic::Ordering::Relaxed)
                        {
                            return;
                        }
                    }
                });
            }
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    });
    let socks = (0..viewers)
        .map(|_| {
            let (s, _) = l.accept().unwrap();
            s.set_nodelay(true).unwrap();
            s
        })
        .collect();
    (socks, stop, reader)
}

#[test]
#[ignore]
fn bench_floor_uring() {
    use std::os::fd::AsRawFd;
    let viewers = env_usize("BENCH_VIEWERS", 2_000);
    let rounds = env_usize("BENCH_BATCHES", 500);
    let batch = env_usize("BENCH_URING_BATCH", 256).clamp(1, 4096);
    let len = room_batch(ROOM, 1, Encoding::Plain, 900).packet.len();
    let (socks, stop, reader) = floor_sockets(viewers);
    let mut ring = io_uring::IoUring::new(4096).unwrap();
    let payload = vec![0x5au8; len];
    let cpu0 = thread_cpu_seconds();
    let t0 = Instant::now();
    let (mut short, mut errors) = (0u64, 0u64);
    for _ in 0..rounds {
        for chunk in socks.chunks(batch) {
            for (i, s) in chunk.iter().enumerate() {
                let e = io_uring::opcode::Send::new(
                    io_uring::types::Fd(s.as_raw_fd()),
                    payload.as_ptr(),
                    payload.len() as u32,
                )
                .build()
                .user_data(i as u64);
                // SAFETY: the SQE points at `payload`, which outlives every submission (the
                // completions of this chunk are reaped below before the next chunk); the fd is
                // open for the whole bench. The queue has room: at most 4096 per chunk, reaped.
                unsafe { ring.submission().push(&e).unwrap() };
            }
            ring.submit_and_wait(chunk.len()).unwrap();
            for c in ring.completion() {
                match c.result() {
                    r if r < 0 => errors += 1,
                    r if (r as usize) < len => short += 1,
                    _ => {}
                }
            }
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = thread_cpu_seconds() - cpu0;
    let sends = (viewers * rounds) as f64;
    println!(
        "BENCH floor_uring viewers={viewers} rounds={rounds} bytes={len} sqes_per_enter={batch} sends={sends} wall_s={wall:.3} sends_per_s={:.0} writer_cpu_s={cpu:.3} sends_per_cpu_s={:.0} short={short} errors={errors}",
        sends / wall,
        sends / cpu.max(1e-9)
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(socks);
    let _ = reader.join();
}
