//! Test support: every test gets its own MySQL database and its own Redis key prefix on the
//! machine's services, and fault tests start private servers they can kill.

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use commerce_worker::config::{Config, SecretUrl};
use commerce_worker::keys::KeyTemplates;
use commerce_worker::tools::fault_proxy::FaultProxy;
use commerce_worker::tools::sandbox::Sandbox;
use fred::prelude::*;

pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Server URL without a database.
pub fn mysql_server_url() -> String {
    std::env::var("TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
}

/// The `host:port` of a `scheme://[user@]host:port[/…]` URL, resolved: where a fault proxy in
/// front of that server connects.
fn server_addr(url: &str) -> std::net::SocketAddr {
    use std::net::ToSocketAddrs;
    url.split_once("://")
        .map_or(url, |(_, rest)| rest)
        .rsplit('@')
        .next()
        .and_then(|rest| rest.split('/').next())
        .and_then(|host_port| host_port.to_socket_addrs().ok()?.next())
        .unwrap_or_else(|| panic!("cannot resolve the server of {url}"))
}

/// The test Redis' address, for a fault proxy in front of it.
pub fn redis_addr() -> std::net::SocketAddr {
    server_addr(&redis_url())
}

/// The test MySQL server's address, for a fault proxy in front of it.
pub fn mysql_addr() -> std::net::SocketAddr {
    server_addr(&mysql_server_url())
}

/// An isolated environment: the worker's own [`Sandbox`] (a migrated database and a key prefix,
/// with a config pointing at both), plus a directory for the files a test
/// writes. Reads as the sandbox: `env.config`, `env.redis`, `env.mysql`, `env.name`.
pub struct TestEnv {
    sandbox: Sandbox,
    pub dir: tempfile::TempDir,
}

impl std::ops::Deref for TestEnv {
    type Target = Sandbox;

    fn deref(&self) -> &Sandbox {
        &self.sandbox
    }
}

impl std::ops::DerefMut for TestEnv {
    fn deref_mut(&mut self) -> &mut Sandbox {
        &mut self.sandbox
    }
}

pub fn base_config(redis: &str, mysql_url: &str, prefix: &str) -> Config {
    let mut config = Config::from_toml_str("", Path::new("test.toml"), |_| None).unwrap();
    config.redis.url = SecretUrl::new(redis);
    config.mysql.url = SecretUrl::new(mysql_url);
    config.keys = KeyTemplates::default().with_prefix(prefix);
    config.http.listen = "127.0.0.1:0".parse().unwrap();
    config
}

impl TestEnv {
    pub async fn new() -> Self {
        Self::with_servers(&redis_url(), &mysql_server_url()).await
    }

    pub async fn with_servers(redis: &str, mysql_server: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // The sandbox takes the servers from here and puts its own prefix and database in.
        let base = base_config(redis, &format!("{mysql_server}/unused"), "");
        let sandbox = Sandbox::create(&base, "test")
            .await
            .expect("creating the test's sandbox");
        Self { sandbox, dir }
    }

    /// A pool on this environment's database that connects through `proxy` (a fault proxy in
    /// front of [`mysql_addr`]).
    pub async fn mysql_through(&self, proxy: &FaultProxy) -> sqlx::MySqlPool {
        let mut mysql = self.config.mysql.clone();
        mysql.url = SecretUrl::new(format!("mysql://root@{}/{}", proxy.addr(), self.name));
        commerce_worker::backends::connect_mysql(&mysql)
            .await
            .unwrap()
    }

    /// A Redis client that connects through `proxy` (a fault proxy in front of [`redis_addr`]).
    pub async fn redis_through(&self, proxy: &FaultProxy) -> Client {
        let mut redis = self.config.redis.clone();
        redis.url = SecretUrl::new(format!("redis://{}", proxy.addr()));
        commerce_worker::backends::connect_redis(&redis)
            .await
            .unwrap()
    }

    pub fn keys(&self) -> &KeyTemplates {
        &self.config.keys
    }

    /// Writes the config to a file for tests that run the binary. HTTP listens on port 0: the
    /// daemon binds a free port and logs it ([`Daemon::start`] reads it from there).
    pub fn config_file(&self) -> PathBuf {
        let path = self.dir.path().join("worker.toml");
        let keys: String = self
            .config
            .keys
            .entries()
            .into_iter()
            .map(|(k, v)| format!("{k} = {v:?}\n"))
            .collect();
        let text = format!(
            "[redis]\nurl = {:?}\n[mysql]\nurl = {:?}\n[keys]\n{keys}[http]\nlisten = \"127.0.0.1:0\"\n[log]\nformat = \"text\"\n",
            self.config.redis.url.expose(),
            self.config.mysql.url.expose(),
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    /// [`Self::config_file`] with `extra` TOML appended (sections the base file leaves out).
    pub fn config_file_with(&self, extra: &str) -> PathBuf {
        let mut text = std::fs::read_to_string(self.config_file()).unwrap();
        text.push_str(extra);
        let path = self.dir.path().join("worker-extra.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    pub async fn count(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&self.mysql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Deletes the keys and drops the database (the sandbox's
    /// cleanup). A failure is reported but does not fail the test: it only leaves litter.
    pub async fn cleanup(self) {
        if let Err(e) = self.sandbox.cleanup().await {
            eprintln!("test cleanup incomplete: {e:#}");
        }
    }
}

/// The worker binary built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_commerce-worker");

/// `commerce-worker drain --config <config>`, quiet.
pub fn drain_command(config: &Path) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(["drain", "--config"])
        .arg(config)
        .env("RUST_LOG", "off")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

/// Sends SIGTERM to a running binary, as systemd and Kubernetes do.
pub fn sigterm(child: &Child) {
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// Waits for `child` to exit; fails the test with `why` after `limit`.
pub async fn wait_exit(child: &mut Child, limit: Duration, why: &str) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(started.elapsed() < limit, "{why}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `command` to its exit; fails the test with `why` after `limit`.
pub async fn run_to_exit(
    command: &mut Command,
    limit: Duration,
    why: &str,
) -> std::process::ExitStatus {
    let mut child = command.spawn().unwrap();
    wait_exit(&mut child, limit, why).await
}

/// Runs `command` with its output captured; fails the test with `what` after `limit` (and kills
/// the process).
pub fn output_within(command: &mut Command, limit: Duration, what: &str) -> std::process::Output {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(output) => output.unwrap_or_else(|e| panic!("{what}: {e}")),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("timed out after {limit:?} waiting for {what} to finish")
        }
    }
}

/// Starts `command` `rounds` times and SIGKILLs it each time the queue (every lane) has shrunk
/// by another tenth of `total`: kills land at points of progress, not after fixed delays, since
/// the drain's speed varies with the machine and each kill must land while work is left.
/// Returns how many kills landed while the process was still running.
pub async fn sigkill_at_progress(
    env: &TestEnv,
    mut command: impl FnMut() -> Command,
    rounds: u64,
    total: u64,
) -> u64 {
    let mut kills = 0;
    for round in 1..=rounds {
        let mut child = command().spawn().unwrap();
        let kill_below = total.saturating_sub(round * total / 10);
        let started = Instant::now();
        loop {
            let left = commerce_worker::tools::simulated_api::queued(&env.redis, env.keys())
                .await
                .unwrap();
            if left <= kill_below || child.try_wait().unwrap().is_some() {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "timed out waiting for the queue to shrink below {kill_below} (round {round}, {left} left)"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if child.try_wait().unwrap().is_none() {
            kills += 1;
        }
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
    }
    kills
}

/// A port on 127.0.0.1 where nothing answers, for as long as the returned socket lives: bound but
/// not listening, so connections are refused and no other process can take the port meanwhile.
pub fn closed_port() -> (tokio::net::TcpSocket, u16) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(([127, 0, 0, 1], 0).into()).unwrap();
    let port = socket.local_addr().unwrap().port();
    (socket, port)
}

/// A port free now, chosen at random below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`), where neither an outgoing connection nor a `bind(0)` is
/// ever given a port: a private server a test kills and restarts on its port finds it free
/// again (unless another test drew the same port meanwhile). Another process may take it before
/// a server binds it, so every server started on it goes through [`spawn_ready`], which sees the
/// bind fail, and [`start_on_free_port`] then tries another port.
fn free_port() -> u16 {
    use std::hash::BuildHasher;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let (low, high) = (10_000_u16, ephemeral.max(10_001));
    for attempt in 0..1000_u64 {
        // A fresh RandomState is seeded differently each time: a random draw without a crate.
        let draw = std::collections::hash_map::RandomState::new().hash_one(attempt);
        let port = low + (draw % u64::from(high - low)) as u16;
        if StdListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {low}..{high} after 1000 draws")
}

/// How many ports a private server tries before the test gives up.
const BIND_ATTEMPTS: usize = 5;

/// Drops ANSI colour codes from a log line.
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ parameters, then a final byte in '@'..='~'.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Spawns `command` with stdout (or stderr) piped and waits until a line of it contains `ready`:
/// the server itself says it listens (a port that merely opens may belong to someone else). The
/// rest of the output is drained in the background. `Err` with the output's last lines when the
/// process ends first (a failed bind, say); a panic naming `what` after `limit`.
fn spawn_ready(
    command: &mut Command,
    stderr: bool,
    ready: &'static str,
    what: &str,
    limit: Duration,
) -> Result<(Child, String), String> {
    use std::io::BufRead;
    if stderr {
        command.stderr(Stdio::piped());
    } else {
        command.stdout(Stdio::piped());
    }
    let mut child = command.spawn().unwrap_or_else(|e| panic!("{what}: {e}"));
    let output: Box<dyn std::io::Read + Send> = match (child.stderr.take(), child.stdout.take()) {
        (Some(err), _) if stderr => Box::new(err),
        (_, Some(out)) if !stderr => Box::new(out),
        _ => panic!("{what}: no output to read"),
    };
    let (tx, rx) = std::sync::mpsc::channel::<Result<String, String>>();
    std::thread::spawn(move || {
        let mut tail: Vec<String> = Vec::new();
        let mut told = false;
        for line in std::io::BufReader::new(output).lines() {
            let Ok(line) = line else { break };
            if told {
                continue;
            }
            let line = plain(&line);
            if line.contains(ready) {
                told = true;
                let _ = tx.send(Ok(line));
            } else {
                tail.push(line);
                if tail.len() > 10 {
                    tail.remove(0);
                }
            }
        }
        if !told {
            let _ = tx.send(Err(tail.join("\n")));
        }
    });
    match rx.recv_timeout(limit) {
        Ok(Ok(line)) => Ok((child, line)),
        Ok(Err(tail)) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(tail)
        }
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("timed out after {limit:?} waiting for {what} to say {ready:?}")
        }
    }
}

/// Starts a server on a free port, and on another one when the bind fails (another process took
/// the port between [`free_port`] and the server's bind). Returns the child and its port.
fn start_on_free_port(
    what: &str,
    mut start: impl FnMut(u16) -> Result<Child, String>,
) -> (Child, u16) {
    let mut failures = Vec::new();
    for _ in 0..BIND_ATTEMPTS {
        let port = free_port();
        match start(port) {
            Ok(child) => return (child, port),
            Err(tail) => failures.push(format!("port {port}: {tail}")),
        }
    }
    panic!(
        "{what} did not start in {BIND_ATTEMPTS} attempts:\n{}",
        failures.join("\n")
    )
}

/// The worker daemon (`run`) started from a config file, with the HTTP port it bound.
pub struct Daemon {
    pub child: Child,
    pub port: u16,
}

impl Daemon {
    /// `commerce-worker run --config <config>` with `envs`; waits for its "running" log line and
    /// reads the port it listens on from it.
    pub fn start(config: &Path, envs: &[(&str, &str)]) -> Self {
        Self::start_in(config, envs, None)
    }

    /// [`Daemon::start`] with `dir` as the working directory (a pod's, deleted with it).
    pub fn start_in(config: &Path, envs: &[(&str, &str)], dir: Option<&Path>) -> Self {
        let mut command = Command::new(BIN);
        if let Some(dir) = dir {
            command.current_dir(dir);
        }
        command
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn,commerce_worker::app=info")
            .envs(envs.iter().copied())
            .stdout(Stdio::null());
        let (child, line) = spawn_ready(
            &mut command,
            true,
            "commerce-worker running",
            "the daemon",
            Duration::from_secs(60),
        )
        .unwrap_or_else(|tail| panic!("the daemon exited before running:\n{tail}"));
        let port = line
            .split_whitespace()
            .find_map(|field| field.strip_prefix("listen="))
            .and_then(|addr| addr.parse::<std::net::SocketAddr>().ok())
            .map(|addr| addr.port())
            .unwrap_or_else(|| panic!("no listen= in the daemon's line: {line}"));
        Self { child, port }
    }
}

impl Daemon {
    /// SIGTERM, as systemd and Kubernetes stop it; the exit status, within 30 s (the shutdown
    /// deadline is 25 s) or the test fails.
    pub async fn stop(&mut self) -> std::process::ExitStatus {
        sigterm(&self.child);
        wait_exit(
            &mut self.child,
            Duration::from_secs(30),
            "the daemon did not exit within 30 s of SIGTERM",
        )
        .await
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SIGKILLs a private server and reaps it.
fn kill_child(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// What redis-server logs once it accepts connections.
const REDIS_READY: &str = "Ready to accept connections";

/// A private redis-server a test may stop and start.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<Child>,
    /// Where `SAVE` writes its snapshot and a restart loads it from (only with snapshots).
    dir: Option<tempfile::TempDir>,
    /// With an append-only file (`everysec`) in `dir` ([`Self::with_aof`]).
    aof: bool,
}

impl PrivateRedis {
    pub fn start() -> Self {
        // Its own directory even without snapshots: a replica writes the RDB it receives there,
        // never into the test's working directory.
        Self::start_in(Some(tempfile::tempdir().unwrap()))
    }

    fn start_in(dir: Option<tempfile::TempDir>) -> Self {
        Self::start_with(dir, false)
    }

    fn start_with(dir: Option<tempfile::TempDir>, aof: bool) -> Self {
        let path = dir.as_ref().map(|d| d.path().to_owned());
        let (child, port) = start_on_free_port("redis-server", |port| {
            Self::spawn(port, path.as_deref(), aof)
        });
        Self {
            port,
            child: Some(child),
            dir,
            aof,
        }
    }

    fn spawn(port: u16, dir: Option<&Path>, aof: bool) -> Result<Child, String> {
        let mut command = Command::new("redis-server");
        command.args(["--port", &port.to_string(), "--bind", "127.0.0.1"]);
        if aof {
            // As production runs it: every write appended, fsynced every second; no rewrite in
            // the background (a snapshot copies the files while Redis runs); a copy ending in
            // half a command loads up to it.
            command
                .args([
                    "--save",
                    "",
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "everysec",
                ])
                .args(["--appenddirname", "appendonlydir"])
                .args(["--auto-aof-rewrite-percentage", "0"])
                .args(["--aof-load-truncated", "yes"]);
        } else {
            command.args(["--save", "", "--appendonly", "no"]);
        }
        if let Some(dir) = dir {
            command.arg("--dir").arg(dir);
        }
        spawn_ready(
            &mut command,
            false,
            REDIS_READY,
            "redis-server",
            Duration::from_secs(10),
        )
        .map(|(child, _)| child)
    }

    /// A private Redis that loads `dump.rdb` from its own directory when (re)started: `SAVE`
    /// through [`Self::cli`], then [`Self::stop`] and [`Self::resume`] roll it back to the snapshot.
    pub fn with_snapshots() -> Self {
        Self::start_in(Some(tempfile::tempdir().unwrap()))
    }

    /// A private Redis with an append-only file (`everysec`): [`Self::copy_aof`] keeps the file
    /// as it is, [`Self::roll_back_to`] SIGKILLs the server and restarts it from such a copy —
    /// every write after the copy is gone, a Redis restarted from an older AOF.
    pub fn with_aof() -> Self {
        Self::start_with(Some(tempfile::tempdir().unwrap()), true)
    }

    fn aof_dir(&self) -> PathBuf {
        assert!(self.aof, "a Redis started with_aof");
        self.dir.as_ref().unwrap().path().join("appendonlydir")
    }

    /// Copies the append-only file into `name` (beside it), once Redis has written every reply
    /// it sent to the file (with `everysec` it may hold writes back for up to two seconds while
    /// an fsync runs; the copy is then of a known state).
    pub fn copy_aof(&self, name: &str) {
        let started = std::time::Instant::now();
        while !self
            .cli(&["INFO", "persistence"])
            .lines()
            .any(|l| l.trim() == "aof_buffer_length:0")
        {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "Redis did not write its AOF buffer within 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let from = self.aof_dir();
        let to = from.with_file_name(name);
        std::fs::create_dir_all(&to).unwrap();
        for entry in std::fs::read_dir(&from).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }

    /// SIGKILL, then a restart on the same port from the copy `name` made by [`Self::copy_aof`].
    pub fn roll_back_to(&mut self, name: &str) {
        self.stop();
        let aof = self.aof_dir();
        std::fs::remove_dir_all(&aof).unwrap();
        let copy = aof.with_file_name(name);
        std::fs::create_dir_all(&aof).unwrap();
        for entry in std::fs::read_dir(&copy).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), aof.join(entry.file_name())).unwrap();
        }
        self.resume();
    }

    /// Runs `redis-cli` against this server; returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = output_within(
            Command::new("redis-cli")
                .args(["-p", &self.port.to_string()])
                .args(args),
            Duration::from_secs(60),
            "redis-cli",
        );
        assert!(out.status.success(), "redis-cli {args:?} failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server again on its port (after [`Self::stop`]).
    pub fn resume(&mut self) {
        let dir = self.dir.as_ref().map(|d| d.path().to_owned());
        let child = Self::spawn(self.port, dir.as_deref(), self.aof).unwrap_or_else(|tail| {
            panic!(
                "redis-server did not restart on port {}:\n{tail}",
                self.port
            )
        });
        self.child = Some(child);
    }

    pub fn stop(&mut self) {
        kill_child(&mut self.child);
    }

    /// SIGSTOP: the server keeps its connections open and answers nothing (a frozen host, a
    /// long fork or swap storm) until [`Self::thaw`].
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`Self::freeze`].
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("the private Redis is running");
        let sent = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill {signal} redis-server");
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A private Redis Cluster of three primaries (no replicas) started by the test. Each node keeps
/// an append-only file fsynced on every write, so a primary killed and restarted comes back with
/// its data, as a production primary with persistence would.
pub struct PrivateCluster {
    pub ports: [u16; 3],
    dir: tempfile::TempDir,
    children: [Option<Child>; 3],
}

impl PrivateCluster {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = Self {
            ports: [0; 3],
            dir,
            children: [None, None, None],
        };
        for node in 0..3 {
            let (child, port) = start_on_free_port("a cluster node", |port| {
                Self::spawn_node(cluster.dir.path(), port)
            });
            cluster.ports[node] = port;
            cluster.children[node] = Some(child);
        }
        let nodes: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let created = output_within(
            Command::new("redis-cli")
                .args(["--cluster", "create"])
                .args(&nodes)
                .args(["--cluster-replicas", "0", "--cluster-yes"]),
            Duration::from_secs(60),
            "redis-cli --cluster create",
        );
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        cluster.wait_ok();
        cluster
    }

    /// `redis-cluster://` URL naming every node.
    pub fn url(&self) -> String {
        format!(
            "redis-cluster://127.0.0.1:{}?node=127.0.0.1:{}&node=127.0.0.1:{}",
            self.ports[0], self.ports[1], self.ports[2]
        )
    }

    fn spawn_node(dir: &Path, port: u16) -> Result<Child, String> {
        let port = port.to_string();
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &port, "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .args(["--appendfilename", &format!("aof-{port}.aof")])
            .args(["--appenddirname", &format!("aof-{port}")])
            .arg("--dir")
            .arg(dir);
        spawn_ready(
            &mut command,
            false,
            REDIS_READY,
            "a cluster node",
            Duration::from_secs(10),
        )
        .map(|(child, _)| child)
    }

    /// Waits until every node reports `cluster_state:ok`.
    pub fn wait_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for port in self.ports {
            loop {
                let out = output_within(
                    Command::new("redis-cli").args(["-p", &port.to_string(), "cluster", "info"]),
                    Duration::from_secs(60),
                    "redis-cli",
                );
                if String::from_utf8_lossy(&out.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "cluster never became ok");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// The node serving `key`'s slot.
    pub fn node_of(&self, key: &str) -> usize {
        let port0 = self.ports[0].to_string();
        let slot = output_within(
            Command::new("redis-cli").args(["-p", &port0, "cluster", "keyslot", key]),
            Duration::from_secs(60),
            "redis-cli",
        );
        let slot: u16 = String::from_utf8_lossy(&slot.stdout)
            .trim()
            .parse()
            .unwrap();
        (0..3)
            .find(|&node| {
                let nodes = output_within(
                    Command::new("redis-cli").args([
                        "-p",
                        &self.ports[node].to_string(),
                        "cluster",
                        "nodes",
                    ]),
                    Duration::from_secs(60),
                    "redis-cli",
                );
                // `CLUSTER NODES`: this node's line is marked `myself`; from the 9th field on
                // come its slot ranges.
                String::from_utf8_lossy(&nodes.stdout).lines().any(|line| {
                    line.contains("myself")
                        && line.split_whitespace().skip(8).any(|range| {
                            let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                            match (lo.parse::<u16>(), hi.parse::<u16>()) {
                                (Ok(lo), Ok(hi)) => (lo..=hi).contains(&slot),
                                _ => false,
                            }
                        })
                })
            })
            .unwrap_or_else(|| panic!("no node serves slot {slot}"))
    }

    /// SIGKILLs one primary.
    pub fn kill(&mut self, node: usize) {
        kill_child(&mut self.children[node]);
    }

    /// Restarts a killed primary from its append-only file and waits for the cluster.
    pub fn restart(&mut self, node: usize) {
        let port = self.ports[node];
        let child = Self::spawn_node(self.dir.path(), port)
            .unwrap_or_else(|tail| panic!("cluster node on port {port} did not restart:\n{tail}"));
        self.children[node] = Some(child);
        self.wait_ok();
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            kill_child(child);
        }
    }
}

/// A private mariadbd with its own data directory, which a test may kill and restart.
pub struct PrivateMariadb {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl PrivateMariadb {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let installed = output_within(
            Command::new("mariadb-install-db")
                .arg("--no-defaults")
                .arg(format!("--datadir={}", dir.path().join("data").display()))
                .arg("--auth-root-authentication-method=normal")
                // Its own temporary directory: others' cleaning of /tmp has broken a bootstrap.
                .arg(format!("--tmpdir={}", dir.path().display())),
            Duration::from_secs(120),
            "mariadb-install-db",
        );
        assert!(
            installed.status.success(),
            "mariadb-install-db failed: {}",
            String::from_utf8_lossy(&installed.stderr)
        );
        let (child, port) = start_on_free_port("mariadbd", |port| Self::spawn(dir.path(), port));
        Self {
            port,
            dir,
            child: Some(child),
        }
    }

    pub fn server_url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}", self.port)
    }

    fn spawn(dir: &Path, port: u16) -> Result<Child, String> {
        let mut command = Command::new("mariadbd");
        command
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.join("data").display()))
            .arg(format!("--port={port}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--socket={}", dir.join("sock").display()))
            .arg("--user=root")
            .arg("--innodb-buffer-pool-size=64M")
            .arg(format!("--tmpdir={}", dir.display()))
            .stdout(Stdio::null());
        spawn_ready(
            &mut command,
            true,
            "ready for connections",
            "mariadbd",
            Duration::from_secs(60),
        )
        .map(|(child, _)| child)
    }

    /// Starts the server again on its port and data (after [`Self::kill`]).
    pub fn resume(&mut self) {
        let child = Self::spawn(self.dir.path(), self.port).unwrap_or_else(|tail| {
            panic!("mariadbd did not restart on port {}:\n{tail}", self.port)
        });
        self.child = Some(child);
    }

    /// SIGKILL: no chance to close connections cleanly.
    pub fn kill(&mut self) {
        kill_child(&mut self.child);
    }
}

impl Drop for PrivateMariadb {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn eventually(timeout: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    loop {
        if check().await {
            return;
        }
        assert!(started.elapsed() < timeout, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET path` on 127.0.0.1:port with an `Accept` header: (status code, headers and body), or
/// (0, "") when nothing answers.
pub fn http_get(port: u16, path: &str, accept: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    );
    if stream.write_all(request.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    (code, response)
}

/// The coupon job (drain, persister, ranking-log pipeline), wired as every command wires it.
pub struct Pipeline(commerce_worker::app::CouponJob);

impl std::ops::Deref for Pipeline {
    type Target = commerce_worker::app::CouponJob;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl TestEnv {
    pub fn pipeline(&self) -> Pipeline {
        self.pipeline_on(self.redis.clone())
    }

    /// A pipeline with its own Redis client (a replica of the worker, in effect).
    pub fn pipeline_on(&self, redis: Client) -> Pipeline {
        self.pipeline_with(redis, &commerce_worker::metrics::Metrics::new())
    }

    /// [`Self::pipeline_on`] recording into `metrics`, which the test reads.
    pub fn pipeline_with(
        &self,
        redis: Client,
        metrics: &commerce_worker::metrics::Metrics,
    ) -> Pipeline {
        let backends = commerce_worker::app::Backends {
            redis,
            mysql: self.mysql.clone(),
        };
        Pipeline(commerce_worker::app::CouponJob::start(
            &self.config,
            &backends,
            metrics,
        ))
    }

    /// A Redis client to `url` with this environment's settings (another server, e.g. a
    /// promoted replica).
    pub async fn redis_at(&self, url: &str) -> Client {
        let mut redis = self.config.redis.clone();
        redis.url = SecretUrl::new(url);
        commerce_worker::backends::connect_redis(&redis)
            .await
            .unwrap()
    }

    /// `ZADD key NX` of `entries`, 1000 at a time, as the API writes; returns how many were new.
    pub async fn zadd_nx(&self, key: &str, entries: &[(f64, String)]) -> i64 {
        self.zadd_with(key, Some(SetOptions::NX), entries).await
    }

    /// `ZADD key` of `entries` (scores replaced), 1000 at a time; returns how many were new.
    pub async fn zadd(&self, key: &str, entries: &[(f64, String)]) -> i64 {
        self.zadd_with(key, None, entries).await
    }

    async fn zadd_with(
        &self,
        key: &str,
        options: Option<SetOptions>,
        entries: &[(f64, String)],
    ) -> i64 {
        let mut added = 0;
        for chunk in entries.chunks(1000) {
            let n: i64 = self
                .redis
                .zadd(key, options.clone(), None, false, false, chunk.to_vec())
                .await
                .unwrap();
            added += n;
        }
        added
    }

    /// Requests into the queue (ZADD NX); returns how many were new.
    pub async fn enqueue(&self, entries: &[(f64, String)]) -> i64 {
        self.zadd_nx(&self.keys().queue, entries).await
    }

    /// Switches to the per-coupon key layout (a queue, outbox, dead-letter and log stream per
    /// coupon) under this environment's prefix.
    pub fn use_per_coupon_layout(&mut self) {
        self.config.keys =
            KeyTemplates::per_coupon_layout().with_prefix(&format!("{}:", self.name));
    }

    /// Adds `coupons` to the per-coupon layout's registry, as the API does.
    pub async fn register(&self, coupons: impl IntoIterator<Item = i64>) {
        let coupons: Vec<i64> = coupons.into_iter().collect();
        let _: u64 = self
            .redis
            .sadd(&self.keys().coupon_registry, coupons)
            .await
            .unwrap();
    }

    pub async fn set_stock(&self, coupon_id: i64, stock: &str) {
        let _: () = self
            .redis
            .set(self.keys().stock(coupon_id), stock, None, None, false)
            .await
            .unwrap();
    }

    /// Damages `key` the way an operator's typo or another program would: a string where the
    /// worker expects a set, sorted set or stream, so every command on it fails with WRONGTYPE.
    pub async fn put_wrong_type(&self, key: impl Into<fred::types::Key> + Send) {
        let _: () = self
            .redis
            .set(key, "oops", None, None, false)
            .await
            .unwrap();
    }
}

/// How long a test gives a drain (queue and outbox) or the log writer before it fails: ample for
/// the tests' sales on a loaded machine, short enough that a stuck job fails instead of hanging.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(120);

/// A drain running in the background, as another replica's would.
pub struct DrainTask(tokio::task::JoinHandle<commerce_worker::coupon::DrainReport>);

impl DrainTask {
    pub fn is_finished(&self) -> bool {
        self.0.is_finished()
    }

    /// The drain's report once it has emptied the queue and the outbox; fails the test naming
    /// `what` after `limit`.
    pub async fn within(self, limit: Duration, what: &str) -> commerce_worker::coupon::DrainReport {
        tokio::time::timeout(limit, self.0)
            .await
            .unwrap_or_else(|_| panic!("timed out after {limit:?} waiting for {what}"))
            .expect("the drain task panicked")
    }
}

impl Pipeline {
    /// Decides until the queue is empty and waits until the outbox is persisted
    /// (`CouponDrain::drain_to_empty`); fails the test naming `what` after `limit`.
    pub async fn drain_within(
        &self,
        limit: Duration,
        what: &str,
    ) -> commerce_worker::coupon::DrainReport {
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::time::timeout(limit, self.drain.drain_to_empty(&stop))
            .await
            .unwrap_or_else(|_| {
                panic!("timed out after {limit:?} waiting for the queue and the outbox to empty: {what}")
            })
    }

    /// [`Self::drain_within`] in the background.
    pub fn spawn_drain(&self) -> DrainTask {
        let drain = self.drain.clone();
        DrainTask(tokio::spawn(async move {
            drain
                .drain_to_empty(&tokio_util::sync::CancellationToken::new())
                .await
        }))
    }

    /// One tick of the drain with a 10 s budget.
    pub async fn tick(
        &self,
        stop: &tokio_util::sync::CancellationToken,
    ) -> commerce_worker::coupon::DrainReport {
        self.drain
            .tick(Duration::from_secs(10), stop)
            .await
            .unwrap()
    }

    /// Stops the job without waiting for its log rows (they stay in Redis, handed back): for a
    /// replica whose rows can never be written, such as one left on a demoted primary.
    pub async fn abandon(self) {
        let grace = tokio::time::Instant::now() + Duration::from_secs(10);
        let _ = self.0.shutdown(grace).await;
    }

    /// Stops the job once every log row waiting in Redis is written; returns the rows this
    /// job's writer wrote. Fails the test when they are not written within [`DRAIN_LIMIT`].
    pub async fn finish(self) -> u64 {
        self.0
            .finish_writing(DRAIN_LIMIT)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
            .rows_written
    }
}

/// A private primary, a replica that reaches it through a fault proxy (so the test can make it
/// fall behind), and one Sentinel with a password of its own, all on loopback. (Sentinel points
/// a replica that names another master address back at the primary only after the failover
/// timeout, set long here so the replica stays behind the proxy.)
pub struct PrivateSentinelSet {
    pub primary: PrivateRedis,
    pub replica_port: u16,
    replica: Option<Child>,
    pub sentinel_port: u16,
    sentinel: Option<Child>,
    /// Between the replica and the primary.
    pub link: commerce_worker::tools::fault_proxy::FaultProxy,
    _dir: tempfile::TempDir,
}

pub const SENTINEL_PASSWORD: &str = "sentinel-secret";

/// `redis-cli -p port <options> <args>`: its output, whatever its exit status (a server that is
/// down answers nothing); fails the test if it does not return within 60 s.
fn redis_cli(port: u16, options: &[&str], args: &[&str]) -> String {
    let out = output_within(
        Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(options)
            .args(args),
        Duration::from_secs(60),
        "redis-cli",
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl PrivateSentinelSet {
    pub async fn start() -> Self {
        let primary = PrivateRedis::start();
        let link = commerce_worker::tools::fault_proxy::FaultProxy::start(
            format!("127.0.0.1:{}", primary.port).parse().unwrap(),
        )
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let upstream = link.addr().port().to_string();
        let (replica, replica_port) = start_on_free_port("the replica", |port| {
            let mut command = Command::new("redis-server");
            command
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--replicaof", "127.0.0.1", &upstream])
                .arg("--dir")
                .arg(dir.path());
            spawn_ready(
                &mut command,
                false,
                REDIS_READY,
                "the replica",
                Duration::from_secs(10),
            )
            .map(|(child, _)| child)
        });
        let (sentinel, sentinel_port) = start_on_free_port("the sentinel", |port| {
            // Sentinel rewrites its file: a fresh one per attempt.
            let conf = dir.path().join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\nrequirepass {SENTINEL_PASSWORD}\n\
                     sentinel monitor mymaster 127.0.0.1 {} 1\n\
                     sentinel down-after-milliseconds mymaster 1000\n\
                     sentinel failover-timeout mymaster 180000\n",
                    dir.path().display(),
                    primary.port
                ),
            )
            .unwrap();
            let mut command = Command::new("redis-server");
            command.arg(&conf).arg("--sentinel");
            // Logged once it listens and monitors the primary.
            spawn_ready(
                &mut command,
                false,
                "+monitor master mymaster",
                "the sentinel",
                Duration::from_secs(10),
            )
            .map(|(child, _)| child)
        });
        let set = Self {
            primary,
            replica_port,
            replica: Some(replica),
            sentinel_port,
            sentinel: Some(sentinel),
            link,
            _dir: dir,
        };
        set.wait_until("the replica is in sync and known to the sentinel", || {
            set.replica_cli(&["INFO", "replication"])
                .contains("master_link_status:up")
                && set
                    .sentinel_cli(&["SENTINEL", "replicas", "mymaster"])
                    .contains(&replica_port.to_string())
        });
        set
    }

    /// `redis-sentinel://` URL with the sentinel's password.
    pub fn url(&self) -> String {
        format!(
            "redis-sentinel://127.0.0.1:{}?sentinelServiceName=mymaster&sentinelPassword={SENTINEL_PASSWORD}",
            self.sentinel_port
        )
    }

    pub fn replica_cli(&self, args: &[&str]) -> String {
        redis_cli(self.replica_port, &[], args)
    }

    pub fn sentinel_cli(&self, args: &[&str]) -> String {
        redis_cli(
            self.sentinel_port,
            &["--no-auth-warning", "-a", SENTINEL_PASSWORD],
            args,
        )
    }

    /// Polls `done` every 100 ms; fails naming `what` after 60 s, with what each server and the
    /// Sentinel said of replication at that moment (a flaky wait is then explained by its log).
    pub fn wait_until(&self, what: &str, done: impl Fn() -> bool) {
        let started = Instant::now();
        while !done() {
            if started.elapsed() >= Duration::from_secs(60) {
                panic!(
                    "timed out waiting until {what}\n{}",
                    self.replication_picture()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `INFO replication` of both servers and the Sentinel's view of the set.
    fn replication_picture(&self) -> String {
        let primary = redis_cli(self.primary.port, &[], &["INFO", "replication"]);
        let replica = self.replica_cli(&["INFO", "replication"]);
        let master = self.sentinel_cli(&["SENTINEL", "master", "mymaster"]);
        let replicas = self.sentinel_cli(&["SENTINEL", "replicas", "mymaster"]);
        format!(
            "old primary (port {}):\n{primary}\nreplica (port {}):\n{replica}\n\
             sentinel's master:\n{master}\nsentinel's replicas:\n{replicas}",
            self.primary.port, self.replica_port
        )
    }

    /// SIGKILLs the primary and waits until the sentinel promoted the replica.
    pub fn kill_primary_and_fail_over(&mut self) {
        self.primary.stop();
        let port = self.replica_port.to_string();
        self.wait_until("the sentinel promoted the replica", || {
            self.sentinel_cli(&["SENTINEL", "get-master-addr-by-name", "mymaster"])
                .contains(&port)
                && self
                    .replica_cli(&["INFO", "replication"])
                    .contains("role:master")
        });
    }
}

impl PrivateSentinelSet {
    /// Restarts the killed primary (empty: no persistence) and waits until Sentinel made it a
    /// replica of the promoted one, in sync.
    pub fn restart_old_primary_as_replica(&mut self) {
        self.primary.resume();
        let port = self.primary.port;
        // Sentinel reconfigures a returning old primary on its own, but only when its failover
        // timeout allows (set long in this set so it does not re-point the stale replica), which
        // made this wait flaky: point it at the promoted replica ourselves, as Sentinel would.
        let replica_port = self.replica_port.to_string();
        self.wait_until("the old primary answers", || {
            redis_cli(port, &[], &["REPLICAOF", "127.0.0.1", &replica_port]).contains("OK")
        });
        // Whatever re-points it meanwhile (a Sentinel acting on an older view of the set), it is
        // pointed at the promoted replica again every few seconds until the link is up.
        let last_pointed = std::cell::Cell::new(Instant::now());
        self.wait_until("the old primary is the new primary's replica", || {
            let linked = self
                .replica_cli(&["INFO", "replication"])
                .contains("connected_slaves:1")
                && redis_cli(port, &[], &["INFO", "replication"]).contains("master_link_status:up");
            if !linked && last_pointed.get().elapsed() > Duration::from_secs(5) {
                redis_cli(port, &[], &["REPLICAOF", "127.0.0.1", &replica_port]);
                last_pointed.set(Instant::now());
            }
            linked
        });
    }
}

impl Drop for PrivateSentinelSet {
    fn drop(&mut self) {
        kill_child(&mut self.sentinel);
        kill_child(&mut self.replica);
    }
}
