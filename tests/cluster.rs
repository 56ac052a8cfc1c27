//! Cluster mode through the real binary (issue 12): a `nats-server -js` on a free port, two
//! `barrage broker --backbone` processes, and control plus one edge (linked to both brokers)
//! in this process. A broker is killed with SIGKILL mid-run; every push accepted before or
//! after must still reach the viewer.
//!
//! `./scripts/test.sh` installs nats-server and sets `BARRAGE_REQUIRE_NATS=1`, so the test
//! fails there rather than skip when it is missing.

mod common;

use common::cluster::*;
use common::*;
use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "common/ports.rs"]
mod ports;
use ports::free_port;

#[path = "faults/proxy.rs"]
mod proxy;
use proxy::LinkProxy;

/// A child process killed (SIGKILL) on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `nats-server -js` on a free port (None: not installed and not required).
fn nats(dir: &std::path::Path) -> Option<(Proc, SocketAddr)> {
    nats_at(dir, free_port())
}

fn nats_at(dir: &std::path::Path, port: u16) -> Option<(Proc, SocketAddr)> {
    nats_with(dir, port, &[])
}

/// `nats-server -js` on `port` with `extra` arguments.
fn nats_with(dir: &std::path::Path, port: u16, extra: &[&str]) -> Option<(Proc, SocketAddr)> {
    let bin = if std::path::Path::new("/usr/sbin/nats-server").exists() {
        "/usr/sbin/nats-server"
    } else {
        "nats-server"
    };
    let child = Command::new(bin)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match child {
        Ok(c) => {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let p = Proc(c);
            wait_listening(addr);
            Some((p, addr))
        }
        Err(e) => {
            assert!(
                std::env::var_os("BARRAGE_REQUIRE_NATS").is_none(),
                "nats-server required but not runnable: {e}"
            );
            eprintln!("nats-server not installed ({e}); skipping");
            None
        }
    }
}

struct Broker {
    proc: Proc,
    ingest: SocketAddr,
    link: SocketAddr,
    http: SocketAddr,
}

fn broker(name: &str, nats: SocketAddr) -> Broker {
    broker_with(name, nats, &[])
}

/// A broker with `extra` `--set` values (each `key=value`) in place of the defaults' same keys.
fn broker_with(name: &str, nats: SocketAddr, extra: &[&str]) -> Broker {
    let (ingest, link, http) = (free_port(), free_port(), free_port());
    let set = |kv: String| ["--set".to_string(), kv];
    let mut args = vec![
        "broker".to_string(),
        "--backbone".into(),
        format!("nats://{nats}"),
    ];
    for kv in [
        format!("node_id=\"{name}\""),
        "shards=1".into(),
        "pin=false".into(),
        format!("ingest_addr=\"127.0.0.1:{ingest}\""),
        format!("link_addr=\"127.0.0.1:{link}\""),
        format!("http_addr=\"127.0.0.1:{http}\""),
        format!("api_keys=[{{key=\"{API_KEY}\"}}]"),
        "cluster.partitions=8".into(),
        "cluster.lease_ms=1500".into(),
        "cluster.ack_wait_ms=1000".into(),
        "batch_window_ms=5".into(),
    ] {
        let key = kv.split('=').next().unwrap_or_default();
        if !extra.iter().any(|e| e.split('=').next() == Some(key)) {
            args.extend(set(kv));
        }
    }
    for kv in extra {
        args.extend(set(kv.to_string()));
    }
    let child = Command::new(env!("CARGO_BIN_EXE_barrage"))
        .args(&args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("barrage broker starts");
    let b = Broker {
        proc: Proc(child),
        ingest: SocketAddr::from(([127, 0, 0, 1], ingest)),
        link: SocketAddr::from(([127, 0, 0, 1], link)),
        http: SocketAddr::from(([127, 0, 0, 1], http)),
    };
    wait_listening(b.http);
    b
}

/// Pushes `n` numbered messages to `room` through `http`, retrying 503s (a backbone answer
/// while a partition moves is never a loss: it was not accepted). Returns the numbers accepted.
fn push_numbered(http: SocketAddr, room: u64, from: u64, n: u64) -> Vec<u64> {
    let auth = format!("Bearer {API_KEY}");
    let mut accepted = Vec::new();
    for i in from..from + n {
        let deadline = Instant::now() + WAIT;
        loop {
            let (status, v) = http_json(
                http,
                "POST",
                &format!("/v1/push/room/{room}"),
                &[("Authorization", auth.as_str())],
                &format!(r#"{{"cmd":"N","n":{i}}}"#),
            );
            if status == 202 {
                assert!(v["msg_id"].as_str().is_some(), "{v}");
                accepted.push(i);
                break;
            }
            assert_eq!(status, 503, "only overloaded may refuse: {v}");
            assert!(Instant::now() < deadline, "backbone never recovered");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    accepted
}

#[test]
fn a_broker_killed_with_sigkill_loses_no_accepted_push() {
    let dir = scratch("cluster");
    let Some((_nats, nats_addr)) = nats(&dir) else {
        return;
    };
    let mut a = broker("b-one", nats_addr);
    let b = broker("b-two", nats_addr);

    let control = control::start(control_config(KEYS_V1)).expect("control starts");
    let mut ec = edge_config("edge-1", KEYS_V1, a.link, control.http_addr());
    ec.broker_addrs = vec![a.link.to_string(), b.link.to_string()];
    let _edge = edge::start(ec).expect("edge starts");
    let deadline = Instant::now() + WAIT;
    loop {
        let v = http_json(control.http_addr(), "GET", "/v1/edges", &[], "").1;
        let up = v["edges"].as_array().is_some_and(|a| {
            a.iter()
                .any(|e| e["node_id"] == "edge-1" && e["state"] == "up")
        });
        if up {
            break;
        }
        assert!(Instant::now() < deadline, "edge never registered: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Viewers in several rooms, so both brokers own some of them.
    let rooms: Vec<u64> = (1..=6).map(|r| 7000 + r).collect();
    let mut viewers = Vec::new();
    for &room in &rooms {
        let t = connect_ticket(control.http_addr(), room, room);
        let e = &t.edges[0];
        let addr: SocketAddr = format!(
            "{}:{}",
            e["host"].as_str().unwrap(),
            e["tcp_port"].as_u64().unwrap()
        )
        .parse()
        .unwrap();
        let mut v = Viewer::tcp(addr);
        assert_eq!(v.auth(&auth_body(room, room, &t.token)), 0);
        warm_up(b.ingest, room, &mut [&mut v]);
        viewers.push(v);
    }

    // Before and after the kill: pushes through the surviving broker's API. A batch the dead
    // broker had handed on but the edge had not confirmed when SIGKILL came is not lost either:
    // `a_broker_killed_with_batches_unconfirmed_on_its_links_loses_none` holds that case.
    let mut sent: Vec<Vec<u64>> = Vec::new();
    for &room in &rooms {
        sent.push(push_numbered(b.http, room, 0, 20));
    }
    let mut got: Vec<BTreeSet<u64>> = vec![BTreeSet::new(); rooms.len()];
    receive_all(&mut viewers, &sent, &mut got, &rooms);
    let _ = a.proc.0.kill(); // SIGKILL
    let _ = a.proc.0.wait();
    let _ = (a.ingest, a.http);
    for (i, &room) in rooms.iter().enumerate() {
        sent[i].extend(push_numbered(b.http, room, 20, 20));
    }
    receive_all(&mut viewers, &sent, &mut got, &rooms);

    // The survivor took over every partition (so the dead broker's rooms were delivered by it).
    let metrics = get_text(b.http, "/metrics");
    assert!(
        metrics.contains("barrage_broker_backbone_partitions_held 8"),
        "survivor holds every partition:\n{}",
        metrics
            .lines()
            .filter(|l| l.starts_with("barrage_broker_backbone"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    drop(b);
    control.shutdown();
}

/// Waits until control lists the edge as up.
fn edge_up(control: &control::Handle, node: &str) {
    wait_until("the edge registered", || {
        let v = http_json(control.http_addr(), "GET", "/v1/edges", &[], "").1;
        v["edges"]
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e["node_id"] == node && e["state"] == "up"))
    });
}

/// A viewer of each room (uid = room), each warmed up (its room's interest reached the brokers).
fn room_viewers(control: &control::Handle, ingest: SocketAddr, rooms: &[u64]) -> Vec<Viewer> {
    rooms
        .iter()
        .map(|&room| {
            let t = connect_ticket(control.http_addr(), room, room);
            let e = &t.edges[0];
            let addr: SocketAddr = format!(
                "{}:{}",
                e["host"].as_str().unwrap(),
                e["tcp_port"].as_u64().unwrap()
            )
            .parse()
            .unwrap();
            let mut v = Viewer::tcp(addr);
            assert_eq!(v.auth(&auth_body(room, room, &t.token)), 0);
            warm_up(ingest, room, &mut [&mut v]);
            v
        })
        .collect()
}

/// The hand-off gap, closed (issue 12): the owner broker has consumed pushes, batched them and
/// queued them on its link to the edge, but the link is stalled (our proxy drops what the
/// broker sends), so the edge never has them and never confirms them. The owner is killed with
/// SIGKILL right then. Because it acks JetStream only on the edge's CONFIRM, none of them was
/// acked: the survivor takes the partitions over and delivers every one. (Acked at hand-off,
/// as before confirmations, every push of the stalled rooms is lost here, every run.)
#[test]
fn a_broker_killed_with_batches_unconfirmed_on_its_links_loses_none() {
    let dir = scratch("cluster-handoff");
    let Some((_nats, nats_addr)) = nats(&dir) else {
        return;
    };
    let mut a = broker("b-hand-a", nats_addr);
    let b = broker("b-hand-b", nats_addr);
    let held = |http| {
        metric(
            &get_text(http, "/metrics"),
            "barrage_broker_backbone_partitions_held",
        )
    };
    wait_until("the two brokers share the partitions", || {
        let (x, y) = (held(a.http), held(b.http));
        x > 0.0 && y > 0.0 && x + y == 8.0
    });
    let proxy = LinkProxy::start(a.link, Duration::ZERO);
    let control = control::start(control_config(KEYS_V1)).expect("control starts");
    let mut ec = edge_config("edge-hand", KEYS_V1, a.link, control.http_addr());
    ec.broker_addrs = vec![proxy.addr.to_string(), b.link.to_string()];
    let _edge = edge::start(ec).expect("edge starts");
    edge_up(&control, "edge-hand");
    let rooms: Vec<u64> = (1..=8).map(|r| 7100 + r).collect();
    let mut viewers = room_viewers(&control, b.ingest, &rooms);
    let mut sent: Vec<Vec<u64>> = rooms
        .iter()
        .map(|&r| push_numbered(b.http, r, 0, 5))
        .collect();
    let mut got: Vec<BTreeSet<u64>> = vec![BTreeSet::new(); rooms.len()];
    receive_all(&mut viewers, &sent, &mut got, &rooms);
    wait_until("the edge confirmed every batch so far", || {
        let page = get_text(a.http, "/metrics");
        metric(&page, "barrage_broker_backbone_confirms_total") >= 1.0
            && metric(&page, "barrage_broker_backbone_confirm_waiting") == 0.0
    });

    // Stalled: what the owner hands on from now reaches no edge.
    proxy.stall(true);
    for (i, &room) in rooms.iter().enumerate() {
        sent[i].extend(push_numbered(b.http, room, 5, 10));
    }
    wait_until("the owner's batches wait for confirmations", || {
        metric(
            &get_text(a.http, "/metrics"),
            "barrage_broker_backbone_confirm_waiting",
        ) >= 10.0
    });
    let waiting = metric(
        &get_text(a.http, "/metrics"),
        "barrage_broker_backbone_confirm_waiting",
    );
    let _ = a.proc.0.kill(); // SIGKILL
    let _ = a.proc.0.wait();
    receive_all(&mut viewers, &sent, &mut got, &rooms);
    wait_until("the survivor holds every partition", || held(b.http) == 8.0);
    let page = get_text(b.http, "/metrics");
    assert!(
        metric(&page, "barrage_broker_backbone_redelivered_total") >= waiting,
        "the survivor delivered what the dead owner had handed on unconfirmed ({waiting})"
    );
    drop(proxy);
    drop(b);
    control.shutdown();
}

/// A link that ends before it confirmed its batches (the broker lives on): they are given back
/// to JetStream (counted) and delivered again once the edge has re-linked, not acked.
#[test]
fn batches_of_a_link_that_ends_unconfirmed_are_delivered_again() {
    let dir = scratch("cluster-unconf");
    let Some((_nats, nats_addr)) = nats(&dir) else {
        return;
    };
    // The edge cannot re-link for longer than the NAK delay (ack_wait_ms, 1 s here), so the
    // redeliveries find nobody watching the rooms: the broker gives them back again rather
    // than acking them unsent while the rooms' last link ended less than link_dead_ms ago
    // (broker/src/confirm.rs, Orphans). Without that, this test loses all 20.
    let a = broker_with("b-unconf", nats_addr, &[]);
    let proxy = LinkProxy::start(a.link, Duration::ZERO);
    let control = control::start(control_config(KEYS_V1)).expect("control starts");
    let ec = edge_config("edge-unconf", KEYS_V1, proxy.addr, control.http_addr());
    let _edge = edge::start(ec).expect("edge starts");
    edge_up(&control, "edge-unconf");
    let rooms = [7201, 7202];
    let mut viewers = room_viewers(&control, a.ingest, &rooms);
    let mut got: Vec<BTreeSet<u64>> = vec![BTreeSet::new(); rooms.len()];
    proxy.stall(true);
    let sent: Vec<Vec<u64>> = rooms
        .iter()
        .map(|&r| push_numbered(a.http, r, 0, 10))
        .collect();
    wait_until("the batches wait for confirmations", || {
        metric(
            &get_text(a.http, "/metrics"),
            "barrage_broker_backbone_confirm_waiting",
        ) >= 20.0
    });
    // The link ends unconfirmed; the edge's re-links are refused for 2.5 s (the messages come
    // back from JetStream meanwhile, watched by nobody), then it re-links through the proxy.
    proxy.refuse(true);
    proxy.stall(false);
    proxy.close_all();
    std::thread::sleep(Duration::from_millis(2500));
    proxy.refuse(false);
    receive_all(&mut viewers, &sent, &mut got, &rooms);
    let page = get_text(a.http, "/metrics");
    assert!(
        metric(&page, "barrage_broker_backbone_unconfirmed_total") >= 20.0,
        "counted"
    );
    assert!(metric(&page, "barrage_broker_backbone_redelivered_total") >= 20.0);
    assert!(metric_sum(&_edge.metrics_text(), "barrage_edge_link_confirms_total") >= 1.0);
    wait_until("everything acked in the end", || {
        metric(
            &get_text(a.http, "/metrics"),
            "barrage_broker_backbone_confirm_waiting",
        ) == 0.0
    });
    drop(proxy);
    drop(a);
    control.shutdown();
}

/// What waits on one edge is bounded: a link that stays up (it pings) but never confirms the
/// batches it was sent is cut as `dead` once its oldest unconfirmed batch is `link_dead_ms` old,
/// and those messages go back to JetStream (counted), not held for ever.
#[test]
fn a_link_that_never_confirms_is_cut_and_its_batches_given_back() {
    use std::io::Write;
    let dir = scratch("cluster-lag");
    let Some((_nats, nats_addr)) = nats(&dir) else {
        return;
    };
    let a = broker_with(
        "b-lag",
        nats_addr,
        &["link_ping_ms=100", "link_dead_ms=3000"],
    );
    wait_until("the broker holds the partitions", || {
        metric(
            &get_text(a.http, "/metrics"),
            "barrage_broker_backbone_partitions_held",
        ) == 8.0
    });
    // A raw edge: offers confirmations, wants room 7501, pings, never confirms.
    let mut s = TcpStream::connect(a.link).unwrap();
    let mut out = Vec::new();
    for f in [
        proto::link::LinkFrame::Hello(proto::link::Hello {
            node_id: "mute".into(),
            region: String::new(),
            shards: 1,
            link_shard: 0,
            priority: proto::id::Priority::Low,
            capabilities: proto::link::caps::CONFIRM | proto::link::caps::PLAIN,
        }),
        proto::link::LinkFrame::Sub {
            interest: proto::link::Interest::Room(proto::id::RoomId(7501)),
            encodings: proto::id::Encoding::Plain.bit(),
        },
    ] {
        proto::link::encode(&f, &mut out);
    }
    s.write_all(&out).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pinger = {
        let (mut s, stop) = (s.try_clone().unwrap(), stop.clone());
        std::thread::spawn(move || {
            let mut nonce = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                nonce += 1;
                let mut ping = Vec::new();
                proto::link::encode(&proto::link::LinkFrame::Ping { nonce }, &mut ping);
                if s.write_all(&ping).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let dead = |page: &str| metric(page, "barrage_broker_link_cuts_total{reason=\"dead\"}");
    std::thread::sleep(Duration::from_millis(300));
    push_numbered(a.http, 7501, 0, 3);
    wait_until("the batches wait for the mute link", || {
        metric(
            &get_text(a.http, "/metrics"),
            "barrage_broker_backbone_confirm_waiting",
        ) >= 3.0
    });
    assert_eq!(dead(&get_text(a.http, "/metrics")), 0.0, "it pings");
    wait_until("cut for not confirming, its messages given back", || {
        let page = get_text(a.http, "/metrics");
        dead(&page) >= 1.0
            && metric(&page, "barrage_broker_backbone_unconfirmed_total") >= 3.0
            && metric(&page, "barrage_broker_backbone_confirm_waiting") == 0.0
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = pinger.join();
    drop(a);
}

/// The sum of every series of a metric family in a metrics page (labelled or not).
fn metric_sum(page: &str, name: &str) -> f64 {
    page.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = if rest.starts_with('{') {
                rest.rsplit_once(' ')?.1
            } else {
                rest.strip_prefix(' ')?
            };
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

/// Confirmations cost embedded mode nothing: a broker without a backbone never asks for them,
/// so its edges send no CONFIRM frame however many batches they receive (a broker in cluster
/// mode gets them: the hand-off tests above).
#[test]
fn an_embedded_broker_gets_no_confirmations() {
    let stack = Stack::start(KEYS_V1, KEYS_V1);
    let room = 7401;
    let mut viewers = room_viewers(
        stack.control.as_ref().unwrap(),
        stack.ingest_addr(),
        &[room],
    );
    let sent = vec![push_numbered(stack.broker_http(), room, 0, 20)];
    let mut got = vec![BTreeSet::new()];
    receive_all(&mut viewers, &sent, &mut got, &[room]);
    let page = stack.edge.as_ref().unwrap().metrics_text();
    assert!(metric_sum(&page, "barrage_edge_link_batches_in_total") >= 1.0);
    assert_eq!(metric_sum(&page, "barrage_edge_link_confirms_total"), 0.0);
}

/// Issue 9 across a takeover: a high-reach message's ttl counts from its JetStream publish
/// time, not from the consumption by whichever broker owns its partition now. An offline
/// user's message is tracked by the owner; the owner is killed with SIGKILL; the survivor that
/// tracks it after the lease moved has no more than the ttl minus the time since the push was
/// answered left (a fresh ttl would leave at least the lease time more).
#[test]
fn a_high_reach_ttl_does_not_restart_when_its_partition_moves() {
    let dir = scratch("cluster-ttl");
    let Some((_nats, nats_addr)) = nats(&dir) else {
        return;
    };
    let a = broker("b-ttl-a", nats_addr);
    let b = broker("b-ttl-b", nats_addr);
    let held = |http| {
        metric(
            &get_text(http, "/metrics"),
            "barrage_broker_backbone_partitions_held",
        )
    };
    wait_until("the two brokers share the partitions", || {
        let (x, y) = (held(a.http), held(b.http));
        x > 0.0 && y > 0.0 && x + y == 8.0
    });
    let ttl_ms = 20_000u64;
    let auth = format!("Bearer {API_KEY}");
    let (status, r) = http_json(
        b.http,
        "POST",
        &format!("/v1/push/user/4545?reach=high&ttl_ms={ttl_ms}"),
        &[("Authorization", auth.as_str())],
        r#"{"cmd":"GIFT","n":3}"#,
    );
    let answered = Instant::now();
    assert_eq!(status, 202, "{r}");
    let msg: u64 = r["msg_id"].as_str().expect("msg_id").parse().unwrap();
    wait_until("the owner tracks the message (the user is offline)", || {
        [a.http, b.http]
            .iter()
            .any(|h| reach_state(*h, msg)["state"] == "pending")
    });
    let (mut owner, survivor) = if reach_state(a.http, msg)["state"] == "pending" {
        (a, b)
    } else {
        (b, a)
    };
    let _ = owner.proc.0.kill(); // SIGKILL
    let _ = owner.proc.0.wait();
    wait_until("the survivor tracks the message", || {
        reach_state(survivor.http, msg)["state"] == "pending"
    });
    let asked = Instant::now();
    let left = reach_state(survivor.http, msg)["expires_in_ms"]
        .as_u64()
        .expect("expires_in_ms while pending");
    let since_answer = asked.duration_since(answered).as_millis() as u64;
    assert!(
        left <= ttl_ms - since_answer + 50,
        "the survivor has {left} ms left, {} ms after the answer: the ttl restarted",
        since_answer
    );
    let page = get_text(survivor.http, "/metrics");
    assert!(metric(&page, "barrage_broker_backbone_redelivered_total") >= 1.0);
    drop(survivor);
}

/// The value of an unlabelled sample in a metrics page (0 when absent).
/// Reads each viewer until it has every number pushed to its room so far (`sent[i]`), adding
/// to `got[i]`; fails naming what is missing after `WAIT`.
fn receive_all(
    viewers: &mut [Viewer],
    sent: &[Vec<u64>],
    got: &mut [BTreeSet<u64>],
    rooms: &[u64],
) {
    let deadline = Instant::now() + WAIT;
    for (i, v) in viewers.iter_mut().enumerate() {
        let want: BTreeSet<u64> = sent[i].iter().copied().collect();
        while !want.is_subset(&got[i]) && Instant::now() < deadline {
            if let Some(m) = v.next_message(deadline) {
                if let Some(n) = serde_json::from_str::<serde_json::Value>(&m)
                    .ok()
                    .and_then(|j| j["n"].as_u64())
                {
                    got[i].insert(n);
                }
            }
        }
        let missing: Vec<_> = want.difference(&got[i]).collect();
        assert!(missing.is_empty(), "room {}: missing {missing:?}", rooms[i]);
    }
}

fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Messages that wait longer than `cluster.ack_wait_ms` to be handed to the links (here: held
/// by a 2 s aggregation window against a 500 ms ack wait, as a backlog holds them under load)
/// are kept by in-progress acks: JetStream redelivers none, and the viewer sees each once.
/// Without the in-progress acks every held message is redelivered ~500 ms after delivery.
#[test]
fn messages_waiting_longer_than_ack_wait_are_not_redelivered() {
    let dir = scratch("cluster-wpi");
    let Some((_nats, nats_addr)) = nats(&dir) else {
        return;
    };
    let b = broker_with(
        "b-slow",
        nats_addr,
        &["cluster.ack_wait_ms=500", "batch_window_ms=2000"],
    );
    let control = control::start(control_config(KEYS_V1)).expect("control starts");
    let ec = edge_config("edge-1", KEYS_V1, b.link, control.http_addr());
    let _edge = edge::start(ec).expect("edge starts");
    let deadline = Instant::now() + WAIT;
    while !http_json(control.http_addr(), "GET", "/v1/edges", &[], "").1["edges"]
        .as_array()
        .is_some_and(|a| a.iter().any(|e| e["state"] == "up"))
    {
        assert!(Instant::now() < deadline, "edge never registered");
        std::thread::sleep(Duration::from_millis(50));
    }
    let room = 7100;
    let t = connect_ticket(control.http_addr(), room, room);
    let e = &t.edges[0];
    let addr: SocketAddr = format!(
        "{}:{}",
        e["host"].as_str().unwrap(),
        e["tcp_port"].as_u64().unwrap()
    )
    .parse()
    .unwrap();
    let mut v = Viewer::tcp(addr);
    assert_eq!(v.auth(&auth_body(room, room, &t.token)), 0);
    // The warm-up message flushes at once (a quiet room) and opens a 2 s window: what follows
    // waits in the aggregator until it ends, four times the ack wait.
    warm_up(b.ingest, room, &mut [&mut v]);
    let started = Instant::now();
    let sent = push_numbered(b.http, room, 0, 20);
    let held_ms = started.elapsed().as_millis();

    let mut seen = std::collections::BTreeMap::<u64, u32>::new();
    // Everything, then one more window and ack wait for any second copy.
    let deadline = Instant::now() + WAIT;
    while seen.len() < sent.len() && Instant::now() < deadline {
        if let Some(n) = v
            .next_message(deadline)
            .and_then(|m| serde_json::from_str::<serde_json::Value>(&m).ok())
            .and_then(|j| j["n"].as_u64())
        {
            *seen.entry(n).or_default() += 1;
        }
    }
    let extra = Instant::now() + Duration::from_millis(2_500);
    while let Some(m) = v.next_message(extra) {
        if let Some(n) = serde_json::from_str::<serde_json::Value>(&m)
            .ok()
            .and_then(|j| j["n"].as_u64())
        {
            *seen.entry(n).or_default() += 1;
        }
    }
    let page = get_text(b.http, "/metrics");
    let backbone: Vec<&str> = page
        .lines()
        .filter(|l| l.starts_with("barrage_broker_backbone"))
        .collect();
    let got: Vec<u64> = seen.keys().copied().collect();
    assert_eq!(
        got, sent,
        "every accepted push delivered (pushed in {held_ms} ms)"
    );
    let twice: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).collect();
    assert!(
        twice.is_empty(),
        "delivered more than once: {twice:?}\n{}",
        backbone.join("\n")
    );
    assert_eq!(
        metric(&page, "barrage_broker_backbone_redelivered_total"),
        0.0,
        "{}",
        backbone.join("\n")
    );
    // They did wait past the ack wait: in-progress acks were needed and sent.
    assert!(
        metric(&page, "barrage_broker_backbone_progress_acks_total") >= 1.0,
        "{}",
        backbone.join("\n")
    );
    assert_eq!(
        metric(&page, "barrage_broker_backbone_progress_expired_total"),
        0.0
    );
    drop(b);
    control.shutdown();
}

#[test]
fn a_backbone_that_is_down_is_answered_503_then_recovers() {
    let dir = scratch("cluster-down");
    let Some((nats_proc, nats_addr)) = nats(&dir) else {
        return;
    };
    let b = broker("b-down", nats_addr);
    let auth = format!("Bearer {API_KEY}");
    let push = || {
        http_json(
            b.http,
            "POST",
            "/v1/push/room/1",
            &[("Authorization", auth.as_str())],
            r#"{"cmd":"X"}"#,
        )
    };
    assert_eq!(push().0, 202);
    drop(nats_proc);
    let (status, v) = push();
    assert_eq!(status, 503, "backbone down: overloaded, not accepted: {v}");
    assert_eq!(v["error"], "overloaded", "{v}");
    let (_nats, _) = nats_at(&dir, nats_addr.port()).expect("nats restarts");
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, v) = push();
        if status == 202 {
            break;
        }
        assert_eq!(status, 503, "{v}");
        assert!(Instant::now() < deadline, "never recovered");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(b);
}

fn alive(pid: u64) -> bool {
    // A zombie still has /proc/<pid>; its state letter is Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// The whole of cluster mode through the real binary: `barrage cluster` starts NATS, control,
/// two brokers and an edge with no static broker list; the edge learns both brokers from
/// control, a viewer receives pushes, a broker is killed with SIGKILL, the ingest client fails
/// over to the other broker with nothing lost, the edge drops its links to the dead broker once
/// control stops listing it, a second control replica serves viewers when the first is killed,
/// and SIGTERM stops every process.
#[test]
fn barrage_cluster_edges_follow_control_and_ingest_fails_over() {
    if nats(&std::env::temp_dir()).is_none() {
        return;
    }
    let (cluster, v) = start_cluster(&[
        "--brokers",
        "2",
        "--edges",
        "1",
        "--controls",
        "2",
        "--partitions",
        "8",
        "--lease-ms",
        "1500",
    ]);
    let region = &v["regions"][0];
    let control = addr_of(&region["control"]);
    let brokers = region["brokers"].as_array().unwrap().clone();
    assert_eq!(brokers.len(), 2, "{v}");
    assert_eq!(region["edges"].as_array().unwrap().len(), 1, "{v}");
    let controls = region["controls"].as_array().unwrap().clone();
    assert_eq!(controls.len(), 2, "{v}");
    let mut pids: Vec<u64> = controls
        .iter()
        .map(|c| c["pid"].as_u64().unwrap())
        .collect();
    pids.push(region["nats"][0]["pid"].as_u64().unwrap());
    pids.extend(brokers.iter().map(|b| b["pid"].as_u64().unwrap()));
    pids.push(region["edges"][0]["pid"].as_u64().unwrap());
    assert!(pids.iter().all(|&p| alive(p)), "{v}");
    let edge_admin = addr_of(&region["edges"][0]["admin"]);
    let ingest: Vec<SocketAddr> = brokers.iter().map(|b| addr_of(&b["ingest"])).collect();
    let links: Vec<String> = brokers
        .iter()
        .map(|b| b["link"].as_str().unwrap().to_string())
        .collect();

    // The edge links to both brokers, learned from control (it has no broker_addrs).
    let link_up = |link: &str| {
        get_text(edge_admin, "/metrics").lines().any(|l| {
            l.starts_with("barrage_edge_link_up")
                && l.contains(link)
                && l.rsplit(' ').next().and_then(|x| x.parse::<f64>().ok()) == Some(1.0)
        })
    };
    let deadline = Instant::now() + WAIT;
    while !links.iter().all(|l| link_up(l)) {
        assert!(
            Instant::now() < deadline,
            "edge never linked to both brokers"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Viewers in rooms owned by both brokers (8 partitions over 2 brokers).
    let rooms: Vec<u64> = (1..=4).map(|r| 9100 + r).collect();
    let mut viewers = Vec::new();
    for &room in &rooms {
        let t = connect_ticket(control, room, room);
        let e = &t.edges[0];
        let addr: SocketAddr = format!(
            "{}:{}",
            e["host"].as_str().unwrap(),
            e["tcp_port"].as_u64().unwrap()
        )
        .parse()
        .unwrap();
        let mut viewer = Viewer::tcp(addr);
        assert_eq!(viewer.auth(&auth_body(room, room, &t.token)), 0);
        warm_up(ingest[1], room, &mut [&mut viewer]);
        viewers.push(viewer);
    }

    // An ingest client holding both brokers, connected to the first; the first is killed.
    let both = format!("{},{}", ingest[0], ingest[1]);
    let mut client = broker::IngestClient::connect_any(&both, API_KEY).expect("ingest connects");
    client.set_timeout(Duration::from_secs(5));
    let push = |client: &mut broker::IngestClient, room: u64, n: u64| {
        let m = broker::Message::room(room, format!(r#"{{"cmd":"N","n":{n}}}"#));
        let deadline = Instant::now() + WAIT;
        loop {
            match client.push(&m) {
                Ok(_) => return,
                // The backbone answers overloaded while partitions move: not accepted, retry.
                Err(e) if e.push_error() == Some(&proto::ingest::PushError::Overloaded) => {
                    assert!(Instant::now() < deadline, "never accepted");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("push failed: {e}"),
            }
        }
    };
    for (i, &room) in rooms.iter().enumerate() {
        for n in 0..5 {
            push(&mut client, room, (i as u64) * 100 + n);
        }
    }
    let first = brokers[0]["pid"].as_u64().unwrap();
    signal(first, libc::SIGKILL);
    for (i, &room) in rooms.iter().enumerate() {
        for n in 5..10 {
            push(&mut client, room, (i as u64) * 100 + n);
        }
    }

    // Every push reached its viewer: nothing lost; doubles are counted, not failed (a takeover
    // may redeliver what the dead broker handed on but had not acked).
    let deadline = Instant::now() + WAIT;
    for (i, v) in viewers.iter_mut().enumerate() {
        let want: BTreeSet<u64> = (0..10).map(|n| (i as u64) * 100 + n).collect();
        let mut got = BTreeSet::new();
        while got.len() < want.len() && Instant::now() < deadline {
            if let Some(m) = v.next_message(deadline) {
                if let Some(n) = serde_json::from_str::<serde_json::Value>(&m)
                    .ok()
                    .and_then(|j| j["n"].as_u64())
                {
                    got.insert(n);
                }
            }
        }
        let missing: Vec<_> = want.difference(&got).collect();
        assert!(missing.is_empty(), "room {}: missing {missing:?}", rooms[i]);
    }

    // Control stops listing the dead broker; the edge drops its links to it.
    let deadline = Instant::now() + WAIT;
    while get_text(edge_admin, "/metrics").contains(links[0].as_str()) {
        assert!(
            Instant::now() < deadline,
            "edge kept its links to the dead broker"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(link_up(&links[1]));

    // Control replicas: with the first one killed, the second still hands out tickets to the
    // edge (every edge heartbeats both), and a viewer connects and receives.
    signal(pids[0], libc::SIGKILL);
    let second = addr_of(&controls[1]["http"]);
    let t = connect_ticket(second, 9200, 9200);
    assert_eq!(t.edges.len(), 1, "the second control knows the edge");
    let e = &t.edges[0];
    let addr: SocketAddr = format!(
        "{}:{}",
        e["host"].as_str().unwrap(),
        e["tcp_port"].as_u64().unwrap()
    )
    .parse()
    .unwrap();
    let mut late = Viewer::tcp(addr);
    assert_eq!(late.auth(&auth_body(9200, 9200, &t.token)), 0);
    warm_up(ingest[1], 9200, &mut [&mut late]);
    pids.remove(0);

    // SIGTERM stops every process the cluster started.
    drop(cluster);
    let deadline = Instant::now() + WAIT;
    while pids.iter().any(|&p| alive(p)) {
        assert!(
            Instant::now() < deadline,
            "children outlived barrage cluster"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An ingest client's retry on another broker is not a second message: the same idempotency
/// key through either broker gets the first msg id (JetStream deduplicates by `Nats-Msg-Id`).
/// And a client holding a dead broker's address first fails over to the live one.
#[test]
fn a_keyed_retry_through_another_broker_is_the_same_message() {
    let dir = scratch("cluster-key");
    let Some((_nats, nats_addr)) = nats(&dir) else {
        return;
    };
    let a = broker("k-one", nats_addr);
    let b = broker("k-two", nats_addr);
    let m = broker::Message::room(42, r#"{"cmd":"ONCE"}"#);
    let mut ca = broker::IngestClient::connect(a.ingest, API_KEY).unwrap();
    let mut cb = broker::IngestClient::connect(b.ingest, API_KEY).unwrap();
    let first = ca.push_keyed(&m, "order-17").unwrap();
    assert_eq!(cb.push_keyed(&m, "order-17").unwrap(), first);
    assert_ne!(cb.push_keyed(&m, "order-18").unwrap(), first);

    // A dead address first: the client moves on to the next and pushes there.
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut c = broker::IngestClient::connect_any(&format!("{dead},{}", b.ingest), API_KEY)
        .expect("fails over to the live broker");
    assert_eq!(c.push_keyed(&m, "order-17").unwrap(), first);
    drop((a, b));
}

/// Starts `barrage cluster` with `args` and returns it with its JSON line parsed.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The failover run of issue 12 (docs/benchmarks.md, "Failover run"): 3 brokers, 2 edges,
/// one viewer in each of 100 rooms, a steady push load through an ingest client holding every
/// broker; one broker is killed with SIGKILL a third into the run. Prints accepted, delivered,
/// missing (asserted 0), duplicated, and the delivery gap per room (kill -> first delivery of a
/// push accepted after the kill). Long; run with
/// `cargo test --release -p barrage --test cluster -- --ignored --nocapture failover_run`.
/// `FAILOVER_RATE` pushes/s (default 500), `FAILOVER_SECS` (default 20), `FAILOVER_NATS` NATS
/// servers (default 1; 3 puts the stream at R3), `FAILOVER_KILL=nats` kills the server leading
/// the stream instead of broker-1 (with `FAILOVER_NATS=3`).
#[test]
#[ignore]
fn failover_run() {
    if nats(&std::env::temp_dir()).is_none() {
        return;
    }
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (rate, secs, nats_n) = (
        env("FAILOVER_RATE", 500),
        env("FAILOVER_SECS", 20),
        env("FAILOVER_NATS", 1),
    );
    let kill_nats = std::env::var("FAILOVER_KILL").is_ok_and(|k| k == "nats");
    let (cluster, v) = start_cluster(&[
        "--brokers",
        "3",
        "--edges",
        "2",
        "--nats",
        &nats_n.to_string(),
    ]);
    let region = &v["regions"][0];
    let control = addr_of(&region["control"]);
    let brokers = region["brokers"].as_array().unwrap().clone();
    let ingest: Vec<String> = brokers
        .iter()
        .map(|b| b["ingest"].as_str().unwrap().to_string())
        .collect();
    let rooms: Vec<u64> = (1..=100).map(|r| 20_000 + r).collect();
    let mut viewers = Vec::new();
    for &room in &rooms {
        let mut viewer = room_viewer(control, room);
        warm_up(ingest[0].parse().unwrap(), room, &mut [&mut viewer]);
        viewers.push(viewer);
    }
    let readers = Readers::start(viewers);
    let start = Instant::now();
    let load = Load::start(&ingest.join(","), &rooms, rate);
    std::thread::sleep(Duration::from_secs(secs / 3));
    let victim = if kill_nats {
        let nodes = region["nats"].as_array().unwrap();
        let leader = stream_leader(addr_of(&nodes[0]["monitor"]), "BARRAGE")
            .expect("the stream has a leader");
        let node = nodes.iter().find(|n| n["name"] == leader.as_str()).unwrap();
        signal(node["pid"].as_u64().unwrap(), libc::SIGKILL);
        leader
    } else {
        signal(brokers[0]["pid"].as_u64().unwrap(), libc::SIGKILL);
        "broker-1".to_string()
    };
    let killed = Instant::now();
    std::thread::sleep(Duration::from_secs(secs - secs / 3));
    let (accepted, refused) = load.stop();
    let want: Vec<BTreeSet<u64>> = accepted
        .iter()
        .map(|a| a.iter().map(|x| x.0).collect())
        .collect();
    let got = readers.finish(&want, Duration::from_secs(30));
    let (delivered, missing, dup) = tally(&accepted, &got);
    let mut gaps_ms = Vec::new();
    for (i, acc) in accepted.iter().enumerate() {
        // The first delivery of a push accepted after the kill.
        let after: BTreeSet<u64> = acc.iter().filter(|x| x.1 > killed).map(|x| x.0).collect();
        if let Some(at) = got[i]
            .iter()
            .filter(|(n, _)| after.contains(n))
            .map(|x| x.1)
            .min()
        {
            gaps_ms.push(at.saturating_duration_since(killed).as_millis() as u64);
        }
    }
    gaps_ms.sort_unstable();
    // The dead broker's rooms waited for the lease to expire; the others did not stop.
    let moved: Vec<u64> = gaps_ms.iter().copied().filter(|&g| g > 1_000).collect();
    let resumed = accepted
        .iter()
        .flatten()
        .map(|x| x.1)
        .filter(|&t| t > killed)
        .min()
        .map_or(0, |t| (t - killed).as_millis());
    println!(
        "failover run: {nats_n} NATS server(s), rate {rate}/s for {secs} s, kill -9 {victim} at {:.1} s\n\
         accepted {}, refused {refused}, delivered {delivered}, missing {}, duplicated {}\n\
         first push accepted {resumed} ms after the kill\n\
         delivery gap after the kill over {} rooms: p50 {} ms, p99 {} ms, max {} ms\n\
         rooms silent > 1 s: {}, their gap p50 {} ms, p99 {} ms",
        killed.duration_since(start).as_secs_f64(),
        want.iter().map(BTreeSet::len).sum::<usize>(),
        missing.len(),
        dup.len(),
        gaps_ms.len(),
        percentile(&gaps_ms, 0.5),
        percentile(&gaps_ms, 0.99),
        gaps_ms.last().copied().unwrap_or(0),
        moved.len(),
        percentile(&moved, 0.5),
        percentile(&moved, 0.99),
    );
    assert!(missing.is_empty(), "accepted pushes lost: {missing:?}");
    drop(cluster);
}

/// Sum of every `key` number anywhere in a JSON document.
fn sum_of(v: &serde_json::Value, key: &str) -> u64 {
    match v {
        serde_json::Value::Object(m) => m
            .iter()
            .map(|(k, x)| match (k == key, x.as_u64()) {
                (true, Some(n)) => n,
                _ => sum_of(x, key),
            })
            .sum(),
        serde_json::Value::Array(a) => a.iter().map(|x| sum_of(x, key)).sum(),
        _ => 0,
    }
}

/// Messages JetStream delivered to the brokers' consumers and has not had acked.
fn ack_pending(monitor: SocketAddr) -> u64 {
    let (status, v) = http_json(
        monitor,
        "GET",
        "/jsz?accounts=true&streams=true&consumers=true",
        &[],
        "",
    );
    assert_eq!(status, 200, "{v}");
    sum_of(&v, "num_ack_pending")
}

/// The next high-reach message (an op 5 body with a `msg_id`): its msg id.
fn next_reach_id(v: &mut Viewer) -> u64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let m = v.next_message(deadline).expect("a high-reach message");
        let body: serde_json::Value = serde_json::from_str(&m).expect("JSON body");
        if let Some(id) = body["msg_id"].as_str() {
            assert_eq!(
                body["cmd"], "GIFT",
                "the rest of the body is verbatim: {body}"
            );
            return id.parse().expect("decimal msg_id");
        }
    }
}

fn reach_state(http: SocketAddr, msg: u64) -> serde_json::Value {
    let auth = format!("Bearer {API_KEY}");
    let (status, v) = http_json(
        http,
        "GET",
        &format!("/v1/reach/{msg}"),
        &[("Authorization", auth.as_str())],
        "",
    );
    assert_eq!(status, 200, "{v}");
    v
}

/// Once control lists an edge as up: a viewer logged in as `uid` in `room` on the edge control
/// hands out, opted in to high reach (`"ack": true`).
fn ack_viewer(control: &control::Handle, room: u64, uid: u64) -> Viewer {
    wait_until("the edge registered", || {
        let v = http_json(control.http_addr(), "GET", "/v1/edges", &[], "").1;
        v["edges"]
            .as_array()
            .is_some_and(|a| a.iter().any(|e| e["state"] == "up"))
    });
    let t = connect_ticket(control.http_addr(), room, uid);
    let e = &t.edges[0];
    let addr: SocketAddr = format!(
        "{}:{}",
        e["host"].as_str().unwrap(),
        e["tcp_port"].as_u64().unwrap()
    )
    .parse()
    .unwrap();
    let mut v = Viewer::tcp(addr);
    let mut body = auth_body(uid, room, &t.token);
    body.ack = true;
    assert_eq!(v.auth(&body), 0);
    v
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// High reach in cluster mode: the partition's owner tracks a `reach=high` push through the
/// courier (resent to the connected user until an ACK) and keeps its JetStream message unacked
/// meanwhile; killed with SIGKILL before the ACK, the survivor takes the partition, tracks and
/// sends the message again under the same msg id, and the client's ACK ends it there and acks
/// it in JetStream (nothing left pending, so nobody sends it again).
#[test]
fn a_high_reach_push_is_acked_in_jetstream_only_after_the_client_ack_and_survives_its_owner() {
    let dir = scratch("cluster-reach");
    let monitor = free_port();
    let Some((_nats, nats_addr)) = nats_with(&dir, free_port(), &["-m", &monitor.to_string()])
    else {
        return;
    };
    let monitor = SocketAddr::from(([127, 0, 0, 1], monitor));
    let reach = ["reach_retry_ms=300", "reach_retries=50"];
    let a = broker_with("b-ra", nats_addr, &reach);
    let b = broker_with("b-rb", nats_addr, &reach);
    let held = |http| {
        metric(
            &get_text(http, "/metrics"),
            "barrage_broker_backbone_partitions_held",
        )
    };
    wait_until("the two brokers share the partitions", || {
        let (x, y) = (held(a.http), held(b.http));
        x > 0.0 && y > 0.0 && x + y == 8.0
    });

    let control = control::start(control_config(KEYS_V1)).expect("control starts");
    let mut ec = edge_config("edge-r", KEYS_V1, a.link, control.http_addr());
    ec.broker_addrs = vec![a.link.to_string(), b.link.to_string()];
    let _edge = edge::start(ec).expect("edge starts");
    let (room, uid) = (7300, 4242);
    let mut v = ack_viewer(&control, room, uid);

    // A push high reach cannot take is refused before it is stored, not dropped by its owner.
    let auth = format!("Bearer {API_KEY}");
    for (path, body) in [
        ("/v1/push/room/1?reach=high", r#"{"cmd":"GIFT"}"#),
        (
            "/v1/push/user/4242?reach=high",
            r#"{"cmd":"GIFT","msg_id":"1"}"#,
        ),
    ] {
        let (status, r) = http_json(
            b.http,
            "POST",
            path,
            &[("Authorization", auth.as_str())],
            body,
        );
        assert_eq!(status, 400, "{path} {body}: {r}");
    }
    // Accepted by either broker; consumed and tracked by the owner of the user's partition.
    let (status, r) = http_json(
        b.http,
        "POST",
        &format!("/v1/push/user/{uid}?reach=high"),
        &[("Authorization", auth.as_str())],
        r#"{"cmd":"GIFT","n":1}"#,
    );
    assert_eq!(status, 202, "{r}");
    let msg: u64 = r["msg_id"].as_str().expect("msg_id").parse().unwrap();
    assert_eq!(
        next_reach_id(&mut v),
        msg,
        "the delivered msg id is the answered one"
    );
    assert_eq!(next_reach_id(&mut v), msg, "resent while not ACKed");
    let (mut owner, survivor) = if reach_state(a.http, msg)["state"] == "pending" {
        (a, b)
    } else {
        (b, a)
    };
    assert_eq!(reach_state(owner.http, msg)["state"], "pending");
    assert_eq!(reach_state(survivor.http, msg)["state"], "unknown");
    assert_eq!(
        ack_pending(monitor),
        1,
        "unacked in JetStream until the client ACKs"
    );

    // The owner dies before the ACK: the survivor takes its partitions and sends it again.
    let _ = owner.proc.0.kill(); // SIGKILL
    let _ = owner.proc.0.wait();
    wait_until("the survivor tracks the message", || {
        let s = reach_state(survivor.http, msg);
        s["state"] == "pending" && s["attempts"].as_u64().unwrap_or(0) >= 1
    });
    // Whatever the dead owner sent is read before the reply to a heartbeat sent now; what
    // comes after it is the survivor's.
    v.send_packet(&proto::auth::heartbeat_request());
    let deadline = Instant::now() + WAIT;
    while !matches!(v.next_event(deadline), Some(Event::Online(_))) {
        assert!(Instant::now() < deadline, "no heartbeat reply");
    }
    assert_eq!(
        next_reach_id(&mut v),
        msg,
        "delivered again by the survivor"
    );
    v.send_packet(&proto::auth::ack_request(msg));
    wait_until("the survivor ends it on the ACK", || {
        reach_state(survivor.http, msg)["state"] == "acked"
    });
    wait_until("acked in JetStream", || ack_pending(monitor) == 0);
    let page = get_text(survivor.http, "/metrics");
    assert!(metric(&page, "barrage_broker_backbone_redelivered_total") >= 1.0);
    assert_eq!(metric(&page, "barrage_broker_reach_accepted_total"), 1.0);
    drop(survivor);
    control.shutdown();
}

/// A high-reach message tracked longer than `cluster.progress_ms_max` is redelivered by
/// JetStream to its owner, which keeps the one it tracks (no second track, no second msg id)
/// and acks the newest delivery when the client ACKs.
#[test]
fn a_high_reach_message_redelivered_to_its_owner_is_tracked_once() {
    let dir = scratch("cluster-reach1");
    let monitor = free_port();
    let Some((_nats, nats_addr)) = nats_with(&dir, free_port(), &["-m", &monitor.to_string()])
    else {
        return;
    };
    let monitor = SocketAddr::from(([127, 0, 0, 1], monitor));
    let b = broker_with(
        "b-r1",
        nats_addr,
        &[
            "reach_retry_ms=300",
            "reach_retries=50",
            "cluster.ack_wait_ms=300",
            "cluster.progress_ms_max=300",
        ],
    );
    let control = control::start(control_config(KEYS_V1)).expect("control starts");
    let ec = edge_config("edge-r1", KEYS_V1, b.link, control.http_addr());
    let _edge = edge::start(ec).expect("edge starts");
    let (room, uid) = (7301, 4343);
    let mut v = ack_viewer(&control, room, uid);
    let auth = format!("Bearer {API_KEY}");
    let (status, r) = http_json(
        b.http,
        "POST",
        &format!("/v1/push/user/{uid}?reach=high"),
        &[("Authorization", auth.as_str())],
        r#"{"cmd":"GIFT","n":2}"#,
    );
    assert_eq!(status, 202, "{r}");
    let msg: u64 = r["msg_id"].as_str().expect("msg_id").parse().unwrap();
    assert_eq!(next_reach_id(&mut v), msg);
    wait_until("JetStream redelivered it to its owner", || {
        let page = get_text(b.http, "/metrics");
        metric(&page, "barrage_broker_backbone_redelivered_total") >= 1.0
    });
    let page = get_text(b.http, "/metrics");
    assert_eq!(
        metric(&page, "barrage_broker_reach_accepted_total"),
        1.0,
        "tracked once"
    );
    assert_eq!(reach_state(b.http, msg)["state"], "pending");
    v.send_packet(&proto::auth::ack_request(msg));
    wait_until("ended on the ACK", || {
        reach_state(b.http, msg)["state"] == "acked"
    });
    wait_until("acked in JetStream", || ack_pending(monitor) == 0);
    drop(b);
    control.shutdown();
}

/// Per room: every message a viewer received, `(n, when)`, duplicates included.
type Deliveries = Vec<Vec<(u64, Instant)>>;

/// One reader thread per viewer, recording each numbered message (`"n"`) it receives.
struct Readers {
    got: std::sync::Arc<std::sync::Mutex<Deliveries>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Readers {
    fn start(viewers: Vec<Viewer>) -> Readers {
        use std::sync::atomic::Ordering::Relaxed;
        let got = std::sync::Arc::new(std::sync::Mutex::new(vec![Vec::new(); viewers.len()]));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = viewers
            .into_iter()
            .enumerate()
            .map(|(i, mut viewer)| {
                let (got, stop) = (got.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Relaxed) {
                        let until = Instant::now() + Duration::from_millis(200);
                        if let Some(n) = viewer.next_message(until).and_then(|m| {
                            serde_json::from_str::<serde_json::Value>(&m).ok()?["n"].as_u64()
                        }) {
                            got.lock().unwrap()[i].push((n, Instant::now()));
                        }
                    }
                })
            })
            .collect();
        Readers { got, stop, threads }
    }

    /// Every number received so far, per room.
    fn seen(&self) -> Vec<BTreeSet<u64>> {
        let got = self.got.lock().unwrap();
        got.iter()
            .map(|g| g.iter().map(|x| x.0).collect())
            .collect()
    }

    /// Waits (up to `limit`) until every room has every number in `want[i]`; then stops the
    /// readers and returns what they received.
    fn finish(self, want: &[BTreeSet<u64>], limit: Duration) -> Deliveries {
        let deadline = Instant::now() + limit;
        let complete = || {
            let got = self.got.lock().unwrap();
            want.iter().zip(got.iter()).all(|(w, g)| {
                let seen: BTreeSet<u64> = g.iter().map(|x| x.0).collect();
                w.is_subset(&seen)
            })
        };
        while !complete() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        std::mem::take(&mut *self.got.lock().unwrap())
    }
}

/// A steady push load: numbered room pushes round robin over `rooms` at `rate` per second
/// through an ingest client holding every broker in `ingest` (comma-separated), until stopped.
/// Refused pushes (overloaded while the backbone recovers) are counted, not retried.
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Accepted so far, for the test to watch progress.
    accepted: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: std::thread::JoinHandle<(Deliveries, u64)>,
}

impl Load {
    fn start(ingest: &str, rooms: &[u64], rate: u64) -> Load {
        use std::sync::atomic::Ordering::Relaxed;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut client = broker::IngestClient::connect_any(ingest, API_KEY).expect("ingest");
        client.set_timeout(Duration::from_secs(3));
        let rooms = rooms.to_vec();
        let (s, a) = (stop.clone(), accepted.clone());
        let thread = std::thread::spawn(move || {
            let mut done: Deliveries = vec![Vec::new(); rooms.len()];
            let (mut refused, mut n) = (0u64, 0u64);
            let start = Instant::now();
            while !s.load(Relaxed) {
                let i = (n % rooms.len() as u64) as usize;
                let m = broker::Message::room(rooms[i], format!(r#"{{"cmd":"N","n":{n}}}"#));
                match client.push(&m) {
                    Ok(_) => {
                        done[i].push((n, Instant::now()));
                        a.fetch_add(1, Relaxed);
                    }
                    Err(_) => refused += 1,
                }
                n += 1;
                let due = start + Duration::from_micros(n * 1_000_000 / rate);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            (done, refused)
        });
        Load {
            stop,
            accepted,
            thread,
        }
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until `more` pushes beyond `from` were accepted (failing after `WAIT`).
    fn wait_accepted(&self, from: u64, more: u64, what: &str) {
        let deadline = Instant::now() + WAIT;
        while self.accepted() < from + more {
            assert!(Instant::now() < deadline, "{what}: no pushes accepted");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the load: per room the accepted `(n, when)`, and the count refused.
    fn stop(self) -> (Deliveries, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("load thread")
    }
}

/// `(room index, n)` pairs.
type Numbers = Vec<(usize, u64)>;

/// What a run delivered against what it accepted: (delivered, missing, duplicated).
fn tally(accepted: &Deliveries, got: &Deliveries) -> (usize, Numbers, Numbers) {
    let (mut delivered, mut missing, mut dup) = (0, Vec::new(), Vec::new());
    for (i, acc) in accepted.iter().enumerate() {
        let mut seen = BTreeSet::new();
        for &(n, _) in &got[i] {
            if !seen.insert(n) {
                dup.push((i, n));
            }
        }
        delivered += seen.len();
        missing.extend(
            acc.iter()
                .filter(|x| !seen.contains(&x.0))
                .map(|x| (i, x.0)),
        );
    }
    (delivered, missing, dup)
}

/// A viewer in `room` on the edge control hands out.
fn room_viewer(control: SocketAddr, room: u64) -> Viewer {
    let t = connect_ticket(control, room, room);
    let e = &t.edges[0];
    let addr: SocketAddr = format!(
        "{}:{}",
        e["host"].as_str().unwrap(),
        e["tcp_port"].as_u64().unwrap()
    )
    .parse()
    .unwrap();
    let mut viewer = Viewer::tcp(addr);
    assert_eq!(viewer.auth(&auth_body(room, room, &t.token)), 0);
    viewer
}

/// The server name leading the stream `name` on the NATS cluster whose monitor is `monitor`.
fn stream_leader(monitor: SocketAddr, name: &str) -> Option<String> {
    let (status, v) = http_json(monitor, "GET", "/jsz?accounts=true&streams=true", &[], "");
    if status != 200 {
        return None;
    }
    v["account_details"]
        .as_array()?
        .iter()
        .flat_map(|a| a["stream_detail"].as_array().cloned().unwrap_or_default())
        .find(|s| s["name"] == name)?["cluster"]["leader"]
        .as_str()
        .map(str::to_string)
}

/// R3 over three NATS servers: `barrage cluster --nats 3` under a steady push load, the
/// server leading the stream is killed with SIGKILL; the stream elects another leader, the
/// brokers' clients reconnect to the survivors, pushes are accepted again, and every push
/// accepted before, during and after the kill reaches its viewer. (Pushes refused meanwhile
/// were answered `overloaded`: not accepted, so not owed.)
#[test]
fn a_nats_node_killed_under_r3_loses_no_accepted_push() {
    if nats(&std::env::temp_dir()).is_none() {
        return;
    }
    let (cluster, v) = start_cluster(&[
        "--nats",
        "3",
        "--brokers",
        "2",
        "--edges",
        "1",
        "--partitions",
        "8",
        "--lease-ms",
        "1500",
    ]);
    let region = &v["regions"][0];
    assert_eq!(region["replicas"], 3, "{v}");
    let nats_nodes = region["nats"].as_array().unwrap().clone();
    assert_eq!(nats_nodes.len(), 3, "{v}");
    let control = addr_of(&region["control"]);
    let ingest: Vec<String> = region["brokers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["ingest"].as_str().unwrap().to_string())
        .collect();

    let rooms: Vec<u64> = (1..=6).map(|r| 31_000 + r).collect();
    let mut viewers = Vec::new();
    for &room in &rooms {
        let mut viewer = room_viewer(control, room);
        warm_up(ingest[0].parse().unwrap(), room, &mut [&mut viewer]);
        viewers.push(viewer);
    }
    let readers = Readers::start(viewers);
    let load = Load::start(&ingest.join(","), &rooms, 200);
    load.wait_accepted(0, 100, "before the kill");

    let monitor = addr_of(&nats_nodes[0]["monitor"]);
    let leader = stream_leader(monitor, "BARRAGE").expect("the stream has a leader");
    let victim = nats_nodes
        .iter()
        .find(|n| n["name"] == leader.as_str())
        .expect("the leader is one of ours");
    signal(victim["pid"].as_u64().unwrap(), libc::SIGKILL);
    let (at_kill, killed) = (load.accepted(), Instant::now());
    // One server down of three: the stream keeps a quorum and accepts again.
    load.wait_accepted(at_kill, 300, "after the kill");
    let survivor = nats_nodes
        .iter()
        .find(|n| n["name"] != leader.as_str())
        .unwrap();
    let new_leader = stream_leader(addr_of(&survivor["monitor"]), "BARRAGE");
    let (accepted, refused) = load.stop();

    let want: Vec<BTreeSet<u64>> = accepted
        .iter()
        .map(|a| a.iter().map(|x| x.0).collect())
        .collect();
    // Generous: on the tree merged with edge confirmations one run in four still missed one
    // room's last 50 pushes 15 s after the load stopped (late or lost: not diagnosed yet; the
    // brokers' backbone counters are printed when it happens).
    let got = readers.finish(&want, Duration::from_secs(45));
    let (delivered, missing, dup) = tally(&accepted, &got);
    let resumed = accepted
        .iter()
        .flatten()
        .map(|x| x.1)
        .filter(|&t| t > killed)
        .min();
    eprintln!(
        "nats node {leader} killed (stream leader now {new_leader:?}): accepted {}, refused {refused}, \
         delivered {delivered}, missing {}, duplicated {}, first accepted {:?} after the kill",
        want.iter().map(BTreeSet::len).sum::<usize>(),
        missing.len(),
        dup.len(),
        resumed.map(|t| t - killed),
    );
    if !missing.is_empty() {
        for b in region["brokers"].as_array().unwrap() {
            let page = get_text(addr_of(&b["http"]), "/metrics");
            let counters: Vec<&str> = page
                .lines()
                .filter(|l| !l.starts_with('#') && !l.ends_with(" 0"))
                .filter(|l| l.contains("backbone") || l.contains("unrouted"))
                .collect();
            eprintln!("{}: {}", b["node_id"], counters.join(" | "));
        }
    }
    assert!(missing.is_empty(), "accepted pushes lost: {missing:?}");
    assert!(
        new_leader.is_some_and(|l| l != leader),
        "a new stream leader"
    );
    drop(cluster);
}

/// How many partitions each of `brokers` is the preferred owner of (rendezvous hash).
fn preferred_counts(brokers: &[&str], partitions: u16) -> Vec<usize> {
    let ids: Vec<backbone::BrokerId> = brokers
        .iter()
        .map(|b| backbone::BrokerId::new(b).expect("broker id"))
        .collect();
    let mut counts = vec![0; ids.len()];
    for p in 0..partitions {
        let owner =
            backbone::partition::preferred_owner(backbone::Partition(p), &ids).expect("an owner");
        counts[ids.iter().position(|b| b == owner).unwrap()] += 1;
    }
    counts
}

fn partitions_held(b: &Broker) -> usize {
    metric(
        &get_text(b.http, "/metrics"),
        "barrage_broker_backbone_partitions_held",
    ) as usize
}

/// A fourth broker joins three under a steady push load: it takes exactly the partitions the
/// rendezvous hash now prefers it for (about a quarter) and no other partition changes owner;
/// every accepted push reaches its viewer; and a push is delivered twice only around the hand-over
/// (none delivered before the join began, none accepted after the owners settled). Heartbeats
/// at the default 1 s: without the join wait (`cluster.join_wait_ms_max = 0` on the fourth
/// broker) it took partitions before the edge had linked to it and acked their rooms' messages
/// unsent (33 of 490 lost in one run of four).
#[test]
fn a_broker_joining_takes_its_share_of_partitions_and_loses_nothing() {
    const PARTITIONS: u16 = 32;
    let dir = scratch("cluster-join");
    let Some((_nats, nats_addr)) = nats(&dir) else {
        return;
    };
    // Heartbeats at the default 1 s, and control's liveness window three of them (with a
    // window of one heartbeat, control drops live brokers between beats and the edge unlinks them).
    let mut cc = control_config(KEYS_V1);
    cc.edge_ttl_ms = 3_000;
    let control = control::start(cc).expect("control starts");
    let sets = [
        format!("control_addr=\"{}\"", control.http_addr()),
        "control_heartbeat_ms=1000".to_string(),
        format!("cluster.partitions={PARTITIONS}"),
    ];
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let names = ["join-1", "join-2", "join-3", "join-4"];
    let mut brokers: Vec<Broker> = names[..3]
        .iter()
        .map(|n| broker_with(n, nats_addr, &sets))
        .collect();
    let mut ec = edge_config("edge-1", KEYS_V1, brokers[0].link, control.http_addr());
    ec.broker_addrs = Vec::new();
    ec.brokers_from_control = true;
    ec.control_heartbeat_ms = 1000;
    let edge = edge::start(ec).expect("edge starts");
    let linked = |brokers: &[Broker]| {
        let page = get_text(edge.admin_addr(), "/metrics");
        brokers.iter().all(|b| {
            let link = format!("\"{}\"", b.link);
            page.lines().any(|l| {
                l.starts_with("barrage_edge_link_up") && l.contains(&link) && l.ends_with(" 1")
            })
        })
    };
    let before = preferred_counts(&names[..3], PARTITIONS);
    wait_until("three brokers linked and holding their partitions", || {
        linked(&brokers)
            && brokers
                .iter()
                .map(partitions_held)
                .eq(before.iter().copied())
    });

    let rooms: Vec<u64> = (1..=16).map(|r| 32_000 + r).collect();
    let mut viewers = Vec::new();
    for &room in &rooms {
        let mut viewer = room_viewer(control.http_addr(), room);
        warm_up(brokers[0].ingest, room, &mut [&mut viewer]);
        viewers.push(viewer);
    }
    let readers = Readers::start(viewers);
    let ingest: Vec<String> = brokers.iter().map(|b| b.ingest.to_string()).collect();
    let load = Load::start(&ingest.join(","), &rooms, 200);
    load.wait_accepted(0, 100, "before the join");

    let seen_before_join = readers.seen();
    let joined_at = Instant::now();
    brokers.push(broker_with(names[3], nats_addr, &sets));
    let after = preferred_counts(&names, PARTITIONS);
    wait_until("the fourth broker linked and the owners settled", || {
        linked(&brokers)
            && brokers
                .iter()
                .map(partitions_held)
                .eq(after.iter().copied())
    });
    let settled_at = Instant::now();
    load.wait_accepted(load.accepted(), 200, "after the join");
    let (accepted, refused) = load.stop();

    let want: Vec<BTreeSet<u64>> = accepted
        .iter()
        .map(|a| a.iter().map(|x| x.0).collect())
        .collect();
    let got = readers.finish(&want, WAIT);
    let (delivered, missing, dup) = tally(&accepted, &got);
    let moved = after[3];
    eprintln!(
        "broker join: partitions held {before:?} -> {after:?} ({moved} of {PARTITIONS} moved, \
         settled {:?} after start); accepted {}, refused {refused}, delivered {delivered}, \
         missing {}, duplicated {}",
        settled_at - joined_at,
        want.iter().map(BTreeSet::len).sum::<usize>(),
        missing.len(),
        dup.len()
    );
    assert!(missing.is_empty(), "accepted pushes lost: {missing:?}");
    // Rendezvous: the old brokers only gave partitions away, all of them to the new one.
    assert!(before.iter().zip(&after).all(|(b, a)| a <= b));
    assert_eq!(
        before.iter().sum::<usize>() - after[..3].iter().sum::<usize>(),
        moved
    );
    assert!(
        (PARTITIONS as usize / 8..=PARTITIONS as usize / 2).contains(&moved),
        "about a quarter of the partitions move: {moved}"
    );
    let accepted_at = |i: usize, n: u64| accepted[i].iter().find(|x| x.0 == n).map(|x| x.1);
    for &(i, n) in &dup {
        assert!(
            !seen_before_join[i].contains(&n),
            "room {}: {n} delivered before the join and again after it",
            rooms[i]
        );
        assert!(
            accepted_at(i, n).is_some_and(|t| t < settled_at),
            "room {}: {n} accepted after the owners settled and delivered twice",
            rooms[i]
        );
    }
    drop(brokers);
    control.shutdown();
}

/// High reach through `barrage cluster`, whose edges learn their brokers from control (no
/// `broker_addrs`): the client's ACK reaches the owner and ends the resends. (The edge used to
/// forward ACKs only with a static broker list, so in this layout every message was resent
/// `reach_retries` times: `loadtest reach` saw three copies of each.)
#[test]
fn a_high_reach_ack_through_an_edge_following_control_ends_the_resends() {
    if nats(&std::env::temp_dir()).is_none() {
        return;
    }
    let (cluster, v) = start_cluster(&[
        "--brokers",
        "1",
        "--edges",
        "1",
        "--partitions",
        "8",
        "--broker-set",
        "reach_retry_ms=300",
        "--broker-set",
        "reach_retries=50",
    ]);
    let region = &v["regions"][0];
    let control = addr_of(&region["control"]);
    let http = addr_of(&region["brokers"][0]["http"]);
    let (room, uid) = (7400, 4343);
    let t = connect_ticket(control, room, uid);
    let e = &t.edges[0];
    let addr: SocketAddr = format!(
        "{}:{}",
        e["host"].as_str().unwrap(),
        e["tcp_port"].as_u64().unwrap()
    )
    .parse()
    .unwrap();
    let mut viewer = Viewer::tcp(addr);
    let mut body = auth_body(uid, room, &t.token);
    body.ack = true;
    assert_eq!(viewer.auth(&body), 0);
    let auth = format!("Bearer {API_KEY}");
    // The user's presence may reach the broker a moment after the auth: push until delivered.
    let mut msg = 0;
    wait_until("a high-reach push delivered", || {
        let (status, r) = http_json(
            http,
            "POST",
            &format!("/v1/push/user/{uid}?reach=high"),
            &[("Authorization", auth.as_str())],
            r#"{"cmd":"GIFT"}"#,
        );
        assert_eq!(status, 202, "{r}");
        msg = r["msg_id"].as_str().unwrap().parse().unwrap();
        next_reach_id(&mut viewer) == msg
    });
    viewer.send_packet(&proto::auth::ack_request(msg));
    wait_until("the owner ends it on the ACK", || {
        reach_state(http, msg)["state"] == "acked"
    });
    drop(cluster);
}

/// `barrage cluster --nats 3` prints its endpoints only once all of it is up: every NATS
/// server healthy and routed to the other two, the stream and the lease bucket at R3 with a
/// leader, every broker healthy. (Two brokers racing to create the R3 stream once made the
/// loser wait out a 10 s request timeout, and under load the start failed past its 30 s; the
/// backbone's setup retry is held by backbone/tests/quorum.rs, this checks the whole start.)
#[test]
fn barrage_cluster_with_three_nats_servers_is_up_when_it_prints() {
    if nats(&std::env::temp_dir()).is_none() {
        return;
    }
    let (cluster, v) = start_cluster(&["--nats", "3", "--brokers", "2", "--edges", "1"]);
    let region = &v["regions"][0];
    assert_eq!(region["replicas"], 3, "{v}");
    let nats_nodes = region["nats"].as_array().unwrap();
    assert_eq!(nats_nodes.len(), 3, "{v}");
    for n in nats_nodes {
        let monitor = addr_of(&n["monitor"]);
        assert_eq!(http_json(monitor, "GET", "/healthz", &[], "").0, 200, "{n}");
        let (_, routes) = http_json(monitor, "GET", "/routez", &[], "");
        assert_eq!(routes["num_routes"], 2, "{n}: {routes}");
        for stream in ["BARRAGE", "KV_barrage_leases"] {
            assert!(stream_leader(monitor, stream).is_some(), "{stream} on {n}");
        }
    }
    for b in region["brokers"].as_array().unwrap() {
        let (status, _) = http_json(addr_of(&b["http"]), "GET", "/healthz", &[], "");
        assert_eq!(status, 200, "{b}");
    }
    drop(cluster);
}
