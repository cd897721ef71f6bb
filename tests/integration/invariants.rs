//! The drain's invariants (docs/contract.md §2 and §4), checked where each one can break: a flash sale
//! to run, and the checks every drain test, fault test and replica test makes afterwards.
//!
//! "Nobody holds a coupon twice" is never counted in `user_coupon`: its `UNIQUE (user_id,
//! coupon_id)` makes such a count unable to fail. A user issued twice shows instead as stock
//! decremented twice for one holder (conservation), as two `ISSUED` ranking-log rows, or as
//! holders in Redis that differ from the rows in MySQL; those are what is compared here.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use commerce_worker::keys::KeyTemplates;
use fred::prelude::*;

use crate::common::TestEnv;

/// `users` users each ask once for each of `coupons`, which start with `initial` in stock; user u
/// asks for coupon c at score u·10 + c. Written as the API writes them, in either layout.
pub(crate) async fn flash_sale(env: &TestEnv, coupons: &[i64], initial: i64, users: i64) {
    for &c in coupons {
        env.set_stock(c, &initial.to_string()).await;
    }
    let mut entries = Vec::new();
    for u in 1..=users {
        for &c in coupons {
            entries.push(((u * 10 + c) as f64, format!("{u}:{c}")));
        }
    }
    commerce_worker::tools::simulated_api::enqueue_members(&env.redis, env.keys(), entries)
        .await
        .unwrap();
}

/// Puts two malformed members into each coupon's lane among the sale's requests (user 0 and a
/// user that is not a number); returns them, for [`assert_dead_letters`].
pub(crate) async fn enqueue_malformed(env: &TestEnv, coupons: &[i64]) -> Vec<String> {
    let mut all = Vec::new();
    for &c in coupons {
        let members = [format!("0:{c}"), format!("u{c}:{c}")];
        let entries: Vec<(f64, String)> = members
            .iter()
            .enumerate()
            .map(|(i, m)| (100.0 + i as f64 * 1000.0 + c as f64, m.clone()))
            .collect();
        let _: i64 = env
            .redis
            .zadd(&lane(env, c).queue, None, None, false, false, entries)
            .await
            .unwrap();
        all.extend(members);
    }
    all
}

/// The keys of `coupon`'s queue, outbox and dead-letter stream in either layout.
fn lane(env: &TestEnv, coupon: i64) -> KeyTemplates {
    if env.keys().per_coupon() {
        env.keys().for_coupon(coupon)
    } else {
        env.keys().clone()
    }
}

fn lanes(env: &TestEnv, coupons: &[i64]) -> Vec<KeyTemplates> {
    let mut lanes: Vec<KeyTemplates> = coupons.iter().map(|&c| lane(env, c)).collect();
    lanes.dedup_by(|a, b| a.queue == b.queue);
    lanes
}

/// The users in `coupon:issued:{coupon}`.
pub(crate) async fn holders(env: &TestEnv, coupon: i64) -> BTreeSet<i64> {
    let members: Vec<String> = env.redis.smembers(env.keys().issued(coupon)).await.unwrap();
    members
        .iter()
        .map(|m| m.parse().unwrap_or_else(|e| panic!("holder {m:?}: {e}")))
        .collect()
}

/// After a sale to `users` users was drained and its outbox flushed, for every coupon: queue and
/// outbox empty; `initial = remaining + |holders|`; the holders in Redis are exactly the users
/// with a row in `user_coupon` and exactly the users whose result is `ISSUED`; every user has a
/// result.
pub(crate) async fn assert_holders(env: &TestEnv, coupons: &[i64], initial: i64, users: i64) {
    for lane in lanes(env, coupons) {
        let queue: u64 = env.redis.zcard(&lane.queue).await.unwrap();
        assert_eq!(queue, 0, "queue {} drained", lane.queue);
        let outbox: u64 = env.redis.zcard(&lane.outbox).await.unwrap();
        assert_eq!(outbox, 0, "outbox {} flushed", lane.outbox);
    }
    for &c in coupons {
        let remaining: i64 = env.redis.get(env.keys().stock(c)).await.unwrap();
        let holders = holders(env, c).await;
        assert_eq!(
            initial,
            remaining + holders.len() as i64,
            "coupon {c}: initial = remaining + holders (a user issued twice costs two)"
        );
        let rows: BTreeSet<i64> =
            sqlx::query_scalar::<_, i64>("SELECT user_id FROM user_coupon WHERE coupon_id = ?")
                .bind(c)
                .fetch_all(&env.mysql)
                .await
                .unwrap()
                .into_iter()
                .collect();
        assert_eq!(
            rows, holders,
            "coupon {c}: user_coupon rows = Redis holders"
        );
        let results: HashMap<String, String> =
            env.redis.hgetall(env.keys().result(c)).await.unwrap();
        assert_eq!(
            results.len() as i64,
            users,
            "coupon {c}: every user has an outcome"
        );
        let issued: BTreeSet<i64> = results
            .iter()
            .filter(|(_, outcome)| *outcome == "ISSUED")
            .map(|(user, _)| user.parse().unwrap_or_else(|e| panic!("{user}: {e}")))
            .collect();
        assert_eq!(issued, holders, "coupon {c}: ISSUED results = holders");
    }
}

/// [`assert_holders`], and `seq` counts each of the sale's requests once.
pub(crate) async fn assert_invariants(env: &TestEnv, coupons: &[i64], initial: i64, users: i64) {
    assert_holders(env, coupons, initial, users).await;
    for &c in coupons {
        assert_eq!(
            seq(env, c).await,
            users,
            "coupon {c}: every request decided exactly once"
        );
    }
}

/// Every invariant a drained sale keeps, for the fault and replica tests: [`assert_invariants`],
/// [`assert_ranking_log`], and the dead-letter streams holding exactly `malformed`.
pub(crate) async fn assert_every_invariant(
    env: &TestEnv,
    coupons: &[i64],
    initial: i64,
    users: i64,
    malformed: &[String],
) {
    assert_invariants(env, coupons, initial, users).await;
    assert_ranking_log(env, coupons).await;
    assert_dead_letters(env, coupons, malformed).await;
}

/// How many requests for `coupon` were decided.
pub(crate) async fn seq(env: &TestEnv, coupon: i64) -> i64 {
    env.redis
        .get::<Option<i64>, _>(env.keys().seq(coupon))
        .await
        .unwrap()
        .unwrap_or(0)
}

/// `ranking_logs` once every row was written (docs/contract.md §4): the log streams empty, per coupon, ranks exactly 1..=n
/// where n is `seq` (one row per decided request, none twice, none lost), each user's
/// `ISSUED` row at most once, and the `ISSUED` users exactly the holders.
pub(crate) async fn assert_ranking_log(env: &TestEnv, coupons: &[i64]) {
    for lane in lanes(env, coupons) {
        let waiting: u64 = env.redis.xlen(&lane.log).await.unwrap();
        assert_eq!(
            waiting, 0,
            "log stream {} written and emptied (acknowledged after COMMIT)",
            lane.log
        );
    }
    for &c in coupons {
        let rows: Vec<(i64, i32, String)> = sqlx::query_as(
            "SELECT user_id, `rank`, status FROM ranking_logs WHERE coupon_type = ? ORDER BY `rank`",
        )
        .bind(c.to_string())
        .fetch_all(&env.mysql)
        .await
        .unwrap();
        let seq = seq(env, c).await;
        let ranks: Vec<i64> = rows.iter().map(|r| i64::from(r.1)).collect();
        if ranks != (1..=seq).collect::<Vec<_>>() {
            let mut counts: BTreeMap<i64, usize> = BTreeMap::new();
            for rank in &ranks {
                *counts.entry(*rank).or_default() += 1;
            }
            let doubled: Vec<i64> = counts
                .iter()
                .filter(|(_, n)| **n > 1)
                .map(|(r, _)| *r)
                .collect();
            let missing: Vec<i64> = (1..=seq).filter(|r| !counts.contains_key(r)).collect();
            panic!(
                "coupon {c}: ranking_logs ranks are not 1..={seq}: {} rows, {} doubled (first {:?}), \
                 {} missing (first {:?})",
                ranks.len(),
                doubled.len(),
                doubled.iter().take(10).collect::<Vec<_>>(),
                missing.len(),
                missing.iter().take(10).collect::<Vec<_>>()
            );
        }
        let mut issued_rows: Vec<i64> = rows
            .iter()
            .filter(|r| r.2 == "ISSUED")
            .map(|r| r.0)
            .collect();
        issued_rows.sort_unstable();
        let issued: BTreeSet<i64> = issued_rows.iter().copied().collect();
        assert_eq!(
            issued.len(),
            issued_rows.len(),
            "coupon {c}: no user has two ISSUED ranking-log rows"
        );
        assert_eq!(
            issued,
            holders(env, c).await,
            "coupon {c}: ISSUED ranking-log rows = holders"
        );
    }
}

/// The dead-letter streams of the coupons' lanes hold exactly `expected`, each once.
pub(crate) async fn assert_dead_letters(env: &TestEnv, coupons: &[i64], expected: &[String]) {
    let mut dead: Vec<String> = Vec::new();
    for lane in lanes(env, coupons) {
        let entries: Vec<(String, HashMap<String, String>)> =
            env.redis.xrange(&lane.dead, "-", "+", None).await.unwrap();
        dead.extend(
            entries
                .into_iter()
                .map(|(_, fields)| fields.get("member").cloned().unwrap_or_default()),
        );
    }
    dead.sort();
    let mut expected = expected.to_vec();
    expected.sort();
    assert_eq!(
        dead, expected,
        "the dead-letter stream holds each undecidable entry exactly once"
    );
}
