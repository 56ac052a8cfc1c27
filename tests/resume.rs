//! Resume after reconnect end to end (issue 9, DESIGN §11; the epoch of issue 17 defect 2):
//! control, a real broker and a real edge on loopback; viewers speak the client protocol over
//! TCP, read the outer op 5 seqs, and resume with `"resume":{"epoch","seq"}` in the auth body.

mod common;

use common::*;
use loadtest::client::{Position, Seen};
use proto::auth::AuthBody;
use proto::packet::{op, ver, StreamDecoder};
use proto::sync::{Resume, Sync};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// What a test viewer read, in order.
#[derive(Debug)]
enum Ev {
    Auth(i64),
    Sync(Sync),
    /// One outer op 5 batch: its header seq and the bodies inside.
    Batch(u32, Vec<String>),
    Closed,
}

struct Client {
    stream: TcpStream,
    packets: StreamDecoder,
    events: std::collections::VecDeque<Ev>,
}

impl Client {
    /// Connects and sends op 7 with `body` as is (raw, so malformed extensions can be sent).
    fn raw(addr: SocketAddr, body: &[u8]) -> Client {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let p = proto::packet::encode_vec(ver::HEARTBEAT, op::AUTH, 1, body);
        stream.write_all(&p).unwrap();
        Client {
            stream,
            packets: StreamDecoder::new(proto::limits::LINK_FRAME_BYTES_MAX),
            events: Default::default(),
        }
    }

    fn connect(addr: SocketAddr, body: &AuthBody, resume: Option<&Resume>) -> Client {
        let p = proto::auth::auth_request_with_resume(body, resume);
        Client::raw(addr, &p[16..])
    }

    fn next(&mut self, deadline: Instant) -> Option<Ev> {
        loop {
            if let Some(e) = self.events.pop_front() {
                return Some(e);
            }
            if Instant::now() > deadline {
                return None;
            }
            let mut buf = [0u8; 16 * 1024];
            match self.stream.read(&mut buf) {
                Ok(0) => return Some(Ev::Closed),
                Ok(n) => self.packets.feed(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(_) => return Some(Ev::Closed),
            }
            while let Ok(Some(p)) = self.packets.next_packet() {
                match p.op {
                    op::AUTH_REPLY => {
                        let v: serde_json::Value =
                            serde_json::from_slice(&p.body).unwrap_or_default();
                        self.events
                            .push_back(Ev::Auth(v["code"].as_i64().unwrap_or(i64::MIN)));
                    }
                    op::NOTIFICATION if p.ver == ver::PLAIN => {
                        let s = proto::sync::parse_sync(&p.body).expect("a plain op 5 is a sync");
                        self.events.push_back(Ev::Sync(s));
                    }
                    op::NOTIFICATION => {
                        let inner = proto::container::unpack(p.ver, p.op, p.seq, &p.body, 1 << 24)
                            .expect("unpacks");
                        let bodies = inner
                            .into_iter()
                            .map(|i| String::from_utf8_lossy(&i.body).into_owned())
                            .collect();
                        self.events.push_back(Ev::Batch(p.seq, bodies));
                    }
                    _ => {}
                }
            }
        }
    }

    /// The auth reply code, then the sync (every client here asks for one).
    fn auth_and_sync(&mut self) -> (i64, Vec<(u32, Vec<String>)>, Sync) {
        let deadline = Instant::now() + WAIT;
        let code = match self.next(deadline) {
            Some(Ev::Auth(c)) => c,
            other => panic!("expected the auth reply, got {other:?}"),
        };
        let mut before = Vec::new();
        loop {
            match self.next(deadline) {
                Some(Ev::Sync(s)) => return (code, before, s),
                Some(Ev::Batch(seq, b)) => before.push((seq, b)),
                other => panic!("expected replayed batches then a sync, got {other:?}"),
            }
        }
    }

    fn batch(&mut self) -> (u32, Vec<String>) {
        match self.next(Instant::now() + WAIT) {
            Some(Ev::Batch(seq, b)) => (seq, b),
            other => panic!("expected a batch, got {other:?}"),
        }
    }
}

fn broker_cfg(history_batches_max: usize) -> broker::Config {
    broker::Config {
        // One batch per push: seqs map one to one onto messages.
        batch_window_ms: 0,
        history_batches_max,
        ..broker_config()
    }
}

fn start(history_batches_max: usize) -> Stack {
    let control = control::start(control_config(KEYS_V1)).expect("control starts");
    let broker = broker::start(broker_cfg(history_batches_max)).expect("broker starts");
    let edge = edge::start(edge_config(
        "edge-1",
        KEYS_V1,
        broker.link_addr(),
        control.http_addr(),
    ))
    .expect("edge starts");
    let s = Stack {
        control: Some(control),
        broker: Some(broker),
        edge: Some(edge),
    };
    s.wait_for_edges(&["edge-1"]);
    s
}

fn edge_tcp(stack: &Stack, room: u64, uid: u64) -> (SocketAddr, AuthBody) {
    let t = connect_ticket(stack.control_addr(), room, uid);
    let e = &t.edges[0];
    let addr = format!(
        "{}:{}",
        e["host"].as_str().unwrap(),
        e["tcp_port"].as_u64().unwrap()
    )
    .parse()
    .unwrap();
    let mut body = auth_body(uid, room, &t.token);
    body.ack = true;
    (addr, body)
}

fn msg(i: usize) -> String {
    format!(r#"{{"cmd":"DANMU_MSG","info":[[0],"m{i}",[1,"u"]]}}"#)
}

/// Pushes `msg(i)`, waiting out a room rate limit the way a real caller does (the per-room
/// bucket refuses a burst of pushes with `rate_limited` and the time to wait).
fn push(stack: &Stack, room: u64, i: usize) {
    let mut c = broker::IngestClient::connect(stack.ingest_addr(), API_KEY).unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        match c.push(&broker::Message::room(room, msg(i))) {
            Ok(_) => return,
            Err(broker::ClientError::Rejected(proto::ingest::PushError::RateLimited {
                retry_after_ms,
            })) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(u64::from(retry_after_ms.max(1))));
            }
            Err(e) => panic!("push {i} to room {room}: {e}"),
        }
    }
}

/// Pushes until `watcher` (a viewer that stays) receives `msg(i)`: the room is subscribed and
/// message `i` is one batch of its own.
fn push_seen(stack: &Stack, room: u64, i: usize, watcher: &mut Client) -> u32 {
    push(stack, room, i);
    let (seq, bodies) = watcher.batch();
    assert_eq!(bodies, vec![msg(i)]);
    seq
}

/// A viewer in the room that asks for nothing, to prove the room is subscribed before counting.
fn watcher(stack: &Stack, room: u64) -> Client {
    let (addr, mut body) = edge_tcp(stack, room, 99);
    body.ack = true;
    let mut w = Client::connect(addr, &body, None);
    let (code, _, _) = w.auth_and_sync();
    assert_eq!(code, 0);
    // The first push may race the edge's subscription: repeat until one arrives.
    let deadline = Instant::now() + WAIT;
    loop {
        push(stack, room, 0);
        if let Some(Ev::Batch(..)) = w.next(Instant::now() + Duration::from_millis(300)) {
            break;
        }
        assert!(Instant::now() < deadline, "room never subscribed");
    }
    // A fence: once the watcher has it, no repeated first push can still be on its way (they
    // were accepted before it, on the same broker shard), so later viewers never see one.
    const FENCE: usize = 999_999;
    push(stack, room, FENCE);
    loop {
        let (_, bodies) = w.batch();
        if bodies == vec![msg(FENCE)] {
            return w;
        }
        assert_eq!(bodies, vec![msg(0)]);
    }
}

#[test]
fn resume_replays_exactly_the_missed_batches_then_live_without_dup() {
    let stack = start(64);
    let room = 7101;
    let mut w = watcher(&stack, room);
    let (addr, body) = edge_tcp(&stack, room, 5);
    let mut a = Client::connect(addr, &body, None);
    let (code, replayed, sync) = a.auth_and_sync();
    assert_eq!((code, replayed.len(), sync.recovered), (0, 0, true));
    let mut pos = Position::default();
    pos.on_sync(&sync);
    for i in 1..=3 {
        push_seen(&stack, room, i, &mut w);
        let (seq, b) = a.batch();
        assert_eq!(b, vec![msg(i)]);
        assert_eq!(pos.on_batch(seq), Seen::New);
    }
    drop(a);
    let missed_seqs: Vec<u32> = (4..=6)
        .map(|i| push_seen(&stack, room, i, &mut w))
        .collect();

    let mut b = Client::connect(addr, &body, pos.resume().as_ref());
    let (code, replayed, sync) = b.auth_and_sync();
    assert_eq!(code, 0);
    assert_eq!(
        replayed,
        (4..=6)
            .zip(&missed_seqs)
            .map(|(i, s)| (*s, vec![msg(i)]))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        (sync.epoch.clone(), sync.seq, sync.recovered, sync.missed),
        (pos.epoch().unwrap().clone(), missed_seqs[2], true, 0)
    );
    for (seq, _) in &replayed {
        assert_eq!(pos.on_batch(*seq), Seen::New);
    }
    pos.on_sync(&sync);
    for i in 7..=8 {
        push_seen(&stack, room, i, &mut w);
        let (seq, bodies) = b.batch();
        assert_eq!(bodies, vec![msg(i)]);
        assert_eq!(pos.on_batch(seq), Seen::New, "live after the replay");
    }
}

#[test]
fn resume_during_a_steady_stream_has_no_gap_and_no_dup() {
    let stack = start(64);
    let room = 7102;
    let _w = watcher(&stack, room);
    let (addr, body) = edge_tcp(&stack, room, 6);
    let ingest = stack.ingest_addr();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pusher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut c = broker::IngestClient::connect(ingest, API_KEY).unwrap();
            let mut i = 1000;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                c.push(&broker::Message::room(room, msg(i))).unwrap();
                i += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let mut pos = Position::default();
    let mut seen: Vec<usize> = Vec::new();
    let note = |bodies: &[String], seen: &mut Vec<usize>| {
        for b in bodies {
            let i: usize = b
                .split("\"m")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            seen.push(i);
        }
    };
    for round in 0..6 {
        let mut c = Client::connect(addr, &body, pos.resume().as_ref());
        let (code, replayed, sync) = c.auth_and_sync();
        assert_eq!(code, 0);
        for (seq, b) in &replayed {
            assert_eq!(
                pos.on_batch(*seq),
                Seen::New,
                "round {round}: replayed {seq}"
            );
            note(b, &mut seen);
        }
        if round > 0 {
            assert!(sync.recovered, "round {round}: {sync:?}");
        }
        pos.on_sync(&sync);
        // Live for a while, then drop the connection mid-stream.
        for _ in 0..20 {
            let (seq, b) = c.batch();
            assert_eq!(pos.on_batch(seq), Seen::New, "round {round}: live {seq}");
            note(&b, &mut seen);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    pusher.join().unwrap();
    // Every message from the first one seen to the last, once each, in order.
    let first = seen[0];
    assert_eq!(seen, (first..first + seen.len()).collect::<Vec<_>>());
}

#[test]
fn resume_beyond_history_says_what_was_missed() {
    let stack = start(4);
    let room = 7103;
    let mut w = watcher(&stack, room);
    let (addr, body) = edge_tcp(&stack, room, 7);
    let mut a = Client::connect(addr, &body, None);
    let (_, _, sync) = a.auth_and_sync();
    let first = push_seen(&stack, room, 1, &mut w);
    assert_eq!(a.batch().0, first);
    drop(a);
    let seqs: Vec<u32> = (2..=9)
        .map(|i| push_seen(&stack, room, i, &mut w))
        .collect();
    let resume = Resume {
        epoch: sync.epoch.clone(),
        seq: first,
    };
    let mut b = Client::connect(addr, &body, Some(&resume));
    let (code, replayed, sync) = b.auth_and_sync();
    assert_eq!(code, 0);
    // 4 held: the last four; the four before them are missed.
    assert_eq!(
        replayed.iter().map(|r| r.0).collect::<Vec<_>>(),
        seqs[4..].to_vec()
    );
    assert_eq!(replayed[0].1, vec![msg(6)]);
    assert_eq!((sync.recovered, sync.missed, sync.seq), (false, 4, seqs[7]));
}

#[test]
fn malformed_or_absurd_resume_is_ignored_answered_and_harms_no_one() {
    let stack = start(64);
    let room = 7104;
    let mut w = watcher(&stack, room);
    let (addr, body) = edge_tcp(&stack, room, 8);
    let json = serde_json::to_value(&body).unwrap();
    let with = |resume: serde_json::Value| {
        let mut j = json.clone();
        j["resume"] = resume;
        serde_json::to_vec(&j).unwrap()
    };
    for bad in [
        serde_json::json!("yesterday"),
        serde_json::json!({"epoch": 5, "seq": 1}),
        serde_json::json!({"epoch": "a\u{0}b", "seq": 1}),
        serde_json::json!({"epoch": "x".repeat(65), "seq": 1}),
        serde_json::json!({"epoch": "e-1", "seq": -1}),
        serde_json::json!({"epoch": "e-1", "seq": 4294967296u64}),
    ] {
        let mut c = Client::raw(addr, &with(bad.clone()));
        let (code, replayed, sync) = c.auth_and_sync();
        assert_eq!((code, replayed.len()), (0, 0), "{bad}");
        assert!(!sync.recovered && sync.missed == 0, "{bad}: {sync:?}");
    }
    // A seq ahead of the room's: nothing replayed, not recovered.
    let (_, _, now) = Client::connect(addr, &body, None).auth_and_sync();
    let ahead = Resume {
        epoch: now.epoch.clone(),
        seq: now.seq + 1_000_000,
    };
    let (code, replayed, sync) = Client::connect(addr, &body, Some(&ahead)).auth_and_sync();
    assert_eq!((code, replayed.len(), sync.recovered), (0, 0, false));
    // The watcher never noticed.
    push_seen(&stack, room, 1, &mut w);
    let metrics = http_get_text(&stack);
    assert!(
        metric_value(
            &metrics,
            "barrage_edge_resumes_total{outcome=\"malformed\"}"
        ) >= 6.0,
        "{metrics}"
    );
}

#[test]
fn resume_across_a_broker_restart_names_the_new_epoch() {
    let mut stack = start(64);
    let room = 7105;
    let mut w = watcher(&stack, room);
    let (addr, body) = edge_tcp(&stack, room, 9);
    let mut a = Client::connect(addr, &body, None);
    let (_, _, before) = a.auth_and_sync();
    // `stay` keeps its connection through the restart.
    let (addr2, body2) = edge_tcp(&stack, room, 10);
    let mut stay = Client::connect(addr2, &body2, None);
    stay.auth_and_sync();
    let seq = push_seen(&stack, room, 1, &mut w);
    assert_eq!(a.batch().0, seq);
    assert_eq!(stay.batch().0, seq);
    drop(a);

    // Restart the broker on the same link address: the edge re-links by itself.
    let link = stack.link_addr();
    drop(stack.broker.take());
    stack.broker = Some(
        broker::start(broker::Config {
            link_addr: link,
            ..broker_cfg(64)
        })
        .expect("broker restarts"),
    );
    let resume = Resume {
        epoch: before.epoch.clone(),
        seq,
    };
    // Until the edge has re-linked the answer may be a fallback; either way the old position is
    // never taken for a current one.
    let deadline = Instant::now() + WAIT;
    let sync = loop {
        let (code, replayed, sync) = Client::connect(addr, &body, Some(&resume)).auth_and_sync();
        assert_eq!(code, 0);
        assert!(!sync.recovered, "{sync:?}");
        assert!(replayed.is_empty());
        if sync.epoch != before.epoch {
            break sync;
        }
        assert!(
            Instant::now() < deadline,
            "the new epoch never reached the client"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_ne!(sync.epoch, before.epoch);

    // The viewer that stayed is told the new epoch before the first batch of it, and the
    // stream continues right after the seq the sync names.
    let deadline = Instant::now() + WAIT;
    let told = loop {
        push(&stack, room, 2);
        match stay.next(Instant::now() + Duration::from_millis(300)) {
            Some(Ev::Sync(s)) => break s,
            None => assert!(Instant::now() < deadline, "no sync after the restart"),
            other => panic!("a batch of the new epoch before its sync: {other:?}"),
        }
    };
    assert_eq!(told.epoch, sync.epoch);
    assert!(!told.recovered);
    let (next, bodies) = stay.batch();
    assert_eq!(bodies, vec![msg(2)]);
    assert_eq!(next, told.seq + 1);
}

fn http_get_text(stack: &Stack) -> String {
    let admin = stack.edge.as_ref().unwrap().admin_addr();
    let mut s = TcpStream::connect(admin).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn metric_value(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Figures for docs/benchmarks.md (by hand: `cargo test --release -p barrage --test resume --
/// --ignored --nocapture resume_figures`): `VIEWERS` viewers watch one room streaming
/// `RATE` messages/s; each drops its connection `ROUNDS` times at a random point and resumes.
/// Reports resumes recovered, batches replayed, gaps and duplicates seen by the clients, and the
/// time from connect to `BARRAGE_SYNC` for a resume against a fresh `"sync":true` connect
/// (the baseline, same run).
#[test]
#[ignore]
fn resume_figures() {
    const VIEWERS: usize = 40;
    const ROUNDS: usize = 10;
    const RATE: u64 = 200;
    let stack = start(64);
    let room = 7199;
    let _w = watcher(&stack, room);
    let ingest = stack.ingest_addr();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pusher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut c = broker::IngestClient::connect(ingest, API_KEY).unwrap();
            let mut i = 0usize;
            let t0 = Instant::now();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                c.push(&broker::Message::room(room, msg(i))).unwrap();
                i += 1;
                let due = t0 + Duration::from_micros(i as u64 * 1_000_000 / RATE);
                if let Some(d) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
            }
        })
    };
    #[derive(Default, Debug)]
    struct Tally {
        resumes: u64,
        recovered: u64,
        replayed: u64,
        gaps: u64,
        dups: u64,
        fresh_us: Vec<u64>,
        resume_us: Vec<u64>,
    }
    let threads: Vec<_> = (0..VIEWERS)
        .map(|v| {
            let (addr, mut body) = edge_tcp(&stack, room, 1000 + v as u64);
            body.ack = false;
            std::thread::spawn(move || {
                let mut t = Tally::default();
                let mut pos = Position::default();
                for round in 0..=ROUNDS {
                    if round > 0 {
                        // The baseline, under the same load: a fresh connect asking for a sync.
                        let started = Instant::now();
                        let p = proto::auth::auth_request_ext(&body, None, true);
                        let (code, _, _) = Client::raw(addr, &p[16..]).auth_and_sync();
                        assert_eq!(code, 0);
                        t.fresh_us.push(started.elapsed().as_micros() as u64);
                    }
                    let resume = pos.resume();
                    let started = Instant::now();
                    let p = proto::auth::auth_request_ext(&body, resume.as_ref(), true);
                    let mut c = Client::raw(addr, &p[16..]);
                    let (code, replayed, sync) = c.auth_and_sync();
                    let us = started.elapsed().as_micros() as u64;
                    assert_eq!(code, 0);
                    if round > 0 {
                        t.resume_us.push(us);
                        t.resumes += 1;
                        t.recovered += u64::from(sync.recovered);
                    }
                    for (seq, _) in &replayed {
                        t.replayed += 1;
                        match pos.on_batch(*seq) {
                            Seen::Duplicate => t.dups += 1,
                            Seen::Gap(n) => t.gaps += u64::from(n),
                            Seen::New => {}
                        }
                    }
                    pos.on_sync(&sync);
                    let n = 5 + rand::random::<u64>() % 40;
                    for _ in 0..n {
                        let (seq, _) = c.batch();
                        match pos.on_batch(seq) {
                            Seen::Duplicate => t.dups += 1,
                            Seen::Gap(n) => t.gaps += u64::from(n),
                            Seen::New => {}
                        }
                    }
                }
                t
            })
        })
        .collect();
    let mut all = Tally::default();
    for th in threads {
        let t = th.join().unwrap();
        all.resumes += t.resumes;
        all.recovered += t.recovered;
        all.replayed += t.replayed;
        all.gaps += t.gaps;
        all.dups += t.dups;
        all.fresh_us.extend(t.fresh_us);
        all.resume_us.extend(t.resume_us);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    pusher.join().unwrap();
    let pct = |v: &mut Vec<u64>, p: f64| {
        v.sort_unstable();
        v[((v.len() - 1) as f64 * p) as usize] as f64 / 1000.0
    };
    println!(
        "viewers {VIEWERS} rounds {ROUNDS} rate {RATE}/s: resumes {} recovered {} replayed batches {} gaps {} dups {}",
        all.resumes, all.recovered, all.replayed, all.gaps, all.dups
    );
    println!(
        "connect->sync ms: fresh p50 {:.2} p99 {:.2} | resume p50 {:.2} p99 {:.2}",
        pct(&mut all.fresh_us, 0.5),
        pct(&mut all.fresh_us, 0.99),
        pct(&mut all.resume_us, 0.5),
        pct(&mut all.resume_us, 0.99)
    );
    assert_eq!((all.gaps, all.dups), (0, 0));
    assert_eq!(all.recovered, all.resumes);
}

/// `barrage tail` (the real binary) resumes by itself when its edge goes away: every message
/// once, in order, across a restart of the edge, and it says on stderr that nothing was missed.
#[test]
fn tail_resumes_across_an_edge_restart() {
    use std::io::BufRead;
    let mut stack = start(64);
    let room = 7106;
    let control = format!("http://{}", stack.control_addr());
    let mut tail = std::process::Command::new(env!("CARGO_BIN_EXE_barrage"))
        .args([
            "tail",
            "--room",
            &room.to_string(),
            "--control",
            &control,
            "--uid",
            "31",
            "--timeout-ms",
            "60000",
        ])
        .env("BARRAGE_CONTROL_KEY", API_KEY)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn barrage tail");
    let lines = |r: Box<dyn std::io::Read + Send>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(r).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        rx
    };
    let out = lines(Box::new(tail.stdout.take().unwrap()));
    let err = lines(Box::new(tail.stderr.take().unwrap()));
    let next_msg = |deadline: Instant| -> String {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let l = out.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "tail printed nothing more; stderr: {:?}",
                    err.try_iter().collect::<Vec<_>>()
                )
            });
            // Warm-up and fence pushes (several may be in flight) are not counted.
            if l != msg(0) && l != msg(999_999) {
                return l;
            }
        }
    };
    // Warm up: push until tail prints, then a fence.
    let deadline = Instant::now() + WAIT;
    loop {
        push(&stack, room, 0);
        if let Ok(l) = out.recv_timeout(Duration::from_millis(300)) {
            assert_eq!(l, msg(0));
            break;
        }
        assert!(Instant::now() < deadline, "tail never subscribed");
    }
    push(&stack, room, 999_999);
    for i in 1..=3 {
        push(&stack, room, i);
        assert_eq!(next_msg(Instant::now() + WAIT), msg(i));
    }
    // The edge goes away; what is pushed meanwhile waits in the broker's history.
    stack.edge.take().expect("edge running").shutdown();
    for i in 4..=6 {
        push(&stack, room, i);
    }
    stack.edge = Some(
        edge::start(edge_config(
            "edge-1",
            KEYS_V1,
            stack.link_addr(),
            stack.control_addr(),
        ))
        .expect("edge restarts"),
    );
    for i in 4..=6 {
        assert_eq!(next_msg(Instant::now() + WAIT), msg(i));
    }
    push(&stack, room, 7);
    assert_eq!(next_msg(Instant::now() + WAIT), msg(7));
    let _ = tail.kill();
    let _ = tail.wait();
    let mut stderr = Vec::new();
    while let Ok(l) = err.recv_timeout(Duration::from_secs(5)) {
        stderr.push(l);
    }
    assert!(
        stderr
            .iter()
            .any(|l| l.starts_with("resumed: nothing missed")),
        "{stderr:?}"
    );
}
