//! Property tests for the delivery extensions (DESIGN §11): the auth `resume` field, the op 1000
//! ACK, the `BARRAGE_SYNC` packet and `msg_id` injection.

use proptest::prelude::*;
use proto::auth::{self, AuthBody};
use proto::id::MsgId;
use proto::packet::{self, op, ver};
use proto::sync::{self, Epoch, InjectError, Resume, ResumeField, Sync, ROOM_SEQ_MAX};

const FRAME_BYTES_MAX: u32 = 64 * 1024;

fn any_epoch() -> impl Strategy<Value = Epoch> {
    "[!#-\\[\\]-~]{1,64}".prop_map(|s| Epoch::new(s).unwrap())
}

/// JSON values of bounded depth, for object bodies.
fn any_json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        "[ -~é日\\\\\"]{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map("[a-z_]{0,8}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn ack_round_trips(id in any::<u64>()) {
        let p = auth::ack_request(id);
        let (pk, used) = packet::decode(&p, FRAME_BYTES_MAX).unwrap();
        prop_assert_eq!(used, 24);
        prop_assert_eq!((pk.ver, pk.op, pk.seq), (ver::HEARTBEAT, op::ACK, 1));
        prop_assert_eq!(auth::parse_ack(pk.body), Some(id));
    }

    #[test]
    fn sync_round_trips(epoch in any_epoch(), seq in 0..=ROOM_SEQ_MAX, recovered in any::<bool>(), missed in any::<u64>()) {
        let s = Sync { epoch, seq, recovered, missed };
        let p = sync::sync_packet(&s);
        let (pk, used) = packet::decode(&p, FRAME_BYTES_MAX).unwrap();
        prop_assert_eq!(used, p.len());
        prop_assert_eq!((pk.ver, pk.op, pk.seq), (ver::PLAIN, op::NOTIFICATION, 0));
        prop_assert_eq!(sync::parse_sync(pk.body), Some(s));
    }

    #[test]
    fn resume_round_trips_through_the_auth_body(
        uid in any::<u64>(), room in any::<u64>(), ack in any::<bool>(),
        epoch in any_epoch(), seq in 0..=ROOM_SEQ_MAX,
    ) {
        let body = AuthBody { uid, roomid: room, protover: 3, key: "t".into(), ack, ..Default::default() };
        let r = Resume { epoch, seq };
        let p = auth::auth_request_with_resume(&body, Some(&r));
        let (pk, _) = packet::decode(&p, FRAME_BYTES_MAX).unwrap();
        let got = auth::parse_auth_ext(pk.body, FRAME_BYTES_MAX).unwrap();
        prop_assert_eq!(&got.body, &body);
        prop_assert_eq!(got.resume, ResumeField::Valid(r));
        prop_assert_eq!(auth::parse_auth(pk.body, FRAME_BYTES_MAX).unwrap(), body);
    }

    /// Whatever `resume` holds, the auth parses exactly as it does without it.
    #[test]
    fn any_resume_value_leaves_the_auth_valid(v in any_json()) {
        let mut obj = serde_json::json!({"uid": 3, "roomid": 4, "key": "k"});
        let plain = auth::parse_auth_ext(obj.to_string().as_bytes(), FRAME_BYTES_MAX).unwrap();
        obj["resume"] = v;
        let got = auth::parse_auth_ext(obj.to_string().as_bytes(), FRAME_BYTES_MAX).unwrap();
        prop_assert_eq!(got.body, plain.body);
    }

    #[test]
    fn inject_adds_one_field_and_keeps_the_object(
        m in prop::collection::btree_map("[a-z]{1,6}", any_json(), 0..6),
        id in any::<u64>(),
        pad in "[ \t\n]{0,3}",
    ) {
        let obj = serde_json::Value::Object(m.clone().into_iter().collect());
        let body = format!("{pad}{obj}{pad}");
        let got = sync::inject_msg_id(body.as_bytes(), MsgId(id)).unwrap();
        let parsed: serde_json::Value = serde_json::from_slice(&got).unwrap();
        let mut want: serde_json::Map<_, _> = m.into_iter().collect();
        want.insert("msg_id".into(), serde_json::Value::from(id.to_string()));
        prop_assert_eq!(parsed, serde_json::Value::Object(want));
        // Spliced, not re-serialized: everything after the first `{` is verbatim.
        let tail = &body.trim_start().as_bytes()[1..];
        prop_assert!(got.ends_with(tail));
        prop_assert_eq!(sync::msg_id_of(&got), Some(MsgId(id)));
        // A second injection is refused: one top-level msg_id only.
        prop_assert_eq!(sync::inject_msg_id(&got, MsgId(id)), Err(InjectError::HasMsgId));
    }

    #[test]
    fn inject_refuses_every_non_object(v in any_json()) {
        prop_assume!(!v.is_object());
        prop_assert_eq!(sync::inject_msg_id(v.to_string().as_bytes(), MsgId(1)), Err(InjectError::NotObject));
    }

    #[test]
    fn inject_and_parse_auth_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = sync::inject_msg_id(&bytes, MsgId(1));
        let _ = auth::parse_auth_ext(&bytes, FRAME_BYTES_MAX);
        let _ = sync::parse_sync(&bytes);
    }
}

#[test]
fn ack_golden_hex() {
    // op 1000 = 0x3e8, ver 1, seq 1, body = msg_id 1000 big-endian.
    let want = [
        0x00, 0x00, 0x00, 0x18, 0x00, 0x10, 0x00, 0x01, 0x00, 0x00, 0x03, 0xe8, 0x00, 0x00, 0x00,
        0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 0xe8,
    ];
    assert_eq!(auth::ack_request(1000), want);
}

#[test]
fn auth_with_resume_golden_hex() {
    let body = AuthBody {
        uid: 1,
        roomid: 42,
        protover: 3,
        key: "t".into(),
        ack: true,
        ..Default::default()
    };
    let r = Resume {
        epoch: Epoch::new("0123456789abcdef-0").unwrap(),
        seq: 41,
    };
    let p = auth::auth_request_with_resume(&body, Some(&r));
    let json = br#"{"uid":1,"roomid":42,"protover":3,"key":"t","ack":true,"resume":{"epoch":"0123456789abcdef-0","seq":41}}"#;
    assert_eq!(json.len(), 104);
    let mut want = vec![
        0x00, 0x00, 0x00, 0x78, 0x00, 0x10, 0x00, 0x01, 0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00,
        0x01,
    ];
    want.extend_from_slice(json);
    assert_eq!(p, want);
}
