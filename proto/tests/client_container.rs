//! Containers (`ver 0/2/3` aggregation): round trips, bombs, corrupt input, bad inner packets.

use std::time::Instant;

use proto::container::{self, BrotliParams, ContainerError};
use proto::id::Encoding;
use proto::limits::DECOMPRESSED_BYTES_MAX;
use proto::packet::{self, OwnedPacket};

fn run_of_packets(n: usize) -> (Vec<u8>, Vec<OwnedPacket>) {
    let mut inner = Vec::new();
    let mut want = Vec::new();
    for i in 0..n {
        let body =
            format!(r#"{{"cmd":"DANMU_MSG","info":[[0,1,25],"hello {i}",[{i},"user{i}"]]}}"#)
                .into_bytes();
        packet::encode(0, 5, 0, &body, &mut inner);
        want.push(OwnedPacket {
            ver: 0,
            op: 5,
            seq: 0,
            body,
        });
    }
    (inner, want)
}

#[test]
fn brotli_and_zlib_outer_packets_unpack_to_the_inner_run() {
    let (inner, want) = run_of_packets(50);
    for (enc, ver) in [(Encoding::Zlib, 2u16), (Encoding::Brotli, 3u16)] {
        let outer = container::encode_outer(enc, &inner, 0x8000_0007, BrotliParams::default());
        let (p, used) = packet::decode(&outer, u32::MAX).unwrap();
        assert_eq!(used, outer.len());
        assert_eq!((p.ver, p.op, p.seq), (ver, 5, 0x8000_0007));
        assert!(
            p.body.len() < inner.len() / 2,
            "{enc:?} did not compress: {} of {}",
            p.body.len(),
            inner.len()
        );
        assert_eq!(
            container::unpack(p.ver, p.op, p.seq, p.body, DECOMPRESSED_BYTES_MAX).unwrap(),
            want
        );
        assert_eq!(
            container::unpack_container(p.ver, p.body, DECOMPRESSED_BYTES_MAX).unwrap(),
            want
        );
    }
}

#[test]
fn plain_outer_is_the_run_with_each_seq_rewritten() {
    let (inner, want) = run_of_packets(3);
    let out = container::encode_outer(Encoding::Plain, &inner, 42, BrotliParams::default());
    assert_eq!(out.len(), inner.len());
    let mut rest = &out[..];
    let mut n = 0;
    while !rest.is_empty() {
        let (p, used) = packet::decode(rest, u32::MAX).unwrap();
        assert_eq!(p.seq, 42);
        assert_eq!(p.body, &want[n].body[..]);
        rest = &rest[used..];
        n += 1;
    }
    assert_eq!(n, 3);
}

#[test]
fn unpack_of_a_plain_packet_is_the_packet_itself() {
    let got = container::unpack(0, 5, 9, b"{}", 1024).unwrap();
    assert_eq!(
        got,
        vec![OwnedPacket {
            ver: 0,
            op: 5,
            seq: 9,
            body: b"{}".to_vec()
        }]
    );
    assert_eq!(
        container::unpack_container(1, b"", 1024),
        Err(ContainerError::NotContainer)
    );
}

#[test]
fn nested_containers_unpack_to_depth_two() {
    let (inner, want) = run_of_packets(4);
    let middle = container::encode_outer(Encoding::Zlib, &inner, 1, BrotliParams::default());
    let outer = container::brotli_compress(&middle, BrotliParams::default());
    assert_eq!(
        container::unpack(3, 5, 0, &outer, DECOMPRESSED_BYTES_MAX).unwrap(),
        want
    );
}

#[test]
fn lgwin_is_clamped_and_fitted() {
    assert_eq!(container::fit_lgwin(100, 16), 10);
    assert_eq!(container::fit_lgwin(1008, 22), 10);
    assert_eq!(container::fit_lgwin(1009, 22), 11);
    assert_eq!(container::fit_lgwin(1 << 20, 16), 16);
    assert_eq!(container::fit_lgwin(1 << 30, 99), 24);
    assert_eq!(container::fit_lgwin(1 << 30, 0), 10);
    let q = |quality, lgwin| BrotliParams { quality, lgwin };
    assert_eq!(container::effective_lgwin(3000, q(5, 16)), 17);
    assert_eq!(container::effective_lgwin(3000, q(9, 22)), 17);
    assert_eq!(container::effective_lgwin(3000, q(4, 22)), 12);
    assert_eq!(container::effective_lgwin(3000, q(11, 22)), 12);
    assert_eq!(container::effective_lgwin(1 << 20, q(5, 30)), 21);
    // Out-of-range parameters still produce valid brotli.
    let (inner, want) = run_of_packets(20);
    for params in [
        BrotliParams {
            quality: 99,
            lgwin: 0,
        },
        BrotliParams {
            quality: 0,
            lgwin: 99,
        },
    ] {
        let c = container::brotli_compress(&inner, params);
        assert_eq!(
            container::unpack(3, 5, 0, &c, DECOMPRESSED_BYTES_MAX).unwrap(),
            want
        );
    }
}

#[test]
fn brotli_bomb_fails_with_too_large_without_decoding_it_all() {
    // 100 MB of zeros compresses to a few KB.
    let zeros = vec![0u8; 100 * 1024 * 1024];
    let bomb = container::brotli_compress(
        &zeros,
        BrotliParams {
            quality: 5,
            lgwin: 24,
        },
    );
    drop(zeros);
    assert!(bomb.len() < 64 * 1024, "bomb is {} bytes", bomb.len());
    let t = Instant::now();
    assert_eq!(
        container::brotli_decompress(&bomb, DECOMPRESSED_BYTES_MAX),
        Err(ContainerError::TooLarge)
    );
    assert_eq!(
        container::unpack(3, 5, 0, &bomb, DECOMPRESSED_BYTES_MAX),
        Err(ContainerError::TooLarge)
    );
    eprintln!(
        "brotli bomb of {} bytes rejected in {:?}",
        bomb.len(),
        t.elapsed()
    );
}

#[test]
fn zlib_bomb_fails_with_too_large() {
    let zeros = vec![0u8; 32 * 1024 * 1024];
    let bomb = container::zlib_compress(&zeros);
    drop(zeros);
    assert!(bomb.len() < 64 * 1024, "bomb is {} bytes", bomb.len());
    assert_eq!(
        container::zlib_decompress(&bomb, DECOMPRESSED_BYTES_MAX),
        Err(ContainerError::TooLarge)
    );
    assert_eq!(
        container::unpack(2, 5, 0, &bomb, DECOMPRESSED_BYTES_MAX),
        Err(ContainerError::TooLarge)
    );
}

#[test]
fn the_cap_is_inclusive() {
    let data = vec![7u8; 10_000];
    let b = container::brotli_compress(&data, BrotliParams::default());
    let z = container::zlib_compress(&data);
    assert_eq!(container::brotli_decompress(&b, 10_000).unwrap(), data);
    assert_eq!(container::zlib_decompress(&z, 10_000).unwrap(), data);
    assert_eq!(
        container::brotli_decompress(&b, 9_999),
        Err(ContainerError::TooLarge)
    );
    assert_eq!(
        container::zlib_decompress(&z, 9_999),
        Err(ContainerError::TooLarge)
    );
}

#[test]
fn nested_bombs_share_one_budget() {
    // Two inner containers of 3 MB each: each fits the 4 MiB cap alone, together they do not.
    let chunk = container::encode_outer(
        Encoding::Brotli,
        &packet::encode_vec(0, 5, 0, &vec![b'a'; 3 * 1024 * 1024]),
        0,
        BrotliParams::default(),
    );
    let mut two = chunk.clone();
    two.extend_from_slice(&chunk);
    let outer = container::zlib_compress(&two);
    assert_eq!(
        container::unpack(2, 5, 0, &outer, DECOMPRESSED_BYTES_MAX),
        Err(ContainerError::TooLarge)
    );
    let one = container::zlib_compress(&chunk);
    assert_eq!(
        container::unpack(2, 5, 0, &one, DECOMPRESSED_BYTES_MAX)
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn truncated_and_corrupt_bodies_are_corrupt() {
    let (inner, _) = run_of_packets(10);
    let z = container::zlib_compress(&inner);
    for cut in 0..z.len() {
        assert_eq!(
            container::zlib_decompress(&z[..cut], DECOMPRESSED_BYTES_MAX),
            Err(ContainerError::Corrupt),
            "cut {cut}"
        );
    }
    let b = container::brotli_compress(&inner, BrotliParams::default());
    for cut in 0..b.len() {
        assert_eq!(
            container::brotli_decompress(&b[..cut], DECOMPRESSED_BYTES_MAX),
            Err(ContainerError::Corrupt),
            "cut {cut}"
        );
    }
    // Trailing bytes after the end of the stream.
    let mut zt = z.clone();
    zt.push(0);
    assert_eq!(
        container::zlib_decompress(&zt, DECOMPRESSED_BYTES_MAX),
        Err(ContainerError::Corrupt)
    );
    let mut bt = b.clone();
    bt.extend_from_slice(b"junk");
    assert_eq!(
        container::brotli_decompress(&bt, DECOMPRESSED_BYTES_MAX),
        Err(ContainerError::Corrupt)
    );
    // Not compressed at all.
    assert_eq!(
        container::zlib_decompress(b"hello world", DECOMPRESSED_BYTES_MAX),
        Err(ContainerError::Corrupt)
    );
    assert_eq!(
        container::unpack(2, 5, 0, &[0xff; 64], DECOMPRESSED_BYTES_MAX),
        Err(ContainerError::Corrupt)
    );
}

#[test]
fn garbage_inner_bytes_are_bad_inner() {
    for garbage in [
        &b"this is not a packet at all"[..],
        &[0u8; 15][..],
        &[0, 0, 0, 20, 0, 12, 0, 0][..],
    ] {
        let b = container::brotli_compress(garbage, BrotliParams::default());
        assert_eq!(
            container::unpack(3, 5, 0, &b, DECOMPRESSED_BYTES_MAX),
            Err(ContainerError::BadInner)
        );
        let z = container::zlib_compress(garbage);
        assert_eq!(
            container::unpack(2, 5, 0, &z, DECOMPRESSED_BYTES_MAX),
            Err(ContainerError::BadInner)
        );
    }
    // A complete packet followed by half of another.
    let mut run = packet::encode_vec(0, 5, 0, b"{}");
    run.extend_from_slice(&packet::encode_vec(0, 5, 0, b"{\"a\":1}")[..20]);
    let z = container::zlib_compress(&run);
    assert_eq!(
        container::unpack(2, 5, 0, &z, DECOMPRESSED_BYTES_MAX),
        Err(ContainerError::BadInner)
    );
    assert_eq!(
        container::unpack_container(0, &run, DECOMPRESSED_BYTES_MAX),
        Err(ContainerError::BadInner)
    );
}

/// Prints size and time of brotli per batch for a few settings (dependencies are built with
/// opt-level 2 even in the dev profile, so these numbers are brotli's own). Run by name:
/// `cargo test -p proto --test client_container -- --ignored --nocapture measure`.
#[test]
#[ignore]
fn measure_brotli_batch_settings() {
    let (inner, _) = run_of_packets(40);
    let rounds = 200u32;
    for quality in [1u32, 4, 5, 6, 9] {
        for lgwin in [16u32, 22] {
            let params = BrotliParams { quality, lgwin };
            let t = Instant::now();
            let mut size = 0;
            for _ in 0..rounds {
                size = container::brotli_compress(&inner, params).len();
            }
            let per = t.elapsed() / rounds;
            eprintln!(
                "input {} B quality {quality} lgwin {lgwin} (used {}): {size} B, {per:?} per batch",
                inner.len(),
                container::effective_lgwin(inner.len(), params)
            );
        }
    }
    let t = Instant::now();
    let mut size = 0;
    for _ in 0..rounds {
        size = container::zlib_compress(&inner).len();
    }
    eprintln!(
        "zlib default: {size} B, {:?} per batch",
        t.elapsed() / rounds
    );
}
