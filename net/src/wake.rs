//! Cross-thread wake-up for shard loops: a producer thread pushes into a ring or channel, then
//! calls [`Notify::notify`]; the consumer shard awaits [`Notify::notified`]. Needs monoio's
//! `sync` feature so a waker may be woken from another thread.
//!
//! Invariant (no lost wake-ups): `notify` sets the flag *before* taking the waker, and
//! `notified` registers its waker *before* re-checking the flag. So either the consumer sees
//! the flag on its re-check, or the producer sees the registered waker and wakes it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

/// One consumer, many producers. A notify before the wait is not lost (a flag is latched).
#[derive(Default)]
pub struct Notify {
    /// Latched "something happened since the consumer last woke".
    flag: AtomicBool,
    /// The consumer's waker while it waits.
    waker: Mutex<Option<Waker>>,
}

impl Notify {
    pub fn new() -> Arc<Notify> {
        Arc::new(Notify::default())
    }

    /// Wakes the consumer (cheap when it is already awake or already notified).
    pub fn notify(&self) {
        // Already latched: the consumer will see it (or has been woken already).
        if self.flag.swap(true, Ordering::AcqRel) {
            return;
        }
        let w = match self.waker.lock() {
            Ok(mut g) => g.take(),
            Err(p) => p.into_inner().take(),
        };
        if let Some(w) = w {
            w.wake();
        }
    }

    /// Resolves once a notify has happened since the last time this resolved.
    pub async fn notified(&self) {
        Notified { n: self }.await
    }

    fn poll_notified(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.flag.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        {
            let mut g = match self.waker.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            match g.as_ref() {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *g = Some(cx.waker().clone()),
            }
        }
        if self.flag.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

struct Notified<'a> {
    n: &'a Notify,
}

impl Future for Notified<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.n.poll_notified(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{block_on, Driver};
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    const ROUNDS: u64 = 20_000;

    /// A std thread bumps a counter and notifies; the runtime waits until it has seen every
    /// bump. A lost wake-up hangs the consumer, which the timeout turns into a failure.
    fn ping(driver: Driver) {
        let n = Notify::new();
        let count = Arc::new(AtomicU64::new(0));
        let (n2, c2) = (n.clone(), count.clone());
        let producer = std::thread::spawn(move || {
            for i in 0..ROUNDS {
                c2.store(i + 1, Ordering::Release);
                n2.notify();
                if i % 64 == 0 {
                    std::thread::yield_now();
                }
            }
        });
        let seen = block_on(driver, async move {
            let wait = async {
                while count.load(Ordering::Acquire) < ROUNDS {
                    n.notified().await;
                }
            };
            monoio::time::timeout(Duration::from_secs(20), wait)
                .await
                .is_ok()
        });
        producer.join().unwrap();
        assert!(seen, "lost wake-up under {driver:?}");
    }

    #[test]
    fn notify_across_threads_legacy() {
        ping(Driver::Legacy);
    }

    #[test]
    fn notify_across_threads_uring() {
        if !monoio::utils::detect_uring() {
            eprintln!("io_uring unavailable, skipping");
            return;
        }
        ping(Driver::Uring);
    }

    #[test]
    fn notify_before_wait_is_latched() {
        let n = Notify::new();
        n.notify();
        n.notify();
        block_on(Driver::Legacy, async {
            let r = monoio::time::timeout(Duration::from_secs(5), n.notified()).await;
            assert!(r.is_ok());
            // Both notifies collapsed into one: a second wait times out.
            let r = monoio::time::timeout(Duration::from_millis(50), n.notified()).await;
            assert!(r.is_err());
        });
    }

    /// Ping-pong in strict alternation: every round needs a real cross-thread wake.
    #[test]
    fn ping_pong_both_drivers() {
        for driver in [Driver::Legacy, Driver::Uring] {
            if driver == Driver::Uring && !monoio::utils::detect_uring() {
                continue;
            }
            let to_rt = Notify::new();
            let to_thread = Arc::new((Mutex::new(0u64), std::sync::Condvar::new()));
            let (a, b) = (to_rt.clone(), to_thread.clone());
            const N: u64 = 2_000;
            let th = std::thread::spawn(move || {
                for i in 1..=N {
                    a.notify();
                    let (m, cv) = &*b;
                    let mut g = m.lock().unwrap();
                    while *g < i {
                        let (ng, t) = cv.wait_timeout(g, Duration::from_secs(20)).unwrap();
                        g = ng;
                        if t.timed_out() {
                            return false;
                        }
                    }
                }
                true
            });
            let ok = block_on(driver, async move {
                for i in 1..=N {
                    if monoio::time::timeout(Duration::from_secs(20), to_rt.notified())
                        .await
                        .is_err()
                    {
                        return false;
                    }
                    let (m, cv) = &*to_thread;
                    *m.lock().unwrap() = i;
                    cv.notify_one();
                }
                true
            });
            assert!(ok, "runtime side timed out under {driver:?}");
            assert!(th.join().unwrap(), "thread side timed out under {driver:?}");
        }
    }
}
