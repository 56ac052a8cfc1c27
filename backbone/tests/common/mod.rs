//! Shared by the backbone's integration tests that start their own nats-server.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `nats-server -c <conf>` (Debian's binary when present), waiting until it listens on
/// `listen`. None when it is not installed and `BARRAGE_REQUIRE_NATS` is unset (the test
/// skips); a failure when it is set.
pub fn spawn_nats(conf: &Path, listen: SocketAddr) -> Option<Child> {
    let bin = if Path::new("/usr/sbin/nats-server").exists() {
        "/usr/sbin/nats-server"
    } else {
        "nats-server"
    };
    let mut child = match Command::new(bin)
        .arg("-c")
        .arg(conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            assert!(
                std::env::var_os("BARRAGE_REQUIRE_NATS").is_none(),
                "nats-server required: {e}"
            );
            eprintln!("nats-server not installed ({e}); skipping");
            return None;
        }
    };
    let until = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(listen).is_err() {
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "nats-server did not listen on {listen} ({})",
                conf.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(child)
}
