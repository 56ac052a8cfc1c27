//! Prototype for issue 11's open decision: what does a server-side TLS connection cost us,
//! with rustls' buffered `ServerConnection` or its unbuffered API driven by our own buffers?
//! Everything runs in memory (client and server connections exchange bytes through vectors),
//! so the figures are rustls' own state and work, with no socket or runtime in them.
//!
//! ```text
//! cargo run --release -p net --example tls_cost -- idle none 5000        # baseline
//! cargo run --release -p net --example tls_cost -- idle buffered 5000
//! cargo run --release -p net --example tls_cost -- idle unbuffered 5000
//! cargo run --release -p net --example tls_cost -- idle compact 5000
//! cargo run --release -p net --example tls_cost -- encrypt 200000
//! ```
//!
//! `idle MODE N`: N handshakes (TLS 1.3, the ring provider, net::tls::server_config), each
//! followed by a WebSocket-upgrade-sized exchange (200 B in, 130 B out); the server side is
//! kept (`buffered`, `unbuffered`) or dropped (`none`, the baseline: same work, nothing kept).
//! `compact` is what the edge keeps on TLS 1.3: after the same exchange the keys are taken out
//! (`dangerous_into_kernel_connection`), the rustls connection is dropped, and a
//! `net::record` sealer and opener plus rustls' key-update state are kept.
//! Prints the growth of the process's anonymous RSS per connection. Run each mode in its own
//! process; the cost of a kept connection is MODE minus `none`.
//!
//! `TLS_COST_SUITE=aes128|aes256|chacha` makes the client offer only that TLS 1.3 suite
//! (default: rustls' order, which gives TLS13_AES_256_GCM_SHA384).
//!
//! `encrypt N`: one connection of each kind encrypts N records of a 400-byte batch into a
//! reused buffer; prints ns per record, next to a 400-byte copy as the baseline (`compact`:
//! the `net::record` sealer the edge uses on TLS 1.3).
use net::record::{Keys, Opener, Sealer};
use net::tls::{self, CertStore};
use rustls::client::{ClientConfig, ClientConnection};
use rustls::kernel::KernelConnection;
use rustls::pki_types::ServerName;
use rustls::server::ServerConnectionData;
use rustls::server::{ServerConnection, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, UnbufferedStatus};
use rustls::{ConnectionCommon, RootCertStore};
use std::hint::black_box;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Instant;

/// Counts live heap bytes, so `idle` can tell what rustls keeps per connection (live) from what
/// the allocator holds around it (RSS growth minus live growth: fragmentation left by the
/// handshake's temporary allocations).
struct Counting;

static LIVE_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts sizes.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(l.size(), std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the caller's layout contract is passed through.
        unsafe { std::alloc::System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        LIVE_BYTES.fetch_sub(l.size(), std::sync::atomic::Ordering::Relaxed);
        // SAFETY: `p` came from `alloc` with this layout.
        unsafe { std::alloc::System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live_bytes() -> usize {
    LIVE_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

const UPGRADE_REQUEST_BYTES: usize = 200;
const UPGRADE_RESPONSE_BYTES: usize = 130;
const BATCH_BYTES: usize = 400;
/// Outgoing buffer of the unbuffered driver: one full TLS record and its overhead.
const RECORD_BUFFER_BYTES: usize = 16 * 1024 + 256;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = std::env::temp_dir().join(format!("barrage-tls-cost-{}", std::process::id()));
    let made = tls::self_signed(&dir).expect("self-signed certificate");
    let store = CertStore::load(&made.cert_path, &made.key_path).expect("load");
    let server_cfg = store.server_config().expect("server config");
    let mut roots = RootCertStore::empty();
    roots
        .add(tls::load_certs(&made.cert_path).expect("cert").remove(0))
        .expect("root");
    // The client offers only the suite asked for (TLS_COST_SUITE), so the server uses it.
    let mut client_provider = rustls::crypto::ring::default_provider();
    let suite = std::env::var("TLS_COST_SUITE").unwrap_or_default();
    let pick = match suite.as_str() {
        "aes128" => Some(rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256),
        "aes256" => Some(rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384),
        "chacha" => Some(rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256),
        _ => None,
    };
    if let Some(pick) = pick {
        client_provider.cipher_suites = vec![pick];
    }
    let client_cfg = Arc::new(
        ClientConfig::builder_with_provider(Arc::new(client_provider))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let new_client = || {
        ClientConnection::new(
            client_cfg.clone(),
            ServerName::try_from("localhost").expect("name"),
        )
        .expect("client")
    };
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["idle", mode, n] => {
            let n: usize = n.parse().expect("N");
            idle(mode, n, &server_cfg, new_client);
        }
        ["encrypt", n] => {
            let n: usize = n.parse().expect("N");
            encrypt(n, &server_cfg, new_client);
        }
        _ => eprintln!("usage: tls_cost idle none|buffered|unbuffered|compact N | encrypt N"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// What the edge keeps per TLS 1.3 connection past the handshake (edge/src/tls.rs `Compact`).
#[allow(dead_code)] // kept for its memory, never read
struct Compact {
    tx: Sealer,
    rx: Opener,
    keys: KernelConnection<ServerConnectionData>,
}

fn compact(u: UnbufferedServerConnection) -> Compact {
    let (secrets, keys) = u
        .dangerous_into_kernel_connection()
        .expect("secret extraction (net::tls enables it)");
    let tx = Keys::from_rustls(&secrets.tx.1).expect("tx keys");
    let rx = Keys::from_rustls(&secrets.rx.1).expect("rx keys");
    Compact {
        tx: Sealer::new(&tx, secrets.tx.0).expect("sealer"),
        rx: Opener::new(rx, secrets.rx.0),
        keys,
    }
}

fn rss_anon_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("RssAnon")
        * 1024
}

fn idle(
    mode: &str,
    n: usize,
    cfg: &Arc<rustls::ServerConfig>,
    new_client: impl Fn() -> ClientConnection,
) {
    // Warm up allocator and code paths so the first connection's one-time costs stay out.
    for _ in 0..50 {
        let mut c = new_client();
        let mut s = ServerConnection::new(cfg.clone()).expect("server");
        buffered_session(&mut s, &mut c);
        let mut c = new_client();
        let mut u = UnbufferedServerConnection::new(cfg.clone()).expect("server");
        unbuffered_session(&mut u, &mut c);
    }
    let mut kept_b = Vec::with_capacity(n);
    let mut kept_u = Vec::with_capacity(n);
    let mut kept_c: Vec<Box<Compact>> = Vec::with_capacity(n);
    let before = rss_anon_bytes();
    let live_before = live_bytes();
    let t = Instant::now();
    for _ in 0..n {
        let mut c = new_client();
        match mode {
            "unbuffered" => {
                let mut u = UnbufferedServerConnection::new(cfg.clone()).expect("server");
                unbuffered_session(&mut u, &mut c);
                kept_u.push(u);
            }
            "compact" => {
                let mut u = UnbufferedServerConnection::new(cfg.clone()).expect("server");
                unbuffered_session(&mut u, &mut c);
                kept_c.push(Box::new(compact(u)));
            }
            _ => {
                let mut s = ServerConnection::new(cfg.clone()).expect("server");
                buffered_session(&mut s, &mut c);
                if mode == "buffered" {
                    kept_b.push(s);
                }
            }
        }
    }
    let took = t.elapsed();
    let after = rss_anon_bytes();
    let live = live_bytes().saturating_sub(live_before);
    println!(
        "idle {mode}: live heap {:.0} B per connection (the connection kept inline in a Vec: {} B of it)",
        live as f64 / n as f64,
        match mode {
            "unbuffered" => std::mem::size_of::<UnbufferedServerConnection>(),
            _ => 0,
        },
    );
    println!(
        "idle {mode}: {n} connections, RssAnon {} -> {} KiB, {:.0} B per connection, {:.0} us per handshake (client + server)",
        before / 1024,
        after / 1024,
        (after.saturating_sub(before)) as f64 / n as f64,
        took.as_secs_f64() * 1e6 / n as f64
    );
    println!(
        "inline size: ServerConnection {} B, UnbufferedServerConnection {} B, compact {} B (Sealer {} B, Opener {} B, KernelConnection {} B; boxed)",
        std::mem::size_of::<ServerConnection>(),
        std::mem::size_of::<UnbufferedServerConnection>(),
        std::mem::size_of::<Compact>(),
        std::mem::size_of::<Sealer>(),
        std::mem::size_of::<Opener>(),
        std::mem::size_of::<KernelConnection<ServerConnectionData>>(),
    );
    if let Some(u) = kept_u.first() {
        println!(
            "suite: {:?}",
            u.negotiated_cipher_suite().map(|c| c.suite())
        );
    } else if let Some(b) = kept_b.first() {
        println!(
            "suite: {:?}",
            b.negotiated_cipher_suite().map(|c| c.suite())
        );
    }
    black_box((&kept_b, &kept_u, &kept_c));
}

/// Gives `bytes` (the other side's output) to a connection.
fn feed<D>(to: &mut ConnectionCommon<D>, bytes: &[u8]) {
    let mut s = bytes;
    while !s.is_empty() {
        to.read_tls(&mut s).expect("read_tls");
        to.process_new_packets().expect("process_new_packets");
    }
}

/// Moves what `from` has to send to `to`; false if it had nothing.
fn transfer<A, B>(from: &mut ConnectionCommon<A>, to: &mut ConnectionCommon<B>) -> bool {
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).expect("write_tls");
    }
    if buf.is_empty() {
        return false;
    }
    feed(to, &buf);
    true
}

/// Moves bytes both ways until neither side has anything to send.
fn pump(server: &mut ServerConnection, client: &mut ClientConnection) {
    // `|`, not `||`: both directions every round.
    while transfer(client, server) | transfer(server, client) {}
}

/// Handshake, then an upgrade-sized request and response, with the buffered API.
fn buffered_session(server: &mut ServerConnection, client: &mut ClientConnection) {
    pump(server, client);
    client
        .writer()
        .write_all(&[b'r'; UPGRADE_REQUEST_BYTES])
        .expect("request");
    pump(server, client);
    let mut got = [0u8; UPGRADE_REQUEST_BYTES];
    server
        .reader()
        .read_exact(&mut got)
        .expect("server got request");
    server
        .writer()
        .write_all(&[b'a'; UPGRADE_RESPONSE_BYTES])
        .expect("response");
    pump(server, client);
    let mut back = [0u8; UPGRADE_RESPONSE_BYTES];
    client
        .reader()
        .read_exact(&mut back)
        .expect("client got response");
}

/// Handshake, then the same exchange, with the unbuffered API; the buffers are ours and are
/// dropped at the end, as an edge would release them on an idle connection.
fn unbuffered_session(server: &mut UnbufferedServerConnection, client: &mut ClientConnection) {
    let mut incoming: Vec<u8> = Vec::new();
    let mut outgoing = vec![0u8; RECORD_BUFFER_BYTES];
    let mut out_len = 0;
    let mut request_sent = false;
    let mut got_request = 0usize;
    let mut response_sent = false;
    loop {
        while client.wants_write() {
            client.write_tls(&mut incoming).expect("client write");
        }
        let UnbufferedStatus { discard, state } = server.process_tls_records(&mut incoming[..]);
        let mut blocked = false;
        match state.expect("server state") {
            ConnectionState::EncodeTlsData(mut e) => {
                out_len += e.encode(&mut outgoing[out_len..]).expect("encode");
            }
            ConnectionState::TransmitTlsData(t) => {
                feed(client, &outgoing[..out_len]);
                out_len = 0;
                t.done();
            }
            ConnectionState::BlockedHandshake => blocked = true,
            ConnectionState::ReadTraffic(mut r) => {
                while let Some(rec) = r.next_record() {
                    got_request += rec.expect("record").payload.len();
                }
            }
            ConnectionState::WriteTraffic(mut w) => {
                if !request_sent {
                    client
                        .writer()
                        .write_all(&[b'r'; UPGRADE_REQUEST_BYTES])
                        .expect("request");
                    request_sent = true;
                } else if got_request < UPGRADE_REQUEST_BYTES {
                    blocked = true;
                } else if !response_sent {
                    let n = w
                        .encrypt(&[b'a'; UPGRADE_RESPONSE_BYTES], &mut outgoing)
                        .expect("encrypt");
                    feed(client, &outgoing[..n]);
                    response_sent = true;
                } else {
                    break;
                }
            }
            _ => panic!("unexpected state"),
        }
        incoming.drain(..discard);
        if blocked && !client.wants_write() {
            panic!("both sides blocked");
        }
    }
    let mut back = [0u8; UPGRADE_RESPONSE_BYTES];
    client
        .reader()
        .read_exact(&mut back)
        .expect("client got response");
}

fn encrypt(n: usize, cfg: &Arc<rustls::ServerConfig>, new_client: impl Fn() -> ClientConnection) {
    let batch = [b'x'; BATCH_BYTES];
    let mut c = new_client();
    let mut s = ServerConnection::new(cfg.clone()).expect("server");
    buffered_session(&mut s, &mut c);
    println!(
        "suite: {:?}",
        s.negotiated_cipher_suite().map(|c| c.suite())
    );
    let mut c2 = new_client();
    let mut u = UnbufferedServerConnection::new(cfg.clone()).expect("server");
    unbuffered_session(&mut u, &mut c2);
    let mut c3 = new_client();
    let mut u3 = UnbufferedServerConnection::new(cfg.clone()).expect("server");
    unbuffered_session(&mut u3, &mut c3);
    let mut k = compact(u3);
    // The client reads what the compact sealer wrote: the records are real TLS.
    let mut probe = Vec::new();
    k.tx.seal_all(&[&batch], &mut probe).expect("seal");
    feed(&mut c3, &probe);
    let mut back = [0u8; BATCH_BYTES];
    c3.reader()
        .read_exact(&mut back)
        .expect("client reads a compact record");
    assert_eq!(back, batch);

    let mut sink: Vec<u8> = Vec::with_capacity(RECORD_BUFFER_BYTES);
    let mut out = vec![0u8; RECORD_BUFFER_BYTES];
    let mut results: Vec<(&str, f64)> = Vec::new();
    for round in 0..3 {
        let t = Instant::now();
        for _ in 0..n {
            sink.clear();
            sink.extend_from_slice(black_box(&batch));
            black_box(&sink);
        }
        let copy = t.elapsed().as_nanos() as f64 / n as f64;

        let t = Instant::now();
        for _ in 0..n {
            s.writer().write_all(black_box(&batch)).expect("write");
            sink.clear();
            s.write_tls(&mut sink).expect("write_tls");
            black_box(&sink);
        }
        let buffered = t.elapsed().as_nanos() as f64 / n as f64;

        let t = Instant::now();
        for _ in 0..n {
            let UnbufferedStatus { state, .. } = u.process_tls_records(&mut []);
            match state.expect("state") {
                ConnectionState::WriteTraffic(mut w) => {
                    let k = w.encrypt(black_box(&batch), &mut out).expect("encrypt");
                    black_box(&out[..k]);
                }
                _ => panic!("not in WriteTraffic"),
            }
        }
        let unbuffered = t.elapsed().as_nanos() as f64 / n as f64;

        let t = Instant::now();
        for _ in 0..n {
            sink.clear();
            k.tx.seal_all(&[black_box(&batch)], &mut sink)
                .expect("seal");
            black_box(&sink);
        }
        let compact = t.elapsed().as_nanos() as f64 / n as f64;
        println!(
            "round {round}: copy {copy:.0} ns, buffered {buffered:.0} ns, unbuffered {unbuffered:.0} ns, compact {compact:.0} ns per {BATCH_BYTES} B record ({} B on the wire)",
            sink.len()
        );
        results.push(("copy", copy));
        results.push(("buffered", buffered));
        results.push(("unbuffered", unbuffered));
        results.push(("compact", compact));
    }
    for name in ["copy", "buffered", "unbuffered", "compact"] {
        let mut v: Vec<f64> = results
            .iter()
            .filter(|r| r.0 == name)
            .map(|r| r.1)
            .collect();
        v.sort_by(f64::total_cmp);
        println!("median {name}: {:.0} ns per record", v[v.len() / 2]);
    }
}
