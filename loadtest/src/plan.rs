//! `barrage loadtest plan`: how many cores and hosts a fleet needs for a target audience, from
//! measured per-core figures (docs/capacity.md explains the model and where each figure comes
//! from). Pure arithmetic over a [`Figures`] JSON (defaults are this repository's own measured
//! figures); the output says which resource limits first.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// `barrage loadtest plan [--figures figures.json] [--json plan.json]`.
#[derive(clap::Args, Debug, Clone)]
pub struct PlanArgs {
    /// Figures and target as JSON (any field left out keeps its default; see docs/capacity.md).
    #[arg(long)]
    pub figures: Option<PathBuf>,
    /// Also write the plan as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Measured per-core figures, the host shape, and the audience to plan for.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Figures {
    /// Edge: batch writes per CPU-second of one shard (the fan-out bench, backlog regime).
    pub edge_sends_per_core_s: f64,
    /// Edge: user-space bytes per idle authenticated connection.
    pub edge_bytes_per_conn: f64,
    /// Kernel bytes per idle TCP connection (socket, buffers at rest); not ours but it counts.
    pub kernel_bytes_per_conn: f64,
    /// Broker: pushes accepted, batched, compressed and sent per CPU-second of one broker
    /// shard (compression included).
    pub broker_msgs_per_core_s: f64,
    /// Brotli: input MB per CPU-second at the broker's quality.
    pub brotli_mb_per_core_s: f64,
    /// Cores per host.
    pub host_cores: f64,
    /// Memory per host usable for connections, bytes.
    pub host_mem_bytes: f64,
    /// NIC bandwidth per host, bits per second.
    pub host_nic_bits_per_s: f64,
    /// Packets per second a host's NIC and kernel can send (one packet per small write).
    pub host_pps: f64,
    /// Target: concurrent viewers.
    pub viewers: f64,
    /// Target: viewers in the one hot room.
    pub hot_room_viewers: f64,
    /// Target: messages per second in the hot room.
    pub hot_room_msgs_per_s: f64,
    /// Target: quiet rooms sharing the other viewers.
    pub quiet_rooms: f64,
    /// Target: messages per second in each quiet room.
    pub quiet_room_msgs_per_s: f64,
    /// The broker's batch window: a room sends at most one batch per window.
    pub batch_window_ms: f64,
    /// Average message before compression, bytes.
    pub msg_bytes: f64,
    /// Compression ratio of a batch (original / compressed).
    pub compression_ratio: f64,
    /// TCP/IP + packet header bytes per write on the wire.
    pub wire_overhead_bytes: f64,
}

impl Default for Figures {
    /// This repository's figures (docs/benchmarks.md, docs/capacity.md) and the issue's target.
    fn default() -> Self {
        Figures {
            edge_sends_per_core_s: 100_000.0,
            edge_bytes_per_conn: 1_000.0,
            kernel_bytes_per_conn: 3_000.0,
            broker_msgs_per_core_s: 56_000.0,
            brotli_mb_per_core_s: 45.0,
            host_cores: 32.0,
            host_mem_bytes: 64e9,
            host_nic_bits_per_s: 25e9,
            host_pps: 5e6,
            viewers: 10e6,
            hot_room_viewers: 1e6,
            hot_room_msgs_per_s: 100.0,
            quiet_rooms: 10_000.0,
            quiet_room_msgs_per_s: 1.0,
            batch_window_ms: 50.0,
            msg_bytes: 557.0,
            compression_ratio: 3.3,
            wire_overhead_bytes: 66.0,
        }
    }
}

/// One resource's demand and the hosts it needs.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Need {
    pub resource: &'static str,
    pub demand: f64,
    pub unit: &'static str,
    pub per_host: f64,
    pub hosts: f64,
}

/// The plan: every resource's need and the one that limits first.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Plan {
    pub figures: Figures,
    /// Batch writes per second across the fleet.
    pub sends_per_s: f64,
    /// Bytes per second written to viewers.
    pub egress_bytes_per_s: f64,
    pub edge_cores: f64,
    pub broker_cores: f64,
    /// Of `broker_cores`, what brotli alone takes (the broker figure includes it).
    pub brotli_cores: f64,
    pub needs: Vec<Need>,
    /// The resource needing the most hosts.
    pub limit: &'static str,
    pub edge_hosts: f64,
}

/// Batches per second of one room: every message flushes at once until the window fills, then
/// one batch per window (the broker's flush rule).
fn batches_per_s(msgs_per_s: f64, window_ms: f64) -> f64 {
    msgs_per_s.min(1000.0 / window_ms.max(1.0))
}

/// The arithmetic (docs/capacity.md, "The formula").
pub fn plan(f: &Figures) -> Plan {
    let hot_batches = batches_per_s(f.hot_room_msgs_per_s, f.batch_window_ms);
    let quiet_batches = batches_per_s(f.quiet_room_msgs_per_s, f.batch_window_ms);
    let quiet_viewers = (f.viewers - f.hot_room_viewers).max(0.0);
    let hot_sends = f.hot_room_viewers * hot_batches;
    let quiet_sends = quiet_viewers * quiet_batches;
    let sends_per_s = hot_sends + quiet_sends;
    let batch_bytes = |msgs_per_s: f64, batches: f64| {
        let msgs_per_batch = (msgs_per_s / batches.max(1e-9)).max(1.0);
        msgs_per_batch * f.msg_bytes / f.compression_ratio.max(1.0) + 16.0
    };
    let hot_wire = batch_bytes(f.hot_room_msgs_per_s, hot_batches) + f.wire_overhead_bytes;
    let quiet_wire = batch_bytes(f.quiet_room_msgs_per_s, quiet_batches) + f.wire_overhead_bytes;
    let egress_bytes_per_s = hot_sends * hot_wire + quiet_sends * quiet_wire;
    let edge_cores = sends_per_s / f.edge_sends_per_core_s.max(1.0);
    let mem = f.viewers * (f.edge_bytes_per_conn + f.kernel_bytes_per_conn);
    let needs = vec![
        Need {
            resource: "edge cpu (sends)",
            demand: edge_cores,
            unit: "cores",
            per_host: f.host_cores,
            hosts: edge_cores / f.host_cores.max(1.0),
        },
        Need {
            resource: "memory (connections)",
            demand: mem,
            unit: "bytes",
            per_host: f.host_mem_bytes,
            hosts: mem / f.host_mem_bytes.max(1.0),
        },
        Need {
            resource: "nic bandwidth",
            demand: egress_bytes_per_s * 8.0,
            unit: "bit/s",
            per_host: f.host_nic_bits_per_s,
            hosts: egress_bytes_per_s * 8.0 / f.host_nic_bits_per_s.max(1.0),
        },
        Need {
            resource: "packets per second",
            demand: sends_per_s,
            unit: "packets/s",
            per_host: f.host_pps,
            hosts: sends_per_s / f.host_pps.max(1.0),
        },
    ];
    let msgs = f.hot_room_msgs_per_s + f.quiet_rooms * f.quiet_room_msgs_per_s;
    let brotli_bytes = msgs * f.msg_bytes;
    let broker_cores = msgs / f.broker_msgs_per_core_s.max(1.0);
    let brotli_cores = brotli_bytes / (f.brotli_mb_per_core_s.max(1e-9) * 1e6);
    let worst = needs
        .iter()
        .max_by(|a, b| a.hosts.total_cmp(&b.hosts))
        .map(|n| (n.resource, n.hosts))
        .unwrap_or(("none", 0.0));
    Plan {
        figures: f.clone(),
        sends_per_s,
        egress_bytes_per_s,
        edge_cores,
        broker_cores,
        brotli_cores,
        limit: worst.0,
        edge_hosts: worst.1.ceil(),
        needs,
    }
}

fn si(v: f64) -> String {
    let (d, s) = match v.abs() {
        x if x >= 1e12 => (1e12, "T"),
        x if x >= 1e9 => (1e9, "G"),
        x if x >= 1e6 => (1e6, "M"),
        x if x >= 1e3 => (1e3, "k"),
        _ => (1.0, ""),
    };
    format!("{:.2}{s}", v / d)
}

/// Runs the subcommand: reads figures, prints the plan, writes JSON if asked.
pub fn run(a: &PlanArgs) -> anyhow::Result<()> {
    let f: Figures = match &a.figures {
        Some(p) => serde_json::from_str(&std::fs::read_to_string(p)?)?,
        None => Figures::default(),
    };
    let p = plan(&f);
    println!(
        "sends/s {}  egress {}B/s  edge cores {:.0}  broker cores {:.2} (brotli {:.2} of it)",
        si(p.sends_per_s),
        si(p.egress_bytes_per_s),
        p.edge_cores,
        p.broker_cores,
        p.brotli_cores
    );
    println!(
        "{:<22} {:>12} {:>12} {:>8}",
        "resource", "demand", "per host", "hosts"
    );
    for n in &p.needs {
        println!(
            "{:<22} {:>12} {:>12} {:>8.1}",
            n.resource,
            format!("{}{}", si(n.demand), short(n.unit)),
            si(n.per_host),
            n.hosts
        );
    }
    println!("limits first: {} -> {} edge hosts", p.limit, p.edge_hosts);
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_vec_pretty(&p)?)?;
    }
    Ok(())
}

fn short(unit: &str) -> &'static str {
    match unit {
        "bytes" => "B",
        "bit/s" => "b/s",
        "packets/s" => "p/s",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_target_by_hand() {
        let f = Figures::default();
        let p = plan(&f);
        // Hot room: 100 msg/s with a 50 ms window = 20 batches/s to 1 M viewers; quiet rooms:
        // 1 msg/s each = 1 batch/s to the other 9 M viewers.
        assert_eq!(p.sends_per_s, 1e6 * 20.0 + 9e6 * 1.0);
        assert_eq!(p.edge_cores, 29e6 / 100_000.0);
        // 290 cores / 32 per host = 9.06 hosts; packets 29 M/s / 5 M = 5.8; NIC: a hot batch
        // is 5 messages (5 x 557 / 3.3 + 16 + 66 = 926 B), a quiet one 251 B:
        // (20 M x 926 + 9 M x 251) x 8 = 166 Gbit/s / 25 = 6.6; memory 40 GB / 64 = 0.6.
        assert_eq!(p.limit, "edge cpu (sends)");
        assert_eq!(p.edge_hosts, 10.0);
        let nic = &p.needs[2];
        assert!((nic.hosts - 6.65).abs() < 0.05, "{nic:?}");
    }

    #[test]
    fn quiet_rate_below_the_window_is_one_batch_per_message() {
        assert_eq!(batches_per_s(5.0, 50.0), 5.0);
        assert_eq!(batches_per_s(100.0, 50.0), 20.0);
    }

    #[test]
    fn figures_json_overrides_defaults() {
        let f: Figures = serde_json::from_str(r#"{"edge_sends_per_core_s": 1000000}"#).unwrap();
        assert_eq!(f.edge_sends_per_core_s, 1e6);
        assert_eq!(f.viewers, Figures::default().viewers);
        assert!(serde_json::from_str::<Figures>(r#"{"nope": 1}"#).is_err());
    }
}
