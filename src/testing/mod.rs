//! `projector test`: a projection's fixtures, run through the engine's own decode → bind → apply
//! path ([`crate::store::apply::apply_batch`], as `run` calls it) on a scratch database with the
//! projection's migrations applied; no Kafka. A fixture (`<projections_dir>/NAME/tests/*.toml`)
//! lists events in and the rows expected out. Each fixture runs as written, then, unasked, again
//! under what at-least-once delivery does: every event delivered twice, the whole stream replayed
//! over the built rows, keys interleaved in other orders (each key's order kept), and a key's
//! events out of order. Every run must give the expected rows; a report names the run, its event
//! order, and the differing rows column by column.
//!
//! # Layout
//! - this file: running the fixtures on scratch databases ([`run`]).
//! - [`fixture`]: reading and checking fixture files.
//! - [`orders`]: the delivery orders besides as written.
//! - [`report`]: what was found, as text or JUnit XML.

mod fixture;
mod orders;
mod report;

use std::collections::{BTreeMap, BTreeSet};

use rand::{Rng, SeedableRng};

use crate::checkpoint::Move;
use crate::projection::{Projection, Record};
use crate::store::apply::{apply_batch, Batch, Handling};
use crate::store::fast::Applier;
use crate::store::{self, StoreError};

pub use fixture::{fixtures_dir, load_fixtures, parse_fixture, Fixture};
pub use report::{junit, text, FixtureResult, RunResult, TestReport};

use fixture::{record_of, Row};
use orders::{interleaved, keys_of, out_of_order};

/// Runs of each kind with a random order, per fixture.
const SHUFFLES: usize = 3;

/// Why `projector test` could not run.
#[derive(Debug, thiserror::Error)]
pub enum TestError {
    /// A fixture does not parse, or names nothing to test.
    #[error("{0}")]
    Fixture(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Other(String),
}

/// Runs the fixtures of `projections` on scratch databases of the server `url` names, with
/// `seed` choosing the shuffled orders.
pub async fn run(url: &str, projections: &[Projection], seed: u64) -> Result<TestReport, TestError> {
    let mut all = Vec::new();
    for projection in projections {
        let fixtures = load_fixtures(projection).map_err(TestError::Fixture)?;
        if !fixtures.is_empty() {
            all.push((projection, fixtures));
        }
    }
    let mut report = TestReport { seed, fixtures: Vec::new() };
    for (projection, fixtures) in all {
        let scratch = Scratch::create(url, projection).await?;
        let result = async {
            for fixture in &fixtures {
                report.fixtures.push(run_fixture(&scratch, projection, fixture, seed).await?);
            }
            Ok::<_, TestError>(())
        }
        .await;
        scratch.drop().await;
        result?;
    }
    Ok(report)
}

/// A database of its own for one projection's fixtures, dropped at the end.
struct Scratch {
    server: String,
    name: String,
    pool: deadpool_postgres::Pool,
}

impl Scratch {
    async fn create(url: &str, projection: &Projection) -> Result<Scratch, TestError> {
        let name = format!(
            "projector_test_{}_{}",
            projection.name.chars().take(24).collect::<String>(),
            rand::rng().random::<u32>()
        );
        let scratch_url =
            crate::demo::recreate_database(url, &name).await.map_err(|error| TestError::Other(format!("{error:#}")))?;
        store::migrate_with(&scratch_url, std::slice::from_ref(projection)).await?;
        let pool = store::connect(&scratch_url, 2).await?;
        {
            let client = crate::store::client(&pool).await?;
            let problems = store::check_statements(&client, std::slice::from_ref(projection), true).await;
            if !problems.is_empty() {
                drop(client);
                let scratch = Scratch { server: url.to_string(), name, pool };
                scratch.drop().await;
                return Err(TestError::Fixture(problems.join("\n")));
            }
        }
        Ok(Scratch { server: url.to_string(), name, pool })
    }

    async fn drop(self) {
        self.pool.close();
        let _ = store::scratch::drop_database(&self.server, &self.name).await;
    }
}

/// The runs of one fixture.
async fn run_fixture(
    scratch: &Scratch,
    projection: &Projection,
    fixture: &Fixture,
    seed: u64,
) -> Result<FixtureResult, TestError> {
    let (keys, labels) = keys_of(projection, fixture);
    let written: Vec<usize> = (0..fixture.events.len()).collect();
    let mut runs: Vec<(String, Vec<usize>)> = vec![
        ("as written".into(), written.clone()),
        ("each event delivered twice".into(), written.iter().flat_map(|&i| [i, i]).collect()),
        ("the whole stream replayed over the built rows".into(), written.iter().chain(&written).copied().collect()),
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut seen: BTreeSet<Vec<usize>> = runs.iter().map(|(_, order)| order.clone()).collect();
    for i in 0..SHUFFLES {
        let order = interleaved(&keys, &mut rng);
        if seen.insert(order.clone()) {
            runs.push((format!("keys interleaved in another order (seed {seed}, #{})", i + 1), order));
        }
    }
    for i in 0..SHUFFLES {
        if let Some((key, order)) = out_of_order(&keys, &mut rng) {
            if seen.insert(order.clone()) {
                runs.push((format!("events of key `{key}` out of order (seed {seed}, #{})", i + 1), order));
            }
        }
    }
    let mut results = Vec::new();
    for (name, order) in runs {
        reset(scratch, projection, fixture).await?;
        let differences = match deliver(scratch, projection, fixture, &order).await {
            Ok(()) => compare(scratch, fixture).await?,
            Err(error) => vec![format!("the engine could not apply the events: {error}")],
        };
        results.push(RunResult { run: name, order: order.iter().map(|i| i + 1).collect(), differences });
    }
    Ok(FixtureResult {
        projection: projection.name.clone(),
        fixture: fixture.file.display().to_string(),
        description: fixture.description.clone(),
        runs: results,
        labels,
    })
}

/// Empties the projection's tables and its engine rows, as before its first event.
async fn reset(scratch: &Scratch, projection: &Projection, fixture: &Fixture) -> Result<(), TestError> {
    let client = crate::store::client(&scratch.pool).await?;
    let mut tables: BTreeSet<String> = projection.tables().into_iter().collect();
    tables.extend(fixture.expect.keys().cloned());
    store::scratch::reset_projection(&client, &projection.name, tables)
        .await
        .map_err(|error| TestError::Fixture(format!("{}: {}", fixture.file.display(), store::describe(&error))))?;
    Ok(())
}

/// Delivers the fixture's events in `order`, one record per event at the next offset of its
/// partition, in batches of one partition's consecutive records, as the engine's lanes apply
/// them: retried event by event when the engine asks, as `run` does.
async fn deliver(scratch: &Scratch, projection: &Projection, fixture: &Fixture, order: &[usize]) -> Result<(), String> {
    let topic = projection.topics.first().cloned().unwrap_or_default();
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    let records: Vec<Record> = order
        .iter()
        .map(|&i| {
            let event = &fixture.events[i];
            let offset = next.entry(event.partition).or_insert(0);
            *offset += 1;
            record_of(event, &topic, *offset - 1)
        })
        .collect();
    // As `projector run` applies them by default (`batch.set_based`).
    let applier = Applier::default();
    let mut start = 0;
    while start < records.len() {
        let partition = records[start].partition;
        let end = records[start..]
            .iter()
            .position(|record| record.partition != partition)
            .map_or(records.len(), |n| start + n);
        let chunk = &records[start..end];
        let from = if chunk[0].offset == 0 { None } else { Some(chunk[0].offset) };
        let batch = Batch {
            records: chunk,
            moves: vec![Move { partition: (topic.clone(), partition), from, to: chunk[chunk.len() - 1].offset + 1 }],
        };
        let mut client = scratch.pool.get().await.map_err(|error| error.to_string())?;
        let mut isolate = false;
        loop {
            match apply_batch(&mut client, &applier, projection, &batch, None, isolate).await {
                Ok(_) => break,
                Err(error) if error.handling() == Handling::Isolate && !isolate => isolate = true,
                Err(error) => return Err(error.to_string()),
            }
        }
        start = end;
    }
    Ok(())
}

/// What differs between the expected rows and the tables: row by row, matched on the first
/// column written, and column by column.
async fn compare(scratch: &Scratch, fixture: &Fixture) -> Result<Vec<String>, TestError> {
    let client = crate::store::client(&scratch.pool).await?;
    let mut differences = Vec::new();
    for (table, (columns, expected)) in &fixture.expect {
        let mut got: Vec<Row> = store::scratch::rows_as_text(&client, table, columns).await.map_err(|error| {
            TestError::Fixture(format!("{}: `{table}`: {}", fixture.file.display(), store::describe(&error)))
        })?;
        let mut expected = expected.clone();
        got.sort();
        expected.sort();
        if got == expected {
            continue;
        }
        let show = |value: &Option<String>| value.as_ref().map_or("NULL".to_string(), |text| format!("{text:?}"));
        let identity = |row: &Row| format!("{}={}", columns[0], show(&row[0]));
        let mut unmatched_got = got.clone();
        for row in &expected {
            if let Some(at) = unmatched_got.iter().position(|candidate| candidate == row) {
                unmatched_got.remove(at);
                continue;
            }
            match unmatched_got.iter().position(|candidate| candidate[0] == row[0]) {
                Some(at) => {
                    let other = unmatched_got.remove(at);
                    for (i, column) in columns.iter().enumerate().skip(1) {
                        if other[i] != row[i] {
                            differences.push(format!(
                                "`{table}` row {}: `{column}` expected {}, got {}",
                                identity(row),
                                show(&row[i]),
                                show(&other[i])
                            ));
                        }
                    }
                }
                None => differences.push(format!("`{table}`: missing row {}", describe_row(columns, row, &show))),
            }
        }
        for row in unmatched_got {
            differences.push(format!("`{table}`: unexpected row {}", describe_row(columns, &row, &show)));
        }
    }
    Ok(differences)
}

fn describe_row(columns: &[String], row: &[Option<String>], show: &dyn Fn(&Option<String>) -> String) -> String {
    let fields: Vec<String> =
        columns.iter().zip(row).map(|(column, value)| format!("{column}={}", show(value))).collect();
    format!("({})", fields.join(", "))
}
