//! The shop API's part in a chaos run: a flash sale over several coupons and a few days of
//! orders, written as the API writes them (docs/contract.md §1), with a ledger of everything Redis
//! acknowledged, which the final checks compare the worker's results against.
//!
//! - Requests arrive in waves every 100 ms: random users asking for random coupons, so users ask
//!   twice (a second request while the first waits is refused by `ZADD NX`; one after the first
//!   was decided is a new request, decided `DUPLICATE` or `SOLD_OUT`), a coupon that has no
//!   stock key (`UNKNOWN_COUPON`), and now and then a malformed entry (dead-lettered). Each
//!   malformed member is sent once, so the dead-letter stream must hold each exactly once.
//! - Orders go to the day being "sold": the run is cut in thirds, selling days D-2, D-1 and D
//!   (D = today in the workers' timezone). Between thirds comes a simulated midnight: the day
//!   that ended is built with `rebuild-ranking --date`. A day before the window (D-3) is written
//!   at the start and must be pruned.
//!
//! Every API write happens under the API lock, and the nemesis takes that lock to kill or roll
//! back Redis: the API's own acknowledged writes are never what a rollback loses (the API is not
//! under test), so the ledger is exact and every loss the checks find is the worker's.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{Days, NaiveDate};
use fred::prelude::*;
use fred::types::scripts::Script;
use tokio::sync::Mutex;

use crate::keys::KeyTemplates;

/// `ZADD NX` of each (score, member) pair in ARGV into KEYS[1]; one 0/1 per member, so the
/// ledger knows exactly which requests were accepted.
const ENQUEUE_LUA: &str = r#"
local added = {}
for i = 1, #ARGV, 2 do
  added[#added + 1] = redis.call('ZADD', KEYS[1], 'NX', ARGV[i], ARGV[i + 1])
end
return added
"#;

/// Products in the catalog.
const PRODUCTS: u64 = 200;

/// The sale's shape, derived from the run's length and request rate.
#[derive(Clone, Debug)]
pub(super) struct Sale {
    /// (couponId, initial stock).
    pub coupons: Vec<(i64, i64)>,
    /// Requested but never given a stock key.
    pub unknown_coupon: i64,
    pub users: i64,
    /// Well-formed requests per 100 ms wave.
    pub per_wave: u64,
}

impl Sale {
    pub(super) fn new(rng: &mut fastrand::Rng, seconds: u64, rate: u64) -> Self {
        let total = (seconds * rate).max(100);
        let coupons: Vec<(i64, i64)> = (1..=4)
            .map(|id| {
                // Between a tenth and a third of the requests each coupon gets: every coupon
                // sells out part-way through.
                let asked = total / 4;
                (
                    id,
                    rng.i64((asked / 10).max(5) as i64..=(asked / 3).max(10) as i64),
                )
            })
            .collect();
        Self {
            coupons,
            unknown_coupon: 99,
            // Each user asks about three times over four coupons: duplicates are common.
            users: (total / 3).max(10) as i64,
            per_wave: (rate / 10).max(1),
        }
    }

    pub(super) fn coupon_ids(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self.coupons.iter().map(|(id, _)| *id).collect();
        ids.push(self.unknown_coupon);
        ids
    }
}

/// Everything Redis acknowledged to the API.
#[derive(Debug, Default)]
pub(super) struct Ledger {
    /// Well-formed member -> requests accepted (`ZADD NX` added it).
    pub accepted: HashMap<String, u32>,
    /// Malformed members accepted (each sent once).
    pub malformed: Vec<String>,
    /// Requests refused by `ZADD NX` (the same request was still waiting).
    pub refused: u64,
    /// Day -> product -> units sold.
    pub orders: BTreeMap<NaiveDate, HashMap<String, f64>>,
    /// Simulated midnights: (day built, what `rebuild-ranking --date` reported).
    pub midnights: Vec<(NaiveDate, String)>,
}

impl Ledger {
    /// Accepted well-formed requests for a coupon.
    pub(super) fn accepted_for(&self, coupon_id: i64) -> u64 {
        self.accepted
            .iter()
            .filter(|(member, _)| member_coupon(member) == Some(coupon_id))
            .map(|(_, n)| u64::from(*n))
            .sum()
    }

    pub(super) fn accepted_total(&self) -> u64 {
        self.accepted.values().map(|n| u64::from(*n)).sum::<u64>() + self.malformed.len() as u64
    }

    /// The ranking the window ending on `day` must hold (all weights 1).
    pub(super) fn expected_ranking(
        &self,
        day: NaiveDate,
        window_days: u32,
    ) -> HashMap<String, f64> {
        let mut sum: HashMap<String, f64> = HashMap::new();
        for back in 0..u64::from(window_days) {
            let Some(d) = day.checked_sub_days(Days::new(back)) else {
                continue;
            };
            for (product, qty) in self.orders.get(&d).into_iter().flatten() {
                *sum.entry(product.clone()).or_default() += qty;
            }
        }
        sum
    }
}

/// (userId, couponId) of a well-formed member.
pub(super) fn member_parts(member: &str) -> Option<(i64, i64)> {
    let (user, coupon) = member.split_once(':')?;
    Some((user.parse().ok()?, coupon.parse().ok()?))
}

fn member_coupon(member: &str) -> Option<i64> {
    member_parts(member).map(|(_, c)| c)
}

/// A malformed member, unique for `n`: the shapes the contract calls malformed.
fn malformed_member(n: u64) -> String {
    match n % 6 {
        0 => format!("abc{n}:1"),
        1 => format!("0:{n}x"),
        2 => format!("{n}:-3"),
        3 => format!("99999999999999999999{n}:1"),
        4 => format!("{n}:"),
        _ => format!("00{n}:2"),
    }
}

/// The run's own Redis client (the API's and the checks'), straight to the primary, never
/// through a fault proxy. A failover replaces it with one to the new primary (under the API
/// lock), so it is shared and looked up at each use.
#[derive(Clone)]
pub(super) struct RedisHandle(Arc<std::sync::Mutex<Client>>);

impl RedisHandle {
    pub(super) fn new(client: Client) -> Self {
        Self(Arc::new(std::sync::Mutex::new(client)))
    }

    /// The client to the primary now.
    pub(super) fn current(&self) -> Client {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Points at another primary; returns the old client (to be closed).
    pub(super) fn replace(&self, client: Client) -> Client {
        std::mem::replace(
            &mut *self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            client,
        )
    }
}

/// The API: its Redis client (direct, never through a fault proxy), the lock it shares with the
/// nemesis, and its ledger.
pub(super) struct Api {
    pub redis: RedisHandle,
    pub keys: KeyTemplates,
    pub lock: Arc<Mutex<()>>,
    pub sale: Sale,
    pub ledger: Ledger,
    script: Script,
    malformed_sent: u64,
}

impl Api {
    pub(super) fn new(
        redis: RedisHandle,
        keys: KeyTemplates,
        lock: Arc<Mutex<()>>,
        sale: Sale,
    ) -> Self {
        Self {
            redis,
            keys,
            lock,
            sale,
            ledger: Ledger::default(),
            script: Script::from_lua(ENQUEUE_LUA),
            malformed_sent: 0,
        }
    }

    /// Stock for every coupon, and the stale day's orders.
    pub(super) async fn prepare(
        &mut self,
        rng: &mut fastrand::Rng,
        stale_day: NaiveDate,
    ) -> anyhow::Result<()> {
        let _api = self.lock.lock().await;
        for (id, stock) in &self.sale.coupons {
            let _: () = self
                .redis
                .current()
                .set(self.keys.stock(*id), *stock, None, None, false)
                .await?;
        }
        drop(_api);
        self.orders(rng, stale_day, 50).await
    }

    /// One wave of requests (and, with `malformed`, one malformed entry) arriving at `now_ms`.
    pub(super) async fn requests(
        &mut self,
        rng: &mut fastrand::Rng,
        now_ms: i64,
        malformed: bool,
    ) -> anyhow::Result<()> {
        let mut members: Vec<String> = Vec::new();
        for _ in 0..self.sale.per_wave {
            let user = rng.i64(1..=self.sale.users);
            // One request in fifty is for the coupon nobody stocked.
            let coupon = if rng.u8(0..50) == 0 {
                self.sale.unknown_coupon
            } else {
                let coupons = &self.sale.coupons;
                coupons[rng.usize(0..coupons.len())].0
            };
            members.push(format!("{user}:{coupon}"));
        }
        let mut malformed_member_sent = None;
        if malformed {
            let member = malformed_member(self.malformed_sent);
            self.malformed_sent += 1;
            malformed_member_sent = Some(member.clone());
            members.push(member);
        }
        // The same member twice in one ZADD wave is the second refused, as two API calls
        // would be.
        let mut args: Vec<String> = Vec::with_capacity(members.len() * 2);
        for member in &members {
            args.push(now_ms.to_string());
            args.push(member.clone());
        }
        let _api = self.lock.lock().await;
        let added: Vec<i64> = self
            .script
            .evalsha_with_reload(&self.redis.current(), vec![self.keys.queue.clone()], args)
            .await?;
        drop(_api);
        for (member, added) in members.iter().zip(added) {
            if added == 1 {
                if malformed_member_sent.as_ref() == Some(member) {
                    self.ledger.malformed.push(member.clone());
                } else {
                    *self.ledger.accepted.entry(member.clone()).or_default() += 1;
                }
            } else {
                self.ledger.refused += 1;
            }
        }
        Ok(())
    }

    /// `count` orders on `day`: `ZINCRBY product:ranking:<day> <qty> <product>`.
    pub(super) async fn orders(
        &mut self,
        rng: &mut fastrand::Rng,
        day: NaiveDate,
        count: u64,
    ) -> anyhow::Result<()> {
        let key = self.keys.ranking_day(day);
        let mut sales: Vec<(String, f64)> = Vec::new();
        for _ in 0..count {
            // Skewed: low ids sell more, as best sellers do.
            let product = (rng.f64().powi(3) * PRODUCTS as f64) as u64 + 1;
            sales.push((product.to_string(), f64::from(rng.u32(1..=3))));
        }
        let _api = self.lock.lock().await;
        for (product, qty) in &sales {
            let _: f64 = self
                .redis
                .current()
                .zincrby(&key, *qty, product.as_str())
                .await?;
        }
        drop(_api);
        let day_orders = self.ledger.orders.entry(day).or_default();
        for (product, qty) in sales {
            *day_orders.entry(product).or_default() += qty;
        }
        Ok(())
    }
}
