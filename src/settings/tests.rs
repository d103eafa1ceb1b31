//! The settings' defaults, files, environment and checks.

use super::*;

/// Lanes are dealt out over the projections sharing the pool: `batch.lanes` while the pool
/// has room for them all, fewer as projections are added, never none.
#[test]
fn lanes_are_a_share_of_the_pool() {
    let mut settings = Settings::default();
    (settings.database.pool_size, settings.batch.lanes) = (8, 4);
    let lanes: Vec<usize> = [0, 1, 2, 3, 4, 8, 9, 16, 64].iter().map(|&n| settings.lanes(n)).collect();
    assert_eq!(lanes, [4, 4, 4, 2, 2, 1, 1, 1, 1]);
    settings.database.pool_size = 64;
    assert_eq!(settings.lanes(16), 4, "a pool with room for every lane changes nothing");
    settings.batch.lanes = 0;
    assert_eq!(settings.lanes(1), 1);
}

/// The README's "complete file, with the defaults" is complete (every key is known), and its
/// values are the defaults.
#[test]
fn the_readme_settings_file_is_the_defaults() {
    let readme = include_str!("../../README.md");
    let after = readme.split_once("A complete file, with the defaults:").expect("the README shows the file").1;
    let block = after.split_once("```toml\n").expect("a toml block").1.split_once("```").expect("its end").0;
    let parsed: Settings = Figment::new().merge(Toml::string(block)).extract().expect("the README's file parses");
    assert_eq!(
        serde_json::to_value(&parsed).expect("as json"),
        serde_json::to_value(Settings::default()).expect("as json"),
        "the README's settings file says other values than the defaults"
    );
}

#[test]
fn debug_hides_passwords() {
    let mut settings = Settings::default();
    settings.database.url = "postgres://app:hunter2@db:5432/reads".into();
    settings.kafka.properties.insert("sasl.password".into(), "hunter3".into());
    let shown = format!("{settings:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(!shown.contains("hunter3"), "{shown}");
    assert!(shown.contains("app:***@db"), "{shown}");
}

#[test]
fn numeric_properties_from_the_environment_are_text() {
    figment::Jail::expect_with(|jail| {
        assert_eq!(property_variable("session.timeout.ms"), "PROJECTOR_KAFKA__PROPERTIES__SESSION_TIMEOUT_MS");
        jail.set_env(property_variable("session.timeout.ms"), "6000");
        jail.set_env("PROJECTOR_KAFKA__PROPERTIES__ENABLE_SSL_CERTIFICATE_VERIFICATION", "false");
        let settings = Settings::load(None).map_err(|error| error.to_string())?;
        assert_eq!(settings.kafka.properties.get("session.timeout.ms").map(String::as_str), Some("6000"));
        assert_eq!(
            settings.kafka.properties.get("enable.ssl.certificate.verification").map(String::as_str),
            Some("false")
        );
        Ok(())
    });
}

#[test]
fn the_log_format_comes_from_the_file_then_the_environment() {
    figment::Jail::expect_with(|jail| {
        assert_eq!(Settings::log_format(None), LogFormat::Text);
        jail.create_file("projector.toml", "[log]\nformat = \"json\"\n")?;
        assert_eq!(Settings::log_format(None), LogFormat::Json);
        assert_eq!(Settings::load(None).map_err(|error| error.to_string())?.log.format, LogFormat::Json);
        jail.create_file("xml.toml", "[log]\nformat = \"xml\"\n")?;
        let error = Settings::load(Some(Path::new("xml.toml"))).err().expect("`xml` is refused").to_string();
        assert!(error.contains("xml"), "{error}");
        assert_eq!(Settings::log_format(Some(Path::new("xml.toml"))), LogFormat::Text, "the log's own default");
        jail.set_env("PROJECTOR_LOG__FORMAT", "text");
        assert_eq!(Settings::log_format(None), LogFormat::Text);
        Ok(())
    });
}

/// A consumer's read-ahead and its worker's hand-over are shares of two batches' worth over the
/// projections running, no less than a quarter batch (`kafka.properties` wins); its batches are
/// that share, no less than half a batch.
#[test]
fn read_ahead_and_batches_are_shares_over_the_projections() {
    let mut settings = Settings::default();
    settings.batch.max_events = 4000;
    let queued = |settings: &Settings, n: usize| settings.sharing(n).kafka.properties["queued.min.messages"].clone();
    let shares: Vec<String> = [0, 1, 2, 4, 8, 16, 64].iter().map(|&n| queued(&settings, n)).collect();
    assert_eq!(shares, ["8000", "8000", "4000", "2000", "1000", "1000", "1000"]);
    assert_eq!(settings.sharing(4).batch.lanes, settings.lanes(4));
    assert_eq!(settings.sharing(16).batch.handover, Some(1000), "the worker's hand-over is the same share");
    let batches: Vec<usize> = [1, 2, 4, 8, 16].iter().map(|&n| settings.sharing(n).batch.max_events).collect();
    assert_eq!(batches, [4000, 4000, 2000, 2000, 2000], "batches are the share, at least half, at most max_events");
    assert_eq!(settings.batch.handover, None);
    settings.batch.max_events = 1;
    assert_eq!(queued(&settings, 16), "1");
    settings.kafka.properties.insert("queued.min.messages".into(), "50000".into());
    assert_eq!(queued(&settings, 16), "50000", "a property set by the user wins");
}
