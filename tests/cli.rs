//! The `barrage` binary as an operator and a script meet it: exit codes, errors said once,
//! `config` and `doctor`, and a port another process holds. Real processes, loopback only.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

fn barrage() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_barrage"));
    c.env("RUST_LOG", "warn");
    // The tests' own environment must not configure the processes they start.
    for (k, _) in std::env::vars() {
        if k.starts_with("BARRAGE_") {
            c.env_remove(k);
        }
    }
    c
}

fn run(c: &mut Command) -> (i32, String, String) {
    let out = c.output().expect("run barrage");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_defaults_and_check() {
    let (code, out, _) = run(barrage().args(["config", "defaults", "edge"]));
    assert_eq!(code, 0);
    assert!(
        out.contains("# env: BARRAGE_EDGE_SHARDS\nshards = "),
        "{out}"
    );
    let dir = std::env::temp_dir().join(format!("barrage-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("edge.toml");
    std::fs::write(&good, &out).unwrap();
    let (code, out, err) = run(barrage().args(["config", "check", "edge"]).arg(&good));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("ok: "), "{out}");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "shards = 1\nstuck_ms_maxx = 5\n").unwrap();
    let (code, _, err) = run(barrage().args(["config", "check", "edge"]).arg(&bad));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("stuck_ms_maxx"), "{err}");
    // A role that starts with a bad config is a usage error too, and says which layer.
    let (code, _, err) = run(barrage()
        .args(["broker", "--set", "brotli_quality=99"])
        .env("BARRAGE_BROKER_SHARDS", "1"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("brotli_quality"), "{err}");
    let (code, _, err) = run(barrage().args(["edge"]).env("BARRAGE_EDGE_SHARDS", "lots"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("BARRAGE_EDGE_SHARDS"), "{err}");
    // Usage errors from clap are 2 as well.
    let (code, _, _) = run(barrage().args(["push", "--no-such-flag"]));
    assert_eq!(code, 2);
}

#[test]
fn doctor_reads_this_host() {
    let (code, out, err) = run(barrage()
        .args(["doctor", "--config"])
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/edge.toml")));
    // This box's limits are not the kit's: 0 or 1 are both honest answers; a crash is not.
    assert!(code == 0 || code == 1, "exit {code}: {err}");
    assert!(out.contains("net.core.somaxconn"), "{out}");
    assert!(out.contains("capacity cap(s)"), "{out}");
    assert_eq!(code == 1, out.contains("\nCAP "), "{out}");
}

#[test]
fn push_exit_codes_and_errors_said_once() {
    // Nothing listens on a port we just closed: unreachable.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (code, _, err) = run(barrage().args([
        "push",
        "--ingest",
        &format!("127.0.0.1:{port}"),
        "--api-key",
        "k",
        "--room",
        "1",
        "{}",
    ]));
    assert_eq!(code, 5, "{err}");

    let stack = common::Stack::start(common::KEYS_V1, common::KEYS_V1);
    let ingest = stack.ingest_addr().to_string();
    let push = |key: &str| {
        run(barrage()
            .args(["push", "--ingest", &ingest, "--api-key", key, "--room", "1"])
            .arg(r#"{"cmd":"DANMU_MSG"}"#))
    };
    let (code, _, err) = push("wrong-key");
    assert_eq!(code, 3, "{err}");
    assert_eq!(err.matches("unauthorized").count(), 1, "{err}");
    let (code, out, err) = push(common::API_KEY);
    assert_eq!(code, 0, "{err}");
    assert!(out.trim().parse::<u64>().is_ok(), "{out}");
}

#[test]
fn a_port_another_process_holds_is_refused_unless_shared_on_purpose() {
    // Another process holds the port with SO_REUSEPORT, as a running edge does.
    let holder = net::sys::listener("127.0.0.1:0".parse().unwrap(), true, 16).unwrap();
    let addr = holder.local_addr().unwrap();
    let edge = |shared: bool| {
        let mut c = barrage();
        c.args(["edge", "--set", "shards=1", "--set", "pin=false"])
            .args(["--set", &format!("tcp_addr=\"{addr}\"")])
            .args([
                "--set",
                "ws_addr=\"127.0.0.1:0\"",
                "--set",
                "admin_addr=\"127.0.0.1:0\"",
            ])
            .args(["--set", &format!("reuse_port_across_processes={shared}")]);
        c
    };
    let (code, _, err) = run(&mut edge(false));
    assert_ne!(code, 0);
    assert!(err.contains("address in use"), "{err}");

    // On purpose (a restart): it starts and serves next to the holder.
    let mut child = edge(true)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let deadline = Instant::now() + common::WAIT;
    let line = rx
        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        .unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.starts_with(&format!("edge: tcp {addr}")), "{line:?}");
    drop(holder);
}

/// Starts `barrage edge` on loopback ports 0 and returns it with its TCP address.
fn start_edge(
    extra: &[&str],
) -> (
    std::process::Child,
    std::net::SocketAddr,
    std::sync::mpsc::Receiver<String>,
) {
    let mut child = barrage()
        .args(["edge", "--set", "shards=1", "--set", "pin=false"])
        .args([
            "--set",
            "tcp_addr=\"127.0.0.1:0\"",
            "--set",
            "ws_addr=\"127.0.0.1:0\"",
        ])
        .args(["--set", "admin_addr=\"127.0.0.1:0\""])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let tcp = line
        .strip_prefix("edge: tcp ")
        .and_then(|r| r.split(',').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("banner {line:?}"));
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    (child, tcp, rx)
}

fn signal(child: &std::process::Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// Waits for the child to exit, killing it past `within`; returns whether it exited by itself.
fn exits_within(child: &mut std::process::Child, within: std::time::Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s.code().unwrap_or(-1));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

fn wait_line(rx: &std::sync::mpsc::Receiver<String>, needle: &str) -> bool {
    let deadline = Instant::now() + common::WAIT;
    while let Ok(l) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        if l.contains(needle) {
            return true;
        }
    }
    false
}

#[test]
fn sigterm_drains_and_a_second_signal_stops_at_once() {
    use std::time::Duration;
    // Nothing connected: the drain ends at once and the edge exits 0.
    let (mut child, _, rx) = start_edge(&[]);
    signal(&child, "-TERM");
    assert_eq!(exits_within(&mut child, Duration::from_secs(10)), Some(0));
    assert!(wait_line(&rx, "drained"));

    // Viewers held open (a long auth window) and a slow close rate: the drain closes them one per
    // second, so three take seconds; a second signal stops it at once.
    let (mut child, tcp, rx) =
        start_edge(&["--set", "auth_ms_max=60000", "--set", "drain_close_per_s=1"]);
    let viewers: Vec<_> = (0..3)
        .map(|_| std::net::TcpStream::connect(tcp).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    signal(&child, "-TERM");
    assert!(wait_line(&rx, "draining 3 connections"));
    assert!(child.try_wait().unwrap().is_none(), "still draining");
    signal(&child, "-INT");
    assert_eq!(exits_within(&mut child, Duration::from_secs(5)), Some(0));
    assert!(wait_line(&rx, "again: stopping now"));
    drop(viewers);
}
