//! HTTP server and client over real loopback sockets, under both monoio drivers.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use net::http::{request, serve, ClientError, Handler, Request, Response};
use net::runtime::{block_on, Driver};
use net::wake::Notify;

const BODY_MAX: usize = 1024;
const TIMEOUT: Duration = Duration::from_secs(10);

fn drivers() -> Vec<Driver> {
    let mut d = vec![Driver::Legacy];
    if monoio::utils::detect_uring() {
        d.push(Driver::Uring);
    } else {
        eprintln!("io_uring unavailable: testing the legacy driver only");
    }
    d
}

/// Echoes what it saw as JSON.
fn echo_handler() -> Handler {
    Rc::new(|req: Request| {
        Box::pin(async move {
            let v = serde_json::json!({
                "method": req.method,
                "path": req.path,
                "q": req.query_param("q"),
                "bearer": req.bearer(),
                "x": req.header("X-Test"),
                "body": String::from_utf8_lossy(&req.body),
                "peer_set": req.peer.is_some(),
            });
            Response::json(200, &v).with_header("x-served-by", "test")
        })
    })
}

/// A server on its own thread and runtime; stop it by notifying.
struct Server {
    addr: SocketAddr,
    stop: Arc<Notify>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(driver: Driver) -> Server {
        let std_l = net::sys::listener("127.0.0.1:0".parse().unwrap(), false, 128).unwrap();
        let addr = std_l.local_addr().unwrap();
        let stop = Notify::new();
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            block_on(driver, async move {
                let l = monoio::net::TcpListener::from_std(std_l).unwrap();
                serve(l, echo_handler(), BODY_MAX, async move {
                    stop2.notified().await
                })
                .await;
            })
        });
        Server {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.notify();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn raw_client(addr: SocketAddr) -> std::net::TcpStream {
    let s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s
}

/// Reads one response with a Content-Length body; returns (head, body).
fn read_response(s: &mut std::net::TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        // EINTR happens here under load (signals to the test process); retry like read_exact does.
        let n = match s.read(&mut byte) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => r.unwrap(),
        };
        assert_eq!(
            n,
            1,
            "connection closed mid-head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0; len];
    s.read_exact(&mut body).unwrap();
    (head, body)
}

#[test]
fn get_and_post_with_request() {
    for driver in drivers() {
        let srv = Server::start(driver);
        let addr = srv.addr.to_string();
        block_on(driver, async move {
            let r = request(
                &addr,
                "GET",
                "/hello?q=a%20b+c&z",
                &[("authorization", "Bearer tok123"), ("x-test", "yes")],
                b"",
                TIMEOUT,
            )
            .await
            .unwrap();
            assert_eq!(r.status, 200);
            assert_eq!(r.header("X-Served-By"), Some("test"));
            assert_eq!(r.header("content-type"), Some("application/json"));
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(v["method"], "GET");
            assert_eq!(v["path"], "/hello");
            assert_eq!(v["q"], "a b c");
            assert_eq!(v["bearer"], "tok123");
            assert_eq!(v["x"], "yes");
            assert_eq!(v["peer_set"], true);

            let r = request(
                &addr,
                "POST",
                "/post",
                &[("content-type", "text/plain")],
                b"payload bytes",
                TIMEOUT,
            )
            .await
            .unwrap();
            assert_eq!(r.status, 200);
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(v["method"], "POST");
            assert_eq!(v["body"], "payload bytes");
        });
    }
}

#[test]
fn keep_alive_two_requests_one_connection() {
    for driver in drivers() {
        let srv = Server::start(driver);
        let mut s = raw_client(srv.addr);
        s.write_all(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let (head, body) = read_response(&mut s);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(String::from_utf8_lossy(&body).contains("\"/one\""));
        s.write_all(b"POST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
            .unwrap();
        let (head, body) = read_response(&mut s);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["path"], "/two");
        assert_eq!(v["body"], "abc");
    }
}

#[test]
fn oversized_body_gets_413() {
    for driver in drivers() {
        let srv = Server::start(driver);
        let addr = srv.addr.to_string();
        let big = vec![b'x'; BODY_MAX + 1];
        block_on(driver, async move {
            let r = request(&addr, "POST", "/big", &[], &big, TIMEOUT)
                .await
                .unwrap();
            assert_eq!(r.status, 413);
            // Exactly at the cap is fine.
            let r = request(&addr, "POST", "/ok", &[], &big[..BODY_MAX], TIMEOUT)
                .await
                .unwrap();
            assert_eq!(r.status, 200);
        });
        // A chunked body has no Content-Length; the cap applies while reading.
        let mut s = raw_client(srv.addr);
        let chunk = vec![b'y'; 600];
        let mut msg =
            b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..2 {
            msg.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            msg.extend_from_slice(&chunk);
            msg.extend_from_slice(b"\r\n");
        }
        msg.extend_from_slice(b"0\r\n\r\n");
        s.write_all(&msg).unwrap();
        let (head, _) = read_response(&mut s);
        assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    }
}

#[test]
fn garbage_closes_only_that_connection() {
    for driver in drivers() {
        let srv = Server::start(driver);
        let mut bad = raw_client(srv.addr);
        bad.write_all(b"\x16\x03\x01 not http at all\r\n\r\n")
            .unwrap();
        let mut sink = Vec::new();
        // The server answers 400 or just closes; either way the read ends.
        let _ = bad.read_to_end(&mut sink);
        let mut good = raw_client(srv.addr);
        good.write_all(b"GET /still-up HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let (head, _) = read_response(&mut good);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
}

#[test]
fn request_times_out_on_silent_server() {
    for driver in drivers() {
        // Accepts (via the backlog) but never answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap().to_string();
        block_on(driver, async move {
            let r = request(&addr, "GET", "/", &[], b"", Duration::from_millis(200)).await;
            assert!(matches!(r, Err(ClientError::Timeout)), "{r:?}");
        });
        drop(silent);
    }
}

#[test]
fn request_to_closed_port_is_io_error() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    drop(l);
    for driver in drivers() {
        let addr = addr.clone();
        block_on(driver, async move {
            let r = request(&addr, "GET", "/", &[], b"", TIMEOUT).await;
            assert!(matches!(r, Err(ClientError::Io(_))), "{r:?}");
        });
    }
}

#[test]
fn stop_ends_serve_and_closes_idle_connections() {
    for driver in drivers() {
        let srv = Server::start(driver);
        let mut idle = raw_client(srv.addr);
        idle.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let (head, _) = read_response(&mut idle);
        assert!(head.starts_with("HTTP/1.1 200"));
        let addr = srv.addr;
        drop(srv); // notifies stop and joins the server thread: serve() returned
        let mut rest = Vec::new();
        let n = idle.read_to_end(&mut rest).unwrap_or(0);
        assert_eq!(
            n, 0,
            "idle keep-alive connection should be closed after stop"
        );
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "listener should be closed"
        );
    }
}

#[test]
fn idle_connection_is_closed() {
    use net::http::{serve_with, ServeConfig};
    for driver in drivers() {
        let std_l = net::sys::listener("127.0.0.1:0".parse().unwrap(), false, 128).unwrap();
        let addr = std_l.local_addr().unwrap();
        let stop = Notify::new();
        let stop2 = stop.clone();
        let th = std::thread::spawn(move || {
            block_on(driver, async move {
                let l = monoio::net::TcpListener::from_std(std_l).unwrap();
                let mut cfg = ServeConfig::new(BODY_MAX);
                cfg.limits.idle_ms = 100;
                serve_with(
                    l,
                    echo_handler(),
                    cfg,
                    async move { stop2.notified().await },
                )
                .await;
            })
        });
        let mut c = raw_client(addr);
        c.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let (head, _) = read_response(&mut c);
        assert!(head.starts_with("HTTP/1.1 200"));
        // The server, still running, closes the idle connection (read timeout bounds the wait).
        let mut rest = Vec::new();
        assert_eq!(c.read_to_end(&mut rest).unwrap(), 0);
        // And keeps accepting.
        let mut c2 = raw_client(addr);
        c2.write_all(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let (head, _) = read_response(&mut c2);
        assert!(head.starts_with("HTTP/1.1 200"));
        stop.notify();
        th.join().unwrap();
    }
}

/// A server on its own thread with `cfg`; stop it by notifying.
fn start_with(driver: Driver, cfg: net::http::ServeConfig) -> Server {
    let std_l = net::sys::listener("127.0.0.1:0".parse().unwrap(), false, 1024).unwrap();
    let addr = std_l.local_addr().unwrap();
    let stop = Notify::new();
    let stop2 = stop.clone();
    let thread = std::thread::spawn(move || {
        block_on(driver, async move {
            let l = monoio::net::TcpListener::from_std(std_l).unwrap();
            net::http::serve_with(
                l,
                echo_handler(),
                cfg,
                async move { stop2.notified().await },
            )
            .await;
        })
    });
    Server {
        addr,
        stop,
        thread: Some(thread),
    }
}

/// A client connection from a chosen loopback address (127.0.0.0/8 is all ours).
fn client_from(local: [u8; 4], addr: SocketAddr) -> std::net::TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from((local, 0)).into()).unwrap();
    s.connect(&addr.into()).unwrap();
    let s: std::net::TcpStream = s.into();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s
}

fn assert_503_retry_after(s: &mut std::net::TcpStream) {
    let (head, body) = read_response(s);
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"], "overloaded", "{v}");
}

#[test]
fn connection_cap_answers_503_with_retry_after() {
    let mut cfg = net::http::ServeConfig::new(BODY_MAX);
    cfg.limits.conns_max = 1;
    cfg.limits.conns_reserved = 0;
    let srv = start_with(Driver::Legacy, cfg);
    let mut first = raw_client(srv.addr);
    first
        .write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (head, _) = read_response(&mut first);
    assert!(head.starts_with("HTTP/1.1 200"));
    let mut second = raw_client(srv.addr);
    assert_503_retry_after(&mut second);
    let mut rest = Vec::new();
    assert_eq!(
        second.read_to_end(&mut rest).unwrap_or(0),
        0,
        "closed after the 503"
    );
}

/// Regression (issue 17, defect 3): a connection that sends `Content-Length: 100` and nothing
/// more was never timed out, so a few thousand of them locked the server. Now it gets 408.
#[test]
fn stalled_body_gets_408_and_is_closed() {
    for driver in drivers() {
        let mut cfg = net::http::ServeConfig::new(BODY_MAX);
        cfg.limits.body_grace_ms = 300;
        let srv = start_with(driver, cfg);
        let mut s = raw_client(srv.addr);
        let t = std::time::Instant::now();
        s.write_all(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
            .unwrap();
        let (head, body) = read_response(&mut s);
        assert!(head.starts_with("HTTP/1.1 408"), "{head}");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "body_timeout");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        let mut rest = Vec::new();
        assert_eq!(s.read_to_end(&mut rest).unwrap_or(0), 0);
    }
}

/// A body that keeps up the minimum rate is served even when it takes longer than the grace.
#[test]
fn slow_but_steady_body_is_served() {
    let mut cfg = net::http::ServeConfig::new(BODY_MAX);
    cfg.limits.body_grace_ms = 200;
    cfg.limits.body_bytes_per_s_min = 100;
    let srv = start_with(Driver::Legacy, cfg);
    let mut s = raw_client(srv.addr);
    s.write_all(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n")
        .unwrap();
    // 40 bytes over ~400 ms: 100 B/s, past the 200 ms grace but never behind the rate.
    for _ in 0..8 {
        s.write_all(b"xxxxx").unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    let (head, _) = read_response(&mut s);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

/// Regression (defect 3): a head sent a byte at a time (slowloris) held its slot forever.
#[test]
fn slow_head_is_closed_at_the_head_deadline() {
    for driver in drivers() {
        let mut cfg = net::http::ServeConfig::new(BODY_MAX);
        cfg.limits.head_ms_max = 300;
        let srv = start_with(driver, cfg);
        let mut s = raw_client(srv.addr);
        let t = std::time::Instant::now();
        let head = b"GET /slow HTTP/1.1\r\nHost: x\r\nX-A: ";
        let mut closed = false;
        for i in 0..60 {
            // One byte every 50 ms: never idle, never done.
            if s.write_all(&[head.get(i).copied().unwrap_or(b'a')])
                .is_err()
            {
                closed = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if !closed {
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let mut rest = Vec::new();
            closed = matches!(s.read_to_end(&mut rest), Ok(0)) || rest.is_empty();
        }
        assert!(closed, "slow head not closed after {:?}", t.elapsed());
        // A silent connection (no byte at all) is closed at the same deadline.
        let mut silent = raw_client(srv.addr);
        let mut rest = Vec::new();
        assert_eq!(silent.read_to_end(&mut rest).unwrap_or(0), 0);
    }
}

/// Regression (defect 3): one address could take every connection slot.
#[test]
fn per_address_cap_refuses_only_that_address() {
    let mut cfg = net::http::ServeConfig::new(BODY_MAX);
    cfg.limits.conns_per_addr_max = 3;
    let srv = start_with(Driver::Legacy, cfg);
    let held: Vec<_> = (0..3)
        .map(|_| client_from([127, 0, 0, 2], srv.addr))
        .collect();
    // Let the server account for them before the next one arrives.
    std::thread::sleep(Duration::from_millis(100));
    let mut over = client_from([127, 0, 0, 2], srv.addr);
    assert_503_retry_after(&mut over);
    let mut other = client_from([127, 0, 0, 3], srv.addr);
    other
        .write_all(b"GET /fine HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (head, _) = read_response(&mut other);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    drop(held);
    // Their slots come back once they close.
    std::thread::sleep(Duration::from_millis(100));
    let mut again = client_from([127, 0, 0, 2], srv.addr);
    again
        .write_all(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (head, _) = read_response(&mut again);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

/// Regression (defect 3): with the public side full, health checks (and a role's heartbeats)
/// still get through on the reserved slots; other paths get 503 + Retry-After.
#[test]
fn reserved_slots_serve_only_reserved_paths() {
    let mut cfg = net::http::ServeConfig::new(BODY_MAX);
    cfg.limits.conns_max = 8;
    cfg.limits.conns_reserved = 2;
    cfg.reserved_paths = vec!["/healthz".into(), "/beat".into()];
    let srv = start_with(Driver::Legacy, cfg);
    // Six stalled connections fill the public side, each from its own address.
    let held: Vec<_> = (0..6u8)
        .map(|i| client_from([127, 0, 1, 10 + i], srv.addr))
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let mut public = client_from([127, 0, 1, 50], srv.addr);
    public
        .write_all(b"GET /v1/connect HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_503_retry_after(&mut public);
    drop(public);
    std::thread::sleep(Duration::from_millis(50));
    for path in ["/healthz", "/beat"] {
        let mut s = client_from([127, 0, 1, 51], srv.addr);
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .unwrap();
        let (head, _) = read_response(&mut s);
        assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
    }
    drop(held);
}

/// Benchmark, run by name: `cargo test -p net --release --test http bench_request_rate -- --ignored --nocapture`.
/// Reports sequential request() calls per second (one connection each) against serve().
#[test]
#[ignore]
fn bench_request_rate() {
    const N: u32 = 5_000;
    for driver in drivers() {
        let srv = Server::start(driver);
        let addr = srv.addr.to_string();
        let (ok, secs) = block_on(driver, async move {
            let t = std::time::Instant::now();
            let mut ok = 0u32;
            for _ in 0..N {
                if let Ok(r) =
                    request(&addr, "POST", "/bench?q=1", &[], b"0123456789", TIMEOUT).await
                {
                    ok += u32::from(r.status == 200);
                }
            }
            (ok, t.elapsed().as_secs_f64())
        });
        assert_eq!(ok, N);
        println!(
            "{driver:?}: {N} requests (new connection each) in {secs:.3}s = {:.0} req/s",
            f64::from(N) / secs
        );
    }
}

/// A body over the cap (but within the drain allowance) is read and discarded, so the client
/// sees the 413 instead of a reset while writing.
#[test]
fn big_oversized_body_still_gets_413() {
    for driver in drivers() {
        let srv = Server::start(driver);
        let addr = srv.addr.to_string();
        let big = vec![b'x'; 4 << 20];
        block_on(driver, async move {
            for _ in 0..3 {
                let r = request(&addr, "POST", "/big", &[], &big, TIMEOUT)
                    .await
                    .unwrap();
                assert_eq!(r.status, 413);
            }
        });
    }
}
