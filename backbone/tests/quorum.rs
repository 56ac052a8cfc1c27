//! The backbone's setup against a three-server NATS cluster that has no quorum yet: only one
//! server runs, so JetStream has no meta leader and answers a stream request with nothing (for
//! its first seconds) or `503`. That is what a broker met when `barrage cluster --nats 3`
//! started two brokers together under load: the loser of the race to create the R3 stream asked
//! for it while its replicas were still electing a leader, got no answer, and waited out the
//! client's 10 s request timeout (or gave up after five quick `503`s).
//!
//! Skips when nats-server is not installed, unless `BARRAGE_REQUIRE_NATS` is set.

mod common;

use backbone::{Backbone, BrokerId, Config, Sink};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

/// The old setup tried a stream request five times in all before giving up; one that keeps
/// trying until `setup_ms_max` makes more.
const SETUP_TRIES_OLD_MAX: u64 = 5;

struct Server {
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Three servers' ports (client, route, monitor), their store and config files in `dir`.
struct Plan {
    dir: PathBuf,
    nodes: Vec<(u16, u16, u16)>,
}

impl Plan {
    fn new() -> Plan {
        let dir =
            std::env::temp_dir().join(format!("barrage-quorum-{}-{}", std::process::id(), port()));
        std::fs::create_dir_all(&dir).expect("dir");
        let nodes = (0..3).map(|_| (port(), port(), port())).collect();
        Plan { dir, nodes }
    }

    fn url(&self, i: usize) -> String {
        format!("nats://{}", loopback(self.nodes[i].0))
    }

    /// Starts server `i` (None: nats-server not installed and not required).
    fn start(&self, i: usize) -> Option<Server> {
        let (client, route, monitor) = self.nodes[i];
        let routes = self
            .nodes
            .iter()
            .map(|n| format!("\"nats://127.0.0.1:{}\"", n.1))
            .collect::<Vec<_>>()
            .join(", ");
        let store = self.dir.join(format!("s{i}"));
        let conf = format!(
            "server_name: \"q{i}\"\nlisten: \"127.0.0.1:{client}\"\nhttp: \"127.0.0.1:{monitor}\"\n\
             jetstream {{ store_dir: {:?} }}\n\
             cluster {{ name: \"q\", listen: \"127.0.0.1:{route}\", routes: [{routes}] }}\n",
            store.display().to_string()
        );
        let file = self.dir.join(format!("q{i}.conf"));
        std::fs::write(&file, conf).expect("conf");
        let child = common::spawn_nats(&file, loopback(client))?;
        Some(Server { child })
    }

    /// Messages the clients named `name` have published to server `i` (each JetStream API
    /// request is one), from its monitor's `/connz`.
    fn published_by(&self, i: usize, name: &str) -> u64 {
        let Some(body) = http_get(loopback(self.nodes[i].2), "/connz") else {
            return 0;
        };
        // One connection object per client: `"name": "<name>"` and its `"in_msgs": N`.
        body.split("\"cid\"")
            .filter(|c| c.contains(&format!("\"name\": \"{name}\"")))
            .filter_map(|c| {
                let rest = c.split("\"in_msgs\":").nth(1)?;
                rest.trim_start()
                    .split(|ch: char| !ch.is_ascii_digit())
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    }
}

impl Drop for Plan {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    Some(out)
}

fn config(plan: &Plan, setup_ms_max: u64) -> Config {
    Config {
        servers: plan.url(0),
        stream: "QUORUM".into(),
        partitions: 4,
        replicas: 3,
        lease_ms: 1_500,
        ack_wait_ms: 1_000,
        setup_ms_max,
        join_wait_ms_max: 0,
        ..Config::default()
    }
}

/// `Backbone::start` on a thread of its own; its result comes through the receiver.
fn start_backbone(
    config: Config,
    me: &str,
) -> std::sync::mpsc::Receiver<Result<Backbone, backbone::BackboneError>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let me = BrokerId::new(me).expect("broker id");
    std::thread::spawn(move || {
        let (sink, _events, _notify) = Sink::new(1024);
        let _ = tx.send(Backbone::start(config, me, vec![sink]));
    });
    rx
}

/// With one server of three up there is no quorum: a backbone that may wait 2 s fails naming
/// the stream it waited for and why; one that may wait longer keeps asking (more than the
/// five tries the old setup gave up after) and comes up once the other two servers start and
/// the cluster elects its leaders.
#[test]
fn setup_waits_for_a_nats_cluster_to_elect_its_leaders() {
    let plan = Plan::new();
    let Some(first) = plan.start(0) else { return };

    let quick = start_backbone(config(&plan, 2_000), "quick")
        .recv_timeout(Duration::from_secs(60))
        .expect("setup ends within its setup_ms_max");
    let Err(e) = quick else {
        panic!("a stream at R3 was made with one server of three up");
    };
    let e = e.to_string();
    assert!(
        e.contains("stream QUORUM (R3) not ready") && e.contains("meta leader"),
        "the error names what did not become ready and why: {e}"
    );

    let patient = start_backbone(config(&plan, 60_000), "patient");
    let until = Instant::now() + Duration::from_secs(60);
    while plan.published_by(0, "barrage-broker-patient") <= SETUP_TRIES_OLD_MAX {
        if let Ok(r) = patient.try_recv() {
            panic!(
                "setup ended before the cluster had a quorum: {:?}",
                r.map(|_| "started")
            );
        }
        assert!(Instant::now() < until, "setup made no more requests");
        std::thread::sleep(Duration::from_millis(100));
    }
    let others = (plan.start(1), plan.start(2));
    let bb = patient
        .recv_timeout(Duration::from_secs(90))
        .expect("setup ends within its setup_ms_max")
        .expect("the backbone starts once the cluster has its leaders");
    bb.close();
    drop((others, first));
}
