//! The schema registry's client over TLS: a stand-in registry served here over HTTPS with a
//! certificate made for the test (openssl). With its CA as `schemas.ca_file` the schema is
//! fetched and a framed record decodes; without it the certificate is refused, which is a fetch
//! error (retried by the engine), never a parked record; the password never appears in the error.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use projector::projection::{compile_file, Decoded, Record};
use projector::settings::SchemaSettings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A self-signed certificate for 127.0.0.1 and its key, as PEM files in `dir`.
fn certificate(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let (cert, key) = (dir.join("registry.pem"), dir.join("registry.key"));
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=registry.test"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (Debian's openssl package) makes the test's certificate");
    assert!(made.status.success(), "openssl: {}", String::from_utf8_lossy(&made.stderr));
    (std::fs::read(cert).expect("certificate"), std::fs::read(key).expect("key"))
}

/// Writer schema 1: an event with its type, key and version.
const SCHEMA: &str = r#"{"type": "record", "name": "E", "fields": [
  {"name": "type", "type": "string"}, {"name": "stream_id", "type": "string"}, {"name": "stream_version", "type": "long"}]}"#;

/// Serves `GET /schemas/ids/1` ([`SCHEMA`]) over TLS, one request per connection; counts
/// the requests that got through the handshake. Returns the registry's URL.
async fn serve(cert: &[u8], key: &[u8], answered: Arc<AtomicUsize>) -> String {
    let identity = native_tls::Identity::from_pkcs8(cert, key).expect("identity");
    let acceptor = tokio_native_tls::TlsAcceptor::from(native_tls::TlsAcceptor::new(identity).expect("acceptor"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binding");
    let url = format!("https://127.0.0.1:{}", listener.local_addr().expect("address").port());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let (acceptor, answered) = (acceptor.clone(), answered.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else { return };
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|window| window == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&request);
                let (status, body) = if !head.starts_with("GET /schemas/ids/1 ") {
                    ("404 Not Found", serde_json::json!({"error_code": 40403, "message": "Schema not found"}))
                } else if !head.to_ascii_lowercase().contains("authorization: basic c3zjonmzy3jlda==") {
                    ("401 Unauthorized", serde_json::json!({"error_code": 401, "message": "Unauthorized"}))
                } else {
                    ("200 OK", serde_json::json!({"schema": SCHEMA}))
                };
                let body = body.to_string();
                answered.fetch_add(1, Ordering::SeqCst);
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/vnd.schemaregistry.v1+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(response.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    url
}

fn framed_record() -> Record {
    Record {
        topic: "t".into(),
        partition: 0,
        offset: 0,
        key: None,
        // Schema 1: type "A", stream_id "acc-1", stream_version 1.
        value: Some([&[0u8, 0, 0, 0, 1, 2, b'A', 10][..], b"acc-1", &[2]].concat()),
        headers: vec![],
        timestamp_ms: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_is_reached_over_tls_with_its_ca_and_refused_without() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, key) = certificate(dir.path());
    let answered = Arc::new(AtomicUsize::new(0));
    let url = serve(&cert, &key, answered.clone()).await;
    let text = "topics = [\"t\"]\n[table]\nname = \"s\"\nkey = \"id\"\n[on.A]\nupdate = { n = \"1\" }\n";
    let mut projection = compile_file(Path::new("s.toml"), text).expect("definition");
    let settings = |ca_file: Option<&Path>| SchemaSettings {
        registry_url: Some(url.clone()),
        username: Some("svc".into()),
        password: Some("s3cret".into()),
        ca_file: ca_file.map(Path::to_path_buf),
        timeout_ms: 5_000,
        ..SchemaSettings::default()
    };

    // Without the CA: the handshake fails; a transient error naming the registry, no password.
    projection.schemas = projector::schema::from_settings(&settings(None)).expect("schemas");
    let error = projection.ensure_schemas([&framed_record()]).await.expect_err("an untrusted certificate is refused");
    let message = error.to_string();
    assert!(message.contains("certificate") || message.contains("handshake"), "{message}");
    assert!(!message.contains("s3cret"), "{message}");
    assert_eq!(answered.load(Ordering::SeqCst), 0, "no request got through the handshake");

    // With it: fetched once, and the record decodes by it.
    let ca_file = dir.path().join("registry.pem");
    projection.schemas = projector::schema::from_settings(&settings(Some(&ca_file))).expect("schemas");
    let record = framed_record();
    projection.ensure_schemas([&record, &record]).await.expect("fetched over TLS");
    assert_eq!(answered.load(Ordering::SeqCst), 1);
    match projection.decode(&record) {
        Decoded::Handled { event, .. } => assert_eq!((event.key.as_deref(), event.version), (Some("acc-1"), Some(1))),
        other => panic!("expected the event read by its schema, got {other:?}"),
    }
}
