//! Records the broker deleted (retention) before a projection read them: found before anything
//! is read, counted in `projector_records_lost_total`, and, by `kafka.on_data_loss`, the
//! partition held with the projection `failed` until an operator accepts the loss, or skipped.
//! librdkafka's mock broker keeps at most 5 MB per partition and drops the oldest records
//! beyond that, moving the log start as Kafka's retention does.

use std::time::Duration;

use projector::metrics::Metrics;
use projector::settings::OnDataLoss;
use serde_json::json;

use crate::common::{self, Engine};
use crate::raw::{self, account, deposited, event, opened, Raw};

/// The log start of partition 0 of `topic`.
fn log_start(settings: &projector::settings::Settings, topic: &str) -> i64 {
    projector::kafka::watermarks(&settings.kafka, &[topic.to_string()], Duration::from_secs(5)).expect("watermarks")
        [&(topic.to_string(), 0)]
        .0
}

/// Publishes 70 records of 100 KB (a type the projection ignores), past the broker's 5 MB.
async fn push_retention(bootstrap: &str, topic: &str) {
    let padding = "x".repeat(100_000);
    let big: Vec<Raw> =
        (0..70).map(|i| Raw::json(&event(&format!("pad-{i}"), 1, "Padding", json!({ "padding": padding })))).collect();
    raw::publish(bootstrap, topic, &big).await;
}

fn lost(metrics: &Metrics, topic: &str) -> u64 {
    metrics.records_lost.with_label_values(&["accounts", topic, "0"]).get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_records_are_counted_and_hold_the_projection_until_the_loss_is_accepted() {
    let raw::Accounts { _kafka, topic, db, client, settings, projections, bootstrap } = raw::setup(1, 50).await;
    raw::publish(&bootstrap, &topic, &[Raw::json(&opened("r-1", 10)), Raw::json(&opened("r-2", 20))]).await;
    let engine = Engine::start(&settings, &projections);
    common::wait_caught_up(&settings, &projections).await;
    engine.stop().await;
    let checkpoint = common::query_i64(&client, "SELECT next_offset FROM projector.checkpoints").await;
    assert_eq!(checkpoint, 2);

    // While no engine runs, the broker deletes the records after the checkpoint (and more).
    raw::publish(&bootstrap, &topic, &[Raw::json(&deposited("r-1", 2, 5))]).await;
    push_retention(&bootstrap, &topic).await;
    let low = log_start(&settings, &topic);
    assert!(low > checkpoint + 1, "the log start ({low}) passed the checkpoint ({checkpoint})");

    // Found before anything is read: counted once, the projection failed, nothing applied, the
    // checkpoint where it was.
    let engine = Engine::start(&settings, &projections);
    let metrics = engine.metrics.clone();
    common::wait_for("the loss to be counted and the projection failed", Duration::from_secs(30), || async {
        lost(&metrics, &topic) == (low - checkpoint) as u64 && metrics.current_state("accounts") == Some("failed")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(lost(&metrics, &topic), (low - checkpoint) as u64, "counted once, however often it is looked at");
    assert_eq!(metrics.current_state("accounts"), Some("failed"), "held until an operator acts");
    assert_eq!(common::query_i64(&client, "SELECT next_offset FROM projector.checkpoints").await, checkpoint);
    assert_eq!(account(&client, "r-1").await.map(|row| row.0), Some(1), "the deposit is gone, not applied");

    // `projector status` tells it too.
    let report = projector::status::collect(&settings, &projections).await.expect("status");
    let partition = &report.projections[0].partitions[0];
    assert_eq!((partition.state, partition.records_lost), ("records lost", low - checkpoint));

    // The operator accepts the loss: the running engine reads on from the log start.
    let moved = projector::rebuild::accept_data_loss(&settings, &projections[0]).await.expect("accept");
    assert_eq!(moved, vec![((topic.clone(), 0), checkpoint, low)]);
    raw::publish(&bootstrap, &topic, &[Raw::json(&opened("r-3", 30))]).await;
    common::wait_caught_up(&settings, &projections).await;
    common::wait_for("the projection to run again", Duration::from_secs(30), || async {
        metrics.current_state("accounts") == Some("running")
    })
    .await;
    assert_eq!(account(&client, "r-3").await.map(|row| row.1), Some("30".to_string()), "read on after the loss");
    let metrics = engine.stop().await;
    assert_eq!(lost(&metrics, &topic), (low - checkpoint) as u64);
    drop(client);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_skip_lost_records_are_counted_and_the_projection_reads_on() {
    let raw::Accounts { _kafka, topic, db, client, mut settings, projections, bootstrap } = raw::setup(1, 50).await;
    settings.kafka.on_data_loss = OnDataLoss::Skip;
    raw::publish(&bootstrap, &topic, &[Raw::json(&opened("s-1", 10))]).await;
    let engine = Engine::start(&settings, &projections);
    common::wait_caught_up(&settings, &projections).await;
    engine.stop().await;
    raw::publish(&bootstrap, &topic, &[Raw::json(&deposited("s-1", 2, 5))]).await;
    push_retention(&bootstrap, &topic).await;
    let low = log_start(&settings, &topic);
    raw::publish(&bootstrap, &topic, &[Raw::json(&opened("s-2", 7))]).await;

    let engine = Engine::start(&settings, &projections);
    common::wait_caught_up(&settings, &projections).await;
    let metrics = engine.stop().await;
    assert_eq!(lost(&metrics, &topic), (low - 1) as u64, "from the checkpoint (1) to the log start");
    assert_eq!(account(&client, "s-1").await.map(|row| row.0), Some(1), "the deposit was lost");
    assert_eq!(account(&client, "s-2").await.map(|row| row.1), Some("7".to_string()), "what followed was applied");
    assert_eq!(metrics.current_state("accounts"), Some("running"));
    drop(client);
    db.drop().await;
}
