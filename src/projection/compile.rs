//! Definition files to [`Projection`]s: the TOML side (name, topics, envelope, `[table]`,
//! `[rebuild]`), every mistake of every file reported at once, with its line. A handler's SQL is
//! compiled in [`super::handlers`] and its guard checked in [`super::guard`]; the definition hash
//! is [`super::hash`]'s.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};

use sqlparser::ast;
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use toml::Spanned;

use super::definition::{DedupeKind, DefinitionFile, EnvelopeDef, RebuildDef, TableDef};
use super::fields::Fields;
use super::hash::semantic_hash;
use super::identifier::{is_identifier, is_table_name};
use super::{
    Dedupe, Envelope, Origin, ParamRef, ParamSource, Projection, RebuildChecks, Source, Statement, StatementKind,
    VersionedTable,
};

// Where these lived before the hash had a file of its own (other modules name them here).
pub use super::hash::{canonical_form, hex_sha256, legacy_hash};

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
                    handlers.insert(event_type.get_ref().as_str().into(), compiled);
                }
            }
        }
        Some(on) => cx.error(on.span(), "no handlers: add an `[on.<EventType>]` table"),
        None => cx.error(0..0, "no handlers: add an `[on.<EventType>]` table"),
    }
    let rebuild_checks = cx.rebuild_checks(definition.rebuild.as_ref());
    let keep_event_ids = cx.keep_event_ids(definition.keep_event_ids.as_ref(), dedupe_kind);
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
        keep_event_ids,
        migrations_dir: super::migrations::dir_of(path),
        migrations: Vec::new(),
        fields: Fields::default(),
        envelope_slots: [None; 5],
        schemas: Default::default(),
    };
    projection.hash = semantic_hash(&projection);
    assign_fields(&mut projection);
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
                None => match super::migrations::read_dir(&projection.migrations_dir) {
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

/// What compiling one file gathers: its errors, each placed by its span in `text`.
pub(super) struct Context<'t> {
    pub(super) file: PathBuf,
    text: &'t str,
    pub(super) errors: Vec<DefinitionError>,
}

impl Context<'_> {
    pub(super) fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        let before = self.text.get(..span.start).unwrap_or(self.text);
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
        self.errors.push(DefinitionError { file: self.file.clone(), line, column, message: message.into() });
    }

    pub(super) fn line(&self, span: &Range<usize>) -> usize {
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

    /// `keep_event_ids`: a duration of at least a second, for event-id projections only.
    fn keep_event_ids(&mut self, keep: Option<&Spanned<String>>, dedupe: DedupeKind) -> Option<std::time::Duration> {
        let keep = keep?;
        if dedupe != DedupeKind::EventId {
            self.error(keep.span(), "`keep_event_ids` is only for `dedupe = \"event_id\"`");
            return None;
        }
        match humantime::parse_duration(keep.get_ref()) {
            Ok(duration) if duration >= std::time::Duration::from_secs(1) => Some(duration),
            Ok(_) => {
                self.error(keep.span(), "`keep_event_ids` must be at least 1s");
                None
            }
            Err(error) => {
                self.error(keep.span(), format!("`keep_event_ids` is not a duration like \"7d\" or \"12h\": {error}"));
                None
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
        if let Some(preset) = &envelope.preset {
            match preset.get_ref().as_str() {
                "cloudevents" => result = super::cloudevents::envelope(),
                other => self.error(
                    preset.span(),
                    format!("envelope `preset`: unknown preset `{other}` (known: `cloudevents`)"),
                ),
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(text: &str) -> Result<Projection, Vec<DefinitionError>> {
        compile_file(Path::new("projections/order_summary.toml"), text)
    }

    fn messages(text: &str) -> Vec<(usize, String)> {
        compile(text).unwrap_err().into_iter().map(|e| (e.line, e.message)).collect()
    }

    #[test]
    fn reports_every_error_with_lines() {
        let text = "name = \"Bad\"\ntopics = []\n[envelope]\ntype = \"foo:bar\"\n[table]\nname = \"t\"\nkey = \"\\\"k\\\"\"\n[on.A]\nsql = \"SELEC 1\"\n[on.B]\n";
        let errors = messages(text);
        let lines: Vec<usize> = errors.iter().map(|(line, _)| *line).collect();
        assert_eq!(lines, [1, 2, 4, 7, 9, 10], "{errors:?}");
        assert!(errors[4].1.starts_with("statement for `A` does not parse"), "{errors:?}");
    }

    /// `keep_event_ids`: a duration for event-id projections only, at least a second, not part
    /// of the hash; each mistake is reported at its line.
    #[test]
    fn keep_event_ids_is_a_window_of_event_id_projections() {
        let event_id = |keep: &str| {
            format!(
                "topics = [\"t\"]\ndedupe = \"event_id\"\nkeep_event_ids = \"{keep}\"\n[on.A]\nsql = \"SELECT 1\"\n"
            )
        };
        let kept = compile(&event_id("7d")).expect("compiles");
        assert_eq!(kept.keep_event_ids, Some(std::time::Duration::from_secs(7 * 86_400)));
        assert_eq!(compile(&event_id("12h 30m")).unwrap().keep_event_ids, Some(std::time::Duration::from_secs(45_000)));
        let forever = compile("topics = [\"t\"]\ndedupe = \"event_id\"\n[on.A]\nsql = \"SELECT 1\"\n").unwrap();
        assert_eq!(forever.keep_event_ids, None);
        assert_eq!(kept.hash, forever.hash, "the window is not part of what the projection does");
        for (keep, says) in [("soon", "is not a duration"), ("500ms", "at least 1s"), ("", "is not a duration")] {
            let errors = messages(&event_id(keep));
            assert_eq!(errors.len(), 1, "{keep}: {errors:?}");
            assert_eq!(errors[0].0, 3, "{keep}: {errors:?}");
            assert!(errors[0].1.contains(says), "{keep}: {errors:?}");
        }
        let versioned = "topics = [\"t\"]\nkeep_event_ids = \"1d\"\n[table]\nname = \"t\"\nkey = \"k\"\n[on.A]\nsql = \"INSERT INTO t (k, version) VALUES (:key, :version)\"\n";
        let errors = messages(versioned);
        assert!(
            errors.iter().any(|(line, message)| *line == 2 && message.contains("only for `dedupe = \"event_id\"`")),
            "{errors:?}"
        );
    }

    #[test]
    fn toml_errors_have_lines() {
        let errors = messages("topics = [\"t\"]\n[table]\nname = \"t\"\nkey = \"k\"\nkye = 1\n");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].0, 5);
        assert!(errors[0].1.contains("unknown field `kye`"), "{errors:?}");
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
