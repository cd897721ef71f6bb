//! The process's exit codes (sysexits.h), and which failure maps to which: the contract's exit
//! codes in one place.

use crate::app::{DrainPaused, SetupError, UsageError};
use crate::backends::Unavailable;
use crate::config::ConfigError;

/// A command-line or argument error (clap's usage errors, a `--date` in the future).
pub const EX_USAGE: u8 = 64;
/// Redis or MySQL did not answer at start.
pub const EX_UNAVAILABLE: u8 = 69;
/// A temporary condition kept the command from doing its work; running it again later may
/// succeed (`drain` while an operator paused the drain).
pub const EX_TEMPFAIL: u8 = 75;
/// The configuration is invalid (or a configured resource, such as the listen address, unusable).
pub const EX_CONFIG: u8 = 78;

/// The exit code for a command that failed with `error`.
pub fn code_for(error: &anyhow::Error) -> u8 {
    if error.downcast_ref::<UsageError>().is_some() {
        EX_USAGE
    } else if error.downcast_ref::<Unavailable>().is_some() {
        EX_UNAVAILABLE
    } else if error.downcast_ref::<DrainPaused>().is_some() {
        EX_TEMPFAIL
    } else if error.downcast_ref::<ConfigError>().is_some()
        || error.downcast_ref::<SetupError>().is_some()
    {
        EX_CONFIG
    } else {
        // Everything else, a shutdown that missed its deadline ([`ShutdownTimedOut`](crate::app::ShutdownTimedOut)) included.
        1
    }
}
