//! Fan-out: one batch to every viewer of its scope on this shard, with shared bytes.
//!
//! TCP viewers get `Batch.packet` as is (a refcount bump per viewer). WS viewers get one binary
//! frame built once per batch per shard (header + payload copied once here), then shared the
//! same way. Each viewer sits in the lane of the encoding it asked for (`protover`), and the
//! broker sends one batch per encoding the node subscribed with, so a batch only visits the
//! lanes of its own encoding.
//!
//! Invariant: no per-connection copy of batch bytes; at most one copy per shard (the WS frame).

use crate::index::lanes_of;
use crate::shard::Shard;
use bytes::{Bytes, BytesMut};
use proto::id::{RoomId, Scope};
use proto::link::Batch;
use proto::ws::{self, Opcode};
use std::time::Instant;

/// The bytes each transport gets for one batch.
pub struct Frames {
    pub tcp: Bytes,
    ws: Option<Bytes>,
}

impl Frames {
    pub fn new(packet: &Bytes) -> Frames {
        Frames {
            tcp: packet.clone(),
            ws: None,
        }
    }

    /// The WS frame, built on first use (a shard without WS viewers of the batch never builds it).
    pub fn ws(&mut self) -> Bytes {
        if let Some(b) = &self.ws {
            return b.clone();
        }
        let b = ws_frame(&self.tcp);
        self.ws = Some(b.clone());
        b
    }
}

/// One unmasked binary frame around `payload`: the header once, one copy of the payload.
pub fn ws_frame(payload: &[u8]) -> Bytes {
    let (hdr, n) = ws::server_frame_header(Opcode::Binary, payload.len());
    let mut b = BytesMut::with_capacity(n + payload.len());
    b.extend_from_slice(&hdr[..n]);
    b.extend_from_slice(payload);
    b.freeze()
}

/// Fans a batch out to this shard's viewers of its scope.
pub(crate) fn fan_out(shard: &Shard, batch: &Batch) {
    let m = shard.m();
    m.batches_in.inc();
    m.batch_bytes_in.add(batch.packet.len() as u64);
    let mut frames = Frames::new(&batch.packet);
    let now = Instant::now();
    let mut sends = 0u64;
    match &batch.scope {
        Scope::Room(r) => sends += room(shard, *r, batch, &mut frames, now),
        Scope::Area(a) => {
            let rooms: Vec<RoomId> = shard.index.borrow().rooms_in_area(*a).to_vec();
            for r in rooms {
                sends += room(shard, r, batch, &mut frames, now);
            }
        }
        Scope::Global => {
            let rooms: Vec<RoomId> = shard.index.borrow().rooms().map(|(r, _)| r).collect();
            for r in rooms {
                sends += room(shard, r, batch, &mut frames, now);
            }
        }
        Scope::User(u) => {
            let mut members = Vec::new();
            shard.reach.borrow().user_members(u.0, &mut members);
            sends += reach(shard, &members, batch, &mut frames, now);
        }
        Scope::Device(d) => {
            let mut members = Vec::new();
            shard.reach.borrow().device_members(&d.0, &mut members);
            sends += reach(shard, &members, batch, &mut frames, now);
        }
    }
    m.sends.add(sends);
}

/// Sends a user or device batch to the members whose encoding it carries (the broker sends
/// one batch per encoding the node's viewers use, so each member gets exactly one of them).
fn reach(shard: &Shard, members: &[u32], batch: &Batch, frames: &mut Frames, now: Instant) -> u64 {
    let mut sends = 0;
    for &k in members {
        let Some(lane) = shard.lane_of(k as usize) else {
            continue;
        };
        if lane.encoding() != batch.encoding {
            continue;
        }
        let bytes = if lane.is_ws() {
            frames.ws()
        } else {
            frames.tcp.clone()
        };
        if shard.enqueue(k as usize, bytes, batch.priority, true, now) {
            sends += 1;
        }
    }
    sends
}

fn room(shard: &Shard, r: RoomId, batch: &Batch, frames: &mut Frames, now: Instant) -> u64 {
    let mut sends = 0;
    for lane in lanes_of(batch.encoding) {
        // Copy the member keys out: enqueue may wake tasks but never touches the index,
        // yet holding the borrow while calling into the shard would be fragile.
        let members: Vec<u32> = shard.index.borrow().lane(r, lane).to_vec();
        if members.is_empty() {
            continue;
        }
        let bytes = if lane.is_ws() {
            frames.ws()
        } else {
            frames.tcp.clone()
        };
        for k in members {
            if shard.enqueue(k as usize, bytes.clone(), batch.priority, true, now) {
                sends += 1;
            }
        }
    }
    sends
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_frame_matches_proto() {
        for len in [0usize, 10, 125, 126, 65_535, 65_536, 100_000] {
            let p = vec![7u8; len];
            assert_eq!(
                &ws_frame(&p)[..],
                &ws::server_frame(Opcode::Binary, &p)[..],
                "len {len}"
            );
        }
    }

    #[test]
    fn frames_built_once() {
        let mut f = Frames::new(&Bytes::from_static(b"abc"));
        let a = f.ws();
        let b = f.ws();
        assert_eq!(a.as_ptr(), b.as_ptr(), "same allocation, no second copy");
        assert_eq!(f.tcp.as_ptr(), b"abc".as_ptr());
    }
}
