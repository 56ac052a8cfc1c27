//! A thread-local stop latch: fired once, awaited by any number of tasks of one shard.
//!
//! Invariant: once fired it stays fired, and every waiter (present or future) resolves.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

#[derive(Default)]
struct Inner {
    fired: bool,
    /// One slot per live `Wait` future, freed when it is dropped (so a waiter costs O(1)).
    waiters: slab::Slab<Option<Waker>>,
}

/// Cheap to clone (shares the same latch).
#[derive(Clone, Default)]
pub struct Stop {
    inner: Rc<RefCell<Inner>>,
}

impl Stop {
    pub fn new() -> Stop {
        Stop::default()
    }

    pub fn fire(&self) {
        let waiters = {
            let mut g = self.inner.borrow_mut();
            g.fired = true;
            std::mem::take(&mut g.waiters)
        };
        for (_, w) in waiters {
            if let Some(w) = w {
                w.wake();
            }
        }
    }

    pub fn is_fired(&self) -> bool {
        self.inner.borrow().fired
    }

    /// Resolves once fired.
    pub fn wait(&self) -> impl Future<Output = ()> + 'static {
        Wait {
            inner: self.inner.clone(),
            slot: None,
        }
    }
}

struct Wait {
    inner: Rc<RefCell<Inner>>,
    slot: Option<usize>,
}

impl Future for Wait {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let inner = self.inner.clone();
        let mut g = inner.borrow_mut();
        if g.fired {
            return Poll::Ready(());
        }
        match self.slot {
            Some(k) => {
                if let Some(w) = g.waiters.get_mut(k) {
                    match w {
                        Some(w) if w.will_wake(cx.waker()) => {}
                        _ => *w = Some(cx.waker().clone()),
                    }
                }
            }
            None => self.slot = Some(g.waiters.insert(Some(cx.waker().clone()))),
        }
        Poll::Pending
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        if let Some(k) = self.slot {
            let mut g = self.inner.borrow_mut();
            if g.waiters.contains(k) {
                g.waiters.remove(k);
            }
        }
    }
}

/// Lets other tasks of this thread run once.
pub async fn yield_now() {
    struct YieldNow(bool);
    impl Future for YieldNow {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.0 {
                return Poll::Ready(());
            }
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
    YieldNow(false).await
}
