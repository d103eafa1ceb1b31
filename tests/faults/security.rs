//! Postgres TLS through `sslmode` in the URL, checked on the server's side (`pg_stat_ssl`), and
//! no password in errors.

use crate::common::TestDb;

/// Whether the server says this session is encrypted.
async fn encrypted(url: &str) -> bool {
    let pool = projector::store::connect(url, 1).await.unwrap_or_else(|error| panic!("connecting with {url}: {error}"));
    let client = pool.get().await.expect("connection");
    client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.expect("pg_stat_ssl").get(0)
}

fn with_query(url: &str, query: &str) -> String {
    let mut parsed = url::Url::parse(url).expect("url");
    parsed.set_query(Some(query));
    parsed.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_in_the_url_decides_tls() {
    let db = TestDb::create().await;
    let client = db.connect().await;
    let server_ssl: String = client.query_one("SHOW ssl", &[]).await.expect("SHOW ssl").get(0);
    assert_eq!(server_ssl, "on", "this test needs a Postgres server with ssl = on (Debian's default)");

    assert!(encrypted(&with_query(&db.url, "sslmode=require")).await, "require encrypts");
    assert!(!encrypted(&with_query(&db.url, "sslmode=disable")).await, "disable does not");
    assert!(encrypted(&db.url).await, "no sslmode is libpq's `prefer`: encrypted when the server offers it");

    // Debian's snakeoil certificate is self-signed: verify-full must refuse it.
    let refused = projector::store::connect(&with_query(&db.url, "sslmode=verify-full"), 1).await;
    let error = refused.err().expect("verify-full refuses a self-signed certificate").to_string();
    assert!(error.contains("certificate") || error.contains("tls") || error.contains("TLS"), "{error}");

    // The server's own certificate as the root: verify-ca accepts it.
    let cert_path: String = client
        .query_one("SELECT setting FROM pg_settings WHERE name = 'ssl_cert_file'", &[])
        .await
        .expect("ssl_cert_file")
        .get(0);
    if std::fs::read(&cert_path).is_ok() {
        let url = with_query(&db.url, &format!("sslmode=verify-ca&sslrootcert={cert_path}"));
        assert!(encrypted(&url).await, "verify-ca with the server's certificate as root");
    } else {
        eprintln!("{cert_path} is not readable here: verify-ca with it as root not checked");
    }
    drop(client);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_password_in_connection_errors() {
    // Nobody listens on port 1.
    let url = "postgres://projector:hunter2-secret@127.0.0.1:1/nowhere?sslmode=disable";
    let error = projector::store::connect(url, 1).await.err().expect("no server on port 1").to_string();
    assert!(!error.contains("hunter2-secret"), "{error}");
    let error = projector::store::migrate(url).await.err().expect("no server on port 1").to_string();
    assert!(!error.contains("hunter2-secret"), "{error}");
    let mut settings = projector::settings::Settings::default();
    settings.database.url = url.into();
    assert!(!format!("{settings:?}").contains("hunter2-secret"));
}
