//! The Redis side of the ranking log: reading the log streams in a consumer group, taking over
//! what a dead consumer left, acknowledging after the COMMIT, the dead-letter stream and the
//! backlog figures.
//!
//! Every command here is safe to run twice (fred resends a command whose reply was lost): reads
//! deliver at most a duplicate that the batch marker makes harmless, the acknowledge and
//! dead-letter scripts act only on entries still in the stream, and group creation ignores
//! `BUSYGROUP`.
//!
//! **Ownership.** An entry belongs to the consumer whose pending list holds it. A consumer that
//! was stalled (paused, SIGSTOPped, cut off) past [`CLAIM_IDLE`] may find on waking that another
//! reader took its entries over with `XAUTOCLAIM`. Every command a consumer runs on entries it
//! read — refreshing them, handing them back, acknowledging them, dead-lettering them — therefore
//! first checks, in the same script, that they are still pending *to it* (`XPENDING … consumer`)
//! and leaves the others alone, returning them as lost; the writer checks the same before each
//! write attempt and drops lost entries unwritten. So a stale consumer neither takes an entry
//! back (`XCLAIM` would move it whatever its owner) nor acknowledges one its new owner is writing.
//! What it cannot prevent is a stall *between* that check and the COMMIT: then both write, and
//! the batch marker makes the second write nothing. (An entry also stops being pending to its
//! reader when Redis restarts from a file older than the read: it is then delivered again, to
//! whichever reader asks first, and the reader that had it drops its copy the same way.)

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fred::prelude::*;
use fred::types::scripts::Script;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::entry::{LogEntry, RawFields};
use crate::coupon::LogReady;
use crate::keys::KeyTemplates;
use crate::metrics::Metrics;

/// The consumer group every worker reads the log streams in.
pub const GROUP: &str = "ranking-log";

/// An entry read by a consumer and not acknowledged for this long is taken over by any live
/// reader. Live readers refresh their entries every [`MAINTENANCE_EVERY`], so only a dead or
/// stuck process's entries get this old.
pub const CLAIM_IDLE: Duration = Duration::from_secs(10);

/// How often a reader refreshes its entries, takes over idle ones and updates the backlog
/// metrics.
pub const MAINTENANCE_EVERY: Duration = Duration::from_secs(2);

/// Entries read per stream and command.
const READ_COUNT: u64 = 32;

/// `owned(id)`: whether entry `id` of KEYS[1] is pending to consumer ARGV[2] of group ARGV[1].
/// Shared by the scripts below.
const OWNED_LUA: &str = r#"
local function owned(id)
  return #redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1, ARGV[2]) == 1
end
"#;

/// `expect_types({{key, type}, …})`: fails the script with `WRONGTYPE`, before it writes
/// anything, when a key exists with another type.
const TYPES_LUA: &str = r#"
local function expect_types(specs)
  for _, spec in ipairs(specs) do
    local t = redis.call('TYPE', spec[1])['ok']
    if t ~= 'none' and t ~= spec[2] then
      error({ err = 'WRONGTYPE ' .. spec[1] .. ' is a ' .. t .. ', expected a ' .. spec[2] })
    end
  end
end
"#;

/// Refreshes (ARGV[3] = 0) or hands back (ARGV[3] = a long idle time) the entries ARGV[4..]
/// still pending to this consumer; leaves the others to whoever holds them now. KEYS[1] log
/// stream, KEYS[2] (optional) the lane's reconciliation marker; ARGV: group, consumer, idle ms,
/// ids. Returns the identity of this Redis (run_id and replication id, computed by
/// `identity.lua` in front of this script), '1' if the marker names it (this Redis is the one
/// last reconciled for the lane) else '0', then the ids this consumer no longer holds. The writer
/// writes the rows of a reconciled Redis only while MySQL's `redis_fence` row of the lane names
/// it (see [`super::writer`]).
const HOLD_LUA: &str = r#"
local reconciled = '0'
if KEYS[2] and redis.call('GET', KEYS[2]) == identity then reconciled = '1' end
local out = { identity, reconciled }
for i = 4, #ARGV do
  if owned(ARGV[i]) then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'IDLE', ARGV[3], 'JUSTID')
  else
    out[#out + 1] = ARGV[i]
  end
end
return out
"#;

/// Acknowledges entries whose rows are committed and that are still pending to this consumer:
/// XACK, XDEL, and the row counter down by the rows of each entry this call actually deleted
/// (so running it twice subtracts once). An entry another consumer took over is left to it (it
/// finds the marker and acknowledges it). KEYS[1] log stream, KEYS[2] row counter; ARGV[1]
/// group, ARGV[2] consumer, then pairs (entry id, rows). Returns the rows removed.
const ACK_LUA: &str = r#"
local removed = 0
for i = 3, #ARGV, 2 do
  if owned(ARGV[i]) then
    redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
    if redis.call('XDEL', KEYS[1], ARGV[i]) == 1 then removed = removed + tonumber(ARGV[i + 1]) end
  end
end
if removed > 0 and redis.call('TYPE', KEYS[2])['ok'] ~= 'none' then
  if redis.call('DECRBY', KEYS[2], removed) < 0 then redis.call('SET', KEYS[2], '0') end
end
return removed
"#;

/// Moves an entry MySQL rejected for good to the dead-letter stream with the error, once, if it
/// is still pending to this consumer (returns 0 otherwise). KEYS[1] log stream, KEYS[2] row
/// counter, KEYS[3] dead-letter stream; ARGV: group, consumer, entry id, rows, m, r, o, error.
/// The key types are checked before anything is written: a script's error does not undo the
/// writes before it, and an XDEL followed by a failing XADD would lose the entry's rows.
const DEAD_LUA: &str = r#"
if not owned(ARGV[3]) then return 0 end
expect_types({ { KEYS[3], 'stream' }, { KEYS[2], 'string' } })
if redis.call('XDEL', KEYS[1], ARGV[3]) == 1 then
  redis.call('XADD', KEYS[3], '*', 'stream', KEYS[1], 'id', ARGV[3], 'm', ARGV[5], 'r', ARGV[6],
    'o', ARGV[7], 'error', ARGV[8])
  if redis.call('TYPE', KEYS[2])['ok'] ~= 'none' then redis.call('DECRBY', KEYS[2], ARGV[4]) end
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
return 1
"#;

/// Moves up to ARGV[1] dead-lettered entries back into the log stream as new entries.
/// KEYS[1] dead-letter stream, KEYS[2] log stream, KEYS[3] row counter. Returns the entries
/// moved. The key types are checked first: an XADD followed by a failing INCRBY would leave the
/// entry in both streams, and every run again would add one more copy (rows written twice).
const REQUEUE_LUA: &str = r#"
expect_types({ { KEYS[1], 'stream' }, { KEYS[2], 'stream' }, { KEYS[3], 'string' } })
local entries = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', ARGV[1])
for _, entry in ipairs(entries) do
  local f = {}
  for i = 1, #entry[2], 2 do f[entry[2][i]] = entry[2][i + 1] end
  if f['m'] and f['r'] and f['o'] and #f['o'] > 0 then
    redis.call('XADD', KEYS[2], '*', 'm', f['m'], 'r', f['r'], 'o', f['o'])
    redis.call('INCRBY', KEYS[3], #f['o'])
  end
  redis.call('XDEL', KEYS[1], entry[1])
end
return #entries
"#;

/// Entries this process has read and not yet acknowledged, per stream.
#[derive(Clone, Default)]
pub struct InHand(Arc<Mutex<HashMap<String, HashSet<String>>>>);

impl InHand {
    /// Adds an entry; false if it was already in hand (read again by a claim).
    fn insert(&self, stream: &str, id: &str) -> bool {
        // A std mutex: held for a few instructions, never across an await.
        let Ok(mut map) = self.0.lock() else {
            return true;
        };
        map.entry(stream.to_owned())
            .or_default()
            .insert(id.to_owned())
    }

    pub fn remove(&self, stream: &str, id: &str) {
        if let Ok(mut map) = self.0.lock()
            && let Some(ids) = map.get_mut(stream)
        {
            ids.remove(id);
            if ids.is_empty() {
                map.remove(stream);
            }
        }
    }

    fn snapshot(&self) -> Vec<(String, Vec<String>)> {
        self.0
            .lock()
            .map(|map| {
                map.iter()
                    .map(|(stream, ids)| (stream.clone(), ids.iter().cloned().collect()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// What [`LogStream::touch_on`] found: the identity of the Redis the entries are held on (`None`
/// when the stream's group is gone there: every entry is lost), whether the lane's marker names
/// that Redis (it is the one last reconciled for the lane), and the entries this consumer no
/// longer holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    pub identity: Option<String>,
    pub reconciled: bool,
    pub lost: Vec<String>,
}

/// Commands on the log streams, for one consumer.
#[derive(Clone)]
pub struct LogStream {
    client: Client,
    consumer: String,
    hold: Script,
    ack: Script,
    dead: Script,
}

impl LogStream {
    /// A reader with a consumer name of its own: host, process id and a random part, so two
    /// processes never share one (a restarted process's old entries are taken over by claim).
    pub fn new(client: Client) -> Self {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into());
        let random = uuid::Uuid::new_v4().simple().to_string();
        Self {
            client,
            consumer: format!("{host}-{}-{}", std::process::id(), &random[..8]),
            hold: Script::from_lua(format!(
                "{}{OWNED_LUA}{HOLD_LUA}",
                crate::coupon::REDIS_IDENTITY_LUA
            )),
            ack: Script::from_lua(format!("{OWNED_LUA}{ACK_LUA}")),
            dead: Script::from_lua(format!("{OWNED_LUA}{TYPES_LUA}{DEAD_LUA}")),
        }
    }

    /// The Redis client the commands go to.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// This reader's consumer name in the group.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    async fn create_group(&self, stream: &str) -> anyhow::Result<()> {
        // From id 0: entries written before the group existed are read too.
        let created: Result<Value, Error> =
            self.client.xgroup_create(stream, GROUP, "0", true).await;
        match created {
            Ok(_) => Ok(()),
            Err(e) if e.details().contains("BUSYGROUP") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Runs `command`, creating the group first if Redis says it is missing (a new stream, or
    /// one lost with a Redis restart).
    async fn with_group<T, F, Fut>(&self, stream: &str, command: F) -> anyhow::Result<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        match command().await {
            Ok(value) => Ok(value),
            Err(e) if e.details().contains("NOGROUP") => {
                self.create_group(stream).await?;
                Ok(command().await?)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Entries never delivered to any consumer, now delivered to this one.
    pub async fn read_new(&self, stream: &str) -> anyhow::Result<Vec<(String, Option<RawFields>)>> {
        let reply: Value = self
            .with_group(stream, || {
                self.client.xreadgroup::<Value, _, _, _, _>(
                    GROUP,
                    self.consumer.as_str(),
                    Some(READ_COUNT),
                    None,
                    false,
                    stream,
                    ">",
                )
            })
            .await?;
        // [[stream, [[id, [field, value, …]], …]]] (RESP2), or nil when there is nothing.
        let entries = match reply {
            Value::Array(mut streams) if !streams.is_empty() => match streams.swap_remove(0) {
                Value::Array(mut pair) if pair.len() == 2 => pair.swap_remove(1),
                _ => Value::Null,
            },
            _ => Value::Null,
        };
        Ok(parse_entries(entries))
    }

    /// Takes over entries another consumer read and left idle for [`CLAIM_IDLE`], from
    /// `cursor`; returns them and the next cursor.
    pub async fn claim_idle(
        &self,
        stream: &str,
        cursor: &str,
    ) -> anyhow::Result<(String, Vec<(String, Option<RawFields>)>)> {
        let reply: Value = self
            .with_group(stream, || {
                self.client.xautoclaim::<Value, _, _, _, _>(
                    stream,
                    GROUP,
                    self.consumer.as_str(),
                    CLAIM_IDLE.as_millis() as u64,
                    cursor,
                    Some(READ_COUNT),
                    false,
                )
            })
            .await?;
        // [next cursor, [[id, fields], …], (Redis 7) [deleted ids]]
        let mut parts = match reply {
            Value::Array(parts) => parts,
            _ => Vec::new(),
        };
        if parts.len() < 2 {
            return Ok(("0-0".into(), Vec::new()));
        }
        let entries = parse_entries(parts.swap_remove(1));
        let next = parts
            .first()
            .and_then(|v| v.as_string())
            .unwrap_or_else(|| "0-0".into());
        Ok((next, entries))
    }

    /// Resets the idle time of entries this consumer still holds, so no live reader takes them
    /// over while MySQL is slow. Returns the entries another consumer took over meanwhile (this
    /// one was stalled past [`CLAIM_IDLE`]); they are left to it.
    pub async fn touch(&self, stream: &str, ids: Vec<String>) -> anyhow::Result<Vec<String>> {
        Ok(self.hold(stream, ids, 0, None).await?.lost)
    }

    /// [`Self::touch`], also saying which Redis still holds the entries for this consumer and
    /// whether it is the one last reconciled for the lane whose marker is `marker` (what the
    /// writer checks against the lane's fence before writing their rows).
    pub async fn touch_on(
        &self,
        stream: &str,
        ids: Vec<String>,
        marker: Option<&str>,
    ) -> anyhow::Result<Held> {
        self.hold(stream, ids, 0, marker).await
    }

    /// Hands entries this consumer could not write back: marks those it still holds long idle,
    /// so the next reader (this process restarted, or another replica) takes them over at once.
    /// Returns the entries another consumer had already taken over.
    pub async fn release(&self, stream: &str, ids: Vec<String>) -> anyhow::Result<Vec<String>> {
        Ok(self
            .hold(stream, ids, CLAIM_IDLE.as_millis() as u64 * 100, None)
            .await?
            .lost)
    }

    /// Sets the idle time of the entries of `ids` still pending to this consumer; returns the
    /// others and the Redis it ran on (see [`HOLD_LUA`]). A stream whose group is gone (a Redis
    /// restarted from an older file) holds nothing for anyone: every id is lost.
    async fn hold(
        &self,
        stream: &str,
        ids: Vec<String>,
        idle_ms: u64,
        marker: Option<&str>,
    ) -> anyhow::Result<Held> {
        let mut held = Held::default();
        let mut keys = vec![stream.to_owned()];
        keys.extend(marker.map(str::to_owned));
        for (n, chunk) in ids.chunks(500).enumerate() {
            let mut args = Vec::with_capacity(3 + chunk.len());
            args.push(GROUP.to_owned());
            args.push(self.consumer.clone());
            args.push(idle_ms.to_string());
            args.extend(chunk.iter().cloned());
            let reply: Result<Vec<String>, Error> = self
                .hold
                .evalsha_with_reload(&self.client, keys.clone(), args)
                .await;
            match reply {
                Ok(reply) => {
                    let mut reply = reply.into_iter();
                    let identity = reply.next();
                    let reconciled = reply.next().as_deref() == Some("1");
                    // Chunks answered by different Redis servers: no single one vouches for the
                    // entries; the caller tries again.
                    if n > 0 && held.identity != identity {
                        anyhow::bail!(
                            "Redis changed while holding the entries of {stream} ({:?}, then {identity:?})",
                            held.identity
                        );
                    }
                    held.identity = identity;
                    held.reconciled = (n == 0 || held.reconciled) && reconciled;
                    held.lost.extend(reply);
                }
                Err(e) if e.details().contains("NOGROUP") => {
                    held.lost.extend(chunk.iter().cloned())
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(held)
    }

    /// Acknowledges and deletes committed entries `(id, rows)` of one stream that this consumer
    /// still holds (see the module docs on ownership).
    pub async fn ack(&self, stream: &str, entries: &[(&str, usize)]) -> anyhow::Result<()> {
        let mut args = Vec::with_capacity(2 + entries.len() * 2);
        args.push(GROUP.to_owned());
        args.push(self.consumer.clone());
        for (id, rows) in entries {
            args.push((*id).to_owned());
            args.push(rows.to_string());
        }
        let _: i64 = self
            .ack
            .evalsha_with_reload(
                &self.client,
                vec![stream.to_owned(), rows_key(stream)],
                args,
            )
            .await?;
        Ok(())
    }

    /// Moves an entry to `<log>:dead` with `error`, and acknowledges it, if this consumer still
    /// holds it; `false` when another consumer took it over (it is left to that one).
    pub async fn dead_letter(
        &self,
        stream: &str,
        id: &str,
        raw: &RawFields,
        rows: usize,
        error: &str,
    ) -> anyhow::Result<bool> {
        let keys = vec![stream.to_owned(), rows_key(stream), dead_key(stream)];
        let bytes = |b: &Vec<u8>| Value::Bytes(fred::bytes::Bytes::from(b.clone()));
        let args: Vec<Value> = vec![
            GROUP.into(),
            self.consumer.as_str().into(),
            id.into(),
            rows.to_string().into(),
            bytes(&raw.members),
            bytes(&raw.ranks),
            bytes(&raw.outcomes),
            error.into(),
        ];
        let moved: i64 = self
            .dead
            .evalsha_with_reload(&self.client, keys, args)
            .await?;
        Ok(moved == 1)
    }

    /// Rows waiting in the log streams of `keys` (every registered coupon's in the per-coupon
    /// layout) and the age of the oldest entry.
    pub async fn backlog(&self, keys: &KeyTemplates) -> anyhow::Result<(u64, Duration)> {
        backlog(&self.client, keys).await
    }
}

/// The row counter of a resolved log stream key.
fn rows_key(stream: &str) -> String {
    format!("{stream}:rows")
}

/// The dead-letter stream of a resolved log stream key.
fn dead_key(stream: &str) -> String {
    format!("{stream}:dead")
}

/// `[[id, [field, value, …] | nil], …]` as `(id, fields)`; `None` for an entry deleted while
/// pending.
fn parse_entries(value: Value) -> Vec<(String, Option<RawFields>)> {
    let Value::Array(items) = value else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(mut pair) = item else {
            continue;
        };
        if pair.len() != 2 {
            continue;
        }
        let fields = pair.pop();
        let Some(id) = pair.pop().and_then(|v| v.as_string()) else {
            continue;
        };
        let fields = match fields {
            Some(Value::Array(values)) => {
                let mut raw = RawFields::default();
                for kv in values.chunks(2) {
                    if let [k, v] = kv {
                        // Bytes as they are: a value that is not UTF-8 must reach the
                        // dead-letter stream unchanged, not as an empty string.
                        let value = v.as_bytes().map(<[u8]>::to_vec).unwrap_or_default();
                        match k.as_str().as_deref() {
                            Some("m") => raw.members = value,
                            Some("r") => raw.ranks = value,
                            Some("o") => raw.outcomes = value,
                            _ => {}
                        }
                    }
                }
                Some(raw)
            }
            _ => None,
        };
        out.push((id, fields));
    }
    out
}

/// How often the reader walks every log stream — the registered coupons' and, per coupon, those
/// SCAN finds of coupons no longer in the registry — [`SWEEP_CHUNK`] streams at a time: the
/// safety net for rows no [`LogReady`] named (written by a process that died before reading
/// them, put back by `requeue-log-dead`, left pending by a dead reader), and the dead-letter
/// gauge. Between sweeps the reader looks only at the streams it knows to have entries, so an
/// idle reader costs nothing however many coupons are registered (issue 19). Per coupon, the
/// periodic sweep runs only in the process holding the sweep lease
/// ([`LogReady::sweeps_here`]): one replica walks the streams, whatever their number; each
/// reader's first sweep and those asked for ([`LogReady::sweep_now`]) run anywhere.
pub const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// How often the sweep also looks with SCAN (the whole keyspace, every primary) for log streams
/// of coupons no longer in the registry: rare, and SCAN costs Redis ~0.1 s per 100 000 keys.
pub const SCAN_EVERY: Duration = Duration::from_secs(300);

/// Streams looked at concurrently in one go by a sweep (fred pipelines the commands); the walk
/// checks for shutdown between two chunks.
const SWEEP_CHUNK: usize = 500;

/// Per-coupon layout: the log streams (as lanes) of coupons that are not in the registry but
/// still have a log stream — a coupon retired (`SREM`) before its rows were written. Their rows
/// are written and counted like any other. Empty in the single-queue layout.
pub async fn unregistered_log_lanes(
    client: &Client,
    keys: &KeyTemplates,
    registered: &[KeyTemplates],
) -> anyhow::Result<Vec<KeyTemplates>> {
    if !keys.per_coupon() {
        return Ok(Vec::new());
    }
    let known: HashSet<&str> = registered.iter().map(|lane| lane.log.as_str()).collect();
    let mut ids: Vec<i64> = crate::backends::scan_keys(client, &keys.log_pattern())
        .await?
        .iter()
        .filter(|key| !known.contains(key.as_str()))
        .filter_map(|key| keys.coupon_of_log(key))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    Ok(ids.into_iter().map(|id| keys.for_coupon(id)).collect())
}

/// Every log stream to read: the registered coupons' (or the single one) and, per coupon, any
/// left by a coupon removed from the registry.
pub async fn log_lanes(client: &Client, keys: &KeyTemplates) -> anyhow::Result<Vec<KeyTemplates>> {
    let mut lanes = crate::coupon::queue_keys(client, keys).await?;
    let extra = unregistered_log_lanes(client, keys, &lanes).await?;
    lanes.extend(extra);
    Ok(lanes)
}

/// See [`LogStream::backlog`].
pub async fn backlog(client: &Client, keys: &KeyTemplates) -> anyhow::Result<(u64, Duration)> {
    backlog_of(client, &log_lanes(client, keys).await?).await
}

/// Rows waiting in the log streams of `lanes` and the age of the oldest entry ([`SWEEP_CHUNK`]
/// streams at a time).
async fn backlog_of(client: &Client, lanes: &[KeyTemplates]) -> anyhow::Result<(u64, Duration)> {
    let now_ms = chrono::Utc::now().timestamp_millis();
    let mut rows = 0u64;
    let mut oldest_ms: Option<i64> = None;
    for chunk in lanes.chunks(SWEEP_CHUNK) {
        let figures = futures_util::future::try_join_all(chunk.iter().map(|lane| async move {
            let count: Option<i64> = client.get(lane.log_rows()).await?;
            let first: Vec<(String, HashMap<String, String>)> =
                client.xrange(&lane.log, "-", "+", Some(1)).await?;
            let first_ms = first
                .first()
                .and_then(|(id, _)| id.split_once('-'))
                .and_then(|(ms, _)| ms.parse::<i64>().ok());
            // An empty stream holds no rows whatever its counter says: a counter left behind
            // by entries deleted by hand (XDEL, XTRIM, DEL) would otherwise keep `drain`
            // waiting for ever and the backlog gauge up.
            let count = if first.is_empty() {
                0
            } else {
                count.unwrap_or(0).max(0) as u64
            };
            anyhow::Ok((count, first_ms))
        }))
        .await?;
        for (count, first_ms) in figures {
            rows += count;
            if let Some(ms) = first_ms {
                oldest_ms = Some(oldest_ms.map_or(ms, |o| o.min(ms)));
            }
        }
    }
    let age = oldest_ms
        .map(|ms| Duration::from_millis((now_ms - ms).max(0) as u64))
        .unwrap_or_default();
    Ok((rows, age))
}

/// `requeue-log-dead`: moves every dead-lettered log entry back into its log stream
/// (as a new entry, written again from the start). Returns the entries moved.
pub async fn requeue_log_dead(client: &Client, keys: &KeyTemplates) -> anyhow::Result<u64> {
    let script = Script::from_lua(format!("{TYPES_LUA}{REQUEUE_LUA}"));
    let mut moved = 0u64;
    for lane in log_lanes(client, keys).await? {
        loop {
            let n: i64 = script
                .evalsha_with_reload(
                    client,
                    vec![lane.log_dead(), lane.log.clone(), lane.log_rows()],
                    vec!["100"],
                )
                .await?;
            if n <= 0 {
                break;
            }
            moved += n as u64;
        }
    }
    Ok(moved)
}

/// An entry on its way to the writer, holding its rows' share of the channel's capacity.
pub struct Delivered {
    pub entry: LogEntry,
    _permit: OwnedSemaphorePermit,
}

/// The reader's work set (log stream key → its lane), shared with [`super::LogPipeline`] for
/// the backlog of the streams known to have entries.
pub type WorkSet = Arc<Mutex<BTreeMap<String, KeyTemplates>>>;

/// Rows waiting in the streams of the work set `work`, and the age of the oldest entry: after a
/// finished walk of every stream ([`LogReady::sweeps_done`]), every row waiting in Redis, at
/// the cost of the streams with entries only.
pub async fn known_backlog(client: &Client, work: &WorkSet) -> anyhow::Result<(u64, Duration)> {
    let lanes: Vec<KeyTemplates> = work
        .lock()
        .map(|work| work.values().cloned().collect())
        .unwrap_or_default();
    backlog_of(client, &lanes).await
}

/// The reader task: moves entries from the log streams into the bounded channel.
///
/// It reads only the streams it knows to have entries (its *work set*): the lanes the drain of
/// this process named ([`LogReady::wrote`], after each batch that wrote rows) and those a sweep
/// found with entries ([`SWEEP_EVERY`]); a stream leaves the set once it is empty. In the
/// single-queue layout the one stream is always in it.
pub struct LogReader {
    pub(super) stream: LogStream,
    pub(super) keys: KeyTemplates,
    pub(super) tx: mpsc::Sender<Delivered>,
    pub(super) permits: Arc<Semaphore>,
    pub(super) capacity: usize,
    pub(super) in_hand: InHand,
    pub(super) wake: Arc<LogReady>,
    pub(super) poll: Duration,
    pub(super) metrics: Metrics,
    /// The work set: log stream key → its lane. A std mutex, never held across an await.
    pub(super) work: WorkSet,
}

impl LogReader {
    /// Reads until `stop`; entries read are handed to the writer (waiting for room in the
    /// channel) unless `abort` fires first. Dropping the sender at the end lets the writer
    /// finish. Every walk checks `stop` between two chunks.
    pub async fn run(self, stop: CancellationToken, abort: CancellationToken) {
        let mut last_maintenance: Option<tokio::time::Instant> = None;
        let mut last_sweep: Option<tokio::time::Instant> = None;
        let mut last_scan: Option<tokio::time::Instant> = None;
        // Coupons no longer registered whose log stream the last SCAN found.
        let mut unregistered: Vec<i64> = Vec::new();
        let mut cursors: HashMap<String, String> = HashMap::new();
        let mut errors = 0u32;
        if !self.keys.per_coupon() {
            self.know([self.keys.clone()]);
        }
        'reading: while !stop.is_cancelled() {
            let named: Vec<KeyTemplates> = self
                .wake
                .take_lanes()
                .into_iter()
                .map(|coupon| self.lane_of(coupon))
                .collect();
            self.know(named);
            let asked = self.wake.take_sweep();
            let first = last_sweep.is_none();
            let due = last_sweep.is_none_or(|t| t.elapsed() >= SWEEP_EVERY);
            // The periodic walk runs on the replica holding the sweep lease (per coupon); the
            // first one and those asked for run here whoever holds it.
            if due && !asked && !first && !self.wake.sweeps_here() {
                last_sweep = Some(tokio::time::Instant::now());
                // Another replica walks every stream and counts the dead letters: this one's
                // count would only grow stale (the alert takes the largest over replicas).
                self.metrics.ranking_log_dead_letters.set(0);
            } else if asked || due {
                last_sweep = Some(tokio::time::Instant::now());
                let scan = asked || last_scan.is_none_or(|t| t.elapsed() >= SCAN_EVERY);
                if scan {
                    last_scan = last_sweep;
                }
                if let Err(e) = self.sweep(&stop, scan, &mut unregistered).await {
                    if scan {
                        last_scan = None;
                    }
                    if asked {
                        // Whoever asked is waiting for a finished walk: the next look tries again.
                        self.wake.sweep_now();
                    }
                    self.failed(&mut errors, &e);
                }
                if stop.is_cancelled() {
                    break;
                }
            }
            let lanes = self.known();
            let mut read = 0usize;
            if last_maintenance.is_none_or(|t| t.elapsed() >= MAINTENANCE_EVERY) {
                last_maintenance = Some(tokio::time::Instant::now());
                cursors.retain(|stream, _| lanes.iter().any(|lane| &lane.log == stream));
                match self.maintain(&lanes, &mut cursors, &abort).await {
                    Ok(Some(n)) => read += n,
                    Ok(None) => break 'reading,
                    Err(e) => self.failed(&mut errors, &e),
                }
            }
            let mut nothing_new = Vec::new();
            for lane in &lanes {
                if stop.is_cancelled() {
                    break 'reading;
                }
                match self.stream.read_new(&lane.log).await {
                    Ok(entries) => {
                        errors = 0;
                        read += entries.len();
                        if entries.is_empty() {
                            nothing_new.push(lane);
                        }
                        for (id, fields) in entries {
                            if !self.hand_over(&lane.log, id, fields, &abort).await {
                                break 'reading;
                            }
                        }
                    }
                    Err(e) => self.failed(&mut errors, &e),
                }
            }
            if let Err(e) = self.forget_empty(&nothing_new).await {
                self.failed(&mut errors, &e);
            }
            if read == 0 {
                self.pause(&stop).await;
            }
        }
    }

    /// The lane of `coupon` (`None`: the single queue).
    fn lane_of(&self, coupon: Option<i64>) -> KeyTemplates {
        match coupon {
            Some(id) => self.keys.for_coupon(id),
            None => self.keys.clone(),
        }
    }

    /// Adds lanes to the work set.
    fn know(&self, lanes: impl IntoIterator<Item = KeyTemplates>) {
        if let Ok(mut work) = self.work.lock() {
            for lane in lanes {
                work.entry(lane.log.clone()).or_insert(lane);
            }
        }
    }

    /// The work set's lanes.
    fn known(&self) -> Vec<KeyTemplates> {
        self.work
            .lock()
            .map(|work| work.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Per-coupon layout: of `lanes` (nothing new read from them), those whose stream is empty
    /// — no entry waiting or pending anywhere — leave the work set. A batch that writes to one
    /// afterwards names it again.
    async fn forget_empty(&self, lanes: &[&KeyTemplates]) -> anyhow::Result<()> {
        if !self.keys.per_coupon() || lanes.is_empty() {
            return Ok(());
        }
        let client = &self.stream.client;
        let lengths = futures_util::future::try_join_all(
            lanes.iter().map(|lane| client.xlen::<u64, _>(&lane.log)),
        )
        .await?;
        if let Ok(mut work) = self.work.lock() {
            for (lane, n) in lanes.iter().zip(lengths) {
                if n == 0 {
                    work.remove(&lane.log);
                }
            }
        }
        Ok(())
    }

    /// Walks every log stream ([`SWEEP_EVERY`]): those with entries join the work set, and the
    /// dead-letter gauge is counted. Stops between two chunks when `stop` fires.
    /// With `scan`, also looks with SCAN for log streams of coupons no longer registered and
    /// remembers them in `unregistered` (until the next scan).
    async fn sweep(
        &self,
        stop: &CancellationToken,
        scan: bool,
        unregistered: &mut Vec<i64>,
    ) -> anyhow::Result<()> {
        let client = &self.stream.client;
        // The lanes by coupon (`None`: the single queue), and their log streams.
        let coupons: Vec<Option<i64>> = if self.keys.per_coupon() {
            let mut ids = crate::coupon::registered_coupons(client, &self.keys).await?;
            if scan {
                let known: HashSet<i64> = ids.iter().copied().collect();
                *unregistered = crate::backends::scan_keys(client, &self.keys.log_pattern())
                    .await?
                    .iter()
                    .filter_map(|key| self.keys.coupon_of_log(key))
                    .filter(|id| !known.contains(id))
                    .collect();
            }
            ids.extend(unregistered.iter().copied());
            ids.sort_unstable();
            ids.dedup();
            ids.into_iter().map(Some).collect()
        } else {
            vec![None]
        };
        let mut dead = 0u64;
        for chunk in coupons.chunks(SWEEP_CHUNK) {
            if stop.is_cancelled() {
                return Ok(());
            }
            let lengths =
                futures_util::future::try_join_all(chunk.iter().map(|&coupon| async move {
                    let log = match coupon {
                        Some(id) => self.keys.log_of(id),
                        None => self.keys.log.clone(),
                    };
                    let entries: u64 = client.xlen(&log).await?;
                    let dead: u64 = client.xlen(dead_key(&log)).await?;
                    anyhow::Ok((entries, dead))
                }))
                .await?;
            dead += lengths.iter().map(|(_, d)| d).sum::<u64>();
            self.know(
                chunk
                    .iter()
                    .zip(&lengths)
                    .filter(|(_, (entries, _))| *entries > 0)
                    .map(|(&coupon, _)| self.lane_of(coupon)),
            );
        }
        self.metrics.ranking_log_dead_letters.set(dead as i64);
        self.wake.swept();
        Ok(())
    }

    async fn pause(&self, stop: &CancellationToken) {
        tokio::select! {
            _ = self.wake.notified() => {}
            _ = tokio::time::sleep(self.poll) => {}
            _ = stop.cancelled() => {}
        }
    }

    /// Logs a failed read: the first of a run at WARN, later ones at DEBUG (Redis may be down
    /// for a while; the drain says so too).
    fn failed(&self, errors: &mut u32, error: &anyhow::Error) {
        if *errors == 0 {
            tracing::warn!(error = %format!("{error:#}"), "reading ranking-log rows from Redis failed; retrying");
        } else {
            tracing::debug!(error = %format!("{error:#}"), "reading ranking-log rows from Redis still failing");
        }
        *errors += 1;
    }

    /// Refreshes the entries in hand, takes over idle ones and updates the backlog gauges, over
    /// the work set's `lanes`. Returns the entries taken over, or `None` when `abort` fired.
    async fn maintain(
        &self,
        lanes: &[KeyTemplates],
        cursors: &mut HashMap<String, String>,
        abort: &CancellationToken,
    ) -> anyhow::Result<Option<usize>> {
        self.touch_in_hand().await?;
        let mut taken = 0;
        for lane in lanes {
            let cursor = cursors
                .get(&lane.log)
                .cloned()
                .unwrap_or_else(|| "0-0".into());
            let (next, entries) = self.stream.claim_idle(&lane.log, &cursor).await?;
            cursors.insert(lane.log.clone(), next);
            for (id, fields) in entries {
                taken += 1;
                if !self.hand_over(&lane.log, id, fields, abort).await {
                    return Ok(None);
                }
            }
        }
        if taken > 0 {
            tracing::info!(
                entries = taken,
                "took over ranking-log entries another consumer left idle"
            );
        }
        self.observe_backlog(lanes).await?;
        Ok(Some(taken))
    }

    /// The backlog gauges over `lanes`: the streams this reader knows to have entries (a stream
    /// another process wrote to and this one never heard of counts from the next sweep).
    async fn observe_backlog(&self, lanes: &[KeyTemplates]) -> anyhow::Result<()> {
        let (rows, age) = backlog_of(&self.stream.client, lanes).await?;
        self.metrics.ranking_log_backlog_rows.set(rows as i64);
        self.metrics
            .ranking_log_backlog_oldest_age
            .set(age.as_secs_f64());
        Ok(())
    }

    /// Refreshes the entries in hand that this consumer still holds. Those another consumer took
    /// over while this one was stalled are logged and left to it; the writer drops them unwritten
    /// when it reaches them (it checks again before writing).
    async fn touch_in_hand(&self) -> anyhow::Result<()> {
        for (stream, ids) in self.in_hand.snapshot() {
            let lost = self.stream.touch(&stream, ids).await?;
            if !lost.is_empty() {
                tracing::warn!(%stream, entries = lost.len(),
                    "ranking-log entries read here are no longer pending to this reader (another took them over while this one was stalled, or Redis restarted from an older file); left to whoever holds them");
            }
        }
        Ok(())
    }

    /// Touches the entries in hand and updates the backlog gauges (no takeover: there is no room
    /// for more entries). Failures are left to the next round.
    async fn refresh_while_full(&self) {
        let refreshed = async {
            self.touch_in_hand().await?;
            self.observe_backlog(&self.known()).await
        };
        if let Err(e) = refreshed.await {
            tracing::debug!(error = %format!("{e:#}"),
                "refreshing ranking-log entries while the channel is full failed");
        }
    }

    /// Sends one entry to the writer, or dead-letters it if it cannot be decoded. False when
    /// `abort` fired while waiting for room.
    async fn hand_over(
        &self,
        stream: &str,
        id: String,
        fields: Option<RawFields>,
        abort: &CancellationToken,
    ) -> bool {
        let Some(raw) = fields else {
            return true; // deleted while pending: already written and acknowledged
        };
        let entry = match LogEntry::decode(stream, &id, raw.clone()) {
            Ok(entry) => entry,
            Err(reason) => {
                let rows = raw.outcomes.len();
                match self
                    .stream
                    .dead_letter(stream, &id, &raw, rows, &format!("undecodable: {reason}"))
                    .await
                {
                    Ok(true) => {
                        self.metrics.ranking_log_rows_given_up.inc_by(rows as u64);
                        tracing::error!(%stream, %id, %reason, "undecodable ranking-log entry; moved to the dead-letter stream");
                    }
                    Ok(false) => tracing::warn!(%stream, %id,
                        "another reader took the undecodable entry over; left to it"),
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "could not dead-letter it; it stays pending")
                    }
                }
                return true;
            }
        };
        if !self.in_hand.insert(stream, &id) {
            return true; // already on its way
        }
        let wanted = entry.rows.len().clamp(1, self.capacity) as u32;
        // While the channel is full (MySQL down or slow) the loop in `run` does not get to
        // `maintain`: keep the entries in hand fresh and the backlog gauges true from here.
        let permit = loop {
            tokio::select! {
                permit = self.permits.clone().acquire_many_owned(wanted) => break permit,
                _ = abort.cancelled() => return false,
                _ = tokio::time::sleep(MAINTENANCE_EVERY) => self.refresh_while_full().await,
            }
        };
        let Ok(permit) = permit else {
            return false;
        };
        self.metrics
            .ranking_log_channel_depth
            .set((self.capacity - self.permits.available_permits()) as i64);
        self.tx
            .send(Delivered {
                entry,
                _permit: permit,
            })
            .await
            .is_ok()
    }
}

impl InHand {
    /// Entries in hand.
    pub fn count(&self) -> usize {
        self.0
            .lock()
            .map(|map| map.values().map(HashSet::len).sum())
            .unwrap_or(0)
    }

    /// Every entry still in hand, handed back to Redis (see [`LogStream::release`]). Returns
    /// how many.
    pub async fn release_all(&self, stream: &LogStream) -> usize {
        let mut released = 0;
        for (key, ids) in self.snapshot() {
            let n = ids.len();
            match stream.release(&key, ids).await {
                Ok(lost) => released += n - lost.len(),
                Err(e) => tracing::warn!(error = %format!("{e:#}"), stream = %key,
                    "could not hand ranking-log entries back; another reader takes them over once idle"),
            }
        }
        released
    }
}
