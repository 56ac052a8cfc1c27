//! Link impersonation and handshake-slot exhaustion (issue 17, defect 1).

use crate::common::*;
use bytes::Bytes;
use proto::id::Priority;
use proto::link::handshake::{EdgeHandshake, EdgeStep, LinkKey};
use proto::link::{self, Hello, LinkFrame};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

fn hello(node: &str) -> Vec<u8> {
    let mut out = Vec::new();
    link::encode(
        &LinkFrame::Hello(Hello {
            node_id: node.into(),
            region: "local".into(),
            shards: 1,
            link_shard: 0,
            priority: Priority::Low,
            capabilities: 0,
        }),
        &mut out,
    );
    out
}

/// Reads one link frame; `None` when the broker closed (or said nothing within the timeout).
fn read_frame(s: &mut TcpStream) -> Option<LinkFrame> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let n = u32::from_be_bytes(len) as usize;
    if n > 1 << 20 {
        return None;
    }
    let mut buf = vec![0u8; 4 + n];
    buf[..4].copy_from_slice(&len);
    s.read_exact(&mut buf[4..]).ok()?;
    link::decode(&Bytes::from(buf), 1 << 20)
        .ok()
        .map(|(f, _)| f)
}

/// Runs the edge side of the handshake with `secret` as node `node`; true when the broker
/// answered with its Hello (the link is up).
fn link_as(local: [u8; 4], broker: SocketAddr, node: &str, secret: &str) -> bool {
    let mut s = connect_from(local, broker);
    let h = hello(node);
    let (mut hs, challenge) =
        EdgeHandshake::start(LinkKey::new(secret.as_bytes()), &h, rand::random());
    let mut first = h.clone();
    link::encode(&challenge, &mut first);
    if s.write_all(&first).is_err() {
        return false;
    }
    loop {
        let Some(f) = read_frame(&mut s) else {
            return false;
        };
        if hs.is_done() {
            return matches!(f, LinkFrame::Hello(_));
        }
        match hs.on_frame(&f) {
            Ok(EdgeStep::More) => {}
            Ok(EdgeStep::Done(out)) => {
                let mut bytes = Vec::new();
                out.iter().for_each(|p| link::encode(p, &mut bytes));
                if s.write_all(&bytes).is_err() {
                    return false;
                }
            }
            // The broker could not prove the key: an impostor, or another key.
            Err(_) => return false,
        }
    }
}

fn broker_with_keys(extra: &str) -> Role {
    start_ok(
        "broker",
        &broker_toml(
            &format!("link_keys = [\"edge-1:{STRONG}\"]\n{extra}"),
            HEAD_MS,
        ),
    )
}

/// Regression: a HELLO and a SUB from anyone used to be enough to receive every room's
/// traffic, and a real edge's node id replaced that edge's link. Now only a peer that proves
/// the key of the node id it names gets a link.
#[test]
fn link_impersonation_is_refused() {
    let broker = broker_with_keys("link_hello_ms_max = 1000");
    let (links, http) = (broker.addrs[1], broker.addrs[2]);
    // The real edge, with its key: linked.
    assert!(link_as([127, 0, 0, 1], links, "edge-1", STRONG));

    // A stranger's bare HELLO (the old handshake): no reply, closed within the deadline.
    let t = Instant::now();
    let mut s = connect_from([127, 0, 0, 7], links);
    s.write_all(&hello("edge-1")).unwrap();
    assert!(read_frame(&mut s).is_none(), "a bare HELLO got an answer");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());

    // A wrong key: the edge side sees the broker's proof fail and gives up; nothing is linked.
    let wrong = "0000000000000000000000000000000000000000000000000000000000000000";
    assert!(!link_as([127, 0, 0, 7], links, "edge-1", wrong));
    // edge-1's key claiming another node id: refused (no key for that node).
    assert!(!link_as([127, 0, 0, 7], links, "edge-2", STRONG));

    // A stranger that forges the last step (a made-up PROOF) is refused too.
    let mut s = connect_from([127, 0, 0, 8], links);
    let mut first = hello("edge-1");
    link::encode(&LinkFrame::Challenge { nonce: [9; 32] }, &mut first);
    s.write_all(&first).unwrap();
    assert!(matches!(
        read_frame(&mut s),
        Some(LinkFrame::Challenge { .. })
    ));
    assert!(matches!(read_frame(&mut s), Some(LinkFrame::Proof { .. })));
    let mut forged = Vec::new();
    link::encode(&LinkFrame::Proof { mac: [0; 32] }, &mut forged);
    s.write_all(&forged).unwrap();
    assert!(read_frame(&mut s).is_none(), "a forged proof got a link");

    std::thread::sleep(Duration::from_millis(200));
    let m = metrics(http);
    let auth = metric(
        &m,
        "barrage_broker_link_handshakes_refused_total{reason=\"auth\"}",
    )
    .unwrap_or(0.0);
    assert!(auth >= 3.0, "refusals not counted: {auth}\n{m}");
    println!("link impersonation: 1 real link up, {auth} refusals counted");
}

/// Regression: strangers holding every handshake slot open kept the real edge from re-linking,
/// with no signal. Now one address holds at most `link_handshakes_per_addr_max` slots, the
/// real edge links meanwhile, and the refusals are counted.
#[test]
fn handshake_slot_exhaustion_does_not_lock_out_the_real_edge() {
    let broker = broker_with_keys(
        "link_handshakes_max = 8\nlink_handshakes_per_addr_max = 2\nlink_hello_ms_max = 5000",
    );
    let (links, http) = (broker.addrs[1], broker.addrs[2]);
    // 20 silent connections from one address.
    let held: Vec<_> = (0..20)
        .map(|_| connect_from([127, 0, 0, 9], links))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    assert!(
        link_as([127, 0, 0, 1], links, "edge-1", STRONG),
        "the real edge could not link"
    );
    println!(
        "handshake slots: the real edge linked in {:?} beside 20 silent peers",
        t.elapsed()
    );
    let m = metrics(http);
    let per_addr = metric(
        &m,
        "barrage_broker_link_handshakes_refused_total{reason=\"per_addr\"}",
    )
    .unwrap_or(0.0);
    assert!(per_addr >= 18.0, "{per_addr}\n{m}");
    drop(held);
}
