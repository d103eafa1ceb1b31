//! A Kafka consumer thread that dies (a panic injected through a fail point, as no outside event
//! can make one die): the projection is `failed` while it has none, the thread is replaced with
//! backoff, and the read model comes out exact. A worker that ends before shutdown stops the engine
//! with a message naming it, rather than leave its projection looking healthy.
use std::time::Duration;

use crate::common::{self, Engine};
use crate::raw::{self, account, opened, Raw};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_thread_that_dies_is_seen_and_replaced() {
    let raw::Accounts { _kafka, topic, db, client, mut settings, projections, bootstrap } = raw::setup(2, 50).await;
    settings.retry.max_backoff_ms = 300;
    // A name of its own: fail points are shared by every test of this binary.
    let name = common::unique("consumer_dies");
    let projections = vec![projections[0].renamed(&name)];
    let fail_point = format!("consumer-poll-{name}");
    fail::cfg(&fail_point, "panic").expect("configuring the fail point");

    let records: Vec<Raw> = (0..10).map(|i| Raw::json(&opened(&format!("c-{i}"), i + 1))).collect();
    raw::publish(&bootstrap, &topic, &records).await;
    let engine = Engine::start(&settings, &projections);
    let metrics = engine.metrics.clone();
    let restarts = || metrics.consumer_restarts.with_label_values(&[&name]).get();
    common::wait_for("the consumer to die, be replaced, and die again", Duration::from_secs(30), || async {
        restarts() >= 2 && metrics.current_state(&name) == Some("failed")
    })
    .await;
    assert_eq!(account(&client, "c-0").await, None, "nothing applied without a consumer");

    // The next consumer lives: the projection runs again and applies everything once.
    fail::remove(&fail_point);
    common::wait_caught_up(&settings, &projections).await;
    common::wait_for("the projection to run again", Duration::from_secs(30), || async {
        metrics.current_state(&name) == Some("running")
    })
    .await;
    let metrics = engine.stop().await;
    for i in 0..10 {
        assert_eq!(account(&client, &format!("c-{i}")).await.map(|row| (row.0, row.1)), Some((1, (i + 1).to_string())));
    }
    assert_eq!(metrics.outcome_count(&name, projector::outcome::Outcome::Applied), 10);
    drop(client);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_ends_before_shutdown_stops_the_engine() {
    let raw::Accounts { _kafka, db, client, settings, projections, .. } = raw::setup(1, 50).await;
    let name = common::unique("worker_ends");
    let projections = vec![projections[0].renamed(&name)];
    let fail_point = format!("worker-{name}");
    fail::cfg(&fail_point, "return").expect("configuring the fail point");
    let engine = Engine::start(&settings, &projections);
    let metrics = engine.metrics.clone();
    let error = engine.exited(std::time::Duration::from_secs(30)).await.expect_err("the engine stops").to_string();
    fail::remove(&fail_point);
    assert!(error.contains(&format!("the worker of `{name}` ended unexpectedly")), "{error}");
    assert_eq!(metrics.current_state(&name), Some("failed"));
    drop(client);
    db.drop().await;
}
