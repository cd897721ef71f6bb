//! The drain's invariants under crashes and outages (docs/contract.md §2): SIGKILL of the binary
//! between any two steps, and MariaDB killed mid-drain.

use std::time::Duration;

use commerce_worker::outcome::Outcome;
use fred::prelude::*;
use tokio_util::sync::CancellationToken;

use crate::common::{
    PrivateMariadb, TestEnv, drain_command, eventually, redis_url, run_to_exit, sigkill_at_progress,
};
use crate::invariants::{
    assert_dead_letters, assert_invariants, assert_ranking_log, enqueue_malformed, flash_sale,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_seven_times_during_a_100k_drain_loses_and_duplicates_no_coupon_and_no_log_row() {
    let env = TestEnv::new().await;
    let coupons = [11, 12];
    let (initial, users) = (30_000, 50_000);
    flash_sale(&env, &coupons, initial, users).await;
    let malformed = enqueue_malformed(&env, &coupons).await;
    // Small batches: many decide steps, so the kills land with log rows in every state (in Redis
    // only, read, in the channel, mid-transaction, committed but not acknowledged).
    let config = env.config_file_with("[coupon]\nbatch_size = 100\n");

    let total = (coupons.len() as u64) * users as u64;
    let kills = sigkill_at_progress(&env, || drain_command(&config), 7, total).await;
    assert!(
        kills >= 6,
        "the drain was killed mid-way at least six times ({kills})"
    );
    let left: u64 = env
        .redis
        .zcard(&env.keys().queue)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(left > 0, "work was left for the final drain");

    let status = run_to_exit(
        &mut drain_command(&config),
        Duration::from_secs(120),
        "the final drain did not finish",
    )
    .await;
    assert!(status.success());
    assert_invariants(&env, &coupons, initial, users).await;
    assert_dead_letters(&env, &coupons, &malformed).await;
    assert_ranking_log(&env, &coupons).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_stopped_mid_drain_and_restarted_loses_nothing() {
    let mut db = PrivateMariadb::start();
    let mut env = TestEnv::with_servers(&redis_url(), &db.server_url()).await;
    env.config.coupon.batch_size =
        std::num::NonZeroUsize::new(50).unwrap_or(std::num::NonZeroUsize::MIN);
    let coupons = [21];
    let (initial, users) = (1500, 10_000);
    flash_sale(&env, &coupons, initial, users).await;
    let malformed = enqueue_malformed(&env, &coupons).await;
    let pipeline = env.pipeline();
    // A running worker has reconciled this Redis from MySQL already (a new Redis is reconciled
    // before its first decision, which needs MySQL); from then on the drain does not need MySQL.
    pipeline
        .drain
        .reconcile_all(false)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let drain = pipeline.drain.clone();
    let task = tokio::spawn(async move { drain.drain_to_empty(&CancellationToken::new()).await });
    let total = coupons.len() as u64 * users as u64 + malformed.len() as u64;
    let queued = async || {
        env.redis
            .zcard::<u64, _>(&env.keys().queue)
            .await
            .unwrap_or(u64::MAX)
    };
    // Killed once the drain is under way, with requests still waiting: polled closely, since a
    // fast machine decides the whole queue in well under a second.
    let started = std::time::Instant::now();
    while queued().await == total {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "timed out waiting for the drain to start deciding"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    db.kill();
    assert!(
        queued().await > 0,
        "MySQL was killed while requests were still waiting"
    );
    // The Redis side keeps deciding while MySQL is down.
    eventually(
        Duration::from_secs(60),
        "the queue to drain while MySQL is down",
        async || queued().await == 0,
    )
    .await;
    db.resume();
    let report = tokio::time::timeout(Duration::from_secs(120), task)
        .await
        .unwrap_or_else(|_| panic!("drain did not finish after MySQL came back"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report[Outcome::Issued], initial as u64);
    pipeline.finish().await;
    assert_invariants(&env, &coupons, initial, users).await;
    assert_ranking_log(&env, &coupons).await;
    assert_dead_letters(&env, &coupons, &malformed).await;
    env.cleanup().await;
    drop(db);
}
