//! Control client: registers this edge and reports load every `control_heartbeat_ms`
//! (`POST /v1/edges/heartbeat`, see notes/roles.md). Control drops an edge whose heartbeats
//! stop, so a failed heartbeat is only logged and retried on the next interval. Heartbeats
//! carry `Authorization: Bearer <edge_key>` when the edge has one: control refuses heartbeats
//! from non-loopback peers without it, so a stranger cannot register a fake edge.

use crate::shard::Node;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// One heartbeat request may take this long.
const CONTROL_REQUEST_MS_MAX: u64 = 2_000;

/// The client ports this edge serves; 0 for a transport it does not serve.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ports {
    pub tcp: u16,
    pub ws: u16,
    pub wss: u16,
    /// TLS over raw TCP (`tls_tcp_addr`).
    pub tls_tcp: u16,
    /// UDP (`udp_addr`).
    pub udp: u16,
}

/// The heartbeat body.
pub(crate) fn heartbeat_body(node: &Node, ports: Ports) -> serde_json::Value {
    serde_json::json!({
        "node_id": node.config.node_id,
        "region": node.config.region,
        "host": node.config.public_host,
        "tcp_port": ports.tcp,
        "ws_port": ports.ws,
        "wss_port": ports.wss,
        "tls_tcp_port": ports.tls_tcp,
        "udp_port": ports.udp,
        "connections": node.connections(),
        "capacity": node.capacity,
        "draining": node.draining.load(Ordering::Relaxed),
    })
}

/// Sends heartbeats until the node stops.
pub(crate) async fn heartbeat_loop(node: Arc<Node>, addr: String, ports: Ports) {
    let every = Duration::from_millis(node.config.control_heartbeat_ms.max(100));
    let mut failing = false;
    // Control's `edge_key`: without it control takes heartbeats from loopback peers only.
    let bearer = format!("Bearer {}", node.config.edge_key);
    let mut headers = vec![("content-type", "application/json")];
    if !node.config.edge_key.is_empty() {
        headers.push(("authorization", bearer.as_str()));
    }
    loop {
        if node.stop.load(Ordering::Acquire) {
            return;
        }
        let body = heartbeat_body(&node, ports).to_string();
        let res = net::http::request(
            &addr,
            "POST",
            "/v1/edges/heartbeat",
            &headers,
            body.as_bytes(),
            Duration::from_millis(CONTROL_REQUEST_MS_MAX),
        )
        .await;
        match res {
            Ok(r) if r.status == 200 => {
                if failing {
                    tracing::info!(control = %addr, "control heartbeats accepted again");
                }
                failing = false;
            }
            Ok(r) => {
                if !failing {
                    tracing::warn!(control = %addr, status = r.status, "control refused heartbeat");
                }
                failing = true;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(control = %addr, error = %e, "control heartbeat failed");
                }
                failing = true;
            }
        }
        // Sleep in short steps so shutdown is prompt.
        let mut left = every;
        while !left.is_zero() {
            if node.stop.load(Ordering::Acquire) {
                return;
            }
            let step = left.min(Duration::from_millis(100));
            monoio::time::sleep(step).await;
            left -= step;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_advertises_wss_only_when_served() {
        let node = Node::new(
            crate::Config::default(),
            proto::token::KeySet::default(),
            10,
        );
        let off = heartbeat_body(
            &node,
            Ports {
                tcp: 2243,
                ws: 2244,
                wss: 0,
                tls_tcp: 0,
                udp: 0,
            },
        );
        assert_eq!(off["wss_port"], 0);
        let on = heartbeat_body(
            &node,
            Ports {
                tcp: 2243,
                ws: 2244,
                wss: 2245,
                tls_tcp: 2247,
                udp: 2246,
            },
        );
        assert_eq!(on["wss_port"], 2245);
        assert_eq!(on["ws_port"], 2244);
        assert_eq!(
            (on["udp_port"].as_u64(), on["tls_tcp_port"].as_u64()),
            (Some(2246), Some(2247))
        );
        assert_eq!(
            (off["udp_port"].as_u64(), off["tls_tcp_port"].as_u64()),
            (Some(0), Some(0))
        );
    }
}
