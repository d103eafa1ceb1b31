//! The subcommands that rebuild or take over a projection's read model: `rebuild`, `accept`,
//! `accept-data-loss` and `drop-retired`.

use std::collections::HashMap;
use std::process::ExitCode;

use projector::metrics::Metrics;
use projector::settings::Settings;

use super::{find_projection, load_projections, shutdown_signal};

// `projector rebuild`'s arguments (clap takes the help text from `Command::Rebuild`).
#[derive(clap::Args)]
pub struct RebuildCli {
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

/// `topic/partition=offset,…` as offsets by partition.
fn parse_offsets(spec: &str) -> anyhow::Result<HashMap<(String, i32), i64>> {
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

/// `projector rebuild`: in place, into shadow tables, or as of a time (resumes one under way).
pub async fn rebuild(settings: &Settings, cli: RebuildCli) -> anyhow::Result<ExitCode> {
    let projections = match load_projections(settings, &settings.projections_dir) {
        Ok(projections) => projections,
        Err(code) => return Ok(code),
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
    let report = projector::rebuild::run(settings, &projections, &args, Metrics::new(), shutdown_signal()).await?;
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

/// `projector accept`: keep a changed projection's rows under its new definition.
pub async fn accept(settings: &Settings, name: &str) -> anyhow::Result<ExitCode> {
    let projection = match find_projection(settings, name)? {
        Ok(projection) => projection,
        Err(code) => return Ok(code),
    };
    let changed = projector::rebuild::accept(settings, &projection).await?;
    println!("accepted the current definition of `{name}` ({changed} checkpoint(s) updated)");
    Ok(ExitCode::SUCCESS)
}

/// `projector accept-data-loss`: move checkpoints below their partition's log start up to it.
pub async fn accept_data_loss(settings: &Settings, name: &str) -> anyhow::Result<ExitCode> {
    let projection = match find_projection(settings, name)? {
        Ok(projection) => projection,
        Err(code) => return Ok(code),
    };
    let moved = projector::rebuild::accept_data_loss(settings, &projection).await?;
    if moved.is_empty() {
        println!("no checkpoint of `{name}` is below its partition's log start: nothing to accept");
    }
    for ((topic, partition), from, to) in moved {
        println!("`{name}`: `{topic}` partition {partition} moved from {from} to {to} ({} record(s) lost)", to - from);
    }
    Ok(ExitCode::SUCCESS)
}

/// `projector drop-retired`: drop the old tables shadow rebuilds kept.
pub async fn drop_retired(settings: &Settings, name: &str) -> anyhow::Result<ExitCode> {
    let dropped = projector::rebuild::drop_retired(settings, name).await?;
    if dropped.is_empty() {
        println!("no retired tables for `{name}`");
    }
    for schema in dropped {
        println!("dropped schema {schema}");
    }
    Ok(ExitCode::SUCCESS)
}
