//! A client we did not write: interop/danmaku_client.py (aiohttp + brotli from PyPI) calls
//! getInfoByRoom and getDanmuInfo, connects to `ws://host:ws_port/sub`, authenticates with the
//! guest token and prints the danmaku it receives.
//!
//! Skipped (with a message) only when python3 lacks the modules and `BARRAGE_REQUIRE_INTEROP`
//! is unset; `scripts/test.sh` installs interop/requirements.txt and sets it.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills and reaps the script on every path.
struct Script(Child);

impl Drop for Script {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn python_ready() -> bool {
    Command::new("python3")
        .args(["-c", "import aiohttp, brotli"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn python_client_receives_danmaku_through_discovery() {
    if !python_ready() {
        if std::env::var_os("BARRAGE_REQUIRE_INTEROP").is_some() {
            panic!("BARRAGE_REQUIRE_INTEROP is set but python3 cannot import aiohttp and brotli (pip install -r interop/requirements.txt)");
        }
        eprintln!("SKIPPED interop test: python3 lacks aiohttp/brotli; run `python3 -m pip install -r interop/requirements.txt` (or scripts/test.sh)");
        return;
    }
    let stack = Stack::start(KEYS_V1_V2, KEYS_V1_V2);
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("interop")
        .join("danmaku_client.py");
    let room = 31337u64;
    let mut child = Script(
        Command::new("python3")
            .arg(&script)
            .args([
                "--base",
                &format!("http://{}", stack.control_addr()),
                "--room",
                &room.to_string(),
                "--count",
                "1",
                "--timeout",
                "30",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run python3"),
    );
    let (tx, lines) = std::sync::mpsc::channel();
    let out = child.0.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });

    // The script subscribes asynchronously: push the same danmaku until it prints one.
    let body =
        r#"{"cmd":"DANMU_MSG","info":[[0,1,25,16777215],"来自 Python 的问候",[42,"interop"]]}"#;
    let mut client = broker::IngestClient::connect(stack.ingest_addr(), API_KEY).unwrap();
    let deadline = Instant::now() + WAIT * 2;
    let line = loop {
        if let Ok(Some(status)) = child.0.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.0.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            // It may have printed and exited between two checks.
            if let Ok(l) = lines.try_recv() {
                break l;
            }
            panic!("the script exited ({status}) without printing: {err}");
        }
        assert!(Instant::now() < deadline, "the script printed nothing");
        client.push(&broker::Message::room(room, body)).unwrap();
        if let Ok(l) = lines.recv_timeout(Duration::from_millis(300)) {
            break l;
        }
    };
    let got: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    let want: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(got, want);
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Ok(Some(s)) = child.0.try_wait() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the script did not exit after --count 1"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}
