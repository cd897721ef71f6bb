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

use super::servers::{PrivateMariadb, PrivateRedis, describe_exit};
use super::workers::{State, Worker};
use crate::tools::fault_proxy::FaultProxy;

/// Every fault the nemesis knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
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
}

impl Kind {
    pub const ALL: [Kind; 14] = [
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
    ];

    pub fn name(self) -> &'static str {
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
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Kind::WorkerKill => {
                "SIGKILL a replica; restart it 0-2 s later with its disk (spill directory) kept"
            }
            Kind::WorkerReplace => {
                "SIGKILL a replica; start a replacement 0-2 s later with an empty disk (a rescheduled pod)"
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
        }
    }

    pub fn parse(name: &str) -> Option<Kind> {
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

/// A replica exiting 69 (a server unreachable at start) this soon after starting is refusing to
/// start, as the contract says it must; later, it would be a daemon giving up.
const START_PHASE: Duration = Duration::from_secs(20);

/// One line of the timeline.
#[derive(Clone, Debug)]
pub struct Event {
    pub at: Duration,
    pub text: String,
}

/// Something the run owns that a fault may target.
pub struct Cluster {
    pub redis: PrivateRedis,
    pub mysql: PrivateMariadb,
    pub redis_proxy: FaultProxy,
    pub mysql_proxy: FaultProxy,
    pub workers: Vec<Worker>,
    /// Runs the CLI (`requeue-dead`, `rebuild-ranking`) against the servers directly.
    pub cli: super::Cli,
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
}

pub struct Nemesis {
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
    /// Replicas that exited 69 at start (a server was down) and were started again.
    pub refused_starts: u64,
}

impl Nemesis {
    pub fn new(seed: u64, menu: Vec<Kind>, started: Instant, api_lock: Arc<Mutex<()>>) -> Self {
        Self {
            rng: fastrand::Rng::with_seed(seed),
            menu,
            started,
            api_lock,
            pending: Vec::new(),
            timeline: Vec::new(),
            injected: Default::default(),
            unexpected: Vec::new(),
            refused_starts: 0,
        }
    }

    pub fn note(&mut self, text: impl Into<String>) {
        let text = text.into();
        let at = self.started.elapsed();
        println!("  {:>8.3}s  {text}", at.as_secs_f64());
        self.timeline.push(Event { at, text });
    }

    /// Runs until `until`: injects a fault every 0.3-2.5 s, heals each when due, and notices
    /// processes that end without being killed (restarting them, so the run goes on).
    pub async fn run(&mut self, cluster: &mut Cluster, until: Instant) -> anyhow::Result<()> {
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
    pub async fn heal_all(&mut self, cluster: &mut Cluster) -> anyhow::Result<()> {
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

    fn gap(&mut self) -> Duration {
        Duration::from_millis(self.rng.u64(300..2500))
    }

    fn millis(&mut self, range: std::ops::Range<u64>) -> Duration {
        Duration::from_millis(self.rng.u64(range))
    }

    /// Notices processes that ended on their own.
    pub async fn watch(&mut self, cluster: &mut Cluster) -> anyhow::Result<()> {
        for i in 0..cluster.workers.len() {
            if let Some(status) = cluster.workers[i].exited() {
                // docs/contract.md §5: a service that cannot be reached at start exits 69. A replica
                // restarted while Redis or MariaDB is down does that; like systemd
                // (Restart=on-failure) the run starts it again a second later. Exiting once it
                // was running is the defect this watch is for.
                let uptime = cluster.workers[i].uptime();
                if status.code() == Some(69) && uptime < START_PHASE {
                    self.refused_starts += 1;
                    self.note(format!(
                        "worker {} refused to start after {} ms (exit 69: a server is down); restarting it in 1 s",
                        cluster.workers[i].id,
                        uptime.as_millis()
                    ));
                    self.pending.push((
                        Instant::now() + Duration::from_secs(1),
                        Heal::RestartWorker(i),
                    ));
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
            cluster.redis.restart().await?;
        }
        if let Some(status) = cluster.mysql.exited() {
            let text = format!("mariadbd ended on its own ({})", describe_exit(status));
            self.unexpected.push(text.clone());
            self.note(format!("UNEXPECTED: {text}; restarting it"));
            cluster.mysql.restart().await?;
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
            let (_, heal) = self.pending.remove(i);
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
            }
            Heal::RestartMysql => {
                cluster.mysql.restart().await?;
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
        self.pending
            .iter()
            .any(|(_, h)| matches!(h, Heal::KillForRollback(_) | Heal::RestartRedis { .. }))
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
                    cluster.redis.kill();
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
                if pending_thaw {
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
        } else {
            self.note(format!(
                "{}: target not in a state for it, skipped",
                kind.name()
            ));
        }
        Ok(())
    }
}

/// Parses `--faults`: `all`, or names separated by commas.
pub fn parse_menu(text: &str) -> anyhow::Result<Vec<Kind>> {
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
