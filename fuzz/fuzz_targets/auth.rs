//! auth::parse_auth / parse_auth_ext: never panic on any body; the two agree on the Bilibili
//! fields; an accepted body re-encodes (with its resume, if valid) into one that parses the same.
//!
//! Input: the op 7 body, as the edge hands it over (at most auth_bytes_max is read).
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::auth::{self, AuthError};
use proto::limits::AUTH_BYTES_MAX;
use proto::packet;
use proto::sync::ResumeField;

fuzz_target!(|data: &[u8]| {
    let ext = auth::parse_auth_ext(data, AUTH_BYTES_MAX);
    assert_eq!(
        auth::parse_auth(data, AUTH_BYTES_MAX),
        ext.clone().map(|a| a.body)
    );
    if data.len() > AUTH_BYTES_MAX as usize {
        assert_eq!(ext, Err(AuthError::TooLarge));
    }
    let Ok(a) = ext else {
        return;
    };
    let p = auth::auth_request_with_resume(&a.body, a.resume.valid());
    let (pk, _) = packet::decode(&p, u32::MAX).expect("our auth packet decodes");
    let again = auth::parse_auth_ext(pk.body, u32::MAX).expect("our auth body parses");
    assert_eq!(again.body, a.body);
    match a.resume {
        ResumeField::Valid(r) => assert_eq!(again.resume, ResumeField::Valid(r)),
        _ => assert_eq!(again.resume, ResumeField::Absent),
    }
});
