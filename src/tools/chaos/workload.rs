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
//! Every API write happens under the API lock, and the nemesis takes that lock to kill, roll
//! back or fail over Redis: the API's own acknowledged writes are not meant to be what a fault
//! loses (the API is not under test). The contract gives the API no durability rule of its own
//! (docs/contract.md §1: a `ZADD NX`, a `ZINCRBY`), so should Redis lose an acknowledged API
//! write anyway, the worker cannot be blamed for it. Each API write therefore carries a
//! *witness* written by the same script, in keys the worker never touches (`chaos:api:*`): a
//! script is applied, replicated and appended to the AOF as one unit, so the witness is lost
//! exactly when the write is. At the end the checks hold the worker to what the witnesses say
//! survived ([`Ledger::witnessed`]) and report separately, as Redis' doing, what the API was
//! told and Redis no longer has. A worker fault cannot hide there: the worker never writes the
//! witnesses, and a request whose witness survived must have its one outcome.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{Days, NaiveDate};
use fred::prelude::*;
use fred::types::scripts::Script;
use tokio::sync::Mutex;

use crate::keys::KeyTemplates;

/// `ZADD NX` of each (score, member) pair in ARGV into KEYS[1]; one 0/1 per member, so the
/// ledger knows exactly which requests were accepted. Each accepted one is counted in the
/// witness hash KEYS[2] (member -> times accepted).
const ENQUEUE_LUA: &str = r#"
local added = {}
for i = 1, #ARGV, 2 do
  local n = redis.call('ZADD', KEYS[1], 'NX', ARGV[i], ARGV[i + 1])
  if n == 1 then redis.call('HINCRBY', KEYS[2], ARGV[i + 1], 1) end
  added[#added + 1] = n
end
return added
"#;

/// `ZINCRBY KEYS[1]` of each (units, product) pair in ARGV, each also added to the witness hash
/// KEYS[2] (product -> units).
const ORDERS_LUA: &str = r#"
for i = 1, #ARGV, 2 do
  redis.call('ZINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('HINCRBY', KEYS[2], ARGV[i + 1], ARGV[i])
end
return #ARGV / 2
"#;

/// The witness of the accepted requests (well-formed and malformed): member -> times accepted.
const REQUESTS_WITNESS: &str = "chaos:api:accepted";

/// The witness of a day's orders: product -> units.
fn orders_witness(day: NaiveDate) -> String {
    format!("chaos:api:orders:{day}")
}

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
#[derive(Debug, Default, Clone)]
pub(super) struct Ledger {
    /// Well-formed member -> requests accepted (`ZADD NX` added it).
    pub accepted: HashMap<String, u32>,
    /// Well-formed member -> when each of its accepted requests was sent (epoch ms), in order.
    pub accepted_at: HashMap<String, Vec<i64>>,
    /// Malformed members accepted (each sent once).
    pub malformed: Vec<String>,
    /// Malformed member -> when it was sent (epoch ms).
    pub malformed_at: HashMap<String, i64>,
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

/// The API writes Redis acknowledged and no longer holds (their witnesses are gone with them).
#[derive(Debug, Default, Clone)]
pub(super) struct ApiLoss {
    /// (member, requests lost, when the lost ones were sent: the latest acceptances).
    pub requests: Vec<(String, u32, Vec<i64>)>,
    /// (malformed member, when it was sent).
    pub malformed: Vec<(String, i64)>,
    /// (day, product, units lost).
    pub orders: Vec<(NaiveDate, String, f64)>,
}

impl ApiLoss {
    pub(super) fn is_empty(&self) -> bool {
        self.requests.is_empty() && self.malformed.is_empty() && self.orders.is_empty()
    }

    /// When the lost requests (well-formed and malformed) were sent: (earliest, latest) epoch ms.
    pub(super) fn sent_between(&self) -> Option<(i64, i64)> {
        let times = self
            .requests
            .iter()
            .flat_map(|(_, _, at)| at.iter().copied())
            .chain(self.malformed.iter().map(|(_, at)| *at));
        times.fold(None, |span, t| match span {
            None => Some((t, t)),
            Some((a, b)) => Some((a.min(t), b.max(t))),
        })
    }
}

impl Ledger {
    /// The ledger as Redis still witnesses it: each accepted request, malformed entry and order
    /// only if its witness survived (see the module docs), and what did not. The checks hold
    /// the worker to the first; the second is Redis' doing.
    pub(super) async fn witnessed(&self, redis: &Client) -> anyhow::Result<(Ledger, ApiLoss)> {
        let requests: HashMap<String, u32> = redis.hgetall(REQUESTS_WITNESS).await?;
        let mut kept = self.clone();
        let mut loss = ApiLoss::default();
        for (member, n) in &self.accepted {
            let witnessed = requests.get(member).copied().unwrap_or(0).min(*n);
            if witnessed < *n {
                let at = self.accepted_at.get(member).cloned().unwrap_or_default();
                let lost_at = at.get(witnessed as usize..).unwrap_or_default().to_vec();
                loss.requests.push((member.clone(), n - witnessed, lost_at));
                if witnessed == 0 {
                    kept.accepted.remove(member);
                } else {
                    kept.accepted.insert(member.clone(), witnessed);
                }
            }
        }
        kept.malformed.retain(|member| {
            let witnessed = requests.get(member).copied().unwrap_or(0) > 0;
            if !witnessed {
                let at = self.malformed_at.get(member).copied().unwrap_or(0);
                loss.malformed.push((member.clone(), at));
            }
            witnessed
        });
        for (day, orders) in &self.orders {
            let witness: HashMap<String, f64> = redis.hgetall(orders_witness(*day)).await?;
            let kept_day = kept.orders.entry(*day).or_default();
            for (product, units) in orders {
                let witnessed = witness.get(product).copied().unwrap_or(0.0).min(*units);
                if witnessed < *units {
                    loss.orders.push((*day, product.clone(), units - witnessed));
                    if witnessed > 0.0 {
                        kept_day.insert(product.clone(), witnessed);
                    } else {
                        kept_day.remove(product);
                    }
                }
            }
        }
        loss.requests.sort_by(|a, b| a.0.cmp(&b.0));
        loss.malformed.sort();
        loss.orders.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        Ok((kept, loss))
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
    orders_script: Script,
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
            orders_script: Script::from_lua(ORDERS_LUA),
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
            .evalsha_with_reload(
                &self.redis.current(),
                vec![self.keys.queue.clone(), REQUESTS_WITNESS.to_owned()],
                args,
            )
            .await?;
        drop(_api);
        for (member, added) in members.iter().zip(added) {
            if added == 1 {
                if malformed_member_sent.as_ref() == Some(member) {
                    self.ledger.malformed.push(member.clone());
                    self.ledger.malformed_at.insert(member.clone(), now_ms);
                } else {
                    *self.ledger.accepted.entry(member.clone()).or_default() += 1;
                    self.ledger
                        .accepted_at
                        .entry(member.clone())
                        .or_default()
                        .push(now_ms);
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
        let mut args: Vec<String> = Vec::with_capacity(sales.len() * 2);
        for (product, qty) in &sales {
            args.push(format!("{qty:.0}"));
            args.push(product.clone());
        }
        let _api = self.lock.lock().await;
        let _: i64 = self
            .orders_script
            .evalsha_with_reload(&self.redis.current(), vec![key, orders_witness(day)], args)
            .await?;
        drop(_api);
        let day_orders = self.ledger.orders.entry(day).or_default();
        for (product, qty) in sales {
            *day_orders.entry(product).or_default() += qty;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::chaos::servers::PrivateRedis;

    /// A Redis that lost part of what it acknowledged to the API (the loss is played by deleting
    /// a request and an order with their witnesses, as a rollback would): the witnessed ledger
    /// keeps the rest and names what went, with when it was sent.
    #[tokio::test]
    async fn the_witnessed_ledger_leaves_out_and_names_what_redis_lost() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let server = PrivateRedis::start(dir.path()).await?;
        let mut config =
            crate::config::Config::from_toml_str("", std::path::Path::new("chaos.toml"), |_| None)?;
        config.redis.url = crate::config::SecretUrl::new(server.url());
        let client = crate::backends::connect_redis(&config.redis).await?;
        let mut rng = fastrand::Rng::with_seed(7);
        let sale = Sale::new(&mut rng, 10, 100);
        let keys = KeyTemplates::default();
        let mut api = Api::new(
            RedisHandle::new(client.clone()),
            keys.clone(),
            Arc::new(Mutex::new(())),
            sale,
        );
        let day = NaiveDate::from_ymd_opt(2026, 11, 24).unwrap_or_default();
        api.requests(&mut rng, 1000, true).await?;
        api.requests(&mut rng, 2000, false).await?;
        api.orders(&mut rng, day, 20).await?;
        let (kept, loss) = api.ledger.witnessed(&client).await?;
        assert!(loss.is_empty(), "{loss:?}");
        assert_eq!(kept.accepted, api.ledger.accepted);
        assert_eq!(kept.orders, api.ledger.orders);

        // Redis loses one request of the second wave, the malformed entry and one product's
        // orders, each with its witness.
        let lost_member = api
            .ledger
            .accepted_at
            .iter()
            .find(|(_, at)| at == &&vec![2000]);
        let (lost_member, _) = lost_member.expect("a member accepted once, in the second wave");
        let malformed = api.ledger.malformed[0].clone();
        let (product, units) = api.ledger.orders[&day].iter().next().expect("an order");
        let _: i64 = client
            .hdel(
                REQUESTS_WITNESS,
                vec![lost_member.clone(), malformed.clone()],
            )
            .await?;
        let _: i64 = client.hdel(orders_witness(day), product.as_str()).await?;
        let (kept, loss) = api.ledger.witnessed(&client).await?;
        assert_eq!(loss.requests, vec![(lost_member.clone(), 1, vec![2000])]);
        assert_eq!(loss.malformed, vec![(malformed, 1000)]);
        assert_eq!(loss.orders, vec![(day, product.clone(), *units)]);
        assert_eq!(loss.sent_between(), Some((1000, 2000)));
        assert!(!kept.accepted.contains_key(lost_member));
        assert_eq!(kept.accepted.len(), api.ledger.accepted.len() - 1);
        assert!(kept.malformed.is_empty());
        assert!(!kept.orders[&day].contains_key(product));
        Ok(())
    }
}
