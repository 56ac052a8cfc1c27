//! The broker in control's registry (cluster mode, issue 12): with `control_addr` set, one
//! thread heartbeats `POST /v1/brokers/heartbeat` every `control_heartbeat_ms`, saying where
//! edges link to this broker. Control lists the live brokers of a region to its edges, which
//! link to every one of them (edge `link.rs`); a broker that stops heartbeating (killed,
//! partitioned from control) drops out of that list after control's `edge_ttl_ms`.
//!
//! A failed heartbeat is logged once and retried on the next interval; it never stops the
//! broker (pushes and links do not depend on control).
//!
//! In cluster mode every heartbeat says whether the backbone takes this broker's writes
//! (`backbone_down`, [`crate::cluster::Cluster::health`]): a broker whose NATS is gone cannot
//! accept or deliver, so control counts it as not alive for assigning its region, while edges
//! keep their links to it (it is back within a heartbeat of its NATS).
//!
//! # Joining (cluster mode)
//! A broker that starts while edges are running must not take partitions before those edges
//! have linked to it: it would find nobody watching the rooms that moved to it and ack their
//! messages unsent. So until every edge control lists as up in this broker's region has a
//! link to each of its shards, the backbone holds its acquisitions ([`backbone::Backbone::joined`]
//! ends the hold; `cluster.join_wait_ms_max` bounds it). Edges learn a new broker within one
//! of their heartbeats after control lists it, so the wait is about two heartbeats. A cluster
//! that starts before its edges (control lists none) takes partitions at once.

use crate::Shared;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// One heartbeat request may take this long.
const CONTROL_REQUEST_MS_MAX: u64 = 2_000;
/// The thread looks at the stop flag at least this often.
const STOP_POLL_MS: u64 = 100;
/// While joining, how often control's edge list is compared with this broker's links.
const JOIN_POLL_MS: u64 = 200;

/// Where this broker is reached, as told to control.
#[derive(Clone, Debug)]
pub(crate) struct Addrs {
    pub link: SocketAddr,
    pub ingest: SocketAddr,
    pub http: SocketAddr,
}

/// The host to advertise: `advertise_host`, else the bound IP (loopback for a wildcard bind).
fn host(config: &crate::Config, bound: SocketAddr) -> String {
    if !config.advertise_host.is_empty() {
        return config.advertise_host.clone();
    }
    let ip = bound.ip();
    if ip.is_unspecified() {
        "127.0.0.1".into()
    } else {
        match ip {
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
            v4 => v4.to_string(),
        }
    }
}

/// The heartbeat body (control's `brokers::BrokerBeat`). `backbone_down`: cluster mode with a
/// backbone that does not take this broker's writes ([`crate::cluster::Cluster::health`]), so
/// control does not count it for assigning its region.
pub(crate) fn body(
    config: &crate::Config,
    a: &Addrs,
    draining: bool,
    backbone_down: bool,
) -> serde_json::Value {
    let h = |addr: SocketAddr| format!("{}:{}", host(config, addr), addr.port());
    serde_json::json!({
        "node_id": config.node_id,
        "region": config.region,
        "link": h(a.link),
        "ingest": h(a.ingest),
        "http": format!("http://{}", h(a.http)),
        "draining": draining,
        "backbone_down": backbone_down,
    })
}

/// Spawns one heartbeat thread per control replica `control_addr` lists (comma-separated):
/// control is soft state, each replica must know every broker.
pub(crate) fn spawn(
    shared: Arc<Shared>,
    addrs: Addrs,
) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    let Some(controls) = shared.config.control_addr.clone() else {
        return Ok(Vec::new());
    };
    let mut threads = Vec::new();
    for control in controls.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        let (shared, addrs, control) = (shared.clone(), addrs.clone(), control.to_string());
        threads.push(
            std::thread::Builder::new()
                .name("broker-control".into())
                .spawn(move || {
                    net::runtime::block_on(
                        net::runtime::Driver::Legacy,
                        run(shared, control, addrs),
                    )
                })?,
        );
    }
    Ok(threads)
}

async fn run(shared: Arc<Shared>, control: String, addrs: Addrs) {
    let c = &shared.config;
    let every = Duration::from_millis(c.control_heartbeat_ms.max(100));
    let bearer = format!("Bearer {}", c.control_key);
    let mut headers = vec![("content-type", "application/json")];
    if !c.control_key.is_empty() {
        headers.push(("authorization", bearer.as_str()));
    }
    let mut failing = false;
    let mut joining = shared.cluster.is_some();
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let down = shared
            .cluster
            .as_ref()
            .is_some_and(|k| k.health() != backbone::Health::Up);
        let b = body(c, &addrs, false, down).to_string();
        let res = net::http::request(
            &control,
            "POST",
            "/v1/brokers/heartbeat",
            &headers,
            b.as_bytes(),
            Duration::from_millis(CONTROL_REQUEST_MS_MAX),
        )
        .await;
        match res {
            Ok(r) if r.status == 200 => {
                if failing {
                    tracing::info!(%control, "control takes broker heartbeats again");
                }
                failing = false;
            }
            Ok(r) => {
                if !failing {
                    tracing::warn!(%control, status = r.status, "control refused the broker heartbeat");
                }
                failing = true;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(%control, error = %e, "broker heartbeat to control failed");
                }
                failing = true;
            }
        }
        let mut left = every;
        while !left.is_zero() {
            if shared.stop.load(Ordering::Acquire) {
                break;
            }
            if joining && edges_linked(&shared, &control, &headers).await {
                joining = false;
                if let Some(cluster) = &shared.cluster {
                    tracing::info!(%control, "every listed edge has linked: taking partitions");
                    cluster.joined();
                }
            }
            let step = left.min(Duration::from_millis(if joining {
                JOIN_POLL_MS
            } else {
                STOP_POLL_MS
            }));
            monoio::time::sleep(step).await;
            left -= step;
        }
    }
}

/// Whether every edge `control` lists as up in this broker's region has linked to each of its
/// shards (false when control does not answer: the hold's bound covers that).
async fn edges_linked(shared: &Shared, control: &str, headers: &[(&str, &str)]) -> bool {
    let res = net::http::request(
        control,
        "GET",
        "/v1/edges",
        headers,
        b"",
        Duration::from_millis(CONTROL_REQUEST_MS_MAX),
    )
    .await;
    let Ok(r) = res else {
        return false;
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&r.body) else {
        return false;
    };
    let Some(edges) = v["edges"].as_array().filter(|_| r.status == 200) else {
        return false;
    };
    let region = shared.config.region.as_str();
    let up = edges
        .iter()
        .filter(|e| e["state"] == "up" && e["region"].as_str().unwrap_or_default() == region)
        .count() as u64;
    let linked = shared
        .shard_metrics
        .iter()
        .map(|m| m.edges.load(Ordering::Relaxed))
        .min()
        .unwrap_or(0);
    linked >= up
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertises_the_bound_ip_or_the_configured_host() {
        let mut c = crate::Config::default();
        let a = Addrs {
            link: "0.0.0.0:7401".parse().unwrap(),
            ingest: "10.1.2.3:7400".parse().unwrap(),
            http: "[::1]:7480".parse().unwrap(),
        };
        let b = body(&c, &a, false, false);
        assert_eq!(b["link"], "127.0.0.1:7401");
        assert_eq!(b["ingest"], "10.1.2.3:7400");
        assert_eq!(b["http"], "http://[::1]:7480");
        c.advertise_host = "broker-3.internal".into();
        let b = body(&c, &a, true, true);
        assert_eq!(b["link"], "broker-3.internal:7401");
        assert_eq!(b["draining"], true);
        assert_eq!(b["backbone_down"], true);
    }
}
