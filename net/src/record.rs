//! # record: a compact TLS 1.3 record layer for connections past their handshake
//!
//! rustls makes the handshake; then the edge takes the traffic keys out
//! (`dangerous_into_kernel_connection`), drops the rustls connection and protects records with
//! this module (RFC 8446 §5), so an idle WSS viewer keeps two keys and two sequence numbers
//! instead of rustls' whole connection (issue 11's ≤ 2 KiB target). It is what kTLS would do in
//! the kernel, in user space: this kernel has no `tls` ULP.
//!
//! - [`Sealer`]: our direction. The expanded AEAD key is kept (the fan-out path seals every
//!   batch); nonce = iv xor sequence number; the inner content type follows the plaintext; no
//!   padding.
//! - [`Opener`]: the peer's direction. Only the raw key is kept and expanded per record: viewers
//!   send a heartbeat every few tens of seconds, so an expanded receive key would be memory
//!   spent on nothing.
//! - [`parse_header`] and [`Opener::open`]: every byte sequence ends in "need more bytes", a
//!   record, or a [`RecordError`] that names the alert to send; nothing panics.
//!
//! Invariants: a sequence number is never reused with a key (sealing past the suite's
//! confidentiality limit fails with [`RecordError::KeysExhausted`] unless the caller rekeys
//! first); a record is handed on only after its tag verified.

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::ConnectionTrafficSecrets;

/// Record header: content type, legacy version (2), length (2).
pub const RECORD_HEADER_BYTES: usize = 5;
/// Largest plaintext of one record (RFC 8446 §5.1).
pub const RECORD_PLAINTEXT_BYTES_MAX: usize = 16 * 1024;
/// Largest protected record body we accept (RFC 8446 §5.2: 2^14 + 256).
pub const RECORD_CIPHERTEXT_BYTES_MAX: usize = RECORD_PLAINTEXT_BYTES_MAX + 256;
/// AEAD tag of every suite here.
pub const TAG_BYTES: usize = 16;
/// What sealing adds to a plaintext: header, inner content type, tag.
pub const RECORD_OVERHEAD_BYTES: usize = RECORD_HEADER_BYTES + 1 + TAG_BYTES;
/// Records sealed with one AES-GCM key before we rekey or stop (rustls' figure for TLS 1.3,
/// under RFC 8446 §5.5's 2^24.5).
pub const AES_GCM_RECORDS_MAX: u64 = 1 << 24;

/// TLS content types (RFC 8446 §5.1).
pub const CONTENT_CHANGE_CIPHER_SPEC: u8 = 20;
pub const CONTENT_ALERT: u8 = 21;
pub const CONTENT_HANDSHAKE: u8 = 22;
pub const CONTENT_APPLICATION_DATA: u8 = 23;
/// Handshake message type of KeyUpdate (RFC 8446 §4.6.3).
pub const HANDSHAKE_KEY_UPDATE: u8 = 24;

/// Alert descriptions we send (RFC 8446 §6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Alert {
    CloseNotify = 0,
    UnexpectedMessage = 10,
    BadRecordMac = 20,
    RecordOverflow = 22,
    DecodeError = 50,
    InternalError = 80,
}

/// Why a protected record stream ended. Each but `PeerClosed`/`PeerAlert` is a fault of the
/// peer (or, for `KeysExhausted`, of the connection's age) and names the alert to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordError {
    /// The peer sent close_notify.
    PeerClosed,
    /// The peer sent another alert (its description): it is closing on an error.
    PeerAlert(u8),
    /// A record whose tag does not verify (corrupted, forged, or out of sequence).
    BadRecordMac,
    /// A record or plaintext above the TLS limits.
    RecordOverflow,
    /// A record type or message that is not allowed after the handshake (a plaintext record,
    /// change_cipher_spec, a handshake message other than KeyUpdate, all-zero plaintext).
    Unexpected,
    /// A malformed alert or KeyUpdate body.
    Decode,
    /// The key's record budget is spent (or the sequence number would wrap).
    KeysExhausted,
}

impl RecordError {
    /// The fatal alert to send before closing, if any (none to a peer that closed already).
    pub fn alert(self) -> Option<Alert> {
        match self {
            RecordError::PeerClosed | RecordError::PeerAlert(_) => None,
            RecordError::BadRecordMac => Some(Alert::BadRecordMac),
            RecordError::RecordOverflow => Some(Alert::RecordOverflow),
            RecordError::Unexpected => Some(Alert::UnexpectedMessage),
            RecordError::Decode => Some(Alert::DecodeError),
            RecordError::KeysExhausted => Some(Alert::InternalError),
        }
    }
}

/// The TLS 1.3 AEADs rustls' ring provider negotiates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suite {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl Suite {
    fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            Suite::Aes128Gcm => &aead::AES_128_GCM,
            Suite::Aes256Gcm => &aead::AES_256_GCM,
            Suite::Chacha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }

    /// Records one key may seal (RFC 8446 §5.5).
    pub fn records_max(self) -> u64 {
        match self {
            Suite::Aes128Gcm | Suite::Aes256Gcm => AES_GCM_RECORDS_MAX,
            Suite::Chacha20Poly1305 => u64::MAX,
        }
    }
}

/// One direction's keys as rustls hands them over: suite, key, static iv.
#[derive(Clone, PartialEq, Eq)]
pub struct Keys {
    pub suite: Suite,
    key: [u8; 32],
    pub iv: [u8; aead::NONCE_LEN],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Keys").field("suite", &self.suite).finish()
    }
}

impl Keys {
    /// Keys from raw bytes (`key` 16 or 32 bytes as the suite says). `None` on a wrong length.
    pub fn new(suite: Suite, key: &[u8], iv: &[u8]) -> Option<Keys> {
        if key.len() != suite.algorithm().key_len() || iv.len() != aead::NONCE_LEN {
            return None;
        }
        let mut k = [0u8; 32];
        k[..key.len()].copy_from_slice(key);
        let mut v = [0u8; aead::NONCE_LEN];
        v.copy_from_slice(iv);
        Some(Keys {
            suite,
            key: k,
            iv: v,
        })
    }

    /// The keys of one direction of an extracted rustls connection.
    pub fn from_rustls(s: &ConnectionTrafficSecrets) -> Option<Keys> {
        let (suite, key, iv) = match s {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Suite::Aes128Gcm, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Suite::Aes256Gcm, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (Suite::Chacha20Poly1305, key, iv)
            }
            _ => return None,
        };
        Keys::new(suite, key.as_ref(), iv.as_ref())
    }

    fn key_bytes(&self) -> &[u8] {
        &self.key[..self.suite.algorithm().key_len()]
    }

    /// The expanded key; `None` only for a length `new` already refused.
    fn expand(&self) -> Option<LessSafeKey> {
        UnboundKey::new(self.suite.algorithm(), self.key_bytes())
            .ok()
            .map(LessSafeKey::new)
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        self.key = [0; 32];
    }
}

fn nonce(iv: &[u8; aead::NONCE_LEN], seq: u64) -> Nonce {
    let mut n = *iv;
    for (b, s) in n[4..].iter_mut().zip(seq.to_be_bytes()) {
        *b ^= s;
    }
    Nonce::assume_unique_for_key(n)
}

fn header(len: usize) -> [u8; RECORD_HEADER_BYTES] {
    let l = (len as u16).to_be_bytes();
    [CONTENT_APPLICATION_DATA, 3, 3, l[0], l[1]]
}

/// Our direction: seals plaintext into records.
pub struct Sealer {
    key: LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
    records_max: u64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").field("seq", &self.seq).finish()
    }
}

impl Sealer {
    /// A sealer starting at sequence number `seq` (what rustls used during the handshake).
    pub fn new(keys: &Keys, seq: u64) -> Option<Sealer> {
        Some(Sealer {
            key: keys.expand()?,
            iv: keys.iv,
            seq,
            records_max: keys.suite.records_max(),
        })
    }

    /// The next sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Records left before the key must change.
    pub fn records_left(&self) -> u64 {
        self.records_max.saturating_sub(self.seq)
    }

    /// Appends one record of `content_type` holding `plain` (at most 16 KiB) to `out`.
    pub fn seal(
        &mut self,
        content_type: u8,
        plain: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        if plain.len() > RECORD_PLAINTEXT_BYTES_MAX {
            return Err(RecordError::RecordOverflow);
        }
        if self.seq >= self.records_max || self.seq == u64::MAX {
            return Err(RecordError::KeysExhausted);
        }
        let body = plain.len() + 1 + TAG_BYTES;
        let hdr = header(body);
        let start = out.len();
        out.reserve(RECORD_HEADER_BYTES + body);
        out.extend_from_slice(&hdr);
        out.extend_from_slice(plain);
        out.push(content_type);
        self.seal_from(out, start, hdr)
    }

    /// Seals `bufs` (in order) as application data, cut into records of at most 16 KiB of
    /// their concatenation (a write of many small batches is one record, one seal).
    pub fn seal_all(&mut self, bufs: &[&[u8]], out: &mut Vec<u8>) -> Result<(), RecordError> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let records = total.div_ceil(RECORD_PLAINTEXT_BYTES_MAX).max(1);
        out.reserve(total + records * RECORD_OVERHEAD_BYTES);
        if let [one] = bufs {
            if one.len() <= RECORD_PLAINTEXT_BYTES_MAX {
                return self.seal(CONTENT_APPLICATION_DATA, one, out);
            }
        }
        // Plaintext goes straight into `out` after a header placeholder and is sealed in
        // place: no staging copy.
        let mut start = None::<usize>;
        let mut filled = 0usize;
        for b in bufs {
            let mut b = *b;
            while !b.is_empty() {
                let s = *start.get_or_insert_with(|| {
                    let s = out.len();
                    out.extend_from_slice(&[0; RECORD_HEADER_BYTES]);
                    s
                });
                let take = (RECORD_PLAINTEXT_BYTES_MAX - filled).min(b.len());
                out.extend_from_slice(&b[..take]);
                filled += take;
                b = &b[take..];
                if filled == RECORD_PLAINTEXT_BYTES_MAX {
                    self.seal_staged(s, out)?;
                    start = None;
                    filled = 0;
                }
            }
        }
        if let Some(s) = start {
            self.seal_staged(s, out)?;
        }
        Ok(())
    }

    /// Seals the plaintext at `out[start + 5..]` in place (the header placeholder at `start`).
    fn seal_staged(&mut self, start: usize, out: &mut Vec<u8>) -> Result<(), RecordError> {
        if self.seq >= self.records_max || self.seq == u64::MAX {
            out.truncate(start);
            return Err(RecordError::KeysExhausted);
        }
        out.push(CONTENT_APPLICATION_DATA);
        let body = out.len() - start - RECORD_HEADER_BYTES + TAG_BYTES;
        let hdr = header(body);
        out[start..start + RECORD_HEADER_BYTES].copy_from_slice(&hdr);
        self.seal_from(out, start, hdr)
    }

    /// Seals the record staged at `out[start..]` (header `hdr` in place, then the plaintext and
    /// its content type) and appends its tag; on failure (keys exhausted) drops the record.
    fn seal_from(
        &mut self,
        out: &mut Vec<u8>,
        start: usize,
        hdr: [u8; RECORD_HEADER_BYTES],
    ) -> Result<(), RecordError> {
        let sealed = self.key.seal_in_place_separate_tag(
            nonce(&self.iv, self.seq),
            Aad::from(hdr),
            &mut out[start + RECORD_HEADER_BYTES..],
        );
        match sealed {
            Ok(tag) => {
                out.extend_from_slice(tag.as_ref());
                self.seq += 1;
                Ok(())
            }
            Err(_) => {
                out.truncate(start);
                Err(RecordError::KeysExhausted)
            }
        }
    }

    /// Appends a protected alert record (close_notify on a clean close, else a fatal alert).
    pub fn seal_alert(&mut self, alert: Alert, out: &mut Vec<u8>) -> Result<(), RecordError> {
        let level = if alert == Alert::CloseNotify { 1 } else { 2 };
        self.seal(CONTENT_ALERT, &[level, alert as u8], out)
    }

    /// Appends a KeyUpdate(update_not_requested) record: the last record under this key.
    pub fn seal_key_update(&mut self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.seal(CONTENT_HANDSHAKE, &[HANDSHAKE_KEY_UPDATE, 0, 0, 1, 0], out)
    }
}

/// A complete record's header: where its body ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Body length (ciphertext and tag).
    pub len: usize,
}

impl Header {
    /// Header plus body.
    pub fn record_len(self) -> usize {
        RECORD_HEADER_BYTES + self.len
    }
}

/// Reads a record header at the start of `buf`: `Ok(None)` needs more bytes. Checked before
/// anything is buffered: only protected records (outer type application_data) of at most
/// [`RECORD_CIPHERTEXT_BYTES_MAX`] pass.
pub fn parse_header(buf: &[u8]) -> Result<Option<Header>, RecordError> {
    let Some(&typ) = buf.first() else {
        return Ok(None);
    };
    // Known before the rest of the header arrives: refuse early.
    if typ != CONTENT_APPLICATION_DATA {
        return Err(RecordError::Unexpected);
    }
    if let Some(&major) = buf.get(1) {
        if major != 3 {
            return Err(RecordError::Decode);
        }
    }
    if buf.len() < RECORD_HEADER_BYTES {
        return Ok(None);
    }
    let len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if len > RECORD_CIPHERTEXT_BYTES_MAX {
        return Err(RecordError::RecordOverflow);
    }
    Ok(Some(Header { len }))
}

/// What one opened record held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// Application data: the plaintext is `record[5..5 + len]` (decrypted in place).
    Data { len: usize },
    /// KeyUpdate from the peer; `update_requested`: we must answer with our own.
    KeyUpdate { update_requested: bool },
}

/// The peer's direction: opens records in place.
pub struct Opener {
    keys: Keys,
    seq: u64,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener").field("seq", &self.seq).finish()
    }
}

impl Opener {
    /// An opener starting at sequence number `seq`.
    pub fn new(keys: Keys, seq: u64) -> Opener {
        Opener { keys, seq }
    }

    /// The next sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Opens the complete record `record` (header included, as [`parse_header`] sized it) in
    /// place. A KeyUpdate must be the record's only message (it changes the key right after
    /// it); other handshake messages, change_cipher_spec and plaintext records are refused.
    pub fn open(&mut self, record: &mut [u8]) -> Result<Content, RecordError> {
        match parse_header(record)? {
            Some(h) if h.record_len() == record.len() => {}
            _ => return Err(RecordError::Decode),
        }
        if self.seq == u64::MAX {
            return Err(RecordError::KeysExhausted);
        }
        let mut hdr = [0u8; RECORD_HEADER_BYTES];
        hdr.copy_from_slice(&record[..RECORD_HEADER_BYTES]);
        let key = self.keys.expand().ok_or(RecordError::KeysExhausted)?;
        let body = &mut record[RECORD_HEADER_BYTES..];
        let plain = key
            .open_in_place(nonce(&self.keys.iv, self.seq), Aad::from(hdr), body)
            .map_err(|_| RecordError::BadRecordMac)?;
        self.seq += 1;
        // Inner plaintext: content, content type, zero padding (RFC 8446 §5.4).
        let Some(end) = plain.iter().rposition(|b| *b != 0) else {
            return Err(RecordError::Unexpected);
        };
        if end > RECORD_PLAINTEXT_BYTES_MAX {
            return Err(RecordError::RecordOverflow);
        }
        let content = &plain[..end];
        match plain[end] {
            CONTENT_APPLICATION_DATA => Ok(Content::Data { len: end }),
            CONTENT_ALERT => match content {
                [_, 0] => Err(RecordError::PeerClosed),
                [_, d] => Err(RecordError::PeerAlert(*d)),
                _ => Err(RecordError::Decode),
            },
            CONTENT_HANDSHAKE => match content {
                [HANDSHAKE_KEY_UPDATE, 0, 0, 1, r @ (0 | 1)] => Ok(Content::KeyUpdate {
                    update_requested: *r == 1,
                }),
                [HANDSHAKE_KEY_UPDATE, ..] => Err(RecordError::Decode),
                _ => Err(RecordError::Unexpected),
            },
            _ => Err(RecordError::Unexpected),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(suite: Suite) -> Keys {
        let len = suite.algorithm().key_len();
        Keys::new(suite, &[7u8; 32][..len], &[9u8; 12]).expect("keys")
    }

    fn sealer(k: &Keys, seq: u64) -> Sealer {
        Sealer::new(k, seq).expect("sealer")
    }

    const SUITES: [Suite; 3] = [Suite::Aes128Gcm, Suite::Aes256Gcm, Suite::Chacha20Poly1305];

    /// Opens every record of `wire`, returning plaintext and contents.
    fn open_all(o: &mut Opener, wire: &mut [u8]) -> Result<(Vec<u8>, Vec<Content>), RecordError> {
        let mut plain = Vec::new();
        let mut got = Vec::new();
        let mut at = 0;
        while at < wire.len() {
            let h = parse_header(&wire[at..])?.ok_or(RecordError::Decode)?;
            let rec = wire
                .get_mut(at..at + h.record_len())
                .ok_or(RecordError::Decode)?;
            let c = o.open(rec)?;
            if let Content::Data { len } = c {
                plain.extend_from_slice(&rec[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + len]);
            }
            got.push(c);
            at += h.record_len();
        }
        Ok((plain, got))
    }

    #[test]
    fn nonce_is_iv_xor_sequence_number_big_endian() {
        let iv = [0xffu8; 12];
        let n = nonce(&iv, 0x0102);
        let mut want = [0xffu8; 12];
        want[10] ^= 1;
        want[11] ^= 2;
        assert_eq!(n.as_ref(), &want);
    }

    #[test]
    fn seal_then_open_round_trips_for_every_suite_and_keeps_sequence() {
        for s in SUITES {
            let mut tx = sealer(&keys(s), 3);
            let mut rx = Opener::new(keys(s), 3);
            let mut wire = Vec::new();
            tx.seal(CONTENT_APPLICATION_DATA, b"hello", &mut wire)
                .expect("seal");
            tx.seal(CONTENT_APPLICATION_DATA, b"", &mut wire)
                .expect("empty record");
            assert_eq!(wire.len(), 2 * RECORD_OVERHEAD_BYTES + 5);
            assert_eq!(&wire[..5], &[23, 3, 3, 0, 22]);
            let (plain, _) = open_all(&mut rx, &mut wire).expect("open");
            assert_eq!(plain, b"hello");
            assert_eq!((tx.seq(), rx.seq()), (5, 5));
        }
    }

    #[test]
    fn seal_all_cuts_records_at_16_kib_of_the_concatenation() {
        let mut tx = sealer(&keys(Suite::Aes128Gcm), 0);
        let mut rx = Opener::new(keys(Suite::Aes128Gcm), 0);
        let a = vec![1u8; 10_000];
        let b = vec![2u8; 30_000];
        let c = vec![3u8; 5];
        let mut wire = Vec::new();
        tx.seal_all(&[&a, &b, &c], &mut wire).expect("seal");
        let total = a.len() + b.len() + c.len();
        assert_eq!(tx.seq(), total.div_ceil(RECORD_PLAINTEXT_BYTES_MAX) as u64);
        assert_eq!(wire.len(), total + 3 * RECORD_OVERHEAD_BYTES);
        let (plain, _) = open_all(&mut rx, &mut wire).expect("open");
        assert_eq!(plain, [a, b, c].concat());
    }

    #[test]
    fn a_flipped_bit_anywhere_fails_as_bad_record_mac_or_bad_header() {
        let mut wire = Vec::new();
        sealer(&keys(Suite::Aes256Gcm), 0)
            .seal(CONTENT_APPLICATION_DATA, b"payload", &mut wire)
            .expect("seal");
        for i in 0..wire.len() {
            let mut w = wire.clone();
            w[i] ^= 0x40;
            let r = open_all(&mut Opener::new(keys(Suite::Aes256Gcm), 0), &mut w);
            assert!(r.is_err(), "byte {i}");
            if i >= 2 {
                assert!(
                    matches!(r, Err(RecordError::BadRecordMac) | Err(RecordError::Decode)),
                    "byte {i}: {r:?}"
                );
            }
        }
        // A replayed (or reordered) record fails too: the nonce moved on.
        let mut rx = Opener::new(keys(Suite::Aes256Gcm), 0);
        let mut once = wire.clone();
        open_all(&mut rx, &mut once).expect("first");
        let mut again = wire.clone();
        assert_eq!(
            open_all(&mut rx, &mut again).map(|_| ()),
            Err(RecordError::BadRecordMac)
        );
    }

    #[test]
    fn headers_are_refused_before_the_body_arrives() {
        assert_eq!(parse_header(&[]), Ok(None));
        assert_eq!(parse_header(&[23, 3, 3, 0]), Ok(None));
        assert_eq!(parse_header(&[20]), Err(RecordError::Unexpected));
        assert_eq!(parse_header(&[22, 3, 3]), Err(RecordError::Unexpected));
        assert_eq!(
            parse_header(&[21, 3, 3, 0, 2]),
            Err(RecordError::Unexpected)
        );
        assert_eq!(parse_header(&[23, 4]), Err(RecordError::Decode));
        assert_eq!(
            parse_header(&[23, 3, 3, 0x41, 0x01]),
            Err(RecordError::RecordOverflow)
        );
        assert_eq!(
            parse_header(&[23, 3, 3, 0x41, 0x00]),
            Ok(Some(Header { len: 0x4100 }))
        );
    }

    #[test]
    fn alerts_key_updates_and_other_inner_types_are_told_apart() {
        let k = || keys(Suite::Chacha20Poly1305);
        let case = |typ: u8, body: &[u8]| {
            let mut w = Vec::new();
            sealer(&k(), 0).seal(typ, body, &mut w).expect("seal");
            Opener::new(k(), 0).open(&mut w)
        };
        assert_eq!(case(CONTENT_ALERT, &[1, 0]), Err(RecordError::PeerClosed));
        assert_eq!(
            case(CONTENT_ALERT, &[2, 40]),
            Err(RecordError::PeerAlert(40))
        );
        assert_eq!(case(CONTENT_ALERT, &[1]), Err(RecordError::Decode));
        assert_eq!(
            case(CONTENT_HANDSHAKE, &[24, 0, 0, 1, 1]),
            Ok(Content::KeyUpdate {
                update_requested: true
            })
        );
        assert_eq!(
            case(CONTENT_HANDSHAKE, &[24, 0, 0, 1, 0]),
            Ok(Content::KeyUpdate {
                update_requested: false
            })
        );
        assert_eq!(
            case(CONTENT_HANDSHAKE, &[24, 0, 0, 1, 2]),
            Err(RecordError::Decode)
        );
        // NewSessionTicket from a client, or a KeyUpdate with another message after it.
        assert_eq!(
            case(CONTENT_HANDSHAKE, &[4, 0, 0, 0]),
            Err(RecordError::Unexpected)
        );
        assert_eq!(
            case(CONTENT_HANDSHAKE, &[24, 0, 0, 1, 0, 24, 0, 0, 1, 0]),
            Err(RecordError::Decode)
        );
        assert_eq!(
            case(CONTENT_CHANGE_CIPHER_SPEC, &[1]),
            Err(RecordError::Unexpected)
        );
        // All padding, no content type.
        assert_eq!(case(0, &[0, 0]), Err(RecordError::Unexpected));
        // Padding after the content type is stripped (sealed with "type" 0: the last zero
        // is one more byte of padding).
        assert_eq!(
            case(0, &[b'x', CONTENT_APPLICATION_DATA, 0]),
            Ok(Content::Data { len: 1 })
        );
    }

    #[test]
    fn sealing_stops_at_the_key_budget() {
        let mut tx = sealer(&keys(Suite::Aes128Gcm), AES_GCM_RECORDS_MAX - 1);
        let mut out = Vec::new();
        assert_eq!(tx.records_left(), 1);
        tx.seal(CONTENT_APPLICATION_DATA, b"a", &mut out)
            .expect("last record");
        let len = out.len();
        assert_eq!(
            tx.seal(CONTENT_APPLICATION_DATA, b"b", &mut out),
            Err(RecordError::KeysExhausted)
        );
        assert_eq!(out.len(), len, "nothing half-written");
        assert_eq!(
            sealer(&keys(Suite::Aes128Gcm), 0).seal(
                CONTENT_APPLICATION_DATA,
                &vec![0; RECORD_PLAINTEXT_BYTES_MAX + 1],
                &mut out
            ),
            Err(RecordError::RecordOverflow)
        );
    }

    #[test]
    fn keys_of_the_wrong_length_are_refused() {
        assert!(Keys::new(Suite::Aes128Gcm, &[0; 32], &[0; 12]).is_none());
        assert!(Keys::new(Suite::Aes256Gcm, &[0; 32], &[0; 11]).is_none());
        assert!(Keys::new(Suite::Chacha20Poly1305, &[0; 32], &[0; 12]).is_some());
        assert!(!format!("{:?}", keys(Suite::Aes128Gcm)).contains('7'));
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any bytes, cut anywhere: the parser and opener end in a record, "more", or an
            /// error; never a panic, never plaintext from an unauthenticated record.
            #[test]
            fn random_bytes_never_panic_and_never_yield_data(
                bytes in proptest::collection::vec(any::<u8>(), 0..600),
                suite in 0usize..3,
            ) {
                let mut rx = Opener::new(keys(SUITES[suite]), 0);
                let mut buf = bytes;
                if let Ok(Some(h)) = parse_header(&buf) {
                    if h.record_len() <= buf.len() {
                        let r = rx.open(&mut buf[..h.record_len()]);
                        prop_assert!(r.is_err());
                    }
                }
            }

            /// decode(encode(x)) == x over random batches, suites and starting sequences.
            #[test]
            fn sealed_batches_open_to_their_concatenation(
                bufs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..5000), 0..12),
                suite in 0usize..3,
                seq in 0u64..1_000_000,
            ) {
                let mut tx = sealer(&keys(SUITES[suite]), seq);
                let mut rx = Opener::new(keys(SUITES[suite]), seq);
                let refs: Vec<&[u8]> = bufs.iter().map(|b| &b[..]).collect();
                let mut wire = Vec::new();
                tx.seal_all(&refs, &mut wire).expect("seal");
                let (plain, _) = open_all(&mut rx, &mut wire).expect("open");
                prop_assert_eq!(plain, bufs.concat());
                prop_assert_eq!(tx.seq(), rx.seq());
            }
        }
    }
}
