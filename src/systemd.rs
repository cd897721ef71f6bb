//! systemd integration for `Type=notify` units (deploy/systemd/commerce-worker.service).
//!
//! The daemon reports `READY=1` once Redis and MySQL answered and its jobs are scheduled,
//! `WATCHDOG=1` from a job of its own scheduler (so a scheduler that stops ticking stops the
//! pings, and systemd restarts the process after `WatchdogSec`), and `STOPPING=1` when a
//! shutdown signal starts the graceful drain. Outside systemd (no `NOTIFY_SOCKET`) every call
//! does nothing.

use std::time::Duration;

use sd_notify::NotifyState;

fn notify(state: NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(&[state]) {
        tracing::warn!(error = %e, "could not notify systemd");
    }
}

pub(crate) fn ready() {
    notify(NotifyState::Ready);
}

pub(crate) fn stopping() {
    notify(NotifyState::Stopping);
}

pub(crate) fn watchdog_ping() {
    notify(NotifyState::Watchdog);
}

/// How often to ping the watchdog: a third of `WatchdogSec` (at least every second), or `None`
/// when systemd did not enable a watchdog for this process.
pub(crate) fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|timeout| (timeout / 3).max(Duration::from_secs(1)))
}
