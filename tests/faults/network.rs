//! The edge-broker link under network faults, judged by the delivery model ([`crate::cluster`]).
//!
//! - A partition (nftables drop in the edge's namespace, silent: no RST): the edge declares
//!   the link dead after `link_dead_ms`, reconnects once it heals, re-sends its interest; what
//!   the broker flushed meanwhile is lost *visibly* (a seq gap every viewer sees) and counted
//!   by the edge (`barrage_edge_link_seq_gaps_total`) and the broker (unrouted batches).
//! - Random loss (nftables numgen) and delay (our proxy's delay line): TCP carries it, nothing
//!   is lost at all while the link's silence stays under `link_dead_ms`.
//! - A reset in the middle of a batch (our proxy): the edge drops the partial frame with the
//!   link, reconnects, and the loss is visible and counted.

use crate::cluster::*;
use crate::common::*;
use crate::netns::Netns;
use crate::proxy::LinkProxy;
use std::time::{Duration, Instant};

/// A cluster whose one edge runs inside `ns` and dials the host's end of the veth pair.
fn cluster_in(ns: &Netns) -> Cluster {
    Cluster::start(Opts {
        edge_env: vec![(ns.ns_ip.clone(), ns.env())],
        host_for_edges: Some(ns.host_ip.clone()),
        ..Opts::default()
    })
}

/// Edge-side link counters: (downs, seq gaps).
fn link_counts(c: &Cluster) -> (f64, f64) {
    let m = c.edge_metrics(0);
    (
        metric_sum(&m, "barrage_edge_link_downs_total", ""),
        metric_sum(&m, "barrage_edge_link_seq_gaps_total", ""),
    )
}

/// Waits until `f` holds on the edge's link counters.
fn wait_link(c: &Cluster, what: &str, f: impl Fn((f64, f64)) -> bool) -> (f64, f64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let n = link_counts(c);
        if f(n) {
            return n;
        }
        assert!(Instant::now() < deadline, "{what}: link counters {n:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Partition edge and broker past the link timeout: detected, healed, loss visible and counted.
#[test]
fn partition_is_detected_healed_and_its_loss_is_visible() {
    let Some(ns) = Netns::create() else { return };
    let c = cluster_in(&ns);
    let (vs, p, from) = viewers_and_load(&c, 4, 200);
    let t = Instant::now();
    ns.partition(c.link_port);
    // The link is declared dead within link_dead_ms (1 s) plus a ping period.
    wait_link(
        &c,
        "the partitioned link was never declared down",
        |(d, _)| d >= 1.0,
    );
    let detected = t.elapsed();
    // Stay partitioned a little past detection so the broker drops the edge's interest too.
    std::thread::sleep(Duration::from_millis(800));
    ns.heal();
    let healed = Instant::now();
    let resumed = p.next_n();
    assert!(
        wait_all_seen(&vs, resumed, WAIT),
        "viewers got nothing after the partition healed"
    );
    let back = healed.elapsed();
    let (downs, gaps) = wait_link(&c, "no seq gap counted", |(_, g)| g >= 1.0);
    let unrouted = metric_sum(
        &metrics(c.broker_http),
        "barrage_broker_batches_unrouted_total",
        "",
    );
    let v = finish(vs, p, from);
    println!(
        "partition: detected after {detected:?}, receiving again {back:?} after heal; \
         edge link downs {downs}, seq gaps counted {gaps}, broker unrouted {unrouted}; {v}"
    );
    assert_eq!(v.lost, 0, "silent loss across a partition: {v}");
    assert!(v.missed_in_gap > 0, "the partition cost nothing? {v}");
    assert_eq!(v.duplicates, 0, "{v}");
}

/// 5% of the link's segments dropped at random for 3 s under load: TCP retransmits, and with
/// the silence kept under `link_dead_ms` nothing at all is lost.
#[test]
fn random_loss_on_the_link_loses_nothing() {
    let Some(ns) = Netns::create() else { return };
    let c = Cluster::start(Opts {
        edge_env: vec![(ns.ns_ip.clone(), ns.env())],
        host_for_edges: Some(ns.host_ip.clone()),
        // Generous: a run of retransmit timeouts (200 ms, 400 ms, ...) must not kill the link.
        link_dead_ms: 5_000,
        ..Opts::default()
    });
    let (vs, p, from) = viewers_and_load(&c, 4, 200);
    ns.drop_percent(c.link_port, 5);
    std::thread::sleep(Duration::from_secs(3));
    ns.heal();
    let (downs, gaps) = link_counts(&c);
    let v = finish(vs, p, from);
    println!("5% loss for 3 s: edge link downs {downs}, seq gaps {gaps}; {v}");
    assert_eq!(v.lost, 0, "{v}");
    assert_eq!(downs, 0.0, "the link went down under 5% loss: {v}");
    assert_eq!(
        v.delivered,
        v.accepted * v.viewers as u64,
        "lossy but live link lost messages: {v}"
    );
}

/// 150 ms each way on the link (RTT 300 ms, under the 1 s link timeout): nothing is lost and
/// the link stays up.
#[test]
fn delayed_link_loses_nothing() {
    let mut c = Cluster::start(Opts {
        edges: 0,
        ..Opts::default()
    });
    let proxy = LinkProxy::start(
        ([127, 0, 0, 1], c.link_port).into(),
        Duration::from_millis(150),
    );
    c.opts.broker_link_for_edges = Some(proxy.addr.to_string());
    let e = c.start_edge(0);
    c.edges.push(Some(e));
    c.wait_listed(1);
    let (vs, p, from) = viewers_and_load(&c, 4, 200);
    std::thread::sleep(Duration::from_secs(2));
    let (downs, gaps) = link_counts(&c);
    let v = finish(vs, p, from);
    println!("150 ms each way: link downs {downs}, gaps {gaps}; {v}");
    assert_eq!(downs, 0.0, "{v}");
    assert_eq!(v.delivered, v.accepted * v.viewers as u64, "{v}");
}

/// Three resets in the middle of a read from the broker (a partial batch frame on the edge's
/// side): the edge reconnects each time, and nothing is lost silently.
#[test]
fn link_reset_mid_batch_reconnects_without_silent_loss() {
    let mut c = Cluster::start(Opts {
        edges: 0,
        ..Opts::default()
    });
    let proxy = LinkProxy::start(([127, 0, 0, 1], c.link_port).into(), Duration::ZERO);
    c.opts.broker_link_for_edges = Some(proxy.addr.to_string());
    let e = c.start_edge(0);
    c.edges.push(Some(e));
    c.wait_listed(1);
    let (vs, p, from) = viewers_and_load(&c, 4, 300);
    for i in 1..=3u64 {
        let accepted_before = proxy.accepted();
        proxy.reset();
        let deadline = Instant::now() + WAIT;
        while proxy.resets_done() < i || proxy.accepted() <= accepted_before {
            assert!(Instant::now() < deadline, "reset {i} never happened");
            std::thread::sleep(Duration::from_millis(20));
        }
        let resumed = p.next_n();
        assert!(
            wait_all_seen(&vs, resumed, WAIT),
            "viewers got nothing after reset {i}"
        );
    }
    let (downs, gaps) = wait_link(&c, "resets not seen as link downs", |(d, _)| d >= 3.0);
    let v = finish(vs, p, from);
    println!(
        "3 resets mid-batch: proxy resets {}, edge link downs {downs}, seq gaps counted {gaps}; {v}",
        proxy.resets_done()
    );
    assert_eq!(v.lost, 0, "silent loss across a link reset: {v}");
    assert_eq!(v.duplicates, 0, "{v}");
}
