//! Golden bytes for every datagram, the cookie against an independent HMAC (Python's `hmac`),
//! the admission rules, the split, and properties: splits decode back to the batch; nothing
//! answers an unvalidated address with more bytes than it sent; no input panics.

use super::*;
use crate::auth;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const SECRET: &[u8] = b"barrage-udp-test";
const NOW_S: u64 = 1_700_000_000;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn addr(last: u8, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)), port)
}

fn key() -> CookieKey {
    CookieKey::new(SECRET)
}

const AUTH_BODY: &[u8] =
    br#"{"uid":7,"roomid":21514463,"protover":3,"platform":"udp","type":2,"key":"t"}"#;

#[test]
fn cookie_mac_matches_an_independent_hmac() {
    // python3: hmac.new(b"barrage-udp-test", b"\x04" + be32(170000000) + 127.0.0.1 + be16(40000),
    //          sha256).digest()[:16]
    let c = key().mint(addr(1, 40000), NOW_S);
    assert_eq!(c.bucket, 0x0a21_fe80);
    assert_eq!(hex(&c.mac), "750c700a4983bb83c00238f3a124f8bc");
    // Session: hmac(secret, b"session\0" + cookie body)[:6], shard 3 on top.
    let s = key().session_of(&c, 3);
    assert_eq!(s.0, 0x0003_7f51_7332_5d90);
    assert_eq!(s.shard(), 3);
}

#[test]
fn golden_datagrams() {
    let cookie = Cookie {
        bucket: 0x0a21_fe80,
        mac: [0x11; 16],
    };
    assert_eq!(
        hex(&cookie_datagram(&cookie)),
        "00000024001000010000 03e9 00000001 0a21fe80 11111111111111111111111111111111"
            .replace(' ', "")
    );
    let session = SessionId(0x0003_7f51_7332_5d90);
    assert_eq!(
        hex(&hello_ok(session)),
        "0000001a00100001000000080000000 1 7b22636f6465223a307d 0000001800100001000003ea00000001 00037f5173325d90"
            .replace(' ', "")
    );
    assert_eq!(
        hex(&hello_refused()),
        "0000001d001000010000000800000001 7b22636f6465223a2d3130317d".replace(' ', "")
    );
    let hb = session_datagram(session, None, &auth::heartbeat_request());
    assert_eq!(
        &hex(&hb)[..48],
        "0000001800100001000003ea0000000100037f5173325d90"
    );
    assert_eq!(&hb[24..], &auth::heartbeat_request()[..]);
    let hello = hello_datagram(Some(&cookie), AUTH_BODY);
    assert_eq!(&hello[..36], &cookie_datagram(&cookie)[..]);
    assert_eq!(
        &hex(&hello[36..52]),
        &format!("{:08x}001000010000000700000001", 16 + AUTH_BODY.len())
    );
    // A one-part plain batch: part 0 of 1, then the packet with the room seq 42.
    let inner = packet::encode_vec(ver::PLAIN, op::NOTIFICATION, 0, br#"{"cmd":"X"}"#);
    let d = split_batch(
        &inner,
        Encoding::Plain,
        42,
        UDP_PAYLOAD_BYTES_MAX,
        BrotliParams::default(),
    )
    .unwrap();
    assert_eq!(d.len(), 1);
    assert_eq!(
        hex(&d[0]),
        "00000016001000010000 03eb 0000002a 0000 0001 0000 0000001b00100000000000050000002a 7b22636d64223a2258227d"
            .replace(' ', "")
    );
}

#[test]
fn docs_examples_are_the_codec() {
    // Every hex block of docs/protocol-udp.md tagged `udp-example <name>` must be what the
    // codec makes (or accepts) for that name.
    let doc = include_str!("../../../docs/protocol-udp.md");
    let mut found = 0;
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line
            .strip_prefix("<!-- udp-example ")
            .and_then(|l| l.strip_suffix(" -->"))
        else {
            continue;
        };
        assert_eq!(lines.next(), Some("```text"));
        let mut hexes = String::new();
        for l in lines.by_ref() {
            if l == "```" {
                break;
            }
            // Each line: hex groups, then two spaces and a comment.
            hexes.push_str(l.split("  ").next().unwrap_or(""));
        }
        let got = unhex(&hexes);
        let want = example(name);
        assert_eq!(hex(&got), hex(&want), "example {name}");
        found += 1;
    }
    assert_eq!(found, 9, "every datagram has its example");
}

/// The datagrams the docs show, made by the codec.
fn example(name: &str) -> Vec<u8> {
    let k = key();
    let client = addr(1, 40000);
    let cookie = k.mint(client, NOW_S);
    let session = k.session_of(&cookie, 0);
    let auth_body = br#"{"uid":7,"roomid":1,"protover":3,"key":"<token>","buvid":"dev-1"}"#;
    match name {
        "hello" => hello_datagram(None, auth_body),
        "cookie" => cookie_datagram(&cookie),
        "hello-cookie" => hello_datagram(Some(&cookie), auth_body),
        "hello-ok" => hello_ok(session),
        "heartbeat" => session_datagram(session, None, &auth::heartbeat_request()),
        "heartbeat-reply" => auth::heartbeat_reply(1234).to_vec(),
        "bye" => bye_datagram(session),
        "bye-reply" => bye_reply(),
        "data" => {
            let inner = packet::encode_vec(
                ver::PLAIN,
                op::NOTIFICATION,
                0,
                br#"{"cmd":"DANMU_MSG","info":[[0],"hi",[7,"u"]]}"#,
            );
            split_batch(
                &inner,
                Encoding::Plain,
                42,
                UDP_PAYLOAD_BYTES_MAX,
                BrotliParams::default(),
            )
            .unwrap()
            .remove(0)
        }
        other => panic!("no example {other}"),
    }
}

#[test]
fn cookies_bind_address_and_time() {
    let k = key();
    let a = addr(1, 40000);
    let c = k.mint(a, NOW_S);
    assert_eq!(k.verify(&c, a, NOW_S), Ok(()));
    assert_eq!(
        k.verify(&c, a, NOW_S + UDP_COOKIE_BUCKET_S),
        Ok(()),
        "next bucket"
    );
    assert_eq!(
        k.verify(&c, a, NOW_S + 2 * UDP_COOKIE_BUCKET_S),
        Err(CookieError::Expired)
    );
    assert_eq!(
        k.verify(&c, a, NOW_S - UDP_COOKIE_BUCKET_S),
        Err(CookieError::Expired),
        "from the future"
    );
    assert_eq!(
        k.verify(&c, addr(1, 40001), NOW_S),
        Err(CookieError::Forged)
    );
    assert_eq!(
        k.verify(&c, addr(2, 40000), NOW_S),
        Err(CookieError::Forged)
    );
    let mut bumped = c;
    bumped.bucket += 1;
    assert_eq!(k.verify(&bumped, a, NOW_S), Err(CookieError::Forged));
    assert_eq!(
        CookieKey::new(b"other").verify(&c, a, NOW_S),
        Err(CookieError::Forged)
    );
    let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 40000);
    let c6 = k.mint(v6, NOW_S);
    assert_eq!(k.verify(&c6, v6, NOW_S), Ok(()));
    assert_ne!(c6.mac, c.mac);
}

#[test]
fn admission_walks_the_handshake_and_a_rebinding() {
    let k = key();
    let client = addr(1, 40000);
    let none = |_: SessionId| None;
    // 1. Hello without a cookie: a cookie back, no larger than the hello.
    let hello = hello_datagram(None, AUTH_BODY);
    let Admit::Reply(reply) = admit(&k, &hello, client, none, 0, NOW_S, UDP_PAYLOAD_BYTES_MAX)
    else {
        panic!("want a cookie");
    };
    assert!(reply.len() <= hello.len());
    let ServerDatagram::Cookie(cookie) = decode_server(&reply, UDP_PAYLOAD_BYTES_MAX).unwrap()
    else {
        panic!("want a cookie datagram");
    };
    // 2. The echo opens a session; a retransmission names the same one.
    let hello2 = hello_datagram(Some(&cookie), AUTH_BODY);
    let Admit::Auth { session, auth } = admit(
        &k,
        &hello2,
        client,
        none,
        5,
        NOW_S + 1,
        UDP_PAYLOAD_BYTES_MAX,
    ) else {
        panic!("want auth");
    };
    assert_eq!(auth.body, AUTH_BODY);
    assert_eq!(session.shard(), 5);
    assert!(matches!(
        admit(&k, &hello2, client, none, 5, NOW_S + 2, UDP_PAYLOAD_BYTES_MAX),
        Admit::Auth { session: s, .. } if s == session
    ));
    // The same echo from another address is forged.
    assert_eq!(
        admit(
            &k,
            &hello2,
            addr(9, 40000),
            none,
            5,
            NOW_S,
            UDP_PAYLOAD_BYTES_MAX
        ),
        Admit::Drop(Dropped::Forged)
    );
    // Too late: a fresh cookie instead.
    assert!(matches!(
        admit(
            &k,
            &hello2,
            client,
            none,
            5,
            NOW_S + 3 * UDP_COOKIE_BUCKET_S,
            UDP_PAYLOAD_BYTES_MAX
        ),
        Admit::Reply(_)
    ));
    // 3. Session datagrams from the session's address are served.
    let table = |s: SessionId| (s == session).then_some(client);
    let hb = session_datagram(session, None, &auth::heartbeat_request());
    let Admit::Requests { requests, .. } =
        admit(&k, &hb, client, table, 5, NOW_S, UDP_PAYLOAD_BYTES_MAX)
    else {
        panic!("want requests");
    };
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].op, op::HEARTBEAT);
    assert_eq!(
        admit(
            &k,
            &session_datagram(SessionId(1), None, &[]),
            client,
            table,
            5,
            NOW_S,
            UDP_PAYLOAD_BYTES_MAX
        ),
        Admit::Drop(Dropped::UnknownSession)
    );
    // 4. NAT rebinding: a new port is challenged, its echo moves the session.
    let moved = addr(1, 50000);
    let Admit::Reply(challenge) = admit(&k, &hb, moved, table, 5, NOW_S, UDP_PAYLOAD_BYTES_MAX)
    else {
        panic!("want a challenge");
    };
    assert!(challenge.len() <= hb.len());
    let ServerDatagram::Cookie(c2) = decode_server(&challenge, UDP_PAYLOAD_BYTES_MAX).unwrap()
    else {
        panic!("want a cookie datagram");
    };
    let proof = session_datagram(session, Some(&c2), &auth::heartbeat_request());
    assert!(matches!(
        admit(&k, &proof, moved, table, 5, NOW_S, UDP_PAYLOAD_BYTES_MAX),
        Admit::Migrate { session: s, ref requests } if s == session && requests.len() == 1
    ));
    // The old address's cookie proves nothing for the new one.
    let wrong = session_datagram(session, Some(&cookie), &[]);
    assert_eq!(
        admit(&k, &wrong, moved, table, 5, NOW_S, UDP_PAYLOAD_BYTES_MAX),
        Admit::Drop(Dropped::Forged)
    );
}

#[test]
fn a_bye_ends_only_a_session_its_sender_proves() {
    let k = key();
    let client = addr(1, 40000);
    let session = k.session_of(&k.mint(client, NOW_S), 0);
    let table = |s: SessionId| (s == session).then_some(client);
    let max = UDP_PAYLOAD_BYTES_MAX;
    let bye = bye_datagram(session);
    assert_eq!(bye.len(), 40);
    assert_eq!(
        admit(&k, &bye, client, table, 0, NOW_S, max),
        Admit::Bye { session }
    );
    // A wrong session id: unknown, dropped.
    let other = bye_datagram(SessionId(session.0 ^ 1));
    assert_eq!(
        admit(&k, &other, client, table, 0, NOW_S, max),
        Admit::Drop(Dropped::UnknownSession)
    );
    // From another address: challenged (a spoofer never gets the cookie), not ended; with the
    // old address's cookie: forged; with a cookie minted for it (the client rebound): ended.
    let moved = addr(1, 50000);
    let Admit::Reply(challenge) = admit(&k, &bye, moved, table, 0, NOW_S, max) else {
        panic!("want a challenge");
    };
    assert!(challenge.len() <= bye.len());
    let byes_with = |c: &Cookie| {
        session_datagram(
            session,
            Some(c),
            &packet::encode_vec(ver::HEARTBEAT, udp_op::BYE, 1, &[]),
        )
    };
    assert_eq!(
        admit(
            &k,
            &byes_with(&k.mint(client, NOW_S)),
            moved,
            table,
            0,
            NOW_S,
            max
        ),
        Admit::Drop(Dropped::Forged)
    );
    assert_eq!(
        admit(
            &k,
            &byes_with(&k.mint(moved, NOW_S)),
            moved,
            table,
            0,
            NOW_S,
            max
        ),
        Admit::Bye { session }
    );
    // The client reads the answer.
    assert_eq!(decode_server(&bye_reply(), max), Ok(ServerDatagram::Bye));
}

#[test]
fn a_hello_smaller_than_the_cookie_gets_no_answer() {
    // 16 + 12 = 28 bytes < the 36-byte cookie datagram.
    let tiny = hello_datagram(None, br#"{"roomid":1}"#);
    assert_eq!(
        admit(
            &key(),
            &tiny,
            addr(1, 1),
            |_| None,
            0,
            NOW_S,
            UDP_PAYLOAD_BYTES_MAX
        ),
        Admit::Drop(Dropped::ReplyTooLarge)
    );
    // A bare session datagram from a new address: 24 bytes, no challenge either.
    let session = SessionId(7);
    let bare = session_datagram(session, None, &[]);
    assert_eq!(
        admit(
            &key(),
            &bare,
            addr(1, 2),
            |_| Some(addr(1, 1)),
            0,
            NOW_S,
            UDP_PAYLOAD_BYTES_MAX
        ),
        Admit::Drop(Dropped::ReplyTooLarge)
    );
}

#[test]
fn decode_errors_stay_distinct() {
    let good = hello_datagram(None, AUTH_BODY);
    let max = UDP_PAYLOAD_BYTES_MAX;
    let err = |d: &[u8]| decode_client(d, max).unwrap_err();
    assert_eq!(err(&[]), DatagramError::Empty);
    assert_eq!(err(&good[..good.len() - 1]), DatagramError::Truncated);
    assert_eq!(err(&good[..10]), DatagramError::Truncated);
    let mut big = good.clone();
    big.resize(max + 1, b' ');
    assert_eq!(err(&big), DatagramError::Oversized);
    let mut hl = good.clone();
    hl[5] = 20;
    assert_eq!(err(&hl), DatagramError::HeaderLen);
    let mut short = good.clone();
    short[3] = 8;
    assert_eq!(err(&short), DatagramError::TooShort);
    let hb = auth::heartbeat_request();
    let five: Vec<u8> = hb.iter().copied().cycle().take(hb.len() * 5).collect();
    assert_eq!(err(&five), DatagramError::TooManyPackets);
    assert_eq!(
        err(&hb),
        DatagramError::Unexpected,
        "a heartbeat without a session"
    );
    let bad_cookie = packet::encode_vec(1, udp_op::COOKIE, 1, &[0; 5]);
    assert_eq!(err(&bad_cookie), DatagramError::BadBody);
    let bad_session = packet::encode_vec(1, udp_op::SESSION, 1, &[0; 7]);
    assert_eq!(err(&bad_session), DatagramError::BadBody);
    let mut two_auths = good.clone();
    two_auths.extend_from_slice(&good);
    assert_eq!(err(&two_auths), DatagramError::Unexpected);
    let mut auth_in_session = session_datagram(SessionId(1), None, &[]);
    auth_in_session.extend_from_slice(&good);
    assert_eq!(err(&auth_in_session), DatagramError::Unexpected);
    // Labels are distinct.
    let labels: std::collections::HashSet<_> = [
        DatagramError::Empty,
        DatagramError::Truncated,
        DatagramError::Oversized,
        DatagramError::HeaderLen,
        DatagramError::TooShort,
        DatagramError::TooManyPackets,
        DatagramError::Unexpected,
        DatagramError::BadBody,
    ]
    .iter()
    .map(|e| e.label())
    .collect();
    assert_eq!(labels.len(), 8);
}

/// A run of danmaku-like inner packets of the given body sizes.
fn batch(sizes: &[usize], salt: u64) -> Vec<u8> {
    let mut inner = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let mut body = format!(r#"{{"cmd":"DANMU_MSG","i":{i},"s":{salt},"info":""#).into_bytes();
        let words = [
            "hello",
            "666",
            "主播好",
            "gg",
            "哈哈哈",
            "nice",
            "up",
            "Lv20",
        ];
        let mut x = salt
            .wrapping_mul(6364136223846793005)
            .wrapping_add(i as u64);
        while body.len() + 2 < n {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            body.extend_from_slice(words[(x >> 60) as usize % words.len()].as_bytes());
            body.push(b' ');
        }
        body.extend_from_slice(b"\"}");
        packet::encode(ver::PLAIN, op::NOTIFICATION, 0, &body, &mut inner);
    }
    inner
}

/// Decodes every datagram alone and returns the inner packets in order; checks size, seq and
/// part numbering.
fn unsplit(
    datagrams: &[Vec<u8>],
    seq: u32,
    payload_max: usize,
) -> (Vec<packet::OwnedPacket>, Vec<u16>) {
    let mut out = Vec::new();
    let mut too_large = Vec::new();
    let parts = datagrams.len();
    for (i, d) in datagrams.iter().enumerate() {
        assert!(d.len() <= payload_max, "datagram {i} is {} bytes", d.len());
        let ServerDatagram::Data(p) = decode_server(d, payload_max).unwrap() else {
            panic!("want data");
        };
        assert_eq!(
            (p.seq, usize::from(p.part), usize::from(p.parts)),
            (seq, i, parts)
        );
        if p.flags & part_flag::TOO_LARGE != 0 {
            too_large.push(p.part);
            continue;
        }
        let (outer, used) = packet::decode(p.container, u32::MAX).unwrap();
        if outer.ver == ver::PLAIN {
            let mut at = 0;
            while at < p.container.len() {
                let (q, n) = packet::decode(&p.container[at..], u32::MAX).unwrap();
                assert_eq!(q.seq, seq);
                out.push(packet::OwnedPacket {
                    ver: q.ver,
                    op: q.op,
                    seq: 0,
                    body: q.body.to_vec(),
                });
                at += n;
            }
        } else {
            assert_eq!(used, p.container.len());
            assert_eq!(outer.seq, seq);
            let inner =
                container::unpack(outer.ver, outer.op, outer.seq, outer.body, 1 << 20).unwrap();
            out.extend(inner);
        }
    }
    (out, too_large)
}

fn packets_of(inner: &[u8]) -> Vec<packet::OwnedPacket> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < inner.len() {
        let (p, n) = packet::decode(&inner[at..], u32::MAX).unwrap();
        out.push(packet::OwnedPacket {
            ver: p.ver,
            op: p.op,
            seq: p.seq,
            body: p.body.to_vec(),
        });
        at += n;
    }
    out
}

#[test]
fn a_large_batch_splits_into_self_contained_datagrams() {
    // 40 danmaku of 300 B to 2.5 KB: about 50 KB before compression.
    let sizes: Vec<usize> = (0..40).map(|i| 300 + (i * 977) % 2200).collect();
    let inner = batch(&sizes, 1);
    for enc in [Encoding::Plain, Encoding::Zlib, Encoding::Brotli] {
        let d = split_batch(
            &inner,
            enc,
            77,
            UDP_PAYLOAD_BYTES_MAX,
            BrotliParams::default(),
        )
        .unwrap();
        let (got, too_large) = unsplit(&d, 77, UDP_PAYLOAD_BYTES_MAX);
        let want = packets_of(&inner);
        if enc == Encoding::Plain {
            // Plain packets above 1162 B cannot go whole: they are flagged, the rest arrive.
            let fits: Vec<_> = want
                .iter()
                .filter(|p| p.body.len() + 16 <= 1200 - 22)
                .cloned()
                .collect();
            assert_eq!(got, fits);
            assert_eq!(too_large.len(), want.len() - fits.len());
        } else {
            assert_eq!(got, want, "{enc:?}");
            assert!(too_large.is_empty());
            // Compressed parts are well filled: no more than twice the ideal count.
            let total: usize = d.iter().map(Vec::len).sum();
            assert!(
                d.len() <= 2 * total.div_ceil(UDP_PAYLOAD_BYTES_MAX) + 1,
                "{enc:?}: {} parts",
                d.len()
            );
        }
    }
}

#[test]
fn a_small_batch_is_one_datagram_and_an_empty_one_none() {
    let inner = batch(&[300, 400, 120], 2);
    for enc in [Encoding::Plain, Encoding::Zlib, Encoding::Brotli] {
        let d = split_batch(
            &inner,
            enc,
            1,
            UDP_PAYLOAD_BYTES_MAX,
            BrotliParams::default(),
        )
        .unwrap();
        assert_eq!(d.len(), 1, "{enc:?}");
    }
    assert!(
        split_batch(&[], Encoding::Brotli, 1, 1200, BrotliParams::default())
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        split_batch(&inner, Encoding::Brotli, 1, 38, BrotliParams::default()),
        Err(SplitError::PayloadTooSmall)
    );
    assert_eq!(
        split_batch(
            &inner[..20],
            Encoding::Brotli,
            1,
            1200,
            BrotliParams::default()
        ),
        Err(SplitError::BadInner)
    );
    // Found by the fuzzer: a run of other ops would make parts no client decodes.
    let auth = hello_datagram(None, AUTH_BODY);
    assert_eq!(
        split_batch(&auth, Encoding::Plain, 1, 1200, BrotliParams::default()),
        Err(SplitError::BadInner)
    );
}

#[test]
fn an_incompressible_packet_too_large_alone_is_flagged_in_its_place() {
    let mut inner = batch(&[200], 3);
    let mut x = 1u32;
    let noise: Vec<u8> = (0..3000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    packet::encode(ver::PLAIN, op::NOTIFICATION, 0, &noise, &mut inner);
    inner.extend_from_slice(&batch(&[250], 4));
    let d = split_batch(
        &inner,
        Encoding::Brotli,
        9,
        UDP_PAYLOAD_BYTES_MAX,
        BrotliParams::default(),
    )
    .unwrap();
    let (got, too_large) = unsplit(&d, 9, UDP_PAYLOAD_BYTES_MAX);
    assert_eq!(too_large, vec![1]);
    assert_eq!(got.len(), 2);
    assert_eq!(d[1].len(), PART_PACKET_BYTES);
}

#[test]
fn server_datagram_errors() {
    let max = UDP_PAYLOAD_BYTES_MAX;
    let part = |flags: u16, part: u16, parts: u16| {
        let mut b = Vec::new();
        b.extend_from_slice(&part.to_be_bytes());
        b.extend_from_slice(&parts.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        packet::encode_vec(1, udp_op::PART, 1, &b)
    };
    assert_eq!(
        decode_server(&part(0, 0, 1), max),
        Err(DatagramError::Unexpected),
        "no container"
    );
    let mut tl = part(part_flag::TOO_LARGE, 0, 1);
    assert!(decode_server(&tl, max).is_ok());
    tl.extend_from_slice(&packet::encode_vec(0, 5, 1, b"{}"));
    assert_eq!(
        decode_server(&tl, max),
        Err(DatagramError::Unexpected),
        "flagged with a container"
    );
    let mut beyond = part(0, 1, 1);
    beyond.extend_from_slice(&packet::encode_vec(0, 5, 1, b"{}"));
    assert_eq!(
        decode_server(&beyond, max),
        Err(DatagramError::Unexpected),
        "part >= parts"
    );
    let mut cut = part(0, 0, 1);
    cut.extend_from_slice(&packet::encode_vec(0, 5, 1, b"{}")[..17]);
    assert_eq!(decode_server(&cut, max), Err(DatagramError::Truncated));
    let mut wrong_op = part(0, 0, 1);
    wrong_op.extend_from_slice(&packet::encode_vec(1, 8, 1, b"{}"));
    assert_eq!(
        decode_server(&wrong_op, max),
        Err(DatagramError::Unexpected)
    );
    assert_eq!(
        decode_server(&auth::heartbeat_reply(5), max),
        Ok(ServerDatagram::HeartbeatReply(5))
    );
    assert_eq!(
        decode_server(&hello_refused(), max),
        Ok(ServerDatagram::AuthReply {
            body: br#"{"code":-101}"#,
            session: None
        })
    );
    assert_eq!(
        decode_server(&hello_ok(SessionId(9)), max),
        Ok(ServerDatagram::AuthReply {
            body: br#"{"code":0}"#,
            session: Some(SessionId(9))
        })
    );
    let mut hl = auth::heartbeat_reply(5);
    hl[5] = 0;
    assert_eq!(decode_server(&hl, max), Err(DatagramError::HeaderLen));
    assert_eq!(
        decode_server(&[0; 1201], max),
        Err(DatagramError::Oversized)
    );
    assert_eq!(decode_server(&[], max), Err(DatagramError::Empty));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Any batch, any encoding, any payload limit: every datagram fits and decodes alone, and
    /// together they give back every inner packet that fits, in order, the others flagged.
    #[test]
    fn split_round_trips(
        sizes in proptest::collection::vec(20usize..3000, 0..30),
        enc in 0u8..3,
        payload_max in 300usize..1500,
        seq in proptest::prelude::any::<u32>(),
    ) {
        let enc = [Encoding::Plain, Encoding::Zlib, Encoding::Brotli][enc as usize];
        let inner = batch(&sizes, seq as u64);
        let fast = BrotliParams { quality: 1, lgwin: 16 };
        let d = split_batch(&inner, enc, seq, payload_max, fast).unwrap();
        let (got, too_large) = unsplit(&d, seq, payload_max);
        let want = packets_of(&inner);
        proptest::prop_assert_eq!(got.len() + too_large.len(), want.len());
        // Order kept: `got` is `want` without the flagged ones.
        let mut w = want.iter();
        for g in &got {
            proptest::prop_assert!(w.any(|x| x == g));
        }
        if enc == Encoding::Plain {
            for p in &want {
                let fits = p.body.len() + HEADER_LEN + PART_PACKET_BYTES <= payload_max;
                proptest::prop_assert_eq!(got.contains(p), fits);
            }
        }
    }

    /// Whatever arrives from wherever: no panic, and an answer before validation is never
    /// larger than the datagram (a spoofed source cannot amplify).
    #[test]
    fn admission_never_amplifies(
        bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
        kind in 0u8..4,
        port in 1u16..4,
    ) {
        let k = key();
        let from = addr(1, port);
        let c = k.mint(addr(1, 1), NOW_S);
        // Mix random bytes with well-formed shapes so the valid paths are reached too.
        let d = match kind {
            0 => bytes,
            1 => hello_datagram(None, &bytes),
            2 => hello_datagram(Some(&c), &bytes),
            _ => session_datagram(SessionId(1), Some(&c), &bytes),
        };
        let table = |s: SessionId| (s == SessionId(1)).then_some(addr(1, 1));
        match admit(&k, &d, from, table, 0, NOW_S, UDP_PAYLOAD_BYTES_MAX) {
            Admit::Reply(r) => proptest::prop_assert!(r.len() <= d.len()),
            Admit::Auth { .. } | Admit::Migrate { .. } => {
                proptest::prop_assert_eq!(from, addr(1, 1), "only the cookie's address passes")
            }
            Admit::Requests { .. } | Admit::Bye { .. } => {
                proptest::prop_assert_eq!(from, addr(1, 1), "only the session's address ends it")
            }
            Admit::Drop(_) => {}
        }
        let _ = decode_server(&d, UDP_PAYLOAD_BYTES_MAX);
    }
}

/// Prints the examples of docs/protocol-udp.md, 16 bytes a line (run by name when the codec
/// changes, then paste): `cargo test -p proto --lib udp::tests::print_doc_examples -- --ignored --nocapture`.
#[test]
#[ignore]
fn print_doc_examples() {
    for name in [
        "hello",
        "cookie",
        "bye",
        "bye-reply",
        "hello-cookie",
        "hello-ok",
        "heartbeat",
        "heartbeat-reply",
        "data",
    ] {
        println!("<!-- udp-example {name} -->\n```text");
        for chunk in example(name).chunks(16) {
            let groups: Vec<String> = chunk.chunks(4).map(hex).collect();
            println!("{}", groups.join(" "));
        }
        println!("```\n");
    }
}

#[test]
fn the_session_of_a_datagram_is_read_from_its_first_packet_only() {
    let s = SessionId(3 << 48 | 0xabc);
    let d = session_datagram(s, None, &auth::heartbeat_request());
    assert_eq!(session_of_datagram(&d), Some(s));
    assert_eq!(session_of_datagram(&d).map(SessionId::shard), Some(3));
    // Not a session packet first, a wrong length, or too short: none.
    assert_eq!(session_of_datagram(&auth::heartbeat_request()), None);
    let mut bad = d.clone();
    bad[3] = 23;
    assert_eq!(session_of_datagram(&bad), None);
    assert_eq!(session_of_datagram(&d[..20]), None);
    assert_eq!(session_of_datagram(&[]), None);
    // part_packet is the header split_batch writes.
    let p = part_packet(42, 1, 3, part_flag::TOO_LARGE);
    assert_eq!(
        decode_server(&p, UDP_PAYLOAD_BYTES_MAX),
        Ok(ServerDatagram::Data(Part {
            seq: 42,
            part: 1,
            parts: 3,
            flags: part_flag::TOO_LARGE,
            container: &[],
        }))
    );
}
