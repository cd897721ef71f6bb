//! The ranking-log pipeline against real MariaDB, including a MariaDB killed mid-flow.

use std::num::NonZeroUsize;
use std::time::Duration;

use chrono::Utc;
use commerce_worker::metrics::Metrics;
use commerce_worker::outcome::Outcome;
use commerce_worker::ranking_log::{LogRow, channel};
use tokio_util::sync::CancellationToken;

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

/// Rows in ranking_logs, and how many (coupon, rank) pairs appear more than once.
async fn landed(env: &TestEnv) -> (i64, i64) {
    let total = env.count("SELECT COUNT(*) FROM ranking_logs").await;
    let doubled = env
        .count("SELECT COUNT(*) FROM (SELECT 1 FROM ranking_logs GROUP BY coupon_type, `rank` HAVING COUNT(*) > 1) d")
        .await;
    (total, doubled)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_arrive_with_their_fields_in_batches() {
    let mut env = TestEnv::new().await;
    env.config.ranking_log.batch_size = nz(10);
    let (sender, writer) = channel(&env.config.ranking_log, env.mysql.clone(), Metrics::new())
        .unwrap_or_else(|e| panic!("{e:#}"));
    sender.send(rows(42, 1, 35));
    let stop = CancellationToken::new();
    stop.cancel();
    let report = writer.run(stop, CancellationToken::new()).await;
    assert_eq!(report.rows_written, 35);
    assert_eq!(landed(&env).await, (35, 0));
    let batches = env.count("SELECT COUNT(*) FROM ranking_log_batches").await;
    // Statements of at most 10 rows; a backlog shares a transaction (up to 8 statements).
    assert!(
        (1..=4).contains(&batches),
        "35 waiting rows go in a few transactions, not row by row: {batches} batches"
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
async fn a_full_channel_spills_instead_of_blocking_and_nothing_is_lost() {
    let mut env = TestEnv::new().await;
    env.config.ranking_log.channel_capacity = nz(4);
    let metrics = Metrics::new();
    let (sender, writer) = channel(&env.config.ranking_log, env.mysql.clone(), metrics.clone())
        .unwrap_or_else(|e| panic!("{e:#}"));
    // No writer running yet: the producer must not wait. `send` is synchronous, so a timeout
    // around it could never fire; it runs on a thread of its own and must come back while
    // nothing reads the channel (a blocking send would never return here).
    let (returned, back) = std::sync::mpsc::channel();
    let sending = sender.clone();
    std::thread::spawn(move || {
        sending.send(rows(7, 1, 100));
        let _ = returned.send(());
    });
    assert!(
        back.recv_timeout(Duration::from_secs(30)).is_ok(),
        "send blocked on a full channel with no writer running"
    );
    assert_eq!(metrics.ranking_log_rows_spilled.get(), 96);
    let stop = CancellationToken::new();
    stop.cancel();
    let report = writer.run(stop, CancellationToken::new()).await;
    assert_eq!(report.rows_written, 100);
    assert_eq!(report.rows_left_spilled, 0);
    assert_eq!(landed(&env).await, (100, 0));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_killed_while_rows_flow_then_restarted_every_row_lands_once() {
    let mut db = PrivateMariadb::start();
    let mut env = TestEnv::with_servers(&redis_url(), &db.server_url()).await;
    env.config.ranking_log.batch_size = nz(50);
    env.config.ranking_log.channel_capacity = nz(200);
    let metrics = Metrics::new();
    let (sender, writer) = channel(&env.config.ranking_log, env.mysql.clone(), metrics.clone())
        .unwrap_or_else(|e| panic!("{e:#}"));
    let stop = CancellationToken::new();
    let task = tokio::spawn(writer.run(stop.clone(), CancellationToken::new()));
    let mut next = 1;
    for round in 0..30 {
        sender.send(rows(9, next, 100));
        next += 100;
        if round == 10 {
            db.kill();
        }
        if round == 20 {
            // Down until a write attempt has really failed (the pool may first wait out its
            // acquire timeout), then back.
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
    stop.cancel();
    let report = task.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.rows_left_spilled, 0);
    assert_eq!(landed(&env).await, (3000, 0), "every row exactly once");
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
async fn rows_not_written_by_the_deadline_are_kept_for_the_next_start() {
    let mut db = PrivateMariadb::start();
    let env = TestEnv::with_servers(&redis_url(), &db.server_url()).await;
    db.kill();
    let (sender, writer) = channel(&env.config.ranking_log, env.mysql.clone(), Metrics::new())
        .unwrap_or_else(|e| panic!("{e:#}"));
    sender.send(rows(3, 1, 120));
    let (stop, abort) = (CancellationToken::new(), CancellationToken::new());
    let task = tokio::spawn(writer.run(stop.clone(), abort.clone()));
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(500)).await;
    abort.cancel(); // the shutdown deadline
    let report = task.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.rows_written, 0);
    assert_eq!(report.rows_left_spilled, 120);

    db.resume();
    let (_sender, writer) = channel(&env.config.ranking_log, env.mysql.clone(), Metrics::new())
        .unwrap_or_else(|e| panic!("{e:#}"));
    let stop = CancellationToken::new();
    stop.cancel();
    let report = writer.run(stop, CancellationToken::new()).await;
    assert_eq!(report.rows_written, 120);
    assert_eq!(landed(&env).await, (120, 0));
    env.cleanup().await;
    drop(db);
}
