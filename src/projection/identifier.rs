//! Plain SQL identifiers: the names (tables, columns, schemas, projections) the engine writes into
//! SQL itself, so they are checked before any statement is built from them.

/// The most bytes Postgres keeps of an identifier (`NAMEDATALEN - 1`); it truncates longer ones
/// silently, so that the name written would not be the name used.
pub const MAX_IDENTIFIER_BYTES: usize = 63;

/// Whether `name` is a plain Postgres identifier: `[a-z_][a-z0-9_]*`, 1 to 63 bytes. Such a name
/// needs no quotes, means the same quoted or not (Postgres folds unquoted names to lower case),
/// and is not truncated.
pub fn is_identifier(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= MAX_IDENTIFIER_BYTES
        && bytes.next().is_some_and(|c| c.is_ascii_lowercase() || c == b'_')
        && bytes.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
}

/// Whether `name` is `table` or `schema.table`, each part a plain identifier ([`is_identifier`]).
pub fn is_table_name(name: &str) -> bool {
    let parts: Vec<&str> = name.split('.').collect();
    parts.len() <= 2 && parts.iter().all(|part| is_identifier(part))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_lowercase_letters_digits_and_underscores() {
        for name in ["a", "_", "order_summary", "_v2", "t1_2"] {
            assert!(is_identifier(name), "{name}");
        }
        for name in ["", "1a", "Orders", "order-summary", "a.b", "\"a\"", "a b", "é", "a;"] {
            assert!(!is_identifier(name), "{name}");
        }
    }

    #[test]
    fn identifiers_fit_postgres_63_bytes() {
        assert!(is_identifier(&"a".repeat(MAX_IDENTIFIER_BYTES)));
        assert!(!is_identifier(&"a".repeat(MAX_IDENTIFIER_BYTES + 1)));
    }

    #[test]
    fn table_names_take_one_schema() {
        assert!(is_table_name("orders"));
        assert!(is_table_name("shop.orders"));
        assert!(!is_table_name("a.shop.orders"));
        assert!(!is_table_name("shop."));
        assert!(!is_table_name("Shop.orders"));
    }
}
