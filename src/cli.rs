//! The command line (docs/contract.md §5): the product's subcommands, and the tools' when the
//! `tools` feature is on. It belongs to the binary, which stands above both wings.

use std::path::PathBuf;

use chrono::NaiveDate;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "commerce-worker",
    version,
    about = "Runs the shop's Redis-backed background jobs: coupon drain, ranking rebuild, ranking log"
)]
pub(crate) struct Cli {
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
pub(crate) enum Command {
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
    /// Move dead-lettered entries back into the queue with their original score, printing each
    /// one (entries without a member or a numeric score stay).
    RequeueDead {
        /// Print what would be requeued; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        filter: DeadFilterArgs,
    },
    /// Delete dead-lettered entries on purpose, printing each one deleted.
    PurgeDead {
        /// Required: deleting is on purpose (without it, the command refuses with exit 64).
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        filter: DeadFilterArgs,
    },
    /// Health at a glance, across every replica: queue, outbox, dead-letter and ranking-log
    /// depths and oldest ages per coupon, each job's last run, the ranking's day and age, pause
    /// flags and live replicas. Exits 1 when something needs a person ([status] thresholds).
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Pause draining and/or persisting on every replica (honoured within a poll interval; a
    /// paused worker stays ready).
    Pause(PauseArgs),
    /// Resume what `pause` paused.
    Resume(PauseArgs),
    /// Compare Redis' coupon holders, stock and seq with MySQL (`user_coupon`, `ranking_logs`)
    /// and repair Redis from MySQL. Exit 0: consistent or repaired; 1: differences found (with
    /// --dry-run).
    Reconcile {
        /// Print the differences per coupon and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Move ranking-log rows MySQL rejected for good (kept in each log stream's `:dead` stream
    /// with the error) back into the log, to be written again, e.g. after fixing the table.
    RequeueLogDead,
    /// Move issued coupons user_coupon refused (a unique key other than (user_id, coupon_id);
    /// kept in each outbox's `:dead` stream with MySQL's error) back into their outbox, to be
    /// persisted again once the table is fixed.
    RequeueOutboxDead,
    /// The tools: `demo` and `bench` (built with the `tools` feature, on by default).
    #[cfg(feature = "tools")]
    #[command(flatten)]
    Tools(commerce_worker::tools::ToolCommand),
}

impl Command {
    /// Whether the command's output is a report (the tools'), which per-tick INFO lines would
    /// bury.
    pub(crate) fn prints_a_report(&self) -> bool {
        #[cfg(feature = "tools")]
        if let Command::Tools(_) = self {
            return true;
        }
        false
    }
}

/// What `pause` and `resume` act on: one of them or both.
#[derive(Debug, Clone, Copy, clap::Args)]
#[group(required = true, multiple = true)]
pub(crate) struct PauseArgs {
    /// Deciding queue entries (requests wait in the queue meanwhile).
    #[arg(long)]
    pub drain: bool,
    /// Writing issued coupons to MySQL (they wait in the outbox meanwhile), e.g. during a MySQL
    /// migration.
    #[arg(long)]
    pub persist: bool,
}

/// Which dead letters `requeue-dead` and `purge-dead` work on (default: all).
#[derive(Debug, Clone, Default, clap::Args)]
pub(crate) struct DeadFilterArgs {
    /// Only entries for this couponId (in the per-coupon layout: that coupon's stream), written
    /// as in Redis: a positive integer without sign or leading zeros.
    #[arg(long, value_name = "ID", value_parser = commerce_worker::keys::parse_id_argument)]
    pub coupon: Option<i64>,
    /// Only entries whose reason contains this text (case-sensitive), e.g. "stock is not".
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
}

impl DeadFilterArgs {
    pub(crate) fn to_filter(&self) -> commerce_worker::coupon::DeadFilter {
        commerce_worker::coupon::DeadFilter {
            coupon: self.coupon,
            reason: self.reason.clone().filter(|r| !r.is_empty()),
        }
    }
}
