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

#[derive(Clone, Copy, clap::ValueEnum)]
enum TestFormat {
    Text,
    Json,
    Junit,
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
    /// Apply pending migrations, the engine's and then each projection's (`<projections_dir>/NAME/migrations/`), and exit.
    Migrate,
    /// The embedded default: a mock Kafka cluster, the example shop events, the example projections.
    Demo,
    /// Run projections' fixtures (`<projections_dir>/NAME/tests/*.toml`) on a scratch database:
    /// as written, then each event delivered twice, replayed, keys interleaved, a key's events out
    /// of order. Exit code 0 when every run gives the expected rows, 1 when one does not, 2 when
    /// a definition or fixture is invalid.
    Test {
        /// The projections to test (default: every one with fixtures).
        names: Vec<String>,
        /// `text`, `json` or `junit`.
        #[arg(long, default_value = "text")]
        format: TestFormat,
        /// Replays the shuffled orders of an earlier run (it prints its seed).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Rebuild a projection's read model from the start of its topics (resumes one under way).
    Rebuild(RebuildCli),
    /// Keep a changed projection's rows and apply its new definition from here on.
    Accept {
        /// The projection.
        name: String,
    },
    /// Accept that the broker deleted records a projection had not read (retention): move its
    /// checkpoints that are below their partition's log start to it, so that it reads on.
    AcceptDataLoss {
        /// The projection.
        name: String,
    },
    /// Drop the old tables that shadow rebuilds of a projection kept.
    DropRetired {
        /// The projection.
        name: String,
    },
    /// Events that could not be applied: list, show, retry (after a fix) or skip them.
    #[command(subcommand)]
    Parked(ParkedCli),
    /// Checkpoints, end offsets and lag per projection and partition, read from Postgres and
    /// Kafka directly (no running engine needed).
    Status {
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct RebuildCli {
    /// The projection to rebuild.
    name: String,
    /// Build copies of the tables while the live ones keep serving, then swap them in atomically.
    #[arg(long)]
    shadow: bool,
    /// With --shadow: swap once the copy is at most this many events behind the live end offsets.
    #[arg(long, default_value_t = 0)]
    max_lag: i64,
    /// With --shadow: each copy must hold at least this fraction of the live table's rows
    /// (default: the definition's `[rebuild] min_row_ratio`, else no row-count check).
    #[arg(long)]
    min_row_ratio: Option<f64>,
    /// Build the read model as it stood at this time (RFC 3339) into `--into`, leaving the live one alone.
    #[arg(long, requires = "into", conflicts_with = "shadow")]
    until: Option<chrono::DateTime<chrono::Utc>>,
    /// Like --until, with explicit end offsets: `topic/partition=offset,…` (other partitions: their end).
    #[arg(long, requires = "into", conflicts_with_all = ["shadow", "until"])]
    until_offsets: Option<String>,
    /// With --until: the table (for a one-table projection) or schema (several tables) to build into.
    #[arg(long)]
    into: Option<String>,
    /// Start over even if a rebuild is under way (default: resume it).
    #[arg(long)]
    restart: bool,
    /// Rebuild even though some partitions no longer hold their full history.
    #[arg(long)]
    accept_data_loss: bool,
}

#[derive(Subcommand)]
enum ParkedCli {
    /// Parked events, oldest first (only those still parked, unless --all).
    List {
        /// Only this projection's.
        projection: Option<String>,
        /// Only this key's.
        #[arg(long)]
        key: Option<String>,
        /// Only those whose error contains this text (any case), or of this class
        /// (`poison`, `blocked`, `gap_timeout`).
        #[arg(long)]
        error: Option<String>,
        /// Also those already retried or skipped.
        #[arg(long)]
        all: bool,
        #[arg(long, default_value_t = 100)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// One parked event in full: its record, error and the actions taken on it.
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Re-apply parked events with the current definition, key by key in the order they were
    /// parked; the first that fails again stays parked with the later ones of its key.
    Retry {
        projection: String,
        #[command(flatten)]
        target: ParkedTarget,
    },
    /// Discard parked events, recording why; later events of their keys apply again.
    Skip {
        projection: String,
        #[command(flatten)]
        target: ParkedTarget,
        /// Why they are discarded (recorded with them).
        #[arg(long)]
        reason: String,
    },
}

#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct ParkedTarget {
    /// Every parked event of this key.
    #[arg(long)]
    key: Option<String>,
    /// The parked event with this id (and, when it has a key, the key's other parked events).
    #[arg(long)]
    id: Option<i64>,
    /// Every parked event of the projection.
    #[arg(long)]
    all: bool,
}

impl ParkedTarget {
    fn selection(&self) -> projector::store::parked::Selection {
        use projector::store::parked::Selection;
        match (&self.key, self.id) {
            (Some(key), _) => Selection::Key(key.clone()),
            (None, Some(id)) => Selection::Id(id),
            (None, None) => Selection::All,
        }
    }
}

fn parse_offsets(spec: &str) -> anyhow::Result<std::collections::HashMap<(String, i32), i64>> {
    spec.split(',')
        .filter(|part| !part.trim().is_empty())
        .map(|part| {
            let (partition, offset) = part
                .trim()
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("`{part}`: expected topic/partition=offset"))?;
            let (topic, number) = partition
                .rsplit_once('/')
                .ok_or_else(|| anyhow::anyhow!("`{part}`: expected topic/partition=offset"))?;
            Ok(((topic.to_string(), number.parse()?), offset.parse()?))
        })
        .collect()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `projector test` reports what it finds itself: the engine's own log (events held, applied
    // later, …) only says why when asked (RUST_LOG).
    let quiet = matches!(cli.command, Command::Test { .. });
    let default_filter = if quiet { "error" } else { "info,rdkafka=warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Fail points from `FAILPOINTS` (tests only: compiled in with the `failpoints` feature).
    #[cfg(feature = "failpoints")]
    let _fail_points = fail::FailScenario::setup();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let result = runtime.block_on(run(cli));
    // Blocking work still running (a lag sample waiting on a broker that is gone) must not hold
    // the exit: `run` has already committed or rolled back everything, within its deadline.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
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
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(error) => {
            // Invalid settings, like invalid definitions: exit code 2 (README, Exit codes).
            eprintln!("{}", redact_text(&format!("error: {error}")));
            return Ok(ExitCode::from(2));
        }
    };
    match cli.command {
        Command::Run => {
            let projections = match load_dir(&settings.projections_dir) {
                Ok(projections) => projections,
                Err(errors) => return Ok(report_definition_errors(&errors)),
            };
            // SIGHUP reloads the projections folder.
            let (reload, reloads) = tokio::sync::mpsc::channel(1);
            let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
            tokio::spawn(async move {
                while hangups.recv().await.is_some() {
                    let _ = reload.try_send(());
                }
            });
            projector::app::run_reloading(&settings, projections, Metrics::new(), shutdown_signal(), reloads).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { dir, database_url } => {
            let dir = dir.unwrap_or_else(|| settings.projections_dir.clone());
            let projections = match load_dir(&dir) {
                Ok(projections) => projections,
                Err(errors) => return Ok(report_definition_errors(&errors)),
            };
            let fixture_errors: Vec<String> = projections
                .iter()
                .filter_map(|projection| projector::testing::load_fixtures(projection).err())
                .collect();
            if !fixture_errors.is_empty() {
                for error in &fixture_errors {
                    eprintln!("{error}");
                }
                eprintln!("{} fixture file(s) do not parse", fixture_errors.len());
                return Ok(ExitCode::from(2));
            }
            if let Some(url) = database_url {
                let pool = projector::store::connect(&url, 1).await?;
                let client = pool.get().await?;
                let problems =
                    projector::store::check_statements(&client, &projections, settings.batch.set_based).await;
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
            let projections = match load_dir(&settings.projections_dir) {
                Ok(projections) => projections,
                Err(errors) => return Ok(report_definition_errors(&errors)),
            };
            let (applied, waiting) = projector::store::migrate_current(&settings.database.url, &projections).await?;
            if applied.is_empty() && waiting.is_empty() {
                println!("database is up to date");
            }
            for migration in applied {
                println!("applied {migration}");
            }
            for projection in waiting {
                println!(
                    "{projection}: its definition changed; its new migrations wait for `projector rebuild {projection} --shadow` \
                     (applied to the copies) or `projector accept {projection}` (applied in place)"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Rebuild(cli) => {
            let projections = match load_dir(&settings.projections_dir) {
                Ok(projections) => projections,
                Err(errors) => return Ok(report_definition_errors(&errors)),
            };
            let args = projector::rebuild::RebuildArgs {
                name: cli.name,
                shadow: cli.shadow,
                restart: cli.restart,
                accept_data_loss: cli.accept_data_loss,
                until: cli.until,
                until_offsets: cli.until_offsets.as_deref().map(parse_offsets).transpose()?,
                into: cli.into,
                max_lag: cli.max_lag,
                min_row_ratio: cli.min_row_ratio,
            };
            let report =
                projector::rebuild::run(&settings, &projections, &args, Metrics::new(), shutdown_signal()).await?;
            println!(
                "rebuilt `{}`{}: {} events in {:.1} s ({:.0} events/s)",
                args.name,
                if report.resumed { " (resumed)" } else { "" },
                report.events,
                report.seconds,
                report.rate()
            );
            for note in &report.notes {
                println!("  {note}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Accept { name } => {
            let projection = match find_projection(&settings, &name)? {
                Ok(projection) => projection,
                Err(code) => return Ok(code),
            };
            let changed = projector::rebuild::accept(&settings, &projection).await?;
            println!("accepted the current definition of `{name}` ({changed} checkpoint(s) updated)");
            Ok(ExitCode::SUCCESS)
        }
        Command::AcceptDataLoss { name } => {
            let projection = match find_projection(&settings, &name)? {
                Ok(projection) => projection,
                Err(code) => return Ok(code),
            };
            let moved = projector::rebuild::accept_data_loss(&settings, &projection).await?;
            if moved.is_empty() {
                println!("no checkpoint of `{name}` is below its partition's log start: nothing to accept");
            }
            for ((topic, partition), from, to) in moved {
                println!(
                    "`{name}`: `{topic}` partition {partition} moved from {from} to {to} ({} record(s) lost)",
                    to - from
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::DropRetired { name } => {
            let dropped = projector::rebuild::drop_retired(&settings, &name).await?;
            if dropped.is_empty() {
                println!("no retired tables for `{name}`");
            }
            for schema in dropped {
                println!("dropped schema {schema}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo => {
            projector::demo::run(&settings).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Test { names, format, seed } => {
            let projections = match load_dir(&settings.projections_dir) {
                Ok(projections) => projections,
                Err(errors) => return Ok(report_definition_errors(&errors)),
            };
            if let Some(unknown) = names.iter().find(|name| !projections.iter().any(|p| p.name == **name)) {
                eprintln!("no projection named `{unknown}` in {}", settings.projections_dir.display());
                return Ok(ExitCode::from(2));
            }
            let selected: Vec<_> =
                projections.into_iter().filter(|p| names.is_empty() || names.contains(&p.name)).collect();
            let seed = seed.unwrap_or_else(rand::random);
            let report = match projector::testing::run(&settings.database.url, &selected, seed).await {
                Ok(report) => report,
                Err(projector::testing::TestError::Fixture(message)) => {
                    eprintln!("{message}");
                    return Ok(ExitCode::from(2));
                }
                Err(error) => return Err(error.into()),
            };
            if report.fixtures.is_empty() {
                eprintln!(
                    "no fixtures: add some in <projections_dir>/NAME/tests/*.toml (README: Testing a projection)"
                );
                return Ok(ExitCode::from(2));
            }
            match format {
                TestFormat::Text => {
                    print!("{}", projector::testing::text(&report))
                }
                TestFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                TestFormat::Junit => print!("{}", projector::testing::junit(&report)),
            }
            Ok(if report.passed() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Parked(command) => parked(&settings, command).await,
        Command::Status { json } => {
            let projections = match load_dir(&settings.projections_dir) {
                Ok(projections) => projections,
                Err(errors) => return Ok(report_definition_errors(&errors)),
            };
            let report = projector::status::collect(&settings, &projections).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", projector::status::render_table(&report));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn parked(settings: &Settings, command: ParkedCli) -> anyhow::Result<ExitCode> {
    match command {
        ParkedCli::List { projection, key, error, all, limit, json } => {
            let filter = projector::store::parked::Filter { projection, key, error, all_states: all, limit };
            print!("{}", projector::parked::list(settings, &filter, json).await?);
        }
        ParkedCli::Show { id, json } => match projector::parked::show(settings, id, json).await? {
            Some(text) => print!("{text}"),
            None => anyhow::bail!("no parked event with id {id}"),
        },
        ParkedCli::Retry { projection, target } => {
            let projection = match find_projection(settings, &projection)? {
                Ok(projection) => projection,
                Err(code) => return Ok(code),
            };
            let results = projector::parked::retry(settings, &projection, &target.selection()).await?;
            print!("{}", projector::parked::render_retried(&results));
            if results.iter().any(|result| result.parked_again.is_some()) {
                return Ok(ExitCode::FAILURE);
            }
        }
        ParkedCli::Skip { projection, target, reason } => {
            let skipped = projector::parked::skip(settings, &projection, &target.selection(), &reason).await?;
            println!(
                "skipped {} event(s): {}",
                skipped.len(),
                skipped.iter().map(|id| format!("#{id}")).collect::<Vec<_>>().join(", ")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The projection called `name` from the projections folder; `Ok(Err(code))` when a definition
/// does not load (its errors printed).
fn find_projection(
    settings: &Settings,
    name: &str,
) -> anyhow::Result<Result<projector::projection::Projection, ExitCode>> {
    let projections = match load_dir(&settings.projections_dir) {
        Ok(projections) => projections,
        Err(errors) => return Ok(Err(report_definition_errors(&errors))),
    };
    let projection = projections
        .into_iter()
        .find(|projection| projection.name == name)
        .ok_or_else(|| anyhow::anyhow!("no projection named `{name}`"))?;
    Ok(Ok(projection))
}

fn report_definition_errors(errors: &[projector::projection::DefinitionError]) -> ExitCode {
    for error in errors {
        eprintln!("{error}");
    }
    eprintln!("{} error(s) in definitions", errors.len());
    ExitCode::from(2)
}

/// Completes on SIGINT or SIGTERM. The handlers are in place when this returns, not when the
/// future is first polled: a SIGTERM that arrives while the engine is still starting (connecting,
/// migrating) is then a graceful stop too, not the default action, which kills the process.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut interrupt = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = interrupt.recv() => tracing::info!("SIGINT received"),
            _ = terminate.recv() => tracing::info!("SIGTERM received"),
        }
    }
}
