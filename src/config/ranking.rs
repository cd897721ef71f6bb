//! `[ranking]`: the ranking rebuild's schedule, timezone, window and weights.

use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use super::read::Problems;
use super::schedule::CronSchedule;
use super::units::timezone;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RankingConfig {
    #[serde(default = "default_schedule")]
    pub schedule: CronSchedule,
    /// IANA name; days (and so daily key names) are calendar days here.
    #[serde(with = "timezone", default = "default_timezone")]
    pub timezone: Tz,
    /// The ranking sums days D-(window_days-1) .. D (1..366).
    #[serde(default = "default_window_days")]
    pub window_days: u32,
    /// Per-day weights, newest day first; `window_days` long. `None` means all 1.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<Vec<f64>>,
    /// Above this many members summed over the window's daily keys, the rebuild uses the
    /// chunked strategy instead of one blocking ZUNIONSTORE.
    #[serde(default = "default_chunked_threshold")]
    pub chunked_threshold: u64,
}

fn default_schedule() -> CronSchedule {
    CronSchedule::default_of("0 0 0 * * *")
}

fn default_timezone() -> Tz {
    chrono_tz::Asia::Seoul
}

fn default_window_days() -> u32 {
    3
}

fn default_chunked_threshold() -> u64 {
    100_000
}

impl RankingConfig {
    /// The weight of the day `days_back` days before the rebuild's day (0 = that day).
    pub fn weight(&self, days_back: usize) -> f64 {
        self.weights
            .as_ref()
            .and_then(|w| w.get(days_back).copied())
            .unwrap_or(1.0)
    }

    pub(super) fn validate(&self, problems: &mut Problems) {
        problems.range("ranking.window_days", self.window_days.into(), 1..=366);
        if let Some(weights) = &self.weights {
            if weights.len() != self.window_days as usize {
                problems.push(
                    "ranking.weights",
                    format!(
                        "has {} entries but window_days is {}; give one weight per day, newest first",
                        weights.len(),
                        self.window_days
                    ),
                );
            }
            if weights.iter().any(|w| !w.is_finite() || *w < 0.0) {
                problems.push("ranking.weights", "weights must be finite and not negative");
            }
        }
        problems.range(
            "ranking.chunked_threshold",
            self.chunked_threshold,
            0..=u64::MAX >> 1,
        );
    }
}
