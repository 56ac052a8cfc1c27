//! Two regions' backbones against two real nats-servers, each with its own JetStream domain,
//! joined by a leafnode (region r2's server connects to r1's leafnode port): a push accepted
//! in one region reaches the other's partition owner with the same msg id, and a push sent to
//! both regions with one dedup key exists once in each region's work stream.
//!
//! Skips when nats-server is not installed, unless `BARRAGE_REQUIRE_NATS` is set.

mod common;

use backbone::{Backbone, BrokerId, Config, Delivery, Event, Partition, Sink};
use bytes::Bytes;
use crossbeam_channel::Receiver;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

const PARTITIONS: u16 = 4;

struct Nats {
    child: Child,
    dir: PathBuf,
    url: String,
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A nats-server for `domain`; `leaf` is `Listen(port)` for the hub, `Connect(port)` for a
/// region that joins it.
fn nats(domain: &str, leaf: Result<u16, u16>) -> Option<Nats> {
    let leafnodes = match leaf {
        Ok(l) => format!("leafnodes {{ listen: \"127.0.0.1:{l}\" }}"),
        Err(l) => format!("leafnodes {{ remotes: [ {{ url: \"nats-leaf://127.0.0.1:{l}\" }} ] }}"),
    };
    nats_with(&format!("domain: {domain}"), Some(&leafnodes))
}

/// A nats-server with JetStream (`js_extra` inside the jetstream block) and `extra` config.
fn nats_with(js_extra: &str, extra: Option<&str>) -> Option<Nats> {
    let p = port();
    let dir = std::env::temp_dir().join(format!("barrage-regions-{}-{p}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let conf = format!(
        "listen: \"127.0.0.1:{p}\"\njetstream {{ store_dir: {:?}, {js_extra} }}\n{}\n",
        dir.display().to_string(),
        extra.unwrap_or("")
    );
    let file = dir.join("nats.conf");
    std::fs::write(&file, &conf).expect("conf");
    let addr = SocketAddr::from(([127, 0, 0, 1], p));
    let child = common::spawn_nats(&file, addr)?;
    Some(Nats {
        child,
        dir,
        url: format!("nats://{addr}"),
    })
}

fn config(n: &Nats, region: &str) -> Config {
    Config {
        servers: n.url.clone(),
        partitions: PARTITIONS,
        lease_ms: 1_000,
        ack_wait_ms: 1_000,
        region: region.into(),
        regions: vec!["r1".into(), "r2".into()],
        // No edges here to wait for before taking partitions.
        join_wait_ms_max: 0,
        ..Config::default()
    }
}

struct Region {
    bb: Backbone,
    rx: Receiver<Event>,
    got: Vec<Delivery>,
}

impl Region {
    fn start(n: &Nats, region: &str) -> Region {
        let (sink, rx, _notify) = Sink::new(1024);
        let me = BrokerId::new(&format!("{region}-b1")).unwrap();
        let bb = Backbone::start(config(n, region), me, vec![sink]).expect("backbone starts");
        Region {
            bb,
            rx,
            got: Vec::new(),
        }
    }

    /// Collects deliveries (acking each) until `n` arrived or `within` passed.
    fn collect(&mut self, n: usize, within: Duration) {
        let until = Instant::now() + within;
        while self.got.len() < n && Instant::now() < until {
            if let Ok(Event::Message(d)) = self.rx.recv_timeout(Duration::from_millis(50)) {
                self.bb.ack(d.ack.clone(), backbone::AckKind::Ack);
                self.got.push(d);
            }
        }
    }
}

#[test]
fn a_push_reaches_the_other_region_once_with_its_origin_and_msg_id() {
    let leaf = port();
    let Some(n1) = nats("r1", Ok(leaf)) else {
        return;
    };
    let Some(n2) = nats("r2", Err(leaf)) else {
        return;
    };
    let mut r1 = Region::start(&n1, "r1");
    let mut r2 = Region::start(&n2, "r2");
    let a = r1
        .bb
        .publish(Partition(1), "from-r1", Bytes::from_static(b"one"))
        .wait()
        .expect("accepted in r1");
    let b = r2
        .bb
        .publish(Partition(2), "from-r2", Bytes::from_static(b"two"))
        .wait()
        .expect("accepted in r2");
    assert_ne!(a.msg_id, b.msg_id);
    // Sent to both regions with one key (an ingest client that failed over): stored in each
    // origin, so each work stream holds two copies, and the consumer's SeenKeys drops the
    // second (the work stream cannot: see backbone::region, Deduplication).
    for r in [&r1, &r2] {
        r.bb.publish(Partition(3), "both", Bytes::from_static(b"3"))
            .wait()
            .expect("accepted");
    }
    for r in [&mut r1, &mut r2] {
        r.collect(4, Duration::from_secs(10));
        let mut keys: Vec<_> = r.got.iter().filter_map(|d| d.key.clone()).collect();
        keys.sort();
        assert_eq!(keys, ["both", "both", "from-r1", "from-r2"], "{:?}", r.got);
        let mut seen = backbone::region::SeenKeys::new(120_000, 100);
        let now = Instant::now();
        let copies = r
            .got
            .iter()
            .filter(|d| seen.is_copy(d.key.as_deref().unwrap_or(""), d.sequence, now))
            .count();
        assert_eq!(copies, 1, "the second copy is recognised");
        let one = r
            .got
            .iter()
            .find(|d| d.key.as_deref() == Some("from-r1"))
            .unwrap();
        assert_eq!(one.msg_id, a.msg_id);
        assert_eq!(one.payload, Bytes::from_static(b"one"));
        let origin = one.origin.as_ref().expect("origin headers");
        assert_eq!(origin.region, "r1");
        let two = r
            .got
            .iter()
            .find(|d| d.key.as_deref() == Some("from-r2"))
            .unwrap();
        assert_eq!(two.msg_id, b.msg_id);
    }
    assert!(
        !r1.got
            .iter()
            .find(|d| d.key.as_deref() == Some("from-r1"))
            .unwrap()
            .origin
            .as_ref()
            .unwrap()
            .foreign
    );
    assert!(
        r2.got
            .iter()
            .find(|d| d.key.as_deref() == Some("from-r1"))
            .unwrap()
            .origin
            .as_ref()
            .unwrap()
            .foreign
    );
}

/// Why regions are leafnodes with a JetStream domain each and not one supercluster through
/// gateways: with gateways, JetStream has one meta group across every region, so two
/// single-node regions form a meta group of two, and when one region dies the survivor has no
/// quorum: it cannot create a consumer, which a broker needs to take a partition over. With
/// leafnodes each region's JetStream stands alone: the survivor's broker takes every partition
/// and publishes as before.
#[test]
fn one_region_dying_leaves_the_other_working_with_leafnodes_not_with_gateways() {
    // Gateways: two servers, one cluster each, one supercluster.
    let (g1, g2) = (port(), port());
    let gateways = format!(
        "gateways: [ {{ name: g1, url: \"nats://127.0.0.1:{g1}\" }}, {{ name: g2, url: \"nats://127.0.0.1:{g2}\" }} ]"
    );
    // A one-node cluster each (JetStream in a supercluster wants a cluster block with a
    // route; a route to itself is ignored).
    let gw = |name: &str, p: u16| {
        let route = port();
        format!(
            "server_name: {name}\ncluster {{ name: {name}, listen: \"127.0.0.1:{route}\", routes: [\"nats://127.0.0.1:{route}\"] }}\ngateway {{ name: {name}, listen: \"127.0.0.1:{p}\", {gateways} }}\n"
        )
    };
    let Some(mut s1) = nats_with("", Some(&gw("g1", g1))) else {
        return;
    };
    let Some(s2) = nats_with("", Some(&gw("g2", g2))) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let works = |url: String, stream: &'static str| {
        rt.block_on(async move {
            let Ok(client) = async_nats::connect(url).await else {
                return false;
            };
            let js = async_nats::jetstream::new(client);
            let made = tokio::time::timeout(
                Duration::from_secs(3),
                js.get_or_create_stream(async_nats::jetstream::stream::Config {
                    name: stream.into(),
                    subjects: vec![format!("{stream}.>")],
                    ..Default::default()
                }),
            )
            .await;
            matches!(made, Ok(Ok(_)))
        })
    };
    // Both up: the supercluster elects a meta leader (wait for it).
    let until = Instant::now() + Duration::from_secs(20);
    while !works(s2.url.clone(), "BOTH") {
        assert!(
            Instant::now() < until,
            "the supercluster never served JetStream"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = s1.child.kill();
    let _ = s1.child.wait();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !works(s2.url.clone(), "AFTER"),
        "a two-region supercluster kept JetStream after losing a region (quorum of 2?)"
    );
    drop(s2);

    // Leafnodes with a domain each: r1 (the hub) dies, r2's broker keeps publishing and
    // consuming on its own.
    let leaf = port();
    let Some(mut n1) = nats("r1", Ok(leaf)) else {
        return;
    };
    let Some(n2) = nats("r2", Err(leaf)) else {
        return;
    };
    let _r1 = Region::start(&n1, "r1");
    let _ = n1.child.kill();
    let _ = n1.child.wait();
    let mut r2 = Region::start(&n2, "r2");
    r2.bb
        .publish(Partition(0), "alone", Bytes::from_static(b"x"))
        .wait()
        .expect("r2 accepts with r1 dead");
    r2.collect(1, Duration::from_secs(10));
    assert_eq!(r2.got.len(), 1, "r2 consumes with r1 dead");
}

/// A region added to `cluster.regions` after the streams were made: the next broker start
/// updates the work stream's sources to follow the config.
#[test]
fn the_work_streams_sources_follow_the_configured_regions() {
    let Some(n1) = nats("r1", Ok(port())) else {
        return;
    };
    let sources = || {
        let url = n1.url.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
            let mut s = js.get_stream("BARRAGE_r1").await.unwrap();
            let info = s.info().await.unwrap();
            let mut n: Vec<String> = info
                .config
                .sources
                .iter()
                .flatten()
                .map(|s| s.name.clone())
                .collect();
            n.sort();
            n
        })
    };
    let start = |regions: &[&str]| {
        let (sink, _rx, _notify) = Sink::new(16);
        let config = Config {
            regions: regions.iter().map(|r| r.to_string()).collect(),
            ..config(&n1, "r1")
        };
        Backbone::start(config, BrokerId::new("r1-b1").unwrap(), vec![sink]).expect("starts")
    };
    drop(start(&["r1", "r2"]));
    assert_eq!(sources(), ["BARRAGE_ORIGIN_r1", "BARRAGE_ORIGIN_r2"]);
    drop(start(&["r1", "r2", "r3"]));
    assert_eq!(
        sources(),
        [
            "BARRAGE_ORIGIN_r1",
            "BARRAGE_ORIGIN_r2",
            "BARRAGE_ORIGIN_r3"
        ]
    );
}
