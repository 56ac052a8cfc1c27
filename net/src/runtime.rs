//! Runtimes: one monoio runtime per shard thread, pinned to a core.
//!
//! Invariants: every runtime has its timer enabled; io_uring rings are kept at
//! [`URING_ENTRIES`] because the locked-memory limit (`ulimit -l`) is small; the driver a
//! thread actually got is recorded in a thread-local so [`driver_in_use`] can report it.

use std::cell::Cell;
use std::future::Future;
use std::thread::JoinHandle;

/// io_uring submission queue entries per runtime. Modest on purpose: each ring pins locked
/// memory and the limit here is 8 MiB shared by every runtime in the process.
pub const URING_ENTRIES: u32 = 1024;

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
    /// Parses `uring|legacy|auto` (case-insensitive, surrounding whitespace ignored).
    pub fn parse(s: &str) -> Option<Driver> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Some(Driver::Auto),
            "uring" | "io_uring" | "iouring" => Some(Driver::Uring),
            "legacy" | "epoll" => Some(Driver::Legacy),
            _ => None,
        }
    }

    /// `BARRAGE_DRIVER=uring|legacy|auto` overrides `configured`.
    pub fn from_env_or(configured: Driver) -> Driver {
        match std::env::var("BARRAGE_DRIVER") {
            Ok(v) if v.trim().is_empty() => configured,
            Ok(v) => match Driver::parse(&v) {
                Some(d) => d,
                None => {
                    tracing::warn!(value = %v, ?configured, "unknown BARRAGE_DRIVER, keeping configured driver");
                    configured
                }
            },
            Err(_) => configured,
        }
    }
}

thread_local! {
    /// The driver of the runtime running on this thread (None outside `block_on`).
    static IN_USE: Cell<Option<&'static str>> = const { Cell::new(None) };
}

/// The driver a runtime actually got ("uring" or "legacy"), for logs and metrics.
/// Outside a runtime started by [`block_on`], answers what `Auto` would pick.
pub fn driver_in_use() -> &'static str {
    IN_USE.with(|c| c.get()).unwrap_or_else(|| {
        if monoio::utils::detect_uring() {
            "uring"
        } else {
            "legacy"
        }
    })
}

/// Restores the previous thread-local value when a (possibly nested) `block_on` ends.
struct InUseGuard(Option<&'static str>);

impl Drop for InUseGuard {
    fn drop(&mut self) {
        IN_USE.with(|c| c.set(self.0));
    }
}

fn set_in_use(name: &'static str) -> InUseGuard {
    InUseGuard(IN_USE.with(|c| c.replace(Some(name))))
}

fn run_uring<F: Future>(fut: F) -> std::io::Result<F::Output> {
    let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .with_entries(URING_ENTRIES)
        .enable_timer()
        .build()?;
    let _g = set_in_use("uring");
    Ok(rt.block_on(fut))
}

fn run_legacy<F: Future>(fut: F) -> std::io::Result<F::Output> {
    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()?;
    let _g = set_in_use("legacy");
    Ok(rt.block_on(fut))
}

/// Runs `fut` to completion on a new runtime on the current thread with the given driver.
/// `timer` is always enabled.
///
/// `Auto` picks io_uring when `monoio::utils::detect_uring()` says so (exactly what monoio's
/// FusionDriver does) and, unlike FusionDriver, falls back to epoll when building the ring
/// fails anyway (e.g. locked-memory limit exhausted).
///
/// # Panics
/// When the runtime cannot be built (an explicit `Uring` on a kernel without io_uring, or
/// out of file descriptors). This happens at start-up only, never on a network path.
pub fn block_on<F: Future>(driver: Driver, fut: F) -> F::Output {
    let res = match driver {
        Driver::Uring => run_uring(fut),
        Driver::Legacy => run_legacy(fut),
        Driver::Auto => {
            if monoio::utils::detect_uring() {
                // Build first so `fut` is still ours if the ring cannot be created.
                match monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                    .with_entries(URING_ENTRIES)
                    .enable_timer()
                    .build()
                {
                    Ok(mut rt) => {
                        let _g = set_in_use("uring");
                        Ok(rt.block_on(fut))
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "io_uring runtime failed to build, falling back to epoll");
                        run_legacy(fut)
                    }
                }
            } else {
                run_legacy(fut)
            }
        }
    };
    match res {
        Ok(v) => v,
        Err(e) => panic!("cannot build monoio runtime with driver {driver:?}: {e}"),
    }
}

/// Spawns `n` shard threads named `{name}-{i}`, each pinned to core `i % cores` (when `pin`),
/// each running `make(i)` on its own runtime.
pub fn spawn_shards<F, Fut>(
    name: &str,
    n: usize,
    driver: Driver,
    pin: bool,
    make: F,
) -> std::io::Result<Vec<JoinHandle<()>>>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let make = std::sync::Arc::new(make);
    let ncores = cores();
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let make = make.clone();
        let h = std::thread::Builder::new().name(format!("{name}-{i}")).spawn(move || {
            if pin {
                let core = i % ncores;
                if let Err(e) = monoio::utils::bind_to_cpu_set([core]) {
                    tracing::warn!(shard = i, core, error = %e, "cannot pin shard thread, running unpinned");
                }
            }
            block_on(driver, make(i));
        })?;
        handles.push(h);
    }
    Ok(handles)
}

/// Number of cores available to this process.
pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_driver_names() {
        assert_eq!(Driver::parse("URING"), Some(Driver::Uring));
        assert_eq!(Driver::parse(" legacy "), Some(Driver::Legacy));
        assert_eq!(Driver::parse("Auto"), Some(Driver::Auto));
        assert_eq!(Driver::parse("kqueue"), None);
    }

    #[test]
    fn block_on_reports_driver() {
        assert_eq!(
            block_on(Driver::Legacy, async { driver_in_use() }),
            "legacy"
        );
        if monoio::utils::detect_uring() {
            assert_eq!(block_on(Driver::Uring, async { driver_in_use() }), "uring");
        }
        let auto = block_on(Driver::Auto, async { driver_in_use() });
        assert!(auto == "uring" || auto == "legacy");
        let timed = block_on(Driver::Legacy, async {
            monoio::time::sleep(std::time::Duration::from_millis(1)).await;
            7
        });
        assert_eq!(timed, 7);
    }

    #[test]
    fn shards_run_with_names() {
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        let hs = spawn_shards("t", 2, Driver::Legacy, true, move |i| {
            let name = std::thread::current().name().map(str::to_string);
            let _ = tx.lock().map(|t| t.send((i, name)));
            async {}
        })
        .unwrap();
        for h in hs {
            h.join().unwrap();
        }
        let mut got: Vec<_> = rx.try_iter().collect();
        got.sort();
        assert_eq!(
            got,
            vec![(0, Some("t-0".to_string())), (1, Some("t-1".to_string()))]
        );
    }
}
