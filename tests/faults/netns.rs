//! A network namespace the test creates and removes: a veth pair from the host to it, an
//! address on each end, and nftables rules inside it (dropped with it).
//!
//! Creating one needs root (CAP_NET_ADMIN) and `ip`/`nft`. Without them a test skips with a
//! line on stderr, unless `BARRAGE_REQUIRE_NETNS=1` (set by scripts/test.sh: CI runs as root)
//! makes it fail instead.
#![allow(dead_code)]

use crate::common::Env;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// One namespace: `ns_ip` inside, `host_ip` on the host's end of the veth pair (a /30).
pub struct Netns {
    pub name: String,
    pub host_ip: String,
    pub ns_ip: String,
    veth: String,
}

/// Runs a command, returning its stderr on failure.
fn run(args: &[&str], stdin: Option<&str>) -> Result<(), String> {
    use std::io::Write;
    let mut cmd = Command::new(args[0]);
    cmd.args(&args[1..])
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("{}: {e}", args[0]))?;
    if let Some(text) = stdin {
        let mut w = child.stdin.take().expect("stdin");
        w.write_all(text.as_bytes()).map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    /// A fresh namespace, or `None` (after saying why) when this machine cannot make one and
    /// `BARRAGE_REQUIRE_NETNS` is not set.
    pub fn create() -> Option<Netns> {
        match Netns::try_create() {
            Ok(n) => Some(n),
            Err(e) if std::env::var_os("BARRAGE_REQUIRE_NETNS").is_some() => {
                panic!("BARRAGE_REQUIRE_NETNS is set but no network namespace: {e}")
            }
            Err(e) => {
                eprintln!("skipped: no network namespace ({e}); run as root with ip and nft");
                None
            }
        }
    }

    fn try_create() -> Result<Netns, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id();
        // Subnets 10.(200+pid%50).(4k).0/30: distinct per test in this process, and unlikely
        // to meet another test process's (a clash fails `ip addr add`; the next one is tried).
        let mut last = String::new();
        for _ in 0..8 {
            let k = N.fetch_add(1, Ordering::Relaxed);
            let tag = format!("{}{k}", pid % 100_000);
            let name = format!("barrage-f{tag}");
            let veth = format!("bfh{tag}");
            let peer = format!("bfn{tag}");
            let (a, b) = (200 + pid % 50, (k * 4) % 256);
            let host_ip = format!("10.{a}.{b}.1");
            let ns_ip = format!("10.{a}.{b}.2");
            run(&["ip", "netns", "add", &name], None)?;
            let ns = Netns {
                name: name.clone(),
                host_ip: host_ip.clone(),
                ns_ip: ns_ip.clone(),
                veth: veth.clone(),
            };
            let setup = [
                vec![
                    "ip", "link", "add", &veth, "type", "veth", "peer", "name", &peer, "netns",
                    &name,
                ],
                vec!["ip", "addr", "add", &format!("{host_ip}/30"), "dev", &veth],
                vec!["ip", "link", "set", &veth, "up"],
                vec![
                    "ip",
                    "-n",
                    &name,
                    "addr",
                    "add",
                    &format!("{ns_ip}/30"),
                    "dev",
                    &peer,
                ],
                vec!["ip", "-n", &name, "link", "set", &peer, "up"],
                vec!["ip", "-n", &name, "link", "set", "lo", "up"],
            ]
            .iter()
            .try_for_each(|args| {
                let owned: Vec<&str> = args.iter().map(|s| s.as_ref()).collect();
                run(&owned, None)
            });
            match setup {
                Ok(()) => return Ok(ns),
                // `ns` is dropped here: namespace and veth removed.
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// How to start a role inside this namespace.
    pub fn env(&self) -> Env {
        Env {
            netns: Some(self.name.clone()),
            nofile: None,
            state_home: None,
        }
    }

    /// Loads an nftables script inside the namespace.
    pub fn nft(&self, script: &str) {
        run(
            &["ip", "netns", "exec", &self.name, "nft", "-f", "-"],
            Some(script),
        )
        .unwrap_or_else(|e| panic!("nft: {e}"));
    }

    /// Drops every TCP segment to or from `port` (both ways, as seen from inside): a partition
    /// of the link to a broker on that port. Silent: no RST, no ICMP.
    pub fn partition(&self, port: u16) {
        self.drop_percent(port, 100);
    }

    /// Drops `percent` of the TCP segments to or from `port`, at random (nft numgen).
    pub fn drop_percent(&self, port: u16, percent: u32) {
        let rule = if percent >= 100 {
            String::new()
        } else {
            format!("numgen random mod 100 < {percent} ")
        };
        self.heal();
        self.nft(&format!(
            "table inet barrage_fault {{\n\
             chain out {{ type filter hook output priority 0; policy accept; tcp dport {port} {rule}drop; }}\n\
             chain in {{ type filter hook input priority 0; policy accept; tcp sport {port} {rule}drop; }}\n\
             }}\n"
        ));
    }

    /// Removes the fault rules.
    pub fn heal(&self) {
        let _ = run(
            &[
                "ip",
                "netns",
                "exec",
                &self.name,
                "nft",
                "delete",
                "table",
                "inet",
                "barrage_fault",
            ],
            None,
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the veth pair (and with it ours) and its
        // nftables tables; the explicit link delete covers a half-made pair.
        let _ = run(&["ip", "netns", "del", &self.name], None);
        let _ = run(&["ip", "link", "del", &self.veth], None);
    }
}
