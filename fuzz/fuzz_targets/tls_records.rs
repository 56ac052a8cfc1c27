//! The compact TLS 1.3 record layer the edge runs past the handshake (net::record): any bytes
//! from a peer end in "more", a record, or an error naming an alert; never a panic; plaintext
//! only from records whose tag verified; sealed records open to exactly what was sealed, cut
//! into reads anywhere.
//!
//! Input: byte 0 = suite (mod 3) and how the wire is cut into reads (bits 2-7: read size
//! 1..64, 0 = all at once); byte 1 = which byte of the sealed wire to flip (0 = none); the rest
//! = plaintext, sealed as application data in records cut at 16 KiB, preceded by the raw rest
//! fed to a fresh opener as if a peer sent it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use net::record::{self, Content, Keys, Opener, RecordError, Sealer, Suite};

const SUITES: [Suite; 3] = [Suite::Aes128Gcm, Suite::Aes256Gcm, Suite::Chacha20Poly1305];

fn keys(suite: Suite) -> Keys {
    let len = if suite == Suite::Aes128Gcm { 16 } else { 32 };
    Keys::new(suite, &[7u8; 32][..len], &[9u8; 12]).expect("keys")
}

/// Feeds `wire` to `rx` in reads of `read` bytes as the edge does (a partial record waits);
/// returns the plaintext and how it ended (`Ok(n)`: `n` bytes of a partial record wait).
fn drive(rx: &mut Opener, wire: &[u8], read: usize) -> (Vec<u8>, Result<usize, RecordError>) {
    let mut held: Vec<u8> = Vec::new();
    let mut plain = Vec::new();
    for chunk in wire.chunks(read.max(1)) {
        held.extend_from_slice(chunk);
        let mut at = 0;
        loop {
            match record::parse_header(&held[at..]) {
                Ok(Some(h)) if h.record_len() <= held.len() - at => {
                    assert!(h.len <= record::RECORD_CIPHERTEXT_BYTES_MAX);
                    let mut rec = held[at..at + h.record_len()].to_vec();
                    at += h.record_len();
                    match rx.open(&mut rec) {
                        Ok(Content::Data { len }) => {
                            assert!(len <= record::RECORD_PLAINTEXT_BYTES_MAX);
                            plain.extend_from_slice(&rec[5..5 + len]);
                        }
                        Ok(Content::KeyUpdate { .. }) => {}
                        Err(e) => return (plain, Err(e)),
                    }
                }
                Ok(_) => break,
                Err(e) => return (plain, Err(e)),
            }
        }
        held.drain(..at);
        // Only one partial record is ever held.
        assert!(held.len() < record::RECORD_HEADER_BYTES + record::RECORD_CIPHERTEXT_BYTES_MAX);
    }
    (plain, Ok(held.len()))
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let suite = SUITES[usize::from(data[0] & 3) % 3];
    let read = match data[0] >> 2 {
        0 => usize::MAX,
        n => usize::from(n),
    };
    let flip = usize::from(data[1]);
    let rest = &data[2..];

    // A peer's raw bytes: nothing authenticates, so no plaintext comes out.
    let (plain, _) = drive(&mut Opener::new(keys(suite), 0), rest, read);
    assert!(plain.is_empty(), "plaintext from unauthenticated bytes");

    // Our own records, maybe with one byte flipped.
    let mut tx = Sealer::new(&keys(suite), 5).expect("sealer");
    let mut wire = Vec::new();
    tx.seal_all(&[rest], &mut wire).expect("seal");
    let flipped = flip != 0 && flip <= wire.len();
    if flipped {
        wire[flip - 1] ^= 0x5a;
    }
    let (plain, end) = drive(&mut Opener::new(keys(suite), 5), &wire, read);
    if flipped {
        // Refused, or still waiting for the rest of a record whose length grew; never every
        // record accepted.
        assert_ne!(end, Ok(0), "a flipped byte went unnoticed");
        assert!(rest.starts_with(&plain), "plaintext from a corrupted record");
    } else {
        assert_eq!(end, Ok(0));
        assert_eq!(plain, rest);
    }
});
