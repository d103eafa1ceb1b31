//! One guarded statement applied to many events at once: the set-based form the fast path uses
//! (`store::fast`) when a batch's events each run a single guarded statement.
//!
//! - `INSERT INTO t (…) VALUES (<row>) ON CONFLICT … DO NOTHING` becomes the same insert with the
//!   row repeated, each copy's placeholders renumbered.
//! - `UPDATE t SET … WHERE …` becomes `UPDATE t SET … FROM unnest($1::<type>[], …) AS
//!   projector_rows(p1, …, pn) WHERE …`, every `$j` read as `projector_rows.pj`, one array per
//!   parameter. (`unnest` is estimated at a few rows, so the key's index is used; a `VALUES` list
//!   of hundreds of rows is planned as a hash join over the whole table.)
//!
//! Both change one row per event as long as no two events of one statement share a key, which the
//! caller guarantees (it applies a key's events in successive statements). Statements with a
//! subquery, a `FROM`, `RETURNING` or a join keep running one event at a time: `None`.

use std::ops::ControlFlow;

use sqlparser::ast::{self, visit_expressions_mut, Expr, Ident, OnConflictAction, OnInsert, SetExpr, VisitMut};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

/// A statement's set-based form.
#[derive(Debug, Clone)]
pub enum SetBased {
    Insert { statement: ast::Statement, width: usize },
    Update { table: String, assignments: String, selection: String, width: usize },
}

/// The alias of the rows an `UPDATE … FROM (VALUES …)` reads.
const ROWS: &str = "projector_rows";

/// Renumbers or replaces every `$j` placeholder in `node`.
fn map_placeholders<V: VisitMut>(node: &mut V, mut with: impl FnMut(usize) -> Expr) {
    let _ = visit_expressions_mut(node, |expr| {
        if let Expr::Value(value) = expr {
            if let ast::Value::Placeholder(placeholder) = &value.value {
                if let Some(j) = placeholder.strip_prefix('$').and_then(|n| n.parse::<usize>().ok()) {
                    *expr = with(j);
                }
            }
        }
        ControlFlow::<()>::Continue(())
    });
}

fn placeholder(n: usize) -> Expr {
    Expr::value(ast::Value::Placeholder(format!("${n}")))
}

impl SetBased {
    /// The set-based form of `sql` (placeholders `$1` … `$width`), when it has one.
    pub fn from_sql(sql: &str, width: usize) -> Option<SetBased> {
        let mut statements = Parser::parse_sql(&PostgreSqlDialect {}, sql).ok()?;
        if statements.len() != 1 || width == 0 {
            return None;
        }
        let mut statement = statements.pop()?;
        if statement.to_string().to_ascii_uppercase().matches("SELECT").count() > 0 {
            return None;
        }
        match &mut statement {
            ast::Statement::Insert(insert) => {
                let do_nothing = matches!(
                    &insert.on,
                    Some(OnInsert::OnConflict(conflict)) if conflict.action == OnConflictAction::DoNothing
                );
                let one_row = matches!(
                    insert.source.as_deref().map(|query| query.body.as_ref()),
                    Some(SetExpr::Values(values)) if values.rows.len() == 1
                );
                if !do_nothing || !one_row || insert.returning.is_some() {
                    return None;
                }
                Some(SetBased::Insert { statement, width })
            }
            ast::Statement::Update {
                table,
                from: None,
                selection: Some(_),
                returning: None,
                or: None,
                limit: None,
                ..
            } if table.joins.is_empty() => {
                map_placeholders(&mut statement, |j| {
                    Expr::CompoundIdentifier(vec![Ident::new(ROWS), Ident::new(format!("p{j}"))])
                });
                let ast::Statement::Update { table, assignments, selection: Some(selection), .. } = &statement else {
                    return None;
                };
                let assignments = assignments.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
                Some(SetBased::Update {
                    table: table.to_string(),
                    assignments,
                    selection: selection.to_string(),
                    width,
                })
            }
            _ => None,
        }
    }

    /// The statement applying `rows` events at once. An insert binds `width` values per event, in
    /// event order; an update ([`SetBased::columnar`]) binds one array per parameter, for any
    /// number of events. `types[j]` is the SQL type of `$(j+1)` of the single-event statement.
    pub fn sql(&self, rows: usize, types: &[String]) -> String {
        match self {
            SetBased::Insert { statement, width } => {
                let mut statement = statement.clone();
                if let ast::Statement::Insert(insert) = &mut statement {
                    if let Some(SetExpr::Values(values)) = insert.source.as_deref_mut().map(|query| query.body.as_mut())
                    {
                        let row = values.rows[0].clone();
                        values.rows = (0..rows)
                            .map(|i| {
                                let mut copy = row.clone();
                                map_placeholders(&mut copy, |j| placeholder(i * width + j));
                                copy
                            })
                            .collect();
                    }
                }
                statement.to_string()
            }
            SetBased::Update { table, assignments, selection, width } => {
                let arrays: Vec<String> = (1..=*width).map(|j| format!("${j}::{}[]", types[j - 1])).collect();
                let columns: Vec<String> = (1..=*width).map(|j| format!("p{j}")).collect();
                format!(
                    "UPDATE {table} SET {assignments} FROM unnest({}) AS {ROWS}({}) WHERE {selection}",
                    arrays.join(", "),
                    columns.join(", ")
                )
            }
        }
    }

    /// Whether [`SetBased::sql`] takes one array per parameter (whatever the number of events)
    /// rather than `width` values per event.
    pub fn columnar(&self) -> bool {
        matches!(self, SetBased::Update { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn types(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| name.to_string()).collect()
    }

    #[test]
    fn insert_rows_are_repeated_and_renumbered() {
        let set = SetBased::from_sql(
            "INSERT INTO order_summary (order_id, total, status, version) VALUES ($1, $2, 'placed', $3) ON CONFLICT (order_id) DO NOTHING",
            3,
        )
        .expect("set-based");
        assert_eq!(
            set.sql(2, &types(&["uuid", "numeric", "int8"])),
            "INSERT INTO order_summary (order_id, total, status, version) VALUES ($1, $2, 'placed', $3), ($4, $5, 'placed', $6) ON CONFLICT(order_id) DO NOTHING"
        );
    }

    #[test]
    fn update_reads_its_values_from_arrays() {
        let set = SetBased::from_sql(
            "UPDATE accounts SET balance = balance + $1, version = $2 WHERE id = $3 AND version = $2 - 1",
            3,
        )
        .expect("set-based");
        assert_eq!(
            set.sql(2, &types(&["numeric", "int8", "text"])),
            "UPDATE accounts SET balance = balance + projector_rows.p1, version = projector_rows.p2 \
             FROM unnest($1::numeric[], $2::int8[], $3::text[]) AS projector_rows(p1, p2, p3) \
             WHERE id = projector_rows.p3 AND version = projector_rows.p2 - 1"
        );
    }

    #[test]
    fn statements_that_must_run_one_by_one() {
        for sql in [
            "UPDATE t SET n = (SELECT max(n) FROM u) WHERE id = $1",
            "UPDATE t SET n = u.n FROM u WHERE t.id = $1",
            "UPDATE t SET n = 1 WHERE id = $1 RETURNING n",
            "INSERT INTO t (id) VALUES ($1) ON CONFLICT (id) DO UPDATE SET n = 1",
            "INSERT INTO t (id) VALUES ($1)",
            "INSERT INTO t (id) SELECT $1",
            "DELETE FROM t WHERE id = $1",
            "UPDATE t SET n = 1",
        ] {
            assert!(SetBased::from_sql(sql, 1).is_none(), "{sql}");
        }
    }
}
