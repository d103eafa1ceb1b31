//! `log.format = "json"`: `projector run` writes one JSON object per line, with the fields the
//! text log has, from start to shutdown.

use std::time::Duration;

use crate::common::{projector_command, unique, LogDir, Projector, TestDb};
use projector::demo::shop_event;
use projector::kafka::mock::MockKafka;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_with_the_events_fields() {
    let db = TestDb::create().await;
    let kafka = MockKafka::start(1).expect("mock kafka");
    kafka.create_topic("shop.orders", 2, 1).expect("topic");
    let events = [shop_event(
        "00000000-0000-0000-0000-000000000001",
        1,
        "OrderPlaced",
        serde_json::json!({"customer_id": "c-1", "total": "10.00"}),
    )];
    crate::common::produce_one_per_batch(&kafka.bootstrap_servers(), "shop.orders", &events).await;
    let logs = LogDir::new("json-logs");
    let log = logs.path.join("projector.log");
    let mut command = projector_command(&db.url, &kafka.bootstrap_servers(), &unique("json-logs"), &log);
    command.env("PROJECTOR_LOG__FORMAT", "json");
    let projector = Projector::spawn(command, &log, "json logs");
    let client = db.connect().await;
    crate::common::wait_for_rows(&client, &projector, "SELECT status FROM order_summary", &[&["placed"]]).await;
    let status = projector.signal_and_wait(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(30)).await;
    assert!(status.success(), "{status}");

    let text = std::fs::read_to_string(&log).expect("the log");
    let lines: Vec<&str> = text.lines().filter(|line| !line.starts_with("===== test:")).collect();
    assert!(lines.len() >= 5, "{text}");
    let objects: Vec<serde_json::Value> = lines
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|error| panic!("not a JSON object ({error}): {line}")))
        .collect();
    for object in &objects {
        for field in ["timestamp", "level", "target", "message"] {
            assert!(object.get(field).is_some(), "no `{field}` in {object}");
        }
    }
    let find = |message: &str| {
        objects
            .iter()
            .find(|object| object["message"] == message)
            .unwrap_or_else(|| panic!("no `{message}` line in:\n{text}"))
    };
    // The event's fields sit beside the message.
    let mut starting: Vec<&str> = objects
        .iter()
        .filter(|object| object["message"] == "projection starting" && object["level"] == "INFO")
        .filter_map(|object| object["projection"].as_str())
        .collect();
    starting.sort_unstable();
    assert_eq!(starting, ["customer_totals", "order_summary"], "{text}");
    find("stopped");
    drop(client);
    db.drop().await;
}
