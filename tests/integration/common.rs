//! Test support: every test gets its own MySQL database and its own Redis key prefix on the
//! machine's services, and fault tests start private servers they can kill.

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use commerce_worker::config::{Config, SecretUrl};
use commerce_worker::keys::KeyTemplates;
use fred::prelude::*;
use sqlx::MySqlPool;

pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Server URL without a database.
pub fn mysql_server_url() -> String {
    std::env::var("TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A unique, short name for this test's database and key prefix.
pub fn unique_name() -> String {
    format!(
        "cwt_{}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        uuid::Uuid::new_v4()
            .simple()
            .to_string()
            .get(..6)
            .unwrap_or("x")
    )
}

/// An isolated environment: a migrated database, a key prefix, a spill directory and a config
/// pointing at all three.
pub struct TestEnv {
    pub name: String,
    pub config: Config,
    pub redis: Client,
    pub mysql: MySqlPool,
    pub dir: tempfile::TempDir,
}

pub fn base_config(redis: &str, mysql_url: &str, spill_dir: &Path, prefix: &str) -> Config {
    let mut config = Config::from_toml_str("", Path::new("test.toml"), |_| None)
        .unwrap_or_else(|e| panic!("{e}"));
    config.redis.url = SecretUrl::new(redis);
    config.mysql.url = SecretUrl::new(mysql_url);
    config.keys = KeyTemplates::default().with_prefix(prefix);
    config.ranking_log.spill_dir = spill_dir.to_owned();
    config.http.listen = "127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}"));
    config
}

impl TestEnv {
    pub async fn new() -> Self {
        Self::with_servers(&redis_url(), &mysql_server_url()).await
    }

    pub async fn with_servers(redis: &str, mysql_server: &str) -> Self {
        let name = unique_name();
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let db_url = format!("{mysql_server}/{name}");
        let config = base_config(
            redis,
            &db_url,
            &dir.path().join("spill"),
            &format!("{name}:"),
        );
        commerce_worker::backends::migrate(&config.mysql)
            .await
            .unwrap_or_else(|e| panic!("migrate: {e:#}"));
        let redis = commerce_worker::backends::connect_redis(&config.redis)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mysql = commerce_worker::backends::connect_mysql(&config.mysql)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        Self {
            name,
            config,
            redis,
            mysql,
            dir,
        }
    }

    pub fn keys(&self) -> &KeyTemplates {
        &self.config.keys
    }

    /// Writes the config to a file for tests that run the binary.
    pub fn config_file(&self, http_port: u16) -> PathBuf {
        let path = self.dir.path().join("worker.toml");
        let keys: String = self
            .config
            .keys
            .entries()
            .into_iter()
            .map(|(k, v)| format!("{k} = {v:?}\n"))
            .collect();
        let text = format!(
            "[redis]\nurl = {:?}\n[mysql]\nurl = {:?}\n[keys]\n{keys}[ranking_log]\nspill_dir = {:?}\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n[log]\nformat = \"text\"\n",
            self.config.redis.url.expose(),
            self.config.mysql.url.expose(),
            self.config.ranking_log.spill_dir.display().to_string(),
        );
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
        path
    }

    pub async fn count(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&self.mysql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Drops the database and deletes the keys.
    pub async fn cleanup(self) {
        // SCAN on every primary and UNLINK key by key on a cluster, as the worker's sandbox does.
        let keys = commerce_worker::backends::scan_keys(&self.redis, &format!("{}:*", self.name))
            .await
            .unwrap_or_default();
        let _ = commerce_worker::backends::unlink_keys(&self.redis, &keys).await;
        self.mysql.close().await;
        if let Ok(pool) = MySqlPool::connect(&mysql_server_url()).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS `{}`",
                self.name
            )))
            .execute(&pool)
            .await;
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
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(sent.success());
}

/// Waits for `child` to exit; fails the test with `why` after `limit`.
pub async fn wait_exit(child: &mut Child, limit: Duration, why: &str) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap_or_else(|e| panic!("{e}")) {
            return status;
        }
        assert!(started.elapsed() < limit, "{why}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("{e}"))
}

fn wait_for_port(port: u16, timeout: Duration) {
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed() < timeout, "port {port} did not open");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGKILLs a private server and reaps it.
fn kill_child(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A private redis-server a test may stop and start.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<Child>,
    /// Where `SAVE` writes its snapshot and a restart loads it from (only with snapshots).
    dir: Option<tempfile::TempDir>,
}

impl PrivateRedis {
    pub fn start() -> Self {
        let mut redis = Self {
            port: free_port(),
            child: None,
            dir: None,
        };
        redis.resume();
        redis
    }

    /// A private Redis that loads `dump.rdb` from its own directory when (re)started: `SAVE`
    /// through [`Self::cli`], then [`Self::stop`] and [`Self::resume`] roll it back to the snapshot.
    pub fn with_snapshots() -> Self {
        let mut redis = Self {
            port: free_port(),
            child: None,
            dir: Some(tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"))),
        };
        redis.resume();
        redis
    }

    /// Runs `redis-cli` against this server; returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("redis-cli: {e}"));
        assert!(out.status.success(), "redis-cli {args:?} failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn resume(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(
                self.dir
                    .iter()
                    .flat_map(|d| [std::ffi::OsStr::new("--dir"), d.path().as_os_str()]),
            )
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("redis-server: {e}"));
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(10));
    }

    pub fn stop(&mut self) {
        kill_child(&mut self.child);
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
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut cluster = Self {
            ports: [free_port(), free_port(), free_port()],
            dir,
            children: [None, None, None],
        };
        for node in 0..3 {
            cluster.start_node(node);
        }
        let nodes: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let status = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("redis-cli --cluster create: {e}"));
        assert!(status.success(), "redis-cli --cluster create failed");
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

    fn start_node(&mut self, node: usize) {
        let port = self.ports[node].to_string();
        let child = Command::new("redis-server")
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
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("redis-server: {e}"));
        self.children[node] = Some(child);
        wait_for_port(self.ports[node], Duration::from_secs(10));
    }

    /// Waits until every node reports `cluster_state:ok`.
    pub fn wait_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for port in self.ports {
            loop {
                let out = Command::new("redis-cli")
                    .args(["-p", &port.to_string(), "cluster", "info"])
                    .output()
                    .unwrap_or_else(|e| panic!("{e}"));
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
        let slot = Command::new("redis-cli")
            .args(["-p", &port0, "cluster", "keyslot", key])
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        let slot: u16 = String::from_utf8_lossy(&slot.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        (0..3)
            .find(|&node| {
                let nodes = Command::new("redis-cli")
                    .args(["-p", &self.ports[node].to_string(), "cluster", "nodes"])
                    .output()
                    .unwrap_or_else(|e| panic!("{e}"));
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
        self.start_node(node);
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
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let status = Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.path().join("data").display()))
            .arg("--auth-root-authentication-method=normal")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("mariadb-install-db: {e}"));
        assert!(status.success(), "mariadb-install-db failed");
        let mut db = Self {
            port: free_port(),
            dir,
            child: None,
        };
        db.resume();
        db
    }

    pub fn server_url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}", self.port)
    }

    pub fn resume(&mut self) {
        let data = self.dir.path().join("data");
        let child = Command::new("mariadbd")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--port={}", self.port))
            .arg("--bind-address=127.0.0.1")
            .arg(format!(
                "--socket={}",
                self.dir.path().join("sock").display()
            ))
            .arg("--user=root")
            .arg("--innodb-buffer-pool-size=64M")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("mariadbd: {e}"));
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(30));
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

/// A coupon drain wired to a running ranking-log writer, as the daemon wires them.
/// The drain with its ranking-log writer, wired as `drain` wires it.
pub struct Pipeline(commerce_worker::app::LoggedDrain);

impl std::ops::Deref for Pipeline {
    type Target = commerce_worker::app::LoggedDrain;

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
        let backends = commerce_worker::app::Backends {
            redis,
            mysql: self.mysql.clone(),
        };
        Pipeline(
            commerce_worker::app::LoggedDrain::start(
                &self.config,
                &backends,
                &commerce_worker::metrics::Metrics::new(),
            )
            .unwrap_or_else(|e| panic!("{e:#}")),
        )
    }

    pub async fn enqueue(&self, entries: &[(f64, String)]) {
        for chunk in entries.chunks(1000) {
            let _: i64 = self
                .redis
                .zadd(
                    &self.keys().queue,
                    Some(SetOptions::NX),
                    None,
                    false,
                    false,
                    chunk.to_vec(),
                )
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }

    pub async fn set_stock(&self, coupon_id: i64, stock: &str) {
        let _: () = self
            .redis
            .set(self.keys().stock(coupon_id), stock, None, None, false)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

impl Pipeline {
    /// Stops the log writer after it wrote everything; returns rows written.
    pub async fn finish(self) -> u64 {
        self.0.finish_writing().await.rows_written
    }
}
