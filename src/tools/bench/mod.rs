//! `commerce-worker bench`: the performance targets of the three jobs, measured against the
//! configured Redis and MySQL in a [`Sandbox`] (private key prefix and
//! database, removed afterwards).
//!
//! Each benchmark runs the worker's real code and, in the same run and on the same data, the
//! baseline the target is stated against, then prints both figures and their ratio. Nothing here
//! asserts a time: the figures are for BENCHMARKS.md; the checks a benchmark makes (every request
//! decided, every row landed) are correctness checks that fail the command.
//!
//! - [`coupon`] — the drain vs the naive check-then-act algorithm (issue 3).
//! - [`ranking`] — ZUNIONSTORE vs the chunked rebuild: total time and the longest stall a
//!   concurrent client sees (issue 4).
//! - [`ranking_log`] — the log writer vs a bare multi-row INSERT loop (issue 5).
//! - [`latency`] — enqueue-to-outcome time against the running daemon, following the queue vs
//!   ticks only (issue 14).

pub(super) mod coupon;
pub(super) mod latency;
pub(super) mod ranking;
pub(super) mod ranking_log;

use std::time::{Duration, Instant};

use fred::prelude::*;
use sqlx::MySqlPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::options::BenchCommand;
use super::report::{Latencies, group};
use super::sandbox::{self, Sandbox};
use crate::backends;
use crate::config::{self, Config, RedisConfig};

/// The figures of several runs of one benchmark, by name in the order first recorded: printed as
/// the median with the range (min–max), the form BENCHMARKS.md quotes. One run prints its value.
#[derive(Debug, Default)]
pub(super) struct Summary {
    figures: Vec<Figure>,
}

#[derive(Debug)]
struct Figure {
    name: String,
    unit: &'static str,
    values: Vec<f64>,
}

impl Summary {
    /// Adds one run's value of the figure `name`.
    pub(super) fn record(&mut self, name: &str, unit: &'static str, value: f64) {
        match self.figures.iter_mut().find(|f| f.name == name) {
            Some(figure) => figure.values.push(value),
            None => self.figures.push(Figure {
                name: name.to_owned(),
                unit,
                values: vec![value],
            }),
        }
    }

    /// The median of `name`'s values (the mean of the two middle ones for an even count); `print`
    /// shows it, the tests read it.
    #[cfg(test)]
    fn median(&self, name: &str) -> Option<f64> {
        let figure = self.figures.iter().find(|f| f.name == name)?;
        Some(median(&figure.values))
    }

    /// One line per figure: `name: median unit (min–max over N runs)`.
    pub(super) fn print(&self, runs: usize) {
        if runs > 1 {
            println!("  summary, median (min - max) of {runs} runs:");
        } else {
            println!("  summary (one run; --runs N for medians and ranges):");
        }
        for figure in &self.figures {
            let (min, max) = figure
                .values
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                    (lo.min(*v), hi.max(*v))
                });
            if figure.values.len() > 1 {
                println!(
                    "    {}: {} {} ({} - {})",
                    figure.name,
                    shown(median(&figure.values)),
                    figure.unit,
                    shown(min),
                    shown(max)
                );
            } else {
                println!(
                    "    {}: {} {}",
                    figure.name,
                    shown(median(&figure.values)),
                    figure.unit
                );
            }
        }
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Large figures grouped by thousands, small ones with two decimals.
fn shown(value: f64) -> String {
    if value.abs() >= 1000.0 {
        group(value)
    } else {
        format!("{value:.2}")
    }
}

/// Runs one benchmark: a line saying where it runs, then its figures.
pub(super) async fn run(which: BenchCommand, config: &Config) -> anyhow::Result<()> {
    let probe = backends::connect_redis(&config.redis).await?;
    // The server, not the configured database: the benchmarks make their own.
    let server = config::MysqlConfig {
        url: config::SecretUrl::new(sandbox::with_database(config.mysql.url.expose(), "")?),
        ..config.mysql.clone()
    };
    let pool = backends::connect_mysql(&server).await?;
    println!(
        "{} on {}",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        describe_machine(&probe, &pool).await
    );
    pool.close().await;
    match which {
        BenchCommand::Coupon(options) => {
            coupon::run(config, &options).await?;
        }
        BenchCommand::Ranking(options) => {
            ranking::run(config, options).await?;
        }
        BenchCommand::RankingLog(options) => {
            ranking_log::run(config, options).await?;
        }
        BenchCommand::Latency(options) => {
            latency::run(config, &options).await?;
        }
    }
    Ok(())
}

/// Runs `work` in a fresh sandbox and removes the sandbox whatever happened, Ctrl-C included
/// (a million leftover keys in the operator's Redis would be a poor souvenir).
pub(super) async fn in_sandbox<T>(
    config: &Config,
    work: impl AsyncFnOnce(&Sandbox) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let sandbox = Sandbox::create(config, "bench").await?;
    // Named, so that an operator (or a test) can check it was removed.
    println!(
        "  sandbox {}: keys under {}:*, database {} (removed at the end)",
        sandbox.name, sandbox.name, sandbox.name
    );
    let result = tokio::select! {
        result = work(&sandbox) => result,
        _ = crate::app::shutdown_signal() => Err(anyhow::anyhow!("interrupted; the benchmark's sandbox was removed")),
    };
    let cleaned = sandbox.cleanup().await;
    let value = result?;
    cleaned?;
    Ok(value)
}

/// One line describing where the figures were measured.
pub(super) async fn describe_machine(redis: &Client, mysql: &MySqlPool) -> String {
    let redis_version = redis
        .info::<String>(Some(fred::types::InfoKind::Server))
        .await
        .ok()
        .and_then(|info| {
            info.lines().find_map(|l| {
                l.strip_prefix("redis_version:")
                    .map(|v| v.trim().to_string())
            })
        })
        .unwrap_or_else(|| "?".into());
    let mysql_version: String = sqlx::query_scalar("SELECT VERSION()")
        .fetch_one(mysql)
        .await
        .unwrap_or_else(|_| "?".into());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let build = if cfg!(debug_assertions) {
        "DEBUG build: figures are not representative, use --release"
    } else {
        "release build"
    };
    format!(
        "{cores} cores ({cpu}), Redis {redis_version}, MySQL {mysql_version}, commerce-worker {} ({build})",
        env!("CARGO_PKG_VERSION")
    )
}

/// Another client of the same Redis, as the shop's API would be: sends a cheap read every
/// millisecond on its own connection and records how long each took. A command that blocks
/// Redis shows up as one long round trip here.
pub(super) struct StallProbe {
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<Latencies>>,
}

impl StallProbe {
    /// Starts probing with `ZCARD key` (what the API does to show the ranking's size).
    pub(super) async fn start(config: &RedisConfig, key: String) -> anyhow::Result<Self> {
        let client = backends::connect_redis(config).await?;
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut latencies = Latencies::default();
                while !stop.is_cancelled() {
                    let sent = Instant::now();
                    let _: u64 = client.zcard(&key).await?;
                    latencies.record(sent.elapsed());
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                let _ = client.quit().await;
                Ok(latencies)
            }
        });
        Ok(Self { stop, task })
    }

    pub(super) async fn finish(self) -> anyhow::Result<Latencies> {
        self.stop.cancel();
        self.task.await?
    }
}

/// The process's peak resident memory while a future runs, sampled every 10 ms.
pub(super) struct MemorySampler {
    stop: CancellationToken,
    task: JoinHandle<u64>,
    before: u64,
}

impl MemorySampler {
    pub(super) fn start() -> Self {
        let stop = CancellationToken::new();
        let before = resident_bytes().unwrap_or(0);
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut peak = 0;
                while !stop.is_cancelled() {
                    peak = peak.max(resident_bytes().unwrap_or(0));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                peak
            }
        });
        Self { stop, task, before }
    }

    /// `(resident before, peak resident during)`, in bytes.
    pub(super) async fn finish(self) -> (u64, u64) {
        self.stop.cancel();
        let peak = self.task.await.unwrap_or(0);
        (self.before, peak.max(self.before))
    }
}

/// Resident set size of this process (Linux; `None` elsewhere).
pub(super) fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::{Summary, median};

    #[test]
    fn the_median_is_the_middle_value_or_the_mean_of_the_two_middle_ones() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn a_summary_keeps_each_figures_runs_under_its_name() {
        let mut summary = Summary::default();
        for (a, b) in [(10.0, 1.0), (30.0, 2.0), (20.0, 9.0)] {
            summary.record("a", "/s", a);
            summary.record("b", "s", b);
        }
        assert_eq!(summary.median("a"), Some(20.0));
        assert_eq!(summary.median("b"), Some(2.0));
        assert_eq!(summary.median("c"), None);
    }
}
