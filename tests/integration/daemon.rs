//! The binary and the daemon as operators see them: exit codes, SIGTERM, HTTP probes, migrations.

use std::process::{Command, Stdio};
use std::time::Duration;

use commerce_worker::config::SecretUrl;
use fred::prelude::*;

use crate::common::{
    BIN, Daemon, PrivateRedis, TestEnv, closed_port, drain_command, eventually, output_within,
    run_to_exit, sigkill_at_progress, sigterm, wait_exit,
};
use crate::invariants::{assert_every_invariant, enqueue_malformed, flash_sale};

/// `GET path` on 127.0.0.1:port; the status code, or 0 when nothing answers.
fn http_status(port: u16, path: &str) -> u16 {
    crate::common::http_get(port, path, "*/*").0
}

#[test]
fn check_config_reports_every_problem_with_file_and_key_and_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[coupon]\nbatch_size = 0\nschedul = \"* * * * * *\"\n[ranking]\ntimezone = \"Nowhere/City\"\n[log]\nformat = \"xml\"\n",
    )
    .unwrap();
    let out = crate::common::output_within(
        Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(&path),
        std::time::Duration::from_secs(60),
        "commerce-worker",
    );
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "bad.toml",
        "coupon.batch_size",
        "coupon.schedul",
        "ranking.timezone",
        "log.format",
        "4 problems",
    ] {
        assert!(stderr.contains(needle), "{needle} missing from: {stderr}");
    }
}

/// A template naming a key the worker derives from another template (`<outbox>:dead`,
/// `<log>:rows`, `<coupon_registry>:sweeper`, …) would make two things share one key: with
/// `dead = "coupon:outbox:dead"` the queue's dead letters and the coupons `user_coupon` refused
/// are one stream, and `requeue-dead` puts an issued coupon back in the queue, where it is decided
/// again as a DUPLICATE and never reaches `user_coupon`. `check-config` refuses it (exit 78),
/// naming the key and what the worker keeps there.
#[test]
fn check_config_refuses_a_template_that_names_a_key_the_worker_derives_from_another() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[keys]\ndead = \"coupon:outbox:dead\"\n",
            "keys.dead",
            "coupon:outbox:dead",
        ),
        (
            "[keys]\nqueue = \"{coupon:{couponId}}:queue\"\nstock = \"{coupon:{couponId}}:stock\"\nissued = \"{coupon:{couponId}}:issued\"\nseq = \"{coupon:{couponId}}:seq\"\nresult = \"{coupon:{couponId}}:result\"\noutbox = \"{coupon:{couponId}}:outbox\"\nlog = \"{coupon:{couponId}}:log\"\ndead = \"{coupon:{couponId}}:log:rows\"\n",
            "keys.dead",
            "{coupon:{couponId}}:log:rows",
        ),
        (
            "[keys]\nqueue = \"{coupon:{couponId}}:queue\"\nstock = \"{coupon:{couponId}}:stock\"\nissued = \"{coupon:{couponId}}:issued\"\nseq = \"{coupon:{couponId}}:seq\"\nresult = \"{coupon:{couponId}}:result\"\noutbox = \"{coupon:{couponId}}:outbox\"\nlog = \"{coupon:{couponId}}:log\"\ndead = \"{coupon:{couponId}}:dead\"\ncoupon_active = \"coupon:registry:sweeper\"\n",
            "keys.coupon_active",
            "coupon:registry:sweeper",
        ),
    ];
    for (n, (toml, key, named)) in cases.into_iter().enumerate() {
        let path = dir.path().join(format!("derived{n}.toml"));
        std::fs::write(&path, toml).unwrap();
        let out = crate::common::output_within(
            Command::new(BIN)
                .args(["check-config", "--config"])
                .arg(&path),
            std::time::Duration::from_secs(60),
            "commerce-worker",
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{toml}: {stderr}");
        for needle in [key, named] {
            assert!(stderr.contains(needle), "{needle} missing from: {stderr}");
        }
    }
}

#[test]
fn check_config_prints_the_effective_config_with_env_overrides_and_no_passwords() {
    let out = crate::common::output_within(
        Command::new(BIN)
            .args(["--config", "worker.toml", "check-config"])
            .env(
                "DATABASE_URL",
                "mysql://app:topsecret@db.internal:3306/shop",
            )
            .env("REDIS_URL", "redis://:alsosecret@cache.internal:6379"),
        std::time::Duration::from_secs(60),
        "commerce-worker",
    );
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("mysql://app:***@db.internal:3306/shop"),
        "{stdout}"
    );
    assert!(stdout.contains("cache.internal"), "{stdout}");
    assert!(
        !stdout.contains("topsecret") && !stdout.contains("alsosecret"),
        "{stdout}"
    );
}

#[test]
fn an_unreachable_redis_at_start_exits_69_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_closed, port) = closed_port();
    // With secrets in the URLs and logging on: the error names the service, never a secret
    // (docs/contract.md §6: passwords are redacted in every output).
    let mut command = Command::new(BIN);
    command
        .arg("drain")
        .env("WORKER_CONFIG", "worker.toml")
        .env(
            "REDIS_URL",
            format!("redis://worker:RedisPw0rd@127.0.0.1:{port}/?sentinelPassword=SentinelPw0rd"),
        )
        .env("RUST_LOG", "debug")
        .current_dir(dir.path())
        .arg("--config")
        .arg(
            std::env::current_dir()
                .unwrap_or_default()
                .join("worker.toml"),
        );
    let out = output_within(&mut command, Duration::from_secs(60), "drain");
    assert_eq!(out.status.code(), Some(69));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("redis is unavailable"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    for secret in ["RedisPw0rd", "SentinelPw0rd"] {
        assert!(
            !stderr.contains(secret) && !stdout.contains(secret),
            "{secret} shown:\n{stdout}\n{stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_twice_is_harmless() {
    let env = TestEnv::new().await;
    sqlx::query("INSERT INTO user_coupon (user_id, coupon_id, issued_at) VALUES (1, 2, NOW(3))")
        .execute(&env.mysql)
        .await
        .unwrap();
    let again = commerce_worker::backends::migrate(&env.config.mysql)
        .await
        .unwrap();
    assert_eq!(again, 0, "nothing left to apply");
    let kept: Vec<(i64, i64)> = sqlx::query_as("SELECT user_id, coupon_id FROM user_coupon")
        .fetch_all(&env.mysql)
        .await
        .unwrap();
    assert_eq!(kept, vec![(1, 2)], "the data is kept");
    assert_eq!(
        env.count("SELECT COUNT(*) FROM _sqlx_migrations WHERE success")
            .await,
        commerce_worker::backends::MIGRATOR.iter().count() as i64,
        "every migration applied once"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_daemon_cleanly_with_exit_0_within_the_deadline() {
    let env = TestEnv::new().await;
    let mut daemon = Daemon::start(&env.config_file(), &[]);
    let port = daemon.port;
    eventually(Duration::from_secs(30), "healthz answers", async || {
        http_status(port, "/healthz") == 200
    })
    .await;
    assert_eq!(http_status(port, "/readyz"), 200);
    assert_eq!(http_status(port, "/metrics"), 200);
    let status = daemon.stop().await;
    assert_eq!(status.code(), Some(0));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_while_redis_is_down_and_200_when_it_returns() {
    let mut redis = PrivateRedis::start();
    let mut env = TestEnv::new().await;
    env.config.redis.url = SecretUrl::new(redis.url());
    let mut daemon = Daemon::start(&env.config_file(), &[]);
    let port = daemon.port;
    eventually(Duration::from_secs(20), "ready", async || {
        http_status(port, "/readyz") == 200
    })
    .await;
    redis.stop();
    eventually(Duration::from_secs(20), "not ready", async || {
        http_status(port, "/readyz") == 503
    })
    .await;
    assert_eq!(
        http_status(port, "/healthz"),
        200,
        "alive while Redis is down"
    );
    redis.resume();
    eventually(Duration::from_secs(30), "ready again", async || {
        http_status(port, "/readyz") == 200
    })
    .await;
    let status = daemon.stop().await;
    assert_eq!(status.code(), Some(0));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_that_misses_its_deadline_exits_1_and_a_new_worker_elsewhere_writes_what_was_kept()
 {
    let mut db = crate::common::PrivateMariadb::start();
    let env = TestEnv::with_servers(&crate::common::redis_url(), &db.server_url()).await;
    let config = env
        .config_file_with("[coupon]\nschedule = \"* * * * * *\"\n[shutdown]\ntimeout_secs = 2\n");
    // The pod's working directory, deleted with the pod.
    let workdir = env.dir.path().join("pod-1");
    std::fs::create_dir_all(&workdir).unwrap();
    let mut daemon = Daemon::start_in(&config, &[], Some(&workdir));
    let port = daemon.port;
    eventually(Duration::from_secs(30), "ready", async || {
        http_status(port, "/readyz") == 200
    })
    .await;
    // A first request, decided while MySQL is up: a worker reconciles a Redis it has not seen
    // from MySQL before its first decision there (a sold-out coupon, so nothing waits in the
    // outbox), and its log row is written.
    env.set_stock(6, "0").await;
    env.enqueue(&[(1.0, "1:6".to_owned())]).await;
    eventually(
        Duration::from_secs(30),
        "the first request decided and logged",
        async || {
            sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM ranking_logs")
                .fetch_one(&env.mysql)
                .await
                .is_ok_and(|n| n == 1)
        },
    )
    .await;

    // Redis was reconciled from MySQL at start (a new Redis, as far as the worker knows); only
    // then does MySQL go away, and requests keep coming and are decided in Redis.
    eventually(
        Duration::from_secs(30),
        "Redis reconciled at start",
        async || {
            env.redis
                .exists::<u64, _>(env.keys().reconciled_marker())
                .await
                .is_ok_and(|n| n == 1)
        },
    )
    .await;
    db.kill();
    flash_sale(&env, &[5], 40, 100).await;
    let malformed = enqueue_malformed(&env, &[5]).await;
    eventually(
        Duration::from_secs(20),
        "the queue is decided",
        async || {
            env.redis
                .zcard::<u64, _>(&env.keys().queue)
                .await
                .is_ok_and(|n| n == 0)
        },
    )
    .await;

    sigterm(&daemon.child);
    let status = wait_exit(
        &mut daemon.child,
        Duration::from_secs(20),
        "no exit after the deadline",
    )
    .await;
    assert_eq!(status.code(), Some(1), "a missed deadline exits 1");
    let waiting: Option<u64> = env.redis.get(env.keys().log_rows()).await.unwrap();
    assert_eq!(
        waiting,
        Some(100),
        "every undelivered log row kept in Redis, none on the pod's disk"
    );
    // The pod and its disk go away.
    std::fs::remove_dir_all(&workdir).unwrap();
    let outbox: u64 = env.redis.zcard(&env.keys().outbox).await.unwrap();
    assert_eq!(outbox, 40, "issued coupons wait in the outbox");

    // A new worker in another directory, with MySQL back, writes both, each row once.
    db.resume();
    let elsewhere = env.dir.path().join("pod-2");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let drained = run_to_exit(
        drain_command(&config).current_dir(&elsewhere),
        Duration::from_secs(120),
        "the drain after the restart did not finish",
    )
    .await;
    assert!(drained.success());
    assert_every_invariant(&env, &[5], 40, 100, &malformed).await;
    env.cleanup().await;
    drop(db);
}

/// docs/contract.md §5: `run` stops within `[shutdown] timeout_secs`, whatever the servers do.
/// Here Redis freezes (SIGSTOP: connections open, no reply) while the ranking-log writer holds
/// rows it cannot write (MySQL is down): every step of the shutdown — the writer's check of its
/// entries, the reader, the hand-back of unwritten entries, the heartbeat's last write, the HTTP
/// server — waits on Redis. The daemon still exits 1 by the deadline (the bound below is the
/// deadline plus a margin for the process to start its shutdown and be reaped; before this was
/// fixed it took the deadline + 5 s and more), and nothing is lost: the rows stay in Redis and a
/// later `drain` writes each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_frozen_a_sigterm_still_exits_1_by_the_shutdown_deadline_and_loses_nothing() {
    const TIMEOUT_SECS: u64 = 3;
    let redis = PrivateRedis::start();
    let mut db = crate::common::PrivateMariadb::start();
    let env = TestEnv::with_servers(&redis.url(), &db.server_url()).await;
    let config = env.config_file_with(&format!(
        "[coupon]\nschedule = \"* * * * * *\"\n[shutdown]\ntimeout_secs = {TIMEOUT_SECS}\n"
    ));
    let mut daemon = Daemon::start(&config, &[]);
    let port = daemon.port;
    eventually(Duration::from_secs(30), "ready", async || {
        http_status(port, "/readyz") == 200
    })
    .await;
    eventually(
        Duration::from_secs(30),
        "Redis reconciled at start",
        async || {
            env.redis
                .exists::<u64, _>(env.keys().reconciled_marker())
                .await
                .is_ok_and(|n| n == 1)
        },
    )
    .await;
    db.kill();
    flash_sale(&env, &[5], 40, 100).await;
    let malformed = enqueue_malformed(&env, &[5]).await;
    eventually(
        Duration::from_secs(20),
        "the queue is decided",
        async || {
            env.redis
                .zcard::<u64, _>(&env.keys().queue)
                .await
                .is_ok_and(|n| n == 0)
        },
    )
    .await;
    // The reader has handed the rows to the writer, which retries MySQL.
    eventually(
        Duration::from_secs(20),
        "the log rows read by the daemon",
        async || {
            env.redis
                .xpending::<Vec<Value>, _, _, _>(&env.keys().log, "ranking-log", ())
                .await
                .ok()
                .and_then(|summary| summary.first().and_then(Value::as_u64))
                .is_some_and(|pending| pending > 0)
        },
    )
    .await;

    redis.freeze();
    let stopping = std::time::Instant::now();
    sigterm(&daemon.child);
    let status = wait_exit(
        &mut daemon.child,
        Duration::from_secs(60),
        "no exit within 60 s of SIGTERM",
    )
    .await;
    let took = stopping.elapsed();
    redis.thaw();
    assert_eq!(status.code(), Some(1), "a missed deadline exits 1");
    assert!(
        took < Duration::from_secs(TIMEOUT_SECS + 2),
        "the shutdown took {took:?}, past its {TIMEOUT_SECS} s deadline"
    );

    // Nothing was lost: with Redis and MySQL back, a drain writes every row and coupon once.
    db.resume();
    let drained = run_to_exit(
        &mut drain_command(&config),
        Duration::from_secs(120),
        "the drain after the restart did not finish",
    )
    .await;
    assert!(drained.success());
    assert_every_invariant(&env, &[5], 40, 100, &malformed).await;
    env.cleanup().await;
    drop(db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_running_daemon_several_times_loses_and_duplicates_nothing() {
    let env = TestEnv::new().await;
    let coupons = [31, 32];
    let (initial, users) = (2000, 4000);
    flash_sale(&env, &coupons, initial, users).await;
    let malformed = enqueue_malformed(&env, &coupons).await;
    // Ticks every second, in small batches, so that the kills land inside ticks.
    let config = env.config_file_with("[coupon]\nschedule = \"* * * * * *\"\nbatch_size = 20\n");
    let daemon = || {
        let mut command = Command::new(BIN);
        command
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "off")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        command
    };
    let total = coupons.len() as u64 * users as u64;
    let kills = sigkill_at_progress(&env, daemon, 4, total).await;
    assert!(
        kills >= 2,
        "the daemon was killed mid-way at least twice ({kills})"
    );

    // A last daemon finishes the queue, the outbox and the ranking-log rows the killed ones
    // left in Redis (taken over once idle), then stops cleanly.
    let mut last = Daemon::start(&config, &[]);
    eventually(
        Duration::from_secs(120),
        "the queue decided, the outbox flushed and every log row written",
        async || {
            let queued =
                commerce_worker::tools::simulated_api::queued(&env.redis, env.keys()).await;
            let outbox = env.redis.zcard::<u64, _>(&env.keys().outbox).await;
            let log = env.redis.get::<Option<i64>, _>(env.keys().log_rows()).await;
            matches!((queued, outbox, log), (Ok(0), Ok(0), Ok(None | Some(0))))
        },
    )
    .await;
    let status = last.stop().await;
    assert_eq!(status.code(), Some(0));
    assert_every_invariant(&env, &coupons, initial, users, &malformed).await;
    env.cleanup().await;
}
