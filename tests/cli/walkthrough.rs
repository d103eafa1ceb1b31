//! The README's walkthrough, "Adding a projection", followed step by step with the binary: the
//! files it shows are written as they are shown, its commands run in its order, against a
//! running engine (`projector run` with another projection, on librdkafka's mock cluster) and
//! real PostgreSQL; then the fixture's events are published and the engine builds the rows the
//! fixture expects, while the other projection runs on.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::common::{projector_command, projector_subcommand, wait_for, LogDir, Projector, TestDb};
use nix::sys::signal::Signal;
use projector::demo::{shop_event, ShopEvent};
use projector::kafka::mock::MockKafka;

/// The walkthrough's code blocks: (language, text), in order.
fn walkthrough() -> Vec<(String, String)> {
    let readme = include_str!("../../README.md");
    let start = readme.find("\n## Adding a projection\n").expect("the README has the walkthrough");
    let section = &readme[start + 1..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |end| end + 3)];
    let mut blocks = Vec::new();
    let mut rest = section;
    while let Some(open) = rest.find("```") {
        let after = &rest[open + 3..];
        let (language, body) = after.split_once('\n').expect("a fenced block");
        let close = body.find("```").expect("a closed block");
        blocks.push((language.trim().to_string(), body[..close].to_string()));
        rest = &body[close + 3..];
    }
    blocks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_walkthrough_adds_a_tested_projection_to_a_running_engine() {
    let blocks = walkthrough();
    let db = TestDb::create().await;
    let client = db.connect().await;
    let kafka = MockKafka::start(1).expect("mock kafka");
    kafka.create_topic("bank.accounts", 2, 1).expect("topic");
    kafka.create_topic(projector::demo::TOPIC, 2, 1).expect("topic");
    let bootstrap = kafka.bootstrap_servers();
    let dir = LogDir::new("walkthrough");
    let projections = dir.path.join("projections");

    // An engine already running another team's projection.
    std::fs::create_dir_all(projections.join("order_summary/migrations")).expect("folder");
    let examples = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/projections"));
    for file in ["order_summary.toml", "order_summary/migrations/V1__create_order_summary.sql"] {
        std::fs::copy(examples.join(file), projections.join(file)).expect("copying the example");
    }
    let log = dir.path.join("projector.log");
    let with_folder = |mut command: std::process::Command| {
        command.env("PROJECTOR_PROJECTIONS_DIR", &projections);
        command
    };
    let engine = Projector::spawn(with_folder(projector_command(&db.url, &bootstrap, "walk", &log)), &log, "run");
    engine.wait_started(Duration::from_secs(60)).await;
    let order = shop_event(
        "00000000-0000-0000-0000-0000000000c1",
        1,
        "OrderPlaced",
        serde_json::json!({"customer_id": "c", "total": "5.00"}),
    );
    crate::common::produce_one_per_batch(&bootstrap, projector::demo::TOPIC, &[order]).await;

    // The files, as the walkthrough shows them: each block's first line names its path.
    let mut written = Vec::new();
    for (language, text) in blocks.iter().filter(|(language, _)| language == "toml" || language == "sql") {
        let first = text.lines().next().unwrap_or_default();
        let path = first.trim_start_matches(['#', '-', ' ']);
        assert!(path.starts_with("projections/"), "a {language} block names its file on its first line: {first}");
        let target = dir.path.join(path);
        std::fs::create_dir_all(target.parent().expect("a folder")).expect("folder");
        std::fs::write(&target, text).expect("writing a walkthrough file");
        written.push(path.to_string());
    }
    assert_eq!(
        written,
        [
            "projections/accounts.toml",
            "projections/accounts/migrations/V1__create_accounts.sql",
            "projections/accounts/tests/deposits.toml"
        ]
    );

    // The commands, in order.
    let commands = &blocks.iter().find(|(language, _)| language == "sh").expect("the commands").1;
    let mut ran = Vec::new();
    for line in commands.lines() {
        let command = line.split("  #").next().unwrap_or_default().trim();
        if let Some(arguments) = command.strip_prefix("projector ") {
            let arguments: Vec<&str> = arguments.split_whitespace().collect();
            let output = with_folder(projector_subcommand(
                &arguments,
                &db.url,
                &bootstrap,
                "walk",
                &dir.path.join("commands.log"),
            ))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .expect("running a walkthrough command");
            let printed =
                format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
            assert!(output.status.success(), "`{command}` failed: {printed}");
            assert!(printed.contains("accounts"), "`{command}` speaks of the new projection: {printed}");
        } else if command.starts_with("kill -HUP") {
            engine.signal(Signal::SIGHUP);
            wait_for("the engine to start `accounts`", Duration::from_secs(30), || async {
                engine.assert_running();
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                match text.contains("projection starting projection=accounts")
                    || text.contains("projection=accounts topics")
                {
                    true => Ok(()),
                    false => Err("not yet".to_string()),
                }
            })
            .await;
        } else {
            panic!("a walkthrough command this test does not know: {command}");
        }
        ran.push(command.to_string());
    }
    assert_eq!(ran.len(), 5, "{ran:?}");

    // The fixture's events, published: the running engine builds the rows the fixture expects.
    let fixture: toml::Table =
        toml::from_str(&std::fs::read_to_string(dir.path.join("projections/accounts/tests/deposits.toml")).unwrap())
            .unwrap();
    let events: Vec<ShopEvent> = fixture["event"]
        .as_array()
        .expect("events")
        .iter()
        .map(|event| ShopEvent {
            key: event["key"].as_str().expect("a key").to_string(),
            value: serde_json::to_value(&event["value"]).expect("JSON"),
        })
        .collect();
    crate::common::produce_one_per_batch(&bootstrap, "bank.accounts", &events).await;
    crate::common::wait_for_rows(
        &client,
        &engine,
        "SELECT account_id, owner, balance::text, version::text FROM accounts ORDER BY account_id",
        &[&["acc-1", "Ada", "75", "4"], &["acc-2", "Grace", "0", "1"]],
    )
    .await;
    // The other projection ran on throughout.
    let orders: i64 = client.query_one("SELECT count(*) FROM order_summary", &[]).await.expect("orders").get(0);
    assert_eq!(orders, 1);
    let status = engine.signal_and_wait(Signal::SIGTERM, Duration::from_secs(30)).await;
    assert!(status.success(), "{status}");
    drop(client);
    db.drop().await;
}
