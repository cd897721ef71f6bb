//! The invariants a chaos run checks once everything is healed and quiet, each printed with its
//! figures (docs/contract.md §2–§4): conservation per coupon, nobody twice, one outcome per accepted
//! request, one ranking-log row per decided request with ranks 1..n, the ranking equal to its
//! window's sum, dead letters with reasons, and nothing given up silently.

use std::collections::{BTreeMap, HashMap, HashSet};

use fred::prelude::*;
use sqlx::MySqlPool;

use super::workload::{ApiLoss, Ledger, Sale, member_parts};
use crate::keys::KeyTemplates;

/// A check and whether it held.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    /// The figures, one line each.
    pub details: Vec<String>,
}

impl Check {
    fn new(name: impl Into<String>, passed: bool, details: Vec<String>) -> Self {
        Self {
            name: name.into(),
            passed,
            details,
        }
    }
}

/// Shows at most a few examples of a long list.
fn examples<T: std::fmt::Debug>(items: &[T]) -> String {
    let shown: Vec<String> = items.iter().take(5).map(|i| format!("{i:?}")).collect();
    if items.len() > 5 {
        format!("{} (+{} more)", shown.join(", "), items.len() - 5)
    } else {
        shown.join(", ")
    }
}

/// What Redis acknowledged to the API and no longer holds (its witness gone with it, see
/// workload.rs). Not the worker's doing — the contract gives the API no durability rule to keep
/// to — so it does not fail the run; the other checks count only what Redis still witnesses.
/// The nemesis is built so that no fault loses an API write (it holds the API lock while it
/// kills, rolls back or fails over Redis), so anything here is a hole in that: the figures and
/// when the lost requests were sent say where to look.
pub(super) fn api_loss(loss: &ApiLoss, sale_start_ms: i64) -> Check {
    let secs = |ms: i64| (ms - sale_start_ms) as f64 / 1000.0;
    let mut details = vec![format!(
        "{} requests ({} members), {} malformed entries, {} order units ({} day/product pairs) acknowledged to the API and no longer in Redis{}",
        loss.requests.iter().map(|r| u64::from(r.1)).sum::<u64>(),
        loss.requests.len(),
        loss.malformed.len(),
        loss.orders.iter().map(|o| o.2).sum::<f64>(),
        loss.orders.len(),
        match loss.sent_between() {
            Some((from, to)) => format!(
                "; the lost requests were sent between {:.3}s and {:.3}s",
                secs(from),
                secs(to)
            ),
            None => String::new(),
        }
    )];
    if !loss.is_empty() {
        details.push(format!(
            "requests {}; malformed {}; orders {}",
            examples(&loss.requests),
            examples(&loss.malformed),
            examples(&loss.orders)
        ));
    }
    Check::new(
        "API writes Redis acknowledged and then lost (Redis' doing, not the worker's: counted here, left out of the checks below)",
        true,
        details,
    )
}

/// A `ranking_logs` row: user_id, coupon_type, rank, status, reason.
type LogRow = (i64, String, i32, String, Option<String>);

pub(super) struct Inputs<'a> {
    pub redis: &'a Client,
    pub mysql: &'a MySqlPool,
    pub keys: &'a KeyTemplates,
    pub sale: &'a Sale,
    pub ledger: &'a Ledger,
    pub window_days: u32,
    pub stale_day: chrono::NaiveDate,
    /// `ranking_log_rows_given_up_total` summed over the replicas' last scrape.
    pub given_up_metric: f64,
}

/// Per (user, coupon) of the `ranking_logs` rows: the outcome the user's result must show —
/// ISSUED if one of the rows is (ISSUED is never overwritten), else the latest row's (highest
/// rank) outcome, which is a FAILED row's reason (docs/contract.md §4).
struct RowOutcomes(HashMap<(i64, String), (i32, String, bool)>);

impl RowOutcomes {
    fn of(log_rows: &[LogRow]) -> Self {
        let mut map: HashMap<(i64, String), (i32, String, bool)> = HashMap::new();
        for (user, coupon, rank, status, reason) in log_rows {
            let outcome = if status == "ISSUED" {
                status.clone()
            } else {
                reason
                    .clone()
                    .unwrap_or_else(|| format!("{status} without a reason"))
            };
            let entry = map
                .entry((*user, coupon.clone()))
                .or_insert_with(|| (*rank, outcome.clone(), false));
            if *rank >= entry.0 {
                entry.0 = *rank;
                entry.1 = outcome;
            }
            entry.2 |= status == "ISSUED";
        }
        Self(map)
    }

    /// The results (user -> outcome) of `coupon` unlike what the user's rows say, as (user,
    /// result, rows' outcome or "no row"), sorted.
    fn disagreeing(
        &self,
        coupon: i64,
        results: &HashMap<String, String>,
    ) -> Vec<(String, String, String)> {
        let mut unlike: Vec<(String, String, String)> = results
            .iter()
            .filter_map(|(u, outcome)| {
                let rows = u
                    .parse::<i64>()
                    .ok()
                    .and_then(|user| self.0.get(&(user, coupon.to_string())));
                let want = match rows {
                    Some((_, _, true)) => "ISSUED".to_string(),
                    Some((_, latest, false)) => latest.clone(),
                    None => "no row".to_string(),
                };
                (*outcome != want).then(|| (u.clone(), outcome.clone(), want))
            })
            .collect();
        unlike.sort_unstable();
        unlike
    }
}

/// One coupon's ISSUED `ranking_logs` rows against its holders, by identity.
#[derive(Debug, Default, PartialEq)]
struct IssuedVsHolders {
    /// (user, ISSUED rows) for users with more than one.
    issued_twice: Vec<(i64, u32)>,
    /// Users with an ISSUED row who do not hold the coupon.
    issued_not_holding: Vec<i64>,
    /// Holders without an ISSUED row.
    holding_not_issued: Vec<i64>,
}

impl IssuedVsHolders {
    fn of(rows: &[&LogRow], holders: &HashSet<i64>) -> Self {
        let mut issued: HashMap<i64, u32> = HashMap::new();
        for row in rows.iter().filter(|r| r.3 == "ISSUED") {
            *issued.entry(row.0).or_default() += 1;
        }
        let mut found = Self {
            issued_twice: issued
                .iter()
                .filter(|(_, n)| **n > 1)
                .map(|(u, n)| (*u, *n))
                .collect(),
            issued_not_holding: issued
                .keys()
                .filter(|u| !holders.contains(*u))
                .copied()
                .collect(),
            holding_not_issued: holders
                .iter()
                .filter(|u| !issued.contains_key(*u))
                .copied()
                .collect(),
        };
        found.issued_twice.sort_unstable();
        found.issued_not_holding.sort_unstable();
        found.holding_not_issued.sort_unstable();
        found
    }
}

/// Both simulated midnights ran and built (a failed one is recorded as `FAILED: …`).
fn midnights_built(midnights: &[(chrono::NaiveDate, String)]) -> bool {
    midnights.len() == 2 && midnights.iter().all(|(_, out)| !out.starts_with("FAILED"))
}

/// Runs every check on the final state.
pub(super) async fn run(inputs: &Inputs<'_>) -> anyhow::Result<Vec<Check>> {
    let Inputs {
        redis,
        mysql,
        keys,
        sale,
        ledger,
        ..
    } = *inputs;
    let mut checks = Vec::new();

    // Conservation.
    let mut details = Vec::new();
    let mut passed = true;
    let mut holders_by_coupon: HashMap<i64, HashSet<i64>> = HashMap::new();
    for (coupon, initial) in &sale.coupons {
        let remaining: Option<i64> = redis.get(keys.stock(*coupon)).await?;
        let remaining = remaining.unwrap_or(-1);
        let holders: Vec<String> = redis.smembers(keys.issued(*coupon)).await?;
        let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM user_coupon WHERE coupon_id = ?")
            .bind(coupon)
            .fetch_one(mysql)
            .await?;
        let ok = *initial == remaining + holders.len() as i64 && holders.len() as i64 == rows;
        passed &= ok;
        details.push(format!(
            "coupon {coupon}: initial {initial} {} remaining {remaining} + holders {} {} rows {rows}",
            if *initial == remaining + holders.len() as i64 { "=" } else { "!=" },
            holders.len(),
            if holders.len() as i64 == rows { "=" } else { "!=" },
        ));
        holders_by_coupon.insert(
            *coupon,
            holders.iter().filter_map(|h| h.parse().ok()).collect(),
        );
    }
    checks.push(Check::new(
        "per coupon: initial stock = remaining + holders = rows in user_coupon",
        passed,
        details,
    ));

    // Nobody twice; the holders are exactly the rows.
    let doubled: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT user_id, coupon_id, COUNT(*) FROM user_coupon GROUP BY user_id, coupon_id HAVING COUNT(*) > 1",
    )
    .fetch_all(mysql)
    .await?;
    let rows: Vec<(i64, i64)> = sqlx::query_as("SELECT user_id, coupon_id FROM user_coupon")
        .fetch_all(mysql)
        .await?;
    let row_set: HashSet<(i64, i64)> = rows.iter().copied().collect();
    let holder_set: HashSet<(i64, i64)> = holders_by_coupon
        .iter()
        .flat_map(|(c, users)| users.iter().map(move |u| (*u, *c)))
        .collect();
    let mut only_rows: Vec<(i64, i64)> = row_set.difference(&holder_set).copied().collect();
    let mut only_redis: Vec<(i64, i64)> = holder_set.difference(&row_set).copied().collect();
    only_rows.sort_unstable();
    only_redis.sort_unstable();
    // A holder must have asked.
    let mut never_asked: Vec<(i64, i64)> = holder_set
        .iter()
        .filter(|(u, c)| !ledger.accepted.contains_key(&format!("{u}:{c}")))
        .copied()
        .collect();
    never_asked.sort_unstable();
    checks.push(Check::new(
        "no user holds a coupon twice; holders in Redis = rows in MySQL; every holder asked",
        doubled.is_empty()
            && only_rows.is_empty()
            && only_redis.is_empty()
            && never_asked.is_empty(),
        vec![
            format!(
                "{} rows, {} (user, coupon) pairs held twice {}",
                rows.len(),
                doubled.len(),
                examples(&doubled)
            ),
            format!(
                "rows without a holder in Redis: {} {}",
                only_rows.len(),
                examples(&only_rows)
            ),
            format!(
                "holders without a row: {} {}",
                only_redis.len(),
                examples(&only_redis)
            ),
            format!(
                "holders who never asked: {} {}",
                never_asked.len(),
                examples(&never_asked)
            ),
        ],
    ));

    let log_rows: Vec<LogRow> = sqlx::query_as(
        "SELECT user_id, coupon_type, `rank`, CAST(status AS CHAR), reason FROM ranking_logs",
    )
    .fetch_all(mysql)
    .await?;
    let row_outcome = RowOutcomes::of(&log_rows);

    // One outcome per accepted request: the queue and outbox are empty, every coupon's seq
    // counts its accepted requests, every asking user has a result and only askers have one,
    // ISSUED iff a holder, and each result is what the user's ranking_logs rows say.
    let queue: u64 = redis.zcard(&keys.queue).await?;
    let outbox: u64 = redis.zcard(&keys.outbox).await?;
    let mut details = vec![format!(
        "{} requests accepted ({} well-formed, {} malformed), {} refused by ZADD NX (still waiting); queue left {queue}, outbox left {outbox}",
        ledger.accepted_total(),
        ledger.accepted_total() - ledger.malformed.len() as u64,
        ledger.malformed.len(),
        ledger.refused
    )];
    let mut passed = queue == 0 && outbox == 0;
    for coupon in sale.coupon_ids() {
        let accepted = ledger.accepted_for(coupon);
        let seq: Option<i64> = redis.get(keys.seq(coupon)).await?;
        let seq = seq.unwrap_or(0);
        let results: HashMap<String, String> = redis.hgetall(keys.result(coupon)).await?;
        let askers: HashSet<String> = ledger
            .accepted
            .keys()
            .filter_map(|m| member_parts(m))
            .filter(|(_, c)| *c == coupon)
            .map(|(u, _)| u.to_string())
            .collect();
        let mut without: Vec<&String> = askers
            .iter()
            .filter(|u| !results.contains_key(*u))
            .collect();
        without.sort_unstable();
        let holders = holders_by_coupon.get(&coupon);
        let mut wrong: Vec<(String, String)> = results
            .iter()
            .filter(|(u, outcome)| {
                let holds = u
                    .parse::<i64>()
                    .ok()
                    .is_some_and(|u| holders.is_some_and(|h| h.contains(&u)));
                holds != (outcome.as_str() == "ISSUED")
            })
            .map(|(u, o)| (u.clone(), o.clone()))
            .collect();
        wrong.sort_unstable();
        let mut strangers: Vec<&String> = results.keys().filter(|u| !askers.contains(*u)).collect();
        strangers.sort_unstable();
        let unlike_rows = row_outcome.disagreeing(coupon, &results);
        let ok = seq == accepted as i64
            && without.is_empty()
            && wrong.is_empty()
            && strangers.is_empty()
            && unlike_rows.is_empty();
        passed &= ok;
        details.push(format!(
            "coupon {coupon}: {accepted} accepted, {seq} decided (seq){}; {} users asked, {} without a result {}; {} results for users who never asked {}; {} results disagreeing with the holders {}; {} results unlike the user's ranking_logs rows (user, result, rows) {}",
            if seq == accepted as i64 { "" } else { " MISMATCH" },
            askers.len(),
            without.len(),
            examples(&without),
            strangers.len(),
            examples(&strangers),
            wrong.len(),
            examples(&wrong),
            unlike_rows.len(),
            examples(&unlike_rows),
        ));
    }
    checks.push(Check::new(
        "every accepted request has exactly one outcome",
        passed,
        details,
    ));

    // The ranking log: one row per decided request, ranks 1..n per coupon; its ISSUED rows are
    // exactly the holders.
    let mut by_coupon: BTreeMap<String, Vec<&LogRow>> = BTreeMap::new();
    for row in &log_rows {
        by_coupon.entry(row.1.clone()).or_default().push(row);
    }
    let mut details = vec![format!("{} rows in ranking_logs", log_rows.len())];
    let mut passed = true;
    for coupon in sale.coupon_ids() {
        let expected = ledger.accepted_for(coupon) as i64;
        let rows = by_coupon.remove(&coupon.to_string()).unwrap_or_default();
        let mut rank_counts: BTreeMap<i32, u32> = BTreeMap::new();
        for row in &rows {
            *rank_counts.entry(row.2).or_default() += 1;
        }
        let missing: Vec<i64> = (1..=expected)
            .filter(|r| !rank_counts.contains_key(&(*r as i32)))
            .collect();
        let doubled: Vec<i32> = rank_counts
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(r, _)| *r)
            .collect();
        let beyond: Vec<i32> = rank_counts
            .keys()
            .filter(|r| **r < 1 || i64::from(**r) > expected)
            .copied()
            .collect();
        // Per request: rows per (user, coupon) = requests accepted for it.
        let mut per_member: HashMap<String, u32> = HashMap::new();
        for row in &rows {
            *per_member.entry(format!("{}:{coupon}", row.0)).or_default() += 1;
        }
        let mut off: Vec<(String, u32, u32)> = ledger
            .accepted
            .iter()
            .filter(|(m, _)| member_parts(m).is_some_and(|(_, c)| c == coupon))
            .map(|(m, n)| (m.clone(), *n, per_member.remove(m).unwrap_or(0)))
            .filter(|(_, want, got)| want != got)
            .collect();
        off.extend(per_member.into_iter().map(|(m, got)| (m, 0, got)));
        off.sort_unstable();
        let issued_rows = rows.iter().filter(|r| r.3 == "ISSUED").count();
        let empty = HashSet::new();
        let holder_users = holders_by_coupon.get(&coupon).unwrap_or(&empty);
        let holders = holder_users.len();
        let IssuedVsHolders {
            issued_twice,
            issued_not_holding,
            holding_not_issued,
        } = IssuedVsHolders::of(&rows, holder_users);
        let issued_ok = issued_twice.is_empty()
            && issued_not_holding.is_empty()
            && holding_not_issued.is_empty();
        let ok = rows.len() as i64 == expected
            && missing.is_empty()
            && doubled.is_empty()
            && beyond.is_empty()
            && off.is_empty()
            && issued_ok;
        passed &= ok;
        details.push(format!(
            "coupon {coupon}: {} rows for {expected} decided; ranks missing {} {}, doubled {} {}, out of 1..{expected} {}; requests with the wrong number of rows {} {}; ISSUED rows {issued_rows} for {holders} holders (holders in Redis = user_coupon rows, checked above): users with two ISSUED rows {} {}, ISSUED rows of non-holders {} {}, holders without an ISSUED row {} {}",
            rows.len(),
            missing.len(),
            examples(&missing),
            doubled.len(),
            examples(&doubled),
            beyond.len(),
            off.len(),
            examples(&off),
            issued_twice.len(),
            examples(&issued_twice),
            issued_not_holding.len(),
            examples(&issued_not_holding),
            holding_not_issued.len(),
            examples(&holding_not_issued),
        ));
    }
    if !by_coupon.is_empty() {
        passed = false;
        details.push(format!(
            "rows for coupons nobody asked for: {:?}",
            by_coupon.keys().collect::<Vec<_>>()
        ));
    }
    checks.push(Check::new(
        "one ranking_logs row per decided request, ranks 1..n per coupon; the ISSUED rows are exactly the holders",
        passed,
        details,
    ));

    // The ranking.
    let built: Option<String> = redis.hget(keys.ranking_live_record(), "day").await?;
    let built_day = built
        .as_deref()
        .and_then(|d| chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d").ok());
    let ranking: Vec<(String, f64)> = redis
        .zrange(&keys.ranking_window, 0, -1, None, false, None, true)
        .await?;
    let stale_left: bool = redis.exists(keys.ranking_day(inputs.stale_day)).await?;
    let (passed, detail) = match built_day {
        None => (false, format!("no live ranking recorded ({built:?})")),
        Some(day) => {
            let expected = ledger.expected_ranking(day, inputs.window_days);
            let got: HashMap<String, f64> = ranking.iter().cloned().collect();
            let mut differ: Vec<(String, f64, f64)> = expected
                .iter()
                .map(|(p, want)| (p.clone(), *want, got.get(p).copied().unwrap_or(0.0)))
                .filter(|(_, want, got)| (want - got).abs() > 1e-6)
                .collect();
            differ.extend(
                got.iter()
                    .filter(|(p, _)| !expected.contains_key(*p))
                    .map(|(p, g)| (p.clone(), 0.0, *g)),
            );
            differ.sort_by(|a, b| a.0.cmp(&b.0));
            (
                differ.is_empty(),
                format!(
                    "last day built {day}: {} products in the ranking, {} expected from the orders of {} .. {day}; {} differ {}",
                    got.len(),
                    expected.len(),
                    day.checked_sub_days(chrono::Days::new(u64::from(
                        inputs.window_days.saturating_sub(1)
                    )))
                    .unwrap_or(day),
                    differ.len(),
                    examples(&differ)
                ),
            )
        }
    };
    let midnights_ok = midnights_built(&ledger.midnights);
    checks.push(Check::new(
        "the ranking equals the sum of the window of the last day built; both simulated midnights built; the stale day pruned",
        passed && !stale_left && midnights_ok,
        vec![
            detail,
            format!(
                "simulated midnights: {}",
                ledger
                    .midnights
                    .iter()
                    .map(|(d, out)| format!("{d}: {out}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            format!(
                "day before the window ({}) still there: {stale_left}",
                inputs.stale_day
            ),
        ],
    ));

    // Dead letters.
    let dead: Vec<(String, HashMap<String, String>)> =
        redis.xrange(&keys.dead, "-", "+", None).await?;
    let without_reason: Vec<&String> = dead
        .iter()
        .filter(|(_, f)| {
            f.get("reason").is_none_or(|r| r.is_empty())
                || f.get("member").is_none()
                || f.get("score").is_none()
        })
        .map(|(id, _)| id)
        .collect();
    let mut dead_members: HashMap<&str, u32> = HashMap::new();
    for (_, fields) in &dead {
        if let Some(m) = fields.get("member") {
            *dead_members.entry(m.as_str()).or_default() += 1;
        }
    }
    let mut missing: Vec<&String> = ledger
        .malformed
        .iter()
        .filter(|m| !dead_members.contains_key(m.as_str()))
        .collect();
    missing.sort_unstable();
    let mut extra: Vec<(&str, u32)> = dead_members
        .iter()
        .filter(|(m, n)| **n > 1 || !ledger.malformed.iter().any(|x| x == *m))
        .map(|(m, n)| (*m, *n))
        .collect();
    extra.sort_unstable();
    checks.push(Check::new(
        "every malformed request dead-lettered exactly once, none without a reason",
        without_reason.is_empty() && missing.is_empty() && extra.is_empty(),
        vec![format!(
            "{} dead letters for {} malformed requests; without member/score/reason {} {}; malformed not dead-lettered {} {}; unexpected or repeated {} {}",
            dead.len(),
            ledger.malformed.len(),
            without_reason.len(),
            examples(&without_reason),
            missing.len(),
            examples(&missing),
            extra.len(),
            examples(&extra)
        )],
    ));

    // Nothing given up silently: no ranking-log row left waiting in Redis, none moved to a
    // log dead-letter stream.
    let (waiting, _) = crate::ranking_log::stream::backlog(redis, keys).await?;
    let mut dead_lettered = 0u64;
    for lane in crate::coupon::queue_keys(redis, keys).await? {
        dead_lettered += redis.xlen::<u64, _>(lane.log_dead()).await?;
    }
    checks.push(Check::new(
        "nothing given up silently: every ranking-log row left Redis for MySQL, none dead-lettered",
        waiting == 0 && dead_lettered == 0 && inputs.given_up_metric == 0.0,
        vec![format!(
            "rows waiting in the log streams {waiting}, log entries dead-lettered {dead_lettered}; given-up rows counted by the replicas' metrics {}",
            inputs.given_up_metric
        )],
    ));
    Ok(checks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(user: i64, rank: i32, status: &str, reason: Option<&str>) -> LogRow {
        (
            user,
            "1".to_string(),
            rank,
            status.to_string(),
            reason.map(str::to_string),
        )
    }

    #[test]
    fn a_result_must_say_what_the_users_rows_say() {
        let rows = vec![
            row(7, 1, "ISSUED", None),
            row(7, 5, "FAILED", Some("DUPLICATE")),
            row(8, 2, "FAILED", Some("SOLD_OUT")),
            row(8, 9, "FAILED", Some("DUPLICATE")),
            row(9, 3, "FAILED", Some("SOLD_OUT")),
        ];
        let outcomes = RowOutcomes::of(&rows);
        let results = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(u, o)| (u.to_string(), o.to_string()))
                .collect()
        };
        // ISSUED is never overwritten; otherwise the latest row's reason.
        let agreeing = results(&[("7", "ISSUED"), ("8", "DUPLICATE"), ("9", "SOLD_OUT")]);
        assert_eq!(outcomes.disagreeing(1, &agreeing), vec![]);
        let wrong = results(&[
            ("7", "DUPLICATE"),
            ("8", "SOLD_OUT"),
            ("9", "SOLD_OUT"),
            ("10", "ISSUED"),
        ]);
        assert_eq!(
            outcomes.disagreeing(1, &wrong),
            vec![
                ("10".into(), "ISSUED".into(), "no row".into()),
                ("7".into(), "DUPLICATE".into(), "ISSUED".into()),
                ("8".into(), "SOLD_OUT".into(), "DUPLICATE".into()),
            ]
        );
        // Rows of another coupon say nothing about this one.
        assert_eq!(
            outcomes
                .disagreeing(2, &results(&[("9", "SOLD_OUT")]))
                .len(),
            1
        );
    }

    #[test]
    fn issued_rows_are_compared_with_the_holders_by_identity_not_by_count() {
        let rows = [
            row(1, 1, "ISSUED", None),
            row(2, 2, "ISSUED", None),
            row(3, 3, "FAILED", Some("SOLD_OUT")),
        ];
        let refs: Vec<&LogRow> = rows.iter().collect();
        assert_eq!(
            IssuedVsHolders::of(&refs, &HashSet::from([1, 2])),
            IssuedVsHolders::default()
        );
        // As many ISSUED rows as holders, but not the same users.
        assert_eq!(
            IssuedVsHolders::of(&refs, &HashSet::from([1, 3])),
            IssuedVsHolders {
                issued_twice: vec![],
                issued_not_holding: vec![2],
                holding_not_issued: vec![3],
            }
        );
        let twice = [row(1, 1, "ISSUED", None), row(1, 4, "ISSUED", None)];
        let refs: Vec<&LogRow> = twice.iter().collect();
        assert_eq!(
            IssuedVsHolders::of(&refs, &HashSet::from([1])).issued_twice,
            vec![(1, 2)]
        );
    }

    #[test]
    fn a_failed_or_missing_midnight_fails_the_ranking_check() {
        let day = chrono::NaiveDate::from_ymd_opt(2026, 11, 22).unwrap_or_default();
        let built = (day, "ranking rebuilt for 2026-11-22".to_string());
        assert!(midnights_built(&[built.clone(), built.clone()]));
        assert!(!midnights_built(std::slice::from_ref(&built)));
        assert!(!midnights_built(&[
            built,
            (day, "FAILED: 61 attempts, the last: …".into())
        ]));
    }
}
