//! The ingest socket: persistent TCP, pipelined `proto::ingest` frames (Auth first, then
//! Push; one Status per request, in request order on this server). Also the accept path
//! ([`accept`]) that HTTP pushes share.
//!
//! Invariants:
//! - A push gets its `msg_id` only after it sits in its owning shard's queue; from then on the
//!   broker drops it nowhere (a queue refusal is answered `Overloaded`, before any id).
//! - A malformed frame, a Status from the caller, or no successful Auth within
//!   `ingest_auth_ms_max` closes that connection only.
//! - Guessing keys is bounded: after `ingest_auth_failures_max` failed `Auth`s a connection is
//!   answered and closed, and an address with `ingest_auth_failures_per_addr_max` failures in
//!   the last [`AUTH_FAILURE_WINDOW_MS`] has every `Auth` refused unchecked until the window
//!   passes (the table of addresses is bounded by [`AUTH_FAILURE_ADDRS_MAX`]).

use crate::batcher::Message;
use crate::feed::Feed;
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

/// The window over which failed `Auth`s per address are counted.
pub const AUTH_FAILURE_WINDOW_MS: u64 = 60_000;
/// Addresses whose failed `Auth`s are tracked at once; past it (after expired entries are
/// dropped) new addresses are not tracked, so the table cannot grow with a flood.
pub const AUTH_FAILURE_ADDRS_MAX: usize = 65_536;

/// Failed `Auth`s per peer address within the window (sans-io: takes `now`).
#[derive(Debug, Default)]
pub struct AuthFailures {
    by_addr: std::collections::HashMap<std::net::IpAddr, (Instant, u32)>,
}

impl AuthFailures {
    /// True when `ip` has used up its failures for the current window.
    pub fn blocked(&mut self, ip: std::net::IpAddr, max: u32, now: Instant) -> bool {
        match self.by_addr.get(&ip) {
            Some((since, n)) if now.saturating_duration_since(*since) < Self::window() => *n >= max,
            Some(_) => {
                self.by_addr.remove(&ip);
                false
            }
            None => false,
        }
    }

    /// Counts one failure of `ip`.
    pub fn fail(&mut self, ip: std::net::IpAddr, now: Instant) {
        if !self.by_addr.contains_key(&ip) && self.by_addr.len() >= AUTH_FAILURE_ADDRS_MAX {
            self.by_addr
                .retain(|_, (since, _)| now.saturating_duration_since(*since) < Self::window());
            if self.by_addr.len() >= AUTH_FAILURE_ADDRS_MAX {
                return;
            }
        }
        let e = self.by_addr.entry(ip).or_insert((now, 0));
        if now.saturating_duration_since(e.0) >= Self::window() {
            *e = (now, 0);
        }
        e.1 = e.1.saturating_add(1);
    }

    fn window() -> Duration {
        Duration::from_millis(AUTH_FAILURE_WINDOW_MS)
    }
}

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

/// A push past the policy: answered at once (embedded mode, or refused), or waiting for the
/// backbone's publish ack (cluster mode). Resolve it with [`finish`].
pub(crate) enum Accepting {
    Now(Result<MsgId, PushError>),
    /// A high-reach push with `--data-dir`: answered once the log's group commit holding it
    /// is synced (see [`crate::courier`]).
    Logging(MsgId, crate::courier::Ticket),
    Publishing(crate::cluster::Publishing),
}

/// The answer to an [`Accepting`]: in cluster mode, after JetStream's publish ack (counted as
/// accepted then, or as `Overloaded`).
pub(crate) async fn finish(shared: &Shared, a: Accepting, via: Via) -> Result<MsgId, PushError> {
    match a {
        Accepting::Now(r) => r,
        Accepting::Logging(id, ticket) => {
            let r = shared.courier.logged(ticket).await.map(|()| id);
            match &r {
                Ok(_) => {
                    shared.ingest_metrics.accepted[via as usize].fetch_add(1, Relaxed);
                }
                Err(e) => shared.ingest_metrics.reject(e),
            }
            r
        }
        Accepting::Publishing(p) => {
            let r = match &shared.cluster {
                Some(c) => c.finish(p).await,
                None => Err(PushError::Overloaded),
            };
            match &r {
                Ok(_) => {
                    shared.ingest_metrics.accepted[via as usize].fetch_add(1, Relaxed);
                }
                Err(e) => shared.ingest_metrics.reject(e),
            }
            r
        }
    }
}

/// Checks a push against the policy and queues it on its owning shard (embedded mode) or
/// publishes it to the backbone (cluster mode). On success the message is in the queue (or
/// stored in JetStream) and will be batched.
pub(crate) fn accept(
    shared: &Shared,
    key: KeyId,
    push: Push,
    idem: Option<&str>,
    via: Via,
) -> Accepting {
    if let Some(c) = &shared.cluster {
        let high = match push.reach {
            proto::id::Reach::High => crate::cluster::check_high(&push),
            _ => Ok(()),
        };
        if let Err(e) = high.and_then(|()| admit(shared, key, &push.scope, &push.body).map(drop)) {
            shared.ingest_metrics.reject(&e);
            return Accepting::Now(Err(e));
        }
        return Accepting::Publishing(c.publish(idem.map(|i| (key.index(), i)), push));
    }
    let result = if push.reach == proto::id::Reach::High {
        match accept_high(shared, key, push) {
            Ok((id, Some(ticket))) => return Accepting::Logging(id, ticket),
            r => r.map(|(id, _)| id),
        }
    } else {
        accept_inner(shared, key, push.scope, push.priority, push.body)
    };
    match &result {
        Ok(_) => {
            shared.ingest_metrics.accepted[via as usize].fetch_add(1, Relaxed);
        }
        Err(e) => shared.ingest_metrics.reject(e),
    }
    Accepting::Now(result)
}

/// The policy: the stateless checks on this thread, then the rates (the key's lock-free, the
/// target's under its owning shard's lock only).
fn admit(shared: &Shared, key: KeyId, scope: &Scope, body: &[u8]) -> Result<usize, PushError> {
    // Stateless checks on this thread, no lock.
    let policy = shared.policy.load();
    policy.check(key, scope, body)?;
    let shard = owner(scope, shared.shards) as usize;
    let Some(rates) = shared.rates.get(shard) else {
        return Err(PushError::Overloaded);
    };
    // The rates: the key's lock-free, the target's under its owning shard's lock only.
    policy.spend(&mut lock(rates), key, scope, Instant::now())?;
    Ok(shard)
}

fn accept_inner(
    shared: &Shared,
    key: KeyId,
    scope: Scope,
    priority: Priority,
    body: Vec<u8>,
) -> Result<MsgId, PushError> {
    let shard = admit(shared, key, &scope, &body)?;
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
        accepted: Instant::now(),
    })
    .map_err(|_| PushError::Overloaded)?;
    inbox.notify.notify();
    Ok(msg_id)
}

/// A high-reach push (embedded mode): past the policy, it gets its msg id, the `msg_id` field
/// in its body, and is tracked and logged by the [`crate::courier`] before it is answered;
/// shard 0 (the owner of user and device scopes) sends it.
fn accept_high(
    shared: &Shared,
    key: KeyId,
    push: Push,
) -> Result<(MsgId, Option<crate::courier::Ticket>), PushError> {
    let Some(target) = crate::courier::target_of(&push.scope) else {
        return Err(PushError::Invalid(
            "reach=high applies to user (uid != 0) and device scopes".into(),
        ));
    };
    admit(shared, key, &push.scope, &push.body)?;
    let msg_id = MsgId(shared.next_msg_id.fetch_add(1, Relaxed));
    let body = crate::courier::with_msg_id(&push.body, msg_id)?;
    let ttl_ms = shared.courier.ttl_ms(push.ttl_ms);
    let ticket = shared
        .courier
        .accept(msg_id, target, bytes::Bytes::from(body), ttl_ms)?;
    if let Some(inbox) = shared.inboxes.first() {
        inbox.notify.notify();
    }
    Ok((msg_id, ticket))
}

/// [`accept`] for a push that carries an idempotency key: a retry within the window gets the
/// first push's msg id and queues nothing (see [`crate::dedup`]). In cluster mode the key goes
/// to JetStream as the message's `Nats-Msg-Id` instead, so a retry through any broker of the
/// cluster is deduplicated (within `cluster.dedup_window_ms`).
pub(crate) fn accept_keyed(
    shared: &Shared,
    key: KeyId,
    idem: &str,
    push: Push,
    via: Via,
) -> Accepting {
    if idem.is_empty() || idem.len() > proto::ingest::IDEMPOTENCY_KEY_BYTES_MAX {
        let e = PushError::Invalid(format!(
            "idempotency key must be 1..={} bytes",
            proto::ingest::IDEMPOTENCY_KEY_BYTES_MAX
        ));
        shared.ingest_metrics.reject(&e);
        return Accepting::Now(Err(e));
    }
    if shared.cluster.is_some() {
        return accept(shared, key, push, Some(idem), via);
    }
    let Some(table) = shared.dedup.get(owner(&push.scope, shared.shards) as usize) else {
        return Accepting::Now(Err(PushError::Overloaded));
    };
    let now = Instant::now();
    // Held across the accept so two copies of one push racing on two threads queue once.
    let mut d = lock(table);
    match d.check(key, idem, now) {
        crate::dedup::Seen::Before(id) => {
            shared.ingest_metrics.deduplicated.fetch_add(1, Relaxed);
            Accepting::Now(Ok(id))
        }
        crate::dedup::Seen::Full => {
            shared.ingest_metrics.reject(&PushError::Overloaded);
            Accepting::Now(Err(PushError::Overloaded))
        }
        crate::dedup::Seen::New => match accept(shared, key, push, None, via) {
            Accepting::Now(Ok(id)) => {
                d.remember(key, idem, id, now);
                Accepting::Now(Ok(id))
            }
            // Remembered before its sync: if that fails (the disk's failure, refused
            // overloaded), a retry within the window gets this id of a forgotten message.
            a @ Accepting::Logging(id, _) => {
                d.remember(key, idem, id, now);
                a
            }
            Accepting::Now(Err(e)) => Accepting::Now(Err(e)),
            // Embedded mode: accept answers at once.
            Accepting::Publishing(_) => Accepting::Now(Err(PushError::Overloaded)),
        },
    }
}

/// Authenticates an API key (counted as a rejection when unknown).
pub(crate) fn authenticate(shared: &Shared, api_key: &str) -> Result<KeyId, PushError> {
    let r = shared.policy.load().authenticate(api_key);
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
        let (stream, peer) = match accepted {
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
                _ = connection(stream, peer, &shared) => {},
                _ = stop.wait() => {},
            }
            open.set(open.get() - 1);
            shared.ingest_metrics.connections.fetch_sub(1, Relaxed);
        });
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Encodes the answers of the pushes in `answers`, in order, waiting for each publish ack.
async fn answer(shared: &Shared, answers: &mut Vec<(u64, Accepting)>, out: &mut Vec<u8>) {
    for (req_id, a) in answers.drain(..) {
        let result = finish(shared, a, Via::Socket).await;
        proto::ingest::encode(&IngestFrame::Status { req_id, result }, out);
    }
}

/// Opens the presence stream a `SUBSCRIBE` asks for.
fn subscribe(
    shared: &Arc<Shared>,
    key: Option<KeyId>,
    after: Option<u64>,
    rooms: Vec<proto::id::RoomId>,
    areas: Vec<proto::id::AreaId>,
) -> Result<Feed, PushError> {
    let r = (|| {
        let key = key.ok_or(PushError::Unauthorized)?;
        if !shared.policy.load().allows(key, crate::ScopeKind::Presence) {
            return Err(PushError::ForbiddenScope);
        }
        let filter = crate::roster::filter_of(
            rooms.into_iter().map(|r| r.0).collect(),
            areas.into_iter().map(|a| u64::from(a.0)).collect(),
        )
        .map_err(PushError::Invalid)?;
        Feed::open(shared, after, filter).map_err(|_| PushError::Overloaded)
    })();
    shared.roster.count_query(r.is_ok());
    r
}

/// Appends what `feed` has to send as `PRESENCE_EVENT` frames, up to a few pages (the rest
/// goes after this write); `Err` when the roster cut the stream.
fn presence_events(feed: &mut Feed, out: &mut Vec<u8>) -> Result<(), crate::feed::Cut> {
    for _ in 0..PRESENCE_PAGES_PER_WRITE {
        let items = feed.take(crate::feed::PAGE_EVENTS)?;
        if items.is_empty() {
            return Ok(());
        }
        for item in &items {
            let json = item.json().to_string().into_bytes();
            proto::ingest::encode(&IngestFrame::PresenceEvent { json }, out);
        }
    }
    // More may be waiting: wake ourselves so the next read is stopped for it at once.
    feed.wake().notify();
    Ok(())
}

/// Pages of presence events written at once on a subscribed ingest connection.
const PRESENCE_PAGES_PER_WRITE: usize = 4;

/// Read buffer growth step; frames larger than this grow the buffer up to the frame limit.
const READ_CHUNK_BYTES: usize = 16 * 1024;

async fn connection(
    stream: monoio::net::TcpStream,
    peer: std::net::SocketAddr,
    shared: &Arc<Shared>,
) {
    use net::framed::{FramedRead, ReadError};
    let frame_max = shared.config.ingest_frame_bytes_max;
    let ip = peer.ip().to_canonical();
    let mut auth_failures = 0u32;
    let auth_deadline = Instant::now() + Duration::from_millis(shared.config.ingest_auth_ms_max);
    let mut key: Option<KeyId> = None;
    // Kept to authenticate again after a reload replaced the policy (the key may be gone).
    let mut secret = String::new();
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
    let mut answers: Vec<(u64, Accepting)> = Vec::new();
    // The presence event stream this connection subscribed to (`SUBSCRIBE`).
    let mut feed: Option<Feed> = None;
    loop {
        // Until authenticated, the read is stopped (cancelled, not dropped) at the deadline;
        // with a subscription, also when presence events are there to send.
        let authed = key.is_some();
        let wake = feed.as_ref().map(Feed::wake);
        let stop = async move {
            if let Some(w) = wake {
                w.notified().await
            } else if authed {
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
                    if let Some(k) = key {
                        let policy = shared.policy.load();
                        if !policy.is_current(k) {
                            key = policy.authenticate(&secret).ok();
                        }
                    }
                    let status = match frame {
                        IngestFrame::Auth { req_id, api_key } => {
                            let per_addr_max = shared.config.ingest_auth_failures_per_addr_max;
                            let blocked = lock(&shared.auth_failures).blocked(
                                ip,
                                per_addr_max,
                                Instant::now(),
                            );
                            let r = if blocked {
                                shared.ingest_metrics.reject(&PushError::Unauthorized);
                                Err(PushError::Unauthorized)
                            } else {
                                authenticate(shared, &api_key)
                            };
                            if r.is_err() {
                                auth_failures += 1;
                                if !blocked {
                                    lock(&shared.auth_failures).fail(ip, Instant::now());
                                }
                            }
                            if r.is_ok() {
                                secret = api_key.clone();
                            }
                            key = r.as_ref().ok().copied().or(key);
                            let status = IngestFrame::Status {
                                req_id,
                                result: r.map(|_| MsgId(0)),
                            };
                            if blocked || auth_failures >= shared.config.ingest_auth_failures_max {
                                // Answer, then close: no more guesses on this connection.
                                answer(shared, &mut answers, &mut out).await;
                                proto::ingest::encode(&status, &mut out);
                                shared.ingest_metrics.protocol_errors.fetch_add(1, Relaxed);
                                let _ = frames.get_mut().write_all(std::mem::take(&mut out)).await;
                                return;
                            }
                            status
                        }
                        IngestFrame::Push(push) => {
                            let req_id = push.req_id;
                            let a = match key {
                                Some(k) => accept(shared, k, push, None, Via::Socket),
                                None => {
                                    shared.ingest_metrics.reject(&PushError::Unauthorized);
                                    Accepting::Now(Err(PushError::Unauthorized))
                                }
                            };
                            answers.push((req_id, a));
                            continue;
                        }
                        IngestFrame::KeyedPush {
                            idempotency_key,
                            push,
                        } => {
                            let req_id = push.req_id;
                            let a = match key {
                                Some(k) => {
                                    accept_keyed(shared, k, &idempotency_key, push, Via::Socket)
                                }
                                None => {
                                    shared.ingest_metrics.reject(&PushError::Unauthorized);
                                    Accepting::Now(Err(PushError::Unauthorized))
                                }
                            };
                            answers.push((req_id, a));
                            continue;
                        }
                        IngestFrame::Subscribe {
                            req_id,
                            after,
                            rooms,
                            areas,
                        } => {
                            // The old stream (if any) ends first, so it does not hold a slot.
                            feed = None;
                            let result = subscribe(shared, key, after, rooms, areas).map(|f| {
                                let at = f.position();
                                feed = Some(f);
                                MsgId(at)
                            });
                            IngestFrame::Status { req_id, result }
                        }
                        IngestFrame::Status { .. } | IngestFrame::PresenceEvent { .. } => {
                            shared.ingest_metrics.protocol_errors.fetch_add(1, Relaxed);
                            return;
                        }
                    };
                    answer(shared, &mut answers, &mut out).await;
                    proto::ingest::encode(&status, &mut out);
                }
                Err(ReadError::Closed | ReadError::Io(_)) => return,
                // Presence events to send: below, after this read's answers.
                Err(ReadError::Stopped) if feed.is_some() => break,
                Err(ReadError::Stopped) => {
                    // No AUTH within ingest_auth_ms_max.
                    shared.ingest_metrics.protocol_errors.fetch_add(1, Relaxed);
                    return;
                }
                Err(ReadError::Frame(_)) => {
                    shared.ingest_metrics.protocol_errors.fetch_add(1, Relaxed);
                    // Answer what was already decoded, then close.
                    answer(shared, &mut answers, &mut out).await;
                    let _ = frames.get_mut().write_all(std::mem::take(&mut out)).await;
                    return;
                }
            }
        }
        // Every push decoded from this read is in flight (cluster mode: published, acks
        // awaited together); answered in request order.
        answer(shared, &mut answers, &mut out).await;
        if let Some(f) = feed.as_mut() {
            if presence_events(f, &mut out).is_err() {
                // Cut for falling behind: what was taken is not worth a blocked write.
                return;
            }
        }
        if !out.is_empty() {
            let write = frames.get_mut().write_all(std::mem::take(&mut out));
            let (res, o) = match feed.as_ref().map(Feed::cut) {
                // A subscriber that stops reading is cut by the roster: stop waiting on it.
                Some(cut) => monoio::select! {
                    r = write => r,
                    _ = cut => return,
                },
                None => write.await,
            };
            if res.is_err() {
                return;
            }
            out = o;
            out.clear();
        }
    }
}
