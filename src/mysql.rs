//! A deadline on every MySQL call (docs/contract.md §5).
//!
//! A connection can hang without closing: a frozen old primary behind a DNS name, a half-open
//! TCP connection. sqlx has no statement timeout of its own, and a connection whose query was
//! abandoned is pinged when it goes back to the pool — a ping that hangs just as long. So the
//! work runs on a connection taken from the pool, under a deadline; past it the work is dropped
//! and the connection is closed instead of returned (the pool opens a new one), and the caller
//! retries on a fresh connection.

use std::time::Duration;

use futures_util::future::BoxFuture;
use sqlx::{MySqlConnection, MySqlPool};

/// How long one unit of MySQL work (a statement, a transaction of a few) may take, connection
/// included. Generous for a multi-row insert of a few thousand rows; short enough that a hung
/// connection is noticed within seconds.
pub(crate) const MYSQL_DEADLINE: Duration = Duration::from_secs(10);

/// The deadline passed; the connection was closed.
#[derive(Debug, thiserror::Error)]
#[error("MySQL did not answer within {0:?}; the connection was dropped")]
pub(crate) struct DeadlineExceeded(pub Duration);

/// Runs `work` on one pooled connection, all of it within `deadline`. On an error or past the
/// deadline the connection is closed rather than returned to the pool: its state is unknown.
pub(crate) async fn with_deadline<T, F>(
    pool: &MySqlPool,
    deadline: Duration,
    work: F,
) -> anyhow::Result<T>
where
    F: for<'c> FnOnce(&'c mut MySqlConnection) -> BoxFuture<'c, anyhow::Result<T>>,
{
    let started = tokio::time::Instant::now();
    let mut conn = match tokio::time::timeout(deadline, pool.acquire()).await {
        Ok(conn) => conn?,
        Err(_) => return Err(DeadlineExceeded(deadline).into()),
    };
    let remaining = deadline.saturating_sub(started.elapsed());
    let outcome = tokio::time::timeout(remaining, work(&mut conn)).await;
    match outcome {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => {
            conn.close_on_drop();
            Err(e)
        }
        Err(_) => {
            conn.close_on_drop();
            Err(DeadlineExceeded(deadline).into())
        }
    }
}

/// MySQL's ER_DUP_ENTRY (1062): a row's value is already taken in a unique key. Which key it was
/// matters to every caller (the one that makes its insert idempotent, or another): they tell
/// them apart by the statement that met it, not by this code alone.
pub(crate) fn is_duplicate_key(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db)
        if db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>().map(|e| e.number()) == Some(1062))
}
