//! Throughput numbers for the WebSocket decoder and token verification. Ignored: run by name with
//! `cargo test --release -p proto --test ws_bench -- --ignored --nocapture`. They report, not assert.

use proto::id::{AreaId, DeviceId, RoomId, UserId};
use proto::token::{Claims, KeySet};
use proto::ws::{encode_client_frame, FrameDecoder, Opcode};
use std::time::Instant;

#[test]
#[ignore]
fn bench_decode_client_frames() {
    for size in [20usize, 1024, 64 * 1024] {
        let frame = encode_client_frame(Opcode::Binary, &vec![0x5a; size], [1, 2, 3, 4]);
        let per_read = (256 * 1024 / frame.len()).max(1);
        let read: Vec<u8> = frame
            .iter()
            .copied()
            .cycle()
            .take(frame.len() * per_read)
            .collect();
        let mut dec = FrameDecoder::new(proto::limits::WS_MESSAGE_BYTES_MAX);
        let rounds = 200;
        // `decode` drains per message (moves the rest of a 256 KiB read each time);
        // `decode_slice` walks the read and drains once.
        for slice in [false, true] {
            let start = Instant::now();
            let mut messages = 0usize;
            for _ in 0..rounds {
                let mut buf = read.clone();
                if slice {
                    let mut pos = 0;
                    while let (n, Ok(Some(_))) = dec.decode_slice(&buf[pos..]) {
                        pos += n;
                        messages += 1;
                    }
                    buf.drain(..pos);
                } else {
                    while let Ok(Some(_)) = dec.decode(&mut buf) {
                        messages += 1;
                    }
                }
                assert!(buf.is_empty());
            }
            let s = start.elapsed().as_secs_f64();
            assert_eq!(messages, rounds * per_read);
            let how = if slice { "decode_slice" } else { "decode" };
            println!(
                "{how:>12} {size:>6} B msgs, 256 KiB reads: {:>10.0} msg/s {:>8.0} MiB/s",
                messages as f64 / s,
                (messages * size) as f64 / s / (1024.0 * 1024.0)
            );
        }
    }
}

#[test]
#[ignore]
fn bench_token_verify() {
    let ks = KeySet::parse("1:old-secret-0123456789,2:new-secret-0123456789").unwrap();
    let c = Claims {
        uid: UserId(42),
        device: DeviceId("d".repeat(64)),
        room: RoomId(1),
        area: AreaId(1),
        expires_at_s: u64::MAX,
    };
    let t = ks.sign(&c);
    let n = 200_000;
    let start = Instant::now();
    for _ in 0..n {
        assert!(ks.verify(&t, 0).is_ok());
    }
    println!(
        "token verify: {:.0}/s ({} B token)",
        n as f64 / start.elapsed().as_secs_f64(),
        t.len()
    );
}
