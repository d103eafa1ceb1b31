//! Every record accounted for, whatever its bytes: a property over valid account histories
//! (interleaved across partitions, some events swapped, duplicated, the engine restarted
//! gracefully between phases) into which hostile records are mixed, every record with any Kafka
//! key (none, empty, binary, a few KB) and any headers (names and values any bytes: NUL,
//! not UTF-8). For every case:
//! - the read model equals the fold of the valid events, whatever keys and headers they came with;
//! - `projector_events_total` counts each outcome exactly as a model of the engine's rules says
//!   ([`model`]), and so every record published once, plus once more each held event that is
//!   later released: Σ outcomes = records published + released;
//! - `projector.dead_letters` holds exactly the hostile records that must be parked, by
//!   (partition, offset), with their key, value and headers as published; nothing stays held,
//!   every checkpoint reaches its partition's end.
//!
//! Hostile records are chosen so that their outcome is decided by the projection alone
//! ([`expect_of`]): a record the projection's own [`Projection::decode`] calls a tombstone or an
//! unhandled type is `ignored`; one it cannot decode is `parked`, and so is an event whose entity
//! key holds a NUL (Postgres text cannot hold it). Any other hostile value that decodes as an
//! event of the projection is left out (it is a valid event, whose effect depends on the read
//! model), and so is a hostile record parked under the key of a valid account (the engine would
//! park that account's later events behind it: `tests/faults/parking.rs` covers that).
//! Hostile records are built from events of accounts `x-…`, which valid histories never use.
//!
//! Every case runs a real engine on a mock cluster and a database shared with other cases: its
//! own topic, and its own projection and table (`acc_<n>`, dropped after the case). CI runs
//! a few cases (`PROPTEST_CASES` overrides); `scripts/soak.sh` runs thousands in release mode.
//! A failing case's seed is saved in `tests/faults/bytes.proptest-regressions`, and replayed
//! first by later runs.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use projector::kafka::mock::MockKafka;
use projector::outcome::Outcome;
use projector::projection::{Decoded, Projection, Record};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};
use rdkafka::producer::FutureProducer;
use tokio_postgres::Client;

use crate::common::{self, Engine, TestDb};
use crate::raw::{self, Raw};

/// Cases run by default (CI); `PROPTEST_CASES` overrides.
const DEFAULT_CASES: u32 = 12;

/// A Kafka key and headers, any bytes: what a record is published with besides its value.
#[derive(Debug, Clone)]
struct Dress {
    key: Option<Vec<u8>>,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
}

#[derive(Debug, Clone)]
struct AccountSpec {
    /// The amount `Opened` starts with, and how its record is dressed.
    opened: (i64, Dress),
    /// Each `Deposited` (versions 2, 3, …): its amount and dress.
    deposits: Vec<(i64, Dress)>,
    /// The partition every record of the account goes to (its events stay in order there, so
    /// that each one's outcome is decided by the order published).
    partition: Index,
    /// Adjacent events published the other way round (later version first: a gap).
    swaps: Vec<Index>,
}

/// A hostile record and what must become of it.
#[derive(Debug, Clone)]
struct Hostile {
    raw: Raw,
    expect: Expect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Parked,
    Ignored,
}

#[derive(Debug, Clone)]
struct Scenario {
    accounts: Vec<AccountSpec>,
    /// Picks, at each step, which account publishes its next event.
    interleaving: Vec<Index>,
    /// (valid record to copy, how far after it the copy goes): a producer's retry.
    duplicates: Vec<(Index, Index)>,
    /// (record, where it goes among the others, its partition).
    hostile: Vec<(Hostile, Index, Index)>,
    /// Where the engine is stopped gracefully and started again, and how long after the records
    /// before the cut were published.
    restarts: Vec<(Index, u64)>,
    partitions: i32,
    max_events: usize,
}

/// Bytes, some of them the ones text and JSON care about: NUL, quotes, backslashes, braces, bytes
/// that are not UTF-8 alone.
fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    let special = prop::sample::select(vec![0u8, b'"', b'\\', b'{', b'}', b':', b'a', 0x7f, 0x80, 0xc3, 0xff]);
    prop_oneof![prop::collection::vec(any::<u8>(), 0..=max), prop::collection::vec(special, 0..=max)]
}

fn kafka_key() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        2 => Just(None),
        1 => Just(Some(Vec::new())),
        4 => bytes(16).prop_map(Some),
        1 => prop::collection::vec(any::<u8>(), 1000..=4000).prop_map(Some),
    ]
}

fn dress() -> impl Strategy<Value = Dress> {
    (kafka_key(), prop::collection::vec((bytes(12), bytes(24)), 0..=4))
        .prop_map(|(key, headers)| Dress { key, headers })
}

fn account() -> impl Strategy<Value = AccountSpec> {
    (
        (0i64..1000, dress()),
        prop::collection::vec((1i64..1000, dress()), 0..=6),
        any::<Index>(),
        prop::collection::vec(any::<Index>(), 0..=1),
    )
        .prop_map(|(opened, deposits, partition, swaps)| AccountSpec { opened, deposits, partition, swaps })
}

/// Values put in place of one field of a valid event: each makes it poison (or an unhandled type,
/// or an entity key with a NUL), unless byte edits mend it.
const REPLACEMENTS: &[(usize, &str)] = &[
    (TYPE, r#""Closed""#),
    (TYPE, r#""""#),
    (TYPE, r#""Opened\u0000""#),
    (TYPE, "7"),
    (TYPE, "null"),
    (STREAM_ID, r#""\u0000""#),
    (STREAM_ID, r#""x-0\u0000""#),
    (STREAM_ID, r#""\ud800""#),
    (STREAM_ID, "null"),
    (STREAM_ID, "{}"),
    (STREAM_ID, "true"),
    (STREAM_VERSION, "-1"),
    (STREAM_VERSION, "1.5"),
    (STREAM_VERSION, "1e400"),
    (STREAM_VERSION, "9223372036854775808"),
    (STREAM_VERSION, r#""3""#),
    (STREAM_VERSION, "null"),
    (STREAM_VERSION, "[]"),
    (OCCURRED_AT, r#""yesterday""#),
    (OCCURRED_AT, "7"),
];

/// The fields of an event, by place.
const TYPE: usize = 0;
const STREAM_ID: usize = 2;
const STREAM_VERSION: usize = 3;
const OCCURRED_AT: usize = 4;

/// A byte-level change to a value.
#[derive(Debug, Clone)]
enum Edit {
    Set(Index, u8),
    Delete(Index, usize),
    Insert(Index, Vec<u8>),
    Truncate(Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<Index>(), any::<u8>()).prop_map(|(at, byte)| Edit::Set(at, byte)),
        (any::<Index>(), 1usize..8).prop_map(|(at, length)| Edit::Delete(at, length)),
        (any::<Index>(), bytes(4)).prop_map(|(at, inserted)| Edit::Insert(at, inserted)),
        any::<Index>().prop_map(Edit::Truncate),
    ]
}

fn apply_edit(value: &mut Vec<u8>, edit: &Edit) {
    match edit {
        Edit::Set(at, byte) if !value.is_empty() => {
            let at = at.index(value.len());
            value[at] = *byte;
        }
        Edit::Delete(at, length) if !value.is_empty() => {
            let at = at.index(value.len());
            value.drain(at..(at + length).min(value.len()));
        }
        Edit::Insert(at, inserted) => {
            let at = at.index(value.len() + 1);
            value.splice(at..at, inserted.iter().copied());
        }
        Edit::Truncate(at) => value.truncate(at.index(value.len() + 1)),
        _ => {}
    }
}

/// An event of account `x-<account>` with a field replaced ([`REPLACEMENTS`]), edited byte by
/// byte, or both.
fn near_json() -> impl Strategy<Value = Vec<u8>> {
    let replacement = prop::sample::select(REPLACEMENTS);
    let changes = prop_oneof![
        2 => replacement.clone().prop_map(|replaced| (Some(replaced), Vec::new())),
        1 => prop::collection::vec(edit(), 1..=3).prop_map(|edits| (None, edits)),
        1 => (replacement, prop::collection::vec(edit(), 1..=2)).prop_map(|(replaced, edits)| (Some(replaced), edits)),
    ];
    (0u8..3, 1i64..5, any::<bool>(), changes).prop_map(|(account, version, opened, (replaced, edits))| {
        let (event_type, data) = match opened {
            true => ("\"Opened\"", format!(r#"{{"owner":"o","amount":{version}}}"#)),
            false => ("\"Deposited\"", format!(r#"{{"amount":{version},"note":"n"}}"#)),
        };
        let mut fields = [
            ("type", event_type.to_string()),
            ("id", "\"hostile\"".to_string()),
            ("stream_id", format!("\"x-{account}\"")),
            ("stream_version", version.to_string()),
            ("occurred_at", "\"2026-11-27T12:00:00Z\"".to_string()),
            ("data", data),
        ];
        if let Some((field, value)) = replaced {
            fields[field].1 = value.to_string();
        }
        let body: Vec<String> = fields.iter().map(|(name, value)| format!("\"{name}\":{value}")).collect();
        let mut value = format!("{{{}}}", body.join(",")).into_bytes();
        for edit in &edits {
            apply_edit(&mut value, edit);
        }
        value
    })
}

fn hostile() -> impl Strategy<Value = Hostile> {
    let value = prop_oneof![
        1 => Just(None),
        1 => Just(Some(Vec::new())),
        3 => bytes(64).prop_map(Some),
        6 => near_json().prop_map(Some),
    ];
    (value, dress()).prop_filter_map("a valid event, or parked under a valid account's key", |(value, dress)| {
        let raw = Raw { key: dress.key, value, headers: dress.headers };
        expect_of(&raw).map(|expect| Hostile { raw, expect })
    })
}

prop_compose! {
    fn scenario()(
        accounts in prop::collection::vec(account(), 1..=4),
        interleaving in prop::collection::vec(any::<Index>(), 32),
        duplicates in prop::collection::vec((any::<Index>(), any::<Index>()), 0..=6),
        hostile in prop::collection::vec((hostile(), any::<Index>(), any::<Index>()), 0..=8),
        restarts in prop_oneof![
            2 => Just(Vec::new()),
            2 => prop::collection::vec((any::<Index>(), 0u64..50), 1),
            1 => prop::collection::vec((any::<Index>(), 0u64..50), 2),
        ],
        partitions in 1i32..=3,
        max_events in 1usize..=16,
    ) -> Scenario {
        Scenario { accounts, interleaving, duplicates, hostile, restarts, partitions, max_events }
    }
}

/// The projection's definition, to decide what hostile records are (its name, table and topic do
/// not matter to decoding).
static REFERENCE: LazyLock<Projection> = LazyLock::new(|| raw::accounts_named("reference", "reference", false));

/// The valid accounts' ids: a hostile record is never parked under one of them.
fn account_id(account: usize) -> String {
    format!("acct-{account}")
}

/// `raw` as the consumer hands it to the engine: a header name ends at its first NUL (librdkafka
/// keeps names as C strings).
fn as_consumed(raw: &Raw) -> Record {
    Record {
        topic: "t".into(),
        partition: 0,
        offset: 0,
        key: raw.key.clone(),
        value: raw.value.clone(),
        headers: raw.headers.iter().map(|(name, value)| (consumed_name(name), Some(value.clone()))).collect(),
        timestamp_ms: None,
    }
}

fn consumed_name(name: &[u8]) -> Vec<u8> {
    name.iter().copied().take_while(|byte| *byte != 0).collect()
}

/// What must become of a hostile record, decided by the projection's own decoding; `None` for
/// the records left out (see the module's doc).
fn expect_of(raw: &Raw) -> Option<Expect> {
    let record = as_consumed(raw);
    let decoded = REFERENCE.decode(&record);
    let expect = match &decoded {
        Decoded::Tombstone | Decoded::Ignored { .. } => return Some(Expect::Ignored),
        Decoded::Poison { .. } => Expect::Parked,
        Decoded::Handled { event, .. } if event.key.as_deref().is_some_and(|key| key.contains('\0')) => Expect::Parked,
        Decoded::Handled { .. } => return None,
    };
    let key = REFERENCE.parking_key(&record, &decoded);
    let blocks_a_valid_account = key.is_some_and(|key| key.starts_with("acct-"));
    (!blocks_a_valid_account).then_some(expect)
}

/// A record to publish and what it is.
#[derive(Debug, Clone)]
struct Planned {
    raw: Raw,
    partition: i32,
    kind: Kind,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Valid { account: usize, version: i64 },
    Hostile(Expect),
}

/// The records of a case in the order published: the accounts' events interleaved (each account's
/// in its order, but for its swaps), copies of some after their originals, hostile records
/// anywhere.
fn plan(scenario: &Scenario) -> Vec<Planned> {
    let streams: Vec<Vec<Planned>> = scenario
        .accounts
        .iter()
        .enumerate()
        .map(|(account, spec)| {
            let id = account_id(account);
            let partition = spec.partition.index(scenario.partitions as usize) as i32;
            let valid = |version: i64, value: serde_json::Value, dress: &Dress| Planned {
                raw: Raw { key: dress.key.clone(), headers: dress.headers.clone(), ..Raw::json(&value) },
                partition,
                kind: Kind::Valid { account, version },
            };
            let (amount, dress) = &spec.opened;
            let mut stream = vec![valid(1, raw::opened(&id, *amount), dress)];
            for (version, (amount, dress)) in (2..).zip(&spec.deposits) {
                stream.push(valid(version, raw::deposited(&id, version, *amount), dress));
            }
            for swap in &spec.swaps {
                if stream.len() >= 2 {
                    let at = swap.index(stream.len() - 1);
                    stream.swap(at, at + 1);
                }
            }
            stream
        })
        .collect();
    let mut records = common::model::interleave(&streams, &scenario.interleaving);
    common::model::insert_copies(&mut records, &scenario.duplicates);
    for (hostile, at, partition) in &scenario.hostile {
        let planned = Planned {
            raw: hostile.raw.clone(),
            partition: partition.index(scenario.partitions as usize) as i32,
            kind: Kind::Hostile(hostile.expect),
        };
        records.insert(at.index(records.len() + 1), planned);
    }
    records
}

/// Outcomes counted, by outcome.
type Counts = BTreeMap<Outcome, u64>;

/// What the engine must count, by its rules for a versioned projection (`store::apply`), record
/// by record in the order published (each account's records are in one partition, so that order
/// is the order the engine sees them in): an event of version v is `applied` on top of v - 1,
/// a `duplicate` when the row is at v or past it, else a `gap`, held (once per version). An
/// event applied releases the account's held events that follow on, each counted `applied`
/// again (its `gap` was counted when it arrived); a held one the row has reached meanwhile is
/// dropped uncounted. Returns the counts and how many held events were released.
fn model(planned: &[Planned], accounts: usize) -> (Counts, u64) {
    let mut counts: Counts = Outcome::ALL.iter().map(|outcome| (*outcome, 0)).collect();
    let mut released = 0;
    let mut rows = vec![0i64; accounts];
    let mut held = vec![BTreeSet::new(); accounts];
    for record in planned {
        let outcome = match record.kind {
            Kind::Hostile(Expect::Parked) => Outcome::Parked,
            Kind::Hostile(Expect::Ignored) => Outcome::Ignored,
            Kind::Valid { account, version } if rows[account] >= version => Outcome::Duplicate,
            Kind::Valid { account, version } if rows[account] == version - 1 => {
                rows[account] = version;
                while let Some(next) = held[account].pop_first() {
                    if next > rows[account] + 1 {
                        held[account].insert(next);
                        break;
                    }
                    if next == rows[account] + 1 {
                        rows[account] = next;
                        released += 1;
                        *counts.entry(Outcome::Applied).or_default() += 1;
                    }
                }
                Outcome::Applied
            }
            Kind::Valid { account, version } => {
                held[account].insert(version);
                Outcome::Gap
            }
        };
        *counts.entry(outcome).or_default() += 1;
    }
    (counts, released)
}

/// An account's row: id, version, owner, balance (as text), note.
type Row = (String, i64, String, String, Option<String>);

/// The accounts' rows the valid events fold to.
fn fold(scenario: &Scenario) -> Vec<Row> {
    let mut rows: Vec<Row> = scenario
        .accounts
        .iter()
        .enumerate()
        .map(|(account, spec)| {
            let id = account_id(account);
            let version = 1 + spec.deposits.len() as i64;
            let balance = spec.opened.0 + spec.deposits.iter().map(|(amount, _)| amount).sum::<i64>();
            let note = (version > 1).then(|| format!("deposit {version}"));
            (id.clone(), version, format!("owner of {id}"), balance.to_string(), note)
        })
        .collect();
    rows.sort();
    rows
}

/// A parked record as `projector.dead_letters` keeps it: partition, offset, key, value, header
/// names, header values.
type Parked = (i32, i64, Option<Vec<u8>>, Option<Vec<u8>>, Vec<Vec<u8>>, Vec<Option<Vec<u8>>>);

/// Publishes `records` (each to its partition) and returns where each landed.
async fn publish(producer: &FutureProducer, topic: &str, records: &[Planned]) -> Vec<(i32, i64)> {
    let deliveries: Vec<_> = records
        .iter()
        .map(|record| {
            producer
                .send_result(record.raw.to_send(topic, Some(record.partition)))
                .map_err(|(error, _)| error)
                .expect("queueing a record")
        })
        .collect();
    let mut landed = Vec::with_capacity(records.len());
    for delivery in deliveries {
        let delivery = delivery.await.expect("a delivery report").map_err(|(error, _)| error).expect("publishing");
        landed.push((delivery.partition, delivery.offset));
    }
    landed
}

/// Waits until the projection's checkpoints reach `ends` (partition to end offset).
async fn wait_checkpoints(client: &Client, projection: &str, ends: &BTreeMap<i32, i64>) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows = client
            .query("SELECT partition, next_offset FROM projector.checkpoints WHERE projection = $1", &[&projection])
            .await
            .expect("reading checkpoints");
        let stored: BTreeMap<i32, i64> = rows.iter().map(|row| (row.get(0), row.get(1))).collect();
        if ends.iter().all(|(partition, end)| stored.get(partition).is_some_and(|next| next >= end)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("checkpoints {stored:?} did not reach {ends:?} within 30 s"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Bytes as escaped text, shortened; `none` when absent.
fn shown(bytes: Option<&[u8]>) -> String {
    match bytes {
        None => "none".into(),
        Some(bytes) if bytes.len() > 120 => format!("{} bytes: \"{}…\"", bytes.len(), bytes[..120].escape_ascii()),
        Some(bytes) => format!("\"{}\"", bytes.escape_ascii()),
    }
}

/// A record as one line of text: where it landed, key, value and headers.
fn record_text<'a>(
    (partition, offset): (i32, i64),
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)>,
) -> String {
    let headers: Vec<String> =
        headers.map(|(name, value)| format!("\"{}\"={}", name.escape_ascii(), shown(value))).collect();
    format!("{partition}@{offset} key {} value {} headers [{}]", shown(key), shown(value), headers.join(", "))
}

/// A dead letter as one line of text, for comparisons that show what differs.
fn parked_text((partition, offset, key, value, names, values): &Parked) -> String {
    let headers = names.iter().map(Vec::as_slice).zip(values.iter().map(Option::as_deref));
    record_text((*partition, *offset), key.as_deref(), value.as_deref(), headers)
}

/// The records of a case, one a line, for a failure's message.
fn describe(planned: &[Planned], landed: &[(i32, i64)]) -> String {
    let mut text = String::new();
    for (record, at) in planned.iter().zip(landed) {
        let Raw { key, value, headers } = &record.raw;
        let headers = headers.iter().map(|(name, value)| (name.as_slice(), Some(value.as_slice())));
        let _ = writeln!(text, "  {:?} {}", record.kind, record_text(*at, key.as_deref(), value.as_deref(), headers));
    }
    text
}

/// Cases run on one mock cluster before the next cases get a new one: the mock cluster keeps a
/// timer for every consumer group ever joined, and each timer's rescheduling scans them all, so
/// that thousands of groups (two a case) slow it down more and more.
const CASES_PER_CLUSTER: u64 = 500;

/// A mock cluster and a producer to it (dropped first).
struct Cluster {
    producer: FutureProducer,
    kafka: MockKafka,
}

impl Cluster {
    fn start() -> Arc<Cluster> {
        let kafka = MockKafka::start(1).expect("mock kafka");
        Arc::new(Cluster { producer: raw::producer(&kafka.bootstrap_servers()), kafka })
    }
}

/// What the cases share: a mock cluster (the one current, and the cases started on it), a
/// database.
struct Shared {
    cluster: Mutex<(Arc<Cluster>, u64)>,
    client: Client,
    db: TestDb,
}

impl Shared {
    /// The cluster for a case to run on: a new one every [`CASES_PER_CLUSTER`] cases. The last
    /// case done with a cluster drops it.
    fn cluster(&self) -> Arc<Cluster> {
        let mut current = self.cluster.lock().expect("the current cluster");
        if current.1 == CASES_PER_CLUSTER {
            *current = (Cluster::start(), 0);
        }
        current.1 += 1;
        current.0.clone()
    }
}

/// What the cases did, for the summary.
#[derive(Debug, Default)]
struct Tally {
    /// Cases started, shrinking included.
    cases: u64,
    /// Cases ended.
    ended: u64,
    /// The runner whose case failed first, and how many cases had run by then; that runner's
    /// runs after it shrink it, the other runners stop.
    failed: Option<(usize, u64)>,
    records: u64,
    hostile: u64,
    restarts: u64,
    /// Outcomes counted over every case.
    counts: Counts,
    released: u64,
}

async fn run_case(shared: &Shared, scenario: &Scenario, tally: &Mutex<Tally>) -> Result<(), TestCaseError> {
    let planned = plan(scenario);
    let (expected, released) = model(&planned, scenario.accounts.len());
    let name = {
        let mut tally = tally.lock().expect("tally");
        tally.cases += 1;
        format!("acc_{}", tally.cases)
    };
    let cluster = shared.cluster();
    let topic = common::new_topic(&cluster.kafka, scenario.partitions);
    shared.client.batch_execute(&raw::accounts_table(&name)).await.expect("creating the case's table");
    let projections = vec![raw::accounts_named(&name, &topic, false)];
    let mut settings = common::settings(&cluster.kafka, &shared.db.url, scenario.max_events, true);
    // Each engine joins a consumer group of its own: the mock cluster's coordinator can take a
    // second to let a member into a group another one just left. The checkpoints are the
    // engine's, in Postgres: an engine in a new group resumes where the last one stopped.
    let mut start = || {
        settings.kafka.group_prefix = common::unique("group");
        Engine::start(&settings, &projections)
    };

    let mut cuts: Vec<(usize, u64)> =
        scenario.restarts.iter().map(|(at, pause)| (at.index(planned.len() + 1), *pause)).collect();
    cuts.sort();
    let mut counts: Counts = Counts::new();
    let mut count = |metrics: projector::metrics::Metrics| {
        for outcome in Outcome::ALL {
            *counts.entry(outcome).or_default() += metrics.outcome_count(&name, outcome);
        }
    };
    let mut landed = Vec::with_capacity(planned.len());
    let mut engine = start();
    let mut from = 0;
    for (to, pause) in &cuts {
        landed.extend(publish(&cluster.producer, &topic, &planned[from..*to]).await);
        from = *to;
        tokio::time::sleep(Duration::from_millis(*pause)).await;
        count(engine.stop().await);
        engine = start();
    }
    landed.extend(publish(&cluster.producer, &topic, &planned[from..]).await);
    let mut ends = BTreeMap::new();
    for (partition, offset) in &landed {
        let end = ends.entry(*partition).or_insert(0);
        *end = (*end).max(offset + 1);
    }
    let caught_up = wait_checkpoints(&shared.client, &name, &ends).await;
    count(engine.stop().await);

    let client = &shared.client;
    let rows: Vec<Row> = client
        .query(&format!("SELECT id, version, owner, balance::text, note FROM {name} ORDER BY id"), &[])
        .await
        .expect("reading the accounts")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4)))
        .collect();
    let parked: Vec<Parked> = client
        .query(
            "SELECT partition, \"offset\", record_key, record_value, header_names, header_values
               FROM projector.dead_letters WHERE projection = $1 ORDER BY partition, \"offset\"",
            &[&name],
        )
        .await
        .expect("reading dead letters")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4), row.get(5)))
        .collect();
    let held = client
        .query_one("SELECT count(*) FROM projector.held_events WHERE projection = $1", &[&name])
        .await
        .expect("counting held events")
        .get::<_, i64>(0);
    client.batch_execute(&format!("DROP TABLE {name}")).await.expect("dropping the case's table");

    let mut expected_parked: Vec<Parked> = planned
        .iter()
        .zip(&landed)
        .filter(|(record, _)| matches!(record.kind, Kind::Hostile(Expect::Parked)))
        .map(|(record, (partition, offset))| {
            let consumed = as_consumed(&record.raw);
            let (names, values) = consumed.headers.into_iter().unzip();
            (*partition, *offset, consumed.key, consumed.value, names, values)
        })
        .collect();
    expected_parked.sort_by_key(|parked| (parked.0, parked.1));
    {
        let mut tally = tally.lock().expect("tally");
        tally.records += planned.len() as u64;
        tally.hostile += scenario.hostile.len() as u64;
        tally.restarts += cuts.len() as u64;
        tally.released += released;
        for (outcome, count) in &counts {
            *tally.counts.entry(*outcome).or_default() += count;
        }
    }

    let records = || describe(&planned, &landed);
    if let Err(stalled) = caught_up {
        return Err(TestCaseError::fail(format!("{stalled}; counted {counts:?}; records:\n{}", records())));
    }
    prop_assert_eq!(&rows, &fold(scenario), "the read model is the fold of the valid events; records:\n{}", records());
    prop_assert_eq!(&counts, &expected, "outcomes counted; records:\n{}", records());
    let distinct: u64 = scenario.accounts.iter().map(|spec| 1 + spec.deposits.len() as u64).sum();
    prop_assert_eq!(expected[&Outcome::Applied], distinct, "the model applies each valid event once");
    // Each record is counted once when it arrives; a held event released later is counted again,
    // as `applied` (its `gap` was counted when it arrived).
    let total: u64 = counts.values().sum();
    prop_assert_eq!(total, planned.len() as u64 + released, "Σ outcomes = records published + released");
    prop_assert_eq!(parked.len() as u64, counts[&Outcome::Parked], "a dead letter per parked outcome");
    let where_parked = |rows: &[Parked]| rows.iter().map(|row| (row.0, row.1)).collect::<Vec<_>>();
    prop_assert_eq!(
        where_parked(&parked),
        where_parked(&expected_parked),
        "dead letters by (partition, offset); records:\n{}",
        records()
    );
    let as_text = |rows: &[Parked]| rows.iter().map(parked_text).collect::<Vec<_>>();
    prop_assert_eq!(as_text(&parked), as_text(&expected_parked), "dead letters keep the records as published");
    prop_assert_eq!(held, 0, "no event left held");
    Ok(())
}

/// `name` from the environment, else `default`.
fn from_env(name: &str, default: u32) -> u32 {
    std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default)
}

/// Runs `cases` cases on `runners` proptest runners at once (`BYTES_RUNNERS`, default 4), each on
/// a thread of its own with cases of its own: a case mostly waits (for a consumer group, a batch,
/// a shutdown), so that several keep the machine busy. A runner whose case fails shrinks it; the
/// others stop.
#[test]
fn every_record_of_any_bytes_is_counted_once_and_the_valid_ones_fold() {
    common::init_tracing();
    let cases = from_env("PROPTEST_CASES", DEFAULT_CASES);
    let runners = from_env("BYTES_RUNNERS", 4).clamp(1, cases.max(1)) as usize;
    let config = Config {
        max_shrink_iters: 32,
        // Hostile records that are valid events are drawn again (see `hostile`).
        max_local_rejects: u32::MAX,
        source_file: Some(file!()),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        ..Config::default()
    };
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    let shared = runtime.block_on(async {
        let db = TestDb::create().await;
        projector::store::migrate_with(
            &db.url,
            &projector::demo::example_projections().expect("the example projections"),
        )
        .await
        .expect("migrating the database");
        let client = db.connect().await;
        Shared { cluster: Mutex::new((Cluster::start(), 0)), client, db }
    });
    let tally = Mutex::new(Tally::default());
    let started = Instant::now();
    let results: Vec<Result<(), String>> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..runners)
            .map(|runner| {
                let config = Config {
                    cases: cases / runners as u32 + u32::from(runner < cases as usize % runners),
                    ..config.clone()
                };
                let (runtime, shared, tally) = (&runtime, &shared, &tally);
                scope.spawn(move || {
                    TestRunner::new(config)
                        .run(&scenario(), |scenario| {
                            if tally.lock().expect("tally").failed.is_some_and(|(failing, _)| failing != runner) {
                                return Ok(());
                            }
                            let outcome = runtime.block_on(run_case(shared, &scenario, tally));
                            let mut tally = tally.lock().expect("tally");
                            tally.ended += 1;
                            if outcome.is_err() && tally.failed.is_none() {
                                tally.failed = Some((runner, tally.ended));
                            }
                            if tally.ended % 100 == 0 {
                                println!("bytes: {} cases in {:.0} s", tally.ended, started.elapsed().as_secs_f64());
                            }
                            outcome
                        })
                        .map_err(|error| error.to_string())
                })
            })
            .collect();
        threads.into_iter().map(|thread| thread.join().expect("a runner thread")).collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let tally = tally.into_inner().expect("tally");
    if let Some((_, failed)) = tally.failed {
        println!("bytes: a case failed after {failed} cases; {} more runs shrank it", tally.ended - failed);
    }
    println!(
        "bytes: {} cases run in {elapsed:.1} s on {runners} runners ({:.0} ms a case): {} records ({} hostile), \
         {} restarts, outcomes {:?}, {} held events released",
        tally.cases,
        1000.0 * elapsed / tally.cases.max(1) as f64,
        tally.records,
        tally.hostile,
        tally.restarts,
        tally.counts.iter().map(|(outcome, count)| (outcome.as_str(), *count)).collect::<Vec<_>>(),
        tally.released
    );
    let Shared { cluster, client, db } = shared;
    drop((cluster, client));
    runtime.block_on(db.drop());
    // Without waiting for the lag samplers' Kafka clients that stopped engines left closing on
    // blocking threads, with no broker left to answer them.
    runtime.shutdown_background();
    if let Some(error) = results.into_iter().find_map(Result::err) {
        panic!("{error}");
    }
}
