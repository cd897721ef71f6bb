//! The drain's invariants under crashes and outages (docs/contract.md §2): SIGKILL of the binary
//! between any two steps, and MariaDB killed mid-drain.

use std::time::Duration;

use commerce_worker::outcome::Outcome;
use fred::prelude::*;

use crate::common::{
    DRAIN_LIMIT, PrivateMariadb, TestEnv, drain_command, eventually, redis_url, run_to_exit,
    sigkill_at_progress,
};
use crate::invariants::{assert_every_invariant, enqueue_malformed, flash_sale};

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
    let left: u64 = env.redis.zcard(&env.keys().queue).await.unwrap();
    assert!(left > 0, "work was left for the final drain");

    let status = run_to_exit(
        &mut drain_command(&config),
        Duration::from_secs(120),
        "the final drain did not finish",
    )
    .await;
    assert!(status.success());
    assert_every_invariant(&env, &coupons, initial, users, &malformed).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_stopped_mid_drain_and_restarted_loses_nothing() {
    let mut db = PrivateMariadb::start();
    let mut env = TestEnv::with_servers(&redis_url(), &db.server_url()).await;
    env.config.coupon.batch_size =
        std::num::NonZeroUsize::new(50).unwrap_or(std::num::NonZeroUsize::MIN);
    let coupons = [21];
    // The first wave (users 1..=1000) is all issued; the rest of the sale arrives while MySQL
    // is down and takes the last 500 coupons, so requests wait and coupons are issued during
    // the outage whatever the machine's speed.
    let (initial, users, first_wave) = (1500, 10_000, 1000);
    flash_sale(&env, &coupons, initial, first_wave).await;
    let malformed = enqueue_malformed(&env, &coupons).await;
    let pipeline = env.pipeline();
    // A running worker has reconciled this Redis from MySQL already (a new Redis is reconciled
    // before its first decision, which needs MySQL); from then on the drain does not need MySQL.
    pipeline.drain.reconcile_all(false).await.unwrap();
    let queued = async || {
        env.redis
            .zcard::<u64, _>(&env.keys().queue)
            .await
            .unwrap_or(u64::MAX)
    };
    let first = pipeline.spawn_drain();
    // Killed once the drain is under way (the persister writing what it issued).
    let first_total = first_wave as u64 + malformed.len() as u64;
    eventually(
        Duration::from_secs(60),
        "the drain to start deciding the first wave",
        async || queued().await < first_total,
    )
    .await;
    db.kill();

    // The rest of the sale arrives while MySQL is down; the Redis side decides it.
    let rest: Vec<(f64, String)> = (first_wave + 1..=users)
        .map(|u| ((u * 10 + coupons[0]) as f64, format!("{u}:{}", coupons[0])))
        .collect();
    env.enqueue(&rest).await;
    let second = pipeline.spawn_drain();
    eventually(
        Duration::from_secs(60),
        "the queue to drain while MySQL is down",
        async || queued().await == 0,
    )
    .await;
    let waiting: u64 = env.redis.zcard(&env.keys().outbox).await.unwrap();
    assert!(
        waiting >= (initial - first_wave) as u64,
        "the coupons issued during the outage wait in the outbox ({waiting})"
    );
    db.resume();
    let mut issued = 0;
    for drain in [first, second] {
        let report = drain
            .within(DRAIN_LIMIT, "the drains to finish after MySQL came back")
            .await;
        issued += report[Outcome::Issued];
    }
    assert_eq!(issued, initial as u64);
    pipeline.finish().await;
    assert_every_invariant(&env, &coupons, initial, users, &malformed).await;
    env.cleanup().await;
    drop(db);
}
