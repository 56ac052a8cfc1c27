//! End to end: a real stack (control, broker, edge) started in this process on loopback port 0,
//! driven by the loadtest's viewers (TCP and WebSocket, through control like real clients) and
//! its publisher (the ingest socket). Asserts that every accepted message reached every viewer
//! exactly once, and that the JSON report is well formed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use clap::Parser;
use loadtest::cli::Common;
use loadtest::run::{run, Kind};

const TOKEN_KEYS: &str = "1:loadtest-e2e-secret-0123456789";
const API_KEY: &str = "loadtest-e2e-key";
/// The whole test must end within this (the run itself is bounded; this catches a hang).
const TEST_S_MAX: u64 = 120;

struct Stack {
    control: control::Handle,
    broker: broker::Handle,
    edge: edge::Handle,
}

impl Stack {
    fn start() -> Stack {
        let control = control::start(control::Config {
            http_addr: "127.0.0.1:0".parse().unwrap(),
            token_keys: TOKEN_KEYS.into(),
            ..Default::default()
        })
        .unwrap();
        let mut bc = broker::Config {
            shards: 1,
            pin: net::runtime::Pin::Off,
            ingest_addr: "127.0.0.1:0".parse().unwrap(),
            link_addr: "127.0.0.1:0".parse().unwrap(),
            http_addr: "127.0.0.1:0".parse().unwrap(),
            room_rate_per_s: 0.0,
            ..Default::default()
        };
        bc.api_keys
            .push(broker::config::ApiKey::all_scopes(API_KEY));
        let broker = broker::start(bc).unwrap();
        let edge = edge::start(edge::Config {
            shards: 2,
            pin: net::runtime::Pin::Off,
            tcp_addr: "127.0.0.1:0".into(),
            ws_addr: "127.0.0.1:0".into(),
            admin_addr: "127.0.0.1:0".into(),
            broker_addrs: vec![broker.link_addr().to_string()],
            control_addr: Some(control.http_addr().to_string()),
            control_heartbeat_ms: 200,
            public_host: "127.0.0.1".into(),
            token_keys: TOKEN_KEYS.into(),
            ..Default::default()
        })
        .unwrap();
        let stack = Stack {
            control,
            broker,
            edge,
        };
        stack.wait_for_edge_listed();
        stack
    }

    /// Control hands out no edge until the edge's first heartbeat arrives.
    fn wait_for_edge_listed(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(body) = post(
                self.control.http_addr(),
                "/v1/connect",
                r#"{"room":1,"uid":0,"device":"probe"}"#,
            ) {
                if body.contains(&format!("\"tcp_port\":{}", self.edge.tcp_addr().port())) {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("control never listed the edge");
    }

    fn shutdown(self) {
        self.edge.shutdown();
        self.broker.shutdown();
        self.control.shutdown();
    }
}

/// A minimal blocking HTTP/1.1 POST; the body of a 200 answer.
fn post(addr: SocketAddr, path: &str, body: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    if !out.starts_with("HTTP/1.1 200") {
        return None;
    }
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    common: Common,
}

fn common(stack: &Stack, extra: &[&str], json: &std::path::Path) -> Common {
    let control = format!("http://{}", stack.control.http_addr());
    let ingest = stack.broker.ingest_addr().to_string();
    let pid = std::process::id().to_string();
    let mut args = vec![
        "loadtest",
        "--control",
        &control,
        "--ingest",
        &ingest,
        "--api-key",
        API_KEY,
        "--threads",
        "2",
        "--ramp-per-s",
        "1000",
        "--warmup-ms",
        "1000",
        "--duration-ms",
        "3000",
        "--heartbeat-ms",
        "1000",
        "--pids",
        &pid,
        "--json",
    ];
    let json = json.to_str().unwrap().to_string();
    args.push(&json);
    args.extend_from_slice(extra);
    Flags::parse_from(args).common
}

/// Runs `f` on a thread and fails the test if it does not finish in time.
fn bounded<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(TEST_S_MAX))
        .expect("end-to-end run did not finish in time")
}

fn temp_json(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("loadtest-e2e-{name}-{}.json", std::process::id()))
}

#[test]
fn fanout_to_a_few_hundred_viewers_loses_nothing() {
    bounded(|| {
        let stack = Stack::start();
        let json = temp_json("fanout");
        let charts =
            std::env::temp_dir().join(format!("loadtest-e2e-charts-{}", std::process::id()));
        let charts_arg = charts.to_str().unwrap().to_string();
        let c = common(
            &stack,
            &[
                "--viewers",
                "300",
                "--transport",
                "mix",
                "--rooms",
                "1",
                "--charts",
                &charts_arg,
            ],
            &json,
        );
        let kind = Kind::Publish {
            steps: vec![100],
            step_ms: 3000,
            p99_ms_max: u64::MAX,
            zipf: 0.0,
            publish_zipf: false,
        };
        let report = run(&c, kind, "fanout", serde_json::json!({})).unwrap();
        stack.shutdown();

        assert_eq!(
            report.connects.ok, 300,
            "failures: {:?}",
            report.connects.failures
        );
        let p = report.publisher.clone().unwrap();
        assert!(p.accepted >= 300, "publisher: {p:?}");
        assert_eq!(p.accepted, p.sent, "publisher: {p:?}");
        assert_eq!(report.totals.missing, 0);
        assert_eq!(report.totals.duplicates, 0);
        assert_eq!(report.totals.out_of_order, 0);
        // Every viewer of the one room got every accepted message exactly once.
        assert_eq!(report.totals.delivered, 300 * p.accepted);
        assert!(report.totals.latency.count > 0 && report.totals.latency.p50_ms > 0.0);
        assert!(
            report.totals.disconnects.is_empty(),
            "{:?}",
            report.totals.disconnects
        );
        assert!(report.totals.heartbeat_replies > 0);

        let text = std::fs::read_to_string(&json).unwrap();
        let _ = std::fs::remove_file(&json);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["scenario"], "fanout");
        assert_eq!(v["totals"]["missing"], 0);
        assert_eq!(v["totals"]["duplicates"], 0);
        assert_eq!(v["connects"]["ok"], 300);
        assert_eq!(v["steps"].as_array().unwrap().len(), 1);
        assert!(v["steps"][0]["deliveries_per_s"].as_f64().unwrap() > 0.0);
        assert!(v["steps"][0]["latency"]["p99_ms"].as_f64().unwrap() > 0.0);
        assert!(v["server"]["pids"].as_array().unwrap().len() == 1);
        // --charts: every chart, with the measured step in its legend, and the step's histogram.
        for f in [
            "latency.svg",
            "deliveries.svg",
            "cpu.svg",
            "connections.svg",
        ] {
            let svg = std::fs::read_to_string(charts.join(f)).unwrap();
            assert!(svg.contains("step 1: 100 msg/s"), "{f} names the step");
        }
        let hgrm = std::fs::read_to_string(charts.join("step-1.hgrm")).unwrap();
        assert!(
            hgrm.contains("Percentile") && hgrm.contains("#[Max"),
            "{hgrm}"
        );
        let _ = std::fs::remove_dir_all(&charts);
        assert!(v["server"]["baseline"]["rss_bytes"].as_u64().unwrap() > 0);
    });
}

#[test]
fn many_rooms_zipf_loses_nothing() {
    bounded(|| {
        let stack = Stack::start();
        let json = temp_json("rooms");
        let c = common(
            &stack,
            &["--viewers", "200", "--transport", "tcp", "--rooms", "20"],
            &json,
        );
        let kind = Kind::Publish {
            steps: vec![200],
            step_ms: 3000,
            p99_ms_max: u64::MAX,
            zipf: 1.1,
            publish_zipf: true,
        };
        let report = run(&c, kind, "rooms", serde_json::json!({})).unwrap();
        stack.shutdown();
        let _ = std::fs::remove_file(&json);

        assert_eq!(
            report.connects.ok, 200,
            "failures: {:?}",
            report.connects.failures
        );
        let p = report.publisher.clone().unwrap();
        assert_eq!(p.accepted, p.sent, "publisher: {p:?}");
        assert!(report.totals.delivered > 0);
        assert_eq!(report.totals.missing, 0);
        assert_eq!(report.totals.duplicates, 0);
    });
}

#[test]
fn viewers_split_over_worker_processes_merge_into_one_report() {
    // Three worker processes of 100 viewers each (the path taken above one process's fd budget).
    std::env::set_var(
        loadtest::run::WORKER_EXE_ENV,
        env!("CARGO_BIN_EXE_loadtest"),
    );
    bounded(|| {
        let stack = Stack::start();
        let json = temp_json("workers");
        let c = common(
            &stack,
            &[
                "--viewers",
                "300",
                "--per-process",
                "100",
                "--transport",
                "mix",
            ],
            &json,
        );
        let kind = Kind::Publish {
            steps: vec![50],
            step_ms: 3000,
            p99_ms_max: u64::MAX,
            zipf: 0.0,
            publish_zipf: false,
        };
        let report = run(&c, kind, "fanout", serde_json::json!({})).unwrap();
        stack.shutdown();
        let _ = std::fs::remove_file(&json);

        assert_eq!(report.processes, 3);
        assert_eq!(
            report.connects.ok, 300,
            "failures: {:?}",
            report.connects.failures
        );
        let p = report.publisher.clone().unwrap();
        assert_eq!(p.accepted, p.sent, "publisher: {p:?}");
        assert_eq!(report.totals.missing, 0);
        assert_eq!(report.totals.duplicates, 0);
        assert_eq!(report.totals.delivered, 300 * p.accepted);
        // Histograms from the three processes merged: one latency per delivery.
        assert_eq!(report.totals.latency.count, report.totals.delivered);
    });
}

/// `barrage loadtest resume`: viewers drop and resume three times each during a steady stream
/// into two rooms; every resume is answered and recovered, no viewer sees a gap or a duplicate
/// batch, none loses or doubles a message, and the JSON report parses back with those figures.
#[test]
fn resume_scenario_recovers_every_drop_without_gaps_or_dups() {
    let stack = Stack::start();
    let json = temp_json("resume");
    let args = loadtest::resume::ResumeArgs {
        control: format!("http://{}", stack.control.http_addr()),
        control_key: None,
        ingest: stack.broker.ingest_addr().to_string(),
        api_key: API_KEY.into(),
        viewers: 12,
        rooms: 2,
        room_base: 4200,
        rate: 100,
        resumes: 3,
        down_ms_max: 300,
        duration_ms: 3000,
        settle_ms: 1000,
        protover: 3,
        json: Some(json.clone()),
        seed: 7,
    };
    let report = bounded(move || loadtest::resume::run(&args).unwrap());
    stack.shutdown();
    let text = std::fs::read_to_string(&json).unwrap();
    let _ = std::fs::remove_file(&json);
    let parsed: loadtest::resume::ResumeReport = serde_json::from_str(&text).unwrap();
    assert_eq!(parsed.scenario, "resume");
    for r in [&report, &parsed] {
        assert_eq!(r.errors, 0, "{r:?}");
        assert_eq!(r.resumes, 12 * 3, "{r:?}");
        assert_eq!(r.recovered, r.resumes, "{r:?}");
        assert_eq!(r.fresh_connects, r.resumes, "{r:?}");
        assert_eq!((r.gaps, r.dups), (0, 0), "{r:?}");
        assert_eq!((r.messages_lost, r.messages_dup), (0, 0), "{r:?}");
        assert!(r.published >= 2 * 100 * 2, "{r:?}");
        // Some drops last long enough for batches to be published while away.
        assert!(r.replayed_batches > 0, "{r:?}");
        assert!(r.resume_sync_p99_ms >= r.resume_sync_p50_ms, "{r:?}");
    }
}
