//! The whole stack in one process on ports 0 (control, broker, edge wired as `barrage up`
//! wires them): clients get tokens and edges from control, connect to the edge it names, and
//! receive pushes made through the ingest socket and the HTTP API.

mod common;

use common::*;
use proto::id::{AreaId, DeviceId, RoomId, UserId};
use proto::token::{Claims, KeySet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn edge_addr(e: &serde_json::Value, port_field: &str) -> SocketAddr {
    let host = e["host"].as_str().expect("host");
    let port = e[port_field].as_u64().expect("port");
    format!("{host}:{port}").parse().expect("edge address")
}

fn edge_ids(control: SocketAddr) -> Vec<(String, String)> {
    let v = http_json(control, "GET", "/v1/edges", &[], "").1;
    v["edges"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    (
                        e["node_id"].as_str().unwrap_or("").to_string(),
                        e["state"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn tcp_and_ws_viewers_receive_pushes_from_ingest_and_http() {
    let stack = Stack::start(KEYS_V1_V2, KEYS_V1_V2);
    let room = 1001;

    // A logged-in user through the business key, on TCP.
    let t = connect_ticket(stack.control_addr(), room, 7);
    assert_eq!(t.edges.len(), 1, "one edge registered: {:?}", t.edges);
    let mut tcp = Viewer::tcp(edge_addr(&t.edges[0], "tcp_port"));
    assert_eq!(tcp.auth(&auth_body(7, room, &t.token)), 0);

    // A guest through the public discovery endpoint, on WebSocket.
    let (status, info) = http_json(
        stack.control_addr(),
        "GET",
        &format!("/xlive/web-room/v1/index/getDanmuInfo?id={room}&type=0"),
        &[],
        "",
    );
    assert_eq!((status, info["code"].as_i64()), (200, Some(0)), "{info}");
    let host = &info["data"]["host_list"][0];
    let mut ws = Viewer::ws(edge_addr(host, "ws_port"));
    assert_eq!(
        ws.auth(&auth_body(0, room, info["data"]["token"].as_str().unwrap())),
        0
    );

    warm_up(stack.ingest_addr(), room, &mut [&mut tcp, &mut ws]);

    // Through the ingest socket, then the HTTP API.
    let a = r#"{"cmd":"DANMU_MSG","info":[[0],"via ingest",[7,"u7"]]}"#;
    let b = r#"{"cmd":"DANMU_MSG","info":[[0],"via http",[8,"u8"]]}"#;
    let mut client = broker::IngestClient::connect(stack.ingest_addr(), API_KEY).unwrap();
    client.push(&broker::Message::room(room, a)).unwrap();
    let auth = format!("Bearer {API_KEY}");
    let (status, v) = http_json(
        stack.broker_http(),
        "POST",
        &format!("/v1/push/room/{room}"),
        &[("authorization", &auth)],
        b,
    );
    assert!(status == 200 || status == 202, "{status} {v}");
    assert!(v["msg_id"].is_string(), "{v}");

    let deadline = Instant::now() + WAIT;
    for viewer in [&mut tcp, &mut ws] {
        assert_eq!(viewer.next_message(deadline).as_deref(), Some(a));
        assert_eq!(viewer.next_message(deadline).as_deref(), Some(b));
    }
    // Heartbeat replies carry the room's online count: both viewers are in it.
    let deadline = Instant::now() + WAIT;
    loop {
        let online = tcp.heartbeat();
        if online == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "online count stayed {online}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ws.heartbeat() >= 1);
}

#[test]
fn token_for_room_a_cannot_join_room_b() {
    let stack = Stack::start(KEYS_V1_V2, KEYS_V1_V2);
    let t = connect_ticket(stack.control_addr(), 1, 5);
    let addr = edge_addr(&t.edges[0], "tcp_port");
    let mut v = Viewer::tcp(addr);
    assert_eq!(
        v.auth(&auth_body(5, 2, &t.token)),
        proto::auth::AUTH_BAD_TOKEN as i64
    );
    assert!(
        v.closed_by(Instant::now() + WAIT),
        "the edge closes after -101"
    );
    // The same token into its own room works.
    let mut ok = Viewer::tcp(addr);
    assert_eq!(ok.auth(&auth_body(5, 1, &t.token)), 0);
}

#[test]
fn expired_and_foreign_tokens_are_refused() {
    let stack = Stack::start(KEYS_V1_V2, KEYS_V1_V2);
    let t = connect_ticket(stack.control_addr(), 9, 5);
    let addr = edge_addr(&t.edges[0], "tcp_port");
    let keys = KeySet::parse(KEYS_V1_V2).unwrap();
    let claims = |expires_at_s| Claims {
        uid: UserId(5),
        device: DeviceId("dev-5".into()),
        room: RoomId(9),
        area: AreaId(0),
        expires_at_s,
    };
    let expired = keys.sign(&claims(unix_now_s() - 10));
    let mut v = Viewer::tcp(addr);
    assert_eq!(
        v.auth(&auth_body(5, 9, &expired)),
        proto::auth::AUTH_BAD_TOKEN as i64
    );
    // A token signed with a key the edge does not hold.
    let foreign = KeySet::parse("3:some-other-secret-0123456789")
        .unwrap()
        .sign(&claims(unix_now_s() + 600));
    let mut v = Viewer::tcp(addr);
    assert_eq!(
        v.auth(&auth_body(5, 9, &foreign)),
        proto::auth::AUTH_BAD_TOKEN as i64
    );
    // Control's tokens expire too: one issued with a 1 s lifetime is refused once it has passed.
    let short = control::start(control::Config {
        token_ttl_ms: 1000,
        ..control_config(KEYS_V1_V2)
    })
    .unwrap();
    let (_, body) = http_json(
        short.http_addr(),
        "POST",
        "/v1/connect",
        &[],
        r#"{"room":9,"uid":0}"#,
    );
    let token = body["token"].as_str().unwrap().to_string();
    let expires_at = body["expires_at"].as_u64().unwrap();
    while unix_now_s() <= expires_at {
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut v = Viewer::tcp(addr);
    assert_eq!(
        v.auth(&auth_body(0, 9, &token)),
        proto::auth::AUTH_BAD_TOKEN as i64
    );
    short.shutdown();
}

#[test]
fn tokens_signed_with_an_older_key_work_after_rotation() {
    // Before rotation: control signs with key 1.
    let old_control = control::start(control_config(KEYS_V1)).unwrap();
    let old = connect_ticket(old_control.http_addr(), 3, 11).token;
    old_control.shutdown();
    // After: control holds {1, 2} and signs with 2; the edge accepts both.
    let stack = Stack::start(KEYS_V1_V2, KEYS_V1_V2);
    let t = connect_ticket(stack.control_addr(), 3, 12);
    let both = KeySet::parse(KEYS_V1_V2).unwrap();
    assert_eq!(both.verify(&old, unix_now_s()).unwrap().key_id, 1);
    assert_eq!(both.verify(&t.token, unix_now_s()).unwrap().key_id, 2);
    let addr = edge_addr(&t.edges[0], "tcp_port");
    let mut new_viewer = Viewer::tcp(addr);
    assert_eq!(new_viewer.auth(&auth_body(12, 3, &t.token)), 0);
    let mut old_viewer = Viewer::tcp(addr);
    assert_eq!(
        old_viewer.auth(&auth_body(11, 3, &old)),
        0,
        "a key-1 token still works"
    );
    warm_up(
        stack.ingest_addr(),
        3,
        &mut [&mut new_viewer, &mut old_viewer],
    );
    let mut client = broker::IngestClient::connect(stack.ingest_addr(), API_KEY).unwrap();
    client
        .push(&broker::Message::room(
            3,
            r#"{"cmd":"NOTICE_MSG","msg":"rotated"}"#,
        ))
        .unwrap();
    let deadline = Instant::now() + WAIT;
    for v in [&mut new_viewer, &mut old_viewer] {
        assert_eq!(
            v.next_message(deadline).as_deref(),
            Some(r#"{"cmd":"NOTICE_MSG","msg":"rotated"}"#)
        );
    }
}

#[test]
fn draining_or_dead_edges_are_no_longer_assigned() {
    let control = control::start(control_config(KEYS_V1_V2)).unwrap();
    let broker = broker::start(broker_config()).unwrap();
    let a = edge::start(edge_config(
        "edge-a",
        KEYS_V1_V2,
        broker.link_addr(),
        control.http_addr(),
    ))
    .unwrap();
    let b = edge::start(edge_config(
        "edge-b",
        KEYS_V1_V2,
        broker.link_addr(),
        control.http_addr(),
    ))
    .unwrap();
    let stack = Stack {
        control: Some(control),
        broker: Some(broker),
        edge: None,
    };
    stack.wait_for_edges(&["edge-a", "edge-b"]);
    let ports = |t: &Ticket| -> Vec<u64> {
        t.edges
            .iter()
            .filter_map(|e| e["tcp_port"].as_u64())
            .collect()
    };
    let (pa, pb) = (
        u64::from(a.tcp_addr().port()),
        u64::from(b.tcp_addr().port()),
    );
    let mut both = ports(&connect_ticket(stack.control_addr(), 1, 1));
    both.sort();
    let mut want = vec![pa, pb];
    want.sort();
    assert_eq!(both, want);

    // Drain a: once its next heartbeat says so, control stops handing it out.
    a.drain();
    let deadline = Instant::now() + WAIT;
    while ports(&connect_ticket(stack.control_addr(), 1, 1)) != [pb] {
        assert!(Instant::now() < deadline, "draining edge still assigned");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        edge_ids(stack.control_addr()).contains(&("edge-a".to_string(), "draining".to_string()))
    );

    // Kill b: its heartbeats stop, and after edge_ttl_ms it is dead and out of every answer.
    b.shutdown();
    let deadline = Instant::now() + WAIT;
    loop {
        let t = connect_ticket(stack.control_addr(), 1, 1);
        if t.edges.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dead edge still assigned: {:?}",
            t.edges
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(edge_ids(stack.control_addr()).contains(&("edge-b".to_string(), "dead".to_string())));
    let (_, info) = http_json(
        stack.control_addr(),
        "GET",
        "/xlive/web-room/v1/index/getDanmuInfo?id=1",
        &[],
        "",
    );
    assert_eq!(info["data"]["host_list"], serde_json::json!([]));
    a.shutdown();
}

#[test]
fn area_pushes_follow_the_area_control_put_in_the_token() {
    // Room 500 is in area 9 per control's room table; room 501 is not in the table (area 0).
    let config = control::Config {
        rooms: vec![control::config::RoomEntry {
            room_id: 500,
            short_id: 5,
            uid: 1,
            area: 9,
        }],
        ..control_config(KEYS_V1_V2)
    };
    let stack = Stack::start_with(config, KEYS_V1_V2);
    // Through the short id: control resolves it and the token names the real room.
    let t = connect_ticket(stack.control_addr(), 5, 21);
    let addr = edge_addr(&t.edges[0], "tcp_port");
    let mut in_area = Viewer::tcp(addr);
    assert_eq!(in_area.auth(&auth_body(21, 500, &t.token)), 0);
    let t2 = connect_ticket(stack.control_addr(), 501, 22);
    let mut outside = Viewer::tcp(addr);
    assert_eq!(outside.auth(&auth_body(22, 501, &t2.token)), 0);
    warm_up(stack.ingest_addr(), 500, &mut [&mut in_area]);
    warm_up(stack.ingest_addr(), 501, &mut [&mut outside]);

    let mut client = broker::IngestClient::connect(stack.ingest_addr(), API_KEY).unwrap();
    let area_msg = r#"{"cmd":"NOTICE_MSG","msg":"area 9 promotion"}"#;
    let room_msg = r#"{"cmd":"DANMU_MSG","info":[[0],"room 501 only",[1,"x"]]}"#;
    // The area push can race the edge's area subscription as a room push can: repeat it until
    // it arrives.
    let deadline = Instant::now() + WAIT;
    loop {
        client.push(&broker::Message::area(9, area_msg)).unwrap();
        if in_area
            .next_message(Instant::now() + Duration::from_millis(300))
            .as_deref()
            == Some(area_msg)
        {
            break;
        }
        assert!(Instant::now() < deadline, "area push never arrived");
    }
    client.push(&broker::Message::room(501, room_msg)).unwrap();
    // The viewer outside area 9 gets its room's push next: every area push went elsewhere.
    assert_eq!(
        outside.next_message(Instant::now() + WAIT).as_deref(),
        Some(room_msg)
    );
    // And the area viewer gets nothing of room 501's.
    let late = in_area.next_message(Instant::now() + Duration::from_millis(500));
    assert!(
        !matches!(late.as_deref(), Some(m) if m != area_msg),
        "unexpected {late:?}"
    );
}

#[test]
fn user_push_reaches_every_connection_of_that_user_only() {
    let stack = Stack::start(KEYS_V1_V2, KEYS_V1_V2);
    let room = 1301;
    // uid 4242 logs in twice through control (TCP and WS); uid 4243 once.
    let t = connect_ticket(stack.control_addr(), room, 4242);
    let mut tcp = Viewer::tcp(edge_addr(&t.edges[0], "tcp_port"));
    assert_eq!(tcp.auth(&auth_body(4242, room, &t.token)), 0);
    let t2 = connect_ticket(stack.control_addr(), room, 4242);
    let mut ws = Viewer::ws(edge_addr(&t2.edges[0], "ws_port"));
    assert_eq!(ws.auth(&auth_body(4242, room, &t2.token)), 0);
    let o = connect_ticket(stack.control_addr(), room, 4243);
    let mut other = Viewer::tcp(edge_addr(&o.edges[0], "tcp_port"));
    assert_eq!(other.auth(&auth_body(4243, room, &o.token)), 0);

    // The room subscription tells the broker which encodings this edge's viewers use.
    warm_up(
        stack.ingest_addr(),
        room,
        &mut [&mut tcp, &mut ws, &mut other],
    );

    let body = r#"{"cmd":"USER_TOAST","uid":4242,"text":"for you only"}"#;
    let mut client = broker::IngestClient::connect(stack.ingest_addr(), API_KEY).unwrap();
    client.push(&broker::Message::user(4242, body)).unwrap();
    let deadline = Instant::now() + WAIT;
    for viewer in [&mut tcp, &mut ws] {
        assert_eq!(viewer.next_message(deadline).as_deref(), Some(body));
    }
    assert_eq!(
        other.next_message(Instant::now() + Duration::from_millis(300)),
        None,
        "another user receives nothing"
    );
}
