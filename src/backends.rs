//! Building the Redis client and the MySQL pool, and applying migrations.
//!
//! fred's defaults suit a short script, not a daemon: no reconnection, no command timeout, and
//! half-open connections never noticed. [`connect_redis`] turns all three on. The first
//! connection still fails fast (`fail_fast`), so a Redis that is unreachable at start is
//! reported at once (exit 69) instead of being retried silently.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use fred::prelude::*;
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::{MySqlPool, migrate::MigrateDatabase};

use crate::config::{MysqlConfig, RedisConfig};

/// Applied by `migrate` and checked at `run` start.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./sql");

/// A backend that could not be reached at start: the process exits 69 naming it. Its message
/// names the service only; the cause is its `source`, which `{:#}` prints after it (putting the
/// cause in the message too printed it twice).
#[derive(Debug, thiserror::Error)]
#[error("{service} is unavailable")]
pub struct Unavailable {
    pub service: &'static str,
    #[source]
    pub source: anyhow::Error,
}

/// Redis commands taking longer than this fail; the job retries them.
const REDIS_COMMAND_TIMEOUT: Duration = Duration::from_secs(15);

/// Connects to Redis, with reconnection (forever, backing off to 10 s) and timeouts set.
pub async fn connect_redis(config: &RedisConfig) -> Result<Client, Unavailable> {
    let unavailable = |source: anyhow::Error| Unavailable {
        service: "redis",
        source,
    };
    let redis_config = Config::from_url(config.url.expose())
        .map_err(|e| unavailable(anyhow::anyhow!("bad URL: {e}")))?;
    let client = Builder::from_config(redis_config)
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(5);
            c.internal_command_timeout = Duration::from_secs(5);
            // Detect half-open connections (a peer that vanished without closing).
            c.unresponsive.max_timeout = Some(Duration::from_secs(20));
            c.unresponsive.interval = Duration::from_secs(2);
        })
        .with_performance_config(|p| {
            p.default_command_timeout = REDIS_COMMAND_TIMEOUT;
        })
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 10_000, 2))
        .build()
        .map_err(|e| unavailable(e.into()))?;
    client
        .init()
        .await
        .map_err(|e| unavailable(anyhow::anyhow!("{e}")))?;
    Ok(client)
}

fn connect_options(config: &MysqlConfig) -> anyhow::Result<MySqlConnectOptions> {
    MySqlConnectOptions::from_str(config.url.expose()).context("bad MySQL URL")
}

/// Set on every pooled connection when it opens (valid on MySQL 8 and MariaDB 10.6+). The
/// worker abandons a call after `MYSQL_DEADLINE` (10 s) and drops its side of the connection, but
/// a server whose client vanished without a FIN (frozen proxy, half-open TCP) keeps the session —
/// and any lock it holds, such as a persister's share lock on `redis_fence`, which blocks the
/// reconciler's fence write after a Redis restart — until `wait_timeout` (8 h by default). So:
/// - `wait_timeout` 60 s: a few deadlines; such a session and its locks go within a minute;
/// - `innodb_lock_wait_timeout` 5 s: a statement blocked by a lock errors before the deadline
///   (and the caller retries) instead of being abandoned mid-wait.
pub const MYSQL_SESSION_SETUP: &str =
    "SET SESSION wait_timeout = 60, SESSION innodb_lock_wait_timeout = 5";

/// Idle pooled connections are closed after this, well below the session `wait_timeout` (60 s).
const MYSQL_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Connects the MySQL pool. Connections that break are replaced by the pool on next use.
pub async fn connect_mysql(config: &MysqlConfig) -> Result<MySqlPool, Unavailable> {
    let unavailable = |source: anyhow::Error| Unavailable {
        service: "mysql",
        source,
    };
    let options = connect_options(config).map_err(unavailable)?;
    MySqlPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(Duration::from_secs(5))
        // Below the session's wait_timeout: the pool closes idle connections before the
        // server would, so it never hands out one the server already dropped.
        .idle_timeout(MYSQL_POOL_IDLE_TIMEOUT)
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::query(MYSQL_SESSION_SETUP).execute(conn).await?;
                Ok(())
            })
        })
        .connect_with(options)
        .await
        // sqlx's message already includes its source; `{e}` keeps it from being printed twice.
        .map_err(|e| unavailable(anyhow::anyhow!("{e}")))
}

/// Creates the database if it does not exist yet, then applies pending migrations.
/// Returns how many migrations were applied now.
pub async fn migrate(config: &MysqlConfig) -> anyhow::Result<usize> {
    let url = config.url.expose();
    let exists = sqlx::MySql::database_exists(url)
        .await
        // sqlx's message already includes its source: `{e}` keeps it from being printed twice.
        .map_err(|e| Unavailable {
            service: "mysql",
            source: anyhow::anyhow!("{e}"),
        })?;
    if !exists {
        sqlx::MySql::create_database(url)
            .await
            .context("the database does not exist and could not be created")?;
        tracing::info!("created the database");
    }
    let pool = connect_mysql(config).await?;
    let before = applied_migrations(&pool).await;
    MIGRATOR.run(&pool).await.context("applying migrations")?;
    let after = applied_migrations(&pool).await;
    pool.close().await;
    Ok(after.saturating_sub(before))
}

async fn applied_migrations(pool: &MySqlPool) -> usize {
    sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM _sqlx_migrations WHERE success = TRUE")
        .fetch_one(pool)
        .await
        .map(|n| n as usize)
        .unwrap_or(0)
}

/// Fails when the database lacks migrations this binary knows, naming the command to run.
pub async fn check_migrated(pool: &MySqlPool) -> anyhow::Result<()> {
    let applied = applied_migrations(pool).await;
    let known = MIGRATOR.iter().count();
    if applied < known {
        anyhow::bail!(
            "the database has {applied} of {known} migrations applied; run `commerce-worker migrate` first"
        );
    }
    Ok(())
}

/// Every key matching `pattern`, found with SCAN (never KEYS) — on each primary of a cluster.
pub async fn scan_keys(client: &Client, pattern: &str) -> anyhow::Result<Vec<String>> {
    use futures_util::{StreamExt, TryStreamExt};
    let keys = if client.is_clustered() {
        client
            .scan_cluster_buffered(pattern.to_owned(), Some(1000), None)
            .boxed()
    } else {
        client
            .scan_buffered(pattern.to_owned(), Some(1000), None)
            .boxed()
    };
    Ok(keys
        .try_filter_map(|key| async move { Ok(key.as_str().map(str::to_owned)) })
        .try_collect()
        .await?)
}

/// UNLINKs `keys`, in chunks on a single Redis; one by one on a cluster, where one command's
/// keys must share a slot. Returns how many existed.
pub async fn unlink_keys(client: &Client, keys: &[String]) -> anyhow::Result<u64> {
    let mut removed = 0;
    if client.is_clustered() {
        for key in keys {
            let n: u64 = client.unlink(key.as_str()).await?;
            removed += n;
        }
    } else {
        for chunk in keys.chunks(1000) {
            let n: u64 = client.unlink(chunk.to_vec()).await?;
            removed += n;
        }
    }
    Ok(removed)
}
