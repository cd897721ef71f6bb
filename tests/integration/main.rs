//! Integration tests against the machine's real Redis and MariaDB (and private servers for the
//! fault tests). One binary with a module per job keeps link time down.

// A test binary has no outside users: `pub` in its helpers only means "shared between modules".
#![allow(unreachable_pub)]
// Clippy's allow-unwrap-in-tests covers `#[test]` functions but not the shared helpers beside them;
// in a test binary a panic is the failure report, with its location.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod bench;
mod chaos;
mod cluster;
mod common;
mod console;
mod coupon_drain;
mod daemon;
mod deploy;
mod drain_faults;
mod follow;
mod invariants;
mod ranking;
mod ranking_log;
mod reconcile;
mod sweeps;
