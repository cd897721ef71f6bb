//! The one-shot commands as the operator sees them: what each prints (a report with a `Display`
//! impl) and how it ends (the error that picks its exit code), plus the binary's start-up steps
//! (load the config, start logging, run on a runtime, map a failure to an exit code), so that
//! `main.rs` stays glue. The work itself is done in [`app`] and the jobs' modules.

use std::fmt;
use std::future::Future;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use crate::config::{self, Config};
use crate::coupon::{
    self, CouponReport, DeadAction, DeadFilter, DeadReport, DrainReport, LaneReport, StopReason,
};
use crate::exit::{EX_CONFIG, code_for};
use crate::ranking_log::WriterReport;
use crate::{app, backends, status, telemetry};

/// Printed (exit 64) when `purge-dead` lacks `--yes`.
pub const PURGE_NEEDS_YES: &str = "error: purge-dead deletes dead-lettered entries for good: add --yes (try `requeue-dead --dry-run` with the same filter to see them)";

/// Prints a command's output on stdout; a closed pipe (`| head`) ends it quietly instead of
/// panicking.
pub fn print(text: impl AsRef<str>) {
    telemetry::print_stdout(text.as_ref());
}

/// Prints a report and a newline (see [`print`]).
pub fn show(report: &dyn fmt::Display) {
    print(format!("{report}\n"));
}

/// Prints `report`, then ends the command as `end` judges the report (a drain that was paused
/// or left lanes failing, a dry run that found differences).
pub fn show_then<R: fmt::Display>(
    report: R,
    end: impl FnOnce(R) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    show(&report);
    end(report)
}

/// Loads the configuration; on failure prints why and returns exit code 78.
pub fn load_config(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path, config::process_env).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EX_CONFIG)
    })
}

/// `check-config`: the warnings on stderr, the configuration with secrets redacted on stdout.
pub fn check_config(config: &Config) -> ExitCode {
    config.warning_lines().iter().for_each(|w| eprintln!("{w}"));
    print(config.to_redacted_toml());
    ExitCode::SUCCESS
}

/// Starts logging and logs the configuration's warnings. A command whose output is a report
/// logs at `warn`: per-tick INFO lines would bury it (RUST_LOG still wins).
pub fn start_logging(config: &Config, prints_a_report: bool) {
    let mut log = config.log.clone();
    if prints_a_report {
        log.level = "warn".into();
    }
    telemetry::init(&log);
    config
        .warning_lines()
        .iter()
        .for_each(|w| tracing::warn!("{w}"));
}

/// Runs a command on a new runtime; a failure is printed on stderr (its whole chain, once) and
/// mapped to its exit code. With `log_failure` (the daemon, whose log is its record) it is
/// logged too; a one-shot command's `error:` line is its whole story, not repeated in a log line.
pub fn run_to_exit(
    command: impl Future<Output = anyhow::Result<()>>,
    log_failure: bool,
) -> ExitCode {
    let result = tokio::runtime::Runtime::new()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))
        .and_then(|runtime| {
            let result = runtime.block_on(command);
            // Whatever still runs (a call to a frozen server, dropped at the shutdown deadline;
            // a DNS lookup on a blocking thread) ends with the process: the command is done,
            // and `run` promised to exit by its deadline.
            runtime.shutdown_background();
            result
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if log_failure {
                tracing::error!(error = %format!("{e:#}"), "exiting");
            }
            eprintln!("error: {e:#}");
            ExitCode::from(code_for(&e))
        }
    }
}

/// `migrate`: how many migrations were applied.
pub async fn migrate(config: &Config) -> anyhow::Result<Migrated> {
    Ok(Migrated(backends::migrate(&config.mysql).await?))
}

/// What `migrate` did.
#[derive(Debug, Clone, Copy)]
pub struct Migrated(pub usize);

impl fmt::Display for Migrated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "migrations applied: {} (database up to date)", self.0)
    }
}

/// `drain`: one drain until the queue is empty, stopped early by SIGTERM/SIGINT.
pub async fn drain(config: &Config) -> anyhow::Result<Drained> {
    let (drain, log) = app::drain_once(config, app::shutdown_signal()).await?;
    Ok(Drained { drain, log })
}

/// What `drain` did: the decisions and the ranking-log rows.
#[derive(Debug, Clone)]
pub struct Drained {
    pub drain: DrainReport,
    pub log: WriterReport,
}

impl Drained {
    /// Whether an operator's pause stopped the drain (before it started, or part-way).
    pub fn paused(&self) -> bool {
        self.drain.stopped == StopReason::Paused
    }

    /// A paused drain fails with [`app::DrainPaused`] (exit 75): it did not drain the queue.
    /// Per coupon, lanes left failing (a key of the wrong type) fail it too (exit 1): their
    /// requests are still in their queues.
    pub fn into_result(self) -> anyhow::Result<()> {
        if self.paused() {
            return Err(app::DrainPaused.into());
        }
        if self.drain.failing_lanes > 0 {
            anyhow::bail!(
                "{} coupon lane(s) failing, their requests left in their queues{}",
                self.drain.failing_lanes,
                self.drain
                    .lane_error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            );
        }
        Ok(())
    }
}

impl fmt::Display for Drained {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.paused() {
            return write!(
                f,
                "not drained: the drain is paused; decided before the pause: {} ({}); ranking-log rows written: {}, handed back to Redis: {}",
                self.drain.decided(),
                self.drain.outcomes,
                self.log.rows_written,
                self.log.rows_left,
            );
        }
        write!(
            f,
            "drained: {}; ranking-log rows written: {}, handed back to Redis: {}",
            self.drain, self.log.rows_written, self.log.rows_left,
        )
    }
}

/// `requeue-dead` and `purge-dead`: each matching entry printed as it is handled, then this.
pub async fn dead_letters(
    config: &Config,
    action: DeadAction,
    filter: DeadFilter,
    dry_run: bool,
) -> anyhow::Result<DeadLetters> {
    let report = app::dead_letters_once(config, action, &filter, dry_run).await?;
    Ok(DeadLetters {
        action,
        dry_run,
        report,
    })
}

/// What `requeue-dead` or `purge-dead` did (or, in a dry run, would do).
#[derive(Debug, Clone, Copy)]
pub struct DeadLetters {
    pub action: DeadAction,
    pub dry_run: bool,
    pub report: DeadReport,
}

impl fmt::Display for DeadLetters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.report;
        match self.action {
            DeadAction::Requeue => write!(
                f,
                "{} {} of {} matching dead-lettered entries ({} looked at); {} left in the stream without a member or numeric score",
                if self.dry_run {
                    "would requeue"
                } else {
                    "requeued"
                },
                r.done,
                r.matched,
                r.looked_at,
                r.left
            ),
            DeadAction::Purge => write!(
                f,
                "{} {} matching dead-lettered entries ({} looked at)",
                if self.dry_run {
                    "would delete"
                } else {
                    "deleted"
                },
                r.done,
                r.looked_at
            ),
        }
    }
}

/// `pause` (`pausing`) and `resume`: sets or clears the chosen flags.
pub async fn pause(
    config: &Config,
    drain: bool,
    persist: bool,
    pausing: bool,
) -> anyhow::Result<Paused> {
    let paused = app::pause_once(config, drain, persist, pausing).await?;
    Ok(Paused {
        pausing,
        paused,
        // The interval the daemon reads the flags at (`app` sets the drain up with it).
        followed_within: coupon::pause_seen_within(config.coupon.follow_interval()),
    })
}

/// What `pause` or `resume` left set.
#[derive(Debug, Clone)]
pub struct Paused {
    /// `pause` (true) or `resume`.
    pub pausing: bool,
    /// The flags set afterwards.
    pub paused: Vec<String>,
    /// How soon every replica reads the flags.
    pub followed_within: Duration,
}

impl fmt::Display for Paused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}; paused now: {} (every replica follows within {} ms)",
            if self.pausing { "paused" } else { "resumed" },
            if self.paused.is_empty() {
                "nothing".to_owned()
            } else {
                self.paused.join(", ")
            },
            self.followed_within.as_millis()
        )
    }
}

/// `status [--json]`: prints the report; fails with [`status::NeedsAPerson`] (exit 1) if it
/// found a problem.
pub async fn status(config: &Config, json: bool) -> anyhow::Result<()> {
    let report = status::gather(config).await?;
    if json {
        print(format!("{}\n", serde_json::to_string_pretty(&report)?));
    } else {
        print(report.to_table());
    }
    if !report.healthy() {
        return Err(status::NeedsAPerson.into());
    }
    Ok(())
}

/// `reconcile [--dry-run]`: every lane compared with MySQL and, unless a dry run, repaired.
pub async fn reconcile(config: &Config, dry_run: bool) -> anyhow::Result<Reconciled> {
    let lanes = app::reconcile_once(config, dry_run).await?;
    Ok(Reconciled {
        dry_run,
        fences: lanes
            .iter()
            .filter(|l| l.fence_differs())
            .cloned()
            .collect(),
        coupons: lanes.into_iter().flat_map(|lane| lane.coupons).collect(),
    })
}

/// What `reconcile` found: one line per coupon that differed, then a summary.
#[derive(Debug, Clone)]
pub struct Reconciled {
    pub dry_run: bool,
    pub coupons: Vec<CouponReport>,
    /// Lanes whose `redis_fence` row named another Redis than the live, reconciled one.
    pub fences: Vec<LaneReport>,
}

impl Reconciled {
    fn differing(&self) -> impl Iterator<Item = &CouponReport> {
        self.coupons.iter().filter(|c| c.differs())
    }

    /// A dry run that found differences fails with [`app::DifferencesFound`] (exit 1).
    pub fn into_result(self) -> anyhow::Result<()> {
        let differing = self.differing().count() + self.fences.len();
        if self.dry_run && differing > 0 {
            return Err(app::DifferencesFound(differing).into());
        }
        Ok(())
    }
}

impl fmt::Display for Reconciled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for coupon in self.differing() {
            writeln!(f, "{coupon}")?;
        }
        for lane in &self.fences {
            writeln!(
                f,
                "lane {}: MySQL's redis_fence names {}, not the live reconciled Redis {}{}",
                lane.scope,
                lane.fence.as_deref().unwrap_or("nothing (no row)"),
                lane.identity,
                if self.dry_run { "" } else { "; rewritten" }
            )?;
        }
        write!(
            f,
            "{} coupons compared with MySQL, {} differed, {} fences differed{}",
            self.coupons.len(),
            self.differing().count(),
            self.fences.len(),
            if self.dry_run {
                " (dry run: nothing changed)"
            } else {
                "; Redis repaired from MySQL"
            }
        )
    }
}

/// `requeue-log-dead`: dead-lettered ranking-log entries moved back to their log streams.
pub async fn requeue_log_dead(config: &Config) -> anyhow::Result<LogRequeued> {
    let redis = backends::connect_redis(&config.redis).await?;
    Ok(LogRequeued(
        crate::ranking_log::requeue_log_dead(&redis, &config.keys).await?,
    ))
}

/// What `requeue-log-dead` did.
#[derive(Debug, Clone, Copy)]
pub struct LogRequeued(pub u64);

impl fmt::Display for LogRequeued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "requeued {} dead-lettered ranking-log entries", self.0)
    }
}

/// `requeue-outbox-dead`: refused issued coupons back into their outbox.
pub async fn requeue_outbox_dead(config: &Config) -> anyhow::Result<OutboxRequeued> {
    let redis = backends::connect_redis(&config.redis).await?;
    Ok(OutboxRequeued(
        coupon::requeue_outbox_dead(&redis, &config.keys).await?,
    ))
}

/// What `requeue-outbox-dead` did.
#[derive(Debug, Clone, Copy)]
pub struct OutboxRequeued(pub coupon::OutboxRequeued);

impl fmt::Display for OutboxRequeued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "requeued {} issued coupons user_coupon had refused into their outbox",
            self.0.moved
        )?;
        if self.0.kept > 0 {
            write!(
                f,
                "; {} entries without a member or score left in the outbox dead-letter stream",
                self.0.kept
            )?;
        }
        Ok(())
    }
}
