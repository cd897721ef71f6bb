//! The drain's invariants under crashes and outages (CONTRACT.md §2): SIGKILL of the binary
//! between any two steps, and MariaDB killed mid-drain.

use std::collections::HashMap;
use std::time::Duration;

use commerce_worker::outcome::Outcome;
use fred::prelude::*;
use tokio_util::sync::CancellationToken;

use crate::common::{PrivateMariadb, TestEnv, drain_command, free_port, redis_url};

/// initial = remaining + |issued| = rows, nobody twice, and every request decided exactly once
/// (the result hash answers for every user; seq counts every request).
pub(crate) async fn assert_invariants(env: &TestEnv, coupons: &[i64], initial: i64, users: i64) {
    // One queue and outbox, or one per coupon.
    let lanes: Vec<commerce_worker::keys::KeyTemplates> = if env.keys().per_coupon() {
        coupons.iter().map(|&c| env.keys().for_coupon(c)).collect()
    } else {
        vec![env.keys().clone()]
    };
    for lane in &lanes {
        let queue: u64 = env
            .redis
            .zcard(&lane.queue)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(queue, 0, "queue {} drained", lane.queue);
        let outbox: u64 = env
            .redis
            .zcard(&lane.outbox)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(outbox, 0, "outbox {} flushed", lane.outbox);
    }
    for &c in coupons {
        let remaining: i64 = env
            .redis
            .get(env.keys().stock(c))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let holders: i64 = env
            .redis
            .scard(env.keys().issued(c))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM user_coupon WHERE coupon_id = ?")
            .bind(c)
            .fetch_one(&env.mysql)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let distinct: i64 = sqlx::query_scalar(
            "SELECT COUNT(DISTINCT user_id) FROM user_coupon WHERE coupon_id = ?",
        )
        .bind(c)
        .fetch_one(&env.mysql)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            initial,
            remaining + holders,
            "coupon {c}: initial = remaining + issued"
        );
        assert_eq!(holders, rows, "coupon {c}: issued = rows");
        assert_eq!(distinct, rows, "coupon {c}: nobody twice");
        let results: HashMap<String, String> = env
            .redis
            .hgetall(env.keys().result(c))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            results.len() as i64,
            users,
            "coupon {c}: every user has an outcome"
        );
        let issued = results.values().filter(|v| *v == "ISSUED").count() as i64;
        assert_eq!(issued, holders, "coupon {c}: ISSUED results match holders");
        let seq: i64 = env
            .redis
            .get(env.keys().seq(c))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(seq, users, "coupon {c}: every request decided exactly once");
    }
}

pub(crate) async fn flash_sale(env: &TestEnv, coupons: &[i64], initial: i64, users: i64) {
    for &c in coupons {
        env.set_stock(c, &initial.to_string()).await;
    }
    let mut entries = Vec::new();
    for u in 1..=users {
        for &c in coupons {
            entries.push(((u * 10 + c) as f64, format!("{u}:{c}")));
        }
    }
    // As the API does, in either layout.
    commerce_worker::tools::simulated_api::enqueue_members(&env.redis, env.keys(), entries)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_drain_several_times_loses_and_duplicates_nothing() {
    let mut env = TestEnv::new().await;
    env.config.coupon.batch_size =
        std::num::NonZeroUsize::new(20).unwrap_or(std::num::NonZeroUsize::MIN);
    let coupons = [11, 12];
    let (initial, users) = (3000, 5000);
    flash_sale(&env, &coupons, initial, users).await;
    let mut text =
        std::fs::read_to_string(env.config_file(free_port())).unwrap_or_else(|e| panic!("{e}"));
    text.push_str("[coupon]\nbatch_size = 20\n");
    let config = env.dir.path().join("kill.toml");
    std::fs::write(&config, text).unwrap_or_else(|e| panic!("{e}"));

    // Kill at points of progress, not after fixed delays: the drain's speed varies with the
    // machine, and each kill must land while work is left.
    let total = (coupons.len() as u64) * users as u64;
    let mut kills = 0;
    for round in 1..=4u64 {
        let mut child = drain_command(&config)
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"));
        let kill_below = total - round * total / 10;
        loop {
            let left: u64 = env
                .redis
                .zcard(&env.keys().queue)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            if left <= kill_below || child.try_wait().unwrap_or_else(|e| panic!("{e}")).is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if child.try_wait().unwrap_or_else(|e| panic!("{e}")).is_none() {
            kills += 1;
        }
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
    }
    assert!(
        kills >= 2,
        "the drain was killed mid-way at least twice ({kills})"
    );
    let left: u64 = env
        .redis
        .zcard(&env.keys().queue)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(left > 0, "work was left for the final drain");

    let status = drain_command(&config)
        .status()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(status.success());
    assert_invariants(&env, &coupons, initial, users).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_stopped_mid_drain_and_restarted_loses_nothing() {
    let mut db = PrivateMariadb::start();
    let mut env = TestEnv::with_servers(&redis_url(), &db.server_url()).await;
    env.config.coupon.batch_size =
        std::num::NonZeroUsize::new(50).unwrap_or(std::num::NonZeroUsize::MIN);
    let coupons = [21];
    let (initial, users) = (1500, 4000);
    flash_sale(&env, &coupons, initial, users).await;
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
    tokio::time::sleep(Duration::from_millis(30)).await;
    db.kill();
    // The Redis side keeps deciding while MySQL is down.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let left: u64 = env
        .redis
        .zcard(&env.keys().queue)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(left, 0, "the queue drains while MySQL is down");
    db.resume();
    let report = tokio::time::timeout(Duration::from_secs(120), task)
        .await
        .unwrap_or_else(|_| panic!("drain did not finish after MySQL came back"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report[Outcome::Issued], initial as u64);
    pipeline.finish().await;
    assert_invariants(&env, &coupons, initial, users).await;
    env.cleanup().await;
    drop(db);
}
