//! The metrics' values match reality, and the exposition and deploy/ files pass promtool.

use std::process::{Command, Stdio};
use std::time::Duration;

use projector::kafka::mock::MockKafka;

use crate::common::db::WriteLock;
use crate::common::engine::{publish, served_settings};
use crate::common::process::{repo_path, require_tool};
use crate::common::scrape::Exposition;
use crate::common::shop::{history, new_orders, PROJECTIONS};
use crate::common::*;

const TIMEOUT: Duration = Duration::from_secs(90);

/// Waits until every projection shows `lag` messages in total over `partitions` live lag series,
/// and returns that scrape.
async fn wait_for_lag(engine: &Engine, partitions: usize, lag: f64) -> Exposition {
    wait_for(&format!("lag of {lag} per projection"), TIMEOUT, || async {
        let scraped = engine.scrape().await;
        let per_projection: Vec<(usize, f64)> = PROJECTIONS
            .iter()
            .map(|p| {
                let filter = [("projection", *p), ("mode", "live")];
                (
                    scraped.count("projector_consumer_lag_messages", &filter),
                    scraped.sum("projector_consumer_lag_messages", &filter),
                )
            })
            .collect();
        if per_projection.iter().all(|(series, total)| *series == partitions && *total == lag) {
            Ok(scraped)
        } else {
            Err(format!("(series, lag) per projection: {per_projection:?}"))
        }
    })
    .await
}

fn events_total(scraped: &Exposition, projection: &str) -> f64 {
    scraped.sum("projector_events_total", &[("projection", projection)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lag_and_counters_match_reality() {
    let kafka = MockKafka::start(1).expect("mock cluster");
    let topic = new_topic(&kafka, 2);
    let db = TestDb::create().await;
    let settings = served_settings(&kafka, &db.url);
    let projections = example_projections(&topic);

    let first = history(6);
    let applied = first.len() as f64;
    publish(&settings, &topic, &first).await;
    let engine = Engine::start(&settings, &projections);
    projector::demo::wait_caught_up(&settings, &projections, TIMEOUT).await.expect("caught up");

    // Caught up: lag 0, counters N, checkpoints and end offsets N over the partitions.
    let scraped = wait_for_lag(&engine, 2, 0.0).await;
    for projection in PROJECTIONS {
        assert_eq!(events_total(&scraped, projection), applied, "{projection}: events_total\n{}", scraped.text);
        assert_eq!(scraped.sum("projector_log_end_offset", &[("projection", projection)]), applied);
        assert_eq!(scraped.sum("projector_checkpoint_offset", &[("projection", projection)]), applied);
        assert_eq!(scraped.max("projector_consumer_lag_seconds", &[("projection", projection)]), Some(0.0));
        assert!(scraped.sum("projector_last_commit_timestamp_seconds", &[("projection", projection)]) > 0.0);
        assert_eq!(scraped.sum("projector_projection_state", &[("projection", projection), ("state", "running")]), 1.0);
        assert_eq!(scraped.sum("projector_batch_events_sum", &[("projection", projection)]), applied);
    }
    // The demo history arrives in order: every event applies to the per-order projection.
    assert_eq!(
        scraped.sum("projector_events_total", &[("projection", "order_summary"), ("outcome", "applied")]),
        applied
    );

    // Held back: M more events make lag M, and its age grows while nothing is applied.
    let lock = WriteLock::take(&db.url).await;
    let more = new_orders(5);
    publish(&settings, &topic, &more).await;
    let behind = wait_for_lag(&engine, 2, more.len() as f64).await;
    let age = |scraped: &Exposition| scraped.max("projector_consumer_lag_seconds", &[("mode", "live")]).unwrap_or(0.0);
    let first_age = age(&behind);
    wait_for("lag in seconds grows while held back", TIMEOUT, || async {
        let now = engine.scrape().await;
        let still_behind =
            PROJECTIONS.iter().all(|p| now.sum("projector_consumer_lag_messages", &[("projection", p)]) == 5.0);
        match (still_behind, age(&now)) {
            (true, seconds) if seconds > first_age && seconds > 0.0 => Ok(()),
            (behind, seconds) => Err(format!("lag still 5: {behind}, age {seconds} (first {first_age})")),
        }
    })
    .await;
    for projection in PROJECTIONS {
        assert_eq!(events_total(&engine.scrape().await, projection), applied, "nothing applied while held back");
    }

    // Released: both return to 0, and the counters say N + M.
    lock.release().await;
    wait_for_lag(&engine, 2, 0.0).await;
    let scraped = wait_for("lag in seconds back to 0", TIMEOUT, || async {
        let fresh = engine.scrape().await;
        match fresh.max("projector_consumer_lag_seconds", &[("mode", "live")]) {
            Some(0.0) => Ok(fresh),
            other => Err(format!("max lag seconds {other:?}")),
        }
    })
    .await;
    for projection in PROJECTIONS {
        assert_eq!(events_total(&scraped, projection), applied + more.len() as f64, "{projection}");
    }
    engine.stop().await;
    db.drop().await;
}

/// Pipes `text` into `promtool check metrics`; returns its output when it complains.
fn promtool_check_metrics(text: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new(require_tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running promtool");
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("writing to promtool");
    let output = child.wait_with_output().expect("promtool finished");
    let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    // promtool exits 0 on lint problems too (3 for lint-only problems in newer versions): any
    // output is a problem.
    if output.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(said)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exposition_passes_promtool_check_metrics() {
    let kafka = MockKafka::start(1).expect("mock cluster");
    let topic = new_topic(&kafka, 2);
    let db = TestDb::create().await;
    let settings = served_settings(&kafka, &db.url);
    let projections = example_projections(&topic);
    publish(&settings, &topic, &history(4)).await;
    let engine = Engine::start(&settings, &projections);
    projector::demo::wait_caught_up(&settings, &projections, TIMEOUT).await.expect("caught up");
    wait_for_lag(&engine, 2, 0.0).await;
    // Rebuilds do not exist yet: set the ratio by hand so that promtool sees the family too.
    engine.metrics.set_rebuild_progress("order_summary", 0.5);
    let scraped = engine.scrape().await;
    // Every family of the contract is there (process metrics included).
    for name in [
        "projector_consumer_lag_messages",
        "projector_consumer_lag_seconds",
        "projector_checkpoint_offset",
        "projector_log_end_offset",
        "projector_events_total",
        "projector_batch_duration_seconds_bucket",
        "projector_batch_events_bucket",
        "projector_last_commit_timestamp_seconds",
        "projector_projection_state",
        "projector_rebuild_progress_ratio",
        "projector_build_info",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        assert!(scraped.count(name, &[]) > 0, "`{name}` missing from /metrics:\n{}", scraped.text);
    }
    // Outcomes are there from the start, at 0, for every handled type.
    for outcome in ["applied", "duplicate", "gap", "ignored", "parked"] {
        assert!(scraped.count("projector_events_total", &[("projection", "order_summary"), ("outcome", outcome)]) > 0);
    }
    // Bounded labels: no offset, key or error text in any label.
    for sample in &scraped.samples {
        for label in sample.labels.keys() {
            assert!(
                ["projection", "topic", "partition", "mode", "event_type", "outcome", "state", "version", "path", "le"]
                    .contains(&label.as_str()),
                "unexpected label `{label}` on {}",
                sample.name
            );
        }
    }
    promtool_check_metrics(&scraped.text)
        .unwrap_or_else(|said| panic!("promtool check metrics:\n{said}\n{}", scraped.text));
    engine.stop().await;
    db.drop().await;
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let promtool = require_tool("promtool");
    let rules = repo_path("deploy/prometheus/alerts.yml");
    let output = Command::new(&promtool).arg("check").arg("rules").arg(&rules).output().expect("running promtool");
    assert!(
        output.status.success(),
        "promtool check rules {}:\n{}{}",
        rules.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let tests = repo_path("deploy/prometheus/alerts_test.yml");
    let output = Command::new(&promtool).arg("test").arg("rules").arg(&tests).output().expect("running promtool");
    assert!(
        output.status.success(),
        "promtool test rules {}:\n{}{}",
        tests.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Every `projector_*` name the alert rules and the dashboard use is one the engine exports.
#[test]
fn deploy_files_use_only_exported_metrics() {
    let metrics = projector::metrics::Metrics::new();
    metrics.set_rebuild_progress("p", 0.1);
    metrics.register_projection("p", []);
    metrics.set_state("p", "running");
    metrics.batch_duration.with_label_values(&["p"]).observe(0.1);
    metrics.batch_events.with_label_values(&["p"]).observe(1.0);
    metrics.last_commit.with_label_values(&["p"]).set(1);
    metrics.record_lost("p", "t", 0, 1);
    metrics.record_lag(&projector::metrics::LagSample {
        projection: "p",
        topic: "t",
        partition: 0,
        mode: "live",
        end_offset: 1,
        checkpoint: Some(1),
        lag_messages: 0,
        lag_seconds: Some(0.0),
    });
    let exported = Exposition::parse(&metrics.encode());
    for file in ["deploy/prometheus/alerts.yml", "deploy/grafana/projector-dashboard.json"] {
        let text = std::fs::read_to_string(repo_path(file)).expect("reading a deploy file");
        let mut used: Vec<&str> = text
            .match_indices("projector_")
            .map(|(at, _)| {
                let rest = &text[at..];
                let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
                &rest[..end]
            })
            .collect();
        used.sort();
        used.dedup();
        assert!(!used.is_empty(), "{file} uses no projector metric");
        for name in used {
            assert!(exported.count(name, &[]) > 0, "{file} uses `{name}`, which the engine does not export");
        }
    }
}
