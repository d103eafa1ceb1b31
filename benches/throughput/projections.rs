//! The bench's projections (`--projections`, `--dedupe`, `--keep-event-ids`): their names and
//! tables, their definitions compiled, the tables created, and each table's check.
//!
//! - `--dedupe version` (default): the example shop's `order_summary` plus one bench-only handler
//!   (`OrderNoted`), guarded by the row's version.
//! - `--dedupe event-id`: `order_events`, one row per order counting its events, deduplicated by
//!   event id (`projector.processed_events`), optionally with a `keep_event_ids` window.
//!
//! One projection keeps the base name (`order_summary`, `order_events`) for projection and table
//! alike; N > 1 are `<base>_1` … `<base>_N`, each with a table of its own shaped like the base's.

use std::path::Path;

use anyhow::{anyhow, bail};
use serde_json::{json, Value};
use tokio_postgres::Client;

use projector::projection::{compile_file, Projection};

use crate::db::{fill_existing, verify};
use crate::workload::{Workload, EVENT_TYPES};
use crate::Args;

/// How the bench projection recognises duplicates (`--dedupe`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dedupe {
    /// `order_summary`: every write guarded by the order's version.
    Version,
    /// `order_events`: every event id recorded in `projector.processed_events`.
    EventId,
}

impl Dedupe {
    /// The name of its single projection and table, and the prefix of several.
    pub fn base(self) -> &'static str {
        match self {
            Dedupe::Version => "order_summary",
            Dedupe::EventId => "order_events",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Dedupe::Version => "version",
            Dedupe::EventId => "event-id",
        }
    }
}

/// The bench's only addition to the example projection: an update that can repeat.
const NOTED_HANDLER: &str = "\n[on.OrderNoted]\nupdate = { note = \":data.note\", updated_at = \":occurred_at\" }\n";

/// The `order_events` table (created by [`crate::db::prepare_schema`]): events counted per order.
pub const ORDER_EVENTS_TABLE: &str = "CREATE TABLE IF NOT EXISTS order_events
    (order_id uuid PRIMARY KEY, events bigint NOT NULL DEFAULT 0, last_version bigint)";

/// One of the bench's projections: its name (also its table's), definition text and compiled form.
#[derive(Clone)]
pub struct BenchProjection {
    pub name: String,
    /// The definition file's text (written to the child engine's `projections/<name>.toml`).
    pub text: String,
    pub projection: Projection,
}

/// The names of the projections `args` asks for, which are also their tables'.
pub fn names(args: &Args) -> Vec<String> {
    let base = args.dedupe.base();
    match args.projections {
        1 => vec![base.to_string()],
        n => (1..=n).map(|i| format!("{base}_{i}")).collect(),
    }
}

/// The projections `args` asks for, on `topic`, compiled; each writes its own table only.
pub fn bench_projections(args: &Args, topic: &str) -> anyhow::Result<Vec<BenchProjection>> {
    names(args)
        .into_iter()
        .map(|name| {
            let text = match args.dedupe {
                Dedupe::Version => versioned_text(&name, topic)?,
                Dedupe::EventId => event_id_text(&name, topic, args.keep_event_ids.as_deref()),
            };
            let projection = compile_file(Path::new(&format!("bench/{name}.toml")), &text)
                .map_err(|errors| anyhow!(errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")))?;
            if projection.name != name || projection.tables() != [name.clone()] {
                bail!(
                    "the bench projection `{}` writes {:?}, not only `{name}`: update the bench",
                    projection.name,
                    projection.tables()
                );
            }
            Ok(BenchProjection { name, text, projection })
        })
        .collect()
}

/// The example `order_summary` projection on the bench topic, plus `OrderNoted`, renamed (with
/// its table) to `name`.
fn versioned_text(name: &str, topic: &str) -> anyhow::Result<String> {
    let original = include_str!("../../projections/order_summary.toml");
    let text = original.replace("topics = [\"shop.orders\"]", &format!("topics = [\"{topic}\"]"));
    if text == original {
        bail!("projections/order_summary.toml no longer has `topics = [\"shop.orders\"]`: update the bench");
    }
    Ok((text + NOTED_HANDLER).replace("order_summary", name))
}

/// `order_events` (named `name`): for each of the workload's event types one upsert counting the
/// event and keeping the highest version seen.
fn event_id_text(name: &str, topic: &str, keep_event_ids: Option<&str>) -> String {
    let mut text = format!(
        "# The bench's event-id projection: events counted per order, each id recorded.\n\
         name = \"{name}\"\ntopics = [\"{topic}\"]\ndedupe = \"event_id\"\n"
    );
    if let Some(keep) = keep_event_ids {
        text += &format!("keep_event_ids = \"{keep}\"\n");
    }
    for event_type in EVENT_TYPES {
        text += &format!(
            "\n[on.{event_type}]\nsql = \"\"\"\nINSERT INTO {name} (order_id, events, last_version) VALUES (:key, 1, :version)\n\
             ON CONFLICT (order_id) DO UPDATE SET events = {name}.events + 1,\n\
             \x20   last_version = GREATEST({name}.last_version, EXCLUDED.last_version)\n\"\"\"\n"
        );
    }
    text
}

/// Tables for projections 1 … N beside the base table (`prepare_schema` made it), shaped like it.
pub async fn create_tables(client: &Client, args: &Args) -> anyhow::Result<()> {
    let base = args.dedupe.base();
    for name in names(args).iter().filter(|name| *name != base) {
        client.batch_execute(&format!("CREATE TABLE {name} (LIKE {base} INCLUDING ALL)")).await?;
    }
    Ok(())
}

/// `--existing-rows` in every projection's table.
pub async fn fill_tables(client: &Client, args: &Args) -> anyhow::Result<()> {
    for name in names(args) {
        fill_existing(client, &name, args.existing_rows, args.dedupe == Dedupe::EventId).await?;
    }
    Ok(())
}

/// The check of projection `name`'s table against the workload, plus the `existing` rows it
/// started with: `{"check": …}`, and for `order_events` the duplicates applied again
/// (`reapplied_duplicates`).
pub async fn verify_table(
    client: &Client,
    args: &Args,
    name: &str,
    workload: &Workload,
    existing: usize,
) -> anyhow::Result<Value> {
    Ok(match args.dedupe {
        Dedupe::Version => {
            json!({ "check": verify(client, name, workload.entities, workload.version_sum(), existing).await? })
        }
        Dedupe::EventId => verify_counts(client, name, workload, args.keep_event_ids.is_some(), existing).await?,
    })
}

/// `order_events`: a row per entity, the highest versions summing to the streams' lengths, and
/// each entity's count its stream's length, so `sum(events)` the distinct events. With a window
/// (`windowed`) a duplicate whose original's id was pruned is applied again: the count may then
/// exceed the distinct events, by at most the duplicates published.
async fn verify_counts(
    client: &Client,
    table: &str,
    workload: &Workload,
    windowed: bool,
    existing: usize,
) -> anyhow::Result<Value> {
    let row = client
        .query_one(
            &format!(
                "SELECT count(*), coalesce(sum(events), 0)::int8, coalesce(sum(last_version), 0)::int8 FROM {table}"
            ),
            &[],
        )
        .await?;
    let (rows, events, last): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    // The existing rows count one event each, at version 1.
    let existing = existing as i64;
    let (entities, distinct, records) = (
        workload.entities as i64 + existing,
        workload.version_sum() + existing,
        workload.records.len() as i64 + existing,
    );
    let reapplied = events - distinct;
    let counted_ok = if windowed { (distinct..=records).contains(&events) } else { events == distinct };
    let check = if rows == entities && last == distinct && counted_ok {
        format!("ok ({rows} rows, events sum {events} = {distinct} distinct + {reapplied} duplicates applied again, last versions sum {last})")
    } else {
        let expected = if windowed { format!("{distinct} to {records}") } else { distinct.to_string() };
        format!(
            "MISMATCH: {rows} rows (expected {entities}), events sum {events} (expected {expected}), last versions sum {last} (expected {distinct})"
        )
    };
    Ok(json!({ "check": check, "reapplied_duplicates": reapplied }))
}

/// Every projection's check (`checks`, in the order of `names`) as one: the single projection's
/// own; for several, ok when all are.
pub fn combined_check(names: &[String], checks: &[Value]) -> String {
    let text = |check: &Value| check["check"].as_str().unwrap_or("").to_string();
    if let [only] = checks {
        return text(only);
    }
    let failed: Vec<String> = names
        .iter()
        .zip(checks)
        .filter(|(_, c)| !text(c).starts_with("ok"))
        .map(|(n, c)| format!("{n}: {}", text(c)))
        .collect();
    if !failed.is_empty() {
        return format!("MISMATCH in {} of {} tables: {}", failed.len(), checks.len(), failed.join("; "));
    }
    if checks.iter().all(|check| text(check) == text(&checks[0])) {
        let each = text(&checks[0]);
        let each = each.strip_prefix("ok (").and_then(|rest| rest.strip_suffix(')')).unwrap_or(&each);
        format!("ok ({} tables, each {each})", checks.len())
    } else {
        format!("ok ({} tables, each under `projections`)", checks.len())
    }
}
