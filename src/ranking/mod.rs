//! The ranking rebuild (docs/contract.md §3): `product:ranking:3d` becomes the (weighted) sum of the
//! window's daily keys, swapped in atomically; daily keys older than the window are deleted.
//!
//! One rebuild for day D:
//!
//! 1. Take the rebuild lease (a lock with a 10 s TTL, renewed while the rebuild runs, released
//!    only by its holder) so replicas firing at the same midnight do not all do the work. The
//!    result is idempotent anyway: the lease saves work, not correctness.
//! 2. Build the sum into a fresh temporary key, either with one `ZUNIONSTORE` (small windows) or,
//!    above `chunked_threshold` members, inside Redis a chunk per call (`chunk_add.lua`,
//!    `chunk_copy.lua`), so no call blocks Redis for long (a ZUNIONSTORE of 3 × 1 000 000
//!    members blocks it for seconds) and the worker never holds more than one chunk.
//! 3. Swap the temporary key in with one Lua call (`swap.lua`), which also records the day,
//!    token and time of the live ranking. Readers see the old ranking or the new one, never a
//!    missing or half-built one.
//! 4. Prune: `SCAN` for every daily key and `UNLINK` those older than the window — including days
//!    missed while the worker was down, never a day inside or after the window. Window keys get
//!    an `EXPIREAT` as a safety net.
//!
//! Every call is safe to send twice (fred resends a command whose connection dropped before its
//! reply came): the swap and each chunk carry a token or step number Redis remembers, and
//! everything else overwrites.
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
use futures_util::{StreamExt, TryStreamExt};
use tokio_util::sync::CancellationToken;

mod keeper;

pub use keeper::RankingKeeper;

use crate::config::RankingConfig;
use crate::keys::KeyTemplates;
use crate::metrics::Metrics;

const SWAP_LUA: &str = include_str!("swap.lua");

/// Extends the lease if this rebuild still holds it. Safe to run twice.
const RENEW_LEASE_LUA: &str = r#"#!lua
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

/// Deletes the lease if this rebuild still holds it. Safe to run twice: the second run finds the
/// key gone (or another replica's token) and does nothing.
const RELEASE_LEASE_LUA: &str = r#"#!lua
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

const CHUNK_ADD_LUA: &str = include_str!("chunk_add.lua");
const CHUNK_COPY_LUA: &str = include_str!("chunk_copy.lua");

/// Members read or written per call by the chunked strategy (a call blocks Redis ~5 ms here):
/// larger chunks mean fewer round trips, smaller ones shorter stalls for other clients. At most
/// 2000: `chunk_add.lua` spreads a chunk's members onto Lua's stack.
const CHUNK: usize = 2000;
/// Chunk calls of a settled source sent before the first reply comes back. Redis runs them one
/// after the other, so another client may wait for this many calls at most.
const IN_FLIGHT: usize = 2;
/// A daily key may still be written this long after its day ended (a sale at 23:59:59 reaching
/// the API a moment later); until then the chunked strategy snapshots it before summing.
const SETTLE_GRACE: chrono::Duration = chrono::Duration::hours(1);
/// The rebuild lock is a lease: it expires this long after its last renewal, so a replica that
/// died mid-rebuild holds it for seconds, not minutes.
pub const LEASE_TTL: Duration = Duration::from_secs(10);
/// How often a running rebuild renews its lease (a third of its life: two renewals can fail).
const LEASE_RENEW_EVERY: Duration = Duration::from_millis(3300);
/// `rebuild-ranking` waits this long at most for another replica's rebuild to finish.
const WAIT_FOR_LEASE: Duration = Duration::from_secs(15 * 60);
/// A temporary key left by a crashed rebuild disappears after this.
const TEMP_KEY_TTL_SECS: i64 = 3600;

/// How the sum is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// One ZUNIONSTORE: fastest, but blocks Redis for the whole computation.
    Zunionstore,
    /// Sum inside Redis a chunk per call: never blocks Redis for long, and the worker holds
    /// one chunk at a time.
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
    /// Set when a ranking built for this later day was already live, and was left in place
    /// (the daemon's runs only).
    pub superseded_by: Option<NaiveDate>,
}

/// `ranking rebuilt for 2026-11-24: window 2026-11-22 .. 2026-11-24 (…), 500 products, …`.
impl std::fmt::Display for RebuildReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Oldest .. newest: a window of a year is one line, not 366 dates.
        let window = match (self.window.first(), self.window.last()) {
            (Some(first), Some(last)) => format!("{first} .. {last}"),
            _ => String::new(),
        };
        write!(
            f,
            "ranking rebuilt for {}: window {} ({} members summed, strategy {:?}), {} products, {} old daily keys pruned, {:.2}s",
            self.day,
            window,
            self.source_members,
            self.strategy,
            self.products,
            self.pruned,
            self.elapsed.as_secs_f64()
        )
    }
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

/// The SHA1 the swap script is called by (EVALSHA), for tests that lose its reply on purpose.
pub fn swap_script_sha() -> String {
    Script::from_lua(SWAP_LUA).sha1().to_string()
}

/// The SHA1 of the chunked strategy's adding script, for tests that lose its reply on purpose.
pub fn chunk_add_script_sha() -> String {
    Script::from_lua(CHUNK_ADD_LUA).sha1().to_string()
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

    /// The zone whose calendar days the daily keys are named after.
    pub fn timezone(&self) -> Tz {
        self.config.timezone
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
    ///
    /// With [`WhenLocked::Skip`] (the daemon) a ranking already built for a later day is never
    /// replaced; with [`WhenLocked::Wait`] (an operator's `rebuild-ranking --date`) it is.
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
            superseded_by: None,
        };
        let token = uuid::Uuid::new_v4().simple().to_string();
        let Some(lease) = self.acquire_lease(&token, when_locked).await? else {
            tracing::info!("another replica is rebuilding the ranking; skipped");
            report.skipped_locked = true;
            return Ok(report);
        };
        let result = tokio::select! {
            result = self.rebuild_locked(day, &window, &token, when_locked, &mut report) => result,
            () = lease.lost.cancelled() => Err(anyhow::anyhow!(
                "lost the rebuild lease (Redis unreachable for longer than {LEASE_TTL:?}, or the process stalled); abandoned this rebuild"
            )),
        };
        lease.release(&self.client).await;
        if result.is_err() {
            // Best effort: the temporary key also expires by itself.
            let _: Result<u64, _> = self.client.unlink(self.keys.ranking_temp(&token)).await;
        }
        result?;
        report.elapsed = started.elapsed();
        if let Some(live_day) = report.superseded_by {
            tracing::info!(%live_day, "a ranking for a later day is already live; left it in place");
            return Ok(report);
        }
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

    /// Takes the rebuild lease, and keeps renewing it until the returned [`Lease`] is released.
    async fn acquire_lease(
        &self,
        token: &str,
        when_locked: WhenLocked,
    ) -> anyhow::Result<Option<Lease>> {
        let key = self.keys.ranking_lock();
        let deadline = Instant::now() + WAIT_FOR_LEASE;
        loop {
            let set: Option<String> = self
                .client
                .set(
                    &key,
                    token,
                    Some(Expiration::PX(LEASE_TTL.as_millis() as i64)),
                    Some(SetOptions::NX),
                    false,
                )
                .await?;
            // A SET NX whose reply was lost and that the client sent again answers "not set" the
            // second time, although the first set it: the key then holds our own token.
            let ours = set.is_some()
                || self.client.get::<Option<String>, _>(&key).await?.as_deref() == Some(token);
            if ours {
                return Ok(Some(Lease::start(
                    self.client.clone(),
                    key,
                    token.to_owned(),
                )));
            }
            if when_locked == WhenLocked::Skip || Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn rebuild_locked(
        &self,
        day: NaiveDate,
        window: &[(NaiveDate, f64)],
        token: &str,
        when_locked: WhenLocked,
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
            Strategy::Chunked => self.build_chunked(window, &temp, token).await?,
        }
        // Whether the temporary key must exist is decided by the window, not by looking at the
        // key: a key lost meanwhile (a failover to a replica that had not received it, a restart
        // from an older snapshot) would otherwise pass for an empty window, and the swap would
        // delete the ranking and record the day as built. The swap then refuses, and the
        // rebuild fails and is retried.
        let swap = self
            .swap(
                token,
                day,
                &temp,
                report.source_members > 0,
                when_locked == WhenLocked::Skip,
            )
            .await?;
        match swap {
            Swap::Live { products } => report.products = products,
            Swap::LaterDayLive { day: live_day } => {
                report.superseded_by = Some(live_day);
                return Ok(());
            }
        }
        report.pruned = self.prune(day, window).await?;
        Ok(())
    }

    /// Swaps `temp` in (see `swap.lua`). A reply lost on the way is harmless whether or not the
    /// client resends the call: a resent call finds its own token live, and a call that failed
    /// is checked against the live record before it counts as failed.
    async fn swap(
        &self,
        token: &str,
        day: NaiveDate,
        temp: &str,
        has_temp: bool,
        refuse_later_day: bool,
    ) -> anyhow::Result<Swap> {
        let keys = vec![
            temp.to_owned(),
            self.keys.ranking_window.clone(),
            self.keys.ranking_temp(&format!("{token}:old")),
            self.keys.ranking_live_record(),
        ];
        let args = vec![
            token.to_owned(),
            day.to_string(),
            if has_temp { "1" } else { "0" }.to_owned(),
            if refuse_later_day { "1" } else { "0" }.to_owned(),
        ];
        let called: Result<(String, u64, String), _> = Script::from_lua(SWAP_LUA)
            .evalsha_with_reload(&self.client, keys, args)
            .await;
        let (status, products, live_day) = match called {
            Ok(reply) => reply,
            Err(e) => {
                // The script may have run and only its reply been lost.
                let live = self
                    .live()
                    .await
                    .context("checking the swap after an error")?;
                if live.as_ref().is_some_and(|l| l.token == token) {
                    let products: u64 = self.client.zcard(&self.keys.ranking_window).await?;
                    return Ok(Swap::Live { products });
                }
                return Err(anyhow::Error::new(e).context("swapping the new ranking in"));
            }
        };
        match status.as_str() {
            "swapped" | "already" => Ok(Swap::Live { products }),
            "later_day_live" => Ok(Swap::LaterDayLive {
                day: live_day.parse().context("the live record's day")?,
            }),
            other => anyhow::bail!(
                "swap refused ({other}): this rebuild's temporary key is gone; the live ranking was left in place"
            ),
        }
    }

    /// Sums the window inside Redis, one chunk per call (see `chunk_add.lua`), so that no call
    /// blocks Redis for long and the worker holds at most one chunk.
    ///
    /// A daily key that may still be written (today's, or one whose day ended less than
    /// [`SETTLE_GRACE`] ago) cannot be read by rank: a score that changes moves members between
    /// chunks, and a member read twice would be counted twice. Such a key is read with ZSCAN and
    /// written with ZADD, where a member seen twice is harmless: the first of them (the largest)
    /// straight into the empty temporary key, any other into a snapshot that is then summed like
    /// a settled day. Settled days are summed by rank; from the daily key itself when it shares
    /// the temporary key's slot, else read by the worker a chunk at a time (Redis Cluster).
    async fn build_chunked(
        &self,
        window: &[(NaiveDate, f64)],
        temp: &str,
        token: &str,
    ) -> anyhow::Result<()> {
        let progress = self.keys.ranking_temp(&format!("{token}:progress"));
        let mut owned = vec![progress.clone()];
        let result = self
            .sum_chunks(window, temp, token, &progress, &mut owned)
            .await;
        let _ = crate::backends::unlink_keys(&self.client, &owned).await;
        result
    }

    async fn sum_chunks(
        &self,
        window: &[(NaiveDate, f64)],
        temp: &str,
        token: &str,
        progress: &str,
        owned: &mut Vec<String>,
    ) -> anyhow::Result<()> {
        let now = Utc::now();
        let mut sources = Vec::with_capacity(window.len());
        for (day, weight) in window {
            let key = self.keys.ranking_day(*day);
            let size: u64 = self.client.zcard(&key).await?;
            let ends = start_of_day(*day + Days::new(1), self.config.timezone);
            sources.push(Source {
                same_slot: !self.client.is_clustered()
                    || crate::keys::hash_tag(&key) == crate::keys::hash_tag(temp),
                settled: ends + SETTLE_GRACE <= now,
                key,
                weight: *weight,
                size,
            });
        }
        // The running sum, a HASH in the temporary key's slot.
        let sum = self.keys.ranking_temp(&format!("{token}:sum"));
        owned.push(sum.clone());
        // The first source goes into the empty running sum by SCAN (either way is right for
        // it); the largest of those that may still change saves the most snapshotting.
        let first = sources
            .iter()
            .enumerate()
            .filter(|(_, s)| s.size > 0)
            .max_by_key(|(_, s)| (!s.settled, s.size))
            .map(|(i, _)| i);
        let Some(first) = first else {
            return Ok(()); // an empty window: no temporary key, an empty ranking
        };
        self.copy_scanned(&sources[first], &sum, Copy::ZsetToHash)
            .await?;
        let mut steps = 0_u64;
        for (i, source) in sources.iter().enumerate() {
            if source.size == 0 || i == first {
                continue;
            }
            if source.settled {
                self.add_ranked(source, &sum, progress, &mut steps).await?;
                continue;
            }
            let snapshot = self.keys.ranking_temp(&format!("{token}:snapshot:{i}"));
            owned.push(snapshot.clone());
            let raw = Source {
                weight: 1.0,
                ..source.clone()
            };
            self.copy_scanned(&raw, &snapshot, Copy::ZsetToZset).await?;
            let snapshot = Source {
                key: snapshot,
                same_slot: true,
                settled: true,
                ..source.clone()
            };
            self.add_ranked(&snapshot, &sum, progress, &mut steps)
                .await?;
        }
        let finished = Source {
            key: sum,
            weight: 1.0,
            size: 0,
            same_slot: true,
            settled: true,
        };
        self.copy_scanned(&finished, temp, Copy::HashToZset).await
    }

    /// SCANs `source` and writes each page, times its weight, into `dest` (see
    /// `chunk_copy.lua`): in one script when they share a slot, else through the worker a page
    /// at a time.
    async fn copy_scanned(&self, source: &Source, dest: &str, copy: Copy) -> anyhow::Result<()> {
        if source.same_slot {
            let script = Script::from_lua(CHUNK_COPY_LUA);
            let mut cursor = "0".to_owned();
            loop {
                let args = vec![
                    cursor,
                    CHUNK.to_string(),
                    source.weight.to_string(),
                    TEMP_KEY_TTL_SECS.to_string(),
                    copy.mode().to_owned(),
                ];
                cursor = resend_on_error(|| {
                    script.evalsha_with_reload(
                        &self.client,
                        vec![dest.to_owned(), source.key.clone()],
                        args.clone(),
                    )
                })
                .await
                .context("copying a SCAN page")?;
                if cursor == "0" {
                    return Ok(());
                }
            }
        }
        // Only daily keys live in other slots: they are sorted sets.
        let pages = self
            .client
            .zscan(source.key.as_str(), "*", Some(CHUNK as u32));
        futures_util::pin_mut!(pages);
        while let Some(mut page) = pages.try_next().await? {
            let entries = page.take_results().unwrap_or_default();
            if entries.is_empty() {
                continue;
            }
            match copy {
                Copy::ZsetToHash => {
                    let fields: Vec<(Value, Value)> = entries
                        .into_iter()
                        .map(|(member, score)| {
                            (member, Value::from((score * source.weight).to_string()))
                        })
                        .collect();
                    let _: i64 = self.client.hset(dest, fields).await?;
                }
                Copy::ZsetToZset | Copy::HashToZset => {
                    let weighted: Vec<(f64, Value)> = entries
                        .into_iter()
                        .map(|(member, score)| (score * source.weight, member))
                        .collect();
                    let _: i64 = self
                        .client
                        .zadd(dest, None, None, false, false, weighted)
                        .await?;
                }
            }
            let _: bool = self.client.expire(dest, TEMP_KEY_TTL_SECS, None).await?;
        }
        Ok(())
    }

    /// Adds `source`, times its weight, into the running sum by rank chunks; `source` must not
    /// change meanwhile.
    async fn add_ranked(
        &self,
        source: &Source,
        sum: &str,
        progress: &str,
        steps: &mut u64,
    ) -> anyhow::Result<()> {
        let script = Script::from_lua(CHUNK_ADD_LUA);
        let head = |step: u64| {
            vec![
                step.to_string(),
                source.weight.to_string(),
                TEMP_KEY_TTL_SECS.to_string(),
            ]
        };
        if source.same_slot {
            // Nothing writes the source, so its chunks are known up front, and each remembers its
            // own step: [`IN_FLIGHT`] calls travel at once to hide the round trips.
            let size: u64 = self.client.zcard(&source.key).await?;
            let chunks = size.div_ceil(CHUNK as u64);
            let first_step = *steps + 1;
            *steps += chunks;
            let calls = (0..chunks).map(|i| {
                let mut args = head(first_step + i);
                let start = i * CHUNK as u64;
                args.push(start.to_string());
                args.push((start + CHUNK as u64 - 1).to_string());
                let (script, keys) = (
                    &script,
                    vec![sum.to_owned(), progress.to_owned(), source.key.clone()],
                );
                async move {
                    resend_on_error(|| {
                        script.evalsha_with_reload::<u64, _, _>(
                            &self.client,
                            keys.clone(),
                            args.clone(),
                        )
                    })
                    .await
                }
            });
            let mut results = futures_util::stream::iter(calls).buffered(IN_FLIGHT);
            while let Some(result) = results.next().await {
                result.context("adding a chunk")?;
            }
            return Ok(());
        }
        let mut start = 0_i64;
        loop {
            *steps += 1;
            let chunk: Vec<(Value, f64)> = self
                .client
                .zrange(
                    source.key.as_str(),
                    start,
                    start + CHUNK as i64 - 1,
                    None,
                    false,
                    None,
                    true,
                )
                .await?;
            if chunk.is_empty() {
                return Ok(());
            }
            let read = chunk.len();
            let mut args: Vec<Value> = head(*steps).into_iter().map(Value::from).collect();
            args.reserve(chunk.len() * 2);
            for (member, score) in chunk {
                args.push(member);
                args.push(Value::from(score.to_string()));
            }
            let _: u64 = resend_on_error(|| {
                script.evalsha_with_reload(
                    &self.client,
                    vec![sum.to_owned(), progress.to_owned()],
                    args.clone(),
                )
            })
            .await
            .context("adding a chunk")?;
            if read < CHUNK {
                return Ok(());
            }
            start += CHUNK as i64;
        }
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

    /// Which rebuild the live ranking came from, if any.
    pub async fn live(&self) -> anyhow::Result<Option<LiveRanking>> {
        let fields: HashMap<String, String> =
            self.client.hgetall(self.keys.ranking_live_record()).await?;
        let (Some(token), Some(day), Some(built_at)) = (
            fields.get("token"),
            fields.get("day"),
            fields.get("built_at"),
        ) else {
            return Ok(None);
        };
        let built_at = built_at
            .parse::<i64>()
            .ok()
            .and_then(|secs| DateTime::from_timestamp(secs, 0))
            .context("the live record's built_at")?;
        Ok(Some(LiveRanking {
            token: token.clone(),
            day: day.parse().context("the live record's day")?,
            built_at,
        }))
    }
}

/// Which rebuild the live ranking came from (the live record, written by the swap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveRanking {
    pub token: String,
    /// The day the rebuild was for.
    pub day: NaiveDate,
    /// When it was swapped in (Redis' clock).
    pub built_at: DateTime<Utc>,
}

/// Calls `call` again (up to 3 times in all, 100 ms apart) when it fails: only for calls that are
/// safe to run twice, where a failure may be a lost reply after the call ran. A chunk's failure
/// then costs a resend, not the whole rebuild.
async fn resend_on_error<T, F, Fut>(mut call: F) -> Result<T, fred::error::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, fred::error::Error>>,
{
    let mut attempt = 1;
    loop {
        match call().await {
            Ok(value) => return Ok(value),
            Err(e) if attempt >= 3 => return Err(e),
            Err(e) => {
                tracing::debug!(error = %e, attempt, "sending an idempotent ranking call again");
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// What `chunk_copy.lua` copies (its ARGV[5]).
#[derive(Clone, Copy)]
enum Copy {
    ZsetToHash,
    ZsetToZset,
    HashToZset,
}

impl Copy {
    fn mode(self) -> &'static str {
        match self {
            Copy::ZsetToHash => "zset_to_hash",
            Copy::ZsetToZset => "zset_to_zset",
            Copy::HashToZset => "hash_to_zset",
        }
    }
}

/// A daily key as the chunked strategy reads it.
#[derive(Clone)]
struct Source {
    key: String,
    weight: f64,
    size: u64,
    /// Whether a Lua script may read it alongside the temporary key.
    same_slot: bool,
    /// Whether its day ended long enough ago that nothing writes it any more.
    settled: bool,
}

enum Swap {
    Live { products: u64 },
    LaterDayLive { day: NaiveDate },
}

/// The rebuild lock while this process holds it: a background task renews it every
/// [`LEASE_RENEW_EVERY`]; `lost` fires when a renewal finds it gone or another replica's, or
/// when no renewal got through for [`LEASE_TTL`] (it may have expired).
struct Lease {
    key: String,
    token: String,
    lost: CancellationToken,
    renewer: tokio::task::JoinHandle<()>,
}

impl Lease {
    fn start(client: Client, key: String, token: String) -> Self {
        let lost = CancellationToken::new();
        let renewer = tokio::spawn({
            let (key, token, lost) = (key.clone(), token.clone(), lost.clone());
            async move {
                let script = Script::from_lua(RENEW_LEASE_LUA);
                let mut last_renewed = Instant::now();
                loop {
                    tokio::time::sleep(LEASE_RENEW_EVERY).await;
                    let renewed: Result<i64, _> = tokio::time::timeout(
                        LEASE_RENEW_EVERY,
                        script.evalsha_with_reload(
                            &client,
                            vec![key.clone()],
                            vec![token.clone(), LEASE_TTL.as_millis().to_string()],
                        ),
                    )
                    .await
                    .unwrap_or_else(|_| {
                        Err(fred::error::Error::new(
                            fred::error::ErrorKind::Timeout,
                            "lease renewal timed out",
                        ))
                    });
                    match renewed {
                        Ok(1) => last_renewed = Instant::now(),
                        Ok(_) => {
                            tracing::warn!("the ranking rebuild lease was taken over");
                            lost.cancel();
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "could not renew the ranking rebuild lease");
                            if last_renewed.elapsed() >= LEASE_TTL {
                                lost.cancel();
                                return;
                            }
                        }
                    }
                }
            }
        });
        Self {
            key,
            token,
            lost,
            renewer,
        }
    }

    async fn release(self, client: &Client) {
        self.renewer.abort();
        let released: Result<i64, _> = Script::from_lua(RELEASE_LEASE_LUA)
            .evalsha_with_reload(client, vec![self.key], vec![self.token])
            .await;
        if let Err(e) = released {
            tracing::warn!(error = %e, "could not release the ranking lease; it expires by itself within {LEASE_TTL:?}");
        }
    }
}
