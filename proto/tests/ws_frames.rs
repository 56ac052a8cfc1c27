//! WebSocket frames: every refusal named in the contract, interleaving, limits, and property
//! round trips in both directions.

use proptest::prelude::*;
use proto::ws::{
    close, close_frame, encode_client_close, encode_client_fragment, encode_client_frame,
    server_frame, server_frame_header, FrameDecoder, FrameError, Message, Opcode,
};

const MAX: usize = 1024;
const M: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

fn decode_all(dec: &mut FrameDecoder, bytes: &[u8]) -> Result<Vec<Message>, FrameError> {
    let mut buf = bytes.to_vec();
    let mut out = Vec::new();
    while let Some(m) = dec.decode(&mut buf)? {
        out.push(m);
    }
    Ok(out)
}

fn server_decode(bytes: &[u8]) -> Result<Vec<Message>, FrameError> {
    decode_all(&mut FrameDecoder::new(MAX), bytes)
}

/// A masked client frame with raw first-byte bits (for RSV and opcode tests).
fn raw_client(b0: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = encode_client_frame(Opcode::Binary, payload, M);
    f[0] = b0;
    f
}

#[test]
fn rfc_examples_decode() {
    // RFC 6455 5.7: a single-frame masked text message "Hello".
    let masked = [
        0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
    ];
    assert_eq!(
        server_decode(&masked).unwrap(),
        vec![Message::Text("Hello".into())]
    );
    assert_eq!(encode_client_frame(Opcode::Text, b"Hello", M), masked);
    // Unmasked "Hello" from a server, and the fragmented one.
    let unmasked = [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
    assert_eq!(server_frame(Opcode::Text, b"Hello"), unmasked);
    let mut c = FrameDecoder::new_client_side(MAX);
    assert_eq!(
        decode_all(&mut c, &unmasked).unwrap(),
        vec![Message::Text("Hello".into())]
    );
    let frag = [0x01, 0x03, 0x48, 0x65, 0x6c, 0x80, 0x02, 0x6c, 0x6f];
    assert_eq!(
        decode_all(&mut c, &frag).unwrap(),
        vec![Message::Text("Hello".into())]
    );
}

#[test]
fn server_header_lengths() {
    assert_eq!(server_frame_header(Opcode::Binary, 0).1, 2);
    assert_eq!(server_frame_header(Opcode::Binary, 125).1, 2);
    let (h, n) = server_frame_header(Opcode::Binary, 126);
    assert_eq!((n, &h[..4]), (4, &[0x82, 126, 0, 126][..]));
    let (h, n) = server_frame_header(Opcode::Binary, 65535);
    assert_eq!((n, &h[..4]), (4, &[0x82, 126, 0xff, 0xff][..]));
    let (h, n) = server_frame_header(Opcode::Binary, 65536);
    assert_eq!((n, &h[..]), (10, &[0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0][..]));
}

#[test]
fn byte_at_a_time_and_pipelined() {
    let mut stream = encode_client_frame(Opcode::Binary, &[7u8; 300], M);
    stream.extend(encode_client_frame(Opcode::Ping, b"p", M));
    stream.extend(encode_client_frame(Opcode::Binary, b"", M));
    let mut dec = FrameDecoder::new(MAX);
    let mut buf = Vec::new();
    let mut got = Vec::new();
    for b in &stream {
        buf.push(*b);
        while let Some(m) = dec.decode(&mut buf).unwrap() {
            got.push(m);
        }
    }
    assert!(buf.is_empty());
    assert_eq!(
        got,
        vec![
            Message::Binary(vec![7; 300]),
            Message::Ping(b"p".to_vec()),
            Message::Binary(vec![])
        ]
    );
}

#[test]
fn control_frames_interleave_fragments() {
    let mut s = encode_client_fragment(Opcode::Binary, false, b"ab", M);
    s.extend(encode_client_frame(Opcode::Ping, b"1", M));
    s.extend(encode_client_fragment(
        Opcode::Continuation,
        false,
        b"cd",
        M,
    ));
    s.extend(encode_client_frame(Opcode::Pong, b"2", M));
    s.extend(encode_client_close(close::NORMAL, "bye", M));
    s.extend(encode_client_fragment(Opcode::Continuation, true, b"ef", M));
    assert_eq!(
        server_decode(&s).unwrap(),
        vec![
            Message::Ping(b"1".to_vec()),
            Message::Pong(b"2".to_vec()),
            Message::Close(Some(1000), "bye".into()),
            Message::Binary(b"abcdef".to_vec()),
        ]
    );
}

#[test]
fn unmasked_client_frame_is_protocol_error() {
    let e = server_decode(&server_frame(Opcode::Binary, b"x")).unwrap_err();
    assert!(matches!(e, FrameError::Protocol(_)));
    assert_eq!(e.close_code(), 1002);
}

#[test]
fn masked_server_frame_is_refused_client_side() {
    let mut c = FrameDecoder::new_client_side(MAX);
    let e = decode_all(&mut c, &encode_client_frame(Opcode::Binary, b"x", M)).unwrap_err();
    assert!(matches!(e, FrameError::Protocol(_)));
}

#[test]
fn reserved_bits_are_protocol_errors() {
    for rsv in [0x40, 0x20, 0x10] {
        assert!(matches!(
            server_decode(&raw_client(0x82 | rsv, b"x")),
            Err(FrameError::Protocol(_))
        ));
    }
}

#[test]
fn unknown_opcodes_are_protocol_errors() {
    for op in [3u8, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF] {
        assert!(matches!(
            server_decode(&raw_client(0x80 | op, b"")),
            Err(FrameError::Protocol(_))
        ));
    }
}

#[test]
fn long_control_frame_is_protocol_error() {
    let f = encode_client_frame(Opcode::Ping, &[0u8; 126], M);
    assert!(matches!(server_decode(&f), Err(FrameError::Protocol(_))));
    // 125 is the largest allowed.
    let f = encode_client_frame(Opcode::Ping, &[0u8; 125], M);
    assert_eq!(
        server_decode(&f).unwrap(),
        vec![Message::Ping(vec![0; 125])]
    );
}

#[test]
fn fragmented_control_frame_is_protocol_error() {
    for op in [Opcode::Ping, Opcode::Pong, Opcode::Close] {
        let f = encode_client_fragment(op, false, b"", M);
        assert!(matches!(server_decode(&f), Err(FrameError::Protocol(_))));
    }
}

#[test]
fn continuation_without_start_is_protocol_error() {
    let f = encode_client_fragment(Opcode::Continuation, true, b"x", M);
    assert!(matches!(server_decode(&f), Err(FrameError::Protocol(_))));
}

#[test]
fn new_data_frame_during_fragmented_message_is_protocol_error() {
    for op in [Opcode::Binary, Opcode::Text] {
        let mut s = encode_client_fragment(Opcode::Binary, false, b"a", M);
        s.extend(encode_client_frame(op, b"b", M));
        assert!(matches!(server_decode(&s), Err(FrameError::Protocol(_))));
    }
}

#[test]
fn close_payloads() {
    assert_eq!(
        server_decode(&encode_client_frame(Opcode::Close, b"", M)).unwrap(),
        vec![Message::Close(None, String::new())]
    );
    let one = encode_client_frame(Opcode::Close, &[3], M);
    assert!(matches!(server_decode(&one), Err(FrameError::Protocol(_))));
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 2999, 5000, 65535] {
        let f = encode_client_close(code, "", M);
        assert!(
            matches!(server_decode(&f), Err(FrameError::Protocol(_))),
            "code {code}"
        );
    }
    for code in [
        1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 4999,
    ] {
        let f = encode_client_close(code, "r", M);
        assert_eq!(
            server_decode(&f).unwrap(),
            vec![Message::Close(Some(code), "r".into())]
        );
    }
}

#[test]
fn close_reason_not_utf8_is_invalid_payload() {
    let f = encode_client_frame(Opcode::Close, &[0x03, 0xe8, 0xff, 0xfe], M);
    let e = server_decode(&f).unwrap_err();
    assert_eq!(e, FrameError::InvalidPayload);
    assert_eq!(e.close_code(), 1007);
}

#[test]
fn text_not_utf8_is_invalid_payload() {
    let f = encode_client_frame(Opcode::Text, &[b'a', 0xc3], M);
    assert_eq!(server_decode(&f), Err(FrameError::InvalidPayload));
    // A code point split across fragments is fine.
    let mut s = encode_client_fragment(Opcode::Text, false, &[b'a', 0xc3], M);
    s.extend(encode_client_fragment(
        Opcode::Continuation,
        true,
        &[0xa9],
        M,
    ));
    assert_eq!(server_decode(&s).unwrap(), vec![Message::Text("aé".into())]);
}

#[test]
fn too_big_is_refused_from_the_header_alone() {
    // Only the header of a MAX+1 frame: refused without the payload present.
    let f = encode_client_frame(Opcode::Binary, &vec![0u8; MAX + 1], M);
    let e = server_decode(&f[..8]).unwrap_err();
    assert_eq!(e, FrameError::TooBig);
    assert_eq!(e.close_code(), 1009);
    // Exactly MAX is fine.
    let f = encode_client_frame(Opcode::Binary, &vec![1u8; MAX], M);
    assert_eq!(
        server_decode(&f).unwrap(),
        vec![Message::Binary(vec![1; MAX])]
    );
    // A huge 64-bit length is refused from the 10 header bytes.
    let mut h = vec![0x82, 0xff];
    h.extend_from_slice(&(1u64 << 40).to_be_bytes());
    assert_eq!(server_decode(&h), Err(FrameError::TooBig));
}

#[test]
fn too_big_counts_the_reassembled_message() {
    let half = MAX / 2 + 1;
    let mut s = encode_client_fragment(Opcode::Binary, false, &vec![0u8; half], M);
    let second = encode_client_fragment(Opcode::Continuation, true, &vec![0u8; half], M);
    s.extend_from_slice(&second[..8]); // header of the second fragment only
    assert_eq!(server_decode(&s), Err(FrameError::TooBig));
}

#[test]
fn length_with_msb_set_is_protocol_error() {
    let mut h = vec![0x82, 0xff];
    h.extend_from_slice(&(1u64 << 63).to_be_bytes());
    h.extend_from_slice(&M);
    assert!(matches!(server_decode(&h), Err(FrameError::Protocol(_))));
}

#[test]
fn non_minimal_lengths_are_accepted() {
    // 5 bytes encoded with the 16-bit and the 64-bit forms.
    let payload = b"hello";
    let mut masked = payload.to_vec();
    for (i, b) in masked.iter_mut().enumerate() {
        *b ^= M[i % 4];
    }
    let mut f16 = vec![0x82, 0x80 | 126, 0, 5];
    f16.extend_from_slice(&M);
    f16.extend_from_slice(&masked);
    let mut f64 = vec![0x82, 0x80 | 127, 0, 0, 0, 0, 0, 0, 0, 5];
    f64.extend_from_slice(&M);
    f64.extend_from_slice(&masked);
    for f in [f16, f64] {
        assert_eq!(
            server_decode(&f).unwrap(),
            vec![Message::Binary(payload.to_vec())]
        );
    }
}

#[test]
fn close_frame_truncates_reason_on_char_boundary() {
    let reason = "é".repeat(100); // 200 bytes
    let f = close_frame(close::POLICY_VIOLATION, &reason);
    assert_eq!(f[1] as usize, f.len() - 2);
    assert!(f.len() - 2 <= 125);
    let mut c = FrameDecoder::new_client_side(MAX);
    match decode_all(&mut c, &f).unwrap().as_slice() {
        [Message::Close(Some(1008), r)] => assert_eq!(r.len(), 122),
        other => panic!("{other:?}"),
    }
}

proptest! {
    #[test]
    fn client_frames_round_trip_with_random_fragmentation(
        payload in proptest::collection::vec(any::<u8>(), 0..3000),
        cuts in proptest::collection::vec(0usize..3000, 0..6),
        mask in any::<[u8; 4]>(),
        chunk in 1usize..97,
    ) {
        let mut dec = FrameDecoder::new(4096);
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(payload.len())).collect();
        cuts.sort_unstable();
        let mut bounds = vec![0];
        bounds.extend(cuts);
        bounds.push(payload.len());
        let mut stream = Vec::new();
        let n = bounds.len() - 1;
        for i in 0..n {
            let op = if i == 0 { Opcode::Binary } else { Opcode::Continuation };
            stream.extend(encode_client_fragment(op, i + 1 == n, &payload[bounds[i]..bounds[i + 1]], mask));
            if i % 2 == 1 {
                stream.extend(encode_client_frame(Opcode::Ping, &payload[..payload.len().min(10)], mask));
            }
        }
        // Feed in random-sized TCP reads.
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for piece in stream.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let Some(m) = dec.decode(&mut buf).unwrap() {
                got.push(m);
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert!(!dec.in_message());
        let data: Vec<_> = got.iter().filter(|m| !matches!(m, Message::Ping(_))).cloned().collect();
        prop_assert_eq!(data, vec![Message::Binary(payload.clone())]);
        prop_assert_eq!(got.len(), 1 + (n / 2));
    }

    #[test]
    fn server_frames_round_trip_client_side(
        payload in proptest::collection::vec(any::<u8>(), 0..70_000),
        text in ".{0,40}",
    ) {
        let mut dec = FrameDecoder::new_client_side(1 << 20);
        let mut stream = server_frame(Opcode::Binary, &payload);
        stream.extend(server_frame(Opcode::Text, text.as_bytes()));
        stream.extend(close_frame(close::GOING_AWAY, &text));
        let got = decode_all(&mut dec, &stream).unwrap();
        let mut want_reason = text.clone();
        while want_reason.len() > 123 { want_reason.pop(); }
        prop_assert_eq!(got, vec![
            Message::Binary(payload),
            Message::Text(text),
            Message::Close(Some(1001), want_reason),
        ]);
    }

    #[test]
    fn random_bytes_never_panic_either_decoder(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
        client_side in any::<bool>(),
    ) {
        let mut dec = if client_side { FrameDecoder::new_client_side(256) } else { FrameDecoder::new(256) };
        let mut buf = bytes.clone();
        let before = buf.len();
        // Either an error, or progress, or a stop asking for more bytes: never a loop without progress.
        for _ in 0..=before {
            match dec.decode(&mut buf) {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
        prop_assert!(buf.len() <= before);
    }

    #[test]
    fn random_bytes_never_panic_handshake(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = proto::ws::parse_upgrade(&bytes, 512);
        let mut with_end = bytes;
        with_end.extend_from_slice(b"\r\n\r\n");
        let _ = proto::ws::parse_upgrade(&with_end, 4096);
    }
}

proptest! {
    #[test]
    fn decode_slice_agrees_with_decode(
        sizes in proptest::collection::vec(0usize..300, 1..20),
        frag_every in 1usize..5,
    ) {
        let mut stream = Vec::new();
        for (i, n) in sizes.iter().enumerate() {
            let payload = vec![i as u8; *n];
            if i % frag_every == 0 && *n > 1 {
                stream.extend(encode_client_fragment(Opcode::Binary, false, &payload[..1], M));
                stream.extend(encode_client_frame(Opcode::Pong, b"", M));
                stream.extend(encode_client_fragment(Opcode::Continuation, true, &payload[1..], M));
            } else {
                stream.extend(encode_client_frame(Opcode::Binary, &payload, M));
            }
        }
        let want = server_decode(&stream).unwrap();
        let mut dec = FrameDecoder::new(MAX);
        let mut pos = 0;
        let mut got = Vec::new();
        while let (n, Ok(Some(m))) = dec.decode_slice(&stream[pos..]) {
            pos += n;
            got.push(m);
        }
        prop_assert_eq!(pos, stream.len());
        prop_assert_eq!(got, want);
    }
}
