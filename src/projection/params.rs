//! Named parameters (`:data.amount`, `:key`, `:header.trace_id?`) in SQL text, compiled to `$n`.
//!
//! A small hand-written scanner: it knows just enough of PostgreSQL's lexical rules to never see a
//! parameter inside a string (`'…'`, `E'…'`, `$tag$…$tag$`), a quoted identifier (`"…"`), a comment
//! (`--`, nested `/* */`) or a cast (`::`). The same name twice reuses the same `$n`.

use std::collections::HashMap;

use super::{ParamRef, ParamSource};

/// SQL with `$1..$n` placeholders; `params[i]` binds `$(i+1)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledSql {
    pub sql: String,
    pub params: Vec<ParamRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    #[error("use named parameters like `:data.amount`, not `{0}`")]
    Positional(String),
    #[error("unterminated {0}")]
    Unterminated(&'static str),
    #[error("parameter `:{0}` is written both with and without `?`")]
    MixedOptional(String),
    #[error("bad parameter name `:{0}`: segments are `[A-Za-z_][A-Za-z0-9_]*` or digits, joined by `.`")]
    BadName(String),
    #[error("parameter `:{0}` names nothing after its last `.`")]
    EmptySegment(String),
}

/// Compiles `:name` parameters to `$n` placeholders, skipping strings, quoted identifiers,
/// comments and `::` casts.
pub fn compile_named(sql: &str) -> Result<CompiledSql, ParamError> {
    let bytes = sql.as_bytes();
    let mut out = String::with_capacity(sql.len());
    let mut params: Vec<ParamRef> = Vec::new();
    let mut index_of: HashMap<String, usize> = HashMap::new();
    let mut i = 0;
    // Start of the text not yet copied to `out`.
    let mut copied = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let prev_is_ident = i > 0 && is_ident_char(bytes[i - 1]);
        match b {
            b'\'' => {
                let escapes = i > 0 && matches!(bytes[i - 1], b'E' | b'e') && !(i > 1 && is_ident_char(bytes[i - 2]));
                i = skip_quoted(bytes, i, b'\'', escapes).ok_or(ParamError::Unterminated("string"))?;
            }
            b'"' => {
                i = skip_quoted(bytes, i, b'"', false).ok_or(ParamError::Unterminated("quoted identifier"))?;
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                i = bytes[i..].iter().position(|&c| c == b'\n').map_or(bytes.len(), |p| i + p + 1);
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                i = skip_block_comment(bytes, i).ok_or(ParamError::Unterminated("comment"))?;
            }
            b'$' if !prev_is_ident => {
                if bytes.get(i + 1).is_some_and(u8::is_ascii_digit) {
                    let end = i + 1 + bytes[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
                    return Err(ParamError::Positional(sql[i..end].to_string()));
                }
                match dollar_tag(bytes, i) {
                    Some(tag_end) => {
                        let tag = &sql[i..tag_end];
                        let body = &sql[tag_end..];
                        let close = body.find(tag).ok_or(ParamError::Unterminated("dollar-quoted string"))?;
                        i = tag_end + close + tag.len();
                    }
                    None => i += 1,
                }
            }
            b':' if bytes.get(i + 1) == Some(&b':') => i += 2,
            b':' if bytes.get(i + 1).is_some_and(|&c| is_ident_start(c)) => {
                let (name, optional, end) = read_name(sql, i + 1)?;
                out.push_str(&sql[copied..i]);
                let n = match index_of.get(&name) {
                    Some(&n) => {
                        if params[n].optional != optional {
                            return Err(ParamError::MixedOptional(name));
                        }
                        n
                    }
                    None => {
                        params.push(ParamRef { source: source_of(&name), name: name.clone(), optional });
                        index_of.insert(name, params.len() - 1);
                        params.len() - 1
                    }
                };
                out.push('$');
                out.push_str(&(n + 1).to_string());
                i = end;
                copied = end;
            }
            _ => i += 1,
        }
    }
    out.push_str(&sql[copied..]);
    Ok(CompiledSql { sql: out, params })
}

/// Where a parameter's value comes from, by its name.
pub fn source_of(name: &str) -> ParamSource {
    match name {
        "event_id" => ParamSource::EventId,
        "event_type" => ParamSource::EventType,
        "key" => ParamSource::Key,
        "version" => ParamSource::Version,
        "occurred_at" => ParamSource::OccurredAt,
        "topic" => ParamSource::Topic,
        "partition" => ParamSource::Partition,
        "offset" => ParamSource::Offset,
        "value" => ParamSource::WholeValue,
        _ => match name.strip_prefix("header.") {
            Some(header) => ParamSource::Header(header.to_string()),
            None => ParamSource::Path(super::JsonPath::new(name.split('.').map(str::to_string).collect())),
        },
    }
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_'
}

fn is_ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

fn is_name_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Reads a parameter name starting at `start` (just after the colon): returns the name, whether
/// it is optional (`?`), and the index just after it.
fn read_name(sql: &str, start: usize) -> Result<(String, bool, usize), ParamError> {
    let bytes = sql.as_bytes();
    let segment_end = |from: usize| from + bytes[from..].iter().take_while(|&&c| is_name_char(c)).count();
    let mut end = segment_end(start);
    while bytes.get(end) == Some(&b'.') && bytes.get(end + 1).is_some_and(|&c| is_name_char(c)) {
        end = segment_end(end + 1);
    }
    let name = &sql[start..end];
    // `:header.` (a header with no name), `:data..amount`, `:data.` at the end: a dot that
    // starts no segment. (`:a. b` leaves the dot to the SQL.)
    if bytes.get(end) == Some(&b'.') && (name == "header" || matches!(bytes.get(end + 1), None | Some(b'.'))) {
        return Err(ParamError::EmptySegment(format!("{name}.")));
    }
    let bad_segment = name.split('.').any(|segment| {
        let first = segment.as_bytes()[0];
        first.is_ascii_digit() && !segment.bytes().all(|c| c.is_ascii_digit())
    });
    if bad_segment {
        return Err(ParamError::BadName(name.to_string()));
    }
    let optional = bytes.get(end) == Some(&b'?');
    Ok((name.to_string(), optional, end + usize::from(optional)))
}

/// Index just after the closing quote of a quoted text starting at `start`; a doubled quote is
/// an escaped quote, and with `backslash` a backslash escapes the next byte.
fn skip_quoted(bytes: &[u8], start: usize, quote: u8, backslash: bool) -> Option<usize> {
    let mut i = start + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if backslash => i += 2,
            c if c == quote => {
                if bytes.get(i + 1) == Some(&quote) {
                    i += 2;
                } else {
                    return Some(i + 1);
                }
            }
            _ => i += 1,
        }
    }
    None
}

/// Index just after a (nested) `/* … */` comment starting at `start`.
fn skip_block_comment(bytes: &[u8], start: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = start;
    while i + 1 < bytes.len() {
        match (bytes[i], bytes[i + 1]) {
            (b'/', b'*') => {
                depth += 1;
                i += 2;
            }
            (b'*', b'/') => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => i += 1,
        }
    }
    None
}

/// If a dollar-quote tag (`$$` or `$tag$`) starts at `start`, the index just after it.
fn dollar_tag(bytes: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    if bytes.get(i).is_some_and(|&c| is_ident_start(c)) {
        i += 1;
        while bytes.get(i).is_some_and(|&c| is_name_char(c)) {
            i += 1;
        }
    }
    (bytes.get(i) == Some(&b'$')).then_some(i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compiled(sql: &str) -> (String, Vec<String>) {
        let c = compile_named(sql).unwrap();
        (c.sql, c.params.into_iter().map(|p| p.name).collect())
    }

    #[test]
    fn replaces_names_and_reuses_numbers() {
        let (sql, names) = compiled("UPDATE t SET a = :data.a, v = :version WHERE k = :key AND v = :version - 1");
        assert_eq!(sql, "UPDATE t SET a = $1, v = $2 WHERE k = $3 AND v = $2 - 1");
        assert_eq!(names, ["data.a", "version", "key"]);
    }

    #[test]
    fn casts_are_not_params() {
        let (sql, names) = compiled("SELECT :data.total::numeric, x::text, :a::int[]");
        assert_eq!(sql, "SELECT $1::numeric, x::text, $2::int[]");
        assert_eq!(names, ["data.total", "a"]);
    }

    #[test]
    fn skips_strings_identifiers_comments_and_dollar_quotes() {
        let sql = "SELECT ':no', 'it''s :no', E'\\' :no', \"col:no\", $$ :no $$, $f$ :no $f$, \
                   /* :no /* :no */ :no */ -- :no\n :yes";
        let (out, names) = compiled(sql);
        assert_eq!(names, ["yes"]);
        assert!(out.ends_with("\n $1"));
        assert!(out.contains("E'\\' :no'"));
    }

    #[test]
    fn plain_string_ending_in_backslash_is_not_an_escape() {
        let (_, names) = compiled("SELECT 'a\\', :p");
        assert_eq!(names, ["p"]);
        // `ne'…'` is an identifier followed by a string, not an E string.
        let (_, names) = compiled("SELECT one'a\\', :p");
        assert_eq!(names, ["p"]);
    }

    #[test]
    fn array_indexes_and_optional() {
        let c = compile_named("VALUES (:data.items.0.sku?, :header.trace_id, :value, :offset)").unwrap();
        assert_eq!(c.sql, "VALUES ($1, $2, $3, $4)");
        assert_eq!(c.params[0].name, "data.items.0.sku");
        assert!(c.params[0].optional);
        assert_eq!(
            c.params[0].source,
            ParamSource::Path(crate::projection::JsonPath::new(vec![
                "data".into(),
                "items".into(),
                "0".into(),
                "sku".into()
            ]))
        );
        assert_eq!(c.params[1].source, ParamSource::Header("trace_id".into()));
        assert_eq!(c.params[2].source, ParamSource::WholeValue);
        assert_eq!(c.params[3].source, ParamSource::Offset);
    }

    #[test]
    fn trailing_dot_is_not_part_of_name() {
        let (sql, names) = compiled("SELECT :a. b");
        assert_eq!(sql, "SELECT $1. b");
        assert_eq!(names, ["a"]);
        for sql in ["SELECT :header. FROM t", "SELECT :data..amount", "SELECT :data."] {
            assert!(matches!(compile_named(sql), Err(ParamError::EmptySegment(_))), "{sql}");
        }
    }

    #[test]
    fn positional_params_are_rejected() {
        assert_eq!(
            compile_named("SELECT $1").unwrap_err().to_string(),
            "use named parameters like `:data.amount`, not `$1`"
        );
        // `$` inside an identifier and in strings is fine.
        assert!(compile_named("SELECT a$1, '$1', \"$1\"").is_ok());
    }

    #[test]
    fn errors() {
        assert_eq!(compile_named("SELECT 'x").unwrap_err(), ParamError::Unterminated("string"));
        assert_eq!(compile_named("SELECT \"x").unwrap_err(), ParamError::Unterminated("quoted identifier"));
        assert_eq!(compile_named("SELECT $a$ x").unwrap_err(), ParamError::Unterminated("dollar-quoted string"));
        assert_eq!(compile_named("SELECT /* /* */").unwrap_err(), ParamError::Unterminated("comment"));
        assert_eq!(compile_named("SELECT :a, :a?").unwrap_err(), ParamError::MixedOptional("a".into()));
        assert_eq!(compile_named("SELECT :a.0b").unwrap_err(), ParamError::BadName("a.0b".into()));
    }

    #[test]
    fn colon_not_followed_by_a_name_is_kept() {
        let (sql, names) = compiled("SELECT arr[1:2], f(a := 1)");
        assert_eq!(sql, "SELECT arr[1:2], f(a := 1)");
        assert!(names.is_empty());
    }
}
