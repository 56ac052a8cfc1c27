//! Upgrade handshake: the RFC 6455 example, every refusal, and the size limit.

use proto::ws::{accept_key, http_error_response, parse_upgrade, upgrade_response, HandshakeError};

const HEAD_MAX: usize = proto::limits::WS_HANDSHAKE_BYTES_MAX;

fn req(extra: &str) -> String {
    format!(
        "GET /sub HTTP/1.1\r\nHost: example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

fn bad(head: &str) -> &'static str {
    match parse_upgrade(head.as_bytes(), HEAD_MAX) {
        Err(HandshakeError::Bad(why)) => why,
        other => panic!("expected Bad, got {other:?} for {head:?}"),
    }
}

#[test]
fn accept_key_rfc_example() {
    assert_eq!(
        accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
}

#[test]
fn upgrade_response_carries_accept() {
    let r = String::from_utf8(upgrade_response("dGhlIHNhbXBsZSBub25jZQ==")).unwrap();
    assert!(r.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
    assert!(r.contains("\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
    assert!(r.contains("\r\nUpgrade: websocket\r\n"));
    assert!(r.ends_with("\r\n\r\n"));
}

#[test]
fn valid_request_parses_with_extras_and_trailing_bytes() {
    let head = req("Sec-WebSocket-Protocol: chat, superchat\r\nX-Forwarded-For: 10.0.0.1\r\n");
    let mut buf = head.clone().into_bytes();
    buf.extend_from_slice(&[0x82, 0x80, 1, 2, 3, 4]); // a frame already pipelined after the head
    let (up, len) = parse_upgrade(&buf, HEAD_MAX).unwrap();
    assert_eq!(len, head.len());
    assert_eq!(up.path, "/sub");
    assert_eq!(up.key, "dGhlIHNhbXBsZSBub25jZQ==");
    assert_eq!(
        up.protocols,
        vec!["chat".to_owned(), "superchat".to_owned()]
    );
    assert_eq!(up.forwarded_for.as_deref(), Some("10.0.0.1"));
}

#[test]
fn header_tokens_are_case_insensitive_lists() {
    let head =
        "GET /sub?x=1 HTTP/1.1\r\nupgrade: foo, WebSocket\r\nCONNECTION: keep-alive, UPGRADE\r\n\
                sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version:  13 \r\n\r\n";
    let (up, _) = parse_upgrade(head.as_bytes(), HEAD_MAX).unwrap();
    assert_eq!(up.path, "/sub?x=1");
    assert!(up.protocols.is_empty());
    assert_eq!(up.forwarded_for, None);
}

#[test]
fn incomplete_head() {
    let head = req("");
    for cut in [0, 1, 10, head.len() - 1] {
        assert_eq!(
            parse_upgrade(&head.as_bytes()[..cut], HEAD_MAX),
            Err(HandshakeError::Incomplete)
        );
    }
}

#[test]
fn too_large_head_refused_before_it_ends() {
    let mut head = b"GET /sub HTTP/1.1\r\nX-Pad: ".to_vec();
    head.resize(HEAD_MAX, b'a');
    assert_eq!(
        parse_upgrade(&head, HEAD_MAX),
        Err(HandshakeError::TooLarge)
    );
    // A complete head that ends beyond the limit is refused too.
    let long = req(&format!("X-Pad: {}\r\n", "a".repeat(HEAD_MAX)));
    assert_eq!(
        parse_upgrade(long.as_bytes(), HEAD_MAX),
        Err(HandshakeError::TooLarge)
    );
    // Exactly at the limit is fine.
    let ok = req("");
    assert!(parse_upgrade(ok.as_bytes(), ok.len()).is_ok());
    assert_eq!(
        parse_upgrade(ok.as_bytes(), ok.len() - 1),
        Err(HandshakeError::TooLarge)
    );
}

#[test]
fn refusals() {
    let base = req("");
    bad(&base.replace("GET", "POST"));
    bad(&base.replace("HTTP/1.1", "HTTP/1.0"));
    bad(&base.replace("Upgrade: websocket\r\n", "Upgrade: h2c\r\n"));
    bad(&base.replace("Upgrade: websocket\r\n", ""));
    bad(&base.replace("Connection: Upgrade\r\n", "Connection: keep-alive\r\n"));
    bad(&base.replace("Connection: Upgrade\r\n", ""));
    bad(&base.replace("Version: 13", "Version: 8"));
    bad(&base.replace("Sec-WebSocket-Version: 13\r\n", ""));
    bad(&base.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""));
    // base64 but not 16 bytes; not base64 at all.
    bad(&base.replace("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZQ=="));
    bad(&base.replace("dGhlIHNhbXBsZSBub25jZQ==", "!!!not-base64!!!"));
    bad(&req("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"));
    bad("NOT HTTP AT ALL\r\n\r\n");
    let many: String = (0..100).map(|i| format!("X-{i}: y\r\n")).collect();
    bad(&req(&many));
}

#[test]
fn error_response_is_well_formed_and_not_injectable() {
    let r = String::from_utf8(http_error_response(400, "Bad Request\r\nSet-Cookie: x")).unwrap();
    let (head, body) = r.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 400 Bad Request"));
    assert!(!head.contains("\r\nSet-Cookie"));
    assert!(head.contains("Connection: close"));
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(len, body.len());
}
