//! Decoding alone: the example shop's `order_summary` projection (`projections/order_summary.toml`)
//! reading records with the throughput bench's envelope (`benches/throughput/workload.rs`); no
//! Kafka, no Postgres.
//!
//! `cargo bench --bench decode [-- RECORDS]` (default 100,000) prints the time per record, the best
//! of five passes, and fails unless every record decodes as handled. Under `valgrind
//! --tool=callgrind` the instruction count per record is exact and repeatable (BENCHMARKS.md).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use projector::projection::{compile_file, Decoded, Record};

// The engine's allocator (src/main.rs).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// `n` records of 10,000 orders, each order's stream `OrderPlaced`, `OrderPaid`, then
/// `OrderShipped`, on 8 partitions, keyed by order.
fn records(n: usize) -> Vec<Record> {
    let topic: Arc<str> = "shop.orders".into();
    (0..n as u64)
        .map(|i| {
            let order = i % 10_000;
            let version = i / 10_000 % 3 + 1;
            let stream_id = uuid::Uuid::from_u64_pair(0x5eed, order);
            let customer = format!("customer-{}", order % 997);
            let total = format!("{}.50", order % 500);
            let (event_type, data) = match version {
                1 => ("OrderPlaced", format!(r#"{{"customer_id":"{customer}","total":"{total}"}}"#)),
                2 => ("OrderPaid", format!(r#"{{"customer_id":"{customer}","amount":"{total}"}}"#)),
                _ => ("OrderShipped", r#"{"carrier":"note 3"}"#.to_string()),
            };
            let id = uuid::Uuid::from_u64_pair(order, version);
            let at = format!("2026-01-01T00:00:0{version}+00:00");
            let value = format!(
                r#"{{"id":"{id}","type":"{event_type}","stream_id":"{stream_id}","stream_version":{version},"occurred_at":"{at}","data":{data}}}"#
            );
            Record {
                topic: topic.clone(),
                partition: (order % 8) as i32,
                offset: i as i64,
                key: Some(stream_id.to_string().into_bytes()),
                value: Some(value.into_bytes()),
                headers: Vec::new(),
                timestamp_ms: Some(1_767_225_600_000),
            }
        })
        .collect()
}

fn main() {
    let n: usize =
        std::env::args().skip(1).find(|arg| !arg.starts_with('-')).and_then(|arg| arg.parse().ok()).unwrap_or(100_000);
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("projections/order_summary.toml");
    let text = std::fs::read_to_string(&path).expect("projections/order_summary.toml");
    let projection = compile_file(&path, &text).expect("order_summary compiles");
    let records = records(n);
    let bytes: usize = records.iter().map(|record| record.value.as_ref().map_or(0, Vec::len)).sum();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let started = Instant::now();
        let mut handled = 0usize;
        for record in &records {
            if let Decoded::Handled { event, .. } = std::hint::black_box(projection.decode(record)) {
                handled += usize::from(event.version.is_some());
            }
        }
        assert_eq!(handled, n, "every record decodes as handled");
        best = best.min(started.elapsed().as_secs_f64());
    }
    println!(
        "decode: {n} records of {:.0} bytes, {:.1} ns per record (best of 5)",
        bytes as f64 / n as f64,
        best * 1e9 / n as f64
    );
}
