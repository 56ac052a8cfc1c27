//! TLS for WSS (issue 11), sans-io: rustls' unbuffered server API makes the handshake, driven
//! by the shard's own read/write path; then, on TLS 1.3, the traffic keys are taken out of
//! rustls (`dangerous_into_kernel_connection`), the rustls connection is dropped and
//! `net::record` protects the records. An idle WSS viewer then holds two keys, two sequence
//! numbers and rustls' small key-update state instead of a whole rustls connection
//! (`net/examples/tls_cost.rs`: see docs/benchmarks.md, "WSS idle memory").
//!
//! - [`TlsConn::on_received`]: wire bytes in, plaintext (for the session) and wire bytes to
//!   send (handshake records, KeyUpdate answers, alerts) out. Incomplete records stay
//!   buffered; a drained buffer is freed.
//! - [`TlsConn::encrypt`]: the queued plaintext of one write, sealed into records of at most
//!   16 KiB of the concatenation, in one buffer written with one `write`.
//! - [`Tls`]: the node's certificate store and server config; [`Tls::reload`] is the hook for
//!   `POST /admin/reload-tls` and SIGHUP (new handshakes get the new certificate, existing
//!   connections keep theirs).
//!
//! Past the handshake: application data is handed on; a KeyUpdate from the peer changes its
//! key (and, if it asks, ours, answered with our own KeyUpdate); our key is changed the same
//! way before AES-GCM's record budget runs out; close_notify is answered with close_notify
//! (and a close of our own sends one: [`TlsConn::close_notify`]);
//! anything else (a bad tag, change_cipher_spec, a plaintext record, another handshake
//! message, an oversized record) is a fatal alert, a counted [`TlsFail`] and a close. TLS 1.2
//! connections (no browser picks it) stay on rustls for their whole life.
//!
//! kTLS would do the record layer in the kernel (and keep the keys out of our memory); the
//! kernels this runs on have no `tls` ULP (`/proc/sys/net/ipv4/tcp_available_ulp`), so it is
//! not wired: the extracted keys are what `setsockopt(SOL_TLS, TLS_TX/TLS_RX)` takes, see
//! docs/operations-edge.md ("TLS").
//!
//! Invariants: every byte sequence from the peer ends in `Ok` or a [`TlsFail`], never a panic;
//! after a failure the shell writes [`TlsConn::take_wire`] (the alert) and closes the
//! connection, counting the failure's label.

use bytes::Bytes;
use net::record::{self, Alert, Content, Keys, Opener, RecordError, Sealer};
use net::tls::{CertStore, TlsError};
use rustls::kernel::KernelConnection;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
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

/// Where Linux lists the TCP upper-layer protocols it can attach (kTLS needs `tls`).
const TCP_AVAILABLE_ULP_PATH: &str = "/proc/sys/net/ipv4/tcp_available_ulp";

/// True if the kernel's ULP list (`tcp_available_ulp`) offers kernel TLS.
fn ktls_available(ulps: &str) -> bool {
    ulps.split_whitespace().any(|u| u == "tls")
}

/// Why a TLS connection failed (a metrics label each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsFail {
    /// Not a TLS ClientHello, or a record that does not parse (garbage, plain HTTP).
    BadRecord,
    /// A record above the TLS limit.
    RecordTooLarge,
    /// Handshake refused: no common version, suite or ALPN, a bad message, renegotiation.
    Handshake,
    /// Any other peer error after the handshake (TLS 1.2 connections, which rustls keeps).
    Traffic,
    /// The peer sent close_notify.
    PeerClosed,
    /// Too many TLS handshakes in flight on the shard (`tls_handshakes_max`): refused at accept.
    Overloaded,
    /// Our side could not encrypt (a write before the handshake finished, keys exhausted).
    Encrypt,
    /// A record whose tag does not verify (corrupted, forged, replayed).
    BadRecordMac,
    /// A record type or handshake message not allowed after the handshake.
    Unexpected,
    /// The peer sent a fatal alert.
    PeerAlert,
}

impl TlsFail {
    pub const ALL: [TlsFail; 10] = [
        TlsFail::BadRecord,
        TlsFail::RecordTooLarge,
        TlsFail::Handshake,
        TlsFail::Traffic,
        TlsFail::PeerClosed,
        TlsFail::Overloaded,
        TlsFail::Encrypt,
        TlsFail::BadRecordMac,
        TlsFail::Unexpected,
        TlsFail::PeerAlert,
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
            TlsFail::BadRecordMac => "bad_record_mac",
            TlsFail::Unexpected => "unexpected_message",
            TlsFail::PeerAlert => "peer_alert",
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
            E::DecryptError => TlsFail::BadRecordMac,
            E::AlertReceived(_) => TlsFail::PeerAlert,
            _ if handshaking => TlsFail::Handshake,
            _ => TlsFail::Traffic,
        }
    }

    fn of_record(e: RecordError) -> TlsFail {
        match e {
            RecordError::PeerClosed => TlsFail::PeerClosed,
            RecordError::PeerAlert(_) => TlsFail::PeerAlert,
            RecordError::BadRecordMac => TlsFail::BadRecordMac,
            RecordError::RecordOverflow => TlsFail::RecordTooLarge,
            RecordError::Unexpected => TlsFail::Unexpected,
            RecordError::Decode => TlsFail::BadRecord,
            RecordError::KeysExhausted => TlsFail::Encrypt,
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
        let ulps = std::fs::read_to_string(TCP_AVAILABLE_ULP_PATH).unwrap_or_default();
        tracing::info!(
            ktls_available = ktls_available(&ulps),
            ulps = ulps.trim(),
            "TLS 1.3 past the handshake: the edge's own record layer (net::record); kTLS is not wired"
        );
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

/// A TLS 1.3 connection past its handshake: our record layer, and rustls' key schedule for
/// key updates (the traffic secrets and nothing else).
struct Compact {
    tx: Sealer,
    rx: Opener,
    keys: KernelConnection<ServerConnectionData>,
}

enum Stage {
    /// rustls drives the handshake (and, on TLS 1.2, the whole connection).
    Rustls(Box<UnbufferedServerConnection>),
    /// TLS 1.3 past the handshake.
    Compact(Box<Compact>),
    /// Failed or closed: nothing more to read or send but the alert in `wire`.
    Done,
}

/// One connection's TLS state.
pub struct TlsConn {
    stage: Stage,
    /// Received bytes not yet processed (a partial record); empty and unallocated when idle.
    incoming: Vec<u8>,
    /// Records to send before any data: handshake flights, KeyUpdate answers, alerts.
    wire: Vec<u8>,
    handshaking: bool,
    /// WSS (true) or TLS over raw TCP: which connection gauge the shell counts it in.
    pub over_ws: bool,
}

impl std::fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConn")
            .field("handshaking", &self.handshaking)
            .field("compact", &self.is_compact())
            .field("incoming", &self.incoming.len())
            .finish()
    }
}

enum Step {
    More,
    Stop,
    /// The handshake finished: leave rustls if the version allows it.
    Done,
    Fail(TlsFail),
}

impl TlsConn {
    pub fn new(config: Arc<ServerConfig>) -> Result<TlsConn, TlsFail> {
        let conn = UnbufferedServerConnection::new(config).map_err(|_| TlsFail::Handshake)?;
        Ok(TlsConn {
            stage: Stage::Rustls(Box::new(conn)),
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

    /// True once the connection runs on our own record layer (TLS 1.3 past the handshake).
    pub fn is_compact(&self) -> bool {
        matches!(self.stage, Stage::Compact(_))
    }

    /// Bytes waiting to be written before any data (handshake, KeyUpdate, alert), if any
    /// (taken: the shell writes them).
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
    /// Records to send are kept for [`TlsConn::take_wire`]. After an error the alert for the
    /// peer is in `take_wire` and the connection is done.
    pub fn on_received(&mut self, input: &[u8], plain: &mut Vec<u8>) -> Result<(), TlsFail> {
        let res = match self.stage {
            Stage::Rustls(_) => {
                self.incoming.extend_from_slice(input);
                self.process(plain)
            }
            Stage::Compact(_) => self.open(input, plain),
            Stage::Done => Err(TlsFail::Traffic),
        };
        if self.incoming.is_empty() {
            // Idle: hold no receive buffer.
            self.incoming = Vec::new();
        }
        if res.is_err() {
            self.stage = Stage::Done;
            self.incoming = Vec::new();
        }
        res
    }

    fn process(&mut self, plain: &mut Vec<u8>) -> Result<(), TlsFail> {
        loop {
            let Stage::Rustls(conn) = &mut self.stage else {
                return self.open(&[], plain);
            };
            let handshaking = self.handshaking;
            let UnbufferedStatus { discard, state } =
                conn.process_tls_records(&mut self.incoming[..]);
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
                Ok(ConnectionState::WriteTraffic(_)) if handshaking => Step::Done,
                Ok(ConnectionState::WriteTraffic(_)) => Step::Stop,
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
                Step::Done => {
                    self.handshaking = false;
                    // Every flight (session tickets included, if configured) is in `wire`
                    // by now: rustls only reaches WriteTraffic with nothing left to encode,
                    // and refuses the extraction otherwise.
                    self.leave_rustls()?;
                    if !self.is_compact() {
                        return Ok(());
                    }
                    // Records after the client's Finished in the same read: ours now.
                }
                Step::Fail(f) => {
                    self.queue_rustls_alert();
                    return Err(f);
                }
            }
        }
    }

    /// TLS 1.3: takes the traffic keys and sequence numbers out of rustls and drops it.
    /// TLS 1.2 stays on rustls.
    fn leave_rustls(&mut self) -> Result<(), TlsFail> {
        let Stage::Rustls(conn) = &self.stage else {
            return Ok(());
        };
        if conn.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
            return Ok(());
        }
        let Stage::Rustls(conn) = std::mem::replace(&mut self.stage, Stage::Done) else {
            return Ok(());
        };
        // Without secret extraction in the config (a config not made by net::tls) rustls
        // refuses; that is our fault, not the peer's.
        let (secrets, keys) = conn
            .dangerous_into_kernel_connection()
            .map_err(|_| TlsFail::Encrypt)?;
        let (tx_seq, tx) = &secrets.tx;
        let (rx_seq, rx) = &secrets.rx;
        let (Some(tx), Some(rx)) = (Keys::from_rustls(tx), Keys::from_rustls(rx)) else {
            return Err(TlsFail::Encrypt);
        };
        let tx = Sealer::new(&tx, *tx_seq).ok_or(TlsFail::Encrypt)?;
        self.stage = Stage::Compact(Box::new(Compact {
            tx,
            rx: Opener::new(rx, *rx_seq),
            keys,
        }));
        Ok(())
    }

    /// After a rustls failure it has queued a fatal alert for most errors (`decode_error`,
    /// `handshake_failure`, `record_overflow`, `no_application_protocol`...): it goes into
    /// `wire`, so the shell writes it before closing and the peer learns why.
    fn queue_rustls_alert(&mut self) {
        let Stage::Rustls(conn) = &mut self.stage else {
            return;
        };
        // One alert at most; the bound only guards against a state that keeps producing data.
        for _ in 0..2 {
            let UnbufferedStatus { state, .. } = conn.process_tls_records(&mut []);
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

    /// Our record layer: opens every complete record of `incoming` + `input`, keeps a partial
    /// one (its header checked first, so at most one record's worth is ever buffered).
    fn open(&mut self, input: &[u8], plain: &mut Vec<u8>) -> Result<(), TlsFail> {
        let Stage::Compact(c) = &mut self.stage else {
            return Err(TlsFail::Traffic);
        };
        // Work from `input` directly unless a partial record is waiting.
        let mut held = std::mem::take(&mut self.incoming);
        let data: &[u8] = if held.is_empty() {
            input
        } else {
            held.extend_from_slice(input);
            &held
        };
        let mut at = 0;
        let res = loop {
            let h = match record::parse_header(&data[at..]) {
                Ok(Some(h)) if h.record_len() <= data.len() - at => h,
                Ok(_) => break Ok(()),
                Err(e) => break Err(e),
            };
            let rec = &data[at..at + h.record_len()];
            at += h.record_len();
            // Decrypt in place at the end of `plain`, then move the plaintext over the header.
            let start = plain.len();
            plain.extend_from_slice(rec);
            match c.rx.open(&mut plain[start..]) {
                Ok(Content::Data { len }) => {
                    let from = start + record::RECORD_HEADER_BYTES;
                    plain.copy_within(from..from + len, start);
                    plain.truncate(start + len);
                }
                Ok(Content::KeyUpdate { update_requested }) => {
                    plain.truncate(start);
                    if let Err(e) = c.key_update(update_requested, &mut self.wire) {
                        break Err(e);
                    }
                }
                Err(e) => {
                    plain.truncate(start);
                    break Err(e);
                }
            }
        };
        match res {
            Ok(()) => {
                self.incoming = data[at..].to_vec();
                Ok(())
            }
            Err(e) => {
                // Our answer: close_notify to a close_notify, else the fatal alert.
                let alert = match e {
                    RecordError::PeerClosed => Some(Alert::CloseNotify),
                    e => e.alert(),
                };
                if let Some(a) = alert {
                    let _ = c.tx.seal_alert(a, &mut self.wire);
                }
                Err(TlsFail::of_record(e))
            }
        }
    }

    /// The edge ends the connection itself (drain, heartbeat timeout, a protocol error, a
    /// stuck reader): the close_notify record to write after everything sealed so far, then
    /// the FIN, so the peer can tell our close from a cut connection (RFC 8446 §6.1). `None`
    /// during the handshake (no keys yet: the socket is just closed) and once done. The
    /// connection sends nothing after it.
    pub fn close_notify(&mut self) -> Option<Vec<u8>> {
        if self.handshaking {
            return None;
        }
        let mut out = Vec::new();
        let sealed = match &mut self.stage {
            Stage::Compact(c) => c.tx.seal_alert(Alert::CloseNotify, &mut out).is_ok(),
            Stage::Rustls(conn) => match conn.process_tls_records(&mut []).state {
                Ok(ConnectionState::WriteTraffic(mut w)) => {
                    out.resize(RECORD_OVERHEAD_BYTES, 0);
                    match w.queue_close_notify(&mut out) {
                        Ok(n) => {
                            out.truncate(n);
                            true
                        }
                        Err(_) => false,
                    }
                }
                _ => false,
            },
            Stage::Done => false,
        };
        self.stage = Stage::Done;
        self.incoming = Vec::new();
        sealed.then_some(out)
    }

    /// Seals `bufs` (in order) into records of at most 16 KiB, in one buffer.
    pub fn encrypt(&mut self, bufs: &[Bytes]) -> Result<Vec<u8>, TlsFail> {
        match &mut self.stage {
            Stage::Compact(c) => {
                let mut out = Vec::new();
                let refs: Vec<&[u8]> = bufs.iter().map(|b| &b[..]).collect();
                let total: usize = refs.iter().map(|b| b.len()).sum();
                let records = total.div_ceil(RECORD_PLAINTEXT_MAX).max(1) as u64;
                // A new key before this one's budget runs out (one record for the KeyUpdate).
                if c.tx.records_left() <= records + 1 {
                    c.rekey_tx(&mut out).map_err(|_| TlsFail::Encrypt)?;
                }
                c.tx.seal_all(&refs, &mut out)
                    .map_err(|_| TlsFail::Encrypt)?;
                Ok(out)
            }
            Stage::Rustls(conn) if !self.handshaking => encrypt_rustls(conn, bufs),
            _ => Err(TlsFail::Encrypt),
        }
    }
}

impl Compact {
    /// The peer changed its key; if it asks, change ours too (our KeyUpdate is the last
    /// record under the old key, queued in `wire`, which the shell writes before any data).
    fn key_update(
        &mut self,
        update_requested: bool,
        wire: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        let (seq, rx) = self
            .keys
            .update_rx_secret()
            .map_err(|_| RecordError::Unexpected)?;
        let rx = Keys::from_rustls(&rx).ok_or(RecordError::Unexpected)?;
        self.rx = Opener::new(rx, seq);
        if update_requested {
            self.rekey_tx(wire)?;
        }
        Ok(())
    }

    /// Sends KeyUpdate(update_not_requested) under the current key, then switches to the next.
    fn rekey_tx(&mut self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.tx.seal_key_update(out)?;
        let (seq, tx) = self
            .keys
            .update_tx_secret()
            .map_err(|_| RecordError::KeysExhausted)?;
        let tx = Keys::from_rustls(&tx).ok_or(RecordError::KeysExhausted)?;
        self.tx = Sealer::new(&tx, seq).ok_or(RecordError::KeysExhausted)?;
        Ok(())
    }
}

/// TLS 1.2 (rustls for the connection's life): seals into records of at most 16 KiB.
fn encrypt_rustls(
    conn: &mut UnbufferedServerConnection,
    bufs: &[Bytes],
) -> Result<Vec<u8>, TlsFail> {
    let total: usize = bufs.iter().map(Bytes::len).sum();
    let records = total.div_ceil(RECORD_PLAINTEXT_MAX).max(1);
    let mut out = vec![0u8; total + records * RECORD_OVERHEAD_BYTES];
    let mut at = 0;
    let mut chunk: Vec<u8> = Vec::with_capacity(total.min(RECORD_PLAINTEXT_MAX));
    for b in bufs {
        let mut b = &b[..];
        while !b.is_empty() {
            let take = (RECORD_PLAINTEXT_MAX - chunk.len()).min(b.len());
            chunk.extend_from_slice(&b[..take]);
            b = &b[take..];
            if chunk.len() == RECORD_PLAINTEXT_MAX {
                at += seal_rustls(conn, &chunk, &mut out[at..])?;
                chunk.clear();
            }
        }
    }
    if !chunk.is_empty() || at == 0 {
        at += seal_rustls(conn, &chunk, &mut out[at..])?;
    }
    out.truncate(at);
    Ok(out)
}

fn seal_rustls(
    conn: &mut UnbufferedServerConnection,
    data: &[u8],
    out: &mut [u8],
) -> Result<usize, TlsFail> {
    let UnbufferedStatus { state, .. } = conn.process_tls_records(&mut []);
    match state {
        Ok(ConnectionState::WriteTraffic(mut w)) => match w.encrypt(data, out) {
            Ok(n) => Ok(n),
            Err(EncryptError::InsufficientSize(_)) | Err(_) => Err(TlsFail::Encrypt),
        },
        _ => Err(TlsFail::Encrypt),
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

    /// A rustls client and our server connection, exchanging bytes in memory.
    struct Pair {
        client: rustls::ClientConnection,
        server: TlsConn,
        /// Plaintext the server handed on.
        got: Vec<u8>,
        /// Plaintext the client read.
        client_got: Vec<u8>,
    }

    fn pair(tickets: u32, suite: Option<rustls::SupportedCipherSuite>) -> Pair {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("barrage-edge-tlsp-{}-{n}", std::process::id()));
        let made = net::tls::self_signed(&dir).expect("self-signed");
        let tls = Tls::load(&made.cert_path, &made.key_path).expect("load");
        let mut cfg = (*tls.config).clone();
        if tickets > 0 {
            cfg.send_tls13_tickets = tickets as usize;
            cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(16);
        }
        let mut roots = rustls::RootCertStore::empty();
        for c in net::tls::load_certs(&made.cert_path).expect("certs") {
            roots.add(c).expect("root");
        }
        let mut provider = rustls::crypto::ring::default_provider();
        if let Some(s) = suite {
            provider.cipher_suites = vec![s];
        }
        let client_cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let client = rustls::ClientConnection::new(
            Arc::new(client_cfg),
            rustls::pki_types::ServerName::try_from("localhost").expect("name"),
        )
        .expect("client");
        let server = TlsConn::new(Arc::new(cfg)).expect("server");
        let _ = std::fs::remove_dir_all(&dir);
        let mut p = Pair {
            client,
            server,
            got: Vec::new(),
            client_got: Vec::new(),
        };
        p.pump().expect("handshake");
        p
    }

    impl Pair {
        /// Moves bytes both ways until neither side has anything to say.
        fn pump(&mut self) -> Result<(), TlsFail> {
            loop {
                let mut wire = Vec::new();
                while self.client.wants_write() {
                    self.client.write_tls(&mut wire).expect("client write");
                }
                let mut moved = !wire.is_empty();
                if moved {
                    self.server.on_received(&wire, &mut self.got)?;
                }
                if let Some(back) = self.server.take_wire() {
                    self.deliver_to_client(&back);
                    moved = true;
                }
                if !moved {
                    return Ok(());
                }
            }
        }

        fn deliver_to_client(&mut self, mut bytes: &[u8]) {
            while !bytes.is_empty() {
                self.client.read_tls(&mut bytes).expect("read_tls");
                self.client.process_new_packets().expect("client processes");
                let _ = std::io::Read::read_to_end(&mut self.client.reader(), &mut self.client_got);
            }
        }

        fn client_reads(&mut self) -> Vec<u8> {
            std::mem::take(&mut self.client_got)
        }
    }

    #[test]
    fn after_a_tls13_handshake_the_connection_leaves_rustls_for_every_suite() {
        use rustls::crypto::ring::cipher_suite as cs;
        for suite in [
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
        ] {
            let mut p = pair(0, Some(suite));
            assert!(!p.server.is_handshaking());
            assert!(p.server.is_compact(), "{suite:?}");
            std::io::Write::write_all(&mut p.client.writer(), b"upgrade").expect("write");
            p.pump().expect("data");
            assert_eq!(p.got, b"upgrade");
            let wire = p
                .server
                .encrypt(&[Bytes::from(vec![7u8; 40_000]), Bytes::from_static(b"!")])
                .expect("seal");
            p.deliver_to_client(&wire);
            let back = p.client_reads();
            assert_eq!(back.len(), 40_001);
            assert_eq!(back[40_000], b'!');
        }
    }

    #[test]
    fn session_tickets_go_out_before_the_keys_are_taken() {
        let mut p = pair(2, None);
        assert!(p.server.is_compact());
        // The client got both tickets (it would fail to decrypt them otherwise) and our
        // records after them decrypt: the sequence numbers carried over.
        let wire = p
            .server
            .encrypt(&[Bytes::from_static(b"hi")])
            .expect("seal");
        p.deliver_to_client(&wire);
        assert_eq!(p.client_reads(), b"hi");
    }

    #[test]
    fn key_updates_from_the_client_change_both_keys() {
        let mut p = pair(0, None);
        for round in 0..3u8 {
            p.client.refresh_traffic_keys().expect("key update");
            std::io::Write::write_all(&mut p.client.writer(), &[round]).expect("write");
            p.pump().expect("server follows the update");
            let wire = p
                .server
                .encrypt(&[Bytes::from(vec![round; 3])])
                .expect("seal");
            p.deliver_to_client(&wire);
            assert_eq!(p.client_reads(), vec![round; 3]);
        }
        assert_eq!(p.got, [0, 1, 2]);
    }

    #[test]
    fn a_corrupted_record_is_answered_with_bad_record_mac_and_ends_the_connection() {
        let mut p = pair(0, None);
        std::io::Write::write_all(&mut p.client.writer(), b"data").expect("write");
        let mut wire = Vec::new();
        while p.client.wants_write() {
            p.client.write_tls(&mut wire).expect("write_tls");
        }
        let last = wire.len() - 1;
        wire[last] ^= 0x80;
        // Cut in two: the partial record waits, the rest completes it.
        assert_eq!(p.server.on_received(&wire[..3], &mut p.got), Ok(()));
        assert_eq!(
            p.server.on_received(&wire[3..], &mut p.got),
            Err(TlsFail::BadRecordMac)
        );
        assert!(p.got.is_empty());
        let alert = p.server.take_wire().expect("an alert");
        let mut a = &alert[..];
        p.client.read_tls(&mut a).expect("read_tls");
        assert_eq!(
            p.client.process_new_packets().map(|_| ()),
            Err(rustls::Error::AlertReceived(
                rustls::AlertDescription::BadRecordMac
            ))
        );
        // Done: nothing more is read or sealed.
        assert!(p.server.on_received(b"x", &mut p.got).is_err());
        assert!(p.server.encrypt(&[Bytes::from_static(b"x")]).is_err());
    }

    #[test]
    fn close_notify_is_answered_with_close_notify() {
        let mut p = pair(0, None);
        p.client.send_close_notify();
        assert_eq!(p.pump(), Err(TlsFail::PeerClosed));
        let back = p.server.take_wire().expect("our close_notify");
        p.deliver_to_client(&back);
        assert!(p
            .client
            .process_new_packets()
            .expect("ok")
            .peer_has_closed());
    }

    #[test]
    fn our_own_close_sends_close_notify_after_the_data_on_both_record_layers() {
        use rustls::crypto::ring::cipher_suite as cs;
        for suite in [None, Some(cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256)] {
            let mut p = pair(0, suite);
            let wire = p
                .server
                .encrypt(&[Bytes::from_static(b"bye")])
                .expect("seal");
            let notify = p.server.close_notify().expect("a close_notify record");
            p.deliver_to_client(&wire);
            p.deliver_to_client(&notify);
            assert_eq!(p.client_reads(), b"bye", "{suite:?}");
            assert!(
                p.client
                    .process_new_packets()
                    .expect("ok")
                    .peer_has_closed(),
                "{suite:?}"
            );
            // Done: one close_notify, nothing sealed after it.
            assert!(p.server.close_notify().is_none());
            assert!(p.server.encrypt(&[Bytes::from_static(b"x")]).is_err());
        }
        // No keys during the handshake: nothing to send.
        assert!(conn().close_notify().is_none());
    }

    #[test]
    fn tls12_connections_stay_on_rustls() {
        use rustls::crypto::ring::cipher_suite as cs;
        let mut p = pair(0, Some(cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256));
        assert_eq!(
            p.client.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_2)
        );
        assert!(!p.server.is_handshaking());
        assert!(!p.server.is_compact());
        std::io::Write::write_all(&mut p.client.writer(), b"old").expect("write");
        p.pump().expect("data");
        assert_eq!(p.got, b"old");
        let wire = p
            .server
            .encrypt(&[Bytes::from_static(b"ok")])
            .expect("seal");
        p.deliver_to_client(&wire);
        assert_eq!(p.client_reads(), b"ok");
    }

    #[test]
    fn ktls_is_seen_only_when_the_kernel_lists_the_tls_ulp() {
        assert!(!ktls_available("mptcp\n"));
        assert!(ktls_available("mptcp tls\n"));
        assert!(!ktls_available(""));
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
