//! Test harness for the shard core: a node with one or more shards' config, virtual time, and
//! helpers that play the shell's part (take transmits, report writes and closes).

use super::*;
use crate::config::Config;
use proto::id::{AreaId, DeviceId, Encoding, MsgId, Scope, UserId};
use proto::packet::{self, Header};
use proto::token::{Claims, KeySet};

pub const SECRET: &str = "1:harness-secret-harness-secret-harness-secret";
/// Wall-clock seconds the harness pretends it is (tokens expire far later).
pub const UNIX_S: u64 = 1_800_000_000;

pub fn keys() -> KeySet {
    KeySet::parse(SECRET).expect("harness key")
}

pub fn config() -> Config {
    Config {
        shards: 1,
        token_keys: SECRET.into(),
        broker_addrs: vec!["127.0.0.1:1".into()],
        ..Config::default()
    }
}

pub fn node(config: Config, capacity: u64) -> Arc<Node> {
    Arc::new(Node::new(config, keys(), capacity))
}

pub fn token(uid: u64, room: u64) -> String {
    keys().sign(&Claims {
        uid: UserId(uid),
        device: DeviceId(format!("dev-{uid}")),
        room: RoomId(room),
        area: AreaId(1),
        expires_at_s: UNIX_S + 10 * 365 * 86_400,
    })
}

/// The op 7 auth packet a client sends.
pub fn auth_packet(uid: u64, room: u64, protover: u32) -> Vec<u8> {
    let body = format!(
        "{{\"uid\":{uid},\"roomid\":{room},\"protover\":{protover},\"platform\":\"web\",\"type\":2,\"key\":\"{}\",\"buvid\":\"dev-{uid}\"}}",
        token(uid, room)
    );
    packet::encode_vec(1, packet::op::AUTH, 1, body.as_bytes())
}

pub fn heartbeat_packet() -> Vec<u8> {
    packet::encode_vec(1, packet::op::HEARTBEAT, 1, b"[object Object]")
}

pub fn room_batch(room: u64, seq: u64, body_bytes: usize) -> Batch {
    let text = format!(
        "{{\"cmd\":\"DANMU_MSG\",\"seq\":{seq},\"pad\":\"{}\"}}",
        "x".repeat(body_bytes)
    );
    let pkt = packet::encode_vec(0, packet::op::NOTIFICATION, seq as u32, text.as_bytes());
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

/// Splits TCP client bytes into (op, seq) of each top-level packet.
pub fn packets(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut out = Vec::new();
    while b.len() >= packet::HEADER_LEN {
        let Ok(Header {
            packet_len,
            op,
            seq,
            ..
        }) = packet::parse_header(b)
        else {
            break;
        };
        let n = packet_len as usize;
        if n < packet::HEADER_LEN || n > b.len() {
            break;
        }
        out.push((op, seq, b[packet::HEADER_LEN..n].to_vec()));
        b = &b[n..];
    }
    out
}

/// One shard core driven by hand, with a virtual clock.
pub struct Harness {
    pub core: ShardCore,
    pub node: Arc<Node>,
    pub t0: Instant,
    pub now: Instant,
}

/// What the shell saw for one connection when it flushed it.
#[derive(Debug, Default)]
pub struct Flushed {
    pub bytes: Vec<u8>,
    pub closed: bool,
}

impl Harness {
    pub fn new(config: Config) -> Harness {
        Harness::with_capacity(config, 1_000_000)
    }

    pub fn with_capacity(config: Config, capacity: u64) -> Harness {
        let node = node(config, capacity);
        let t0 = Instant::now();
        Harness {
            core: ShardCore::new(0, node.clone(), t0),
            node,
            t0,
            now: t0,
        }
    }

    pub fn ms(&self) -> u64 {
        self.now.duration_since(self.t0).as_millis() as u64
    }

    pub fn metrics(&self) -> &ShardMetrics {
        &self.node.metrics[0]
    }

    pub fn closes(&self, r: CloseReason) -> u64 {
        self.metrics().closes_of(r)
    }

    /// Moves the clock by `ms` in steps of at most `step_ms`, running timeouts at each.
    pub fn advance(&mut self, ms: u64, step_ms: u64) {
        let end = self.now + Duration::from_millis(ms);
        while self.now < end {
            let step = Duration::from_millis(step_ms.max(1)).min(end - self.now);
            self.now += step;
            self.core.on_timeout(self.now);
        }
    }

    /// Jumps the clock by `ms` with a single timeout call (a stalled thread, a suspended VM).
    pub fn jump(&mut self, ms: u64) {
        self.now += Duration::from_millis(ms);
        self.core.on_timeout(self.now);
    }

    pub fn accept(&mut self, transport: Transport) -> ConnId {
        self.core
            .on_accept(transport, "10.0.0.1".parse().expect("ip"), self.now)
            .expect("admitted")
    }

    pub fn send(&mut self, id: ConnId, bytes: &[u8]) {
        self.core.on_bytes(id, bytes, self.now, UNIX_S);
    }

    /// Accepts a TCP client and authenticates it into `room`; returns its id after reading
    /// the auth reply.
    pub fn viewer(&mut self, uid: u64, room: u64) -> ConnId {
        let id = self.accept(Transport::Tcp);
        self.send(id, &auth_packet(uid, room, 0));
        let f = self.flush(id);
        let p = packets(&f.bytes);
        assert_eq!(
            p.first().map(|p| p.0),
            Some(packet::op::AUTH_REPLY),
            "{p:?}"
        );
        assert!(!f.closed);
        id
    }

    /// Plays a writer that keeps up: takes every transmit of `id` and reports it written.
    pub fn flush(&mut self, id: ConnId) -> Flushed {
        let mut out = Flushed::default();
        loop {
            let mut bufs = Vec::new();
            match self.core.take_transmit(id, &mut bufs) {
                Transmit::Write => {
                    let n: usize = bufs.iter().map(|b| b.len()).sum();
                    for b in &bufs {
                        out.bytes.extend_from_slice(b);
                    }
                    self.core.on_written(id, n);
                }
                Transmit::Idle => return out,
                Transmit::Close => {
                    out.closed = true;
                    self.core.on_closed(id, CloseReason::Io);
                    return out;
                }
            }
        }
    }

    /// Drains the ready queue, returning the ids the shell would wake.
    pub fn ready(&mut self) -> Vec<ConnId> {
        std::iter::from_fn(|| self.core.poll_transmit()).collect()
    }

    pub fn msgs(&mut self) -> Vec<(ShardIdx, Msg)> {
        std::iter::from_fn(|| self.core.poll_msg()).collect()
    }
}
