//! When Redis forgets (docs/contract.md §2, README "When Redis forgets"): a Redis restarted from an
//! older snapshot is noticed before anything is decided against it, and reconciled from
//! `user_coupon`, so no coupon is issued beyond its stock and no user twice.

use std::collections::{BTreeSet, HashMap};

use commerce_worker::outcome::Outcome;
use fred::prelude::*;
use tokio_util::sync::CancellationToken;

use crate::common::{DRAIN_LIMIT, PrivateRedis, TestEnv, eventually, mysql_server_url};

fn member(user: i64, coupon: i64) -> String {
    format!("{user}:{coupon}")
}

async fn enqueue(env: &TestEnv, entries: Vec<(f64, String)>) {
    commerce_worker::tools::simulated_api::enqueue_members(&env.redis, env.keys(), entries)
        .await
        .unwrap();
}

async fn mysql_holders(env: &TestEnv, coupon: i64) -> Vec<i64> {
    sqlx::query_scalar("SELECT user_id FROM user_coupon WHERE coupon_id = ? ORDER BY user_id")
        .bind(coupon)
        .fetch_all(&env.mysql)
        .await
        .unwrap()
}

/// Rows ≤ the initial stock, Redis' holders are exactly MySQL's rows, initial = remaining +
/// holders (a user issued twice costs two), no user with two ISSUED ranking-log rows, and ranks
/// in ranking_logs never reused. ("Nobody twice" is not counted in `user_coupon`: its UNIQUE key
/// makes that count unable to fail.)
async fn assert_consistent(env: &TestEnv, coupon: i64, initial: i64) {
    let rows: BTreeSet<i64> = mysql_holders(env, coupon).await.into_iter().collect();
    assert!(
        rows.len() as i64 <= initial,
        "coupon {coupon}: {} rows for a stock of {initial}",
        rows.len()
    );
    assert_eq!(
        crate::invariants::holders(env, coupon).await,
        rows,
        "coupon {coupon}: Redis holders == MySQL rows"
    );
    let remaining: i64 = env.redis.get(env.keys().stock(coupon)).await.unwrap();
    assert_eq!(
        initial,
        remaining + rows.len() as i64,
        "coupon {coupon}: initial = remaining + holders"
    );
    let issued_twice: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT user_id FROM ranking_logs \
         WHERE coupon_type = ? AND status = 'ISSUED' GROUP BY user_id HAVING COUNT(*) > 1) t",
    )
    .bind(coupon.to_string())
    .fetch_one(&env.mysql)
    .await
    .unwrap();
    assert_eq!(
        issued_twice, 0,
        "coupon {coupon}: no user has two ISSUED ranking-log rows"
    );
    let reused: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) - COUNT(DISTINCT `rank`) FROM ranking_logs WHERE coupon_type = ?",
    )
    .bind(coupon.to_string())
    .fetch_one(&env.mysql)
    .await
    .unwrap();
    assert_eq!(reused, 0, "coupon {coupon}: no rank logged twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_from_an_older_snapshot_is_reconciled_before_new_requests_are_decided() {
    let mut redis = PrivateRedis::with_snapshots();
    let env = TestEnv::with_servers(&redis.url(), &mysql_server_url()).await;
    let coupon = 5;
    env.set_stock(coupon, "2").await;
    // The worker reconciles the empty Redis once (its marker goes into the snapshot), then the
    // snapshot is taken: stock 2, nobody holds the coupon.
    let first = env.pipeline();
    let reports = first.drain.reconcile_all(false).await.unwrap();
    assert!(reports.iter().all(|r| r.differing().next().is_none()));
    assert_eq!(redis.cli(&["SAVE"]).trim(), "OK");

    // Users 1001 and 1002 are issued and persisted; 1003 finds it sold out.
    enqueue(
        &env,
        vec![
            (1.0, member(1001, coupon)),
            (2.0, member(1002, coupon)),
            (3.0, member(1003, coupon)),
        ],
    )
    .await;
    let report = first
        .drain_within(DRAIN_LIMIT, "three requests for a stock of 2")
        .await;
    assert_eq!(
        (report[Outcome::Issued], report[Outcome::SoldOut]),
        (2, 1),
        "{report:?}"
    );
    first.finish().await;
    assert_eq!(mysql_holders(&env, coupon).await, vec![1001, 1002]);

    // Redis dies and comes back from the snapshot: stock 2 again, no holders, seq 0.
    redis.stop();
    redis.resume();
    let stock: String = env.redis.get(env.keys().stock(coupon)).await.unwrap();
    assert_eq!(stock, "2", "the restart rolled Redis back to the snapshot");

    // New requests arrive right away (scored now, as the API does: after the decisions, so
    // 1001's is a new request, not its first one put back); the worker (the same client,
    // reconnected) drains them.
    let now = now_ms();
    enqueue(
        &env,
        vec![
            (now + 10.0, member(2001, coupon)),
            (now + 11.0, member(2002, coupon)),
            (now + 12.0, member(1001, coupon)),
        ],
    )
    .await;
    let second = env.pipeline();
    let report = second
        .drain_within(DRAIN_LIMIT, "the requests after the rollback")
        .await;
    second.finish().await;
    assert_eq!(
        (
            report[Outcome::Issued],
            report[Outcome::SoldOut],
            report[Outcome::Duplicate]
        ),
        (0, 2, 1),
        "nothing issued beyond the stock: {report:?}"
    );
    let results: HashMap<String, String> =
        env.redis.hgetall(env.keys().result(coupon)).await.unwrap();
    assert_eq!(
        results.get("1002").map(String::as_str),
        Some("ISSUED"),
        "restored holders answer ISSUED again: {results:?}"
    );
    assert_eq!(
        results.get("2001").map(String::as_str),
        Some("SOLD_OUT"),
        "{results:?}"
    );
    assert_consistent(&env, coupon, 2).await;
    let max_rank: i64 = sqlx::query_scalar(
        "SELECT CAST(MAX(`rank`) AS SIGNED) FROM ranking_logs WHERE coupon_type = ?",
    )
    .bind(coupon.to_string())
    .fetch_one(&env.mysql)
    .await
    .unwrap();
    assert_eq!(
        max_rank, 6,
        "ranks went on from the logged ones (1..3, then 4..6)"
    );
    env.cleanup().await;
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_dry_run_lists_exactly_the_broken_coupons_and_the_repair_fixes_them() {
    let mut env = TestEnv::new().await;
    env.use_per_coupon_layout();
    let coupons = [11, 12, 13];
    for c in coupons {
        env.set_stock(c, "5").await;
    }
    enqueue(
        &env,
        coupons
            .iter()
            .flat_map(|&c| (1..=3).map(move |u| ((u * 10 + c) as f64, member(u, c))))
            .collect(),
    )
    .await;
    let pipeline = env.pipeline();
    let report = pipeline
        .drain_within(DRAIN_LIMIT, "three users for each of three coupons")
        .await;
    assert_eq!(report[Outcome::Issued], 9, "{report:?}");
    let clean = pipeline.drain.reconcile_all(true).await.unwrap();
    assert!(
        clean.iter().all(|r| r.differing().next().is_none()),
        "{clean:?}"
    );

    // By hand: coupon 12 forgets user 2, coupon 13 forgets users 1 and 3 (stock put back).
    let _: i64 = env.redis.srem(env.keys().issued(12), "2").await.unwrap();
    let _: i64 = env
        .redis
        .srem(env.keys().issued(13), vec!["1", "3"])
        .await
        .unwrap();
    env.set_stock(13, "4").await;

    let dry = pipeline.drain.reconcile_all(true).await.unwrap();
    let broken: Vec<(i64, u64)> = dry
        .iter()
        .flat_map(|r| r.differing())
        .map(|c| (c.coupon_id, c.missing))
        .collect();
    assert_eq!(broken, vec![(12, 1), (13, 2)]);
    let still: u64 = env.redis.scard(env.keys().issued(13)).await.unwrap();
    assert_eq!(still, 1, "a dry run changes nothing");

    let repaired = pipeline.drain.reconcile_all(false).await.unwrap();
    assert_eq!(
        repaired
            .iter()
            .flat_map(|r| r.differing())
            .map(|c| (c.coupon_id, c.missing, c.taken))
            .collect::<Vec<_>>(),
        vec![(12, 1, 1), (13, 2, 2)]
    );
    assert_consistent(&env, 13, 5).await;
    // Coupon 12's stock was never put back by hand: the repair took one more than it should
    // have, which is what the dry run's figures show an operator beforehand.
    let again = pipeline.drain.reconcile_all(true).await.unwrap();
    assert!(
        again.iter().all(|r| r.differing().next().is_none()),
        "{again:?}"
    );
    pipeline.finish().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_with_more_holders_than_stock_left_stops_the_stock_at_zero_and_counts_the_rest() {
    let env = TestEnv::new().await;
    env.set_stock(21, "5").await;
    enqueue(&env, (1..=3).map(|u| (u as f64, member(u, 21))).collect()).await;
    let pipeline = env.pipeline();
    let report = pipeline
        .drain_within(DRAIN_LIMIT, "three users for coupon 21")
        .await;
    assert_eq!(report[Outcome::Issued], 3, "{report:?}");
    pipeline.drain.persist_all().await.unwrap();
    assert_eq!(mysql_holders(&env, 21).await, vec![1, 2, 3]);
    // Redis forgets all three holders but keeps the stock they took (2 left): the repair must
    // take 3 and can take only 2. docs/contract.md §2: "stock decremented (never below 0)".
    let _: i64 = env.redis.del(env.keys().issued(21)).await.unwrap();
    let repaired = pipeline.drain.reconcile_all(false).await.unwrap();
    let coupon = repaired
        .iter()
        .flat_map(|r| r.differing())
        .find(|c| c.coupon_id == 21)
        .unwrap_or_else(|| panic!("coupon 21 not repaired: {repaired:?}"));
    assert_eq!(
        (
            coupon.missing,
            coupon.taken,
            coupon.unexplained,
            coupon.stock_after
        ),
        (3, 2, 1, Some(0)),
        "{coupon:?}"
    );
    let stock: i64 = env.redis.get(env.keys().stock(21)).await.unwrap();
    assert_eq!(stock, 0, "the repair never takes the stock below 0");
    assert_eq!(
        crate::invariants::holders(&env, 21).await,
        BTreeSet::from([1, 2, 3]),
        "every MySQL holder is restored, even the one the stock cannot explain"
    );
    pipeline.finish().await;
    env.cleanup().await;
}

fn reconcile_command(config: &std::path::Path, dry_run: bool) -> (Option<i32>, String) {
    let mut command = std::process::Command::new(crate::common::BIN);
    command.arg("reconcile").arg("--config").arg(config);
    if dry_run {
        command.arg("--dry-run");
    }
    let out = crate::common::output_within(
        command.env("RUST_LOG", "off"),
        std::time::Duration::from_secs(60),
        "commerce-worker reconcile",
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconcile_command_exits_1_listing_broken_coupons_on_a_dry_run_and_0_once_repaired() {
    let env = TestEnv::new().await;
    for c in [31, 32] {
        env.set_stock(c, "3").await;
    }
    enqueue(
        &env,
        vec![
            (1.0, member(1, 31)),
            (2.0, member(2, 31)),
            (3.0, member(1, 32)),
        ],
    )
    .await;
    let pipeline = env.pipeline();
    let report = pipeline
        .drain_within(DRAIN_LIMIT, "three requests for two coupons")
        .await;
    assert_eq!(report[Outcome::Issued], 3, "{report:?}");
    pipeline.finish().await;
    let config = env.config_file();
    let (code, out) = reconcile_command(&config, true);
    assert_eq!(code, Some(0), "consistent: {out}");

    // By hand: coupon 32 forgets its holder and gets its stock back.
    let _: i64 = env.redis.srem(env.keys().issued(32), "1").await.unwrap();
    env.set_stock(32, "3").await;
    let (code, out) = reconcile_command(&config, true);
    assert_eq!(code, Some(1), "differences found: {out}");
    let listed: Vec<&str> = out.lines().filter(|l| l.starts_with("coupon ")).collect();
    assert_eq!(listed.len(), 1, "{out}");
    assert!(listed[0].starts_with("coupon 32: 1 rows"), "{out}");

    let (code, out) = reconcile_command(&config, false);
    assert_eq!(code, Some(0), "repaired: {out}");
    assert_consistent(&env, 32, 3).await;
    let (code, out) = reconcile_command(&config, true);
    assert_eq!(code, Some(0), "consistent after the repair: {out}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coupon_retired_from_the_registry_while_mysql_is_down_still_reaches_mysql() {
    let mut db = crate::common::PrivateMariadb::start();
    let mut env = TestEnv::with_servers(&crate::common::redis_url(), &db.server_url()).await;
    env.use_per_coupon_layout();
    let coupon = 41;
    env.set_stock(coupon, "5").await;
    enqueue(
        &env,
        (1..=3).map(|u| (u as f64, member(u, coupon))).collect(),
    )
    .await;
    let pipeline = env.pipeline();
    pipeline.drain.reconcile_all(false).await.unwrap();

    // MySQL goes down; the drain issues three coupons into the coupon's outbox.
    db.kill();
    let report = pipeline
        .drain
        .tick(
            std::time::Duration::from_secs(10),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(report[Outcome::Issued], 3, "{report:?}");
    let outbox = env.keys().for_coupon(coupon).outbox;
    let waiting: u64 = env.redis.zcard(&outbox).await.unwrap();
    assert_eq!(waiting, 3);

    // The API retires the coupon while its issued coupons still wait for MySQL.
    let _: i64 = env
        .redis
        .srem(&env.keys().coupon_registry, coupon.to_string())
        .await
        .unwrap();
    db.resume();
    pipeline
        .drain_within(
            DRAIN_LIMIT,
            "the retired coupon's outbox after MySQL's return",
        )
        .await;
    pipeline.finish().await;
    assert_eq!(mysql_holders(&env, coupon).await, vec![1, 2, 3]);
    let left: u64 = env.redis.zcard(&outbox).await.unwrap();
    assert_eq!(left, 0, "the retired coupon's outbox is empty");
    env.cleanup().await;
    drop(db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issued_coupons_land_through_new_connections_when_mysql_connections_freeze() {
    use commerce_worker::tools::fault_proxy::FaultProxy;
    let server = mysql_server_url();
    let proxy = FaultProxy::start(crate::common::mysql_addr())
        .await
        .unwrap();
    let env = TestEnv::with_servers(
        &crate::common::redis_url(),
        &format!("mysql://root@{}", proxy.addr()),
    )
    .await;
    let coupon = 51;
    env.set_stock(coupon, "100").await;
    let pipeline = env.pipeline();
    pipeline.drain.reconcile_all(false).await.unwrap();

    // The persister's insert transaction is made to wait on its fence row (a lock held from a
    // connection that bypasses the proxy); while it waits, every open connection freezes (a
    // hung server behind a name) and new ones pass. The reply to the waiting statement never
    // comes: only the deadline gets the rows in.
    let direct = sqlx::MySqlPool::connect(&format!("{server}/{}", env.name))
        .await
        .unwrap();
    let mut locker = direct.begin().await.unwrap();
    let _: Vec<String> = sqlx::query_scalar("SELECT identity FROM redis_fence FOR UPDATE")
        .fetch_all(&mut *locker)
        .await
        .unwrap();
    enqueue(
        &env,
        (1..=60).map(|u| (u as f64, member(u, coupon))).collect(),
    )
    .await;
    let drained = pipeline.spawn_drain();
    let waited_since = std::time::Instant::now();
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST \
             WHERE DB = ? AND INFO LIKE CONCAT('%LOCK IN ', 'SHARE MODE%')",
        )
        .bind(&env.name)
        .fetch_one(&direct)
        .await
        .unwrap();
        // (The pattern is split so that this query does not match itself.)
        if waiting > 0 {
            break;
        }
        assert!(
            waited_since.elapsed() < std::time::Duration::from_secs(30),
            "the persister never reached its fence row"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let frozen = proxy.freeze_existing();
    assert!(frozen > 0, "the persister's connection was frozen");
    locker.commit().await.unwrap();
    drained
        .within(
            DRAIN_LIMIT,
            "the outbox to reach MySQL while a connection hung mid-statement",
        )
        .await;
    assert_eq!(mysql_holders(&env, coupon).await.len(), 60);
    let accepted = proxy.connections_accepted();
    assert!(
        accepted > frozen as u64,
        "rows went through new connections ({accepted} accepted, {frozen} frozen)"
    );
    direct.close().await;
    proxy.thaw();
    pipeline.finish().await;
    env.cleanup().await;
    proxy.stop().await;
}

/// The replica stops receiving (its link to the primary freezes) while the worker issues and
/// persists; the primary is SIGKILLed and Sentinel promotes the stale replica; new requests
/// arrive. Reached through a `redis-sentinel://` URL with the sentinels' own password.
async fn failover_to_a_stale_replica(min_replicas_acked: u32) {
    let mut set = crate::common::PrivateSentinelSet::start().await;
    let mut env = TestEnv::with_servers(&set.url(), &mysql_server_url()).await;
    env.config.redis.min_replicas_acked = min_replicas_acked;
    let coupon = 61;
    env.set_stock(coupon, "3").await;
    let pipeline = env.pipeline();
    pipeline.drain.reconcile_all(false).await.unwrap();
    set.wait_until("the marker reached the replica", || {
        set.replica_cli(&["DBSIZE"]).trim() != "0"
    });

    // The replica falls behind: nothing the primary writes from now on reaches it.
    assert!(set.link.freeze_existing() > 0);
    enqueue(
        &env,
        (1..=5).map(|u| (u as f64, member(u, coupon))).collect(),
    )
    .await;
    let report = pipeline
        .drain
        .tick(
            std::time::Duration::from_secs(10),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(report[Outcome::Issued], 3, "{report:?}");
    let persisted = pipeline.drain.persist_all().await;
    if min_replicas_acked == 0 {
        assert_eq!(persisted.ok(), Some(3), "persisted at once");
    } else {
        let error = match &persisted {
            Ok(n) => format!(
                "persisted {n}; primary: {}",
                set.primary.cli(&["INFO", "replication"])
            ),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            error.contains("replicas required"),
            "the outbox waits for the replica: {error}"
        );
        assert!(mysql_holders(&env, coupon).await.is_empty());
    }
    // The three ISSUED rows reach ranking_logs (the users were told ISSUED).
    crate::common::eventually(
        std::time::Duration::from_secs(30),
        "the three ISSUED rows in ranking_logs",
        async || {
            logged(&env, coupon)
                .await
                .iter()
                .filter(|r| r.2 == "ISSUED")
                .count()
                == 3
        },
    )
    .await;

    set.kill_primary_and_fail_over();
    assert_eq!(
        set.replica_cli(&["SCARD", &env.keys().issued(coupon)])
            .trim(),
        "0",
        "the promoted replica is stale: it never saw the three issued coupons"
    );
    if min_replicas_acked > 0 {
        // The old primary comes back empty and Sentinel makes it the new primary's replica, so
        // that decisions can reach a replica again.
        set.restart_old_primary_as_replica();
    }
    enqueue(
        &env,
        (101..=105).map(|u| (u as f64, member(u, coupon))).collect(),
    )
    .await;
    pipeline
        .drain_within(DRAIN_LIMIT, "the new requests, on the new primary")
        .await;
    pipeline.finish().await;
    assert_consistent(&env, coupon, 3).await;
    // With min_replicas_acked the persister never wrote what the replica lacked (asserted
    // above); reconciliation honoured the ISSUED rows in ranking_logs instead (issue 12: a user
    // told ISSUED keeps the coupon), so the new requests found it sold out either way.
    assert_eq!(
        mysql_holders(&env, coupon).await,
        vec![1, 2, 3],
        "the issued holders were restored (from user_coupon or their ISSUED log rows), nobody else issued"
    );
    env.cleanup().await;
    drop(set);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_to_a_stale_replica_never_over_issues() {
    failover_to_a_stale_replica(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_min_replicas_acked_the_persister_waits_and_reconciliation_honours_the_logged_issues()
{
    failover_to_a_stale_replica(1).await;
}

/// `(user, rank, status)` of every ranking_logs row of `coupon`, in rank order.
async fn logged(env: &TestEnv, coupon: i64) -> Vec<(i64, i64, String)> {
    sqlx::query_as(
        "SELECT user_id, CAST(`rank` AS SIGNED), CAST(COALESCE(reason, status) AS CHAR) \
         FROM ranking_logs WHERE coupon_type = ? ORDER BY `rank`, id",
    )
    .bind(coupon.to_string())
    .fetch_all(&env.mysql)
    .await
    .unwrap()
}

fn now_ms() -> f64 {
    chrono::Utc::now().timestamp_millis() as f64
}

/// docs/contract.md §2: after a rollback, a queue entry scored *no later than* a forgotten row's
/// `timestamp` is that request (removed, one outcome); one scored later is a new request. The
/// boundary, to the millisecond: an entry scored exactly at the decision time is the same request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_scored_exactly_at_its_forgotten_decision_is_that_request_and_one_later_is_new() {
    let env = TestEnv::new().await;
    let coupon = 31;
    env.set_stock(coupon, "5").await;
    let t0 = now_ms() - 1000.0;
    enqueue(
        &env,
        vec![(t0, member(1, coupon)), (t0 + 1.0, member(2, coupon))],
    )
    .await;
    let pipeline = env.pipeline();
    let report = pipeline.drain_within(DRAIN_LIMIT, "users 1 and 2").await;
    assert_eq!(report[Outcome::Issued], 2, "{report:?}");
    pipeline.finish().await;
    let decided: Vec<(i64, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT user_id, `timestamp` FROM ranking_logs WHERE coupon_type = ? ORDER BY `rank`",
    )
    .bind(coupon.to_string())
    .fetch_all(&env.mysql)
    .await
    .unwrap();
    assert_eq!(decided.iter().map(|d| d.0).collect::<Vec<_>>(), vec![1, 2]);
    let at = |user: usize| decided[user - 1].1.timestamp_millis() as f64;

    // Redis rolls back to before both decisions: seq, holders, results and stock as at the
    // start, and the queue holds user 1's request scored exactly at its decision time and a
    // request of user 2 scored one millisecond after its decision (a new request).
    let keys = env.keys();
    let _: i64 = env
        .redis
        .del(vec![
            keys.seq(coupon),
            keys.issued(coupon),
            keys.result(coupon),
        ])
        .await
        .unwrap();
    env.set_stock(coupon, "5").await;
    enqueue(
        &env,
        vec![(at(1), member(1, coupon)), (at(2) + 1.0, member(2, coupon))],
    )
    .await;

    let second = env.pipeline();
    let repaired = second.drain.reconcile_all(false).await.unwrap();
    let c = repaired
        .iter()
        .flat_map(|lane| lane.coupons.iter())
        .find(|c| c.coupon_id == coupon)
        .unwrap_or_else(|| panic!("coupon {coupon} not reported: {repaired:?}"));
    assert_eq!(
        (c.forgotten, c.requeued),
        (2, 1),
        "two forgotten decisions; only the entry scored at its decision time is that request: {c:?}"
    );
    let report = second
        .drain_within(DRAIN_LIMIT, "what the rollback left queued")
        .await;
    assert_eq!(
        (report.decided(), report[Outcome::Duplicate]),
        (1, 1),
        "only user 2's later request is decided (a holder: DUPLICATE): {report:?}"
    );
    second.finish().await;
    let users: Vec<i64> = logged(&env, coupon).await.iter().map(|r| r.0).collect();
    assert_eq!(
        users,
        vec![1, 2, 2],
        "one row per request, none for user 1 twice"
    );
    assert_consistent(&env, coupon, 5).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_a_rollback_puts_back_in_the_queue_keep_their_one_logged_outcome() {
    let mut redis = PrivateRedis::with_snapshots();
    let env = TestEnv::with_servers(&redis.url(), &mysql_server_url()).await;
    let coupon = 6;
    env.set_stock(coupon, "3").await;
    let first = env.pipeline();
    first.drain.reconcile_all(false).await.unwrap();
    // The snapshot holds five queued requests, nothing decided.
    let t0 = now_ms() - 1000.0;
    enqueue(
        &env,
        (1..=5)
            .map(|user| (t0 + user as f64, member(user, coupon)))
            .collect(),
    )
    .await;
    assert_eq!(redis.cli(&["SAVE"]).trim(), "OK");

    // After the snapshot: they are decided (1-3 issued, 4-5 sold out), as is a sixth request
    // (sold out) enqueued after the snapshot; rows and coupons reach MySQL.
    let report = first
        .drain_within(DRAIN_LIMIT, "the five requests of the snapshot")
        .await;
    assert_eq!(report[Outcome::Issued], 3, "{report:?}");
    enqueue(&env, vec![(now_ms(), member(6, coupon))]).await;
    let report = first
        .drain_within(DRAIN_LIMIT, "the request after the snapshot")
        .await;
    assert_eq!(report[Outcome::SoldOut], 1, "{report:?}");
    first.finish().await;
    assert_eq!(logged(&env, coupon).await.len(), 6);
    // User 3's coupon is as if its outbox entry had been rolled back before the persister wrote
    // it: only its ISSUED row in ranking_logs knows it.
    sqlx::query("DELETE FROM user_coupon WHERE coupon_id = ? AND user_id = 3")
        .bind(coupon)
        .execute(&env.mysql)
        .await
        .unwrap();

    // kill -9, restart from the snapshot: the five requests are queued again, seq 0, stock 3.
    redis.stop();
    redis.resume();
    let queued: i64 = env.redis.zcard(&env.keys().queue).await.unwrap();
    assert_eq!(
        queued, 5,
        "the restart rolled the queue back to the snapshot"
    );
    // User 6, told SOLD_OUT, asks again: a new request, to be decided.
    enqueue(&env, vec![(now_ms() + 1.0, member(6, coupon))]).await;

    let second = env.pipeline();
    let dry = second.drain.reconcile_all(true).await.unwrap();
    let c = dry
        .iter()
        .flat_map(|lane| lane.coupons.iter())
        .find(|c| c.coupon_id == coupon)
        .unwrap_or_else(|| panic!("coupon {coupon} not reported: {dry:?}"));
    assert_eq!(
        (c.forgotten, c.requeued, c.reissued, c.missing, c.taken),
        (6, 5, 1, 2, 3),
        "the dry run reports the forgotten decisions: {c:?}"
    );
    let report = second
        .drain_within(DRAIN_LIMIT, "the requests put back by the rollback")
        .await;
    assert_eq!(
        (report.decided(), report[Outcome::SoldOut]),
        (1, 1),
        "only user 6's new request is decided: {report:?}"
    );
    second.finish().await;

    // Each request has exactly one row, ranks 1..n.
    let rows = logged(&env, coupon).await;
    let ranks: Vec<i64> = rows.iter().map(|r| r.1).collect();
    assert_eq!(ranks, (1..=7).collect::<Vec<i64>>(), "{rows:?}");
    let mut per_user: HashMap<i64, Vec<String>> = HashMap::new();
    for (user, _, outcome) in &rows {
        per_user.entry(*user).or_default().push(outcome.clone());
    }
    let expected: HashMap<i64, Vec<String>> = [
        (1, vec!["ISSUED"]),
        (2, vec!["ISSUED"]),
        (3, vec!["ISSUED"]),
        (4, vec!["SOLD_OUT"]),
        (5, vec!["SOLD_OUT"]),
        (6, vec!["SOLD_OUT", "SOLD_OUT"]),
    ]
    .into_iter()
    .map(|(u, o)| (u, o.into_iter().map(str::to_owned).collect()))
    .collect();
    assert_eq!(per_user, expected, "one row per request: {rows:?}");
    let results: HashMap<String, String> =
        env.redis.hgetall(env.keys().result(coupon)).await.unwrap();
    let expected: HashMap<String, String> = [
        ("1", "ISSUED"),
        ("2", "ISSUED"),
        ("3", "ISSUED"),
        ("4", "SOLD_OUT"),
        ("5", "SOLD_OUT"),
        ("6", "SOLD_OUT"),
    ]
    .into_iter()
    .map(|(u, o)| (u.to_owned(), o.to_owned()))
    .collect();
    assert_eq!(results, expected, "the result hash");
    // User 3's coupon went back through the outbox into user_coupon; stock 0, holders 1-3.
    assert_eq!(mysql_holders(&env, coupon).await, vec![1, 2, 3]);
    assert_consistent(&env, coupon, 3).await;
    // A second reconciliation finds nothing left to do.
    let again = env.pipeline();
    let reports = again.drain.reconcile_all(false).await.unwrap();
    again.finish().await;
    assert!(
        reports.iter().all(|r| r.differing().next().is_none()),
        "{reports:?}"
    );
    env.cleanup().await;
    drop(redis);
}

/// `coupon` with a stock of 5, and user 1's request for it decided and persisted by the
/// returned pipeline (which wrote the fence row on the way).
async fn first_coupon_issued(env: &TestEnv, coupon: i64) -> crate::common::Pipeline {
    env.set_stock(coupon, "5").await;
    enqueue(env, vec![(1.0, member(1, coupon))]).await;
    let pipeline = env.pipeline();
    pipeline
        .drain_within(DRAIN_LIMIT, "the first request")
        .await;
    pipeline
}

async fn fence_rows(env: &TestEnv) -> Vec<String> {
    sqlx::query_scalar("SELECT identity FROM redis_fence")
        .fetch_all(&env.mysql)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_redis_fence_row_is_reconciled_again_and_persisting_goes_on() {
    let env = TestEnv::new().await;
    let coupon = 61;
    let pipeline = first_coupon_issued(&env, coupon).await;
    assert_eq!(mysql_holders(&env, coupon).await, vec![1]);

    // MySQL restored from a backup taken before the first reconciliation, or truncated.
    sqlx::query("DELETE FROM redis_fence")
        .execute(&env.mysql)
        .await
        .unwrap();
    enqueue(&env, vec![(2.0, member(2, coupon))]).await;
    pipeline
        .drain_within(
            DRAIN_LIMIT,
            "the request queued after redis_fence was emptied",
        )
        .await;
    assert_eq!(mysql_holders(&env, coupon).await, vec![1, 2]);
    assert_eq!(fence_rows(&env).await.len(), 1, "the fence row is back");
    pipeline.finish().await;
    assert_consistent(&env, coupon, 5).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_fence_naming_another_redis_stops_persisting_until_reconcile_rewrites_it() {
    let env = TestEnv::new().await;
    let coupon = 62;
    let pipeline = first_coupon_issued(&env, coupon).await;

    // A second deployment (or a restored MySQL) names another Redis in the fence.
    sqlx::query("UPDATE redis_fence SET identity = 'another:redis'")
        .execute(&env.mysql)
        .await
        .unwrap();
    enqueue(&env, vec![(2.0, member(2, coupon))]).await;
    let stop = CancellationToken::new();
    let report = pipeline.tick(&stop).await;
    assert_eq!(report[Outcome::Issued], 1, "{report:?}");
    let refused = pipeline.drain.persist_all().await;
    let error = format!("{:#}", refused.expect_err("the fence names another Redis"));
    assert!(error.contains("another:redis"), "{error}");
    assert!(
        pipeline.drain.metrics().coupon_fence_conflicts.get() >= 1,
        "the conflict is counted"
    );
    assert_eq!(mysql_holders(&env, coupon).await, vec![1], "not taken over");
    assert_eq!(fence_rows(&env).await, vec!["another:redis".to_owned()]);

    let dry = pipeline.drain.reconcile_all(true).await.unwrap();
    assert!(dry.iter().any(|r| r.fence_differs()), "{dry:?}");
    let config = env.config_file();
    let (code, out) = reconcile_command(&config, true);
    assert_eq!(code, Some(1), "the dry run reports the fence: {out}");
    assert!(out.contains("another:redis"), "{out}");

    let (code, out) = reconcile_command(&config, false);
    assert_eq!(code, Some(0), "the operator's reconcile rewrites it: {out}");
    pipeline
        .drain_within(DRAIN_LIMIT, "the request refused by the fence")
        .await;
    assert_eq!(mysql_holders(&env, coupon).await, vec![1, 2]);
    let (code, out) = reconcile_command(&config, true);
    assert_eq!(code, Some(0), "consistent afterwards: {out}");
    pipeline.finish().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workers_mysql_sessions_drop_hung_clients_and_locks_within_a_minute() {
    let env = TestEnv::new().await;
    let pool = commerce_worker::backends::connect_mysql(&env.config.mysql)
        .await
        .unwrap();
    let (wait, lock_wait): (u64, u64) =
        sqlx::query_as("SELECT @@SESSION.wait_timeout, @@SESSION.innodb_lock_wait_timeout")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(wait, 60, "wait_timeout: a few times the 10 s deadline");
    assert!(
        lock_wait < 10,
        "a blocked statement errors before the 10 s deadline: {lock_wait}"
    );
    pool.close().await;
    env.cleanup().await;
}

/// Waits until `replica` holds every write `primary` had taken when this was called.
fn wait_in_sync(primary: &PrivateRedis, replica: &PrivateRedis) {
    let offset = |info: &str, field: &str| {
        info.lines()
            .find_map(|l| l.trim().strip_prefix(field))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let target = offset(
        &primary.cli(&["INFO", "replication"]),
        "master_repl_offset:",
    )
    .expect("the primary's replication offset");
    let started = std::time::Instant::now();
    loop {
        let info = replica.cli(&["INFO", "replication"]);
        if info.contains("master_link_status:up")
            && offset(&info, "slave_repl_offset:").is_some_and(|o| o >= target)
        {
            return;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "the replica did not catch up with offset {target} within 60 s: {info}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A counter's value in the Prometheus text of `metrics` (0 when it is not there).
fn counter(metrics: &commerce_worker::metrics::Metrics, name: &str) -> f64 {
    metrics
        .encode_text()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Split brain after a failover (chaos seed 20261125): the promoted replica is reconciled and
/// decides the queued requests, while a replica still connected to the old primary — which keeps
/// taking writes until Sentinel demotes it — decides the same requests there, with the same
/// ranks. Those decisions die with the old primary (its outbox is fenced off); their log rows
/// must not reach ranking_logs either: one row per request, ranks 1..n, whatever the old primary
/// says.
async fn an_old_primary_deciding_after_a_failover_logs_nothing(per_coupon: bool) {
    let old = PrivateRedis::start();
    let new = PrivateRedis::start();
    new.cli(&["REPLICAOF", "127.0.0.1", &old.port.to_string()]);
    let mut env = TestEnv::with_servers(&old.url(), &mysql_server_url()).await;
    if per_coupon {
        env.use_per_coupon_layout();
    }
    let coupon = 71;
    env.set_stock(coupon, "100").await;
    let t0 = now_ms() - 10_000.0;
    let requests = |users: std::ops::RangeInclusive<i64>| -> Vec<(f64, String)> {
        users.map(|u| (t0 + u as f64, member(u, coupon))).collect()
    };
    enqueue(&env, requests(1..=5)).await;
    let old_metrics = commerce_worker::metrics::Metrics::new();
    let on_old = env.pipeline_with(env.redis.clone(), &old_metrics);
    let report = on_old
        .drain_within(DRAIN_LIMIT, "users 1-5 on the old primary")
        .await;
    assert_eq!(report[Outcome::Issued], 5, "{report:?}");
    crate::common::eventually(DRAIN_LIMIT, "ranks 1-5 in ranking_logs", async || {
        logged(&env, coupon).await.len() == 5
    })
    .await;
    // Five more requests reach the replica, undecided; then the replica is promoted while the
    // old primary stays a primary.
    enqueue(&env, requests(6..=10)).await;
    wait_in_sync(&old, &new);
    new.cli(&["REPLICAOF", "NO", "ONE"]);

    // A replica that reached the new primary reconciles it and decides users 6-10: ranks 6-10.
    let on_new = env.pipeline_on(env.redis_at(&new.url()).await);
    let report = on_new
        .drain_within(DRAIN_LIMIT, "users 6-10 on the new primary")
        .await;
    assert_eq!(report[Outcome::Issued], 5, "{report:?}");
    crate::common::eventually(DRAIN_LIMIT, "ranks 6-10 in ranking_logs", async || {
        logged(&env, coupon).await.len() == 10
    })
    .await;

    // The replica still on the old primary decides the same five requests there.
    let report = on_old
        .drain
        .tick(
            std::time::Duration::from_secs(10),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(
        report[Outcome::Issued],
        5,
        "decided again on the old primary: {report:?}"
    );
    // Its log writer has those rows in hand: written (the defect), or refused by the fence.
    crate::common::eventually(
        DRAIN_LIMIT,
        "the old primary's rows written or refused",
        async || {
            logged(&env, coupon).await.len() > 10
                || counter(
                    &old_metrics,
                    "commerce_worker_ranking_log_entries_fenced_total",
                ) > 0.0
        },
    )
    .await;
    on_old.abandon().await;
    on_new.finish().await;

    let rows = logged(&env, coupon).await;
    assert_eq!(
        rows.iter().map(|r| (r.0, r.1)).collect::<Vec<_>>(),
        (1..=10).map(|u| (u, u)).collect::<Vec<_>>(),
        "one row per request, ranks 1..10, none from the old primary after the new one was reconciled: {rows:?}"
    );
    assert_eq!(
        mysql_holders(&env, coupon).await,
        (1..=10).collect::<Vec<_>>()
    );
    env.cleanup().await;
    drop((old, new));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_primary_deciding_after_a_failover_logs_nothing_single_queue() {
    an_old_primary_deciding_after_a_failover_logs_nothing(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_primary_deciding_after_a_failover_logs_nothing_per_coupon() {
    an_old_primary_deciding_after_a_failover_logs_nothing(true).await;
}

/// A coupon in `user_coupon` whose ISSUED decision Redis forgot *and* whose log row never
/// reached ranking_logs (chaos seed 20261126: an old primary's persister inserted it before the
/// promoted replica was reconciled, its log row was still in the old primary's stream, fenced off
/// since). Reconciliation restores the holder; the request that issued it is still queued (scored
/// before the issue time) and must keep its one outcome, ISSUED, with one row saying so — not be
/// decided again as the holder's DUPLICATE. A later request of the same user stays a DUPLICATE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_holder_whose_issuing_request_is_still_queued_is_logged_issued_once() {
    let env = TestEnv::new().await;
    let coupon = 81;
    env.set_stock(coupon, "5").await;
    let t0 = now_ms() - 10_000.0;
    enqueue(
        &env,
        vec![(t0, member(1, coupon)), (t0 + 1.0, member(2, coupon))],
    )
    .await;
    let pipeline = env.pipeline();
    let report = pipeline.drain_within(DRAIN_LIMIT, "users 1 and 2").await;
    assert_eq!(report[Outcome::Issued], 2, "{report:?}");
    // User 3's request is queued; another Redis (since replaced) decided it ISSUED at t0 + 10 and
    // its coupon reached user_coupon, its log row did not. User 4's request came after that
    // decision: a new request, not the one that issued user 4's coupon (issued at t0 + 3).
    enqueue(
        &env,
        vec![
            (t0 + 5.0, member(3, coupon)),
            (t0 + 20.0, member(4, coupon)),
        ],
    )
    .await;
    for (user, issued_ms) in [(3, t0 + 10.0), (4, t0 + 3.0)] {
        sqlx::query("INSERT INTO user_coupon (user_id, coupon_id, issued_at) VALUES (?, ?, ?)")
            .bind(user)
            .bind(coupon)
            .bind(
                chrono::DateTime::from_timestamp_millis(issued_ms as i64)
                    .unwrap()
                    .naive_utc(),
            )
            .execute(&env.mysql)
            .await
            .unwrap();
    }
    let reports = pipeline.drain.reconcile_all(false).await.unwrap();
    let c = reports
        .iter()
        .flat_map(|lane| lane.coupons.iter())
        .find(|c| c.coupon_id == coupon)
        .unwrap_or_else(|| panic!("coupon {coupon} not reported: {reports:?}"));
    assert_eq!(c.missing, 2, "{c:?}");
    let report = pipeline
        .drain_within(DRAIN_LIMIT, "what reconciliation left queued")
        .await;
    assert_eq!(
        (report.decided(), report[Outcome::Duplicate]),
        (1, 1),
        "only user 4's later request is decided (a holder: DUPLICATE): {report:?}"
    );
    pipeline.finish().await;
    let rows = logged(&env, coupon).await;
    let expected: Vec<(i64, i64, String)> = [
        (1, 1, "ISSUED"),
        (2, 2, "ISSUED"),
        (3, 3, "ISSUED"),
        (4, 4, "DUPLICATE"),
    ]
    .into_iter()
    .map(|(u, r, o)| (u, r, o.to_owned()))
    .collect();
    assert_eq!(rows, expected, "one row per request, ranks 1..4");
    let results: HashMap<String, String> =
        env.redis.hgetall(env.keys().result(coupon)).await.unwrap();
    assert_eq!(results.get("3").map(String::as_str), Some("ISSUED"));
    assert_consistent(&env, coupon, 5).await;
    env.cleanup().await;
}

/// Ids of this database's MySQL sessions waiting to read `ranking_log_batches` (the test holds
/// it with LOCK TABLES): the log writer, stopped inside its insert.
async fn writers_waiting(env: &TestEnv) -> Vec<i64> {
    sqlx::query_scalar(
        "SELECT CAST(ID AS SIGNED) FROM information_schema.processlist \
         WHERE DB = DATABASE() AND ID <> CONNECTION_ID() \
         AND INFO LIKE '%ranking_log_batches%' AND STATE LIKE '%metadata lock%'",
    )
    .fetch_all(&env.mysql)
    .await
    .unwrap()
}

/// A ranking-log entry confirmed on a Redis that was restarted with its data and not
/// reconciled yet (so the split-brain fence of 0205f5b does not look at it) must not land after
/// another Redis was reconciled for the lane: that reconciliation did not see the row, and the
/// request it decided is decided again. Here: two decisions (user 1 ISSUED and persisted, user 2
/// SOLD_OUT) whose log entry waits in the writer (MySQL slow); Redis restarts without loss (a
/// new identity), the writer confirms the entry there, then Redis rolls back to before the
/// decisions and is reconciled while the writer is still inside its insert. On 0205f5b the old
/// rows land after the reconciliation: user 1 logged ISSUED twice, ranks 1 and 2 twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_confirmed_on_a_restarted_unreconciled_redis_never_lands_behind_a_later_reconciliation()
 {
    let mut redis = PrivateRedis::with_aof();
    let env = TestEnv::with_servers(&redis.url(), &mysql_server_url()).await;
    let coupon = 91;
    env.set_stock(coupon, "1").await;
    let t0 = now_ms() - 10_000.0;
    enqueue(
        &env,
        vec![(t0, member(1, coupon)), (t0 + 1.0, member(2, coupon))],
    )
    .await;
    let pipeline = env.pipeline();
    pipeline.drain.reconcile_all(false).await.unwrap();
    redis.copy_aof("before");
    // MySQL "slow" for the log writer: it waits inside its insert until the test unlocks.
    let mut lock = env.mysql.acquire().await.unwrap();
    sqlx::raw_sql("LOCK TABLES ranking_log_batches WRITE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let report = pipeline.drain_within(DRAIN_LIMIT, "users 1 and 2").await;
    assert_eq!(
        (report[Outcome::Issued], report[Outcome::SoldOut]),
        (1, 1),
        "{report:?}"
    );
    assert_eq!(mysql_holders(&env, coupon).await, vec![1]);
    eventually(
        std::time::Duration::from_secs(60),
        "the log writer waiting inside its insert",
        async || !writers_waiting(&env).await.is_empty(),
    )
    .await;
    // Restarted with every write: a new identity nobody reconciled.
    redis.copy_aof("decided");
    redis.roll_back_to("decided");
    // The writer's next attempt confirms its entry on that Redis, then waits again.
    let first = writers_waiting(&env).await;
    for id in &first {
        // An integer id: nothing to inject.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("KILL {id}")))
            .execute(&env.mysql)
            .await
            .unwrap();
    }
    eventually(
        std::time::Duration::from_secs(60),
        "the log writer's next attempt waiting inside its insert",
        async || {
            writers_waiting(&env)
                .await
                .iter()
                .any(|id| !first.contains(id))
        },
    )
    .await;
    // Rolled back to before both decisions, and reconciled while the writer is still inside.
    redis.roll_back_to("before");
    let reconciled = std::sync::atomic::AtomicBool::new(false);
    let reconcile = async {
        let reports = pipeline.drain.reconcile_all(false).await;
        reconciled.store(true, std::sync::atomic::Ordering::SeqCst);
        reports
    };
    let unlock = async {
        // Either it finished, or it waits for the writer (its fence write behind the writer's
        // share lock): then the writer goes first.
        eventually(
            std::time::Duration::from_secs(60),
            "the reconciliation finished or waiting for the writer",
            async || {
                reconciled.load(std::sync::atomic::Ordering::SeqCst)
                    || env
                        .count(
                            "SELECT COUNT(*) FROM information_schema.processlist \
                             WHERE DB = DATABASE() AND INFO LIKE 'INSERT INTO redis_fence%'",
                        )
                        .await
                        > 0
            },
        )
        .await;
        sqlx::raw_sql("UNLOCK TABLES")
            .execute(&mut *lock)
            .await
            .unwrap();
    };
    let (reports, ()) = tokio::join!(reconcile, unlock);
    reports.unwrap();
    // Back to the pool (closing the pool waits for it).
    drop(lock);
    pipeline
        .drain_within(DRAIN_LIMIT, "what reconciliation left queued")
        .await;
    pipeline.finish().await;
    let rows = logged(&env, coupon).await;
    let expected: Vec<(i64, i64, String)> = [(1, 1, "ISSUED"), (2, 2, "SOLD_OUT")]
        .into_iter()
        .map(|(u, r, o)| (u, r, o.to_owned()))
        .collect();
    assert_eq!(rows, expected, "one row per request, ranks 1..2");
    assert_consistent(&env, coupon, 1).await;
    env.cleanup().await;
    drop(redis);
}
