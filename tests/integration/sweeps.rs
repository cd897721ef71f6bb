//! The periodic walks of the whole coupon registry (per-coupon layout) under several replicas:
//! one replica at a time runs them (the sweep lease), a lane the API did not mark as having work
//! is still drained whoever sweeps (also after the sweeper is SIGKILLed or SIGSTOPped), lanes are
//! reconciled ahead of their first request (also after Redis lost data), and waiting for the
//! ranking log does not walk every lane at each look. Real Redis and MariaDB; the tests wait for
//! conditions, never for a clock.

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use commerce_worker::app;
use commerce_worker::config::{Config, CronSchedule};
use commerce_worker::coupon::Outcome;
use commerce_worker::tools::simulated_api::enqueue_members;
use fred::prelude::*;
use tokio_util::sync::CancellationToken;

use crate::common::{Daemon, PrivateRedis, TestEnv, eventually, http_get, mysql_server_url};

const WAIT: Duration = Duration::from_secs(60);

fn now_ms() -> f64 {
    chrono::Utc::now().timestamp_millis() as f64
}

/// Fires once a year: no scheduled tick runs in these tests, only following.
fn yearly() -> CronSchedule {
    CronSchedule::parse("0 0 0 1 1 *").unwrap()
}

/// An env in the per-coupon layout on `redis`, sweeping every second.
async fn per_coupon_env(redis: &str) -> TestEnv {
    let mut env = TestEnv::with_servers(redis, &mysql_server_url()).await;
    env.use_per_coupon_layout();
    env.config.coupon.sweep_interval = Duration::from_secs(1);
    env
}

/// What an API that forgets the "has work" mark writes: the queue's ZADD only.
async fn enqueue_unmarked(env: &TestEnv, coupon: i64, user: i64) {
    let _: u64 = env
        .redis
        .zadd(
            env.keys().for_coupon(coupon).queue,
            None,
            None,
            false,
            false,
            (now_ms(), format!("{user}:{coupon}")),
        )
        .await
        .unwrap();
}

async fn result_of(env: &TestEnv, coupon: i64, user: i64) -> Option<String> {
    env.redis
        .hget(env.keys().result(coupon), user)
        .await
        .unwrap()
}

/// `redis-cli MONITOR` on a private Redis: every command any client runs, as lines
/// `<time> [<db> <client address>] "<COMMAND>" "<arg>" …`, collected until dropped.
struct Monitor {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Monitor {
    fn start(redis: &PrivateRedis) -> Self {
        let mut child = Command::new("redis-cli")
            .args(["-p", &redis.port.to_string(), "monitor"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        Self { child, lines }
    }

    /// Per client address, how many times it ran `command` on one of `keys` (commands scripts
    /// run show as `lua` and are left out).
    fn calls_by_client(&self, command: &str, keys: &BTreeSet<String>) -> BTreeMap<String, usize> {
        let mut calls = BTreeMap::new();
        for line in self.lines.lock().unwrap().iter() {
            let Some((client, rest)) = line
                .split_once('[')
                .and_then(|(_, rest)| rest.split_once(']'))
            else {
                continue;
            };
            let Some(client) = client.split_whitespace().nth(1) else {
                continue;
            };
            let mut words = rest.split("\" \"").map(|w| w.trim().trim_matches('"'));
            let (Some(name), Some(key)) = (words.next(), words.next()) else {
                continue;
            };
            if client != "lua" && name.eq_ignore_ascii_case(command) && keys.contains(key) {
                *calls.entry(client.to_owned()).or_default() += 1;
            }
        }
        calls
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The daemon, in-process (a replica with its own Redis connection), stopped by the sender.
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

/// Issue 19: the registry's walks cost Redis once per period, not once per replica. Three
/// replicas run over 300 registered coupons with a sweep every second; Redis' MONITOR shows who
/// walks: the drain's queue sweep (a ZCARD per unmarked queue) and the log reader's stream sweep
/// (an XLEN per log stream, every 30 s) come from one replica only — the others walk at most once,
/// at their start. A lane that then gets an entry without its "has work" mark is drained (the
/// sweeper marks it, whichever replica follows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_three_replicas_one_walks_the_registry_and_an_unmarked_lane_is_still_drained() {
    let redis = PrivateRedis::start();
    let env = per_coupon_env(&redis.url()).await;
    let registry: Vec<i64> = (1..=300).collect();
    env.register(registry.iter().copied()).await;
    env.set_stock(150, "1").await;
    let mut config = env.config.clone();
    config.coupon.schedule = yearly();
    config.coupon.poll_interval = Duration::from_millis(30);
    let keys = env.keys().clone();
    let queues: BTreeSet<String> = registry.iter().map(|&id| keys.queue_of(id)).collect();
    let logs: BTreeSet<String> = registry.iter().map(|&id| keys.log_of(id)).collect();
    let daemons: Vec<_> = (0..3).map(|_| start_daemon(config.clone())).collect();
    eventually(WAIT, "a replica takes the sweep lease", async || {
        env.redis
            .exists::<u64, _>(keys.sweep_lease())
            .await
            .unwrap()
            == 1
    })
    .await;
    let monitor = Monitor::start(&redis);
    // Two walks of the log streams by one replica take the log reader's 30 s period; the queue
    // sweep has run ~30 times by then.
    let walk = registry.len();
    eventually(
        Duration::from_secs(120),
        "a replica walks the log streams twice",
        async || {
            monitor
                .calls_by_client("XLEN", &logs)
                .values()
                .any(|&n| n >= 2 * walk)
        },
    )
    .await;
    let zcards = monitor.calls_by_client("ZCARD", &queues);
    let xlens = monitor.calls_by_client("XLEN", &logs);
    drop(monitor);
    let sweepers = |calls: &BTreeMap<String, usize>| -> Vec<String> {
        calls
            .iter()
            .filter(|&(_, &n)| n > walk)
            .map(|(client, _)| client.clone())
            .collect()
    };
    assert_eq!(
        sweepers(&zcards).len(),
        1,
        "one replica sweeps the queues repeatedly, the others at most once: {zcards:?}"
    );
    assert_eq!(
        sweepers(&xlens),
        sweepers(&zcards),
        "the same replica walks the log streams: {xlens:?}"
    );
    assert!(
        zcards[&sweepers(&zcards)[0]] >= 5 * walk,
        "the sweeper swept every second: {zcards:?}"
    );

    enqueue_unmarked(&env, 150, 9).await;
    eventually(WAIT, "the unmarked lane's request is decided", async || {
        result_of(&env, 150, 9).await.as_deref() == Some("ISSUED")
    })
    .await;
    for (stop, daemon) in daemons {
        let _ = stop.send(());
        tokio::time::timeout(WAIT, daemon)
            .await
            .expect("the daemon stops within 60 s")
            .unwrap()
            .expect("the daemon stops cleanly");
    }
    env.cleanup().await;
}

/// Whether the daemon listening on `port` reports holding the sweep lease.
fn sweeps(port: u16) -> bool {
    let (_, body) = http_get(port, "/metrics", "text/plain");
    body.lines()
        .any(|line| line.trim() == "commerce_worker_coupon_sweeper 1")
}

fn signal(child: &Child, signal: &str) {
    let sent = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// Which of `daemons` sweeps, once exactly one does.
async fn the_sweeper(daemons: &[&Daemon]) -> usize {
    let mut holder = None;
    eventually(
        WAIT,
        "exactly one replica holds the sweep lease",
        async || {
            let holding: Vec<usize> = (0..daemons.len())
                .filter(|&i| sweeps(daemons[i].port))
                .collect();
            holder = holding.first().copied();
            holding.len() == 1
        },
    )
    .await;
    holder.unwrap()
}

/// The sweep lease of a dead or stopped replica lapses, and another replica sweeps: two daemon
/// processes; the one sweeping is SIGKILLed, and a lane that gets an entry without its mark is
/// drained by the survivor's sweep; then, with a new second replica, the sweeper is SIGSTOPped
/// and the same holds; after SIGCONT the stopped one finds the lease taken and does not sweep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_or_sigstopped_sweeper_is_replaced_and_unmarked_lanes_are_still_drained() {
    let env = per_coupon_env(&crate::common::redis_url()).await;
    env.register(1..=200).await;
    for coupon in [21, 42] {
        env.set_stock(coupon, "1").await;
    }
    let config = env.config_file_with("[coupon]\nsweep_interval_secs = 1\npoll_interval_ms = 10\n");
    let first = Daemon::start(&config, &[]);
    let second = Daemon::start(&config, &[]);
    let killed = the_sweeper(&[&first, &second]).await;
    let (mut dead, mut survivor) = if killed == 0 {
        (first, second)
    } else {
        (second, first)
    };
    signal(&dead.child, "-KILL");
    let _ = dead.child.wait();
    // The dead replica's lease lapses and the survivor takes it. Only then does the entry come,
    // so that the survivor's first look at the lanes (when it took over following) cannot be
    // what finds it: its periodic sweep must.
    eventually(WAIT, "the survivor takes the sweep lease", async || {
        sweeps(survivor.port)
    })
    .await;
    enqueue_unmarked(&env, 21, 7).await;
    eventually(
        WAIT,
        "the survivor sweeps and the unmarked request is decided",
        async || result_of(&env, 21, 7).await.as_deref() == Some("ISSUED"),
    )
    .await;

    let mut third = Daemon::start(&config, &[]);
    // The survivor sweeps; it is stopped (SIGSTOP) in the middle of whatever it does.
    assert_eq!(the_sweeper(&[&survivor, &third]).await, 0);
    signal(&survivor.child, "-STOP");
    eventually(
        WAIT,
        "the other replica takes the sweep lease",
        async || sweeps(third.port),
    )
    .await;
    enqueue_unmarked(&env, 42, 8).await;
    eventually(
        WAIT,
        "the other replica sweeps and the unmarked request is decided",
        async || result_of(&env, 42, 8).await.as_deref() == Some("ISSUED"),
    )
    .await;
    signal(&survivor.child, "-CONT");
    // Woken, the stopped replica finds its lease taken over: one sweeper again.
    assert_eq!(the_sweeper(&[&survivor, &third]).await, 1);
    assert_eq!(survivor.stop().await.code(), Some(0));
    assert_eq!(third.stop().await.code(), Some(0));
    env.cleanup().await;
}

/// `commerce_worker_coupon_reconciliations_total` of a drain's metrics.
fn reconciliations(pipeline: &crate::common::Pipeline) -> u64 {
    let text = pipeline.drain.metrics().encode();
    text.lines()
        .find_map(|line| line.strip_prefix("commerce_worker_coupon_reconciliations_total "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no reconciliations counter in:\n{text}"))
}

/// Issue 19: a lone request in a lane never used before is decided without reconciling the lane
/// on its way (the sweeper reconciled every registered lane ahead of time), and reconciling
/// ahead keeps what reconciliation is for: after Redis rolled back to a snapshot taken before a
/// coupon was issued, the sweeper notices the new Redis and puts the holder MySQL knows back
/// before any request comes, so the user asking again gets DUPLICATE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_are_reconciled_ahead_of_their_first_request_and_again_after_redis_rolls_back() {
    let mut redis = PrivateRedis::with_snapshots();
    let env = per_coupon_env(&redis.url()).await;
    let keys = env.keys().clone();
    env.register([5, 6, 7]).await;
    env.set_stock(7, "2").await;
    let pipeline = env.pipeline();
    // As the daemon does.
    pipeline.drain.reconcile_lanes_ahead();
    let marker = |coupon: i64| keys.for_coupon(coupon).reconciled_marker();
    eventually(
        WAIT,
        "every registered lane is reconciled ahead of time",
        async || {
            for coupon in [5, 6, 7] {
                let set: Option<String> = env.redis.get(marker(coupon)).await.unwrap();
                if set.is_none() {
                    return false;
                }
            }
            true
        },
    )
    .await;
    assert_eq!(redis.cli(&["SAVE"]).trim(), "OK");
    let before = reconciliations(&pipeline);
    assert!(before >= 3, "the three lanes were reconciled: {before}");

    let stop = CancellationToken::new();
    enqueue_members(&env.redis, &keys, vec![(now_ms(), "1001:7".into())])
        .await
        .unwrap();
    let report = pipeline
        .drain
        .tick(Duration::from_secs(10), &stop)
        .await
        .unwrap();
    assert_eq!(report[Outcome::Issued], 1, "{report:?}");
    assert_eq!(
        reconciliations(&pipeline),
        before,
        "the lone request's lane was not reconciled on its way"
    );
    pipeline.drain.persist_all().await.unwrap();
    let persisted = env
        .count("SELECT COUNT(*) FROM user_coupon WHERE coupon_id = 7")
        .await;
    assert_eq!(persisted, 1);

    // Redis dies and comes back from the snapshot: stock 2, no holder, markers of a Redis that
    // is gone. Nobody asks for anything: the sweeper alone notices and reconciles.
    redis.stop();
    redis.resume();
    eventually(
        WAIT,
        "the holder MySQL knows is back in Redis before any request",
        async || {
            let holder: bool = env
                .redis
                .sismember(keys.issued(7), 1001)
                .await
                .unwrap_or(false);
            let stock: Option<String> = env.redis.get(keys.stock(7)).await.unwrap_or(None);
            holder && stock.as_deref() == Some("1")
        },
    )
    .await;
    let after_rollback = reconciliations(&pipeline);
    assert!(after_rollback > before);
    enqueue_members(&env.redis, &keys, vec![(now_ms(), "1001:7".into())])
        .await
        .unwrap();
    let report = pipeline
        .drain
        .tick(Duration::from_secs(10), &stop)
        .await
        .unwrap();
    assert_eq!(report[Outcome::Duplicate], 1, "{report:?}");
    assert_eq!(result_of(&env, 7, 1001).await.as_deref(), Some("ISSUED"));
    pipeline.finish().await;
    env.cleanup().await;
}

/// Calls of `command` Redis ran since `CONFIG RESETSTAT` (INFO commandstats).
fn calls(redis: &PrivateRedis, command: &str) -> u64 {
    let stats = redis.cli(&["INFO", "commandstats"]);
    stats
        .lines()
        .find_map(|line| line.trim().strip_prefix(&format!("cmdstat_{command}:")))
        .and_then(|rest| rest.split(',').find_map(|f| f.strip_prefix("calls=")))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Issue 19: waiting until every ranking-log row is written (`drain`, the benchmarks) walks the
/// log streams once, then looks only at those with entries — not at 3 000 registered coupons'
/// streams every 50 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_the_ranking_log_does_not_walk_every_registered_lane_at_each_look() {
    let redis = PrivateRedis::start();
    let env = per_coupon_env(&redis.url()).await;
    let registered = 3_000;
    env.register(1..=registered).await;
    env.set_stock(77, "1").await;
    let pipeline = env.pipeline();
    enqueue_members(&env.redis, env.keys(), vec![(now_ms(), "5:77".into())])
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let report = pipeline
        .drain
        .tick(Duration::from_secs(10), &stop)
        .await
        .unwrap();
    assert_eq!(report[Outcome::Issued], 1);
    redis.cli(&["CONFIG", "RESETSTAT"]);
    let written = pipeline.finish().await;
    assert_eq!(written, 1);
    assert_eq!(env.count("SELECT COUNT(*) FROM ranking_logs").await, 1);
    // One walk of the streams is two XLEN per coupon; the backlog's XRANGE (its oldest entry)
    // is asked of the streams with entries only.
    let xrange = calls(&redis, "xrange");
    assert!(
        xrange < registered as u64,
        "{xrange} XRANGE while waiting for one row among {registered} registered lanes"
    );
    env.cleanup().await;
}
