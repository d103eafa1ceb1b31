//! The JSON fields a projection reads, found in one pass over a record's value, without building
//! a tree: each field is kept as the byte range of its JSON text in the record.
//!
//! The paths a projection names (its envelope's and its parameters') form a small tree. The walk
//! follows it through the value and skips everything else with serde_json's non-recursive
//! skipper, so an event costs no allocation per field. When a key appears twice in an object the
//! last one counts, as it would in a `serde_json::Value`.

use std::borrow::Cow;
use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;

/// Where a field's JSON text is in the record's value: `start..end` in bytes.
pub type Span = (u32, u32);

/// The paths a projection reads, each with a slot: [`Fields::find`] fills slot `i` with the span of
/// the `i`-th path added.
#[derive(Debug, Clone, Default)]
pub struct Fields {
    root: Node,
    paths: Vec<Vec<String>>,
}

#[derive(Debug, Clone, Default)]
struct Node {
    children: Vec<Child>,
}

#[derive(Debug, Clone)]
struct Child {
    name: String,
    /// The name read as an array index (`items.0`), as `str::parse::<usize>` reads it.
    index: Option<usize>,
    /// The slot of the path ending here.
    slot: Option<usize>,
    /// Paths going further.
    node: Option<Node>,
}

impl Fields {
    /// The slot of `path`, added when it is new.
    pub fn add(&mut self, path: &[String]) -> usize {
        if let Some(slot) = self.slot_of(path) {
            return slot;
        }
        let slot = self.paths.len();
        self.paths.push(path.to_vec());
        let mut node = &mut self.root;
        for (depth, segment) in path.iter().enumerate() {
            let position = match node.children.iter().position(|child| child.name == *segment) {
                Some(position) => position,
                None => {
                    let index = segment.parse::<usize>().ok();
                    node.children.push(Child { name: segment.clone(), index, slot: None, node: None });
                    node.children.len() - 1
                }
            };
            let child = &mut node.children[position];
            if depth + 1 == path.len() {
                child.slot = Some(slot);
                break;
            }
            node = child.node.get_or_insert_with(Node::default);
        }
        slot
    }

    /// The slot of `path`, if it was added.
    pub fn slot_of(&self, path: &[String]) -> Option<usize> {
        self.paths.iter().position(|known| known == path)
    }

    /// How many slots [`Fields::find`] fills.
    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// The span of every path in `text`, a whole JSON value (`None`: not there). An error when
    /// `text` is not JSON.
    pub fn find(&self, text: &str) -> Result<Vec<Option<Span>>, serde_json::Error> {
        let mut spans = vec![None; self.paths.len()];
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let found = Found { spans: &mut spans, base: text.as_ptr() as usize };
        Walk { node: &self.root, found }.deserialize(&mut deserializer)?;
        deserializer.end()?;
        Ok(spans)
    }
}

impl Node {
    /// Forgets what an earlier occurrence of this node's key found.
    fn clear(&self, spans: &mut [Option<Span>]) {
        for child in &self.children {
            if let Some(slot) = child.slot {
                spans[slot] = None;
            }
            if let Some(node) = &child.node {
                node.clear(spans);
            }
        }
    }
}

/// Where a walk writes what it finds.
struct Found<'s> {
    spans: &'s mut [Option<Span>],
    /// Address of the first byte of the record's value: spans are relative to it.
    base: usize,
}

impl Found<'_> {
    fn reborrow(&mut self) -> Found<'_> {
        Found { spans: self.spans, base: self.base }
    }
}

/// Walks one JSON value along `node`.
struct Walk<'f, 's> {
    node: &'f Node,
    found: Found<'s>,
}

impl<'de> DeserializeSeed<'de> for Walk<'_, '_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        while let Some(child) = map.next_key_seed(Key(&self.node.children))? {
            match child {
                Some(child) => map.next_value_seed(Field { child, found: self.found.reborrow() })?,
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        let mut index = 0usize;
        loop {
            let more = match self.node.children.iter().find(|child| child.index == Some(index)) {
                Some(child) => seq.next_element_seed(Field { child, found: self.found.reborrow() })?.is_some(),
                None => seq.next_element::<IgnoredAny>()?.is_some(),
            };
            if !more {
                return Ok(());
            }
            index += 1;
        }
    }

    // A scalar has no fields.
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
}

/// An object key: the child it names, if any.
struct Key<'f>(&'f [Child]);

impl<'de, 'f> DeserializeSeed<'de> for Key<'f> {
    type Value = Option<&'f Child>;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'f> Visitor<'_> for Key<'f> {
    type Value = Option<&'f Child>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(self.0.iter().find(|child| child.name == key))
    }
}

/// The value of a key (or array element) some path goes through.
struct Field<'f, 's> {
    child: &'f Child,
    found: Found<'s>,
}

impl<'de> DeserializeSeed<'de> for Field<'_, '_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        let Field { child, found } = self;
        if let Some(node) = &child.node {
            node.clear(found.spans);
        }
        match (child.slot, &child.node) {
            (None, Some(node)) => Walk { node, found }.deserialize(deserializer),
            (Some(slot), node) => {
                let raw: &RawValue = de::Deserialize::deserialize(deserializer)?;
                let text = raw.get();
                let start = text.as_ptr() as usize - found.base;
                found.spans[slot] = Some((start as u32, (start + text.len()) as u32));
                match node {
                    // Paths also go through this value: walk its text again, now along them.
                    Some(node) => {
                        let mut inner = serde_json::Deserializer::from_str(text);
                        Walk { node, found }.deserialize(&mut inner).map_err(de::Error::custom)
                    }
                    None => Ok(()),
                }
            }
            (None, None) => de::Deserialize::deserialize(deserializer).map(|IgnoredAny| ()),
        }
    }
}

/// One JSON value, read from a record's text without building a tree, or given by the engine.
#[derive(Debug, Clone, PartialEq)]
pub enum Json<'a> {
    Null,
    Bool(bool),
    /// A number as written: exact, whatever its size (`12.50`, `1e400`, thirty digits).
    Number(&'a str),
    String(Cow<'a, str>),
    /// An object or an array, as written.
    Composite(&'a str),
    /// An integer the engine gives (a version, an offset).
    Int(i64),
    /// A time the engine gives (`occurred_at`).
    Time(DateTime<Utc>),
}

impl<'a> Json<'a> {
    /// The value whose JSON text is `raw` (a span [`Fields::find`] found, or a whole value).
    pub fn parse(raw: &'a str) -> Result<Json<'a>, serde_json::Error> {
        // JSON's whitespace (a span found in a record has none). A closure, not a list of chars,
        // which `trim_matches` compares one by one: 430 instructions per event.
        let raw = raw.trim_matches(|c: char| matches!(c, ' ' | '\t' | '\n' | '\r'));
        Ok(match raw.as_bytes().first() {
            Some(b'n') => Json::Null,
            Some(b't') => Json::Bool(true),
            Some(b'f') => Json::Bool(false),
            Some(b'"') => match raw[1..raw.len() - 1].contains('\\') {
                false => Json::String(Cow::Borrowed(&raw[1..raw.len() - 1])),
                true => Json::String(Cow::Owned(serde_json::from_str(raw)?)),
            },
            Some(b'{' | b'[') => Json::Composite(raw),
            _ => Json::Number(raw),
        })
    }

    /// As a `serde_json::Value`: the tree, built (for JSON parameters and error messages).
    pub fn to_value(&self) -> Result<Value, serde_json::Error> {
        Ok(match self {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(*b),
            Json::Number(raw) | Json::Composite(raw) => serde_json::from_str(raw)?,
            Json::String(text) => Value::String(text.to_string()),
            Json::Int(n) => Value::from(*n),
            Json::Time(time) => Value::String(time.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(text: &str) -> Vec<String> {
        text.split('.').map(str::to_string).collect()
    }

    fn found(paths: &[&str], text: &str) -> Vec<Option<String>> {
        let mut fields = Fields::default();
        for p in paths {
            fields.add(&path(p));
        }
        let spans = fields.find(text).unwrap();
        spans.into_iter().map(|span| span.map(|(a, b)| text[a as usize..b as usize].to_string())).collect()
    }

    #[test]
    fn finds_nested_fields_and_array_items() {
        let text = r#" { "type" : "Placed", "data": {"amount": 12.50, "items": [{"sku":"A"}, {"sku": "B\"x"}], "n": null},
                         "skip": {"deep": [[[1]]], "s": "}"} } "#;
        assert_eq!(
            found(&["type", "data.amount", "data.items.1.sku", "data.n", "data.absent", "data", "skip.s"], text),
            [
                Some(r#""Placed""#.into()),
                Some("12.50".into()),
                Some(r#""B\"x""#.into()),
                Some("null".into()),
                None,
                Some(text[text.find("{\"amount").unwrap()..text.find(",\n").unwrap()].to_string()),
                Some(r#""}""#.into()),
            ]
        );
    }

    #[test]
    fn the_last_of_duplicate_keys_counts() {
        let text = r#"{"a": 1, "d": {"x": 1, "y": 2}, "a": 2, "d": {"y": 3}}"#;
        assert_eq!(found(&["a", "d.x", "d.y"], text), [Some("2".into()), None, Some("3".into())]);
        let text = r#"{"d": {"x": 1}, "d": 5}"#;
        assert_eq!(found(&["d.x", "d"], text), [None, Some("5".into())]);
    }

    #[test]
    fn scalars_and_escaped_keys() {
        assert_eq!(found(&["a"], "7"), [None]);
        assert_eq!(found(&["0"], r#"["x"]"#), [Some(r#""x""#.into())]);
        assert_eq!(found(&["type"], r#"{"ty\u0070e": "X"}"#), [Some(r#""X""#.into())]);
        assert_eq!(
            found(&["n"], r#"{"n": 123456789012345678901234567890}"#),
            [Some("123456789012345678901234567890".into())]
        );
    }

    #[test]
    fn a_value_is_read_without_json_whitespace_around_it() {
        assert_eq!(Json::parse(" \t\n\r\"x\" \r\n").unwrap(), Json::String(Cow::Borrowed("x")));
        assert_eq!(Json::parse("\n12.50\t").unwrap(), Json::Number("12.50"));
        assert_eq!(Json::parse(" {\"a\": [1] } ").unwrap(), Json::Composite("{\"a\": [1] }"));
        // A form feed is not JSON's whitespace: it stays, and the text is no JSON value.
        assert_eq!(Json::parse("\u{c}1").unwrap(), Json::Number("\u{c}1"));
        // Only whitespace: nothing is left, and no slice out of bounds.
        assert_eq!(Json::parse(" \n ").unwrap(), Json::Number(""));
    }

    #[test]
    fn errors_on_what_is_not_json() {
        let mut fields = Fields::default();
        fields.add(&path("a"));
        for text in ["{", r#"{"a": 1} x"#, r#"{"b": [1,}"#, r#"{"a": tru}"#, ""] {
            assert!(fields.find(text).is_err(), "{text}");
        }
        // Deep nesting where nothing is read is skipped without recursion.
        let deep = format!(r#"{{"b": {}{}}}"#, "[".repeat(10_000), "]".repeat(10_000));
        assert!(fields.find(&deep).is_ok());
    }

    /// What a path finds in a `serde_json::Value`: the reference the walk must agree with.
    fn step_all<'v>(value: &'v Value, path: &[String]) -> Option<&'v Value> {
        path.iter().try_fold(value, |at, segment| match at {
            Value::Object(map) => map.get(segment),
            Value::Array(items) => items.get(segment.parse::<usize>().ok()?),
            _ => None,
        })
    }

    fn json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
            "[a-c\"\\\\\u{e9}\u{1F600} ]{0,6}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 40, 5, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map("[abc0-2]", inner, 0..5)
                    .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        /// Every path finds, as text, exactly the value a `serde_json::Value` holds there, whatever
        /// the document's shape and layout.
        #[test]
        fn agrees_with_a_value_tree(
            value in json(),
            paths in proptest::collection::vec(proptest::collection::vec("[abc0-2]", 1..4), 1..6),
            pretty: bool,
        ) {
            let text = if pretty { serde_json::to_string_pretty(&value).unwrap() } else { value.to_string() };
            let mut fields = Fields::default();
            let slots: Vec<usize> = paths.iter().map(|path| fields.add(path)).collect();
            let spans = fields.find(&text).unwrap();
            for (path, slot) in paths.iter().zip(slots) {
                let found = spans[slot].map(|(a, b)| Json::parse(&text[a as usize..b as usize]).unwrap().to_value().unwrap());
                proptest::prop_assert_eq!(found.as_ref(), step_all(&value, path), "{:?} in {}", path, text);
            }
        }
    }
}
