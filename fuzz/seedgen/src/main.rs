//! Seed corpus generator: `seedgen <corpus dir>` writes a few valid inputs per fuzz target,
//! in the input layout each target documents, and checks each one decodes before writing it.

use bytes::Bytes;
use proto::auth::{self, AuthBody};
use proto::container::{self, BrotliParams};
use proto::id::{AreaId, DeviceId, Encoding, MsgId, Priority, Reach, RoomId, Scope, UserId};
use proto::ingest::{self, IngestFrame, Push, PushError};
use proto::link::{self, caps, Batch, Hello, Interest, LinkFrame, PresenceBatch, PresenceEvent, PresenceKind,
    Transport,
};
use proto::packet::{self, op, ver};
use proto::sync::{Epoch, Resume};
use proto::token::{Claims, KeySet};
use proto::ws::{self, Opcode};
use std::path::{Path, PathBuf};
use std::{env, fs, process};

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    if let Err(e) = fs::create_dir_all(&d).and_then(|()| fs::write(d.join(name), bytes)) {
        eprintln!("seedgen: writing {target}/{name}: {e}");
        process::exit(1);
    }
}

fn must(ok: bool, what: &str) {
    if !ok {
        eprintln!("seedgen: seed {what} does not decode");
        process::exit(1);
    }
}

fn auth_body() -> Vec<u8> {
    br#"{"uid":1,"roomid":42,"protover":3,"buvid":"dev-1","platform":"web","type":2,"key":"1.x.y"}"#
        .to_vec()
}

fn packet_stream(dir: &Path) {
    let mut s = Vec::new();
    packet::encode(ver::HEARTBEAT, op::AUTH, 1, &auth_body(), &mut s);
    packet::encode(ver::HEARTBEAT, op::HEARTBEAT, 2, b"[object Object]", &mut s);
    packet::encode(ver::PLAIN, op::ACK, 3, &7u64.to_be_bytes(), &mut s);
    for (name, chunk) in [
        ("auth-hb-ack-chunk1", 0u8),
        ("auth-hb-ack-chunk7", 6),
        ("auth-hb-ack-whole", 255),
    ] {
        let mut input = vec![chunk];
        input.extend_from_slice(&s);
        write(dir, "packet_stream", name, &input);
    }
    let mut d = proto::packet::StreamDecoder::new(4096);
    d.feed(&s);
    must(matches!(d.next_packet(), Ok(Some(_))), "packet_stream");
}

fn container(dir: &Path) {
    let mut inner = Vec::new();
    packet::encode(
        ver::PLAIN,
        op::NOTIFICATION,
        0,
        br#"{"cmd":"DANMU_MSG","info":[1]}"#,
        &mut inner,
    );
    packet::encode(
        ver::PLAIN,
        op::NOTIFICATION,
        0,
        br#"{"cmd":"SEND_GIFT","data":{}}"#,
        &mut inner,
    );
    for (name, v, body) in [
        ("zlib", ver::ZLIB, container::zlib_compress(&inner)),
        (
            "brotli",
            ver::BROTLI,
            container::brotli_compress(&inner, BrotliParams::default()),
        ),
    ] {
        must(
            container::unpack(v, op::NOTIFICATION, 1, &body, 1 << 20).is_ok(),
            name,
        );
        let mut input = vec![0u8];
        input.extend_from_slice(&v.to_be_bytes());
        input.extend_from_slice(&body);
        write(dir, "container", name, &input);
        // Mode 1: the target compresses the raw inner packets itself.
        let mut input = vec![1u8];
        input.extend_from_slice(&v.to_be_bytes());
        input.extend_from_slice(&inner);
        write(dir, "container", &format!("{name}-raw"), &input);
    }
    // A nested container: a brotli packet inside a zlib one.
    let nested = container::encode_outer(Encoding::Brotli, &inner, 5, BrotliParams::default());
    let mut input = vec![1u8];
    input.extend_from_slice(&ver::ZLIB.to_be_bytes());
    input.extend_from_slice(&nested);
    write(dir, "container", "zlib-of-brotli-raw", &input);
}

fn ws_frames(dir: &Path) {
    let mask = [1, 2, 3, 4];
    let mut s = Vec::new();
    let mut hb = Vec::new();
    packet::encode(ver::HEARTBEAT, op::HEARTBEAT, 1, b"", &mut hb);
    s.extend(ws::encode_client_frame(Opcode::Binary, &hb, mask));
    s.extend(ws::encode_client_frame(
        Opcode::Text,
        "héllo".as_bytes(),
        mask,
    ));
    s.extend(ws::encode_client_frame(Opcode::Ping, b"p", mask));
    s.extend(ws::encode_client_fragment(
        Opcode::Binary,
        false,
        b"frag-",
        mask,
    ));
    s.extend(ws::encode_client_frame(Opcode::Pong, b"", mask));
    s.extend(ws::encode_client_fragment(
        Opcode::Continuation,
        true,
        b"end",
        mask,
    ));
    s.extend(ws::encode_client_close(1000, "bye", mask));
    let mut buf = s.clone();
    must(
        matches!(ws::FrameDecoder::new(4096).decode(&mut buf), Ok(Some(_))),
        "ws_frames",
    );
    for (name, chunk) in [
        ("session-chunk1", 0u8),
        ("session-chunk5", 4),
        ("session-whole", 255),
    ] {
        let mut input = vec![chunk];
        input.extend_from_slice(&s);
        write(dir, "ws_frames", name, &input);
    }
    let big = vec![0x5a; 300];
    let mut input = vec![255u8];
    input.extend(ws::encode_client_frame(Opcode::Binary, &big, mask));
    write(dir, "ws_frames", "binary-300", &input);
}

fn ws_upgrade(dir: &Path) {
    let heads: [(&str, &[u8]); 2] = [
        (
            "minimal",
            b"GET /sub HTTP/1.1\r\nHost: edge\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        ),
        (
            "browser",
            b"GET /sub?room=42 HTTP/1.1\r\nHost: edge.example:443\r\nUser-Agent: Mozilla/5.0\r\n\
Upgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\n\
Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chat, superchat\r\nX-Forwarded-For: 10.0.0.1\r\n\
Origin: https://live.example\r\n\r\n",
        ),
    ];
    for (name, head) in heads {
        must(ws::parse_upgrade(head, 8192).is_ok(), name);
        write(dir, "ws_upgrade", name, head);
    }
}

fn link_frames(dir: &Path) {
    let packet = container::encode_outer(
        Encoding::Plain,
        &packet::encode_vec(0, 5, 0, b"{\"cmd\":\"X\"}"),
        1,
        BrotliParams::default(),
    );
    let frames = [
        LinkFrame::Hello(Hello {
            node_id: "edge-1".into(),
            region: "sh".into(),
            shards: 4,
            link_shard: 0,
            priority: Priority::Low,
            capabilities: caps::ZLIB | caps::PLAIN | caps::HIGH_REACH | caps::PRESENCE,
        }),
        LinkFrame::Sub {
            interest: Interest::Room(RoomId(42)),
            encodings: Encoding::Brotli.bit() | Encoding::Plain.bit(),
        },
        LinkFrame::Unsub {
            interest: Interest::Area(AreaId(3)),
        },
        LinkFrame::Batch(Batch {
            scope: Scope::Room(RoomId(42)),
            priority: Priority::High,
            seq: 17,
            first_msg_id: MsgId(1000),
            msg_count: 1,
            encoding: Encoding::Plain,
            flushed_at_us: 0,
            packet: Bytes::from(packet),
        }),
        LinkFrame::Presence(PresenceBatch {
            incarnation: 1,
            events: vec![PresenceEvent {
                kind: PresenceKind::Enter,
                conn: 99,
                uid: UserId(7),
                device: DeviceId("dev-1".into()),
                room: RoomId(42),
                area: AreaId(2),
                transport: Transport::Tcp,
            }],
        }),
        LinkFrame::Counts(vec![(RoomId(42), 1200), (RoomId(43), 5)]),
        LinkFrame::Ack {
            uid: UserId(7),
            device: DeviceId("dev-1".into()),
            msg_id: MsgId(1000),
        },
        LinkFrame::Ping { nonce: 1 },
        LinkFrame::Pong { nonce: 1 },
        LinkFrame::Challenge { nonce: [0x11; 32] },
        LinkFrame::Proof { mac: [0x22; 32] },
        LinkFrame::Confirm { through: 300 },
    ];
    let mut all = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let mut b = Vec::new();
        link::encode(f, &mut b);
        must(
            link::decode(&Bytes::from(b.clone()), 1 << 20).is_ok(),
            "link",
        );
        write(dir, "link_frames", &format!("{i}-{}", name_of(f)), &b);
        all.extend(b);
    }
    write(dir, "link_frames", "all", &all);
}

fn name_of(f: &LinkFrame) -> &'static str {
    match f {
        LinkFrame::Hello(_) => "hello",
        LinkFrame::Sub { .. } => "sub",
        LinkFrame::Unsub { .. } => "unsub",
        LinkFrame::Batch(_) => "batch",
        LinkFrame::Presence(_) => "presence",
        LinkFrame::Counts(_) => "counts",
        LinkFrame::Ack { .. } => "ack",
        LinkFrame::Ping { .. } => "ping",
        LinkFrame::Pong { .. } => "pong",
        LinkFrame::Challenge { .. } => "challenge",
        LinkFrame::Proof { .. } => "proof",
        LinkFrame::Replay(_) => "replay",
        LinkFrame::Replayed(_) => "replayed",
        LinkFrame::Confirm { .. } => "confirm",
    }
}

fn ingest_frames(dir: &Path) {
    let frames = [
        (
            "auth",
            IngestFrame::Auth {
                req_id: 1,
                api_key: "key-123".into(),
            },
        ),
        (
            "push-room",
            IngestFrame::Push(Push {
                req_id: 2,
                scope: Scope::Room(RoomId(42)),
                priority: Priority::Low,
                reach: Reach::BestEffort,
                ttl_ms: 0,
                body: br#"{"cmd":"DANMU_MSG"}"#.to_vec(),
            }),
        ),
        (
            "push-device",
            IngestFrame::Push(Push {
                req_id: 3,
                scope: Scope::Device(DeviceId("dev-1".into())),
                priority: Priority::High,
                reach: Reach::High,
                ttl_ms: 30_000,
                body: br#"{"cmd":"PK"}"#.to_vec(),
            }),
        ),
        (
            "keyed-push",
            IngestFrame::KeyedPush {
                idempotency_key: "order-1".into(),
                push: Push {
                    req_id: 4,
                    scope: Scope::Room(RoomId(42)),
                    priority: Priority::Low,
                    reach: Reach::BestEffort,
                    ttl_ms: 0,
                    body: br#"{"cmd":"SEND_GIFT"}"#.to_vec(),
                },
            },
        ),
        (
            "status-ok",
            IngestFrame::Status {
                req_id: 2,
                result: Ok(MsgId(1000)),
            },
        ),
        (
            "status-rate",
            IngestFrame::Status {
                req_id: 3,
                result: Err(PushError::RateLimited {
                    retry_after_ms: 250,
                }),
            },
        ),
        (
            "status-invalid",
            IngestFrame::Status {
                req_id: 4,
                result: Err(PushError::Invalid("not an object".into())),
            },
        ),
    ];
    let mut all = Vec::new();
    for (name, f) in &frames {
        let mut b = Vec::new();
        ingest::encode(f, &mut b);
        must(ingest::decode(&b, 1 << 20).is_ok(), name);
        write(dir, "ingest_frames", name, &b);
        all.extend(b);
    }
    write(dir, "ingest_frames", "pipelined", &all);
}

fn token(dir: &Path) {
    // Must match the key set in fuzz_targets/token.rs.
    let keys = KeySet::new(&[
        (1, b"fuzz-secret-one-0123456789".to_vec()),
        (7, b"fuzz-secret-seven-0123456789".to_vec()),
    ]);
    let now_s = 1_700_000_000u64;
    let claims = [
        (
            "user",
            Claims {
                uid: UserId(7),
                device: DeviceId("dev-1".into()),
                room: RoomId(42),
                area: AreaId(3),
                expires_at_s: now_s + 3600,
            },
        ),
        (
            "guest",
            Claims {
                uid: UserId::GUEST,
                device: DeviceId("b".repeat(64)),
                room: RoomId(1),
                area: AreaId(0),
                expires_at_s: now_s,
            },
        ),
    ];
    for (name, c) in &claims {
        let t = keys.sign(c);
        must(keys.verify(&t, now_s).is_ok(), name);
        let mut input = now_s.to_be_bytes().to_vec();
        input.extend_from_slice(t.as_bytes());
        write(dir, "token", name, &input);
    }
}

/// Keep in sync with fuzz/fuzz_targets/edge_session.rs (`KEY`, `NOW_S`).
const EDGE_SESSION_KEY: &str = "1:edge-session-fuzz-key-edge-session-fuzz-key";
const EDGE_SESSION_NOW_S: u64 = 1_800_000_000;

/// Seeds for the edge Session: [mode, chunk, client bytes...] (see the target's docs).
fn edge_session(dir: &Path) {
    let keys = match KeySet::parse(EDGE_SESSION_KEY) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("seedgen: edge_session key: {e}");
            process::exit(1);
        }
    };
    let token = keys.sign(&Claims {
        uid: UserId(1),
        device: DeviceId("dev-1".into()),
        room: RoomId(42),
        area: AreaId(1),
        expires_at_s: EDGE_SESSION_NOW_S + 3_600,
    });
    must(keys.verify(&token, EDGE_SESSION_NOW_S).is_ok(), "edge_session token");
    let body = format!(
        r#"{{"uid":1,"roomid":42,"protover":3,"platform":"web","type":2,"key":"{token}","buvid":"dev-1"}}"#
    );
    let auth = packet::encode_vec(ver::HEARTBEAT, op::AUTH, 1, body.as_bytes());
    let heartbeat = packet::encode_vec(ver::HEARTBEAT, op::HEARTBEAT, 2, b"[object Object]");
    let mut tcp = vec![0u8, 0];
    tcp.extend_from_slice(&auth);
    tcp.extend_from_slice(&heartbeat);
    write(dir, "edge_session", "tcp-auth-heartbeat", &tcp);
    let mut tcp_bytewise = tcp.clone();
    tcp_bytewise[1] = 1;
    write(dir, "edge_session", "tcp-auth-heartbeat-bytewise", &tcp_bytewise);
    let mask = [0x11, 0x22, 0x33, 0x44];
    let mut ws_in = vec![1u8, 0];
    ws_in.extend_from_slice(
        b"GET /sub HTTP/1.1\r\nHost: edge\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    let upgrade_len = ws_in.len();
    ws_in.extend(ws::encode_client_frame(Opcode::Binary, &auth, mask));
    ws_in.extend(ws::encode_client_frame(Opcode::Binary, &heartbeat, mask));
    ws_in.extend(ws::encode_client_frame(Opcode::Ping, b"p", mask));
    write(dir, "edge_session", "ws-upgrade-auth-heartbeat-ping", &ws_in);
    let mut ws_text = ws_in[..upgrade_len].to_vec();
    ws_text.extend(ws::encode_client_frame(Opcode::Text, b"hello", mask));
    write(dir, "edge_session", "ws-text-message", &ws_text);
}

fn auth(dir: &Path) {
    let body = AuthBody {
        uid: 1,
        roomid: 42,
        protover: 3,
        platform: Some("web".into()),
        kind: Some(2),
        key: "1.x.y".into(),
        buvid: Some("dev-1".into()),
        ack: true,
    };
    let resume = Resume {
        epoch: Epoch::new("0123456789abcdef-0").unwrap_or_else(|_| process::exit(1)),
        seq: 41,
    };
    let with = auth::auth_request_with_resume(&body, Some(&resume));
    let plain = auth::auth_request(&AuthBody {
        ack: false,
        ..body.clone()
    });
    let seeds: [(&str, &[u8]); 5] = [
        ("web", &auth_body()),
        ("ack-resume", &with[packet::HEADER_LEN..]),
        ("plain", &plain[packet::HEADER_LEN..]),
        (
            "bad-resume",
            br#"{"uid":"7","roomid":"42","ack":true,"resume":{"epoch":"e","seq":-1}}"#,
        ),
        (
            "resume-string-seq",
            br#"{"roomid":42,"key":null,"resume":{"epoch":"ab-1","seq":"9"},"clientver":"1"}"#,
        ),
    ];
    for (name, b) in seeds {
        must(auth::parse_auth_ext(b, 4096).is_ok(), name);
        write(dir, "auth", name, b);
    }
}

/// The datagrams of docs/protocol-udp.md, then a split batch; layout: mode, now_s, datagram.
fn udp(dir: &Path) {
    use proto::udp::{self, CookieKey, UDP_PAYLOAD_BYTES_MAX};
    use std::net::SocketAddr;
    const NOW_S: u64 = 1_700_000_000;
    let key = CookieKey::new(b"barrage-udp-test");
    let client = SocketAddr::from(([127, 0, 0, 1], 40000));
    let cookie = key.mint(client, NOW_S);
    let session = key.session_of(&cookie, 0);
    let auth = br#"{"uid":7,"roomid":1,"protover":3,"key":"<token>","buvid":"dev-1"}"#;
    let mut run = Vec::new();
    // Words picked by a small LCG, so the run does not compress into one datagram.
    let words = ["hello", "666", "gg", "nice", "up", "Lv20", "wow", "lol", "88", "hi"];
    let mut x = 1u64;
    for i in 0..12 {
        let mut text = String::new();
        for _ in 0..60 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            text.push_str(words[(x >> 59) as usize % words.len()]);
            text.push_str(&format!("{} ", x >> 54));
        }
        let body = format!(r#"{{"cmd":"DANMU_MSG","info":[[{i}],"{text}",[7,"u"]]}}"#);
        packet::encode(ver::PLAIN, op::NOTIFICATION, 0, body.as_bytes(), &mut run);
    }
    let parts = udp::split_batch(&run, Encoding::Zlib, 42, UDP_PAYLOAD_BYTES_MAX, BrotliParams::default())
        .unwrap_or_default();
    must(parts.len() > 1, "udp split");
    let seeds: Vec<(&str, u8, Vec<u8>)> = vec![
        ("hello", 0, udp::hello_datagram(None, auth)),
        ("cookie", 0, udp::cookie_datagram(&cookie)),
        ("hello-cookie", 0, udp::hello_datagram(Some(&cookie), auth)),
        ("hello-ok", 0, udp::hello_ok(session)),
        ("heartbeat", 0, udp::session_datagram(session, None, &proto::auth::heartbeat_request())),
        ("rebinding-proof", 1, udp::session_datagram(session, Some(&cookie), &proto::auth::heartbeat_request())),
        ("heartbeat-reply", 0, proto::auth::heartbeat_reply(1234).to_vec()),
        ("data-part0", 0, parts[0].clone()),
        ("batch-run-zlib", 4, run[..run.len().min(1100)].to_vec()),
    ];
    for (name, mode, d) in seeds {
        must(d.len() <= UDP_PAYLOAD_BYTES_MAX, name);
        let mut input = vec![mode];
        input.extend_from_slice(&NOW_S.to_be_bytes());
        input.extend_from_slice(&d);
        write(dir, "udp", name, &input);
    }
}

fn main() {
    let Some(dir) = env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: seedgen <corpus dir>");
        process::exit(2);
    };
    packet_stream(&dir);
    container(&dir);
    ws_frames(&dir);
    ws_upgrade(&dir);
    link_frames(&dir);
    ingest_frames(&dir);
    token(&dir);
    edge_session(&dir);
    auth(&dir);
    udp(&dir);
}
