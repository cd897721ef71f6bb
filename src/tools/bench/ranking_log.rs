//! The ranking-log benchmark (issue 5): `rows` rows written several ways into the same table, in
//! one run:
//!
//! 1. **bare loop, autocommit** — the writer's own multi-row INSERT statement, `batch_size` rows
//!    each, executed back to back by a plain sqlx loop, each statement its own transaction;
//! 2. **bare loop, grouped** — the same statements, [`STATEMENTS_PER_TRANSACTION`] to a
//!    transaction, as the writer groups them when rows are waiting: the fair baseline (the
//!    autocommit loop pays one log flush per statement, the writer one per group);
//! 3. **LOAD DATA INFILE** — the same rows from a file on the server's disk: the physical limit
//!    of this MySQL for this table (only when the server runs on this machine and may read files);
//! 4. **writer, steady** — the real pipeline (log stream in Redis, reader, bounded channel,
//!    writer, acknowledgement), a producer appending 1000-row entries to the log stream as the
//!    decide script does while the pipeline runs: the sustained rate, compared with (2) and (3);
//! 5. **writer, burst** — every entry already waits in Redis when the pipeline starts, as after
//!    a MySQL outage: shows memory staying bounded by the channel (the process's peak RSS) and
//!    every row landing once.
//!
//! `--runs N` repeats all five and prints each figure's median and range.

use std::time::{Duration, Instant};

use anyhow::ensure;
use chrono::Utc;

use super::{MemorySampler, Summary, in_sandbox};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::outcome::Outcome;
use crate::ranking_log::{LogPipeline, LogRow, STATEMENTS_PER_TRANSACTION, insert_statement};
use crate::tools::options::RankingLogBenchOptions;
use crate::tools::report::{group, rate};
use crate::tools::sandbox::Sandbox;
use crate::tools::simulated_api::append_log_entry;

/// Rows the drain hands over at once.
const PRODUCER_BATCH: u64 = 1000;

/// How long the pipeline may take to write one run's rows before the benchmark fails (a
/// pipeline that stopped writing must not hang the benchmark).
const WRITE_DEADLINE: Duration = Duration::from_secs(600);

pub(crate) async fn run(
    config: &Config,
    options: RankingLogBenchOptions,
) -> anyhow::Result<Summary> {
    println!(
        "ranking log: {} rows, channel capacity {}, batch size {}, {} statements per transaction",
        group(options.rows as f64),
        group(config.ranking_log.channel_capacity.get() as f64),
        config.ranking_log.batch_size,
        STATEMENTS_PER_TRANSACTION
    );
    let mut summary = Summary::default();
    let runs = options.runs.max(1);
    for run in 1..=runs {
        if runs > 1 {
            println!("  run {run}/{runs}");
        }
        in_sandbox(config, async |sandbox| {
            run_in(sandbox, options, &mut summary).await
        })
        .await?;
    }
    summary.print(runs);
    Ok(summary)
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

async fn run_in(
    sandbox: &Sandbox,
    options: RankingLogBenchOptions,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    let rows = options.rows;
    let batch_size = sandbox.config.ranking_log.batch_size.get() as u64;

    // 1. and 2. The bare loops.
    let autocommit = bare_loop(sandbox, rows, batch_size, 1).await?;
    let autocommit_rate = rate(rows, autocommit);
    println!(
        "  bare loop, autocommit:            {:.2} s = {} rows/s",
        autocommit.as_secs_f64(),
        group(autocommit_rate)
    );
    let grouped = bare_loop(sandbox, rows, batch_size, STATEMENTS_PER_TRANSACTION).await?;
    let grouped_rate = rate(rows, grouped);
    println!(
        "  bare loop, {STATEMENTS_PER_TRANSACTION} statements per commit:  {:.2} s = {} rows/s",
        grouped.as_secs_f64(),
        group(grouped_rate)
    );

    // 3. The physical limit, when the server can read a file we write.
    let load_data_rate = match load_data(sandbox, rows).await {
        Ok(elapsed) => {
            let load_rate = rate(rows, elapsed);
            println!(
                "  LOAD DATA INFILE (the limit):     {:.2} s = {} rows/s",
                elapsed.as_secs_f64(),
                group(load_rate)
            );
            Some(load_rate)
        }
        Err(e) => {
            println!("  LOAD DATA INFILE: not measured ({e:#})");
            None
        }
    };

    // 4. The pipeline, fed while it runs.
    let (steady_elapsed, _) = through_pipeline(sandbox, rows, true).await?;
    let steady_rate = rate(rows, steady_elapsed);
    println!(
        "  writer, steady:                   {:.2} s = {} rows/s = {:.0} % of the grouped bare loop (target >= 80 %: {}){}",
        steady_elapsed.as_secs_f64(),
        group(steady_rate),
        100.0 * steady_rate / grouped_rate.max(1e-9),
        if steady_rate >= 0.8 * grouped_rate {
            "met"
        } else {
            "NOT met"
        },
        load_data_rate
            .map(|limit| format!(
                ", {:.0} % of LOAD DATA",
                100.0 * steady_rate / limit.max(1e-9)
            ))
            .unwrap_or_default()
    );

    // 5. The pipeline, everything waiting in Redis already.
    let (burst_elapsed, (resident_before, burst_peak_resident)) =
        through_pipeline(sandbox, rows, false).await?;
    let burst_rate = rate(rows, burst_elapsed);
    println!(
        "  writer, burst:                    {:.2} s = {} rows/s; process RSS {} MiB before, peak {} MiB",
        burst_elapsed.as_secs_f64(),
        group(burst_rate),
        resident_before / (1024 * 1024),
        burst_peak_resident / (1024 * 1024),
    );

    summary.record("bare loop, autocommit", "rows/s", autocommit_rate);
    summary.record("bare loop, grouped as the writer", "rows/s", grouped_rate);
    if let Some(limit) = load_data_rate {
        summary.record("LOAD DATA INFILE", "rows/s", limit);
    }
    summary.record("writer, steady", "rows/s", steady_rate);
    summary.record(
        "writer, steady / grouped bare loop",
        "%",
        100.0 * steady_rate / grouped_rate.max(1e-9),
    );
    summary.record(
        "writer, steady / autocommit bare loop",
        "%",
        100.0 * steady_rate / autocommit_rate.max(1e-9),
    );
    if let Some(limit) = load_data_rate {
        summary.record(
            "writer, steady / LOAD DATA",
            "%",
            100.0 * steady_rate / limit.max(1e-9),
        );
    }
    summary.record("writer, burst", "rows/s", burst_rate);
    summary.record(
        "writer, burst: peak process RSS",
        "MiB",
        (burst_peak_resident / (1024 * 1024)) as f64,
    );
    Ok(())
}

/// The writer's INSERT statements of `batch_size` rows, back to back, `per_commit` statements to
/// a transaction; returns the time to write all `rows` (the table emptied first and checked after).
async fn bare_loop(
    sandbox: &Sandbox,
    rows: u64,
    batch_size: u64,
    per_commit: usize,
) -> anyhow::Result<Duration> {
    truncate(sandbox).await?;
    let started = Instant::now();
    let mut next = 0;
    while next < rows {
        let mut transaction = sandbox.mysql.begin().await?;
        for _ in 0..per_commit {
            if next >= rows {
                break;
            }
            let end = (next + batch_size).min(rows);
            let batch: Vec<LogRow> = (next..end).map(row).collect();
            insert_statement(&batch)
                .build()
                .execute(&mut *transaction)
                .await?;
            next = end;
        }
        transaction.commit().await?;
    }
    let elapsed = started.elapsed();
    expect_rows(sandbox, rows).await?;
    Ok(elapsed)
}

/// `LOAD DATA INFILE` of the same rows from a file in the system's temporary directory, which
/// the server reads itself (so only when it runs on this machine with the FILE privilege and
/// `secure_file_priv` allowing the directory). Returns the time of the statement alone.
async fn load_data(sandbox: &Sandbox, rows: u64) -> anyhow::Result<Duration> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    truncate(sandbox).await?;
    let path = std::env::temp_dir().join(format!("{}-ranking-logs.tsv", sandbox.name));
    let path_text = path.to_string_lossy().into_owned();
    ensure!(
        !path_text.contains(['\'', '\\']),
        "temporary path {path_text} cannot be quoted"
    );
    {
        let mut file = std::io::BufWriter::new(std::fs::File::create(&path)?);
        for i in 0..rows {
            let r = row(i);
            let issued = r.outcome == Outcome::Issued;
            writeln!(
                file,
                "{}\t{}\t{}\t{}\t{}\t{}",
                r.user_id,
                r.coupon_id,
                r.rank,
                if issued { "ISSUED" } else { "FAILED" },
                if issued {
                    "\\N"
                } else {
                    r.outcome.row_name().unwrap_or("\\N")
                },
                r.retry_count
            )?;
        }
        file.flush()?;
    }
    // The server's own user reads it.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
    let started = Instant::now();
    let loaded = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "LOAD DATA INFILE '{path_text}' INTO TABLE ranking_logs (user_id, coupon_type, `rank`, status, reason, retry_count)"
    )))
    .execute(&sandbox.mysql)
    .await;
    let elapsed = started.elapsed();
    let _ = std::fs::remove_file(&path);
    loaded?;
    expect_rows(sandbox, rows).await?;
    Ok(elapsed)
}

async fn truncate(sandbox: &Sandbox) -> anyhow::Result<()> {
    sqlx::query("TRUNCATE TABLE ranking_logs")
        .execute(&sandbox.mysql)
        .await?;
    Ok(())
}

/// Appends rows `from..to` to the log stream as `PRODUCER_BATCH`-row entries, as the decide
/// script does.
async fn produce(sandbox: &Sandbox, from: u64, to: u64) -> anyhow::Result<()> {
    let mut next = from;
    while next < to {
        let end = (next + PRODUCER_BATCH).min(to);
        let batch: Vec<LogRow> = (next..end).map(row).collect();
        append_log_entry(&sandbox.redis, &sandbox.config.keys, &batch).await?;
        next = end;
    }
    Ok(())
}

/// Runs `rows` rows through a fresh pipeline; returns the time until all were written, and
/// `(RSS before, peak RSS)`. `steady`: produced while the pipeline runs; otherwise all waiting
/// in Redis before it starts.
async fn through_pipeline(
    sandbox: &Sandbox,
    rows: u64,
    steady: bool,
) -> anyhow::Result<(Duration, (u64, u64))> {
    truncate(sandbox).await?;
    if !steady {
        produce(sandbox, 0, rows).await?;
    }
    let metrics = Metrics::new();
    let memory = MemorySampler::start();
    let started = Instant::now();
    let pipeline = LogPipeline::start(
        &sandbox.config.ranking_log,
        &sandbox.config.keys,
        sandbox.redis.clone(),
        sandbox.mysql.clone(),
        metrics.clone(),
    );
    if steady {
        produce(sandbox, 0, rows).await?;
        pipeline.waker().notify_one();
    }
    while metrics.ranking_log_rows_written.get() < rows {
        ensure!(
            started.elapsed() < WRITE_DEADLINE,
            "waited {WRITE_DEADLINE:?} for the pipeline to write {rows} rows; it wrote {}",
            metrics.ranking_log_rows_written.get()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    let (report, clean) = pipeline
        .shutdown(tokio::time::Instant::now() + Duration::from_secs(60))
        .await;
    let resident = memory.finish().await;
    ensure!(
        clean && report.rows_written == rows,
        "the pipeline wrote {} of {rows} rows",
        report.rows_written
    );
    expect_rows(sandbox, rows).await?;
    Ok((elapsed, resident))
}

/// `ranking_logs` holds exactly the rows `row(0..rows)`: `rows` rows, no (coupon, rank) pair
/// twice, and each row one of the expected ones with its fields (a count alone would pass with
/// one row doubled and another lost).
async fn expect_rows(sandbox: &Sandbox, rows: u64) -> anyhow::Result<()> {
    // row(i) has coupon i % 10 + 1 and rank i / 10 + 1, so i = (rank - 1) * 10 + coupon - 1;
    // its user is its rank, and it is ISSUED (no reason) for coupon 1, SOLD_OUT otherwise.
    let (count, distinct, expected): (i64, i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), COUNT(DISTINCT coupon_type, `rank`), CAST(COALESCE(SUM( \
           CAST(coupon_type AS SIGNED) BETWEEN 1 AND 10 AND `rank` >= 1 \
           AND (`rank` - 1) * 10 + CAST(coupon_type AS SIGNED) - 1 < ? \
           AND user_id = `rank` AND retry_count = 0 \
           AND status = IF(coupon_type = '1', 'ISSUED', 'FAILED') \
           AND reason <=> IF(coupon_type = '1', NULL, 'SOLD_OUT')), 0) AS SIGNED) \
         FROM ranking_logs",
    )
    .bind(rows)
    .fetch_one(&sandbox.mysql)
    .await?;
    let rows = rows as i64;
    ensure!(
        count == rows && distinct == rows && expected == rows,
        "ranking_logs holds {count} rows ({distinct} distinct (coupon, rank) pairs, {expected} of \
         the expected rows), expected exactly the {rows} rows written"
    );
    Ok(())
}
