//! Adding, changing and removing a projection without a restart: SIGHUP makes a running
//! `projector run` process reload its projections folder. Against real PostgreSQL and librdkafka's
//! mock cluster (served from this test process).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::{projector_command, wait_for, LogDir, Projector, TestDb};
use nix::sys::signal::Signal;
use projector::demo::shop_event;
use projector::kafka::mock::MockKafka;
use tokio_postgres::Client;

const ACCOUNTS: &str = r#"topics = ["bank.accounts"]

[table]
name = "accounts"
key = "account_id"

[on.AccountOpened]
insert = { balance = "0" }

[on.MoneyDeposited]
update = { balance = "balance + :data.amount" }
"#;

const LEDGER: &str = r#"topics = ["bank.ledger"]
dedupe = "event_id"

[on.EntryBooked]
sql = "INSERT INTO ledger (entry_id, amount) VALUES (:id, :data.amount)"
"#;

fn write(dir: &Path, name: &str, text: &str) {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().expect("a folder")).expect("folder");
    std::fs::write(path, text).expect("writing");
}

async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.map_or(-1, |row| row.get::<_, Option<i64>>(0).unwrap_or(0))
}

async fn wait_count(client: &Client, projector: &Projector, sql: &str, expected: i64) {
    wait_for(sql, Duration::from_secs(60), || async {
        projector.assert_running();
        match count(client, sql).await {
            n if n == expected => Ok(()),
            n => Err(format!("{n}, not {expected}")),
        }
    })
    .await;
}

/// Waits until the log, after `from` bytes, says `text`.
async fn wait_logged(log: &Path, from: usize, text: &str) {
    wait_for(text, Duration::from_secs(30), || async {
        let all = std::fs::read_to_string(log).unwrap_or_default();
        if all.get(from..).is_some_and(|tail| tail.contains(text)) {
            Ok(())
        } else {
            Err("not in the log yet".to_string())
        }
    })
    .await;
}

fn log_length(log: &Path) -> usize {
    std::fs::metadata(log).map_or(0, |meta| meta.len() as usize)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_starts_new_projections_stops_removed_ones_and_refuses_invalid_ones_while_the_rest_run() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    let kafka = MockKafka::start(1).expect("mock kafka");
    kafka.create_topic("bank.accounts", 2, 1).expect("topic");
    kafka.create_topic("bank.ledger", 2, 1).expect("topic");
    let bootstrap = kafka.bootstrap_servers();
    let dir = LogDir::new("reload");
    let projections: PathBuf = dir.path.join("projections");
    write(&projections, "accounts.toml", ACCOUNTS);
    write(
        &projections,
        "accounts/migrations/V1__create_accounts.sql",
        "CREATE TABLE accounts (account_id text PRIMARY KEY, balance numeric NOT NULL, version bigint NOT NULL);",
    );
    let log = dir.path.join("projector.log");
    let mut command = projector_command(&db.url, &bootstrap, "reload", &log);
    let http = format!("127.0.0.1:{}", crate::common::free_port());
    command
        .env("PROJECTOR_PROJECTIONS_DIR", &projections)
        .env("PROJECTOR_HTTP__LISTEN", &http)
        .env("PROJECTOR_HTTP__LAG_REFRESH_MS", "200");
    let projector = Projector::spawn(command, &log, "run");
    projector.wait_started(Duration::from_secs(60)).await;

    let deposit = |account: &str, version: i64| {
        let event = if version == 1 { "AccountOpened" } else { "MoneyDeposited" };
        shop_event(account, version, event, serde_json::json!({"amount": 10}))
    };
    crate::common::produce_one_per_batch(&bootstrap, "bank.accounts", &[deposit("a-1", 1), deposit("a-1", 2)]).await;
    wait_count(&client, &projector, "SELECT sum(balance)::int8 FROM accounts", 10).await;

    // A new projection, with its table's migration: started on SIGHUP, the other untouched.
    write(&projections, "ledger.toml", LEDGER);
    write(
        &projections,
        "ledger/migrations/V1__create_ledger.sql",
        "CREATE TABLE ledger (entry_id text PRIMARY KEY, amount numeric NOT NULL);",
    );
    let from = log_length(&log);
    projector.signal(Signal::SIGHUP);
    wait_logged(&log, from, "projection starting").await;
    let entries: Vec<_> =
        (1..=3).map(|i| shop_event(&format!("l-{i}"), 1, "EntryBooked", serde_json::json!({"amount": i}))).collect();
    crate::common::produce_one_per_batch(&bootstrap, "bank.ledger", &entries).await;
    wait_count(&client, &projector, "SELECT sum(amount)::int8 FROM ledger", 6).await;
    crate::common::produce_one_per_batch(&bootstrap, "bank.accounts", &[deposit("a-1", 3)]).await;
    wait_count(&client, &projector, "SELECT sum(balance)::int8 FROM accounts", 20).await;
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(log_text[from..].contains("migration applied"), "ledger's migration applied on reload");
    assert_eq!(log_text[from..].matches("projection starting").count(), 1, "only the new projection started");

    // Invalid definitions, a new one and a running one's, reported with file and line: the new
    // one does not start, the running one goes on as it was; a valid new one in the same reload
    // starts.
    write(&projections, "broken.toml", "topics = [\"bank.accounts\"]\n\n[on.X]\nsql = 42\n");
    write(&projections, "ledger.toml", &format!("{LEDGER}\n[on.Oops]\nsql = \"SELECT\"\nnonsense = 1\n"));
    write(&projections, "journal.toml", &LEDGER.replace("INTO ledger", "INTO journal"));
    write(
        &projections,
        "journal/migrations/V1__create_journal.sql",
        "CREATE TABLE journal (entry_id text PRIMARY KEY, amount numeric NOT NULL);",
    );
    let from = log_length(&log);
    projector.signal(Signal::SIGHUP);
    wait_logged(&log, from, "definitions that do not load are not started").await;
    wait_logged(&log, from, "projection starting projection=journal").await;
    let tail = std::fs::read_to_string(&log).unwrap_or_default()[from..].to_string();
    assert!(tail.contains(&format!("{}:4:", projections.join("broken.toml").display())), "{tail}");
    assert!(tail.contains(&projections.join("ledger.toml").display().to_string()), "{tail}");
    assert!(!tail.contains("projection=ledger"), "the running ledger is left as it was: {tail}");
    crate::common::produce_one_per_batch(&bootstrap, "bank.accounts", &[deposit("a-1", 4)]).await;
    crate::common::produce_one_per_batch(
        &bootstrap,
        "bank.ledger",
        &[shop_event("l-4", 1, "EntryBooked", serde_json::json!({"amount": 4}))],
    )
    .await;
    wait_count(&client, &projector, "SELECT sum(balance)::int8 FROM accounts", 30).await;
    wait_count(&client, &projector, "SELECT sum(amount)::int8 FROM ledger", 10).await;
    wait_count(&client, &projector, "SELECT sum(amount)::int8 FROM journal", 10).await;
    write(&projections, "ledger.toml", LEDGER);
    std::fs::remove_file(projections.join("broken.toml")).expect("removing");

    // A changed definition: restarted under the definition gate, refused until rebuilt or
    // accepted; the other projection goes on.
    write(&projections, "accounts.toml", &ACCOUNTS.replace("balance + :data.amount", "balance + 2 * :data.amount"));
    let from = log_length(&log);
    projector.signal(Signal::SIGHUP);
    wait_logged(&log, from, "changed since its read model was built").await;
    crate::common::produce_one_per_batch(&bootstrap, "bank.accounts", &[deposit("a-1", 5)]).await;
    crate::common::produce_one_per_batch(
        &bootstrap,
        "bank.ledger",
        &[shop_event("l-5", 1, "EntryBooked", serde_json::json!({"amount": 5}))],
    )
    .await;
    wait_count(&client, &projector, "SELECT sum(amount)::int8 FROM ledger", 15).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(count(&client, "SELECT sum(balance)::int8 FROM accounts").await, 30, "the changed definition waits");

    // A removed projection stops after its batch in flight; the rest run on.
    std::fs::remove_file(projections.join("ledger.toml")).expect("removing");
    write(&projections, "accounts.toml", ACCOUNTS);
    let from = log_length(&log);
    projector.signal(Signal::SIGHUP);
    wait_logged(&log, from, "projection stopped (reload)").await;
    let ledger_checkpoint =
        "SELECT coalesce(sum(next_offset), 0)::int8 FROM projector.checkpoints WHERE projection = 'ledger'";
    let stopped_at = count(&client, ledger_checkpoint).await;
    crate::common::produce_one_per_batch(
        &bootstrap,
        "bank.ledger",
        &[shop_event("l-6", 1, "EntryBooked", serde_json::json!({"amount": 6}))],
    )
    .await;
    // The accounts definition is back to the one its rows were built by: it runs again.
    wait_count(&client, &projector, "SELECT sum(balance)::int8 FROM accounts", 40).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(count(&client, ledger_checkpoint).await, stopped_at, "the removed projection reads nothing more");
    assert_eq!(count(&client, "SELECT sum(amount)::int8 FROM ledger").await, 15);
    // Readiness and the gauges follow: the removed projection is neither waited for nor reported.
    let (_, ready) = crate::common::scrape::http_get(&http, "/health/ready").await.expect("/health/ready");
    assert!(ready.contains("\"accounts\"") && !ready.contains("ledger"), "{ready}");
    let (_, metrics) = crate::common::scrape::http_get(&http, "/metrics").await.expect("/metrics");
    let exposition = crate::common::scrape::Exposition::parse(&metrics);
    for gauge in ["projector_projection_state", "projector_consumer_lag_messages", "projector_checkpoint_offset"] {
        assert_eq!(exposition.count(gauge, &[("projection", "ledger")]), 0, "{gauge} of the removed projection");
        assert!(exposition.count(gauge, &[("projection", "accounts")]) > 0, "{gauge} of accounts");
    }

    let status = projector.signal_and_wait(Signal::SIGTERM, Duration::from_secs(30)).await;
    assert!(status.success(), "clean shutdown after reloads: {status}");
    drop(client);
    db.drop().await;
}
