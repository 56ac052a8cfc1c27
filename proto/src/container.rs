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

/// Inputs at or above this size are compressed without the thread's cached hasher: from
/// 1 MiB up the encoder picks bigger or different hash tables by size, which the cache key
/// does not capture, and at that size the per-call set-up no longer matters.
const BROTLI_HASHER_CACHE_INPUT_BYTES_MAX: usize = 1 << 20;

/// Brotli encoder choices beyond [`BrotliParams`], for the tuning benchmark
/// (`proto/tests/container_tuning.rs`). Every choice still produces a standard brotli stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BrotliTuning {
    /// Search brotli's built-in static dictionary (the format's own, not a custom one).
    pub use_dictionary: bool,
    /// Skip literal context modeling (quality 5 and up decide it per meta-block otherwise).
    pub disable_literal_context_modeling: bool,
    /// Tell the encoder the input is UTF-8 text rather than generic bytes.
    pub mode_text: bool,
    /// Replace the encoder's own hasher choice by brotli's H5 (H6 for `hash_len` above 4) of
    /// these sizes (qualities 2..=9 only). Measured: no setting beat the encoder's own pick;
    /// each one traded size for speed along the same line as quality does.
    pub hasher: Option<BrotliHasherSize>,
}

/// Sizes of a brotli H5/H6 hasher (a hash table of `2^bucket_bits` buckets, each keeping the last
/// `2^block_bits` positions). The encoder's own pick at qualities 5 and 6 is 14 and 4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BrotliHasherSize {
    pub bucket_bits: u32,
    pub block_bits: u32,
    /// Recent distances tried before the hash table (the encoder uses 4 below quality 7).
    pub last_distances: u32,
    /// Bytes hashed per position: 4 is brotli's H5, 5..=8 its H6.
    pub hash_len: u32,
}

impl Default for BrotliTuning {
    fn default() -> Self {
        BrotliTuning {
            use_dictionary: true,
            disable_literal_context_modeling: false,
            mode_text: false,
            hasher: None,
        }
    }
}

/// A brotli hasher kept between calls on one thread, with the settings it was built for.
struct CachedHasher {
    key: (i32, i32, Option<BrotliHasherSize>),
    hasher: brotli::enc::UnionHasher<brotli::enc::StandardAlloc>,
}

thread_local! {
    /// The last hasher this thread's `brotli_compress` used. Its hash table (1 MiB at quality
    /// 5) was the largest per-call allocation, zero-filled on every call; reused, only its
    /// 32 KiB head index is cleared (the encoder's own `Prepare`, as the C library does for a
    /// hasher it did not just allocate). A thread keeps at most one, so it holds what a single
    /// call allocates anyway (1 MiB at quality 5, 32 MiB at quality 9).
    static BROTLI_HASHER: std::cell::RefCell<Option<CachedHasher>> =
        const { std::cell::RefCell::new(None) };
}

/// Whether the encoder's `Prepare` fully resets this hasher for a new stream (so reusing it
/// gives the same output as a fresh one). The quality 10/11 binary-tree hasher relies on a
/// zeroed allocation instead, so it is never reused.
fn hasher_resets_itself<A>(h: &brotli::enc::UnionHasher<A>) -> bool
where
    A: brotli::enc::Allocator<u16> + brotli::enc::Allocator<u32>,
{
    use brotli::enc::UnionHasher as U;
    matches!(
        h,
        U::H2(_)
            | U::H3(_)
            | U::H4(_)
            | U::H54(_)
            | U::H5(_)
            | U::H5q5(_)
            | U::H5q7(_)
            | U::H6(_)
            | U::H9(_)
    )
}

/// A fresh H5 (or, for `hash_len` above 4, H6) hasher of the given size, unprepared (the
/// encoder clears it before use).
fn make_h5(
    m: &mut brotli::enc::StandardAlloc,
    size: BrotliHasherSize,
) -> (
    brotli::enc::backward_references::BrotliHasherParams,
    brotli::enc::UnionHasher<brotli::enc::StandardAlloc>,
) {
    use brotli::enc::backward_references::{
        AdvHasher, BrotliHasherParams, H5Sub, H6Sub, H9Opts, Struct1,
    };
    use brotli::enc::Allocator;
    let bucket_bits = size.bucket_bits.clamp(8, 16);
    let block_bits = size.block_bits.clamp(0, 8);
    let hash_len = size.hash_len.clamp(4, 8);
    let params = BrotliHasherParams {
        type_: if hash_len == 4 { 5 } else { 6 },
        bucket_bits: bucket_bits as i32,
        block_bits: block_bits as i32,
        hash_len: hash_len as i32,
        num_last_distances_to_check: size.last_distances.clamp(4, 16) as i32,
        literal_byte_score: 0,
    };
    let common = Struct1 {
        params,
        is_prepared_: 0,
        dict_num_lookups: 0,
        dict_num_matches: 0,
    };
    let num = <brotli::enc::StandardAlloc as Allocator<u16>>::alloc_cell(m, 1 << bucket_bits);
    let buckets = <brotli::enc::StandardAlloc as Allocator<u32>>::alloc_cell(
        m,
        1 << (bucket_bits + block_bits),
    );
    let hasher = if hash_len == 4 {
        brotli::enc::UnionHasher::H5(AdvHasher {
            GetHasherCommon: common,
            specialization: H5Sub {
                hash_shift_: 32 - bucket_bits as i32,
                bucket_size_: 1 << bucket_bits,
                block_mask_: (1 << block_bits) - 1,
                block_bits_: block_bits as i32,
            },
            num,
            buckets,
            h9_opts: H9Opts::new(&params),
        })
    } else {
        brotli::enc::UnionHasher::H6(AdvHasher {
            GetHasherCommon: common,
            specialization: H6Sub {
                hash_mask: u64::MAX >> (64 - 8 * hash_len),
                hash_shift_: 64 - bucket_bits as i32,
                bucket_size_: 1 << bucket_bits,
                block_mask_: (1 << block_bits) - 1,
                block_bits_: block_bits as i32,
            },
            num,
            buckets,
            h9_opts: H9Opts::new(&params),
        })
    };
    (params, hasher)
}

/// Compresses with brotli (exposed for the compression bench).
///
/// The whole input goes to the encoder in one `FINISH` call (one meta-block for batches
/// below the block size), and the hash table is reused from the previous call on this thread
/// when the settings match. The output is a standard brotli stream.
pub fn brotli_compress(input: &[u8], params: BrotliParams) -> Vec<u8> {
    brotli_compress_tuned(input, params, BrotliTuning::default())
}

/// [`brotli_compress`] with encoder choices beyond quality and window.
pub fn brotli_compress_tuned(input: &[u8], params: BrotliParams, tuning: BrotliTuning) -> Vec<u8> {
    use brotli::enc::backward_references::{AnyHasher, BrotliEncoderMode};
    use brotli::enc::encode::{
        BrotliEncoderDestroyInstance, BrotliEncoderOperation, BrotliEncoderStateStruct,
    };
    use brotli::enc::StandardAlloc;

    let quality = params.quality.min(BROTLI_QUALITY_MAX) as i32;
    let lgwin = effective_lgwin(input.len(), params) as i32;
    // A custom hasher only for the qualities that use the hash-table path (not quality 0/1's
    // fragment compressor nor 10/11's binary tree).
    let custom = tuning.hasher.filter(|_| (2..=9).contains(&quality));
    let key = (quality, lgwin, custom);
    let mut s = BrotliEncoderStateStruct::new(StandardAlloc::default());
    s.params = brotli::enc::BrotliEncoderParams {
        quality,
        lgwin,
        size_hint: input.len(),
        use_dictionary: tuning.use_dictionary,
        disable_literal_context_modeling: i32::from(tuning.disable_literal_context_modeling),
        mode: if tuning.mode_text {
            BrotliEncoderMode::BROTLI_MODE_TEXT
        } else {
            BrotliEncoderMode::BROTLI_MODE_GENERIC
        },
        ..Default::default()
    };
    let cacheable = input.len() < BROTLI_HASHER_CACHE_INPUT_BYTES_MAX;
    if cacheable {
        let cached = BROTLI_HASHER.with(|c| c.borrow_mut().take());
        if let Some(mut c) = cached {
            if c.key == key {
                // Not prepared: the encoder's set-up clears the head index for this input.
                c.hasher.GetHasherCommon().is_prepared_ = 0;
                s.params.hasher = c.hasher.GetHasherCommon().params;
                s.hasher_ = c.hasher;
            } else {
                c.hasher.free(&mut s.m8);
            }
        }
    }
    if let (Some(size), brotli::enc::UnionHasher::Uninit) = (custom, &s.hasher_) {
        let (hp, h) = make_h5(&mut s.m8, size);
        s.params.hasher = hp;
        s.hasher_ = h;
    }

    let mut out = vec![0u8; brotli::enc::BrotliEncoderMaxCompressedSize(input.len()).max(64)];
    let mut avail_in = input.len();
    let mut in_off = 0;
    let mut out_off = 0;
    let mut total_out = Some(0);
    let mut no_callback = |_: &mut brotli::enc::interface::PredictionModeContextMap<
        brotli::enc::InputReferenceMut,
    >,
                           _: &mut [brotli::enc::StaticCommand],
                           _: brotli::enc::InputPair,
                           _: &mut StandardAlloc| ();
    loop {
        let mut avail_out = out.len() - out_off;
        let ok = s.compress_stream(
            BrotliEncoderOperation::BROTLI_OPERATION_FINISH,
            &mut avail_in,
            input,
            &mut in_off,
            &mut avail_out,
            &mut out,
            &mut out_off,
            &mut total_out,
            &mut no_callback,
        );
        if s.is_finished() {
            break;
        }
        if !ok {
            // Not reachable with valid parameters; fall back to the library's own driver.
            BrotliEncoderDestroyInstance(&mut s);
            return brotli_compress_plain(input, quality, lgwin);
        }
        // The bound above fits any input, but should the encoder still want room, give it.
        let grow = out.len().max(64);
        out.resize(out.len() + grow, 0);
    }
    out.truncate(out_off);

    if cacheable && hasher_resets_itself(&s.hasher_) {
        let hasher = std::mem::take(&mut s.hasher_);
        BROTLI_HASHER.with(|c| *c.borrow_mut() = Some(CachedHasher { key, hasher }));
    }
    BrotliEncoderDestroyInstance(&mut s);
    out
}

/// The library's streaming driver with default choices; the fallback of [`brotli_compress_tuned`].
fn brotli_compress_plain(input: &[u8], quality: i32, lgwin: i32) -> Vec<u8> {
    let enc = brotli::enc::BrotliEncoderParams {
        quality,
        lgwin,
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
