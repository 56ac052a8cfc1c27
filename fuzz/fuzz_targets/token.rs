//! KeySet::verify: never panics on any string; a token it accepts carries claims that
//! re-sign into a token it accepts again with the same claims.
//!
//! Input: bytes 0..8 = now_s (BE u64), rest = the token (lossy UTF-8). Seeds are signed with
//! the keys below (see fuzz/make_seeds.sh).
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::token::{Claims, KeySet};

/// The fuzz key set; fuzz/seedgen signs the seed tokens with it.
fn keys() -> KeySet {
    KeySet::new(&[
        (1, b"fuzz-secret-one-0123456789".to_vec()),
        (7, b"fuzz-secret-seven-0123456789".to_vec()),
    ])
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let now_s = u64::from_be_bytes([
        data[0], data[1], data[2], data[3], data[4], data[5], data[6], data[7],
    ]);
    let token = String::from_utf8_lossy(&data[8..]);
    let keys = keys();
    let Ok(v) = keys.verify(&token, now_s) else {
        return;
    };
    let encoded = v.claims.encode().expect("verified claims encode");
    assert_eq!(Claims::decode(&encoded).expect("claims decode"), v.claims);
    let again = keys.sign(&v.claims);
    let v2 = keys
        .verify(&again, now_s)
        .expect("re-signed token verifies");
    assert_eq!(v2.claims, v.claims);
});
