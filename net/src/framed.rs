//! One framed reader: "read into the spare capacity of a buffer, then decode whole frames from
//! its front", for every length-prefixed stream we read (edge link, broker link, broker
//! ingest).
//!
//! A read in flight is never dropped to stop it: [`FramedRead::next`] takes a `stop` future,
//! and when that resolves first the read is cancelled with a monoio `Canceller` and then
//! awaited to completion, so bytes the kernel already delivered land in the buffer instead of
//! being lost (monoio's io-cancel notes: dropping an in-flight op can lose its data).
//!
//! Invariants:
//! - Bytes are appended after what is buffered (monoio fills an owned buffer from its start,
//!   so the read goes into `slice_mut(len..)`), and a decoder consumes only whole frames.
//! - The buffer grows by at least `chunk_bytes` when less than half a chunk is free; how large
//!   a frame may be is the decoder's limit (every proto decoder checks its `*_bytes_max`
//!   before it asks for more).
//! - Frames are split off the buffer's front (`BytesMut::split_to`), so a decoder can hand out
//!   `Bytes` that share the read buffer: no copy per frame.

use bytes::BytesMut;
use monoio::buf::{IoBufMut, SliceMut};
use monoio::io::{CancelableAsyncReadRent, Canceller};
use std::future::Future;
use std::pin::pin;
use std::task::Poll;

/// Decodes frames from the front of a buffer.
pub trait Decoder {
    type Frame;
    type Error;
    /// One whole frame split off the front of `buf`, `Ok(None)` when more bytes are needed,
    /// `Err` when the bytes are not a valid frame (the stream is then unusable).
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Self::Frame>, Self::Error>;
}

impl<F, T, E> Decoder for F
where
    F: FnMut(&mut BytesMut) -> Result<Option<T>, E>,
{
    type Frame = T;
    type Error = E;
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<T>, E> {
        self(buf)
    }
}

/// The decoder of broker-edge link frames (`proto::link`), shared by both ends: a batch's
/// packet is split off the read buffer, not copied.
pub fn link_decoder(
    frame_bytes_max: u32,
) -> impl FnMut(&mut BytesMut) -> Result<Option<proto::link::LinkFrame>, proto::link::LinkError> {
    use proto::link::{self, LinkError};
    move |buf: &mut BytesMut| match link::frame_len(buf, frame_bytes_max) {
        Ok(n) if buf.len() >= n => {
            let bytes = buf.split_to(n).freeze();
            link::decode(&bytes, frame_bytes_max).map(|(f, _)| Some(f))
        }
        Ok(n) => {
            // Room for the whole frame in one go.
            buf.reserve(n - buf.len());
            Ok(None)
        }
        Err(LinkError::Incomplete) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Why no frame came.
#[derive(Debug, thiserror::Error)]
pub enum ReadError<E> {
    /// The peer closed the stream (a partial frame left in the buffer is discarded).
    #[error("peer closed")]
    Closed,
    /// `stop` resolved; the read in flight was cancelled and whatever it had read is kept.
    #[error("stopped")]
    Stopped,
    /// The socket failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The decoder refused the bytes.
    #[error("bad frame")]
    Frame(E),
}

/// A reader of frames from `R` with decoder `D`.
pub struct FramedRead<R, D> {
    rd: R,
    dec: D,
    buf: BytesMut,
    chunk_bytes: usize,
}

impl<R: CancelableAsyncReadRent, D: Decoder> FramedRead<R, D> {
    /// A reader that grows its buffer in steps of `chunk_bytes`.
    pub fn new(rd: R, dec: D, chunk_bytes: usize) -> Self {
        let chunk_bytes = chunk_bytes.max(64);
        FramedRead {
            rd,
            dec,
            buf: BytesMut::with_capacity(chunk_bytes),
            chunk_bytes,
        }
    }

    /// The reader (e.g. to write answers on the same stream).
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.rd
    }

    /// Bytes buffered and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next frame already buffered, without reading.
    pub fn try_next(&mut self) -> Result<Option<D::Frame>, ReadError<D::Error>> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        self.dec.decode(&mut self.buf).map_err(ReadError::Frame)
    }

    /// The next frame, reading as needed, unless `stop` resolves first.
    pub async fn next(
        &mut self,
        stop: impl Future<Output = ()>,
    ) -> Result<D::Frame, ReadError<D::Error>> {
        let mut stop = pin!(stop);
        loop {
            if let Some(f) = self.try_next()? {
                return Ok(f);
            }
            if self.buf.capacity() - self.buf.len() < self.chunk_bytes / 2 {
                self.buf.reserve(self.chunk_bytes);
            }
            let len = self.buf.len();
            let buf: SliceMut<BytesMut> = std::mem::take(&mut self.buf).slice_mut(len..);
            let canceller = Canceller::new();
            let mut read = pin!(self.rd.cancelable_read(buf, canceller.handle()));
            let first = std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = read.as_mut().poll(cx) {
                    return Poll::Ready(Some(r));
                }
                if stop.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(None);
                }
                Poll::Pending
            })
            .await;
            let (res, stopped) = match first {
                Some(r) => (r, false),
                None => {
                    // Cancel, then wait for the op to finish: it may have read bytes already.
                    let _ = canceller.cancel();
                    (read.await, true)
                }
            };
            let (res, b) = res;
            self.buf = b.into_inner();
            match res {
                Ok(0) if !stopped => return Err(ReadError::Closed),
                Ok(_) if !stopped => {}
                Ok(_) => return Err(ReadError::Stopped),
                Err(_) if stopped => return Err(ReadError::Stopped),
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Buf;
    use monoio::io::AsyncWriteRentExt;
    use monoio::net::{TcpListener, TcpStream};
    use std::time::Duration;

    /// Frames are a u8 length then that many bytes; length 0 is invalid.
    fn dec(buf: &mut BytesMut) -> Result<Option<Vec<u8>>, &'static str> {
        let Some(&n) = buf.first() else {
            return Ok(None);
        };
        if n == 0 {
            return Err("zero length");
        }
        if buf.len() < 1 + n as usize {
            return Ok(None);
        }
        buf.advance(1);
        Ok(Some(buf.split_to(n as usize).to_vec()))
    }

    fn drivers() -> Vec<crate::runtime::Driver> {
        let mut d = vec![crate::runtime::Driver::Legacy];
        if monoio::utils::detect_uring() {
            d.push(crate::runtime::Driver::Uring);
        }
        d
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let c = TcpStream::connect(addr).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    #[test]
    fn frames_split_across_reads_and_several_per_read() {
        for d in drivers() {
            crate::runtime::block_on(d, async {
                let (mut c, s) = pair().await;
                let mut f = FramedRead::new(s, dec, 64);
                let (r, _) = c.write_all(vec![3, b'a', b'b']).await;
                r.unwrap();
                monoio::time::sleep(Duration::from_millis(20)).await;
                let (r, _) = c.write_all(vec![b'c', 1, b'x', 2, b'y', b'z']).await;
                r.unwrap();
                let never = std::future::pending::<()>;
                assert_eq!(f.next(never()).await.unwrap(), b"abc");
                assert_eq!(f.next(never()).await.unwrap(), b"x");
                assert_eq!(f.next(never()).await.unwrap(), b"yz");
                drop(c);
                assert!(matches!(f.next(never()).await, Err(ReadError::Closed)));
            });
        }
    }

    #[test]
    fn large_frame_grows_the_buffer() {
        for d in drivers() {
            crate::runtime::block_on(d, async {
                let (mut c, s) = pair().await;
                let mut f = FramedRead::new(s, dec, 64);
                let mut bytes = vec![200u8];
                bytes.extend(std::iter::repeat_n(9u8, 200));
                let (r, _) = c.write_all(bytes).await;
                r.unwrap();
                let got = f.next(std::future::pending()).await.unwrap();
                assert_eq!(got.len(), 200);
            });
        }
    }

    #[test]
    fn bad_frame_is_an_error() {
        for d in drivers() {
            crate::runtime::block_on(d, async {
                let (mut c, s) = pair().await;
                let mut f = FramedRead::new(s, dec, 64);
                let (r, _) = c.write_all(vec![0u8, 1, 2]).await;
                r.unwrap();
                assert!(matches!(
                    f.next(std::future::pending()).await,
                    Err(ReadError::Frame("zero length"))
                ));
            });
        }
    }

    /// Stopping cancels the read instead of dropping it, and the reader stays usable: bytes
    /// sent after the stop are read by the next call.
    #[test]
    fn stop_cancels_the_read_and_keeps_the_stream() {
        for d in drivers() {
            crate::runtime::block_on(d, async {
                let (mut c, s) = pair().await;
                let mut f = FramedRead::new(s, dec, 64);
                let (r, _) = c.write_all(vec![2, b'p']).await;
                r.unwrap();
                let stop = monoio::time::sleep(Duration::from_millis(30));
                assert!(matches!(f.next(stop).await, Err(ReadError::Stopped)));
                assert_eq!(
                    f.buffered(),
                    2,
                    "the partial frame read before the stop is kept"
                );
                let (r, _) = c.write_all(vec![b'q']).await;
                r.unwrap();
                assert_eq!(f.next(std::future::pending()).await.unwrap(), b"pq");
            });
        }
    }
}
