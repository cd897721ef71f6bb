//! The ranking rebuild benchmark (issue 4): `window_days` daily sets of `products` products each
//! (consecutive days overlap by 90 %, like a real catalog's best sellers), rebuilt once with
//! ZUNIONSTORE and once with the chunked strategy, while a [`StallProbe`] plays the API reading
//! the ranking every millisecond on its own connection. The longest round trip it saw is the
//! longest time Redis was blocked for other clients.

use std::time::{Duration, Instant};

use anyhow::ensure;
use chrono::Days;
use fred::prelude::*;

use super::{MemorySampler, StallProbe, Summary, in_sandbox};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::ranking::{RankingRebuild, RebuildReport, Strategy, WhenLocked, today};
use crate::tools::options::RankingBenchOptions;
use crate::tools::report::{Latencies, group, millis};
use crate::tools::sandbox::Sandbox;
use crate::tools::simulated_api::write_day_sales;

/// The stall the chunked strategy must stay under.
const STALL_TARGET: Duration = Duration::from_millis(50);

#[derive(Debug, Clone)]
pub(crate) struct StrategyFigures {
    pub strategy: Strategy,
    pub report: RebuildReport,
    pub probe: Latencies,
    /// Peak resident memory of this process during the rebuild, in bytes.
    pub peak_resident: u64,
    /// CPU time Redis used during the rebuild (its `INFO cpu`), in seconds: a figure other
    /// processes on a loaded machine disturb much less than wall time.
    pub redis_cpu: f64,
}

/// Redis' CPU time so far (`used_cpu_user` + `used_cpu_sys` of `INFO cpu`), in seconds.
async fn redis_cpu_seconds(redis: &Client) -> f64 {
    redis
        .info::<String>(Some(fred::types::InfoKind::Cpu))
        .await
        .map(|info| {
            info.lines()
                .filter_map(|l| {
                    l.strip_prefix("used_cpu_user:")
                        .or_else(|| l.strip_prefix("used_cpu_sys:"))
                })
                .filter_map(|v| v.trim().parse::<f64>().ok())
                .sum()
        })
        .unwrap_or(0.0)
}

pub(crate) async fn run(config: &Config, options: RankingBenchOptions) -> anyhow::Result<Summary> {
    println!(
        "ranking rebuild: {} days x {} products",
        config.ranking.window_days,
        group(options.products as f64)
    );
    let mut summary = Summary::default();
    let runs = options.runs.max(1);
    for run in 1..=runs {
        if runs > 1 {
            println!("  run {run}/{runs}");
        }
        let (figures, idle) =
            in_sandbox(config, async |sandbox| run_in(sandbox, options).await).await?;
        summary.record(
            "idle Redis: longest round trip",
            "ms",
            idle.max().as_secs_f64() * 1000.0,
        );
        summary.record(
            "idle Redis: p99 of round trips",
            "ms",
            idle.percentile(99.0).as_secs_f64() * 1000.0,
        );
        for f in &figures {
            let name = format!("{:?}", f.strategy);
            summary.record(
                &format!("{name}: total"),
                "s",
                f.report.elapsed.as_secs_f64(),
            );
            summary.record(
                &format!("{name}: longest stall of the other client"),
                "ms",
                f.probe.max().as_secs_f64() * 1000.0,
            );
            summary.record(
                &format!("{name}: p99 of its round trips"),
                "ms",
                f.probe.percentile(99.0).as_secs_f64() * 1000.0,
            );
            summary.record(&format!("{name}: Redis CPU time"), "s", f.redis_cpu);
            summary.record(
                &format!("{name}: worker peak RSS"),
                "MiB",
                (f.peak_resident / (1024 * 1024)) as f64,
            );
        }
        if let [union, chunked] = figures.as_slice() {
            summary.record(
                "Chunked / Zunionstore total time",
                "x",
                chunked.report.elapsed.as_secs_f64() / union.report.elapsed.as_secs_f64().max(1e-9),
            );
            summary.record(
                "Chunked / Zunionstore Redis CPU time",
                "x",
                chunked.redis_cpu / union.redis_cpu.max(1e-9),
            );
        }
    }
    summary.print(runs);
    Ok(summary)
}

async fn run_in(
    sandbox: &Sandbox,
    options: RankingBenchOptions,
) -> anyhow::Result<(Vec<StrategyFigures>, Latencies)> {
    let config = &sandbox.config;
    let day = today(config.ranking.timezone);
    let loading = Instant::now();
    for back in 0..u64::from(config.ranking.window_days) {
        let Some(date) = day.checked_sub_days(Days::new(back)) else {
            continue;
        };
        let first = back * options.products / 10;
        let sales = (first..first + options.products)
            .map(|product| (((product * 7919) % 1000 + 1) as f64, product.to_string()));
        write_day_sales(&sandbox.redis, &config.keys, date, sales).await?;
    }
    println!(
        "  loaded the daily sets in {:.1} s",
        loading.elapsed().as_secs_f64()
    );

    let idle = StallProbe::start(&config.redis, config.keys.ranking_window.clone()).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = idle.finish().await?;
    println!(
        "  idle Redis, for reference: {} probes, p99 {}, max {}",
        idle.len(),
        millis(idle.percentile(99.0)),
        millis(idle.max())
    );

    let mut figures = Vec::new();
    for strategy in [Strategy::Zunionstore, Strategy::Chunked] {
        let rebuild = RankingRebuild::new(
            sandbox.redis.clone(),
            config.keys.clone(),
            config.ranking.clone(),
            Metrics::new(),
        )
        .with_strategy(strategy);
        let probe = StallProbe::start(&config.redis, config.keys.ranking_window.clone()).await?;
        let memory = MemorySampler::start();
        let cpu_before = redis_cpu_seconds(&sandbox.redis).await;
        let report = rebuild.rebuild(day, WhenLocked::Wait).await?;
        let redis_cpu = redis_cpu_seconds(&sandbox.redis).await - cpu_before;
        let (_, peak_resident) = memory.finish().await;
        let probe = probe.finish().await?;
        println!(
            "  {:<11} total {:>6.2} s (Redis CPU {:.2} s), {} products; concurrent client: {} probes, p99 {}, longest stall {}, {} over {}; worker peak RSS {} MiB",
            format!("{strategy:?}:"),
            report.elapsed.as_secs_f64(),
            redis_cpu,
            group(report.products as f64),
            probe.len(),
            millis(probe.percentile(99.0)),
            millis(probe.max()),
            probe.count_over(STALL_TARGET),
            millis(STALL_TARGET),
            peak_resident / (1024 * 1024),
        );
        figures.push(StrategyFigures {
            strategy,
            report,
            probe,
            peak_resident,
            redis_cpu,
        });
    }
    if let [union, chunked] = figures.as_slice() {
        ensure!(
            union.report.products == chunked.report.products,
            "the strategies disagree: {} vs {} products",
            union.report.products,
            chunked.report.products
        );
        println!(
            "  ratio: chunked takes {:.2}x the time of ZUNIONSTORE ({:.2}x its Redis CPU time); longest stall {} vs {} (target for chunked: under {}: {})",
            chunked.report.elapsed.as_secs_f64() / union.report.elapsed.as_secs_f64().max(1e-9),
            chunked.redis_cpu / union.redis_cpu.max(1e-9),
            millis(chunked.probe.max()),
            millis(union.probe.max()),
            millis(STALL_TARGET),
            if chunked.probe.max() < STALL_TARGET {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    // The ranking left by the last rebuild holds the right sums.
    let days = u64::from(config.ranking.window_days);
    for product in [
        0,
        options.products / 2,
        options.products,
        options.products * 11 / 10,
    ] {
        let expected: f64 = (0..days)
            .filter(|back| {
                (back * options.products / 10..back * options.products / 10 + options.products)
                    .contains(&product)
            })
            .map(|back| config.ranking.weight(back as usize) * ((product * 7919) % 1000 + 1) as f64)
            .sum();
        let score: Option<f64> = sandbox
            .redis
            .zscore(&config.keys.ranking_window, product.to_string())
            .await?;
        ensure!(
            (score.unwrap_or(0.0) - expected).abs() < 1e-6,
            "product {product}: ranking score {score:?}, expected {expected}"
        );
    }
    Ok((figures, idle))
}
