//! A projection brings its schema: SQL migrations in `<projections_dir>/NAME/migrations/`, applied
//! by `projector migrate` and at the start of `projector run`, in order, each once, checksummed,
//! under an advisory lock, with a history table per projection. Run as the binary, against real
//! PostgreSQL (and librdkafka's mock cluster for `run`).

use std::path::PathBuf;
use std::process::Output;

use crate::common::{projector_subcommand, LogDir, Projector, TestDb};
use projector::demo::shop_event;
use projector::kafka::mock::MockKafka;
use tokio_postgres::Client;

const TOPIC: &str = "bank.accounts";

const ACCOUNTS: &str = r#"# Balances per account, guarded by the account's version.
topics = ["bank.accounts"]

[table]
name = "accounts"
key = "account_id"
version = "version"

[on.AccountOpened]
insert = { owner = ":data.owner", balance = "0" }

[on.MoneyDeposited]
update = { balance = "balance + :data.amount" }
"#;

const V1: &str =
    "CREATE TABLE accounts (account_id text PRIMARY KEY, balance numeric NOT NULL, version bigint NOT NULL);\n";
const V2: &str = "ALTER TABLE accounts ADD COLUMN owner text;\n";

/// A projections folder of its own: `accounts.toml` and, in `accounts/migrations/`, `migrations`
/// (file name, text).
struct Folder {
    dir: LogDir,
}

impl Folder {
    fn new(label: &str, migrations: &[(&str, &str)]) -> Folder {
        let folder = Folder { dir: LogDir::new(label) };
        std::fs::create_dir_all(folder.projections().join("accounts/migrations")).expect("projections folder");
        std::fs::write(folder.projections().join("accounts.toml"), ACCOUNTS).expect("definition");
        for (name, sql) in migrations {
            folder.write(name, sql);
        }
        folder
    }

    fn projections(&self) -> PathBuf {
        self.dir.path.join("projections")
    }

    fn migration(&self, name: &str) -> PathBuf {
        self.projections().join("accounts/migrations").join(name)
    }

    fn write(&self, name: &str, sql: &str) {
        std::fs::write(self.migration(name), sql).expect("writing a migration");
    }

    fn command(&self, arguments: &[&str], db: &TestDb, bootstrap: &str) -> std::process::Command {
        let log = self.dir.path.join("projector.log");
        let mut command = projector_subcommand(arguments, &db.url, bootstrap, "schema", &log);
        command
            .env("PROJECTOR_PROJECTIONS_DIR", self.projections())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        command
    }

    fn migrate(&self, db: &TestDb) -> Output {
        self.command(&["migrate"], db, "127.0.0.1:1").output().expect("running projector migrate")
    }
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

async fn columns(client: &Client, table: &str) -> Vec<String> {
    client
        .query(
            "SELECT column_name::text FROM information_schema.columns WHERE table_name = $1 ORDER BY column_name",
            &[&table],
        )
        .await
        .expect("columns")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

async fn history(client: &Client) -> Vec<(i32, String)> {
    client
        .query("SELECT version, name::text FROM projector.migrations_accounts ORDER BY version", &[])
        .await
        .expect("the history table")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

async fn exists(client: &Client, table: &str) -> bool {
    client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table]).await.expect("to_regclass").get(0)
}

#[tokio::test]
async fn migrate_applies_a_projections_migrations_in_order_and_each_once() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    let folder = Folder::new("schema-order", &[("V1__create_accounts.sql", V1), ("V2__add_owner.sql", V2)]);

    let first = folder.migrate(&db);
    assert!(first.status.success(), "{}", text(&first));
    let printed = text(&first);
    let one = printed.find("applied accounts: V1__create_accounts").unwrap_or_else(|| panic!("{printed}"));
    let two = printed.find("applied accounts: V2__add_owner").unwrap_or_else(|| panic!("{printed}"));
    assert!(one < two, "in version order: {printed}");
    assert_eq!(columns(&client, "accounts").await, ["account_id", "balance", "owner", "version"]);
    assert_eq!(history(&client).await, [(1, "create_accounts".to_string()), (2, "add_owner".to_string())]);
    // The engine's migrations no longer make anyone's read models but the projections' own.
    assert!(!exists(&client, "order_summary").await, "the example shop's tables are not made for other projections");

    // Again: nothing to do (V1 has no IF NOT EXISTS: applied twice, it would fail).
    let again = folder.migrate(&db);
    assert!(again.status.success(), "{}", text(&again));
    assert!(text(&again).contains("database is up to date"), "{}", text(&again));

    // A new migration is applied alone; `validate --database-url` then finds the statements fit.
    folder.write("V3__index_owner.sql", "CREATE INDEX accounts_owner ON accounts (owner);\n");
    let third = folder.migrate(&db);
    assert!(text(&third).contains("applied accounts: V3__index_owner"), "{}", text(&third));
    assert!(!text(&third).contains("V1__"), "{}", text(&third));
    assert_eq!(history(&client).await.len(), 3);
    let validated =
        folder.command(&["validate", "--database-url", &db.url], &db, "127.0.0.1:1").output().expect("validate");
    assert!(validated.status.success(), "{}", text(&validated));
    drop(client);
    db.drop().await;
}

#[tokio::test]
async fn an_edited_missing_or_misnamed_migration_is_refused_naming_its_file() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    let folder = Folder::new("schema-refused", &[("V1__create_accounts.sql", V1), ("V2__add_owner.sql", V2)]);
    assert!(folder.migrate(&db).status.success());

    // Edited after it was applied.
    folder.write("V2__add_owner.sql", "ALTER TABLE accounts ADD COLUMN owner text NOT NULL DEFAULT '';\n");
    folder.write("V3__add_branch.sql", "ALTER TABLE accounts ADD COLUMN branch text;\n");
    let edited = folder.migrate(&db);
    assert!(!edited.status.success(), "{}", text(&edited));
    let file = folder.migration("V2__add_owner.sql");
    assert!(
        text(&edited).contains(&format!("`{}` was changed after it was applied", file.display())),
        "{}",
        text(&edited)
    );
    assert!(!columns(&client, "accounts").await.contains(&"branch".to_string()), "nothing after it is applied");

    // Gone after it was applied.
    folder.write("V2__add_owner.sql", V2);
    std::fs::remove_file(folder.migration("V3__add_branch.sql")).expect("removing V3");
    std::fs::remove_file(folder.migration("V2__add_owner.sql")).expect("removing V2");
    let missing = folder.migrate(&db);
    assert!(!missing.status.success(), "{}", text(&missing));
    assert!(text(&missing).contains(&format!("`{}` is gone", file.display())), "{}", text(&missing));
    folder.write("V2__add_owner.sql", V2);

    // A file that is not named like a migration, and two of one version: the definitions do not
    // load (exit code 2), for `validate` as for `migrate`, naming the file.
    folder.write("v3-add-branch.sql", "ALTER TABLE accounts ADD COLUMN branch text;\n");
    for arguments in [&["migrate"][..], &["validate"][..]] {
        let misnamed = folder.command(arguments, &db, "127.0.0.1:1").output().expect("projector");
        assert_eq!(misnamed.status.code(), Some(2), "{arguments:?}: {}", text(&misnamed));
        let named = folder.migration("v3-add-branch.sql");
        assert!(text(&misnamed).contains(&named.display().to_string()), "{}", text(&misnamed));
        assert!(text(&misnamed).contains("V<version>__<description>.sql"), "{}", text(&misnamed));
    }
    std::fs::remove_file(folder.migration("v3-add-branch.sql")).expect("removing");
    folder.write("V002__again.sql", "SELECT 1;\n");
    let repeated = folder.migrate(&db);
    assert_eq!(repeated.status.code(), Some(2), "{}", text(&repeated));
    assert!(text(&repeated).contains("versions must be unique"), "{}", text(&repeated));
    std::fs::remove_file(folder.migration("V002__again.sql")).expect("removing");

    // A migration Postgres refuses: its error, and the history keeps what did apply.
    folder.write("V3__broken.sql", "ALTER TABLE accounts ADD COLUMN nonsense no_such_type;\n");
    let broken = folder.migrate(&db);
    assert!(!broken.status.success());
    assert!(text(&broken).contains("no_such_type"), "{}", text(&broken));
    assert_eq!(history(&client).await.len(), 2);
    drop(client);
    db.drop().await;
}

#[tokio::test]
async fn instances_starting_together_apply_each_migration_once() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    // Not idempotent: a second application fails (the table exists; the row is there twice).
    let folder = Folder::new(
        "schema-together",
        &[
            ("V1__create_accounts.sql", V1),
            ("V2__add_owner.sql", V2),
            ("V3__audit.sql", "CREATE TABLE accounts_audit (n int); INSERT INTO accounts_audit VALUES (1);\n"),
        ],
    );
    let children: Vec<_> =
        (0..4).map(|_| folder.command(&["migrate"], &db, "127.0.0.1:1").spawn().expect("projector migrate")).collect();
    let mut applied = 0;
    for child in children {
        let output = child.wait_with_output().expect("projector migrate");
        assert!(output.status.success(), "{}", text(&output));
        applied += text(&output).matches("applied accounts:").count();
    }
    assert_eq!(applied, 3, "each migration applied by one instance");
    assert_eq!(history(&client).await.len(), 3);
    let audit: i64 = client.query_one("SELECT count(*) FROM accounts_audit", &[]).await.expect("audit").get(0);
    assert_eq!(audit, 1);
    drop(client);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_applies_a_new_projections_migrations_before_it_starts() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    let kafka = MockKafka::start(1).expect("mock kafka");
    kafka.create_topic(TOPIC, 2, 1).expect("topic");
    let folder = Folder::new("schema-run", &[("V1__create_accounts.sql", V1), ("V2__add_owner.sql", V2)]);
    let events = [
        shop_event("acc-1", 1, "AccountOpened", serde_json::json!({"owner": "Ada"})),
        shop_event("acc-1", 2, "MoneyDeposited", serde_json::json!({"amount": 40})),
        shop_event("acc-1", 2, "MoneyDeposited", serde_json::json!({"amount": 40})),
        shop_event("acc-2", 1, "AccountOpened", serde_json::json!({"owner": "Grace"})),
    ];
    crate::common::produce_one_per_batch(&kafka.bootstrap_servers(), TOPIC, &events).await;
    let log = folder.dir.path.join("projector.log");
    let mut command = folder.command(&["run"], &db, &kafka.bootstrap_servers());
    let file = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("the log");
    command.stdout(file.try_clone().expect("the log")).stderr(file);
    let projector = Projector::spawn(command, &log, "run");
    crate::common::wait_for_rows(
        &client,
        &projector,
        "SELECT account_id, owner, balance::text, version::text FROM accounts ORDER BY account_id",
        &[&["acc-1", "Ada", "40", "2"], &["acc-2", "Grace", "0", "1"]],
    )
    .await;
    projector.assert_running();
    assert_eq!(history(&client).await.len(), 2);
    drop(projector);
    drop(client);
    db.drop().await;
}

/// The engine's migrations before read models brought their own schema: V2 made the example
/// shop's tables in every database (its text, as it was).
const OLD_V2: &str = "CREATE TABLE order_summary (
    order_id      uuid          PRIMARY KEY,
    customer_id   text          NOT NULL,
    total         numeric(12,2) NOT NULL,
    status        text          NOT NULL,
    paid_amount   numeric(12,2),
    carrier       text,
    cancel_reason text,
    placed_at     timestamptz,
    updated_at    timestamptz,
    version       bigint        NOT NULL
);

CREATE TABLE customer_totals (
    customer_id      text          PRIMARY KEY,
    orders_placed    bigint        NOT NULL DEFAULT 0,
    orders_cancelled bigint        NOT NULL DEFAULT 0,
    total_placed     numeric(14,2) NOT NULL DEFAULT 0,
    total_paid       numeric(14,2) NOT NULL DEFAULT 0
);";

#[tokio::test]
async fn a_database_migrated_before_keeps_its_shop_tables_and_rows() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    // An old database: the engine's migrations, V2 among them, recorded in refinery's history.
    projector::store::migrate(&db.url).await.expect("engine migrations");
    client.batch_execute(OLD_V2).await.expect("the old V2");
    client
        .execute(
            "INSERT INTO refinery_schema_history (version, name, applied_on, checksum)
             VALUES (2, 'shop_read_models', '2026-11-01T00:00:00Z', '1234567890')",
            &[],
        )
        .await
        .expect("V2 in the history");
    client
        .batch_execute(
            "INSERT INTO order_summary (order_id, customer_id, total, status, version)
             VALUES ('00000000-0000-0000-0000-000000000001', 'c-1', 12.50, 'placed', 1);
             INSERT INTO customer_totals (customer_id, orders_placed) VALUES ('c-1', 1)",
        )
        .await
        .expect("rows");

    let dir = LogDir::new("schema-upgrade");
    let log = dir.path.join("projector.log");
    let output = projector_subcommand(&["migrate"], &db.url, "127.0.0.1:1", "upgrade", &log)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("projector migrate");
    assert!(output.status.success(), "{}", text(&output));
    assert!(text(&output).contains("applied order_summary: V1__create_order_summary"), "{}", text(&output));
    assert!(text(&output).contains("applied customer_totals: V1__create_customer_totals"), "{}", text(&output));
    let kept: (i64, i64) = {
        let row = client
            .query_one("SELECT (SELECT count(*) FROM order_summary), (SELECT count(*) FROM customer_totals)", &[])
            .await
            .expect("counts");
        (row.get(0), row.get(1))
    };
    assert_eq!(kept, (1, 1), "rows kept");
    let engine: Vec<i32> = client
        .query("SELECT version FROM refinery_schema_history ORDER BY version", &[])
        .await
        .expect("engine history")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(!engine.contains(&2), "the engine forgot V2: {engine:?}");
    let again = projector_subcommand(&["migrate"], &db.url, "127.0.0.1:1", "upgrade", &log)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("projector migrate");
    assert!(text(&again).contains("database is up to date"), "{}", text(&again));
    drop(client);
    db.drop().await;
}

#[tokio::test]
async fn validate_names_the_file_and_line_of_a_statement_the_schema_does_not_fit_and_bad_settings_exit_2() {
    let db = TestDb::create().await;
    let folder = Folder::new("schema-validate", &[("V1__create_accounts.sql", V1), ("V2__add_owner.sql", V2)]);
    assert!(folder.migrate(&db).status.success());
    // A column the schema lacks, and a value of the wrong type, on lines 10 and 13 of the file.
    let text = format!(
        "{ACCOUNTS}\n[on.AccountRenamed]\nupdate = {{ nickname = \":data.nickname\" }}\n\n[on.AccountFrozen]\nsql = \"UPDATE accounts SET balance = 'frozen'::boolean, version = :version WHERE account_id = :key AND version = :version - 1\"\n"
    );
    std::fs::write(folder.projections().join("accounts.toml"), &text).expect("definition");
    let line_of = |needle: &str| text.lines().position(|line| line.contains(needle)).expect("line") + 1;
    let output =
        folder.command(&["validate", "--database-url", &db.url], &db, "127.0.0.1:1").output().expect("validate");
    let printed = self::text(&output);
    assert_eq!(output.status.code(), Some(2), "{printed}");
    let file = folder.projections().join("accounts.toml");
    for (line, what) in [(line_of("nickname"), "nickname"), (line_of("frozen"), "boolean")] {
        let at = format!("{}:{line}:", file.display());
        let reported =
            printed.lines().find(|reported| reported.starts_with(&at)).unwrap_or_else(|| panic!("{at} in {printed}"));
        assert!(reported.contains(what) && reported.contains("does not fit the database"), "{reported}");
    }
    assert!(printed.contains("2 statement(s) do not fit the database"), "{printed}");

    // Settings that do not parse: exit code 2, with what is wrong.
    let mut command = folder.command(&["validate"], &db, "127.0.0.1:1");
    command.env("PROJECTOR_BATCH__MAX_EVENTS", "many");
    let output = command.output().expect("validate");
    assert_eq!(output.status.code(), Some(2), "{}", self::text(&output));
    assert!(self::text(&output).to_lowercase().contains("batch.max_events"), "{}", self::text(&output));
    db.drop().await;
}
