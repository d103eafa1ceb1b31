//! The engine's everyday subcommands: `run`, `validate`, `migrate`, `demo`, `test` and `status`.

use std::path::PathBuf;
use std::process::ExitCode;

use projector::metrics::Metrics;
use projector::settings::Settings;

use super::{load_projections, shutdown_signal};

// How `projector test` prints its report (`--format`).
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum TestFormat {
    Text,
    Json,
    Junit,
}

/// `projector run`: every projection until SIGINT or SIGTERM; SIGHUP reloads the folder.
pub async fn run(settings: &Settings) -> anyhow::Result<ExitCode> {
    let projections = match load_projections(settings, &settings.projections_dir) {
        Ok(projections) => projections,
        Err(code) => return Ok(code),
    };
    // SIGHUP reloads the projections folder.
    let (reload, reloads) = tokio::sync::mpsc::channel(1);
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            let _ = reload.try_send(());
        }
    });
    projector::app::run_reloading(settings, projections, Metrics::new(), shutdown_signal(), reloads).await?;
    Ok(ExitCode::SUCCESS)
}

/// `projector validate`: definitions and fixtures, and with `database_url` the statements
/// against the live schema.
pub async fn validate(
    settings: &Settings,
    dir: Option<PathBuf>,
    database_url: Option<String>,
) -> anyhow::Result<ExitCode> {
    let dir = dir.unwrap_or_else(|| settings.projections_dir.clone());
    let projections = match load_projections(settings, &dir) {
        Ok(projections) => projections,
        Err(code) => return Ok(code),
    };
    let fixture_errors: Vec<String> =
        projections.iter().filter_map(|projection| projector::testing::load_fixtures(projection).err()).collect();
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
        let problems = projector::store::check_statements(&client, &projections, settings.batch.set_based).await;
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

/// `projector migrate`: the engine's migrations, then those of each projection whose definition
/// built its read model.
pub async fn migrate(settings: &Settings) -> anyhow::Result<ExitCode> {
    let projections = match load_projections(settings, &settings.projections_dir) {
        Ok(projections) => projections,
        Err(code) => return Ok(code),
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

/// `projector demo`: the embedded default.
pub async fn demo(settings: &Settings) -> anyhow::Result<ExitCode> {
    projector::demo::run(settings).await?;
    Ok(ExitCode::SUCCESS)
}

/// `projector test`: the fixtures of `names` (default: every projection with some). Exit code 0
/// when every run gives the expected rows, 1 when one does not, 2 when nothing valid is to run.
pub async fn test(
    settings: &Settings,
    names: Vec<String>,
    format: TestFormat,
    seed: Option<u64>,
) -> anyhow::Result<ExitCode> {
    let projections = match load_projections(settings, &settings.projections_dir) {
        Ok(projections) => projections,
        Err(code) => return Ok(code),
    };
    if let Some(unknown) = names.iter().find(|name| !projections.iter().any(|p| p.name == **name)) {
        eprintln!("no projection named `{unknown}` in {}", settings.projections_dir.display());
        return Ok(ExitCode::from(2));
    }
    let selected: Vec<_> = projections.into_iter().filter(|p| names.is_empty() || names.contains(&p.name)).collect();
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
        eprintln!("no fixtures: add some in <projections_dir>/NAME/tests/*.toml (README: Testing a projection)");
        return Ok(ExitCode::from(2));
    }
    match format {
        TestFormat::Text => print!("{}", projector::testing::text(&report)),
        TestFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        TestFormat::Junit => print!("{}", projector::testing::junit(&report)),
    }
    Ok(if report.passed() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// `projector status`: lag and checkpoints, read directly, as tables or JSON.
pub async fn status(settings: &Settings, json: bool) -> anyhow::Result<ExitCode> {
    let projections = match load_projections(settings, &settings.projections_dir) {
        Ok(projections) => projections,
        Err(code) => return Ok(code),
    };
    let report = projector::status::collect(settings, &projections).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", projector::status::render_table(&report));
    }
    Ok(ExitCode::SUCCESS)
}
