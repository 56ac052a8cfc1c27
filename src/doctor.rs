//! `barrage doctor`: reads the live host and says what differs from the tuning kit (`tuning/`),
//! each difference with its fix. Exit 1 when something would cap capacity (a limit that refuses
//! connections or forces epoll, shards without cores); advice alone exits 0.
//!
//! Split so it can be tested without the host: [`Facts::read`] reads files under a root
//! directory (`/` for real, a directory a test builds otherwise), and [`diagnose`] turns facts
//! and the kit into findings with no I/O at all.

use crate::exit::Exit;
use net::runtime::{CpuSet, Pin};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The kit's files, compiled in so the binary checks against the kit it shipped with.
const EDGE_SYSCTL: &str = include_str!("../tuning/sysctl.d/60-barrage-edge.conf");
const LOADTEST_SYSCTL: &str = include_str!("../tuning/sysctl.d/60-barrage-loadtest.conf");
const LIMITS: &str = include_str!("../tuning/limits.d/60-barrage.conf");

/// Locked memory one io_uring runtime needs, bytes: a ring of `URING_ENTRIES` SQEs (64 B) and
/// twice as many CQEs (16 B), rounded up for the ring headers and page rounding.
const URING_RING_BYTES: u64 = 128 * 1024;

#[derive(clap::Args, Debug)]
pub struct DoctorArgs {
    /// Which kit to compare with.
    #[arg(long, value_enum, default_value = "edge")]
    role: KitRole,
    /// The edge config the host will run (for shards and `pin`); the defaults without it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Read the limits of this running process (e.g. the edge under systemd) instead of
    /// doctor's own, which are the shell's.
    #[arg(long)]
    pid: Option<u32>,
    /// Read the host under this directory instead of `/` (tests, or a host's copied /proc).
    #[arg(long, default_value = "/", hide = true)]
    root: PathBuf,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum KitRole {
    Edge,
    Loadtest,
}

/// How bad a difference is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Matches the kit.
    Ok,
    /// Differs, costs efficiency, caps nothing.
    Advice,
    /// Caps capacity: connections refused, epoll forced, shards without cores.
    Cap,
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    /// What was checked, e.g. `net.core.somaxconn`.
    pub what: String,
    /// What the host has and what the kit wants.
    pub detail: String,
    /// The command or setting that fixes it (empty when ok).
    pub fix: String,
}

/// What was read from the host.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    /// sysctl name -> value (whitespace-normalised); absent when the file does not exist.
    pub sysctls: BTreeMap<String, String>,
    /// Soft `RLIMIT_NOFILE` of the process checked.
    pub nofile: Option<u64>,
    /// Soft `RLIMIT_MEMLOCK` in bytes (None: unlimited or unreadable).
    pub memlock_bytes: Option<u64>,
    /// Whether the memlock limit is "unlimited".
    pub memlock_unlimited: bool,
    /// `kernel.io_uring_disabled` (0 on, 1 privileged only, 2 off); None on kernels without it.
    pub io_uring_disabled: Option<u32>,
    /// Whether a ring could be built here (real host only; None when not probed).
    pub io_uring_works: Option<bool>,
    /// CPUs online.
    pub cpus: CpuSet,
    /// NIC interrupt -> (name, CPUs it may run on).
    pub nic_irqs: BTreeMap<u32, (String, CpuSet)>,
}

impl Facts {
    /// Reads the host under `root` (`/` for the real one). `pid`: whose limits (None: own).
    pub fn read(root: &Path, pid: Option<u32>, sysctl_names: &[String]) -> Facts {
        let read = |p: &str| std::fs::read_to_string(root.join(p)).ok();
        let mut f = Facts::default();
        for name in sysctl_names {
            let path = format!("proc/sys/{}", name.replace('.', "/"));
            if let Some(v) = read(&path) {
                f.sysctls.insert(name.clone(), normalise(&v));
            }
        }
        let limits_path = match pid {
            Some(p) => format!("proc/{p}/limits"),
            None => "proc/self/limits".to_string(),
        };
        if let Some(limits) = read(&limits_path) {
            for line in limits.lines() {
                let soft = |prefix: &str| {
                    line.strip_prefix(prefix)
                        .and_then(|rest| rest.split_whitespace().next().map(str::to_string))
                };
                if let Some(v) = soft("Max open files") {
                    f.nofile = v.parse().ok();
                }
                if let Some(v) = soft("Max locked memory") {
                    f.memlock_unlimited = v == "unlimited";
                    f.memlock_bytes = v.parse().ok();
                }
            }
        }
        f.io_uring_disabled =
            read("proc/sys/kernel/io_uring_disabled").and_then(|v| v.trim().parse().ok());
        if root == Path::new("/") {
            f.io_uring_works = Some(net::runtime::driver_in_use() == "uring");
        }
        f.cpus = read("sys/devices/system/cpu/online")
            .and_then(|v| CpuSet::parse_list(&v).ok())
            .unwrap_or(CpuSet::EMPTY);
        f.nic_irqs = nic_irqs(root);
        f
    }
}

fn normalise(v: &str) -> String {
    v.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The interrupts of every network interface but loopback, from the device's `msi_irqs`
/// (PCI NICs have it on the device, virtio NICs on the PCI parent), without virtio's
/// configuration interrupt, which carries no packets.
fn nic_irqs(root: &Path) -> BTreeMap<u32, (String, CpuSet)> {
    let mut out = BTreeMap::new();
    let names = irq_names(root);
    let Ok(ifaces) = std::fs::read_dir(root.join("sys/class/net")) else {
        return out;
    };
    for iface in ifaces.flatten() {
        let name = iface.file_name().to_string_lossy().to_string();
        if name == "lo" {
            continue;
        }
        let dev = iface.path().join("device");
        for dir in [dev.join("msi_irqs"), dev.join("../msi_irqs")] {
            let Ok(irqs) = std::fs::read_dir(&dir) else {
                continue;
            };
            for irq in irqs.flatten() {
                let Ok(n) = irq.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                let label = names.get(&n).cloned().unwrap_or_else(|| name.clone());
                if label.ends_with("-config") {
                    continue;
                }
                let aff =
                    std::fs::read_to_string(root.join(format!("proc/irq/{n}/smp_affinity_list")))
                        .ok()
                        .and_then(|v| CpuSet::parse_list(&v).ok());
                if let Some(aff) = aff {
                    out.insert(n, (format!("{name}: {label}"), aff));
                }
            }
            break;
        }
    }
    out
}

/// IRQ number -> its action name in /proc/interrupts.
fn irq_names(root: &Path) -> BTreeMap<u32, String> {
    let Ok(text) = std::fs::read_to_string(root.join("proc/interrupts")) else {
        return BTreeMap::new();
    };
    text.lines()
        .filter_map(|l| {
            let (n, rest) = l.trim().split_once(':')?;
            let n = n.trim().parse().ok()?;
            Some((n, rest.split_whitespace().last()?.to_string()))
        })
        .collect()
}

/// One `key = value` of a sysctl.d file; `optional` for the `-key` form.
#[derive(Clone, Debug)]
pub struct KitSysctl {
    pub name: String,
    pub value: String,
    pub optional: bool,
}

/// Parses a sysctl.d file.
pub fn parse_sysctl_conf(text: &str) -> Vec<KitSysctl> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .filter_map(|l| {
            let (k, v) = l.split_once('=')?;
            let k = k.trim();
            let optional = k.starts_with('-');
            Some(KitSysctl {
                name: k.trim_start_matches('-').to_string(),
                value: normalise(v),
                optional,
            })
        })
        .collect()
}

/// The kit's `nofile` and `memlock` (bytes) from the limits.d file.
pub fn parse_limits(text: &str) -> (u64, u64) {
    let mut nofile = 0;
    let mut memlock_kib = 0;
    for l in text.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = l.split_whitespace().collect();
        if let [_, "soft", item, v] = f.as_slice() {
            let v: u64 = v.parse().unwrap_or(0);
            match *item {
                "nofile" => nofile = v,
                "memlock" => memlock_kib = v,
                _ => {}
            }
        }
    }
    (nofile, memlock_kib * 1024)
}

/// How a sysctl is compared.
enum Rule {
    /// Every number at least the kit's (a limit).
    AtLeast(Severity),
    /// Exactly the kit's value (a switch).
    Equal(Severity),
    /// A `low high` range at least as wide as the kit's.
    RangeWidth(Severity),
    /// `min default max` buffers: max at least the kit's; the default differing is advice.
    Buffers,
}

fn rule(name: &str) -> Rule {
    match name {
        "fs.nr_open"
        | "fs.file-max"
        | "net.core.somaxconn"
        | "net.ipv4.tcp_max_syn_backlog"
        | "net.ipv4.tcp_mem"
        | "net.netfilter.nf_conntrack_max" => Rule::AtLeast(Severity::Cap),
        "net.ipv4.ip_local_port_range" => Rule::RangeWidth(Severity::Cap),
        "net.ipv4.tcp_rmem" | "net.ipv4.tcp_wmem" => Rule::Buffers,
        "net.ipv4.tcp_syncookies"
        | "net.ipv4.tcp_slow_start_after_idle"
        | "net.ipv4.tcp_tw_reuse"
        | "net.ipv4.tcp_fin_timeout"
        | "net.ipv4.tcp_orphan_retries" => Rule::Equal(Severity::Advice),
        _ => Rule::AtLeast(Severity::Advice),
    }
}

fn numbers(v: &str) -> Vec<u64> {
    v.split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect()
}

/// What the host will run: shard count and pinning.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub shards: usize,
    pub pin: Pin,
    /// The kit file name, for the fix lines.
    pub kit_file: &'static str,
}

/// Compares the facts with the kit. Pure: no I/O.
pub fn diagnose(facts: &Facts, kit: &[KitSysctl], limits: (u64, u64), plan: &Plan) -> Vec<Finding> {
    let mut out = Vec::new();
    let install = format!(
        "install tuning/sysctl.d/{} in /etc/sysctl.d/ and run `sysctl --system`",
        plan.kit_file
    );
    for k in kit {
        let Some(live) = facts.sysctls.get(&k.name) else {
            if !k.optional {
                out.push(Finding {
                    severity: Severity::Advice,
                    what: k.name.clone(),
                    detail: format!("not present on this kernel; kit has {}", k.value),
                    fix: String::new(),
                });
            }
            continue;
        };
        let (have, want) = (numbers(live), numbers(&k.value));
        let severity = match rule(&k.name) {
            Rule::AtLeast(s) => {
                let ok = have.len() == want.len() && have.iter().zip(&want).all(|(h, w)| h >= w);
                if ok {
                    Severity::Ok
                } else {
                    s
                }
            }
            Rule::Equal(s) => {
                if have == want {
                    Severity::Ok
                } else {
                    s
                }
            }
            Rule::RangeWidth(s) => {
                let width = |v: &[u64]| match v {
                    [lo, hi] => hi.saturating_sub(*lo),
                    _ => 0,
                };
                if width(&have) >= width(&want) {
                    Severity::Ok
                } else {
                    s
                }
            }
            Rule::Buffers => match (have.as_slice(), want.as_slice()) {
                ([_, _, hmax], [_, _, wmax]) if hmax < wmax => Severity::Cap,
                _ if have == want => Severity::Ok,
                _ => Severity::Advice,
            },
        };
        out.push(Finding {
            severity,
            what: k.name.clone(),
            detail: if severity == Severity::Ok {
                live.clone()
            } else {
                format!("{live}; kit has {}", k.value)
            },
            fix: if severity == Severity::Ok {
                String::new()
            } else {
                format!(
                    "sysctl -w {}=\"{}\" (to keep it: {install})",
                    k.name, k.value
                )
            },
        });
    }

    let (nofile_kit, memlock_kit) = limits;
    match facts.nofile {
        Some(n) if n >= nofile_kit => out.push(ok("nofile (RLIMIT_NOFILE)", n.to_string())),
        Some(n) => out.push(Finding {
            severity: Severity::Cap,
            what: "nofile (RLIMIT_NOFILE)".into(),
            detail: format!("{n}: at most ~{} viewers; kit has {nofile_kit}", n.saturating_sub(100)),
            fix: format!(
                "LimitNOFILE={nofile_kit} in the unit (tuning/systemd/), or tuning/limits.d/60-barrage.conf for shells"
            ),
        }),
        None => out.push(unknown("nofile (RLIMIT_NOFILE)")),
    }

    let rings_needed = (plan.shards as u64 + 2) * URING_RING_BYTES;
    match (facts.memlock_unlimited, facts.memlock_bytes) {
        (true, _) => out.push(ok("memlock (RLIMIT_MEMLOCK)", "unlimited".into())),
        (false, Some(b)) if b >= memlock_kit => {
            out.push(ok("memlock (RLIMIT_MEMLOCK)", b.to_string()))
        }
        (false, Some(b)) => out.push(Finding {
            severity: if b < rings_needed {
                Severity::Cap
            } else {
                Severity::Advice
            },
            what: "memlock (RLIMIT_MEMLOCK)".into(),
            detail: format!(
                "{b} bytes; {} shards' io_uring rings need ~{rings_needed}, kit has {memlock_kit}",
                plan.shards
            ),
            fix: "LimitMEMLOCK=64M in the unit, or tuning/limits.d/60-barrage.conf for shells"
                .into(),
        }),
        (false, None) => out.push(unknown("memlock (RLIMIT_MEMLOCK)")),
    }

    let uring = match (facts.io_uring_disabled, facts.io_uring_works) {
        (Some(d), _) if d != 0 => Finding {
            severity: Severity::Cap,
            what: "io_uring".into(),
            detail: format!("kernel.io_uring_disabled = {d}: the edge runs on epoll"),
            fix: "sysctl -w kernel.io_uring_disabled=0 (outside containers; Docker's default seccomp profile blocks io_uring regardless)".into(),
        },
        (_, Some(false)) => Finding {
            severity: Severity::Cap,
            what: "io_uring".into(),
            detail: "cannot create a ring here (seccomp, container or kernel): the edge runs on epoll".into(),
            fix: "run the edge on the host under tuning/systemd/barrage-edge.service, or allow io_uring_setup/enter/register in the seccomp profile".into(),
        },
        (_, Some(true)) => ok("io_uring", "available".into()),
        (Some(0), None) => ok("io_uring", "kernel.io_uring_disabled = 0".into()),
        _ => unknown("io_uring"),
    };
    out.push(uring);

    let ncpus = facts.cpus.len();
    if ncpus == 0 {
        out.push(unknown("CPUs"));
    } else {
        let usable = match plan.pin {
            Pin::Cpus(set) => set.iter().filter(|c| facts.cpus.contains(*c)).count(),
            _ => ncpus,
        };
        if let Pin::Cpus(set) = plan.pin {
            let offline: Vec<String> = set
                .iter()
                .filter(|c| !facts.cpus.contains(*c))
                .map(|c| c.to_string())
                .collect();
            if !offline.is_empty() {
                out.push(Finding {
                    severity: Severity::Cap,
                    what: "pin".into(),
                    detail: format!(
                        "CPUs {} are not online (online: {})",
                        offline.join(","),
                        facts.cpus
                    ),
                    fix: format!("list only online CPUs in `pin` (online: {})", facts.cpus),
                });
            }
        }
        out.push(if plan.shards > usable {
            Finding {
                severity: Severity::Cap,
                what: "shards vs CPUs".into(),
                detail: format!(
                    "{} shards on {usable} CPUs: shards share cores",
                    plan.shards
                ),
                fix: format!("shards = {usable} (or 0: one per core), or list more CPUs in `pin`"),
            }
        } else {
            ok(
                "shards vs CPUs",
                format!("{} shards, {usable} CPUs for them", plan.shards),
            )
        });

        let shard_cpus = plan.pin.cpus_used(plan.shards, ncpus);
        for (irq, (name, aff)) in &facts.nic_irqs {
            let shared: Vec<String> = aff
                .iter()
                .filter(|c| shard_cpus.contains(*c))
                .map(|c| c.to_string())
                .collect();
            let all_shared = aff.iter().all(|c| shard_cpus.contains(c));
            if shard_cpus.is_empty() || !all_shared {
                out.push(ok(&format!("IRQ {irq} ({name})"), format!("CPUs {aff}")));
                continue;
            }
            let free: Vec<String> = facts
                .cpus
                .iter()
                .filter(|c| !shard_cpus.contains(*c))
                .map(|c| c.to_string())
                .collect();
            out.push(Finding {
                severity: Severity::Advice,
                what: format!("IRQ {irq} ({name})"),
                detail: format!("runs on CPUs {aff}, all pinned to shards ({})", shared.join(",")),
                fix: if free.is_empty() {
                    format!(
                        "leave a CPU to the NIC: pin = \"{}\" in the edge config, then echo {} > /proc/irq/{irq}/smp_affinity_list",
                        rest_of(&facts.cpus),
                        facts.cpus.iter().next().unwrap_or(0)
                    )
                } else {
                    format!("echo {} > /proc/irq/{irq}/smp_affinity_list", free.join(","))
                },
            });
        }
    }
    out
}

/// Every online CPU but the first, in list form (a suggestion for `pin`).
fn rest_of(cpus: &CpuSet) -> String {
    let mut rest = CpuSet::EMPTY;
    for c in cpus.iter().skip(1) {
        rest.insert(c);
    }
    rest.to_string()
}

fn ok(what: &str, detail: String) -> Finding {
    Finding {
        severity: Severity::Ok,
        what: what.to_string(),
        detail,
        fix: String::new(),
    }
}

fn unknown(what: &str) -> Finding {
    Finding {
        severity: Severity::Advice,
        what: what.to_string(),
        detail: "could not be read".into(),
        fix: String::new(),
    }
}

/// The report, one finding per line and its fix below it.
pub fn render(findings: &[Finding]) -> String {
    let mut out = String::new();
    for f in findings {
        let tag = match f.severity {
            Severity::Ok => "ok    ",
            Severity::Advice => "advice",
            Severity::Cap => "CAP   ",
        };
        out.push_str(&format!("{tag} {}: {}\n", f.what, f.detail));
        if !f.fix.is_empty() {
            out.push_str(&format!("       fix: {}\n", f.fix));
        }
    }
    let caps = findings
        .iter()
        .filter(|f| f.severity == Severity::Cap)
        .count();
    let advice = findings
        .iter()
        .filter(|f| f.severity == Severity::Advice)
        .count();
    out.push_str(&format!(
        "{caps} capacity cap(s), {advice} advice; {}\n",
        if caps == 0 {
            "this host passes"
        } else {
            "fix the CAP lines first"
        }
    ));
    out
}

pub fn run(args: DoctorArgs) -> anyhow::Result<Exit> {
    let (text, kit_file) = match args.role {
        KitRole::Edge => (EDGE_SYSCTL, "60-barrage-edge.conf"),
        KitRole::Loadtest => (LOADTEST_SYSCTL, "60-barrage-loadtest.conf"),
    };
    let kit = parse_sysctl_conf(text);
    let config = match &args.config {
        Some(p) => net::config::load::<edge::Config>(&net::config::Sources::process(Some(p), &[]))?,
        None => edge::Config::default(),
    };
    let plan = Plan {
        shards: config.shard_count(),
        pin: config.pin,
        kit_file,
    };
    let names: Vec<String> = kit.iter().map(|k| k.name.clone()).collect();
    let facts = Facts::read(&args.root, args.pid, &names);
    let findings = diagnose(&facts, &kit, parse_limits(LIMITS), &plan);
    print!("{}", render(&findings));
    Ok(if findings.iter().any(|f| f.severity == Severity::Cap) {
        Exit::Failure
    } else {
        Exit::Ok
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake host: `files` are written under a fresh directory.
    fn fake_root(name: &str, files: &[(&str, &str)]) -> PathBuf {
        let root =
            std::env::temp_dir().join(format!("barrage-doctor-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (path, text) in files {
            let p = root.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        root
    }

    /// Every sysctl of the edge kit at the kit's value.
    fn tuned_sysctls() -> Vec<(String, String)> {
        parse_sysctl_conf(EDGE_SYSCTL)
            .into_iter()
            .map(|k| {
                (
                    format!("proc/sys/{}", k.name.replace('.', "/")),
                    format!("{}\n", k.value.replace(' ', "\t")),
                )
            })
            .collect()
    }

    const LIMITS_OK: &str =
        "Limit                     Soft Limit           Hard Limit           Units\n\
        Max open files            1048576              1048576              files\n\
        Max locked memory         67108864             67108864             bytes\n";

    fn check(root: &Path, shards: usize, pin: Pin) -> Vec<Finding> {
        let kit = parse_sysctl_conf(EDGE_SYSCTL);
        let names: Vec<String> = kit.iter().map(|k| k.name.clone()).collect();
        let facts = Facts::read(root, None, &names);
        diagnose(
            &facts,
            &kit,
            parse_limits(LIMITS),
            &Plan {
                shards,
                pin,
                kit_file: "60-barrage-edge.conf",
            },
        )
    }

    fn caps(f: &[Finding]) -> Vec<&str> {
        f.iter()
            .filter(|f| f.severity == Severity::Cap)
            .map(|f| f.what.as_str())
            .collect()
    }

    #[test]
    fn a_tuned_host_passes_and_an_untuned_one_is_told_why() {
        let mut files: Vec<(String, String)> = tuned_sysctls();
        files.push(("proc/self/limits".into(), LIMITS_OK.into()));
        files.push(("proc/sys/kernel/io_uring_disabled".into(), "0\n".into()));
        files.push(("sys/devices/system/cpu/online".into(), "0-3\n".into()));
        // A NIC whose two queues interrupt CPU 0, and virtio's config IRQ (ignored).
        files.push((
            "sys/class/net/eth0/device/msi_irqs/40".into(),
            String::new(),
        ));
        files.push((
            "sys/class/net/eth0/device/msi_irqs/41".into(),
            String::new(),
        ));
        files.push((
            "sys/class/net/eth0/device/msi_irqs/39".into(),
            String::new(),
        ));
        files.push(("proc/irq/40/smp_affinity_list".into(), "0\n".into()));
        files.push(("proc/irq/41/smp_affinity_list".into(), "0\n".into()));
        files.push(("proc/irq/39/smp_affinity_list".into(), "0-3\n".into()));
        files.push((
            "proc/interrupts".into(),
            " 39: 0 0 PCI-MSIX 0-edge virtio2-config\n 40: 5 0 PCI-MSIX 1-edge virtio2-input.0\n 41: 5 0 PCI-MSIX 2-edge virtio2-output.0\n".into(),
        ));
        files.push(("sys/class/net/lo/device/msi_irqs/1".into(), String::new()));
        let refs: Vec<(&str, &str)> = files
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        let root = fake_root("tuned", &refs);

        // Shards pinned to 1-3 leave CPU 0 to the NIC: everything passes.
        let pin = Pin::Cpus(CpuSet::parse_list("1-3").unwrap());
        let f = check(&root, 3, pin);
        assert!(caps(&f).is_empty(), "{}", render(&f));
        assert!(
            f.iter().all(|f| f.severity == Severity::Ok),
            "{}",
            render(&f)
        );
        assert!(f
            .iter()
            .any(|f| f.what.contains("IRQ 40") && f.what.contains("virtio2-input.0")));
        assert!(
            !f.iter().any(|f| f.what.contains("IRQ 39")),
            "config IRQ is not a NIC queue"
        );
        assert!(render(&f).ends_with("this host passes\n"));

        // Pinned to every core: the NIC's CPU is a shard's too (advice, with the fix).
        let f = check(&root, 4, Pin::Cores);
        let irq = f.iter().find(|f| f.what.starts_with("IRQ 40")).unwrap();
        assert_eq!(irq.severity, Severity::Advice);
        assert!(irq.fix.contains("pin = \"1-3\""), "{}", irq.fix);
        assert!(caps(&f).is_empty());

        // More shards than CPUs, a CPU that is not there: capacity caps.
        let f = check(&root, 8, Pin::Cores);
        assert_eq!(caps(&f), vec!["shards vs CPUs"]);
        let f = check(&root, 2, Pin::Cpus(CpuSet::parse_list("6-7").unwrap()));
        assert!(caps(&f).contains(&"pin"), "{}", render(&f));
    }

    #[test]
    fn limits_below_the_kit_cap_capacity_with_a_fix() {
        let mut files: Vec<(String, String)> = tuned_sysctls();
        // Stock values for three of them.
        files.retain(|(p, _)| !p.ends_with("somaxconn") && !p.ends_with("nr_open"));
        files.push(("proc/sys/net/core/somaxconn".into(), "4096\n".into()));
        files.push(("proc/sys/fs/nr_open".into(), "1048576\n".into()));
        files.retain(|(p, _)| !p.ends_with("tcp_rmem") && !p.ends_with("nf_conntrack_max"));
        files.push((
            "proc/sys/net/ipv4/tcp_rmem".into(),
            "4096\t131072\t6291456\n".into(),
        ));
        files.push((
            "proc/self/limits".into(),
            "Max open files            20000                20000                files\n\
             Max locked memory         65536                65536                bytes\n"
                .into(),
        ));
        files.push(("proc/sys/kernel/io_uring_disabled".into(), "2\n".into()));
        files.push(("sys/devices/system/cpu/online".into(), "0-1\n".into()));
        let refs: Vec<(&str, &str)> = files
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        let root = fake_root("stock", &refs);
        let f = check(&root, 2, Pin::Cores);
        let mut c = caps(&f);
        c.sort();
        assert_eq!(
            c,
            vec![
                "fs.nr_open",
                "io_uring",
                "memlock (RLIMIT_MEMLOCK)",
                "net.core.somaxconn",
                "nofile (RLIMIT_NOFILE)"
            ],
            "{}",
            render(&f)
        );
        let somax = f.iter().find(|f| f.what == "net.core.somaxconn").unwrap();
        assert_eq!(
            somax.fix.split(" (").next().unwrap(),
            "sysctl -w net.core.somaxconn=\"65535\""
        );
        // A bigger default receive buffer costs memory, caps nothing: advice.
        let rmem = f.iter().find(|f| f.what == "net.ipv4.tcp_rmem").unwrap();
        assert_eq!(rmem.severity, Severity::Advice);
        // nf_conntrack_max is optional ('-' in the kit): absent is fine.
        assert!(!f.iter().any(|f| f.what == "net.netfilter.nf_conntrack_max"));
        assert!(render(&f).contains("fix the CAP lines first"));
    }

    #[test]
    fn the_real_host_is_read_without_crashing() {
        let f = check(Path::new("/"), 2, Pin::Cores);
        assert!(f.iter().any(|f| f.what == "net.core.somaxconn"));
        assert!(f
            .iter()
            .any(|f| f.what == "nofile (RLIMIT_NOFILE)" && f.detail != "could not be read"));
        assert!(!render(&f).is_empty());
    }
}
