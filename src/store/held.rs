//! Held events (`projector.held_events`): an event whose predecessor has not been applied waits
//! there. They are released in version order once it is, parked when they wait too long
//! (`parking.gap_timeout_secs`), and swept for releases another lane or instance made possible.

use deadpool_postgres::Transaction;

use super::checkpoint;
use super::error::ApplyError;
use super::event::{run_isolated, Processed, Source};
use super::fast::{self, Applier};
use super::park::{park, ParkClass};
use super::stored::{self, record_at};
use crate::checkpoint::{Move, TopicPartition};
use crate::outcome::{self, BatchReport, Outcome};
use crate::projection::{Dedupe, Projection, Record};

/// How far [`release_key`] got.
pub(super) enum Released {
    /// No held event of the key is left.
    All,
    /// The next one still waits for its predecessor.
    Partly,
    /// One was parked: the rest stay held behind it.
    Parked,
}

/// Applies the held events of `key` (as stored) in version order, as far as they follow on.
pub(super) async fn release_key(
    tx: &Transaction<'_>,
    projection: &Projection,
    key: &str,
    report: &mut BatchReport,
    isolate: bool,
) -> Result<Released, ApplyError> {
    let rows = tx
        .query(
            "SELECT version, topic, partition, \"offset\", record_key, record_value,
                    header_names, header_values, timestamp_ms
               FROM projector.held_events
              WHERE projection = $1 AND entity_key = $2
              ORDER BY version",
            &[&projection.name, &key],
        )
        .await
        .map_err(ApplyError::during("reading held events"))?;
    let mut result = Released::All;
    let held: Vec<(i64, Record)> = rows.iter().map(|row| (row.get(0), record_at(row, 1))).collect();
    projection.ensure_schemas(held.iter().map(|(_, record)| record)).await?;
    for (version, record) in held {
        let decoded = projection.decode(&record);
        match run_isolated(tx, projection, &record, &decoded, Source::Held, Some(key), isolate).await? {
            // Its predecessor is still missing: it and its successors stay held.
            Some(Processed { outcome: Outcome::Gap, .. }) => {
                result = Released::Partly;
                break;
            }
            Some(Processed { label, outcome: Outcome::Applied, .. }) => {
                tracing::info!(projection = %projection.name, key = %stored::shown_key(key), version, "held event applied: its predecessor arrived");
                report.released += 1;
                report.count(&label, Outcome::Applied);
            }
            // Already reflected (a redelivered copy applied first), or no longer handled.
            Some(_) => {}
            None => {
                report.count(&outcome::label(projection, &decoded), Outcome::Parked);
                result = Released::Parked;
            }
        }
        tx.execute(
            "DELETE FROM projector.held_events WHERE projection = $1 AND entity_key = $2 AND version = $3",
            &[&projection.name, &key, &version],
        )
        .await
        .map_err(ApplyError::during("releasing held events"))?;
        if matches!(result, Released::Parked) {
            // Its successors stay held; they are parked behind it when they time out, or applied
            // after it by `projector parked retry`.
            break;
        }
    }
    Ok(result)
}

/// Parks the held events of `partitions` that have waited longer than `after_secs` for their
/// predecessor (class `gap_timeout`), key by key in version order: the key is then parked, and
/// its later events are parked behind them. `partitions` are the ones this instance owns, with
/// their stored checkpoints: each is compare-and-set to itself first, which fences a sweep by an
/// instance that lost the partition and orders the sweep with the owner's batches.
pub async fn park_expired_gaps(
    client: &mut deadpool_postgres::Object,
    projection: &Projection,
    partitions: &[(TopicPartition, i64)],
    after_secs: u64,
) -> Result<u64, ApplyError> {
    if partitions.is_empty() {
        return Ok(0);
    }
    let tx = client.transaction().await.map_err(ApplyError::during("beginning the gap sweep"))?;
    let topics: Vec<&str> = partitions.iter().map(|((topic, _), _)| topic.as_str()).collect();
    let numbers: Vec<i32> = partitions.iter().map(|((_, partition), _)| *partition).collect();
    // Cheap when nothing is expired: one indexed read, no locks.
    let expired: i64 = tx
        .query_one(
            "SELECT count(*) FROM projector.held_events h
               JOIN unnest($2::text[], $3::int[]) AS p(topic, partition) USING (topic, partition)
              WHERE h.projection = $1 AND h.held_at < now() - make_interval(secs => $4)",
            &[&projection.name, &topics, &numbers, &(after_secs as f64)],
        )
        .await
        .map_err(ApplyError::during("counting expired gaps"))?
        .get(0);
    if expired == 0 {
        return Ok(0);
    }
    hold_checkpoints(&tx, projection, partitions).await?;
    let rows = tx
        .query(
            "DELETE FROM projector.held_events h
              USING unnest($2::text[], $3::int[]) AS p(topic, partition)
              WHERE h.projection = $1 AND h.topic = p.topic AND h.partition = p.partition
                AND h.held_at < now() - make_interval(secs => $4)
             RETURNING h.entity_key, h.version, h.found_version, h.topic, h.partition, h.\"offset\",
                       h.record_key, h.record_value, h.header_names, h.header_values, h.timestamp_ms,
                       h.held_at::text",
            &[&projection.name, &topics, &numbers, &(after_secs as f64)],
        )
        .await
        .map_err(ApplyError::during("taking expired gaps"))?;
    let mut expired: Vec<(String, i64, Option<i64>, String, Record)> =
        rows.into_iter().map(|row| (row.get(0), row.get(1), row.get(2), row.get(11), record_at(&row, 3))).collect();
    expired.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    projection.ensure_schemas(expired.iter().map(|expired| &expired.4)).await?;
    for (key, version, found, held_at, record) in &expired {
        let row = found.map_or("no row".to_string(), |found| format!("the row at version {found}"));
        let message = format!(
            "held since {held_at} for the predecessor of version {version} of key `{}` ({row}), which did not \
             arrive within {after_secs} s",
            stored::shown_key(key)
        );
        let decoded = projection.decode(record);
        park(&tx, projection, record, outcome::event_type(&decoded), Some(key), ParkClass::GapTimeout, &message)
            .await?;
    }
    tx.commit().await.map_err(ApplyError::during("committing the gap sweep"))?;
    Ok(expired.len() as u64)
}

/// What a sweep of held events did.
#[derive(Debug, Default)]
pub struct Swept {
    /// Held events of the keys released, as counted when applied (`applied`) or parked.
    pub report: BatchReport,
    /// Keys of the partitions swept that still have held events.
    pub still_held: usize,
}

/// Releases the held events of `partitions` whose predecessor has been applied meanwhile by a
/// batch that could not see them: one of another lane or instance (a key's events in several
/// partitions or topics) that read the key's state before the hold committed. `partitions` are
/// the ones this instance owns, with their stored checkpoints, each compare-and-set to itself
/// first, as for [`park_expired_gaps`]. Only keys whose row has reached the version before their
/// first held event are tried.
pub async fn release_ready(
    client: &mut deadpool_postgres::Object,
    applier: &Applier,
    projection: &Projection,
    partitions: &[(TopicPartition, i64)],
) -> Result<Swept, ApplyError> {
    let mut swept = Swept::default();
    let Dedupe::Version(table) = &projection.dedupe else {
        return Ok(swept);
    };
    if partitions.is_empty() {
        return Ok(swept);
    }
    let tx = client.transaction().await.map_err(ApplyError::during("beginning the release sweep"))?;
    let topics: Vec<&str> = partitions.iter().map(|((topic, _), _)| topic.as_str()).collect();
    let numbers: Vec<i32> = partitions.iter().map(|((_, partition), _)| *partition).collect();
    let held: Vec<(String, i64)> = tx
        .query(
            "SELECT h.entity_key, min(h.version) FROM projector.held_events h
               JOIN unnest($2::text[], $3::int[]) AS p(topic, partition) USING (topic, partition)
              WHERE h.projection = $1
              GROUP BY h.entity_key",
            &[&projection.name, &topics, &numbers],
        )
        .await
        .map_err(ApplyError::during("reading held events"))?
        .into_iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    swept.still_held = held.len();
    if held.is_empty() {
        return Ok(swept);
    }
    // Keys stored by digest cannot be looked up in the read model: they are always tried.
    let plain: Vec<&str> = held.iter().map(|(key, _)| key.as_str()).filter(|key| !key.starts_with("sha256:")).collect();
    let rows = fast::current_versions(&tx, applier, table, &plain).await?;
    let ready: Vec<&str> = held
        .iter()
        .filter(|(key, first)| {
            key.starts_with("sha256:") || rows.get(key).copied().flatten().is_some_and(|at| at >= first - 1)
        })
        .map(|(key, _)| key.as_str())
        .collect();
    if ready.is_empty() {
        return Ok(swept);
    }
    hold_checkpoints(&tx, projection, partitions).await?;
    for key in ready {
        if matches!(release_key(&tx, projection, key, &mut swept.report, true).await?, Released::All) {
            swept.still_held -= 1;
        }
    }
    tx.commit().await.map_err(ApplyError::during("committing the release sweep"))?;
    Ok(swept)
}

/// Takes the checkpoints of `partitions` (each at its owner's `checkpoint`, unchanged) into the
/// transaction: a sweep commits only while this instance, on this definition, still owns them.
async fn hold_checkpoints(
    tx: &Transaction<'_>,
    projection: &Projection,
    partitions: &[(TopicPartition, i64)],
) -> Result<(), ApplyError> {
    for (partition, checkpoint) in partitions {
        let stay = Move::stay(partition.clone(), *checkpoint);
        let kept = checkpoint::compare_and_set(tx, &projection.name, &stay, &projection.hash)
            .await
            .map_err(ApplyError::during("moving the checkpoints"))?;
        kept.moved(projection, partition)?;
    }
    Ok(())
}
