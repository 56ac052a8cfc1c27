//! Property tests for the client codec: round trips, split-invariance of the stream decoder,
//! and no panic on arbitrary input.

use proptest::prelude::*;
use proto::auth;
use proto::container::{self, BrotliParams};
use proto::id::Encoding;
use proto::packet::{self, DecodeError, OwnedPacket, StreamDecoder};

const FRAME_BYTES_MAX: u32 = 64 * 1024;
const CAP_BYTES: usize = 1024 * 1024;

fn any_packet() -> impl Strategy<Value = OwnedPacket> {
    (
        any::<u16>(),
        any::<u32>(),
        any::<u32>(),
        prop::collection::vec(any::<u8>(), 0..600),
    )
        .prop_map(|(ver, op, seq, body)| OwnedPacket { ver, op, seq, body })
}

/// Inner packets as the broker makes them: plain op 5 JSON-ish bodies (compressible text).
fn inner_packet() -> impl Strategy<Value = OwnedPacket> {
    (any::<u32>(), "[a-z0-9 {}\":,]{0,300}").prop_map(|(seq, body)| OwnedPacket {
        ver: 0,
        op: 5,
        seq,
        body: body.into_bytes(),
    })
}

fn encode_all(ps: &[OwnedPacket]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in ps {
        packet::encode(p.ver, p.op, p.seq, &p.body, &mut out);
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn decode_inverts_encode(p in any_packet()) {
        let bytes = packet::encode_vec(p.ver, p.op, p.seq, &p.body);
        let (got, used) = packet::decode(&bytes, FRAME_BYTES_MAX).unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!((got.ver, got.op, got.seq, got.body), (p.ver, p.op, p.seq, &p.body[..]));
        // Any proper prefix is Incomplete, never an error.
        let cut = bytes.len() / 2;
        prop_assert_eq!(packet::decode(&bytes[..cut], FRAME_BYTES_MAX), Err(DecodeError::Incomplete));
    }

    #[test]
    fn stream_decoder_is_independent_of_split_points(
        ps in prop::collection::vec(any_packet(), 0..12),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
    ) {
        let bytes = encode_all(&ps);
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        points.push(0);
        points.push(bytes.len());
        points.sort_unstable();
        let mut d = StreamDecoder::new(FRAME_BYTES_MAX);
        let mut got = Vec::new();
        for w in points.windows(2) {
            d.feed(&bytes[w[0]..w[1]]);
            while let Some(p) = d.next_packet().unwrap() {
                got.push(p);
            }
        }
        prop_assert_eq!(got, ps);
        prop_assert_eq!(d.buffered_len(), 0);
        prop_assert!(d.capacity_bytes() <= packet::STREAM_IDLE_CAPACITY_BYTES_MAX);
    }

    #[test]
    fn containers_round_trip(
        ps in prop::collection::vec(inner_packet(), 0..30),
        seq in any::<u32>(),
        quality in 0u32..=11,
        lgwin in 0u32..=30,
    ) {
        let inner = encode_all(&ps);
        let params = BrotliParams { quality, lgwin };
        for enc in [Encoding::Plain, Encoding::Zlib, Encoding::Brotli] {
            let out = container::encode_outer(enc, &inner, seq, params);
            let got = match enc {
                Encoding::Plain => container::unpack_container(0, &out, CAP_BYTES).unwrap(),
                _ => {
                    let (p, used) = packet::decode(&out, u32::MAX).unwrap();
                    prop_assert_eq!(used, out.len());
                    prop_assert_eq!((p.ver, p.op, p.seq), (enc as u16, 5, seq));
                    container::unpack(p.ver, p.op, p.seq, p.body, CAP_BYTES).unwrap()
                }
            };
            let mut want = ps.clone();
            if enc == Encoding::Plain {
                // Plain packets carry the batch seq themselves.
                for p in &mut want {
                    p.seq = seq;
                }
            }
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048), ver in 0u16..5) {
        let _ = packet::decode(&bytes, FRAME_BYTES_MAX);
        let mut d = StreamDecoder::new(FRAME_BYTES_MAX);
        d.feed(&bytes);
        while let Ok(Some(_)) = d.next_packet() {}
        let _ = container::unpack(ver, 5, 0, &bytes, CAP_BYTES);
        let _ = container::unpack_container(ver, &bytes, CAP_BYTES);
        let _ = container::brotli_decompress(&bytes, CAP_BYTES);
        let _ = container::zlib_decompress(&bytes, CAP_BYTES);
        let _ = auth::parse_auth(&bytes, 4096);
    }

    #[test]
    fn corrupted_containers_never_panic(
        ps in prop::collection::vec(inner_packet(), 1..10),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        brotli in any::<bool>(),
    ) {
        let inner = encode_all(&ps);
        let mut c = if brotli {
            container::brotli_compress(&inner, BrotliParams::default())
        } else {
            container::zlib_compress(&inner)
        };
        for (i, x) in flips {
            let at = i.index(c.len());
            c[at] ^= x;
        }
        let ver = if brotli { 3 } else { 2 };
        // Small cap too, so the TooLarge path is exercised under corruption.
        let _ = container::unpack(ver, 5, 0, &c, CAP_BYTES);
        let _ = container::unpack(ver, 5, 0, &c, 64);
    }

    #[test]
    fn json_like_auth_bodies_never_panic(s in r#"\{("[a-z]{1,8}":("[0-9a-z]{0,6}"|-?[0-9]{1,25}|true|null|\[\]|\{\}),?){0,8}\}"#) {
        let _ = auth::parse_auth(s.as_bytes(), 4096);
    }
}
