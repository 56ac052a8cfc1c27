//! Control's configuration: a TOML file whose every field has a default.
//!
//! Secrets (`api_keys`, `token_keys`, `edge_key`) live here too; keep the file readable by the
//! service user only.

use crate::ControlError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

/// One `[[regions]]` rule: clients whose address is inside `cidr` belong to `region`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegionRule {
    /// `10.0.0.0/8`, `2001:db8::/32`, or a bare address.
    pub cidr: String,
    pub region: String,
}

/// One `[[rooms]]` entry of the room table.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RoomEntry {
    /// The real (long) room id.
    pub room_id: u64,
    /// The short id clients may use instead (0: none).
    #[serde(default)]
    pub short_id: u64,
    /// The streamer's uid, as the room-info endpoints report it.
    #[serde(default)]
    pub uid: u64,
    /// The category area put in this room's tokens (area pushes reach it).
    #[serde(default)]
    pub area: u32,
}

/// Control's configuration.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// HTTP listen address (discovery, tokens, edge heartbeats, metrics).
    pub http_addr: SocketAddr,
    /// API keys that business backends present as `Authorization: Bearer <key>` on `POST /v1/connect`
    /// to get tokens for logged-in users (uid != 0). Guests need no key.
    pub api_keys: Vec<String>,
    /// Token signing keys, `"ID:SECRET,ID:SECRET"` (or a bare `"SECRET"`, id 1). Control signs with
    /// the highest id; edges must hold every id still in use. Required.
    pub token_keys: String,
    /// Lifetime of an issued token. Clients reconnecting after it must ask again. Tokens carry
    /// their expiry in whole seconds, so this is rounded up to one.
    pub token_ttl_ms: u64,
    /// When non-empty, edges must send `Authorization: Bearer <edge_key>` with heartbeats. When
    /// empty, heartbeats are accepted from loopback peers only.
    pub edge_key: String,
    /// An edge silent this long is dead: no longer assigned.
    pub edge_ttl_ms: u64,
    /// A dead edge stays listed (state `dead`) in `GET /v1/edges` this long, then is forgotten.
    pub edge_forget_ms: u64,
    /// Most edges the registry holds.
    pub edges_max: usize,
    /// Edges handed to one client, best first, so it can fall back.
    pub edges_per_client_max: usize,
    /// Region of clients that name none (`?region=`, a trusted header) and match no `regions`
    /// rule, and of clients naming a region nobody knows (counted).
    pub default_region: String,
    /// Honour `X-Client-Region` (set by a trusted front proxy). Leave off when clients reach
    /// control directly: they could pick any region.
    pub trust_region_header: bool,
    /// CIDR -> region rules; the longest matching prefix wins.
    pub regions: Vec<RegionRule>,
    /// This control's region: the region of the edges and brokers that heartbeat it, as peer
    /// controls of other regions are told (`GET /v1/registry`).
    pub region: String,
    /// The controls of the other regions (`host:port`, every replica of each): this control
    /// polls their registries so it can send a client to another region's edges when its own
    /// region has none (docs/operations-control.md, regions). Empty: one region.
    pub peers: Vec<String>,
    /// Bearer presented to the peers (`GET /v1/registry`): one of their `fleet_keys` (or an
    /// API key or their `edge_key`). Empty: none (peers answer loopback callers only).
    pub peer_key: String,
    /// Keys that open the fleet lists (`GET /v1/edges`, `/v1/brokers`, `/v1/registry`) and
    /// nothing else: give one to each other region's control as its `peer_key`, and to
    /// dashboards, rather than a key that can also mint tokens or register edges.
    pub fleet_keys: Vec<String>,
    /// How often each peer's registry is polled. A dark region stops being assigned within
    /// `edge_ttl_ms` plus this.
    pub peer_poll_ms: u64,
    /// Per client region, the regions to fall back to, best first (`sh = ["bj", "gz"]`).
    /// Regions not named follow, most spare capacity first.
    pub region_fallbacks: BTreeMap<String, Vec<String>>,
    /// Of the `edges_per_client_max` edges a client gets, how many are another region's when
    /// its own has edges (more when its own has fewer): where it goes when its region fails
    /// before it can ask control again. 0: other regions only when its own has none.
    pub fallback_edges: usize,
    /// The room table: short ids, streamer uids and areas.
    pub rooms: Vec<RoomEntry>,
    /// Refuse rooms that are not in `rooms` (otherwise any room id is accepted as itself, area 0).
    pub rooms_strict: bool,
    /// Largest request body accepted, bytes.
    pub body_bytes_max: usize,
    /// HTTP admission: deadlines, per-address cap, reserved slots (`[http]`, see `net::http::Limits`).
    pub http: net::http::Limits,
    /// monoio driver for the HTTP thread.
    pub driver: net::runtime::Driver,
    /// Log filter in `RUST_LOG` syntax (`info`, `warn,edge=debug`); empty keeps `RUST_LOG` (or
    /// `info`). A reload (SIGHUP, `POST /admin/reload`) applies a new value.
    pub log_level: String,
    /// The room page, the demo send box and the operator console (`[pages]`, see `pages`).
    pub pages: crate::pages::PagesConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_keys: Vec::new(),
            token_keys: String::new(),
            token_ttl_ms: 3_600_000,
            edge_key: String::new(),
            edge_ttl_ms: 6000,
            edge_forget_ms: 60_000,
            edges_max: 10_000,
            edges_per_client_max: 3,
            default_region: "local".to_string(),
            trust_region_header: false,
            regions: Vec::new(),
            region: "local".to_string(),
            peers: Vec::new(),
            peer_key: String::new(),
            fleet_keys: Vec::new(),
            peer_poll_ms: 1000,
            region_fallbacks: BTreeMap::new(),
            fallback_edges: 1,
            rooms: Vec::new(),
            rooms_strict: false,
            body_bytes_max: 16 * 1024,
            http: net::http::Limits::default(),
            driver: net::runtime::Driver::Auto,
            log_level: String::new(),
            pages: crate::pages::PagesConfig::default(),
        }
    }
}

impl Config {
    /// Reads and checks a TOML file (defaults below it, no environment); unknown keys are an
    /// error (a typo must not silently use a default). `barrage control` loads through
    /// [`net::config::load`] with every layer.
    pub fn from_toml_file(path: &Path) -> Result<Config, ControlError> {
        net::config::load(&net::config::Sources::file(path))
            .map_err(|e| ControlError::Config(e.to_string()))
    }

    /// Refuses weak secrets (token keys, API keys, the edge key) when control listens on a
    /// non-loopback address, warns about them on loopback (see `net::secret`).
    pub fn check_secrets(&self) -> Result<(), ControlError> {
        let addr = self.http_addr.to_string();
        let public = net::secret::any_public([addr.as_str()]);
        let judge = |what: &str, check: Result<(), String>| {
            net::secret::require_strong(public, what, check).map_err(ControlError::Config)
        };
        if !self.token_keys.trim().is_empty() {
            judge("token_keys", proto::token::check_key_spec(&self.token_keys))?;
        }
        for (i, k) in self
            .api_keys
            .iter()
            .enumerate()
            .filter(|(_, k)| !k.is_empty())
        {
            judge(&format!("api_keys[{i}]"), net::secret::check(k))?;
        }
        if public {
            tracing::warn!(http_addr = %self.http_addr, "control is not on loopback: /metrics is readable by anyone who reaches it");
        }
        if !self.peer_key.is_empty() {
            judge("peer_key", net::secret::check(&self.peer_key))?;
        }
        for (i, k) in self.fleet_keys.iter().enumerate() {
            judge(&format!("fleet_keys[{i}]"), net::secret::check(k))?;
        }
        if !self.edge_key.is_empty() {
            judge("edge_key", net::secret::check(&self.edge_key))?;
        } else if public {
            tracing::warn!(
                "edge_key is empty: edge heartbeats are accepted from loopback peers only"
            );
        }
        Ok(())
    }

    /// Parses and checks TOML text.
    pub fn from_toml_str(text: &str) -> Result<Config, ControlError> {
        net::config::load(&net::config::Sources::text(text))
            .map_err(|e| ControlError::Config(e.to_string()))
    }

    /// Checks values that parse but would make control misbehave.
    pub fn validate(&self) -> Result<(), ControlError> {
        let bad = |m: &str| Err(ControlError::Config(m.to_string()));
        if self.token_ttl_ms < 1000 {
            return bad("token_ttl_ms must be at least 1000 (tokens expire in whole seconds)");
        }
        if self.edge_ttl_ms == 0 || self.edge_forget_ms < self.edge_ttl_ms {
            return bad("edge_forget_ms must be at least edge_ttl_ms > 0");
        }
        if self.edges_per_client_max == 0 {
            return bad("edges_per_client_max must be at least 1");
        }
        if self.api_keys.iter().any(|k| k.is_empty()) {
            return bad("api_keys: empty key");
        }
        if self.fleet_keys.iter().any(|k| k.is_empty()) {
            return bad("fleet_keys: empty key");
        }
        let region_name_ok = |r: &str| {
            !r.is_empty()
                && r.len() <= crate::registry::REGION_BYTES_MAX
                && r.bytes().all(crate::region::name_byte_ok)
        };
        if !region_name_ok(&self.region) || !region_name_ok(&self.default_region) {
            return bad("region and default_region: 1-64 bytes of letters, digits, '-', '_', '.'");
        }
        if self
            .region_fallbacks
            .iter()
            .any(|(r, to)| !region_name_ok(r) || !to.iter().all(|t| region_name_ok(t)))
        {
            return bad(
                "region_fallbacks: region names are 1-64 bytes of letters, digits, '-', '_', '.'",
            );
        }
        if self.peer_poll_ms < 100 {
            return bad("peer_poll_ms must be at least 100");
        }
        if let Some(p) = self.peers.iter().find(|p| {
            p.rsplit_once(':')
                .is_none_or(|(h, port)| h.is_empty() || port.parse::<u16>().is_err())
        }) {
            return bad(&format!("peers: {p:?} is not host:port"));
        }
        Ok(())
    }
}

impl net::config::Layered for Config {
    const ROLE: &'static str = "control";

    fn check(&self) -> Result<(), String> {
        self.validate().map_err(|e| match e {
            ControlError::Config(m) => m,
            other => other.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_full_file() {
        let c = Config::from_toml_str("").unwrap();
        assert_eq!(c.http_addr.port(), 8080);
        assert_eq!(c.token_ttl_ms, 3_600_000);
        assert_eq!(c.edge_ttl_ms, 6000);
        assert_eq!(c.edges_per_client_max, 3);
        let c = Config::from_toml_str(
            r#"
            http_addr = "0.0.0.0:9000"
            api_keys = ["k1"]
            token_keys = "1:aaaaaaaaaaaaaaaa,2:bbbbbbbbbbbbbbbb"
            trust_region_header = true
            driver = "legacy"
            region = "sh"
            peers = ["10.1.0.5:8080"]
            fallback_edges = 2
            [region_fallbacks]
            sh = ["bj", "gz"]
            [[regions]]
            cidr = "10.0.0.0/8"
            region = "sh"
            [[rooms]]
            room_id = 5000
            short_id = 5
            uid = 77
            area = 3
            "#,
        )
        .unwrap();
        assert_eq!(c.http_addr.port(), 9000);
        assert_eq!(c.regions[0].region, "sh");
        assert_eq!(c.region_fallbacks["sh"], ["bj", "gz"]);
        assert_eq!((c.region.as_str(), c.fallback_edges), ("sh", 2));
        for bad in [
            "peers = [\"nohost\"]",
            "peer_poll_ms = 10",
            "region = \"a b\"",
            "[region_fallbacks]\nsh = [\"\"]",
        ] {
            assert!(Config::from_toml_str(bad).is_err(), "{bad}");
        }
        assert_eq!(
            c.rooms[0],
            RoomEntry {
                room_id: 5000,
                short_id: 5,
                uid: 77,
                area: 3
            }
        );
        assert_eq!(c.driver, net::runtime::Driver::Legacy);
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(matches!(
            Config::from_toml_str("token_ttl = 5"),
            Err(ControlError::Config(_))
        ));
        assert!(Config::from_toml_str("[[rooms]]\nroom_id = 1\nzone = 2").is_err());
    }
}
