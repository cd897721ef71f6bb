//! Retrying against Redis and MySQL: exponential backoff and telling an outage from a rejection.
//!
//! The daemon never exits because a backend went away (docs/contract.md §5): loops that talk to a
//! backend wait [`Backoff::next_delay`] after a failure and try again. For MySQL,
//! [`is_transient`] separates failures worth retrying forever (the server is unreachable,
//! restarting, overloaded) from the server rejecting a statement, which retrying will not fix.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Doubling delays from `initial` up to `max`, with up to 20 % random jitter so replicas that
/// failed together do not retry in lockstep.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            next: initial,
            max,
        }
    }

    /// Back to the initial delay, after a success.
    pub(crate) fn reset(&mut self) {
        self.next = self.initial;
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        // Jitter from the clock's nanoseconds: good enough to spread replicas, no RNG needed.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let jitter = base.mul_f64(f64::from(nanos % 200) / 1000.0);
        base + jitter
    }
}

/// Runs `attempt` until it succeeds, waiting out `backoff` after each failure (logged at WARN
/// with `what`, e.g. "drain batch failed; retrying"); `None` once `stop` fires during a wait.
/// The loop of a job that must outlive an outage: it never gives up on its own.
pub(crate) async fn until_cancelled<T, F>(
    backoff: &mut Backoff,
    stop: &CancellationToken,
    what: &str,
    // A plain closure returning a future, not an async closure: the future must be `Send` for
    // the tasks that run this loop, which async closures cannot promise yet.
    mut attempt: impl FnMut() -> F,
) -> Option<T>
where
    F: Future<Output = anyhow::Result<T>>,
{
    loop {
        match attempt().await {
            Ok(value) => return Some(value),
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %format!("{e:#}"), retry_in_ms = delay.as_millis() as u64, "{what}");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => return None,
                }
            }
        }
    }
}

/// True when a MySQL error means "not now" (connection trouble, server restarting, lock
/// contention) rather than "never" (a statement the server rejects).
pub(crate) fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db
                .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                .map(|e| e.number());
            matches!(
                code,
                // too many connections, server shutdown, lock wait timeout, deadlock,
                // read-only (failover), query interrupted, connection killed (MariaDB),
                // idle disconnect (MySQL 8)
                Some(1040 | 1053 | 1205 | 1213 | 1290 | 1317 | 1836 | 1927 | 4031)
            )
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_bounded_jitter() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let delays: Vec<u128> = (0..5).map(|_| backoff.next_delay().as_millis()).collect();
        let bases = [100, 200, 350, 350, 350];
        for (delay, base) in delays.iter().zip(bases) {
            assert!(*delay >= base && *delay <= base * 12 / 10, "{delays:?}");
        }
    }

    #[tokio::test]
    async fn until_cancelled_retries_until_success_and_stops_when_cancelled() {
        let stop = CancellationToken::new();
        let mut backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(4));
        let mut failures_left = 3_u32;
        let value = until_cancelled(&mut backoff, &stop, "test attempt failed", || {
            let fail = failures_left > 0;
            failures_left = failures_left.saturating_sub(1);
            async move {
                anyhow::ensure!(!fail, "not yet");
                Ok(7)
            }
        })
        .await;
        assert_eq!((value, failures_left), (Some(7), 0));

        stop.cancel();
        let never: Option<()> =
            until_cancelled(&mut backoff, &stop, "test attempt failed", async || {
                anyhow::bail!("down")
            })
            .await;
        assert_eq!(never, None);
    }

    #[test]
    fn connection_failures_are_transient_and_rejections_are_not() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(is_transient(&io));
        assert!(is_transient(&sqlx::Error::PoolTimedOut));
        assert!(!is_transient(&sqlx::Error::RowNotFound));
    }
}
