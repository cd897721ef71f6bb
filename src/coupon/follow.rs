//! Following the queue between ticks (`[coupon] poll_interval_ms`): a request is decided within
//! a poll interval of its arrival instead of at the next scheduled tick.
//!
//! Each poll is one [`CouponDrain::tick`]: it looks at the queue head (single queue) or the
//! active set (per coupon) — one Redis command when there is nothing to do — and decides batch
//! after batch while entries keep coming. The scheduled tick stays the floor: it runs whether or
//! not anyone follows.
//!
//! One replica follows at a time: the follower holds a short lease ([`FollowLease`], a
//! `SET NX PX` key renewed while it follows); the others look at the lease every third of its
//! life and take over when it lapses (a dead follower is replaced within ~1.3 leases, and the
//! scheduled ticks go on meanwhile). The lease only saves Redis work: deciding stays safe with
//! any number of drainers, because the decide script's removal of an entry is its claim.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::prelude::*;
use fred::types::scripts::Script;
use tokio_util::sync::CancellationToken;

use super::{CouponDrain, StopReason};

/// How a lease is renewed: only by its holder (`ARGV[1]` = its token), for `ARGV[2]` ms.
const RENEW_LUA: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
     return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end";
/// Releasing at shutdown: only by its holder, so a successor's lease is never deleted.
const RELEASE_LUA: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
     return redis.call('DEL', KEYS[1]) else return 0 end";

/// The default lease: long enough that renewing it costs little, short enough that a dead
/// follower's successor takes over within about three seconds.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(2);

/// The right to follow the queue(s), held by one replica at a time.
pub struct FollowLease {
    client: Client,
    key: String,
    token: String,
    ttl: Duration,
    renew: Script,
    /// While held: when to renew. While not: when to try to take it again.
    next_check: Option<Instant>,
    held: bool,
}

impl FollowLease {
    pub fn new(client: Client, key: String, ttl: Duration) -> Self {
        Self {
            client,
            key,
            token: uuid::Uuid::new_v4().to_string(),
            ttl,
            renew: Script::from_lua(RENEW_LUA),
            next_check: None,
            held: false,
        }
    }

    /// Whether this replica follows now. Asks Redis only every third of the lease (to renew
    /// it, or to try to take it), so it costs ~1.5 commands a second whoever holds it. A reply
    /// resent after a reconnect is harmless: a second `SET NX` fails and this replica waits for
    /// its own lease to lapse, which costs one lease of following, never a wrong decision.
    pub async fn hold(&mut self) -> anyhow::Result<bool> {
        let now = Instant::now();
        if self.next_check.is_some_and(|at| now < at) {
            return Ok(self.held);
        }
        let ttl_ms = self.ttl.as_millis().max(1) as i64;
        if self.held {
            let renewed: i64 = self
                .renew
                .evalsha_with_reload(
                    &self.client,
                    vec![self.key.clone()],
                    vec![self.token.clone(), ttl_ms.to_string()],
                )
                .await?;
            self.held = renewed == 1;
        }
        if !self.held {
            let taken: Option<String> = self
                .client
                .set(
                    &self.key,
                    &self.token,
                    Some(Expiration::PX(ttl_ms)),
                    Some(SetOptions::NX),
                    false,
                )
                .await?;
            self.held = taken.is_some();
            if self.held {
                tracing::info!(lease = %self.key, "this replica now follows the coupon queue");
            }
        }
        self.next_check = Some(now + self.ttl / 3);
        Ok(self.held)
    }

    /// [`Self::hold`] asking Redis now, whenever it last asked.
    pub async fn hold_now(&mut self) -> anyhow::Result<bool> {
        self.next_check = None;
        self.hold().await
    }

    /// Gives the lease up (at shutdown), so another replica takes over at once.
    pub async fn release(&mut self) {
        if !self.held {
            return;
        }
        self.held = false;
        let released: Result<i64, _> = Script::from_lua(RELEASE_LUA)
            .evalsha_with_reload(
                &self.client,
                vec![self.key.clone()],
                vec![self.token.clone()],
            )
            .await;
        if let Err(e) = released {
            tracing::debug!(error = %e, "follow lease not released; it lapses by itself");
        }
    }
}

/// How often following logs what it decided.
const SUMMARY_EVERY: Duration = Duration::from_secs(5);

/// How often a busy follower records its runs in Redis for `status`.
const RECORD_EVERY: Duration = Duration::from_secs(1);

/// How to follow.
#[derive(Debug, Clone, Copy)]
pub struct FollowOptions {
    /// Time between looks at an idle queue.
    pub poll_interval: Duration,
    /// A step's time budget (`[coupon] tick_budget_ms`).
    pub budget: Duration,
    pub lease: Duration,
}

/// Follows the queue until `stop` fires. `gate` is the scheduled tick's run lock: a step and a
/// tick of the same replica never run at once (they would read the same head). Steps that
/// decided something, or failed, are recorded as runs of the drain job (metrics, and the run
/// record `status` reads), so a drain busy following never looks stale; idle looks are only
/// counted (`coupon_follow_polls_total`). A pause (`commerce-worker pause --drain`) is honoured
/// by each step.
pub async fn follow(
    drain: CouponDrain,
    options: FollowOptions,
    gate: Arc<tokio::sync::Mutex<()>>,
    stop: CancellationToken,
) {
    let mut lease = FollowLease::new(
        drain.client().clone(),
        drain.keys().follow_lease(),
        options.lease,
    );
    let metrics = drain.metrics().clone();
    let mut failures = 0u32;
    // One INFO line per few seconds with what following decided, not one per poll.
    let mut summary = super::DrainReport::default();
    let mut summary_since = Instant::now();
    let mut last_recorded: Option<Instant> = None;
    loop {
        if stop.is_cancelled() {
            break;
        }
        let mut again = false;
        match lease.hold().await {
            Ok(true) => {
                let guard = tokio::select! {
                    guard = gate.lock() => guard,
                    _ = stop.cancelled() => break,
                };
                metrics.coupon_follow_polls.inc();
                let started_at = chrono::Utc::now();
                let started = Instant::now();
                let result = drain.step(options.budget, &stop).await;
                drop(guard);
                match result {
                    Ok(report) => {
                        failures = 0;
                        if report.decided() > 0 || report[super::Outcome::Gone] > 0 {
                            metrics.record_run("coupon_drain", started.elapsed(), "ok");
                            // The shared run record is a Redis write: once a second at most.
                            if last_recorded.is_none_or(|at| at.elapsed() >= RECORD_EVERY) {
                                last_recorded = Some(Instant::now());
                                drain
                                    .control
                                    .record_run(
                                        "coupon_drain",
                                        started_at,
                                        started.elapsed(),
                                        "ok",
                                        None,
                                    )
                                    .await;
                            }
                            summary.absorb(&report);
                        }
                        // Entries left (budget spent): the next step goes at once.
                        again = report.stopped == StopReason::BudgetSpent;
                    }
                    Err(e) => {
                        failures = failures.saturating_add(1);
                        metrics.record_run("coupon_drain", started.elapsed(), "error");
                        drain
                            .control
                            .record_run(
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
            summary = super::DrainReport::default();
            summary_since = Instant::now();
        }
        if again {
            continue;
        }
        // After failures, wait longer (Redis may be down), up to 5 s.
        let wait = options
            .poll_interval
            .saturating_mul(1 << failures.min(8))
            .min(Duration::from_secs(5).max(options.poll_interval));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => break,
        }
    }
    lease.release().await;
}
