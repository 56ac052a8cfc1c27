//! TLS for WSS and TLS over TCP (issue 11): rustls with the ring provider only.
//!
//! - [`server_config`]: TLS 1.3 and 1.2, ALPN `http/1.1`, no session tickets and no session
//!   cache (both cost memory per client for a resumption our clients do not need: they hold one
//!   long connection).
//! - [`CertStore`]: the certificate and key from `tls_cert_path` / `tls_key_path`, behind a
//!   lock that only handshakes read. [`CertStore::reload`] (SIGHUP, `POST /admin/reload-tls`)
//!   swaps them for new handshakes; a connection keeps the certificate it was made with, and a
//!   reload that fails keeps the old one serving.
//! - [`self_signed`]: a certificate for `localhost` and `127.0.0.1` written to a directory, with
//!   its SHA-256 fingerprint, for `barrage up` without a certificate.
//!
//! Every error names the file and what is wrong with it ([`TlsError`]).

use ring::digest;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// The only ALPN protocol offered: WebSocket upgrades are HTTP/1.1.
pub const TLS_ALPN_PROTOCOL: &[u8] = b"http/1.1";
/// Largest PEM file read (a chain of a few certificates is a few KiB).
pub const TLS_PEM_BYTES_MAX: u64 = 1024 * 1024;
/// File names [`self_signed`] writes.
pub const SELF_SIGNED_CERT_FILE: &str = "tls-cert.pem";
pub const SELF_SIGNED_KEY_FILE: &str = "tls-key.pem";
/// Names the self-signed certificate is valid for.
pub const SELF_SIGNED_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

/// Why TLS could not be set up. Each is a fault of the files or config given, not of a peer.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    /// The file is larger than `TLS_PEM_BYTES_MAX`.
    #[error("{path} is larger than {TLS_PEM_BYTES_MAX} bytes: not a PEM certificate or key")]
    TooLarge { path: PathBuf },
    /// The file is not valid PEM.
    #[error("{path} is not valid PEM: {detail}")]
    Pem { path: PathBuf, detail: String },
    /// The certificate file holds no `CERTIFICATE` block.
    #[error("{path} holds no CERTIFICATE block")]
    NoCertificate { path: PathBuf },
    /// The key file holds no private key block (PKCS#8, PKCS#1 or SEC1).
    #[error("{path} holds no PRIVATE KEY block")]
    NoKey { path: PathBuf },
    /// The key is of a type the ring provider cannot sign with.
    #[error("{path}: unsupported private key: {detail}")]
    Key { path: PathBuf, detail: String },
    /// The key does not belong to the certificate.
    #[error("the key in {key_path} does not match the certificate in {cert_path}")]
    KeyMismatch {
        cert_path: PathBuf,
        key_path: PathBuf,
    },
    /// rustls refused the protocol configuration.
    #[error("TLS configuration refused: {0}")]
    Config(String),
    /// Making the self-signed certificate failed.
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
    /// Writing the self-signed certificate or key failed.
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// The ring provider, the one crypto backend of the workspace.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server config that takes its certificate from `certs` at each handshake.
pub fn server_config(certs: Arc<dyn ResolvesServerCert>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut c = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    c.alpn_protocols = vec![TLS_ALPN_PROTOCOL.to_vec()];
    // No resumption state at all: no TLS 1.2 session cache, no TLS 1.3 tickets (the default
    // ticketer makes none; say so explicitly).
    c.session_storage = Arc::new(NoServerSessionStorage {});
    c.send_tls13_tickets = 0;
    // The edge takes the TLS 1.3 traffic keys out after the handshake and drops the rustls
    // connection (edge/src/tls.rs, net::record): an idle connection then keeps its keys only.
    c.enable_secret_extraction = true;
    Ok(Arc::new(c))
}

/// The certificate being served and where it came from; swapped whole by [`CertStore::reload`].
#[derive(Debug)]
pub struct CertStore {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertStore {
    /// Loads the certificate chain and key.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Arc<CertStore>, TlsError> {
        let key = load_certified_key(cert_path, key_path)?;
        Ok(Arc::new(CertStore {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            current: RwLock::new(key),
        }))
    }

    /// Reads the files again and serves them to new handshakes. On error the old certificate
    /// stays. Returns the new leaf's fingerprint.
    pub fn reload(&self) -> Result<String, TlsError> {
        let key = load_certified_key(&self.cert_path, &self.key_path)?;
        let fp = leaf_fingerprint(&key);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = key;
        Ok(fp)
    }

    /// SHA-256 fingerprint of the leaf certificate served now.
    pub fn fingerprint(&self) -> String {
        leaf_fingerprint(&self.current())
    }

    /// A server config serving this store.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, TlsError> {
        server_config(self.clone())
    }

    fn current(&self) -> Arc<CertifiedKey> {
        // A writer cannot panic half-way through replacing an `Arc`, so a poisoned lock still
        // holds a whole value.
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn leaf_fingerprint(key: &CertifiedKey) -> String {
    key.cert
        .first()
        .map(|c| fingerprint_sha256(c.as_ref()))
        .unwrap_or_default()
}

/// SHA-256 of a DER certificate as `AB:CD:...` (what `openssl x509 -fingerprint -sha256` and
/// browsers show).
pub fn fingerprint_sha256(der: &[u8]) -> String {
    let d = digest::digest(&digest::SHA256, der);
    let hex: Vec<String> = d.as_ref().iter().map(|b| format!("{b:02X}")).collect();
    hex.join(":")
}

fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    let read = |source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = fs::File::open(path).map_err(read)?;
    let mut bytes = Vec::new();
    file.take(TLS_PEM_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(read)?;
    if bytes.len() as u64 > TLS_PEM_BYTES_MAX {
        return Err(TlsError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}

/// Parses the certificate chain of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_pem(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Parses the first private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read_pem(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.to_path_buf(),
        },
        e => TlsError::Pem {
            path: path.to_path_buf(),
            detail: e.to_string(),
        },
    })
}

fn load_certified_key(cert_path: &Path, key_path: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs = load_certs(cert_path)?;
    let key = load_key(key_path)?;
    let signer = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Key {
            path: key_path.to_path_buf(),
            detail: e.to_string(),
        })?;
    let certified = CertifiedKey::new(certs, signer);
    match certified.keys_match() {
        // `Unknown`: the key cannot tell its public half; rustls then trusts the pairing too.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(Arc::new(certified))
        }
        Err(_) => Err(TlsError::KeyMismatch {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
        }),
    }
}

/// Where [`self_signed`] put its files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelfSigned {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    /// SHA-256 of the certificate, `AB:CD:...`.
    pub fingerprint: String,
    /// False if a certificate already in `dir` was kept.
    pub created: bool,
}

/// A self-signed certificate for `localhost` and `127.0.0.1` in `dir`: the one already there if
/// it loads (so its fingerprint stays the same across restarts), else a new one (ECDSA P-256;
/// the key file is mode 0600).
pub fn self_signed(dir: &Path) -> Result<SelfSigned, TlsError> {
    let cert_path = dir.join(SELF_SIGNED_CERT_FILE);
    let key_path = dir.join(SELF_SIGNED_KEY_FILE);
    if let Ok(store) = CertStore::load(&cert_path, &key_path) {
        return Ok(SelfSigned {
            fingerprint: store.fingerprint(),
            cert_path,
            key_path,
            created: false,
        });
    }
    let names: Vec<String> = SELF_SIGNED_NAMES.iter().map(|s| s.to_string()).collect();
    let made =
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    write_file(&key_path, made.key_pair.serialize_pem().as_bytes(), 0o600)?;
    write_file(&cert_path, made.cert.pem().as_bytes(), 0o644)?;
    Ok(SelfSigned {
        fingerprint: fingerprint_sha256(made.cert.der()),
        cert_path,
        key_path,
        created: true,
    })
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)
}
