//! Test peers for the broker: a test edge speaking `proto::link` over real TCP, a tiny
//! blocking HTTP client, and config helpers. Everything is bounded by timeouts.
#![allow(dead_code)]

pub mod corpus;

use broker::{ApiKey, Config};
use bytes::Bytes;
use proto::id::{Encoding, Priority, RoomId};
use proto::link::{Batch, Hello, Interest, LinkFrame};
use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const KEY: &str = "test-key";
pub const WAIT: Duration = Duration::from_secs(10);

/// A broker config on loopback port 0 with two shards and one all-scope key without limits.
pub fn config() -> Config {
    let lo = SocketAddr::from(([127, 0, 0, 1], 0));
    Config {
        shards: 2,
        pin: net::runtime::Pin::Off,
        ingest_addr: lo,
        link_addr: lo,
        http_addr: lo,
        api_keys: vec![ApiKey {
            key: KEY.into(),
            scopes: broker::ScopeKind::ALL.to_vec(),
            rate_per_s: 0.0,
            burst: 0.0,
        }],
        room_rate_per_s: 0.0,
        ..Config::default()
    }
}

/// What the test edge saw on one link.
#[derive(Debug)]
pub struct Event {
    pub shard: u16,
    pub priority: Priority,
    pub frame: LinkFrame,
}

struct Link {
    writer: Arc<Mutex<TcpStream>>,
    stream: TcpStream,
}

/// An edge node: one link per (broker shard, priority), frames from all links in one queue.
pub struct TestEdge {
    pub node_id: String,
    pub shards: u16,
    addr: SocketAddr,
    links: HashMap<(u16, Priority), Link>,
    tx: mpsc::Sender<Event>,
    rx: mpsc::Receiver<Event>,
    /// Frames read while waiting for something else.
    pending: VecDeque<Event>,
    nonce: u64,
}

fn write_frame(w: &Mutex<TcpStream>, frame: &LinkFrame) {
    let mut buf = Vec::new();
    proto::link::encode(frame, &mut buf);
    let mut g = w.lock().unwrap();
    let _ = g.write_all(&buf);
}

fn read_frame(s: &mut TcpStream) -> Option<LinkFrame> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let n = u32::from_be_bytes(len) as usize;
    let mut buf = vec![0u8; 4 + n];
    buf[..4].copy_from_slice(&len);
    s.read_exact(&mut buf[4..]).ok()?;
    let (f, used) =
        proto::link::decode(&Bytes::from(buf), u32::MAX).expect("broker sent a bad link frame");
    assert_eq!(used, 4 + n);
    Some(f)
}

impl TestEdge {
    pub fn connect(addr: SocketAddr, node_id: &str) -> TestEdge {
        let (tx, rx) = mpsc::channel();
        let mut e = TestEdge {
            node_id: node_id.into(),
            shards: 0,
            addr,
            links: HashMap::new(),
            tx,
            rx,
            pending: VecDeque::new(),
            nonce: 0,
        };
        e.shards = e.open(0, Priority::Low);
        for shard in 0..e.shards {
            for p in [Priority::Low, Priority::High] {
                if (shard, p) != (0, Priority::Low) {
                    e.open(shard, p);
                }
            }
        }
        e
    }

    /// Opens the link (shard, priority); returns the broker's shard count from its Hello.
    pub fn open(&mut self, shard: u16, priority: Priority) -> u16 {
        let mut s = TcpStream::connect_timeout(&self.addr, WAIT).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let w = Arc::new(Mutex::new(s.try_clone().unwrap()));
        let hello = Hello {
            node_id: self.node_id.clone(),
            region: "test".into(),
            shards: 1,
            link_shard: shard,
            priority,
            capabilities: 0,
        };
        write_frame(&w, &LinkFrame::Hello(hello));
        let reply = match read_frame(&mut s) {
            Some(LinkFrame::Hello(h)) => h,
            other => panic!("expected Hello, got {other:?}"),
        };
        assert_eq!(reply.link_shard, shard);
        assert_eq!(reply.priority, priority);
        // No read timeout on the reader thread: it ends when the socket closes.
        s.set_read_timeout(None).unwrap();
        let (mut rs, tx, w2) = (s.try_clone().unwrap(), self.tx.clone(), w.clone());
        std::thread::spawn(move || {
            while let Some(frame) = read_frame(&mut rs) {
                if let LinkFrame::Ping { nonce } = frame {
                    write_frame(&w2, &LinkFrame::Pong { nonce });
                    continue;
                }
                if tx
                    .send(Event {
                        shard,
                        priority,
                        frame,
                    })
                    .is_err()
                {
                    return;
                }
            }
        });
        self.links.insert(
            (shard, priority),
            Link {
                writer: w,
                stream: s,
            },
        );
        reply.shards
    }

    /// Closes one link (the broker sees EOF).
    pub fn drop_link(&mut self, shard: u16, priority: Priority) {
        if let Some(l) = self.links.remove(&(shard, priority)) {
            let _ = l.stream.shutdown(Shutdown::Both);
        }
    }

    pub fn send(&self, shard: u16, priority: Priority, frame: &LinkFrame) {
        write_frame(&self.links[&(shard, priority)].writer, frame);
    }

    /// Ping-pong on a link: when it returns, the broker has handled every frame sent before.
    pub fn sync(&mut self, shard: u16) {
        self.nonce += 1;
        let nonce = self.nonce;
        self.send(shard, Priority::Low, &LinkFrame::Ping { nonce });
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(Event {
                    frame: LinkFrame::Pong { nonce: n },
                    ..
                }) if n == nonce => return,
                Ok(ev) => self.pending.push_back(ev),
                Err(_) => panic!("no pong from shard {shard}"),
            }
        }
    }

    pub fn sub(&mut self, interest: Interest, encodings: u8) {
        let shard = self.shard_of(&interest);
        self.send(
            shard,
            Priority::Low,
            &LinkFrame::Sub {
                interest,
                encodings,
            },
        );
        self.sync(shard);
    }

    pub fn sub_room(&mut self, room: u64) {
        self.sub(Interest::Room(RoomId(room)), Encoding::Brotli.bit());
    }

    pub fn unsub(&mut self, interest: Interest) {
        let shard = self.shard_of(&interest);
        self.send(shard, Priority::Low, &LinkFrame::Unsub { interest });
        self.sync(shard);
    }

    pub fn shard_of(&self, interest: &Interest) -> u16 {
        match interest {
            Interest::Room(r) => proto::link::shard_of_room(*r, self.shards),
            Interest::Area(a) => proto::link::shard_of_area(*a, self.shards),
        }
    }

    /// The next event, if one comes within `timeout`.
    pub fn next_event(&mut self, timeout: Duration) -> Option<Event> {
        if let Some(ev) = self.pending.pop_front() {
            return Some(ev);
        }
        self.rx.recv_timeout(timeout).ok()
    }

    /// The next BATCH (and the link it came on), skipping other frames.
    pub fn next_batch(&mut self, timeout: Duration) -> Option<(u16, Priority, Batch)> {
        let deadline = Instant::now() + timeout;
        loop {
            let ev = self.next_event(deadline.saturating_duration_since(Instant::now()))?;
            if let LinkFrame::Batch(b) = ev.frame {
                return Some((ev.shard, ev.priority, b));
            }
        }
    }

    /// Batches until they hold `messages` messages in total (panics after `WAIT`).
    pub fn batches_with(&mut self, messages: usize) -> Vec<(u16, Priority, Batch)> {
        let mut got = Vec::new();
        let mut n = 0;
        let deadline = Instant::now() + WAIT;
        while n < messages {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_batch(left) {
                Some(b) => {
                    n += b.2.msg_count as usize;
                    got.push(b);
                }
                None => panic!("{}: got {n} of {messages} messages", self.node_id),
            }
        }
        got
    }

    /// Asserts nothing but non-batch frames arrive for `quiet`.
    pub fn expect_no_batch(&mut self, quiet: Duration) {
        if let Some(b) = self.next_batch(quiet) {
            panic!("{}: unexpected batch {:?}", self.node_id, b.2.scope);
        }
    }
}

impl Drop for TestEdge {
    fn drop(&mut self) {
        for (_, l) in self.links.drain() {
            let _ = l.stream.shutdown(Shutdown::Both);
        }
    }
}

/// The client packets of a batch as a client sees them: (outer seq, inner bodies).
pub fn unpack(batch: &Batch) -> (Vec<u32>, Vec<Vec<u8>>) {
    let mut seqs = Vec::new();
    let mut bodies = Vec::new();
    let mut at = 0;
    let bytes = &batch.packet[..];
    while at < bytes.len() {
        let (p, used) = proto::packet::decode(&bytes[at..], u32::MAX).expect("bad outer packet");
        assert_eq!(p.op, proto::packet::op::NOTIFICATION);
        assert_eq!(p.ver, batch.encoding as u16);
        seqs.push(p.seq);
        for inner in
            proto::container::unpack(p.ver, p.op, p.seq, p.body, 1 << 24).expect("bad container")
        {
            assert_eq!((inner.ver, inner.op), (0, 5));
            bodies.push(inner.body);
        }
        at += used;
    }
    (seqs, bodies)
}

/// A blocking HTTP/1.1 request (one connection per call). Returns (status, headers, body).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &[u8],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut s = TcpStream::connect_timeout(&addr, WAIT).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(k) = key {
        req.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    req.push_str("Content-Type: application/json\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no header end");
    let head = String::from_utf8_lossy(&resp[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = resp[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    (status, headers, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let n = usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 4 + n..];
    }
}

pub fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

/// A realistic-looking danmaku body.
pub fn danmu(room: u64, i: usize) -> Vec<u8> {
    format!(r#"{{"cmd":"DANMU_MSG","info":[[0,1,25,16777215,1700000000000,0,0,"abc",0,0,0,"",0],"msg {i} in room {room}",[{uid},"viewer{uid}",0,0,0,10000,1,""],[],[0,0,9868950,">50000",0],["",""],0,0,null,{{"ts":1700000000,"ct":"AB12"}},0,0,null,null,0,105]}}"#, uid = 1000 + i).into_bytes()
}

/// Waits until `f` holds (polling), panicking after `WAIT`.
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The value of one metric sample line (`name{labels}`) in Prometheus text.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}
