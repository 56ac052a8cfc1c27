//! Who may push what, how big and how fast. Sans-io: plain structs taking `now`.
//!
//! Split by who may touch what (issue 14): [`Policy`] is read-only after start (keys, scopes,
//! size, JSON shape; per-key rates as lock-free GCRA atomics), so every receiving thread checks
//! a push without a lock; [`Rates`] holds the per-target buckets of the scopes one shard owns,
//! one per shard, so pushes to different shards never contend and no global lock sits on the
//! push path.
//!
//! Invariants:
//! - Checks run in a fixed order (key, scope, size, shape, rates) so a caller always learns the
//!   first thing it got wrong, and a refused push never spends rate tokens.
//! - A push spends a token from its key's bucket *and* from its target's bucket (room, area or
//!   global), or from neither: both are checked before either is spent.
//! - The per-target table is bounded by `rooms_max`; full (idle) buckets are forgotten first,
//!   which loses nothing because a forgotten bucket comes back full.

use crate::config::{ApiKey, Config, ScopeKind};
use proto::id::{AreaId, RoomId, Scope};
use proto::ingest::PushError;
use std::collections::HashMap;
use std::time::Instant;

/// A token bucket: `rate_per_s` tokens a second, holding at most `burst`. Rate 0 = unlimited.
#[derive(Clone, Debug)]
pub struct Bucket {
    rate_per_s: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub fn new(rate_per_s: f64, burst: f64, now: Instant) -> Bucket {
        // A bucket smaller than one token could never pass a push.
        let burst = burst.max(1.0);
        Bucket {
            rate_per_s,
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + dt * self.rate_per_s).min(self.burst);
    }

    /// Ok if one token is available now (not spent), else how long until it is, ms (at least 1).
    pub fn check(&mut self, now: Instant) -> Result<(), u32> {
        if self.rate_per_s == 0.0 {
            return Ok(());
        }
        self.refill(now);
        if self.tokens >= 1.0 {
            Ok(())
        } else {
            let ms = ((1.0 - self.tokens) / self.rate_per_s * 1000.0).ceil();
            Err(ms.clamp(1.0, u32::MAX as f64) as u32)
        }
    }

    /// Spends one token (call after `check` said Ok).
    pub fn spend(&mut self) {
        if self.rate_per_s != 0.0 {
            self.tokens -= 1.0;
        }
    }

    fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

/// Index of an authenticated key in one policy (a connection keeps it after `Auth`). A
/// reload makes a new policy: an id of an older one is refused by it
/// ([`Policy::is_current`]), so a connection authenticates its secret again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KeyId {
    index: usize,
    generation: u64,
}

impl KeyId {
    /// The key's position in `api_keys` (alike on every broker of a cluster sharing the list).
    pub(crate) fn index(self) -> usize {
        self.index
    }

    /// A key id for unit tests of tables keyed by it.
    #[cfg(test)]
    pub(crate) fn for_tests(n: usize) -> KeyId {
        KeyId {
            index: n,
            generation: 0,
        }
    }
}

/// Policies made so far in this process: each gets the next number as its generation.
static GENERATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A key's rate limit as GCRA over one atomic (the token bucket's twin: `burst` pushes at once,
/// then `rate_per_s`), so any thread can spend from it without a lock. `tat_ns` is the
/// theoretical arrival time in nanoseconds since the policy's `base`.
#[derive(Debug)]
struct KeyRate {
    /// Nanoseconds between pushes at the sustained rate; 0 = unlimited.
    interval_ns: u64,
    /// How far ahead of now `tat_ns` may run: `(burst - 1) * interval_ns`.
    tolerance_ns: u64,
    tat_ns: std::sync::atomic::AtomicU64,
}

impl KeyRate {
    fn new(rate_per_s: f64, burst: f64) -> KeyRate {
        let interval_ns = if rate_per_s > 0.0 {
            (1e9 / rate_per_s).round().clamp(1.0, u64::MAX as f64) as u64
        } else {
            0
        };
        let burst = burst.max(1.0);
        KeyRate {
            interval_ns,
            tolerance_ns: ((burst - 1.0) * interval_ns as f64).clamp(0.0, u64::MAX as f64) as u64,
            tat_ns: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Ok if a push may pass at `now_ns` (nothing spent), else the wait in ms (at least 1).
    fn peek(&self, now_ns: u64) -> Result<(), u32> {
        if self.interval_ns == 0 {
            return Ok(());
        }
        let tat = self
            .tat_ns
            .load(std::sync::atomic::Ordering::Acquire)
            .max(now_ns);
        self.verdict(tat, now_ns)
    }

    fn verdict(&self, tat: u64, now_ns: u64) -> Result<(), u32> {
        let ahead = tat.saturating_sub(now_ns);
        if ahead <= self.tolerance_ns {
            Ok(())
        } else {
            let wait_ns = ahead - self.tolerance_ns;
            Err(wait_ns.div_ceil(1_000_000).clamp(1, u64::from(u32::MAX)) as u32)
        }
    }

    /// Spends one push if it may pass (compare-and-swap: no lock, no overspend under races).
    fn spend(&self, now_ns: u64) -> Result<(), u32> {
        use std::sync::atomic::Ordering::{AcqRel, Acquire};
        if self.interval_ns == 0 {
            return Ok(());
        }
        let mut cur = self.tat_ns.load(Acquire);
        loop {
            let tat = cur.max(now_ns);
            self.verdict(tat, now_ns)?;
            match self
                .tat_ns
                .compare_exchange_weak(cur, tat + self.interval_ns, AcqRel, Acquire)
            {
                Ok(_) => return Ok(()),
                Err(actual) => cur = actual,
            }
        }
    }
}

struct KeyState {
    /// The secret, compared in constant time after the lookup by its hash.
    key: Vec<u8>,
    scopes: u8,
    rate: KeyRate,
}

/// What the per-target limit is keyed by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Target {
    Room(RoomId),
    Area(AreaId),
    Global,
}

/// The push policy of one broker: keys, scopes, sizes and shapes (stateless, so every
/// receiving thread checks without a lock) and the per-key rates (lock-free). The per-target
/// rates live in [`Rates`], one per owning shard.
pub struct Policy {
    keys: Vec<KeyState>,
    /// Keys by a keyed hash of the secret (random per process): the lookup compares no
    /// secret bytes; [`Policy::authenticate`] then compares the candidates in constant time.
    by_hash: HashMap<u64, Vec<KeyId>>,
    hasher: std::collections::hash_map::RandomState,
    /// Time zero of the key rates.
    base: Instant,
    message_bytes_max: u32,
    /// Which policy of this process this is (key ids carry it).
    generation: u64,
}

/// The per-target (room, area, global) token buckets of the scopes one shard owns. Bounded
/// by `rooms_max`; full (idle) buckets are forgotten first.
pub struct Rates {
    targets: HashMap<Target, Bucket>,
    room_rate_per_s: f64,
    room_burst: f64,
    rooms_max: usize,
}

impl Rates {
    pub fn new(config: &Config) -> Rates {
        Rates {
            targets: HashMap::new(),
            room_rate_per_s: config.room_rate_per_s,
            room_burst: config.room_burst,
            rooms_max: config.rooms_max.max(1),
        }
    }

    /// Rooms/areas the per-target limiter tracks now.
    pub fn targets_tracked(&self) -> usize {
        self.targets.len()
    }
}

impl Policy {
    pub fn new(config: &Config, now: Instant) -> Policy {
        let mut keys = Vec::new();
        let hasher = std::collections::hash_map::RandomState::new();
        let mut by_hash: HashMap<u64, Vec<KeyId>> = HashMap::new();
        let generation = GENERATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for ApiKey {
            key,
            scopes,
            rate_per_s,
            burst,
        } in &config.api_keys
        {
            let id = KeyId {
                index: keys.len(),
                generation,
            };
            keys.push(KeyState {
                key: key.as_bytes().to_vec(),
                scopes: scopes.iter().fold(0, |acc, s| acc | s.bit()),
                rate: KeyRate::new(*rate_per_s, *burst),
            });
            // A repeated key keeps its first entry (the first candidate that matches).
            by_hash
                .entry(std::hash::BuildHasher::hash_one(&hasher, key.as_bytes()))
                .or_default()
                .push(id);
        }
        Policy {
            keys,
            by_hash,
            hasher,
            base: now,
            message_bytes_max: config.message_bytes_max,
            generation,
        }
    }

    /// Whether `key` was given by this policy (not by one a reload replaced).
    pub fn is_current(&self, key: KeyId) -> bool {
        key.generation == self.generation
    }

    fn key(&self, key: KeyId) -> Option<&KeyState> {
        if !self.is_current(key) {
            return None;
        }
        self.keys.get(key.index)
    }

    /// The key id for an API key string.
    pub fn authenticate(&self, api_key: &str) -> Result<KeyId, PushError> {
        let h = std::hash::BuildHasher::hash_one(&self.hasher, api_key.as_bytes());
        self.by_hash
            .get(&h)
            .and_then(|ids| {
                ids.iter().copied().find(|id| {
                    self.keys
                        .get(id.index)
                        .is_some_and(|k| net::secret::ct_eq(&k.key, api_key.as_bytes()))
                })
            })
            .ok_or(PushError::Unauthorized)
    }

    /// Configured keys.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Whether `key` holds `kind` (for [`ScopeKind::Presence`], which no push checks).
    pub fn allows(&self, key: KeyId, kind: ScopeKind) -> bool {
        self.key(key).is_some_and(|k| k.scopes & kind.bit() != 0)
    }

    /// The stateless checks, in order: key, scope, size, JSON shape. Any thread, no lock.
    pub fn check(&self, key: KeyId, scope: &Scope, body: &[u8]) -> Result<(), PushError> {
        let Some(k) = self.key(key) else {
            return Err(PushError::Unauthorized);
        };
        if k.scopes & ScopeKind::of(scope).bit() == 0 {
            return Err(PushError::ForbiddenScope);
        }
        check_scope(scope)?;
        if body.len() > self.message_bytes_max as usize {
            return Err(PushError::TooLarge);
        }
        check_json_object(body)
    }

    /// The rates of a push that passed [`Policy::check`]: its key's and its target's (in
    /// `rates`, the owning shard's), both checked before either is spent.
    pub fn spend(
        &self,
        rates: &mut Rates,
        key: KeyId,
        scope: &Scope,
        now: Instant,
    ) -> Result<(), PushError> {
        let Some(k) = self.key(key) else {
            return Err(PushError::Unauthorized);
        };
        let now_ns = now
            .saturating_duration_since(self.base)
            .as_nanos()
            .min(u128::from(u64::MAX)) as u64;
        let target = match scope {
            Scope::Room(r) => Some(Target::Room(*r)),
            Scope::Area(a) => Some(Target::Area(*a)),
            Scope::Global => Some(Target::Global),
            // A user or device push reaches a handful of connections; only the key's rate applies.
            Scope::User(_) | Scope::Device(_) => None,
        };
        let key_wait = k.rate.peek(now_ns).err();
        let target_wait = match target {
            Some(t) if rates.room_rate_per_s > 0.0 => {
                if !rates.targets.contains_key(&t) && rates.targets.len() >= rates.rooms_max {
                    rates.targets.retain(|_, b| !b.is_full(now));
                    if rates.targets.len() >= rates.rooms_max {
                        return Err(PushError::Overloaded);
                    }
                }
                let (rate, burst) = (rates.room_rate_per_s, rates.room_burst);
                rates
                    .targets
                    .entry(t)
                    .or_insert_with(|| Bucket::new(rate, burst, now))
                    .check(now)
                    .err()
            }
            _ => None,
        };
        if key_wait.is_some() || target_wait.is_some() {
            let retry_after_ms = key_wait.unwrap_or(0).max(target_wait.unwrap_or(0));
            return Err(PushError::RateLimited { retry_after_ms });
        }
        // Another thread may have spent the key's last token since the peek: then refuse,
        // with the target still unspent.
        k.rate
            .spend(now_ns)
            .map_err(|retry_after_ms| PushError::RateLimited { retry_after_ms })?;
        if let Some(t) = target {
            if let Some(b) = rates.targets.get_mut(&t) {
                b.spend();
            }
        }
        Ok(())
    }

    /// [`Policy::check`] then [`Policy::spend`]: a whole admission on one thread (tests, tools).
    pub fn admit(
        &self,
        rates: &mut Rates,
        key: KeyId,
        scope: &Scope,
        body: &[u8],
        now: Instant,
    ) -> Result<(), PushError> {
        self.check(key, scope, body)?;
        self.spend(rates, key, scope, now)
    }
}

/// Scope fields a push may not carry.
fn check_scope(scope: &Scope) -> Result<(), PushError> {
    if let Scope::Device(d) = scope {
        if d.0.is_empty() || d.0.len() > proto::limits::DEVICE_BYTES_MAX {
            return Err(PushError::Invalid(format!(
                "device id must be 1..={} bytes",
                proto::limits::DEVICE_BYTES_MAX
            )));
        }
    }
    Ok(())
}

/// Deepest nesting of arrays and objects a pushed body may have. Danmaku bodies nest 3 or 4
/// deep; clients with recursive parsers crash on thousands.
pub const JSON_DEPTH_MAX: usize = 32;

/// The body must be one JSON object (clients parse op 5 bodies as objects), with nothing after
/// it, valid UTF-8 throughout (serde skips the bytes of strings it ignores without checking
/// them), and nested at most [`JSON_DEPTH_MAX`] deep. Validates without building a tree.
pub fn check_json_object(body: &[u8]) -> Result<(), PushError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(PushError::Invalid("body must be a JSON object".to_string()));
    }
    if let Err(e) = std::str::from_utf8(body) {
        return Err(PushError::Invalid(format!(
            "body is not valid UTF-8 (at byte {})",
            e.valid_up_to()
        )));
    }
    let depth = json_depth(body);
    if depth > JSON_DEPTH_MAX {
        return Err(PushError::Invalid(format!(
            "body nests deeper than {JSON_DEPTH_MAX} levels"
        )));
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(body)
        .map(|_| ())
        .map_err(|e| PushError::Invalid(format!("body is not valid JSON: {e}")))
}

/// The deepest nesting of `[`/`{` outside strings. One pass, no recursion; stops counting
/// once past the limit. Malformed input gives some number; the parser judges it after.
fn json_depth(body: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &b in body {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
                if deepest > JSON_DEPTH_MAX {
                    return deepest;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::id::{DeviceId, UserId};
    use std::time::Duration;

    fn config() -> Config {
        Config {
            api_keys: vec![
                ApiKey {
                    key: "all".into(),
                    scopes: ScopeKind::ALL.to_vec(),
                    rate_per_s: 0.0,
                    burst: 0.0,
                },
                ApiKey {
                    key: "rooms".into(),
                    scopes: vec![ScopeKind::Room],
                    rate_per_s: 10.0,
                    burst: 2.0,
                },
            ],
            room_rate_per_s: 0.0,
            message_bytes_max: 64,
            ..Config::default()
        }
    }

    #[test]
    fn keys_and_scopes() {
        let t0 = Instant::now();
        let p = Policy::new(&config(), t0);
        let mut rates = Rates::new(&config());
        assert_eq!(p.authenticate("nope"), Err(PushError::Unauthorized));
        let all = p.authenticate("all").unwrap();
        let rooms = p.authenticate("rooms").unwrap();
        assert_ne!(all, rooms);
        assert_eq!(p.key_count(), 2);
        assert_eq!(
            p.admit(&mut rates, rooms, &Scope::Global, b"{}", t0),
            Err(PushError::ForbiddenScope)
        );
        assert_eq!(
            p.admit(&mut rates, rooms, &Scope::Room(RoomId(1)), b"{}", t0),
            Ok(())
        );
        assert_eq!(
            p.admit(&mut rates, all, &Scope::User(UserId(5)), b"{}", t0),
            Ok(())
        );
        assert!(matches!(
            p.admit(
                &mut rates,
                all,
                &Scope::Device(DeviceId(String::new())),
                b"{}",
                t0
            ),
            Err(PushError::Invalid(_))
        ));
    }

    #[test]
    fn body_shape_and_size() {
        let t0 = Instant::now();
        let p = Policy::new(&config(), t0);
        let mut rates = Rates::new(&config());
        let k = p.authenticate("all").unwrap();
        let r = Scope::Room(RoomId(1));
        assert_eq!(
            p.admit(
                &mut rates,
                k,
                &r,
                br#" {"cmd":"DANMU_MSG","info":[1,"x"]} "#,
                t0
            ),
            Ok(())
        );
        for bad in [
            &b"[1,2]"[..],
            b"\"s\"",
            b"{",
            b"{} {}",
            b"",
            b"nul",
            b"{\"a\":}",
        ] {
            assert!(
                matches!(
                    p.admit(&mut rates, k, &r, bad, t0),
                    Err(PushError::Invalid(_))
                ),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let big = format!("{{\"a\":\"{}\"}}", "x".repeat(64));
        assert_eq!(
            p.admit(&mut rates, k, &r, big.as_bytes(), t0),
            Err(PushError::TooLarge)
        );
    }

    /// Regression (issue 17): invalid UTF-8 inside a string and 10,000-deep nesting passed.
    #[test]
    fn invalid_utf8_and_deep_nesting_are_refused() {
        let bad_utf8 = b"{\"a\":\"\xff\xfe\"}";
        assert!(
            matches!(check_json_object(bad_utf8), Err(PushError::Invalid(m)) if m.contains("UTF-8"))
        );
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(
            matches!(check_json_object(deep.as_bytes()), Err(PushError::Invalid(m)) if m.contains("deeper"))
        );
        // At the limit is fine; brackets inside strings do not count.
        let ok = format!(
            "{{\"s\":\"[[[[\\\"{{{{\",\"a\":{}{}}}",
            "[".repeat(JSON_DEPTH_MAX - 1),
            "]".repeat(JSON_DEPTH_MAX - 1)
        );
        assert_eq!(check_json_object(ok.as_bytes()), Ok(()), "{ok}");
        assert_eq!(check_json_object("{\"t\":\"弹幕 ✓\"}".as_bytes()), Ok(()));
    }

    #[test]
    fn key_bucket_limits_and_refills() {
        let t0 = Instant::now();
        let p = Policy::new(&config(), t0);
        let mut rates = Rates::new(&config());
        let k = p.authenticate("rooms").unwrap();
        let r = Scope::Room(RoomId(1));
        assert_eq!(p.admit(&mut rates, k, &r, b"{}", t0), Ok(()));
        assert_eq!(p.admit(&mut rates, k, &r, b"{}", t0), Ok(()));
        // Empty: one token takes 100 ms at 10/s.
        assert_eq!(
            p.admit(&mut rates, k, &r, b"{}", t0),
            Err(PushError::RateLimited {
                retry_after_ms: 100
            })
        );
        // Refused pushes spend nothing: after 100 ms exactly one more passes.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(p.admit(&mut rates, k, &r, b"{}", t1), Ok(()));
        assert!(matches!(
            p.admit(&mut rates, k, &r, b"{}", t1),
            Err(PushError::RateLimited { .. })
        ));
    }

    /// The key rate is one atomic shared by every receiving thread: racing threads never
    /// spend more than the burst between them (issue 14: no global lock, no overspend).
    #[test]
    fn key_rate_is_exact_across_threads_without_a_lock() {
        let t0 = Instant::now();
        let mut c = config();
        c.api_keys[1].rate_per_s = 1.0;
        c.api_keys[1].burst = 100.0;
        let p = std::sync::Arc::new(Policy::new(&c, t0));
        let k = p.authenticate("rooms").unwrap();
        let passed = std::sync::atomic::AtomicU32::new(0);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (p, passed, c) = (p.clone(), &passed, &c);
                s.spawn(move || {
                    let mut rates = Rates::new(c);
                    for i in 0..100u64 {
                        let room = Scope::Room(RoomId(t * 1000 + i));
                        if p.admit(&mut rates, k, &room, b"{}", t0).is_ok() {
                            passed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(passed.load(std::sync::atomic::Ordering::Relaxed), 100);
        let mut rates = Rates::new(&c);
        assert_eq!(
            p.admit(&mut rates, k, &Scope::Room(RoomId(1)), b"{}", t0),
            Err(PushError::RateLimited {
                retry_after_ms: 1000
            })
        );
    }

    #[test]
    fn room_cap_is_per_room_and_spends_nothing_when_refused() {
        let t0 = Instant::now();
        let mut c = config();
        c.room_rate_per_s = 1.0;
        c.room_burst = 1.0;
        let p = Policy::new(&c, t0);
        let mut rates = Rates::new(&c);
        let k = p.authenticate("all").unwrap();
        let k2 = p.authenticate("rooms").unwrap();
        assert_eq!(
            p.admit(&mut rates, k, &Scope::Room(RoomId(1)), b"{}", t0),
            Ok(())
        );
        assert_eq!(
            p.admit(&mut rates, k, &Scope::Room(RoomId(1)), b"{}", t0),
            Err(PushError::RateLimited {
                retry_after_ms: 1000
            })
        );
        // Another key hits the same room cap, without spending its own key tokens.
        assert!(matches!(
            p.admit(&mut rates, k2, &Scope::Room(RoomId(1)), b"{}", t0),
            Err(PushError::RateLimited { .. })
        ));
        assert_eq!(
            p.admit(&mut rates, k2, &Scope::Room(RoomId(2)), b"{}", t0),
            Ok(())
        );
        assert_eq!(
            p.admit(&mut rates, k2, &Scope::Room(RoomId(3)), b"{}", t0),
            Ok(())
        );
        // Rooms and areas with the same number are separate targets.
        assert_eq!(
            p.admit(&mut rates, k, &Scope::Area(AreaId(1)), b"{}", t0),
            Ok(())
        );
    }

    #[test]
    fn target_table_is_bounded() {
        let t0 = Instant::now();
        let mut c = config();
        c.room_rate_per_s = 1.0;
        c.room_burst = 1.0;
        c.rooms_max = 2;
        let p = Policy::new(&c, t0);
        let mut rates = Rates::new(&c);
        let k = p.authenticate("all").unwrap();
        assert_eq!(
            p.admit(&mut rates, k, &Scope::Room(RoomId(1)), b"{}", t0),
            Ok(())
        );
        assert_eq!(
            p.admit(&mut rates, k, &Scope::Room(RoomId(2)), b"{}", t0),
            Ok(())
        );
        // Both buckets are in use: a third room cannot be tracked yet.
        assert_eq!(
            p.admit(&mut rates, k, &Scope::Room(RoomId(3)), b"{}", t0),
            Err(PushError::Overloaded)
        );
        // Once they refill (idle), they are forgotten and room 3 gets a bucket.
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(
            p.admit(&mut rates, k, &Scope::Room(RoomId(3)), b"{}", t1),
            Ok(())
        );
        assert_eq!(rates.targets_tracked(), 1);
    }
}
