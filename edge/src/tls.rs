//! TLS for WSS (issue 11), sans-io: rustls' unbuffered server API driven by the shard's own
//! read/write path, so an idle connection holds no TLS buffer of ours (the groundwork
//! measurement, `net/examples/tls_cost.rs`: 3,431 B per idle connection unbuffered vs
//! 7,630 B with the buffered `ServerConnection`).
//!
//! - [`TlsConn::on_received`]: wire bytes in, plaintext (for the session) and wire bytes to
//!   send (handshake records) out. Incomplete records stay buffered; a drained buffer is freed.
//! - [`TlsConn::encrypt`]: the queued plaintext of one write, sealed into records of at most
//!   16 KiB, in one buffer written with one `write`.
//! - [`Tls`]: the node's certificate store and server config; [`Tls::reload`] is the hook for
//!   `POST /admin/reload-tls` and SIGHUP (new handshakes get the new certificate, existing
//!   connections keep theirs).
//!
//! Invariants: every byte sequence from the peer ends in `Ok` or a [`TlsFail`], never a panic;
//! after a failure the shell closes the connection and counts the failure's label.

use bytes::Bytes;
use net::tls::{CertStore, TlsError};
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls::ServerConfig;
use std::sync::Arc;

/// Largest TLS plaintext record (RFC 8446 §5.1).
const RECORD_PLAINTEXT_MAX: usize = 16 * 1024;
/// Room reserved per record for header, tag and content type (TLS 1.3: 5 + 1 + 16; TLS 1.2
/// GCM: 5 + 8 + 16).
const RECORD_OVERHEAD_BYTES: usize = 64;
/// First guess of a handshake flight's size (grown to what rustls asks for).
const HANDSHAKE_FLIGHT_BYTES: usize = 4 * 1024;
/// Read buffer of a live TLS connection: one heartbeat record (a 22-byte WS frame plus 22 bytes
/// of record overhead) in one read.
pub const TLS_READ_BUFFER_BYTES_MIN: usize = 64;

/// Why a TLS connection failed (a metrics label each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsFail {
    /// Not a TLS ClientHello, or a record that does not parse (garbage, plain HTTP).
    BadRecord,
    /// A record above the TLS limit.
    RecordTooLarge,
    /// Handshake refused: no common version, suite or ALPN, a bad message, renegotiation.
    Handshake,
    /// A record that does not decrypt, or any other peer error after the handshake.
    Traffic,
    /// The peer sent close_notify.
    PeerClosed,
    /// Too many TLS handshakes in flight on the shard (`tls_handshakes_max`): refused at accept.
    Overloaded,
    /// Our side could not encrypt (a write before the handshake finished, keys exhausted).
    Encrypt,
}

impl TlsFail {
    pub const ALL: [TlsFail; 7] = [
        TlsFail::BadRecord,
        TlsFail::RecordTooLarge,
        TlsFail::Handshake,
        TlsFail::Traffic,
        TlsFail::PeerClosed,
        TlsFail::Overloaded,
        TlsFail::Encrypt,
    ];

    pub fn label(self) -> &'static str {
        match self {
            TlsFail::BadRecord => "bad_record",
            TlsFail::RecordTooLarge => "record_too_large",
            TlsFail::Handshake => "handshake",
            TlsFail::Traffic => "traffic",
            TlsFail::PeerClosed => "peer_closed",
            TlsFail::Overloaded => "overloaded",
            TlsFail::Encrypt => "encrypt",
        }
    }

    pub fn index(self) -> usize {
        Self::ALL.iter().position(|a| *a == self).unwrap_or(0)
    }

    fn of(e: &rustls::Error, handshaking: bool) -> TlsFail {
        use rustls::Error as E;
        match e {
            E::InvalidMessage(rustls::InvalidMessage::MessageTooLarge) => TlsFail::RecordTooLarge,
            E::InvalidMessage(_) | E::InappropriateMessage { .. } if handshaking => {
                TlsFail::BadRecord
            }
            E::PeerMisbehaved(_) | E::NoApplicationProtocol | E::PeerIncompatible(_) => {
                TlsFail::Handshake
            }
            _ if handshaking => TlsFail::Handshake,
            _ => TlsFail::Traffic,
        }
    }
}

/// The node's TLS: certificates (reloadable) and the server config every handshake uses.
#[derive(Debug, Clone)]
pub struct Tls {
    pub store: Arc<CertStore>,
    pub config: Arc<ServerConfig>,
}

impl Tls {
    /// Loads `cert_path` / `key_path`.
    pub fn load(cert_path: &std::path::Path, key_path: &std::path::Path) -> Result<Tls, TlsError> {
        let store = CertStore::load(cert_path, key_path)?;
        let config = store.server_config()?;
        Ok(Tls { store, config })
    }

    /// Reads the certificate and key again; new handshakes get them, open connections keep
    /// theirs. On error the old certificate keeps serving. Returns the new fingerprint.
    pub fn reload(&self) -> Result<String, TlsError> {
        self.store.reload()
    }

    /// SHA-256 fingerprint of the certificate served now.
    pub fn fingerprint(&self) -> String {
        self.store.fingerprint()
    }
}

/// Appends what `encode` writes to `wire`, growing it to what rustls asks for.
fn encode_into(
    wire: &mut Vec<u8>,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>,
) -> Result<(), ()> {
    let start = wire.len();
    wire.resize(start + HANDSHAKE_FLIGHT_BYTES, 0);
    let r = match encode(&mut wire[start..]) {
        Err(EncodeError::InsufficientSize(s)) => {
            wire.resize(start + s.required_size, 0);
            encode(&mut wire[start..])
        }
        r => r,
    };
    match r {
        Ok(n) => {
            wire.truncate(start + n);
            Ok(())
        }
        Err(_) => {
            wire.truncate(start);
            Err(())
        }
    }
}

/// One connection's TLS state.
pub struct TlsConn {
    conn: UnbufferedServerConnection,
    /// Received bytes not yet processed (a partial record); empty and unallocated when idle.
    incoming: Vec<u8>,
    /// Handshake records to send, produced by `on_received`.
    wire: Vec<u8>,
    handshaking: bool,
    /// WSS (true) or TLS over raw TCP: which connection gauge the shell counts it in.
    pub over_ws: bool,
}

impl std::fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConn")
            .field("handshaking", &self.handshaking)
            .field("incoming", &self.incoming.len())
            .finish()
    }
}

enum Step {
    More,
    Stop,
    Fail(TlsFail),
}

impl TlsConn {
    pub fn new(config: Arc<ServerConfig>) -> Result<TlsConn, TlsFail> {
        let conn = UnbufferedServerConnection::new(config).map_err(|_| TlsFail::Handshake)?;
        Ok(TlsConn {
            conn,
            incoming: Vec::new(),
            wire: Vec::new(),
            handshaking: true,
            over_ws: true,
        })
    }

    /// True until the handshake has finished.
    pub fn is_handshaking(&self) -> bool {
        self.handshaking
    }

    /// Handshake bytes waiting to be written, if any (taken: the shell writes them).
    pub fn take_wire(&mut self) -> Option<Vec<u8>> {
        if self.wire.is_empty() {
            return None;
        }
        Some(std::mem::take(&mut self.wire))
    }

    /// Heap bytes held by our buffers (rustls' own state is not counted).
    pub fn buffered_bytes(&self) -> usize {
        self.incoming.capacity() + self.wire.capacity()
    }

    /// Feeds bytes read from the socket; appends decrypted application data to `plain`.
    /// Handshake records to send are kept for [`TlsConn::take_wire`].
    pub fn on_received(&mut self, input: &[u8], plain: &mut Vec<u8>) -> Result<(), TlsFail> {
        self.incoming.extend_from_slice(input);
        let res = self.process(plain);
        if self.incoming.is_empty() {
            // Idle: hold no receive buffer.
            self.incoming = Vec::new();
        }
        res
    }

    fn process(&mut self, plain: &mut Vec<u8>) -> Result<(), TlsFail> {
        loop {
            let handshaking = self.handshaking;
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut self.incoming[..]);
            let step = match state {
                Err(e) => Step::Fail(TlsFail::of(&e, handshaking)),
                Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                    match encode_into(&mut self.wire, |b| enc.encode(b)) {
                        Ok(()) => Step::More,
                        Err(()) => Step::Fail(TlsFail::Encrypt),
                    }
                }
                // The shell writes `wire` when its writer is free.
                Ok(ConnectionState::TransmitTlsData(t)) => {
                    t.done();
                    Step::More
                }
                Ok(ConnectionState::BlockedHandshake) => Step::Stop,
                Ok(ConnectionState::ReadTraffic(mut r)) => {
                    let mut fail = None;
                    while let Some(rec) = r.next_record() {
                        match rec {
                            Ok(rec) => plain.extend_from_slice(rec.payload),
                            Err(e) => {
                                fail = Some(TlsFail::of(&e, false));
                                break;
                            }
                        }
                    }
                    match fail {
                        Some(f) => Step::Fail(f),
                        None => Step::More,
                    }
                }
                Ok(ConnectionState::WriteTraffic(_)) => {
                    self.handshaking = false;
                    Step::Stop
                }
                Ok(ConnectionState::PeerClosed) | Ok(ConnectionState::Closed) => {
                    Step::Fail(TlsFail::PeerClosed)
                }
                // Early data is off (rustls' default); anything else is not ours to handle.
                Ok(_) => Step::Fail(TlsFail::Handshake),
            };
            self.incoming.drain(..discard.min(self.incoming.len()));
            match step {
                Step::More => continue,
                Step::Stop => return Ok(()),
                Step::Fail(f) => {
                    self.queue_alert();
                    return Err(f);
                }
            }
        }
    }

    /// After a failure rustls has queued a fatal alert for most errors (`decode_error`,
    /// `handshake_failure`, `record_overflow`, `no_application_protocol`...): it goes into
    /// `wire`, so the shell writes it before closing and the peer learns why.
    fn queue_alert(&mut self) {
        // One alert at most; the bound only guards against a state that keeps producing data.
        for _ in 0..2 {
            let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut []);
            match state {
                Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                    if encode_into(&mut self.wire, |b| enc.encode(b)).is_err() {
                        return;
                    }
                }
                Ok(ConnectionState::TransmitTlsData(t)) => {
                    t.done();
                    return;
                }
                _ => return,
            }
        }
    }

    /// Seals `bufs` (in order) into records of at most 16 KiB, in one buffer.
    pub fn encrypt(&mut self, bufs: &[Bytes]) -> Result<Vec<u8>, TlsFail> {
        let total: usize = bufs.iter().map(Bytes::len).sum();
        let records = total.div_ceil(RECORD_PLAINTEXT_MAX).max(1);
        let mut out = vec![0u8; total + records * RECORD_OVERHEAD_BYTES];
        let mut at = 0;
        // Records are cut at 16 KiB of the concatenation, not per buffer: a write of many
        // small batches costs one record (one seal), not one each.
        let mut chunk: Vec<u8> = Vec::new();
        let single = bufs.len() == 1 && total <= RECORD_PLAINTEXT_MAX;
        if single {
            at += self.seal(&bufs[0], &mut out[at..])?;
        } else {
            chunk.reserve(total.min(RECORD_PLAINTEXT_MAX));
            for b in bufs {
                let mut b = &b[..];
                while !b.is_empty() {
                    let take = (RECORD_PLAINTEXT_MAX - chunk.len()).min(b.len());
                    chunk.extend_from_slice(&b[..take]);
                    b = &b[take..];
                    if chunk.len() == RECORD_PLAINTEXT_MAX {
                        at += self.seal(&chunk, &mut out[at..])?;
                        chunk.clear();
                    }
                }
            }
            if !chunk.is_empty() {
                at += self.seal(&chunk, &mut out[at..])?;
            }
        }
        out.truncate(at);
        Ok(out)
    }

    fn seal(&mut self, data: &[u8], out: &mut [u8]) -> Result<usize, TlsFail> {
        let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut []);
        match state {
            Ok(ConnectionState::WriteTraffic(mut w)) => match w.encrypt(data, out) {
                Ok(n) => Ok(n),
                Err(EncryptError::InsufficientSize(_)) | Err(_) => Err(TlsFail::Encrypt),
            },
            _ => Err(TlsFail::Encrypt),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> TlsConn {
        // One directory per call: tests run in parallel.
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("barrage-edge-tls-{}-{n}", std::process::id()));
        let made = net::tls::self_signed(&dir).expect("self-signed");
        let tls = Tls::load(&made.cert_path, &made.key_path).expect("load");
        TlsConn::new(tls.config).expect("conn")
    }

    #[test]
    fn garbage_instead_of_a_client_hello_fails_as_bad_record() {
        let mut c = conn();
        let mut plain = Vec::new();
        let r = c.on_received(b"GET /sub HTTP/1.1\r\nHost: x\r\n\r\n", &mut plain);
        assert_eq!(r, Err(TlsFail::BadRecord));
        assert!(plain.is_empty());
        // The peer is told: a fatal alert record (content type 21, level 2) to write before
        // the close.
        let alert = c.take_wire().expect("an alert");
        assert_eq!((alert[0], alert.len(), alert[5]), (21, 7, 2), "{alert:?}");
    }

    #[test]
    fn an_oversized_record_header_fails_without_buffering_it() {
        let mut c = conn();
        let mut plain = Vec::new();
        // A handshake record claiming 65,535 bytes: refused on its header.
        let r = c.on_received(&[0x16, 0x03, 0x01, 0xff, 0xff, 0x01], &mut plain);
        assert!(r.is_err(), "{r:?}");
    }

    #[test]
    fn a_partial_client_hello_waits_and_encrypt_before_the_handshake_fails() {
        let mut c = conn();
        let mut plain = Vec::new();
        assert_eq!(
            c.on_received(&[0x16, 0x03, 0x01, 0x00, 0x80], &mut plain),
            Ok(())
        );
        assert!(c.is_handshaking());
        assert!(c.take_wire().is_none());
        assert_eq!(
            c.encrypt(&[Bytes::from_static(b"x")]),
            Err(TlsFail::Encrypt)
        );
    }
}
