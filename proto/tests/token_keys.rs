//! Tokens: sign/verify round trips, size, every refusal, key rotation and secret-free Debug.

use proptest::prelude::*;
use proto::id::{AreaId, DeviceId, RoomId, UserId};
use proto::limits::{DEVICE_BYTES_MAX, TOKEN_BYTES_MAX};
use proto::token::{Claims, KeySet, TokenError};

const NOW: u64 = 1_800_000_000;

fn claims(device: &str) -> Claims {
    Claims {
        uid: UserId(42),
        device: DeviceId(device.to_owned()),
        room: RoomId(7_734_200),
        area: AreaId(9),
        expires_at_s: NOW + 3600,
    }
}

fn keys() -> KeySet {
    KeySet::new(&[
        (1, b"old-secret-0123456789".to_vec()),
        (2, b"new-secret-0123456789".to_vec()),
    ])
}

#[test]
fn round_trip_signs_with_newest_key() {
    let ks = keys();
    let t = ks.sign(&claims("dev-1"));
    assert!(t.starts_with("2."));
    let v = ks.verify(&t, NOW).unwrap();
    assert_eq!(v.key_id, 2);
    assert_eq!(v.claims, claims("dev-1"));
}

#[test]
fn max_device_token_is_short_and_url_safe() {
    let device = "d".repeat(DEVICE_BYTES_MAX);
    let ks = KeySet::new(&[(u32::MAX, b"s".repeat(32))]);
    let mut c = claims(&device);
    c.uid = UserId(u64::MAX);
    c.expires_at_s = u64::MAX;
    let t = ks.sign(&c);
    assert!(t.len() < 200, "{} bytes", t.len());
    assert!(t.len() <= TOKEN_BYTES_MAX);
    assert!(t
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.'));
    assert_eq!(ks.verify(&t, NOW).unwrap().claims, c);
}

#[test]
fn device_too_long_is_refused_at_sign() {
    let c = claims(&"d".repeat(DEVICE_BYTES_MAX + 1));
    assert_eq!(keys().try_sign(&c), Err(TokenError::Malformed));
    assert_eq!(keys().sign(&c), "");
    assert_eq!(keys().verify("", NOW), Err(TokenError::Malformed));
    assert_eq!(
        KeySet::default().try_sign(&claims("d")),
        Err(TokenError::UnknownKey)
    );
}

#[test]
fn expired() {
    let ks = keys();
    let t = ks.sign(&claims("d"));
    assert!(
        ks.verify(&t, NOW + 3600).is_ok(),
        "valid through expires_at_s itself"
    );
    assert_eq!(ks.verify(&t, NOW + 3601), Err(TokenError::Expired));
}

#[test]
fn bad_mac() {
    let ks = keys();
    let t = ks.sign(&claims("d"));
    let (signed, _tag) = t.rsplit_once('.').unwrap();
    // A tag of the right size from another key.
    let other = KeySet::new(&[(2, b"attacker".to_vec())]).sign(&claims("d"));
    let forged = format!("{signed}.{}", other.rsplit_once('.').unwrap().1);
    assert_eq!(ks.verify(&forged, NOW), Err(TokenError::BadMac));
    // Claims changed under the original tag (uid 42 -> other bytes).
    let (id, rest) = t.split_once('.').unwrap();
    let mut claims_b64: Vec<u8> = rest.split_once('.').unwrap().0.bytes().collect();
    claims_b64[3] = if claims_b64[3] == b'A' { b'B' } else { b'A' };
    let tampered = format!(
        "{id}.{}.{}",
        String::from_utf8(claims_b64).unwrap(),
        t.rsplit_once('.').unwrap().1
    );
    assert_eq!(ks.verify(&tampered, NOW), Err(TokenError::BadMac));
    // Key id swapped to another key we hold.
    let swapped = format!("1.{}", t.split_once('.').unwrap().1);
    assert_eq!(ks.verify(&swapped, NOW), Err(TokenError::BadMac));
}

#[test]
fn unknown_key_and_rotation() {
    let old = KeySet::parse("1:old-secret-0123456789").unwrap();
    let t = old.sign(&claims("d"));
    // Rotated set with both keys verifies tokens from the old one, and signs with the new one.
    let both = keys();
    assert_eq!(both.verify(&t, NOW).unwrap().key_id, 1);
    assert_eq!(
        old.verify(&both.sign(&claims("d")), NOW),
        Err(TokenError::UnknownKey)
    );
    // After the old key is retired, its tokens are refused.
    let new_only = KeySet::parse("2:new-secret-0123456789").unwrap();
    assert_eq!(new_only.verify(&t, NOW), Err(TokenError::UnknownKey));
    assert_eq!(
        KeySet::default().verify(&t, NOW),
        Err(TokenError::UnknownKey)
    );
}

#[test]
fn malformed() {
    let ks = keys();
    let t = ks.sign(&claims("d"));
    let (id, rest) = t.split_once('.').unwrap();
    let (c, tag) = rest.split_once('.').unwrap();
    for bad in [
        String::new(),
        "garbage".into(),
        "2.abc".into(),
        format!("{t}.extra"),
        format!("+2.{rest}"),
        format!(" 2.{rest}"),
        format!("99999999999.{rest}"),
        format!("x.{rest}"),
        format!("{id}.{c}.{tag}="),
        format!("{id}.{c}.{}", &tag[..tag.len() - 2]),
        format!("{id}.{c}.{tag}AAAA"),
        format!(
            "{id}.{c}.{}",
            tag.replace(|ch: char| ch.is_ascii_alphanumeric(), "+")
        ),
        "a".repeat(TOKEN_BYTES_MAX + 1),
    ] {
        assert_eq!(ks.verify(&bad, NOW), Err(TokenError::Malformed), "{bad:?}");
    }
}

#[test]
fn malformed_claims_under_a_valid_mac() {
    // The key holder signed bytes that are not valid claims: the MAC passes, the parse fails.
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let secret = b"new-secret-0123456789";
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let ks = KeySet::new(&[(2, secret.to_vec())]);
    let mut good = vec![1u8];
    good.extend_from_slice(&[0; 28]);
    for body in [
        vec![],
        vec![2u8; 30],
        good.clone(),
        [good.clone(), vec![5, b'a']].concat(),
    ] {
        let signed = format!("2.{}", b64.encode(&body));
        let tag = ring::hmac::sign(&key, signed.as_bytes());
        let tok = format!("{signed}.{}", b64.encode(tag.as_ref()));
        assert_eq!(ks.verify(&tok, NOW), Err(TokenError::Malformed), "{body:?}");
    }
    // Non-UTF-8 device.
    let body = [good, vec![2, 0xff, 0xfe]].concat();
    let signed = format!("2.{}", b64.encode(&body));
    let tag = ring::hmac::sign(&key, signed.as_bytes());
    assert_eq!(
        ks.verify(&format!("{signed}.{}", b64.encode(tag.as_ref())), NOW),
        Err(TokenError::Malformed)
    );
}

#[test]
fn parse_specs() {
    let bare = KeySet::parse("just-one-secret").unwrap();
    assert_eq!(bare.ids(), vec![1]);
    let t = bare.sign(&claims("d"));
    assert_eq!(
        KeySet::parse("1:just-one-secret")
            .unwrap()
            .verify(&t, NOW)
            .unwrap()
            .key_id,
        1
    );
    assert_eq!(
        KeySet::parse(" 3:a , 10:b,2:c ").unwrap().ids(),
        vec![2, 3, 10]
    );
    assert!(KeySet::parse("3:a,10:b")
        .unwrap()
        .sign(&claims("d"))
        .starts_with("10."));
    assert!(!bare.is_empty());
    assert!(KeySet::default().is_empty());
    for bad in [
        "", "  ", "1:", "x:abc", "1:a,1:b", "1:a,,2:b", "a,b", "-1:a", "1:a,b",
    ] {
        assert_eq!(
            KeySet::parse(bad).unwrap_err(),
            TokenError::Malformed,
            "{bad:?}"
        );
    }
}

#[test]
fn debug_hides_secrets() {
    let ks = KeySet::parse("7:supersecretvalue,9:othersecretvalue").unwrap();
    let d = format!("{ks:?}");
    assert!(d.contains('7') && d.contains('9'), "{d}");
    assert!(
        !d.contains("supersecret") && !d.contains("othersecret"),
        "{d}"
    );
}

proptest! {
    #[test]
    fn sign_verify_round_trip(
        uid in any::<u64>(), room in any::<u64>(), area in any::<u32>(),
        exp in any::<u64>(), device in "\\PC{0,16}", id in any::<u32>(),
        secret in proptest::collection::vec(any::<u8>(), 1..64),
    ) {
        let mut device = device;
        while device.len() > DEVICE_BYTES_MAX { device.pop(); }
        let c = Claims { uid: UserId(uid), device: DeviceId(device), room: RoomId(room), area: AreaId(area), expires_at_s: exp };
        let ks = KeySet::new(&[(id, secret)]);
        let t = ks.sign(&c);
        prop_assert!(t.len() <= TOKEN_BYTES_MAX);
        let v = ks.verify(&t, exp).unwrap();
        prop_assert_eq!(v.claims, c);
        prop_assert_eq!(v.key_id, id);
        if exp < u64::MAX {
            prop_assert_eq!(ks.verify(&t, exp + 1), Err(TokenError::Expired));
        }
    }

    #[test]
    fn random_text_never_panics(s in "\\PC{0,250}", spec in "\\PC{0,40}") {
        let _ = keys().verify(&s, NOW);
        let _ = KeySet::parse(&spec);
    }

    #[test]
    fn random_bytes_claims_never_panic(b in proptest::collection::vec(any::<u8>(), 0..120)) {
        let _ = Claims::decode(&b);
    }
}

/// The worked example in docs/protocol-ws-token.md: the format is a wire contract, so a change
/// that alters these bytes must be deliberate (and bump the claims version).
#[test]
fn golden_token_from_the_docs() {
    let c = Claims {
        uid: UserId(42),
        device: DeviceId("web-7f3a".into()),
        room: RoomId(7_734_200),
        area: AreaId(9),
        expires_at_s: 1_800_003_600,
    };
    let ks = KeySet::parse("3:correct-horse-battery-staple").unwrap();
    let want = "3.AQAAAAAAAAAqAAAAAAB2A7gAAAAJAAAAAGtJ4BAId2ViLTdmM2E.\
                9tlLtGqOlgaDHMBGE9DfLAghCVrJ_MlSsP_H-AWETVU";
    assert_eq!(ks.sign(&c), want);
    assert_eq!(ks.verify(want, 1_800_003_600).unwrap().claims, c);
    let hex: String = c
        .encode()
        .unwrap()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        hex,
        "01 000000000000002a 00000000007603b8 00000009 000000006b49e010 08 7765622d37663361"
            .replace(' ', "")
    );
}
