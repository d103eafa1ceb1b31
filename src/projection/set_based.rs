//! One statement applied to many events at once: the set-based form the fast path uses
//! (`store::fast`) when a batch's events each run statements that have one. Both forms read one
//! array per parameter through `unnest`, so one prepared statement serves any number of events
//! (and `unnest` is about twice as fast as a multi-row `VALUES` list):
//!
//! - `INSERT INTO t (…) VALUES (<row>) [ON CONFLICT …]` becomes `INSERT INTO t (…) SELECT <row>
//!   FROM unnest($1::<type>[], …) AS projector_rows(p1, …, pn) [ON CONFLICT …]`. An `ON CONFLICT
//!   … DO UPDATE` must name its conflict columns, bound each to a bare parameter, and use no
//!   parameter in its `SET` or `WHERE` (they see the table and `EXCLUDED`, not the rows).
//! - `UPDATE t SET … WHERE …` becomes `UPDATE t SET … FROM unnest($1::<type>[], …) AS
//!   projector_rows(p1, …, pn) WHERE …`. (`unnest` is estimated at a few rows, so the key's index
//!   is used; a `VALUES` list of hundreds of rows is planned as a hash join over the whole table.)
//!   The `column = $j` among its `WHERE`'s top-level `AND`s name the rows it can change (without
//!   one, events of an event-id projection run one by one).
//!
//! In both, every `$j` of the statement is read as `projector_rows.pj`. In an update, whose `WHERE`
//! and values see the table's columns next to the rows', a column of the table named like one of
//! the rows' (`p1`) is read qualified by the table (`accounts.p1`), so that no name is ambiguous; a
//! table called `projector_rows` gets rows called otherwise. Statements with a subquery, a `FROM`,
//! `RETURNING`, a join or a `DEFAULT` value keep running one event at a time: `None`.
//!
//! One set-based statement is right only for events whose rows differ: an update reads each
//! table row once however many of the arrays' rows match it, and an upsert cannot change a row
//! twice. Each form therefore says which rows it touches (its [`Footprint`]), and the caller puts
//! events whose footprints meet in successive statements, in their order.

use std::ops::ControlFlow;

use sqlparser::ast::{
    self, visit_expressions, visit_expressions_mut, BinaryOperator, ConflictTarget, Expr, Ident, OnConflictAction,
    OnInsert, SetExpr, VisitMut,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

/// A statement's set-based form: the statement's text around its `unnest(…)` arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetBased {
    before: String,
    after: String,
    width: usize,
    /// How the statement's `RETURNING` names the target table's columns: `None` for an insert
    /// (its `RETURNING` sees only the target), the table's alias or name for an update (whose
    /// `RETURNING` also sees `projector_rows`).
    qualifier: Option<String>,
    /// The rows one event's statement touches; `None`: the text does not tell (an update whose
    /// `WHERE` has no `column = $j`), and events of an event-id projection then run one by one.
    pub footprint: Option<Footprint>,
}

/// The rows of a table one event's statement can touch, as far as its text tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Footprint {
    /// Rows whose `columns` equal the values of the statement's parameters `params` (0-based,
    /// one per column): an upsert's conflict columns, an update's `column = $j` conditions.
    Keyed { table: String, columns: Vec<String>, params: Vec<usize> },
    /// New rows no parameter names: an insert without conflict columns bound to parameters.
    /// Two such inserts of one statement never touch the same row; anything else on the table may.
    Unkeyed { table: String },
}

impl Footprint {
    /// The table, by its last name part, lowercased (`s.Orders` is `orders`): two spellings of one
    /// table always meet, and tables of one name in two schemas are taken as one.
    pub fn table(&self) -> &str {
        match self {
            Footprint::Keyed { table, .. } | Footprint::Unkeyed { table } => table,
        }
    }
}

/// The alias of the rows the set-based statement reads.
const ROWS: &str = "projector_rows";
/// The alias of the rows when the updated table itself is called [`ROWS`].
const OTHER_ROWS: &str = "projector_rows_";
/// Stands for the `unnest` arguments until the parameter types are known.
const ARGUMENTS: &str = "projector_arrays";

/// The name of the rows' column holding the values of `$j`.
fn column(j: usize) -> String {
    format!("p{j}")
}

/// Replaces every `$j` placeholder in `node` by `<rows>.pj`.
fn read_from_rows<V: VisitMut>(node: &mut V, rows: &str) {
    let _ = visit_expressions_mut(node, |expr| {
        if let Expr::Value(value) = expr {
            if let ast::Value::Placeholder(placeholder) = &value.value {
                if let Some(j) = placeholder.strip_prefix('$').and_then(|n| n.parse::<usize>().ok()) {
                    *expr = Expr::CompoundIdentifier(vec![Ident::new(rows), Ident::new(column(j))]);
                }
            }
        }
        ControlFlow::<()>::Continue(())
    });
}

/// Qualifies by `table` every unqualified name in `node` that is also a column of the rows (`p1`
/// … `p<width>`, as Postgres folds it: unquoted in any case, or quoted exactly). In the statement
/// as written it can only name a column of the table; next to the rows' columns it would be
/// ambiguous (42702). Other names are left as written: they can mean nothing else.
fn qualify_shadowed<V: VisitMut>(node: &mut V, table: &Ident, width: usize) {
    let _ = visit_expressions_mut(node, |expr| {
        if let Expr::Identifier(name) = expr {
            let folded = folded(name);
            if (1..=width).any(|j| folded == column(j)) {
                *expr = Expr::CompoundIdentifier(vec![table.clone(), name.clone()]);
            }
        }
        ControlFlow::<()>::Continue(())
    });
}

/// A name as Postgres folds it: unquoted in lower case, quoted as written.
fn folded(name: &Ident) -> String {
    match name.quote_style {
        None => name.value.to_lowercase(),
        Some(_) => name.value.clone(),
    }
}

/// The last part of a table's name, lowercased (see [`Footprint::table`]).
fn last_part(name: &ast::ObjectName) -> Option<String> {
    Some(name.0.last()?.as_ident()?.value.to_lowercase())
}

/// The 0-based parameter `expr` is, when it is a bare `$j`.
fn bare_param(expr: &Expr) -> Option<usize> {
    let Expr::Value(value) = expr else {
        return None;
    };
    let ast::Value::Placeholder(placeholder) = &value.value else {
        return None;
    };
    placeholder.strip_prefix('$')?.parse::<usize>().ok()?.checked_sub(1)
}

/// The conflict column `name` and the parameter its value in `row` is, when a bare one.
fn bare_param_of(name: &Ident, columns: &[Ident], row: &[Expr]) -> Option<(String, usize)> {
    let at = columns.iter().position(|column| folded(column) == folded(name))?;
    Some((folded(name), bare_param(row.get(at)?)?))
}

/// The `column = $j` (or `$j = column`) conditions among the top-level `AND`s of `selection`,
/// `column` unqualified or qualified by `target` (the updated table's name or alias).
fn equalities(selection: &Expr, target: &Ident, found: &mut Vec<(String, usize)>) {
    match selection {
        Expr::Nested(inner) => equalities(inner, target, found),
        Expr::BinaryOp { left, op: BinaryOperator::And, right } => {
            equalities(left, target, found);
            equalities(right, target, found);
        }
        Expr::BinaryOp { left, op: BinaryOperator::Eq, right } => {
            let column = |expr: &Expr| match expr {
                Expr::Identifier(name) => Some(folded(name)),
                Expr::CompoundIdentifier(parts) => match parts.as_slice() {
                    [table, name] if folded(table) == folded(target) => Some(folded(name)),
                    _ => None,
                },
                _ => None,
            };
            let pair = match (column(left), bare_param(right), bare_param(left), column(right)) {
                (Some(name), Some(param), _, _) | (_, _, Some(param), Some(name)) => Some((name, param)),
                _ => None,
            };
            if let Some(pair) = pair.filter(|pair| !found.contains(pair)) {
                found.push(pair);
            }
        }
        _ => {}
    }
}

/// Whether any `$j` is left in `statement`.
fn has_placeholder(statement: &ast::Statement) -> bool {
    visit_expressions(statement, |expr| match bare_param(expr) {
        Some(_) => ControlFlow::Break(()),
        None => ControlFlow::Continue(()),
    })
    .is_break()
}

impl SetBased {
    /// The set-based form of `sql` (placeholders `$1` … `$width`), when it has one.
    pub fn from_sql(sql: &str, width: usize) -> Option<SetBased> {
        let mut statements = Parser::parse_sql(&PostgreSqlDialect {}, sql).ok()?;
        if statements.len() != 1 || width == 0 {
            return None;
        }
        let mut statement = statements.pop()?;
        if statement.to_string().to_ascii_uppercase().contains("SELECT") {
            return None;
        }
        let columns: Vec<String> = (1..=width).map(column).collect();
        let rows = |alias: &str| format!("unnest({ARGUMENTS}) AS {alias}({})", columns.join(", "));
        let mut qualifier = None;
        let (text, footprint) = match &mut statement {
            ast::Statement::Insert(insert) => {
                if insert.returning.is_some() {
                    return None;
                }
                let ast::TableObject::TableName(name) = &insert.table else {
                    return None;
                };
                let table = last_part(name)?;
                let Some(SetExpr::Values(values)) = insert.source.as_deref_mut().map(|query| query.body.as_mut())
                else {
                    return None;
                };
                let [row] = values.rows.as_mut_slice() else {
                    return None;
                };
                // The conflict columns' parameters, when each is bound to a bare one.
                let keyed = match &insert.on {
                    None => None,
                    Some(OnInsert::OnConflict(conflict)) => {
                        let target: Option<Vec<(String, usize)>> = match &conflict.conflict_target {
                            Some(ConflictTarget::Columns(target)) if !target.is_empty() => {
                                target.iter().map(|name| bare_param_of(name, &insert.columns, row)).collect()
                            }
                            _ => None,
                        };
                        match (&conflict.action, target) {
                            (OnConflictAction::DoNothing, target) => target,
                            (OnConflictAction::DoUpdate(_), Some(target)) => Some(target),
                            (OnConflictAction::DoUpdate(_), None) => return None,
                        }
                    }
                    Some(_) => return None,
                };
                let footprint = Some(match keyed {
                    Some(pairs) => {
                        let (columns, params): (Vec<String>, Vec<usize>) = pairs.into_iter().unzip();
                        Footprint::Keyed { table, columns, params }
                    }
                    None => Footprint::Unkeyed { table },
                });
                read_from_rows(row, ROWS);
                let exprs: Vec<String> = row.iter().map(ToString::to_string).collect();
                if exprs.iter().any(|expr| expr.eq_ignore_ascii_case("DEFAULT")) {
                    return None;
                }
                // A parameter left outside the row (in `DO UPDATE`) has no rows to read from.
                if has_placeholder(&statement) {
                    return None;
                }
                let ast::Statement::Insert(insert) = &mut statement else {
                    return None;
                };
                let select = format!("SELECT {} FROM {}", exprs.join(", "), rows(ROWS));
                let select = Parser::new(&PostgreSqlDialect {}).try_with_sql(&select).ok()?.parse_query().ok()?;
                insert.source = Some(select);
                (statement.to_string(), footprint)
            }
            ast::Statement::Update {
                table,
                from: None,
                selection: Some(selection),
                returning: None,
                or: None,
                limit: None,
                ..
            } if table.joins.is_empty() => {
                let (target, name) = match &table.relation {
                    ast::TableFactor::Table { alias: Some(alias), name, .. } => (alias.name.clone(), name),
                    ast::TableFactor::Table { name, .. } => (name.0.last()?.as_ident()?.clone(), name),
                    _ => return None,
                };
                let mut keyed = Vec::new();
                equalities(selection, &target, &mut keyed);
                let (columns, params): (Vec<String>, Vec<usize>) = keyed.into_iter().unzip();
                let table = last_part(name)?;
                let footprint = (!columns.is_empty()).then_some(Footprint::Keyed { table, columns, params });
                let alias = if target.value.eq_ignore_ascii_case(ROWS) { OTHER_ROWS } else { ROWS };
                read_from_rows(&mut statement, alias);
                qualify_shadowed(&mut statement, &target, width);
                let ast::Statement::Update { table, assignments, selection: Some(selection), .. } = &statement else {
                    return None;
                };
                qualifier = Some(target.to_string());
                let assignments = assignments.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
                (format!("UPDATE {table} SET {assignments} FROM {} WHERE {selection}", rows(alias)), footprint)
            }
            _ => return None,
        };
        // The arguments' marker appears once: anything else is a statement we do not understand.
        let [before, after] = text.splitn(2, ARGUMENTS).collect::<Vec<_>>()[..] else {
            return None;
        };
        if after.contains(ARGUMENTS) {
            return None;
        }
        Some(SetBased { before: before.to_string(), after: after.to_string(), width, qualifier, footprint })
    }

    /// [`SetBased::sql`] returning, as text, `column` of every row it inserted or updated.
    pub fn sql_returning(&self, types: &[String], column: &str) -> String {
        match &self.qualifier {
            Some(qualifier) => format!("{} RETURNING {qualifier}.{column}::text", self.sql(types)),
            None => format!("{} RETURNING {column}::text", self.sql(types)),
        }
    }

    /// [`SetBased::sql_returning`] read as one row: the keys of the rows it inserted or updated,
    /// as one text array (NULL when there are none). The engine reads one row per statement
    /// instead of one per event. (A non-recursive `WITH` is not visible inside its own statement,
    /// so a table called `projector_changed` is still the table there.)
    pub fn sql_changed_keys(&self, types: &[String], column: &str) -> String {
        format!(
            "WITH projector_changed (projector_key) AS ({}) SELECT array_agg(projector_key) FROM projector_changed",
            self.sql_returning(types, column)
        )
    }

    /// The statement applying any number of events at once: it binds one array per parameter.
    /// `types[j]` is the SQL type of `$(j+1)` of the single-event statement.
    pub fn sql(&self, types: &[String]) -> String {
        let arrays: Vec<String> = (1..=self.width).map(|j| format!("${j}::{}[]", types[j - 1])).collect();
        format!("{}{}{}", self.before, arrays.join(", "), self.after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The set-based form of `sql` (`types`: its parameters' types, one per parameter).
    fn set_based(sql: &str, types: &[&str]) -> String {
        let set = SetBased::from_sql(sql, types.len()).expect("set-based");
        set.sql(&types.iter().map(|name| name.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn insert_selects_its_row_from_arrays() {
        assert_eq!(
            set_based(
                "INSERT INTO order_summary (order_id, total, status, version) VALUES ($1, $2, 'placed', $3) ON CONFLICT (order_id) DO NOTHING",
                &["uuid", "numeric", "int8"],
            ),
            "INSERT INTO order_summary (order_id, total, status, version) \
             SELECT projector_rows.p1, projector_rows.p2, 'placed', projector_rows.p3 \
             FROM UNNEST($1::uuid[], $2::numeric[], $3::int8[]) AS projector_rows (p1, p2, p3) \
             ON CONFLICT(order_id) DO NOTHING"
        );
    }

    #[test]
    fn update_reads_its_values_from_arrays() {
        assert_eq!(
            set_based(
                "UPDATE accounts SET balance = balance + $1, version = $2 WHERE id = $3 AND version = $2 - 1",
                &["numeric", "int8", "text"],
            ),
            "UPDATE accounts SET balance = balance + projector_rows.p1, version = projector_rows.p2 \
             FROM unnest($1::numeric[], $2::int8[], $3::text[]) AS projector_rows(p1, p2, p3) \
             WHERE id = projector_rows.p3 AND version = projector_rows.p2 - 1"
        );
    }

    #[test]
    fn table_columns_named_like_the_rows_columns_are_qualified() {
        assert_eq!(
            set_based(
                "UPDATE pcols SET p2 = p2 + $1, \"p3\" = \"p3\" || $2, version = $3 WHERE P1 = $4 AND version = $3 - 1 AND \"P1\" IS NULL AND p5 IS NULL",
                &["numeric", "text", "int8", "text"],
            ),
            "UPDATE pcols SET p2 = pcols.p2 + projector_rows.p1, \"p3\" = pcols.\"p3\" || projector_rows.p2, \
             version = projector_rows.p3 \
             FROM unnest($1::numeric[], $2::text[], $3::int8[], $4::text[]) AS projector_rows(p1, p2, p3, p4) \
             WHERE pcols.P1 = projector_rows.p4 AND version = projector_rows.p3 - 1 AND \"P1\" IS NULL AND p5 IS NULL"
        );
        assert_eq!(
            set_based("UPDATE s.t AS p1 SET n = p1.n + $1 WHERE p1 = $2", &["int8", "text"]),
            "UPDATE s.t AS p1 SET n = p1.n + projector_rows.p1 \
             FROM unnest($1::int8[], $2::text[]) AS projector_rows(p1, p2) WHERE p1.p1 = projector_rows.p2"
        );
    }

    #[test]
    fn a_table_called_like_the_rows_gets_rows_called_otherwise() {
        let set = SetBased::from_sql("UPDATE projector_rows SET version = $1 WHERE id = $2 AND version = $1 - 1", 2)
            .expect("set-based");
        assert_eq!(
            set.sql_returning(&["int8".to_string(), "text".to_string()], "id"),
            "UPDATE projector_rows SET version = projector_rows_.p1 \
             FROM unnest($1::int8[], $2::text[]) AS projector_rows_(p1, p2) \
             WHERE id = projector_rows_.p2 AND version = projector_rows_.p1 - 1 RETURNING projector_rows.id::text"
        );
    }

    #[test]
    fn the_changed_keys_are_read_as_one_array() {
        let set =
            SetBased::from_sql("UPDATE t SET version = $1 WHERE id = $2 AND version = $1 - 1", 2).expect("set-based");
        assert_eq!(
            set.sql_changed_keys(&["int8".to_string(), "text".to_string()], "id"),
            "WITH projector_changed (projector_key) AS (UPDATE t SET version = projector_rows.p1 \
             FROM unnest($1::int8[], $2::text[]) AS projector_rows(p1, p2) \
             WHERE id = projector_rows.p2 AND version = projector_rows.p1 - 1 RETURNING t.id::text) \
             SELECT array_agg(projector_key) FROM projector_changed"
        );
    }

    #[test]
    fn returning_names_the_target_table() {
        let types = ["int8".to_string(), "text".to_string()];
        let update =
            SetBased::from_sql("UPDATE s.accounts AS a SET version = $1 WHERE id = $2 AND version = $1 - 1", 2);
        assert!(update.unwrap().sql_returning(&types, "id").ends_with(" RETURNING a.id::text"));
        let update = SetBased::from_sql("UPDATE s.accounts SET version = $1 WHERE id = $2 AND version = $1 - 1", 2);
        assert!(update.unwrap().sql_returning(&types, "id").ends_with(" RETURNING accounts.id::text"));
        let insert =
            SetBased::from_sql("INSERT INTO s.accounts (version, id) VALUES ($1, $2) ON CONFLICT DO NOTHING", 2);
        assert!(insert.unwrap().sql_returning(&types, "id").ends_with(" DO NOTHING RETURNING id::text"));
    }

    #[test]
    fn statements_that_must_run_one_by_one() {
        for sql in [
            "UPDATE t SET n = (SELECT max(n) FROM u) WHERE id = $1",
            "UPDATE t SET n = u.n FROM u WHERE t.id = $1",
            "UPDATE t SET n = 1 WHERE id = $1 RETURNING n",
            "INSERT INTO t (id, n) VALUES ($1, 1) ON CONFLICT (id) DO UPDATE SET n = $1",
            "INSERT INTO t (id, n) VALUES ($1, 1) ON CONFLICT (id) DO UPDATE SET n = 2 WHERE t.n < $1",
            "INSERT INTO t (id) VALUES (lower($1)) ON CONFLICT (id) DO UPDATE SET n = 1",
            "INSERT INTO t (id) VALUES ($1) ON CONFLICT ON CONSTRAINT t_pkey DO UPDATE SET n = 1",
            "INSERT INTO t VALUES ($1) ON CONFLICT (id) DO UPDATE SET n = 1",
            "INSERT INTO t (id, n) VALUES ($1, DEFAULT) ON CONFLICT DO NOTHING",
            "INSERT INTO t (id) VALUES ($1), ($2) ON CONFLICT DO NOTHING",
            "INSERT INTO t (id) SELECT $1",
            "DELETE FROM t WHERE id = $1",
            "UPDATE t SET n = 1",
        ] {
            assert!(SetBased::from_sql(sql, 1).is_none(), "{sql}");
        }
    }

    #[test]
    fn an_upsert_touches_the_rows_of_its_conflict_columns() {
        let set = SetBased::from_sql(
            "INSERT INTO Shop.Order_Events (order_id, events, last) VALUES ($2, 1, $1) ON CONFLICT (order_id) \
             DO UPDATE SET events = order_events.events + 1, last = GREATEST(order_events.last, EXCLUDED.last)",
            2,
        )
        .expect("set-based");
        assert_eq!(
            set.footprint,
            Some(Footprint::Keyed { table: "order_events".into(), columns: vec!["order_id".into()], params: vec![1] })
        );
        assert_eq!(
            set.sql(&["int8".to_string(), "uuid".to_string()]),
            "INSERT INTO Shop.Order_Events (order_id, events, last) \
             SELECT projector_rows.p2, 1, projector_rows.p1 FROM UNNEST($1::int8[], $2::uuid[]) AS projector_rows (p1, p2) \
             ON CONFLICT(order_id) DO UPDATE SET events = order_events.events + 1, \
             last = GREATEST(order_events.last, EXCLUDED.last)"
        );
    }

    #[test]
    fn an_update_touches_the_rows_its_equalities_name() {
        let set = SetBased::from_sql(
            "UPDATE s.t AS a SET n = n + $1 WHERE (a.id = $2 AND $3 = kind) AND version < $4 AND other = 1",
            4,
        )
        .expect("set-based");
        assert_eq!(
            set.footprint,
            Some(Footprint::Keyed { table: "t".into(), columns: vec!["id".into(), "kind".into()], params: vec![1, 2] })
        );
        // Rows no `column = $j` names: a set-based form (for a versioned guard), no footprint.
        for sql in [
            "UPDATE t SET n = $1 WHERE name = 'total'",
            "UPDATE t SET n = 1 WHERE id = $1 OR id = 2",
            "UPDATE t SET n = 1 WHERE other.id = $1",
            "UPDATE t SET n = 1 WHERE id = $1::uuid",
        ] {
            assert_eq!(SetBased::from_sql(sql, 1).expect(sql).footprint, None, "{sql}");
        }
    }

    #[test]
    fn an_insert_without_bound_conflict_columns_touches_new_rows() {
        for sql in [
            "INSERT INTO audit.Log (event, at) VALUES ($1, now())",
            "INSERT INTO audit.log (event) VALUES ($1) ON CONFLICT DO NOTHING",
            "INSERT INTO audit.log (event) VALUES (lower($1)) ON CONFLICT (event) DO NOTHING",
        ] {
            let set = SetBased::from_sql(sql, 1).expect(sql);
            assert_eq!(set.footprint, Some(Footprint::Unkeyed { table: "log".into() }), "{sql}");
        }
    }
}
