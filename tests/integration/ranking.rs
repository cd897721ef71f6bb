//! The ranking rebuild against real Redis (docs/contract.md §3).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use chrono::{DateTime, Days, NaiveDate, Utc};
use commerce_worker::metrics::Metrics;
use commerce_worker::ranking::{
    RankingKeeper, RankingRebuild, RebuildReport, Strategy, WhenLocked, chunk_add_script_sha,
    day_at, swap_script_sha, today, union_script_sha,
};
use commerce_worker::tools::fault_proxy::FaultProxy;
use fred::prelude::*;

use commerce_worker::schedule::{Clock, SystemClock, ZonedSchedule, run_zoned};
use tokio_util::sync::CancellationToken;

use crate::common::{BIN, PrivateRedis, TestEnv, eventually};

fn day(text: &str) -> NaiveDate {
    text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
}

async fn add_sales(env: &TestEnv, on: &str, sales: &[(impl AsRef<str>, f64)]) {
    let entries: Vec<(f64, String)> = sales
        .iter()
        .map(|(p, s)| (*s, p.as_ref().to_owned()))
        .collect();
    env.zadd(&env.keys().ranking_day(day(on)), &entries).await;
}

async fn ranking(env: &TestEnv) -> HashMap<String, f64> {
    let all: Vec<(String, f64)> = env
        .redis
        .zrange(&env.keys().ranking_window, 0, -1, None, false, None, true)
        .await
        .unwrap();
    all.into_iter().collect()
}

fn rebuilder(env: &TestEnv) -> RankingRebuild {
    RankingRebuild::new(
        env.redis.clone(),
        env.keys().clone(),
        env.config.ranking.clone(),
        Metrics::new(),
    )
}

/// Rebuilds the ranking for `on` with `strategy` (or the one the rebuild picks), waiting for the
/// lock.
async fn rebuild(env: &TestEnv, strategy: Option<Strategy>, on: NaiveDate) -> RebuildReport {
    let rebuild = match strategy {
        Some(strategy) => rebuilder(env).with_strategy(strategy),
        None => rebuilder(env),
    };
    rebuild
        .rebuild(on, WhenLocked::Wait)
        .await
        .unwrap_or_else(|e| panic!("rebuilding for {on} ({strategy:?}): {e:#}"))
}

async fn exists(env: &TestEnv, key: String) -> bool {
    env.redis.exists::<u64, _>(key).await.unwrap() == 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ranking_is_the_exact_sum_of_the_window_and_older_days_are_pruned() {
    let env = TestEnv::new().await;
    add_sales(&env, "2026-11-23", &[("p1", 5.0), ("p2", 1.0)]).await;
    add_sales(&env, "2026-11-22", &[("p1", 2.0), ("p3", 7.0)]).await;
    add_sales(&env, "2026-11-21", &[("p2", 4.0)]).await;
    // Outside the window, including days missed while the worker was down.
    for old in ["2026-11-20", "2026-11-15", "2026-10-01"] {
        add_sales(&env, old, &[("p9", 100.0)]).await;
    }
    let report = rebuild(&env, None, day("2026-11-23")).await;
    let expected: HashMap<String, f64> = [("p1", 7.0), ("p2", 5.0), ("p3", 7.0)]
        .into_iter()
        .map(|(p, s)| (p.to_string(), s))
        .collect();
    assert_eq!(ranking(&env).await, expected);
    assert_eq!(report.products, 3);
    assert_eq!(report.pruned, 3);
    assert_eq!(
        report.window,
        vec![day("2026-11-21"), day("2026-11-22"), day("2026-11-23")]
    );
    for old in ["2026-11-20", "2026-11-15", "2026-10-01"] {
        assert!(
            !exists(&env, env.keys().ranking_day(day(old))).await,
            "{old} pruned"
        );
    }
    assert!(exists(&env, env.keys().ranking_day(day("2026-11-21"))).await);
    let ttl: i64 = env
        .redis
        .ttl(env.keys().ranking_day(day("2026-11-21")))
        .await
        .unwrap();
    assert!(ttl > 0, "window keys get a safety-net expiry");
    let ranking_ttl: i64 = env.redis.ttl(&env.keys().ranking_window).await.unwrap();
    assert_eq!(ranking_ttl, -1, "the ranking itself does not expire");

    // Idempotent: again (and with the chunked strategy) gives the same ranking, no inflation.
    rebuild(&env, None, day("2026-11-23")).await;
    assert_eq!(ranking(&env).await, expected);
    rebuild(&env, Some(Strategy::Chunked), day("2026-11-23")).await;
    assert_eq!(ranking(&env).await, expected);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_apply_newest_day_first() {
    let mut env = TestEnv::new().await;
    env.config.ranking.weights = Some(vec![1.0, 0.5, 0.25]);
    add_sales(&env, "2026-03-03", &[("p", 8.0)]).await;
    add_sales(&env, "2026-03-02", &[("p", 8.0)]).await;
    add_sales(&env, "2026-03-01", &[("p", 8.0)]).await;
    for strategy in [Strategy::Zunionstore, Strategy::Chunked] {
        rebuild(&env, Some(strategy), day("2026-03-03")).await;
        assert_eq!(ranking(&env).await.get("p"), Some(&14.0), "{strategy:?}");
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_window_gives_an_empty_ranking_with_either_strategy() {
    let env = TestEnv::new().await;
    add_sales(&env, "2026-01-01", &[("old", 1.0)]).await;
    for strategy in [Strategy::Zunionstore, Strategy::Chunked] {
        let report = rebuild(&env, Some(strategy), day("2026-02-01")).await;
        assert_eq!(report.products, 0);
        assert!(ranking(&env).await.is_empty());
    }
    env.cleanup().await;
}

#[test]
fn the_same_instant_is_a_different_day_in_utc_and_seoul() {
    // 2026-11-22 16:30 UTC is 2026-11-23 01:30 in Seoul.
    let instant: DateTime<Utc> = "2026-11-22T16:30:00Z".parse().unwrap();
    assert_eq!(day_at(instant, chrono_tz::UTC), day("2026-11-22"));
    assert_eq!(day_at(instant, chrono_tz::Asia::Seoul), day("2026-11-23"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_reader_never_sees_the_ranking_missing_empty_or_partial() {
    let env = TestEnv::new().await;
    // The days overlap in part and score each product differently (1, 2, 4 units), so a ranking
    // missing a day, a chunk of products or part of a sum differs from the full one in its
    // members or in its scores, not only in its size.
    let days = [
        ("2026-05-01", 0, 1.0),
        ("2026-05-02", 5_000, 2.0),
        ("2026-05-03", 10_000, 4.0),
    ];
    let mut expected: HashMap<String, f64> = HashMap::new();
    for (d, first, units) in days {
        let products: Vec<(String, f64)> = (first..first + 20_000)
            .map(|i| (format!("p{i}"), units))
            .collect();
        for (p, units) in &products {
            *expected.entry(p.clone()).or_default() += units;
        }
        add_sales(&env, d, &products).await;
    }
    rebuild(&env, None, day("2026-05-03")).await;
    assert_eq!(ranking(&env).await, expected);
    let done = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (client, key, done, reads, expected) = (
            env.redis.clone(),
            env.keys().ranking_window.clone(),
            done.clone(),
            reads.clone(),
            expected.clone(),
        );
        tokio::spawn(async move {
            let mut bad = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let seen: Vec<(String, f64)> = client
                    .zrange(&key, 0, -1, None, false, None, true)
                    .await
                    .unwrap_or_default();
                reads.fetch_add(1, Ordering::Relaxed);
                let wrong = seen
                    .iter()
                    .filter(|(p, score)| expected.get(p) != Some(score))
                    .count();
                if seen.len() != expected.len() || wrong > 0 {
                    bad.push(format!("{} members, {wrong} wrong scores", seen.len()));
                }
            }
            bad
        })
    };
    // Rebuild with both strategies until the reader has read a few times meanwhile (a fast
    // machine may need more rounds than a slow one).
    for _round in 0..50 {
        for strategy in [Strategy::Zunionstore, Strategy::Chunked] {
            rebuilder(&env)
                .with_strategy(strategy)
                .rebuild(day("2026-05-03"), WhenLocked::Wait)
                .await
                .unwrap();
        }
        if reads.load(Ordering::Relaxed) > 10 {
            break;
        }
    }
    done.store(true, Ordering::Relaxed);
    let bad = reader.await.unwrap();
    assert!(
        reads.load(Ordering::Relaxed) > 10,
        "the reader ran during the rebuilds ({} reads)",
        reads.load(Ordering::Relaxed)
    );
    assert!(
        bad.is_empty(),
        "the reader saw {} wrong rankings, first {:?}",
        bad.len(),
        bad.iter().take(3).collect::<Vec<_>>()
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chunked_strategy_gives_the_same_result_as_zunionstore() {
    let env = TestEnv::new().await;
    // Overlapping product sets with varied scores across three days.
    for (offset, d) in ["2026-07-01", "2026-07-02", "2026-07-03"]
        .iter()
        .enumerate()
    {
        let sales: Vec<(String, f64)> = (0..5000)
            .map(|i| {
                (
                    format!("p{}", i * (offset + 1) % 7000),
                    ((i * 37 + offset * 11) % 97) as f64 + 1.0,
                )
            })
            .collect();
        add_sales(&env, d, &sales).await;
    }
    rebuild(&env, Some(Strategy::Zunionstore), day("2026-07-03")).await;
    let by_union = ranking(&env).await;
    rebuild(&env, Some(Strategy::Chunked), day("2026-07-03")).await;
    let by_chunks = ranking(&env).await;
    assert!(by_union.len() > 5000, "{}", by_union.len());
    assert_eq!(by_chunks.len(), by_union.len());
    assert!(by_chunks == by_union, "the two strategies disagree");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_finding_the_lock_held_skips_the_rebuild() {
    let env = TestEnv::new().await;
    let _: () = env
        .redis
        .set(
            env.keys().ranking_lock(),
            "other-replica",
            None,
            None,
            false,
        )
        .await
        .unwrap();
    let report = rebuilder(&env)
        .rebuild(day("2026-01-03"), WhenLocked::Skip)
        .await
        .unwrap();
    assert!(report.skipped_locked);
    let held: String = env.redis.get(env.keys().ranking_lock()).await.unwrap();
    assert_eq!(
        held, "other-replica",
        "another replica's lock is not released by us"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuilding_a_past_date_keeps_that_windows_daily_keys() {
    let env = TestEnv::new().await;
    add_sales(&env, "2025-01-10", &[("p", 1.0)]).await;
    rebuild(&env, None, day("2025-01-10")).await;
    assert!(exists(&env, env.keys().ranking_day(day("2025-01-10"))).await);
    let ttl: i64 = env
        .redis
        .ttl(env.keys().ranking_day(day("2025-01-10")))
        .await
        .unwrap();
    assert_eq!(ttl, -1, "no expiry in the past");
    env.cleanup().await;
}

/// A client connected to the test Redis through a fault proxy.
async fn through_proxy(env: &TestEnv) -> (FaultProxy, Client) {
    let proxy = FaultProxy::start(crate::common::redis_addr())
        .await
        .unwrap();
    let client = env.redis_through(&proxy).await;
    (proxy, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_whose_reply_was_lost_and_that_was_sent_again_leaves_the_new_ranking_live() {
    let env = TestEnv::new().await;
    add_sales(&env, "2026-11-23", &[("p1", 5.0), ("p2", 1.0)]).await;
    add_sales(&env, "2026-11-22", &[("p1", 2.0)]).await;
    let (proxy, client) = through_proxy(&env).await;
    for strategy in [Strategy::Zunionstore, Strategy::Chunked] {
        proxy.drop_reply_when(swap_script_sha());
        let report = RankingRebuild::new(
            client.clone(),
            env.keys().clone(),
            env.config.ranking.clone(),
            Metrics::new(),
        )
        .with_strategy(strategy)
        .rebuild(day("2026-11-23"), WhenLocked::Skip)
        .await
        .unwrap_or_else(|e| panic!("{strategy:?}: {e:#}"));
        assert_eq!(proxy.armed_drops(), 0, "the swap's reply was not lost");
        let expected: HashMap<String, f64> = [("p1", 7.0), ("p2", 1.0)]
            .into_iter()
            .map(|(p, s)| (p.to_string(), s))
            .collect();
        assert_eq!(ranking(&env).await, expected, "{strategy:?}");
        assert_eq!(report.products, 2, "{strategy:?}");
    }
    assert_eq!(proxy.replies_dropped(), 2);
    let live = rebuilder(&env)
        .live()
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no live record"));
    assert_eq!(live.day, day("2026-11-23"));
    env.cleanup().await;
}

/// A failover to a replica that had not yet received the build (or a restart from an older
/// snapshot, an eviction) loses the temporary key, or part of it, between the build and the swap:
/// the swap compares it with the member count the build reported and refuses, leaving the live
/// ranking and its record alone, never swapping in "nothing" or half a window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_temporary_key_lost_in_whole_or_in_part_is_never_swapped_in() {
    let env = TestEnv::new().await;
    add_sales(&env, "2026-11-23", &[("p1", 5.0), ("p2", 1.0)]).await;
    add_sales(&env, "2026-11-22", &[("p1", 2.0)]).await;
    // Also loads the swap script into Redis' cache.
    rebuilder(&env)
        .rebuild(day("2026-11-23"), WhenLocked::Wait)
        .await
        .unwrap();
    let before = ranking(&env).await;
    assert_eq!(before.len(), 2);
    let temp = env.keys().ranking_temp("lost-1");
    for held in [0_usize, 1] {
        let _: u64 = env.redis.del(&temp).await.unwrap();
        if held > 0 {
            let _: i64 = env
                .redis
                .zadd(&temp, None, None, false, false, (7.0, "p1"))
                .await
                .unwrap();
        }
        let reply: (String, u64, String, String) = env
            .redis
            .evalsha(
                swap_script_sha(),
                vec![
                    temp.clone(),
                    env.keys().ranking_window.clone(),
                    env.keys().ranking_temp("lost:old"),
                    env.keys().ranking_live_record(),
                ],
                vec!["lost", "2026-11-24", "2", ""],
            )
            .await
            .unwrap();
        assert_eq!(reply.0, "incomplete", "{held} of 2 members: {reply:?}");
        assert_eq!(reply.3, held.to_string());
        assert_eq!(
            ranking(&env).await,
            before,
            "{held} of 2 members swapped in"
        );
        let live = rebuilder(&env)
            .live()
            .await
            .unwrap()
            .expect("a live record");
        assert_eq!(live.day, day("2026-11-23"), "not recorded as built");
    }
    env.cleanup().await;
}

/// Issue 13 review (a): the chunked build's result loses members mid-way (an eviction, a restart
/// from an older snapshot): the swap finds fewer members than the build added, and the rebuild
/// builds again instead of putting a half-built ranking live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_build_whose_result_is_lost_mid_way_is_built_again_never_swapped_in_half_built() {
    let env = TestEnv::new().await;
    for (offset, d) in ["2026-02-01", "2026-02-02", "2026-02-03"]
        .iter()
        .enumerate()
    {
        let sales: Vec<(String, f64)> = (0..3500)
            .map(|i| (format!("p{}", i + offset * 500), (i % 13 + 1) as f64))
            .collect();
        let refs: Vec<(&str, f64)> = sales.iter().map(|(p, s)| (p.as_str(), *s)).collect();
        add_sales(&env, d, &refs).await;
    }
    rebuilder(&env)
        .with_strategy(Strategy::Zunionstore)
        .rebuild(day("2026-02-03"), WhenLocked::Wait)
        .await
        .unwrap();
    let by_union = ranking(&env).await;
    let (proxy, client) = through_proxy(&env).await;
    // The first chunk's reply is lost and the client's reconnection hangs: meanwhile the
    // result so far is lost (its ledger survives, so the resent chunk is not added again).
    proxy.set_blackhole(true);
    proxy.drop_reply_when(chunk_add_script_sha());
    let rebuild = tokio::spawn({
        let rebuild = RankingRebuild::new(
            client,
            env.keys().clone(),
            env.config.ranking.clone(),
            Metrics::new(),
        )
        .with_strategy(Strategy::Chunked);
        async move { rebuild.rebuild(day("2026-02-03"), WhenLocked::Wait).await }
    });
    eventually(
        std::time::Duration::from_secs(30),
        "a chunk's reply to be lost",
        async || proxy.replies_dropped() == 1,
    )
    .await;
    let temp_pattern = format!("{{{}}}:tmp:*", env.keys().ranking_window);
    let mut lost = 0;
    for key in commerce_worker::backends::scan_keys(&env.redis, &temp_pattern)
        .await
        .unwrap()
    {
        let kind: String = env.redis.r#type(&key).await.unwrap();
        if kind == "zset" {
            lost += env.redis.del::<u64, _>(&key).await.unwrap();
        }
    }
    assert_eq!(lost, 1, "the build's result was there to lose");
    proxy.set_blackhole(false);
    let report = rebuild.await.unwrap().expect("built again");
    let by_chunks = ranking(&env).await;
    assert_eq!(report.products, by_union.len() as u64);
    assert!(
        by_chunks == by_union,
        "a half-built ranking went live: {} of {} products",
        by_chunks.len(),
        by_union.len()
    );
    env.cleanup().await;
}

/// Issue 13 review (b): every temporary key gets its TTL in the step that creates it, so a worker
/// that dies right after leaves nothing behind for good; and a key left without one (by an older
/// version) gets one at the next rebuild.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_temporary_key_expires_even_when_its_worker_dies_right_after_creating_it() {
    let env = TestEnv::new().await;
    add_sales(&env, "2026-02-03", &[("p1", 5.0), ("p2", 1.0)]).await;
    add_sales(&env, "2026-02-02", &[("p1", 2.0)]).await;
    let temp_pattern = format!("{{{}}}:tmp:*", env.keys().ranking_window);
    for (strategy, sha) in [
        (Strategy::Zunionstore, union_script_sha()),
        (Strategy::Chunked, chunk_add_script_sha()),
    ] {
        let (proxy, client) = through_proxy(&env).await;
        // The worker "dies" right after its first write: the reply never comes and it cannot
        // reconnect to send anything else.
        proxy.set_blackhole(true);
        proxy.drop_reply_when(&sha);
        let rebuild = tokio::spawn({
            let rebuild = RankingRebuild::new(
                client,
                env.keys().clone(),
                env.config.ranking.clone(),
                Metrics::new(),
            )
            .with_strategy(strategy);
            async move { rebuild.rebuild(day("2026-02-03"), WhenLocked::Wait).await }
        });
        eventually(
            std::time::Duration::from_secs(30),
            "the build's first write to lose its reply",
            async || proxy.replies_dropped() == 1,
        )
        .await;
        let temps = commerce_worker::backends::scan_keys(&env.redis, &temp_pattern)
            .await
            .unwrap();
        assert!(
            !temps.is_empty(),
            "{strategy:?}: the build wrote a temporary key"
        );
        for key in &temps {
            let ttl: i64 = env.redis.ttl(key).await.unwrap();
            assert!(ttl > 0, "{strategy:?}: {key} has no expiry (TTL {ttl})");
        }
        rebuild.abort();
        let _ = rebuild.await;
        proxy.stop().await;
        let _: u64 = env.redis.del(temps).await.unwrap();
        let _: u64 = env.redis.del(env.keys().ranking_lock()).await.unwrap();
    }
    // A temporary key an older version left without an expiry.
    let abandoned = env.keys().ranking_temp("abandoned");
    let _: i64 = env
        .redis
        .zadd(&abandoned, None, None, false, false, (1.0, "p1"))
        .await
        .unwrap();
    rebuilder(&env)
        .rebuild(day("2026-02-03"), WhenLocked::Wait)
        .await
        .unwrap();
    let ttl: i64 = env.redis.ttl(&abandoned).await.unwrap();
    assert!(
        (1..=3600).contains(&ttl),
        "the abandoned temporary key got an expiry (TTL {ttl})"
    );
    env.cleanup().await;
}

/// Issue 13 review (c): a live record dated in the future (a clock that ran ahead, a mistyped date
/// before dates were checked) is stale, not "a later day already built": the scheduled rebuild
/// replaces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_ranking_dated_in_the_future_is_treated_as_stale_and_rebuilt() {
    let env = TestEnv::new().await;
    let today = today(env.config.ranking.timezone);
    add_sales(&env, &today.to_string(), &[("p1", 3.0)]).await;
    let future = today.checked_add_days(Days::new(30)).expect("a date");
    let _: i64 = env
        .redis
        .zadd(
            &env.keys().ranking_window,
            None,
            None,
            false,
            false,
            (99.0, "stale"),
        )
        .await
        .unwrap();
    let _: i64 = env
        .redis
        .hset(
            env.keys().ranking_live_record(),
            [
                ("token", "from-the-future".to_owned()),
                ("day", future.to_string()),
                ("built_at", Utc::now().timestamp().to_string()),
            ],
        )
        .await
        .unwrap();
    let keeper = RankingKeeper::new(rebuilder(&env), Arc::new(SystemClock), Metrics::new());
    let stop = CancellationToken::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        keeper.on_tick(Utc::now(), &stop),
    )
    .await
    .expect("the tick finished within 60 s");
    let live = rebuilder(&env)
        .live()
        .await
        .unwrap()
        .expect("a live record");
    assert_eq!(live.day, today, "the future-dated record was replaced");
    let expected: HashMap<String, f64> = [("p1".to_owned(), 3.0)].into_iter().collect();
    assert_eq!(ranking(&env).await, expected);
    env.cleanup().await;
}

/// Issue 13 review (d): a daily key of the wrong type fails the rebuild with an error naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daily_key_of_the_wrong_type_is_named_in_the_error() {
    let env = TestEnv::new().await;
    add_sales(&env, "2026-02-03", &[("p1", 5.0)]).await;
    let wrong = env.keys().ranking_day(day("2026-02-02"));
    let _: () = env
        .redis
        .set(&wrong, "not a sorted set", None, None, false)
        .await
        .unwrap();
    for strategy in [Strategy::Zunionstore, Strategy::Chunked] {
        let error = rebuilder(&env)
            .with_strategy(strategy)
            .rebuild(day("2026-02-03"), WhenLocked::Wait)
            .await
            .expect_err("a daily key of the wrong type");
        let message = format!("{error:#}");
        assert!(
            message.contains(&wrong) && message.contains("WRONGTYPE"),
            "{strategy:?}: {message}"
        );
    }
    env.cleanup().await;
}

fn rebuild_ranking_command(env: &TestEnv, args: &[&str]) -> std::process::Output {
    let config = env.config_file();
    crate::common::output_within(
        std::process::Command::new(BIN)
            .args(["rebuild-ranking", "--config"])
            .arg(&config)
            .args(args)
            .env("RUST_LOG", "off"),
        std::time::Duration::from_secs(60),
        "rebuild-ranking",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_ranking_for_a_day_after_today_exits_64_and_touches_nothing() {
    let env = TestEnv::new().await;
    let today = today(env.config.ranking.timezone);
    let tomorrow = today.succ_opt().unwrap_or_else(|| panic!("no tomorrow"));
    let live_days: Vec<NaiveDate> = (0..3)
        .filter_map(|back| today.checked_sub_days(Days::new(back)))
        .collect();
    for d in &live_days {
        add_sales(&env, &d.to_string(), &[("p", 1.0)]).await;
    }
    for date in [tomorrow.to_string(), "2062-11-24".to_owned()] {
        let output = rebuild_ranking_command(&env, &["--date", &date]);
        assert_eq!(
            output.status.code(),
            Some(64),
            "--date {date}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("after today"),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    for d in &live_days {
        assert!(exists(&env, env.keys().ranking_day(*d)).await, "{d} kept");
        let ttl: i64 = env.redis.ttl(env.keys().ranking_day(*d)).await.unwrap();
        assert_eq!(ttl, -1, "{d}: no expiry set either");
    }
    assert!(!exists(&env, env.keys().ranking_window.clone()).await);
    assert!(!exists(&env, env.keys().ranking_lock()).await);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_command_line_exits_64() {
    let env = TestEnv::new().await;
    for args in [
        &["--date", "2026-13-01"][..],
        &["--date", "yesterday"][..],
        &["--no-such-flag"][..],
    ] {
        let output = rebuild_ranking_command(&env, args);
        assert_eq!(
            output.status.code(),
            Some(64),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let help = crate::common::output_within(
        std::process::Command::new(BIN).arg("--help"),
        std::time::Duration::from_secs(60),
        "commerce-worker",
    );
    assert_eq!(help.status.code(), Some(0), "--help is not an error");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuilding_a_past_date_never_prunes_days_after_its_window() {
    let env = TestEnv::new().await;
    for d in [
        "2025-01-07",
        "2025-01-08",
        "2025-01-10",
        "2025-01-11",
        "2025-02-01",
    ] {
        add_sales(&env, d, &[("p", 1.0)]).await;
    }
    let report = rebuild(&env, None, day("2025-01-10")).await;
    assert_eq!(report.pruned, 1, "only 2025-01-07, before the window");
    assert!(!exists(&env, env.keys().ranking_day(day("2025-01-07"))).await);
    for kept in ["2025-01-08", "2025-01-10", "2025-01-11", "2025-02-01"] {
        assert!(
            exists(&env, env.keys().ranking_day(day(kept))).await,
            "{kept} kept"
        );
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_whose_reply_was_lost_and_that_was_sent_again_is_added_once() {
    let env = TestEnv::new().await;
    // Settled days (long past), several chunks each.
    for (offset, d) in ["2026-02-01", "2026-02-02", "2026-02-03"]
        .iter()
        .enumerate()
    {
        let sales: Vec<(String, f64)> = (0..3500)
            .map(|i| (format!("p{}", i + offset * 500), (i % 13 + 1) as f64))
            .collect();
        add_sales(&env, d, &sales).await;
    }
    rebuild(&env, Some(Strategy::Zunionstore), day("2026-02-03")).await;
    let by_union = ranking(&env).await;
    let (proxy, client) = through_proxy(&env).await;
    for _ in 0..3 {
        proxy.drop_reply_when(chunk_add_script_sha());
    }
    RankingRebuild::new(
        client,
        env.keys().clone(),
        env.config.ranking.clone(),
        Metrics::new(),
    )
    .with_strategy(Strategy::Chunked)
    .rebuild(day("2026-02-03"), WhenLocked::Wait)
    .await
    .unwrap();
    assert_eq!(proxy.replies_dropped(), 3, "three chunk replies were lost");
    let by_chunks = ranking(&env).await;
    assert_eq!(by_chunks.len(), by_union.len());
    assert!(by_chunks == by_union, "a resent chunk was counted twice");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn todays_key_written_during_a_chunked_rebuild_is_never_counted_twice() {
    let env = TestEnv::new().await;
    let today = today(env.config.ranking.timezone);
    let yesterday = today.pred_opt().unwrap_or_else(|| panic!("no yesterday"));
    let sales: Vec<(String, f64)> = (0..20_000).map(|i| (format!("p{i}"), 1.0)).collect();
    add_sales(&env, &today.to_string(), &sales).await;
    add_sales(&env, &yesterday.to_string(), &sales).await;
    let done = Arc::new(AtomicBool::new(false));
    // The API keeps selling: existing products gain a sale, new products appear (which grows
    // and rehashes the set, when ZSCAN may return a member twice).
    let writer = {
        let (client, key, done) = (
            env.redis.clone(),
            env.keys().ranking_day(today),
            done.clone(),
        );
        tokio::spawn(async move {
            let mut i = 0_u64;
            while !done.load(Ordering::Relaxed) {
                let member = if i.is_multiple_of(2) {
                    format!("p{}", (i * 7919) % 20_000)
                } else {
                    format!("new{i}")
                };
                let _: f64 = client.zincrby(&key, 1.0, member).await.unwrap_or(0.0);
                i += 1;
            }
        })
    };
    rebuild(&env, Some(Strategy::Chunked), today).await;
    done.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let after_today: HashMap<String, f64> = env
        .redis
        .zrange::<Vec<(String, f64)>, _, _, _>(
            env.keys().ranking_day(today),
            0,
            -1,
            None,
            false,
            None,
            true,
        )
        .await
        .unwrap()
        .into_iter()
        .collect();
    let ranked = ranking(&env).await;
    assert!(ranked.len() >= 20_000, "{}", ranked.len());
    for (product, score) in &ranked {
        let yesterday_part = if product.starts_with('p') { 1.0 } else { 0.0 };
        let most = after_today.get(product).copied().unwrap_or(0.0) + yesterday_part;
        assert!(
            *score <= most,
            "{product}: {score} in the ranking, but at most {most} was ever sold"
        );
        if product.starts_with('p') {
            assert!(
                *score >= 2.0,
                "{product}: {score}, below its sales before the rebuild"
            );
        }
    }
    env.cleanup().await;
}

/// A clock a test steps: every wait completes at once, moving the time to its end.
struct SteppedClock(std::sync::Mutex<DateTime<Utc>>);

impl Clock for SteppedClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait_until(
        &self,
        at: DateTime<Utc>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        let mut now = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *now = (*now).max(at);
        Box::pin(async {})
    }
}

/// Runs the daemon's ranking schedule (`0 0 0 * * *` in `timezone`) on a stepped clock from
/// `from` for `fires` fires, each handled by the keeper against real Redis; returns, per fire,
/// its local time, the live ranking's day and the products in the ranking (one per daily key).
async fn scheduled_fires(
    timezone: chrono_tz::Tz,
    from: &str,
    fires: usize,
) -> Vec<(String, NaiveDate, Vec<String>)> {
    let mut env = TestEnv::new().await;
    env.config.ranking.timezone = timezone;
    let start: DateTime<Utc> = from.parse().unwrap();
    let first_day = day_at(start, timezone);
    for back in 0..=(fires as u64 + 3) {
        let d = first_day
            .checked_sub_days(Days::new(3))
            .and_then(|d| d.checked_add_days(Days::new(back)))
            .unwrap_or_else(|| panic!("date out of range"));
        add_sales(&env, &d.to_string(), &[(&format!("sold-on-{d}"), 1.0)]).await;
    }
    let clock = Arc::new(SteppedClock(std::sync::Mutex::new(start)));
    let keeper = RankingKeeper::new(rebuilder(&env), clock.clone(), Metrics::new());
    let schedule = ZonedSchedule::new("0 0 0 * * *", timezone).unwrap();
    let stop = CancellationToken::new();
    let seen = Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let run = run_zoned(schedule, clock, stop.clone(), |tick| {
        let (keeper, stop, seen, env) = (keeper.clone(), stop.clone(), seen.clone(), &env);
        async move {
            keeper.on_tick(tick, &stop).await;
            let live = rebuilder(env)
                .live()
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("nothing live after the fire at {tick}"));
            let mut products: Vec<String> = ranking(env).await.into_keys().collect();
            products.sort();
            let mut seen = seen.lock().await;
            seen.push((
                tick.with_timezone(&timezone).to_rfc3339(),
                live.day,
                products,
            ));
            if seen.len() == fires {
                stop.cancel();
            }
        }
    });
    tokio::time::timeout(std::time::Duration::from_secs(60), run)
        .await
        .unwrap_or_else(|_| panic!("{fires} scheduled fires did not finish within 60 s"));
    env.cleanup().await;
    Arc::try_unwrap(seen)
        .unwrap_or_else(|_| panic!("fires still referenced"))
        .into_inner()
}

fn window_products(day_text: &str) -> Vec<String> {
    let d = day(day_text);
    let mut products: Vec<String> = (0..3)
        .filter_map(|back| d.checked_sub_days(Days::new(back)))
        .map(|d| format!("sold-on-{d}"))
        .collect();
    products.sort();
    products
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduled_rebuild_fires_at_new_york_midnight_on_both_sides_of_each_dst_change() {
    let ny = chrono_tz::America::New_York;
    for (from, expected) in [
        // Spring forward on 2026-03-08 at 02:00 (EST -05:00 -> EDT -04:00).
        (
            "2026-03-06T12:00:00Z",
            [
                ("2026-03-07T00:00:00-05:00", "2026-03-07"),
                ("2026-03-08T00:00:00-05:00", "2026-03-08"),
                ("2026-03-09T00:00:00-04:00", "2026-03-09"),
                ("2026-03-10T00:00:00-04:00", "2026-03-10"),
            ],
        ),
        // Fall back on 2026-11-01 at 02:00 (EDT -04:00 -> EST -05:00).
        (
            "2026-10-30T12:00:00Z",
            [
                ("2026-10-31T00:00:00-04:00", "2026-10-31"),
                ("2026-11-01T00:00:00-04:00", "2026-11-01"),
                ("2026-11-02T00:00:00-05:00", "2026-11-02"),
                ("2026-11-03T00:00:00-05:00", "2026-11-03"),
            ],
        ),
    ] {
        let fired = scheduled_fires(ny, from, expected.len()).await;
        for ((local, live_day, products), (want_local, want_day)) in fired.iter().zip(expected) {
            assert_eq!(local, want_local, "fired at the wrong local time");
            assert_eq!(
                *live_day,
                day(want_day),
                "fire at {local} built the wrong day"
            );
            assert_eq!(
                *products,
                window_products(want_day),
                "fire at {local} summed the wrong window"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduled_rebuild_fires_at_seoul_midnight_every_day() {
    let fired = scheduled_fires(chrono_tz::Asia::Seoul, "2026-03-07T03:00:00Z", 3).await;
    let expected = [
        ("2026-03-08T00:00:00+09:00", "2026-03-08"),
        ("2026-03-09T00:00:00+09:00", "2026-03-09"),
        ("2026-03-10T00:00:00+09:00", "2026-03-10"),
    ];
    assert_eq!(fired.len(), expected.len());
    for ((local, live_day, products), (want_local, want_day)) in fired.iter().zip(expected) {
        assert_eq!(local, want_local);
        assert_eq!(*live_day, day(want_day));
        assert_eq!(*products, window_products(want_day));
    }
}

/// The ranking rebuild's runs with `result` (`ok`, `skipped`, `error`) in `metrics`.
fn rebuild_runs(metrics: &Metrics, result: &str) -> f64 {
    let series =
        format!(r#"commerce_worker_job_runs_total{{job="ranking_rebuild",result="{result}"}}"#);
    metric(metrics, &series).unwrap_or(0.0)
}

/// The keeper's tick for now, run in the background as the scheduler runs it.
fn spawn_tick(keeper: &RankingKeeper) -> tokio::task::JoinHandle<()> {
    let keeper = keeper.clone();
    tokio::spawn(async move { keeper.on_tick(Utc::now(), &CancellationToken::new()).await })
}

/// Waits for a tick started by [`spawn_tick`] to return (once the ranking is built); fails the
/// test naming `what` after `limit`.
async fn tick_within(run: tokio::task::JoinHandle<()>, limit: std::time::Duration, what: &str) {
    tokio::time::timeout(limit, run)
        .await
        .unwrap_or_else(|_| panic!("timed out after {limit:?} waiting for {what}"))
        .unwrap();
}

fn metric(metrics: &Metrics, line_start: &str) -> Option<f64> {
    metrics
        .encode()
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_left_by_a_dead_replica_is_a_skip_not_a_success_and_the_tick_retries_until_built() {
    let env = TestEnv::new().await;
    let today = today(env.config.ranking.timezone);
    add_sales(&env, &today.to_string(), &[("p", 3.0)]).await;
    // A replica died holding the lease: nobody renews it, and it lapses by itself.
    let _: () = env
        .redis
        .set(
            env.keys().ranking_lock(),
            "dead-replica",
            Some(Expiration::PX(3000)),
            None,
            false,
        )
        .await
        .unwrap();
    let metrics = Metrics::new();
    let keeper = RankingKeeper::new(rebuilder(&env), Arc::new(SystemClock), metrics.clone());
    let run = spawn_tick(&keeper);
    eventually(
        std::time::Duration::from_secs(20),
        "a rebuild skipped for the dead replica's lease",
        async || rebuild_runs(&metrics, "skipped") >= 1.0,
    )
    .await;
    assert_eq!(rebuild_runs(&metrics, "ok"), 0.0, "a skip is not a success");
    assert_eq!(
        metric(
            &metrics,
            r#"commerce_worker_job_last_success_timestamp_seconds{job="ranking_rebuild"}"#
        )
        .unwrap_or(0.0),
        0.0,
        "a skip does not move the last success"
    );
    tick_within(
        run,
        std::time::Duration::from_secs(30),
        "the tick to build the ranking once the lease lapsed",
    )
    .await;
    assert_eq!(ranking(&env).await.get("p"), Some(&3.0));
    assert_eq!(rebuild_runs(&metrics, "ok"), 1.0);
    let yyyymmdd: f64 = today.format("%Y%m%d").to_string().parse().unwrap();
    assert_eq!(
        metric(&metrics, "commerce_worker_ranking_built_day "),
        Some(yyyymmdd)
    );
    assert!(
        metric(&metrics, "commerce_worker_ranking_built_timestamp_seconds ").unwrap_or(0.0) > 0.0
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_at_midnight_the_tick_keeps_trying_until_the_ranking_is_built() {
    // Restarted from its snapshot, so the daily sales survive the outage.
    let mut redis = PrivateRedis::with_snapshots();
    let env = TestEnv::with_servers(&redis.url(), &crate::common::mysql_server_url()).await;
    let today = today(env.config.ranking.timezone);
    add_sales(&env, &today.to_string(), &[("p", 2.0)]).await;
    let metrics = Metrics::new();
    let keeper = RankingKeeper::new(rebuilder(&env), Arc::new(SystemClock), metrics.clone());
    assert_eq!(redis.cli(&["SAVE"]).trim(), "OK");
    redis.stop();
    let run = spawn_tick(&keeper);
    eventually(
        std::time::Duration::from_secs(60),
        "a rebuild failing while Redis is down",
        async || rebuild_runs(&metrics, "error") >= 1.0,
    )
    .await;
    assert!(!run.is_finished(), "the tick gave up while Redis was down");
    redis.resume();
    tick_within(
        run,
        std::time::Duration::from_secs(90),
        "the tick to build the ranking once Redis came back",
    )
    .await;
    assert_eq!(ranking(&env).await.get("p"), Some(&2.0));
    assert_eq!(rebuild_runs(&metrics, "ok"), 1.0);
    env.cleanup().await;
}

fn start_daemon(config: &std::path::Path) -> std::process::Child {
    std::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "off")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_sigkilled_mid_rebuild_leaves_a_lease_that_lapses_and_the_next_daemon_builds_today()
 {
    let env = TestEnv::new().await;
    let today = today(env.config.ranking.timezone);
    // Big enough for the chunked strategy to take a while: 3 days x 150 000, overlapping 90 %.
    const PRODUCTS: u64 = 150_000;
    for back in 0..3_u64 {
        let d = today
            .checked_sub_days(Days::new(back))
            .unwrap_or_else(|| panic!("date out of range"));
        let first = back * PRODUCTS / 10;
        let entries: Vec<(f64, String)> = (first..first + PRODUCTS)
            .map(|p| (1.0, p.to_string()))
            .collect();
        env.zadd_nx(&env.keys().ranking_day(d), &entries).await;
    }
    let config = env.config_file();
    let mut first = start_daemon(&config);
    // The start-up check finds no ranking for today and rebuilds; wait until it is mid-way.
    let sum_pattern = format!("{{{}}}:tmp:*:ledger", env.keys().ranking_window);
    eventually(
        std::time::Duration::from_secs(60),
        "the first daemon's rebuild under way (its ledger in Redis)",
        async || {
            commerce_worker::backends::scan_keys(&env.redis, &sum_pattern)
                .await
                .is_ok_and(|keys| !keys.is_empty())
        },
    )
    .await;
    first.kill().unwrap();
    let _ = first.wait();
    let lease_ms: i64 = env.redis.pttl(env.keys().ranking_lock()).await.unwrap();
    assert!(
        (1..=10_000).contains(&lease_ms),
        "the dead daemon's lease lapses within seconds (PTTL {lease_ms} ms)"
    );
    assert!(
        rebuilder(&env).live().await.unwrap().is_none(),
        "killed mid-way, nothing was swapped in"
    );

    let mut second = crate::common::Daemon::start(&env.config_file(), &[]);
    let port = second.port;
    eventually(
        std::time::Duration::from_secs(120),
        "the second daemon to build today's ranking",
        async || {
            rebuilder(&env)
                .live()
                .await
                .ok()
                .flatten()
                .is_some_and(|live| live.day == today)
        },
    )
    .await;
    let products: u64 = env.redis.zcard(&env.keys().ranking_window).await.unwrap();
    assert_eq!(products, PRODUCTS * 12 / 10, "every product of the window");
    let score: Option<f64> = env
        .redis
        .zscore(&env.keys().ranking_window, (PRODUCTS / 2).to_string())
        .await
        .unwrap();
    assert_eq!(
        score,
        Some(3.0),
        "a product sold once on each of the 3 days"
    );
    let yyyymmdd = today.format("%Y%m%d").to_string();
    eventually(
        std::time::Duration::from_secs(10),
        "the built-day gauge on /metrics",
        async || {
            crate::common::http_get(port, "/metrics", "text/plain")
                .1
                .lines()
                .any(|l| l == format!("commerce_worker_ranking_built_day {yyyymmdd}"))
        },
    )
    .await;
    let status = second.stop().await;
    assert_eq!(status.code(), Some(0), "the second daemon stops cleanly");
    env.cleanup().await;
}
