//! Shared by the root integration tests: the whole stack in-process on ports 0, and a small
//! blocking viewer that speaks the client protocol over TCP or WebSocket.
#![allow(dead_code)]

pub mod cluster;

use proto::auth::AuthBody;
use proto::packet::{op, StreamDecoder};
use proto::ws::{FrameDecoder, Message as WsMessage, Opcode};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

pub const API_KEY: &str = "e2e-api-key";
pub const KEYS_V1: &str = "1:first-secret-0123456789";
pub const KEYS_V1_V2: &str = "1:first-secret-0123456789,2:second-secret-0123456789";
/// Every wait in these tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(15);

pub fn unix_now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn control_config(token_keys: &str) -> control::Config {
    control::Config {
        http_addr: "127.0.0.1:0".parse().unwrap(),
        api_keys: vec![API_KEY.into()],
        token_keys: token_keys.into(),
        edge_ttl_ms: 1_000,
        driver: net::runtime::Driver::Legacy,
        ..control::Config::default()
    }
}

pub fn broker_config() -> broker::Config {
    broker::Config {
        shards: 1,
        pin: net::runtime::Pin::Off,
        ingest_addr: "127.0.0.1:0".parse().unwrap(),
        link_addr: "127.0.0.1:0".parse().unwrap(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        api_keys: vec![broker::ApiKey::all_scopes(API_KEY)],
        ..broker::Config::default()
    }
}

pub fn edge_config(
    node_id: &str,
    token_keys: &str,
    broker: SocketAddr,
    control: SocketAddr,
) -> edge::Config {
    edge::Config {
        shards: 1,
        pin: net::runtime::Pin::Off,
        tcp_addr: "127.0.0.1:0".into(),
        ws_addr: "127.0.0.1:0".into(),
        admin_addr: "127.0.0.1:0".into(),
        broker_addrs: vec![broker.to_string()],
        control_addr: Some(control.to_string()),
        control_heartbeat_ms: 100,
        node_id: node_id.into(),
        public_host: "127.0.0.1".into(),
        token_keys: token_keys.into(),
        ..edge::Config::default()
    }
}

/// Control, one broker and one edge, wired as `barrage up` wires them.
pub struct Stack {
    pub control: Option<control::Handle>,
    pub broker: Option<broker::Handle>,
    pub edge: Option<edge::Handle>,
}

impl Stack {
    pub fn start(control_keys: &str, edge_keys: &str) -> Stack {
        Stack::start_with(control_config(control_keys), edge_keys)
    }

    pub fn start_with(control: control::Config, edge_keys: &str) -> Stack {
        let control = control::start(control).expect("control starts");
        let broker = broker::start(broker_config()).expect("broker starts");
        let edge = edge::start(edge_config(
            "edge-1",
            edge_keys,
            broker.link_addr(),
            control.http_addr(),
        ))
        .expect("edge starts");
        let s = Stack {
            control: Some(control),
            broker: Some(broker),
            edge: Some(edge),
        };
        s.wait_for_edges(&["edge-1"]);
        s
    }

    pub fn control_addr(&self) -> SocketAddr {
        self.control
            .as_ref()
            .map(|c| c.http_addr())
            .expect("control running")
    }
    pub fn ingest_addr(&self) -> SocketAddr {
        self.broker
            .as_ref()
            .map(|b| b.ingest_addr())
            .expect("broker running")
    }
    pub fn broker_http(&self) -> SocketAddr {
        self.broker
            .as_ref()
            .map(|b| b.http_addr())
            .expect("broker running")
    }
    pub fn link_addr(&self) -> SocketAddr {
        self.broker
            .as_ref()
            .map(|b| b.link_addr())
            .expect("broker running")
    }

    /// Waits until control lists every named edge as `up`.
    pub fn wait_for_edges(&self, ids: &[&str]) {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = http_json(self.control_addr(), "GET", "/v1/edges", &[], "").1;
            let up: Vec<&str> = v["edges"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter(|e| e["state"] == "up")
                        .filter_map(|e| e["node_id"].as_str())
                        .collect()
                })
                .unwrap_or_default();
            if ids.iter().all(|id| up.contains(id)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "edges {ids:?} never registered: {v}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(e) = self.edge.take() {
            e.shutdown();
        }
        if let Some(b) = self.broker.take() {
            b.shutdown();
        }
        if let Some(c) = self.control.take() {
            c.shutdown();
        }
    }
}

/// One HTTP request; returns the status and the body parsed as JSON (Null if it is not).
pub fn http_json(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, serde_json::Value) {
    let (method, path, body) = (method.to_string(), path.to_string(), body.to_string());
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let r = net::runtime::block_on(net::runtime::Driver::Legacy, async move {
        let h: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        net::http::request(
            &addr.to_string(),
            &method,
            &path,
            &h,
            body.as_bytes(),
            Duration::from_secs(5),
        )
        .await
    })
    .unwrap_or_else(|e| panic!("HTTP {addr}: {e}"));
    (
        r.status,
        serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null),
    )
}

/// A token and the edges control named, for a user through the API key.
pub struct Ticket {
    pub token: String,
    pub edges: Vec<serde_json::Value>,
}

pub fn connect_ticket(control: SocketAddr, room: u64, uid: u64) -> Ticket {
    let body = format!(r#"{{"room":{room},"uid":{uid},"device":"dev-{uid}"}}"#);
    let auth = format!("Bearer {API_KEY}");
    let (status, v) = http_json(
        control,
        "POST",
        "/v1/connect",
        &[("authorization", &auth)],
        &body,
    );
    assert_eq!(status, 200, "{v}");
    Ticket {
        token: v["token"].as_str().expect("token").to_string(),
        edges: v["edges"].as_array().cloned().unwrap_or_default(),
    }
}

pub fn auth_body(uid: u64, room: u64, token: &str) -> AuthBody {
    loadtest::client::auth_body(uid, room, 3, token, &format!("dev-{uid}"))
}

/// What a viewer read.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// An op 5 body (after unpacking containers).
    Message(String),
    /// An op 3 heartbeat reply: the online count.
    Online(u32),
    /// The op 8 auth reply code.
    AuthReply(i64),
    /// The edge closed the connection.
    Closed,
}

/// A blocking viewer over TCP or WebSocket.
pub struct Viewer {
    stream: TcpStream,
    ws: Option<(FrameDecoder, Vec<u8>)>,
    packets: StreamDecoder,
    pending: std::collections::VecDeque<Event>,
}

impl Viewer {
    pub fn tcp(addr: SocketAddr) -> Viewer {
        let stream =
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("tcp connect");
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Viewer {
            stream,
            ws: None,
            packets: StreamDecoder::new(proto::limits::LINK_FRAME_BYTES_MAX),
            pending: Default::default(),
        }
    }

    pub fn ws(addr: SocketAddr) -> Viewer {
        let mut stream =
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("ws connect");
        // The same upgrade `barrage tail` and the loadtest's viewers make.
        let key = loadtest::client::ws_key(rand::random());
        let req = loadtest::client::ws_upgrade_request(&addr.to_string(), &key);
        stream.write_all(req.as_bytes()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        let end = loop {
            match loadtest::client::ws_upgrade_response(&buf, &key) {
                Ok(Some(end)) => break end,
                Ok(None) => {}
                Err(e) => panic!("upgrade: {e}"),
            }
            let n = stream.read(&mut chunk).expect("upgrade response");
            assert!(n > 0, "closed during upgrade");
            buf.extend_from_slice(&chunk[..n]);
        };
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Viewer {
            stream,
            ws: Some((
                FrameDecoder::new_client_side(proto::limits::DECOMPRESSED_BYTES_MAX),
                buf[end..].to_vec(),
            )),
            packets: StreamDecoder::new(proto::limits::LINK_FRAME_BYTES_MAX),
            pending: Default::default(),
        }
    }

    pub fn send_packet(&mut self, packet: &[u8]) {
        let bytes = if self.ws.is_some() {
            proto::ws::encode_client_frame(Opcode::Binary, packet, [1, 2, 3, 4])
        } else {
            packet.to_vec()
        };
        let _ = self.stream.write_all(&bytes);
    }

    /// Sends op 7 and returns the op 8 code (or panics on close/timeout).
    pub fn auth(&mut self, body: &AuthBody) -> i64 {
        self.send_packet(&proto::auth::auth_request(body));
        let deadline = Instant::now() + WAIT;
        loop {
            match self.next_event(deadline) {
                Some(Event::AuthReply(c)) => return c,
                Some(Event::Closed) => panic!("closed before the auth reply"),
                Some(_) => {}
                None => panic!("no auth reply"),
            }
        }
    }

    /// Sends a heartbeat and returns the online count of the reply.
    pub fn heartbeat(&mut self) -> u32 {
        self.send_packet(&proto::auth::heartbeat_request());
        let deadline = Instant::now() + WAIT;
        let mut skipped = Vec::new();
        let n = loop {
            match self.next_event(deadline) {
                Some(Event::Online(n)) => break n,
                Some(Event::Closed) | None => panic!("no heartbeat reply"),
                Some(e) => skipped.push(e),
            }
        };
        for e in skipped.into_iter().rev() {
            self.pending.push_front(e);
        }
        n
    }

    /// The next op 5 body, skipping heartbeat replies and warm-up messages; None at the
    /// deadline or on close.
    pub fn next_message(&mut self, deadline: Instant) -> Option<String> {
        loop {
            match self.next_event(deadline)? {
                Event::Message(m) if m.contains(WARMUP_CMD) => {}
                Event::Message(m) => return Some(m),
                Event::Closed => return None,
                _ => {}
            }
        }
    }

    /// Whether the edge closes the connection before the deadline (messages are skipped).
    pub fn closed_by(&mut self, deadline: Instant) -> bool {
        loop {
            match self.next_event(deadline) {
                Some(Event::Closed) => return true,
                Some(_) => {}
                None => return false,
            }
        }
    }

    pub fn next_event(&mut self, deadline: Instant) -> Option<Event> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            match self.packets.next_packet() {
                Ok(Some(p)) => {
                    match p.op {
                        op::AUTH_REPLY => {
                            let v: serde_json::Value =
                                serde_json::from_slice(&p.body).unwrap_or_default();
                            self.pending.push_back(Event::AuthReply(
                                v["code"].as_i64().unwrap_or(i64::MIN),
                            ));
                        }
                        op::HEARTBEAT_REPLY => {
                            assert_eq!(p.body.len(), 4, "heartbeat reply body is exactly 4 bytes");
                            let n =
                                u32::from_be_bytes([p.body[0], p.body[1], p.body[2], p.body[3]]);
                            self.pending.push_back(Event::Online(n));
                        }
                        op::NOTIFICATION => {
                            let inner = proto::container::unpack(
                                p.ver,
                                p.op,
                                p.seq,
                                &p.body,
                                proto::limits::DECOMPRESSED_BYTES_MAX,
                            )
                            .expect("valid container");
                            for i in inner {
                                self.pending.push_back(Event::Message(
                                    String::from_utf8_lossy(&i.body).into_owned(),
                                ));
                            }
                        }
                        _ => {}
                    }
                    continue;
                }
                Ok(None) => {}
                Err(e) => panic!("bad packet from the edge: {e}"),
            }
            // WebSocket: decode whole messages out of the raw buffer first.
            if let Some((frames, buf)) = &mut self.ws {
                match frames.decode(buf) {
                    Ok(Some(WsMessage::Binary(b))) => {
                        self.packets.feed(&b);
                        continue;
                    }
                    Ok(Some(WsMessage::Close(..))) => return Some(Event::Closed),
                    Ok(Some(_)) => continue,
                    Ok(None) => {}
                    Err(e) => panic!("bad frame from the edge: {e}"),
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Some(Event::Closed),
                Ok(n) => match &mut self.ws {
                    Some((_, buf)) => buf.extend_from_slice(&chunk[..n]),
                    None => self.packets.feed(&chunk[..n]),
                },
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return Some(Event::Closed),
            }
        }
    }
}

/// Marks warm-up messages, which [`Viewer::next_message`] skips.
pub const WARMUP_CMD: &str = "\"cmd\":\"WARMUP\"";

/// Pushes `{"cmd":"WARMUP","n":i}` to the room until every viewer has received one, so the
/// edge's subscription has reached the broker before a test pushes what it asserts on.
pub fn warm_up(ingest: SocketAddr, room: u64, viewers: &mut [&mut Viewer]) {
    let mut client = broker::IngestClient::connect(ingest, API_KEY).expect("ingest connect");
    let deadline = Instant::now() + WAIT;
    let mut seen = vec![false; viewers.len()];
    let mut n = 0u64;
    while seen.iter().any(|s| !s) {
        assert!(
            Instant::now() < deadline,
            "warm-up messages never arrived: {seen:?}"
        );
        client
            .push(&broker::Message::room(
                room,
                format!(r#"{{"cmd":"WARMUP","n":{n}}}"#),
            ))
            .expect("warm-up push");
        n += 1;
        for (v, s) in viewers.iter_mut().zip(seen.iter_mut()) {
            if !*s {
                let until = Instant::now() + Duration::from_millis(200);
                while let Some(e) = v.next_event(until) {
                    match e {
                        Event::Message(m) if m.contains(WARMUP_CMD) => {
                            *s = true;
                            break;
                        }
                        Event::Message(m) => panic!("unexpected message during warm-up: {m}"),
                        Event::Closed => panic!("closed during warm-up"),
                        _ => {}
                    }
                }
            }
        }
    }
}
