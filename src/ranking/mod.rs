//! The ranking rebuild (docs/contract.md §3): `product:ranking:3d` becomes the (weighted) sum of the
//! window's daily keys, swapped in atomically; daily keys older than the window are deleted.
//!
//! One rebuild for day D:
//!
//! 1. Take the rebuild lease (a lock with a 10 s TTL, renewed while the rebuild runs, released
//!    only by its holder) so replicas firing at the same midnight do not all do the work. The
//!    result is idempotent anyway: the lease saves work, not correctness.
//! 2. Build the sum into a fresh temporary key (its TTL set in the same atomic step), either with
//!    one `ZUNIONSTORE` (small windows) or, above `chunked_threshold` members, inside Redis a
//!    chunk per call (`chunk_add.lua`: each member summed once, written straight into the
//!    temporary key), so no call blocks Redis for long (a ZUNIONSTORE of 3 × 1 000 000 members
//!    blocks it for seconds) and the worker never holds more than one chunk.
//! 3. Swap the temporary key in with one Lua call (`swap.lua`), which also records the day,
//!    token and time of the live ranking. Readers see the old ranking or the new one, never a
//!    missing or half-built one: the swap refuses a temporary key that does not hold as many
//!    members as the build added (Redis lost some meanwhile), and the rebuild builds again.
//! 4. Prune: `SCAN` for every daily key and `UNLINK` those older than the window — including days
//!    missed while the worker was down, never a day inside or after the window. Window keys get
//!    an `EXPIREAT` as a safety net.
//!
//! Every call is safe to send twice (fred resends a command whose connection dropped before its
//! reply came): the swap carries a token and each chunk a step number Redis remembers (the
//! build's ledger), and everything else overwrites.
//!
//! Days are calendar days in `[ranking] timezone`; the API must name daily keys the same way.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
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
use crate::schedule::{Clock, SystemClock};

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

/// ZUNIONSTORE of the window's daily keys (KEYS[2..], weights ARGV[2..]) into the temporary key
/// KEYS[1], which gets its TTL (ARGV[1] seconds) in the same atomic step: a worker killed right
/// after never leaves it behind for good. Safe to run twice (it overwrites). Returns the number of
/// members stored.
const UNION_LUA: &str = r#"#!lua
local args = { KEYS[1], #KEYS - 1 }
for i = 2, #KEYS do args[#args + 1] = KEYS[i] end
args[#args + 1] = 'WEIGHTS'
for i = 2, #ARGV do args[#args + 1] = ARGV[i] end
local n = redis.call('ZUNIONSTORE', unpack(args))
if n > 0 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return n
"#;

/// The Redis time a chunk call aims at: chunks grow or shrink towards it (Redis reports each
/// call's time), so a call blocks other clients this long whatever the machine. With
/// [`IN_FLIGHT`] calls queued, another client waits for two at most.
const CALL_BUDGET: Duration = Duration::from_millis(8);
/// The first chunk's size, before any call was timed.
const FIRST_CHUNK: u64 = 1000;
const MIN_CHUNK: u64 = 100;
const MAX_CHUNK: u64 = 50_000;
/// Entries per chunk when the worker reads a daily key in another cluster slot itself.
const CHUNK: usize = 2000;
/// Chunk calls of a settled source sent before the first reply comes back. Redis runs them one
/// after the other, so another client may wait for this many calls at most.
const IN_FLIGHT: usize = 2;
/// Builds of one rebuild: a build whose result lost members before the swap is built again.
const BUILD_ATTEMPTS: u32 = 3;
/// A live ranking dated after the day of now + this is from the future (see
/// [`latest_plausible_day`]).
const FUTURE_TOLERANCE: chrono::Duration = chrono::Duration::minutes(10);
/// A daily key may still be written this long after its day ended (a sale at 23:59:59 reaching
/// the API a moment later); until then the chunked strategy walks it with ZSCAN, not by rank.
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
    /// Tells which live rankings are dated in the future (the keeper's clock, for tests).
    clock: Arc<dyn Clock>,
}

/// The SHA1 the swap script is called by (EVALSHA), for tests that lose its reply on purpose.
pub fn swap_script_sha() -> String {
    Script::from_lua(SWAP_LUA).sha1().to_string()
}

/// The SHA1 of the ZUNIONSTORE strategy's script, for tests that lose its reply on purpose.
pub fn union_script_sha() -> String {
    Script::from_lua(UNION_LUA).sha1().to_string()
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
            clock: Arc::new(SystemClock),
        }
    }

    /// The zone whose calendar days the daily keys are named after.
    pub fn timezone(&self) -> Tz {
        self.config.timezone
    }

    /// Reads "now" from `clock` when telling a live ranking dated in the future.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
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
            // Best effort: the temporary keys also expire by themselves.
            let temps: Vec<String> = (1..=BUILD_ATTEMPTS)
                .map(|attempt| self.keys.ranking_temp(&build_id(&token, attempt)))
                .collect();
            let _ = crate::backends::unlink_keys(&self.client, &temps).await;
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
            report.source_members += self.daily_size(key).await?;
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
        self.expire_abandoned_builds().await;
        // A scheduled run never replaces a ranking built for a later day, unless that day is
        // after today: a record from the future (a clock that ran ahead, a typo before dates
        // were checked) would otherwise block every rebuild until its day came.
        let refuse_until = (when_locked == WhenLocked::Skip).then(|| self.latest_plausible_day());
        for attempt in 1..=BUILD_ATTEMPTS {
            let temp = self.keys.ranking_temp(&build_id(token, attempt));
            // How many members the temporary key must hold: counted by the build itself, so a
            // key (or part of one) lost meanwhile — a failover to a replica that had not
            // received it, a restart from an older snapshot, an eviction — is never swapped in
            // as if it were the whole window. The swap checks it in the same atomic step.
            let expected = match strategy {
                Strategy::Zunionstore => self.build_union(&day_keys, &temp).await?,
                Strategy::Chunked => {
                    self.build_chunked(window, &temp, &build_id(token, attempt))
                        .await?
                }
            };
            match self.swap(token, day, &temp, expected, refuse_until).await? {
                Swap::Live { products, replaced } => {
                    report.products = products;
                    if let Some(replaced) = replaced.filter(|d| *d > self.latest_plausible_day()) {
                        tracing::warn!(
                            %replaced,
                            "replaced a live ranking dated after today (a clock that ran ahead, or a mistyped date)"
                        );
                    }
                    break;
                }
                Swap::LaterDayLive { day: live_day } => {
                    report.superseded_by = Some(live_day);
                    return Ok(());
                }
                Swap::Incomplete { found } => {
                    let _: Result<u64, _> = self.client.unlink(&temp).await;
                    tracing::warn!(
                        expected,
                        found,
                        attempt,
                        "the built ranking lost members before the swap (Redis restarted, failed over or evicted it); the live ranking was left in place"
                    );
                    if attempt == BUILD_ATTEMPTS {
                        anyhow::bail!(
                            "swap refused {BUILD_ATTEMPTS} times: the built ranking held {found} of its {expected} members (Redis lost part of it); the live ranking was left in place"
                        );
                    }
                }
            }
        }
        report.pruned = self.prune(day, window).await?;
        Ok(())
    }

    /// `ZCARD` of a daily key, naming the key when it fails (a key of another type).
    async fn daily_size(&self, key: &str) -> anyhow::Result<u64> {
        self.client
            .zcard(key)
            .await
            .with_context(|| format!("reading the daily ranking key {key}"))
    }

    /// The latest day a live ranking may be for: later than that, its record is from the future.
    fn latest_plausible_day(&self) -> NaiveDate {
        latest_plausible_day(self.clock.now(), self.config.timezone)
    }

    /// Gives a TTL to temporary keys left without one (by a version that set it in a separate
    /// step, killed in between). Runs under the lease, so no other build is writing them.
    async fn expire_abandoned_builds(&self) {
        let temps = match crate::backends::scan_keys(&self.client, &self.keys.ranking_temp("*"))
            .await
        {
            Ok(temps) => temps,
            Err(e) => {
                tracing::debug!(error = %format!("{e:#}"), "could not look for abandoned temporary keys");
                return;
            }
        };
        for temp in temps {
            if self.client.ttl::<i64, _>(&temp).await.ok() == Some(-1) {
                tracing::info!(key = %temp, "an abandoned rebuild's temporary key had no expiry; it expires in {TEMP_KEY_TTL_SECS} s");
                let _: Result<bool, _> = self.client.expire(&temp, TEMP_KEY_TTL_SECS, None).await;
            }
        }
    }

    /// One `ZUNIONSTORE` into `temp`, which gets its TTL in the same atomic step (`UNION_LUA`).
    /// Returns the members stored.
    async fn build_union(&self, day_keys: &[(String, f64)], temp: &str) -> anyhow::Result<u64> {
        let mut keys = vec![temp.to_owned()];
        keys.extend(day_keys.iter().map(|(k, _)| k.clone()));
        let mut args = vec![TEMP_KEY_TTL_SECS.to_string()];
        args.extend(day_keys.iter().map(|(_, w)| w.to_string()));
        // Safe to run twice: it overwrites `temp`.
        let script = Script::from_lua(UNION_LUA);
        resend_on_error(|| script.evalsha_with_reload(&self.client, keys.clone(), args.clone()))
            .await
            .with_context(|| {
                let names: Vec<&str> = day_keys.iter().map(|(k, _)| k.as_str()).collect();
                format!("ZUNIONSTORE of the daily ranking keys {names:?}")
            })
    }

    /// Swaps `temp` in (see `swap.lua`) if it holds `expected` members. A reply lost on the way
    /// is harmless whether or not the client resends the call: a resent call finds its own token
    /// live, and a call that failed is checked against the live record before it counts as
    /// failed.
    async fn swap(
        &self,
        token: &str,
        day: NaiveDate,
        temp: &str,
        expected: u64,
        refuse_until: Option<NaiveDate>,
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
            expected.to_string(),
            refuse_until.map(|d| d.to_string()).unwrap_or_default(),
        ];
        let called: Result<(String, u64, String, String), _> = Script::from_lua(SWAP_LUA)
            .evalsha_with_reload(&self.client, keys, args)
            .await;
        let (status, products, live_day, detail) = match called {
            Ok(reply) => reply,
            Err(e) => {
                // The script may have run and only its reply been lost.
                let live = self
                    .live()
                    .await
                    .context("checking the swap after an error")?;
                if live.as_ref().is_some_and(|l| l.token == token) {
                    let products: u64 = self.client.zcard(&self.keys.ranking_window).await?;
                    return Ok(Swap::Live {
                        products,
                        replaced: None,
                    });
                }
                return Err(anyhow::Error::new(e).context("swapping the new ranking in"));
            }
        };
        match status.as_str() {
            "swapped" | "already" => Ok(Swap::Live {
                products,
                replaced: detail.parse().ok(),
            }),
            "later_day_live" => Ok(Swap::LaterDayLive {
                day: live_day.parse().context("the live record's day")?,
            }),
            "incomplete" => Ok(Swap::Incomplete {
                found: detail.parse().unwrap_or(0),
            }),
            other => anyhow::bail!("unexpected reply from the swap script: {other}"),
        }
    }

    /// Sums the window inside Redis into `temp`, one chunk per call (see `chunk_add.lua`), so
    /// that no call blocks Redis for long and the worker holds at most one chunk. Returns the
    /// members added (the members `temp` must hold).
    ///
    /// The daily keys are walked smallest first (the first one walked needs a lookup per member
    /// in each of the others, the last one none). Settled days are walked by rank, several calls
    /// in flight. A daily key that may still be written (today's, or one whose day ended less
    /// than [`SETTLE_GRACE`] ago) cannot be walked by fixed ranks: a member whose sales rise
    /// moves the others down, and one could slip behind the walk. It is walked one call at a
    /// time, each going on after the last member the previous one read (sales only raise scores,
    /// so a member not read yet stays ahead of it; one read twice is left alone the second time).
    /// (ZSCAN, which needs no such assumption, costs ~4× as much Redis time per member here.) When
    /// a daily key is not in the temporary key's cluster slot, the worker reads (ZSCAN for a day
    /// still written) and looks up each chunk itself, and only the adding runs in Redis.
    async fn build_chunked(
        &self,
        window: &[(NaiveDate, f64)],
        temp: &str,
        build: &str,
    ) -> anyhow::Result<u64> {
        let ledger = self.keys.ranking_temp(&format!("{build}:ledger"));
        let result = self.sum_chunks(window, temp, &ledger).await;
        let _ = crate::backends::unlink_keys(&self.client, std::slice::from_ref(&ledger)).await;
        if result.is_err() {
            let _: Result<u64, _> = self.client.unlink(temp).await;
        }
        result
    }

    async fn sum_chunks(
        &self,
        window: &[(NaiveDate, f64)],
        temp: &str,
        ledger: &str,
    ) -> anyhow::Result<u64> {
        let now = Utc::now();
        let mut sources = Vec::with_capacity(window.len());
        for (day, weight) in window {
            let key = self.keys.ranking_day(*day);
            let size = self.daily_size(&key).await?;
            let ends = start_of_day(*day + Days::new(1), self.config.timezone);
            if size == 0 {
                continue;
            }
            sources.push(Source {
                same_slot: !self.client.is_clustered()
                    || crate::keys::hash_tag(&key) == crate::keys::hash_tag(temp),
                settled: ends + SETTLE_GRACE <= now,
                key,
                weight: *weight,
                size,
            });
        }
        sources.sort_by_key(|s| (s.size, !s.settled));
        let mut walk = Walk {
            temp,
            ledger,
            step: 0,
            added: 0,
            chunk: FIRST_CHUNK,
        };
        for (i, source) in sources.iter().enumerate() {
            let later = &sources[i + 1..];
            // The first key walked finds the result empty, and the last one's ZADD NX leaves
            // alone what the result holds: only the keys in between drop members first.
            let filter = i > 0 && !later.is_empty();
            let result = if source.same_slot && later.iter().all(|s| s.same_slot) {
                if source.settled {
                    self.walk_ranks(&mut walk, source, later, filter).await
                } else {
                    self.walk_after(&mut walk, source, later, filter).await
                }
            } else {
                self.walk_in_worker(&mut walk, source, later, filter).await
            };
            result.with_context(|| format!("summing the daily ranking key {}", source.key))?;
        }
        Ok(walk.added)
    }

    /// The `chunk_add.lua` call for one chunk of `source` read in Redis: `mode` and its own
    /// arguments.
    fn chunk_call(
        &self,
        walk: &mut Walk<'_>,
        source: &Source,
        later: &[Source],
        filter: bool,
        mode: (&'static str, Vec<Value>),
    ) -> impl Future<Output = anyhow::Result<ChunkReply>> + Send + 'static {
        walk.step += 1;
        let mut keys = vec![
            walk.temp.to_owned(),
            walk.ledger.to_owned(),
            source.key.clone(),
        ];
        keys.extend(later.iter().map(|s| s.key.clone()));
        let mut args: Vec<Value> = walk
            .head(mode.0, filter, source.weight, later)
            .into_iter()
            .map(Value::from)
            .collect();
        args.extend(mode.1);
        let client = self.client.clone();
        async move {
            let script = Script::from_lua(CHUNK_ADD_LUA);
            let reply: (u64, u64, u64, Value, String) =
                resend_on_error(|| script.evalsha_with_reload(&client, keys.clone(), args.clone()))
                    .await?;
            Ok(ChunkReply {
                added: reply.0,
                read: reply.1,
                micros: reply.2,
                last_member: reply.3,
                last_score: reply.4,
            })
        }
    }

    /// Walks a settled `source` by rank: its chunks are known up front, so [`IN_FLIGHT`] calls
    /// travel at once and Redis never waits for the worker.
    async fn walk_ranks(
        &self,
        walk: &mut Walk<'_>,
        source: &Source,
        later: &[Source],
        filter: bool,
    ) -> anyhow::Result<()> {
        let mut pending = futures_util::stream::FuturesOrdered::new();
        let mut start = 0_u64;
        loop {
            while pending.len() < IN_FLIGHT && start < source.size {
                let stop = start + walk.chunk - 1;
                pending.push_back(self.chunk_call(
                    walk,
                    source,
                    later,
                    filter,
                    (
                        "rank",
                        vec![start.to_string().into(), stop.to_string().into()],
                    ),
                ));
                start = stop + 1;
            }
            let Some(reply) = pending.next().await else {
                return Ok(());
            };
            walk.record(&reply?);
        }
    }

    /// Walks `source`, which may still be written, by rank from the last member read (see
    /// `chunk_add.lua`, mode `after`): one call at a time, each continuing after the previous
    /// one's last member, until a call reads less than a chunk.
    async fn walk_after(
        &self,
        walk: &mut Walk<'_>,
        source: &Source,
        later: &[Source],
        filter: bool,
    ) -> anyhow::Result<()> {
        let mut anchor = (Value::from(""), String::new());
        loop {
            let count = walk.chunk;
            let mode = (
                "after",
                vec![anchor.0, anchor.1.into(), count.to_string().into()],
            );
            let reply = self.chunk_call(walk, source, later, filter, mode).await?;
            walk.record(&reply);
            if reply.read < count {
                return Ok(());
            }
            anchor = (reply.last_member, reply.last_score);
        }
    }

    /// Walks `source` when it, or a key walked after it, lives in another cluster slot than the
    /// temporary key: the worker reads each chunk, looks it up in the later keys and sums it;
    /// `chunk_add.lua` only adds the sums. Slower (several round trips per chunk), and only ever
    /// holds one chunk.
    async fn walk_in_worker(
        &self,
        walk: &mut Walk<'_>,
        source: &Source,
        later: &[Source],
        filter: bool,
    ) -> anyhow::Result<()> {
        if source.settled {
            let mut start = 0_i64;
            while (start as u64) < source.size {
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
                self.add_in_worker(walk, source, later, filter, chunk)
                    .await?;
                start += CHUNK as i64;
            }
            return Ok(());
        }
        let pages = self
            .client
            .zscan(source.key.as_str(), "*", Some(CHUNK as u32));
        futures_util::pin_mut!(pages);
        while let Some(mut page) = pages.try_next().await? {
            let entries = page.take_results().unwrap_or_default();
            if !entries.is_empty() {
                self.add_in_worker(walk, source, later, filter, entries)
                    .await?;
            }
        }
        Ok(())
    }

    async fn add_in_worker(
        &self,
        walk: &mut Walk<'_>,
        source: &Source,
        later: &[Source],
        filter: bool,
        mut entries: Vec<(Value, f64)>,
    ) -> anyhow::Result<()> {
        if filter {
            let members: Vec<Value> = entries.iter().map(|(m, _)| m.clone()).collect();
            let present: Vec<Option<f64>> = self.client.zmscore(walk.temp, members).await?;
            let mut present = present.into_iter();
            entries.retain(|_| present.next().flatten().is_none());
            if entries.is_empty() {
                return Ok(());
            }
        }
        let mut sums: Vec<f64> = entries.iter().map(|(_, s)| s * source.weight).collect();
        for other in later {
            let members: Vec<Value> = entries.iter().map(|(m, _)| m.clone()).collect();
            let found: Vec<Option<f64>> = self.client.zmscore(other.key.as_str(), members).await?;
            for (sum, score) in sums.iter_mut().zip(found) {
                *sum += score.unwrap_or(0.0) * other.weight;
            }
        }
        walk.step += 1;
        let mut args: Vec<Value> = walk
            .head("given", false, 1.0, &[])
            .into_iter()
            .map(Value::from)
            .collect();
        for ((member, _), sum) in entries.into_iter().zip(sums) {
            args.push(Value::from(sum.to_string()));
            args.push(member);
        }
        let keys = vec![walk.temp.to_owned(), walk.ledger.to_owned()];
        let script = Script::from_lua(CHUNK_ADD_LUA);
        let reply: (u64, u64, u64, Value, String) = resend_on_error(|| {
            script.evalsha_with_reload(&self.client, keys.clone(), args.clone())
        })
        .await?;
        walk.added += reply.0;
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

/// A daily key as the chunked strategy walks it.
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

/// One chunked build's progress: its keys, the next step number, the members added so far and
/// the chunk size, adapted so that a call takes about [`CALL_BUDGET`] of Redis' time.
struct Walk<'a> {
    temp: &'a str,
    ledger: &'a str,
    step: u64,
    added: u64,
    chunk: u64,
}

impl Walk<'_> {
    /// `chunk_add.lua`'s ARGV up to its mode's own arguments (ARGV[1 .. 6+n]).
    fn head(&self, mode: &str, filter: bool, weight: f64, later: &[Source]) -> Vec<String> {
        let mut args = vec![
            self.step.to_string(),
            TEMP_KEY_TTL_SECS.to_string(),
            mode.to_owned(),
            if filter { "1" } else { "0" }.to_owned(),
            weight.to_string(),
            later.len().to_string(),
        ];
        args.extend(later.iter().map(|s| s.weight.to_string()));
        args
    }

    /// Counts a call's added members and sizes the next chunks after its time: towards
    /// [`CALL_BUDGET`], at most doubling at a time, within [`MIN_CHUNK`] ..= [`MAX_CHUNK`].
    fn record(&mut self, reply: &ChunkReply) {
        self.added += reply.added;
        if reply.micros == 0 || reply.read == 0 {
            return; // a replayed step, or an empty page: no measure
        }
        let budget = CALL_BUDGET.as_micros() as u64;
        let fitting = reply.read.saturating_mul(budget) / reply.micros;
        self.chunk = fitting.clamp(MIN_CHUNK, MAX_CHUNK).min(self.chunk * 2);
    }
}

/// `chunk_add.lua`'s reply.
struct ChunkReply {
    added: u64,
    /// Entries of the daily key read by the call.
    read: u64,
    /// Redis' time spent in the call (0 when the step was replayed from the ledger).
    micros: u64,
    /// The last member read and its score as read: where the next call of mode `after` goes on.
    last_member: Value,
    last_score: String,
}

/// The temporary key's name part for one build of a rebuild (a rebuild builds again when the
/// swap finds its result incomplete).
fn build_id(token: &str, attempt: u32) -> String {
    format!("{token}-{attempt}")
}

/// The latest day a live ranking may have been built for at `now`: a later one's record is from
/// the future. [`FUTURE_TOLERANCE`] absorbs clocks a little apart around midnight.
pub(crate) fn latest_plausible_day(now: DateTime<Utc>, timezone: Tz) -> NaiveDate {
    day_at(now + FUTURE_TOLERANCE, timezone)
}

enum Swap {
    /// Swapped in (or already live). `replaced`: the day of the ranking it replaced.
    Live {
        products: u64,
        replaced: Option<NaiveDate>,
    },
    LaterDayLive {
        day: NaiveDate,
    },
    /// The temporary key held `found` members, not the number the build added.
    Incomplete {
        found: u64,
    },
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
