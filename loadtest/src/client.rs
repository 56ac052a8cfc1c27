//! The client side of barrage, written once for `barrage tail`, the loadtest's viewers and the
//! integration tests: control's URL, the ticket (token and edges) from control exactly as a real
//! client gets it, the WebSocket upgrade, and the auth body.
//!
//! Tickets come from `POST /v1/connect` (with the business API key for logged-in users, without
//! it for guests), or the Bilibili-style `GET /xlive/web-room/v1/index/getDanmuInfo?id=<room>&type=0`.
//! The WebSocket upgrade is sans-io (a request to write, a response head to check), so the
//! blocking `tail` and the monoio viewers run the same code.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use serde::Deserialize;

/// Largest WebSocket upgrade response head accepted from an edge.
pub const WS_HEAD_BYTES_MAX: usize = 8 * 1024;

/// Control's address, from a URL (`http://host[:port][/...]`) or a bare `host:port`.
///
/// Parsed by `http::Uri` (already in the tree through hyper) rather than by hand: it knows
/// IPv6 literals, userinfo and ports. Control speaks plain HTTP, so `https` is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlUrl {
    /// `host:port`, the port defaulted to 80.
    authority: String,
    /// `region=R` of the URL's query (`http://control/?region=b`), passed on to control's
    /// token calls so the client is assigned that region's edges first (docs/operations-control.md).
    region: Option<String>,
}

impl ControlUrl {
    pub fn parse(url: &str) -> Result<ControlUrl, TicketError> {
        let bad = |why: &str| TicketError::Url(format!("{url:?}: {why}"));
        let uri: http::Uri = url.trim().parse().map_err(|e| bad(&format!("{e}")))?;
        match uri.scheme_str() {
            None | Some("http") => {}
            Some("https") => {
                return Err(bad(
                    "control speaks plain HTTP; give a TLS terminator's plain address",
                ))
            }
            Some(other) => return Err(bad(&format!("scheme {other} is not http"))),
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.host().is_empty() {
            return Err(bad("no host"));
        }
        let port = authority.port_u16().unwrap_or(80);
        let region = uri.query().and_then(|q| {
            q.split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == "region")
                .map(|(_, v)| v.to_string())
                .filter(|v| {
                    !v.is_empty()
                        && v.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                })
        });
        Ok(ControlUrl {
            authority: format!("{}:{port}", authority.host()),
            region,
        })
    }

    /// `sep` + `region=R` when the URL named a region, else nothing: appended to token calls.
    fn region_query(&self, sep: char) -> String {
        self.region
            .as_deref()
            .map(|r| format!("{sep}region={r}"))
            .unwrap_or_default()
    }

    /// `host:port`, ready for a connect.
    pub fn authority(&self) -> &str {
        &self.authority
    }
}

/// `http://host:port[/...]` (or `host:port`) -> `host:port`; an unparsable string is returned
/// as given, so the resolver's error names it.
pub fn host_port(url: &str) -> String {
    ControlUrl::parse(url)
        .map(|c| c.authority)
        .unwrap_or_else(|_| url.to_string())
}

/// What a client needs to connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ticket {
    /// The real room id (control resolves short ids); 0 when control did not say.
    pub room: u64,
    pub token: String,
    /// Edges best first: (host, tcp port, ws port).
    pub edges: Vec<Edge>,
}

/// One edge, as both `POST /v1/connect` (`tcp_port`) and `getDanmuInfo` (`port`) list it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Edge {
    pub host: String,
    #[serde(alias = "port")]
    pub tcp_port: u16,
    pub ws_port: u16,
    /// WebSocket over TLS; 0 when the edge serves no WSS.
    #[serde(default)]
    pub wss_port: u16,
    /// Datagrams (docs/protocol-udp.md); 0 (absent) when the edge serves no UDP.
    #[serde(default)]
    pub udp_port: u16,
    /// TLS over raw TCP; 0 (absent) when the edge serves none.
    #[serde(default)]
    pub tls_tcp_port: u16,
}

impl Edge {
    /// The socket address for a transport (`ws` or not), resolving the host if it is a name.
    pub fn addr(&self, ws: bool) -> Option<SocketAddr> {
        let port = if ws { self.ws_port } else { self.tcp_port };
        if port == 0 {
            return None;
        }
        match self.host.parse::<IpAddr>() {
            Ok(ip) => Some(SocketAddr::new(ip, port)),
            Err(_) => (self.host.as_str(), port).to_socket_addrs().ok()?.next(),
        }
    }
}

/// Why no ticket: the label is a failure reason in the report.
#[derive(Debug, thiserror::Error)]
pub enum TicketError {
    /// The control URL does not parse (caller's fault).
    #[error("bad control URL {0}")]
    Url(String),
    /// No HTTP answer from control (network or control down; retry elsewhere).
    #[error("control unreachable: {0}")]
    Http(String),
    /// Control answered with an error status (401/403: the key; 429/503: retry later).
    #[error("control answered {0}")]
    Status(u16),
    /// Control's body is not the expected JSON.
    #[error("control answer not understood")]
    Body,
    /// Control knows no live edge.
    #[error("control listed no edge (is an edge running and heartbeating to control?)")]
    NoEdge,
}

impl TicketError {
    pub fn label(&self) -> String {
        match self {
            TicketError::Url(_) => "control_bad_url".into(),
            TicketError::Http(e) => {
                // Keep the cause (e.g. "Cannot assign requested address": the loopback port
                // space is used up by TIME_WAIT) but bound the label's length.
                let short: String = e.chars().take(60).collect();
                format!("control_unreachable: {short}")
            }
            TicketError::Status(s) => format!("control_status_{s}"),
            TicketError::Body => "control_bad_body".into(),
            TicketError::NoEdge => "control_no_edge".into(),
        }
    }
}

#[derive(Deserialize)]
struct ConnectOut {
    #[serde(default)]
    room: u64,
    token: String,
    edges: Vec<Edge>,
}

#[derive(Deserialize)]
struct DanmuEnvelope {
    code: i64,
    data: DanmuData,
}

#[derive(Deserialize)]
struct DanmuData {
    token: String,
    host_list: Vec<Edge>,
}

/// A ticket, unless control listed no edge.
fn ticket(room: u64, token: String, edges: Vec<Edge>) -> Result<Ticket, TicketError> {
    if edges.is_empty() {
        return Err(TicketError::NoEdge);
    }
    Ok(Ticket { room, token, edges })
}

/// Parses a `POST /v1/connect` answer.
pub fn parse_connect(body: &[u8]) -> Result<Ticket, TicketError> {
    let out: ConnectOut = serde_json::from_slice(body).map_err(|_| TicketError::Body)?;
    ticket(out.room, out.token, out.edges)
}

/// Parses a `getDanmuInfo` answer.
pub fn parse_danmu_info(body: &[u8]) -> Result<Ticket, TicketError> {
    let out: DanmuEnvelope = serde_json::from_slice(body).map_err(|_| TicketError::Body)?;
    if out.code != 0 {
        return Err(TicketError::Body);
    }
    ticket(0, out.data.token, out.data.host_list)
}

/// Asks control for a ticket. `key` set: `POST /v1/connect` for user `uid`; otherwise a guest
/// (uid 0): `POST /v1/connect` without a key, or `getDanmuInfo` when `danmu_info`.
pub async fn fetch(
    control: &str,
    room: u64,
    uid: u64,
    device: &str,
    key: Option<&str>,
    danmu_info: bool,
    timeout: Duration,
) -> Result<Ticket, TicketError> {
    let control = ControlUrl::parse(control)?;
    let addr = control.authority();
    if danmu_info {
        let path = format!(
            "/xlive/web-room/v1/index/getDanmuInfo?id={room}&type=0{}",
            control.region_query('&')
        );
        return parse_danmu_info(&call(addr, "GET", &path, &[], b"", timeout).await?);
    }
    let uid = if key.is_some() { uid } else { 0 };
    let body = serde_json::json!({ "room": room, "uid": uid, "device": device }).to_string();
    let bearer = key.map(|k| format!("Bearer {k}"));
    let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json")];
    if let Some(b) = &bearer {
        headers.push(("authorization", b));
    }
    let path = format!("/v1/connect{}", control.region_query('?'));
    let body = call(addr, "POST", &path, &headers, body.as_bytes(), timeout).await?;
    parse_connect(&body)
}

/// One request to control; the body of a 200, or why there is none.
async fn call(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, TicketError> {
    let r = net::http::request(addr, method, path, headers, body, timeout)
        .await
        .map_err(|e| TicketError::Http(e.to_string()))?;
    if r.status != 200 {
        return Err(TicketError::Status(r.status));
    }
    Ok(r.body)
}

/// A guest's first call, as third-party clients make it: resolves a (possibly short) room id
/// through `getInfoByRoom`.
pub async fn resolve_room(control: &str, room: u64, timeout: Duration) -> Result<u64, TicketError> {
    let control = ControlUrl::parse(control)?;
    let path = format!("/xlive/web-room/v1/index/getInfoByRoom?room_id={room}");
    let body = call(control.authority(), "GET", &path, &[], b"", timeout).await?;
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|_| TicketError::Body)?;
    if v["code"] != 0 {
        return Err(TicketError::Body);
    }
    Ok(v["data"]["room_info"]["room_id"].as_u64().unwrap_or(room))
}

/// [`fetch`] for blocking callers (`tail`, tests): runs it on a one-off epoll runtime.
pub fn fetch_blocking(
    control: &str,
    room: u64,
    uid: u64,
    device: &str,
    key: Option<&str>,
    danmu_info: bool,
    timeout: Duration,
) -> Result<Ticket, TicketError> {
    net::runtime::block_on(
        net::runtime::Driver::Legacy,
        fetch(control, room, uid, device, key, danmu_info, timeout),
    )
}

/// [`resolve_room`] for blocking callers.
pub fn resolve_room_blocking(
    control: &str,
    room: u64,
    timeout: Duration,
) -> Result<u64, TicketError> {
    net::runtime::block_on(
        net::runtime::Driver::Legacy,
        resolve_room(control, room, timeout),
    )
}

/// The op 7 body every barrage client sends (web platform, type 2, as the web client does).
pub fn auth_body(
    uid: u64,
    room: u64,
    protover: u32,
    token: &str,
    device: &str,
) -> proto::auth::AuthBody {
    proto::auth::AuthBody {
        uid,
        roomid: room,
        protover,
        platform: Some("web".into()),
        kind: Some(2),
        key: token.to_string(),
        buvid: Some(device.to_string()),
        ack: false,
    }
}

/// Why a WebSocket upgrade failed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum UpgradeError {
    /// The response head grew past [`WS_HEAD_BYTES_MAX`].
    #[error("WebSocket upgrade response head longer than {WS_HEAD_BYTES_MAX} bytes")]
    HeadTooLong,
    /// The edge answered something other than 101 (its status line).
    #[error("the edge refused the WebSocket upgrade: {0}")]
    Refused(String),
    /// `Sec-WebSocket-Accept` missing or wrong.
    #[error("the edge's Sec-WebSocket-Accept does not match the key")]
    BadAccept,
}

impl UpgradeError {
    /// A failure reason for the loadtest report.
    pub fn label(&self) -> &'static str {
        match self {
            UpgradeError::HeadTooLong => "ws_head_too_long",
            UpgradeError::Refused(_) => "ws_upgrade_refused",
            UpgradeError::BadAccept => "ws_bad_accept",
        }
    }
}

/// A `Sec-WebSocket-Key` from 16 random bytes.
pub fn ws_key(random: [u8; 16]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(random)
}

/// The upgrade request for `/sub` on `host` (`host:port`).
pub fn ws_upgrade_request(host: &str, key: &str) -> String {
    format!(
        "GET /sub HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nOrigin: http://{host}\r\n\r\n"
    )
}

/// Checks the upgrade response read so far. `Ok(None)`: the head is not complete yet, read
/// more; `Ok(Some(end))`: upgraded, and `buf[end..]` already belongs to the WebSocket stream.
pub fn ws_upgrade_response(buf: &[u8], key: &str) -> Result<Option<usize>, UpgradeError> {
    let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > WS_HEAD_BYTES_MAX {
            return Err(UpgradeError::HeadTooLong);
        }
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
    let status = head.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) != Some("101") {
        return Err(UpgradeError::Refused(status.to_string()));
    }
    let accept = proto::ws::accept_key(key).to_ascii_lowercase();
    let ok = head.lines().any(|l| {
        l.split_once(':')
            .is_some_and(|(k, v)| k.trim() == "sec-websocket-accept" && v.trim() == accept)
    });
    if !ok {
        return Err(UpgradeError::BadAccept);
    }
    Ok(Some(i + 4))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_answers() {
        let c = br#"{"token":"t1","expires_at":9,"room":5,"edges":[{"host":"127.0.0.1","tcp_port":2243,"ws_port":2244,"wss_port":0,"region":"local"}]}"#;
        let t = parse_connect(c).unwrap();
        assert_eq!(t.token, "t1");
        assert_eq!(
            t.edges[0].addr(false),
            Some("127.0.0.1:2243".parse().unwrap())
        );
        assert_eq!(
            t.edges[0].addr(true),
            Some("127.0.0.1:2244".parse().unwrap())
        );
        let d = br#"{"code":0,"message":"0","ttl":1,"data":{"group":"live","business_id":0,"refresh_row_factor":0.125,"refresh_rate":100,"max_delay":5000,"token":"t2","host_list":[{"host":"127.0.0.2","port":1,"wss_port":0,"ws_port":2}]}}"#;
        let t = parse_danmu_info(d).unwrap();
        assert_eq!(
            (t.token.as_str(), t.edges[0].tcp_port, t.edges[0].ws_port),
            ("t2", 1, 2)
        );
        assert!(matches!(
            parse_connect(br#"{"token":"x","edges":[]}"#),
            Err(TicketError::NoEdge)
        ));
        assert!(matches!(parse_connect(b"nope"), Err(TicketError::Body)));
    }

    #[test]
    fn control_urls() {
        let a = |u: &str| ControlUrl::parse(u).map(|c| c.authority().to_string());
        assert_eq!(a("http://127.0.0.1:8080").unwrap(), "127.0.0.1:8080");
        assert_eq!(a("http://127.0.0.1:8080/x?y").unwrap(), "127.0.0.1:8080");
        assert_eq!(a("127.0.0.1:8080").unwrap(), "127.0.0.1:8080");
        assert_eq!(a("localhost:9").unwrap(), "localhost:9");
        assert_eq!(a("http://example.com").unwrap(), "example.com:80");
        assert_eq!(a("http://[::1]:81/").unwrap(), "[::1]:81");
        assert!(a("https://x").is_err());
        assert!(a("http://").is_err());
        assert!(a("ftp://x").is_err());
        assert_eq!(host_port("http://127.0.0.1:8080/x"), "127.0.0.1:8080");
        assert_eq!(host_port("not a url"), "not a url");
        let q = |u: &str| ControlUrl::parse(u).unwrap().region_query('?');
        assert_eq!(q("http://127.0.0.1:8080/?region=b"), "?region=b");
        assert_eq!(q("http://127.0.0.1:8080/?x=1&region=eu-1"), "?region=eu-1");
        assert_eq!(q("http://127.0.0.1:8080/?region=a%20b"), "");
        assert_eq!(q("http://127.0.0.1:8080/"), "");
    }

    #[test]
    fn ws_upgrade_is_checked() {
        let key = ws_key([7; 16]);
        let req = ws_upgrade_request("127.0.0.1:2244", &key);
        assert!(req.starts_with("GET /sub HTTP/1.1\r\n") && req.ends_with("\r\n\r\n"));
        let accept = proto::ws::accept_key(&key);
        let ok = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {accept}\r\n\r\nXY"
        );
        assert_eq!(
            ws_upgrade_response(ok.as_bytes(), &key),
            Ok(Some(ok.len() - 2))
        );
        assert_eq!(ws_upgrade_response(&ok.as_bytes()[..20], &key), Ok(None));
        let wrong = ok.replace(&accept, "AAAA");
        assert_eq!(
            ws_upgrade_response(wrong.as_bytes(), &key),
            Err(UpgradeError::BadAccept)
        );
        assert!(matches!(
            ws_upgrade_response(b"HTTP/1.1 404 Not Found\r\n\r\n", &key),
            Err(UpgradeError::Refused(_))
        ));
        assert_eq!(
            ws_upgrade_response(&vec![b'a'; WS_HEAD_BYTES_MAX + 1], &key),
            Err(UpgradeError::HeadTooLong)
        );
    }
}

/// Where a client is in a room's stream, for resume and duplicate dropping (DESIGN §11):
/// the epoch the last `BARRAGE_SYNC` named and the last low-priority room seq seen in it.
/// `barrage tail`, the loadtest's viewers and the tests keep one per room.
///
/// Invariant: a batch is new iff its `(epoch, seq)` is after the position; seqs compare only
/// within one epoch, and a sync naming another epoch starts the position over.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Position {
    epoch: Option<proto::sync::Epoch>,
    seq: u32,
}

/// What [`Position::on_batch`] made of a room batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// The next batch (or a high-priority one, which has no place in the low seq).
    New,
    /// At or before the position: drop it.
    Duplicate,
    /// After a hole of this many batches (lost; the sync said so, or a fault did).
    Gap(u32),
}

impl Position {
    /// The `resume` field to send on the next connect (`None` before any sync).
    pub fn resume(&self) -> Option<proto::sync::Resume> {
        self.epoch.as_ref().map(|epoch| proto::sync::Resume {
            epoch: epoch.clone(),
            seq: self.seq,
        })
    }

    pub fn epoch(&self) -> Option<&proto::sync::Epoch> {
        self.epoch.as_ref()
    }

    pub fn seq(&self) -> u32 {
        self.seq
    }

    /// A `BARRAGE_SYNC`: the stream continues after `sync.seq` in `sync.epoch`. Returns true
    /// when the epoch changed (what came before is not comparable).
    pub fn on_sync(&mut self, sync: &proto::sync::Sync) -> bool {
        let changed = self.epoch.as_ref() != Some(&sync.epoch);
        if changed || sync.seq > self.seq {
            self.seq = sync.seq;
        }
        self.epoch = Some(sync.epoch.clone());
        changed
    }

    /// An op 5 outer packet with header seq `outer_seq` (a room batch).
    pub fn on_batch(&mut self, outer_seq: u32) -> Seen {
        if outer_seq & !proto::sync::ROOM_SEQ_MAX != 0 || outer_seq == 0 {
            // High priority, or a packet that is not a room batch.
            return Seen::New;
        }
        if self.epoch.is_some() && outer_seq <= self.seq {
            return Seen::Duplicate;
        }
        let gap = if self.epoch.is_some() {
            outer_seq - self.seq - 1
        } else {
            0
        };
        self.seq = outer_seq;
        if gap == 0 {
            Seen::New
        } else {
            Seen::Gap(gap)
        }
    }
}

#[cfg(test)]
mod position_tests {
    use super::*;
    use proto::sync::{Epoch, Sync};

    fn sync(e: &str, seq: u32) -> Sync {
        Sync {
            epoch: Epoch::new(e).unwrap(),
            seq,
            recovered: true,
            missed: 0,
        }
    }

    #[test]
    fn dedups_within_an_epoch_and_starts_over_in_a_new_one() {
        let mut p = Position::default();
        assert!(p.resume().is_none());
        assert_eq!(p.on_batch(3), Seen::New);
        assert!(p.on_sync(&sync("a-1", 3)));
        assert_eq!(p.on_batch(3), Seen::Duplicate);
        assert_eq!(p.on_batch(4), Seen::New);
        assert_eq!(p.on_batch(0x8000_0009), Seen::New);
        assert_eq!(p.on_batch(7), Seen::Gap(2));
        assert_eq!(p.resume().unwrap().seq, 7);
        assert!(!p.on_sync(&sync("a-1", 5)));
        assert_eq!(p.seq(), 7);
        assert!(p.on_sync(&sync("b-1", 2)));
        assert_eq!(p.on_batch(2), Seen::Duplicate);
        assert_eq!(p.on_batch(3), Seen::New);
        assert_eq!(p.epoch().unwrap().as_str(), "b-1");
    }
}

/// The blocking pieces of the thread-per-viewer scenarios (`reach`, `priority`, `resume`): one
/// TCP connection per thread, read with a short timeout so the thread can heartbeat and stop.
pub mod blocking {
    use super::Ticket;
    use proto::packet::{op, OwnedPacket, StreamDecoder};
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::time::Duration;

    /// The ticket's first edge's TCP address.
    pub fn first_edge(t: &Ticket) -> anyhow::Result<SocketAddr> {
        let e = t
            .edges
            .first()
            .ok_or_else(|| anyhow::anyhow!("no edge in the ticket"))?;
        e.addr(false)
            .ok_or_else(|| anyhow::anyhow!("cannot resolve {}", e.host))
    }

    /// Connects to `addr` (giving up after 5 s), sets `read_timeout` and sends the auth `request`.
    pub fn open(
        addr: SocketAddr,
        request: &[u8],
        read_timeout: Duration,
    ) -> anyhow::Result<TcpStream> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(read_timeout))?;
        s.write_all(request)?;
        Ok(s)
    }

    /// Reads what is there (up to the socket's read timeout) into `packets`; false on EOF.
    pub fn fill(
        s: &mut TcpStream,
        packets: &mut StreamDecoder,
        chunk: &mut [u8],
    ) -> std::io::Result<bool> {
        match s.read(chunk) {
            Ok(0) => Ok(false),
            Ok(n) => {
                packets.feed(&chunk[..n]);
                Ok(true)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(true)
            }
            Err(e) => Err(e),
        }
    }

    /// The messages a notification batch carries; none for any other packet or a container
    /// that does not decode.
    pub fn notifications(p: &OwnedPacket) -> Vec<OwnedPacket> {
        if p.op != op::NOTIFICATION {
            return Vec::new();
        }
        proto::container::unpack(
            p.ver,
            p.op,
            p.seq,
            &p.body,
            proto::limits::DECOMPRESSED_BYTES_MAX,
        )
        .unwrap_or_default()
    }
}
