//! The `accounts` projection the fault tests run, and records published exactly as given: any
//! bytes as value, key and headers, tombstones, absent keys.

use std::path::Path;

use projector::kafka::mock::MockKafka;
use projector::projection::{compile_file, Projection};
use projector::settings::Settings;

use tokio_postgres::Client;

/// One account per key, guarded by the account's version. `note` is required by `Deposited`
/// unless `optional_note`: the "fix" of the parking test.
pub fn accounts(topic: &str, optional_note: bool) -> Projection {
    accounts_named("accounts", topic, optional_note)
}

/// [`accounts`] called `name`, into the table `name` ([`accounts_table`]).
pub fn accounts_named(name: &str, topic: &str, optional_note: bool) -> Projection {
    let note = if optional_note { ":data.note?" } else { ":data.note" };
    let text = format!(
        r#"name = "{name}"
topics = ["{topic}"]
dedupe = "version"

[table]
name = "{name}"
key = "id"
version = "version"

[on.Opened]
insert = {{ owner = ":data.owner", balance = ":data.amount" }}

[on.Deposited]
update = {{ balance = "balance + :data.amount", note = "{note}" }}
"#
    );
    compile_file(Path::new("accounts.toml"), &text).expect("the accounts projection compiles")
}

/// `CREATE TABLE name (…)`: the table [`accounts_named`] writes.
pub fn accounts_table(name: &str) -> String {
    format!(
        "CREATE TABLE {name} (
            id      text    PRIMARY KEY,
            version bigint  NOT NULL,
            owner   text    NOT NULL,
            balance numeric NOT NULL CHECK (balance >= 0),
            note    text
        )"
    )
}

/// What an `accounts` test starts from: its own mock broker, topic and database (with the
/// `accounts` table), a connection to it, settings with `max_events` per batch, and the projection.
pub struct Accounts {
    pub _kafka: MockKafka,
    pub topic: String,
    pub db: crate::common::TestDb,
    pub client: Client,
    pub settings: Settings,
    pub projections: Vec<Projection>,
    pub bootstrap: String,
}

pub async fn setup(partitions: i32, max_events: usize) -> Accounts {
    crate::common::init_tracing();
    let kafka = MockKafka::start(1).expect("mock kafka");
    let topic = crate::common::new_topic(&kafka, partitions);
    let db = crate::common::TestDb::create().await;
    let client = db.connect().await;
    client.batch_execute(&accounts_table("accounts")).await.expect("accounts table");
    let settings = crate::common::settings(&kafka, &db.url, max_events, true);
    let projections = vec![accounts(&topic, false)];
    let bootstrap = settings.kafka.bootstrap_servers.clone();
    Accounts { _kafka: kafka, topic, db, client, settings, projections, bootstrap }
}

pub use crate::common::records::{deposited, event, opened, producer, publish_to, Raw};

/// [`publish_to`], every record to the partition of its key.
pub async fn publish(bootstrap: &str, topic: &str, records: &[Raw]) {
    publish_to(bootstrap, topic, None, records).await;
}

/// `(version, balance as text, note)` of account `key`, `None` without a row.
pub async fn account(client: &Client, key: &str) -> Option<(i64, String, Option<String>)> {
    client
        .query_opt("SELECT version, balance::text, note FROM accounts WHERE id = $1", &[&key])
        .await
        .expect("reading accounts")
        .map(|row| (row.get(0), row.get(1), row.get(2)))
}

/// `(entity_key, error_class, state)` of the projection's dead letters, in the order parked.
pub async fn dead_letters(client: &Client) -> Vec<(Option<String>, String, String, String)> {
    client
        .query("SELECT entity_key, error_class, state, error FROM projector.dead_letters ORDER BY id", &[])
        .await
        .expect("reading dead letters")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect()
}
