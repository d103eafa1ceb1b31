//! One definition at a time: an instance still running an old definition of a projection cannot
//! commit once `projector accept` (or a rebuild) recorded a new one; it stops the projection,
//! saying why, and the instance running the new definition applies from there.

use std::time::Duration;

use projector::projection::compile_file;

use crate::common::{self, Engine};
use crate::raw::{self, deposited, opened, Raw};

/// The `accounts` projection with its `Deposited` note prefixed by `prefix`: another definition.
fn accounts_noting(topic: &str, prefix: &str) -> projector::projection::Projection {
    let text = format!(
        r#"name = "accounts"
topics = ["{topic}"]
[table]
name = "accounts"
key = "id"
[on.Opened]
insert = {{ owner = ":data.owner", balance = ":data.amount" }}
[on.Deposited]
update = {{ balance = "balance + :data.amount", note = "'{prefix}' || :data.note" }}
"#
    );
    compile_file(std::path::Path::new("accounts.toml"), &text).expect("compiles")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_running_an_old_definition_cannot_commit_after_accept() {
    let raw::Accounts { _kafka, topic, db, client, settings, bootstrap, .. } = raw::setup(2, 20).await;
    let old = vec![accounts_noting(&topic, "old:")];
    let new = vec![accounts_noting(&topic, "new:")];
    assert_ne!(old[0].hash, new[0].hash);

    let keys: Vec<String> = (0..6).map(|i| format!("d-{i}")).collect();
    let opened: Vec<Raw> = keys.iter().map(|key| Raw::json(&opened(key, 100))).collect();
    raw::publish(&bootstrap, &topic, &opened).await;
    let running_old = Engine::start(&settings, &old);
    common::wait_caught_up(&settings, &old).await;
    let deposits =
        |version: i64| -> Vec<Raw> { keys.iter().map(|key| Raw::json(&deposited(key, version, 1))).collect() };
    raw::publish(&bootstrap, &topic, &deposits(2)).await;
    common::wait_caught_up(&settings, &old).await;

    // The operator accepts the new definition while the old instance runs.
    let accepted = projector::rebuild::accept(&settings, &new[0]).await.expect("accept");
    assert!(accepted >= 1, "the checkpoints now carry the new definition");
    raw::publish(&bootstrap, &topic, &deposits(3)).await;
    let old_metrics = running_old.metrics.clone();
    common::wait_for("the old instance to stop the projection", Duration::from_secs(30), || async {
        old_metrics.current_state("accounts") == Some("failed")
    })
    .await;

    // The instance with the new definition applies what the old one could not.
    let running_new = Engine::start(&settings, &new);
    common::wait_caught_up(&settings, &new).await;
    raw::publish(&bootstrap, &topic, &deposits(4)).await;
    common::wait_caught_up(&settings, &new).await;
    let new_metrics = running_new.stop().await;
    let old_metrics = running_old.stop().await;

    let rows = client.query("SELECT id, version, note FROM accounts ORDER BY id", &[]).await.expect("accounts");
    for row in &rows {
        let (id, version, note): (String, i64, String) = (row.get(0), row.get(1), row.get(2));
        assert_eq!(version, 4, "{id}: every deposit applied once");
        assert_eq!(note, "new:deposit 4", "{id}");
    }
    assert_eq!(rows.len(), keys.len());
    // Deposits 3 and 4 were all applied by the new definition: the old one committed none.
    assert_eq!(new_metrics.outcome_count("accounts", projector::outcome::Outcome::Applied), 12);
    assert_eq!(old_metrics.outcome_count("accounts", projector::outcome::Outcome::Applied), 12);
    drop(client);
    db.drop().await;
}
