//! High reach wired (issue 9): the [`crate::reach`] tracker and the [`crate::store`] log of one
//! broker, behind one lock, between the push path, the edges' presence and ACKs, and shard 0.
//!
//! - **Accept** ([`Courier::accept`], on whichever thread took the push): the bounds are checked
//!   by the tracker, the message is appended to the log and the log synced, and only then does
//!   the caller get its msg id. A refusal at any step leaves nothing behind.
//! - **Where the user is**: shard 0 passes every PRESENCE batch of an edge's presence link
//!   ([`Courier::on_presence`]) and the loss of that link ([`Courier::edge_down`]); a connection
//!   counts for its user (uid != 0) and for its device (non-empty id).
//! - **Out**: the tracker's sends wait in the courier's outbox until shard 0 takes them
//!   ([`Courier::poll`]) and writes one user/device batch per encoding on each edge's High link.
//!   The batch's link `seq` carries the try number (1 first, 2.. resends) so an edge can give
//!   resends only to connections that opted in with `"ack": true`.
//! - **End**: an ACK from the edge ([`Courier::ack`]) or the tracker's expiry/exhaustion ends a
//!   message; the end is logged (synced with the next commit) so a restart does not resend it.
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
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
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
}

struct Inner {
    tracker: Tracker,
    store: Option<Store>,
    /// Tracker actions not yet taken by shard 0.
    out: Vec<Action>,
    /// Ends logged since the last commit.
    uncommitted: bool,
    names: Vec<String>,
    by_name: HashMap<String, EdgeId>,
    incarnations: HashMap<EdgeId, u64>,
    conns: HashMap<(EdgeId, u64), Vec<Target>>,
    outcomes: HashMap<MsgId, Status>,
    outcome_order: VecDeque<MsgId>,
}

/// One broker's high-reach state. See the module docs.
pub struct Courier {
    inner: Mutex<Inner>,
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
                    uncommitted: false,
                    names: Vec::new(),
                    by_name: HashMap::new(),
                    incarnations: HashMap::new(),
                    conns: HashMap::new(),
                    outcomes: HashMap::new(),
                    outcome_order: VecDeque::new(),
                }),
                metrics,
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

    /// Accepts a high-reach push whose `body` already carries its `msg_id` field: tracked,
    /// logged and synced, or refused with nothing kept.
    pub fn accept(
        &self,
        msg: MsgId,
        target: Target,
        body: Bytes,
        ttl_ms: u64,
    ) -> Result<(), PushError> {
        let now = Instant::now();
        let mut g = self.lock();
        let inner = &mut *g;
        let mark = inner.out.len();
        if let Err(e) = inner.tracker.track(
            msg,
            target.clone(),
            body.clone(),
            ttl_ms,
            now,
            &mut inner.out,
        ) {
            match e {
                crate::reach::Refused::TargetFull => &self.metrics.refused_target,
                _ => &self.metrics.refused_shard,
            }
            .fetch_add(1, Relaxed);
            return Err(PushError::Overloaded);
        }
        if let Some(store) = &mut inner.store {
            let now_ms = unix_ms();
            let logged = store
                .append_accept(Accept {
                    msg,
                    target,
                    expires_at_ms: now_ms + ttl_ms,
                    body,
                })
                .and_then(|()| store.commit(now_ms));
            if let Err(e) = logged {
                tracing::error!(error = %e, "reach log: append failed; push refused");
                inner.tracker.forget(msg);
                inner.out.truncate(mark);
                self.metrics.refused_store.fetch_add(1, Relaxed);
                self.metrics.store_errors.fetch_add(1, Relaxed);
                return Err(PushError::Overloaded);
            }
            inner.uncommitted = false;
        }
        self.metrics.accepted.fetch_add(1, Relaxed);
        Ok(())
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
                    // Synced now, so "acked" in the status API means a restart will not
                    // resend it. A failed sync is retried with the next commit.
                    s.append_acked(msg);
                    if let Err(e) = s.commit(unix_ms()) {
                        inner.uncommitted = true;
                        self.metrics.store_errors.fetch_add(1, Relaxed);
                        tracing::warn!(error = %e, "reach log: commit of an ACK failed");
                    }
                }
                inner.remember(msg, Status::Acked);
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

    /// Runs the timers due at `now` and hands shard 0 every send waiting; logs the ends (and
    /// syncs them when `sync` is set: shard 0 does that at most every few ms).
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
                        inner.uncommitted = true;
                    }
                    inner.remember(msg, status);
                }
            }
        }
        if inner.uncommitted {
            inner.uncommitted = false;
            if let Some(s) = &mut inner.store {
                if let Err(e) = s.commit(unix_ms()) {
                    // The ends are still buffered; the next commit retries them. A crash
                    // meanwhile resends a message that was done: at least once, not lost.
                    self.metrics.store_errors.fetch_add(1, Relaxed);
                    tracing::warn!(error = %e, "reach log: commit of ends failed");
                }
            }
        }
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
}
