//! The operator's console: `requeue-dead` / `purge-dead` with filters and dry runs, `pause` /
//! `resume`, `status`, and the `/metrics` text exposition, against real Redis and MariaDB.

use std::process::{Command, Output, Stdio};

use commerce_worker::coupon::{DeadAction, DeadFilter, process_dead};
use commerce_worker::keys::KeyTemplates;
use commerce_worker::outcome::Outcome;
use fred::prelude::*;

use crate::common::{BIN, TestEnv};

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
        .unwrap_or_else(|e| panic!("{e}"));
}

async fn stream_members(env: &TestEnv, stream: &str) -> Vec<String> {
    let entries: Vec<(String, std::collections::HashMap<String, String>)> = env
        .redis
        .xrange(stream, "-", "+", None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    entries
        .into_iter()
        .map(|(_, f)| f.get("member").cloned().unwrap_or_default())
        .collect()
}

async fn queued(env: &TestEnv, queue: &str) -> Vec<(String, f64)> {
    env.redis
        .zrange(queue, 0, -1, None, false, None, true)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
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
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(seen, vec!["1:7"]);
    assert_eq!((dry.looked_at, dry.matched, dry.done), (4, 1, 1));
    assert_eq!(
        stream_members(&env, &dead).await.len(),
        4,
        "a dry run moves nothing"
    );
    assert!(queued(&env, &env.keys().queue).await.is_empty());

    let done = process_dead(
        &env.redis,
        env.keys(),
        DeadAction::Requeue,
        &filter,
        false,
        |_| {},
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
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
    let done = process_dead(
        &env.redis,
        env.keys(),
        DeadAction::Requeue,
        &by_reason,
        false,
        |_| {},
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
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
    env.config.keys = KeyTemplates::per_coupon_layout().with_prefix(&format!("{}:", env.name));
    let keys = env.keys().clone();
    let _: i64 = env
        .redis
        .sadd(&keys.coupon_registry, vec!["7", "8"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    dead_letter(&env, &keys.for_coupon(7).dead, "1:7", "10", "wrong type: x").await;
    dead_letter(&env, &keys.for_coupon(8).dead, "1:8", "11", "wrong type: x").await;
    // Coupon 9 left the registry, but its dead letters are still reachable by name.
    dead_letter(&env, &keys.for_coupon(9).dead, "1:9", "12", "wrong type: x").await;

    let only_8 = DeadFilter {
        coupon: Some(8),
        reason: None,
    };
    let done = process_dead(
        &env.redis,
        &keys,
        DeadAction::Requeue,
        &only_8,
        false,
        |_| {},
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
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
    let purged = process_dead(&env.redis, &keys, DeadAction::Purge, &only_9, false, |_| {})
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(purged.done, 1);
    // Unfiltered: every registered coupon's stream.
    let all = process_dead(
        &env.redis,
        &keys,
        DeadAction::Purge,
        &DeadFilter::default(),
        false,
        |_| {},
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(all.done, 1, "only coupon 7's entry was left");
    env.cleanup().await;
}

/// `GET path` on 127.0.0.1:port with an `Accept` header: (status code, headers and body), or
/// (0, "") when nothing answers.
pub fn http_get(port: u16, path: &str, accept: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    );
    if stream.write_all(request.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    (code, response)
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
    let waiting: u64 = env
        .redis
        .zcard(&env.keys().queue)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
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
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(
        report[Outcome::Issued],
        1,
        "pausing persist does not pause deciding"
    );
    assert_eq!(
        pipeline
            .drain
            .persist_all()
            .await
            .unwrap_or_else(|e| panic!("{e:#}")),
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
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(report.stopped, commerce_worker::coupon::StopReason::Paused);
    assert_eq!(report.decided(), 0);
    assert_eq!(
        other
            .drain
            .persist_all()
            .await
            .unwrap_or_else(|e| panic!("{e:#}")),
        1
    );
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
    control
        .heartbeat(now)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
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
        .unwrap_or_else(|e| panic!("{e}"));
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
        .unwrap_or_else(|e| panic!("{e}"));
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
    env.config.keys = KeyTemplates::per_coupon_layout().with_prefix(&format!("{}:", env.name));
    healthy_worker_state(&env).await;
    let keys = env.keys().clone();
    let _: i64 = env
        .redis
        .sadd(&keys.coupon_registry, vec!["7", "8"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let now_ms = chrono::Utc::now().timestamp_millis() as f64;
    for (coupon, n) in [(7, 3), (8, 1)] {
        let entries: Vec<(f64, String)> =
            (1..=n).map(|u| (now_ms, format!("{u}:{coupon}"))).collect();
        let _: i64 = env
            .redis
            .zadd(
                &keys.for_coupon(coupon).queue,
                None,
                None,
                false,
                false,
                entries,
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
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
            std::env::var("CI").as_deref() != Ok("true"),
            "promtool is missing (Debian package prometheus; scripts/services.sh installs it)"
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
        use std::io::Write;
        let mut check = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"));
        if let Some(mut stdin) = check.stdin.take() {
            stdin
                .write_all(body.as_bytes())
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let out = check.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
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
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "").unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&good)
        .env(
            "REDIS_URL",
            "redis-sentinel://u:userpass1@s1:26379/0?sentinelServiceName=m&sentinelPassword=sentinelpass2",
        )
        .env("DATABASE_URL", "mysql://w:dbpass3@db:3306/shop?auth_token=tok4")
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
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
        std::fs::write(&bad, format!("[ranking]\nschedule = \"{schedule}\"\n"))
            .unwrap_or_else(|e| panic!("{e}"));
        let out = Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(&bad)
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
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
                    .unwrap_or_else(|e| panic!("{e}"));
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
        .unwrap_or_else(|e| panic!("{e:#}"));
    stop.cancel();
    let appended = writer.await.unwrap_or_else(|e| panic!("{e}"));
    assert!(appended > 0, "the concurrent dead-lettering never ran");
    assert_eq!(
        (report.looked_at, report.matched, report.done),
        (3000, 3000, 3000),
        "the walk must stop at the entry that was last when it started"
    );
    let requeued: u64 = env
        .redis
        .zcard(&env.keys().queue)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(requeued, 3000);
}
