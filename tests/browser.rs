//! The pages in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`)
//! driven over WebDriver against a real `barrage up` child process.
//!
//! The room page must show three danmaku pushed through the broker's HTTP API, in order, the
//! online count from op 3, a notice pushed from the console's API, and must reconnect by
//! itself after its connection is killed (the whole `up` process is SIGKILLed and started
//! again on the same ports), saying meanwhile that it could not. The console must ask for the
//! key without one and list the edge with it. Screenshots land in
//! `$CARGO_TARGET_TMPDIR/browser/`.
//!
//! WebDriver is a handful of JSON-over-HTTP calls (new session, navigate, run a script,
//! screenshot); they are made with `net::http`, which the workspace already has, rather than
//! with a client crate that would bring its own async runtime into the build.
//!
//! A missing browser fails the test with what to install: CI must not skip it.

mod common;

use base64::Engine;
use common::http_json;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_barrage");
const API_KEY: &str = "browser-api-key";
const TOKEN_SECRET: &str = "browser-token-secret-0123456789";
/// How long one thing may take to show up in the page.
const WAIT: Duration = Duration::from_secs(15);
/// Chromium as root on a CI machine with no network (the flags the issue lists).
const CHROMIUM_ARGS: [&str; 10] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,800",
];

/// Kills and reaps the children on every path out of the test.
struct Kids(Vec<Child>);

impl Drop for Kids {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn find(env: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|d| names.iter().map(move |n| d.join(n)))
        .find(|p| p.is_file())
}

fn browser() -> (PathBuf, PathBuf) {
    let chromium = find("BARRAGE_CHROMIUM", &["chromium", "chromium-browser"]);
    let driver = find("BARRAGE_CHROMEDRIVER", &["chromedriver"]);
    match (chromium, driver) {
        (Some(c), Some(d)) => (c, d),
        (c, d) => panic!(
            "the browser test needs headless Chromium and its WebDriver (found chromium: {c:?}, \
             chromedriver: {d:?}). Run ./scripts/test.sh, which installs them, or \
             `apt-get install -y chromium chromium-driver` (BARRAGE_CHROMIUM and \
             BARRAGE_CHROMEDRIVER point at other builds). This test is never skipped."
        ),
    }
}

#[path = "common/ports.rs"]
mod ports;
use ports::free_port;

/// Starts `barrage up` on `offset`; returns once it printed `ready`.
fn up(kids: &mut Kids, offset: u16) -> Result<usize, Vec<String>> {
    let mut child = Command::new(BIN)
        .args(["up", "--api-key", API_KEY, "--token-secret", TOKEN_SECRET])
        .args(["--ports-offset", &offset.to_string()])
        // Memory only: the default data_dir would be under the user's state directory.
        .env("BARRAGE_DATA_DIR", "none")
        // Its self-signed WSS certificate goes to a temporary directory, not the user's state.
        .env(
            "BARRAGE_TLS_DIR",
            std::env::temp_dir().join(format!("barrage-browser-tls-{}", std::process::id())),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn barrage up");
    let out = child.stdout.take().expect("stdout piped");
    kids.0.push(child);
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    wait_ready(&rx).map(|()| kids.0.len() - 1)
}

fn wait_ready(rx: &Receiver<String>) -> Result<(), Vec<String>> {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(l) if l == "ready" => return Ok(()),
            Ok(l) => seen.push(l),
            Err(_) => break,
        }
    }
    Err(seen)
}

/// Longest WebDriver call (a new session starts Chromium, slow on a loaded 2-core machine).
const WEBDRIVER_CALL_MS_MAX: u64 = 60_000;

/// One WebDriver call: JSON in, JSON out.
fn webdriver(addr: SocketAddr, method: &str, path: &str, body: &Value) -> (u16, Value) {
    try_webdriver(addr, method, path, body).unwrap_or_else(|e| panic!("WebDriver at {addr}: {e}"))
}

fn try_webdriver(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &Value,
) -> Result<(u16, Value), net::http::ClientError> {
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let (method, path) = (method.to_string(), path.to_string());
    let r = net::runtime::block_on(net::runtime::Driver::Legacy, async move {
        net::http::request(
            &addr.to_string(),
            &method,
            &path,
            &[("content-type", "application/json")],
            body.as_bytes(),
            Duration::from_millis(WEBDRIVER_CALL_MS_MAX),
        )
        .await
    })?;
    Ok((
        r.status,
        serde_json::from_slice(&r.body).unwrap_or(Value::Null),
    ))
}

/// A WebDriver session on a chromedriver child.
struct Driver {
    addr: SocketAddr,
    session: String,
}

impl Driver {
    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let path = format!("/session/{}{path}", self.session);
        let (status, v) = webdriver(self.addr, method, &path, &body);
        assert_eq!(status, 200, "WebDriver {method} {path}: {v}");
        v["value"].clone()
    }

    fn start(kids: &mut Kids, chromium: &Path, driver: &Path, profile: &Path) -> Driver {
        Driver::start_with(kids, chromium, driver, profile, &[])
    }

    /// As `start`, with more Chromium flags.
    fn start_with(
        kids: &mut Kids,
        chromium: &Path,
        driver: &Path,
        profile: &Path,
        extra: &[&str],
    ) -> Driver {
        let port = free_port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", driver.display()));
        kids.0.push(child);
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + WAIT;
        let ready = || {
            try_webdriver(addr, "GET", "/status", &Value::Null)
                .is_ok_and(|(_, v)| v["value"]["ready"] == true)
        };
        while !ready() {
            assert!(Instant::now() < deadline, "chromedriver never became ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|s| s.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        args.extend(extra.iter().map(|s| s.to_string()));
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args}
        }}});
        let (status, v) = webdriver(addr, "POST", "/session", &caps);
        assert_eq!(status, 200, "new WebDriver session: {v}");
        let session = v["value"]["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_string();
        Driver { addr, session }
    }

    fn goto(&self, url: &str) {
        self.call("POST", "/url", json!({ "url": url }));
    }

    fn eval(&self, script: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
    }

    /// Polls `script` until it returns something truthy; panics with `what` after `WAIT`.
    fn until(&self, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.eval(script);
            if !(v.is_null() || v == false || v == 0 || v == "") {
                return v;
            }
            assert!(Instant::now() < deadline, "page never showed: {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn screenshot(&self, to: &Path) {
        let b64 = self.call("GET", "/screenshot", Value::Null);
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().expect("base64 PNG"))
            .expect("screenshot decodes");
        std::fs::write(to, png).expect("write screenshot");
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let path = format!("/session/{}", self.session);
        let _ = webdriver(self.addr, "DELETE", &path, &Value::Null);
    }
}

fn danmu(text: &str) -> String {
    colored(text, "tester", 0xFF_FF_FF)
}

fn colored(text: &str, name: &str, color: u32) -> String {
    json!({"cmd": "DANMU_MSG", "info": [[0, 1, 25, color], text, [1001, name]]}).to_string()
}

/// Pairs of danmaku in flight whose boxes overlap (lanes must keep them apart).
const OVERLAPS: &str = "const r = [...document.querySelectorAll('#lanes .dm')]\
    .map(e => [e.textContent, e.getBoundingClientRect()]); const bad = [];\
    for (let i = 0; i < r.length; i++) for (let j = i + 1; j < r.length; j++) {\
      const [a, b] = [r[i][1], r[j][1]];\
      if (a.left < b.right - 1 && b.left < a.right - 1 && a.top < b.bottom - 1 && b.top < a.bottom - 1)\
        bad.push([r[i][0], r[j][0]]); }\
    return bad;";

#[test]
fn room_page_and_console_in_headless_chromium() {
    let (chromium, chromedriver) = browser();
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser");
    let profile = out.join(format!("profile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&profile);
    std::fs::create_dir_all(&profile).expect("output dir");

    let mut kids = Kids(Vec::new());
    // Offsets below the smoke test's (12_000 and up) and away from the defaults.
    let base = 1_000 + (std::process::id() % 300) as u16 * 10;
    let (mut up_child, offset) = [base, base + 3_000]
        .into_iter()
        .find_map(|o| match up(&mut kids, o) {
            Ok(i) => Some((i, o)),
            Err(seen) => {
                eprintln!("up with offset {o} did not start: {seen:?}");
                None
            }
        })
        .expect("barrage up never became ready");
    let control: SocketAddr = ([127, 0, 0, 1], 8080 + offset).into();
    let broker: SocketAddr = ([127, 0, 0, 1], 7480 + offset).into();
    let bearer = format!("Bearer {API_KEY}");
    let auth = [("authorization", bearer.as_str())];

    let web = Driver::start(&mut kids, &chromium, &chromedriver, &profile);
    web.goto(&format!("http://{control}/room/1"));
    web.until(
        "connected and authenticated",
        "return window.barrage && window.barrage.connects >= 1",
    );
    let online = web.until(
        "the online count",
        "const t = document.getElementById('online').textContent; return /^\\d/.test(t) && t",
    );
    assert!(
        online.as_str().is_some_and(|t| t.starts_with('1')),
        "one viewer: {online}"
    );

    for text in ["first", "second · zweite", "third · третий"] {
        let (status, v) = http_json(broker, "POST", "/v1/push/room/1", &auth, &danmu(text));
        assert_eq!(status, 202, "{v}");
    }
    let chat = "[...document.querySelectorAll('#chat .what')].map(e => e.textContent)";
    web.until(
        "three danmaku in the chat list",
        &format!("return {chat}.length >= 3"),
    );
    assert_eq!(
        web.eval(&format!("return {chat}")),
        json!(["first", "second · zweite", "third · третий"]),
        "in push order"
    );
    assert!(
        web.eval("return document.querySelectorAll('#lanes .dm').length")
            .as_u64()
            .is_some_and(|n| n >= 1),
        "danmaku fly across the player"
    );

    // An ops notice through the console's push endpoint reaches the side list.
    let (status, v) = http_json(
        control,
        "POST",
        "/console/api/push",
        &auth,
        r#"{"scope":"room","room":1,"text":"Maintenance at 04:00"}"#,
    );
    assert_eq!(status, 202, "{v}");
    web.until(
        "the notice in the side list",
        "return document.getElementById('events').textContent.includes('Maintenance at 04:00')",
    );
    // The demo box, as a visitor uses it.
    web.eval(
        "document.getElementById('send-text').value = 'hello from the demo box';\
         document.querySelector('#send button').click();",
    );
    web.until(
        "the demo danmaku",
        &format!("return {chat}.includes('hello from the demo box')"),
    );
    // A busier room: lengths and colours vary, a gift arrives; no two danmaku may overlap.
    let show = [
        ("let's gooo", "mika", 0xFF_FF_FF),
        ("this drop is insane", "kite", 0xFF_D7_00),
        ("gg", "ren", 0xFF_FF_FF),
        ("who else is here from the clip?", "ao", 0x7F_D4_FF),
        ("hello from Berlin", "lena", 0xFF_FF_FF),
        ("2333333", "hoshi", 0xFF_7E_B6),
        ("the bass line at 2:10 though", "jun", 0xFF_FF_FF),
        ("first time here, love the vibe", "sol", 0xA0_F0_A0),
        ("encore!", "max", 0xFF_FF_FF),
    ];
    for (text, name, color) in show {
        let (status, v) = http_json(
            broker,
            "POST",
            "/v1/push/room/1",
            &auth,
            &colored(text, name, color),
        );
        assert_eq!(status, 202, "{v}");
        std::thread::sleep(Duration::from_millis(150));
    }
    let gift =
        json!({"cmd": "SEND_GIFT", "data": {"uname": "mika", "giftName": "Rocket", "num": 1}});
    let (status, v) = http_json(broker, "POST", "/v1/push/room/1", &auth, &gift.to_string());
    assert_eq!(status, 202, "{v}");
    web.until(
        "the gift in the side list",
        "return document.getElementById('events').textContent.includes('Rocket')",
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(web.eval(OVERLAPS), json!([]), "danmaku overlap");
    web.screenshot(&out.join("room.png"));

    // Kill the connection: SIGKILL the whole stack, see the page say so, start it again.
    let _ = kids.0[up_child].kill();
    let _ = kids.0[up_child].wait();
    web.until(
        "that it could not reconnect",
        "const b = document.getElementById('banner'); return !b.classList.contains('hidden') && b.textContent",
    );
    web.screenshot(&out.join("room-down.png"));
    up_child = up(&mut kids, offset).expect("up restarts on the same ports");
    web.until(
        "a second connection after the kill",
        "return window.barrage.connects >= 2 && window.barrage.ws !== null",
    );
    let (status, v) = http_json(broker, "POST", "/v1/push/room/1", &auth, &danmu("after"));
    assert_eq!(status, 202, "{v}");
    web.until(
        "a danmaku after the reconnect",
        &format!("return {chat}.includes('after')"),
    );
    web.until(
        "the banner cleared",
        "return document.getElementById('banner').classList.contains('hidden')",
    );

    // The console: its JSON needs the key; the page asks for it, then lists the edge.
    let (status, _) = http_json(control, "GET", "/console/api/edges", &[], "");
    assert_eq!(status, 401, "console JSON without the key");
    let (status, _) = http_json(
        control,
        "GET",
        "/console/api/stats",
        &[("authorization", "Bearer wrong")],
        "",
    );
    assert_eq!(status, 401, "console JSON with a wrong key");
    // The console in a second tab (its own sessionStorage: no key yet); the room stays open.
    let tab = web.call("POST", "/window/new", json!({"type": "tab"}));
    web.call("POST", "/window", json!({"handle": tab["handle"]}));
    web.goto(&format!("http://{control}/console"));
    web.until(
        "the key form",
        "return !document.getElementById('login').classList.contains('hidden')",
    );
    assert_eq!(
        web.eval("return document.getElementById('app').classList.contains('hidden')"),
        json!(true),
        "no fleet data without the key"
    );
    web.screenshot(&out.join("console-locked.png"));
    web.goto(&format!("http://{control}/console#key={API_KEY}"));
    let row = web.until(
        "the edge with its link state",
        "const r = document.querySelector('#edges tr[data-node=\"edge-1\"]'); \
         return r && /\\d+\\/\\d+ up/.test(r.textContent) && r.textContent",
    );
    assert!(row.as_str().is_some_and(|t| t.contains("local")), "{row}");
    // Traffic to the open room page until the deliveries chart shows it (polls every 2 s).
    let deadline = Instant::now() + WAIT;
    let mut n = 0;
    // Three rate points, the last one non-zero: a line, not a dot.
    let shown = || {
        web.eval(
            "const d = document.getElementById('rate-now').dataset; \
             return Number(d.points || 0) >= 3 && Number(d.value || 0) > 0",
        ) == true
    };
    while !shown() {
        assert!(
            Instant::now() < deadline,
            "the console never showed deliveries"
        );
        n += 1;
        let (status, v) = http_json(
            broker,
            "POST",
            "/v1/push/room/1",
            &auth,
            &danmu(&format!("load {n}")),
        );
        assert_eq!(status, 202, "{v}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The busiest rooms: the room page open above is a viewer of room 1.
    let rooms = web.until(
        "room 1 among the busiest rooms",
        "const r = document.querySelector('#rooms tr[data-room=\"1\"]'); \
         return r && r.cells[1].textContent !== '0' && r.textContent",
    );
    assert!(
        rooms.as_str().is_some_and(|t| t.contains("watch")),
        "{rooms}"
    );
    web.screenshot(&out.join("console.png"));

    // Drain asks first, then the edge reports draining.
    web.eval("document.querySelector('#edges tr[data-node=\"edge-1\"] button').click()");
    web.until(
        "the drain confirmation",
        "return !document.getElementById('modal').classList.contains('hidden')",
    );
    web.eval("document.getElementById('modal-yes').click()");
    web.until(
        "the edge draining",
        "return document.querySelector('#edges tr[data-node=\"edge-1\"] .state').textContent === 'draining'",
    );
    eprintln!("screenshots in {}", out.display());

    let _ = kids.0[up_child].kill();
    let _ = std::fs::remove_dir_all(&profile);
}

/// Chromium's own TLS stack (BoringSSL) over WSS against the edge's TLS 1.3 record layer: the
/// page takes a guest ticket from control (which lists `wss_port`), opens `wss://localhost`,
/// authenticates, gets op 3 for a heartbeat and a danmaku pushed through the broker. The
/// certificate is `up`'s self-signed one, hence `--ignore-certificate-errors`.
#[test]
fn wss_from_headless_chromium() {
    let (chromium, chromedriver) = browser();
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser");
    let profile = out.join(format!("profile-wss-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&profile);
    std::fs::create_dir_all(&profile).expect("output dir");
    let mut kids = Kids(Vec::new());
    // Away from the room page test's offsets (1_000 + 10 × (pid % 300), + 3_000).
    let base = 7_000 + (std::process::id() % 300) as u16 * 10;
    let offset = [base, base + 3_000]
        .into_iter()
        .find(|o| match up(&mut kids, *o) {
            Ok(_) => true,
            Err(seen) => {
                eprintln!("up with offset {o} did not start: {seen:?}");
                false
            }
        })
        .expect("barrage up never became ready");
    let control: SocketAddr = ([127, 0, 0, 1], 8080 + offset).into();
    let broker: SocketAddr = ([127, 0, 0, 1], 7480 + offset).into();
    let web = Driver::start_with(
        &mut kids,
        &chromium,
        &chromedriver,
        &profile,
        &["--ignore-certificate-errors"],
    );
    web.goto(&format!("http://{control}/room/7"));
    web.eval(
        r#"
        window.wssLog = [];
        const log = (x) => window.wssLog.push(x);
        const packet = (op, body) => {
            const b = new TextEncoder().encode(body);
            const p = new Uint8Array(16 + b.length);
            const v = new DataView(p.buffer);
            v.setUint32(0, 16 + b.length); v.setUint16(4, 16); v.setUint16(6, 1);
            v.setUint32(8, op); v.setUint32(12, 1);
            p.set(b, 16);
            return p;
        };
        fetch('/xlive/web-room/v1/index/getDanmuInfo?id=7&type=0').then(r => r.json()).then(j => {
            const h = j.data.host_list[0];
            log('wss_port ' + h.wss_port);
            const ws = new WebSocket('wss://localhost:' + h.wss_port + '/sub');
            ws.binaryType = 'arraybuffer';
            ws.onopen = () => ws.send(packet(7, JSON.stringify(
                {uid: 0, roomid: 7, protover: 0, platform: 'web', type: 2, key: j.data.token})));
            ws.onerror = () => log('error');
            ws.onclose = (e) => log('close ' + e.code);
            ws.onmessage = (m) => {
                const v = new DataView(m.data);
                const op = v.getUint32(8);
                log('op ' + op);
                if (op === 8) ws.send(packet(2, '[object Object]'));
                if (op === 5) log(new TextDecoder().decode(new Uint8Array(m.data, 16)));
            };
        }).catch(e => log('fetch ' + e));
        return true;
        "#,
    );
    web.until(
        "auth reply and heartbeat reply over WSS",
        "return window.wssLog.includes('op 8') && window.wssLog.includes('op 3')",
    );
    let bearer = format!("Bearer {API_KEY}");
    let auth = [("authorization", bearer.as_str())];
    let deadline = Instant::now() + WAIT;
    // The subscription reaches the broker asynchronously: push until the page has it.
    loop {
        let (status, v) = http_json(broker, "POST", "/v1/push/room/7", &auth, &danmu("über wss"));
        assert_eq!(status, 202, "{v}");
        let got = web.eval("return window.wssLog.some(l => l.includes('über wss'))");
        if got == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no danmaku over WSS: {}",
            web.eval("return window.wssLog")
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let log = web.eval("return window.wssLog");
    assert!(
        !log.to_string().contains("error") && !log.to_string().contains("close"),
        "{log}"
    );
    let _ = std::fs::remove_dir_all(&profile);
}
