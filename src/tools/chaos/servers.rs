//! The private servers a chaos run owns: a `redis-server` with an append-only file and a
//! `mariadbd` with its own data directory, each on a free loopback port, each killable
//! (SIGKILL) and restartable on the same port and data.
//!
//! Redis runs with `appendfsync everysec`. A SIGKILL alone loses nothing (every write reached
//! the kernel before its reply was sent); what `everysec` loses is the last second before a
//! power loss. [`PrivateRedis::snapshot`] and [`PrivateRedis::restart_from_snapshot`] play that:
//! the restart loads the append-only file as it was at the snapshot, so every write after it is
//! gone — a real rollback, the Redis restarted from an older AOF that docs/contract.md §2 names.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A free TCP port on 127.0.0.1 (free when asked; the server binds it right after).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// What happened to a child process the run did not stop itself.
pub fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => "ended".into(),
    }
}

/// SIGKILLs and reaps a child.
pub fn kill_child(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Sends a signal (`KILL`, `STOP`, `CONT`, `TERM`) to a process, with kill(1) (the crate
/// forbids `unsafe`, so no libc).
pub fn signal(pid: u32, name: &str) -> anyhow::Result<()> {
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

/// Waits until something accepts connections on `port`.
async fn wait_for_port(port: u16, limit: Duration, what: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if started.elapsed() > limit {
            bail!("{what} did not open port {port} within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// One PING over a fresh connection: `true` for `+PONG` (not `-LOADING`).
async fn redis_ping(port: u16) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(b"PING\r\n").await?;
        let mut reply = [0u8; 64];
        let n = stream.read(&mut reply).await?;
        std::io::Result::Ok(reply.get(..n).is_some_and(|r| r.starts_with(b"+PONG")))
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .is_ok_and(|r| r.unwrap_or(false))
}

/// A private `redis-server` with an append-only file (`everysec`).
pub struct PrivateRedis {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl PrivateRedis {
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut redis = Self {
            port: free_port()?,
            dir: dir.to_owned(),
            child: None,
        };
        redis.launch().await?;
        Ok(redis)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn aof_dir(&self) -> PathBuf {
        self.dir.join("appendonlydir")
    }

    fn snapshot_dir(&self) -> PathBuf {
        self.dir.join("appendonlydir.snapshot")
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
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
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(20), "redis-server").await?;
        let started = Instant::now();
        while !redis_ping(self.port).await {
            if started.elapsed() > Duration::from_secs(30) {
                bail!("redis-server on port {} never answered PING", self.port);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        kill_child(&mut self.child);
    }

    /// Restarts a killed server from its append-only file, on the same port.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.launch().await
    }

    /// Copies the append-only file as it is now, for [`Self::restart_from_snapshot`].
    pub fn snapshot(&self) -> anyhow::Result<()> {
        let snapshot = self.snapshot_dir();
        if snapshot.exists() {
            std::fs::remove_dir_all(&snapshot)?;
        }
        copy_dir(&self.aof_dir(), &snapshot)
    }

    /// Restarts a killed server from the last snapshot: every write after it is lost.
    pub async fn restart_from_snapshot(&mut self) -> anyhow::Result<()> {
        let aof = self.aof_dir();
        if aof.exists() {
            std::fs::remove_dir_all(&aof)?;
        }
        std::fs::rename(self.snapshot_dir(), &aof).context("restoring the AOF snapshot")?;
        self.launch().await
    }

    /// `Some(status)` if the server ended without being told to.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
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
pub struct PrivateMariadb {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl PrivateMariadb {
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
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
            port: free_port()?,
            dir: dir.to_owned(),
            child: None,
        };
        db.launch().await?;
        Ok(db)
    }

    /// The server's URL with a database name.
    pub fn url(&self, database: &str) -> String {
        format!("mysql://root@127.0.0.1:{}/{database}", self.port)
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let child = Command::new("mariadbd")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", self.dir.join("data").display()))
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
        wait_for_port(self.port, Duration::from_secs(60), "mariadbd").await
    }

    /// SIGKILL: no chance to close connections or flush anything.
    pub fn kill(&mut self) {
        kill_child(&mut self.child);
    }

    pub fn is_down(&self) -> bool {
        self.child.is_none()
    }

    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.launch().await
    }

    /// `Some(status)` if the server ended without being told to.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }
}

impl Drop for PrivateMariadb {
    fn drop(&mut self) {
        self.kill();
    }
}
