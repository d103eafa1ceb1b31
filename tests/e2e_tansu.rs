//! End to end: a Tansu broker and `projector run` as separate processes. Publishes the example
//! shop's history with duplicates, crashes the projector (SIGKILL) while it is applying, restarts
//! it, and checks that the read models equal the fold of the distinct events, computed here
//! independently of the engine, and that the checkpoints cover exactly what was produced.
//!
//! Needs PostgreSQL (`PROJECTOR_TEST_DATABASE_URL`) and the `tansu` binary (scripts/install-tansu.sh).

mod common;

use std::time::{Duration, Instant};

use common::shop::{caught_up, expected_fold, read_models, records_per_partition, shuffled_history_with_duplicates};
use common::{produce_one_per_batch, projector_command, query_i64, wait_for, LogDir, Projector, Tansu, TestDb};
use nix::sys::signal::Signal;
use projector::demo::TOPIC;
use rand::rngs::StdRng;
use rand::SeedableRng;

const ORDERS: usize = 60;
const PARTITIONS: i32 = 4;
const CATCH_UP: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_and_restart_against_tansu_converges_to_the_fold_of_distinct_events() {
    let started = Instant::now();
    let seed: u64 =
        std::env::var("PROJECTOR_E2E_SEED").ok().and_then(|seed| seed.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("seed {seed} (rerun with PROJECTOR_E2E_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);

    // 1. Broker, topic, database, group prefix.
    let tansu = Tansu::start().await;
    tansu.create_topic(TOPIC, PARTITIONS).await;
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
    assert!(status.success(), "the projector exited with {status} on SIGTERM; log:\n{}", common::log_tail(&log, 60));
    // Nothing moved after the last check.
    assert_eq!(read_models(&client).await.expect("read models"), expected_all);

    drop(client);
    db.drop().await;
    eprintln!("passed in {:?}", started.elapsed());
}
