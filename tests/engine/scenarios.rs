//! The engine's promises, one situation at a time: duplicates, a crash between the database commit
//! and the Kafka commit, a replay from offset zero, out-of-order events, event-id dedupe across
//! restarts. Every expectation is the fold of the distinct events, computed in `model`.

use std::time::Duration;

use projector::kafka::mock::MockKafka;
use projector::outcome::Outcome;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientConfig;

use crate::common::model::{self, assert_read_models, distinct, events, order_stream, Fact};
use crate::common::{self, Engine, TestDb};

/// Five orders over three customers, each in stream order.
fn five_orders() -> Vec<Vec<Fact>> {
    let order = |_| uuid::Uuid::new_v4().to_string();
    vec![
        order_stream(&order(1), "alice", 1999, &["paid", "shipped"]),
        order_stream(&order(2), "bob", 500, &["cancelled"]),
        order_stream(&order(3), "alice", 12_345, &["paid"]),
        order_stream(&order(4), "carol", 1, &[]),
        order_stream(&order(5), "bob", 99_999, &["paid", "shipped"]),
    ]
}

/// The streams interleaved round-robin (each stream's order kept).
fn interleave(streams: &[Vec<Fact>]) -> Vec<Fact> {
    let longest = streams.iter().map(Vec::len).max().unwrap_or(0);
    (0..longest).flat_map(|i| streams.iter().filter_map(move |stream| stream.get(i).cloned())).collect()
}

fn shipped(facts: &[Fact]) -> u64 {
    facts.iter().filter(|fact| !fact.counts_for_customer_totals()).count() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_event_twice_at_different_offsets_changes_nothing() {
    common::init_tracing();
    let kafka = MockKafka::start(1).expect("mock kafka");
    let topic = common::new_topic(&kafka, 3);
    let db = TestDb::create().await;
    let settings = common::settings(&kafka, &db.url, 5, true);
    let projections = common::example_projections(&topic);

    let original = interleave(&five_orders());
    // Copies right after the original, much later, twice, and of an event customer_totals ignores.
    let mut published = Vec::new();
    for (i, fact) in original.iter().enumerate() {
        published.push(fact.clone());
        if i == 2 || i == 7 {
            published.push(fact.clone());
        }
    }
    let shipped_fact =
        original.iter().find(|fact| !fact.counts_for_customer_totals()).expect("a shipped event").clone();
    published.extend([original[0].clone(), original[5].clone(), original[5].clone(), shipped_fact]);
    let extra = (published.len() - original.len()) as u64;
    assert_eq!(extra, 6);
    assert_eq!(distinct(&published).len(), original.len());
    projector::demo::publish(&settings.kafka.bootstrap_servers, &topic, &events(&published)).await.expect("publishing");

    let engine = Engine::start(&settings, &projections);
    common::wait_caught_up(&settings, &projections).await;
    let metrics = engine.stop().await;

    let client = db.connect().await;
    assert_read_models(&client, &published, "after duplicates").await;

    let count = |projection, outcome| metrics.outcome_count(projection, outcome);
    assert_eq!(count("order_summary", Outcome::Applied), original.len() as u64);
    assert_eq!(count("order_summary", Outcome::Duplicate), extra, "{:?}", common::outcomes(&metrics, "order_summary"));
    assert_eq!(count("order_summary", Outcome::Gap), 0);
    let ignored_originals = shipped(&original);
    let ignored_copies = shipped(&published) - ignored_originals;
    assert_eq!(count("customer_totals", Outcome::Applied), original.len() as u64 - ignored_originals);
    assert_eq!(
        count("customer_totals", Outcome::Duplicate),
        extra - ignored_copies,
        "{:?}",
        common::outcomes(&metrics, "customer_totals")
    );
    assert_eq!(count("customer_totals", Outcome::Ignored), shipped(&published));
    for projection in ["order_summary", "customer_totals"] {
        assert_eq!(count(projection, Outcome::Parked), 0, "{projection}");
    }
    drop(client);
    db.drop().await;
}

/// Kafka's committed offsets of `group` on `topic`: all `Invalid` when nothing was ever committed.
async fn committed_offsets(bootstrap: String, group: String, topic: String, partitions: i32) -> Vec<Offset> {
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", &group)
            .create()
            .expect("a consumer");
        let mut list = TopicPartitionList::new();
        for partition in 0..partitions {
            list.add_partition(&topic, partition);
        }
        consumer
            .committed_offsets(list, Duration::from_secs(10))
            .expect("committed offsets")
            .elements()
            .iter()
            .map(|element| element.offset())
            .collect()
    })
    .await
    .expect("committed offsets task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_database_commit_and_kafka_commit_changes_nothing() {
    common::init_tracing();
    let kafka = MockKafka::start(1).expect("mock kafka");
    let topic = common::new_topic(&kafka, 3);
    let db = TestDb::create().await;
    // Kafka never learns an offset: exactly the state after crashing between the two commits.
    let settings = common::settings(&kafka, &db.url, 4, false);
    let projections = common::example_projections(&topic);

    let streams = five_orders();
    let before = interleave(&streams);
    projector::demo::publish(&settings.kafka.bootstrap_servers, &topic, &events(&before)).await.expect("publishing");
    let engine = Engine::start(&settings, &projections);
    common::wait_caught_up(&settings, &projections).await;
    engine.crash().await;

    for projection in ["order_summary", "customer_totals"] {
        let offsets = committed_offsets(
            settings.kafka.bootstrap_servers.clone(),
            format!("{}.{projection}", settings.kafka.group_prefix),
            topic.clone(),
            3,
        )
        .await;
        assert!(
            offsets.iter().all(|offset| *offset == Offset::Invalid),
            "`{projection}` committed offsets to Kafka although commit_offsets = false: {offsets:?}"
        );
    }
    let client = db.connect().await;
    assert_read_models(&client, &before, "after the first run").await;

    // A fresh engine, same consumer groups, and a few more events: some continuing old orders.
    let engine = Engine::start(&settings, &projections);
    let (third, fourth) = (&streams[2][0], &streams[3][0]);
    let mut after = vec![
        Fact::new(&third.order, &third.customer, 3, model::Kind::Shipped { carrier: "ferry".into() }),
        Fact::new(&fourth.order, &fourth.customer, 2, model::Kind::Paid { amount: model::money(1) }),
        Fact::new(&fourth.order, &fourth.customer, 3, model::Kind::Shipped { carrier: "bike".into() }),
    ];
    after.extend(order_stream(&uuid::Uuid::new_v4().to_string(), "dave", 4200, &["paid"]));
    after.extend(order_stream(&uuid::Uuid::new_v4().to_string(), "alice", 777, &["cancelled"]));
    projector::demo::publish(&settings.kafka.bootstrap_servers, &topic, &events(&after)).await.expect("publishing");
    common::wait_caught_up(&settings, &projections).await;
    let metrics = engine.stop().await;

    let all: Vec<Fact> = before.iter().chain(&after).cloned().collect();
    assert_read_models(&client, &all, "after the restart").await;
    let new = after.len() as u64;
    let new_ignored = shipped(&after);
    let seen =
        |projection| -> u64 { Outcome::ALL.iter().map(|outcome| metrics.outcome_count(projection, *outcome)).sum() };
    assert_eq!(
        (seen("order_summary"), metrics.outcome_count("order_summary", Outcome::Applied)),
        (new, new),
        "the restarted engine re-read old events: {:?}",
        common::outcomes(&metrics, "order_summary")
    );
    assert_eq!(
        (
            seen("customer_totals"),
            metrics.outcome_count("customer_totals", Outcome::Applied),
            metrics.outcome_count("customer_totals", Outcome::Ignored)
        ),
        (new, new - new_ignored, new_ignored),
        "the restarted engine re-read old events: {:?}",
        common::outcomes(&metrics, "customer_totals")
    );
    drop(client);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_offset_zero_over_existing_read_model_changes_nothing() {
    common::init_tracing();
    let kafka = MockKafka::start(1).expect("mock kafka");
    let topic = common::new_topic(&kafka, 2);
    let db = TestDb::create().await;
    let settings = common::settings(&kafka, &db.url, 6, true);
    let projections = common::example_projections(&topic);

    let streams = five_orders();
    // Out of order (shipped before paid) for the first order, a duplicate for the third.
    let mut published = vec![streams[0][0].clone(), streams[0][2].clone(), streams[0][1].clone()];
    published.extend(streams[1..].iter().flatten().cloned());
    published.push(streams[2][1].clone());
    projector::demo::publish(&settings.kafka.bootstrap_servers, &topic, &events(&published)).await.expect("publishing");
    let engine = Engine::start(&settings, &projections);
    common::wait_caught_up(&settings, &projections).await;
    engine.stop().await;

    let client = db.connect().await;
    assert_read_models(&client, &published, "after the first run").await;
    let snapshot = (
        common::db::table_text(&client, "order_summary", "order_id").await,
        common::db::table_text(&client, "customer_totals", "customer_id").await,
        common::db::table_text(&client, "projector.processed_events", "projection, event_id").await,
    );

    client.batch_execute("DELETE FROM projector.checkpoints").await.expect("deleting checkpoints");
    let mut replay = settings.clone();
    replay.kafka.group_prefix = common::unique("replay");
    let engine = Engine::start(&replay, &projections);
    common::wait_caught_up(&replay, &projections).await;
    let metrics = engine.stop().await;

    let after = (
        common::db::table_text(&client, "order_summary", "order_id").await,
        common::db::table_text(&client, "customer_totals", "customer_id").await,
        common::db::table_text(&client, "projector.processed_events", "projection, event_id").await,
    );
    assert_eq!(after, snapshot, "the replay changed the read models");
    let records = published.len() as u64;
    assert_eq!(
        common::outcomes(&metrics, "order_summary"),
        vec![("applied", 0), ("duplicate", records), ("gap", 0), ("ignored", 0), ("parked", 0)]
    );
    let ignored = shipped(&published);
    assert_eq!(
        common::outcomes(&metrics, "customer_totals"),
        vec![("applied", 0), ("duplicate", records - ignored), ("gap", 0), ("ignored", ignored), ("parked", 0)]
    );
    assert_eq!(common::query_i64(&client, "SELECT count(*) FROM projector.held_events").await, 0);
    drop(client);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_event_is_held_and_applied_when_its_predecessor_arrives() {
    common::init_tracing();
    let kafka = MockKafka::start(1).expect("mock kafka");
    let topic = common::new_topic(&kafka, 2);
    let db = TestDb::create().await;
    let settings = common::settings(&kafka, &db.url, 5, true);
    // Only order_summary: customer_totals is not ordered by version (an update before its create
    // changes nothing there, by that projection's design).
    let projections = common::example_projection(&topic, "order_summary");

    let gap = order_stream(&uuid::Uuid::new_v4().to_string(), "alice", 2500, &["paid", "shipped"]);
    let early = order_stream(&uuid::Uuid::new_v4().to_string(), "bob", 1000, &["paid"]);
    // Shipped v3 before paid v2; paid v2 before placed v1 (an update before its create).
    let first = vec![gap[0].clone(), gap[2].clone(), early[1].clone()];
    projector::demo::publish(&settings.kafka.bootstrap_servers, &topic, &events(&first)).await.expect("publishing");
    let engine = Engine::start(&settings, &projections);
    common::wait_caught_up(&settings, &projections).await;
    let metrics = engine.stop().await;

    let client = db.connect().await;
    let rows = model::read_order_summary(&client).await;
    assert_eq!(rows, model::fold_order_summary(&first));
    assert_eq!(rows[&gap[0].order].version, 1);
    assert!(!rows.contains_key(&early[0].order));
    let held = model::read_held(&client, "order_summary").await;
    assert_eq!(held, [(gap[0].order.clone(), 3), (early[0].order.clone(), 2)].into());
    assert_eq!(held, model::fold_held(&first));
    assert_eq!(
        common::outcomes(&metrics, "order_summary"),
        vec![("applied", 1), ("duplicate", 0), ("gap", 2), ("ignored", 0), ("parked", 0)]
    );

    // The predecessors arrive, to a restarted engine: the held events come from Postgres.
    let second = vec![gap[1].clone(), early[0].clone()];
    projector::demo::publish(&settings.kafka.bootstrap_servers, &topic, &events(&second)).await.expect("publishing");
    let engine = Engine::start(&settings, &projections);
    common::wait_caught_up(&settings, &projections).await;
    let metrics = engine.stop().await;

    let all: Vec<Fact> = first.iter().chain(&second).cloned().collect();
    let rows = model::read_order_summary(&client).await;
    assert_eq!(rows, model::fold_order_summary(&all));
    let order = &rows[&gap[0].order];
    assert_eq!((order.version, order.status.as_str()), (3, "shipped"));
    assert_eq!(order.carrier.as_deref(), Some("parcelco"));
    assert_eq!(order.paid_amount, Some(model::money(2500)));
    let order = &rows[&early[0].order];
    assert_eq!((order.version, order.status.as_str()), (2, "paid"));
    assert_eq!(common::query_i64(&client, "SELECT count(*) FROM projector.held_events").await, 0);
    // Two predecessors applied, and the two held events released (counted applied again).
    assert_eq!(
        common::outcomes(&metrics, "order_summary"),
        vec![("applied", 4), ("duplicate", 0), ("gap", 0), ("ignored", 0), ("parked", 0)]
    );
    drop(client);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_id_dedupe_holds() {
    common::init_tracing();
    let kafka = MockKafka::start(1).expect("mock kafka");
    let topic = common::new_topic(&kafka, 3);
    let db = TestDb::create().await;
    let settings = common::settings(&kafka, &db.url, 3, true);
    let projections = common::example_projection(&topic, "customer_totals");

    let streams = five_orders();
    let original = interleave(&streams[..3]);
    let mut first = original.clone();
    first.extend(original[1..5].iter().cloned()); // a redelivered stretch
    projector::demo::publish(&settings.kafka.bootstrap_servers, &topic, &events(&first)).await.expect("publishing");
    let engine = Engine::start(&settings, &projections);
    common::wait_caught_up(&settings, &projections).await;
    engine.crash().await;

    // The same ids again at later offsets, after a crash: only processed_events can tell.
    let newer = interleave(&streams[3..]);
    let mut second: Vec<Fact> = original.iter().rev().cloned().collect();
    for fact in &newer {
        second.push(fact.clone());
        second.push(fact.clone());
    }
    projector::demo::publish(&settings.kafka.bootstrap_servers, &topic, &events(&second)).await.expect("publishing");
    // A crash in mid-flight, then a clean run to the end.
    let engine = Engine::start(&settings, &projections);
    tokio::time::sleep(Duration::from_millis(150)).await;
    engine.crash().await;
    let engine = Engine::start(&settings, &projections);
    common::wait_caught_up(&settings, &projections).await;
    let metrics = engine.stop().await;

    let all: Vec<Fact> = first.iter().chain(&second).cloned().collect();
    let client = db.connect().await;
    assert_eq!(model::read_customer_totals(&client).await, model::fold_customer_totals(&all));
    let recorded: std::collections::BTreeSet<String> = client
        .query("SELECT event_id FROM projector.processed_events WHERE projection = 'customer_totals'", &[])
        .await
        .expect("reading processed_events")
        .iter()
        .map(|row| row.get(0))
        .collect();
    let handled: std::collections::BTreeSet<String> =
        distinct(&all).iter().filter(|fact| fact.counts_for_customer_totals()).map(Fact::id).collect();
    assert_eq!(recorded, handled);
    assert_eq!(
        common::query_i64(&client, "SELECT count(*) FROM projector.processed_events").await,
        handled.len() as i64
    );
    assert_eq!(metrics.outcome_count("customer_totals", Outcome::Parked), 0);
    drop(client);
    db.drop().await;
}

/// Records of about 1 MB, with batches of 64 KiB: each batch holds one record, and the consumer
/// reads ahead at most 1,000,000 bytes per fetch (`message.max.bytes`, less than one record) and
/// two batches' worth in its queue (`kafka::read_ahead`). Every record still arrives whole, once,
/// and the read models are those of the events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_larger_than_a_batch_and_a_fetch_are_applied() {
    common::init_tracing();
    let kafka = MockKafka::start(1).expect("mock kafka");
    // The mock cluster keeps 5 MB per partition: one order (at most 3 MB) per partition.
    let topic = common::new_topic(&kafka, 5);
    let db = TestDb::create().await;
    let mut settings = common::settings(&kafka, &db.url, 100, true);
    settings.batch.max_bytes = 64 << 10;
    let projections = common::example_projections(&topic);
    let streams = five_orders();
    let facts = interleave(&streams);
    let producer: rdkafka::producer::FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &settings.kafka.bootstrap_servers)
        .set("message.max.bytes", "2000000")
        .create()
        .expect("a producer");
    for (i, mut event) in events(&facts).into_iter().enumerate() {
        // 1 MB and 600 kB: one of each is more than a chunk handed to the worker (1 MiB).
        let padding = if i % 2 == 0 { 1_000_000 } else { 600_000 };
        event.value["data"]["padding"] = "x".repeat(padding).into();
        let partition = streams.iter().position(|stream| stream[0].order == facts[i].order).expect("its order") as i32;
        let payload = serde_json::to_vec(&event.value).expect("JSON");
        producer
            .send(
                rdkafka::producer::FutureRecord::to(&topic).partition(partition).key(&event.key).payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(error, _)| error)
            .expect("publishing");
    }
    let engine = Engine::start(&settings, &projections);
    common::wait_caught_up(&settings, &projections).await;
    let metrics = engine.stop().await;
    let client = db.connect().await;
    assert_read_models(&client, &facts, "1 MB records").await;
    assert_eq!(metrics.outcome_count("order_summary", Outcome::Applied), facts.len() as u64);
    drop(client);
    db.drop().await;
}

/// `keep_event_ids`: a duplicate within the window is caught; the ids older than the window are
/// deleted (and counted); a duplicate arriving after its id was deleted is applied again, as
/// the README says it will be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_ids_are_kept_for_their_window_then_pruned() {
    common::init_tracing();
    let kafka = MockKafka::start(1).expect("mock kafka");
    let topic = common::new_topic(&kafka, 3);
    let db = TestDb::create().await;
    let settings = common::settings(&kafka, &db.url, 3, true);
    let mut projections = common::example_projection(&topic, "customer_totals");
    projections[0].keep_event_ids = Some(Duration::from_secs(5));
    let client = db.connect().await;

    let streams = five_orders();
    let original = interleave(&streams);
    let engine = Engine::start(&settings, &projections);
    // The first events, and at once a duplicate of the first: within the window.
    let mut first = original.clone();
    first.push(original[0].clone());
    projector::demo::publish(&settings.kafka.bootstrap_servers, &topic, &events(&first)).await.expect("publishing");
    common::wait_caught_up(&settings, &projections).await;
    assert_eq!(model::read_customer_totals(&client).await, model::fold_customer_totals(&first));
    let handled = distinct(&first).iter().filter(|fact| fact.counts_for_customer_totals()).count() as i64;

    // The window passes: every id is deleted, and counted.
    common::wait_for("the processed ids to be pruned", Duration::from_secs(30), || async {
        let left = common::query_i64(&client, "SELECT count(*) FROM projector.processed_events").await;
        (left == 0).then_some(()).ok_or(format!("{left} ids left"))
    })
    .await;

    // The first order placed, again, after its id was deleted: applied a second time.
    let again = original[0].clone();
    assert!(matches!(again.kind, model::Kind::Placed { .. }));
    projector::demo::publish(&settings.kafka.bootstrap_servers, &topic, &events(std::slice::from_ref(&again)))
        .await
        .expect("publishing");
    common::wait_caught_up(&settings, &projections).await;
    let recorded = common::query_i64(&client, "SELECT count(*) FROM projector.processed_events").await;
    assert_eq!(recorded, 1, "the id applied again is recorded again");
    let metrics = engine.stop().await;

    let mut expected = model::fold_customer_totals(&first);
    let row = expected.get_mut(&again.customer).expect("the customer's row");
    row.orders_placed += 1;
    if let model::Kind::Placed { total } = again.kind {
        row.total_placed += total;
    }
    assert_eq!(model::read_customer_totals(&client).await, expected);
    assert_eq!(metrics.outcome_count("customer_totals", Outcome::Duplicate), 1, "the duplicate within the window");
    assert_eq!(metrics.outcome_count("customer_totals", Outcome::Applied), handled as u64 + 1);
    let pruned = metrics.event_ids_pruned.with_label_values(&["customer_totals"]).get();
    assert_eq!(pruned, handled as u64, "every id deleted is counted");
    drop(client);
    db.drop().await;
}

/// Natural batching: a batch that will not fill is applied as soon as its lane is free, not when
/// `batch.max_wait_ms` runs out. With the wait set to ten minutes, single events, one after the
/// other, are each applied long before it (the test would time out after 60 s otherwise). The
/// periodic rounds that also apply what has gathered are off: the projection dedupes by event id
/// (a versioned one looks for held events to release every second) and held gaps never time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_will_not_fill_is_applied_without_waiting_for_it_to() {
    common::init_tracing();
    let kafka = MockKafka::start(1).expect("mock kafka");
    let topic = common::new_topic(&kafka, 2);
    let db = TestDb::create().await;
    let mut settings = common::settings(&kafka, &db.url, 1000, true);
    settings.batch.max_wait_ms = 600_000;
    settings.parking.gap_timeout_secs = 0;
    settings.kafka.properties.insert("fetch.wait.max.ms".into(), "10".into());
    let projections = common::example_projection(&topic, "customer_totals");
    let client = db.connect().await;
    let engine = Engine::start(&settings, &projections);
    let order = order_stream(&uuid::Uuid::new_v4().to_string(), "alice", 700, &["paid"]);
    for (published, fact) in order.iter().enumerate() {
        common::engine::publish(&settings, &topic, &events(std::slice::from_ref(fact))).await;
        common::wait_for("the lone event to be applied", Duration::from_secs(60), || async {
            // The engine's tables are created as it starts.
            let sql = "SELECT count(*) FROM projector.processed_events WHERE projection = 'customer_totals'";
            let applied = match client.query_one(sql, &[]).await {
                Ok(row) => row.get::<_, i64>(0),
                Err(error) => return Err(format!("cannot read processed_events: {error}")),
            };
            (applied == published as i64 + 1).then_some(()).ok_or(format!("{applied} events applied"))
        })
        .await;
    }
    let metrics = engine.stop().await;
    assert_eq!(model::read_customer_totals(&client).await, model::fold_customer_totals(&order));
    assert_eq!(metrics.outcome_count("customer_totals", Outcome::Applied), order.len() as u64);
    drop(client);
    db.drop().await;
}
