//! Server-side FrameDecoder fed in chunks: never panics, and every message it returns, encoded
//! again as a masked client frame, decodes to the same message.
//!
//! Input: byte 0 = chunk size (1..=256), rest = the byte stream from the client.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::ws::{encode_client_close, encode_client_frame, FrameDecoder, Message, Opcode};

/// Small so TooBig is reachable.
const MESSAGE_BYTES_MAX: usize = 4096;
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

fn reencode(m: &Message) -> Vec<u8> {
    match m {
        Message::Binary(b) => encode_client_frame(Opcode::Binary, b, MASK),
        Message::Text(t) => encode_client_frame(Opcode::Text, t.as_bytes(), MASK),
        Message::Ping(p) => encode_client_frame(Opcode::Ping, p, MASK),
        Message::Pong(p) => encode_client_frame(Opcode::Pong, p, MASK),
        Message::Close(Some(code), reason) => encode_client_close(*code, reason, MASK),
        Message::Close(None, _) => encode_client_frame(Opcode::Close, &[], MASK),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk) + 1;
    let mut dec = FrameDecoder::new(MESSAGE_BYTES_MAX);
    let mut buf = Vec::new();
    let mut messages = Vec::new();
    'feed: for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            match dec.decode(&mut buf) {
                Ok(Some(m)) => {
                    assert!(buf.len() < before, "a message must consume bytes");
                    messages.push(m);
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = e.close_code();
                    break 'feed;
                }
            }
        }
    }
    for m in &messages {
        if let Message::Close(None, reason) = m {
            assert!(reason.is_empty(), "close without code carries no reason");
        }
        let mut bytes = reencode(m);
        let mut fresh = FrameDecoder::new(MESSAGE_BYTES_MAX);
        let back = fresh
            .decode(&mut bytes)
            .expect("re-encoded message is valid");
        assert_eq!(back.as_ref(), Some(m));
        assert!(bytes.is_empty());
    }
});
