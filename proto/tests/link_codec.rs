//! Link frame codec: round trips for every frame type, truncation, limits and every error path.

use bytes::Bytes;
use proptest::prelude::*;
use proto::id::{AreaId, DeviceId, Encoding, MsgId, Priority, RoomId, Scope, UserId};
use proto::limits::LINK_FRAME_BYTES_MAX;
use proto::link::{
    self, caps, decode, encode, encode_batch_header, frame_len, kind, shard_of_area, shard_of_room,
    Batch, Hello, Interest, LinkError, LinkFrame, PresenceBatch, PresenceEvent, PresenceKind,
    Transport, LINK_VERSION,
};

fn any_priority() -> impl Strategy<Value = Priority> {
    prop_oneof![Just(Priority::Low), Just(Priority::High)]
}

fn any_encoding() -> impl Strategy<Value = Encoding> {
    prop_oneof![
        Just(Encoding::Plain),
        Just(Encoding::Zlib),
        Just(Encoding::Brotli)
    ]
}

fn any_device() -> impl Strategy<Value = DeviceId> {
    ".{0,24}".prop_map(DeviceId)
}

fn any_scope() -> impl Strategy<Value = Scope> {
    prop_oneof![
        any::<u64>().prop_map(|r| Scope::Room(RoomId(r))),
        any::<u32>().prop_map(|a| Scope::Area(AreaId(a))),
        Just(Scope::Global),
        any::<u64>().prop_map(|u| Scope::User(UserId(u))),
        any_device().prop_map(Scope::Device),
    ]
}

fn any_interest() -> impl Strategy<Value = Interest> {
    prop_oneof![
        any::<u64>().prop_map(|r| Interest::Room(RoomId(r))),
        any::<u32>().prop_map(|a| Interest::Area(AreaId(a))),
    ]
}

fn any_presence() -> impl Strategy<Value = PresenceEvent> {
    (
        prop_oneof![Just(PresenceKind::Enter), Just(PresenceKind::Exit)],
        any::<u64>(),
        any_device(),
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        prop_oneof![
            Just(Transport::Tcp),
            Just(Transport::Ws),
            Just(Transport::Wss),
            Just(Transport::Udp)
        ],
    )
        .prop_map(
            |(kind, uid, device, room, conn, area, transport)| PresenceEvent {
                kind,
                conn,
                uid: UserId(uid),
                device,
                room: RoomId(room),
                area: AreaId(area),
                transport,
            },
        )
}

fn any_batch() -> impl Strategy<Value = Batch> {
    (
        any_scope(),
        any_priority(),
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        any_encoding(),
        any::<u64>(),
        proptest::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(
            |(scope, priority, seq, first, msg_count, encoding, flushed_at_us, packet)| Batch {
                scope,
                priority,
                seq,
                first_msg_id: MsgId(first),
                msg_count,
                encoding,
                flushed_at_us,
                packet: Bytes::from(packet),
            },
        )
}

fn any_frame() -> impl Strategy<Value = LinkFrame> {
    prop_oneof![
        (
            ".{0,20}",
            ".{0,20}",
            any::<u16>(),
            any::<u16>(),
            any_priority(),
            any::<u32>()
        )
            .prop_map(
                |(node_id, region, shards, link_shard, priority, capabilities)| {
                    LinkFrame::Hello(Hello {
                        node_id,
                        region,
                        shards,
                        link_shard,
                        priority,
                        capabilities,
                    })
                }
            ),
        (any_interest(), any::<u8>()).prop_map(|(interest, encodings)| LinkFrame::Sub {
            interest,
            encodings
        }),
        any_interest().prop_map(|interest| LinkFrame::Unsub { interest }),
        any_batch().prop_map(LinkFrame::Batch),
        (
            any::<u64>(),
            proptest::collection::vec(any_presence(), 0..8)
        )
            .prop_map(|(incarnation, events)| LinkFrame::Presence(PresenceBatch {
                incarnation,
                events
            })),
        proptest::collection::vec((any::<u64>().prop_map(RoomId), any::<u32>()), 0..16)
            .prop_map(LinkFrame::Counts),
        (any::<u64>(), any_device(), any::<u64>()).prop_map(|(uid, device, msg_id)| {
            LinkFrame::Ack {
                uid: UserId(uid),
                device,
                msg_id: MsgId(msg_id),
            }
        }),
        any::<u64>().prop_map(|nonce| LinkFrame::Ping { nonce }),
        any::<u64>().prop_map(|nonce| LinkFrame::Pong { nonce }),
        any::<u64>().prop_map(|through| LinkFrame::Confirm { through }),
        any::<[u8; 32]>().prop_map(|nonce| LinkFrame::Challenge { nonce }),
        any::<[u8; 32]>().prop_map(|mac| LinkFrame::Proof { mac }),
    ]
}

fn enc(frame: &LinkFrame) -> Vec<u8> {
    let mut out = Vec::new();
    encode(frame, &mut out);
    out
}

fn dec(bytes: &[u8]) -> Result<(LinkFrame, usize), LinkError> {
    decode(&Bytes::copy_from_slice(bytes), LINK_FRAME_BYTES_MAX)
}

fn sample_batch() -> Batch {
    Batch {
        scope: Scope::Room(RoomId(42)),
        priority: Priority::High,
        seq: 7,
        first_msg_id: MsgId(1000),
        msg_count: 3,
        encoding: Encoding::Brotli,
        flushed_at_us: 1_700_000_000_000_000,
        packet: Bytes::from_static(
            b"\x00\x00\x00\x14\x00\x10\x00\x03\x00\x00\x00\x05\x00\x00\x00\x00abcd",
        ),
    }
}

proptest! {
    #[test]
    fn link_roundtrip(frame in any_frame()) {
        let bytes = enc(&frame);
        let (back, used) = dec(&bytes).unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(back, frame);
    }

    #[test]
    fn link_roundtrip_with_trailing_next_frame(a in any_frame(), b in any_frame()) {
        let mut bytes = enc(&a);
        let first = bytes.len();
        encode(&b, &mut bytes);
        let buf = Bytes::from(bytes);
        let (x, used) = decode(&buf, LINK_FRAME_BYTES_MAX).unwrap();
        prop_assert_eq!(used, first);
        prop_assert_eq!(x, a);
        let (y, used2) = decode(&buf.slice(used..), LINK_FRAME_BYTES_MAX).unwrap();
        prop_assert_eq!(used2, buf.len() - first);
        prop_assert_eq!(y, b);
    }

    #[test]
    fn link_every_truncation_is_incomplete(frame in any_frame()) {
        let bytes = enc(&frame);
        for cut in 0..bytes.len() {
            prop_assert_eq!(dec(&bytes[..cut]).unwrap_err(), LinkError::Incomplete, "cut at {}", cut);
        }
    }

    #[test]
    fn link_batch_header_plus_packet_is_encode(batch in any_batch()) {
        let mut header = Vec::new();
        encode_batch_header(&batch, &mut header);
        header.extend_from_slice(&batch.packet);
        prop_assert_eq!(header, enc(&LinkFrame::Batch(batch)));
    }

    #[test]
    fn link_random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = dec(&bytes);
        let _ = frame_len(&bytes, 64);
    }

    #[test]
    fn link_random_payload_never_panics(k in 0u8..13, payload in proptest::collection::vec(any::<u8>(), 0..120)) {
        let mut bytes = ((payload.len() + 2) as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&[LINK_VERSION, k]);
        bytes.extend_from_slice(&payload);
        if let Ok((frame, used)) = dec(&bytes) {
            // Anything accepted re-encodes to the same bytes: the encoding is canonical.
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(enc(&frame), bytes);
        }
    }

    #[test]
    fn link_shards_in_range(x in any::<u64>(), a in any::<u32>(), n in any::<u16>()) {
        prop_assert!(shard_of_room(RoomId(x), n) < n.max(1));
        prop_assert!(shard_of_area(AreaId(a), n) < n.max(1));
    }
}

#[test]
fn link_batch_packet_is_zero_copy_slice() {
    let bytes = Bytes::from(enc(&LinkFrame::Batch(sample_batch())));
    let (frame, _) = decode(&bytes, LINK_FRAME_BYTES_MAX).unwrap();
    let LinkFrame::Batch(b) = frame else {
        panic!("not a batch")
    };
    let range = bytes.as_ptr_range();
    assert!(
        range.contains(&b.packet.as_ptr()),
        "packet must point into the input buffer"
    );
    assert_eq!(
        b.packet.as_ptr() as usize + b.packet.len(),
        range.end as usize
    );
}

#[test]
fn link_ping_exact_bytes() {
    let bytes = enc(&LinkFrame::Ping {
        nonce: 0x0102_0304_0506_0708,
    });
    assert_eq!(bytes, [0, 0, 0, 10, 1, kind::PING, 1, 2, 3, 4, 5, 6, 7, 8]);
}

#[test]
fn link_hello_exact_bytes() {
    let bytes = enc(&LinkFrame::Hello(Hello {
        node_id: "e1".into(),
        region: "sh".into(),
        shards: 4,
        link_shard: 1,
        priority: Priority::High,
        capabilities: caps::ZLIB | caps::HIGH_REACH,
    }));
    let expect: &[u8] = &[
        0,
        0,
        0,
        19,
        1,
        kind::HELLO,
        0,
        2,
        b'e',
        b'1',
        0,
        2,
        b's',
        b'h',
        0,
        4,
        0,
        1,
        1,
        0,
        0,
        0,
        5,
    ];
    assert_eq!(bytes, expect);
}

#[test]
fn link_frame_len_checks_limit_on_four_bytes() {
    assert_eq!(frame_len(&[], 100), Err(LinkError::Incomplete));
    assert_eq!(frame_len(&[0, 0, 0], 100), Err(LinkError::Incomplete));
    assert_eq!(frame_len(&[0, 0, 0, 101], 100), Err(LinkError::TooLong));
    assert_eq!(frame_len(&[0, 0, 0, 100], 100), Ok(104));
    assert_eq!(
        frame_len(&[0xff, 0xff, 0xff, 0xff], u32::MAX),
        Ok(4 + u32::MAX as usize)
    );
    // decode reports TooLong before the frame is in, so a reader never buffers it.
    assert_eq!(
        decode(&Bytes::from_static(&[0, 1, 0, 0]), 1024),
        Err(LinkError::TooLong)
    );
}

#[test]
fn link_frame_too_short_for_version_and_kind() {
    assert_eq!(dec(&[0, 0, 0, 0]), Err(LinkError::Malformed));
    assert_eq!(dec(&[0, 0, 0, 1, 1]), Err(LinkError::Malformed));
}

#[test]
fn link_bad_version() {
    let mut bytes = enc(&LinkFrame::Ping { nonce: 1 });
    bytes[4] = 2;
    assert_eq!(dec(&bytes), Err(LinkError::Version));
    bytes[4] = 0;
    assert_eq!(dec(&bytes), Err(LinkError::Version));
}

#[test]
fn link_unknown_kind() {
    for k in [0u8, 13, 200, 255] {
        let mut bytes = enc(&LinkFrame::Ping { nonce: 1 });
        bytes[5] = k;
        assert_eq!(dec(&bytes), Err(LinkError::Kind), "kind {k}");
    }
}

/// Grows the frame by one byte inside its length: a decoder must refuse what it did not read.
fn with_trailing_byte(mut bytes: Vec<u8>) -> Vec<u8> {
    let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) + 1;
    bytes[..4].copy_from_slice(&len.to_be_bytes());
    bytes.push(0);
    bytes
}

/// Shrinks the frame by one byte inside its length: a field runs past the end.
fn short_payload(mut bytes: Vec<u8>) -> Vec<u8> {
    let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) - 1;
    bytes[..4].copy_from_slice(&len.to_be_bytes());
    bytes.pop();
    bytes
}

#[test]
fn link_trailing_garbage_is_malformed() {
    for frame in [
        LinkFrame::Ping { nonce: 1 },
        LinkFrame::Pong { nonce: 1 },
        LinkFrame::Unsub {
            interest: Interest::Room(RoomId(1)),
        },
        LinkFrame::Counts(vec![(RoomId(1), 2)]),
        LinkFrame::Presence(PresenceBatch {
            incarnation: 1,
            events: vec![],
        }),
        LinkFrame::Ack {
            uid: UserId(1),
            device: DeviceId("d".into()),
            msg_id: MsgId(2),
        },
    ] {
        assert_eq!(
            dec(&with_trailing_byte(enc(&frame))),
            Err(LinkError::Malformed),
            "{frame:?}"
        );
    }
}

#[test]
fn link_batch_takes_trailing_bytes_as_packet() {
    // The packet runs to the end of the frame, so "trailing" bytes are packet bytes.
    let batch = sample_batch();
    let bytes = with_trailing_byte(enc(&LinkFrame::Batch(batch.clone())));
    let (LinkFrame::Batch(b), _) = dec(&bytes).unwrap() else {
        panic!("not a batch")
    };
    assert_eq!(b.packet.len(), batch.packet.len() + 1);
}

#[test]
fn link_short_payload_is_malformed() {
    for frame in [
        LinkFrame::Ping { nonce: 1 },
        LinkFrame::Sub {
            interest: Interest::Area(AreaId(3)),
            encodings: 4,
        },
        LinkFrame::Counts(vec![(RoomId(1), 2)]),
        LinkFrame::Hello(Hello {
            node_id: "n".into(),
            region: "".into(),
            shards: 1,
            link_shard: 0,
            priority: Priority::Low,
            capabilities: 0,
        }),
    ] {
        assert_eq!(
            dec(&short_payload(enc(&frame))),
            Err(LinkError::Malformed),
            "{frame:?}"
        );
    }
    // A batch cut inside its header (no packet bytes to absorb the cut).
    let mut b = sample_batch();
    b.packet = Bytes::new();
    assert_eq!(
        dec(&short_payload(enc(&LinkFrame::Batch(b)))),
        Err(LinkError::Malformed)
    );
}

#[test]
fn link_bad_enum_bytes_are_malformed() {
    // Hello priority byte (last byte before caps).
    let mut hello = enc(&LinkFrame::Hello(Hello {
        node_id: String::new(),
        region: String::new(),
        shards: 1,
        link_shard: 0,
        priority: Priority::Low,
        capabilities: 0,
    }));
    let p = hello.len() - 5;
    hello[p] = 2;
    assert_eq!(dec(&hello), Err(LinkError::Malformed));

    // Unsub with scopes that are well formed but not interests (global, user, device).
    assert_eq!(
        dec(&[0, 0, 0, 3, LINK_VERSION, kind::UNSUB, 2]),
        Err(LinkError::Malformed)
    );
    let user = [
        0,
        0,
        0,
        11,
        LINK_VERSION,
        kind::UNSUB,
        3,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        1,
    ];
    assert_eq!(dec(&user), Err(LinkError::Malformed));
    assert_eq!(
        dec(&[0, 0, 0, 5, LINK_VERSION, kind::UNSUB, 4, 0, 0]),
        Err(LinkError::Malformed)
    );
    // Sub with an unknown scope tag.
    let sub = [
        0,
        0,
        0,
        12,
        LINK_VERSION,
        kind::SUB,
        5,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        1,
        7,
    ];
    assert_eq!(dec(&sub), Err(LinkError::Malformed));

    // Batch: bad priority, bad encoding (1 is the heartbeat ver, not a batch encoding), bad scope tag.
    let good = enc(&LinkFrame::Batch(sample_batch()));
    // Layout: 6 header, scope 1+8, priority at 15, seq 16..24, first 24..32, count 32..36, enc 36.
    let mut bad = good.clone();
    bad[15] = 9;
    assert_eq!(dec(&bad), Err(LinkError::Malformed));
    let mut bad = good.clone();
    bad[36] = 1;
    assert_eq!(dec(&bad), Err(LinkError::Malformed));
    let mut bad = good;
    bad[6] = 5;
    assert_eq!(dec(&bad), Err(LinkError::Malformed));

    // Presence kind 2 (once "renew"; leases are renewed by the link heartbeat now), then a
    // transport 4.
    let good = enc(&LinkFrame::Presence(PresenceBatch {
        incarnation: 1,
        events: vec![PresenceEvent {
            kind: PresenceKind::Exit,
            conn: 3,
            uid: UserId(1),
            device: DeviceId(String::new()),
            room: RoomId(2),
            area: AreaId(4),
            transport: Transport::Udp,
        }],
    }));
    assert!(dec(&good).is_ok());
    let mut pres = good.clone();
    pres[18] = 2;
    assert_eq!(dec(&pres), Err(LinkError::Malformed));
    let mut pres = good.clone();
    let last = pres.len() - 1;
    pres[last] = 4;
    assert_eq!(dec(&pres), Err(LinkError::Malformed));
}

#[test]
fn link_invalid_utf8_is_malformed() {
    let mut bytes = enc(&LinkFrame::Ack {
        uid: UserId(1),
        device: DeviceId("ab".into()),
        msg_id: MsgId(2),
    });
    // device bytes start after header (6) + uid (8) + len (2).
    bytes[16] = 0xff;
    assert_eq!(dec(&bytes), Err(LinkError::Malformed));
}

#[test]
fn link_lying_list_count_is_malformed_without_allocating() {
    // Counts claiming u32::MAX items in a 4-byte payload.
    let bytes = [
        0,
        0,
        0,
        6,
        LINK_VERSION,
        kind::COUNTS,
        0xff,
        0xff,
        0xff,
        0xff,
    ];
    assert_eq!(dec(&bytes), Err(LinkError::Malformed));
    let bytes = [
        0,
        0,
        0,
        6,
        LINK_VERSION,
        kind::PRESENCE,
        0xff,
        0xff,
        0xff,
        0xff,
    ];
    assert_eq!(dec(&bytes), Err(LinkError::Malformed));
    // One count more than present.
    let mut bytes = enc(&LinkFrame::Counts(vec![(RoomId(1), 1), (RoomId(2), 2)]));
    bytes[9] = 3;
    assert_eq!(dec(&bytes), Err(LinkError::Malformed));
}

#[test]
fn link_shard_hash_is_stable() {
    // Pinned values: changing the hash is a wire-protocol change between broker and edge.
    // Computed independently: ((r * 0x9E3779B97F4A7C15 mod 2^64) >> 32) % n.
    let got: Vec<u16> = (0..8).map(|r| shard_of_room(RoomId(r), 4)).collect();
    assert_eq!(got, [0, 1, 2, 0, 1, 3, 0, 2]);
    assert_eq!(shard_of_room(RoomId(123_456), 7), 6);
    assert_eq!(shard_of_area(AreaId(9), 3), shard_of_room(RoomId(9), 3));
    assert_eq!(shard_of_room(RoomId(99), 0), 0);
    assert_eq!(shard_of_room(RoomId(99), 1), 0);
    assert_eq!(shard_of_area(AreaId(99), 0), 0);
}

#[test]
fn link_shard_hash_spreads_consecutive_rooms() {
    let shards = 8u16;
    let mut hist = vec![0u32; usize::from(shards)];
    for r in 1..=8000u64 {
        hist[usize::from(shard_of_room(RoomId(r), shards))] += 1;
    }
    for (s, n) in hist.iter().enumerate() {
        assert!((800..1200).contains(n), "shard {s} got {n} of 8000 rooms");
    }
}

#[test]
fn link_module_is_exported() {
    assert_eq!(link::LINK_VERSION, 1);
}
