//! Unit tests of the shard core with virtual time.

use super::harness::*;
use super::*;
use proto::packet::op;

const TICK_MS: u64 = 50;

#[test]
fn silent_viewer_closed_after_heartbeat_timeout_and_heartbeat_keeps_it() {
    let mut h = Harness::new(config());
    let hb = h.node.config.heartbeat_timeout_ms;
    let id = h.viewer(1, 7);
    h.advance(hb - 1_000, TICK_MS);
    h.send(id, &heartbeat_packet());
    let f = h.flush(id);
    let p = packets(&f.bytes);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].0, op::HEARTBEAT_REPLY);
    assert_eq!(p[0].2, 1u32.to_be_bytes(), "online count of room 7 is 1");
    // The heartbeat moved the deadline: past the first deadline it is still open.
    h.advance(2_000, TICK_MS);
    assert!(!h.core.must_close(id));
    assert_eq!(h.closes(CloseReason::HeartbeatTimeout), 0);
    h.advance(hb, TICK_MS);
    assert_eq!(h.closes(CloseReason::HeartbeatTimeout), 1);
    assert!(h.ready().contains(&id), "the shell is told to act");
    assert!(h.flush(id).closed);
    assert_eq!(h.core.len(), 0);
    assert_eq!(h.core.seated(), 0);
}

/// The shard clock once was a `u32` of milliseconds: after 2^32 ms (49.7 days) a silent
/// connection re-armed its heartbeat timer forever and was never closed.
#[test]
fn heartbeat_timeout_across_the_u32_millisecond_wrap() {
    let mut h = Harness::new(config());
    let hb = h.node.config.heartbeat_timeout_ms;
    h.jump((1u64 << 32) - 2_000);
    let id = h.viewer(1, 7);
    h.advance(hb + 500, TICK_MS);
    assert!(h.ms() > 1u64 << 32, "the clock crossed 2^32 ms");
    assert_eq!(h.closes(CloseReason::HeartbeatTimeout), 1);
    assert!(h.flush(id).closed);
}

#[test]
fn unauthenticated_connection_closed_at_auth_deadline() {
    let mut h = Harness::new(config());
    let id = h.accept(Transport::Tcp);
    h.advance(h.node.config.auth_ms_max - TICK_MS, TICK_MS);
    assert!(!h.core.must_close(id));
    h.advance(2 * TICK_MS, TICK_MS);
    assert_eq!(h.closes(CloseReason::AuthTimeout), 1);
    assert!(h.flush(id).closed);
    assert_eq!(h.metrics().pending_handshakes.get(), 0);
}

#[test]
fn reader_that_stops_reading_is_dropped_then_closed_as_stuck() {
    let mut cfg = config();
    cfg.send_queue_bytes_max = 2_000;
    let stuck = cfg.stuck_ms_max;
    let mut h = Harness::new(cfg);
    let slow = h.viewer(1, 7);
    let fast = h.viewer(2, 7);
    // The slow reader's writer takes one write and never completes it.
    let mut bufs = Vec::new();
    for seq in 1..=10 {
        h.core
            .on_msg(Msg::Batch(Arc::new(room_batch(7, seq, 300))), h.now);
        if seq == 1 {
            assert_eq!(h.core.take_transmit(slow, &mut bufs), Transmit::Write);
        }
        h.flush(fast);
    }
    assert!(h.metrics().drops_of(DropReason::QueueFull) > 0);
    assert!(h.core.queued_bytes(slow) <= 2_000);
    h.advance(stuck - TICK_MS, TICK_MS);
    assert_eq!(h.closes(CloseReason::Stuck), 0);
    h.advance(3 * TICK_MS, TICK_MS);
    assert_eq!(h.closes(CloseReason::Stuck), 1);
    assert!(
        h.core.must_close(slow),
        "a hard close, even with a write in flight"
    );
    assert!(!h.core.must_close(fast));
    assert_eq!(h.core.room_len(RoomId(7)), 1);
}

#[test]
fn close_that_cannot_flush_is_forced_after_close_flush_ms_max() {
    let mut h = Harness::new(config());
    let id = h.accept(Transport::Ws);
    h.send(
        id,
        b"GET /other HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    assert_eq!(h.closes(CloseReason::BadPath), 1);
    // The 404 is queued; the writer takes it and never finishes.
    let mut bufs = Vec::new();
    assert_eq!(h.core.take_transmit(id, &mut bufs), Transmit::Write);
    assert!(!h.core.must_close(id));
    h.advance(CLOSE_FLUSH_MS_MAX + 2 * TICK_MS, TICK_MS);
    assert!(h.core.must_close(id));
}

#[test]
fn drain_closes_gradually_with_close_frames() {
    let mut cfg = config();
    cfg.drain_close_per_s = 40; // 2 per 50 ms tick
    let mut h = Harness::new(cfg);
    let ids: Vec<ConnId> = (0..6).map(|u| h.viewer(u + 1, 7)).collect();
    h.core.start_drain();
    assert!(matches!(
        h.core
            .on_accept(Transport::Tcp, "10.0.0.2".parse().unwrap(), h.now),
        Err(Refused {
            reason: CloseReason::Shutdown,
            ..
        })
    ));
    h.advance(TICK_MS, TICK_MS);
    assert_eq!(
        h.closes(CloseReason::Shutdown),
        2 + 1,
        "two drained, one refused"
    );
    h.advance(2 * TICK_MS, TICK_MS);
    assert_eq!(h.closes(CloseReason::Shutdown), 6 + 1);
    for id in ids {
        assert!(h.flush(id).closed);
    }
    assert!(h.core.is_empty());
}

#[test]
fn refuses_at_capacity_with_a_reconnect_hint() {
    let mut h = Harness::with_capacity(config(), 2);
    h.viewer(1, 7);
    h.accept(Transport::Tcp);
    let r = h
        .core
        .on_accept(Transport::Tcp, "10.0.0.3".parse().unwrap(), h.now)
        .expect_err("over capacity");
    assert_eq!(r.reason, CloseReason::Capacity);
    let p = packets(&r.bytes);
    assert_eq!(p[0].0, op::AUTH_REPLY);
    let body: serde_json::Value = serde_json::from_slice(&p[0].2).unwrap();
    assert_eq!(body["code"], AUTH_RETRY_LATER);
    assert_eq!(body["retry_after_s"], REFUSE_RETRY_S);
    let ws = h
        .core
        .on_accept(Transport::Ws, "10.0.0.3".parse().unwrap(), h.now)
        .expect_err("over capacity");
    let head = String::from_utf8(ws.bytes).unwrap();
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(head.contains("Retry-After: 5\r\n"), "{head}");
    assert_eq!(h.closes(CloseReason::Capacity), 2);
}

#[test]
fn per_address_cap() {
    let mut cfg = config();
    cfg.conns_per_addr_max = 2;
    let mut h = Harness::new(cfg);
    let a: IpAddr = "10.0.0.9".parse().unwrap();
    let b: IpAddr = "10.0.0.10".parse().unwrap();
    let x = h.core.on_accept(Transport::Tcp, a, h.now).unwrap();
    h.core.on_accept(Transport::Tcp, a, h.now).unwrap();
    let r = h.core.on_accept(Transport::Tcp, a, h.now).unwrap_err();
    assert_eq!(r.reason, CloseReason::AddrLimit);
    h.core.on_accept(Transport::Tcp, b, h.now).unwrap();
    h.core.on_closed(x, CloseReason::PeerClosed);
    h.core.on_accept(Transport::Tcp, a, h.now).unwrap();
}

#[test]
fn batches_fan_out_to_the_room_with_shared_bytes_and_interest_goes_to_the_link() {
    let mut h = Harness::new(config());
    let a = h.viewer(1, 7);
    let b = h.viewer(2, 7);
    let other = h.viewer(3, 8);
    let msgs = h.msgs();
    let subs: Vec<_> = msgs
        .iter()
        .filter_map(|(to, m)| match m {
            Msg::Interest { interest, set, .. } => Some((*to, interest.clone(), *set)),
            _ => None,
        })
        .collect();
    assert!(subs.contains(&(
        0,
        Interest::Room(RoomId(7)),
        EncodingSet::of(proto::id::Encoding::Plain)
    )));
    let batch = room_batch(7, 1, 100);
    h.core.on_msg(Msg::Batch(Arc::new(batch.clone())), h.now);
    let ready = h.ready();
    assert!(ready.contains(&a) && ready.contains(&b) && !ready.contains(&other));
    let mut ba = Vec::new();
    let mut bb = Vec::new();
    h.core.take_transmit(a, &mut ba);
    h.core.take_transmit(b, &mut bb);
    assert_eq!(ba[0].as_ptr(), bb[0].as_ptr(), "one buffer, shared");
    assert_eq!(&ba[0][..], &batch.packet[..]);
    assert_eq!(h.metrics().sends.get(), 2);
    // Leaving the last viewer of room 8 tells the link (empty set = UNSUB).
    h.core.on_closed(other, CloseReason::PeerClosed);
    assert!(h.msgs().iter().any(|(_, m)| matches!(m,
        Msg::Interest { interest: Interest::Room(RoomId(8)), set, .. } if set.is_empty())));
}

#[test]
fn queued_batches_go_out_in_one_transmit() {
    let mut h = Harness::new(config());
    let a = h.viewer(1, 7);
    for seq in 1..=5 {
        h.core
            .on_msg(Msg::Batch(Arc::new(room_batch(7, seq, 50))), h.now);
    }
    let mut bufs = Vec::new();
    assert_eq!(h.core.take_transmit(a, &mut bufs), Transmit::Write);
    assert_eq!(bufs.len(), 5);
    assert_eq!(
        h.metrics().writes.get(),
        2,
        "the auth reply, then five batches in one"
    );
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    assert_eq!(h.core.take_transmit(a, &mut Vec::new()), Transmit::Idle);
    // A partial write leaves the rest accounted.
    h.core.on_written(a, total - 10);
    assert_eq!(h.core.queued_bytes(a), 10);
}

#[test]
fn counts_reported_to_the_link_shard_every_interval() {
    let mut h = Harness::new(config());
    h.viewer(1, 7);
    h.viewer(2, 7);
    h.msgs();
    h.advance(h.node.config.counts_interval_ms + TICK_MS, TICK_MS);
    let counts: Vec<_> = h
        .msgs()
        .into_iter()
        .filter_map(|(to, m)| match m {
            Msg::Counts { counts, .. } => Some((to, counts)),
            _ => None,
        })
        .collect();
    assert_eq!(counts, vec![(0, vec![(RoomId(7), 2)])]);
}

#[test]
fn poll_timeout_is_never_later_than_the_next_tick_with_timers() {
    let mut h = Harness::new(config());
    h.accept(Transport::Tcp);
    let at = h.core.poll_timeout();
    assert!(at <= h.now + Duration::from_millis(TICK_MS));
}

/// Issue 9, priority isolation: a high-priority batch goes ahead of the low-priority batches
/// already queued for a connection (behind earlier high ones), never into a write in flight.
#[test]
fn high_priority_batches_overtake_queued_low_priority_ones() {
    let mut h = Harness::new(config());
    let id = h.viewer(1, 7);
    h.flush(id);
    h.core
        .on_msg(Msg::Batch(Arc::new(room_batch(7, 1, 100))), h.now);
    // The writer takes batch 1 and has not finished it when the rest arrives.
    let mut bufs = Vec::new();
    assert_eq!(h.core.take_transmit(id, &mut bufs), Transmit::Write);
    let in_flight: usize = bufs.iter().map(|b| b.len()).sum();
    for seq in 2..=4 {
        h.core
            .on_msg(Msg::Batch(Arc::new(room_batch(7, seq, 100))), h.now);
    }
    for seq in [101, 102] {
        let mut b = room_batch(7, seq, 10);
        b.priority = Priority::High;
        h.core.on_msg(Msg::Batch(Arc::new(b)), h.now);
    }
    h.core.on_written(id, in_flight);
    let seqs: Vec<u32> = packets(&h.flush(id).bytes).iter().map(|p| p.1).collect();
    assert_eq!(seqs, [101, 102, 2, 3, 4]);
}
