//! Logging: tracing-subscriber writing JSON (for log shippers) or text (for people) to stderr.
//! `RUST_LOG`, when set, wins over `[log] level`. And the one-shot commands' output to stdout,
//! which a closed pipe must not turn into a panic.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt;
use tracing_subscriber::prelude::*;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. Calling it twice is harmless (the second call does nothing),
/// which keeps tests that start the app several times simple.
pub(crate) fn init(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match config.format {
        LogFormat::Json => registry
            .with(fmt::layer().json().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Text => registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .try_init(),
    };
}

/// Writes `text` to stdout for a one-shot command. A reader that went away (`status --json |
/// head -c 10`: EPIPE, as Rust ignores SIGPIPE) or any other write error ends the output
/// quietly: `print!` would panic there. The command itself goes on and exits with its own code.
pub(crate) fn print_stdout(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}
