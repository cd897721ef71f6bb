//! A private, throw-away corner of the configured Redis and MySQL, for `bench` and `demo`.
//!
//! Both commands play the API's part against the operator's real servers, so they must never
//! touch the shop's data: a [`Sandbox`] has its own key prefix (every template in `[keys]` gets
//! `<name>:` in front) and its own database on the configured MySQL server (created and migrated
//! here). [`Sandbox::cleanup`] deletes the keys (found with SCAN on the prefix) and drops the
//! database.

use anyhow::Context;
use fred::prelude::*;
use sqlx::MySqlPool;

use crate::app::Backends;
use crate::backends;
use crate::config::{Config, SecretUrl};

pub struct Sandbox {
    /// Used for the key prefix, the database name and the directory name.
    pub name: String,
    /// The operator's configuration pointed at the sandbox.
    pub config: Config,
    pub redis: Client,
    pub mysql: MySqlPool,
}

impl Sandbox {
    /// Creates a sandbox named `cw_<purpose>_<random>` next to what `base` points at.
    pub async fn create(base: &Config, purpose: &str) -> anyhow::Result<Self> {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("cw_{purpose}_{}", suffix.get(..8).unwrap_or("0"));
        let mut config = base.clone();
        config.keys = base.keys.with_prefix(&format!("{name}:"));
        config.mysql.url = SecretUrl::new(with_database(base.mysql.url.expose(), &name)?);
        backends::migrate(&config.mysql)
            .await
            .context("creating the sandbox database")?;
        let redis = backends::connect_redis(&config.redis).await?;
        let mysql = backends::connect_mysql(&config.mysql).await?;
        Ok(Self {
            name,
            config,
            redis,
            mysql,
        })
    }

    /// The sandbox's clients, as the jobs take them.
    pub fn backends(&self) -> Backends {
        Backends {
            redis: self.redis.clone(),
            mysql: self.mysql.clone(),
        }
    }

    /// Deletes every key under the prefix and drops the database.
    pub async fn cleanup(self) -> anyhow::Result<()> {
        let keys = backends::scan_keys(&self.redis, &format!("{}:*", self.name))
            .await
            .context("listing the sandbox's Redis keys")?;
        backends::unlink_keys(&self.redis, &keys).await?;
        self.mysql.close().await;
        let server = MySqlPool::connect(&with_database(self.config.mysql.url.expose(), "")?)
            .await
            .context("connecting to MySQL to drop the sandbox database")?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS `{}`",
            self.name
        )))
        .execute(&server)
        .await
        .context("dropping the sandbox database")?;
        server.close().await;
        let _ = self.redis.quit().await;
        Ok(())
    }
}

/// The MySQL URL with its database replaced (or removed when `database` is empty).
pub fn with_database(mysql_url: &str, database: &str) -> anyhow::Result<String> {
    let mut url = url::Url::parse(mysql_url).map_err(|e| anyhow::anyhow!("bad MySQL URL: {e}"))?;
    url.set_path(&format!("/{database}"));
    Ok(url.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_is_replaced_and_the_rest_kept() -> anyhow::Result<()> {
        assert_eq!(
            with_database("mysql://u:p%40ss@db:3307/shop?ssl-mode=required", "cw_x")?,
            "mysql://u:p%40ss@db:3307/cw_x?ssl-mode=required"
        );
        assert_eq!(
            with_database("mysql://root@127.0.0.1:3306", "")?,
            "mysql://root@127.0.0.1:3306/"
        );
        Ok(())
    }
}
