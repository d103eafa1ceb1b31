//! Records in the Confluent wire format (a zero byte, the schema's id in 4 bytes, big-endian, then
//! the body: Avro, Protobuf after its message indexes, or JSON text for JSON Schema) and the
//! schemas that read them, by id.
//!
//! [`Schemas`] is a cache that a [`Fetch`] (the schema registry's client or a directory of
//! schema files, in `crate::schema`) fills ahead of decoding: [`Schemas::ensure`] is awaited for
//! a batch's records before they are decoded, so that decoding itself never waits. A fetch that
//! fails is the caller's to retry: the record is not decoded, let alone parked. An id the source
//! does not know is remembered for [`UNKNOWN_FOR`], then asked again.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;

use super::avro::AvroSchema;
use super::event::Record;
use super::protobuf::ProtoSchema;
use super::{Projection, Source};

/// How long an id the source did not know is taken as unknown before it is asked again.
pub const UNKNOWN_FOR: Duration = Duration::from_secs(60);

/// Past this many ids remembered as unknown, those remembered for longer than [`UNKNOWN_FOR`] are
/// forgotten: records with made-up ids (any value starting with a zero byte) do not grow the
/// cache without end.
const UNKNOWN_KEPT: usize = 10_000;

/// A schema, as a registry or a file holds it.
#[derive(Debug)]
pub enum Schema {
    Avro(AvroSchema),
    Protobuf(ProtoSchema),
    /// JSON Schema: the body is JSON text, read as it is (not validated against the schema).
    JsonSchema,
    /// A kind this version does not know: its records are parked, saying so.
    Unsupported {
        kind: String,
    },
}

/// What a source says about an id.
#[derive(Debug)]
pub enum Found {
    Schema(Schema),
    /// It has no schema with that id, or one that does not parse (why).
    Unknown(String),
}

/// A source could not be asked (a registry that cannot be reached or answers with an error): a
/// transient failure, retried by whoever asked.
#[derive(Debug, Clone, thiserror::Error)]
#[error("schema {id}: {reason}")]
pub struct FetchError {
    pub id: u32,
    pub reason: String,
}

/// Where schemas come from.
pub trait Fetch: Send + Sync {
    fn fetch(&self, id: u32) -> BoxFuture<'_, Result<Found, FetchError>>;
}

impl Projection {
    /// [`Schemas::ensure`] for what this projection reads of `records`: their values, and their
    /// keys when its envelope reads `kafka:key` (a binary key of any other projection is never
    /// taken for a schema id).
    pub async fn ensure_schemas<'r>(&self, records: impl IntoIterator<Item = &'r Record>) -> Result<(), FetchError> {
        let envelope = &self.envelope;
        let keys = [&envelope.event_type, &envelope.event_id, &envelope.key, &envelope.version, &envelope.occurred_at]
            .contains(&&Source::KafkaKey);
        self.schemas.ensure(records, keys).await
    }
}

/// Why a framed record's body could not be read as JSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("Confluent-framed record of {len} bytes is truncated: its header takes 5")]
    Truncated { len: usize },
    #[error("Confluent-framed record with schema id {id}, but no schema registry or schema directory is configured ([schemas])")]
    NoSource { id: u32 },
    #[error("schema id {id} is unknown: {reason}")]
    Unknown { id: u32, reason: String },
    #[error("schema id {id} was not loaded before decoding")]
    NotLoaded { id: u32 },
    #[error("schema id {id} is a {kind} schema, which projector does not read yet")]
    Unsupported { id: u32, kind: String },
    #[error("body does not decode with {kind} schema {id}: {reason}")]
    Body { id: u32, kind: &'static str, reason: String },
}

/// `None` when `value` is not Confluent-framed (its first byte is not zero: JSON never starts so);
/// else the schema id and the body, or why the frame is broken.
pub fn frame(value: &[u8]) -> Option<Result<(u32, &[u8]), FrameError>> {
    match value {
        [0, a, b, c, d, body @ ..] => Some(Ok((u32::from_be_bytes([*a, *b, *c, *d]), body))),
        [0, ..] => Some(Err(FrameError::Truncated { len: value.len() })),
        _ => None,
    }
}

enum Entry {
    Schema(Arc<Schema>),
    Unknown { reason: String, since: Instant },
}

/// The schemas by id, shared by every projection of a process.
#[derive(Default)]
pub struct Schemas {
    source: Option<Arc<dyn Fetch>>,
    known: RwLock<HashMap<u32, Entry>>,
    fetching: futures::lock::Mutex<()>,
}

impl std::fmt::Debug for Schemas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let known = self.known.read().map_or(0, |known| known.len());
        f.debug_struct("Schemas").field("source", &self.source.is_some()).field("known", &known).finish()
    }
}

impl Schemas {
    pub fn new(source: Arc<dyn Fetch>) -> Arc<Schemas> {
        Arc::new(Schemas { source: Some(source), known: RwLock::default(), fetching: futures::lock::Mutex::new(()) })
    }

    /// Fetches the schema of every framed record in `records` not known yet (or unknown for
    /// longer than [`UNKNOWN_FOR`]). Records that are not framed cost a look at their first byte.
    /// With `keys`, framed keys' schemas too.
    pub async fn ensure<'r>(
        &self,
        records: impl IntoIterator<Item = &'r Record>,
        keys: bool,
    ) -> Result<(), FetchError> {
        let Some(source) = &self.source else { return Ok(()) };
        let id = |bytes: Option<&[u8]>| match frame(bytes?)? {
            Ok((id, _)) => Some(id),
            Err(_) => None,
        };
        let wanted: HashSet<u32> = records
            .into_iter()
            .flat_map(|record| [id(record.value.as_deref()), id(record.key.as_deref().filter(|_| keys))])
            .flatten()
            .collect();
        if self.missing(&wanted).is_empty() {
            return Ok(());
        }
        // One fetch at a time, the missing ids looked for again once it is this one's turn: the
        // lanes of every projection ask for the same new schema at once, and the source is asked
        // once.
        let _turn = self.fetching.lock().await;
        let missing = self.missing(&wanted);
        for id in missing {
            let entry = match source.fetch(id).await? {
                Found::Schema(schema) => Entry::Schema(Arc::new(schema)),
                Found::Unknown(reason) => Entry::Unknown { reason, since: Instant::now() },
            };
            let mut known = self.known.write().expect("schemas lock");
            if matches!(entry, Entry::Unknown { .. }) && known.len() >= UNKNOWN_KEPT {
                known.retain(
                    |_, entry| !matches!(entry, Entry::Unknown { since, .. } if since.elapsed() >= UNKNOWN_FOR),
                );
            }
            known.insert(id, entry);
        }
        Ok(())
    }

    fn missing(&self, wanted: &HashSet<u32>) -> Vec<u32> {
        let known = self.known.read().expect("schemas lock");
        wanted
            .iter()
            .copied()
            .filter(|id| match known.get(id) {
                Some(Entry::Schema(_)) => false,
                Some(Entry::Unknown { since, .. }) => since.elapsed() >= UNKNOWN_FOR,
                None => true,
            })
            .collect()
    }

    /// A framed key as text: a string is its text, anything else its JSON text.
    pub fn key(&self, framed: Result<(u32, &[u8]), FrameError>) -> Result<String, FrameError> {
        let json = framed.and_then(|(id, body)| self.to_json(id, body))?;
        Ok(serde_json::from_str::<String>(&json).unwrap_or(json))
    }

    /// A framed body as JSON text.
    pub fn to_json(&self, id: u32, body: &[u8]) -> Result<String, FrameError> {
        if self.source.is_none() {
            return Err(FrameError::NoSource { id });
        }
        let schema = match self.known.read().expect("schemas lock").get(&id) {
            Some(Entry::Schema(schema)) => schema.clone(),
            Some(Entry::Unknown { reason, .. }) => return Err(FrameError::Unknown { id, reason: reason.clone() }),
            None => return Err(FrameError::NotLoaded { id }),
        };
        match &*schema {
            Schema::Avro(avro) => avro.to_json(body).map_err(|reason| FrameError::Body { id, kind: "Avro", reason }),
            Schema::Protobuf(proto) => {
                proto.to_json(body).map_err(|reason| FrameError::Body { id, kind: "Protobuf", reason })
            }
            Schema::JsonSchema => std::str::from_utf8(body).map(str::to_string).map_err(|error| FrameError::Body {
                id,
                kind: "JSON",
                reason: format!("not UTF-8: {error}"),
            }),
            Schema::Unsupported { kind } => Err(FrameError::Unsupported { id, kind: kind.clone() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frame_is_a_zero_byte_and_four_bytes_of_id() {
        assert_eq!(frame(b"{}"), None);
        assert_eq!(frame(b""), None);
        assert_eq!(frame(&[0, 0, 0, 1, 2, 9, 9]), Some(Ok((258, &[9u8, 9][..]))));
        assert_eq!(frame(&[0, 0, 0, 0, 7]), Some(Ok((7, &[][..]))));
        assert_eq!(frame(&[0, 0, 0]), Some(Err(FrameError::Truncated { len: 3 })));
    }

    struct Counting(std::sync::atomic::AtomicUsize);

    impl Fetch for Counting {
        fn fetch(&self, id: u32) -> BoxFuture<'_, Result<Found, FetchError>> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async move {
                // Waits once, as a request would: another ensure may run meanwhile.
                let mut waited = false;
                futures::future::poll_fn(|cx| {
                    if std::mem::replace(&mut waited, true) {
                        std::task::Poll::Ready(())
                    } else {
                        cx.waker().wake_by_ref();
                        std::task::Poll::Pending
                    }
                })
                .await;
                match id {
                    1 => Ok(Found::Schema(Schema::Avro(AvroSchema::parse(r#""string""#).unwrap()))),
                    2 => Ok(Found::Unknown("not found".into())),
                    _ => Err(FetchError { id, reason: "unreachable".into() }),
                }
            })
        }
    }

    fn record(value: &[u8]) -> Record {
        Record {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            key: None,
            value: Some(value.to_vec()),
            headers: vec![],
            timestamp_ms: None,
        }
    }

    #[test]
    fn schemas_are_fetched_once_and_unknown_ids_remembered() {
        let counting = Arc::new(Counting(0.into()));
        let schemas = Schemas::new(counting.clone());
        let hello = [&[0, 0, 0, 0, 1, 10][..], b"hello"].concat();
        let records = [record(&hello), record(&hello), record(&[0, 0, 0, 0, 2]), record(b"{}"), record(&[0])];
        assert_eq!(schemas.to_json(1, b"\x02a"), Err(FrameError::NotLoaded { id: 1 }));
        let (first, second) = futures::executor::block_on(futures::future::join(
            schemas.ensure(&records, false),
            schemas.ensure(&records[..2], false),
        ));
        (first.unwrap(), second.unwrap());
        futures::executor::block_on(schemas.ensure(&records, false)).unwrap();
        assert_eq!(counting.0.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(schemas.to_json(1, &hello[5..]).unwrap(), r#""hello""#);
        assert!(matches!(schemas.to_json(2, b""), Err(FrameError::Unknown { id: 2, .. })));
        let short = schemas.to_json(1, b"\x02");
        assert!(matches!(short, Err(FrameError::Body { id: 1, .. })), "{short:?}");
        let error = futures::executor::block_on(schemas.ensure(&[record(&[0, 0, 0, 0, 3])], false)).unwrap_err();
        assert_eq!(error.id, 3);
        assert_eq!(Schemas::default().to_json(1, b""), Err(FrameError::NoSource { id: 1 }));
    }

    /// A projection whose envelope reads `kafka:key` reads a framed key by its schema: a string
    /// key is its text. Only such a projection fetches keys' schemas.
    #[test]
    fn a_framed_key_reads_by_its_schema() {
        let text = "topics = [\"t\"]\n[envelope]\nkey = \"kafka:key\"\n[table]\nname = \"s\"\nkey = \"id\"\n[on.A]\nupdate = { n = \"1\" }\n";
        let mut keyed = crate::projection::compile_file(std::path::Path::new("s.toml"), text).unwrap();
        let counting = Arc::new(Counting(0.into()));
        keyed.schemas = Schemas::new(counting.clone());
        let mut plain =
            crate::projection::compile_file(std::path::Path::new("s.toml"), &text.replace("kafka:key", "stream_id"))
                .unwrap();
        plain.schemas = keyed.schemas.clone();
        let mut framed = record(br#"{"type": "A", "stream_version": 2}"#);
        framed.key = Some([&[0, 0, 0, 0, 1, 10][..], b"acc-1"].concat());
        futures::executor::block_on(plain.ensure_schemas([&framed])).unwrap();
        assert_eq!(counting.0.load(std::sync::atomic::Ordering::SeqCst), 0, "a key the projection does not read");
        futures::executor::block_on(keyed.ensure_schemas([&framed])).unwrap();
        assert_eq!(counting.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        match keyed.decode(&framed) {
            crate::projection::Decoded::Handled { event, .. } => assert_eq!(event.key.as_deref(), Some("acc-1")),
            other => panic!("{other:?}"),
        }
    }
}
