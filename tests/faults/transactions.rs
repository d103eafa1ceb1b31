//! Transactional topics: records of committed transactions are applied, those of aborted ones
//! never; checkpoints, lag and rebuilds pass the transaction markers and aborted records (one
//! offset each, never delivered to a consumer).
//!
//! librdkafka's mock broker takes transactional producers (InitProducerId, AddPartitionsToTxn,
//! EndTxn all answer) but its EndTxn only checks the producer and answers: no marker is written,
//! so a transaction leaves its records at consecutive offsets and nothing after them. Its Fetch
//! responses list no aborted transactions and give the high watermark as the last stable offset,
//! so a `read_committed` consumer gets the records of an aborted transaction as if committed.
//! Both are made good here ([`crate::wire`]):
//! - the markers are written by hand: transactional record batches, then a control batch holding
//!   the commit or abort marker, which the mock stores as given and serves like any batch.
//!   librdkafka skips control batches, so the consumer's position moves past a marker with nothing
//!   delivered, as from a real broker;
//! - for aborts, a proxy in front of the broker adds the aborted transactions to its Fetch
//!   responses, as Kafka lists them from its transaction index; librdkafka then drops their
//!   records.
//!
//! Not shown here: a transaction still open. Kafka holds a `read_committed` consumer (and the end
//! offset it sees) back at the transaction's first offset until it ends; the mock's last stable
//! offset is always its high watermark.

use std::ops::Range;
use std::time::Duration;

use projector::lag::{KafkaProbe, PartitionLag, Target};
use projector::metrics::Metrics;
use projector::outcome::Outcome;
use projector::projection::Projection;
use projector::rebuild::RebuildArgs;
use projector::settings::Settings;
use tokio_postgres::Client;

use crate::common::{self, Engine};
use crate::raw::{self, account, deposited, opened, Raw};
use crate::wire::{self, Transaction};

/// The transactional producer's id.
const PRODUCER: i64 = 1000;

/// What [`write_log`] wrote, by offset.
#[derive(Debug)]
struct Log {
    markers: Vec<i64>,
    end: i64,
}

/// Two committed transactions with a plain record between them, the log ending in a marker:
///
/// | offsets | what |
/// | --- | --- |
/// | 0..3 | transaction: `t-1` and `t-2` opened (10, 20), `t-1` +5 |
/// | 3 | commit marker |
/// | 4 | plain: `t-3` opened (30) |
/// | 5..7 | transaction: `t-2` +1, `t-3` +2 |
/// | 7 | commit marker |
async fn write_log(settings: &Settings, topic: &str) -> Log {
    let bootstrap = settings.kafka.bootstrap_servers.as_str();
    let mut txn = Transaction::new(bootstrap, topic, 0, PRODUCER);
    let json = |events: &[serde_json::Value]| events.iter().map(Raw::json).collect::<Vec<_>>();
    assert_eq!(txn.send(&json(&[opened("t-1", 10), opened("t-2", 20), deposited("t-1", 2, 5)])).await, 0..3);
    let first = txn.end(true).await;
    assert_eq!(wire::send_plain(bootstrap, topic, 0, &json(&[opened("t-3", 30)])).await, 4..5);
    assert_eq!(txn.send(&json(&[deposited("t-2", 2, 1), deposited("t-3", 2, 2)])).await, 5..7);
    let second = txn.end(true).await;
    let log = Log { markers: vec![first, second], end: second + 1 };
    assert_eq!(log.markers, vec![3, 7], "one offset per record and per marker");
    let high = projector::kafka::watermarks(&settings.kafka, &[topic.to_string()], Duration::from_secs(5))
        .expect("watermarks")[&(topic.to_string(), 0)]
        .1;
    assert_eq!(high, log.end, "the marker ends the log");
    log
}

/// `(id, version, balance)` of every account of `table`, by id.
async fn accounts_in(client: &Client, table: &str) -> Vec<(String, i64, String)> {
    client
        .query(&format!("SELECT id, version, balance::text FROM {table} ORDER BY id"), &[])
        .await
        .unwrap_or_else(|error| panic!("reading `{table}`: {error}"))
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect()
}

fn rows(expected: &[(&str, i64, &str)]) -> Vec<(String, i64, String)> {
    expected.iter().map(|(id, version, balance)| (id.to_string(), *version, balance.to_string())).collect()
}

/// The fold of the whole log.
fn all_applied() -> Vec<(String, i64, String)> {
    rows(&[("t-1", 2, "15"), ("t-2", 2, "21"), ("t-3", 2, "32")])
}

async fn checkpoint(client: &Client, projection: &str) -> i64 {
    client
        .query_one("SELECT next_offset FROM projector.checkpoints WHERE projection = $1", &[&projection])
        .await
        .unwrap_or_else(|error| panic!("the checkpoint of `{projection}`: {error}"))
        .get(0)
}

/// The value of the series `name` of `accounts` on partition 0 of `topic` (the live one, for lag),
/// if there is one yet.
fn gauge(metrics: &Metrics, name: &str, topic: &str) -> Option<f64> {
    let wanted = [("mode", "live"), ("partition", "0"), ("projection", "accounts"), ("topic", topic)];
    let family = metrics.registry.gather().into_iter().find(|family| family.name() == name)?;
    family
        .get_metric()
        .iter()
        .find(|metric| {
            metric.get_label().iter().all(|label| wanted.iter().any(|(n, v)| label.name() == *n && label.value() == *v))
        })
        .map(|metric| metric.get_gauge().value())
}

/// Waits until the lag sampler has seen partition 0 of `topic` end at `end` with the checkpoint
/// there, and measured a lag of 0 messages.
async fn wait_for_no_lag(metrics: &Metrics, topic: &str, end: i64) {
    let sampled = || {
        ["projector_log_end_offset", "projector_checkpoint_offset", "projector_consumer_lag_messages"]
            .map(|name| gauge(metrics, name, topic))
    };
    let end = Some(end as f64);
    common::wait_for("a sampled lag of 0 at the end", Duration::from_secs(30), || async {
        sampled() == [end, end, Some(0.0)]
    })
    .await;
}

/// The lag of partition 0 as measured with the checkpoint of `accounts` moved to `offset`.
async fn lag_at(client: &Client, settings: &Settings, projections: &[Projection], offset: i64) -> PartitionLag {
    client
        .execute("UPDATE projector.checkpoints SET next_offset = $1 WHERE projection = 'accounts'", &[&offset])
        .await
        .expect("moving the checkpoint");
    let pool = projector::store::connect(&settings.database.url, 1).await.expect("pool");
    let probe = KafkaProbe::new(&settings.kafka, Duration::from_secs(5)).expect("lag probe");
    let (_, measured) = projector::lag::measure(probe, &pool, &Target::of(projections)).await;
    measured.expect("lag measured").remove(0).partitions.remove(0)
}

fn applied(metrics: &Metrics, projection: &str) -> u64 {
    metrics.outcome_count(projection, Outcome::Applied)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_transactions_are_applied_and_checkpoints_pass_their_markers() {
    let raw::Accounts { _kafka, topic, db, client, mut settings, projections, bootstrap } = raw::setup(1, 50).await;
    settings.http.lag_refresh_ms = 200;
    let log = write_log(&settings, &topic).await;

    // A backlog: every committed record applied once, the checkpoint at the end, past the marker
    // that ends the log.
    let engine = Engine::start(&settings, &projections);
    common::wait_caught_up(&settings, &projections).await;
    assert_eq!(checkpoint(&client, "accounts").await, log.end);
    assert_eq!(accounts_in(&client, "accounts").await, all_applied());
    assert_eq!(applied(&engine.metrics, "accounts"), 6);
    wait_for_no_lag(&engine.metrics, &topic, log.end).await;

    // Live: a transaction committed while the engine runs.
    let mut txn = Transaction::new(&bootstrap, &topic, 0, PRODUCER + 1);
    assert_eq!(txn.send(&[Raw::json(&deposited("t-1", 3, 100))]).await, log.end..log.end + 1);
    let marker = txn.end(true).await;
    common::wait_caught_up(&settings, &projections).await;
    assert_eq!(checkpoint(&client, "accounts").await, marker + 1);
    assert_eq!(account(&client, "t-1").await.map(|row| (row.0, row.1)), Some((3, "115".to_string())));
    wait_for_no_lag(&engine.metrics, &topic, marker + 1).await;
    assert_eq!(applied(&engine.stop().await, "accounts"), 7);

    // A checkpoint at a marker's offset, as an engine stopped between applying a transaction's
    // records and reading its marker leaves it: nothing is left to apply, so the lag is 0, not the
    // 1 that end offset minus checkpoint says.
    let partition = lag_at(&client, &settings, &projections, marker).await;
    assert_eq!((partition.checkpoint, partition.end_offset), (Some(marker), marker + 1));
    assert_eq!((partition.lag_messages, partition.lag_seconds), (0, Some(0.0)));

    // An engine started there moves its checkpoint past the marker, applying nothing.
    let engine = Engine::start(&settings, &projections);
    common::wait_caught_up(&settings, &projections).await;
    assert_eq!(checkpoint(&client, "accounts").await, marker + 1);
    assert_eq!(applied(&engine.stop().await, "accounts"), 0);
    assert_eq!(account(&client, "t-1").await.map(|row| (row.0, row.1)), Some((3, "115".to_string())));
    drop(client);
    db.drop().await;
}

async fn rebuild(settings: &Settings, projections: &[Projection], args: RebuildArgs) -> Metrics {
    let metrics = Metrics::new();
    let rebuilt = projector::rebuild::run(settings, projections, &args, metrics.clone(), std::future::pending());
    tokio::time::timeout(Duration::from_secs(60), rebuilt)
        .await
        .unwrap_or_else(|_| panic!("{args:?} did not finish within 60 s"))
        .unwrap_or_else(|error| panic!("{args:?}: {error}"));
    metrics
}

/// A rebuild of `accounts`, in place or into shadow tables.
fn args(shadow: bool) -> RebuildArgs {
    RebuildArgs { name: "accounts".into(), shadow, ..RebuildArgs::default() }
}

/// Builds `accounts` as of offset `until` of partition 0 (of its one topic) into
/// `accounts_until_<until>`, and returns that table's rows.
async fn built_until(
    client: &Client,
    settings: &Settings,
    projections: &[Projection],
    until: i64,
) -> Vec<(String, i64, String)> {
    let into = format!("accounts_until_{until}");
    let until_offsets = Some([((projections[0].topics[0].clone(), 0), until)].into_iter().collect());
    rebuild(settings, projections, RebuildArgs { until_offsets, into: Some(into.clone()), ..args(false) }).await;
    accounts_in(client, &into).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuilds_of_a_transactional_topic_finish() {
    let raw::Accounts { _kafka, topic, db, client, settings, projections, .. } = raw::setup(1, 50).await;
    let log = write_log(&settings, &topic).await;
    let engine = Engine::start(&settings, &projections);
    common::wait_caught_up(&settings, &projections).await;
    engine.stop().await;

    // In place: the tables emptied and every committed record applied again, the build ending at
    // the log's end, past its last marker.
    client.batch_execute("UPDATE accounts SET balance = 0").await.expect("damaging the read model");
    let metrics = rebuild(&settings, &projections, args(false)).await;
    assert_eq!(applied(&metrics, "accounts"), 6);
    assert_eq!(accounts_in(&client, "accounts").await, all_applied());
    assert_eq!(checkpoint(&client, "accounts").await, log.end);

    // Into shadow tables, swapped in while an engine runs.
    client.batch_execute("UPDATE accounts SET balance = 0").await.expect("damaging the read model");
    let engine = Engine::start(&settings, &projections);
    rebuild(&settings, &projections, args(true)).await;
    engine.stop().await;
    assert_eq!(accounts_in(&client, "accounts").await, all_applied());
    assert_eq!(checkpoint(&client, "accounts").await, log.end);

    // As of offsets: up to the first marker, and up to just past it (reached only by passing it).
    let first: Range<i64> = log.markers[0]..log.markers[0] + 1;
    for until in [first.start, first.end] {
        assert_eq!(
            built_until(&client, &settings, &projections, until).await,
            rows(&[("t-1", 2, "15"), ("t-2", 1, "20")]),
            "the first transaction only, built until offset {until}"
        );
    }
    assert_eq!(accounts_in(&client, "accounts").await, all_applied(), "the live table untouched");
    drop(client);
    db.drop().await;
}

/// Through a [`wire::FetchProxy`] listing aborted transactions, with committed and aborted
/// transactions interleaved and the log ending in an abort marker:
///
/// | offsets | what |
/// | --- | --- |
/// | 0 | transaction A: `a-1` opened (10) |
/// | 1..3 | transaction B: `a-1` +1000, `a-2` opened (99) |
/// | 3 | transaction A: `a-1` +5 |
/// | 4 | A's commit marker |
/// | 5 | B's abort marker |
/// | 6 | plain: `a-3` opened (30) |
/// | 7 | transaction B again: `a-1` +2000 |
/// | 8 | B's abort marker |
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_transactions_are_never_applied() {
    let raw::Accounts { _kafka, topic, db, client, mut settings, projections, .. } = raw::setup(1, 50).await;
    let proxy = wire::FetchProxy::start(&_kafka).await;
    settings.kafka.bootstrap_servers = proxy.address.clone();
    settings.http.lag_refresh_ms = 200;
    let (mut a, mut b) =
        (Transaction::through(&proxy, &topic, 0, PRODUCER), Transaction::through(&proxy, &topic, 0, PRODUCER + 1));
    assert_eq!(a.send(&[Raw::json(&opened("a-1", 10))]).await, 0..1);
    assert_eq!(b.send(&[Raw::json(&deposited("a-1", 2, 1000)), Raw::json(&opened("a-2", 99))]).await, 1..3);
    assert_eq!(a.send(&[Raw::json(&deposited("a-1", 2, 5))]).await, 3..4);
    assert_eq!((a.end(true).await, b.end(false).await), (4, 5));
    assert_eq!(wire::send_plain(&proxy.address, &topic, 0, &[Raw::json(&opened("a-3", 30))]).await, 6..7);
    assert_eq!(b.send(&[Raw::json(&deposited("a-1", 3, 2000))]).await, 7..8);
    assert_eq!(b.end(false).await, 8);
    let end = 9;
    let expected = rows(&[("a-1", 2, "15"), ("a-3", 1, "30")]);

    let engine = Engine::start(&settings, &projections);
    common::wait_caught_up(&settings, &projections).await;
    assert_eq!(checkpoint(&client, "accounts").await, end, "past the aborted records and the last marker");
    assert_eq!(accounts_in(&client, "accounts").await, expected, "no aborted record applied");
    wait_for_no_lag(&engine.metrics, &topic, end).await;
    let metrics = engine.stop().await;
    assert_eq!(applied(&metrics, "accounts"), 3);
    assert_eq!(
        common::outcomes(&metrics, "accounts").iter().map(|(_, count)| count).sum::<u64>(),
        3,
        "nothing else seen"
    );

    // A checkpoint before an aborted record and its marker: nothing is left to apply.
    let partition = lag_at(&client, &settings, &projections, 7).await;
    assert_eq!((partition.checkpoint, partition.end_offset, partition.lag_messages), (Some(7), end, 0));

    // Rebuilt in place, and as of offsets reached only by passing aborted records: after B's
    // first records (3), and at B's last marker (8).
    let metrics = rebuild(&settings, &projections, args(false)).await;
    assert_eq!(applied(&metrics, "accounts"), 3);
    assert_eq!(accounts_in(&client, "accounts").await, expected);
    assert_eq!(checkpoint(&client, "accounts").await, end);
    for (until, expected) in [(3, rows(&[("a-1", 1, "10")])), (8, expected.clone())] {
        assert_eq!(built_until(&client, &settings, &projections, until).await, expected, "built until offset {until}");
    }
    drop(client);
    db.drop().await;
}
