//! The ingest socket: persistent TCP, pipelined `proto::ingest` frames (Auth first, then
//! Push; one Status per request, in request order on this server). Also the accept path
//! ([`accept`]) that HTTP pushes share.
//!
//! Invariants:
//! - A push gets its `msg_id` only after it sits in its owning shard's queue; from then on the
//!   broker drops it nowhere (a queue refusal is answered `Overloaded`, before any id).
//! - A malformed frame, a Status from the caller, or no successful Auth within
//!   `ingest_auth_ms_max` closes that connection only.

use crate::batcher::Message;
use crate::policy::KeyId;
use crate::stop::Stop;
use crate::Shared;
use monoio::io::AsyncWriteRentExt;
use proto::id::{MsgId, Priority, Scope};
use proto::ingest::{IngestError, IngestFrame, Push, PushError};
use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Which path a push came in on (metrics label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Socket = 0,
    Http = 1,
}

/// The shard that owns a scope.
pub fn owner(scope: &Scope, shards: u16) -> u16 {
    match scope {
        Scope::Room(r) => proto::link::shard_of_room(*r, shards),
        Scope::Area(a) => proto::link::shard_of_area(*a, shards),
        Scope::Global | Scope::User(_) | Scope::Device(_) => 0,
    }
}

/// Checks a push against the policy and queues it on its owning shard. On success the
/// message is in the queue and will be batched.
pub(crate) fn accept(
    shared: &Shared,
    key: KeyId,
    scope: Scope,
    priority: Priority,
    body: Vec<u8>,
    via: Via,
) -> Result<MsgId, PushError> {
    let result = accept_inner(shared, key, scope, priority, body);
    match &result {
        Ok(_) => {
            shared.ingest_metrics.accepted[via as usize].fetch_add(1, Relaxed);
        }
        Err(e) => shared.ingest_metrics.reject(e),
    }
    result
}

fn accept_inner(
    shared: &Shared,
    key: KeyId,
    scope: Scope,
    priority: Priority,
    body: Vec<u8>,
) -> Result<MsgId, PushError> {
    {
        let mut policy = match shared.policy.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        policy.admit(key, &scope, &body, Instant::now())?;
    }
    let shard = owner(&scope, shared.shards) as usize;
    let Some(inbox) = shared.inboxes.get(shard) else {
        return Err(PushError::Overloaded);
    };
    let msg_id = MsgId(shared.next_msg_id.fetch_add(1, Relaxed));
    let tx = match priority {
        Priority::High => &inbox.high_tx,
        Priority::Low => &inbox.low_tx,
    };
    tx.try_send(Message {
        scope,
        priority,
        msg_id,
        body,
    })
    .map_err(|_| PushError::Overloaded)?;
    inbox.notify.notify();
    Ok(msg_id)
}

/// Authenticates an API key (counted as a rejection when unknown).
pub(crate) fn authenticate(shared: &Shared, api_key: &str) -> Result<KeyId, PushError> {
    let r = match shared.policy.lock() {
        Ok(g) => g.authenticate(api_key),
        Err(p) => p.into_inner().authenticate(api_key),
    };
    if let Err(e) = &r {
        shared.ingest_metrics.reject(e);
    }
    r
}

/// Accepts ingest connections on one shard until `stop`.
pub(crate) async fn serve(listener: std::net::TcpListener, shared: Arc<Shared>, stop: Stop) {
    let listener = match monoio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "ingest listener unusable");
            return;
        }
    };
    let open = Rc::new(Cell::new(0usize));
    loop {
        let accepted = monoio::select! {
            r = listener.accept() => r,
            _ = stop.wait() => return,
        };
        let (stream, _peer) = match accepted {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "ingest accept failed");
                monoio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if open.get() >= shared.config.ingest_connections_max {
            shared
                .ingest_metrics
                .connections_refused
                .fetch_add(1, Relaxed);
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        open.set(open.get() + 1);
        shared.ingest_metrics.connections.fetch_add(1, Relaxed);
        let (shared, stop, open) = (shared.clone(), stop.clone(), open.clone());
        monoio::spawn(async move {
            monoio::select! {
                _ = connection(stream, &shared) => {},
                _ = stop.wait() => {},
            }
            open.set(open.get() - 1);
            shared.ingest_metrics.connections.fetch_sub(1, Relaxed);
        });
    }
}

/// Read buffer growth step; frames larger than this grow the buffer up to the frame limit.
const READ_CHUNK_BYTES: usize = 16 * 1024;

async fn connection(stream: monoio::net::TcpStream, shared: &Shared) {
    use net::framed::{FramedRead, ReadError};
    let frame_max = shared.config.ingest_frame_bytes_max;
    let auth_deadline = Instant::now() + Duration::from_millis(shared.config.ingest_auth_ms_max);
    let mut key: Option<KeyId> = None;
    let decoder = move |buf: &mut bytes::BytesMut| match proto::ingest::decode(buf, frame_max) {
        Ok((frame, used)) => {
            bytes::Buf::advance(buf, used);
            Ok(Some(frame))
        }
        Err(IngestError::Incomplete) => Ok(None),
        Err(e) => Err(e),
    };
    let mut frames = FramedRead::new(stream, decoder, READ_CHUNK_BYTES);
    let mut out: Vec<u8> = Vec::with_capacity(4096);
    loop {
        // Until authenticated, the read is stopped (cancelled, not dropped) at the deadline.
        let authed = key.is_some();
        let stop = async move {
            if authed {
                std::future::pending::<()>().await
            } else {
                monoio::time::sleep(auth_deadline.saturating_duration_since(Instant::now())).await
            }
        };
        let mut pending = Some(frames.next(stop).await);
        loop {
            let next = match pending.take() {
                Some(r) => r,
                None => match frames.try_next() {
                    Ok(Some(f)) => Ok(f),
                    Ok(None) => break,
                    Err(e) => Err(e),
                },
            };
            match next {
                Ok(frame) => {
                    let status = match frame {
                        IngestFrame::Auth { req_id, api_key } => {
                            let r = authenticate(shared, &api_key);
                            key = r.as_ref().ok().copied().or(key);
                            IngestFrame::Status {
                                req_id,
                                result: r.map(|_| MsgId(0)),
                            }
                        }
                        IngestFrame::Push(Push {
                            req_id,
                            scope,
                            priority,
                            reach: _,
                            ttl_ms: _,
                            body,
                        }) => {
                            let result = match key {
                                Some(k) => accept(shared, k, scope, priority, body, Via::Socket),
                                None => {
                                    shared.ingest_metrics.reject(&PushError::Unauthorized);
                                    Err(PushError::Unauthorized)
                                }
                            };
                            IngestFrame::Status { req_id, result }
                        }
                        IngestFrame::Status { .. } => {
                            shared.ingest_metrics.protocol_errors.fetch_add(1, Relaxed);
                            return;
                        }
                    };
                    proto::ingest::encode(&status, &mut out);
                }
                Err(ReadError::Closed | ReadError::Io(_)) => return,
                Err(ReadError::Stopped) => {
                    // No AUTH within ingest_auth_ms_max.
                    shared.ingest_metrics.protocol_errors.fetch_add(1, Relaxed);
                    return;
                }
                Err(ReadError::Frame(_)) => {
                    shared.ingest_metrics.protocol_errors.fetch_add(1, Relaxed);
                    // Answer what was already decoded, then close.
                    let _ = frames.get_mut().write_all(std::mem::take(&mut out)).await;
                    return;
                }
            }
        }
        if !out.is_empty() {
            let (res, o) = frames.get_mut().write_all(std::mem::take(&mut out)).await;
            if res.is_err() {
                return;
            }
            out = o;
            out.clear();
        }
    }
}
