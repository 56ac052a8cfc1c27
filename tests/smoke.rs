//! The real binary: `barrage up` with a fixed key and a ports offset, `barrage tail` (a TCP
//! guest, a WebSocket user, a WSS guest trusting the self-signed certificate `up` made and a
//! UDP guest) and
//! `barrage push` as child processes; the pushed message comes out of every tail, and SIGTERM
//! stops `up` cleanly.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_barrage");
const API_KEY: &str = "smoke-api-key";
const TOKEN_SECRET: &str = "smoke-token-secret-0123456789";
const WAIT: Duration = Duration::from_secs(30);

/// Kills (SIGKILL) and reaps every child still running when the test ends, on every path.
struct Children(Vec<Child>);

impl Children {
    fn spawn(&mut self, cmd: &mut Command) -> usize {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn barrage");
        self.0.push(child);
        self.0.len() - 1
    }

    /// The child's stdout and stderr lines, read on their own threads.
    fn lines(&mut self, i: usize) -> (Receiver<String>, Receiver<String>) {
        let forward = |r: Box<dyn std::io::Read + Send>| {
            let (tx, rx) = channel();
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            rx
        };
        let out = self.0[i].stdout.take().expect("stdout piped");
        let err = self.0[i].stderr.take().expect("stderr piped");
        (forward(Box::new(out)), forward(Box::new(err)))
    }

    fn wait(&mut self, i: usize, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(s)) = self.0[i].try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Reads lines until one satisfies `f`, or the child closed its output, or the deadline.
fn wait_line(
    rx: &Receiver<String>,
    deadline: Instant,
    seen: &mut Vec<String>,
    f: impl Fn(&str) -> bool,
) -> bool {
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(l) => {
                let hit = f(&l);
                seen.push(l);
                if hit {
                    return true;
                }
            }
            Err(_) => return false,
        }
    }
    false
}

/// `barrage up` from the first port offset of `offsets` that starts: its child index, offset
/// and output lines.
fn start_up(
    kids: &mut Children,
    tls_dir: &std::path::Path,
    offsets: [u16; 3],
) -> (usize, u16, Receiver<String>, Receiver<String>) {
    for offset in offsets {
        // Memory only: the default data_dir would be under the user's state directory.
        let i = kids.spawn(
            Command::new(BIN)
                .env("BARRAGE_TLS_DIR", tls_dir)
                .env("BARRAGE_DATA_DIR", "none")
                .args([
                    "up",
                    "--api-key",
                    API_KEY,
                    "--token-secret",
                    TOKEN_SECRET,
                    "--ports-offset",
                    &offset.to_string(),
                ]),
        );
        let (out, err) = kids.lines(i);
        let mut seen = Vec::new();
        if wait_line(&out, Instant::now() + WAIT, &mut seen, |l| l == "ready") {
            return (i, offset, out, err);
        }
        let errs: Vec<String> = err.try_iter().collect();
        eprintln!("up with offset {offset} did not start: {seen:?} {errs:?}");
        let _ = kids.0[i].kill();
    }
    panic!("barrage up never became ready");
}

/// The sum of a counter over its series with `label` in them (`""`: all), from the edge's `/metrics` (`up`'s edge admin is
/// 127.0.0.1:9243 plus the ports offset).
fn edge_counter(offset: u16, name: &str, label: &str) -> f64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", 9243 + offset)).expect("edge admin");
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter(|l| l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until `f` holds (up to `WAIT`).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A ports offset far from the defaults, per test process.
fn base_offset() -> u16 {
    12_000 + (std::process::id() % 400) as u16 * 10
}

#[test]
fn up_tail_push_with_the_real_binary() {
    let mut kids = Children(Vec::new());
    // A ports offset far from the defaults; try another if something on this host holds one.
    let base = base_offset();
    // `up` makes its self-signed WSS certificate here (not in the user's state directory).
    let tls_dir = std::env::temp_dir().join(format!("barrage-smoke-tls-{}", std::process::id()));
    let ca_file = tls_dir.join("tls-cert.pem");
    let (up, offset, up_out, _up_err) =
        start_up(&mut kids, &tls_dir, [base, base + 4_000, base + 8_000]);
    let control = format!("http://127.0.0.1:{}", 8080 + offset);
    let ingest = format!("127.0.0.1:{}", 7400 + offset);

    let room = "4242";
    let guest_tcp = kids.spawn(Command::new(BIN).args([
        "tail",
        "--room",
        room,
        "--control",
        &control,
        "--count",
        "1",
        "--timeout-ms",
        "30000",
    ]));
    let user_ws = kids.spawn(
        Command::new(BIN)
            .args([
                "tail",
                "--room",
                room,
                "--transport",
                "ws",
                "--uid",
                "77",
                "--control",
                &control,
                "--count",
                "1",
                "--timeout-ms",
                "30000",
            ])
            .env("BARRAGE_CONTROL_KEY", API_KEY),
    );
    let guest_wss = kids.spawn(Command::new(BIN).args([
        "tail",
        "--room",
        room,
        "--transport",
        "wss",
        "--ca-file",
        &ca_file.display().to_string(),
        "--control",
        &control,
        "--count",
        "1",
        "--timeout-ms",
        "30000",
    ]));
    let guest_udp = kids.spawn(Command::new(BIN).args([
        "tail",
        "--room",
        room,
        "--transport",
        "udp",
        "--control",
        &control,
        "--count",
        "1",
        "--timeout-ms",
        "30000",
    ]));
    let (tcp_out, tcp_err) = kids.lines(guest_tcp);
    let (udp_out, udp_err) = kids.lines(guest_udp);
    let (ws_out, ws_err) = kids.lines(user_ws);
    let (wss_out, wss_err) = kids.lines(guest_wss);

    // The tails subscribe asynchronously: push until both have printed (each push is the same
    // message, so whichever arrives first is the one asserted on).
    let body = r#"{"cmd":"DANMU_MSG","info":[[0,1,25,16777215],"smoke test",[77,"tester"]]}"#;
    let deadline = Instant::now() + WAIT;
    let mut got = [None, None, None, None];
    while got.iter().any(Option::is_none) {
        assert!(
            Instant::now() < deadline,
            "tails printed nothing; tcp: {:?} ws: {:?} wss: {:?} udp: {:?}",
            tcp_err.try_iter().collect::<Vec<_>>(),
            ws_err.try_iter().collect::<Vec<_>>(),
            wss_err.try_iter().collect::<Vec<_>>(),
            udp_err.try_iter().collect::<Vec<_>>()
        );
        let push = Command::new(BIN)
            .args(["push", "--ingest", &ingest, "--room", room, body])
            .env("BARRAGE_API_KEY", API_KEY)
            .output()
            .expect("run barrage push");
        assert!(
            push.status.success(),
            "push failed: {}",
            String::from_utf8_lossy(&push.stderr)
        );
        let id = String::from_utf8_lossy(&push.stdout).trim().to_string();
        assert!(
            id.parse::<u64>().is_ok(),
            "push printed {id:?}, not a msg_id"
        );
        for (slot, rx) in got.iter_mut().zip([&tcp_out, &ws_out, &wss_out, &udp_out]) {
            if slot.is_none() {
                *slot = rx.recv_timeout(Duration::from_millis(300)).ok();
            }
        }
    }
    assert_eq!(got[0].as_deref(), Some(body), "TCP guest tail");
    assert_eq!(got[1].as_deref(), Some(body), "WS user tail");
    assert_eq!(got[2].as_deref(), Some(body), "WSS guest tail");
    assert_eq!(got[3].as_deref(), Some(body), "UDP guest tail");
    for i in [guest_tcp, user_ws, guest_wss, guest_udp] {
        let status = kids.wait(i, WAIT).expect("tail exits after --count 1");
        assert!(status.success(), "tail exit {status:?}");
    }
    // The UDP tail ended its session with a bye on the way out (docs/protocol-udp.md).
    eventually("the UDP tail's bye", || {
        edge_counter(offset, "barrage_edge_udp_byes_total", "") >= 1.0
    });
    // Ctrl-C: the tail ends its session before it exits.
    let udp_ctrl_c = kids.spawn(Command::new(BIN).args([
        "tail",
        "--room",
        room,
        "--transport",
        "udp",
        "--control",
        &control,
        "--timeout-ms",
        "30000",
    ]));
    let (_, ctrl_c_err) = kids.lines(udp_ctrl_c);
    let mut seen = Vec::new();
    assert!(
        wait_line(&ctrl_c_err, Instant::now() + WAIT, &mut seen, |l| l
            .starts_with("online")),
        "the UDP tail never got a heartbeat reply: {seen:?}"
    );
    let sent = Command::new("kill")
        .args(["-INT", &kids.0[udp_ctrl_c].id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    let status = kids.wait(udp_ctrl_c, WAIT).expect("tail exits on Ctrl-C");
    assert!(status.success(), "tail exit on Ctrl-C {status:?}");
    assert!(
        wait_line(&ctrl_c_err, Instant::now() + WAIT, &mut seen, |l| l
            == "session ended"),
        "no bye answer: {seen:?}"
    );
    assert!(edge_counter(offset, "barrage_edge_udp_byes_total", "") >= 2.0);

    // A push with a wrong key is refused with a typed error and a non-zero exit.
    let bad = Command::new(BIN)
        .args([
            "push",
            "--ingest",
            &ingest,
            "--api-key",
            "wrong",
            "--room",
            room,
            body,
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("unauthorized"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    // SIGTERM: `up` shuts everything down and exits 0.
    let pid = kids.0[up].id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = kids.wait(up, WAIT).expect("up exits on SIGTERM");
    assert!(status.success(), "up exit {status:?}");
    let mut seen = Vec::new();
    assert!(
        wait_line(&up_out, Instant::now() + WAIT, &mut seen, |l| l
            == "stopped"),
        "{seen:?}"
    );
    let _ = std::fs::remove_dir_all(&tls_dir);
}

/// Runs `barrage loadtest fanout --transport udp` against `up`; the JSON report.
fn udp_fanout(control: &str, http: &str, ingest: &str, loss_pct: &str) -> serde_json::Value {
    let json = std::env::temp_dir().join(format!(
        "barrage-smoke-udp-{}-{loss_pct}.json",
        std::process::id()
    ));
    let out = Command::new(BIN)
        .args([
            "loadtest",
            "fanout",
            "--control",
            control,
            "--broker-http",
            http,
        ])
        .args([
            "--ingest",
            ingest,
            "--api-key",
            API_KEY,
            "--control-key",
            API_KEY,
        ])
        .args(["--transport", "udp", "--udp-loss-pct", loss_pct])
        .args(["--viewers", "40", "--rates", "20", "--threads", "1"])
        .args([
            "--step-ms",
            "2000",
            "--warmup-ms",
            "500",
            "--duration-ms",
            "2000",
        ])
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run loadtest");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).unwrap_or_default()).unwrap_or_default();
    let _ = std::fs::remove_file(&json);
    assert!(
        report["totals"].is_object(),
        "no report: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    report
}

/// `barrage loadtest fanout --transport udp` through the real binary and `up`: every viewer
/// makes the cookie handshake and every message reaches every viewer over loopback; with
/// `--udp-loss-pct` the dropped datagrams show as missing messages and gaps.
#[test]
fn loadtest_fanout_over_udp_with_the_real_binary() {
    let mut kids = Children(Vec::new());
    let base = base_offset() + 2_000;
    let tls_dir =
        std::env::temp_dir().join(format!("barrage-smoke-udp-tls-{}", std::process::id()));
    let (_up, offset, _out, _err) =
        start_up(&mut kids, &tls_dir, [base, base + 4_000, base + 8_000]);
    let control = format!("http://127.0.0.1:{}", 8080 + offset);
    let http = format!("127.0.0.1:{}", 7480 + offset);
    let ingest = format!("127.0.0.1:{}", 7400 + offset);

    let r = udp_fanout(&control, &http, &ingest, "0");
    let t = &r["totals"];
    assert_eq!(r["connects"]["ok"], 40, "{}", r["connects"]);
    assert!(t["delivered"].as_u64().unwrap_or(0) >= 40, "{t}");
    assert_eq!(t["missing"], 0, "{t}");
    assert_eq!(t["duplicates"], 0, "{t}");
    assert_eq!(t["udp_bad"], 0, "{t}");
    // Every viewer ended its session with a bye at the end of the run: the edge freed them
    // at once instead of at heartbeat expiry.
    eventually("40 byes", || {
        edge_counter(offset, "barrage_edge_udp_byes_total", "") >= 40.0
    });
    assert_eq!(
        edge_counter(offset, "barrage_edge_connections", "transport=\"udp\""),
        0.0
    );

    let r = udp_fanout(&control, &http, &ingest, "30");
    let t = &r["totals"];
    assert!(t["udp_dropped"].as_u64().unwrap_or(0) > 0, "{t}");
    assert!(t["missing"].as_u64().unwrap_or(0) > 0, "{t}");
    assert_eq!(t["udp_bad"], 0, "{t}");
    let _ = std::fs::remove_dir_all(&tls_dir);
}
