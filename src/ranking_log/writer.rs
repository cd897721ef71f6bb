//! The batching MySQL writer: entries from the channel, rows into `ranking_logs` exactly once,
//! then the entries acknowledged in Redis.
//!
//! **Fenced like the outbox** (`coupon::reconcile`): the rows of a Redis that was reconciled
//! and then replaced are never written. Before each attempt the writer confirms, per stream,
//! that its entries are still pending to it and learns, in the same script
//! ([`LogStream::touch_on`]), the identity of the Redis holding them and whether the lane's
//! marker names it. The insert's transaction then holds the lane's `redis_fence` row in share
//! mode and skips the entries held on a *reconciled* Redis the row does not name: another Redis
//! was reconciled for the lane since — this one is an old primary still taking writes after a
//! failover, until Sentinel demotes it (split brain), whose decisions the promoted replica,
//! reconciled, makes again with the same ranks. Reconciliation rewrites the row before it
//! reads `ranking_logs` (and waits for inserts holding it), so such a row either is in MySQL
//! when reconciliation reads it — a decision it forgot, put back — or never lands. Fenced
//! entries stay pending there, unacknowledged, and are lost with the rest of that Redis'
//! writes. Entries held on a Redis not reconciled yet (restarted, rolled back, just promoted:
//! its decisions come before its restart, in its own history, ranked at most its seq) are
//! written as before, as are those of a lane with no fence row — but only while the lane's row
//! still says what it said *before* the entry was confirmed there: a row that changed in between
//! means another Redis was reconciled meanwhile (the one confirmed on may since have rolled back
//! past the decision), and that reconciliation did not see this row; the entry is confirmed again
//! (it is gone with a rolled-back Redis, or its Redis is reconciled now) instead of landing
//! behind the reconciliation's back (a second row for a request decided again).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::{MySql, MySqlPool, QueryBuilder};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::stream::{Delivered, InHand, LogStream};
use super::{LogEntry, MAX_ROWS_PER_STATEMENT, WriterReport, insert_statement};
use crate::config::RankingLogConfig;
use crate::keys::KeyTemplates;
use crate::metrics::Metrics;
use crate::mysql::is_duplicate_key;
use crate::retry::{Backoff, is_transient};

/// At most this many `batch_size` statements go in one transaction: a waiting backlog shares
/// one BEGIN/COMMIT (three round trips and a log flush) over several statements.
pub const STATEMENTS_PER_TRANSACTION: usize = 8;

/// The consumer's end of the channel: one task that writes entries to MySQL.
pub struct LogWriter {
    rx: mpsc::Receiver<Delivered>,
    pool: MySqlPool,
    stream: LogStream,
    in_hand: InHand,
    /// To find each stream's lane (its `redis_fence` scope).
    keys: KeyTemplates,
    metrics: Metrics,
    batch_size: usize,
    flush_interval: Duration,
    max_attempts: u32,
    batches_written: u64,
}

/// How a write ended.
enum Written {
    Rows(u64),
    /// `abort` fired while retrying: the entries are still in Redis, in hand.
    Aborted,
}

impl LogWriter {
    pub(super) fn new(
        config: &RankingLogConfig,
        rx: mpsc::Receiver<Delivered>,
        pool: MySqlPool,
        stream: LogStream,
        in_hand: InHand,
        keys: KeyTemplates,
        metrics: Metrics,
    ) -> Self {
        Self {
            rx,
            pool,
            stream,
            in_hand,
            keys,
            metrics,
            batch_size: config.batch_size.get(),
            flush_interval: config.flush_interval,
            max_attempts: config.max_attempts,
            batches_written: 0,
        }
    }

    /// Writes entries until the reader is gone and the channel is empty, or until `abort`
    /// (what is left stays in hand; [`super::LogPipeline::shutdown`] hands it back).
    pub async fn run(mut self, abort: CancellationToken) -> WriterReport {
        let mut report = WriterReport::default();
        loop {
            let first = tokio::select! {
                first = self.rx.recv() => first,
                _ = abort.cancelled() => None,
            };
            let Some(first) = first else {
                break;
            };
            let mut batch = vec![first];
            self.fill_batch(&mut batch).await;
            self.take_backlog(&mut batch);
            match self.write(&mut batch, &abort).await {
                Written::Rows(n) => report.rows_written += n,
                Written::Aborted => {
                    report.rows_left += rows_in(&batch) as u64;
                    break;
                }
            }
            self.metrics
                .ranking_log_channel_depth
                .set(self.rx.len() as i64);
        }
        self.rx.close();
        while let Ok(delivered) = self.rx.try_recv() {
            report.rows_left += delivered.entry.rows.len() as u64;
        }
        self.metrics.ranking_log_channel_depth.set(0);
        report
    }

    /// Takes more entries until the batch holds `batch_size` rows or `flush_interval` passed.
    async fn fill_batch(&mut self, batch: &mut Vec<Delivered>) {
        let deadline = tokio::time::Instant::now() + self.flush_interval;
        while rows_in(batch) < self.batch_size {
            match self.rx.try_recv() {
                Ok(delivered) => {
                    batch.push(delivered);
                    continue;
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(delivered)) => batch.push(delivered),
                Ok(None) | Err(_) => break,
            }
        }
    }

    /// Takes what is already waiting, up to `STATEMENTS_PER_TRANSACTION` statements' worth.
    fn take_backlog(&mut self, batch: &mut Vec<Delivered>) {
        let limit = self.batch_size * STATEMENTS_PER_TRANSACTION;
        while rows_in(batch) < limit {
            match self.rx.try_recv() {
                Ok(delivered) => batch.push(delivered),
                Err(_) => break,
            }
        }
    }

    /// Writes `batch` exactly once and acknowledges it; retries as the module docs describe.
    /// Before each attempt, entries another reader took over (this process was stalled) are
    /// dropped from the batch unwritten, and entries whose Redis is not the one their lane's
    /// fence names are left pending, unwritten (module docs).
    async fn write(&mut self, batch: &mut Vec<Delivered>, abort: &CancellationToken) -> Written {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        let mut rejected_attempts = 0u32;
        // Rows written by earlier attempts whose other entries had to be confirmed again.
        let mut written_before = 0u64;
        loop {
            // The lanes' fence rows as they are before the entries are confirmed in Redis: an
            // entry of a Redis not reconciled yet is written only if its row is unchanged when the
            // insert holds it (module docs).
            let fences = tokio::select! {
                fences = self.fences_of(batch) => fences,
                _ = abort.cancelled() => return Written::Aborted,
            };
            let fences = match fences {
                Ok(fences) => fences,
                Err(e) => {
                    // A failed write attempt like any other (MySQL down or slow): counted so.
                    let rows = self.count_retry(batch);
                    let delay = backoff.next_delay();
                    tracing::warn!(rows, entries = batch.len(), retry_in_ms = delay.as_millis() as u64,
                        error = %format!("{e:#}"), "ranking-log batch write failed reading the lanes' redis_fence rows; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => continue,
                        _ = abort.cancelled() => return Written::Aborted,
                    }
                }
            };
            // Every wait on Redis or MySQL gives way to `abort` (the shutdown deadline): a frozen
            // server must not keep the process past it. Dropping a write half-way is what a crash
            // does, and is as harmless: the entries are still pending in Redis, and one whose
            // COMMIT did land is found by its marker when read again.
            let checked = tokio::select! {
                checked = self.drop_lost(batch) => checked,
                _ = abort.cancelled() => return Written::Aborted,
            };
            let held_on = match checked {
                Ok(held_on) => held_on,
                Err(e) => {
                    // Redis does not answer: it could not take the acknowledgement either. The
                    // rows wait in Redis; nothing unconfirmed is written meanwhile.
                    let delay = backoff.next_delay();
                    tracing::warn!(entries = batch.len(), retry_in_ms = delay.as_millis() as u64,
                        error = %format!("{e:#}"), "cannot check that this reader still holds its ranking-log entries; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => continue,
                        _ = abort.cancelled() => return Written::Aborted,
                    }
                }
            };
            if batch.is_empty() {
                return Written::Rows(written_before);
            }
            let started = Instant::now();
            let entries: Vec<(&LogEntry, Option<Origin>)> = batch
                .iter()
                .map(|d| {
                    let origin = held_on
                        .get(&d.entry.stream)
                        .cloned()
                        .flatten()
                        .zip(self.lane_of(&d.entry.stream))
                        .map(|((identity, reconciled), lane)| Origin {
                            fence_before: fences.get(&lane.outbox).cloned(),
                            scope: lane.outbox,
                            identity,
                            reconciled,
                        });
                    (&d.entry, origin)
                })
                .collect();
            let result = tokio::select! {
                result = insert_fenced(&self.pool, &entries, self.batch_size) => result,
                _ = abort.cancelled() => return Written::Aborted,
            };
            self.metrics
                .ranking_log_batch_duration
                .observe(started.elapsed().as_secs_f64());
            match result {
                Ok(Inserted {
                    rows: inserted,
                    fenced,
                    moved,
                }) => {
                    self.metrics.ranking_log_rows_written.inc_by(inserted);
                    written_before += inserted;
                    let (fenced, written): (Vec<_>, Vec<_>) = entries
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| !moved.contains(i))
                        .partition(|(i, _)| fenced.contains(i));
                    let written: Vec<&LogEntry> = written.into_iter().map(|(_, e)| e.0).collect();
                    self.leave_fenced(fenced.into_iter().map(|(_, e)| e));
                    self.acknowledge(&written).await;
                    self.batches_written += 1;
                    if self.batches_written % 1000 == 1 {
                        self.prune_batch_ids().await;
                    }
                    if moved.is_empty() {
                        return Written::Rows(written_before);
                    }
                    // Another Redis was reconciled for their lane since they were confirmed:
                    // confirmed again, where they are now (module docs).
                    tracing::info!(
                        entries = moved.len(),
                        "a lane's redis_fence changed while its ranking-log entries were confirmed on a Redis not reconciled yet; confirming them again"
                    );
                    let mut i = 0;
                    batch.retain(|_| {
                        i += 1;
                        moved.contains(&(i - 1))
                    });
                    continue;
                }
                Err(e) => {
                    let rows = self.count_retry(batch);
                    let rejected = match &e {
                        InsertError::MarkerTaken(_) => false,
                        InsertError::Sql(sql) => !is_transient(sql),
                    };
                    if rejected {
                        rejected_attempts += 1;
                        if rejected_attempts >= self.max_attempts {
                            return self.give_up(batch, &e, abort).await;
                        }
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(rows, entries = batch.len(), retry_in_ms = delay.as_millis() as u64,
                        error = %format!("{e:#}"), "ranking-log batch write failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = abort.cancelled() => return Written::Aborted,
                    }
                }
            }
        }
    }

    /// The lane whose log stream `stream` is (`None` for a stream no lane of these templates
    /// has): its keys, whose outbox is the lane's `redis_fence` scope.
    /// A failed write attempt: every row of the batch counts one more retry (its `retry_count`
    /// column and the `ranking_log_rows_retried` counter). Returns the batch's rows.
    fn count_retry(&self, batch: &mut [Delivered]) -> usize {
        let rows = rows_in(batch);
        for delivered in batch.iter_mut() {
            for row in &mut delivered.entry.rows {
                row.retry_count += 1;
            }
        }
        self.metrics.ranking_log_rows_retried.inc_by(rows as u64);
        rows
    }

    fn lane_of(&self, stream: &str) -> Option<KeyTemplates> {
        if !self.keys.per_coupon() {
            return (stream == self.keys.log).then(|| self.keys.clone());
        }
        let coupon = self.keys.coupon_of_log(stream)?;
        Some(self.keys.for_coupon(coupon))
    }

    /// The `redis_fence` rows (scope → identity) of the lanes of `batch`'s entries, read
    /// without a lock.
    async fn fences_of(&self, batch: &[Delivered]) -> anyhow::Result<HashMap<String, String>> {
        let mut scopes: Vec<String> = batch
            .iter()
            .filter_map(|d| self.lane_of(&d.entry.stream).map(|lane| lane.outbox))
            .collect();
        scopes.sort_unstable();
        scopes.dedup();
        if scopes.is_empty() {
            return Ok(HashMap::new());
        }
        let mut query: QueryBuilder<MySql> =
            QueryBuilder::new("SELECT scope, identity FROM redis_fence WHERE scope IN (");
        let mut list = query.separated(", ");
        for scope in &scopes {
            list.push_bind(scope);
        }
        query.push(")");
        let rows = crate::mysql::with_deadline(&self.pool, crate::mysql::MYSQL_DEADLINE, |conn| {
            Box::pin(async move {
                Ok(query
                    .build_query_as::<(String, String)>()
                    .fetch_all(&mut *conn)
                    .await?)
            })
        })
        .await?;
        Ok(rows.into_iter().collect())
    }

    /// Entries not written because their lane's fence names another Redis than the reconciled
    /// one holding them: left pending there (module docs), out of this process' hands.
    fn leave_fenced<'e>(&self, fenced: impl Iterator<Item = &'e (&'e LogEntry, Option<Origin>)>) {
        let mut count = 0u64;
        for (entry, origin) in fenced {
            count += 1;
            self.in_hand.remove(&entry.stream, &entry.id);
            tracing::warn!(stream = %entry.stream, id = %entry.id, rows = entry.rows.len(),
                redis = origin.as_ref().map(|o| o.identity.as_str()).unwrap_or("?"),
                "ranking-log entry held on a reconciled Redis that MySQL's redis_fence no longer names (another Redis was reconciled since: an old primary after a failover): not written; it stays there, pending");
        }
        self.metrics.ranking_log_entries_fenced.inc_by(count);
    }

    /// Drops from `batch` the entries this consumer no longer holds: another reader took them
    /// over while this process was stalled, and writes them itself (also refreshes the others).
    /// Returns, per stream, the identity of the Redis holding the rest and whether the lane's
    /// marker names it (`None`: the stream's group is gone there). An error when Redis cannot
    /// say.
    async fn drop_lost(
        &self,
        batch: &mut Vec<Delivered>,
    ) -> anyhow::Result<HashMap<String, Option<(String, bool)>>> {
        let mut by_stream: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for delivered in batch.iter() {
            by_stream
                .entry(&delivered.entry.stream)
                .or_default()
                .push(delivered.entry.id.clone());
        }
        let checks = by_stream.into_iter().map(|(stream, ids)| async move {
            let marker = self.lane_of(stream).map(|lane| lane.reconciled_marker());
            let held = self.stream.touch_on(stream, ids, marker.as_deref()).await;
            (stream.to_owned(), held)
        });
        let mut lost: HashSet<(String, String)> = HashSet::new();
        let mut held_on = HashMap::new();
        for (stream, result) in futures_util::future::join_all(checks).await {
            let held = result.with_context(|| format!("checking the entries of {stream}"))?;
            lost.extend(held.lost.into_iter().map(|id| (stream.clone(), id)));
            held_on.insert(stream, held.identity.map(|id| (id, held.reconciled)));
        }
        if lost.is_empty() {
            return Ok(held_on);
        }
        batch.retain(|delivered| {
            let key = (delivered.entry.stream.clone(), delivered.entry.id.clone());
            if lost.contains(&key) {
                self.in_hand.remove(&key.0, &key.1);
                false
            } else {
                true
            }
        });
        self.metrics
            .ranking_log_entries_taken_over
            .inc_by(lost.len() as u64);
        tracing::warn!(
            entries = lost.len(),
            "ranking-log entries read here are no longer pending to this reader (another took them over while this process was stalled, or Redis restarted from an older file); dropped unwritten"
        );
        Ok(held_on)
    }

    /// MySQL kept rejecting `batch`: entry by entry, what it still rejects goes to the
    /// dead-letter stream.
    async fn give_up(
        &mut self,
        batch: &mut Vec<Delivered>,
        error: &InsertError,
        abort: &CancellationToken,
    ) -> Written {
        if batch.len() > 1 {
            // One bad entry should not take the others with it.
            let mut total = 0;
            let mut rest = std::mem::take(batch).into_iter();
            while let Some(one) = rest.next() {
                let mut one = vec![one];
                match Box::pin(self.write(&mut one, abort)).await {
                    Written::Rows(n) => total += n,
                    Written::Aborted => {
                        // What is left stays in hand, counted by the caller.
                        batch.extend(one);
                        batch.extend(rest);
                        return Written::Aborted;
                    }
                }
            }
            return Written::Rows(total);
        }
        for delivered in batch.iter() {
            let entry = &delivered.entry;
            let rows = entry.rows.len();
            let kept = self
                .stream
                .dead_letter(
                    &entry.stream,
                    &entry.id,
                    &entry.raw,
                    rows,
                    &error.to_string(),
                )
                .await;
            match kept {
                Ok(true) => {
                    self.metrics.ranking_log_rows_given_up.inc_by(rows as u64);
                    // A duplicate key in ranking_logs is a unique key someone added to the table
                    // (the worker's own exactly-once key is the marker's): said so, not retried.
                    let duplicate_key = matches!(error, InsertError::Sql(e) if is_duplicate_key(e));
                    tracing::error!(rows, stream = %entry.stream, id = %entry.id, error = %error,
                        duplicate_key,
                        "MySQL keeps rejecting a ranking-log entry; moved to the dead-letter stream");
                }
                Ok(false) => {
                    self.metrics.ranking_log_entries_taken_over.inc();
                    tracing::warn!(stream = %entry.stream, id = %entry.id,
                        "another reader took over a ranking-log entry MySQL keeps rejecting; left to it");
                }
                Err(e) => {
                    self.metrics.ranking_log_rows_given_up.inc_by(rows as u64);
                    tracing::error!(rows, stream = %entry.stream, id = %entry.id, error = %error,
                        redis_error = %format!("{e:#}"),
                        "MySQL keeps rejecting a ranking-log entry and Redis did not take it into the dead-letter stream; it stays pending and is tried again once idle");
                }
            }
            self.in_hand.remove(&entry.stream, &entry.id);
        }
        Written::Rows(0)
    }

    /// XACK + XDEL the committed entries. A failure leaves them pending: a reader takes them over
    /// once idle, finds their markers and acknowledges them then.
    async fn acknowledge(&self, entries: &[&LogEntry]) {
        let mut by_stream: BTreeMap<&str, Vec<(&str, usize)>> = BTreeMap::new();
        for entry in entries {
            by_stream
                .entry(&entry.stream)
                .or_default()
                .push((&entry.id, entry.rows.len()));
        }
        for (stream, ids) in by_stream {
            if let Err(e) = self.stream.ack(stream, &ids).await {
                tracing::warn!(error = %format!("{e:#}"), %stream,
                    "could not acknowledge written ranking-log entries; they are acknowledged when read again");
            }
        }
        for entry in entries {
            self.in_hand.remove(&entry.stream, &entry.id);
        }
    }

    async fn prune_batch_ids(&self) {
        let result = sqlx::query(
            "DELETE FROM ranking_log_batches WHERE created_at < NOW(3) - INTERVAL 30 DAY LIMIT 10000",
        )
        .execute(&self.pool)
        .await;
        if let Err(e) = result {
            tracing::debug!(error = %e, "pruning ranking_log_batches failed; will try again later");
        }
    }
}

fn rows_in(batch: &[Delivered]) -> usize {
    batch.iter().map(|d| d.entry.rows.len()).sum()
}

/// Why [`insert_entries`] failed. Which statement met a duplicate key decides what it means: on
/// the marker insert it is another writer holding the same entry (retried, found, skipped); on
/// `ranking_logs` itself it is a unique key an operator added refusing the rows, which no retry
/// changes — a rejection like any other (given up after `max_attempts`, to `<log>:dead`).
#[derive(Debug, thiserror::Error)]
pub enum InsertError {
    /// Another writer inserted one of these entries' markers between this one's check and its
    /// insert (two replicas holding one entry): the retry finds the marker and skips the entry.
    #[error("another writer is writing the same ranking-log entry")]
    MarkerTaken(#[source] sqlx::Error),
    /// Anything else, a duplicate key in `ranking_logs` included.
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

/// Longest `batch_id` the marker table holds.
const MAX_BATCH_ID: usize = 255;

fn batch_id(entry: &LogEntry) -> String {
    let id = entry.batch_id();
    if id.len() <= MAX_BATCH_ID {
        return id;
    }
    // Keep the end: the entry id and first row, which make it unique.
    let cut = id
        .char_indices()
        .map(|(i, _)| i)
        .find(|i| id.len() - i <= MAX_BATCH_ID)
        .unwrap_or(0);
    id[cut..].to_owned()
}

/// Inserts the rows of the entries not written yet, with one marker row each, in one
/// transaction, without looking at any fence (the benchmark and tests). Returns the rows
/// inserted (0 when every entry was already in).
pub async fn insert_entries(
    pool: &MySqlPool,
    entries: &[&LogEntry],
    rows_per_statement: usize,
) -> Result<u64, InsertError> {
    let entries: Vec<(&LogEntry, Option<Origin>)> = entries.iter().map(|e| (*e, None)).collect();
    Ok(insert_fenced(pool, &entries, rows_per_statement)
        .await?
        .rows)
}

/// The Redis an entry is held on and its lane's `redis_fence` scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Origin {
    pub scope: String,
    pub identity: String,
    /// Whether the lane's marker named `identity` when the entry was confirmed there.
    pub reconciled: bool,
    /// The lane's fence row read before the entry was confirmed (`None`: no row).
    pub fence_before: Option<String>,
}

/// What [`insert_fenced`] did.
#[derive(Debug, Default)]
pub(super) struct Inserted {
    pub rows: u64,
    /// Indexes of the entries not written: their lane's fence names another Redis.
    pub fenced: HashSet<usize>,
    /// Indexes of the entries not written because they were confirmed on a Redis not reconciled
    /// yet and their lane's fence changed since it was read before that: confirm them again.
    pub moved: HashSet<usize>,
}

/// [`insert_entries`], fenced: the transaction first holds the `redis_fence` rows of the
/// entries' lanes in share mode (reconciliation's rewrite of a row waits for it) and leaves out
/// the entries of a reconciled Redis their lane's row does not name (`fenced`), and those of a
/// Redis not reconciled yet whose lane's row is no longer what it was before they were
/// confirmed (`moved`). An entry without an origin, or of a reconciled Redis whose lane has no
/// row, is written.
pub(super) async fn insert_fenced(
    pool: &MySqlPool,
    entries: &[(&LogEntry, Option<Origin>)],
    rows_per_statement: usize,
) -> Result<Inserted, InsertError> {
    let mut done = Inserted::default();
    if entries.is_empty() {
        return Ok(done);
    }
    let mut tx = pool.begin().await?;
    let mut scopes: Vec<&str> = entries
        .iter()
        .filter_map(|(_, o)| o.as_ref().map(|o| o.scope.as_str()))
        .collect();
    scopes.sort_unstable();
    scopes.dedup();
    if !scopes.is_empty() {
        let mut fences: QueryBuilder<MySql> =
            QueryBuilder::new("SELECT scope, identity FROM redis_fence WHERE scope IN (");
        let mut list = fences.separated(", ");
        for scope in &scopes {
            list.push_bind(*scope);
        }
        fences.push(") LOCK IN SHARE MODE");
        let named: HashMap<String, String> = fences
            .build_query_as::<(String, String)>()
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
        for (i, (_, origin)) in entries.iter().enumerate() {
            let Some(origin) = origin else { continue };
            let fence = named.get(&origin.scope);
            if origin.reconciled {
                if fence.is_some_and(|fence| *fence != origin.identity) {
                    done.fenced.insert(i);
                }
            } else if fence != origin.fence_before.as_ref() {
                done.moved.insert(i);
            }
        }
    }
    let entries: Vec<&LogEntry> = entries
        .iter()
        .enumerate()
        .filter(|(i, _)| !done.fenced.contains(i) && !done.moved.contains(i))
        .map(|(_, (e, _))| *e)
        .collect();
    if entries.is_empty() {
        tx.rollback().await?;
        return Ok(done);
    }
    let ids: Vec<String> = entries.iter().map(|e| batch_id(e)).collect();
    let mut check: QueryBuilder<MySql> =
        QueryBuilder::new("SELECT batch_id FROM ranking_log_batches WHERE batch_id IN (");
    let mut list = check.separated(", ");
    for id in &ids {
        list.push_bind(id);
    }
    check.push(")");
    let landed: HashSet<String> = check
        .build_query_scalar::<String>()
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
    let fresh: Vec<(&String, &LogEntry)> = ids
        .iter()
        .zip(&entries)
        .filter(|(id, _)| !landed.contains(*id))
        .map(|(id, e)| (id, *e))
        .collect();
    if fresh.is_empty() {
        // Every entry landed before (a lost COMMIT reply, a crash before XACK).
        tx.rollback().await?;
        return Ok(done);
    }
    let mut markers: QueryBuilder<MySql> =
        QueryBuilder::new("INSERT INTO ranking_log_batches (batch_id) ");
    markers.push_values(&fresh, |mut b, (id, _)| {
        b.push_bind(*id);
    });
    markers.build().execute(&mut *tx).await.map_err(|e| {
        if is_duplicate_key(&e) {
            InsertError::MarkerTaken(e)
        } else {
            InsertError::Sql(e)
        }
    })?;
    let rows: Vec<&super::LogRow> = fresh.iter().flat_map(|(_, e)| &e.rows).collect();
    for chunk in rows.chunks(rows_per_statement.clamp(1, MAX_ROWS_PER_STATEMENT)) {
        insert_statement(chunk.iter().copied())
            .build()
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    done.rows = rows.len() as u64;
    Ok(done)
}
