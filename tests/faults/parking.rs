//! Per-key parking: a poison event parks its key's later events while other keys move on;
//! `parked retry` after fixing the definition applies them in order; `parked skip` records its
//! reason; a gap whose predecessor does not come in time is parked the same way.

use std::time::Duration;

use projector::outcome::Outcome;
use projector::store::parked::{self, Filter, ParkedError, Selection};
use serde_json::json;

use crate::common::{self, Engine};
use crate::raw::{self, account, dead_letters, deposited, event, opened, Raw};

fn class_and_state(rows: &[(Option<String>, String, String, String)], key: &str) -> Vec<(String, String)> {
    rows.iter()
        .filter(|(k, ..)| k.as_deref() == Some(key))
        .map(|(_, class, state, _)| (class.clone(), state.clone()))
        .collect()
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_parks_its_key_retry_applies_in_order_skip_records_why() {
    let raw::Accounts { _kafka, topic, db, client, mut settings, projections: broken, bootstrap } =
        raw::setup(2, 50).await;
    settings.parking.gap_timeout_secs = 1;

    // A: its second event lacks the required `note` (poison); B: its third would make the balance
    // negative (a CHECK constraint: poison); C: all fine; D: version 2 never comes (a gap).
    let no_note = event("A", 2, "Deposited", json!({"amount": 10}));
    let first: Vec<Raw> = [
        opened("A", 100),
        opened("B", 50),
        opened("C", 1),
        opened("D", 5),
        no_note,
        deposited("B", 2, 7),
        deposited("C", 2, 1),
        deposited("A", 3, 5),
        deposited("B", 3, -100),
        deposited("C", 3, 1),
        deposited("D", 3, 1),
        deposited("B", 4, 1),
    ]
    .iter()
    .map(Raw::json)
    .collect();
    raw::publish(&bootstrap, &topic, &first).await;
    let engine = Engine::start(&settings, &broken);
    common::wait_caught_up(&settings, &broken).await;
    // D's gap times out after 1 s; then D's next event is parked behind it, in a later batch, as
    // is A's next event.
    common::wait_for("D's gap to be parked", Duration::from_secs(30), || async {
        common::query_i64(&client, "SELECT count(*) FROM projector.dead_letters WHERE error_class = 'gap_timeout'")
            .await
            == 1
    })
    .await;
    raw::publish(&bootstrap, &topic, &[Raw::json(&deposited("A", 4, 1)), Raw::json(&deposited("D", 4, 1))]).await;
    common::wait_caught_up(&settings, &broken).await;
    let metrics = engine.stop().await;

    assert_eq!(account(&client, "A").await, Some((1, "100".into(), None)));
    assert_eq!(account(&client, "B").await, Some((2, "57".into(), Some("deposit 2".into()))));
    assert_eq!(account(&client, "C").await, Some((3, "3".into(), Some("deposit 3".into()))), "other keys moved on");
    assert_eq!(account(&client, "D").await, Some((1, "5".into(), None)));
    let rows = dead_letters(&client).await;
    assert_eq!(
        class_and_state(&rows, "A"),
        pairs(&[("poison", "parked"), ("blocked", "parked"), ("blocked", "parked")])
    );
    assert_eq!(class_and_state(&rows, "B"), pairs(&[("poison", "parked"), ("blocked", "parked")]));
    assert_eq!(class_and_state(&rows, "D"), pairs(&[("gap_timeout", "parked"), ("blocked", "parked")]));
    assert!(class_and_state(&rows, "C").is_empty());
    let errors: Vec<&str> = rows.iter().map(|(_, _, _, error)| error.as_str()).collect();
    assert!(errors[0].contains("parameter `:data.note` is missing"), "{errors:?}");
    assert!(
        rows.iter().any(|(key, class, _, error)| key.as_deref() == Some("B")
            && class == "poison"
            && error.contains("accounts_balance_check")),
        "{rows:?}"
    );
    assert!(
        rows.iter().any(|(key, class, _, error)| key.as_deref() == Some("D")
            && class == "gap_timeout"
            && error.contains("did not arrive within 1 s")),
        "{rows:?}"
    );
    assert_eq!(metrics.outcome_count("accounts", Outcome::Parked), 6, "{:?}", common::outcomes(&metrics, "accounts"));
    assert_eq!(metrics.outcome_count("accounts", Outcome::Gap), 1);
    assert_eq!(metrics.gap_timeouts.with_label_values(&["accounts"]).get(), 1);
    assert_eq!(common::query_i64(&client, "SELECT count(*) FROM projector.held_events").await, 0);

    // `parked list` by key and by error.
    let pool = projector::store::connect(&db.url, 1).await.expect("pool");
    let mut admin = pool.get().await.expect("connection");
    let listed =
        parked::list(&**admin, &Filter { key: Some("A".into()), limit: 100, ..Filter::default() }).await.expect("list");
    assert_eq!(listed.iter().map(|p| p.record.offset).collect::<Vec<_>>().len(), 3);
    assert!(listed.windows(2).all(|w| w[0].id < w[1].id));
    let by_error =
        parked::list(&**admin, &Filter { error: Some("BALANCE_CHECK".into()), limit: 100, ..Filter::default() })
            .await
            .expect("list");
    assert_eq!(by_error.len(), 1);
    assert_eq!(by_error[0].entity_key.as_deref(), Some("B"));

    // Retrying A before the fix parks its first event again; nothing of A changes.
    let results = parked::retry(&mut admin, &broken[0], &Selection::Key("A".into())).await.expect("retry");
    assert!(results[0].done.is_empty() && results[0].parked_again.is_some(), "{results:?}");
    assert_eq!(account(&client, "A").await, Some((1, "100".into(), None)));
    let attempts =
        common::query_i64(&client, "SELECT max(attempts)::bigint FROM projector.dead_letters WHERE entity_key = 'A'")
            .await;
    assert_eq!(attempts, 1);

    // The fix: `note` becomes optional. A changed definition must be accepted (or rebuilt) first.
    let fixed = vec![raw::accounts(&topic, true)];
    let refused = parked::retry(&mut admin, &fixed[0], &Selection::Key("A".into())).await;
    assert!(matches!(refused, Err(ParkedError::DefinitionChanged { .. })), "{refused:?}");
    projector::rebuild::accept(&settings, &fixed[0]).await.expect("accept");
    let results = parked::retry(&mut admin, &fixed[0], &Selection::Key("A".into())).await.expect("retry");
    assert_eq!(results.len(), 1);
    let outcomes: Vec<&str> = results[0].done.iter().map(|(_, outcome)| outcome.as_str()).collect();
    assert_eq!(outcomes, ["applied", "applied", "applied"], "{results:?}");
    assert_eq!(account(&client, "A").await, Some((4, "116".into(), Some("deposit 4".into()))), "applied in order");

    // Skip B's parked events, with the reason; B's next event applies again.
    let skipped = parked::skip(&mut admin, "accounts", &Selection::Key("B".into()), "refunded by hand, ticket 4711")
        .await
        .expect("skip");
    assert_eq!(skipped.len(), 2);
    let reasons = client
        .query(
            "SELECT d.state, d.resolution, a.action, a.reason FROM projector.dead_letters d
               JOIN projector.parked_actions a ON a.dead_letter_id = d.id WHERE d.entity_key = 'B' ORDER BY d.id",
            &[],
        )
        .await
        .expect("actions");
    assert_eq!(reasons.len(), 2);
    for row in &reasons {
        assert_eq!(row.get::<_, String>(0), "skipped");
        assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("refunded by hand, ticket 4711"));
        assert_eq!(row.get::<_, String>(2), "skip");
        assert_eq!(row.get::<_, Option<String>>(3).as_deref(), Some("refunded by hand, ticket 4711"));
    }

    // D: retrying its timed-out gap holds it again (its predecessor is still missing), then the
    // predecessor arrives and the engine applies all three in order.
    let results = parked::retry(&mut admin, &fixed[0], &Selection::Key("D".into())).await.expect("retry");
    let outcomes: Vec<&str> = results[0].done.iter().map(|(_, outcome)| outcome.as_str()).collect();
    assert_eq!(outcomes, ["gap", "gap"], "{results:?}");
    assert_eq!(
        common::query_i64(&client, "SELECT count(*) FROM projector.held_events WHERE entity_key = 'D'").await,
        2
    );

    let mut settings = settings.clone();
    settings.parking.gap_timeout_secs = 600;
    let engine = Engine::start(&settings, &fixed);
    raw::publish(
        &bootstrap,
        &topic,
        &[Raw::json(&deposited("A", 5, 1000)), Raw::json(&deposited("B", 3, 1)), Raw::json(&deposited("D", 2, 1))],
    )
    .await;
    common::wait_caught_up(&settings, &fixed).await;
    let metrics = engine.stop().await;
    assert_eq!(account(&client, "A").await, Some((5, "1116".into(), Some("deposit 5".into()))));
    assert_eq!(account(&client, "B").await, Some((3, "58".into(), Some("deposit 3".into()))));
    assert_eq!(account(&client, "D").await, Some((4, "8".into(), Some("deposit 4".into()))));
    assert_eq!(metrics.outcome_count("accounts", Outcome::Parked), 0);
    assert_eq!(
        common::query_i64(&client, "SELECT count(*) FROM projector.dead_letters WHERE state = 'parked'").await,
        0
    );
    assert_eq!(common::query_i64(&client, "SELECT count(*) FROM projector.held_events").await, 0);
    assert_eq!(common::query_i64(&client, "SELECT count(*) FROM projector.parked_actions").await, 1 + 3 + 2 + 2);

    // The operator's view, through the binary: the list, and one event in full with its history.
    let cli = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_projector"))
            .args(args)
            .env("DATABASE_URL", &db.url)
            .current_dir(std::env::temp_dir())
            .output()
            .expect("running projector");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(output.status.success(), "projector {args:?}: {}{text}", String::from_utf8_lossy(&output.stderr));
        text
    };
    assert_eq!(cli(&["parked", "list"]).trim(), "no parked events");
    let listed = cli(&["parked", "list", "accounts", "--all", "--key", "B"]);
    assert!(
        listed.contains("skipped") && listed.contains("violates check constraint") && listed.contains("2 event(s)"),
        "{listed}"
    );
    let id = by_error[0].id.to_string();
    let shown = cli(&["parked", "show", &id]);
    for part in [
        "state           skipped",
        "class           poison",
        "key             B",
        "\"amount\":-100",
        "refunded by hand, ticket 4711",
    ] {
        assert!(shown.contains(part), "`{part}` missing from:\n{shown}");
    }
    drop(admin);
    drop(pool);
    drop(client);
    db.drop().await;
}

/// A key whose events are spread over partitions (here each account opens in partition 0 and
/// deposits in partition 1, the deposit published first): a deposit held for its predecessor is
/// released once the predecessor commits, also when that commit, in the other lane, read the key
/// before the hold was committed. Without waiting out the gap timeout (10 minutes here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_spread_over_partitions_is_released_without_waiting_for_the_gap_timeout() {
    let raw::Accounts { _kafka, topic, db, client, mut settings, projections, bootstrap } = raw::setup(2, 10).await;
    settings.parking.gap_timeout_secs = 600;
    settings.batch.lanes = 2;
    let keys: Vec<String> = (0..100).map(|i| format!("spread-{i}")).collect();
    let deposits: Vec<Raw> = keys.iter().map(|key| Raw::json(&deposited(key, 2, 5))).collect();
    let opens: Vec<Raw> = keys.iter().map(|key| Raw::json(&opened(key, 10))).collect();
    raw::publish_to(&bootstrap, &topic, Some(1), &deposits).await;
    raw::publish_to(&bootstrap, &topic, Some(0), &opens).await;

    let engine = Engine::start(&settings, &projections);
    common::wait_caught_up(&settings, &projections).await;
    // Released by the sweep (every second), far before the gap timeout.
    common::wait_for("every account at version 2 with balance 15", Duration::from_secs(30), || async {
        common::query_i64(&client, "SELECT count(*) FROM accounts WHERE version = 2 AND balance = 15").await == 100
    })
    .await;
    let metrics = engine.stop().await;
    assert_eq!(common::query_i64(&client, "SELECT count(*) FROM projector.held_events").await, 0);
    assert_eq!(common::query_i64(&client, "SELECT count(*) FROM projector.dead_letters").await, 0);
    assert_eq!(metrics.gap_timeouts.with_label_values(&["accounts"]).get(), 0);
    // Every deposit counted once as applied, whether it was held first (a gap) or not.
    assert_eq!(metrics.outcome_count("accounts", Outcome::Applied), 200);
    drop(client);
    db.drop().await;
}
