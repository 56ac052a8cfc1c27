//! The broker in control's registry (cluster mode, issue 12): with `control_addr` set, one
//! thread heartbeats `POST /v1/brokers/heartbeat` every `control_heartbeat_ms`, saying where
//! edges link to this broker. Control lists the live brokers of a region to its edges, which
//! link to every one of them (edge `link.rs`); a broker that stops heartbeating (killed,
//! partitioned from control) drops out of that list after control's `edge_ttl_ms`.
//!
//! A failed heartbeat is logged once and retried on the next interval; it never stops the
//! broker (pushes and links do not depend on control).

use crate::Shared;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// One heartbeat request may take this long.
const CONTROL_REQUEST_MS_MAX: u64 = 2_000;
/// The thread looks at the stop flag at least this often.
const STOP_POLL_MS: u64 = 100;

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

/// The heartbeat body (control's `brokers::BrokerBeat`).
pub(crate) fn body(config: &crate::Config, a: &Addrs, draining: bool) -> serde_json::Value {
    let h = |addr: SocketAddr| format!("{}:{}", host(config, addr), addr.port());
    serde_json::json!({
        "node_id": config.node_id,
        "region": config.region,
        "link": h(a.link),
        "ingest": h(a.ingest),
        "http": format!("http://{}", h(a.http)),
        "draining": draining,
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
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let b = body(c, &addrs, false).to_string();
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
            let step = left.min(Duration::from_millis(STOP_POLL_MS));
            monoio::time::sleep(step).await;
            left -= step;
        }
    }
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
        let b = body(&c, &a, false);
        assert_eq!(b["link"], "127.0.0.1:7401");
        assert_eq!(b["ingest"], "10.1.2.3:7400");
        assert_eq!(b["http"], "http://[::1]:7480");
        c.advertise_host = "broker-3.internal".into();
        let b = body(&c, &a, true);
        assert_eq!(b["link"], "broker-3.internal:7401");
        assert_eq!(b["draining"], true);
    }
}
