//! An event's plan: each statement of its handler prepared (once per batch; the connection
//! caches it by text) and the event's values bound to the parameter types Postgres inferred
//! ([`crate::projection::value::bind_all`], pure), before anything runs. Both ways of applying a
//! batch, event by event ([`super::apply`]) and the fast path ([`super::fast`]), plan this way.

use deadpool_postgres::Transaction;
use postgres_types::ToSql;

use crate::projection::value::{bind_all, SqlValue};
use crate::projection::{Event, Handler, Record, Statement};

/// A statement ready to run: prepared, with the event's values bound.
pub struct Bound {
    pub statement: tokio_postgres::Statement,
    pub values: Vec<SqlValue>,
}

impl Bound {
    /// The values as the parameters tokio-postgres takes.
    pub fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.values.iter().map(|value| value as &(dyn ToSql + Sync)).collect()
    }
}

/// The statements a batch prepared, by the compiled statement they came from: each is prepared
/// once per batch, whatever the number of its events.
#[derive(Default)]
pub struct Planner<'s> {
    prepared: Vec<(&'s Statement, tokio_postgres::Statement)>,
}

impl<'s> Planner<'s> {
    /// `statement`, prepared in `tx` (or as prepared before in this batch).
    pub async fn prepare(
        &mut self,
        tx: &Transaction<'_>,
        statement: &'s Statement,
    ) -> Result<tokio_postgres::Statement, tokio_postgres::Error> {
        if let Some((_, prepared)) = self.prepared.iter().find(|(known, _)| std::ptr::eq(*known, statement)) {
            return Ok(prepared.clone());
        }
        let prepared = tx.prepare_cached(&statement.sql).await?;
        self.prepared.push((statement, prepared.clone()));
        Ok(prepared)
    }

    /// The plan of one event: every statement of `handler`, prepared and bound, in order.
    /// `Ok(Err(why))`: a value does not fit its parameter (the event is poison; nothing ran).
    pub async fn plan(
        &mut self,
        tx: &Transaction<'_>,
        handler: &'s Handler,
        event: &Event,
        record: &Record,
    ) -> Result<Result<Vec<Bound>, String>, tokio_postgres::Error> {
        let mut bound = Vec::with_capacity(handler.statements.len());
        for statement in &handler.statements {
            let prepared = self.prepare(tx, statement).await?;
            match bind_all(statement, prepared.params(), event, record) {
                Ok(values) => bound.push(Bound { statement: prepared, values }),
                Err(error) => return Ok(Err(format!("{error} (statement at {})", statement.origin))),
            }
        }
        Ok(Ok(bound))
    }
}
