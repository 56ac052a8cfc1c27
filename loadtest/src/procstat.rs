//! Server cost from `/proc`: CPU seconds (`utime + stime` of `/proc/<pid>/stat`) and memory
//! (`VmRSS` and `RssAnon` of `/proc/<pid>/status`) of the processes under test, sampled at the
//! marks a scenario chooses (before the ramp, start and end of the measured window) and once per
//! second in between for the peak.
//!
//! `utime`/`stime` are in USER_HZ ticks, which Linux fixes at 100 per second for user space
//! (the kernel's own HZ may differ; `/proc` converts), so one tick is 10 ms.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// USER_HZ: ticks per second in `/proc/<pid>/stat`.
const USER_HZ: f64 = 100.0;

/// Totals over the sampled processes at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Totals {
    /// CPU seconds (user + system) since each process started, summed.
    pub cpu_s: f64,
    /// Resident set size, summed.
    pub rss_bytes: u64,
    /// Anonymous resident memory (heap, stacks): the user-space part of the cost, summed.
    pub anon_bytes: u64,
    /// How many of the processes could be read.
    pub processes: usize,
}

impl Totals {
    /// `self - earlier`, per field (CPU seconds and memory deltas; memory may shrink).
    pub fn since(&self, earlier: &Totals) -> Delta {
        Delta {
            cpu_s: self.cpu_s - earlier.cpu_s,
            rss_bytes: self.rss_bytes as i64 - earlier.rss_bytes as i64,
            anon_bytes: self.anon_bytes as i64 - earlier.anon_bytes as i64,
        }
    }
}

/// A difference of two [`Totals`].
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Delta {
    pub cpu_s: f64,
    pub rss_bytes: i64,
    pub anon_bytes: i64,
}

/// CPU seconds of one process from the text of its `/proc/<pid>/stat`.
pub fn parse_stat_cpu_s(stat: &str) -> Option<f64> {
    // The command name (field 2) is in parentheses and may hold spaces or ')': split at the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// `(VmRSS, RssAnon)` in bytes from the text of `/proc/<pid>/status`.
pub fn parse_status_mem(status: &str) -> (u64, u64) {
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("RssAnon:"))
}

/// Reads the totals of `pids` now; unreadable (exited) processes are skipped.
pub fn read(pids: &[u32]) -> Totals {
    let mut t = Totals::default();
    for pid in pids {
        let (Ok(stat), Ok(status)) = (
            std::fs::read_to_string(format!("/proc/{pid}/stat")),
            std::fs::read_to_string(format!("/proc/{pid}/status")),
        ) else {
            continue;
        };
        let Some(cpu) = parse_stat_cpu_s(&stat) else {
            continue;
        };
        let (rss, anon) = parse_status_mem(&status);
        t.cpu_s += cpu;
        t.rss_bytes += rss;
        t.anon_bytes += anon;
        t.processes += 1;
    }
    t
}

/// Pids whose `comm` or program name (`argv[0]`'s file name) equals one of `names`, or that run
/// `barrage <name>` (the role as the first argument of a `barrage*` binary). Never this process,
/// nor loadtest processes (they are the load, not the server); a mere argument such as
/// `cargo test -p edge` does not match.
pub fn find_pids(names: &[String]) -> Vec<u32> {
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a == "loadtest") {
            continue;
        }
        if matches_name(comm.trim(), &args, names) {
            out.push(pid);
        }
    }
    out.sort_unstable();
    out
}

fn matches_name(comm: &str, args: &[String], names: &[String]) -> bool {
    let prog = args
        .first()
        .map(|a| a.rsplit('/').next().unwrap_or(a))
        .unwrap_or("");
    let role = args.get(1).map(String::as_str).unwrap_or("");
    names
        .iter()
        .any(|n| comm == n || prog == n || (prog.starts_with("barrage") && role == n))
}

/// CPU nanoseconds this thread has run, from `/proc/thread-self/schedstat` (its first field).
pub fn thread_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Samples the totals once per `interval` on a thread, keeping the peak memory.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    peak: Arc<Mutex<Totals>>,
    handle: Option<std::thread::JoinHandle<()>>,
    pids: Vec<u32>,
}

impl Sampler {
    pub fn start(pids: Vec<u32>, interval: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(Mutex::new(read(&pids)));
        let handle = if pids.is_empty() {
            None
        } else {
            let (stop, peak, pids) = (stop.clone(), peak.clone(), pids.clone());
            std::thread::Builder::new()
                .name("procstat".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(interval);
                        let now = read(&pids);
                        if let Ok(mut p) = peak.lock() {
                            p.rss_bytes = p.rss_bytes.max(now.rss_bytes);
                            p.anon_bytes = p.anon_bytes.max(now.anon_bytes);
                            p.cpu_s = now.cpu_s;
                            p.processes = now.processes;
                        }
                    }
                })
                .ok()
        };
        Sampler {
            stop,
            peak,
            handle,
            pids,
        }
    }

    pub fn pids(&self) -> &[u32] {
        &self.pids
    }

    /// The totals now.
    pub fn now(&self) -> Totals {
        read(&self.pids)
    }

    /// Peak memory seen so far (CPU: the latest sample).
    pub fn peak(&self) -> Totals {
        self.peak.lock().map(|p| *p).unwrap_or_default()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_a_hostile_comm() {
        // comm "a) b" holds a space and a parenthesis; utime 250, stime 50 ticks.
        let stat =
            "1234 (a) b) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 100 1000 200";
        assert_eq!(parse_stat_cpu_s(stat), Some(3.0));
        assert_eq!(parse_stat_cpu_s("garbage"), None);
    }

    #[test]
    fn parses_status_memory() {
        let status = "Name:\tedge\nVmRSS:\t   2048 kB\nRssAnon:\t    512 kB\nRssFile:\t 1536 kB\n";
        assert_eq!(parse_status_mem(status), (2048 * 1024, 512 * 1024));
        assert_eq!(parse_status_mem("Name: x\n"), (0, 0));
    }

    #[test]
    fn names_match_programs_and_roles_not_arguments() {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let names = v(&["edge"]);
        assert!(matches_name(
            "barrage",
            &v(&["/usr/bin/barrage", "edge", "--config", "e.toml"]),
            &names
        ));
        assert!(matches_name(
            "barrage-srv",
            &v(&["./barrage-srv", "edge"]),
            &names
        ));
        assert!(matches_name("edge", &v(&["edge"]), &names));
        assert!(!matches_name(
            "cargo",
            &v(&["cargo", "test", "-p", "edge"]),
            &names
        ));
        assert!(!matches_name("barrage", &v(&["barrage", "broker"]), &names));
    }

    #[test]
    fn reads_a_real_child_process() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let t = read(&[child.id()]);
        assert_eq!(t.processes, 1);
        assert!(t.rss_bytes > 0);
        assert!(find_pids(&["sleep".to_string()]).contains(&child.id()));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(read(&[child.id()]).processes, 0);
    }

    #[test]
    fn thread_cpu_time_advances() {
        let a = thread_cpu_ns().unwrap();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(thread_cpu_ns().unwrap() > a);
    }
}
