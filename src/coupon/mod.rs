//! The coupon drain (docs/contract.md §2): every queued request decided once, every issued coupon
//! persisted once.
//!
//! Data flow for one batch:
//!
//! ```text
//! coupon:queue ──ZRANGE head──▶ Decider ──EVALSHA decide.lua (atomic)──▶ outcomes
//!                                             │ removes entries from the queue
//!                                             │ stock, issued set, seq, result hash
//!                                             │ dead-letter stream (undecidable entries)
//!                                             └ outbox ZSET (issued coupons)
//! outcomes ──▶ ranking log channel (never waits)
//! outbox ──Persister: INSERT … ON DUPLICATE KEY, then ZREM──▶ user_coupon
//! ```
//!
//! [`CouponDrain::tick`] is one unit of work: batches until the queue is empty, the tick's budget
//! is spent or shutdown is requested — checked only between batches, so a claimed batch is never
//! abandoned half-way. The schedule lives in `app`; tests call `tick` directly.

mod dead;
mod decide;
pub(crate) mod member;
mod outbox;
pub mod reconcile;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use fred::prelude::*;
use sqlx::MySqlPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use crate::outcome::Outcome;
pub use dead::{
    DeadAction, DeadEntry, DeadFilter, DeadReport, RequeueReport, process_dead, requeue_dead,
};
pub use decide::{Decider, Decision};
pub use outbox::Persister;
pub use reconcile::Reconciler;

use crate::control::Control;
use crate::keys::KeyTemplates;
use crate::metrics::Metrics;
use crate::outcome::OutcomeCounts;
use crate::ranking_log::{LogRow, LogSender};
use crate::retry::Backoff;

/// Why a tick stopped taking batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StopReason {
    #[default]
    QueueEmpty,
    BudgetSpent,
    ShutdownRequested,
    /// An operator paused the drain (`commerce-worker pause --drain`).
    Paused,
}

/// What one tick (or one `drain` command) did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Entries by outcome (`report[Outcome::Issued]`); `Gone`: another replica decided them
    /// between our read and our script.
    pub outcomes: OutcomeCounts,
    pub batches: u64,
    pub stopped: StopReason,
    /// Queue length after the tick.
    pub queue_depth: u64,
    pub elapsed: Duration,
}

impl DrainReport {
    /// Requests decided here (every outcome but `Gone`).
    pub fn decided(&self) -> u64 {
        self.outcomes.decided()
    }

    /// Adds another report's counts to these.
    fn add_counts(&mut self, other: &DrainReport) {
        self.outcomes += &other.outcomes;
        self.batches += other.batches;
    }

    /// Adds a later tick's counts to these (depth and stop reason: the later tick's).
    pub fn absorb(&mut self, other: &DrainReport) {
        self.add_counts(other);
        self.queue_depth = other.queue_depth;
        self.stopped = other.stopped;
    }
}

impl std::ops::Index<Outcome> for DrainReport {
    type Output = u64;

    fn index(&self, outcome: Outcome) -> &u64 {
        &self.outcomes[outcome]
    }
}

/// `1200 decided in 0.35s (… issued, …; 0 taken by other replicas); queue left: 0`.
impl std::fmt::Display for DrainReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} decided in {:.2}s ({}); queue left: {}",
            self.decided(),
            self.elapsed.as_secs_f64(),
            self.outcomes,
            self.queue_depth
        )
    }
}

/// Outboxes persisted at once in the per-coupon layout: enough to keep MySQL busy, well under
/// the pool (`[mysql] max_connections`, 8 by default) shared with the log writer.
const PARALLEL_PERSISTS: usize = 4;

/// How stale this replica's copy of the pause flags may be: a `pause` takes effect within this
/// long (one Redis read per interval, however many lanes ask).
pub const PAUSE_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// One queue with its decider and persister: the whole drain in the single-queue layout, one
/// coupon's share in the per-coupon layout.
#[derive(Clone)]
struct Lane {
    queue_key: String,
    decider: Decider,
    persister: Persister,
    reconciler: Reconciler,
}

impl Lane {
    /// Persists the lane's outbox until empty, reconciling Redis first if it refuses.
    async fn persist_all(&self) -> anyhow::Result<usize> {
        match self.persister.persist_all().await {
            Err(e) if reconcile::is_unreconciled(&e) => {
                self.reconciler.ensure().await?;
                self.persister.persist_all().await
            }
            other => other,
        }
    }
}

/// Reconciliations one lane may start in one tick before the tick gives up (Redis that keeps
/// restarting): the next tick tries again.
const RECONCILES_PER_TICK: usize = 3;

/// Where the queues are.
#[derive(Clone)]
enum Layout {
    /// One queue for every coupon (`coupon:queue`).
    Single(Box<Lane>),
    /// One queue per coupon, the coupons listed in the registry set; lanes made on first sight.
    PerCoupon {
        lanes: Arc<std::sync::Mutex<BTreeMap<i64, Lane>>>,
        /// Coupons with an outbox key though the registry no longer lists them (retired while
        /// issued coupons were still waiting for MySQL), and when they were last looked for.
        unlisted: Arc<std::sync::Mutex<(Option<Instant>, Vec<i64>)>>,
    },
}

/// How often the per-coupon layout looks for outboxes of coupons no longer in the registry (a
/// SCAN of every primary).
const UNLISTED_SCAN_INTERVAL: Duration = Duration::from_secs(10);

/// The coupons of the per-coupon layout: the readable ids in `coupon_registry`.
pub async fn registered_coupons(client: &Client, keys: &KeyTemplates) -> anyhow::Result<Vec<i64>> {
    let members: Vec<String> = client.smembers(&keys.coupon_registry).await?;
    Ok(members.iter().filter_map(|m| member::parse_id(m)).collect())
}

/// The key sets of every queue: the templates themselves in the single-queue layout, one
/// [`KeyTemplates::for_coupon`] per registered coupon in the per-coupon layout.
pub async fn queue_keys(client: &Client, keys: &KeyTemplates) -> anyhow::Result<Vec<KeyTemplates>> {
    if !keys.per_coupon() {
        return Ok(vec![keys.clone()]);
    }
    Ok(registered_coupons(client, keys)
        .await?
        .into_iter()
        .map(|id| keys.for_coupon(id))
        .collect())
}

/// Everything the drain needs, cheap to clone.
#[derive(Clone)]
pub struct CouponDrain {
    client: Client,
    pool: MySqlPool,
    keys: KeyTemplates,
    batch_size: usize,
    layout: Layout,
    log: LogSender,
    metrics: Metrics,
    /// The pause flags every replica honours.
    control: Control,
    /// Wakes the persister when a batch issued coupons.
    outbox_ready: Arc<Notify>,
}

impl CouponDrain {
    pub fn new(
        client: Client,
        pool: MySqlPool,
        keys: &KeyTemplates,
        batch_size: usize,
        log: LogSender,
        metrics: Metrics,
    ) -> Self {
        let control = Control::new(client.clone(), keys, metrics.clone());
        let mut drain = Self {
            control,
            client,
            pool,
            keys: keys.clone(),
            batch_size,
            layout: Layout::PerCoupon {
                lanes: Arc::default(),
                unlisted: Arc::default(),
            },
            log,
            metrics,
            outbox_ready: Arc::new(Notify::new()),
        };
        if !keys.per_coupon() {
            drain.layout = Layout::Single(Box::new(drain.lane(None)));
        }
        drain
    }

    fn lane(&self, coupon_id: Option<i64>) -> Lane {
        let keys = match coupon_id {
            Some(id) => self.keys.for_coupon(id),
            None => self.keys.clone(),
        };
        Lane {
            queue_key: keys.queue.clone(),
            persister: Persister::new(
                self.client.clone(),
                self.pool.clone(),
                keys.outbox.clone(),
                keys.reconciled_marker(),
                outbox::ROWS_PER_INSERT,
                self.metrics.clone(),
            ),
            reconciler: Reconciler::new(
                self.client.clone(),
                self.pool.clone(),
                keys.clone(),
                coupon_id,
                self.metrics.clone(),
            ),
            decider: Decider::new(self.client.clone(), keys, self.batch_size, coupon_id),
        }
    }

    /// The lanes to work on now: the single queue, or one per coupon in the registry.
    async fn lanes(&self) -> anyhow::Result<Vec<Lane>> {
        match &self.layout {
            Layout::Single(lane) => Ok(vec![(**lane).clone()]),
            Layout::PerCoupon { .. } => {
                let ids = registered_coupons(&self.client, &self.keys).await?;
                self.coupon_lanes(ids)
            }
        }
    }

    /// The per-coupon lanes of `ids`, made on first sight.
    fn coupon_lanes(&self, ids: Vec<i64>) -> anyhow::Result<Vec<Lane>> {
        let Layout::PerCoupon { lanes, .. } = &self.layout else {
            return Ok(Vec::new());
        };
        let mut known = lanes
            .lock()
            .map_err(|_| anyhow::anyhow!("lane cache poisoned"))?;
        Ok(ids
            .into_iter()
            .map(|id| {
                known
                    .entry(id)
                    .or_insert_with(|| self.lane(Some(id)))
                    .clone()
            })
            .collect())
    }

    /// The lanes whose outboxes must be persisted: [`lanes`](Self::lanes), and in the per-coupon
    /// layout every coupon with an outbox key whatever the registry says now — a coupon retired
    /// while MySQL was down still has issued coupons to persist. Outbox keys are looked for with
    /// SCAN on every primary at most every [`UNLISTED_SCAN_INTERVAL`].
    async fn outbox_lanes(&self) -> anyhow::Result<Vec<Lane>> {
        let mut lanes = self.lanes().await?;
        let Layout::PerCoupon { unlisted, .. } = &self.layout else {
            return Ok(lanes);
        };
        let due = {
            let guard = unlisted
                .lock()
                .map_err(|_| anyhow::anyhow!("unlisted coupons poisoned"))?;
            guard
                .0
                .is_none_or(|at| at.elapsed() >= UNLISTED_SCAN_INTERVAL)
        };
        let listed: std::collections::BTreeSet<i64> =
            lanes.iter().filter_map(|l| l.decider.coupon()).collect();
        let ids = if due {
            let found: Vec<i64> =
                crate::backends::scan_keys(&self.client, &self.keys.outbox_pattern())
                    .await?
                    .iter()
                    .filter_map(|key| self.keys.coupon_of_outbox(key))
                    .filter(|id| !listed.contains(id))
                    .collect();
            if !found.is_empty() {
                tracing::info!(coupons = ?found,
                    "outboxes of coupons no longer in the registry; persisting them until empty");
            }
            let mut guard = unlisted
                .lock()
                .map_err(|_| anyhow::anyhow!("unlisted coupons poisoned"))?;
            *guard = (Some(Instant::now()), found.clone());
            found
        } else {
            let guard = unlisted
                .lock()
                .map_err(|_| anyhow::anyhow!("unlisted coupons poisoned"))?;
            guard
                .1
                .iter()
                .copied()
                .filter(|id| !listed.contains(id))
                .collect()
        };
        lanes.extend(self.coupon_lanes(ids)?);
        Ok(lanes)
    }

    /// Issued coupons waiting in the outbox(es).
    pub async fn outbox_depth(&self) -> anyhow::Result<u64> {
        let mut depth = 0;
        for lane in self.outbox_lanes().await? {
            depth += lane.persister.depth().await?;
        }
        self.metrics.coupon_outbox_depth.set(depth as i64);
        Ok(depth)
    }

    /// Compares every lane's Redis with `user_coupon` and, unless `dry_run`, repairs Redis and
    /// marks it reconciled (the `reconcile` command; see [`reconcile`]). In the per-coupon
    /// layout, every coupon in the registry or in MySQL.
    pub async fn reconcile_all(&self, dry_run: bool) -> anyhow::Result<Vec<reconcile::LaneReport>> {
        let mut lanes = self.lanes().await?;
        if let Layout::PerCoupon { .. } = self.layout {
            let known: std::collections::BTreeSet<i64> = lanes
                .iter()
                .filter_map(|lane| lane.decider.coupon())
                .collect();
            for id in reconcile::coupons_in_mysql(&self.pool).await? {
                if !known.contains(&id) {
                    lanes.push(self.lane(Some(id)));
                }
            }
        }
        let mut reports = Vec::with_capacity(lanes.len());
        for lane in lanes {
            reports.push(lane.reconciler.reconcile(dry_run).await?);
        }
        Ok(reports)
    }

    /// Persists every outbox until empty; returns how many entries. Per coupon, up to
    /// `PARALLEL_PERSISTS` outboxes at once (different shards, different MySQL connections).
    pub async fn persist_all(&self) -> anyhow::Result<usize> {
        use futures_util::{StreamExt, TryStreamExt};
        if self.control.paused(PAUSE_CHECK_INTERVAL).await?.persist {
            return Ok(0);
        }
        futures_util::stream::iter(self.outbox_lanes().await?)
            .map(|lane| async move { lane.persist_all().await })
            .buffer_unordered(PARALLEL_PERSISTS)
            .try_fold(0, |total, n| async move { Ok(total + n) })
            .await
    }

    /// One tick: every lane (concurrently: per-coupon queues live on different shards of a
    /// cluster) decides batches until its queue is empty, `budget` is spent, or `stop` fires.
    #[tracing::instrument(name = "coupon_drain", skip_all)]
    pub async fn tick(
        &self,
        budget: Duration,
        stop: &CancellationToken,
    ) -> anyhow::Result<DrainReport> {
        let started = Instant::now();
        if self.control.paused(PAUSE_CHECK_INTERVAL).await?.drain {
            return Ok(DrainReport {
                stopped: StopReason::Paused,
                elapsed: started.elapsed(),
                ..DrainReport::default()
            });
        }
        let lanes = self.lanes().await?;
        let results = futures_util::future::join_all(
            lanes
                .iter()
                .map(|lane| self.tick_lane(lane, started, budget, stop)),
        )
        .await;
        let mut report = DrainReport::default();
        let mut depth = 0;
        let mut first_error = None;
        for result in results {
            match result {
                Ok(lane_report) => {
                    report.add_counts(&lane_report);
                    depth += lane_report.queue_depth;
                    // Empty only when every lane is; otherwise why a lane stopped early.
                    if report.stopped == StopReason::QueueEmpty {
                        report.stopped = lane_report.stopped;
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        report.queue_depth = depth;
        report.elapsed = started.elapsed();
        self.metrics.coupon_queue_depth.set(depth as i64);
        if report.decided() > 0 || report[Outcome::Gone] > 0 {
            tracing::info!(
                outcomes = %report.outcomes,
                batches = report.batches,
                queue_depth = report.queue_depth,
                lanes = lanes.len(),
                stopped = ?report.stopped,
                elapsed_ms = report.elapsed.as_millis() as u64,
                "coupon drain tick"
            );
        }
        Ok(report)
    }

    /// One lane's share of a tick.
    async fn tick_lane(
        &self,
        lane: &Lane,
        started: Instant,
        budget: Duration,
        stop: &CancellationToken,
    ) -> anyhow::Result<DrainReport> {
        let mut report = DrainReport::default();
        // The next batch's head, read in the same round trip as the previous batch's script.
        let mut next_head = None;
        // Decisions of the previous batch, recorded while Redis runs the next batch's script.
        let mut pending: Vec<Decision> = Vec::new();
        let mut reconciles = 0;
        let outcome = loop {
            if stop.is_cancelled() {
                report.stopped = StopReason::ShutdownRequested;
                break Ok(());
            }
            if started.elapsed() >= budget {
                report.stopped = StopReason::BudgetSpent;
                break Ok(());
            }
            // Cached: asks Redis at most once per PAUSE_CHECK_INTERVAL for all lanes.
            match self.control.paused(PAUSE_CHECK_INTERVAL).await {
                Ok(paused) if paused.drain => {
                    report.stopped = StopReason::Paused;
                    break Ok(());
                }
                Ok(_) => {}
                Err(e) => break Err(e),
            }
            let batch_started = Instant::now();
            let head = match next_head.take() {
                Some(head) => head,
                None => match lane.decider.read_head().await {
                    Ok(head) => head,
                    Err(e) => break Err(e),
                },
            };
            let previous = std::mem::take(&mut pending);
            // `join!` polls the script first: its request is on the wire before the previous
            // batch's bookkeeping (log rows, metrics) takes the CPU.
            let (decided, ()) = tokio::join!(lane.decider.decide_head(head, true), async {
                self.record(&previous, &mut report)
            });
            let (decisions, next) = match decided {
                Ok(decided) => decided,
                // Redis is not the one last reconciled: nothing was decided; reconcile from
                // MySQL and read the head again.
                Err(e) if reconcile::is_unreconciled(&e) && reconciles < RECONCILES_PER_TICK => {
                    reconciles += 1;
                    if let Err(e) = lane.reconciler.ensure().await {
                        break Err(e.context("reconciling Redis from MySQL"));
                    }
                    continue;
                }
                Err(e) => break Err(e),
            };
            next_head = next;
            if decisions.is_empty() {
                report.stopped = StopReason::QueueEmpty;
                break Ok(());
            }
            self.metrics
                .coupon_batch_duration
                .observe(batch_started.elapsed().as_secs_f64());
            report.batches += 1;
            pending = decisions;
        };
        // Whatever happened, what was decided is counted and logged.
        self.record(&pending, &mut report);
        outcome?;
        report.queue_depth = self.client.zcard(&lane.queue_key).await?;
        Ok(report)
    }

    /// Counts outcomes, updates metrics and hands one log row per decided request to the
    /// ranking log.
    fn record(&self, decisions: &[Decision], report: &mut DrainReport) {
        if decisions.is_empty() {
            return;
        }
        let now = Utc::now();
        let mut batch = DrainReport::default();
        let mut rows = Vec::with_capacity(decisions.len());
        for decision in decisions {
            batch.outcomes[decision.outcome] += 1;
            // A dead-lettered entry gets its row when requeued and decided; a gone one from the
            // replica that decided it.
            if decision.outcome.row_name().is_none() {
                continue;
            }
            if let Some(request) = decision.request {
                tracing::debug!(member = %decision.member, outcome = decision.outcome.label(), rank = decision.rank, "decided");
                rows.push(LogRow {
                    user_id: request.user_id,
                    coupon_id: request.coupon_id,
                    rank: decision.rank,
                    outcome: decision.outcome,
                    decided_at: now,
                    retry_count: 0,
                });
            }
        }
        // One metric update per outcome and batch, not per entry.
        for (outcome, count) in batch.outcomes.iter() {
            if count > 0 && outcome.is_decided() {
                self.metrics.outcome(outcome.label()).inc_by(count);
            }
        }
        if batch[Outcome::Issued] > 0 {
            self.outbox_ready.notify_one();
        }
        report.add_counts(&batch);
        self.log.send(rows);
    }

    /// The persister as a long-running task: persists whenever the outbox has entries, retries
    /// MySQL or Redis outages with backoff, and on `stop` makes a last attempt to empty the
    /// outbox before returning (entries left are persisted by the next start or a replica).
    pub async fn run_persister(&self, stop: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        loop {
            match self.persist_all().await {
                Ok(0) => {
                    let _ = self.outbox_depth().await;
                    tokio::select! {
                        _ = self.outbox_ready.notified() => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.cancelled() => break,
                    }
                }
                Ok(_) => {
                    backoff.reset();
                    if stop.is_cancelled() {
                        break;
                    }
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %format!("{e:#}"), retry_in_ms = delay.as_millis() as u64,
                        "persisting issued coupons failed; they stay in the outbox and will be retried");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            }
        }
        match self.persist_all().await {
            Ok(n) if n > 0 => tracing::info!(rows = n, "outbox flushed at shutdown"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %format!("{e:#}"),
                "outbox not flushed at shutdown; the next start or another replica will persist it"),
        }
    }

    /// The `drain` command: decides until the queue is empty and persists until the outbox is
    /// empty, retrying outages until both are done or `stop` fires.
    pub async fn drain_to_empty(&self, stop: &CancellationToken) -> DrainReport {
        let started = Instant::now();
        let persister_stop = CancellationToken::new();
        let persisting = {
            let drain = self.clone();
            let persister_stop = persister_stop.clone();
            tokio::spawn(async move { drain.run_persister(persister_stop).await })
        };
        let mut total = DrainReport::default();
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            match self.tick(Duration::MAX, stop).await {
                Ok(report) => {
                    total.absorb(&report);
                    if report.stopped != StopReason::BudgetSpent {
                        break;
                    }
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %format!("{e:#}"), retry_in_ms = delay.as_millis() as u64,
                        "drain batch failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.cancelled() => break,
                    }
                }
            }
        }
        // Wait for the outbox to empty (MySQL may be down: the persister keeps retrying), unless
        // an operator paused persisting.
        loop {
            if let Ok(0) = self.outbox_depth().await {
                break;
            }
            if let Ok(paused) = self.control.paused(PAUSE_CHECK_INTERVAL).await
                && paused.persist
            {
                tracing::warn!("persisting is paused; issued coupons stay in the outbox");
                break;
            }
            self.outbox_ready.notify_one();
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = stop.cancelled() => break,
            }
        }
        persister_stop.cancel();
        let _ = persisting.await;
        total.elapsed = started.elapsed();
        total
    }
}
