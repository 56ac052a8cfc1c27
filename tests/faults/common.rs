//! Child processes and clients shared by the fault tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_barrage");
/// Every wait in these tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(20);
/// A strong secret (64 hex chars), as `barrage up` would make.
pub const STRONG: &str = "6f1d2c3b4a5968778695a4b3c2d1e0f0112233445566778899aabbccddeeff00";

/// One role as a child process, killed and reaped on drop.
pub struct Role {
    pub child: Child,
    /// The addresses it printed (in order of appearance on its first line).
    pub addrs: Vec<SocketAddr>,
    pub stderr: Receiver<String>,
    _config: TempFile,
}

/// A config file removed on drop.
pub struct TempFile(pub std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub fn temp_file(name: &str, text: &str) -> TempFile {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "barrage-faults-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, text).expect("write config");
    TempFile(path)
}

fn lines(r: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Every `IP:PORT` in a line (after `http://` too).
fn addrs_in(line: &str) -> Vec<SocketAddr> {
    line.split([' ', ',', '/'])
        .filter_map(|t| t.parse().ok())
        .collect()
}

/// What a started role process did.
pub enum Started {
    Up(Role),
    /// It exited before listening: its status and stderr.
    Exited(std::process::ExitStatus, String),
}

/// Starts `barrage <role> --config <toml>` and waits for its address line (or its exit).
pub fn start(role: &str, toml: &str) -> Started {
    start_in(role, toml, &Env::default())
}

/// Where and how a role process runs: in a network namespace the test made, under a small
/// fd limit. Both are applied in the child between fork and exec, so the pid is barrage's own
/// (SIGSTOP, kill -9 and /proc reach it, not a wrapper).
#[derive(Clone, Default)]
pub struct Env {
    /// `/var/run/netns/<name>`, entered with setns(2).
    pub netns: Option<String>,
    /// RLIMIT_NOFILE, soft and hard.
    pub nofile: Option<u64>,
    /// The state directory's parent (`XDG_STATE_HOME`): the broker's default `data_dir` goes
    /// under it. `None`: [`state_home`], one per test process, never the user's own.
    pub state_home: Option<std::path::PathBuf>,
}

/// The default `XDG_STATE_HOME` of the roles this test process starts (under the temporary
/// directory, so no test writes to the user's `~/.local/state`).
pub fn state_home() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("barrage-faults-state-{}", std::process::id()))
}

/// Starts a role under `env` (see [`start`]).
pub fn start_in(role: &str, toml: &str, env: &Env) -> Started {
    use std::os::unix::process::CommandExt;
    let config = temp_file(&format!("{role}.toml"), toml);
    let mut cmd = Command::new(BIN);
    cmd.args([role, "--config"])
        .arg(&config.0)
        .env("RUST_LOG", "warn")
        .env(
            "XDG_STATE_HOME",
            env.state_home.clone().unwrap_or_else(state_home),
        )
        .env_remove("STATE_DIRECTORY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let netns = env.netns.as_ref().map(|n| {
        let path = format!("/var/run/netns/{n}");
        std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    });
    let nofile = env.nofile;
    // SAFETY: only async-signal-safe calls (setns, setrlimit) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            use std::os::fd::AsRawFd;
            if let Some(f) = &netns {
                if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(n) = nofile {
                let lim = libc::rlimit {
                    rlim_cur: n,
                    rlim_max: n,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn barrage");
    let out = lines(child.stdout.take().expect("stdout"));
    let err = lines(child.stderr.take().expect("stderr"));
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(line) = out.recv_timeout(Duration::from_millis(50)) {
            let addrs = addrs_in(&line);
            if !addrs.is_empty() {
                return Started::Up(Role {
                    child,
                    addrs,
                    stderr: err,
                    _config: config,
                });
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            std::thread::sleep(Duration::from_millis(100));
            let text: Vec<String> = err.try_iter().collect();
            return Started::Exited(status, text.join("\n"));
        }
        assert!(
            Instant::now() < deadline,
            "{role} neither listened nor exited"
        );
    }
}

pub fn start_ok(role: &str, toml: &str) -> Role {
    start_ok_in(role, toml, &Env::default())
}

pub fn start_ok_in(role: &str, toml: &str, env: &Env) -> Role {
    match start_in(role, toml, env) {
        Started::Up(r) => r,
        Started::Exited(s, err) => panic!("{role} exited ({s}): {err}"),
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP connection from `local` (a 127.0.0.x address) to `to`.
pub fn connect_from(local: [u8; 4], to: SocketAddr) -> TcpStream {
    let s =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    s.bind(&SocketAddr::from((local, 0)).into()).expect("bind");
    s.connect_timeout(&to.into(), Duration::from_secs(5))
        .expect("connect");
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s
}

/// Reads one HTTP response head and its Content-Length body; `None` if the peer closed first
/// (or nothing came within the read timeout).
pub fn read_response(s: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            _ => return None,
        }
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0);
    let mut body = vec![0; len];
    s.read_exact(&mut body).ok()?;
    Some((head, body))
}

/// Sends a whole request from `local` and reads the answer.
pub fn request_from(local: [u8; 4], to: SocketAddr, req: &str) -> Option<(String, Vec<u8>)> {
    let mut s = connect_from(local, to);
    s.write_all(req.as_bytes()).ok()?;
    read_response(&mut s)
}

pub fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
}

/// The status code of a response head.
pub fn status(head: &str) -> u16 {
    head.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// True once `s` is closed by the peer (EOF or reset) within `within`.
pub fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).ok();
    let mut sink = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        match s.read(&mut sink) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
        if Instant::now() >= deadline {
            return false;
        }
    }
}

/// A Prometheus sample's value from a metrics text (`name{labels}` exactly as written).
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok()))
}

/// `/metrics` of `addr` from whatever source address the route picks.
pub fn metrics_at(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect metrics");
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(get("/metrics").as_bytes())
        .expect("metrics request");
    let (_, body) = read_response(&mut s).expect("metrics");
    String::from_utf8_lossy(&body).to_string()
}

/// The sum of every sample of a family whose labels contain `with` (a Prometheus text).
pub fn metric_sum(text: &str, family: &str, with: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(family)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter(|l| l.contains(with))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

pub fn metrics(addr: SocketAddr) -> String {
    let (_, body) = request_from([127, 0, 0, 1], addr, &get("/metrics")).expect("metrics");
    String::from_utf8_lossy(&body).to_string()
}

/// Tight HTTP limits so the deadlines show within a test's seconds; `head_ms` is the head
/// deadline (long where a test holds silent connections on purpose).
pub fn http_table(head_ms: u64) -> String {
    format!(
        "[http]\nhead_ms_max = {head_ms}\nreserved_head_ms_max = {head_ms}\nbody_grace_ms = 600\n\
         body_bytes_per_s_min = 1024\nconns_max = 64\nconns_reserved = 8\nconns_per_addr_max = 16\n"
    )
}

/// The head deadline of most tests.
pub const HEAD_MS: u64 = 600;

pub fn control_toml(extra: &str, head_ms: u64) -> String {
    format!(
        "http_addr = \"127.0.0.1:0\"\ntoken_keys = \"1:{STRONG}\"\ndriver = \"legacy\"\n{extra}\n{}",
        http_table(head_ms)
    )
}

pub fn broker_toml(extra: &str, head_ms: u64) -> String {
    format!(
        "shards = 1\npin = false\ndriver = \"legacy\"\ningest_addr = \"127.0.0.1:0\"\nlink_addr = \"127.0.0.1:0\"\nhttp_addr = \"127.0.0.1:0\"\n{extra}\n{}",
        http_table(head_ms)
    )
}

pub fn edge_toml(extra: &str, head_ms: u64) -> String {
    format!(
        "shards = 1\npin = false\ndriver = \"legacy\"\ntcp_addr = \"127.0.0.1:0\"\nws_addr = \"127.0.0.1:0\"\nadmin_addr = \"127.0.0.1:0\"\ntoken_keys = \"1:{STRONG}\"\n{extra}\n{}",
        http_table(head_ms)
    )
}

/// Paces a loop at one turn per `gap`: sleeps until `due + gap` and moves `due` there (after a
/// late turn, from now: no burst to catch up).
pub fn pace(due: &mut Instant, gap: Duration) {
    *due += gap;
    let now = Instant::now();
    if *due > now {
        std::thread::sleep(*due - now);
    } else {
        *due = now;
    }
}
