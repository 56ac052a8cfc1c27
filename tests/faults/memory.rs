//! Memory pressure through the bounded queues: a flood of large, incompressible pushes to a
//! room while some of its viewers never read (their edge queues fill) or one edge's link is
//! slow (its broker link queue fills). The slow peer is cut with its reason and counted, the
//! process's RSS stays flat while far more than the bound went through, and the other viewers
//! lose nothing.

use crate::capacity::fds_and_rss;
use crate::cluster::*;
use crate::common::*;
use crate::proxy::LinkProxy;
use base64::Engine;
use proto::packet::{op, StreamDecoder};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Raw random bytes per flood message (base64 in the body: 32 KiB, brotli keeps ~3/4).
const FLOOD_RAW_BYTES: usize = 24 * 1024;
/// Base64 bytes of one flood message's pad.
const FLOOD_MESSAGE_BYTES: u64 = (FLOOD_RAW_BYTES as u64).div_ceil(3) * 4;
/// Each test floods until this many body bytes were accepted (or [`FLOOD_SECS_MAX`]).
const FLOOD_BYTES: u64 = 24 << 20;
const FLOOD_SECS_MAX: u64 = 15;
/// RSS growth (over the value before the flood) allowed to the process under pressure.
const RSS_GROWTH_KB_MAX: u64 = 12 * 1024;

/// Pushes incompressible `{"cmd":"FLOOD","pad":"..."}` messages to [`ROOM`] at `per_s`,
/// pipelined (32 in flight), until dropped.
struct Flood {
    accepted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Flood {
    fn spawn(ingest: SocketAddr, per_s: u64) -> Flood {
        let accepted = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (accepted.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut c = broker::IngestClient::connect(ingest, API).expect("flood connects");
            c.set_timeout(Duration::from_secs(5));
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            let mut raw = vec![0u8; FLOOD_RAW_BYTES];
            let gap = Duration::from_micros(1_000_000 / per_s.max(1));
            let mut due = Instant::now();
            let mut in_flight = 0;
            while !s.load(Ordering::Relaxed) {
                for chunk in raw.chunks_mut(8) {
                    // xorshift64: incompressible enough that brotli cannot shrink the flood.
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
                }
                let pad = base64::engine::general_purpose::STANDARD.encode(&raw);
                let body = format!("{{\"cmd\":\"FLOOD\",\"pad\":\"{pad}\"}}");
                if c.send(&broker::Message::room(ROOM, body)).is_err() {
                    return;
                }
                in_flight += 1;
                while in_flight >= 32 {
                    match c.recv() {
                        Ok((_, Ok(_))) => a.fetch_add(1, Ordering::Relaxed),
                        Ok((_, Err(_))) => 0,
                        Err(_) => return,
                    };
                    in_flight -= 1;
                }
                pace(&mut due, gap);
            }
        });
        Flood {
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops it; returns the pushes accepted.
    fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A viewer that authenticates through a 4 KiB receive buffer and then never reads.
fn slow_viewer(addr: SocketAddr, token: &str, device: &str) -> TcpStream {
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    sock.connect_timeout(&addr.into(), Duration::from_secs(2))
        .expect("slow viewer connects");
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let body = loadtest::client::auth_body(0, ROOM, 3, token, device);
    s.write_all(&proto::auth::auth_request(&body)).unwrap();
    let mut dec = StreamDecoder::new(proto::limits::LINK_FRAME_BYTES_MAX);
    let mut buf = [0u8; 512];
    loop {
        if let Ok(Some(p)) = dec.next_packet() {
            if p.op == op::AUTH_REPLY {
                let v: serde_json::Value = serde_json::from_slice(&p.body).unwrap();
                assert_eq!(v["code"], 0, "slow viewer refused: {v}");
                return s;
            }
            continue;
        }
        let n = s.read(&mut buf).expect("auth reply");
        assert!(n > 0, "closed before the auth reply");
        dec.feed(&buf[..n]);
    }
}

/// True once the edge closed `s` (what it had queued in the kernel read to the end).
fn closed_by_peer(s: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    s.set_read_timeout(Some(Duration::from_millis(200))).ok();
    let mut buf = vec![0u8; 64 * 1024];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

/// Samples `pid`'s RSS every 100 ms until `flood` has [`FLOOD_BYTES`] accepted (or
/// [`FLOOD_SECS_MAX`]); returns the highest (kB).
fn rss_peak_while(pid: u32, flood: &Flood) -> u64 {
    let end = Instant::now() + Duration::from_secs(FLOOD_SECS_MAX);
    let mut peak = 0;
    while Instant::now() < end
        && flood.accepted.load(Ordering::Relaxed) * FLOOD_MESSAGE_BYTES < FLOOD_BYTES
    {
        peak = peak.max(fds_and_rss(pid).1);
        std::thread::sleep(Duration::from_millis(100));
    }
    peak.max(fds_and_rss(pid).1)
}

/// 16 viewers that never read, beside 4 that do, while 150 pushes/s of 32 KiB (about 3.6 MB/s
/// after brotli) go to their room: each slow one fills its 256 KiB send queue (the edge drops
/// its batches, `drops_total{reason="queue_full"}`) and is closed at `stuck_ms_max`
/// (`closes_total{reason="stuck"}`); the edge's RSS stays within 12 MiB of where it was
/// while more than that went through it (the flood runs until 24 MiB were accepted); the 4 readers lose nothing and are never cut.
#[test]
fn slow_viewers_are_cut_at_their_queue_bound_and_the_others_lose_nothing() {
    let c = Cluster::start(Opts {
        edge_extra: "send_queue_bytes_max = 262144\nstuck_ms_max = 2000".into(),
        broker_extra: "room_rate_per_s = 0".into(),
        ..Opts::default()
    });
    let (tcp, admin) = c.edge_addrs(0);
    let (vs, p, from) = viewers_and_load(&c, 4, 200);
    let ticket = c.ticket().expect("ticket");
    let mut slow: Vec<TcpStream> = (0..16)
        .map(|i| slow_viewer(tcp, &ticket.token, &format!("slow-{i}")))
        .collect();
    let pid = c.edges[0].as_ref().expect("edge").child.id();
    let before_m = metrics(admin);
    let in_before = metric_sum(&before_m, "barrage_edge_batch_in_bytes_total", "");
    let rss_before = fds_and_rss(pid).1;

    let mut flood = Flood::spawn(c.ingest, 150);
    let rss_peak = rss_peak_while(pid, &flood);
    let flooded = flood.stop();
    let cut = slow
        .iter_mut()
        .map(|s| closed_by_peer(s, Duration::from_secs(5)))
        .filter(|&closed| closed)
        .count();
    // The shards publish their counters a moment after the fact: wait for the 16 closes.
    let stuck_of =
        |m: &str| metric(m, "barrage_edge_closes_total{reason=\"stuck\"}").unwrap_or(0.0);
    let deadline = Instant::now() + WAIT;
    let mut m = metrics(admin);
    while stuck_of(&m) < 16.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        m = metrics(admin);
    }
    let stuck = stuck_of(&m);
    let closes: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("barrage_edge_closes_total{") && !l.ends_with(" 0"))
        .collect();
    let went_through = metric_sum(&m, "barrage_edge_batch_in_bytes_total", "") - in_before;
    let queue_full = metric(&m, "barrage_edge_drops_total{reason=\"queue_full\"}").unwrap_or(0.0);
    let v = finish(vs, p, from);
    let growth = rss_peak.saturating_sub(rss_before);
    println!(
        "slow viewers: flood {flooded} pushes, {:.1} MB into the edge; edge RSS {rss_before} kB -> peak {rss_peak} kB \
         (+{growth} kB); {cut}/16 slow cut, closes stuck {stuck}, drops queue_full {queue_full}; readers: {v}",
        went_through / 1e6
    );
    assert_eq!(cut, 16, "every slow viewer is closed");
    assert!(stuck >= 16.0, "counted as stuck: {closes:?}");
    assert!(queue_full > 0.0, "their batches dropped at the bound");
    assert!(
        went_through > (RSS_GROWTH_KB_MAX * 1024) as f64,
        "the flood must exceed the RSS bound to show anything: {went_through} B"
    );
    assert!(growth < RSS_GROWTH_KB_MAX, "edge RSS grew {growth} kB");
    // The readers keep their connections and lose nothing silently. (A reader thread starved
    // of CPU on a loaded box can fall behind like any slow reader and see a gap: not asserted.)
    assert_eq!(v.lost, 0, "{v}");
    assert_eq!(v.reconnects, 0, "a reader was cut: {v}");
}

/// Two edges; edge 2's link reads the broker at 32 KB/s (our proxy) while 150 pushes/s of
/// 32 KiB go to a room both watch: the broker's queue for that link reaches
/// `link_queue_bytes_max` (1 MiB here) and the link is cut as `slow`
/// (`barrage_broker_link_cuts_total{reason="slow"}`), again after each re-link; the broker's
/// RSS stays flat; edge 1's viewers lose nothing silently and keep their connections; edge
/// 2's viewers lose only visibly (the link is fast again after the flood, so they get the tail).
#[test]
fn a_slow_link_is_cut_at_its_queue_bound_and_the_other_edge_loses_nothing() {
    let mut c = Cluster::start(Opts {
        edges: 1,
        broker_extra: "room_rate_per_s = 0\nlink_queue_bytes_max = 1048576".into(),
        ..Opts::default()
    });
    let proxy = LinkProxy::start(([127, 0, 0, 1], c.link_port).into(), Duration::ZERO);
    proxy.throttle(32 * 1024);
    c.opts.broker_link_for_edges = Some(proxy.addr.to_string());
    let e = c.start_edge(1);
    c.edges.push(Some(e));
    c.wait_listed(2);
    let fast_edge = c.edge_addrs(0).0;
    let (vs, p, from) = viewers_and_load(&c, 8, 200);
    let pid = c.broker.as_ref().expect("broker").child.id();
    let slow_cuts = |c: &Cluster| {
        metric(
            &metrics(c.broker_http),
            "barrage_broker_link_cuts_total{reason=\"slow\"}",
        )
        .unwrap_or(0.0)
    };
    let cuts_before = slow_cuts(&c);
    let rss_before = fds_and_rss(pid).1;

    let mut flood = Flood::spawn(c.ingest, 150);
    let rss_peak = rss_peak_while(pid, &flood);
    let flooded = flood.stop();
    // The link is fast again: what the broker still queued for it drains, so the tail of the
    // load reaches edge 2's viewers and the model can judge them.
    proxy.throttle(0);
    let cuts = slow_cuts(&c) - cuts_before;
    let went_in = (flooded * FLOOD_MESSAGE_BYTES) as f64;
    // Judge each edge's viewers apart (by the edge of their first connection).
    let mut p = p;
    let (accepted, logs) = settle(vs, &mut p, from);
    let (fast, slow): (Vec<ViewerLog>, Vec<ViewerLog>) = logs
        .into_iter()
        .partition(|l| l.edges.first() == Some(&fast_edge));
    let (fast, slow) = (judge(&accepted, &fast), judge(&accepted, &slow));
    let m2 = c.edge_metrics(1);
    let link2: Vec<&str> = m2
        .lines()
        .filter(|l| l.starts_with("barrage_edge_link") && l.contains("low"))
        .collect();

    let growth = rss_peak.saturating_sub(rss_before);
    println!(
        "slow link: flood {flooded} pushes ({:.1} MB); broker RSS {rss_before} kB -> peak {rss_peak} kB (+{growth} kB); \
         slow cuts {cuts}; edge 1 viewers: {fast}; edge 2 (slow link) viewers: {slow}",
        went_in / 1e6
    );
    assert!(cuts >= 1.0, "the slow link was never cut as slow");
    assert!(
        went_in > (RSS_GROWTH_KB_MAX * 1024) as f64,
        "the flood must exceed the RSS bound to show anything: {went_in} B"
    );
    assert!(growth < RSS_GROWTH_KB_MAX, "broker RSS grew {growth} kB");
    assert!(fast.viewers > 0, "no viewer on the fast edge");
    assert_eq!(fast.lost, 0, "{fast}");
    assert_eq!(fast.reconnects, 0, "{fast}");
    // Edge 2's viewers lose most of the flood, but every loss is visible (a seq gap).
    assert_eq!(slow.lost, 0, "{slow}; edge 2: {link2:#?}");
}
