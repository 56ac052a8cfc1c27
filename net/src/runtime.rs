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

/// Spawns `n` shard threads named `{name}-{i}`, each pinned as `pin` says (shard `i` to the
/// `i mod k`-th of the `k` CPUs allowed), each running `make(i)` on its own runtime.
pub fn spawn_shards<F, Fut>(
    name: &str,
    n: usize,
    driver: Driver,
    pin: Pin,
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
        let cpu = pin.cpu_for(i, ncores);
        let h = std::thread::Builder::new().name(format!("{name}-{i}")).spawn(move || {
            if let Some(cpu) = cpu {
                if let Err(e) = monoio::utils::bind_to_cpu_set([cpu]) {
                    tracing::warn!(shard = i, cpu, error = %e, "cannot pin shard thread, running unpinned");
                }
            }
            block_on(driver, make(i));
        })?;
        handles.push(h);
    }
    Ok(handles)
}

/// Binds `n` `SO_REUSEPORT` listeners on `addr`, one per shard, all on the port the first got.
///
/// `SO_REUSEPORT` lets any process of the same user bind the same port too, so a second
/// `barrage edge` started by mistake would silently take half the new connections. Unless
/// `across_processes` is set (on purpose, for a zero-downtime restart: the new process binds
/// while the old one drains), a port some socket already listens on is refused with
/// `AddrInUse`: the check binds a plain socket (no `SO_REUSEPORT`) first, which only a port
/// nobody listens on allows.
pub fn shard_listeners(
    addr: std::net::SocketAddr,
    n: usize,
    backlog: i32,
    across_processes: bool,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    if !across_processes && addr.port() != 0 {
        if let Err(e) = crate::sys::listener(addr, false, 1) {
            return Err(if e.kind() == std::io::ErrorKind::AddrInUse {
                std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!(
                        "address in use: {addr} is already held by another socket (another \
                         barrage process?); set reuse_port_across_processes = true only to \
                         share it on purpose during a restart"
                    ),
                )
            } else {
                e
            });
        }
    }
    let first = crate::sys::listener(addr, true, backlog)?;
    let bound = first.local_addr()?;
    let mut out = Vec::with_capacity(n.max(1));
    out.push(first);
    for _ in 1..n {
        out.push(crate::sys::listener(bound, true, backlog)?);
    }
    Ok(out)
}

/// Largest CPU number a [`CpuSet`] holds, plus one (glibc's `CPU_SETSIZE`).
pub const CPUS_MAX: usize = 1024;

/// A set of CPU numbers below [`CPUS_MAX`]. `Copy`, so a config holding one stays `Copy`-cheap.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CpuSet([u64; CPUS_MAX / 64]);

impl CpuSet {
    /// The empty set.
    pub const EMPTY: CpuSet = CpuSet([0; CPUS_MAX / 64]);

    /// Adds `cpu`; `false` (and no change) when it is not below [`CPUS_MAX`].
    pub fn insert(&mut self, cpu: usize) -> bool {
        if cpu >= CPUS_MAX {
            return false;
        }
        self.0[cpu / 64] |= 1 << (cpu % 64);
        true
    }

    pub fn contains(&self, cpu: usize) -> bool {
        cpu < CPUS_MAX && self.0[cpu / 64] & (1 << (cpu % 64)) != 0
    }

    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The CPUs in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        (0..CPUS_MAX).filter(|&c| self.contains(c))
    }

    /// Parses the kernel's list format (`0-3,8,10-11`), as in `/proc/irq/N/smp_affinity_list`
    /// and systemd's `CPUAffinity=`.
    pub fn parse_list(text: &str) -> Result<CpuSet, String> {
        let mut set = CpuSet::EMPTY;
        for part in text
            .trim()
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let num = |s: &str| {
                s.trim()
                    .parse::<usize>()
                    .map_err(|_| format!("{s:?} in CPU list {text:?} is not a CPU number"))
            };
            let (lo, hi) = match part.split_once('-') {
                Some((a, b)) => (num(a)?, num(b)?),
                None => (num(part)?, num(part)?),
            };
            if lo > hi || hi >= CPUS_MAX {
                return Err(format!(
                    "{part:?} in CPU list {text:?} is not a range below {CPUS_MAX}"
                ));
            }
            for c in lo..=hi {
                set.insert(c);
            }
        }
        Ok(set)
    }
}

impl Default for CpuSet {
    fn default() -> Self {
        CpuSet::EMPTY
    }
}

impl std::fmt::Display for CpuSet {
    /// The kernel's list format, ranges collapsed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cpus: Vec<usize> = self.iter().collect();
        let mut i = 0;
        let mut first = true;
        while i < cpus.len() {
            let mut j = i;
            while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
                j += 1;
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if j > i {
                write!(f, "{}-{}", cpus[i], cpus[j])?;
            } else {
                write!(f, "{}", cpus[i])?;
            }
            i = j + 1;
        }
        Ok(())
    }
}

impl std::fmt::Debug for CpuSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CpuSet({self})")
    }
}

/// Where shard threads run: the `pin` setting of every role.
///
/// In TOML: `pin = true` (shard `i` on CPU `i mod cores`), `pin = false` (unpinned), or the CPUs
/// shards may use, as a list `pin = [2, 3, 4, 5]` or in the kernel's format `pin = "2-5"`; the
/// list form leaves the other CPUs to the NIC's interrupts (`barrage doctor` checks them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Pin {
    /// Threads float wherever the scheduler puts them.
    Off,
    /// Shard `i` on CPU `i mod cores`.
    #[default]
    Cores,
    /// Shard `i` on the `i mod k`-th of these `k` CPUs.
    Cpus(CpuSet),
}

impl Pin {
    /// The CPU shard `i` is pinned to (None: unpinned). `cores` is the CPU count.
    pub fn cpu_for(&self, i: usize, cores: usize) -> Option<usize> {
        match self {
            Pin::Off => None,
            Pin::Cores => Some(i % cores.max(1)),
            Pin::Cpus(set) => {
                let k = set.len();
                (k > 0).then(|| set.iter().nth(i % k)).flatten()
            }
        }
    }

    /// The CPUs `n` shards run on (empty when unpinned).
    pub fn cpus_used(&self, n: usize, cores: usize) -> CpuSet {
        let mut set = CpuSet::EMPTY;
        for i in 0..n {
            if let Some(c) = self.cpu_for(i, cores) {
                set.insert(c);
            }
        }
        set
    }
}

impl From<bool> for Pin {
    fn from(on: bool) -> Pin {
        if on {
            Pin::Cores
        } else {
            Pin::Off
        }
    }
}

impl serde::Serialize for Pin {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Pin::Off => s.serialize_bool(false),
            Pin::Cores => s.serialize_bool(true),
            Pin::Cpus(set) => s.collect_seq(set.iter()),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Pin {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Pin, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Pin;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("true, false, a list of CPU numbers, or a CPU list like \"2-5,8\"")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Pin, E> {
                Ok(Pin::from(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Pin, E> {
                let set = CpuSet::parse_list(v).map_err(E::custom)?;
                if set.is_empty() {
                    return Err(E::custom("pin: the CPU list is empty (use pin = false)"));
                }
                Ok(Pin::Cpus(set))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Pin, A::Error> {
                use serde::de::Error;
                let mut set = CpuSet::EMPTY;
                while let Some(c) = seq.next_element::<u64>()? {
                    if !set.insert(usize::try_from(c).unwrap_or(usize::MAX)) {
                        return Err(A::Error::custom(format!(
                            "pin: CPU {c} is not below {CPUS_MAX}"
                        )));
                    }
                }
                if set.is_empty() {
                    return Err(A::Error::custom(
                        "pin: the CPU list is empty (use pin = false)",
                    ));
                }
                Ok(Pin::Cpus(set))
            }
        }
        d.deserialize_any(V)
    }
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
    fn pin_forms_parse_and_place_shards() {
        #[derive(serde::Deserialize, serde::Serialize)]
        struct C {
            pin: Pin,
        }
        let p = |t: &str| toml::from_str::<C>(t).map(|c| c.pin);
        assert_eq!(p("pin = true").unwrap(), Pin::Cores);
        assert_eq!(p("pin = false").unwrap(), Pin::Off);
        let listed = p("pin = [2, 3, 5]").unwrap();
        assert_eq!(p("pin = \"2-3,5\"").unwrap(), listed);
        assert_eq!(listed.cpu_for(0, 8), Some(2));
        assert_eq!(listed.cpu_for(2, 8), Some(5));
        assert_eq!(listed.cpu_for(3, 8), Some(2));
        assert_eq!(Pin::Cores.cpu_for(5, 4), Some(1));
        assert_eq!(Pin::Off.cpu_for(0, 4), None);
        assert_eq!(listed.cpus_used(2, 8).to_string(), "2-3");
        assert!(p("pin = []").is_err());
        assert!(p("pin = \"3-1\"").is_err());
        assert!(p("pin = [5000]").is_err());
        assert!(p("pin = \"x\"").is_err());
        // Written back the way it was read.
        let text = toml::to_string(&C { pin: listed }).unwrap();
        assert_eq!(p(&text).unwrap(), listed);
        assert_eq!(
            CpuSet::parse_list("0-3,8,10-11\n").unwrap().to_string(),
            "0-3,8,10-11"
        );
    }

    #[test]
    fn a_held_port_is_refused_unless_shared_on_purpose() {
        let held = shard_listeners("127.0.0.1:0".parse().unwrap(), 1, 16, false).unwrap();
        let addr = held[0].local_addr().unwrap();
        let e = shard_listeners(addr, 2, 16, false).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
        assert!(e.to_string().contains("address in use"), "{e}");
        let shared = shard_listeners(addr, 2, 16, true).unwrap();
        assert_eq!(shared.len(), 2);
        assert_eq!(shared[1].local_addr().unwrap(), addr);
        drop((held, shared));
        // Free again: the check passes.
        assert_eq!(shard_listeners(addr, 2, 16, false).unwrap().len(), 2);
    }

    #[test]
    fn shards_run_with_names() {
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        let hs = spawn_shards("t", 2, Driver::Legacy, Pin::Cores, move |i| {
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
