//! Checkpoints: the next Kafka offset to read, per projection, topic and partition.
//!
//! A checkpoint only ever moves by compare-and-set from the value the batch started at, inside the
//! batch's transaction: if another instance moved it in the meantime, zero rows change, and the
//! whole batch rolls back.

use std::collections::HashMap;

use tokio_postgres::GenericClient;

use super::{describe, StoreError};

/// A partition of a topic.
pub type TopicPartition = (String, i32);

/// Stored checkpoints of one projection for the given partitions (absent: never checkpointed).
pub async fn load(
    client: &impl GenericClient,
    projection: &str,
    partitions: &[TopicPartition],
) -> Result<HashMap<TopicPartition, i64>, StoreError> {
    let topics: Vec<&str> = partitions.iter().map(|(topic, _)| topic.as_str()).collect();
    let numbers: Vec<i32> = partitions.iter().map(|(_, partition)| *partition).collect();
    let rows = client
        .query(
            "SELECT c.topic, c.partition, c.next_offset
               FROM projector.checkpoints c
               JOIN unnest($2::text[], $3::int4[]) AS p(topic, partition)
                 ON p.topic = c.topic AND p.partition = c.partition
              WHERE c.projection = $1",
            &[&projection, &topics, &numbers],
        )
        .await
        .map_err(|error| StoreError::postgres(&error))?;
    Ok(rows.into_iter().map(|row| ((row.get::<_, String>(0), row.get::<_, i32>(1)), row.get::<_, i64>(2))).collect())
}

/// Every stored checkpoint of one projection.
pub async fn load_all(
    client: &impl GenericClient,
    projection: &str,
) -> Result<HashMap<TopicPartition, i64>, StoreError> {
    let rows = client
        .query("SELECT topic, partition, next_offset FROM projector.checkpoints WHERE projection = $1", &[&projection])
        .await
        .map_err(|error| StoreError::postgres(&error))?;
    Ok(rows.into_iter().map(|row| ((row.get::<_, String>(0), row.get::<_, i32>(1)), row.get::<_, i64>(2))).collect())
}

/// Moves one checkpoint from `from` (`None`: no checkpoint yet) to `to`. Returns false when the
/// stored value was not `from`: someone else moved it, and the caller must roll back.
pub async fn compare_and_set(
    client: &impl deadpool_postgres::GenericClient,
    projection: &str,
    partition: &TopicPartition,
    from: Option<i64>,
    to: i64,
    definition_hash: &str,
) -> Result<bool, tokio_postgres::Error> {
    debug_assert!(from.is_none_or(|from| from <= to), "a checkpoint never moves backwards");
    let changed = match from {
        Some(from) => {
            let statement = client
                .prepare_cached(
                    "UPDATE projector.checkpoints
                        SET next_offset = $5, definition_hash = $6, updated_at = now()
                      WHERE projection = $1 AND topic = $2 AND partition = $3 AND next_offset = $4",
                )
                .await?;
            client.execute(&statement, &[&projection, &partition.0, &partition.1, &from, &to, &definition_hash]).await?
        }
        None => {
            let statement = client
                .prepare_cached(
                    "INSERT INTO projector.checkpoints (projection, topic, partition, next_offset, definition_hash)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT DO NOTHING",
                )
                .await?;
            client.execute(&statement, &[&projection, &partition.0, &partition.1, &to, &definition_hash]).await?
        }
    };
    Ok(changed == 1)
}

/// Forgets a projection's checkpoints (the next run starts from the beginning of each partition).
pub async fn reset(client: &impl GenericClient, projection: &str) -> Result<u64, StoreError> {
    client
        .execute("DELETE FROM projector.checkpoints WHERE projection = $1", &[&projection])
        .await
        .map_err(|error| StoreError::Postgres(describe(&error)))
}

/// The distinct definition hashes recorded with a projection's checkpoints (empty: never ran).
pub async fn definition_hashes(client: &impl GenericClient, projection: &str) -> Result<Vec<String>, StoreError> {
    let rows = client
        .query("SELECT DISTINCT definition_hash FROM projector.checkpoints WHERE projection = $1", &[&projection])
        .await
        .map_err(|error| StoreError::postgres(&error))?;
    Ok(rows.into_iter().map(|row| row.get(0)).collect())
}

/// Records that a projection's rows are accepted as built by its current definition.
pub async fn accept_definition(client: &impl GenericClient, projection: &str, hash: &str) -> Result<u64, StoreError> {
    client
        .execute(
            "UPDATE projector.checkpoints SET definition_hash = $2 WHERE projection = $1 AND definition_hash <> $2",
            &[&projection, &hash],
        )
        .await
        .map_err(|error| StoreError::postgres(&error))
}
