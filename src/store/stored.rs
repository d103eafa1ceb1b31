//! What text taken from an event becomes in the engine's own tables, so that any record can be
//! held, parked or deduplicated: Postgres' `text` cannot hold a NUL, and a btree index entry
//! holds at most about 2,700 bytes (54000, "index row size exceeds maximum").
//!
//! - Keys and ids (`held_events.entity_key`, `dead_letters.entity_key`,
//!   `processed_events.event_id`) are stored as they are when they fit, else by their digest,
//!   `sha256:<64 hex digits>`. Every place that stores or looks one up goes through [`key`], so
//!   both sides agree. A key or id written literally as such a digest is stored as it is; it could
//!   only meet another id's digest by a SHA-256 preimage.
//! - Free text (error messages, event types) is made NUL-free and cut to a bounded length.

use std::borrow::Cow;
use std::collections::HashSet;

use sha2::{Digest, Sha256};

/// The longest key or id stored as it is, in bytes. With a projection name (63 bytes at most) it
/// leaves the index entry well under Postgres' limit; such keys were storable before digests.
pub const KEY_BYTES: usize = 2000;

/// Each of `keys` once, in the order first seen: a batch's keys or ids, sent as one array.
/// Hashed, not sorted (sorting a batch's keys compared strings about a dozen times per key).
/// `capacity`: how many keys there are at most.
pub fn distinct<'a>(keys: impl Iterator<Item = &'a str>, capacity: usize) -> Vec<&'a str> {
    let mut seen: foldhash::HashSet<&str> = HashSet::with_capacity_and_hasher(capacity, Default::default());
    keys.filter(|key| seen.insert(key)).collect()
}

/// The longest message stored, in bytes.
pub const MESSAGE_BYTES: usize = 8192;

/// `text` as stored in a key or id column: as it is, or its digest when it holds a NUL or is
/// longer than [`KEY_BYTES`].
pub fn key(text: &str) -> Cow<'_, str> {
    if text.len() <= KEY_BYTES && !text.contains('\0') {
        return Cow::Borrowed(text);
    }
    let digest = Sha256::digest(text.as_bytes());
    Cow::Owned(format!("sha256:{}", digest.iter().map(|byte| format!("{byte:02x}")).collect::<String>()))
}

/// `text` as stored in a message column: each NUL written `\0`, cut at [`MESSAGE_BYTES`].
pub fn message(text: &str) -> Cow<'_, str> {
    if text.len() <= MESSAGE_BYTES && !text.contains('\0') {
        return Cow::Borrowed(text);
    }
    let text = text.replace('\0', "\\0");
    if text.len() <= MESSAGE_BYTES {
        return Cow::Owned(text);
    }
    let mut cut = MESSAGE_BYTES;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    Cow::Owned(format!("{}… ({} bytes in all)", &text[..cut], text.len()))
}

/// A key as a message or a log line shows it: control characters escaped, cut after 100
/// characters (saying how long it was).
pub fn shown_key(key: &str) -> String {
    const CHARS: usize = 100;
    let mut shown: String = key
        .chars()
        .take(CHARS)
        .map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() })
        .collect();
    if key.chars().nth(CHARS).is_some() {
        shown.push_str(&format!("… ({} bytes)", key.len()));
    }
    shown
}

/// A record's headers as the two arrays `held_events` and `dead_letters` keep them: names and
/// values, both as bytes.
pub fn split_headers(record: &crate::projection::Record) -> (Vec<&[u8]>, Vec<Option<&[u8]>>) {
    record.headers.iter().map(|(name, value)| (name.as_slice(), value.as_deref())).unzip()
}

/// The record stored in `row` from column `first` on: topic, partition, offset, key, value,
/// header names, header values, timestamp (as `held_events` and `dead_letters` keep them).
pub fn record_at(row: &tokio_postgres::Row, first: usize) -> crate::projection::Record {
    let names: Vec<Vec<u8>> = row.get(first + 5);
    let values: Vec<Option<Vec<u8>>> = row.get(first + 6);
    crate::projection::Record {
        topic: row.get::<_, &str>(first).into(),
        partition: row.get(first + 1),
        offset: row.get(first + 2),
        key: row.get(first + 3),
        value: row.get(first + 4),
        headers: names.into_iter().zip(values).collect(),
        timestamp_ms: row.get(first + 7),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_keeps_each_key_once_in_the_order_first_seen() {
        let keys = ["b", "a", "b", "c", "a", ""];
        assert_eq!(distinct(keys.into_iter(), keys.len()), ["b", "a", "c", ""]);
        assert!(distinct(std::iter::empty(), 0).is_empty());
    }

    #[test]
    fn ordinary_keys_are_stored_as_they_are() {
        for text in ["", "order-1", "ünïcödé", "sha256:00", &"k".repeat(KEY_BYTES)] {
            assert_eq!(key(text), text);
        }
    }

    #[test]
    fn keys_with_a_nul_or_too_long_are_stored_by_digest() {
        let long = "k".repeat(KEY_BYTES + 1);
        for text in ["a\0b", "\0", long.as_str()] {
            let stored = key(text);
            assert!(stored.starts_with("sha256:") && stored.len() == 7 + 64, "{stored}");
            assert!(!stored.contains('\0'));
            assert_eq!(stored, key(text), "the same text, the same digest");
        }
        assert_ne!(key("a\0b"), key("a\0c"));
        assert_eq!(key("a\0b"), "sha256:59b271ae1bbcb1d31d41929817f4b16fb439eb4f31520b5ad1d5ce98920a7138");
    }

    #[test]
    fn messages_lose_their_nuls_and_their_excess() {
        assert_eq!(message("plain"), "plain");
        assert_eq!(message("a\0b"), "a\\0b");
        let long = "é".repeat(MESSAGE_BYTES);
        let stored = message(&long);
        assert!(stored.len() < MESSAGE_BYTES + 40, "{}", stored.len());
        assert!(stored.ends_with(&format!("({} bytes in all)", long.len())), "{stored}");
    }

    #[test]
    fn shown_keys_are_short_and_printable() {
        assert_eq!(shown_key("a\0b\n"), "a\\u{0}b\\n");
        let shown = shown_key(&"x".repeat(4000));
        assert!(shown.starts_with(&"x".repeat(100)) && shown.ends_with("… (4000 bytes)"), "{shown}");
    }
}
