//! The private servers a chaos run owns: a `redis-server` with an append-only file and a
//! `mariadbd` with its own data directory, each on a free loopback port, each killable
//! (SIGKILL) and restartable on the same port and data.
//!
//! Redis runs with `appendfsync everysec`. A SIGKILL usually loses nothing (a write reaches the
//! kernel before its reply is sent), but not always: while a background fsync is slow (a busy
//! disk) Redis postpones writing its AOF buffer for up to 2 s and replies meanwhile, so a SIGKILL
//! or a copy of the file then misses acknowledged writes. The nemesis therefore waits, under the
//! API lock, until the buffer is written ([`PrivateRedis::wait_aof_written`]) before it kills or
//! copies: only the workers' writes may be lost, never the API's. What `everysec` loses is the
//! last second before a power loss. [`PrivateRedis::snapshot`] and [`PrivateRedis::restart_from_snapshot`] play that:
//! the restart loads the append-only file as it was at the snapshot, so every write after it is
//! gone — a real rollback, the Redis restarted from an older AOF that docs/contract.md §2 names.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A free TCP port on 127.0.0.1 (free when asked; the server binds it right after). Another
/// process may take it in between (the machine runs other tests): every start that uses one
/// checks that its own process answers there and tries another port if not (
/// [`START_ATTEMPTS`]).
pub(super) fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Ports tried at a server's first start before giving up.
pub(super) const START_ATTEMPTS: u32 = 5;

/// Why a launch did not give a running server.
#[derive(Debug, thiserror::Error)]
pub(super) enum LaunchError {
    /// Our process ended, or another process answers on the port: the port was taken between
    /// choosing and binding it. Another port may work.
    #[error("port {port} was taken by another process: {detail}")]
    PortTaken { port: u16, detail: String },
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Tries `launch` on `first` and then on other free ports while the port turns out taken.
async fn start_on_some_port<S, F>(server: &mut S, first: u16, mut launch: F) -> anyhow::Result<()>
where
    S: HasPort,
    F: AsyncFnMut(&mut S) -> Result<(), LaunchError>,
{
    server.set_port(first);
    let mut taken = Vec::new();
    for _ in 0..START_ATTEMPTS {
        match launch(server).await {
            Ok(()) => return Ok(()),
            Err(LaunchError::PortTaken { port, detail }) => {
                taken.push(format!("{port} ({detail})"));
                server.set_port(free_port()?);
            }
            Err(LaunchError::Other(e)) => return Err(e),
        }
    }
    bail!(
        "no free port after {START_ATTEMPTS} attempts: {}",
        taken.join(", ")
    )
}

/// A server whose port can be chosen again before its first start.
trait HasPort {
    fn set_port(&mut self, port: u16);
}

/// What happened to a child process the run did not stop itself.
pub(super) fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => "ended".into(),
    }
}

/// SIGKILLs and reaps a child.
pub(super) fn kill_child(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// `Some(status)`, and the child forgotten, once it has ended; `None` while it runs or when
/// there is none.
pub(super) fn reap_child(child: &mut Option<Child>) -> Option<ExitStatus> {
    let status = child.as_mut()?.try_wait().ok()??;
    *child = None;
    Some(status)
}

/// Fails with `PortTaken` if the server `what`, logging to `log`, has ended while starting
/// (another process holding the port is the likely cause; its log says).
fn ended_at_start(
    child: &mut Option<Child>,
    port: u16,
    what: &str,
    log: &Path,
) -> Result<(), LaunchError> {
    match reap_child(child) {
        Some(status) => Err(LaunchError::PortTaken {
            port,
            detail: format!(
                "{what} ended at start ({}); see {}",
                describe_exit(status),
                log.display()
            ),
        }),
        None => Ok(()),
    }
}

/// Sends a signal (`KILL`, `STOP`, `CONT`, `TERM`) to a process, with kill(1) (the crate
/// forbids `unsafe`, so no libc).
pub(super) fn signal(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running kill(1)")?;
    if !status.success() {
        bail!("kill -{name} {pid} failed");
    }
    Ok(())
}

/// One command over a fresh connection; the reply as text, as much as arrives within 2 s (a
/// bulk reply is read until its announced length).
async fn redis_command(port: u16, command: &str) -> Option<String> {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(format!("{command}\r\n").as_bytes())
            .await?;
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await?;
            reply.extend_from_slice(buf.get(..n).unwrap_or_default());
            let text = String::from_utf8_lossy(&reply);
            let complete = match text.strip_prefix('$') {
                Some(rest) => rest.split_once("\r\n").is_some_and(|(len, body)| {
                    len.parse::<usize>().is_ok_and(|len| body.len() >= len)
                }),
                None => text.contains("\r\n"),
            };
            if n == 0 || complete {
                return std::io::Result::Ok(text.into_owned());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()?
        .ok()
}

/// One PING over a fresh connection: `true` for `+PONG` (not `-LOADING`).
async fn redis_ping(port: u16) -> bool {
    redis_command(port, "PING")
        .await
        .is_some_and(|r| r.starts_with("+PONG"))
}

/// A private `redis-server` with an append-only file (`everysec`).
pub(super) struct PrivateRedis {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// The port this node tells replicas and Sentinel it is reached at (its fault proxy's), so
    /// that whoever Sentinel sends to it goes through the proxy. `None` without Sentinel.
    pub announce_port: Option<u16>,
    /// The port (another node's proxy) this node replicates from; `None` for a primary.
    pub replica_of: Option<u16>,
}

impl HasPort for PrivateRedis {
    fn set_port(&mut self, port: u16) {
        self.port = port;
    }
}

impl PrivateRedis {
    pub(super) async fn start(dir: &Path) -> anyhow::Result<Self> {
        Self::start_on(dir, free_port()?).await
    }

    /// Starts on `port`, or on another free port if that one turns out taken.
    pub(super) async fn start_on(dir: &Path, port: u16) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut redis = Self {
            port,
            dir: dir.to_owned(),
            child: None,
            announce_port: None,
            replica_of: None,
        };
        start_on_some_port(&mut redis, port, async |r: &mut Self| r.launch().await).await?;
        Ok(redis)
    }

    pub(super) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn aof_dir(&self) -> PathBuf {
        self.dir.join("appendonlydir")
    }

    fn snapshot_dir(&self) -> PathBuf {
        self.dir.join("appendonlydir.snapshot")
    }

    /// Starts the process and waits until it answers PING on its port — itself, not another
    /// process that took the port ([`LaunchError::PortTaken`]).
    async fn launch(&mut self) -> Result<(), LaunchError> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--appendonly", "yes", "--appendfsync", "everysec"])
            .args(["--appenddirname", "appendonlydir", "--save", ""])
            // No rewrite in the background: a snapshot copies the directory while Redis runs,
            // and a rewrite would swap its files under the copy.
            .args(["--auto-aof-rewrite-percentage", "0"])
            // A snapshot copied mid-append may end in half a command: load up to it.
            .args(["--aof-load-truncated", "yes"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server (is it installed?)")?;
        let pid = child.id();
        self.child = Some(child);
        let started = Instant::now();
        loop {
            ended_at_start(
                &mut self.child,
                self.port,
                "redis-server",
                &self.dir.join("redis.log"),
            )?;
            if let Some(info) = redis_command(self.port, "INFO server").await {
                if info.contains(&format!("process_id:{pid}\r\n")) {
                    break;
                }
                if info.contains("process_id:") {
                    self.kill();
                    return Err(LaunchError::PortTaken {
                        port: self.port,
                        detail: "another redis-server answers there".into(),
                    });
                }
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err(anyhow::anyhow!(
                    "redis-server on port {} did not answer within 30 s",
                    self.port
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        while !redis_ping(self.port).await {
            if started.elapsed() > Duration::from_secs(60) {
                return Err(anyhow::anyhow!(
                    "redis-server on port {} never answered PING",
                    self.port
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.configure_replication().await?;
        Ok(())
    }

    /// Applies [`Self::announce_port`] and [`Self::replica_of`] (again after a restart: the
    /// node has no config file).
    pub(super) async fn configure_replication(&self) -> anyhow::Result<()> {
        if let Some(announce) = self.announce_port {
            self.command_ok(&format!(
                "CONFIG SET replica-announce-ip 127.0.0.1 replica-announce-port {announce}"
            ))
            .await?;
        }
        if let Some(primary) = self.replica_of {
            self.command_ok(&format!("REPLICAOF 127.0.0.1 {primary}"))
                .await?;
        }
        Ok(())
    }

    /// Sends one inline command; fails unless the reply is `+OK`.
    pub(super) async fn command_ok(&self, command: &str) -> anyhow::Result<()> {
        match redis_command(self.port, command).await {
            Some(reply) if reply.starts_with("+OK") => Ok(()),
            reply => bail!(
                "redis-server on port {}: `{command}` answered {reply:?}",
                self.port
            ),
        }
    }

    /// One inline command's reply (for INFO and the like), `None` if it did not answer.
    pub(super) async fn command(&self, command: &str) -> Option<String> {
        redis_command(self.port, command).await
    }

    /// Waits until Redis has written its whole AOF buffer to the file (`aof_buffer_length:0`
    /// seen once): every write acknowledged before the call is then in the file, even when a
    /// slow fsync made Redis postpone writing it (up to 2 s). `false` if not within `limit`.
    pub(super) async fn wait_aof_written(&self, limit: Duration) -> bool {
        let started = Instant::now();
        loop {
            if self
                .command("INFO persistence")
                .await
                .is_some_and(|info| aof_buffer_empty(&info))
            {
                return true;
            }
            if started.elapsed() > limit {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL.
    pub(super) fn kill(&mut self) {
        kill_child(&mut self.child);
    }

    pub(super) fn is_down(&self) -> bool {
        self.child.is_none()
    }

    /// Restarts a killed server from its append-only file, on the same port (the proxy in
    /// front of it points there; a port taken meanwhile fails the run, naming it).
    pub(super) async fn restart(&mut self) -> anyhow::Result<()> {
        Ok(self.launch().await?)
    }

    /// Copies the append-only file as it is now, for [`Self::restart_from_snapshot`].
    pub(super) fn snapshot(&self) -> anyhow::Result<()> {
        let snapshot = self.snapshot_dir();
        if snapshot.exists() {
            std::fs::remove_dir_all(&snapshot)?;
        }
        copy_dir(&self.aof_dir(), &snapshot)
    }

    /// Restarts a killed server from the last snapshot: every write after it is lost.
    pub(super) async fn restart_from_snapshot(&mut self) -> anyhow::Result<()> {
        let aof = self.aof_dir();
        if aof.exists() {
            std::fs::remove_dir_all(&aof)?;
        }
        std::fs::rename(self.snapshot_dir(), &aof).context("restoring the AOF snapshot")?;
        Ok(self.launch().await?)
    }

    /// `Some(status)` if the server ended without being told to.
    pub(super) fn exited(&mut self) -> Option<ExitStatus> {
        reap_child(&mut self.child)
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether `INFO persistence` says the AOF buffer is empty (everything written to the file).
fn aof_buffer_empty(info: &str) -> bool {
    info.lines()
        .find_map(|l| l.strip_prefix("aof_buffer_length:"))
        .is_some_and(|v| v.trim() == "0")
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        std::fs::copy(entry.path(), to.join(entry.file_name()))
            .with_context(|| format!("copying {}", entry.path().display()))?;
    }
    Ok(())
}

/// A private `mariadbd` with its own data directory.
pub(super) struct PrivateMariadb {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl HasPort for PrivateMariadb {
    fn set_port(&mut self, port: u16) {
        self.port = port;
    }
}

impl PrivateMariadb {
    pub(super) async fn start(dir: &Path) -> anyhow::Result<Self> {
        Self::start_on(dir, free_port()?).await
    }

    /// Starts on `port`, or on another free port if that one turns out taken.
    pub(super) async fn start_on(dir: &Path, port: u16) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let status = Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.join("data").display()))
            .arg("--auth-root-authentication-method=normal")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("running mariadb-install-db (is MariaDB installed?)")?;
        if !status.success() {
            bail!("mariadb-install-db failed ({})", describe_exit(status));
        }
        let mut db = Self {
            port,
            dir: dir.to_owned(),
            child: None,
        };
        start_on_some_port(&mut db, port, async |d: &mut Self| d.launch().await).await?;
        Ok(db)
    }

    /// The server's URL with a database name.
    pub(super) fn url(&self, database: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/{database}", self.port)
    }

    /// Starts the process and waits until it answers on its port — itself: the server there
    /// must report this run's data directory ([`LaunchError::PortTaken`] otherwise).
    async fn launch(&mut self) -> Result<(), LaunchError> {
        let data = self.dir.join("data");
        let child = Command::new("mariadbd")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--port={}", self.port))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--socket={}", self.dir.join("sock").display()))
            .arg(format!(
                "--log-error={}",
                self.dir.join("mariadb.log").display()
            ))
            .arg("--user=root")
            .arg("--innodb-buffer-pool-size=64M")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting mariadbd")?;
        self.child = Some(child);
        let started = Instant::now();
        let url = format!("mysql://root@127.0.0.1:{}/", self.port);
        loop {
            ended_at_start(
                &mut self.child,
                self.port,
                "mariadbd",
                &self.dir.join("mariadb.log"),
            )?;
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                match datadir(&url).await {
                    Some(dir) if Path::new(dir.trim_end_matches('/')) == data => return Ok(()),
                    Some(dir) => {
                        self.kill();
                        return Err(LaunchError::PortTaken {
                            port: self.port,
                            detail: format!("another server answers there (datadir {dir})"),
                        });
                    }
                    // Still starting (or a server that is not MariaDB: the deadline says so).
                    None => {}
                }
            }
            if started.elapsed() > Duration::from_secs(60) {
                return Err(anyhow::anyhow!(
                    "mariadbd did not answer on port {} within 60 s",
                    self.port
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL: no chance to close connections or flush anything.
    pub(super) fn kill(&mut self) {
        kill_child(&mut self.child);
    }

    pub(super) fn is_down(&self) -> bool {
        self.child.is_none()
    }

    /// Restarts a killed server on the same port (the proxy in front of it points there).
    pub(super) async fn restart(&mut self) -> anyhow::Result<()> {
        Ok(self.launch().await?)
    }

    /// `Some(status)` if the server ended without being told to.
    pub(super) fn exited(&mut self) -> Option<ExitStatus> {
        reap_child(&mut self.child)
    }
}

impl Drop for PrivateMariadb {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The service name the Sentinel of a chaos run monitors.
pub(super) const SENTINEL_SERVICE: &str = "mymaster";

/// A private Sentinel (`redis-server --sentinel`: Debian's `redis-sentinel` package may be
/// missing) monitoring the run's primary at its proxy's address. It never fails over on its own
/// (`down-after-milliseconds` is a minute, longer than any outage the nemesis makes): every
/// failover is one the nemesis asked for with `SENTINEL FAILOVER`. `failover-timeout` is 5 s:
/// Sentinel turns an old primary that still claims to be one into a replica after that long.
pub(super) struct PrivateSentinel {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl HasPort for PrivateSentinel {
    fn set_port(&mut self, port: u16) {
        self.port = port;
    }
}

impl PrivateSentinel {
    /// Starts a Sentinel monitoring the primary announced at `primary_port`.
    pub(super) async fn start(dir: &Path, primary_port: u16) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut sentinel = Self {
            port: 0,
            dir: dir.to_owned(),
            child: None,
        };
        start_on_some_port(&mut sentinel, free_port()?, async |s: &mut Self| {
            s.launch(primary_port).await
        })
        .await?;
        Ok(sentinel)
    }

    /// `redis-sentinel://` URL for the worker replicas.
    pub(super) fn url(&self) -> String {
        format!(
            "redis-sentinel://127.0.0.1:{}?sentinelServiceName={SENTINEL_SERVICE}",
            self.port
        )
    }

    async fn launch(&mut self, primary_port: u16) -> Result<(), LaunchError> {
        let conf = self.dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\nlogfile {log}\n\
                 sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {primary_port} 1\n\
                 sentinel down-after-milliseconds {SENTINEL_SERVICE} 60000\n\
                 sentinel failover-timeout {SENTINEL_SERVICE} 5000\n",
                port = self.port,
                dir = self.dir.display(),
                log = self.dir.join("sentinel.log").display(),
            ),
        )
        .with_context(|| format!("writing {}", conf.display()))?;
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server --sentinel")?;
        let pid = child.id();
        self.child = Some(child);
        let started = Instant::now();
        loop {
            ended_at_start(
                &mut self.child,
                self.port,
                "the sentinel",
                &self.dir.join("sentinel.log"),
            )?;
            if let Some(info) = redis_command(self.port, "INFO server").await {
                if info.contains(&format!("process_id:{pid}\r\n")) {
                    return Ok(());
                }
                if info.contains("process_id:") {
                    kill_child(&mut self.child);
                    return Err(LaunchError::PortTaken {
                        port: self.port,
                        detail: "another redis-server answers there".into(),
                    });
                }
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err(anyhow::anyhow!("the sentinel did not answer within 30 s").into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One inline command's reply, `None` if it did not answer.
    pub(super) async fn command(&self, command: &str) -> Option<String> {
        redis_command(self.port, command).await
    }

    /// The port of the primary the Sentinel names now.
    pub(super) async fn primary_port(&self) -> Option<u16> {
        let reply = self
            .command(&format!(
                "SENTINEL get-master-addr-by-name {SENTINEL_SERVICE}"
            ))
            .await?;
        // *2 $9 127.0.0.1 $5 port
        reply.lines().nth(4)?.trim().parse().ok()
    }

    /// `Some(status)` if the sentinel ended without being told to.
    pub(super) fn exited(&mut self) -> Option<ExitStatus> {
        reap_child(&mut self.child)
    }
}

impl Drop for PrivateSentinel {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

/// `@@datadir` of the server at `url`, `None` if it does not answer (yet).
async fn datadir(url: &str) -> Option<String> {
    use sqlx::Connection;
    let attempt = async {
        let mut conn = sqlx::MySqlConnection::connect(url).await.ok()?;
        let dir: Option<String> = sqlx::query_scalar("SELECT @@datadir")
            .fetch_one(&mut conn)
            .await
            .ok();
        let _ = conn.close().await;
        dir
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_aof_buffer_counts_as_written_only_when_info_says_it_is_empty() {
        assert!(aof_buffer_empty(
            "# Persistence\r\naof_enabled:1\r\naof_buffer_length:0\r\n"
        ));
        assert!(!aof_buffer_empty("aof_buffer_length:118\r\n"));
        // AOF off: no such field; never taken for written.
        assert!(!aof_buffer_empty("# Persistence\r\naof_enabled:0\r\n"));
    }

    #[tokio::test]
    async fn an_idle_redis_has_its_aof_written() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let redis = PrivateRedis::start(dir.path()).await?;
        assert!(redis.command("SET k v").await.is_some());
        assert!(redis.wait_aof_written(Duration::from_secs(10)).await);
        Ok(())
    }

    /// Another process binds the chosen port before the server does (the machine runs other
    /// tests): the start moves to another port instead of failing, or talking to the squatter.
    #[tokio::test]
    async fn a_server_whose_port_was_taken_starts_on_another_one() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let squatter = std::net::TcpListener::bind("127.0.0.1:0")?;
        let taken = squatter.local_addr()?.port();
        let redis = PrivateRedis::start_on(&dir.path().join("redis"), taken).await?;
        assert_ne!(redis.port, taken);
        assert!(redis_ping(redis.port).await);
        // A redis-server already on the port: ours must not take it for itself.
        let other = PrivateRedis::start_on(&dir.path().join("other"), redis.port).await?;
        assert_ne!(other.port, redis.port);
        let db = PrivateMariadb::start_on(&dir.path().join("mariadb"), taken).await?;
        assert_ne!(db.port, taken);
        drop(squatter);
        Ok(())
    }
}
