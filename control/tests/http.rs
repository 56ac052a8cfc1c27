//! Control over real loopback HTTP: start on port 0, register edges by heartbeat, get tokens
//! and discovery answers, watch an edge expire, shut down.

use control::Config;
use net::http::{request, Response};
use net::runtime::{block_on, Driver};
use proto::token::KeySet;
use serde_json::Value;
use std::time::{Duration, Instant};

const KEYS: &str = "1:0123456789abcdef0123,2:fedcba9876543210fedc";
const TIMEOUT: Duration = Duration::from_secs(5);

fn config() -> Config {
    Config {
        http_addr: "127.0.0.1:0".parse().unwrap(),
        api_keys: vec!["api-key-1".into()],
        token_keys: KEYS.into(),
        edge_ttl_ms: 400,
        driver: Driver::Legacy,
        ..Config::default()
    }
}

fn call(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Response {
    let (addr, method, path, body) = (
        addr.to_string(),
        method.to_string(),
        path.to_string(),
        body.to_string(),
    );
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    block_on(Driver::Legacy, async move {
        let h: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        request(&addr, &method, &path, &h, body.as_bytes(), TIMEOUT)
            .await
            .unwrap()
    })
}

fn json(r: &Response) -> Value {
    serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&r.body)))
}

fn heartbeat(addr: &str, id: &str, draining: bool) -> Response {
    let body = format!(
        r#"{{"node_id":"{id}","region":"local","host":"127.0.0.1","tcp_port":2243,"ws_port":2244,"wss_port":0,"connections":0,"capacity":100,"draining":{draining}}}"#
    );
    call(
        addr,
        "POST",
        "/v1/edges/heartbeat",
        &[("content-type", "application/json")],
        &body,
    )
}

#[test]
fn tokens_discovery_and_registry_over_http() {
    let handle = control::start(config()).unwrap();
    let addr = handle.http_addr().to_string();
    assert_ne!(handle.http_addr().port(), 0);

    assert_eq!(call(&addr, "GET", "/healthz", &[], "").status, 200);
    let r = heartbeat(&addr, "edge-1", false);
    assert_eq!((r.status, json(&r)), (200, serde_json::json!({"ok": true})));

    // A logged-in user's token, through a business backend's key.
    let r = call(
        &addr,
        "POST",
        "/v1/connect",
        &[("authorization", "Bearer api-key-1")],
        r#"{"room":77,"uid":5,"device":"d1"}"#,
    );
    assert_eq!(r.status, 200);
    let v = json(&r);
    assert_eq!(
        v["edges"],
        serde_json::json!([{"host":"127.0.0.1","tcp_port":2243,"ws_port":2244,"wss_port":0,"region":"local"}])
    );
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let t = KeySet::parse(KEYS)
        .unwrap()
        .verify(v["token"].as_str().unwrap(), now_s)
        .unwrap();
    assert_eq!((t.key_id, t.claims.uid.0, t.claims.room.0), (2, 5, 77));
    assert_eq!(
        call(&addr, "POST", "/v1/connect", &[], r#"{"room":77,"uid":5}"#).status,
        401
    );

    // Discovery as third-party clients call it.
    let r = call(
        &addr,
        "GET",
        "/xlive/web-room/v1/index/getDanmuInfo?id=77&type=0",
        &[],
        "",
    );
    let v = json(&r);
    assert_eq!(v["code"], 0);
    assert_eq!(
        v["data"]["host_list"][0],
        serde_json::json!({"host":"127.0.0.1","port":2243,"wss_port":0,"ws_port":2244})
    );
    let r = call(
        &addr,
        "GET",
        "/xlive/web-room/v1/index/getInfoByRoom?room_id=77",
        &[],
        "",
    );
    assert_eq!(json(&r)["data"]["room_info"]["room_id"], 77);
    let r = call(&addr, "GET", "/room/v1/Room/get_info?room_id=77", &[], "");
    assert_eq!(json(&r)["data"]["room_id"], 77);

    // Draining: listed, not assigned.
    heartbeat(&addr, "edge-1", true);
    let v = json(&call(&addr, "GET", "/v1/edges", &[], ""));
    assert_eq!(v["edges"][0]["state"], "draining");
    let v = json(&call(&addr, "POST", "/v1/connect", &[], r#"{"room":77}"#));
    assert_eq!(v["edges"], serde_json::json!([]));

    // A silent edge is dead after edge_ttl_ms; poll (bounded) rather than assume a timing.
    heartbeat(&addr, "edge-2", false);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = json(&call(&addr, "GET", "/v1/edges", &[], ""));
        let states: Vec<&str> = v["edges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["state"].as_str().unwrap())
            .collect();
        if states == ["dead", "dead"] {
            break;
        }
        assert!(Instant::now() < deadline, "edges never expired: {states:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let v = json(&call(
        &addr,
        "GET",
        "/xlive/web-room/v1/index/getDanmuInfo?id=77",
        &[],
        "",
    ));
    assert_eq!(v["data"]["host_list"], serde_json::json!([]));

    // The pages are timed and counted by route and status like the API.
    assert_eq!(call(&addr, "GET", "/room/5", &[], "").status, 200);
    assert_eq!(
        call(&addr, "GET", "/console/api/edges", &[], "").status,
        401
    );
    let m = call(&addr, "GET", "/metrics", &[], "");
    let text = String::from_utf8(m.body).unwrap();
    for line in [
        "barrage_control_request_duration_seconds_count{route=\"room_page\",status=\"200\"} 1",
        "barrage_control_request_duration_seconds_count{route=\"console_api_edges\",status=\"401\"} 1",
        "barrage_control_request_duration_seconds_count{route=\"connect\",status=\"200\"}",
        "barrage_control_requests_total{route=\"room_page\"} 1",
    ] {
        assert!(text.contains(line), "{line} not in\n{text}");
    }
    assert!(
        text.contains("barrage_control_edges{state=\"dead\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("barrage_control_tokens_issued_total{kind=\"user\"} 1"),
        "{text}"
    );

    // Oversized bodies never reach the handler.
    let big = format!(r#"{{"room":1,"device":"{}"}}"#, "x".repeat(32 * 1024));
    assert_eq!(call(&addr, "POST", "/v1/connect", &[], &big).status, 413);
    let text = String::from_utf8(call(&addr, "GET", "/metrics", &[], "").body).unwrap();
    assert!(
        text.contains("barrage_control_http_refused_total{reason=\"too_large\"} 1"),
        "every refusal is counted: {text}"
    );

    handle.shutdown();
}

#[test]
fn bind_conflicts_and_bad_keys_fail_start() {
    let first = control::start(config()).unwrap();
    let mut cfg = config();
    cfg.http_addr = first.http_addr();
    assert!(matches!(
        control::start(cfg),
        Err(control::ControlError::Bind { .. })
    ));
    let mut cfg = config();
    cfg.token_keys = String::new();
    assert!(matches!(
        control::start(cfg),
        Err(control::ControlError::Config(_))
    ));
    first.shutdown();
}
