//! net::tls over real loopback sockets: a rustls client handshakes with a server serving a
//! `CertStore`, checks the certificate it got, and talks over it; reloads serve the new
//! certificate to new handshakes while an open connection keeps working; bad files fail
//! with the error that names them.

use net::tls::{self, CertStore, TlsError};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConnection, StreamOwned};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

const IO_TIMEOUT: Duration = Duration::from_secs(5);

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("barrage-tls-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A server on 127.0.0.1:0 that serves `conns` connections, each on its own thread: it echoes
/// every line back until the client closes.
fn serve(config: Arc<rustls::ServerConfig>, conns: usize) -> (u16, thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let h = thread::spawn(move || {
        let mut workers = Vec::new();
        for _ in 0..conns {
            let (sock, _) = listener.accept().unwrap();
            sock.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            sock.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
            let conn = ServerConnection::new(config.clone()).unwrap();
            workers.push(thread::spawn(move || {
                let mut tls = BufReader::new(StreamOwned::new(conn, sock));
                let mut line = String::new();
                while tls.read_line(&mut line).unwrap_or(0) > 0 {
                    let s = tls.get_mut();
                    if s.write_all(line.as_bytes())
                        .and_then(|_| s.flush())
                        .is_err()
                    {
                        break;
                    }
                    line.clear();
                }
            }));
        }
        for w in workers {
            w.join().unwrap();
        }
    });
    (port, h)
}

struct Client {
    tls: BufReader<StreamOwned<ClientConnection, TcpStream>>,
}

impl Client {
    fn connect(port: u16, roots: &[CertificateDer<'static>], name: &str) -> Client {
        let mut store = RootCertStore::empty();
        for r in roots {
            store.add(r.clone()).unwrap();
        }
        let mut cfg = ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(store)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let conn = ClientConnection::new(
            Arc::new(cfg),
            ServerName::try_from(name.to_string()).unwrap(),
        )
        .unwrap();
        let sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
        sock.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        sock.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        Client {
            tls: BufReader::new(StreamOwned::new(conn, sock)),
        }
    }

    /// Sends a line, returns the echo (completes the handshake on first use).
    fn echo(&mut self, line: &str) -> String {
        let s = self.tls.get_mut();
        s.write_all(format!("{line}\n").as_bytes()).unwrap();
        s.flush().unwrap();
        let mut back = String::new();
        self.tls.read_line(&mut back).unwrap();
        back.trim_end().to_string()
    }

    fn peer_leaf(&self) -> Vec<u8> {
        self.tls.get_ref().conn.peer_certificates().unwrap()[0]
            .as_ref()
            .to_vec()
    }
}

fn der(path: &Path) -> CertificateDer<'static> {
    tls::load_certs(path).unwrap().remove(0)
}

#[test]
fn a_client_handshakes_with_the_self_signed_certificate() {
    let dir = temp_dir("self");
    let made = tls::self_signed(&dir).unwrap();
    assert!(made.created);
    let again = tls::self_signed(&dir).unwrap();
    assert_eq!(
        (again.created, &again.fingerprint),
        (false, &made.fingerprint),
        "kept on restart"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&made.key_path).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    let store = CertStore::load(&made.cert_path, &made.key_path).unwrap();
    assert_eq!(store.fingerprint(), made.fingerprint);
    assert_eq!(made.fingerprint.len(), 32 * 3 - 1);
    let (port, server) = serve(store.server_config().unwrap(), 2);
    let root = der(&made.cert_path);
    // Valid for the name and for the IP address.
    for name in ["localhost", "127.0.0.1"] {
        let mut c = Client::connect(port, std::slice::from_ref(&root), name);
        assert_eq!(c.echo("hello"), "hello");
        assert_eq!(c.peer_leaf(), root.as_ref());
        let conn = &c.tls.get_ref().conn;
        assert_eq!(conn.alpn_protocol(), Some(&b"http/1.1"[..]));
        assert_eq!(tls::fingerprint_sha256(&c.peer_leaf()), made.fingerprint);
    }
    server.join().unwrap();
}

#[test]
fn reload_serves_the_new_certificate_and_keeps_open_connections() {
    let dir = temp_dir("reload");
    let a = tls::self_signed(&dir.join("a")).unwrap();
    let b = tls::self_signed(&dir.join("b")).unwrap();
    let live_cert = dir.join("cert.pem");
    let live_key = dir.join("key.pem");
    std::fs::copy(&a.cert_path, &live_cert).unwrap();
    std::fs::copy(&a.key_path, &live_key).unwrap();
    let store = CertStore::load(&live_cert, &live_key).unwrap();
    let (port, server) = serve(store.server_config().unwrap(), 3);
    let roots = [der(&a.cert_path), der(&b.cert_path)];

    let mut old = Client::connect(port, &roots, "localhost");
    assert_eq!(old.echo("before"), "before");
    assert_eq!(old.peer_leaf(), roots[0].as_ref());

    std::fs::copy(&b.cert_path, &live_cert).unwrap();
    std::fs::copy(&b.key_path, &live_key).unwrap();
    assert_eq!(store.reload().unwrap(), b.fingerprint);
    let mut new = Client::connect(port, &roots, "localhost");
    assert_eq!(new.echo("after"), "after");
    assert_eq!(new.peer_leaf(), roots[1].as_ref());
    // The connection made before the reload is untouched.
    assert_eq!(old.echo("still here"), "still here");

    // A broken file: the reload fails, naming it, and B keeps serving.
    std::fs::write(&live_cert, b"-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap();
    let err = store.reload().unwrap_err();
    assert!(
        matches!(err, TlsError::Pem { ref path, .. } if path == &live_cert),
        "{err}"
    );
    assert_eq!(store.fingerprint(), b.fingerprint);
    let mut third = Client::connect(port, &roots, "localhost");
    assert_eq!(third.echo("x"), "x");
    assert_eq!(third.peer_leaf(), roots[1].as_ref());
    drop((old, new, third));
    server.join().unwrap();
}

#[test]
fn bad_files_fail_with_errors_that_name_them() {
    let dir = temp_dir("bad");
    let a = tls::self_signed(&dir.join("a")).unwrap();
    let b = tls::self_signed(&dir.join("b")).unwrap();
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, b"hello, this is not PEM at all\n").unwrap();
    let broken = dir.join("broken.pem");
    std::fs::write(&broken, b"-----BEGIN CERTIFICATE-----\nMIIB\n").unwrap();
    let big = dir.join("big.pem");
    std::fs::write(&big, vec![b'A'; tls::TLS_PEM_BYTES_MAX as usize + 1]).unwrap();

    let err = |c: &Path, k: &Path| CertStore::load(c, k).unwrap_err();
    assert!(matches!(
        err(&garbage, &a.key_path),
        TlsError::NoCertificate { .. }
    ));
    assert!(matches!(err(&broken, &a.key_path), TlsError::Pem { .. }));
    assert!(matches!(err(&big, &a.key_path), TlsError::TooLarge { .. }));
    assert!(matches!(
        err(&dir.join("missing.pem"), &a.key_path),
        TlsError::Read { .. }
    ));
    // A certificate where the key should be: no key.
    assert!(matches!(
        err(&a.cert_path, &a.cert_path),
        TlsError::NoKey { .. }
    ));
    assert!(matches!(
        err(&a.cert_path, &garbage),
        TlsError::NoKey { .. }
    ));
    // A certificate with another certificate's key.
    let e = err(&a.cert_path, &b.key_path);
    assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e}");
    assert!(
        e.to_string().contains(&*b.key_path.to_string_lossy()),
        "{e}"
    );
}
