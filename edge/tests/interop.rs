//! Interoperability with a WebSocket client we did not write: Python `websockets` with
//! `brotli` (PyPI). It handshakes, authenticates, heartbeats and decodes a brotli batch.
//! Skipped, with a printed note, when `python3 -c "import websockets, brotli"` fails
//! (`pip install websockets brotli` provides them).

mod common;

use common::*;
use net::runtime::Driver;
use proto::id::Encoding;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SCRIPT: &str = r#"
import json, struct, sys, brotli
from websockets.sync.client import connect

url, uid, room, token = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

def packet(ver, op, body):
    return struct.pack(">IHHII", 16 + len(body), 16, ver, op, 1) + body

def split(buf):
    out = []
    while buf:
        n, hl, ver, op, seq = struct.unpack(">IHHII", buf[:16])
        out.append((ver, op, seq, buf[16:n]))
        buf = buf[n:]
    return out

with connect(url, open_timeout=10, close_timeout=2) as ws:
    auth = json.dumps({"uid": uid, "roomid": room, "protover": 3, "platform": "web", "type": 2, "key": token}).encode()
    ws.send(packet(1, 7, auth))
    msg = ws.recv(timeout=10)
    ver, op, seq, body = split(msg)[0]
    assert op == 8 and json.loads(body)["code"] == 0, (op, body)
    ws.send(packet(1, 2, b"[object Object]"))
    msg = ws.recv(timeout=10)
    assert len(msg) == 20, len(msg)
    ver, op, seq, body = split(msg)[0]
    assert op == 3 and ver == 1, (op, ver)
    print("ONLINE", struct.unpack(">I", body)[0], flush=True)
    print("READY", flush=True)
    msg = ws.recv(timeout=10)
    for ver, op, seq, body in split(msg):
        assert ver == 3 and op == 5, (ver, op)
        for iver, iop, iseq, ibody in split(brotli.decompress(body)):
            j = json.loads(ibody)
            print("GOT", j["cmd"], j["seq"], seq, flush=True)
"#;

fn python_ready() -> bool {
    Command::new("python3")
        .args(["-c", "import websockets, brotli"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn interop_body(driver: Driver) {
    if !python_ready() {
        // CI (scripts/test.sh) sets BARRAGE_REQUIRE_INTEROP and installs interop/requirements.txt:
        // there a missing package is a failure, not a skip.
        assert!(
            std::env::var_os("BARRAGE_REQUIRE_INTEROP").is_none(),
            "BARRAGE_REQUIRE_INTEROP is set but python3 lacks websockets or brotli"
        );
        eprintln!("python3 with websockets and brotli unavailable; skipping the interop test (pip install websockets brotli)");
        return;
    }
    let broker = TestBroker::start(1);
    let edge = edge::start(edge_config(driver, vec![broker.addr_string()])).unwrap();
    broker.wait_links(2);
    let script = std::env::temp_dir().join(format!(
        "edge-interop-{}-{:?}.py",
        std::process::id(),
        driver
    ));
    std::fs::write(&script, SCRIPT).unwrap();
    let url = format!("ws://{}/sub", edge.ws_addr());
    let mut child = Command::new("python3")
        .arg(&script)
        .args([url.as_str(), "31", "900", &token(31, 900, 2)])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut sent = false;
    loop {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        let line = line.trim().to_string();
        if line == "READY" && !sent {
            broker.wait_seen("SUB", |s| s.iter().any(|x| matches!(x, Seen::Sub(..))));
            broker.send(&room_batch(900, 5, Encoding::Brotli, 300));
            sent = true;
        }
        lines.push(line);
        assert!(
            Instant::now() < deadline,
            "interop client too slow: {lines:?}"
        );
    }
    let status = child.wait().unwrap();
    let _ = std::fs::remove_file(&script);
    assert!(status.success(), "python client failed: {lines:?}");
    assert!(lines.iter().any(|l| l == "ONLINE 1"), "{lines:?}");
    assert!(lines.iter().any(|l| l == "GOT DANMU_MSG 5 5"), "{lines:?}");
    edge.shutdown();
}

#[test]
fn python_websockets_client_uring() {
    with_driver(Driver::Uring, interop_body);
}

#[test]
fn python_websockets_client_legacy() {
    with_driver(Driver::Legacy, interop_body);
}
