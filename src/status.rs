//! `commerce-worker status`: the worker's health at a glance, read from Redis alone so it works
//! from any host and sees every replica's work: per coupon and in total the queue, outbox and
//! dead-letter depths and oldest ages, each job's last run (as recorded by whichever replica ran
//! it), the ranking's day and age, pause flags and the replicas alive now. Each threshold crossed
//! is a problem; any problem makes the command exit 1 ("needs a person").
//!
//! In the per-coupon layout every coupon has its own keys, so the figures per coupon are exact.
//! In the single-queue layout one queue holds every coupon: the breakdown per coupon is computed
//! from the first [`BREAKDOWN_LIMIT`] entries of each key (the oldest ones, which are the ones
//! that matter) and marked partial beyond that; the totals are always exact.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, Utc};
use fred::prelude::*;
use serde::Serialize;

use crate::config::Config;
use crate::control::{self, Heartbeat, JobRun};
use crate::keys::KeyTemplates;

pub(crate) use crate::metrics::JOBS;

/// Entries per key read for the per-coupon breakdown of a shared queue, outbox or dead-letter
/// stream.
pub(crate) const BREAKDOWN_LIMIT: i64 = 100_000;

/// `status` found something that needs a person: the process exits 1.
#[derive(Debug, thiserror::Error)]
#[error("something needs a person (see above)")]
pub(crate) struct NeedsAPerson;

/// When `status` says a person is needed: `[status]` in worker.toml.
pub(crate) use crate::config::StatusConfig as Thresholds;

/// The figures of one coupon, or of all of them (`coupon: None`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct Depths {
    pub coupon: Option<i64>,
    pub queue_depth: u64,
    pub queue_oldest_age_secs: Option<f64>,
    pub outbox_depth: u64,
    pub outbox_oldest_age_secs: Option<f64>,
    pub dead_letters: u64,
    /// Dead letters by reason (the reason's text before its first `:`).
    pub dead_by_reason: BTreeMap<String, u64>,
    /// Ranking-log rows waiting for MySQL; `None` where the backlog is not kept per coupon.
    pub log_backlog: Option<u64>,
    /// Entries in the ranking-log dead-letter stream (`<log>:dead`: rows MySQL rejected for
    /// good, each entry one decided batch's rows); `None` where it is not kept per coupon.
    pub log_dead_letters: Option<u64>,
    /// The rows those entries hold (counted over the first [`BREAKDOWN_LIMIT`] entries).
    pub log_dead_rows: Option<u64>,
    /// Issued coupons `user_coupon` refused (a unique key other than `(user_id, coupon_id)`),
    /// waiting in `<outbox>:dead` for a person.
    pub outbox_refused: u64,
    /// Why this lane fails (one of its keys has the wrong type, so every drain, persister or
    /// log reader step on it fails), as `status` found it; `None` when its keys are sound. The
    /// figures of a key of the wrong type read 0.
    pub lane_error: Option<String>,
}

impl Depths {
    fn add(&mut self, other: &Depths) {
        self.queue_depth += other.queue_depth;
        self.outbox_depth += other.outbox_depth;
        self.outbox_refused += other.outbox_refused;
        self.dead_letters += other.dead_letters;
        self.log_backlog = add_known(self.log_backlog, other.log_backlog);
        self.log_dead_letters = add_known(self.log_dead_letters, other.log_dead_letters);
        self.log_dead_rows = add_known(self.log_dead_rows, other.log_dead_rows);
        self.queue_oldest_age_secs =
            max_age(self.queue_oldest_age_secs, other.queue_oldest_age_secs);
        self.outbox_oldest_age_secs =
            max_age(self.outbox_oldest_age_secs, other.outbox_oldest_age_secs);
        for (reason, n) in &other.dead_by_reason {
            *self.dead_by_reason.entry(reason.clone()).or_default() += n;
        }
    }
}

fn add_known(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a + b),
        (a, b) => a.or(b),
    }
}

fn max_age(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct JobStatus {
    pub job: &'static str,
    pub last_run: Option<JobRun>,
    pub last_ok: Option<JobRun>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct RankingStatus {
    pub built_for: Option<NaiveDate>,
    /// Since the live ranking was swapped in (its live record's `built_at`).
    pub age_secs: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct PauseStatus {
    pub part: String,
    pub since: Option<DateTime<Utc>>,
    pub by: Option<String>,
}

/// A lane that fails with a fault of its own.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct FailingLane {
    /// `None`: the single queue's lane.
    pub coupon: Option<i64>,
    pub error: String,
}

/// Everything `status` shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct StatusReport {
    pub at: DateTime<Utc>,
    pub layout: &'static str,
    pub total: Depths,
    pub coupons: Vec<Depths>,
    /// The per-coupon breakdown covers only the oldest [`BREAKDOWN_LIMIT`] entries of a key.
    pub breakdown_partial: bool,
    pub jobs: Vec<JobStatus>,
    pub ranking: RankingStatus,
    pub paused: Vec<PauseStatus>,
    pub replicas: Vec<Heartbeat>,
    /// Lanes whose keys have the wrong type (per coupon: that coupon's requests wait in its
    /// queue while every other coupon is decided; single queue: the drain stops).
    pub failing_lanes: Vec<FailingLane>,
    pub thresholds: Thresholds,
    /// What needs a person; empty when healthy.
    pub problems: Vec<String>,
}

impl StatusReport {
    pub(crate) fn healthy(&self) -> bool {
        self.problems.is_empty()
    }

    /// The human-readable form.
    pub(crate) fn to_table(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let age = |a: Option<f64>| a.map(format_age).unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "commerce-worker status at {} ({} layout)\n",
            self.at.format("%Y-%m-%d %H:%M:%S UTC"),
            self.layout
        );
        let _ = writeln!(
            out,
            "{:<12} {:>10} {:>10} {:>10} {:>10} {:>8} {:>12} {:>14}",
            "coupon", "queue", "oldest", "outbox", "oldest", "dead", "log backlog", "log dead rows"
        );
        let rows = self.coupons.iter().chain(std::iter::once(&self.total));
        for d in rows {
            let mut name = d
                .coupon
                .map(|c| c.to_string())
                .unwrap_or_else(|| "total".into());
            if d.coupon.is_some() && d.lane_error.is_some() {
                name.push_str(" FAILING");
            }
            let known = |n: Option<u64>| n.map(|n| n.to_string()).unwrap_or_else(|| "-".into());
            let _ = writeln!(
                out,
                "{:<12} {:>10} {:>10} {:>10} {:>10} {:>8} {:>12} {:>14}",
                name,
                d.queue_depth,
                age(d.queue_oldest_age_secs),
                d.outbox_depth,
                age(d.outbox_oldest_age_secs),
                d.dead_letters,
                known(d.log_backlog),
                known(d.log_dead_rows)
            );
        }
        if self.breakdown_partial {
            let _ = writeln!(
                out,
                "(per coupon: the oldest {BREAKDOWN_LIMIT} entries of each key; totals are exact)"
            );
        }
        if !self.failing_lanes.is_empty() {
            let _ = writeln!(
                out,
                "\nfailing coupon lanes (their requests wait in their queues until the key is repaired):"
            );
            for lane in &self.failing_lanes {
                let name = lane
                    .coupon
                    .map_or_else(|| "queue".to_owned(), |c| format!("coupon {c}"));
                let _ = writeln!(out, "  {name}: {}", lane.error);
            }
        }
        if self.total.outbox_refused > 0 {
            let _ = writeln!(
                out,
                "\nissued coupons user_coupon refused (a unique key other than (user_id, coupon_id)): {} (`XRANGE <outbox>:dead - +` shows each with MySQL's error; `requeue-outbox-dead` once the table is fixed)",
                self.total.outbox_refused
            );
        }
        if let Some(entries @ 1..) = self.total.log_dead_letters {
            let _ = writeln!(
                out,
                "\nranking-log rows MySQL rejected for good: {} in {entries} entries (`XRANGE <log>:dead - +` shows each error; `requeue-log-dead` writes them again)",
                self.total.log_dead_rows.unwrap_or(0)
            );
        }
        if !self.total.dead_by_reason.is_empty() {
            let _ = writeln!(out, "\ndead letters by reason:");
            for (reason, n) in &self.total.dead_by_reason {
                let _ = writeln!(out, "  {n:>8}  {reason}");
            }
        }
        let _ = writeln!(out, "\njobs:");
        for job in &self.jobs {
            let describe = |run: &Option<JobRun>| match run {
                Some(run) => format!(
                    "{} {} ago on {} ({} ms){}",
                    run.result,
                    format_age(secs_since(self.at, run.finished_at())),
                    run.replica,
                    run.duration_ms,
                    run.error
                        .as_ref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                ),
                None => "never recorded".into(),
            };
            let _ = writeln!(
                out,
                "  {:<16} last run: {}; last ok: {}",
                job.job,
                describe(&job.last_run),
                describe(&job.last_ok)
            );
        }
        let _ = writeln!(
            out,
            "\nranking: built for {}, {}",
            self.ranking
                .built_for
                .map(|d| d.to_string())
                .unwrap_or_else(|| "no day yet".into()),
            self.ranking
                .age_secs
                .map(|a| format!("{} ago", format_age(a)))
                .unwrap_or_else(|| "age unknown".into())
        );
        if self.paused.is_empty() {
            let _ = writeln!(out, "paused: nothing");
        } else {
            for p in &self.paused {
                let _ = writeln!(
                    out,
                    "paused: {} since {} by {}",
                    p.part,
                    p.since
                        .map(|s| s.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                        .unwrap_or_else(|| "?".into()),
                    p.by.as_deref().unwrap_or("?")
                );
            }
        }
        let _ = writeln!(out, "replicas alive: {}", self.replicas.len());
        for r in &self.replicas {
            let _ = writeln!(
                out,
                "  {} (v{}, up {}, seen {} ago)",
                r.replica,
                r.version,
                format_age(secs_since(self.at, r.started_at)),
                format_age(secs_since(self.at, r.seen_at))
            );
        }
        if self.problems.is_empty() {
            let _ = writeln!(out, "\nhealthy");
        } else {
            let _ = writeln!(out, "\nneeds a person:");
            for p in &self.problems {
                let _ = writeln!(out, "  - {p}");
            }
        }
        out
    }
}

fn secs_since(now: DateTime<Utc>, then: DateTime<Utc>) -> f64 {
    (now - then).num_milliseconds().max(0) as f64 / 1000.0
}

/// `42s`, `3m 5s`, `2h 10m`, `3d 4h`.
pub(crate) fn format_age(secs: f64) -> String {
    let s = secs.max(0.0);
    if s < 60.0 {
        return format!("{s:.1}s");
    }
    let s = s as u64;
    match s {
        0..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

/// The reason's class: its text before the first `:` (`stock is not a non-negative integer`).
fn reason_class(reason: &str) -> String {
    reason.split(':').next().unwrap_or(reason).trim().to_owned()
}

fn coupon_of(member: &str) -> Option<i64> {
    member
        .rsplit_once(':')
        .and_then(|(_, c)| crate::coupon::member::parse_id(c))
}

/// The figures of `member`'s coupon in `per`, added on first sight (`None`: the member names no
/// coupon).
fn depths_of<'a>(per: &'a mut BTreeMap<i64, Depths>, member: &str) -> Option<&'a mut Depths> {
    let coupon = coupon_of(member)?;
    Some(per.entry(coupon).or_insert_with(|| Depths {
        coupon: Some(coupon),
        ..Depths::default()
    }))
}

fn age_of_score_ms(now_ms: f64, score: f64) -> f64 {
    ((now_ms - score) / 1000.0).max(0.0)
}

/// Reads everything `status` shows.
pub(crate) async fn gather(config: &Config) -> anyhow::Result<StatusReport> {
    let client = crate::backends::connect_redis(&config.redis).await?;
    gather_from(&client, config, config.status.clone()).await
}

/// [`gather`] with a connected client and the thresholds to judge by (`[status]`).
pub(crate) async fn gather_from(
    client: &Client,
    config: &Config,
    thresholds: Thresholds,
) -> anyhow::Result<StatusReport> {
    let keys = &config.keys;
    let at = Utc::now();
    let now_ms = at.timestamp_millis() as f64;
    let (coupons, total, breakdown_partial) = if keys.per_coupon() {
        let mut ids = crate::coupon::registered_coupons(client, keys).await?;
        // Coupons removed from the registry whose log rows (or log dead letters) are still in
        // Redis count too.
        for key in crate::backends::scan_keys(client, &keys.log_pattern()).await? {
            if let Some(id) = keys.coupon_of_log(&key) {
                ids.push(id);
            }
        }
        // And those whose issued coupons user_coupon refused wait in `<outbox>:dead`.
        for key in crate::backends::scan_keys(client, &keys.outbox_dead_pattern()).await? {
            if let Some(id) = keys.coupon_of_outbox_dead(&key) {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        ids.dedup();
        let mut coupons = Vec::with_capacity(ids.len());
        for id in ids {
            let mut d = lane_depths(client, &keys.for_coupon(id), now_ms).await?;
            d.coupon = Some(id);
            coupons.push(d);
        }
        let mut total = Depths::default();
        for d in &coupons {
            total.add(d);
        }
        (coupons, total, false)
    } else {
        shared_depths(client, keys, now_ms).await?
    };

    let mut jobs = Vec::new();
    for job in JOBS {
        let (last_run, last_ok) = control::job_runs(client, keys, job).await?;
        jobs.push(JobStatus {
            job,
            last_run,
            last_ok,
        });
    }
    let live = crate::ranking::RankingRebuild::new(
        client.clone(),
        keys.clone(),
        config.ranking.clone(),
        crate::metrics::Metrics::new(),
    )
    .live()
    .await?;
    let ranking = RankingStatus {
        built_for: live.as_ref().map(|l| l.day),
        age_secs: live.map(|l| secs_since(at, l.built_at)),
    };
    let paused = control::pause_records(client, keys)
        .await?
        .into_iter()
        .map(|(part, record)| PauseStatus {
            part,
            since: record.as_ref().map(|r| r.since),
            by: record.map(|r| r.by),
        })
        .collect();
    let replicas = control::live_replicas(client, keys).await?;
    let failing_lanes = if keys.per_coupon() {
        coupons
            .iter()
            .filter_map(|d| {
                Some(FailingLane {
                    coupon: d.coupon,
                    error: d.lane_error.clone()?,
                })
            })
            .collect()
    } else {
        total
            .lane_error
            .iter()
            .map(|error| FailingLane {
                coupon: None,
                error: error.clone(),
            })
            .collect()
    };
    let mut report = StatusReport {
        at,
        layout: if keys.per_coupon() {
            "per-coupon"
        } else {
            "single-queue"
        },
        total,
        coupons,
        breakdown_partial,
        jobs,
        ranking,
        paused,
        replicas,
        failing_lanes,
        thresholds,
        problems: Vec::new(),
    };
    report.problems = judge(&report);
    Ok(report)
}

/// The lane's keys that a fault of their own can break (what `decide.lua` and the persister
/// check before they write), with the type each must have when it exists.
fn lane_key_types(lane: &KeyTemplates) -> [(String, &'static str); 7] {
    [
        (crate::coupon::outbox_dead_key(&lane.outbox), "stream"),
        (lane.queue.clone(), "zset"),
        (lane.outbox.clone(), "zset"),
        (lane.dead.clone(), "stream"),
        (lane.log.clone(), "stream"),
        (lane.log_rows(), "string"),
        (lane.log_dead(), "stream"),
    ]
}

/// One lane's exact figures (a coupon's own keys, or the shared keys' totals). A key of the
/// wrong type — what makes the drain leave a coupon's lane failing — is reported in
/// [`Depths::lane_error`] and its figures read 0, so one broken lane does not hide the others.
async fn lane_depths(client: &Client, lane: &KeyTemplates, now_ms: f64) -> anyhow::Result<Depths> {
    let expected = lane_key_types(lane);
    let types = futures_util::future::try_join_all(
        expected
            .iter()
            .map(|(key, _)| client.r#type::<String, _>(key.as_str())),
    )
    .await?;
    let mut wrong = Vec::new();
    for ((key, want), have) in expected.iter().zip(&types) {
        if have != "none" && have != want {
            wrong.push(format!("WRONGTYPE {key} is a {have}, expected a {want}"));
        }
    }
    let sound = |key: &str| {
        expected
            .iter()
            .zip(&types)
            .any(|((k, want), have)| k == key && (have == "none" || have == want))
    };
    let oldest = |key: String| async move {
        // Members as bytes: the API may have written one that is not UTF-8 (it is malformed
        // and dead-lettered by the drain; until then it must not fail `status`).
        let head: Vec<(Value, f64)> = client.zrange(&key, 0, 0, None, false, None, true).await?;
        anyhow::Ok(
            head.first()
                .map(|(_, score)| age_of_score_ms(now_ms, *score)),
        )
    };
    let mut d = Depths {
        lane_error: (!wrong.is_empty()).then(|| wrong.join("; ")),
        ..Depths::default()
    };
    if sound(&lane.queue) {
        d.queue_depth = client.zcard(&lane.queue).await?;
        d.queue_oldest_age_secs = oldest(lane.queue.clone()).await?;
    }
    if sound(&lane.outbox) {
        d.outbox_depth = client.zcard(&lane.outbox).await?;
        d.outbox_oldest_age_secs = oldest(lane.outbox.clone()).await?;
    }
    let outbox_dead = crate::coupon::outbox_dead_key(&lane.outbox);
    if sound(&outbox_dead) {
        d.outbox_refused = client.xlen(&outbox_dead).await?;
    }
    if sound(&lane.dead) {
        d.dead_letters = client.xlen(&lane.dead).await?;
        for (_, reason) in dead_entries(client, &lane.dead).await? {
            *d.dead_by_reason.entry(reason_class(&reason)).or_default() += 1;
        }
    }
    // An empty log stream holds no rows, whatever its counter says (entries deleted by hand
    // leave it behind).
    d.log_backlog = Some(
        if !sound(&lane.log) || client.xlen::<u64, _>(&lane.log).await? == 0 {
            0
        } else if sound(&lane.log_rows()) {
            client
                .get::<Option<i64>, _>(lane.log_rows())
                .await?
                .unwrap_or(0)
                .max(0) as u64
        } else {
            0
        },
    );
    let (log_dead, log_dead_rows) = if sound(&lane.log_dead()) {
        log_dead_letters(client, &lane.log_dead()).await?
    } else {
        (0, 0)
    };
    d.log_dead_letters = Some(log_dead);
    d.log_dead_rows = Some(log_dead_rows);
    Ok(d)
}

/// Entries and rows in one ranking-log dead-letter stream (rows counted over its first
/// [`BREAKDOWN_LIMIT`] entries: each entry's `o` field holds one outcome letter per row).
async fn log_dead_letters(client: &Client, stream: &str) -> anyhow::Result<(u64, u64)> {
    let entries: u64 = client.xlen(stream).await?;
    if entries == 0 {
        return Ok((0, 0));
    }
    // Values as bytes: an entry kept with fields that are not UTF-8 is counted, not an error.
    let read: Vec<(String, std::collections::HashMap<String, Value>)> = client
        .xrange(stream, "-", "+", Some(BREAKDOWN_LIMIT as u64))
        .await?;
    let rows = read
        .iter()
        .map(|(_, fields)| {
            fields
                .get("o")
                .and_then(Value::as_bytes)
                .map_or(0, |o| o.len() as u64)
        })
        .sum();
    Ok((entries, rows))
}

/// (member, reason) of the first [`BREAKDOWN_LIMIT`] dead letters.
async fn dead_entries(client: &Client, stream: &str) -> anyhow::Result<Vec<(String, String)>> {
    // Values as bytes: a dead letter's member need not be UTF-8 (the API wrote it).
    let entries: Vec<(String, std::collections::HashMap<String, Value>)> = client
        .xrange(stream, "-", "+", Some(BREAKDOWN_LIMIT as u64))
        .await?;
    let text = |v: Option<Value>| {
        crate::coupon::member_text(v.as_ref().and_then(Value::as_bytes).unwrap_or_default())
    };
    Ok(entries
        .into_iter()
        .map(|(_, mut f)| (text(f.remove("member")), text(f.remove("reason"))))
        .collect())
}

/// The single-queue layout: exact totals, and a breakdown per coupon from the oldest entries.
async fn shared_depths(
    client: &Client,
    keys: &KeyTemplates,
    now_ms: f64,
) -> anyhow::Result<(Vec<Depths>, Depths, bool)> {
    let total = lane_depths(client, keys, now_ms).await?;
    let mut per: BTreeMap<i64, Depths> = BTreeMap::new();
    if total.lane_error.is_some() {
        // The shared keys are broken: the exact totals are all there is to show.
        return Ok((Vec::new(), total, false));
    }
    for (key, is_queue) in [(&keys.queue, true), (&keys.outbox, false)] {
        // Members as bytes (see `lane_depths`).
        let head: Vec<(Value, f64)> = client
            .zrange(
                key.as_str(),
                0,
                BREAKDOWN_LIMIT - 1,
                None,
                false,
                None,
                true,
            )
            .await?;
        for (member, score) in head {
            let member = crate::coupon::member_text(member.as_bytes().unwrap_or_default());
            let Some(d) = depths_of(&mut per, &member) else {
                continue;
            };
            let age = Some(age_of_score_ms(now_ms, score));
            if is_queue {
                d.queue_depth += 1;
                d.queue_oldest_age_secs = max_age(d.queue_oldest_age_secs, age);
            } else {
                d.outbox_depth += 1;
                d.outbox_oldest_age_secs = max_age(d.outbox_oldest_age_secs, age);
            }
        }
    }
    for (member, reason) in dead_entries(client, &keys.dead).await? {
        let Some(d) = depths_of(&mut per, &member) else {
            continue;
        };
        d.dead_letters += 1;
        *d.dead_by_reason.entry(reason_class(&reason)).or_default() += 1;
    }
    let limit = BREAKDOWN_LIMIT as u64;
    let partial =
        total.queue_depth > limit || total.outbox_depth > limit || total.dead_letters > limit;
    Ok((per.into_values().collect(), total, partial))
}

/// `age`, as [`format_age`] says it, when it is over `threshold_secs`.
fn over(age: Option<f64>, threshold_secs: u64) -> Option<String> {
    age.filter(|&age| age > threshold_secs as f64)
        .map(format_age)
}

/// What needs a person, judged against the thresholds.
fn judge(report: &StatusReport) -> Vec<String> {
    let t = &report.thresholds;
    let mut problems = Vec::new();
    if let Some(age) = over(report.total.queue_oldest_age_secs, t.oldest_waiting_secs) {
        problems.push(format!(
            "the oldest queued request has waited {age} (threshold {}s)",
            t.oldest_waiting_secs
        ));
    }
    if let Some(age) = over(report.total.outbox_oldest_age_secs, t.outbox_oldest_secs) {
        problems.push(format!(
            "an issued coupon has waited {age} for MySQL (threshold {}s)",
            t.outbox_oldest_secs
        ));
    }
    if report.total.outbox_refused > 0 {
        problems.push(format!(
            "{} issued coupon(s) user_coupon refused (a unique key other than (user_id, coupon_id) holds their value): `XRANGE <outbox>:dead - +` shows MySQL's error; fix the table, then `requeue-outbox-dead`",
            report.total.outbox_refused
        ));
    }
    if report.total.dead_letters > t.dead_letters {
        problems.push(format!(
            "{} dead-lettered entries (threshold {}): `requeue-dead --dry-run` lists them",
            report.total.dead_letters, t.dead_letters
        ));
    }
    if let Some(backlog) = report.total.log_backlog
        && backlog > t.log_backlog
    {
        problems.push(format!(
            "{backlog} ranking-log rows waiting for MySQL (threshold {})",
            t.log_backlog
        ));
    }
    if let Some(entries) = report.total.log_dead_letters
        && entries > t.log_dead_letters
    {
        problems.push(format!(
            "{} ranking-log rows MySQL rejected for good, in {entries} entries of the log dead-letter stream(s) (threshold {}): fix the cause (`XRANGE <log>:dead - +` shows each error), then `requeue-log-dead`",
            report.total.log_dead_rows.unwrap_or(0),
            t.log_dead_letters
        ));
    }
    if !report.failing_lanes.is_empty() {
        let lanes: Vec<String> = report
            .failing_lanes
            .iter()
            .map(|lane| match lane.coupon {
                Some(c) => format!("coupon {c} ({})", lane.error),
                None => format!("the queue ({})", lane.error),
            })
            .collect();
        problems.push(format!(
            "{} coupon lane(s) failing, their requests waiting until the key is repaired: {}",
            lanes.len(),
            lanes.join(", ")
        ));
    }
    if let Some(drain) = report.jobs.iter().find(|j| j.job == "coupon_drain") {
        match &drain.last_run {
            None => problems.push("no coupon drain run recorded by any replica".into()),
            Some(run) => {
                let silent = secs_since(report.at, run.finished_at());
                if let Some(silent) = over(Some(silent), t.drain_silent_secs) {
                    problems.push(format!(
                        "no coupon drain run for {silent} (threshold {}s)",
                        t.drain_silent_secs
                    ));
                } else if run.result == "error" {
                    problems.push(format!(
                        "the last coupon drain run failed: {}",
                        run.error.as_deref().unwrap_or("?")
                    ));
                }
            }
        }
    }
    match report.ranking.age_secs {
        Some(age) if age <= t.ranking_max_age_hours as f64 * 3600.0 => {}
        Some(age) => problems.push(format!(
            "the ranking was last rebuilt {} ago (threshold {}h)",
            format_age(age),
            t.ranking_max_age_hours
        )),
        None => problems.push("no successful ranking rebuild recorded".into()),
    }
    for p in &report.paused {
        let paused_for = p.since.map(|s| secs_since(report.at, s));
        if paused_for.is_none_or(|s| s > t.paused_max_secs as f64) {
            problems.push(format!(
                "{} paused for {} (threshold {}s): `commerce-worker resume --{}`",
                p.part,
                paused_for.map(format_age).unwrap_or_else(|| "?".into()),
                t.paused_max_secs,
                p.part
            ));
        }
    }
    if (report.replicas.len() as u64) < t.min_replicas {
        problems.push(format!(
            "{} replica(s) alive (threshold {})",
            report.replicas.len(),
            t.min_replicas
        ));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_as_a_person_would_say_them() {
        assert_eq!(format_age(3.25), "3.2s");
        assert_eq!(format_age(185.0), "3m 5s");
        assert_eq!(format_age(7800.0), "2h 10m");
        assert_eq!(format_age(3.0 * 86400.0 + 4.0 * 3600.0), "3d 4h");
    }

    #[test]
    fn reasons_group_by_their_text_before_the_detail() {
        assert_eq!(
            reason_class("stock is not a non-negative integer: ten"),
            "stock is not a non-negative integer"
        );
        assert_eq!(
            reason_class("malformed member: bad userId"),
            "malformed member"
        );
        assert_eq!(coupon_of("12:7"), Some(7));
        assert_eq!(coupon_of("12:07"), None);
    }
}
