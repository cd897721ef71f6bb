//! The shop API's side of the contract, played by `bench` and `demo`: it writes what the real API
//! writes (docs/contract.md §1), in the way the README tells API authors to write it.
//!
//! - A coupon request is `ZADD NX coupon:queue <arrival ms> <userId>:<couponId>`; a coupon's
//!   stock is a plain integer string at `coupon:stock:<couponId>`.
//! - An order adds the quantity to the product's score in the day's set,
//!   `ZINCRBY product:ranking:<YYYY-MM-DD> <qty> <productId>`, the date being the order's day in
//!   the worker's `[ranking] timezone`. Bulk loads here use `ZADD` with the day's totals, which
//!   gives the same set.
//!
//! It also plays the decide script's part in one place, [`append_log_entry`], to feed the
//! ranking-log pipeline alone (its benchmark and tests).

use std::collections::BTreeMap;

use chrono::NaiveDate;
use fred::prelude::*;

use crate::coupon::member::parse_member;
use crate::coupon::queue_keys;
use crate::keys::KeyTemplates;
use crate::ranking_log::{LogEntry, LogRow};

/// Members per ZADD when loading in bulk: large enough to be fast, small enough that no single
/// command blocks Redis for long.
const ZADD_CHUNK: usize = 5_000;

/// A first-come-first-served flash sale: `requests` requests spread round-robin over coupons
/// `1..=coupons`, each with `stock` coupons, users numbered from 1 so that every member is
/// distinct.
#[derive(Debug, Clone, Copy)]
pub struct FlashSale {
    pub coupons: u64,
    pub stock: u64,
    pub requests: u64,
}

impl FlashSale {
    /// The `i`-th request (0-based): coupon `i % coupons + 1`, user `i / coupons + 1`.
    pub fn request(&self, i: u64) -> (i64, i64) {
        let coupons = self.coupons.max(1);
        ((i / coupons + 1) as i64, (i % coupons + 1) as i64)
    }

    /// Coupons that will be issued: every coupon's stock, or fewer if fewer asked.
    pub fn expected_issued(&self) -> u64 {
        let coupons = self.coupons.max(1);
        (0..coupons)
            .map(|c| {
                let asked = self.requests / coupons + u64::from(c < self.requests % coupons);
                asked.min(self.stock)
            })
            .sum()
    }

    /// Sets every coupon's stock.
    pub async fn write_stock(&self, redis: &Client, keys: &KeyTemplates) -> anyhow::Result<()> {
        for coupon_id in 1..=self.coupons as i64 {
            let _: () = redis
                .set(keys.stock(coupon_id), self.stock, None, None, false)
                .await?;
        }
        Ok(())
    }

    /// Enqueues requests `range` with arrival times from `first_arrival_ms`, ten requests per
    /// millisecond (so some share a score, as real arrivals do).
    pub async fn enqueue(
        &self,
        redis: &Client,
        keys: &KeyTemplates,
        range: std::ops::Range<u64>,
        first_arrival_ms: i64,
    ) -> anyhow::Result<()> {
        let mut chunk: Vec<(f64, String)> = Vec::with_capacity(ZADD_CHUNK);
        for i in range {
            let (user_id, coupon_id) = self.request(i);
            chunk.push((
                (first_arrival_ms + (i / 10) as i64) as f64,
                format!("{user_id}:{coupon_id}"),
            ));
            if chunk.len() == ZADD_CHUNK {
                enqueue_members(redis, keys, std::mem::take(&mut chunk)).await?;
            }
        }
        if !chunk.is_empty() {
            enqueue_members(redis, keys, chunk).await?;
        }
        Ok(())
    }
}

/// `ZADD NX` of `(arrival ms, member)` pairs into the queue, as the API does; returns how many
/// were added (a request already waiting is not). In the per-coupon layout each request goes
/// to its coupon's queue, the coupon into the registry (`SADD`) and, after the ZADD, into the
/// active set (`SADD`); a member without a
/// readable couponId goes to coupon 1's queue, where the drain dead-letters it.
pub async fn enqueue_members(
    redis: &Client,
    keys: &KeyTemplates,
    entries: Vec<(f64, String)>,
) -> anyhow::Result<u64> {
    // Per coupon, or all in the one queue (`None`).
    let mut by_coupon: BTreeMap<Option<i64>, Vec<(f64, String)>> = BTreeMap::new();
    for (score, member) in entries {
        let coupon = keys
            .per_coupon()
            .then(|| parse_member(&member).map_or(1, |r| r.coupon_id));
        by_coupon.entry(coupon).or_default().push((score, member));
    }
    let mut added = 0;
    for (coupon, entries) in by_coupon {
        let queue = match coupon {
            Some(coupon) => {
                let _: u64 = redis.sadd(&keys.coupon_registry, coupon).await?;
                keys.for_coupon(coupon).queue
            }
            None => keys.queue.clone(),
        };
        let n: u64 = redis
            .zadd(queue, Some(SetOptions::NX), None, false, false, entries)
            .await?;
        // The "this coupon has work" mark, after the ZADD has answered (README).
        if let Some(coupon) = coupon {
            let _: u64 = redis.sadd(&keys.coupon_active, coupon).await?;
        }
        added += n;
    }
    Ok(added)
}

/// Requests waiting, over every queue.
pub async fn queued(redis: &Client, keys: &KeyTemplates) -> anyhow::Result<u64> {
    let mut total = 0;
    for queue in queue_keys(redis, keys).await? {
        let n: u64 = redis.zcard(&queue.queue).await?;
        total += n;
    }
    Ok(total)
}

/// Writes a day's sales: `(quantity, product id)` pairs into that day's ranking set.
pub async fn write_day_sales(
    redis: &Client,
    keys: &KeyTemplates,
    day: NaiveDate,
    sales: impl IntoIterator<Item = (f64, String)>,
) -> anyhow::Result<()> {
    let key = keys.ranking_day(day);
    let mut chunk: Vec<(f64, String)> = Vec::with_capacity(ZADD_CHUNK);
    for sale in sales {
        chunk.push(sale);
        if chunk.len() == ZADD_CHUNK {
            let _: i64 = redis
                .zadd(&key, None, None, false, false, std::mem::take(&mut chunk))
                .await?;
        }
    }
    if !chunk.is_empty() {
        let _: i64 = redis.zadd(&key, None, None, false, false, chunk).await?;
    }
    Ok(())
}

/// Appends `rows` to `lane`'s log stream as one entry and adds them to its row counter, as the
/// decide script does: for the ranking-log benchmark and the tests that feed the log pipeline
/// alone.
pub async fn append_log_entry(
    redis: &Client,
    lane: &KeyTemplates,
    rows: &[LogRow],
) -> anyhow::Result<()> {
    let fields = LogEntry::encode(rows).into_fields();
    let _: String = redis.xadd(&lane.log, false, None, "*", fields).await?;
    let _: i64 = redis.incr_by(lane.log_rows(), rows.len() as i64).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_distinct_and_spread_round_robin() {
        let sale = FlashSale {
            coupons: 3,
            stock: 2,
            requests: 7,
        };
        let all: Vec<(i64, i64)> = (0..7).map(|i| sale.request(i)).collect();
        assert_eq!(
            all,
            vec![(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3), (3, 1)]
        );
        // Coupon 1 is asked 3 times, 2 and 3 twice each: 2 + 2 + 2 issued.
        assert_eq!(sale.expected_issued(), 6);
        let few = FlashSale {
            coupons: 3,
            stock: 10,
            requests: 4,
        };
        assert_eq!(few.expected_issued(), 4);
    }
}
