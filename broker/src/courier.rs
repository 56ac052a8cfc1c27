//! High reach wired (issue 9): the [`crate::reach`] tracker and the [`crate::store`] log of one
//! broker, behind one lock, between the push path, the edges' presence and ACKs, and shard 0.
//!
//! - **Accept** ([`Courier::accept`], on whichever thread took the push): the bounds are checked
//!   by the tracker and the message is appended to the log's buffer; with a log, the caller
//!   gets a [`Ticket`] and answers the push only once [`Courier::logged`] says the group holding
//!   it is synced. A refusal at any step (or a failed sync) leaves nothing behind.
//! - **Group commit** ([`Courier::run_log`], the `broker-reach-log` thread): takes everything
//!   appended since its last write (every push accepted meanwhile, on any thread and
//!   connection, plus ACK and end records), writes and `fdatasync`s it outside the lock, then
//!   wakes the pushes of that group. One sync covers every push that arrived during the
//!   previous one, so the rate follows the number of concurrent pushes, not the sync latency.
//!   The first sends of a group's messages are held until the group is synced.
//! - **Where the user is**: shard 0 passes every PRESENCE batch of an edge's presence link
//!   ([`Courier::on_presence`]) and the loss of that link ([`Courier::edge_down`]); a connection
//!   counts for its user (uid != 0) and for its device (non-empty id).
//! - **Out**: the tracker's sends wait in the courier's outbox until shard 0 takes them
//!   ([`Courier::poll`]) and writes one user/device batch per encoding on each edge's High link.
//!   The batch's link `seq` carries the try number (1 first, 2.. resends) so an edge can give
//!   resends only to connections that opted in with `"ack": true`.
//! - **End**: an ACK from the edge ([`Courier::ack`]) or the tracker's expiry/exhaustion ends a
//!   message; the end is logged (synced with the next commit) so a restart does not resend it,
//!   and its id waits for shard 0 ([`Courier::take_ended`]): in cluster mode that is when the
//!   message is acked to JetStream ([`crate::cluster::Cluster::reach_ended`]).
//!
//! Invariants: the tracker and the log hold the same live set (a message is tracked iff its
//! Accept is logged and no end is); presence records are keyed by (edge, conn) so repeated
//! enters and exits change nothing; a new presence incarnation of an edge forgets all its
//! connections first (the edge re-reports every live one).

use crate::reach::{AckOutcome, Action, EdgeId, End, Limits, Target, Tracker};
use crate::store::{Accept, Store};
use bytes::Bytes;
use proto::id::{DeviceId, MsgId, Scope, UserId};
use proto::ingest::PushError;
use proto::link::{PresenceBatch, PresenceKind};
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Outcomes of ended messages remembered for `GET /v1/reach/{msg_id}` (oldest forgotten first).
pub const REACH_OUTCOMES_MAX: usize = 65_536;
/// Presence connections remembered per broker (past it new enters are not tracked: their
/// users get high-reach messages on their next connect that fits, and it is counted).
pub const REACH_CONNS_MAX: usize = 4_000_000;

/// Where a high-reach message stands, as `GET /v1/reach/{msg_id}` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Tracked: sent `attempts` times so far (0: waiting for the target to connect).
    Pending {
        attempts: u32,
    },
    Acked,
    Expired,
    /// Every try went unacknowledged.
    Exhausted,
    /// Not known to this broker (never high reach, or forgotten).
    Unknown,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Status::Pending { .. } => "pending",
            Status::Acked => "acked",
            Status::Expired => "expired",
            Status::Exhausted => "exhausted",
            Status::Unknown => "unknown",
        }
    }
}

/// A send for shard 0 to write.
#[derive(Clone, Debug)]
pub struct Send {
    pub msg: MsgId,
    pub scope: Scope,
    /// Node ids of the edges to send to.
    pub nodes: Vec<String>,
    pub attempt: u32,
    pub body: Bytes,
}

/// Counters (rendered as `barrage_broker_reach_*`).
#[derive(Debug, Default)]
pub struct Metrics {
    pub accepted: AtomicU64,
    pub refused_target: AtomicU64,
    pub refused_shard: AtomicU64,
    pub refused_store: AtomicU64,
    pub first_sends: AtomicU64,
    pub resends: AtomicU64,
    pub acked: AtomicU64,
    pub expired: AtomicU64,
    pub exhausted: AtomicU64,
    pub ack_unknown: AtomicU64,
    pub ack_not_yours: AtomicU64,
    pub reloaded: AtomicU64,
    pub store_errors: AtomicU64,
    pub conns_untracked: AtomicU64,
    pub log_syncs: AtomicU64,
}

/// A push's place in the log's group commit: wait for it with [`Courier::logged`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket(u64);

/// Failed groups remembered for their waiters (a failure is rare; older ones are forgotten).
const FAILED_GROUPS_MAX: usize = 1024;

struct Inner {
    tracker: Tracker,
    store: Option<Store>,
    /// Tracker actions not yet taken by shard 0.
    out: Vec<Action>,
    /// Group commit (with a log): the open group (what is appended now is written with it),
    /// the last group written (or failed), failed groups, who waits, and the open group's
    /// messages and held first sends.
    group: u64,
    done: u64,
    failed: VecDeque<u64>,
    waiters: Vec<(u64, Arc<net::wake::Notify>)>,
    group_msgs: Vec<MsgId>,
    held: Vec<Action>,
    /// Something was appended since the commit thread last took the buffer.
    dirty: bool,
    /// The commit thread has ended: nothing is written any more.
    log_stopped: bool,
    names: Vec<String>,
    by_name: HashMap<String, EdgeId>,
    incarnations: HashMap<EdgeId, u64>,
    conns: HashMap<(EdgeId, u64), Vec<Target>>,
    outcomes: HashMap<MsgId, Status>,
    outcome_order: VecDeque<MsgId>,
    /// Messages ended (ACK, expiry, exhaustion) not yet taken by shard 0.
    ended: Vec<MsgId>,
}

/// One broker's high-reach state. See the module docs.
pub struct Courier {
    inner: Mutex<Inner>,
    /// Wakes the commit thread.
    log_cv: Condvar,
    pub metrics: Metrics,
    /// `Instant` and unix ms at start, to turn one into the other.
    t0: Instant,
    unix0_ms: u64,
}

/// Unix time in ms.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Courier {
    /// A courier with the log in `data_dir` (`None`: memory only), reloading what the log
    /// holds. Returns it and the largest msg id the log has seen (new ids must be above it).
    pub fn open(
        limits: Limits,
        data_dir: Option<&Path>,
    ) -> Result<(Courier, Option<MsgId>), crate::store::StoreError> {
        let t0 = Instant::now();
        let unix0_ms = unix_ms();
        let mut tracker = Tracker::new(limits);
        let metrics = Metrics::default();
        let mut out = Vec::new();
        let (store, msg_id_max) = match data_dir {
            None => (None, None),
            Some(dir) => {
                let (store, reload) = Store::open(dir, crate::store::Limits::default(), unix0_ms)?;
                if reload.torn_bytes > 0 {
                    tracing::warn!(bytes = reload.torn_bytes, dir = %dir.display(), "reach log: cut a torn tail (a crash mid-append)");
                }
                for a in reload.live {
                    let ttl = a.expires_at_ms.saturating_sub(unix0_ms).max(1);
                    if tracker
                        .track(a.msg, a.target, a.body, ttl, t0, &mut out)
                        .is_ok()
                    {
                        metrics.reloaded.fetch_add(1, Relaxed);
                    }
                }
                tracing::info!(
                    dir = %dir.display(),
                    live = tracker.len(),
                    expired = reload.expired,
                    "reach log reloaded"
                );
                (Some(store), reload.msg_id_max)
            }
        };
        Ok((
            Courier {
                inner: Mutex::new(Inner {
                    tracker,
                    store,
                    out,
                    group: 1,
                    done: 0,
                    failed: VecDeque::new(),
                    waiters: Vec::new(),
                    group_msgs: Vec::new(),
                    held: Vec::new(),
                    dirty: false,
                    log_stopped: false,
                    names: Vec::new(),
                    by_name: HashMap::new(),
                    incarnations: HashMap::new(),
                    conns: HashMap::new(),
                    outcomes: HashMap::new(),
                    outcome_order: VecDeque::new(),
                    ended: Vec::new(),
                }),
                metrics,
                log_cv: Condvar::new(),
                t0,
                unix0_ms,
            },
            msg_id_max,
        ))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The ttl a push gets (`ttl_ms` 0: the default).
    pub fn ttl_ms(&self, requested: u32) -> u64 {
        let l = *self.lock().tracker.limits();
        l.ttl_ms((requested > 0).then_some(u64::from(requested)))
    }

    /// Accepts a high-reach push whose `body` already carries its `msg_id` field: tracked and
    /// appended to the log, or refused with nothing kept. With a log the push may be answered
    /// only after [`Courier::logged`] of the returned ticket says `Ok`.
    pub fn accept(
        &self,
        msg: MsgId,
        target: Target,
        body: Bytes,
        ttl_ms: u64,
    ) -> Result<Option<Ticket>, PushError> {
        let now = Instant::now();
        let mut g = self.lock();
        let inner = &mut *g;
        let logged = inner.store.is_some();
        // With a log, first sends wait for the group's sync.
        let actions = if logged {
            &mut inner.held
        } else {
            &mut inner.out
        };
        let mark = actions.len();
        if let Err(e) = inner
            .tracker
            .track(msg, target.clone(), body.clone(), ttl_ms, now, actions)
        {
            match e {
                crate::reach::Refused::TargetFull => &self.metrics.refused_target,
                _ => &self.metrics.refused_shard,
            }
            .fetch_add(1, Relaxed);
            return Err(PushError::Overloaded);
        }
        let mut ticket = None;
        if let Some(store) = &mut inner.store {
            let appended = store.append_accept(Accept {
                msg,
                target,
                expires_at_ms: unix_ms() + ttl_ms,
                body,
            });
            if let Err(e) = appended {
                tracing::error!(error = %e, "reach log: append failed; push refused");
                inner.tracker.forget(msg);
                inner.held.truncate(mark);
                self.metrics.refused_store.fetch_add(1, Relaxed);
                self.metrics.store_errors.fetch_add(1, Relaxed);
                return Err(PushError::Overloaded);
            }
            inner.group_msgs.push(msg);
            inner.dirty = true;
            ticket = Some(Ticket(inner.group));
            self.log_cv.notify_one();
        }
        self.metrics.accepted.fetch_add(1, Relaxed);
        Ok(ticket)
    }

    /// Resolves once the group holding a push is synced (`Ok`), or its write failed or the log
    /// stopped (`Overloaded`: the message was forgotten).
    pub async fn logged(&self, t: Ticket) -> Result<(), PushError> {
        let wake = net::wake::Notify::new();
        loop {
            {
                let mut g = self.lock();
                if g.done >= t.0 {
                    return match g.failed.contains(&t.0) {
                        true => Err(PushError::Overloaded),
                        false => Ok(()),
                    };
                }
                if g.log_stopped {
                    return Err(PushError::Overloaded);
                }
                g.waiters.push((t.0, wake.clone()));
            }
            wake.notified().await;
        }
    }

    /// The commit thread's loop (only with a log): until `stop`, writes and syncs each group
    /// outside the lock, then releases its held sends (`wake_sends` wakes shard 0) and its
    /// waiters. See the module docs.
    pub fn run_log(&self, stop: &AtomicBool, wake_sends: impl Fn()) {
        loop {
            let mut g = self.lock();
            while !g.dirty && !stop.load(Relaxed) {
                g = self
                    .log_cv
                    .wait_timeout(g, std::time::Duration::from_millis(100))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            if !g.dirty {
                // Stopping with nothing left to write.
                g.log_stopped = true;
                wake_waiters(&mut g.waiters, u64::MAX);
                return;
            }
            let inner = &mut *g;
            inner.dirty = false;
            let group = inner.group;
            inner.group += 1;
            let msgs = std::mem::take(&mut inner.group_msgs);
            let held = std::mem::take(&mut inner.held);
            let staged = inner.store.as_mut().and_then(Store::take_staged);
            drop(g);
            let written = staged.as_ref().map_or(Ok(0), |s| s.write());
            self.metrics.log_syncs.fetch_add(1, Relaxed);
            let mut g = self.lock();
            let inner = &mut *g;
            match written {
                Ok(n) => {
                    if let Some(store) = &mut inner.store {
                        if let Err(e) = store.staged_done(n, unix_ms()) {
                            self.metrics.store_errors.fetch_add(1, Relaxed);
                            tracing::warn!(error = %e, "reach log: compaction failed");
                        }
                    }
                    inner.out.extend(held);
                }
                Err(e) => {
                    // Nothing of the group is durable: its pushes are refused and forgotten.
                    // Its ACK/end records are lost, so a restart may resend those messages
                    // (at least once, never lost).
                    tracing::error!(error = %e, pushes = msgs.len(), "reach log: write failed; the group's pushes are refused");
                    self.metrics.store_errors.fetch_add(1, Relaxed);
                    self.metrics
                        .refused_store
                        .fetch_add(msgs.len() as u64, Relaxed);
                    for m in &msgs {
                        inner.tracker.forget(*m);
                        if let Some(store) = &mut inner.store {
                            store.discard(*m);
                        }
                    }
                    if inner.failed.len() >= FAILED_GROUPS_MAX {
                        inner.failed.pop_front();
                    }
                    inner.failed.push_back(group);
                }
            }
            inner.done = group;
            wake_waiters(&mut inner.waiters, group);
            let sends = !inner.out.is_empty();
            drop(g);
            if sends {
                wake_sends();
            }
        }
    }

    /// An edge's PRESENCE batch (from its presence link, shard 0 Low).
    pub fn on_presence(&self, node: &str, batch: &PresenceBatch) {
        let now = Instant::now();
        let mut g = self.lock();
        let inner = &mut *g;
        let edge = inner.edge(node);
        let known = inner.incarnations.get(&edge).copied();
        match known {
            Some(k) if batch.incarnation < k => return, // stale report of an older link
            Some(k) if batch.incarnation == k => {}
            _ => {
                // A new incarnation re-reports every live connection: start from none.
                inner.forget_edge(edge);
                inner.incarnations.insert(edge, batch.incarnation);
            }
        }
        for ev in &batch.events {
            let key = (edge, ev.conn);
            match ev.kind {
                PresenceKind::Enter => {
                    if inner.conns.contains_key(&key) {
                        continue;
                    }
                    if inner.conns.len() >= REACH_CONNS_MAX {
                        self.metrics.conns_untracked.fetch_add(1, Relaxed);
                        continue;
                    }
                    let targets = targets_of(ev.uid, &ev.device);
                    for t in &targets {
                        inner.tracker.connect(t, edge, now, &mut inner.out);
                    }
                    inner.conns.insert(key, targets);
                }
                PresenceKind::Exit => {
                    if let Some(targets) = inner.conns.remove(&key) {
                        for t in &targets {
                            inner.tracker.disconnect(t, edge);
                        }
                    }
                }
            }
        }
    }

    /// The presence link of `node` is gone: none of its connections can be reached.
    pub fn edge_down(&self, node: &str) {
        let mut g = self.lock();
        let inner = &mut *g;
        if let Some(&edge) = inner.by_name.get(node) {
            inner.forget_edge(edge);
            inner.incarnations.remove(&edge);
        }
    }

    /// An op 1000 ACK an edge forwarded.
    pub fn ack(&self, msg: MsgId, uid: UserId, device: &DeviceId) -> AckOutcome {
        let mut g = self.lock();
        let inner = &mut *g;
        let device = (!device.0.is_empty()).then_some(device);
        let outcome = inner.tracker.ack(msg, uid, device);
        match outcome {
            AckOutcome::Acked => {
                self.metrics.acked.fetch_add(1, Relaxed);
                if let Some(s) = &mut inner.store {
                    // Synced by the commit thread within one sync; a crash before that
                    // resends the message after restart (at least once).
                    s.append_acked(msg);
                    inner.dirty = true;
                    self.log_cv.notify_one();
                }
                inner.remember(msg, Status::Acked);
                inner.ended.push(msg);
            }
            AckOutcome::Unknown => {
                self.metrics.ack_unknown.fetch_add(1, Relaxed);
            }
            AckOutcome::NotYours => {
                self.metrics.ack_not_yours.fetch_add(1, Relaxed);
            }
        }
        outcome
    }

    /// Runs the timers due at `now` and hands shard 0 every send waiting; logs the ends (the
    /// commit thread syncs them).
    pub fn poll(&self, now: Instant, out: &mut Vec<Send>) {
        let mut g = self.lock();
        let inner = &mut *g;
        inner.tracker.poll(now, &mut inner.out);
        let actions = std::mem::take(&mut inner.out);
        for a in actions {
            match a {
                Action::Send {
                    msg,
                    target,
                    edges,
                    attempt,
                    body,
                } => {
                    if attempt > 1 {
                        self.metrics.resends.fetch_add(1, Relaxed);
                    } else {
                        self.metrics.first_sends.fetch_add(1, Relaxed);
                    }
                    let nodes = edges
                        .iter()
                        .filter_map(|e| inner.names.get(e.0 as usize).cloned())
                        .collect();
                    out.push(Send {
                        msg,
                        scope: match target {
                            Target::User(u) => Scope::User(u),
                            Target::Device(d) => Scope::Device(d),
                        },
                        nodes,
                        attempt,
                        body,
                    });
                }
                Action::Ended { msg, end } => {
                    let status = match end {
                        End::Expired => {
                            self.metrics.expired.fetch_add(1, Relaxed);
                            Status::Expired
                        }
                        _ => {
                            self.metrics.exhausted.fetch_add(1, Relaxed);
                            Status::Exhausted
                        }
                    };
                    if let Some(s) = &mut inner.store {
                        s.append_ended(msg);
                        inner.dirty = true;
                        self.log_cv.notify_one();
                    }
                    inner.remember(msg, status);
                    inner.ended.push(msg);
                }
            }
        }
    }

    /// Moves the ids of the messages ended since the last call (ACK, expiry, exhaustion) to
    /// `out`. Shard 0 calls it with [`Courier::poll`]; cluster mode acks them to JetStream.
    pub fn take_ended(&self, out: &mut Vec<MsgId>) {
        out.append(&mut self.lock().ended);
    }

    /// True when sends are waiting for shard 0.
    pub fn has_output(&self) -> bool {
        !self.lock().out.is_empty()
    }

    /// When [`Courier::poll`] has timer work.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.lock().tracker.next_deadline()
    }

    /// Where `msg` stands.
    pub fn status(&self, msg: MsgId) -> Status {
        let g = self.lock();
        if let Some(attempts) = g.tracker.attempts(msg) {
            return Status::Pending { attempts };
        }
        g.outcomes.get(&msg).copied().unwrap_or(Status::Unknown)
    }

    /// Milliseconds a tracked message has left before its ttl ends (`None`: not tracked).
    pub fn expires_in_ms(&self, msg: MsgId) -> Option<u64> {
        let left = self.lock().tracker.expires_in(msg, Instant::now())?;
        Some(u64::try_from(left.as_millis()).unwrap_or(u64::MAX))
    }

    /// Gauges: (messages tracked, body bytes tracked, log bytes).
    pub fn gauges(&self) -> (usize, usize, u64) {
        let g = self.lock();
        (
            g.tracker.len(),
            g.tracker.bytes(),
            g.store.as_ref().map_or(0, Store::log_bytes),
        )
    }

    /// Unix ms of an instant (for logs and tests).
    pub fn unix_ms_at(&self, t: Instant) -> u64 {
        self.unix0_ms + t.saturating_duration_since(self.t0).as_millis() as u64
    }

    pub fn write_metrics(&self, w: &mut net::metrics::Writer) {
        let m = &self.metrics;
        let c = |w: &mut net::metrics::Writer, name: &str, help: &str, v: &AtomicU64| {
            w.metric(name, "counter", help, &[(&[], v.load(Relaxed) as f64)]);
        };
        c(
            w,
            "barrage_broker_reach_accepted_total",
            "High-reach pushes accepted (tracked, and logged when data_dir is set).",
            &m.accepted,
        );
        w.family(
            "barrage_broker_reach_refused_total",
            "counter",
            "High-reach pushes refused overloaded, by bound: target (reach_target_*), shard (reach_entries_max/reach_bytes_max), store (log append failed).",
        );
        for (r, v) in [
            ("target", &m.refused_target),
            ("shard", &m.refused_shard),
            ("store", &m.refused_store),
        ] {
            w.sample(
                "barrage_broker_reach_refused_total",
                &[("bound", r)],
                v.load(Relaxed) as f64,
            );
        }
        c(
            w,
            "barrage_broker_reach_sends_total",
            "First tries of high-reach messages sent to the edges holding the target.",
            &m.first_sends,
        );
        c(w, "barrage_broker_reach_resends_total", "Resends of unacknowledged high-reach messages (every reach_retry_ms, at most reach_retries).", &m.resends);
        c(
            w,
            "barrage_broker_reach_acked_total",
            "High-reach messages a client of their target ACKed.",
            &m.acked,
        );
        c(
            w,
            "barrage_broker_reach_expired_total",
            "High-reach messages whose ttl ended before an ACK.",
            &m.expired,
        );
        c(
            w,
            "barrage_broker_reach_exhausted_total",
            "High-reach messages with every try unacknowledged.",
            &m.exhausted,
        );
        w.family(
            "barrage_broker_reach_acks_ignored_total",
            "counter",
            "ACKs ignored: unknown (not tracked, ended, never sent) or not_yours (another user's or device's message).",
        );
        w.sample(
            "barrage_broker_reach_acks_ignored_total",
            &[("reason", "unknown")],
            m.ack_unknown.load(Relaxed) as f64,
        );
        w.sample(
            "barrage_broker_reach_acks_ignored_total",
            &[("reason", "not_yours")],
            m.ack_not_yours.load(Relaxed) as f64,
        );
        c(
            w,
            "barrage_broker_reach_reloaded_total",
            "High-reach messages reloaded from the log at start.",
            &m.reloaded,
        );
        c(
            w,
            "barrage_broker_reach_store_errors_total",
            "Failed appends or syncs of the reach log.",
            &m.store_errors,
        );
        c(
            w,
            "barrage_broker_reach_log_syncs_total",
            "Group commits of the reach log (one write and fdatasync each, for every push accepted meanwhile).",
            &m.log_syncs,
        );
        c(
            w,
            "barrage_broker_reach_conns_untracked_total",
            "Presence enters not tracked for high reach (REACH_CONNS_MAX reached).",
            &m.conns_untracked,
        );
        let (len, bytes, log) = self.gauges();
        w.metric(
            "barrage_broker_reach_tracked_messages",
            "gauge",
            "High-reach messages tracked (waiting for a connect included).",
            &[(&[], len as f64)],
        );
        w.metric(
            "barrage_broker_reach_tracked_bytes",
            "gauge",
            "Body bytes of the tracked high-reach messages.",
            &[(&[], bytes as f64)],
        );
        w.metric(
            "barrage_broker_reach_log_bytes",
            "gauge",
            "Bytes in the reach log files (0: memory only).",
            &[(&[], log as f64)],
        );
    }
}

impl Inner {
    fn edge(&mut self, node: &str) -> EdgeId {
        if let Some(e) = self.by_name.get(node) {
            return *e;
        }
        let e = EdgeId(self.names.len() as u32);
        self.names.push(node.to_string());
        self.by_name.insert(node.to_string(), e);
        e
    }

    fn forget_edge(&mut self, edge: EdgeId) {
        self.tracker.edge_down(edge);
        self.conns.retain(|(e, _), _| *e != edge);
    }

    fn remember(&mut self, msg: MsgId, status: Status) {
        if self.outcome_order.len() >= REACH_OUTCOMES_MAX {
            if let Some(old) = self.outcome_order.pop_front() {
                self.outcomes.remove(&old);
            }
        }
        self.outcomes.insert(msg, status);
        self.outcome_order.push_back(msg);
    }
}

/// Wakes (and drops) the waiters of every group up to `done`.
fn wake_waiters(waiters: &mut Vec<(u64, Arc<net::wake::Notify>)>, done: u64) {
    waiters.retain(|(g, w)| {
        if *g <= done {
            w.notify();
            false
        } else {
            true
        }
    });
}

/// The targets one connection counts for.
fn targets_of(uid: UserId, device: &DeviceId) -> Vec<Target> {
    let mut t = Vec::with_capacity(2);
    if !uid.is_guest() {
        t.push(Target::User(uid));
    }
    if !device.0.is_empty() {
        t.push(Target::Device(device.clone()));
    }
    t
}

/// The tracker target of a push scope; `None` for scopes high reach does not apply to.
pub fn target_of(scope: &Scope) -> Option<Target> {
    match scope {
        Scope::User(u) if !u.is_guest() => Some(Target::User(*u)),
        Scope::Device(d) if !d.0.is_empty() => Some(Target::Device(d.clone())),
        _ => None,
    }
}

/// The delivered body: `body` (a JSON object, checked by the policy) with a first top-level
/// field `"msg_id":"<decimal>"`. Refused when the object already has a `msg_id` field.
pub fn with_msg_id(body: &[u8], msg: MsgId) -> Result<Vec<u8>, PushError> {
    let fields: HashMap<String, serde::de::IgnoredAny> = serde_json::from_slice(body)
        .map_err(|e| PushError::Invalid(format!("body is not a JSON object: {e}")))?;
    if fields.contains_key("msg_id") {
        return Err(PushError::Invalid(
            "a high-reach body must not have a msg_id field (the broker adds it)".into(),
        ));
    }
    let Some(open) = body.iter().position(|b| *b == b'{') else {
        return Err(PushError::Invalid("body must be a JSON object".into()));
    };
    let field = format!("\"msg_id\":\"{}\"", msg.0);
    let mut out = Vec::with_capacity(body.len() + field.len() + 1);
    out.extend_from_slice(&body[..=open]);
    out.extend_from_slice(field.as_bytes());
    if !fields.is_empty() {
        out.push(b',');
    }
    out.extend_from_slice(&body[open + 1..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn msg_id_goes_first_and_the_rest_is_verbatim() {
        let b = with_msg_id(br#" {"a": [1,2], "b":"x"} "#, MsgId(42)).unwrap();
        assert_eq!(b, br#" {"msg_id":"42","a": [1,2], "b":"x"} "#);
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["msg_id"], "42");
        assert_eq!(with_msg_id(b"{}", MsgId(7)).unwrap(), br#"{"msg_id":"7"}"#);
        assert_eq!(
            with_msg_id(b"{ }", MsgId(7)).unwrap(),
            br#"{"msg_id":"7" }"#
        );
        assert!(with_msg_id(br#"{"msg_id":"1"}"#, MsgId(7)).is_err());
        assert!(with_msg_id(br#"[1]"#, MsgId(7)).is_err());
    }

    #[test]
    fn scopes_high_reach_applies_to() {
        assert!(target_of(&Scope::User(UserId(3))).is_some());
        assert!(target_of(&Scope::User(UserId(0))).is_none());
        assert!(target_of(&Scope::Device(DeviceId("d".into()))).is_some());
        assert!(target_of(&Scope::Device(DeviceId(String::new()))).is_none());
        assert!(target_of(&Scope::Global).is_none());
    }

    fn enter(conn: u64, uid: u64, kind: PresenceKind) -> proto::link::PresenceEvent {
        proto::link::PresenceEvent {
            kind,
            conn,
            uid: UserId(uid),
            device: DeviceId(String::new()),
            room: proto::id::RoomId(1),
            area: proto::id::AreaId(0),
            transport: proto::link::Transport::Tcp,
        }
    }

    #[test]
    fn offline_message_goes_out_on_enter_and_resends_follow_presence() {
        let (c, _) = Courier::open(
            Limits {
                retry_ms: 50,
                ..Limits::default()
            },
            None,
        )
        .unwrap();
        c.accept(
            MsgId(9),
            Target::User(UserId(5)),
            Bytes::from_static(b"{}"),
            10_000,
        )
        .unwrap();
        let mut out = Vec::new();
        c.poll(Instant::now(), &mut out);
        assert!(out.is_empty(), "offline: waits");
        assert_eq!(c.status(MsgId(9)), Status::Pending { attempts: 0 });
        let batch = |inc, events| PresenceBatch {
            incarnation: inc,
            events,
        };
        c.on_presence("e1", &batch(1, vec![enter(1, 5, PresenceKind::Enter)]));
        // A repeated enter changes nothing.
        c.on_presence("e1", &batch(1, vec![enter(1, 5, PresenceKind::Enter)]));
        c.poll(Instant::now(), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].nodes, ["e1"]);
        assert_eq!(out[0].attempt, 1);
        // An older incarnation is ignored; a newer one starts the edge from nothing.
        c.on_presence("e1", &batch(0, vec![enter(1, 5, PresenceKind::Exit)]));
        c.on_presence("e1", &batch(2, vec![]));
        c.on_presence("e2", &batch(1, vec![enter(4, 5, PresenceKind::Enter)]));
        out.clear();
        c.poll(Instant::now() + Duration::from_millis(60), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].nodes, ["e2"]);
        assert_eq!(out[0].attempt, 2);
        assert_eq!(
            c.ack(MsgId(9), UserId(6), &DeviceId(String::new())),
            AckOutcome::NotYours
        );
        assert_eq!(
            c.ack(MsgId(9), UserId(5), &DeviceId(String::new())),
            AckOutcome::Acked
        );
        assert_eq!(
            c.ack(MsgId(9), UserId(5), &DeviceId(String::new())),
            AckOutcome::Unknown
        );
        assert_eq!(c.status(MsgId(9)), Status::Acked);
        assert_eq!(c.status(MsgId(10)), Status::Unknown);
    }

    /// Pushes accepted while no sync runs share the next one; each is answered only after it,
    /// its first send waits for it, and what it covered is reloaded after a restart.
    #[test]
    fn pushes_accepted_together_share_one_sync_and_are_answered_after_it() {
        let dir = std::env::temp_dir().join(format!("barrage-courier-gc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (c, _) = Courier::open(Limits::default(), Some(&dir)).unwrap();
        let c = Arc::new(c);
        // User 5 is online on e1: its first sends are held until the sync.
        c.on_presence(
            "e1",
            &PresenceBatch {
                incarnation: 1,
                events: vec![enter(1, 5, PresenceKind::Enter)],
            },
        );
        let tickets: Vec<Ticket> = (1..=20)
            .map(|m| {
                c.accept(
                    MsgId(m),
                    Target::User(UserId(5)),
                    Bytes::from_static(b"{}"),
                    60_000,
                )
                .unwrap()
                .expect("a ticket with a log")
            })
            .collect();
        assert!(tickets.iter().all(|t| *t == tickets[0]), "one group");
        let mut out = Vec::new();
        c.poll(Instant::now(), &mut out);
        assert!(out.is_empty(), "no send before the sync");
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (c, stop) = (c.clone(), stop.clone());
            std::thread::spawn(move || c.run_log(&stop, || {}))
        };
        let driver = net::runtime::Driver::Legacy;
        net::runtime::block_on(driver, async {
            for t in &tickets {
                c.logged(*t).await.unwrap();
            }
        });
        assert_eq!(c.metrics.log_syncs.load(Relaxed), 1);
        c.poll(Instant::now(), &mut out);
        assert_eq!(out.len(), 20, "released by the sync");
        stop.store(true, Relaxed);
        thread.join().unwrap();
        // The log stopped: a later push is refused, not answered unsynced.
        let late = c
            .accept(
                MsgId(21),
                Target::User(UserId(5)),
                Bytes::from_static(b"{}"),
                60_000,
            )
            .unwrap()
            .unwrap();
        let r = net::runtime::block_on(driver, c.logged(late));
        assert_eq!(r, Err(PushError::Overloaded));
        drop(c);
        let (c, max) = Courier::open(Limits::default(), Some(&dir)).unwrap();
        assert_eq!(max, Some(MsgId(20)));
        assert_eq!(c.metrics.reloaded.load(Relaxed), 20);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
