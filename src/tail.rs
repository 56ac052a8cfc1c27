//! `barrage tail`: a viewer on the command line, and our reference client.
//!
//! It asks control for a token and edges (`POST /v1/connect` with an API key, or as a guest
//! the public discovery calls `getInfoByRoom` + `getDanmuInfo`, exactly as third-party clients
//! do), connects to the first edge that answers, authenticates with `protover 3`, heartbeats
//! every 30 s from its own thread, and prints the body of every op 5 packet as one JSON line on
//! stdout. Heartbeat replies (online counts) go to stderr.
//!
//! Blocking std sockets on purpose: one connection needs no runtime, and the code reads as the
//! protocol does. A WebSocket message and a TCP read are both just bytes holding whole packets,
//! so both feed the same packet decoder.

use anyhow::{anyhow, bail, Context};
use loadtest::client::{self, Edge, Seen, Ticket};
use proto::auth::{AuthBody, AUTH_OK};
use proto::packet::{op, OwnedPacket, StreamDecoder};
use proto::ws::{FrameDecoder, Message as WsMessage, Opcode};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Interval between heartbeats, as the web client sends them.
const HEARTBEAT_INTERVAL_MS: u64 = 30_000;
/// Connecting to one edge may take this long before trying the next.
const CONNECT_MS_MAX: u64 = 3_000;
/// The auth reply must arrive this long after the auth packet.
const AUTH_REPLY_MS_MAX: u64 = 5_000;
/// Each blocking read wakes up at least this often to check the deadline.
const READ_POLL_MS: u64 = 250;
/// Control calls time out after this long.
const CONTROL_MS_MAX: u64 = 5_000;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Ws,
    /// WebSocket over TLS (the edge's `wss_port`), verified against the system's roots plus
    /// `--ca-file`.
    Wss,
    /// Datagrams (the edge's `udp_port`, docs/protocol-udp.md): cookie handshake, heartbeats
    /// every 20 s, each batch in self-contained parts; a lost datagram is reported on stderr
    /// as a gap.
    Udp,
}

#[derive(clap::Args, Debug, Clone)]
pub struct TailArgs {
    /// The room to watch (a short id works too).
    #[arg(long)]
    pub room: u64,
    /// Raw TCP (port 2243), WebSocket (port 2244, path /sub), WebSocket over TLS (2245) or
    /// UDP (2246).
    #[arg(long, value_enum, default_value = "tcp")]
    pub transport: Transport,
    /// Control's base URL; `http://host:port/?region=R` asks for region R's edges first.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub control: String,
    /// Control's API key, for `POST /v1/connect`; without it, tail is a guest via getDanmuInfo.
    /// Named as in `loadtest` (`--api-key` is the broker's key everywhere; kept as an alias).
    #[arg(
        long = "control-key",
        alias = "api-key",
        env = "BARRAGE_CONTROL_KEY",
        hide_env_values = true
    )]
    pub control_key: Option<String>,
    /// The user id to connect as (needs --control-key unless 0).
    #[arg(long, default_value_t = 0)]
    pub uid: u64,
    /// Device id (buvid); random when not given.
    #[arg(long)]
    pub device: Option<String>,
    /// Exit after this many messages.
    #[arg(long)]
    pub count: Option<u64>,
    /// Exit after this long (an error if --count messages have not arrived by then).
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    /// Compression asked for: 3 brotli, 2 zlib, 0 plain.
    #[arg(long, default_value_t = 3)]
    pub protover: u32,
    /// PEM certificate(s) to trust for `--transport wss`, e.g. the self-signed one
    /// `barrage up` prints. Without it the certificate must chain to the webpki roots.
    #[arg(long)]
    pub ca_file: Option<std::path::PathBuf>,
    /// Opt in to high reach (`"ack": true`): ACK every message that carries a `msg_id` with
    /// op 1000, and print each msg id once (resends are dropped).
    #[arg(long)]
    pub ack: bool,
    /// Exit when the connection drops. By default tail reconnects and resumes where it was
    /// (`"resume"` in the auth body), drops replayed duplicates by (epoch, seq), and says on
    /// stderr what could not be recovered.
    #[arg(long)]
    pub no_resume: bool,
}

/// Msg ids `tail --ack` remembers to drop resends (a resend comes within the sender's retry
/// window, seconds; this covers thousands of messages).
const ACKED_IDS_MAX: usize = 4_096;

/// `tail --ack`: ACKs high-reach messages and drops their duplicates by msg id.
struct Acker {
    writer: Arc<Mutex<Wire>>,
    ws: bool,
    seen: std::collections::HashSet<u64>,
    order: std::collections::VecDeque<u64>,
}

impl Acker {
    /// ACKs `body` if it carries a `msg_id`; false when it is a duplicate to drop.
    fn take(&mut self, body: &[u8]) -> anyhow::Result<bool> {
        #[derive(serde::Deserialize)]
        struct Id {
            msg_id: Option<String>,
        }
        let Some(id) = serde_json::from_slice::<Id>(body)
            .ok()
            .and_then(|i| i.msg_id)
            .and_then(|s| s.parse::<u64>().ok())
        else {
            return Ok(true);
        };
        // ACK every copy: the first ACK may have been lost with a dropped connection.
        let mut w = self
            .writer
            .lock()
            .map_err(|_| anyhow!("writer lock poisoned"))?;
        write_packet(&mut *w, self.ws, &proto::auth::ack_request(id))?;
        drop(w);
        if !self.seen.insert(id) {
            return Ok(false);
        }
        self.order.push_back(id);
        if self.order.len() > ACKED_IDS_MAX {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        Ok(true)
    }
}

/// Why tail stopped, for the ones a script may want to tell apart (see `exit` in main.rs).
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    /// The edge answered op 8 with a non-zero code (the token was refused).
    #[error("the edge refused the token: {0}")]
    TokenRefused(String),
    /// No edge in the ticket accepted a connection.
    #[error("no edge answered (tried {0})")]
    NoEdgeAnswered(usize),
}

/// Asks control for a ticket: `POST /v1/connect` with the API key, or as a guest the public
/// calls in the order third-party clients make them (resolve the room, then discovery).
fn ticket(args: &TailArgs, device: &str) -> anyhow::Result<Ticket> {
    let timeout = Duration::from_millis(CONTROL_MS_MAX);
    if let Some(key) = &args.control_key {
        let mut t = client::fetch_blocking(
            &args.control,
            args.room,
            args.uid,
            device,
            Some(key),
            false,
            timeout,
        )?;
        if t.room == 0 {
            t.room = args.room;
        }
        return Ok(t);
    }
    if args.uid != 0 {
        bail!(
            "--uid {} needs --control-key (only guests connect without one)",
            args.uid
        );
    }
    let room = client::resolve_room_blocking(&args.control, args.room, timeout)?;
    let mut t = client::fetch_blocking(&args.control, room, 0, device, None, true, timeout)?;
    t.room = room;
    Ok(t)
}

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// The byte stream under a connection: a socket, or TLS over one. The TLS state is shared
/// under a lock by the reader and the heartbeat thread (a socket is cloned instead).
#[derive(Clone)]
enum Wire {
    Plain(Arc<TcpStream>),
    Tls(Arc<Mutex<TlsStream>>),
}

impl Wire {
    fn socket(&self) -> anyhow::Result<TcpStream> {
        Ok(match self {
            Wire::Plain(s) => s.try_clone()?,
            Wire::Tls(t) => t
                .lock()
                .map_err(|_| anyhow!("tls lock"))?
                .sock
                .try_clone()?,
        })
    }
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Wire::Plain(s) => (&**s).read(buf),
            Wire::Tls(t) => t
                .lock()
                .map_err(|_| std::io::Error::other("tls lock"))?
                .read(buf),
        }
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Wire::Plain(s) => (&**s).write(buf),
            Wire::Tls(t) => t
                .lock()
                .map_err(|_| std::io::Error::other("tls lock"))?
                .write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Wire::Plain(s) => (&**s).flush(),
            Wire::Tls(t) => t
                .lock()
                .map_err(|_| std::io::Error::other("tls lock"))?
                .flush(),
        }
    }
}

/// A connected transport: writes whole packets, reads raw bytes that hold whole packets.
enum Conn {
    Tcp(Wire),
    Ws {
        stream: Wire,
        frames: FrameDecoder,
        buf: Vec<u8>,
    },
}

fn random_mask() -> [u8; 4] {
    rand::random()
}

/// Writes one packet (a binary WebSocket message on WS).
fn write_packet(stream: &mut impl Write, ws: bool, packet: &[u8]) -> std::io::Result<()> {
    if ws {
        stream.write_all(&proto::ws::encode_client_frame(
            Opcode::Binary,
            packet,
            random_mask(),
        ))
    } else {
        stream.write_all(packet)
    }
}

/// The edge's port for a transport (0: not served).
fn port_of(edge: &Edge, transport: Transport) -> u16 {
    match transport {
        Transport::Tcp => edge.tcp_port,
        Transport::Ws => edge.ws_port,
        Transport::Wss => edge.wss_port,
        Transport::Udp => edge.udp_port,
    }
}

/// The TLS handshake over `sock`, for `host`: trusts the system's roots and `ca`.
fn tls_connect(
    sock: TcpStream,
    host: &str,
    ca: Option<&std::path::Path>,
) -> anyhow::Result<TlsStream> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(ca) = ca {
        for c in net::tls::load_certs(ca)? {
            roots
                .add(c)
                .with_context(|| format!("{} is not a usable CA certificate", ca.display()))?;
        }
    }
    let cfg = rustls::ClientConfig::builder_with_provider(net::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .with_context(|| format!("{host} is not a TLS server name"))?;
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name)?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    tls.sock
        .set_read_timeout(Some(Duration::from_millis(CONNECT_MS_MAX)))?;
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .context("TLS handshake with the edge (for a self-signed edge pass --ca-file)")?;
    }
    Ok(tls)
}

fn connect_tcp(host: &str, port: u16) -> anyhow::Result<TcpStream> {
    let addrs: Vec<_> = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {host}:{port}"))?
        .collect();
    let mut last = anyhow!("{host}:{port} resolves to nothing");
    for a in addrs {
        match TcpStream::connect_timeout(&a, Duration::from_millis(CONNECT_MS_MAX)) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = anyhow!("connecting to {a}: {e}"),
        }
    }
    Err(last)
}

/// The client side of the WebSocket upgrade; returns bytes read past the response head.
fn ws_handshake(stream: &mut Wire, host: &str, port: u16) -> anyhow::Result<Vec<u8>> {
    let key = client::ws_key(rand::random());
    stream.write_all(client::ws_upgrade_request(&format!("{host}:{port}"), &key).as_bytes())?;
    stream
        .socket()?
        .set_read_timeout(Some(Duration::from_millis(AUTH_REPLY_MS_MAX)))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = client::ws_upgrade_response(&buf, &key)? {
            return Ok(buf.split_off(end));
        }
        let n = stream
            .read(&mut chunk)
            .context("reading the WebSocket upgrade response")?;
        if n == 0 {
            bail!("edge closed the connection during the WebSocket upgrade");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

impl Conn {
    fn open(
        edge: &Edge,
        transport: Transport,
        ca: Option<&std::path::Path>,
    ) -> anyhow::Result<Conn> {
        match transport {
            Transport::Tcp => Ok(Conn::Tcp(Wire::Plain(Arc::new(connect_tcp(
                &edge.host,
                edge.tcp_port,
            )?)))),
            Transport::Udp => bail!("UDP is not a stream (run_udp)"),
            Transport::Ws | Transport::Wss => {
                let port = port_of(edge, transport);
                if port == 0 {
                    bail!("edge {} serves no {transport:?}", edge.host);
                }
                let sock = connect_tcp(&edge.host, port)?;
                let mut stream = match transport {
                    Transport::Wss => {
                        Wire::Tls(Arc::new(Mutex::new(tls_connect(sock, &edge.host, ca)?)))
                    }
                    _ => Wire::Plain(Arc::new(sock)),
                };
                let buf = ws_handshake(&mut stream, &edge.host, port)?;
                Ok(Conn::Ws {
                    stream,
                    frames: FrameDecoder::new_client_side(proto::limits::DECOMPRESSED_BYTES_MAX),
                    buf,
                })
            }
        }
    }

    fn stream(&self) -> &Wire {
        match self {
            Conn::Tcp(s) => s,
            Conn::Ws { stream, .. } => stream,
        }
    }

    fn is_ws(&self) -> bool {
        matches!(self, Conn::Ws { .. })
    }

    /// Reads once; pushes any packet bytes into `out`. `Ok(false)` means the edge closed.
    /// A read timeout returns `Ok(true)` with nothing added.
    fn read_into(&mut self, packets: &mut StreamDecoder) -> anyhow::Result<bool> {
        let mut chunk = [0u8; 16 * 1024];
        match self {
            Conn::Tcp(s) => match read_some(s, &mut chunk)? {
                None => Ok(false),
                Some(n) => {
                    packets.feed(&chunk[..n]);
                    Ok(true)
                }
            },
            Conn::Ws {
                stream,
                frames,
                buf,
            } => {
                // Bytes left over from the handshake or a previous read come first.
                loop {
                    match frames.decode(buf) {
                        Ok(Some(WsMessage::Binary(b))) => packets.feed(&b),
                        Ok(Some(WsMessage::Text(t))) => bail!("edge sent a text message: {t:?}"),
                        Ok(Some(WsMessage::Ping(p))) => {
                            stream.write_all(&proto::ws::encode_client_frame(
                                Opcode::Pong,
                                &p,
                                random_mask(),
                            ))?;
                        }
                        Ok(Some(WsMessage::Pong(_))) => {}
                        Ok(Some(WsMessage::Close(code, reason))) => {
                            eprintln!("edge closed the WebSocket: {code:?} {reason}");
                            return Ok(false);
                        }
                        Ok(None) => break,
                        Err(e) => bail!("bad WebSocket frame from the edge: {e}"),
                    }
                }
                match read_some(stream, &mut chunk)? {
                    None => Ok(false),
                    Some(n) => {
                        buf.extend_from_slice(&chunk[..n]);
                        Ok(true)
                    }
                }
            }
        }
    }
}

/// Prints a notification body as one JSON line (compacted; non-JSON as a JSON string).
fn print_body(out: &mut impl Write, body: &[u8]) -> std::io::Result<()> {
    match serde_json::from_slice::<serde_json::Value>(body) {
        // Valid JSON already on one line is printed as sent (key order kept).
        Ok(_) if !body.contains(&b'\n') && !body.contains(&b'\r') => {
            out.write_all(body.trim_ascii())?;
            out.write_all(b"\n")?;
        }
        Ok(v) => writeln!(out, "{v}")?,
        Err(_) => writeln!(
            out,
            "{}",
            serde_json::Value::String(String::from_utf8_lossy(body).into_owned())
        )?,
    }
    out.flush()
}

/// What one top-level packet means to tail. `BARRAGE_SYNC` goes to stderr (it is ours, not the
/// room's); room batches at or before the position are duplicates of what was printed and
/// are dropped, a hole in the seq is reported.
fn on_packet(
    p: &OwnedPacket,
    out: &mut impl Write,
    state: &mut Tailed,
    resumed: bool,
) -> anyhow::Result<()> {
    match p.op {
        op::HEARTBEAT_REPLY => {
            let online = p
                .body
                .first_chunk::<4>()
                .map(|b| u32::from_be_bytes(*b))
                .unwrap_or(0);
            eprintln!("online {online}");
        }
        op::NOTIFICATION if p.ver == proto::packet::ver::PLAIN => {
            if let Some(sync) = proto::sync::parse_sync(&p.body) {
                let had = state.position.epoch().cloned();
                let changed = state.position.on_sync(&sync);
                state.synced = true;
                match had {
                    Some(old) if changed => eprintln!(
                        "new epoch {} (was {old}): the room's stream started over; seqs before it are not comparable",
                        sync.epoch
                    ),
                    _ if resumed && !sync.recovered => eprintln!(
                        "resume could not recover {} batch(es) (epoch {}, continuing after seq {})",
                        sync.missed, sync.epoch, sync.seq
                    ),
                    _ if resumed => eprintln!("resumed: nothing missed (epoch {}, seq {})", sync.epoch, sync.seq),
                    _ => {}
                }
                return Ok(());
            }
            print_body(out, &p.body)?;
            state.printed += 1;
        }
        op::NOTIFICATION => {
            match state.position.on_batch(p.seq) {
                Seen::Duplicate => return Ok(()),
                Seen::Gap(n) => eprintln!("gap: {n} batch(es) missing before seq {}", p.seq),
                Seen::New => {}
            }
            let inner = proto::container::unpack(
                p.ver,
                p.op,
                p.seq,
                &p.body,
                proto::limits::DECOMPRESSED_BYTES_MAX,
            )
            .map_err(|e| anyhow!("bad container from the edge: {e}"))?;
            for i in inner.iter().filter(|i| i.op == op::NOTIFICATION) {
                if let Some(a) = &mut state.acker {
                    if !a.take(&i.body)? {
                        continue;
                    }
                }
                print_body(out, &i.body)?;
                state.printed += 1;
            }
        }
        op::AUTH_REPLY => {}
        other => eprintln!("ignoring op {other} ({} bytes)", p.body.len()),
    }
    Ok(())
}

/// Sends the auth packet and waits for the op 8 reply; leaves later packets in `packets`.
fn authenticate(
    conn: &mut Conn,
    packets: &mut StreamDecoder,
    body: &AuthBody,
    resume: Option<&proto::sync::Resume>,
    sync: bool,
) -> anyhow::Result<Vec<OwnedPacket>> {
    let is_ws = conn.is_ws();
    let mut w = conn.stream().clone();
    write_packet(
        &mut w,
        is_ws,
        &proto::auth::auth_request_ext(body, resume, sync),
    )?;
    let deadline = Instant::now() + Duration::from_millis(AUTH_REPLY_MS_MAX);
    let mut early = Vec::new();
    loop {
        while let Some(p) = packets
            .next_packet()
            .map_err(|e| anyhow!("bad packet from the edge: {e}"))?
        {
            if p.op == op::AUTH_REPLY {
                let v: serde_json::Value = serde_json::from_slice(&p.body).unwrap_or_default();
                let code = v["code"].as_i64().unwrap_or(i64::MIN);
                if code != i64::from(AUTH_OK) {
                    return Err(
                        TailError::TokenRefused(String::from_utf8_lossy(&p.body).into()).into(),
                    );
                }
                return Ok(early);
            }
            early.push(p);
        }
        if Instant::now() >= deadline {
            bail!("no auth reply within {AUTH_REPLY_MS_MAX} ms");
        }
        if !conn.read_into(packets)? {
            bail!("the edge closed the connection before replying to auth");
        }
    }
}

pub fn run(args: TailArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let deadline = args
        .timeout_ms
        .map(|ms| started + Duration::from_millis(ms));
    let device = args
        .device
        .clone()
        .unwrap_or_else(|| format!("tail-{:016x}", rand::random::<u64>()));
    if args.transport == Transport::Udp {
        // Datagrams have no connection to lose: nothing to resume.
        let t = ticket(&args, &device)?;
        return run_udp(&args, &t, &device, deadline);
    }
    let mut state = Tailed::default();
    let mut attempts = 0u32;
    loop {
        let t = ticket(&args, &device)?;
        match session(&args, &t, &device, deadline, &mut state) {
            Ok(End::Done) => return Ok(()),
            Ok(End::Dropped(why)) if !args.no_resume && attempts < RECONNECTS_MAX => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(anyhow!("{why}"));
                }
                attempts = if state.synced { 0 } else { attempts + 1 };
                state.synced = false;
                match state.position.resume() {
                    Some(r) => eprintln!(
                        "connection lost ({why}); resuming at epoch {} seq {}",
                        r.epoch, r.seq
                    ),
                    None => eprintln!("connection lost ({why}); reconnecting (no position yet)"),
                }
                std::thread::sleep(Duration::from_millis(RECONNECT_MS_MIN << attempts.min(5)));
            }
            Ok(End::Dropped(why)) => return Err(anyhow!("{why}")),
            Err(e) => return Err(e),
        }
    }
}

/// Reconnects in a row without a sync before tail gives up.
const RECONNECTS_MAX: u32 = 8;
/// First reconnect delay (doubled per failed attempt, up to 32 times this).
const RECONNECT_MS_MIN: u64 = 200;

/// What tail keeps across connections.
#[derive(Default)]
struct Tailed {
    /// The room position: what to resume from, and which batches are duplicates.
    position: client::Position,
    printed: u64,
    /// This connection got its `BARRAGE_SYNC`.
    synced: bool,
    /// `--ack`: ACKs high-reach messages, drops their resends.
    acker: Option<Acker>,
}

/// How one connection ended.
enum End {
    /// `--count` or `--timeout-ms` reached.
    Done,
    /// The connection dropped: resume.
    Dropped(String),
}

/// One connection: connect, authenticate (resuming from `state.position` when it has one),
/// print until the end.
fn session(
    args: &TailArgs,
    t: &Ticket,
    device: &str,
    deadline: Option<Instant>,
    state: &mut Tailed,
) -> anyhow::Result<End> {
    let mut conn = None;
    for e in &t.edges {
        match Conn::open(e, args.transport, args.ca_file.as_deref()) {
            Ok(c) => {
                eprintln!(
                    "connected to {}:{} ({:?}), room {}",
                    e.host,
                    port_of(e, args.transport),
                    args.transport,
                    t.room
                );
                conn = Some(c);
                break;
            }
            Err(err) => eprintln!("edge {} failed: {err:#}; trying the next", e.host),
        }
    }
    let Some(mut conn) = conn else {
        if state.printed > 0 || state.position.epoch().is_some() {
            return Ok(End::Dropped(format!(
                "no edge answered (tried {})",
                t.edges.len()
            )));
        }
        return Err(TailError::NoEdgeAnswered(t.edges.len()).into());
    };
    conn.stream()
        .socket()?
        .set_read_timeout(Some(Duration::from_millis(READ_POLL_MS)))?;
    let mut packets = StreamDecoder::new(proto::limits::LINK_FRAME_BYTES_MAX);
    let mut auth = client::auth_body(args.uid, t.room, args.protover, &t.token, device);
    auth.ack = args.ack;
    let resume = if args.no_resume {
        None
    } else {
        state.position.resume()
    };
    let early = match authenticate(
        &mut conn,
        &mut packets,
        &auth,
        resume.as_ref(),
        !args.no_resume,
    ) {
        Ok(early) => early,
        Err(e) if e.downcast_ref::<TailError>().is_none() && state.position.epoch().is_some() => {
            return Ok(End::Dropped(format!("{e:#}")))
        }
        Err(e) => return Err(e),
    };

    // Heartbeats from their own thread; the writer half is shared under a lock with nobody
    // else (the reader only writes WebSocket pongs, which go through the same lock).
    let writer = Arc::new(Mutex::new(conn.stream().clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let hb = {
        let (writer, stop, ws) = (writer.clone(), stop.clone(), conn.is_ws());
        std::thread::Builder::new()
            .name("tail-heartbeat".into())
            .spawn(move || {
                let mut next = Instant::now();
                while !stop.load(Ordering::Acquire) {
                    if Instant::now() >= next {
                        let ok = match writer.lock() {
                            Ok(mut w) => {
                                write_packet(&mut *w, ws, &proto::auth::heartbeat_request()).is_ok()
                            }
                            Err(_) => false,
                        };
                        if !ok {
                            return;
                        }
                        next = Instant::now() + Duration::from_millis(HEARTBEAT_INTERVAL_MS);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })?
    };

    if args.ack {
        // The msg ids seen stay across reconnects (a resend may follow the user to the new
        // connection); only the writer is this connection's.
        let acker = state.acker.get_or_insert_with(|| Acker {
            writer: writer.clone(),
            ws: conn.is_ws(),
            seen: Default::default(),
            order: Default::default(),
        });
        acker.writer = writer.clone();
        acker.ws = conn.is_ws();
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let resumed = resume.is_some();
    let result = (|| -> anyhow::Result<End> {
        for p in &early {
            on_packet(p, &mut out, state, resumed)?;
        }
        loop {
            while let Some(p) = packets
                .next_packet()
                .map_err(|e| anyhow!("bad packet from the edge: {e}"))?
            {
                on_packet(&p, &mut out, state, resumed)?;
                if args.count.is_some_and(|n| state.printed >= n) {
                    return Ok(End::Done);
                }
            }
            if args.count.is_some_and(|n| state.printed >= n) {
                return Ok(End::Done);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return match args.count {
                    Some(n) => Err(anyhow!("timed out after {} of {n} messages", state.printed)),
                    None => Ok(End::Done),
                };
            }
            match conn.read_into(&mut packets) {
                Ok(true) => {}
                Ok(false) => return Ok(End::Dropped("the edge closed the connection".into())),
                Err(e) => return Ok(End::Dropped(format!("{e:#}"))),
            }
        }
    })();
    stop.store(true, Ordering::Release);
    if let Ok(s) = conn.stream().socket() {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    let _ = hb.join();
    result
}

/// A hello (or a session datagram) is sent again this often until it is answered...
const UDP_RETRY_MS: u64 = 1_000;
/// ...this many times.
const UDP_TRIES_MAX: u32 = 5;
/// On exit the bye (op 1004) is sent this many times at most, until the edge answers...
const UDP_BYE_TRIES_MAX: u32 = 2;
/// ...waiting this long for the answer each time (Ctrl-C should not linger).
const UDP_BYE_WAIT_MS: u64 = 300;

/// `tail --transport udp`: the handshake of docs/protocol-udp.md, then parts printed as they
/// come, heartbeats every `UDP_HEARTBEAT_MS`, and every gap (a lost part or a whole lost
/// batch) reported on stderr. On exit (Ctrl-C, SIGTERM, `--count` reached, `--timeout`, an
/// error) the session is ended with a bye, so the edge frees it at once.
fn run_udp(
    args: &TailArgs,
    t: &Ticket,
    device: &str,
    deadline: Option<Instant>,
) -> anyhow::Result<()> {
    use proto::udp::{self as wire, ServerDatagram};
    let payload_max = wire::UDP_PAYLOAD_BYTES_MAX;
    let mut last_err = None;
    let mut sock = None;
    for e in t.edges.iter().filter(|e| e.udp_port != 0) {
        let addr = match (e.host.as_str(), e.udp_port).to_socket_addrs() {
            Ok(mut a) => a.next(),
            Err(err) => {
                last_err = Some(anyhow!("resolving {}: {err}", e.host));
                continue;
            }
        };
        let Some(addr) = addr else { continue };
        let bind = if addr.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let s = std::net::UdpSocket::bind(bind)?;
        // Connected: the kernel drops datagrams from any other source.
        s.connect(addr)?;
        s.set_read_timeout(Some(Duration::from_millis(READ_POLL_MS)))?;
        eprintln!("udp to {addr} (room {})", t.room);
        sock = Some(s);
        break;
    }
    let Some(sock) = sock else {
        return match last_err {
            Some(e) => Err(e),
            None => Err(anyhow!("no edge in the ticket serves UDP")),
        };
    };
    let mut buf = vec![0u8; 65_536];
    let mut recv = |sock: &std::net::UdpSocket| -> anyhow::Result<Option<Vec<u8>>> {
        match sock.recv(&mut buf) {
            Ok(n) => Ok(Some(buf[..n].to_vec())),
            // EINTR: Ctrl-C arrived during the read (a socket with a timeout is not restarted).
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    };
    // Sends `d` until `pick` accepts an answer (bounded tries).
    let mut exchange = |d: &[u8],
                        pick: &mut dyn FnMut(ServerDatagram<'_>) -> Option<anyhow::Result<()>>|
     -> anyhow::Result<()> {
        for _ in 0..UDP_TRIES_MAX {
            sock.send(d)?;
            let until = Instant::now() + Duration::from_millis(UDP_RETRY_MS);
            while Instant::now() < until {
                let Some(r) = recv(&sock)? else { continue };
                if let Ok(sd) = wire::decode_server(&r, payload_max) {
                    if let Some(done) = pick(sd) {
                        return done;
                    }
                }
            }
        }
        bail!("the edge did not answer over UDP ({UDP_TRIES_MAX} tries)")
    };
    let auth = proto::auth::auth_request(&client::auth_body(
        args.uid,
        t.room,
        args.protover,
        &t.token,
        device,
    ));
    let mut cookie = None;
    exchange(&auth, &mut |sd| match sd {
        ServerDatagram::Cookie(c) => {
            cookie = Some(c);
            Some(Ok(()))
        }
        _ => None,
    })?;
    let mut hello = wire::cookie_datagram(&cookie.ok_or_else(|| anyhow!("no cookie"))?);
    hello.extend_from_slice(&auth);
    let mut session = None;
    exchange(&hello, &mut |sd| match sd {
        ServerDatagram::AuthReply { body, session: s } => {
            let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
            if v["code"].as_i64() != Some(i64::from(AUTH_OK)) {
                return Some(Err(TailError::TokenRefused(
                    String::from_utf8_lossy(body).into(),
                )
                .into()));
            }
            session = s;
            Some(Ok(()))
        }
        _ => None,
    })?;
    let session = session.ok_or_else(|| anyhow!("op 8 without a session id"))?;
    // From here on Ctrl-C and SIGTERM end the loop (a second one exits at once), so the bye
    // below goes out.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, stop.clone())?;
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let result = udp_session(
        args,
        &sock,
        session,
        payload_max,
        deadline,
        &mut recv,
        &stop,
    );
    let bye = wire::bye_datagram(session);
    'tries: for _ in 0..UDP_BYE_TRIES_MAX {
        if sock.send(&bye).is_err() {
            break;
        }
        let until = Instant::now() + Duration::from_millis(UDP_BYE_WAIT_MS);
        while Instant::now() < until {
            match recv(&sock) {
                Ok(Some(r)) => {
                    if matches!(
                        wire::decode_server(&r, payload_max),
                        Ok(ServerDatagram::Bye)
                    ) {
                        eprintln!("session ended");
                        break 'tries;
                    }
                }
                Ok(None) => {}
                Err(_) => break 'tries,
            }
        }
    }
    result
}

/// The receive loop of a UDP session, until `--count`, `--timeout`, a signal or an error.
fn udp_session(
    args: &TailArgs,
    sock: &std::net::UdpSocket,
    session: proto::udp::SessionId,
    payload_max: usize,
    deadline: Option<Instant>,
    recv: &mut dyn FnMut(&std::net::UdpSocket) -> anyhow::Result<Option<Vec<u8>>>,
    stop: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<()> {
    use proto::udp::{self as wire, ServerDatagram};
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut printed = 0u64;
    let mut gaps = Gaps::default();
    let heartbeat = proto::auth::heartbeat_request();
    let mut next_hb = Instant::now();
    let mut challenge: Option<wire::Cookie> = None;
    loop {
        if Instant::now() >= next_hb || challenge.is_some() {
            // A cookie from the edge means our address changed (NAT rebinding): prove it.
            let d = wire::session_datagram(session, challenge.take().as_ref(), &heartbeat);
            sock.send(&d)?;
            next_hb = Instant::now() + Duration::from_millis(wire::UDP_HEARTBEAT_MS);
        }
        if args.count.is_some_and(|n| printed >= n)
            || stop.load(std::sync::atomic::Ordering::Relaxed)
        {
            return Ok(());
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return match args.count {
                Some(n) => Err(anyhow!("timed out after {printed} of {n} messages")),
                None => Ok(()),
            };
        }
        let Some(d) = recv(sock)? else { continue };
        match wire::decode_server(&d, payload_max) {
            Ok(ServerDatagram::HeartbeatReply(n)) => eprintln!("online {n}"),
            Ok(ServerDatagram::Cookie(c)) => challenge = Some(c),
            Ok(ServerDatagram::Data(p)) => {
                gaps.saw(p.seq, p.part, p.parts);
                if p.flags & wire::part_flag::TOO_LARGE != 0 {
                    eprintln!(
                        "seq {}: part {} holds a message larger than a datagram (not sent over UDP)",
                        p.seq, p.part
                    );
                    continue;
                }
                let (h, _) = proto::packet::decode(p.container, u32::MAX)
                    .map_err(|e| anyhow!("bad part from the edge: {e:?}"))?;
                let body = if h.ver == proto::packet::ver::PLAIN {
                    p.container
                } else {
                    h.body
                };
                let inner = proto::container::unpack_container(
                    h.ver,
                    body,
                    proto::limits::DECOMPRESSED_BYTES_MAX,
                )
                .map_err(|e| anyhow!("bad container from the edge: {e}"))?;
                for i in inner.iter().filter(|i| i.op == op::NOTIFICATION) {
                    print_body(&mut out, &i.body)?;
                    printed += 1;
                }
            }
            Ok(ServerDatagram::AuthReply { .. }) | Ok(ServerDatagram::Bye) => {}
            Err(e) => eprintln!("ignoring a bad datagram from the edge: {e}"),
        }
    }
}

/// Gap detection over UDP: the room seq of each batch and the parts seen of the current one.
#[derive(Default)]
struct Gaps {
    /// (seq, parts, parts seen) of the batch being received.
    current: Option<(u32, u16, std::collections::BTreeSet<u16>)>,
}

impl Gaps {
    fn saw(&mut self, seq: u32, part: u16, parts: u16) {
        match &mut self.current {
            Some((s, _, seen)) if *s == seq => {
                seen.insert(part);
                return;
            }
            Some((s, n, seen)) => {
                let missing: Vec<u16> = (0..*n).filter(|i| !seen.contains(i)).collect();
                if !missing.is_empty() {
                    eprintln!("gap: seq {s} lost parts {missing:?} of {n}");
                }
                // Priority lives in the top bit; compare within one stream only.
                let (prev, now) = (*s & 0x7FFF_FFFF, seq & 0x7FFF_FFFF);
                if *s & 0x8000_0000 == seq & 0x8000_0000 && now > prev + 1 {
                    eprintln!("gap: seqs {}..={} lost", prev + 1, now - 1);
                }
            }
            None => {}
        }
        self.current = Some((seq, parts, std::collections::BTreeSet::from([part])));
    }
}

/// One read: `Some(n)` bytes (0 on a read timeout, so the caller can heartbeat), `None` when the
/// edge closed the connection.
fn read_some(s: &mut impl Read, chunk: &mut [u8]) -> std::io::Result<Option<usize>> {
    match s.read(chunk) {
        Ok(0) => Ok(None),
        Ok(n) => Ok(Some(n)),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Ok(Some(0))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_print_as_one_line() {
        let mut out = Vec::new();
        print_body(&mut out, b"{\n \"cmd\": \"X\"\n}").unwrap();
        print_body(&mut out, b"not json").unwrap();
        print_body(&mut out, br#"{"z":1,"a":2}"#).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"cmd\":\"X\"}\n\"not json\"\n{\"z\":1,\"a\":2}\n"
        );
    }
}
