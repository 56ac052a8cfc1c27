//! UDP (issue 11, docs/protocol-udp.md) through real sockets on loopback: the cookie
//! handshake, heartbeats, delivery of small and split batches, loss through a fault proxy of
//! our own (a visible gap; a lost op 8 answered again with the same session), NAT rebinding,
//! expiry, every bad-input case, and the amplification bound.

mod common;

use common::*;
use net::runtime::Driver;
use proto::id::{Encoding, MsgId, Priority, RoomId, Scope};
use proto::link::Batch;
use proto::packet::{self, op};
use proto::udp::{self as wire, ServerDatagram, SessionId};
use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MAX: usize = wire::UDP_PAYLOAD_BYTES_MAX;

fn udp_config(driver: Driver, brokers: Vec<String>) -> edge::Config {
    edge::Config {
        udp_addr: "127.0.0.1:0".into(),
        ..edge_config(driver, brokers)
    }
}

/// A test client: one socket, the edge's address, the session once it has one.
struct Udp {
    sock: UdpSocket,
    to: SocketAddr,
    session: Option<SessionId>,
}

impl Udp {
    fn new(to: SocketAddr) -> Udp {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Udp {
            sock,
            to,
            session: None,
        }
    }

    fn send(&self, d: &[u8]) {
        self.sock.send_to(d, self.to).unwrap();
    }

    /// The next datagram within `wait`.
    fn recv(&self, wait: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + wait;
        let mut b = vec![0u8; 65_536];
        while Instant::now() < deadline {
            if let Ok((n, _)) = self.sock.recv_from(&mut b) {
                return Some(b[..n].to_vec());
            }
        }
        None
    }

    /// Asserts nothing arrives for a moment (a dropped datagram gets no answer).
    fn silent(&self, what: &str) {
        if let Some(d) = self.recv(Duration::from_millis(300)) {
            panic!("{what}: unexpected reply {d:02x?}");
        }
    }

    /// Step 1 of the handshake: the cookie, which must be no larger than the hello.
    fn cookie(&self, hello: &[u8]) -> wire::Cookie {
        self.send(hello);
        let d = self.recv(WAIT).expect("cookie");
        assert!(
            d.len() <= hello.len(),
            "amplified: {} > {}",
            d.len(),
            hello.len()
        );
        match wire::decode_server(&d, MAX).unwrap() {
            ServerDatagram::Cookie(c) => c,
            other => panic!("{other:?}"),
        }
    }

    /// The whole handshake; returns the op 8 body.
    fn auth(&mut self, auth_packet: &[u8]) -> String {
        let c = self.cookie(auth_packet);
        let mut hello = wire::cookie_datagram(&c);
        hello.extend_from_slice(auth_packet);
        self.send(&hello);
        let d = self.recv(WAIT).expect("auth reply");
        match wire::decode_server(&d, MAX).unwrap() {
            ServerDatagram::AuthReply { body, session } => {
                self.session = session;
                String::from_utf8_lossy(body).into_owned()
            }
            other => panic!("{other:?}"),
        }
    }

    fn session_datagram(&self, cookie: Option<&wire::Cookie>, requests: &[u8]) -> Vec<u8> {
        wire::session_datagram(self.session.expect("session"), cookie, requests)
    }

    /// Sends a heartbeat and returns the online count of the op 3 reply.
    fn heartbeat(&self) -> u32 {
        self.send(&self.session_datagram(None, &proto::auth::heartbeat_request()));
        self.expect_heartbeat_reply()
    }

    fn expect_heartbeat_reply(&self) -> u32 {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            let Some(d) = self.recv(WAIT) else { break };
            if let Ok(ServerDatagram::HeartbeatReply(n)) = wire::decode_server(&d, MAX) {
                assert_eq!(d.len(), 20, "the op 3 of TCP, byte for byte");
                return n;
            }
        }
        panic!("no heartbeat reply");
    }

    /// Data parts received within `wait`, as (seq, part, parts, inner packet count).
    fn parts(&self, wait: Duration, want: usize) -> Vec<(u32, u16, u16, usize)> {
        let deadline = Instant::now() + wait;
        let mut out = Vec::new();
        while out.len() < want && Instant::now() < deadline {
            let Some(d) = self.recv(Duration::from_millis(200)) else {
                continue;
            };
            assert!(d.len() <= MAX, "datagram of {} bytes", d.len());
            if let Ok(ServerDatagram::Data(p)) = wire::decode_server(&d, MAX) {
                let (h, _) = packet::decode(p.container, u32::MAX).unwrap();
                let inner = proto::container::unpack_container(
                    h.ver,
                    if h.ver == 0 { p.container } else { h.body },
                    1 << 24,
                )
                .unwrap();
                out.push((p.seq, p.part, p.parts, inner.len()));
            }
        }
        out
    }
}

fn auth_for(uid: u64, room: u64, protover: u32) -> Vec<u8> {
    auth_packet(uid, room, protover, token(uid, room, 1))
}

/// A brotli batch of `n` DANMU messages of about 300 incompressible bytes each (too large for
/// one datagram once n is more than a few).
fn danmaku_batch(room: u64, seq: u64, n: u32) -> Batch {
    let mut inner = Vec::new();
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for i in 0..n {
        let pad: String = (0..300)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                char::from(b'a' + (x % 26) as u8)
            })
            .collect();
        let body = format!("{{\"cmd\":\"DANMU_MSG\",\"i\":{i},\"pad\":\"{pad}\"}}");
        packet::encode(0, op::NOTIFICATION, 0, body.as_bytes(), &mut inner);
    }
    let pkt =
        proto::container::encode_outer(Encoding::Brotli, &inner, seq as u32, Default::default());
    Batch {
        scope: Scope::Room(RoomId(room)),
        priority: Priority::Low,
        seq,
        first_msg_id: MsgId(seq),
        msg_count: n,
        encoding: Encoding::Brotli,
        flushed_at_us: 0,
        packet: bytes::Bytes::from(pkt),
    }
}

fn dropped(edge: &edge::Handle, label: &str) -> f64 {
    metric(
        &edge.metrics_text(),
        &format!("barrage_edge_udp_dropped_total{{reason=\"{label}\"}}"),
    )
}

fn auth_heartbeat_delivery_body(driver: Driver) {
    let broker = TestBroker::start(1);
    let edge = edge::start(udp_config(driver, vec![broker.addr_string()])).unwrap();
    broker.wait_links(2);
    let mut c = Udp::new(edge.udp_addr().unwrap());
    assert_eq!(c.auth(&auth_for(7, 700, 3)), r#"{"code":0}"#);
    assert_eq!(c.heartbeat(), 1, "one viewer in the room");
    broker.wait_seen("SUB", |s| s.iter().any(|x| matches!(x, Seen::Sub(..))));

    // A small batch: one datagram, the TCP packet unchanged behind the part header.
    broker.send(&room_batch(700, 3, Encoding::Brotli, 200));
    let p = c.parts(WAIT, 1);
    assert_eq!(p, vec![(3, 0, 1, 1)]);

    // 40 danmaku of 300 B: split into self-contained parts, all within 1200 bytes, every
    // message in exactly one of them.
    broker.send(&danmaku_batch(700, 4, 40));
    let first = c.parts(WAIT, 1);
    let parts = first[0].2 as usize;
    assert!(parts > 1, "{first:?}");
    let mut all = first;
    all.extend(c.parts(WAIT, parts - 1));
    assert_eq!(all.len(), parts, "{all:?}");
    assert!(all.iter().all(|p| p.0 == 4 && p.2 as usize == parts));
    let idx: BTreeSet<u16> = all.iter().map(|p| p.1).collect();
    assert_eq!(idx.len(), parts);
    assert_eq!(all.iter().map(|p| p.3).sum::<usize>(), 40);

    // An ACK (op 1000) reaches the session as on TCP: this client did not send "ack": true,
    // so it is counted as ignored (edge::acks).
    let ack = packet::encode_vec(1, op::ACK, 1, &42u64.to_be_bytes());
    c.send(&c.session_datagram(None, &ack));
    eventually("ack counted", || {
        metric_sum(&edge.metrics_text(), "barrage_edge_acks_not_opted_in_total") >= 1.0
    });
    let text = edge.metrics_text();
    assert_eq!(
        metric(
            &text,
            "barrage_edge_connections{shard=\"0\",transport=\"udp\"}"
        ) + metric(
            &text,
            "barrage_edge_connections{shard=\"1\",transport=\"udp\"}"
        ),
        1.0
    );
    edge.shutdown();
}

#[test]
fn udp_auth_heartbeat_and_delivery_uring() {
    with_driver(Driver::Uring, auth_heartbeat_delivery_body);
}

#[test]
fn udp_auth_heartbeat_and_delivery_legacy() {
    with_driver(Driver::Legacy, auth_heartbeat_delivery_body);
}

/// A UDP proxy of our own between one client and the edge: forwards both ways and drops the
/// server->client datagrams `drop` picks (by their index among server datagrams).
struct LossProxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    dropped: Arc<AtomicUsize>,
}

impl LossProxy {
    fn start(edge: SocketAddr, drop: impl Fn(usize, &[u8]) -> bool + Send + 'static) -> LossProxy {
        let front = UdpSocket::bind("127.0.0.1:0").unwrap();
        let back = UdpSocket::bind("127.0.0.1:0").unwrap();
        front
            .set_read_timeout(Some(Duration::from_millis(5)))
            .unwrap();
        back.set_read_timeout(Some(Duration::from_millis(5)))
            .unwrap();
        let addr = front.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicUsize::new(0));
        let (s, d) = (stop.clone(), dropped.clone());
        std::thread::spawn(move || {
            let mut client = None;
            let mut n = 0usize;
            let mut b = vec![0u8; 65_536];
            while !s.load(Ordering::Acquire) {
                if let Ok((len, from)) = front.recv_from(&mut b) {
                    client = Some(from);
                    let _ = back.send_to(&b[..len], edge);
                }
                if let Ok((len, _)) = back.recv_from(&mut b) {
                    let i = n;
                    n += 1;
                    if drop(i, &b[..len]) {
                        d.fetch_add(1, Ordering::Relaxed);
                    } else if let Some(c) = client {
                        let _ = front.send_to(&b[..len], c);
                    }
                }
            }
        });
        LossProxy {
            addr,
            stop,
            dropped,
        }
    }
}

impl Drop for LossProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Loss as the issue specifies it: a lost data datagram is a visible gap (the client knows
/// which part of which seq it lacks, the rest still decode alone); a lost op 8 is answered
/// again for the retransmitted hello, with the same session and no second one.
fn loss_body(driver: Driver) {
    let broker = TestBroker::start(1);
    let edge = edge::start(udp_config(driver, vec![broker.addr_string()])).unwrap();
    broker.wait_links(2);
    // Server datagrams: 0 cookie, 1 op 8 (dropped), 2 op 8 again, 3.. data; drop part 1 of
    // the split batch and the whole of seq 6.
    let proxy = LossProxy::start(edge.udp_addr().unwrap(), |i, d| {
        if i == 1 {
            return true;
        }
        matches!(wire::decode_server(d, MAX), Ok(ServerDatagram::Data(p)) if (p.seq == 5 && p.part == 1) || p.seq == 6)
    });
    let mut c = Udp::new(proxy.addr);
    let auth = auth_for(8, 800, 3);
    let cookie = c.cookie(&auth);
    let mut hello = wire::cookie_datagram(&cookie);
    hello.extend_from_slice(&auth);
    c.send(&hello);
    assert!(
        c.recv(Duration::from_millis(500)).is_none(),
        "the op 8 was dropped"
    );
    // The client retransmits the same hello (same cookie): same session, one connection.
    c.send(&hello);
    let d = c.recv(WAIT).expect("op 8 again");
    let ServerDatagram::AuthReply { session, .. } = wire::decode_server(&d, MAX).unwrap() else {
        panic!("{d:?}")
    };
    c.session = session;
    assert_eq!(c.heartbeat(), 1);
    assert_eq!(
        edge.connections(),
        1,
        "a retransmitted hello opens no second session"
    );

    broker.wait_seen("SUB", |s| s.iter().any(|x| matches!(x, Seen::Sub(..))));
    broker.send(&danmaku_batch(800, 5, 40));
    broker.send(&room_batch(800, 6, Encoding::Brotli, 100));
    broker.send(&room_batch(800, 7, Encoding::Brotli, 100));
    let mut got = Vec::new();
    let deadline = Instant::now() + WAIT;
    while !got.iter().any(|p: &(u32, u16, u16, usize)| p.0 == 7) && Instant::now() < deadline {
        got.extend(c.parts(Duration::from_millis(300), 1));
    }
    let seqs: BTreeSet<u32> = got.iter().map(|p| p.0).collect();
    assert_eq!(
        seqs,
        BTreeSet::from([5, 7]),
        "seq 6 is a gap in the room seq: {got:?}"
    );
    let five: Vec<_> = got.iter().filter(|p| p.0 == 5).collect();
    let parts = five[0].2;
    assert!(parts >= 3, "{five:?}");
    let have: BTreeSet<u16> = five.iter().map(|p| p.1).collect();
    let missing: Vec<u16> = (0..parts).filter(|i| !have.contains(i)).collect();
    assert_eq!(
        missing,
        vec![1],
        "exactly the lost part is missing: {five:?}"
    );
    assert!(proxy.dropped.load(Ordering::Relaxed) >= 3);
    edge.shutdown();
}

#[test]
fn udp_loss_is_a_visible_gap_and_a_lost_auth_reply_is_answered_again_uring() {
    with_driver(Driver::Uring, loss_body);
}

#[test]
fn udp_loss_is_a_visible_gap_and_a_lost_auth_reply_is_answered_again_legacy() {
    with_driver(Driver::Legacy, loss_body);
}

/// NAT rebinding: the same session from a new port is challenged, proves the new address with
/// the cookie, and is served there; then the session expires when silent.
fn rebinding_and_expiry_body(driver: Driver) {
    let broker = TestBroker::start(1);
    let edge = edge::start(edge::Config {
        heartbeat_timeout_ms: 1_500,
        ..udp_config(driver, vec![broker.addr_string()])
    })
    .unwrap();
    broker.wait_links(2);
    let mut a = Udp::new(edge.udp_addr().unwrap());
    assert_eq!(a.auth(&auth_for(9, 900, 3)), r#"{"code":0}"#);
    // Several new ports: with two shards, some hash to the other shard's socket and are
    // forwarded to the session's owner.
    for _ in 0..4 {
        let mut b = Udp::new(edge.udp_addr().unwrap());
        b.session = a.session;
        let hb = b.session_datagram(None, &proto::auth::heartbeat_request());
        let cookie = b.cookie(&hb);
        b.send(&b.session_datagram(Some(&cookie), &proto::auth::heartbeat_request()));
        assert_eq!(b.expect_heartbeat_reply(), 1, "served at the new address");
        // The old address is no longer the session's: it is challenged, not served.
        a.send(&a.session_datagram(None, &proto::auth::heartbeat_request()));
        let d = a.recv(WAIT).expect("challenge");
        assert!(matches!(
            wire::decode_server(&d, MAX),
            Ok(ServerDatagram::Cookie(_))
        ));
        a = b;
    }
    let text = edge.metrics_text();
    assert_eq!(metric_sum(&text, "barrage_edge_udp_migrations_total"), 4.0);
    assert_eq!(edge.connections(), 1);
    // Silent: expires like a TCP connection, and its id is then unknown.
    eventually("expiry", || edge.connections() == 0);
    let text = edge.metrics_text();
    assert!(
        metric(
            &text,
            "barrage_edge_closes_total{reason=\"heartbeat_timeout\"}"
        ) >= 1.0
    );
    a.send(&a.session_datagram(None, &proto::auth::heartbeat_request()));
    a.silent("expired session");
    eventually("unknown_session counted", || {
        dropped(&edge, "unknown_session") >= 1.0
    });
    edge.shutdown();
}

#[test]
fn udp_nat_rebinding_and_expiry_uring() {
    with_driver(Driver::Uring, rebinding_and_expiry_body);
}

#[test]
fn udp_nat_rebinding_and_expiry_legacy() {
    with_driver(Driver::Legacy, rebinding_and_expiry_body);
}

/// Every bad-input case of the issue: dropped unanswered, counted by its label, harmless to a
/// session that is open at the same time.
/// A bye (op 1004) ends the session at once, as a TCP close: the room empties (the edge
/// unsubscribes), no data goes to the address, a new hello from it starts a new session. A bye
/// with a wrong session id, or from another address (with no cookie, or with the session
/// address's cookie), is dropped or challenged and ends nothing.
fn bye_body(driver: Driver) {
    let broker = TestBroker::start(1);
    let edge = edge::start(udp_config(driver, vec![broker.addr_string()])).unwrap();
    broker.wait_links(2);
    let mut a = Udp::new(edge.udp_addr().unwrap());
    assert_eq!(a.auth(&auth_for(11, 910, 3)), r#"{"code":0}"#);
    assert_eq!(a.heartbeat(), 1);
    broker.wait_seen("SUB", |s| s.iter().any(|x| matches!(x, Seen::Sub(..))));
    let session = a.session.unwrap();

    // A wrong session id (same shard bits): unknown, no answer, the session lives.
    let before = dropped(&edge, "unknown_session");
    a.send(&wire::bye_datagram(SessionId(session.0 ^ 1)));
    a.silent("bye with a wrong session id");
    assert_eq!(dropped(&edge, "unknown_session"), before + 1.0);
    assert_eq!(a.heartbeat(), 1, "still served");

    // From another address (what a spoofed source looks like to the edge): challenged with a
    // cookie for that address, which a spoofer never receives; nothing ends.
    let spoof = Udp::new(edge.udp_addr().unwrap());
    spoof.send(&wire::bye_datagram(session));
    let d = spoof.recv(WAIT).expect("a challenge");
    assert!(
        matches!(wire::decode_server(&d, MAX), Ok(ServerDatagram::Cookie(_))),
        "{d:02x?}"
    );
    // With the session address's own cookie: forged for this address, dropped.
    let theirs = a.cookie(&auth_for(11, 910, 3));
    let bye_op = packet::encode_vec(1, wire::udp_op::BYE, 1, &[]);
    spoof.send(&wire::session_datagram(session, Some(&theirs), &bye_op));
    spoof.silent("bye with another address's cookie");
    eventually("forged_cookie counted", || {
        dropped(&edge, "forged_cookie") >= 1.0
    });
    assert_eq!(a.heartbeat(), 1, "still served after the spoofed byes");
    assert_eq!(
        metric_sum(&edge.metrics_text(), "barrage_edge_udp_byes_total"),
        0.0
    );

    // The real bye: answered, the session freed, the room left.
    a.send(&wire::bye_datagram(session));
    let d = a.recv(WAIT).expect("bye answer");
    assert_eq!(wire::decode_server(&d, MAX), Ok(ServerDatagram::Bye));
    assert_eq!(edge.connections(), 0);
    broker.wait_seen("UNSUB", |s| {
        s.iter()
            .any(|x| matches!(x, Seen::Unsub(proto::link::Interest::Room(r)) if r.0 == 910))
    });
    let text = edge.metrics_text();
    assert_eq!(metric_sum(&text, "barrage_edge_udp_byes_total"), 1.0);
    assert!(metric(&text, "barrage_edge_closes_total{reason=\"peer_closed\"}") >= 1.0);
    // No more data to that address, and its session id is unknown now.
    broker.send(&room_batch(910, 9, Encoding::Brotli, 200));
    a.send(&a.session_datagram(None, &proto::auth::heartbeat_request()));
    a.silent("after the bye");

    // A new hello from the same address and port: a new session, in another room.
    assert_eq!(a.auth(&auth_for(12, 911, 3)), r#"{"code":0}"#);
    assert_eq!(a.heartbeat(), 1);
    assert_eq!(edge.connections(), 1);
    broker.wait_seen("SUB 911", |s| {
        s.iter()
            .any(|x| matches!(x, Seen::Sub(proto::link::Interest::Room(r), _) if r.0 == 911))
    });
    broker.send(&room_batch(911, 3, Encoding::Brotli, 200));
    assert_eq!(a.parts(WAIT, 1), vec![(3, 0, 1, 1)]);
    edge.shutdown();
}

#[test]
fn udp_bye_ends_the_session_and_only_its_own_uring() {
    with_driver(Driver::Uring, bye_body);
}

#[test]
fn udp_bye_ends_the_session_and_only_its_own_legacy() {
    with_driver(Driver::Legacy, bye_body);
}

fn bad_input_body(driver: Driver) {
    let edge = edge::start(udp_config(driver, vec![])).unwrap();
    let to = edge.udp_addr().unwrap();
    let mut good = Udp::new(to);
    assert_eq!(good.auth(&auth_for(10, 1_000, 0)), r#"{"code":0}"#);
    let evil = Udp::new(to);
    let auth = auth_for(11, 1_000, 0);
    let hb = proto::auth::heartbeat_request();
    let mut wrong_header = hb.clone();
    wrong_header[5] = 15;
    let mut truncated = auth.clone();
    truncated.truncate(auth.len() - 3);
    let mut short = hb.clone();
    short[3] = 8;
    let too_many: Vec<u8> = (0..5)
        .flat_map(|_| good.session_datagram(None, &[]))
        .collect();
    let bad_cookie = [
        packet::encode_vec(1, wire::udp_op::COOKIE, 1, b"short"),
        auth.clone(),
    ]
    .concat();
    let other = Udp::new(to);
    let others_cookie = other.cookie(&auth);
    let forged = [wire::cookie_datagram(&others_cookie), auth.clone()].concat();
    let unknown = wire::session_datagram(SessionId(0x0000_1234_5678_9abc), None, &hb);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", truncated),
        ("oversized", vec![0u8; MAX + 1]),
        ("header_len", wrong_header),
        ("too_short", short),
        ("too_many_packets", too_many),
        ("unexpected", hb.clone()),
        ("bad_body", bad_cookie),
        // A cookie replayed from another address than the one it was minted for.
        ("forged_cookie", forged),
        ("unknown_session", unknown),
        // A hello smaller than the cookie would be: no answer at all (no amplification).
        ("reply_too_large", packet::encode_vec(1, op::AUTH, 1, b"{}")),
    ];
    for (label, d) in &cases {
        let before = dropped(&edge, label);
        evil.send(d);
        evil.silent(label);
        eventually(label, || dropped(&edge, label) > before);
    }
    // An empty datagram.
    evil.send(&[]);
    eventually("empty", || dropped(&edge, "empty") >= 1.0);
    assert_eq!(good.heartbeat(), 1, "the open session is untouched");
    assert_eq!(edge.connections(), 1);
    edge.shutdown();
}

#[test]
fn udp_bad_datagrams_are_dropped_and_counted_uring() {
    with_driver(Driver::Uring, bad_input_body);
}

#[test]
fn udp_bad_datagrams_are_dropped_and_counted_legacy() {
    with_driver(Driver::Legacy, bad_input_body);
}

/// Amplification: an address that has not echoed a cookie never gets back more bytes than it
/// sent, whatever it sends; a flood from one address is cut by the per-address rate limit
/// before anything is parsed.
fn amplification_body(driver: Driver) {
    let edge = edge::start(edge::Config {
        udp_datagrams_per_addr_per_s: 50,
        ..udp_config(driver, vec![])
    })
    .unwrap();
    let to = edge.udp_addr().unwrap();
    let c = Udp::new(to);
    let auth = auth_for(12, 1_200, 3);
    let mut sent = 0usize;
    let mut got = 0usize;
    // Hellos of every size from 16 bytes to the limit, bad tokens included: each answer (a
    // cookie) is at most the hello it answers.
    for len in (16..=MAX).step_by(37).chain([auth.len()]) {
        let mut d = auth.clone();
        d.resize(len.max(16), b' ');
        d[0..4].copy_from_slice(&(len.max(16) as u32).to_be_bytes());
        c.send(&d);
        sent += d.len();
        if let Some(r) = c.recv(Duration::from_millis(50)) {
            assert!(r.len() <= d.len(), "{} > {}", r.len(), d.len());
            got += r.len();
        }
    }
    assert!(got <= sent, "{got} > {sent}");
    // A flood of 500 hellos from one address: at most the burst (2 x 50) are answered, the
    // rest that reach the shard (the kernel may drop some first) are cut by the rate limit.
    let text = edge.metrics_text();
    let in_before = metric_sum(&text, "barrage_edge_udp_datagrams_in_total");
    let limited_before = dropped(&edge, "rate_limited");
    let flood = Udp::new(to);
    for _ in 0..500 {
        flood.send(&auth);
    }
    let mut answers = 0;
    while flood.recv(Duration::from_millis(300)).is_some() {
        answers += 1;
    }
    assert!(answers <= 110, "{answers} answers to a flood");
    let arrived =
        metric_sum(&edge.metrics_text(), "barrage_edge_udp_datagrams_in_total") - in_before;
    let limited = dropped(&edge, "rate_limited") - limited_before;
    assert!(
        arrived > 110.0,
        "only {arrived} of the flood reached the edge"
    );
    assert!(
        arrived - limited <= 110.0,
        "{arrived} arrived, {limited} rate-limited"
    );
    edge.shutdown();
}

#[test]
fn udp_never_amplifies_and_rate_limits_a_flood_uring() {
    with_driver(Driver::Uring, amplification_body);
}

#[test]
fn udp_never_amplifies_and_rate_limits_a_flood_legacy() {
    with_driver(Driver::Legacy, amplification_body);
}
