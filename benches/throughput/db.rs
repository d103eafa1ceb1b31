//! PostgreSQL: connecting, the bench's databases (created and dropped), their schema, the
//! versioned read model's check, the projections' checkpoints and their processed event ids.

use anyhow::Context;
use serde_json::{json, Value};
use tokio_postgres::{Client, NoTls, Statement};
use uuid::Uuid;

use crate::projections::ORDER_EVENTS_TABLE;
use crate::report::round;

pub async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, connection) =
        tokio_postgres::connect(url, NoTls).await.with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The `projector_bench_<random>_*` databases of one run, on `server`.
pub struct Databases {
    server: String,
    prefix: String,
    pub created: Vec<String>,
}

impl Databases {
    pub fn new(server: &str) -> Databases {
        Databases {
            server: server.to_string(),
            prefix: format!("projector_bench_{}", &Uuid::new_v4().simple().to_string()[..8]),
            created: Vec::new(),
        }
    }

    pub async fn create(&mut self, suffix: &str) -> anyhow::Result<String> {
        let name = format!("{}_{suffix}", self.prefix);
        let admin = connect(&self.server).await?;
        drop_database(&admin, &name).await?;
        admin.batch_execute(&format!("CREATE DATABASE \"{name}\"")).await?;
        self.created.push(name.clone());
        projector::demo::database_url(&self.server, &name)
    }

    pub async fn drop_all(&mut self) {
        let Ok(admin) = connect(&self.server).await else { return };
        for name in self.created.drain(..) {
            if let Err(error) = drop_database(&admin, &name).await {
                eprintln!("could not drop database {name}: {error}");
            }
        }
    }
}

async fn drop_database(admin: &Client, name: &str) -> Result<(), tokio_postgres::Error> {
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).await
}

/// The engine's migrations, plus the bench's `note` column and its `order_events` table.
pub async fn prepare_schema(url: &str) -> anyhow::Result<()> {
    projector::store::migrate_with(url, &projector::demo::example_projections()?).await?;
    let client = connect(url).await?;
    client.batch_execute("ALTER TABLE order_summary ADD COLUMN IF NOT EXISTS note text").await?;
    client.batch_execute(ORDER_EVENTS_TABLE).await?;
    Ok(())
}

/// A slow database: each row written to `tables` waits `ms` (`--row-delay-ms`).
pub async fn add_row_delay(url: &str, ms: f64, tables: &[String]) -> anyhow::Result<()> {
    let client = connect(url).await?;
    client
        .batch_execute(&format!(
            "CREATE FUNCTION bench_row_delay() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN PERFORM pg_sleep({}); RETURN NEW; END $$",
            ms / 1000.0
        ))
        .await?;
    for table in tables {
        client
            .batch_execute(&format!(
                "CREATE TRIGGER bench_row_delay BEFORE INSERT OR UPDATE ON {table}
                 FOR EACH ROW EXECUTE FUNCTION bench_row_delay()"
            ))
            .await?;
    }
    Ok(())
}

/// `--existing-rows`: `rows` rows of other orders in `table` (`order_summary`'s shape, or with
/// `events` `order_events`'), each at version 1 (and one event), then the table vacuumed and
/// analysed. Their ids are `md5('existing-<i>')`, spread over the key's index as uuids are.
pub async fn fill_existing(client: &Client, table: &str, rows: usize, events: bool) -> anyhow::Result<()> {
    if rows == 0 {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let insert = if events {
        format!(
            "INSERT INTO {table} (order_id, events, last_version)
             SELECT md5('existing-' || i)::uuid, 1, 1 FROM generate_series(1, {rows}) AS i"
        )
    } else {
        format!(
            "INSERT INTO {table} (order_id, customer_id, total, status, placed_at, updated_at, version)
             SELECT md5('existing-' || i)::uuid, 'customer-' || (i % 997), 10.00 + (i % 90000) / 100.0, 'placed',
                    now(), now(), 1
               FROM generate_series(1, {rows}) AS i"
        )
    };
    client.batch_execute(&insert).await?;
    client.batch_execute(&format!("VACUUM ANALYZE {table}")).await?;
    eprintln!("  {rows} existing rows in {table} in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Rows and sum of versions of `table`, against the workload's expectation plus `existing` rows
/// at version 1 (`--existing-rows`).
pub async fn verify(
    client: &Client,
    table: &str,
    entities: usize,
    version_sum: i64,
    existing: usize,
) -> anyhow::Result<String> {
    let row = client.query_one(&format!("SELECT count(*), coalesce(sum(version), 0)::int8 FROM {table}"), &[]).await?;
    let (rows, sum): (i64, i64) = (row.get(0), row.get(1));
    let (entities, version_sum) = (entities + existing, version_sum + existing as i64);
    Ok(if rows == entities as i64 && sum == version_sum {
        format!("ok ({rows} rows, versions sum {sum})")
    } else {
        format!("MISMATCH: {rows} rows (expected {entities}), versions sum {sum} (expected {version_sum})")
    })
}

/// The sum of each of `projections`' checkpoints (next offsets) on the topic, in their order (0
/// where none).
pub async fn checkpoint_sums(client: &Client, topic: &str, projections: &[String]) -> anyhow::Result<Vec<i64>> {
    let rows = client
        .query(
            "SELECT projection, sum(next_offset)::int8 FROM projector.checkpoints
              WHERE projection = ANY($1) AND topic = $2 GROUP BY projection",
            &[&projections, &topic],
        )
        .await?;
    let mut sums = vec![0i64; projections.len()];
    for row in rows {
        let name: String = row.get(0);
        if let Some(i) = projections.iter().position(|p| *p == name) {
            sums[i] = row.get(1);
        }
    }
    Ok(sums)
}

/// Sum of `projection`'s checkpoints (next offsets) on the topic.
pub async fn checkpoint_sum(client: &Client, projection: &str, topic: &str) -> anyhow::Result<i64> {
    Ok(checkpoint_sums(client, topic, &[projection.to_string()]).await?[0])
}

/// `projection`'s checkpoint (next offset) of each of the topic's `partitions` (0 where none), by
/// the statement of [`prepare_checkpoints`].
pub async fn checkpoints(
    client: &Client,
    statement: &Statement,
    projection: &str,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<Vec<i64>> {
    let rows = client.query(statement, &[&projection, &topic]).await?;
    let mut next = vec![0i64; partitions as usize];
    for row in rows {
        next[row.get::<_, i32>(0) as usize] = row.get(1);
    }
    Ok(next)
}

/// The statement [`checkpoints`] runs, prepared once: the latency phase polls it every
/// millisecond, and a statement prepared on every call costs Postgres twice the work.
pub async fn prepare_checkpoints(client: &Client) -> anyhow::Result<Statement> {
    Ok(client
        .prepare("SELECT partition, next_offset FROM projector.checkpoints WHERE projection = $1 AND topic = $2")
        .await?)
}

/// `projector.processed_events` now: the ids `projections` keep, and the table's size (all of it,
/// indexes and TOAST included; space freed by pruning stays with it until reused).
pub async fn processed_events(client: &Client, projections: &[String]) -> anyhow::Result<Value> {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM projector.processed_events WHERE projection = ANY($1)),
                    pg_total_relation_size('projector.processed_events')",
            &[&projections],
        )
        .await?;
    let (rows, bytes): (i64, i64) = (row.get(0), row.get(1));
    Ok(json!({ "rows": rows, "total_relation_size_mb": round(bytes as f64 / 1024.0 / 1024.0, 1) }))
}
