//! `commerce-worker bench` at a tiny size: each benchmark runs end to end, makes its own
//! correctness checks (every request decided, every row landed once — a failed check exits
//! non-zero), prints its figures and ratio, and leaves no sandbox behind. No figure is asserted:
//! timings belong in BENCHMARKS.md, not in tests.
//!
//! "No sandbox behind" looks only at the sandboxes these runs name: other sessions may run
//! benchmarks at the same time, or have left sandboxes behind, on the same servers.

use std::process::Command;

use crate::common::{BIN, TestEnv};

fn bench(config: &std::path::Path, args: &[&str]) -> String {
    let output = crate::common::output_within(
        Command::new(BIN)
            .arg("--config")
            .arg(config)
            .arg("bench")
            .args(args),
        std::time::Duration::from_secs(600),
        "commerce-worker",
    );
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "bench {args:?} failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The sandboxes a benchmark's output names (`  sandbox cw_bench_…: keys under …`).
fn sandboxes(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|line| line.trim_start().strip_prefix("sandbox cw_bench_"))
        .filter_map(|rest| rest.split(':').next())
        .map(|suffix| format!("cw_bench_{suffix}"))
        .collect()
}

/// Fails the test if any of `names` left a database or a key behind.
async fn assert_removed(env: &TestEnv, names: &[String]) {
    for name in names {
        let databases: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?",
        )
        .bind(name)
        .fetch_one(&env.mysql)
        .await
        .unwrap();
        assert_eq!(databases, 0, "sandbox database {name} left behind");
        let keys = commerce_worker::backends::scan_keys(&env.redis, &format!("{name}:*"))
            .await
            .unwrap();
        assert!(keys.is_empty(), "sandbox {name} left keys: {keys:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_benchmark_runs_checks_itself_prints_its_ratio_and_cleans_up() {
    let env = TestEnv::new().await;
    let config = env.config_file();
    let cluster = crate::common::PrivateCluster::start();

    let coupon = bench(
        &config,
        &[
            "coupon",
            "--requests",
            "3000",
            "--coupons",
            "3",
            "--stock",
            "200",
            "--naive-requests",
            "600",
            "--cluster-url",
            &cluster.url(),
        ],
    );
    assert!(coupon.contains("decided 3 000 in"), "{coupon}");
    assert!(coupon.contains("realistic: decided"), "{coupon}");
    assert!(
        coupon.contains("while the log writer writes 3 000 waiting rows"),
        "{coupon}"
    );
    assert!(coupon.contains("600 issued coupons in MySQL"), "{coupon}");
    assert!(coupon.contains("worker / naive ="), "{coupon}");
    assert!(
        coupon.contains("cluster (per-coupon layout) / single Redis ="),
        "{coupon}"
    );
    let on_cluster: usize = cluster
        .ports
        .iter()
        .map(|port| {
            let out = crate::common::output_within(
                Command::new("redis-cli").args(["-p", &port.to_string(), "dbsize"]),
                std::time::Duration::from_secs(60),
                "redis-cli",
            );
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<usize>()
                .unwrap_or(1)
        })
        .sum();
    assert_eq!(
        on_cluster, 0,
        "the cluster sandbox was removed from every primary"
    );

    let ranking = bench(&config, &["ranking", "--products", "3000"]);
    assert!(ranking.contains("Zunionstore:"), "{ranking}");
    assert!(ranking.contains("Chunked:"), "{ranking}");
    assert!(ranking.contains("longest stall"), "{ranking}");

    let log = bench(&config, &["ranking-log", "--rows", "5000", "--runs", "2"]);
    assert!(log.contains("% of the grouped bare loop"), "{log}");
    assert!(
        log.contains("% of LOAD DATA") || log.contains("LOAD DATA INFILE: not measured"),
        "{log}"
    );
    assert!(log.contains("writer, burst"), "{log}");
    assert!(log.contains("median (min - max) of 2 runs"), "{log}");
    assert!(log.contains("writer, steady / grouped bare loop:"), "{log}");

    // Nothing left behind by these runs: no sandbox database, no sandbox keys.
    let names: Vec<String> = [&coupon, &ranking, &log]
        .into_iter()
        .flat_map(|output| sandboxes(output))
        .collect();
    // coupon: clean, realistic, naive, cluster and backlog sandboxes at the least; ranking-log:
    // one per run.
    assert!(names.len() >= 5, "sandboxes named: {names:?}");
    assert_removed(&env, &names).await;
    env.cleanup().await;
}
