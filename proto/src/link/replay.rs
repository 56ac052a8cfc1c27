//! REPLAY and REPLAYED: how an edge gets a room's missed batches from the broker (resume after
//! reconnect, issue 9; a broker restart made visible, issue 17).
//!
//! ```text
//! REPLAY   (edge -> broker, on the Low link of the room's broker shard)
//!   u64 req | u64 room | u8 encoding | u8 mode (0 absent, 1 malformed, 2 valid)
//!   [mode 2: str epoch | u32 seq]
//! REPLAYED (broker -> edge, on the link the REPLAY came on)
//!   u64 req | u64 room | u8 encoding | str epoch | u32 seq | u8 recovered | u64 missed
//!   | u32 count | count x (u32 seq | u32 len | len bytes: one outer client packet)
//! ```
//!
//! `req` is the edge's: the broker copies it back. The broker answers a REPLAY in the same
//! shard turn as it would route the room's next batch, and on the same link as the live
//! batches of that room, so every BATCH of the room written before the REPLAYED has a seq
//! `<= seq` and every one written after it a seq `> seq`: the edge holds a resuming client's
//! live batches until the answer arrives, and replay plus live stream have no gap and no
//! duplicate.
//!
//! Invariants: a replayed packet is never empty; a count is checked against the bytes left
//! before anything is allocated (the frame limit bounds it).

use super::wire;
use crate::id::{Encoding, RoomId};
use crate::sync::{Epoch, Resume, ResumeError, ResumeField, Sync, ROOM_SEQ_MAX};
use bytes::Bytes;

/// Smallest encoded replayed batch: seq, len and one byte.
const REPLAYED_BATCH_BYTES_MIN: usize = 4 + 4 + 1;

/// An edge asks what `room` sent after a client's (or its own) last seq.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub req: u64,
    pub room: RoomId,
    /// The encoding the replayed packets must be in.
    pub encoding: Encoding,
    pub resume: ResumeField,
}

/// The broker's answer: the batches to write, oldest first, then the sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub req: u64,
    pub room: RoomId,
    pub encoding: Encoding,
    pub sync: Sync,
    /// (outer header seq, outer packet) in seq order.
    pub batches: Vec<(u32, Bytes)>,
}

pub(crate) fn encode_request(r: &Request, out: &mut Vec<u8>) {
    out.extend_from_slice(&r.req.to_be_bytes());
    out.extend_from_slice(&r.room.0.to_be_bytes());
    out.push(r.encoding as u8);
    match &r.resume {
        ResumeField::Absent => out.push(0),
        ResumeField::Malformed(_) => out.push(1),
        ResumeField::Valid(v) => {
            out.push(2);
            wire::put_str(out, v.epoch.as_str());
            out.extend_from_slice(&v.seq.to_be_bytes());
        }
    }
}

pub(crate) fn decode_request(r: &mut wire::Reader<'_>) -> Result<Request, wire::Malformed> {
    let req = r.u64()?;
    let room = RoomId(r.u64()?);
    let encoding = Encoding::from_u8(r.u8()?).ok_or(wire::Malformed)?;
    let resume = match r.u8()? {
        0 => ResumeField::Absent,
        // Why it was malformed is the edge's business (it counted it).
        1 => ResumeField::Malformed(ResumeError::NotObject),
        2 => {
            let epoch = Epoch::new(r.string()?).map_err(|_| wire::Malformed)?;
            let seq = r.u32()?;
            if seq > ROOM_SEQ_MAX {
                return Err(wire::Malformed);
            }
            ResumeField::Valid(Resume { epoch, seq })
        }
        _ => return Err(wire::Malformed),
    };
    Ok(Request {
        req,
        room,
        encoding,
        resume,
    })
}

pub(crate) fn encode_answer(a: &Answer, out: &mut Vec<u8>) {
    out.extend_from_slice(&a.req.to_be_bytes());
    out.extend_from_slice(&a.room.0.to_be_bytes());
    out.push(a.encoding as u8);
    wire::put_str(out, a.sync.epoch.as_str());
    out.extend_from_slice(&a.sync.seq.to_be_bytes());
    out.push(u8::from(a.sync.recovered));
    out.extend_from_slice(&a.sync.missed.to_be_bytes());
    let n = wire::put_count(out, a.batches.len());
    for (seq, packet) in a.batches.iter().take(n) {
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&(packet.len() as u32).to_be_bytes());
        out.extend_from_slice(packet);
    }
}

pub(crate) fn decode_answer(r: &mut wire::Reader<'_>) -> Result<Answer, wire::Malformed> {
    let req = r.u64()?;
    let room = RoomId(r.u64()?);
    let encoding = Encoding::from_u8(r.u8()?).ok_or(wire::Malformed)?;
    let epoch = Epoch::new(r.string()?).map_err(|_| wire::Malformed)?;
    let seq = r.u32()?;
    let recovered = match r.u8()? {
        0 => false,
        1 => true,
        _ => return Err(wire::Malformed),
    };
    let missed = r.u64()?;
    let n = r.count(REPLAYED_BATCH_BYTES_MIN)?;
    let mut batches = Vec::with_capacity(n);
    for _ in 0..n {
        let seq = r.u32()?;
        let len = r.u32()? as usize;
        if len == 0 {
            return Err(wire::Malformed);
        }
        batches.push((seq, Bytes::copy_from_slice(r.bytes(len)?)));
    }
    Ok(Answer {
        req,
        room,
        encoding,
        sync: Sync {
            epoch,
            seq,
            recovered,
            missed,
        },
        batches,
    })
}

/// Encoded size of an answer's fixed part plus `epoch` (to fit batches under a frame limit).
pub fn answer_overhead_bytes(epoch: &Epoch) -> usize {
    super::FRAME_HEADER_LEN + 8 + 8 + 1 + 2 + epoch.as_str().len() + 4 + 1 + 8 + 4
}

/// Encoded size of one replayed batch.
pub fn answer_batch_bytes(packet: &Bytes) -> usize {
    4 + 4 + packet.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::{decode, encode, LinkError, LinkFrame};

    fn round_trip(f: LinkFrame) {
        let mut out = Vec::new();
        encode(&f, &mut out);
        let buf = Bytes::from(out);
        let (back, used) = decode(&buf, 1 << 20).expect("decodes");
        assert_eq!(used, buf.len());
        assert_eq!(back, f);
        // Every strict prefix is incomplete, never a wrong frame.
        for cut in 0..buf.len() {
            assert_eq!(
                decode(&buf.slice(..cut), 1 << 20).err(),
                Some(LinkError::Incomplete)
            );
        }
    }

    #[test]
    fn request_and_answer_round_trip() {
        for resume in [
            ResumeField::Absent,
            ResumeField::Malformed(ResumeError::NotObject),
            ResumeField::Valid(Resume {
                epoch: Epoch::from_parts(7, 1),
                seq: 42,
            }),
        ] {
            round_trip(LinkFrame::Replay(Request {
                req: 9,
                room: RoomId(1001),
                encoding: Encoding::Zlib,
                resume,
            }));
        }
        round_trip(LinkFrame::Replayed(Answer {
            req: u64::MAX,
            room: RoomId(5),
            encoding: Encoding::Brotli,
            sync: Sync {
                epoch: Epoch::from_parts(1, 0),
                seq: 12,
                recovered: false,
                missed: 3,
            },
            batches: vec![
                (10, Bytes::from_static(b"abc")),
                (11, Bytes::from_static(b"d")),
            ],
        }));
    }

    #[test]
    fn empty_packet_and_bad_seq_are_malformed() {
        let a = Answer {
            req: 1,
            room: RoomId(5),
            encoding: Encoding::Plain,
            sync: Sync {
                epoch: Epoch::from_parts(1, 0),
                seq: 1,
                recovered: true,
                missed: 0,
            },
            batches: vec![(1, Bytes::from_static(b"x"))],
        };
        let mut out = Vec::new();
        encode(&LinkFrame::Replayed(a), &mut out);
        // Zero the packet length (the 4 bytes before the last byte) and drop the packet byte.
        let n = out.len();
        out[n - 5..n - 1].copy_from_slice(&0u32.to_be_bytes());
        out.pop();
        let len = (out.len() - 4) as u32;
        out[..4].copy_from_slice(&len.to_be_bytes());
        assert_eq!(
            decode(&Bytes::from(out), 1 << 20).err(),
            Some(LinkError::Malformed)
        );
        let mut req = Vec::new();
        encode(
            &LinkFrame::Replay(Request {
                req: 1,
                room: RoomId(1),
                encoding: Encoding::Plain,
                resume: ResumeField::Valid(Resume {
                    epoch: Epoch::from_parts(1, 0),
                    seq: 1,
                }),
            }),
            &mut req,
        );
        let n = req.len();
        req[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            decode(&Bytes::from(req), 1 << 20).err(),
            Some(LinkError::Malformed)
        );
    }
}
