//! The ranking-log benchmark (issue 5): `rows` rows written three ways into the same table, in
//! one run:
//!
//! 1. **bare loop** — the baseline: the writer's own multi-row INSERT statement, `batch_size` rows
//!    each, executed back to back by a plain sqlx loop (autocommit, no channel, no marker row);
//! 2. **writer, steady** — the real channel and writer, the producer sending 1000-row batches as
//!    the drain does but never faster than the channel has room for (nothing spills): the
//!    writer's sustained rate, to compare with (1);
//! 3. **writer, burst** — the producer sends everything at once, as a drain far ahead of MySQL
//!    does: the channel fills, the overflow goes to the spill file and is replayed. Shows memory
//!    staying bounded by the channel (the process's peak RSS) and every row landing once.

use std::time::{Duration, Instant};

use anyhow::ensure;
use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::{MemorySampler, in_sandbox};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::outcome::Outcome;
use crate::ranking_log::{self, LogRow, insert_statement};
use crate::tools::options::RankingLogBenchOptions;
use crate::tools::report::{group, rate};
use crate::tools::sandbox::Sandbox;

#[derive(Debug, Clone)]
pub struct Figures {
    pub bare_elapsed: Duration,
    pub steady_elapsed: Duration,
    pub burst_elapsed: Duration,
    pub burst_spilled: u64,
    pub burst_peak_resident: u64,
    pub resident_before: u64,
}

/// Rows the drain hands over at once.
const PRODUCER_BATCH: u64 = 1000;

pub async fn run(config: &Config, options: RankingLogBenchOptions) -> anyhow::Result<Figures> {
    println!(
        "ranking log: {} rows, channel capacity {}, batch size {}",
        group(options.rows as f64),
        group(config.ranking_log.channel_capacity.get() as f64),
        config.ranking_log.batch_size
    );
    in_sandbox(config, async |sandbox| run_in(sandbox, options).await).await
}

fn row(i: u64) -> LogRow {
    LogRow {
        user_id: (i / 10 + 1) as i64,
        coupon_id: (i % 10 + 1) as i64,
        rank: (i / 10 + 1) as i64,
        outcome: if i.is_multiple_of(10) {
            Outcome::Issued
        } else {
            Outcome::SoldOut
        },
        decided_at: Utc::now(),
        retry_count: 0,
    }
}

async fn run_in(sandbox: &Sandbox, options: RankingLogBenchOptions) -> anyhow::Result<Figures> {
    let rows = options.rows;
    let batch_size = sandbox.config.ranking_log.batch_size.get() as u64;

    // 1. The bare loop.
    let started = Instant::now();
    let mut next = 0;
    while next < rows {
        let end = (next + batch_size).min(rows);
        let batch: Vec<LogRow> = (next..end).map(row).collect();
        insert_statement(&batch)
            .build()
            .execute(&sandbox.mysql)
            .await?;
        next = end;
    }
    let bare_elapsed = started.elapsed();
    expect_rows(sandbox, rows).await?;
    let bare_rate = rate(rows, bare_elapsed);
    println!(
        "  bare sqlx loop:  {:.2} s = {} rows/s",
        bare_elapsed.as_secs_f64(),
        group(bare_rate)
    );

    // 2. The writer, fed as fast as the channel takes rows.
    let (steady_elapsed, spilled, _) = through_writer(sandbox, rows, true).await?;
    ensure!(spilled == 0, "the paced producer spilled {spilled} rows");
    let steady_rate = rate(rows, steady_elapsed);
    println!(
        "  writer, steady:  {:.2} s = {} rows/s = {:.0} % of the bare loop (target >= 80 %: {})",
        steady_elapsed.as_secs_f64(),
        group(steady_rate),
        100.0 * steady_rate / bare_rate.max(1e-9),
        if steady_rate >= 0.8 * bare_rate {
            "met"
        } else {
            "NOT met"
        }
    );

    // 3. The writer, everything sent at once.
    let (burst_elapsed, burst_spilled, (resident_before, burst_peak_resident)) =
        through_writer(sandbox, rows, false).await?;
    println!(
        "  writer, burst:   {:.2} s = {} rows/s; {} rows spilled to disk and replayed; process RSS {} MiB before, peak {} MiB",
        burst_elapsed.as_secs_f64(),
        group(rate(rows, burst_elapsed)),
        group(burst_spilled as f64),
        resident_before / (1024 * 1024),
        burst_peak_resident / (1024 * 1024),
    );
    Ok(Figures {
        bare_elapsed,
        steady_elapsed,
        burst_elapsed,
        burst_spilled,
        burst_peak_resident,
        resident_before,
    })
}

/// Sends `rows` rows through a fresh channel and writer; returns the time until the writer had
/// written them all, the rows spilled, and `(RSS before, peak RSS)`.
async fn through_writer(
    sandbox: &Sandbox,
    rows: u64,
    paced: bool,
) -> anyhow::Result<(Duration, u64, (u64, u64))> {
    sqlx::query("TRUNCATE TABLE ranking_logs")
        .execute(&sandbox.mysql)
        .await?;
    let config = &sandbox.config.ranking_log;
    let metrics = Metrics::new();
    let (sender, writer) = ranking_log::channel(config, sandbox.mysql.clone(), metrics.clone())?;
    let capacity = config.channel_capacity.get();
    let memory = MemorySampler::start();
    let started = Instant::now();
    let stop = CancellationToken::new();
    let writing = tokio::spawn(writer.run(stop.clone(), CancellationToken::new()));
    let mut next = 0;
    while next < rows {
        let end = (next + PRODUCER_BATCH).min(rows);
        if paced {
            while sender.queued() + (end - next) as usize > capacity {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
        sender.send((next..end).map(row));
        next = end;
        // The drain yields between batches (each is a Redis round trip); so does this.
        tokio::task::yield_now().await;
    }
    drop(sender);
    stop.cancel();
    let report = writing.await?;
    let elapsed = started.elapsed();
    let resident = memory.finish().await;
    ensure!(
        report.rows_written == rows && report.rows_left_spilled == 0,
        "the writer wrote {} of {rows} rows",
        report.rows_written
    );
    expect_rows(sandbox, rows).await?;
    Ok((elapsed, metrics.ranking_log_rows_spilled.get(), resident))
}

async fn expect_rows(sandbox: &Sandbox, rows: u64) -> anyhow::Result<()> {
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM ranking_logs")
        .fetch_one(&sandbox.mysql)
        .await?;
    ensure!(
        count as u64 == rows,
        "ranking_logs has {count} rows, expected {rows}"
    );
    Ok(())
}
