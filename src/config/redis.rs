//! `[redis]`: where the queue, the coupons' state and the ranking live.

use serde::{Deserialize, Serialize};

use super::read::Problems;
use super::secret::{SecretUrl, check_url};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://`, `rediss://`, `redis-cluster://`, `redis-sentinel://` (and TLS forms);
    /// `REDIS_URL` overrides it.
    #[serde(default = "default_url")]
    pub url: SecretUrl,
    /// Persist an issued coupon to MySQL only once its decision reached this many replicas
    /// (Redis `WAIT`); 0 persists at once. Not on Redis Cluster.
    #[serde(default)]
    pub min_replicas_acked: u32,
}

fn default_url() -> SecretUrl {
    SecretUrl::new("redis://127.0.0.1:6379")
}

const SCHEMES: &[&str] = &[
    "redis",
    "rediss",
    "redis-cluster",
    "rediss-cluster",
    "redis-sentinel",
    "rediss-sentinel",
];

impl RedisConfig {
    /// A `redis-cluster://` or `rediss-cluster://` URL.
    pub fn is_cluster(&self) -> bool {
        let url = self.url.expose();
        url.starts_with("redis-cluster://") || url.starts_with("rediss-cluster://")
    }

    pub(super) fn override_from_env(&mut self, env: &impl Fn(&str) -> Option<String>) -> String {
        self.url.override_from("REDIS_URL", env)
    }

    pub(super) fn validate(&self, origin: &str, problems: &mut Problems) {
        check_url(&self.url, "redis.url", origin, SCHEMES, problems);
        if let Err(e) = fred::prelude::Config::from_url(self.url.expose()) {
            // fred's parse errors describe the part that is wrong, not the URL itself.
            problems.push("redis.url", format!("rejected by the client: {e}"));
        }
        if self.min_replicas_acked > 0 && self.is_cluster() {
            problems.push(
                "redis.min_replicas_acked",
                "is not supported with a redis-cluster URL (WAIT would have to reach each shard's primary); use 0",
            );
        }
    }
}
