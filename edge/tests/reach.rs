//! User-scope and device-scope batches from a test broker: delivered to every live connection
//! of that user (TCP and WS, each in its own encoding) or device, on any shard; never to a
//! guest for a user push, never to another user or device, never to a closed connection.
//! Every test runs under both drivers.

mod common;

use common::*;
use net::runtime::Driver;
use proto::auth;
use proto::id::{AreaId, DeviceId, Encoding, RoomId, Scope, UserId};
use proto::link::{Batch, Interest};
use proto::token::Claims;
use std::time::Duration;

fn token_dev(uid: u64, room: u64, device: &str) -> String {
    keys().sign(&Claims {
        uid: UserId(uid),
        device: DeviceId(device.into()),
        room: RoomId(room),
        area: AreaId(5),
        expires_at_s: now_s() + 3600,
    })
}

fn login(c: &mut Client, uid: u64, room: u64, protover: u32, device: &str) {
    let r = c.auth(uid, room, protover, token_dev(uid, room, device));
    assert_eq!(r, auth::auth_reply(0), "auth of uid {uid}");
}

/// A user/device batch as the broker sends a best-effort one: link seq 0 (a seq of 2 or more
/// marks a high-reach resend, for opted-in connections only); `n` tells the packets apart.
fn scoped(scope: Scope, n: u64, encoding: Encoding) -> Batch {
    let mut b = room_batch(0, n, encoding, 40 + n as usize);
    b.scope = scope;
    b.seq = 0;
    b
}

fn expect(c: &mut Client, b: &Batch, who: &str) {
    let got = if c.ws {
        match c.recv(WAIT) {
            Got::Bytes(x) => x,
            other => panic!("{who}: {other:?} instead of batch {}", b.seq),
        }
    } else {
        c.recv_exact(b.packet.len(), WAIT)
            .unwrap_or_else(|| panic!("{who}: no batch {}", b.seq))
    };
    assert_eq!(got, &b.packet[..], "{who}: batch {}", b.seq);
}

fn nothing(c: &mut Client, who: &str) {
    assert_eq!(c.recv(Duration::from_millis(100)), Got::Timeout, "{who}");
}

fn reach_body(driver: Driver) {
    let broker = TestBroker::start(1);
    let edge = edge::start(edge_config(driver, vec![broker.addr_string()])).unwrap();
    broker.wait_links(2);
    // uid 42 twice (TCP brotli, WS zlib), uid 43 whose token has no device (buvid "dev-1"
    // applies), a guest, and a second uid-43-free viewer of another device.
    let mut a_tcp = Client::tcp(edge.tcp_addr());
    login(&mut a_tcp, 42, 700, 3, "dev-a");
    let mut a_ws = Client::ws(edge.ws_addr());
    login(&mut a_ws, 42, 701, 2, "dev-b");
    let mut b = Client::tcp(edge.tcp_addr());
    login(&mut b, 43, 700, 3, "");
    let mut guest = Client::ws(edge.ws_addr());
    login(&mut guest, 0, 700, 3, "dev-g");
    broker.wait_seen("SUBs", |s| {
        s.iter()
            .any(|x| matches!(x, Seen::Sub(Interest::Room(RoomId(701)), _)))
            && s.iter()
                .any(|x| matches!(x, Seen::Sub(Interest::Room(RoomId(700)), _)))
    });
    // The broker sends a user batch once per encoding the node's viewers use.
    let u_br = scoped(Scope::User(UserId(42)), 1, Encoding::Brotli);
    let u_z = scoped(Scope::User(UserId(42)), 2, Encoding::Zlib);
    broker.send(&u_br);
    broker.send(&u_z);
    expect(&mut a_tcp, &u_br, "uid 42 tcp (brotli)");
    expect(&mut a_ws, &u_z, "uid 42 ws (zlib)");
    nothing(&mut a_tcp, "uid 42 tcp gets only its encoding");
    nothing(&mut a_ws, "uid 42 ws gets only its encoding");
    nothing(&mut b, "another user");
    nothing(&mut guest, "guest on a user push");
    // A push to uid 0 reaches no guest.
    broker.send(&scoped(Scope::User(UserId(0)), 3, Encoding::Brotli));
    nothing(&mut guest, "guest on a uid 0 push");
    // Device pushes: the token's device claim, else the buvid.
    let d1 = scoped(Scope::Device(DeviceId("dev-1".into())), 4, Encoding::Brotli);
    broker.send(&d1);
    expect(&mut b, &d1, "buvid device");
    let db = scoped(Scope::Device(DeviceId("dev-b".into())), 5, Encoding::Zlib);
    broker.send(&db);
    expect(&mut a_ws, &db, "claimed device");
    let dg = scoped(Scope::Device(DeviceId("dev-g".into())), 6, Encoding::Brotli);
    broker.send(&dg);
    expect(&mut guest, &dg, "a guest's device");
    nothing(&mut a_tcp, "other device");
    nothing(&mut b, "other device");
    nothing(&mut a_ws, "other device");
    // After a connection closes, pushes to its user and device reach only the rest.
    drop(a_tcp);
    eventually("closed connection removed", || edge.connections() == 3);
    let again = scoped(Scope::User(UserId(42)), 7, Encoding::Brotli);
    broker.send(&again);
    broker.send(&scoped(
        Scope::Device(DeviceId("dev-a".into())),
        8,
        Encoding::Brotli,
    ));
    let again_z = scoped(Scope::User(UserId(42)), 9, Encoding::Zlib);
    broker.send(&again_z);
    expect(&mut a_ws, &again_z, "remaining connection of uid 42");
    nothing(&mut a_ws, "nothing else");
    nothing(&mut b, "nothing else");
    nothing(&mut guest, "nothing else");
    // The edge is alive and well: heartbeats still answered.
    assert!(a_ws.heartbeat() >= 1);
    let m = edge.metrics_text();
    assert_eq!(
        metric(&m, "barrage_edge_drops_total{reason=\"unroutable\"}"),
        0.0,
        "{m}"
    );
    edge.shutdown();
}

#[test]
fn user_and_device_batches_uring() {
    with_driver(Driver::Uring, reach_body);
}

#[test]
fn user_and_device_batches_legacy() {
    with_driver(Driver::Legacy, reach_body);
}
