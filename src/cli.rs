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
}
