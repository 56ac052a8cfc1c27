//! The broker's default `data_dir` (issue 9): per node id and ingest port under the state
//! directory, so several brokers on one host never share a high-reach log, and a broker
//! restarted on the same port after `kill -9` finds its log again.

use crate::common::*;
use crate::ports::free_port;
use broker::{IngestClient, Message};
use proto::id::Reach;
use std::path::Path;
use std::time::{Duration, Instant};

const KEY: &str = STRONG;

fn broker_on(ingest: u16, state: &Path) -> Role {
    let toml = format!(
        "shards = 1\npin = false\ndriver = \"legacy\"\ningest_addr = \"127.0.0.1:{ingest}\"\n\
         link_addr = \"127.0.0.1:0\"\nhttp_addr = \"127.0.0.1:0\"\n\
         [[api_keys]]\nkey = \"{KEY}\"\n"
    );
    let env = Env {
        state_home: Some(state.to_path_buf()),
        ..Env::default()
    };
    start_ok_in("broker", &toml, &env)
}

fn reloaded(http: std::net::SocketAddr) -> f64 {
    metric(&metrics(http), "barrage_broker_reach_reloaded_total").unwrap_or(-1.0)
}

#[test]
fn brokers_on_one_host_get_their_own_default_data_dir_and_find_it_after_kill_9() {
    let state = std::env::temp_dir().join(format!("barrage-faults-datadir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let (p1, p2) = (free_port(), free_port());
    // Same node id (the default, broker-1), two ports: two directories, both locked.
    let mut a = broker_on(p1, &state);
    let b = broker_on(p2, &state);
    let dir = |p: u16| state.join("barrage").join(format!("broker-broker-1-{p}"));
    for p in [p1, p2] {
        assert!(
            dir(p).join("LOCK").exists(),
            "{} has no LOCK",
            dir(p).display()
        );
    }

    // A high-reach push for a user nobody holds waits in a's log...
    let mut c = IngestClient::connect(a.addrs[0], KEY).unwrap();
    c.push(&Message::user(5, &b"{\"cmd\":\"GIFT\"}"[..]).reach(Reach::High))
        .unwrap();
    drop(c);
    a.child.kill().expect("kill -9");
    let _ = a.child.wait();
    // ...and a broker started again on the same port (same default directory) reloads it.
    let a = broker_on(p1, &state);
    assert_eq!(reloaded(a.addrs[2]), 1.0);
    assert_eq!(reloaded(b.addrs[2]), 0.0);
    drop((a, b));
    let _ = std::fs::remove_dir_all(&state);
}

#[test]
fn none_is_memory_only_and_ephemeral_ports_write_nothing() {
    let state = std::env::temp_dir().join(format!("barrage-faults-nodir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let env = Env {
        state_home: Some(state.clone()),
        ..Env::default()
    };
    let ephemeral = format!(
        "shards = 1\npin = false\ndriver = \"legacy\"\ningest_addr = \"127.0.0.1:0\"\n\
         link_addr = \"127.0.0.1:0\"\nhttp_addr = \"127.0.0.1:0\"\n[[api_keys]]\nkey = \"{KEY}\"\n"
    );
    let fixed = ephemeral.replace(
        "ingest_addr = \"127.0.0.1:0\"",
        &format!(
            "ingest_addr = \"127.0.0.1:{}\"\ndata_dir = \"none\"",
            free_port()
        ),
    );
    let roles = [
        start_ok_in("broker", &ephemeral, &env),
        start_ok_in("broker", &fixed, &env),
    ];
    let deadline = Instant::now() + Duration::from_millis(300);
    while Instant::now() < deadline {
        assert!(
            !state.exists(),
            "a memory-only broker wrote {}",
            state.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(roles);
    // An empty data_dir is refused at start, naming the choices.
    let empty = ephemeral.replace("[[api_keys]]", "data_dir = \"\"\n[[api_keys]]");
    match start_in("broker", &empty, &env) {
        Started::Exited(_, err) => assert!(err.contains("\"none\""), "{err}"),
        Started::Up(_) => panic!("a broker started with data_dir = \"\""),
    }
}
