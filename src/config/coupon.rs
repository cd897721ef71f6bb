//! `[coupon]`: the coupon drain's schedule and batch sizes.

use std::num::NonZeroUsize;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::read::Problems;
use super::schedule::CronSchedule;
use super::units::{millis, nonzero, secs};

/// The largest coupon batch: the Lua script unpacks argument lists onto Lua's C stack, which
/// holds about 8000 slots.
pub const MAX_COUPON_BATCH_SIZE: usize = 5000;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CouponConfig {
    #[serde(default = "default_schedule")]
    pub schedule: CronSchedule,
    /// Queue entries decided by one Lua call (1..[`MAX_COUPON_BATCH_SIZE`]).
    #[serde(default = "default_batch_size")]
    pub batch_size: NonZeroUsize,
    /// A tick stops taking new batches once this much time has passed.
    #[serde(
        rename = "tick_budget_ms",
        with = "millis",
        default = "default_tick_budget"
    )]
    pub tick_budget: Duration,
    /// Between ticks, the queue is looked at this often; zero turns following off (see
    /// [`Self::follow_interval`]).
    #[serde(
        rename = "poll_interval_ms",
        with = "millis",
        default = "default_poll_interval"
    )]
    pub poll_interval: Duration,
    /// Per-coupon layout: how often the whole registry is swept for queues and outboxes with
    /// entries that the active set does not show.
    #[serde(
        rename = "sweep_interval_secs",
        with = "secs",
        default = "default_sweep_interval"
    )]
    pub sweep_interval: Duration,
}

fn default_schedule() -> CronSchedule {
    CronSchedule::default_of("*/5 * * * * *")
}

fn default_batch_size() -> NonZeroUsize {
    const { nonzero(1000) }
}

fn default_tick_budget() -> Duration {
    Duration::from_millis(4000)
}

fn default_poll_interval() -> Duration {
    Duration::from_millis(30)
}

fn default_sweep_interval() -> Duration {
    Duration::from_secs(10)
}

impl CouponConfig {
    /// The poll interval when following is on.
    pub fn follow_interval(&self) -> Option<Duration> {
        (!self.poll_interval.is_zero()).then_some(self.poll_interval)
    }

    pub(super) fn validate(&self, problems: &mut Problems) {
        problems.range(
            "coupon.batch_size",
            self.batch_size.get() as u64,
            1..=MAX_COUPON_BATCH_SIZE as u64,
        );
        problems.range(
            "coupon.tick_budget_ms",
            self.tick_budget.as_millis() as u64,
            1..=3_600_000,
        );
        problems.range(
            "coupon.poll_interval_ms",
            self.poll_interval.as_millis() as u64,
            0..=60_000,
        );
        problems.range(
            "coupon.sweep_interval_secs",
            self.sweep_interval.as_secs(),
            1..=86_400,
        );
    }
}
