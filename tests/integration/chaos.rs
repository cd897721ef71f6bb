//! `commerce-worker chaos` end to end: a short seeded run of the real binary (its own Redis,
//! MariaDB and worker replicas, a nemesis, the invariants checked at the end) must pass.
//!
//! The fault menu holds only faults the worker survives today. A fault is added here when the
//! fix it needs has landed; see README "Chaos runs" for the ones still left out.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::{BIN, wait_exit};

/// Faults the worker survives on main today. Left out until their fixes land (README "Chaos
/// runs"): `worker-kill`, `worker-replace`, `redis-kill`, `redis-reset`, `redis-lost-reply` (a
/// decided batch's ranking-log rows are lost when the process dies or the decide script's reply
/// is lost: issue 11). `redis-rollback`: every outcome, row and rank check passes since
/// reconciliation puts back the decisions a rollback forgot (issue 12, F4), but with the log
/// stream (issue 11) the rolled-back XACK/XDEL leave entries already in MySQL waiting in the
/// stream when the run turns quiet (seed 17: "370 rows waiting in the log streams").
const SURVIVED: &str = "worker-stop,mysql-kill,mysql-freeze,mysql-reset,mysql-lost-reply,redis-freeze,requeue-dead,pause";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_seeded_chaos_run_holds_every_invariant() {
    let out = tempfile::NamedTempFile::new().unwrap_or_else(|e| panic!("{e}"));
    let mut child = Command::new(BIN)
        .args([
            "chaos",
            "--seconds",
            "20",
            "--seed",
            "17",
            "--replicas",
            "2",
        ])
        .args(["--faults", SURVIVED])
        .stdout(out.reopen().unwrap_or_else(|e| panic!("{e}")))
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let status = wait_exit(
        &mut child,
        Duration::from_secs(300),
        "the chaos run to finish (20 s of sale, then healing and checks)",
    )
    .await;
    let report = std::fs::read_to_string(out.path()).unwrap_or_default();
    assert!(
        status.success() && report.contains("all checks passed"),
        "chaos run failed ({status}):\n{report}"
    );
    // The run really injected faults and checked something.
    assert!(report.contains("faults injected: "), "{report}");
    assert!(!report.contains("faults injected: none"), "{report}");
    assert!(
        report.contains("[ok] per coupon: initial stock"),
        "{report}"
    );
}
