//! The shop domain as the tests see it: typed events (each carrying the `ShopEvent` published for
//! it), and the read models they must fold to, computed here independently of the engine.

use std::collections::{BTreeMap, BTreeSet};

use projector::demo::{shop_event, ShopEvent};
use rust_decimal::Decimal;
use serde_json::json;
use tokio_postgres::Client;

/// What happened to an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Placed { total: Decimal },
    Paid { amount: Decimal },
    Shipped { carrier: String },
    Cancelled { reason: String },
}

/// One distinct event: its identity is `event.value["id"]`; publishing a clone is a duplicate.
#[derive(Debug, Clone)]
pub struct Fact {
    pub order: String,
    pub customer: String,
    pub version: i64,
    pub kind: Kind,
    pub event: ShopEvent,
}

impl Fact {
    pub fn new(order: &str, customer: &str, version: i64, kind: Kind) -> Fact {
        let (event_type, data) = match &kind {
            Kind::Placed { total } => ("OrderPlaced", json!({"customer_id": customer, "total": total.to_string()})),
            Kind::Paid { amount } => ("OrderPaid", json!({"customer_id": customer, "amount": amount.to_string()})),
            Kind::Shipped { carrier } => ("OrderShipped", json!({"customer_id": customer, "carrier": carrier})),
            Kind::Cancelled { reason } => ("OrderCancelled", json!({"customer_id": customer, "reason": reason})),
        };
        Fact {
            order: order.to_string(),
            customer: customer.to_string(),
            version,
            kind,
            event: shop_event(order, version, event_type, data),
        }
    }

    pub fn id(&self) -> String {
        self.event.value["id"].as_str().expect("shop events have a string id").to_string()
    }

    /// Whether `customer_totals` has a handler for it (it ignores `OrderShipped`).
    pub fn counts_for_customer_totals(&self) -> bool {
        !matches!(self.kind, Kind::Shipped { .. })
    }
}

/// Cents as a two-decimal amount.
pub fn money(cents: i64) -> Decimal {
    Decimal::new(cents, 2)
}

/// A whole order's stream, in version order: placed, then paid (then maybe shipped) or cancelled.
pub fn order_stream(order: &str, customer: &str, cents: i64, then: &[&str]) -> Vec<Fact> {
    let mut stream = vec![Fact::new(order, customer, 1, Kind::Placed { total: money(cents) })];
    for (i, step) in then.iter().enumerate() {
        let kind = match *step {
            "paid" => Kind::Paid { amount: money(cents) },
            "shipped" => Kind::Shipped { carrier: "parcelco".into() },
            "cancelled" => Kind::Cancelled { reason: "changed mind".into() },
            other => panic!("unknown step `{other}`"),
        };
        stream.push(Fact::new(order, customer, i as i64 + 2, kind));
    }
    stream
}

pub fn events(facts: &[Fact]) -> Vec<ShopEvent> {
    facts.iter().map(|fact| fact.event.clone()).collect()
}

/// The distinct facts among `published` (by event id), first copy first.
pub fn distinct(published: &[Fact]) -> Vec<Fact> {
    let mut seen = BTreeSet::new();
    published.iter().filter(|fact| seen.insert(fact.id())).cloned().collect()
}

/// A row of `order_summary`, without its timestamps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRow {
    pub customer_id: String,
    pub total: Decimal,
    pub status: String,
    pub paid_amount: Option<Decimal>,
    pub carrier: Option<String>,
    pub cancel_reason: Option<String>,
    pub version: i64,
}

/// A row of `customer_totals`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CustomerRow {
    pub orders_placed: i64,
    pub orders_cancelled: i64,
    pub total_placed: Decimal,
    pub total_paid: Decimal,
}

/// What `order_summary` must hold after `published` (duplicates included): each order's distinct
/// events applied in version order, as far as the versions follow on from 1 without a hole.
pub fn fold_order_summary(published: &[Fact]) -> BTreeMap<String, OrderRow> {
    let mut by_order: BTreeMap<String, BTreeMap<i64, Fact>> = BTreeMap::new();
    for fact in distinct(published) {
        let versions = by_order.entry(fact.order.clone()).or_default();
        assert!(
            versions.insert(fact.version, fact.clone()).is_none(),
            "test bug: two distinct events for `{}` version {}",
            fact.order,
            fact.version
        );
    }
    let mut rows = BTreeMap::new();
    for (order, versions) in by_order {
        let mut row: Option<OrderRow> = None;
        for (expected, (version, fact)) in (1..).zip(versions) {
            if version != expected {
                break; // a hole: the rest is held
            }
            match (&mut row, &fact.kind) {
                (None, Kind::Placed { total }) => {
                    row = Some(OrderRow {
                        customer_id: fact.customer.clone(),
                        total: *total,
                        status: "placed".into(),
                        paid_amount: None,
                        carrier: None,
                        cancel_reason: None,
                        version,
                    })
                }
                (Some(row), Kind::Paid { amount }) => {
                    row.status = "paid".into();
                    row.paid_amount = Some(*amount);
                    row.version = version;
                }
                (Some(row), Kind::Shipped { carrier }) => {
                    row.status = "shipped".into();
                    row.carrier = Some(carrier.clone());
                    row.version = version;
                }
                (Some(row), Kind::Cancelled { reason }) => {
                    row.status = "cancelled".into();
                    row.cancel_reason = Some(reason.clone());
                    row.version = version;
                }
                (row, kind) => panic!("test bug: {kind:?} on {row:?}"),
            }
        }
        if let Some(row) = row {
            rows.insert(order, row);
        }
    }
    rows
}

/// The versions that must be held in `projector.held_events` after `published`: every distinct
/// event past the first hole in its order's versions.
pub fn fold_held(published: &[Fact]) -> BTreeSet<(String, i64)> {
    let mut by_order: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
    for fact in distinct(published) {
        by_order.entry(fact.order).or_default().insert(fact.version);
    }
    let mut held = BTreeSet::new();
    for (order, versions) in by_order {
        let mut next = 1;
        for version in versions {
            if version == next {
                next += 1;
            } else {
                held.insert((order.clone(), version));
            }
        }
    }
    held
}

/// What `customer_totals` must hold after `published`: counts and sums over distinct events.
/// (The histories of these tests always place an order before paying or cancelling it, so the
/// customer's row exists when the `UPDATE`s run.)
pub fn fold_customer_totals(published: &[Fact]) -> BTreeMap<String, CustomerRow> {
    let mut rows: BTreeMap<String, CustomerRow> = BTreeMap::new();
    for fact in distinct(published) {
        match &fact.kind {
            Kind::Placed { total } => {
                let row = rows.entry(fact.customer.clone()).or_default();
                row.orders_placed += 1;
                row.total_placed += *total;
            }
            Kind::Paid { amount } => {
                rows.get_mut(&fact.customer).expect("test bug: paid before any order placed").total_paid += *amount;
            }
            Kind::Cancelled { .. } => {
                rows.get_mut(&fact.customer).expect("test bug: cancelled before any order placed").orders_cancelled +=
                    1;
            }
            Kind::Shipped { .. } => {}
        }
    }
    rows
}

pub async fn read_order_summary(client: &Client) -> BTreeMap<String, OrderRow> {
    read_order_summary_from(client, "order_summary").await
}

/// [`read_order_summary`] from another table of the same shape (an as-of copy).
pub async fn read_order_summary_from(client: &Client, table: &str) -> BTreeMap<String, OrderRow> {
    client
        .query(
            &format!(
                "SELECT order_id::text, customer_id, total, status, paid_amount, carrier, cancel_reason, version
                   FROM {table}"
            ),
            &[],
        )
        .await
        .expect("reading order_summary")
        .iter()
        .map(|row| {
            (
                row.get(0),
                OrderRow {
                    customer_id: row.get(1),
                    total: row.get(2),
                    status: row.get(3),
                    paid_amount: row.get(4),
                    carrier: row.get(5),
                    cancel_reason: row.get(6),
                    version: row.get(7),
                },
            )
        })
        .collect()
}

pub async fn read_customer_totals(client: &Client) -> BTreeMap<String, CustomerRow> {
    client
        .query(
            "SELECT customer_id, orders_placed, orders_cancelled, total_placed, total_paid FROM customer_totals",
            &[],
        )
        .await
        .expect("reading customer_totals")
        .iter()
        .map(|row| {
            (
                row.get(0),
                CustomerRow {
                    orders_placed: row.get(1),
                    orders_cancelled: row.get(2),
                    total_placed: row.get(3),
                    total_paid: row.get(4),
                },
            )
        })
        .collect()
}

pub async fn read_held(client: &Client, projection: &str) -> BTreeSet<(String, i64)> {
    client
        .query("SELECT entity_key, version FROM projector.held_events WHERE projection = $1", &[&projection])
        .await
        .expect("reading held_events")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// Asserts that both example read models equal the fold of `published`, nothing is held beyond
/// what the fold says, and nothing was parked. `what` names the situation in failures.
pub async fn assert_read_models(client: &Client, published: &[Fact], what: &str) {
    let orders = read_order_summary(client).await;
    let expected_orders = fold_order_summary(published);
    assert_eq!(orders, expected_orders, "order_summary ({what})");
    let customers = read_customer_totals(client).await;
    let expected_customers = fold_customer_totals(published);
    assert_eq!(customers, expected_customers, "customer_totals ({what})");
    assert_eq!(read_held(client, "order_summary").await, fold_held(published), "held_events ({what})");
    let parked = super::db::query_i64(client, "SELECT count(*) FROM projector.dead_letters").await;
    assert_eq!(parked, 0, "dead_letters ({what})");
}

// ---------------------------------------------------------------------------------------------
// Histories

/// `streams` interleaved, each in its own order: at each step the next of `picks` (cycled) chooses
/// which of the streams not yet done goes on.
pub fn interleave<T: Clone>(streams: &[Vec<T>], picks: &[proptest::sample::Index]) -> Vec<T> {
    let mut cursors = vec![0usize; streams.len()];
    let mut records = Vec::new();
    let mut picks = picks.iter().cycle();
    loop {
        let open: Vec<usize> = (0..streams.len()).filter(|&i| cursors[i] < streams[i].len()).collect();
        if open.is_empty() {
            return records;
        }
        let stream = open[picks.next().expect("picks to choose with").index(open.len())];
        records.push(streams[stream][cursors[stream]].clone());
        cursors[stream] += 1;
    }
}

/// Inserts a copy of a record after it, for each `(original, offset)`: `original` picks the
/// record, `offset` how far after it the copy goes (a producer's retry).
pub fn insert_copies<T: Clone>(records: &mut Vec<T>, copies: &[(proptest::sample::Index, proptest::sample::Index)]) {
    for (original, offset) in copies {
        let original = original.index(records.len());
        let at = original + 1 + offset.index(records.len() - original);
        let copy = records[original].clone();
        records.insert(at, copy);
    }
}
