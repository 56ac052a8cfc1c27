//! Ingest frame codec: round trips for every frame type, truncation, limits and every error path.

use proptest::prelude::*;
use proto::id::{AreaId, DeviceId, MsgId, Priority, Reach, RoomId, Scope, UserId};
use proto::ingest::{
    code, decode, encode, frame_len, kind, IngestError, IngestFrame, Push, PushError,
    INGEST_VERSION,
};
use proto::limits::INGEST_FRAME_BYTES_MAX;

fn any_scope() -> impl Strategy<Value = Scope> {
    prop_oneof![
        any::<u64>().prop_map(|r| Scope::Room(RoomId(r))),
        any::<u32>().prop_map(|a| Scope::Area(AreaId(a))),
        Just(Scope::Global),
        any::<u64>().prop_map(|u| Scope::User(UserId(u))),
        ".{0,24}".prop_map(|d| Scope::Device(DeviceId(d))),
    ]
}

fn any_push_error() -> impl Strategy<Value = PushError> {
    prop_oneof![
        Just(PushError::Unauthorized),
        Just(PushError::ForbiddenScope),
        Just(PushError::TooLarge),
        any::<u32>().prop_map(|retry_after_ms| PushError::RateLimited { retry_after_ms }),
        ".{0,40}".prop_map(PushError::Invalid),
        Just(PushError::Overloaded),
    ]
}

fn any_frame() -> impl Strategy<Value = IngestFrame> {
    prop_oneof![
        (any::<u64>(), ".{0,40}")
            .prop_map(|(req_id, api_key)| IngestFrame::Auth { req_id, api_key }),
        (
            any::<u64>(),
            any_scope(),
            prop_oneof![Just(Priority::Low), Just(Priority::High)],
            prop_oneof![Just(Reach::BestEffort), Just(Reach::High)],
            any::<u32>(),
            proptest::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(|(req_id, scope, priority, reach, ttl_ms, body)| {
                IngestFrame::Push(Push {
                    req_id,
                    scope,
                    priority,
                    reach,
                    ttl_ms,
                    body,
                })
            }),
        (
            any::<u64>(),
            prop_oneof![
                any::<u64>().prop_map(|m| Ok(MsgId(m))),
                any_push_error().prop_map(Err)
            ]
        )
            .prop_map(|(req_id, result)| IngestFrame::Status { req_id, result }),
        (
            "[a-z0-9-]{1,64}",
            any::<u64>(),
            any_scope(),
            proptest::collection::vec(any::<u8>(), 0..100),
        )
            .prop_map(|(idempotency_key, req_id, scope, body)| {
                IngestFrame::KeyedPush {
                    idempotency_key,
                    push: Push {
                        req_id,
                        scope,
                        priority: Priority::Low,
                        reach: Reach::BestEffort,
                        ttl_ms: 0,
                        body,
                    },
                }
            }),
        (
            any::<u64>(),
            proptest::option::of(any::<u64>()),
            proptest::collection::vec(any::<u64>().prop_map(RoomId), 0..5),
            proptest::collection::vec(any::<u32>().prop_map(AreaId), 0..5),
        )
            .prop_map(|(req_id, after, rooms, areas)| IngestFrame::Subscribe {
                req_id,
                after,
                rooms,
                areas,
            }),
        proptest::collection::vec(any::<u8>(), 0..200)
            .prop_map(|json| IngestFrame::PresenceEvent { json }),
    ]
}

#[test]
fn subscribe_golden_and_lying_counts() {
    let bytes = enc(&IngestFrame::Subscribe {
        req_id: 9,
        after: Some(41),
        rooms: vec![RoomId(100)],
        areas: vec![AreaId(3)],
    });
    let mut want = vec![0, 0, 0, 39, INGEST_VERSION, kind::SUBSCRIBE];
    want.extend_from_slice(&9u64.to_be_bytes());
    want.push(1);
    want.extend_from_slice(&41u64.to_be_bytes());
    want.extend_from_slice(&1u32.to_be_bytes());
    want.extend_from_slice(&100u64.to_be_bytes());
    want.extend_from_slice(&1u32.to_be_bytes());
    want.extend_from_slice(&3u32.to_be_bytes());
    assert_eq!(bytes, want);
    // A room count larger than the frame holds is refused before anything is allocated.
    let mut lying = want.clone();
    lying[23..27].copy_from_slice(&u32::MAX.to_be_bytes());
    assert_eq!(
        decode(&lying, INGEST_FRAME_BYTES_MAX).map(|(f, _)| f),
        Err(IngestError::Malformed)
    );
    // "From the newest" must carry after = 0; any other `from` byte is malformed.
    let mut bad_from = want.clone();
    bad_from[14] = 2;
    assert_eq!(
        decode(&bad_from, INGEST_FRAME_BYTES_MAX).map(|(f, _)| f),
        Err(IngestError::Malformed)
    );
}

#[test]
fn keyed_push_key_length_is_checked() {
    for (key, ok) in [
        ("", false),
        ("k", true),
        (&"k".repeat(64)[..], true),
        (&"k".repeat(65)[..], false),
    ] {
        let bytes = enc(&IngestFrame::KeyedPush {
            idempotency_key: key.to_string(),
            push: Push {
                req_id: 1,
                scope: Scope::Global,
                priority: Priority::Low,
                reach: Reach::BestEffort,
                ttl_ms: 0,
                body: b"{}".to_vec(),
            },
        });
        assert_eq!(dec(&bytes).is_ok(), ok, "key of {} bytes", key.len());
        if !ok {
            assert_eq!(dec(&bytes), Err(IngestError::Malformed));
        }
    }
}

fn enc(frame: &IngestFrame) -> Vec<u8> {
    let mut out = Vec::new();
    encode(frame, &mut out);
    out
}

fn dec(bytes: &[u8]) -> Result<(IngestFrame, usize), IngestError> {
    decode(bytes, INGEST_FRAME_BYTES_MAX)
}

fn sample_push() -> IngestFrame {
    IngestFrame::Push(Push {
        req_id: 9,
        scope: Scope::Room(RoomId(42)),
        priority: Priority::Low,
        reach: Reach::High,
        ttl_ms: 30_000,
        body: br#"{"cmd":"DANMU_MSG"}"#.to_vec(),
    })
}

proptest! {
    #[test]
    fn ingest_roundtrip(frame in any_frame()) {
        let bytes = enc(&frame);
        let (back, used) = dec(&bytes).unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(back, frame);
    }

    #[test]
    fn ingest_pipelined_frames_decode_in_order(frames in proptest::collection::vec(any_frame(), 0..6)) {
        let mut bytes = Vec::new();
        for f in &frames {
            encode(f, &mut bytes);
        }
        let mut at = 0;
        let mut back = Vec::new();
        while at < bytes.len() {
            let (f, used) = dec(&bytes[at..]).unwrap();
            back.push(f);
            at += used;
        }
        prop_assert_eq!(back, frames);
    }

    #[test]
    fn ingest_every_truncation_is_incomplete(frame in any_frame()) {
        let bytes = enc(&frame);
        for cut in 0..bytes.len() {
            prop_assert_eq!(dec(&bytes[..cut]).unwrap_err(), IngestError::Incomplete, "cut at {}", cut);
        }
    }

    #[test]
    fn ingest_random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = dec(&bytes);
        let _ = frame_len(&bytes, 64);
    }

    #[test]
    fn ingest_random_payload_never_panics(k in 0u8..8, payload in proptest::collection::vec(any::<u8>(), 0..120)) {
        let mut bytes = ((payload.len() + 2) as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&[INGEST_VERSION, k]);
        bytes.extend_from_slice(&payload);
        if let Ok((frame, used)) = dec(&bytes) {
            // Anything accepted re-encodes to the same bytes: the encoding is canonical.
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(enc(&frame), bytes);
        }
    }
}

#[test]
fn ingest_auth_exact_bytes() {
    let bytes = enc(&IngestFrame::Auth {
        req_id: 1,
        api_key: "k1".into(),
    });
    assert_eq!(
        bytes,
        [
            0,
            0,
            0,
            14,
            1,
            kind::AUTH,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            1,
            0,
            2,
            b'k',
            b'1'
        ]
    );
}

#[test]
fn ingest_status_exact_bytes() {
    let ok = enc(&IngestFrame::Status {
        req_id: 2,
        result: Ok(MsgId(0x10)),
    });
    assert_eq!(
        ok,
        [
            0,
            0,
            0,
            19,
            1,
            kind::STATUS,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            2,
            code::OK,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0x10
        ]
    );
    let rl = enc(&IngestFrame::Status {
        req_id: 2,
        result: Err(PushError::RateLimited {
            retry_after_ms: 250,
        }),
    });
    assert_eq!(
        rl,
        [
            0,
            0,
            0,
            15,
            1,
            kind::STATUS,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            2,
            code::RATE_LIMITED,
            0,
            0,
            0,
            250
        ]
    );
}

#[test]
fn ingest_frame_len_checks_limit_on_four_bytes() {
    assert_eq!(frame_len(&[0, 0], 100), Err(IngestError::Incomplete));
    assert_eq!(frame_len(&[0, 0, 0, 101], 100), Err(IngestError::TooLong));
    assert_eq!(frame_len(&[0, 0, 0, 100], 100), Ok(104));
    assert_eq!(
        decode(&[0, 0x10, 0, 1], INGEST_FRAME_BYTES_MAX),
        Err(IngestError::TooLong)
    );
    // A real frame over a small limit.
    assert_eq!(decode(&enc(&sample_push()), 16), Err(IngestError::TooLong));
}

#[test]
fn ingest_frame_too_short_for_version_and_kind() {
    assert_eq!(dec(&[0, 0, 0, 0]), Err(IngestError::Malformed));
    assert_eq!(dec(&[0, 0, 0, 1, 1]), Err(IngestError::Malformed));
}

#[test]
fn ingest_bad_version() {
    let mut bytes = enc(&sample_push());
    bytes[4] = 0;
    assert_eq!(dec(&bytes), Err(IngestError::Version));
}

#[test]
fn ingest_unknown_kind() {
    for k in [0u8, 7, 255] {
        let mut bytes = enc(&sample_push());
        bytes[5] = k;
        assert_eq!(dec(&bytes), Err(IngestError::Kind), "kind {k}");
    }
}

fn with_trailing_byte(mut bytes: Vec<u8>) -> Vec<u8> {
    let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) + 1;
    bytes[..4].copy_from_slice(&len.to_be_bytes());
    bytes.push(0);
    bytes
}

fn short_payload(mut bytes: Vec<u8>) -> Vec<u8> {
    let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) - 1;
    bytes[..4].copy_from_slice(&len.to_be_bytes());
    bytes.pop();
    bytes
}

fn each_kind() -> Vec<IngestFrame> {
    vec![
        IngestFrame::Auth {
            req_id: 1,
            api_key: "key".into(),
        },
        sample_push(),
        IngestFrame::Status {
            req_id: 3,
            result: Ok(MsgId(4)),
        },
        IngestFrame::Status {
            req_id: 3,
            result: Err(PushError::Invalid("not an object".into())),
        },
        IngestFrame::Status {
            req_id: 3,
            result: Err(PushError::RateLimited { retry_after_ms: 5 }),
        },
    ]
}

#[test]
fn ingest_trailing_garbage_is_malformed() {
    for frame in each_kind() {
        assert_eq!(
            dec(&with_trailing_byte(enc(&frame))),
            Err(IngestError::Malformed),
            "{frame:?}"
        );
    }
    // Error codes without a value, too.
    let f = IngestFrame::Status {
        req_id: 3,
        result: Err(PushError::Overloaded),
    };
    assert_eq!(
        dec(&with_trailing_byte(enc(&f))),
        Err(IngestError::Malformed)
    );
}

#[test]
fn ingest_short_payload_is_malformed() {
    for frame in each_kind() {
        assert_eq!(
            dec(&short_payload(enc(&frame))),
            Err(IngestError::Malformed),
            "{frame:?}"
        );
    }
}

#[test]
fn ingest_bad_enum_bytes_are_malformed() {
    // Push layout: 6 header, req_id 8, scope tag at 14 (+8 room), priority 23, reach 24.
    let good = enc(&sample_push());
    for (at, v) in [(14usize, 5u8), (23, 2), (24, 2)] {
        let mut bad = good.clone();
        bad[at] = v;
        assert_eq!(dec(&bad), Err(IngestError::Malformed), "byte {at} = {v}");
    }
    // Status code 7.
    let mut st = enc(&IngestFrame::Status {
        req_id: 1,
        result: Err(PushError::TooLarge),
    });
    st[14] = 7;
    assert_eq!(dec(&st), Err(IngestError::Malformed));
}

#[test]
fn ingest_invalid_utf8_is_malformed() {
    let mut auth = enc(&IngestFrame::Auth {
        req_id: 1,
        api_key: "ab".into(),
    });
    auth[16] = 0xc3; // a lone UTF-8 lead byte followed by 'b'
    assert_eq!(dec(&auth), Err(IngestError::Malformed));
    let mut st = enc(&IngestFrame::Status {
        req_id: 1,
        result: Err(PushError::Invalid("x".into())),
    });
    let last = st.len() - 1;
    st[last] = 0x80;
    assert_eq!(dec(&st), Err(IngestError::Malformed));
}

#[test]
fn ingest_lying_body_length_is_malformed() {
    let mut bytes = enc(&sample_push());
    // Body length field sits just before the 19 body bytes.
    let at = bytes.len() - 19 - 4;
    bytes[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
    assert_eq!(dec(&bytes), Err(IngestError::Malformed));
}

#[test]
fn ingest_long_invalid_reason_is_cut_at_char_boundary() {
    // Longer than a u16 string can hold, made of 3-byte chars so the cut must avoid splitting one.
    let reason = "é€".repeat(20_000);
    let frame = IngestFrame::Status {
        req_id: 1,
        result: Err(PushError::Invalid(reason.clone())),
    };
    let (back, _) = dec(&enc(&frame)).unwrap();
    let IngestFrame::Status {
        result: Err(PushError::Invalid(got)),
        ..
    } = back
    else {
        panic!("{back:?}")
    };
    assert!(got.len() <= usize::from(u16::MAX));
    assert!(reason.starts_with(&got));
    assert!(got.len() > 65_000);
}
