//! A corpus of hostile records, mixed into ordinary traffic: each is parked with a precise reason
//! or ignored, the other keys' rows come out exactly as their own events say, and the engine keeps
//! running (it applies what comes after).

use projector::outcome::Outcome;
use serde_json::json;

use crate::common::{self, Engine};
use crate::raw::{self, account, deposited, event, opened, Raw};

/// What must become of a hostile record.
enum Expect {
    /// Parked under this key (`None`: no key at all), the error containing this text.
    Parked(Option<&'static str>, &'static str),
    Ignored,
    /// Applied as plain data: the account's row afterwards.
    Applied(&'static str, (i64, &'static str)),
}

fn corpus() -> Vec<(&'static str, Raw, Expect)> {
    use Expect::*;
    let with_value = |key: &'static str, value: serde_json::Value| {
        let mut raw = Raw::json(&value);
        raw.key = Some(key.as_bytes().to_vec());
        raw
    };
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    // librdkafka's mock broker keeps at most 5 MB per partition: the 10 MB case runs against Tansu
    // (tests/e2e/tansu.rs).
    let huge_amount = "9".repeat(4 * 1024 * 1024);
    // Random, so that Postgres cannot compress it into an index entry.
    let long_key: &'static str = {
        use rand::{Rng, SeedableRng};
        let mut random = rand::rngs::StdRng::seed_from_u64(4000);
        String::leak((0..4000).map(|_| char::from(random.random_range(b'!'..=b'~'))).collect())
    };
    vec![
        ("invalid UTF-8", Raw::bytes(Some("h-utf8"), b"{\"type\":\"Opened\",\xff\xfe}"), Parked(Some("h-utf8"), "value is not valid UTF-8")),
        ("truncated JSON", Raw::bytes(Some("h-trunc"), br#"{"type":"Opened","stream_id":"h-trunc","stream_ver"#), Parked(Some("h-trunc"), "value is not valid JSON")),
        ("JSON nested 10,000 deep", Raw::bytes(Some("h-deep"), deep.as_bytes()), Parked(Some("h-deep"), "recursion limit exceeded")),
        ("a JSON array, not an object", Raw::bytes(Some("h-array"), b"[1,2,3]"), Parked(Some("h-array"), "envelope field `type` (from `type`) is missing")),
        ("type of the wrong type", with_value("h-type", json!({"type": 7, "stream_id": "h-type", "stream_version": 1})), Parked(Some("h-type"), "envelope field `type` (from `type`) must be a string, got 7")),
        ("key of the wrong type", with_value("h-keytype", json!({"type": "Opened", "stream_id": {"id": 1}, "stream_version": 1, "data": {"owner": "x", "amount": 1}})), Parked(Some("h-keytype"), "envelope field `key` (from `stream_id`) must be a string or integer")),
        ("missing version", with_value("h-nover", json!({"type": "Opened", "stream_id": "h-nover", "data": {"owner": "x", "amount": 1}})), Parked(Some("h-nover"), "envelope field `version` (from `stream_version`) is missing")),
        ("negative version", with_value("h-negver", event("h-negver", -1, "Opened", json!({"owner": "x", "amount": 1}))), Parked(Some("h-negver"), "must be a non-negative integer, got -1")),
        ("overflowing version", Raw::bytes(Some("h-bigver"), br#"{"type":"Opened","stream_id":"h-bigver","stream_version":9223372036854775808,"data":{"owner":"x","amount":1}}"#), Parked(Some("h-bigver"), "must be a non-negative integer, got 9223372036854775808")),
        ("fractional version", Raw::bytes(Some("h-fracver"), br#"{"type":"Opened","stream_id":"h-fracver","stream_version":1.5,"data":{"owner":"x","amount":1}}"#), Parked(Some("h-fracver"), "must be a non-negative integer, got 1.5")),
        ("amount that is not a number", with_value("h-amount", event("h-amount", 1, "Opened", json!({"owner": "x", "amount": "lots"}))), Parked(Some("h-amount"), "amount")),
        ("owner missing", with_value("h-noowner", event("h-noowner", 1, "Opened", json!({"amount": 1}))), Parked(Some("h-noowner"), "parameter `:data.owner` is missing from the event")),
        ("owner null", with_value("h-nullowner", event("h-nullowner", 1, "Opened", json!({"owner": null, "amount": 1}))), Parked(Some("h-nullowner"), "owner")),
        ("NUL character in a string", with_value("h-nul", event("h-nul", 1, "Opened", json!({"owner": "a\u{0}b", "amount": 1}))), Parked(Some("h-nul"), "0x00")),
        ("a constraint the data violates", with_value("h-negative", event("h-negative", 1, "Opened", json!({"owner": "x", "amount": -5}))), Parked(Some("h-negative"), "accounts_balance_check")),
        ("4 MB amount that does not fit numeric", with_value("h-huge", event("h-huge", 1, "Opened", json!({"owner": "x", "amount": huge_amount}))), Parked(Some("h-huge"), "amount")),
        ("invalid JSON and no Kafka key", Raw { key: None, value: Some(b"not json".to_vec()), headers: vec![] }, Parked(None, "value is not valid JSON")),
        ("unknown event type", with_value("h-unknown", event("h-unknown", 1, "Closed", json!({}))), Ignored),
        ("empty value (tombstone)", Raw { key: Some(b"h-tomb".to_vec()), value: None, headers: vec![] }, Ignored),
        ("SQL in a string", with_value("h-sql", event("h-sql", 1, "Opened", json!({"owner": "'); DROP TABLE accounts; --", "amount": 3}))), Applied("h-sql", (1, "3"))),
        ("no Kafka key (the key is in the event)", { let mut raw = Raw::json(&opened("h-nokey", 4)); raw.key = None; raw }, Applied("h-nokey", (1, "4"))),
        ("a NUL in the entity key and the Kafka key", { let mut raw = Raw::json(&opened("h\0nul", 4)); raw.key = Some(b"h\0nul".to_vec()); raw }, Parked(Some("h\0nul"), "0x00")),
        ("an entity key of 4,000 random characters", Raw::json(&opened(long_key, 4)), Parked(Some(long_key), "index row")),
        ("Confluent-framed binary with a binary key", Raw { key: Some(vec![0xde, 0xad, 0x00, 0xbe, 0xef]), value: Some(vec![0, 0, 0, 0, 7, 0x02, 0x06, b'a', b'b', b'c', 0xff]), headers: vec![] }, Parked(Some("0xdead00beef"), "no schema registry or schema directory is configured")),
        ("a header name that is not UTF-8", { let mut raw = Raw::json(&opened("h-hdr", 5)); raw.headers = vec![(vec![0xff, 0xfe, b'x'], vec![0x00, 0x01]), (b"ok".to_vec(), b"v".to_vec())]; raw }, Applied("h-hdr", (1, "5"))),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_records_are_parked_or_ignored_and_nothing_else_changes() {
    let raw::Accounts { _kafka, topic, db, client, settings, projections, bootstrap } = raw::setup(1, 20).await;
    let engine = Engine::start(&settings, &projections);

    // Ordinary traffic for five keys around every hostile record; the 4 MB one goes on its own.
    let corpus = corpus();
    let good_keys: Vec<String> = (1..=5).map(|i| format!("ok-{i}")).collect();
    let mut version = 1;
    let mut records: Vec<Raw> = good_keys.iter().map(|key| Raw::json(&opened(key, 10))).collect();
    for (name, hostile, _) in &corpus {
        if name.starts_with("4 MB") {
            raw::publish(&bootstrap, &topic, &records).await;
            common::wait_caught_up(&settings, &projections).await;
            raw::publish(&bootstrap, &topic, std::slice::from_ref(hostile)).await;
            common::wait_caught_up(&settings, &projections).await;
            records.clear();
        } else {
            records.push(hostile.clone());
        }
        version += 1;
        for key in &good_keys {
            records.push(Raw::json(&deposited(key, version, 1)));
        }
    }
    raw::publish(&bootstrap, &topic, &records).await;
    common::wait_caught_up(&settings, &projections).await;
    // Still running: one more event for every good key is applied.
    version += 1;
    let last: Vec<Raw> = good_keys.iter().map(|key| Raw::json(&deposited(key, version, 100))).collect();
    raw::publish(&bootstrap, &topic, &last).await;
    common::wait_caught_up(&settings, &projections).await;
    let metrics = engine.stop().await;

    let deposits = (version - 2) + 100;
    for key in &good_keys {
        let expected = (version, (10 + deposits).to_string(), Some(format!("deposit {version}")));
        assert_eq!(account(&client, key).await, Some(expected), "good key {key}");
    }
    let parked = client
        .query("SELECT entity_key, error_class, error FROM projector.dead_letters ORDER BY id", &[])
        .await
        .expect("dead letters");
    let mut expected_parked = 0;
    let mut expected_ignored = 0;
    for (name, _, expect) in &corpus {
        match expect {
            Expect::Parked(key, reason) => {
                expected_parked += 1;
                let stored = key.map(projector::store::stored::key);
                let found: Vec<(String, String)> = parked
                    .iter()
                    .filter(|row| row.get::<_, Option<String>>(0).as_deref() == stored.as_deref())
                    .map(|row| (row.get(1), row.get(2)))
                    .collect();
                assert_eq!(found.len(), 1, "{name}: parked once under {key:?}, found {found:?}");
                assert_eq!(found[0].0, "poison", "{name}");
                assert!(found[0].1.contains(reason), "{name}: `{}` should contain `{reason}`", found[0].1);
                if let Some(key) = key.filter(|key| !key.contains('\0')) {
                    assert_eq!(account(&client, key).await, None, "{name}: no row for its key");
                }
            }
            Expect::Ignored => expected_ignored += 1,
            Expect::Applied(key, (version, balance)) => {
                let row = account(&client, key).await;
                assert_eq!(row.map(|(v, b, _)| (v, b)), Some((*version, balance.to_string())), "{name}");
            }
        }
    }
    assert_eq!(parked.len(), expected_parked, "nothing else was parked");
    let owner: String =
        client.query_one("SELECT owner FROM accounts WHERE id = 'h-sql'", &[]).await.expect("h-sql row").get(0);
    assert_eq!(owner, "'); DROP TABLE accounts; --", "stored as data, verbatim");
    assert_eq!(metrics.outcome_count("accounts", Outcome::Parked), expected_parked as u64);
    assert_eq!(metrics.outcome_count("accounts", Outcome::Ignored), expected_ignored);
    let good_events = good_keys.len() as u64 * (version as u64);
    let applied_cases = corpus.iter().filter(|(_, _, expect)| matches!(expect, Expect::Applied(..))).count() as u64;
    assert_eq!(metrics.outcome_count("accounts", Outcome::Applied), good_events + applied_cases);
    assert_eq!(
        metrics.outcome_count("accounts", Outcome::Duplicate) + metrics.outcome_count("accounts", Outcome::Gap),
        0
    );
    eprintln!("hostile corpus: {} cases, {expected_parked} parked, {expected_ignored} ignored, {} applied as data; {good_events} ordinary events all applied", corpus.len(), corpus.len() - expected_parked - expected_ignored as usize);
    drop(client);
    db.drop().await;
}

/// An error retrying cannot fix (here the read model's table is gone) stops the engine with a
/// message naming it; the failed batch moved no checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_error_stops_the_engine_with_the_reason_and_keeps_the_checkpoint() {
    let raw::Accounts { _kafka, topic, db, client, settings, projections, bootstrap } = raw::setup(1, 20).await;
    let engine = Engine::start(&settings, &projections);
    raw::publish(&bootstrap, &topic, &[Raw::json(&opened("f-1", 1)), Raw::json(&opened("f-2", 2))]).await;
    common::wait_caught_up(&settings, &projections).await;

    client.batch_execute("ALTER TABLE accounts RENAME TO accounts_moved").await.expect("rename");
    raw::publish(&bootstrap, &topic, &[Raw::json(&deposited("f-1", 2, 5))]).await;
    let error = engine.exited(std::time::Duration::from_secs(30)).await.expect_err("the engine stops").to_string();
    assert!(error.contains("accounts") && error.contains("42P01"), "{error}");
    let next: i64 = client
        .query_one("SELECT next_offset FROM projector.checkpoints WHERE projection = 'accounts'", &[])
        .await
        .expect("checkpoint")
        .get(0);
    assert_eq!(next, 2, "the failed batch moved no checkpoint");
    assert_eq!(common::query_i64(&client, "SELECT count(*) FROM projector.dead_letters").await, 0, "nothing parked");
    drop(client);
    db.drop().await;
}
