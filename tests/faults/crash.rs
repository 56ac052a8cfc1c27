//! kill -9 and SIGSTOP/SIGCONT of each role under load, judged by the delivery model
//! ([`crate::cluster`]): every accepted message delivered, or its loss visible.

use crate::cluster::*;
use crate::common::*;
use std::time::{Duration, Instant};

/// kill -9 of the broker under load, restarted on the same ports with `startup_hold_ms`: the
/// edges re-link and re-send interest, the publisher reconnects, and no viewer loses an
/// accepted message without seeing it (the old broker's unflushed batches show as a seq that
/// starts again: a new epoch).
#[test]
#[ignore = "written at the deadline, not yet run: cargo test --test faults -- --ignored crash::"]
fn broker_kill9_and_restart_under_load() {
    let mut c = Cluster::start(Opts {
        edges: 2,
        ..Opts::default()
    });
    let (vs, p, from) = viewers_and_load(&c, 6, 300);
    std::thread::sleep(Duration::from_millis(500));
    c.kill_broker();
    std::thread::sleep(Duration::from_millis(300));
    c.restart_broker();
    // Load flows again through the new broker.
    let resumed = p.next_n();
    assert!(
        wait_all_seen(&vs, resumed, WAIT),
        "viewers got nothing after the broker came back"
    );
    let v = finish(vs, p, from);
    println!("broker kill -9 + restart: {v}");
    assert_eq!(v.lost, 0, "silent loss across a broker restart: {v}");
    assert_eq!(v.duplicates, 0, "{v}");
}

/// kill -9 of an edge: its viewers find another edge through control and get the load there;
/// what they missed meanwhile is covered by their reconnect.
#[test]
#[ignore = "written at the deadline, not yet run: cargo test --test faults -- --ignored crash::"]
fn edge_kill9_moves_its_viewers_to_another_edge() {
    let mut c = Cluster::start(Opts {
        edges: 2,
        ..Opts::default()
    });
    let (vs, p, from) = viewers_and_load(&c, 8, 200);
    let (doomed, _) = c.edge_addrs(0);
    let on_doomed = vs
        .iter()
        .filter(|v| v.log.lock().unwrap().edges.last() == Some(&doomed))
        .count();
    c.kill_edge(0);
    let t = Instant::now();
    let resumed = p.next_n();
    assert!(
        wait_all_seen(&vs, resumed, WAIT),
        "viewers of the killed edge never came back"
    );
    let back = t.elapsed();
    let (alive, _) = c.edge_addrs(1);
    for v in &vs {
        assert_eq!(v.log.lock().unwrap().edges.last(), Some(&alive));
    }
    let v = finish(vs, p, from);
    println!(
        "edge kill -9: {on_doomed} of 8 viewers moved, all receiving again after {back:?}; {v}"
    );
    assert_eq!(v.lost, 0, "{v}");
    assert!(v.reconnects >= on_doomed as u64, "{v}");
}

/// SIGSTOP of `role` for `pause`, then SIGCONT; the model judges the whole run.
fn stop_and_continue(role: &str, pause: Duration) -> Verdict {
    let c = Cluster::start(Opts::default());
    let (vs, p, from) = viewers_and_load(&c, 4, 200);
    std::thread::sleep(Duration::from_millis(300));
    signal(c.role_child(role), libc::SIGSTOP);
    std::thread::sleep(pause);
    signal(c.role_child(role), libc::SIGCONT);
    let resumed = p.next_n();
    assert!(
        wait_all_seen(&vs, resumed, WAIT),
        "{role}: viewers got nothing after SIGCONT"
    );
    // Control still answers and still lists the edge.
    c.wait_listed(1);
    finish(vs, p, from)
}

/// Within the link timeout (1 s; pause 400 ms): nothing is lost at all, not even visibly.
#[test]
#[ignore = "written at the deadline, not yet run: cargo test --test faults -- --ignored crash::"]
fn sigstop_within_the_link_timeout_loses_nothing() {
    for role in ["broker", "edge", "control"] {
        let v = stop_and_continue(role, Duration::from_millis(400));
        println!("SIGSTOP {role} 400 ms (link timeout 1 s): {v}");
        assert_eq!(v.lost, 0, "{role}: {v}");
        assert_eq!(
            v.delivered,
            v.accepted * v.viewers as u64,
            "{role}: a short stop lost messages: {v}"
        );
    }
}

/// Past the link timeout (2.5 s against 1 s): the links are declared dead and rebuilt; losses
/// are allowed, silent ones are not.
#[test]
#[ignore = "written at the deadline, not yet run: cargo test --test faults -- --ignored crash::"]
fn sigstop_past_the_link_timeout_loses_nothing_silently() {
    for role in ["broker", "edge", "control"] {
        let v = stop_and_continue(role, Duration::from_millis(2_500));
        println!("SIGSTOP {role} 2.5 s (link timeout 1 s): {v}");
        assert_eq!(v.lost, 0, "{role}: {v}");
    }
}
