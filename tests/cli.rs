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
    // With --env, the credentials the unit hands in are checked too, as the edge will at start:
    // on 0.0.0.0 a weak one stops it, so `config check` says so (naming the field, not the value).
    let weak = dir.join("weak_link_key");
    std::fs::write(&weak, "tiny-secret-value\n").unwrap();
    let (code, _, err) = run(barrage()
        .args(["config", "check", "edge", "--env"])
        .arg(&good)
        .env("BARRAGE_EDGE_LINK_KEY_FILE", &weak));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("link_key") && !err.contains("tiny-secret"),
        "{err}"
    );
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
    // Durations are in milliseconds everywhere: an old `_s` name is refused naming the new one,
    // as a flag and as a config field, never ignored.
    let (code, _, err) = run(barrage().args(["tail", "--room", "1", "--timeout-s=5"]));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--timeout-s was renamed --timeout-ms"),
        "{err}"
    );
    let (code, _, err) = run(barrage().args(["loadtest", "idle", "--duration-s", "5"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--duration-ms"), "{err}");
    let old = dir.join("control.toml");
    std::fs::write(&old, "token_ttl_s = 60\n").unwrap();
    let (code, _, err) = run(barrage().args(["config", "check", "control"]).arg(&old));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("`token_ttl_s` was renamed `token_ttl_ms`"),
        "{err}"
    );
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

/// A role process (`barrage edge|broker|control`), its banner, its log lines; killed on drop.
struct RoleProcess {
    child: std::process::Child,
    banner: String,
    log: std::sync::mpsc::Receiver<String>,
}

impl Drop for RoleProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RoleProcess {
    /// Starts `barrage ARGS` with `RUST_LOG=info` and reads its banner line.
    fn start(args: &[&str]) -> RoleProcess {
        let mut child = barrage()
            .env("RUST_LOG", "info")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut banner = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut banner)
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, log) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        RoleProcess { child, banner, log }
    }

    /// The address after `label` in the banner (`"admin http://"`, `"tcp "`, `"links "`).
    fn addr(&self, label: &str) -> std::net::SocketAddr {
        self.banner
            .split(label)
            .nth(1)
            .and_then(|r| r.split([',', ' ', '\n']).next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no {label:?} in banner {:?}", self.banner))
    }
}

/// `GET path` as text (status, body).
fn http_text(addr: std::net::SocketAddr, path: &str) -> (u16, String, Vec<(String, String)>) {
    let path = path.to_string();
    let r = net::runtime::block_on(net::runtime::Driver::Legacy, async move {
        net::http::request(
            &addr.to_string(),
            "GET",
            &path,
            &[],
            b"",
            std::time::Duration::from_secs(5),
        )
        .await
    })
    .unwrap_or_else(|e| panic!("HTTP {addr}: {e}"));
    (
        r.status,
        String::from_utf8_lossy(&r.body).into_owned(),
        r.headers,
    )
}

fn token(keys: &str, uid: u64, room: u64) -> String {
    proto::token::KeySet::parse(keys)
        .unwrap()
        .sign(&proto::token::Claims {
            uid: proto::id::UserId(uid),
            device: proto::id::DeviceId(format!("dev-{uid}")),
            room: proto::id::RoomId(room),
            area: proto::id::AreaId(0),
            expires_at_s: common::unix_now_s() + 3600,
        })
}

/// Polls `GET path` until it answers `want` (bounded by `common::WAIT`).
fn wait_status(addr: std::net::SocketAddr, path: &str, want: u16) -> bool {
    let deadline = Instant::now() + common::WAIT;
    while Instant::now() < deadline {
        if http_text(addr, path).0 == want {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    false
}

#[test]
fn sighup_rotates_token_keys_and_viewers_stay() {
    let dir = std::env::temp_dir().join(format!("barrage-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("edge.toml");
    let write = |keys: &str| {
        std::fs::write(
            &file,
            format!("token_keys = \"{keys}\"\nshards = 1\npin = false\n"),
        )
        .unwrap()
    };
    let (k1, k2) = ("1:first-secret-0123456789", "2:second-secret-0123456789");
    write(k1);
    let file_s = file.to_string_lossy().into_owned();
    let edge = RoleProcess::start(&[
        "edge",
        "--config",
        &file_s,
        "--set",
        "tcp_addr=\"127.0.0.1:0\"",
        "--set",
        "ws_addr=\"127.0.0.1:0\"",
        "--set",
        "admin_addr=\"127.0.0.1:0\"",
    ]);
    let (tcp, admin) = (edge.addr("tcp "), edge.addr("admin http://"));
    // No broker configured: ready at once.
    assert_eq!(http_text(admin, "/readyz").0, 200);

    let mut old = common::Viewer::tcp(tcp);
    assert_eq!(old.auth(&common::auth_body(1, 7, &token(k1, 1, 7))), 0);

    // Rotate: key 2 replaces key 1 in the file; SIGHUP.
    write(k2);
    signal(&edge.child, "-HUP");
    assert!(wait_line(&edge.log, "reloaded"), "no reload logged");
    let mut new = common::Viewer::tcp(tcp);
    assert_eq!(new.auth(&common::auth_body(2, 7, &token(k2, 2, 7))), 0);
    let mut stale = common::Viewer::tcp(tcp);
    assert_ne!(
        stale.auth(&common::auth_body(3, 7, &token(k1, 3, 7))),
        0,
        "a token of the removed key is refused"
    );
    // The viewer that came in with key 1 is still there, answered.
    old.heartbeat();

    // POST /admin/reload: a broken file keeps the old keys and says why (500).
    std::fs::write(&file, "token_keys = 5\n").unwrap();
    let (status, body) = common::http_json(admin, "POST", "/admin/reload", &[], "");
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["reloaded"][0]["name"], "config", "{body}");
    assert_eq!(body["reloaded"][0]["ok"], false, "{body}");
    let mut again = common::Viewer::tcp(tcp);
    assert_eq!(again.auth(&common::auth_body(4, 7, &token(k2, 4, 7))), 0);
    write(k2);
    let (status, body) = common::http_json(admin, "POST", "/admin/reload", &[], "");
    assert_eq!(status, 200, "{body}");
    assert!(wait_line(&edge.log, "reloaded"));

    // log_level reloads too: at "warn" a reload's own info line is not logged; back at the
    // start filter (info) it is. The key ids tell the two reloads apart.
    let reload_with = |keys: &str, log_level: &str| {
        std::fs::write(
            &file,
            format!(
                "token_keys = \"{keys}\"\nlog_level = \"{log_level}\"\nshards = 1\npin = false\n"
            ),
        )
        .unwrap();
        let (status, body) = common::http_json(admin, "POST", "/admin/reload", &[], "");
        assert_eq!(status, 200, "{body}");
    };
    reload_with(k1, "warn");
    reload_with(&format!("{k1},{k2}"), "");
    let deadline = Instant::now() + common::WAIT;
    let logged = loop {
        let l = edge
            .log
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("no reload logged");
        if l.contains("reloaded") {
            break l;
        }
    };
    assert!(
        logged.contains("ids: [1, 2]"),
        "the warn-level reload logged: {logged}"
    );

    // Draining: /readyz says 503, /healthz stays 200.
    let (status, _) = common::http_json(admin, "POST", "/admin/drain", &[], "");
    assert_eq!(status, 200);
    let (status, body, _) = http_text(admin, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("draining"), "{body}");
    assert_eq!(http_text(admin, "/healthz").0, 200);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Metric names a Prometheus expression reads (ours and `process_*`; `up` is Prometheus's own).
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find(|c: char| c.is_ascii_alphabetic() || c == '_') {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let word = &tail[..end];
        // Skip label values in quotes: an identifier preceded by `"` is a value.
        let quoted = rest[..i].ends_with('"') || rest[..i].ends_with("~\"");
        if !quoted && (word.starts_with("barrage_") || word.starts_with("process_")) {
            out.push(word.to_string());
        }
        rest = &tail[end..];
    }
    out
}

/// A broker API key the reload keeps (the other one is rotated).
const KEPT_KEY: &str = "kept-api-key-0123456789abcdef0123";

#[test]
fn readyz_waits_for_a_broker_link_and_dashboards_name_live_metrics() {
    let dir = std::env::temp_dir().join(format!("barrage-dash-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = common::KEYS_V1;
    let broker_toml = dir.join("broker.toml");
    std::fs::write(
        &broker_toml,
        format!(
            "shards = 1\npin = false\ncounts_interval_ms = 100\ningest_addr = \"127.0.0.1:0\"\nlink_addr = \"127.0.0.1:0\"\nhttp_addr = \"127.0.0.1:0\"\n[[api_keys]]\nkey = \"{}\"\nscopes = [\"room\", \"area\", \"global\", \"user\", \"device\"]\n[[api_keys]]\nkey = \"{KEPT_KEY}\"\nscopes = [\"room\"]\n",
            common::API_KEY
        ),
    )
    .unwrap();
    let broker = RoleProcess::start(&["broker", "--config", &broker_toml.to_string_lossy()]);
    let (links, bhttp) = (broker.addr("links "), broker.addr("http://"));

    let control_toml = dir.join("control.toml");
    std::fs::write(
        &control_toml,
        format!(
            "http_addr = \"127.0.0.1:0\"\napi_keys = [\"{key}\"]\ntoken_keys = \"{keys}\"\n[pages]\nbroker_http = \"{bhttp}\"\nbroker_key = \"{key}\"\n",
            key = common::API_KEY
        ),
    )
    .unwrap();
    let control = RoleProcess::start(&["control", "--config", &control_toml.to_string_lossy()]);
    let chttp = control.addr("http://");

    // An edge whose broker is not there yet: alive, not ready.
    let lonely = RoleProcess::start(&[
        "edge",
        "--set",
        "shards=1",
        "--set",
        "pin=false",
        "--set",
        "tcp_addr=\"127.0.0.1:0\"",
        "--set",
        "ws_addr=\"127.0.0.1:0\"",
        "--set",
        "admin_addr=\"127.0.0.1:0\"",
        "--set",
        "broker_addrs=[\"127.0.0.1:1\"]",
    ]);
    let ladmin = lonely.addr("admin http://");
    let (status, body, _) = http_text(ladmin, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no broker link"), "{body}");
    assert_eq!(http_text(ladmin, "/healthz").0, 200);
    drop(lonely);

    let edge = RoleProcess::start(&[
        "edge",
        "--set",
        "shards=1",
        "--set",
        "pin=false",
        "--set",
        "tcp_addr=\"127.0.0.1:0\"",
        "--set",
        "ws_addr=\"127.0.0.1:0\"",
        "--set",
        "admin_addr=\"127.0.0.1:0\"",
        "--set",
        &format!("broker_addrs=[\"{links}\"]"),
        "--set",
        &format!("control_addr=\"{chttp}\""),
        "--set",
        &format!("token_keys=\"{keys}\""),
    ]);
    let (tcp, admin) = (edge.addr("tcp "), edge.addr("admin http://"));
    assert!(
        wait_status(admin, "/readyz", 200),
        "the edge never got ready"
    );
    for a in [bhttp, chttp] {
        assert_eq!(http_text(a, "/readyz").0, 200);
    }

    // Viewers in two rooms; the broker's busiest rooms list them, and so does the console.
    let mut viewers = Vec::new();
    for (uid, room) in [(1, 5), (2, 5), (3, 9)] {
        let mut v = common::Viewer::tcp(tcp);
        assert_eq!(
            v.auth(&common::auth_body(uid, room, &token(keys, uid, room))),
            0
        );
        viewers.push(v);
    }
    let auth = format!("Bearer {}", common::API_KEY);
    let deadline = Instant::now() + common::WAIT;
    let top = loop {
        let (status, v) = common::http_json(
            bhttp,
            "GET",
            "/v1/rooms/top?limit=5",
            &[("authorization", &auth)],
            "",
        );
        assert_eq!(status, 200, "{v}");
        if v["rooms"].as_array().is_some_and(|r| r.len() == 2) || Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(
        top,
        serde_json::json!({"rooms": [{"room": 5, "viewers": 2}, {"room": 9, "viewers": 1}]})
    );
    let (status, _) = common::http_json(bhttp, "GET", "/v1/rooms/top", &[], "");
    assert_eq!(status, 401, "the list needs an API key");
    let (status, v) = common::http_json(
        chttp,
        "GET",
        "/console/api/rooms",
        &[("authorization", &auth)],
        "",
    );
    assert_eq!(
        (status, &v["rooms"][0]["room"]),
        (200, &serde_json::json!(5)),
        "{v}"
    );
    let (status, _) = common::http_json(chttp, "GET", "/console/api/rooms", &[], "");
    assert_eq!(status, 401);

    // One push, so the broker's histograms have seen a batch; a token request for control's.
    let (status, v) = common::http_json(
        bhttp,
        "POST",
        "/v1/push/room/5",
        &[("authorization", &auth)],
        "{\"cmd\":\"DANMU_MSG\"}",
    );
    assert_eq!(status, 202, "{v}");
    let _ = common::connect_ticket(chttp, 5, 10);
    // The viewers get it, and the edge observes broker flush -> queued to them from the stamp
    // the batch carries on the link.
    assert!(viewers[0]
        .next_message(Instant::now() + common::WAIT)
        .is_some());
    let deadline = Instant::now() + common::WAIT;
    loop {
        let (_, text, _) = http_text(admin, "/metrics");
        let count = text
            .lines()
            .find_map(|l| l.strip_prefix("barrage_edge_flush_to_write_seconds_count "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if count >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no flush -> write observed:\n{text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    // Scrape every role; each answers with one Content-Type.
    let mut live = std::collections::BTreeSet::new();
    for a in [admin, bhttp, chttp] {
        let (status, text, headers) = http_text(a, "/metrics");
        assert_eq!(status, 200);
        let types = headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            .count();
        assert_eq!(types, 1, "{a}: {headers:?}");
        for l in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let name = l.split(['{', ' ']).next().unwrap_or("");
            live.insert(name.to_string());
        }
    }
    for must in [
        "barrage_build_info",
        "process_cpu_seconds_total",
        "barrage_broker_accept_to_flush_seconds_bucket",
        "barrage_control_request_duration_seconds_bucket",
        "barrage_edge_auth_seconds_count",
        "barrage_edge_flush_to_write_seconds_bucket",
    ] {
        assert!(live.contains(must), "{must} missing from the scrape");
    }
    assert!(
        !live.iter().any(|n| n.starts_with("broker_")),
        "one namespace: barrage_<role>_*"
    );

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("tuning/grafana/barrage.json")).unwrap(),
    )
    .expect("the dashboard is valid JSON");
    let mut exprs: Vec<String> = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            exprs.push(t["expr"].as_str().expect("expr").to_string());
        }
    }
    let alerts_text = std::fs::read_to_string(root.join("tuning/prometheus/alerts.yml")).unwrap();
    let docs = std::fs::read_to_string(root.join("docs/operations.md")).unwrap();
    let yaml = yaml_rust2::YamlLoader::load_from_str(&alerts_text).expect("alerts.yml is YAML");
    let mut alerts = 0;
    for g in yaml[0]["groups"].as_vec().expect("groups") {
        for r in g["rules"].as_vec().expect("rules") {
            let name = r["alert"].as_str().expect("alert name");
            exprs.push(r["expr"].as_str().expect("expr").to_string());
            assert!(
                docs.contains(&format!("`{name}`")),
                "{name} has no runbook line in docs/operations.md"
            );
            alerts += 1;
        }
    }
    assert!(alerts >= 6 && exprs.len() > alerts);
    let mut checked = std::collections::BTreeSet::new();
    for e in &exprs {
        for name in metric_names(e) {
            assert!(
                live.contains(&name),
                "{name} (in {e:?}) is in no live /metrics"
            );
            checked.insert(name);
        }
    }
    assert!(checked.len() >= 15, "too few metrics named: {checked:?}");

    // The broker reloads its API keys on SIGHUP: the old key is refused, the new one pushes;
    // an ingest connection authenticated with the old key is refused from then on.
    let mut ingest =
        broker::IngestClient::connect(broker.addr("ingest "), common::API_KEY).unwrap();
    let mut kept = broker::IngestClient::connect(broker.addr("ingest "), KEPT_KEY).unwrap();
    for c in [&mut ingest, &mut kept] {
        c.push(&broker::Message::room(5, "{\"cmd\":\"DANMU_MSG\"}"))
            .unwrap();
    }
    let new_key = "rotated-api-key-0123456789abcdef";
    std::fs::write(
        &broker_toml,
        std::fs::read_to_string(&broker_toml)
            .unwrap()
            .replace(common::API_KEY, new_key),
    )
    .unwrap();
    signal(&broker.child, "-HUP");
    assert!(wait_line(&broker.log, "reloaded"), "no reload logged");
    let push = |key: &str| {
        let auth = format!("Bearer {key}");
        common::http_json(
            bhttp,
            "POST",
            "/v1/push/room/5",
            &[("authorization", &auth)],
            "{\"cmd\":\"DANMU_MSG\"}",
        )
        .0
    };
    assert_eq!(push(common::API_KEY), 401);
    assert_eq!(push(new_key), 202);
    let refused = ingest.push(&broker::Message::room(5, "{\"cmd\":\"DANMU_MSG\"}"));
    assert!(
        matches!(
            refused,
            Err(broker::ClientError::Rejected(
                proto::ingest::PushError::Unauthorized
            ))
        ),
        "{refused:?}"
    );
    // A key that stays keeps its connection working across the reload.
    kept.push(&broker::Message::room(5, "{\"cmd\":\"DANMU_MSG\"}"))
        .unwrap();

    // Control reloads its API keys through POST /admin/reload (with a key it holds now).
    std::fs::write(
        &control_toml,
        std::fs::read_to_string(&control_toml)
            .unwrap()
            .replace(common::API_KEY, new_key),
    )
    .unwrap();
    let (status, _) = common::http_json(chttp, "POST", "/admin/reload", &[], "");
    assert_eq!(status, 401, "reload needs a key");
    let (status, v) = common::http_json(
        chttp,
        "POST",
        "/admin/reload",
        &[("authorization", &auth)],
        "",
    );
    assert_eq!(status, 200, "{v}");
    let connect = |key: &str| {
        let auth = format!("Bearer {key}");
        common::http_json(
            chttp,
            "POST",
            "/v1/connect",
            &[("authorization", &auth)],
            "{\"room\":5,\"uid\":11,\"device\":\"d\"}",
        )
        .0
    };
    assert_eq!(connect(common::API_KEY), 401);
    assert_eq!(connect(new_key), 200);
    drop(viewers);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `barrage up` reloads on SIGHUP: each role re-reads its section of the file and applies what
/// can change live, and the secrets `up` made at random at start stay the same.
#[test]
fn up_reloads_every_role_on_sighup() {
    let dir = std::env::temp_dir().join(format!("barrage-up-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("up.toml");
    let write = |keys: &str| {
        std::fs::write(
            &file,
            format!(
                "[control]\nhttp_addr = \"127.0.0.1:0\"\ntoken_keys = \"{keys}\"\n\
                 [broker]\nshards = 1\npin = false\ningest_addr = \"127.0.0.1:0\"\n\
                 link_addr = \"127.0.0.1:0\"\nhttp_addr = \"127.0.0.1:0\"\n\
                 [edge]\nshards = 1\npin = false\ntcp_addr = \"127.0.0.1:0\"\n\
                 ws_addr = \"127.0.0.1:0\"\nwss_addr = \"127.0.0.1:0\"\nadmin_addr = \"127.0.0.1:0\"\n"
            ),
        )
        .unwrap()
    };
    let (k1, k2) = ("1:first-secret-0123456789", "2:second-secret-0123456789");
    write(k1);
    let mut child = barrage()
        .arg("up")
        .arg("--config")
        .arg(&file)
        .env("BARRAGE_TLS_DIR", dir.join("tls"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let (mut tcp, mut control, mut api_key) = (None, None, None);
    let deadline = Instant::now() + common::WAIT;
    while let Ok(l) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        let words: Vec<&str> = l.split_whitespace().collect();
        match words.as_slice() {
            ["edge", "tcp", a, ..] => tcp = a.parse::<std::net::SocketAddr>().ok(),
            ["control", url, ..] => {
                control = url
                    .strip_prefix("http://")
                    .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
            }
            ["api", "key", k] => api_key = Some(k.to_string()),
            ["ready"] => break,
            _ => {}
        }
    }
    let up = Killed(child);
    let (tcp, control, api_key) = (
        tcp.expect("edge tcp in the banner"),
        control.expect("control in the banner"),
        api_key.expect("api key in the banner"),
    );
    let mut old = common::Viewer::tcp(tcp);
    assert_eq!(old.auth(&common::auth_body(1, 7, &token(k1, 1, 7))), 0);

    // Rotate in the file: key 2 only. Control signs with it and the edge accepts it once the
    // reload has run; the random API key `up` printed still works.
    write(k2);
    signal(&up.0, "-HUP");
    let bearer = format!("Bearer {api_key}");
    let deadline = Instant::now() + common::WAIT;
    let k2_only = proto::token::KeySet::parse(k2).unwrap();
    loop {
        let (status, body) = common::http_json(
            control,
            "POST",
            "/v1/connect",
            &[("authorization", bearer.as_str())],
            r#"{"room":7,"uid":5}"#,
        );
        assert_eq!(status, 200, "the API key up made survives a reload: {body}");
        let t = body["token"].as_str().unwrap().to_string();
        // Signed with key 2 (control reloaded) and accepted by the edge (it reloaded too).
        if k2_only.verify(&t, common::unix_now_s()).is_ok() {
            let mut v = common::Viewer::tcp(tcp);
            if v.auth(&common::auth_body(5, 7, &t)) == 0 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the roles never took key 2");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut stale = common::Viewer::tcp(tcp);
    assert_ne!(stale.auth(&common::auth_body(3, 7, &token(k1, 3, 7))), 0);
    // The viewer that came in with key 1 is still connected and answered.
    old.heartbeat();
    drop(up);
}

/// Kills the child when dropped (a failed assertion must not leave `up` running).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
