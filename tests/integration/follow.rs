//! Following the queue between ticks (`[coupon] poll_interval_ms`) and finding the per-coupon
//! lanes with work (the active set and the registry sweep), against real Redis and MariaDB.
//!
//! The daemon tests run `app::run` in-process with a yearly schedule, so a decision can only come
//! from following; they wait for conditions, never for a tick.

use std::time::Duration;

use commerce_worker::app;
use commerce_worker::config::{Config, CronSchedule};
use commerce_worker::coupon::{FollowLease, Outcome};
use commerce_worker::tools::simulated_api::enqueue_members;
use fred::prelude::*;
use tokio_util::sync::CancellationToken;

use crate::common::{TestEnv, eventually};

const WAIT: Duration = Duration::from_secs(20);

/// Fires once a year: in these tests no scheduled tick ever runs.
fn yearly() -> CronSchedule {
    CronSchedule::parse("0 0 0 1 1 *").unwrap_or_else(|e| panic!("{e}"))
}

fn following(env: &TestEnv, poll_ms: u64) -> Config {
    let mut config = env.config.clone();
    config.coupon.schedule = yearly();
    config.coupon.poll_interval = Duration::from_millis(poll_ms);
    config
}

fn now_ms() -> f64 {
    chrono::Utc::now().timestamp_millis() as f64
}

async fn result_of(env: &TestEnv, coupon: i64, user: i64) -> Option<String> {
    env.redis
        .hget(env.keys().result(coupon), user)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn lease_exists(env: &TestEnv) -> bool {
    let n: u64 = env
        .redis
        .exists(env.keys().follow_lease())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    n == 1
}

/// The daemon, in-process, stopped by the returned sender.
fn start_daemon(
    config: Config,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(app::run(config, async move {
        let _ = stopped.await;
    }));
    (stop, daemon)
}

async fn stop_daemon(
    stop: tokio::sync::oneshot::Sender<()>,
    daemon: tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let _ = stop.send(());
    let result = tokio::time::timeout(Duration::from_secs(60), daemon)
        .await
        .unwrap_or_else(|_| panic!("the daemon did not return within 60 s of shutdown"))
        .unwrap_or_else(|e| panic!("{e}"));
    result.unwrap_or_else(|e| panic!("the daemon did not stop cleanly: {e:#}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn following_decides_an_entry_that_arrives_between_ticks_without_waiting_for_one() {
    let env = TestEnv::new().await;
    env.set_stock(1, "5").await;
    let (stop, daemon) = start_daemon(following(&env, 10));
    eventually(WAIT, "the daemon takes the follow lease", async || {
        lease_exists(&env).await
    })
    .await;

    env.enqueue(&[(now_ms(), "7:1".to_owned())]).await;
    eventually(WAIT, "user 7's request decided by following", async || {
        result_of(&env, 1, 7).await.as_deref() == Some("ISSUED")
    })
    .await;

    stop_daemon(stop, daemon).await;
    assert!(
        !lease_exists(&env).await,
        "the follower gives its lease up at shutdown"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn following_the_per_coupon_layout_decides_a_marked_lane_and_clears_its_mark() {
    let mut env = TestEnv::new().await;
    env.config.keys = crate::cluster::per_coupon_keys(&format!("{}:", env.name));
    // A large registry, one coupon with stock.
    let registry: Vec<i64> = (1..=2_000).collect();
    let _: u64 = env
        .redis
        .sadd(&env.keys().coupon_registry, registry)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    env.set_stock(1_234, "1").await;
    let (stop, daemon) = start_daemon(following(&env, 10));
    eventually(WAIT, "the daemon takes the follow lease", async || {
        lease_exists(&env).await
    })
    .await;

    // As the API does: ZADD into the coupon's queue, then SADD the coupon to the active set.
    enqueue_members(
        &env.redis,
        env.keys(),
        vec![(now_ms(), "8:1234".to_owned())],
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    eventually(WAIT, "user 8's request decided by following", async || {
        result_of(&env, 1_234, 8).await.as_deref() == Some("ISSUED")
    })
    .await;
    eventually(WAIT, "the drained lane's mark cleared", async || {
        let active: u64 = env
            .redis
            .scard(&env.keys().coupon_active)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        active == 0
    })
    .await;

    stop_daemon(stop, daemon).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn following_off_takes_no_lease_and_leaves_the_queue_to_the_scheduled_tick() {
    let env = TestEnv::new().await;
    env.set_stock(1, "5").await;
    let mut config = following(&env, 0);
    config.coupon.schedule = CronSchedule::parse("* * * * * *").unwrap_or_else(|e| panic!("{e}"));
    let (stop, daemon) = start_daemon(config);

    env.enqueue(&[(now_ms(), "7:1".to_owned())]).await;
    eventually(WAIT, "user 7's request decided by a tick", async || {
        result_of(&env, 1, 7).await.as_deref() == Some("ISSUED")
    })
    .await;
    assert!(
        !lease_exists(&env).await,
        "with poll_interval_ms = 0 nobody follows the queue"
    );

    stop_daemon(stop, daemon).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_while_following_a_long_queue_stops_cleanly_within_the_deadline() {
    let env = TestEnv::new().await;
    env.set_stock(1, "100000").await;
    let mut config = following(&env, 10);
    config.coupon.batch_size = std::num::NonZeroUsize::MIN.saturating_add(99);
    config.shutdown.timeout = Duration::from_secs(15);
    let (stop, daemon) = start_daemon(config);
    eventually(WAIT, "the daemon takes the follow lease", async || {
        lease_exists(&env).await
    })
    .await;
    let entries: Vec<(f64, String)> = (1..=30_000).map(|u| (u as f64, format!("{u}:1"))).collect();
    env.enqueue(&entries).await;
    eventually(WAIT, "following starts deciding the queue", async || {
        let issued: u64 = env
            .redis
            .scard(env.keys().issued(1))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        issued > 0
    })
    .await;

    // `run` returns an error if its shutdown missed the deadline.
    stop_daemon(stop, daemon).await;
    let left: u64 = env
        .redis
        .zcard(&env.keys().queue)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let issued: u64 = env
        .redis
        .scard(env.keys().issued(1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(left + issued, 30_000, "every entry decided or still queued");
    assert_eq!(
        env.count("SELECT COUNT(*) FROM user_coupon").await as u64,
        issued,
        "every coupon issued before the shutdown is in MySQL"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_holds_the_follow_lease_until_it_gives_it_up() {
    let env = TestEnv::new().await;
    let key = env.keys().follow_lease();
    let mut first = FollowLease::new(env.redis.clone(), key.clone(), Duration::from_secs(30));
    let mut second = FollowLease::new(env.redis.clone(), key, Duration::from_secs(30));
    let ok = |r: anyhow::Result<bool>| r.unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        ok(first.hold_now().await),
        "the first replica takes the lease"
    );
    assert!(!ok(second.hold_now().await), "the second waits");
    assert!(ok(first.hold_now().await), "the holder renews it");
    first.release().await;
    assert!(ok(second.hold_now().await), "released, the other takes it");
    assert!(!ok(first.hold_now().await));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oldest_waiting_age_is_the_heads_score_against_the_clock() {
    let env = TestEnv::new().await;
    env.set_stock(1, "5").await;
    env.enqueue(&[(now_ms() - 60_000.0, "7:1".to_owned())])
        .await;
    let pipeline = env.pipeline();
    let metrics = pipeline.drain.metrics().clone();
    let stop = CancellationToken::new();

    // No budget: the tick stops before its first batch and reports what it left waiting.
    let report = pipeline
        .drain
        .tick(Duration::ZERO, &stop)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!((report.decided(), report.queue_depth), (0, 1));
    let age = metrics.coupon_oldest_waiting_age.get();
    assert!((60.0..120.0).contains(&age), "oldest age {age} s");

    let report = pipeline
        .drain
        .tick(Duration::from_secs(10), &stop)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(report[Outcome::Issued], 1);
    assert_eq!(metrics.coupon_oldest_waiting_age.get(), 0.0);
    let text = metrics.encode();
    assert!(
        text.contains("commerce_worker_coupon_decision_latency_seconds_count 1"),
        "{text}"
    );
    assert!(
        text.contains("commerce_worker_coupon_decision_latency_seconds_bucket{le=\"32.768\"} 0"),
        "a request that waited a minute is not counted under 33 s: {text}"
    );
    pipeline.finish().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_with_entries_but_not_marked_active_is_drained_by_the_registry_sweep() {
    let mut env = TestEnv::new().await;
    env.config.keys = crate::cluster::per_coupon_keys(&format!("{}:", env.name));
    let keys = env.keys().clone();
    env.set_stock(5, "3").await;
    let _: u64 = env
        .redis
        .sadd(&keys.coupon_registry, vec![4, 5, 6])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let pipeline = env.pipeline();
    let drain = &pipeline.drain;
    let stop = CancellationToken::new();
    let tick = async || {
        drain
            .tick(Duration::from_secs(10), &stop)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    };
    // The first look sweeps (nothing there yet); the next sweep is an interval away.
    assert_eq!(tick().await.decided(), 0);

    // An API that forgets the active set: ZADD only.
    let _: u64 = env
        .redis
        .zadd(
            keys.for_coupon(5).queue,
            None,
            None,
            false,
            false,
            (1.0, "9:5"),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let between_sweeps = tick().await;
    assert_eq!(
        between_sweeps.decided(),
        0,
        "between sweeps only marked lanes are looked at"
    );
    drain.sweep_at_next_look();
    let swept = tick().await;
    assert_eq!((swept[Outcome::Issued], swept.lanes), (1, 1), "{swept:?}");
    assert_eq!(result_of(&env, 5, 9).await.as_deref(), Some("ISSUED"));
    pipeline.finish().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_registered_coupons_with_a_handful_active_drain_correctly_under_two_followers()
{
    let mut env = TestEnv::new().await;
    env.config.keys = crate::cluster::per_coupon_keys(&format!("{}:", env.name));
    let registry: Vec<i64> = (1..=5_000).collect();
    let _: u64 = env
        .redis
        .sadd(&env.keys().coupon_registry, registry)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let coupons = [11, 2_222, 4_999];
    // Two replicas following the queues (the lease lets one at a time; both are correct).
    let stop = CancellationToken::new();
    let first = env.pipeline();
    let second = env.pipeline();
    let options = commerce_worker::coupon::FollowOptions {
        poll_interval: Duration::from_millis(5),
        budget: Duration::from_secs(4),
        lease: Duration::from_millis(300),
    };
    let followers: Vec<_> = [&first, &second]
        .into_iter()
        .map(|p| {
            tokio::spawn(commerce_worker::coupon::follow(
                p.drain.clone(),
                options,
                std::sync::Arc::default(),
                stop.clone(),
            ))
        })
        .collect();
    crate::invariants::flash_sale(&env, &coupons, 30, 50).await;
    eventually(
        WAIT,
        "every queue drained and outbox persisted",
        async || {
            let mut waiting = 0u64;
            for &c in &coupons {
                let lane = env.keys().for_coupon(c);
                let q: u64 = env.redis.zcard(&lane.queue).await.unwrap_or(1);
                waiting += q;
            }
            waiting == 0
        },
    )
    .await;
    stop.cancel();
    for follower in followers {
        follower.await.unwrap_or_else(|e| panic!("{e}"));
    }
    // The persister finishes what following issued.
    let _ = first.drain.persist_all().await;
    let _ = second.drain.persist_all().await;
    crate::invariants::assert_invariants(&env, &coupons, 30, 50).await;
    first.finish().await;
    second.finish().await;
    env.cleanup().await;
}
