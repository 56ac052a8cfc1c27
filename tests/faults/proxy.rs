//! A TCP proxy of our own between the edges and the broker's link port, for faults a kernel
//! rule cannot make: a fixed delay each way (a delay line: bytes leave `delay` after they came
//! in, throughput untouched), a reset in the middle of a batch (half of a read from the
//! broker is passed on, then both sides get an RST), a stall (what the broker sends is read
//! and dropped, so an edge receives nothing and confirms nothing while its own frames still
//! pass; the cluster hand-off tests), closing every connection at once, and a slow link (the
//! broker-to-edge direction read at a fixed byte rate through a small socket buffer).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Read size and socket receive buffer of a throttled connection.
const THROTTLE_BUFFER_BYTES: usize = 4096;

pub struct LinkProxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    /// Resets asked for; each live connection carries it out once per increment.
    resets_asked: AtomicU64,
    /// Resets carried out (mid-read, with bytes of the read still held back).
    resets_done: AtomicU64,
    /// Connections accepted from edges.
    accepted: AtomicU64,
    delay_us: AtomicU64,
    /// Broker-to-edge bytes per second (0: as fast as it comes).
    rate_bytes_per_s: AtomicU64,
    /// Drop everything the broker sends.
    stalled: AtomicBool,
    /// Close every new connection at once (an edge cannot re-link).
    refusing: AtomicBool,
    /// Both sockets of every connection accepted, for `close_all`.
    live: std::sync::Mutex<Vec<TcpStream>>,
}

fn connect_upstream(upstream: SocketAddr, small_buffer: bool) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(upstream),
        socket2::Type::STREAM,
        None,
    )?;
    if small_buffer {
        sock.set_recv_buffer_size(THROTTLE_BUFFER_BYTES)?;
    }
    sock.connect_timeout(&upstream.into(), Duration::from_secs(2))?;
    Ok(sock.into())
}

impl LinkProxy {
    /// Listens on 127.0.0.1:0 and forwards each connection to `upstream`.
    pub fn start(upstream: SocketAddr, delay: Duration) -> LinkProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("proxy addr");
        let shared = Arc::new(Shared::default());
        shared
            .delay_us
            .store(delay.as_micros() as u64, Ordering::Relaxed);
        let s = shared.clone();
        let thread = std::thread::spawn(move || {
            while !s.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((edge, _)) => {
                        s.accepted.fetch_add(1, Ordering::Relaxed);
                        if s.refusing.load(Ordering::SeqCst) {
                            drop(edge);
                            continue;
                        }
                        // Throttled: a small receive buffer set before connecting (so the
                        // window is small from the handshake on; shrinking it on a connected
                        // socket makes the kernel drop segments it had already advertised room
                        // for, and the sender backs off for seconds), so the kernel does not
                        // absorb what a slow link would leave queued on the broker.
                        let throttled = s.rate_bytes_per_s.load(Ordering::Relaxed) > 0;
                        let Ok(broker) = connect_upstream(upstream, throttled) else {
                            continue;
                        };
                        let _ = edge.set_nonblocking(false);
                        let _ = edge.set_nodelay(true);
                        let _ = broker.set_nodelay(true);
                        if let (Ok(e), Ok(b), Ok(mut live)) =
                            (edge.try_clone(), broker.try_clone(), s.live.lock())
                        {
                            live.retain(|c| c.peer_addr().is_ok());
                            live.extend([e, b]);
                        }
                        splice(edge, broker, &s);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        LinkProxy {
            addr,
            shared,
            thread: Some(thread),
        }
    }

    /// Resets every live connection in the middle of its next read from the broker.
    pub fn reset(&self) {
        self.shared.resets_asked.fetch_add(1, Ordering::Relaxed);
    }

    pub fn resets_done(&self) -> u64 {
        self.shared.resets_done.load(Ordering::Relaxed)
    }

    /// Reads the broker's side at `bytes_per_s` (a slow link: the broker's link queue fills
    /// behind it); 0 lifts it. Connections accepted while it is set get a small socket buffer.
    pub fn throttle(&self, bytes_per_s: u64) {
        self.shared
            .rate_bytes_per_s
            .store(bytes_per_s, Ordering::Relaxed);
    }

    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// While on, everything the broker sends is read and dropped (the edge's frames still pass).
    pub fn stall(&self, on: bool) {
        self.shared.stalled.store(on, Ordering::SeqCst);
    }

    /// While on, a new connection is closed as soon as it is accepted (the edge's re-links
    /// fail and back off).
    pub fn refuse(&self, on: bool) {
        self.shared.refusing.store(on, Ordering::SeqCst);
    }

    /// Closes every connection now (the edges re-link through the proxy).
    pub fn close_all(&self) {
        if let Ok(mut live) = self.shared.live.lock() {
            for c in live.drain(..) {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Both directions of one proxied connection, each a reader thread and a delayed writer.
fn splice(edge: TcpStream, broker: TcpStream, s: &Arc<Shared>) {
    let (Ok(e2), Ok(b2)) = (edge.try_clone(), broker.try_clone()) else {
        return;
    };
    let up = pump(edge, b2, s.clone(), false);
    let down = pump(broker, e2, s.clone(), true);
    std::thread::spawn(move || {
        let _ = up.join();
        let _ = down.join();
    });
}

/// Reads `from`, writes to `to` after the delay. The broker-to-edge pump (`cuts`) carries out
/// resets: it passes on half of the read it holds, then aborts both sockets (SO_LINGER 0, so
/// the close sends RST).
fn pump(mut from: TcpStream, to: TcpStream, s: Arc<Shared>, cuts: bool) -> JoinHandle<()> {
    let (tx, rx) = channel::<(Instant, Vec<u8>)>();
    let resets_seen = s.resets_asked.load(Ordering::Relaxed);
    let writer_to = to.try_clone().expect("clone");
    let writer = std::thread::spawn(move || delay_line(rx, writer_to));
    std::thread::spawn(move || {
        let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
        let mut buf = vec![0u8; 64 * 1024];
        let rate_now = || match cuts {
            true => s.rate_bytes_per_s.load(Ordering::Relaxed),
            false => 0,
        };
        if rate_now() > 0 {
            buf.truncate(THROTTLE_BUFFER_BYTES);
        }
        loop {
            if s.stop.load(Ordering::Relaxed) {
                break;
            }
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(_) => break,
            };
            if cuts && s.stalled.load(Ordering::SeqCst) {
                continue;
            }
            let due = Instant::now() + Duration::from_micros(s.delay_us.load(Ordering::Relaxed));
            if cuts && s.resets_asked.load(Ordering::Relaxed) > resets_seen && n >= 2 {
                // Half of this read goes out, the rest never does: the edge holds a partial
                // frame when the RST comes.
                let _ = tx.send((due, buf[..n / 2].to_vec()));
                drop(tx);
                let _ = writer.join();
                for sock in [&from, &to] {
                    let _ = socket2::SockRef::from(sock).set_linger(Some(Duration::ZERO));
                    let _ = sock.shutdown(Shutdown::Read);
                }
                s.resets_done.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if tx.send((due, buf[..n].to_vec())).is_err() {
                break;
            }
            if let Some(us) = (n as u64 * 1_000_000).checked_div(rate_now()) {
                std::thread::sleep(Duration::from_micros(us));
            }
        }
        drop(tx);
        let _ = writer.join();
        let _ = to.shutdown(Shutdown::Write);
    })
}

fn delay_line(rx: Receiver<(Instant, Vec<u8>)>, mut to: TcpStream) {
    for (due, bytes) in rx {
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        if to.write_all(&bytes).is_err() {
            return;
        }
    }
}
