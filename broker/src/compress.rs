//! Turns a flushed batch into the client bytes, once per encoding some edge asked for.
//!
//! Inner packets are `ver 0, op 5, seq 0`, one per message, body verbatim. The outer packet
//! (`proto::container::encode_outer`) carries the stream seq in its header: low priority the
//! room seq, high priority `0x8000_0000 | seq` (both modulo 2^31, so the two never collide).
//!
//! Invariants: the inner run is built once per batch into a reused buffer; brotli's window is
//! the smallest that holds the whole run (capped by the configured `lgwin`), because a larger
//! window costs allocation and time without improving a few-KB input.

use crate::batcher::Flush;
use bytes::Bytes;
use proto::container::{fit_lgwin, BrotliParams};
use proto::id::{Encoding, Priority};

/// The encoded forms of one batch (`None` for an encoding nobody asked for).
#[derive(Clone, Debug, Default)]
pub struct Encoded {
    pub brotli: Option<Bytes>,
    pub zlib: Option<Bytes>,
    pub plain: Option<Bytes>,
    /// Length of the uncompressed inner run.
    pub inner_bytes: usize,
}

impl Encoded {
    pub fn get(&self, encoding: Encoding) -> Option<&Bytes> {
        match encoding {
            Encoding::Brotli => self.brotli.as_ref(),
            Encoding::Zlib => self.zlib.as_ref(),
            Encoding::Plain => self.plain.as_ref(),
        }
    }
}

/// The header `seq` of a batch's outer packet.
pub fn outer_seq(priority: Priority, seq: u64) -> u32 {
    let s = (seq & 0x7FFF_FFFF) as u32;
    match priority {
        Priority::Low => s,
        Priority::High => 0x8000_0000 | s,
    }
}

/// Brotli settings of a [`Compressor`].
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Quality for batches of at least `small_bytes_max` inner bytes.
    pub quality: u32,
    /// Quality below that size, where the encoder's fixed set-up cost dominates.
    pub quality_small: u32,
    pub small_bytes_max: usize,
    /// Largest window (log2); each batch uses the smallest that holds it.
    pub lgwin_max: u32,
}

impl Settings {
    /// One quality for every batch size.
    pub fn uniform(quality: u32, lgwin_max: u32) -> Settings {
        Settings {
            quality,
            quality_small: quality,
            small_bytes_max: 0,
            lgwin_max,
        }
    }

    /// The brotli parameters for an inner run of `len` bytes.
    pub fn params(&self, len: usize) -> BrotliParams {
        let quality = if len < self.small_bytes_max {
            self.quality_small
        } else {
            self.quality
        };
        BrotliParams {
            quality,
            lgwin: fit_lgwin(len, self.lgwin_max),
        }
    }
}

/// Encodes batches; owns the reused inner buffer.
pub struct Compressor {
    settings: Settings,
    inner: Vec<u8>,
    /// How long the last [`Compressor::encode`] spent in brotli, µs (`None`: not asked for).
    pub last_brotli_us: Option<u64>,
}

impl Compressor {
    pub fn new(settings: Settings) -> Compressor {
        Compressor {
            settings,
            inner: Vec::with_capacity(32 * 1024),
            last_brotli_us: None,
        }
    }

    /// Encodes `flush` in each encoding of `encodings` (a set of [`Encoding::bit`]).
    pub fn encode(&mut self, flush: &Flush, encodings: u8) -> Encoded {
        self.inner.clear();
        for body in &flush.bodies {
            proto::packet::encode(
                proto::packet::ver::PLAIN,
                proto::packet::op::NOTIFICATION,
                0,
                body,
                &mut self.inner,
            );
        }
        let seq = outer_seq(flush.priority, flush.seq);
        let params = self.settings.params(self.inner.len());
        let make = |e: Encoding| {
            (encodings & e.bit() != 0)
                .then(|| Bytes::from(proto::container::encode_outer(e, &self.inner, seq, params)))
        };
        let started = std::time::Instant::now();
        let brotli = make(Encoding::Brotli);
        self.last_brotli_us = brotli
            .is_some()
            .then(|| started.elapsed().as_micros().min(u128::from(u64::MAX)) as u64);
        Encoded {
            brotli,
            zlib: make(Encoding::Zlib),
            plain: make(Encoding::Plain),
            inner_bytes: self.inner.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::id::{MsgId, RoomId, Scope};

    #[test]
    fn small_batches_use_the_small_quality() {
        let s = Settings {
            quality: 5,
            quality_small: 2,
            small_bytes_max: 2048,
            lgwin_max: 15,
        };
        assert_eq!(s.params(600).quality, 2);
        assert_eq!(s.params(2048).quality, 5);
        assert_eq!(Settings::uniform(4, 15).params(1).quality, 4);
    }

    #[test]
    fn seq_marks_priority() {
        assert_eq!(outer_seq(Priority::Low, 7), 7);
        assert_eq!(outer_seq(Priority::High, 7), 0x8000_0007);
        assert_eq!(outer_seq(Priority::Low, 0x8000_0001), 1);
    }

    #[test]
    fn every_encoding_unpacks_to_the_messages() {
        let bodies: Vec<Vec<u8>> = (0..5)
            .map(|i| format!("{{\"cmd\":\"DANMU_MSG\",\"i\":{i}}}").into_bytes())
            .collect();
        let flush = Flush {
            scope: Scope::Room(RoomId(1)),
            priority: Priority::High,
            seq: 3,
            msg_ids: (1..=5).map(MsgId).collect(),
            bodies: bodies.clone(),
            oldest: None,
        };
        let mut c = Compressor::new(Settings {
            quality: 5,
            quality_small: 2,
            small_bytes_max: 100,
            lgwin_max: 15,
        });
        let enc = c.encode(
            &flush,
            Encoding::Brotli.bit() | Encoding::Zlib.bit() | Encoding::Plain.bit(),
        );
        for e in [Encoding::Brotli, Encoding::Zlib, Encoding::Plain] {
            let bytes = enc.get(e).unwrap();
            let mut got = Vec::new();
            let mut at = 0;
            while at < bytes.len() {
                let (p, used) = proto::packet::decode(&bytes[at..], u32::MAX).unwrap();
                assert_eq!(p.seq, 0x8000_0003, "{e:?}");
                assert_eq!(p.op, 5);
                got.extend(proto::container::unpack(p.ver, p.op, p.seq, p.body, 1 << 20).unwrap());
                at += used;
            }
            assert_eq!(
                got.iter().map(|p| p.body.clone()).collect::<Vec<_>>(),
                bodies,
                "{e:?}"
            );
        }
        let only = c.encode(&flush, Encoding::Brotli.bit());
        assert!(only.brotli.is_some() && only.zlib.is_none() && only.plain.is_none());
    }
}
