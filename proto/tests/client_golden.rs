//! Golden bytes of the public Bilibili live protocol: what real clients send and expect.
//! The expected bytes are written out by hand here, never produced by the code under test.

use proto::auth::{self, AuthBody};
use proto::container::{self, ContainerError};
use proto::limits::DECOMPRESSED_BYTES_MAX;
use proto::packet::{self, OwnedPacket};

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

const WEB_AUTH_BODY: &str =
    r#"{"uid":0,"roomid":21514463,"protover":3,"platform":"web","type":2,"key":""}"#;

#[test]
fn auth_request_matches_the_web_client_bytes() {
    // The body is 75 bytes, so packet_len = 16 + 75 = 91 = 0x5b.
    assert_eq!(WEB_AUTH_BODY.len(), 75);
    let expected_header = hex("0000005b 0010 0001 00000007 00000001");
    let body = AuthBody {
        uid: 0,
        roomid: 21514463,
        protover: 3,
        platform: Some("web".into()),
        kind: Some(2),
        key: String::new(),
        buvid: None,
        ack: false,
    };
    let got = auth::auth_request(&body);
    assert_eq!(&got[..16], &expected_header[..]);
    assert_eq!(&got[16..], WEB_AUTH_BODY.as_bytes());
    // And the server side parses what the web client sends.
    assert_eq!(
        auth::parse_auth(WEB_AUTH_BODY.as_bytes(), 4096).unwrap(),
        body
    );
}

#[test]
fn auth_reply_ok_is_exact() {
    let mut expected = hex("0000001a001000010000000800000001");
    expected.extend_from_slice(br#"{"code":0}"#);
    assert_eq!(auth::auth_reply(auth::AUTH_OK), expected);
}

#[test]
fn auth_reply_bad_token_is_exact() {
    // {"code":-101} is 13 bytes: packet_len 29 = 0x1d.
    let mut expected = hex("0000001d001000010000000800000001");
    expected.extend_from_slice(br#"{"code":-101}"#);
    assert_eq!(auth::auth_reply(auth::AUTH_BAD_TOKEN), expected);
}

#[test]
fn heartbeat_reply_is_exactly_20_bytes() {
    let expected = hex("00000014 0010 0001 00000003 00000001 000004d2");
    assert_eq!(auth::heartbeat_reply(1234).to_vec(), expected);
}

#[test]
fn heartbeat_request_is_the_web_client_one() {
    let got = auth::heartbeat_request();
    assert_eq!(got.len(), 31);
    let mut expected = hex("0000001f 0010 0001 00000002 00000001");
    expected.extend_from_slice(b"[object Object]");
    assert_eq!(got, expected);
    let (p, used) = packet::decode(&got, 65536).unwrap();
    assert_eq!((p.ver, p.op, p.seq, used), (1, 2, 1, 31));
}

/// An op 5 `ver 3` packet holding one WATCHED_CHANGE, produced once with the reference `brotli`
/// crate (quality 5, lgwin 16) and frozen here, so a decoder change cannot silently follow an
/// encoder change.
const WATCHED_CHANGE_BROTLI_HEX: &str = "0000007f001000030000000500000000a188030020069c6be9033e5eb545d1281ebf319313f409a24c121c721878601a5200da16d061636c3a96208d5311043124384c102c5fa1d969c145c5cb83340aab41ea6549041e8f17067785eea403575135dde0316ecfc7d5de810b4554dfe72d4c6668beafd7dfe9f87f6db1d900";
const WATCHED_CHANGE_JSON: &str = r#"{"cmd":"WATCHED_CHANGE","data":{"num":12345,"text_small":"1.2万","text_large":"1.2万人看过"}}"#;

#[test]
fn brotli_watched_change_unpacks_to_the_exact_json() {
    let bytes = hex(WATCHED_CHANGE_BROTLI_HEX);
    let (outer, used) = packet::decode(&bytes, 65536).unwrap();
    assert_eq!(used, bytes.len());
    assert_eq!((outer.ver, outer.op, outer.seq), (3, 5, 0));
    let inner = container::unpack(
        outer.ver,
        outer.op,
        outer.seq,
        outer.body,
        DECOMPRESSED_BYTES_MAX,
    )
    .unwrap();
    assert_eq!(
        inner,
        vec![OwnedPacket {
            ver: 0,
            op: 5,
            seq: 0,
            body: WATCHED_CHANGE_JSON.as_bytes().to_vec()
        }]
    );
    // The inner packet's header, by hand: the JSON is 98 bytes (the CJK characters are 3 bytes
    // each), so packet_len = 114 = 0x72.
    assert_eq!(WATCHED_CHANGE_JSON.len(), 98);
    let raw = container::brotli_decompress(outer.body, DECOMPRESSED_BYTES_MAX).unwrap();
    assert_eq!(&raw[..16], &hex("00000072 0010 0000 00000005 00000000")[..]);
}

#[test]
fn brotli_watched_change_truncated_is_corrupt() {
    let bytes = hex(WATCHED_CHANGE_BROTLI_HEX);
    let body = &bytes[16..];
    for cut in 0..body.len() {
        assert_eq!(
            container::brotli_decompress(&body[..cut], DECOMPRESSED_BYTES_MAX),
            Err(ContainerError::Corrupt),
            "cut at {cut}"
        );
    }
}
