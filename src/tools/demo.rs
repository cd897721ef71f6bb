//! `commerce-worker demo`: the worker's main job end to end, for a newcomer, against the
//! configured Redis and MySQL, in a [`Sandbox`] (private key prefix and database, removed after).
//!
//! It plays the API's part ([`simulated_api`](crate::tools::simulated_api)): a few days of orders for the
//! ranking (one day older than the window, so pruning shows), then a flash sale enqueued in waves
//! — random users asking for random coupons, so some ask twice (duplicates), plus a few malformed
//! entries — while the real jobs run: the coupon drain following the queue as the daemon does
//! ([`Following`], `[coupon] poll_interval_ms`), the outbox persister, the ranking-log writer, and
//! at the end the ranking rebuild. Progress bars show the flow; the report gives outcomes, the
//! latency a shopper sees (enqueue to outcome, read as the API reads it: `HGET
//! coupon:result:{id} <userId>`), the latency from enqueue to row in MySQL, the top-10 products,
//! and the checks it verified. A failed check makes the command fail.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{Days, Utc};
use fred::prelude::*;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

use crate::app::CouponJob;
use crate::config::Config;
use crate::coupon::{DEFAULT_LEASE, DrainReport, FollowOptions, Following};
use crate::keys::KeyTemplates;
use crate::metrics::Metrics;
use crate::outcome::Outcome;
use crate::ranking::{RankingRebuild, WhenLocked, today};
use crate::tools::options::DemoOptions;
use crate::tools::report::{Latencies, group, millis};
use crate::tools::sandbox::Sandbox;
use crate::tools::simulated_api::{FlashSale, enqueue_members, queued, write_day_sales};

/// A check the demo verified, and whether it held.
#[derive(Debug, Clone)]
pub(super) struct Check {
    pub name: String,
    pub passed: bool,
}

/// What the demo saw.
#[derive(Debug, Clone, Default)]
pub(super) struct Report {
    pub accepted: u64,
    /// What the drain decided (from its metrics).
    pub drain: DrainReport,
    /// From the first request to the last outcome seen.
    pub drain_elapsed: Duration,
    /// The poll interval the drain followed the queue at.
    pub poll_interval: Duration,
    /// Enqueue to outcome, as a shopper's app asking the API sees it.
    pub outcome_latency: Latencies,
    /// Enqueue to row in user_coupon.
    pub latency: Latencies,
    pub top: Vec<(String, f64)>,
    pub checks: Vec<Check>,
}

impl Report {
    pub(super) fn all_passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }
}

/// How long the drain may take to empty the queue after the sale, and the log writer to write
/// what waits: a stuck job fails the demo instead of hanging it.
const DRAIN_DEADLINE: Duration = Duration::from_secs(600);

const MALFORMED_SAMPLES: [&str; 6] = [
    "abc:1",
    "0:1",
    "12:-3",
    "99999999999999999999:1",
    "7:",
    "007:1",
];

pub(super) async fn run(config: &Config, options: DemoOptions) -> anyhow::Result<Report> {
    let sandbox = Sandbox::create(config, "demo").await?;
    println!(
        "demo sandbox: keys under {}:*, database {} (removed at the end{})",
        sandbox.name,
        sandbox.name,
        if options.keep { " unless --keep" } else { "" }
    );
    let result = tokio::select! {
        report = run_in(&sandbox, options) => report,
        _ = crate::app::shutdown_signal() => Err(anyhow::anyhow!("interrupted")),
    };
    if options.keep {
        println!(
            "kept: redis-cli --scan --pattern '{}:*'; mysql {}",
            sandbox.name, sandbox.name
        );
    } else {
        sandbox.cleanup().await?;
    }
    result
}

async fn run_in(sandbox: &Sandbox, options: DemoOptions) -> anyhow::Result<Report> {
    let config = &sandbox.config;
    let keys = &config.keys;
    let mut rng = fastrand::Rng::with_seed(20261123);
    let mut report = Report::default();

    // 1. Orders: window_days + 1 days, the oldest outside the window.
    let day = today(config.ranking.timezone);
    let window_days = u64::from(config.ranking.window_days);
    let mut expected_ranking: HashMap<String, f64> = HashMap::new();
    let mut stale_day = day;
    for back in 0..=window_days {
        let Some(date) = day.checked_sub_days(Days::new(back)) else {
            continue;
        };
        let mut sales: BTreeMap<u64, f64> = BTreeMap::new();
        for _ in 0..options.products * 5 {
            // A skewed catalog: low ids sell more, as best sellers do.
            let product = (rng.f64().powi(3) * options.products as f64) as u64 + 1;
            *sales.entry(product).or_default() += f64::from(rng.u32(1..=3));
        }
        if back < window_days {
            let weight = config.ranking.weight(back as usize);
            for (product, qty) in &sales {
                *expected_ranking.entry(product.to_string()).or_default() += weight * qty;
            }
        } else {
            stale_day = date;
        }
        write_day_sales(
            &sandbox.redis,
            keys,
            date,
            sales.into_iter().map(|(p, q)| (q, p.to_string())),
        )
        .await?;
    }
    println!(
        "orders: {} days of sales for {} products written to {} .. {}",
        window_days + 1,
        options.products,
        keys.ranking_day(stale_day),
        keys.ranking_day(day)
    );

    // 2. The jobs, running while the sale comes in.
    FlashSale {
        coupons: options.coupons,
        stock: options.stock,
        requests: options.requests,
    }
    .write_stock(&sandbox.redis, keys)
    .await?;
    let metrics = Metrics::new();
    let job = CouponJob::start(config, &sandbox.backends(), &metrics);
    let drain = &job.drain;
    // The drain as the daemon runs it between its ticks: following the queue (with following
    // off in the configuration, at the default interval: the demo shows what following gives).
    report.poll_interval = config
        .coupon
        .follow_interval()
        .unwrap_or(Duration::from_millis(30));
    let following = Following::new(
        drain,
        FollowOptions {
            poll_interval: report.poll_interval,
            budget: config.coupon.tick_budget,
            lease: DEFAULT_LEASE,
        },
    );
    let sale_over = CancellationToken::new();
    let follower = tokio::spawn({
        let (following, drain, stop) = (following.clone(), drain.clone(), sale_over.clone());
        async move { following.follow(drain, Arc::default(), stop).await }
    });

    // Progress: read off the worker's own metrics, so watching costs the servers nothing.
    let bars = MultiProgress::new();
    let style =
        ProgressStyle::with_template("{prefix:>22} {bar:40.cyan/blue} {pos:>7}/{len:7} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
    let bar = |name: &str, len: u64| {
        let bar = bars.add(ProgressBar::new(len));
        bar.set_style(style.clone());
        bar.set_prefix(name.to_string());
        bar
    };
    let enqueued_bar = bar("API: requests queued", options.requests + options.malformed);
    let decided_bar = bar("drain: decided", options.requests + options.malformed);
    let persisted_bar = bar("MySQL: coupons", options.coupons * options.stock);
    let logged_bar = bar("MySQL: ranking log", options.requests);
    let watching = CancellationToken::new();
    let watcher = tokio::spawn({
        let metrics = metrics.clone();
        let (decided_bar, persisted_bar, logged_bar) = (
            decided_bar.clone(),
            persisted_bar.clone(),
            logged_bar.clone(),
        );
        let watching = watching.clone();
        async move {
            while !watching.is_cancelled() {
                let decided: u64 = Outcome::ALL
                    .into_iter()
                    .filter(|o| o.is_decided())
                    .map(|o| metrics.outcome(o.label()).get())
                    .sum();
                decided_bar.set_position(decided);
                persisted_bar.set_position(metrics.coupon_rows_persisted.get());
                logged_bar.set_position(metrics.ranking_log_rows_written.get());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });

    // Row arrival in MySQL, observed by polling (the latency's resolution is the poll period).
    let arrivals_stop = CancellationToken::new();
    let arrivals = tokio::spawn({
        let pool = sandbox.mysql.clone();
        let stop = arrivals_stop.clone();
        async move {
            let mut seen: Vec<(i64, i64, i64)> = Vec::new();
            let mut last_id = 0i64;
            loop {
                let rows: Vec<(i64, i64, i64)> = sqlx::query_as(
                    "SELECT id, user_id, coupon_id FROM user_coupon WHERE id > ? ORDER BY id",
                )
                .bind(last_id)
                .fetch_all(&pool)
                .await
                .unwrap_or_default();
                let now = Utc::now().timestamp_millis();
                for (id, user, coupon) in rows {
                    last_id = last_id.max(id);
                    seen.push((user, coupon, now));
                }
                if stop.is_cancelled() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            seen
        }
    });

    // 3. The sale, in waves; between waves, the shoppers' apps ask for their outcomes.
    let mut first_enqueued: HashMap<(i64, i64), i64> = HashMap::new();
    let mut outcomes = OutcomeWatch::default();
    let sale_started = Instant::now();
    let per_wave = options.requests.div_ceil(options.waves.max(1));
    let mut sent = 0u64;
    for wave in 0..options.waves.max(1) {
        let mut entries: Vec<(f64, String)> = Vec::new();
        let now = Utc::now().timestamp_millis();
        if wave == 0 {
            for i in 0..options.malformed {
                let sample = MALFORMED_SAMPLES[i as usize % MALFORMED_SAMPLES.len()];
                entries.push((
                    now as f64,
                    format!("{sample}{}", "0".repeat((i / 6) as usize)),
                ));
            }
        }
        let mut asking = Vec::new();
        for _ in 0..per_wave.min(options.requests - sent) {
            let user = rng.i64(1..=options.users as i64);
            let coupon = rng.i64(1..=options.coupons as i64);
            if let std::collections::hash_map::Entry::Vacant(first) =
                first_enqueued.entry((user, coupon))
            {
                first.insert(now);
                asking.push((coupon, user));
            }
            entries.push((now as f64, format!("{user}:{coupon}")));
            sent += 1;
        }
        let wave_size = entries.len() as u64;
        // As the API does. A request already queued (asked twice before the drain got to it)
        // is not added again: ZADD NX keeps the first.
        let added = enqueue_members(&sandbox.redis, keys, entries).await?;
        let enqueued_at = Instant::now();
        outcomes
            .waiting
            .extend(asking.into_iter().map(|(c, u)| (c, u, enqueued_at)));
        report.accepted += added;
        enqueued_bar.inc(wave_size);
        // The API's pause between waves, spent asking for outcomes.
        outcomes
            .ask_for(&sandbox.redis, keys, Duration::from_millis(100))
            .await?;
    }
    outcomes
        .ask_all(&sandbox.redis, keys, DRAIN_DEADLINE)
        .await?;
    report.drain_elapsed = outcomes.last_seen.unwrap_or(sale_started) - sale_started;
    // Dead-lettered entries have no outcome to ask for: the queue empties too.
    let since = Instant::now();
    loop {
        let left = queued(&sandbox.redis, keys).await?;
        if left == 0 {
            break;
        }
        anyhow::ensure!(
            since.elapsed() < DRAIN_DEADLINE,
            "the drain did not empty the queue within {DRAIN_DEADLINE:?} of the sale's end ({left} left)"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sale_over.cancel();
    follower.await?;
    report.outcome_latency = std::mem::take(&mut outcomes.latencies);
    report.drain = decided_so_far(&metrics);
    drain.persist_all().await?;
    let log_report = job.finish_writing(DRAIN_DEADLINE).await?;
    arrivals_stop.cancel();
    let seen = arrivals.await?;
    watching.cancel();
    watcher.await?;
    for b in [&enqueued_bar, &decided_bar, &persisted_bar, &logged_bar] {
        b.finish();
    }
    for (user, coupon, landed_ms) in &seen {
        if let Some(enqueued) = first_enqueued.get(&(*user, *coupon)) {
            report
                .latency
                .record(Duration::from_millis((landed_ms - enqueued).max(0) as u64));
        }
    }

    // 4. The ranking rebuild.
    let rebuild = RankingRebuild::new(
        sandbox.redis.clone(),
        keys.clone(),
        config.ranking.clone(),
        metrics.clone(),
    )
    .rebuild(day, WhenLocked::Wait)
    .await?;
    let top: Vec<(String, f64)> = sandbox
        .redis
        .zrange(&keys.ranking_window, 0, 9, None, true, None, true)
        .await?;
    report.top = top.clone();
    let stale_left: bool = sandbox.redis.exists(keys.ranking_day(stale_day)).await?;

    // 5. Checks.
    let mut checks = Vec::new();
    let mut check = |name: String, passed: bool| checks.push(Check { name, passed });
    let queue_left = queued(&sandbox.redis, keys).await?;
    check(
        format!(
            "every accepted request has exactly one outcome ({} accepted = {} decided + {} dead-lettered; queue empty)",
            group(report.accepted as f64),
            group((report.drain.decided() - report.drain[Outcome::DeadLettered]) as f64),
            report.drain[Outcome::DeadLettered]
        ),
        report.drain.decided() == report.accepted && queue_left == 0,
    );
    check(
        format!(
            "every malformed entry dead-lettered with its reason ({} of {})",
            report.drain[Outcome::DeadLettered],
            options.malformed
        ),
        report.drain[Outcome::DeadLettered] == options.malformed,
    );
    // "Nobody twice" is checked where it can break (user_coupon's UNIQUE key makes a count
    // there unable to fail): the holders in Redis are exactly the users in user_coupon, and no
    // user has two ISSUED ranking-log rows for a coupon (a user issued twice also costs two in
    // the conservation check).
    let mut conserved = true;
    let mut same_holders = true;
    let mut holders_total = 0i64;
    for coupon_id in 1..=options.coupons as i64 {
        let remaining: i64 = sandbox.redis.get(keys.stock(coupon_id)).await?;
        let members: Vec<String> = sandbox.redis.smembers(keys.issued(coupon_id)).await?;
        let holders: std::collections::BTreeSet<i64> =
            members.iter().filter_map(|m| m.parse().ok()).collect();
        let users: std::collections::BTreeSet<i64> =
            sqlx::query_scalar::<_, i64>("SELECT user_id FROM user_coupon WHERE coupon_id = ?")
                .bind(coupon_id)
                .fetch_all(&sandbox.mysql)
                .await?
                .into_iter()
                .collect();
        conserved &= options.stock as i64 == remaining + holders.len() as i64;
        same_holders &= holders.len() == members.len() && holders == users;
        holders_total += holders.len() as i64;
    }
    check(
        "conservation, per coupon: initial stock = remaining + holders = rows in user_coupon"
            .into(),
        conserved && same_holders,
    );
    let issued_twice: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT 1 FROM ranking_logs WHERE status = 'ISSUED' GROUP BY coupon_type, user_id HAVING COUNT(*) > 1) d",
    )
    .fetch_one(&sandbox.mysql)
    .await?;
    let issued_rows: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM ranking_logs WHERE status = 'ISSUED'")
            .fetch_one(&sandbox.mysql)
            .await?;
    check(
        "no user holds a coupon twice: Redis holders = user_coupon users = ISSUED log rows, none twice"
            .into(),
        same_holders && issued_twice == 0 && issued_rows == holders_total,
    );
    let logged: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM ranking_logs")
        .fetch_one(&sandbox.mysql)
        .await?;
    let decided_not_dead = report.drain.decided() - report.drain[Outcome::DeadLettered];
    check(
        format!(
            "one ranking-log row per decided request ({} rows, through Redis)",
            group(logged as f64),
        ),
        logged as u64 == decided_not_dead && log_report.rows_left == 0,
    );
    let mut expected: Vec<(String, f64)> = expected_ranking.into_iter().collect();
    expected.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
    let top_scores: Vec<f64> = top.iter().map(|(_, s)| *s).collect();
    let expected_scores: Vec<f64> = expected.iter().take(10).map(|(_, s)| *s).collect();
    check(
        format!(
            "ranking = sum of the {window_days} days in the window ({} products), top-10 as computed here",
            rebuild.products
        ),
        rebuild.products == expected.len() as u64 && top_scores == expected_scores,
    );
    check(
        format!("the day before the window ({stale_day}) was pruned"),
        !stale_left,
    );
    report.checks = checks;
    print_report(&report, options, &rebuild);
    Ok(report)
}

fn print_report(report: &Report, options: DemoOptions, rebuild: &crate::ranking::RebuildReport) {
    let d = &report.drain;
    println!();
    println!(
        "flash sale: {} requests ({} malformed) for {} coupons x {} stock from {} users, in {} waves",
        group((options.requests + options.malformed) as f64),
        options.malformed,
        options.coupons,
        options.stock,
        group(options.users as f64),
        options.waves
    );
    println!(
        "  accepted by ZADD NX: {} (the rest were already queued: asked twice before the drain got to them)",
        group(report.accepted as f64)
    );
    let outcomes: Vec<String> = d
        .outcomes
        .iter()
        .filter(|(outcome, _)| outcome.is_decided())
        .map(|(outcome, count)| format!("{} {outcome}", group(count as f64)))
        .collect();
    println!("  outcomes: {}", outcomes.join(", "));
    println!(
        "  decided: {} requests, the last outcome {:.3} s after the first request (the sale comes in waves 100 ms apart; `bench coupon` measures the drain's own speed)",
        group(d.decided() as f64),
        report.drain_elapsed.as_secs_f64(),
    );
    println!(
        "  latency a shopper sees, enqueue to outcome (HGET of the result as the API does; the drain following the queue every {} ms): p50 {}, p99 {}, max {} ({} requests)",
        report.poll_interval.as_millis(),
        millis(report.outcome_latency.percentile(50.0)),
        millis(report.outcome_latency.percentile(99.0)),
        millis(report.outcome_latency.max()),
        group(report.outcome_latency.len() as f64),
    );
    println!(
        "  latency, enqueue to row in user_coupon ({} coupons; MySQL polled every 10 ms): p50 {}, p99 {}, max {}",
        group(report.latency.len() as f64),
        millis(report.latency.percentile(50.0)),
        millis(report.latency.percentile(99.0)),
        millis(report.latency.max())
    );
    let strategy = match rebuild.strategy {
        Some(crate::ranking::Strategy::Zunionstore) => "ZUNIONSTORE",
        Some(crate::ranking::Strategy::Chunked) => "chunked",
        None => "nothing to sum",
    };
    println!(
        "ranking for {} (window {} .. {}): {} products, {} old daily key(s) pruned, {strategy}, {:.0} ms",
        rebuild.day,
        rebuild.window.first().unwrap_or(&rebuild.day),
        rebuild.window.last().unwrap_or(&rebuild.day),
        rebuild.products,
        rebuild.pruned,
        rebuild.elapsed.as_secs_f64() * 1000.0
    );
    println!("  top 10:");
    for (i, (product, score)) in report.top.iter().enumerate() {
        println!("  {:>4}. product {product:<8} {score:>8.0} sold", i + 1);
    }
    println!("checks:");
    for c in &report.checks {
        println!("  [{}] {}", if c.passed { "ok" } else { "FAILED" }, c.name);
    }
}

/// Requests waiting for their outcome, asked for as a shopper's app asks the API: `HGET` of the
/// coupon's result hash for the user, again until it answers. A request's latency is from its
/// `ZADD` to the first round that saw its outcome (a round's length is the resolution).
#[derive(Default)]
struct OutcomeWatch {
    /// (coupon, user, enqueued at).
    waiting: Vec<(i64, i64, Instant)>,
    latencies: Latencies,
    last_seen: Option<Instant>,
}

impl OutcomeWatch {
    /// One round of HGETs for every request still waiting (2 000 sent together at most, as many
    /// API instances would).
    async fn ask(&mut self, redis: &Client, keys: &KeyTemplates) -> anyhow::Result<()> {
        let mut still = Vec::with_capacity(self.waiting.len());
        for chunk in self.waiting.chunks(2000) {
            let answers =
                futures_util::future::try_join_all(chunk.iter().map(|(coupon, user, _)| {
                    redis.hget::<Option<String>, _, _>(keys.result(*coupon), *user)
                }))
                .await?;
            let seen = Instant::now();
            for (&(coupon, user, at), answer) in chunk.iter().zip(answers) {
                match answer {
                    Some(_) => {
                        self.latencies.record(seen - at);
                        self.last_seen = Some(seen);
                    }
                    None => still.push((coupon, user, at)),
                }
            }
        }
        self.waiting = still;
        Ok(())
    }

    /// Asks round after round for `period` (idle once every request has its outcome).
    async fn ask_for(
        &mut self,
        redis: &Client,
        keys: &KeyTemplates,
        period: Duration,
    ) -> anyhow::Result<()> {
        let until = tokio::time::Instant::now() + period;
        while tokio::time::Instant::now() < until {
            if self.waiting.is_empty() {
                tokio::time::sleep_until(until).await;
                break;
            }
            self.ask(redis, keys).await?;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    }

    /// Asks until every request has its outcome; fails after `limit`.
    async fn ask_all(
        &mut self,
        redis: &Client,
        keys: &KeyTemplates,
        limit: Duration,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        while !self.waiting.is_empty() {
            anyhow::ensure!(
                started.elapsed() < limit,
                "{} requests without an outcome {limit:?} after the sale's end",
                self.waiting.len()
            );
            self.ask(redis, keys).await?;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    }
}

/// What the drain decided, from its outcome counters.
fn decided_so_far(metrics: &Metrics) -> DrainReport {
    let mut report = DrainReport::default();
    for outcome in Outcome::ALL.into_iter().filter(|o| o.is_decided()) {
        report.outcomes[outcome] = metrics.outcome(outcome.label()).get();
    }
    report
}
