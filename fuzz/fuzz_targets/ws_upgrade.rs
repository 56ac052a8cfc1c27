//! parse_upgrade: never panics; an accepted head parses the same on its own, and the
//! response built from its key is well formed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::limits::WS_HANDSHAKE_BYTES_MAX;
use proto::ws::{accept_key, parse_upgrade, upgrade_response};

fuzz_target!(|data: &[u8]| {
    let Ok((up, used)) = parse_upgrade(data, WS_HANDSHAKE_BYTES_MAX) else {
        return;
    };
    assert!(used <= data.len() && used <= WS_HANDSHAKE_BYTES_MAX);
    let (again, used_again) =
        parse_upgrade(&data[..used], WS_HANDSHAKE_BYTES_MAX).expect("head alone parses");
    assert_eq!((again, used_again), (up.clone(), used));
    assert_eq!(accept_key(&up.key).len(), 28, "base64 of a SHA-1");
    let resp = upgrade_response(&up.key);
    assert!(resp.starts_with(b"HTTP/1.1 101") && resp.ends_with(b"\r\n\r\n"));
});
