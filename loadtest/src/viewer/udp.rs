//! UDP viewers (`--transport udp`, docs/protocol-udp.md): the cookie handshake, then every data
//! datagram decoded alone into the same events a stream viewer produces, heartbeats every
//! `min(heartbeat_ms, UDP_HEARTBEAT_MS)`, a cookie from the edge (our address changed)
//! answered with the next heartbeat, and a bye (op 1004) when the connection or the run ends.
//! `udp_loss_pct` drops received data datagrams before they are decoded: losses then show as
//! missing messages and gaps, the way a lossy network would.
//!
//! Invariants: the handshake is bounded (`connect_timeout_ms`, at most `HANDSHAKE_TRIES_MAX`
//! sends of each step); a datagram that does not decode is counted and dropped, it never ends
//! the session.

use super::*;
use proto::udp::{self as wire, ServerDatagram};

/// Sends of each handshake step before giving up (within `connect_timeout_ms`).
const HANDSHAKE_TRIES_MAX: u32 = 4;
/// Largest datagram read (an edge sends at most `udp_payload_bytes_max`, 1200 by default).
const DATAGRAM_BYTES_MAX: usize = 65_536;

/// Decodes one data part into events: its container holds whole inner packets (docs/
/// protocol-udp.md), so a part decodes without the others of its batch.
pub fn part_events(
    part: &wire::Part<'_>,
    cache: &mut DecodeCache,
    cache_on: bool,
    out: &mut Vec<Event>,
) -> Result<(), &'static str> {
    if part.flags & wire::part_flag::TOO_LARGE != 0 {
        // A message larger than a datagram is not sent over UDP: a visible loss.
        return Ok(());
    }
    let mut rest = part.container;
    while !rest.is_empty() {
        let (p, used) = packet::decode(rest, FRAME_BYTES_MAX).map_err(|_| "bad_packet")?;
        handle_packet(p.ver, p.op, p.seq, p.body, cache, cache_on, out)?;
        rest = &rest[used..];
    }
    Ok(())
}

async fn bind(spec: &ConnSpec, dst: SocketAddr) -> Result<monoio::net::udp::UdpSocket, Fail> {
    let source = if spec.source.is_unspecified() {
        match dst {
            SocketAddr::V4(_) => IpAddr::from([0, 0, 0, 0]),
            SocketAddr::V6(_) => IpAddr::from([0u16; 8]),
        }
    } else {
        spec.source
    };
    let sock = monoio::net::udp::UdpSocket::bind(SocketAddr::new(source, 0))
        .map_err(|e| io_label("udp_bind", &e))?;
    // Connected: the kernel drops datagrams from any other source.
    sock.connect(dst)
        .await
        .map_err(|e| io_label("udp_connect", &e))?;
    Ok(sock)
}

/// Sends `d` and waits for an answer `pick` takes, resending up to `HANDSHAKE_TRIES_MAX` times.
async fn exchange<T>(
    sock: &monoio::net::udp::UdpSocket,
    d: Vec<u8>,
    retry: Duration,
    mut pick: impl FnMut(ServerDatagram<'_>) -> Option<Result<T, Fail>>,
) -> Result<T, Fail> {
    for _ in 0..HANDSHAKE_TRIES_MAX {
        let (r, _) = sock.send(d.clone()).await;
        r.map_err(|e| io_label("udp_send", &e))?;
        let until = Instant::now() + retry;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // A recv dropped on timeout may lose a datagram: harmless here, the step is resent.
            let recv = sock.recv(Vec::with_capacity(DATAGRAM_BYTES_MAX));
            let Ok((r, buf)) = monoio::time::timeout(left, recv).await else {
                break;
            };
            let n = r.map_err(|e| io_label("udp_recv", &e))?;
            if let Ok(sd) = wire::decode_server(&buf[..n], DATAGRAM_BYTES_MAX) {
                if let Some(done) = pick(sd) {
                    return done;
                }
            }
        }
    }
    Err("udp_no_answer".into())
}

/// Ticket, cookie, auth: the session id, within the connect timeout.
async fn open(
    ctx: &Ctx,
    spec: &ConnSpec,
) -> Result<(monoio::net::udp::UdpSocket, wire::SessionId), Fail> {
    let ticket = ticket_for(ctx, spec.room, spec.uid).await?;
    let mut edges: Vec<&client::Edge> = ticket.edges.iter().filter(|e| e.udp_port != 0).collect();
    if ctx.cfg.spread_edges {
        edges.sort_by(|a, b| (&a.host, a.udp_port).cmp(&(&b.host, b.udp_port)));
    }
    let edge = edges
        .get(if ctx.cfg.spread_edges {
            spec.edge_pick as usize % edges.len().max(1)
        } else {
            0
        })
        .copied()
        .ok_or("edge_no_udp_port")?;
    let ip = edge
        .host
        .parse::<IpAddr>()
        .map_err(|_| "edge_host_not_an_ip")?;
    let dst = SocketAddr::new(ip, edge.udp_port);
    if !is_loopback_or_allowed(&dst, ctx.cfg.allow_remote) {
        return Err("edge_not_loopback".into());
    }
    let t0 = Instant::now();
    let timeout = Duration::from_millis(ctx.cfg.connect_timeout_ms);
    let retry = timeout / (2 * HANDSHAKE_TRIES_MAX).max(1);
    let fut = async {
        let sock = bind(spec, dst).await?;
        let uid = if ctx.cfg.control_key.is_some() {
            spec.uid
        } else {
            0
        };
        let device = format!("LT{:016X}", spec.uid);
        let auth = proto::auth::auth_request(&client::auth_body(
            uid,
            spec.room,
            ctx.cfg.protover,
            &ticket.token,
            &device,
        ));
        // An unvalidated address gets a cookie (no larger than what we sent), then op 8.
        let cookie = exchange(&sock, auth.clone(), retry, |sd| match sd {
            ServerDatagram::Cookie(c) => Some(Ok(c)),
            _ => None,
        })
        .await?;
        let mut hello = wire::cookie_datagram(&cookie);
        hello.extend_from_slice(&auth);
        let session = exchange(&sock, hello, retry, |sd| match sd {
            ServerDatagram::AuthReply { body, session } => {
                let code = serde_json::from_slice::<serde_json::Value>(body)
                    .ok()
                    .and_then(|j| j.get("code").and_then(|c| c.as_i64()))
                    .unwrap_or(i64::MIN);
                Some(match (code, session) {
                    (0, Some(s)) => Ok(s),
                    (0, None) => Err("udp_auth_without_session".into()),
                    (c, _) => Err(format!("auth_code_{c}")),
                })
            }
            _ => None,
        })
        .await?;
        Ok::<_, Fail>((sock, session))
    };
    let out = match monoio::time::timeout(timeout, fut).await {
        Ok(r) => r?,
        Err(_) => return Err("auth_timeout".into()),
    };
    let mut w = ctx.window.borrow_mut();
    w.connect.record_us(t0.elapsed().as_micros() as u64);
    w.connects_ok += 1;
    Ok(out)
}

/// One UDP viewer, start to end.
pub async fn run(ctx: Rc<Ctx>, idx: usize, spec: ConnSpec, hold_for: Option<Duration>) {
    let (sock, session) = match open(&ctx, &spec).await {
        Ok(x) => x,
        Err(why) => {
            ctx.window.borrow_mut().fail(why);
            return;
        }
    };
    if let Some(c) = ctx.conns.borrow_mut().get_mut(idx) {
        c.open = true;
        if !ctx.shared.publishing.load(Ordering::Acquire) {
            c.tracker = Some(SeqTracker::starting_at(0));
        }
    }
    ctx.live.set(ctx.live.get() + 1);
    let sock = Rc::new(sock);
    ctx.udp_sessions
        .borrow_mut()
        .insert(idx, (sock.clone(), session));
    let closed = Rc::new(CloseSignal::default());
    // A cookie from the edge: the next heartbeat carries it (NAT rebinding proof), sent now.
    let challenge: Rc<RefCell<Option<wire::Cookie>>> = Rc::default();
    let kick = Rc::new(CloseSignal::default());
    {
        let (ctx, sock, closed, challenge, kick) = (
            ctx.clone(),
            sock.clone(),
            closed.clone(),
            challenge.clone(),
            kick.clone(),
        );
        monoio::spawn(async move {
            let every =
                Duration::from_millis(ctx.cfg.heartbeat_ms.clamp(1, wire::UDP_HEARTBEAT_MS));
            loop {
                kick.closed.set(false);
                let _ = kick.sleep_or_closed(every).await;
                if closed.closed.get() || ctx.shared.stop.load(Ordering::Relaxed) {
                    return;
                }
                let proof = challenge.borrow_mut().take();
                let d = wire::session_datagram(
                    session,
                    proof.as_ref(),
                    &proto::auth::heartbeat_request(),
                );
                if sock.send(d).await.0.is_err() {
                    return;
                }
            }
        });
    }
    let loss = ctx.cfg.udp_loss_pct / 100.0;
    let mut rng = SplitMix64::new(spec.uid ^ 0x0dd5_eed5);
    let deadline = hold_for.map(|d| Instant::now() + d);
    let mut events = Vec::new();
    let mut buf = Vec::with_capacity(DATAGRAM_BYTES_MAX);
    loop {
        let recv = sock.recv(buf);
        let (r, b) = match deadline {
            Some(d) => {
                match monoio::time::timeout(d.saturating_duration_since(Instant::now()), recv).await
                {
                    Ok(x) => x,
                    Err(_) => break,
                }
            }
            None => recv.await,
        };
        buf = b;
        let n = match r {
            Ok(n) => n,
            Err(e) => {
                // An ICMP error (the edge's port closed) reads as ECONNREFUSED on a connected
                // socket: the session is over.
                if !ctx.shared.stop.load(Ordering::Relaxed) {
                    ctx.window.borrow_mut().disconnect(io_label("udp_recv", &e));
                }
                break;
            }
        };
        let now = unix_us();
        ctx.window.borrow_mut().bytes_read += n as u64;
        match wire::decode_server(&buf[..n], DATAGRAM_BYTES_MAX) {
            Ok(ServerDatagram::Data(part)) => {
                // Uniform in [0, 1): 53 random bits.
                let roll = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                if loss > 0.0 && roll < loss {
                    ctx.window.borrow_mut().udp_dropped += 1;
                } else {
                    let r = part_events(
                        &part,
                        &mut ctx.cache.borrow_mut(),
                        ctx.cfg.decode_cache,
                        &mut events,
                    );
                    if r.is_err() {
                        ctx.window.borrow_mut().udp_bad += 1;
                    }
                }
            }
            Ok(ServerDatagram::HeartbeatReply(n)) => events.push(Event::HeartbeatReply(n)),
            Ok(ServerDatagram::Cookie(c)) => {
                *challenge.borrow_mut() = Some(c);
                kick.close();
            }
            Ok(ServerDatagram::AuthReply { .. }) | Ok(ServerDatagram::Bye) => {}
            Err(_) => ctx.window.borrow_mut().udp_bad += 1,
        }
        apply(&ctx, idx, &mut events, now);
        buf.clear();
        if ctx.shared.stop.load(Ordering::Relaxed) {
            break;
        }
    }
    closed.close();
    kick.close();
    // The end of a held connection (churn) or of the run: the edge frees the session now, so
    // a later viewer on this address and port starts afresh. Best effort, one datagram.
    if ctx.udp_sessions.borrow_mut().remove(&idx).is_some() {
        let _ = sock.send(wire::bye_datagram(session)).await;
    }
    conn_closed(&ctx, idx);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::container::BrotliParams;
    use proto::id::Encoding;

    #[test]
    fn every_part_of_a_split_batch_decodes_alone_into_its_messages() {
        let mut run = Vec::new();
        // Pseudo-random padding: zlib must not fold the run into one datagram.
        let mut rng = SplitMix64::new(3);
        for seq in 0..40u64 {
            let body = format!(
                r#"{{"cmd":"DANMU_MSG","pad":"{}","lt":{{"ts_us":{},"seq":{seq}}}}}"#,
                (0..20)
                    .map(|_| format!("{:x}", rng.next_u64()))
                    .collect::<String>(),
                1_700_000_000_000_000u64 + seq,
            );
            packet::encode(ver::PLAIN, op::NOTIFICATION, 0, body.as_bytes(), &mut run);
        }
        for enc in [Encoding::Plain, Encoding::Zlib] {
            let parts = wire::split_batch(
                &run,
                enc,
                9,
                wire::UDP_PAYLOAD_BYTES_MAX,
                BrotliParams::default(),
            )
            .expect("split");
            assert!(parts.len() > 1, "{enc:?}: {} parts", parts.len());
            let mut cache = DecodeCache::default();
            let mut got = Vec::new();
            // Decoded in reverse order: no part needs another.
            for d in parts.iter().rev() {
                let Ok(ServerDatagram::Data(p)) =
                    wire::decode_server(d, wire::UDP_PAYLOAD_BYTES_MAX)
                else {
                    panic!("not a data datagram");
                };
                let mut ev = Vec::new();
                part_events(&p, &mut cache, true, &mut ev).expect("decodes");
                got.extend(ev.into_iter().filter_map(|e| match e {
                    Event::Message { seq, .. } => Some(seq),
                    _ => None,
                }));
            }
            got.sort_unstable();
            assert_eq!(got, (0..40).collect::<Vec<_>>(), "{enc:?}");
        }
    }
}
