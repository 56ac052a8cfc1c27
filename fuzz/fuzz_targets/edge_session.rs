//! The edge's per-connection state machine (`edge::session::Session`): whatever a client
//! sends, in whatever chunks, it never panics, emits nothing after its `Close`, closes at most
//! once, and holds no more heap than its limits allow.
//!
//! Input layout: byte 0 picks the transport (bit 0: 0 = TCP, 1 = WebSocket), byte 1 the
//! chunk size the stream is fed in (0 = all at once), the rest is what the client sends.
//! Tokens verify against `KEY` at `NOW_S` (fuzz/seedgen signs its seeds with the same).
#![no_main]

use edge::session::{Action, Ctx, Limits, Session, Transport};
use libfuzzer_sys::fuzz_target;
use proto::token::KeySet;
use std::sync::OnceLock;

/// Keep in sync with fuzz/seedgen (`EDGE_SESSION_KEY`, `EDGE_SESSION_NOW_S`).
const KEY: &str = "1:edge-session-fuzz-key-edge-session-fuzz-key";
const NOW_S: u64 = 1_800_000_000;
/// Decoder state beyond the configured limits (struct sizes, a drained buffer's capacity).
const HEAP_SLACK_BYTES: usize = 64 * 1024;

fn keys() -> &'static KeySet {
    static K: OnceLock<KeySet> = OnceLock::new();
    K.get_or_init(|| KeySet::parse(KEY).expect("fuzz key"))
}

fuzz_target!(|data: &[u8]| {
    let [mode, chunk, stream @ ..] = data else {
        return;
    };
    let transport = if mode & 1 == 0 {
        Transport::Tcp
    } else {
        Transport::Ws
    };
    let limits = Limits::default();
    let heap_max = limits.frame_bytes_max as usize
        + limits.ws_message_bytes_max
        + limits.ws_handshake_bytes_max
        + HEAP_SLACK_BYTES;
    let ctx = Ctx {
        limits: &limits,
        keys: keys(),
        now_s: NOW_S,
    };
    let mut s = Session::new(transport, &limits);
    let size = if *chunk == 0 {
        stream.len().max(1)
    } else {
        *chunk as usize
    };
    let mut out = Vec::new();
    let mut closed = false;
    for piece in stream.chunks(size) {
        out.clear();
        s.on_bytes(piece, &ctx, &mut out);
        if closed {
            assert!(out.is_empty(), "actions after Close: {out:?}");
        }
        let closes = out
            .iter()
            .filter(|a| matches!(a, Action::Close { .. }))
            .count();
        assert!(closes <= 1, "closed twice in one call");
        if closes == 1 {
            assert!(
                matches!(out.last(), Some(Action::Close { .. })),
                "Close is the last action"
            );
            assert!(s.is_closed());
            closed = true;
        }
        assert!(s.heap_bytes() <= heap_max, "heap {} > {heap_max}", s.heap_bytes());
    }
});
