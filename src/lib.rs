//! commerce-worker: the headless daemon that runs an online shop's Redis-backed background jobs
//! beside its API. The interface (Redis keys, tables, CLI, config, HTTP) is fixed in
//! `docs/contract.md`; everything here is internal. `docs/architecture.md` draws the modules.
//!
//! The three jobs:
//!
//! - [`coupon`] — the **coupon drain**, every 5 s: decides each request in the queue (issued,
//!   duplicate, sold out, unknown coupon, or dead-lettered) with one atomic Lua step per batch,
//!   and persists each issued coupon to MySQL exactly once through a Redis outbox.
//! - [`ranking`] — the **ranking rebuild**, at midnight in the configured timezone: the window's
//!   daily sales sets summed into the ranking key and swapped in atomically; old days pruned.
//! - [`ranking_log`] — the **ranking log**: one row per decided request through a bounded
//!   channel to MySQL in batches (the rows wait in Redis, written by the decide script itself).
//!
//! Around them: [`config`] (worker.toml → validated config), [`keys`] (key templates),
//! [`outcome`] (what happened to a request: one vocabulary for every part), [`backends`]
//! (clients, migrations), `mysql` (a deadline on every MySQL call), [`app`] (the daemon, its
//! scheduler and shutdown order), [`control`] (pause flags, job run records and replica
//! heartbeats in Redis, shared by every replica and the operator's commands), `http`
//! (`/healthz`, `/readyz`, `/metrics`), [`metrics`], `telemetry`, `retry`, `systemd`
//! (readiness and watchdog notifications), `status` (the `status` command), `schedule` (cron
//! schedules that follow the timezone across DST changes, for every job), [`exit`] (exit codes),
//! [`commands`] (what each one-shot command prints, and the binary's start-up steps).
//!
//! Private by default: a module is `pub` only when the binary, the tools or the tests need it,
//! and the `unreachable_pub` lint keeps items inside private modules `pub(crate)`.
//!
//! Two wings. The **product** is everything above: the daemon and its commands. The **tools**
//! wing, [`tools`] (built with the `tools` feature, on by default), is for trying, measuring and
//! attacking it: the demo, the benchmarks, the simulated API, the sandbox and the fault proxy.
//! Tools import from the product, never the other way round; the binary (`main.rs`, `cli.rs`)
//! stands above both.

pub mod app;
pub mod backends;
pub mod commands;
pub mod config;
pub mod control;
pub mod coupon;
pub mod exit;
mod http;
pub mod keys;
pub mod metrics;
mod mysql;
pub mod outcome;
pub mod ranking;
pub mod ranking_log;
mod retry;
pub mod schedule;
mod status;
mod systemd;
mod telemetry;
#[cfg(feature = "tools")]
pub mod tools;
