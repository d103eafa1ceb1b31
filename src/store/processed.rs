//! `projector.processed_events`, the ids of the events an event-id projection applied: those
//! older than the projection's `keep_event_ids` are deleted, oldest first, in small transactions.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;

/// Rows deleted per statement: a short transaction that holds few locks.
pub const PRUNE_CHUNK: i64 = 10_000;

/// What one [`prune_chunk`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    /// Ids deleted; fewer than [`PRUNE_CHUNK`]: none older is left.
    pub deleted: u64,
    /// The latest `processed_at` among them: no id processed before it is left, so the next
    /// chunk starts its search there.
    pub up_to: Option<DateTime<Utc>>,
}

/// Deletes up to [`PRUNE_CHUNK`] of `projection`'s ids processed more than `keep` ago, oldest
/// first, searching from `from` on (the previous chunk's [`Pruned::up_to`]): the index entries of
/// rows deleted before stay until vacuum, and a search from the start would walk all of them
/// again each time. Rows are deleted by their physical address (a TID scan), not looked up again
/// by id.
pub async fn prune_chunk(
    client: &impl GenericClient,
    projection: &str,
    keep: Duration,
    from: Option<DateTime<Utc>>,
) -> Result<Pruned, tokio_postgres::Error> {
    let row = client
        .query_one(
            "WITH gone AS (
               DELETE FROM projector.processed_events
                WHERE ctid = ANY(ARRAY(
                        SELECT ctid FROM projector.processed_events
                         WHERE projection = $1 AND processed_at >= coalesce($4::timestamptz, '-infinity')
                           AND processed_at < now() - make_interval(secs => $2)
                         ORDER BY processed_at
                         LIMIT $3))
               RETURNING processed_at)
             SELECT count(*), max(processed_at) FROM gone",
            &[&projection, &keep.as_secs_f64(), &PRUNE_CHUNK, &from],
        )
        .await?;
    Ok(Pruned { deleted: row.get::<_, i64>(0) as u64, up_to: row.get(1) })
}
