//! Following the queue between ticks (`[coupon] poll_interval_ms`) and finding the per-coupon
//! lanes with work (the active set and the registry sweep), against real Redis and MariaDB.
//!
//! The daemon tests run `app::run` in-process with a yearly schedule, so a decision can only come
//! from following; they wait for conditions, never for a tick.

use std::time::Duration;

use commerce_worker::app;
use commerce_worker::config::{Config, CronSchedule};
use commerce_worker::coupon::{
    DEFAULT_LEASE, DrainReport, FollowLease, FollowOptions, Following, Outcome, StopReason,
};
use commerce_worker::tools::simulated_api::enqueue_members;
use fred::prelude::*;
use tokio_util::sync::CancellationToken;

use crate::common::{PrivateRedis, TestEnv, eventually, mysql_server_url};

const WAIT: Duration = Duration::from_secs(20);

/// Fires once a year: in these tests no scheduled tick ever runs.
fn yearly() -> CronSchedule {
    CronSchedule::parse("0 0 0 1 1 *").unwrap()
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
        .unwrap()
}

async fn lease_exists(env: &TestEnv) -> bool {
    let n: u64 = env.redis.exists(env.keys().follow_lease()).await.unwrap();
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
        .unwrap();
    result.expect("the daemon did not stop cleanly");
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
    env.use_per_coupon_layout();
    // A large registry, one coupon with stock.
    env.register(1..=2_000).await;
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
    .unwrap();
    eventually(WAIT, "user 8's request decided by following", async || {
        result_of(&env, 1_234, 8).await.as_deref() == Some("ISSUED")
    })
    .await;
    eventually(WAIT, "the drained lane's mark cleared", async || {
        let active: u64 = env.redis.scard(&env.keys().coupon_active).await.unwrap();
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
    config.coupon.schedule = CronSchedule::parse("* * * * * *").unwrap();
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
        let issued: u64 = env.redis.scard(env.keys().issued(1)).await.unwrap();
        issued > 0
    })
    .await;

    // `run` returns an error if its shutdown missed the deadline.
    stop_daemon(stop, daemon).await;
    let left: u64 = env.redis.zcard(&env.keys().queue).await.unwrap();
    let issued: u64 = env.redis.scard(env.keys().issued(1)).await.unwrap();
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
    let mut first = FollowLease::new(
        env.redis.clone(),
        key.clone(),
        Duration::from_secs(30),
        "follows",
    );
    let mut second = FollowLease::new(env.redis.clone(), key, Duration::from_secs(30), "follows");
    let ok = |r: anyhow::Result<bool>| r.unwrap();
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
    let report = pipeline.drain.tick(Duration::ZERO, &stop).await.unwrap();
    assert_eq!((report.decided(), report.queue_depth), (0, 1));
    let age = metrics.coupon_oldest_waiting_age.get();
    assert!((60.0..120.0).contains(&age), "oldest age {age} s");

    let report = pipeline
        .drain
        .tick(Duration::from_secs(10), &stop)
        .await
        .unwrap();
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

/// Per coupon: what an API that forgets the "has work" mark writes — the queue's ZADD only.
async fn enqueue_without_the_active_mark(env: &TestEnv, coupon: i64, member: &str) {
    let _: u64 = env
        .redis
        .zadd(
            env.keys().for_coupon(coupon).queue,
            None,
            None,
            false,
            false,
            (1.0, member),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_with_entries_but_not_marked_active_is_drained_by_the_registry_sweep() {
    let mut env = TestEnv::new().await;
    env.use_per_coupon_layout();
    env.set_stock(5, "3").await;
    env.register([4, 5, 6]).await;
    let pipeline = env.pipeline();
    let drain = &pipeline.drain;
    let stop = CancellationToken::new();
    let tick = async || drain.tick(Duration::from_secs(10), &stop).await.unwrap();
    // The first look sweeps (nothing there yet); the next sweep is an interval away.
    assert_eq!(tick().await.decided(), 0);

    // An API that forgets the active set: ZADD only.
    enqueue_without_the_active_mark(&env, 5, "9:5").await;
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
async fn an_active_set_of_the_wrong_type_stops_no_lane_the_registry_sweep_still_finds_them() {
    let mut env = TestEnv::new().await;
    env.use_per_coupon_layout();
    let keys = env.keys().clone();
    env.set_stock(5, "3").await;
    env.register([4, 5, 6]).await;
    // A damaged "has work" set: every look at the lanes used to fail on it.
    env.put_wrong_type(&keys.coupon_active).await;
    enqueue_without_the_active_mark(&env, 5, "9:5").await;
    let pipeline = env.pipeline();
    let drain = &pipeline.drain;
    let stop = CancellationToken::new();
    drain.sweep_at_next_look();
    let swept = drain
        .tick(Duration::from_secs(10), &stop)
        .await
        .expect("a damaged active set does not fail the look at the lanes");
    assert_eq!((swept[Outcome::Issued], swept.lanes), (1, 1), "{swept:?}");
    assert_eq!(result_of(&env, 5, 9).await.as_deref(), Some("ISSUED"));
    let between_sweeps = drain
        .tick(Duration::from_secs(10), &stop)
        .await
        .expect("nor the looks between sweeps");
    assert_eq!(between_sweeps.decided(), 0);
    pipeline.finish().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_registered_coupons_with_a_handful_active_drain_correctly_under_two_followers()
{
    let mut env = TestEnv::new().await;
    env.use_per_coupon_layout();
    env.register(1..=5_000).await;
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
        tokio::time::timeout(WAIT, follower)
            .await
            .unwrap_or_else(|_| panic!("a follower did not stop within {WAIT:?} of its stop"))
            .unwrap();
    }
    // The persister finishes what following issued (an error here is a failure, not noise).
    first.drain.persist_all().await.unwrap();
    second.drain.persist_all().await.unwrap();
    crate::invariants::assert_invariants(&env, &coupons, 30, 50).await;
    first.finish().await;
    second.finish().await;
    env.cleanup().await;
}

/// Redis commands run by the server since `CONFIG RESETSTAT` (INFO commandstats, which also
/// counts the commands scripts run), with the breakdown; the test's own `CONFIG RESETSTAT` is
/// left out (INFO does not count itself).
fn commands_since_reset(redis: &PrivateRedis) -> (u64, u64, String) {
    let stats = redis.cli(&["INFO", "commandstats"]);
    let mut total = 0;
    let mut reader = 0;
    let mut breakdown = Vec::new();
    for line in stats.lines() {
        let Some((name, rest)) = line.trim().split_once(':') else {
            continue;
        };
        let Some(name) = name.strip_prefix("cmdstat_") else {
            continue;
        };
        let calls: u64 = rest
            .split(',')
            .find_map(|field| field.strip_prefix("calls="))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        if name.starts_with("config") {
            continue;
        }
        total += calls;
        if ["xreadgroup", "xautoclaim", "xrange"].contains(&name) {
            reader += calls;
        }
        breakdown.push(format!("{name} {calls}"));
    }
    breakdown.sort();
    (total, reader, breakdown.join(", "))
}

/// How long the idle tests count commands.
const IDLE_WINDOW: Duration = Duration::from_secs(10);

/// Runs the daemon (following at the default interval) on a Redis of its own, waits until it
/// has settled (following, ranking built, Redis reconciled, a drain run recorded), then counts
/// every command Redis runs over [`IDLE_WINDOW`] with the queue(s) empty. Returns commands/s,
/// and those of the ranking-log reader's stream reads.
async fn idle_commands_per_second(env: &TestEnv, redis: &PrivateRedis) -> (f64, f64) {
    let mut config = env.config.clone();
    config.coupon.poll_interval = Duration::from_millis(30);
    let (stop, daemon) = start_daemon(config);
    let keys = env.keys().clone();
    eventually(
        WAIT,
        "the daemon settles: follows, ranking built, a drain run recorded",
        async || {
            let runs: Vec<Option<String>> = env
                .redis
                .hmget(
                    keys.job_runs(),
                    vec!["coupon_drain:ok", "ranking_rebuild:ok"],
                )
                .await
                .unwrap();
            lease_exists(env).await && runs.iter().all(Option::is_some)
        },
    )
    .await;
    if keys.per_coupon() {
        // The sweeping replica reconciles every registered lane ahead of its first request, once
        // per Redis: settled means done.
        eventually(WAIT, "every registered lane reconciled ahead", async || {
            let registered = commerce_worker::coupon::registered_coupons(&env.redis, &keys)
                .await
                .unwrap();
            for coupon in registered {
                let marker: Option<String> = env
                    .redis
                    .get(keys.for_coupon(coupon).reconciled_marker())
                    .await
                    .unwrap();
                if marker.is_none() {
                    return false;
                }
            }
            true
        })
        .await;
    }
    redis.cli(&["CONFIG", "RESETSTAT"]);
    // The measured window: a count over a fixed span, not a wait for a condition.
    tokio::time::sleep(IDLE_WINDOW).await;
    let (commands, reader, breakdown) = commands_since_reset(redis);
    let window = IDLE_WINDOW.as_secs_f64();
    let per_second = commands as f64 / window;
    eprintln!("idle: {commands} commands in {IDLE_WINDOW:?} = {per_second:.1}/s ({breakdown})");
    stop_daemon(stop, daemon).await;
    (per_second, reader as f64 / window)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_queue_costs_at_most_fifty_redis_commands_a_second_while_following() {
    let redis = PrivateRedis::start();
    let env = TestEnv::with_servers(&redis.url(), &mysql_server_url()).await;
    let (per_second, _) = idle_commands_per_second(&env, &redis).await;
    assert!(
        per_second <= 50.0,
        "{per_second:.1} Redis commands/s with an empty queue (README: at most 50)"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_per_coupon_queues_cost_at_most_fifty_redis_commands_a_second_with_a_small_registry() {
    let redis = PrivateRedis::start();
    let mut env = TestEnv::with_servers(&redis.url(), &mysql_server_url()).await;
    env.config.keys = crate::cluster::per_coupon_keys(&format!("{}:", env.name));
    // Ten coupons, as a shop between sales; the registry sweep looks at each every 10 s.
    let registry: Vec<i64> = (1..=10).collect();
    let _: u64 = env
        .redis
        .sadd(&env.keys().coupon_registry, registry)
        .await
        .unwrap();
    let (per_second, reader) = idle_commands_per_second(&env, &redis).await;
    assert!(
        per_second <= 50.0,
        "{per_second:.1} Redis commands/s with every queue empty, {reader:.1}/s of them the \
         ranking-log reader's stream reads (README: at most 50)"
    );
    env.cleanup().await;
}

/// Two replicas' drains on one Redis, each with its follower, as `app::run` wires them: the
/// scheduled tick goes through [`Following::tick`] under the same gate as the follower.
struct Replica {
    pipeline: crate::common::Pipeline,
    following: Following,
    gate: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl Replica {
    /// A replica with a Redis connection of its own.
    async fn new(env: &TestEnv, options: FollowOptions) -> Self {
        let redis = env.redis.clone_new();
        redis.init().await.unwrap();
        let pipeline = env.pipeline_on(redis);
        let following = Following::new(&pipeline.drain, options);
        Self {
            pipeline,
            following,
            gate: std::sync::Arc::default(),
        }
    }

    fn spawn_follower(&self, stop: &CancellationToken) -> tokio::task::JoinHandle<()> {
        let (following, drain, gate, stop) = (
            self.following.clone(),
            self.pipeline.drain.clone(),
            self.gate.clone(),
            stop.clone(),
        );
        tokio::spawn(async move { following.follow(drain, gate, stop).await })
    }

    /// One scheduled tick, as the daemon runs it: `None` when it gave way to a follower.
    async fn tick(&self, stop: &CancellationToken) -> Option<DrainReport> {
        let _running = self.gate.lock().await;
        self.following
            .tick(&self.pipeline.drain, Duration::from_secs(4), stop)
            .await
            .unwrap()
    }

    fn taken_by_others(&self) -> u64 {
        self.pipeline.drain.metrics().coupon_taken_by_others.get()
    }
}

fn follow_options(lease: Duration) -> FollowOptions {
    FollowOptions {
        poll_interval: Duration::from_millis(10),
        budget: Duration::from_secs(4),
        lease,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_tick_gives_way_while_any_replica_follows_and_runs_when_none_does() {
    let env = TestEnv::new().await;
    env.set_stock(1, "10").await;
    let replica = Replica::new(&env, follow_options(Duration::from_secs(30))).await;
    let stop = CancellationToken::new();
    env.enqueue(&[(now_ms(), "7:1".to_owned())]).await;
    // Another replica follows: this replica's tick leaves the queue to it.
    let mut other = FollowLease::new(
        env.redis.clone(),
        env.keys().follow_lease(),
        Duration::from_secs(30),
        "follows",
    );
    assert!(other.hold_now().await.unwrap());
    assert_eq!(
        replica.tick(&stop).await,
        None,
        "a follower drains: no tick"
    );
    assert_eq!(result_of(&env, 1, 7).await, None);

    // Nobody follows: the tick is the floor.
    other.release().await;
    let report = replica
        .tick(&stop)
        .await
        .expect("nobody follows: the tick runs");
    assert_eq!(report[Outcome::Issued], 1, "{report:?}");
    assert_eq!(result_of(&env, 1, 7).await.as_deref(), Some("ISSUED"));

    // This replica's own follower drains: its tick gives way without asking Redis.
    let follower = replica.spawn_follower(&stop);
    eventually(WAIT, "the follower takes the lease", async || {
        lease_exists(&env).await
    })
    .await;
    assert_eq!(replica.tick(&stop).await, None);
    stop.cancel();
    follower.await.unwrap();
    replica.pipeline.finish().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_that_started_while_nobody_followed_hands_over_when_a_follower_appears() {
    let env = TestEnv::new().await;
    env.set_stock(1, "100000").await;
    let mut config = env.config.clone();
    config.coupon.batch_size = std::num::NonZeroUsize::MIN.saturating_add(9);
    let backends = commerce_worker::app::Backends {
        redis: env.redis.clone(),
        mysql: env.mysql.clone(),
    };
    let job = commerce_worker::app::CouponJob::start(
        &config,
        &backends,
        &commerce_worker::metrics::Metrics::new(),
    );
    let following = Following::new(&job.drain, follow_options(Duration::from_millis(300)));
    let entries: Vec<(f64, String)> = (1..=20_000).map(|u| (u as f64, format!("{u}:1"))).collect();
    env.enqueue(&entries).await;
    let stop = CancellationToken::new();
    let tick = following.tick(&job.drain, Duration::from_secs(600), &stop);
    let takeover = async {
        eventually(WAIT, "the tick starts deciding", async || {
            let issued: u64 = env.redis.scard(env.keys().issued(1)).await.unwrap();
            issued > 0
        })
        .await;
        let mut other = FollowLease::new(
            env.redis.clone(),
            env.keys().follow_lease(),
            Duration::from_secs(30),
            "follows",
        );
        assert!(
            other.hold_now().await.unwrap(),
            "another replica starts following"
        );
    };
    let (report, ()) = tokio::join!(tick, takeover);
    let report = report
        .unwrap()
        .expect("nobody followed when the tick started");
    assert_eq!(report.stopped, StopReason::HandedOver, "{report:?}");
    let left: u64 = env.redis.zcard(&env.keys().queue).await.unwrap();
    assert!(left > 0, "the tick stopped before the queue was empty");
    assert_eq!(report.decided() + left, 20_000);
    job.finish_writing(Duration::from_secs(120)).await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_following_and_ticking_on_a_backlog_never_read_the_same_entries() {
    let env = TestEnv::new().await;
    env.set_stock(1, "1000000").await;
    let total = 60_000u64;
    let entries: Vec<(f64, String)> = (1..=total).map(|u| (u as f64, format!("{u}:1"))).collect();
    env.enqueue(&entries).await;
    // The default lease: a step never outlives a third of it, so the follower renews in time
    // however long the backlog takes.
    let replicas = [
        Replica::new(&env, follow_options(DEFAULT_LEASE)).await,
        Replica::new(&env, follow_options(DEFAULT_LEASE)).await,
    ];
    let stop = CancellationToken::new();
    let followers: Vec<_> = replicas.iter().map(|r| r.spawn_follower(&stop)).collect();
    eventually(WAIT, "a follower takes the lease", async || {
        lease_exists(&env).await
    })
    .await;
    // Both replicas' scheduled ticks keep firing meanwhile (every 100 ms here, every 5 s in
    // production): each gives way to the follower.
    let mut ticks_given_way = 0;
    let drained = async {
        loop {
            let left: u64 = env.redis.zcard(&env.keys().queue).await.unwrap();
            if left == 0 {
                break;
            }
            for replica in &replicas {
                if replica.tick(&stop).await.is_none() {
                    ticks_given_way += 1;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(300), drained)
        .await
        .expect("the backlog drained within 300 s");
    stop.cancel();
    for follower in followers {
        follower.await.unwrap();
    }
    let issued: u64 = env.redis.scard(env.keys().issued(1)).await.unwrap();
    assert_eq!(issued, total);
    assert!(ticks_given_way > 0);
    let taken: Vec<u64> = replicas.iter().map(Replica::taken_by_others).collect();
    assert_eq!(
        taken,
        [0, 0],
        "no entry was read by two drainers (entries taken by others, per replica)"
    );
    for replica in replicas {
        replica.pipeline.finish().await;
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coupon_lane_whose_queue_has_the_wrong_type_is_left_alone_and_the_others_keep_following()
{
    let mut env = TestEnv::new().await;
    env.config.keys = crate::cluster::per_coupon_keys(&format!("{}:", env.name));
    let keys = env.keys().clone();
    for coupon in [1, 2, 3] {
        env.set_stock(coupon, "100").await;
    }
    let _: u64 = env
        .redis
        .sadd(&keys.coupon_registry, vec![1, 2, 3])
        .await
        .unwrap();
    // Coupon 2's queue is a string: an operator's mistake, or another program's key.
    env.put_wrong_type(keys.for_coupon(2).queue).await;
    let _: u64 = env.redis.sadd(&keys.coupon_active, 2).await.unwrap();
    for (coupon, user) in [(1, 11), (3, 33)] {
        enqueue_members(
            &env.redis,
            &keys,
            vec![(now_ms(), format!("{user}:{coupon}"))],
        )
        .await
        .unwrap();
    }
    let pipeline = env.pipeline();
    let drain = &pipeline.drain;
    let stop = CancellationToken::new();

    let first = drain.step(Duration::from_secs(10), &stop).await.unwrap();
    assert_eq!(
        first[Outcome::Issued],
        2,
        "the other lanes decided: {first:?}"
    );
    assert_eq!(first.failing_lanes, 1);
    let error = first.lane_error.clone().unwrap_or_default();
    assert!(
        error.contains("coupon 2") && error.contains("WRONGTYPE"),
        "{error}"
    );
    assert_eq!(drain.metrics().coupon_lane_failures.get(), 1);
    assert_eq!(drain.metrics().coupon_lanes_failing.get(), 1);

    // Right after, the broken lane is left alone (no second failure) while a new request of
    // another coupon is decided at once.
    enqueue_members(&env.redis, &keys, vec![(now_ms(), "34:3".to_owned())])
        .await
        .unwrap();
    let second = drain.step(Duration::from_secs(10), &stop).await.unwrap();
    assert_eq!(second[Outcome::Issued], 1, "{second:?}");
    assert_eq!(
        (second.failing_lanes, second.lane_error.as_deref()),
        (1, None)
    );
    assert_eq!(drain.metrics().coupon_lane_failures.get(), 1);

    // Repaired, the lane works again at its next try.
    let _: u64 = env.redis.del(keys.for_coupon(2).queue).await.unwrap();
    enqueue_members(&env.redis, &keys, vec![(now_ms(), "22:2".to_owned())])
        .await
        .unwrap();
    eventually(
        WAIT,
        "the repaired lane decided at its next try",
        async || {
            let report = drain.step(Duration::from_secs(10), &stop).await.unwrap();
            report.failing_lanes == 0 && result_of(&env, 2, 22).await.as_deref() == Some("ISSUED")
        },
    )
    .await;
    assert_eq!(drain.metrics().coupon_lanes_failing.get(), 0);
    pipeline.finish().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_keeps_deciding_other_coupons_while_one_lane_is_broken() {
    let mut env = TestEnv::new().await;
    env.config.keys = crate::cluster::per_coupon_keys(&format!("{}:", env.name));
    let keys = env.keys().clone();
    env.set_stock(3, "100").await;
    let _: u64 = env
        .redis
        .sadd(&keys.coupon_registry, vec![2, 3])
        .await
        .unwrap();
    env.put_wrong_type(keys.for_coupon(2).queue).await;
    let _: u64 = env.redis.sadd(&keys.coupon_active, 2).await.unwrap();
    let replica = Replica::new(&env, follow_options(Duration::from_secs(2))).await;
    let stop = CancellationToken::new();
    let follower = replica.spawn_follower(&stop);
    eventually(WAIT, "the broken lane is seen failing", async || {
        replica.pipeline.drain.metrics().coupon_lane_failures.get() > 0
    })
    .await;
    for user in 1..=5 {
        enqueue_members(&env.redis, &keys, vec![(now_ms(), format!("{user}:3"))])
            .await
            .unwrap();
        eventually(
            WAIT,
            "a request of another coupon decided by following",
            async || result_of(&env, 3, user).await.as_deref() == Some("ISSUED"),
        )
        .await;
    }
    assert!(lease_exists(&env).await, "the follower kept its lease");
    stop.cancel();
    follower.await.unwrap();
    replica.pipeline.finish().await;
    env.cleanup().await;
}

/// Issue 19: with 20 000 registered coupons (every queue empty) the daemon follows, decides a
/// lone request in one of them, and stops cleanly within its shutdown deadline although walks
/// of the registry (the drain's sweep, the log reader's) may be under way: every walk checks for
/// shutdown between two chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_registered_coupons_a_lone_request_is_decided_and_shutdown_is_clean() {
    let mut env = TestEnv::new().await;
    env.use_per_coupon_layout();
    for first in (1..=20_000).step_by(5_000) {
        env.register(first..first + 5_000).await;
    }
    env.set_stock(17_777, "1").await;
    let mut config = following(&env, 10);
    config.shutdown.timeout = Duration::from_secs(5);
    let (stop, daemon) = start_daemon(config);
    eventually(WAIT, "the daemon takes the follow lease", async || {
        lease_exists(&env).await
    })
    .await;
    enqueue_members(&env.redis, env.keys(), vec![(now_ms(), "3:17777".into())])
        .await
        .unwrap();
    eventually(WAIT, "the lone request is decided", async || {
        result_of(&env, 17_777, 3).await.as_deref() == Some("ISSUED")
    })
    .await;
    eventually(WAIT, "its ranking-log row reaches MySQL", async || {
        env.count("SELECT COUNT(*) FROM ranking_logs").await == 1
    })
    .await;
    // `run` returns an error if its shutdown missed the deadline.
    stop_daemon(stop, daemon).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coupon_whose_outbox_has_the_wrong_type_does_not_keep_the_others_out_of_mysql() {
    let mut env = TestEnv::new().await;
    env.use_per_coupon_layout();
    let keys = env.keys().clone();
    env.set_stock(1, "10").await;
    env.register([1, 2]).await;
    // Coupon 2's outbox is a string: the sweep finds its key (SCAN) and hands it to the
    // persister with coupon 1's.
    env.put_wrong_type(keys.for_coupon(2).outbox).await;
    enqueue_members(&env.redis, &keys, vec![(now_ms(), "5:1".to_owned())])
        .await
        .unwrap();
    let pipeline = env.pipeline();
    let drain = &pipeline.drain;
    let stop = CancellationToken::new();
    let report = drain.step(Duration::from_secs(10), &stop).await.unwrap();
    assert_eq!(report[Outcome::Issued], 1, "{report:?}");
    // A pass that looks at every outbox (the background persister may be at it too).
    drain.sweep_at_next_look();
    drain
        .persist_all()
        .await
        .expect("one coupon's broken outbox does not fail the pass");
    assert!(drain.metrics().coupon_lane_failures.get() >= 1);
    eventually(
        WAIT,
        "coupon 1's issued coupon in MySQL and out of its outbox",
        async || {
            let waiting: u64 = env.redis.zcard(keys.for_coupon(1).outbox).await.unwrap();
            waiting == 0
                && env
                    .count("SELECT COUNT(*) FROM user_coupon WHERE coupon_id = 1")
                    .await
                    == 1
        },
    )
    .await;
    // The gauges are read for every other outbox.
    drain.sweep_at_next_look();
    assert_eq!(drain.observe_depths().await.unwrap(), 0);
    pipeline.finish().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_drains_the_other_coupons_and_exits_1_naming_a_lane_whose_queue_has_the_wrong_type() {
    let mut env = TestEnv::new().await;
    env.use_per_coupon_layout();
    let keys = env.keys().clone();
    env.set_stock(1, "10").await;
    env.register([1, 2]).await;
    env.put_wrong_type(keys.for_coupon(2).queue).await;
    enqueue_members(&env.redis, &keys, vec![(now_ms(), "5:1".to_owned())])
        .await
        .unwrap();
    let mut command = crate::common::drain_command(&env.config_file());
    command.stdout(std::process::Stdio::piped());
    command.stderr(std::process::Stdio::piped());
    let output = crate::common::output_within(&mut command, Duration::from_secs(120), "drain");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.contains("coupon lane(s) failing") && text.contains("coupon 2"),
        "{text}"
    );
    assert_eq!(result_of(&env, 1, 5).await.as_deref(), Some("ISSUED"));
    assert_eq!(
        env.count("SELECT COUNT(*) FROM user_coupon WHERE coupon_id = 1")
            .await,
        1
    );
    env.cleanup().await;
}
