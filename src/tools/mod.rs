//! The tools wing: programs for trying, measuring and attacking the worker. The product never
//! imports from here; tools import from the product. Built only with the `tools` cargo feature
//! (on by default; the container image is built without it, so the shipped daemon links none of
//! the tools' crates).
//!
//! - `options`: every option of the tools' commands, declared once.
//! - `demo`: the main job end to end, with progress bars and a report.
//! - `bench`: the performance targets, each against its baseline.
//! - [`chaos`]: a seeded nemesis against a private deployment during a sale, then the invariants.
//! - [`simulated_api`]: the API's side of the contract, played by `bench` and `demo`.
//! - [`sandbox`]: a private key prefix and database on the configured servers.
//! - `report`: the figures the tools print and how they print them.
//! - [`fault_proxy`]: a TCP proxy that loses replies, freezes or resets connections on command,
//!   used by the fault tests and the `chaos` nemesis.

mod bench;
pub mod chaos;
mod demo;
pub mod fault_proxy;
mod options;
mod report;
pub mod sandbox;
pub mod simulated_api;

pub use options::ToolCommand;

use crate::config::Config;

/// Runs one of the tools' commands against the configured servers (in a sandbox).
pub async fn run(command: ToolCommand, config: &Config) -> anyhow::Result<()> {
    match command {
        ToolCommand::Demo(options) => {
            let report = demo::run(config, options).await?;
            anyhow::ensure!(report.all_passed(), "a check failed (see above)");
            Ok(())
        }
        ToolCommand::Bench(which) => bench::run(which, config).await,
        // Needs no configuration: `main` runs it before loading one; here for completeness.
        ToolCommand::Chaos(options) => {
            let report = chaos::run(options).await?;
            anyhow::ensure!(report.all_passed(), "a check failed (see above)");
            Ok(())
        }
    }
}
