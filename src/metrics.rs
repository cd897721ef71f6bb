//! The Prometheus metrics every job reports, served as text by `GET /metrics`.
//!
//! One [`Metrics`] value owns a registry; it is cheap to clone (every metric is an `Arc` inside)
//! and is handed to each job, so there is no global state and tests can read the numbers a run
//! produced. Names carry the `commerce_worker_` prefix.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `issued`, `duplicate`, `sold_out`, `unknown_coupon` or `dead_lettered`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabel {
    /// `coupon_drain`, `coupon_persist`, `ranking_rebuild`.
    pub job: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobResultLabel {
    pub job: &'static str,
    /// `ok`, `error`, `skipped` (a tick that found the previous run still going) or `paused`
    /// (a drain tick while an operator paused the drain).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartLabel {
    /// `drain` or `persist`.
    pub part: &'static str,
}

/// The parts an operator can pause (`pause --drain/--persist`): the `paused` gauge's labels,
/// present from the start. [`crate::control`] pauses them.
pub const PAUSABLE: [&str; 2] = ["drain", "persist"];

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 1 ms .. ~65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Every metric the worker exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub coupon_outcomes: Family<OutcomeLabel, Counter>,
    pub coupon_queue_depth: Gauge,
    pub coupon_outbox_depth: Gauge,
    pub coupon_batch_duration: Histogram,
    pub coupon_oldest_waiting_age: Gauge<f64, AtomicU64>,
    pub coupon_decision_latency: Histogram,
    pub coupon_follow_polls: Counter,
    pub coupon_taken_by_others: Counter,
    pub coupon_lane_failures: Counter,
    pub coupon_lanes_failing: Gauge,
    pub coupon_sweeper: Gauge,
    pub coupon_rows_persisted: Counter,
    pub coupon_reconciliations: Counter,
    pub coupon_rows_restored: Counter,
    pub coupon_unexplained_rows: Counter,
    pub coupon_fence_conflicts: Counter,
    /// Issued coupons `user_coupon` refused (a unique key other than `(user_id, coupon_id)`),
    /// moved to `<outbox>:dead`.
    pub coupon_rows_refused: Counter,
    pub coupon_outbox_waiting_replicas: Gauge,
    pub ranking_products: Gauge,
    /// The day the live ranking was built for, as YYYYMMDD (0 until known).
    pub ranking_built_day: Gauge,
    /// When the live ranking was swapped in (Unix seconds, Redis' clock; 0 until known).
    pub ranking_built_timestamp: Gauge,
    pub ranking_log_channel_depth: Gauge,
    pub ranking_log_rows_written: Counter,
    pub ranking_log_rows_retried: Counter,
    pub ranking_log_backlog_rows: Gauge,
    pub ranking_log_backlog_oldest_age: Gauge<f64, AtomicU64>,
    pub ranking_log_rows_given_up: Counter,
    /// Entries in the log dead-letter streams (`<log>:dead`), each one batch's rows.
    pub ranking_log_dead_letters: Gauge,
    /// Entries this process had read that another reader took over while it was stalled.
    pub ranking_log_entries_taken_over: Counter,
    /// Entries not written because they are held on a reconciled Redis that MySQL's
    /// `redis_fence` row of their lane no longer names (an old primary after a failover).
    pub ranking_log_entries_fenced: Counter,
    pub ranking_log_batch_duration: Histogram,
    pub job_runs: Family<JobResultLabel, Counter>,
    pub job_duration: HistogramFamily<JobLabel>,
    pub job_last_success: Family<JobLabel, Gauge<f64, AtomicU64>>,
    pub paused: Family<PartLabel, Gauge>,
    pub coupon_outbox_oldest_age: Gauge<f64, AtomicU64>,
    pub coupon_dead_letters: Gauge,
    pub ready: Gauge,
}

/// The jobs whose runs are counted and recorded.
pub const JOBS: [&str; 2] = ["coupon_drain", "ranking_rebuild"];
/// The results a job run can have.
pub const JOB_RESULTS: [&str; 4] = ["ok", "error", "skipped", "paused"];
/// The outcomes a queue entry can have.
pub const OUTCOMES: [&str; 5] = [
    "issued",
    "duplicate",
    "sold_out",
    "unknown_coupon",
    "dead_lettered",
];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("commerce_worker");
        let coupon_outcomes = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "coupon_outcomes",
            "Coupon requests decided, by outcome",
            coupon_outcomes.clone(),
        );
        let coupon_queue_depth = Gauge::default();
        registry.register(
            "coupon_queue_depth",
            "Requests waiting in the coupon queue, as of the last drain tick",
            coupon_queue_depth.clone(),
        );
        let coupon_outbox_depth = Gauge::default();
        registry.register(
            "coupon_outbox_depth",
            "Issued coupons not yet confirmed in MySQL",
            coupon_outbox_depth.clone(),
        );
        let coupon_batch_duration = duration_histogram();
        registry.register(
            "coupon_batch_duration_seconds",
            "Time to decide one batch of queue entries (read + Lua script)",
            coupon_batch_duration.clone(),
        );
        let coupon_oldest_waiting_age = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "coupon_oldest_waiting_age_seconds",
            "Age of the oldest request left waiting in any coupon queue after the last tick or follow step (its score against the clock; 0 when every queue it looked at was emptied)",
            coupon_oldest_waiting_age.clone(),
        );
        let coupon_decision_latency = duration_histogram();
        registry.register(
            "coupon_decision_latency_seconds",
            "Time from a request's enqueue (its score) to its decision",
            coupon_decision_latency.clone(),
        );
        let coupon_follow_polls = Counter::default();
        registry.register(
            "coupon_follow_polls",
            "Looks at the queue between ticks by this replica while it follows the queue",
            coupon_follow_polls.clone(),
        );
        let coupon_taken_by_others = Counter::default();
        registry.register(
            "coupon_taken_by_others",
            "Queue entries this replica read and sent to the decide script that another drainer (a replica, a tick) had decided first: Redis work done twice",
            coupon_taken_by_others.clone(),
        );
        let coupon_lane_failures = Counter::default();
        registry.register(
            "coupon_lane_failures",
            "Per-coupon layout: failures of one coupon's lane (a key of the wrong type) that left the other lanes deciding",
            coupon_lane_failures.clone(),
        );
        let coupon_lanes_failing = Gauge::default();
        registry.register(
            "coupon_lanes_failing",
            "Per-coupon layout: coupon lanes left alone after a failure of their own, retried after 1 s doubling to 30 s",
            coupon_lanes_failing.clone(),
        );
        let coupon_sweeper = Gauge::default();
        registry.register(
            "coupon_sweeper",
            "Per-coupon layout: 1 while this replica holds the sweep lease and runs the periodic walks of the whole registry (one replica at a time)",
            coupon_sweeper.clone(),
        );
        let coupon_rows_persisted = Counter::default();
        registry.register(
            "coupon_rows_persisted",
            "Outbox entries confirmed in user_coupon and acknowledged",
            coupon_rows_persisted.clone(),
        );
        let coupon_reconciliations = Counter::default();
        registry.register(
            "coupon_reconciliations",
            "Lanes reconciled from MySQL because Redis was not the one last reconciled (restart, restore, failover, new Redis)",
            coupon_reconciliations.clone(),
        );
        let coupon_rows_restored = Counter::default();
        registry.register(
            "coupon_rows_restored",
            "Holders in user_coupon that Redis had forgotten, put back by reconciliation",
            coupon_rows_restored.clone(),
        );
        let coupon_unexplained_rows = Counter::default();
        registry.register(
            "coupon_unexplained_rows",
            "Holders in user_coupon beyond what the stock in Redis can explain: a person must look",
            coupon_unexplained_rows.clone(),
        );
        let coupon_fence_conflicts = Counter::default();
        registry.register(
            "coupon_fence_conflicts",
            "Persist attempts refused because MySQL's redis_fence names another Redis than the reconciled live one (restored MySQL, or two deployments on one MySQL): run `reconcile` once understood",
            coupon_fence_conflicts.clone(),
        );
        let coupon_rows_refused = Counter::default();
        registry.register(
            "coupon_rows_refused",
            "Issued coupons user_coupon refused because a unique key other than (user_id, coupon_id) holds their value; kept in <outbox>:dead with MySQL's error for a person (requeue-outbox-dead after fixing the table)",
            coupon_rows_refused.clone(),
        );
        let coupon_outbox_waiting_replicas = Gauge::default();
        registry.register(
            "coupon_outbox_waiting_replicas",
            "1 while the persister waits for replicas to acknowledge decisions ([redis] min_replicas_acked)",
            coupon_outbox_waiting_replicas.clone(),
        );
        let ranking_products = Gauge::default();
        registry.register(
            "ranking_products",
            "Products in the window ranking after the last rebuild",
            ranking_products.clone(),
        );
        let ranking_built_day = Gauge::default();
        registry.register(
            "ranking_built_day",
            "The day the live ranking was built for, as YYYYMMDD in [ranking] timezone (0 until known); stale when below today's",
            ranking_built_day.clone(),
        );
        let ranking_built_timestamp = Gauge::default();
        registry.register(
            "ranking_built_timestamp_seconds",
            "Unix time the live ranking was swapped in, read from Redis by every replica (0 until known)",
            ranking_built_timestamp.clone(),
        );
        let ranking_log_channel_depth = Gauge::default();
        registry.register(
            "ranking_log_channel_depth",
            "Ranking-log rows waiting in the in-process channel",
            ranking_log_channel_depth.clone(),
        );
        let ranking_log_rows_written = Counter::default();
        registry.register(
            "ranking_log_rows_written",
            "Ranking-log rows written to MySQL",
            ranking_log_rows_written.clone(),
        );
        let ranking_log_rows_retried = Counter::default();
        registry.register(
            "ranking_log_rows_retried",
            "Ranking-log row write attempts that failed and were retried",
            ranking_log_rows_retried.clone(),
        );
        let ranking_log_backlog_rows = Gauge::default();
        registry.register(
            "ranking_log_backlog_rows",
            "Ranking-log rows waiting in Redis for MySQL (all log streams)",
            ranking_log_backlog_rows.clone(),
        );
        let ranking_log_backlog_oldest_age = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "ranking_log_backlog_oldest_age_seconds",
            "Age of the oldest ranking-log entry waiting in Redis (0 when none)",
            ranking_log_backlog_oldest_age.clone(),
        );
        let ranking_log_rows_given_up = Counter::default();
        registry.register(
            "ranking_log_rows_given_up",
            "Ranking-log rows MySQL kept rejecting, moved to the log dead-letter stream in Redis",
            ranking_log_rows_given_up.clone(),
        );
        let ranking_log_dead_letters = Gauge::default();
        registry.register(
            "ranking_log_dead_letters",
            "Entries (one decided batch's rows each) in the ranking-log dead-letter stream(s) in Redis, waiting for an operator (`requeue-log-dead`)",
            ranking_log_dead_letters.clone(),
        );
        let ranking_log_entries_taken_over = Counter::default();
        registry.register(
            "ranking_log_entries_taken_over",
            "Ranking-log entries this replica had read that were no longer pending to it when it came to write them (another replica took them over while this one was stalled, or Redis restarted from an older file); dropped here unwritten",
            ranking_log_entries_taken_over.clone(),
        );
        let ranking_log_entries_fenced = Counter::default();
        registry.register(
            "ranking_log_entries_fenced",
            "Ranking-log entry writes skipped because the entry is held on a reconciled Redis that MySQL's redis_fence row of its lane no longer names (an old primary still taking writes after a failover); the entry stays pending there",
            ranking_log_entries_fenced.clone(),
        );
        let ranking_log_batch_duration = duration_histogram();
        registry.register(
            "ranking_log_batch_duration_seconds",
            "Time to write one ranking-log batch",
            ranking_log_batch_duration.clone(),
        );
        let job_runs = Family::<JobResultLabel, Counter>::default();
        registry.register(
            "job_runs",
            "Scheduled job runs by result (ok, error, skipped because the previous run was still going)",
            job_runs.clone(),
        );
        let job_duration: HistogramFamily<JobLabel> =
            Family::new_with_constructor(duration_histogram);
        registry.register(
            "job_duration_seconds",
            "Duration of each job run",
            job_duration.clone(),
        );
        let job_last_success = Family::<JobLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "job_last_success_timestamp_seconds",
            "Unix time of each job's last successful run",
            job_last_success.clone(),
        );
        let paused = Family::<PartLabel, Gauge>::default();
        registry.register(
            "paused",
            "1 while an operator has paused this part (drain: deciding requests; persist: writing issued coupons to MySQL), as last seen by this replica",
            paused.clone(),
        );
        let coupon_outbox_oldest_age = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "coupon_outbox_oldest_age_seconds",
            "Age of the oldest issued coupon waiting in the outbox(es) for MySQL (0 when empty)",
            coupon_outbox_oldest_age.clone(),
        );
        let coupon_dead_letters = Gauge::default();
        registry.register(
            "coupon_dead_letters",
            "Entries in the dead-letter stream(s), waiting for an operator",
            coupon_dead_letters.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 when the last /readyz found Redis and MySQL answering, else 0",
            ready.clone(),
        );
        // Every labelled series exists from the start, at zero: `increase()` then sees the
        // first dead letter (or error) after a restart, and dashboards show no gaps.
        for part in PAUSABLE {
            let _ = paused.get_or_create(&PartLabel { part });
        }
        for outcome in OUTCOMES {
            let _ = coupon_outcomes.get_or_create(&OutcomeLabel { outcome });
        }
        for job in JOBS {
            let _ = job_duration.get_or_create(&JobLabel { job });
            let _ = job_last_success.get_or_create(&JobLabel { job });
            for result in JOB_RESULTS {
                let _ = job_runs.get_or_create(&JobResultLabel { job, result });
            }
        }
        Self {
            registry: Arc::new(registry),
            coupon_outcomes,
            coupon_queue_depth,
            coupon_outbox_depth,
            coupon_batch_duration,
            coupon_oldest_waiting_age,
            coupon_decision_latency,
            coupon_follow_polls,
            coupon_taken_by_others,
            coupon_lane_failures,
            coupon_lanes_failing,
            coupon_sweeper,
            coupon_rows_persisted,
            coupon_reconciliations,
            coupon_rows_restored,
            coupon_unexplained_rows,
            coupon_fence_conflicts,
            coupon_rows_refused,
            coupon_outbox_waiting_replicas,
            ranking_products,
            ranking_built_day,
            ranking_built_timestamp,
            ranking_log_channel_depth,
            ranking_log_rows_written,
            ranking_log_rows_retried,
            ranking_log_backlog_rows,
            ranking_log_backlog_oldest_age,
            ranking_log_rows_given_up,
            ranking_log_dead_letters,
            ranking_log_entries_taken_over,
            ranking_log_entries_fenced,
            ranking_log_batch_duration,
            job_runs,
            job_duration,
            job_last_success,
            paused,
            coupon_outbox_oldest_age,
            coupon_dead_letters,
            ready,
        }
    }

    pub fn set_paused(&self, part: &'static str, paused: bool) {
        self.paused
            .get_or_create(&PartLabel { part })
            .set(i64::from(paused));
    }

    /// The registry in the OpenMetrics text format (`application/openmetrics-text`).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The registry in the Prometheus text format 0.0.4 (`text/plain`), for clients that ask
    /// for it (`curl`, `promtool check metrics`, older Prometheus). The samples are the same as
    /// OpenMetrics'; the differences are in the metadata: a counter's HELP and TYPE name its
    /// samples' `_total` name, and there is no `# UNIT` or `# EOF` line.
    pub fn encode_text(&self) -> String {
        openmetrics_to_text(&self.encode())
    }

    pub fn outcome(&self, outcome: &'static str) -> Counter {
        self.coupon_outcomes
            .get_or_create(&OutcomeLabel { outcome })
            .clone()
    }

    /// Records one run of `job`: its duration, its result (`ok`, `error`, `paused`) and, when
    /// ok, the time it succeeded.
    pub fn record_run(&self, job: &'static str, elapsed: Duration, result: &'static str) {
        self.job_duration
            .get_or_create(&JobLabel { job })
            .observe(elapsed.as_secs_f64());
        self.job_runs
            .get_or_create(&JobResultLabel { job, result })
            .inc();
        if result == "ok" {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            self.job_last_success
                .get_or_create(&JobLabel { job })
                .set(now);
        }
    }

    pub fn record_skip(&self, job: &'static str) {
        self.job_runs
            .get_or_create(&JobResultLabel {
                job,
                result: "skipped",
            })
            .inc();
    }
}

/// See [`Metrics::encode_text`].
fn openmetrics_to_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .filter(|(_, kind)| *kind == "counter")
        .map(|(name, _)| name)
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|prefix| Some((prefix, line.strip_prefix(prefix)?)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let tail = if prefix == "# TYPE " && tail == "unknown" {
                    "untyped"
                } else {
                    tail
                };
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                out.push_str(&format!("{prefix}{name}{suffix} {tail}\n"));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_labelled_series_exists_from_the_start_at_zero() {
        let text = Metrics::new().encode_text();
        for series in [
            r#"commerce_worker_coupon_outcomes_total{outcome="dead_lettered"} 0"#,
            r#"commerce_worker_coupon_outcomes_total{outcome="issued"} 0"#,
            r#"commerce_worker_job_runs_total{job="coupon_drain",result="error"} 0"#,
            r#"commerce_worker_job_runs_total{job="ranking_rebuild",result="ok"} 0"#,
            r#"commerce_worker_job_duration_seconds_count{job="coupon_drain"} 0"#,
            r#"commerce_worker_paused{part="persist"} 0"#,
            "commerce_worker_coupon_dead_letters 0",
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
    }

    #[test]
    fn the_text_format_names_counters_by_their_samples_and_has_no_eof() {
        let text = Metrics::new().encode_text();
        assert!(text.contains("# TYPE commerce_worker_coupon_outcomes_total counter"));
        assert!(text.contains("# HELP commerce_worker_coupon_outcomes_total "));
        assert!(text.contains("# TYPE commerce_worker_coupon_queue_depth gauge"));
        assert!(!text.contains("# EOF"));
        let open = Metrics::new().encode();
        assert!(open.contains("# TYPE commerce_worker_coupon_outcomes counter"));
        assert!(open.ends_with("# EOF\n"));
    }
}
