//! `[ranking_log]`: the channel and writer that put one row per decided request in MySQL.

use std::num::NonZeroUsize;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::read::Problems;
use super::units::{millis, nonzero};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RankingLogConfig {
    /// Rows read from the Redis log streams and not yet written, at most.
    #[serde(default = "default_channel_capacity")]
    pub channel_capacity: NonZeroUsize,
    /// Rows per INSERT statement.
    #[serde(default = "default_batch_size")]
    pub batch_size: NonZeroUsize,
    /// How long the writer waits to fill a statement.
    #[serde(
        rename = "flush_interval_ms",
        with = "millis",
        default = "default_flush_interval"
    )]
    pub flush_interval: Duration,
    /// Attempts at an entry the server keeps rejecting (not an outage) before its rows move to
    /// the `<log>:dead` stream in Redis.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
}

fn default_channel_capacity() -> NonZeroUsize {
    const { nonzero(65_536) }
}

fn default_batch_size() -> NonZeroUsize {
    const { nonzero(1000) }
}

fn default_flush_interval() -> Duration {
    Duration::from_millis(200)
}

fn default_max_attempts() -> u32 {
    10
}

impl RankingLogConfig {
    pub(super) fn validate(&self, problems: &mut Problems) {
        problems.range(
            "ranking_log.channel_capacity",
            self.channel_capacity.get() as u64,
            1..=16 * 1024 * 1024,
        );
        problems.range(
            "ranking_log.batch_size",
            self.batch_size.get() as u64,
            1..=10_000,
        );
        problems.range(
            "ranking_log.flush_interval_ms",
            self.flush_interval.as_millis() as u64,
            1..=600_000,
        );
        problems.range(
            "ranking_log.max_attempts",
            self.max_attempts.into(),
            1..=1_000_000,
        );
    }
}
