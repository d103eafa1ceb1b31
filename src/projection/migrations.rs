//! A projection's migrations as files: the folder beside its definition
//! (`projections/NAME/migrations/V<version>__<description>.sql`), read and parsed, versions
//! unique. `store::schema` applies them.

use std::path::{Path, PathBuf};

use refinery::Migration;

/// The folder holding the migrations of the projection defined in `definition`: beside it, named
/// like it without `.toml` (`projections/accounts.toml`: `projections/accounts/migrations`).
pub fn dir_of(definition: &Path) -> PathBuf {
    definition.with_extension("").join("migrations")
}

/// A migration's problem: the file (or folder) and what is wrong.
pub type LoadError = (PathBuf, String);

/// Reads the migrations in `dir` (none when it does not exist), in version order. Every `.sql`
/// file must be named `V<version>__<description>.sql`, with versions unique; other files are
/// left alone.
pub fn read_dir(dir: &Path) -> Result<Vec<Migration>, LoadError> {
    let mut migrations = Vec::new();
    match std::fs::read_dir(dir) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err((dir.to_path_buf(), format!("cannot read the folder: {error}"))),
        Ok(entries) => {
            let mut paths = Vec::new();
            for entry in entries {
                let path =
                    entry.map_err(|error| (dir.to_path_buf(), format!("cannot read the folder: {error}")))?.path();
                if path.extension().is_some_and(|ext| ext == "sql") {
                    paths.push(path);
                }
            }
            paths.sort();
            for path in paths {
                let sql = std::fs::read_to_string(&path)
                    .map_err(|error| (path.clone(), format!("cannot read the migration: {error}")))?;
                let stem = path.file_stem().and_then(|stem| stem.to_str()).unwrap_or_default().to_string();
                migrations.push(parse(&stem, &sql).map_err(|message| (path, message))?);
            }
        }
    }
    migrations.sort();
    if let Some(pair) = migrations.windows(2).find(|pair| pair[0].version() == pair[1].version()) {
        return Err((
            dir.join(format!("{}.sql", pair[1])),
            format!("version {} is also that of `{}.sql`: versions must be unique", pair[0].version(), pair[0]),
        ));
    }
    Ok(migrations)
}

/// One migration from its file name without `.sql` and its text.
pub fn parse(stem: &str, sql: &str) -> Result<Migration, String> {
    let named = "a migration's file name must be `V<version>__<description>.sql`, e.g. `V1__create_accounts.sql`";
    if stem.starts_with('U') {
        return Err(format!("{named}: unversioned (`U`) migrations are not supported"));
    }
    Migration::unapplied(stem, sql).map_err(|_| named.to_string())
}
