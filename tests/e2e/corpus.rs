//! A hostile corpus at the record level, through `projector run` as a process: every kind of
//! record a producer can write (any bytes as key, value, header names and values; tombstones;
//! Confluent framing; deep, huge and broken JSON; numbers out of range; NUL anywhere; keys and
//! ids too long to index), mixed into ordinary traffic for two projections written as a team
//! would write them (`ledger`, version-guarded; `journal`, deduped by event id). Against a Tansu
//! broker, with 200 accounts of ordinary traffic and the engine SIGKILLed three times while it
//! works, and against librdkafka's mock cluster (reached over TCP like any broker).
//!
//! For every record the outcome each projection must give (parked records are found by partition
//! and offset with their reason and raw bytes), the outcome totals scraped from `/metrics` (in
//! the run without kills), the
//! read models equal to the fold of what must apply, the checkpoints at the end of the log and the
//! process still running. Then a shadow rebuild (alongside the running engine) and an in-place
//! rebuild (engine stopped), each a process of its own, finish with the same tables and the same
//! parked records.
//!
//! Needs PostgreSQL and, for the Tansu case, the `tansu` binary (scripts/install-tansu.sh).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::common::records::{deposited, event, opened, publish_to, Raw};
use crate::common::scrape::{http_get, Exposition};
use crate::common::{
    checkpoints, free_port, log_tail, projector_subcommand, wait_for, LogDir, Projector, Tansu, TestDb,
};
use nix::sys::signal::Signal;
use projector::kafka::mock::MockKafka;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio_postgres::Client;

const TOPIC: &str = "bank.accounts";
const PARTITIONS: i32 = 2;
const CATCH_UP: Duration = Duration::from_secs(120);

const LEDGER: &str = r#"# One row per account, guarded by the account's version.
name = "ledger"
topics = ["bank.accounts"]
dedupe = "version"

[table]
name = "ledger"
key = "id"
version = "version"

[on.Opened]
insert = { owner = ":data.owner", balance = ":data.amount" }

[on.Deposited]
update = { balance = "balance + :data.amount", note = ":data.note?" }
"#;

const JOURNAL: &str = r#"# Per account, how many events and their sum: no version, deduped by event id.
name = "journal"
topics = ["bank.accounts"]
dedupe = "event_id"

[on.Opened]
sql = """
INSERT INTO journal (account, events, total) VALUES (:stream_id, 1, :data.amount)
ON CONFLICT (account) DO UPDATE SET events = journal.events + 1, total = journal.total + EXCLUDED.total
"""

[on.Deposited]
sql = """
INSERT INTO journal (account, events, total) VALUES (:stream_id, 1, :data.amount)
ON CONFLICT (account) DO UPDATE SET events = journal.events + 1, total = journal.total + EXCLUDED.total
"""
"#;

const TABLES: &str = "
CREATE TABLE ledger (
    id      text    PRIMARY KEY,
    version bigint  NOT NULL,
    owner   text    NOT NULL,
    balance numeric NOT NULL CHECK (balance >= 0),
    note    text
);
CREATE TABLE journal (
    account text    PRIMARY KEY,
    events  bigint  NOT NULL,
    total   numeric NOT NULL
);";

/// What must become of a record in one projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Applied,
    Duplicate,
    Ignored,
    /// Held first (it came before its predecessor), applied when the predecessor is.
    HeldThenApplied,
    /// Parked, the error containing this text.
    Parked(&'static str),
    /// Parked behind an earlier parked event of its key.
    Blocked,
}

/// One record of the corpus and what each projection must make of it.
struct Case {
    kind: &'static str,
    record: Raw,
    ledger: Outcome,
    journal: Outcome,
}

/// `value` with `field` replaced (or removed, for `Value::Null` when `remove`).
fn with(mut value: Value, field: &str, replacement: Option<Value>) -> Value {
    let object = value.as_object_mut().expect("an event is an object");
    match replacement {
        Some(replacement) => object.insert(field.to_string(), replacement),
        None => object.remove(field),
    };
    value
}

fn random_text(seed: u64, length: usize) -> String {
    let mut random = rand::rngs::StdRng::seed_from_u64(seed);
    (0..length).map(|_| char::from(random.random_range(b'!'..=b'~'))).collect()
}

/// The corpus, in the order published: ordinary traffic (`accounts` accounts, `ok-1` …, ten
/// deposits each) around every hostile record.
fn corpus(accounts: usize) -> Vec<Case> {
    use Outcome::*;
    let case = |kind, record, ledger, journal| Case { kind, record, ledger, journal };
    let both = |kind, record, outcome| Case { kind, record, ledger: outcome, journal: outcome };
    let json = |value: &Value| Raw::json(value);
    let bytes = |key: &str, value: &[u8]| Raw::bytes(Some(key), value);
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let long_key = random_text(4000, 4000);
    let long_id = random_text(4001, 4000);
    let confluent_json = [&[0u8, 0, 0, 0, 42][..], &serde_json::to_vec(&opened("h-cfjson", 1)).unwrap()].concat();
    let good_opened = opened("h-dup", 7);
    let mut late = opened("h-late", 3);
    late["note"] = json!("published twice, the second time at the very end");
    let padding = "x".repeat(1_000_000);
    let mut hostile = vec![
        // Values that are not events.
        both("invalid UTF-8", bytes("h-utf8", b"{\"type\":\"Opened\",\xff\xfe}"), Parked("value is not valid UTF-8")),
        both("truncated JSON", bytes("h-trunc", br#"{"type":"Opened","stream_id":"h-trunc","stream_ver"#), Parked("value is not valid JSON")),
        both("JSON nested 10,000 deep", bytes("h-deep", deep.as_bytes()), Parked("recursion limit exceeded")),
        both("a JSON array", bytes("h-array", b"[1,2,3]"), Parked("`type` (from `type`) is missing")),
        both("JSON null", bytes("h-null", b"null"), Parked("`type` (from `type`) is missing")),
        both("a JSON string", bytes("h-string", b"\"Opened\""), Parked("`type` (from `type`) is missing")),
        both("an empty value (zero bytes, not a tombstone)", bytes("h-empty", b""), Parked("value is not valid JSON")),
        both("whitespace only", bytes("h-space", b" \n\t "), Parked("value is not valid JSON")),
        both("a UTF-8 byte order mark before the JSON", bytes("h-bom", &[b"\xef\xbb\xbf".as_slice(), &serde_json::to_vec(&opened("h-bom", 1)).unwrap()].concat()), Parked("value is not valid JSON")),
        both("a tombstone", Raw { key: Some(b"h-tomb".to_vec()), value: None, headers: vec![] }, Ignored),
        both("Confluent-framed binary (magic byte 0, schema id) with a binary key", Raw { key: Some(vec![0xde, 0xad, 0x00, 0xbe, 0xef]), value: Some(vec![0, 0, 0, 0, 7, 0x02, 0x06, b'a', b'b', b'c', 0xff]), headers: vec![] }, Parked("no schema registry or schema directory is configured")),
        both("Confluent-framed JSON", bytes("h-cfjson", &confluent_json), Parked("no schema registry or schema directory is configured")),
        both("invalid JSON and no Kafka key", Raw { key: None, value: Some(b"not json".to_vec()), headers: vec![] }, Parked("value is not valid JSON")),
        // The envelope's type.
        both("a type of the wrong JSON type", json(&with(opened("h-type", 1), "type", Some(json!(7)))), Parked("`type` (from `type`) must be a string, got 7")),
        both("a type missing", json(&with(opened("h-notype", 1), "type", None)), Parked("`type` (from `type`) is missing")),
        both("an unknown type", json(&event("h-unknown", 1, "Closed", json!({}))), Ignored),
        both("a type with a NUL", json(&event("h-typenul", 1, "Opened\u{0}", json!({"owner": "x", "amount": 1}))), Ignored),
        both("a type of 100,000 characters", json(&event("h-typelong", 1, &"T".repeat(100_000), json!({}))), Ignored),
        // The entity key.
        case("the entity key missing", json(&with(opened("h-nokey", 1), "stream_id", None)), Parked("`key` (from `stream_id`) is missing"), Parked("`:stream_id` is missing")),
        both("the entity key an object", json(&with(opened("h-keyobj", 1), "stream_id", Some(json!({"id": 1})))), Parked("`key` (from `stream_id`) must be a string or integer")),
        both("a NUL in the entity key and the Kafka key", { let mut raw = json(&opened("h\u{0}nul", 4)); raw.key = Some(b"h\0nul".to_vec()); raw }, Parked("0x00")),
        both("an entity key of 4,000 random characters", json(&opened(&long_key, 4)), Parked("index row")),
        both("an empty entity key", json(&opened("", 6)), Applied),
        both("an entity key in Cyrillic and emoji", json(&opened("ключ-🔑", 6)), Applied),
        both("an entity key that is a number", { let mut raw = json(&with(opened("x", 8), "stream_id", Some(json!(4711)))); raw.key = Some(b"4711".to_vec()); raw }, Applied),
        // The version.
        case("the version missing", json(&with(opened("h-nover", 1), "stream_version", None)), Parked("`version` (from `stream_version`) is missing"), Applied),
        case("a version of -1", json(&with(opened("h-negver", 1), "stream_version", Some(json!(-1)))), Parked("must be a non-negative integer, got -1"), Parked("must be a non-negative integer, got -1")),
        case("a version of 2^70", bytes("h-bigver", br#"{"type":"Opened","id":"c8f1c2a4-6b3e-4b59-9d7a-2f1f5b0c0001","stream_id":"h-bigver","stream_version":1180591620717411303424,"data":{"owner":"x","amount":1}}"#), Parked("must be a non-negative integer, got 1180591620717411303424"), Parked("must be a non-negative integer, got 1180591620717411303424")),
        case("a fractional version", bytes("h-fracver", br#"{"type":"Opened","id":"c8f1c2a4-6b3e-4b59-9d7a-2f1f5b0c0002","stream_id":"h-fracver","stream_version":1.5,"data":{"owner":"x","amount":1}}"#), Parked("must be a non-negative integer, got 1.5"), Parked("must be a non-negative integer, got 1.5")),
        case("a version in exponent form", bytes("h-expver", br#"{"type":"Opened","id":"c8f1c2a4-6b3e-4b59-9d7a-2f1f5b0c0003","stream_id":"h-expver","stream_version":1e0,"data":{"owner":"x","amount":1}}"#), Parked("must be a non-negative integer, got 1e0"), Parked("must be a non-negative integer, got 1e0")),
        case("a version as a string", json(&with(opened("h-strver", 1), "stream_version", Some(json!("1")))), Applied, Applied),
        both("an unreadable occurred_at", json(&with(opened("h-when", 2), "occurred_at", Some(json!("yesterday")))), Parked("is not an RFC 3339 time")),
        // The event id.
        case("the event id missing", json(&with(opened("h-noid", 2), "id", None)), Applied, Parked("`id` (from `id`) is missing")),
        both("an event id of 4,000 characters", json(&with(opened("h-longid", 2), "id", Some(json!(long_id)))), Applied),
        both("a NUL in the event id", json(&with(opened("h-idnul", 2), "id", Some(json!("id\u{0}nul")))), Applied),
        // The data.
        both("an amount that is not a number", json(&event("h-amount", 1, "Opened", json!({"owner": "x", "amount": "lots"}))), Parked("amount")),
        both("an amount of 1,000 digits", json(&event("h-digits", 1, "Opened", json!({"owner": "x", "amount": "9".repeat(1000)}))), Parked("does not fit `numeric`")),
        both("an amount of 1e400", bytes("h-e400", br#"{"type":"Opened","id":"c8f1c2a4-6b3e-4b59-9d7a-2f1f5b0c0004","stream_id":"h-e400","stream_version":1,"data":{"owner":"x","amount":1e400}}"#), Parked("does not fit `numeric`")),
        case("a NUL in a string the ledger writes", json(&event("h-datanul", 1, "Opened", json!({"owner": "a\u{0}b", "amount": 1}))), Parked("0x00"), Applied),
        case("a constraint the data violates", json(&event("h-negative", 1, "Opened", json!({"owner": "x", "amount": -5}))), Parked("ledger_balance_check"), Applied),
        both("SQL in a string", json(&event("h-sql", 1, "Opened", json!({"owner": "'); DROP TABLE ledger; --", "amount": 3}))), Applied),
        both("a field given twice (the last one counts)", bytes("h-twice", br#"{"type":"Opened","id":"c8f1c2a4-6b3e-4b59-9d7a-2f1f5b0c0005","stream_id":"h-twice","stream_version":1,"data":{"owner":"x","amount":1},"data":{"owner":"y","amount":2}}"#), Applied),
        both("a value of 1 MB", json(&event("h-big", 1, "Opened", json!({"owner": "x", "amount": 1, "padding": padding}))), Applied),
        // Kafka keys and headers around valid events.
        both("a binary Kafka key", { let mut raw = json(&opened("h-binkey", 2)); raw.key = Some(vec![0, 0xff, 0x80, 0x01]); raw }, Applied),
        both("an empty Kafka key", { let mut raw = json(&opened("h-emptykey", 2)); raw.key = Some(Vec::new()); raw }, Applied),
        both("no Kafka key", { let mut raw = json(&opened("h-nokafkakey", 2)); raw.key = None; raw }, Applied),
        both("a Kafka key of 100,000 bytes", { let mut raw = json(&opened("h-hugekey", 2)); raw.key = Some(vec![b'k'; 100_000]); raw }, Applied),
        both("a header name that is not UTF-8", { let mut raw = json(&opened("h-hdr", 5)); raw.headers = vec![(vec![0xff, 0xfe, b'x'], vec![0x00, 0x01]), (b"ok".to_vec(), b"v".to_vec())]; raw }, Applied),
        both("a NUL in a header name", { let mut raw = json(&opened("h-hdrnul", 5)); raw.headers = vec![(b"trace\0id".to_vec(), b"1".to_vec())]; raw }, Applied),
        both("a traceparent that is not UTF-8", { let mut raw = json(&opened("h-trace", 5)); raw.headers = vec![(b"traceparent".to_vec(), vec![0xc3, 0x28, 0x00])]; raw }, Applied),
        both("1,000 headers", { let mut raw = json(&opened("h-headers", 5)); raw.headers = (0..1000).map(|i| (format!("h{i}").into_bytes(), vec![i as u8; 3])).collect(); raw }, Applied),
        both("a header with an empty name and value", { let mut raw = json(&opened("h-hdrempty", 5)); raw.headers = vec![(Vec::new(), Vec::new())]; raw }, Applied),
        // Duplicates, order, blocking.
        both("an event", json(&good_opened), Applied),
        both("the same event again", json(&good_opened), Duplicate),
        both("an event published twice, first time", json(&late), Applied),
        case("a deposit before its account is opened", json(&deposited("h-order", 2, 5)), HeldThenApplied, Applied),
        both("the account opened after its deposit", json(&opened("h-order", 10)), Applied),
        both("an account", json(&opened("h-blocked", 10)), Applied),
        both("a poison deposit", json(&event("h-blocked", 2, "Deposited", json!({"amount": "lots"}))), Parked("amount")),
        both("a deposit after a parked one", json(&deposited("h-blocked", 3, 5)), Blocked),
    ];
    hostile.push(both("the event published twice, at the very end", json(&late), Duplicate));

    let good_keys: Vec<String> = (1..=accounts).map(|i| format!("ok-{i}")).collect();
    let mut cases: Vec<Case> =
        good_keys.iter().map(|key| both("ordinary traffic", json(&opened(key, 100)), Applied)).collect();
    let mut version = 1;
    for (index, hostile) in hostile.into_iter().enumerate() {
        cases.push(hostile);
        if index % 6 == 5 {
            version += 1;
            for key in &good_keys {
                cases.push(both("ordinary traffic", json(&deposited(key, version, 10)), Applied));
            }
        }
    }
    cases
}

/// The read models the records that must apply fold to: the ledger's `(version, balance)` and
/// the journal's `(events, total)` per key (sums of text amounts; an amount too long for `i128`
/// stays as written, alone on its key).
#[derive(Debug, Default, PartialEq, Eq)]
struct ReadModels {
    ledger: BTreeMap<String, (i64, String)>,
    journal: BTreeMap<String, (i64, String)>,
}

fn add(total: &str, amount: &str) -> String {
    match (total.parse::<i128>(), amount.parse::<i128>()) {
        (Ok(total), Ok(amount)) => (total + amount).to_string(),
        _ if total == "0" => amount.to_string(),
        _ => panic!("cannot add {amount} to {total}"),
    }
}

fn expected_read_models(cases: &[Case]) -> ReadModels {
    let mut models = ReadModels::default();
    for case in cases {
        let Some(value) = case.record.value.as_deref().and_then(|value| serde_json::from_slice::<Value>(value).ok())
        else {
            continue;
        };
        let key = match &value["stream_id"] {
            Value::String(key) => key.clone(),
            other => other.to_string(),
        };
        let amount = match &value["data"]["amount"] {
            Value::String(amount) => amount.clone(),
            other => other.to_string(),
        };
        if matches!(case.ledger, Outcome::Applied | Outcome::HeldThenApplied) {
            let row = models.ledger.entry(key.clone()).or_insert((0, "0".into()));
            let version = match &value["stream_version"] {
                Value::String(version) => version.parse().ok(),
                version => version.as_i64(),
            };
            row.0 = row.0.max(version.expect("an applied event has a version"));
            row.1 = add(&row.1, &amount);
        }
        if matches!(case.journal, Outcome::Applied | Outcome::HeldThenApplied) {
            let row = models.journal.entry(key).or_insert((0, "0".into()));
            row.0 += 1;
            row.1 = add(&row.1, &amount);
        }
    }
    models
}

async fn read_models(client: &Client) -> ReadModels {
    let rows = |sql: &'static str| async move {
        client
            .query(sql, &[])
            .await
            .unwrap_or_else(|error| panic!("{sql}: {error}"))
            .iter()
            .map(|row| (row.get::<_, String>(0), (row.get::<_, i64>(1), row.get::<_, String>(2))))
            .collect::<BTreeMap<_, _>>()
    };
    ReadModels {
        ledger: rows("SELECT id, version, balance::text FROM ledger").await,
        journal: rows("SELECT account, events, total::text FROM journal").await,
    }
}

/// A parked record as stored: `(error_class, error, entity_key, record_key, record_value,
/// header_names, header_values)`.
type DeadLetter = (String, String, Option<String>, Option<Vec<u8>>, Option<Vec<u8>>, Vec<Vec<u8>>, Vec<Vec<u8>>);

async fn dead_letters(client: &Client, projection: &str) -> BTreeMap<(i32, i64), DeadLetter> {
    client
        .query(
            "SELECT partition, \"offset\", error_class, error, entity_key, record_key, record_value, header_names, header_values
               FROM projector.dead_letters WHERE projection = $1 AND state = 'parked'",
            &[&projection],
        )
        .await
        .expect("reading dead letters")
        .iter()
        .map(|row| {
            (
                (row.get(0), row.get(1)),
                (row.get(2), row.get(3), row.get(4), row.get(5), row.get(6), row.get(7), row.get(8)),
            )
        })
        .collect()
}

/// Every record's parked outcome checked against its dead letter, the raw bytes kept exactly.
/// Returns the mismatches, one line each.
fn check_parked(
    projection: &str,
    cases: &[Case],
    positions: &[(i32, i64)],
    outcome: impl Fn(&Case) -> Outcome,
    parked: &BTreeMap<(i32, i64), DeadLetter>,
) -> Vec<String> {
    let mut wrong = Vec::new();
    for (case, position) in cases.iter().zip(positions) {
        let letter = parked.get(position);
        let kind = case.kind;
        match (outcome(case), letter) {
            (Outcome::Parked(reason), Some((class, error, ..))) => {
                if class != "poison" || !error.contains(reason) {
                    wrong.push(format!("{projection}: {kind} at {position:?}: parked as {class}: {error:.300}; expected poison containing {reason:?}"));
                }
            }
            (Outcome::Blocked, Some((class, ..))) if class == "blocked" => {}
            (expected @ (Outcome::Parked(_) | Outcome::Blocked), other) => {
                wrong.push(format!(
                    "{projection}: {kind} at {position:?}: expected {expected:?}, dead letter {:?}",
                    other.map(|letter| (&letter.0, &letter.1))
                ));
            }
            (expected, Some((class, error, ..))) => {
                wrong.push(format!(
                    "{projection}: {kind} at {position:?}: expected {expected:?}, parked as {class}: {error:.300}"
                ));
            }
            (_, None) => {}
        }
        if let Some((_, _, _, key, value, names, values)) = letter {
            let headers: Vec<(Vec<u8>, Vec<u8>)> = names.iter().cloned().zip(values.iter().cloned()).collect();
            if *key != case.record.key || *value != case.record.value || headers != case.record.headers {
                wrong.push(format!(
                    "{projection}: {kind} at {position:?}: the dead letter does not keep the record's bytes"
                ));
            }
        }
    }
    wrong
}

/// The outcome totals the engine must count for one projection: `(outcome label, count)`.
fn expected_totals(cases: &[Case], outcome: impl Fn(&Case) -> Outcome) -> BTreeMap<&'static str, u64> {
    let mut totals = BTreeMap::new();
    for case in cases {
        let labels: &[&'static str] = match outcome(case) {
            Outcome::Applied => &["applied"],
            Outcome::Duplicate => &["duplicate"],
            Outcome::Ignored => &["ignored"],
            Outcome::HeldThenApplied => &["gap", "applied"],
            Outcome::Parked(_) | Outcome::Blocked => &["parked"],
        };
        for label in labels {
            *totals.entry(*label).or_insert(0) += 1;
        }
    }
    totals
}

fn scraped_totals(exposition: &Exposition, projection: &str) -> BTreeMap<&'static str, u64> {
    ["applied", "duplicate", "gap", "ignored", "parked"]
        .into_iter()
        .map(|outcome| {
            let total = exposition.sum("projector_events_total", &[("projection", projection), ("outcome", outcome)]);
            (outcome, total as u64)
        })
        .filter(|(_, total)| *total > 0)
        .collect()
}

/// The broker a run is against: a Tansu process or the mock cluster of this test process.
enum Broker {
    Tansu(Tansu),
    Mock(MockKafka),
}

impl Broker {
    fn bootstrap(&self) -> String {
        match self {
            Broker::Tansu(tansu) => tansu.bootstrap.clone(),
            Broker::Mock(mock) => mock.bootstrap_servers(),
        }
    }
}

/// The projections folder and settings a team would write, in `dir`.
fn write_configuration(dir: &Path) {
    let projections = dir.join("projections");
    std::fs::create_dir_all(&projections).expect("projections folder");
    std::fs::write(projections.join("ledger.toml"), LEDGER).expect("ledger.toml");
    std::fs::write(projections.join("journal.toml"), JOURNAL).expect("journal.toml");
    // Short heartbeats: Tansu never expires a member that died before its first one.
    std::fs::write(
        dir.join("projector.toml"),
        "[kafka.properties]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"500\"\n",
    )
    .expect("projector.toml");
}

/// Publishes the corpus with `accounts` accounts of ordinary traffic, runs `projector run`
/// (SIGKILLed `kills` times while it works, each time started again), and checks every outcome.
/// The outcome totals of `/metrics` are checked only without kills (a new process counts anew).
async fn corpus_through_the_engine(broker: Broker, label: &str, accounts: usize, kills: usize) {
    let cases = corpus(accounts);
    let kinds: std::collections::BTreeSet<&str> = cases.iter().map(|case| case.kind).collect();
    assert!(kinds.len() > 40, "{} kinds of record", kinds.len());
    let bootstrap = broker.bootstrap();
    let db = TestDb::create().await;
    let client = db.connect().await;
    client.batch_execute(TABLES).await.expect("creating the read models' tables");
    let log_dir = LogDir::new(label);
    write_configuration(&log_dir.path);
    let log = log_dir.path.join("projector.log");
    let group_prefix = format!("corpus-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let http = format!("127.0.0.1:{}", free_port());
    let command = |arguments: &[&str]| {
        let mut command = projector_subcommand(arguments, &db.url, &bootstrap, &group_prefix, &log);
        command.env("PROJECTOR_PROJECTIONS_DIR", log_dir.path.join("projections"));
        command.env("PROJECTOR_HTTP__LISTEN", &http);
        command
    };

    let positions =
        publish_to(&bootstrap, TOPIC, None, &cases.iter().map(|case| case.record.clone()).collect::<Vec<_>>()).await;
    let mut ends: BTreeMap<i32, i64> = (0..PARTITIONS).map(|partition| (partition, 0)).collect();
    for (partition, offset) in &positions {
        let end = ends.entry(*partition).or_default();
        *end = (*end).max(offset + 1);
    }
    eprintln!("{label}: {} records ({} kinds) published, end offsets {ends:?}", cases.len(), kinds.len());

    let mut engine = Projector::spawn(command(&["run"]), &log, "run");
    let mut random = rand::rngs::StdRng::seed_from_u64(kills as u64);
    for kill in 1..=kills {
        engine.wait_started(CATCH_UP).await;
        tokio::time::sleep(Duration::from_millis(random.random_range(100..1500))).await;
        engine.kill();
        engine = Projector::spawn(command(&["run"]), &log, &format!("run after kill {kill}"));
    }
    for projection in ["ledger", "journal"] {
        wait_for(&format!("{projection} at the end of the log"), CATCH_UP, || async {
            engine.check_running()?;
            let stored = checkpoints(&client, projection, TOPIC).await.map_err(|error| error.to_string())?;
            if stored == ends {
                Ok(())
            } else {
                Err(format!("checkpoints {stored:?}, ends {ends:?}"))
            }
        })
        .await;
    }

    // The outcomes: parked records by position, totals from /metrics, the read models.
    let expected = expected_read_models(&cases);
    let mut wrong = Vec::new();
    wrong.extend(check_parked(
        "ledger",
        &cases,
        &positions,
        |case| case.ledger,
        &dead_letters(&client, "ledger").await,
    ));
    wrong.extend(check_parked(
        "journal",
        &cases,
        &positions,
        |case| case.journal,
        &dead_letters(&client, "journal").await,
    ));
    let mut last = String::new();
    let settled = async {
        for _ in 0..100 {
            let exposition = match http_get(&http, "/metrics").await {
                Ok((200, body)) => Exposition::parse(&body),
                other => {
                    last = format!("GET /metrics: {other:?}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let totals = (scraped_totals(&exposition, "ledger"), scraped_totals(&exposition, "journal"));
            let lag = exposition.sum("projector_lag_messages", &[]);
            if totals == (expected_totals(&cases, |case| case.ledger), expected_totals(&cases, |case| case.journal))
                && lag == 0.0
            {
                return Ok(());
            }
            last = format!("outcome totals {totals:?}, lag {lag}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(())
    };
    if kills == 0 && settled.await.is_err() {
        wrong.push(format!(
            "/metrics: expected ledger {:?}, journal {:?}, lag 0; last seen {last}",
            expected_totals(&cases, |case| case.ledger),
            expected_totals(&cases, |case| case.journal)
        ));
    }
    let built = read_models(&client).await;
    if built != expected {
        wrong.push(format!(
            "read models differ from the fold:\n  built    {:?}\n  expected {expected:?}",
            summary(&built)
        ));
    }
    assert!(
        wrong.is_empty(),
        "{label}: {} mismatches:\n{}\nlog:\n{}",
        wrong.len(),
        wrong.join("\n"),
        log_tail(&log, 40)
    );
    engine.assert_running();

    // A shadow rebuild of each, the engine still running, then an in-place one with it stopped.
    let parked = (dead_letters(&client, "ledger").await, dead_letters(&client, "journal").await);
    for projection in ["ledger", "journal"] {
        rebuild(command(&["rebuild", projection, "--shadow"]), &log, projection).await;
        assert_eq!(read_models(&client).await, expected, "{label}: after a shadow rebuild of {projection}");
        engine.assert_running();
    }
    let status = engine.signal_and_wait(Signal::SIGTERM, Duration::from_secs(30)).await;
    assert!(status.success(), "{label}: the engine stops cleanly: {status}");
    for projection in ["ledger", "journal"] {
        rebuild(command(&["rebuild", projection]), &log, projection).await;
    }
    assert_eq!(read_models(&client).await, expected, "{label}: after in-place rebuilds");
    let reparked = (dead_letters(&client, "ledger").await, dead_letters(&client, "journal").await);
    assert_eq!(
        (reparked.0.keys().collect::<Vec<_>>(), reparked.1.keys().collect::<Vec<_>>()),
        (parked.0.keys().collect::<Vec<_>>(), parked.1.keys().collect::<Vec<_>>()),
        "{label}: the in-place rebuilds park the same records"
    );
    drop(client);
    db.drop().await;
}

/// Keys and what the fold gives, shortened for a failure message (the 4,000-character key).
fn summary(models: &ReadModels) -> String {
    format!("{models:?}").chars().take(4000).collect()
}

/// Runs `command` (a rebuild of `projection`) to its end and fails with its log unless it
/// succeeds.
async fn rebuild(mut command: std::process::Command, log: &Path, projection: &str) {
    let mut child = command.spawn().expect("starting a rebuild");
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("polling the rebuild") {
            break status;
        }
        if started.elapsed() > CATCH_UP {
            let _ = child.kill();
            panic!("the rebuild of {projection} did not finish within {CATCH_UP:?}; log:\n{}", log_tail(log, 40));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(status.success(), "the rebuild of {projection} failed ({status}); log:\n{}", log_tail(log, 40));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_ends_with_its_outcome_against_tansu() {
    let tansu = Tansu::start().await.expect("starting tansu");
    tansu.create_topic(TOPIC, PARTITIONS).await.expect("creating the topic");
    corpus_through_the_engine(Broker::Tansu(tansu), "corpus-tansu", 200, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_ends_with_its_outcome_against_the_mock_cluster() {
    let mock = MockKafka::start(1).expect("mock cluster");
    mock.create_topic(TOPIC, PARTITIONS, 1).expect("creating the topic");
    corpus_through_the_engine(Broker::Mock(mock), "corpus-mock", 5, 0).await;
}
