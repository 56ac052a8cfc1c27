//! One connection's send queue: the shared buffers waiting for its next write, in order.
//!
//! Most of the time a connection has nothing queued (an idle viewer) or one buffer (a viewer
//! that keeps up: the next batch arrives after the last one was written). Both are held
//! inline, with no allocation; only a backlog (two or more buffers) gets a `VecDeque`, which
//! is freed as soon as it drains. A `VecDeque` field kept its capacity (four buffers, 128 B
//! plus the allocator's header) for the life of every connection that was ever written to:
//! about a quarter of an idle connection's memory (docs/operations-edge.md, "Idle memory").

use bytes::Bytes;
use std::collections::VecDeque;

/// A connection's queued buffers. See the module docs.
#[derive(Debug, Default)]
pub enum SendQueue {
    #[default]
    Empty,
    One(Bytes),
    Many(VecDeque<Bytes>),
}

impl SendQueue {
    pub fn is_empty(&self) -> bool {
        matches!(self, SendQueue::Empty)
    }

    pub fn len(&self) -> usize {
        match self {
            SendQueue::Empty => 0,
            SendQueue::One(_) => 1,
            SendQueue::Many(q) => q.len(),
        }
    }

    pub fn front(&self) -> Option<&Bytes> {
        match self {
            SendQueue::Empty => None,
            SendQueue::One(b) => Some(b),
            SendQueue::Many(q) => q.front(),
        }
    }

    /// Takes the first buffer; a drained backlog frees its storage.
    pub fn pop_front(&mut self) -> Option<Bytes> {
        match self {
            SendQueue::Empty => None,
            SendQueue::One(_) => match std::mem::take(self) {
                SendQueue::One(b) => Some(b),
                _ => None,
            },
            SendQueue::Many(q) => {
                let b = q.pop_front();
                if q.is_empty() {
                    *self = SendQueue::Empty;
                }
                b
            }
        }
    }

    pub fn push_back(&mut self, b: Bytes) {
        let at = self.len();
        self.insert(at, b);
    }

    /// Puts `b` at position `at` (clamped to the length).
    pub fn insert(&mut self, at: usize, b: Bytes) {
        match std::mem::take(self) {
            SendQueue::Empty => *self = SendQueue::One(b),
            SendQueue::One(first) => {
                let mut q = VecDeque::with_capacity(4);
                q.push_back(first);
                q.insert(at.min(1), b);
                *self = SendQueue::Many(q);
            }
            SendQueue::Many(mut q) => {
                q.insert(at.min(q.len()), b);
                *self = SendQueue::Many(q);
            }
        }
    }

    pub fn clear(&mut self) {
        *self = SendQueue::Empty;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn b(x: u8) -> Bytes {
        Bytes::from(vec![x])
    }

    #[test]
    fn one_buffer_is_inline_and_a_drained_backlog_is_freed() {
        let mut q = SendQueue::default();
        q.push_back(b(1));
        assert!(matches!(q, SendQueue::One(_)));
        q.push_back(b(2));
        q.insert(0, b(0));
        assert_eq!(q.len(), 3);
        let got: Vec<u8> = std::iter::from_fn(|| q.pop_front()).map(|x| x[0]).collect();
        assert_eq!(got, [0, 1, 2]);
        assert!(matches!(q, SendQueue::Empty), "the VecDeque is gone");
    }

    proptest! {
        /// Against a `VecDeque`: any sequence of inserts, pops and clears gives the same order.
        #[test]
        fn behaves_like_a_vecdeque(ops in proptest::collection::vec((0u8..4, 0usize..6), 0..64)) {
            let mut q = SendQueue::default();
            let mut model: VecDeque<Bytes> = VecDeque::new();
            for (i, (op, at)) in ops.into_iter().enumerate() {
                match op {
                    0 => { q.push_back(b(i as u8)); model.push_back(b(i as u8)); }
                    1 => { q.insert(at, b(i as u8)); model.insert(at.min(model.len()), b(i as u8)); }
                    2 => prop_assert_eq!(q.pop_front(), model.pop_front()),
                    _ => if at == 0 { q.clear(); model.clear(); },
                }
                prop_assert_eq!(q.len(), model.len());
                prop_assert_eq!(q.front(), model.front());
                prop_assert_eq!(q.is_empty(), model.is_empty());
            }
        }
    }
}
