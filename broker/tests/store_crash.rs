//! The high-reach log survives SIGKILL mid-append: a real child process appends and commits in
//! groups, printing each group once its commit returned; the parent kills it with SIGKILL at a
//! different point each round, reopens the log, and checks that every reported append is
//! there (and every reported ACK took effect), and that nothing reloaded is torn.
//!
//! The child is this same test binary running `child_appends_until_killed` (ignored unless
//! the parent starts it with the directory in `BARRAGE_STORE_CRASH_DIR`).

use broker::reach::Target;
use broker::store::{Accept, Limits, Store};
use bytes::Bytes;
use proto::id::{MsgId, UserId};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "BARRAGE_STORE_CRASH_DIR";
/// The child stops by itself after this long if nobody kills it.
const CHILD_MS_MAX: u64 = 20_000;

/// Every 8th message stays live; the others are ACKed in the same group as they are accepted.
fn stays_live(m: u64) -> bool {
    m.is_multiple_of(8)
}

fn body(m: u64) -> Bytes {
    let pad = m % 97;
    Bytes::from(format!(
        "{{\"msg_id\":\"{m}\",\"pad\":\"{}\"}}",
        "x".repeat(pad as usize)
    ))
}

fn limits() -> Limits {
    // Small enough that the child compacts several times per round.
    Limits {
        compact_bytes_min: 64 * 1024,
        ..Limits::default()
    }
}

#[test]
#[ignore = "the child half of store_survives_sigkill_mid_append, started by it"]
fn child_appends_until_killed() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let (mut s, r) = Store::open(dir.as_ref(), limits(), 0).unwrap();
    let mut next = r.msg_id_max.map_or(1, |m| m.0 + 1);
    let start = Instant::now();
    let mut out = std::io::stdout().lock();
    while start.elapsed() < Duration::from_millis(CHILD_MS_MAX) {
        let first = next;
        let group = 1 + next % 29;
        for m in first..first + group {
            s.append_accept(Accept {
                msg: MsgId(m),
                target: Target::User(UserId(m % 1000 + 1)),
                expires_at_ms: u64::MAX,
                body: body(m),
            })
            .unwrap();
            if !stays_live(m) {
                s.append_acked(MsgId(m));
            }
        }
        s.commit(0).unwrap();
        next = first + group;
        writeln!(out, "durable {first} {}", next - 1).unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn store_survives_sigkill_mid_append() {
    let dir = std::env::temp_dir().join(format!("barrage-store-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let exe = std::env::current_exe().unwrap();
    // m -> live? for every message whose fate is known.
    let mut known: BTreeMap<u64, bool> = BTreeMap::new();
    let mut total_torn = 0;
    for (round, kill_after) in [37usize, 211, 401].into_iter().enumerate() {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "child_appends_until_killed",
                "--ignored",
                "--nocapture",
            ])
            .args(["--test-threads", "1"])
            .env(CHILD_ENV, &dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut reports = 0;
        let mut durable_max = 0;
        while reports < kill_after {
            let line = rx
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("round {round}: child went quiet: {e}"));
            let Some(rest) = line.strip_prefix("durable ") else {
                continue; // the test harness's own lines
            };
            let (a, b) = rest.split_once(' ').unwrap();
            let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
            for m in a..=b {
                known.insert(m, stays_live(m));
            }
            durable_max = b;
            reports += 1;
        }
        child.kill().unwrap(); // SIGKILL, wherever the child is
        child.wait().unwrap();
        drop(rx);
        reader.join().unwrap();

        let (_, r) = Store::open(&dir, limits(), 0).unwrap();
        total_torn += r.torn_bytes;
        let live: BTreeMap<u64, &Accept> = r.live.iter().map(|a| (a.msg.0, a)).collect();
        for a in &r.live {
            let m = a.msg.0;
            assert_eq!(a.body, body(m), "round {round}: msg {m} reloaded torn");
            assert_eq!(a.target, Target::User(UserId(m % 1000 + 1)));
        }
        for (&m, &want) in &known {
            assert_eq!(
                live.contains_key(&m),
                want,
                "round {round}: msg {m} (durable up to {durable_max})"
            );
        }
        // Appends after the last report may or may not have landed; whichever it is, it must
        // stay that way in later rounds.
        let seen_max = r.msg_id_max.map_or(0, |m| m.0);
        for m in durable_max + 1..=seen_max {
            known.entry(m).or_insert(live.contains_key(&m));
        }
        assert!(durable_max > 0);
    }
    eprintln!("torn bytes cut over 3 rounds: {total_torn}");
    std::fs::remove_dir_all(&dir).unwrap();
}
