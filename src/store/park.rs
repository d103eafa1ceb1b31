//! Parking an event in `projector.dead_letters`, with its raw bytes as they came and why.

use deadpool_postgres::Transaction;

use super::error::ApplyError;
use super::stored::{self, split_headers};
use crate::projection::{Projection, Record};

/// Why an event is in `projector.dead_letters`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParkClass {
    /// It cannot be applied: malformed, a value that does not fit, a constraint it violates.
    Poison,
    /// An earlier event of its key is parked.
    Blocked,
    /// Held as a gap for longer than `parking.gap_timeout_secs`.
    GapTimeout,
}

impl ParkClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ParkClass::Poison => "poison",
            ParkClass::Blocked => "blocked",
            ParkClass::GapTimeout => "gap_timeout",
        }
    }
}

/// Parks `record` under `key` (see [`Projection::parking_key`]; stored as [`stored::key`] stores
/// it), with its raw bytes as they came, whatever they hold.
pub(super) async fn park(
    tx: &Transaction<'_>,
    projection: &Projection,
    record: &Record,
    event_type: Option<&str>,
    key: Option<&str>,
    class: ParkClass,
    message: &str,
) -> Result<(), ApplyError> {
    let key = key.map(stored::key);
    let event_type = event_type.map(stored::message);
    let message = stored::message(message);
    let (names, values) = split_headers(record);
    tracing::warn!(
        projection = %projection.name,
        topic = %record.topic,
        partition = record.partition,
        offset = record.offset,
        key = %key.as_deref().map(stored::shown_key).unwrap_or_default(),
        class = class.as_str(),
        error = %message,
        "event parked"
    );
    tx.execute(
        "INSERT INTO projector.dead_letters
             (projection, topic, partition, \"offset\", entity_key, event_type, record_key, record_value,
              header_names, header_values, timestamp_ms, error_class, error, definition_hash)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
         ON CONFLICT (projection, topic, partition, \"offset\") DO NOTHING",
        &[
            &projection.name,
            &&*record.topic,
            &record.partition,
            &record.offset,
            &key,
            &event_type,
            &record.key,
            &record.value,
            &names,
            &values,
            &record.timestamp_ms,
            &class.as_str(),
            &message,
            &projection.hash,
        ],
    )
    .await
    .map_err(ApplyError::during("parking"))?;
    Ok(())
}
