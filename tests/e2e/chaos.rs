//! Chaos, with `projector run` as separate processes against a Kafka-protocol broker (librdkafka's
//! mock cluster, served from this test process on a loopback port) and real PostgreSQL:
//!
//! - SIGKILL at random moments, at least 20 times (`PROJECTOR_CHAOS_KILLS` for more), while a
//!   producer publishes the example shop's history with duplicates: the read models end equal to
//!   the fold of the distinct events, exactly.
//! - Instances joining and leaving the consumer group under load (`PROJECTOR_CHAOS_CYCLES`
//!   changes, 12 by default): every record is counted exactly once over all instances' final
//!   counts, and the read models are exact.
//!
//! A run prints its seed; `PROJECTOR_CHAOS_SEED` replays it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::shop::{
    caught_up, converges_then_stops, expected_fold, read_models, records_per_partition,
    shuffled_history_with_duplicates,
};
use crate::common::{produce_one_per_batch, projector_command, wait_for, LogDir, Projector, TestDb};
use nix::sys::signal::Signal;
use projector::demo::{ShopEvent, TOPIC};
use projector::kafka::mock::MockKafka;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinHandle;

const PARTITIONS: i32 = 4;
const CATCH_UP: Duration = Duration::from_secs(120);

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default)
}

fn seeded() -> StdRng {
    let seed = env_number("PROJECTOR_CHAOS_SEED", rand::random());
    eprintln!("seed {seed} (rerun with PROJECTOR_CHAOS_SEED={seed})");
    StdRng::seed_from_u64(seed)
}

/// Sessions short enough that a killed member's partitions move in about 2 s.
fn settings_file(dir: &Path) -> PathBuf {
    let path = dir.join("projector.toml");
    std::fs::write(
        &path,
        "[kafka.properties]\n\"session.timeout.ms\" = \"2000\"\n\"heartbeat.interval.ms\" = \"200\"\n\n[batch]\nmax_events = 16\nmax_wait_ms = 20\n",
    )
    .expect("writing projector.toml");
    path
}

/// Publishes `records` in chunks spread over about `over`, in the background.
fn produce_slowly(bootstrap: String, records: Vec<ShopEvent>, over: Duration) -> JoinHandle<Vec<(i32, i64)>> {
    tokio::spawn(async move {
        let chunks = records.len().div_ceil(4).max(1);
        let pause = over / chunks as u32;
        let mut positions = Vec::with_capacity(records.len());
        for chunk in records.chunks(4) {
            positions.extend(produce_one_per_batch(&bootstrap, TOPIC, chunk).await);
            tokio::time::sleep(pause).await;
        }
        positions
    })
}

struct Setup {
    kafka: MockKafka,
    db: TestDb,
    group_prefix: String,
    log_dir: LogDir,
    config: PathBuf,
}

async fn setup(name: &str) -> Setup {
    let kafka = MockKafka::start(1).expect("mock kafka");
    kafka.create_topic(TOPIC, PARTITIONS, 1).expect("topic");
    let db = TestDb::create().await;
    let group_prefix = format!("{name}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let log_dir = LogDir::new(name);
    let config = settings_file(&log_dir.path);
    Setup { kafka, db, group_prefix, log_dir, config }
}

impl Setup {
    fn command(&self, log: &Path) -> Command {
        let mut command = projector_command(&self.db.url, &self.kafka.bootstrap_servers(), &self.group_prefix, log);
        command.env("PROJECTOR_CONFIG", &self.config);
        command
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_converges_to_the_exact_fold() {
    let started = Instant::now();
    let kills = env_number("PROJECTOR_CHAOS_KILLS", 20);
    let mut rng = seeded();
    let setup = setup("chaos-kill").await;
    let client = setup.db.connect().await;
    let log = setup.log_dir.path.join("projector.log");
    let (records, duplicates) = shuffled_history_with_duplicates(&mut rng, 150);
    eprintln!("{} records ({duplicates} duplicates), {kills} kills, projector log {}", records.len(), log.display());

    // About 2.5 s per run (joining the group, then working a while): the producer keeps going
    // through all of them.
    let producing =
        produce_slowly(setup.kafka.bootstrap_servers(), records.clone(), Duration::from_millis(kills * 2500));
    let mut lifetimes = Vec::new();
    // Records applied (sum of checkpoints) at each kill, and how many kills hit a run that was
    // applying (the others hit one still starting: connecting, migrating, joining the group).
    let mut progress = Vec::new();
    let mut while_applying = 0;
    // 0 until the first run has created the engine's tables; any other error is the test's.
    let applied_so_far = || async {
        match client
            .query_one(
                "SELECT coalesce(sum(next_offset), 0)::bigint FROM projector.checkpoints WHERE projection = 'order_summary'",
                &[],
            )
            .await
        {
            Ok(row) => row.get::<_, i64>(0),
            Err(error) if error.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => 0,
            Err(error) => panic!("reading the checkpoints: {error:?}"),
        }
    };
    // How each kill was timed, for the report: the moment waited for and what was seen.
    let mut timing = Vec::new();
    for kill in 0..kills {
        let before = applied_so_far().await;
        let born = Instant::now();
        let projector = Projector::spawn(setup.command(&log), &log, &format!("run {kill}"));
        // One kill in four lands early, while the run is still starting; the others once it
        // applies (a random draw here once gave 12 early kills of 20, and too few that hit work).
        if kill % 4 == 3 {
            tokio::time::sleep(Duration::from_millis(rng.random_range(50..400))).await;
            timing.push(format!("{kill}: early"));
        } else {
            // Once it applies, anywhere in the next 600 ms: between batches or inside one.
            let deadline = Instant::now() + Duration::from_secs(15);
            let mut seen = before;
            while seen == before && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
                seen = applied_so_far().await;
            }
            timing.push(format!("{kill}: {before} -> {seen} after {} ms", born.elapsed().as_millis()));
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..600))).await;
        }
        projector.assert_running();
        projector.kill();
        lifetimes.push(born.elapsed().as_millis());
        let after = applied_so_far().await;
        if after > before {
            while_applying += 1;
        }
        progress.push(after);
    }
    assert!(
        while_applying * 2 >= kills,
        "only {while_applying} of {kills} kills hit a run that was applying: {progress:?}; {timing:?}; log {}",
        log.display()
    );
    let projector = Projector::spawn(setup.command(&log), &log, "after the last kill");
    let positions = producing.await.expect("producer task");
    converges_then_stops(&client, &projector, TOPIC, &records, &positions, CATCH_UP).await;
    eprintln!(
        "{kills} SIGKILLs ({while_applying} while applying) after {lifetimes:?} ms; order_summary had checkpointed \
         {progress:?} records at each kill; \
         {} records, {} distinct; nothing lost, nothing applied twice; {:?}",
        records.len(),
        records.len() - duplicates,
        started.elapsed()
    );
    drop(client);
    setup.db.drop().await;
}

/// The outcome counts an instance logged when it stopped gracefully, per projection.
fn final_counts(log: &Path) -> Vec<(String, [u64; 5])> {
    let text = std::fs::read_to_string(log).expect("reading a projector log");
    text.lines()
        .filter(|line| line.contains("events since start:"))
        .map(|line| {
            let projection = line
                .split("projection=")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .expect("projection field")
                .to_string();
            let counts = line.split("events since start:").nth(1).expect("counts");
            let mut values = [0u64; 5];
            for (i, part) in counts.split(',').take(5).enumerate() {
                let number = part.split_whitespace().nth(1).expect("a count");
                values[i] = number.trim_end_matches(|c: char| !c.is_ascii_digit()).parse().expect("a number");
            }
            (projection, values)
        })
        .collect()
}

/// The outcome counts of every life of every instance in `logs`, summed per projection.
fn counted(logs: &[PathBuf]) -> std::collections::BTreeMap<String, [u64; 5]> {
    let mut totals: std::collections::BTreeMap<String, [u64; 5]> = Default::default();
    for log in logs {
        for (projection, counts) in final_counts(log) {
            let total = totals.entry(projection).or_default();
            for (sum, count) in total.iter_mut().zip(counts) {
                *sum += count;
            }
        }
    }
    totals
}

/// Each of `records` was counted exactly once, with the outcome it must have: `order_summary`
/// applies every distinct event; `customer_totals` ignores `OrderShipped`.
fn assert_counted_once(
    totals: &std::collections::BTreeMap<String, [u64; 5]>,
    records: &[ShopEvent],
    duplicates: usize,
) {
    let distinct = records.len() - duplicates;
    let shipped_records = records.iter().filter(|record| record.value["type"] == "OrderShipped").count();
    let mut seen = std::collections::HashSet::new();
    let distinct_shipped = records
        .iter()
        .filter(|record| seen.insert(record.value["id"].to_string()) && record.value["type"] == "OrderShipped")
        .count();
    assert_eq!(totals["order_summary"], [distinct as u64, duplicates as u64, 0, 0, 0], "order_summary counts");
    assert_eq!(
        totals["customer_totals"],
        [
            (distinct - distinct_shipped) as u64,
            (duplicates - (shipped_records - distinct_shipped)) as u64,
            0,
            shipped_records as u64,
            0
        ],
        "customer_totals counts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_joining_and_leaving_under_load_count_every_record_once() {
    let started = Instant::now();
    let cycles = env_number("PROJECTOR_CHAOS_CYCLES", 12);
    let mut rng = seeded();
    let setup = setup("chaos-rebalance").await;
    let client = setup.db.connect().await;
    let (records, duplicates) = shuffled_history_with_duplicates(&mut rng, 150);
    let logs: Vec<PathBuf> = (0..3).map(|i| setup.log_dir.path.join(format!("instance-{i}.log"))).collect();
    eprintln!(
        "{} records ({duplicates} duplicates), {cycles} membership changes, logs in {}",
        records.len(),
        setup.log_dir.path.display()
    );

    let producing =
        produce_slowly(setup.kafka.bootstrap_servers(), records.clone(), Duration::from_millis(cycles * 1200));
    let mut instances: Vec<Option<Projector>> = vec![None, None, None];
    instances[0] = Some(Projector::spawn(setup.command(&logs[0]), &logs[0], "start"));
    instances[1] = Some(Projector::spawn(setup.command(&logs[1]), &logs[1], "start"));
    // The third slot's instance may never join (the draw can skip it); only the logs of instances
    // that ran are read, and each of those must exist.
    let mut ran = [true, true, false];
    let (mut joins, mut leaves) = (2, 0);
    for _ in 0..cycles {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
        let slot = rng.random_range(0..3);
        let running = instances.iter().filter(|instance| instance.is_some()).count();
        match instances[slot].take() {
            Some(projector) if running > 1 => {
                // A graceful leave: an instance that joined a moment ago may not have its signal
                // handlers yet.
                projector.wait_started(CATCH_UP).await;
                let status = projector.signal_and_wait(Signal::SIGTERM, Duration::from_secs(60)).await;
                assert!(status.success(), "instance {slot} exited {status} on SIGTERM");
                leaves += 1;
            }
            Some(projector) => instances[slot] = Some(projector),
            None => {
                instances[slot] = Some(Projector::spawn(setup.command(&logs[slot]), &logs[slot], "join"));
                ran[slot] = true;
                joins += 1;
            }
        }
    }
    let positions = producing.await.expect("producer task");
    let ends = records_per_partition(&positions);
    let expected = expected_fold(&records);
    wait_for("the read models to equal the fold", CATCH_UP, || caught_up(&client, None, TOPIC, &expected, &ends)).await;
    for (slot, instance) in instances.iter_mut().enumerate() {
        if let Some(projector) = instance.take() {
            projector.wait_started(CATCH_UP).await;
            let status = projector.signal_and_wait(Signal::SIGTERM, Duration::from_secs(60)).await;
            assert!(status.success(), "instance {slot} exited {status} on SIGTERM");
        }
    }
    assert_eq!(read_models(&client).await.expect("read models"), expected);

    // Every record counted exactly once, over every instance's life.
    let ran: Vec<PathBuf> = logs.iter().zip(ran).filter(|(_, ran)| *ran).map(|(log, _)| log.clone()).collect();
    let totals = counted(&ran);
    eprintln!("{joins} joins, {leaves} graceful leaves; totals (applied, duplicate, gap, ignored, parked): {totals:?}");
    assert_counted_once(&totals, &records, duplicates);
    eprintln!("passed in {:?}", started.elapsed());
    drop(client);
    setup.db.drop().await;
}

/// A zombie: an instance frozen (SIGSTOP) past its session loses its partitions to another; thawed
/// (SIGCONT), whatever batch it still had cannot commit over the new owner's, because the checkpoint
/// compare-and-set fences it. Every record is counted once over both instances; the read models
/// are exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_instance_is_fenced_when_it_thaws() {
    let started = Instant::now();
    let mut rng = seeded();
    let setup = setup("chaos-zombie").await;
    let client = setup.db.connect().await;
    let (records, duplicates) = shuffled_history_with_duplicates(&mut rng, 100);
    let logs: Vec<PathBuf> =
        ["frozen", "other"].iter().map(|name| setup.log_dir.path.join(format!("{name}.log"))).collect();
    let (first, second) = records.split_at(records.len() / 3);

    let mut positions = produce_one_per_batch(&setup.kafka.bootstrap_servers(), TOPIC, first).await;
    let frozen = Projector::spawn(setup.command(&logs[0]), &logs[0], "to be frozen");
    let (expected, ends) = (expected_fold(first), records_per_partition(&positions));
    wait_for("the first third", CATCH_UP, || caught_up(&client, Some(&frozen), TOPIC, &expected, &ends)).await;

    let producing = produce_slowly(setup.kafka.bootstrap_servers(), second.to_vec(), Duration::from_secs(6));
    tokio::time::sleep(Duration::from_millis(rng.random_range(200..800))).await;
    frozen.signal(Signal::SIGSTOP);
    let other = Projector::spawn(setup.command(&logs[1]), &logs[1], "takes over");
    // Past the frozen one's 2 s session: the group gives its partitions to the other.
    tokio::time::sleep(Duration::from_secs(5)).await;
    other.assert_running();
    frozen.signal(Signal::SIGCONT);
    positions.extend(producing.await.expect("producer task"));

    let (expected, ends) = (expected_fold(&records), records_per_partition(&positions));
    wait_for("everything", CATCH_UP, || caught_up(&client, Some(&other), TOPIC, &expected, &ends)).await;
    for (name, projector) in [("frozen", &frozen), ("other", &other)] {
        let status = projector.signal_and_wait(Signal::SIGTERM, Duration::from_secs(60)).await;
        assert!(status.success(), "{name} exited {status} on SIGTERM");
    }
    assert_eq!(read_models(&client).await.expect("read models"), expected);
    let totals = counted(&logs);
    assert_counted_once(&totals, &records, duplicates);
    let fenced = std::fs::read_to_string(&logs[0]).expect("log").matches("moved by another instance").count();
    eprintln!(
        "frozen 5 s; {fenced} stale batch(es) of the thawed instance fenced; totals {totals:?}; {:?}",
        started.elapsed()
    );
    drop(client);
    setup.db.drop().await;
}
