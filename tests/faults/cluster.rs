//! A whole cluster under fault: control, one broker and edges as real processes, viewers that
//! find their edge through control and reconnect the way a real client does, a publisher that
//! records which pushes the broker accepted, and the delivery model that judges the outcome.
//!
//! The model (issue 17): every accepted message is delivered to every viewer, or its loss is
//! visible to that viewer. A loss is visible when the viewer can tell something was missed
//! between the two messages it did get on either side: a gap in the room's batch seq (the outer
//! op 5 `seq`), a seq that goes back (a new broker epoch: without issue 9's epoch the seq
//! restarts from 1), or a reconnect (a new connection, which a client knows may have missed
//! messages). Anything else is a silent loss, and the tests assert there is none.
#![allow(dead_code)]

use crate::common::*;
use loadtest::client::{auth_body, fetch_blocking};
use proto::packet::{op, StreamDecoder};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The business API key the publisher pushes with.
pub const API: &str = "faults-api-key-5a4b3c2d1e0f112233445566778899aabbccddeeff";
/// The room every test pushes to.
pub const ROOM: u64 = 4242;

pub use crate::ports::free_port;

/// Sends a signal to a child (SIGSTOP, SIGCONT).
pub fn signal(child: &std::process::Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    let r = unsafe { libc::kill(child.id() as i32, sig) };
    assert_eq!(r, 0, "kill({}, {sig})", child.id());
}

/// Knobs of a cluster.
#[derive(Clone)]
pub struct Opts {
    pub edges: usize,
    /// Broker and edge `link_ping_ms` / `link_dead_ms` (the link timeout).
    pub link_ping_ms: u64,
    pub link_dead_ms: u64,
    pub startup_hold_ms: u64,
    /// Extra top-level TOML for every edge / the broker.
    pub edge_extra: String,
    pub broker_extra: String,
    /// The broker's link address as the edges dial it (a fault proxy, a veth address).
    pub broker_link_for_edges: Option<String>,
    /// The broker binds its link port here (default 127.0.0.1).
    pub broker_link_host: String,
    /// Edge `public_host`/bind host and namespace, per edge index.
    pub edge_env: Vec<(String, Env)>,
    /// The host address edges in a network namespace dial for control and the broker's link
    /// port (then control and the link port listen on every address, not only loopback).
    pub host_for_edges: Option<String>,
}

impl Default for Opts {
    fn default() -> Opts {
        Opts {
            edges: 1,
            link_ping_ms: 200,
            link_dead_ms: 1_000,
            startup_hold_ms: 2_000,
            edge_extra: String::new(),
            broker_extra: String::new(),
            broker_link_for_edges: None,
            broker_link_host: "127.0.0.1".into(),
            edge_env: Vec::new(),
            host_for_edges: None,
        }
    }
}

/// The processes of a cluster. Roles are `Option`s so a test can kill one and start it again.
pub struct Cluster {
    pub opts: Opts,
    pub control: Option<Role>,
    pub broker: Option<Role>,
    pub edges: Vec<Option<Role>>,
    pub control_addr: SocketAddr,
    pub ingest: SocketAddr,
    pub link_port: u16,
    pub broker_http: SocketAddr,
    control_toml: String,
    broker_toml: String,
}

impl Cluster {
    pub fn start(opts: Opts) -> Cluster {
        let control_port = free_port();
        let any = if opts.host_for_edges.is_some() {
            "0.0.0.0"
        } else {
            "127.0.0.1"
        };
        let control_toml = format!(
            "http_addr = \"{any}:{control_port}\"\ntoken_keys = \"1:{STRONG}\"\ndriver = \"legacy\"\n\
             edge_key = \"{STRONG}\"\nedge_ttl_ms = 1000\nedge_forget_ms = 2000\n"
        );
        let control = start_ok("control", &control_toml);
        let (ingest, link_port, http) = (free_port(), free_port(), free_port());
        let link_keys: Vec<String> = (1..=opts.edges.max(3))
            .map(|i| format!("\"edge-{i}:{STRONG}\""))
            .collect();
        let broker_toml = format!(
            "shards = 1\npin = false\ndriver = \"legacy\"\ningest_addr = \"127.0.0.1:{ingest}\"\n\
             link_addr = \"{}:{link_port}\"\nhttp_addr = \"127.0.0.1:{http}\"\n\
             link_keys = [{}]\nlink_ping_ms = {}\nlink_dead_ms = {}\nstartup_hold_ms = {}\n{}\n\
             [[api_keys]]\nkey = \"{API}\"\n",
            if opts.host_for_edges.is_some() {
                any
            } else {
                &opts.broker_link_host
            },
            link_keys.join(", "),
            opts.link_ping_ms,
            opts.link_dead_ms,
            opts.startup_hold_ms,
            opts.broker_extra,
        );
        let broker = start_ok("broker", &broker_toml);
        let mut c = Cluster {
            control_addr: SocketAddr::from(([127, 0, 0, 1], control_port)),
            ingest: broker.addrs[0],
            link_port,
            broker_http: broker.addrs[2],
            opts,
            control: Some(control),
            broker: Some(broker),
            edges: Vec::new(),
            control_toml,
            broker_toml,
        };
        for i in 0..c.opts.edges {
            let e = c.start_edge(i);
            c.edges.push(Some(e));
        }
        if c.opts.edges > 0 {
            c.wait_listed(c.opts.edges);
        }
        c
    }

    pub fn edge_toml(&self, i: usize) -> String {
        let (host, _) = self
            .opts
            .edge_env
            .get(i)
            .cloned()
            .unwrap_or(("127.0.0.1".into(), Env::default()));
        let home = self
            .opts
            .host_for_edges
            .clone()
            .unwrap_or("127.0.0.1".into());
        let link = self
            .opts
            .broker_link_for_edges
            .clone()
            .unwrap_or(format!("{home}:{}", self.link_port));
        let control = format!("{home}:{}", self.control_addr.port());
        format!(
            "shards = 1\npin = false\ndriver = \"legacy\"\nnode_id = \"edge-{}\"\n\
             tcp_addr = \"{host}:0\"\nws_addr = \"{host}:0\"\nadmin_addr = \"{host}:0\"\npublic_host = \"{host}\"\n\
             token_keys = \"1:{STRONG}\"\nlink_key = \"{STRONG}\"\nedge_key = \"{STRONG}\"\nadmin_key = \"{STRONG}\"\n\
             broker_addrs = [\"{link}\"]\ncontrol_addr = \"{}\"\ncontrol_heartbeat_ms = 100\n\
             link_ping_ms = {}\nlink_dead_ms = {}\nlink_backoff_ms_min = 50\nlink_backoff_ms_max = 500\n{}\n",
            i + 1,
            control,
            self.opts.link_ping_ms,
            self.opts.link_dead_ms,
            self.opts.edge_extra,
        )
    }

    pub fn start_edge(&self, i: usize) -> Role {
        let env = self
            .opts
            .edge_env
            .get(i)
            .map(|(_, e)| e.clone())
            .unwrap_or_default();
        start_ok_in("edge", &self.edge_toml(i), &env)
    }

    /// The edge's (tcp, admin) addresses.
    pub fn edge_addrs(&self, i: usize) -> (SocketAddr, SocketAddr) {
        let e = self.edges[i].as_ref().expect("edge running");
        (e.addrs[0], e.addrs[2])
    }

    /// The edge's `/metrics` text (read from any address: the edge may be in a namespace).
    pub fn edge_metrics(&self, i: usize) -> String {
        let (_, admin) = self.edge_addrs(i);
        metrics_at(admin)
    }

    /// Kills the broker with SIGKILL (no goodbye on any socket beyond the kernel's).
    pub fn kill_broker(&mut self) {
        if let Some(mut b) = self.broker.take() {
            let _ = b.child.kill();
            let _ = b.child.wait();
        }
    }

    /// Starts the broker again on the same ports.
    pub fn restart_broker(&mut self) {
        let deadline = Instant::now() + WAIT;
        loop {
            match start("broker", &self.broker_toml) {
                Started::Up(b) => {
                    self.broker = Some(b);
                    return;
                }
                // The port may still be held for a moment after the kill.
                Started::Exited(s, err) => {
                    assert!(Instant::now() < deadline, "broker restart: {s}: {err}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    pub fn kill_edge(&mut self, i: usize) {
        if let Some(mut e) = self.edges[i].take() {
            let _ = e.child.kill();
            let _ = e.child.wait();
        }
    }

    pub fn role_child(&self, role: &str) -> &std::process::Child {
        let r = match role {
            "control" => self.control.as_ref(),
            "broker" => self.broker.as_ref(),
            _ => self.edges[0].as_ref(),
        };
        &r.expect("role running").child
    }

    /// Waits until control lists `n` edges.
    pub fn wait_listed(&self, n: usize) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(t) = self.ticket() {
                if t.edges.len() >= n {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "control never listed {n} edges");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn ticket(&self) -> Result<loadtest::client::Ticket, loadtest::client::TicketError> {
        fetch_blocking(
            &self.control_addr.to_string(),
            ROOM,
            0,
            "probe",
            None,
            false,
            Duration::from_secs(2),
        )
    }
}

// ---------------------------------------------------------------------------------------
// Viewers

/// One op 5 batch a viewer read: which connection, which batch on it, its seq, the `n`s in it.
#[derive(Clone, Debug)]
pub struct Batch {
    pub conn: u32,
    pub seq: u32,
    pub ns: Vec<u64>,
}

#[derive(Default)]
pub struct ViewerLog {
    pub batches: Vec<Batch>,
    /// Time from losing (or starting) a connection to the next auth reply, per connection.
    pub connects: Vec<Duration>,
    /// The edge each connection landed on.
    pub edges: Vec<SocketAddr>,
    pub conns: u32,
    /// Highest `n` seen.
    pub last_n: Option<u64>,
}

/// A viewer thread: ticket from control, first edge that takes it, read until closed, again.
pub struct Viewer {
    pub log: Arc<Mutex<ViewerLog>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Viewer {
    pub fn spawn(control: SocketAddr, id: usize) -> Viewer {
        Viewer::spawn_at(control, id, Instant::now())
    }

    /// A viewer whose first connect latency counts from `since`.
    pub fn spawn_at(control: SocketAddr, id: usize, since: Instant) -> Viewer {
        let log = Arc::new(Mutex::new(ViewerLog::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (log.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name(format!("viewer-{id}"))
            .stack_size(256 * 1024)
            .spawn(move || viewer_loop(control, id, since, &l, &s))
            .expect("viewer thread");
        Viewer {
            log,
            stop,
            thread: Some(thread),
        }
    }

    pub fn conns(&self) -> u32 {
        self.log.lock().unwrap().conns
    }

    pub fn last_n(&self) -> Option<u64> {
        self.log.lock().unwrap().last_n
    }

    /// Tells the thread to end, without waiting (stop many at once, then join each).
    pub fn signal_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Closes the connection and ends the thread.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn viewer_loop(
    control: SocketAddr,
    id: usize,
    since: Instant,
    log: &Mutex<ViewerLog>,
    stop: &AtomicBool,
) {
    let device = format!("faults-{id}");
    let mut lost_at = since;
    while !stop.load(Ordering::Relaxed) {
        let Some((mut s, edge)) = connect(control, &device, stop) else {
            return;
        };
        let conn = {
            let mut l = log.lock().unwrap();
            l.conns += 1;
            l.connects.push(lost_at.elapsed());
            l.edges.push(edge);
            l.conns
        };
        read_until_closed(&mut s, conn, log, stop);
        lost_at = Instant::now();
    }
}

/// A ticket and the first listed edge that authenticates us; retried until `stop`.
fn connect(
    control: SocketAddr,
    device: &str,
    stop: &AtomicBool,
) -> Option<(TcpStream, SocketAddr)> {
    let mut attempt = 0u32;
    while !stop.load(Ordering::Relaxed) {
        if let Ok(t) = fetch_blocking(
            &control.to_string(),
            ROOM,
            0,
            device,
            None,
            false,
            Duration::from_secs(2),
        ) {
            for e in &t.edges {
                let Some(addr) = e.addr(false) else { continue };
                if let Some(s) = authenticate(addr, &t.token, device) {
                    return Some((s, addr));
                }
            }
        }
        // Back off as a real client does (a burst of thousands retrying every 20 ms would
        // be our own flood): 20 ms doubling to 1 s, with jitter in [d/2, d].
        let d = 20u64 << attempt.min(6);
        attempt += 1;
        std::thread::sleep(Duration::from_millis(
            d.min(1_000) / 2 + jitter(d.min(1_000) / 2),
        ));
    }
    None
}

/// A random number in [0, n] (std's hasher keys are random per process).
fn jitter(n: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish() % (n + 1)
}

fn authenticate(addr: SocketAddr, token: &str, device: &str) -> Option<TcpStream> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let body = auth_body(0, ROOM, 3, token, device);
    s.write_all(&proto::auth::auth_request(&body)).ok()?;
    let mut dec = StreamDecoder::new(proto::limits::LINK_FRAME_BYTES_MAX);
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        match dec.next_packet() {
            Ok(Some(p)) if p.op == op::AUTH_REPLY => {
                let v: serde_json::Value = serde_json::from_slice(&p.body).ok()?;
                if v["code"] != 0 {
                    return None;
                }
                // Anything already read after the reply is lost here; the edge sends nothing
                // before the reply and the first batch comes after it.
                s.set_read_timeout(Some(Duration::from_millis(100))).ok()?;
                return Some(s);
            }
            Ok(Some(_)) => continue,
            Ok(None) => {}
            Err(_) => return None,
        }
        match s.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => dec.feed(&buf[..n]),
            Err(_) => return None,
        }
    }
    None
}

fn read_until_closed(s: &mut TcpStream, conn: u32, log: &Mutex<ViewerLog>, stop: &AtomicBool) {
    let mut dec = StreamDecoder::new(proto::limits::LINK_FRAME_BYTES_MAX);
    let mut buf = vec![0u8; 64 * 1024];
    let mut beat = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        loop {
            match dec.next_packet() {
                Ok(Some(p)) if p.op == op::NOTIFICATION => {
                    let inner = proto::container::unpack(
                        p.ver,
                        p.op,
                        p.seq,
                        &p.body,
                        proto::limits::DECOMPRESSED_BYTES_MAX,
                    )
                    .expect("the edge sent a valid container");
                    let ns: Vec<u64> = inner
                        .iter()
                        .filter_map(|i| serde_json::from_slice::<serde_json::Value>(&i.body).ok())
                        .filter_map(|v| v["n"].as_u64())
                        .collect();
                    if ns.is_empty() {
                        continue;
                    }
                    let mut l = log.lock().unwrap();
                    l.last_n = ns.iter().copied().max().max(l.last_n);
                    l.batches.push(Batch {
                        conn,
                        seq: p.seq,
                        ns,
                    });
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => panic!("bad packet from the edge: {e}"),
            }
        }
        if beat.elapsed() > Duration::from_secs(5) {
            beat = Instant::now();
            if s.write_all(&proto::auth::heartbeat_request()).is_err() {
                return;
            }
        }
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => dec.feed(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

// ---------------------------------------------------------------------------------------
// The publisher

/// Pushes `{"n":N}` to [`ROOM`] at a steady rate over the ingest socket, reconnecting when the
/// broker goes away; records which `n` the broker accepted (answered with a msg_id).
pub struct Publisher {
    pub accepted: Arc<Mutex<Vec<u64>>>,
    pub refused: Arc<AtomicU64>,
    next: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Publisher {
    pub fn spawn(ingest: SocketAddr, per_s: u64) -> Publisher {
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(AtomicU64::new(0));
        let next = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, r, n, s) = (
            accepted.clone(),
            refused.clone(),
            next.clone(),
            stop.clone(),
        );
        let gap = Duration::from_micros(1_000_000 / per_s.max(1));
        let thread = std::thread::spawn(move || {
            let mut client: Option<broker::IngestClient> = None;
            let mut due = Instant::now();
            while !s.load(Ordering::Relaxed) {
                let c = match client.as_mut() {
                    Some(c) => c,
                    None => match broker::IngestClient::connect(ingest, API) {
                        Ok(mut c) => {
                            c.set_timeout(Duration::from_secs(2));
                            client.insert(c)
                        }
                        Err(_) => {
                            std::thread::sleep(Duration::from_millis(20));
                            continue;
                        }
                    },
                };
                let i = n.fetch_add(1, Ordering::Relaxed);
                match c.push(&broker::Message::room(ROOM, format!("{{\"n\":{i}}}"))) {
                    Ok(_) => a.lock().unwrap().push(i),
                    Err(broker::ClientError::Rejected(_)) => {
                        r.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        r.fetch_add(1, Ordering::Relaxed);
                        client = None;
                    }
                }
                pace(&mut due, gap);
            }
        });
        Publisher {
            accepted,
            refused,
            next,
            stop,
            thread: Some(thread),
        }
    }

    /// The `n` the next push will carry.
    pub fn next_n(&self) -> u64 {
        self.next.load(Ordering::Relaxed)
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    pub fn last_accepted(&self) -> Option<u64> {
        self.accepted.lock().unwrap().last().copied()
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Stops every viewer: all are told first, so each join waits at most one read timeout in all.
pub fn stop_all(vs: &mut [Viewer]) {
    vs.iter().for_each(Viewer::signal_stop);
    vs.iter_mut().for_each(Viewer::stop);
}

/// Waits until every viewer has seen some message at or past `n`.
pub fn wait_all_seen(viewers: &[Viewer], n: u64, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if viewers.iter().all(|v| v.last_n().is_some_and(|l| l >= n)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Starts `viewers` viewers and a publisher, and waits until every viewer receives it: returns
/// them and the first `n` the model judges.
pub fn viewers_and_load(c: &Cluster, viewers: usize, per_s: u64) -> (Vec<Viewer>, Publisher, u64) {
    let vs: Vec<Viewer> = (0..viewers)
        .map(|i| Viewer::spawn(c.control_addr, i))
        .collect();
    let p = Publisher::spawn(c.ingest, per_s);
    let deadline = Instant::now() + WAIT;
    loop {
        if vs.iter().all(|v| v.last_n().is_some()) {
            break;
        }
        assert!(Instant::now() < deadline, "the viewers never got the load");
        std::thread::sleep(Duration::from_millis(20));
    }
    let from = p.next_n();
    (vs, p, from)
}

/// Stops the load, lets the last accepted message reach everyone, stops the viewers and judges.
pub fn finish(vs: Vec<Viewer>, mut p: Publisher, from: u64) -> Verdict {
    let (accepted, logs) = settle(vs, &mut p, from);
    let mut v = judge(&accepted, &logs);
    v.refused = p.refused.load(Ordering::Relaxed);
    v
}

/// `finish` up to the judging: stops the load (after 500 ms more of it, so every viewer is back
/// on a live path), waits until the last accepted message reached everyone, stops the viewers;
/// returns the accepted messages from `from` on and each viewer's log.
pub fn settle(mut vs: Vec<Viewer>, p: &mut Publisher, from: u64) -> (Vec<u64>, Vec<ViewerLog>) {
    std::thread::sleep(Duration::from_millis(500));
    p.stop();
    let accepted: Vec<u64> = p
        .accepted
        .lock()
        .unwrap()
        .iter()
        .copied()
        .filter(|&n| n >= from)
        .collect();
    if let Some(&last) = accepted.last() {
        wait_all_seen(&vs, last, WAIT);
    }
    stop_all(&mut vs);
    let logs = vs
        .iter()
        .map(|v| std::mem::take(&mut *v.log.lock().unwrap()))
        .collect();
    (accepted, logs)
}

// ---------------------------------------------------------------------------------------
// The model

/// What the model found, summed over viewers (a message missed by 3 viewers counts 3 times).
#[derive(Debug, Default, Clone)]
pub struct Verdict {
    pub viewers: usize,
    /// Pushes the broker answered with a msg_id, in the judged window.
    pub accepted: u64,
    /// Pushes refused or failed on the publisher's side (not accepted, not owed).
    pub refused: u64,
    /// (viewer, accepted message) pairs delivered.
    pub delivered: u64,
    /// Missed, and the viewer saw it: a seq gap, a new epoch (seq back), a reconnect.
    pub missed_in_gap: u64,
    pub missed_in_epoch: u64,
    pub missed_in_reconnect: u64,
    /// Missed with nothing to show for it. Must be 0.
    pub lost: u64,
    /// Seq gaps seen within one connection (batches missing), seq regressions, reconnects.
    pub gaps: u64,
    pub epochs: u64,
    pub reconnects: u64,
    /// Messages delivered twice to one viewer.
    pub duplicates: u64,
    /// Messages that arrived out of push order on one connection.
    pub reordered: u64,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "viewers {}, accepted {} (refused {}), delivered {}/{}, missed visibly {} (gap {}, epoch {}, reconnect {}), \
             lost {}; seq gaps {}, epochs {}, reconnects {}, duplicates {}, reordered {}",
            self.viewers,
            self.accepted,
            self.refused,
            self.delivered,
            self.accepted * self.viewers as u64,
            self.missed_in_gap + self.missed_in_epoch + self.missed_in_reconnect,
            self.missed_in_gap,
            self.missed_in_epoch,
            self.missed_in_reconnect,
            self.lost,
            self.gaps,
            self.epochs,
            self.reconnects,
            self.duplicates,
            self.reordered,
        )
    }
}

/// Judges what each viewer got against what was accepted (see the module doc).
pub fn judge(accepted: &[u64], logs: &[ViewerLog]) -> Verdict {
    let mut v = Verdict {
        viewers: logs.len(),
        accepted: accepted.len() as u64,
        ..Verdict::default()
    };
    for log in logs {
        // Where each n was first seen: (index of its batch).
        let mut at: BTreeMap<u64, usize> = BTreeMap::new();
        let mut seen = BTreeSet::new();
        for (i, b) in log.batches.iter().enumerate() {
            for &n in &b.ns {
                if !seen.insert(n) {
                    v.duplicates += 1;
                } else {
                    at.insert(n, i);
                }
            }
            if i > 0 {
                let prev = &log.batches[i - 1];
                if prev.conn != b.conn {
                    v.reconnects += 1;
                } else if b.seq <= prev.seq {
                    v.epochs += 1;
                } else if b.seq > prev.seq + 1 {
                    v.gaps += u64::from(b.seq - prev.seq - 1);
                }
                if prev.conn == b.conn
                    && b.ns.iter().min() < prev.ns.iter().max()
                    && b.seq > prev.seq
                {
                    v.reordered += 1;
                }
            }
        }
        for &n in accepted {
            if at.contains_key(&n) {
                v.delivered += 1;
                continue;
            }
            let before = at.range(..n).next_back().map(|(_, &i)| i);
            let after = at.range(n..).next().map(|(_, &i)| i);
            let (Some(a), Some(b)) = (before, after) else {
                v.lost += 1;
                continue;
            };
            let (a, b) = (&log.batches[a], &log.batches[b]);
            // Reconnects in between count even when the batches around are on one connection.
            if a.conn != b.conn {
                v.missed_in_reconnect += 1;
            } else if b.seq <= a.seq {
                v.missed_in_epoch += 1;
            } else if b.seq > a.seq + 1 {
                v.missed_in_gap += 1;
            } else {
                v.lost += 1;
            }
        }
    }
    v
}

#[test]
fn the_model_tells_visible_from_silent_loss() {
    let b = |conn, seq, ns: &[u64]| Batch {
        conn,
        seq,
        ns: ns.to_vec(),
    };
    let log = |batches| ViewerLog {
        batches,
        ..ViewerLog::default()
    };
    let acc = [1, 2, 3, 4, 5, 6];
    // All there.
    let v = judge(&acc, &[log(vec![b(1, 1, &[1, 2]), b(1, 2, &[3, 4, 5, 6])])]);
    assert_eq!((v.delivered, v.lost), (6, 0));
    // 3 missing, seq 2 missing: a visible gap.
    let v = judge(&acc, &[log(vec![b(1, 1, &[1, 2]), b(1, 3, &[4, 5, 6])])]);
    assert_eq!((v.missed_in_gap, v.lost, v.gaps), (1, 0, 1));
    // 3 missing, no seq gap: silent.
    let v = judge(&acc, &[log(vec![b(1, 1, &[1, 2]), b(1, 2, &[4, 5, 6])])]);
    assert_eq!(v.lost, 1);
    // The restart: 1, 2 then seq 1 again from a new broker, 3 missing: an epoch.
    let v = judge(
        &acc,
        &[log(vec![b(1, 1, &[1]), b(1, 2, &[2]), b(1, 1, &[4, 5, 6])])],
    );
    assert_eq!((v.missed_in_epoch, v.lost, v.epochs), (1, 0, 1));
    // Across a reconnect.
    let v = judge(&acc, &[log(vec![b(1, 1, &[1, 2]), b(2, 7, &[5, 6])])]);
    assert_eq!((v.missed_in_reconnect, v.lost, v.reconnects), (2, 0, 1));
    // Missing at the end: nothing shows it.
    let v = judge(&acc, &[log(vec![b(1, 1, &[1, 2, 3, 4, 5])])]);
    assert_eq!(v.lost, 1);
    // Duplicates are counted.
    let v = judge(
        &acc,
        &[log(vec![b(1, 1, &[1, 2, 3]), b(1, 2, &[3, 4, 5, 6])])],
    );
    assert_eq!((v.duplicates, v.lost), (1, 0));
}
