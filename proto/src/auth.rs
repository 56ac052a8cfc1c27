//! The op 7 auth body, the op 8 auth reply and the op 3 heartbeat reply.
//!
//! CONTRACT: used by edge and loadtest; keep the signatures.

use serde::{Deserialize, Deserializer, Serialize};

use crate::packet::{self, op, ver};
use crate::sync::{Resume, ResumeField};

/// The op 7 auth body as real clients send it:
/// `{"uid":N,"roomid":N,"protover":3,"platform":"web","type":2,"key":"<token>","buvid":"<device>"}`.
/// Unknown fields are ignored (clients add their own). Our extensions are optional fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct AuthBody {
    #[serde(default)]
    pub uid: u64,
    pub roomid: u64,
    #[serde(default)]
    pub protover: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<u32>,
    #[serde(default)]
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buvid: Option<String>,
    /// Extension: the client ACKs high-reach messages (`msg_id` in the op 5 body).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ack: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("auth body is not valid JSON of the expected shape")]
    Malformed,
    #[error("auth body larger than auth_bytes_max")]
    TooLarge,
}

/// Auth reply codes.
pub const AUTH_OK: i32 = 0;
pub const AUTH_BAD_TOKEN: i32 = -101;

/// The body the web client sends with its op 2 heartbeat (what `String({})` gives in JS).
pub const HEARTBEAT_REQUEST_BODY: &[u8] = b"[object Object]";

/// The auth body as it may arrive: numbers may be strings, optional fields may be `null`.
/// Kept private so `AuthBody` serializes the canonical way (numbers as numbers).
#[derive(Deserialize)]
struct WireAuth {
    #[serde(default, deserialize_with = "lenient_u64")]
    uid: u64,
    #[serde(deserialize_with = "lenient_u64")]
    roomid: u64,
    #[serde(default, deserialize_with = "lenient_u32")]
    protover: u32,
    #[serde(default)]
    platform: Option<String>,
    #[serde(default, rename = "type", deserialize_with = "lenient_opt_u32")]
    kind: Option<u32>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    buvid: Option<String>,
    #[serde(default)]
    ack: Option<bool>,
    /// Interpreted apart ([`ResumeField::from_json`]) so a malformed value leaves the auth valid.
    #[serde(default)]
    resume: Option<serde_json::Value>,
    /// Anything but `true` is "no".
    #[serde(default)]
    sync: Option<serde_json::Value>,
}

/// A JSON number or a string holding one.
#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrStr {
    Num(u64),
    Str(String),
}

impl NumOrStr {
    fn get<E: serde::de::Error>(self) -> Result<u64, E> {
        match self {
            NumOrStr::Num(n) => Ok(n),
            NumOrStr::Str(s) => s.trim().parse().map_err(|_| E::custom("not a number")),
        }
    }
}

fn lenient_u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match Option::<NumOrStr>::deserialize(d)? {
        Some(v) => v.get(),
        None => Ok(0),
    }
}

fn lenient_u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let v = lenient_u64(d)?;
    u32::try_from(v).map_err(|_| serde::de::Error::custom("number out of range"))
}

fn lenient_opt_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    match Option::<NumOrStr>::deserialize(d)? {
        Some(v) => {
            let n = v.get()?;
            u32::try_from(n)
                .map(Some)
                .map_err(|_| serde::de::Error::custom("number out of range"))
        }
        None => Ok(None),
    }
}

/// Parses an op 7 body (accepts numbers given as strings too, as some clients send `"roomid":"123"`).
///
/// The size is checked before any parsing, so an oversized body costs nothing. The `resume`
/// extension is parsed and dropped; [`parse_auth_ext`] keeps it.
pub fn parse_auth(body: &[u8], auth_bytes_max: u32) -> Result<AuthBody, AuthError> {
    parse_auth_ext(body, auth_bytes_max).map(|a| a.body)
}

/// An auth body with the extensions that do not fit [`AuthBody`] (whose shape other crates
/// build literally): today the `resume` request of DESIGN §11.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct AuthExt {
    pub body: AuthBody,
    /// `Malformed` when present but unusable: the auth stays valid, the edge counts it and
    /// answers `BARRAGE_SYNC` with `recovered:false`.
    pub resume: ResumeField,
    /// `"sync": true`: a `BARRAGE_SYNC` without high reach or a position yet (how a client
    /// that will resume later learns the epoch on its first connection).
    pub sync: bool,
}

impl AuthExt {
    /// True if the client gets a `BARRAGE_SYNC` after op 8: it sent `"ack":true`,
    /// `"sync":true` or any `resume`.
    pub fn wants_sync(&self) -> bool {
        self.body.ack || self.sync || !matches!(self.resume, ResumeField::Absent)
    }
}

/// [`parse_auth`] keeping the `resume` field. Same errors: only the Bilibili fields and `ack`
/// can make an auth body invalid.
pub fn parse_auth_ext(body: &[u8], auth_bytes_max: u32) -> Result<AuthExt, AuthError> {
    if body.len() > auth_bytes_max as usize {
        return Err(AuthError::TooLarge);
    }
    let w: WireAuth = serde_json::from_slice(body).map_err(|_| AuthError::Malformed)?;
    Ok(AuthExt {
        resume: ResumeField::from_json(w.resume.as_ref()),
        sync: w.sync == Some(serde_json::Value::Bool(true)),
        body: AuthBody {
            uid: w.uid,
            roomid: w.roomid,
            protover: w.protover,
            platform: w.platform,
            kind: w.kind,
            key: w.key.unwrap_or_default(),
            buvid: w.buvid,
            ack: w.ack.unwrap_or(false),
        },
    })
}

/// The complete op 8 packet: `ver 1`, seq 1, body `{"code":N}`.
pub fn auth_reply(code: i32) -> Vec<u8> {
    let body = format!("{{\"code\":{code}}}");
    packet::encode_vec(ver::HEARTBEAT, op::AUTH_REPLY, 1, body.as_bytes())
}

/// The complete op 3 heartbeat reply: exactly 20 bytes, `ver 1`, seq 1, body = big-endian online count.
pub fn heartbeat_reply(online: u32) -> [u8; 20] {
    let mut out = [0u8; 20];
    out[0..4].copy_from_slice(&20u32.to_be_bytes());
    out[4..6].copy_from_slice(&(packet::HEADER_LEN as u16).to_be_bytes());
    out[6..8].copy_from_slice(&ver::HEARTBEAT.to_be_bytes());
    out[8..12].copy_from_slice(&op::HEARTBEAT_REPLY.to_be_bytes());
    out[12..16].copy_from_slice(&1u32.to_be_bytes());
    out[16..20].copy_from_slice(&online.to_be_bytes());
    out
}

/// The complete op 2 heartbeat a client sends (`ver 1`, seq 1, body `[object Object]` as the web client does).
pub fn heartbeat_request() -> Vec<u8> {
    packet::encode_vec(ver::HEARTBEAT, op::HEARTBEAT, 1, HEARTBEAT_REQUEST_BODY)
}

/// The complete op 1000 ACK a client that opted in (`"ack":true`) sends for a high-reach
/// message: `ver 1`, seq 1, body = the big-endian u64 `msg_id` (our extension).
pub fn ack_request(msg_id: u64) -> Vec<u8> {
    packet::encode_vec(ver::HEARTBEAT, op::ACK, 1, &msg_id.to_be_bytes())
}

/// The `msg_id` of an op 1000 body; `None` unless the body is exactly 8 bytes.
pub fn parse_ack(body: &[u8]) -> Option<u64> {
    body.try_into().ok().map(u64::from_be_bytes)
}

/// The complete op 7 packet a client sends (`ver 1`, seq 1).
pub fn auth_request(body: &AuthBody) -> Vec<u8> {
    auth_request_with_resume(body, None)
}

/// The complete op 7 packet with a `resume` request appended to the body's fields.
pub fn auth_request_with_resume(body: &AuthBody, resume: Option<&Resume>) -> Vec<u8> {
    auth_request_ext(body, resume, false)
}

/// The complete op 7 packet with `"sync":true` (when `sync`) and a `resume` request (when
/// given) appended to the body's fields: what a resuming client (`barrage tail`) sends.
pub fn auth_request_ext(body: &AuthBody, resume: Option<&Resume>, sync: bool) -> Vec<u8> {
    // Serializing a struct of strings, numbers and bools into a Vec cannot fail.
    let mut json = serde_json::to_vec(body).unwrap_or_default();
    if sync && json.last() == Some(&b'}') {
        json.pop();
        json.extend_from_slice(b",\"sync\":true}");
    }
    if let (Some(r), Some(b'}')) = (resume, json.last()) {
        json.pop();
        // The epoch's alphabet needs no escaping (crate::sync invariants).
        let field = format!(
            ",\"resume\":{{\"epoch\":\"{}\",\"seq\":{}}}}}",
            r.epoch.as_str(),
            r.seq
        );
        json.extend_from_slice(field.as_bytes());
    }
    packet::encode_vec(ver::HEARTBEAT, op::AUTH, 1, &json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_web_client_body() {
        let b = br#"{"uid":0,"roomid":21514463,"protover":3,"platform":"web","type":2,"key":"tok","buvid":"dev"}"#;
        let a = parse_auth(b, 4096).unwrap();
        assert_eq!(a.roomid, 21514463);
        assert_eq!(a.protover, 3);
        assert_eq!(a.kind, Some(2));
        assert_eq!(a.key, "tok");
        assert_eq!(a.buvid.as_deref(), Some("dev"));
        assert!(!a.ack);
    }

    #[test]
    fn tolerates_strings_spaces_unknown_fields_and_nulls() {
        let b = br#"{ "uid": "42", "roomid" : "7", "protover": "2", "type": "2", "clientver": "1.14.3", "key": null, "ack": true }"#;
        let a = parse_auth(b, 4096).unwrap();
        assert_eq!((a.uid, a.roomid, a.protover, a.kind), (42, 7, 2, Some(2)));
        assert_eq!(a.key, "");
        assert!(a.ack);
    }

    #[test]
    fn rejects_missing_room_bad_numbers_and_oversize() {
        assert_eq!(parse_auth(br#"{"uid":1}"#, 4096), Err(AuthError::Malformed));
        assert_eq!(
            parse_auth(br#"{"roomid":"abc"}"#, 4096),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            parse_auth(br#"{"roomid":-1}"#, 4096),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            parse_auth(br#"{"roomid":1,"protover":4294967296}"#, 4096),
            Err(AuthError::Malformed)
        );
        assert_eq!(parse_auth(b"not json", 4096), Err(AuthError::Malformed));
        let big = format!(r#"{{"roomid":1,"key":"{}"}}"#, "k".repeat(100));
        assert_eq!(parse_auth(big.as_bytes(), 50), Err(AuthError::TooLarge));
        assert!(parse_auth(big.as_bytes(), big.len() as u32).is_ok());
    }

    #[test]
    fn ack_round_trips_and_rejects_other_lengths() {
        let p = ack_request(0x0102_0304_0506_0708);
        assert_eq!(
            p,
            [0, 0, 0, 24, 0, 16, 0, 1, 0, 0, 0x03, 0xe8, 0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert_eq!(parse_ack(&p[16..]), Some(0x0102_0304_0506_0708));
        assert_eq!(parse_ack(&p[16..23]), None);
        assert_eq!(parse_ack(&[0; 9]), None);
    }

    fn acking_body() -> AuthBody {
        AuthBody {
            uid: 5,
            roomid: 9,
            protover: 3,
            key: "k".into(),
            ack: true,
            ..Default::default()
        }
    }

    #[test]
    fn auth_request_round_trips_through_parse_auth() {
        let a = acking_body();
        let p = auth_request(&a);
        let (pk, _) = packet::decode(&p, 65536).unwrap();
        assert_eq!((pk.ver, pk.op, pk.seq), (1, 7, 1));
        assert_eq!(parse_auth(pk.body, 4096).unwrap(), a);
    }

    #[test]
    fn resume_round_trips_and_a_bad_one_keeps_the_auth() {
        use crate::sync::{Epoch, ResumeError};
        let a = acking_body();
        let r = Resume {
            epoch: Epoch::new("00ab-3").unwrap(),
            seq: 17,
        };
        let p = auth_request_with_resume(&a, Some(&r));
        let (pk, _) = packet::decode(&p, 65536).unwrap();
        assert_eq!(
            pk.body,
            br#"{"uid":5,"roomid":9,"protover":3,"key":"k","ack":true,"resume":{"epoch":"00ab-3","seq":17}}"#
        );
        let got = parse_auth_ext(pk.body, 4096).unwrap();
        assert_eq!(got.body, a);
        assert_eq!(got.resume, ResumeField::Valid(r.clone()));
        assert!(got.wants_sync());

        let bad = br#"{"roomid":9,"resume":{"epoch":"e","seq":-4}}"#;
        let got = parse_auth_ext(bad, 4096).unwrap();
        assert_eq!(got.body.roomid, 9);
        assert_eq!(got.resume, ResumeField::Malformed(ResumeError::Seq));
        assert!(got.wants_sync());
        assert_eq!(parse_auth(bad, 4096).unwrap().roomid, 9);

        let plain = parse_auth_ext(br#"{"roomid":9,"resume":null,"sync":1}"#, 4096).unwrap();
        assert_eq!(plain.resume, ResumeField::Absent);
        assert!(!plain.wants_sync());

        let b = AuthBody {
            roomid: 9,
            ..Default::default()
        };
        let p = auth_request_ext(&b, Some(&r), true);
        let (pk, _) = packet::decode(&p, 65536).unwrap();
        let got = parse_auth_ext(pk.body, 4096).unwrap();
        assert!(got.sync && got.wants_sync());
        assert_eq!(got.resume, ResumeField::Valid(r));
    }
}
