//! `projector test`, run as the binary against real PostgreSQL: the example projections' fixtures
//! pass every run; a projection that is not idempotent under reordering (tests/fixtures/
//! projector-test: event-id dedupe, a deposit lost when it comes before its wallet, a balance
//! set last-writer-wins) is caught, with the run, the event order and the differing column;
//! `--seed` replays the orders; JSON and JUnit reports; a broken fixture exits 2 naming its line.

use std::path::Path;
use std::process::{Command, Output};

fn projector_test(projections: &Path, arguments: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_projector"));
    command.arg("test").args(arguments);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PROJECTOR_") {
            command.env_remove(name);
        }
    }
    command
        .env("DATABASE_URL", crate::common::server_url())
        .env("PROJECTOR_PROJECTIONS_DIR", projections)
        .output()
        .expect("running projector test")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn printed(output: &Output) -> String {
    format!("{}{}", stdout(output), String::from_utf8_lossy(&output.stderr))
}

fn examples() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/projections"))
}

fn wallets() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/projector-test"))
}

#[test]
fn the_example_projections_fixtures_pass_every_run() {
    let output = projector_test(examples(), &[]);
    assert!(output.status.success(), "{}", printed(&output));
    let text = stdout(&output);
    assert!(text.contains("ok    customer_totals"), "{text}");
    assert!(text.contains("ok    order_summary"), "{text}");
    assert!(text.contains("2 fixture(s), 0 failed"), "{text}");

    let json: serde_json::Value = serde_json::from_str(&stdout(&projector_test(examples(), &["--format", "json"])))
        .expect("--format json prints JSON");
    let runs: Vec<&serde_json::Value> =
        json["fixtures"].as_array().expect("fixtures").iter().flat_map(|f| f["runs"].as_array().unwrap()).collect();
    let names: Vec<&str> = runs.iter().map(|run| run["run"].as_str().unwrap()).collect();
    for kind in
        ["as written", "each event delivered twice", "the whole stream replayed", "keys interleaved", "out of order"]
    {
        assert!(names.iter().any(|name| name.contains(kind)), "a run of kind `{kind}` in {names:?}");
    }
    assert!(runs.iter().all(|run| run["differences"].as_array().unwrap().is_empty()));

    let only = projector_test(examples(), &["order_summary", "--format", "junit"]);
    assert!(only.status.success(), "{}", printed(&only));
    let xml = stdout(&only);
    assert!(
        xml.starts_with("<?xml") && xml.contains("<testsuite name=\"order_summary\"") && xml.contains("failures=\"0\""),
        "{xml}"
    );
    assert!(!xml.contains("customer_totals"), "only the projection named: {xml}");
}

#[test]
fn a_projection_that_is_not_idempotent_under_reordering_is_caught() {
    let output = projector_test(wallets(), &["--seed", "42"]);
    assert_eq!(output.status.code(), Some(1), "{}", printed(&output));
    let text = stdout(&output);
    assert!(text.contains("FAIL  wallets"), "{text}");
    assert!(text.contains("deposits.toml") && text.contains("corrections.toml"), "{text}");
    // Duplicates, replays and other interleavings of keys are harmless (event-id dedupe, one
    // key's order kept); a key's events out of order are not.
    for harmless in ["as written:", "each event delivered twice:", "replayed over the built rows:", "keys interleaved"]
    {
        assert!(!text.contains(harmless), "`{harmless}` should pass: {text}");
    }
    assert!(text.contains("events of key `w-1` out of order (seed 42"), "{text}");
    assert!(text.contains("events delivered as 2 (MoneyDeposited e2), 1 (WalletOpened e1)"), "{text}");
    assert!(text.contains("`wallets` row wallet_id=\"w-1\": `balance` expected \"40\", got \"0\""), "{text}");
    assert!(text.contains("`wallets` row wallet_id=\"w-2\": `balance` expected \"7\", got"), "{text}");

    // The same seed, the same orders and report.
    let again = projector_test(wallets(), &["--seed", "42"]);
    assert_eq!(stdout(&again), text);

    let xml = stdout(&projector_test(wallets(), &["--seed", "42", "--format", "junit"]));
    assert!(xml.contains("<failure message=\""), "{xml}");
    assert!(!xml.contains("failures=\"0\""), "{xml}");
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&projector_test(wallets(), &["--seed", "42", "--format", "json"]))).expect("JSON");
    assert_eq!(json["seed"], 42);
    let failed: Vec<&serde_json::Value> = json["fixtures"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|f| f["runs"].as_array().unwrap())
        .filter(|run| !run["differences"].as_array().unwrap().is_empty())
        .collect();
    assert!(!failed.is_empty() && failed.iter().all(|run| run["run"].as_str().unwrap().contains("out of order")));
}

#[test]
fn a_broken_fixture_or_unknown_projection_exits_2_naming_the_file_and_line() {
    let dir = crate::common::LogDir::new("projector-test-broken");
    let projections = dir.path.join("projections");
    std::fs::create_dir_all(projections.join("wallets/tests")).unwrap();
    std::fs::create_dir_all(projections.join("wallets/migrations")).unwrap();
    std::fs::copy(wallets().join("wallets.toml"), projections.join("wallets.toml")).unwrap();
    std::fs::copy(
        wallets().join("wallets/migrations/V1__create_wallets.sql"),
        projections.join("wallets/migrations/V1__create_wallets.sql"),
    )
    .unwrap();
    let broken = projections.join("wallets/tests/broken.toml");
    std::fs::write(&broken, "[[event]]\nkey = \"w-1\"\nvalue = { id = \"e1\" }\nvalu = 3\n").unwrap();
    let output = projector_test(&projections, &[]);
    assert_eq!(output.status.code(), Some(2), "{}", printed(&output));
    assert!(printed(&output).contains(&format!("{}:4:", broken.display())), "{}", printed(&output));

    // `projector validate` reads the fixtures too.
    let validated = Command::new(env!("CARGO_BIN_EXE_projector"))
        .args(["validate", &projections.display().to_string()])
        .output()
        .expect("projector validate");
    assert_eq!(validated.status.code(), Some(2), "{}", printed(&validated));
    assert!(printed(&validated).contains(&format!("{}:4:", broken.display())), "{}", printed(&validated));

    let unknown = projector_test(&projections, &["nope"]);
    assert_eq!(unknown.status.code(), Some(2), "{}", printed(&unknown));
    assert!(printed(&unknown).contains("no projection named `nope`"), "{}", printed(&unknown));
}
