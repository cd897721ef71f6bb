//! The figures the tools print, and how they print them: measured durations ([`Latencies`]),
//! rates, thousands grouped for reading, milliseconds. Shared by `bench` and `demo`.

use std::time::Duration;

/// A set of measured durations.
#[derive(Debug, Default, Clone)]
pub(super) struct Latencies {
    samples: Vec<Duration>,
}

impl Latencies {
    pub(super) fn record(&mut self, latency: Duration) {
        self.samples.push(latency);
    }

    pub(super) fn len(&self) -> usize {
        self.samples.len()
    }

    pub(super) fn max(&self) -> Duration {
        self.samples.iter().copied().max().unwrap_or_default()
    }

    /// The `p`-th percentile (0..=100), nearest-rank.
    pub(super) fn percentile(&self, p: f64) -> Duration {
        if self.samples.is_empty() {
            return Duration::ZERO;
        }
        let mut sorted = self.samples.clone();
        sorted.sort_unstable();
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted[rank.clamp(1, sorted.len()) - 1]
    }

    pub(super) fn count_over(&self, limit: Duration) -> usize {
        self.samples.iter().filter(|l| **l > limit).count()
    }
}

/// `count / elapsed`, per second.
pub(super) fn rate(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// `123456.7` → `"123 457"`: figures people read, with thin grouping.
pub(super) fn group(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

pub(super) fn millis(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut l = Latencies::default();
        for ms in 1..=100 {
            l.record(Duration::from_millis(ms));
        }
        assert_eq!(l.percentile(50.0), Duration::from_millis(50));
        assert_eq!(l.percentile(99.0), Duration::from_millis(99));
        assert_eq!(l.max(), Duration::from_millis(100));
        assert_eq!(l.count_over(Duration::from_millis(90)), 10);
        assert_eq!(Latencies::default().percentile(99.0), Duration::ZERO);
    }

    #[test]
    fn figures_are_grouped_by_thousands() {
        assert_eq!(group(0.4), "0");
        assert_eq!(group(999.0), "999");
        assert_eq!(group(123_456.7), "123 457");
        assert_eq!(group(1_000_000.0), "1 000 000");
    }
}
