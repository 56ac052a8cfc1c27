//! The HTTP API: pushes (one or many per request), health and metrics.
//!
//! ```text
//! POST /v1/push/room/{room} | /v1/push/area/{area} | /v1/push/global
//!      | /v1/push/user/{uid} | /v1/push/device/{device}
//!      ?priority=high|low  &reach=high|best_effort  &ttl_ms=N
//!      Authorization: Bearer <api key>;  body = the message, a JSON object, delivered verbatim
//!      Idempotency-Key: <1..=64 bytes> (optional: a retry with the same key within
//!      `idempotency_window_ms` gets the first msg_id and is not delivered twice)
//!   -> 202 {"msg_id":"..."} | 400 | 401 | 403 | 413 | 429 (Retry-After) | 503 (Retry-After)
//!      with {"error":"<reason>","message":"..."}
//! POST /v1/push/batch  {"messages":[{"scope":"room","target":1,"priority":"low","body":{...}}, ...]}
//!   -> 200 {"results":[{"msg_id":"..."} | {"error":"...","message":"..."}, ...]} (in request order)
//! GET /healthz -> 200 {"ok":true,...} (liveness);  GET /readyz -> 200, or 503 while stopping
//!   or (cluster mode) while the backbone does not take writes: {"reason":"backbone disconnected"}
//! GET /metrics -> Prometheus text
//! GET /v1/rooms/top?limit=N  Authorization: Bearer <api key>  (N <= 100, default 20)
//!   -> 200 {"rooms":[{"room":1,"viewers":12}, ...]} busiest first, fleet-wide counts as the
//!      edges last reported them (refreshed every `counts_interval_ms`)
//! POST /admin/reload (Bearer admin_key; without one, loopback only) -> runs the reload hooks
//!   as SIGHUP does: 200 {"ok":true,"reloaded":[...]} | 500 with each hook's outcome
//! GET /v1/presence/room/{room} | user/{uid} | top | events  (a key with the `presence`
//!      scope; see crate::roster and docs/api.md)
//! GET /v1/reach/{msg_id}  Authorization: Bearer <api key>
//!   -> 200 {"msg_id":"..","state":"pending|acked|expired|exhausted|unknown","attempts":N,"expires_in_ms":N}
//!      (high reach: where a message stands; see crate::courier)
//! ```
//!
//! `msg_id` is a decimal string: it can exceed 2^53, where JSON numbers lose precision.

use crate::ingest::{self, Via};
use crate::policy::KeyId;
use crate::stop::Stop;
use crate::Shared;
use net::http::{Request, Response};
use proto::id::{AreaId, DeviceId, Priority, Reach, RoomId, Scope, UserId};
use proto::ingest::{Push, PushError};
use serde::Deserialize;
use serde_json::json;
use std::rc::Rc;
use std::sync::Arc;

/// Paths served on the HTTP server's reserved slots when the public side is full.
pub const RESERVED_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// Serves the HTTP API on one shard until `stop`.
pub(crate) async fn serve(listener: std::net::TcpListener, shared: Arc<Shared>, stop: Stop) {
    let listener = match monoio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "http listener unusable");
            return;
        }
    };
    let mut cfg = net::http::ServeConfig::new(shared.config.http_body_bytes_max);
    cfg.limits = shared.config.http;
    cfg.reserved_paths = RESERVED_PATHS.iter().map(|p| p.to_string()).collect();
    cfg.stats = shared.http_stats.clone();
    let sse_shared = shared.clone();
    cfg.stream = Some(net::http::StreamRoute(Arc::new(move |req: &Request| {
        crate::feed::sse_route(&sse_shared, req)
    })));
    let handler: net::http::Handler = Rc::new(move |req: Request| {
        let shared = shared.clone();
        Box::pin(async move { handle(&shared, &req).await })
    });
    net::http::serve_with(listener, handler, cfg, stop.wait()).await;
}

fn error(status: u16, e: &PushError) -> Response {
    let resp = Response::error(status, e.label(), &e.to_string());
    match e {
        PushError::RateLimited { retry_after_ms } => resp.with_header(
            "Retry-After",
            &retry_after_ms.div_ceil(1000).max(1).to_string(),
        ),
        PushError::Overloaded => resp.with_header("Retry-After", "1"),
        _ => resp,
    }
}

/// HTTP status of a refusal.
pub fn status_of(e: &PushError) -> u16 {
    match e {
        PushError::Unauthorized => 401,
        PushError::ForbiddenScope => 403,
        PushError::TooLarge => 413,
        PushError::RateLimited { .. } => 429,
        PushError::Invalid(_) => 400,
        PushError::Overloaded => 503,
    }
}

fn fail(e: PushError) -> Response {
    error(status_of(&e), &e)
}

/// Routes one request.
pub(crate) async fn handle(shared: &Shared, req: &Request) -> Response {
    let path = req.path.trim_end_matches('/');
    match (req.method.as_str(), path) {
        ("GET", "/healthz") => Response::json(
            200,
            &json!({"ok": true, "node_id": shared.config.node_id, "shards": shared.shards}),
        ),
        ("GET", "/readyz") => {
            let backbone = shared.cluster.as_ref().map(|c| c.health());
            if shared.stop.load(std::sync::atomic::Ordering::Relaxed) {
                Response::json(503, &json!({"ready": false, "reason": "stopping"}))
            } else if let Some(h) = backbone.filter(|h| *h != backbone::Health::Up) {
                // Cluster mode: a push here would be refused, and nothing is consumed.
                let reason = format!("backbone {}", h.as_str());
                Response::json(503, &json!({"ready": false, "reason": reason}))
            } else {
                Response::json(200, &json!({"ready": true}))
            }
        }
        ("GET", "/metrics") => net::metrics::response(shared.metrics_text()),
        ("POST", "/admin/reload") => match admin_allowed(shared, req) {
            Ok(()) => shared.hooks.respond(),
            Err(refusal) => refusal,
        },
        ("GET", "/v1/rooms/top") => rooms_top(shared, req),
        ("GET", p) if p.starts_with("/v1/reach/") => {
            reach_status(shared, req, &p["/v1/reach/".len()..])
        }
        ("POST", "/v1/push/batch") => push_batch(shared, req).await,
        ("GET", p) if p.starts_with("/v1/presence/") => {
            shared.roster.http(shared, req, &p["/v1/presence/".len()..])
        }
        (_, p) if p.starts_with("/v1/presence/") => {
            Response::error(405, "method_not_allowed", "use GET").with_header("allow", "GET")
        }
        ("POST", p) if p.starts_with("/v1/push/") => {
            push_one(shared, req, &p["/v1/push/".len()..]).await
        }
        (_, "/v1/rooms/top") => {
            Response::error(405, "method_not_allowed", "use GET").with_header("allow", "GET")
        }
        (_, "/admin/reload") => {
            Response::error(405, "method_not_allowed", "use POST").with_header("allow", "POST")
        }
        (_, "/healthz" | "/readyz" | "/metrics") => {
            Response::error(405, "method_not_allowed", "use GET").with_header("allow", "GET")
        }
        (_, p) if p.starts_with("/v1/push/") => {
            Response::error(405, "method_not_allowed", "use POST").with_header("allow", "POST")
        }
        _ => Response::error(404, "not_found", "no such endpoint"),
    }
}

/// Rooms `GET /v1/rooms/top` lists when no `limit` is given.
const TOP_ROOMS_DEFAULT: usize = 20;

/// The busiest rooms of the fleet: each shard's snapshot merged (a room lives on one shard).
fn rooms_top(shared: &Shared, req: &Request) -> Response {
    if let Err(e) = key_of(shared, req) {
        return fail(e);
    }
    let limit = match req.query_param("limit") {
        None => TOP_ROOMS_DEFAULT,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=crate::TOP_ROOMS_MAX).contains(&n) => n,
            _ => {
                return fail(invalid(format!(
                    "limit must be 1..={}",
                    crate::TOP_ROOMS_MAX
                )))
            }
        },
    };
    let mut rooms: Vec<(RoomId, u64)> = shared
        .top_rooms
        .iter()
        .flat_map(|m| m.lock().unwrap_or_else(|p| p.into_inner()).clone())
        .collect();
    rooms.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0 .0.cmp(&b.0 .0)));
    rooms.truncate(limit);
    let rooms: Vec<serde_json::Value> = rooms
        .iter()
        .map(|(r, n)| json!({"room": r.0, "viewers": n}))
        .collect();
    Response::json(200, &json!({ "rooms": rooms }))
}

/// Where a high-reach message stands: `{"msg_id":"..","state":"pending"|"acked"|"expired"|
/// "exhausted"|"unknown","attempts":N,"expires_in_ms":N}` (`attempts` and `expires_in_ms`
/// while pending; `attempts` 0 = waiting for a connect).
/// Ended messages are remembered for the last `courier::REACH_OUTCOMES_MAX` endings.
fn reach_status(shared: &Shared, req: &Request, id: &str) -> Response {
    if let Err(e) = key_of(shared, req) {
        return fail(e);
    }
    let Ok(msg) = id.parse::<u64>() else {
        return fail(invalid("msg_id must be a decimal u64"));
    };
    let status = shared.courier.status(proto::id::MsgId(msg));
    let mut body = json!({"msg_id": msg.to_string(), "state": status.label()});
    if let crate::courier::Status::Pending { attempts } = status {
        body["attempts"] = json!(attempts);
        if let Some(left) = shared.courier.expires_in_ms(proto::id::MsgId(msg)) {
            body["expires_in_ms"] = json!(left);
        }
    }
    Response::json(200, &body)
}

/// Whether `req` may use an admin endpoint: the bearer must be `admin_key`; without one set,
/// only when the HTTP API listens on loopback.
fn admin_allowed(shared: &Shared, req: &Request) -> Result<(), Response> {
    let public = !shared.config.http_addr.ip().to_canonical().is_loopback();
    net::http::admin_allowed(req, &shared.config.admin_key, public, "http_addr")
}

fn key_of(shared: &Shared, req: &Request) -> Result<KeyId, PushError> {
    match req.bearer() {
        Some(k) => ingest::authenticate(shared, k),
        None => {
            shared.ingest_metrics.reject(&PushError::Unauthorized);
            Err(PushError::Unauthorized)
        }
    }
}

fn invalid(m: impl Into<String>) -> PushError {
    PushError::Invalid(m.into())
}

fn parse_scope(kind: &str, target: Option<&str>) -> Result<Scope, PushError> {
    let num = |t: Option<&str>| -> Result<u64, PushError> {
        t.and_then(|t| t.parse::<u64>().ok())
            .ok_or_else(|| invalid(format!("{kind} needs a numeric target")))
    };
    match kind {
        "room" => Ok(Scope::Room(RoomId(num(target)?))),
        "area" => {
            let a = u32::try_from(num(target)?).map_err(|_| invalid("area id above 2^32"))?;
            Ok(Scope::Area(AreaId(a)))
        }
        "global" => match target {
            None => Ok(Scope::Global),
            Some(_) => Err(invalid("global takes no target")),
        },
        "user" => Ok(Scope::User(UserId(num(target)?))),
        "device" => match target {
            Some(d) if !d.is_empty() => Ok(Scope::Device(DeviceId(d.to_string()))),
            _ => Err(invalid("device needs a device id")),
        },
        _ => Err(invalid(format!("unknown scope {kind:?}"))),
    }
}

fn parse_priority(p: Option<&str>) -> Result<Priority, PushError> {
    match p {
        None | Some("low") => Ok(Priority::Low),
        Some("high") => Ok(Priority::High),
        Some(other) => Err(invalid(format!(
            "priority must be high or low, not {other:?}"
        ))),
    }
}

fn parse_reach(r: Option<&str>) -> Result<Reach, PushError> {
    match r {
        None | Some("best_effort") => Ok(Reach::BestEffort),
        Some("high") => Ok(Reach::High),
        Some(other) => Err(invalid(format!(
            "reach must be high or best_effort, not {other:?}"
        ))),
    }
}

fn parse_query(req: &Request) -> Result<(Priority, Reach, u32), PushError> {
    let priority = parse_priority(req.query_param("priority"))?;
    let reach = parse_reach(req.query_param("reach"))?;
    let ttl_ms = match req.query_param("ttl_ms") {
        Some(t) => t
            .parse::<u32>()
            .map_err(|_| invalid("ttl_ms must be a u32"))?,
        None => 0,
    };
    Ok((priority, reach, ttl_ms))
}

async fn push_one(shared: &Shared, req: &Request, rest: &str) -> Response {
    let key = match key_of(shared, req) {
        Ok(k) => k,
        Err(e) => return fail(e),
    };
    let (kind, target) = match rest.split_once('/') {
        Some((k, t)) => (k, Some(t)),
        None => (rest, None),
    };
    let parsed = parse_scope(kind, target).and_then(|s| parse_query(req).map(|p| (s, p)));
    let (scope, (priority, reach, ttl_ms)) = match parsed {
        Ok(v) => v,
        Err(e) => {
            shared.ingest_metrics.reject(&e);
            return fail(e);
        }
    };
    let push = Push {
        req_id: 0,
        scope,
        priority,
        reach,
        ttl_ms,
        body: req.body.clone(),
    };
    let accepting = match req.header("idempotency-key") {
        Some(idem) => ingest::accept_keyed(shared, key, idem, push, Via::Http),
        None => ingest::accept(shared, key, push, None, Via::Http),
    };
    let result = ingest::finish(shared, accepting, Via::Http).await;
    match result {
        Ok(id) => Response::json(202, &json!({"msg_id": id.0.to_string()})),
        Err(PushError::TooLarge) => Response::error(
            413,
            "too_large",
            &format!(
                "message body is {} bytes; the limit is {} bytes (message_bytes_max)",
                req.body.len(),
                shared.config.message_bytes_max
            ),
        ),
        Err(e) => fail(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest<'a> {
    #[serde(borrow)]
    messages: Vec<BatchItem<'a>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchItem<'a> {
    scope: String,
    #[serde(default)]
    target: Option<serde_json::Value>,
    #[serde(default)]
    priority: Option<String>,
    #[serde(default)]
    reach: Option<String>,
    #[serde(default)]
    ttl_ms: Option<u32>,
    #[serde(borrow)]
    body: &'a serde_json::value::RawValue,
}

async fn push_batch(shared: &Shared, req: &Request) -> Response {
    let key = match key_of(shared, req) {
        Ok(k) => k,
        Err(e) => return fail(e),
    };
    let batch: BatchRequest = match serde_json::from_slice(&req.body) {
        Ok(b) => b,
        Err(e) => {
            let e = invalid(format!("batch body: {e}"));
            shared.ingest_metrics.reject(&e);
            return fail(e);
        }
    };
    if batch.messages.len() > shared.config.http_batch_messages_max {
        let e = invalid(format!(
            "at most {} messages per batch request",
            shared.config.http_batch_messages_max
        ));
        shared.ingest_metrics.reject(&e);
        return fail(e);
    }
    // Every item is checked and handed on first (cluster mode: all published at once), then
    // the answers are awaited in request order.
    let accepting: Vec<ingest::Accepting> = batch
        .messages
        .iter()
        .map(|item| {
            let target = match &item.target {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Number(n)) => Some(n.to_string()),
                Some(_) => Some(String::new()),
            };
            let checked = parse_scope(&item.scope, target.as_deref()).and_then(|scope| {
                let priority = parse_priority(item.priority.as_deref())?;
                let reach = parse_reach(item.reach.as_deref())?;
                Ok(Push {
                    req_id: 0,
                    scope,
                    priority,
                    reach,
                    ttl_ms: item.ttl_ms.unwrap_or(0),
                    body: item.body.get().as_bytes().to_vec(),
                })
            });
            match checked {
                Ok(push) => ingest::accept(shared, key, push, None, Via::Http),
                Err(e) => {
                    shared.ingest_metrics.reject(&e);
                    ingest::Accepting::Now(Err(e))
                }
            }
        })
        .collect();
    let mut results: Vec<serde_json::Value> = Vec::with_capacity(accepting.len());
    for a in accepting {
        results.push(match ingest::finish(shared, a, Via::Http).await {
            Ok(id) => json!({"msg_id": id.0.to_string()}),
            Err(e) => {
                let mut v =
                    json!({"error": e.label(), "message": e.to_string(), "status": status_of(&e)});
                if let PushError::RateLimited { retry_after_ms } = e {
                    v["retry_after_ms"] = json!(retry_after_ms);
                }
                v
            }
        });
    }
    Response::json(200, &json!({ "results": results }))
}
