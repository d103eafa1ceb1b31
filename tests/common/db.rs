//! PostgreSQL: the server the tests use, a database of its own per test, queries the tests share,
//! and a lock that holds the engine's writes back.

use std::collections::BTreeMap;

use tokio_postgres::{Client, NoTls};

/// The server the test databases are created on, unless `PROJECTOR_TEST_DATABASE_URL` says otherwise.
pub const DEFAULT_SERVER_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// `PROJECTOR_TEST_DATABASE_URL`, or [`DEFAULT_SERVER_URL`].
pub fn server_url() -> String {
    std::env::var("PROJECTOR_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_SERVER_URL.to_string())
}

/// `<prefix>_<12 random hex digits>`: names of databases, topics and consumer groups.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Connects to `url`, driving the connection on the current runtime.
pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|error| panic!("connecting to `{url}`: {error} (is PostgreSQL running? see .ci/run)"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A database of its own for one test, `projector_test_<random hex>` on the server of
/// [`server_url`], created empty (the engine migrates it) and dropped at the end, or best-effort
/// when the test panics.
pub struct TestDb {
    pub url: String,
    pub name: String,
    server_url: String,
    dropped: bool,
}

impl TestDb {
    pub async fn create() -> TestDb {
        let server_url = server_url();
        let name = unique("projector_test");
        connect(&server_url)
            .await
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap_or_else(|error| panic!("creating database `{name}`: {error}"));
        let url = projector::demo::database_url(&server_url, &name).expect("PROJECTOR_TEST_DATABASE_URL is a URL");
        TestDb { url, name, server_url, dropped: false }
    }

    /// A new connection to this database.
    pub async fn connect(&self) -> Client {
        connect(&self.url).await
    }

    /// Drops the database, disconnecting whoever is still connected (a crashed engine's pool).
    pub async fn drop(mut self) {
        connect(&self.server_url)
            .await
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name))
            .await
            .unwrap_or_else(|error| panic!("dropping database `{}`: {error}", self.name));
        self.dropped = true;
    }
}

impl Drop for TestDb {
    /// Best effort, when the test did not drop the database itself (it panicked): a thread with a
    /// runtime of its own, since this may run inside (or outside) the test's runtime.
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        let (server_url, name) = (self.server_url.clone(), self.name.clone());
        let dropping = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
            runtime.block_on(async {
                let Ok((client, connection)) = tokio_postgres::connect(&server_url, NoTls).await else {
                    return;
                };
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                if let Err(error) =
                    client.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).await
                {
                    eprintln!("could not drop test database `{name}`: {error}");
                }
            });
        });
        let _ = dropping.join();
    }
}

/// The single `bigint` (`count(*)`, or a sum cast to `bigint`) that `sql` returns.
pub async fn query_i64(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap_or_else(|error| panic!("`{sql}`: {error}")).get::<_, i64>(0)
}

/// `projection`'s checkpoints: partition -> next offset, for `topic`.
pub async fn checkpoints(
    client: &Client,
    projection: &str,
    topic: &str,
) -> Result<BTreeMap<i32, i64>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT partition, next_offset FROM projector.checkpoints WHERE projection = $1 AND topic = $2",
            &[&projection, &topic],
        )
        .await?;
    Ok(rows.iter().map(|row| (row.get::<_, i32>(0), row.get::<_, i64>(1))).collect())
}

/// Every row of `table` as text (`t::text`), ordered by its key: for byte-for-byte comparisons.
pub async fn table_text(client: &Client, table: &str, key: &str) -> Vec<String> {
    client
        .query(&format!("SELECT t::text FROM {table} t ORDER BY {key}"), &[])
        .await
        .unwrap_or_else(|error| panic!("reading `{table}`: {error}"))
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Holds the engine's writes back: an open transaction holding exclusive locks on the example
/// read models, so that every batch waits and no checkpoint moves until [`WriteLock::release`].
pub struct WriteLock {
    client: Client,
}

impl WriteLock {
    pub async fn take(database_url: &str) -> WriteLock {
        let client = connect(database_url).await;
        client
            .batch_execute("BEGIN; LOCK TABLE order_summary, customer_totals IN ACCESS EXCLUSIVE MODE")
            .await
            .expect("locking the read models");
        WriteLock { client }
    }

    pub async fn release(self) {
        self.client.batch_execute("ROLLBACK").await.expect("releasing the lock");
    }
}
