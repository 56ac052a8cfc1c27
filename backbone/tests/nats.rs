//! The backbone against a real `nats-server -js`: each test starts its own server on a free
//! loopback port with a temporary store directory, and stops it at the end.
//!
//! `./scripts/test.sh` installs nats-server when it is missing and sets
//! `BARRAGE_REQUIRE_NATS=1`, so these tests fail rather than skip there.

use backbone::partition::preferred_owner;
use backbone::{
    AckKind, Backbone, BrokerId, Config, Delivery, Event, Partition, PublishError, Sink,
};
use bytes::Bytes;
use crossbeam_channel::Receiver;
use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Lease for these tests: short, so a takeover test takes a few seconds.
const LEASE_MS: u64 = 1_500;
const ACK_WAIT_MS: u64 = 1_000;
const PARTITIONS: u16 = 8;

/// A nats-server with JetStream on loopback, killed and its store removed on drop.
struct Nats {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Nats {
    /// None (the test skips) when nats-server is not installed and not required.
    fn start() -> Option<Nats> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "barrage-nats-{}-{}-{port}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        Nats::start_at(port, dir)
    }

    fn start_at(port: u16, dir: PathBuf) -> Option<Nats> {
        std::fs::create_dir_all(&dir).expect("store dir");
        // Debian puts it in /usr/sbin, which a non-root PATH may lack.
        let bin = if std::path::Path::new("/usr/sbin/nats-server").exists() {
            "/usr/sbin/nats-server"
        } else {
            "nats-server"
        };
        let child = Command::new(bin)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                assert!(
                    std::env::var_os("BARRAGE_REQUIRE_NATS").is_none(),
                    "nats-server required but not runnable: {e}"
                );
                eprintln!("nats-server not installed ({e}); skipping");
                let _ = std::fs::remove_dir_all(&dir);
                return None;
            }
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let nats = Nats { child, addr, dir };
        let until = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < until,
                "nats-server did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(nats)
    }

    fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// Kills the server but keeps its store (for a restart on the same port).
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn config(nats: &Nats) -> Config {
    Config {
        servers: nats.url(),
        stream: "TEST".into(),
        partitions: PARTITIONS,
        lease_ms: LEASE_MS,
        ack_wait_ms: ACK_WAIT_MS,
        publish_ms_max: 1_000,
        ..Config::default()
    }
}

fn id(s: &str) -> BrokerId {
    BrokerId::new(s).unwrap()
}

/// The partitions `me` is the preferred owner of among `live`.
fn preferred_by(me: &str, live: &[BrokerId]) -> BTreeSet<Partition> {
    (0..PARTITIONS)
        .map(Partition)
        .filter(|&p| preferred_owner(p, live) == Some(&id(me)))
        .collect()
}

/// One broker under test: its backbone and what its (single) sink has seen.
struct Broker {
    backbone: Option<Backbone>,
    rx: Receiver<Event>,
    owned: BTreeSet<Partition>,
    messages: Vec<Delivery>,
}

impl Broker {
    fn start(config: Config, me: &str) -> Broker {
        let (sink, rx, _notify) = Sink::new(1024);
        let backbone = Backbone::start(config, id(me), vec![sink]).expect("backbone starts");
        Broker {
            backbone: Some(backbone),
            rx,
            owned: BTreeSet::new(),
            messages: Vec::new(),
        }
    }

    /// A broker alone in its cluster, once it holds every partition.
    fn owning_all(config: Config, me: &str) -> Broker {
        let mut b = Broker::start(config, me);
        let all = |b: &Broker| b.owned.len() == usize::from(PARTITIONS);
        assert!(
            b.pump_until(Duration::from_secs(5), all),
            "{me} never held every partition"
        );
        b
    }

    fn bb(&self) -> &Backbone {
        self.backbone.as_ref().unwrap()
    }

    /// Applies events until `done` holds or `within` passes; returns whether it held.
    fn pump_until(&mut self, within: Duration, mut done: impl FnMut(&Broker) -> bool) -> bool {
        let until = Instant::now() + within;
        loop {
            if done(self) {
                return true;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.rx.recv_timeout(left.min(Duration::from_millis(50))) {
                Ok(Event::Owned(p)) => assert!(self.owned.insert(p), "{p} owned twice"),
                Ok(Event::Released(p)) => assert!(self.owned.remove(&p), "{p} released unowned"),
                Ok(Event::Message(d)) => {
                    assert!(
                        self.owned.contains(&d.partition),
                        "message of an unowned partition"
                    );
                    self.messages.push(d);
                }
                Err(_) => {}
            }
        }
    }
}

/// The stream is created as configured, a push lands in its partition's subject and reaches
/// the owner of that partition only, with its dedup key.
#[test]
fn stream_setup_and_routing_by_partition() {
    let Some(nats) = Nats::start() else { return };
    let mut a = Broker::owning_all(config(&nats), "a");
    let before_us = unix_us();
    for p in 0..PARTITIONS {
        let r = a
            .bb()
            .publish(
                Partition(p),
                &format!("k{p}"),
                Bytes::from(vec![p as u8; 3]),
            )
            .wait();
        assert!(r.is_ok(), "{r:?}");
    }
    assert!(a.pump_until(Duration::from_secs(5), |b| b.messages.len()
        == usize::from(PARTITIONS)));
    let after_us = unix_us();
    for d in &a.messages {
        // JetStream's store time, on this host's clock (1 ms of slack for its rounding).
        assert!(
            d.published_us + 1_000 >= before_us && d.published_us <= after_us + 1_000,
            "published {} outside {before_us}..{after_us}",
            d.published_us
        );
        assert_eq!(d.payload[..], [d.partition.0 as u8; 3]);
        assert_eq!(d.key.as_deref(), Some(format!("k{}", d.partition).as_str()));
        assert_eq!(d.delivered, 1);
        assert!(!d.redelivered);
    }

    // What JetStream holds, read with a client of its own.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = async_nats::connect(nats.url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let mut stream = js.get_stream("TEST").await.unwrap();
        let info = stream.info().await.unwrap();
        assert_eq!(info.config.subjects, vec!["barrage.p.*".to_string()]);
        assert_eq!(
            info.config.retention,
            async_nats::jetstream::stream::RetentionPolicy::WorkQueue
        );
        assert_eq!(info.config.duplicate_window, Duration::from_secs(120));
        assert_eq!(info.config.num_replicas, 1);
        // Unacked, so all still stored, one per partition subject.
        assert_eq!(info.state.messages, u64::from(PARTITIONS));
        let msg = stream
            .get_last_raw_message_by_subject("barrage.p.5")
            .await
            .unwrap();
        assert_eq!(msg.payload[..], [5u8; 3]);
    });
    drop(a);
}

/// Answered only after the ack, with the stream sequence; a second publish with the same key
/// is reported a duplicate and not stored; bad keys are refused before anything is sent.
#[test]
fn publish_is_acked_and_duplicates_suppressed() {
    let Some(nats) = Nats::start() else { return };
    let a = Broker::start(config(&nats), "a");
    let first = a
        .bb()
        .publish(Partition(3), "push-1", Bytes::from_static(b"x"))
        .wait()
        .unwrap();
    assert!(!first.duplicate);
    let again = a
        .bb()
        .publish(Partition(3), "push-1", Bytes::from_static(b"x"))
        .wait()
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.sequence, first.sequence);
    let other = a
        .bb()
        .publish(Partition(3), "push-2", Bytes::from_static(b"y"))
        .wait()
        .unwrap();
    assert!(!other.duplicate);
    assert_eq!(other.sequence, first.sequence + 1);
    let bad = a
        .bb()
        .publish(Partition(3), "has space", Bytes::new())
        .wait();
    assert_eq!(bad, Err(PublishError::BadKey));
    let out = a
        .bb()
        .publish(Partition(PARTITIONS), "k", Bytes::new())
        .wait();
    assert!(matches!(out, Err(PublishError::Refused(_))), "{out:?}");
}

/// A backbone that is down answers every publish with an error (never Ok), within
/// `publish_ms_max`; once the server is back, publishes are accepted again.
#[test]
fn backbone_down_is_refused_then_recovers() {
    let Some(mut nats) = Nats::start() else {
        return;
    };
    let a = Broker::start(config(&nats), "a");
    a.bb()
        .publish(Partition(1), "before", Bytes::new())
        .wait()
        .unwrap();
    nats.kill();
    let started = Instant::now();
    for i in 0..5 {
        let r = a
            .bb()
            .publish(Partition(1), &format!("down-{i}"), Bytes::new())
            .wait();
        assert!(
            matches!(
                r,
                Err(PublishError::Down | PublishError::Timeout | PublishError::Refused(_))
            ),
            "{r:?}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(8));
    let port = nats.addr.port();
    let restarted = Nats::start_at(port, nats.dir.clone()).unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    let mut ok = false;
    while Instant::now() < until {
        if a.bb()
            .publish(Partition(1), "after", Bytes::new())
            .wait()
            .is_ok()
        {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ok, "no recovery after the server came back");
    drop(a);
    drop(restarted);
}

/// Messages reach the owning thread in order; acked ones are gone for good. The owner dies
/// (dropped without release); a second broker takes the partition after the lease expires and
/// receives exactly the messages the first had not acked, in stream order, marked redelivered.
#[test]
fn takeover_resumes_from_the_ack_floor() {
    let Some(nats) = Nats::start() else { return };
    // The backbone's own in-progress acks off: this test sends them by hand.
    let no_progress = Config {
        progress_ms_max: 0,
        ..config(&nats)
    };
    let mut a = Broker::owning_all(no_progress.clone(), "a");
    let p = Partition(6);
    let mut seqs = Vec::new();
    for i in 0..10 {
        let r = a
            .bb()
            .publish(p, &format!("m{i}"), Bytes::from(format!("{i}")))
            .wait()
            .unwrap();
        seqs.push(r.sequence);
    }
    assert!(a.pump_until(Duration::from_secs(5), |b| b.messages.len() == 10));
    let got: Vec<u64> = a.messages.iter().map(|d| d.sequence).collect();
    assert_eq!(got, seqs, "in stream order");
    let acked = [0usize, 1, 2, 3, 5, 7];
    for &i in &acked {
        a.bb().ack(a.messages[i].ack.clone(), AckKind::Ack);
    }
    // Messages 4 and 8 are "high reach, waiting": kept alive with in-progress acks.
    for _ in 0..2 {
        a.bb().ack(a.messages[4].ack.clone(), AckKind::Progress);
        a.bb().ack(a.messages[8].ack.clone(), AckKind::Progress);
        a.bb().flush();
        std::thread::sleep(Duration::from_millis(ACK_WAIT_MS * 2 / 3));
    }
    // Past ack_wait, JetStream redelivered to A the two nobody kept alive (6 and 9), and not
    // the two held by in-progress acks (4 and 8).
    a.pump_until(Duration::from_millis(300), |_| false);
    let again: BTreeSet<u64> = a.messages[10..].iter().map(|d| d.sequence).collect();
    assert_eq!(again, BTreeSet::from([seqs[6], seqs[9]]));
    drop(a.backbone.take());

    let mut b = Broker::start(no_progress, "b");
    let started = Instant::now();
    assert!(b.pump_until(Duration::from_secs(8), |b| b.messages.len() >= 4));
    // It waited for A's lease, not a fixed ack_wait.
    assert!(
        started.elapsed() >= Duration::from_millis(LEASE_MS / 2),
        "{:?}",
        started.elapsed()
    );
    let want: Vec<u64> = (0..10)
        .filter(|i| !acked.contains(i))
        .map(|i| seqs[i])
        .collect();
    let got: Vec<u64> = b.messages.iter().map(|d| d.sequence).collect();
    assert_eq!(got, want);
    assert!(b.messages.iter().all(|d| d.redelivered));
    // The publish time is the message's, not the delivery's: the same on the new owner.
    for d in &b.messages {
        let first = a
            .messages
            .iter()
            .find(|x| x.sequence == d.sequence)
            .unwrap();
        assert_eq!(d.published_us, first.published_us);
        assert!(d.published_us > 0);
    }
    for d in &b.messages {
        b.bb().ack(d.ack.clone(), AckKind::Ack);
    }
    b.bb().flush();
    // Nothing else comes: the acked ones are not redelivered.
    assert!(
        !b.pump_until(Duration::from_millis(ACK_WAIT_MS + 500), |b| b
            .messages
            .len()
            > 4)
    );
}

/// A delivered message nobody acks is kept from redelivery by the backbone's own in-progress
/// acks (past `ack_wait_ms`) until `progress_ms_max`; then it is let go, counted, and JetStream
/// redelivers it.
#[test]
fn an_unacked_message_is_kept_until_progress_ms_max_then_let_go() {
    let Some(nats) = Nats::start() else { return };
    let c = Config {
        progress_ms_max: 3 * ACK_WAIT_MS,
        ..config(&nats)
    };
    let mut a = Broker::owning_all(c, "a");
    let p = Partition(3);
    a.bb()
        .publish(p, "slow", Bytes::from_static(b"x"))
        .wait()
        .unwrap();
    assert!(a.pump_until(Duration::from_secs(5), |b| b.messages.len() == 1));
    // Twice the ack wait, unacked: in-progress acks hold it.
    assert!(
        !a.pump_until(Duration::from_millis(2 * ACK_WAIT_MS), |b| b.messages.len()
            > 1),
        "redelivered while in-progress acks were due"
    );
    assert!(a.bb().stats().progress_sent.load(Ordering::Relaxed) >= 1);
    assert_eq!(a.bb().stats().progress_expired.load(Ordering::Relaxed), 0);
    // Past progress_ms_max it is let go: redelivered (the second delivery) and counted.
    assert!(a.pump_until(Duration::from_secs(5), |b| b.messages.len() == 2));
    assert_eq!(a.messages[1].sequence, a.messages[0].sequence);
    assert_eq!(a.messages[1].delivered, 2);
    assert_eq!(a.bb().stats().progress_expired.load(Ordering::Relaxed), 1);
    let d = a.messages[1].clone();
    a.bb().ack(d.ack, AckKind::Ack);
    a.bb().flush();
}

/// Two brokers split the partitions by rendezvous hash; one dies without releasing; the other
/// takes its partitions after the lease expires. A broker that closes releases at once.
#[test]
fn leases_split_then_take_over_after_ttl() {
    let Some(nats) = Nats::start() else { return };
    let mut a = Broker::start(config(&nats), "a");
    let mut b = Broker::start(config(&nats), "b");
    let live = [id("a"), id("b")];
    let (want_a, want_b) = (preferred_by("a", &live), preferred_by("b", &live));
    assert!(!want_a.is_empty() && !want_b.is_empty());
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until && (a.owned != want_a || b.owned != want_b) {
        a.pump_until(Duration::from_millis(50), |_| false);
        b.pump_until(Duration::from_millis(50), |_| false);
    }
    assert_eq!(a.owned, want_a);
    assert_eq!(b.owned, want_b);

    // b dies: a gets everything, but not before b's leases could have expired.
    drop(b.backbone.take());
    let died = Instant::now();
    assert!(a.pump_until(Duration::from_secs(8), |a| a.owned.len()
        == usize::from(PARTITIONS)));
    let waited = died.elapsed();
    assert!(
        waited >= Duration::from_millis(LEASE_MS / 2),
        "took over after {waited:?}"
    );

    // A third broker joins and takes its share; then it closes cleanly, and a takes its
    // partitions back well before a lease would expire.
    let mut c = Broker::start(config(&nats), "c");
    let want_c = preferred_by("c", &[id("a"), id("c")]);
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until && c.owned != want_c {
        a.pump_until(Duration::from_millis(50), |_| false);
        c.pump_until(Duration::from_millis(50), |_| false);
    }
    assert_eq!(c.owned, want_c);
    assert!(a.owned.is_disjoint(&c.owned));
    c.backbone.take().unwrap().close();
    let closed = Instant::now();
    assert!(a.pump_until(Duration::from_secs(8), |a| a.owned.len()
        == usize::from(PARTITIONS)));
    let waited = closed.elapsed();
    // It left the live set and released: no wait for anything to age out.
    assert!(waited < Duration::from_millis(LEASE_MS / 2), "{waited:?}");
}

/// The bridge to a monoio shard: the shard awaits a publish's answer and wakes on the sink's
/// notify for deliveries, under the runtime the broker's shards use.
#[test]
fn a_monoio_shard_publishes_and_is_woken_for_deliveries() {
    let Some(nats) = Nats::start() else { return };
    let (sink, rx, notify) = Sink::new(64);
    let bb = Backbone::start(config(&nats), id("a"), vec![sink]).unwrap();
    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
        .unwrap();
    let got = rt.block_on(async {
        let acc = bb
            .publish(Partition(2), "shard-1", Bytes::from_static(b"hello"))
            .await;
        assert!(acc.is_ok(), "{acc:?}");
        let wait = async {
            loop {
                while let Ok(ev) = rx.try_recv() {
                    if let Event::Message(d) = ev {
                        return d;
                    }
                }
                notify.notified().await;
            }
        };
        monoio::time::timeout(Duration::from_secs(8), wait).await
    });
    let d = got.expect("delivery woke the shard");
    assert_eq!(&d.payload[..], b"hello");
    assert_eq!(d.partition, Partition(2));
    bb.close();
}

/// Publish-with-ack rate through the backbone thread, many in flight and one at a time, side by
/// side with the same load from a bare async-nats client on its own runtime (the baseline: what
/// the thread bridge costs). Run by name:
/// `cargo test -p backbone --test nats -- --ignored --nocapture bench_publish_rate`
#[test]
#[ignore]
fn bench_publish_rate() {
    let Some(nats) = Nats::start() else { return };
    const N: usize = 50_000;
    const WINDOW: usize = 1_000;
    const SERIAL: usize = 2_000;
    let payload = Bytes::from(vec![b'x'; 300]);

    // Baseline first (the stream is created by a backbone that exits at once). A long lease
    // keeps the backbone from consuming during the run (it acquires nothing for lease_ms / 3),
    // so both sides measure publishing alone.
    let cfg = Config {
        partitions: 64,
        stream: "BENCH".into(),
        lease_ms: 60_000,
        ack_wait_ms: 60_000,
        ..config(&nats)
    };
    Backbone::start(cfg.clone(), id("setup"), vec![Sink::new(1).0])
        .unwrap()
        .close();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (bare_window, bare_serial) = rt.block_on(async {
        let client = async_nats::connect(nats.url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let publish = |i: usize, tag: &str| {
            let mut h = async_nats::HeaderMap::new();
            h.insert(
                async_nats::header::NATS_MESSAGE_ID,
                format!("{tag}{i}").as_str(),
            );
            let subject = format!("barrage.p.{}", i % 64);
            js.publish_with_headers(subject, h, payload.clone())
        };
        let started = Instant::now();
        let mut pending = std::collections::VecDeque::new();
        for i in 0..N {
            if pending.len() == WINDOW {
                let f: async_nats::jetstream::context::PublishAckFuture =
                    pending.pop_front().unwrap();
                f.await.unwrap();
            }
            pending.push_back(publish(i, "w").await.unwrap());
        }
        for f in pending {
            f.await.unwrap();
        }
        let window = N as f64 / started.elapsed().as_secs_f64();
        let started = Instant::now();
        for i in 0..SERIAL {
            publish(i, "s").await.unwrap().await.unwrap();
        }
        (window, SERIAL as f64 / started.elapsed().as_secs_f64())
    });

    let bb = Backbone::start(cfg, id("bench"), vec![Sink::new(1).0]).unwrap();
    let started = Instant::now();
    let mut pending = std::collections::VecDeque::new();
    for i in 0..N {
        if pending.len() == WINDOW {
            let p: backbone::Publish = pending.pop_front().unwrap();
            p.wait().unwrap();
        }
        let key = format!("bw{i}");
        pending.push_back(bb.publish(Partition((i % 64) as u16), &key, payload.clone()));
    }
    for p in pending {
        p.wait().unwrap();
    }
    let window = N as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    for i in 0..SERIAL {
        let key = format!("bs{i}");
        bb.publish(Partition(1), &key, payload.clone())
            .wait()
            .unwrap();
    }
    let serial = SERIAL as f64 / started.elapsed().as_secs_f64();
    println!("publish-with-ack, 300 B, {WINDOW} in flight: backbone {window:.0}/s, bare async-nats {bare_window:.0}/s, ratio {:.2}", window / bare_window);
    println!("publish-with-ack, 300 B, one at a time: backbone {serial:.0}/s, bare async-nats {bare_serial:.0}/s, ratio {:.2}", serial / bare_serial);
    bb.close();
}

fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
