//! The coupon drain against real Redis and MariaDB (docs/contract.md §2).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use commerce_worker::coupon::{StopReason, requeue_dead};
use commerce_worker::outcome::Outcome;
use fred::prelude::*;
use tokio_util::sync::CancellationToken;

use crate::common::{DRAIN_LIMIT, TestEnv};

fn member(user: i64, coupon: i64) -> String {
    format!("{user}:{coupon}")
}

async fn issued_set(env: &TestEnv, coupon: i64) -> HashSet<String> {
    env.redis.smembers(env.keys().issued(coupon)).await.unwrap()
}

async fn stock(env: &TestEnv, coupon: i64) -> i64 {
    env.redis.get(env.keys().stock(coupon)).await.unwrap()
}

async fn results(env: &TestEnv, coupon: i64) -> HashMap<String, String> {
    env.redis.hgetall(env.keys().result(coupon)).await.unwrap()
}

async fn rows_for(env: &TestEnv, coupon: i64) -> Vec<i64> {
    sqlx::query_scalar::<_, i64>(
        "SELECT user_id FROM user_coupon WHERE coupon_id = ? ORDER BY user_id",
    )
    .bind(coupon)
    .fetch_all(&env.mysql)
    .await
    .unwrap()
}

async fn dead_entries(env: &TestEnv) -> Vec<HashMap<String, String>> {
    let entries: Vec<(String, HashMap<String, String>)> = env
        .redis
        .xrange(&env.keys().dead, "-", "+", None)
        .await
        .unwrap();
    entries.into_iter().map(|(_, fields)| fields).collect()
}

/// The dead-letter stream as member → reason.
async fn dead_reasons(env: &TestEnv) -> HashMap<String, String> {
    dead_entries(env)
        .await
        .into_iter()
        .map(|f| (f["member"].clone(), f["reason"].clone()))
        .collect()
}

/// `ON DUPLICATE KEY UPDATE` makes a conflict on *any* unique key a silent no-op: a key someone
/// added to `user_coupon` (one coupon per user) made an issued coupon vanish — counted as
/// persisted, removed from the outbox, no row. It is now refused loudly: moved to
/// `<outbox>:dead` with MySQL's reason (naming the key), counted, shown by `status` (which needs
/// a person), and `requeue-outbox-dead` brings it back once the table is fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issued_coupon_another_unique_key_refuses_is_kept_with_the_reason_and_lands_once_the_table_is_fixed()
 {
    let env = TestEnv::new().await;
    for sql in [
        "ALTER TABLE user_coupon ADD UNIQUE KEY one_coupon_per_user (user_id)",
        "INSERT INTO user_coupon (user_id, coupon_id, issued_at) VALUES (10, 99, NOW(3))",
    ] {
        sqlx::query(sql).execute(&env.mysql).await.unwrap();
    }
    env.set_stock(1, "5").await;
    env.enqueue(&[(1.0, member(10, 1)), (2.0, member(11, 1))])
        .await;
    let pipeline = env.pipeline();
    let report = pipeline.drain_within(DRAIN_LIMIT, "the sale").await;
    assert_eq!(report[Outcome::Issued], 2, "{report:?}");
    assert_eq!(rows_for(&env, 1).await, vec![11]);
    let outbox = env.keys().outbox.clone();
    let dead_key = commerce_worker::coupon::outbox_dead_key(&outbox);
    let dead: Vec<(String, HashMap<String, String>)> =
        env.redis.xrange(&dead_key, "-", "+", None).await.unwrap();
    assert_eq!(
        dead.len(),
        1,
        "the refused coupon is kept, not counted as persisted"
    );
    let fields = &dead[0].1;
    assert_eq!(fields.get("member").map(String::as_str), Some("10:1"));
    assert!(
        fields
            .get("score")
            .is_some_and(|s| s.parse::<f64>().is_ok())
    );
    let error = fields.get("error").cloned().unwrap_or_default();
    assert!(
        error.contains("Duplicate entry") && error.contains("one_coupon_per_user"),
        "MySQL's reason, naming the key: {error}"
    );
    assert_eq!(env.redis.zcard::<u64, _>(&outbox).await.unwrap(), 0);
    let metrics = pipeline.drain.metrics();
    assert_eq!(
        (
            metrics.coupon_rows_refused.get(),
            metrics.coupon_rows_persisted.get()
        ),
        (1, 1)
    );
    // `status` shows it and needs a person.
    let out = crate::common::output_within(
        std::process::Command::new(crate::common::BIN)
            .arg("--config")
            .arg(env.config_file())
            .args(["status", "--json"])
            .env("RUST_LOG", "off"),
        Duration::from_secs(60),
        "status",
    );
    assert_eq!(out.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["total"]["outbox_refused"], 1, "{json}");
    assert!(json["problems"].to_string().contains("refused"), "{json}");

    // The table fixed, the coupon is put back and lands, once.
    sqlx::query("ALTER TABLE user_coupon DROP INDEX one_coupon_per_user")
        .execute(&env.mysql)
        .await
        .unwrap();
    let requeued = commerce_worker::coupon::requeue_outbox_dead(&env.redis, env.keys())
        .await
        .unwrap();
    assert_eq!((requeued.moved, requeued.kept), (1, 0));
    pipeline
        .drain_within(DRAIN_LIMIT, "the requeued coupon")
        .await;
    assert_eq!(rows_for(&env, 1).await, vec![10, 11]);
    assert_eq!(env.redis.xlen::<u64, _>(&dead_key).await.unwrap(), 0);
    pipeline.finish().await;
    env.cleanup().await;
}

/// Per-coupon layout: a coupon taken out of the registry (its sale over) while some of its issued
/// coupons wait in `<outbox>:dead` keeps them: `status` still shows them, and
/// `requeue-outbox-dead` — the command it names — must put them back too. It walked only the
/// registered coupons, so they stayed refused for good (issued in Redis, never in `user_coupon`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeue_outbox_dead_brings_back_the_refused_coupons_of_a_coupon_no_longer_registered() {
    let mut env = TestEnv::new().await;
    env.use_per_coupon_layout();
    env.register([4]).await;
    env.set_stock(4, "5").await;
    sqlx::query("ALTER TABLE user_coupon ADD UNIQUE KEY one_coupon_per_user (user_id)")
        .execute(&env.mysql)
        .await
        .unwrap();
    sqlx::query("INSERT INTO user_coupon (user_id, coupon_id, issued_at) VALUES (20, 99, NOW(3))")
        .execute(&env.mysql)
        .await
        .unwrap();
    let lane = env.keys().for_coupon(4);
    env.zadd(&lane.queue, &[(1.0, member(20, 4)), (2.0, member(21, 4))])
        .await;
    let pipeline = env.pipeline();
    let report = pipeline.drain_within(DRAIN_LIMIT, "the sale").await;
    assert_eq!(report[Outcome::Issued], 2, "{report:?}");
    assert_eq!(rows_for(&env, 4).await, vec![21]);
    let dead_key = commerce_worker::coupon::outbox_dead_key(&lane.outbox);
    assert_eq!(env.redis.xlen::<u64, _>(&dead_key).await.unwrap(), 1);

    // The sale is over: the API takes the coupon out of the registry; then the table is fixed.
    let _: u64 = env
        .redis
        .srem(&env.keys().coupon_registry, 4)
        .await
        .unwrap();
    sqlx::query("ALTER TABLE user_coupon DROP INDEX one_coupon_per_user")
        .execute(&env.mysql)
        .await
        .unwrap();
    let requeued = commerce_worker::coupon::requeue_outbox_dead(&env.redis, env.keys())
        .await
        .unwrap();
    assert_eq!((requeued.moved, requeued.kept), (1, 0));
    pipeline
        .drain_within(DRAIN_LIMIT, "the requeued coupon")
        .await;
    assert_eq!(rows_for(&env, 4).await, vec![20, 21]);
    assert_eq!(env.redis.xlen::<u64, _>(&dead_key).await.unwrap(), 0);
    pipeline.finish().await;
    env.cleanup().await;
}

/// docs/contract.md §2: a malformed member is dead-lettered and the rest of the queue goes on.
/// A member whose bytes are not UTF-8 is malformed too — it used to fail every batch that read
/// it ("Parse Error: Could not convert to string"), so the whole queue behind it waited for
/// ever. Its bytes are kept in the dead-letter stream, `status` and `requeue-dead --dry-run`
/// show it (escaped), and a requeue puts the same bytes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_is_not_utf8_is_dead_lettered_with_its_bytes_and_the_queue_goes_on() {
    let env = TestEnv::new().await;
    env.set_stock(7, "5").await;
    let bad: &[u8] = b"\xff\xfe:7";
    let _: i64 = env
        .redis
        .zadd(
            &env.keys().queue,
            None,
            None,
            false,
            false,
            vec![
                (1.0, Value::Bytes(bad.to_vec().into())),
                (2.0, Value::from(member(5, 7))),
            ],
        )
        .await
        .unwrap();
    let pipeline = env.pipeline();
    let report = pipeline.drain_within(DRAIN_LIMIT, "the queue").await;
    assert_eq!(
        (report[Outcome::Issued], report[Outcome::DeadLettered]),
        (1, 1),
        "{report:?}"
    );
    assert_eq!(
        env.redis.zcard::<u64, _>(&env.keys().queue).await.unwrap(),
        0
    );
    let dead: Vec<(String, HashMap<String, Value>)> = env
        .redis
        .xrange(&env.keys().dead, "-", "+", None)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    let member_bytes = dead[0].1.get("member").and_then(Value::as_bytes);
    assert_eq!(member_bytes, Some(bad), "the member's bytes are kept");

    let cli = |args: &[&str]| {
        crate::common::output_within(
            std::process::Command::new(crate::common::BIN)
                .arg("--config")
                .arg(env.config_file())
                .args(args)
                .env("RUST_LOG", "off"),
            Duration::from_secs(60),
            "commerce-worker",
        )
    };
    let listed = cli(&["requeue-dead", "--dry-run"]);
    assert_eq!(listed.status.code(), Some(0), "{listed:?}");
    let listed = String::from_utf8_lossy(&listed.stdout);
    // Printed quoted ({:?}), so the escape's backslash shows doubled.
    assert!(
        listed.contains(r#"member="\\xff\\xfe:7""#) && listed.contains("not UTF-8"),
        "{listed}"
    );
    let status = cli(&["status", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&status.stdout)
        .unwrap_or_else(|e| panic!("status reads the dead letter: {e}: {status:?}"));
    assert_eq!(json["total"]["dead_letters"], 1, "{json}");

    let requeued = requeue_dead(&env.redis, env.keys()).await.unwrap();
    assert_eq!(requeued.requeued, 1);
    let back: Vec<(Value, f64)> = env
        .redis
        .zrange(&env.keys().queue, 0, -1, None, false, None, true)
        .await
        .unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].0.as_bytes(), Some(bad), "requeued byte for byte");
    assert_eq!(back[0].1, 1.0, "with its original score");
    pipeline.finish().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_stock_requests_by_score_get_the_coupon() {
    let env = TestEnv::new().await;
    env.set_stock(7, "5").await;
    // Enqueued out of member order; scores decide. Two ties at score 3 go by member order.
    let mut entries: Vec<(f64, String)> = (1..=20)
        .map(|u| (f64::from(100 - u as i32), member(u, 7)))
        .collect();
    entries.push((3.0, member(500, 7)));
    entries.push((3.0, member(400, 7)));
    env.enqueue(&entries).await;

    let pipeline = env.pipeline();
    let report = pipeline
        .drain_within(DRAIN_LIMIT, "22 requests for coupon 7")
        .await;
    assert_eq!(report[Outcome::Issued], 5);
    assert_eq!(report[Outcome::SoldOut], 17);
    // Lowest scores: 400 and 500 (tied at 3, member order), then users 20, 19, 18.
    assert_eq!(rows_for(&env, 7).await, vec![18, 19, 20, 400, 500]);
    let rows = pipeline.finish().await;
    assert_eq!(rows, 22);
    let ranks: Vec<(i64, i32)> =
        sqlx::query_as("SELECT user_id, `rank` FROM ranking_logs ORDER BY `rank` LIMIT 3")
            .fetch_all(&env.mysql)
            .await
            .unwrap();
    assert_eq!(ranks, vec![(400, 1), (500, 2), (20, 3)]);
    assert_eq!(stock(&env, 7).await, 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_outcome_is_recorded_in_redis_mysql_and_the_ranking_log() {
    let env = TestEnv::new().await;
    env.set_stock(1, "2").await;
    env.set_stock(2, "0").await;
    let pipeline = env.pipeline();
    let stop = CancellationToken::new();

    env.enqueue(&[
        (1.0, member(10, 1)),
        (2.0, member(11, 2)),
        (3.0, member(12, 3)),
    ])
    .await;
    let first = pipeline.tick(&stop).await;
    assert_eq!(
        (
            first[Outcome::Issued],
            first[Outcome::SoldOut],
            first[Outcome::UnknownCoupon]
        ),
        (1, 1, 1)
    );

    // Duplicate across ticks: user 10 asks again for coupon 1; user 13 gets the last one.
    env.enqueue(&[
        (4.0, member(10, 1)),
        (5.0, member(13, 1)),
        (6.0, member(14, 1)),
    ])
    .await;
    let second = pipeline.tick(&stop).await;
    assert_eq!(
        (
            second[Outcome::Issued],
            second[Outcome::Duplicate],
            second[Outcome::SoldOut]
        ),
        (1, 1, 1)
    );
    assert_eq!(second.stopped, StopReason::QueueEmpty);

    let res = results(&env, 1).await;
    assert_eq!(
        res.get("10").map(String::as_str),
        Some("ISSUED"),
        "ISSUED is never overwritten by DUPLICATE"
    );
    assert_eq!(res.get("13").map(String::as_str), Some("ISSUED"));
    assert_eq!(res.get("14").map(String::as_str), Some("SOLD_OUT"));
    assert_eq!(
        results(&env, 2).await.get("11").map(String::as_str),
        Some("SOLD_OUT")
    );
    assert_eq!(
        results(&env, 3).await.get("12").map(String::as_str),
        Some("UNKNOWN_COUPON")
    );
    let seq: i64 = env.redis.get(env.keys().seq(1)).await.unwrap();
    assert_eq!(seq, 4, "four requests for coupon 1 were decided");
    assert_eq!(stock(&env, 1).await, 0);
    assert_eq!(stock(&env, 2).await, 0, "stock never goes below 0");

    // The job's persister writes the issued coupons in the background.
    crate::common::eventually(
        Duration::from_secs(10),
        "the outbox persisted",
        async || rows_for(&env, 1).await == vec![10, 13],
    )
    .await;
    assert_eq!(rows_for(&env, 1).await, vec![10, 13]);
    assert_eq!(pipeline.finish().await, 6);
    let outbox: u64 = env.redis.zcard(&env.keys().outbox).await.unwrap();
    assert_eq!(outbox, 0, "persisted entries are acknowledged");
    let log: Vec<(i64, String, i32, String, Option<String>)> = sqlx::query_as(
        "SELECT user_id, coupon_type, `rank`, status, reason FROM ranking_logs ORDER BY coupon_type, `rank`",
    )
    .fetch_all(&env.mysql)
    .await
    .unwrap();
    let expected: Vec<(i64, String, i32, String, Option<String>)> = vec![
        (10, "1".into(), 1, "ISSUED".into(), None),
        (10, "1".into(), 2, "FAILED".into(), Some("DUPLICATE".into())),
        (13, "1".into(), 3, "ISSUED".into(), None),
        (14, "1".into(), 4, "FAILED".into(), Some("SOLD_OUT".into())),
        (11, "2".into(), 1, "FAILED".into(), Some("SOLD_OUT".into())),
        (
            12,
            "3".into(),
            1,
            "FAILED".into(),
            Some("UNKNOWN_COUPON".into()),
        ),
    ];
    assert_eq!(log, expected);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_of_holders_stay_issued_and_holders_added_elsewhere_get_duplicate() {
    let env = TestEnv::new().await;
    let pipeline = env.pipeline();
    let stop = CancellationToken::new();
    env.set_stock(1, "5").await;
    // User 20 holds coupon 1 without a result (imported from an older system).
    let _: i64 = env.redis.sadd(env.keys().issued(1), "20").await.unwrap();
    env.enqueue(&[(1.0, member(20, 1)), (2.0, member(21, 1))])
        .await;
    let first = pipeline.tick(&stop).await;
    assert_eq!((first[Outcome::Duplicate], first[Outcome::Issued]), (1, 1));

    // Coupon 1 is retired (its stock key deleted); its holder and a newcomer ask again.
    let _: i64 = env.redis.del(env.keys().stock(1)).await.unwrap();
    env.enqueue(&[(3.0, member(21, 1)), (4.0, member(22, 1))])
        .await;
    let second = pipeline.tick(&stop).await;
    assert_eq!(second[Outcome::UnknownCoupon], 2);

    let res = results(&env, 1).await;
    assert_eq!(res.get("20").map(String::as_str), Some("DUPLICATE"));
    assert_eq!(
        res.get("21").map(String::as_str),
        Some("ISSUED"),
        "ISSUED is never overwritten, not even by UNKNOWN_COUPON"
    );
    assert_eq!(res.get("22").map(String::as_str), Some("UNKNOWN_COUPON"));
    pipeline.finish().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_batch_is_decided_whole_across_the_scripts_command_slices() {
    // decide.lua spreads at most 4000 values per Redis command; a 5000-entry batch (the largest
    // allowed) takes two slices of every bulk command.
    let mut env = TestEnv::new().await;
    env.config.coupon.batch_size =
        std::num::NonZeroUsize::new(5000).unwrap_or(std::num::NonZeroUsize::MIN);
    env.set_stock(1, "4500").await;
    let entries: Vec<(f64, String)> = (1..=5000).map(|u| (u as f64, member(u, 1))).collect();
    env.enqueue(&entries).await;
    let pipeline = env.pipeline();
    let report = pipeline
        .drain
        .tick(Duration::from_secs(30), &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(
        (
            report.batches,
            report[Outcome::Issued],
            report[Outcome::SoldOut]
        ),
        (1, 4500, 500)
    );
    assert_eq!(issued_set(&env, 1).await.len(), 4500);
    let res = results(&env, 1).await;
    assert_eq!(res.len(), 5000);
    assert_eq!(res.get("4500").map(String::as_str), Some("ISSUED"));
    assert_eq!(res.get("4501").map(String::as_str), Some("SOLD_OUT"));
    assert_eq!(stock(&env, 1).await, 0);
    // Every issued coupon is in the outbox, or already persisted by the job's persister.
    pipeline.finish().await;
    let rows: HashSet<String> = rows_for(&env, 1).await.iter().map(i64::to_string).collect();
    assert_eq!(rows.len(), 4500);
    assert_eq!(
        rows,
        issued_set(&env, 1).await,
        "user_coupon rows = Redis holders"
    );
    env.cleanup().await;
}

/// `drain` (`drain_to_empty`) empties every registered coupon's queue, also one whose coupon the
/// API never marked active, every time it is called — not only when a registry sweep is due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_to_empty_decides_queues_not_marked_active_each_time_it_runs() {
    let mut env = TestEnv::new().await;
    env.use_per_coupon_layout();
    env.register([9]).await;
    env.set_stock(9, "10").await;
    let queue = env.keys().for_coupon(9).queue;
    let pipeline = env.pipeline();
    for round in 1..=2_i64 {
        // Written without `SADD coupon:active`: only a walk of the registry finds it.
        env.zadd(&queue, &[(round as f64, member(round, 9))]).await;
        let report = pipeline
            .drain_within(DRAIN_LIMIT, "an unmarked coupon's queue")
            .await;
        assert_eq!(report[Outcome::Issued], 1, "round {round}: {report:?}");
        let left: u64 = env.redis.zcard(&queue).await.unwrap();
        assert_eq!(
            left, 0,
            "round {round}: the queue is empty when drain returns"
        );
    }
    pipeline.finish().await;
    env.cleanup().await;
}

/// Issue 19: batches spanning thousands of distinct coupons decide each coupon as if it were
/// alone, in both layouts: 2 000 coupons with 2 in stock, three users asking for each (ISSUED,
/// ISSUED, SOLD_OUT in arrival order), and 500 coupons without stock (UNKNOWN_COUPON). In the
/// single queue the first batch names a new coupon with nearly every entry and later ones repeat
/// them, so the batches also grow past `batch_size` (see the next test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_spanning_thousands_of_coupons_decide_each_coupon_in_both_layouts() {
    for per_coupon in [false, true] {
        let mut env = TestEnv::new().await;
        if per_coupon {
            env.use_per_coupon_layout();
        }
        let coupons: Vec<i64> = (1..=2000).collect();
        crate::invariants::flash_sale(&env, &coupons, 2, 3).await;
        let unknown: Vec<(f64, String)> = (3001..=3500)
            .map(|c| (5.0 + c as f64, member(1, c)))
            .collect();
        commerce_worker::tools::simulated_api::enqueue_members(&env.redis, env.keys(), unknown)
            .await
            .unwrap();
        let pipeline = env.pipeline();
        let report = pipeline
            .drain_within(DRAIN_LIMIT, "8 000 requests over 2 500 coupons")
            .await;
        assert_eq!(
            (
                report[Outcome::Issued],
                report[Outcome::SoldOut],
                report[Outcome::UnknownCoupon],
                report[Outcome::DeadLettered]
            ),
            (4000, 2000, 500, 0),
            "per coupon: {per_coupon}, {report:?}"
        );
        pipeline.finish().await;
        crate::invariants::assert_invariants(&env, &coupons, 2, 3).await;
        crate::invariants::assert_ranking_log(&env, &coupons).await;
        for c in [1, 777, 2000] {
            assert_eq!(
                results(&env, c).await,
                HashMap::from([
                    ("1".to_owned(), "ISSUED".to_owned()),
                    ("2".to_owned(), "ISSUED".to_owned()),
                    ("3".to_owned(), "SOLD_OUT".to_owned())
                ]),
                "coupon {c}: first come, first served"
            );
        }
        for c in [3001, 3500] {
            assert_eq!(
                results(&env, c).await,
                HashMap::from([("1".to_owned(), "UNKNOWN_COUPON".to_owned())])
            );
            assert_eq!(crate::invariants::seq(&env, c).await, 1);
        }
        env.cleanup().await;
    }
}

/// Issue 19: when a batch's entries name many coupons and the entries after them repeat those
/// coupons, the batch grows past `batch_size` (up to four times it), so each coupon's fixed cost
/// in the script is shared by several requests; over few coupons a batch stays `batch_size` long.
/// Either way every request is decided in arrival order per coupon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_many_coupons_grows_while_they_repeat_and_decides_them_in_order() {
    let mut env = TestEnv::new().await;
    env.config.coupon.batch_size =
        std::num::NonZeroUsize::new(100).unwrap_or(std::num::NonZeroUsize::MIN);
    // 100 coupons in turn, 5 users each (500 entries), stock 3: ISSUED ×3, SOLD_OUT ×2.
    let many: Vec<i64> = (1..=100).collect();
    env_sale_in_turn(&env, &many, 3, 5).await;
    let pipeline = env.pipeline();
    let report = pipeline.tick(&CancellationToken::new()).await;
    // The first head read is batch_size long: 100 coupons in 100 entries. The next read looks
    // four times as far, and those 400 entries all repeat them: one batch.
    assert_eq!(
        (
            report.batches,
            report[Outcome::Issued],
            report[Outcome::SoldOut]
        ),
        (2, 300, 200),
        "{report:?}"
    );
    for c in [1, 50, 100] {
        let res = results(&env, c).await;
        for (user, outcome) in [
            (1, "ISSUED"),
            (3, "ISSUED"),
            (4, "SOLD_OUT"),
            (5, "SOLD_OUT"),
        ] {
            assert_eq!(
                res.get(&user.to_string()).map(String::as_str),
                Some(outcome),
                "coupon {c}"
            );
        }
    }
    pipeline.finish().await;
    crate::invariants::assert_invariants(&env, &many, 3, 5).await;
    crate::invariants::assert_ranking_log(&env, &many).await;

    // Few coupons: 5 coupons in turn, 100 users (500 entries): five batches of 100.
    let few: Vec<i64> = (201..=205).collect();
    env_sale_in_turn(&env, &few, 60, 100).await;
    let pipeline = env.pipeline();
    let report = pipeline.tick(&CancellationToken::new()).await;
    assert_eq!(
        (
            report.batches,
            report[Outcome::Issued],
            report[Outcome::SoldOut]
        ),
        (5, 300, 200),
        "{report:?}"
    );
    pipeline.finish().await;
    crate::invariants::assert_invariants(&env, &few, 60, 100).await;
    env.cleanup().await;
}

/// decide.lua is safe to run twice (a client resends a batch whose reply was lost): the second
/// run of a batch over many coupons finds every entry gone and writes nothing more — no stock,
/// holder, result, seq (written for all the batch's coupons at once) or log row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_many_coupons_sent_twice_is_decided_once() {
    let env = TestEnv::new().await;
    let pipeline = env.pipeline();
    // A first request through the drain, which reconciles this Redis (the script refuses one
    // that was never reconciled).
    env.set_stock(999, "1").await;
    env.enqueue(&[(1.0, member(1, 999))]).await;
    let first = pipeline.tick(&CancellationToken::new()).await;
    assert_eq!(first[Outcome::Issued], 1);

    let coupons: Vec<i64> = (1..=300).collect();
    crate::invariants::flash_sale(&env, &coupons, 1, 2).await;
    let decider =
        commerce_worker::coupon::Decider::new(env.redis.clone(), env.keys().clone(), 1000, None);
    let head = decider.read_head().await.unwrap();
    assert_eq!(head.len(), 600);
    let (once, _) = decider.decide_head(head.clone(), false).await.unwrap();
    let count = |decisions: &[commerce_worker::coupon::Decision], outcome: Outcome| {
        decisions.iter().filter(|d| d.outcome == outcome).count()
    };
    assert_eq!(
        (
            count(&once, Outcome::Issued),
            count(&once, Outcome::SoldOut)
        ),
        (300, 300)
    );
    let (twice, _) = decider.decide_head(head, false).await.unwrap();
    assert_eq!(count(&twice, Outcome::Gone), 600, "{twice:?}");

    pipeline
        .drain_within(DRAIN_LIMIT, "the outbox of the batch")
        .await;
    pipeline.finish().await;
    // seq counts each request once, and ranking_logs holds ranks 1..=seq, none twice (a second
    // run that logged its entries again would show here; the log stream itself is being read
    // and trimmed meanwhile, so its length proves nothing).
    crate::invariants::assert_invariants(&env, &coupons, 1, 2).await;
    crate::invariants::assert_ranking_log(&env, &coupons).await;
    env.cleanup().await;
}

/// `users` users ask in turn for each of `coupons` (each coupon once per round, user by user),
/// each coupon with `stock` in stock.
async fn env_sale_in_turn(env: &TestEnv, coupons: &[i64], stock: i64, users: i64) {
    for &c in coupons {
        env.set_stock(c, &stock.to_string()).await;
    }
    let mut entries = Vec::new();
    for u in 1..=users {
        for &c in coupons {
            entries.push((entries.len() as f64 + 1.0, member(u, c)));
        }
    }
    commerce_worker::tools::simulated_api::enqueue_members(&env.redis, env.keys(), entries)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_coupon_lanes_are_drained_strays_dead_lettered_and_requeue_dead_walks_every_lane() {
    let mut env = TestEnv::new().await;
    env.use_per_coupon_layout();
    let coupons = [7, 8];
    crate::invariants::flash_sale(&env, &coupons, 30, 50).await;
    // A request for coupon 8 written into coupon 7's queue by mistake.
    let _: i64 = env
        .redis
        .zadd(
            &env.keys().for_coupon(7).queue,
            None,
            None,
            false,
            false,
            (0.5, member(99, 8)),
        )
        .await
        .unwrap();
    let pipeline = env.pipeline();
    let report = pipeline
        .drain_within(DRAIN_LIMIT, "the sale in two lanes")
        .await;
    assert_eq!(
        (report[Outcome::Issued], report[Outcome::DeadLettered]),
        (60, 1),
        "{report:?}"
    );
    let dead: Vec<(String, HashMap<String, String>)> = env
        .redis
        .xrange(&env.keys().for_coupon(7).dead, "-", "+", None)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].1.get("member").map(String::as_str), Some("99:8"));
    assert!(
        dead[0]
            .1
            .get("reason")
            .is_some_and(|r| r.contains("another coupon")),
        "{dead:?}"
    );
    crate::invariants::assert_invariants(&env, &coupons, 30, 50).await;

    // requeue-dead walks every coupon's lane: coupon 9's stock was unreadable, then fixed.
    env.set_stock(9, "two").await;
    commerce_worker::tools::simulated_api::enqueue_members(
        &env.redis,
        env.keys(),
        vec![
            (1.0, member(1, 9)),
            (2.0, member(2, 9)),
            (3.0, member(3, 9)),
        ],
    )
    .await
    .unwrap();
    let stop = CancellationToken::new();
    let dead = pipeline.drain.tick(Duration::from_secs(10), &stop).await;
    assert_eq!(dead.map(|r| r[Outcome::DeadLettered]).ok(), Some(3));
    env.set_stock(9, "2").await;
    let requeued = commerce_worker::coupon::requeue_dead(&env.redis, env.keys())
        .await
        .unwrap();
    // Coupon 7's stray request goes back too (and will be dead-lettered again).
    assert_eq!(requeued.requeued, 4);
    let again = pipeline.tick(&stop).await;
    assert_eq!(
        (
            again[Outcome::Issued],
            again[Outcome::SoldOut],
            again[Outcome::DeadLettered]
        ),
        (2, 1, 1)
    );
    pipeline.finish().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_members_are_dead_lettered_while_the_rest_of_the_batch_is_issued() {
    let env = TestEnv::new().await;
    env.set_stock(5, "100").await;
    let malformed = [
        "garbage",
        "12",
        "12:",
        ":5",
        "0:5",
        "12:0",
        "012:5",
        "-1:5",
        "1:5:5",
        "9223372036854775808:5",
        "a:5",
    ];
    let mut entries: Vec<(f64, String)> = malformed
        .iter()
        .enumerate()
        .map(|(i, m)| (i as f64 * 2.0, m.to_string()))
        .collect();
    entries.extend((1..=10).map(|u| (u as f64 * 2.0 + 1.0, member(u, 5))));
    env.enqueue(&entries).await;

    let pipeline = env.pipeline();
    let report = pipeline
        .drain_within(DRAIN_LIMIT, "malformed members among ten good ones")
        .await;
    assert_eq!(report[Outcome::DeadLettered], malformed.len() as u64);
    assert_eq!(report[Outcome::Issued], 10);
    let dead = dead_entries(&env).await;
    let dead_members: HashSet<&str> = dead
        .iter()
        .filter_map(|f| f.get("member").map(String::as_str))
        .collect();
    assert_eq!(dead_members, malformed.iter().copied().collect());
    assert!(dead.iter().all(|f| {
        f.get("reason")
            .is_some_and(|r| r.starts_with("malformed member"))
    }));
    assert_eq!(
        dead.iter()
            .find(|f| f["member"] == "garbage")
            .map(|f| f["score"].as_str()),
        Some("0")
    );
    let queue_len: u64 = env.redis.zcard(&env.keys().queue).await.unwrap();
    assert_eq!(queue_len, 0, "no entry is left at the head of the queue");
    assert_eq!(rows_for(&env, 5).await.len(), 10);
    pipeline.finish().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_stock_and_wrong_key_types_dead_letter_and_requeue_dead_brings_them_back() {
    let env = TestEnv::new().await;
    env.set_stock(1, "ten").await;
    env.set_stock(2, "3").await;
    // The issued key of coupon 2 is a string: its requests cannot be decided.
    env.put_wrong_type(env.keys().issued(2)).await;
    env.set_stock(3, "1").await;
    env.enqueue(&[
        (10.0, member(1, 1)),
        (11.0, member(2, 2)),
        (12.0, member(3, 3)),
    ])
    .await;

    let pipeline = env.pipeline();
    let report = pipeline
        .drain_within(DRAIN_LIMIT, "three requests, two undecidable")
        .await;
    assert_eq!(
        (report[Outcome::DeadLettered], report[Outcome::Issued]),
        (2, 1)
    );
    let dead = dead_entries(&env).await;
    let reasons: HashMap<&str, &str> = dead
        .iter()
        .map(|f| (f["member"].as_str(), f["reason"].as_str()))
        .collect();
    assert!(
        reasons["1:1"].contains("stock is not a non-negative integer"),
        "{reasons:?}"
    );
    assert!(reasons["2:2"].contains("wrong type"), "{reasons:?}");
    let untouched: String = env.redis.get(env.keys().stock(1)).await.unwrap();
    assert_eq!(
        untouched, "ten",
        "nothing is written for an undecidable coupon"
    );

    // The operator fixes the data, then requeues: original scores, then decided normally.
    env.set_stock(1, "4").await;
    let _: i64 = env.redis.del(env.keys().issued(2)).await.unwrap();
    let requeued = requeue_dead(&env.redis, env.keys()).await.unwrap();
    assert_eq!(requeued.requeued, 2);
    let scores: Vec<(String, f64)> = env
        .redis
        .zrange(&env.keys().queue, 0, -1, None, false, None, true)
        .await
        .unwrap();
    assert_eq!(
        scores,
        vec![("1:1".to_string(), 10.0), ("2:2".to_string(), 11.0)]
    );
    assert!(dead_entries(&env).await.is_empty());
    let again = pipeline
        .drain_within(DRAIN_LIMIT, "the requeued requests")
        .await;
    assert_eq!(again[Outcome::Issued], 2);
    assert_eq!(stock(&env, 1).await, 3);
    assert_eq!(stock(&env, 2).await, 2);
    pipeline.finish().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_of_the_wrong_type_dead_letters_its_coupons_requests_and_nothing_of_the_batch_is_half_written()
 {
    let env = TestEnv::new().await;
    let keys = env.keys().clone();
    let redis = &env.redis;
    let fail = |e: fred::error::Error| panic!("{e}");
    // Coupon 1 is fine; 2's result hash is a list, 3's seq a set, 4's stock a hash.
    for coupon in 1..=4 {
        env.set_stock(coupon, "5").await;
    }
    let _: i64 = redis.rpush(keys.result(2), "x").await.unwrap_or_else(fail);
    let _: i64 = redis.sadd(keys.seq(3), "x").await.unwrap_or_else(fail);
    let _: i64 = redis.del(keys.stock(4)).await.unwrap_or_else(fail);
    let _: i64 = redis
        .hset(keys.stock(4), ("a", "b"))
        .await
        .unwrap_or_else(fail);
    // Coupon 1 comes last, so its writes follow every failed check in the same script.
    env.enqueue(&[
        (10.0, member(1, 2)),
        (11.0, member(1, 3)),
        (12.0, member(1, 4)),
        (13.0, member(1, 1)),
    ])
    .await;

    let pipeline = env.pipeline();
    let report = pipeline
        .drain_within(
            DRAIN_LIMIT,
            "four requests, three with keys of the wrong type",
        )
        .await;
    assert_eq!(
        (report[Outcome::DeadLettered], report[Outcome::Issued]),
        (3, 1),
        "{report:?}"
    );
    let reasons = dead_reasons(&env).await;
    for (member, key, kind) in [
        ("1:2", keys.result(2), "list"),
        ("1:3", keys.seq(3), "set"),
        ("1:4", keys.stock(4), "hash"),
    ] {
        assert_eq!(
            reasons.get(member).map(String::as_str),
            Some(format!("wrong type: {key} is a {kind}").as_str()),
            "{reasons:?}"
        );
    }
    assert_eq!(stock(&env, 2).await, 5, "nothing is written for coupon 2");
    assert!(issued_set(&env, 2).await.is_empty());
    assert!(issued_set(&env, 3).await.is_empty());
    assert_eq!(issued_set(&env, 1).await, HashSet::from(["1".to_owned()]));
    assert_eq!(stock(&env, 1).await, 4);
    pipeline.finish().await;
    env.cleanup().await;
}

/// The decide script learns a key's type from the error of the write it needed anyway (issue 19):
/// a coupon whose seq or result hash turns out wrong after its SADD or INCRBY has those writes
/// undone, so an undecidable coupon is left exactly as it was, on both the one-request path and
/// the several-requests path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_made_before_a_coupon_turns_out_undecidable_are_undone() {
    let env = TestEnv::new().await;
    let keys = env.keys().clone();
    let redis = &env.redis;
    let set = async |key: String, value: &str| {
        let _: () = redis.set(key, value, None, None, false).await.unwrap();
    };
    for coupon in 1..=7 {
        env.set_stock(coupon, "5").await;
    }
    env.set_stock(8, "0").await;
    // 2: negative seq; 3: seq not a number; 4: result a list, seq 4; 5: result a list, no seq;
    // 6: result a list and user 9 already holds it; 7 and 8: result a list, two requests each
    // (8 sold out).
    set(keys.seq(2), "-3").await;
    set(keys.seq(3), "abc").await;
    set(keys.seq(4), "4").await;
    for coupon in 4..=8 {
        let _: i64 = redis.rpush(keys.result(coupon), "x").await.unwrap();
    }
    let _: i64 = redis.sadd(keys.issued(6), "9").await.unwrap();
    env.enqueue(&[
        (10.0, member(1, 2)),
        (11.0, member(1, 3)),
        (12.0, member(1, 4)),
        (13.0, member(1, 5)),
        (14.0, member(9, 6)),
        (15.0, member(1, 7)),
        (16.0, member(2, 7)),
        (17.0, member(1, 8)),
        (18.0, member(2, 8)),
        (19.0, member(1, 1)),
    ])
    .await;

    let pipeline = env.pipeline();
    let report = pipeline
        .drain_within(DRAIN_LIMIT, "ten requests, nine of them undecidable")
        .await;
    assert_eq!(
        (report[Outcome::DeadLettered], report[Outcome::Issued]),
        (9, 1),
        "{report:?}"
    );
    let reasons = dead_reasons(&env).await;
    assert_eq!(reasons["1:2"], "seq is not an integer: -3");
    assert_eq!(reasons["1:3"], "seq is not an integer: abc");
    for (member, coupon) in [("1:4", 4), ("1:5", 5), ("9:6", 6), ("1:7", 7), ("2:8", 8)] {
        assert_eq!(
            reasons[member],
            format!("wrong type: {} is a list", keys.result(coupon)),
            "{reasons:?}"
        );
    }
    let seqs: Vec<Option<String>> = {
        let mut seqs = Vec::new();
        for coupon in 2..=8 {
            seqs.push(redis.get(keys.seq(coupon)).await.unwrap());
        }
        seqs
    };
    assert_eq!(
        seqs,
        [Some("-3"), Some("abc"), Some("4"), None, None, None, None]
            .map(|s| s.map(str::to_owned))
            .to_vec(),
        "seq is as it was"
    );
    for coupon in [2, 3, 4, 5, 7, 8] {
        assert!(issued_set(&env, coupon).await.is_empty(), "coupon {coupon}");
    }
    assert_eq!(issued_set(&env, 6).await, HashSet::from(["9".to_owned()]));
    for coupon in 2..=7 {
        assert_eq!(stock(&env, coupon).await, 5, "coupon {coupon}");
    }
    assert_eq!(stock(&env, 1).await, 4);
    assert_eq!(
        results(&env, 1).await,
        HashMap::from([("1".to_owned(), "ISSUED".to_owned())])
    );
    pipeline.finish().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_budget_stops_the_tick_before_the_next_batch() {
    let env = TestEnv::new().await;
    env.set_stock(1, "10").await;
    env.enqueue(&[(1.0, member(1, 1))]).await;
    let pipeline = env.pipeline();
    let report = pipeline
        .drain
        .tick(Duration::ZERO, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(report.stopped, StopReason::BudgetSpent);
    assert_eq!((report.decided(), report.queue_depth), (0, 1));
    let stop = CancellationToken::new();
    stop.cancel();
    let report = pipeline
        .drain
        .tick(Duration::from_secs(5), &stop)
        .await
        .unwrap();
    assert_eq!(report.stopped, StopReason::ShutdownRequested);
    pipeline.finish().await;
    env.cleanup().await;
}

/// Conservation under replicas, with users asking again while the drainers run: initial =
/// remaining + |holders| (a holder issued twice would cost two), holders = rows = ISSUED results
/// = ISSUED log rows, and every request has exactly one outcome and one rank.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_concurrent_drainers_conserve_stock_and_decide_every_request_once() {
    let mut env = TestEnv::new().await;
    env.config.coupon.batch_size =
        std::num::NonZeroUsize::new(50).unwrap_or(std::num::NonZeroUsize::MIN);
    let coupons = [1i64, 2, 3];
    let (initial, users) = (300i64, 400i64);
    // 3 coupons × 400 users for 300 coupons each.
    crate::invariants::flash_sale(&env, &coupons, initial, users).await;

    let pipelines: Vec<_> = (0..4).map(|_| env.pipeline()).collect();
    let drains: Vec<_> = pipelines.iter().map(|p| p.spawn_drain()).collect();
    // Everyone asks again, as impatient users do: DUPLICATE for holders, and SOLD_OUT or a
    // coupon for the rest. A request still waiting is not added twice (ZADD NX).
    let mut asked_again: HashMap<i64, i64> = HashMap::new();
    for c in coupons {
        let again: Vec<(f64, String)> = (1..=users)
            .map(|u| ((100_000 + u * 3 + c) as f64, member(u, c)))
            .collect();
        for chunk in again.chunks(50) {
            *asked_again.entry(c).or_default() += env.enqueue(chunk).await;
        }
    }
    let mut decided = 0;
    let mut issued = 0;
    for drain in drains {
        let report = drain.within(DRAIN_LIMIT, "one of the four drainers").await;
        decided += report.decided();
        issued += report[Outcome::Issued];
    }
    // What arrived after the drainers found the queue empty.
    let rest = pipelines[0]
        .drain_within(
            DRAIN_LIMIT,
            "the requests that arrived after the drainers stopped",
        )
        .await;
    decided += rest.decided();
    issued += rest[Outcome::Issued];
    let mut logged = 0;
    for p in pipelines {
        logged += p.finish().await;
    }
    let total_requests = (coupons.len() as i64 * users + asked_again.values().sum::<i64>()) as u64;
    assert_eq!(
        decided, total_requests,
        "every request decided exactly once across replicas"
    );
    assert_eq!(
        logged, total_requests,
        "one ranking-log row per decided request"
    );
    assert_eq!(issued, 3 * initial as u64);
    crate::invariants::assert_holders(&env, &coupons, initial, users).await;
    for c in coupons {
        assert_eq!(
            crate::invariants::seq(&env, c).await,
            users + asked_again[&c],
            "coupon {c}: every request decided exactly once"
        );
    }
    crate::invariants::assert_ranking_log(&env, &coupons).await;
    env.cleanup().await;
}
