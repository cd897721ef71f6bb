//! The daemon (`run`) and the one-shot commands: builds the clients, starts the jobs, the
//! scheduler and the HTTP server, waits for the shutdown trigger and stops in order.
//!
//! Shutdown order (bounded by `[shutdown] timeout_secs`):
//! 1. stop scheduling and following; a drain tick or follow step in progress finishes its current
//!    batch and returns (the follower gives up its lease);
//! 2. wait for running jobs;
//! 3. [`CouponJob::shutdown`]: the persister makes a last pass over the outbox, then the
//!    ranking-log pipeline stops reading and writes what it read;
//! 4. the HTTP server stops.
//!
//! Past the deadline, whatever is left stays in Redis (the outbox; log entries are handed back
//! for the next reader), is logged, and [`run`] returns [`ShutdownTimedOut`]. No step waits
//! past the deadline: one still waiting on a frozen Redis or MySQL then is dropped, as a crash
//! would drop it (everything it held is still in Redis), so the process exits on time.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::NaiveDate;
use fred::prelude::*;
use sqlx::MySqlPool;
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio_cron_scheduler::{Job, JobScheduler};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backends::{self, Unavailable};
use crate::config::Config;
use crate::control::{self, Control};
use crate::coupon::{
    CouponDrain, DEFAULT_LEASE, DeadAction, DeadFilter, DeadReport, DrainReport, FollowOptions,
    Following, StopReason,
};
use crate::http::{self, HttpState};
use crate::metrics::Metrics;
use crate::ranking::{RankingKeeper, RankingRebuild, RebuildReport, WhenLocked, today};
use crate::ranking_log::{LogPipeline, WriterReport};
use crate::schedule::{Clock, SchedulerClock, ZonedSchedule, run_zoned};

/// The shutdown deadline passed with work left; the process exits non-zero.
#[derive(Debug, thiserror::Error)]
#[error("shutdown did not finish within {0:?}")]
pub struct ShutdownTimedOut(pub Duration);

/// A resource named in the configuration could not be set up (the HTTP listen address): exits 78 like any other configuration problem.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {source:#}")]
pub struct SetupError {
    pub key: &'static str,
    #[source]
    pub source: anyhow::Error,
}

/// The command line asked for something that cannot be done (a date after today): exits 64
/// (EX_USAGE) before anything is touched.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// `drain` found the drain paused by an operator (`pause --drain`) and stopped there, having
/// decided nothing or only what it decided before the pause: exits 75 (EX_TEMPFAIL: run it
/// again after `resume --drain`).
#[derive(Debug, thiserror::Error)]
#[error(
    "the drain is paused (`commerce-worker resume --drain` lifts it); the queue was not drained"
)]
pub struct DrainPaused;

/// Connected backends.
#[derive(Clone)]
pub struct Backends {
    pub redis: Client,
    pub mysql: MySqlPool,
}

impl Backends {
    /// Connects both; a backend that does not answer is reported as [`Unavailable`].
    pub async fn connect(config: &Config) -> Result<Self, Unavailable> {
        let redis = backends::connect_redis(&config.redis).await?;
        let mysql = backends::connect_mysql(&config.mysql).await?;
        Ok(Self { redis, mysql })
    }
}

/// The coupon job's running parts, started and stopped in order by one owner: the drain
/// (ticked by the caller), the outbox persister, and the ranking-log pipeline. Every command, the
/// demo, the benchmarks and the tests use it.
pub struct CouponJob {
    pub drain: CouponDrain,
    persister_stop: CancellationToken,
    persister: tokio::task::JoinHandle<()>,
    /// The registry sweeper (per-coupon layout), stopped with the persister.
    sweeper: tokio::task::JoinHandle<()>,
    log: LogPipeline,
}

/// What [`CouponJob::shutdown`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct JobShutdown {
    pub log: WriterReport,
    /// Whether the outbox persister finished its last pass in time.
    pub outbox_flushed: bool,
    /// Whether every log row read was written in time.
    pub log_flushed: bool,
}

impl JobShutdown {
    pub fn clean(&self) -> bool {
        self.outbox_flushed && self.log_flushed
    }
}

impl CouponJob {
    /// Starts the persister and the log pipeline; the drain is ready to tick.
    pub fn start(config: &Config, backends: &Backends, metrics: &Metrics) -> Self {
        let log = LogPipeline::start(
            &config.ranking_log,
            &config.keys,
            backends.redis.clone(),
            backends.mysql.clone(),
            metrics.clone(),
        );
        let drain = CouponDrain::new(
            backends.redis.clone(),
            backends.mysql.clone(),
            &config.keys,
            config.coupon.batch_size.get(),
            log.waker(),
            metrics.clone(),
        )
        .with_sweep_interval(config.coupon.sweep_interval)
        .with_min_replicas_acked(config.redis.min_replicas_acked)
        // At most 10 reads of the flags a second, and none while the queue is idle.
        .with_pause_check(crate::coupon::pause_seen_within(
            config.coupon.follow_interval(),
        ));
        let persister_stop = CancellationToken::new();
        let persister = {
            let drain = drain.clone();
            let stop = persister_stop.clone();
            tokio::spawn(async move { drain.run_persister(stop).await })
        };
        let sweeper = {
            let drain = drain.clone();
            let stop = persister_stop.clone();
            tokio::spawn(async move { drain.run_sweeper(stop).await })
        };
        Self {
            drain,
            persister_stop,
            persister,
            sweeper,
            log,
        }
    }

    /// Decides until the queue is empty, then waits until the outbox is empty and every log
    /// row waiting in Redis is written (including rows other processes left: taken over once
    /// idle), or until `stop`.
    pub async fn drain_to_empty(&self, stop: &CancellationToken) -> DrainReport {
        let report = self.drain.drain_to_empty(stop).await;
        self.wait_for_log(stop).await;
        report
    }

    /// Waits until no log row waits in Redis, or `stop`. The reader walks every log stream once
    /// (rows other processes left in streams it never heard of join its work set); after that,
    /// each look counts the rows of the streams known to have entries only, so waiting costs
    /// the same with 10 registered coupons or 20 000.
    pub async fn wait_for_log(&self, stop: &CancellationToken) {
        let waker = self.log.waker();
        let ask = waker.sweep_now();
        loop {
            if waker.sweeps_done() >= ask
                && let Ok((0, _)) = self.log.known_backlog().await
            {
                return;
            }
            waker.notify_one();
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Stops in order within `deadline`: the persister's last pass over the outbox, then the
    /// log pipeline writes what it read. Past the deadline, what is left stays in Redis (the
    /// outbox, the log entries handed back) for the next start or another replica. Call once the
    /// drain is idle (no tick running).
    pub async fn shutdown(self, deadline: tokio::time::Instant) -> JobShutdown {
        drop(self.drain);
        self.persister_stop.cancel();
        // The sweeper stops between two chunks of its walk. A task still running at the
        // deadline is dropped (as a crash would stop it): what it had not done stays in Redis.
        let mut sweeper = self.sweeper;
        if tokio::time::timeout_at(deadline, &mut sweeper)
            .await
            .is_err()
        {
            sweeper.abort();
            tracing::warn!("the coupon registry sweeper did not stop by the deadline");
        }
        let mut persister = self.persister;
        let outbox_flushed = tokio::time::timeout_at(deadline, &mut persister)
            .await
            .is_ok();
        if !outbox_flushed {
            persister.abort();
            tracing::warn!(
                "issued coupons still in the outbox at the deadline; the next start or another replica persists them"
            );
        }
        let (log, log_flushed) = self.log.shutdown(deadline).await;
        JobShutdown {
            log,
            outbox_flushed,
            log_flushed,
        }
    }

    /// Waits until every log row in Redis is written, then stops (benchmarks, demo, tests).
    /// Fails when the rows are not written within `limit` (stopping the job all the same), so
    /// that a stuck writer fails its caller instead of hanging it.
    pub async fn finish_writing(self, limit: Duration) -> anyhow::Result<WriterReport> {
        let deadline = tokio::time::Instant::now() + limit;
        let written =
            tokio::time::timeout_at(deadline, self.wait_for_log(&CancellationToken::new()))
                .await
                .is_ok();
        let grace = tokio::time::Instant::now() + Duration::from_secs(10);
        let report = self.shutdown(deadline.max(grace)).await.log;
        anyhow::ensure!(
            written,
            "the ranking-log rows waiting in Redis were not written within {limit:?} ({} written, {} left)",
            report.rows_written,
            report.rows_left
        );
        Ok(report)
    }
}

/// A job the scheduler runs: one run at a time; a tick that finds the previous run still going
/// is skipped and counted. Each run is recorded in the metrics and, with a [`Control`], in Redis
/// for `status`.
#[derive(Clone)]
struct GuardedJob {
    name: &'static str,
    running: Arc<Mutex<()>>,
    metrics: Metrics,
    control: Option<Control>,
}

impl GuardedJob {
    fn new(name: &'static str, metrics: &Metrics) -> Self {
        Self {
            name,
            running: Arc::new(Mutex::new(())),
            metrics: metrics.clone(),
            control: None,
        }
    }

    fn recorded_in(mut self, control: &Control) -> Self {
        self.control = Some(control.clone());
        self
    }

    /// Runs `work` unless a previous run is still going. `work` returns its result label: `ok`,
    /// `paused` when an operator's pause kept it from working, or `skipped` when it had nothing
    /// to do because another run does its work (a follower drains the queue): counted, not
    /// recorded in Redis (the follower records its own runs).
    async fn run<F, Fut>(&self, work: F)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = anyhow::Result<&'static str>>,
    {
        let Ok(_guard) = self.running.try_lock() else {
            tracing::debug!(job = self.name, "previous run still going; tick skipped");
            self.metrics.record_skip(self.name);
            return;
        };
        let started_at = chrono::Utc::now();
        let started = Instant::now();
        let result = work().await;
        let elapsed = started.elapsed();
        let label = match &result {
            Ok("skipped") => {
                self.metrics.record_skip(self.name);
                return;
            }
            Ok(label) => *label,
            Err(_) => "error",
        };
        let error = result.as_ref().err().map(|e| format!("{e:#}"));
        control::record_run(
            &self.metrics,
            self.control.as_ref(),
            self.name,
            started_at,
            elapsed,
            label,
            error,
        )
        .await;
        if let Err(e) = result {
            tracing::error!(job = self.name, error = %format!("{e:#}"), "job run failed; will retry at the next tick");
        }
    }

    /// Waits for the run in progress, if any.
    async fn wait_idle(&self) {
        let _ = self.running.lock().await;
    }
}

/// Runs the daemon until `shutdown` completes, then stops in order within the deadline.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let backends = Backends::connect(&config).await?;
    backends::check_migrated(&backends.mysql).await?;
    let listener = TcpListener::bind(config.http.listen)
        .await
        .map_err(|e| SetupError {
            key: "http.listen",
            source: anyhow::Error::new(e)
                .context(format!("cannot listen on {}", config.http.listen)),
        })?;
    // The address actually bound: with port 0 the system picks one, and this line is how a
    // supervisor (or a test) learns it.
    let listen = listener.local_addr().unwrap_or(config.http.listen);
    let job = CouponJob::start(&config, &backends, &metrics);
    // A lone request in a never-used lane is decided without reconciling its lane first.
    job.drain.reconcile_lanes_ahead();
    let drain = job.drain.clone();
    let rebuild = RankingRebuild::new(
        backends.redis.clone(),
        config.keys.clone(),
        config.ranking.clone(),
        metrics.clone(),
    );

    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let http_stop = CancellationToken::new();
    let liveness = http::Liveness::default();
    let http_task = {
        let state = HttpState {
            redis: backends.redis.clone(),
            mysql: backends.mysql.clone(),
            metrics: metrics.clone(),
            liveness: liveness.clone(),
        };
        let http_stop = http_stop.clone();
        tokio::spawn(async move {
            if let Err(e) = http::serve(listener, state, http_stop.cancelled_owned()).await {
                tracing::error!(error = %e, "HTTP server failed");
            }
        })
    };
    let control = Control::new(backends.redis.clone(), &config.keys, metrics.clone());
    let drain_job = GuardedJob::new("coupon_drain", &metrics).recorded_in(&control);
    let keeper = RankingKeeper::new(
        rebuild,
        Arc::new(crate::schedule::SystemClock),
        metrics.clone(),
    )
    .recorded_in(&control);
    let heartbeat_stop = CancellationToken::new();
    let heartbeat = tokio::spawn(keep_heartbeat(control.clone(), heartbeat_stop.clone()));
    let following = config.coupon.follow_interval().map(|poll_interval| {
        Following::new(
            &drain,
            FollowOptions {
                poll_interval,
                budget: config.coupon.tick_budget,
                lease: DEFAULT_LEASE,
            },
        )
    });
    let mut scheduler = schedule_jobs(
        &config,
        &drain,
        following.as_ref(),
        &keeper,
        &drain_job,
        &tasks,
        &stop,
        &liveness,
    )
    .await?;
    if let Some(following) = &following {
        let (following, drain, gate, stop) = (
            following.clone(),
            drain.clone(),
            drain_job.running.clone(),
            stop.clone(),
        );
        tasks.spawn(async move { following.follow(drain, gate, stop).await });
    }
    crate::systemd::ready();
    tracing::info!(%listen, coupon_schedule = config.coupon.schedule.as_str(),
        coupon_poll_interval_ms = config.coupon.poll_interval.as_millis() as u64,
        ranking_schedule = config.ranking.schedule.as_str(), timezone = %config.ranking.timezone,
        "commerce-worker running");

    shutdown.await;
    crate::systemd::stopping();
    let deadline = tokio::time::Instant::now() + config.shutdown.timeout;
    tracing::info!(
        timeout_secs = config.shutdown.timeout.as_secs(),
        "shutting down"
    );
    stop.cancel();
    match tokio::time::timeout_at(deadline, scheduler.shutdown()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "scheduler shutdown reported an error"),
        Err(_) => tracing::warn!("the scheduler did not stop by the shutdown deadline"),
    }
    let mut clean = true;
    let jobs_idle = async {
        drain_job.wait_idle().await;
        keeper.wait_idle().await;
    };
    if tokio::time::timeout_at(deadline, jobs_idle).await.is_err() {
        tracing::warn!("a job was still running at the shutdown deadline");
        clean = false;
    }
    tasks.close();
    if tokio::time::timeout_at(deadline, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("a job task was still running at the shutdown deadline");
        clean = false;
    }
    drop(drain);
    let stopped = job.shutdown(deadline).await;
    if !stopped.clean() {
        clean = false;
    }
    // The heartbeat's last write (forgetting this replica) and the HTTP server's in-flight
    // requests (a `/readyz` waiting on a frozen Redis) get what is left of the deadline: the
    // process does not outlive it (a heartbeat left behind expires by itself).
    let last_moment = deadline;
    heartbeat_stop.cancel();
    http_stop.cancel();
    let mut heartbeat = heartbeat;
    if tokio::time::timeout_at(last_moment, &mut heartbeat)
        .await
        .is_err()
    {
        heartbeat.abort();
    }
    let log_report = stopped.log;
    let mut http_task = http_task;
    if tokio::time::timeout_at(last_moment, &mut http_task)
        .await
        .is_err()
    {
        http_task.abort();
    }
    if clean {
        tracing::info!(
            log_rows_written = log_report.rows_written,
            "shut down cleanly"
        );
        Ok(())
    } else {
        Err(ShutdownTimedOut(config.shutdown.timeout).into())
    }
}

/// Starts the scheduler and arms both jobs on it through [`crate::schedule::run_zoned`] (which
/// follows DST changes in `[ranking] timezone`; tokio-cron-scheduler's own cron jobs would keep
/// the offset they were created with), plus the ranking's catch-up loop. With `following`, a
/// drain tick gives way to the follower ([`Following::tick`]).
#[allow(clippy::too_many_arguments)]
async fn schedule_jobs(
    config: &Config,
    drain: &CouponDrain,
    following: Option<&Following>,
    keeper: &RankingKeeper,
    drain_job: &GuardedJob,
    tasks: &TaskTracker,
    stop: &CancellationToken,
    liveness: &http::Liveness,
) -> anyhow::Result<JobScheduler> {
    let timezone = config.ranking.timezone;
    let coupon_schedule =
        ZonedSchedule::new(config.coupon.schedule.as_str(), timezone).context("coupon.schedule")?;
    let ranking_schedule = ZonedSchedule::new(config.ranking.schedule.as_str(), timezone)
        .context("ranking.schedule")?;
    let scheduler = JobScheduler::new()
        .await
        .context("creating the scheduler")?;
    // The scheduler's own heartbeat, fired by the scheduler every second: if its loop stops
    // (and with it the jobs' fires), `/healthz` turns 503 and the systemd watchdog stops being
    // pinged — one signal for both.
    let watchdog = crate::systemd::watchdog_interval();
    {
        let liveness = liveness.clone();
        scheduler
            .add(
                Job::new_async("* * * * * *", move |_id, _sched| {
                    let liveness = liveness.clone();
                    Box::pin(async move {
                        liveness.beat();
                        if watchdog.is_some() {
                            crate::systemd::watchdog_ping();
                        }
                    })
                })
                .context("liveness job")?,
            )
            .await?;
    }
    if let Some(interval) = watchdog {
        tracing::info!(
            interval_ms = interval.as_millis() as u64,
            "systemd watchdog enabled (pinged every second by the scheduler)"
        );
    }
    scheduler.start().await.context("starting the scheduler")?;
    let clock: Arc<dyn Clock> = Arc::new(SchedulerClock::new(scheduler.clone()));
    let budget = config.coupon.tick_budget;
    {
        let (drain, following, job, stop, clock) = (
            drain.clone(),
            following.cloned(),
            drain_job.clone(),
            stop.clone(),
            clock.clone(),
        );
        tasks.spawn(async move {
            run_zoned(coupon_schedule, clock, stop.clone(), |_tick| {
                let (drain, following, job, stop) =
                    (drain.clone(), following.clone(), job.clone(), stop.clone());
                async move {
                    job.run(|| async {
                        let report = match &following {
                            Some(following) => following.tick(&drain, budget, &stop).await?,
                            None => Some(drain.tick(budget, &stop).await?),
                        };
                        let Some(report) = report else {
                            return Ok("skipped");
                        };
                        if let Some(error) = report.lane_error {
                            anyhow::bail!(
                                "{} coupon lane(s) failing, the others decided: {error}",
                                report.failing_lanes
                            );
                        }
                        Ok(if report.stopped == StopReason::Paused {
                            "paused"
                        } else {
                            "ok"
                        })
                    })
                    .await
                }
            })
            .await
        });
    }
    {
        let (keeper, stop) = (keeper.clone(), stop.clone());
        tasks.spawn(async move {
            run_zoned(ranking_schedule, clock, stop.clone(), |tick| {
                let (keeper, stop) = (keeper.clone(), stop.clone());
                async move { keeper.on_tick(tick, &stop).await }
            })
            .await
        });
    }
    {
        // At start and every minute: the ranking for today is live, or is built now.
        let (keeper, stop) = (keeper.clone(), stop.clone());
        tasks.spawn(async move { keeper.keep_current(stop).await });
    }
    Ok(scheduler)
}

/// Refreshes this replica's heartbeat until `stop`, then removes it. A failed refresh is
/// retried at the next interval (the key expires meanwhile if Redis stays away).
async fn keep_heartbeat(control: Control, stop: CancellationToken) {
    let started_at = chrono::Utc::now();
    loop {
        if let Err(e) = control.heartbeat(started_at).await {
            tracing::debug!(error = %format!("{e:#}"), "heartbeat not written");
        }
        // Also refreshes the pause gauge and logs a pause even while no tick runs.
        let _ = control.paused(Duration::ZERO).await;
        tokio::select! {
            _ = tokio::time::sleep(crate::control::HEARTBEAT_INTERVAL) => {}
            _ = stop.cancelled() => break,
        }
    }
    control.forget_heartbeat().await;
}

/// `drain`: one drain until the queue is empty and every issued coupon is in MySQL.
pub async fn drain_once(
    config: &Config,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<(DrainReport, WriterReport)> {
    let metrics = Metrics::new();
    let backends = Backends::connect(config).await?;
    backends::check_migrated(&backends.mysql).await?;
    let job = CouponJob::start(config, &backends, &metrics);
    let stop = CancellationToken::new();
    let report = {
        let work = job.drain_to_empty(&stop);
        tokio::pin!(work);
        tokio::select! {
            report = &mut work => report,
            _ = shutdown => {
                stop.cancel();
                work.await
            }
        }
    };
    let deadline = tokio::time::Instant::now() + config.shutdown.timeout;
    let stopped = job.shutdown(deadline).await;
    Ok((report, stopped.log))
}

/// `rebuild-ranking`: one rebuild for `day` (default: today in the configured timezone).
pub async fn rebuild_once(
    config: &Config,
    day: Option<NaiveDate>,
) -> anyhow::Result<RebuildReport> {
    let today = today(config.ranking.timezone);
    let day = day.unwrap_or(today);
    if day > today {
        // Its window would make every live daily key look "older than the window".
        return Err(UsageError(format!(
            "--date {day} is after today ({today} in {}); refusing to rebuild a future ranking",
            config.ranking.timezone
        ))
        .into());
    }
    let redis = backends::connect_redis(&config.redis).await?;
    let metrics = Metrics::new();
    let control = Control::new(redis.clone(), &config.keys, metrics.clone());
    let rebuild = RankingRebuild::new(redis, config.keys.clone(), config.ranking.clone(), metrics);
    let started_at = chrono::Utc::now();
    let started = Instant::now();
    let result = rebuild
        .rebuild(day, WhenLocked::Wait)
        .await
        .and_then(|report| {
            anyhow::ensure!(
                !report.skipped_locked,
                "another replica held the ranking lease the whole time this command waited; nothing was rebuilt"
            );
            Ok(report)
        });
    // Recorded like a scheduled run, so `status` shows who rebuilt the ranking last.
    let (label, error) = match &result {
        Ok(_) => ("ok", None),
        Err(e) => ("error", Some(format!("{e:#}"))),
    };
    control
        .record_run(
            "ranking_rebuild",
            started_at,
            started.elapsed(),
            label,
            error,
        )
        .await;
    result
}

/// `requeue-dead` and `purge-dead`: prints each matching entry as it is handled, then a summary.
pub async fn dead_letters_once(
    config: &Config,
    action: DeadAction,
    filter: &DeadFilter,
    dry_run: bool,
) -> anyhow::Result<DeadReport> {
    let redis = backends::connect_redis(&config.redis).await?;
    let verb = match (action, dry_run) {
        (DeadAction::Requeue, false) => "requeued",
        (DeadAction::Requeue, true) => "would requeue",
        (DeadAction::Purge, false) => "deleted",
        (DeadAction::Purge, true) => "would delete",
    };
    let left = if dry_run { "would leave" } else { "left" };
    crate::coupon::process_dead(&redis, &config.keys, action, filter, dry_run, |entry| {
        let what = if entry.done {
            verb.to_owned()
        } else {
            format!("{left} (no member or numeric score)")
        };
        crate::telemetry::print_stdout(&format!(
            "{what}: {} {} member={:?} score={:?} reason={:?}\n",
            entry.stream, entry.id, entry.member, entry.score, entry.reason
        ));
    })
    .await
}

/// `pause` (`to = true`) and `resume`: sets or clears the chosen flags; returns the flags set
/// afterwards.
pub async fn pause_once(
    config: &Config,
    drain: bool,
    persist: bool,
    to: bool,
) -> anyhow::Result<Vec<String>> {
    let redis = backends::connect_redis(&config.redis).await?;
    let pick = |chosen: bool| chosen.then_some(to);
    let by = format!(
        "commerce-worker {} on {}",
        if to { "pause" } else { "resume" },
        crate::control::replica_id()
    );
    crate::control::set_paused(&redis, &config.keys, pick(drain), pick(persist), &by).await?;
    let records = crate::control::pause_records(&redis, &config.keys).await?;
    Ok(records.into_iter().map(|(part, _)| part).collect())
}

/// `reconcile --dry-run` found coupons where Redis differs from MySQL: exit 1.
#[derive(Debug, thiserror::Error)]
#[error("{0} coupons differ from MySQL (dry run: nothing changed; run `reconcile` to repair)")]
pub struct DifferencesFound(pub usize);

/// `reconcile [--dry-run]`: every lane compared with MySQL and, unless a dry run, repaired.
pub async fn reconcile_once(
    config: &Config,
    dry_run: bool,
) -> anyhow::Result<Vec<crate::coupon::LaneReport>> {
    let metrics = Metrics::new();
    let backends = Backends::connect(config).await?;
    backends::check_migrated(&backends.mysql).await?;
    let job = CouponJob::start(config, &backends, &metrics);
    let reports = job.drain.reconcile_all(dry_run).await;
    job.shutdown(tokio::time::Instant::now() + config.shutdown.timeout)
        .await;
    reports
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM; only SIGINT will stop the worker");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = terminate => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_tick_that_finds_the_previous_run_going_is_skipped_and_counted() {
        let metrics = Metrics::new();
        let job = GuardedJob::new("coupon_drain", &metrics);
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
        let slow = {
            let job = job.clone();
            tokio::spawn(async move {
                job.run(|| async move {
                    let _ = started_tx.send(());
                    let _ = release_rx.await;
                    Ok("ok")
                })
                .await
            })
        };
        let _ = started_rx.await;
        let mut ran_second = false;
        job.run(|| async {
            ran_second = true;
            Ok("ok")
        })
        .await;
        assert!(!ran_second, "the second run must not overlap the first");
        let _ = release_tx.send(());
        let _ = slow.await;
        let text = metrics.encode();
        assert!(
            text.contains(
                r#"commerce_worker_job_runs_total{job="coupon_drain",result="skipped"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"commerce_worker_job_runs_total{job="coupon_drain",result="ok"} 1"#),
            "{text}"
        );
    }
}
