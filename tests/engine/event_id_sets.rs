//! An event-id projection's batches applied set-based (`store::grouped`: events in waves by the
//! rows their statements touch) against real Postgres (no Kafka): the read model, row order
//! included, is the one applying every event by itself gives, with far fewer statements.

use std::path::Path;

use projector::checkpoint::Move;
use projector::outcome::Outcome;
use projector::projection::{compile_file, Projection, Record};
use projector::store::apply::{apply_batch, Batch};
use projector::store::fast::Applier;
use serde_json::json;

use crate::common::{self, TestDb};

const TOPIC: &str = "ledger";

/// Accounts (upserted, then updated by id in the same handler; updated by id) and two
/// append-only logs in order (`deposits`, `withdrawals`, keyed by nothing: their serial numbers
/// show the order rows went in).
const DEFINITION: &str = r#"
name = "ledger"
topics = ["ledger"]
dedupe = "event_id"

[on.Deposited]
sql = [
  "INSERT INTO accounts (id, balance, events) VALUES (:data.account, :data.amount, 1) ON CONFLICT (id) DO UPDATE SET balance = accounts.balance + EXCLUDED.balance, events = accounts.events + 1",
  "UPDATE accounts SET last_deposit = :data.amount WHERE id = :data.account",
  "INSERT INTO deposits (account, amount) VALUES (:data.account, :data.amount)",
]

[on.Withdrawn]
sql = [
  "UPDATE accounts SET balance = balance - :data.amount, events = events + 1 WHERE id = :data.account",
  "INSERT INTO withdrawals (account, amount) VALUES (:data.account, -(:data.amount::numeric))",
]

[on.Frozen]
sql = "UPDATE accounts SET frozen_at_events = events WHERE id = :data.account"
"#;

/// The tables, and a count of the statements run on them (a statement-level trigger).
const SCHEMA: &str = "
CREATE TABLE accounts (id text PRIMARY KEY, balance numeric NOT NULL, events int NOT NULL, last_deposit numeric,
                       frozen_at_events int);
CREATE TABLE deposits (n bigserial PRIMARY KEY, account text NOT NULL, amount numeric NOT NULL);
CREATE TABLE withdrawals (n bigserial PRIMARY KEY, account text NOT NULL, amount numeric NOT NULL);
CREATE TABLE statements_run (n bigint NOT NULL);
CREATE FUNCTION count_statement() RETURNS trigger LANGUAGE plpgsql AS
  $$ BEGIN INSERT INTO statements_run VALUES (1); RETURN NULL; END $$;
CREATE TRIGGER accounts_statements AFTER INSERT OR UPDATE ON accounts FOR EACH STATEMENT EXECUTE FUNCTION count_statement();
CREATE TRIGGER deposits_statements AFTER INSERT ON deposits FOR EACH STATEMENT EXECUTE FUNCTION count_statement();
CREATE TRIGGER withdrawals_statements AFTER INSERT ON withdrawals FOR EACH STATEMENT EXECUTE FUNCTION count_statement();
";

/// `count` events over fifty accounts, each a deposit, a withdrawal or a freeze (deposits first
/// for each account, so that withdrawals find their row mostly), with every seventh a copy of an
/// earlier one (same id): a fixed pseudo-random sequence.
fn history(count: usize) -> Vec<(String, serde_json::Value)> {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut events: Vec<(String, serde_json::Value)> = Vec::new();
    for i in 0..count {
        if i % 7 == 6 {
            let copy = events[(next() % events.len() as u64) as usize].clone();
            events.push(copy);
            continue;
        }
        let account = format!("acc-{}", next() % 50);
        let event_type = match next() % 10 {
            _ if i < 50 => "Deposited",
            0..=4 => "Deposited",
            5..=8 => "Withdrawn",
            _ => "Frozen",
        };
        let amount = format!("{}.{:02}", next() % 100, next() % 100);
        let id = uuid::Uuid::from_u64_pair(7, i as u64).to_string();
        let value = json!({"id": id, "type": event_type, "data": {"account": account, "amount": amount}});
        events.push((account, value));
    }
    events
}

fn records(events: &[(String, serde_json::Value)]) -> Vec<Record> {
    events
        .iter()
        .enumerate()
        .map(|(offset, (account, value))| Record {
            topic: TOPIC.into(),
            partition: 0,
            offset: offset as i64,
            key: Some(account.as_bytes().to_vec()),
            value: Some(serde_json::to_vec(value).expect("json")),
            headers: Vec::new(),
            timestamp_ms: None,
        })
        .collect()
}

/// Applies `records` in batches of `size` with `set_based` on or off, in a database of its own;
/// returns the outcomes (applied, duplicates), the accounts and the logs as text, and the
/// statements run.
async fn run(
    projection: &Projection,
    records: &[Record],
    size: usize,
    set_based: bool,
) -> ((u64, u64), Vec<String>, Vec<String>, i64) {
    let db = TestDb::create().await;
    projector::store::migrate_with(&db.url, &[]).await.expect("migrations");
    let client = db.connect().await;
    client.batch_execute(SCHEMA).await.expect("schema");
    let pool = projector::store::connect(&db.url, 2).await.expect("pool");
    let applier = Applier::new(set_based);
    let mut totals = (0, 0);
    for chunk in records.chunks(size) {
        let mut connection = pool.get().await.expect("connection");
        let from = (chunk[0].offset > 0).then_some(chunk[0].offset);
        let to = chunk.last().expect("records").offset + 1;
        let batch = Batch { records: chunk, moves: vec![Move { partition: (TOPIC.to_string(), 0), from, to }] };
        let report = apply_batch(&mut connection, &applier, projection, &batch, None, false).await.expect("batch");
        assert!(report.fast, "the fast path applied it");
        totals.0 += report.total(Outcome::Applied);
        totals.1 += report.total(Outcome::Duplicate);
    }
    let accounts = common::db::table_text(&client, "accounts", "id").await;
    let mut logs = common::db::table_text(&client, "deposits", "n").await;
    logs.extend(common::db::table_text(&client, "withdrawals", "n").await);
    let statements = common::query_i64(&client, "SELECT count(*) FROM statements_run").await;
    drop(client);
    drop(pool);
    db.drop().await;
    (totals, accounts, logs, statements)
}

#[tokio::test]
async fn set_based_batches_give_what_one_event_at_a_time_gives() {
    let projection = compile_file(Path::new("ledger.toml"), DEFINITION).expect("definition");
    let events = history(700);
    let records = records(&events);
    let distinct = 700 - 700 / 7;

    let (outcomes, accounts, logs, statements) = run(&projection, &records, 100, true).await;
    let (one_by_one, expected_accounts, expected_logs, one_by_one_statements) =
        run(&projection, &records, 100, false).await;

    assert_eq!(outcomes, (distinct as u64, 100), "applied, duplicates");
    assert_eq!(one_by_one, outcomes);
    assert_eq!(accounts.len(), 50);
    assert_eq!(accounts, expected_accounts, "the accounts");
    assert_eq!(logs.len(), expected_logs.len());
    assert_eq!(logs, expected_logs, "the logs, in order");
    // One by one: a statement per event and statement (an upsert counts as an insert and an
    // update statement); set-based: a statement per wave and statement.
    assert!(one_by_one_statements >= 2 * distinct as i64, "one by one: {one_by_one_statements}");
    assert!(
        statements * 4 < one_by_one_statements,
        "set-based ran {statements} statements, one by one {one_by_one_statements}"
    );
}

/// Keys Postgres compares case-insensitively (a nondeterministic collation): `Ann` and `ann` are
/// one row, though the waves would take them apart. The engine sees the collation and applies
/// such a table's events one at a time: an upsert does not fail on meeting its row twice, and no
/// update of the row is lost.
#[tokio::test]
async fn keys_under_a_nondeterministic_collation_are_applied_one_at_a_time() {
    let definition = r#"
name = "people"
topics = ["ledger"]
dedupe = "event_id"

[on.Met]
sql = "INSERT INTO people (name, n) VALUES (:data.name, 1) ON CONFLICT (name) DO UPDATE SET n = people.n + 1"

[on.Greeted]
sql = "UPDATE people SET n = n + 10 WHERE name = :data.name"
"#;
    let projection = compile_file(Path::new("people.toml"), definition).expect("definition");
    let db = TestDb::create().await;
    projector::store::migrate_with(&db.url, &[]).await.expect("migrations");
    let client = db.connect().await;
    client
        .batch_execute(
            "CREATE COLLATION anycase (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
             CREATE TABLE people (name text COLLATE anycase PRIMARY KEY, n int NOT NULL)",
        )
        .await
        .expect("schema");
    let pool = projector::store::connect(&db.url, 2).await.expect("pool");
    let applier = Applier::default();
    let event = |i: u64, event_type: &str, name: &str| {
        let id = uuid::Uuid::from_u64_pair(9, i).to_string();
        (name.to_string(), json!({"id": id, "type": event_type, "data": {"name": name}}))
    };
    let all = records(&[
        event(0, "Met", "Ann"),
        event(1, "Met", "ann"),
        event(2, "Greeted", "ANN"),
        event(3, "Greeted", "Bob"),
        event(4, "Greeted", "aNN"),
        event(5, "Greeted", "anN"),
    ]);
    for (from, to) in [(0, 3), (3, 6)] {
        let mut connection = pool.get().await.expect("connection");
        let chunk = &all[from..to];
        let moves =
            vec![Move { partition: (TOPIC.to_string(), 0), from: (from > 0).then_some(from as i64), to: to as i64 }];
        let batch = Batch { records: chunk, moves };
        let report = apply_batch(&mut connection, &applier, &projection, &batch, None, false).await.expect("batch");
        assert!(report.fast);
        assert_eq!(report.total(Outcome::Applied), 3);
    }
    assert_eq!(common::db::table_text(&client, "people", "name").await, ["(Ann,32)"]);
    drop(client);
    drop(pool);
    db.drop().await;
}
