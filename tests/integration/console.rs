//! The operator's console: `requeue-dead` / `purge-dead` with filters and dry runs, `pause` /
//! `resume`, `status`, and the `/metrics` text exposition, against real Redis and MariaDB.

use std::process::{Command, Output, Stdio};

use commerce_worker::coupon::{DeadAction, DeadFilter, process_dead};
use commerce_worker::keys::KeyTemplates;
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
    let config = env.config_file(crate::common::free_port());
    Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .args(args)
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{e}"))
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
