//! The coupon drain benchmark (issue 3): a flash sale of `requests` requests over `coupons`
//! coupons × `stock`, drained by the worker and by the naive algorithm, each in its own sandbox,
//! in one run.
//!
//! The worker's side is what `drain` runs: the decide script per batch, the outbox persister
//! concurrently, and the ranking-log writer taking one row per decided request (so MySQL is busy
//! with both tables, as in production). Decided/s is requests over the time until the queue was
//! empty; persisted/s is issued coupons over the time until the last one was committed in
//! `user_coupon`, both from the same start.
//!
//! The naive side is the usual implementation this project replaces, written faithfully: for
//! each head entry, `SISMEMBER` issued, `DECR` stock, `SADD` issued, a single-row `INSERT`, then
//! `ZREM` — one awaited call after another. (The usual code leaves rejected entries at the head;
//! here it removes them, or it would never finish.) It writes no ranking log, which only flatters
//! it.

use std::time::{Duration, Instant};

use anyhow::ensure;
use fred::prelude::*;
use tokio_util::sync::CancellationToken;

use super::in_sandbox;
use crate::app::LoggedDrain;
use crate::config::Config;
use crate::coupon::member::parse_member;
use crate::coupon::{CouponDrain, DrainReport, Outcome, StopReason};
use crate::metrics::Metrics;
use crate::ranking_log;
use crate::tools::options::CouponBenchOptions;
use crate::tools::report::{group, rate};
use crate::tools::sandbox::Sandbox;
use crate::tools::simulated_api::FlashSale;

/// What the worker did and how fast.
#[derive(Debug, Clone)]
pub struct WorkerFigures {
    pub report: DrainReport,
    pub decide_elapsed: Duration,
    /// Until the last coupon was issued (in Redis).
    pub issue_elapsed: Duration,
    /// Until the last issued coupon was committed in MySQL.
    pub persist_elapsed: Duration,
    pub log_elapsed: Duration,
    pub rows_persisted: u64,
    pub log_rows: u64,
}

#[derive(Debug, Clone)]
pub struct NaiveFigures {
    pub requests: u64,
    pub issued: u64,
    pub elapsed: Duration,
}

#[derive(Debug, Clone)]
pub struct Figures {
    pub worker: WorkerFigures,
    /// Persister throughput on a backlog: rows per second.
    pub backlog_rate: f64,
    /// The same sale on a Redis Cluster with the per-coupon layout, when asked for.
    pub cluster: Option<WorkerFigures>,
    pub naive: Option<NaiveFigures>,
}

pub async fn run(config: &Config, options: &CouponBenchOptions) -> anyhow::Result<Figures> {
    let sale = options.sale();
    println!(
        "coupon drain: {} requests over {} coupons x {} stock",
        group(sale.requests as f64),
        sale.coupons,
        group(sale.stock as f64)
    );
    let worker = in_sandbox(config, async |sandbox| run_worker(sandbox, sale).await).await?;
    print_worker("worker", &worker);
    let worker_decide_rate = rate(worker.report.decided(), worker.decide_elapsed);
    let worker_persist_rate = rate(worker.rows_persisted, worker.persist_elapsed);
    let (backlog_rows, backlog_elapsed) =
        in_sandbox(config, async |sandbox| run_backlog(sandbox, sale).await).await?;
    let backlog_rate = rate(backlog_rows, backlog_elapsed);
    println!(
        "          the persister alone, catching up on an outbox of {} issued coupons (as after a MySQL outage): {:.2} s = {} persisted/s",
        group(backlog_rows as f64),
        backlog_elapsed.as_secs_f64(),
        group(backlog_rate)
    );
    println!(
        "          targets: >= 100 000 decided/s ({}); >= 80 000 persisted/s: during the sale {} (bounded by how fast coupons are issued), persister capacity {}",
        verdict(worker_decide_rate >= 100_000.0),
        verdict(worker_persist_rate >= 80_000.0),
        verdict(backlog_rate >= 80_000.0)
    );
    let cluster = match &options.cluster_url {
        Some(url) => {
            let mut on_cluster = config.clone();
            on_cluster.redis.url = crate::config::SecretUrl::new(url.clone());
            on_cluster.keys = crate::keys::KeyTemplates::per_coupon_layout();
            let figures =
                in_sandbox(&on_cluster, async |sandbox| run_worker(sandbox, sale).await).await?;
            print_worker("cluster", &figures);
            println!(
                "  ratio:  cluster (per-coupon layout) / single Redis = {:.2}x decided/s",
                rate(figures.report.decided(), figures.decide_elapsed)
                    / worker_decide_rate.max(1e-9)
            );
            Some(figures)
        }
        None => None,
    };
    let naive = if options.naive_requests > 0 {
        let naive_sale = FlashSale {
            requests: options.naive_requests,
            stock: (sale.stock * options.naive_requests).div_ceil(sale.requests.max(1)),
            ..sale
        };
        let naive =
            in_sandbox(config, async |sandbox| run_naive(sandbox, naive_sale).await).await?;
        let naive_rate = rate(naive.requests, naive.elapsed);
        println!(
            "  naive:  decided {} in {:.2} s = {} decided/s ({} issued, persisted as it goes)",
            group(naive.requests as f64),
            naive.elapsed.as_secs_f64(),
            group(naive_rate),
            group(naive.issued as f64),
        );
        println!(
            "  ratio:  worker / naive = {:.1}x decided/s",
            worker_decide_rate / naive_rate.max(1e-9)
        );
        Some(naive)
    } else {
        None
    };
    Ok(Figures {
        worker,
        backlog_rate,
        cluster,
        naive,
    })
}

fn print_worker(label: &str, worker: &WorkerFigures) {
    let decided = worker.report.decided();
    println!(
        "  {label}: decided {} in {:.2} s = {} decided/s; {} issued coupons in MySQL after {:.2} s = {} persisted/s (the last one issued after {:.2} s); {} ranking-log rows in MySQL after {:.2} s",
        group(decided as f64),
        worker.decide_elapsed.as_secs_f64(),
        group(rate(decided, worker.decide_elapsed)),
        group(worker.rows_persisted as f64),
        worker.persist_elapsed.as_secs_f64(),
        group(rate(worker.rows_persisted, worker.persist_elapsed)),
        worker.issue_elapsed.as_secs_f64(),
        group(worker.log_rows as f64),
        worker.log_elapsed.as_secs_f64(),
    );
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

async fn run_worker(sandbox: &Sandbox, sale: FlashSale) -> anyhow::Result<WorkerFigures> {
    let config = &sandbox.config;
    let keys = &config.keys;
    sale.write_stock(&sandbox.redis, keys).await?;
    sale.enqueue(&sandbox.redis, keys, 0..sale.requests, 1_700_000_000_000)
        .await?;

    let metrics = Metrics::new();
    let logged = LoggedDrain::start(config, &sandbox.backends(), &metrics)?;
    let drain = &logged.drain;

    let started = Instant::now();
    let persister_stop = CancellationToken::new();
    let persister = tokio::spawn({
        let drain = drain.clone();
        let stop = persister_stop.clone();
        async move { drain.run_persister(stop).await }
    });
    // When the last issued coupon was committed, read off the persister's own counter (polling
    // MySQL here would load the server being measured).
    let expected = sale.expected_issued();
    let persisted_watch = tokio::spawn({
        let persisted = metrics.coupon_rows_persisted.clone();
        let issued = metrics.outcome(Outcome::Issued.label());
        async move {
            let mut last_issue = None;
            while persisted.get() < expected {
                if last_issue.is_none() && issued.get() >= expected {
                    last_issue = Some(started.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (
                last_issue.unwrap_or_else(|| started.elapsed()),
                started.elapsed(),
            )
        }
    });
    let never = CancellationToken::new();
    let mut report = DrainReport::default();
    loop {
        let tick = drain.tick(Duration::MAX, &never).await?;
        report.absorb(&tick);
        if tick.stopped == StopReason::QueueEmpty {
            break;
        }
    }
    let decide_elapsed = started.elapsed();

    let (issue_elapsed, persist_elapsed) = persisted_watch.await?;
    persister_stop.cancel();
    persister.await?;

    let written = logged.finish_writing().await;
    let log_elapsed = started.elapsed();
    let rows_persisted: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM user_coupon")
        .fetch_one(&sandbox.mysql)
        .await?;
    let rows_persisted = rows_persisted as u64;
    let log_rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM ranking_logs")
        .fetch_one(&sandbox.mysql)
        .await?;

    ensure!(
        report.decided() == sale.requests,
        "decided {} of {} requests",
        report.decided(),
        sale.requests
    );
    ensure!(
        report[Outcome::Issued] == expected && rows_persisted == expected,
        "issued {} and persisted {rows_persisted}, expected {expected}",
        report[Outcome::Issued]
    );
    ensure!(
        log_rows as u64 == sale.requests && written.rows_left_spilled == 0,
        "ranking_logs has {log_rows} rows for {} decided requests",
        sale.requests
    );
    Ok(WorkerFigures {
        report,
        decide_elapsed,
        issue_elapsed,
        persist_elapsed,
        log_elapsed,
        rows_persisted,
        log_rows: log_rows as u64,
    })
}

/// Decides the sale's issuing requests with no persister running, so that every issued coupon
/// waits in the outbox, then times the persister emptying it.
async fn run_backlog(sandbox: &Sandbox, sale: FlashSale) -> anyhow::Result<(u64, Duration)> {
    let config = &sandbox.config;
    let keys = &config.keys;
    // Round-robin arrivals: the first coupons x stock requests are exactly the issued ones.
    let issuing = FlashSale {
        requests: sale.requests.min(sale.coupons * sale.stock),
        ..sale
    };
    issuing.write_stock(&sandbox.redis, keys).await?;
    issuing
        .enqueue(&sandbox.redis, keys, 0..issuing.requests, 1_700_000_000_000)
        .await?;
    // No writer, and room in the channel for every row: the ranking log stays out of the way.
    let mut log_config = config.ranking_log.clone();
    log_config.channel_capacity =
        std::num::NonZeroUsize::MIN.saturating_add(issuing.requests as usize);
    let (log, _writer) = ranking_log::channel(&log_config, sandbox.mysql.clone(), Metrics::new())?;
    let drain = CouponDrain::new(
        sandbox.redis.clone(),
        sandbox.mysql.clone(),
        keys,
        config.coupon.batch_size.get(),
        log,
        Metrics::new(),
    );
    let never = CancellationToken::new();
    while drain.tick(Duration::MAX, &never).await?.stopped != StopReason::QueueEmpty {}
    let started = Instant::now();
    let persisted = drain.persist_all().await? as u64;
    let elapsed = started.elapsed();
    ensure!(
        persisted == issuing.expected_issued(),
        "the persister moved {persisted} of {} coupons",
        issuing.expected_issued()
    );
    Ok((persisted, elapsed))
}

/// The naive drain: check-then-act over separate calls, one entry at a time.
async fn run_naive(sandbox: &Sandbox, sale: FlashSale) -> anyhow::Result<NaiveFigures> {
    let keys = &sandbox.config.keys;
    anyhow::ensure!(
        !keys.per_coupon(),
        "the naive baseline reads one queue; run it with the single-queue layout"
    );
    let redis = &sandbox.redis;
    sale.write_stock(redis, keys).await?;
    sale.enqueue(redis, keys, 0..sale.requests, 1_700_000_000_000)
        .await?;

    let started = Instant::now();
    let mut decided = 0u64;
    let mut issued = 0u64;
    loop {
        let head: Vec<String> = redis
            .zrange(&keys.queue, 0, 99, None, false, None, false)
            .await?;
        if head.is_empty() {
            break;
        }
        for member in head {
            if let Ok(request) = parse_member(&member) {
                let issued_key = keys.issued(request.coupon_id);
                let already: bool = redis.sismember(&issued_key, request.user_id).await?;
                if !already {
                    let left: i64 = redis.decr(keys.stock(request.coupon_id)).await?;
                    if left >= 0 {
                        let _: i64 = redis.sadd(&issued_key, request.user_id).await?;
                        sqlx::query(
                            "INSERT INTO user_coupon (user_id, coupon_id, issued_at) VALUES (?, ?, NOW(3))",
                        )
                        .bind(request.user_id)
                        .bind(request.coupon_id)
                        .execute(&sandbox.mysql)
                        .await?;
                        issued += 1;
                    }
                }
            }
            let _: i64 = redis.zrem(&keys.queue, member).await?;
            decided += 1;
        }
    }
    let elapsed = started.elapsed();
    ensure!(
        decided == sale.requests && issued == sale.expected_issued(),
        "naive drain decided {decided} and issued {issued}"
    );
    Ok(NaiveFigures {
        requests: decided,
        issued,
        elapsed,
    })
}
