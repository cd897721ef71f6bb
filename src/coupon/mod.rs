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
mod lease;
pub(crate) mod member;
mod outbox;
mod reconcile;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use fred::prelude::*;
use sqlx::MySqlPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use crate::outcome::Outcome;
pub use dead::{
    DeadAction, DeadEntry, DeadFilter, DeadReport, RequeueReport, process_dead, requeue_dead,
};
pub(crate) use decide::member_text;
pub use decide::{Decider, Decision};
pub use follow::{DEFAULT_LEASE, FollowLease, FollowOptions, Following, follow};
pub use lease::Lease;
pub use outbox::{OutboxRequeued, Persister, ReplicaWait, outbox_dead_key, requeue_outbox_dead};
pub use reconcile::{CouponReport, LaneReport, Reconciler};

/// Lua that computes the identity of the Redis a script runs on (`identity`: run_id and
/// replication id), as the reconciliation marker and MySQL's `redis_fence` row name it; scripts
/// elsewhere put it in front of their own to tell which Redis they ran on.
pub const REDIS_IDENTITY_LUA: &str = include_str!("identity.lua");

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
    /// A scheduled tick that started while nobody followed the queue stopped because a
    /// follower appeared (see [`Following::tick`]).
    HandedOver,
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
    /// Per-coupon layout: lanes that failed in this tick or are waiting out a failure (see
    /// [`CouponDrain::step`]); the other lanes went on.
    pub failing_lanes: u64,
    /// The first lane failure of this tick, with its coupon.
    pub lane_error: Option<String>,
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
            failing_lanes = self.failing_lanes,
            "{message}"
        );
    }

    /// Adds a later tick's counts to these (depth, stop reason and lanes: the later tick's).
    pub fn absorb(&mut self, other: &DrainReport) {
        self.add_counts(other);
        self.queue_depth = other.queue_depth;
        self.stopped = other.stopped;
        self.lanes = other.lanes;
        self.failing_lanes = other.failing_lanes;
        if other.lane_error.is_some() {
            self.lane_error.clone_from(&other.lane_error);
        }
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
        )?;
        if self.failing_lanes > 0 {
            write!(f, "; {} coupon lane(s) failing", self.failing_lanes)?;
            if let Some(error) = &self.lane_error {
                write!(f, " ({error})")?;
            }
        }
        Ok(())
    }
}

/// Now in epoch milliseconds, the unit of queue scores.
fn now_ms() -> f64 {
    chrono::Utc::now().timestamp_millis() as f64
}

/// Outboxes persisted at once in the per-coupon layout: enough to keep MySQL busy, well under
/// the pool (`[mysql] max_connections`, 8 by default) shared with the log writer.
const PARALLEL_PERSISTS: usize = 4;

/// How stale this replica's copy of the pause flags may be: a `pause` takes effect within this
/// long (at most one Redis read per interval, however many lanes or polls ask; a follower asks
/// only when a poll finds work, so an idle queue costs no pause reads).
pub const PAUSE_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// How soon every replica sees a pause flag: the pause-check interval, or the poll interval when
/// following polls less often. The daemon reads the flags this often and `pause` promises it.
pub fn pause_seen_within(follow_interval: Option<Duration>) -> Duration {
    follow_interval
        .unwrap_or_default()
        .max(PAUSE_CHECK_INTERVAL)
}

/// Per-coupon layout: how long a lane that failed with a fault of its own (a key of the wrong
/// type) is left alone before the next try, doubling from the first to the last failure.
const LANE_RETRY_FIRST: Duration = Duration::from_secs(1);
const LANE_RETRY_MAX: Duration = Duration::from_secs(30);

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
    /// `sweep_interval` in the whole registry by [`CouponDrain::run_sweeper`] (for queues whose
    /// coupon the API did not mark).
    PerCoupon(Arc<PerCoupon>),
}

/// The per-coupon layout's state, shared by the drain's clones.
struct PerCoupon {
    /// Lanes made on first sight, by coupon.
    lanes: std::sync::Mutex<BTreeMap<i64, Lane>>,
    /// Whether the next look sweeps the registry itself (the first look, and
    /// [`CouponDrain::sweep_at_next_look`]); otherwise the sweeper task does, off the step.
    sweep_requested: AtomicBool,
    /// Coupons a sweep found with queue entries and no mark in the active set, until a step
    /// empties their queue.
    found: std::sync::Mutex<BTreeSet<i64>>,
    /// When the registry's outboxes were last swept.
    outboxes_swept: std::sync::Mutex<Option<Instant>>,
    /// Coupons whose outbox had entries when last seen (issued here, or found by a sweep):
    /// the persister's work list between sweeps.
    outboxes: std::sync::Mutex<BTreeSet<i64>>,
    /// Lanes that failed with a fault of their own, left alone until their retry time.
    failing: std::sync::Mutex<BTreeMap<i64, LaneFailure>>,
    /// Coupons whose lane this process saw marked reconciled for the live Redis (the sweeper
    /// reconciles the others ahead of their first request, [`CouponDrain::reconcile_ahead`]);
    /// forgotten when Redis turns out to have changed.
    verified: std::sync::Mutex<BTreeSet<i64>>,
    /// Whether the sweeper reconciles lanes ahead of their first request (the daemon's choice,
    /// [`CouponDrain::reconcile_lanes_ahead`]; a one-shot command exits before it would pay off).
    ahead: AtomicBool,
}

/// A lane left alone after a failure of its own.
struct LaneFailure {
    retry_at: Instant,
    /// The wait after the next failure.
    next_wait: Duration,
}

/// Whether a lane's failure is its own (a key of the wrong type, a reply that does not parse)
/// rather than the backend's (a lost connection, a timeout, Redis loading or out of memory),
/// which every lane would meet.
fn is_lane_fault(error: &anyhow::Error) -> bool {
    use fred::error::ErrorKind;
    if error.chain().any(|e| e.to_string().contains("WRONGTYPE")) {
        return true;
    }
    match error.downcast_ref::<fred::error::Error>() {
        Some(e) => matches!(
            e.kind(),
            ErrorKind::InvalidArgument | ErrorKind::Parse | ErrorKind::NotFound
        ),
        // Our own checks of what Redis answered (the decide script's reply).
        None => error.to_string().contains("decide script returned"),
    }
}

impl Default for PerCoupon {
    fn default() -> Self {
        Self {
            lanes: Default::default(),
            sweep_requested: AtomicBool::new(true),
            found: Default::default(),
            outboxes_swept: Default::default(),
            outboxes: Default::default(),
            failing: Default::default(),
            verified: Default::default(),
            ahead: AtomicBool::new(false),
        }
    }
}

/// What the drain tells this process's ranking-log reader: the lanes whose log stream a decided
/// batch just appended to (the decide script wrote the rows), with a wake-up, so the reader looks
/// only at streams with work instead of walking the registry. In-process only: streams written by
/// other processes or commands are found by the reader's slower sweep of every stream.
///
/// It also carries which process runs the periodic walks of every log stream: the one whose
/// drain holds the sweep lease ([`SweepTurn`]).
#[derive(Default)]
pub struct LogReady {
    wake: Notify,
    /// Coupons (per-coupon layout) whose log stream got rows; `None` is the single queue's.
    lanes: std::sync::Mutex<BTreeSet<Option<i64>>>,
    /// Walks of every log stream asked for so far ([`Self::sweep_now`]); the reader takes the
    /// asks before a walk and, once it finishes, records the last ask it took.
    sweeps_asked: AtomicU64,
    sweeps_taken: AtomicU64,
    sweeps_done: AtomicU64,
    turn: SweepTurn,
}

/// Whether this process runs the periodic walks of the whole registry now (per-coupon layout).
/// The drain's sweeper ([`CouponDrain::run_sweeper`]) holds the sweep lease
/// ([`KeyTemplates::sweep_lease`]) and publishes here until when it holds it, for the log reader
/// and the persister's outbox SCAN. Until a sweeper manages it (a log pipeline started on its
/// own, the single-queue layout) every walk runs, as without a lease.
#[derive(Default)]
struct SweepTurn {
    managed: AtomicBool,
    held_until: std::sync::Mutex<Option<Instant>>,
}

impl LogReady {
    /// A batch of `coupon`'s lane (`None`: the single queue) wrote log rows.
    pub fn wrote(&self, coupon: Option<i64>) {
        if let Ok(mut lanes) = self.lanes.lock() {
            lanes.insert(coupon);
        }
        self.wake.notify_one();
    }

    /// Wakes the reader without naming a lane.
    pub fn notify_one(&self) {
        self.wake.notify_one();
    }

    /// Asks the reader to look at every log stream at its next look (rows another process
    /// left). Returns the ask's number: [`Self::sweeps_done`] reaches it once a walk that
    /// started after this call has finished.
    pub fn sweep_now(&self) -> u64 {
        let ask = self.sweeps_asked.fetch_add(1, Ordering::SeqCst) + 1;
        self.wake.notify_one();
        ask
    }

    /// The lanes named since the last call.
    pub fn take_lanes(&self) -> Vec<Option<i64>> {
        self.lanes
            .lock()
            .map(|mut lanes| std::mem::take(&mut *lanes).into_iter().collect())
            .unwrap_or_default()
    }

    /// Whether a sweep was asked for since the last call (the reader calls it before a walk).
    pub fn take_sweep(&self) -> bool {
        let asked = self.sweeps_asked.load(Ordering::SeqCst);
        self.sweeps_taken.swap(asked, Ordering::SeqCst) < asked
    }

    /// Until the next wake-up.
    pub async fn notified(&self) {
        self.wake.notified().await;
    }

    /// The reader finished a walk of every log stream, started after the asks it took.
    pub fn swept(&self) {
        self.sweeps_done
            .fetch_max(self.sweeps_taken.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// The last ask ([`Self::sweep_now`]) a finished walk answered.
    pub fn sweeps_done(&self) -> u64 {
        self.sweeps_done.load(Ordering::SeqCst)
    }

    /// Whether this process runs the periodic walks of the whole registry now: it holds the
    /// sweep lease, or no sweeper manages the turn (see [`SweepTurn`]).
    pub fn sweeps_here(&self) -> bool {
        if !self.turn.managed.load(Ordering::Relaxed) {
            return true;
        }
        self.turn
            .held_until
            .lock()
            .ok()
            .and_then(|held| *held)
            .is_some_and(|until| Instant::now() < until)
    }

    /// The sweeper holds the sweep lease until `until` (`None`: not held).
    fn set_sweep_turn(&self, until: Option<Instant>) {
        self.turn.managed.store(true, Ordering::Relaxed);
        if let Ok(mut held) = self.turn.held_until.lock() {
            *held = until;
        }
    }
}

/// Keys looked at concurrently in one go by a sweep (fred pipelines them on its connections).
const SWEEP_CHUNK: usize = 1000;

/// How long the sweep lease ([`KeyTemplates::sweep_lease`]) lasts from each renewal; its holder
/// renews it every third of that, so a dead or stopped sweeper is replaced within ~20 s.
pub const SWEEP_LEASE: Duration = Duration::from_secs(15);

/// Lanes reconciled ahead of their first request at once: a few MySQL connections of the pool
/// shared with the persister and the log writer.
const PARALLEL_RECONCILES: usize = 4;

/// The persister looks for outbox keys with SCAN every this many `sweep_interval`s (60 s by
/// default): SCAN walks the whole keyspace (~0.1 s of Redis for 100 000 keys), the safety net
/// for outboxes of crashed replicas and retired coupons; the drain's own issues are on the
/// persister's work list at once.
const OUTBOX_SCAN_EVERY_SWEEPS: u32 = 6;

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
    /// Tells the ranking-log reader which lanes' batches wrote log rows.
    log_ready: Arc<LogReady>,
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
        log_ready: Arc<LogReady>,
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

    /// Per-coupon layout: from now on, the sweeper (while this replica holds the sweep lease)
    /// also reconciles lanes ahead of their first request ([`Self::reconcile_ahead`]). The
    /// daemon turns it on; one-shot commands leave it off (they exit before it would pay off).
    pub fn reconcile_lanes_ahead(&self) {
        if let Layout::PerCoupon(state) = &self.layout {
            state.ahead.store(true, Ordering::Relaxed);
        }
    }

    /// Makes the next look sweep the whole registry (per-coupon layout), as if the sweep
    /// interval had passed: how tests step the sweep without waiting for it.
    pub fn sweep_at_next_look(&self) {
        if let Layout::PerCoupon(state) = &self.layout {
            state.sweep_requested.store(true, Ordering::Relaxed);
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
                &keys,
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
    /// The first sweep, or one asked for ([`Self::sweep_at_next_look`]), runs whoever holds the
    /// sweep lease; the periodic ones only on the replica that holds it.
    fn sweep_due(&self, last: &std::sync::Mutex<Option<Instant>>) -> bool {
        let Ok(mut last) = last.lock() else {
            return true;
        };
        let every = self.sweep_interval.saturating_mul(OUTBOX_SCAN_EVERY_SWEEPS);
        let due = match *last {
            None => true,
            Some(at) => at.elapsed() >= every && self.log_ready.sweeps_here(),
        };
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

    /// Of `keys`, the indexes of those whose ZCARD is not 0, asked [`SWEEP_CHUNK`] at a time;
    /// `None` when `stop` fired between two chunks.
    async fn non_empty(
        &self,
        keys: &[String],
        stop: &CancellationToken,
    ) -> anyhow::Result<Option<Vec<usize>>> {
        let mut found = Vec::new();
        for (chunk_index, chunk) in keys.chunks(SWEEP_CHUNK).enumerate() {
            if stop.is_cancelled() {
                return Ok(None);
            }
            let sizes = futures_util::future::join_all(
                chunk.iter().map(|key| self.client.zcard::<u64, _>(key)),
            )
            .await;
            for (i, size) in sizes.into_iter().enumerate() {
                let has_work = match size.map_err(anyhow::Error::from) {
                    Ok(n) => n > 0,
                    // A key of the wrong type is that lane's fault, not the sweep's: the lane is
                    // handed to the next step, which reports it and leaves it alone.
                    Err(e) if is_lane_fault(&e) => true,
                    Err(e) => return Err(e),
                };
                if has_work {
                    found.push(chunk_index * SWEEP_CHUNK + i);
                }
            }
        }
        Ok(Some(found))
    }

    /// Per-coupon layout: the coupons the active set marks as having work. An active set that
    /// is not a set (a key of the wrong type) counts as empty, so one damaged key slows every
    /// lane to the registry sweep's pace instead of stopping them all; the sweep (`warn`) says
    /// so, naming the key. Any other error (Redis unreachable) is the caller's.
    async fn active_coupons(&self, warn: bool) -> anyhow::Result<Vec<i64>> {
        match self
            .client
            .smembers::<Vec<String>, _>(&self.keys.coupon_active)
            .await
        {
            Ok(members) => Ok(members.iter().filter_map(|m| member::parse_id(m)).collect()),
            Err(e) if e.details().contains("WRONGTYPE") => {
                if warn {
                    tracing::warn!(
                        key = %self.keys.coupon_active,
                        error = %e,
                        "the active-coupon set is not a set: lanes with work are found by the \
                         registry sweep alone until it is repaired (DEL it; the API re-marks lanes)"
                    );
                }
                Ok(Vec::new())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Per-coupon layout: looks at the queue of every registered coupon, [`SWEEP_CHUNK`] at a
    /// time, and remembers those with entries that the active set does not show, for the next
    /// steps; it also marks them in the active set, so that whichever replica follows the queues
    /// drains them (the sweep runs on the replica holding the sweep lease). Returns how many it
    /// found (0 in the single-queue layout, or when `stop` fired before the end).
    pub async fn sweep_queues(&self, stop: &CancellationToken) -> anyhow::Result<usize> {
        Ok(self.sweep_registry(stop).await?.1)
    }

    /// [`Self::sweep_queues`], also returning the registered coupons it read.
    async fn sweep_registry(&self, stop: &CancellationToken) -> anyhow::Result<(Vec<i64>, usize)> {
        let Layout::PerCoupon(state) = &self.layout else {
            return Ok((Vec::new(), 0));
        };
        let swept = async {
            let active: BTreeSet<i64> = self.active_coupons(true).await?.into_iter().collect();
            let registered = registered_coupons(&self.client, &self.keys).await?;
            let unmarked: Vec<i64> = registered
                .iter()
                .copied()
                .filter(|id| !active.contains(id))
                .collect();
            let queues: Vec<String> = unmarked.iter().map(|&id| self.keys.queue_of(id)).collect();
            let with_entries = self.non_empty(&queues, stop).await?;
            anyhow::Ok((
                with_entries
                    .map(|found| found.into_iter().map(|i| unmarked[i]).collect::<Vec<i64>>())
                    .unwrap_or_default(),
                registered,
            ))
        };
        let (found, registered) = swept
            .await
            .context("sweeping the coupon registry for queues with entries")?;
        if !found.is_empty() {
            tracing::info!(coupons = ?found, "sweep found queues with entries that were not marked active");
            if let Ok(mut known) = state.found.lock() {
                known.extend(found.iter().copied());
            }
            // The follower may be another replica: the mark is how it learns. A damaged active
            // set (wrong type) is left as it is; this replica's steps drain what it found.
            let marked: Result<u64, _> = self
                .client
                .sadd(&self.keys.coupon_active, found.clone())
                .await;
            if let Err(e) = marked {
                tracing::debug!(error = %e, "could not mark the swept lanes in the active set");
            }
        }
        Ok((registered, found.len()))
    }

    /// The sweeper task (per-coupon layout; returns at once in the single-queue layout). One
    /// replica at a time sweeps: the holder of the sweep lease ([`KeyTemplates::sweep_lease`],
    /// [`SWEEP_LEASE`], renewed every third of it; a dead or stopped holder's lapses and another
    /// replica takes it at its next check). The holder, every `sweep_interval` (and at once when
    /// it takes the lease): [`Self::sweep_queues`], then [`Self::reconcile_ahead`]; the log
    /// reader and the persister of this process run their periodic walks only while it holds the
    /// lease ([`LogReady::sweeps_here`]). Steps that follow the queue never wait for it; it stops
    /// between two chunks when `stop` fires, and gives the lease up.
    pub async fn run_sweeper(&self, stop: CancellationToken) {
        let Layout::PerCoupon(state) = &self.layout else {
            return;
        };
        // Managed from now on: nothing sweeps periodically here until the lease is held.
        self.log_ready.set_sweep_turn(None);
        // The lease is kept on its own pace, so that a long walk (the first reconciliation
        // ahead of 20 000 lanes) never lets it lapse.
        let keep = async {
            let mut lease = Lease::new(
                self.client.clone(),
                self.keys.sweep_lease(),
                SWEEP_LEASE,
                "sweeps the coupon registry",
            );
            let mut failures = 0u32;
            while !stop.is_cancelled() {
                let held = match lease.hold().await {
                    Ok(held) => {
                        failures = 0;
                        held
                    }
                    Err(e) => {
                        if failures == 0 {
                            tracing::warn!(error = %format!("{e:#}"), "checking the sweep lease failed; retrying");
                        }
                        failures = failures.saturating_add(1);
                        false
                    }
                };
                self.log_ready.set_sweep_turn(lease.held_until());
                self.metrics.coupon_sweeper.set(i64::from(held));
                tokio::select! {
                    _ = tokio::time::sleep(SWEEP_LEASE / 3) => {}
                    _ = stop.cancelled() => {}
                }
            }
            self.log_ready.set_sweep_turn(None);
            self.metrics.coupon_sweeper.set(0);
            lease.release().await;
        };
        let sweep = async {
            // While held: when this replica last swept (it sweeps at once when it takes over).
            let mut last_sweep: Option<Instant> = None;
            while !stop.is_cancelled() {
                if !self.log_ready.sweeps_here() {
                    last_sweep = None;
                } else if last_sweep.is_none_or(|at| at.elapsed() >= self.sweep_interval) {
                    last_sweep = Some(Instant::now());
                    match self.sweep_registry(&stop).await {
                        Ok((registered, _))
                            if !stop.is_cancelled() && state.ahead.load(Ordering::Relaxed) =>
                        {
                            if let Err(e) = self.reconcile_ahead(state, &registered, &stop).await {
                                tracing::warn!(error = %format!("{e:#}"), "reconciling lanes ahead of their first request failed; retrying at the next sweep");
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %format!("{e:#}"), "sweeping the coupon registry failed; retrying at the next interval");
                        }
                    }
                }
                // No Redis call here: looking at the turn every second is free.
                let mut wait = Duration::from_secs(1);
                if let Some(at) = last_sweep {
                    wait = wait.min(self.sweep_interval.saturating_sub(at.elapsed()));
                }
                tokio::select! {
                    _ = tokio::time::sleep(wait.max(Duration::from_millis(10))) => {}
                    _ = stop.cancelled() => {}
                }
            }
        };
        tokio::join!(keep, sweep);
    }

    /// Per-coupon layout, on the sweeping replica: reconciles, ahead of their first request, the
    /// lanes of `registered` coupons not marked reconciled for the live Redis — a coupon never
    /// used, or every coupon after Redis restarted, was restored or failed over — so that a lone
    /// request in any lane is decided within a poll interval instead of paying the lane's
    /// reconciliation from MySQL first. The reconciliation is the one the decide script's
    /// `UNRECONCILED` refusal starts ([`Reconciler::ensure`]); the refusal stays the guard, so a
    /// lane this misses (a coupon registered since the last sweep) is reconciled on its first
    /// request as before.
    ///
    /// Cost: one look at the marker per coupon the first time (pipelined GETs, [`SWEEP_CHUNK`]
    /// at a time; a live identity is asked for only for a marker naming a Redis not seen yet),
    /// then only for coupons registered since; one probe per sweep of a lane seen reconciled
    /// notices a Redis that changed (then every marker is looked at again). Returns the lanes
    /// reconciled.
    async fn reconcile_ahead(
        &self,
        state: &PerCoupon,
        registered: &[i64],
        stop: &CancellationToken,
    ) -> anyhow::Result<usize> {
        use futures_util::StreamExt;
        // A changed Redis (on a cluster: the probed lane's shard) invalidates what was seen.
        let probe = state
            .verified
            .lock()
            .map_err(|_| anyhow::anyhow!("reconciled coupons poisoned"))?
            .first()
            .copied();
        if let Some(coupon) = probe {
            let lane = self.lanes_of(state, &[coupon])?.remove(0);
            let (live, marker) = lane.reconciler.identity().await?;
            if live != marker {
                self.forget_reconciled();
            }
        }
        let todo: Vec<i64> = {
            let verified = state
                .verified
                .lock()
                .map_err(|_| anyhow::anyhow!("reconciled coupons poisoned"))?;
            registered
                .iter()
                .copied()
                .filter(|id| !verified.contains(id))
                .collect()
        };
        // Identities seen live, and seen replaced (a marker naming one is stale).
        let mut live_ids: BTreeSet<String> = BTreeSet::new();
        let mut stale_ids: BTreeSet<String> = BTreeSet::new();
        let mut unreconciled: Vec<(i64, Lane)> = Vec::new();
        let (mut fresh, mut stale) = (0usize, 0usize);
        for chunk in todo.chunks(SWEEP_CHUNK) {
            if stop.is_cancelled() {
                return Ok(0);
            }
            let lanes = self.lanes_of(state, chunk)?;
            let markers = futures_util::future::join_all(lanes.iter().map(|lane| {
                self.client
                    .get::<Option<String>, _>(lane.reconciler.marker_key())
            }))
            .await;
            let mut seen = Vec::new();
            for ((&coupon, lane), marker) in chunk.iter().zip(lanes).zip(markers) {
                // A key of the wrong type is the lane's to report, at its first request.
                let Ok(marker) = marker else { continue };
                match marker {
                    None => {
                        fresh += 1;
                        unreconciled.push((coupon, lane));
                    }
                    Some(m) if live_ids.contains(&m) => seen.push(coupon),
                    Some(m) if stale_ids.contains(&m) => {
                        stale += 1;
                        unreconciled.push((coupon, lane));
                    }
                    Some(_) => {
                        let (live, marker) = lane.reconciler.identity().await?;
                        if live == marker {
                            seen.push(coupon);
                        } else {
                            stale_ids.insert(marker);
                            stale += 1;
                            unreconciled.push((coupon, lane));
                        }
                        live_ids.insert(live);
                    }
                }
            }
            if let Ok(mut verified) = state.verified.lock() {
                verified.extend(seen);
            }
        }
        if unreconciled.is_empty() {
            return Ok(0);
        }
        if stale > 0 {
            tracing::warn!(
                lanes = stale,
                "Redis is not the one these lanes were last reconciled with (restart, restore or failover); reconciling them from MySQL ahead of their next request"
            );
        } else {
            tracing::info!(
                lanes = fresh,
                "reconciling lanes never reconciled on this Redis (new coupons, or a new Redis) ahead of their first request"
            );
        }
        let total = unreconciled.len();
        let reconciled = futures_util::stream::iter(unreconciled)
            // Another replica takes over where this one lost the lease.
            .take_while(|_| std::future::ready(!stop.is_cancelled() && self.log_ready.sweeps_here()))
            .map(|(coupon, lane)| async move {
                match lane.reconciler.ensure_ahead().await {
                    Ok(_) => Some(coupon),
                    Err(e) => {
                        tracing::debug!(coupon, error = %format!("{e:#}"), "reconciling a lane ahead of time failed; its first request reconciles it");
                        None
                    }
                }
            })
            .buffer_unordered(PARALLEL_RECONCILES)
            .filter_map(std::future::ready)
            .collect::<Vec<i64>>()
            .await;
        let done = reconciled.len();
        if let Ok(mut verified) = state.verified.lock() {
            verified.extend(reconciled);
        }
        tracing::info!(
            lanes = done,
            failed_or_stopped = total - done,
            "lanes reconciled ahead of their first request"
        );
        Ok(done)
    }

    /// Redis changed (a script refused as `UNRECONCILED`, or the sweeper's probe): no lane is
    /// known to be reconciled any more; the next sweep looks at every marker again.
    fn forget_reconciled(&self) {
        if let Layout::PerCoupon(state) = &self.layout
            && let Ok(mut verified) = state.verified.lock()
        {
            verified.clear();
        }
    }

    /// The lanes to work on now. Single queue: the queue. Per coupon: the coupons in the active
    /// set and those a sweep found (the first look, or one asked for with
    /// [`sweep_at_next_look`](Self::sweep_at_next_look), sweeps here first).
    async fn lanes_with_work(&self, stop: &CancellationToken) -> anyhow::Result<Vec<LaneWork>> {
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
        if state.sweep_requested.swap(false, Ordering::Relaxed)
            && let Err(e) = self.sweep_queues(stop).await
        {
            state.sweep_requested.store(true, Ordering::Relaxed);
            return Err(e);
        }
        let mut active = self.active_coupons(false).await?;
        active.sort_unstable();
        let found: Vec<i64> = state
            .found
            .lock()
            .map_err(|_| anyhow::anyhow!("swept coupons poisoned"))?
            .iter()
            .copied()
            .filter(|id| active.binary_search(id).is_err())
            .collect();
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

    /// A lane a step emptied: out of the swept coupons, and its mark cleared if it had one.
    async fn lane_emptied(&self, work: &LaneWork) -> anyhow::Result<()> {
        let (Layout::PerCoupon(state), Some(coupon)) = (&self.layout, work.coupon) else {
            return Ok(());
        };
        if let Ok(mut found) = state.found.lock() {
            found.remove(&coupon);
        }
        if work.marked {
            self.clear_mark(coupon, &work.lane.queue_key).await?;
        }
        Ok(())
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
    /// oldest issued coupon's age, and the dead letters. Three reads per lane. Returns the
    /// outbox depth.
    pub async fn observe_depths(&self) -> anyhow::Result<u64> {
        let now_ms = Utc::now().timestamp_millis() as f64;
        let (mut outbox, mut oldest_ms, mut dead) = (0u64, None::<f64>, 0u64);
        // Every outbox, also of coupons that left the registry; not those of failing lanes.
        for (coupon, lane) in self.outbox_lanes().await? {
            if self.lane_resting(coupon) {
                continue;
            }
            let looked = async {
                let depth = self.client.zcard::<u64, _>(&lane.outbox_key).await?;
                let head: Vec<(String, f64)> = self
                    .client
                    .zrange(&lane.outbox_key, 0, 0, None, false, None, true)
                    .await?;
                let dead = self.client.xlen::<u64, _>(&lane.dead_key).await?;
                anyhow::Ok((depth, head.first().map(|(_, score)| *score), dead))
            };
            match looked.await {
                Ok((depth, head, lane_dead)) => {
                    outbox += depth;
                    if let Some(score) = head {
                        oldest_ms = Some(oldest_ms.map_or(score, |o: f64| o.min(score)));
                    }
                    dead += lane_dead;
                }
                Err(e) => self.lane_fault_or(coupon, e, "looking at")?,
            }
        }
        self.metrics.coupon_outbox_depth.set(outbox as i64);
        self.metrics
            .coupon_outbox_oldest_age
            .set(oldest_ms.map_or(0.0, |o| ((now_ms - o) / 1000.0).max(0.0)));
        self.metrics.coupon_dead_letters.set(dead as i64);
        Ok(outbox)
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
        let mut lanes = self.outbox_lanes().await?;
        lanes.retain(|(coupon, _)| !self.lane_resting(*coupon));
        futures_util::stream::iter(lanes)
            .map(|(coupon, lane)| async move {
                let persisted = async {
                    let n = lane.persist_all().await?;
                    if let (Layout::PerCoupon(state), Some(id)) = (&self.layout, coupon)
                        && lane.persister.depth().await? == 0
                        && let Ok(mut outboxes) = state.outboxes.lock()
                    {
                        outboxes.remove(&id);
                    }
                    anyhow::Ok(n)
                };
                match persisted.await {
                    Ok(n) => Ok(n),
                    // One coupon's broken outbox does not keep the others out of MySQL.
                    Err(e) => self.lane_fault_or(coupon, e, "persisting").map(|()| 0),
                }
            })
            .buffer_unordered(PARALLEL_PERSISTS)
            .try_fold(0, |total, n| async move { Ok(total + n) })
            .await
    }

    /// One tick: every lane with work (concurrently: per-coupon queues live on different shards
    /// of a cluster) decides batches until its queue is empty, `budget` is spent, or `stop`
    /// fires. A paused drain is reported before anything is read. Following the queue between
    /// ticks runs [`Self::step`].
    #[tracing::instrument(name = "coupon_drain", skip_all)]
    pub async fn tick(
        &self,
        budget: Duration,
        stop: &CancellationToken,
    ) -> anyhow::Result<DrainReport> {
        let started = Instant::now();
        if self.drain_paused().await? {
            return Ok(DrainReport {
                stopped: StopReason::Paused,
                elapsed: started.elapsed(),
                ..DrainReport::default()
            });
        }
        let report = self.step(budget, stop).await?;
        if report.decided() > 0 || report[Outcome::Gone] > 0 || report.lane_error.is_some() {
            report.log("coupon drain tick");
        }
        Ok(report)
    }

    /// Whether an operator paused the drain, as this replica last read the flags (at most
    /// [`PAUSE_CHECK_INTERVAL`] ago, or the interval set by [`Self::with_pause_check`]).
    pub async fn drain_paused(&self) -> anyhow::Result<bool> {
        Ok(self.control.paused(self.pause_check).await?.drain)
    }

    /// A tick without its log line, and without reading the pause flags before it knows there is
    /// something to decide: what following runs at every poll, so an idle queue costs one look.
    ///
    /// Per coupon, a lane that fails with a fault of its own (a key of the wrong type) does not
    /// fail the others: it is logged (WARN, with its coupon), counted
    /// (`coupon_lane_failures_total`) and left alone for 1 s, doubling up to 30 s
    /// (`coupon_lanes_failing`); the step reports it in [`DrainReport::lane_error`]. A failure
    /// every lane would meet (Redis unreachable) fails the step.
    pub async fn step(
        &self,
        budget: Duration,
        stop: &CancellationToken,
    ) -> anyhow::Result<DrainReport> {
        let started = Instant::now();
        let mut lanes = self.lanes_with_work(stop).await?;
        let failing_before = self.skip_failing_lanes(&mut lanes);
        let results = futures_util::future::join_all(lanes.iter().map(|work| async {
            let (report, oldest) = self
                .tick_lane(&work.lane, work.coupon, started, budget, stop)
                .await?;
            if report.stopped == StopReason::QueueEmpty {
                self.lane_emptied(work).await?;
            }
            anyhow::Ok((report, oldest))
        }))
        .await;
        let mut report = DrainReport::default();
        let mut depth = 0;
        let mut oldest_ms: Option<f64> = None;
        let mut first_error = None;
        for (work, result) in lanes.iter().zip(results) {
            match result {
                Ok((lane_report, lane_oldest)) => {
                    self.lane_recovered(work.coupon);
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
                Err(e) => match work.coupon {
                    Some(coupon) if is_lane_fault(&e) => {
                        let wait = self.lane_failed(coupon);
                        tracing::warn!(coupon, retry_in_ms = wait.as_millis() as u64,
                            error = %format!("{e:#}"),
                            "coupon lane failed; the other lanes go on, this one is retried later");
                        report
                            .lane_error
                            .get_or_insert_with(|| format!("coupon {coupon}: {e:#}"));
                    }
                    _ => {
                        first_error.get_or_insert(e);
                    }
                },
            }
        }
        self.metrics
            .coupon_oldest_waiting_age
            .set(oldest_ms.map_or(0.0, |ms| (now_ms() - ms).max(0.0) / 1000.0));
        report.failing_lanes = self.failing_lanes().max(failing_before);
        if let Some(e) = first_error {
            return Err(e);
        }
        report.queue_depth = depth;
        report.elapsed = started.elapsed();
        self.metrics.coupon_queue_depth.set(depth as i64);
        report.lanes = lanes.len() as u64;
        Ok(report)
    }

    /// Drops from `lanes` those waiting out a failure of their own; returns how many lanes are
    /// failing.
    fn skip_failing_lanes(&self, lanes: &mut Vec<LaneWork>) -> u64 {
        let Layout::PerCoupon(state) = &self.layout else {
            return 0;
        };
        let Ok(failing) = state.failing.lock() else {
            return 0;
        };
        if failing.is_empty() {
            return 0;
        }
        let now = Instant::now();
        lanes.retain(|work| {
            work.coupon
                .and_then(|c| failing.get(&c))
                .is_none_or(|f| f.retry_at <= now)
        });
        failing.len() as u64
    }

    /// Records a lane's failure of its own; returns how long it is left alone.
    fn lane_failed(&self, coupon: i64) -> Duration {
        self.metrics.coupon_lane_failures.inc();
        let Layout::PerCoupon(state) = &self.layout else {
            return Duration::ZERO;
        };
        let Ok(mut failing) = state.failing.lock() else {
            return Duration::ZERO;
        };
        let entry = failing.entry(coupon).or_insert(LaneFailure {
            retry_at: Instant::now(),
            next_wait: LANE_RETRY_FIRST,
        });
        let wait = entry.next_wait;
        entry.retry_at = Instant::now() + wait;
        entry.next_wait = (wait * 2).min(LANE_RETRY_MAX);
        self.metrics.coupon_lanes_failing.set(failing.len() as i64);
        wait
    }

    /// Whether a lane is left alone now after a failure of its own.
    fn lane_resting(&self, coupon: Option<i64>) -> bool {
        let (Layout::PerCoupon(state), Some(coupon)) = (&self.layout, coupon) else {
            return false;
        };
        state
            .failing
            .lock()
            .ok()
            .and_then(|failing| failing.get(&coupon).map(|f| Instant::now() < f.retry_at))
            .unwrap_or(false)
    }

    /// A lane's failure while `doing` its outbox: a fault of its own is logged and the lane
    /// left alone (`Ok`, the other lanes go on); any other failure is returned.
    fn lane_fault_or(
        &self,
        coupon: Option<i64>,
        error: anyhow::Error,
        doing: &'static str,
    ) -> anyhow::Result<()> {
        match coupon {
            Some(coupon) if is_lane_fault(&error) => {
                let wait = self.lane_failed(coupon);
                tracing::warn!(coupon, retry_in_ms = wait.as_millis() as u64,
                    error = %format!("{error:#}"),
                    "{doing} a coupon's outbox failed; the other outboxes go on, this one is retried later");
                Ok(())
            }
            _ => Err(error),
        }
    }

    /// A lane that worked is no longer failing.
    fn lane_recovered(&self, coupon: Option<i64>) {
        if let (Layout::PerCoupon(state), Some(coupon)) = (&self.layout, coupon)
            && let Ok(mut failing) = state.failing.lock()
            && failing.remove(&coupon).is_some()
        {
            tracing::info!(coupon, "coupon lane works again");
            self.metrics.coupon_lanes_failing.set(failing.len() as i64);
        }
    }

    /// Lanes waiting out a failure of their own.
    fn failing_lanes(&self) -> u64 {
        match &self.layout {
            Layout::PerCoupon(state) => state.failing.lock().map_or(0, |f| f.len() as u64),
            Layout::Single(_) => 0,
        }
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
            let batch_started = Instant::now();
            let head = match next_head.take() {
                Some(head) => head,
                None => match lane.decider.read_head().await {
                    Ok(head) => head,
                    Err(e) => break Err(e),
                },
            };
            if head.is_empty() {
                report.stopped = StopReason::QueueEmpty;
                break Ok(());
            }
            // Only now that there is something to decide. Cached: asks Redis at most once per
            // `pause_check` for all lanes.
            match self.drain_paused().await {
                Ok(true) => {
                    report.stopped = StopReason::Paused;
                    next_head = Some(head);
                    break Ok(());
                }
                Ok(false) => {}
                Err(e) => break Err(e),
            }
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
                    self.forget_reconciled();
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
        if batch[Outcome::Gone] > 0 {
            self.metrics
                .coupon_taken_by_others
                .inc_by(batch[Outcome::Gone]);
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
            self.log_ready.wrote(coupon);
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
                    // Idle: wait for a decision that issued, looking at the outbox(es) every
                    // second meanwhile (entries of another process, or found by a sweep) with
                    // the gauges' three reads; the persist script runs only for entries.
                    let _ = self.observe_depths().await;
                    loop {
                        tokio::select! {
                            _ = self.outbox_ready.notified() => break,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            _ = stop.cancelled() => break,
                        }
                        if !matches!(self.observe_depths().await, Ok(0)) {
                            break;
                        }
                    }
                    if stop.is_cancelled() {
                        break;
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
        // Every queue, also those whose coupon is not marked active.
        self.sweep_at_next_look();
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
