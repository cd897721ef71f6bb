//! The command line (CONTRACT.md §5).

use std::path::PathBuf;

use chrono::NaiveDate;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "commerce-worker",
    version,
    about = "Runs the shop's Redis-backed background jobs: coupon drain, ranking rebuild, ranking log"
)]
pub struct Cli {
    /// Configuration file.
    #[arg(
        long,
        global = true,
        env = "WORKER_CONFIG",
        default_value = "worker.toml"
    )]
    pub config: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: every scheduled job until SIGTERM/SIGINT, then a graceful drain.
    Run,
    /// Load and validate the configuration; print it with secrets redacted.
    CheckConfig,
    /// Create the database if needed and apply the `sql/` migrations.
    Migrate,
    /// Drain the coupon queue once, until it is empty and every issued coupon is in MySQL.
    Drain,
    /// Rebuild the ranking once.
    RebuildRanking {
        /// The day to rebuild for (default: today in the configured timezone).
        #[arg(long, value_name = "YYYY-MM-DD")]
        date: Option<NaiveDate>,
    },
    /// Move dead-lettered entries back into the queue with their original score.
    RequeueDead,
    /// Try the worker end to end: plays the API's part (a flash sale, a few days of orders) in a
    /// private key prefix and database on the configured servers, runs the real jobs with
    /// progress bars, and reports outcomes, latency, the top-10 and the checks it verified.
    Demo(crate::demo::Options),
    /// Measure the jobs against their targets, in a private key prefix and database on the
    /// configured servers (removed afterwards). Build with --release.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// The coupon drain vs the naive check-then-act algorithm.
    Coupon {
        #[arg(long, default_value_t = 1_000_000)]
        requests: u64,
        #[arg(long, default_value_t = 10)]
        coupons: u64,
        /// Stock of each coupon.
        #[arg(long, default_value_t = 10_000)]
        stock: u64,
        /// Requests in the naive algorithm's sale (stock scaled to match); 0 skips it.
        #[arg(long, default_value_t = 1_000_000)]
        naive_requests: u64,
        /// Also drain the sale on this Redis Cluster (redis-cluster://…) with one queue per
        /// coupon, and print it beside the single Redis.
        #[arg(long, value_name = "URL")]
        cluster_url: Option<String>,
    },
    /// ZUNIONSTORE vs the chunked rebuild: total time and the longest stall of another client.
    Ranking {
        /// Products in each daily set.
        #[arg(long, default_value_t = 1_000_000)]
        products: u64,
    },
    /// The ranking-log writer vs a bare multi-row INSERT loop.
    RankingLog {
        #[arg(long, default_value_t = 1_000_000)]
        rows: u64,
    },
}
