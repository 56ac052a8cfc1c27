//! The HTTP handlers: tokens, Bilibili-compatible discovery, the edge registry, health and
//! metrics.
//!
//! Sans-io: [`Api::handle`] turns a parsed request plus `now` into a response; the monoio shell
//! in `lib.rs` only moves bytes. Responses are serialised from structs, not maps, so JSON keys
//! come out in the order real clients were observed to receive them (DESIGN §3).
//!
//! Invariants: a request carrying a wrong API key is refused even where no key is needed (a
//! misconfigured caller should hear about it, not be silently downgraded to a guest); edge
//! heartbeats need the `edge_key` bearer when one is configured, else a loopback peer.

use crate::config::Config;
use crate::issuer::Issuer;
use crate::region::RegionTable;
use crate::registry::{
    Assigned, Choice, EdgeState, Heartbeat, HeartbeatError, Plan, Registry, REGION_BYTES_MAX,
};
use crate::room::{RoomInfo, RoomTable};
use net::http::{Request, Response};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// Paths served on the HTTP server's reserved slots when the public side is full.
/// `/v1/registry` is among them: a connect storm at this control must not make the other
/// regions' controls believe this region went dark.
pub const RESERVED_PATHS: [&str; 6] = [
    "/healthz",
    "/readyz",
    "/metrics",
    "/v1/edges/heartbeat",
    "/v1/brokers/heartbeat",
    crate::peers::REGISTRY_PATH,
];

/// The header a trusted front proxy sets to the client's region.
pub const REGION_HEADER: &str = "x-client-region";
/// The query parameter a client names its region with (`?region=sh`).
pub const REGION_PARAM: &str = "region";

/// Counters for `/metrics`. One thread owns them (control runs one HTTP thread).
#[derive(Debug, Default)]
pub struct Counters {
    pub requests: [u64; ROUTES.len()],
    /// Requests to the pages (room page, demo box, console), in `pages::ROUTES` order.
    pub page_requests: [u64; crate::pages::ROUTES.len()],
    pub tokens_user: u64,
    pub tokens_guest: u64,
    pub unauthorized: u64,
    pub heartbeats_accepted: u64,
    pub heartbeats_refused: u64,
    /// Broker heartbeats (cluster mode), accepted and refused.
    pub broker_heartbeats_accepted: u64,
    pub broker_heartbeats_refused: u64,
    /// Token requests answered with an empty edge list (no edge alive anywhere).
    pub assignments_empty: u64,
    /// Token requests whose first edge is in the client's region.
    pub assignments_home: u64,
    /// Token requests whose client region had no assignable edge: another region's first.
    pub assignments_fallback: u64,
    /// Region names nobody knows, by where they came from (`?region=`, the header): the
    /// client was sent as one of `default_region`.
    pub region_unknown_param: u64,
    pub region_unknown_header: u64,
}

/// Route labels for the request counter, in `Counters::requests` order.
pub const ROUTES: [&str; 14] = [
    "connect",
    "danmu_info",
    "room_info",
    "room_get_info",
    "heartbeat",
    "edges",
    "healthz",
    "readyz",
    "reload",
    "metrics",
    "other",
    "broker_heartbeat",
    "brokers",
    "registry",
];

#[derive(Clone, Copy)]
enum Route {
    Connect,
    DanmuInfo,
    RoomInfo,
    RoomGetInfo,
    Heartbeat,
    Edges,
    Healthz,
    Readyz,
    Reload,
    Metrics,
    Other,
    BrokerHeartbeat,
    Brokers,
    Registry,
}

/// What a reload (SIGHUP, `POST /admin/reload`) swaps: the API keys and the token signer.
pub struct Keys {
    api_keys: Vec<String>,
    issuer: Issuer,
    /// The token keys' fingerprints, as peers of other regions compare them.
    prints: Vec<crate::peers::KeyPrint>,
}

impl Keys {
    /// The keys of `config`; fails on a bad or empty token key set.
    pub fn new(config: &Config) -> Result<Keys, crate::ControlError> {
        let keys = proto::token::KeySet::parse(&config.token_keys)
            .map_err(|e| crate::ControlError::Config(format!("token_keys: {e}")))?;
        let prints = crate::peers::key_prints(&keys);
        let issuer = Issuer::new(keys, config.token_ttl_ms.div_ceil(1000)).ok_or_else(|| {
            crate::ControlError::Config("token_keys is empty: control cannot sign tokens".into())
        })?;
        Ok(Keys {
            api_keys: config
                .api_keys
                .iter()
                .filter(|k| !k.is_empty())
                .cloned()
                .collect(),
            issuer,
            prints,
        })
    }
}

/// All of control's state behind the HTTP endpoints.
pub struct Api {
    /// Swapped whole by a reload; each request reads one snapshot.
    keys: std::sync::Arc<net::reload::Live<Keys>>,
    /// What `POST /admin/reload` runs (the binary registers "config").
    hooks: net::reload::Hooks,
    edge_key: String,
    /// Keys good for the fleet lists only (`fleet_keys`).
    fleet_keys: Vec<String>,
    trust_region_header: bool,
    default_region: String,
    edges_per_client_max: usize,
    regions: RegionTable,
    rooms: RoomTable,
    registry: Registry,
    /// Live brokers (cluster mode), handed to edges in heartbeat answers.
    brokers: crate::brokers::Brokers,
    /// This control's region (exported to peers).
    region: String,
    /// The other regions' controls and what they last said.
    peers: crate::peers::Peers,
    region_fallbacks: std::collections::BTreeMap<String, Vec<String>>,
    fallback_edges: usize,
    /// Region names the config mentions (known even before an edge of theirs heartbeats).
    configured_regions: std::collections::BTreeSet<String>,
    counters: Counters,
    http_stats: std::sync::Arc<net::http::Stats>,
    /// Request durations by (route, status): bounded by the routes times the statuses
    /// control answers with.
    durations: std::collections::BTreeMap<(&'static str, u16), net::metrics::Histogram>,
}

/// Body of `POST /v1/connect`.
#[derive(Debug, Deserialize)]
struct ConnectBody {
    room: u64,
    #[serde(default)]
    uid: u64,
    #[serde(default)]
    device: String,
}

#[derive(Serialize)]
struct EdgeOut<'a> {
    host: &'a str,
    tcp_port: u16,
    ws_port: u16,
    wss_port: u16,
    /// Ours: listed only for edges that serve it.
    #[serde(skip_serializing_if = "is_zero")]
    tls_tcp_port: u16,
    /// Ours (docs/protocol-udp.md): listed only for edges that serve it.
    #[serde(skip_serializing_if = "is_zero")]
    udp_port: u16,
    region: &'a str,
}

fn is_zero(p: &u16) -> bool {
    *p == 0
}

#[derive(Serialize)]
struct ConnectOut<'a> {
    token: &'a str,
    expires_at: u64,
    room: u64,
    /// The region the client was judged to be in (its edges come first in `edges`).
    region: &'a str,
    edges: Vec<EdgeOut<'a>>,
}

/// `{"code":0,"message":"0","ttl":1,"data":...}`, the envelope of every Bilibili-style answer.
#[derive(Serialize)]
struct Envelope<T: Serialize> {
    code: i32,
    message: &'static str,
    ttl: u32,
    data: T,
}

#[derive(Serialize)]
struct HostOut<'a> {
    host: &'a str,
    port: u16,
    wss_port: u16,
    ws_port: u16,
    /// Fields of ours after Bilibili's, only for edges that serve them (clients ignore
    /// fields they do not know).
    #[serde(skip_serializing_if = "is_zero")]
    tls_tcp_port: u16,
    #[serde(skip_serializing_if = "is_zero")]
    udp_port: u16,
}

#[derive(Serialize)]
struct DanmuInfo<'a> {
    group: &'static str,
    business_id: u32,
    refresh_row_factor: f64,
    refresh_rate: u32,
    max_delay: u32,
    token: &'a str,
    host_list: Vec<HostOut<'a>>,
}

#[derive(Serialize)]
struct RoomInfoOut {
    room_id: u64,
    short_id: u64,
    uid: u64,
    area_id: u32,
    live_status: u32,
}

#[derive(Serialize)]
struct InfoByRoom {
    room_info: RoomInfoOut,
}

#[derive(Serialize)]
struct EdgesOut {
    edges: Vec<crate::registry::Listed>,
}

/// The shape Bilibili answers room calls with when something is wrong (`code` != 0).
#[derive(Serialize)]
struct BiliError {
    code: i32,
    message: &'static str,
    ttl: u32,
}

fn json<T: Serialize>(status: u16, v: &T) -> Response {
    // Serialising these plain structs cannot fail; an empty object is a safe fallback anyway.
    let body = serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec());
    Response {
        status,
        headers: vec![("content-type".to_string(), "application/json".to_string())],
        body,
    }
}

/// Every error control answers outside the Bilibili-style endpoints: the one shape all roles
/// use, `{"error":"<label>","message":"..."}` (see `net::http::Response::error`).
fn error(status: u16, msg: &str) -> Response {
    let label = match status {
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        413 => "too_large",
        503 => "overloaded",
        _ => "error",
    };
    Response::error(status, label, msg)
}

/// Browser pages on other origins call the discovery endpoints, as they do Bilibili's.
fn cors(r: Response) -> Response {
    r.with_header("access-control-allow-origin", "*")
}

fn bili_error(status: u16, code: i32, message: &'static str) -> Response {
    cors(json(
        status,
        &BiliError {
            code,
            message,
            ttl: 1,
        },
    ))
}

/// Whether `Authorization: Bearer` is absent, valid for `keys`, or present and wrong.
enum Bearer {
    Absent,
    Valid,
    Wrong,
}

fn check_bearer(req: &Request, keys: &[String]) -> Bearer {
    match req.bearer() {
        None => Bearer::Absent,
        Some(k) => {
            // Check every key so the time taken does not say which one was close.
            let ok = keys.iter().fold(false, |acc, key| {
                net::secret::ct_eq(key.as_bytes(), k.as_bytes()) | acc
            });
            if ok {
                Bearer::Valid
            } else {
                Bearer::Wrong
            }
        }
    }
}

impl Api {
    /// Builds the handlers' state from a config; fails on bad keys or CIDRs.
    pub fn new(config: &Config) -> Result<Api, crate::ControlError> {
        let keys = Keys::new(config)?;
        let regions = RegionTable::new(
            config
                .regions
                .iter()
                .map(|r| (r.cidr.as_str(), r.region.as_str())),
        )
        .map_err(|e| crate::ControlError::Config(format!("regions: {e}")))?;
        Ok(Api {
            keys: std::sync::Arc::new(net::reload::Live::new(keys)),
            hooks: Default::default(),
            edge_key: config.edge_key.clone(),
            fleet_keys: config.fleet_keys.clone(),
            trust_region_header: config.trust_region_header,
            default_region: config.default_region.clone(),
            edges_per_client_max: config.edges_per_client_max,
            regions,
            rooms: RoomTable::new(&config.rooms, config.rooms_strict),
            registry: Registry::new(
                Duration::from_millis(config.edge_ttl_ms),
                Duration::from_millis(config.edge_forget_ms),
                config.edges_max,
            ),
            brokers: crate::brokers::Brokers::new(
                Duration::from_millis(config.edge_ttl_ms),
                Duration::from_millis(config.edge_forget_ms),
            ),
            region: config.region.clone(),
            peers: crate::peers::Peers::new(
                &config.peers,
                Duration::from_millis(config.peer_poll_ms),
            ),
            region_fallbacks: config.region_fallbacks.clone(),
            fallback_edges: config.fallback_edges,
            configured_regions: [&config.region, &config.default_region]
                .into_iter()
                .chain(config.regions.iter().map(|r| &r.region))
                .chain(config.region_fallbacks.keys())
                .chain(config.region_fallbacks.values().flatten())
                .cloned()
                .collect(),
            counters: Counters::default(),
            http_stats: Default::default(),
            durations: Default::default(),
        })
    }

    /// The keys a reload swaps (shared with the role's handle).
    pub fn live_keys(&self) -> std::sync::Arc<net::reload::Live<Keys>> {
        self.keys.clone()
    }

    /// The reload hooks `POST /admin/reload` runs.
    pub fn reload_hooks(&self) -> net::reload::Hooks {
        self.hooks.clone()
    }

    /// The HTTP server's admission counters, rendered in `/metrics`.
    pub fn http_stats(&self) -> std::sync::Arc<net::http::Stats> {
        self.http_stats.clone()
    }

    /// Answers one request. `now` drives edge liveness, `now_s` (unix seconds) token expiry.
    /// The time it took is recorded by route and status.
    pub fn handle(&mut self, req: &Request, now: Instant, now_s: u64) -> Response {
        let started = std::time::Instant::now();
        let (route, resp) = self.route(req, now, now_s);
        self.observe(ROUTES[route as usize], resp.status, started);
        resp
    }

    /// Records one answered request: its time by route and status.
    fn observe(&mut self, route: &'static str, status: u16, started: std::time::Instant) {
        self.durations
            .entry((route, status))
            .or_insert_with(net::metrics::Histogram::latency)
            .observe_since(started);
    }

    /// Records one request the pages answered (`pages::route` index), counted and timed as
    /// the API's are, so `barrage_control_request_duration_seconds` covers every route.
    pub fn observe_page(&mut self, route: usize, status: u16, started: std::time::Instant) {
        let Some(name) = crate::pages::ROUTES.get(route) else {
            return;
        };
        if let Some(n) = self.counters.page_requests.get_mut(route) {
            *n += 1;
        }
        self.observe(name, status, started);
    }

    fn route(&mut self, req: &Request, now: Instant, now_s: u64) -> (Route, Response) {
        let route = self.route_of(req);
        (route, self.handle_route(route, req, now, now_s))
    }

    fn route_of(&self, req: &Request) -> Route {
        match req.path.as_str() {
            "/v1/connect" => Route::Connect,
            "/xlive/web-room/v1/index/getDanmuInfo" => Route::DanmuInfo,
            "/xlive/web-room/v1/index/getInfoByRoom" => Route::RoomInfo,
            "/room/v1/Room/get_info" => Route::RoomGetInfo,
            "/v1/edges/heartbeat" => Route::Heartbeat,
            "/v1/edges" => Route::Edges,
            "/v1/brokers/heartbeat" => Route::BrokerHeartbeat,
            "/v1/brokers" => Route::Brokers,
            crate::peers::REGISTRY_PATH => Route::Registry,
            "/healthz" => Route::Healthz,
            "/readyz" => Route::Readyz,
            "/admin/reload" => Route::Reload,
            "/metrics" => Route::Metrics,
            _ => Route::Other,
        }
    }

    fn handle_route(&mut self, route: Route, req: &Request, now: Instant, now_s: u64) -> Response {
        self.counters.requests[route as usize] += 1;
        let want = match route {
            Route::Connect | Route::Heartbeat | Route::BrokerHeartbeat | Route::Reload => "POST",
            _ => "GET",
        };
        if !matches!(route, Route::Other)
            && req.method != want
            && !(want == "GET" && req.method == "HEAD")
        {
            return error(405, "method not allowed").with_header("allow", want);
        }
        match route {
            Route::Connect => self.connect(req, now, now_s),
            Route::DanmuInfo => self.danmu_info(req, now, now_s),
            Route::RoomInfo => self.room_info(req, true),
            Route::RoomGetInfo => self.room_info(req, false),
            Route::Heartbeat => self.heartbeat(req, now),
            Route::Edges => self.edges(req, now),
            Route::BrokerHeartbeat => self.broker_heartbeat(req, now),
            Route::Brokers => self.list_brokers(req, now),
            Route::Registry => self.registry_export(req, now),
            Route::Healthz => Response {
                status: 200,
                headers: vec![("content-type".into(), "text/plain".into())],
                body: b"ok\n".to_vec(),
            },
            // Control holds no links: serving requests is being ready (edges register anyway).
            Route::Readyz => Response::json(200, &serde_json::json!({"ready": true})),
            Route::Reload => match check_bearer(req, &self.keys.load().api_keys) {
                Bearer::Valid => self.hooks.respond(),
                _ => {
                    self.counters.unauthorized += 1;
                    error(401, "POST /admin/reload needs one of the API keys")
                }
            },
            Route::Metrics => self.metrics(now),
            Route::Other => error(404, "no such endpoint"),
        }
    }

    /// Whether the request carries one of the API keys (for the console's JSON, `pages`).
    pub fn key_valid(&self, req: &Request) -> bool {
        matches!(check_bearer(req, &self.keys.load().api_keys), Bearer::Valid)
    }

    /// The registry as operators see it (for the console, `pages`).
    pub fn listed_edges(&mut self, now: Instant) -> Vec<crate::registry::Listed> {
        self.registry.list(now)
    }

    /// Whether `region` is a region anyone knows: named in the config, or the region of an
    /// edge or broker heard here or from a peer.
    fn region_known(&self, region: &str) -> bool {
        self.configured_regions.contains(region)
            || self.registry.knows_region(region)
            || self.brokers.knows_region(region)
    }

    /// The client's region: `?region=`, else a trusted header, else the CIDR table, else the
    /// default. A named region nobody knows counts (by source) and gives the default.
    fn region_of(&mut self, req: &Request) -> String {
        let named = |v: Option<&str>| {
            v.map(str::trim)
                .filter(|r| !r.is_empty())
                .map(|r| r.to_string())
        };
        let param = named(req.query_param(REGION_PARAM));
        let header = if self.trust_region_header {
            named(req.header(REGION_HEADER))
        } else {
            None
        };
        let from_client = param.map(|r| (r, true)).or(header.map(|r| (r, false)));
        if let Some((r, is_param)) = from_client {
            let well_formed =
                r.len() <= REGION_BYTES_MAX && r.bytes().all(crate::region::name_byte_ok);
            if well_formed && self.region_known(&r) {
                return r;
            }
            if is_param {
                self.counters.region_unknown_param += 1;
            } else {
                self.counters.region_unknown_header += 1;
            }
            return self.default_region.clone();
        }
        if let Some(r) = req.peer.and_then(|p| self.regions.lookup(p.ip())) {
            return r.to_string();
        }
        self.default_region.clone()
    }

    /// The edges for a client: its region's first, then the next-best regions' as fallbacks
    /// (see [`Registry::assign`]); a region whose brokers are all gone is not assigned.
    /// The client's region and its edges.
    fn assign(&mut self, req: &Request, now: Instant) -> (String, Vec<Assigned>) {
        let region = self.region_of(req);
        let brokers = &self.brokers;
        let region_ok = |r: &str| brokers.region_ok(r, now);
        let order = self
            .region_fallbacks
            .get(&region)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let (edges, choice) = self.registry.assign(
            &Plan {
                region: &region,
                order,
                n: self.edges_per_client_max,
                fallback_edges: self.fallback_edges,
                region_ok: &region_ok,
            },
            now,
        );
        match choice {
            Choice::Home => self.counters.assignments_home += 1,
            Choice::Fallback => self.counters.assignments_fallback += 1,
            Choice::Empty => self.counters.assignments_empty += 1,
        }
        (region, edges)
    }

    /// One poll of peer `i` came back (`Ok(body)` of a 200, or why not): merged into the
    /// registries (see [`crate::peers`]).
    pub fn peer_answered(&mut self, i: usize, outcome: Result<Vec<u8>, String>, now: Instant) {
        let keys = self.keys.load();
        self.peers.answered(
            i,
            outcome,
            &keys.prints,
            &mut self.registry,
            &mut self.brokers,
            now,
        );
    }

    /// `GET /v1/registry`: the edges and brokers that heartbeat this control, with their ages,
    /// and the token key fingerprints, for the controls of other regions (fleet-list rule).
    fn registry_export(&mut self, req: &Request, now: Instant) -> Response {
        if let Err(r) = self.fleet_allowed(req) {
            return r;
        }
        let export = crate::peers::Export {
            region: self.region.clone(),
            edges: self
                .registry
                .local(now)
                .into_iter()
                .map(|l| crate::peers::ExportEdge {
                    heartbeat: l.heartbeat,
                    last_seen_ms_ago: l.last_seen_ms_ago,
                })
                .collect(),
            brokers: self
                .brokers
                .local(now)
                .into_iter()
                .map(|b| crate::peers::ExportBroker {
                    beat: b.beat,
                    last_seen_ms_ago: b.last_seen_ms_ago,
                })
                .collect(),
            token_keys: self.keys.load().prints.clone(),
        };
        json(200, &export)
    }

    fn connect(&mut self, req: &Request, now: Instant, now_s: u64) -> Response {
        let body: ConnectBody = match serde_json::from_slice(&req.body) {
            Ok(b) => b,
            Err(_) => {
                return error(
                    400,
                    "body must be JSON {\"room\":N,\"uid\":N,\"device\":\"...\"}",
                )
            }
        };
        match check_bearer(req, &self.keys.load().api_keys) {
            Bearer::Valid => {}
            Bearer::Absent if body.uid == 0 => {}
            Bearer::Absent | Bearer::Wrong => {
                self.counters.unauthorized += 1;
                return error(401, "a valid API key is needed for uid != 0");
            }
        }
        if body.device.len() > proto::limits::DEVICE_BYTES_MAX {
            return error(400, "device id too long");
        }
        let Some(room) = self.rooms.resolve(body.room) else {
            return error(404, "no such room");
        };
        let issued = self
            .keys
            .load()
            .issuer
            .issue(body.uid, &body.device, &room, now_s);
        if body.uid == 0 {
            self.counters.tokens_guest += 1;
        } else {
            self.counters.tokens_user += 1;
        }
        let (region, edges) = self.assign(req, now);
        json(
            200,
            &ConnectOut {
                token: &issued.token,
                expires_at: issued.expires_at_s,
                room: room.room_id,
                region: &region,
                edges: edges
                    .iter()
                    .map(|e| EdgeOut {
                        host: &e.host,
                        tcp_port: e.tcp_port,
                        ws_port: e.ws_port,
                        wss_port: e.wss_port,
                        tls_tcp_port: e.tls_tcp_port,
                        udp_port: e.udp_port,
                        region: &e.region,
                    })
                    .collect(),
            },
        )
    }

    /// Resolves the room named by query parameter `name`, or the Bilibili-style error response.
    fn room_param(&self, req: &Request, name: &str) -> Result<RoomInfo, Response> {
        let Some(id) = req
            .query_param(name)
            .and_then(|v| v.trim().parse::<u64>().ok())
        else {
            return Err(bili_error(400, -400, "invalid room id"));
        };
        self.rooms
            .resolve(id)
            .ok_or_else(|| bili_error(404, -404, "room not found"))
    }

    fn danmu_info(&mut self, req: &Request, now: Instant, now_s: u64) -> Response {
        let room = match self.room_param(req, "id") {
            Ok(r) => r,
            Err(resp) => return resp,
        };
        // Discovery callers are anonymous: a guest token bound to the room, no device
        // (real clients invent their buvid only when they connect).
        let issued = self.keys.load().issuer.issue(0, "", &room, now_s);
        self.counters.tokens_guest += 1;
        let (_, edges) = self.assign(req, now);
        let data = DanmuInfo {
            group: "live",
            business_id: 0,
            refresh_row_factor: 0.125,
            refresh_rate: 100,
            max_delay: 5000,
            token: &issued.token,
            host_list: edges
                .iter()
                .map(|e| HostOut {
                    host: &e.host,
                    port: e.tcp_port,
                    wss_port: e.wss_port,
                    ws_port: e.ws_port,
                    tls_tcp_port: e.tls_tcp_port,
                    udp_port: e.udp_port,
                })
                .collect(),
        };
        cors(json(
            200,
            &Envelope {
                code: 0,
                message: "0",
                ttl: 1,
                data,
            },
        ))
    }

    fn room_info(&mut self, req: &Request, by_room: bool) -> Response {
        let room = match self.room_param(req, "room_id") {
            Ok(r) => r,
            Err(resp) => return resp,
        };
        let info = RoomInfoOut {
            room_id: room.room_id,
            short_id: room.short_id,
            uid: room.uid,
            area_id: room.area,
            live_status: 1,
        };
        if by_room {
            cors(json(
                200,
                &Envelope {
                    code: 0,
                    message: "0",
                    ttl: 1,
                    data: InfoByRoom { room_info: info },
                },
            ))
        } else {
            cors(json(
                200,
                &Envelope {
                    code: 0,
                    message: "ok",
                    ttl: 1,
                    data: info,
                },
            ))
        }
    }

    /// The fleet list (hosts, load): operators' data, not the public's. Every region's edges
    /// this control knows (`peer` names where another region's came from); `?region=` filters. A valid API key or the
    /// edge key opens it; without a bearer only a loopback peer gets it; a wrong key is 401.
    fn edges(&mut self, req: &Request, now: Instant) -> Response {
        if let Err(r) = self.fleet_allowed(req) {
            return r;
        }
        let mut edges = self.registry.list(now);
        if let Some(region) = req.query_param(REGION_PARAM) {
            edges.retain(|e| e.heartbeat.region == region);
        }
        json(200, &EdgesOut { edges })
    }

    /// `GET /v1/brokers`: the broker registry (every region's, `?region=` filters), under the
    /// fleet list's rule.
    fn list_brokers(&mut self, req: &Request, now: Instant) -> Response {
        if let Err(r) = self.fleet_allowed(req) {
            return r;
        }
        let mut brokers = self.brokers.list(now);
        if let Some(region) = req.query_param(REGION_PARAM) {
            brokers.retain(|b| b.beat.region == region);
        }
        json(200, &serde_json::json!({ "brokers": brokers }))
    }

    /// A valid API key or the edge key opens the fleet lists; without a bearer only a loopback
    /// peer gets them; a wrong key is 401.
    fn fleet_allowed(&mut self, req: &Request) -> Result<(), Response> {
        let mut keys = self.keys.load().api_keys.clone();
        if !self.edge_key.is_empty() {
            keys.push(self.edge_key.clone());
        }
        keys.extend(self.fleet_keys.iter().cloned());
        let allowed = match check_bearer(req, &keys) {
            Bearer::Valid => true,
            Bearer::Absent => req
                .peer
                .is_some_and(|p| p.ip().to_canonical().is_loopback()),
            Bearer::Wrong => false,
        };
        if !allowed {
            self.counters.unauthorized += 1;
            return Err(error(
                401,
                "the fleet list needs an API key (Authorization: Bearer <key>)",
            ));
        }
        Ok(())
    }

    /// Edge and broker heartbeats need the `edge_key` bearer, or a loopback peer without one.
    fn heartbeat_allowed(&mut self, req: &Request) -> Result<(), Response> {
        let allowed = if self.edge_key.is_empty() {
            req.peer
                .is_some_and(|p| p.ip().to_canonical().is_loopback())
        } else {
            matches!(
                check_bearer(req, std::slice::from_ref(&self.edge_key)),
                Bearer::Valid
            )
        };
        if !allowed {
            self.counters.unauthorized += 1;
            return Err(if self.edge_key.is_empty() {
                error(
                    403,
                    "heartbeats from non-loopback peers need edge_key configured",
                )
            } else {
                error(401, "bad edge key")
            });
        }
        Ok(())
    }

    fn heartbeat(&mut self, req: &Request, now: Instant) -> Response {
        if let Err(r) = self.heartbeat_allowed(req) {
            self.counters.heartbeats_refused += 1;
            return r;
        }
        let hb: Heartbeat = match serde_json::from_slice(&req.body) {
            Ok(h) => h,
            Err(e) => {
                self.counters.heartbeats_refused += 1;
                return error(400, &format!("bad heartbeat: {e}"));
            }
        };
        let node = hb.node_id.clone();
        // The edge links to exactly the live brokers of its region (cluster mode; absent
        // when no broker heartbeats here, and then the edge keeps its `broker_addrs`).
        let brokers = self.brokers.links(&hb.region, now);
        match self.registry.heartbeat(hb, now) {
            Ok(fresh) => {
                if fresh {
                    tracing::info!(node = %node, "edge registered");
                }
                self.counters.heartbeats_accepted += 1;
                if brokers.is_empty() {
                    json(200, &serde_json::json!({"ok": true}))
                } else {
                    json(200, &serde_json::json!({"ok": true, "brokers": brokers}))
                }
            }
            Err(e) => {
                self.counters.heartbeats_refused += 1;
                let status = match e {
                    HeartbeatError::BadField(_) => 400,
                    HeartbeatError::Full => 503,
                };
                error(status, &e.to_string())
            }
        }
    }

    /// `POST /v1/brokers/heartbeat` (cluster mode): a broker says it is alive and where edges
    /// link to it.
    fn broker_heartbeat(&mut self, req: &Request, now: Instant) -> Response {
        if let Err(r) = self.heartbeat_allowed(req) {
            self.counters.broker_heartbeats_refused += 1;
            return r;
        }
        let beat: crate::brokers::BrokerBeat = match serde_json::from_slice(&req.body) {
            Ok(b) => b,
            Err(e) => {
                self.counters.broker_heartbeats_refused += 1;
                return error(400, &format!("bad broker heartbeat: {e}"));
            }
        };
        let node = beat.node_id.clone();
        match self.brokers.heartbeat(beat, now) {
            Ok(fresh) => {
                if fresh {
                    tracing::info!(node = %node, "broker registered");
                }
                self.counters.broker_heartbeats_accepted += 1;
                json(200, &serde_json::json!({"ok": true}))
            }
            Err(e) => {
                self.counters.broker_heartbeats_refused += 1;
                let status = match e {
                    crate::brokers::BrokerBeatError::BadField(_) => 400,
                    crate::brokers::BrokerBeatError::Full => 503,
                };
                error(status, &e.to_string())
            }
        }
    }

    /// Per region: up edges and whether it is assigned; per peer control: up, polls, key match.
    fn region_metrics(&self, w: &mut net::metrics::Writer, now: Instant) {
        let up = self.registry.up_by_region(now);
        w.family(
            "barrage_control_region_edges_up",
            "gauge",
            "Assignable edges per region (heard here or from peers).",
        );
        for (region, n) in &up {
            w.sample(
                "barrage_control_region_edges_up",
                &[("region", region)],
                *n as f64,
            );
        }
        w.family(
            "barrage_control_region_assignable",
            "gauge",
            "1 when a region gets clients: an up edge and, if it ever had brokers, a live one \
             whose backbone is up.",
        );
        for (region, n) in &up {
            let ok = *n > 0 && self.brokers.region_ok(region, now);
            w.sample(
                "barrage_control_region_assignable",
                &[("region", region)],
                f64::from(u8::from(ok)),
            );
        }
        if self.peers.list.is_empty() {
            return;
        }
        w.family(
            "barrage_control_peer_up",
            "gauge",
            "1 while the peer control (another region's) answered a poll recently.",
        );
        for (i, p) in self.peers.list.iter().enumerate() {
            w.sample(
                "barrage_control_peer_up",
                &[("peer", &p.addr), ("region", &p.region)],
                f64::from(u8::from(self.peers.up(i, now))),
            );
        }
        w.family(
            "barrage_control_peer_polls_total",
            "counter",
            "Polls of peer controls' registries, by outcome.",
        );
        for p in &self.peers.list {
            for (outcome, n) in [("ok", p.polls_ok), ("failed", p.polls_failed)] {
                w.sample(
                    "barrage_control_peer_polls_total",
                    &[("peer", &p.addr), ("outcome", outcome)],
                    n as f64,
                );
            }
        }
        w.family(
            "barrage_control_peer_entries_refused_total",
            "counter",
            "Edges and brokers in peers' answers refused (bad fields, registry full).",
        );
        for p in &self.peers.list {
            w.sample(
                "barrage_control_peer_entries_refused_total",
                &[("peer", &p.addr)],
                p.entries_refused as f64,
            );
        }
        w.family(
            "barrage_control_peer_token_keys_match",
            "gauge",
            "1 when the peer signs with the same token key set (ids and fingerprints), 0 when not (rotation half done), absent before it answers.",
        );
        for p in &self.peers.list {
            if let Some(m) = p.keys_match {
                w.sample(
                    "barrage_control_peer_token_keys_match",
                    &[("peer", &p.addr)],
                    f64::from(u8::from(m)),
                );
            }
        }
    }

    fn metrics(&mut self, now: Instant) -> Response {
        self.registry.forget(now);
        let mut w = net::metrics::Writer::default();
        w.family(
            "barrage_control_requests_total",
            "counter",
            "HTTP requests by route.",
        );
        let api = ROUTES.iter().zip(self.counters.requests);
        let pages = crate::pages::ROUTES.iter().zip(self.counters.page_requests);
        for (route, n) in api.chain(pages) {
            w.sample(
                "barrage_control_requests_total",
                &[("route", route)],
                n as f64,
            );
        }
        let c = &self.counters;
        w.metric(
            "barrage_control_tokens_issued_total",
            "counter",
            "Tokens issued, by kind.",
            &[
                (&[("kind", "user")], c.tokens_user as f64),
                (&[("kind", "guest")], c.tokens_guest as f64),
            ],
        );
        w.metric(
            "barrage_control_unauthorized_total",
            "counter",
            "Requests refused for a missing or wrong key.",
            &[(&[], c.unauthorized as f64)],
        );
        w.metric(
            "barrage_control_heartbeats_total",
            "counter",
            "Edge heartbeats, by outcome.",
            &[
                (&[("outcome", "accepted")], c.heartbeats_accepted as f64),
                (&[("outcome", "refused")], c.heartbeats_refused as f64),
            ],
        );
        w.metric(
            "barrage_control_assignments_empty_total",
            "counter",
            "Token answers with no edge to offer.",
            &[(&[], c.assignments_empty as f64)],
        );
        w.metric(
            "barrage_control_assignments_total",
            "counter",
            "Token answers by where the first edge is: the client's region, another (fallback), none.",
            &[
                (&[("choice", "home")], c.assignments_home as f64),
                (&[("choice", "fallback")], c.assignments_fallback as f64),
                (&[("choice", "empty")], c.assignments_empty as f64),
            ],
        );
        w.metric(
            "barrage_control_region_unknown_total",
            "counter",
            "Client region names nobody knows, by source; such clients get default_region.",
            &[
                (&[("source", "param")], c.region_unknown_param as f64),
                (&[("source", "header")], c.region_unknown_header as f64),
            ],
        );
        w.metric(
            "barrage_control_broker_heartbeats_total",
            "counter",
            "Broker heartbeats (cluster mode), by outcome.",
            &[
                (
                    &[("outcome", "accepted")],
                    c.broker_heartbeats_accepted as f64,
                ),
                (
                    &[("outcome", "refused")],
                    c.broker_heartbeats_refused as f64,
                ),
            ],
        );
        let (alive, backbone_down, dead) = self.brokers.counts(now);
        w.metric(
            "barrage_control_brokers",
            "gauge",
            "Known brokers (cluster mode) by state: up, backbone_down (heartbeating, but its \
             NATS does not take its writes: not counted for assignment), dead.",
            &[
                (&[("state", "up")], alive as f64),
                (&[("state", "backbone_down")], backbone_down as f64),
                (&[("state", "dead")], dead as f64),
            ],
        );
        self.region_metrics(&mut w, now);
        w.family("barrage_control_edges", "gauge", "Known edges by state.");
        for (state, n) in self.registry.counts(now) {
            let label = match state {
                EdgeState::Up => "up",
                EdgeState::Draining => "draining",
                EdgeState::Full => "full",
                EdgeState::Dead => "dead",
            };
            w.sample("barrage_control_edges", &[("state", label)], n as f64);
        }
        w.family(
            "barrage_control_request_duration_seconds",
            "histogram",
            "Time control took to answer, by route and status.",
        );
        for ((route, status), h) in &self.durations {
            let status = status.to_string();
            w.histogram(
                "barrage_control_request_duration_seconds",
                &[("route", route), ("status", &status)],
                &[h],
                1e-6,
            );
        }
        self.http_stats.write_metrics(&mut w, "barrage_control");
        net::metrics::write_process(&mut w, "control");
        net::metrics::response(w.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RegionRule, RoomEntry};
    use proto::token::KeySet;
    use serde_json::{json, Value};

    const KEYS: &str = "1:0123456789abcdef0123,2:fedcba9876543210fedc";

    fn config() -> Config {
        Config {
            api_keys: vec!["secret-key".into()],
            token_keys: KEYS.into(),
            regions: vec![RegionRule {
                cidr: "10.0.0.0/8".into(),
                region: "sh".into(),
            }],
            rooms: vec![RoomEntry {
                room_id: 21_000,
                short_id: 5,
                uid: 9,
                area: 2,
            }],
            ..Config::default()
        }
    }

    fn req(method: &str, path: &str, query: &[(&str, &str)], body: &str, peer: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            query: query
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            headers: Vec::new(),
            body: body.as_bytes().to_vec(),
            peer: Some(peer.parse().unwrap()),
        }
    }

    fn with_header(mut r: Request, k: &str, v: &str) -> Request {
        r.headers.push((k.to_string(), v.to_string()));
        r
    }

    fn body(r: &Response) -> Value {
        serde_json::from_slice(&r.body).unwrap()
    }

    fn hb(id: &str, region: &str, conns: u64, draining: bool) -> String {
        format!(
            r#"{{"node_id":"{id}","region":"{region}","host":"{id}.host","tcp_port":2243,"ws_port":2244,"wss_port":0,"connections":{conns},"capacity":1000,"draining":{draining}}}"#
        )
    }

    const LOOP: &str = "127.0.0.1:5000";

    /// Regression (issue 17, defect 5): the fleet list (hosts, load) was served to anyone on the
    /// public port. Now: an API key or the edge key, or a loopback peer.
    #[test]
    fn the_fleet_list_needs_a_key_off_loopback() {
        let mut c = config();
        c.edge_key = "edge-key-0123456789abcdef0123456789".into();
        let mut api = Api::new(&c).unwrap();
        let t0 = Instant::now();
        let remote = "10.1.2.3:4000";
        let r = api.handle(&req("GET", "/v1/edges", &[], "", remote), t0, 0);
        assert_eq!(r.status, 401);
        assert_eq!(body(&r)["error"], "unauthorized");
        for key in ["secret-key", "edge-key-0123456789abcdef0123456789"] {
            let r = api.handle(
                &with_header(
                    req("GET", "/v1/edges", &[], "", remote),
                    "authorization",
                    &format!("Bearer {key}"),
                ),
                t0,
                0,
            );
            assert_eq!(r.status, 200, "{key}");
        }
        let wrong = with_header(
            req("GET", "/v1/edges", &[], "", LOOP),
            "authorization",
            "Bearer nope",
        );
        assert_eq!(api.handle(&wrong, t0, 0).status, 401);
        assert_eq!(
            api.handle(&req("GET", "/v1/edges", &[], "", LOOP), t0, 0)
                .status,
            200
        );
        // A heartbeat from off loopback needs the edge key.
        let beat = req(
            "POST",
            "/v1/edges/heartbeat",
            &[],
            &hb("e9", "local", 0, false),
            remote,
        );
        assert_eq!(api.handle(&beat, t0, 0).status, 401);
        let beat = with_header(
            beat,
            "authorization",
            "Bearer edge-key-0123456789abcdef0123456789",
        );
        assert_eq!(api.handle(&beat, t0, 0).status, 200);
    }

    /// One edge heartbeat from loopback, as `hb` describes it.
    fn beat(
        api: &mut Api,
        id: &str,
        region: &str,
        conns: u64,
        draining: bool,
        now: Instant,
    ) -> Response {
        api.handle(
            &req(
                "POST",
                "/v1/edges/heartbeat",
                &[],
                &hb(id, region, conns, draining),
                LOOP,
            ),
            now,
            0,
        )
    }

    #[test]
    fn edges_are_told_the_live_brokers_of_their_region() {
        let mut api = Api::new(&config()).unwrap();
        let t0 = Instant::now();
        let broker = |id: &str, region: &str| {
            format!(
                r#"{{"node_id":"{id}","region":"{region}","link":"10.0.0.1:7401","ingest":"10.0.0.1:7400","http":"http://10.0.0.1:7480"}}"#
            )
        };
        // No broker heartbeats: the answer is as before (the edge keeps broker_addrs).
        assert_eq!(
            body(&beat(&mut api, "e1", "eu", 0, false, t0)),
            json!({"ok": true})
        );
        let r = api.handle(
            &req(
                "POST",
                "/v1/brokers/heartbeat",
                &[],
                &broker("b1", "eu"),
                LOOP,
            ),
            t0,
            0,
        );
        assert_eq!(r.status, 200);
        api.handle(
            &req(
                "POST",
                "/v1/brokers/heartbeat",
                &[],
                &broker("b2", "us"),
                LOOP,
            ),
            t0,
            0,
        );
        let a = body(&beat(&mut api, "e1", "eu", 0, false, t0));
        assert_eq!(
            a["brokers"],
            json!([{"node_id": "b1", "link": "10.0.0.1:7401"}])
        );
        // Bad input is refused and counted; off loopback without the edge key, 403.
        let r = api.handle(
            &req(
                "POST",
                "/v1/brokers/heartbeat",
                &[],
                "{\"node_id\":1}",
                LOOP,
            ),
            t0,
            0,
        );
        assert_eq!(r.status, 400);
        let r = api.handle(
            &req(
                "POST",
                "/v1/brokers/heartbeat",
                &[],
                &broker("b3", "eu"),
                "10.9.9.9:5000",
            ),
            t0,
            0,
        );
        assert_eq!(r.status, 403);
        let listed = body(&api.handle(&req("GET", "/v1/brokers", &[], "", LOOP), t0, 0));
        assert_eq!(listed["brokers"].as_array().unwrap().len(), 2);
        // Silent past edge_ttl_ms: no longer handed to edges.
        let later = t0 + Duration::from_millis(config().edge_ttl_ms + 1);
        let a = body(&beat(&mut api, "e1", "eu", 0, false, later));
        assert!(a.get("brokers").is_none(), "{a}");
    }

    #[test]
    fn connect_needs_a_key_except_for_guests() {
        let mut api = Api::new(&config()).unwrap();
        let t0 = Instant::now();
        let r = api.handle(
            &req(
                "POST",
                "/v1/connect",
                &[],
                r#"{"room":1,"uid":7,"device":"d"}"#,
                LOOP,
            ),
            t0,
            1000,
        );
        assert_eq!(r.status, 401);
        let wrong = with_header(
            req("POST", "/v1/connect", &[], r#"{"room":1,"uid":0}"#, LOOP),
            "authorization",
            "Bearer nope",
        );
        assert_eq!(
            api.handle(&wrong, t0, 1000).status,
            401,
            "a wrong key is refused even for a guest"
        );
        let guest = api.handle(
            &req(
                "POST",
                "/v1/connect",
                &[],
                r#"{"room":1,"uid":0,"device":"d"}"#,
                LOOP,
            ),
            t0,
            1000,
        );
        assert_eq!(guest.status, 200);
        let ok = with_header(
            req(
                "POST",
                "/v1/connect",
                &[],
                r#"{"room":5,"uid":7,"device":"dev"}"#,
                LOOP,
            ),
            "authorization",
            "Bearer secret-key",
        );
        let r = api.handle(&ok, t0, 1000);
        assert_eq!(r.status, 200);
        let v = body(&r);
        assert_eq!(v["expires_at"], 1000 + 3600);
        assert_eq!(v["room"], 21_000, "short id 5 resolves to the real room");
        assert_eq!(v["edges"], serde_json::json!([]));
        let keys = KeySet::parse(KEYS).unwrap();
        let t = keys.verify(v["token"].as_str().unwrap(), 1000).unwrap();
        assert_eq!(t.key_id, 2);
        assert_eq!(t.claims.uid.0, 7);
        assert_eq!(t.claims.room.0, 21_000);
        assert_eq!(t.claims.area.0, 2, "area from the room table");
        assert_eq!(t.claims.device.0, "dev");
        assert_eq!(
            api.handle(&req("POST", "/v1/connect", &[], "not json", LOOP), t0, 1000)
                .status,
            400
        );
        let long = format!(r#"{{"room":1,"uid":0,"device":"{}"}}"#, "x".repeat(65));
        assert_eq!(
            api.handle(&req("POST", "/v1/connect", &[], &long, LOOP), t0, 1000)
                .status,
            400
        );
        assert_eq!(
            api.handle(
                &req("POST", "/v1/connect", &[], r#"{"room":0}"#, LOOP),
                t0,
                1000
            )
            .status,
            404
        );
        assert_eq!(
            api.handle(&req("GET", "/v1/connect", &[], "", LOOP), t0, 1000)
                .status,
            405
        );
    }

    #[test]
    fn assignment_by_cidr_header_and_default() {
        let mut cfg = config();
        cfg.trust_region_header = true;
        let mut api = Api::new(&cfg).unwrap();
        let t0 = Instant::now();
        for (id, region, conns) in [
            ("l1", "local", 10),
            ("l2", "local", 5),
            ("s1", "sh", 500),
            ("b1", "bj", 0),
        ] {
            let r = beat(&mut api, id, region, conns, false, t0);
            assert_eq!(r.status, 200);
            assert_eq!(body(&r), serde_json::json!({"ok": true}));
        }
        let connect = r#"{"room":1,"uid":0}"#;
        let hosts = |r: &Response| -> Vec<String> {
            body(r)["edges"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["host"].as_str().unwrap().to_string())
                .collect()
        };
        // Its own region first, then one edge of the next-best region (fallback_edges = 1).
        let local = api.handle(&req("POST", "/v1/connect", &[], connect, LOOP), t0, 0);
        assert_eq!(hosts(&local), ["l2.host", "l1.host", "b1.host"]);
        assert_eq!(
            body(&local)["edges"][0],
            serde_json::json!({"host":"l2.host","tcp_port":2243,"ws_port":2244,"wss_port":0,"region":"local"})
        );
        // A region with fewer edges than its share: the rest from the others, the region
        // with the most spare capacity first.
        let sh = api.handle(
            &req("POST", "/v1/connect", &[], connect, "10.9.9.9:1"),
            t0,
            0,
        );
        assert_eq!(hosts(&sh), ["s1.host", "l2.host", "l1.host"]);
        let bj = with_header(
            req("POST", "/v1/connect", &[], connect, "10.9.9.9:1"),
            REGION_HEADER,
            "bj",
        );
        assert_eq!(
            hosts(&api.handle(&bj, t0, 0)),
            ["b1.host", "l2.host", "l1.host"]
        );
        // `?region=` beats the header and the CIDR table.
        let param = with_header(
            req(
                "POST",
                "/v1/connect",
                &[("region", "sh")],
                connect,
                "10.9.9.9:1",
            ),
            REGION_HEADER,
            "bj",
        );
        assert_eq!(hosts(&api.handle(&param, t0, 0))[0], "s1.host");
        // A region nobody knows ("gz", or a malformed name): the default region, counted.
        let gz = with_header(
            req("POST", "/v1/connect", &[], connect, LOOP),
            REGION_HEADER,
            "gz",
        );
        assert_eq!(hosts(&api.handle(&gz, t0, 0))[0], "l2.host");
        let odd = req(
            "GET",
            "/xlive/web-room/v1/index/getDanmuInfo",
            &[("id", "1"), ("region", "<script>")],
            "",
            "10.9.9.9:1",
        );
        let r = body(&api.handle(&odd, t0, 0));
        assert_eq!(r["data"]["host_list"][0]["host"], "l2.host", "{r}");
        let m = String::from_utf8(
            api.handle(&req("GET", "/metrics", &[], "", LOOP), t0, 0)
                .body,
        )
        .unwrap();
        for line in [
            "barrage_control_region_unknown_total{source=\"param\"} 1\n",
            "barrage_control_region_unknown_total{source=\"header\"} 1\n",
            "barrage_control_assignments_total{choice=\"home\"} 6\n",
            "barrage_control_region_edges_up{region=\"sh\"} 1\n",
            "barrage_control_region_assignable{region=\"bj\"} 1\n",
        ] {
            assert!(m.contains(line), "{line} in {m}");
        }
    }

    #[test]
    fn a_region_whose_brokers_are_gone_is_not_assigned() {
        let mut api = Api::new(&config()).unwrap();
        let t0 = Instant::now();
        beat(&mut api, "l1", "local", 0, false, t0);
        beat(&mut api, "b1", "bj", 0, false, t0);
        let broker = r#"{"node_id":"br1","region":"local","link":"10.0.0.1:7401","ingest":"10.0.0.1:7400","http":"http://10.0.0.1:7480"}"#;
        let r = api.handle(
            &req("POST", "/v1/brokers/heartbeat", &[], broker, LOOP),
            t0,
            0,
        );
        assert_eq!(r.status, 200);
        let first = |api: &mut Api, now| {
            body(&api.handle(
                &req("POST", "/v1/connect", &[], r#"{"room":1}"#, LOOP),
                now,
                0,
            ))["edges"][0]["host"]
                .clone()
        };
        assert_eq!(first(&mut api, t0), "l1.host");
        // The broker goes silent, the edges keep heartbeating: local is not assigned, bj
        // (which never had a broker here: embedded) is.
        let t1 = t0 + Duration::from_millis(config().edge_ttl_ms);
        beat(&mut api, "l1", "local", 0, false, t1);
        beat(&mut api, "b1", "bj", 0, false, t1);
        assert_eq!(first(&mut api, t1), "b1.host");
        let m = String::from_utf8(
            api.handle(&req("GET", "/metrics", &[], "", LOOP), t1, 0)
                .body,
        )
        .unwrap();
        assert!(
            m.contains("barrage_control_region_assignable{region=\"local\"} 0\n"),
            "{m}"
        );
        assert!(
            m.contains("barrage_control_assignments_total{choice=\"fallback\"} 1\n"),
            "{m}"
        );
    }

    #[test]
    fn the_registry_export_lists_what_heartbeats_here_with_key_prints() {
        let mut c = config();
        c.fleet_keys = vec!["fleet-key-0123456789abcdef0123456789".into()];
        let mut api = Api::new(&c).unwrap();
        let fleet = |r: Request| {
            with_header(
                r,
                "authorization",
                "Bearer fleet-key-0123456789abcdef0123456789",
            )
        };
        let t = Instant::now();
        let remote = "10.1.1.1:1";
        assert_eq!(
            api.handle(&fleet(req("GET", "/v1/registry", &[], "", remote)), t, 0)
                .status,
            200
        );
        assert_eq!(
            api.handle(&fleet(req("GET", "/v1/edges", &[], "", remote)), t, 0)
                .status,
            200
        );
        let connect = fleet(req(
            "POST",
            "/v1/connect",
            &[],
            r#"{"room":1,"uid":5}"#,
            remote,
        ));
        assert_eq!(
            api.handle(&connect, t, 0).status,
            401,
            "a fleet key mints no tokens"
        );
        let fake = fleet(req(
            "POST",
            "/v1/edges/heartbeat",
            &[],
            &hb("x", "local", 0, false),
            remote,
        ));
        assert_eq!(api.handle(&fake, t, 0).status, 403, "nor registers edges");
        let t0 = Instant::now();
        beat(&mut api, "l1", "local", 0, false, t0);
        api.peer_answered(
            0,
            Ok(br#"{"region":"x","edges":[],"brokers":[],"token_keys":[]}"#.to_vec()),
            t0,
        );
        let r = api.handle(&req("GET", "/v1/registry", &[], "", "10.1.1.1:1"), t0, 0);
        assert_eq!(r.status, 401, "off loopback without a key");
        let r = api.handle(&req("GET", "/v1/registry", &[], "", LOOP), t0, 0);
        let x: crate::peers::Export = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(x.region, "local");
        assert_eq!(x.edges.len(), 1);
        assert_eq!(
            x.token_keys.iter().map(|k| k.id).collect::<Vec<_>>(),
            [1, 2]
        );
        assert_eq!(
            x.token_keys,
            crate::peers::key_prints(&KeySet::parse(KEYS).unwrap())
        );
    }

    #[test]
    fn region_header_ignored_unless_trusted() {
        let mut api = Api::new(&config()).unwrap();
        let t0 = Instant::now();
        beat(&mut api, "l1", "local", 0, false, t0);
        beat(&mut api, "b1", "bj", 0, false, t0);
        let bj = with_header(
            req("POST", "/v1/connect", &[], r#"{"room":1}"#, LOOP),
            REGION_HEADER,
            "bj",
        );
        assert_eq!(body(&api.handle(&bj, t0, 0))["edges"][0]["host"], "l1.host");
    }

    #[test]
    fn draining_and_dead_edges_leave_the_answer() {
        let mut api = Api::new(&config()).unwrap();
        let t0 = Instant::now();
        beat(&mut api, "a", "local", 0, false, t0);
        beat(&mut api, "b", "local", 100, false, t0);
        let info = req(
            "GET",
            "/xlive/web-room/v1/index/getDanmuInfo",
            &[("id", "1"), ("type", "0")],
            "",
            LOOP,
        );
        let hosts = |api: &mut Api, now: Instant| -> Vec<String> {
            let v = body(&api.handle(&info, now, 0));
            v["data"]["host_list"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["host"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(hosts(&mut api, t0), ["a.host", "b.host"]);
        beat(&mut api, "a", "local", 0, true, t0);
        assert_eq!(hosts(&mut api, t0), ["b.host"]);
        let later = t0 + Duration::from_millis(3000);
        beat(&mut api, "a", "local", 0, true, later);
        // b's heartbeats stopped at t0: dead once edge_ttl_ms (6000) has passed.
        assert_eq!(
            hosts(&mut api, t0 + Duration::from_millis(6000)),
            Vec::<String>::new()
        );
        let list = body(&api.handle(
            &req("GET", "/v1/edges", &[], "", LOOP),
            t0 + Duration::from_millis(6000),
            0,
        ));
        assert_eq!(list["edges"][0]["node_id"], "a");
        assert_eq!(list["edges"][0]["state"], "draining");
        assert_eq!(list["edges"][1]["state"], "dead");
        assert_eq!(list["edges"][1]["connections"], 100);
        let m = api.handle(
            &req("GET", "/metrics", &[], "", LOOP),
            t0 + Duration::from_millis(6000),
            0,
        );
        let text = String::from_utf8(m.body).unwrap();
        assert!(
            text.contains("barrage_control_edges{state=\"dead\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("barrage_control_edges{state=\"draining\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("barrage_control_heartbeats_total{outcome=\"accepted\"} 4\n"),
            "{text}"
        );
        assert!(
            text.contains("barrage_control_assignments_empty_total 1\n"),
            "{text}"
        );
    }

    #[test]
    fn heartbeat_auth_loopback_or_edge_key() {
        let mut api = Api::new(&config()).unwrap();
        let t0 = Instant::now();
        let remote = req(
            "POST",
            "/v1/edges/heartbeat",
            &[],
            &hb("a", "x", 0, false),
            "192.0.2.1:1",
        );
        assert_eq!(api.handle(&remote, t0, 0).status, 403);
        let mapped = req(
            "POST",
            "/v1/edges/heartbeat",
            &[],
            &hb("a", "x", 0, false),
            "[::ffff:127.0.0.1]:1",
        );
        assert_eq!(api.handle(&mapped, t0, 0).status, 200);
        assert_eq!(
            api.handle(&req("POST", "/v1/edges/heartbeat", &[], "{}", LOOP), t0, 0)
                .status,
            400
        );
        assert_eq!(beat(&mut api, "", "x", 0, false, t0).status, 400);

        let mut cfg = config();
        cfg.edge_key = "ek".into();
        let mut api = Api::new(&cfg).unwrap();
        let from_loop = req(
            "POST",
            "/v1/edges/heartbeat",
            &[],
            &hb("a", "x", 0, false),
            LOOP,
        );
        assert_eq!(
            api.handle(&from_loop, t0, 0).status,
            401,
            "with edge_key set, loopback is not enough"
        );
        let keyed = with_header(remote.clone(), "authorization", "Bearer ek");
        assert_eq!(api.handle(&keyed, t0, 0).status, 200);
        let wrong = with_header(remote, "authorization", "Bearer ek2");
        assert_eq!(api.handle(&wrong, t0, 0).status, 401);
    }

    /// Issue 11: the UDP and TLS-over-TCP ports are listed (fields of ours) only for edges
    /// that serve them; the Bilibili fields stay as they are.
    #[test]
    fn discovery_lists_udp_and_tls_tcp_only_when_served() {
        let mut api = Api::new(&config()).unwrap();
        let t0 = Instant::now();
        let served = r#"{"node_id":"u","region":"local","host":"u.host","tcp_port":2243,"ws_port":2244,"wss_port":2245,"tls_tcp_port":2247,"udp_port":2246,"connections":0,"capacity":1000,"draining":false}"#;
        let r = api.handle(
            &req("POST", "/v1/edges/heartbeat", &[], served, LOOP),
            t0,
            0,
        );
        assert_eq!(r.status, 200);
        let info = |api: &mut Api| {
            let r = api.handle(
                &req(
                    "GET",
                    "/xlive/web-room/v1/index/getDanmuInfo",
                    &[("id", "5"), ("type", "0")],
                    "",
                    LOOP,
                ),
                t0,
                50,
            );
            body(&r)["data"]["host_list"][0].clone()
        };
        let h = info(&mut api);
        assert_eq!(
            (
                h["udp_port"].as_u64(),
                h["tls_tcp_port"].as_u64(),
                h["wss_port"].as_u64()
            ),
            (Some(2246), Some(2247), Some(2245))
        );
        let mut api = Api::new(&config()).unwrap();
        beat(&mut api, "a", "local", 0, false, t0);
        let h = info(&mut api);
        assert!(
            h.get("udp_port").is_none() && h.get("tls_tcp_port").is_none(),
            "{h}"
        );
    }

    #[test]
    fn discovery_shapes_match_bilibili() {
        let mut api = Api::new(&config()).unwrap();
        let t0 = Instant::now();
        beat(&mut api, "a", "local", 0, false, t0);
        let r = api.handle(
            &req(
                "GET",
                "/xlive/web-room/v1/index/getDanmuInfo",
                &[("id", "5"), ("type", "0")],
                "",
                LOOP,
            ),
            t0,
            50,
        );
        assert_eq!(r.status, 200);
        let text = String::from_utf8(r.body.clone()).unwrap();
        let token = body(&r)["data"]["token"].as_str().unwrap().to_string();
        // Byte for byte, key order included (DESIGN §3).
        let want = format!(
            r#"{{"code":0,"message":"0","ttl":1,"data":{{"group":"live","business_id":0,"refresh_row_factor":0.125,"refresh_rate":100,"max_delay":5000,"token":"{token}","host_list":[{{"host":"a.host","port":2243,"wss_port":0,"ws_port":2244}}]}}}}"#
        );
        assert_eq!(text, want);
        let claims = KeySet::parse(KEYS)
            .unwrap()
            .verify(&token, 50)
            .unwrap()
            .claims;
        assert!(claims.uid.is_guest());
        assert_eq!(claims.room.0, 21_000);
        assert!(r
            .headers
            .iter()
            .any(|(k, v)| k == "access-control-allow-origin" && v == "*"));

        let r = api.handle(
            &req(
                "GET",
                "/xlive/web-room/v1/index/getInfoByRoom",
                &[("room_id", "5")],
                "",
                LOOP,
            ),
            t0,
            0,
        );
        let v = body(&r);
        assert_eq!(v["code"], 0);
        assert_eq!(v["data"]["room_info"]["room_id"], 21_000);
        assert_eq!(v["data"]["room_info"]["short_id"], 5);
        assert_eq!(v["data"]["room_info"]["uid"], 9);
        let r = api.handle(
            &req(
                "GET",
                "/room/v1/Room/get_info",
                &[("room_id", "21000")],
                "",
                LOOP,
            ),
            t0,
            0,
        );
        let v = body(&r);
        assert_eq!(
            (
                v["code"].as_i64(),
                v["data"]["room_id"].as_u64(),
                v["data"]["uid"].as_u64()
            ),
            (Some(0), Some(21_000), Some(9))
        );
        // Unknown rooms are themselves.
        let r = api.handle(
            &req(
                "GET",
                "/room/v1/Room/get_info",
                &[("room_id", "777")],
                "",
                LOOP,
            ),
            t0,
            0,
        );
        assert_eq!(body(&r)["data"]["room_id"], 777);
        let bad = api.handle(
            &req(
                "GET",
                "/xlive/web-room/v1/index/getDanmuInfo",
                &[("id", "x")],
                "",
                LOOP,
            ),
            t0,
            0,
        );
        assert_eq!(body(&bad)["code"], -400);
        assert_eq!(
            api.handle(&req("GET", "/nope", &[], "", LOOP), t0, 0)
                .status,
            404
        );
        assert_eq!(
            api.handle(&req("GET", "/healthz", &[], "", LOOP), t0, 0)
                .body,
            b"ok\n"
        );
    }

    #[test]
    fn strict_room_table() {
        let mut cfg = config();
        cfg.rooms_strict = true;
        let mut api = Api::new(&cfg).unwrap();
        let t0 = Instant::now();
        let r = api.handle(
            &req(
                "GET",
                "/xlive/web-room/v1/index/getInfoByRoom",
                &[("room_id", "777")],
                "",
                LOOP,
            ),
            t0,
            0,
        );
        assert_eq!(r.status, 404);
        assert_eq!(body(&r)["code"], -404);
        let r = api.handle(
            &req(
                "GET",
                "/xlive/web-room/v1/index/getDanmuInfo",
                &[("id", "777")],
                "",
                LOOP,
            ),
            t0,
            0,
        );
        assert_eq!(body(&r)["code"], -404);
        assert_eq!(
            api.handle(
                &req("POST", "/v1/connect", &[], r#"{"room":777}"#, LOOP),
                t0,
                0
            )
            .status,
            404
        );
        assert_eq!(
            api.handle(
                &req("POST", "/v1/connect", &[], r#"{"room":5}"#, LOOP),
                t0,
                0
            )
            .status,
            200
        );
    }

    #[test]
    fn bad_configs_are_refused() {
        let mut cfg = config();
        cfg.token_keys.clear();
        assert!(matches!(
            Api::new(&cfg),
            Err(crate::ControlError::Config(_))
        ));
        let mut cfg = config();
        cfg.regions[0].cidr = "10.0.0.0/40".into();
        assert!(matches!(
            Api::new(&cfg),
            Err(crate::ControlError::Config(_))
        ));
    }
}
