//! Seeded simulation of one shard core against a simple model.
//!
//! A deterministic driver (seeded `StdRng`) plays clients and the shell: random connects,
//! auths, heartbeats, silences, slow readers (a writer that never completes), peer closes,
//! room batches, small time steps and large jumps (the run may start just below 2^32 ms).
//! After every step it checks the core against the model:
//! - every keeping-up viewer received exactly the batches of its room sent while it was
//!   seated, in order, with no gap and no duplicate;
//! - every close has a reason the model agrees with (auth deadline, heartbeat silence, stuck
//!   queue, the peer), the per-reason counters match, and no connection outlives its deadline
//!   by more than two timer ticks;
//! - connection and seat counts match.
//!
//! `cargo test -p edge sim_` runs [`CI_SEEDS`] seeds in seconds. Long runs by hand:
//! `EDGE_SIM_SEEDS=2000 EDGE_SIM_STEPS=20000 cargo test -p edge --release sim_long -- --ignored`
//! (`EDGE_SIM_SEED=N` replays one seed).

use super::harness::*;
use super::*;
use proto::packet::op;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Seeds run by the CI test.
const CI_SEEDS: u64 = 8;
/// Steps per seed in the CI test.
const CI_STEPS: usize = 1_500;
/// Clients alive at most at once.
const CLIENTS_MAX: usize = 40;
const ROOMS: u64 = 3;
const TICK_MS: u64 = 50;

#[derive(Debug)]
struct Client {
    id: ConnId,
    authed: bool,
    room: u64,
    opened_ms: u64,
    last_seen_ms: u64,
    /// Its writer took one transmit and never completes it.
    slow: bool,
    expected: Vec<u64>,
    got: Vec<u64>,
}

struct Sim {
    h: Harness,
    rng: StdRng,
    clients: Vec<Client>,
    /// Closes the model has explained, by reason.
    closes: HashMap<&'static str, u64>,
    next_seq: [u64; ROOMS as usize],
    next_uid: u64,
    hb_ms: u64,
    auth_ms: u64,
}

fn sim_config() -> crate::config::Config {
    let mut c = config();
    c.heartbeat_timeout_ms = 3_000;
    c.auth_ms_max = 1_000;
    c.stuck_ms_max = 2_000;
    c.send_queue_bytes_max = 4_096;
    c.counts_interval_ms = 500;
    c.timer_tick_ms = TICK_MS;
    c
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let cfg = sim_config();
        let (hb_ms, auth_ms) = (cfg.heartbeat_timeout_ms, cfg.auth_ms_max);
        let mut rng = StdRng::seed_from_u64(seed);
        let mut h = Harness::new(cfg);
        // Half the runs start just below the old u32 wrap, so they cross it.
        if rng.gen_bool(0.5) {
            h.jump((1u64 << 32) - rng.gen_range(0..20_000));
        }
        Sim {
            h,
            rng,
            clients: Vec::new(),
            closes: HashMap::new(),
            next_seq: [1; ROOMS as usize],
            next_uid: 1,
            hb_ms,
            auth_ms,
        }
    }

    fn step(&mut self) {
        let now = self.h.ms();
        match self.rng.gen_range(0..100) {
            0..=14 if self.clients.len() < CLIENTS_MAX => {
                let id = self.h.accept(Transport::Tcp);
                self.clients.push(Client {
                    id,
                    authed: false,
                    room: 0,
                    opened_ms: now,
                    last_seen_ms: now,
                    slow: false,
                    expected: Vec::new(),
                    got: Vec::new(),
                });
            }
            15..=29 => {
                if let Some(i) = self.pick(|c| !c.authed) {
                    let room = self.rng.gen_range(0..ROOMS);
                    let uid = self.next_uid;
                    self.next_uid += 1;
                    let c = &mut self.clients[i];
                    self.h.send(c.id, &auth_packet(uid, room, 0));
                    c.authed = true;
                    c.room = room;
                    c.last_seen_ms = now;
                }
            }
            30..=49 => {
                if let Some(i) = self.pick(|c| c.authed) {
                    let c = &mut self.clients[i];
                    self.h.send(c.id, &heartbeat_packet());
                    c.last_seen_ms = now;
                }
            }
            50..=53 => {
                if let Some(i) = self.pick(|c| c.authed && !c.slow) {
                    let id = self.clients[i].id;
                    // The writer takes what is queued and never reports it written.
                    let mut bufs = Vec::new();
                    if self.h.core.take_transmit(id, &mut bufs) == Transmit::Write {
                        self.clients[i].slow = true;
                    }
                }
            }
            54..=57 => {
                if let Some(i) = self.pick(|_| true) {
                    let c = self.clients.swap_remove(i);
                    self.h.core.on_closed(c.id, CloseReason::PeerClosed);
                    *self.closes.entry("peer_closed").or_default() += 1;
                }
            }
            58..=79 => {
                let room = self.rng.gen_range(0..ROOMS);
                let seq = self.next_seq[room as usize];
                self.next_seq[room as usize] += 1;
                let body = self.rng.gen_range(10..400);
                self.h.core.on_msg(
                    Msg::Batch(Arc::new(room_batch(room, seq, body))),
                    self.h.now,
                );
                for c in &mut self.clients {
                    if c.authed && c.room == room && !c.slow {
                        c.expected.push(seq);
                    }
                }
            }
            80..=97 => {
                let ms = self.rng.gen_range(1..400);
                self.h.advance(ms, TICK_MS);
            }
            _ => {
                // A stall: one timeout call after a long gap.
                let ms = self.rng.gen_range(1_000..(2 * self.hb_ms));
                self.h.jump(ms);
            }
        }
        self.shell();
        self.check();
    }

    fn pick(&mut self, f: impl Fn(&Client) -> bool) -> Option<usize> {
        let idx: Vec<usize> = (0..self.clients.len())
            .filter(|i| f(&self.clients[*i]))
            .collect();
        if idx.is_empty() {
            return None;
        }
        Some(idx[self.rng.gen_range(0..idx.len())])
    }

    /// Plays the shell: every keeping-up client reads everything; closes are carried out.
    fn shell(&mut self) {
        let _ = self.h.ready();
        let _ = self.h.msgs();
        let now = self.h.ms();
        let mut i = 0;
        while i < self.clients.len() {
            let id = self.clients[i].id;
            let closed = if self.clients[i].slow {
                let gone = self.h.core.must_close(id);
                if gone {
                    self.h.core.on_closed(id, CloseReason::Io);
                }
                gone
            } else {
                let f = self.h.flush(id);
                let c = &mut self.clients[i];
                for (o, seq, body) in packets(&f.bytes) {
                    match o {
                        op::NOTIFICATION => c.got.push(u64::from(seq)),
                        op::AUTH_REPLY => {
                            assert_eq!(body, b"{\"code\":0}", "auth refused");
                        }
                        _ => {}
                    }
                }
                f.closed
            };
            if closed {
                let c = self.clients.swap_remove(i);
                let reason = self.explain(&c, now);
                *self.closes.entry(reason).or_default() += 1;
            } else {
                i += 1;
            }
        }
    }

    /// Why the model thinks `c` was closed; panics when it has no reason.
    fn explain(&self, c: &Client, now: u64) -> &'static str {
        if !c.authed && now - c.opened_ms >= self.auth_ms {
            return "auth_timeout";
        }
        if c.slow {
            // Its queue went over the bound and stayed there, or it fell silent: whichever
            // deadline came first.
            return "slow";
        }
        if c.authed && now - c.last_seen_ms >= self.hb_ms {
            return "heartbeat_timeout";
        }
        panic!(
            "closed without a reason at {now} ms: {c:?} (counters {:?})",
            self.h.metrics().closes
        );
    }

    fn check(&self) {
        let now = self.h.ms();
        let slack = 2 * TICK_MS;
        for c in &self.clients {
            if !c.slow {
                assert_eq!(c.got, c.expected, "delivery of {c:?}");
            }
            let deadline = if c.authed {
                c.last_seen_ms + self.hb_ms
            } else {
                c.opened_ms + self.auth_ms
            };
            assert!(
                now < deadline + slack,
                "{c:?} outlived its deadline {deadline} at {now}"
            );
        }
        let model = |r: &str| self.closes.get(r).copied().unwrap_or(0);
        assert_eq!(
            self.h.closes(CloseReason::AuthTimeout),
            model("auth_timeout")
        );
        assert_eq!(self.h.closes(CloseReason::PeerClosed), model("peer_closed"));
        assert_eq!(
            self.h.closes(CloseReason::HeartbeatTimeout) + self.h.closes(CloseReason::Stuck),
            model("heartbeat_timeout") + model("slow"),
            "silence and stuck closes"
        );
        assert_eq!(self.h.core.len(), self.clients.len(), "open connections");
        let seated = self.clients.iter().filter(|c| c.authed).count();
        assert_eq!(self.h.core.seated(), seated, "seated");
        let m = self.h.metrics();
        assert_eq!(m.conns_tcp.get() as usize, self.clients.len());
        assert_eq!(
            m.pending_handshakes.get() as usize,
            self.clients.iter().filter(|c| !c.authed).count()
        );
    }
}

fn run(seed: u64, steps: usize) {
    let mut s = Sim::new(seed);
    for _ in 0..steps {
        s.step();
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn sim_seeds_against_the_model() {
    if let Ok(seed) = std::env::var("EDGE_SIM_SEED") {
        let seed: u64 = seed.parse().expect("EDGE_SIM_SEED is a number");
        run(seed, env_u64("EDGE_SIM_STEPS", CI_STEPS as u64) as usize);
        return;
    }
    for seed in 0..CI_SEEDS {
        run(seed, CI_STEPS);
    }
}

#[test]
#[ignore = "long run: EDGE_SIM_SEEDS / EDGE_SIM_STEPS"]
fn sim_long() {
    let seeds = env_u64("EDGE_SIM_SEEDS", 500);
    let steps = env_u64("EDGE_SIM_STEPS", 10_000) as usize;
    for seed in 0..seeds {
        run(seed, steps);
    }
}
