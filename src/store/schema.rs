//! The read models' own tables. A projection defined in `<projections_dir>/NAME.toml` brings its
//! schema as SQL migrations in `<projections_dir>/NAME/migrations/`, named
//! `V<version>__<description>.sql`. They are applied by `projector migrate` and at the start of
//! `run` and `rebuild`, in version order, each once, after the engine's own migrations and under
//! the same advisory lock (instances starting together do not race). Each projection has its own
//! history table, `projector.migrations_<projection>` (refinery's layout: version, name,
//! applied_on, checksum), so teams number their migrations independently.
//!
//! A migration that was applied is never applied again; one edited since is refused, naming the
//! file, as is an applied one that is no longer there: a schema changes by a new migration.

use std::path::PathBuf;

use refinery::{Migration, Runner};

use super::StoreError;
use crate::projection::Projection;

/// Where `projection`'s migration `migration` was read from.
fn file(projection: &Projection, migration: &Migration) -> PathBuf {
    projection.migrations_dir.join(format!("{migration}.sql"))
}

/// `projector.migrations_<projection>`; a long name is shortened to its start and a hash so that
/// the table's name stays within Postgres' 63 bytes.
pub fn history_table(projection: &str) -> String {
    const PREFIX: &str = "migrations_";
    const MAX: usize = 63;
    let name = if PREFIX.len() + projection.len() <= MAX {
        format!("{PREFIX}{projection}")
    } else {
        let hash = crate::projection::compile::hex_sha256(projection);
        let mut end = MAX - PREFIX.len() - 11;
        while !projection.is_char_boundary(end) {
            end -= 1;
        }
        format!("{PREFIX}{}_{}", &projection[..end], &hash[..10])
    };
    format!("projector.{name}")
}

/// Applies what each projection has not applied yet of its migrations on `client`'s database,
/// in order, each in a transaction of its own with its history row. Returns the migrations
/// applied, as `<projection>: V<n>__<description>`. The caller holds the migration lock.
pub async fn apply(client: &mut tokio_postgres::Client, projections: &[Projection]) -> Result<Vec<String>, StoreError> {
    let mut applied = Vec::new();
    for projection in projections.iter().filter(|projection| !projection.migrations.is_empty()) {
        let mut runner = Runner::new(&projection.migrations).set_abort_divergent(true).set_abort_missing(true);
        runner.set_migration_table_name(history_table(&projection.name));
        let report = runner.run_async(client).await.map_err(|error| explain(projection, &error))?;
        applied.extend(report.applied_migrations().iter().map(|migration| format!("{}: {migration}", projection.name)));
    }
    Ok(applied)
}

/// A refinery error in words that name the file and say what to do.
fn explain(projection: &Projection, error: &refinery::Error) -> StoreError {
    use refinery::error::Kind;
    let name = &projection.name;
    StoreError::Migrate(match error.kind() {
        Kind::DivergentVersion(applied, _) => format!(
            "projection `{name}`: `{}` was changed after it was applied{}: an applied migration is never applied again; \
             restore it, and change the schema with a new migration",
            file(projection, applied).display(),
            applied.applied_on().map(|at| format!(" (on {at})")).unwrap_or_default()
        ),
        Kind::MissingVersion(applied) => format!(
            "projection `{name}`: migration `{applied}` was applied (its history is in {}) but `{}` is gone: restore it",
            history_table(name),
            file(projection, applied).display()
        ),
        _ => {
            let mut text = format!("projection `{name}` ({}): {error}", projection.migrations_dir.display());
            let mut source = std::error::Error::source(error);
            while let Some(inner) = source {
                text.push_str(": ");
                match inner.downcast_ref::<tokio_postgres::Error>() {
                    Some(postgres) => text.push_str(&super::describe(postgres)),
                    None => text.push_str(&inner.to_string()),
                }
                source = inner.source();
            }
            text
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_tables_fit_in_an_identifier_and_differ() {
        assert_eq!(history_table("order_summary"), "projector.migrations_order_summary");
        let long = "a".repeat(60);
        let longer = format!("{long}b");
        let (one, two) = (history_table(&long), history_table(&longer));
        assert!(one.len() - "projector.".len() <= 63, "{one}");
        assert!(two.len() - "projector.".len() <= 63, "{two}");
        assert_ne!(one, two);
    }
}
