//! Cross-thread wake-up for shard loops: a producer thread pushes into a ring or channel, then
//! calls [`Notify::notify`]; the consumer shard awaits [`Notify::notified`]. Needs monoio's
//! `sync` feature so a waker may be woken from another thread.

use std::sync::Arc;

/// One consumer, many producers. A notify before the wait is not lost (a flag is latched).
#[derive(Default)]
pub struct Notify {
    // implementation-defined: an AtomicBool flag + Mutex<Option<Waker>>
}

impl Notify {
    pub fn new() -> Arc<Notify> {
        todo!()
    }
    /// Wakes the consumer (cheap when it is already awake or already notified).
    pub fn notify(&self) {
        todo!()
    }
    /// Resolves once a notify has happened since the last time this resolved.
    pub async fn notified(&self) {
        todo!()
    }
}
