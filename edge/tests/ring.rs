//! The io_uring write path of plain client sockets (docs/architecture.md, "The client data
//! path"): under the io_uring driver each shard submits a fan-out round's writes together on
//! its own ring (`uring_client_writes`, on in these tests). Each test runs under both drivers
//! (epoll: the `writev` path, same outcome).

mod common;

use common::*;
use net::runtime::Driver;
use std::time::Duration;

const ROOM: u64 = 500;

/// One batch to many viewers of one shard: every viewer gets it, and under io_uring the
/// writes went to the kernel many per `io_uring_enter`, not one system call each.
fn many_in_one_submit_body(driver: Driver) {
    const VIEWERS: usize = 200;
    let broker = TestBroker::start(1);
    let mut cfg = edge_config(driver, vec![broker.addr_string()]);
    cfg.shards = 1;
    cfg.uring_client_writes = true;
    let edge = edge::start(cfg).unwrap();
    broker.wait_links(2);
    let mut viewers: Vec<Client> = (0..VIEWERS)
        .map(|i| {
            let mut c = Client::tcp(edge.tcp_addr());
            c.auth_ok(i as u64 + 1, ROOM, 0, 1);
            c
        })
        .collect();
    broker.wait_seen("SUB", |s| s.iter().any(|x| matches!(x, Seen::Sub(..))));
    let m0 = edge.metrics_text();
    let b = big_plain_batch(ROOM, 1, 700);
    broker.send(&b);
    for (i, v) in viewers.iter_mut().enumerate() {
        match v.recv(WAIT) {
            Got::Bytes(x) => assert!(x == b.packet[..], "viewer {i}: batch intact"),
            other => panic!("viewer {i}: {other:?}"),
        }
    }
    let m1 = edge.metrics_text();
    let delta = |name: &str| metric_sum(&m1, name) - metric_sum(&m0, name);
    let (writes, submits) = (
        delta("barrage_edge_ring_writes_total"),
        delta("barrage_edge_ring_submits_total"),
    );
    if driver == Driver::Uring {
        assert!(writes >= VIEWERS as f64, "{writes} ring writes\n{m1}");
        assert!(
            submits * 10.0 <= writes,
            "{writes} writes in {submits} submits: not batched\n{m1}"
        );
    } else {
        assert_eq!(writes, 0.0, "no ring under epoll");
    }
    edge.shutdown();
}

#[test]
fn many_connections_written_in_one_submit_uring() {
    with_driver(Driver::Uring, many_in_one_submit_body);
}

#[test]
fn many_connections_written_in_one_submit_legacy() {
    with_driver(Driver::Legacy, many_in_one_submit_body);
}

/// Viewers that stop reading (small receive buffers, so writes go partial and more queue
/// behind) and then reset their connections while batches keep coming: the writes in flight
/// or parked for them fail or are orphaned (`net::sys` tests hold that an orphan's socket and
/// buffers live until its completion), each closes that connection only, and the reading
/// viewer gets every batch whole and in order meanwhile; afterwards the shard serves a new
/// viewer, and no connection is left behind.
fn reset_with_writes_in_flight_body(driver: Driver) {
    const QUITTERS: usize = 24;
    const BATCHES: u64 = 200;
    let broker = TestBroker::start(1);
    let mut cfg = edge_config(driver, vec![broker.addr_string()]);
    cfg.shards = 1;
    cfg.uring_client_writes = true;
    cfg.send_queue_bytes_max = 64 * 1024 * 1024;
    cfg.stuck_ms_max = 60_000;
    let edge = edge::start(cfg).unwrap();
    broker.wait_links(2);
    let mut reading = Client::tcp(edge.tcp_addr());
    reading.auth_ok(1, ROOM, 0, 1);
    let mut quitters: Vec<Option<Client>> = (0..QUITTERS)
        .map(|i| {
            let c = Client::tcp(edge.tcp_addr());
            let _ = socket2::SockRef::from(&c.stream).set_recv_buffer_size(4096);
            let mut c = c;
            c.auth_ok(i as u64 + 2, ROOM, 0, 1);
            Some(c)
        })
        .collect();
    broker.wait_seen("SUB", |s| s.iter().any(|x| matches!(x, Seen::Sub(..))));
    let batches: Vec<_> = (1..=BATCHES)
        .map(|s| big_plain_batch(ROOM, s, 8 * 1024))
        .collect();
    for (k, b) in batches.iter().enumerate() {
        broker.send(b);
        match reading.recv(WAIT) {
            Got::Bytes(x) => assert!(x == b.packet[..], "batch {} intact", b.seq),
            other => panic!("reading viewer, batch {}: {other:?}", b.seq),
        }
        // From a third of the way on, one quitter per batch reads a little (the socket turns
        // writable, a write goes out) and resets its connection at once (SO_LINGER 0).
        let q = k.saturating_sub(BATCHES as usize / 3);
        if k >= BATCHES as usize / 3 && q < QUITTERS {
            if let Some(mut c) = quitters[q].take() {
                let _ = c.recv_exact(1024, Duration::from_millis(50));
                let s = socket2::SockRef::from(&c.stream);
                let _ = s.set_linger(Some(Duration::ZERO));
                drop(c);
            }
        }
    }
    eventually("quitters closed", || {
        metric_sum(&edge.metrics_text(), "barrage_edge_connections") == 1.0
    });
    let mut late = Client::tcp(edge.tcp_addr());
    late.auth_ok(100, ROOM, 0, 1);
    let b = big_plain_batch(ROOM, BATCHES + 1, 512);
    broker.send(&b);
    for c in [&mut reading, &mut late] {
        match c.recv(WAIT) {
            Got::Bytes(x) => assert!(x == b.packet[..], "last batch intact"),
            other => panic!("after the resets: {other:?}"),
        }
    }
    let m = edge.metrics_text();
    let (errors, orphans) = (
        metric_sum(&m, "barrage_edge_ring_write_errors_total"),
        metric_sum(&m, "barrage_edge_ring_orphans_freed_total"),
    );
    if driver == Driver::Uring {
        assert!(
            metric_sum(&m, "barrage_edge_ring_writes_total") > 0.0,
            "the ring wrote\n{m}"
        );
    }
    // Which path a reset meets (a failed ring write, an orphaned one, or a parked partial
    // write and a failed read) depends on timing; each closes that viewer only.
    let _ = (errors, orphans);
    println!(
        "ring writes {} errors {} orphans freed {} io closes {} peer closes {}",
        metric_sum(&m, "barrage_edge_ring_writes_total"),
        metric_sum(&m, "barrage_edge_ring_write_errors_total"),
        metric_sum(&m, "barrage_edge_ring_orphans_freed_total"),
        metric(&m, "barrage_edge_closes_total{reason=\"io\"}"),
        metric(&m, "barrage_edge_closes_total{reason=\"peer_closed\"}"),
    );
    edge.shutdown();
}

#[test]
fn reset_with_writes_in_flight_closes_that_viewer_only_uring() {
    with_driver(Driver::Uring, reset_with_writes_in_flight_body);
}

#[test]
fn reset_with_writes_in_flight_closes_that_viewer_only_legacy() {
    with_driver(Driver::Legacy, reset_with_writes_in_flight_body);
}
