//! Why a batch did not commit, the class of each database error, and what is done about each:
//! [`ApplyError::handling`] is the one place that decides whether a batch is retried (isolated or
//! with backoff), its partitions re-read, the projection stopped, or the engine stopped.

use tokio_postgres::error::SqlState;

use super::describe;
use crate::checkpoint::TopicPartition;

/// How a failure is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Worth retrying as it is (a lost connection, a serialization failure, a deadlock, a
    /// cancelled statement): the batch is rolled back and retried with backoff; after
    /// `retry.max_attempts` the projection is reported `failed` while it keeps retrying.
    Transient,
    /// Caused by the data of the event being applied (a data exception, a constraint, a value or
    /// key Postgres cannot hold, an exception raised by a trigger): that event is parked. Outside
    /// any one event, it is retried as [`ErrorClass::Transient`] is.
    Poison,
    /// Neither retrying nor parking can fix it (a missing table or column, no permission, a
    /// statement that no longer fits the schema): the engine stops.
    Fatal,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Poison => "poison",
            ErrorClass::Fatal => "fatal",
        }
    }
}

/// The class of a database error, by its SQLSTATE. An error without one (the connection broke,
/// a client-side failure) is transient.
pub fn class_of(error: &tokio_postgres::Error) -> ErrorClass {
    match error.as_db_error() {
        Some(db) => class_of_state(db.code()),
        None => ErrorClass::Transient,
    }
}

/// The class of a SQLSTATE.
pub fn class_of_state(state: &SqlState) -> ErrorClass {
    let code = state.code();
    // `25P02` (in failed transaction) is a consequence of an earlier error, never a cause; a
    // read-only transaction (25006) is met after a fail-over to a replica.
    if matches!(code, "25P02" | "25006" | "55P03" | "55006") {
        return ErrorClass::Transient;
    }
    match code.get(..2).unwrap_or("") {
        // Connection, transaction rollback (serialization, deadlock), insufficient resources,
        // operator intervention (cancelled, shutting down), system and internal errors.
        "08" | "40" | "53" | "57" | "58" | "XX" => ErrorClass::Transient,
        // Data exception, integrity constraint, program limit (a value too large to index),
        // triggered data change, with check option, routine and PL/pgSQL exceptions.
        "22" | "23" | "54" | "27" | "44" | "2F" | "38" | "39" | "P0" => ErrorClass::Poison,
        _ => ErrorClass::Fatal,
    }
}

/// What the worker does about a batch that did not commit ([`ApplyError::handling`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handling {
    /// Retry at once, each event in a savepoint of its own, so that the event whose data a
    /// statement failed on is parked alone (also when the fast path's prediction did not hold).
    Isolate,
    /// Retry with backoff: transient, or poison that no one event explains. After
    /// `retry.max_attempts` in a row the projection is reported `failed` while it keeps retrying.
    Retry,
    /// Another instance moved a checkpoint: re-read the lane's partitions from the stored
    /// checkpoints.
    Reread,
    /// The checkpoints carry another definition: the projection stops until they match.
    StopProjection,
    /// Neither retrying nor parking can fix it: the engine stops.
    Fail,
}

/// Why a batch did not commit. Its transaction is rolled back in every case.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A checkpoint was not where the batch started: another instance owns the partition now.
    #[error("checkpoint of `{}` partition {} moved under us: another instance owns it", .partition.0, .partition.1)]
    Fenced { partition: TopicPartition },
    /// The checkpoint was written by another definition of the projection (`projector accept`,
    /// a rebuild, or an instance running another definition).
    #[error(
        "checkpoint of `{}` partition {} was written by another definition of the projection ({stored}); \
         this instance runs {running}",
        .partition.0, .partition.1
    )]
    DefinitionChanged { partition: TopicPartition, stored: String, running: String },
    /// The fast path's prediction did not hold (`why`; `source`, when a statement failed on
    /// data): retry on the careful path.
    #[error("fast path declined after writing: {why}")]
    Mispredicted {
        why: String,
        #[source]
        source: Option<tokio_postgres::Error>,
    },
    /// A statement failed on an event's data (`at`: which event, or what was being done) while
    /// the batch's events were not isolated: retry with each event in a savepoint of its own, so
    /// that only that event is parked.
    #[error("a statement failed on an event's data: {at}: {}", describe(.source))]
    Isolate {
        at: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// No connection could be had.
    #[error("cannot get a connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// The schema of a Confluent-framed record could not be had (a registry that cannot be
    /// reached): retried, never a parked record.
    #[error("cannot get a record's schema: {0}")]
    Schema(#[from] crate::projection::schemas::FetchError),
    /// A database error, with what was being done.
    #[error("{during}: {}", describe(.source))]
    Database {
        during: &'static str,
        class: ErrorClass,
        #[source]
        source: tokio_postgres::Error,
    },
}

impl ApplyError {
    /// A database error met while doing `during`, classed by [`class_of`].
    pub fn database(during: &'static str, source: tokio_postgres::Error) -> ApplyError {
        ApplyError::Database { during, class: class_of(&source), source }
    }

    /// `map_err` for database calls: `.map_err(ApplyError::during("parking"))`.
    pub fn during(during: &'static str) -> impl Fn(tokio_postgres::Error) -> ApplyError {
        move |source| ApplyError::database(during, source)
    }

    /// A failure that no one event explains, with only its details for the log.
    pub fn mispredicted(why: impl Into<String>) -> ApplyError {
        ApplyError::Mispredicted { why: why.into(), source: None }
    }

    /// The class of the failure: a database error's by its SQLSTATE; no connection is transient;
    /// the control signals (fenced, another definition, mispredicted, isolate) are transient too:
    /// nothing is wrong with the database.
    pub fn class(&self) -> ErrorClass {
        match self {
            ApplyError::Database { class, .. } => *class,
            ApplyError::Pool(_) | ApplyError::Schema(_) => ErrorClass::Transient,
            ApplyError::Fenced { .. }
            | ApplyError::DefinitionChanged { .. }
            | ApplyError::Mispredicted { .. }
            | ApplyError::Isolate { .. } => ErrorClass::Transient,
        }
    }

    /// What is done about it: the signals each have their own answer; any other failure is
    /// answered by its class alone.
    pub fn handling(&self) -> Handling {
        match self {
            ApplyError::Mispredicted { .. } | ApplyError::Isolate { .. } => Handling::Isolate,
            ApplyError::Fenced { .. } => Handling::Reread,
            ApplyError::DefinitionChanged { .. } => Handling::StopProjection,
            ApplyError::Database { .. } | ApplyError::Pool(_) | ApplyError::Schema(_) => match self.class() {
                ErrorClass::Fatal => Handling::Fail,
                ErrorClass::Transient | ErrorClass::Poison => Handling::Retry,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_signal_and_class_has_its_handling() {
        let partition = ("orders".to_string(), 0);
        assert_eq!(ApplyError::Fenced { partition: partition.clone() }.handling(), Handling::Reread);
        let changed = ApplyError::DefinitionChanged { partition, stored: "a".into(), running: "b".into() };
        assert_eq!(changed.handling(), Handling::StopProjection);
        assert_eq!(ApplyError::mispredicted("a key moved").handling(), Handling::Isolate);
        assert_eq!(ApplyError::mispredicted("a key moved").class(), ErrorClass::Transient);
        let timeout = deadpool_postgres::PoolError::Timeout(deadpool_postgres::TimeoutType::Wait);
        assert_eq!(ApplyError::Pool(timeout).handling(), Handling::Retry);
        let unreachable = crate::projection::schemas::FetchError { id: 7, reason: "connection refused".into() };
        assert_eq!(ApplyError::Schema(unreachable).handling(), Handling::Retry);
    }

    #[test]
    fn each_sqlstate_has_its_class() {
        let cases = [
            ("08006", ErrorClass::Transient),
            ("40001", ErrorClass::Transient),
            ("40P01", ErrorClass::Transient),
            ("53100", ErrorClass::Transient),
            ("57014", ErrorClass::Transient),
            ("57P01", ErrorClass::Transient),
            ("55P03", ErrorClass::Transient),
            ("25P02", ErrorClass::Transient),
            ("25006", ErrorClass::Transient),
            ("XX000", ErrorClass::Transient),
            ("22021", ErrorClass::Poison),
            ("22P05", ErrorClass::Poison),
            ("22003", ErrorClass::Poison),
            ("23505", ErrorClass::Poison),
            ("23514", ErrorClass::Poison),
            ("54000", ErrorClass::Poison),
            ("P0001", ErrorClass::Poison),
            ("42P01", ErrorClass::Fatal),
            ("42703", ErrorClass::Fatal),
            ("42501", ErrorClass::Fatal),
            ("42702", ErrorClass::Fatal),
            ("0A000", ErrorClass::Fatal),
            ("3F000", ErrorClass::Fatal),
        ];
        for (code, class) in cases {
            assert_eq!(class_of_state(&SqlState::from_code(code)), class, "{code}");
        }
    }
}
