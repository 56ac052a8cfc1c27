//! StreamDecoder fed in chunks: never panics, yields the same packets whatever the chunking,
//! and every packet re-encodes to bytes that decode to it again.
//!
//! Input: byte 0 = chunk size (1..=256), rest = the stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::packet::{self, OwnedPacket, StreamDecoder};

/// Small so the fuzzer reaches the TooLong path without huge inputs.
const FRAME_BYTES_MAX: u32 = 4096;

fn drain(dec: &mut StreamDecoder, out: &mut Vec<OwnedPacket>) -> bool {
    loop {
        match dec.next_packet() {
            Ok(Some(p)) => out.push(p),
            Ok(None) => return true,
            Err(_) => return false,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk) + 1;

    let mut chunked = StreamDecoder::new(FRAME_BYTES_MAX);
    let mut got = Vec::new();
    let mut ok = true;
    for piece in stream.chunks(chunk) {
        chunked.feed(piece);
        if !drain(&mut chunked, &mut got) {
            ok = false;
            break;
        }
    }

    let mut whole = StreamDecoder::new(FRAME_BYTES_MAX);
    whole.feed(stream);
    let mut want = Vec::new();
    let whole_ok = drain(&mut whole, &mut want);
    assert_eq!(ok, whole_ok, "chunking changed validity");
    assert_eq!(got, want, "chunking changed the packets");

    for p in &got {
        let bytes = packet::encode_vec(p.ver, p.op, p.seq, &p.body);
        let (back, used) =
            packet::decode(&bytes, FRAME_BYTES_MAX).expect("re-encoded packet decodes");
        assert_eq!(used, bytes.len());
        assert_eq!(
            (back.ver, back.op, back.seq, back.body),
            (p.ver, p.op, p.seq, &p.body[..])
        );
    }
});
