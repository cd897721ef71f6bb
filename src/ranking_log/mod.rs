//! The ranking log: one `ranking_logs` row per decided coupon request, exactly once, whatever
//! crashes, lost replies or pod replacements happen on the way (docs/contract.md §4).
//!
//! ```text
//! decide.lua ──XADD (same atomic step as the decisions)──▶ log STREAM (one entry per batch)
//!   LogReader ──XREADGROUP / XAUTOCLAIM (group "ranking-log")──▶ bounded channel (rows)
//!   LogWriter ──BEGIN; markers; INSERT rows; COMMIT──▶ ranking_logs
//!             ──then XACK + XDEL (+ row counter)──▶ log STREAM
//! ```
//!
//! - **Where rows wait:** in Redis, never only in a process or on a local disk. The decide
//!   script appends the batch's rows to the lane's log stream as one compact entry
//!   ([`entry`] decodes it), so a decision and its row exist together or not at all.
//! - **Who writes them:** any replica. Every process reads with its own consumer name in the
//!   stream's consumer group; an entry read by a consumer that died is taken over by
//!   `XAUTOCLAIM` once it has been idle for [`stream::CLAIM_IDLE`]. A live reader keeps its own
//!   entries fresh (`XCLAIM … JUSTID`) while MySQL is slow, and at shutdown hands what it could
//!   not write back at once (marks it idle), so a replacement takes over without waiting.
//! - **One owner at a time:** a reader that was stalled past the idle time (paused, SIGSTOPped,
//!   cut off) and finds on waking that another took its entries over leaves them to it: its
//!   refresh, hand-back, acknowledgement and dead-lettering act only on entries still pending to
//!   it, and the writer drops lost entries unwritten (it checks before each attempt; metric
//!   `ranking_log_entries_taken_over_total`). See [`stream`]'s docs.
//! - **Exactly once:** each entry's rows are inserted in one transaction together with a marker
//!   row in `ranking_log_batches` whose id is the stream key, entry id and first row (see
//!   [`LogEntry::batch_id`]). A redelivery after a lost COMMIT reply, a crash between COMMIT and
//!   XACK or two replicas holding the same entry finds the marker and writes nothing. Only after
//!   the COMMIT is the entry acknowledged and deleted.
//! - **Memory:** the channel between reader and writer is bounded in rows
//!   (`[ranking_log] channel_capacity`); when MySQL is slow the reader stops reading and the
//!   backlog stays in Redis (metrics `ranking_log_backlog_rows`, `…_oldest_age_seconds`).
//! - **Failures:** an outage is retried with backoff for as long as it lasts (each failed
//!   attempt adds one to the rows' `retry_count`). An entry MySQL keeps rejecting for another
//!   reason is given up after `max_attempts`: it moves to the `<log>:dead` stream with the
//!   error, is counted in `ranking_log_rows_given_up` and logged at ERROR; `requeue-dead
//!   --ranking-log` puts it back.

pub mod entry;
pub mod stream;
mod writer;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use fred::prelude::Client;
use sqlx::{MySql, MySqlPool, QueryBuilder};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::config::RankingLogConfig;
use crate::coupon::LogReady;
use crate::keys::KeyTemplates;
use crate::metrics::Metrics;
use crate::outcome::Outcome;
pub use entry::LogEntry;
pub use stream::{Held, LogReader, LogStream, requeue_log_dead};
pub use writer::{InsertError, LogWriter, STATEMENTS_PER_TRANSACTION, insert_entries};

/// One `ranking_logs` row.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRow {
    pub user_id: i64,
    pub coupon_id: i64,
    /// 1-based arrival order among the decided requests for this coupon.
    pub rank: i64,
    /// One of the outcomes that make a row ([`Outcome::row_name`]).
    pub outcome: Outcome,
    pub decided_at: DateTime<Utc>,
    /// Failed write attempts so far.
    pub retry_count: u32,
}

/// What the pipeline did before it stopped.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WriterReport {
    pub rows_written: u64,
    /// Rows read but not written when the deadline passed: they stay in Redis, handed back for
    /// the next start or another replica.
    pub rows_left: u64,
}

/// The reader and writer tasks with their shared channel.
pub struct LogPipeline {
    stop: CancellationToken,
    abort: CancellationToken,
    wake: Arc<LogReady>,
    reader: tokio::task::JoinHandle<()>,
    writer: tokio::task::JoinHandle<WriterReport>,
    stream: LogStream,
    in_hand: stream::InHand,
    keys: KeyTemplates,
    /// The reader's work set: the streams it knows to have entries.
    work: stream::WorkSet,
}

impl LogPipeline {
    /// Starts reading the log streams of `keys` (every registered coupon's in the per-coupon
    /// layout) and writing their rows to MySQL.
    pub fn start(
        config: &RankingLogConfig,
        keys: &KeyTemplates,
        redis: Client,
        pool: MySqlPool,
        metrics: Metrics,
    ) -> Self {
        let stream = LogStream::new(redis);
        let capacity = config.channel_capacity.get();
        let permits = Arc::new(Semaphore::new(capacity));
        let (tx, rx) = mpsc::channel(capacity);
        let stop = CancellationToken::new();
        let abort = CancellationToken::new();
        let wake = Arc::new(LogReady::default());
        let in_hand = stream::InHand::default();
        let work = stream::WorkSet::default();
        let reader = LogReader {
            stream: stream.clone(),
            keys: keys.clone(),
            tx,
            permits: permits.clone(),
            capacity,
            in_hand: in_hand.clone(),
            wake: wake.clone(),
            poll: config.flush_interval.max(Duration::from_millis(20)) * 4,
            metrics: metrics.clone(),
            work: work.clone(),
        };
        let writer = LogWriter::new(
            config,
            rx,
            pool,
            stream.clone(),
            in_hand.clone(),
            keys.clone(),
            metrics,
        );
        let reader = tokio::spawn(reader.run(stop.clone(), abort.clone()));
        let writer = tokio::spawn(writer.run(abort.clone()));
        Self {
            stop,
            abort,
            wake,
            reader,
            writer,
            stream,
            in_hand,
            keys: keys.clone(),
            work,
        }
    }

    /// This pipeline's consumer name in the log streams' group.
    pub fn consumer(&self) -> &str {
        self.stream.consumer()
    }

    /// How the drain tells the reader which log streams have rows (and wakes it).
    pub fn waker(&self) -> Arc<LogReady> {
        self.wake.clone()
    }

    /// Rows waiting in Redis (all lanes), and the age of the oldest entry. Walks every lane
    /// (per coupon: every registered coupon's log stream, and a SCAN for those of coupons no
    /// longer registered); [`Self::known_backlog`] is the cheap one.
    pub async fn backlog(&self) -> anyhow::Result<(u64, Duration)> {
        self.stream.backlog(&self.keys).await
    }

    /// Rows waiting in the log streams the reader knows to have entries, and the age of the
    /// oldest entry: once the reader has finished a walk of every stream since some moment
    /// ([`LogReady::sweeps_done`]), every row that waited in Redis then and was not written yet,
    /// and every row this process's drain decided since — without walking every lane.
    pub async fn known_backlog(&self) -> anyhow::Result<(u64, Duration)> {
        stream::known_backlog(self.stream.client(), &self.work).await
    }

    /// Stops reading; writes what was read, and is done by `deadline`, whatever Redis and MySQL
    /// do. The writer has until shortly before it ([`HAND_BACK_RESERVE`]); then what is left is
    /// handed back to Redis (marked idle) for the next start or another replica, in what time
    /// remains. A task still stuck in a call at `deadline` (Redis or MySQL frozen) is dropped
    /// there: its entries stay pending in Redis and any reader takes them over after
    /// [`stream::CLAIM_IDLE`] (each entry's batch marker makes a second write nothing), as after
    /// a crash. `true` when everything read was written in time.
    pub async fn shutdown(self, deadline: tokio::time::Instant) -> (WriterReport, bool) {
        self.stop.cancel();
        let now = tokio::time::Instant::now();
        let reserve = HAND_BACK_RESERVE.min(deadline.saturating_duration_since(now) / 2);
        let writing_ends = deadline - reserve;
        let mut writer = self.writer;
        let (report, clean) = match tokio::time::timeout_at(writing_ends, &mut writer).await {
            Ok(report) => (report.unwrap_or_default(), true),
            Err(_) => {
                self.abort.cancel();
                // The writer stops at once on `abort`, even in the middle of a call to Redis or
                // MySQL; should it not (acknowledging committed entries to a frozen Redis), it
                // is dropped at the deadline (its rows stay in Redis).
                let report = match tokio::time::timeout_at(deadline, &mut writer).await {
                    Ok(report) => report.unwrap_or_default(),
                    Err(_) => {
                        writer.abort();
                        WriterReport::default()
                    }
                };
                (report, false)
            }
        };
        self.abort.cancel();
        let mut reader = self.reader;
        if tokio::time::timeout_at(deadline, &mut reader)
            .await
            .is_err()
        {
            reader.abort();
        }
        // Entries read and not written (the deadline came, or the reader took some after the
        // writer stopped): marked idle so the next reader takes them over at once. Not past the
        // deadline: left pending, they are taken over once idle all the same.
        let in_hand = self.in_hand.count();
        let released = tokio::time::timeout_at(deadline, self.in_hand.release_all(&self.stream))
            .await
            .unwrap_or(0);
        if in_hand > 0 {
            tracing::warn!(
                entries = in_hand,
                handed_back = released,
                rows = report.rows_left,
                "ranking-log rows not written by the deadline; they stay in Redis for the next reader (handed back now, or taken over once idle)"
            );
        }
        (report, clean)
    }
}

/// The last part of the shutdown deadline kept for handing unwritten log entries back to Redis
/// (a few commands; at most half the time left).
const HAND_BACK_RESERVE: Duration = Duration::from_secs(1);

/// Largest rows per INSERT statement: 7 placeholders a row stays far below MySQL's 65 535.
const MAX_ROWS_PER_STATEMENT: usize = 5000;

/// One multi-row `INSERT INTO ranking_logs` for `rows` (the benchmark's bare loop runs the same
/// statement, so the comparison is of everything around it).
pub(crate) fn insert_statement<'a>(
    rows: impl IntoIterator<Item = &'a LogRow>,
) -> QueryBuilder<MySql> {
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
