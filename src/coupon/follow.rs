//! Following the queue between ticks (`[coupon] poll_interval_ms`): a request is decided within
//! a poll interval of its arrival instead of at the next scheduled tick.
//!
//! Each poll is one [`CouponDrain::step`]: it looks at the queue head (single queue) or the
//! active set (per coupon) — one Redis command when there is nothing to do; the pause flags are
//! read only when there is something to decide — and decides batch after batch while entries
//! keep coming. A poll that found work is followed by the next at once, and after the last one
//! that found work the waits grow from 1 ms back to the poll interval (1, 2, 4, … ms): under
//! steady traffic the follower decides back to back, an idle queue costs one look per interval.
//!
//! One replica follows at a time: the follower holds a short lease ([`FollowLease`], a
//! `SET NX PX` key renewed while it follows); the others look at the lease every third of its
//! life and take over when it lapses (a dead follower is replaced within ~1.3 leases). A step
//! never runs longer than a third of the lease, so the follower renews it in time even on a long
//! backlog. The lease only saves Redis work: deciding stays safe with any number of drainers,
//! because the decide script's removal of an entry is its claim.
//!
//! The scheduled tick stays the floor ([`Following::tick`]): it runs as before whenever nobody
//! follows (no live lease), and while a follower drains it is skipped, so the tick and the
//! follower — of this replica or of another — never read the same entries. A tick that starts
//! while nobody follows hands over as soon as a follower appears.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::prelude::*;
use tokio_util::sync::CancellationToken;

use super::lease::Lease;
use super::{CouponDrain, DrainReport, StopReason};
use crate::control;

/// The default lease: long enough that renewing it costs little, short enough that a dead
/// follower's successor takes over within about three seconds.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(2);

/// The follow lease: the right to follow the queue(s), held by one replica at a time.
pub type FollowLease = Lease;

/// How often following logs what it decided.
const SUMMARY_EVERY: Duration = Duration::from_secs(5);

/// How often a busy follower records its runs (metrics, and the run record in Redis `status`
/// reads).
const RECORD_EVERY: Duration = Duration::from_secs(1);
/// How often an idle follower records a run: the drain's last success stays fresh while the
/// scheduled ticks are skipped, at 0.2 Redis commands/s.
const IDLE_RECORD_EVERY: Duration = Duration::from_secs(5);

/// The first wait after a poll that found work came up empty; each further empty poll doubles
/// it, up to the poll interval.
const FIRST_QUIET_WAIT: Duration = Duration::from_millis(1);

/// How to follow.
#[derive(Debug, Clone, Copy)]
pub struct FollowOptions {
    /// Time between looks at an idle queue.
    pub poll_interval: Duration,
    /// A step's time budget (`[coupon] tick_budget_ms`); capped at a third of the lease.
    pub budget: Duration,
    pub lease: Duration,
}

impl FollowOptions {
    /// A step's budget: at most a third of the lease, so the follower renews it between steps.
    fn step_budget(&self) -> Duration {
        self.budget
            .min(self.lease / 3)
            .max(Duration::from_millis(1))
    }

    /// The wait before the next poll after `quiet` empty polls in a row (0: the last one found
    /// work, so no wait at all).
    fn wait_after(&self, quiet: u32) -> Duration {
        if quiet == 0 {
            return Duration::ZERO;
        }
        FIRST_QUIET_WAIT
            .saturating_mul(1 << (quiet - 1).min(20))
            .min(self.poll_interval)
    }
}

/// This replica's following: the follower loop ([`Self::follow`]) and the scheduled tick that
/// gives way to it ([`Self::tick`]). Cheap to clone.
#[derive(Clone)]
pub struct Following {
    options: FollowOptions,
    client: Client,
    lease_key: String,
    /// Until when this replica's follower holds the lease, as it last saw it.
    held_until: Arc<std::sync::Mutex<Option<Instant>>>,
}

impl Following {
    pub fn new(drain: &CouponDrain, options: FollowOptions) -> Self {
        Self {
            options,
            client: drain.client().clone(),
            lease_key: drain.keys().follow_lease(),
            held_until: Arc::default(),
        }
    }

    fn set_held_until(&self, until: Option<Instant>) {
        if let Ok(mut held) = self.held_until.lock() {
            *held = until;
        }
    }

    /// Whether this replica's follower holds the lease now (no Redis call).
    fn following_here(&self) -> bool {
        self.held_until
            .lock()
            .ok()
            .and_then(|held| *held)
            .is_some_and(|until| Instant::now() < until)
    }

    /// Whether a follower — this replica's (no Redis call) or another's (one `EXISTS`) —
    /// follows the queue(s) now.
    pub async fn someone_follows(&self) -> anyhow::Result<bool> {
        if self.following_here() {
            return Ok(true);
        }
        let n: u64 = self.client.exists(&self.lease_key).await?;
        Ok(n > 0)
    }

    /// The scheduled tick while following is on: a paused drain is reported as such; while a
    /// follower drains (here or on another replica) the tick does nothing and returns `None`
    /// (it would read the same entries); otherwise it ticks as without following — the floor —
    /// and hands over (stops after its current batch, [`StopReason::HandedOver`]) as soon as a
    /// follower appears, looking for one every third of the lease.
    pub async fn tick(
        &self,
        drain: &CouponDrain,
        budget: Duration,
        stop: &CancellationToken,
    ) -> anyhow::Result<Option<DrainReport>> {
        if drain.drain_paused().await? {
            return Ok(Some(DrainReport {
                stopped: StopReason::Paused,
                ..DrainReport::default()
            }));
        }
        if self.someone_follows().await? {
            return Ok(None);
        }
        let handover = stop.child_token();
        let done = CancellationToken::new();
        let watch = async {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(self.options.lease / 3) => {}
                    _ = done.cancelled() => return,
                }
                if matches!(self.someone_follows().await, Ok(true)) {
                    handover.cancel();
                    return;
                }
            }
        };
        let run = async {
            let report = drain.tick(budget, &handover).await;
            done.cancel();
            report
        };
        let (report, ()) = tokio::join!(run, watch);
        let mut report = report?;
        if report.stopped == StopReason::ShutdownRequested && !stop.is_cancelled() {
            report.stopped = StopReason::HandedOver;
        }
        Ok(Some(report))
    }

    /// Follows the queue until `stop` fires. `gate` is the scheduled tick's run lock: a step and
    /// a tick of the same replica never run at once. Runs are recorded as runs of the drain job
    /// (metrics, and the run record `status` reads) at most once a second while deciding and
    /// every five seconds while idle, so a drain busy following — or idly following while the
    /// ticks give way — never looks stale; errors and failing lanes are recorded as they happen.
    /// Every look is counted (`coupon_follow_polls_total`). A pause (`commerce-worker pause
    /// --drain`) is honoured by each step that finds work.
    pub async fn follow(
        &self,
        drain: CouponDrain,
        gate: Arc<tokio::sync::Mutex<()>>,
        stop: CancellationToken,
    ) {
        let options = self.options;
        let mut lease = Lease::new(
            drain.client().clone(),
            self.lease_key.clone(),
            options.lease,
            "follows the coupon queue",
        );
        let metrics = drain.metrics().clone();
        let mut failures = 0u32;
        // Empty polls in a row since the last one that found work; starts idle.
        let mut quiet = u32::MAX;
        // One INFO line per few seconds with what following decided, not one per poll.
        let mut summary = DrainReport::default();
        let mut summary_since = Instant::now();
        let mut last_recorded: Option<Instant> = None;
        loop {
            if stop.is_cancelled() {
                break;
            }
            let mut worked = false;
            match self.hold(&mut lease).await {
                Ok(true) => {
                    let guard = tokio::select! {
                        guard = gate.lock() => guard,
                        _ = stop.cancelled() => break,
                    };
                    // The gate may have been held by a tick for a while: still the follower?
                    if !matches!(self.hold(&mut lease).await, Ok(true)) {
                        continue;
                    }
                    metrics.coupon_follow_polls.inc();
                    let started_at = chrono::Utc::now();
                    let started = Instant::now();
                    let result = drain.step(options.step_budget(), &stop).await;
                    drop(guard);
                    match result {
                        Ok(report) => {
                            failures = 0;
                            worked = report.decided() > 0 || report[super::Outcome::Gone] > 0;
                            let (label, error) = match (&report.lane_error, report.stopped) {
                                (Some(e), _) => ("error", Some(e.clone())),
                                (None, StopReason::Paused) => ("paused", None),
                                (None, _) => ("ok", None),
                            };
                            let every = if worked {
                                RECORD_EVERY
                            } else {
                                IDLE_RECORD_EVERY
                            };
                            // The shared run record is a Redis write: throttled.
                            if error.is_some()
                                || last_recorded.is_none_or(|at| at.elapsed() >= every)
                            {
                                last_recorded = Some(Instant::now());
                                control::record_run(
                                    &metrics,
                                    Some(&drain.control),
                                    "coupon_drain",
                                    started_at,
                                    started.elapsed(),
                                    label,
                                    error,
                                )
                                .await;
                            }
                            if worked {
                                summary.absorb(&report);
                            }
                            // Entries left (budget spent): the next step goes at once.
                            if report.stopped == StopReason::BudgetSpent {
                                worked = true;
                            }
                        }
                        Err(e) => {
                            failures = failures.saturating_add(1);
                            control::record_run(
                                &metrics,
                                Some(&drain.control),
                                "coupon_drain",
                                started_at,
                                started.elapsed(),
                                "error",
                                Some(format!("{e:#}")),
                            )
                            .await;
                            tracing::warn!(error = %format!("{e:#}"), "following the coupon queue failed; retrying");
                        }
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(error = %format!("{e:#}"), "checking the follow lease failed; retrying");
                }
            }
            if summary_since.elapsed() >= SUMMARY_EVERY {
                if summary.decided() > 0 || summary[super::Outcome::Gone] > 0 {
                    summary.elapsed = summary_since.elapsed();
                    summary.log("coupon drain followed the queue");
                }
                summary = DrainReport::default();
                summary_since = Instant::now();
            }
            quiet = if worked { 0 } else { quiet.saturating_add(1) };
            let wait = if failures > 0 {
                // After failures, wait longer (Redis may be down), but within a third of the
                // lease: a follower that recovers keeps it.
                options
                    .poll_interval
                    .saturating_mul(1 << failures.min(8))
                    .min((options.lease / 3).max(options.poll_interval))
            } else {
                options.wait_after(quiet)
            };
            if wait.is_zero() {
                // Let the runtime's other tasks (the persister, the log reader) in.
                tokio::task::yield_now().await;
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.cancelled() => break,
            }
        }
        self.set_held_until(None);
        lease.release().await;
    }

    /// [`FollowLease::hold`], publishing the answer to this replica's scheduled ticks.
    async fn hold(&self, lease: &mut Lease) -> anyhow::Result<bool> {
        let held = lease.hold().await;
        self.set_held_until(lease.held_until());
        held
    }
}

/// Follows the queue until `stop` fires (see [`Following::follow`]); this replica's scheduled
/// ticks, if any, must go through the same [`Following`] to give way to it.
pub async fn follow(
    drain: CouponDrain,
    options: FollowOptions,
    gate: Arc<tokio::sync::Mutex<()>>,
    stop: CancellationToken,
) {
    Following::new(&drain, options)
        .follow(drain, gate, stop)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_a_poll_that_found_work_the_waits_grow_from_one_millisecond_to_the_interval() {
        let options = FollowOptions {
            poll_interval: Duration::from_millis(30),
            budget: Duration::from_secs(4),
            lease: Duration::from_secs(2),
        };
        let waits: Vec<u64> = (0..8)
            .map(|quiet| options.wait_after(quiet).as_millis() as u64)
            .collect();
        assert_eq!(waits, [0, 1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(options.wait_after(u32::MAX), Duration::from_millis(30));
    }

    #[test]
    fn a_step_never_outlives_a_third_of_the_lease() {
        let options = FollowOptions {
            poll_interval: Duration::from_millis(30),
            budget: Duration::from_secs(4),
            lease: Duration::from_secs(2),
        };
        assert_eq!(options.step_budget(), Duration::from_secs(2) / 3);
        let short = FollowOptions {
            budget: Duration::from_millis(100),
            ..options
        };
        assert_eq!(short.step_budget(), Duration::from_millis(100));
    }
}
