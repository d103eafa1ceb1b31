//! The engine's guard rule, read from a statement's SQL syntax tree: with `dedupe = "version"`
//! a handler's first statement must be a write on the projection's table that can apply an event
//! at most once ([`guard_kind`]); and which table a statement writes ([`written_table`]).

use sqlparser::ast::{self, BinaryOperator, Expr, SetExpr};

use super::{Envelope, ParamRef, ParamSource, Source, StatementKind, VersionedTable};

/// The kind of a projection's first statement when it is a guarded write on `table`, or why not.
///
/// Accepted: `INSERT INTO <table> (<key>, …, <version>) VALUES (:key, …, :version) ON CONFLICT …
/// DO NOTHING` (a `Create`); `UPDATE <table> SET …, <version> = :version WHERE <key> = :key AND
/// <version> = :version - 1` (an `Update`); and the same with `… AND <version> < :version` (or
/// `:version > <version>`) instead (an `UpdateIfNewer`).
pub fn guard_kind(
    statement: &ast::Statement,
    params: &[ParamRef],
    table: &VersionedTable,
    envelope: &Envelope,
) -> Result<StatementKind, String> {
    let VersionedTable { key_column: key, version_column: version, .. } = table;
    let is_param = |expr: &Expr, source: &ParamSource, envelope_source: &Source| {
        let Expr::Value(value) = strip(expr) else {
            return false;
        };
        let ast::Value::Placeholder(placeholder) = &value.value else {
            return false;
        };
        let Some(param) = placeholder
            .strip_prefix('$')
            .and_then(|n| n.parse::<usize>().ok())
            .and_then(|n| params.get(n.checked_sub(1)?))
        else {
            return false;
        };
        &param.source == source
            || matches!((&param.source, envelope_source), (ParamSource::Path(a), Source::Path(b)) if a == b)
    };
    let is_version = |expr: &Expr| is_param(expr, &ParamSource::Version, &envelope.version);
    let is_key = |expr: &Expr| is_param(expr, &ParamSource::Key, &envelope.key);
    match statement {
        ast::Statement::Insert(insert) => {
            let reason = format!(
                "an insert must set `{key}` = `:key` and `{version}` = `:version` in one `VALUES` row and end with `ON CONFLICT ({key}) DO NOTHING`"
            );
            let ast::TableObject::TableName(name) = &insert.table else { return Err(reason) };
            same_table(name, &table.table)?;
            let do_nothing = matches!(
                &insert.on,
                Some(ast::OnInsert::OnConflict(ast::OnConflict { action: ast::OnConflictAction::DoNothing, .. }))
            );
            let row = match insert.source.as_deref().map(|query| query.body.as_ref()) {
                Some(SetExpr::Values(ast::Values { rows, .. })) if rows.len() == 1 => &rows[0],
                _ => return Err(reason),
            };
            let value_of = |column: &str| {
                let index = insert.columns.iter().position(|c| c.value.eq_ignore_ascii_case(column))?;
                row.get(index)
            };
            let guarded = do_nothing
                && insert.returning.is_none()
                && value_of(key).is_some_and(is_key)
                && value_of(version).is_some_and(is_version);
            guarded.then_some(StatementKind::Create).ok_or(reason)
        }
        ast::Statement::Update { table: target, assignments, selection, .. } => {
            let reason = format!(
                "an update must have `WHERE {key} = :key AND {version} = :version - 1` (or `{version} < :version`) and set `{version} = :version`"
            );
            let ast::TableFactor::Table { name, alias, .. } = &target.relation else { return Err(reason) };
            same_table(name, &table.table)?;
            if !target.joins.is_empty() {
                return Err(reason);
            }
            let qualifiers: Vec<&str> = [
                alias.as_ref().map(|a| a.name.value.as_str()),
                name.0.last().and_then(|p| p.as_ident()).map(|i| i.value.as_str()),
            ]
            .into_iter()
            .flatten()
            .collect();
            let is_column = |expr: &Expr, column: &str| match strip(expr) {
                Expr::Identifier(ident) => ident.value.eq_ignore_ascii_case(column),
                Expr::CompoundIdentifier(parts) => match parts.as_slice() {
                    [qualifier, ident] => {
                        ident.value.eq_ignore_ascii_case(column)
                            && qualifiers.iter().any(|q| q.eq_ignore_ascii_case(&qualifier.value))
                    }
                    _ => false,
                },
                _ => false,
            };
            let sets_version = assignments.iter().any(|assignment| {
                let ast::AssignmentTarget::ColumnName(target) = &assignment.target else { return false };
                let named =
                    target.0.last().and_then(|p| p.as_ident()).is_some_and(|i| i.value.eq_ignore_ascii_case(version));
                named && is_version(&assignment.value)
            });
            let mut conjuncts = Vec::new();
            if let Some(selection) = selection {
                flatten_and(selection, &mut conjuncts);
            }
            let has = |check: &dyn Fn(&Expr, &BinaryOperator, &Expr) -> bool| {
                conjuncts.iter().any(|c| match c {
                    Expr::BinaryOp { left, op, right } => check(left, op, right),
                    _ => false,
                })
            };
            let key_matches = has(&|l, op, r| {
                *op == BinaryOperator::Eq && ((is_column(l, key) && is_key(r)) || (is_key(l) && is_column(r, key)))
            });
            let minus_one = |expr: &Expr| match strip(expr) {
                Expr::BinaryOp { left, op: BinaryOperator::Minus, right } => {
                    is_version(left)
                        && matches!(strip(right), Expr::Value(v) if v.value == ast::Value::Number("1".into(), false))
                }
                _ => false,
            };
            let follows = has(&|l, op, r| {
                *op == BinaryOperator::Eq
                    && ((is_column(l, version) && minus_one(r)) || (minus_one(l) && is_column(r, version)))
            });
            let newer = has(&|l, op, r| match op {
                BinaryOperator::Lt => is_column(l, version) && is_version(r),
                BinaryOperator::Gt => is_version(l) && is_column(r, version),
                _ => false,
            });
            match (sets_version && key_matches, follows, newer) {
                (true, true, _) => Ok(StatementKind::Update),
                (true, false, true) => Ok(StatementKind::UpdateIfNewer),
                _ => Err(reason),
            }
        }
        _ => Err(format!(
            "the first statement must be an insert with `ON CONFLICT ({key}) DO NOTHING` or a guarded update of `{}`",
            table.table
        )),
    }
}

/// The table a data-changing statement writes, lowercased and unquoted (`shop.orders`).
pub fn written_table(statement: &ast::Statement) -> Option<String> {
    let from_factor = |factor: &ast::TableFactor| match factor {
        ast::TableFactor::Table { name, .. } => Some(name.clone()),
        _ => None,
    };
    let name = match statement {
        ast::Statement::Insert(insert) => match &insert.table {
            ast::TableObject::TableName(name) => Some(name.clone()),
            _ => None,
        },
        ast::Statement::Update { table, .. } => from_factor(&table.relation),
        ast::Statement::Delete(delete) => match &delete.from {
            ast::FromTable::WithFromKeyword(tables) | ast::FromTable::WithoutKeyword(tables) => {
                tables.first().and_then(|table| from_factor(&table.relation))
            }
        },
        ast::Statement::Merge { table, .. } => from_factor(table),
        _ => None,
    }?;
    Some(name.0.iter().map(|part| part.to_string().trim_matches('"').to_lowercase()).collect::<Vec<_>>().join("."))
}

/// Whether `name` (as written in SQL) is `table` (as written in the definition).
fn same_table(name: &ast::ObjectName, table: &str) -> Result<(), String> {
    let written: Vec<String> = name.0.iter().map(|part| part.to_string().trim_matches('"').to_lowercase()).collect();
    let expected: Vec<&str> = table.split('.').collect();
    if written.len() == expected.len() && written.iter().zip(&expected).all(|(a, b)| a == b) {
        Ok(())
    } else {
        Err(format!("it writes `{name}`, not the projection's table `{table}`"))
    }
}

fn strip(expr: &Expr) -> &Expr {
    match expr {
        Expr::Nested(inner) => strip(inner),
        Expr::Cast { expr, .. } => strip(expr),
        other => other,
    }
}

fn flatten_and<'e>(expr: &'e Expr, into: &mut Vec<&'e Expr>) {
    match strip(expr) {
        Expr::BinaryOp { left, op: BinaryOperator::And, right } => {
            flatten_and(left, into);
            flatten_and(right, into);
        }
        other => into.push(other),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::projection::{compile_file, Projection, StatementKind};

    const HEAD: &str = "topics = [\"shop.orders\"]\n[table]\nname = \"order_summary\"\nkey = \"order_id\"\n";

    fn compile(text: &str) -> Result<Projection, Vec<crate::projection::DefinitionError>> {
        compile_file(Path::new("projections/order_summary.toml"), text)
    }

    fn first_kind(sql: &str) -> Result<StatementKind, String> {
        let text = format!("{HEAD}[on.E]\nsql = {sql:?}\n");
        match compile(&text) {
            Ok(projection) => Ok(projection.handlers["E"].statements[0].kind),
            Err(errors) => Err(errors[0].message.clone()),
        }
    }

    #[test]
    fn guard_accepts() {
        let exact = "UPDATE order_summary SET status = 'paid', version = :version WHERE order_id = :key AND version = :version - 1";
        assert_eq!(first_kind(exact), Ok(StatementKind::Update), "{exact}");
        for sql in [
            "UPDATE Order_Summary SET \"version\" = :version WHERE (version < :version) AND \"ORDER_ID\" = :key",
            "UPDATE order_summary s SET version = :stream_version::bigint WHERE s.order_id = :stream_id AND :stream_version > s.version",
        ] {
            assert_eq!(first_kind(sql), Ok(StatementKind::UpdateIfNewer), "{sql}");
        }
        let insert = "INSERT INTO order_summary (order_id, version) VALUES (:key, :version) ON CONFLICT DO NOTHING";
        assert_eq!(first_kind(insert), Ok(StatementKind::Create));
    }

    #[test]
    fn guard_rejects() {
        for sql in [
            "UPDATE order_summary SET status = 'paid', version = :version WHERE order_id = :key",
            "UPDATE order_summary SET status = 'paid' WHERE order_id = :key AND version = :version - 1",
            "UPDATE order_summary SET version = :version WHERE order_id = :key OR version = :version - 1",
            "UPDATE order_summary SET version = :version WHERE version = :version - 1",
            "UPDATE order_summary SET version = :version WHERE order_id = :key AND version = :version - 2",
            "UPDATE order_summary SET version = :data.v WHERE order_id = :key AND version = :data.v - 1",
            "INSERT INTO order_summary (order_id, version) VALUES (:key, :version)",
            "INSERT INTO order_summary (order_id, version) VALUES (:key, :version) ON CONFLICT (order_id) DO UPDATE SET version = 1",
            "INSERT INTO order_summary (order_id) VALUES (:key) ON CONFLICT DO NOTHING",
            "DELETE FROM order_summary WHERE order_id = :key",
        ] {
            let error = first_kind(sql).unwrap_err();
            assert!(error.starts_with("statement for `E` could apply an event twice"), "{sql}: {error}");
        }
        let other_table = "UPDATE other SET version = :version WHERE order_id = :key AND version = :version - 1";
        assert!(first_kind(other_table).unwrap_err().contains("not the projection's table `order_summary`"));
    }

    #[test]
    fn tables_are_what_the_statements_write() {
        let text = "topics = [\"t\"]\ndedupe = \"event_id\"\n[on.A]\nsql = [\"UPDATE Totals SET n = n + 1\", \"INSERT INTO shop.log (x) VALUES (1)\", \"SELECT 1\"]\n[on.B]\nsql = \"DELETE FROM totals WHERE id = :id\"\n";
        assert_eq!(compile(text).unwrap().tables(), vec!["shop.log".to_string(), "totals".to_string()]);
    }
}
