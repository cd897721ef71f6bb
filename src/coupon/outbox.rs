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
//!
//! Fenced against a Redis that forgot (see `reconcile.rs`): the batch is read with the identity
//! of the Redis it came from (`outbox_read.lua`, which refuses an unreconciled Redis), and the
//! insert runs in a transaction that first holds the lane's `redis_fence` row in share mode and
//! finds that identity there. A batch read just before Redis restarted from an older snapshot is
//! therefore either in MySQL before reconciliation reads `user_coupon` (and put back into Redis),
//! or never inserted at all. Every MySQL call has a deadline ([`crate::mysql`]).

use anyhow::Context;
use chrono::DateTime;
use fred::prelude::*;
use fred::types::scripts::Script;
use sqlx::{MySql, MySqlPool, QueryBuilder};

use super::member::parse_member;
use crate::keys::KeyTemplates;
use crate::metrics::Metrics;
use crate::mysql::{self, MYSQL_DEADLINE};

/// Behind `identity.lua`, which computes the live identity as the reconciliation does.
const OUTBOX_READ_LUA: &str = concat!(
    include_str!("identity.lua"),
    include_str!("outbox_read.lua")
);

/// How long one `WAIT` for replicas may block the dedicated connection.
const WAIT_TIMEOUT_MS: i64 = 1000;

/// `[redis] min_replicas_acked`: an issued coupon is persisted only after its decision reached
/// that many replicas, so a failover to a replica seldom forgets a coupon MySQL already has.
///
/// `WAIT` counts the calling connection's own writes. Replication is one ordered stream, so
/// after the outbox batch has been read, a write made on this connection lies behind every
/// decision in the batch; once `min` replicas acknowledged it, they hold the batch too. The
/// connection is a dedicated one because `WAIT` blocks it (fred multiplexes the others).
pub struct ReplicaWait {
    min: std::sync::atomic::AtomicU32,
    client: Client,
    dedicated: tokio::sync::OnceCell<Client>,
    metrics: Metrics,
}

impl ReplicaWait {
    pub fn new(client: Client, min: u32, metrics: Metrics) -> Self {
        Self {
            min: min.into(),
            client,
            dedicated: tokio::sync::OnceCell::new(),
            metrics,
        }
    }

    pub fn set_min(&self, min: u32) {
        self.min.store(min, std::sync::atomic::Ordering::Relaxed);
    }

    /// Returns once `min` replicas hold every write the primary had when this was called;
    /// fails (the batch stays in the outbox) while fewer acknowledge within [`WAIT_TIMEOUT_MS`].
    async fn wait(&self, key: &str) -> anyhow::Result<()> {
        let min = self.min.load(std::sync::atomic::Ordering::Relaxed);
        if min == 0 {
            return Ok(());
        }
        let conn = self
            .dedicated
            .get_or_try_init(|| async {
                let conn = self.client.clone_new();
                conn.init().await?;
                Ok::<_, anyhow::Error>(conn)
            })
            .await
            .context("connecting the replica-wait connection")?;
        let _: () = conn
            .set(
                key,
                "1",
                Some(fred::types::Expiration::PX(60_000)),
                None,
                false,
            )
            .await?;
        let acked: i64 = conn.wait(i64::from(min), WAIT_TIMEOUT_MS).await?;
        if acked < i64::from(min) {
            self.metrics.coupon_outbox_waiting_replicas.set(1);
            anyhow::bail!(
                "only {acked} of the {min} replicas required ([redis] min_replicas_acked) hold the outbox batch; it waits"
            );
        }
        self.metrics.coupon_outbox_waiting_replicas.set(0);
        Ok(())
    }
}

/// Outbox entries per `INSERT`: a flash sale issues tens of thousands of coupons in seconds, and
/// fewer, larger statements keep up with it (3 placeholders a row, well under MySQL's 65 535).
const ROWS_PER_INSERT: usize = 5000;

/// Outbox entries `(member, issue time in ms)`, oldest first, and the identity of the Redis they
/// were read from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutboxEntries {
    pub identity: String,
    pub entries: Vec<(String, f64)>,
}

#[derive(Clone)]
pub struct Persister {
    client: Client,
    pool: MySqlPool,
    outbox_key: String,
    /// The lane's reconciliation marker (`KeyTemplates::reconciled_marker`).
    marker_key: String,
    metrics: Metrics,
    read_script: Script,
    replicas: std::sync::Arc<ReplicaWait>,
}

impl Persister {
    /// The persister of the lane whose keys (outbox and reconciliation marker) are `lane`.
    pub fn new(
        client: Client,
        pool: MySqlPool,
        lane: &KeyTemplates,
        metrics: Metrics,
        replicas: std::sync::Arc<ReplicaWait>,
    ) -> Self {
        Self {
            client,
            pool,
            outbox_key: lane.outbox.clone(),
            marker_key: lane.reconciled_marker(),
            metrics,
            read_script: Script::from_lua(OUTBOX_READ_LUA),
            replicas,
        }
    }

    /// Persists and acknowledges up to [`ROWS_PER_INSERT`] of the oldest outbox entries. Returns how
    /// many; 0 means the outbox was empty.
    pub async fn persist_batch(&self) -> anyhow::Result<usize> {
        let entries = self.read_batch().await?;
        Ok(self.persist_entries(entries, false).await?.0)
    }

    /// Up to [`ROWS_PER_INSERT`] of the oldest outbox entries. Fails with `UNRECONCILED` when Redis
    /// has not been reconciled since it (re)started.
    pub async fn read_batch(&self) -> anyhow::Result<OutboxEntries> {
        let reply: Vec<Value> = self
            .read_script
            .evalsha_with_reload(
                &self.client,
                vec![self.outbox_key.clone(), self.marker_key.clone()],
                vec![ROWS_PER_INSERT.to_string()],
            )
            .await?;
        let mut items = reply.into_iter();
        let identity = items
            .next()
            .and_then(|v| v.as_string())
            .context("outbox read script returned no identity")?;
        let mut entries = Vec::new();
        while let (Some(member), Some(score)) = (items.next(), items.next()) {
            let member = member
                .as_string()
                .context("outbox member is not a string")?;
            let score = score.as_f64().context("outbox score is not a number")?;
            entries.push((member, score));
        }
        Ok(OutboxEntries { identity, entries })
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
        let OutboxEntries { identity, entries } = entries;
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
        let row_count = rows.len() as u64;
        if !rows.is_empty() {
            self.replicas
                .wait(&format!("{}:wait", self.outbox_key))
                .await?;
            let scope = self.outbox_key.clone();
            mysql::with_deadline(&self.pool, MYSQL_DEADLINE, |conn| {
                Box::pin(async move {
                    use sqlx::Connection;
                    let mut tx = conn.begin().await?;
                    // Share mode: reconciliation's update of this row waits for this insert to
                    // commit, and an insert after it sees the new identity.
                    let fence: Option<String> = sqlx::query_scalar(
                        "SELECT identity FROM redis_fence WHERE scope = ? LOCK IN SHARE MODE",
                    )
                    .bind(&scope)
                    .fetch_optional(&mut *tx)
                    .await?;
                    if fence.as_deref() != Some(identity.as_str()) {
                        return Err(FenceMismatch {
                            read: identity,
                            fence,
                        }
                        .into());
                    }
                    let mut insert: QueryBuilder<MySql> = QueryBuilder::new(
                        "INSERT INTO user_coupon (user_id, coupon_id, issued_at) ",
                    );
                    insert.push_values(&rows, |mut b, (request, issued_ms)| {
                        let issued_at = DateTime::from_timestamp_millis(*issued_ms as i64)
                            .unwrap_or_default()
                            .naive_utc();
                        b.push_bind(request.user_id)
                            .push_bind(request.coupon_id)
                            .push_bind(issued_at);
                    });
                    insert.push(" ON DUPLICATE KEY UPDATE user_id = user_id");
                    insert.build().execute(&mut *tx).await?;
                    tx.commit().await?;
                    Ok(())
                })
            })
            .await
            .context("inserting issued coupons into user_coupon")?;
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
        self.metrics.coupon_rows_persisted.inc_by(row_count);
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

/// MySQL's `redis_fence` row for the lane does not name the Redis this batch was read from;
/// nothing was inserted. Usually Redis changed since the read (the reconciler fenced it off);
/// the lane decides what else it means (`Lane::persist_all`).
#[derive(Debug, thiserror::Error)]
#[error(
    "Redis changed since this outbox batch was read ({read} read, {} reconciled); the batch is dropped with the Redis it came from",
    fence.as_deref().unwrap_or("none")
)]
pub struct FenceMismatch {
    /// The identity the batch was read from.
    pub read: String,
    /// What the fence row names (`None`: no row).
    pub fence: Option<String>,
}
