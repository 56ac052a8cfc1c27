//! `barrage cluster` driven from a test: the process, its JSON line, signals to its children.

use super::{API_KEY, KEYS_V1, WAIT};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Sends `sig` to process `pid` (a child of this test or of the cluster it started).
pub fn signal(pid: u64, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// `barrage cluster --json` as a child; SIGTERM on drop (it stops its own children).
pub struct ClusterProc(pub Child);

impl Drop for ClusterProc {
    fn drop(&mut self) {
        signal(u64::from(self.0.id()), libc::SIGTERM);
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline && matches!(self.0.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `barrage cluster <args> --json` with the tests' API key and token secret, and
/// returns it with the one JSON line it prints once every process is healthy.
pub fn start_cluster(args: &[&str]) -> (ClusterProc, serde_json::Value) {
    start_cluster_via(Command::new(env!("CARGO_BIN_EXE_barrage")), args)
}

/// `start_cluster` through `cmd`, a command that runs the barrage binary (itself, or e.g.
/// `ip netns exec <ns> <binary>`); `RUST_LOG` is `warn` unless `cmd` sets it.
pub fn start_cluster_via(mut cmd: Command, args: &[&str]) -> (ClusterProc, serde_json::Value) {
    if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
        cmd.env("RUST_LOG", "warn");
    }
    let mut child = cmd
        .arg("cluster")
        .args(args)
        .args(["--json", "--api-key", API_KEY, "--token-secret", KEYS_V1])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("barrage cluster starts");
    let stdout = child.stdout.take().unwrap();
    let cluster = ClusterProc(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(90))
        .expect("barrage cluster printed its endpoints");
    (cluster, serde_json::from_str(&line).expect("one JSON line"))
}

/// An address of the JSON line (`"host:port"` or `"http://host:port"`).
pub fn addr_of(v: &serde_json::Value) -> SocketAddr {
    v.as_str()
        .expect("address string")
        .trim_start_matches("http://")
        .parse()
        .expect("socket address")
}

/// The body and head of `GET path` as text. HTTP/1.0: no chunked answer (the NATS monitor
/// chunks under 1.1).
pub fn get_text(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// A fresh directory under the system's temp dir, removed (with what is in it) on drop, also
/// when the test fails.
pub struct Scratch(std::path::PathBuf);

impl std::ops::Deref for Scratch {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `barrage-<name>-<pid>` under the temp dir, created empty.
pub fn scratch(name: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("barrage-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    Scratch(dir)
}

/// Whether nats-server is installed; when it is not, a test skips (says so), unless
/// `BARRAGE_REQUIRE_NATS` is set (the README's test command), where it fails.
pub fn nats_installed() -> bool {
    let found = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .iter()
        .any(|p| std::path::Path::new(p).exists())
        || Command::new("nats-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok();
    assert!(
        found || std::env::var_os("BARRAGE_REQUIRE_NATS").is_none(),
        "nats-server required but not installed"
    );
    if !found {
        eprintln!("nats-server not installed; skipping");
    }
    found
}
