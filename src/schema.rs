//! Where the schemas of Confluent-framed records come from (`[schemas]`): a directory of schema
//! files named by id (`.avsc`, `.proto`, `.json`), and a Confluent Schema Registry's REST API
//! (`GET /schemas/ids/{id}`, with basic auth and TLS). Both fill the cache that decoding reads
//! ([`Schemas`](crate::projection::schemas::Schemas)).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Deserialize;

use crate::projection::avro::AvroSchema;
use crate::projection::protobuf::ProtoSchema;
use crate::projection::schemas::{Fetch, FetchError, Found, Schema, Schemas};
use crate::projection::Projection;
use crate::settings::{redact_url, SchemaSettings};

/// The process's schemas, from its settings: empty (every framed record parked, saying why) when
/// neither a directory nor a registry is configured.
pub fn from_settings(settings: &SchemaSettings) -> anyhow::Result<Arc<Schemas>> {
    let registry = match &settings.registry_url {
        Some(url) => Some(Registry::new(settings, url)?),
        None => None,
    };
    let directory = settings.dir.clone().map(Directory);
    if registry.is_none() && directory.is_none() {
        return Ok(Arc::default());
    }
    Ok(Schemas::new(Arc::new(Sources { directory, registry })))
}

/// Gives every projection the same schemas.
pub fn attach(projections: &mut [Projection], schemas: &Arc<Schemas>) {
    for projection in projections {
        projection.schemas = schemas.clone();
    }
}

struct Sources {
    directory: Option<Directory>,
    registry: Option<Registry>,
}

impl Fetch for Sources {
    fn fetch(&self, id: u32) -> BoxFuture<'_, Result<Found, FetchError>> {
        Box::pin(async move {
            if let Some(directory) = &self.directory {
                match directory.read(id)? {
                    Found::Unknown(_) if self.registry.is_some() => {}
                    found => return Ok(found),
                }
            }
            match &self.registry {
                Some(registry) => registry.fetch(id).await,
                None => Ok(Found::Unknown("no schema file for it".into())),
            }
        })
    }
}

/// A directory of schema files named by id: `42.avsc` holds the Avro schema with id 42,
/// `43.proto` the Protobuf schema with id 43, `44.json` the JSON Schema with id 44.
struct Directory(PathBuf);

impl Directory {
    fn read(&self, id: u32) -> Result<Found, FetchError> {
        for (extension, parse) in
            [("avsc", avro as fn(&str, &str) -> Found), ("proto", protobuf), ("json", json_schema)]
        {
            let path = self.0.join(format!("{id}.{extension}"));
            match std::fs::read_to_string(&path) {
                Ok(text) => return Ok(parse(&text, &path.display().to_string())),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => {
                    return Err(FetchError { id, reason: format!("cannot read {}: {error}", path.display()) })
                }
            }
        }
        Ok(Found::Unknown(format!(
            "no file {id}.avsc, {id}.proto or {id}.json in the schema directory {}",
            self.0.display()
        )))
    }
}

fn avro(text: &str, from: &str) -> Found {
    match AvroSchema::parse(text) {
        Ok(schema) => Found::Schema(Schema::Avro(schema)),
        Err(error) => Found::Unknown(format!("the Avro schema in {from} does not parse: {error}")),
    }
}

/// A JSON Schema: records framed with its id are JSON text, read as they are; the schema must be
/// JSON, and is not otherwise used.
fn json_schema(text: &str, from: &str) -> Found {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(_) => Found::Schema(Schema::JsonSchema),
        Err(error) => Found::Unknown(format!("the JSON Schema in {from} is not JSON: {error}")),
    }
}

fn protobuf(text: &str, from: &str) -> Found {
    match ProtoSchema::parse(text) {
        Ok(schema) => Found::Schema(Schema::Protobuf(schema)),
        Err(error) => Found::Unknown(format!("the Protobuf schema in {from} does not compile: {error}")),
    }
}

/// A Confluent Schema Registry.
struct Registry {
    client: reqwest::Client,
    base: String,
    username: Option<String>,
    password: Option<String>,
}

/// `GET /schemas/ids/{id}`'s answer.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SchemaById {
    schema: String,
    /// `AVRO` when absent.
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<serde_json::Value>,
}

impl Registry {
    fn new(settings: &SchemaSettings, url: &str) -> anyhow::Result<Registry> {
        let mut builder = reqwest::Client::builder()
            .timeout(Duration::from_millis(settings.timeout_ms))
            .connect_timeout(Duration::from_millis(settings.timeout_ms));
        if let Some(ca_file) = &settings.ca_file {
            builder = builder.add_root_certificate(ca_certificate(ca_file)?);
        }
        let client = builder.build()?;
        Ok(Registry {
            client,
            base: url.trim_end_matches('/').to_string(),
            username: settings.username.clone(),
            password: settings.password.clone(),
        })
    }

    async fn fetch(&self, id: u32) -> Result<Found, FetchError> {
        let url = format!("{}/schemas/ids/{id}", self.base);
        let failed = |reason: String| FetchError { id, reason: format!("registry {}: {reason}", redact_url(&url)) };
        let mut request = self.client.get(&url).header("Accept", "application/vnd.schemaregistry.v1+json");
        if let Some(username) = &self.username {
            request = request.basic_auth(username, self.password.as_ref());
        }
        let response = request.send().await.map_err(|error| failed(describe(error)))?;
        let status = response.status();
        let text = response.text().await.map_err(|error| failed(describe(error)))?;
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(Found::Unknown(format!("the registry has no schema with this id ({})", text.trim())));
        }
        if !status.is_success() {
            return Err(failed(format!("HTTP {status}: {}", text.trim().chars().take(200).collect::<String>())));
        }
        let answer: SchemaById =
            serde_json::from_str(&text).map_err(|error| failed(format!("unreadable answer: {error}")))?;
        // Imports of the well-known types are references too, and compiled from protox's copy.
        let foreign = answer
            .references
            .iter()
            .any(|reference| !reference["name"].as_str().is_some_and(|name| name.starts_with("google/protobuf/")));
        let from = format!("the registry's schema {id}");
        Ok(match answer.schema_type.as_deref().unwrap_or("AVRO") {
            "AVRO" | "PROTOBUF" | "JSON" if foreign => {
                Found::Unknown("its schema references other subjects, which projector does not follow yet".into())
            }
            "AVRO" => avro(&answer.schema, &from),
            "PROTOBUF" => protobuf(&answer.schema, &from),
            "JSON" => json_schema(&answer.schema, &from),
            kind => Found::Schema(Schema::Unsupported { kind: kind.to_string() }),
        })
    }
}

fn ca_certificate(path: &Path) -> anyhow::Result<reqwest::Certificate> {
    let pem = std::fs::read(path).map_err(|error| anyhow::anyhow!("schemas.ca_file {}: {error}", path.display()))?;
    reqwest::Certificate::from_pem(&pem).map_err(|error| anyhow::anyhow!("schemas.ca_file {}: {error}", path.display()))
}

/// An error with its causes (reqwest's own message leaves out the connection's).
fn describe(error: reqwest::Error) -> String {
    format!("{:#}", anyhow::Error::new(error))
}
