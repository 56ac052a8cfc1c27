//! Delivery extensions of the client protocol (DESIGN §11): the room epoch, the `resume`
//! request, the op 5 `BARRAGE_SYNC` packet and the `msg_id` field of high-reach messages.
//!
//! ```text
//! auth body (op 7)   {"uid":..,"roomid":..,"ack":true,"resume":{"epoch":"<epoch>","seq":N}}
//! after op 8         [replayed batches] then op 5 ver 0 seq 0 {"cmd":"BARRAGE_SYNC",...}
//! high-reach body    {"msg_id":"<decimal u64>", <the pushed object's fields, verbatim>}
//! ACK (op 1000)      ver 1, body = the msg_id as a big-endian u64 (see `auth::ack_request`)
//! ```
//!
//! Invariants: an epoch is 1..=[`EPOCH_BYTES_MAX`] printable ASCII bytes other than `"` and `\`,
//! so it is written into JSON without escaping; a resume `seq` is a low-priority room seq, below
//! 2^31 (the outer header's high bit marks high priority). [`inject_msg_id`] never re-serializes
//! the pushed body: it splices one field in front of the body's first member.

use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::Deserializer as _;
use std::fmt;

use crate::id::MsgId;
use crate::packet::{self, op, ver};

/// Longest epoch string a client may send back (ours are 16 hex digits, a dash and a counter).
pub const EPOCH_BYTES_MAX: usize = 64;
/// Largest low-priority room seq: the outer header's high bit marks high priority.
pub const ROOM_SEQ_MAX: u32 = 0x7FFF_FFFF;

/// A room's history epoch: the seqs of two batches are comparable only within one epoch.
/// A new epoch starts whenever a room's history starts over (broker restart, seq wrap).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Epoch(String);

impl Epoch {
    /// Checks the length and alphabet (see the module invariants).
    pub fn new(s: impl Into<String>) -> Result<Epoch, ResumeError> {
        let s = s.into();
        if s.is_empty() || s.len() > EPOCH_BYTES_MAX {
            return Err(ResumeError::EpochLength);
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
        {
            return Err(ResumeError::EpochAlphabet);
        }
        Ok(Epoch(s))
    }

    /// The broker's form: `boot` as 16 hex digits, a dash, the room's generation in decimal
    /// (at most 37 bytes, all in the epoch alphabet).
    pub fn from_parts(boot: u64, generation: u64) -> Epoch {
        Epoch(format!("{boot:016x}-{generation}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What a client asks to resume: the last low-priority room seq it saw in `epoch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resume {
    pub epoch: Epoch,
    pub seq: u32,
}

/// Why a `resume` field was ignored. The auth itself stays valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResumeError {
    /// `resume` is not a JSON object.
    #[error("resume is not an object")]
    NotObject,
    /// `epoch` is missing or not a string.
    #[error("resume.epoch is missing or not a string")]
    EpochMissing,
    /// `epoch` is empty or longer than `EPOCH_BYTES_MAX`.
    #[error("resume.epoch is empty or longer than EPOCH_BYTES_MAX")]
    EpochLength,
    /// `epoch` holds a byte that is not printable ASCII, or a quote or backslash.
    #[error("resume.epoch holds a byte outside printable ASCII")]
    EpochAlphabet,
    /// `seq` is missing, not a whole number, or above `ROOM_SEQ_MAX`.
    #[error("resume.seq is missing, not a number, or above ROOM_SEQ_MAX")]
    Seq,
}

/// The `resume` field of an auth body as parsed.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum ResumeField {
    /// No `resume` field (or `null`).
    #[default]
    Absent,
    /// A well-formed request.
    Valid(Resume),
    /// Present but malformed: ignored, counted by the edge, answered with `recovered:false`.
    Malformed(ResumeError),
}

impl ResumeField {
    /// Interprets the raw JSON value of `resume`. Accepts `seq` as a number or a string holding
    /// one, like the other numeric fields of the auth body.
    pub fn from_json(v: Option<&serde_json::Value>) -> ResumeField {
        let Some(v) = v else {
            return ResumeField::Absent;
        };
        if v.is_null() {
            return ResumeField::Absent;
        }
        let Some(obj) = v.as_object() else {
            return ResumeField::Malformed(ResumeError::NotObject);
        };
        let Some(epoch) = obj.get("epoch").and_then(|e| e.as_str()) else {
            return ResumeField::Malformed(ResumeError::EpochMissing);
        };
        let epoch = match Epoch::new(epoch) {
            Ok(e) => e,
            Err(e) => return ResumeField::Malformed(e),
        };
        let seq = match obj.get("seq") {
            Some(serde_json::Value::Number(n)) => n.as_u64(),
            Some(serde_json::Value::String(s)) => s.trim().parse::<u64>().ok(),
            _ => None,
        };
        match seq {
            Some(seq) if seq <= u64::from(ROOM_SEQ_MAX) => ResumeField::Valid(Resume {
                epoch,
                seq: seq as u32,
            }),
            _ => ResumeField::Malformed(ResumeError::Seq),
        }
    }

    /// The request, if well formed.
    pub fn valid(&self) -> Option<&Resume> {
        match self {
            ResumeField::Valid(r) => Some(r),
            _ => None,
        }
    }
}

/// What `BARRAGE_SYNC` tells a client after op 8 and any replayed batches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sync {
    /// The room's current epoch.
    pub epoch: Epoch,
    /// The last low-priority room seq sent to this client (replayed or live); 0 before the
    /// room's first batch.
    pub seq: u32,
    /// True only if the client asked to resume and nothing it asked for was missed.
    pub recovered: bool,
    /// Batches after the client's seq that could not be replayed.
    pub missed: u64,
}

/// The `cmd` of the sync packet.
pub const SYNC_CMD: &str = "BARRAGE_SYNC";

/// The JSON body of the sync packet, fields in the documented order.
pub fn sync_body(s: &Sync) -> Vec<u8> {
    // The epoch's alphabet needs no JSON escaping (module invariants).
    format!(
        "{{\"cmd\":\"{SYNC_CMD}\",\"epoch\":\"{}\",\"seq\":{},\"recovered\":{},\"missed\":{}}}",
        s.epoch.as_str(),
        s.seq,
        s.recovered,
        s.missed
    )
    .into_bytes()
}

/// The complete sync packet: op 5, `ver 0`, header seq 0 (it is not a room batch).
pub fn sync_packet(s: &Sync) -> Vec<u8> {
    packet::encode_vec(ver::PLAIN, op::NOTIFICATION, 0, &sync_body(s))
}

/// Parses a `BARRAGE_SYNC` body (for clients: `barrage tail`, the loadtest, tests).
/// `None` if the body is not one, or a field is missing or out of range.
pub fn parse_sync(body: &[u8]) -> Option<Sync> {
    #[derive(serde::Deserialize)]
    struct Wire {
        cmd: String,
        epoch: String,
        seq: u32,
        recovered: bool,
        missed: u64,
    }
    let w: Wire = serde_json::from_slice(body).ok()?;
    if w.cmd != SYNC_CMD || w.seq > ROOM_SEQ_MAX {
        return None;
    }
    Some(Sync {
        epoch: Epoch::new(w.epoch).ok()?,
        seq: w.seq,
        recovered: w.recovered,
        missed: w.missed,
    })
}

/// Why [`inject_msg_id`] refused a body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    /// The body is not one JSON object (an array, a string, or not JSON at all).
    #[error("body is not a JSON object")]
    NotObject,
    /// The object already has a top-level `msg_id` member; a second one would be ambiguous.
    #[error("body already has a top-level msg_id")]
    HasMsgId,
}

/// The name of the injected field.
pub const MSG_ID_FIELD: &str = "msg_id";

/// Returns `body` with `"msg_id":"<decimal>"` as its first member; every other byte of the
/// body is kept verbatim (leading whitespace before `{` is dropped).
///
/// Refuses anything but one JSON object without a top-level `msg_id`.
pub fn inject_msg_id(body: &[u8], msg_id: MsgId) -> Result<Vec<u8>, InjectError> {
    check_object(body)?;
    let start = body
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .ok_or(InjectError::NotObject)?;
    // check_object proved body[start] == b'{'.
    let rest = &body[start + 1..];
    let empty = rest
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'}');
    let head = format!(
        "{{\"{MSG_ID_FIELD}\":\"{}\"{}",
        msg_id.0,
        if empty { "" } else { "," }
    );
    let mut out = Vec::with_capacity(head.len() + rest.len());
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(rest);
    Ok(out)
}

/// The top-level `msg_id` of a delivered body, for clients that drop duplicates.
pub fn msg_id_of(body: &[u8]) -> Option<MsgId> {
    #[derive(serde::Deserialize)]
    struct Wire {
        msg_id: String,
    }
    let w: Wire = serde_json::from_slice(body).ok()?;
    w.msg_id.parse().ok().map(MsgId)
}

/// Proves `body` is exactly one JSON object and that no top-level key is `msg_id`, in one
/// pass and without building the object.
fn check_object(body: &[u8]) -> Result<(), InjectError> {
    struct Top;
    impl<'de> Visitor<'de> for Top {
        type Value = bool;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
            let mut has = false;
            while let Some(k) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                has |= k == MSG_ID_FIELD;
                map.next_value::<IgnoredAny>()?;
            }
            Ok(has)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let has = de
        .deserialize_map(Top)
        .map_err(|_: serde_json::Error| InjectError::NotObject)?;
    de.end().map_err(|_| InjectError::NotObject)?;
    if has {
        return Err(InjectError::HasMsgId);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch(s: &str) -> Epoch {
        Epoch::new(s).unwrap()
    }

    #[test]
    fn broker_epochs_are_valid_epochs() {
        for (b, g) in [(0, 0), (0xab, 3), (u64::MAX, u64::MAX)] {
            let e = Epoch::from_parts(b, g);
            assert_eq!(Epoch::new(e.as_str()), Ok(e));
        }
        assert_eq!(Epoch::from_parts(0xab, 1).as_str(), "00000000000000ab-1");
    }

    #[test]
    fn sync_packet_golden_hex() {
        let p = sync_packet(&Sync {
            epoch: epoch("e1"),
            seq: 7,
            recovered: true,
            missed: 0,
        });
        let body = br#"{"cmd":"BARRAGE_SYNC","epoch":"e1","seq":7,"recovered":true,"missed":0}"#;
        assert_eq!(body.len(), 71);
        let mut want = vec![
            0x00, 0x00, 0x00, 0x57, // packet_len 87
            0x00, 0x10, // header_len 16
            0x00, 0x00, // ver 0
            0x00, 0x00, 0x00, 0x05, // op 5
            0x00, 0x00, 0x00, 0x00, // seq 0
        ];
        want.extend_from_slice(body);
        assert_eq!(p, want);
        assert_eq!(parse_sync(&p[16..]).unwrap().seq, 7);
    }

    #[test]
    fn parse_sync_refuses_other_cmds_and_ranges() {
        assert!(parse_sync(br#"{"cmd":"DANMU_MSG"}"#).is_none());
        assert!(parse_sync(
            br#"{"cmd":"BARRAGE_SYNC","epoch":"e","seq":2147483648,"recovered":true,"missed":0}"#
        )
        .is_none());
        assert!(parse_sync(
            br#"{"cmd":"BARRAGE_SYNC","epoch":"","seq":1,"recovered":true,"missed":0}"#
        )
        .is_none());
    }

    #[test]
    fn injects_in_front_and_keeps_the_rest_verbatim() {
        let got =
            inject_msg_id(br#"{"cmd":"SEND_GIFT", "data" : {"msg_id":1}}"#, MsgId(42)).unwrap();
        assert_eq!(
            got,
            br#"{"msg_id":"42","cmd":"SEND_GIFT", "data" : {"msg_id":1}}"#.to_vec()
        );
        assert_eq!(msg_id_of(&got), Some(MsgId(42)));
        assert_eq!(
            inject_msg_id(b" {  } ", MsgId(u64::MAX)).unwrap(),
            b"{\"msg_id\":\"18446744073709551615\"  } ".to_vec()
        );
        assert_eq!(
            inject_msg_id(b"\n{\"a\":[1,2]}\n", MsgId(0)).unwrap(),
            b"{\"msg_id\":\"0\",\"a\":[1,2]}\n".to_vec()
        );
    }

    #[test]
    fn inject_refuses_non_objects_trailing_bytes_and_a_second_msg_id() {
        for bad in [
            &b"[1,2]"[..],
            b"\"s\"",
            b"3",
            b"",
            b"   ",
            b"{",
            b"{\"a\":1",
            b"{\"a\":1}}",
            b"{\"a\":1} {}",
            b"{'a':1}",
            b"\xff",
        ] {
            assert_eq!(
                inject_msg_id(bad, MsgId(1)),
                Err(InjectError::NotObject),
                "{bad:?}"
            );
        }
        assert_eq!(
            inject_msg_id(br#"{"a":1,"msg_id":"9"}"#, MsgId(1)),
            Err(InjectError::HasMsgId)
        );
        // An escaped spelling of the same key is the same key.
        assert_eq!(
            inject_msg_id(br#"{"msg\u005fid":2}"#, MsgId(1)),
            Err(InjectError::HasMsgId)
        );
    }

    #[test]
    fn resume_field_cases() {
        use serde_json::json;
        let f = |v: serde_json::Value| ResumeField::from_json(Some(&v));
        assert_eq!(ResumeField::from_json(None), ResumeField::Absent);
        assert_eq!(f(json!(null)), ResumeField::Absent);
        assert_eq!(
            f(json!({"epoch":"ab-1","seq":5})),
            ResumeField::Valid(Resume {
                epoch: epoch("ab-1"),
                seq: 5
            })
        );
        assert_eq!(
            f(json!({"epoch":"ab-1","seq":"5","x":1}))
                .valid()
                .map(|r| r.seq),
            Some(5)
        );
        assert_eq!(f(json!(5)), ResumeField::Malformed(ResumeError::NotObject));
        assert_eq!(
            f(json!({"seq":5})),
            ResumeField::Malformed(ResumeError::EpochMissing)
        );
        assert_eq!(
            f(json!({"epoch":7,"seq":5})),
            ResumeField::Malformed(ResumeError::EpochMissing)
        );
        assert_eq!(
            f(json!({"epoch":"","seq":5})),
            ResumeField::Malformed(ResumeError::EpochLength)
        );
        assert_eq!(
            f(json!({"epoch":"x".repeat(65),"seq":5})),
            ResumeField::Malformed(ResumeError::EpochLength)
        );
        assert_eq!(
            f(json!({"epoch":"a b","seq":5})),
            ResumeField::Malformed(ResumeError::EpochAlphabet)
        );
        assert_eq!(
            f(json!({"epoch":"a\"","seq":5})),
            ResumeField::Malformed(ResumeError::EpochAlphabet)
        );
        assert_eq!(
            f(json!({"epoch":"é","seq":5})),
            ResumeField::Malformed(ResumeError::EpochAlphabet)
        );
        for seq in [
            json!(-1),
            json!(1.5),
            json!(2147483648u64),
            json!("x"),
            json!(null),
        ] {
            assert_eq!(
                f(json!({"epoch":"e","seq":seq})),
                ResumeField::Malformed(ResumeError::Seq)
            );
        }
        assert_eq!(
            f(json!({"epoch":"e"})),
            ResumeField::Malformed(ResumeError::Seq)
        );
        assert_eq!(
            f(json!({"epoch":"e","seq":2147483647u64}))
                .valid()
                .map(|r| r.seq),
            Some(ROOM_SEQ_MAX)
        );
    }
}
