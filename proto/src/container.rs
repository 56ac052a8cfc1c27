//! Nested containers: an outer packet whose body is a run of complete inner packets,
//! either plain (`ver 0`, packets back to back at top level), zlib (`ver 2`, RFC 1950)
//! or brotli (`ver 3`). This nesting *is* the aggregation format.
//!
//! CONTRACT: signatures used by broker, edge and loadtest; keep them.

use crate::id::Encoding;
use crate::packet::{self, op, ver, OwnedPacket};

/// Smallest brotli window (log2), as the format defines it.
pub const BROTLI_LGWIN_MIN: u32 = 10;
/// Largest brotli window (log2) without the non-standard "large window" extension.
pub const BROTLI_LGWIN_MAX: u32 = 24;
/// Smallest window at which qualities 5..=9 use brotli's fast hashers (H5/H6); see [`effective_lgwin`].
pub const BROTLI_LGWIN_HASHER_MIN: u32 = 17;
/// Largest brotli quality.
pub const BROTLI_QUALITY_MAX: u32 = 11;
/// How deep `unpack` looks into nested containers (outer container, then one inner level),
/// as the public clients do.
pub const UNPACK_DEPTH_MAX: u32 = 2;
/// Output chunk of the incremental decompressors; the output grows at most this much past
/// what is already decoded, so a bomb is caught before the cap is overrun in memory.
const DECOMPRESS_CHUNK_BYTES: usize = 16 * 1024;

/// Brotli encoder settings; the broker picks them by measurement (see docs/benchmarks.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BrotliParams {
    /// 0..=11.
    pub quality: u32,
    /// log2 of the window, 10..=24; fit it to the input (a few-KB batch needs no 4 MiB window).
    pub lgwin: u32,
}

impl Default for BrotliParams {
    fn default() -> Self {
        BrotliParams {
            quality: 5,
            lgwin: 16,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ContainerError {
    /// The compressed body is not valid zlib/brotli.
    #[error("corrupt compressed body")]
    Corrupt,
    /// Decompressing would exceed the cap (a compression bomb).
    #[error("decompressed size above the cap")]
    TooLarge,
    /// The decompressed bytes are not a run of complete packets.
    #[error("inner packets malformed")]
    BadInner,
    /// The outer packet's `ver` is not 0, 2 or 3.
    #[error("not a container version")]
    NotContainer,
}

/// Builds the complete outer packet (`op 5`, the given encoding's `ver`, header `seq` = `seq`)
/// whose body is `inner`, a run of complete encoded packets. For `Encoding::Plain` the result is
/// `inner` with the `seq` field of each top-level packet set to `seq` (plain packets are sent
/// back to back at top level, as Bilibili does).
///
/// The outer `seq` carries the batch's stream sequence number (our gap-detection extension;
/// Bilibili clients ignore it): low-priority batches use the room seq, high-priority batches
/// `0x8000_0000 | seq`.
pub fn encode_outer(encoding: Encoding, inner: &[u8], seq: u32, brotli: BrotliParams) -> Vec<u8> {
    match encoding {
        Encoding::Plain => {
            let mut out = inner.to_vec();
            let mut at = 0;
            // `inner` is our own encoding; if it is ever malformed, the rest is left untouched
            // rather than guessed at.
            while let Ok((_, used)) = packet::decode(&inner[at..], u32::MAX) {
                out[at + 12..at + 16].copy_from_slice(&seq.to_be_bytes());
                at += used;
            }
            out
        }
        Encoding::Zlib => {
            packet::encode_vec(ver::ZLIB, op::NOTIFICATION, seq, &zlib_compress(inner))
        }
        Encoding::Brotli => packet::encode_vec(
            ver::BROTLI,
            op::NOTIFICATION,
            seq,
            &brotli_compress(inner, brotli),
        ),
    }
}

/// The brotli window actually used for `input_len` bytes: the smallest window that holds the
/// whole input (brotli's usable window is `2^lgwin - 16`), never above the caller's `lgwin`,
/// always within `BROTLI_LGWIN_MIN..=BROTLI_LGWIN_MAX`. A smaller window means a smaller
/// encoder allocation and a smaller decoder ring buffer on the client, at no cost in ratio.
pub fn fit_lgwin(input_len: usize, lgwin: u32) -> u32 {
    let ceiling = lgwin.clamp(BROTLI_LGWIN_MIN, BROTLI_LGWIN_MAX);
    let mut w = BROTLI_LGWIN_MIN;
    while w < ceiling && (1usize << w) - 16 < input_len {
        w += 1;
    }
    w
}

/// The window `brotli_compress` uses: [`fit_lgwin`], then, for qualities 5..=9, at least
/// `BROTLI_LGWIN_HASHER_MIN`. Measured (`measure_brotli_batch_settings`, 3 KB batch): at
/// quality 5 a window of 16 or less makes the encoder pick its "forgetful chain" hasher (H40..H42),
/// which was ~5x slower per batch (about 3 ms against 0.6 ms) and compressed worse (243 B against
/// 222 B) than the hasher it picks from 17 up. The decoder sizes its ring buffer to the stream's
/// actual length when the whole batch is one final meta-block, so the larger nominal window costs
/// clients nothing on small batches.
pub fn effective_lgwin(input_len: usize, params: BrotliParams) -> u32 {
    let w = fit_lgwin(input_len, params.lgwin);
    if (5..=9).contains(&params.quality) {
        w.max(BROTLI_LGWIN_HASHER_MIN)
    } else {
        w
    }
}

/// Compresses with brotli (exposed for the compression bench).
pub fn brotli_compress(input: &[u8], params: BrotliParams) -> Vec<u8> {
    let enc = brotli::enc::BrotliEncoderParams {
        quality: params.quality.min(BROTLI_QUALITY_MAX) as i32,
        lgwin: effective_lgwin(input.len(), params) as i32,
        size_hint: input.len(),
        ..Default::default()
    };
    let mut out = Vec::with_capacity(input.len() / 2 + 64);
    let mut src = input;
    // Reading a slice and writing a Vec cannot fail, so there is no error to report.
    let _ = brotli::BrotliCompress(&mut src, &mut out, &enc);
    out
}

/// Compresses with zlib at the default level (exposed for the compression bench).
pub fn zlib_compress(input: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::ZlibEncoder::new(
        Vec::with_capacity(input.len() / 2 + 64),
        flate2::Compression::default(),
    );
    // Writing to a Vec cannot fail.
    let _ = enc.write_all(input);
    enc.finish().unwrap_or_default()
}

/// Grows `out` so it can take `more` bytes without going past `cap_bytes` of capacity
/// (amortised doubling, clipped at the cap).
fn reserve_capped(out: &mut Vec<u8>, more: usize, cap_bytes: usize) {
    let need = out.len() + more;
    if need > out.capacity() {
        let target = (out.capacity() * 2).max(need).min(cap_bytes.max(need));
        out.reserve_exact(target - out.len());
    }
}

/// Decompresses a brotli body, failing with `TooLarge` past `cap_bytes`.
///
/// Truncated input is `Corrupt` (the stream never reaches its end marker), and so are bytes
/// after the end marker.
pub fn brotli_decompress(input: &[u8], cap_bytes: usize) -> Result<Vec<u8>, ContainerError> {
    use brotli_decompressor::{BrotliDecompressStream, BrotliResult, BrotliState, StandardAlloc};
    let mut state = BrotliState::new(
        StandardAlloc::default(),
        StandardAlloc::default(),
        StandardAlloc::default(),
    );
    let mut out = Vec::new();
    let mut chunk = vec![0u8; DECOMPRESS_CHUNK_BYTES.min(cap_bytes.saturating_add(1))];
    let mut avail_in = input.len();
    let mut in_off = 0;
    let mut total_out = 0;
    loop {
        let mut avail_out = chunk.len();
        let mut out_off = 0;
        let result = BrotliDecompressStream(
            &mut avail_in,
            &mut in_off,
            input,
            &mut avail_out,
            &mut out_off,
            &mut chunk,
            &mut total_out,
            &mut state,
        );
        if out.len() + out_off > cap_bytes {
            return Err(ContainerError::TooLarge);
        }
        reserve_capped(&mut out, out_off, cap_bytes);
        out.extend_from_slice(&chunk[..out_off]);
        match result {
            BrotliResult::ResultSuccess => {
                return if avail_in == 0 {
                    Ok(out)
                } else {
                    Err(ContainerError::Corrupt)
                };
            }
            BrotliResult::NeedsMoreOutput => continue,
            // All the input was given at once, so needing more means it was cut short.
            BrotliResult::NeedsMoreInput | BrotliResult::ResultFailure => {
                return Err(ContainerError::Corrupt)
            }
        }
    }
}

/// Decompresses a zlib body, failing with `TooLarge` past `cap_bytes`.
///
/// Truncated input and bytes after the end of the stream are `Corrupt`.
pub fn zlib_decompress(input: &[u8], cap_bytes: usize) -> Result<Vec<u8>, ContainerError> {
    use flate2::{Decompress, FlushDecompress, Status};
    let mut z = Decompress::new(true);
    let mut out = Vec::new();
    loop {
        // Never let the output grow past cap + 1: one byte over the cap is enough to know.
        let room = DECOMPRESS_CHUNK_BYTES.min(cap_bytes.saturating_add(1) - out.len());
        reserve_capped(&mut out, room, cap_bytes.saturating_add(1));
        let in_before = z.total_in();
        let out_before = out.len();
        let at = usize::try_from(in_before)
            .unwrap_or(usize::MAX)
            .min(input.len());
        let status = z
            .decompress_vec(&input[at..], &mut out, FlushDecompress::None)
            .map_err(|_| ContainerError::Corrupt)?;
        if out.len() > cap_bytes {
            return Err(ContainerError::TooLarge);
        }
        match status {
            Status::StreamEnd => {
                return if z.total_in() == input.len() as u64 {
                    Ok(out)
                } else {
                    Err(ContainerError::Corrupt)
                };
            }
            Status::Ok | Status::BufError => {
                // There was always output room, so no progress means the input ended mid-stream.
                if z.total_in() == in_before && out.len() == out_before {
                    return Err(ContainerError::Corrupt);
                }
            }
        }
    }
}

/// Splits a top-level packet into the packets a client sees: for `ver 2`/`ver 3`, the
/// decompressed inner packets (recursively, as clients do, to a depth of 2); for anything
/// else the packet itself. `cap_bytes` bounds total decompressed bytes.
pub fn unpack(
    ver: u16,
    op: u32,
    seq: u32,
    body: &[u8],
    cap_bytes: usize,
) -> Result<Vec<OwnedPacket>, ContainerError> {
    let mut out = Vec::new();
    let mut budget = cap_bytes;
    unpack_into(ver, op, seq, body, 1, &mut budget, &mut out)?;
    Ok(out)
}

/// `budget` is the decompressed bytes still allowed across the whole tree.
fn unpack_into(
    v: u16,
    o: u32,
    s: u32,
    body: &[u8],
    depth: u32,
    budget: &mut usize,
    out: &mut Vec<OwnedPacket>,
) -> Result<(), ContainerError> {
    let inner = match v {
        ver::ZLIB if depth <= UNPACK_DEPTH_MAX => zlib_decompress(body, *budget)?,
        ver::BROTLI if depth <= UNPACK_DEPTH_MAX => brotli_decompress(body, *budget)?,
        _ => {
            out.push(OwnedPacket {
                ver: v,
                op: o,
                seq: s,
                body: body.to_vec(),
            });
            return Ok(());
        }
    };
    *budget -= inner.len();
    let mut rest = &inner[..];
    while !rest.is_empty() {
        let (p, used) = packet::decode(rest, u32::MAX).map_err(|_| ContainerError::BadInner)?;
        unpack_into(p.ver, p.op, p.seq, p.body, depth + 1, budget, out)?;
        rest = &rest[used..];
    }
    Ok(())
}

/// Like [`unpack`] but only for containers: `NotContainer` for a `ver` other than 0, 2 or 3.
/// A `ver 0` body is itself a run of packets (what `encode_outer(Encoding::Plain, ..)` sends).
pub fn unpack_container(
    ver: u16,
    body: &[u8],
    cap_bytes: usize,
) -> Result<Vec<OwnedPacket>, ContainerError> {
    match ver {
        ver::PLAIN => {
            let mut out = Vec::new();
            let mut rest = body;
            while !rest.is_empty() {
                let (p, used) =
                    packet::decode(rest, u32::MAX).map_err(|_| ContainerError::BadInner)?;
                out.push(OwnedPacket {
                    ver: p.ver,
                    op: p.op,
                    seq: p.seq,
                    body: p.body.to_vec(),
                });
                rest = &rest[used..];
            }
            Ok(out)
        }
        ver::ZLIB | ver::BROTLI => unpack(ver, op::NOTIFICATION, 0, body, cap_bytes),
        _ => Err(ContainerError::NotContainer),
    }
}
