//! The hex examples in docs/protocol-link-ingest.md, checked against the encoders and decoders
//! so the document cannot drift from the code: the test reads the document itself.

use bytes::Bytes;
use proto::id::{AreaId, DeviceId, Encoding, MsgId, Priority, Reach, RoomId, Scope, UserId};
use proto::ingest::{self, IngestFrame, Push, PushError};
use proto::link::{
    self, caps, Batch, Hello, Interest, LinkFrame, PresenceBatch, PresenceEvent, PresenceKind,
    Transport,
};

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn link_examples() -> Vec<(&'static str, LinkFrame)> {
    vec![
        (
            "HELLO",
            LinkFrame::Hello(Hello {
                node_id: "e1".into(),
                region: "sh".into(),
                shards: 4,
                link_shard: 0,
                priority: Priority::Low,
                capabilities: caps::ZLIB | caps::PLAIN | caps::HIGH_REACH | caps::PRESENCE,
            }),
        ),
        (
            "SUB",
            LinkFrame::Sub {
                interest: Interest::Room(RoomId(42)),
                encodings: Encoding::Brotli.bit() | Encoding::Plain.bit(),
            },
        ),
        (
            "UNSUB",
            LinkFrame::Unsub {
                interest: Interest::Area(AreaId(3)),
            },
        ),
        (
            "BATCH",
            LinkFrame::Batch(Batch {
                scope: Scope::Room(RoomId(42)),
                priority: Priority::Low,
                seq: 17,
                first_msg_id: MsgId(1000),
                msg_count: 1,
                encoding: Encoding::Plain,
                flushed_at_us: 1_700_000_000_000_000,
                packet: Bytes::from_static(
                    b"\x00\x00\x00\x12\x00\x10\x00\x00\x00\x00\x00\x05\x00\x00\x00\x11{}",
                ),
            }),
        ),
        (
            "PRESENCE",
            LinkFrame::Presence(PresenceBatch {
                incarnation: 3,
                events: vec![PresenceEvent {
                    kind: PresenceKind::Enter,
                    conn: 9,
                    uid: UserId(7),
                    device: DeviceId("d1".into()),
                    room: RoomId(42),
                    area: AreaId(2),
                    transport: Transport::Ws,
                }],
            }),
        ),
        (
            "COUNTS",
            LinkFrame::Counts(vec![(RoomId(42), 1200), (RoomId(43), 5)]),
        ),
        (
            "ACK",
            LinkFrame::Ack {
                uid: UserId(7),
                device: DeviceId("d1".into()),
                msg_id: MsgId(1000),
            },
        ),
        ("PING", LinkFrame::Ping { nonce: 1 }),
        ("PONG", LinkFrame::Pong { nonce: 1 }),
        ("CHALLENGE", LinkFrame::Challenge { nonce: [0x11; 32] }),
        ("PROOF", LinkFrame::Proof { mac: [0x22; 32] }),
        ("CONFIRM", LinkFrame::Confirm { through: 300 }),
    ]
}

fn ingest_examples() -> Vec<(&'static str, IngestFrame)> {
    vec![
        (
            "AUTH",
            IngestFrame::Auth {
                req_id: 1,
                api_key: "k1".into(),
            },
        ),
        (
            "PUSH",
            IngestFrame::Push(Push {
                req_id: 2,
                scope: Scope::Room(RoomId(42)),
                priority: Priority::High,
                reach: Reach::High,
                ttl_ms: 30_000,
                body: b"{}".to_vec(),
            }),
        ),
        (
            "PUSH (device scope)",
            IngestFrame::Push(Push {
                req_id: 3,
                scope: Scope::Device(DeviceId("d1".into())),
                priority: Priority::Low,
                reach: Reach::BestEffort,
                ttl_ms: 0,
                body: b"{}".to_vec(),
            }),
        ),
        (
            "KEYED_PUSH",
            IngestFrame::KeyedPush {
                idempotency_key: "k-1".into(),
                push: Push {
                    req_id: 4,
                    scope: Scope::Room(RoomId(42)),
                    priority: Priority::Low,
                    reach: Reach::BestEffort,
                    ttl_ms: 0,
                    body: b"{}".to_vec(),
                },
            },
        ),
        (
            "STATUS ok",
            IngestFrame::Status {
                req_id: 2,
                result: Ok(MsgId(1000)),
            },
        ),
        (
            "STATUS rate_limited",
            IngestFrame::Status {
                req_id: 2,
                result: Err(PushError::RateLimited {
                    retry_after_ms: 250,
                }),
            },
        ),
        (
            "STATUS invalid",
            IngestFrame::Status {
                req_id: 2,
                result: Err(PushError::Invalid("no".into())),
            },
        ),
        (
            "STATUS overloaded",
            IngestFrame::Status {
                req_id: 2,
                result: Err(PushError::Overloaded),
            },
        ),
        (
            "SUBSCRIBE",
            IngestFrame::Subscribe {
                req_id: 9,
                after: Some(41),
                rooms: vec![proto::id::RoomId(100)],
                areas: vec![proto::id::AreaId(3)],
            },
        ),
    ]
}

/// The hex examples in the document, in order: inside ```text blocks, the leading two-digit hex
/// tokens of each line; a blank line or the end of a block ends an example.
fn doc_examples() -> Vec<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/protocol-link-ingest.md"
    );
    let doc = std::fs::read_to_string(path).expect("docs/protocol-link-ingest.md");
    let mut examples = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    let mut in_block = false;
    for line in doc.lines() {
        if line.starts_with("```") {
            in_block = line == "```text";
        }
        let hex_tokens: Vec<&str> = if in_block {
            line.split(' ')
                .take_while(|t| t.len() == 2 && t.bytes().all(|b| b.is_ascii_hexdigit()))
                .collect()
        } else {
            Vec::new()
        };
        if hex_tokens.is_empty() {
            if !current.is_empty() {
                examples.push(current.join(" "));
                current.clear();
            }
        } else {
            current.extend(hex_tokens);
        }
    }
    examples
}

#[test]
fn doc_holds_exactly_these_examples() {
    let want: Vec<&str> = LINK_HEX.iter().chain(INGEST_HEX).copied().collect();
    assert_eq!(doc_examples(), want);
}

/// The hex of each example, as printed in the document.
const LINK_HEX: &[&str] = &[
    // HELLO
    "00 00 00 13 01 01 00 02 65 31 00 02 73 68 00 04 00 00 00 00 00 00 0f",
    // SUB
    "00 00 00 0c 01 02 00 00 00 00 00 00 00 00 2a 05",
    // UNSUB
    "00 00 00 07 01 03 01 00 00 00 03",
    // BATCH
    "00 00 00 3b 01 04 00 00 00 00 00 00 00 00 2a 00 00 00 00 00 00 00 00 11 00 00 00 00 00 00 03 e8 00 00 00 01 00 00 06 0a 24 18 1e 40 00 00 00 00 12 00 10 00 00 00 00 00 05 00 00 00 11 7b 7d",
    // PRESENCE
    "00 00 00 30 01 05 00 00 00 00 00 00 00 03 00 00 00 01 00 00 00 00 00 00 00 00 09 00 00 00 00 00 00 00 07 00 02 64 31 00 00 00 00 00 00 00 2a 00 00 00 02 01",
    // COUNTS
    "00 00 00 1e 01 06 00 00 00 02 00 00 00 00 00 00 00 2a 00 00 04 b0 00 00 00 00 00 00 00 2b 00 00 00 05",
    // ACK
    "00 00 00 16 01 07 00 00 00 00 00 00 00 07 00 02 64 31 00 00 00 00 00 00 03 e8",
    // PING
    "00 00 00 0a 01 08 00 00 00 00 00 00 00 01",
    // PONG
    "00 00 00 0a 01 09 00 00 00 00 00 00 00 01",
    // CHALLENGE
    "00 00 00 22 01 0a 11 11 11 11 11 11 11 11 11 11 11 11 11 11 11 11 11 11 11 11 11 11 11 11 11 11 11 11 11 11 11 11",
    // PROOF
    "00 00 00 22 01 0b 22 22 22 22 22 22 22 22 22 22 22 22 22 22 22 22 22 22 22 22 22 22 22 22 22 22 22 22 22 22 22 22",
    // CONFIRM
    "00 00 00 0a 01 0c 00 00 00 00 00 00 01 2c",
];
const INGEST_HEX: &[&str] = &[
    // AUTH
    "00 00 00 0e 01 01 00 00 00 00 00 00 00 01 00 02 6b 31",
    // PUSH
    "00 00 00 1f 01 02 00 00 00 00 00 00 00 02 00 00 00 00 00 00 00 00 2a 01 01 00 00 75 30 00 00 00 02 7b 7d",
    // PUSH (device scope)
    "00 00 00 1b 01 02 00 00 00 00 00 00 00 03 04 00 02 64 31 00 00 00 00 00 00 00 00 00 02 7b 7d",
    // KEYED_PUSH
    "00 00 00 24 01 04 00 03 6b 2d 31 00 00 00 00 00 00 00 04 00 00 00 00 00 00 00 00 2a 00 00 00 00 00 00 00 00 00 02 7b 7d",
    // STATUS ok
    "00 00 00 13 01 03 00 00 00 00 00 00 00 02 00 00 00 00 00 00 00 03 e8",
    // STATUS rate_limited
    "00 00 00 0f 01 03 00 00 00 00 00 00 00 02 04 00 00 00 fa",
    // STATUS invalid
    "00 00 00 0f 01 03 00 00 00 00 00 00 00 02 05 00 02 6e 6f",
    // STATUS overloaded
    "00 00 00 0b 01 03 00 00 00 00 00 00 00 02 06",
    // SUBSCRIBE
    "00 00 00 27 01 05 00 00 00 00 00 00 00 09 01 00 00 00 00 00 00 00 29 00 00 00 01 00 00 00 00 00 00 00 64 00 00 00 01 00 00 00 03",
];

#[test]
fn link_doc_examples_match_the_codec() {
    let mut got = Vec::new();
    for (name, frame) in link_examples() {
        let mut out = Vec::new();
        link::encode(&frame, &mut out);
        println!("{name}: {}", hex(&out));
        got.push(hex(&out));
        assert_eq!(
            link::decode(&Bytes::from(out), 1024).map(|(f, _)| f),
            Ok(frame),
            "{name}"
        );
    }
    assert_eq!(got, LINK_HEX);
}

#[test]
fn ingest_doc_examples_match_the_codec() {
    let mut got = Vec::new();
    for (name, frame) in ingest_examples() {
        let mut out = Vec::new();
        ingest::encode(&frame, &mut out);
        println!("{name}: {}", hex(&out));
        got.push(hex(&out));
        assert_eq!(
            ingest::decode(&out, 1024).map(|(f, _)| f),
            Ok(frame),
            "{name}"
        );
    }
    assert_eq!(got, INGEST_HEX);
}
