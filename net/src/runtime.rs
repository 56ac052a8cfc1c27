//! Runtimes: one monoio runtime per shard thread, pinned to a core.

use std::future::Future;
use std::thread::JoinHandle;

/// Which monoio driver to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    /// io_uring when the kernel allows it, epoll otherwise (monoio's FusionDriver).
    #[default]
    Auto,
    /// io_uring only (fails to start if unavailable).
    Uring,
    /// epoll only.
    Legacy,
}

impl Driver {
    /// `BARRAGE_DRIVER=uring|legacy|auto` overrides `configured`.
    pub fn from_env_or(configured: Driver) -> Driver {
        todo!()
    }
}

/// The driver a runtime actually got ("uring" or "legacy"), for logs and metrics.
pub fn driver_in_use() -> &'static str {
    todo!()
}

/// Runs `fut` to completion on a new runtime on the current thread with the given driver.
/// `timer` is always enabled.
pub fn block_on<F: Future>(driver: Driver, fut: F) -> F::Output {
    todo!()
}

/// Spawns `n` shard threads named `{name}-{i}`, each pinned to core `i % cores` (when `pin`),
/// each running `make(i)` on its own runtime.
pub fn spawn_shards<F, Fut>(name: &str, n: usize, driver: Driver, pin: bool, make: F) -> std::io::Result<Vec<JoinHandle<()>>>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + 'static,
{
    todo!()
}

/// Number of cores available to this process.
pub fn cores() -> usize {
    todo!()
}
