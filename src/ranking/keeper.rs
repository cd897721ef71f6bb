//! The daemon's side of the ranking (docs/contract.md §3): a running worker keeps trying until the
//! ranking for the current day is built.
//!
//! - [`RankingKeeper::on_tick`] is a scheduled fire: the ranking for the *tick's* day (its
//!   scheduled instant on the zone's clock, not `now()`), built after the tick.
//! - [`RankingKeeper::keep_current`] runs beside it: at start and every minute, if the live
//!   ranking is not for today (the worker was down at midnight, Redis lost it), it builds one.
//!
//! Either keeps trying, backing off from 1 s to a minute, until the live record (written by the
//! swap, whichever replica did it) says the ranking is built: a rebuild that failed (Redis down),
//! found another replica's lease (its holder may be dead: the lease then lapses within seconds),
//! or found this process already rebuilding is not the end of it. A skip is recorded as
//! `skipped`, never as `ok`; only a rebuild this process completed moves the last-success time.
//! The gauges `ranking_built_day` and `ranking_built_timestamp_seconds` follow the live record.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::{LiveRanking, RankingRebuild, WhenLocked, day_at, latest_plausible_day};
use crate::control::{self, Control};
use crate::metrics::Metrics;
use crate::retry::Backoff;
use crate::schedule::Clock;

/// The job's name in metrics and run records.
pub(crate) const JOB: &str = "ranking_rebuild";
/// How often [`RankingKeeper::keep_current`] checks the live ranking is today's.
const CHECK_EVERY: Duration = Duration::from_secs(60);

/// What must be live for a run to be done.
#[derive(Debug, Clone, Copy)]
struct Due {
    day: NaiveDate,
    /// A ranking for `day` swapped in before this does not count (a scheduled tick asks for a
    /// rebuild after it, even when one for the same day exists).
    not_before: Option<DateTime<Utc>>,
}

impl Due {
    /// Whether `live` is the ranking due. One dated after `latest` (the latest day that may be
    /// live now) is from the future — a clock that ran ahead, a mistyped date — and is not.
    fn met_by(&self, live: Option<&LiveRanking>, latest: NaiveDate) -> bool {
        live.is_some_and(|live| {
            (live.day > self.day && live.day <= latest)
                || (live.day == self.day
                    // built_at has whole seconds; the tick's second counts.
                    && self.not_before.is_none_or(|t| live.built_at.timestamp() >= t.timestamp()))
        })
    }
}

enum Attempt {
    Built,
    NotBuilt,
}

/// Keeps the live ranking current; cheap to clone (clones share the one-run-at-a-time guard).
#[derive(Clone)]
pub struct RankingKeeper {
    rebuild: RankingRebuild,
    clock: Arc<dyn Clock>,
    metrics: Metrics,
    control: Option<Control>,
    running: Arc<Mutex<()>>,
}

impl RankingKeeper {
    pub fn new(rebuild: RankingRebuild, clock: Arc<dyn Clock>, metrics: Metrics) -> Self {
        Self {
            rebuild: rebuild.with_clock(clock.clone()),
            clock,
            metrics,
            control: None,
            running: Arc::new(Mutex::new(())),
        }
    }

    /// Also records each run in Redis, for `status`.
    pub fn recorded_in(mut self, control: &Control) -> Self {
        self.control = Some(control.clone());
        self
    }

    /// A scheduled fire at `tick`: returns once the ranking for the tick's day, built after the
    /// tick, is live (or a later day's is), or at `stop`.
    pub async fn on_tick(&self, tick: DateTime<Utc>, stop: &CancellationToken) {
        let due = Due {
            day: day_at(tick, self.rebuild.timezone()),
            not_before: Some(tick),
        };
        self.ensure(due, stop).await;
    }

    /// Until `stop`: at once and then every minute, builds the ranking for today unless the
    /// live one is today's.
    pub async fn keep_current(&self, stop: CancellationToken) {
        loop {
            let due = Due {
                day: self.today(),
                not_before: None,
            };
            self.ensure(due, &stop).await;
            tokio::select! {
                () = tokio::time::sleep(CHECK_EVERY) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// Waits for the run in progress, if any.
    pub async fn wait_idle(&self) {
        let _ = self.running.lock().await;
    }

    fn today(&self) -> NaiveDate {
        day_at(self.clock.now(), self.rebuild.timezone())
    }

    async fn ensure(&self, mut due: Due, stop: &CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        loop {
            match self.rebuild.live().await {
                Ok(live) => {
                    self.show(live.as_ref());
                    let latest = latest_plausible_day(self.clock.now(), self.rebuild.timezone());
                    if due.met_by(live.as_ref(), latest) {
                        return;
                    }
                    if let Some(live) = live.as_ref().filter(|live| live.day > latest) {
                        tracing::warn!(
                            live_day = %live.day,
                            today = %self.today(),
                            "the live ranking is dated after today (a clock that ran ahead, or a mistyped date); treating it as stale and rebuilding"
                        );
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %format!("{e:#}"), "could not read the live ranking record")
                }
            }
            if due.not_before.is_none() {
                tracing::info!(day = %due.day, "the live ranking is not today's; rebuilding");
            }
            if let Attempt::Built = self.attempt(due.day).await {
                return;
            }
            let delay = backoff.next_delay();
            tracing::info!(
                day = %due.day,
                retry_in_ms = delay.as_millis() as u64,
                "the ranking is not built yet; will try again"
            );
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stop.cancelled() => return,
            }
            // A retry that runs into the next day builds the new day.
            due.day = due.day.max(self.today());
        }
    }

    async fn attempt(&self, day: NaiveDate) -> Attempt {
        let Ok(_guard) = self.running.try_lock() else {
            tracing::debug!("a ranking rebuild is already running in this process; skipped");
            self.metrics.record_skip(JOB);
            return Attempt::NotBuilt;
        };
        let started_at = Utc::now();
        let started = Instant::now();
        let result = self.rebuild.rebuild(day, WhenLocked::Skip).await;
        let elapsed = started.elapsed();
        let (label, attempt) = match &result {
            Ok(report) if report.skipped_locked => ("skipped", Attempt::NotBuilt),
            Ok(_) => ("ok", Attempt::Built),
            Err(_) => ("error", Attempt::NotBuilt),
        };
        let error = result.as_ref().err().map(|e| format!("{e:#}"));
        control::record_run(
            &self.metrics,
            self.control.as_ref(),
            JOB,
            started_at,
            elapsed,
            label,
            error,
        )
        .await;
        match result {
            Ok(_) => {
                if let Ok(live) = self.rebuild.live().await {
                    self.show(live.as_ref());
                }
            }
            Err(e) => {
                tracing::error!(job = JOB, %day, error = %format!("{e:#}"), "ranking rebuild failed");
            }
        }
        attempt
    }

    fn show(&self, live: Option<&LiveRanking>) {
        if let Some(live) = live {
            let day = live.day;
            self.metrics.ranking_built_day.set(i64::from(
                day.year() * 10_000 + day.month() as i32 * 100 + day.day() as i32,
            ));
            self.metrics
                .ranking_built_timestamp
                .set(live.built_at.timestamp());
        }
    }
}
