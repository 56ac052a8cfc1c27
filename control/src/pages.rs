//! Control's faces: the live room page, the demo send box and the operator console.
//!
//! ```text
//! GET  /                      -> 302 to /room/{demo_room}
//! GET  /room/{id}             the live room page (HTML; the browser does discovery, WS, decode)
//! GET  /assets/{file}         the pages' CSS and JavaScript, embedded in the binary
//! POST /demo/send             {"room":N,"text":"..."} -> 202 {"msg_id":".."}  (off unless demo_send)
//! GET  /console               the operator console shell (no data in it; the key is asked for)
//! GET  /console/api/edges     Bearer key: control's registry + each edge admin's link state
//! GET  /console/api/stats     Bearer key: sends, drops by reason, pushes, links (counters)
//! GET  /console/api/rooms     Bearer key: the broker's busiest rooms (`GET /v1/rooms/top`)
//! POST /console/api/push      Bearer key: {"scope":"room"|"global","room":N,"text":".."}
//! POST /console/api/drain     Bearer key: {"node_id":".."} -> the edge admin's /admin/drain
//! ```
//!
//! Invariants: nothing here is on the message path; the pages read what control, the broker
//! and the edges' admin endpoints already publish. Control holds no broker or edge credential
//! unless `[pages]` gives it one: with `broker_http` empty the console's push form and the demo
//! box answer 503, with no `edge_admins` the console shows the registry alone. Every console
//! JSON endpoint checks the API key itself; the HTML shell is public and carries no data.
//! The demo box sends only as a guest (uid 0), only into `demo_room`, and is rate limited.

use crate::api::Api;
use net::http::{Request, Response};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Longest demo danmaku, in characters (Bilibili's own limit for most viewers is 20 to 40).
pub const DEMO_TEXT_CHARS_MAX: usize = 40;
/// Longest ops notice, in characters.
pub const NOTICE_TEXT_CHARS_MAX: usize = 200;
/// Distinct peers the demo rate limiter remembers; past it the table is cleared (a flood of
/// peers then meets only the service-wide bucket).
pub const DEMO_PEERS_MAX: usize = 4096;
/// Largest metrics page read from an edge admin or the broker.
pub const SCRAPE_BYTES_MAX: usize = 1024 * 1024;

/// Route labels of the pages in `barrage_control_requests_total` and
/// `barrage_control_request_duration_seconds` (next to the API's, `api::ROUTES`).
pub const ROUTES: [&str; 11] = [
    "page_root",
    "room_page",
    "assets",
    "demo_send",
    "console",
    "console_api_edges",
    "console_api_stats",
    "console_api_rooms",
    "console_api_push",
    "console_api_drain",
    "page_other",
];

/// `[pages]` in control's config.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct PagesConfig {
    /// Serve `POST /demo/send` (off by default; `barrage up` turns it on).
    pub demo_send: bool,
    /// The only room the demo box sends to.
    pub demo_room: u64,
    /// Demo sends per second for the whole service, and the burst above it.
    pub demo_sends_per_s: u32,
    pub demo_sends_burst: u32,
    /// Demo sends per second per client address, and the burst above it.
    pub demo_peer_sends_per_s: u32,
    pub demo_peer_sends_burst: u32,
    /// The broker's HTTP API (`host:port`) for the demo box and the console's push form;
    /// empty: neither can push.
    pub broker_http: String,
    /// The broker API key control pushes with (room and global scopes are enough).
    pub broker_key: String,
    /// Edge admin endpoints the console reads link state from and drains.
    pub edge_admins: Vec<EdgeAdmin>,
    /// Bearer key for the edges' admin endpoints, when they want one.
    pub edge_admin_key: String,
    /// Timeout of one request to the broker or an edge admin.
    pub fetch_ms_max: u64,
}

/// One `[[pages.edge_admins]]` entry: which admin address belongs to which registered edge.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EdgeAdmin {
    pub node_id: String,
    /// `host:port` of the edge's admin HTTP.
    pub addr: String,
}

impl Default for PagesConfig {
    fn default() -> Self {
        PagesConfig {
            demo_send: false,
            demo_room: 1,
            demo_sends_per_s: 5,
            demo_sends_burst: 10,
            demo_peer_sends_per_s: 1,
            demo_peer_sends_burst: 3,
            broker_http: String::new(),
            broker_key: String::new(),
            edge_admins: Vec::new(),
            edge_admin_key: String::new(),
            fetch_ms_max: 2000,
        }
    }
}

/// The embedded assets: name, content type, bytes.
const ASSETS: [(&str, &str, &[u8]); 5] = [
    (
        "room.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/room.js"),
    ),
    (
        "console.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/console.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_bytes!("../assets/style.css"),
    ),
    (
        "favicon.svg",
        "image/svg+xml",
        include_bytes!("../assets/favicon.svg"),
    ),
    (
        "protocol.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/protocol.js"),
    ),
];
const ROOM_HTML: &str = include_str!("../assets/room.html");
/// Rooms the console's busiest-rooms table shows.
const CONSOLE_ROOMS_MAX: usize = 20;

const CONSOLE_HTML: &str = include_str!("../assets/console.html");

/// A token bucket; sans-io (`now` passed in).
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: u32, now: Instant) -> Bucket {
        Bucket {
            tokens: f64::from(burst),
            at: now,
        }
    }

    /// Takes one token if there is one.
    fn take(&mut self, per_s: u32, burst: u32, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * f64::from(per_s)).min(f64::from(burst));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Why a demo send was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DemoError {
    /// The demo box is off on this control (`[pages] demo_send = false`).
    #[error("the demo send box is off on this server")]
    Off,
    /// The body is not `{"room":N,"text":"..."}`. The caller's fault.
    #[error("body must be JSON {{\"room\":N,\"text\":\"...\"}}")]
    Malformed,
    /// The room is not the demo room. The caller's fault.
    #[error("the demo box only sends to room {0}")]
    WrongRoom(u64),
    /// Empty text, or longer than `DEMO_TEXT_CHARS_MAX`. The caller's fault.
    #[error("text must be 1 to {DEMO_TEXT_CHARS_MAX} characters")]
    BadText,
    /// Over this peer's or the service's rate. Retry after a second.
    #[error("too many demo messages, wait a moment")]
    RateLimited,
}

impl DemoError {
    fn status(&self) -> u16 {
        match self {
            DemoError::Off => 404,
            DemoError::RateLimited => 429,
            DemoError::Malformed | DemoError::WrongRoom(_) | DemoError::BadText => 400,
        }
    }
}

#[derive(Deserialize)]
struct DemoBody {
    room: u64,
    text: String,
}

/// The demo box's decisions: validation, rate limits and the message it sends.
#[derive(Debug)]
pub struct Demo {
    config: PagesConfig,
    all: Bucket,
    peers: HashMap<IpAddr, Bucket>,
    sent: u64,
}

impl Demo {
    pub fn new(config: &PagesConfig, now: Instant) -> Demo {
        Demo {
            config: config.clone(),
            all: Bucket::full(config.demo_sends_burst, now),
            peers: HashMap::new(),
            sent: 0,
        }
    }

    /// Checks one request and returns `(room, DANMU_MSG body)` to push as a guest.
    pub fn accept(
        &mut self,
        body: &[u8],
        peer: Option<IpAddr>,
        now: Instant,
    ) -> Result<(u64, Vec<u8>), DemoError> {
        let c = &self.config;
        if !c.demo_send {
            return Err(DemoError::Off);
        }
        let b: DemoBody = serde_json::from_slice(body).map_err(|_| DemoError::Malformed)?;
        if b.room != c.demo_room {
            return Err(DemoError::WrongRoom(c.demo_room));
        }
        let text = b.text.trim();
        let chars = text.chars().count();
        if chars == 0 || chars > DEMO_TEXT_CHARS_MAX || text.chars().any(char::is_control) {
            return Err(DemoError::BadText);
        }
        if let Some(ip) = peer {
            if self.peers.len() >= DEMO_PEERS_MAX && !self.peers.contains_key(&ip) {
                self.peers.clear();
            }
            let bucket = self
                .peers
                .entry(ip)
                .or_insert_with(|| Bucket::full(c.demo_peer_sends_burst, now));
            if !bucket.take(c.demo_peer_sends_per_s, c.demo_peer_sends_burst, now) {
                return Err(DemoError::RateLimited);
            }
        }
        if !self.all.take(c.demo_sends_per_s, c.demo_sends_burst, now) {
            return Err(DemoError::RateLimited);
        }
        self.sent += 1;
        Ok((b.room, danmu_msg(text, "guest", 0xFFFFFF)))
    }
}

/// A `DANMU_MSG` body in Bilibili's shape: `info[0]` mode/size/colour, `info[1]` the text,
/// `info[2]` `[uid, name]` (uid 0: a guest).
pub fn danmu_msg(text: &str, name: &str, color: u32) -> Vec<u8> {
    serde_json::json!({
        "cmd": "DANMU_MSG",
        "info": [[0, 1, 25, color, 0, 0, 0, "", 0, 0, 0, "", 0], text, [0, name, 0, 0, 0, 10000, 1, ""]]
    })
    .to_string()
    .into_bytes()
}

/// One sample of a Prometheus text page: name, labels, value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Reads the samples of a Prometheus text page; lines it cannot read are skipped (a scrape
/// is for display, and one odd line must not hide the rest).
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(p) => p,
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, Vec::new()),
            Some((name, rest)) => {
                let Some(inner) = rest.strip_suffix('}') else {
                    continue;
                };
                (name, parse_labels(inner))
            }
        };
        out.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    out
}

fn parse_labels(inner: &str) -> Vec<(String, String)> {
    // Our writers never put `",` inside a label value, so splitting on it is exact here.
    inner
        .split("\",")
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        })
        .collect()
}

fn sum(samples: &[Sample], name: &str) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .map(|s| s.value)
        .sum()
}

fn by_label(samples: &[Sample], name: &str, label: &str, into: &mut BTreeMap<String, f64>) {
    for s in samples.iter().filter(|s| s.name == name) {
        if let Some((_, v)) = s.labels.iter().find(|(k, _)| k == label) {
            *into.entry(v.clone()).or_default() += s.value;
        }
    }
}

/// One edge admin's view, as the console shows it.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct AdminView {
    pub reachable: bool,
    pub links_up: u64,
    pub links: u64,
    pub rooms: u64,
    pub sends_total: f64,
    pub drops: BTreeMap<String, f64>,
}

impl AdminView {
    /// Summarises an edge's `/metrics` page.
    pub fn from_metrics(text: &str) -> AdminView {
        let s = parse_metrics(text);
        let links: Vec<&Sample> = s
            .iter()
            .filter(|x| x.name == "barrage_edge_link_up")
            .collect();
        let mut drops = BTreeMap::new();
        by_label(&s, "barrage_edge_drops_total", "reason", &mut drops);
        AdminView {
            reachable: true,
            links_up: links.iter().filter(|x| x.value >= 1.0).count() as u64,
            links: links.len() as u64,
            rooms: sum(&s, "barrage_edge_rooms") as u64,
            sends_total: sum(&s, "barrage_edge_sends_total"),
            drops,
        }
    }
}

/// The console's counters (`GET /console/api/stats`); the page turns them into rates.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct StatsOut {
    /// Milliseconds since control started, so the page can compute rates between polls.
    pub at_ms: u64,
    /// Batch sends to viewers, summed over the edge admins reached.
    pub sends_total: f64,
    /// Drops by reason: the edges' (`queue_full`, `ring_full`, ...) and the broker's refusals
    /// (`push_<reason>`) and link cuts (`link_<reason>`).
    pub drops: BTreeMap<String, f64>,
    pub pushes_accepted_total: f64,
    pub messages_batched_total: f64,
    pub edges_reached: usize,
    pub broker_reached: bool,
}

impl StatsOut {
    /// Folds the broker's `/metrics` page in.
    pub fn add_broker(&mut self, text: &str) {
        let s = parse_metrics(text);
        self.broker_reached = true;
        self.pushes_accepted_total = sum(&s, "barrage_broker_pushes_accepted_total");
        self.messages_batched_total = sum(&s, "barrage_broker_messages_batched_total");
        let mut refused = BTreeMap::new();
        by_label(
            &s,
            "barrage_broker_pushes_rejected_total",
            "reason",
            &mut refused,
        );
        for (k, v) in refused {
            *self.drops.entry(format!("push_{k}")).or_default() += v;
        }
        let mut cuts = BTreeMap::new();
        by_label(&s, "barrage_broker_link_cuts_total", "reason", &mut cuts);
        for (k, v) in cuts {
            *self.drops.entry(format!("link_{k}")).or_default() += v;
        }
    }

    pub fn add_edge(&mut self, v: &AdminView) {
        self.edges_reached += 1;
        self.sends_total += v.sends_total;
        for (k, n) in &v.drops {
            *self.drops.entry(k.clone()).or_default() += n;
        }
    }
}

#[derive(Deserialize)]
struct PushBody {
    scope: String,
    #[serde(default)]
    room: u64,
    text: String,
}

#[derive(Deserialize)]
struct DrainBody {
    node_id: String,
}

fn html(body: String) -> Response {
    Response {
        status: 200,
        headers: vec![
            ("content-type".into(), "text/html; charset=utf-8".into()),
            ("cache-control".into(), "no-store".into()),
        ],
        body: body.into_bytes(),
    }
}

fn err(status: u16, msg: &str) -> Response {
    Response::json(status, &serde_json::json!({ "error": msg }))
}

/// The pages' state: the demo limiter and the config. One per control HTTP thread.
pub struct Pages {
    config: PagesConfig,
    demo: RefCell<Demo>,
    started: Instant,
}

impl Pages {
    pub fn new(config: &PagesConfig, now: Instant) -> Pages {
        Pages {
            config: config.clone(),
            demo: RefCell::new(Demo::new(config, now)),
            started: now,
        }
    }

    /// Whether `path` is one of the pages' routes (the rest is [`Api`]'s).
    /// The route label of a path [`Pages::serves`], an index into [`ROUTES`] (bounded: ids and
    /// asset names are not labels).
    pub fn route(path: &str) -> usize {
        let name = match path {
            "/" => "page_root",
            "/console" => "console",
            "/demo/send" => "demo_send",
            "/console/api/edges" => "console_api_edges",
            "/console/api/stats" => "console_api_stats",
            "/console/api/rooms" => "console_api_rooms",
            "/console/api/push" => "console_api_push",
            "/console/api/drain" => "console_api_drain",
            p if p.starts_with("/room/") => "room_page",
            p if p.starts_with("/assets/") => "assets",
            _ => "page_other",
        };
        ROUTES
            .iter()
            .position(|r| *r == name)
            .unwrap_or(ROUTES.len() - 1)
    }

    pub fn serves(path: &str) -> bool {
        // `/room/{digits}` only: `/room/v1/Room/get_info` is Bilibili's room-info endpoint.
        let room_page = path
            .strip_prefix("/room/")
            .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()));
        path == "/"
            || room_page
            || path.starts_with("/assets/")
            || path.starts_with("/demo/")
            || path == "/console"
            || path.starts_with("/console/")
    }

    /// Answers one request; `api` is control's state (registry, keys), borrowed only between
    /// awaits.
    pub async fn handle(&self, req: Request, api: &RefCell<Api>) -> Response {
        let get = req.method == "GET" || req.method == "HEAD";
        let post = req.method == "POST";
        let path = req.path.as_str();
        match path {
            "/" if get => Response::text(302, "")
                .with_header("location", &format!("/room/{}", self.config.demo_room)),
            "/console" if get => html(CONSOLE_HTML.to_string()),
            "/demo/send" if post => self.demo_send(&req).await,
            "/console/api/edges" | "/console/api/stats" | "/console/api/rooms"
            | "/console/api/push" | "/console/api/drain" => {
                if !api.borrow().key_valid(&req) {
                    return err(401, "the console needs the API key (Authorization: Bearer)");
                }
                match (path, post) {
                    ("/console/api/edges", false) if get => self.edges(api).await,
                    ("/console/api/stats", false) if get => self.stats().await,
                    ("/console/api/rooms", false) if get => self.rooms().await,
                    ("/console/api/push", true) => self.push_notice(&req).await,
                    ("/console/api/drain", true) => self.drain(&req).await,
                    _ => err(405, "method not allowed"),
                }
            }
            _ if get && path.starts_with("/room/") => match path["/room/".len()..].parse::<u64>() {
                Ok(room) => html(self.room_page(room)),
                Err(_) => err(404, "room ids are numbers: /room/1"),
            },
            _ if get && path.starts_with("/assets/") => asset(&path["/assets/".len()..]),
            _ => err(404, "no such page"),
        }
    }

    fn room_page(&self, room: u64) -> String {
        let demo = self.config.demo_send
            && room == self.config.demo_room
            && !self.config.broker_http.is_empty();
        // The push hint names the broker only where the demo is on (`barrage up` on a
        // developer's machine): a public page must not show an internal address.
        ROOM_HTML
            .replace("{{ROOM}}", &room.to_string())
            .replace("{{DEMO}}", if demo { "on" } else { "off" })
            .replace("{{HINT_CLASS}}", if demo { "" } else { "hidden" })
            .replace(
                "{{BROKER}}",
                if demo { &self.config.broker_http } else { "" },
            )
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.fetch_ms_max)
    }

    /// Pushes `body` to the broker; returns the broker's answer as ours.
    async fn broker_push(&self, scope_path: &str, query: &str, body: &[u8]) -> Response {
        if self.config.broker_http.is_empty() {
            return err(
                503,
                "control has no broker_http configured ([pages] broker_http)",
            );
        }
        let auth = format!("Bearer {}", self.config.broker_key);
        let path = format!("/v1/push/{scope_path}{query}");
        let headers = [
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ];
        self.relay(&self.config.broker_http, &path, &headers, body, "broker")
            .await
    }

    /// POSTs to `addr` and answers with its status and JSON body (502 when it is unreachable).
    async fn relay(
        &self,
        addr: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        who: &str,
    ) -> Response {
        match net::http::request(addr, "POST", path, headers, body, self.timeout()).await {
            Ok(r) => Response {
                status: r.status,
                headers: vec![("content-type".into(), "application/json".into())],
                body: r.body,
            },
            Err(e) => err(502, &format!("{who} unreachable: {e}")),
        }
    }

    /// `Authorization` for the edges' admin endpoints, when a key is configured.
    fn admin_auth(&self) -> Option<String> {
        (!self.config.edge_admin_key.is_empty())
            .then(|| format!("Bearer {}", self.config.edge_admin_key))
    }

    async fn demo_send(&self, req: &Request) -> Response {
        let peer = req.peer.map(|p| p.ip().to_canonical());
        let accepted = self
            .demo
            .borrow_mut()
            .accept(&req.body, peer, Instant::now());
        match accepted {
            Ok((room, body)) => self.broker_push(&format!("room/{room}"), "", &body).await,
            Err(e) => {
                let r = err(e.status(), &e.to_string());
                if e == DemoError::RateLimited {
                    r.with_header("retry-after", "1")
                } else {
                    r
                }
            }
        }
    }

    async fn push_notice(&self, req: &Request) -> Response {
        let Ok(b) = serde_json::from_slice::<PushBody>(&req.body) else {
            return err(
                400,
                "body must be JSON {\"scope\":\"room\"|\"global\",\"room\":N,\"text\":\"...\"}",
            );
        };
        let text = b.text.trim();
        if text.is_empty() || text.chars().count() > NOTICE_TEXT_CHARS_MAX {
            return err(400, "text must be 1 to 200 characters");
        }
        let scope = match (b.scope.as_str(), b.room) {
            ("global", _) => "global".to_string(),
            ("room", r) if r > 0 => format!("room/{r}"),
            _ => return err(400, "scope must be \"global\" or \"room\" with a room id"),
        };
        let body =
            serde_json::json!({"cmd": "NOTICE_MSG", "msg_type": 2, "msg_common": text}).to_string();
        // Notices travel on the high-priority path: a danmaku flood must not delay them.
        self.broker_push(&scope, "?priority=high", body.as_bytes())
            .await
    }

    async fn admin_get(&self, addr: &str, path: &str) -> Option<Vec<u8>> {
        let auth = self.admin_auth();
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("authorization", a.as_str())).collect();
        match net::http::request(addr, "GET", path, &headers, b"", self.timeout()).await {
            Ok(r) if r.status == 200 && r.body.len() <= SCRAPE_BYTES_MAX => Some(r.body),
            _ => None,
        }
    }

    async fn edge_view(&self, addr: &str) -> AdminView {
        match self.admin_get(addr, "/metrics").await {
            Some(body) => AdminView::from_metrics(&String::from_utf8_lossy(&body)),
            None => AdminView::default(),
        }
    }

    async fn edges(&self, api: &RefCell<Api>) -> Response {
        let listed = api.borrow_mut().listed_edges(Instant::now());
        let mut out = Vec::with_capacity(listed.len());
        for e in listed {
            let admin = self
                .config
                .edge_admins
                .iter()
                .find(|a| a.node_id == e.heartbeat.node_id);
            let view = match admin {
                Some(a) => Some(self.edge_view(&a.addr).await),
                None => None,
            };
            let mut v = serde_json::to_value(&e).unwrap_or_default();
            v["admin"] = serde_json::to_value(&view).unwrap_or_default();
            out.push(v);
        }
        Response::json(200, &serde_json::json!({ "edges": out }))
            .with_header("cache-control", "no-store")
    }

    async fn stats(&self) -> Response {
        let mut out = StatsOut {
            at_ms: self.started.elapsed().as_millis() as u64,
            ..StatsOut::default()
        };
        for a in &self.config.edge_admins {
            let v = self.edge_view(&a.addr).await;
            if v.reachable {
                out.add_edge(&v);
            }
        }
        if !self.config.broker_http.is_empty() {
            if let Some(body) = self.admin_get(&self.config.broker_http, "/metrics").await {
                out.add_broker(&String::from_utf8_lossy(&body));
            }
        }
        Response::json(200, &serde_json::to_value(&out).unwrap_or_default())
            .with_header("cache-control", "no-store")
    }

    /// The busiest rooms, as the broker counts them (its `/v1/rooms/top`, with `broker_key`).
    async fn rooms(&self) -> Response {
        if self.config.broker_http.is_empty() {
            return err(
                503,
                "control has no broker_http configured ([pages] broker_http)",
            );
        }
        let auth = format!("Bearer {}", self.config.broker_key);
        let headers = [("authorization", auth.as_str())];
        let path = format!("/v1/rooms/top?limit={CONSOLE_ROOMS_MAX}");
        match net::http::request(
            &self.config.broker_http,
            "GET",
            &path,
            &headers,
            b"",
            self.timeout(),
        )
        .await
        {
            Ok(r) => Response {
                status: r.status,
                headers: vec![
                    ("content-type".into(), "application/json".into()),
                    ("cache-control".into(), "no-store".into()),
                ],
                body: r.body,
            },
            Err(e) => err(502, &format!("broker unreachable: {e}")),
        }
    }

    async fn drain(&self, req: &Request) -> Response {
        let Ok(b) = serde_json::from_slice::<DrainBody>(&req.body) else {
            return err(400, "body must be JSON {\"node_id\":\"...\"}");
        };
        let Some(a) = self
            .config
            .edge_admins
            .iter()
            .find(|a| a.node_id == b.node_id)
        else {
            return err(
                404,
                "no admin address for that edge ([[pages.edge_admins]])",
            );
        };
        let auth = self.admin_auth();
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("authorization", a.as_str())).collect();
        tracing::info!(node = %a.node_id, "console: draining edge");
        self.relay(&a.addr, "/admin/drain", &headers, b"", "edge admin")
            .await
    }
}

fn asset(name: &str) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, ct, bytes)) => Response {
            status: 200,
            headers: vec![
                ("content-type".into(), (*ct).into()),
                ("cache-control".into(), "no-cache".into()),
            ],
            body: bytes.to_vec(),
        },
        None => err(404, "no such asset"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on() -> PagesConfig {
        PagesConfig {
            demo_send: true,
            demo_room: 7,
            ..PagesConfig::default()
        }
    }

    #[test]
    fn demo_is_off_by_default_and_checks_room_and_text() {
        let t0 = Instant::now();
        let mut d = Demo::new(&PagesConfig::default(), t0);
        assert_eq!(
            d.accept(br#"{"room":1,"text":"hi"}"#, None, t0),
            Err(DemoError::Off)
        );
        let mut d = Demo::new(&on(), t0);
        assert_eq!(
            d.accept(br#"{"room":1,"text":"hi"}"#, None, t0),
            Err(DemoError::WrongRoom(7))
        );
        assert_eq!(d.accept(b"[1]", None, t0), Err(DemoError::Malformed));
        for bad in ["", "   ", "a\nb"] {
            let body = serde_json::json!({"room":7,"text":bad}).to_string();
            assert_eq!(
                d.accept(body.as_bytes(), None, t0),
                Err(DemoError::BadText),
                "{bad:?}"
            );
        }
        let long = "弹".repeat(DEMO_TEXT_CHARS_MAX + 1);
        let body = serde_json::json!({"room":7,"text":long}).to_string();
        assert_eq!(d.accept(body.as_bytes(), None, t0), Err(DemoError::BadText));
        let ok = "弹".repeat(DEMO_TEXT_CHARS_MAX);
        let body = serde_json::json!({"room":7,"text":ok}).to_string();
        let (room, msg) = d.accept(body.as_bytes(), None, t0).unwrap();
        assert_eq!(room, 7);
        let v: serde_json::Value = serde_json::from_slice(&msg).unwrap();
        assert_eq!(v["cmd"], "DANMU_MSG");
        assert_eq!(v["info"][1], ok.as_str());
        assert_eq!(v["info"][2][0], 0, "the demo box sends as a guest");
    }

    #[test]
    fn demo_rate_limits_per_peer_then_refills() {
        let t0 = Instant::now();
        let mut d = Demo::new(&on(), t0);
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let body = br#"{"room":7,"text":"hi"}"#;
        for _ in 0..3 {
            assert!(d.accept(body, Some(a), t0).is_ok());
        }
        assert_eq!(d.accept(body, Some(a), t0), Err(DemoError::RateLimited));
        assert!(
            d.accept(body, Some(b), t0).is_ok(),
            "another peer has its own bucket"
        );
        let later = t0 + Duration::from_millis(1000);
        assert!(d.accept(body, Some(a), later).is_ok(), "one token a second");
        assert_eq!(d.accept(body, Some(a), later), Err(DemoError::RateLimited));
    }

    #[test]
    fn demo_service_bucket_caps_many_peers() {
        let t0 = Instant::now();
        let mut d = Demo::new(&on(), t0);
        let body = br#"{"room":7,"text":"hi"}"#;
        let ok = (0..50u8)
            .filter(|i| {
                let ip = IpAddr::from([127, 0, 1, *i]);
                d.accept(body, Some(ip), t0).is_ok()
            })
            .count();
        assert_eq!(ok, 10, "demo_sends_burst");
    }

    #[test]
    fn metrics_are_summarised() {
        let edge = "# HELP x\n# TYPE barrage_edge_sends_total counter\n\
            barrage_edge_sends_total{shard=\"0\"} 10\n\
            barrage_edge_sends_total{shard=\"1\"} 5\n\
            barrage_edge_drops_total{reason=\"queue_full\"} 3\n\
            barrage_edge_drops_total{reason=\"ring_full\"} 0\n\
            barrage_edge_rooms{shard=\"0\"} 2\n\
            barrage_edge_link_up{broker=\"127.0.0.1:7410\",broker_shard=\"0\",priority=\"low\"} 1\n\
            barrage_edge_link_up{broker=\"127.0.0.1:7410\",broker_shard=\"0\",priority=\"high\"} 0\n\
            garbage line\n";
        let v = AdminView::from_metrics(edge);
        assert_eq!((v.links_up, v.links, v.rooms), (1, 2, 2));
        assert_eq!(v.sends_total, 15.0);
        assert_eq!(v.drops["queue_full"], 3.0);
        let mut s = StatsOut::default();
        s.add_edge(&v);
        s.add_broker(
            "barrage_broker_pushes_accepted_total{via=\"http\"} 4\n\
             barrage_broker_pushes_accepted_total{via=\"socket\"} 6\n\
             barrage_broker_pushes_rejected_total{reason=\"rate_limited\"} 2\n\
             barrage_broker_link_cuts_total{reason=\"slow\"} 1\n",
        );
        assert_eq!(s.pushes_accepted_total, 10.0);
        assert_eq!(s.drops["push_rate_limited"], 2.0);
        assert_eq!(s.drops["link_slow"], 1.0);
        assert_eq!(s.drops["queue_full"], 3.0);
        assert!(s.broker_reached);
        assert_eq!(s.edges_reached, 1);
    }

    #[test]
    fn routes_and_assets() {
        for p in [
            "/",
            "/room/1",
            "/assets/room.js",
            "/demo/send",
            "/console",
            "/console/api/edges",
        ] {
            assert!(Pages::serves(p), "{p}");
        }
        for p in [
            "/v1/edges",
            "/xlive/web-room/v1/index/getDanmuInfo",
            "/room/v1/Room/get_info",
            "/room/",
            "/consoles",
            "/metrics",
        ] {
            assert!(!Pages::serves(p), "{p}");
        }
        for (name, _, bytes) in ASSETS {
            assert_eq!(asset(name).status, 200);
            assert!(!bytes.is_empty(), "{name}");
        }
        assert_eq!(asset("../Cargo.toml").status, 404);
        let p = Pages::new(&on(), Instant::now());
        let page = p.room_page(7);
        assert!(page.contains("data-room=\"7\""), "{page}");
        assert!(
            page.contains("data-demo=\"off\""),
            "no broker_http: no demo box"
        );
        assert!(
            page.contains("class=\"hint hidden\""),
            "no broker address shown"
        );
        assert!(!page.contains("{{"));
        let p = Pages::new(
            &PagesConfig {
                broker_http: "127.0.0.1:7480".into(),
                ..on()
            },
            Instant::now(),
        );
        let page = p.room_page(7);
        assert!(page.contains("data-demo=\"on\""));
        assert!(page.contains("http://127.0.0.1:7480/v1/push/room/7"));
        assert!(
            p.room_page(8).contains("data-demo=\"off\""),
            "only the demo room"
        );
    }
}
