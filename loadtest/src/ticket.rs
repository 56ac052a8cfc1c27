//! Getting a token and an edge list from control, exactly as a real client does:
//! `POST /v1/connect` (with the business API key for logged-in users, without it for guests), or
//! the Bilibili-style `GET /xlive/web-room/v1/index/getDanmuInfo?id=<room>&type=0`.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use serde::Deserialize;

/// What a client needs to connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ticket {
    pub token: String,
    /// Edges best first: (host, tcp port, ws port).
    pub edges: Vec<Edge>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Edge {
    pub host: String,
    pub tcp_port: u16,
    pub ws_port: u16,
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
    #[error("control unreachable: {0}")]
    Http(String),
    #[error("control answered {0}")]
    Status(u16),
    #[error("control answer not understood")]
    Body,
    #[error("control listed no edge")]
    NoEdge,
}

impl TicketError {
    pub fn label(&self) -> String {
        match self {
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
    token: String,
    edges: Vec<ConnectEdge>,
}

#[derive(Deserialize)]
struct ConnectEdge {
    host: String,
    tcp_port: u16,
    ws_port: u16,
}

#[derive(Deserialize)]
struct DanmuEnvelope {
    code: i64,
    data: DanmuData,
}

#[derive(Deserialize)]
struct DanmuData {
    token: String,
    host_list: Vec<DanmuHost>,
}

#[derive(Deserialize)]
struct DanmuHost {
    host: String,
    port: u16,
    ws_port: u16,
}

/// Parses a `POST /v1/connect` answer.
pub fn parse_connect(body: &[u8]) -> Result<Ticket, TicketError> {
    let out: ConnectOut = serde_json::from_slice(body).map_err(|_| TicketError::Body)?;
    let edges: Vec<Edge> = out
        .edges
        .into_iter()
        .map(|e| Edge {
            host: e.host,
            tcp_port: e.tcp_port,
            ws_port: e.ws_port,
        })
        .collect();
    if edges.is_empty() {
        return Err(TicketError::NoEdge);
    }
    Ok(Ticket {
        token: out.token,
        edges,
    })
}

/// Parses a `getDanmuInfo` answer.
pub fn parse_danmu_info(body: &[u8]) -> Result<Ticket, TicketError> {
    let out: DanmuEnvelope = serde_json::from_slice(body).map_err(|_| TicketError::Body)?;
    if out.code != 0 {
        return Err(TicketError::Body);
    }
    let edges: Vec<Edge> = out
        .data
        .host_list
        .into_iter()
        .map(|h| Edge {
            host: h.host,
            tcp_port: h.port,
            ws_port: h.ws_port,
        })
        .collect();
    if edges.is_empty() {
        return Err(TicketError::NoEdge);
    }
    Ok(Ticket {
        token: out.data.token,
        edges,
    })
}

/// `http://host:port[/...]` -> `host:port` (the scheme and any path are dropped).
pub fn host_port(url: &str) -> String {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    rest.split('/').next().unwrap_or(rest).to_string()
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
    let addr = host_port(control);
    if danmu_info {
        let path = format!("/xlive/web-room/v1/index/getDanmuInfo?id={room}&type=0");
        let r = net::http::request(&addr, "GET", &path, &[], b"", timeout)
            .await
            .map_err(|e| TicketError::Http(e.to_string()))?;
        if r.status != 200 {
            return Err(TicketError::Status(r.status));
        }
        return parse_danmu_info(&r.body);
    }
    let uid = if key.is_some() { uid } else { 0 };
    let body = serde_json::json!({ "room": room, "uid": uid, "device": device }).to_string();
    let bearer = key.map(|k| format!("Bearer {k}"));
    let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json")];
    if let Some(b) = &bearer {
        headers.push(("authorization", b));
    }
    let r = net::http::request(
        &addr,
        "POST",
        "/v1/connect",
        &headers,
        body.as_bytes(),
        timeout,
    )
    .await
    .map_err(|e| TicketError::Http(e.to_string()))?;
    if r.status != 200 {
        return Err(TicketError::Status(r.status));
    }
    parse_connect(&r.body)
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
        assert_eq!(host_port("http://127.0.0.1:8080/x"), "127.0.0.1:8080");
        assert_eq!(host_port("127.0.0.1:8080"), "127.0.0.1:8080");
    }
}
