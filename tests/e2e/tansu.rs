//! End to end: a Tansu broker and `projector run` as separate processes. Publishes the example
//! shop's history with duplicates, crashes the projector (SIGKILL) while it is applying, restarts
//! it, and checks that the read models equal the fold of the distinct events, computed here
//! independently of the engine, and that the checkpoints cover exactly what was produced.
//!
//! Needs PostgreSQL (`PROJECTOR_TEST_DATABASE_URL`) and the `tansu` binary (scripts/install-tansu.sh).

use std::time::{Duration, Instant};

use crate::common::records::seeded_rng;
use crate::common::shop::{
    caught_up, converges_then_stops, expected_fold, read_models, records_per_partition,
    shuffled_history_with_duplicates,
};
use crate::common::{produce_one_per_batch, projector_command, query_i64, wait_for, LogDir, Projector, Tansu, TestDb};
use nix::sys::signal::Signal;
use projector::demo::TOPIC;

const ORDERS: usize = 60;
const PARTITIONS: i32 = 4;
const CATCH_UP: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_and_restart_against_tansu_converges_to_the_fold_of_distinct_events() {
    let started = Instant::now();
    let mut rng = seeded_rng();

    // 1. Broker, topic, database, group prefix.
    let tansu = Tansu::start().await.expect("starting tansu");
    tansu.create_topic(TOPIC, PARTITIONS).await.expect("creating the topic");
    let db = TestDb::create().await;
    let client = db.connect().await;
    let group_prefix = format!("e2e-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let log_dir = LogDir::new("e2e");
    let log = log_dir.path.join("projector.log");
    eprintln!(
        "tansu at {}, database `{}`, group prefix `{group_prefix}`, projector log {}",
        tansu.bootstrap,
        db.name,
        log.display()
    );

    // 2. The first half of the history.
    let (records, duplicates) = shuffled_history_with_duplicates(&mut rng, ORDERS);
    let half = records.len() / 2;
    let (first, second) = records.split_at(half);
    eprintln!("{} records: {} distinct events and {duplicates} duplicates", records.len(), records.len() - duplicates);
    let mut positions = produce_one_per_batch(&tansu.bootstrap, TOPIC, first).await;

    // 3. The projector catches up with the first half.
    let settings = log_dir.path.join("projector.toml");
    std::fs::write(&settings, "[kafka.properties]\n\"session.timeout.ms\" = \"6000\"\n")
        .expect("writing projector.toml");
    let command = || {
        let mut command = projector_command(&db.url, &tansu.bootstrap, &group_prefix, &log);
        command.env("PROJECTOR_BATCH__MAX_EVENTS", "8").env("PROJECTOR_BATCH__MAX_WAIT_MS", "20");
        // A SIGKILLed member keeps its partitions until its session times out (45 s by default):
        // a short session lets the restarted projector get them back sooner.
        command.env("PROJECTOR_CONFIG", &settings);
        command
    };
    let mut projector = Projector::spawn(command(), &log, "first run");
    let expected_first = expected_fold(first);
    let ends_first = records_per_partition(&positions);
    assert_eq!(ends_first.values().sum::<i64>(), first.len() as i64);
    wait_for("the first half to be applied", CATCH_UP, || {
        caught_up(&client, Some(&projector), TOPIC, &expected_first, &ends_first)
    })
    .await;
    eprintln!("first half applied after {:?}", started.elapsed());

    // 4. The rest, produced in the background, slowly enough to crash the projector mid-stream.
    let versions_after_first = query_i64(&client, "SELECT coalesce(sum(version), 0)::bigint FROM order_summary").await;
    let producing = {
        let (bootstrap, second) = (tansu.bootstrap.clone(), second.to_vec());
        tokio::spawn(async move {
            let mut positions = Vec::new();
            for chunk in second.chunks(4) {
                positions.extend(produce_one_per_batch(&bootstrap, TOPIC, chunk).await);
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            positions
        })
    };
    wait_for("some of the second half to be applied", CATCH_UP, || async {
        projector.assert_running();
        let versions = query_i64(&client, "SELECT coalesce(sum(version), 0)::bigint FROM order_summary").await;
        if versions >= versions_after_first + 10 {
            Ok(())
        } else {
            Err(format!("sum of versions {versions}, first half left {versions_after_first}"))
        }
    })
    .await;
    projector.kill();
    eprintln!(
        "projector SIGKILLed after {:?}; the producer had {}finished",
        started.elapsed(),
        if producing.is_finished() { "" } else { "not " }
    );
    projector = Projector::spawn(command(), &log, "after SIGKILL");
    positions.extend(producing.await.expect("producer task"));
    eprintln!("second half produced after {:?}", started.elapsed());

    let expected_all = expected_fold(&records);
    let ends_all = records_per_partition(&positions);
    assert_eq!(ends_all.values().sum::<i64>(), records.len() as i64);
    assert_eq!(expected_all.orders.len(), ORDERS);
    wait_for("everything to be applied after the restart", CATCH_UP, || {
        caught_up(&client, Some(&projector), TOPIC, &expected_all, &ends_all)
    })
    .await;
    eprintln!("everything applied after {:?}", started.elapsed());
    assert_eq!(query_i64(&client, "SELECT count(*) FROM projector.held_events").await, 0, "held events remain");
    assert_eq!(query_i64(&client, "SELECT count(*) FROM projector.dead_letters").await, 0, "events were dead-lettered");

    // 5. A graceful stop.
    let status = projector.signal_and_wait(Signal::SIGTERM, Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "the projector exited with {status} on SIGTERM; log:\n{}",
        crate::common::log_tail(&log, 60)
    );
    // Nothing moved after the last check.
    assert_eq!(read_models(&client).await.expect("read models"), expected_all);

    drop(client);
    db.drop().await;
    eprintln!("passed in {:?}", started.elapsed());
}

/// The broker SIGKILLed while the projector is reading, and restarted on the same storage: the
/// projector reconnects by itself and the read models equal the fold of the distinct events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tansu_killed_and_restarted_mid_stream_loses_nothing() {
    let started = Instant::now();
    let mut rng = seeded_rng();
    let mut tansu = Tansu::start_persistent().await.expect("starting tansu");
    tansu.create_topic(TOPIC, PARTITIONS).await.expect("creating the topic");
    let db = TestDb::create().await;
    let client = db.connect().await;
    let group_prefix = format!("e2e-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let log_dir = LogDir::new("e2e-broker");
    let log = log_dir.path.join("projector.log");
    let settings = log_dir.path.join("projector.toml");
    std::fs::write(&settings, "[kafka.properties]\n\"session.timeout.ms\" = \"6000\"\n").expect("projector.toml");
    let mut command = projector_command(&db.url, &tansu.bootstrap, &group_prefix, &log);
    command.env("PROJECTOR_BATCH__MAX_EVENTS", "8").env("PROJECTOR_BATCH__MAX_WAIT_MS", "20");
    command.env("PROJECTOR_CONFIG", &settings);

    let (records, duplicates) = shuffled_history_with_duplicates(&mut rng, ORDERS);
    let third = records.len() / 3;
    let (first, rest) = records.split_at(third);
    let (second, last) = rest.split_at(third);
    let mut positions = produce_one_per_batch(&tansu.bootstrap, TOPIC, first).await;
    let projector = Projector::spawn(command, &log, "broker restarts");
    let expected = expected_fold(first);
    let ends = records_per_partition(&positions);
    wait_for("the first third", CATCH_UP, || caught_up(&client, Some(&projector), TOPIC, &expected, &ends)).await;

    // The second third, and the broker killed right behind it, while the projector reads it.
    positions.extend(produce_one_per_batch(&tansu.bootstrap, TOPIC, second).await);
    tansu.kill();
    let down = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    projector.assert_running();
    tansu.restart().await.expect("restarting tansu");
    eprintln!("broker down for {:?}", down.elapsed());
    positions.extend(produce_one_per_batch(&tansu.bootstrap, TOPIC, last).await);

    converges_then_stops(&client, &projector, TOPIC, &records, &positions, CATCH_UP).await;
    eprintln!(
        "{} records ({duplicates} duplicates), broker killed once after {}: nothing lost, nothing applied twice, {:?}",
        records.len(),
        first.len() + second.len(),
        started.elapsed()
    );
    drop(client);
    db.drop().await;
}

/// A 10 MB record (a `total` that does not fit `numeric`) is parked with its reason and its raw
/// bytes; the records around it are applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10_mb_record_is_parked_and_the_stream_goes_on() {
    let tansu = Tansu::start().await.expect("starting tansu");
    tansu.create_topic(TOPIC, 1).await.expect("creating the topic");
    let db = TestDb::create().await;
    let client = db.connect().await;
    let group_prefix = format!("e2e-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let log_dir = LogDir::new("e2e-huge");
    let log = log_dir.path.join("projector.log");
    let projector = Projector::spawn(projector_command(&db.url, &tansu.bootstrap, &group_prefix, &log), &log, "10 MB");

    let (before, huge, after) =
        (uuid::Uuid::new_v4().to_string(), uuid::Uuid::new_v4().to_string(), uuid::Uuid::new_v4().to_string());
    let placed = |order: &str, total: String| {
        projector::demo::shop_event(order, 1, "OrderPlaced", serde_json::json!({"customer_id": "c-1", "total": total}))
    };
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &tansu.bootstrap)
        .set("message.max.bytes", "20000000")
        .set("batch.num.messages", "1")
        .create()
        .expect("producer");
    for event in
        [placed(&before, "10.00".into()), placed(&huge, "9".repeat(10 * 1024 * 1024)), placed(&after, "20.00".into())]
    {
        let payload = serde_json::to_vec(&event.value).expect("json");
        producer
            .send(rdkafka::producer::FutureRecord::to(TOPIC).key(&event.key).payload(&payload), Duration::from_secs(30))
            .await
            .map_err(|(error, _)| error)
            .expect("producing");
    }
    wait_for("both small orders applied and the huge one parked", CATCH_UP, || async {
        projector.assert_running();
        // Until the projector has migrated the database, the tables do not exist.
        let counts = client
            .query_one(
                "SELECT (SELECT count(*) FROM order_summary),
                        (SELECT count(*) FROM projector.dead_letters WHERE projection = 'order_summary')",
                &[],
            )
            .await
            .map_err(|error| error.to_string())?;
        let (orders, parked): (i64, i64) = (counts.get(0), counts.get(1));
        if orders == 2 && parked == 1 {
            Ok(())
        } else {
            Err(format!("{orders} orders, {parked} parked"))
        }
    })
    .await;
    let row = client
        .query_one(
            "SELECT entity_key, error_class, error, octet_length(record_value)::bigint FROM projector.dead_letters
              WHERE projection = 'order_summary'",
            &[],
        )
        .await
        .expect("dead letter");
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some(huge.as_str()));
    assert_eq!(row.get::<_, String>(1), "poison");
    let error: String = row.get(2);
    assert!(
        error.contains(":data.total") && error.len() < 1000,
        "a precise, short reason: {}",
        &error[..error.len().min(300)]
    );
    assert!(row.get::<_, i64>(3) > 10 * 1024 * 1024, "the raw value is kept whole");
    let status = projector.signal_and_wait(Signal::SIGTERM, Duration::from_secs(30)).await;
    assert!(status.success());
    drop(client);
    db.drop().await;
}
