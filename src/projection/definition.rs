//! The serde mirror of a definition file (`projections/*.toml`), with source spans for error lines.
//!
//! Only shape is checked here (unknown keys, types); meaning is checked in [`super::compile`].
//! Every optional-looking field is an `Option` so that compile can report all missing keys at once.

use std::fmt;

use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefinitionFile {
    /// Defaults to the file stem.
    pub name: Option<Spanned<String>>,
    pub topics: Option<Spanned<Vec<Spanned<String>>>>,
    pub dedupe: Option<Spanned<DedupeKind>>,
    /// With `dedupe = "event_id"`: how long processed ids are kept (`"7d"`, `"12h"`).
    pub keep_event_ids: Option<Spanned<String>>,
    pub envelope: Option<Spanned<EnvelopeDef>>,
    pub table: Option<Spanned<TableDef>>,
    /// Event type to handler, in file order.
    pub on: Option<Spanned<Entries<Spanned<HandlerDef>>>>,
    /// Checks a shadow rebuild must pass before it replaces the live tables.
    pub rebuild: Option<Spanned<RebuildDef>>,
}

/// `[rebuild]`: checks run against a shadow copy before the swap; any failure aborts the swap.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RebuildDef {
    /// Queries returning one boolean, run against the shadow tables: all must be true.
    pub checks: Option<Vec<Spanned<String>>>,
    /// Each shadow table must have at least this fraction of the live table's rows.
    pub min_row_ratio: Option<Spanned<f64>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DedupeKind {
    Version,
    EventId,
}

/// Each value is a source: `a.b.c` (JSON path), `header:NAME`, `kafka:key` or `kafka:timestamp`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvelopeDef {
    /// `cloudevents`: CloudEvents in either Kafka binding mode, its attributes as the defaults.
    pub preset: Option<Spanned<String>>,
    #[serde(rename = "type")]
    pub event_type: Option<Spanned<String>>,
    pub id: Option<Spanned<String>>,
    pub key: Option<Spanned<String>>,
    pub version: Option<Spanned<String>>,
    pub occurred_at: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableDef {
    pub name: Option<Spanned<String>>,
    pub key: Option<Spanned<String>>,
    pub version: Option<Spanned<String>>,
}

/// `[on.<EventType>]`: exactly one of `insert`, `update`, `sql`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerDef {
    /// Column to SQL expression.
    pub insert: Option<Spanned<Entries<Spanned<String>>>>,
    /// Column to SQL expression.
    pub update: Option<Spanned<Entries<Spanned<String>>>>,
    pub sql: Option<Spanned<SqlDef>>,
    /// Run after the first statement, only when it applied.
    pub also: Option<Spanned<Vec<Spanned<String>>>>,
}

/// One statement or several.
#[derive(Debug)]
pub enum SqlDef {
    One(String),
    Many(Vec<Spanned<String>>),
}

/// A TOML table's entries in file order, keys with their spans.
#[derive(Debug)]
pub struct Entries<V>(pub Vec<(Spanned<String>, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Entries<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntriesVisitor<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for EntriesVisitor<V> {
            type Value = Entries<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }
        deserializer.deserialize_map(EntriesVisitor(std::marker::PhantomData))
    }
}

impl<'de> Deserialize<'de> for SqlDef {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SqlVisitor;
        impl<'de> Visitor<'de> for SqlVisitor {
            type Value = SqlDef;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an array of strings")
            }
            fn visit_str<E: serde::de::Error>(self, sql: &str) -> Result<SqlDef, E> {
                Ok(SqlDef::One(sql.to_string()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SqlDef, A::Error> {
                let mut all = Vec::new();
                while let Some(sql) = seq.next_element()? {
                    all.push(sql);
                }
                Ok(SqlDef::Many(all))
            }
        }
        deserializer.deserialize_any(SqlVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_file_order_and_spans() {
        let text = "topics = [\"t\"]\n[on.B]\ninsert = { z = \"1\", a = \":x\" }\n[on.A]\nsql = [\"SELECT 1\", \"SELECT 2\"]\n";
        let file: DefinitionFile = toml::from_str(text).unwrap();
        let on = file.on.unwrap().into_inner().0;
        assert_eq!(on[0].0.get_ref(), "B");
        let insert = on[0].1.get_ref().insert.as_ref().unwrap().get_ref();
        let columns: Vec<&str> = insert.0.iter().map(|(k, _)| k.get_ref().as_str()).collect();
        assert_eq!(columns, ["z", "a"]);
        assert_eq!(&text[insert.0[1].0.span()], "a");
        match on[1].1.get_ref().sql.as_ref().unwrap().get_ref() {
            SqlDef::Many(all) => assert_eq!(&text[all[1].span()], "\"SELECT 2\""),
            SqlDef::One(_) => panic!("expected many"),
        }
    }

    #[test]
    fn rejects_unknown_keys() {
        let err = toml::from_str::<DefinitionFile>("topics = [\"t\"]\n[on.A]\nsqll = \"x\"\n").unwrap_err();
        assert!(err.message().contains("unknown field `sqll`"), "{}", err.message());
    }
}
