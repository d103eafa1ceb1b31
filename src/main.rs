//! The `projector` command: parse arguments, load settings, run a subcommand, print the error
//! chain and exit non-zero on failure.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use projector::metrics::Metrics;
use projector::projection::load_dir;
use projector::settings::{redact_text, Settings};

#[derive(Parser)]
#[command(name = "projector", version, about = "Project Kafka event streams into PostgreSQL read models")]
struct Cli {
    /// Settings file (default: `projector.toml` when it exists). Environment variables override it.
    #[arg(long, global = true, env = "PROJECTOR_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every projection until SIGINT or SIGTERM.
    Run,
    /// Check definition files (all errors at once); with --database-url also against the live schema.
    Validate {
        /// Folder of definition files (default: the settings' `projections_dir`).
        dir: Option<PathBuf>,
        /// Also prepare every statement against this database.
        #[arg(long)]
        database_url: Option<String>,
    },
    /// Apply pending migrations and exit.
    Migrate,
    /// The embedded default: a mock Kafka cluster, the example shop events, the example projections.
    Demo,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,rdkafka=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(error) => {
            let mut message = format!("error: {error}");
            for cause in error.chain().skip(1) {
                message.push_str(&format!("\n  caused by: {cause}"));
            }
            eprintln!("{}", redact_text(&message));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(cli.config.as_deref())?;
    match cli.command {
        Command::Run => {
            let projections = match load_dir(&settings.projections_dir) {
                Ok(projections) => projections,
                Err(errors) => return Ok(report_definition_errors(&errors)),
            };
            projector::app::run(&settings, projections, Metrics::new(), shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { dir, database_url } => {
            let dir = dir.unwrap_or_else(|| settings.projections_dir.clone());
            let projections = match load_dir(&dir) {
                Ok(projections) => projections,
                Err(errors) => return Ok(report_definition_errors(&errors)),
            };
            if let Some(url) = database_url {
                let pool = projector::store::connect(&url, 1).await?;
                let client = pool.get().await?;
                let problems = projector::store::check_statements(&client, &projections).await;
                if !problems.is_empty() {
                    for problem in &problems {
                        eprintln!("{problem}");
                    }
                    eprintln!("{} statement(s) do not fit the database", problems.len());
                    return Ok(ExitCode::from(2));
                }
            }
            for projection in &projections {
                println!(
                    "ok {} ({}): {} event type(s) from {}",
                    projection.name,
                    projection.file.display(),
                    projection.handlers.len(),
                    projection.topics.join(", ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            let applied = projector::store::migrate(&settings.database.url).await?;
            if applied.is_empty() {
                println!("database is up to date");
            }
            for migration in applied {
                println!("applied {migration}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo => {
            projector::demo::run(&settings).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn report_definition_errors(errors: &[projector::projection::DefinitionError]) -> ExitCode {
    for error in errors {
        eprintln!("{error}");
    }
    eprintln!("{} error(s) in definitions", errors.len());
    ExitCode::from(2)
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
    }
}
