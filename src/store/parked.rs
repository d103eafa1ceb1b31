//! Parked events (`projector.dead_letters`): listing them, and the operator's `retry` and `skip`.
//!
//! Both actions run in one transaction per key that first locks the projection's checkpoint rows:
//! a live batch of the projection moves its checkpoints first, so it either commits before the
//! action reads the key's parked events, or waits and then sees the key as the action left it.
//! Every action on every event is recorded in `projector.parked_actions`.

use deadpool_postgres::Transaction;
use tokio_postgres::Row;

use super::error::ApplyError;
use super::event::{try_event, Processed, Source};
use super::held::{release_key, Released};
use super::{describe, stored, StoreError};
use crate::outcome::{self, BatchReport, Outcome};
use crate::projection::{Projection, Record};

/// One parked event.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Parked {
    pub id: i64,
    pub projection: String,
    pub entity_key: Option<String>,
    pub event_type: Option<String>,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// `poison`, `blocked` (behind an earlier parked event of its key) or `gap_timeout`.
    pub error_class: String,
    pub error: String,
    /// `parked`, `retried` or `skipped`.
    pub state: String,
    pub attempts: i32,
    pub parked_at: String,
    pub resolved_at: Option<String>,
    pub resolution: Option<String>,
    pub definition_hash: String,
    #[serde(skip)]
    pub record: Record,
}

/// An operator's action on a parked event.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Action {
    pub action: String,
    pub result: String,
    pub reason: Option<String>,
    pub actor: String,
    pub acted_at: String,
}

/// Which parked events to list.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub projection: Option<String>,
    pub key: Option<String>,
    /// A part of the error message or the error class, any case.
    pub error: Option<String>,
    /// Also those already retried or skipped.
    pub all_states: bool,
    pub limit: i64,
}

/// Which parked events an action is for.
#[derive(Debug, Clone)]
pub enum Selection {
    /// Every parked event of one key, in the order they were parked.
    Key(String),
    /// The parked event with this id: for an event with a key, every parked event of its key.
    Id(i64),
    /// Every parked event of the projection, key by key.
    All,
}

const COLUMNS: &str = "id, projection, entity_key, event_type, topic, partition, \"offset\", error_class, error, state,
    attempts, parked_at::text, resolved_at::text, resolution, definition_hash, record_key, record_value,
    header_names, header_values, timestamp_ms";

fn parked_of(row: &Row) -> Parked {
    let names: Vec<Vec<u8>> = row.get(17);
    let values: Vec<Option<Vec<u8>>> = row.get(18);
    Parked {
        id: row.get(0),
        projection: row.get(1),
        entity_key: row.get(2),
        event_type: row.get(3),
        topic: row.get(4),
        partition: row.get(5),
        offset: row.get(6),
        error_class: row.get(7),
        error: row.get(8),
        state: row.get(9),
        attempts: row.get(10),
        parked_at: row.get(11),
        resolved_at: row.get(12),
        resolution: row.get(13),
        definition_hash: row.get(14),
        record: Record {
            topic: row.get::<_, &str>(4).into(),
            partition: row.get(5),
            offset: row.get(6),
            key: row.get(15),
            value: row.get(16),
            headers: names.into_iter().zip(values).collect(),
            timestamp_ms: row.get(19),
        },
    }
}

/// Parked events matching `filter`, oldest first.
pub async fn list(client: &impl tokio_postgres::GenericClient, filter: &Filter) -> Result<Vec<Parked>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM projector.dead_letters
          WHERE ($1::text IS NULL OR projection = $1)
            AND ($2::text IS NULL OR entity_key = $2)
            AND ($3::text IS NULL OR error ILIKE '%' || $3 || '%' OR error_class = lower($3))
            AND ($4 OR state = 'parked')
          ORDER BY id
          LIMIT $5"
    );
    // A key is looked up as it is stored: as given, or by its digest (see `stored::key`).
    let key = filter.key.as_deref().map(stored::key);
    let rows = client
        .query(&sql, &[&filter.projection, &key, &filter.error, &filter.all_states, &filter.limit])
        .await
        .map_err(|error| StoreError::postgres(&error))?;
    Ok(rows.iter().map(parked_of).collect())
}

/// One parked event and the actions taken on it.
pub async fn show(
    client: &impl tokio_postgres::GenericClient,
    id: i64,
) -> Result<Option<(Parked, Vec<Action>)>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM projector.dead_letters WHERE id = $1");
    let Some(row) = client.query_opt(&sql, &[&id]).await.map_err(|error| StoreError::postgres(&error))? else {
        return Ok(None);
    };
    let actions = client
        .query(
            "SELECT action, result, reason, actor, acted_at::text FROM projector.parked_actions
              WHERE dead_letter_id = $1 ORDER BY id",
            &[&id],
        )
        .await
        .map_err(|error| StoreError::postgres(&error))?
        .iter()
        .map(|row| Action {
            action: row.get(0),
            result: row.get(1),
            reason: row.get(2),
            actor: row.get(3),
            acted_at: row.get(4),
        })
        .collect();
    Ok(Some((parked_of(&row), actions)))
}

/// What a retry did to one key's parked events.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Retried {
    pub key: Option<String>,
    /// (dead letter id, outcome): applied, duplicate, gap (held again) or ignored.
    pub done: Vec<(i64, String)>,
    /// The event that failed again (and stays parked, with every later one of its key).
    pub parked_again: Option<(i64, String)>,
    /// Held events of the key applied after the retried ones.
    pub released: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ParkedError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Apply(#[from] ApplyError),
    #[error("no parked event matches")]
    NothingParked,
    #[error(
        "projection `{projection}` was built by another version of its definition: accept it \
         (`projector accept {projection}`) or rebuild it before retrying its parked events"
    )]
    DefinitionChanged { projection: String },
}

/// The keys (or keyless ids) `selection` covers, each retried or skipped on its own.
enum Unit {
    Key(String),
    Keyless(i64),
}

async fn units(
    client: &impl tokio_postgres::GenericClient,
    projection: &str,
    selection: &Selection,
) -> Result<Vec<Unit>, ParkedError> {
    let rows = match selection {
        Selection::Key(key) => {
            client
                .query(
                    "SELECT $2::text, NULL::bigint WHERE EXISTS (SELECT FROM projector.dead_letters
                      WHERE projection = $1 AND entity_key = $2 AND state = 'parked')",
                    &[&projection, &stored::key(key)],
                )
                .await
        }
        Selection::Id(id) => {
            client
                .query(
                    "SELECT entity_key, id FROM projector.dead_letters
                      WHERE projection = $1 AND id = $2 AND state = 'parked'",
                    &[&projection, id],
                )
                .await
        }
        Selection::All => {
            client
                .query(
                    "SELECT entity_key, CASE WHEN entity_key IS NULL THEN id END FROM projector.dead_letters
                      WHERE projection = $1 AND state = 'parked'
                      GROUP BY entity_key, CASE WHEN entity_key IS NULL THEN id END
                      ORDER BY min(id)",
                    &[&projection],
                )
                .await
        }
    }
    .map_err(|error| StoreError::postgres(&error))?;
    if rows.is_empty() {
        return Err(ParkedError::NothingParked);
    }
    Ok(rows
        .iter()
        .map(|row| match row.get::<_, Option<String>>(0) {
            Some(key) => Unit::Key(key),
            None => Unit::Keyless(row.get(1)),
        })
        .collect())
}

/// Locks the projection's checkpoints (see the module documentation) and returns their
/// definition hashes.
async fn lock_checkpoints(tx: &Transaction<'_>, projection: &str) -> Result<Vec<String>, StoreError> {
    let rows = tx
        .query(
            "SELECT definition_hash FROM projector.checkpoints WHERE projection = $1 ORDER BY topic, partition FOR UPDATE",
            &[&projection],
        )
        .await
        .map_err(|error| StoreError::postgres(&error))?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

async fn parked_of_unit(tx: &Transaction<'_>, projection: &str, unit: &Unit) -> Result<Vec<Parked>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM projector.dead_letters
          WHERE projection = $1 AND state = 'parked'
            AND (entity_key = $2 OR ($2 IS NULL AND id = $3))
          ORDER BY id
          FOR UPDATE"
    );
    let (key, id) = match unit {
        Unit::Key(key) => (Some(key.as_str()), None),
        Unit::Keyless(id) => (None, Some(*id)),
    };
    let rows = tx.query(&sql, &[&projection, &key, &id]).await.map_err(|error| StoreError::postgres(&error))?;
    Ok(rows.iter().map(parked_of).collect())
}

async fn record_action(
    tx: &Transaction<'_>,
    parked: &Parked,
    action: &str,
    result: &str,
    reason: Option<&str>,
) -> Result<(), ApplyError> {
    tx.execute(
        "INSERT INTO projector.parked_actions (dead_letter_id, projection, entity_key, action, result, reason)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[&parked.id, &parked.projection, &parked.entity_key, &action, &stored::message(result), &reason],
    )
    .await
    .map_err(ApplyError::during("recording the action"))?;
    Ok(())
}

/// Re-applies the parked events `selection` covers with the projection's current definition,
/// key by key, in the order they were parked. The first that fails again stays parked (with its
/// new error), and so do the later ones of its key; other keys go on.
pub async fn retry(
    client: &mut deadpool_postgres::Object,
    projection: &Projection,
    selection: &Selection,
) -> Result<Vec<Retried>, ParkedError> {
    let units = units(&***client, &projection.name, selection).await?;
    let mut results = Vec::with_capacity(units.len());
    for unit in units {
        let tx = client.transaction().await.map_err(|error| StoreError::postgres(&error))?;
        let hashes = lock_checkpoints(&tx, &projection.name).await?;
        let legacy = crate::projection::compile::legacy_hash(projection);
        if hashes.iter().any(|hash| *hash != projection.hash && *hash != legacy) {
            return Err(ParkedError::DefinitionChanged { projection: projection.name.clone() });
        }
        let mut retried = Retried { key: None, ..Retried::default() };
        if let Unit::Key(key) = &unit {
            retried.key = Some(key.clone());
        }
        let mut report = BatchReport::default();
        let parked_events = parked_of_unit(&tx, &projection.name, &unit).await?;
        projection.ensure_schemas(parked_events.iter().map(|parked| &parked.record)).await.map_err(ApplyError::from)?;
        for parked in parked_events {
            let decoded = projection.decode(&parked.record);
            match try_event(&tx, projection, &parked.record, &decoded, Source::Kafka, true).await? {
                Ok(Processed { outcome, .. }) => {
                    tx.execute(
                        "UPDATE projector.dead_letters
                            SET state = 'retried', attempts = attempts + 1, resolved_at = now(), resolution = $2
                          WHERE id = $1",
                        &[&parked.id, &outcome.as_str()],
                    )
                    .await
                    .map_err(ApplyError::during("marking the event retried"))?;
                    record_action(&tx, &parked, "retry", outcome.as_str(), None).await?;
                    retried.done.push((parked.id, outcome.as_str().to_string()));
                    if let (Outcome::Applied, Some(key)) = (outcome, &retried.key) {
                        let released = release_key(&tx, projection, key, &mut report, true).await?;
                        if matches!(released, Released::Parked) {
                            retried.parked_again =
                                Some((parked.id, "a held event of the key was parked when released".into()));
                            break;
                        }
                    }
                }
                Err(message) => {
                    tx.execute(
                        "UPDATE projector.dead_letters
                            SET attempts = attempts + 1, error_class = 'poison', error = $2
                          WHERE id = $1",
                        &[&parked.id, &stored::message(&message)],
                    )
                    .await
                    .map_err(ApplyError::during("parking the event again"))?;
                    record_action(&tx, &parked, "retry", &format!("parked again: {message}"), None).await?;
                    tracing::warn!(projection = %projection.name, id = parked.id, label = %outcome::label(projection, &decoded), %message, "retried event parked again");
                    retried.parked_again = Some((parked.id, message));
                    break;
                }
            }
        }
        retried.released = report.released;
        tx.commit().await.map_err(ApplyError::during("committing the retry"))?;
        results.push(retried);
    }
    Ok(results)
}

/// Discards the parked events `selection` covers, recording `reason`. Later events of their keys
/// are applied again from then on. Returns the ids skipped.
pub async fn skip(
    client: &mut deadpool_postgres::Object,
    projection: &str,
    selection: &Selection,
    reason: &str,
) -> Result<Vec<i64>, ParkedError> {
    let units = units(&***client, projection, selection).await?;
    let tx = client.transaction().await.map_err(|error| StoreError::postgres(&error))?;
    lock_checkpoints(&tx, projection).await?;
    let mut skipped = Vec::new();
    for unit in units {
        let mut parked_events = parked_of_unit(&tx, projection, &unit).await?;
        if let Selection::Id(id) = selection {
            parked_events.retain(|parked| parked.id == *id);
        }
        for parked in parked_events {
            tx.execute(
                "UPDATE projector.dead_letters SET state = 'skipped', resolved_at = now(), resolution = $2 WHERE id = $1",
                &[&parked.id, &reason],
            )
            .await
            .map_err(|error| StoreError::Postgres(describe(&error)))?;
            record_action(&tx, &parked, "skip", "skipped", Some(reason)).await?;
            skipped.push(parked.id);
        }
    }
    tx.commit().await.map_err(|error| StoreError::postgres(&error))?;
    Ok(skipped)
}

/// How many events each projection has parked now.
pub async fn counts(client: &impl tokio_postgres::GenericClient) -> Result<Vec<(String, i64)>, StoreError> {
    let rows = client
        .query(
            "SELECT projection, count(*) FROM projector.dead_letters WHERE state = 'parked' GROUP BY projection ORDER BY 1",
            &[],
        )
        .await
        .map_err(|error| StoreError::postgres(&error))?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
}
