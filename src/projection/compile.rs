//! Definition files to [`Projection`]s: every mistake of every file reported at once, with its line.
//!
//! Besides shape and names, this is where the engine's guard rule is enforced: with
//! `dedupe = "version"` each handler's first statement must be a write on the projection's table
//! that can apply an event at most once (see [`guard_kind`]).

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use sqlparser::ast::{self, BinaryOperator, Expr, SetExpr};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use toml::Spanned;

use super::definition::{DedupeKind, DefinitionFile, Entries, EnvelopeDef, HandlerDef, RebuildDef, SqlDef, TableDef};
use super::fields::Fields;
use super::params::compile_named;
use super::set_based::SetBased;
use super::{
    Dedupe, Envelope, Handler, Origin, ParamRef, ParamSource, Projection, RebuildChecks, Source, Statement,
    StatementKind, VersionedTable,
};

/// One mistake in a definition file, at a 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}:{column}: {message}", file.display())]
pub struct DefinitionError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Compiles one definition file; `path` names it in errors and gives the default projection name.
pub fn compile_file(path: &Path, text: &str) -> Result<Projection, Vec<DefinitionError>> {
    let mut cx = Context { file: path.to_path_buf(), text, errors: Vec::new() };
    let definition: DefinitionFile = match toml::from_str(text) {
        Ok(definition) => definition,
        Err(error) => {
            cx.error(error.span().unwrap_or(0..0), error.message().trim_end());
            return Err(cx.errors);
        }
    };
    let name = cx.projection_name(path, definition.name.as_ref());
    let topics = cx.topics(definition.topics.as_ref());
    let envelope = cx.envelope(definition.envelope.as_ref().map(Spanned::get_ref));
    let dedupe_kind = definition.dedupe.as_ref().map_or(DedupeKind::Version, |d| *d.get_ref());
    let table = match (dedupe_kind, &definition.table) {
        (DedupeKind::Version, Some(table)) => cx.table(table),
        (DedupeKind::Version, None) => {
            let span = definition.dedupe.as_ref().map_or(0..0, Spanned::span);
            cx.error(span, "`dedupe = \"version\"` needs a `[table]` with `name` and `key`");
            None
        }
        (DedupeKind::EventId, Some(table)) => {
            cx.error(
                table.span(),
                "`[table]` is only for `dedupe = \"version\"`: with `dedupe = \"event_id\"` write `sql`",
            );
            None
        }
        (DedupeKind::EventId, None) => None,
    };
    let mut handlers = BTreeMap::new();
    match &definition.on {
        Some(on) if !on.get_ref().0.is_empty() => {
            for (event_type, handler) in &on.get_ref().0 {
                let compiled = cx.handler(event_type, handler, dedupe_kind, table.as_ref(), &envelope);
                if let Some(compiled) = compiled {
                    handlers.insert(event_type.get_ref().clone(), compiled);
                }
            }
        }
        Some(on) => cx.error(on.span(), "no handlers: add an `[on.<EventType>]` table"),
        None => cx.error(0..0, "no handlers: add an `[on.<EventType>]` table"),
    }
    let rebuild_checks = cx.rebuild_checks(definition.rebuild.as_ref());
    if !cx.errors.is_empty() {
        return Err(cx.errors);
    }
    let dedupe = match table {
        Some(table) => Dedupe::Version(table),
        None => Dedupe::EventId,
    };
    let mut projection = Projection {
        name,
        file: path.to_path_buf(),
        topics,
        envelope,
        dedupe,
        handlers,
        hash: String::new(),
        rebuild: rebuild_checks,
        migrations_dir: crate::store::schema::dir_of(path),
        migrations: Vec::new(),
        fields: Fields::default(),
        envelope_slots: [None; 5],
    };
    projection.hash = semantic_hash(&projection);
    assign_fields(&mut projection);
    let _ = text;
    Ok(projection)
}

/// Gives every JSON path the projection reads (envelope fields first, then parameters) a slot in
/// `projection.fields`, and each parameter its slot.
fn assign_fields(projection: &mut Projection) {
    let mut fields = Fields::default();
    let envelope = &projection.envelope;
    let sources = [&envelope.event_type, &envelope.event_id, &envelope.key, &envelope.version, &envelope.occurred_at];
    for (slot, source) in projection.envelope_slots.iter_mut().zip(sources) {
        if let Source::Path(path) = source {
            *slot = Some(fields.add(path));
        }
    }
    let statements = projection.handlers.values_mut().flat_map(|handler| handler.statements.iter_mut());
    let lookup = match &mut projection.dedupe {
        Dedupe::Version(table) => Some(&mut table.version_lookup),
        Dedupe::EventId => None,
    };
    for statement in statements.chain(lookup) {
        for param in &mut statement.params {
            if let ParamSource::Path(path) = &mut param.source {
                path.slot = Some(fields.add(&path.segments));
            }
        }
    }
    projection.fields = fields;
}

/// Hex SHA-256 of what the projection does (topics, envelope, dedupe, every compiled statement),
/// not of the file's bytes: comments, layout and key order do not count as a change. It hashes
/// [`canonical_form`], which is written out field by field, so that the hash of a definition stays
/// the same across projector versions (a test pins the example projections' hashes).
fn semantic_hash(projection: &Projection) -> String {
    hex_sha256(&canonical_form(projection))
}

/// Hex SHA-256 of `text`.
pub fn hex_sha256(text: &str) -> String {
    Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// A string as a JSON literal: quoted, every special character escaped.
fn quoted(text: &str) -> String {
    serde_json::Value::String(text.to_string()).to_string()
}

/// What a projection does, one fact per line, every value quoted: the text its hash is taken of.
/// Version 1 of the form; a change to it must keep older definitions' hashes (see
/// [`legacy_hash`] for how an earlier form is taken over).
pub fn canonical_form(projection: &Projection) -> String {
    let mut form = String::from("projector definition 1\n");
    for topic in &projection.topics {
        form.push_str(&format!("topic {}\n", quoted(topic)));
    }
    let envelope = &projection.envelope;
    for (field, source) in [
        ("type", &envelope.event_type),
        ("id", &envelope.event_id),
        ("key", &envelope.key),
        ("version", &envelope.version),
        ("occurred_at", &envelope.occurred_at),
    ] {
        form.push_str(&format!("envelope {field} {}\n", quoted(&source.to_string())));
    }
    match &projection.dedupe {
        Dedupe::EventId => form.push_str("dedupe event_id\n"),
        Dedupe::Version(table) => form.push_str(&format!(
            "dedupe version table {} key {} version {}\n",
            quoted(&table.table),
            quoted(&table.key_column),
            quoted(&table.version_column)
        )),
    }
    for (event_type, handler) in &projection.handlers {
        form.push_str(&format!("on {}\n", quoted(event_type)));
        for statement in &handler.statements {
            form.push_str(&format!("  statement {}\n", quoted(&statement.sql)));
            for param in &statement.params {
                let source = match &param.source {
                    ParamSource::EventId => "event_id".to_string(),
                    ParamSource::EventType => "event_type".to_string(),
                    ParamSource::Key => "key".to_string(),
                    ParamSource::Version => "version".to_string(),
                    ParamSource::OccurredAt => "occurred_at".to_string(),
                    ParamSource::Topic => "topic".to_string(),
                    ParamSource::Partition => "partition".to_string(),
                    ParamSource::Offset => "offset".to_string(),
                    ParamSource::Header(name) => format!("header:{name}"),
                    ParamSource::WholeValue => "value".to_string(),
                    ParamSource::Path(path) => format!("path:{}", path.segments.join(".")),
                };
                let optional = if param.optional { "optional" } else { "required" };
                form.push_str(&format!("    param {} {} {optional}\n", quoted(&param.name), quoted(&source)));
            }
        }
    }
    form
}

/// The hash projector versions before the canonical form stored with checkpoints: SHA-256 of the
/// `Debug` text of the compiled definition, written out here as it was, so that checkpoints
/// written by an older projector are recognised (and taken over, see
/// `store::checkpoint::adopt_legacy_hash`) instead of stopping every projection on upgrade.
pub fn legacy_hash(projection: &Projection) -> String {
    fn source(source: &Source) -> String {
        match source {
            Source::Path(path) => format!("Path({path:?})"),
            Source::Header(name) => format!("Header({name:?})"),
            Source::KafkaKey => "KafkaKey".into(),
            Source::KafkaTimestamp => "KafkaTimestamp".into(),
        }
    }
    fn param(param: &ParamRef) -> String {
        let source = match &param.source {
            ParamSource::EventId => "EventId".to_string(),
            ParamSource::EventType => "EventType".to_string(),
            ParamSource::Key => "Key".to_string(),
            ParamSource::Version => "Version".to_string(),
            ParamSource::OccurredAt => "OccurredAt".to_string(),
            ParamSource::Topic => "Topic".to_string(),
            ParamSource::Partition => "Partition".to_string(),
            ParamSource::Offset => "Offset".to_string(),
            ParamSource::Header(name) => format!("Header({name:?})"),
            ParamSource::WholeValue => "WholeValue".to_string(),
            ParamSource::Path(path) => format!("Path({:?})", path.segments),
        };
        format!("ParamRef {{ name: {:?}, source: {source}, optional: {} }}", param.name, param.optional)
    }
    let envelope = &projection.envelope;
    let mut text = format!(
        "topics={:?}\nenvelope=Envelope {{ event_type: {}, event_id: {}, key: {}, version: {}, occurred_at: {} }}\n",
        projection.topics,
        source(&envelope.event_type),
        source(&envelope.event_id),
        source(&envelope.key),
        source(&envelope.version),
        source(&envelope.occurred_at),
    );
    match &projection.dedupe {
        Dedupe::EventId => text.push_str("dedupe=event_id\n"),
        Dedupe::Version(table) => text.push_str(&format!(
            "dedupe=version table={} key={} version={}\n",
            table.table, table.key_column, table.version_column
        )),
    }
    for (event_type, handler) in &projection.handlers {
        text.push_str(&format!("on {event_type}\n"));
        for statement in &handler.statements {
            let params: Vec<String> = statement.params.iter().map(param).collect();
            text.push_str(&format!("  {}\n  [{}]\n", statement.sql, params.join(", ")));
        }
    }
    hex_sha256(&text)
}

/// Compiles every `*.toml` file of `dir`, in file name order, reporting all errors of all files.
pub fn load_dir(dir: &Path) -> Result<Vec<Projection>, Vec<DefinitionError>> {
    let (projections, errors) = load_dir_partly(dir)?;
    if errors.is_empty() {
        Ok(projections)
    } else {
        Err(errors)
    }
}

/// [`load_dir`], keeping the projections that compiled beside the errors of those that did not
/// (a reload starts what it can). `Err` only when the folder itself cannot be read.
pub fn load_dir_partly(dir: &Path) -> Result<(Vec<Projection>, Vec<DefinitionError>), Vec<DefinitionError>> {
    let at_start =
        |file: &Path, message: String| DefinitionError { file: file.to_path_buf(), line: 1, column: 1, message };
    let entries = std::fs::read_dir(dir).map_err(|e| vec![at_start(dir, format!("cannot read the folder: {e}"))])?;
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| vec![at_start(dir, format!("cannot read the folder: {e}"))])?.path();
        if path.extension().is_some_and(|ext| ext == "toml") && path.is_file() {
            paths.push(path);
        }
    }
    paths.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    let mut projections = Vec::new();
    let mut errors = Vec::new();
    let mut defined_in: HashMap<String, PathBuf> = HashMap::new();
    for path in paths {
        let text = match std::fs::read(&path).map(String::from_utf8) {
            Ok(Ok(text)) => text,
            Ok(Err(e)) => {
                errors.push(at_start(&path, format!("not valid UTF-8: {}", e.utf8_error())));
                continue;
            }
            Err(e) => {
                errors.push(at_start(&path, format!("cannot read the file: {e}")));
                continue;
            }
        };
        match compile_file(&path, &text) {
            Ok(mut projection) => match defined_in.get(&projection.name) {
                Some(first) => errors.push(at_start(
                    &path,
                    format!("projection `{}` is already defined in `{}`", projection.name, first.display()),
                )),
                None => match crate::store::schema::read_dir(&projection.migrations_dir) {
                    Ok(migrations) => {
                        projection.migrations = migrations;
                        defined_in.insert(projection.name.clone(), path);
                        projections.push(projection);
                    }
                    Err((file, message)) => errors.push(at_start(&file, message)),
                },
            },
            Err(file_errors) => errors.extend(file_errors),
        }
    }
    Ok((projections, errors))
}

struct Context<'t> {
    file: PathBuf,
    text: &'t str,
    errors: Vec<DefinitionError>,
}

impl Context<'_> {
    fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        let before = self.text.get(..span.start).unwrap_or(self.text);
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
        self.errors.push(DefinitionError { file: self.file.clone(), line, column, message: message.into() });
    }

    fn line(&self, span: &Range<usize>) -> usize {
        self.text.get(..span.start).unwrap_or(self.text).matches('\n').count() + 1
    }

    fn projection_name(&mut self, path: &Path, name: Option<&Spanned<String>>) -> String {
        match name {
            Some(name) => {
                if !is_identifier(name.get_ref()) {
                    let message = format!("projection name `{}` must match `[a-z_][a-z0-9_]*`", name.get_ref());
                    self.error(name.span(), message);
                }
                name.get_ref().clone()
            }
            None => {
                let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                if !is_identifier(&stem) {
                    let message = format!(
                        "projection name `{stem}` (from the file name) must match `[a-z_][a-z0-9_]*`: rename the file or set `name`"
                    );
                    self.error(0..0, message);
                }
                stem
            }
        }
    }

    fn rebuild_checks(&mut self, rebuild: Option<&Spanned<RebuildDef>>) -> RebuildChecks {
        let Some(rebuild) = rebuild.map(Spanned::get_ref) else {
            return RebuildChecks::default();
        };
        let mut checks = Vec::new();
        for check in rebuild.checks.iter().flatten() {
            match Parser::parse_sql(&PostgreSqlDialect {}, check.get_ref()) {
                Ok(parsed) if parsed.len() == 1 && matches!(parsed[0], ast::Statement::Query(_)) => {
                    checks.push(check.get_ref().clone())
                }
                Ok(_) => self.error(check.span(), "rebuild check must be one query returning a boolean"),
                Err(error) => self.error(check.span(), format!("rebuild check does not parse: {error}")),
            }
        }
        let min_row_ratio = rebuild.min_row_ratio.as_ref().and_then(|ratio| {
            let value = *ratio.get_ref();
            if (0.0..=10.0).contains(&value) {
                Some(value)
            } else {
                self.error(ratio.span(), "`min_row_ratio` must be between 0 and 10");
                None
            }
        });
        RebuildChecks { checks, min_row_ratio }
    }

    fn topics(&mut self, topics: Option<&Spanned<Vec<Spanned<String>>>>) -> Vec<String> {
        let Some(topics) = topics else {
            self.error(0..0, "missing `topics`: the Kafka topics to read, like `topics = [\"shop.orders\"]`");
            return Vec::new();
        };
        if topics.get_ref().is_empty() {
            self.error(topics.span(), "`topics` must not be empty");
        }
        let mut seen = Vec::new();
        for topic in topics.get_ref() {
            let name = topic.get_ref();
            let valid = !name.is_empty()
                && name.len() <= 249
                && name.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
            if !valid {
                self.error(topic.span(), format!("bad topic name `{name}`: use letters, digits, `.`, `_` and `-`"));
            } else if seen.contains(name) {
                self.error(topic.span(), format!("topic `{name}` is listed twice"));
            }
            seen.push(name.clone());
        }
        seen
    }

    fn envelope(&mut self, envelope: Option<&EnvelopeDef>) -> Envelope {
        let mut result = Envelope::default();
        let Some(envelope) = envelope else {
            return result;
        };
        let fields = [
            ("type", &envelope.event_type, &mut result.event_type),
            ("id", &envelope.id, &mut result.event_id),
            ("key", &envelope.key, &mut result.key),
            ("version", &envelope.version, &mut result.version),
            ("occurred_at", &envelope.occurred_at, &mut result.occurred_at),
        ];
        for (field, written, source) in fields {
            let Some(written) = written else { continue };
            match parse_source(written.get_ref()) {
                Ok(Source::KafkaTimestamp) if field != "occurred_at" => self
                    .error(written.span(), format!("envelope `{field}`: `kafka:timestamp` is only for `occurred_at`")),
                Ok(parsed) => *source = parsed,
                Err(message) => self.error(written.span(), format!("envelope `{field}`: {message}")),
            }
        }
        result
    }

    fn table(&mut self, table: &Spanned<TableDef>) -> Option<VersionedTable> {
        let definition = table.get_ref();
        let mut valid = true;
        let mut required = |cx: &mut Self, value: &Option<Spanned<String>>, key: &str, check: fn(&str) -> bool| {
            let Some(value) = value else {
                cx.error(table.span(), format!("`[table]` needs `{key}`"));
                valid = false;
                return String::new();
            };
            if !check(value.get_ref()) {
                let message = format!(
                    "`{}` is not a plain identifier: use `[a-z_][a-z0-9_]*`{}, without quotes",
                    value.get_ref(),
                    if key == "name" { " (optionally `schema.table`)" } else { "" }
                );
                cx.error(value.span(), message);
                valid = false;
            }
            value.get_ref().clone()
        };
        let name = required(self, &definition.name, "name", is_table_name);
        let key_column = required(self, &definition.key, "key", is_identifier);
        let version_column = match &definition.version {
            Some(_) => required(self, &definition.version, "version", is_identifier),
            None => "version".to_string(),
        };
        if valid && key_column == version_column {
            self.error(table.span(), "`[table]` `key` and `version` must be different columns");
            valid = false;
        }
        valid.then(|| VersionedTable {
            version_lookup: Statement {
                // Read as bigint whatever integer type the column has.
                sql: format!("SELECT {version_column}::bigint FROM {name} WHERE {key_column} = $1"),
                params: vec![ParamRef { name: "key".into(), source: ParamSource::Key, optional: false }],
                kind: StatementKind::Other,
                origin: Origin { file: self.file.clone(), line: self.line(&table.span()) },
                writes: None,
                set_based: None,
            },
            table: name,
            key_column,
            version_column,
        })
    }

    fn handler(
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
            if let Some(statement) = self.statement(name, &sql, span, guard, envelope) {
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
        let set_based = match kind {
            StatementKind::Create | StatementKind::Update | StatementKind::UpdateIfNewer => {
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

/// `a.b.c`, `header:NAME`, `kafka:key` or `kafka:timestamp`.
fn parse_source(text: &str) -> Result<Source, String> {
    if let Some(header) = text.strip_prefix("header:") {
        return match header.is_empty() {
            true => Err("`header:` needs a header name, like `header:ce_type`".into()),
            false => Ok(Source::Header(header.to_string())),
        };
    }
    match text {
        "kafka:key" => return Ok(Source::KafkaKey),
        "kafka:timestamp" => return Ok(Source::KafkaTimestamp),
        _ => {}
    }
    let path: Vec<String> = text.split('.').map(str::to_string).collect();
    if text.contains(':') || path.iter().any(String::is_empty) {
        return Err(format!(
            "unknown source `{text}`: use a JSON path like `meta.type`, `header:NAME`, `kafka:key` or `kafka:timestamp`"
        ));
    }
    Ok(Source::Path(path))
}

fn is_identifier(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= 63
        && bytes.next().is_some_and(|c| c.is_ascii_lowercase() || c == b'_')
        && bytes.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
}

fn is_table_name(name: &str) -> bool {
    let parts: Vec<&str> = name.split('.').collect();
    parts.len() <= 2 && parts.iter().all(|part| is_identifier(part))
}

/// The kind of a projection's first statement when it is a guarded write on `table`, or why not.
///
/// Accepted: `INSERT INTO <table> (<key>, …, <version>) VALUES (:key, …, :version) ON CONFLICT …
/// DO NOTHING` (a `Create`), and `UPDATE <table> SET …, <version> = :version WHERE <key> = :key AND
/// <version> = :version - 1` or `… AND <version> < :version` (an `Update`).
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
fn written_table(statement: &ast::Statement) -> Option<String> {
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
    use super::*;

    const HEAD: &str = "topics = [\"shop.orders\"]\n[table]\nname = \"order_summary\"\nkey = \"order_id\"\n";

    fn compile(text: &str) -> Result<Projection, Vec<DefinitionError>> {
        compile_file(Path::new("projections/order_summary.toml"), text)
    }

    fn messages(text: &str) -> Vec<(usize, String)> {
        compile(text).unwrap_err().into_iter().map(|e| (e.line, e.message)).collect()
    }

    fn first_kind(sql: &str) -> Result<StatementKind, String> {
        let text = format!("{HEAD}[on.E]\nsql = {sql:?}\n");
        match compile(&text) {
            Ok(projection) => Ok(projection.handlers["E"].statements[0].kind),
            Err(errors) => Err(errors[0].message.clone()),
        }
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
    fn reports_every_error_with_lines() {
        let text = "name = \"Bad\"\ntopics = []\n[envelope]\ntype = \"foo:bar\"\n[table]\nname = \"t\"\nkey = \"\\\"k\\\"\"\n[on.A]\nsql = \"SELEC 1\"\n[on.B]\n";
        let errors = messages(text);
        let lines: Vec<usize> = errors.iter().map(|(line, _)| *line).collect();
        assert_eq!(lines, [1, 2, 4, 7, 9, 10], "{errors:?}");
        assert!(errors[4].1.starts_with("statement for `A` does not parse"), "{errors:?}");
    }

    #[test]
    fn toml_errors_have_lines() {
        let errors = messages("topics = [\"t\"]\n[table]\nname = \"t\"\nkey = \"k\"\nkye = 1\n");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].0, 5);
        assert!(errors[0].1.contains("unknown field `kye`"), "{errors:?}");
    }

    #[test]
    fn hash_follows_meaning_not_layout() {
        let base = "topics = [\"t\"]\ndedupe = \"event_id\"\n[on.A]\nsql = \"UPDATE totals SET n = n + 1\"\n";
        let commented = format!("# a comment\n{base}");
        let changed = base.replace("n + 1", "n + 2");
        let hash = |text: &str| compile(text).unwrap().hash;
        assert_eq!(hash(base), hash(&commented));
        assert_ne!(hash(base), hash(&changed));
    }

    /// The hash before the canonical form, as it was computed then: from the `Debug` text.
    fn debug_hash(projection: &Projection) -> String {
        let mut canonical = format!("topics={:?}\nenvelope={:?}\n", projection.topics, projection.envelope);
        match &projection.dedupe {
            Dedupe::EventId => canonical.push_str("dedupe=event_id\n"),
            Dedupe::Version(table) => canonical.push_str(&format!(
                "dedupe=version table={} key={} version={}\n",
                table.table, table.key_column, table.version_column
            )),
        }
        for (event_type, handler) in &projection.handlers {
            canonical.push_str(&format!("on {event_type}\n"));
            for statement in &handler.statements {
                canonical.push_str(&format!("  {}\n  {:?}\n", statement.sql, statement.params));
            }
        }
        hex_sha256(&canonical)
    }

    #[test]
    fn example_hashes_are_pinned() {
        for (file, canonical, legacy) in [
            (
                "projections/order_summary.toml",
                "00dcfcfd967bad66216d2d12cae2a0cbed4ff1d79f40828c3a9b6aeb2374206a",
                "4f772a5baa7278623c8a496892e1c6b192e31d9fde00116af886b387b67f66f8",
            ),
            (
                "projections/customer_totals.toml",
                "ecc7d95e1d02eac9d6c4b792b53fcff0e21e6ed48f3bfb8e1fa267be1cab18ba",
                "4542d40711f0317c113c83ecf2624a4454b829082411fa11e0999b6ba3ec1ba0",
            ),
        ] {
            let text = std::fs::read_to_string(file).expect("example definition");
            let projection = compile_file(Path::new(file), &text).expect("compiles");
            assert_eq!(legacy_hash(&projection), debug_hash(&projection), "{file}: the legacy hash is the Debug hash");
            assert_eq!(projection.hash, canonical, "{file}: a change to the hash stops every deployed projection");
            assert_eq!(legacy_hash(&projection), legacy, "{file}");
        }
    }

    #[test]
    fn tables_are_what_the_statements_write() {
        let text = "topics = [\"t\"]\ndedupe = \"event_id\"\n[on.A]\nsql = [\"UPDATE Totals SET n = n + 1\", \"INSERT INTO shop.log (x) VALUES (1)\", \"SELECT 1\"]\n[on.B]\nsql = \"DELETE FROM totals WHERE id = :id\"\n";
        assert_eq!(compile(text).unwrap().tables(), vec!["shop.log".to_string(), "totals".to_string()]);
    }

    #[test]
    fn event_id_dedupe_takes_any_statement() {
        let text = "topics = [\"t\"]\ndedupe = \"event_id\"\n[on.A]\nsql = [\"DELETE FROM x WHERE id = :key\", \"SELECT 1\"]\n";
        let projection = compile(text).unwrap();
        assert_eq!(projection.dedupe, Dedupe::EventId);
        assert!(projection.handlers["A"].statements.iter().all(|s| s.kind == StatementKind::Other));
    }

    #[test]
    fn file_stem_must_be_a_name() {
        let errors = compile_file(
            Path::new("x/Order-Summary.toml"),
            "topics = [\"t\"]\ndedupe = \"event_id\"\n[on.A]\nsql = \"SELECT 1\"\n",
        )
        .unwrap_err();
        assert!(errors[0].message.contains("(from the file name)"));
    }
}
