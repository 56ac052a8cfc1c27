//! Measurement, not a test: appends per second on one core with durability on, for the
//! high-reach log (broker/src/store.rs) and for redb at the same group sizes, side by side in
//! one run so the ratio means something on a shared machine. Run in release:
//!
//! ```text
//! cargo test -p broker --release --test store_bench -- --ignored --nocapture --test-threads 1
//! ```
//!
//! A "group" is what one commit makes durable: the pushes of one event-loop turn. Each append
//! is an accepted high-reach message of `BODY_BYTES`; every 8th stays live, the others are
//! ACKed in the same group (the ACK is logged too: that is the steady state).

use broker::reach::Target;
use broker::store::{Accept, Limits, Store};
use bytes::Bytes;
use proto::id::{MsgId, UserId};
use redb::{Database, ReadableDatabase, TableDefinition};
use std::path::Path;
use std::time::{Duration, Instant};

const BODY_BYTES: usize = 300;
const RUN_MS: u64 = 1500;
const TABLE: TableDefinition<u64, &[u8]> = TableDefinition::new("reach");

fn ours(dir: &Path, group: u64) -> f64 {
    let (mut s, _) = Store::open(dir, Limits::default(), 0).unwrap();
    let body = Bytes::from(vec![b'x'; BODY_BYTES]);
    let start = Instant::now();
    let mut m = 0u64;
    while start.elapsed() < Duration::from_millis(RUN_MS) {
        for _ in 0..group {
            m += 1;
            s.append_accept(Accept {
                msg: MsgId(m),
                target: Target::User(UserId(m)),
                expires_at_ms: u64::MAX,
                body: body.clone(),
            })
            .unwrap();
            if !m.is_multiple_of(8) {
                s.append_acked(MsgId(m));
            }
        }
        s.commit(0).unwrap();
    }
    m as f64 / start.elapsed().as_secs_f64()
}

fn redb(dir: &Path, group: u64) -> f64 {
    let db = Database::create(dir.join("reach.redb")).unwrap();
    let body = vec![b'x'; BODY_BYTES + 30];
    let start = Instant::now();
    let mut m = 0u64;
    while start.elapsed() < Duration::from_millis(RUN_MS) {
        let tx = db.begin_write().unwrap(); // Durability::Immediate: fsync on commit
        {
            let mut t = tx.open_table(TABLE).unwrap();
            for _ in 0..group {
                m += 1;
                t.insert(m, body.as_slice()).unwrap();
                if !m.is_multiple_of(8) {
                    t.remove(m).unwrap();
                }
            }
        }
        tx.commit().unwrap();
    }
    let _ = db.begin_read();
    m as f64 / start.elapsed().as_secs_f64()
}

#[test]
#[ignore = "benchmark: run by name in release"]
fn store_appends_per_second_vs_redb() {
    let root = std::env::temp_dir().join(format!("barrage-store-bench-{}", std::process::id()));
    println!("group  ours/s     redb/s     ours/redb");
    for group in [1u64, 8, 64, 512] {
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("ours")).unwrap();
        std::fs::create_dir_all(root.join("redb")).unwrap();
        let a = ours(&root.join("ours"), group);
        let b = redb(&root.join("redb"), group);
        println!("{group:<6} {a:<10.0} {b:<10.0} {:.2}", a / b);
    }
    let _ = std::fs::remove_dir_all(&root);
}
