//! `commerce-worker chaos`: a seeded nemesis against a live sale, then the invariants.
//!
//! The run owns everything it attacks: a private `redis-server` (append-only file, `everysec`)
//! and `mariadbd` on free ports, a [fault proxy](crate::tools::fault_proxy) in front of each,
//! and R replicas of the real binary (`commerce-worker run`, child processes with their own
//! config, HTTP port and log) connected through the proxies. While the
//! [workload] plays the API (a flash sale, orders across simulated midnights), the [nemesis]
//! injects faults from its menu at random times chosen by the seed. At the end it heals every
//! fault, waits (with a deadline) until the system is quiet, stops the replicas with SIGTERM and
//! runs the [checks]. The run passes only if every check holds; on failure it prints the seed,
//! the command that replays it, and the fault timeline, and keeps its directory (servers' data,
//! every replica's config and log).
//!
//! ```text
//!   chaos ── API writes (direct) ──────────────► redis-server (AOF everysec) ◄── redis proxy ◄─┐
//!     │  └── checks (direct) ─────────────────► mariadbd ◄──────────────────── mysql proxy ◄─┤
//!     └── nemesis: SIGKILL/SIGSTOP, server kills and rollbacks, proxy faults   worker 1..R ──┘
//! ```

mod checks;
mod nemesis;
mod servers;
mod workers;
mod workload;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{Days, NaiveDate};
use fred::prelude::*;

use self::checks::Check;
use self::nemesis::{Cluster, Kind, Nemesis, Replication};
use self::servers::{PrivateMariadb, PrivateRedis, PrivateSentinel, describe_exit};
use self::workers::{Endpoints, Worker, metric_sum};
use self::workload::{Api, RedisHandle, Sale};
use crate::config::Config;
use crate::tools::fault_proxy::FaultProxy;
pub use crate::tools::options::ChaosOptions;

/// What a run found.
#[derive(Debug)]
pub struct Report {
    pub seed: u64,
    pub checks: Vec<Check>,
    pub run_dir: PathBuf,
}

impl Report {
    pub fn all_passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }
}

/// `chaos` as a command: exits 0 only if every check held, 1 if one failed, 2 if the run could
/// not complete. It needs no configuration file (it brings its own servers and writes its
/// replicas' configs), so the binary runs it before loading one.
pub fn main(options: ChaosOptions) -> std::process::ExitCode {
    use std::process::ExitCode;
    // The report is the output; the clients' reconnection warnings would bury it (RUST_LOG
    // still wins).
    crate::telemetry::init(&crate::config::LogConfig {
        level: "error".into(),
        format: crate::config::LogFormat::Text,
    });
    let outcome = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(run(options)));
    match outcome {
        Ok(report) if report.all_passed() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs the operator's CLI (`requeue-dead`, `rebuild-ranking`) against the servers directly, as
/// an operator would.
#[derive(Clone)]
pub struct Cli {
    binary: PathBuf,
    config: PathBuf,
    dir: PathBuf,
}

impl Cli {
    /// Runs `commerce-worker <args> --config <operator config>`; its last output line on exit 0.
    pub async fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let out_path = self
            .dir
            .join(format!("cli-{}.out", uuid::Uuid::new_v4().simple()));
        let out = File::create(&out_path)?;
        let mut child = Command::new(&self.binary)
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "warn")
            .env_remove("REDIS_URL")
            .env_remove("DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting the CLI")?;
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if started.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "`{}` did not finish within 30 s (output: {})",
                    args.join(" "),
                    out_path.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let text = std::fs::read_to_string(&out_path).unwrap_or_default();
        let last = text.lines().last().unwrap_or("").trim().to_string();
        if !status.success() {
            bail!(
                "`{}` ended with {}: {last}",
                args.join(" "),
                describe_exit(status)
            );
        }
        let _ = std::fs::remove_file(&out_path);
        Ok(last)
    }
}

fn print_menu(menu: &[Kind], sentinel: bool) {
    println!("fault menu (--faults):");
    for kind in Kind::ALL {
        if kind == Kind::Failover && !sentinel {
            println!(
                "  [-] {:<17} needs --sentinel (a replica and a Sentinel)",
                kind.name()
            );
            continue;
        }
        println!(
            "  [{}] {:<17} {}",
            if menu.contains(&kind) { "x" } else { " " },
            kind.name(),
            kind.describe()
        );
    }
}

pub async fn run(options: ChaosOptions) -> anyhow::Result<Report> {
    let mut menu = nemesis::parse_menu(&options.faults)?;
    if options.replicas == 0 {
        bail!("--replicas must be at least 1");
    }
    if !options.sentinel {
        if options.faults.trim() != "all" && menu.contains(&Kind::Failover) {
            bail!("the fault `failover` needs --sentinel");
        }
        menu.retain(|k| *k != Kind::Failover);
    }
    let seed = options.seed.unwrap_or_else(|| fastrand::u64(..));
    println!(
        "chaos: seed {seed}, {} s, {} replicas, {} requests/s{}",
        options.seconds,
        options.replicas,
        options.rate,
        if options.sentinel {
            ", Redis primary + replica + Sentinel"
        } else {
            ""
        }
    );
    print_menu(&menu, options.sentinel);
    let run_dir = std::env::temp_dir().join(format!("cw-chaos-{seed}-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    println!("run directory: {}", run_dir.display());
    let started = Instant::now();
    // On SIGINT/SIGTERM the run's future is dropped, and with it every child process it
    // started (servers and replicas are killed on drop).
    let result = tokio::select! {
        result = run_in(&options, seed, menu, &run_dir) => result,
        _ = crate::app::shutdown_signal() => Err(anyhow::anyhow!("interrupted")),
    };
    let (checks, timeline) = match result {
        Ok(found) => found,
        Err(e) => {
            println!(
                "chaos run could not complete: {e:#}\nreplay: {}\nkept: {}",
                replay_command(&options, seed),
                run_dir.display()
            );
            return Err(e);
        }
    };
    println!(
        "\nchecks ({:.0} s in all):",
        started.elapsed().as_secs_f64()
    );
    for check in &checks {
        println!(
            "  [{}] {}",
            if check.passed { "ok" } else { "FAILED" },
            check.name
        );
        for line in &check.details {
            println!("        {line}");
        }
    }
    let report = Report {
        seed,
        checks,
        run_dir: run_dir.clone(),
    };
    if report.all_passed() {
        println!("all checks passed (seed {seed})");
        if !options.keep {
            let _ = std::fs::remove_dir_all(&run_dir);
        }
    } else {
        println!("\nFAILED with seed {seed}; fault timeline:");
        for event in &timeline {
            println!("  {:>9.3}s  {}", event.at.as_secs_f64(), event.text);
        }
        println!(
            "replay: {}\nkept for a look: {} (servers' data, each replica's worker.toml and worker.log)",
            replay_command(&options, seed),
            run_dir.display()
        );
    }
    Ok(report)
}

fn replay_command(options: &ChaosOptions, seed: u64) -> String {
    format!(
        "commerce-worker chaos --seconds {} --seed {seed} --replicas {} --rate {} --faults {}{}",
        options.seconds,
        options.replicas,
        options.rate,
        options.faults,
        if options.sentinel { " --sentinel" } else { "" }
    )
}

async fn run_in(
    options: &ChaosOptions,
    seed: u64,
    menu: Vec<Kind>,
    run_dir: &Path,
) -> anyhow::Result<(Vec<Check>, Vec<nemesis::Event>)> {
    // 1. Servers, proxies, the operator's config (direct to the servers) and the schema.
    let redis = PrivateRedis::start(&run_dir.join("redis")).await?;
    let mysql = PrivateMariadb::start(&run_dir.join("mariadb")).await?;
    let redis_addr = format!("127.0.0.1:{}", redis.port).parse()?;
    let mysql_addr = format!("127.0.0.1:{}", mysql.port).parse()?;
    let redis_proxy = FaultProxy::start(redis_addr).await?;
    let mysql_proxy = FaultProxy::start(mysql_addr).await?;
    println!(
        "redis-server on :{} (proxy :{}), mariadbd on :{} (proxy :{})",
        redis.port,
        redis_proxy.addr().port(),
        mysql.port,
        mysql_proxy.addr().port()
    );
    let mut redis = redis;
    let replication = if options.sentinel {
        Some(start_replication(&mut redis, &redis_proxy, run_dir, &mysql.url("chaos")).await?)
    } else {
        None
    };
    let direct = Endpoints {
        redis_url: redis.url(),
        mysql_url: mysql.url("chaos"),
    };
    let operator_config = run_dir.join("operator.toml");
    let text = workers::config_text(&direct, 0);
    std::fs::write(&operator_config, &text)?;
    let config = Config::from_toml_str(&text, &operator_config, |_| None)?;
    crate::backends::migrate(&config.mysql).await?;
    let redis_client = RedisHandle::new(crate::backends::connect_redis(&config.redis).await?);
    let mysql_pool = crate::backends::connect_mysql(&config.mysql).await?;
    let binary = std::env::current_exe().context("finding this binary")?;
    let cli = Cli {
        binary: binary.clone(),
        config: operator_config,
        dir: run_dir.to_owned(),
    };

    // 2. The sale's stock and the stale day, then the replicas.
    let timezone = config.ranking.timezone;
    let window_days = config.ranking.window_days;
    let today = crate::ranking::today(timezone);
    let day = |back: u64| today.checked_sub_days(Days::new(back)).unwrap_or(today);
    let stale_day = day(u64::from(window_days));
    let mut workload_rng = fastrand::Rng::with_seed(seed ^ 0x5EED_F0A9);
    let api_lock = Arc::new(tokio::sync::Mutex::new(()));
    let sale = Sale::new(&mut workload_rng, options.seconds, options.rate);
    println!(
        "sale: coupons {} (couponId, stock), coupon {} unstocked, {} users, {} requests per 100 ms; orders for {} .. {today}, {stale_day} to be pruned",
        sale.coupons
            .iter()
            .map(|(c, s)| format!("({c}, {s})"))
            .collect::<Vec<_>>()
            .join(" "),
        sale.unknown_coupon,
        sale.users,
        sale.per_wave,
        day(2)
    );
    let mut api = Api::new(
        redis_client.clone(),
        config.keys.clone(),
        Arc::clone(&api_lock),
        sale,
    );
    api.prepare(&mut workload_rng, stale_day).await?;
    let proxied = Endpoints {
        redis_url: match &replication {
            Some(r) => r.sentinel.url(),
            None => format!("redis://{}", redis_proxy.addr()),
        },
        mysql_url: format!("mysql://root@{}/chaos", mysql_proxy.addr()),
    };
    let mut replicas = Vec::new();
    for id in 1..=options.replicas {
        let mut worker = Worker::new(id, run_dir, &binary, proxied.clone())?;
        worker.start()?;
        replicas.push(worker);
    }
    for worker in &replicas {
        wait_ready(worker).await?;
    }
    let mut cluster = Cluster {
        redis,
        mysql,
        redis_proxy,
        mysql_proxy,
        workers: replicas,
        cli: cli.clone(),
        replication,
        api_redis: redis_client.clone(),
    };
    println!(
        "{} replicas ready; the sale and the nemesis start\n",
        options.replicas
    );

    // 3. The sale and the nemesis, side by side.
    let started = Instant::now();
    let started_ms = chrono::Utc::now().timestamp_millis();
    let until = started + Duration::from_secs(options.seconds);
    let mut nemesis = Nemesis::new(seed, menu, started, Arc::clone(&api_lock));
    let sale_task = tokio::spawn(play_sale(
        api,
        workload_rng,
        cli.clone(),
        [day(2), day(1), today],
        started,
        options.seconds,
    ));
    nemesis.run(&mut cluster, until).await?;

    // 4. Heal (first: a wave of the sale may be waiting for Redis to come back), wait for
    //    quiet, stop the replicas.
    nemesis.note("the sale is over; healing every fault");
    nemesis.heal_all(&mut cluster).await?;
    let api = sale_task.await.context("the sale task panicked")??;
    // The worker is held to the API writes Redis still witnesses (workload.rs); what Redis
    // acknowledged and then lost is reported on its own.
    let (ledger, api_loss) = api.ledger.witnessed(&redis_client.current()).await?;
    if !api_loss.is_empty() {
        nemesis.note(format!(
            "Redis no longer holds API writes it acknowledged: {} requests, {} malformed, {} order units (see the checks)",
            api_loss.requests.iter().map(|r| u64::from(r.1)).sum::<u64>(),
            api_loss.malformed.len(),
            api_loss.orders.iter().map(|o| o.2).sum::<f64>()
        ));
    }
    let quiet = quiesce(
        &mut nemesis,
        &mut cluster,
        &redis_client.current(),
        &mysql_pool,
        &config,
        &ledger,
        Duration::from_secs(options.quiesce_secs),
    )
    .await?;
    let following = follows_primary(&cluster, &redis_client.current(), &config).await?;
    let mut given_up = 0.0;
    for worker in &cluster.workers {
        match worker.http_get("/metrics").await {
            Ok((_, body)) => {
                given_up += metric_sum(&body, "commerce_worker_ranking_log_rows_given_up_total")
            }
            Err(e) => nemesis.note(format!("worker {}: /metrics: {e:#}", worker.id)),
        }
    }
    let mut exits = Vec::new();
    for worker in &mut cluster.workers {
        match worker.terminate(Duration::from_secs(40)).await {
            Ok(exit) => {
                if exit != "exit code 0" {
                    nemesis
                        .unexpected
                        .push(format!("worker {} after SIGTERM: {exit}", worker.id));
                }
                exits.push(format!("worker {}: {exit}", worker.id));
            }
            Err(e) => {
                nemesis.unexpected.push(format!("{e:#}"));
                exits.push(format!("{e:#}"));
            }
        }
    }
    nemesis.note(format!("replicas stopped: {}", exits.join(", ")));

    // 5. Checks.
    let mut checks = vec![quiet, following, checks::api_loss(&api_loss, started_ms)];
    checks.extend(
        checks::run(&checks::Inputs {
            redis: &redis_client.current(),
            mysql: &mysql_pool,
            keys: &config.keys,
            sale: &api.sale,
            ledger: &ledger,
            window_days,
            stale_day,
            given_up_metric: given_up,
        })
        .await?,
    );
    let mut starts: Vec<String> = cluster
        .workers
        .iter()
        .map(|w| format!("worker {} started {} times", w.id, w.starts))
        .collect();
    starts.push(format!(
        "{} starts refused with exit 69, each while the nemesis had a server down (as the contract says), started again{}",
        nemesis.refused_starts.len(),
        if nemesis.refused_starts.is_empty() {
            ""
        } else {
            ":"
        }
    ));
    checks.push(Check {
        name: "no process ended unexpectedly; every replica exited 0 after SIGTERM; exit 69 only while a server was down".into(),
        passed: nemesis.unexpected.is_empty(),
        details: [
            vec![exits.join(", "), starts.join(", ")],
            nemesis.refused_starts.clone(),
            nemesis.unexpected.clone(),
        ]
        .concat(),
    });
    let injected: Vec<String> = nemesis
        .injected
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    let (mut redis_dropped, mut redis_frozen) = (
        cluster.redis_proxy.replies_dropped(),
        cluster.redis_proxy.connections_frozen(),
    );
    let mut failovers = String::new();
    if let Some(r) = &cluster.replication {
        redis_dropped += r.replica_proxy.replies_dropped();
        redis_frozen += r.replica_proxy.connections_frozen();
        failovers = format!("; {} failovers completed", r.failovers);
    }
    println!(
        "\nfaults injected: {} (redis proxies: {redis_dropped} replies lost, {redis_frozen} connections frozen; mysql proxy: {} replies lost, {} connections frozen{failovers})",
        if injected.is_empty() {
            "none".into()
        } else {
            injected.join(", ")
        },
        cluster.mysql_proxy.replies_dropped(),
        cluster.mysql_proxy.connections_frozen(),
    );
    let _ = redis_client.current().quit().await;
    mysql_pool.close().await;
    Ok((checks, nemesis.timeline))
}

/// `--sentinel`: makes `primary` announce its proxy's port, starts a replica (replicating
/// through the primary's proxy, announcing its own proxy's) and a Sentinel monitoring the
/// primary at its proxy's address, so that every address Sentinel hands out is a proxy's and
/// the proxy faults still apply after a failover.
async fn start_replication(
    primary: &mut PrivateRedis,
    primary_proxy: &FaultProxy,
    run_dir: &Path,
    mysql_url: &str,
) -> anyhow::Result<Replication> {
    primary.announce_port = Some(primary_proxy.addr().port());
    primary.configure_replication().await?;
    let mut replica = PrivateRedis::start(&run_dir.join("replica")).await?;
    let replica_proxy = FaultProxy::start(format!("127.0.0.1:{}", replica.port).parse()?).await?;
    replica.announce_port = Some(replica_proxy.addr().port());
    replica.replica_of = Some(primary_proxy.addr().port());
    replica.configure_replication().await?;
    let started = Instant::now();
    while !replica
        .command("INFO replication")
        .await
        .is_some_and(|i| i.contains("master_link_status:up"))
    {
        if started.elapsed() > Duration::from_secs(30) {
            bail!(
                "the Redis replica on :{} did not sync within 30 s",
                replica.port
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sentinel =
        PrivateSentinel::start(&run_dir.join("sentinel"), primary_proxy.addr().port()).await?;
    // Sentinel learns of the replica from the primary's INFO (every 10 s at first).
    let want = format!("port={}", replica_proxy.addr().port());
    let started = Instant::now();
    loop {
        let known = sentinel
            .command(&format!("SENTINEL replicas {}", servers::SENTINEL_SERVICE))
            .await
            .unwrap_or_default();
        let info = sentinel.command("INFO sentinel").await.unwrap_or_default();
        if known.contains(&replica_proxy.addr().port().to_string()) || info.contains(&want) {
            break;
        }
        if info.contains("slaves=1") {
            break;
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the Sentinel did not learn of the replica within 30 s: {info}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "redis replica on :{} (proxy :{}), sentinel on :{} monitoring the primary at :{}",
        replica.port,
        replica_proxy.addr().port(),
        sentinel.port,
        primary_proxy.addr().port()
    );
    Ok(Replication {
        replica,
        replica_proxy,
        sentinel,
        operator_config: run_dir.join("operator.toml"),
        mysql_url: mysql_url.to_string(),
        failovers: 0,
    })
}

/// Every replica writes to the primary there is now (after any failover): each running
/// replica's heartbeat (`<host>:<pid>`, refreshed every 10 s) is on the primary and was
/// refreshed within the last 10 s + 5 s. A replica still talking to a demoted primary (now a
/// read-only replica) could not have written it; with two replicas the other one would drain
/// the queue alone, so quiescence alone would not notice.
async fn follows_primary(
    cluster: &Cluster,
    redis: &Client,
    config: &Config,
) -> anyhow::Result<Check> {
    let limit = crate::control::HEARTBEAT_INTERVAL + Duration::from_secs(5);
    let heartbeats = crate::control::live_replicas(redis, &config.keys).await?;
    let now = chrono::Utc::now();
    let mut details = Vec::new();
    let mut passed = true;
    for worker in &cluster.workers {
        let Some(pid) = worker.pid() else {
            passed = false;
            details.push(format!("worker {}: not running", worker.id));
            continue;
        };
        let suffix = format!(":{pid}");
        let seen = heartbeats
            .iter()
            .find(|h| h.replica.ends_with(&suffix))
            .map(|h| (now - h.seen_at).to_std().unwrap_or_default());
        let ok = seen.is_some_and(|age| age <= limit);
        passed &= ok;
        details.push(match seen {
            Some(age) => format!(
                "worker {} (pid {pid}): heartbeat on the primary {:.1} s old{}",
                worker.id,
                age.as_secs_f64(),
                if ok { "" } else { " (too old)" }
            ),
            None => format!(
                "worker {} (pid {pid}): no heartbeat on the primary",
                worker.id
            ),
        });
    }
    if let Some(replication) = &cluster.replication {
        details.push(format!(
            "{} failovers; the primary is the node behind proxy :{}",
            replication.failovers,
            cluster.redis_proxy.addr().port()
        ));
    }
    Ok(Check {
        name: format!(
            "every replica writes to the current primary (its heartbeat there is at most {} s old)",
            limit.as_secs()
        ),
        passed,
        details,
    })
}

/// Waits until a replica answers `/readyz` with 200.
async fn wait_ready(worker: &Worker) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        if let Ok((200, _)) = worker.http_get("/readyz").await {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "worker {} not ready within 60 s; its log: {}",
                worker.id,
                worker.log_path().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How long a simulated midnight's `rebuild-ranking --date` is retried before the run counts it
/// as failed.
const MIDNIGHT_RETRIES: Duration = Duration::from_secs(60);

/// The API's part: waves of requests every 100 ms, orders for the day being sold, and a
/// simulated midnight (`rebuild-ranking --date`) between the thirds of the run.
async fn play_sale(
    mut api: Api,
    mut rng: fastrand::Rng,
    cli: Cli,
    days: [NaiveDate; 3],
    started: Instant,
    seconds: u64,
) -> anyhow::Result<Api> {
    let total = Duration::from_secs(seconds);
    let mut phase = 0usize;
    let mut midnights = Vec::new();
    let mut wave = tokio::time::interval(Duration::from_millis(100));
    wave.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Both midnights happen even if the API was held up (by the nemesis' lock) past the end.
    while started.elapsed() < total || phase < 2 {
        wave.tick().await;
        let now_phase = ((started.elapsed().as_secs_f64() / total.as_secs_f64()) * 3.0) as usize;
        let now_phase = now_phase.min(2);
        while phase < now_phase {
            // Midnight: the day that ended is built, as its scheduled rebuild would.
            let ended = days[phase];
            let cli = cli.clone();
            midnights.push((
                ended,
                tokio::spawn(async move {
                    // An operator (or cron) retries while Redis is down or rolled back; a
                    // midnight still failing after MIDNIGHT_RETRIES fails the run.
                    let date = ended.to_string();
                    let started = Instant::now();
                    let mut attempts = 0;
                    loop {
                        attempts += 1;
                        match cli.run(&["rebuild-ranking", "--date", &date]).await {
                            Ok(out) if attempts == 1 => return Ok(out),
                            Ok(out) => return Ok(format!("{out} (attempt {attempts})")),
                            Err(e) if started.elapsed() > MIDNIGHT_RETRIES => {
                                return Err(format!("{attempts} attempts, the last: {e:#}"));
                            }
                            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                        }
                    }
                }),
            ));
            phase += 1;
        }
        let now_ms = chrono::Utc::now().timestamp_millis();
        let malformed = rng.u8(0..10) == 0;
        api.requests(&mut rng, now_ms, malformed).await?;
        let orders = rng.u64(1..=3);
        api.orders(&mut rng, days[phase], orders).await?;
    }
    for (day, task) in midnights {
        let outcome = match task.await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => format!("FAILED: {e}"),
            Err(e) => format!("FAILED: {e}"),
        };
        api.ledger.midnights.push((day, outcome));
    }
    Ok(api)
}

/// What the system looks like to [`quiesce`]: each figure must be zero (or done) and stay
/// unchanged for longer than the log stream's claim idle time.
#[derive(Debug, Clone, PartialEq)]
struct Quiet {
    queue: u64,
    outbox: u64,
    /// Entries in the log streams, entries read and not acknowledged (`XPENDING`), and rows the
    /// streams' counters say are waiting.
    log_entries: u64,
    log_pending: u64,
    log_rows_waiting: u64,
    /// Lengths of `coupon:dead` and of the log dead-letter streams: must stay as they are.
    dead: u64,
    log_dead: u64,
    ranking_logs: i64,
    user_coupon: i64,
    channels: u64,
    unready: usize,
    /// Today's ranking is built and holds today's whole window.
    ranking_ok: bool,
    built: Option<String>,
}

impl Quiet {
    fn empty(&self) -> bool {
        self.queue == 0
            && self.outbox == 0
            && self.log_entries == 0
            && self.log_pending == 0
            && self.log_rows_waiting == 0
            && self.channels == 0
            && self.unready == 0
            && self.ranking_ok
    }
}

impl std::fmt::Display for Quiet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "queue {}, outbox {}, log streams {} entries ({} pending, {} rows counted), log channels {}, replicas not answering {}, dead letters {} (+{} in log dead streams), ranking_logs {} rows, user_coupon {} rows, ranking built for {} {}",
            self.queue,
            self.outbox,
            self.log_entries,
            self.log_pending,
            self.log_rows_waiting,
            self.channels,
            self.unready,
            self.dead,
            self.log_dead,
            self.ranking_logs,
            self.user_coupon,
            self.built.as_deref().unwrap_or("no day"),
            if self.ranking_ok {
                "and complete"
            } else {
                "(not yet today's full window)"
            }
        )
    }
}

/// How long every figure must stay empty and unchanged before the run calls the system quiet:
/// longer than a log entry left in a consumer's pending list waits before another reader
/// takes it over (`XAUTOCLAIM` after [`CLAIM_IDLE`](crate::ranking_log::stream::CLAIM_IDLE)),
/// so no such entry is still on its way when the checks read.
fn quiet_for() -> Duration {
    crate::ranking_log::stream::CLAIM_IDLE + Duration::from_secs(3)
}

/// Reads [`Quiet`]'s figures.
async fn probe_quiet(
    cluster: &Cluster,
    redis: &Client,
    mysql: &sqlx::MySqlPool,
    config: &Config,
    expected: &std::collections::HashMap<String, f64>,
    today: NaiveDate,
) -> anyhow::Result<Quiet> {
    let keys = &config.keys;
    let mut queue = 0u64;
    let mut outbox = 0u64;
    for lane in crate::coupon::queue_keys(redis, keys).await? {
        queue += redis.zcard::<u64, _>(&lane.queue).await?;
        outbox += redis.zcard::<u64, _>(&lane.outbox).await?;
    }
    let (mut log_entries, mut log_pending, mut log_rows_waiting, mut log_dead) = (0, 0, 0, 0);
    for lane in crate::ranking_log::stream::log_lanes(redis, keys).await? {
        log_entries += redis.xlen::<u64, _>(&lane.log).await?;
        log_dead += redis.xlen::<u64, _>(lane.log_dead()).await?;
        let waiting: Option<i64> = redis.get(lane.log_rows()).await?;
        log_rows_waiting += waiting.unwrap_or(0).max(0) as u64;
        // XPENDING summary: [count, first id, last id, consumers]; NOGROUP before any read.
        let summary: Result<Value, _> = redis
            .xpending(&lane.log, crate::ranking_log::stream::GROUP, ())
            .await;
        if let Ok(Value::Array(parts)) = summary
            && let Some(count) = parts.first().and_then(|v| v.as_u64())
        {
            log_pending += count;
        }
    }
    let dead: u64 = redis.xlen(&keys.dead).await?;
    let ranking_logs: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM ranking_logs")
        .fetch_one(mysql)
        .await?;
    let user_coupon: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM user_coupon")
        .fetch_one(mysql)
        .await?;
    let built: Option<String> = redis.hget(keys.ranking_live_record(), "day").await?;
    let ranking: Vec<(String, f64)> = redis
        .zrange(&keys.ranking_window, 0, -1, None, false, None, true)
        .await?;
    let ranking_ok = built.as_deref() == Some(today.to_string().as_str())
        && ranking.len() == expected.len()
        && ranking
            .iter()
            .all(|(p, s)| expected.get(p).is_some_and(|e| (e - s).abs() < 1e-6));
    let mut channels = 0.0;
    let mut unready = 0;
    for worker in &cluster.workers {
        match worker.http_get("/metrics").await {
            Ok((_, body)) => {
                channels += metric_sum(&body, "commerce_worker_ranking_log_channel_depth")
            }
            Err(_) => unready += 1,
        }
    }
    Ok(Quiet {
        queue,
        outbox,
        log_entries,
        log_pending,
        log_rows_waiting,
        dead,
        log_dead,
        ranking_logs,
        user_coupon,
        channels: channels as u64,
        unready,
        ranking_ok,
        built,
    })
}

/// After healing: waits until the queue and outboxes are empty, the log streams are empty with
/// nothing pending, the replicas' channels are empty, today's ranking holds today's window, and
/// all of it (with the row counts and the dead-letter streams' lengths) stayed so for
/// [`quiet_for`] — or the deadline passes. The result is the first check.
async fn quiesce(
    nemesis: &mut Nemesis,
    cluster: &mut Cluster,
    redis: &Client,
    mysql: &sqlx::MySqlPool,
    config: &Config,
    ledger: &workload::Ledger,
    limit: Duration,
) -> anyhow::Result<Check> {
    let started = Instant::now();
    let today = crate::ranking::today(config.ranking.timezone);
    let expected = ledger.expected_ranking(today, config.ranking.window_days);
    let hold = quiet_for();
    let name = format!(
        "the system became quiet within {} s of healing (queue, outbox, log streams and pending lists empty, dead letters and rows unchanged for {} s)",
        limit.as_secs(),
        hold.as_secs()
    );
    // The figures when they were last seen empty, and since when they have not changed.
    let mut last: Option<(Quiet, Instant)> = None;
    loop {
        nemesis.watch(cluster).await?;
        match probe_quiet(cluster, redis, mysql, config, &expected, today).await {
            Ok(now) => {
                if !now.empty() {
                    last = None;
                } else if last.as_ref().is_none_or(|(seen, _)| *seen != now) {
                    last = Some((now.clone(), Instant::now()));
                }
                if let Some((seen, since)) = &last
                    && since.elapsed() >= hold
                {
                    let text = format!(
                        "after {:.1} s ({:.1} s unchanged): {seen}",
                        started.elapsed().as_secs_f64(),
                        since.elapsed().as_secs_f64()
                    );
                    nemesis.note(format!("quiet {text}"));
                    return Ok(Check {
                        name,
                        passed: true,
                        details: vec![text],
                    });
                }
                if started.elapsed() > limit {
                    nemesis.note(format!("NOT quiet after {} s: {now}", limit.as_secs()));
                    return Ok(Check {
                        name,
                        passed: false,
                        details: vec![format!("at the deadline: {now}")],
                    });
                }
            }
            Err(e) => {
                last = None;
                if started.elapsed() > limit {
                    return Ok(Check {
                        name,
                        passed: false,
                        details: vec![format!("at the deadline the servers did not answer: {e:#}")],
                    });
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quiet() -> Quiet {
        Quiet {
            queue: 0,
            outbox: 0,
            log_entries: 0,
            log_pending: 0,
            log_rows_waiting: 0,
            dead: 3,
            log_dead: 0,
            ranking_logs: 100,
            user_coupon: 40,
            channels: 0,
            unready: 0,
            ranking_ok: true,
            built: Some("2026-11-24".into()),
        }
    }

    /// An entry a rollback left in a live consumer's pending list is taken over only after
    /// the claim idle time: quiet must wait longer than that, and must see the log streams and
    /// their pending lists empty, not just the queue and the channels.
    #[test]
    fn quiet_needs_the_log_streams_empty_and_longer_than_the_claim_idle_time() {
        assert!(quiet_for() > crate::ranking_log::stream::CLAIM_IDLE);
        assert!(quiet().empty());
        let not = [
            Quiet {
                log_entries: 1,
                ..quiet()
            },
            Quiet {
                log_pending: 1,
                ..quiet()
            },
            Quiet {
                log_rows_waiting: 10,
                ..quiet()
            },
            Quiet {
                outbox: 1,
                ..quiet()
            },
            Quiet {
                ranking_ok: false,
                ..quiet()
            },
        ];
        for q in not {
            assert!(!q.empty(), "{q}");
        }
    }
}
