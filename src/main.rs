//! `commerce-worker`: parses the command line, loads the configuration, starts logging, runs the
//! command and maps failures to exit codes ([`commerce_worker::exit`]). Glue only: what each
//! command prints lives in [`commerce_worker::commands`], the tools in `commerce_worker::tools`.

mod cli;

use std::process::ExitCode;

use clap::Parser;
use commerce_worker::app;
use commerce_worker::commands::{self, PURGE_NEEDS_YES, show_then};
use commerce_worker::config::Config;
use commerce_worker::coupon::DeadAction;
use commerce_worker::exit::EX_USAGE;

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
        eprintln!("{PURGE_NEEDS_YES}");
        return ExitCode::from(EX_USAGE);
    }
    #[cfg(feature = "tools")]
    if let Command::Tools(commerce_worker::tools::ToolCommand::Chaos(options)) = cli.command {
        return commerce_worker::tools::chaos::main(options);
    }
    let config = match commands::load_config(&cli.config) {
        Ok(config) => config,
        Err(code) => return code,
    };
    if let Command::CheckConfig = cli.command {
        return commands::check_config(&config);
    }
    commands::start_logging(&config, cli.command.prints_a_report());
    let daemon = matches!(cli.command, Command::Run);
    commands::run_to_exit(execute(cli.command, config), daemon)
}

async fn execute(command: Command, config: Config) -> anyhow::Result<()> {
    let show = commands::show;
    match command {
        Command::CheckConfig => {}
        Command::Run => app::run(config, app::shutdown_signal()).await?,
        Command::Migrate => show(&commands::migrate(&config).await?),
        Command::Drain => show_then(commands::drain(&config).await?, |d| d.into_result())?,
        Command::RebuildRanking { date } => show(&app::rebuild_once(&config, date).await?),
        #[cfg(feature = "tools")]
        Command::Tools(command) => commerce_worker::tools::run(command, &config).await?,
        Command::RequeueDead { dry_run, filter } => {
            let requeue = DeadAction::Requeue;
            show(&commands::dead_letters(&config, requeue, filter.to_filter(), dry_run).await?)
        }
        Command::PurgeDead { yes, filter } => {
            // Checked before parsing in `main`; kept here so no path deletes without it.
            anyhow::ensure!(yes, "purge-dead deletes entries: add --yes");
            let purge = DeadAction::Purge;
            show(&commands::dead_letters(&config, purge, filter.to_filter(), false).await?)
        }
        Command::Pause(p) => show(&commands::pause(&config, p.drain, p.persist, true).await?),
        Command::Resume(p) => show(&commands::pause(&config, p.drain, p.persist, false).await?),
        Command::Status { json } => commands::status(&config, json).await?,
        Command::Reconcile { dry_run } => {
            let reconciled = commands::reconcile(&config, dry_run).await?;
            show_then(reconciled, |r| r.into_result())?
        }
        Command::RequeueLogDead => show(&commands::requeue_log_dead(&config).await?),
        Command::RequeueOutboxDead => show(&commands::requeue_outbox_dead(&config).await?),
    }
    Ok(())
}
