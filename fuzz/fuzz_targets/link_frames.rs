//! link::decode over a stream of frames: never panics; every accepted frame re-encodes to
//! exactly the bytes it came from (the encoding is canonical) and decodes to itself again.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use proto::link::{self, LinkError, LinkFrame};

/// Small so TooLong is reachable.
const FRAME_BYTES_MAX: u32 = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let buf = Bytes::copy_from_slice(data);
    let mut at = 0;
    while at < buf.len() {
        let rest = buf.slice(at..);
        match link::decode(&rest, FRAME_BYTES_MAX) {
            Ok((frame, used)) => {
                assert_eq!(link::frame_len(&rest, FRAME_BYTES_MAX), Ok(used));
                let mut out = Vec::new();
                link::encode(&frame, &mut out);
                assert_eq!(&out[..], &rest[..used], "non-canonical encoding accepted");
                if let LinkFrame::Batch(b) = &frame {
                    let mut header = Vec::new();
                    link::encode_batch_header(b, &mut header);
                    header.extend_from_slice(&b.packet);
                    assert_eq!(header, out);
                }
                let (back, _) =
                    link::decode(&Bytes::from(out), FRAME_BYTES_MAX).expect("re-decodes");
                assert_eq!(back, frame);
                at += used;
            }
            Err(LinkError::Incomplete) => {
                // Every strict prefix of a frame is incomplete, never an error.
                break;
            }
            Err(_) => break,
        }
    }
});
