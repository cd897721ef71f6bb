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
//! Two workloads (`--workload`): the **clean** sale (every request well-formed, each user asking
//! once), and a **realistic** mix beside it: 1 % malformed entries among the requests, and while
//! the drain runs, the API keeps writing (5 % more entries: users asking again — DUPLICATE, or
//! absorbed by ZADD NX while their first request still waits —, new users, malformed entries).
//!
//! Every run checks its results and fails the command if they are wrong: every request decided
//! once and every undecidable one dead-lettered; per coupon `initial = remaining + holders =
//! rows in user_coupon`; the exact set of users in `user_coupon`, against a model of the sale
//! (first requests in score order, ties by member); no `(coupon, rank)` pair twice in
//! `ranking_logs` and ranks 1..n per coupon.
//!
//! The persister's catch-up capacity is measured on a backlog left by a MySQL outage during the
//! whole sale: the outbox of issued coupons *and* the ranking-log rows of every decided request
//! wait, and both are written at once, as after a real outage (and, for comparison, the
//! persister alone).
//!
//! The naive side is the usual implementation this project replaces, written faithfully: for
//! each head entry, `SISMEMBER` issued, `DECR` stock, `SADD` issued, a single-row `INSERT`, then
//! `ZREM` — one awaited call after another. (The usual code leaves rejected entries at the head;
//! here it removes them, or it would never finish.) It writes no ranking log, which only flatters
//! it.
//!
//! `--runs N` repeats everything and prints each figure's median and range.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use anyhow::ensure;
use fred::prelude::*;
use tokio_util::sync::CancellationToken;

use super::{Summary, in_sandbox};
use crate::app::CouponJob;
use crate::config::Config;
use crate::coupon::member::parse_member;
use crate::coupon::{CouponDrain, DrainReport, Outcome, StopReason};
use crate::keys::KeyTemplates;
use crate::metrics::Metrics;
use crate::tools::options::{CouponBenchOptions, Workload};
use crate::tools::report::{Latencies, group, millis, rate};
use crate::tools::sandbox::Sandbox;
use crate::tools::simulated_api::{FlashSale, enqueue_members};

/// What the worker did and how fast.
#[derive(Debug, Clone)]
pub(crate) struct WorkerFigures {
    pub report: DrainReport,
    pub decide_elapsed: Duration,
    /// CPU this process (the worker's tasks, and the benchmark's, which mostly wait) used while
    /// the queue drained; the same for Redis (INFO cpu: every client of that Redis counts).
    pub drain_cpu: Duration,
    pub drain_redis_cpu: Duration,
    /// Until the last coupon was issued (in Redis).
    pub issue_elapsed: Duration,
    /// Until the last issued coupon was committed in MySQL.
    pub persist_elapsed: Duration,
    pub log_elapsed: Duration,
    pub rows_persisted: u64,
    pub log_rows: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct NaiveFigures {
    pub requests: u64,
    pub issued: u64,
    pub elapsed: Duration,
}

/// When the first request arrives (epoch ms; ten arrive per millisecond).
const FIRST_ARRIVAL_MS: i64 = 1_700_000_000_000;

/// The longest a benchmark waits for the drain to empty the queue, and for the persister to
/// commit what was issued: a stuck job fails the benchmark instead of hanging it.
const PERSIST_DEADLINE: Duration = Duration::from_secs(600);

pub(crate) async fn run(config: &Config, options: &CouponBenchOptions) -> anyhow::Result<Summary> {
    if options.catalog {
        return catalog(config, options).await;
    }
    let sale = options.sale();
    println!(
        "coupon drain: {} requests over {} coupons x {} stock",
        group(sale.requests as f64),
        sale.coupons,
        group(sale.stock as f64)
    );
    let mut summary = Summary::default();
    let runs = options.runs.max(1);
    for run in 1..=runs {
        if runs > 1 {
            println!("  run {run}/{runs}");
        }
        run_once(config, options, sale, &mut summary).await?;
    }
    summary.print(runs);
    Ok(summary)
}

/// `--catalog` (issue 19): the same sale decided over few and many coupons, in both layouts, in
/// one run. Every case issues the same number of coupons (half the requests: stock is split over
/// the coupons with traffic), so the ratios measure the cost of distinct coupons and of the
/// registry's size, not of issuing more. With `--runs N` the cases take turns (every case once,
/// N times over), so a machine that slows down or speeds up meanwhile weighs on every case alike;
/// each run prints its ratios and the summary their medians. Beside each rate: the CPU the worker
/// process and Redis used while the queue drained, per 1 000 requests (the rest of the machine's
/// two cores went to MySQL, the benchmark's other clients and whatever else runs there).
async fn catalog(config: &Config, options: &CouponBenchOptions) -> anyhow::Result<Summary> {
    let requests = options.requests;
    let runs = options.runs.max(1);
    let mut summary = Summary::default();
    // (label, layout is per coupon, coupons with traffic, coupons registered)
    let cases: [(&str, bool, u64, u64); 5] = [
        ("single queue, 10 coupons", false, 10, 0),
        ("single queue, 1 000 coupons", false, 1_000, 0),
        ("single queue, 20 000 coupons", false, 20_000, 0),
        ("per coupon, 10 registered / 10 with traffic", true, 10, 10),
        (
            "per coupon, 20 000 registered / 10 with traffic",
            true,
            10,
            20_000,
        ),
    ];
    println!(
        "coupon catalog: {} requests, half of them issued, per case; batch_size {}",
        group(requests as f64),
        config.coupon.batch_size
    );
    for run in 1..=runs {
        if runs > 1 {
            println!("  run {run}/{runs}");
        }
        let mut rates = Vec::new();
        for (label, per_coupon, coupons, registered) in cases {
            let sale = FlashSale {
                coupons,
                stock: (requests / 2).div_ceil(coupons),
                requests,
            };
            let mut case_config = config.clone();
            if per_coupon {
                case_config.keys = KeyTemplates::per_coupon_layout();
            }
            let worker = in_sandbox(&case_config, async |sandbox| {
                let keys = &sandbox.config.keys;
                if registered > coupons {
                    let extra: Vec<u64> = (coupons + 1..=registered).collect();
                    for chunk in extra.chunks(5000) {
                        let _: u64 = sandbox
                            .redis
                            .sadd(&keys.coupon_registry, chunk.to_vec())
                            .await?;
                    }
                }
                run_worker(sandbox, sale, false).await
            })
            .await?;
            let decided = rate(worker.report.decided(), worker.decide_elapsed);
            let per_thousand = |cpu: Duration| {
                cpu.as_secs_f64() * 1000.0 * 1000.0 / worker.report.decided().max(1) as f64
            };
            println!(
                "  {label}: {} decided/s (CPU while draining, per 1 000 requests: worker {:.1} ms, Redis {:.1} ms)",
                group(decided),
                per_thousand(worker.drain_cpu),
                per_thousand(worker.drain_redis_cpu)
            );
            summary.record(label, "decided/s", decided);
            rates.push(decided);
        }
        let ratio = |a: usize, b: usize| rates[a] / rates[b].max(1e-9);
        println!(
            "  ratios: single queue 1 000 / 10 coupons = {:.2}x (target >= 0.8), 20 000 / 10 = {:.2}x (target >= 0.6); per coupon 20 000 / 10 registered = {:.2}x (target >= 0.8)",
            ratio(1, 0),
            ratio(2, 0),
            ratio(4, 3)
        );
        summary.record("ratio, single queue 1 000 / 10 coupons", "x", ratio(1, 0));
        summary.record("ratio, single queue 20 000 / 10 coupons", "x", ratio(2, 0));
        summary.record("ratio, per coupon 20 000 / 10 registered", "x", ratio(4, 3));
    }
    if !options.no_idle {
        idle_catalog(config, &mut summary).await?;
    }
    summary.print(runs);
    Ok(summary)
}

/// Registered coupons in the idle part of `--catalog`.
const IDLE_REGISTRY: i64 = 20_000;
/// How long the idle daemons' cost is measured, per number of replicas.
const IDLE_WINDOW: Duration = Duration::from_secs(30);
/// Replicas in the idle part: 1, then 2, then 3 (each measured with the ones before running).
const IDLE_REPLICAS: usize = 3;
/// Lone requests sent after each window, one every [`LONE_EVERY`], each in a lane never used
/// before: together they span more than one registry sweep (`sweep_interval_secs`, 10 s).
const LONE_REQUESTS: i64 = 25;
const LONE_EVERY: Duration = Duration::from_millis(500);

/// CPU time (user + system) this process has used so far, from `/proc/self/stat` (Linux).
fn process_cpu() -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the command name (in parentheses, which may hold spaces): utime is the
    // 14th field of the line, the 12th after the name; stime the 13th.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow::anyhow!("unexpected /proc/self/stat"))?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<u64> {
        Ok(fields
            .get(i)
            .ok_or_else(|| anyhow::anyhow!("unexpected /proc/self/stat"))?
            .parse()?)
    };
    // Clock ticks are 1/100 s on Linux (sysconf(_SC_CLK_TCK) = 100 on every supported arch).
    Ok(Duration::from_millis((ticks(11)? + ticks(12)?) * 10))
}

/// Redis' CPU time so far (INFO cpu: used_cpu_sys + used_cpu_user), whoever its clients are.
async fn redis_cpu(redis: &Client) -> anyhow::Result<Duration> {
    let info: String = redis.info(Some(fred::types::InfoKind::Cpu)).await?;
    let seconds: f64 = info
        .lines()
        .filter_map(|line| {
            let (name, value) = line.trim().split_once(':')?;
            matches!(name, "used_cpu_sys" | "used_cpu_user").then(|| value.parse::<f64>().ok())?
        })
        .sum();
    Ok(Duration::from_secs_f64(seconds))
}

/// Waits until every lane of `coupons` is marked reconciled (the sweeping replica reconciles
/// them ahead of their first request); returns how long that took.
async fn wait_reconciled_ahead(
    redis: &Client,
    keys: &KeyTemplates,
    coupons: &[i64],
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let mut missing = 0usize;
        for chunk in coupons.chunks(1000) {
            let markers = futures_util::future::join_all(chunk.iter().map(|&id| {
                redis.get::<Option<String>, _>(keys.for_coupon(id).reconciled_marker())
            }))
            .await;
            for marker in markers {
                if marker?.is_none() {
                    missing += 1;
                }
            }
        }
        if missing == 0 {
            return Ok(started.elapsed());
        }
        ensure!(
            started.elapsed() < Duration::from_secs(600),
            "{missing} lanes still not reconciled after 600 s"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `--catalog`, idle (issue 19): daemons (in-process, following at the configured interval) over
/// 20 000 registered coupons whose queues are all empty, one replica, then two, then three.
/// First waits until the sweeping replica has reconciled every lane ahead of its first request
/// (a one-off per Redis, printed). For each number of replicas, measures over 30 s this
/// process's CPU (the replicas' together; the benchmark itself sleeps meanwhile) and Redis' busy
/// time (INFO cpu: on a shared Redis other clients count too), then the enqueue-to-outcome time
/// of lone requests in lanes never used before, spread over the registry (as the API does: ZADD,
/// SADD active; then HGET of the result every millisecond); at the end, how long the replicas
/// take to stop.
async fn idle_catalog(config: &Config, summary: &mut Summary) -> anyhow::Result<()> {
    let mut case_config = config.clone();
    case_config.keys = KeyTemplates::per_coupon_layout();
    in_sandbox(&case_config, async |sandbox| {
        let keys = sandbox.config.keys.clone();
        let redis = &sandbox.redis;
        let registry: Vec<i64> = (1..=IDLE_REGISTRY).collect();
        for chunk in registry.chunks(5000) {
            let _: u64 = redis.sadd(&keys.coupon_registry, chunk.to_vec()).await?;
        }
        // The lone requests' coupons, spread over the registry, different for each phase.
        let lane = |n: i64| 1 + (n * 7_919) % IDLE_REGISTRY;
        let lone_total = LONE_REQUESTS * IDLE_REPLICAS as i64;
        for n in 0..lone_total {
            let _: () = redis.set(keys.stock(lane(n)), 1, None, None, false).await?;
        }
        let mut daemon_config = sandbox.config.clone();
        if daemon_config.coupon.poll_interval.is_zero() {
            daemon_config.coupon.poll_interval = Duration::from_millis(30);
        }
        daemon_config.http.listen = "127.0.0.1:0".parse()?;
        let (mut stops, mut daemons) = (Vec::new(), Vec::new());
        let measured = async {
            for replicas in 1..=IDLE_REPLICAS {
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                let daemon = tokio::spawn(crate::app::run(daemon_config.clone(), async move {
                    let _ = stopped.await;
                }));
                stops.push(stop);
                daemons.push(daemon);
                if replicas == 1 {
                    let settle = Instant::now();
                    loop {
                        let lease: u64 = redis.exists(keys.follow_lease()).await?;
                        if lease == 1 {
                            break;
                        }
                        ensure!(
                            settle.elapsed() < Duration::from_secs(60),
                            "the daemon did not take the follow lease within 60 s"
                        );
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    let took = wait_reconciled_ahead(redis, &keys, &registry).await?;
                    println!(
                        "  {} lanes reconciled ahead of their first request in {:.1} s (once per Redis)",
                        group(IDLE_REGISTRY as f64),
                        took.as_secs_f64()
                    );
                }
                // A new replica's first looks walk the registry once; let them pass.
                tokio::time::sleep(Duration::from_secs(5)).await;
                let (cpu0, redis0) = (process_cpu()?, redis_cpu(redis).await?);
                tokio::time::sleep(IDLE_WINDOW).await;
                let (cpu1, redis1) = (process_cpu()?, redis_cpu(redis).await?);
                let window = IDLE_WINDOW.as_secs_f64();
                let core = (cpu1 - cpu0).as_secs_f64() / window * 100.0;
                let per_replica = core / replicas as f64;
                let busy_ms = (redis1 - redis0).as_secs_f64() / window * 1000.0;
                println!(
                    "  idle, per coupon, {} registered coupons, every queue empty, {replicas} replica(s), over {} s: the replicas {core:.1} % of a core together, {per_replica:.1} % each (target <= 5), Redis {busy_ms:.1} ms busy per second (target <= 10; every client of this Redis counts)",
                    group(IDLE_REGISTRY as f64),
                    IDLE_WINDOW.as_secs()
                );
                summary.record(
                    &format!("idle, 20 000 registered, {replicas} replica(s): daemon CPU each"),
                    "% of a core",
                    per_replica,
                );
                summary.record(
                    &format!("idle, 20 000 registered, {replicas} replica(s): Redis busy"),
                    "ms/s",
                    busy_ms,
                );

                let mut lone = Latencies::default();
                let phase = (replicas as i64 - 1) * LONE_REQUESTS;
                for n in phase..phase + LONE_REQUESTS {
                    let coupon = lane(n);
                    let user = 1_000 + n;
                    let started = Instant::now();
                    enqueue_members(
                        redis,
                        &keys,
                        vec![(
                            chrono::Utc::now().timestamp_millis() as f64,
                            format!("{user}:{coupon}"),
                        )],
                    )
                    .await?;
                    loop {
                        let outcome: Option<String> =
                            redis.hget(keys.result(coupon), user.to_string()).await?;
                        if outcome.is_some() {
                            break;
                        }
                        ensure!(
                            started.elapsed() < Duration::from_secs(60),
                            "a lone request in coupon {coupon}'s lane had no outcome after 60 s"
                        );
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    lone.record(started.elapsed());
                    tokio::time::sleep(LONE_EVERY).await;
                }
                println!(
                    "  lone request in a never-used one of {} registered lanes, {replicas} replica(s) ({LONE_REQUESTS} times, {} ms apart): p50 {} / max {} to its outcome (target <= 100 ms)",
                    group(IDLE_REGISTRY as f64),
                    LONE_EVERY.as_millis(),
                    millis(lone.percentile(50.0)),
                    millis(lone.max())
                );
                summary.record(
                    &format!("lone request, 20 000 registered, {replicas} replica(s): max"),
                    "ms",
                    lone.max().as_secs_f64() * 1000.0,
                );
            }
            anyhow::Ok(())
        }
        .await;
        let stopping = Instant::now();
        let mut stopped = Ok(());
        for stop in stops {
            let _ = stop.send(());
        }
        for daemon in daemons {
            if let Err(e) = daemon.await? {
                stopped = Err(e);
            }
        }
        println!(
            "  shutdown of {IDLE_REPLICAS} replicas with {} registered coupons: {:.2} s",
            group(IDLE_REGISTRY as f64),
            stopping.elapsed().as_secs_f64()
        );
        measured?;
        stopped
    })
    .await
}

async fn run_once(
    config: &Config,
    options: &CouponBenchOptions,
    sale: FlashSale,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    let mut workloads = Vec::new();
    if options.workload != Workload::Realistic {
        workloads.push(("worker", false));
    }
    if options.workload != Workload::Clean {
        workloads.push(("realistic", true));
    }
    let mut clean_decide_rate = None;
    for (label, realistic) in workloads {
        let worker = in_sandbox(config, async |sandbox| {
            run_worker(sandbox, sale, realistic).await
        })
        .await?;
        print_worker(label, &worker);
        if realistic {
            println!(
                "          the mix: {} duplicate, {} sold out, {} dead-lettered",
                group(worker.report[Outcome::Duplicate] as f64),
                group(worker.report[Outcome::SoldOut] as f64),
                group(worker.report[Outcome::DeadLettered] as f64),
            );
            ensure!(
                worker.report[Outcome::Duplicate] > 0,
                "the realistic mix produced no DUPLICATE outcome"
            );
        }
        let decide_rate = rate(worker.report.decided(), worker.decide_elapsed);
        let persist_rate = rate(worker.rows_persisted, worker.persist_elapsed);
        let name = if realistic {
            "realistic mix"
        } else {
            "clean sale"
        };
        summary.record(&format!("{name}: decided"), "/s", decide_rate);
        summary.record(
            &format!("{name}: issued coupons in MySQL, from the start"),
            "/s",
            persist_rate,
        );
        summary.record(
            &format!("{name}: last coupon issued at"),
            "s",
            worker.issue_elapsed.as_secs_f64(),
        );
        summary.record(
            &format!("{name}: all ranking-log rows in MySQL at"),
            "s",
            worker.log_elapsed.as_secs_f64(),
        );
        println!(
            "          targets: >= 100 000 decided/s ({}); >= 80 000 persisted/s during the sale ({}, bounded by how fast coupons are issued)",
            verdict(decide_rate >= 100_000.0),
            verdict(persist_rate >= 80_000.0),
        );
        if !realistic {
            clean_decide_rate = Some(decide_rate);
        }
    }

    for with_log_writer in [false, true] {
        let (backlog_rows, backlog_elapsed, log_rows) = in_sandbox(config, async |sandbox| {
            run_backlog(sandbox, sale, with_log_writer).await
        })
        .await?;
        let backlog_rate = rate(backlog_rows, backlog_elapsed);
        if with_log_writer {
            println!(
                "          the persister catching up on {} issued coupons while the log writer writes {} waiting rows (as after a MySQL outage): {:.2} s = {} persisted/s (target >= 80 000: {})",
                group(backlog_rows as f64),
                group(log_rows as f64),
                backlog_elapsed.as_secs_f64(),
                group(backlog_rate),
                verdict(backlog_rate >= 80_000.0)
            );
            summary.record(
                "persister catch-up with the log writer catching up too",
                "/s",
                backlog_rate,
            );
        } else {
            println!(
                "          the persister alone, catching up on {} issued coupons: {:.2} s = {} persisted/s",
                group(backlog_rows as f64),
                backlog_elapsed.as_secs_f64(),
                group(backlog_rate)
            );
            summary.record("persister catch-up alone", "/s", backlog_rate);
        }
    }

    if let Some(url) = &options.cluster_url {
        let mut on_cluster = config.clone();
        on_cluster.redis.url = crate::config::SecretUrl::new(url.clone());
        on_cluster.keys = crate::keys::KeyTemplates::per_coupon_layout();
        let figures = in_sandbox(&on_cluster, async |sandbox| {
            run_worker(sandbox, sale, false).await
        })
        .await?;
        print_worker("cluster", &figures);
        let cluster_rate = rate(figures.report.decided(), figures.decide_elapsed);
        summary.record("cluster, per-coupon layout: decided", "/s", cluster_rate);
        if let Some(single) = clean_decide_rate {
            let name = "cluster (per-coupon layout) / single Redis";
            print_ratio(summary, name, cluster_rate, single, 2);
        }
    }
    if options.naive_requests > 0 {
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
        summary.record("naive: decided", "/s", naive_rate);
        if let Some(worker_rate) = clean_decide_rate {
            print_ratio(summary, "worker / naive", worker_rate, naive_rate, 1);
        }
    }
    Ok(())
}

/// Prints and records the ratio `a / b` of two decided rates, `name` saying which
/// (`worker / naive`), with `decimals` decimals.
fn print_ratio(summary: &mut Summary, name: &str, a: f64, b: f64, decimals: usize) {
    let ratio = a / b.max(1e-9);
    println!("  ratio:  {name} = {ratio:.decimals$}x decided/s");
    summary.record(&format!("{name}, decided"), "x", ratio);
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

async fn run_worker(
    sandbox: &Sandbox,
    sale: FlashSale,
    realistic: bool,
) -> anyhow::Result<WorkerFigures> {
    let config = &sandbox.config;
    let keys = &config.keys;
    sale.write_stock(&sandbox.redis, keys).await?;
    sale.enqueue(&sandbox.redis, keys, 0..sale.requests, FIRST_ARRIVAL_MS)
        .await?;
    let mut model = Model::of_sale(&sale);
    if realistic {
        model.malformed += enqueue_malformed(&sandbox.redis, keys, &sale).await?;
    }

    let metrics = Metrics::new();
    let (cpu_before, redis_cpu_before) = (process_cpu()?, redis_cpu(&sandbox.redis).await?);
    let started = Instant::now();
    let job = CouponJob::start(config, &sandbox.backends(), &metrics);
    // The persister runs beside the drain: watch its counter (and the issued one) from the
    // start, so the time the last coupon landed is seen also when it landed before the drain's
    // end (reading them only after the drain would date it at the drain's end).
    let watch_stop = CancellationToken::new();
    let watcher = tokio::spawn(counter_history(
        [
            metrics.coupon_rows_persisted.clone(),
            metrics.outcome(Outcome::Issued.label()),
        ],
        started,
        watch_stop.clone(),
    ));
    let drain = &job.drain;
    // The API keeps writing while the drain runs (realistic mix only).
    let api =
        realistic.then(|| tokio::spawn(api_writes(sandbox.redis.clone(), keys.clone(), sale)));
    let never = CancellationToken::new();
    let mut report = DrainReport::default();
    loop {
        // Once the API has finished writing, a tick that finds the queue empty is the end.
        let api_done = api.as_ref().is_none_or(|task| task.is_finished());
        let tick = drain.tick(Duration::MAX, &never).await?;
        report.absorb(&tick);
        if tick.stopped == StopReason::QueueEmpty && api_done {
            break;
        }
        ensure!(
            started.elapsed() < PERSIST_DEADLINE,
            "the drain did not empty the queue within {PERSIST_DEADLINE:?} ({} left, last tick stopped: {:?})",
            tick.queue_depth,
            tick.stopped
        );
    }
    let decide_elapsed = started.elapsed();
    let drain_cpu = process_cpu()?.saturating_sub(cpu_before);
    let drain_redis_cpu = redis_cpu(&sandbox.redis)
        .await?
        .saturating_sub(redis_cpu_before);
    if let Some(api) = api {
        model.absorb(api.await??);
    }
    let expected = model.expected();

    // When the last issued coupon was committed, read off the persister's own counter (polling
    // MySQL here would load the server being measured).
    let persisted = metrics.coupon_rows_persisted.clone();
    while persisted.get() < expected.issued {
        ensure!(
            started.elapsed() < PERSIST_DEADLINE,
            "waited {PERSIST_DEADLINE:?} for {} issued coupons to be persisted; {} were",
            expected.issued,
            persisted.get()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    watch_stop.cancel();
    let [persisted_history, issued_history] = watcher.await?;
    let reached = |history: &[(Duration, u64)]| {
        history
            .iter()
            .find(|(_, value)| *value >= expected.issued)
            .map(|(at, _)| *at)
            .unwrap_or_else(|| started.elapsed())
    };
    let issue_elapsed = reached(&issued_history);
    let persist_elapsed = reached(&persisted_history);

    let written = job.finish_writing(PERSIST_DEADLINE).await?;
    let log_elapsed = started.elapsed();
    ensure!(
        report.decided() == expected.decided + expected.dead_lettered
            && report[Outcome::DeadLettered] == expected.dead_lettered,
        "decided {} (of which {} dead-lettered), expected {} and {}",
        report.decided(),
        report[Outcome::DeadLettered],
        expected.decided + expected.dead_lettered,
        expected.dead_lettered
    );
    ensure!(
        report[Outcome::Issued] == expected.issued,
        "issued {}, expected {}",
        report[Outcome::Issued],
        expected.issued
    );
    ensure!(
        written.rows_left == 0,
        "{} ranking-log rows were left unwritten",
        written.rows_left
    );
    let (rows_persisted, log_rows) = check_results(sandbox, &sale, &expected).await?;
    Ok(WorkerFigures {
        report,
        decide_elapsed,
        drain_cpu,
        drain_redis_cpu,
        issue_elapsed,
        persist_elapsed,
        log_elapsed,
        rows_persisted,
        log_rows,
    })
}

/// Samples `counters` every 2 ms until `stop`, keeping each counter's values with when they were
/// first seen (from `started`): the last sample is taken after `stop`, so it holds the final value.
async fn counter_history<const N: usize>(
    counters: [prometheus_client::metrics::counter::Counter; N],
    started: Instant,
    stop: CancellationToken,
) -> [Vec<(Duration, u64)>; N] {
    let mut history: [Vec<(Duration, u64)>; N] = std::array::from_fn(|_| Vec::new());
    loop {
        let stopping = stop.is_cancelled();
        for (counter, seen) in counters.iter().zip(history.iter_mut()) {
            let value = counter.get();
            if seen.last().is_none_or(|(_, last)| *last != value) {
                seen.push((started.elapsed(), value));
            }
        }
        if stopping {
            return history;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(2)) => {}
            _ = stop.cancelled() => {}
        }
    }
}

/// The sale as the worker must decide it: per coupon, each user's first request in the order
/// the drain takes them (score, then member), and what cannot be decided.
struct Model {
    stock: u64,
    /// Per coupon, `(score, member, user)` of first requests.
    first_requests: HashMap<i64, Vec<(i64, String, i64)>>,
    /// Requests that entered the queue (ZADD NX absorbs one whose member still waits).
    requests: u64,
    malformed: u64,
}

/// What the checks compare with.
struct Expected {
    decided: u64,
    dead_lettered: u64,
    issued: u64,
    holders: HashMap<i64, BTreeSet<i64>>,
}

impl Model {
    fn of_sale(sale: &FlashSale) -> Self {
        let mut first_requests: HashMap<i64, Vec<(i64, String, i64)>> = HashMap::new();
        for i in 0..sale.requests {
            let (user, coupon) = sale.request(i);
            first_requests.entry(coupon).or_default().push((
                FIRST_ARRIVAL_MS + (i / 10) as i64,
                format!("{user}:{coupon}"),
                user,
            ));
        }
        Self {
            stock: sale.stock,
            first_requests,
            requests: sale.requests,
            malformed: 0,
        }
    }

    fn absorb(&mut self, api: ApiWrites) {
        self.requests += api.requests_added;
        self.malformed += api.malformed_added;
        for (score, member, user, coupon) in api.new_users {
            self.first_requests
                .entry(coupon)
                .or_default()
                .push((score, member, user));
        }
    }

    fn expected(&self) -> Expected {
        let mut holders = HashMap::new();
        let mut issued = 0;
        for (coupon, requests) in &self.first_requests {
            let mut ordered: Vec<&(i64, String, i64)> = requests.iter().collect();
            ordered.sort_by(|a, b| (a.0, a.1.as_bytes()).cmp(&(b.0, b.1.as_bytes())));
            let mut set = BTreeSet::new();
            for (_, _, user) in ordered {
                if set.len() as u64 == self.stock {
                    break;
                }
                set.insert(*user);
            }
            issued += set.len() as u64;
            holders.insert(*coupon, set);
        }
        Expected {
            decided: self.requests,
            dead_lettered: self.malformed,
            issued,
            holders,
        }
    }
}

/// Per coupon: `initial = remaining + holders = rows`, and the users in `user_coupon` exactly
/// the model's; in `ranking_logs` no `(coupon, rank)` pair twice and ranks 1..n per coupon, one
/// row per decided request. Returns the rows in `user_coupon` and in `ranking_logs`.
async fn check_results(
    sandbox: &Sandbox,
    sale: &FlashSale,
    expected: &Expected,
) -> anyhow::Result<(u64, u64)> {
    let keys = &sandbox.config.keys;
    let mut rows_persisted = 0;
    for coupon in 1..=sale.coupons as i64 {
        let remaining: i64 = sandbox.redis.get(keys.stock(coupon)).await?;
        let holders: u64 = sandbox.redis.scard(keys.issued(coupon)).await?;
        let users: BTreeSet<i64> =
            sqlx::query_scalar::<_, i64>("SELECT user_id FROM user_coupon WHERE coupon_id = ?")
                .bind(coupon)
                .fetch_all(&sandbox.mysql)
                .await?
                .into_iter()
                .collect();
        ensure!(
            remaining as u64 + holders == sale.stock && holders == users.len() as u64,
            "coupon {coupon}: stock {} = remaining {remaining} + holders {holders} = rows {} does not hold",
            sale.stock,
            users.len()
        );
        let want = expected.holders.get(&coupon).cloned().unwrap_or_default();
        ensure!(
            users == want,
            "coupon {coupon}: {} users in user_coupon not issued by the model, {} issued by the model missing",
            users.difference(&want).count(),
            want.difference(&users).count()
        );
        rows_persisted += users.len() as u64;
    }
    let doubled: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT 1 FROM ranking_logs GROUP BY coupon_type, `rank` HAVING COUNT(*) > 1) d",
    )
    .fetch_one(&sandbox.mysql)
    .await?;
    ensure!(
        doubled == 0,
        "{doubled} (coupon, rank) pairs appear twice in ranking_logs"
    );
    let gaps: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT coupon_type FROM ranking_logs GROUP BY coupon_type HAVING MIN(`rank`) <> 1 OR MAX(`rank`) <> COUNT(*)) g",
    )
    .fetch_one(&sandbox.mysql)
    .await?;
    ensure!(
        gaps == 0,
        "{gaps} coupons have ranks that are not 1..n in ranking_logs"
    );
    let log_rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM ranking_logs")
        .fetch_one(&sandbox.mysql)
        .await?;
    ensure!(
        log_rows as u64 == expected.decided,
        "ranking_logs has {log_rows} rows for {} decided requests",
        expected.decided
    );
    Ok((rows_persisted, log_rows as u64))
}

/// One malformed entry per 100 requests, among them (same arrival times): a user id with a
/// leading zero, for coupon `i % coupons + 1` so that it lands in that coupon's queue in either
/// layout. Returns how many.
async fn enqueue_malformed(
    redis: &Client,
    keys: &KeyTemplates,
    sale: &FlashSale,
) -> anyhow::Result<u64> {
    let entries: Vec<(f64, String)> = (0..sale.requests / 100)
        .map(|k| {
            let i = k * 100 + 50;
            (
                (FIRST_ARRIVAL_MS + (i / 10) as i64) as f64,
                // A leading zero: malformed, and distinct (ZADD NX keeps one of equal members).
                format!("0{k}:{}", i % sale.coupons.max(1) + 1),
            )
        })
        .collect();
    enqueue_members(redis, keys, entries).await
}

/// What the simulated API wrote while the drain ran.
struct ApiWrites {
    requests_added: u64,
    malformed_added: u64,
    /// `(score, member, user, coupon)` of requests by users new to the sale.
    new_users: Vec<(i64, String, i64, i64)>,
}

/// The API during the drain, from its first decided batch on: `requests / 20` more entries in
/// chunks of 100, a millisecond apart, after every request of the sale: 6 in 10 a user of the
/// sale asking again for the same coupon (the earliest requests first), 3 in 10 a new user, 1 in
/// 10 malformed.
async fn api_writes(
    redis: Client,
    keys: KeyTemplates,
    sale: FlashSale,
) -> anyhow::Result<ApiWrites> {
    let coupons = sale.coupons.max(1);
    let total = sale.requests / 20;
    let first_new_user = (sale.requests / coupons + 2) as i64;
    let mut writes = ApiWrites {
        requests_added: 0,
        malformed_added: 0,
        new_users: Vec::new(),
    };
    // Users ask again once the drain has decided their first request: wait for its first batch.
    let waiting_since = Instant::now();
    while crate::tools::simulated_api::queued(&redis, &keys).await? >= sale.requests {
        ensure!(
            waiting_since.elapsed() < Duration::from_secs(60),
            "the drain decided nothing within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut j = 0;
    let mut arrival = FIRST_ARRIVAL_MS + (sale.requests / 10) as i64 + 1000;
    while j < total {
        let (mut valid, mut malformed) = (Vec::new(), Vec::new());
        for _ in 0..100.min(total - j) {
            let score = arrival as f64;
            match j % 10 {
                0..=5 => {
                    // The earliest requests, decided first: holders get DUPLICATE.
                    let (user, coupon) = sale.request(j % sale.requests.max(1));
                    valid.push((score, format!("{user}:{coupon}")));
                }
                6..=8 => {
                    let (user, coupon) = (first_new_user + j as i64, (j % coupons + 1) as i64);
                    let member = format!("{user}:{coupon}");
                    writes
                        .new_users
                        .push((arrival, member.clone(), user, coupon));
                    valid.push((score, member));
                }
                _ => malformed.push((score, format!("00{j}:{}", j % coupons + 1))),
            }
            j += 1;
        }
        writes.requests_added += enqueue_members(&redis, &keys, valid).await?;
        writes.malformed_added += enqueue_members(&redis, &keys, malformed).await?;
        arrival += 1;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(writes)
}

/// A MySQL outage during the whole sale: the sale is decided with no persister and no log
/// writer running, so every issued coupon waits in the outbox and every decided request's log
/// row waits too. Then times the persister emptying the outbox, with the log writer writing its
/// backlog at the same time (`with_log_writer`) or not. Returns the coupons persisted, the time,
/// and the log rows written meanwhile.
async fn run_backlog(
    sandbox: &Sandbox,
    sale: FlashSale,
    with_log_writer: bool,
) -> anyhow::Result<(u64, Duration, u64)> {
    let config = &sandbox.config;
    let keys = &config.keys;
    sale.write_stock(&sandbox.redis, keys).await?;
    sale.enqueue(&sandbox.redis, keys, 0..sale.requests, FIRST_ARRIVAL_MS)
        .await?;
    // No job running: the log rows wait in Redis (the log stream), as during an outage.
    let drain = CouponDrain::new(
        sandbox.redis.clone(),
        sandbox.mysql.clone(),
        keys,
        config.coupon.batch_size.get(),
        std::sync::Arc::default(),
        Metrics::new(),
    );
    let never = CancellationToken::new();
    let deciding = Instant::now();
    loop {
        let tick = drain.tick(Duration::MAX, &never).await?;
        if tick.stopped == StopReason::QueueEmpty {
            break;
        }
        ensure!(
            deciding.elapsed() < PERSIST_DEADLINE,
            "the drain did not empty the queue within {PERSIST_DEADLINE:?} ({} left, last tick stopped: {:?})",
            tick.queue_depth,
            tick.stopped
        );
    }
    let log_metrics = Metrics::new();
    let started = Instant::now();
    let writing = with_log_writer.then(|| {
        crate::ranking_log::LogPipeline::start(
            &config.ranking_log,
            keys,
            sandbox.redis.clone(),
            sandbox.mysql.clone(),
            log_metrics.clone(),
        )
    });
    let persisted = drain.persist_all().await? as u64;
    let elapsed = started.elapsed();
    let log_rows = match writing {
        Some(pipeline) => {
            while log_metrics.ranking_log_rows_written.get() < sale.requests {
                ensure!(
                    started.elapsed() < PERSIST_DEADLINE,
                    "the log backlog was not written within {PERSIST_DEADLINE:?}"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let far = tokio::time::Instant::now() + Duration::from_secs(60);
            pipeline.shutdown(far).await.0.rows_written
        }
        None => 0,
    };
    ensure!(
        persisted == sale.expected_issued(),
        "the persister moved {persisted} of {} coupons",
        sale.expected_issued()
    );
    ensure!(
        !with_log_writer || log_rows == sale.requests,
        "the log writer wrote {log_rows} of {} rows",
        sale.requests
    );
    Ok((persisted, elapsed, log_rows))
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
