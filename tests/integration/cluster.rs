//! Redis Cluster, for real: a private cluster of three primaries per test. The coupon keys carry
//! one hash tag (`{coupon}`), so the decide script's keys share a slot; the ranking keys carry
//! none, so the rebuild must sum the days in chunks and scan every primary to prune.

use std::time::Duration;

use chrono::{Days, NaiveDate};
use commerce_worker::keys::KeyTemplates;
use commerce_worker::metrics::Metrics;
use commerce_worker::ranking::{RankingRebuild, Strategy, WhenLocked};
use fred::prelude::*;

use crate::common::{DRAIN_LIMIT, PrivateCluster, TestEnv, mysql_server_url};
use crate::invariants::{assert_every_invariant, enqueue_malformed, flash_sale};

fn tagged_keys(prefix: &str) -> KeyTemplates {
    KeyTemplates::single_slot_layout().with_prefix(prefix)
}

pub(crate) fn per_coupon_keys(prefix: &str) -> KeyTemplates {
    KeyTemplates::per_coupon_layout().with_prefix(prefix)
}

async fn cluster_env(cluster: &PrivateCluster) -> TestEnv {
    cluster_env_with(cluster, tagged_keys).await
}

async fn cluster_env_with(cluster: &PrivateCluster, keys: fn(&str) -> KeyTemplates) -> TestEnv {
    let mut env = TestEnv::with_servers(&cluster.url(), &mysql_server_url()).await;
    env.config.keys = keys(&format!("{}:", env.name));
    assert!(env.config.keys.cluster_problems().is_empty());
    assert!(env.redis.is_clustered());
    env
}

/// A flash sale of `coupons` × `initial` to `users` users, drained by three replicas at once
/// (each with its own cluster client): every request decided once, one ranking-log row each,
/// and every invariant kept.
async fn three_replicas_drain_a_sale(env: &TestEnv, coupons: &[i64], initial: i64, users: i64) {
    flash_sale(env, coupons, initial, users).await;
    let mut pipelines = Vec::new();
    for _ in 0..3 {
        let client = commerce_worker::backends::connect_redis(&env.config.redis)
            .await
            .unwrap();
        pipelines.push(env.pipeline_on(client));
    }
    let reports = futures_util::future::join_all(
        pipelines
            .iter()
            .map(|p| p.drain_within(DRAIN_LIMIT, "three replicas draining the sale")),
    )
    .await;
    let decided: u64 = reports.iter().map(|r| r.decided()).sum();
    let mut logged = 0;
    for pipeline in pipelines {
        logged += pipeline.finish().await;
    }
    assert_eq!(decided, (coupons.len() as i64 * users) as u64);
    assert_eq!(logged, decided, "one ranking-log row per decided request");
    assert_every_invariant(env, coupons, initial, users, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_concurrent_drainers_on_a_cluster_keep_every_invariant() {
    let cluster = PrivateCluster::start();
    let mut env = cluster_env(&cluster).await;
    env.config.coupon.batch_size =
        std::num::NonZeroUsize::new(100).unwrap_or(std::num::NonZeroUsize::MIN);
    three_replicas_drain_a_sale(&env, &[1, 2, 3], 300, 1000).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ranking_on_a_cluster_is_summed_in_chunks_and_old_days_pruned_on_every_primary() {
    let cluster = PrivateCluster::start();
    let env = cluster_env(&cluster).await;
    let keys = env.keys().clone();
    assert!(!keys.ranking_in_one_slot());
    let day = NaiveDate::from_ymd_opt(2026, 11, 23).unwrap_or_default();
    let sales = |back: u64, entries: Vec<(f64, &'static str)>| {
        let key = keys.ranking_day(day.checked_sub_days(Days::new(back)).unwrap_or(day));
        let redis = env.redis.clone();
        async move {
            let entries: Vec<(f64, String)> = entries
                .into_iter()
                .map(|(s, m)| (s, m.to_owned()))
                .collect();
            let _: i64 = redis
                .zadd(key, None, None, false, false, entries)
                .await
                .unwrap();
        }
    };
    sales(0, vec![(5.0, "a"), (1.0, "b")]).await;
    sales(1, vec![(2.0, "a"), (7.0, "c")]).await;
    sales(2, vec![(1.0, "b")]).await;
    // Outside the window, on whatever primaries their slots fall.
    sales(3, vec![(100.0, "z")]).await;
    sales(6, vec![(100.0, "z")]).await;
    sales(9, vec![(100.0, "z")]).await;

    let report = RankingRebuild::new(
        env.redis.clone(),
        keys.clone(),
        env.config.ranking.clone(),
        Metrics::new(),
    )
    .rebuild(day, WhenLocked::Wait)
    .await
    .unwrap();
    assert_eq!(report.strategy, Some(Strategy::Chunked));
    assert_eq!(report.pruned, 3);
    let ranking: Vec<(String, f64)> = env
        .redis
        .zrange(&keys.ranking_window, 0, -1, None, true, None, true)
        .await
        .unwrap();
    assert_eq!(
        ranking,
        // Equal scores: reverse order by member, as ZREVRANGE gives them.
        vec![("c".into(), 7.0), ("a".into(), 7.0), ("b".into(), 2.0)]
    );
    for back in [3, 6, 9] {
        let gone: bool = env
            .redis
            .exists(keys.ranking_day(day.checked_sub_days(Days::new(back)).unwrap_or(day)))
            .await
            .unwrap();
        assert!(!gone, "day D-{back} pruned");
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_and_restarted_mid_drain_loses_and_duplicates_nothing() {
    primary_restarted_mid_drain(tagged_keys).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_coupon_a_primary_killed_and_restarted_mid_drain_loses_and_duplicates_nothing() {
    primary_restarted_mid_drain(per_coupon_keys).await;
}

/// Kills the primary holding coupon 1's queue a quarter of the way through a drain, restarts it
/// from its append-only file, and checks every invariant once the drain has finished.
async fn primary_restarted_mid_drain(keys: fn(&str) -> KeyTemplates) {
    let mut cluster = PrivateCluster::start();
    let mut env = cluster_env_with(&cluster, keys).await;
    env.config.coupon.batch_size =
        std::num::NonZeroUsize::new(25).unwrap_or(std::num::NonZeroUsize::MIN);
    let coupons = [1, 2];
    let (initial, users) = (1500, 3000);
    flash_sale(&env, &coupons, initial, users).await;
    let malformed = enqueue_malformed(&env, &coupons).await;
    let node = cluster.node_of(&env.keys().for_coupon(1).queue);

    let pipeline = env.pipeline();
    let draining = pipeline.spawn_drain();
    let total = (coupons.len() as i64 * users) as u64;
    let started = std::time::Instant::now();
    loop {
        let left = commerce_worker::tools::simulated_api::queued(&env.redis, env.keys())
            .await
            .unwrap_or(total);
        if left < total * 3 / 4 {
            break;
        }
        assert!(
            !draining.is_finished(),
            "the drain finished before the kill"
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "timed out waiting for the drain to decide a quarter of the queue"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    cluster.kill(node);
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.restart(node);
    let report = draining
        .within(
            DRAIN_LIMIT,
            "the drain to finish after the primary came back",
        )
        .await;
    assert!(report.decided() > 0);
    pipeline.finish().await;
    assert_every_invariant(&env, &coupons, initial, users, &malformed).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_coupon_queues_spread_over_the_shards_and_three_drainers_keep_every_invariant() {
    let cluster = PrivateCluster::start();
    let mut env = cluster_env_with(&cluster, per_coupon_keys).await;
    env.config.coupon.batch_size =
        std::num::NonZeroUsize::new(100).unwrap_or(std::num::NonZeroUsize::MIN);
    let coupons = [1, 2, 3, 4, 5, 6];
    let shards: std::collections::HashSet<usize> = coupons
        .iter()
        .map(|&c| cluster.node_of(&env.keys().for_coupon(c).queue))
        .collect();
    assert!(
        shards.len() >= 2,
        "the coupons' queues live on several primaries"
    );
    three_replicas_drain_a_sale(&env, &coupons, 150, 400).await;
    env.cleanup().await;
}
