//! `/health/live` and `/health/ready`: readiness follows Postgres (cut by a TCP proxy, never by
//! stopping the shared server) and comes back with it.

use std::time::Duration;

use projector::kafka::mock::MockKafka;

use crate::common::engine::{publish, served_settings};
use crate::common::proxy::{host_port, via_port, TcpProxy};
use crate::common::scrape::http_get;
use crate::common::shop::{history, new_orders, PROJECTIONS};
use crate::common::*;

const TIMEOUT: Duration = Duration::from_secs(90);

async fn ready(engine: &Engine) -> (u16, serde_json::Value) {
    match http_get(&engine.address, "/health/ready").await {
        Ok((status, body)) => {
            let json =
                serde_json::from_str(&body).unwrap_or_else(|error| panic!("/health/ready body `{body}`: {error}"));
            (status, json)
        }
        Err(error) => (0, serde_json::json!({ "error": error.to_string() })),
    }
}

async fn wait_ready(engine: &Engine, want: bool) -> serde_json::Value {
    let what = if want { "ready" } else { "unready" };
    wait_for(&format!("/health/ready says {what}"), TIMEOUT, || async {
        let (status, body) = ready(engine).await;
        match (status, want) {
            (200, true) | (503, false) => Ok(body),
            _ => Err(format!("{status} {body}")),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ready_follows_postgres_through_a_cut_proxy() {
    let kafka = MockKafka::start(1).expect("mock cluster");
    let topic = new_topic(&kafka, 1);
    let db = TestDb::create().await;
    let proxy = TcpProxy::start(host_port(&db.url)).await;
    let settings = served_settings(&kafka, &via_port(&db.url, proxy.port));
    let projections = example_projections(&topic);
    publish(&settings, &topic, &history(2)).await;
    let engine = Engine::start(&settings, &projections);

    let body = wait_ready(&engine, true).await;
    assert_eq!(body["postgres"], "ok", "{body}");
    assert_eq!(body["kafka"], "ok", "{body}");
    for projection in PROJECTIONS {
        assert_eq!(body["projections"][projection], "running", "{body}");
    }

    proxy.cut();
    let body = wait_ready(&engine, false).await;
    assert_ne!(body["postgres"], "ok", "{body}");
    assert_eq!(body["kafka"], "ok", "only Postgres is unreachable: {body}");
    let (status, live) = http_get(&engine.address, "/health/live").await.expect("GET /health/live");
    assert_eq!(status, 200, "the process still works while Postgres is away: {live}");

    proxy.restore();
    let body = wait_ready(&engine, true).await;
    assert_eq!(body["postgres"], "ok", "{body}");

    // And it still projects: events published after the outage are applied.
    publish(&settings, &topic, &new_orders(3)).await;
    projector::demo::wait_caught_up(&settings, &projections, TIMEOUT).await.expect("caught up after the outage");
    engine.stop().await;
    drop(proxy);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unready_until_kafka_is_reached_and_projections_run() {
    // A broker that is down from the start: live, but never ready.
    let kafka = MockKafka::start(1).expect("mock cluster");
    let topic = new_topic(&kafka, 1);
    let db = TestDb::create().await;
    let settings = served_settings(&kafka, &db.url);
    let projections = example_projections(&topic);
    kafka.broker_down(1).expect("broker down");
    let engine = Engine::start(&settings, &projections);
    let (status, _) = wait_for("/health/live answers", TIMEOUT, || async {
        http_get(&engine.address, "/health/live").await.map_err(|error| error.to_string())
    })
    .await;
    assert_eq!(status, 200);
    // Several lag refreshes later it is still unready, because Kafka is unreachable.
    let mut last = serde_json::Value::Null;
    for _ in 0..5 {
        let (status, body) = ready(&engine).await;
        assert_eq!(status, 503, "ready without Kafka: {body}");
        last = body;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_ne!(last["kafka"], "ok", "{last}");
    kafka.broker_up(1).expect("broker up");
    let body = wait_ready(&engine, true).await;
    assert_eq!(body["kafka"], "ok", "{body}");
    engine.stop().await;
    db.drop().await;
}
