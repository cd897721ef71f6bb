//! `[mysql]`: where issued coupons and the ranking log are kept.

use serde::{Deserialize, Serialize};

use super::read::Problems;
use super::secret::{SecretUrl, check_url};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MysqlConfig {
    /// `mysql://user[:password]@host:port/database`; `DATABASE_URL` overrides it.
    #[serde(default = "default_url")]
    pub url: SecretUrl,
    /// Size of the connection pool shared by the coupon persister, the ranking-log writer and
    /// the readiness probe (2..1000).
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
}

fn default_url() -> SecretUrl {
    SecretUrl::new("mysql://root@127.0.0.1:3306/commerce")
}

fn default_max_connections() -> u32 {
    8
}

impl MysqlConfig {
    pub(super) fn override_from_env(&mut self, env: &impl Fn(&str) -> Option<String>) -> String {
        self.url.override_from("DATABASE_URL", env)
    }

    pub(super) fn validate(&self, origin: &str, problems: &mut Problems) {
        check_url(
            &self.url,
            "mysql.url",
            origin,
            &["mysql", "mariadb"],
            problems,
        );
        if url::Url::parse(self.url.expose())
            .map(|u| u.path().trim_start_matches('/').is_empty())
            .unwrap_or(false)
        {
            problems.push(
                "mysql.url",
                "names no database (expected mysql://user@host:port/DATABASE)",
            );
        }
        problems.range(
            "mysql.max_connections",
            self.max_connections.into(),
            2..=1000,
        );
    }
}
