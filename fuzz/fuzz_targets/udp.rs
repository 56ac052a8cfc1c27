//! The UDP datagram decoders and admission: never panic on any datagram from any address; an
//! answer before validation is never larger than the datagram; a server datagram that decodes
//! as data holds a container that unpacks within its cap; a datagram that is a run of packets
//! splits into datagrams that all fit and decode.
//!
//! Input: byte 0 = mode (bits 0-1: source port 40000 + n; bit 2: split with zlib instead of
//! plain), bytes 1..9 = now_s (BE u64), rest = the datagram. Seeds are the datagrams of
//! docs/protocol-udp.md (fuzz/seedgen), made with the secret below.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::container::{self, BrotliParams};
use proto::id::Encoding;
use proto::udp::{self, Admit, CookieKey, ServerDatagram, SessionId, UDP_PAYLOAD_BYTES_MAX};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// Secret of the seeds (fuzz/seedgen and proto's udp tests use it too).
const SECRET: &[u8] = b"barrage-udp-test";
/// Small cap so the unpack path stays fast.
const CAP_BYTES: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let mode = data[0];
    let now_s = u64::from_be_bytes([
        data[1], data[2], data[3], data[4], data[5], data[6], data[7], data[8],
    ]);
    let d = &data[9..];
    let from = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 40000 + u16::from(mode & 3));
    let key = CookieKey::new(SECRET);
    // Sessions the table knows: any id whose low bit is set lives at port 40000.
    let table = |s: SessionId| {
        (s.0 & 1 == 1).then_some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 40000))
    };
    // The edge reads the session before anything else (to forward it to its shard).
    if let Some(s) = udp::session_of_datagram(d) {
        assert!(d.len() >= 24);
        let _ = s.shard();
    }
    match udp::admit(&key, d, from, table, 0, now_s, UDP_PAYLOAD_BYTES_MAX) {
        Admit::Reply(r) => assert!(r.len() <= d.len(), "amplified {} -> {}", d.len(), r.len()),
        // A bye from another port needs a cookie minted for it, which the fuzzer cannot forge.
        Admit::Requests { .. } | Admit::Bye { .. } => assert_eq!(from.port(), 40000),
        Admit::Auth { .. } | Admit::Migrate { .. } | Admit::Drop(_) => {}
    }
    if let Ok(ServerDatagram::Data(part)) = udp::decode_server(d, UDP_PAYLOAD_BYTES_MAX) {
        if let Ok((outer, _)) = proto::packet::decode(part.container, u32::MAX) {
            let _ = container::unpack(outer.ver, outer.op, outer.seq, outer.body, CAP_BYTES);
        }
    }
    let enc = if mode & 4 == 0 {
        Encoding::Plain
    } else {
        Encoding::Zlib
    };
    if let Ok(parts) = udp::split_batch(d, enc, 7, UDP_PAYLOAD_BYTES_MAX, BrotliParams::default()) {
        for p in &parts {
            assert!(p.len() <= UDP_PAYLOAD_BYTES_MAX);
            assert!(udp::decode_server(p, UDP_PAYLOAD_BYTES_MAX).is_ok(), "own part decodes");
        }
    }
});
