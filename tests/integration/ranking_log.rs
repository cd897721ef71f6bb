//! The ranking-log pipeline (log stream in Redis → reader → bounded channel → writer → MySQL,
//! acknowledged after COMMIT) against real Redis and MariaDB, including a MariaDB killed
//! mid-flow, a missed deadline and rows MySQL rejects for good.

use std::num::NonZeroUsize;
use std::time::Duration;

use chrono::Utc;
use commerce_worker::metrics::Metrics;
use commerce_worker::outcome::Outcome;
use commerce_worker::ranking_log::{LogEntry, LogPipeline, LogRow, requeue_log_dead};
use fred::prelude::*;

use crate::common::{PrivateMariadb, TestEnv, eventually, redis_url};

fn rows(coupon: i64, from: i64, count: i64) -> Vec<LogRow> {
    (from..from + count)
        .map(|rank| LogRow {
            user_id: rank * 10,
            coupon_id: coupon,
            rank,
            outcome: if rank % 3 == 0 {
                Outcome::Issued
            } else {
                Outcome::SoldOut
            },
            decided_at: Utc::now(),
            retry_count: 0,
        })
        .collect()
}

fn nz(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN)
}

/// Appends `rows` to the log stream as one entry, as the decide script does.
async fn log_entry(env: &TestEnv, rows: &[LogRow]) {
    let keys = env.keys();
    let raw = LogEntry::encode(rows);
    let _: String = env
        .redis
        .xadd(
            &keys.log,
            false,
            None,
            "*",
            vec![("m", raw.members), ("r", raw.ranks), ("o", raw.outcomes)],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let _: i64 = env
        .redis
        .incr_by(keys.log_rows(), rows.len() as i64)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

fn pipeline(env: &TestEnv, metrics: &Metrics) -> LogPipeline {
    LogPipeline::start(
        &env.config.ranking_log,
        env.keys(),
        env.redis.clone(),
        env.mysql.clone(),
        metrics.clone(),
    )
}

/// Rows in ranking_logs, and how many (coupon, rank) pairs appear more than once.
async fn landed(env: &TestEnv) -> (i64, i64) {
    let total = env.count("SELECT COUNT(*) FROM ranking_logs").await;
    let doubled = env
        .count("SELECT COUNT(*) FROM (SELECT 1 FROM ranking_logs GROUP BY coupon_type, `rank` HAVING COUNT(*) > 1) d")
        .await;
    (total, doubled)
}

/// Entries left in the log stream and the rows its counter says wait.
async fn waiting(env: &TestEnv) -> (u64, i64) {
    let keys = env.keys();
    let entries: u64 = env
        .redis
        .xlen(&keys.log)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let rows: Option<i64> = env
        .redis
        .get(keys.log_rows())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    (entries, rows.unwrap_or(0))
}

async fn until_written(env: &TestEnv, metrics: &Metrics, rows: u64) {
    let _ = env;
    eventually(Duration::from_secs(60), "the rows written", async || {
        metrics.ranking_log_rows_written.get() >= rows
    })
    .await;
}

fn soon() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(30)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_waiting_in_redis_arrive_with_their_fields_and_leave_the_stream() {
    let mut env = TestEnv::new().await;
    env.config.ranking_log.batch_size = nz(10);
    for first in [1, 11, 21, 31] {
        log_entry(&env, &rows(42, first, if first == 31 { 5 } else { 10 })).await;
    }
    assert_eq!(waiting(&env).await, (4, 35));
    let metrics = Metrics::new();
    let log = pipeline(&env, &metrics);
    until_written(&env, &metrics, 35).await;
    let (report, clean) = log.shutdown(soon()).await;
    assert!(clean);
    assert_eq!(report.rows_written, 35);
    assert_eq!(landed(&env).await, (35, 0));
    assert_eq!(
        waiting(&env).await,
        (0, 0),
        "written entries are acknowledged and deleted"
    );
    assert_eq!(
        env.count("SELECT COUNT(*) FROM ranking_log_batches").await,
        4,
        "one marker per Redis entry"
    );
    let row: (i64, String, i32, String, Option<String>, i32) = sqlx::query_as(
        "SELECT user_id, coupon_type, `rank`, status, reason, retry_count FROM ranking_logs WHERE `rank` = 4",
    )
    .fetch_one(&env.mysql)
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        row,
        (
            40,
            "42".into(),
            4,
            "FAILED".into(),
            Some("SOLD_OUT".into()),
            0
        )
    );
    let issued: (String, Option<String>) =
        sqlx::query_as("SELECT status, reason FROM ranking_logs WHERE `rank` = 3")
            .fetch_one(&env.mysql)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(issued, ("ISSUED".into(), None));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_channel_holds_back_the_reader_and_every_row_lands_once() {
    let mut env = TestEnv::new().await;
    env.config.ranking_log.channel_capacity = nz(4);
    env.config.ranking_log.batch_size = nz(4);
    for first in (1..=100).step_by(4) {
        log_entry(&env, &rows(7, first, 4)).await;
    }
    let metrics = Metrics::new();
    let log = pipeline(&env, &metrics);
    until_written(&env, &metrics, 100).await;
    let (report, clean) = log.shutdown(soon()).await;
    assert!(clean);
    assert_eq!(report.rows_written, 100);
    assert_eq!(landed(&env).await, (100, 0));
    assert_eq!(waiting(&env).await, (0, 0));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_already_written_are_acknowledged_without_writing_them_again() {
    let env = TestEnv::new().await;
    log_entry(&env, &rows(5, 1, 20)).await;
    // As if a writer committed this entry and died before XACK: its marker is in MySQL.
    let ids: Vec<(String, std::collections::HashMap<String, String>)> = env
        .redis
        .xrange(&env.keys().log, "-", "+", None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (id, fields) = &ids[0];
    let raw = commerce_worker::ranking_log::entry::RawFields {
        members: fields["m"].clone(),
        ranks: fields["r"].clone(),
        outcomes: fields["o"].clone(),
    };
    let entry = LogEntry::decode(&env.keys().log, id, raw).unwrap_or_else(|e| panic!("{e}"));
    let first = commerce_worker::ranking_log::insert_entries(&env.mysql, &[&entry], 100)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(first, 20);
    let metrics = Metrics::new();
    let log = pipeline(&env, &metrics);
    eventually(
        Duration::from_secs(30),
        "the entry acknowledged",
        async || waiting(&env).await == (0, 0),
    )
    .await;
    let (report, _) = log.shutdown(soon()).await;
    assert_eq!(report.rows_written, 0, "the marker says it is in");
    assert_eq!(landed(&env).await, (20, 0));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_killed_while_rows_flow_then_restarted_every_row_lands_once() {
    let mut db = PrivateMariadb::start();
    let mut env = TestEnv::with_servers(&redis_url(), &db.server_url()).await;
    env.config.ranking_log.batch_size = nz(50);
    env.config.ranking_log.channel_capacity = nz(200);
    let metrics = Metrics::new();
    let log = pipeline(&env, &metrics);
    let mut next = 1;
    for round in 0..30 {
        log_entry(&env, &rows(9, next, 100)).await;
        log.waker().notify_one();
        next += 100;
        if round == 10 {
            db.kill();
        }
        if round == 20 {
            // Down until a write attempt has really failed, then back.
            eventually(
                Duration::from_secs(60),
                "a failed write attempt",
                async || metrics.ranking_log_rows_retried.get() > 0,
            )
            .await;
            db.resume();
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    until_written(&env, &metrics, 3000).await;
    let (_, clean) = log.shutdown(soon()).await;
    assert!(clean);
    assert_eq!(landed(&env).await, (3000, 0), "every row exactly once");
    assert_eq!(waiting(&env).await, (0, 0));
    let retried = env
        .count("SELECT COUNT(*) FROM ranking_logs WHERE retry_count > 0")
        .await;
    assert!(
        retried > 0,
        "rows written after the outage carry their failed attempts"
    );
    env.cleanup().await;
    drop(db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_not_written_by_the_deadline_stay_in_redis_and_another_worker_writes_them_at_once() {
    let mut db = PrivateMariadb::start();
    let env = TestEnv::with_servers(&redis_url(), &db.server_url()).await;
    db.kill();
    for first in [1, 41, 81] {
        log_entry(&env, &rows(3, first, 40)).await;
    }
    let metrics = Metrics::new();
    let first = pipeline(&env, &metrics);
    eventually(
        Duration::from_secs(60),
        "a failed write attempt",
        async || metrics.ranking_log_rows_retried.get() > 0,
    )
    .await;
    let (report, clean) = first
        .shutdown(tokio::time::Instant::now() + Duration::from_millis(300))
        .await;
    assert!(!clean, "MySQL is down: the deadline passes");
    assert_eq!(report.rows_written, 0);
    assert!(report.rows_left > 0, "{report:?}");
    assert_eq!(waiting(&env).await, (3, 120), "every row still in Redis");

    // Another worker (another consumer), MySQL back: it takes the handed-back entries over
    // without waiting for them to go idle.
    db.resume();
    let metrics = Metrics::new();
    let second = pipeline(&env, &metrics);
    let started = std::time::Instant::now();
    until_written(&env, &metrics, 120).await;
    assert!(
        started.elapsed() < commerce_worker::ranking_log::stream::CLAIM_IDLE,
        "handed-back entries are taken over at once"
    );
    second.shutdown(soon()).await;
    assert_eq!(landed(&env).await, (120, 0));
    assert_eq!(waiting(&env).await, (0, 0));
    env.cleanup().await;
    drop(db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_mysql_rejects_for_good_are_dead_lettered_in_redis_and_can_be_requeued() {
    let mut env = TestEnv::new().await;
    env.config.ranking_log.max_attempts = 2;
    // The table refuses user 660 (rank 66) until the constraint is dropped.
    sqlx::query("ALTER TABLE ranking_logs ADD CONSTRAINT no_660 CHECK (user_id <> 660)")
        .execute(&env.mysql)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    log_entry(&env, &rows(8, 1, 50)).await;
    log_entry(&env, &rows(8, 51, 50)).await;
    let metrics = Metrics::new();
    let log = pipeline(&env, &metrics);
    eventually(
        Duration::from_secs(30),
        "the good entry written, the bad one given up",
        async || {
            metrics.ranking_log_rows_written.get() == 50
                && metrics.ranking_log_rows_given_up.get() == 50
        },
    )
    .await;
    log.shutdown(soon()).await;
    assert_eq!(landed(&env).await, (50, 0));
    assert_eq!(waiting(&env).await, (0, 0));
    let dead: Vec<(String, std::collections::HashMap<String, String>)> = env
        .redis
        .xrange(env.keys().log_dead(), "-", "+", None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].1.get("error").is_some_and(|e| e.contains("no_660")),
        "the error is kept: {:?}",
        dead[0].1
    );

    sqlx::query("ALTER TABLE ranking_logs DROP CONSTRAINT no_660")
        .execute(&env.mysql)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let moved = requeue_log_dead(&env.redis, env.keys())
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(moved, 1);
    let metrics = Metrics::new();
    let log = pipeline(&env, &metrics);
    until_written(&env, &metrics, 50).await;
    log.shutdown(soon()).await;
    assert_eq!(landed(&env).await, (100, 0));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_applied_whose_reply_was_lost_writes_no_row_twice() {
    let env = TestEnv::new().await;
    // The writer reaches MariaDB through a proxy that lets the first COMMIT through and loses
    // its reply (the connection closes): the rows are in, and the writer cannot know.
    let server = crate::common::mysql_server_url();
    let upstream = server
        .rsplit('@')
        .next()
        .unwrap_or_default()
        .parse()
        .unwrap_or_else(|e| panic!("TEST_MYSQL_URL must be mysql://user@host:port here: {e}"));
    let proxy = commerce_worker::tools::fault_proxy::FaultProxy::start(upstream)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let mut mysql = env.config.mysql.clone();
    mysql.url = commerce_worker::config::SecretUrl::new(format!(
        "mysql://root@{}/{}",
        proxy.addr(),
        env.name
    ));
    let pool = commerce_worker::backends::connect_mysql(&mysql)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for first in [1, 31, 61] {
        log_entry(&env, &rows(4, first, 30)).await;
    }
    proxy.drop_reply_when("COMMIT");
    let metrics = Metrics::new();
    let log = LogPipeline::start(
        &env.config.ranking_log,
        env.keys(),
        env.redis.clone(),
        pool,
        metrics.clone(),
    );
    eventually(
        Duration::from_secs(60),
        "the log stream emptied",
        async || waiting(&env).await == (0, 0),
    )
    .await;
    let (report, clean) = log.shutdown(soon()).await;
    assert!(clean);
    assert_eq!(proxy.replies_dropped(), 1, "a COMMIT reply was really lost");
    assert!(
        metrics.ranking_log_rows_retried.get() > 0,
        "the writer retried"
    );
    assert!(
        report.rows_written < 90,
        "the retry found the lost transaction's markers and skipped its rows: {report:?}"
    );
    assert_eq!(landed(&env).await, (90, 0), "every row exactly once");
    proxy.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_coupon_rows_of_a_coupon_removed_from_the_registry_are_still_written_and_counted() {
    let mut env = TestEnv::new().await;
    env.config.keys = commerce_worker::keys::KeyTemplates::per_coupon_layout()
        .with_prefix(&format!("{}:", env.name));
    let keys = env.keys().clone();
    let _: i64 = env
        .redis
        .sadd(&keys.coupon_registry, vec!["7"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Coupon 9 was decided, then retired (SREM) before its rows reached MySQL.
    for (coupon, first) in [(7, 1), (9, 1), (9, 51)] {
        let lane = keys.for_coupon(coupon);
        let raw = LogEntry::encode(&rows(coupon, first, 50));
        let _: String = env
            .redis
            .xadd(
                &lane.log,
                false,
                None,
                "*",
                vec![("m", raw.members), ("r", raw.ranks), ("o", raw.outcomes)],
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let _: i64 = env
            .redis
            .incr_by(lane.log_rows(), 50)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let (waiting_rows, _) = commerce_worker::ranking_log::stream::backlog(&env.redis, &keys)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(
        waiting_rows, 150,
        "the retired coupon's rows count in the backlog"
    );
    let metrics = Metrics::new();
    let log = pipeline(&env, &metrics);
    until_written(&env, &metrics, 150).await;
    log.shutdown(soon()).await;
    assert_eq!(landed(&env).await, (150, 0));
    let left: u64 = env
        .redis
        .xlen(keys.for_coupon(9).log)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(left, 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backlog_gauge_follows_redis_while_mysql_is_down_and_the_channel_is_full() {
    let mut env = TestEnv::new().await;
    env.config.ranking_log.channel_capacity = nz(10);
    env.config.ranking_log.batch_size = nz(10);
    for first in [1, 11, 21, 31] {
        log_entry(&env, &rows(8, first, 10)).await;
    }
    // Nothing listens on port 1: every write fails as MySQL being down does.
    let down = sqlx::mysql::MySqlPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy("mysql://root@127.0.0.1:1/x")
        .unwrap_or_else(|e| panic!("{e}"));
    let metrics = Metrics::new();
    let log = LogPipeline::start(
        &env.config.ranking_log,
        env.keys(),
        env.redis.clone(),
        down,
        metrics.clone(),
    );
    eventually(Duration::from_secs(30), "the channel full", async || {
        metrics.ranking_log_channel_depth.get() >= 10
    })
    .await;
    for first in [41, 51, 61, 71, 81] {
        log_entry(&env, &rows(8, first, 10)).await;
    }
    eventually(
        Duration::from_secs(30),
        "the backlog gauge to show the 90 rows waiting in Redis",
        async || metrics.ranking_log_backlog_rows.get() == 90,
    )
    .await;
    log.shutdown(tokio::time::Instant::now() + Duration::from_secs(2))
        .await;
    assert_eq!(waiting(&env).await, (9, 90), "nothing left Redis");
    env.cleanup().await;
}
