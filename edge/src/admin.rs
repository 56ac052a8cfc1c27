//! Admin HTTP: `GET /healthz` (liveness), `GET /readyz` (503 while draining or before the
//! first broker link is up), `GET /metrics` (Prometheus text), `POST /admin/drain`,
//! `POST /admin/reload` (runs the node's reload hooks, as SIGHUP does).
//!
//! Runs on its own thread and runtime (not a shard): it only reads the shards' single-writer
//! counters and flips node flags, so it never slows a shard's hot path.
//!
//! Invariants: a mutating endpoint (`POST /admin/...`) needs `Authorization: Bearer
//! <admin_key>` when `admin_key` is set (compared in constant time), and is refused outright
//! when the admin address is not loopback and no `admin_key` is set. Reads (`/healthz`,
//! `/metrics`) stay open; binding them to a non-loopback address is warned about at start.
//! This module also checks the edge's secrets at start ([`check_secrets`]).

use crate::metrics::DropReason;
use crate::session::{AuthFail, CloseReason};
use crate::shard::Node;
use net::http::{Handler, Request, Response};
use net::metrics::Writer;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// A metric family: name, type, help, and how to read it from a counter struct.
type Family<T> = (&'static str, &'static str, &'static str, fn(&T) -> u64);

/// A histogram family: name, help, and which histogram of a shard (µs, exported in seconds).
type HistogramFamily = (
    &'static str,
    &'static str,
    fn(&crate::metrics::ShardMetrics) -> &net::metrics::Histogram,
);

/// Largest admin request body.
const ADMIN_BODY_BYTES_MAX: usize = 16 * 1024;

pub(crate) fn handler(node: Arc<Node>, http: Arc<net::http::Stats>) -> Handler {
    Rc::new(move |req: Request| {
        let resp = route(&node, &http, &req);
        Box::pin(async move { resp })
    })
}

/// Paths served on the admin server's reserved slots when it is full: a busy edge must
/// still answer its liveness probe.
pub const RESERVED_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// The admin server's limits.
pub(crate) fn serve_config(node: &Node) -> net::http::ServeConfig {
    let mut cfg = net::http::ServeConfig::new(ADMIN_BODY_BYTES_MAX);
    cfg.limits = node.config.http;
    cfg.reserved_paths = RESERVED_PATHS.iter().map(|p| p.to_string()).collect();
    cfg
}

fn route(node: &Node, http: &net::http::Stats, req: &Request) -> Response {
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/healthz") => {
            let draining = node.draining.load(Ordering::Relaxed);
            Response::json(
                200,
                &serde_json::json!({"ok": true, "draining": draining, "connections": node.connections(), "capacity": node.capacity, "uptime_ms": node.started.elapsed().as_millis() as u64}),
            )
        }
        ("GET", "/readyz") => match not_ready(node) {
            None => Response::json(200, &serde_json::json!({"ready": true})),
            Some(why) => Response::json(503, &serde_json::json!({"ready": false, "reason": why}))
                .with_header("Retry-After", "1"),
        },
        ("GET", "/metrics") => net::metrics::response(render(node) + &render_http(http)),
        ("POST", "/admin/reload") => {
            if let Err(refusal) = admin_allowed(node, req) {
                return refusal;
            }
            node.hooks.respond()
        }
        ("POST", "/admin/drain") => {
            if let Err(refusal) = admin_allowed(node, req) {
                return refusal;
            }
            drain(node);
            Response::json(200, &serde_json::json!({"ok": true, "draining": true}))
        }
        ("POST", "/admin/reload-tls") => {
            if let Err(refusal) = admin_allowed(node, req) {
                return refusal;
            }
            match reload_tls(node) {
                Ok(fp) => Response::json(200, &serde_json::json!({"ok": true, "fingerprint": fp})),
                Err(crate::EdgeError::TlsOff) => {
                    Response::error(409, "tls_off", "WSS is off: tls_cert_path is empty")
                }
                Err(e) => Response::error(500, "tls_reload_failed", &e.to_string()),
            }
        }
        (
            _,
            "/healthz" | "/readyz" | "/metrics" | "/admin/drain" | "/admin/reload"
            | "/admin/reload-tls",
        ) => Response::error(405, "method_not_allowed", "wrong method for this endpoint"),
        _ => Response::error(404, "not_found", "no such endpoint"),
    }
}

/// Why the edge should not get new viewers now (`None`: ready). Draining, or brokers are
/// configured and no link to one has come up yet.
pub(crate) fn not_ready(node: &Node) -> Option<&'static str> {
    if node.draining.load(Ordering::Relaxed) {
        return Some("draining");
    }
    if node.config.links_brokers() && !node.linked.load(Ordering::Acquire) {
        return Some("no broker link up yet");
    }
    None
}

/// Whether `req` may use a mutating endpoint (see the module invariants).
fn admin_allowed(node: &Node, req: &Request) -> Result<(), Response> {
    let public = admin_is_public(&node.config);
    net::http::admin_allowed(req, &node.config.admin_key, public, "admin_addr")
}

fn admin_is_public(config: &crate::Config) -> bool {
    net::secret::any_public([config.admin_addr.as_str()])
}

/// Checks the edge's secrets at start: weak ones (short, placeholders) are refused when any
/// listener is reachable from outside the host and warned about on loopback; an admin address
/// off loopback is warned about (its `/metrics` is readable by anyone who reaches it).
pub(crate) fn check_secrets(config: &crate::Config) -> Result<(), crate::EdgeError> {
    let public = net::secret::any_public([
        config.tcp_addr.as_str(),
        config.ws_addr.as_str(),
        config.admin_addr.as_str(),
    ]);
    let judge = |what: &str, check: Result<(), String>| {
        net::secret::require_strong(public, what, check).map_err(crate::EdgeError::Config)
    };
    if !config.token_keys.trim().is_empty() {
        judge(
            "token_keys",
            proto::token::check_key_spec(&config.token_keys),
        )?;
    }
    for (what, secret) in [
        ("link_key", &config.link_key),
        ("edge_key", &config.edge_key),
        ("admin_key", &config.admin_key),
    ] {
        if !secret.is_empty() {
            judge(what, net::secret::check(secret))?;
        }
    }
    if admin_is_public(config) {
        tracing::warn!(admin_addr = %config.admin_addr, "the admin server is not on loopback: /healthz and /metrics are readable by anyone who reaches it");
        if config.admin_key.is_empty() {
            tracing::warn!(
                "admin_key is empty: POST /admin/drain is refused on a non-loopback admin_addr"
            );
        }
    }
    Ok(())
}

/// Reloads the WSS certificate and key for new handshakes (open connections keep theirs); on
/// error the old certificate keeps serving. The hook for SIGHUP and `POST /admin/reload-tls`.
pub(crate) fn reload_tls(node: &Node) -> Result<String, crate::EdgeError> {
    let tls = node.tls.as_ref().ok_or(crate::EdgeError::TlsOff)?;
    match tls.reload() {
        Ok(fp) => {
            tracing::info!(fingerprint = %fp, "TLS certificate reloaded");
            Ok(fp)
        }
        Err(e) => {
            tracing::warn!(error = %e, "TLS reload failed; the old certificate keeps serving");
            Err(e.into())
        }
    }
}

/// Stop accepting, tell control (next heartbeat says draining), close clients gradually.
pub(crate) fn drain(node: &Node) {
    if !node.draining.swap(true, Ordering::AcqRel) {
        tracing::info!("draining: no new connections, closing clients gradually");
    }
    for n in &node.notify {
        n.notify();
    }
}

/// The admin server's admission counters.
fn render_http(http: &net::http::Stats) -> String {
    let mut w = Writer::default();
    http.write_metrics(&mut w, "barrage_edge_admin");
    w.finish()
}

/// Renders every counter in Prometheus text format.
pub(crate) fn render(node: &Node) -> String {
    let mut w = Writer::default();
    let shard_labels: Vec<String> = (0..node.shards).map(|i| i.to_string()).collect();
    w.family(
        "barrage_edge_connections",
        "gauge",
        "Open client connections by shard and transport.",
    );
    for (i, m) in node.metrics.iter().enumerate() {
        w.sample(
            "barrage_edge_connections",
            &[("shard", &shard_labels[i]), ("transport", "tcp")],
            m.conns_tcp.get().saturating_sub(m.conns_tls_tcp.get()) as f64,
        );
        w.sample(
            "barrage_edge_connections",
            &[("shard", &shard_labels[i]), ("transport", "tls_tcp")],
            m.conns_tls_tcp.get() as f64,
        );
        w.sample(
            "barrage_edge_connections",
            &[("shard", &shard_labels[i]), ("transport", "ws")],
            m.conns_ws.get().saturating_sub(m.conns_wss.get()) as f64,
        );
        w.sample(
            "barrage_edge_connections",
            &[("shard", &shard_labels[i]), ("transport", "wss")],
            m.conns_wss.get() as f64,
        );
        w.sample(
            "barrage_edge_connections",
            &[("shard", &shard_labels[i]), ("transport", "udp")],
            m.conns_udp.get() as f64,
        );
    }
    let simple: [Family<crate::metrics::ShardMetrics>; 34] = [
        (
            "barrage_edge_udp_datagrams_in_total",
            "counter",
            "Datagrams received on the shard's UDP socket (forwarded ones included).",
            |m| m.udp_datagrams_in.get(),
        ),
        (
            "barrage_edge_udp_datagrams_out_total",
            "counter",
            "Datagrams sent.",
            |m| m.udp_datagrams_out.get(),
        ),
        (
            "barrage_edge_udp_forwarded_total",
            "counter",
            "Datagrams passed to the shard owning their session (after a NAT rebinding).",
            |m| m.udp_forwarded.get(),
        ),
        (
            "barrage_edge_udp_migrations_total",
            "counter",
            "UDP sessions moved to an address the client proved (NAT rebinding).",
            |m| m.udp_migrations.get(),
        ),
        (
            "barrage_edge_udp_byes_total",
            "counter",
            "UDP sessions their client ended with a bye (op 1004).",
            |m| m.udp_byes.get(),
        ),
        (
            "barrage_edge_ring_writes_total",
            "counter",
            "Client writes submitted as io_uring WRITEV entries (ring_writes; a subset of writes_total).",
            |m| m.ring_writes.get(),
        ),
        (
            "barrage_edge_ring_submits_total",
            "counter",
            "io_uring_enter calls that submitted client ring writes (ring_writes / ring_submits: writes per call).",
            |m| m.ring_submits.get(),
        ),
        (
            "barrage_edge_ring_write_errors_total",
            "counter",
            "Ring writes that failed (each closed its connection).",
            |m| m.ring_write_errors.get(),
        ),
        (
            "barrage_edge_ring_orphans_freed_total",
            "counter",
            "Ring writes of connections closed while in flight, freed at their completion.",
            |m| m.ring_orphans_freed.get(),
        ),
        (
            "barrage_edge_udp_send_errors_total",
            "counter",
            "Datagram sends that failed (lost, as on the network).",
            |m| m.udp_send_errors.get(),
        ),
        (
            "barrage_edge_tls_handshaking",
            "gauge",
            "TLS handshakes in flight (capped per shard by tls_handshakes_max).",
            |m| m.tls_handshaking.get(),
        ),
        (
            "barrage_edge_tls_handshakes_total",
            "counter",
            "TLS handshakes completed.",
            |m| m.tls_handshakes.get(),
        ),
        (
            "barrage_edge_tls_close_notify_total",
            "counter",
            "close_notify alerts written on TLS connections the edge closed itself.",
            |m| m.tls_close_notify.get(),
        ),
        (
            "barrage_edge_tls_close_notify_failed_total",
            "counter",
            "Edge-side TLS closes whose close_notify could not be written in time (bare FIN/RST).",
            |m| m.tls_close_notify_failed.get(),
        ),
        (
            "barrage_edge_accepted_total",
            "counter",
            "Connections accepted.",
            |m| m.accepted.get(),
        ),
        (
            "barrage_edge_pending_handshakes",
            "gauge",
            "Connections not yet authenticated.",
            |m| m.pending_handshakes.get(),
        ),
        ("barrage_edge_rooms", "gauge", "Rooms with viewers.", |m| {
            m.rooms.get()
        }),
        (
            "barrage_edge_auth_ok_total",
            "counter",
            "Successful auths.",
            |m| m.auth_ok.get(),
        ),
        (
            "barrage_edge_heartbeats_total",
            "counter",
            "Client heartbeats answered.",
            |m| m.heartbeats.get(),
        ),
        (
            "barrage_edge_acks_total",
            "counter",
            "Client ACKs of high-reach messages.",
            |m| m.acks.get(),
        ),
        (
            "barrage_edge_acks_not_opted_in_total",
            "counter",
            "op 1000 ACKs from connections whose auth did not say \"ack\": true (ignored).",
            |m| m.acks_not_opted_in.get(),
        ),
        (
            "barrage_edge_acks_rate_limited_total",
            "counter",
            "op 1000 ACKs past the connection's rate (64 per second) or the shard's pending bound (dropped).",
            |m| m.acks_rate_limited.get(),
        ),
        (
            "barrage_edge_batches_in_total",
            "counter",
            "Batches fanned out (per shard).",
            |m| m.batches_in.get(),
        ),
        (
            "barrage_edge_batch_in_bytes_total",
            "counter",
            "Batch bytes received (per shard).",
            |m| m.batch_bytes_in.get(),
        ),
        (
            "barrage_edge_sends_total",
            "counter",
            "Batch sends queued to connections.",
            |m| m.sends.get(),
        ),
        (
            "barrage_edge_bytes_out_total",
            "counter",
            "Bytes written to clients.",
            |m| m.bytes_out.get(),
        ),
        (
            "barrage_edge_writes_total",
            "counter",
            "Writes to clients (one writev of every queued buffer); sends_total / writes_total is batches per write.",
            |m| m.writes.get(),
        ),
        (
            "barrage_edge_accept_errors_total",
            "counter",
            "accept() failures (EMFILE, ENFILE...); the shard backs off accepting.",
            |m| m.accept_errors.get(),
        ),
        (
            "barrage_edge_epoch_syncs_total",
            "counter",
            "BARRAGE_SYNCs sent to connected clients after a broker link came back and named the room's epoch.",
            |m| m.epoch_syncs.get(),
        ),
        (
            "barrage_edge_resume_replayed_batches_total",
            "counter",
            "Batches replayed to resuming connections.",
            |m| m.resume_replayed.get(),
        ),
        (
            "barrage_edge_presence_records",
            "gauge",
            "Connections the presence reporter holds (link shard only).",
            |m| m.presence_records.get(),
        ),
        (
            "barrage_edge_presence_frames_total",
            "counter",
            "PRESENCE frames queued to brokers (link shard only).",
            |m| m.presence_frames.get(),
        ),
        (
            "barrage_edge_presence_rereports_total",
            "counter",
            "Full presence re-reports: one per broker re-link, or after a pending list overflowed.",
            |m| m.presence_rereports.get(),
        ),
        (
            "barrage_edge_shards",
            "gauge",
            "Shard is running (1).",
            |_| 1,
        ),
    ];
    for (name, kind, help, get) in simple {
        w.family(name, kind, help);
        for (i, m) in node.metrics.iter().enumerate() {
            w.sample(name, &[("shard", &shard_labels[i])], get(m) as f64);
        }
    }
    w.family(
        "barrage_edge_auth_failed_total",
        "counter",
        "Refused auths by reason.",
    );
    for f in AuthFail::ALL {
        let v: u64 = node
            .metrics
            .iter()
            .map(|m| m.auth_failed[f.index()].get())
            .sum();
        w.sample(
            "barrage_edge_auth_failed_total",
            &[("reason", f.label())],
            v as f64,
        );
    }
    w.family(
        "barrage_edge_closes_total",
        "counter",
        "Closed connections by reason.",
    );
    for r in CloseReason::ALL {
        let v: u64 = node.metrics.iter().map(|m| m.closes_of(r)).sum();
        w.sample(
            "barrage_edge_closes_total",
            &[("reason", r.label())],
            v as f64,
        );
    }
    w.family(
        "barrage_edge_tls_failed_total",
        "counter",
        "TLS connections closed or refused, by why (bad_record: not TLS; overloaded: over tls_handshakes_max).",
    );
    for f in crate::tls::TlsFail::ALL {
        let v: u64 = node
            .metrics
            .iter()
            .map(|m| m.tls_failed[f.index()].get())
            .sum();
        w.sample(
            "barrage_edge_tls_failed_total",
            &[("reason", f.label())],
            v as f64,
        );
    }
    w.family(
        "barrage_edge_resumes_total",
        "counter",
        "BARRAGE_SYNCs sent, by outcome (fresh: ack only; malformed: resume ignored; timeout, overflow, full, unlinked: fallbacks without the broker's answer).",
    );
    for o in crate::resume::Outcome::ALL {
        let v: u64 = node
            .metrics
            .iter()
            .map(|m| m.resumes[o.index()].get())
            .sum();
        w.sample(
            "barrage_edge_resumes_total",
            &[("outcome", o.label())],
            v as f64,
        );
    }
    w.family(
        "barrage_edge_udp_dropped_total",
        "counter",
        "Client datagrams dropped unanswered, by why (docs/protocol-udp.md#errors).",
    );
    for (i, label) in crate::udp::DROP_LABELS.iter().enumerate() {
        let v: u64 = node.metrics.iter().map(|m| m.udp_dropped[i].get()).sum();
        w.sample(
            "barrage_edge_udp_dropped_total",
            &[("reason", label)],
            v as f64,
        );
    }
    w.family(
        "barrage_edge_drops_total",
        "counter",
        "Batches not delivered, by reason.",
    );
    for r in DropReason::ALL {
        let v: u64 = node.metrics.iter().map(|m| m.drops_of(r)).sum();
        w.sample(
            "barrage_edge_drops_total",
            &[("reason", r.label())],
            v as f64,
        );
    }
    let hist: [HistogramFamily; 4] = [
        (
            "barrage_edge_fanout_seconds",
            "One batch's fan-out on one shard: taken from the ring to every viewer's bytes queued.",
            |m| &m.fanout_us,
        ),
        (
            "barrage_edge_flush_to_write_seconds",
            "A batch from the broker's flush (its stamp) to queued to every viewer on one shard, by the hosts' wall clocks.",
            |m| &m.flush_to_write_us,
        ),
        (
            "barrage_edge_auth_seconds",
            "Processing of the bytes that authenticated a connection (token check included).",
            |m| &m.auth_us,
        ),
        (
            "barrage_edge_resume_seconds",
            "From a resuming connection's auth to its BARRAGE_SYNC queued (the broker's answer included).",
            |m| &m.resume_us,
        ),
    ];
    for (name, help, get) in hist {
        w.family(name, "histogram", help);
        let parts: Vec<&net::metrics::Histogram> = node.metrics.iter().map(|m| get(m)).collect();
        w.histogram(name, &[], &parts, 1e-6);
    }
    net::metrics::write_process(&mut w, "edge");
    w.family("barrage_edge_draining", "gauge", "1 while draining.");
    w.sample(
        "barrage_edge_draining",
        &[],
        if node.draining.load(Ordering::Relaxed) {
            1.0
        } else {
            0.0
        },
    );
    w.family(
        "barrage_edge_capacity",
        "gauge",
        "Connections this process can hold (fd limit).",
    );
    w.sample("barrage_edge_capacity", &[], node.capacity as f64);
    let links = node.links.lock().map(|l| l.clone()).unwrap_or_default();
    let fams: [Family<crate::metrics::LinkMetrics>; 9] = [
        (
            "barrage_edge_link_up",
            "gauge",
            "Broker link state (1 up, 0 down).",
            |l| l.up.get(),
        ),
        (
            "barrage_edge_link_connects_total",
            "counter",
            "Broker link connect attempts.",
            |l| l.connects.get(),
        ),
        (
            "barrage_edge_link_batches_in_total",
            "counter",
            "Batches received on the link.",
            |l| l.batches_in.get(),
        ),
        (
            "barrage_edge_link_in_bytes_total",
            "counter",
            "Batch bytes received on the link.",
            |l| l.bytes_in.get(),
        ),
        (
            "barrage_edge_link_frames_out_total",
            "counter",
            "Frames sent on the link.",
            |l| l.frames_out.get(),
        ),
        (
            "barrage_edge_link_downs_total",
            "counter",
            "Times the link went down after being up (dead past link_dead_ms, closed, reset).",
            |l| l.downs.get(),
        ),
        (
            "barrage_edge_link_seq_gaps_total",
            "counter",
            "Batches missing from a stream on this link (a jump in the broker's seq: lost while the link was down).",
            |l| l.seq_gaps.get(),
        ),
        (
            "barrage_edge_link_seq_restarts_total",
            "counter",
            "Streams whose seq went back on this link (a restarted broker).",
            |l| l.seq_restarts.get(),
        ),
        (
            "barrage_edge_link_confirms_total",
            "counter",
            "CONFIRM frames sent on the link (cluster mode only: each confirms every batch received so far).",
            |l| l.confirms.get(),
        ),
    ];
    for (name, kind, help, get) in fams {
        w.family(name, kind, help);
        for l in &links {
            let s = l.broker_shard.to_string();
            w.sample(
                name,
                &[
                    ("broker", &l.broker),
                    ("broker_shard", &s),
                    ("priority", l.priority),
                ],
                get(l) as f64,
            );
        }
    }
    w.finish()
}
