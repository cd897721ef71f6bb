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
//!                                             ├ outbox ZSET (issued coupons)
//!                                             └ log STREAM (the batch's ranking-log rows)
//! outbox ──Persister: INSERT … ON DUPLICATE KEY, then ZREM──▶ user_coupon
//! log stream ──ranking-log pipeline (any replica)──▶ ranking_logs
//! ```
//!
//! [`CouponDrain::tick`] is one unit of work: batches until the queue is empty, the tick's budget
//! is spent or shutdown is requested — checked only between batches, so a claimed batch is never
//! abandoned half-way. The schedule lives in `app`; tests call `tick` directly.

mod dead;
mod decide;
mod follow;
pub(crate) mod member;
mod outbox;
pub mod reconcile;

use std::collections::{BTreeMap, BTreeSet};
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
pub use follow::{DEFAULT_LEASE, FollowLease, FollowOptions, follow};
pub use outbox::{Persister, ReplicaWait};
pub use reconcile::Reconciler;

use crate::control::Control;
use crate::keys::KeyTemplates;
use crate::metrics::Metrics;
use crate::outcome::OutcomeCounts;
use crate::retry::{self, Backoff};

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
    /// Queues worked on.
    pub lanes: u64,
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

    /// One INFO line with the counts.
    pub fn log(&self, message: &'static str) {
        tracing::info!(
            outcomes = %self.outcomes,
            batches = self.batches,
            queue_depth = self.queue_depth,
            lanes = self.lanes,
            stopped = ?self.stopped,
            elapsed_ms = self.elapsed.as_millis() as u64,
            "{message}"
        );
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

/// Now in epoch milliseconds, the unit of queue scores.
fn now_ms() -> f64 {
    chrono::Utc::now().timestamp_millis() as f64
}

/// Outboxes persisted at once in the per-coupon layout: enough to keep MySQL busy, well under
/// the pool (`[mysql] max_connections`, 8 by default) shared with the log writer.
const PARALLEL_PERSISTS: usize = 4;

/// How stale this replica's copy of the pause flags may be when it does not follow the queue: a
/// `pause` takes effect within this long (one Redis read per interval, however many lanes ask).
pub const PAUSE_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// One queue with its decider and persister: the whole drain in the single-queue layout, one
/// coupon's share in the per-coupon layout.
#[derive(Clone)]
struct Lane {
    queue_key: String,
    outbox_key: String,
    dead_key: String,
    decider: Decider,
    persister: Persister,
    reconciler: Reconciler,
}

impl Lane {
    /// Persists the lane's outbox until empty, reconciling Redis first if it refuses, or if
    /// MySQL's fence row is missing (see [`Reconciler::after_fence_mismatch`]).
    async fn persist_all(&self) -> anyhow::Result<usize> {
        match self.persister.persist_all().await {
            Err(e) if reconcile::is_unreconciled(&e) => {
                self.reconciler.ensure().await?;
                self.persister.persist_all().await
            }
            Err(e) => match e.downcast_ref::<outbox::FenceMismatch>() {
                Some(mismatch) => {
                    self.reconciler.after_fence_mismatch(mismatch).await?;
                    self.persister.persist_all().await
                }
                None => Err(e),
            },
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
    /// One queue per coupon: lanes with work are found in the active set, and every
    /// `sweep_interval` in the whole registry (for queues whose coupon the API did not mark).
    PerCoupon(Arc<PerCoupon>),
}

/// The per-coupon layout's state, shared by the drain's clones.
#[derive(Default)]
struct PerCoupon {
    /// Lanes made on first sight, by coupon.
    lanes: std::sync::Mutex<BTreeMap<i64, Lane>>,
    /// When the registry's queues were last swept.
    queues_swept: std::sync::Mutex<Option<Instant>>,
    /// When the registry's outboxes were last swept.
    outboxes_swept: std::sync::Mutex<Option<Instant>>,
    /// Coupons whose outbox had entries when last seen (issued here, or found by a sweep):
    /// the persister's work list between sweeps.
    outboxes: std::sync::Mutex<BTreeSet<i64>>,
}

/// Keys looked at concurrently in one go by a sweep (fred pipelines them on its connections).
const SWEEP_CHUNK: usize = 1000;

/// A lane the tick works on, and whether its coupon was in the active set (then the tick clears
/// the mark once the queue is empty).
struct LaneWork {
    coupon: Option<i64>,
    lane: Lane,
    marked: bool,
}

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
    /// Per-coupon layout: how often the whole registry is swept for queues and outboxes with
    /// entries that the active set does not show.
    sweep_interval: Duration,
    /// Wakes the ranking-log reader when a batch wrote log rows.
    log_ready: Arc<Notify>,
    metrics: Metrics,
    /// The pause flags every replica honours.
    control: Control,
    /// How stale this replica's copy of the pause flags may be (one poll interval when
    /// following, else [`PAUSE_CHECK_INTERVAL`]).
    pause_check: Duration,
    /// Wakes the persister when a batch issued coupons.
    outbox_ready: Arc<Notify>,
    /// `[redis] min_replicas_acked`, shared by every lane's persister.
    replicas: Arc<ReplicaWait>,
}

/// The default `[coupon] sweep_interval_secs`.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(10);

impl CouponDrain {
    pub fn new(
        client: Client,
        pool: MySqlPool,
        keys: &KeyTemplates,
        batch_size: usize,
        log_ready: Arc<Notify>,
        metrics: Metrics,
    ) -> Self {
        let control = Control::new(client.clone(), keys, metrics.clone());
        let replicas = Arc::new(ReplicaWait::new(client.clone(), 0, metrics.clone()));
        let mut drain = Self {
            control,
            client,
            pool,
            keys: keys.clone(),
            batch_size,
            layout: Layout::PerCoupon(Arc::default()),
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
            log_ready,
            metrics,
            outbox_ready: Arc::new(Notify::new()),
            replicas,
            pause_check: PAUSE_CHECK_INTERVAL,
        };
        if !keys.per_coupon() {
            drain.layout = Layout::Single(Box::new(drain.lane(None)));
        }
        drain
    }

    /// Sets how often the per-coupon layout sweeps the whole registry (default
    /// [`DEFAULT_SWEEP_INTERVAL`]).
    pub fn with_sweep_interval(mut self, interval: Duration) -> Self {
        self.sweep_interval = interval;
        self
    }

    /// A pause takes effect within `interval` (the poll interval when following the queue):
    /// the flags are read from Redis at most once per interval.
    pub fn with_pause_check(mut self, interval: Duration) -> Self {
        self.pause_check = interval;
        self
    }

    /// Makes the next look sweep the whole registry (per-coupon layout), as if the sweep
    /// interval had passed: how tests step the sweep without waiting for it.
    pub fn sweep_at_next_look(&self) {
        if let Layout::PerCoupon(state) = &self.layout {
            Self::undo_sweep(&state.queues_swept);
            Self::undo_sweep(&state.outboxes_swept);
        }
    }

    /// The metrics this drain reports to.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The Redis client the drain uses.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The key templates the drain uses.
    pub fn keys(&self) -> &KeyTemplates {
        &self.keys
    }

    /// `[redis] min_replicas_acked`: persist an issued coupon only once its decision reached
    /// `min` replicas (see [`ReplicaWait`]).
    pub fn with_min_replicas_acked(self, min: u32) -> Self {
        self.replicas.set_min(min);
        self
    }

    fn lane(&self, coupon_id: Option<i64>) -> Lane {
        let keys = match coupon_id {
            Some(id) => self.keys.for_coupon(id),
            None => self.keys.clone(),
        };
        Lane {
            queue_key: keys.queue.clone(),
            outbox_key: keys.outbox.clone(),
            dead_key: keys.dead.clone(),
            persister: Persister::new(
                self.client.clone(),
                self.pool.clone(),
                keys.outbox.clone(),
                keys.reconciled_marker(),
                outbox::ROWS_PER_INSERT,
                self.metrics.clone(),
                Arc::clone(&self.replicas),
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

    /// The cached lanes of `ids` (per-coupon layout).
    fn lanes_of(&self, state: &PerCoupon, ids: &[i64]) -> anyhow::Result<Vec<Lane>> {
        let mut known = state
            .lanes
            .lock()
            .map_err(|_| anyhow::anyhow!("lane cache poisoned"))?;
        Ok(ids
            .iter()
            .map(|&id| {
                known
                    .entry(id)
                    .or_insert_with(|| self.lane(Some(id)))
                    .clone()
            })
            .collect())
    }

    /// Every lane: the single queue, or one per coupon in the registry.
    async fn registered_lanes(&self) -> anyhow::Result<Vec<Lane>> {
        match &self.layout {
            Layout::Single(lane) => Ok(vec![(**lane).clone()]),
            Layout::PerCoupon(state) => {
                let ids = registered_coupons(&self.client, &self.keys).await?;
                self.lanes_of(state, &ids)
            }
        }
    }

    /// Whether a sweep last done at `*last` is due, and if so marks it done now (a failed
    /// sweep is retried at the next look: see [`Self::undo_sweep`]).
    fn sweep_due(&self, last: &std::sync::Mutex<Option<Instant>>) -> bool {
        let Ok(mut last) = last.lock() else {
            return true;
        };
        let due = last.is_none_or(|at| at.elapsed() >= self.sweep_interval);
        if due {
            *last = Some(Instant::now());
        }
        due
    }

    fn undo_sweep(last: &std::sync::Mutex<Option<Instant>>) {
        if let Ok(mut last) = last.lock() {
            *last = None;
        }
    }

    /// Of `keys`, the indexes of those whose ZCARD is not 0, asked [`SWEEP_CHUNK`] at a time.
    async fn non_empty(&self, keys: Vec<String>) -> anyhow::Result<Vec<usize>> {
        let mut found = Vec::new();
        for (chunk_index, chunk) in keys.chunks(SWEEP_CHUNK).enumerate() {
            let sizes = futures_util::future::try_join_all(
                chunk.iter().map(|key| self.client.zcard::<u64, _>(key)),
            )
            .await?;
            found.extend(
                sizes
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| **n > 0)
                    .map(|(i, _)| chunk_index * SWEEP_CHUNK + i),
            );
        }
        Ok(found)
    }

    /// The lanes to work on now. Single queue: the queue. Per coupon: the coupons in the active
    /// set, plus, when a sweep is due, every registered coupon whose queue has entries.
    async fn lanes_with_work(&self) -> anyhow::Result<Vec<LaneWork>> {
        let state = match &self.layout {
            Layout::Single(lane) => {
                return Ok(vec![LaneWork {
                    coupon: None,
                    lane: (**lane).clone(),
                    marked: false,
                }]);
            }
            Layout::PerCoupon(state) => state,
        };
        let members: Vec<String> = self.client.smembers(&self.keys.coupon_active).await?;
        let mut active: Vec<i64> = members.iter().filter_map(|m| member::parse_id(m)).collect();
        active.sort_unstable();
        let mut found = Vec::new();
        if self.sweep_due(&state.queues_swept) {
            let swept = async {
                let registered: Vec<i64> = registered_coupons(&self.client, &self.keys)
                    .await?
                    .into_iter()
                    .filter(|id| active.binary_search(id).is_err())
                    .collect();
                let queues = registered
                    .iter()
                    .map(|&id| self.keys.for_coupon(id).queue)
                    .collect();
                let with_entries = self.non_empty(queues).await?;
                anyhow::Ok(with_entries.into_iter().map(|i| registered[i]).collect())
            };
            match swept.await {
                Ok(ids) => found = ids,
                Err(e) => {
                    Self::undo_sweep(&state.queues_swept);
                    return Err(e.context("sweeping the coupon registry for queues with entries"));
                }
            }
            if !found.is_empty() {
                tracing::info!(coupons = ?found, "sweep found queues with entries that were not marked active");
            }
        }
        let active_lanes = self.lanes_of(state, &active)?;
        let found_lanes = self.lanes_of(state, &found)?;
        Ok(active
            .into_iter()
            .zip(active_lanes)
            .map(|(id, lane)| LaneWork {
                coupon: Some(id),
                lane,
                marked: true,
            })
            .chain(
                found
                    .into_iter()
                    .zip(found_lanes)
                    .map(|(id, lane)| LaneWork {
                        coupon: Some(id),
                        lane,
                        marked: false,
                    }),
            )
            .collect())
    }

    /// Clears a drained lane's mark in the active set without losing a wake-up: the mark goes
    /// first, then the queue is looked at again; an entry that arrived in between (its API
    /// call's SADD may have been the one removed) puts the mark back.
    async fn clear_mark(&self, coupon: i64, queue_key: &str) -> anyhow::Result<()> {
        let _: u64 = self.client.srem(&self.keys.coupon_active, coupon).await?;
        let left: u64 = self.client.zcard(queue_key).await?;
        if left > 0 {
            let _: u64 = self.client.sadd(&self.keys.coupon_active, coupon).await?;
        }
        Ok(())
    }

    /// The outbox lanes to persist now: the single queue's, or per coupon those that had
    /// entries when last seen, plus (sweep due) every coupon with an outbox key, whatever the
    /// registry says now — a coupon retired while MySQL was down still has issued coupons to
    /// persist. Outbox keys are found with SCAN on every primary (an empty outbox has no key).
    async fn outbox_lanes(&self) -> anyhow::Result<Vec<(Option<i64>, Lane)>> {
        let state = match &self.layout {
            Layout::Single(lane) => return Ok(vec![(None, (**lane).clone())]),
            Layout::PerCoupon(state) => state,
        };
        if self.sweep_due(&state.outboxes_swept) {
            let swept = async {
                anyhow::Ok(
                    crate::backends::scan_keys(&self.client, &self.keys.outbox_pattern())
                        .await?
                        .iter()
                        .filter_map(|key| self.keys.coupon_of_outbox(key))
                        .collect::<Vec<i64>>(),
                )
            };
            match swept.await {
                Ok(ids) => {
                    if let Ok(mut outboxes) = state.outboxes.lock() {
                        outboxes.extend(ids);
                    }
                }
                Err(e) => {
                    Self::undo_sweep(&state.outboxes_swept);
                    return Err(e.context("looking for outboxes with entries"));
                }
            }
        }
        let ids: Vec<i64> = state
            .outboxes
            .lock()
            .map_err(|_| anyhow::anyhow!("outbox list poisoned"))?
            .iter()
            .copied()
            .collect();
        let lanes = self.lanes_of(state, &ids)?;
        Ok(ids.into_iter().map(Some).zip(lanes).collect())
    }

    /// Remembers that `coupon`'s outbox has entries (the persister's work list).
    fn outbox_has_entries(&self, coupon: Option<i64>) {
        if let (Layout::PerCoupon(state), Some(id)) = (&self.layout, coupon)
            && let Ok(mut outboxes) = state.outboxes.lock()
        {
            outboxes.insert(id);
        }
    }

    /// Issued coupons waiting in the outbox(es) on the persister's work list.
    pub async fn outbox_depth(&self) -> anyhow::Result<u64> {
        let mut depth = 0;
        for (_, lane) in self.outbox_lanes().await? {
            depth += lane.persister.depth().await?;
        }
        self.metrics.coupon_outbox_depth.set(depth as i64);
        Ok(depth)
    }

    /// Refreshes the gauges of what waits in Redis across every lane: the outbox's depth and
    /// oldest issued coupon's age, and the dead letters. Three reads per lane.
    pub async fn observe_depths(&self) -> anyhow::Result<()> {
        let now_ms = Utc::now().timestamp_millis() as f64;
        let (mut outbox, mut oldest_ms, mut dead) = (0u64, None::<f64>, 0u64);
        // Every outbox, also of coupons that left the registry.
        for (_, lane) in self.outbox_lanes().await? {
            outbox += self.client.zcard::<u64, _>(&lane.outbox_key).await?;
            let head: Vec<(String, f64)> = self
                .client
                .zrange(&lane.outbox_key, 0, 0, None, false, None, true)
                .await?;
            if let Some((_, score)) = head.first() {
                oldest_ms = Some(oldest_ms.map_or(*score, |o: f64| o.min(*score)));
            }
            dead += self.client.xlen::<u64, _>(&lane.dead_key).await?;
        }
        self.metrics.coupon_outbox_depth.set(outbox as i64);
        self.metrics
            .coupon_outbox_oldest_age
            .set(oldest_ms.map_or(0.0, |o| ((now_ms - o) / 1000.0).max(0.0)));
        self.metrics.coupon_dead_letters.set(dead as i64);
        Ok(())
    }

    /// Compares every lane's Redis with `user_coupon` and, unless `dry_run`, repairs Redis and
    /// marks it reconciled (the `reconcile` command; see [`reconcile`]). In the per-coupon
    /// layout, every coupon in the registry or in MySQL.
    pub async fn reconcile_all(&self, dry_run: bool) -> anyhow::Result<Vec<reconcile::LaneReport>> {
        let mut lanes = self.registered_lanes().await?;
        if let Layout::PerCoupon(_) = self.layout {
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

    /// Persists every outbox on the work list until empty; returns how many entries. Per
    /// coupon, up to `PARALLEL_PERSISTS` outboxes at once (different shards, different MySQL
    /// connections); an outbox emptied leaves the work list.
    pub async fn persist_all(&self) -> anyhow::Result<usize> {
        use futures_util::{StreamExt, TryStreamExt};
        if self.control.paused(self.pause_check).await?.persist {
            return Ok(0);
        }
        futures_util::stream::iter(self.outbox_lanes().await?)
            .map(|(coupon, lane)| async move {
                let n = lane.persist_all().await?;
                if let (Layout::PerCoupon(state), Some(id)) = (&self.layout, coupon)
                    && lane.persister.depth().await? == 0
                    && let Ok(mut outboxes) = state.outboxes.lock()
                {
                    outboxes.remove(&id);
                }
                anyhow::Ok(n)
            })
            .buffer_unordered(PARALLEL_PERSISTS)
            .try_fold(0, |total, n| async move { Ok(total + n) })
            .await
    }

    /// One tick: every lane with work (concurrently: per-coupon queues live on different shards
    /// of a cluster) decides batches until its queue is empty, `budget` is spent, or `stop`
    /// fires. Following the queue between ticks is this same step, run every poll interval.
    #[tracing::instrument(name = "coupon_drain", skip_all)]
    pub async fn tick(
        &self,
        budget: Duration,
        stop: &CancellationToken,
    ) -> anyhow::Result<DrainReport> {
        let report = self.step(budget, stop).await?;
        if report.decided() > 0 || report[Outcome::Gone] > 0 {
            report.log("coupon drain tick");
        }
        Ok(report)
    }

    /// A tick without its log line: what following runs every poll interval.
    pub async fn step(
        &self,
        budget: Duration,
        stop: &CancellationToken,
    ) -> anyhow::Result<DrainReport> {
        let started = Instant::now();
        if self.control.paused(self.pause_check).await?.drain {
            return Ok(DrainReport {
                stopped: StopReason::Paused,
                elapsed: started.elapsed(),
                ..DrainReport::default()
            });
        }
        let lanes = self.lanes_with_work().await?;
        let results = futures_util::future::join_all(lanes.iter().map(|work| async {
            let (report, oldest) = self
                .tick_lane(&work.lane, work.coupon, started, budget, stop)
                .await?;
            if work.marked
                && report.stopped == StopReason::QueueEmpty
                && let Some(coupon) = work.coupon
            {
                self.clear_mark(coupon, &work.lane.queue_key).await?;
            }
            anyhow::Ok((report, oldest))
        }))
        .await;
        let mut report = DrainReport::default();
        let mut depth = 0;
        let mut oldest_ms: Option<f64> = None;
        let mut first_error = None;
        for result in results {
            match result {
                Ok((lane_report, lane_oldest)) => {
                    report.add_counts(&lane_report);
                    depth += lane_report.queue_depth;
                    oldest_ms = match (oldest_ms, lane_oldest) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
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
        self.metrics
            .coupon_oldest_waiting_age
            .set(oldest_ms.map_or(0.0, |ms| (now_ms() - ms).max(0.0) / 1000.0));
        if let Some(e) = first_error {
            return Err(e);
        }
        report.queue_depth = depth;
        report.elapsed = started.elapsed();
        self.metrics.coupon_queue_depth.set(depth as i64);
        report.lanes = lanes.len() as u64;
        Ok(report)
    }

    /// One lane's share of a tick, with the score of the oldest entry it left waiting (none when
    /// it emptied the queue).
    async fn tick_lane(
        &self,
        lane: &Lane,
        coupon: Option<i64>,
        started: Instant,
        budget: Duration,
        stop: &CancellationToken,
    ) -> anyhow::Result<(DrainReport, Option<f64>)> {
        let mut report = DrainReport::default();
        let mut oldest_ms: Option<f64> = None;
        // The next batch's head, read in the same round trip as the previous batch's script.
        let mut next_head: Option<decide::Head> = None;
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
            // Cached: asks Redis at most once per `pause_check` for all lanes.
            match self.control.paused(self.pause_check).await {
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
                self.record(&previous, coupon, &mut report)
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
        self.record(&pending, coupon, &mut report);
        outcome?;
        // An empty head was just read: nothing to count. Otherwise entries were left behind.
        if report.stopped != StopReason::QueueEmpty {
            report.queue_depth = self.client.zcard(&lane.queue_key).await?;
            let left: decide::Head = match next_head {
                Some(head) => head,
                None => lane.decider.read_head().await?,
            };
            oldest_ms = left.first().map(|(_, score)| *score);
        }
        Ok((report, oldest_ms))
    }

    /// Counts outcomes and updates metrics. (The batch's log rows are already in Redis: the
    /// script wrote them; the log reader is woken to fetch them.)
    fn record(&self, decisions: &[Decision], coupon: Option<i64>, report: &mut DrainReport) {
        if decisions.is_empty() {
            return;
        }
        let decided_ms = chrono::Utc::now().timestamp_millis() as f64;
        let mut batch = DrainReport::default();
        for decision in decisions {
            batch.outcomes[decision.outcome] += 1;
            // A dead-lettered entry gets its row when requeued and decided; a gone one from the
            // replica that decided it.
            if decision.outcome.row_name().is_none() {
                continue;
            }
            // The score is the API's clock, the decision ours: a skew below zero counts as 0.
            self.metrics
                .coupon_decision_latency
                .observe((decided_ms - decision.enqueued_ms).max(0.0) / 1000.0);
            tracing::debug!(member = %decision.member, outcome = decision.outcome.label(), rank = decision.rank, "decided");
        }
        // One metric update per outcome and batch, not per entry.
        for (outcome, count) in batch.outcomes.iter() {
            if count > 0 && outcome.is_decided() {
                self.metrics.outcome(outcome.label()).inc_by(count);
            }
        }
        if batch[Outcome::Issued] > 0 {
            self.outbox_has_entries(coupon);
            self.outbox_ready.notify_one();
        }
        // The script wrote a log row for each outcome that makes one.
        if batch
            .outcomes
            .iter()
            .any(|(outcome, n)| n > 0 && outcome.row_name().is_some())
        {
            self.log_ready.notify_one();
        }
        report.add_counts(&batch);
    }

    /// The persister as a long-running task: persists whenever the outbox has entries, retries
    /// MySQL or Redis outages with backoff, and on `stop` makes a last attempt to empty the
    /// outbox before returning (entries left are persisted by the next start or a replica).
    pub async fn run_persister(&self, stop: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        loop {
            let persisted = retry::until_cancelled(
                &mut backoff,
                &stop,
                "persisting issued coupons failed; they stay in the outbox and will be retried",
                || async {
                    let persisted = self.persist_all().await;
                    if persisted.is_err() {
                        // The outbox's age is what the alert on a stuck outbox watches.
                        let _ = self.observe_depths().await;
                    }
                    persisted
                },
            )
            .await;
            match persisted {
                None => return,
                Some(0) => {
                    let _ = self.observe_depths().await;
                    tokio::select! {
                        _ = self.outbox_ready.notified() => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.cancelled() => break,
                    }
                }
                Some(_) => {
                    backoff.reset();
                    if stop.is_cancelled() {
                        break;
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

    /// The `drain` command's coupon part: decides until the queue is empty and waits until the
    /// outbox is empty, retrying outages until both are done or `stop` fires. The persister must
    /// be running (`app::CouponJob` runs it).
    pub async fn drain_to_empty(&self, stop: &CancellationToken) -> DrainReport {
        let started = Instant::now();
        let mut total = DrainReport::default();
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        while let Some(report) =
            retry::until_cancelled(&mut backoff, stop, "drain batch failed; retrying", || {
                self.tick(Duration::MAX, stop)
            })
            .await
        {
            total.absorb(&report);
            if report.stopped != StopReason::BudgetSpent {
                break;
            }
        }
        // Wait for the outbox to empty (MySQL may be down: the persister keeps retrying), unless
        // an operator paused persisting.
        loop {
            if let Ok(0) = self.outbox_depth().await {
                break;
            }
            if let Ok(paused) = self.control.paused(self.pause_check).await
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
        total.elapsed = started.elapsed();
        total
    }
}
