//! The durable log of accepted high-reach messages (issue 9): a message is appended before its
//! push is answered, and a broker restarted on the same data directory reloads every message
//! that was neither ACKed nor ended, nor past its ttl.
//!
//! # Why a segment log of our own
//!
//! The log is write-mostly, read only at start, and its records die young (most messages are
//! ACKed within a second). What it must do fast is "make this group of appends durable". The
//! `#[ignore]`d bench `broker/tests/store_bench.rs` measures appends per second on one core with
//! durability on, against `redb` (the embedded store with no dependencies of its own, one write
//! transaction per group, `Durability::Immediate`) at the same group sizes. The device's sync
//! latency sets both rates: ours/redb came out 0.99 to 1.40 over group sizes 1 to 512 (figures and
//! command in docs/architecture.md, "delivery (issue 9) building blocks"). At equal or better
//! throughput this log needs no dependency but `crc32fast` (already built for `flate2`), recovers
//! with one sequential read and an explicit torn-tail rule, and drops dead records by compaction
//! rather than keeping freed pages in a B-tree file.
//!
//! # Format
//!
//! Files `reach-<20-digit segment number>.log` in the data directory. Each record:
//!
//! ```text
//! u32 payload_len (BE) | u32 crc32 of payload (BE) | payload
//! payload: u8 kind, then
//!   1 Accept  u64 msg_id | u64 expires_at_ms (unix) | u8 target (0 user, 1 device) |
//!             user: u64 uid / device: u8 len + bytes | u32 body_len | body
//!   2 Acked   u64 msg_id
//!   3 Ended   u64 msg_id        (expired or retries exhausted)
//!   4 Floor   u64 msg_id        (the largest msg id the log has seen; kept by compaction)
//! ```
//!
//! # Durability and recovery
//!
//! - Appends go to a buffer; [`Store::commit`] writes the buffer and `fdatasync`s it. Group
//!   commit without holding the caller's lock across the sync: [`Store::take_staged`] takes the
//!   buffer, [`Staged::write`] writes and syncs it, [`Store::staged_done`] counts it (the
//!   broker's commit thread does this, see `crate::courier`). A push is answered only after the
//!   write covering its append returned `Ok`.
//! - On open, records are read in segment order until the first that is short, oversized or
//!   fails its CRC. In the last segment that is a torn tail from a crash mid-append: it is cut
//!   off (and counted). In an earlier segment it is corruption: [`StoreError::Corrupt`].
//! - Compaction ([`Store::compact`], from `commit` once the log is both larger than
//!   `compact_bytes_min` and four times the live records) writes the live records to a new
//!   segment, syncs it and the directory, and only then deletes the older segments. A crash in
//!   between leaves old and new segments whose replay gives the same live set.
//!
//! # One broker per directory
//!
//! [`Store::open`] takes an exclusive `flock` on `LOCK` in the directory (and writes its pid
//! there) before it reads anything, and holds it while the store lives; the kernel drops it
//! when the process ends, even by `kill -9`. A second broker on the same directory (two
//! writers would interleave appends and compact each other's segments away) fails at start
//! with [`StoreError::Locked`], which names the directory and the holder's pid.
//!
//! Invariants: `live` is exactly what a reload would return (before expiry); no record is
//! larger than `record_bytes_max`, checked before it is written and before a read allocates.

use crate::reach::Target;
use bytes::Bytes;
use proto::id::{DeviceId, MsgId, UserId};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Default of `store_record_bytes_max`: the largest record (a message body plus ~100 bytes).
pub const STORE_RECORD_BYTES_MAX: usize = 128 * 1024;
/// Default of `store_compact_bytes_min`: no compaction below this log size.
pub const STORE_COMPACT_BYTES_MIN: u64 = 64 * 1024 * 1024;
/// The log may grow to this many times its live records before compaction.
pub const STORE_COMPACT_RATIO: u64 = 4;

const HEADER_BYTES: usize = 8;
const KIND_ACCEPT: u8 = 1;
const KIND_ACKED: u8 = 2;
const KIND_ENDED: u8 = 3;
const KIND_FLOOR: u8 = 4;
const DEVICE_BYTES_MAX: usize = u8::MAX as usize;

/// Store limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub record_bytes_max: usize,
    pub compact_bytes_min: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            record_bytes_max: STORE_RECORD_BYTES_MAX,
            compact_bytes_min: STORE_COMPACT_BYTES_MIN,
        }
    }
}

/// Why the store failed. Every variant is the host's or the operator's business, not a peer's.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file operation failed (disk full, permissions, I/O error).
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A record before the last segment's tail is damaged: the log cannot be trusted.
    #[error("corrupt record in {path} at byte {offset}")]
    Corrupt { path: PathBuf, offset: u64 },
    /// The record would exceed `record_bytes_max` (refuse the push).
    #[error("record of {0} bytes exceeds record_bytes_max")]
    TooLarge(usize),
    /// Another process holds the directory's lock (see the module docs).
    #[error("{} is in use by another broker ({}): one data directory per broker", dir.display(), holder(*pid))]
    Locked { dir: PathBuf, pid: Option<u32> },
    /// A device id longer than 255 bytes cannot be logged.
    #[error("device id longer than 255 bytes")]
    DeviceTooLong,
}

/// An accepted high-reach message as logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accept {
    pub msg: MsgId,
    pub target: Target,
    /// Unix time (ms) at which its ttl ends.
    pub expires_at_ms: u64,
    /// The body as delivered (with its `msg_id` field).
    pub body: Bytes,
}

/// What [`Store::open`] found.
#[derive(Debug, Default)]
pub struct Reload {
    /// The messages to track again, by msg id.
    pub live: Vec<Accept>,
    /// The largest msg id ever logged: new ids must be above it.
    pub msg_id_max: Option<MsgId>,
    /// Bytes cut off the last segment's torn tail.
    pub torn_bytes: u64,
    /// Live records dropped because their ttl ended while the broker was down.
    pub expired: usize,
}

/// The open log.
pub struct Store {
    /// `LOCK`, flocked while the store lives.
    _lock: File,
    dir: PathBuf,
    limits: Limits,
    /// Shared with a [`Staged`] write in flight (the commit thread writes outside the lock).
    file: Arc<File>,
    path: PathBuf,
    segment: u64,
    /// Older segments (all to be deleted by the next compaction).
    older: Vec<PathBuf>,
    buf: Vec<u8>,
    log_bytes: u64,
    live: HashMap<MsgId, Accept>,
    live_bytes: u64,
    msg_id_max: Option<MsgId>,
}

enum Record {
    Accept(Accept),
    Acked(MsgId),
    Ended(MsgId),
    Floor(MsgId),
}

impl Store {
    /// Opens (or creates) the log in `dir` and reloads it; `now_ms` is the unix time in ms.
    pub fn open(dir: &Path, limits: Limits, now_ms: u64) -> Result<(Store, Reload), StoreError> {
        fs::create_dir_all(dir).map_err(io("create", dir))?;
        let lock = lock_dir(dir)?;
        let mut segments = list_segments(dir)?;
        let mut reload = Reload::default();
        let mut live = HashMap::new();
        let mut msg_id_max = None;
        let mut log_bytes = 0;
        let count = segments.len();
        for (i, (_, path)) in segments.iter().enumerate() {
            let mut bytes = Vec::new();
            File::open(path)
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .map_err(io("read", path))?;
            let (records, good) = parse(&bytes, limits.record_bytes_max);
            if good < bytes.len() {
                if i + 1 < count {
                    return Err(StoreError::Corrupt {
                        path: path.clone(),
                        offset: good as u64,
                    });
                }
                let f = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(io("open", path))?;
                f.set_len(good as u64).map_err(io("truncate", path))?;
                f.sync_all().map_err(io("sync", path))?;
                reload.torn_bytes = (bytes.len() - good) as u64;
            }
            log_bytes += good as u64;
            for r in records {
                apply(&mut live, &mut msg_id_max, r);
            }
        }
        let before = live.len();
        live.retain(|_, a: &mut Accept| a.expires_at_ms > now_ms);
        reload.expired = before - live.len();
        let (segment, path) = match segments.pop() {
            Some(last) => last,
            None => {
                let p = segment_path(dir, 1);
                File::create(&p).map_err(io("create", &p))?;
                sync_dir(dir)?;
                (1, p)
            }
        };
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io("open", &path))?;
        let live_bytes = live.values().map(accept_bytes).sum();
        let mut sorted: Vec<Accept> = live.values().cloned().collect();
        sorted.sort_by_key(|a| a.msg);
        reload.live = sorted;
        reload.msg_id_max = msg_id_max;
        let store = Store {
            _lock: lock,
            dir: dir.to_path_buf(),
            limits,
            file: Arc::new(file),
            path,
            segment,
            older: segments.into_iter().map(|(_, p)| p).collect(),
            buf: Vec::new(),
            log_bytes,
            live,
            live_bytes,
            msg_id_max,
        };
        Ok((store, reload))
    }

    /// Logs an accepted message (durable after the next [`Store::commit`]).
    pub fn append_accept(&mut self, a: Accept) -> Result<(), StoreError> {
        let start = self.buf.len();
        encode(
            &mut self.buf,
            &Record::Accept(a.clone()),
            self.limits.record_bytes_max,
        )
        .inspect_err(|_| self.buf.truncate(start))?;
        self.msg_id_max = self.msg_id_max.max(Some(a.msg));
        self.live_bytes += accept_bytes(&a);
        if let Some(old) = self.live.insert(a.msg, a) {
            self.live_bytes -= accept_bytes(&old);
        }
        Ok(())
    }

    /// Logs an ACK: the message is not reloaded once this is committed.
    pub fn append_acked(&mut self, msg: MsgId) {
        self.end(Record::Acked(msg), msg);
    }

    /// Logs the end of tracking without ACK (expired or retries exhausted).
    pub fn append_ended(&mut self, msg: MsgId) {
        self.end(Record::Ended(msg), msg);
    }

    /// Makes every append so far durable (one write, one `fdatasync`), then compacts if the
    /// log has grown past its bounds. `now_ms`: unix time in ms, for compaction's expiry.
    pub fn commit(&mut self, now_ms: u64) -> Result<(), StoreError> {
        self.flush()?;
        if self.log_bytes > self.limits.compact_bytes_min
            && self.log_bytes > STORE_COMPACT_RATIO * self.live_bytes
        {
            self.compact(now_ms)?;
        }
        Ok(())
    }

    /// Rewrites the live records into a new segment and deletes the older ones.
    pub fn compact(&mut self, now_ms: u64) -> Result<(), StoreError> {
        self.flush()?;
        self.live.retain(|_, a| a.expires_at_ms > now_ms);
        let mut live: Vec<&Accept> = self.live.values().collect();
        live.sort_by_key(|a| a.msg);
        let mut out = Vec::new();
        if let Some(m) = self.msg_id_max {
            encode(&mut out, &Record::Floor(m), self.limits.record_bytes_max)?;
        }
        for a in live {
            encode(
                &mut out,
                &Record::Accept(a.clone()),
                self.limits.record_bytes_max,
            )?;
        }
        let segment = self.segment + 1;
        let path = segment_path(&self.dir, segment);
        let mut file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(io("create", &path))?;
        file.write_all(&out).map_err(io("write", &path))?;
        file.sync_data().map_err(io("sync", &path))?;
        sync_dir(&self.dir)?;
        let old = std::mem::replace(&mut self.path, path);
        self.older.push(old);
        // A segment left behind by a failed removal is harmless: everything live in it is in
        // the new segment too, and replaying it first changes nothing.
        while let Some(p) = self.older.pop() {
            fs::remove_file(&p).map_err(io("remove", &p))?;
        }
        sync_dir(&self.dir)?;
        self.file = Arc::new(file);
        self.segment = segment;
        self.log_bytes = out.len() as u64;
        self.live_bytes = self.live.values().map(accept_bytes).sum();
        Ok(())
    }

    /// Group commit, step 1 (under the caller's lock): takes every append so far as one write
    /// to make outside the lock ([`Staged::write`]); `None` when nothing is buffered. At most
    /// one may be in flight, and [`Store::staged_done`] must follow it before the next.
    pub fn take_staged(&mut self) -> Option<Staged> {
        if self.buf.is_empty() {
            return None;
        }
        Some(Staged {
            bytes: std::mem::take(&mut self.buf),
            file: self.file.clone(),
            path: self.path.clone(),
            at: self.log_bytes,
        })
    }

    /// Group commit, step 3 (under the lock again): counts a written [`Staged`] and compacts
    /// when the log has grown past its bounds.
    pub fn staged_done(&mut self, written: u64, now_ms: u64) -> Result<(), StoreError> {
        self.log_bytes += written;
        if self.log_bytes > self.limits.compact_bytes_min
            && self.log_bytes > STORE_COMPACT_RATIO * self.live_bytes
        {
            self.compact(now_ms)?;
        }
        Ok(())
    }

    /// Forgets an accepted message whose staged write failed (its push is refused).
    pub fn discard(&mut self, msg: MsgId) {
        if let Some(old) = self.live.remove(&msg) {
            self.live_bytes -= accept_bytes(&old);
        }
    }

    /// Messages logged and neither ACKed nor ended.
    pub fn live_len(&self) -> usize {
        self.live.len()
    }

    /// Bytes in the log files (committed).
    pub fn log_bytes(&self) -> u64 {
        self.log_bytes
    }

    fn end(&mut self, r: Record, msg: MsgId) {
        // Ids only: these cannot exceed any sane record_bytes_max.
        let _ = encode(&mut self.buf, &r, usize::MAX);
        if let Some(old) = self.live.remove(&msg) {
            self.live_bytes -= accept_bytes(&old);
        }
    }

    /// Writes and syncs the buffer.
    fn flush(&mut self) -> Result<(), StoreError> {
        if !self.buf.is_empty() {
            (&*self.file)
                .write_all(&self.buf)
                .map_err(io("write", &self.path))?;
            self.file.sync_data().map_err(io("sync", &self.path))?;
            self.log_bytes += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }
}

/// Appends taken by [`Store::take_staged`]: one write and one `fdatasync` for all of them.
pub struct Staged {
    bytes: Vec<u8>,
    file: Arc<File>,
    path: PathBuf,
    /// The committed length of the segment before this write.
    at: u64,
}

impl Staged {
    /// Writes and syncs (no lock needed). On failure the segment is cut back to its committed
    /// length (best effort), so a partial write does not turn later records into a torn tail.
    pub fn write(&self) -> Result<u64, StoreError> {
        let r = (&*self.file)
            .write_all(&self.bytes)
            .map_err(io("write", &self.path))
            .and_then(|()| self.file.sync_data().map_err(io("sync", &self.path)));
        if r.is_err() {
            let _ = self.file.set_len(self.at);
        }
        r.map(|()| self.bytes.len() as u64)
    }
}

fn apply(live: &mut HashMap<MsgId, Accept>, msg_id_max: &mut Option<MsgId>, r: Record) {
    match r {
        Record::Accept(a) => {
            *msg_id_max = (*msg_id_max).max(Some(a.msg));
            live.insert(a.msg, a);
        }
        Record::Acked(m) | Record::Ended(m) => {
            live.remove(&m);
        }
        Record::Floor(m) => *msg_id_max = (*msg_id_max).max(Some(m)),
    }
}

fn accept_bytes(a: &Accept) -> u64 {
    (a.body.len() + 64) as u64
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The lock file's name in a data directory.
pub const LOCK_FILE: &str = "LOCK";

/// Takes the directory's exclusive lock and records our pid in it.
fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(LOCK_FILE);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io("open", &path))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = f.read_to_string(&mut text);
            return Err(StoreError::Locked {
                dir: dir.to_path_buf(),
                pid: text.trim().parse().ok(),
            });
        }
        Err(fs::TryLockError::Error(e)) => return Err(io("lock", &path)(e)),
    }
    f.set_len(0)
        .and_then(|()| f.write_all(format!("{}\n", std::process::id()).as_bytes()))
        .map_err(io("write", &path))?;
    Ok(f)
}

fn holder(pid: Option<u32>) -> String {
    pid.map_or_else(|| "pid unknown".into(), |p| format!("pid {p}"))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync", dir))
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("reach-{n:020}.log"))
}

/// The segments in `dir`, in order. Other files are left alone.
fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StoreError> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).map_err(io("list", dir))? {
        let e = e.map_err(io("list", dir))?;
        let name = e.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|s| s.strip_prefix("reach-"))
            .and_then(|s| s.strip_suffix(".log"))
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        out.push((n, e.path()));
    }
    out.sort();
    Ok(out)
}

fn encode(out: &mut Vec<u8>, r: &Record, record_bytes_max: usize) -> Result<(), StoreError> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_BYTES]);
    match r {
        Record::Accept(a) => {
            out.push(KIND_ACCEPT);
            out.extend_from_slice(&a.msg.0.to_be_bytes());
            out.extend_from_slice(&a.expires_at_ms.to_be_bytes());
            match &a.target {
                Target::User(u) => {
                    out.push(0);
                    out.extend_from_slice(&u.0.to_be_bytes());
                }
                Target::Device(d) => {
                    if d.0.len() > DEVICE_BYTES_MAX {
                        out.truncate(start);
                        return Err(StoreError::DeviceTooLong);
                    }
                    out.push(1);
                    out.push(d.0.len() as u8);
                    out.extend_from_slice(d.0.as_bytes());
                }
            }
            out.extend_from_slice(&(a.body.len() as u32).to_be_bytes());
            out.extend_from_slice(&a.body);
        }
        Record::Acked(m) | Record::Ended(m) | Record::Floor(m) => {
            out.push(match r {
                Record::Acked(_) => KIND_ACKED,
                Record::Ended(_) => KIND_ENDED,
                _ => KIND_FLOOR,
            });
            out.extend_from_slice(&m.0.to_be_bytes());
        }
    }
    let len = out.len() - start - HEADER_BYTES;
    if len > record_bytes_max || len > u32::MAX as usize {
        out.truncate(start);
        return Err(StoreError::TooLarge(len));
    }
    let crc = crc32fast::hash(&out[start + HEADER_BYTES..]);
    out[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
    Ok(())
}

/// The records of a segment up to the first damaged one, and the length of the good prefix.
fn parse(bytes: &[u8], record_bytes_max: usize) -> (Vec<Record>, usize) {
    let mut records = Vec::new();
    let mut at = 0;
    while let Some((r, used)) = parse_one(&bytes[at..], record_bytes_max) {
        records.push(r);
        at += used;
    }
    (records, at)
}

fn parse_one(b: &[u8], record_bytes_max: usize) -> Option<(Record, usize)> {
    let len = u32::from_be_bytes(b.get(0..4)?.try_into().ok()?) as usize;
    let crc = u32::from_be_bytes(b.get(4..8)?.try_into().ok()?);
    if len > record_bytes_max {
        return None;
    }
    let p = b.get(HEADER_BYTES..HEADER_BYTES + len)?;
    if crc32fast::hash(p) != crc {
        return None;
    }
    let mut r = Reader(p);
    let rec = match r.u8()? {
        KIND_ACCEPT => {
            let msg = MsgId(r.u64()?);
            let expires_at_ms = r.u64()?;
            let target = match r.u8()? {
                0 => Target::User(UserId(r.u64()?)),
                1 => {
                    let n = usize::from(r.u8()?);
                    let d = std::str::from_utf8(r.take(n)?).ok()?;
                    Target::Device(DeviceId(d.to_owned()))
                }
                _ => return None,
            };
            let n = r.u32()? as usize;
            let body = Bytes::copy_from_slice(r.take(n)?);
            Record::Accept(Accept {
                msg,
                target,
                expires_at_ms,
                body,
            })
        }
        KIND_ACKED => Record::Acked(MsgId(r.u64()?)),
        KIND_ENDED => Record::Ended(MsgId(r.u64()?)),
        KIND_FLOOR => Record::Floor(MsgId(r.u64()?)),
        _ => return None,
    };
    if !r.0.is_empty() {
        return None;
    }
    Some((rec, HEADER_BYTES + len))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        Some(h)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("barrage-store-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn accept(m: u64, expires_at_ms: u64) -> Accept {
        Accept {
            msg: MsgId(m),
            target: if m.is_multiple_of(2) {
                Target::User(UserId(m))
            } else {
                Target::Device(DeviceId(format!("dev-{m}")))
            },
            expires_at_ms,
            body: Bytes::from(format!("{{\"msg_id\":\"{m}\",\"n\":{m}}}")),
        }
    }

    fn msgs(r: &Reload) -> Vec<u64> {
        r.live.iter().map(|a| a.msg.0).collect()
    }

    #[test]
    fn reloads_what_is_neither_acked_ended_nor_expired() {
        let dir = tmp("reload");
        let (mut s, r) = Store::open(&dir, Limits::default(), 0).unwrap();
        assert!(r.live.is_empty() && r.msg_id_max.is_none());
        for m in 1..=6 {
            s.append_accept(accept(m, if m == 5 { 500 } else { 10_000 }))
                .unwrap();
        }
        s.append_acked(MsgId(2));
        s.append_ended(MsgId(3));
        s.append_acked(MsgId(99)); // unknown: harmless
        s.commit(0).unwrap();
        s.append_accept(accept(7, 10_000)).unwrap(); // never committed: may be lost
        drop(s);
        let (mut s, r) = Store::open(&dir, Limits::default(), 1000).unwrap();
        assert_eq!(msgs(&r), [1, 4, 6]);
        assert_eq!(
            (r.expired, r.torn_bytes, r.msg_id_max),
            (1, 0, Some(MsgId(6)))
        );
        assert_eq!(r.live[0], accept(1, 10_000));
        assert_eq!(r.live[1], accept(4, 10_000));
        // It keeps appending to the same log after a reload.
        s.append_acked(MsgId(4));
        s.commit(1000).unwrap();
        drop(s);
        let (_, r) = Store::open(&dir, Limits::default(), 1000).unwrap();
        assert_eq!(msgs(&r), [1, 6]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_torn_tail_is_cut_and_earlier_damage_is_an_error() {
        let dir = tmp("torn");
        let (mut s, _) = Store::open(&dir, Limits::default(), 0).unwrap();
        s.append_accept(accept(1, 10_000)).unwrap();
        s.append_accept(accept(2, 10_000)).unwrap();
        s.commit(0).unwrap();
        let path = s.path.clone();
        drop(s);
        let full = fs::read(&path).unwrap();
        for cut in [full.len() - 1, full.len() - 10, full.len() / 2 + 3] {
            fs::write(&path, &full[..cut]).unwrap();
            let (s, r) = Store::open(&dir, Limits::default(), 0).unwrap();
            assert_eq!(msgs(&r), [1], "cut at {cut}");
            assert!(r.torn_bytes > 0);
            assert_eq!(s.log_bytes(), fs::metadata(&path).unwrap().len());
        }
        // A flipped byte inside the last record fails its CRC: same as torn.
        let mut bad = full.clone();
        let n = bad.len();
        bad[n - 3] ^= 0x40;
        fs::write(&path, &bad).unwrap();
        let (_, r) = Store::open(&dir, Limits::default(), 0).unwrap();
        assert_eq!(msgs(&r), [1]);
        // Damage in a segment that is not the last cannot be a torn append.
        fs::write(&path, &bad).unwrap();
        fs::write(segment_path(&dir, 2), b"").unwrap();
        assert!(matches!(
            Store::open(&dir, Limits::default(), 0),
            Err(StoreError::Corrupt { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn compaction_keeps_the_live_set_and_the_largest_id() {
        let dir = tmp("compact");
        let limits = Limits {
            compact_bytes_min: 4096,
            ..Limits::default()
        };
        let (mut s, _) = Store::open(&dir, limits, 0).unwrap();
        for m in 1..=400u64 {
            s.append_accept(accept(m, if m % 7 == 0 { 50 } else { 10_000 }))
                .unwrap();
            if m % 10 != 0 {
                s.append_acked(MsgId(m));
            }
            s.commit(100).unwrap();
        }
        assert!(
            s.log_bytes() < 8 * 4096,
            "compaction ran: {}",
            s.log_bytes()
        );
        assert_eq!(list_segments(&dir).unwrap().len(), 1);
        s.append_acked(MsgId(400));
        s.commit(100).unwrap();
        drop(s);
        let (_, r) = Store::open(&dir, limits, 100).unwrap();
        let want: Vec<u64> = (1..400).filter(|m| m % 10 == 0 && m % 7 != 0).collect();
        assert_eq!(msgs(&r), want);
        assert_eq!(r.msg_id_max, Some(MsgId(400)));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn oversized_records_are_refused_before_they_are_written() {
        let dir = tmp("big");
        let limits = Limits {
            record_bytes_max: 100,
            ..Limits::default()
        };
        let (mut s, _) = Store::open(&dir, limits, 0).unwrap();
        let mut a = accept(1, 10);
        a.body = Bytes::from(vec![b'x'; 200]);
        assert!(matches!(s.append_accept(a), Err(StoreError::TooLarge(_))));
        let mut a = accept(2, 10);
        a.target = Target::Device(DeviceId("d".repeat(256)));
        assert!(matches!(s.append_accept(a), Err(StoreError::DeviceTooLong)));
        assert_eq!(s.live_len(), 0);
        s.commit(0).unwrap();
        assert_eq!(s.log_bytes(), 0);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_second_open_of_a_directory_is_refused_naming_the_holder() {
        let dir = tmp("lock");
        let (s, _) = Store::open(&dir, Limits::default(), 0).unwrap();
        let e = Store::open(&dir, Limits::default(), 0)
            .err()
            .expect("refused");
        let text = e.to_string();
        assert!(
            matches!(e, StoreError::Locked { pid: Some(p), .. } if p == std::process::id()),
            "{text}"
        );
        assert!(text.contains(&dir.display().to_string()), "{text}");
        drop(s);
        Store::open(&dir, Limits::default(), 0).expect("free again once closed");
        fs::remove_dir_all(&dir).unwrap();
    }
}
