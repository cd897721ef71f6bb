//! Moving issued coupons from the Redis outbox into `user_coupon`, exactly once.
//!
//! The decide script adds every issued coupon to the outbox ZSET (member `userId:couponId`,
//! score = issue time in ms) in the same atomic step that issues it, so an issued coupon is never
//! only in memory. The persister reads the oldest outbox entries, inserts them with one multi-row
//! `INSERT … ON DUPLICATE KEY UPDATE` (a no-op on rows already there, thanks to
//! `UNIQUE (user_id, coupon_id)`), and only then removes them from the outbox.
//!
//! A crash between the insert and the removal leaves entries that the next persist (this process
//! after restart, or any replica) inserts again as no-ops: nothing lost, nothing doubled. While
//! MySQL is down the outbox simply grows; the Redis side keeps deciding.

use chrono::DateTime;
use fred::prelude::*;
use sqlx::{MySql, MySqlPool, QueryBuilder};

use super::member::parse_member;
use crate::metrics::Metrics;

/// Outbox entries per `INSERT`: a flash sale issues tens of thousands of coupons in seconds, and
/// fewer, larger statements keep up with it (3 placeholders a row, well under MySQL's 65 535).
pub const ROWS_PER_INSERT: usize = 5000;

/// Outbox entries `(member, issue time in ms)`, oldest first.
pub type OutboxEntries = Vec<(String, f64)>;

#[derive(Clone)]
pub struct Persister {
    client: Client,
    pool: MySqlPool,
    outbox_key: String,
    batch_size: usize,
    metrics: Metrics,
}

impl Persister {
    pub fn new(
        client: Client,
        pool: MySqlPool,
        outbox_key: String,
        batch_size: usize,
        metrics: Metrics,
    ) -> Self {
        Self {
            client,
            pool,
            outbox_key,
            batch_size,
            metrics,
        }
    }

    /// Persists and acknowledges up to `batch_size` of the oldest outbox entries. Returns how
    /// many; 0 means the outbox was empty.
    pub async fn persist_batch(&self) -> anyhow::Result<usize> {
        let entries = self.read_batch().await?;
        Ok(self.persist_entries(entries, false).await?.0)
    }

    /// Up to `batch_size` of the oldest outbox entries.
    pub async fn read_batch(&self) -> anyhow::Result<OutboxEntries> {
        Ok(self
            .client
            .zrange(
                &self.outbox_key,
                0,
                self.batch_size as i64 - 1,
                None,
                false,
                None,
                true,
            )
            .await?)
    }

    /// Inserts `entries` into `user_coupon`, then removes them from the outbox. With
    /// `read_next`, the next batch is read in the same round trip as the removal (sent right
    /// behind it on the same connection, so it no longer sees these entries). Returns how many
    /// entries were acknowledged, and the next batch if asked for.
    pub async fn persist_entries(
        &self,
        entries: OutboxEntries,
        read_next: bool,
    ) -> anyhow::Result<(usize, Option<OutboxEntries>)> {
        if entries.is_empty() {
            return Ok((0, None));
        }
        let mut rows = Vec::with_capacity(entries.len());
        for (member, score) in &entries {
            match parse_member(member) {
                Ok(request) => rows.push((request, *score)),
                // Only the decide script writes here, with members it parsed; anything else was
                // put there by hand and cannot become a row.
                Err(reason) => tracing::error!(%member, reason,
                    "unexpected outbox member; removing it without a user_coupon row"),
            }
        }
        if !rows.is_empty() {
            let mut insert: QueryBuilder<MySql> =
                QueryBuilder::new("INSERT INTO user_coupon (user_id, coupon_id, issued_at) ");
            insert.push_values(&rows, |mut b, (request, issued_ms)| {
                let issued_at = DateTime::from_timestamp_millis(*issued_ms as i64)
                    .unwrap_or_default()
                    .naive_utc();
                b.push_bind(request.user_id)
                    .push_bind(request.coupon_id)
                    .push_bind(issued_at);
            });
            insert.push(" ON DUPLICATE KEY UPDATE user_id = user_id");
            insert.build().execute(&self.pool).await?;
        }
        let members: Vec<String> = entries.into_iter().map(|(m, _)| m).collect();
        let count = members.len();
        let acknowledge = self.client.zrem::<i64, _, _>(&self.outbox_key, members);
        let next = if read_next {
            let (acknowledged, next) = tokio::join!(acknowledge, self.read_batch());
            acknowledged?;
            next.ok()
        } else {
            acknowledge.await?;
            None
        };
        self.metrics.coupon_rows_persisted.inc_by(rows.len() as u64);
        Ok((count, next))
    }

    /// Entries waiting in the outbox.
    pub async fn depth(&self) -> anyhow::Result<u64> {
        let depth: u64 = self.client.zcard(&self.outbox_key).await?;
        self.metrics.coupon_outbox_depth.set(depth as i64);
        Ok(depth)
    }

    /// Persists until the outbox is empty.
    pub async fn persist_all(&self) -> anyhow::Result<usize> {
        let mut total = 0;
        let mut entries = self.read_batch().await?;
        loop {
            let (n, next) = self.persist_entries(entries, true).await?;
            if n == 0 {
                return Ok(total);
            }
            total += n;
            entries = match next {
                Some(next) => next,
                None => self.read_batch().await?,
            };
        }
    }
}
