//! `commerce-worker`: parses the command line, loads the configuration, starts logging, runs the
//! command and maps failures to exit codes ([`commerce_worker::exit`]).

mod cli;

use std::process::ExitCode;

use clap::Parser;
use commerce_worker::config::{self, Config};
use commerce_worker::coupon::DeadAction;
use commerce_worker::exit::{EX_CONFIG, EX_USAGE, code_for};
use commerce_worker::{app, backends, telemetry};

use crate::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // clap exits 2 on a usage error; the contract says 64. `--help`/`--version` are no error.
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EX_USAGE } else { 0 });
        }
    };
    if let Command::PurgeDead { yes: false, .. } = cli.command {
        eprintln!(
            "error: purge-dead deletes dead-lettered entries for good: add --yes (try `requeue-dead --dry-run` with the same filter to see them)"
        );
        return ExitCode::from(EX_USAGE);
    }
    #[cfg(feature = "tools")]
    if let Command::Tools(commerce_worker::tools::ToolCommand::Chaos(options)) = cli.command {
        // The run brings its own servers and writes its replicas' configs: no config file.
        return chaos(options);
    }
    let config = match Config::load(&cli.config, config::process_env) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    if let Command::CheckConfig = cli.command {
        config.warning_lines().iter().for_each(|w| eprintln!("{w}"));
        print!("{}", config.to_redacted_toml());
        return ExitCode::SUCCESS;
    }
    let mut log = config.log.clone();
    if cli.command.prints_a_report() {
        // The report is the output; per-tick INFO lines would bury it (RUST_LOG still wins).
        log.level = "warn".into();
    }
    telemetry::init(&log);
    config
        .warning_lines()
        .iter()
        .for_each(|w| tracing::warn!("{w}"));
    let result = tokio::runtime::Runtime::new()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))
        .and_then(|runtime| runtime.block_on(execute(cli.command, config)));
    if let Err(e) = result {
        tracing::error!(error = %format!("{e:#}"), "exiting");
        eprintln!("error: {e:#}");
        return ExitCode::from(code_for(&e));
    }
    ExitCode::SUCCESS
}

/// `chaos`: exits 0 only if every check held, 1 if one failed, 2 if the run could not complete.
#[cfg(feature = "tools")]
fn chaos(options: commerce_worker::tools::options::ChaosOptions) -> ExitCode {
    // The report is the output; the clients' reconnection warnings would bury it (RUST_LOG
    // still wins).
    telemetry::init(&config::LogConfig {
        level: "error".into(),
        format: config::LogFormat::Text,
    });
    let outcome = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(commerce_worker::tools::chaos::run(options)));
    match outcome {
        Ok(report) if report.all_passed() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
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
                "drained: {report}; ranking-log rows written: {}, handed back to Redis: {}",
                log.rows_written, log.rows_left,
            );
            Ok(())
        }
        Command::RebuildRanking { date } => {
            println!("{}", app::rebuild_once(&config, date).await?);
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
                config
                    .coupon
                    .follow_interval()
                    .unwrap_or(commerce_worker::coupon::PAUSE_CHECK_INTERVAL)
                    .as_millis()
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
        Command::RequeueLogDead => {
            let redis = commerce_worker::backends::connect_redis(&config.redis).await?;
            let moved =
                commerce_worker::ranking_log::requeue_log_dead(&redis, &config.keys).await?;
            println!("requeued {moved} dead-lettered ranking-log entries");
            Ok(())
        }
    }
}
