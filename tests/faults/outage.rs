//! Postgres unreachable mid-stream (every connection cut by a TCP proxy in front of it, new ones
//! refused; the server other tests share is never stopped), then back: the engine recovers by
//! itself, and the read models equal the fold of the distinct events: nothing lost, nothing
//! applied twice (`customer_totals` sums amounts, so a second apply would show).

use std::time::Duration;

use projector::kafka::mock::MockKafka;
use projector::outcome::Outcome;

use crate::common::model::{assert_read_models, distinct, events, order_stream, Fact};
use crate::common::proxy::{host_port, via_port, TcpProxy};
use crate::common::{self, Engine, TestDb};

/// `orders` orders over seven customers, interleaved, every seventh event published twice.
fn history(orders: usize) -> Vec<Fact> {
    let streams: Vec<Vec<Fact>> = (0..orders)
        .map(|i| {
            let steps: &[&str] = [&["paid", "shipped"][..], &["cancelled"], &["paid"], &[]][i % 4];
            order_stream(&uuid::Uuid::new_v4().to_string(), &format!("customer-{}", i % 7), 250 + i as i64 * 13, steps)
        })
        .collect();
    let longest = streams.iter().map(Vec::len).max().unwrap_or(0);
    let interleaved: Vec<Fact> =
        (0..longest).flat_map(|i| streams.iter().filter_map(move |s| s.get(i).cloned())).collect();
    interleaved
        .into_iter()
        .enumerate()
        .flat_map(|(i, fact)| if i % 7 == 3 { vec![fact.clone(), fact] } else { vec![fact] })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cut_off_mid_stream_and_restored_loses_nothing_and_applies_nothing_twice() {
    common::init_tracing();
    let kafka = MockKafka::start(1).expect("mock kafka");
    let topic = common::new_topic(&kafka, 3);
    let db = TestDb::create().await;
    let proxy = TcpProxy::start(host_port(&db.url)).await;
    let mut settings = common::settings(&kafka, &db.url, 10, true);
    settings.database.url = via_port(&db.url, proxy.port);
    let projections = common::example_projections(&topic);

    let published = history(150);
    let waves: Vec<&[Fact]> = published.chunks(published.len() / 6 + 1).collect();
    let engine = Engine::start(&settings, &projections);
    let mut cuts = 0;
    for (i, wave) in waves.iter().enumerate() {
        projector::demo::publish(&settings.kafka.bootstrap_servers, &topic, &events(wave)).await.expect("publishing");
        if i % 2 == 1 {
            // Cut while the wave is being applied, stay down a while, come back.
            tokio::time::sleep(Duration::from_millis(30 * i as u64)).await;
            proxy.cut();
            cuts += 1;
            tokio::time::sleep(Duration::from_millis(1500)).await;
            proxy.restore();
        }
    }
    common::wait_caught_up(&settings, &projections).await;
    let metrics = engine.stop().await;

    let client = db.connect().await;
    assert_read_models(&client, &published, "after Postgres was cut off").await;
    let distinct = distinct(&published);
    let applied = metrics.outcome_count("order_summary", Outcome::Applied);
    let duplicate = metrics.outcome_count("order_summary", Outcome::Duplicate);
    eprintln!(
        "postgres outage: {cuts} cuts, {} events published ({} distinct); order_summary applied {applied}, duplicate {duplicate}",
        published.len(),
        distinct.len()
    );
    // A commit whose answer the cut lost may have committed: its events are then counted by
    // nobody (the retry is fenced and re-reads from the checkpoint), never twice.
    assert!(applied <= distinct.len() as u64, "applied {applied} > distinct {}", distinct.len());
    assert_eq!(metrics.outcome_count("order_summary", Outcome::Parked), 0);
    assert_eq!(metrics.outcome_count("order_summary", Outcome::Gap), 0);
    drop(client);
    drop(proxy);
    db.drop().await;
}

/// An error no one event can be blamed for (here every statement of `customer_totals` waits on a
/// lock past the connection's `lock_timeout`, 300 ms; a `statement_timeout` as short would also
/// fail ordinary batches on a busy machine): retried `retry.max_attempts` times, then the
/// projection is `failed` (with the retries and the backoff in the metrics) while the other one
/// keeps applying; when the lock goes, it commits and runs again, and nothing is applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_failing_again_and_again_fails_only_its_projection_until_it_commits() {
    common::init_tracing();
    let kafka = MockKafka::start(1).expect("mock kafka");
    let topic = common::new_topic(&kafka, 2);
    let db = TestDb::create().await;
    let mut settings = common::settings(&kafka, &db.url, 20, true);
    settings.database.url = format!("{}?options=-c%20lock_timeout%3D300", db.url);
    settings.retry.max_attempts = 3;
    settings.retry.max_backoff_ms = 200;
    let projections = common::example_projections(&topic);
    let first = history(10);
    let engine = Engine::start(&settings, &projections);
    projector::demo::publish(&settings.kafka.bootstrap_servers, &topic, &events(&first)).await.expect("publishing");
    common::wait_caught_up(&settings, &projections).await;

    // Another session holds `customer_totals` locked.
    let mut locker = db.connect().await;
    let lock = locker.transaction().await.expect("begin");
    lock.batch_execute("LOCK TABLE customer_totals IN ACCESS EXCLUSIVE MODE").await.expect("lock");
    let second = history(10);
    projector::demo::publish(&settings.kafka.bootstrap_servers, &topic, &events(&second)).await.expect("publishing");
    let metrics = engine.metrics.clone();
    common::wait_for("customer_totals to be failed after 3 attempts", Duration::from_secs(30), || async {
        metrics.current_state("customer_totals") == Some("failed")
    })
    .await;
    assert!(metrics.batch_retries.with_label_values(&["customer_totals"]).get() >= 3);
    assert!(metrics.retry_backoff.with_label_values(&["customer_totals"]).get() > 0.0);
    let order_summary = common::example_projection(&topic, "order_summary");
    common::wait_caught_up(&settings, &order_summary).await;
    assert_eq!(metrics.current_state("order_summary"), Some("running"), "the other projection keeps going");

    lock.rollback().await.expect("unlock");
    common::wait_caught_up(&settings, &projections).await;
    common::wait_for("customer_totals to run again", Duration::from_secs(30), || async {
        metrics.current_state("customer_totals") == Some("running")
    })
    .await;
    assert_eq!(metrics.retry_backoff.with_label_values(&["customer_totals"]).get(), 0.0);
    engine.stop().await;
    let published: Vec<Fact> = first.into_iter().chain(second).collect();
    assert_read_models(&db.connect().await, &published, "after the lock was released").await;
    db.drop().await;
}
