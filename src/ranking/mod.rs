//! The ranking rebuild (CONTRACT.md §3): `product:ranking:3d` becomes the (weighted) sum of the
//! window's daily keys, swapped in atomically; daily keys older than the window are deleted.
//!
//! One rebuild for day D:
//!
//! 1. Take a short Redis lock so replicas firing at the same midnight do not all do the work (the
//!    result is idempotent anyway: the lock saves work, not correctness).
//! 2. Build the sum into a fresh temporary key, either with one `ZUNIONSTORE` (small windows) or,
//!    above `chunked_threshold` members, by reading each day with `ZSCAN` and writing the sum
//!    with `ZADD` in chunks of 1000, so no single command blocks Redis for long (a ZUNIONSTORE
//!    of 3 × 1 000 000 members blocks it for seconds).
//! 3. Swap the temporary key in with one Lua call (`RENAME`), after moving the old ranking aside
//!    and `UNLINK`ing it so its memory is freed off the main thread. Readers see the old ranking
//!    or the new one, never a missing or half-built one.
//! 4. Prune: `SCAN` for every daily key and `UNLINK` those older than the window — including days
//!    missed while the worker was down. Window keys get an `EXPIREAT` as a safety net.
//!
//! Days are calendar days in `[ranking] timezone`; the API must name daily keys the same way.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Days, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use fred::prelude::*;
use fred::types::scan::Scanner;
use fred::types::scripts::Script;
use futures_util::TryStreamExt;

use crate::config::RankingConfig;
use crate::keys::KeyTemplates;
use crate::metrics::Metrics;

const SWAP_LUA: &str = r#"#!lua
-- KEYS[1] temporary key with the new ranking (absent if the window is empty), KEYS[2] the ranking,
-- KEYS[3] where the old ranking is moved before it is unlinked (freed off the main thread).
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('RENAME', KEYS[2], KEYS[3])
  redis.call('UNLINK', KEYS[3])
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('RENAME', KEYS[1], KEYS[2])
  redis.call('PERSIST', KEYS[2])
end
return redis.call('ZCARD', KEYS[2])
"#;

const RELEASE_LOCK_LUA: &str = r#"#!lua
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// Members read or written per command by the chunked strategy.
const CHUNK: usize = 1000;
/// A rebuild holding the lock longer than this is presumed dead.
const LOCK_TTL: Duration = Duration::from_secs(300);
/// A temporary key left by a crashed rebuild disappears after this.
const TEMP_KEY_TTL_SECS: i64 = 3600;

/// How the sum is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// One ZUNIONSTORE: fastest, but blocks Redis for the whole computation.
    Zunionstore,
    /// ZSCAN each day, sum in the worker, ZADD in chunks: never blocks Redis for long.
    Chunked,
}

/// What to do when another replica holds the rebuild lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenLocked {
    /// The scheduled job: the other replica is doing the same work.
    Skip,
    /// The `rebuild-ranking` command: wait for it, then rebuild.
    Wait,
}

/// What one rebuild did.
#[derive(Debug, Clone, PartialEq)]
pub struct RebuildReport {
    pub day: NaiveDate,
    /// Oldest first.
    pub window: Vec<NaiveDate>,
    pub strategy: Option<Strategy>,
    /// Members summed over the window's daily keys.
    pub source_members: u64,
    /// Products in the ranking afterwards.
    pub products: u64,
    /// Daily keys deleted for being older than the window.
    pub pruned: u64,
    pub elapsed: Duration,
    /// True when another replica held the lock and this one did nothing.
    pub skipped_locked: bool,
}

#[derive(Clone)]
pub struct RankingRebuild {
    client: Client,
    keys: KeyTemplates,
    config: RankingConfig,
    metrics: Metrics,
    /// Overrides the size-based choice (benchmarks and tests compare both).
    forced_strategy: Option<Strategy>,
}

/// Today in `timezone`: the day a rebuild running now is for.
pub fn today(timezone: Tz) -> NaiveDate {
    day_at(Utc::now(), timezone)
}

/// The calendar day `instant` falls on in `timezone`.
pub fn day_at(instant: DateTime<Utc>, timezone: Tz) -> NaiveDate {
    instant.with_timezone(&timezone).date_naive()
}

/// The instant `day` starts in `timezone` (the first valid local time when midnight falls in a
/// DST gap).
fn start_of_day(day: NaiveDate, timezone: Tz) -> DateTime<Utc> {
    let midnight = day.and_hms_opt(0, 0, 0).unwrap_or_default();
    (0..4)
        .find_map(|hour| {
            timezone
                .from_local_datetime(&(midnight + chrono::Duration::hours(hour)))
                .earliest()
        })
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(|| midnight.and_utc())
}

impl RankingRebuild {
    pub fn new(
        client: Client,
        keys: KeyTemplates,
        config: RankingConfig,
        metrics: Metrics,
    ) -> Self {
        Self {
            client,
            keys,
            config,
            metrics,
            forced_strategy: None,
        }
    }

    pub fn with_strategy(mut self, strategy: Strategy) -> Self {
        self.forced_strategy = Some(strategy);
        self
    }

    /// The window for `day`, newest first, with each day's weight.
    fn window(&self, day: NaiveDate) -> Vec<(NaiveDate, f64)> {
        (0..self.config.window_days)
            .filter_map(|back| day.checked_sub_days(Days::new(u64::from(back))))
            .enumerate()
            .map(|(i, d)| (d, self.config.weight(i)))
            .collect()
    }

    /// Rebuilds the ranking for `day`.
    #[tracing::instrument(name = "ranking_rebuild", skip_all, fields(%day))]
    pub async fn rebuild(
        &self,
        day: NaiveDate,
        when_locked: WhenLocked,
    ) -> anyhow::Result<RebuildReport> {
        let started = Instant::now();
        let window = self.window(day);
        let mut report = RebuildReport {
            day,
            window: window.iter().rev().map(|(d, _)| *d).collect(),
            strategy: None,
            source_members: 0,
            products: 0,
            pruned: 0,
            elapsed: Duration::ZERO,
            skipped_locked: false,
        };
        let token = uuid::Uuid::new_v4().simple().to_string();
        if !self.lock(&token, when_locked).await? {
            tracing::info!("another replica is rebuilding the ranking; skipped");
            report.skipped_locked = true;
            return Ok(report);
        }
        let result = self.rebuild_locked(day, &window, &token, &mut report).await;
        let release: anyhow::Result<i64> = Script::from_lua(RELEASE_LOCK_LUA)
            .evalsha_with_reload(&self.client, vec![self.keys.ranking_lock()], vec![token])
            .await
            .map_err(Into::into);
        if let Err(e) = release {
            tracing::warn!(error = %format!("{e:#}"), "could not release the ranking lock; it expires by itself");
        }
        result?;
        report.elapsed = started.elapsed();
        self.metrics.ranking_products.set(report.products as i64);
        tracing::info!(
            window_start = %report.window.first().map(|d| d.to_string()).unwrap_or_default(),
            window_end = %day,
            strategy = ?report.strategy,
            source_members = report.source_members,
            products = report.products,
            pruned = report.pruned,
            elapsed_ms = report.elapsed.as_millis() as u64,
            "ranking rebuilt"
        );
        Ok(report)
    }

    async fn lock(&self, token: &str, when_locked: WhenLocked) -> anyhow::Result<bool> {
        let deadline = Instant::now() + LOCK_TTL + Duration::from_secs(5);
        loop {
            let acquired: Option<String> = self
                .client
                .set(
                    self.keys.ranking_lock(),
                    token,
                    Some(Expiration::PX(LOCK_TTL.as_millis() as i64)),
                    Some(SetOptions::NX),
                    false,
                )
                .await?;
            if acquired.is_some() {
                return Ok(true);
            }
            if when_locked == WhenLocked::Skip || Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn rebuild_locked(
        &self,
        day: NaiveDate,
        window: &[(NaiveDate, f64)],
        token: &str,
        report: &mut RebuildReport,
    ) -> anyhow::Result<()> {
        let day_keys: Vec<(String, f64)> = window
            .iter()
            .map(|(d, w)| (self.keys.ranking_day(*d), *w))
            .collect();
        for (key, _) in &day_keys {
            let size: u64 = self.client.zcard(key).await?;
            report.source_members += size;
        }
        // On Redis Cluster, ZUNIONSTORE needs the daily keys in the temporary key's slot.
        let one_slot = !self.client.is_clustered() || self.keys.ranking_in_one_slot();
        let strategy = self.forced_strategy.unwrap_or(
            if report.source_members > self.config.chunked_threshold || !one_slot {
                Strategy::Chunked
            } else {
                Strategy::Zunionstore
            },
        );
        report.strategy = Some(strategy);
        let temp = self.keys.ranking_temp(token);
        match strategy {
            Strategy::Zunionstore => {
                let keys: Vec<String> = day_keys.iter().map(|(k, _)| k.clone()).collect();
                let weights: Vec<f64> = day_keys.iter().map(|(_, w)| *w).collect();
                // An empty result deletes `temp` instead of creating it: the swap handles that.
                let _: i64 = self
                    .client
                    .zunionstore(&temp, keys, weights, None)
                    .await
                    .context("ZUNIONSTORE")?;
                let _: bool = self.client.expire(&temp, TEMP_KEY_TTL_SECS, None).await?;
            }
            Strategy::Chunked => self.build_chunked(&day_keys, &temp).await?,
        }
        let old = self.keys.ranking_temp(&format!("{token}:old"));
        report.products = Script::from_lua(SWAP_LUA)
            .evalsha_with_reload(
                &self.client,
                vec![temp, self.keys.ranking_window.clone(), old],
                Vec::<String>::new(),
            )
            .await
            .context("swapping the new ranking in")?;
        report.pruned = self.prune(day, window).await?;
        let _: () = self
            .client
            .set(
                self.keys.ranking_built_marker(),
                day.to_string(),
                None,
                None,
                false,
            )
            .await?;
        Ok(())
    }

    /// Sums the days in the worker and writes the result in chunks.
    async fn build_chunked(&self, day_keys: &[(String, f64)], temp: &str) -> anyhow::Result<()> {
        let mut total: HashMap<String, f64> = HashMap::new();
        for (key, weight) in day_keys {
            // ZSCAN may return a member twice (rehashing); keep one score per member per day.
            let mut day: HashMap<String, f64> = HashMap::new();
            let pages = self.client.zscan(key.as_str(), "*", Some(CHUNK as u32));
            futures_util::pin_mut!(pages);
            while let Some(mut page) = pages.try_next().await? {
                for (member, score) in page.take_results().unwrap_or_default() {
                    if let Some(member) = member.as_string() {
                        day.insert(member, score);
                    }
                }
            }
            for (member, score) in day {
                *total.entry(member).or_insert(0.0) += weight * score;
            }
        }
        let entries: Vec<(f64, String)> = total.into_iter().map(|(m, s)| (s, m)).collect();
        for (i, chunk) in entries.chunks(CHUNK).enumerate() {
            let _: i64 = self
                .client
                .zadd(temp, None, None, false, false, chunk.to_vec())
                .await?;
            if i == 0 {
                let _: bool = self.client.expire(temp, TEMP_KEY_TTL_SECS, None).await?;
            }
        }
        Ok(())
    }

    /// Deletes daily keys older than the window and sets the safety-net expiry on the rest.
    async fn prune(&self, day: NaiveDate, window: &[(NaiveDate, f64)]) -> anyhow::Result<u64> {
        let oldest_kept = window.last().map(|(d, _)| *d).unwrap_or(day);
        let stale: Vec<String> =
            crate::backends::scan_keys(&self.client, &self.keys.ranking_daily_pattern())
                .await?
                .into_iter()
                .filter(|name| {
                    self.keys
                        .ranking_day_of(name)
                        .is_some_and(|key_day| key_day < oldest_kept)
                })
                .collect();
        let pruned = crate::backends::unlink_keys(&self.client, &stale).await?;
        // A daily key is needed until the rebuild window_days - 1 days after it; keep one more
        // day of grace. The worker being down longer is what the SCAN above is for.
        for (key_day, _) in window {
            let expires = start_of_day(
                *key_day + Days::new(u64::from(self.config.window_days) + 1),
                self.config.timezone,
            );
            // A rebuild for a past `--date` would otherwise set an expiry in the past, which
            // deletes the key at once.
            if expires <= Utc::now() {
                continue;
            }
            let _: bool = self
                .client
                .expire_at(self.keys.ranking_day(*key_day), expires.timestamp(), None)
                .await?;
        }
        Ok(pruned)
    }

    /// The day of the last successful rebuild, if any.
    pub async fn last_built_day(&self) -> anyhow::Result<Option<NaiveDate>> {
        let marker: Option<String> = self.client.get(self.keys.ranking_built_marker()).await?;
        Ok(marker.and_then(|m| m.parse().ok()))
    }
}
