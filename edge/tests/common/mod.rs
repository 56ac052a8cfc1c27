//! Test support: a real TCP test broker speaking proto::link, and blocking TCP/WS clients
//! written against proto. No mocks: everything goes over loopback sockets.
#![allow(dead_code)]

use bytes::Bytes;
use net::runtime::Driver;
use proto::auth::{self, AuthBody};
use proto::id::{AreaId, DeviceId, Encoding, MsgId, Priority, RoomId, Scope, UserId};
use proto::link::{self, Batch, Hello, Interest, LinkFrame};
use proto::packet;
use proto::token::{Claims, KeySet};
use proto::ws::{self, FrameDecoder, Message, Opcode};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub const SECRET: &str = "1:test-secret-0123456789abcdef";
pub const WAIT: Duration = Duration::from_secs(10);

/// Runs `body` under the driver, or prints why it is skipped (io_uring unavailable).
pub fn with_driver(driver: Driver, body: impl FnOnce(Driver)) {
    if driver == Driver::Uring && !monoio::utils::detect_uring() {
        eprintln!(
            "io_uring unavailable here (net::runtime would fall back); skipping the uring variant"
        );
        return;
    }
    body(driver)
}

pub fn keys() -> KeySet {
    KeySet::parse(SECRET).unwrap()
}

pub fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn token(uid: u64, room: u64, area: u32) -> String {
    keys().sign(&Claims {
        uid: UserId(uid),
        device: DeviceId("dev-1".into()),
        room: RoomId(room),
        area: AreaId(area),
        expires_at_s: now_s() + 3600,
    })
}

/// A token with its own device id (`dev-<uid>`): every viewer a different user and device.
pub fn token_own_device(uid: u64, room: u64) -> String {
    keys().sign(&Claims {
        uid: UserId(uid),
        device: DeviceId(format!("dev-{uid}")),
        room: RoomId(room),
        area: AreaId(1),
        expires_at_s: now_s() + 3600,
    })
}

pub fn expired_token(uid: u64, room: u64) -> String {
    keys().sign(&Claims {
        uid: UserId(uid),
        device: DeviceId("dev-1".into()),
        room: RoomId(room),
        area: AreaId(1),
        expires_at_s: 1,
    })
}

pub fn auth_packet(uid: u64, room: u64, protover: u32, key: String) -> Vec<u8> {
    auth::auth_request(&AuthBody {
        uid,
        roomid: room,
        protover,
        platform: Some("web".into()),
        kind: Some(2),
        key,
        buvid: Some("dev-1".into()),
        ack: false,
    })
}

/// An edge config for tests: loopback, port 0, two shards, unpinned.
pub fn edge_config(driver: Driver, brokers: Vec<String>) -> edge::Config {
    edge::Config {
        shards: 2,
        tcp_addr: "127.0.0.1:0".into(),
        ws_addr: "127.0.0.1:0".into(),
        admin_addr: "127.0.0.1:0".into(),
        broker_addrs: brokers,
        token_keys: SECRET.into(),
        driver,
        pin: net::runtime::Pin::Off,
        timer_tick_ms: 10,
        link_backoff_ms_min: 20,
        link_backoff_ms_max: 200,
        counts_interval_ms: 200,
        ..Default::default()
    }
}

// ---------------------------------------------------------------- test broker

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    Hello(Hello),
    Sub(Interest, u8),
    Unsub(Interest),
    Counts(Vec<(RoomId, u32)>),
    Other(String),
}

struct LinkConn {
    priority: Priority,
    shard: u16,
    stream: TcpStream,
    gen: u64,
}

struct BrokerState {
    seen: Vec<Seen>,
    links: Vec<LinkConn>,
    gen: u64,
}

/// A real TCP peer speaking the link protocol: answers HELLO, records what the edge sends,
/// sends BATCH frames on demand, can drop every link.
pub struct TestBroker {
    pub addr: SocketAddr,
    state: Arc<(Mutex<BrokerState>, Condvar)>,
    stop: Arc<AtomicBool>,
    refuse: Arc<AtomicBool>,
}

impl TestBroker {
    pub fn start(shards: u16) -> TestBroker {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let state = Arc::new((
            Mutex::new(BrokerState {
                seen: Vec::new(),
                links: Vec::new(),
                gen: 0,
            }),
            Condvar::new(),
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let refuse = Arc::new(AtomicBool::new(false));
        let (st, sp, rf) = (state.clone(), stop.clone(), refuse.clone());
        std::thread::spawn(move || {
            for s in l.incoming() {
                if sp.load(Ordering::Acquire) {
                    return;
                }
                let Ok(s) = s else { continue };
                if rf.load(Ordering::Acquire) {
                    drop(s);
                    continue;
                }
                let st = st.clone();
                std::thread::spawn(move || serve_link(s, st, shards));
            }
        });
        TestBroker {
            addr,
            state,
            stop,
            refuse,
        }
    }

    pub fn addr_string(&self) -> String {
        self.addr.to_string()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.0.lock().unwrap().seen.clone()
    }

    pub fn clear_seen(&self) {
        self.state.0.lock().unwrap().seen.clear();
    }

    /// Waits until `pred` holds over everything seen so far.
    pub fn wait_seen(&self, what: &str, pred: impl Fn(&[Seen]) -> bool) {
        let (m, cv) = &*self.state;
        let deadline = Instant::now() + WAIT;
        let mut g = m.lock().unwrap();
        while !pred(&g.seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out waiting for {what}; seen: {:?}",
                g.seen
            );
            g = cv
                .wait_timeout(g, left.min(Duration::from_millis(50)))
                .unwrap()
                .0;
        }
    }

    /// Waits until the edge has `n` links up.
    pub fn wait_links(&self, n: usize) {
        let (m, cv) = &*self.state;
        let deadline = Instant::now() + WAIT;
        let mut g = m.lock().unwrap();
        while g.links.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out waiting for {n} links, have {}",
                g.links.len()
            );
            g = cv
                .wait_timeout(g, left.min(Duration::from_millis(50)))
                .unwrap()
                .0;
        }
    }

    /// Sends a batch on the Low (or High) link of broker shard 0.
    pub fn send(&self, batch: &Batch) {
        let mut out = Vec::new();
        link::encode(&LinkFrame::Batch(batch.clone()), &mut out);
        let deadline = Instant::now() + WAIT;
        loop {
            {
                let mut g = self.state.0.lock().unwrap();
                if let Some(l) = g
                    .links
                    .iter_mut()
                    .find(|l| l.priority == batch.priority && l.shard == 0)
                {
                    l.stream.write_all(&out).unwrap();
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no link for {:?}",
                batch.priority
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends fleet-wide COUNTS.
    pub fn send_counts(&self, counts: Vec<(RoomId, u32)>) {
        let mut out = Vec::new();
        link::encode(&LinkFrame::Counts(counts), &mut out);
        let mut g = self.state.0.lock().unwrap();
        if let Some(l) = g.links.iter_mut().find(|l| l.priority == Priority::Low) {
            l.stream.write_all(&out).unwrap();
        }
    }

    /// Drops every link; while `refuse` is set new links are refused.
    pub fn drop_links(&self, refuse: bool) {
        self.refuse.store(refuse, Ordering::Release);
        let mut g = self.state.0.lock().unwrap();
        for l in g.links.drain(..) {
            let _ = l.stream.shutdown(Shutdown::Both);
        }
    }

    pub fn accept_again(&self) {
        self.refuse.store(false, Ordering::Release);
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect(self.addr);
        self.drop_links(true);
    }
}

fn read_link_frame(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<LinkFrame> {
    loop {
        if let Ok(n) = link::frame_len(buf, proto::limits::LINK_FRAME_BYTES_MAX) {
            if buf.len() >= n {
                let b = Bytes::copy_from_slice(&buf[..n]);
                buf.drain(..n);
                return link::decode(&b, proto::limits::LINK_FRAME_BYTES_MAX)
                    .ok()
                    .map(|(f, _)| f);
            }
        }
        let mut tmp = [0u8; 4096];
        match s.read(&mut tmp) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
}

fn serve_link(mut s: TcpStream, st: Arc<(Mutex<BrokerState>, Condvar)>, shards: u16) {
    let mut buf = Vec::new();
    let Some(LinkFrame::Hello(h)) = read_link_frame(&mut s, &mut buf) else {
        return;
    };
    let reply = LinkFrame::Hello(Hello {
        node_id: "test-broker".into(),
        region: "local".into(),
        shards,
        link_shard: h.link_shard,
        priority: h.priority,
        capabilities: 0,
    });
    let mut out = Vec::new();
    link::encode(&reply, &mut out);
    if s.write_all(&out).is_err() {
        return;
    }
    let my_gen;
    {
        let (m, cv) = &*st;
        let mut g = m.lock().unwrap();
        g.gen += 1;
        my_gen = g.gen;
        g.seen.push(Seen::Hello(h.clone()));
        g.links.push(LinkConn {
            priority: h.priority,
            shard: h.link_shard,
            stream: s.try_clone().unwrap(),
            gen: my_gen,
        });
        cv.notify_all();
    }
    while let Some(f) = read_link_frame(&mut s, &mut buf) {
        let seen = match f {
            LinkFrame::Sub {
                interest,
                encodings,
            } => Seen::Sub(interest, encodings),
            LinkFrame::Unsub { interest } => Seen::Unsub(interest),
            LinkFrame::Counts(c) => Seen::Counts(c),
            LinkFrame::Ping { nonce } => {
                let mut out = Vec::new();
                link::encode(&LinkFrame::Pong { nonce }, &mut out);
                let _ = s.write_all(&out);
                continue;
            }
            // A broker that keeps no history: every resume (and the edge's own epoch question
            // after a re-link) is answered at once, nothing replayed.
            LinkFrame::Replay(r) => {
                let answer = proto::link::replay::Answer {
                    req: r.req,
                    room: r.room,
                    encoding: r.encoding,
                    sync: proto::sync::Sync {
                        epoch: proto::sync::Epoch::from_parts(0, 0),
                        seq: 0,
                        recovered: !matches!(r.resume, proto::sync::ResumeField::Malformed(_)),
                        missed: 0,
                    },
                    batches: Vec::new(),
                };
                let mut out = Vec::new();
                link::encode(&LinkFrame::Replayed(answer), &mut out);
                let _ = s.write_all(&out);
                continue;
            }
            other => Seen::Other(format!("{other:?}")),
        };
        let (m, cv) = &*st;
        m.lock().unwrap().seen.push(seen);
        cv.notify_all();
    }
    let (m, cv) = &*st;
    m.lock().unwrap().links.retain(|l| l.gen != my_gen);
    cv.notify_all();
}

/// A batch for a room: `count` inner DANMU packets, encoded as the edge's viewers asked.
pub fn room_batch(room: u64, seq: u64, encoding: Encoding, body_bytes: usize) -> Batch {
    let mut inner = Vec::new();
    let text = format!(
        "{{\"cmd\":\"DANMU_MSG\",\"room\":{room},\"seq\":{seq},\"pad\":\"{}\"}}",
        "x".repeat(body_bytes)
    );
    packet::encode(0, packet::op::NOTIFICATION, 0, text.as_bytes(), &mut inner);
    let pkt = proto::container::encode_outer(encoding, &inner, seq as u32, Default::default());
    Batch {
        scope: Scope::Room(RoomId(room)),
        priority: Priority::Low,
        seq,
        first_msg_id: MsgId(seq),
        msg_count: 1,
        encoding,
        flushed_at_us: 0,
        packet: Bytes::from(pkt),
    }
}

/// A batch whose packet is incompressible random-ish bytes of `len` (for the slow-reader test).
pub fn big_plain_batch(room: u64, seq: u64, len: usize) -> Batch {
    let mut body = vec![0u8; len];
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for b in body.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = b'a' + (x % 26) as u8;
    }
    let pkt = packet::encode_vec(0, packet::op::NOTIFICATION, seq as u32, &body);
    Batch {
        scope: Scope::Room(RoomId(room)),
        priority: Priority::Low,
        seq,
        first_msg_id: MsgId(seq),
        msg_count: 1,
        encoding: Encoding::Plain,
        flushed_at_us: 0,
        packet: Bytes::from(pkt),
    }
}

// ---------------------------------------------------------------- clients

/// What a client read.
#[derive(Debug, PartialEq, Eq)]
pub enum Got {
    /// TCP: one top-level packet; WS: one binary message.
    Bytes(Vec<u8>),
    /// WS close frame.
    Close(Option<u16>),
    /// The connection ended (EOF or reset).
    Eof,
    /// Nothing within the timeout.
    Timeout,
}

pub struct Client {
    pub ws: bool,
    pub stream: TcpStream,
    buf: Vec<u8>,
    dec: Option<FrameDecoder>,
}

impl Client {
    pub fn tcp(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Client {
            ws: false,
            stream,
            buf: Vec::new(),
            dec: None,
        }
    }

    /// Connects and completes the WebSocket upgrade on `/sub`.
    pub fn ws(addr: SocketAddr) -> Client {
        let mut c = Client::ws_raw(addr);
        c.write(&ws_upgrade_request("/sub"));
        let head = c.read_http_head().expect("upgrade response");
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(
            head.contains(&ws::accept_key("dGhlIHNhbXBsZSBub25jZQ==")),
            "{head}"
        );
        c
    }

    /// Connects without handshaking.
    pub fn ws_raw(addr: SocketAddr) -> Client {
        let mut c = Client::tcp(addr);
        c.ws = true;
        c.dec = Some(FrameDecoder::new_client_side(16 * 1024 * 1024));
        c
    }

    pub fn connect(addr_tcp: SocketAddr, addr_ws: SocketAddr, ws: bool) -> Client {
        if ws {
            Client::ws(addr_ws)
        } else {
            Client::tcp(addr_tcp)
        }
    }

    pub fn write(&mut self, b: &[u8]) {
        let _ = self.stream.write_all(b);
    }

    /// Sends one client packet (one masked binary message on WS).
    pub fn send_packet(&mut self, p: &[u8]) {
        if self.ws {
            let f = ws::encode_client_frame(Opcode::Binary, p, [0x11, 0x22, 0x33, 0x44]);
            self.write(&f);
        } else {
            self.write(p);
        }
    }

    /// Reads an HTTP head (WS upgrade answer or error).
    pub fn read_http_head(&mut self) -> Option<String> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..i + 4]).to_string();
                self.buf.drain(..i + 4);
                return Some(head);
            }
            if Instant::now() > deadline || !self.fill() {
                return if self.buf.is_empty() {
                    None
                } else {
                    Some(String::from_utf8_lossy(&self.buf).to_string())
                };
            }
        }
    }

    /// Reads more bytes; false on EOF/error (timeouts retry until `WAIT`).
    fn fill(&mut self) -> bool {
        let mut tmp = [0u8; 65536];
        match self.stream.read(&mut tmp) {
            Ok(0) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                true
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut
                    || e.kind() == std::io::ErrorKind::Interrupted =>
            {
                true
            }
            Err(e) => {
                eprintln!("client read error: {e}");
                false
            }
        }
    }

    /// Next packet (TCP) or message (WS), waiting up to `wait`.
    pub fn recv(&mut self, wait: Duration) -> Got {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(dec) = self.dec.as_mut() {
                match dec.decode(&mut self.buf) {
                    Ok(Some(Message::Binary(b))) => return Got::Bytes(b),
                    Ok(Some(Message::Close(code, _))) => return Got::Close(code),
                    Ok(Some(other)) => panic!("unexpected ws message {other:?}"),
                    Ok(None) => {}
                    Err(e) => panic!("server sent a bad frame: {e}"),
                }
            } else if self.buf.len() >= 16 {
                let h = packet::parse_header(&self.buf).unwrap();
                let n = h.packet_len as usize;
                if self.buf.len() >= n {
                    return Got::Bytes(self.buf.drain(..n).collect());
                }
            }
            if Instant::now() > deadline {
                return Got::Timeout;
            }
            let before = self.buf.len();
            if !self.fill() && self.buf.len() == before {
                return Got::Eof;
            }
        }
    }

    /// Reads exactly `n` raw bytes (TCP), for byte-for-byte batch checks.
    pub fn recv_exact(&mut self, n: usize, wait: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + wait;
        while self.buf.len() < n {
            if Instant::now() > deadline || !self.fill() {
                return None;
            }
        }
        Some(self.buf.drain(..n).collect())
    }

    /// Authenticates; returns the op 8 reply packet.
    pub fn auth(&mut self, uid: u64, room: u64, protover: u32, key: String) -> Vec<u8> {
        self.send_packet(&auth_packet(uid, room, protover, key));
        match self.recv(WAIT) {
            Got::Bytes(b) => b,
            other => panic!("no auth reply: {other:?}"),
        }
    }

    /// Authenticates and asserts `{"code":0}`.
    pub fn auth_ok(&mut self, uid: u64, room: u64, protover: u32, area: u32) {
        let r = self.auth(uid, room, protover, token(uid, room, area));
        assert_eq!(r, auth::auth_reply(0));
    }

    /// Sends a heartbeat; returns the reply (asserting it is its own 20-byte message/packet).
    pub fn heartbeat(&mut self) -> u32 {
        self.send_packet(&auth::heartbeat_request());
        match self.recv(WAIT) {
            Got::Bytes(b) => {
                assert_eq!(
                    b.len(),
                    20,
                    "heartbeat reply is exactly 20 bytes in its own message: {b:?}"
                );
                let h = packet::parse_header(&b).unwrap();
                assert_eq!(
                    (h.op, h.ver, h.packet_len),
                    (packet::op::HEARTBEAT_REPLY, 1, 20)
                );
                u32::from_be_bytes([b[16], b[17], b[18], b[19]])
            }
            other => panic!("no heartbeat reply: {other:?}"),
        }
    }

    /// Reads until the server closes; returns the WS close code (TCP: None) — panics if the
    /// server keeps the connection open past `WAIT`.
    pub fn expect_closed(&mut self) -> Option<u16> {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.recv(Duration::from_millis(200)) {
                Got::Close(code) => return code,
                Got::Eof => return None,
                Got::Bytes(_) => {}
                Got::Timeout => assert!(Instant::now() < deadline, "server did not close"),
            }
        }
    }
}

pub fn ws_upgrade_request(path: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// Fetches `/metrics` text from the admin port.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(addr, "GET", path)
}

pub fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of one metrics sample line (`name{labels}`), 0 when absent.
pub fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Sum of a metric over every label set.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{') | Some(b' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls until `f` holds (bounded).
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn encoding_of(protover: u32) -> Encoding {
    Encoding::from_protover(protover)
}
