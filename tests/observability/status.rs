//! `projector status` reads Postgres and Kafka directly: it reports lag with no engine running.

use std::process::Command;
use std::time::Duration;

use projector::kafka::mock::MockKafka;

use crate::common::engine::{publish, served_settings};
use crate::common::process::repo_path;
use crate::common::shop::{history, new_orders, PROJECTIONS};
use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_reports_lag_with_no_engine_running() {
    let kafka = MockKafka::start(1).expect("mock cluster");
    let topic = new_topic(&kafka, 2);
    let db = TestDb::create().await;
    let settings = served_settings(&kafka, &db.url);
    let projections = example_projections(&topic);
    let first = history(4);
    publish(&settings, &topic, &first).await;
    let engine = Engine::start(&settings, &projections);
    projector::demo::wait_caught_up(&settings, &projections, Duration::from_secs(90)).await.expect("caught up");
    engine.stop().await;
    let more = new_orders(3);
    publish(&settings, &topic, &more).await;

    // The definition files, reading this test's topic.
    let dir = tempfile::tempdir().expect("temporary folder");
    let projections_dir = dir.path().join("projections");
    std::fs::create_dir(&projections_dir).expect("creating the projections folder");
    for name in PROJECTIONS {
        let text = std::fs::read_to_string(repo_path(&format!("projections/{name}.toml"))).expect("example definition");
        let text = text.replace("topics = [\"shop.orders\"]", &format!("topics = [\"{topic}\"]"));
        std::fs::write(projections_dir.join(format!("{name}.toml")), text).expect("writing a definition");
    }
    let run = |json: bool| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_projector"));
        command
            .arg("status")
            .current_dir(dir.path())
            .env_remove("PROJECTOR_CONFIG")
            .env("DATABASE_URL", &db.url)
            .env("PROJECTOR_KAFKA__BOOTSTRAP_SERVERS", &settings.kafka.bootstrap_servers)
            .env("PROJECTOR_PROJECTIONS_DIR", &projections_dir)
            .env("RUST_LOG", "warn");
        if json {
            command.arg("--json");
        }
        let output = command.output().expect("running projector status");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "projector status failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    };

    let report: serde_json::Value = serde_json::from_str(&run(true)).expect("status --json prints JSON");
    let listed = report["projections"].as_array().expect("projections");
    assert_eq!(listed.len(), 2, "{report:#}");
    for projection in listed {
        assert_eq!(projection["lag_messages"], more.len() as i64, "{projection:#}");
        assert!(projection["last_commit_age_seconds"].as_f64().is_some(), "{projection:#}");
        let partitions = projection["partitions"].as_array().expect("partitions");
        assert_eq!(partitions.len(), 2, "{projection:#}");
        let checkpoints: i64 = partitions.iter().map(|p| p["checkpoint"].as_i64().unwrap_or(0)).sum();
        let ends: i64 = partitions.iter().map(|p| p["end_offset"].as_i64().expect("end offset")).sum();
        assert_eq!(checkpoints, first.len() as i64, "{projection:#}");
        assert_eq!(ends, (first.len() + more.len()) as i64, "{projection:#}");
        for partition in partitions {
            let lag = partition["lag_messages"].as_i64().expect("lag");
            let state = partition["state"].as_str().expect("state");
            let expected = match (lag, partition["checkpoint"].is_null()) {
                (0, _) => "caught up",
                (_, true) => "not started",
                _ => "behind",
            };
            assert_eq!(state, expected, "{partition:#}");
            if lag > 0 {
                assert!(partition["lag_seconds"].as_f64().is_some_and(|s| s >= 0.0), "{partition:#}");
            }
            assert!(partition["rebuild_progress"].is_null(), "{partition:#}");
        }
    }

    let table = run(false);
    eprintln!("{table}");
    for name in PROJECTIONS {
        assert!(table.contains(&format!("{name}: lag 3 message(s)")), "{table}");
    }
    assert!(table.contains("end offset") && table.contains(&topic), "{table}");
    db.drop().await;
}
