//! DST-proof schedules on top of tokio-cron-scheduler, for every scheduled job.
//!
//! tokio-cron-scheduler turns a job's timezone into a fixed UTC offset when the job is created, so
//! after a daylight-saving change a "00:00 local" job fires at 23:00 or 01:00 local time until the
//! process restarts. Instead of one repeating job per schedule, [`run_zoned`] arms one fire at a
//! time: it computes the next instant the cron expression matches *on the zone's local clock*
//! ([`ZonedSchedule::next_after`], with croner), arms a one-shot job in the scheduler for that
//! instant ([`SchedulerClock`]), runs the job when it fires, then arms the next. The job is handed
//! the fire's scheduled instant, so it can derive its day from that rather than from `now()`
//! (which may already be a moment later, or, for a late fire, the next day).
//!
//! Runs never overlap: the next fire is armed after the job returns; fires missed meanwhile are
//! skipped, not made up. The [`Clock`] is injected, so tests step through DST transitions
//! without waiting for them.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use tokio_cron_scheduler::{Job, JobScheduler};
use tokio_util::sync::CancellationToken;

/// A cron expression (6 fields, seconds first) read on a timezone's local clock.
#[derive(Debug, Clone)]
pub struct ZonedSchedule {
    cron: Cron,
    timezone: Tz,
}

impl ZonedSchedule {
    /// Parses `expression` with the settings the configuration checks it with.
    pub fn new(expression: &str, timezone: Tz) -> anyhow::Result<Self> {
        let cron = CronParser::builder()
            .seconds(Seconds::Required)
            .dom_and_dow(true)
            .build()
            .parse(expression)
            .with_context(|| format!("`{expression}` is not a valid cron expression"))?;
        Ok(Self { cron, timezone })
    }

    pub fn timezone(&self) -> Tz {
        self.timezone
    }

    /// The first instant strictly after `after` whose local time in the zone matches. A local
    /// time skipped by a DST change moves to the first valid instant after it; a local time that
    /// occurs twice fires once.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&after.with_timezone(&self.timezone), false)
            .ok()
            .map(|next| next.with_timezone(&Utc))
    }
}

/// What a schedule waits with.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
    /// Completes at `at` (at once if it is past).
    fn wait_until(&self, at: DateTime<Utc>) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// The wall clock, waiting with tokio's timer (for code that only needs `now`, or no scheduler).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn wait_until(&self, at: DateTime<Utc>) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let left = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        Box::pin(tokio::time::sleep(left))
    }
}

/// The wall clock, each wait armed as a one-shot job in tokio-cron-scheduler (so the scheduler's
/// loop, which also pings the systemd watchdog, is what fires every job).
#[derive(Clone)]
pub struct SchedulerClock {
    scheduler: JobScheduler,
}

impl SchedulerClock {
    pub fn new(scheduler: JobScheduler) -> Self {
        Self { scheduler }
    }
}

impl Clock for SchedulerClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn wait_until(&self, at: DateTime<Utc>) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let scheduler = self.scheduler.clone();
        Box::pin(async move {
            let left = |now: DateTime<Utc>| (at - now).to_std().unwrap_or(Duration::ZERO);
            let (fired, on_fire) = tokio::sync::oneshot::channel::<()>();
            // The job's closure is FnMut; the sender is taken on its one fire.
            let fired = Arc::new(Mutex::new(Some(fired)));
            let job = Job::new_one_shot_async(left(Utc::now()), move |_id, _scheduler| {
                let fired = fired
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .take();
                Box::pin(async move {
                    if let Some(fired) = fired {
                        let _ = fired.send(());
                    }
                })
            });
            let armed = match job {
                Ok(job) => scheduler.add(job).await.map(|_| ()),
                Err(e) => Err(e),
            };
            match armed {
                Ok(()) => {
                    // An error means the scheduler dropped the job (shutting down).
                    let _ = on_fire.await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not arm a one-shot job; sleeping instead");
                }
            }
            // Never fire early: the scheduler may have stopped, and a wall clock can be stepped.
            tokio::time::sleep(left(Utc::now())).await;
        })
    }
}

/// Runs `job` at every fire of `schedule` until `stop`, handing it the fire's scheduled instant.
pub async fn run_zoned<F, Fut>(
    schedule: ZonedSchedule,
    clock: Arc<dyn Clock>,
    stop: CancellationToken,
    mut job: F,
) where
    F: FnMut(DateTime<Utc>) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut after = clock.now();
    loop {
        let Some(next) = schedule.next_after(after) else {
            tracing::warn!("the schedule never fires again");
            return;
        };
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = clock.wait_until(next) => {}
        }
        job(next).await;
        // A run that outlasted later fires skips them.
        after = next.max(clock.now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn fires(expression: &str, timezone: Tz, from: &str, count: usize) -> Vec<String> {
        let schedule = ZonedSchedule::new(expression, timezone).unwrap();
        let mut after = at(from);
        (0..count)
            .map(|_| {
                after = schedule
                    .next_after(after)
                    .unwrap_or_else(|| panic!("no next fire"));
                after.with_timezone(&timezone).to_rfc3339()
            })
            .collect()
    }

    #[test]
    fn midnight_in_new_york_stays_local_midnight_across_both_dst_changes() {
        let ny = chrono_tz::America::New_York;
        // Spring forward: 2026-03-08 02:00 EST -> 03:00 EDT.
        assert_eq!(
            fires("0 0 0 * * *", ny, "2026-03-06T12:00:00Z", 4),
            [
                "2026-03-07T00:00:00-05:00",
                "2026-03-08T00:00:00-05:00",
                "2026-03-09T00:00:00-04:00",
                "2026-03-10T00:00:00-04:00",
            ]
        );
        // Fall back: 2026-11-01 02:00 EDT -> 01:00 EST.
        assert_eq!(
            fires("0 0 0 * * *", ny, "2026-10-30T12:00:00Z", 4),
            [
                "2026-10-31T00:00:00-04:00",
                "2026-11-01T00:00:00-04:00",
                "2026-11-02T00:00:00-05:00",
                "2026-11-03T00:00:00-05:00",
            ]
        );
    }

    #[test]
    fn a_local_time_skipped_by_spring_forward_fires_once_right_after_the_gap() {
        let ny = chrono_tz::America::New_York;
        let fired = fires("0 30 2 * * *", ny, "2026-03-07T12:00:00Z", 2);
        assert_eq!(fired[1], "2026-03-09T02:30:00-04:00", "{fired:?}");
        assert!(
            fired[0].starts_with("2026-03-08T03:"),
            "02:30 does not exist on 2026-03-08; the fire moves past the gap: {fired:?}"
        );
    }

    #[test]
    fn seoul_midnight_is_fifteen_hundred_utc_every_day() {
        let fired = fires(
            "0 0 0 * * *",
            chrono_tz::Asia::Seoul,
            "2026-03-07T00:00:00Z",
            3,
        );
        assert_eq!(
            fired,
            [
                "2026-03-08T00:00:00+09:00",
                "2026-03-09T00:00:00+09:00",
                "2026-03-10T00:00:00+09:00",
            ]
        );
    }
}
