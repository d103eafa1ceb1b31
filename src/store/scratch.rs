//! Scratch databases, made and dropped whole (the demo's, and one per projection for
//! `projector test`), and what a fixture run does to one: empty a projection's tables, read its
//! rows back as text.

use super::{connect, StoreError};

/// Drops and creates database `name` on `url`'s server.
pub async fn recreate_database(url: &str, name: &str) -> Result<(), StoreError> {
    let pool = connect(url, 1).await?;
    let client = super::client(&pool).await?;
    for statement in [format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"), format!("CREATE DATABASE \"{name}\"")]
    {
        client.batch_execute(&statement).await.map_err(|error| StoreError::postgres(&error))?;
    }
    Ok(())
}

/// Drops database `name` on `url`'s server, if it is there.
pub async fn drop_database(url: &str, name: &str) -> Result<(), StoreError> {
    let pool = connect(url, 1).await?;
    let client = super::client(&pool).await?;
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await
        .map_err(|error| StoreError::postgres(&error))
}

/// Empties `tables` and the engine's rows of `projection` (checkpoints, processed ids, held and
/// parked events), as before its first event. `projection` must be a plain identifier.
pub async fn reset_projection(
    client: &tokio_postgres::Client,
    projection: &str,
    tables: impl IntoIterator<Item = String>,
) -> Result<(), tokio_postgres::Error> {
    debug_assert!(crate::projection::is_identifier(projection), "{projection}");
    let mut sql = format!("TRUNCATE {}", tables.into_iter().collect::<Vec<_>>().join(", "));
    for table in ["checkpoints", "processed_events", "held_events", "dead_letters"] {
        sql.push_str(&format!("; DELETE FROM projector.{table} WHERE projection = '{projection}'"));
    }
    client.batch_execute(&sql).await
}

/// Every row of `table`, each of `columns` as Postgres prints it (`None`: NULL).
pub async fn rows_as_text(
    client: &tokio_postgres::Client,
    table: &str,
    columns: &[String],
) -> Result<Vec<Vec<Option<String>>>, tokio_postgres::Error> {
    let selected: Vec<String> = columns.iter().map(|column| format!("({column})::text")).collect();
    let select = if columns.is_empty() {
        format!("SELECT FROM {table}")
    } else {
        format!("SELECT {} FROM {table}", selected.join(", "))
    };
    let rows = client.query(&select, &[]).await?;
    Ok(rows.iter().map(|row| (0..columns.len()).map(|i| row.get::<_, Option<String>>(i)).collect()).collect())
}
