//! Shutdown closes every socket and ends every thread (its own test binary, so the fd count
//! of the process is ours alone).

mod common;

use broker::{IngestClient, Message};
use common::*;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn shutdown_releases_sockets_and_ports() {
    for driver in ["legacy", "uring"] {
        if driver == "uring" && !monoio::utils::detect_uring() {
            continue;
        }
        let mut cfg = config();
        cfg.driver = net::runtime::Driver::parse(driver).unwrap();
        let before = open_fds();
        let broker = broker::start(cfg).unwrap();
        let (ingest, link, web) = (broker.ingest_addr(), broker.link_addr(), broker.http_addr());
        let mut edge = TestEdge::connect(link, "edge");
        edge.sub_room(1);
        let mut c = IngestClient::connect(ingest, KEY).unwrap();
        c.push(&Message::room(1, &b"{}"[..])).unwrap();
        let (s, _, _) = http(web, "GET", "/healthz", None, b"");
        assert_eq!(s, 200);
        assert_eq!(edge.batches_with(1).len(), 1);
        broker.shutdown();
        // Every link sees EOF (the test edge's readers end), every listener is gone.
        drop(edge);
        drop(c);
        for addr in [ingest, link, web] {
            assert!(
                std::net::TcpStream::connect(addr).is_err(),
                "{driver}: {addr} still accepts"
            );
        }
        eventually("fds to be released", || open_fds() <= before);
    }
}
