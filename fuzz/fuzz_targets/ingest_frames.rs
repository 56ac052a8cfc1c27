//! ingest::decode over a pipelined stream: never panics; every accepted frame re-encodes to
//! exactly the bytes it came from and decodes to itself again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::ingest;

/// Small so TooLong is reachable.
const FRAME_BYTES_MAX: u32 = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let mut at = 0;
    while at < data.len() {
        let rest = &data[at..];
        let Ok((frame, used)) = ingest::decode(rest, FRAME_BYTES_MAX) else {
            break;
        };
        assert_eq!(ingest::frame_len(rest, FRAME_BYTES_MAX), Ok(used));
        let mut out = Vec::new();
        ingest::encode(&frame, &mut out);
        assert_eq!(&out[..], &rest[..used], "non-canonical encoding accepted");
        let (back, _) = ingest::decode(&out, FRAME_BYTES_MAX).expect("re-decodes");
        assert_eq!(back, frame);
        at += used;
    }
});
