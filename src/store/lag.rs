//! What measuring lag and probing health read from Postgres: every checkpoint of a set of
//! projections with when it last moved, and a one-round-trip ping.

use std::collections::HashMap;

use deadpool_postgres::Pool;

use super::checkpoint::TopicPartition;
use super::{describe, StoreError};

/// A stored checkpoint, with when it last moved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StoredCheckpoint {
    /// The next offset the projection reads.
    pub next_offset: i64,
    /// When it last moved (Unix seconds).
    pub updated_unix: f64,
}

/// Every stored checkpoint of `projections`, by projection and partition.
pub async fn checkpoints(
    pool: &Pool,
    projections: &[String],
) -> Result<HashMap<(String, TopicPartition), StoredCheckpoint>, StoreError> {
    let client = super::client(pool).await?;
    let rows = client
        .query(
            "SELECT projection, topic, partition, next_offset, extract(epoch FROM updated_at)::float8
               FROM projector.checkpoints WHERE projection = ANY($1)",
            &[&projections],
        )
        .await
        .map_err(|error| StoreError::Postgres(describe(&error)))?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let key = (row.get::<_, String>(0), (row.get::<_, String>(1), row.get::<_, i32>(2)));
            (key, StoredCheckpoint { next_offset: row.get(3), updated_unix: row.get(4) })
        })
        .collect())
}

/// Whether Postgres answers `SELECT 1` on a connection of `pool`; why not, as one line.
pub async fn ping(pool: &Pool) -> Result<(), String> {
    let client = pool.get().await.map_err(|error| format!("postgres: {error}"))?;
    client.simple_query("SELECT 1").await.map_err(|error| format!("postgres: {}", describe(&error)))?;
    Ok(())
}
