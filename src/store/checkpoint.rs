//! Checkpoints: the next Kafka offset to read, per projection, topic and partition.
//!
//! A checkpoint only ever moves by compare-and-set from the value the batch started at, inside the
//! batch's transaction: if another instance moved it in the meantime, zero rows change, and the
//! whole batch rolls back.

use std::collections::HashMap;

use tokio_postgres::GenericClient;

use super::error::ApplyError;
use super::{describe, StoreError};
use crate::checkpoint::Move;
pub use crate::checkpoint::TopicPartition;

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

/// How a checkpoint compare-and-set ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cas {
    Moved,
    /// The stored offset was not the one expected: another instance moved it.
    Fenced,
    /// The checkpoints carry another definition's hash (this one's, when given): `projector
    /// accept`, a rebuild, or an instance running another definition wrote them.
    OtherDefinition(String),
}

impl Cas {
    /// `Ok` when the checkpoint moved; else why not, as the batch's error.
    pub fn moved(
        self,
        projection: &crate::projection::Projection,
        partition: &TopicPartition,
    ) -> Result<(), ApplyError> {
        match self {
            Cas::Moved => Ok(()),
            Cas::Fenced => Err(ApplyError::Fenced { partition: partition.clone() }),
            Cas::OtherDefinition(stored) => Err(ApplyError::DefinitionChanged {
                partition: partition.clone(),
                stored,
                running: projection.hash.clone(),
            }),
        }
    }
}

/// Moves one checkpoint from `from` (`None`: no checkpoint yet) to `to`, only if it was written by
/// this definition (`definition_hash`). A first checkpoint is refused while any other checkpoint
/// of the projection carries another definition.
pub async fn compare_and_set(
    client: &impl deadpool_postgres::GenericClient,
    projection: &str,
    move_: &Move,
    definition_hash: &str,
) -> Result<Cas, tokio_postgres::Error> {
    debug_assert!(move_.is_forward(), "a checkpoint never moves backwards");
    let Move { partition, from, to } = move_;
    let changed = match from {
        Some(from) => {
            let statement = client
                .prepare_cached(
                    "UPDATE projector.checkpoints
                        SET next_offset = $5, updated_at = now()
                      WHERE projection = $1 AND topic = $2 AND partition = $3 AND next_offset = $4
                        AND definition_hash = $6",
                )
                .await?;
            client.execute(&statement, &[&projection, &partition.0, &partition.1, &from, &to, &definition_hash]).await?
        }
        None => {
            let statement = client
                .prepare_cached(
                    "INSERT INTO projector.checkpoints (projection, topic, partition, next_offset, definition_hash)
                     SELECT $1, $2, $3, $4, $5
                      WHERE NOT EXISTS (SELECT FROM projector.checkpoints
                                         WHERE projection = $1 AND definition_hash <> $5)
                     ON CONFLICT DO NOTHING",
                )
                .await?;
            client.execute(&statement, &[&projection, &partition.0, &partition.1, &to, &definition_hash]).await?
        }
    };
    if changed == 1 {
        return Ok(Cas::Moved);
    }
    refused(client, projection, definition_hash).await
}

/// Why a compare-and-set changed nothing: another definition's hash, or another instance.
async fn refused(
    client: &impl deadpool_postgres::GenericClient,
    projection: &str,
    definition_hash: &str,
) -> Result<Cas, tokio_postgres::Error> {
    let other = client
        .query_opt(
            "SELECT definition_hash FROM projector.checkpoints WHERE projection = $1 AND definition_hash <> $2 LIMIT 1",
            &[&projection, &definition_hash],
        )
        .await?;
    Ok(match other {
        Some(row) => Cas::OtherDefinition(row.get(0)),
        None => Cas::Fenced,
    })
}

/// Moves one checkpoint from `from` to `to`, backwards too: past records the broker no longer
/// holds, or back to the start of a topic that was created again. A compare-and-set, like
/// [`compare_and_set`].
pub async fn jump(
    client: &impl deadpool_postgres::GenericClient,
    projection: &str,
    partition: &TopicPartition,
    from: i64,
    to: i64,
    definition_hash: &str,
) -> Result<Cas, tokio_postgres::Error> {
    let changed = client
        .execute(
            "UPDATE projector.checkpoints
                SET next_offset = $5, updated_at = now()
              WHERE projection = $1 AND topic = $2 AND partition = $3 AND next_offset = $4 AND definition_hash = $6",
            &[&projection, &partition.0, &partition.1, &from, &to, &definition_hash],
        )
        .await?;
    if changed == 1 {
        return Ok(Cas::Moved);
    }
    refused(client, projection, definition_hash).await
}

/// `projector accept-data-loss`: moves every checkpoint of `projection` that is below its
/// partition's log start (`low`, per partition) to it. Returns what moved: (partition, from, to).
pub async fn accept_data_loss(
    client: &impl GenericClient,
    projection: &str,
    low: &HashMap<TopicPartition, i64>,
) -> Result<Vec<(TopicPartition, i64, i64)>, StoreError> {
    let mut moved = Vec::new();
    for (partition, from) in load_all(client, projection).await? {
        let Some(&to) = low.get(&partition).filter(|low| **low > from) else { continue };
        let changed = client
            .execute(
                "UPDATE projector.checkpoints SET next_offset = $5, updated_at = now()
                  WHERE projection = $1 AND topic = $2 AND partition = $3 AND next_offset = $4",
                &[&projection, &partition.0, &partition.1, &from, &to],
            )
            .await
            .map_err(|error| StoreError::postgres(&error))?;
        if changed == 1 {
            moved.push((partition, from, to));
        }
    }
    moved.sort();
    Ok(moved)
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

/// The definition hashes of a projection's checkpoints, after taking over those written under
/// the hash an earlier projector computed for this same definition
/// ([`crate::projection::compile::legacy_hash`]).
pub async fn adopt_legacy_hash(
    client: &impl GenericClient,
    projection: &crate::projection::Projection,
) -> Result<Vec<String>, StoreError> {
    let legacy = crate::projection::compile::legacy_hash(projection);
    if legacy != projection.hash {
        let adopted = client
            .execute(
                "UPDATE projector.checkpoints SET definition_hash = $2 WHERE projection = $1 AND definition_hash = $3",
                &[&projection.name, &projection.hash, &legacy],
            )
            .await
            .map_err(|error| StoreError::postgres(&error))?;
        if adopted > 0 {
            tracing::info!(projection = %projection.name, checkpoints = adopted,
                "checkpoints written by an earlier projector version for this same definition: now under its current hash");
        }
    }
    definition_hashes(client, &projection.name).await
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
