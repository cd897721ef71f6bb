//! The worker's control state in Redis, shared by every replica and the operator's commands:
//!
//! - **pause flags** (`pause` / `resume`): a HASH with a field per paused part — `drain`
//!   (deciding queue entries) and `persist` (writing the outbox to MySQL). Every replica reads it
//!   through [`Control::paused`], which asks Redis at most once per `max_age` whatever the number
//!   of lanes or polls asking, so the check stays cheap on the hot path; the flag's state is
//!   exported as the `paused` gauge and each change is logged once per replica.
//! - **job run records**: each scheduled job's last run and last successful run (who, when, how
//!   long, result), written by whichever replica ran it, so `status` shows them across replicas
//!   and restarts.
//! - **heartbeats**: one key per running replica with a TTL, refreshed while it runs.
//!
//! Every write here is a single idempotent command (HSET, HDEL, SET EX, DEL): sent twice after a
//! reconnect, it leaves the same state.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use fred::prelude::*;
use serde::{Deserialize, Serialize};

use crate::keys::KeyTemplates;
use crate::metrics::Metrics;

/// The parts an operator can pause (declared with the gauge that shows them).
pub use crate::metrics::PAUSABLE;

/// How long a heartbeat lives without being refreshed.
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(30);
/// How often a running replica refreshes its heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);

/// Which parts are paused right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Paused {
    pub drain: bool,
    pub persist: bool,
}

/// Who paused a part, and when (the value of a pause flag).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseRecord {
    pub since: DateTime<Utc>,
    pub by: String,
}

/// One run of a job, as recorded in Redis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRun {
    pub replica: String,
    pub started_at: DateTime<Utc>,
    pub duration_ms: u64,
    /// `ok`, `error`, or `paused` (a drain tick that found the drain paused).
    pub result: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl JobRun {
    pub fn finished_at(&self) -> DateTime<Utc> {
        self.started_at + chrono::Duration::milliseconds(self.duration_ms as i64)
    }
}

/// A replica's heartbeat record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub replica: String,
    pub version: String,
    pub started_at: DateTime<Utc>,
    pub seen_at: DateTime<Utc>,
}

/// This process's name among the replicas: the host name (the pod name on Kubernetes) and the
/// process id.
pub fn replica_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    format!("{host}:{}", std::process::id())
}

/// Sets (`Some(true)`), clears (`Some(false)`) or leaves (`None`) each pause flag.
pub async fn set_paused(
    client: &Client,
    keys: &KeyTemplates,
    drain: Option<bool>,
    persist: Option<bool>,
    by: &str,
) -> anyhow::Result<()> {
    let record = serde_json::to_string(&PauseRecord {
        since: Utc::now(),
        by: by.to_owned(),
    })?;
    for (field, wanted) in [("drain", drain), ("persist", persist)] {
        match wanted {
            // HSETNX: pausing what is already paused keeps the first pause's time and author.
            Some(true) => {
                let _: bool = client
                    .hsetnx(keys.pause_flags(), field, record.as_str())
                    .await?;
            }
            Some(false) => {
                let _: i64 = client.hdel(keys.pause_flags(), field).await?;
            }
            None => {}
        }
    }
    Ok(())
}

/// Every pause flag that is set, with its record (an unreadable value still counts as paused).
pub async fn pause_records(
    client: &Client,
    keys: &KeyTemplates,
) -> anyhow::Result<Vec<(String, Option<PauseRecord>)>> {
    let fields: std::collections::HashMap<String, String> =
        client.hgetall(keys.pause_flags()).await?;
    let mut out: Vec<(String, Option<PauseRecord>)> = fields
        .into_iter()
        .map(|(field, value)| (field, serde_json::from_str(&value).ok()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The last run and last successful run of `job`, if recorded.
pub async fn job_runs(
    client: &Client,
    keys: &KeyTemplates,
    job: &str,
) -> anyhow::Result<(Option<JobRun>, Option<JobRun>)> {
    let (last, ok): (Option<String>, Option<String>) = client
        .hmget(keys.job_runs(), vec![job.to_owned(), format!("{job}:ok")])
        .await?;
    let parse = |v: Option<String>| v.and_then(|v| serde_json::from_str(&v).ok());
    Ok((parse(last), parse(ok)))
}

/// The heartbeats of the replicas seen within [`HEARTBEAT_TTL`].
pub async fn live_replicas(client: &Client, keys: &KeyTemplates) -> anyhow::Result<Vec<Heartbeat>> {
    let names = crate::backends::scan_keys(client, &keys.replica_heartbeat_pattern()).await?;
    let mut out = Vec::new();
    for name in names {
        // Expired between the SCAN and the GET: not live any more.
        let value: Option<String> = client.get(&name).await?;
        if let Some(heartbeat) = value.and_then(|v| serde_json::from_str(&v).ok()) {
            out.push(heartbeat);
        }
    }
    out.sort_by(|a: &Heartbeat, b| a.replica.cmp(&b.replica));
    Ok(out)
}

/// Records one run of `job`: its duration and result (and, when `ok`, the time) in the metrics,
/// and with a `control` its run record in Redis, which `status` reads from any replica. What
/// every job does after each run.
pub async fn record_run(
    metrics: &Metrics,
    control: Option<&Control>,
    job: &'static str,
    started_at: DateTime<Utc>,
    elapsed: Duration,
    result: &'static str,
    error: Option<String>,
) {
    metrics.record_run(job, elapsed, result);
    if let Some(control) = control {
        control
            .record_run(job, started_at, elapsed, result, error)
            .await;
    }
}

/// One replica's view of the control state; cheap to clone.
#[derive(Clone)]
pub struct Control {
    client: Client,
    keys: KeyTemplates,
    metrics: Metrics,
    replica: Arc<str>,
    /// The flags as last read, and when: shared by every lane and poll of this replica.
    cache: Arc<tokio::sync::Mutex<Option<(Instant, Paused)>>>,
}

impl Control {
    pub fn new(client: Client, keys: &KeyTemplates, metrics: Metrics) -> Self {
        Self {
            client,
            keys: keys.clone(),
            metrics,
            replica: replica_id().into(),
            cache: Arc::default(),
        }
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// The pause flags, read from Redis unless read less than `max_age` ago. One caller at a time
    /// reads; the others wait for its answer. A change is logged and sets the `paused` gauge.
    pub async fn paused(&self, max_age: Duration) -> anyhow::Result<Paused> {
        let mut cache = self.cache.lock().await;
        if let Some((read_at, paused)) = *cache
            && read_at.elapsed() < max_age
        {
            return Ok(paused);
        }
        let (drain, persist): (Option<String>, Option<String>) = self
            .client
            .hmget(self.keys.pause_flags(), vec!["drain", "persist"])
            .await?;
        let paused = Paused {
            drain: drain.is_some(),
            persist: persist.is_some(),
        };
        let before = cache.map(|(_, p)| p).unwrap_or_default();
        for (part, was, is) in [
            ("drain", before.drain, paused.drain),
            ("persist", before.persist, paused.persist),
        ] {
            self.metrics.set_paused(part, is);
            if was != is {
                if is {
                    tracing::warn!(
                        part,
                        "paused by an operator (`commerce-worker resume --{part}` resumes)"
                    );
                } else {
                    tracing::info!(part, "resumed");
                }
            }
        }
        *cache = Some((Instant::now(), paused));
        Ok(paused)
    }

    /// Records one run of `job`; a failure to record is logged, never the job's failure.
    pub async fn record_run(
        &self,
        job: &str,
        started_at: DateTime<Utc>,
        elapsed: Duration,
        result: &str,
        error: Option<String>,
    ) {
        let run = JobRun {
            replica: self.replica.to_string(),
            started_at,
            duration_ms: elapsed.as_millis() as u64,
            result: result.to_owned(),
            // Error chains name keys and hosts, never credentials; keep the record small.
            error: error.map(|e| e.chars().take(500).collect()),
        };
        let Ok(record) = serde_json::to_string(&run) else {
            return;
        };
        let mut fields = vec![(job.to_owned(), record.clone())];
        if result == "ok" {
            fields.push((format!("{job}:ok"), record));
        }
        if let Err(e) = self
            .client
            .hset::<i64, _, _>(self.keys.job_runs(), fields)
            .await
        {
            tracing::warn!(job, error = %format!("{e:#}"), "could not record the job run in Redis");
        }
    }

    /// Writes this replica's heartbeat, live for [`HEARTBEAT_TTL`].
    pub async fn heartbeat(&self, started_at: DateTime<Utc>) -> anyhow::Result<()> {
        let record = serde_json::to_string(&Heartbeat {
            replica: self.replica.to_string(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at,
            seen_at: Utc::now(),
        })?;
        let _: () = self
            .client
            .set(
                self.keys.replica_heartbeat(&self.replica),
                record,
                Some(fred::types::Expiration::EX(HEARTBEAT_TTL.as_secs() as i64)),
                None,
                false,
            )
            .await?;
        Ok(())
    }

    /// Removes this replica's heartbeat (at shutdown).
    pub async fn forget_heartbeat(&self) {
        let _: Result<i64, _> = self
            .client
            .del(self.keys.replica_heartbeat(&self.replica))
            .await;
    }
}
