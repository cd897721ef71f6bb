//! `commerce-worker`: parses the command line, loads the configuration, starts logging, runs the
//! command and maps failures to exit codes (78 configuration, 69 backend unavailable at start).

mod cli;

use std::process::ExitCode;

use clap::Parser;
use commerce_worker::app::{self, SetupError, ShutdownTimedOut, UsageError};
use commerce_worker::backends::{self, Unavailable};
use commerce_worker::config::{self, Config, ConfigError};
use commerce_worker::coupon::DeadAction;
use commerce_worker::telemetry;

use crate::cli::{Cli, Command};

/// sysexits.h
const EX_USAGE: u8 = 64;
const EX_UNAVAILABLE: u8 = 69;
const EX_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap exits 2 on a usage error; the contract says 64 (EX_USAGE). `--help` and
            // `--version` are not errors.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if let Command::PurgeDead { yes: false, .. } = cli.command {
        eprintln!(
            "error: purge-dead deletes dead-lettered entries for good: add --yes (try `requeue-dead --dry-run` with the same filter to see them)"
        );
        return ExitCode::from(EX_USAGE);
    }
    let config = match Config::load(&cli.config, config::process_env) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    if let Command::CheckConfig = cli.command {
        for warning in config.warning_lines() {
            eprintln!("{warning}");
        }
        print!("{}", config.to_redacted_toml());
        return ExitCode::SUCCESS;
    }
    let mut log = config.log.clone();
    if cli.command.prints_a_report() {
        // The report is the output; per-tick INFO lines would bury it (RUST_LOG still wins).
        log.level = "warn".into();
    }
    telemetry::init(&log);
    for warning in config.warning_lines() {
        tracing::warn!("{warning}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "exiting");
            eprintln!("error: {e:#}");
            exit_code_for(&e)
        }
    }
}

async fn execute(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::CheckConfig => Ok(()),
        Command::Run => app::run(config, app::shutdown_signal()).await,
        Command::Migrate => {
            let applied = backends::migrate(&config.mysql).await?;
            println!("migrations applied: {applied} (database up to date)");
            Ok(())
        }
        Command::Drain => {
            let (report, log) = app::drain_once(&config, app::shutdown_signal()).await?;
            println!(
                "drained: {} decided in {:.2}s ({} issued, {} duplicate, {} sold out, {} unknown coupon, {} dead-lettered; {} taken by other replicas); queue left: {}; ranking-log rows written: {}, spilled: {}",
                report.decided(),
                report.elapsed.as_secs_f64(),
                report.issued,
                report.duplicate,
                report.sold_out,
                report.unknown_coupon,
                report.dead_lettered,
                report.gone,
                report.queue_depth,
                log.rows_written,
                log.rows_left_spilled,
            );
            Ok(())
        }
        Command::RebuildRanking { date } => {
            let report = app::rebuild_once(&config, date).await?;
            let window: Vec<String> = report.window.iter().map(|d| d.to_string()).collect();
            println!(
                "ranking rebuilt for {}: window {} ({} members summed, strategy {:?}), {} products, {} old daily keys pruned, {:.2}s",
                report.day,
                window.join(" .. "),
                report.source_members,
                report.strategy,
                report.products,
                report.pruned,
                report.elapsed.as_secs_f64()
            );
            Ok(())
        }
        #[cfg(feature = "tools")]
        Command::Tools(command) => commerce_worker::tools::run(command, &config).await,
        Command::RequeueDead { dry_run, filter } => {
            let report =
                app::dead_letters_once(&config, DeadAction::Requeue, &filter.to_filter(), dry_run)
                    .await?;
            println!(
                "{} {} of {} matching dead-lettered entries ({} looked at); {} left in the stream without a member or numeric score",
                if dry_run { "would requeue" } else { "requeued" },
                report.done,
                report.matched,
                report.looked_at,
                report.left
            );
            Ok(())
        }
        Command::Pause(parts) | Command::Resume(parts) => {
            let pausing = matches!(command, Command::Pause(_));
            let paused = app::pause_once(&config, parts.drain, parts.persist, pausing).await?;
            println!(
                "{}; paused now: {} (every replica follows within {} ms)",
                if pausing { "paused" } else { "resumed" },
                if paused.is_empty() {
                    "nothing".to_owned()
                } else {
                    paused.join(", ")
                },
                commerce_worker::coupon::PAUSE_CHECK_INTERVAL.as_millis()
            );
            Ok(())
        }
        Command::Status { json } => {
            let report = commerce_worker::status::gather(&config).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.to_table());
            }
            if !report.healthy() {
                return Err(commerce_worker::status::NeedsAPerson.into());
            }
            Ok(())
        }
        Command::PurgeDead { yes, filter } => {
            // Checked before parsing in `main`; kept here so no path deletes without it.
            anyhow::ensure!(yes, "purge-dead deletes entries: add --yes");
            let report =
                app::dead_letters_once(&config, DeadAction::Purge, &filter.to_filter(), false)
                    .await?;
            println!(
                "deleted {} matching dead-lettered entries ({} looked at)",
                report.done, report.looked_at
            );
            Ok(())
        }
        Command::Reconcile { dry_run } => {
            let reports = app::reconcile_once(&config, dry_run).await?;
            let coupons: Vec<_> = reports.iter().flat_map(|r| &r.coupons).collect();
            let differing: Vec<_> = coupons.iter().filter(|c| c.differs()).collect();
            for c in &differing {
                println!("{}", app::describe_difference(c));
            }
            println!(
                "{} coupons compared with MySQL, {} differed{}",
                coupons.len(),
                differing.len(),
                if dry_run {
                    " (dry run: nothing changed)"
                } else {
                    "; Redis repaired from MySQL"
                }
            );
            if dry_run && !differing.is_empty() {
                return Err(app::DifferencesFound(differing.len()).into());
            }
            Ok(())
        }
    }
}

fn exit_code_for(error: &anyhow::Error) -> ExitCode {
    if error.downcast_ref::<UsageError>().is_some() {
        ExitCode::from(EX_USAGE)
    } else if error.downcast_ref::<Unavailable>().is_some() {
        ExitCode::from(EX_UNAVAILABLE)
    } else if error.downcast_ref::<ConfigError>().is_some()
        || error.downcast_ref::<SetupError>().is_some()
    {
        ExitCode::from(EX_CONFIG)
    } else if error.downcast_ref::<ShutdownTimedOut>().is_some() {
        ExitCode::from(1)
    } else {
        ExitCode::FAILURE
    }
}
