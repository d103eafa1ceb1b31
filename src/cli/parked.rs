//! `projector parked list|show|retry|skip`: the events that could not be applied.

use std::process::ExitCode;

use projector::settings::Settings;

use super::find_projection;

#[derive(clap::Subcommand)]
pub enum ParkedCli {
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
pub struct ParkedTarget {
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

/// `projector parked …`.
pub async fn parked(settings: &Settings, command: ParkedCli) -> anyhow::Result<ExitCode> {
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
