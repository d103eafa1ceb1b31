//! The SQL side of a definition: each `[on.<EventType>]` handler's `insert`, `update`, `sql` and
//! `also` compiled into statements (`:name` parameters bound to `$n`), each checked to parse and,
//! for the first one of a `dedupe = "version"` projection, to be guarded ([`super::guard`]).

use std::ops::Range;

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use toml::Spanned;

use super::compile::Context;
use super::definition::{DedupeKind, Entries, HandlerDef, SqlDef};
use super::guard::{guard_kind, written_table};
use super::identifier::is_identifier;
use super::params::compile_named;
use super::set_based::SetBased;
use super::{Envelope, Handler, Origin, Statement, StatementKind, VersionedTable};

impl Context<'_> {
    pub(super) fn handler(
        &mut self,
        event_type: &Spanned<String>,
        handler: &Spanned<HandlerDef>,
        dedupe: DedupeKind,
        table: Option<&VersionedTable>,
        envelope: &Envelope,
    ) -> Option<Handler> {
        let name = event_type.get_ref();
        let definition = handler.get_ref();
        let written: Vec<(&str, Range<usize>)> = [
            ("insert", definition.insert.as_ref().map(Spanned::span)),
            ("update", definition.update.as_ref().map(Spanned::span)),
            ("sql", definition.sql.as_ref().map(Spanned::span)),
        ]
        .into_iter()
        .filter_map(|(key, span)| Some((key, span?)))
        .collect();
        if written.len() != 1 {
            let (span, found) = match written.as_slice() {
                [] => (event_type.span(), "none".to_string()),
                [.., last] => (
                    last.1.clone(),
                    written.iter().map(|(key, _)| format!("`{key}`")).collect::<Vec<_>>().join(" and "),
                ),
            };
            let message =
                format!("handler for `{name}` must have exactly one of `insert`, `update` or `sql`, found {found}");
            self.error(span, message);
            return None;
        }
        // (sql, span of where it was written), first statement first.
        let mut sources: Vec<(String, Range<usize>)> = Vec::new();
        if let Some(columns) = definition.insert.as_ref().or(definition.update.as_ref()) {
            let is_insert = definition.insert.is_some();
            let Some(table) = table else {
                if dedupe == DedupeKind::EventId {
                    let key = if is_insert { "insert" } else { "update" };
                    self.error(
                        columns.span(),
                        format!("`{key}` needs a `[table]` (only with `dedupe = \"version\"`): write `sql`"),
                    );
                }
                return None;
            };
            let pairs = self.columns(columns.get_ref(), table)?;
            let sql = if is_insert { insert_sql(table, &pairs) } else { update_sql(table, &pairs) };
            sources.push((sql, columns.span()));
        }
        match definition.sql.as_ref().map(|sql| (sql.get_ref(), sql.span())) {
            Some((SqlDef::One(sql), span)) => sources.push((sql.clone(), span)),
            Some((SqlDef::Many(all), span)) => {
                if all.is_empty() {
                    self.error(span, format!("`sql` for `{name}` is an empty list"));
                    return None;
                }
                sources.extend(all.iter().map(|sql| (sql.get_ref().clone(), sql.span())));
            }
            None => {}
        }
        if let Some(also) = &definition.also {
            sources.extend(also.get_ref().iter().map(|sql| (sql.get_ref().clone(), sql.span())));
        }
        let mut statements = Vec::new();
        let errors_before = self.errors.len();
        for (index, (sql, span)) in sources.into_iter().enumerate() {
            let guard = (index == 0).then_some(table).flatten();
            if let Some(statement) = self.statement(name, &sql, span, guard, dedupe, envelope) {
                statements.push(statement);
            }
        }
        (self.errors.len() == errors_before).then_some(Handler { statements })
    }

    /// Validated `(column, expression)` pairs of an `insert` or `update` table.
    fn columns(&mut self, columns: &Entries<Spanned<String>>, table: &VersionedTable) -> Option<Vec<(String, String)>> {
        let errors_before = self.errors.len();
        let mut pairs = Vec::new();
        for (column, expression) in &columns.0 {
            let column_name = column.get_ref();
            if !is_identifier(column_name) {
                let message =
                    format!("column `{column_name}` is not a plain identifier: use `[a-z_][a-z0-9_]*`, without quotes");
                self.error(column.span(), message);
            } else if column_name.eq_ignore_ascii_case(&table.key_column)
                || column_name.eq_ignore_ascii_case(&table.version_column)
            {
                self.error(
                    column.span(),
                    format!("column `{column_name}` is set by the engine (from `:key` and `:version`)"),
                );
            } else if expression.get_ref().trim().is_empty() {
                self.error(
                    expression.span(),
                    format!("column `{column_name}` needs an SQL expression, like `\":data.{column_name}\"`"),
                );
            }
            pairs.push((column_name.clone(), expression.get_ref().clone()));
        }
        (self.errors.len() == errors_before).then_some(pairs)
    }

    /// Compiles and checks one statement; `guard` is the table when it must be a guarded write.
    fn statement(
        &mut self,
        event_type: &str,
        sql: &str,
        span: Range<usize>,
        guard: Option<&VersionedTable>,
        dedupe: DedupeKind,
        envelope: &Envelope,
    ) -> Option<Statement> {
        let compiled = match compile_named(sql) {
            Ok(compiled) => compiled,
            Err(error) => {
                self.error(span, format!("statement for `{event_type}`: {error}"));
                return None;
            }
        };
        let parsed = match Parser::parse_sql(&PostgreSqlDialect {}, &compiled.sql) {
            Ok(parsed) => parsed,
            Err(error) => {
                let error = error.to_string();
                let error = error.strip_prefix("sql parser error: ").unwrap_or(&error);
                self.error(span, format!("statement for `{event_type}` does not parse: {error}"));
                return None;
            }
        };
        let [parsed] = parsed.as_slice() else {
            let message = format!(
                "statement for `{event_type}` must be exactly one statement, found {}: write several as `sql = [\"…\", \"…\"]`",
                parsed.len()
            );
            self.error(span, message);
            return None;
        };
        let kind = match guard {
            None => StatementKind::Other,
            Some(table) => match guard_kind(parsed, &compiled.params, table, envelope) {
                Ok(kind) => kind,
                Err(reason) => {
                    self.error(span, format!("statement for `{event_type}` could apply an event twice: {reason}"));
                    return None;
                }
            },
        };
        let origin = Origin { file: self.file.clone(), line: self.line(&span) };
        let writes = written_table(parsed);
        // Guarded statements, and every statement of an event-id projection (each event's run once:
        // the processed ids decide which).
        let set_based = match kind {
            StatementKind::Create | StatementKind::Update | StatementKind::UpdateIfNewer => {
                SetBased::from_sql(&compiled.sql, compiled.params.len())
            }
            StatementKind::Other if dedupe == DedupeKind::EventId => {
                SetBased::from_sql(&compiled.sql, compiled.params.len())
            }
            StatementKind::Other => None,
        };
        Some(Statement { sql: compiled.sql, params: compiled.params, kind, origin, writes, set_based })
    }
}

fn insert_sql(table: &VersionedTable, pairs: &[(String, String)]) -> String {
    let VersionedTable { table, key_column: key, version_column: version, .. } = table;
    let mut columns = vec![key.as_str()];
    let mut values = vec![":key"];
    for (column, expression) in pairs {
        columns.push(column);
        values.push(expression);
    }
    columns.push(version);
    values.push(":version");
    format!(
        "INSERT INTO {table} ({}) VALUES ({}) ON CONFLICT ({key}) DO NOTHING",
        columns.join(", "),
        values.join(", ")
    )
}

fn update_sql(table: &VersionedTable, pairs: &[(String, String)]) -> String {
    let VersionedTable { table, key_column: key, version_column: version, .. } = table;
    let mut sets: Vec<String> = pairs.iter().map(|(column, expression)| format!("{column} = {expression}")).collect();
    sets.push(format!("{version} = :version"));
    format!("UPDATE {table} SET {} WHERE {key} = :key AND {version} = :version - 1", sets.join(", "))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::projection::{compile_file, Dedupe, DefinitionError, Projection, StatementKind};

    const HEAD: &str = "topics = [\"shop.orders\"]\n[table]\nname = \"order_summary\"\nkey = \"order_id\"\n";

    fn compile(text: &str) -> Result<Projection, Vec<DefinitionError>> {
        compile_file(Path::new("projections/order_summary.toml"), text)
    }

    #[test]
    fn insert_and_update_shorthands() {
        let text = format!(
            "{HEAD}[on.Placed]\ninsert = {{ total = \":data.total\", status = \"'placed'\" }}\nalso = [\"INSERT INTO log (id) VALUES (:key)\"]\n[on.Shipped]\nupdate = {{ status = \"'shipped'\" }}\n"
        );
        let projection = compile(&text).unwrap();
        assert_eq!(projection.name, "order_summary");
        let placed = &projection.handlers["Placed"].statements;
        assert_eq!(
            placed[0].sql,
            "INSERT INTO order_summary (order_id, total, status, version) VALUES ($1, $2, 'placed', $3) ON CONFLICT (order_id) DO NOTHING"
        );
        assert_eq!(placed[0].kind, StatementKind::Create);
        assert_eq!(placed[0].origin.line, 6);
        assert_eq!(placed[1].kind, StatementKind::Other);
        assert_eq!(placed[1].origin.line, 7);
        let shipped = &projection.handlers["Shipped"].statements[0];
        assert_eq!(
            shipped.sql,
            "UPDATE order_summary SET status = 'shipped', version = $1 WHERE order_id = $2 AND version = $1 - 1"
        );
        assert_eq!(shipped.kind, StatementKind::Update);
        let Dedupe::Version(table) = &projection.dedupe else { panic!("version dedupe") };
        assert_eq!(table.version_lookup.sql, "SELECT version::bigint FROM order_summary WHERE order_id = $1");
        assert_eq!(projection.hash.len(), 64);
    }

    #[test]
    fn event_id_dedupe_takes_any_statement() {
        let text = "topics = [\"t\"]\ndedupe = \"event_id\"\n[on.A]\nsql = [\"DELETE FROM x WHERE id = :key\", \"SELECT 1\"]\n";
        let projection = compile(text).unwrap();
        assert_eq!(projection.dedupe, Dedupe::EventId);
        assert!(projection.handlers["A"].statements.iter().all(|s| s.kind == StatementKind::Other));
    }
}
