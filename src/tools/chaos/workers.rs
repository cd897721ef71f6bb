//! The worker replicas a chaos run attacks: the real binary (`commerce-worker run`), one child
//! process per replica, each with its own config file, HTTP port and log file.
//!
//! A replica may be restarted after a SIGKILL (a process restarted by systemd on the same
//! machine) or *replaced* (a Kubernetes pod rescheduled with its local disk gone); the worker
//! keeps no state on disk (ranking-log rows wait in Redis), so both must lose nothing.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::servers::{describe_exit, free_port, kill_child, reap_child, signal};

/// Where the replicas' servers are (directly, or through a fault proxy).
#[derive(Clone, Debug)]
pub(super) struct Endpoints {
    pub redis_url: String,
    pub mysql_url: String,
}

/// The worker settings a chaos run uses: fast schedules and small batches, so that faults land
/// between many small steps.
pub(super) fn config_text(endpoints: &Endpoints, http_port: u16) -> String {
    format!(
        r#"# Written by `commerce-worker chaos`.
[redis]
url = {redis:?}

[mysql]
url = {mysql:?}
max_connections = 4

[coupon]
schedule = "*/1 * * * * *"
batch_size = 25
tick_budget_ms = 700

[ranking]
schedule = "*/3 * * * * *"
timezone = "Asia/Seoul"

[ranking_log]
batch_size = 100
flush_interval_ms = 50
max_attempts = 10

[http]
listen = "127.0.0.1:{http_port}"

[log]
level = "info"
format = "text"

[shutdown]
timeout_secs = 20
"#,
        redis = endpoints.redis_url,
        mysql = endpoints.mysql_url,
    )
}

/// What the run believes a replica is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum State {
    Running,
    /// SIGSTOPped.
    Stopped,
    /// SIGKILLed, not restarted yet.
    Down,
}

pub(super) struct Worker {
    pub id: usize,
    pub http_port: u16,
    dir: PathBuf,
    binary: PathBuf,
    endpoints: Endpoints,
    /// Bumped when the replica is replaced with an empty disk.
    generation: u32,
    pub state: State,
    child: Option<Child>,
    pub starts: u32,
    started_at: Instant,
    /// The log file's length when the replica was last started: what it wrote since is after it.
    log_offset: u64,
}

impl Worker {
    pub(super) fn new(
        id: usize,
        run_dir: &Path,
        binary: &Path,
        endpoints: Endpoints,
    ) -> anyhow::Result<Self> {
        let dir = run_dir.join(format!("worker-{id}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            id,
            http_port: free_port()?,
            dir,
            binary: binary.to_owned(),
            endpoints,
            generation: 0,
            state: State::Down,
            child: None,
            starts: 0,
            started_at: Instant::now(),
            log_offset: 0,
        })
    }

    pub(super) fn config_path(&self) -> PathBuf {
        self.dir.join("worker.toml")
    }

    pub(super) fn log_path(&self) -> PathBuf {
        self.dir.join("worker.log")
    }

    pub(super) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Writes the config and starts `commerce-worker run`; its log is appended to `worker.log`.
    pub(super) fn start(&mut self) -> anyhow::Result<()> {
        std::fs::write(
            self.config_path(),
            config_text(&self.endpoints, self.http_port),
        )?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        self.log_offset = log.metadata().map(|m| m.len()).unwrap_or(0);
        let child = Command::new(&self.binary)
            .arg("run")
            .arg("--config")
            .arg(self.config_path())
            .env_remove("REDIS_URL")
            .env_remove("DATABASE_URL")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting worker {}", self.id))?;
        self.child = Some(child);
        self.state = State::Running;
        self.starts += 1;
        self.started_at = Instant::now();
        Ok(())
    }

    /// Whether the replica, ending with `status` during its start, failed because its HTTP port
    /// was taken (exit 78, "cannot listen on" in what it logged since its start): the port was
    /// free when chosen, and someone bound it before the worker did.
    pub(super) fn failed_to_listen(&self, status: ExitStatus, starting: bool) -> bool {
        if !starting || status.code() != Some(78) {
            return false;
        }
        let text = std::fs::read(self.log_path()).unwrap_or_default();
        let since = text.get(self.log_offset as usize..).unwrap_or_default();
        String::from_utf8_lossy(since).contains("cannot listen on")
    }

    /// Chooses another HTTP port for the next start.
    pub(super) fn new_http_port(&mut self) -> anyhow::Result<()> {
        self.http_port = free_port()?;
        Ok(())
    }

    /// How long ago the replica was last started.
    pub(super) fn uptime(&self) -> Duration {
        self.started_at.elapsed()
    }

    /// SIGKILL (also ends a SIGSTOPped replica).
    pub(super) fn kill(&mut self) {
        kill_child(&mut self.child);
        self.state = State::Down;
    }

    /// The next start is a replaced pod (a new generation; the worker keeps nothing on disk).
    pub(super) fn lose_disk(&mut self) {
        self.generation += 1;
    }

    pub(super) fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.pid() {
            signal(pid, "STOP")?;
            self.state = State::Stopped;
        }
        Ok(())
    }

    pub(super) fn resume(&mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.pid() {
            signal(pid, "CONT")?;
            self.state = State::Running;
        }
        Ok(())
    }

    /// `Some(status)` if the replica ended without being killed by the run.
    pub(super) fn exited(&mut self) -> Option<ExitStatus> {
        let status = reap_child(&mut self.child)?;
        self.state = State::Down;
        Some(status)
    }

    /// SIGTERM, then waits up to `limit` for the graceful shutdown; the exit, or an error if it
    /// did not come (the replica is then SIGKILLed).
    pub(super) async fn terminate(&mut self, limit: Duration) -> anyhow::Result<String> {
        let Some(pid) = self.pid() else {
            bail!("worker {} was not running", self.id);
        };
        if self.state == State::Stopped {
            signal(pid, "CONT")?;
        }
        signal(pid, "TERM")?;
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                self.state = State::Down;
                return Ok(describe_exit(status));
            }
            if started.elapsed() > limit {
                self.kill();
                bail!(
                    "worker {} did not exit within {limit:?} of SIGTERM",
                    self.id
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `GET path` on the replica's HTTP port: status code and body.
    pub(super) async fn http_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        http_get(self.http_port, path).await
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.state == State::Stopped
            && let Some(pid) = self.pid()
        {
            let _ = signal(pid, "CONT");
        }
        kill_child(&mut self.child);
    }
}

/// A minimal HTTP/1.1 GET (one request per connection): the worker's endpoints are all the run
/// reads, and no HTTP client crate is worth adding for them.
pub(super) async fn http_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/plain\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        anyhow::Ok(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(Duration::from_secs(3), exchange)
        .await
        .context("HTTP request timed out")??;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .context("no HTTP status line")?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The sum of a metric's samples (all label sets) in a Prometheus text exposition.
pub(super) fn metric_sum(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|line| line.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker whose HTTP port was taken exits 78 saying so; only that, during its start, is
    /// taken for a port to change (an exit 78 for another reason, or later, is not).
    #[test]
    fn a_taken_http_port_is_told_from_other_exits() -> anyhow::Result<()> {
        use std::os::unix::process::ExitStatusExt;
        let dir = tempfile::tempdir()?;
        let mut worker = Worker::new(
            1,
            dir.path(),
            Path::new("/bin/false"),
            Endpoints {
                redis_url: String::new(),
                mysql_url: String::new(),
            },
        )?;
        std::fs::write(
            worker.log_path(),
            "error: cannot listen on 127.0.0.1:1 (an older start)\n",
        )?;
        worker.start()?;
        let config_error = ExitStatus::from_raw(78 << 8);
        assert!(
            !worker.failed_to_listen(config_error, true),
            "an older start's line"
        );
        std::fs::OpenOptions::new()
            .append(true)
            .open(worker.log_path())
            .and_then(|mut f| {
                std::io::Write::write_all(
                    &mut f,
                    b"error: http.listen: cannot listen on 127.0.0.1:1\n",
                )
            })?;
        assert!(worker.failed_to_listen(config_error, true));
        assert!(
            !worker.failed_to_listen(config_error, false),
            "not during its start"
        );
        assert!(!worker.failed_to_listen(ExitStatus::from_raw(69 << 8), true));
        let before = worker.http_port;
        worker.new_http_port()?;
        assert_ne!(worker.http_port, before);
        Ok(())
    }

    #[test]
    fn metric_sum_adds_every_label_set_and_ignores_longer_names() {
        let text = "# HELP x_total help\nx_total{a=\"1\"} 2\nx_total{a=\"2\"} 3\nx_total_more 7\nx_total 1\n";
        assert_eq!(metric_sum(text, "x_total"), 6.0);
        assert_eq!(metric_sum(text, "absent"), 0.0);
    }
}
