//! The daemon's own sections: `[http]`, `[log]`, `[shutdown]`.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::read::Problems;
use super::units::{secs, socket_addr};

/// `[http]`: `/healthz`, `/readyz`, `/metrics`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    #[serde(with = "socket_addr", default = "default_listen")]
    pub listen: SocketAddr,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9090))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// An `EnvFilter` directive such as `info` or `commerce_worker=debug,info`; `RUST_LOG`
    /// overrides it.
    #[serde(default = "default_level")]
    pub level: String,
    #[serde(default = "default_format")]
    pub format: LogFormat,
}

fn default_level() -> String {
    "info".into()
}

fn default_format() -> LogFormat {
    LogFormat::Json
}

impl LogConfig {
    pub(super) fn validate(&self, problems: &mut Problems) {
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.level) {
            problems.push("log.level", format!("`{}`: {e}", self.level));
        }
    }
}

/// `[shutdown]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// On SIGTERM/SIGINT: finish the batch in hand, flush, exit within this (1..3600 s).
    #[serde(rename = "timeout_secs", with = "secs", default = "default_timeout")]
    pub timeout: Duration,
}

/// The default `[shutdown] timeout_secs`, which the deployment files' grace periods exceed.
pub fn default_timeout() -> Duration {
    Duration::from_secs(25)
}

impl ShutdownConfig {
    pub(super) fn validate(&self, problems: &mut Problems) {
        problems.range("shutdown.timeout_secs", self.timeout.as_secs(), 1..=3600);
    }
}
