//! WSS (issue 11): WebSocket over TLS on the same shards, with clients we did not write
//! (Python `ssl` + `websockets`, `openssl s_client`) and with our own (rustls client over a
//! blocking socket), including the edge's own TLS 1.3 record layer past the handshake: records
//! cut anywhere, key updates, a corrupted record, close_notify.
//! Certificates are real (rcgen, self-signed); everything goes over loopback.

mod common;

use common::*;
use net::runtime::Driver;
use proto::id::Encoding;
use proto::ws::{self, FrameDecoder, Message, Opcode};
use rustls::pki_types::ServerName;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SCRIPT: &str = r#"
import json, ssl, struct, sys, brotli
from websockets.sync.client import connect

url, cafile, uid, room, token = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
ctx = ssl.create_default_context(cafile=cafile)
ctx.set_alpn_protocols(["h2", "http/1.1"])

def packet(ver, op, body):
    return struct.pack(">IHHII", 16 + len(body), 16, ver, op, 1) + body

def split(buf):
    out = []
    while buf:
        n, hl, ver, op, seq = struct.unpack(">IHHII", buf[:16])
        out.append((ver, op, seq, buf[16:n]))
        buf = buf[n:]
    return out

with connect(url, ssl=ctx, open_timeout=10, close_timeout=2) as ws:
    print("TLS", ws.socket.version(), ws.socket.selected_alpn_protocol(), flush=True)
    auth = json.dumps({"uid": uid, "roomid": room, "protover": 3, "platform": "web", "type": 2, "key": token}).encode()
    ws.send(packet(1, 7, auth))
    ver, op, seq, body = split(ws.recv(timeout=10))[0]
    assert op == 8 and json.loads(body)["code"] == 0, (op, body)
    ws.send(packet(1, 2, b"[object Object]"))
    msg = ws.recv(timeout=10)
    ver, op, seq, body = split(msg)[0]
    assert op == 3, op
    print("ONLINE", struct.unpack(">I", body)[0], flush=True)
    # A 20 KB frame: Python's ssl cuts it into two records.
    ws.send(packet(1, 2, b"x" * 20000))
    ver, op, seq, body = split(ws.recv(timeout=10))[0]
    assert op == 3, op
    print("BIG HEARTBEAT", flush=True)
    print("READY", flush=True)
    for ver, op, seq, body in split(ws.recv(timeout=10)):
        assert ver == 3 and op == 5, (ver, op)
        for iver, iop, iseq, ibody in split(brotli.decompress(body)):
            j = json.loads(ibody)
            print("GOT", j["cmd"], j["seq"], seq, flush=True)
"#;

fn cert_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("edge-wss-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn wss_config(driver: Driver, brokers: Vec<String>, dir: &Path) -> edge::Config {
    let made = net::tls::self_signed(dir).unwrap();
    edge::Config {
        wss_addr: "127.0.0.1:0".into(),
        tls_cert_path: made.cert_path.display().to_string(),
        tls_key_path: made.key_path.display().to_string(),
        ..edge_config(driver, brokers)
    }
}

fn python_ready() -> bool {
    Command::new("python3")
        .args(["-c", "import ssl, websockets, brotli"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn python_body(driver: Driver) {
    if !python_ready() {
        assert!(
            std::env::var_os("BARRAGE_REQUIRE_INTEROP").is_none(),
            "BARRAGE_REQUIRE_INTEROP is set but python3 lacks websockets or brotli"
        );
        eprintln!("python3 with websockets and brotli unavailable; skipping (pip install -r interop/requirements.txt)");
        return;
    }
    let dir = cert_dir(&format!("py-{driver:?}"));
    let broker = TestBroker::start(1);
    let edge = edge::start(wss_config(driver, vec![broker.addr_string()], &dir)).unwrap();
    broker.wait_links(2);
    let script = dir.join("client.py");
    std::fs::write(&script, SCRIPT).unwrap();
    let url = format!("wss://localhost:{}/sub", edge.wss_addr().unwrap().port());
    let cafile = dir.join(net::tls::SELF_SIGNED_CERT_FILE);
    let mut child = Command::new("python3")
        .arg(&script)
        .arg(&url)
        .arg(&cafile)
        .args(["31", "900", &token(31, 900, 2)])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
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
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "python client failed: {lines:?}");
    assert!(
        lines.iter().any(|l| l.starts_with("TLS TLSv1.3 http/1.1")),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l == "ONLINE 1"), "{lines:?}");
    assert!(lines.iter().any(|l| l == "BIG HEARTBEAT"), "{lines:?}");
    assert!(lines.iter().any(|l| l == "GOT DANMU_MSG 5 5"), "{lines:?}");
    let text = edge.metrics_text();
    assert!(metric_sum(&text, "barrage_edge_tls_handshakes_total") >= 1.0);
    edge.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn python_ssl_websockets_client_over_wss_uring() {
    with_driver(Driver::Uring, python_body);
}

#[test]
fn python_ssl_websockets_client_over_wss_legacy() {
    with_driver(Driver::Legacy, python_body);
}

/// Our own WSS client: rustls over a blocking socket, the WS framing from proto.
struct WssClient {
    tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    buf: Vec<u8>,
    dec: FrameDecoder,
}

impl WssClient {
    fn connect(addr: SocketAddr, ca: &Path) -> WssClient {
        let mut roots = rustls::RootCertStore::empty();
        for c in net::tls::load_certs(ca).unwrap() {
            roots.add(c).unwrap();
        }
        let cfg = rustls::ClientConfig::builder_with_provider(net::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let conn = rustls::ClientConnection::new(
            Arc::new(cfg),
            ServerName::try_from("localhost").unwrap(),
        )
        .unwrap();
        let sock = TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut c = WssClient {
            tls: rustls::StreamOwned::new(conn, sock),
            buf: Vec::new(),
            dec: FrameDecoder::new_client_side(16 * 1024 * 1024),
        };
        c.tls.write_all(&ws_upgrade_request("/sub")).unwrap();
        let deadline = Instant::now() + WAIT;
        while !c.buf.windows(4).any(|w| w == b"\r\n\r\n") {
            assert!(Instant::now() < deadline, "no upgrade response");
            c.fill();
        }
        let end = c.buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head: Vec<u8> = c.buf.drain(..end).collect();
        assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");
        c
    }

    fn fill(&mut self) -> bool {
        let mut b = [0u8; 4096];
        match self.tls.read(&mut b) {
            Ok(0) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&b[..n]);
                true
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                true
            }
            Err(_) => false,
        }
    }

    fn send_packet(&mut self, p: &[u8]) {
        let f = ws::encode_client_frame(Opcode::Binary, p, [1, 2, 3, 4]);
        self.tls.write_all(&f).unwrap();
    }

    fn recv(&mut self) -> Vec<u8> {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.dec.decode(&mut self.buf) {
                Ok(Some(Message::Binary(b))) => return b.to_vec(),
                Ok(Some(other)) => panic!("unexpected message {other:?}"),
                Ok(None) => {}
                Err(e) => panic!("bad frame {e}"),
            }
            assert!(Instant::now() < deadline, "nothing received");
            assert!(self.fill(), "connection closed");
        }
    }

    fn auth(&mut self, uid: u64, room: u64) {
        self.send_packet(&auth_packet(uid, room, 0, token(uid, room, 2)));
        let reply = self.recv();
        let h = proto::packet::parse_header(&reply).unwrap();
        assert_eq!(h.op, proto::packet::op::AUTH_REPLY);
    }

    fn heartbeat(&mut self) -> u32 {
        self.send_packet(&proto::auth::heartbeat_request());
        let r = self.recv();
        assert_eq!(r.len(), 20, "{r:?}");
        u32::from_be_bytes([r[16], r[17], r[18], r[19]])
    }

    fn fingerprint(&self) -> String {
        let certs = self.tls.conn.peer_certificates().unwrap();
        net::tls::fingerprint_sha256(certs[0].as_ref())
    }
}

fn own_client_body(driver: Driver) {
    let dir = cert_dir(&format!("own-{driver:?}"));
    let broker = TestBroker::start(1);
    let edge = edge::start(wss_config(driver, vec![broker.addr_string()], &dir)).unwrap();
    broker.wait_links(2);
    let wss = edge.wss_addr().unwrap();
    let ca1 = dir.join(net::tls::SELF_SIGNED_CERT_FILE);
    let mut a = WssClient::connect(wss, &ca1);
    let fp1 = a.fingerprint();
    a.auth(41, 901);
    assert_eq!(a.heartbeat(), 1);
    broker.wait_seen("SUB", |s| s.iter().any(|x| matches!(x, Seen::Sub(..))));
    // A batch larger than one TLS record arrives whole.
    let batch = big_plain_batch(901, 7, 40_000);
    broker.send(&batch);
    let got = a.recv();
    assert!(got.len() >= 40_000, "{}", got.len());

    // Reload: a new certificate at the same paths serves new handshakes; `a` keeps working.
    let dir2 = cert_dir(&format!("own2-{driver:?}"));
    let made2 = net::tls::self_signed(&dir2).unwrap();
    std::fs::copy(&made2.cert_path, dir.join(net::tls::SELF_SIGNED_CERT_FILE)).unwrap();
    std::fs::copy(&made2.key_path, dir.join(net::tls::SELF_SIGNED_KEY_FILE)).unwrap();
    let (status, body) = http(edge.admin_addr(), "POST", "/admin/reload-tls");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&made2.fingerprint), "{body}");
    let mut b = WssClient::connect(wss, &made2.cert_path);
    assert_eq!(b.fingerprint(), made2.fingerprint);
    assert_ne!(made2.fingerprint, fp1);
    b.auth(42, 901);
    a.heartbeat(); // the old connection is untouched by the reload
    assert_eq!(a.fingerprint(), fp1);
    edge.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&dir2);
}

#[test]
fn own_client_auth_heartbeat_delivery_and_cert_reload_uring() {
    with_driver(Driver::Uring, own_client_body);
}

#[test]
fn own_client_auth_heartbeat_delivery_and_cert_reload_legacy() {
    with_driver(Driver::Legacy, own_client_body);
}

/// Reads until EOF; the bytes the server sent before closing (None: no close within `WAIT`).
fn bytes_before_close(s: &mut TcpStream) -> Option<Vec<u8>> {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut out = Vec::new();
    let mut b = [0u8; 1024];
    loop {
        match s.read(&mut b) {
            Ok(0) => return Some(out),
            Ok(n) => out.extend_from_slice(&b[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return None
            }
            Err(_) => return Some(out),
        }
    }
}

/// Reads until EOF or reset; true if the server closed within `WAIT`.
fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut b = [0u8; 1024];
    loop {
        match s.read(&mut b) {
            Ok(0) | Err(_) => return true,
            Ok(_) => continue,
        }
    }
}

fn bad_input_body(driver: Driver) {
    let dir = cert_dir(&format!("bad-{driver:?}"));
    let mut cfg = wss_config(driver, Vec::new(), &dir);
    // Short enough for the stalled case below to end quickly, long enough that a loaded machine
    // reads the bad records before the deadline (a deadline close sends no alert).
    cfg.handshake_ms_max = 1_500;
    let edge = edge::start(cfg).unwrap();
    let wss = edge.wss_addr().unwrap();

    // Plain HTTP instead of a ClientHello: a fatal alert (record type 21, level 2), then the
    // close.
    let mut s = TcpStream::connect(wss).unwrap();
    s.write_all(&ws_upgrade_request("/sub")).unwrap();
    let got = bytes_before_close(&mut s).expect("closed");
    assert_eq!((got.first(), got.get(5)), (Some(&21), Some(&2)), "{got:?}");
    // A record header claiming more than TLS allows: the alert too (record_overflow).
    let mut s = TcpStream::connect(wss).unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 0x01, 0x00])
        .unwrap();
    let got = bytes_before_close(&mut s).expect("closed");
    assert_eq!((got.first(), got.get(5)), (Some(&21), Some(&2)), "{got:?}");
    // A handshake that stalls half-way (a partial ClientHello): the deadline closes it.
    let mut s = TcpStream::connect(wss).unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0x01, 0x00, 0x01]).unwrap();
    assert!(closed_by_server(&mut s));

    eventually("tls failures counted", || {
        let t = edge.metrics_text();
        metric(&t, "barrage_edge_tls_failed_total{reason=\"bad_record\"}") >= 1.0
            && metric(
                &t,
                "barrage_edge_tls_failed_total{reason=\"record_too_large\"}",
            ) >= 1.0
            && metric(
                &t,
                "barrage_edge_closes_total{reason=\"handshake_timeout\"}",
            ) >= 1.0
            && metric_sum(&t, "barrage_edge_tls_handshaking") == 0.0
    });
    // The listener still serves a good client.
    let mut c = WssClient::connect(wss, &dir.join(net::tls::SELF_SIGNED_CERT_FILE));
    c.send_packet(&proto::auth::heartbeat_request());
    edge.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_tls_input_closes_that_peer_and_is_counted_uring() {
    with_driver(Driver::Uring, bad_input_body);
}

#[test]
fn bad_tls_input_closes_that_peer_and_is_counted_legacy() {
    with_driver(Driver::Legacy, bad_input_body);
}

fn tls_tcp_body(driver: Driver) {
    let dir = cert_dir(&format!("tcp-{driver:?}"));
    let mut cfg = wss_config(driver, Vec::new(), &dir);
    cfg.tls_tcp_addr = "127.0.0.1:0".into();
    let edge = edge::start(cfg).unwrap();
    let addr = edge.tls_tcp_addr().expect("TLS-over-TCP listener");
    let mut roots = rustls::RootCertStore::empty();
    for c in net::tls::load_certs(&dir.join(net::tls::SELF_SIGNED_CERT_FILE)).unwrap() {
        roots.add(c).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(net::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(Arc::new(cfg), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut s = rustls::StreamOwned::new(conn, sock);
    // Raw Bilibili packets inside TLS: auth, then a heartbeat.
    s.write_all(&auth_packet(51, 902, 0, token(51, 902, 2)))
        .unwrap();
    let mut reply = vec![0u8; proto::auth::auth_reply(0).len()];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(reply, proto::auth::auth_reply(0));
    s.write_all(&proto::auth::heartbeat_request()).unwrap();
    let mut hb = [0u8; 20];
    s.read_exact(&mut hb).unwrap();
    assert_eq!(
        proto::packet::parse_header(&hb).unwrap().op,
        proto::packet::op::HEARTBEAT_REPLY
    );
    let t = edge.metrics_text();
    assert_eq!(
        metric(
            &t,
            "barrage_edge_connections{shard=\"0\",transport=\"tls_tcp\"}"
        ) + metric(
            &t,
            "barrage_edge_connections{shard=\"1\",transport=\"tls_tcp\"}"
        ),
        1.0
    );
    edge.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tls_over_raw_tcp_auth_and_heartbeat_uring() {
    with_driver(Driver::Uring, tls_tcp_body);
}

#[test]
fn tls_over_raw_tcp_auth_and_heartbeat_legacy() {
    with_driver(Driver::Legacy, tls_tcp_body);
}

impl WssClient {
    /// Seals `frame` as one record per `per_record` bytes and writes the records to the socket
    /// `per_write` bytes at a time (so records and WS frames straddle reads on the edge).
    fn send_cut(&mut self, frame: &[u8], per_record: usize, per_write: usize) {
        let mut wire = Vec::new();
        for piece in frame.chunks(per_record) {
            self.tls.conn.writer().write_all(piece).unwrap();
            while self.tls.conn.wants_write() {
                self.tls.conn.write_tls(&mut wire).unwrap();
            }
        }
        for piece in wire.chunks(per_write) {
            self.tls.sock.write_all(piece).unwrap();
            self.tls.sock.flush().unwrap();
        }
    }

    /// Seals `plain` into records, flips one ciphertext byte and writes them.
    fn send_corrupted(&mut self, plain: &[u8]) {
        self.tls.conn.writer().write_all(plain).unwrap();
        let mut wire = Vec::new();
        while self.tls.conn.wants_write() {
            self.tls.conn.write_tls(&mut wire).unwrap();
        }
        wire[8] ^= 0x01;
        self.tls.sock.write_all(&wire).unwrap();
    }

    /// Reads until the server closes; the rustls error the close came with (`None`: a clean
    /// close_notify then EOF).
    fn read_until_close(&mut self) -> Option<rustls::Error> {
        let deadline = Instant::now() + WAIT;
        let mut b = [0u8; 4096];
        loop {
            assert!(Instant::now() < deadline, "the server did not close");
            match self.tls.read(&mut b) {
                Ok(0) => return None,
                Ok(_) => continue,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    continue
                }
                Err(e) => {
                    return e
                        .into_inner()
                        .and_then(|i| i.downcast::<rustls::Error>().ok())
                        .map(|b| *b)
                }
            }
        }
    }
}

fn tls_failed(edge: &edge::Handle, reason: &str) -> f64 {
    metric(
        &edge.metrics_text(),
        &format!("barrage_edge_tls_failed_total{{reason=\"{reason}\"}}"),
    )
}

/// The compact TLS 1.3 record layer the edge runs after the handshake (net::record), against
/// rustls' client: records cut anywhere, key updates both ways, large batches over several
/// records, and every bad record closing only its own connection with the right alert.
fn record_layer_body(driver: Driver) {
    let dir = cert_dir(&format!("rec-{driver:?}"));
    let broker = TestBroker::start(1);
    let edge = edge::start(wss_config(driver, vec![broker.addr_string()], &dir)).unwrap();
    broker.wait_links(2);
    let wss = edge.wss_addr().unwrap();
    let ca = dir.join(net::tls::SELF_SIGNED_CERT_FILE);

    let mut a = WssClient::connect(wss, &ca);
    assert_eq!(
        a.tls.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    a.auth(61, 903);
    broker.wait_seen("SUB", |s| s.iter().any(|x| matches!(x, Seen::Sub(..))));
    // A heartbeat frame in 1-byte records, written 3 bytes at a time: every record and the WS
    // frame straddle the edge's reads.
    let hb = ws::encode_client_frame(Opcode::Binary, &proto::auth::heartbeat_request(), [9; 4]);
    a.send_cut(&hb, 1, 3);
    let r = a.recv();
    assert_eq!(
        proto::packet::parse_header(&r).unwrap().op,
        proto::packet::op::HEARTBEAT_REPLY
    );
    // A large client frame (a 20 KB heartbeat body) spans two records.
    let mut big = proto::auth::heartbeat_request().to_vec();
    big.extend(std::iter::repeat_n(b'x', 20_000));
    let len = big.len() as u32;
    big[..4].copy_from_slice(&len.to_be_bytes());
    let f = ws::encode_client_frame(Opcode::Binary, &big, [5; 4]);
    a.send_cut(&f, 16 * 1024, 1000);
    let r = a.recv();
    assert_eq!(
        proto::packet::parse_header(&r).unwrap().op,
        proto::packet::op::HEARTBEAT_REPLY
    );

    // KeyUpdate (rustls asks for ours too): both directions change key and keep working,
    // across a batch of several records.
    a.tls.conn.refresh_traffic_keys().unwrap();
    a.heartbeat();
    broker.send(&big_plain_batch(903, 8, 50_000));
    assert!(a.recv().len() >= 50_000);
    a.tls.conn.refresh_traffic_keys().unwrap();
    a.heartbeat();

    // A corrupted record: bad_record_mac to that peer, the close, counted.
    let mut b = WssClient::connect(wss, &ca);
    b.auth(62, 903);
    b.send_corrupted(&ws::encode_client_frame(
        Opcode::Binary,
        &proto::auth::heartbeat_request(),
        [1; 4],
    ));
    let e = b.read_until_close();
    assert_eq!(
        e,
        Some(rustls::Error::AlertReceived(
            rustls::AlertDescription::BadRecordMac
        )),
        "{e:?}"
    );
    // A plaintext change_cipher_spec after the handshake: unexpected_message.
    let mut c = WssClient::connect(wss, &ca);
    c.auth(63, 903);
    c.tls.sock.write_all(&[20, 3, 3, 0, 1, 1]).unwrap();
    let e = c.read_until_close();
    assert_eq!(
        e,
        Some(rustls::Error::AlertReceived(
            rustls::AlertDescription::UnexpectedMessage
        )),
        "{e:?}"
    );
    // close_notify is answered with close_notify (a clean EOF for the client).
    let mut d = WssClient::connect(wss, &ca);
    d.auth(64, 903);
    d.tls.conn.send_close_notify();
    d.tls.flush().unwrap();
    assert_eq!(d.read_until_close(), None);

    eventually("record-layer failures counted", || {
        tls_failed(&edge, "bad_record_mac") >= 1.0
            && tls_failed(&edge, "unexpected_message") >= 1.0
            && tls_failed(&edge, "peer_closed") >= 1.0
    });
    // The bad peers took nobody else with them.
    a.heartbeat();
    edge.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn compact_record_layer_against_rustls_client_uring() {
    with_driver(Driver::Uring, record_layer_body);
}

#[test]
fn compact_record_layer_against_rustls_client_legacy() {
    with_driver(Driver::Legacy, record_layer_body);
}

/// `openssl s_client` (OpenSSL, not rustls) over WSS: the upgrade, auth and heartbeats, with a
/// KeyUpdate from OpenSSL that asks for ours (`K` at the start of a line, s_client's command)
/// between them; the heartbeat after it is answered under the new keys.
fn openssl_body(driver: Driver) {
    let have = Command::new("openssl")
        .arg("version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        assert!(
            std::env::var_os("BARRAGE_REQUIRE_INTEROP").is_none(),
            "BARRAGE_REQUIRE_INTEROP is set but openssl is not installed"
        );
        eprintln!("openssl unavailable; skipping");
        return;
    }
    let dir = cert_dir(&format!("ossl-{driver:?}"));
    let broker = TestBroker::start(1);
    let edge = edge::start(wss_config(driver, vec![broker.addr_string()], &dir)).unwrap();
    broker.wait_links(2);
    let wss = edge.wss_addr().unwrap();
    let ca = dir.join(net::tls::SELF_SIGNED_CERT_FILE);
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &wss.to_string(),
            "-servername",
            "localhost",
        ])
        .args([
            "-tls1_3",
            "-alpn",
            "http/1.1",
            "-verify_return_error",
            "-CAfile",
        ])
        .arg(&ca)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // The data goes to stdout, s_client's own notes ("KEYUPDATE") to stderr: one stream here.
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let pipes: [Box<dyn Read + Send>; 2] = [
        Box::new(child.stdout.take().unwrap()),
        Box::new(child.stderr.take().unwrap()),
    ];
    for mut pipe in pipes {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut b = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut b) {
                if n == 0 || tx.send(b[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
    }
    let mut seen = Vec::new();
    // Waits until `pat` shows up in s_client's output (after `from`); its end.
    let wait_for = |pat: &[u8], from: usize, seen: &mut Vec<u8>| -> usize {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(at) = seen
                .get(from..)
                .and_then(|s| s.windows(pat.len()).position(|w| w == pat))
            {
                return from + at + pat.len();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(b) => seen.extend_from_slice(&b),
                Err(_) => panic!(
                    "openssl never printed {pat:?}: {}",
                    String::from_utf8_lossy(seen)
                ),
            }
        }
    };
    // Its handshake summary ends with the session details; then the data.
    let at = wait_for(b"Verify return code: 0 (ok)", 0, &mut seen);
    stdin.write_all(&ws_upgrade_request("/sub")).unwrap();
    stdin.flush().unwrap();
    let at = wait_for(b"HTTP/1.1 101", at, &mut seen);
    let frame = |p: &[u8]| ws::encode_client_frame(Opcode::Binary, p, [3, 1, 4, 1]);
    stdin
        .write_all(&frame(&auth_packet(71, 904, 0, token(71, 904, 2))))
        .unwrap();
    stdin.flush().unwrap();
    // op 8 (auth reply) in the server's frame.
    let at = wait_for(&[0, 16, 0, 1, 0, 0, 0, 8], at, &mut seen);
    let hb_reply = [0, 0, 0, 20, 0, 16, 0, 1, 0, 0, 0, 3];
    stdin
        .write_all(&frame(&proto::auth::heartbeat_request()))
        .unwrap();
    stdin.flush().unwrap();
    let at = wait_for(&hb_reply, at, &mut seen);
    // KeyUpdate with update_requested; s_client reads it as a command on its own line.
    stdin.write_all(b"K\n").unwrap();
    stdin.flush().unwrap();
    wait_for(b"KEYUPDATE", at, &mut seen);
    stdin
        .write_all(&frame(&proto::auth::heartbeat_request()))
        .unwrap();
    stdin.flush().unwrap();
    wait_for(&hb_reply, at, &mut seen);
    drop(stdin);
    let _ = child.kill();
    let _ = child.wait();
    edge.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn openssl_s_client_over_wss_with_a_key_update_uring() {
    with_driver(Driver::Uring, openssl_body);
}

#[test]
fn openssl_s_client_over_wss_with_a_key_update_legacy() {
    with_driver(Driver::Legacy, openssl_body);
}

/// How a TLS connection ended, as its client saw it.
#[derive(Debug, PartialEq, Eq)]
enum TlsEnd {
    /// close_notify, then EOF: rustls reads `Ok(0)`.
    CloseNotify,
    /// EOF without close_notify: rustls says `UnexpectedEof` (a cut, or a bare FIN).
    Truncated,
    /// Any other error (an RST, an alert).
    Other(String),
}

impl WssClient {
    /// Reads until the server ends the connection: the WebSocket close code if a close frame
    /// came first, and how the TLS stream ended.
    fn read_until_end(&mut self) -> (Option<u16>, TlsEnd) {
        let deadline = Instant::now() + WAIT;
        let mut code = None;
        let mut b = [0u8; 4096];
        loop {
            assert!(Instant::now() < deadline, "the server did not close");
            while let Ok(Some(m)) = self.dec.decode(&mut self.buf) {
                if let Message::Close(c, _) = m {
                    code = Some(c.unwrap_or(1005));
                }
            }
            match self.tls.read(&mut b) {
                Ok(0) => return (code, TlsEnd::CloseNotify),
                Ok(n) => self.buf.extend_from_slice(&b[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return (code, TlsEnd::Truncated)
                }
                Err(e) => return (code, TlsEnd::Other(e.to_string())),
            }
        }
    }
}

/// The edge ends a TLS connection itself (heartbeat timeout, drain): the WSS client reads the
/// WebSocket close frame, then close_notify, then EOF; TLS over raw TCP gets close_notify.
/// Without close_notify rustls would report a truncated stream.
fn edge_close_body(driver: Driver) {
    let dir = cert_dir(&format!("close-{driver:?}"));
    let broker = TestBroker::start(1);
    let mut cfg = wss_config(driver, vec![broker.addr_string()], &dir);
    cfg.tls_tcp_addr = "127.0.0.1:0".into();
    cfg.heartbeat_timeout_ms = 700;
    cfg.drain_close_per_s = 100;
    let edge = edge::start(cfg).unwrap();
    broker.wait_links(2);
    let wss = edge.wss_addr().unwrap();
    let ca = dir.join(net::tls::SELF_SIGNED_CERT_FILE);

    // Authenticated, then silent: closed after heartbeat_timeout_ms.
    let mut silent = WssClient::connect(wss, &ca);
    silent.auth(71, 904);
    let (code, end) = silent.read_until_end();
    assert!(code.is_some(), "a WebSocket close frame first");
    assert_eq!(end, TlsEnd::CloseNotify, "close code {code:?}");

    // TLS over raw TCP: no WebSocket, close_notify all the same.
    let tcp = edge.tls_tcp_addr().unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in net::tls::load_certs(&ca).unwrap() {
        roots.add(c).unwrap();
    }
    let ccfg = rustls::ClientConfig::builder_with_provider(net::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(Arc::new(ccfg), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let sock = TcpStream::connect(tcp).unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut raw = rustls::StreamOwned::new(conn, sock);
    raw.write_all(&auth_packet(72, 904, 0, token(72, 904, 2)))
        .unwrap();
    let mut rest = Vec::new();
    let end = raw.read_to_end(&mut rest);
    assert!(
        end.is_ok(),
        "close_notify before EOF over TLS-over-TCP: {end:?}"
    );
    assert!(rest.starts_with(&proto::auth::auth_reply(0)), "{rest:?}");

    // A drain closes the live viewer with a close frame, then close_notify.
    let mut live = WssClient::connect(wss, &ca);
    live.auth(73, 904);
    assert_eq!(live.heartbeat(), 1);
    let (status, body) = http(edge.admin_addr(), "POST", "/admin/drain");
    assert_eq!(status, 200, "{body}");
    let (code, end) = live.read_until_end();
    assert_eq!(code, Some(1001), "going away");
    assert_eq!(end, TlsEnd::CloseNotify);

    eventually("close_notify counted", || {
        metric_sum(&edge.metrics_text(), "barrage_edge_tls_close_notify_total") >= 3.0
    });
    edge.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn edge_side_close_sends_close_notify_uring() {
    with_driver(Driver::Uring, edge_close_body);
}

#[test]
fn edge_side_close_sends_close_notify_legacy() {
    with_driver(Driver::Legacy, edge_close_body);
}
