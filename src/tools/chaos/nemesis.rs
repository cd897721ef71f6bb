//! The nemesis: a seeded PRNG choosing, at random times, a fault from the menu and a target,
//! injecting it, and healing it later. Faults overlap (a replica can be SIGKILLed while it is
//! SIGSTOPped, MariaDB can die while Redis is down): combinations are the point.
//!
//! Every choice comes from the run's seed, so a seed replays the same sequence of faults at the
//! same offsets (the system's own timing still varies from run to run). Each injection and heal
//! goes into the timeline printed when a check fails.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use tokio::sync::{Mutex, OwnedMutexGuard};

use fred::prelude::*;

use super::servers::{
    PrivateMariadb, PrivateRedis, PrivateSentinel, SENTINEL_SERVICE, describe_exit,
};
use super::workers::{State, Worker};
use super::workload::RedisHandle;
use crate::tools::fault_proxy::FaultProxy;

/// Every fault the nemesis knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum Kind {
    WorkerKill,
    WorkerReplace,
    WorkerStop,
    RedisKill,
    RedisRollback,
    MysqlKill,
    RedisLostReply,
    MysqlLostReply,
    RedisFreeze,
    MysqlFreeze,
    RedisReset,
    MysqlReset,
    RequeueDead,
    Pause,
    Failover,
}

impl Kind {
    pub(super) const ALL: [Kind; 15] = [
        Kind::WorkerKill,
        Kind::WorkerReplace,
        Kind::WorkerStop,
        Kind::RedisKill,
        Kind::RedisRollback,
        Kind::MysqlKill,
        Kind::RedisLostReply,
        Kind::MysqlLostReply,
        Kind::RedisFreeze,
        Kind::MysqlFreeze,
        Kind::RedisReset,
        Kind::MysqlReset,
        Kind::RequeueDead,
        Kind::Pause,
        Kind::Failover,
    ];

    pub(super) fn name(self) -> &'static str {
        match self {
            Kind::WorkerKill => "worker-kill",
            Kind::WorkerReplace => "worker-replace",
            Kind::WorkerStop => "worker-stop",
            Kind::RedisKill => "redis-kill",
            Kind::RedisRollback => "redis-rollback",
            Kind::MysqlKill => "mysql-kill",
            Kind::RedisLostReply => "redis-lost-reply",
            Kind::MysqlLostReply => "mysql-lost-reply",
            Kind::RedisFreeze => "redis-freeze",
            Kind::MysqlFreeze => "mysql-freeze",
            Kind::RedisReset => "redis-reset",
            Kind::MysqlReset => "mysql-reset",
            Kind::RequeueDead => "requeue-dead",
            Kind::Pause => "pause",
            Kind::Failover => "failover",
        }
    }

    pub(super) fn describe(self) -> &'static str {
        match self {
            Kind::WorkerKill => {
                "SIGKILL a replica; restart it 0-2 s later on the same machine (systemd's Restart=)"
            }
            Kind::WorkerReplace => {
                "SIGKILL a replica; start a replacement 0-2 s later with nothing of the old one (a rescheduled pod)"
            }
            Kind::WorkerStop => {
                "SIGSTOP a replica for 1-6 s, then SIGCONT (a long GC pause, a frozen VM)"
            }
            Kind::RedisKill => "SIGKILL Redis; restart it 0-2 s later from its append-only file",
            Kind::RedisRollback => {
                "Redis loses its last 0.2-1.5 s of writes: SIGKILL, restart from an AOF copied that long before (a power loss under appendfsync everysec)"
            }
            Kind::MysqlKill => "SIGKILL MariaDB; restart it 0-3 s later (crash recovery)",
            Kind::RedisLostReply => {
                "the proxy in front of Redis forwards the next command matching a pattern, swallows its reply and closes the connection"
            }
            Kind::MysqlLostReply => "the same in front of MariaDB (COMMIT or an INSERT)",
            Kind::RedisFreeze => {
                "every open connection to Redis hangs for 1-10 s (no bytes, no close); new ones pass"
            }
            Kind::MysqlFreeze => "the same for MariaDB",
            Kind::RedisReset => "every open connection to Redis is reset",
            Kind::MysqlReset => "every open connection to MariaDB is reset",
            Kind::RequeueDead => {
                "an operator runs `commerce-worker requeue-dead` (dead letters back into the queue)"
            }
            Kind::Pause => {
                "an operator runs `commerce-worker pause` (--drain, --persist or both), then `resume` 1-5 s later"
            }
            Kind::Failover => {
                "`SENTINEL FAILOVER`: the replica becomes the primary, the old primary its replica (writes it took meanwhile lost); the replicas follow through Sentinel (--sentinel only)"
            }
        }
    }

    pub(super) fn parse(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// Patterns whose replies the Redis proxy loses: the decide and swap scripts, the outbox's
/// removal after a persist, the rebuild's marker and lock.
const REDIS_PATTERNS: [&str; 4] = ["EVALSHA", "ZREM", "SET", "ZUNIONSTORE"];
/// MySQL: a transaction's COMMIT (the ranking log's batches), the inserts' statements.
const MYSQL_PATTERNS: [&str; 3] = [
    "COMMIT",
    "INSERT INTO user_coupon",
    "INSERT INTO ranking_logs",
];

/// How long the nemesis waits (under the API lock) for Redis to write its AOF buffer before a
/// kill or a rollback's copy; Redis postpones it for at most 2 s while an fsync is slow.
const AOF_WRITTEN_LIMIT: Duration = Duration::from_secs(10);

/// A replica exiting 69 (a server unreachable at start) this soon after starting is refusing to
/// start, as the contract says it must; later, it would be a daemon giving up.
const START_PHASE: Duration = Duration::from_secs(20);

/// How long after a server came back a replica that tried to reach it may still have seen it
/// down (its connection attempt began before the restart finished; fred and sqlx give up
/// after 5 s).
const OUTAGE_GRACE: Duration = Duration::from_secs(6);

/// A time a server was unavailable because the nemesis made it so (killed, rolled back, being
/// failed over): the only reason a replica may refuse to start (exit 69).
#[derive(Clone, Debug)]
pub(super) struct Outage {
    pub what: &'static str,
    pub from: Instant,
    /// `None` while it lasts.
    pub to: Option<Instant>,
}

/// Why a replica's exit 69 at start is forgiven: the outages overlapping its start, or `None`
/// if no server was down then (the exit is then a defect: the worker refused to start with
/// every server up).
pub(super) fn outage_during(
    outages: &[Outage],
    origin: Instant,
    start: Instant,
    exit: Instant,
) -> Option<String> {
    let overlapping: Vec<String> = outages
        .iter()
        .filter(|o| o.from <= exit && o.to.is_none_or(|to| to + OUTAGE_GRACE >= start))
        .map(|o| {
            format!(
                "{} down {:.3}s .. {}",
                o.what,
                o.from.saturating_duration_since(origin).as_secs_f64(),
                o.to.map_or("still down".to_string(), |to| format!(
                    "{:.3}s",
                    to.saturating_duration_since(origin).as_secs_f64()
                ))
            )
        })
        .collect();
    (!overlapping.is_empty()).then(|| overlapping.join(", "))
}

/// One line of the timeline.
#[derive(Clone, Debug)]
pub(super) struct Event {
    pub at: Duration,
    pub text: String,
}

/// Something the run owns that a fault may target.
pub(super) struct Cluster {
    pub redis: PrivateRedis,
    pub mysql: PrivateMariadb,
    pub redis_proxy: FaultProxy,
    pub mysql_proxy: FaultProxy,
    pub workers: Vec<Worker>,
    /// Runs the CLI (`requeue-dead`, `rebuild-ranking`) against the servers directly.
    pub cli: super::Cli,
    /// With `--sentinel`: the replica, its proxy and the Sentinel. `redis` and `redis_proxy`
    /// are always the primary's (a failover swaps them with these).
    pub replication: Option<Replication>,
    /// The run's own client to the primary (the API's and the checks').
    pub api_redis: RedisHandle,
}

/// The other half of a `--sentinel` run.
pub(super) struct Replication {
    pub replica: PrivateRedis,
    pub replica_proxy: FaultProxy,
    pub sentinel: PrivateSentinel,
    /// The operator's config file: rewritten after a failover to name the new primary.
    pub operator_config: std::path::PathBuf,
    pub mysql_url: String,
    /// Failovers that completed.
    pub failovers: u64,
}

impl Cluster {
    /// Points the run's own clients (the API's, the checks', the operator's config) at the
    /// primary `self.redis` is now.
    async fn follow_primary(&mut self) -> anyhow::Result<()> {
        let Some(replication) = &self.replication else {
            return Ok(());
        };
        let direct = super::workers::Endpoints {
            redis_url: self.redis.url(),
            mysql_url: replication.mysql_url.clone(),
        };
        let text = super::workers::config_text(&direct, 0);
        std::fs::write(&replication.operator_config, &text)?;
        let config =
            crate::config::Config::from_toml_str(&text, &replication.operator_config, |_| None)?;
        let client = crate::backends::connect_redis(&config.redis).await?;
        let old = self.api_redis.replace(client);
        let _ = old.quit().await;
        Ok(())
    }
}

/// A fault waiting to be healed.
enum Heal {
    RestartWorker(usize),
    ContWorker(usize),
    /// Rollback, second step: kill Redis now (the writes since the snapshot are in flight).
    KillForRollback(OwnedMutexGuard<()>),
    RestartRedis {
        from_snapshot: bool,
        _api: OwnedMutexGuard<()>,
    },
    RestartMysql,
    ThawRedis,
    ThawMysql,
    /// `resume` with these flags; attempts so far.
    Resume(&'static [&'static str], u32),
    /// After a failover (at this instant): the old primary must replicate from the new one.
    Demoted(Instant),
    /// A failover, first step (polled, under the API lock): waiting since `since` until the
    /// replica holds the primary's writes up to `offset`, then `SENTINEL FAILOVER`.
    FailoverSync {
        api: OwnedMutexGuard<()>,
        offset: u64,
        since: Instant,
    },
    /// A failover, second step (polled, under the API lock): waiting since `since` until
    /// Sentinel names the replica and it is a primary.
    FailoverPromotion {
        api: OwnedMutexGuard<()>,
        since: Instant,
    },
}

/// How often a failover's steps look at the servers.
const FAILOVER_POLL: Duration = Duration::from_millis(50);

pub(super) struct Nemesis {
    rng: fastrand::Rng,
    menu: Vec<Kind>,
    started: Instant,
    /// The API's lock: held while Redis is down or being rolled back.
    api_lock: Arc<Mutex<()>>,
    pending: Vec<(Instant, Heal)>,
    pub timeline: Vec<Event>,
    /// Faults injected, by kind.
    pub injected: std::collections::BTreeMap<&'static str, u64>,
    /// Processes that ended on their own, or CLI commands that failed: (when, what).
    pub unexpected: Vec<String>,
    /// Replicas that exited 69 at start while a server was down (the outage named), and were
    /// started again.
    pub refused_starts: Vec<String>,
    /// When each server was down because of a fault.
    pub outages: Vec<Outage>,
}

impl Nemesis {
    pub(super) fn new(
        seed: u64,
        menu: Vec<Kind>,
        started: Instant,
        api_lock: Arc<Mutex<()>>,
    ) -> Self {
        Self {
            rng: fastrand::Rng::with_seed(seed),
            menu,
            started,
            api_lock,
            pending: Vec::new(),
            timeline: Vec::new(),
            injected: Default::default(),
            unexpected: Vec::new(),
            refused_starts: Vec::new(),
            outages: Vec::new(),
        }
    }

    pub(super) fn note(&mut self, text: impl Into<String>) {
        let text = text.into();
        let at = self.started.elapsed();
        println!("  {:>8.3}s  {text}", at.as_secs_f64());
        self.timeline.push(Event { at, text });
    }

    /// Runs until `until`: injects a fault every 0.3-2.5 s, heals each when due, and notices
    /// processes that end without being killed (restarting them, so the run goes on).
    pub(super) async fn run(
        &mut self,
        cluster: &mut Cluster,
        until: Instant,
    ) -> anyhow::Result<()> {
        let mut next = Instant::now() + self.gap();
        while Instant::now() < until {
            self.watch(cluster).await?;
            self.heal_due(cluster, false).await?;
            if Instant::now() >= next && !self.menu.is_empty() {
                let kind = self.menu[self.rng.usize(0..self.menu.len())];
                self.inject(cluster, kind).await?;
                next = Instant::now() + self.gap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Heals everything still injected, in the order it was due.
    pub(super) async fn heal_all(&mut self, cluster: &mut Cluster) -> anyhow::Result<()> {
        while !self.pending.is_empty() {
            self.heal_due(cluster, true).await?;
        }
        for worker in &mut cluster.workers {
            if worker.state == State::Down {
                worker.start()?;
            }
        }
        self.watch(cluster).await
    }

    /// `what` is down from now on.
    fn outage_begins(&mut self, what: &'static str) {
        self.outages.push(Outage {
            what,
            from: Instant::now(),
            to: None,
        });
    }

    /// `what` is back.
    fn outage_ends(&mut self, what: &'static str) {
        let now = Instant::now();
        for outage in self.outages.iter_mut().filter(|o| o.what == what) {
            outage.to.get_or_insert(now);
        }
    }

    fn gap(&mut self) -> Duration {
        Duration::from_millis(self.rng.u64(300..2500))
    }

    fn millis(&mut self, range: std::ops::Range<u64>) -> Duration {
        Duration::from_millis(self.rng.u64(range))
    }

    /// Notices processes that ended on their own.
    pub(super) async fn watch(&mut self, cluster: &mut Cluster) -> anyhow::Result<()> {
        for i in 0..cluster.workers.len() {
            if let Some(status) = cluster.workers[i].exited() {
                // docs/contract.md §5: a service that cannot be reached at start exits 69. A replica
                // restarted while Redis or MariaDB is down does that; like systemd
                // (Restart=on-failure) the run starts it again a second later. Exiting once it
                // was running is the defect this watch is for.
                // Forgiven only if the nemesis had made a server unavailable during the start.
                let uptime = cluster.workers[i].uptime();
                let now = Instant::now();
                let why = (status.code() == Some(69) && uptime < START_PHASE)
                    .then(|| outage_during(&self.outages, self.started, now - uptime, now))
                    .flatten();
                if let Some(why) = why {
                    let text = format!(
                        "worker {} refused to start at {:.3}s, {} ms after its start (exit 69) while {why}",
                        cluster.workers[i].id,
                        now.saturating_duration_since(self.started).as_secs_f64(),
                        uptime.as_millis()
                    );
                    self.note(format!("{text}; restarting it in 1 s"));
                    self.refused_starts.push(text);
                    self.pending.push((
                        Instant::now() + Duration::from_secs(1),
                        Heal::RestartWorker(i),
                    ));
                    continue;
                }
                if cluster.workers[i].failed_to_listen(status, uptime < START_PHASE) {
                    // Its HTTP port was taken between choosing it and the worker's bind.
                    cluster.workers[i].new_http_port()?;
                    self.note(format!(
                        "worker {} could not listen on its HTTP port (taken meanwhile); restarting it on :{}",
                        cluster.workers[i].id, cluster.workers[i].http_port
                    ));
                    cluster.workers[i].start()?;
                    continue;
                }
                let text = format!(
                    "worker {} ended on its own ({}); see {}",
                    cluster.workers[i].id,
                    describe_exit(status),
                    cluster.workers[i].log_path().display()
                );
                self.unexpected.push(text.clone());
                self.note(format!("UNEXPECTED: {text}; restarting it"));
                // A pending restart or SIGCONT for it no longer applies.
                self.pending.retain(|(_, heal)| {
                    !matches!(heal, Heal::RestartWorker(w) | Heal::ContWorker(w) if *w == i)
                });
                cluster.workers[i].start()?;
            }
        }
        if let Some(status) = cluster.redis.exited() {
            let text = format!("redis-server ended on its own ({})", describe_exit(status));
            self.unexpected.push(text.clone());
            self.note(format!("UNEXPECTED: {text}; restarting it"));
            self.outage_begins("Redis");
            cluster.redis.restart().await?;
            self.outage_ends("Redis");
        }
        if let Some(replication) = &mut cluster.replication {
            if let Some(status) = replication.replica.exited() {
                let text = format!(
                    "the Redis replica ended on its own ({})",
                    describe_exit(status)
                );
                self.unexpected.push(text.clone());
                self.note(format!("UNEXPECTED: {text}; restarting it"));
                replication.replica.restart().await?;
            }
            if let Some(status) = replication.sentinel.exited() {
                let text = format!("the Sentinel ended on its own ({})", describe_exit(status));
                self.unexpected.push(text.clone());
                self.note(format!("UNEXPECTED: {text}"));
                bail!("{text}");
            }
        }
        if let Some(status) = cluster.mysql.exited() {
            let text = format!("mariadbd ended on its own ({})", describe_exit(status));
            self.unexpected.push(text.clone());
            self.note(format!("UNEXPECTED: {text}; restarting it"));
            self.outage_begins("MariaDB");
            cluster.mysql.restart().await?;
            self.outage_ends("MariaDB");
        }
        Ok(())
    }

    async fn heal_due(&mut self, cluster: &mut Cluster, all: bool) -> anyhow::Result<()> {
        loop {
            let now = Instant::now();
            let due = self
                .pending
                .iter()
                .enumerate()
                .filter(|(_, (at, _))| all || *at <= now)
                .min_by_key(|(_, (at, _))| *at)
                .map(|(i, _)| i);
            let Some(i) = due else {
                return Ok(());
            };
            let (at, heal) = self.pending.remove(i);
            // Healing everything at once still lets a failover's polled step wait its turn,
            // instead of asking the servers in a tight loop.
            if all
                && matches!(
                    heal,
                    Heal::FailoverSync { .. } | Heal::FailoverPromotion { .. }
                )
            {
                tokio::time::sleep_until(at.into()).await;
            }
            self.heal(cluster, heal).await?;
            if all {
                return Ok(());
            }
        }
    }

    async fn heal(&mut self, cluster: &mut Cluster, heal: Heal) -> anyhow::Result<()> {
        match heal {
            Heal::RestartWorker(i) => {
                // Never two processes for one replica.
                if cluster.workers[i].state == State::Down {
                    cluster.workers[i].start()?;
                    self.note(format!("heal: worker {} restarted", cluster.workers[i].id));
                }
            }
            Heal::ContWorker(i) => {
                cluster.workers[i].resume()?;
                self.note(format!("heal: worker {} SIGCONT", cluster.workers[i].id));
            }
            Heal::KillForRollback(api) => {
                cluster.redis.kill();
                self.outage_begins("Redis");
                self.note("redis-rollback: Redis SIGKILLed");
                let down = self.millis(0..2000);
                self.pending.push((
                    Instant::now() + down,
                    Heal::RestartRedis {
                        from_snapshot: true,
                        _api: api,
                    },
                ));
            }
            Heal::RestartRedis {
                from_snapshot,
                _api,
            } => {
                if from_snapshot {
                    cluster.redis.restart_from_snapshot().await?;
                    self.note(
                        "heal: Redis restarted from the older AOF (writes after the snapshot lost)",
                    );
                } else {
                    cluster.redis.restart().await?;
                    self.note("heal: Redis restarted from its AOF");
                }
                self.outage_ends("Redis");
            }
            Heal::RestartMysql => {
                cluster.mysql.restart().await?;
                self.outage_ends("MariaDB");
                self.note("heal: MariaDB restarted");
            }
            Heal::ThawRedis => {
                cluster.redis_proxy.thaw();
                self.note("heal: Redis connections thawed");
            }
            Heal::ThawMysql => {
                cluster.mysql_proxy.thaw();
                self.note("heal: MariaDB connections thawed");
            }
            Heal::Demoted(since) => self.check_demoted(cluster, since).await?,
            Heal::FailoverSync { api, offset, since } => {
                self.failover_sync(cluster, api, offset, since).await?
            }
            Heal::FailoverPromotion { api, since } => {
                self.failover_promotion(cluster, api, since).await?
            }
            Heal::Resume(flags, attempts) => {
                let args: Vec<&str> = std::iter::once("resume")
                    .chain(flags.iter().copied())
                    .collect();
                match cluster.cli.run(&args).await {
                    Ok(out) => self.note(format!("heal: `{}`: {out}", args.join(" "))),
                    // Redis may be down right now (another fault): an operator tries again.
                    Err(e) if attempts < 10 => {
                        self.note(format!("`{}` failed, again in 1 s: {e:#}", args.join(" ")));
                        self.pending.push((
                            Instant::now() + Duration::from_secs(1),
                            Heal::Resume(flags, attempts + 1),
                        ));
                    }
                    Err(e) => {
                        let text = format!("`{}` kept failing: {e:#}", args.join(" "));
                        self.unexpected.push(text.clone());
                        self.note(format!("UNEXPECTED: {text}"));
                    }
                }
            }
        }
        Ok(())
    }

    fn redis_busy(&self) -> bool {
        self.pending.iter().any(|(_, h)| {
            matches!(
                h,
                Heal::KillForRollback(_)
                    | Heal::RestartRedis { .. }
                    | Heal::Demoted(_)
                    | Heal::FailoverSync { .. }
                    | Heal::FailoverPromotion { .. }
            )
        })
    }

    /// Whether a failover is under way (asked for, the old primary not demoted yet counts too).
    fn failing_over(&self) -> bool {
        self.pending.iter().any(|(_, h)| {
            matches!(
                h,
                Heal::FailoverSync { .. } | Heal::FailoverPromotion { .. }
            )
        })
    }

    async fn inject(&mut self, cluster: &mut Cluster, kind: Kind) -> anyhow::Result<()> {
        let target = self.rng.usize(0..cluster.workers.len());
        let done = match kind {
            Kind::WorkerKill | Kind::WorkerReplace => {
                let worker = &mut cluster.workers[target];
                if worker.state == State::Down {
                    false
                } else {
                    let was = worker.state;
                    worker.kill();
                    if kind == Kind::WorkerReplace {
                        worker.lose_disk();
                    }
                    self.pending
                        .retain(|(_, heal)| !matches!(heal, Heal::ContWorker(w) if *w == target));
                    let down = self.millis(0..2000);
                    self.pending
                        .push((Instant::now() + down, Heal::RestartWorker(target)));
                    self.note(format!(
                        "{}: worker {} SIGKILLed{}{}, back in {} ms",
                        kind.name(),
                        target + 1,
                        if was == State::Stopped {
                            " while SIGSTOPped"
                        } else {
                            ""
                        },
                        if kind == Kind::WorkerReplace {
                            ", its disk lost"
                        } else {
                            ""
                        },
                        down.as_millis()
                    ));
                    true
                }
            }
            Kind::WorkerStop => {
                let worker = &mut cluster.workers[target];
                if worker.state != State::Running {
                    false
                } else {
                    worker.stop()?;
                    let pause = self.millis(1000..6000);
                    self.pending
                        .push((Instant::now() + pause, Heal::ContWorker(target)));
                    self.note(format!(
                        "worker-stop: worker {} SIGSTOPped for {} ms",
                        target + 1,
                        pause.as_millis()
                    ));
                    true
                }
            }
            Kind::RedisKill => {
                if self.redis_busy() {
                    false
                } else {
                    let api = Arc::clone(&self.api_lock).lock_owned().await;
                    if !cluster.redis.wait_aof_written(AOF_WRITTEN_LIMIT).await {
                        self.note(format!(
                            "redis-kill: the AOF buffer was not written within {AOF_WRITTEN_LIMIT:?}"
                        ));
                        return self.skipped(kind);
                    }
                    cluster.redis.kill();
                    self.outage_begins("Redis");
                    let down = self.millis(0..2000);
                    self.pending.push((
                        Instant::now() + down,
                        Heal::RestartRedis {
                            from_snapshot: false,
                            _api: api,
                        },
                    ));
                    self.note(format!(
                        "redis-kill: Redis SIGKILLed, back in {} ms",
                        down.as_millis()
                    ));
                    true
                }
            }
            Kind::RedisRollback => {
                if self.redis_busy() {
                    false
                } else {
                    let api = Arc::clone(&self.api_lock).lock_owned().await;
                    if !cluster.redis.wait_aof_written(AOF_WRITTEN_LIMIT).await {
                        self.note(format!(
                            "redis-rollback: the AOF buffer was not written within {AOF_WRITTEN_LIMIT:?}"
                        ));
                        return self.skipped(kind);
                    }
                    cluster.redis.snapshot()?;
                    let lost = self.millis(200..1500);
                    self.pending
                        .push((Instant::now() + lost, Heal::KillForRollback(api)));
                    self.note(format!(
                        "redis-rollback: AOF copied; the workers' next {} ms of writes will be lost",
                        lost.as_millis()
                    ));
                    true
                }
            }
            Kind::MysqlKill => {
                if cluster.mysql.is_down() {
                    false
                } else {
                    cluster.mysql.kill();
                    self.outage_begins("MariaDB");
                    let down = self.millis(0..3000);
                    self.pending
                        .push((Instant::now() + down, Heal::RestartMysql));
                    self.note(format!(
                        "mysql-kill: MariaDB SIGKILLed, back in {} ms",
                        down.as_millis()
                    ));
                    true
                }
            }
            Kind::RedisLostReply => {
                let pattern = REDIS_PATTERNS[self.rng.usize(0..REDIS_PATTERNS.len())];
                cluster.redis_proxy.drop_reply_when(pattern);
                self.note(format!(
                    "redis-lost-reply: the next Redis command containing {pattern:?} loses its reply"
                ));
                true
            }
            Kind::MysqlLostReply => {
                let pattern = MYSQL_PATTERNS[self.rng.usize(0..MYSQL_PATTERNS.len())];
                cluster.mysql_proxy.drop_reply_when(pattern);
                self.note(format!(
                    "mysql-lost-reply: the next MariaDB command containing {pattern:?} loses its reply"
                ));
                true
            }
            Kind::RedisFreeze | Kind::MysqlFreeze => {
                let redis = kind == Kind::RedisFreeze;
                let pending_thaw = self.pending.iter().any(|(_, h)| {
                    matches!(
                        (h, redis),
                        (Heal::ThawRedis, true) | (Heal::ThawMysql, false)
                    )
                });
                // A frozen Sentinel link during a failover would hold the promotion up for as
                // long as the freeze: not while one is under way.
                if pending_thaw || (redis && self.failing_over()) {
                    false
                } else {
                    let (proxy, heal) = if redis {
                        (&cluster.redis_proxy, Heal::ThawRedis)
                    } else {
                        (&cluster.mysql_proxy, Heal::ThawMysql)
                    };
                    let frozen = proxy.freeze_existing();
                    let hold = self.millis(1000..10_000);
                    self.pending.push((Instant::now() + hold, heal));
                    self.note(format!(
                        "{}: {frozen} open connections hang for {} ms",
                        kind.name(),
                        hold.as_millis()
                    ));
                    true
                }
            }
            Kind::RedisReset => {
                cluster.redis_proxy.kill_all();
                self.note("redis-reset: every open Redis connection reset");
                true
            }
            Kind::MysqlReset => {
                cluster.mysql_proxy.kill_all();
                self.note("mysql-reset: every open MariaDB connection reset");
                true
            }
            Kind::RequeueDead => {
                if self.redis_busy() {
                    false
                } else {
                    // The operator's command, straight to Redis.
                    match cluster.cli.run(&["requeue-dead"]).await {
                        Ok(out) => self.note(format!("requeue-dead: {out}")),
                        Err(e) => {
                            let text = format!("requeue-dead failed: {e:#}");
                            self.unexpected.push(text.clone());
                            self.note(format!("UNEXPECTED: {text}"));
                        }
                    }
                    true
                }
            }
            Kind::Failover => {
                if self.redis_busy() || cluster.redis.is_down() || cluster.replication.is_none() {
                    false
                } else {
                    // Counted once `SENTINEL FAILOVER` is asked (or noted as skipped then).
                    return self.fail_over(cluster).await;
                }
            }
            Kind::Pause => {
                const CHOICES: [&[&str]; 3] =
                    [&["--drain"], &["--persist"], &["--drain", "--persist"]];
                let pending_resume = self
                    .pending
                    .iter()
                    .any(|(_, h)| matches!(h, Heal::Resume(..)));
                if self.redis_busy() || pending_resume {
                    false
                } else {
                    let flags = CHOICES[self.rng.usize(0..CHOICES.len())];
                    let hold = self.millis(1000..5000);
                    let args: Vec<&str> = std::iter::once("pause")
                        .chain(flags.iter().copied())
                        .collect();
                    match cluster.cli.run(&args).await {
                        Ok(out) => {
                            self.note(format!(
                                "pause: `{}` for {} ms: {out}",
                                args.join(" "),
                                hold.as_millis()
                            ));
                        }
                        Err(e) => {
                            let text = format!("`{}` failed: {e:#}", args.join(" "));
                            self.unexpected.push(text.clone());
                            self.note(format!("UNEXPECTED: {text}"));
                        }
                    }
                    // Resumed even if `pause` seemed to fail: its reply may be what was lost.
                    self.pending
                        .push((Instant::now() + hold, Heal::Resume(flags, 0)));
                    true
                }
            }
        };
        if done {
            *self.injected.entry(kind.name()).or_default() += 1;
            Ok(())
        } else {
            self.skipped(kind)
        }
    }

    fn skipped(&mut self, kind: Kind) -> anyhow::Result<()> {
        self.note(format!(
            "{}: target not in a state for it, skipped",
            kind.name()
        ));
        Ok(())
    }
}

impl Nemesis {
    /// `SENTINEL FAILOVER`, under the API lock: waits until the replica has every write the
    /// API was acknowledged (the API is not under test; the workers' later writes to the old
    /// primary are what a failover loses), asks Sentinel to fail over, waits until Sentinel
    /// names the replica and it is a primary, then until the old primary replicates from it.
    /// Each wait is a step polled with the other heals ([`Heal::FailoverSync`],
    /// [`Heal::FailoverPromotion`], [`Heal::Demoted`]), so the nemesis goes on healing (a
    /// worker to SIGCONT, MariaDB to restart, connections to thaw) while Redis fails over. The
    /// replica not in sync within 5 s: skipped.
    async fn fail_over(&mut self, cluster: &mut Cluster) -> anyhow::Result<()> {
        let api = Arc::clone(&self.api_lock).lock_owned().await;
        let primary_offset = cluster
            .redis
            .command("INFO replication")
            .await
            .and_then(|i| info_number(&i, "master_repl_offset:"));
        let Some(offset) = primary_offset else {
            self.note("failover: the primary did not say its replication offset; skipped");
            return self.skipped(Kind::Failover);
        };
        self.pending.push((
            Instant::now(),
            Heal::FailoverSync {
                api,
                offset,
                since: Instant::now(),
            },
        ));
        Ok(())
    }

    /// [`Heal::FailoverSync`]: the replica in sync, then `SENTINEL FAILOVER`.
    async fn failover_sync(
        &mut self,
        cluster: &mut Cluster,
        api: OwnedMutexGuard<()>,
        offset: u64,
        since: Instant,
    ) -> anyhow::Result<()> {
        let Some(replication) = cluster.replication.as_mut() else {
            return Ok(());
        };
        let info = replication
            .replica
            .command("INFO replication")
            .await
            .unwrap_or_default();
        let in_sync = info.contains("master_link_status:up")
            && info_number(&info, "slave_repl_offset:").is_some_and(|o| o >= offset);
        if !in_sync {
            // Not long: a frozen replication link may be what holds it back.
            if since.elapsed() > Duration::from_secs(5) {
                self.note(format!(
                    "failover: the replica was not in sync up to offset {offset} within 5 s"
                ));
                return self.skipped(Kind::Failover);
            }
            self.pending.push((
                Instant::now() + FAILOVER_POLL,
                Heal::FailoverSync { api, offset, since },
            ));
            return Ok(());
        }
        let old_port = cluster.redis_proxy.addr().port();
        let new_port = replication.replica_proxy.addr().port();
        let reply = replication
            .sentinel
            .command(&format!("SENTINEL FAILOVER {SENTINEL_SERVICE}"))
            .await;
        if !reply.as_deref().is_some_and(|r| r.starts_with("+OK")) {
            self.note(format!(
                "failover: `SENTINEL FAILOVER` answered {reply:?}; skipped"
            ));
            return self.skipped(Kind::Failover);
        }
        *self.injected.entry(Kind::Failover.name()).or_default() += 1;
        self.outage_begins("Redis (failover)");
        self.note(format!(
            "failover: `SENTINEL FAILOVER` asked (primary behind :{old_port}, replica behind :{new_port})"
        ));
        self.pending.push((
            Instant::now(),
            Heal::FailoverPromotion {
                api,
                since: Instant::now(),
            },
        ));
        Ok(())
    }

    /// [`Heal::FailoverPromotion`]: once Sentinel names the replica and it is a primary, the
    /// roles swap, the API follows it (the API lock is released) and the old primary's demotion
    /// is awaited.
    async fn failover_promotion(
        &mut self,
        cluster: &mut Cluster,
        api: OwnedMutexGuard<()>,
        since: Instant,
    ) -> anyhow::Result<()> {
        let Some(replication) = cluster.replication.as_mut() else {
            return Ok(());
        };
        let new_port = replication.replica_proxy.addr().port();
        let named = replication.sentinel.primary_port().await;
        let promoted = replication
            .replica
            .command("INFO replication")
            .await
            .is_some_and(|i| i.contains("role:master"));
        if named != Some(new_port) || !promoted {
            if since.elapsed() > Duration::from_secs(60) {
                bail!(
                    "failover: Sentinel did not promote the replica within 60 s (it names :{named:?}); see {}",
                    "the run directory's sentinel/sentinel.log"
                );
            }
            self.pending.push((
                Instant::now() + FAILOVER_POLL,
                Heal::FailoverPromotion { api, since },
            ));
            return Ok(());
        }
        let promoted_after = since.elapsed();
        // The roles swap: `redis` and `redis_proxy` are the primary's from now on.
        std::mem::swap(&mut cluster.redis, &mut replication.replica);
        std::mem::swap(&mut cluster.redis_proxy, &mut replication.replica_proxy);
        cluster.redis.replica_of = None;
        replication.replica.replica_of = Some(new_port);
        replication.failovers += 1;
        cluster.follow_primary().await?;
        self.outage_ends("Redis (failover)");
        // The API writes to the new primary from now on.
        drop(api);
        self.note(format!(
            "failover: the replica is the primary after {} ms; the API follows it",
            promoted_after.as_millis()
        ));
        // Sentinel turns the old primary into a replica of the new one (and disconnects its
        // clients) once it has claimed to be a primary for a while; until then the replicas
        // still connected to it write there, and lose it.
        self.pending.push((
            Instant::now() + DEMOTION_LIMIT,
            Heal::Demoted(Instant::now()),
        ));
        Ok(())
    }

    /// Whether the old primary replicates from the new one; if Sentinel has not made it so
    /// by now, the nemesis does, as Sentinel would.
    async fn check_demoted(&mut self, cluster: &mut Cluster, since: Instant) -> anyhow::Result<()> {
        let Some(replication) = cluster.replication.as_mut() else {
            return Ok(());
        };
        let new_port = cluster.redis_proxy.addr().port();
        let info = replication
            .replica
            .command("INFO replication")
            .await
            .unwrap_or_default();
        if info.contains("role:slave") && info.contains(&format!("master_port:{new_port}")) {
            self.note(format!(
                "heal: the old primary replicates from the new one (Sentinel reconfigured it within {} ms)",
                since.elapsed().as_millis()
            ));
            return Ok(());
        }
        replication.replica.configure_replication().await?;
        let _ = replication.replica.command("CLIENT KILL TYPE normal").await;
        self.note(format!(
            "heal: Sentinel had not reconfigured the old primary within {} ms; the nemesis pointed it at the new one and disconnected its clients",
            since.elapsed().as_millis()
        ));
        Ok(())
    }
}

/// A number field (`field` with its colon) of an INFO reply.
fn info_number(info: &str, field: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().parse().ok())
}

/// How long the nemesis leaves Sentinel to turn an old primary into a replica.
const DEMOTION_LIMIT: Duration = Duration::from_secs(15);

/// Parses `--faults`: `all`, or names separated by commas.
pub(super) fn parse_menu(text: &str) -> anyhow::Result<Vec<Kind>> {
    if text.trim() == "all" {
        return Ok(Kind::ALL.to_vec());
    }
    let mut menu = Vec::new();
    for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        match Kind::parse(name) {
            Some(kind) => {
                if !menu.contains(&kind) {
                    menu.push(kind);
                }
            }
            None => bail!(
                "unknown fault {name:?}; known: all, {}",
                Kind::ALL.map(Kind::name).join(", ")
            ),
        }
    }
    Ok(menu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exit_69_is_forgiven_only_when_a_server_was_down_during_the_start() {
        let origin = Instant::now();
        let at = |s: u64| origin + Duration::from_secs(s);
        let outages = vec![
            Outage {
                what: "Redis",
                from: at(10),
                to: Some(at(12)),
            },
            Outage {
                what: "MariaDB",
                from: at(100),
                to: None,
            },
        ];
        // Started during the outage, or shortly after it ended (its attempt began before).
        assert!(outage_during(&outages, origin, at(11), at(11)).is_some());
        assert!(outage_during(&outages, origin, at(9), at(10)).is_some());
        let why = outage_during(&outages, origin, at(15), at(15)).unwrap();
        assert!(why.contains("Redis down 10.000s .. 12.000s"), "{why}");
        // Every server up during the whole start: not forgiven.
        assert_eq!(outage_during(&outages, origin, at(30), at(31)), None);
        assert_eq!(outage_during(&outages, origin, at(5), at(9)), None);
        // An outage still lasting.
        let why = outage_during(&outages, origin, at(101), at(101)).unwrap();
        assert!(why.contains("MariaDB down 100.000s .. still down"), "{why}");
    }

    #[test]
    fn the_menu_parses_names_and_all_and_refuses_unknown_ones() -> anyhow::Result<()> {
        assert_eq!(parse_menu("all")?.len(), Kind::ALL.len());
        assert_eq!(
            parse_menu("worker-kill, mysql-kill,worker-kill")?,
            vec![Kind::WorkerKill, Kind::MysqlKill]
        );
        assert!(parse_menu("worker-kil").is_err());
        Ok(())
    }
}
