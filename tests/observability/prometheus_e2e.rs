//! A real Prometheus server, started on loopback with the alert rules of deploy/ loaded, scrapes an
//! engine every second; PromQL through its HTTP API returns the lag per projection.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use projector::kafka::mock::MockKafka;

use crate::common::db::WriteLock;
use crate::common::engine::{publish, served_settings};
use crate::common::process::{repo_path, require_tool};
use crate::common::scrape::{encode, http_get};
use crate::common::shop::{history, new_orders, PROJECTIONS};
use crate::common::*;

const TIMEOUT: Duration = Duration::from_secs(120);

/// A Prometheus server of this test's own; killed on drop (its log printed when the test failed).
struct Prometheus {
    child: Child,
    address: String,
    log: std::path::PathBuf,
}

impl Prometheus {
    fn start(dir: &Path, target: &str) -> Prometheus {
        let binary = require_tool("prometheus");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {rules}\nscrape_configs:\n  - job_name: projector\n    static_configs:\n      - targets: ['{target}']\n",
                rules = repo_path("deploy/prometheus/alerts.yml").display()
            ),
        )
        .expect("writing prometheus.yml");
        let address = format!("127.0.0.1:{}", free_port());
        let log = dir.join("prometheus.log");
        let log_file = std::fs::File::create(&log).expect("creating the log");
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={address}"))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .spawn()
            .expect("starting prometheus");
        Prometheus { child, address, log }
    }

    /// `GET /api/v1/query?query=…`: the result vector as `(labels, value)`.
    async fn query(&self, promql: &str) -> Result<Vec<(serde_json::Value, f64)>, String> {
        let (status, body) = http_get(&self.address, &format!("/api/v1/query?query={}", encode(promql)))
            .await
            .map_err(|error| format!("prometheus not answering: {error}"))?;
        if status != 200 {
            return Err(format!("{status}: {body}"));
        }
        let json: serde_json::Value = serde_json::from_str(&body).map_err(|error| format!("{error}: {body}"))?;
        let result = json["data"]["result"].as_array().ok_or_else(|| format!("no result: {body}"))?;
        Ok(result
            .iter()
            .map(|series| {
                let value = series["value"][1].as_str().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
                (series["metric"].clone(), value)
            })
            .collect())
    }

    /// Waits until `promql` returns one series per projection, each with value `want`.
    async fn wait_per_projection(&self, promql: &str, want: f64) -> Vec<(serde_json::Value, f64)> {
        wait_for(&format!("`{promql}` = {want} per projection"), TIMEOUT, || async {
            let result = self.query(promql).await?;
            let mut projections: Vec<&str> =
                result.iter().filter_map(|(labels, _)| labels["projection"].as_str()).collect();
            projections.sort();
            let mut expected = PROJECTIONS.to_vec();
            expected.sort();
            if projections == expected && result.iter().all(|(_, value)| *value == want) {
                Ok(result)
            } else {
                Err(format!("{result:?}"))
            }
        })
        .await
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!("--- prometheus log (last lines) ---");
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prometheus_scrapes_the_lag_per_projection() {
    let kafka = MockKafka::start(1).expect("mock cluster");
    let topic = new_topic(&kafka, 3);
    let db = TestDb::create().await;
    let settings = served_settings(&kafka, &db.url);
    let projections = example_projections(&topic);
    publish(&settings, &topic, &history(5)).await;
    let engine = Engine::start(&settings, &projections);
    projector::demo::wait_caught_up(&settings, &projections, TIMEOUT).await.expect("caught up");

    let dir = tempfile::tempdir().expect("temporary folder");
    let prometheus = Prometheus::start(dir.path(), &engine.address);
    wait_for("prometheus ready", TIMEOUT, || async {
        match http_get(&prometheus.address, "/-/ready").await {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // The target is up and the lag per projection is 0.
    let up = wait_for("the engine's target is up", TIMEOUT, || async {
        let result = prometheus.query("up{job=\"projector\"}").await?;
        if result.len() == 1 && result[0].1 == 1.0 {
            Ok(result)
        } else {
            Err(format!("{result:?}"))
        }
    })
    .await;
    eprintln!("up: {up:?}");
    let promql = "sum by (projection) (projector_consumer_lag_messages{mode=\"live\"})";
    let caught_up = prometheus.wait_per_projection(promql, 0.0).await;
    eprintln!("caught up, {promql}: {caught_up:?}");
    let per_partition = prometheus.query("projector_consumer_lag_messages").await.expect("query");
    assert_eq!(per_partition.len(), 2 * 3, "one series per projection and partition: {per_partition:?}");

    // Held back, 4 more events: Prometheus sees a lag of 4 per projection, and an age above 0.
    let lock = WriteLock::take(&db.url).await;
    publish(&settings, &topic, &new_orders(4)).await;
    let behind = prometheus.wait_per_projection(promql, 4.0).await;
    eprintln!("held back, {promql}: {behind:?}");
    let age = wait_for("lag in seconds above 0 in prometheus", TIMEOUT, || async {
        let result = prometheus.query("max by (projection) (projector_consumer_lag_seconds{mode=\"live\"})").await?;
        if result.len() == 2 && result.iter().all(|(_, seconds)| *seconds > 0.0) {
            Ok(result)
        } else {
            Err(format!("{result:?}"))
        }
    })
    .await;
    eprintln!("held back, max lag seconds: {age:?}");

    // Released: back to 0.
    lock.release().await;
    let released = prometheus.wait_per_projection(promql, 0.0).await;
    eprintln!("released, {promql}: {released:?}");

    // The alert rules of deploy/ loaded and evaluate without errors.
    let (status, body) = http_get(&prometheus.address, "/api/v1/rules").await.expect("GET /api/v1/rules");
    assert_eq!(status, 200, "{body}");
    let rules: serde_json::Value = serde_json::from_str(&body).expect("rules JSON");
    let groups = rules["data"]["groups"].as_array().expect("rule groups");
    let loaded: Vec<&serde_json::Value> =
        groups.iter().flat_map(|g| g["rules"].as_array().into_iter().flatten()).collect();
    assert!(loaded.len() >= 5, "alert rules loaded: {body}");
    for rule in loaded {
        assert_ne!(rule["health"], "err", "rule {} fails: {}", rule["name"], rule["lastError"]);
    }
    drop(prometheus);
    engine.stop().await;
    db.drop().await;
}
