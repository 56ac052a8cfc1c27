//! container::unpack with a decompression cap: never panics, never returns more than the cap,
//! and a run of plain packets survives encode_outer -> unpack.
//!
//! Input: byte 0 = mode, bytes 1..3 = ver (BE u16), rest = body.
//! Mode bit 0 set: the body is first compressed with the codec of `ver` (2 zlib, 3 brotli) so
//! the fuzzer reaches the inner-packet parser without having to invent a valid stream.
//! Mode bit 1 picks the round trip's codec (0 zlib, 1 brotli): compressing twice per input
//! would halve the executions per second, and the brotli encoder is the slow part.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::container::{self, BrotliParams};
use proto::id::Encoding;
use proto::packet::{self, op, ver};

/// Small cap so bombs are caught fast and the TooLarge path is reachable.
const CAP_BYTES: usize = 256 * 1024;
/// Fast encoder settings: we fuzz the decoder, the encoder only has to produce valid streams.
const BROTLI: BrotliParams = BrotliParams {
    quality: 1,
    lgwin: 16,
};

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let mode = data[0];
    let v = u16::from_be_bytes([data[1], data[2]]);
    let raw = &data[3..];
    let body = match (mode & 1, v) {
        (1, ver::ZLIB) => container::zlib_compress(raw),
        (1, ver::BROTLI) => container::brotli_compress(raw, BROTLI),
        _ => raw.to_vec(),
    };
    let Ok(packets) = container::unpack(v, op::NOTIFICATION, 7, &body, CAP_BYTES) else {
        return;
    };
    let total: usize = packets.iter().map(|p| p.body.len()).sum();
    assert!(total <= CAP_BYTES + body.len(), "unpack exceeded its cap");

    // Round trip: plain (non-container) packets wrapped in zlib unpack to themselves.
    if packets
        .iter()
        .any(|p| p.ver == ver::ZLIB || p.ver == ver::BROTLI)
    {
        return;
    }
    let mut inner = Vec::new();
    for p in &packets {
        packet::encode(p.ver, p.op, p.seq, &p.body, &mut inner);
    }
    let enc = if mode & 2 == 0 {
        Encoding::Zlib
    } else {
        Encoding::Brotli
    };
    let outer = container::encode_outer(enc, &inner, 9, BROTLI);
    let (o, _) = packet::decode(&outer, u32::MAX).expect("encode_outer makes a packet");
    let again =
        container::unpack(o.ver, o.op, o.seq, o.body, usize::MAX).expect("own container unpacks");
    assert_eq!(again, packets);
});
