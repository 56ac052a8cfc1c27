//! Control across regions (issue 13) with real processes of the `barrage` binary: two
//! controls of different regions that poll each other's registry, an edge registered with
//! each (and a broker in region b), on loopback.
//!
//! - assignment: the client's region first, the other region's edge as the fallback in
//!   `host_list`; `?region=` picks the region; an unknown name gets the default and is counted;
//!   a region whose edges or brokers are gone (SIGKILL) is not assigned; a dark region (its
//!   control killed too) ages out of the other control's list.
//! - tokens: a token of either control is valid at the edges of both regions; a key rotation
//!   done everywhere (SIGHUP) refuses the rotated-out key in both regions, and each control
//!   reports whether its peer signs with the same key set while the rotation is half done.

mod common;

#[path = "common/ports.rs"]
mod ports;

use common::{auth_body, http_json, Viewer, API_KEY, WAIT};
use ports::free_port;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Heartbeats and polls are fast so the test takes seconds; liveness is a few of them.
const HEARTBEAT_MS: &str = "100";
const POLL_MS: &str = "100";
const TTL_MS: &str = "2000";
const KEY1: &str = "1:first-secret-0123456789";
const KEY12: &str = "1:first-secret-0123456789,2:second-secret-0123456789";
const KEY2: &str = "2:second-secret-0123456789";
const ROOM: u64 = 7;
const FLEET_KEY: &str = "fleet-key-0123456789abcdef0123456789";

/// A `barrage` child process, SIGKILLed on drop.
struct Proc {
    child: Child,
    banner: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// `barrage ROLE --config FILE --set K=V...`, waiting for its banner line.
    fn start(role: &str, file: &PathBuf, sets: &[(&str, String)]) -> Proc {
        let mut c = Command::new(env!("CARGO_BIN_EXE_barrage"));
        c.env("RUST_LOG", "error");
        for (k, _) in std::env::vars() {
            if k.starts_with("BARRAGE_") {
                c.env_remove(k);
            }
        }
        c.arg(role).arg("--config").arg(file);
        for (k, v) in sets {
            c.arg("--set").arg(format!("{k}={v}"));
        }
        let mut child = c
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut banner = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut banner)
            .unwrap();
        assert!(!banner.is_empty(), "{role} exited before its banner");
        Proc { child, banner }
    }

    /// The address after `label` in the banner.
    fn addr(&self, label: &str) -> SocketAddr {
        self.banner
            .split(label)
            .nth(1)
            .and_then(|r| r.split([',', ' ', '\n']).next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no {label:?} in {:?}", self.banner))
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGHUP: re-read the config file (token keys).
    fn reload(&self) {
        let ok = Command::new("kill")
            .arg("-HUP")
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }
}

fn q(s: &str) -> String {
    format!("\"{s}\"")
}

/// A config file holding only the token keys (what a rotation rewrites).
fn keys_file(dir: &std::path::Path, name: &str, keys: &str) -> PathBuf {
    let f = dir.join(name);
    std::fs::write(&f, format!("token_keys = {}\n", q(keys))).unwrap();
    f
}

/// Two regions: `a` and `b`, a control and an edge each, every file in `dir`.
struct Regions {
    dir: PathBuf,
    controls: [Proc; 2],
    edges: [Proc; 2],
}

/// A control of `region` on `port` (its key file `control-{name}.toml`) polling `peers`.
fn control(dir: &std::path::Path, name: &str, region: &str, port: u16, peers: &[u16]) -> Proc {
    let file = keys_file(dir, &format!("control-{name}.toml"), KEY1);
    let peers: Vec<String> = peers.iter().map(|p| q(&format!("127.0.0.1:{p}"))).collect();
    Proc::start(
        "control",
        &file,
        &[
            ("http_addr", q(&format!("127.0.0.1:{port}"))),
            ("api_keys", format!("[{}]", q(API_KEY))),
            ("region", q(region)),
            ("default_region", q(region)),
            ("peers", format!("[{}]", peers.join(","))),
            // Each polls the other with a key good for the fleet lists only.
            ("fleet_keys", format!("[{}]", q(FLEET_KEY))),
            ("peer_key", q(FLEET_KEY)),
            ("peer_poll_ms", POLL_MS.into()),
            ("edge_ttl_ms", TTL_MS.into()),
            ("driver", q("legacy")),
        ],
    )
}

/// An edge of `region` heartbeating `controls` (`host:port,host:port`).
fn edge(dir: &std::path::Path, region: &str, controls: &str) -> Proc {
    let file = keys_file(dir, &format!("edge-{region}.toml"), KEY1);
    Proc::start(
        "edge",
        &file,
        &[
            ("node_id", q(&format!("edge-{region}"))),
            ("region", q(region)),
            ("shards", "1".into()),
            ("pin", "false".into()),
            ("tcp_addr", q("127.0.0.1:0")),
            ("ws_addr", q("127.0.0.1:0")),
            ("admin_addr", q("127.0.0.1:0")),
            ("control_addr", q(controls)),
            ("control_heartbeat_ms", HEARTBEAT_MS.into()),
        ],
    )
}

impl Regions {
    fn start(name: &str) -> Regions {
        let dir = std::env::temp_dir().join(format!("barrage-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (pa, pb) = (free_port(), free_port());
        let controls = [
            control(&dir, "a", "a", pa, &[pb]),
            control(&dir, "b", "b", pb, &[pa]),
        ];
        let edges = [
            edge(&dir, "a", &controls[0].addr("http://").to_string()),
            edge(&dir, "b", &controls[1].addr("http://").to_string()),
        ];
        let r = Regions {
            dir,
            controls,
            edges,
        };
        // Each control knows both edges: its own by heartbeat, the other's from its peer.
        for c in 0..2 {
            r.wait(&format!("control {c} sees both edges"), || {
                r.hosts(c, None).len() == 2
            });
        }
        r
    }

    fn control(&self, i: usize) -> SocketAddr {
        self.controls[i].addr("http://")
    }

    fn edge_tcp(&self, i: usize) -> SocketAddr {
        self.edges[i].addr("tcp ")
    }

    /// The TCP ports of `host_list` from control `i` (discovery, as third-party clients call it).
    fn hosts(&self, i: usize, region: Option<&str>) -> Vec<u16> {
        let mut path = format!("/xlive/web-room/v1/index/getDanmuInfo?id={ROOM}");
        if let Some(r) = region {
            path.push_str(&format!("&region={r}"));
        }
        let (status, v) = http_json(self.control(i), "GET", &path, &[], "");
        assert_eq!(status, 200, "{v}");
        v["data"]["host_list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["port"].as_u64().unwrap() as u16)
            .collect()
    }

    fn metrics(&self, i: usize) -> String {
        let addr = self.control(i);
        net::runtime::block_on(net::runtime::Driver::Legacy, async move {
            net::http::request(
                &addr.to_string(),
                "GET",
                "/metrics",
                &[],
                b"",
                Duration::from_secs(5),
            )
            .await
        })
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .unwrap()
    }

    /// Polls `cond` until it holds (bounded by `WAIT`; a failure names what was awaited).
    fn wait(&self, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting: {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Regions {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn each_control_assigns_its_region_first_and_the_other_as_fallback() {
    let mut r = Regions::start("regions-assign");
    let (ea, eb) = (r.edge_tcp(0).port(), r.edge_tcp(1).port());
    assert_eq!(
        r.hosts(0, None),
        [ea, eb],
        "a's clients: a first, b as fallback"
    );
    assert_eq!(
        r.hosts(1, None),
        [eb, ea],
        "b's clients: b first, a as fallback"
    );
    assert_eq!(r.hosts(0, Some("b")), [eb, ea], "?region=b at a's control");
    // A region nobody knows: the default region (a at a's control), counted.
    assert_eq!(r.hosts(0, Some("atlantis")), [ea, eb]);
    let m = r.metrics(0);
    let unknown = value(
        &m,
        "barrage_control_region_unknown_total",
        &["source=\"param\""],
    );
    assert_eq!(unknown, Some(1.0), "{m}");
    let peer_up = value(&m, "barrage_control_peer_up", &["region=\"b\""]);
    assert_eq!(peer_up, Some(1.0), "{m}");
    let keys = value(&m, "barrage_control_peer_token_keys_match", &[]);
    assert_eq!(keys, Some(1.0), "{m}");
    // POST /v1/connect says which region the client was judged to be in.
    let (_, v) = http_json(
        r.control(0),
        "POST",
        "/v1/connect?region=b",
        &[],
        &format!(r#"{{"room":{ROOM}}}"#),
    );
    assert_eq!(v["region"], "b", "{v}");
    assert_eq!(v["edges"][0]["region"], "b", "{v}");
    // The reference client names its region in control's URL.
    let tail = Command::new(env!("CARGO_BIN_EXE_barrage"))
        .env("RUST_LOG", "error")
        .args(["tail", "--room", &ROOM.to_string(), "--timeout-ms", "300"])
        .arg("--control")
        .arg(format!("http://{}/?region=b", r.control(0)))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&tail.stderr);
    assert!(
        said.contains(&format!("connected to 127.0.0.1:{eb} ")),
        "{said}"
    );
    // The fleet list shows where each edge was learned.
    let (_, edges) = http_json(
        r.control(0),
        "GET",
        "/v1/edges",
        &[("authorization", &format!("Bearer {API_KEY}"))],
        "",
    );
    let via: Vec<(String, bool)> = edges["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["node_id"].as_str().unwrap().to_string(),
                e.get("peer").is_some(),
            )
        })
        .collect();
    assert_eq!(
        via,
        [("edge-a".to_string(), false), ("edge-b".to_string(), true)]
    );
    let (_, only_b) = http_json(r.control(0), "GET", "/v1/edges?region=b", &[], "");
    assert_eq!(
        only_b["edges"].as_array().map(Vec::len),
        Some(1),
        "{only_b}"
    );
    assert_eq!(only_b["edges"][0]["node_id"], "edge-b");

    // A broker in region b: then b is assigned only while a broker of it lives.
    let broker_file = r.dir.join("broker-b.toml");
    std::fs::write(&broker_file, "").unwrap();
    let mut broker = Proc::start(
        "broker",
        &broker_file,
        &[
            ("node_id", q("broker-b")),
            ("region", q("b")),
            ("shards", "1".into()),
            ("pin", "false".into()),
            ("ingest_addr", q("127.0.0.1:0")),
            ("link_addr", q("127.0.0.1:0")),
            ("http_addr", q("127.0.0.1:0")),
            ("control_addr", q(&r.control(1).to_string())),
            ("control_heartbeat_ms", HEARTBEAT_MS.into()),
            (
                "data_dir",
                q(&r.dir.join("broker-b-data").to_string_lossy()),
            ),
        ],
    );
    let known = |r: &Regions| {
        let (_, v) = http_json(r.control(0), "GET", "/v1/brokers", &[], "");
        v["brokers"].as_array().is_some_and(|b| {
            b.iter()
                .any(|b| b["node_id"] == "broker-b" && b["alive"] == true)
        })
    };
    r.wait("a's control learns b's broker", || known(&r));
    assert_eq!(r.hosts(0, Some("b")), [eb, ea]);
    broker.kill();
    // b's edge still heartbeats, but b has no broker: neither control sends clients there.
    r.wait("b unassigned at a", || r.hosts(0, Some("b")) == [ea]);
    r.wait("b unassigned at b", || r.hosts(1, None) == [ea]);
    let m = r.metrics(1);
    let b_ok = value(&m, "barrage_control_region_assignable", &["region=\"b\""]);
    assert_eq!(b_ok, Some(0.0), "{m}");
    let fallbacks = value(
        &m,
        "barrage_control_assignments_total",
        &["choice=\"fallback\""],
    );
    assert!(fallbacks >= Some(1.0), "{m}");

    // a's edge dies: a's clients get nothing in a, and b is unhealthy: nothing at all.
    r.edges[0].kill();
    r.wait("a's dead edge not assigned", || r.hosts(0, None).is_empty());
    let m = r.metrics(0);
    let empty = value(
        &m,
        "barrage_control_assignments_total",
        &["choice=\"empty\""],
    );
    assert!(empty >= Some(1.0), "{m}");
}

#[test]
fn a_dark_region_ages_out_of_the_other_control() {
    let mut r = Regions::start("regions-dark");
    let (ea, eb) = (r.edge_tcp(0).port(), r.edge_tcp(1).port());
    assert_eq!(r.hosts(0, Some("b")), [eb, ea]);
    // Region b goes dark at once: its control and its edge are SIGKILLed.
    r.controls[1].kill();
    r.edges[1].kill();
    r.wait("b's edge ages out at a", || r.hosts(0, Some("b")) == [ea]);
    let m = r.metrics(0);
    let peer_up = value(&m, "barrage_control_peer_up", &["region=\"b\""]);
    assert_eq!(peer_up, Some(0.0), "peer b is down: {m}");
    let failed = value(
        &m,
        "barrage_control_peer_polls_total",
        &["outcome=\"failed\""],
    );
    assert!(failed >= Some(1.0), "{m}");
}

/// Whether edge `i` admits a viewer with `token` (auth reply 0).
fn admits(r: &Regions, i: usize, uid: u64, token: &str) -> bool {
    Viewer::tcp(r.edge_tcp(i)).auth(&auth_body(uid, ROOM, token)) == 0
}

fn token_from(r: &Regions, i: usize, uid: u64) -> String {
    common::connect_ticket(r.control(i), ROOM, uid).token
}

fn keys_match(r: &Regions, i: usize) -> Option<bool> {
    value(&r.metrics(i), "barrage_control_peer_token_keys_match", &[]).map(|v| v == 1.0)
}

/// The value of the first sample of metric `name` whose labels contain every one of `labels`.
fn value(page: &str, name: &str, labels: &[&str]) -> Option<f64> {
    page.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn tokens_work_in_every_region_and_a_rotated_out_key_is_refused_in_both() {
    let r = Regions::start("regions-keys");
    let old = token_from(&r, 0, 1);
    let from_b = token_from(&r, 1, 2);
    for edge in 0..2 {
        assert!(admits(&r, edge, 1, &old), "a's token at edge {edge}");
        assert!(admits(&r, edge, 2, &from_b), "b's token at edge {edge}");
    }
    r.wait("controls agree on the key set", || {
        keys_match(&r, 0) == Some(true) && keys_match(&r, 1) == Some(true)
    });
    // Rotation, step 1: key 2 added everywhere, edges first (they must verify what controls
    // sign). Control a is reloaded before b: for a moment they disagree, and say so.
    let rotate = |keys: &str, order: &[(bool, usize)]| {
        for &(is_control, i) in order {
            let (name, p) = if is_control {
                (format!("control-{}", ["a", "b"][i]), &r.controls[i])
            } else {
                (format!("edge-{}", ["a", "b"][i]), &r.edges[i])
            };
            keys_file(&r.dir, &format!("{name}.toml"), keys);
            p.reload();
        }
    };
    rotate(KEY12, &[(false, 0), (false, 1), (true, 0)]);
    r.wait("a signs with key 2", || {
        proto::token::KeySet::parse(KEY2)
            .unwrap()
            .verify(&token_from(&r, 0, 3), common::unix_now_s())
            .is_ok()
    });
    r.wait("a sees b's key set differ", || {
        keys_match(&r, 0) == Some(false)
    });
    rotate(KEY12, &[(true, 1)]);
    r.wait("the key sets agree again", || {
        keys_match(&r, 0) == Some(true) && keys_match(&r, 1) == Some(true)
    });
    // Step 2: key 1 retired everywhere.
    rotate(KEY2, &[(true, 0), (true, 1), (false, 0), (false, 1)]);
    r.wait("key 1 refused at both edges", || {
        !admits(&r, 0, 1, &old) && !admits(&r, 1, 1, &old)
    });
    let new = token_from(&r, 1, 4);
    assert!(admits(&r, 0, 4, &new), "b's new token at a's edge");
    assert!(admits(&r, 1, 4, &new), "b's new token at b's edge");
    r.wait("the key sets agree after the rotation", || {
        keys_match(&r, 0) == Some(true) && keys_match(&r, 1) == Some(true)
    });
}

/// With control replicas: region a has two, both polled by b's control; a's edge heartbeats
/// both. One of a's replicas dies: b still sees a's edge through the other.
#[test]
fn a_peer_region_with_replicas_survives_losing_one() {
    let dir = std::env::temp_dir().join(format!("barrage-regions-ha-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (pa1, pa2, pb) = (free_port(), free_port(), free_port());
    let mut a1 = control(&dir, "a1", "a", pa1, &[pb]);
    let _a2 = control(&dir, "a2", "a", pa2, &[pb]);
    let b = control(&dir, "b", "b", pb, &[pa1, pa2]);
    let _edge_a = edge(&dir, "a", &format!("127.0.0.1:{pa1},127.0.0.1:{pa2}"));
    let b_addr = b.addr("http://");
    let edge_a_at_b = || {
        let (_, v) = http_json(b_addr, "GET", "/v1/edges?region=a", &[], "");
        v["edges"][0]["state"] == "up"
    };
    let deadline = Instant::now() + WAIT;
    while !edge_a_at_b() {
        assert!(Instant::now() < deadline, "b never learned a's edge");
        std::thread::sleep(Duration::from_millis(50));
    }
    a1.kill();
    let a1_down = || {
        let m = net::runtime::block_on(net::runtime::Driver::Legacy, async move {
            net::http::request(&b_addr.to_string(), "GET", "/metrics", &[], b"", WAIT).await
        })
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .unwrap();
        value(
            &m,
            "barrage_control_peer_up",
            &[&format!("127.0.0.1:{pa1}")],
        ) == Some(0.0)
    };
    while !a1_down() {
        assert!(Instant::now() < deadline, "b never saw a1 go down");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Longer than the liveness window: had b only heard of the edge through a1, it would be
    // dead now; through a2 it stays up (checked by hand: with b polling a1 alone this fails).
    std::thread::sleep(Duration::from_millis(TTL_MS.parse::<u64>().unwrap() + 500));
    assert!(edge_a_at_b(), "a's edge is still up at b through a2");
    let _ = std::fs::remove_dir_all(&dir);
}
