//! Admin HTTP: `GET /healthz`, `GET /metrics` (Prometheus text), `POST /admin/drain`.
//!
//! Runs on its own thread and runtime (not a shard): it only reads the shards' single-writer
//! counters and flips node flags, so it never slows a shard's hot path.

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

/// Largest admin request body.
const ADMIN_BODY_BYTES_MAX: usize = 16 * 1024;

pub(crate) fn handler(node: Arc<Node>) -> Handler {
    Rc::new(move |req: Request| {
        let node = node.clone();
        Box::pin(async move { route(&node, &req) })
    })
}

pub(crate) fn body_bytes_max() -> usize {
    ADMIN_BODY_BYTES_MAX
}

fn route(node: &Node, req: &Request) -> Response {
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/healthz") => {
            let draining = node.draining.load(Ordering::Relaxed);
            Response::json(
                200,
                &serde_json::json!({"ok": true, "draining": draining, "connections": node.connections(), "capacity": node.capacity, "uptime_s": node.started.elapsed().as_secs()}),
            )
        }
        ("GET", "/metrics") => Response::text(200, render(node))
            .with_header("Content-Type", net::metrics::CONTENT_TYPE),
        ("POST", "/admin/drain") => {
            drain(node);
            Response::json(200, &serde_json::json!({"ok": true, "draining": true}))
        }
        _ => Response::text(404, "not found\n"),
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
            m.conns_tcp.get() as f64,
        );
        w.sample(
            "barrage_edge_connections",
            &[("shard", &shard_labels[i]), ("transport", "ws")],
            m.conns_ws.get() as f64,
        );
    }
    let simple: [Family<crate::metrics::ShardMetrics>; 13] = [
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
            "barrage_edge_batches_in_total",
            "counter",
            "Batches fanned out (per shard).",
            |m| m.batches_in.get(),
        ),
        (
            "barrage_edge_batch_bytes_in_total",
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
    let fams: [Family<crate::metrics::LinkMetrics>; 5] = [
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
            "barrage_edge_link_bytes_in_total",
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
    w.out
}
