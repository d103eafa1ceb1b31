//! Applying one batch: every event's statements, the held-event releases they unlock, and the
//! checkpoint moves, in ONE transaction. Each event gets exactly one [`Outcome`].

use std::borrow::Cow;
use std::collections::BTreeSet;

use deadpool_postgres::Transaction;

use super::checkpoint;
pub use super::error::{class_of, ApplyError, ErrorClass, Handling};
use super::event::{run_isolated, Processed, Source};
use super::fast::{self, Applier, Fast};
use super::held::{release_key, Released};
use super::park::{park, ParkClass};
use super::stored;
use crate::checkpoint::Move;
use crate::outcome::{self, BatchReport, Outcome};
use crate::projection::{Decoded, Dedupe, Event, Projection, Record};

/// A batch to apply: records in arrival order, and where each partition's checkpoint moves.
pub struct Batch<'a> {
    pub records: &'a [Record],
    /// Where each partition's checkpoint moves, from the stored value the batch started at.
    pub moves: Vec<Move>,
}

/// Applies `batch` in one transaction and commits it. With `isolate`, each event runs inside its
/// own savepoint, so that a statement failing on one event's data parks that event alone.
/// Without, any failure caused by data ([`ErrorClass::Poison`]) rolls the batch back as
/// [`ApplyError::Isolate`], to be retried isolated.
/// `decoded`, when given, holds the batch's records already decoded (in record order), so that
/// decoding can overlap with the previous batch's transaction; a retry decodes them again.
pub async fn apply_batch<'p>(
    client: &mut deadpool_postgres::Object,
    applier: &Applier,
    projection: &'p Projection,
    batch: &Batch<'_>,
    decoded: Option<Vec<Decoded<'p>>>,
    isolate: bool,
) -> Result<BatchReport, ApplyError> {
    let decoded: Vec<Decoded<'_>> = match decoded {
        Some(decoded) if decoded.len() == batch.records.len() => decoded,
        _ => {
            projection.ensure_schemas(batch.records).await?;
            batch.records.iter().map(|record| projection.decode(record)).collect()
        }
    };
    match apply_decoded(client, applier, projection, batch, &decoded, isolate).await {
        Err(ApplyError::Database { class: ErrorClass::Poison, during, source }) if !isolate => {
            Err(ApplyError::Isolate { at: during.to_string(), source })
        }
        result => result,
    }
}

async fn apply_decoded<'p>(
    client: &mut deadpool_postgres::Object,
    applier: &Applier,
    projection: &'p Projection,
    batch: &Batch<'_>,
    decoded: &[Decoded<'p>],
    isolate: bool,
) -> Result<BatchReport, ApplyError> {
    let mut report = BatchReport::default();
    // The key each event is parked under, as stored. Keys of this batch with held events: after
    // one of them applies, its successors are released at once, so later events of the key in
    // this same batch find the row where they expect it. Keys with parked events: every later
    // event of the key is parked behind them, to keep the key's order.
    let keys: Vec<Option<Cow<'_, str>>> = batch
        .records
        .iter()
        .zip(decoded)
        .map(|(record, decoded)| match decoded {
            Decoded::Tombstone | Decoded::Ignored { .. } => None,
            // The envelope's key, as `parking_key` would give it, without copying it.
            Decoded::Handled { event: Event { key: Some(key), .. }, .. } => Some(stored::key(key)),
            _ => projection.parking_key(record, decoded).map(|key| Cow::Owned(stored::key(&key).into_owned())),
        })
        .collect();

    let tx = client.transaction().await.map_err(ApplyError::during("beginning the batch"))?;
    // The set-based statements of the fast path find each row through the key's index: a plan
    // made while the table was small (a hash join over a sequential scan) would otherwise be
    // cached and kept as the table grows. With only nested loops over the key's index left, the
    // arrays bound have little to choose between, so each statement is planned once per
    // connection (a generic plan). Left to choose, Postgres plans every execution for a small
    // batch anew (one event's custom plan looks cheaper than the generic plan's guess of 100
    // rows), and small batches are what a caught-up engine commits (BENCHMARKS, "Latency").
    let planner_off = !isolate && matches!(projection.dedupe, Dedupe::Version(_));
    // One round trip: the checkpoints' compare-and-sets, the keys' states and the planner's
    // settings, pipelined.
    let moves = futures::future::try_join_all(
        batch.moves.iter().map(|move_| checkpoint::compare_and_set(&tx, &projection.name, move_, &projection.hash)),
    );
    let planner = async {
        match planner_off {
            true => {
                tx.batch_execute(
                    "SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off;
                     SET LOCAL plan_cache_mode = force_generic_plan",
                )
                .await
            }
            false => Ok(()),
        }
    };
    let (moved, states, planner) = tokio::join!(moves, key_states(&tx, projection, &keys), planner);
    let moved = moved.map_err(ApplyError::during("moving the checkpoints"))?;
    for (move_, cas) in batch.moves.iter().zip(moved) {
        cas.moved(projection, &move_.partition)?;
    }
    let KeyStates { mut held, mut parked } = states?;
    planner.map_err(ApplyError::during("setting the planner"))?;
    if batch.records.is_empty() {
        // Only checkpoints move (past transaction markers).
        tx.commit().await.map_err(ApplyError::during("committing"))?;
        return Ok(report);
    }
    if !isolate && held.is_empty() && parked.is_empty() {
        if let Fast::Done(report) = fast::try_apply(&tx, applier, projection, batch.records, decoded).await? {
            tx.commit().await.map_err(ApplyError::during("committing"))?;
            return Ok(report);
        }
    }
    // Event by event, with the planner's settings as the user left them.
    if planner_off {
        tx.batch_execute("RESET enable_hashjoin; RESET enable_mergejoin; RESET plan_cache_mode")
            .await
            .map_err(ApplyError::during("resetting the planner"))?;
    }
    for ((record, decoded), key) in batch.records.iter().zip(decoded).zip(keys) {
        if let Some(key) = key.as_deref().filter(|key| parked.contains(*key)) {
            let message = format!(
                "parked behind an earlier parked event of key `{}`, to keep the key's order",
                stored::shown_key(key)
            );
            park(&tx, projection, record, outcome::event_type(decoded), Some(key), ParkClass::Blocked, &message)
                .await?;
            report.count(&outcome::label(projection, decoded), Outcome::Parked);
            continue;
        }
        let processed = run_isolated(&tx, projection, record, decoded, Source::Kafka, key.as_deref(), isolate).await?;
        let Some(Processed { label, outcome, key: entity_key }) = processed else {
            report.count(&outcome::label(projection, decoded), Outcome::Parked);
            if let Some(key) = key {
                parked.insert(key.into_owned());
            }
            continue;
        };
        report.count(&label, outcome);
        let Some(entity_key) = entity_key.map(|key| stored::key(&key).into_owned()) else {
            continue;
        };
        match outcome {
            Outcome::Gap => {
                held.insert(entity_key);
            }
            Outcome::Applied if held.contains(&entity_key) => {
                match release_key(&tx, projection, &entity_key, &mut report, isolate).await? {
                    Released::All => {
                        held.remove(&entity_key);
                    }
                    Released::Partly => {}
                    Released::Parked => {
                        parked.insert(entity_key);
                    }
                }
            }
            _ => {}
        }
    }
    tx.commit().await.map_err(ApplyError::during("committing"))?;
    Ok(report)
}

/// Which of a batch's keys have held events, and which have parked ones.
struct KeyStates {
    held: BTreeSet<String>,
    parked: BTreeSet<String>,
}

/// One round trip: the keys among `keys` (as stored) with held events (versioned projections
/// only hold) and those with parked events.
async fn key_states(
    tx: &Transaction<'_>,
    projection: &Projection,
    keys: &[Option<Cow<'_, str>>],
) -> Result<KeyStates, ApplyError> {
    let mut states = KeyStates { held: BTreeSet::new(), parked: BTreeSet::new() };
    let keys = stored::distinct(keys.iter().flatten().map(|key| &**key), keys.len());
    if keys.is_empty() {
        return Ok(states);
    }
    let statement = tx
        .prepare_cached(
            "SELECT DISTINCT true, entity_key FROM projector.held_events
              WHERE projection = $1 AND entity_key = ANY($2)
             UNION ALL
             SELECT DISTINCT false, entity_key FROM projector.dead_letters
              WHERE projection = $1 AND state = 'parked' AND entity_key = ANY($2)",
        )
        .await
        .map_err(ApplyError::during("reading the keys' states"))?;
    let rows = tx
        .query(&statement, &[&projection.name, &keys])
        .await
        .map_err(ApplyError::during("reading the keys' states"))?;
    for row in rows {
        let set = if row.get::<_, bool>(0) { &mut states.held } else { &mut states.parked };
        set.insert(row.get(1));
    }
    Ok(states)
}
