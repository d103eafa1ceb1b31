//! The only place that speaks SQL: the connection pool, migrations, checkpoints, and applying a
//! batch of events with its checkpoint moves in one transaction ([`apply`]).

pub mod apply;
pub mod checkpoint;
pub mod column;
pub mod demo;
pub mod error;
pub mod event;
pub mod fast;
mod grouped;
pub mod held;
pub mod lag;
pub mod park;
pub mod parked;
pub mod plan;
pub mod processed;
pub mod rebuild;
pub mod schema;
pub mod scratch;
pub mod stored;
pub mod tls;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};

use crate::settings::redact_text;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// A connection from `pool`; what stops it is told without the URL's password.
pub async fn client(pool: &Pool) -> Result<deadpool_postgres::Object, StoreError> {
    pool.get().await.map_err(|error| StoreError::Connect(redact_text(&error.to_string())))
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid database url: {0}")]
    Url(String),
    #[error("cannot connect to postgres: {0}")]
    Connect(String),
    #[error("migration failed: {0}")]
    Migrate(String),
    #[error("postgres: {0}")]
    Postgres(String),
}

impl StoreError {
    pub fn postgres(error: &tokio_postgres::Error) -> StoreError {
        StoreError::Postgres(describe(error))
    }
}

/// A Postgres error as one line: the server's message with its SQLSTATE and detail, or the
/// client's own; never the connection string.
pub fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => {
            let mut text = format!("{} ({})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                text.push_str(": ");
                text.push_str(detail);
            }
            text
        }
        None => {
            let mut text = error.to_string();
            let mut source = std::error::Error::source(error);
            while let Some(inner) = source {
                text.push_str(": ");
                text.push_str(&inner.to_string());
                source = inner.source();
            }
            redact_text(&text)
        }
    }
}

/// A pool over `url`, checked with one round trip so that a wrong URL fails at start-up.
pub async fn connect(url: &str, size: usize) -> Result<Pool, StoreError> {
    connect_with_search_path(url, size, None).await
}

/// [`connect`], with every connection's `search_path` set (a rebuild writes its shadow tables
/// through the same unqualified names as the live ones).
pub async fn connect_with_search_path(url: &str, size: usize, search_path: Option<&str>) -> Result<Pool, StoreError> {
    let tls::Target { mut config, tls, .. } = tls::target(url)?;
    if let Some(search_path) = search_path {
        let options = config.get_options().map(str::to_string).unwrap_or_default();
        config.options(format!("{options} -c search_path={search_path}").trim());
    }
    let manager = Manager::from_config(config, tls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    let pool = Pool::builder(manager).max_size(size).build().map_err(|error| StoreError::Connect(error.to_string()))?;
    let client = client(&pool).await?;
    client.simple_query("SELECT 1").await.map_err(|error| StoreError::Connect(describe(&error)))?;
    Ok(pool)
}

/// Applies the engine's own migrations (`migrations/`, embedded: schema `projector`) that this
/// database has not seen yet, each exactly once, under an advisory lock so that instances
/// starting together do not race.
pub async fn migrate(url: &str) -> Result<Vec<String>, StoreError> {
    migrate_with(url, &[]).await
}

/// [`migrate`], then the read models' migrations of each projection ([`schema`]), under the same
/// lock. Returns what was applied: the engine's as `V<n>__<name>`, the projections' as
/// `<projection>: V<n>__<name>`.
pub async fn migrate_with(url: &str, projections: &[crate::projection::Projection]) -> Result<Vec<String>, StoreError> {
    let mut locked = MigrationLock::take(url).await?;
    let result = async {
        let mut applied = migrate_engine(&mut locked.client).await?;
        applied.extend(schema::apply(&mut locked.client, projections).await?);
        Ok(applied)
    }
    .await;
    locked.release().await;
    result
}

/// [`migrate`], then the migrations of each of `projections` whose read model its current
/// definition built (or that has none yet). A projection whose checkpoints another definition of
/// it wrote waits for a rebuild or `projector accept` (the worker's definition gate), and so do
/// its migrations: the live tables keep serving the old definition meanwhile (a shadow rebuild
/// applies them to its copies; `accept` in place). Returns the migrations applied and the
/// projections whose migrations wait. One connection, under the lock throughout.
pub async fn migrate_current(
    url: &str,
    projections: &[crate::projection::Projection],
) -> Result<(Vec<String>, Vec<String>), StoreError> {
    let mut locked = MigrationLock::take(url).await?;
    let result = async {
        let mut applied = migrate_engine(&mut locked.client).await?;
        let (mut current, mut waiting) = (Vec::new(), Vec::new());
        for projection in projections {
            let hashes = checkpoint::adopt_legacy_hash(&locked.client, projection).await?;
            if hashes.iter().all(|hash| *hash == projection.hash) {
                current.push(projection.clone());
            } else if !projection.migrations.is_empty() {
                waiting.push(projection.name.clone());
            }
        }
        applied.extend(schema::apply(&mut locked.client, &current).await?);
        Ok((applied, waiting))
    }
    .await;
    locked.release().await;
    result
}

/// A connection of its own holding the migrations' advisory lock: instances starting together
/// migrate one after the other.
struct MigrationLock {
    client: tokio_postgres::Client,
    driver: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
}

impl MigrationLock {
    const KEY: i64 = 0x7072_6f6a_6563_746f; // "projecto"

    async fn take(url: &str) -> Result<MigrationLock, StoreError> {
        let tls::Target { config, tls, .. } = tls::target(url)?;
        let (client, connection) = config.connect(tls).await.map_err(|error| StoreError::Connect(describe(&error)))?;
        let driver = tokio::spawn(connection);
        client
            .execute("SELECT pg_advisory_lock($1)", &[&Self::KEY])
            .await
            .map_err(|error| StoreError::Migrate(describe(&error)))?;
        Ok(MigrationLock { client, driver })
    }

    async fn release(self) {
        let _ = self.client.execute("SELECT pg_advisory_unlock($1)", &[&Self::KEY]).await;
        drop(self.client);
        let _ = self.driver.await;
    }
}

/// The engine's own migrations, on a connection that holds the lock.
async fn migrate_engine(client: &mut tokio_postgres::Client) -> Result<Vec<String>, StoreError> {
    forget_shop_migration(client).await.map_err(|error| StoreError::Migrate(describe(&error)))?;
    let report = embedded::migrations::runner()
        .run_async(client)
        .await
        .map_err(|error| StoreError::Migrate(error.to_string()))?;
    Ok(report.applied_migrations().iter().map(|migration| migration.to_string()).collect())
}

/// The engine's migration `V2__shop_read_models` created the example shop's tables in every
/// database; they now come with the example projections (`projections/*/migrations`, whose first
/// migrations create them only if they do not exist). A database migrated before keeps its tables
/// and their rows; the engine's history forgets V2, which it no longer has.
async fn forget_shop_migration(client: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    let history = client.query_one("SELECT to_regclass('refinery_schema_history') IS NOT NULL", &[]).await?;
    if history.get(0) {
        let forgotten = client
            .execute("DELETE FROM refinery_schema_history WHERE version = 2 AND name = 'shop_read_models'", &[])
            .await?;
        if forgotten > 0 {
            tracing::info!("the engine's migration V2__shop_read_models is forgotten: the tables it made (order_summary, customer_totals) are kept, and now belong to the example projections' own migrations");
        }
    }
    Ok(())
}

/// Prepares every statement of every projection against the live schema (with `set_based`, also
/// the forms that apply many events at once); returns one message per statement that does not
/// fit it (missing table or column, type mismatch, …), with file and line.
pub async fn check_statements(
    client: &tokio_postgres::Client,
    projections: &[crate::projection::Projection],
    set_based: bool,
) -> Vec<String> {
    let mut problems = Vec::new();
    for projection in projections {
        let mut statements: Vec<(&str, &crate::projection::Statement)> = projection
            .handlers
            .iter()
            .flat_map(|(event_type, handler)| handler.statements.iter().map(move |s| (&**event_type, s)))
            .collect();
        if let crate::projection::Dedupe::Version(table) = &projection.dedupe {
            statements.push(("version lookup", &table.version_lookup));
        }
        for (event_type, statement) in statements {
            let problem = match client.prepare(&statement.sql).await {
                Err(error) => Some(describe(&error)),
                Ok(prepared) => match (&statement.set_based, &projection.dedupe) {
                    // Its form for many events at once, as the fast path would run it.
                    (Some(set), crate::projection::Dedupe::Version(table)) if set_based => {
                        let types: Vec<String> = prepared.params().iter().map(column::sql_type).collect();
                        client.prepare(&set.sql_changed_keys(&types, &table.key_column)).await.err().map(|error| {
                            format!(
                                "{} (in the form applying many events in one statement; \
                                 `batch.set_based = false` applies them one by one)",
                                describe(&error)
                            )
                        })
                    }
                    _ => None,
                },
            };
            if let Some(problem) = problem {
                problems.push(format!(
                    "{}: statement for `{}` of projection `{}` does not fit the database: {problem}",
                    statement.origin, event_type, projection.name,
                ));
            }
        }
    }
    problems
}

/// One connection of its own (for transactions that need `&mut Client`), driven in the background.
pub async fn connect_client(url: &str) -> Result<tokio_postgres::Client, StoreError> {
    let tls::Target { config, tls, .. } = tls::target(url)?;
    let (client, connection) = config.connect(tls).await.map_err(|error| StoreError::Connect(describe(&error)))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(error = %describe(&error), "connection closed");
        }
    });
    Ok(client)
}
