//! High-reach ACKs on one edge shard (issue 9), sans-io: which connections opted in with
//! `"ack": true`, their op 1000 ACKs on the way to the brokers, and a bound on how fast one
//! connection may ACK.
//!
//! - An ACK from a connection that opted in, within its rate, is queued with the connection's
//!   uid and device (the broker checks the message is theirs) and leaves the shard in one
//!   message per turn ([`Acks::take`]); the link hub writes one `LinkFrame::Ack` per ACK to
//!   every broker's presence link (the owner of user and device scopes; a broker that does not
//!   track the message ignores it and counts it).
//! - An ACK from a connection that did not opt in, past [`ACKS_PER_WINDOW_MAX`] in a
//!   [`ACK_WINDOW_MS`] window, or past [`ACKS_PENDING_MAX`] waiting on the shard is dropped
//!   and counted; the connection stays (an ACK cannot harm anyone else).
//! - A high-reach resend (a user/device batch whose link `seq` is 2 or more, see
//!   broker::courier) goes only to connections that opted in: the others got the message once.
//!
//! Invariant: a connection is in `by_key` iff it is seated and opted in.

use proto::id::{DeviceId, MsgId, UserId};
use std::collections::HashMap;

/// ACKs one connection may send per window (a client ACKs each high-reach message once or a
/// few times; a burst of 64 per second is far above any honest client).
pub const ACKS_PER_WINDOW_MAX: u32 = 64;
/// The ACK rate window.
pub const ACK_WINDOW_MS: u64 = 1_000;
/// ACKs waiting on one shard for the link hub; past it they are dropped (counted).
pub const ACKS_PENDING_MAX: usize = 8_192;

/// What became of one ACK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Queued for the brokers.
    Forwarded,
    /// The connection did not send `"ack": true`: ignored.
    NotOptedIn,
    /// Over the connection's rate or the shard's pending bound: dropped.
    RateLimited,
}

struct Acker {
    uid: UserId,
    device: DeviceId,
    window_start_ms: u64,
    in_window: u32,
}

/// One shard's ACK state.
#[derive(Default)]
pub struct Acks {
    by_key: HashMap<u32, Acker>,
    pending: Vec<(UserId, DeviceId, MsgId)>,
}

impl Acks {
    /// Connection `key` was seated; it is tracked only when it opted in.
    pub fn join(&mut self, key: u32, uid: UserId, device: &DeviceId, ack: bool) {
        if ack {
            self.by_key.insert(
                key,
                Acker {
                    uid,
                    device: device.clone(),
                    window_start_ms: 0,
                    in_window: 0,
                },
            );
        } else {
            self.by_key.remove(&key);
        }
    }

    /// Connection `key` left (idempotent).
    pub fn leave(&mut self, key: u32) {
        self.by_key.remove(&key);
    }

    /// An op 1000 from connection `key` at `now_ms`.
    pub fn on_ack(&mut self, key: u32, msg: MsgId, now_ms: u64) -> Outcome {
        let Some(a) = self.by_key.get_mut(&key) else {
            return Outcome::NotOptedIn;
        };
        if now_ms.saturating_sub(a.window_start_ms) >= ACK_WINDOW_MS {
            a.window_start_ms = now_ms;
            a.in_window = 0;
        }
        if a.in_window >= ACKS_PER_WINDOW_MAX || self.pending.len() >= ACKS_PENDING_MAX {
            return Outcome::RateLimited;
        }
        a.in_window += 1;
        self.pending.push((a.uid, a.device.clone(), msg));
        Outcome::Forwarded
    }

    /// True when connection `key` gets high-reach resends (it opted in).
    pub fn gets_resends(&self, key: u32) -> bool {
        self.by_key.contains_key(&key)
    }

    /// The ACKs waiting for the link hub, if any.
    pub fn take(&mut self) -> Option<Vec<(UserId, DeviceId, MsgId)>> {
        (!self.pending.is_empty()).then(|| std::mem::take(&mut self.pending))
    }
}

/// True for a batch that is a high-reach resend (see the module docs).
pub fn is_resend(batch: &proto::link::Batch) -> bool {
    use proto::id::Scope;
    matches!(batch.scope, Scope::User(_) | Scope::Device(_)) && batch.seq >= 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_opted_in_connections_ack_and_within_their_rate() {
        let mut a = Acks::default();
        let d = DeviceId("d".into());
        a.join(1, UserId(5), &d, true);
        a.join(2, UserId(6), &d, false);
        assert_eq!(a.on_ack(2, MsgId(1), 0), Outcome::NotOptedIn);
        assert_eq!(a.on_ack(9, MsgId(1), 0), Outcome::NotOptedIn);
        for i in 0..ACKS_PER_WINDOW_MAX {
            assert_eq!(a.on_ack(1, MsgId(u64::from(i)), 10), Outcome::Forwarded);
        }
        assert_eq!(a.on_ack(1, MsgId(99), 500), Outcome::RateLimited);
        assert_eq!(a.on_ack(1, MsgId(99), 1_010), Outcome::Forwarded);
        let taken = a.take().unwrap();
        assert_eq!(taken.len(), ACKS_PER_WINDOW_MAX as usize + 1);
        assert_eq!(taken[0], (UserId(5), d.clone(), MsgId(0)));
        assert!(a.take().is_none());
        assert!(a.gets_resends(1) && !a.gets_resends(2));
        a.leave(1);
        a.leave(1);
        assert!(!a.gets_resends(1));
        assert_eq!(a.on_ack(1, MsgId(1), 2_000), Outcome::NotOptedIn);
    }
}
