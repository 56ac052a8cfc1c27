//! Regions (issue 13, DESIGN §10): federation of several clusters, each with its own NATS and
//! its own JetStream domain, through JetStream stream sources.
//!
//! # Layout of a region's JetStream (when `cluster.regions` is set)
//! Every name is the region's own: ack subjects (`$JS.ACK.<stream>.<consumer>...`) and KV
//! subjects cross leafnodes, so two regions with a stream, consumer or bucket of one name would
//! ack each other's messages.
//!
//! - **Origin stream** `<stream>_ORIGIN_<region>`, subjects `<subject_prefix>.<region>.*`, limits
//!   retention (`origin_age_ms`, `stream_bytes_max`, oldest discarded): every push this region
//!   accepts is published here and answered after its ack. Other regions source from it, so it
//!   keeps a push for `origin_age_ms` whether or not anyone consumed it.
//! - **Work stream** `<stream>_<region>`, no subjects of its own, work-queue retention: it sources the
//!   local origin stream and every other region's origin stream (through `$JS.<region>.API`,
//!   the other JetStream domain). The partition consumers read it with the filter
//!   `<subject_prefix>.*.<p>`, so partition `p` holds every region's pushes of its scopes.
//!
//! # Deduplication
//! One push can reach a work stream twice: an ingest client that failed over to another
//! region and sent the same idempotency key again (stored in two origins), or a high-reach
//! copy (see `Backbone::publish_everywhere`). The work stream must not see two messages with
//! one `Nats-Msg-Id` within its duplicate window: nats-server 2.9 answers a sourced duplicate
//! with an error and restarts the source at that same message, so the source stalls for good
//! (seen in the region failover run; the window cannot be under 100 ms). So with regions the
//! `Nats-Msg-Id` names the region that stored it, `<region>/<key>` ([`nats_msg_id`], a copy
//! `<region>/<key>/copy`): a retry in one region is still deduplicated by that region's origin
//! stream, and no two origins hold one id. The caller's key travels in `Barrage-Key`, and the
//! partition's consumer drops a second copy of one key ([`SeenKeys`]) within
//! `dedup_window_ms`, while a redelivery of the first (the same stream sequence) still goes
//! through.
//! - **Lease bucket** `<lease_bucket>_<region>`.
//!
//! # Headers a region adds to each publish
//! - `Barrage-Region`: the accepting region's name.
//! - `Barrage-Origin-Ms`: the accepting broker's wall clock at publish, ms since the epoch
//!   (staleness across regions, [`Origin::age_ms`]; the regions' clocks are assumed NTP-close).
//! - `Barrage-Id-Base`: the accepting region's id base (its origin stream's creation, µs).
//!
//! # Msg ids
//! With regions, `msg_id = tag(region) << 45 | ((id_base + origin sequence) mod 2^45)`: the
//! same number in every region (computed from the origin's headers and the origin sequence in
//! `Nats-Stream-Source`), different between regions (distinct tags, checked at start), and
//! below 2^53 so a JavaScript client reads it exactly. Without regions, `msg_id = id_base +
//! sequence` as before.

use crate::partition::hash;

/// Header naming the region that accepted a push.
pub const HEADER_REGION: &str = "Barrage-Region";
/// Header carrying the accepting broker's wall clock at publish (ms since the epoch).
pub const HEADER_ORIGIN_MS: &str = "Barrage-Origin-Ms";
/// Header carrying the accepting region's id base.
pub const HEADER_ID_BASE: &str = "Barrage-Id-Base";
/// Header on a high-reach copy published straight into another region's origin stream: the
/// msg id the accepting region answered (see `Backbone::publish_everywhere`).
pub const HEADER_MSG_ID: &str = "Barrage-Msg-Id";
/// Header JetStream puts on a sourced message: `<stream>[:<hash>] <origin sequence> ...`.
pub const HEADER_SOURCE: &str = "Nats-Stream-Source";

/// Bits of a region msg id below the region tag.
const ID_BITS: u32 = 45;
/// Longest region name, bytes (it is a JetStream domain and a subject token).
pub const REGION_BYTES_MAX: usize = 32;

/// Whether `name` can be a region: 1..=32 bytes of `[A-Za-z0-9_-]` (a JetStream domain, a
/// subject token and a KV bucket suffix).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= REGION_BYTES_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The region's 8-bit tag in msg ids: 1..=255 (0 is the single-region layout).
pub fn tag(region: &str) -> u64 {
    hash(region.as_bytes()) % 255 + 1
}

/// The msg id of the push stored at `sequence` in `region`'s origin stream.
pub fn msg_id(region: &str, id_base: u64, sequence: u64) -> u64 {
    let mask = (1u64 << ID_BITS) - 1;
    (tag(region) << ID_BITS) | (id_base.wrapping_add(sequence) & mask)
}

/// Checks a federation: this region is in it, every name is valid, no two tags collide.
pub fn check(region: &str, regions: &[String]) -> Result<(), String> {
    if !regions.iter().any(|r| r == region) {
        return Err(format!(
            "cluster.regions {regions:?} must list this broker's region {region:?}"
        ));
    }
    for (i, r) in regions.iter().enumerate() {
        if !valid_name(r) {
            return Err(format!(
                "region {r:?}: 1..={REGION_BYTES_MAX} bytes of [A-Za-z0-9_-] (it is a JetStream domain)"
            ));
        }
        for other in &regions[..i] {
            if other == r {
                return Err(format!("region {r:?} is listed twice in cluster.regions"));
            }
            if tag(other) == tag(r) {
                return Err(format!(
                    "regions {other:?} and {r:?} hash to the same msg id tag; rename one"
                ));
            }
        }
    }
    Ok(())
}

/// Where and when a consumed push was accepted (from its headers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub region: String,
    /// Accepting broker's wall clock at publish, ms since the epoch.
    pub published_ms: u64,
    /// The accepting region's msg id of it.
    pub msg_id: u64,
    /// Accepted in another region than this one.
    pub foreign: bool,
}

impl Origin {
    /// Reads the origin from a sourced message's header values (`None` when one is missing or
    /// malformed: a message not published by a region broker).
    /// `copy_id` is [`HEADER_MSG_ID`]'s value: a copy names its msg id outright.
    pub fn parse(
        me: &str,
        region: Option<&str>,
        published_ms: Option<&str>,
        id_base: Option<&str>,
        source: Option<&str>,
        copy_id: Option<&str>,
    ) -> Option<Origin> {
        let region = region.filter(|r| valid_name(r))?;
        let published_ms = published_ms?.trim().parse().ok()?;
        let msg_id = match copy_id {
            Some(id) => id.trim().parse().ok()?,
            None => {
                let id_base: u64 = id_base?.trim().parse().ok()?;
                let sequence: u64 = source?.split_whitespace().nth(1)?.parse().ok()?;
                msg_id(region, id_base, sequence)
            }
        };
        Some(Origin {
            region: region.to_owned(),
            published_ms,
            msg_id,
            foreign: region != me,
        })
    }

    /// How old it is at `now_ms` (0 when the origin's clock is ahead).
    pub fn age_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.published_ms)
    }
}

/// Header carrying the caller's dedup key with regions (the `Nats-Msg-Id` names the region).
pub const HEADER_KEY: &str = "Barrage-Key";

/// The `Nats-Msg-Id` of a push stored by `region` with the caller's `key` (see the module
/// doc, Deduplication); `copy` for a high-reach copy into another region's origin.
pub fn nats_msg_id(region: &str, key: &str, copy: bool) -> String {
    match copy {
        true => format!("{region}/{key}/copy"),
        false => format!("{region}/{key}"),
    }
}
/// Keys a partition consumer remembers for [`SeenKeys`]; past it the oldest are forgotten (a
/// later copy of one is then delivered twice, never lost).
pub const SEEN_KEYS_MAX: usize = 200_000;

/// The dedup keys a broker consumed lately, each with the work-stream sequence of its first
/// copy: a second copy (another sequence) of one key within the window is a duplicate; the
/// same sequence again is a redelivery and goes through. Keys are kept as their 64-bit
/// [`hash`] (about 40 bytes an entry, so [`SEEN_KEYS_MAX`] costs under 10 MB). Sans-io: takes
/// `now`.
#[derive(Debug)]
pub struct SeenKeys {
    by_key: std::collections::HashMap<u64, u64>,
    order: std::collections::VecDeque<(std::time::Instant, u64)>,
    window: std::time::Duration,
    keys_max: usize,
}

impl SeenKeys {
    pub fn new(window_ms: u64, keys_max: usize) -> SeenKeys {
        SeenKeys {
            by_key: Default::default(),
            order: Default::default(),
            window: std::time::Duration::from_millis(window_ms),
            keys_max: keys_max.max(1),
        }
    }

    /// Whether the message at `sequence` with `key` is a later copy of one already consumed.
    pub fn is_copy(&mut self, key: &str, sequence: u64, now: std::time::Instant) -> bool {
        let key = hash(key.as_bytes());
        while let Some((at, _)) = self.order.front() {
            if now.saturating_duration_since(*at) < self.window && self.order.len() < self.keys_max
            {
                break;
            }
            if let Some((_, k)) = self.order.pop_front() {
                self.by_key.remove(&k);
            }
        }
        match self.by_key.get(&key) {
            Some(&first) => first != sequence,
            None => {
                self.by_key.insert(key, sequence);
                self.order.push_back((now, key));
                false
            }
        }
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

/// Wall clock, ms since the epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_differ_between_regions_and_stay_below_2_pow_53() {
        let base = 1_764_000_000_000_000;
        let a = msg_id("r1", base, 7);
        let b = msg_id("r2", base, 7);
        assert_ne!(a, b);
        assert!(a < 1 << 53 && b < 1 << 53);
        assert_eq!(a, msg_id("r1", base, 7));
    }

    #[test]
    fn check_refuses_missing_self_duplicates_and_bad_names() {
        let rs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(check("r1", &rs(&["r1", "r2"])).is_ok());
        assert!(check("r3", &rs(&["r1", "r2"])).is_err());
        assert!(check("r1", &rs(&["r1", "r1"])).is_err());
        assert!(check("r1", &rs(&["r1", "a.b"])).is_err());
    }

    #[test]
    fn seen_keys_drop_later_copies_keep_redeliveries_and_stay_bounded() {
        let t0 = std::time::Instant::now();
        let mut s = SeenKeys::new(1_000, 2);
        assert!(!s.is_copy("a", 1, t0));
        assert!(!s.is_copy("a", 1, t0), "a redelivery is not a copy");
        assert!(s.is_copy("a", 7, t0));
        assert!(!s.is_copy("b", 2, t0));
        assert!(!s.is_copy("c", 3, t0), "full: the oldest is forgotten");
        assert!(s.len() <= 2);
        let later = t0 + std::time::Duration::from_millis(1_500);
        assert!(!s.is_copy("b", 9, later), "past the window it is new again");
    }

    #[test]
    fn origin_parses_the_source_header_sequence() {
        let o = Origin::parse(
            "r2",
            Some("r1"),
            Some("1000"),
            Some("5"),
            Some("BARRAGE_ORIGIN:abcd 12 > >"),
            None,
        )
        .unwrap();
        assert_eq!(o.msg_id, msg_id("r1", 5, 12));
        assert!(o.foreign);
        assert_eq!(o.age_ms(1500), 500);
        assert_eq!(o.age_ms(500), 0);
        let parse = |ms, src, copy| Origin::parse("r2", Some("r1"), Some(ms), Some("5"), src, copy);
        assert!(parse("x", Some("S 1"), None).is_none());
        assert!(parse("1", Some("S"), None).is_none());
        assert_eq!(parse("1", Some("S 1"), Some("77")).unwrap().msg_id, 77);
        assert_eq!(parse("1", None, Some("77")).unwrap().msg_id, 77);
    }
}
