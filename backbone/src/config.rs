//! The backbone's config: the `[cluster]` table of the broker's config file (the servers come
//! from the broker's `backbone` field). Every field has a default; times are in ms.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Cluster mode settings. `servers` empty means embedded mode (no backbone).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// NATS servers, `nats://host:port[,host:port...]`. Not read from the `[cluster]` table: the
    /// broker fills it from its `backbone` field (`--backbone`).
    #[serde(skip)]
    pub servers: String,
    /// JetStream stream of accepted pushes.
    pub stream: String,
    /// Subject prefix; partition `p` is `<subject_prefix>.<p>`.
    pub subject_prefix: String,
    /// Number of partitions. Fixed for the life of a stream: the partition of a scope is a hash
    /// modulo this number.
    pub partitions: u16,
    /// Stream (and lease bucket) replicas: 1 locally, 3 in production.
    pub replicas: usize,
    /// JetStream's duplicate window: a second publish with the same `Nats-Msg-Id` within it is
    /// acknowledged as a duplicate and not stored.
    pub dedup_window_ms: u64,
    /// Stream size bound; a full stream refuses publishes (answered `Overloaded`).
    pub stream_bytes_max: i64,
    /// KV bucket holding partition leases (`p.<n>`) and live brokers (`b.<id>`).
    pub lease_bucket: String,
    /// A lease (and a live-broker entry) not renewed within this expires.
    pub lease_ms: u64,
    /// How long a delivered, unacked message waits before JetStream redelivers it.
    pub ack_wait_ms: u64,
    /// Longest a consumed message is kept from redelivery by in-progress acks (`+WPI`, sent
    /// every `ack_wait_ms / 3` while it waits behind a backlog to be handed to the links);
    /// past it the broker lets it go (counted) and JetStream redelivers it after `ack_wait_ms`.
    /// 0 sends no in-progress acks.
    pub progress_ms_max: u64,
    /// Unacked messages a partition's consumer may have out at once.
    pub ack_pending_max: i64,
    /// Longest wait for JetStream's publish ack before answering `Overloaded`.
    pub publish_ms_max: u64,
    /// Publishes handed to the backbone and not yet answered; past it, `Overloaded` at once.
    pub publish_pending_max: usize,
    /// Longest wait to connect at start.
    pub connect_ms_max: u64,
    /// Longest wait at start, once connected, for the stream and the lease bucket to be found
    /// or made. A NATS cluster that has just started, or a stream another broker made a moment
    /// ago, answers nothing (or "temporarily unavailable") until its leaders are elected; each
    /// request is tried again until then.
    pub setup_ms_max: u64,
    /// Deliveries queued to one owning thread before the consumer waits.
    pub delivery_queue_max: usize,
    /// This broker's region. Not read from the `[cluster]` table: the broker fills it from its
    /// `region` field. Used only with `regions`.
    #[serde(skip)]
    pub region: String,
    /// Every region of the federation, this one included; each region's NATS runs the
    /// JetStream domain of its name (see `region`). Empty (the default): one region, the
    /// single-stream layout.
    pub regions: Vec<String>,
    /// How long a region's origin stream keeps an accepted push for the other regions to
    /// source: the longest partition between regions that is caught up after it heals.
    pub origin_age_ms: u64,
    /// A low-priority push accepted in another region that is older than this when it is
    /// consumed here (a backlog after a partition) is dropped and counted; high reach is kept
    /// while its ttl lasts.
    pub cross_region_max_lag_ms: u64,
    /// A broker joining a running cluster takes no partition until the edges have linked to
    /// it ([`crate::Backbone::joined`]), or at the latest this long after start. 0: no wait.
    pub join_wait_ms_max: u64,
    /// With `regions`: core NATS subject prefix of presence announcements. Each broker
    /// publishes its region's edges' presence on `<presence_subject>.<region>` and hears every
    /// other region's on `<presence_subject>.*` (through the leafnodes, like the sources).
    pub presence_subject: String,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            servers: String::new(),
            stream: "BARRAGE".into(),
            subject_prefix: "barrage.p".into(),
            partitions: 64,
            replicas: 1,
            dedup_window_ms: 120_000,
            stream_bytes_max: 1 << 30,
            lease_bucket: "barrage_leases".into(),
            lease_ms: 3_000,
            ack_wait_ms: 3_000,
            progress_ms_max: 60_000,
            ack_pending_max: 10_000,
            publish_ms_max: 2_000,
            publish_pending_max: 10_000,
            connect_ms_max: 2_000,
            setup_ms_max: 20_000,
            delivery_queue_max: 4_096,
            region: String::new(),
            regions: Vec::new(),
            origin_age_ms: 3_600_000,
            cross_region_max_lag_ms: 10_000,
            join_wait_ms_max: 10_000,
            presence_subject: "barrage.presence".into(),
        }
    }
}

impl Config {
    /// Checks the values that would otherwise fail late or silently.
    pub fn check(&self) -> Result<(), String> {
        if self.partitions == 0 {
            return Err("backbone.partitions must be at least 1".into());
        }
        if self.lease_ms < 300 {
            return Err("backbone.lease_ms must be at least 300".into());
        }
        if self.ack_wait_ms < 300 {
            return Err("backbone.ack_wait_ms must be at least 300".into());
        }
        if self.publish_pending_max == 0 || self.delivery_queue_max == 0 {
            return Err("backbone queue limits must be at least 1".into());
        }
        if self.federated() {
            crate::region::check(&self.region, &self.regions)?;
            let token_ok = |t: &str| {
                !t.is_empty() && !t.contains(|c: char| c.is_whitespace() || c == '*' || c == '>')
            };
            if !self.presence_subject.split('.').all(token_ok) {
                return Err(
                    "cluster.presence_subject must be dot-separated NATS tokens without wildcards"
                        .into(),
                );
            }
            if self.origin_age_ms < self.cross_region_max_lag_ms {
                return Err(
                    "cluster.origin_age_ms must be at least cross_region_max_lag_ms".into(),
                );
            }
        }
        Ok(())
    }

    /// Whether this broker's region is federated with others (`regions` set).
    pub fn federated(&self) -> bool {
        !self.regions.is_empty()
    }

    /// The subject a push of partition `p` is published to: `<prefix>.<p>`, or with regions
    /// `<prefix>.<region>.<p>` (the origin stream's).
    pub fn publish_subject(&self, p: crate::Partition) -> String {
        if self.federated() {
            format!("{}.{}.{}", self.subject_prefix, self.region, p.0)
        } else {
            crate::partition::subject(&self.subject_prefix, p)
        }
    }

    /// The consumer filter of partition `p`: with regions, every origin's `<prefix>.*.<p>`.
    pub fn filter_subject(&self, p: crate::Partition) -> String {
        if self.federated() {
            format!("{}.*.{}", self.subject_prefix, p.0)
        } else {
            crate::partition::subject(&self.subject_prefix, p)
        }
    }

    /// The lease bucket: with regions, one per region (`<lease_bucket>_<region>`), since
    /// subject interest crosses leafnodes and a shared name would mix regions' leases.
    pub fn lease_bucket_name(&self) -> String {
        if self.federated() {
            format!("{}_{}", self.lease_bucket, self.region)
        } else {
            self.lease_bucket.clone()
        }
    }

    /// The subject this region's presence announcements go to.
    pub fn presence_announce_subject(&self) -> String {
        format!("{}.{}", self.presence_subject, self.region)
    }

    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }
}
