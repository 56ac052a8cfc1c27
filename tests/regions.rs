//! Regions through the real binary (issue 13): `barrage cluster --regions 2` starts two regions
//! on loopback, each with its own NATS (JetStream domain = region name, joined by a leafnode),
//! control, broker and edge. A push accepted in either region reaches the viewers of both,
//! once; a backlog held up by a partition is dropped as stale when it is low priority; a
//! viewer and an ingest client fail over to the other region when one goes dark; high reach
//! follows a user who moved regions.
//!
//! `./scripts/test.sh` installs nats-server and sets `BARRAGE_REQUIRE_NATS=1`, so these tests
//! fail there rather than skip when it is missing.

mod common;

use common::cluster::*;
use common::*;
use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[path = "common/ports.rs"]
mod ports;
use ports::free_port;

/// Starts `barrage cluster --regions 2` with `args` and returns it with its JSON line parsed.
fn start_regions(args: &[&str]) -> (ClusterProc, serde_json::Value) {
    let mut all = vec!["--regions", "2", "--brokers", "1", "--edges", "1"];
    all.extend(["--partitions", "8", "--lease-ms", "1500"]);
    all.extend_from_slice(args);
    let (cluster, v) = start_cluster(&all);
    assert_eq!(v["regions"].as_array().map(Vec::len), Some(2), "{v}");
    (cluster, v)
}

/// One region of the cluster's JSON.
struct Region {
    control: SocketAddr,
    ingest: SocketAddr,
    broker_http: SocketAddr,
    edge_tcp: SocketAddr,
    pids: Vec<u64>,
}

fn region(v: &serde_json::Value, i: usize) -> Region {
    let r = &v["regions"][i];
    let mut pids: Vec<u64> = Vec::new();
    for part in ["nats", "controls", "brokers", "edges"] {
        for p in r[part].as_array().unwrap() {
            pids.push(p["pid"].as_u64().unwrap());
        }
    }
    Region {
        control: addr_of(&r["control"]),
        ingest: addr_of(&r["brokers"][0]["ingest"]),
        broker_http: addr_of(&r["brokers"][0]["http"]),
        edge_tcp: addr_of(&r["edges"][0]["tcp"]),
        pids,
    }
}

/// A viewer of `room` as `uid` on the region's edge, with a token from the region's control.
fn viewer(r: &Region, room: u64, uid: u64, ack: bool) -> Viewer {
    let t = connect_ticket(r.control, room, uid);
    let mut v = Viewer::tcp(r.edge_tcp);
    let mut body = auth_body(uid, room, &t.token);
    body.ack = ack;
    assert_eq!(v.auth(&body), 0);
    v
}

/// A ticket from `control` once its `host_list` names `fallback` (another region's edge,
/// learned from that region's control), with the list as addresses.
fn ticket_with_fallback(
    control: SocketAddr,
    room: u64,
    uid: u64,
    fallback: SocketAddr,
) -> (Ticket, Vec<SocketAddr>) {
    let deadline = Instant::now() + WAIT;
    loop {
        let t = connect_ticket(control, room, uid);
        let hosts: Vec<SocketAddr> = t
            .edges
            .iter()
            .filter_map(|e| {
                format!("{}:{}", e["host"].as_str()?, e["tcp_port"].as_u64()?)
                    .parse()
                    .ok()
            })
            .collect();
        if hosts.contains(&fallback) {
            return (t, hosts);
        }
        assert!(
            Instant::now() < deadline,
            "control never listed the other region's edge: {:?}",
            t.edges
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Pushes through `client`, retrying while the answer is `overloaded` (not accepted).
fn push(client: &mut broker::IngestClient, m: &broker::Message) -> u64 {
    let deadline = Instant::now() + WAIT;
    loop {
        match client.push(m) {
            Ok(id) => return id.0,
            Err(e) if e.push_error() == Some(&proto::ingest::PushError::Overloaded) => {
                assert!(Instant::now() < deadline, "never accepted");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("push failed: {e}"),
        }
    }
}

fn numbered(room: u64, origin: &str, n: u64) -> broker::Message {
    broker::Message::room(room, format!(r#"{{"cmd":"N","o":"{origin}","n":{n}}}"#))
}

/// Reads bodies until `done` holds for what was read, or `within` passes; returns them
/// parsed as JSON.
fn read_for(
    v: &mut Viewer,
    within: Duration,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while !done(&got) && Instant::now() < deadline {
        if let Some(m) = v.next_message(deadline) {
            if let Ok(j) = serde_json::from_str::<serde_json::Value>(&m) {
                got.push(j);
            }
        }
    }
    got
}

/// `(origin, n)` of each numbered body, in arrival order.
fn numbers(got: &[serde_json::Value]) -> Vec<(String, u64)> {
    got.iter()
        .filter_map(|j| Some((j["o"].as_str()?.to_owned(), j["n"].as_u64()?)))
        .collect()
}

fn metric(page: &str, name_and_labels: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(name_and_labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Until every viewer got a warm-up pushed through `ingest`: the edges' interest reached the
/// brokers of both regions, and the leafnode's sources run.
fn warm(ingest: SocketAddr, room: u64, viewers: &mut [&mut Viewer]) {
    warm_up(ingest, room, viewers);
}

/// A push accepted in either region reaches the viewers of both, once each, with every
/// origin's order kept; a push sent to both regions under one idempotency key (an ingest
/// client that failed over) is delivered once; a global push from region 1 and an area push
/// from region 2 cross too.
#[test]
fn pushes_cross_regions_both_ways_once_in_origin_order() {
    if !nats_installed() {
        return;
    }
    let (_cluster, v) = start_regions(&[]);
    let (r1, r2) = (region(&v, 0), region(&v, 1));
    assert_eq!(v["regions"][0]["name"], "r1");
    assert_eq!(v["regions"][1]["brokers"][0]["node_id"], "r2-broker-1");
    let room = 4100;
    let mut a = viewer(&r1, room, 1, false);
    let mut b = viewer(&r2, room, 2, false);
    warm(r1.ingest, room, &mut [&mut a, &mut b]);
    warm(r2.ingest, room, &mut [&mut a, &mut b]);

    let mut c1 = broker::IngestClient::connect(r1.ingest, API_KEY).unwrap();
    let mut c2 = broker::IngestClient::connect(r2.ingest, API_KEY).unwrap();
    const N: u64 = 20;
    for n in 0..N {
        push(&mut c1, &numbered(room, "r1", n));
        push(&mut c2, &numbered(room, "r2", n));
    }
    let once = numbered(room, "both", 0);
    let id1 = c1.push_keyed(&once, "regions-once").unwrap();
    let id2 = c2.push_keyed(&once, "regions-once").unwrap();
    assert_ne!(id1, id2, "each region answers its own msg id");
    push(
        &mut c1,
        &broker::Message::global(r#"{"cmd":"N","o":"global","n":0}"#),
    );
    // The rooms here are not in control's table: area 0.
    push(
        &mut c2,
        &broker::Message::area(0, r#"{"cmd":"N","o":"area","n":0}"#),
    );

    let want = (2 * N + 3) as usize;
    for (name, viewer) in [("r1", &mut a), ("r2", &mut b)] {
        let got = read_for(viewer, WAIT, |g| numbers(g).len() >= want);
        // Anything doubled would arrive right behind.
        let more = read_for(viewer, Duration::from_millis(1_500), |_| false);
        let all = numbers(&[got, more].concat());
        let mut count: BTreeMap<(String, u64), usize> = BTreeMap::new();
        for k in &all {
            *count.entry(k.clone()).or_default() += 1;
        }
        assert_eq!(count.len(), want, "viewer in {name} got {all:?}");
        assert!(
            count.values().all(|&c| c == 1),
            "viewer in {name} got duplicates: {count:?}"
        );
        for origin in ["r1", "r2"] {
            let seq: Vec<u64> = all
                .iter()
                .filter(|(o, _)| o == origin)
                .map(|(_, n)| *n)
                .collect();
            assert_eq!(
                seq,
                (0..N).collect::<Vec<_>>(),
                "{origin}'s order in {name}"
            );
        }
    }
    let page = get_text(r2.broker_http, "/metrics");
    assert!(metric(&page, "barrage_broker_backbone_cross_region_total") >= N as f64);
}

/// A TCP proxy between region 2's leafnode and region 1: `cut` closes every proxied
/// connection and refuses new ones until `heal` (a partition between the regions).
struct Proxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(to: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (c, cs) = (cut.clone(), conns.clone());
        std::thread::spawn(move || {
            for inbound in listener.incoming() {
                let Ok(inbound) = inbound else { continue };
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let Ok(outbound) = TcpStream::connect(to) else {
                    continue;
                };
                let mut list = cs.lock().unwrap();
                for (mut from, mut to) in [
                    (inbound.try_clone().unwrap(), outbound.try_clone().unwrap()),
                    (outbound.try_clone().unwrap(), inbound.try_clone().unwrap()),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
                list.push(inbound);
                list.push(outbound);
            }
        });
        Proxy { addr, cut, conns }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// A partition between the regions (the leafnode cut by a proxy): each region keeps serving
/// its own viewers; after it heals, the other region's low-priority backlog, older than
/// `cross_region_max_lag_ms`, is dropped and counted, not delivered late, fresh pushes cross
/// again, and high reach of the partition is delivered while its ttl (from the origin's
/// publish) lasts and dropped, counted, once it is over.
#[test]
fn a_stale_backlog_is_dropped_after_a_partition_heals() {
    if !nats_installed() {
        return;
    }
    let leaf = free_port();
    let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], leaf)));
    let (_cluster, v) = start_regions(&[
        "--cross-region-max-lag-ms",
        "1000",
        "--leaf-port",
        &leaf.to_string(),
        "--leaf-url",
        &format!("nats-leaf://{}", proxy.addr),
    ]);
    let (r1, r2) = (region(&v, 0), region(&v, 1));
    let room = 4200;
    let mut a = viewer(&r1, room, 1, false);
    let mut b = viewer(&r2, room, 2, false);
    warm(r1.ingest, room, &mut [&mut a, &mut b]);
    // A high-reach user in region 2.
    let uid = 4299;
    let mut u = viewer(&r2, room, uid, true);

    proxy.cut();
    // High reach accepted in region 1 during the partition: its copy cannot reach region 2
    // (counted), so region 2 gets it from the backlog after healing, with its ttl counted from
    // region 1's publish: the 1 s one is over by then, the 60 s one is delivered.
    let r1_http = addr_of(&v["regions"][0]["brokers"][0]["http"]);
    let auth = format!("Bearer {API_KEY}");
    let mut gifts = BTreeMap::new();
    for (ttl, what) in [(1_000, "SHORT"), (60_000, "LONG")] {
        let (status, r) = http_json(
            r1_http,
            "POST",
            &format!("/v1/push/user/{uid}?reach=high&ttl_ms={ttl}"),
            &[("Authorization", auth.as_str())],
            &format!(r#"{{"cmd":"GIFT","what":"{what}"}}"#),
        );
        assert_eq!(status, 202, "{r}");
        gifts.insert(what, r["msg_id"].as_str().unwrap().to_owned());
    }
    let page = get_text(r1_http, "/metrics");
    assert!(
        metric(&page, "barrage_broker_backbone_region_copies_missing_total") >= 2.0,
        "copies to a partitioned region not counted"
    );
    let mut c1 = broker::IngestClient::connect(r1.ingest, API_KEY).unwrap();
    let mut c2 = broker::IngestClient::connect(r2.ingest, API_KEY).unwrap();
    const N: u64 = 10;
    for n in 0..N {
        push(&mut c1, &numbered(room, "r1", n));
        push(&mut c2, &numbered(room, "r2", n));
    }
    // Both regions serve their own viewers through the partition.
    let got_a = numbers(&read_for(&mut a, WAIT, |g| {
        numbers(g).iter().filter(|(o, _)| o == "r1").count() == N as usize
    }));
    assert_eq!(
        got_a.iter().filter(|(o, _)| o == "r1").count(),
        N as usize,
        "{got_a:?}"
    );
    let got_b = numbers(&read_for(&mut b, WAIT, |g| {
        numbers(g).iter().filter(|(o, _)| o == "r2").count() == N as usize
    }));
    assert_eq!(
        got_b.iter().filter(|(o, _)| o == "r2").count(),
        N as usize,
        "{got_b:?}"
    );
    assert!(
        got_b.iter().all(|(o, _)| o != "r1"),
        "r1's pushes crossed a cut leafnode: {got_b:?}"
    );
    // Older than the 1 s lag by the time the partition heals.
    std::thread::sleep(Duration::from_millis(2_000));
    proxy.heal();

    // Fresh pushes cross again once the leafnode is back; the stale backlog does not.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    let mut n = 100;
    loop {
        assert!(
            Instant::now() < deadline,
            "fresh pushes never crossed after healing: {seen:?}"
        );
        push(&mut c1, &numbered(room, "r1", n));
        n += 1;
        seen.extend(numbers(&read_for(
            &mut b,
            Duration::from_millis(500),
            |g| numbers(g).iter().any(|(o, n)| o == "r1" && *n >= 100),
        )));
        if seen.iter().any(|(o, n)| o == "r1" && *n >= 100) {
            break;
        }
    }
    let stale: Vec<_> = seen.iter().filter(|(o, n)| o == "r1" && *n < N).collect();
    assert!(stale.is_empty(), "stale backlog delivered: {stale:?}");
    let page = get_text(r2.broker_http, "/metrics");
    assert!(
        metric(
            &page,
            "barrage_broker_backbone_stale_dropped_total{kind=\"low\"}"
        ) >= N as f64,
        "stale drops not counted"
    );
    // High reach: the live one arrives (same msg id as region 1 answered), the expired one not.
    let got = read_for(&mut u, WAIT, |g| g.iter().any(|j| j["what"] == "LONG"));
    let long = got
        .iter()
        .find(|j| j["what"] == "LONG")
        .expect("the live high reach");
    assert_eq!(long["msg_id"].as_str(), Some(gifts["LONG"].as_str()));
    assert!(
        !got.iter().any(|j| j["what"] == "SHORT"),
        "an expired high reach: {got:?}"
    );
    let page = get_text(r2.broker_http, "/metrics");
    assert!(
        metric(
            &page,
            "barrage_broker_backbone_stale_dropped_total{kind=\"reach\"}"
        ) >= 1.0,
        "the expired high reach not counted"
    );
}

/// Region 1 goes dark (every process of it killed with SIGKILL): its viewer walks the
/// `host_list` region 1's control gave it (its own region's edge first, region 2's as the
/// fallback, learned from region 2's control), reaches region 2's edge with the token region
/// 1's control issued (one key set for every region) and keeps receiving; an ingest client
/// holding both regions' brokers fails over to region 2's.
#[test]
fn a_viewer_and_an_ingest_client_fail_over_to_the_other_region() {
    if !nats_installed() {
        return;
    }
    let (_cluster, v) = start_regions(&[]);
    let (r1, r2) = (region(&v, 0), region(&v, 1));
    let room = 4300;
    let (t, host_list) = ticket_with_fallback(r1.control, room, 7, r2.edge_tcp);
    assert_eq!(host_list[0], r1.edge_tcp, "the client's own region first");
    let mut a = Viewer::tcp(host_list[0]);
    assert_eq!(a.auth(&auth_body(7, room, &t.token)), 0);
    warm(r1.ingest, room, &mut [&mut a]);
    let both = format!("{},{}", r1.ingest, r2.ingest);
    let mut client = broker::IngestClient::connect_any(&both, API_KEY).unwrap();
    client.set_timeout(Duration::from_secs(3));
    push(&mut client, &numbered(room, "x", 0));
    assert_eq!(
        numbers(&read_for(&mut a, WAIT, |g| !g.is_empty())),
        [("x".into(), 0)]
    );

    for &pid in &r1.pids {
        signal(pid, libc::SIGKILL);
    }
    assert!(
        a.closed_by(Instant::now() + WAIT),
        "region 1's edge is gone"
    );
    // Walk host_list past region 1's dead edge: the next entry is region 2's. (Not by trying a
    // bare connect on each: the killed edge's port is free, and a test running beside this one
    // may listen on it by now.)
    let at = host_list
        .iter()
        .position(|h| *h != r1.edge_tcp)
        .expect("host_list names an edge outside region 1");
    assert!(at > 0, "region 1's edge comes first: {host_list:?}");
    let next = host_list[at];
    assert_eq!(next, r2.edge_tcp);
    let mut b = Viewer::tcp(next);
    assert_eq!(
        b.auth(&auth_body(7, room, &t.token)),
        0,
        "region 1's token is valid in region 2"
    );
    // The ingest client walks to region 2's broker; the viewer receives there.
    let deadline = Instant::now() + WAIT;
    let mut n = 1;
    loop {
        assert!(
            Instant::now() < deadline,
            "nothing reached the viewer in region 2"
        );
        // Refused while it walks its list (a dead broker first): not accepted, so retried.
        if client.push(&numbered(room, "x", n)).is_ok() {
            let got = read_for(&mut b, Duration::from_millis(500), |g| {
                !numbers(g).is_empty()
            });
            if numbers(&got).iter().any(|(_, m)| *m >= 1) {
                break;
            }
        }
        n += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// High reach to a user who moved from region 1 to region 2: accepted in region 1, which
/// goes dark (SIGKILL) right after answering, it is delivered to the user in region 2 under
/// the msg id region 1 answered (it was stored in region 2 before the answer), and once the
/// user ACKs it there it is not sent again.
#[test]
fn high_reach_to_a_user_who_moved_regions_is_delivered_once() {
    if !nats_installed() {
        return;
    }
    let (_cluster, v) = start_regions(&[]);
    let (r1, r2) = (region(&v, 0), region(&v, 1));
    let (room, uid) = (4400, 4242);
    // Another viewer of the room in region 2 shows the sources run both ways.
    let mut c = viewer(&r2, room, 1, false);
    warm(r2.ingest, room, &mut [&mut c]);
    warm(r1.ingest, room, &mut [&mut c]);
    drop(viewer(&r1, room, uid, true));
    let mut b = viewer(&r2, room, uid, true);

    let auth = format!("Bearer {API_KEY}");
    let r1_http = addr_of(&v["regions"][0]["brokers"][0]["http"]);
    let r2_monitor = addr_of(&v["regions"][1]["nats"][0]["monitor"]);
    let before = origin_messages(r2_monitor, "r2");
    let (status, r) = http_json(
        r1_http,
        "POST",
        &format!("/v1/push/user/{uid}?reach=high"),
        &[("Authorization", auth.as_str())],
        r#"{"cmd":"GIFT","n":1}"#,
    );
    assert_eq!(status, 202, "{r}");
    let msg: u64 = r["msg_id"].as_str().expect("msg_id").parse().unwrap();
    assert_eq!(
        origin_messages(r2_monitor, "r2"),
        before + 1,
        "a copy was stored in region 2's origin stream before the answer"
    );
    // Region 1 goes dark right after answering: the push was already stored in region 2.
    for &pid in &r1.pids {
        signal(pid, libc::SIGKILL);
    }
    let got = read_for(&mut b, WAIT, |g| g.iter().any(|j| j["cmd"] == "GIFT"));
    let gift = got
        .iter()
        .find(|j| j["cmd"] == "GIFT")
        .expect("the gift in region 2");
    assert_eq!(gift["msg_id"].as_str(), Some(msg.to_string().as_str()));
    b.send_packet(&proto::auth::ack_request(msg));
    let deadline = Instant::now() + WAIT;
    loop {
        let (s, st) = http_json(
            r2.broker_http,
            "GET",
            &format!("/v1/reach/{msg}"),
            &[("Authorization", auth.as_str())],
            "",
        );
        assert_eq!(s, 200, "{st}");
        if st["state"] == "acked" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never acked in region 2: {st}\n{}",
            get_text(addr_of(&v["regions"][1]["edges"][0]["admin"]), "/metrics")
                .lines()
                .filter(|l| l.contains("ack") && !l.starts_with('#'))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Acked: nothing more of it arrives.
    let more = read_for(&mut b, Duration::from_millis(2_000), |_| false);
    assert!(
        !more.iter().any(|j| j["cmd"] == "GIFT"),
        "sent again after the ACK: {more:?}"
    );
}

/// Messages in `region`'s origin stream, from its NATS monitor.
fn origin_messages(monitor: SocketAddr, region: &str) -> u64 {
    let text = get_text(monitor, "/jsz?streams=1");
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let v: serde_json::Value = serde_json::from_str(body).expect("jsz JSON");
    let name = format!("BARRAGE_ORIGIN_{region}");
    v["account_details"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|a| a["stream_detail"].as_array().cloned().unwrap_or_default())
        .find(|s| s["name"] == name.as_str())
        .and_then(|s| s["state"]["messages"].as_u64())
        .expect("the origin stream")
}

/// Bad input: a region name that cannot be a JetStream domain, and a broker whose region is
/// not in its federation, are refused at start with the reason.
#[test]
fn an_unknown_or_malformed_region_is_refused_at_start() {
    let out = Command::new(env!("CARGO_BIN_EXE_barrage"))
        .args(["cluster", "--regions", "2", "--region-names", "r1,bad.name"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.name"), "{err}");

    let out = Command::new(env!("CARGO_BIN_EXE_barrage"))
        .args(["broker", "--backbone", "nats://127.0.0.1:1"])
        .args(["--set", "region=\"r9\""])
        .args(["--set", "cluster.regions=[\"r1\",\"r2\"]"])
        .args(["--set", &format!("http_addr=\"127.0.0.1:{}\"", free_port())])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("r9"), "{err}");
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What one viewer thread of the failover run saw.
#[derive(Default)]
struct Seen {
    /// (n, received at) of every numbered message.
    got: Vec<(u64, Instant)>,
    /// When its edge closed and when it was seated again on the other region's edge.
    lost_at: Option<Instant>,
    back_at: Option<Instant>,
    /// High-reach msg ids received (the user's thread only).
    reach: Vec<u64>,
}

/// A viewer thread: reads numbered messages; when its edge dies, walks `hosts` (its own
/// region's edge first) with the same token and goes on reading. `ack`: it ACKs every
/// high-reach message it gets.
fn spawn_reader(
    hosts: Vec<SocketAddr>,
    body: proto::auth::AuthBody,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut v = Viewer::tcp(hosts[0]);
        assert_eq!(v.auth(&body), 0);
        let mut on = hosts[0];
        while !stop.load(Ordering::Relaxed) {
            let until = Instant::now() + Duration::from_millis(200);
            match v.next_event(until) {
                Some(Event::Message(m)) => {
                    let Ok(j) = serde_json::from_str::<serde_json::Value>(&m) else {
                        continue;
                    };
                    if let Some(id) = j["msg_id"].as_str().and_then(|s| s.parse::<u64>().ok()) {
                        v.send_packet(&proto::auth::ack_request(id));
                        seen.lock().unwrap().reach.push(id);
                    } else if let Some(n) = j["n"].as_u64() {
                        seen.lock().unwrap().got.push((n, Instant::now()));
                    }
                }
                Some(Event::Closed) => {
                    seen.lock().unwrap().lost_at.get_or_insert(Instant::now());
                    // Walk the host list until an edge seats us.
                    // Past the edge that died (not by a bare connect: its port is free, and a
                    // test running beside this one may listen on it by now).
                    'walk: loop {
                        for &h in hosts.iter().filter(|h| **h != on) {
                            if let Ok(s) =
                                TcpStream::connect_timeout(&h, Duration::from_millis(300))
                            {
                                drop(s);
                                v = Viewer::tcp(h);
                                if v.auth(&body) == 0 {
                                    on = h;
                                    break 'walk;
                                }
                            }
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    seen.lock().unwrap().back_at = Some(Instant::now());
                }
                _ => {}
            }
        }
    })
}

/// The region failover run of issue 13 (docs/benchmarks.md, "Regions"): two regions, one
/// viewer per region in each of 10 rooms, a steady push load through an ingest client holding
/// both regions' brokers (region 1's first), and a user with high reach on, pushed to every
/// 100 ms. Before the kill it measures push-to-viewer latency same-region (region 1's
/// viewers) against cross-region (region 2's); then every process of region 1 is killed with
/// SIGKILL, its viewers walk the `host_list` region 1's control gave them (region 2's edge is
/// the fallback) with the same token, and the run reports how
/// long until they receive again (p50/p99 from the kill), the best-effort pushes they missed,
/// high-reach pushes lost (asserted 0), and pushes refused vs accepted in the 10 s after the
/// kill. Run with `cargo test --release --test regions -- --ignored --nocapture
/// region_failover_run` (`REGIONS_RATE` pushes/s, default 200; `REGIONS_SECS`, default 20).
#[test]
#[ignore]
fn region_failover_run() {
    if !nats_installed() {
        return;
    }
    let rate = env_u64("REGIONS_RATE", 200);
    let secs = env_u64("REGIONS_SECS", 20);
    let (cluster, v) = start_regions(&[]);
    let (r1, r2) = (region(&v, 0), region(&v, 1));
    let rooms: Vec<u64> = (1..=10).map(|r| 30_000 + r).collect();
    let stop = Arc::new(AtomicBool::new(false));
    // (region, room index, what it saw)
    let mut seen = Vec::new();
    let mut threads = Vec::new();
    for (ri, (home, other)) in [(&r1, &r2), (&r2, &r1)].into_iter().enumerate() {
        for (i, &room) in rooms.iter().enumerate() {
            let uid = room * 10 + ri as u64;
            let (t, hosts) = ticket_with_fallback(home.control, room, uid, other.edge_tcp);
            let mut w = Viewer::tcp(home.edge_tcp);
            assert_eq!(w.auth(&auth_body(uid, room, &t.token)), 0);
            warm(r1.ingest, room, &mut [&mut w]);
            drop(w);
            let s = Arc::new(Mutex::new(Seen::default()));
            seen.push((ri, i, s.clone()));
            assert_eq!(hosts[0], home.edge_tcp, "its own region first");
            threads.push(spawn_reader(
                hosts,
                auth_body(uid, room, &t.token),
                s,
                stop.clone(),
            ));
        }
    }
    // The high-reach user, in region 1.
    let reach_uid = 39_999;
    let (t, hosts) = ticket_with_fallback(r1.control, rooms[0], reach_uid, r2.edge_tcp);
    let mut body = auth_body(reach_uid, rooms[0], &t.token);
    body.ack = true;
    let user = Arc::new(Mutex::new(Seen::default()));
    threads.push(spawn_reader(hosts, body, user.clone(), stop.clone()));
    std::thread::sleep(Duration::from_millis(500));

    let both = format!("{},{}", r1.ingest, r2.ingest);
    let mut client = broker::IngestClient::connect_any(&both, API_KEY).unwrap();
    client.set_timeout(Duration::from_secs(2));
    let start = Instant::now();
    let kill_at = start + Duration::from_secs(secs / 2);
    let end = start + Duration::from_secs(secs);
    let mut killed: Option<Instant> = None;
    // Per room: (n, sent at, accepted at).
    let mut accepted: Vec<Vec<(u64, Instant, Instant)>> = vec![Vec::new(); rooms.len()];
    let mut reach_accepted = Vec::new();
    let (mut refused, mut accepted_window, mut refused_window) = (0u64, 0u64, 0u64);
    let mut next_reach = start;
    let mut n = 0u64;
    while Instant::now() < end {
        if killed.is_none() && Instant::now() >= kill_at {
            for &pid in &r1.pids {
                signal(pid, libc::SIGKILL);
            }
            killed = Some(Instant::now());
        }
        let in_window = killed.is_some_and(|k| k.elapsed() < Duration::from_secs(10));
        let i = (n % rooms.len() as u64) as usize;
        let m = broker::Message::room(rooms[i], format!(r#"{{"cmd":"N","n":{n}}}"#));
        let sent = Instant::now();
        match client.push(&m) {
            Ok(_) => {
                accepted[i].push((n, sent, Instant::now()));
                accepted_window += u64::from(in_window);
            }
            Err(_) => {
                refused += 1;
                refused_window += u64::from(in_window);
            }
        }
        if Instant::now() >= next_reach {
            next_reach += Duration::from_millis(100);
            let m =
                broker::Message::user(reach_uid, r#"{"cmd":"GIFT"}"#).reach(proto::id::Reach::High);
            if let Ok(id) = client.push(&m) {
                reach_accepted.push(id.0);
            }
        }
        n += 1;
        let due = start + Duration::from_micros(n * 1_000_000 / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let killed = killed.expect("the kill happened");
    // High reach is resent until ACKed: give the last ones time.
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        let got: std::collections::BTreeSet<u64> =
            user.lock().unwrap().reach.iter().copied().collect();
        if reach_accepted.iter().all(|id| got.contains(id)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        assert!(t.join().is_ok(), "a viewer thread failed");
    }
    let after_r2: usize = seen
        .iter()
        .filter(|(ri, _, _)| *ri == 1)
        .map(|(_, _, s)| {
            s.lock()
                .unwrap()
                .got
                .iter()
                .filter(|x| x.1 > killed)
                .count()
        })
        .sum();
    let reseated = seen
        .iter()
        .filter(|(ri, _, s)| *ri == 0 && s.lock().unwrap().back_at.is_some())
        .count();

    // Latency before the kill: region 1's viewers (same region as the accepting broker) vs
    // region 2's (cross region).
    let mut lat: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    let (mut gaps, mut missed, mut missed_before) = (Vec::new(), 0usize, 0usize);
    for (ri, i, s) in &seen {
        let s = s.lock().unwrap();
        let sent: BTreeMap<u64, (Instant, Instant)> =
            accepted[*i].iter().map(|&(n, t, a)| (n, (t, a))).collect();
        let got: BTreeMap<u64, Instant> = s.got.iter().map(|&(n, t)| (n, t)).collect();
        for (n, at) in &got {
            if let Some((t, _)) = sent.get(n) {
                if *at < killed {
                    lat[*ri].push(at.saturating_duration_since(*t).as_micros() as u64);
                }
            }
        }
        if *ri == 0 {
            if let Some(first) = got.values().filter(|&&t| t > killed).min() {
                gaps.push(first.saturating_duration_since(killed).as_millis() as u64);
            }
            for (n, (_, a)) in &sent {
                if !got.contains_key(n) {
                    if *a < killed {
                        missed_before += 1;
                    } else {
                        missed += 1;
                    }
                }
            }
        }
    }
    for l in &mut lat {
        l.sort_unstable();
    }
    gaps.sort_unstable();
    let got: std::collections::BTreeSet<u64> = user.lock().unwrap().reach.iter().copied().collect();
    let reach_lost = reach_accepted.iter().filter(|id| !got.contains(id)).count();
    let total: usize = accepted.iter().map(Vec::len).sum();
    println!(
        "region failover run: {rate} pushes/s for {secs} s, 10 rooms x 1 viewer per region, \
         kill -9 of every region-1 process at {:.1} s\n\
         push-to-viewer before the kill (ms): same region p50 {:.2} p99 {:.2} (n={}); \
         cross region p50 {:.2} p99 {:.2} (n={})\n\
         region-1 viewers seated again on region 2's edge: {reseated}; receiving again: {} of {}, \
         p50 {} ms, p99 {} ms after the kill\n\
         best-effort missed by region-1 viewers: {missed} accepted after the kill, \
         {missed_before} accepted before it\n\
         high reach: accepted {}, delivered {}, lost {reach_lost}\n\
         pushes accepted {total}, refused {refused}; in the 10 s after the kill accepted \
         {accepted_window}, refused {refused_window}; region-2 viewers received {after_r2} \
         after the kill",
        killed.duration_since(start).as_secs_f64(),
        percentile(&lat[0], 0.5) as f64 / 1000.0,
        percentile(&lat[0], 0.99) as f64 / 1000.0,
        lat[0].len(),
        percentile(&lat[1], 0.5) as f64 / 1000.0,
        percentile(&lat[1], 0.99) as f64 / 1000.0,
        lat[1].len(),
        gaps.len(),
        rooms.len(),
        percentile(&gaps, 0.5),
        percentile(&gaps, 0.99),
        reach_accepted.len(),
        reach_accepted.len() - reach_lost,
    );
    assert_eq!(reach_lost, 0, "high-reach pushes lost with region 1");
    drop(cluster);
}

/// A list threads of the partition run append to.
type Shared<T> = Arc<Mutex<Vec<T>>>;

/// Runs a command; whether it succeeded.
fn run(cmd: &[&str]) -> bool {
    Command::new(cmd[0])
        .args(&cmd[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .is_ok_and(|s| s.success())
}

/// Two network namespaces joined by a veth pair (10.77.0.1 and 10.77.0.2), removed on drop.
struct Netns {
    names: [String; 2],
}

impl Netns {
    fn make() -> Option<Netns> {
        let id = std::process::id() % 100_000;
        let names = [format!("brga{id}"), format!("brgb{id}")];
        let ok = run(&["ip", "netns", "add", &names[0]]) && run(&["ip", "netns", "add", &names[1]]);
        let ns = Netns { names };
        let [a, b] = &ns.names;
        let (va, vb) = (format!("va{id}"), format!("vb{id}"));
        let ok =
            ok && run(&[
                "ip", "link", "add", &va, "netns", a, "type", "veth", "peer", "name", &vb, "netns",
                b,
            ]) && run(&["ip", "-n", a, "addr", "add", "10.77.0.1/24", "dev", &va])
                && run(&["ip", "-n", b, "addr", "add", "10.77.0.2/24", "dev", &vb])
                && [(a, &va), (b, &vb)].iter().all(|(n, v)| {
                    run(&["ip", "-n", n, "link", "set", v, "up"])
                        && run(&["ip", "-n", n, "link", "set", "lo", "up"])
                });
        ok.then_some(ns)
    }

    /// nftables in region 2's namespace drops everything to and from region 1 (`on`), or
    /// the table is removed (heals).
    fn partition(&self, on: bool) {
        let b = &self.names[1];
        if on {
            let rules = "table inet barrage_partition {\n chain input { type filter hook input priority 0; ip saddr 10.77.0.1 drop; }\n chain output { type filter hook output priority 0; ip daddr 10.77.0.1 drop; }\n}\n";
            let file =
                std::env::temp_dir().join(format!("barrage-partition-{}.nft", std::process::id()));
            std::fs::write(&file, rules).unwrap();
            assert!(
                run(&[
                    "ip",
                    "netns",
                    "exec",
                    b,
                    "nft",
                    "-f",
                    file.to_str().unwrap()
                ]),
                "nft"
            );
        } else {
            assert!(run(&[
                "ip",
                "netns",
                "exec",
                b,
                "nft",
                "delete",
                "table",
                "inet",
                "barrage_partition"
            ]));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            run(&["ip", "netns", "del", n]);
        }
    }
}

/// Moves the calling thread into network namespace `ns` (threads have their own).
fn enter_netns(ns: &str) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(format!("/run/netns/{ns}")).expect("netns file");
    // SAFETY: setns(2) on a valid fd; it changes only this thread's network namespace.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns {ns}");
}

/// One region of the partition run, started with `barrage cluster --only-region` inside its
/// namespace.
fn start_region_in(ns: &str, name: &str, extra: &[&str]) -> (ClusterProc, serde_json::Value) {
    let mut ip = Command::new("ip");
    ip.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_barrage")])
        .env("RUST_LOG", "error");
    let mut args = vec!["--regions", "2", "--only-region", name];
    args.extend(["--brokers", "1", "--edges", "1"]);
    args.extend(["--partitions", "8", "--cross-region-max-lag-ms", "2000"]);
    args.extend_from_slice(extra);
    start_cluster_via(ip, &args)
}

/// The partition run of issue 13 (docs/benchmarks.md, "Regions"): each region in its own
/// network namespace (joined by a veth pair), a steady push load accepted in both, one viewer
/// per region in each of 5 rooms; nftables in region 2's namespace drops all traffic between
/// them for `PARTITION_SECS` (default 6), then heals. Reports, per region: its own pushes
/// delivered to its viewers during the partition (both keep serving), and the other region's
/// pushes of the partition: delivered after healing, dropped as stale (older than
/// `cross_region_max_lag_ms` = 2000 here), lost. Needs root (ip netns, nft). Run with
/// `cargo test --test regions -- --ignored --nocapture partition_run`.
#[test]
#[ignore]
fn partition_run() {
    if !nats_installed() {
        return;
    }
    let Some(net) = Netns::make() else {
        eprintln!("cannot make network namespaces (needs root); skipping");
        return;
    };
    let part_secs = env_u64("PARTITION_SECS", 6);
    let rate = env_u64("REGIONS_RATE", 100);
    let leaf = "24577";
    let (c1, v1) = start_region_in(
        &net.names[0],
        "r1",
        &[
            "--leaf-host",
            "0.0.0.0",
            "--leaf-port",
            leaf,
            "--leaf-url",
            "nats-leaf://10.77.0.1:24577",
        ],
    );
    let (c2, v2) = start_region_in(
        &net.names[1],
        "r2",
        &["--leaf-url", "nats-leaf://10.77.0.1:24577"],
    );
    let regions = [region(&v1, 0), region(&v2, 0)];
    let rooms: Vec<u64> = (1..=5).map(|r| 50_000 + r).collect();
    let stop = Arc::new(AtomicBool::new(false));
    // Per region: (origin, n, received at) of what its viewers got.
    let got: [Shared<(String, u64, Instant)>; 2] = Default::default();
    let mut threads = Vec::new();
    for (ri, r) in regions.iter().enumerate() {
        for &room in &rooms {
            let (ns, control, edge) = (net.names[ri].clone(), r.control, r.edge_tcp);
            let (got, stop) = (got[ri].clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                enter_netns(&ns);
                let uid = room * 10 + ri as u64;
                let t = connect_ticket(control, room, uid);
                let mut v = Viewer::tcp(edge);
                assert_eq!(v.auth(&auth_body(uid, room, &t.token)), 0);
                while !stop.load(Ordering::Relaxed) {
                    let until = Instant::now() + Duration::from_millis(200);
                    if let Some(m) = v.next_message(until) {
                        if let Ok(j) = serde_json::from_str::<serde_json::Value>(&m) {
                            if let (Some(o), Some(n)) = (j["o"].as_str(), j["n"].as_u64()) {
                                got.lock().unwrap().push((o.to_owned(), n, Instant::now()));
                            }
                        }
                    }
                }
            }));
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    // Publishers, one per region into its own brokers: (n, accepted at).
    let accepted: [Shared<(u64, Instant)>; 2] = Default::default();
    let pub_stop = Arc::new(AtomicBool::new(false));
    let mut pubs = Vec::new();
    for (ri, r) in regions.iter().enumerate() {
        let (ns, ingest, rooms) = (net.names[ri].clone(), r.ingest, rooms.clone());
        let (acc, stop) = (accepted[ri].clone(), pub_stop.clone());
        pubs.push(std::thread::spawn(move || {
            enter_netns(&ns);
            let mut c = broker::IngestClient::connect(ingest, API_KEY).unwrap();
            let origin = format!("r{}", ri + 1);
            let start = Instant::now();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let room = rooms[(n % rooms.len() as u64) as usize];
                if c.push(&numbered(room, &origin, n)).is_ok() {
                    acc.lock().unwrap().push((n, Instant::now()));
                }
                n += 1;
                let due = start + Duration::from_micros(n * 1_000_000 / rate);
                if let Some(w) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(w);
                }
            }
        }));
    }
    let metric_in = |ri: usize, name: &str| {
        let (ns, http) = (net.names[ri].clone(), regions[ri].broker_http);
        let name = name.to_owned();
        std::thread::spawn(move || {
            enter_netns(&ns);
            metric(&get_text(http, "/metrics"), &name)
        })
        .join()
        .unwrap()
    };
    let stale = "barrage_broker_backbone_stale_dropped_total{kind=\"low\"}";
    std::thread::sleep(Duration::from_secs(3));
    let stale_before = [metric_in(0, stale), metric_in(1, stale)];
    let cut = Instant::now();
    net.partition(true);
    std::thread::sleep(Duration::from_secs(part_secs));
    net.partition(false);
    let healed = Instant::now();
    std::thread::sleep(Duration::from_secs(6));
    pub_stop.store(true, Ordering::Relaxed);
    for p in pubs {
        let _ = p.join();
    }
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let mut lines = Vec::new();
    let mut lost_total = 0;
    for ri in 0..2 {
        let other = 1 - ri;
        let (me, them) = (format!("r{}", ri + 1), format!("r{}", other + 1));
        let got = got[ri].lock().unwrap();
        let during = |acc: &[(u64, Instant)]| -> std::collections::BTreeSet<u64> {
            acc.iter()
                .filter(|(_, t)| *t >= cut && *t < healed)
                .map(|x| x.0)
                .collect()
        };
        let own = during(&accepted[ri].lock().unwrap());
        let own_got = got
            .iter()
            .filter(|(o, n, _)| *o == me && own.contains(n))
            .count();
        let theirs = during(&accepted[other].lock().unwrap());
        let theirs_got: std::collections::BTreeSet<u64> = got
            .iter()
            .filter(|(o, n, _)| *o == them && theirs.contains(n))
            .map(|x| x.1)
            .collect();
        let dropped = (metric_in(ri, stale) - stale_before[ri]) as usize;
        let lost = theirs.len().saturating_sub(theirs_got.len() + dropped);
        lost_total += lost;
        lines.push(format!(
            "region {me}: own pushes during the partition accepted {}, delivered to its viewers {own_got}; \
             {them}'s pushes of the partition {}: delivered after healing {}, dropped stale {dropped}, lost {lost}",
            own.len(),
            theirs.len(),
            theirs_got.len()
        ));
    }
    println!(
        "partition run: two regions in network namespaces, {rate} pushes/s into each, \
         nftables partition of {part_secs} s, cross_region_max_lag_ms 2000\n{}",
        lines.join("\n")
    );
    drop((c1, c2));
    assert_eq!(lost_total, 0, "pushes lost across the partition");
}

/// A nats-server started again by a test (killed on drop).
struct Restarted(std::process::Child);

impl Drop for Restarted {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The command line of process `pid` (to start a killed nats-server again as it was: same
/// config file, so the same ports and store dir).
fn cmdline(pid: u64) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).expect("the process's command line");
    raw.split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// Until `control`'s first edge for a client of its own region is `first` (and, with
/// `absent`, that edge is not listed at all); the host list then.
fn wait_first_edge(
    control: SocketAddr,
    first: SocketAddr,
    absent: Option<SocketAddr>,
    what: &str,
) -> Vec<SocketAddr> {
    let deadline = Instant::now() + WAIT * 2;
    loop {
        let t = connect_ticket(control, 4500, 9);
        let hosts: Vec<SocketAddr> = t
            .edges
            .iter()
            .filter_map(|e| {
                format!("{}:{}", e["host"].as_str()?, e["tcp_port"].as_u64()?)
                    .parse()
                    .ok()
            })
            .collect();
        if hosts.first() == Some(&first) && absent.is_none_or(|a| !hosts.contains(&a)) {
            return hosts;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: host_list {hosts:?}\n{}",
            get_text(control, "/v1/brokers")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A region whose NATS server is killed (SIGKILL of nats-server only: its control, broker and
/// edge stay up) is not assigned: its broker tells control its backbone is down, so control
/// hands clients of that region the other region's edge and lists none of the dark region's
/// (nor does the other region's control, which learns it through its peer); the broker's
/// `/readyz` says 503 meanwhile. Once nats-server is started again on the same port and store
/// dir, the region is assigned again and takes pushes.
#[test]
fn a_region_whose_nats_is_down_is_not_assigned_until_it_is_back() {
    if !nats_installed() {
        return;
    }
    let (_cluster, v) = start_regions(&[]);
    let (r1, r2) = (region(&v, 0), region(&v, 1));
    let (_, hosts) = ticket_with_fallback(r1.control, 4500, 9, r2.edge_tcp);
    assert_eq!(hosts[0], r1.edge_tcp, "region 1 first while it is healthy");
    assert_eq!(
        http_json(r1.broker_http, "GET", "/readyz", &[], "").0,
        200,
        "ready before"
    );

    let nats_pid = v["regions"][0]["nats"][0]["pid"].as_u64().unwrap();
    let args = cmdline(nats_pid);
    signal(nats_pid, libc::SIGKILL);
    wait_first_edge(
        r1.control,
        r2.edge_tcp,
        Some(r1.edge_tcp),
        "region 1's control still assigns region 1 with its NATS dead",
    );
    wait_first_edge(
        r2.control,
        r2.edge_tcp,
        Some(r1.edge_tcp),
        "region 2's control still lists region 1's edge as a fallback",
    );
    let (status, ready) = http_json(r1.broker_http, "GET", "/readyz", &[], "");
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["reason"], "backbone disconnected");
    let (_, brokers) = http_json(r1.control, "GET", "/v1/brokers?region=r1", &[], "");
    let b = &brokers["brokers"][0];
    assert_eq!(
        (&b["alive"], &b["backbone_down"]),
        (&true.into(), &true.into())
    );
    let page = get_text(r1.control, "/metrics");
    assert_eq!(
        metric(&page, "barrage_control_brokers{state=\"backbone_down\"}"),
        1.0
    );
    assert_eq!(
        metric(&page, "barrage_control_region_assignable{region=\"r1\"}"),
        0.0
    );

    // The same server again: same config file, so the same ports and store dir.
    let _nats = Restarted(
        Command::new(&args[0])
            .args(&args[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts again"),
    );
    wait_first_edge(
        r1.control,
        r1.edge_tcp,
        None,
        "region 1 is not assigned again after its NATS came back",
    );
    assert_eq!(http_json(r1.broker_http, "GET", "/readyz", &[], "").0, 200);
    // And it serves: a push accepted in region 1 reaches its viewer.
    let mut a = viewer(&r1, 4500, 9, false);
    warm(r1.ingest, 4500, &mut [&mut a]);
}

/// What a [`SeqViewer`] read.
#[derive(Debug)]
enum Got {
    Sync(proto::sync::Sync),
    /// One room batch: its outer op 5 seq and the bodies inside.
    Batch(u32, Vec<String>),
    Closed,
}

/// A viewer that keeps the outer seqs and the `BARRAGE_SYNC`s (resume needs both; [`Viewer`]
/// flattens batches into messages).
struct SeqViewer {
    stream: TcpStream,
    packets: proto::packet::StreamDecoder,
    got: std::collections::VecDeque<Got>,
    authed: bool,
}

impl SeqViewer {
    /// Connects to `addr` and authenticates with `"ack":true` and `resume` when given; returns
    /// it once the auth reply said 0.
    fn auth(
        addr: SocketAddr,
        body: &proto::auth::AuthBody,
        resume: Option<&proto::sync::Resume>,
    ) -> SeqViewer {
        use std::io::Write;
        let mut body = body.clone();
        body.ack = true;
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        stream
            .write_all(&proto::auth::auth_request_with_resume(&body, resume))
            .unwrap();
        let mut v = SeqViewer {
            stream,
            packets: proto::packet::StreamDecoder::new(proto::limits::LINK_FRAME_BYTES_MAX),
            got: Default::default(),
            authed: false,
        };
        let deadline = Instant::now() + WAIT;
        loop {
            v.read(deadline);
            assert!(Instant::now() < deadline, "no auth reply from {addr}");
            if v.authed {
                return v;
            }
        }
    }

    /// Reads once (up to 100 ms) and decodes what came.
    fn read(&mut self, deadline: Instant) {
        use proto::packet::{op, ver};
        use std::io::Read;
        if Instant::now() >= deadline {
            return;
        }
        let mut buf = [0u8; 16 * 1024];
        match self.stream.read(&mut buf) {
            Ok(0) => self.got.push_back(Got::Closed),
            Ok(n) => self.packets.feed(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => self.got.push_back(Got::Closed),
        }
        while let Ok(Some(p)) = self.packets.next_packet() {
            match p.op {
                op::AUTH_REPLY => {
                    let v: serde_json::Value = serde_json::from_slice(&p.body).unwrap();
                    assert_eq!(v["code"], 0, "auth refused: {v}");
                    self.authed = true;
                }
                op::NOTIFICATION if p.ver == ver::PLAIN => {
                    let s = proto::sync::parse_sync(&p.body).expect("a plain op 5 is a sync");
                    self.got.push_back(Got::Sync(s));
                }
                op::NOTIFICATION => {
                    let inner = proto::container::unpack(
                        p.ver,
                        p.op,
                        p.seq,
                        &p.body,
                        proto::limits::DECOMPRESSED_BYTES_MAX,
                    )
                    .expect("valid container");
                    let bodies = inner
                        .into_iter()
                        .map(|i| String::from_utf8_lossy(&i.body).into_owned())
                        .collect();
                    self.got.push_back(Got::Batch(p.seq, bodies));
                }
                _ => {}
            }
        }
    }

    fn next(&mut self, deadline: Instant) -> Option<Got> {
        loop {
            if let Some(g) = self.got.pop_front() {
                return Some(g);
            }
            if Instant::now() >= deadline {
                return None;
            }
            self.read(deadline);
        }
    }

    fn sync(&mut self) -> proto::sync::Sync {
        match self.next(Instant::now() + WAIT) {
            Some(Got::Sync(s)) => s,
            other => panic!("expected a BARRAGE_SYNC, got {other:?}"),
        }
    }

    /// Batches until one holds a body containing `needle`.
    fn batches_until(&mut self, needle: &str) -> Vec<(u32, Vec<String>)> {
        let deadline = Instant::now() + WAIT;
        let mut out = Vec::new();
        loop {
            match self.next(deadline) {
                Some(Got::Batch(seq, b)) => {
                    let done = b.iter().any(|m| m.contains(needle));
                    out.push((seq, b));
                    if done {
                        return out;
                    }
                }
                other => panic!("waiting for {needle}: got {other:?} after {out:?}"),
            }
        }
    }
}

/// BARRAGE_SYNC across regions: a viewer in region 1 that asked for syncs (`"ack":true`) learns
/// region 1's epoch and follows the batches; region 1 goes dark (every process SIGKILLed); the
/// viewer authenticates at region 2's edge (its `host_list` fallback) with `resume` naming
/// region 1's epoch and its last seq. Region 2's broker has its own epoch for the room (another
/// broker run), so the seqs are never compared: the viewer gets region 2's held batches of the
/// room, then a BARRAGE_SYNC naming region 2's epoch with `recovered:false` and `missed:0`
/// (region 2 still holds every batch of its epoch), then the live stream right after that seq.
#[test]
fn a_viewer_resuming_in_another_region_is_told_its_epoch_and_not_recovered() {
    use loadtest::client::{Position, Seen};
    if !nats_installed() {
        return;
    }
    let (_cluster, v) = start_regions(&[]);
    let (r1, r2) = (region(&v, 0), region(&v, 1));
    let room = 4600;
    // A viewer of the room in region 2, so region 2's broker keeps the room's batches.
    let t2 = connect_ticket(r2.control, room, 2);
    let mut c = SeqViewer::auth(r2.edge_tcp, &auth_body(2, room, &t2.token), None);
    let c_sync = c.sync();
    let (t, hosts) = ticket_with_fallback(r1.control, room, 1, r2.edge_tcp);
    assert_eq!(hosts[0], r1.edge_tcp, "the client's own region first");
    let body = auth_body(1, room, &t.token);
    let mut a = SeqViewer::auth(r1.edge_tcp, &body, None);
    let a_sync = a.sync();
    assert!(a_sync.recovered, "{a_sync:?}");
    assert_ne!(
        a_sync.epoch, c_sync.epoch,
        "each region's broker names its own epochs"
    );
    let mut pos = Position::default();
    pos.on_sync(&a_sync);

    // Pushes accepted in region 1 reach both (warm-ups until the interest and sources run).
    let mut ingest = broker::IngestClient::connect(r1.ingest, API_KEY).unwrap();
    let (mut a_batches, mut c_batches) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + WAIT;
    let mut k = 0;
    let (mut a_warm, mut c_warm) = (false, false);
    while !(a_warm && c_warm) {
        assert!(Instant::now() < deadline, "warm-ups never arrived");
        push(
            &mut ingest,
            &broker::Message::room(room, format!(r#"{{"cmd":"W","k":{k}}}"#)),
        );
        k += 1;
        for (viewer, batches, warm) in [
            (&mut a, &mut a_batches, &mut a_warm),
            (&mut c, &mut c_batches, &mut c_warm),
        ] {
            let until = Instant::now() + Duration::from_millis(150);
            while let Some(g) = viewer.next(until) {
                match g {
                    Got::Batch(seq, b) => {
                        batches.push((seq, b));
                        *warm = true;
                    }
                    other => panic!("before any numbered push: {other:?}"),
                }
            }
        }
    }
    for n in 1..=3 {
        push(&mut ingest, &numbered(room, "r1", n));
    }
    a_batches.extend(a.batches_until(r#""n":3}"#));
    c_batches.extend(c.batches_until(r#""n":3}"#));
    for (seq, _) in &a_batches {
        assert_eq!(
            pos.on_batch(*seq),
            Seen::New,
            "region 1's stream, in seq order"
        );
    }

    for &pid in &r1.pids {
        signal(pid, libc::SIGKILL);
    }
    assert!(
        matches!(a.next(Instant::now() + WAIT), Some(Got::Closed)),
        "region 1's edge is gone"
    );
    let resume = pos.resume().expect("a position to resume from");
    assert_eq!(resume.epoch, a_sync.epoch);
    let mut b = SeqViewer::auth(hosts[1], &body, Some(&resume));
    assert_eq!(hosts[1], r2.edge_tcp);
    let mut replayed = Vec::new();
    let sync = loop {
        match b.next(Instant::now() + WAIT) {
            Some(Got::Batch(seq, bodies)) => replayed.push((seq, bodies)),
            Some(Got::Sync(s)) => break s,
            other => panic!("expected replayed batches then a sync, got {other:?}"),
        }
    };
    let c_last = c_batches.last().map(|(s, _)| *s).unwrap();
    assert_eq!(
        (sync.epoch.clone(), sync.recovered, sync.missed, sync.seq),
        (c_sync.epoch.clone(), false, 0, c_last),
        "region 2's epoch, not recovered, nothing of it missed: {sync:?}"
    );
    assert_eq!(
        replayed, c_batches,
        "region 2's held batches of its epoch, as its own viewer got them"
    );
    assert!(
        pos.on_sync(&sync),
        "another epoch: the position starts over"
    );

    // Live after the sync, right after its seq, in region 2's epoch.
    let mut ingest2 = broker::IngestClient::connect(r2.ingest, API_KEY).unwrap();
    push(&mut ingest2, &numbered(room, "r2", 4));
    let live = b.batches_until(r#""n":4}"#);
    let c_live = c.batches_until(r#""n":4}"#);
    assert_eq!(live, c_live);
    assert_eq!(
        live[0].0,
        sync.seq + 1,
        "the stream continues after the sync's seq"
    );
    for (seq, _) in &live {
        assert_eq!(pos.on_batch(*seq), Seen::New);
    }
}
