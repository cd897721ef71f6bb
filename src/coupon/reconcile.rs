//! Reconciling Redis from MySQL, the system of record for issued coupons (docs/contract.md §2,
//! README "When Redis forgets").
//!
//! Redis acknowledges writes before they are durable: a restart from an older snapshot or AOF,
//! or a failover to a lagging replica, forgets coupons that already reached `user_coupon`.
//! Deciding on against such a Redis would issue them a second time, beyond the stock.
//!
//! How a forgetful Redis is noticed: each lane (the single queue, or one coupon's queue in the
//! per-coupon layout) has a marker key beside its outbox holding the *identity* of the Redis last
//! reconciled — its `run_id`, which changes on every restart, restore and failover, and its
//! replication id. `decide.lua` and the persister's read (`outbox_read.lua`) compare it with the
//! live identity inside their own atomic step and refuse with `UNRECONCILED` when they differ
//! (an empty Redis has no marker at all). No process memory is involved, so it works the same for
//! every replica and across restarts of the worker.
//!
//! What reconciliation does, for one lane ([`Reconciler::reconcile`]):
//! 1. read the live identity;
//! 2. write it to MySQL's `redis_fence` row for the lane. The persister inserts only inside a
//!    transaction holding that row in share mode and naming the identity it read its outbox from,
//!    so this write waits for inserts in flight, and later inserts from the replaced Redis find a
//!    different identity and are dropped (that Redis and its outbox are gone; nobody holds those
//!    coupons). After it, every row a replaced Redis could still add is in `user_coupon`;
//! 3. per coupon, first the decisions Redis forgot: the `ranking_logs` rows ranked above the seq
//!    Redis came back with (index `(coupon_type, rank)`; none unless it rolled back), in chunks
//!    of [`CHUNK`] rows (`forgotten.lua`). A queue entry of the same member scored (the API's
//!    enqueue time) no later than the row's `timestamp` (the decision time: Redis' clock in
//!    the decide step, the id of its log stream entry) is that request put back by the
//!    rollback: removed, and its result put back (never over ISSUED), so it keeps its one
//!    outcome. An entry scored later is a new request and stays. An ISSUED row `user_coupon`
//!    lacks (its outbox entry was rolled back before it was persisted) is honoured: holder,
//!    stock (never below 0) and the outbox entry are put back. The API's and Redis'
//!    clocks are compared here: a skew larger than the enqueue-to-decision delay makes a put-back
//!    request look new (decided a second time, as before) or a new request look put back (it
//!    gets its previous outcome, which, with no restock in between, is the one it would get);
//!  - then, in chunks of [`CHUNK`] users (index `(coupon_id, user_id)`): every holder in
//!    MySQL that Redis lacks joins the issued set with `ISSUED` in the result hash, and the stock
//!    is decremented for it, never below 0 (`reconcile.lua`). If the queue still holds its
//!    member scored no later than the row's `issued_at`, that is the request that issued it
//!    (its ISSUED log row never reached `ranking_logs`, or step 3 would have removed it): taken
//!    from the queue and logged ISSUED, ranked after the highest rank, not decided again. What the stock cannot explain is
//!    an ERROR log and `commerce_worker_coupon_unexplained_rows`: a person must look;
//! 4. `coupon:seq` is raised to the highest rank already in `ranking_logs` for the coupon, so new
//!    decisions do not reuse ranks a rolled-back Redis handed out before;
//! 5. set the marker — only if the live identity is still the one reconciled.
//!
//! Every Redis step checks the identity, so a restart in the middle restarts the reconciliation.
//! Every step is safe to run twice and on several replicas at once.
//!
//! The ranking-log writer is fenced by the same row (`ranking_log::writer`): rows confirmed on
//! a reconciled Redis other than the one the row names are not written, so step 2 also stops
//! rows of a replaced Redis — an old primary still taking writes after a failover, a row in
//! flight when Redis rolled back — from landing after steps 3-4 read `ranking_logs`.
//!
//! Not covered: decisions other than issues whose log rows had not reached `ranking_logs` when
//! this runs (still in Redis' log stream, lost with it) are not known: their requests, put back
//! by the rollback, are decided anew (the old rows, fenced off, never land); a row written to
//! `user_coupon` by someone other than the worker after step 2 is only seen by the next
//! reconciliation.

use std::sync::Arc;

use anyhow::Context;
use chrono::{DateTime, Utc};
use fred::prelude::*;
use fred::types::scripts::Script;
use sqlx::MySqlPool;

use crate::keys::KeyTemplates;
use crate::metrics::Metrics;
use crate::mysql::{self, MYSQL_DEADLINE};

/// Every script that compares identities runs behind `identity.lua`, which computes the live
/// one; `reconcile.lua` and `forgotten.lua` also behind `reconcile_prelude.lua`: the identity
/// check, the key checks and the stock arithmetic they share.
const MARKER_LUA: &str = concat!(include_str!("identity.lua"), include_str!("marker.lua"));
const RECONCILE_LUA: &str = concat!(
    include_str!("identity.lua"),
    include_str!("reconcile_prelude.lua"),
    include_str!("reconcile.lua")
);
const FORGOTTEN_LUA: &str = concat!(
    include_str!("identity.lua"),
    include_str!("reconcile_prelude.lua"),
    include_str!("forgotten.lua")
);

/// Users per `reconcile.lua` call and per MySQL read.
pub(super) const CHUNK: usize = 2000;

/// Attempts when Redis changes again in the middle of a reconciliation.
const ATTEMPTS: usize = 5;

/// The error a script returns when the Redis it runs on has not been reconciled.
pub(super) const UNRECONCILED: &str = "UNRECONCILED";
const REDIS_CHANGED: &str = "REDIS_CHANGED";

/// Whether `error` (anywhere in its chain) is a script's `UNRECONCILED` refusal.
pub(super) fn is_unreconciled(error: &anyhow::Error) -> bool {
    error
        .chain()
        .any(|cause| cause.to_string().contains(UNRECONCILED))
}

fn is_redis_changed(error: &anyhow::Error) -> bool {
    error
        .chain()
        .any(|cause| cause.to_string().contains(REDIS_CHANGED))
}

/// What reconciliation found (and, unless a dry run, repaired) for one coupon.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CouponReport {
    pub coupon_id: i64,
    /// Rows in `user_coupon`.
    pub rows: u64,
    /// Holders in MySQL the issued set lacked (put back unless a dry run).
    pub missing: u64,
    /// Stock taken for them.
    pub taken: u64,
    /// Holders the stock could not explain (stock already 0, or no stock key): left for a person.
    pub unexplained: u64,
    /// Stock after (None: the coupon has no stock key).
    pub stock_after: Option<i64>,
    /// seq raised to this rank (the highest in `ranking_logs`).
    pub seq_raised_to: Option<i64>,
    /// `ranking_logs` rows ranked above the seq Redis came back with: decisions it forgot.
    pub forgotten: u64,
    /// Their requests the rollback had put back in the queue, removed (not decided again).
    pub requeued: u64,
    /// Results put back in the result hash from those rows.
    pub results_restored: u64,
    /// ISSUED rows among them `user_coupon` lacked (rolled back before being persisted): the
    /// user is a holder again and the coupon back in the outbox. Their stock is in `taken`, what
    /// the stock could not explain in `unexplained`.
    pub reissued: u64,
    /// Why the coupon's keys could not be reconciled (wrong type, stock not an integer): left
    /// alone, as the decide script leaves them (it dead-letters their requests).
    pub unusable: Option<String>,
    /// Among the `missing` holders, those whose issuing request was still queued (scored no
    /// later than `issued_at`) and no ISSUED row known: taken from the queue and logged ISSUED
    /// (so not decided again as the holder's DUPLICATE).
    pub issuing_logged: u64,
}

impl CouponReport {
    /// Whether Redis differed from MySQL for this coupon.
    pub fn differs(&self) -> bool {
        self.missing > 0
            || self.forgotten > 0
            || self.seq_raised_to.is_some()
            || self.unusable.is_some()
    }
}

/// One line for a coupon where Redis differed from MySQL (what `reconcile` prints).
impl std::fmt::Display for CouponReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "coupon {}: {} rows in user_coupon, {} missing from Redis' holders",
            self.coupon_id, self.rows, self.missing
        )?;
        if self.forgotten > 0 {
            write!(
                f,
                "; {} decisions logged above Redis' seq (forgotten by a rollback): {} of their \
                 requests back in the queue, {} results to restore, {} ISSUED rows not in user_coupon",
                self.forgotten, self.requeued, self.results_restored, self.reissued
            )?;
        }
        if self.issuing_logged > 0 {
            write!(
                f,
                "; {} of the missing holders' issuing requests still queued (logged ISSUED, not decided again)",
                self.issuing_logged
            )?;
        }
        if self.missing > 0 || self.reissued > 0 {
            write!(
                f,
                " (stock takes {}, {} beyond the stock",
                self.taken, self.unexplained
            )?;
            match self.stock_after {
                Some(stock) => write!(f, ", stock after {stock})")?,
                None => write!(f, ", no stock key)")?,
            }
        }
        if let Some(rank) = self.seq_raised_to {
            write!(f, "; seq below the logged rank {rank}")?;
        }
        if let Some(why) = &self.unusable {
            write!(f, "; left alone: {why}")?;
        }
        Ok(())
    }
}

/// One lane's reconciliation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaneReport {
    /// The lane's outbox key (the fence's scope).
    pub scope: String,
    /// The Redis reconciled.
    pub identity: String,
    /// Whether the marker already named this Redis.
    pub was_marked: bool,
    /// What MySQL's `redis_fence` row named before (`None`: no row; not read when the marker
    /// already named this Redis on the daemon's way).
    pub fence: Option<String>,
    pub coupons: Vec<CouponReport>,
}

impl LaneReport {
    /// The coupons where Redis differed from MySQL.
    pub fn differing(&self) -> impl Iterator<Item = &CouponReport> {
        self.coupons.iter().filter(|c| c.differs())
    }

    /// Whether MySQL's fence row named another Redis than this one (or was missing) although
    /// the marker named this one: what a restored MySQL or a second deployment leaves, which
    /// a plain `reconcile` rewrites.
    pub fn fence_differs(&self) -> bool {
        self.was_marked && self.fence.as_deref() != Some(self.identity.as_str())
    }
}

/// Reconciles one lane.
#[derive(Clone)]
pub struct Reconciler {
    client: Client,
    pool: MySqlPool,
    /// The lane's keys (queue, dead, outbox resolved).
    keys: KeyTemplates,
    /// The lane's coupon in the per-coupon layout; `None`: every coupon MySQL knows.
    coupon: Option<i64>,
    metrics: Metrics,
    marker_script: Script,
    chunk_script: Script,
    forgotten_script: Script,
    /// One reconciliation of this lane at a time in this process (others wait, then find it done).
    running: Arc<tokio::sync::Mutex<()>>,
}

impl Reconciler {
    pub fn new(
        client: Client,
        pool: MySqlPool,
        keys: KeyTemplates,
        coupon: Option<i64>,
        metrics: Metrics,
    ) -> Self {
        Self {
            client,
            pool,
            keys,
            coupon,
            metrics,
            marker_script: Script::from_lua(MARKER_LUA),
            chunk_script: Script::from_lua(RECONCILE_LUA),
            forgotten_script: Script::from_lua(FORGOTTEN_LUA),
            running: Arc::default(),
        }
    }

    /// `(live identity, marker)` of the lane's Redis.
    pub async fn identity(&self) -> anyhow::Result<(String, String)> {
        let (live, marker): (String, String) = self
            .marker_script
            .evalsha_with_reload(
                &self.client,
                vec![self.keys.reconciled_marker()],
                vec!["get"],
            )
            .await?;
        Ok((live, marker))
    }

    /// The lane's marker key (the identity of the Redis last reconciled).
    pub fn marker_key(&self) -> String {
        self.keys.reconciled_marker()
    }

    /// Reconciles the lane unless its marker already names the live Redis (the daemon's way,
    /// after a script refused with `UNRECONCILED`).
    pub async fn ensure(&self) -> anyhow::Result<LaneReport> {
        self.run(false, false, false).await
    }

    /// [`Self::ensure`] ahead of the lane's first request (the sweeper's way): the same work,
    /// logged per lane at DEBUG only — the sweeper logs one line for all the lanes it
    /// reconciles; what a coupon's reconciliation found is logged as always.
    pub async fn ensure_ahead(&self) -> anyhow::Result<LaneReport> {
        self.run(false, false, true).await
    }

    /// Compares every coupon of the lane with MySQL whatever the marker says and, unless
    /// `dry_run`, repairs Redis and sets the marker (the `reconcile` command).
    pub async fn reconcile(&self, dry_run: bool) -> anyhow::Result<LaneReport> {
        self.run(true, dry_run, false).await
    }

    /// What a persist refused by the fence (`mismatch`) means, and what is done about it:
    /// - the live Redis is not the reconciled one: it changed since the batch was read;
    ///   reconcile it ([`Self::ensure`]);
    /// - the fence names the live, reconciled Redis: it changed and was reconciled already;
    ///   nothing to do (the caller reads again);
    /// - the fence row is missing (truncated, MySQL restored from an older backup): nothing
    ///   about Redis tells, so the whole lane is reconciled again, which writes the row;
    /// - the fence names another Redis while this one is marked reconciled: MySQL restored or
    ///   failed over, or two deployments sharing one Redis or MySQL — possibly two live Redis
    ///   servers. Taking the fence over could let the other one's inserts be refused or its
    ///   decisions be overwritten, so a person decides: ERROR, `coupon_fence_conflicts`,
    ///   `reconcile --dry-run` lists it, a plain `reconcile` rewrites the fence. Returns an error.
    pub async fn after_fence_mismatch(
        &self,
        mismatch: &crate::coupon::outbox::FenceMismatch,
    ) -> anyhow::Result<()> {
        let scope = &self.keys.outbox;
        let (live, marker) = self.identity().await?;
        if marker != live {
            self.ensure().await?;
            return Ok(());
        }
        match mismatch.fence.as_deref() {
            Some(fence) if fence == live => Ok(()),
            None => {
                tracing::warn!(%scope, identity = %live,
                    "MySQL has no redis_fence row for this lane (truncated, or MySQL restored from an older backup); reconciling Redis from MySQL again");
                self.reconcile(false).await?;
                Ok(())
            }
            Some(fence) => {
                self.metrics.coupon_fence_conflicts.inc();
                tracing::error!(%scope, identity = %live, fence,
                    "MySQL's redis_fence names another Redis than the live one, which is marked reconciled (MySQL restored or failed over, or two deployments sharing one Redis or MySQL); nothing is persisted for this lane until a person runs `reconcile` (`reconcile --dry-run` shows it)");
                anyhow::bail!(
                    "redis_fence for {scope} names {fence}, not the live reconciled Redis {live}: run `reconcile` once understood"
                )
            }
        }
    }

    /// `quiet`: the per-lane "not the one last reconciled" and "reconciled" lines at DEBUG.
    async fn run(&self, always: bool, dry_run: bool, quiet: bool) -> anyhow::Result<LaneReport> {
        let _one_at_a_time = self.running.lock().await;
        let mut last_error = None;
        for _ in 0..ATTEMPTS {
            match self.attempt(always, dry_run, quiet).await {
                Ok(report) => return Ok(report),
                Err(e) if is_redis_changed(&e) => {
                    tracing::warn!(scope = %self.keys.outbox, error = %format!("{e:#}"),
                        "Redis changed during reconciliation; starting over");
                    last_error = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_error
            .unwrap_or_else(|| anyhow::anyhow!("reconciliation did not finish"))
            .context(format!("Redis kept changing during {ATTEMPTS} attempts")))
    }

    async fn attempt(
        &self,
        always: bool,
        dry_run: bool,
        quiet: bool,
    ) -> anyhow::Result<LaneReport> {
        let scope = self.keys.outbox.clone();
        let (identity, marker) = self.identity().await?;
        let mut report = LaneReport {
            scope: scope.clone(),
            identity: identity.clone(),
            was_marked: marker == identity,
            fence: None,
            coupons: Vec::new(),
        };
        if report.was_marked && !always {
            return Ok(report);
        }
        report.fence = mysql::with_deadline(&self.pool, MYSQL_DEADLINE, |conn| {
            let scope = scope.clone();
            Box::pin(async move {
                Ok(
                    sqlx::query_scalar("SELECT identity FROM redis_fence WHERE scope = ?")
                        .bind(&scope)
                        .fetch_optional(&mut *conn)
                        .await?,
                )
            })
        })
        .await
        .context("reading the lane's redis_fence")?;
        if report.fence_differs() {
            tracing::error!(%scope, %identity, fence = ?report.fence, dry_run,
                "MySQL's redis_fence does not name the live Redis although it is marked reconciled (MySQL restored or failed over, or two deployments sharing one Redis or MySQL); a reconcile that is not a dry run rewrites it");
        }
        if quiet {
            tracing::debug!(%scope, %identity, previous = %marker,
                "lane not reconciled for this Redis; reconciling it from MySQL ahead of its first request");
        } else {
            tracing::warn!(%scope, %identity, previous = %marker, dry_run,
                "Redis is not the one last reconciled (restart, restore, failover or a new Redis); reconciling from MySQL before deciding again");
        }
        if !dry_run {
            mysql::with_deadline(&self.pool, MYSQL_DEADLINE, |conn| {
                let (scope, identity) = (scope.clone(), identity.clone());
                Box::pin(async move {
                    sqlx::query(
                        "INSERT INTO redis_fence (scope, identity) VALUES (?, ?) \
                         ON DUPLICATE KEY UPDATE identity = ?",
                    )
                    .bind(&scope)
                    .bind(&identity)
                    .bind(&identity)
                    .execute(&mut *conn)
                    .await?;
                    Ok(())
                })
            })
            .await
            .context("fencing off inserts read from the replaced Redis")?;
        }
        let coupons = match self.coupon {
            Some(id) => vec![id],
            None => self.coupons_in_mysql().await?,
        };
        for (done, coupon_id) in coupons.iter().enumerate() {
            let coupon = self.coupon(*coupon_id, &identity, dry_run).await?;
            if coupon.differs() || coupon.rows > 0 {
                tracing::info!(%scope, coupon = coupon.coupon_id, rows = coupon.rows,
                    missing = coupon.missing, forgotten = coupon.forgotten,
                    requeued = coupon.requeued, results_restored = coupon.results_restored,
                    reissued = coupon.reissued, issuing_logged = coupon.issuing_logged,
                    taken = coupon.taken, unexplained = coupon.unexplained,
                    seq_raised_to = ?coupon.seq_raised_to, dry_run,
                    progress = format!("{}/{}", done + 1, coupons.len()), "coupon reconciled");
            }
            if coupon.unexplained > 0 {
                if coupon.stock_after.is_some() {
                    tracing::error!(coupon = coupon.coupon_id, unexplained = coupon.unexplained,
                        rows = coupon.rows, stock_after = ?coupon.stock_after,
                        "user_coupon holds more rows than the stock can explain; holders restored, stock left at 0: a person must look");
                } else {
                    tracing::error!(
                        coupon = coupon.coupon_id,
                        unexplained = coupon.unexplained,
                        rows = coupon.rows,
                        "user_coupon holds rows for a coupon that has no stock key in Redis; holders restored, no stock key created: re-create it (initial stock minus holders) before traffic resumes and run `reconcile`; a person must look"
                    );
                }
                if !dry_run {
                    self.metrics
                        .coupon_unexplained_rows
                        .inc_by(coupon.unexplained);
                }
            }
            if !dry_run {
                self.metrics
                    .coupon_rows_restored
                    .inc_by(coupon.missing + coupon.reissued);
            }
            report.coupons.push(coupon);
        }
        if !dry_run {
            let _: Vec<String> = self
                .marker_script
                .evalsha_with_reload(
                    &self.client,
                    vec![self.keys.reconciled_marker()],
                    vec!["set", identity.as_str()],
                )
                .await?;
            self.metrics.coupon_reconciliations.inc();
            let restored = report.coupons.iter().map(|c| c.missing).sum::<u64>();
            if quiet {
                tracing::debug!(%scope, %identity, restored, "lane reconciled from MySQL");
            } else {
                tracing::info!(%scope, %identity, coupons = report.coupons.len(), restored,
                    "Redis reconciled from MySQL; deciding again");
            }
        }
        Ok(report)
    }

    async fn coupons_in_mysql(&self) -> anyhow::Result<Vec<i64>> {
        coupons_in_mysql(&self.pool).await
    }

    async fn coupon(
        &self,
        coupon_id: i64,
        identity: &str,
        dry_run: bool,
    ) -> anyhow::Result<CouponReport> {
        let max_rank: i64 = mysql::with_deadline(&self.pool, MYSQL_DEADLINE, |conn| {
            Box::pin(async move {
                Ok(sqlx::query_scalar::<_, Option<i64>>(
                    "SELECT CAST(MAX(`rank`) AS SIGNED) FROM ranking_logs WHERE coupon_type = ?",
                )
                .bind(coupon_id.to_string())
                .fetch_one(&mut *conn)
                .await?
                .unwrap_or(0))
            })
        })
        .await
        .context("reading the highest logged rank")?;
        let mut report = CouponReport {
            coupon_id,
            ..CouponReport::default()
        };
        let keys = vec![
            self.keys.reconciled_marker(),
            self.keys.stock(coupon_id),
            self.keys.issued(coupon_id),
            self.keys.result(coupon_id),
            self.keys.seq(coupon_id),
            self.keys.queue.clone(),
            self.keys.log.clone(),
            self.keys.log_rows(),
        ];
        if !self
            .forgotten(coupon_id, identity, dry_run, &mut report)
            .await?
        {
            return Ok(report);
        }
        let mut after = 0_i64;
        loop {
            let users: Vec<(i64, chrono::NaiveDateTime)> =
                mysql::with_deadline(&self.pool, MYSQL_DEADLINE, |conn| {
                Box::pin(async move {
                    Ok(sqlx::query_as(
                        "SELECT user_id, issued_at FROM user_coupon WHERE coupon_id = ? AND user_id > ? \
                         ORDER BY user_id LIMIT ?",
                    )
                    .bind(coupon_id)
                    .bind(after)
                    .bind(CHUNK as i64)
                    .fetch_all(&mut *conn)
                    .await?)
                })
            })
            .await
            .with_context(|| format!("reading coupon {coupon_id}'s holders"))?;
            let last = users.last().map(|(user, _)| *user);
            report.rows += users.len() as u64;
            let mut args = vec![
                identity.to_owned(),
                if dry_run { "1" } else { "0" }.to_owned(),
                max_rank.to_string(),
                if dry_run { report.taken } else { 0 }.to_string(),
                coupon_id.to_string(),
            ];
            for (user, issued_at) in &users {
                args.push(user.to_string());
                args.push(issued_at.and_utc().timestamp_millis().to_string());
            }
            let reply: Vec<Value> = self
                .chunk_script
                .evalsha_with_reload(&self.client, keys.clone(), args)
                .await
                .with_context(|| format!("reconciling coupon {coupon_id} in Redis"))?;
            let numbers: Vec<i64> = reply.iter().take(5).filter_map(Value::as_i64).collect();
            let [missing, taken, unexplained, stock, raised] = numbers[..] else {
                anyhow::bail!("reconcile script returned {reply:?}");
            };
            if let Some(why) = reply.get(5).and_then(Value::as_string)
                && !why.is_empty()
            {
                tracing::error!(coupon = coupon_id, %why, rows = report.rows,
                    "coupon's keys cannot be reconciled; left alone for a person");
                report.unusable = Some(why);
                break;
            }
            report.missing += missing as u64;
            report.issuing_logged += reply.get(6).and_then(Value::as_i64).unwrap_or(0) as u64;
            report.taken += taken as u64;
            report.unexplained += unexplained as u64;
            report.stock_after = (stock >= 0).then_some(stock);
            if raised >= 0 {
                report.seq_raised_to = Some(raised);
            }
            match last {
                Some(last) if users.len() == CHUNK => after = last,
                _ => break,
            }
        }
        Ok(report)
    }
}

/// One `ranking_logs` row ranked above Redis' seq: `(id, user_id, rank, decided at, outcome or
/// '', whether user_coupon holds the user)`.
type ForgottenRow = (i64, i64, i64, DateTime<Utc>, String, i64);

impl Reconciler {
    /// Puts back the decisions Redis forgot for one coupon (step 3 of the module doc), in chunks
    /// of [`CHUNK`] rows in rank order: `forgotten.lua` per chunk. The rows are those ranked
    /// above the seq Redis holds now — none unless Redis lost decisions, found through the index
    /// `(coupon_type, rank)`. Returns false when the coupon's keys are unusable (`report.unusable`
    /// says why).
    async fn forgotten(
        &self,
        coupon_id: i64,
        identity: &str,
        dry_run: bool,
        report: &mut CouponReport,
    ) -> anyhow::Result<bool> {
        let seq_key = self.keys.seq(coupon_id);
        let seq: Option<String> = self
            .client
            .get(&seq_key)
            .await
            .with_context(|| format!("reading {seq_key}"))?;
        let seq = seq.unwrap_or_else(|| "0".to_owned());
        // Not a count: reconcile.lua reports the coupon as unusable.
        let Ok(seq_value) = seq.parse::<i64>() else {
            return Ok(true);
        };
        let keys = vec![
            self.keys.reconciled_marker(),
            self.keys.stock(coupon_id),
            self.keys.issued(coupon_id),
            self.keys.result(coupon_id),
            seq_key,
            self.keys.queue.clone(),
            self.keys.outbox.clone(),
        ];
        // Keyset pagination on (rank, id): a coupon's ranks are unique unless an older version
        // of the worker reused them.
        let (mut after_rank, mut after_id) = (seq_value, i64::MAX);
        loop {
            let rows: Vec<ForgottenRow> =
                mysql::with_deadline(&self.pool, MYSQL_DEADLINE, |conn| {
                    Box::pin(async move {
                        Ok(sqlx::query_as(
                            "SELECT r.id, r.user_id, CAST(r.`rank` AS SIGNED), r.`timestamp`, \
                         CASE WHEN r.status = 'ISSUED' THEN 'ISSUED' \
                              WHEN r.reason IN ('DUPLICATE', 'SOLD_OUT', 'UNKNOWN_COUPON') \
                              THEN CAST(r.reason AS CHAR) ELSE '' END, \
                         CAST(uc.user_id IS NOT NULL AS SIGNED) \
                         FROM ranking_logs r LEFT JOIN user_coupon uc \
                         ON uc.coupon_id = ? AND uc.user_id = r.user_id \
                         WHERE r.coupon_type = ? AND r.`rank` >= ? \
                         AND (r.`rank` > ? OR r.id > ?) \
                         ORDER BY r.`rank`, r.id LIMIT ?",
                        )
                        .bind(coupon_id)
                        .bind(coupon_id.to_string())
                        .bind(after_rank)
                        .bind(after_rank)
                        .bind(after_id)
                        .bind(CHUNK as i64)
                        .fetch_all(&mut *conn)
                        .await?)
                    })
                })
                .await
                .with_context(|| {
                    format!("reading coupon {coupon_id}'s decisions above rank {seq}")
                })?;
            let Some(&(last_id, _, last_rank, ..)) = rows.last() else {
                return Ok(true);
            };
            let mut args = vec![
                identity.to_owned(),
                if dry_run { "1" } else { "0" }.to_owned(),
                seq.clone(),
                if dry_run { report.taken } else { 0 }.to_string(),
            ];
            for (_, user, _, decided_at, outcome, persisted) in &rows {
                args.push(user.to_string());
                args.push(format!("{user}:{coupon_id}"));
                args.push(decided_at.timestamp_millis().to_string());
                args.push(outcome.clone());
                args.push(if *persisted != 0 { "1" } else { "0" }.to_owned());
            }
            let reply: Vec<Value> = self
                .forgotten_script
                .evalsha_with_reload(&self.client, keys.clone(), args)
                .await
                .with_context(|| {
                    format!("putting back coupon {coupon_id}'s forgotten decisions")
                })?;
            let numbers: Vec<i64> = reply.iter().take(7).filter_map(Value::as_i64).collect();
            let [n, requeued, restored, reissued, taken, unexplained, stock] = numbers[..] else {
                anyhow::bail!("forgotten-decisions script returned {reply:?}");
            };
            if let Some(why) = reply.get(7).and_then(Value::as_string)
                && !why.is_empty()
            {
                if why.starts_with("seq moved") {
                    tracing::info!(coupon = coupon_id, %why, "forgotten decisions already put back");
                    return Ok(true);
                }
                tracing::error!(coupon = coupon_id, %why,
                    "coupon's keys cannot be reconciled; left alone for a person");
                report.unusable = Some(why);
                return Ok(false);
            }
            report.forgotten += n as u64;
            report.requeued += requeued as u64;
            report.results_restored += restored as u64;
            report.reissued += reissued as u64;
            report.taken += taken as u64;
            report.unexplained += unexplained as u64;
            report.stock_after = (stock >= 0).then_some(stock);
            if rows.len() < CHUNK {
                return Ok(true);
            }
            (after_rank, after_id) = (last_rank, last_id);
        }
    }
}

/// Every coupon with a row in `user_coupon` or `ranking_logs`.
pub(super) async fn coupons_in_mysql(pool: &MySqlPool) -> anyhow::Result<Vec<i64>> {
    let (mut issued, logged) = mysql::with_deadline(pool, MYSQL_DEADLINE, |conn| {
        Box::pin(async move {
            let issued: Vec<i64> = sqlx::query_scalar("SELECT DISTINCT coupon_id FROM user_coupon")
                .fetch_all(&mut *conn)
                .await?;
            let logged: Vec<String> =
                sqlx::query_scalar("SELECT DISTINCT coupon_type FROM ranking_logs")
                    .fetch_all(&mut *conn)
                    .await?;
            Ok((issued, logged))
        })
    })
    .await
    .context("listing the coupons in MySQL")?;
    issued.extend(logged.iter().filter_map(|c| super::member::parse_id(c)));
    issued.sort_unstable();
    issued.dedup();
    Ok(issued)
}
