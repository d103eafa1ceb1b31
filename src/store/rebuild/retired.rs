//! Retired schemas (`projector_retired_<name>_<time>`): the tables a swap replaced, kept until
//! `projector drop-retired`; their names, shortened to fit Postgres' identifiers, and found again.

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;

use super::postgres;
use crate::store::StoreError;

/// What the name of every schema a shadow swap retires tables into starts with.
const RETIRED: &str = "projector_retired_";

/// How the time of a swap ends the name of the schema it retires tables into.
const RETIRED_AT: &str = "%Y%m%d%H%M%S";

/// The digits [`RETIRED_AT`] writes.
const RETIRED_AT_DIGITS: usize = 14;

/// The longest identifier Postgres keeps: it cuts longer ones silently (NAMEDATALEN - 1).
const MAX_IDENTIFIER: usize = 63;

/// Room for the projection's part of a retired schema's name, between [`RETIRED`] and `_<time>`.
const RETIRED_STEM: usize = MAX_IDENTIFIER - RETIRED.len() - 1 - RETIRED_AT_DIGITS;

/// Hex digits of the projection name's SHA-256 in a shortened projection part.
const RETIRED_HASH: usize = 10;

/// The projection's part of its retired schemas' names: the name itself when it is shorter than
/// [`RETIRED_STEM`] bytes; else its start and a hash of the whole name, `RETIRED_STEM` bytes in
/// all. Parts of the two kinds differ in length, so no two projections share one (but for a hash
/// collision between two long names with the same start).
fn retired_stem(projection: &str) -> String {
    if projection.len() < RETIRED_STEM {
        return projection.to_string();
    }
    let mut start = RETIRED_STEM - 1 - RETIRED_HASH;
    while !projection.is_char_boundary(start) {
        start -= 1;
    }
    let hash = crate::projection::compile::hex_sha256(projection);
    format!("{}_{}", &projection[..start], &hash[..RETIRED_HASH])
}

/// The schema a shadow swap of `projection` at `at` moves the live tables into:
/// `projector_retired_<projection>_<yyyymmddhhmmss>`, a long projection name shortened to its
/// start and a hash ([`retired_stem`]) so that the whole stays within Postgres' 63 bytes. (Cut by
/// Postgres instead, two swaps of one projection in the same year got the same name.)
pub fn retired_schema(projection: &str, at: DateTime<Utc>) -> String {
    format!("{RETIRED}{}_{}", retired_stem(projection), at.format(RETIRED_AT))
}

/// Whether `schema` is one that [`retired_schema`] names for `projection`: its prefix, then the
/// time's digits and nothing else. A prefix alone would also match the schemas of projections
/// whose names extend this one's (`a` and `a_b`). Schemas retired before names were shortened
/// carry the whole projection name, and the time as far as it fit in 63 bytes: they match too.
pub fn is_retired_schema_of(schema: &str, projection: &str) -> bool {
    let time_after = |prefix: &str, digits: usize| {
        schema
            .strip_prefix(prefix)
            .is_some_and(|time| time.len() == digits && time.bytes().all(|byte| byte.is_ascii_digit()))
    };
    let unshortened = format!("{RETIRED}{projection}_");
    time_after(&format!("{RETIRED}{}_", retired_stem(projection)), RETIRED_AT_DIGITS)
        || time_after(&unshortened, RETIRED_AT_DIGITS.min(MAX_IDENTIFIER.saturating_sub(unshortened.len())))
}

/// Schemas holding tables a shadow swap retired for `projection` (and for no other projection).
pub async fn retired_schemas(client: &impl GenericClient, projection: &str) -> Result<Vec<String>, StoreError> {
    let rows = client
        .query("SELECT nspname FROM pg_namespace WHERE starts_with(nspname, $1) ORDER BY nspname", &[&RETIRED])
        .await
        .map_err(postgres)?;
    Ok(rows
        .into_iter()
        .map(|row| row.get::<_, String>(0))
        .filter(|schema| is_retired_schema_of(schema, projection))
        .collect())
}

/// Drops a schema and everything in it.
pub async fn drop_schema(client: &impl GenericClient, schema: &str) -> Result<(), StoreError> {
    client.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).await.map_err(postgres)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retired_schema_belongs_to_exactly_one_projection() {
        let at = DateTime::parse_from_rfc3339("2026-11-27T12:34:56Z").unwrap().with_timezone(&Utc);
        let a = retired_schema("a", at);
        let a_b = retired_schema("a_b", at);
        assert_eq!(a, "projector_retired_a_20261127123456");
        assert!(is_retired_schema_of(&a, "a"));
        assert!(is_retired_schema_of(&a_b, "a_b"));
        assert!(!is_retired_schema_of(&a_b, "a"), "`a_b`'s schema is not `a`'s");
        assert!(!is_retired_schema_of(&a, "a_b"));
        let dated = retired_schema("a_20250101000000", at);
        assert!(!is_retired_schema_of(&dated, "a"), "a projection name that ends in digits");
        for other in
            ["projector_retired_a_2026112712345", "projector_retired_a_", "projector_shadow_a", "a_20261127123456"]
        {
            assert!(!is_retired_schema_of(other, "a"), "{other}");
        }
    }

    #[test]
    fn retired_schema_names_fit_postgres_and_stay_apart() {
        let at = DateTime::parse_from_rfc3339("2026-11-27T12:34:56Z").unwrap().with_timezone(&Utc);
        let short = "n".repeat(RETIRED_STEM - 1);
        assert_eq!(retired_schema(&short, at), format!("projector_retired_{short}_20261127123456"));
        let long = "long_name_".repeat(4);
        let also_long = format!("{}x", &long[..39]);
        let (named, also_named) = (retired_schema(&long, at), retired_schema(&also_long, at));
        assert_eq!(named.len(), MAX_IDENTIFIER, "{named}");
        assert!(named.starts_with("projector_retired_long_name_long_na"), "{named}");
        assert_ne!(named, also_named, "names with the same start get different hashes");
        assert_eq!(named, retired_schema(&long, at), "the same name every time");
        let exactly_the_room = "n".repeat(RETIRED_STEM);
        assert_ne!(retired_stem(&exactly_the_room), exactly_the_room, "shortened: hashed parts have this length");
        for name in [short.as_str(), &long, &also_long, &exactly_the_room, "a"] {
            let schema = retired_schema(name, at);
            assert!(schema.len() <= MAX_IDENTIFIER, "{schema}");
            assert!(is_retired_schema_of(&schema, name), "{schema}");
        }
        assert!(!is_retired_schema_of(&named, &also_long));
        assert!(!is_retired_schema_of(&also_named, &long));
        // Retired before names were shortened: the whole name, the time cut at 63 bytes by Postgres.
        let cut = format!("projector_retired_{long}_2026");
        assert_eq!(cut.len(), MAX_IDENTIFIER);
        assert!(is_retired_schema_of(&cut, &long));
        assert!(!is_retired_schema_of(&cut, &also_long));
    }
}
