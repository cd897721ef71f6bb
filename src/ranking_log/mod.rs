//! The ranking log: one `ranking_logs` row per decided coupon request, written in batches.
//!
//! Rows flow through a bounded tokio channel from the drain ([`LogSender`]) to one writer task
//! ([`LogWriter`]). The drain never waits: when the channel is full (MySQL slow or down for a
//! while) the rows go to an append-only spill file in `[ranking_log] spill_dir` instead, counted
//! in `ranking_log_rows_spilled`, and the writer replays that file once it has caught up. Memory
//! is bounded by the channel capacity whatever MySQL does.
//!
//! Exactly once: each batch is inserted in one transaction together with a row in the internal
//! `ranking_log_batches` table keyed by the batch's id. A retry after an ambiguous failure (the
//! COMMIT may or may not have landed) finds the id and knows the batch is in. Replayed spill
//! chunks get ids derived from the file name and chunk number, so a replay interrupted by a crash
//! and run again skips the chunks that landed.
//!
//! Failures: an outage (connection refused or lost, pool timeout, lock timeout) is retried with
//! exponential backoff for as long as it lasts; each failed attempt adds one to the rows'
//! `retry_count`. A batch the server keeps rejecting for another reason is given up after
//! `max_attempts`: its rows are appended to the rejected file, counted in
//! `ranking_log_rows_given_up` and logged at ERROR — never dropped silently.
//!
//! Shutdown: [`LogWriter::run`] closes the channel when asked to stop, writes what is buffered
//! and replays the spill file; if the deadline passes first (`abort`), whatever is left is
//! written to the spill file for the next start.

mod spill;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{MySql, MySqlPool, QueryBuilder};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::RankingLogConfig;
use crate::metrics::Metrics;
use crate::outcome::Outcome;
use crate::retry::{Backoff, is_transient};
pub use spill::SpillFiles;

/// One `ranking_logs` row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRow {
    pub user_id: i64,
    pub coupon_id: i64,
    /// 1-based arrival order among the decided requests for this coupon.
    pub rank: i64,
    /// One of the outcomes that make a row ([`Outcome::row_name`]).
    pub outcome: Outcome,
    pub decided_at: DateTime<Utc>,
    /// Failed write attempts so far.
    #[serde(default)]
    pub retry_count: u32,
}

/// The producers' end: cheap to clone, never blocks.
#[derive(Clone)]
pub struct LogSender {
    tx: mpsc::Sender<LogRow>,
    spill: Arc<SpillFiles>,
    metrics: Metrics,
    full_warnings: Arc<RateLimitedWarning>,
}

impl LogSender {
    /// Rows waiting in the channel.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Hands rows to the writer. Rows that do not fit in the channel (or arrive after the writer
    /// stopped taking them) are appended to the spill file instead.
    pub fn send(&self, rows: impl IntoIterator<Item = LogRow>) {
        let mut overflow = Vec::new();
        for row in rows {
            match self.tx.try_send(row) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(row))
                | Err(mpsc::error::TrySendError::Closed(row)) => overflow.push(row),
            }
        }
        self.metrics
            .ranking_log_channel_depth
            .set(self.queued() as i64);
        if overflow.is_empty() {
            return;
        }
        let count = overflow.len() as u64;
        match self.spill.append_spill(&overflow) {
            Ok(()) => {
                self.metrics.ranking_log_rows_spilled.inc_by(count);
                self.full_warnings.warn(count);
            }
            Err(e) => {
                // The disk refused too: these rows are lost. Say so loudly and count them.
                self.metrics.ranking_log_rows_given_up.inc_by(count);
                tracing::error!(rows = count, error = %format!("{e:#}"),
                    "ranking-log channel full and spill file not writable: rows lost");
            }
        }
    }
}

/// Logs "channel full" at most once every ten seconds, with the number of rows spilled since the
/// last line, so a long MySQL outage does not flood the log.
struct RateLimitedWarning {
    state: std::sync::Mutex<(Option<Instant>, u64)>,
}

impl RateLimitedWarning {
    const EVERY: Duration = Duration::from_secs(10);

    fn warn(&self, rows: u64) {
        // A std mutex: held for a few instructions, never across an await.
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        state.1 += rows;
        if state.0.is_none_or(|last| last.elapsed() >= Self::EVERY) {
            tracing::warn!(
                rows_spilled = state.1,
                "ranking-log channel full: rows spilled to disk, to be replayed when MySQL catches up"
            );
            *state = (Some(Instant::now()), 0);
        }
    }
}

/// The consumer's end: one task that writes rows to MySQL.
pub struct LogWriter {
    rx: mpsc::Receiver<LogRow>,
    pool: MySqlPool,
    spill: Arc<SpillFiles>,
    metrics: Metrics,
    batch_size: usize,
    flush_interval: Duration,
    max_attempts: u32,
    batches_written: u64,
}

/// What [`LogWriter::run`] did before it returned.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WriterReport {
    pub rows_written: u64,
    /// Rows left in the spill file for the next start (shutdown deadline, or MySQL down).
    pub rows_left_spilled: u64,
}

/// Creates the channel and its two ends. Fails when the spill directory cannot be created.
pub fn channel(
    config: &RankingLogConfig,
    pool: MySqlPool,
    metrics: Metrics,
) -> anyhow::Result<(LogSender, LogWriter)> {
    let spill = Arc::new(SpillFiles::open(&config.spill_dir)?);
    let (tx, rx) = mpsc::channel(config.channel_capacity.get());
    let sender = LogSender {
        tx,
        spill: spill.clone(),
        metrics: metrics.clone(),
        full_warnings: Arc::new(RateLimitedWarning {
            state: std::sync::Mutex::new((None, 0)),
        }),
    };
    let writer = LogWriter {
        rx,
        pool,
        spill,
        metrics,
        batch_size: config.batch_size.get(),
        flush_interval: config.flush_interval,
        max_attempts: config.max_attempts,
        batches_written: 0,
    };
    Ok((sender, writer))
}

/// Why a batch did not land.
enum WriteFailure {
    /// The deadline passed while retrying: the rows are still in hand.
    Aborted,
}

impl LogWriter {
    /// Writes rows until `stop` fires and everything buffered and spilled is written, or until
    /// `abort` fires, when what is left goes to the spill file.
    pub async fn run(mut self, stop: CancellationToken, abort: CancellationToken) -> WriterReport {
        let mut report = WriterReport::default();
        // Rows spilled by an earlier process first: they are older.
        self.replay_spill(&abort, &mut report).await;
        loop {
            let first = tokio::select! {
                row = self.rx.recv() => row,
                _ = stop.cancelled(), if !self.rx.is_closed() => {
                    // Refuse new rows (late senders spill them) and write what is buffered.
                    self.rx.close();
                    continue;
                }
                // Idle: a chance to replay rows spilled during a burst.
                _ = tokio::time::sleep(self.flush_interval * 10) => {
                    self.replay_spill(&abort, &mut report).await;
                    continue;
                }
            };
            let Some(first) = first else {
                break; // closed and empty
            };
            let mut batch = Vec::with_capacity(self.batch_size);
            batch.push(first);
            self.fill_batch(&mut batch).await;
            self.take_backlog(&mut batch);
            self.metrics
                .ranking_log_channel_depth
                .set(self.rx.len() as i64);
            let id = uuid::Uuid::new_v4().to_string();
            match self.write_batch(&id, &mut batch, &abort).await {
                Ok(written) => report.rows_written += written,
                Err(WriteFailure::Aborted) => {
                    self.spill_leftovers(batch);
                    break;
                }
            }
            if self.rx.is_empty() {
                self.replay_spill(&abort, &mut report).await;
            }
            if abort.is_cancelled() {
                break;
            }
        }
        // Whatever is still buffered (abort) goes to disk for the next start.
        self.rx.close();
        let mut rest = Vec::new();
        while let Ok(row) = self.rx.try_recv() {
            rest.push(row);
        }
        self.spill_leftovers(rest);
        // Everything not written is on disk now, spilled at any time during the run.
        report.rows_left_spilled = self.spill.pending_rows();
        self.metrics.ranking_log_channel_depth.set(0);
        report
    }

    /// Takes more rows until the batch is full or `flush_interval` has passed since the first.
    async fn fill_batch(&mut self, batch: &mut Vec<LogRow>) {
        let deadline = tokio::time::Instant::now() + self.flush_interval;
        while batch.len() < self.batch_size {
            // Take what is already there without waiting.
            while batch.len() < self.batch_size {
                match self.rx.try_recv() {
                    Ok(row) => batch.push(row),
                    Err(_) => break,
                }
            }
            if batch.len() >= self.batch_size {
                break;
            }
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(row)) => batch.push(row),
                Ok(None) | Err(_) => break,
            }
        }
    }

    /// When more rows are already waiting, takes up to `STATEMENTS_PER_TRANSACTION - 1` more
    /// statements' worth without waiting: one transaction (BEGIN, marker, COMMIT: three round
    /// trips and a log flush) then carries several statements, so a backlog drains faster.
    fn take_backlog(&mut self, batch: &mut Vec<LogRow>) {
        let limit = self.batch_size * STATEMENTS_PER_TRANSACTION;
        while batch.len() < limit && self.rx.len() >= self.batch_size.min(limit - batch.len()) {
            match self.rx.try_recv() {
                Ok(row) => batch.push(row),
                Err(_) => break,
            }
        }
    }

    fn spill_leftovers(&self, rows: Vec<LogRow>) {
        if rows.is_empty() {
            return;
        }
        let count = rows.len() as u64;
        match self.spill.append_spill(&rows) {
            Ok(()) => {
                self.metrics.ranking_log_rows_spilled.inc_by(count);
            }
            Err(e) => {
                self.metrics.ranking_log_rows_given_up.inc_by(count);
                tracing::error!(rows = count, error = %format!("{e:#}"),
                    "could not spill unwritten ranking-log rows at shutdown: rows lost");
            }
        }
    }

    /// Writes the spill file's rows, chunk by chunk, if there are any and MySQL takes them.
    async fn replay_spill(&mut self, abort: &CancellationToken, report: &mut WriterReport) {
        loop {
            let chunk = match self.spill.next_replay_chunk() {
                Ok(Some(chunk)) => chunk,
                Ok(None) => return,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "cannot read the ranking-log spill file; leaving it for later");
                    return;
                }
            };
            let mut rows = chunk.rows;
            if rows.is_empty() {
                // Only unreadable lines (reported when read): nothing to write.
                let _ = self.spill.finish_replay_chunk(chunk.end_offset);
                continue;
            }
            match self.write_batch(&chunk.batch_id, &mut rows, abort).await {
                Ok(written) => {
                    report.rows_written += written;
                    if let Err(e) = self.spill.finish_replay_chunk(chunk.end_offset) {
                        tracing::error!(error = %format!("{e:#}"), "cannot record spill replay progress");
                        return;
                    }
                }
                // The chunk stays in the file; its id makes the next replay skip what landed.
                Err(WriteFailure::Aborted) => return,
            }
        }
    }

    /// Writes one batch exactly once, retrying as the module docs describe. Returns the rows
    /// written (0 when given up or already written by an earlier attempt).
    async fn write_batch(
        &mut self,
        batch_id: &str,
        rows: &mut [LogRow],
        abort: &CancellationToken,
    ) -> Result<u64, WriteFailure> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        let mut rejected_attempts = 0u32;
        loop {
            let started = Instant::now();
            let result = insert_batch(&self.pool, batch_id, rows, self.batch_size).await;
            self.metrics
                .ranking_log_batch_duration
                .observe(started.elapsed().as_secs_f64());
            match result {
                Ok(inserted) => {
                    self.metrics.ranking_log_rows_written.inc_by(inserted);
                    self.batches_written += 1;
                    if self.batches_written % 1000 == 1 {
                        self.prune_batch_ids().await;
                    }
                    return Ok(inserted);
                }
                Err(e) => {
                    for row in rows.iter_mut() {
                        row.retry_count += 1;
                    }
                    self.metrics
                        .ranking_log_rows_retried
                        .inc_by(rows.len() as u64);
                    if !is_transient(&e) {
                        rejected_attempts += 1;
                        if rejected_attempts >= self.max_attempts {
                            self.give_up(rows, &e);
                            return Ok(0);
                        }
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(rows = rows.len(), attempt = rows.first().map(|r| r.retry_count),
                        retry_in_ms = delay.as_millis() as u64, error = %format!("{e:#}"),
                        "ranking-log batch write failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = abort.cancelled() => return Err(WriteFailure::Aborted),
                    }
                }
            }
        }
    }

    fn give_up(&self, rows: &[LogRow], error: &sqlx::Error) {
        let count = rows.len() as u64;
        self.metrics.ranking_log_rows_given_up.inc_by(count);
        let kept = self.spill.append_rejected(rows);
        tracing::error!(rows = count, kept_in = %self.spill.rejected_path().display(),
            kept = kept.is_ok(), error = %error,
            "MySQL keeps rejecting a ranking-log batch; rows given up");
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

/// Largest rows per INSERT statement: 7 placeholders a row stays far below MySQL's 65 535.
const MAX_ROWS_PER_STATEMENT: usize = 5000;

/// At most this many `batch_size` statements go in one transaction (see `take_backlog`).
pub const STATEMENTS_PER_TRANSACTION: usize = 8;

/// Inserts `rows` and the batch marker in one transaction; 0 if the marker was already there.
async fn insert_batch(
    pool: &MySqlPool,
    batch_id: &str,
    rows: &[LogRow],
    rows_per_statement: usize,
) -> sqlx::Result<u64> {
    if rows.is_empty() {
        return Ok(0);
    }
    let mut tx = pool.begin().await?;
    let marker = sqlx::query("INSERT IGNORE INTO ranking_log_batches (batch_id) VALUES (?)")
        .bind(batch_id)
        .execute(&mut *tx)
        .await?;
    if marker.rows_affected() == 0 {
        // An earlier attempt committed this batch; its reply was lost.
        tx.rollback().await?;
        return Ok(0);
    }
    for chunk in rows.chunks(rows_per_statement.clamp(1, MAX_ROWS_PER_STATEMENT)) {
        insert_statement(chunk).build().execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(rows.len() as u64)
}

/// One multi-row `INSERT INTO ranking_logs` for `rows` (the benchmark's bare loop runs the same
/// statement, so the comparison is of everything around it).
pub(crate) fn insert_statement(rows: &[LogRow]) -> QueryBuilder<MySql> {
    let mut insert: QueryBuilder<MySql> = QueryBuilder::new(
        "INSERT INTO ranking_logs (user_id, coupon_type, `rank`, `timestamp`, status, reason, retry_count) ",
    );
    insert.push_values(rows, |mut b, row| {
        let issued = row.outcome == Outcome::Issued;
        b.push_bind(row.user_id)
            .push_bind(row.coupon_id.to_string())
            .push_bind(i32::try_from(row.rank).unwrap_or(i32::MAX))
            .push_bind(row.decided_at)
            .push_bind(if issued { "ISSUED" } else { "FAILED" })
            .push_bind(if issued { None } else { row.outcome.row_name() })
            .push_bind(row.retry_count);
    });
    insert
}
