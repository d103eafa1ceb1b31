//! `projector.processed_events`, the ids of the events an event-id projection applied: those
//! older than the projection's `keep_event_ids` are deleted, oldest first, in small transactions.

use std::time::Duration;

use tokio_postgres::GenericClient;

/// Rows deleted per statement: a short transaction that holds few locks.
pub const PRUNE_CHUNK: i64 = 10_000;

/// Deletes up to [`PRUNE_CHUNK`] of `projection`'s ids processed more than `keep` ago; returns
/// how many it deleted (fewer than the chunk: none older is left).
pub async fn prune_chunk(
    client: &impl GenericClient,
    projection: &str,
    keep: Duration,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "DELETE FROM projector.processed_events
              WHERE projection = $1
                AND event_id IN (SELECT event_id FROM projector.processed_events
                                  WHERE projection = $1 AND processed_at < now() - make_interval(secs => $2)
                                  ORDER BY processed_at
                                  LIMIT $3)",
            &[&projection, &keep.as_secs_f64(), &PRUNE_CHUNK],
        )
        .await
}
