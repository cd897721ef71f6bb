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
//!
//! **A unique key other than `(user_id, coupon_id)`.** `ON DUPLICATE KEY UPDATE` turns a
//! conflict on *any* unique key into a silent no-op, so a key someone added to `user_coupon`
//! (say, one coupon per user) used to make an issued coupon vanish: counted as persisted,
//! removed from the outbox, no row. The batch is therefore first inserted plainly (the usual
//! case: no row is there yet); only when MySQL answers "duplicate key" (a batch inserted again
//! after a crash, or such a key) does it go in with `ON DUPLICATE KEY UPDATE`, after which every
//! `(user_id, coupon_id)` of the batch must be in the table. One that is not was *refused*: its
//! own plain insert gives MySQL's reason (which key), and it moves, in one atomic step, from the
//! outbox to `<outbox>:dead` with `member`, `score` and `error` — kept, never retried blindly,
//! logged at ERROR, counted (`coupon_rows_refused_total`), and shown by `status`, which needs a
//! person while any is there. After fixing the table, `requeue-outbox-dead` puts them back.

use anyhow::Context;
use chrono::DateTime;
use fred::prelude::*;
use fred::types::scripts::Script;
use sqlx::{MySql, MySqlPool, QueryBuilder};

use std::collections::{BTreeSet, HashSet};

use super::member::{Request, parse_member};
use crate::keys::KeyTemplates;
use crate::metrics::Metrics;
use crate::mysql::{self, MYSQL_DEADLINE, is_duplicate_key};

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

/// Moves refused outbox entries to the outbox's dead-letter stream, each once: an entry no
/// longer in the outbox (a resent call) is skipped. KEYS[1] outbox, KEYS[2] `<outbox>:dead`;
/// ARGV pairs (member, error). The stream's type is checked before anything is written (a
/// script's error does not undo its earlier writes). Returns the entries moved.
const OUTBOX_DEAD_LUA: &str = r#"
local t = redis.call('TYPE', KEYS[2])['ok']
if t ~= 'none' and t ~= 'stream' then
  return redis.error_reply('WRONGTYPE ' .. KEYS[2] .. ' is a ' .. t .. ', expected a stream')
end
local moved = 0
for i = 1, #ARGV, 2 do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score then
    redis.call('XADD', KEYS[2], '*', 'member', ARGV[i], 'score', score, 'error', ARGV[i + 1])
    redis.call('ZREM', KEYS[1], ARGV[i])
    moved = moved + 1
  end
end
return moved
"#;

/// Moves up to ARGV[1] entries of `<outbox>:dead` (KEYS[2]) back into the outbox (KEYS[1]) with
/// their original score (`ZADD NX`: an entry already back keeps its place). Entries without a
/// member or numeric score stay. Returns `{moved, left without member or score}`.
const OUTBOX_REQUEUE_LUA: &str = r#"
for _, spec in ipairs({ { KEYS[1], 'zset' }, { KEYS[2], 'stream' } }) do
  local t = redis.call('TYPE', spec[1])['ok']
  if t ~= 'none' and t ~= spec[2] then
    return redis.error_reply('WRONGTYPE ' .. spec[1] .. ' is a ' .. t .. ', expected a ' .. spec[2])
  end
end
local entries = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', ARGV[1])
local moved, kept = 0, 0
for _, entry in ipairs(entries) do
  local f = {}
  for i = 1, #entry[2], 2 do f[entry[2][i]] = entry[2][i + 1] end
  if f['member'] and tonumber(f['score']) then
    redis.call('ZADD', KEYS[1], 'NX', f['score'], f['member'])
    redis.call('XDEL', KEYS[2], entry[1])
    moved = moved + 1
  else
    kept = kept + 1
  end
end
return { moved, kept }
"#;

/// An issued coupon `user_coupon` refused: a unique key other than `(user_id, coupon_id)` holds
/// its value already.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Refused {
    pub member: String,
    /// MySQL's reason (it names the key).
    pub error: String,
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
    dead_script: Script,
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
            dead_script: Script::from_lua(OUTBOX_DEAD_LUA),
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
        let mut refused: Vec<Refused> = Vec::new();
        if !rows.is_empty() {
            self.replicas
                .wait(&format!("{}:wait", self.outbox_key))
                .await?;
            let scope = self.outbox_key.clone();
            refused = mysql::with_deadline(&self.pool, MYSQL_DEADLINE, |conn| {
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
                    let refused = insert_rows(&mut tx, &rows).await?;
                    tx.commit().await?;
                    Ok(refused)
                })
            })
            .await
            .context("inserting issued coupons into user_coupon")?;
        }
        let members: Vec<String> = if refused.is_empty() {
            entries.into_iter().map(|(m, _)| m).collect()
        } else {
            self.refuse(&refused).await?;
            let gone: std::collections::HashSet<&str> =
                refused.iter().map(|r| r.member.as_str()).collect();
            entries
                .into_iter()
                .map(|(m, _)| m)
                .filter(|m| !gone.contains(m.as_str()))
                .collect()
        };
        let row_count = row_count - refused.len() as u64;
        if members.is_empty() {
            self.metrics.coupon_rows_persisted.inc_by(row_count);
            return Ok((refused.len(), None));
        }
        let count = members.len() + refused.len();
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

    /// Moves `refused` from the outbox to `<outbox>:dead` (atomically, each once), logs each at
    /// ERROR and counts them.
    async fn refuse(&self, refused: &[Refused]) -> anyhow::Result<()> {
        let dead = outbox_dead_key(&self.outbox_key);
        let args: Vec<String> = refused
            .iter()
            .flat_map(|r| [r.member.clone(), r.error.clone()])
            .collect();
        let moved: i64 = self
            .dead_script
            .evalsha_with_reload(
                &self.client,
                vec![self.outbox_key.clone(), dead.clone()],
                args,
            )
            .await
            .with_context(|| format!("moving issued coupons user_coupon refused to {dead}"))?;
        self.metrics.coupon_rows_refused.inc_by(moved.max(0) as u64);
        for r in refused {
            tracing::error!(member = %r.member, error = %r.error, dead_letters = %dead,
                "user_coupon refused an issued coupon (a unique key other than (user_id, coupon_id)); kept in the outbox's dead-letter stream: fix the table, then `requeue-outbox-dead`");
        }
        Ok(())
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

/// The dead-letter stream of a (resolved) outbox key: `<outbox>:dead`, in the outbox's hash slot
/// when its template has a hash tag.
pub fn outbox_dead_key(outbox: &str) -> String {
    format!("{outbox}:dead")
}

/// Inserts `rows` into `user_coupon` inside `tx`; returns those a unique key other than
/// `(user_id, coupon_id)` refused (see the module docs).
async fn insert_rows(
    tx: &mut sqlx::Transaction<'_, MySql>,
    rows: &[(Request, f64)],
) -> anyhow::Result<Vec<Refused>> {
    let statement = |rows: &[(Request, f64)], upsert: bool| {
        let mut insert: QueryBuilder<MySql> =
            QueryBuilder::new("INSERT INTO user_coupon (user_id, coupon_id, issued_at) ");
        insert.push_values(rows, |mut b, (request, issued_ms)| {
            let issued_at = DateTime::from_timestamp_millis(*issued_ms as i64)
                .unwrap_or_default()
                .naive_utc();
            b.push_bind(request.user_id)
                .push_bind(request.coupon_id)
                .push_bind(issued_at);
        });
        if upsert {
            insert.push(" ON DUPLICATE KEY UPDATE user_id = user_id");
        }
        insert
    };
    // The usual case: none of these rows is there yet. A failed statement is undone on its own;
    // the transaction goes on.
    match statement(rows, false).build().execute(&mut **tx).await {
        Ok(_) => return Ok(Vec::new()),
        Err(e) if is_duplicate_key(&e) => {}
        Err(e) => return Err(e.into()),
    }
    // Some rows are there (inserted before a crash or a lost reply), or another unique key
    // refuses some: insert what is new, then look for every pair.
    statement(rows, true).build().execute(&mut **tx).await?;
    let mut lookup: QueryBuilder<MySql> =
        QueryBuilder::new("SELECT user_id, coupon_id FROM user_coupon WHERE user_id IN (");
    let users: BTreeSet<i64> = rows.iter().map(|(r, _)| r.user_id).collect();
    let coupons: BTreeSet<i64> = rows.iter().map(|(r, _)| r.coupon_id).collect();
    let mut list = lookup.separated(", ");
    for user in &users {
        list.push_bind(*user);
    }
    lookup.push(") AND coupon_id IN (");
    let mut list = lookup.separated(", ");
    for coupon in &coupons {
        list.push_bind(*coupon);
    }
    lookup.push(")");
    let present: HashSet<(i64, i64)> = lookup
        .build_query_as::<(i64, i64)>()
        .fetch_all(&mut **tx)
        .await?
        .into_iter()
        .collect();
    let mut refused = Vec::new();
    for row in rows {
        let (request, _) = row;
        if present.contains(&(request.user_id, request.coupon_id)) {
            continue;
        }
        // Its own plain insert names the key that refuses it.
        let error = match statement(std::slice::from_ref(row), false)
            .build()
            .execute(&mut **tx)
            .await
        {
            // Inserted after all (the key's conflicting row went meanwhile).
            Ok(_) => continue,
            Err(e) if is_duplicate_key(&e) => e.to_string(),
            Err(e) => return Err(e.into()),
        };
        refused.push(Refused {
            member: format!("{}:{}", request.user_id, request.coupon_id),
            error,
        });
    }
    Ok(refused)
}

/// What `requeue-outbox-dead` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxRequeued {
    /// Issued coupons put back into their outbox, to be persisted again.
    pub moved: u64,
    /// Entries left in `<outbox>:dead`: without a member or a numeric score (written by hand).
    pub kept: u64,
}

/// `requeue-outbox-dead`: moves every issued coupon `user_coupon` refused back from
/// `<outbox>:dead` into its outbox with its original score (issue time), for the persister to
/// insert again — after the table was fixed. Every lane: the single outbox, or each registered
/// coupon's and each coupon's found by SCAN with an `<outbox>:dead` stream (a coupon taken out of
/// the registry keeps its refused coupons; `status` shows them). Chunks of 100 entries, each
/// atomic: interrupted, it leaves the rest as it was.
pub async fn requeue_outbox_dead(
    client: &Client,
    keys: &KeyTemplates,
) -> anyhow::Result<OutboxRequeued> {
    let script = Script::from_lua(OUTBOX_REQUEUE_LUA);
    let mut done = OutboxRequeued::default();
    let lanes = if keys.per_coupon() {
        let mut ids = super::registered_coupons(client, keys).await?;
        for key in crate::backends::scan_keys(client, &keys.outbox_dead_pattern()).await? {
            if let Some(id) = keys.coupon_of_outbox_dead(&key) {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        ids.dedup();
        ids.into_iter().map(|id| keys.for_coupon(id)).collect()
    } else {
        vec![keys.clone()]
    };
    for lane in lanes {
        let dead = outbox_dead_key(&lane.outbox);
        // Entries kept back (no member or score) stay at the head: walk at most what is there.
        let mut left: u64 = client.xlen(&dead).await?;
        while left > 0 {
            let (moved, kept): (u64, u64) = script
                .evalsha_with_reload(client, vec![lane.outbox.clone(), dead.clone()], vec!["100"])
                .await?;
            done.moved += moved;
            if moved == 0 {
                done.kept += kept;
                break;
            }
            left = left.saturating_sub(moved);
        }
    }
    Ok(done)
}
