//! Presence event streams (issue 10): the consumer side of a [`Follower`], served as
//! Server-Sent Events (`GET /v1/presence/events` with `Accept: text/event-stream`) and on the
//! ingest socket (`SUBSCRIBE`, see [`crate::ingest`]).
//!
//! # Invariants
//! - **No gap while the log holds it.** A stream opens at a seq (`Last-Event-ID`, `?after=`, or
//!   the newest event) under the roster's lock and then reads the log from there in pages, so
//!   every event after it that matches the filter is delivered once, in seq order. When the
//!   events after it were already evicted (or the seq is from before a broker restart), the
//!   stream says so first (a `missed` item: the events after `after` and before `oldest` are
//!   gone) and continues from the oldest event held.
//! - **Bounded per consumer.** A stream holds one page and one position in the shared log; the
//!   roster cuts (and counts) a stream whose consumer made no progress between two new-event
//!   notifications while more than `presence_stream_lag_events_max` events behind, not
//!   counting the backlog it asked for. A cut SSE connection is closed at once, even while its socket is full.
//! - **Alive.** An idle SSE stream writes a comment every [`SSE_KEEPALIVE_MS`], so proxies and
//!   the HTTP server's idle deadline leave it open and a dead consumer is found by TCP.

use crate::presence::{Event, Filter};
use crate::roster::{self, FollowError, Follower};
use crate::Shared;
use net::http::{Request, Response, Streamed};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// Events one read of the log takes (one SSE chunk, one burst of ingest frames).
pub const PAGE_EVENTS: usize = 256;
/// An SSE stream with nothing to say writes a comment this often.
pub const SSE_KEEPALIVE_MS: u64 = 15_000;
/// The reconnection delay an SSE client is told (`retry:`), ms.
pub const SSE_RETRY_MS: u64 = 1_000;

/// One thing a stream delivers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// Events after `after` and before `oldest` were evicted (or came from before a broker
    /// restart): the stream continues from `oldest`; re-read the rooms' state.
    Missed {
        after: u64,
        oldest: u64,
    },
    Event(Event),
}

impl Item {
    /// The JSON object the business reads (SSE `data:`, ingest `PRESENCE_EVENT`).
    pub fn json(&self) -> serde_json::Value {
        match self {
            Item::Event(e) => roster::event_json(e),
            Item::Missed { after, oldest } => {
                serde_json::json!({"type": "missed", "after": after, "oldest": oldest})
            }
        }
    }
}

/// The roster cut this stream: its consumer fell too far behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cut;

/// An open stream. Dropping it closes it.
pub struct Feed {
    shared: Arc<Shared>,
    follower: Arc<Follower>,
    filter: Filter,
    /// The last seq taken or skipped.
    after: u64,
}

impl Feed {
    /// Opens a stream after `after` (`None`: from the newest event on).
    pub(crate) fn open(
        shared: &Arc<Shared>,
        after: Option<u64>,
        filter: Filter,
    ) -> Result<Feed, FollowError> {
        let (follower, after) = shared.roster.follow(after)?;
        Ok(Feed {
            shared: shared.clone(),
            follower,
            filter,
            after,
        })
    }

    /// Up to `limit` events after the stream's position (fewer, or none, when it is caught
    /// up), preceded by a `Missed` when events were lost; `Err(Cut)` once the roster cut it.
    pub fn take(&mut self, limit: usize) -> Result<Vec<Item>, Cut> {
        if self.follower.cut.load(Relaxed) {
            return Err(Cut);
        }
        let (page, oldest) = self.shared.roster.read(self.after, &self.filter, limit);
        let mut items = Vec::with_capacity(page.events.len() + usize::from(page.missed));
        if page.missed {
            items.push(Item::Missed {
                after: self.after,
                oldest,
            });
        }
        items.extend(page.events.into_iter().map(Item::Event));
        self.after = page.next_after;
        self.follower.cursor.store(page.next_after, Relaxed);
        Ok(items)
    }

    /// Woken when there may be something to take (new events, or the cut).
    pub fn wake(&self) -> Arc<net::wake::Notify> {
        self.follower.wake.clone()
    }

    /// Resolves once the roster cut this stream.
    pub fn cut(&self) -> impl Future<Output = ()> + 'static {
        let f = self.follower.clone();
        async move {
            while !f.cut.load(Relaxed) {
                f.cut_signal.notified().await;
            }
        }
    }

    /// The seq the stream has read up to.
    pub fn position(&self) -> u64 {
        self.after
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.shared.roster.unfollow(&self.follower);
    }
}

/// Whether `req` asks for the event stream (rather than one JSON page of it).
fn wants_sse(req: &Request) -> bool {
    req.method == "GET"
        && req.path.trim_end_matches('/') == "/v1/presence/events"
        && req
            .header("accept")
            .is_some_and(|a| a.contains("text/event-stream"))
}

/// The broker's [`net::http::StreamRoute`]: SSE for `GET /v1/presence/events` with
/// `Accept: text/event-stream`, every other request to the ordinary handler.
pub(crate) fn sse_route(shared: &Arc<Shared>, req: &Request) -> Option<Result<Streamed, Response>> {
    if !wants_sse(req) {
        return None;
    }
    let r = open_sse(shared, req);
    shared.roster.count_query(r.is_ok());
    Some(r)
}

fn open_sse(shared: &Arc<Shared>, req: &Request) -> Result<Streamed, Response> {
    roster::check_key(shared, req)?;
    let after = roster::parse_after(req)?;
    let filter = roster::parse_filter(req)?;
    let feed = Feed::open(shared, after, filter).map_err(|FollowError::Full| {
        Response::retry_after(
            503,
            "overloaded",
            "presence_streams_max event streams are open; retry later",
            net::http::RETRY_AFTER_S,
        )
    })?;
    let cut = Box::pin(feed.cut());
    let hello = format!(
        "retry: {SSE_RETRY_MS}\n: presence events after seq {}\n\n",
        feed.position()
    );
    Ok(Streamed {
        status: 200,
        headers: vec![
            ("content-type".into(), "text/event-stream".into()),
            ("cache-control".into(), "no-cache".into()),
            ("x-accel-buffering".into(), "no".into()),
        ],
        chunks: Box::new(Sse {
            wait: Box::pin(wait(feed.wake())),
            feed,
            hello: Some(hello.into_bytes()),
            keepalive: Box::pin(monoio::time::sleep(keepalive())),
        }),
        cut,
    })
}

fn keepalive() -> Duration {
    Duration::from_millis(SSE_KEEPALIVE_MS)
}

async fn wait(n: Arc<net::wake::Notify>) {
    n.notified().await
}

/// The SSE body of one stream.
struct Sse {
    feed: Feed,
    hello: Option<Vec<u8>>,
    wait: Pin<Box<dyn Future<Output = ()>>>,
    keepalive: Pin<Box<monoio::time::Sleep>>,
}

/// Appends one SSE message for `item`.
pub fn sse_message(item: &Item, out: &mut Vec<u8>) {
    use std::io::Write;
    let json = item.json();
    // serde_json escapes newlines inside strings, so `data:` is one line.
    let _ = match item {
        Item::Event(e) => write!(out, "id: {}\ndata: {json}\n\n", e.seq),
        Item::Missed { oldest, .. } => write!(
            out,
            "event: missed\nid: {}\ndata: {json}\n\n",
            oldest.saturating_sub(1)
        ),
    };
}

impl net::http::Chunks for Sse {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Vec<u8>>> {
        if let Some(h) = self.hello.take() {
            return Poll::Ready(Some(h));
        }
        loop {
            let items = match self.feed.take(PAGE_EVENTS) {
                Ok(items) => items,
                // The connection is being cut; end the body in case it is still polled.
                Err(Cut) => return Poll::Ready(None),
            };
            if !items.is_empty() {
                let mut out = Vec::with_capacity(items.len() * 192);
                for item in &items {
                    sse_message(item, &mut out);
                }
                self.keepalive
                    .as_mut()
                    .reset(monoio::time::Instant::now() + keepalive());
                return Poll::Ready(Some(out));
            }
            if self.keepalive.as_mut().poll(cx).is_ready() {
                self.keepalive
                    .as_mut()
                    .reset(monoio::time::Instant::now() + keepalive());
                return Poll::Ready(Some(b": keepalive\n\n".to_vec()));
            }
            match self.wait.as_mut().poll(cx) {
                // Woken: read again, and wait on a fresh notification.
                Poll::Ready(()) => self.wait = Box::pin(wait(self.feed.wake())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::{ConnId, EdgeId, EventKind, Transport};
    use proto::id::{AreaId, DeviceId, RoomId, UserId};

    #[test]
    fn sse_messages_carry_the_seq_as_id_on_one_data_line() {
        let e = Event {
            seq: 42,
            kind: EventKind::Enter,
            uid: UserId(7),
            device: DeviceId("dev\n7".into()),
            room: RoomId(100),
            area: AreaId(3),
            edge: EdgeId("edge-1".into()),
            conn: ConnId(1),
            transport: Transport::Tcp,
            at: std::time::Instant::now(),
        };
        let mut out = Vec::new();
        sse_message(&Item::Event(e), &mut out);
        sse_message(
            &Item::Missed {
                after: 3,
                oldest: 10,
            },
            &mut out,
        );
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "id: 42\ndata: {\"area\":3,\"device\":\"dev\\n7\",\"edge\":\"edge-1\",\"room\":100,\
             \"seq\":42,\"transport\":\"tcp\",\"type\":\"enter\",\"uid\":7}\n\n\
             event: missed\nid: 9\ndata: {\"after\":3,\"oldest\":10,\"type\":\"missed\"}\n\n"
        );
    }
}
