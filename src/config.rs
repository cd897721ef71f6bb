//! Configuration: `worker.toml` turned into a validated [`Config`].
//!
//! Loading happens in two steps, as in ripgrep and vector: the file is parsed into a raw TOML
//! table, then every known key is read, range-checked and converted (durations to `Duration`,
//! cron expressions parsed, the timezone resolved). Every problem — a typo'd key, a wrong type, an
//! out-of-range number, a bad cron expression — is collected, so one `check-config` run reports
//! all of them, each naming the file and the key. Unknown sections and keys are errors: a typo
//! must never silently fall back to a default.
//!
//! `REDIS_URL` and `DATABASE_URL` override the two URLs so secrets need not live in the file; the
//! environment is read through a function the caller passes, so tests feed it a map.
//!
//! URLs are held as [`SecretUrl`]: `Debug` and `Display` redact the password, and the only way to
//! get the real string is [`SecretUrl::expose`], used where a client is built.

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use chrono_tz::Tz;
use serde::de::DeserializeOwned;
use toml::{Table, Value};

use crate::keys::KeyTemplates;

/// The validated configuration every part of the worker reads.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this configuration was read from (for messages only).
    pub source: PathBuf,
    pub redis: RedisConfig,
    pub mysql: MysqlConfig,
    pub keys: KeyTemplates,
    pub coupon: CouponConfig,
    pub ranking: RankingConfig,
    pub ranking_log: RankingLogConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
    pub shutdown: ShutdownConfig,
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: SecretUrl,
}

impl RedisConfig {
    /// A `redis-cluster://` or `rediss-cluster://` URL.
    pub fn is_cluster(&self) -> bool {
        let url = self.url.expose();
        url.starts_with("redis-cluster://") || url.starts_with("rediss-cluster://")
    }
}

#[derive(Debug, Clone)]
pub struct MysqlConfig {
    pub url: SecretUrl,
    /// Size of the connection pool shared by the coupon persister, the ranking-log writer and
    /// the readiness probe.
    pub max_connections: u32,
}

#[derive(Debug, Clone)]
pub struct CouponConfig {
    pub schedule: CronSchedule,
    /// Queue entries decided by one Lua call.
    pub batch_size: NonZeroUsize,
    /// A tick stops taking new batches once this much time has passed.
    pub tick_budget: Duration,
}

#[derive(Debug, Clone)]
pub struct RankingConfig {
    pub schedule: CronSchedule,
    pub timezone: Tz,
    pub window_days: u32,
    /// Per-day weights, newest day first; `window_days` long. `None` means all 1.0.
    pub weights: Option<Vec<f64>>,
    /// Above this many members summed over the window's daily keys, the rebuild uses the
    /// chunked strategy instead of one blocking ZUNIONSTORE.
    pub chunked_threshold: u64,
}

impl RankingConfig {
    /// The weight of the day `days_back` days before the rebuild's day (0 = that day).
    pub fn weight(&self, days_back: usize) -> f64 {
        self.weights
            .as_ref()
            .and_then(|w| w.get(days_back).copied())
            .unwrap_or(1.0)
    }
}

#[derive(Debug, Clone)]
pub struct RankingLogConfig {
    pub channel_capacity: NonZeroUsize,
    pub batch_size: NonZeroUsize,
    pub flush_interval: Duration,
    /// Where rows go when the channel is full, and where rows that could not be written before
    /// shutdown wait for the next start.
    pub spill_dir: PathBuf,
    /// Attempts at a batch the server keeps rejecting (not an outage) before its rows are given
    /// up and written to the rejected file.
    pub max_attempts: u32,
}

#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    /// An `EnvFilter` directive such as `info` or `commerce_worker=debug,info`.
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone)]
pub struct ShutdownConfig {
    pub timeout: Duration,
}

/// A 6-field cron expression (seconds first), checked with the same parser settings the
/// scheduler uses, so an expression that loads is one the scheduler accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronSchedule(String);

impl CronSchedule {
    pub fn parse(expression: &str) -> Result<Self, String> {
        let fields = expression.split_whitespace().count();
        if !(6..=7).contains(&fields) {
            return Err(format!(
                "`{expression}` has {fields} fields; expected 6 (sec min hour day month weekday)"
            ));
        }
        croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Required)
            .dom_and_dow(true)
            .build()
            .parse(expression)
            .map_err(|e| format!("`{expression}` is not a valid cron expression: {e}"))?;
        Ok(Self(expression.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A connection URL whose password never reaches a log line or `check-config`'s output.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The real URL, password included: only for building a client.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with its password (if any) replaced by `***`.
    pub fn redacted(&self) -> String {
        match url::Url::parse(&self.0) {
            Ok(mut parsed) => {
                if parsed.password().is_some() {
                    // `set_password` only fails for URLs that cannot have one, which we just
                    // saw has one.
                    let _ = parsed.set_password(Some("***"));
                }
                parsed.to_string()
            }
            // Unparseable: we cannot tell where a password would be, so show nothing of it.
            Err(_) => "<unparseable url>".to_owned(),
        }
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `section.key`, or the section alone for an unknown section.
    pub key: String,
    pub message: String,
}

/// Everything wrong with one configuration file. Displays as one line per problem.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.problems.len();
        write!(
            f,
            "invalid configuration in {}: {count} problem{}",
            self.file.display(),
            if count == 1 { "" } else { "s" }
        )?;
        for problem in &self.problems {
            if problem.key.is_empty() {
                write!(f, "\n  {}: {}", self.file.display(), problem.message)?;
            } else {
                write!(
                    f,
                    "\n  {}: `{}`: {}",
                    self.file.display(),
                    problem.key,
                    problem.message
                )?;
            }
        }
        Ok(())
    }
}

/// Default values, in one place so `worker.toml`'s comments and the code can be compared.
pub mod defaults {
    pub const REDIS_URL: &str = "redis://127.0.0.1:6379";
    pub const MYSQL_URL: &str = "mysql://root@127.0.0.1:3306/commerce";
    pub const MYSQL_MAX_CONNECTIONS: u32 = 8;
    pub const COUPON_SCHEDULE: &str = "*/5 * * * * *";
    pub const COUPON_BATCH_SIZE: usize = 1000;
    pub const COUPON_TICK_BUDGET_MS: u64 = 4000;
    pub const RANKING_SCHEDULE: &str = "0 0 0 * * *";
    pub const RANKING_TIMEZONE: &str = "Asia/Seoul";
    pub const RANKING_WINDOW_DAYS: u32 = 3;
    pub const RANKING_CHUNKED_THRESHOLD: u64 = 100_000;
    pub const LOG_CHANNEL_CAPACITY: usize = 65_536;
    pub const LOG_BATCH_SIZE: usize = 1000;
    pub const LOG_FLUSH_INTERVAL_MS: u64 = 200;
    pub const LOG_SPILL_DIR: &str = "var/spill";
    pub const LOG_MAX_ATTEMPTS: u32 = 10;
    pub const HTTP_LISTEN: &str = "0.0.0.0:9090";
    pub const LOG_LEVEL: &str = "info";
    pub const SHUTDOWN_TIMEOUT_SECS: u64 = 25;
}

/// The largest coupon batch: the Lua script unpacks argument lists onto Lua's C stack, which
/// holds about 8000 slots.
pub const MAX_COUPON_BATCH_SIZE: usize = 5000;

impl Config {
    /// Reads and validates `path`, with `env` supplying `REDIS_URL` and `DATABASE_URL`.
    pub fn load(path: &Path, env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            problems: vec![Problem {
                key: String::new(),
                message: format!("cannot read the file: {e}"),
            }],
        })?;
        Self::from_toml_str(&text, path, env)
    }

    /// Validates configuration text; `path` is used in messages only.
    pub fn from_toml_str(
        text: &str,
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let fail = |problems| ConfigError {
            file: path.to_owned(),
            problems,
        };
        let root: Table = text.parse().map_err(|e: toml::de::Error| {
            fail(vec![Problem {
                key: String::new(),
                message: format!("not valid TOML: {}", e.message()),
            }])
        })?;
        let mut reader = Reader {
            root,
            problems: Vec::new(),
        };
        let config = reader.read_all(path, &env);
        reader.report_unknown_sections();
        if reader.problems.is_empty() {
            Ok(config)
        } else {
            Err(fail(reader.problems))
        }
    }

    /// The effective configuration as TOML, with secrets redacted: what `check-config` prints.
    pub fn to_redacted_toml(&self) -> String {
        let mut out = String::new();
        let quote = |s: &str| Value::String(s.to_owned()).to_string();
        let mut section = |name: &str, entries: Vec<(&str, String)>| {
            out.push_str(&format!("[{name}]\n"));
            for (key, value) in entries {
                out.push_str(&format!("{key} = {value}\n"));
            }
            out.push('\n');
        };
        section("redis", vec![("url", quote(&self.redis.url.redacted()))]);
        section(
            "mysql",
            vec![
                ("url", quote(&self.mysql.url.redacted())),
                ("max_connections", self.mysql.max_connections.to_string()),
            ],
        );
        section(
            "keys",
            self.keys
                .entries()
                .into_iter()
                .map(|(k, v)| (k, quote(v)))
                .collect(),
        );
        section(
            "coupon",
            vec![
                ("schedule", quote(self.coupon.schedule.as_str())),
                ("batch_size", self.coupon.batch_size.to_string()),
                (
                    "tick_budget_ms",
                    self.coupon.tick_budget.as_millis().to_string(),
                ),
            ],
        );
        let mut ranking = vec![
            ("schedule", quote(self.ranking.schedule.as_str())),
            ("timezone", quote(self.ranking.timezone.name())),
            ("window_days", self.ranking.window_days.to_string()),
            (
                "chunked_threshold",
                self.ranking.chunked_threshold.to_string(),
            ),
        ];
        if let Some(weights) = &self.ranking.weights {
            let list: Vec<String> = weights.iter().map(|w| format!("{w:?}")).collect();
            ranking.push(("weights", format!("[{}]", list.join(", "))));
        }
        section("ranking", ranking);
        section(
            "ranking_log",
            vec![
                (
                    "channel_capacity",
                    self.ranking_log.channel_capacity.to_string(),
                ),
                ("batch_size", self.ranking_log.batch_size.to_string()),
                (
                    "flush_interval_ms",
                    self.ranking_log.flush_interval.as_millis().to_string(),
                ),
                (
                    "spill_dir",
                    quote(&self.ranking_log.spill_dir.display().to_string()),
                ),
                ("max_attempts", self.ranking_log.max_attempts.to_string()),
            ],
        );
        section(
            "http",
            vec![("listen", quote(&self.http.listen.to_string()))],
        );
        section(
            "log",
            vec![
                ("level", quote(&self.log.level)),
                (
                    "format",
                    quote(match self.log.format {
                        LogFormat::Json => "json",
                        LogFormat::Text => "text",
                    }),
                ),
            ],
        );
        section(
            "shutdown",
            vec![("timeout_secs", self.shutdown.timeout.as_secs().to_string())],
        );
        out.trim_end().to_owned() + "\n"
    }
}

/// Walks the raw table section by section, taking each known key out of it; whatever is left
/// at the end is unknown.
struct Reader {
    root: Table,
    problems: Vec<Problem>,
}

/// One section's remaining keys.
struct Section {
    name: &'static str,
    table: Table,
}

impl Reader {
    fn problem(&mut self, key: String, message: impl Into<String>) {
        self.problems.push(Problem {
            key,
            message: message.into(),
        });
    }

    fn section(&mut self, name: &'static str) -> Section {
        let table = match self.root.remove(name) {
            None => Table::new(),
            Some(Value::Table(table)) => table,
            Some(other) => {
                self.problem(
                    name.to_owned(),
                    format!("expected a section, found a {}", other.type_str()),
                );
                Table::new()
            }
        };
        Section { name, table }
    }

    /// Takes `key` out of `section`, or `None` when absent or of the wrong type (recorded).
    fn take<T: DeserializeOwned>(&mut self, section: &mut Section, key: &str) -> Option<T> {
        let value = section.table.remove(key)?;
        let shown_type = value.type_str();
        match T::deserialize(value) {
            Ok(v) => Some(v),
            Err(e) => {
                let detail = e.message().to_owned();
                self.problem(
                    format!("{}.{key}", section.name),
                    format!("wrong type ({shown_type}): {detail}"),
                );
                None
            }
        }
    }

    /// Takes an integer in `range`, or records why not and returns the default.
    fn take_int(
        &mut self,
        section: &mut Section,
        key: &str,
        default: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> u64 {
        let Some(value) = self.take::<i64>(section, key) else {
            return default;
        };
        match u64::try_from(value) {
            Ok(v) if range.contains(&v) => v,
            _ => {
                self.problem(
                    format!("{}.{key}", section.name),
                    format!(
                        "{value} is out of range (allowed: {} to {})",
                        range.start(),
                        range.end()
                    ),
                );
                default
            }
        }
    }

    fn take_nonzero(
        &mut self,
        section: &mut Section,
        key: &str,
        default: usize,
        max: usize,
    ) -> NonZeroUsize {
        let value = self.take_int(section, key, default as u64, 1..=max as u64);
        NonZeroUsize::new(value as usize)
            .or(NonZeroUsize::new(default))
            .unwrap_or(NonZeroUsize::MIN)
    }

    fn take_string(&mut self, section: &mut Section, key: &str, default: &str) -> String {
        self.take::<String>(section, key)
            .unwrap_or_else(|| default.to_owned())
    }

    fn take_schedule(&mut self, section: &mut Section, default: &str) -> CronSchedule {
        let expression = self.take_string(section, "schedule", default);
        match CronSchedule::parse(&expression) {
            Ok(schedule) => schedule,
            Err(message) => {
                self.problem(format!("{}.schedule", section.name), message);
                CronSchedule(default.to_owned())
            }
        }
    }

    /// Reports keys nobody took.
    fn finish(&mut self, section: Section) {
        for key in section.table.keys() {
            self.problem(format!("{}.{key}", section.name), "unknown key".to_owned());
        }
    }

    fn report_unknown_sections(&mut self) {
        let names: Vec<String> = self.root.keys().cloned().collect();
        for name in names {
            self.problem(name, "unknown section");
        }
    }

    fn url(
        &mut self,
        section: &mut Section,
        env_name: &str,
        env: &impl Fn(&str) -> Option<String>,
        default: &str,
        schemes: &[&str],
    ) -> SecretUrl {
        let from_file = self.take_string(section, "url", default);
        let (raw, origin) = match env(env_name).filter(|v| !v.is_empty()) {
            Some(value) => (value, format!(" (from {env_name})")),
            None => (from_file, String::new()),
        };
        let key = format!("{}.url", section.name);
        match url::Url::parse(&raw) {
            // The url crate's messages never echo the input, so no password leaks here.
            Err(e) => self.problem(key, format!("not a valid URL{origin}: {e}")),
            Ok(parsed) if !schemes.contains(&parsed.scheme()) => self.problem(
                key,
                format!(
                    "unsupported scheme `{}`{origin}; expected one of: {}",
                    parsed.scheme(),
                    schemes.join(", ")
                ),
            ),
            Ok(_) => {}
        }
        SecretUrl(raw)
    }

    fn read_all(&mut self, path: &Path, env: &impl Fn(&str) -> Option<String>) -> Config {
        let mut s = self.section("redis");
        let redis_url = self.url(
            &mut s,
            "REDIS_URL",
            env,
            defaults::REDIS_URL,
            &[
                "redis",
                "rediss",
                "redis-cluster",
                "rediss-cluster",
                "redis-sentinel",
                "rediss-sentinel",
            ],
        );
        if let Err(e) = fred::prelude::Config::from_url(redis_url.expose()) {
            // fred's parse errors describe the part that is wrong, not the URL itself.
            self.problem(
                "redis.url".to_owned(),
                format!("rejected by the client: {e}"),
            );
        }
        self.finish(s);
        let redis = RedisConfig { url: redis_url };
        let cluster = redis.is_cluster();

        let mut s = self.section("mysql");
        let mysql_url = self.url(
            &mut s,
            "DATABASE_URL",
            env,
            defaults::MYSQL_URL,
            &["mysql", "mariadb"],
        );
        if url::Url::parse(mysql_url.expose())
            .map(|u| u.path().trim_start_matches('/').is_empty())
            .unwrap_or(false)
        {
            self.problem(
                "mysql.url".to_owned(),
                "names no database (expected mysql://user@host:port/DATABASE)",
            );
        }
        let max_connections = self.take_int(
            &mut s,
            "max_connections",
            defaults::MYSQL_MAX_CONNECTIONS as u64,
            2..=1000,
        ) as u32;
        self.finish(s);
        let mysql = MysqlConfig {
            url: mysql_url,
            max_connections,
        };

        let mut s = self.section("keys");
        let mut keys = KeyTemplates::default();
        for (name, slot) in keys.entries_mut() {
            if let Some(template) = self.take::<String>(&mut s, name) {
                *slot = template;
            }
        }
        for (key, message) in keys.validate() {
            self.problem(format!("keys.{key}"), message);
        }
        if cluster {
            for (key, message) in keys.cluster_problems() {
                self.problem(format!("keys.{key}"), message);
            }
        }
        self.finish(s);

        let mut s = self.section("coupon");
        let coupon = CouponConfig {
            schedule: self.take_schedule(&mut s, defaults::COUPON_SCHEDULE),
            batch_size: self.take_nonzero(
                &mut s,
                "batch_size",
                defaults::COUPON_BATCH_SIZE,
                MAX_COUPON_BATCH_SIZE,
            ),
            tick_budget: Duration::from_millis(self.take_int(
                &mut s,
                "tick_budget_ms",
                defaults::COUPON_TICK_BUDGET_MS,
                1..=3_600_000,
            )),
        };
        self.finish(s);

        let mut s = self.section("ranking");
        let schedule = self.take_schedule(&mut s, defaults::RANKING_SCHEDULE);
        let tz_name = self.take_string(&mut s, "timezone", defaults::RANKING_TIMEZONE);
        let timezone = Tz::from_str(&tz_name).unwrap_or_else(|_| {
            self.problem(
                "ranking.timezone".to_owned(),
                format!("`{tz_name}` is not an IANA timezone name (e.g. `Asia/Seoul`, `UTC`)"),
            );
            Tz::UTC
        });
        let window_days = self.take_int(
            &mut s,
            "window_days",
            defaults::RANKING_WINDOW_DAYS as u64,
            1..=366,
        ) as u32;
        let weights = self.take::<Vec<f64>>(&mut s, "weights");
        if let Some(weights) = &weights {
            if weights.len() != window_days as usize {
                self.problem(
                    "ranking.weights".to_owned(),
                    format!(
                        "has {} entries but window_days is {window_days}; give one weight per day, newest first",
                        weights.len()
                    ),
                );
            }
            if weights.iter().any(|w| !w.is_finite() || *w < 0.0) {
                self.problem(
                    "ranking.weights".to_owned(),
                    "weights must be finite and not negative",
                );
            }
        }
        let chunked_threshold = self.take_int(
            &mut s,
            "chunked_threshold",
            defaults::RANKING_CHUNKED_THRESHOLD,
            0..=u64::MAX >> 1,
        );
        self.finish(s);
        let ranking = RankingConfig {
            schedule,
            timezone,
            window_days,
            weights,
            chunked_threshold,
        };

        let mut s = self.section("ranking_log");
        let ranking_log = RankingLogConfig {
            channel_capacity: self.take_nonzero(
                &mut s,
                "channel_capacity",
                defaults::LOG_CHANNEL_CAPACITY,
                16 * 1024 * 1024,
            ),
            batch_size: self.take_nonzero(&mut s, "batch_size", defaults::LOG_BATCH_SIZE, 10_000),
            flush_interval: Duration::from_millis(self.take_int(
                &mut s,
                "flush_interval_ms",
                defaults::LOG_FLUSH_INTERVAL_MS,
                1..=600_000,
            )),
            spill_dir: PathBuf::from(self.take_string(
                &mut s,
                "spill_dir",
                defaults::LOG_SPILL_DIR,
            )),
            max_attempts: self.take_int(
                &mut s,
                "max_attempts",
                defaults::LOG_MAX_ATTEMPTS as u64,
                1..=1_000_000,
            ) as u32,
        };
        self.finish(s);

        let mut s = self.section("http");
        let listen_text = self.take_string(&mut s, "listen", defaults::HTTP_LISTEN);
        let listen = listen_text.parse().unwrap_or_else(|_| {
            self.problem(
                "http.listen".to_owned(),
                format!("`{listen_text}` is not an address like `0.0.0.0:9090`"),
            );
            SocketAddr::from(([0, 0, 0, 0], 9090))
        });
        self.finish(s);
        let http = HttpConfig { listen };

        let mut s = self.section("log");
        let level = self.take_string(&mut s, "level", defaults::LOG_LEVEL);
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&level) {
            self.problem("log.level".to_owned(), format!("`{level}`: {e}"));
        }
        let format_text = self.take_string(&mut s, "format", "json");
        let format = match format_text.as_str() {
            "json" => LogFormat::Json,
            "text" => LogFormat::Text,
            other => {
                self.problem(
                    "log.format".to_owned(),
                    format!("`{other}` is not one of: json, text"),
                );
                LogFormat::Json
            }
        };
        self.finish(s);
        let log = LogConfig { level, format };

        let mut s = self.section("shutdown");
        let shutdown = ShutdownConfig {
            timeout: Duration::from_secs(self.take_int(
                &mut s,
                "timeout_secs",
                defaults::SHUTDOWN_TIMEOUT_SECS,
                1..=3600,
            )),
        };
        self.finish(s);

        Config {
            source: path.to_owned(),
            redis,
            mysql,
            keys,
            coupon,
            ranking,
            ranking_log,
            http,
            log,
            shutdown,
        }
    }
}

/// Reads the process environment: the `env` argument of [`Config::load`] in production.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, Path::new("worker.toml"), |_| None)
    }

    #[test]
    fn an_empty_file_gives_the_documented_defaults() {
        let config = load("").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.coupon.batch_size.get(), defaults::COUPON_BATCH_SIZE);
        assert_eq!(config.ranking.window_days, 3);
        assert_eq!(config.ranking.timezone, chrono_tz::Asia::Seoul);
        assert_eq!(config.shutdown.timeout, Duration::from_secs(25));
        assert_eq!(config.keys.queue, "coupon:queue");
    }

    #[test]
    fn a_cluster_url_requires_coupon_keys_in_one_hash_slot() {
        let err = load(
            r#"
            [redis]
            url = "redis-cluster://127.0.0.1:7000?node=127.0.0.1:7001"
            "#,
        )
        .err()
        .unwrap_or_else(|| panic!("default keys cannot work on a cluster"));
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, vec!["keys.queue"]);

        let config = load(
            r#"
            [redis]
            url = "redis-cluster://127.0.0.1:7000"
            [keys]
            queue = "{coupon}:queue"
            stock = "{coupon}:stock:{couponId}"
            issued = "{coupon}:issued:{couponId}"
            seq = "{coupon}:seq:{couponId}"
            result = "{coupon}:result:{couponId}"
            dead = "{coupon}:dead"
            outbox = "{coupon}:outbox"
            "#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(config.redis.is_cluster());
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_key() {
        let err = load(
            r#"
            [coupon]
            batch_size = 0
            shedule = "*/5 * * * * *"
            [ranking]
            timezone = "Mars/Olympus"
            window_days = 0
            schedule = "0 0 * * *"
            [logs]
            level = "info"
            "#,
        )
        .err()
        .unwrap_or_else(|| panic!("config should be rejected"));
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        for expected in [
            "coupon.batch_size",
            "coupon.shedule",
            "ranking.timezone",
            "ranking.window_days",
            "ranking.schedule",
            "logs",
        ] {
            assert!(keys.contains(&expected), "{expected} missing from {keys:?}");
        }
        let shown = err.to_string();
        assert!(shown.contains("worker.toml"), "{shown}");
        assert!(shown.contains("6 problems"), "{shown}");
    }

    #[test]
    fn weights_must_match_the_window() {
        let err = load("[ranking]\nwindow_days = 3\nweights = [1.0, 0.5]\n")
            .err()
            .unwrap_or_else(|| panic!("should be rejected"));
        assert_eq!(err.problems[0].key, "ranking.weights");
    }

    #[test]
    fn environment_overrides_the_urls() {
        let config = Config::from_toml_str(
            "[redis]\nurl = \"redis://file:6379\"\n[mysql]\nurl = \"mysql://file/db\"\n",
            Path::new("worker.toml"),
            |name| match name {
                "REDIS_URL" => Some("redis://env:6380".to_owned()),
                "DATABASE_URL" => Some("mysql://u:pw@env:3307/shop".to_owned()),
                _ => None,
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.redis.url.expose(), "redis://env:6380");
        assert_eq!(config.mysql.url.expose(), "mysql://u:pw@env:3307/shop");
    }

    #[test]
    fn passwords_are_redacted_everywhere_they_are_shown() {
        let config = Config::from_toml_str(
            "[redis]\nurl = \"redis://:hunter2@cache:6379\"\n",
            Path::new("worker.toml"),
            |name| (name == "DATABASE_URL").then(|| "mysql://app:s3cret@db/shop".to_owned()),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let shown = format!("{}\n{:?}", config.to_redacted_toml(), config);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("mysql://app:***@db/shop"), "{shown}");
    }

    #[test]
    fn redacted_output_loads_back_to_the_same_values() {
        let config = load("[ranking]\nweights = [1.0, 0.5, 0.25]\n[log]\nformat = \"text\"\n")
            .unwrap_or_else(|e| panic!("{e}"));
        let again = load(&config.to_redacted_toml()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(again.to_redacted_toml(), config.to_redacted_toml());
    }
}
