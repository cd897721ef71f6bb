//! Configuration: `worker.toml` turned into a validated [`Config`].
//!
//! The schema is the section structs, one file per section ([`RedisConfig`], [`MysqlConfig`],
//! [`KeyTemplates`], [`CouponConfig`], [`RankingConfig`], [`RankingLogConfig`], and the daemon's
//! [`HttpConfig`], [`LogConfig`], [`ShutdownConfig`], and `status`'s [`StatusConfig`]): each field carries its name in the file,
//! its default (a function beside the struct) and its doc. Sections are `deny_unknown_fields`:
//! a typo must never silently fall back to a default.
//!
//! Loading happens in two steps, as in ripgrep and vector: each section is deserialized through
//! its struct (`read.rs` tries every key alone when a section fails, so every problem in it is
//! found), then each section's `validate` checks ranges and what spans keys. Every problem — a
//! typo'd key, a wrong type, an out-of-range number, a bad cron expression — is collected, so one
//! `check-config` run reports all of them, each naming the file and the key.
//!
//! `REDIS_URL` and `DATABASE_URL` override the two URLs so secrets need not live in the file; the
//! environment is read through a function the caller passes, so tests feed it a map. URLs are
//! held as [`SecretUrl`]: shown only through [`redact_url`]. `check-config` prints the same
//! structs serialized ([`Config::to_redacted_toml`]).
//!
//! Adding a key: a field in its section's struct with `#[serde(default = "…")]`, its default
//! function, a line in the section's `validate` if it has a range, and its doc in `worker.toml`
//! and the README. Retiring one: remove the field and list it in [`DEPRECATED`] (still accepted,
//! with a warning).

mod coupon;
mod daemon;
mod mysql;
mod ranking;
mod ranking_log;
mod read;
mod redis;
mod schedule;
mod secret;
mod status;
mod units;

use std::path::{Path, PathBuf};

use serde::Serialize;
use toml::Table;

pub use self::coupon::{CouponConfig, MAX_COUPON_BATCH_SIZE};
pub use self::daemon::{HttpConfig, LogConfig, LogFormat, ShutdownConfig, default_timeout};
pub use self::mysql::MysqlConfig;
pub use self::ranking::RankingConfig;
pub use self::ranking_log::RankingLogConfig;
pub use self::read::{ConfigError, DEPRECATED, Deprecated, Problem};
pub use self::redis::RedisConfig;
pub use self::schedule::{CronSchedule, validate_schedule};
pub use self::secret::{SecretUrl, redact_url};
pub use self::status::StatusConfig;
use crate::keys::KeyTemplates;
use read::{Located, Problems, Reader};

/// The validated configuration every part of the worker reads. Serialized, it is the file
/// `check-config` prints (secrets redacted).
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// The file this configuration was read from (for messages only).
    #[serde(skip)]
    pub source: PathBuf,
    /// Things accepted but worth changing (deprecated keys), for the log once it is set up.
    #[serde(skip)]
    pub warnings: Vec<Problem>,
    pub redis: RedisConfig,
    pub mysql: MysqlConfig,
    pub keys: KeyTemplates,
    pub coupon: CouponConfig,
    pub ranking: RankingConfig,
    pub ranking_log: RankingLogConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
    pub shutdown: ShutdownConfig,
    pub status: StatusConfig,
}

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
        let mut reader = Reader::new(root, DEPRECATED);
        let sections = (
            reader.section::<RedisConfig>("redis"),
            reader.section::<MysqlConfig>("mysql"),
            reader.section::<KeyTemplates>("keys"),
            reader.section::<CouponConfig>("coupon"),
            reader.section::<RankingConfig>("ranking"),
            reader.section::<RankingLogConfig>("ranking_log"),
            reader.section::<HttpConfig>("http"),
            reader.section::<LogConfig>("log"),
            reader.section::<ShutdownConfig>("shutdown"),
            reader.section::<StatusConfig>("status"),
        );
        let (mut problems, warnings) = reader.finish();
        let (
            Some(mut redis),
            Some(mut mysql),
            Some(mut keys),
            Some(coupon),
            Some(ranking),
            Some(ranking_log),
            Some(http),
            Some(log),
            Some(shutdown),
            Some(status),
        ) = sections
        else {
            return Err(fail(problems.0));
        };
        let redis_origin = redis.override_from_env(&env);
        let mysql_origin = mysql.override_from_env(&env);
        redis.validate(&redis_origin, &mut problems);
        mysql.validate(&mysql_origin, &mut problems);
        if keys.log.is_empty() {
            // Not set: beside the queue, in its hash slot, so cluster layouts written before
            // the log stream existed keep working unchanged.
            keys.log = KeyTemplates::log_beside_queue(&keys.queue);
        }
        validate_keys(&keys, redis.is_cluster(), &mut problems);
        coupon.validate(&mut problems);
        ranking.validate(&mut problems);
        ranking_log.validate(&mut problems);
        log.validate(&mut problems);
        shutdown.validate(&mut problems);
        status.validate(&mut problems);
        if !problems.0.is_empty() {
            return Err(fail(problems.0));
        }
        Ok(Config {
            source: path.to_owned(),
            warnings: warnings.0,
            redis,
            mysql,
            keys,
            coupon,
            ranking,
            ranking_log,
            http,
            log,
            shutdown,
            status,
        })
    }

    /// The effective configuration as TOML, with secrets redacted: what `check-config` prints.
    pub fn to_redacted_toml(&self) -> String {
        // Every section serializes (strings, integers, floats, tables), so this cannot fail;
        // should it ever, say so instead of printing half a file.
        toml::to_string(self)
            .unwrap_or_else(|e| format!("# the configuration cannot be shown: {e}\n"))
    }

    /// The warnings, each with its file and key, one per line: for `check-config` and the log.
    pub fn warning_lines(&self) -> Vec<String> {
        self.warnings
            .iter()
            .map(|w| format!("warning: {}", Located(&self.source, w)))
            .collect()
    }
}

/// `[keys]`: the templates' own rules, and on Redis Cluster, the slots they hash to.
fn validate_keys(keys: &KeyTemplates, cluster: bool, problems: &mut Problems) {
    for (key, message) in keys.validate() {
        problems.push(format!("keys.{key}"), message);
    }
    if cluster {
        for (key, message) in keys.cluster_problems() {
            problems.push(format!("keys.{key}"), message);
        }
    }
}

/// Reads the process environment: the `env` argument of [`Config::load`] in production.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, Path::new("worker.toml"), |_| None)
    }

    #[test]
    fn the_retired_spill_dir_is_accepted_with_a_warning() {
        let config = load("[ranking_log]\nspill_dir = \"var/spill\"\n").unwrap();
        let lines = config.warning_lines();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("ranking_log.spill_dir"), "{lines:?}");
        assert!(lines[0].contains("Redis"), "{lines:?}");
    }

    #[test]
    fn the_log_stream_defaults_to_beside_the_queue_in_its_hash_slot() {
        assert_eq!(load("").map(|c| c.keys.log).ok(), Some("coupon:log".into()));
        let per_coupon = load("[keys]\nqueue = \"{coupon:{couponId}}:queue\"\nstock = \"{coupon:{couponId}}:stock\"\nissued = \"{coupon:{couponId}}:issued\"\nseq = \"{coupon:{couponId}}:seq\"\nresult = \"{coupon:{couponId}}:result\"\ndead = \"{coupon:{couponId}}:dead\"\noutbox = \"{coupon:{couponId}}:outbox\"\n")
            .unwrap();
        assert_eq!(per_coupon.keys.log, "{coupon:{couponId}}:log");
        let set = load("[keys]\nlog = \"my:log\"\n").unwrap();
        assert_eq!(set.keys.log, "my:log");
    }

    #[test]
    fn an_empty_file_gives_the_documented_defaults() {
        let config = load("").unwrap();
        assert_eq!(config.coupon.batch_size.get(), 1000);
        assert_eq!(config.ranking.window_days, 3);
        assert_eq!(config.ranking.timezone, chrono_tz::Asia::Seoul);
        assert_eq!(config.shutdown.timeout, Duration::from_secs(25));
        assert_eq!(config.keys.queue, "coupon:queue");
        // The defaults written in code are checked here, not when loaded.
        for schedule in [&config.coupon.schedule, &config.ranking.schedule] {
            assert_eq!(validate_schedule(schedule.as_str()), Ok(()));
        }
    }

    #[test]
    fn the_committed_worker_toml_states_the_defaults() {
        let empty = load("").unwrap();
        let committed = load(include_str!("../../worker.toml")).unwrap();
        assert_eq!(committed.to_redacted_toml(), empty.to_redacted_toml());
    }

    #[test]
    fn every_problem_in_one_section_is_reported_and_its_good_keys_kept() {
        let err = load("[ranking_log]\nbatch_size = \"big\"\nflush_interval_ms = -1\nspil_dir = \"x\"\nmax_attempts = 0\n")
            .err()
            .unwrap_or_else(|| panic!("should be rejected"));
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "ranking_log.batch_size",
                "ranking_log.flush_interval_ms",
                "ranking_log.spil_dir",
                "ranking_log.max_attempts"
            ]
        );
        assert!(
            err.problems[0].message.contains("wrong type (string)"),
            "{err}"
        );
        assert!(err.problems[2].message.contains("unknown"), "{err}");
        assert!(err.problems[3].message.contains("out of range"), "{err}");
    }

    #[test]
    fn a_deprecated_key_is_accepted_ignored_and_warned_about() {
        const RETIRED: &[Deprecated] = &[Deprecated {
            section: "coupon",
            key: "old_knob",
            note: "no longer needed; remove it",
        }];
        let mut reader = Reader::new(
            "[coupon]\nold_knob = 3\nbatch_size = 7\n".parse().unwrap(),
            RETIRED,
        );
        let coupon = reader.section::<CouponConfig>("coupon");
        let (problems, warnings) = reader.finish();
        assert_eq!(coupon.map(|c| c.batch_size.get()), Some(7));
        assert!(problems.0.is_empty(), "{problems:?}");
        assert_eq!(warnings.0.len(), 1);
        assert_eq!(warnings.0[0].key, "coupon.old_knob");
        assert!(warnings.0[0].message.contains("remove it"));
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
        .unwrap();
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
        .unwrap();
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
        .unwrap();
        let shown = format!("{}\n{:?}", config.to_redacted_toml(), config);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("mysql://app:***@db/shop"), "{shown}");
    }

    #[test]
    fn redacted_output_loads_back_to_the_same_values() {
        let config =
            load("[ranking]\nweights = [1.0, 0.5, 0.25]\n[log]\nformat = \"text\"\n").unwrap();
        let again = load(&config.to_redacted_toml()).unwrap();
        assert_eq!(again.to_redacted_toml(), config.to_redacted_toml());
    }
}
