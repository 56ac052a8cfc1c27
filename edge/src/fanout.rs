//! Fan-out: one batch to every viewer of its scope on this shard, with shared bytes.
//!
//! TCP viewers get `Batch.packet` as is (a refcount bump per viewer). WS viewers get one binary
//! frame built once per batch per shard (header + payload copied once here), then shared the
//! same way. Each viewer sits in the lane of the encoding it asked for (`protover`), and the
//! broker sends one batch per encoding the node subscribed with, so a batch only visits the
//! lanes of its own encoding.
//!
//! Invariant: no per-connection copy of batch bytes; at most one copy per shard (the WS frame).

use crate::index::{lanes_of, Lane, RoomIndex};
use crate::reach::ReachIndex;
use bytes::{Bytes, BytesMut};
use proto::id::{RoomId, Scope};
use proto::link::Batch;
use proto::ws::{self, Opcode};

/// The bytes each transport gets for one batch.
pub struct Frames {
    pub tcp: Bytes,
    ws: Option<Bytes>,
    /// UDP datagrams (`crate::udp::datagrams`), built on first use; `Some(None)`: the batch
    /// could not be cut (counted once per viewer by the caller).
    udp: Option<Option<Vec<Bytes>>>,
}

impl Frames {
    pub fn new(packet: &Bytes) -> Frames {
        Frames {
            tcp: packet.clone(),
            ws: None,
            udp: None,
        }
    }

    /// The batch as datagrams of at most `payload_max` bytes, built on first use (once per
    /// batch per shard, shared by every UDP viewer).
    pub fn udp(&mut self, encoding: proto::id::Encoding, payload_max: usize) -> Option<&[Bytes]> {
        let tcp = &self.tcp;
        self.udp
            .get_or_insert_with(|| crate::udp::datagrams(tcp, encoding, payload_max).ok())
            .as_deref()
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

/// One recipient of a batch on this shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A room member sitting in `lane` (its encoding is the batch's by construction).
    Lane(u32, Lane),
    /// A user or device member: its lane is the connection's, which the caller checks
    /// against the batch's encoding (the reach index does not know lanes).
    Reach(u32),
}

/// Every recipient of `batch` on this shard, appended to `out` (a pure function of the two
/// indexes: the core owns the queues and decides what each send costs).
///
/// Members come out lane by lane, so the caller can build each lane's bytes once.
pub fn targets(index: &RoomIndex, reach: &ReachIndex, batch: &Batch, out: &mut Vec<Target>) {
    let room = |r: RoomId, out: &mut Vec<Target>| {
        for lane in lanes_of(batch.encoding) {
            out.extend(index.lane(r, lane).iter().map(|k| Target::Lane(*k, lane)));
        }
    };
    match &batch.scope {
        Scope::Room(r) => room(*r, out),
        Scope::Area(a) => {
            for r in index.rooms_in_area(*a) {
                room(*r, out);
            }
        }
        Scope::Global => {
            for (r, _) in index.rooms() {
                room(r, out);
            }
        }
        Scope::User(u) => {
            let mut members = Vec::new();
            reach.user_members(u.0, &mut members);
            out.extend(members.into_iter().map(Target::Reach));
        }
        Scope::Device(d) => {
            let mut members = Vec::new();
            reach.device_members(&d.0, &mut members);
            out.extend(members.into_iter().map(Target::Reach));
        }
    }
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
