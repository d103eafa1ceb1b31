//! Kafka's wire format by hand, for what librdkafka's mock broker does not do with transactions:
//! transactional record batches and their commit and abort markers (control batches), sent in a
//! raw ProduceRequest; and a proxy listing aborted transactions in Fetch responses
//! ([`FetchProxy`]).
//!
//! The mock broker keeps the record batches a ProduceRequest carries byte for byte (only their
//! base offset and partition leader epoch are overwritten), one offset per record, and checks
//! producer ids, epochs and sequences only when the request names a transactional id: these
//! requests name none, so the batches stand as written.
//!
//! RecordBatch v2 (Kafka's `DefaultRecordBatch`): base offset (i64), length (i32), partition
//! leader epoch (i32), magic (i8, 2), CRC-32C (u32) of everything after it, attributes (i16: bit
//! 4 transactional, bit 5 control), last offset delta (i32), first and max timestamps (i64),
//! producer id (i64), producer epoch (i16), base sequence (i32), record count (i32), records.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use projector::kafka::mock::MockKafka;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::raw::Raw;

/// Attributes bit: the batch belongs to a transaction.
pub const TRANSACTIONAL: i16 = 1 << 4;
/// Attributes bit: the batch holds a control record (a transaction marker).
pub const CONTROL: i16 = 1 << 5;

/// A zigzag varint, as record fields are written.
fn varint(out: &mut Vec<u8>, value: i64) {
    let mut zigzag = ((value << 1) ^ (value >> 63)) as u64;
    while zigzag >= 0x80 {
        out.push((zigzag as u8) | 0x80);
        zigzag >>= 7;
    }
    out.push(zigzag as u8);
}

/// Bytes preceded by their varint length, -1 for none.
fn varint_bytes(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        Some(bytes) => {
            varint(out, bytes.len() as i64);
            out.extend_from_slice(bytes);
        }
        None => varint(out, -1),
    }
}

/// A record of a batch at `offset_delta`: attributes 0, the batch's timestamp.
fn record(offset_delta: i64, raw: &Raw) -> Vec<u8> {
    let mut body = vec![0u8];
    varint(&mut body, 0);
    varint(&mut body, offset_delta);
    varint_bytes(&mut body, raw.key.as_deref());
    varint_bytes(&mut body, raw.value.as_deref());
    varint(&mut body, raw.headers.len() as i64);
    for (name, value) in &raw.headers {
        varint_bytes(&mut body, Some(name));
        varint_bytes(&mut body, Some(value));
    }
    let mut out = Vec::with_capacity(body.len() + 5);
    varint(&mut out, body.len() as i64);
    out.extend_from_slice(&body);
    out
}

/// Who wrote a batch: producer id, epoch and the sequence of its first record.
#[derive(Debug, Clone, Copy)]
pub struct Writer {
    pub producer_id: i64,
    pub epoch: i16,
    pub base_sequence: i32,
}

impl Writer {
    /// A producer that is neither idempotent nor transactional.
    pub const PLAIN: Writer = Writer { producer_id: -1, epoch: -1, base_sequence: -1 };
}

/// A RecordBatch v2 of `records` (at least one), stamped now.
pub fn record_batch(attributes: i16, writer: Writer, records: &[Raw]) -> Vec<u8> {
    assert!(!records.is_empty(), "a record batch holds at least one record");
    let now = chrono::Utc::now().timestamp_millis();
    // From the attributes on: what the CRC covers.
    let mut covered = Vec::new();
    covered.extend_from_slice(&attributes.to_be_bytes());
    covered.extend_from_slice(&(records.len() as i32 - 1).to_be_bytes());
    covered.extend_from_slice(&now.to_be_bytes());
    covered.extend_from_slice(&now.to_be_bytes());
    covered.extend_from_slice(&writer.producer_id.to_be_bytes());
    covered.extend_from_slice(&writer.epoch.to_be_bytes());
    covered.extend_from_slice(&writer.base_sequence.to_be_bytes());
    covered.extend_from_slice(&(records.len() as i32).to_be_bytes());
    for (delta, raw) in records.iter().enumerate() {
        covered.extend_from_slice(&record(delta as i64, raw));
    }
    let mut batch = Vec::with_capacity(covered.len() + 21);
    batch.extend_from_slice(&0i64.to_be_bytes());
    // Length: from the partition leader epoch to the end.
    batch.extend_from_slice(&((covered.len() + 9) as i32).to_be_bytes());
    batch.extend_from_slice(&(-1i32).to_be_bytes());
    batch.push(2);
    batch.extend_from_slice(&crc32c::crc32c(&covered).to_be_bytes());
    batch.extend_from_slice(&covered);
    batch
}

/// The control batch ending `writer`'s transaction: a commit or an abort marker. Its key is
/// version 0 and the marker's type (0 abort, 1 commit), its value version 0 and the transaction
/// coordinator's epoch.
pub fn marker(writer: Writer, commit: bool) -> Vec<u8> {
    let key = [0, 0, 0, u8::from(commit)];
    let value = [0u8; 6];
    let control = Raw { key: Some(key.to_vec()), value: Some(value.to_vec()), headers: Vec::new() };
    record_batch(TRANSACTIONAL | CONTROL, Writer { base_sequence: -1, ..writer }, &[control])
}

/// A Kafka string: i16 length and bytes.
fn string(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as i16).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// Sends `batch` to `partition` of `topic` in a ProduceRequest v3 (no transactional id, acks
/// all) to the first broker of `bootstrap`, the partition's leader, and returns the batch's
/// base offset.
pub async fn produce(bootstrap: &str, topic: &str, partition: i32, batch: &[u8]) -> i64 {
    let broker = bootstrap.split(',').next().expect("a broker");
    let mut stream = TcpStream::connect(broker).await.unwrap_or_else(|error| panic!("connecting to {broker}: {error}"));
    let correlation = 1i32;
    let mut request = Vec::new();
    // Header v1: api key (0, Produce), version, correlation id, client id.
    request.extend_from_slice(&0i16.to_be_bytes());
    request.extend_from_slice(&3i16.to_be_bytes());
    request.extend_from_slice(&correlation.to_be_bytes());
    string(&mut request, "projector-tests");
    // Body: transactional id (null), acks (-1: all), timeout, one topic with one partition.
    request.extend_from_slice(&(-1i16).to_be_bytes());
    request.extend_from_slice(&(-1i16).to_be_bytes());
    request.extend_from_slice(&5000i32.to_be_bytes());
    request.extend_from_slice(&1i32.to_be_bytes());
    string(&mut request, topic);
    request.extend_from_slice(&1i32.to_be_bytes());
    request.extend_from_slice(&partition.to_be_bytes());
    request.extend_from_slice(&(batch.len() as i32).to_be_bytes());
    request.extend_from_slice(batch);
    stream.write_all(&(request.len() as i32).to_be_bytes()).await.expect("sending a ProduceRequest");
    stream.write_all(&request).await.expect("sending a ProduceRequest");

    let size = stream.read_i32().await.expect("reading the ProduceResponse");
    let mut response = vec![0u8; size as usize];
    stream.read_exact(&mut response).await.expect("reading the ProduceResponse");
    let mut reader = Reader(&response);
    assert_eq!(reader.i32(), correlation);
    assert_eq!(reader.i32(), 1, "one topic");
    reader.string();
    assert_eq!(reader.i32(), 1, "one partition");
    assert_eq!(reader.i32(), partition);
    let error = reader.i16();
    assert_eq!(error, 0, "the broker refused the batch (Kafka error code {error})");
    reader.i64()
}

/// Reads big-endian fields from the front of a response.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        head.try_into().expect("N bytes")
    }

    fn i16(&mut self) -> i16 {
        i16::from_be_bytes(self.take())
    }

    fn i32(&mut self) -> i32 {
        i32::from_be_bytes(self.take())
    }

    fn i64(&mut self) -> i64 {
        i64::from_be_bytes(self.take())
    }

    fn string(&mut self) -> &'a [u8] {
        let length = self.i16().max(0) as usize;
        self.bytes(length)
    }

    fn bytes(&mut self, length: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(length);
        self.0 = rest;
        head
    }
}

/// A transactional producer writing one partition: its batches carry its id and epoch and count
/// its sequence on; [`Transaction::end`] writes the marker, and reports an aborted transaction to
/// the [`FetchProxy`] given, if any, as a broker records it in its transaction index.
pub struct Transaction {
    bootstrap: String,
    topic: String,
    partition: i32,
    writer: Writer,
    /// The first offset of the transaction under way.
    first: Option<i64>,
    index: Option<Index>,
}

impl Transaction {
    pub fn new(bootstrap: &str, topic: &str, partition: i32, producer_id: i64) -> Transaction {
        Transaction {
            bootstrap: bootstrap.to_string(),
            topic: topic.to_string(),
            partition,
            writer: Writer { producer_id, epoch: 0, base_sequence: 0 },
            first: None,
            index: None,
        }
    }

    /// The same, its aborted transactions listed by `proxy` in Fetch responses.
    pub fn through(proxy: &FetchProxy, topic: &str, partition: i32, producer_id: i64) -> Transaction {
        Transaction {
            index: Some(proxy.index.clone()),
            ..Transaction::new(&proxy.address, topic, partition, producer_id)
        }
    }

    /// Writes `records` as one transactional batch; returns their offsets.
    pub async fn send(&mut self, records: &[Raw]) -> std::ops::Range<i64> {
        let batch = record_batch(TRANSACTIONAL, self.writer, records);
        self.writer.base_sequence += records.len() as i32;
        let base = produce(&self.bootstrap, &self.topic, self.partition, &batch).await;
        self.first.get_or_insert(base);
        base..base + records.len() as i64
    }

    /// Writes the commit (or abort) marker; returns its offset.
    pub async fn end(&mut self, commit: bool) -> i64 {
        let offset = produce(&self.bootstrap, &self.topic, self.partition, &marker(self.writer, commit)).await;
        let first = self.first.take().unwrap_or(offset);
        if let (false, Some(index)) = (commit, &self.index) {
            index.lock().expect("aborted transactions").push(Aborted {
                topic: self.topic.clone(),
                partition: self.partition,
                producer_id: self.writer.producer_id,
                first,
                marker: offset,
            });
        }
        offset
    }
}

/// Writes `records` as one batch of a plain producer; returns their offsets.
pub async fn send_plain(bootstrap: &str, topic: &str, partition: i32, records: &[Raw]) -> std::ops::Range<i64> {
    let base = produce(bootstrap, topic, partition, &record_batch(0, Writer::PLAIN, records)).await;
    base..base + records.len() as i64
}

/// An aborted transaction of one partition: its producer, its first offset there and its abort
/// marker's offset.
#[derive(Debug, Clone)]
pub struct Aborted {
    pub topic: String,
    pub partition: i32,
    pub producer_id: i64,
    pub first: i64,
    pub marker: i64,
}

type Index = Arc<Mutex<Vec<Aborted>>>;

/// The Fetch request's API key.
const FETCH: i16 = 1;

/// A proxy in front of a mock broker that adds to its Fetch responses what the mock leaves out:
/// the aborted transactions overlapping the records returned, as Kafka lists them from its
/// transaction index, so that a `read_committed` consumer drops their records. Everything else
/// passes unchanged. The broker advertises the proxy's address, so every connection a client
/// opens goes through it, and offers Fetch up to v11, whose responses have a fixed layout (v12 on
/// are "flexible", with compact fields and tagged ones).
///
/// A Fetch response partition (v4 to v11): index (i32), error (i16), high watermark (i64), last
/// stable offset (i64), log start offset (i64, v5 on), aborted transactions (array of producer id
/// and first offset, i64 each), preferred read replica (i32, v11), records (bytes).
pub struct FetchProxy {
    pub address: String,
    index: Index,
    listener: tokio::task::JoinHandle<()>,
}

impl FetchProxy {
    /// Starts a proxy in front of broker 1 of `kafka` (a cluster of one broker), which then names
    /// the proxy as its address.
    pub async fn start(kafka: &MockKafka) -> FetchProxy {
        let broker = kafka.bootstrap_servers();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port for the proxy");
        let port = listener.local_addr().expect("the proxy's address").port();
        kafka.advertise(1, "127.0.0.1", port).expect("advertising the proxy");
        kafka.api_versions(FETCH, 4, 11).expect("offering Fetch v4 to v11");
        let index = Index::default();
        let shared = index.clone();
        let listener = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&broker).await else { continue };
                tokio::spawn(relay(client, server, shared.clone()));
            }
        });
        FetchProxy { address: format!("127.0.0.1:{port}"), index, listener }
    }
}

impl Drop for FetchProxy {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// Reads one size-prefixed frame.
async fn frame(stream: &mut (impl AsyncReadExt + Unpin)) -> Option<Vec<u8>> {
    let size = stream.read_i32().await.ok()?;
    let mut frame = vec![0u8; usize::try_from(size).ok()?];
    stream.read_exact(&mut frame).await.ok()?;
    Some(frame)
}

/// Passes requests and responses between a client and the broker until either side closes,
/// rewriting Fetch responses.
async fn relay(client: TcpStream, server: TcpStream, index: Index) {
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    // The API key and version of each request, by correlation id, for reading its response.
    let requests: Arc<Mutex<HashMap<i32, (i16, i16)>>> = Arc::default();
    let asked = requests.clone();
    let up = async move {
        while let Some(request) = frame(&mut from_client).await {
            let mut header = Reader(&request);
            let (key, version, correlation) = (header.i16(), header.i16(), header.i32());
            asked.lock().expect("requests").insert(correlation, (key, version));
            let sent = to_server.write_all(&(request.len() as i32).to_be_bytes()).await;
            if sent.is_err() || to_server.write_all(&request).await.is_err() {
                break;
            }
        }
    };
    let down = async move {
        while let Some(mut response) = frame(&mut from_server).await {
            let correlation = Reader(&response).i32();
            let request = requests.lock().expect("requests").remove(&correlation);
            if let Some((FETCH, version)) = request {
                response = with_aborted(&response, version, &index.lock().expect("aborted transactions"));
            }
            let sent = to_client.write_all(&(response.len() as i32).to_be_bytes()).await;
            if sent.is_err() || to_client.write_all(&response).await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

/// The offsets of the records in a partition's record batches: first and last.
fn span(mut records: &[u8]) -> Option<(i64, i64)> {
    let mut span: Option<(i64, i64)> = None;
    // Base offset (8), length (4), then up to the last offset delta (at 23 from the start).
    while records.len() >= 27 {
        let mut header = Reader(records);
        let base = header.i64();
        let length = header.i32() as usize;
        let last = base + i64::from(i32::from_be_bytes(records[23..27].try_into().expect("4 bytes")));
        span = Some(span.map_or((base, last), |(first, _)| (first, last)));
        records = &records[(12 + length).min(records.len())..];
    }
    span
}

/// A Fetch response (v4 to v11) with the aborted transactions of `index` that overlap the records
/// of each partition added to that partition's list.
fn with_aborted(response: &[u8], version: i16, index: &[Aborted]) -> Vec<u8> {
    assert!((4..=11).contains(&version), "Fetch v{version}: the mock broker offers v4 to v11 here");
    let mut reader = Reader(response);
    let mut out = Vec::with_capacity(response.len() + 64);
    // Correlation id, throttle time, and from v7 an error code and session id.
    out.extend_from_slice(reader.bytes(if version >= 7 { 14 } else { 8 }));
    let topics = reader.i32();
    out.extend_from_slice(&topics.to_be_bytes());
    for _ in 0..topics {
        let topic = reader.string();
        out.extend_from_slice(&(topic.len() as i16).to_be_bytes());
        out.extend_from_slice(topic);
        let partitions = reader.i32();
        out.extend_from_slice(&partitions.to_be_bytes());
        for _ in 0..partitions {
            let partition = reader.i32();
            out.extend_from_slice(&partition.to_be_bytes());
            // Error, high watermark, last stable offset, log start offset.
            out.extend_from_slice(reader.bytes(if version >= 5 { 26 } else { 18 }));
            let listed = reader.i32().max(0) as usize;
            let mut aborted = reader.bytes(listed * 16).to_vec();
            let replica = reader.bytes(if version >= 11 { 4 } else { 0 });
            let length = reader.i32();
            let records = reader.bytes(length.max(0) as usize);
            if let Some((first, last)) = span(records) {
                for transaction in index.iter().filter(|t| {
                    t.topic.as_bytes() == topic && t.partition == partition && t.first <= last && t.marker >= first
                }) {
                    aborted.extend_from_slice(&transaction.producer_id.to_be_bytes());
                    aborted.extend_from_slice(&transaction.first.to_be_bytes());
                }
            }
            out.extend_from_slice(&((aborted.len() / 16) as i32).to_be_bytes());
            out.extend_from_slice(&aborted);
            out.extend_from_slice(replica);
            out.extend_from_slice(&length.to_be_bytes());
            out.extend_from_slice(records);
        }
    }
    out.extend_from_slice(reader.0);
    out
}
