//! `[status]`: when `commerce-worker status` says a person is needed (exit 1).

use serde::{Deserialize, Serialize};

use super::read::Problems;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// The oldest request waiting in a queue longer than this many seconds.
    #[serde(default = "default_oldest_waiting_secs")]
    pub oldest_waiting_secs: u64,
    /// An issued coupon waiting in an outbox (not yet in MySQL) longer than this many seconds.
    #[serde(default = "default_outbox_oldest_secs")]
    pub outbox_oldest_secs: u64,
    /// More dead letters than this (0: any).
    #[serde(default)]
    pub dead_letters: u64,
    /// More ranking-log rows waiting for MySQL than this.
    #[serde(default = "default_log_backlog")]
    pub log_backlog: u64,
    /// More entries in the ranking-log dead-letter streams (`<log>:dead`, rows MySQL rejected
    /// for good) than this (0: any).
    #[serde(default)]
    pub log_dead_letters: u64,
    /// No drain run recorded by any replica for this many seconds.
    #[serde(default = "default_drain_silent_secs")]
    pub drain_silent_secs: u64,
    /// The live ranking older than this many hours (or none built).
    #[serde(default = "default_ranking_max_age_hours")]
    pub ranking_max_age_hours: u64,
    /// A pause flag set for longer than this many seconds (a forgotten pause).
    #[serde(default = "default_paused_max_secs")]
    pub paused_max_secs: u64,
    /// Fewer live replicas than this.
    #[serde(default = "default_min_replicas")]
    pub min_replicas: u64,
}

impl Default for StatusConfig {
    fn default() -> Self {
        Self {
            oldest_waiting_secs: default_oldest_waiting_secs(),
            outbox_oldest_secs: default_outbox_oldest_secs(),
            dead_letters: 0,
            log_backlog: default_log_backlog(),
            log_dead_letters: 0,
            drain_silent_secs: default_drain_silent_secs(),
            ranking_max_age_hours: default_ranking_max_age_hours(),
            paused_max_secs: default_paused_max_secs(),
            min_replicas: default_min_replicas(),
        }
    }
}

fn default_oldest_waiting_secs() -> u64 {
    60
}

fn default_outbox_oldest_secs() -> u64 {
    300
}

fn default_log_backlog() -> u64 {
    100_000
}

fn default_drain_silent_secs() -> u64 {
    120
}

fn default_ranking_max_age_hours() -> u64 {
    25
}

fn default_paused_max_secs() -> u64 {
    3600
}

fn default_min_replicas() -> u64 {
    1
}

impl StatusConfig {
    pub(super) fn validate(&self, problems: &mut Problems) {
        // A ranking is rebuilt once a day: under a day, every status would need a person.
        problems.range(
            "status.ranking_max_age_hours",
            self.ranking_max_age_hours,
            24..=24 * 366,
        );
        problems.range(
            "status.drain_silent_secs",
            self.drain_silent_secs,
            1..=86_400 * 7,
        );
    }
}
