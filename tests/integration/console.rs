//! The operator's console: `requeue-dead` / `purge-dead` with filters and dry runs, `pause` /
//! `resume`, `status`, and the `/metrics` text exposition, against real Redis and MariaDB.

use std::process::{Command, Output, Stdio};

use commerce_worker::coupon::{DeadAction, DeadFilter, DeadReport, process_dead};
use commerce_worker::keys::KeyTemplates;
use commerce_worker::outcome::Outcome;
use fred::prelude::*;

use crate::common::{BIN, TestEnv, http_get};

/// Dead-letters `member` with `reason` into `stream`, as the decide script does.
async fn dead_letter(env: &TestEnv, stream: &str, member: &str, score: &str, reason: &str) {
    let _: String = env
        .redis
        .xadd(
            stream,
            false,
            None,
            "*",
            vec![("member", member), ("score", score), ("reason", reason)],
        )
        .await
        .unwrap();
}

/// Requeues or purges the dead letters `filter` matches (no dry run, entries not listed).
async fn act_on_dead(
    env: &TestEnv,
    keys: &KeyTemplates,
    action: DeadAction,
    filter: &DeadFilter,
) -> DeadReport {
    process_dead(&env.redis, keys, action, filter, false, |_| {})
        .await
        .unwrap()
}

async fn stream_members(env: &TestEnv, stream: &str) -> Vec<String> {
    let entries: Vec<(String, std::collections::HashMap<String, String>)> =
        env.redis.xrange(stream, "-", "+", None).await.unwrap();
    entries
        .into_iter()
        .map(|(_, f)| f.get("member").cloned().unwrap_or_default())
        .collect()
}

async fn queued(env: &TestEnv, queue: &str) -> Vec<(String, f64)> {
    env.redis
        .zrange(queue, 0, -1, None, false, None, true)
        .await
        .unwrap()
}

/// Runs the binary with `args` against the env's config file.
fn run_cli(env: &TestEnv, args: &[&str]) -> Output {
    let config = env.config_file();
    crate::common::output_within(
        Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .args(args)
            .env("RUST_LOG", "off")
            .stdin(Stdio::null()),
        std::time::Duration::from_secs(60),
        "commerce-worker",
    )
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeue_dead_filters_by_coupon_and_reason_and_a_dry_run_changes_nothing() {
    let env = TestEnv::new().await;
    let dead = env.keys().dead.clone();
    dead_letter(
        &env,
        &dead,
        "1:7",
        "10",
        "stock is not a non-negative integer: ten",
    )
    .await;
    dead_letter(&env, &dead, "2:7", "11", "wrong type: issued is a string").await;
    dead_letter(
        &env,
        &dead,
        "3:8",
        "12",
        "stock is not a non-negative integer: x",
    )
    .await;
    dead_letter(&env, &dead, "x:8", "13", "malformed member: bad userId").await;

    let filter = DeadFilter {
        coupon: Some(7),
        reason: Some("stock is not".into()),
    };
    let mut seen = Vec::new();
    let dry = process_dead(
        &env.redis,
        env.keys(),
        DeadAction::Requeue,
        &filter,
        true,
        |e| seen.push(e.member.clone()),
    )
    .await
    .unwrap();
    assert_eq!(seen, vec!["1:7"]);
    assert_eq!((dry.looked_at, dry.matched, dry.done), (4, 1, 1));
    assert_eq!(
        stream_members(&env, &dead).await.len(),
        4,
        "a dry run moves nothing"
    );
    assert!(queued(&env, &env.keys().queue).await.is_empty());

    let done = act_on_dead(&env, env.keys(), DeadAction::Requeue, &filter).await;
    assert_eq!(done.done, 1);
    assert_eq!(
        queued(&env, &env.keys().queue).await,
        vec![("1:7".to_owned(), 10.0)],
        "back with its original score"
    );
    assert_eq!(stream_members(&env, &dead).await, vec!["2:7", "3:8", "x:8"]);

    // By reason alone, across coupons.
    let by_reason = DeadFilter {
        coupon: None,
        reason: Some("stock is not".into()),
    };
    let done = act_on_dead(&env, env.keys(), DeadAction::Requeue, &by_reason).await;
    assert_eq!(done.done, 1);
    assert_eq!(stream_members(&env, &dead).await, vec!["2:7", "x:8"]);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_dead_deletes_only_what_matches_and_prints_each_entry() {
    let env = TestEnv::new().await;
    let dead = env.keys().dead.clone();
    dead_letter(&env, &dead, "1:7", "10", "wrong type: issued is a string").await;
    dead_letter(&env, &dead, "x:8", "13", "malformed member: bad userId").await;
    dead_letter(
        &env,
        &dead,
        "",
        "",
        "malformed member: expected userId:couponId",
    )
    .await;

    let refused = run_cli(&env, &["purge-dead", "--reason", "malformed"]);
    assert_eq!(
        refused.status.code(),
        Some(64),
        "purge without --yes is a usage error"
    );
    assert_eq!(stream_members(&env, &dead).await.len(), 3);

    let purged = run_cli(
        &env,
        &["purge-dead", "--yes", "--reason", "malformed member"],
    );
    assert_eq!(purged.status.code(), Some(0), "{purged:?}");
    let out = stdout(&purged);
    assert_eq!(
        out.lines().filter(|l| l.starts_with("deleted:")).count(),
        2,
        "{out}"
    );
    assert!(out.contains(r#"member="x:8""#), "{out}");
    assert!(out.contains("deleted 2 matching"), "{out}");
    assert_eq!(stream_members(&env, &dead).await, vec!["1:7"]);

    let dry = run_cli(&env, &["requeue-dead", "--dry-run", "--coupon", "7"]);
    assert_eq!(dry.status.code(), Some(0), "{dry:?}");
    assert!(
        stdout(&dry).contains(r#"would requeue: "#),
        "{}",
        stdout(&dry)
    );
    assert_eq!(stream_members(&env, &dead).await, vec!["1:7"]);

    let bad = run_cli(&env, &["requeue-dead", "--coupon", "seven"]);
    assert_eq!(
        bad.status.code(),
        Some(64),
        "a bad argument is a usage error"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_coupon_dead_letter_commands_work_on_the_coupons_own_stream() {
    let mut env = TestEnv::new().await;
    env.use_per_coupon_layout();
    let keys = env.keys().clone();
    env.register([7, 8]).await;
    dead_letter(&env, &keys.for_coupon(7).dead, "1:7", "10", "wrong type: x").await;
    dead_letter(&env, &keys.for_coupon(8).dead, "1:8", "11", "wrong type: x").await;
    // Coupon 9 left the registry, but its dead letters are still reachable by name.
    dead_letter(&env, &keys.for_coupon(9).dead, "1:9", "12", "wrong type: x").await;

    let only_8 = DeadFilter {
        coupon: Some(8),
        reason: None,
    };
    let done = act_on_dead(&env, &keys, DeadAction::Requeue, &only_8).await;
    assert_eq!(done.done, 1);
    assert_eq!(
        queued(&env, &keys.for_coupon(8).queue).await,
        vec![("1:8".to_owned(), 11.0)]
    );
    assert_eq!(
        stream_members(&env, &keys.for_coupon(7).dead).await.len(),
        1
    );

    let only_9 = DeadFilter {
        coupon: Some(9),
        reason: None,
    };
    let purged = act_on_dead(&env, &keys, DeadAction::Purge, &only_9).await;
    assert_eq!(purged.done, 1);
    // Unfiltered: every registered coupon's stream.
    let all = act_on_dead(&env, &keys, DeadAction::Purge, &DeadFilter::default()).await;
    assert_eq!(all.done, 1, "only coupon 7's entry was left");
    env.cleanup().await;
}

/// The value of the sample `series` (name with labels, exactly as exposed) in `/metrics`.
fn sample(port: u16, series: &str) -> Option<f64> {
    let (_, body) = http_get(port, "/metrics", "text/plain");
    body.lines().find_map(|line| {
        line.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// A running `commerce-worker run`, killed when dropped.
pub type Replica = crate::common::Daemon;

/// Starts a replica of the daemon on `env` whose drain runs every second, and waits for
/// `/readyz`.
pub async fn start_replica(env: &TestEnv) -> Replica {
    let config = env.config_file_with("[coupon]\nschedule = \"* * * * * *\"\n");
    let replica = crate::common::Daemon::start(&config, &[]);
    let port = replica.port;
    crate::common::eventually(
        std::time::Duration::from_secs(30),
        "the replica to answer /readyz",
        async || http_get(port, "/readyz", "*/*").0 == 200,
    )
    .await;
    replica
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_is_honoured_by_every_running_replica_which_stays_ready_and_resume_lets_them_drain() {
    use std::time::Duration;
    let env = TestEnv::new().await;
    env.set_stock(7, "10").await;
    let (a, b) = (start_replica(&env).await, start_replica(&env).await);

    let paused = run_cli(&env, &["pause", "--drain"]);
    assert_eq!(paused.status.code(), Some(0), "{paused:?}");
    assert!(
        stdout(&paused).contains("paused now: drain"),
        "{}",
        stdout(&paused)
    );
    for replica in [&a, &b] {
        crate::common::eventually(
            Duration::from_secs(20),
            "each replica to export paused{part=\"drain\"} 1",
            async || sample(replica.port, r#"commerce_worker_paused{part="drain"}"#) == Some(1.0),
        )
        .await;
    }
    // Requests arriving now wait: each replica runs a tick that finds the drain paused.
    let before: Vec<f64> = [&a, &b]
        .iter()
        .map(|r| {
            sample(
                r.port,
                r#"commerce_worker_job_runs_total{job="coupon_drain",result="paused"}"#,
            )
            .unwrap_or(0.0)
        })
        .collect();
    env.enqueue(&[(1.0, "1:7".to_owned()), (2.0, "2:7".to_owned())])
        .await;
    for (replica, before) in [&a, &b].iter().zip(before) {
        crate::common::eventually(
            Duration::from_secs(20),
            "each replica to run a paused drain tick after the requests arrived",
            async || {
                sample(
                    replica.port,
                    r#"commerce_worker_job_runs_total{job="coupon_drain",result="paused"}"#,
                )
                .unwrap_or(0.0)
                    > before
            },
        )
        .await;
        assert_eq!(
            http_get(replica.port, "/readyz", "*/*").0,
            200,
            "a paused worker is ready"
        );
    }
    let waiting: u64 = env.redis.zcard(&env.keys().queue).await.unwrap();
    assert_eq!(waiting, 2, "no replica decided while paused");
    let status = run_cli(&env, &["status", "--json"]);
    let json: serde_json::Value =
        serde_json::from_slice(&status.stdout).unwrap_or_else(|e| panic!("{e}: {status:?}"));
    assert_eq!(json["paused"][0]["part"], "drain", "{json}");
    assert_eq!(json["replicas"].as_array().map(Vec::len), Some(2), "{json}");

    let resumed = run_cli(&env, &["resume", "--drain"]);
    assert_eq!(resumed.status.code(), Some(0), "{resumed:?}");
    crate::common::eventually(
        Duration::from_secs(20),
        "the queue to drain after resume",
        async || {
            env.redis
                .zcard::<u64, _>(&env.keys().queue)
                .await
                .unwrap_or(1)
                == 0
        },
    )
    .await;
    drop((a, b));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_needs_drain_or_persist_and_a_paused_persister_leaves_the_outbox_alone() {
    let env = TestEnv::new().await;
    let none = run_cli(&env, &["pause"]);
    assert_eq!(
        none.status.code(),
        Some(64),
        "pause without a part is a usage error"
    );

    env.set_stock(7, "5").await;
    env.enqueue(&[(1.0, "1:7".to_owned())]).await;
    assert_eq!(
        run_cli(&env, &["pause", "--persist"]).status.code(),
        Some(0)
    );
    let pipeline = env.pipeline();
    let report = pipeline
        .drain
        .tick(
            std::time::Duration::MAX,
            &tokio_util::sync::CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(
        report[Outcome::Issued],
        1,
        "pausing persist does not pause deciding"
    );
    assert_eq!(
        pipeline.drain.persist_all().await.unwrap(),
        0,
        "nothing persisted while paused"
    );
    assert_eq!(env.count("SELECT COUNT(*) FROM user_coupon").await, 0);

    assert_eq!(
        run_cli(&env, &["pause", "--drain", "--persist"])
            .status
            .code(),
        Some(0)
    );
    assert_eq!(
        run_cli(&env, &["resume", "--persist"]).status.code(),
        Some(0)
    );
    // A new drain (a fresh cache of the flags), as another replica would be.
    let other = env.pipeline();
    env.enqueue(&[(2.0, "2:7".to_owned())]).await;
    let report = other
        .drain
        .tick(
            std::time::Duration::MAX,
            &tokio_util::sync::CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(report.stopped, commerce_worker::coupon::StopReason::Paused);
    assert_eq!(report.decided(), 0);
    assert_eq!(other.drain.persist_all().await.unwrap(), 1);
    assert_eq!(env.count("SELECT COUNT(*) FROM user_coupon").await, 1);
    pipeline.finish().await;
    other.finish().await;
    env.cleanup().await;
}

/// Puts the control keys in the state of a healthy worker: a recent drain run, a ranking built
/// now, one live replica.
async fn healthy_worker_state(env: &TestEnv) {
    let control = commerce_worker::control::Control::new(
        env.redis.clone(),
        env.keys(),
        commerce_worker::metrics::Metrics::new(),
    );
    let now = chrono::Utc::now();
    for job in ["coupon_drain", "ranking_rebuild"] {
        control
            .record_run(job, now, std::time::Duration::from_millis(3), "ok", None)
            .await;
    }
    control.heartbeat(now).await.unwrap();
    // The live record a rebuild's swap writes.
    let _: i64 = env
        .redis
        .hset(
            env.keys().ranking_live_record(),
            vec![
                ("day", "2026-11-24".to_owned()),
                ("token", "t".to_owned()),
                ("built_at", now.timestamp().to_string()),
            ],
        )
        .await
        .unwrap();
}

fn status_json(env: &TestEnv) -> (Option<i32>, serde_json::Value) {
    let out = run_cli(env, &["status", "--json"]);
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    (out.status.code(), json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_depths_and_ages_per_coupon_and_exits_1_when_something_needs_a_person() {
    let env = TestEnv::new().await;
    healthy_worker_state(&env).await;
    let (code, json) = status_json(&env);
    assert_eq!(code, Some(0), "{json}");
    assert_eq!(json["problems"], serde_json::json!([]));
    assert_eq!(json["jobs"][0]["last_run"]["result"], "ok");
    assert_eq!(json["ranking"]["built_for"], "2026-11-24");

    let now_ms = chrono::Utc::now().timestamp_millis() as f64;
    // Coupon 7: one request waiting 10 minutes, one just arrived; coupon 8: an issued coupon
    // waiting for MySQL for 20 minutes and a dead letter.
    env.enqueue(&[
        (now_ms - 600_000.0, "1:7".to_owned()),
        (now_ms, "2:7".to_owned()),
    ])
    .await;
    let _: i64 = env
        .redis
        .zadd(
            &env.keys().outbox,
            None,
            None,
            false,
            false,
            (now_ms - 1_200_000.0, "3:8"),
        )
        .await
        .unwrap();
    dead_letter(
        &env,
        &env.keys().dead.clone(),
        "4:8",
        "5",
        "stock is not a non-negative integer: x",
    )
    .await;

    let (code, json) = status_json(&env);
    assert_eq!(code, Some(1), "{json}");
    let coupon = |id: i64| {
        json["coupons"]
            .as_array()
            .and_then(|c| c.iter().find(|d| d["coupon"] == id).cloned())
            .unwrap_or_else(|| panic!("coupon {id} missing: {json}"))
    };
    assert_eq!(coupon(7)["queue_depth"], 2);
    let oldest = coupon(7)["queue_oldest_age_secs"].as_f64().unwrap_or(0.0);
    assert!((600.0..700.0).contains(&oldest), "{oldest}");
    assert_eq!(coupon(8)["outbox_depth"], 1);
    assert_eq!(
        coupon(8)["dead_by_reason"]["stock is not a non-negative integer"],
        1
    );
    assert_eq!(json["total"]["queue_depth"], 2);
    assert_eq!(json["total"]["dead_letters"], 1);
    let problems = json["problems"].to_string();
    for needle in ["oldest queued request", "waited", "dead-lettered"] {
        assert!(
            problems.contains(needle),
            "{needle} missing from {problems}"
        );
    }
    let table = stdout(&run_cli(&env, &["status"]));
    assert!(table.contains("needs a person"), "{table}");
    assert!(
        table.contains("stock is not a non-negative integer"),
        "{table}"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_coupon_status_walks_every_registered_coupon() {
    let mut env = TestEnv::new().await;
    env.use_per_coupon_layout();
    healthy_worker_state(&env).await;
    let keys = env.keys().clone();
    env.register([7, 8]).await;
    let now_ms = chrono::Utc::now().timestamp_millis() as f64;
    for (coupon, n) in [(7, 3), (8, 1)] {
        let entries: Vec<(f64, String)> =
            (1..=n).map(|u| (now_ms, format!("{u}:{coupon}"))).collect();
        env.zadd(&keys.for_coupon(coupon).queue, &entries).await;
    }
    let (code, json) = status_json(&env);
    assert_eq!(code, Some(0), "{json}");
    assert_eq!(json["layout"], "per-coupon");
    assert_eq!(json["coupons"][0]["coupon"], 7);
    assert_eq!(json["coupons"][0]["queue_depth"], 3);
    assert_eq!(json["coupons"][1]["queue_depth"], 1);
    assert_eq!(json["total"]["queue_depth"], 4);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_coupon_status_lists_a_failing_lane_with_its_cause_and_goes_on_with_the_others() {
    let mut env = TestEnv::new().await;
    env.use_per_coupon_layout();
    healthy_worker_state(&env).await;
    let keys = env.keys().clone();
    env.register([7, 8]).await;
    let now_ms = chrono::Utc::now().timestamp_millis() as f64;
    env.zadd(&keys.for_coupon(8).queue, &[(now_ms, "1:8".to_owned())])
        .await;
    // Coupon 7's queue is a string: the drain leaves the lane failing (and used to make
    // `status` itself fail on it), while coupon 8 is decided as usual.
    let broken = keys.for_coupon(7).queue;
    env.put_wrong_type(broken.clone()).await;

    let (code, json) = status_json(&env);
    assert_eq!(code, Some(1), "a failing lane needs a person: {json}");
    let failing = json["failing_lanes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(failing.len(), 1, "{json}");
    assert_eq!(failing[0]["coupon"], 7);
    let error = failing[0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("WRONGTYPE") && error.contains(&broken),
        "{error}"
    );
    assert_eq!(json["coupons"][0]["coupon"], 7);
    assert!(json["coupons"][0]["lane_error"].is_string(), "{json}");
    assert_eq!(
        json["coupons"][1]["queue_depth"], 1,
        "the other lane's figures: {json}"
    );
    assert!(
        json["problems"].to_string().contains("coupon 7"),
        "{}",
        json["problems"]
    );

    let table = stdout(&run_cli(&env, &["status"]));
    assert!(table.contains("failing coupon lanes"), "{table}");
    assert!(
        table.contains(&format!("coupon 7: WRONGTYPE {broken}")),
        "{table}"
    );
    env.cleanup().await;
}

/// docs/contract.md §5: a service that cannot be reached at start exits 69 naming it. The cause
/// is printed once (it used to follow the message twice) and no secret of the URL is shown:
/// `status` against a Redis, `migrate` against a MySQL, on a closed port.
#[test]
fn status_and_migrate_against_a_closed_port_exit_69_printing_the_cause_once_and_no_secret() {
    let (_closed, port) = crate::common::closed_port();
    let cases = [
        (
            "status",
            "REDIS_URL",
            format!("redis://worker:RedisPw0rd@127.0.0.1:{port}/?sentinelPassword=SentinelPw0rd"),
            "redis",
        ),
        (
            "migrate",
            "DATABASE_URL",
            format!("mysql://worker:MysqlPw0rd@127.0.0.1:{port}/shop"),
            "mysql",
        ),
    ];
    for (command, variable, url, service) in cases {
        let out = crate::common::output_within(
            Command::new(BIN)
                .args([command, "--config", "worker.toml"])
                .env(variable, url)
                .env_remove("RUST_LOG")
                .stdin(Stdio::null()),
            std::time::Duration::from_secs(60),
            command,
        );
        assert_eq!(out.status.code(), Some(69), "{command}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stderr.contains(&format!("error: {service} is unavailable: ")),
            "{command}: {stderr}"
        );
        let cause = "Connection refused";
        assert_eq!(
            stderr.matches(cause).count(),
            1,
            "{command}: the cause ({cause}) printed once:\n{stderr}"
        );
        for secret in ["RedisPw0rd", "SentinelPw0rd", "MysqlPw0rd"] {
            assert!(
                !stderr.contains(secret) && !stdout.contains(secret),
                "{command}: {secret} shown:\n{stdout}\n{stderr}"
            );
        }
    }
}

/// `promtool`, or `None` outside CI when it is not installed (scripts/services.sh installs it).
fn promtool() -> Option<&'static str> {
    let found = Command::new("promtool")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            // The same switch as the systemd-analyze test: CI set at all (CI=1 as well as true).
            std::env::var_os("CI").is_none(),
            "promtool is missing (Debian package prometheus; scripts/services.sh installs it) and \
             CI is set: the exposition must be checked in CI"
        );
        eprintln!("promtool not installed: skipping the exposition check");
        return None;
    }
    Some("promtool")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_metrics_endpoint_passes_promtool_in_the_text_format_and_serves_openmetrics_on_request()
 {
    let env = TestEnv::new().await;
    env.set_stock(7, "1").await;
    let dead = env.keys().dead.clone();
    dead_letter(&env, &dead, "1:7", "1", "wrong type: x").await;
    env.enqueue(&[(1.0, "1:7".to_owned()), (2.0, "2:7".to_owned())])
        .await;
    let replica = start_replica(&env).await;
    // Let a tick and the persister's depth refresh happen, so every kind of series has values.
    crate::common::eventually(
        std::time::Duration::from_secs(20),
        "the replica to decide the queue and count the dead letter",
        async || {
            sample(
                replica.port,
                r#"commerce_worker_coupon_outcomes_total{outcome="issued"}"#,
            ) == Some(1.0)
                && sample(replica.port, "commerce_worker_coupon_dead_letters") == Some(1.0)
        },
    )
    .await;
    let (code, response) = http_get(replica.port, "/metrics", "text/plain");
    assert_eq!(code, 200);
    assert!(response.contains("text/plain; version=0.0.4"), "{response}");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    // Present from the start, at zero.
    assert!(
        body.contains(r#"commerce_worker_job_runs_total{job="ranking_rebuild",result="error"} 0"#),
        "{body}"
    );
    if let Some(promtool) = promtool() {
        let exposition = env.dir.path().join("metrics.txt");
        std::fs::write(&exposition, &body).unwrap();
        let out = crate::common::output_within(
            Command::new(promtool)
                .args(["check", "metrics"])
                .stdin(std::fs::File::open(&exposition).unwrap()),
            std::time::Duration::from_secs(60),
            "promtool check metrics",
        );
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (_, open) = http_get(
        replica.port,
        "/metrics",
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
    );
    assert!(open.contains("application/openmetrics-text"), "{open}");
    assert!(open.trim_end().ends_with("# EOF"), "{open}");
    drop(replica);
    env.cleanup().await;
}

#[test]
fn check_config_redacts_every_secret_in_the_urls_and_rejects_schedules_that_cannot_run() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "").unwrap();
    let out = crate::common::output_within(
        Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(&good)
            .env(
                "REDIS_URL",
                "redis-sentinel://u:userpass1@s1:26379/0?sentinelServiceName=m&sentinelPassword=sentinelpass2",
            )
            .env("DATABASE_URL", "mysql://w:dbpass3@db:3306/shop?auth_token=tok4"),
        std::time::Duration::from_secs(60),
        "commerce-worker check-config",
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for secret in ["userpass1", "sentinelpass2", "dbpass3", "tok4"] {
        assert!(!shown.contains(secret), "{secret} shown in: {shown}");
    }
    assert!(shown.contains("sentinelPassword=***"), "{shown}");

    for (schedule, why) in [
        ("0 0 0 31 2 *", "never fires"),
        ("0 0 0 * * * 2020", "has 7 fields"),
    ] {
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, format!("[ranking]\nschedule = \"{schedule}\"\n")).unwrap();
        let out = crate::common::output_within(
            Command::new(BIN)
                .args(["check-config", "--config"])
                .arg(&bad),
            std::time::Duration::from_secs(60),
            "commerce-worker check-config",
        );
        assert_eq!(out.status.code(), Some(78), "{schedule}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("ranking.schedule"), "{stderr}");
        assert!(stderr.contains(why), "{stderr}");
    }
}

#[tokio::test]
async fn requeue_dead_walks_only_the_entries_there_when_it_started_while_a_drain_dead_letters_more()
{
    let env = TestEnv::new().await;
    let dead = env.keys().dead.clone();
    let reason = "stock is not a non-negative integer: abc";
    for user in 1..=3000u64 {
        dead_letter(&env, &dead, &format!("{user}:9"), "10", reason).await;
    }
    // A drain deciding what gets requeued while the stock is still broken dead-letters it again,
    // appending to the stream during the walk.
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = {
        let (redis, dead, stop) = (env.redis.clone(), dead.clone(), stop.clone());
        tokio::spawn(async move {
            let mut appended = 0u64;
            while !stop.is_cancelled() {
                let member = format!("{}:9", 100_000 + appended);
                let _: String = redis
                    .xadd(
                        &dead,
                        false,
                        None,
                        "*",
                        vec![
                            ("member", member.as_str()),
                            ("score", "10"),
                            ("reason", reason),
                        ],
                    )
                    .await
                    .unwrap();
                appended += 1;
            }
            appended
        })
    };
    // Without the bound the walk never ends while entries keep arriving: fail instead of hanging.
    let every_entry = DeadFilter::default();
    let walk = process_dead(
        &env.redis,
        env.keys(),
        DeadAction::Requeue,
        &every_entry,
        false,
        |_| {},
    );
    let report = tokio::time::timeout(std::time::Duration::from_secs(60), walk)
        .await
        .unwrap_or_else(|_| panic!("requeue-dead kept walking entries appended after it started"))
        .unwrap();
    stop.cancel();
    let appended = writer.await.unwrap();
    assert!(appended > 0, "the concurrent dead-lettering never ran");
    assert_eq!(
        (report.looked_at, report.matched, report.done),
        (3000, 3000, 3000),
        "the walk must stop at the entry that was last when it started"
    );
    let requeued: u64 = env.redis.zcard(&env.keys().queue).await.unwrap();
    assert_eq!(requeued, 3000);
    env.cleanup().await;
}

/// Puts an entry MySQL rejected for good into `<log>:dead`, as the log writer does.
async fn log_dead_letter(env: &TestEnv, dead: &str, log: &str, members: &str, outcomes: &str) {
    let ranks: Vec<String> = (1..=outcomes.len()).map(|r| r.to_string()).collect();
    let _: String = env
        .redis
        .xadd(
            dead,
            false,
            None,
            "*",
            vec![
                ("stream", log.to_owned()),
                ("id", "1-0".to_owned()),
                ("m", members.to_owned()),
                ("r", ranks.join(" ")),
                ("o", outcomes.to_owned()),
                ("error", "Data too long for column".to_owned()),
            ],
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranking_log_dead_letters_show_in_status_and_in_a_gauge_and_need_a_person() {
    let env = TestEnv::new().await;
    healthy_worker_state(&env).await;
    let keys = env.keys().clone();
    log_dead_letter(&env, &keys.log_dead(), &keys.log, "1:7 2:7 3:7", "ISS").await;
    log_dead_letter(&env, &keys.log_dead(), &keys.log, "4:8 5:8", "ID").await;
    let (code, json) = status_json(&env);
    assert_eq!(code, Some(1), "{json}");
    assert_eq!(json["total"]["log_dead_letters"], 2, "{json}");
    assert_eq!(json["total"]["log_dead_rows"], 5, "{json}");
    let problems = json["problems"].to_string();
    assert!(
        problems.contains("5 ranking-log rows MySQL rejected for good")
            && problems.contains("requeue-log-dead"),
        "{problems}"
    );
    let table = stdout(&run_cli(&env, &["status"]));
    assert!(table.contains("log dead rows"), "{table}");
    assert!(
        table.contains("rejected for good: 5 in 2 entries"),
        "{table}"
    );

    // Every replica exports the count as a gauge.
    let replica = start_replica(&env).await;
    crate::common::eventually(
        std::time::Duration::from_secs(30),
        "the log dead-letter gauge to show the two entries",
        async || sample(replica.port, "commerce_worker_ranking_log_dead_letters") == Some(2.0),
    )
    .await;
    drop(replica);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_coupon_status_counts_the_log_dead_letters_of_a_coupon_no_longer_registered() {
    let mut env = TestEnv::new().await;
    env.use_per_coupon_layout();
    healthy_worker_state(&env).await;
    let keys = env.keys().clone();
    env.register([7]).await;
    // Coupon 9 was retired after MySQL rejected some of its rows: its log stream is empty (the
    // entry left it for the dead-letter stream), the dead-letter stream holds them.
    let retired = keys.for_coupon(9);
    let id: String = env
        .redis
        .xadd(&retired.log, false, None, "*", vec![("m", "1:9 2:9")])
        .await
        .unwrap();
    let _: i64 = env.redis.xdel(&retired.log, &id).await.unwrap();
    log_dead_letter(&env, &retired.log_dead(), &retired.log, "1:9 2:9", "SS").await;
    let (code, json) = status_json(&env);
    assert_eq!(code, Some(1), "{json}");
    let coupon9 = json["coupons"]
        .as_array()
        .and_then(|c| c.iter().find(|d| d["coupon"] == 9).cloned())
        .unwrap_or_else(|| panic!("coupon 9 missing: {json}"));
    assert_eq!(coupon9["log_dead_letters"], 1, "{json}");
    assert_eq!(coupon9["log_dead_rows"], 2, "{json}");
    assert_eq!(json["total"]["log_dead_rows"], 2, "{json}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coupon_id_that_is_not_canonical_is_a_usage_error_and_touches_nothing() {
    let env = TestEnv::new().await;
    let dead = env.keys().dead.clone();
    // Coupon 7's and coupon 10's dead letters: `007` or `+10` read as 7 or 10 would move them.
    dead_letter(&env, &dead, "1:7", "10", "wrong type: x").await;
    dead_letter(&env, &dead, "2:10", "11", "wrong type: x").await;
    for id in ["007", "+10", "0", "-7", "7x", "99999999999999999999"] {
        for command in [
            &["requeue-dead", "--coupon", id][..],
            &["purge-dead", "--yes", "--coupon", id][..],
            &["requeue-dead", &format!("--coupon={id}")][..],
        ] {
            let out = run_cli(&env, command);
            assert_eq!(out.status.code(), Some(64), "{command:?}: {out:?}");
            // (`--coupon -7` is refused by clap as an unknown option, before reading a value.)
            let read_as_a_value = !id.starts_with('-') || command.len() == 2;
            assert!(
                !read_as_a_value || String::from_utf8_lossy(&out.stderr).contains("couponId"),
                "{command:?} names what is wrong: {out:?}"
            );
        }
    }
    assert_eq!(
        stream_members(&env, &dead).await,
        vec!["1:7".to_owned(), "2:10".to_owned()],
        "nothing touched"
    );
    assert!(queued(&env, &env.keys().queue).await.is_empty());
    // The canonical form works.
    let out = run_cli(&env, &["requeue-dead", "--coupon", "10"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(stream_members(&env, &dead).await, vec!["1:7".to_owned()]);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_into_a_closed_pipe_ends_quietly_without_a_panic() {
    let env = TestEnv::new().await;
    healthy_worker_state(&env).await;
    let config = env.config_file();
    for args in [
        &["status", "--json"][..],
        &["status"][..],
        &["check-config"][..],
    ] {
        // `… | head -c 10` whose reader is gone before anything is written: every write fails
        // with EPIPE (Rust ignores SIGPIPE).
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .args(args)
            .env("RUST_LOG", "off")
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let status = crate::common::wait_exit(
            &mut child,
            std::time::Duration::from_secs(60),
            "commerce-worker did not exit within 60 s",
        )
        .await;
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        let out = (status, stderr.clone());
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(out.0.code(), Some(0), "{args:?} exits as it would: {out:?}");
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_while_the_drain_is_paused_says_so_decides_nothing_and_exits_75() {
    let env = TestEnv::new().await;
    env.set_stock(7, "5").await;
    env.enqueue(&[(1.0, "1:7".to_owned()), (2.0, "2:7".to_owned())])
        .await;
    let out = run_cli(&env, &["pause", "--drain"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = run_cli(&env, &["drain"]);
    assert_eq!(out.status.code(), Some(75), "EX_TEMPFAIL: {out:?}");
    let said = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("not drained: the drain is paused"), "{said}");
    assert!(said.contains("resume --drain"), "{said}");
    assert!(!stdout(&out).contains("drained: 0 decided"), "{said}");
    assert_eq!(
        queued(&env, &env.keys().queue).await.len(),
        2,
        "nothing decided"
    );

    let out = run_cli(&env, &["resume", "--drain"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = run_cli(&env, &["drain"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stdout(&out).contains("drained: 2 decided"), "{out:?}");
    assert!(queued(&env, &env.keys().queue).await.is_empty());
    env.cleanup().await;
}
