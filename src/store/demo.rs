//! What `projector demo` prints of the example read models, read back in key order.

/// A row of `order_summary`, every column as text (absent ones empty).
#[derive(Debug, Clone, PartialEq)]
pub struct OrderSummaryRow {
    pub order_id: String,
    pub customer_id: String,
    pub total: String,
    pub status: String,
    pub paid: String,
    pub carrier: String,
    pub version: i64,
}

/// A row of `customer_totals`.
#[derive(Debug, Clone, PartialEq)]
pub struct CustomerTotalsRow {
    pub customer_id: String,
    pub placed: i64,
    pub cancelled: i64,
    pub total_placed: String,
    pub total_paid: String,
}

/// Every row of `order_summary`, by order id.
pub async fn order_summaries(client: &tokio_postgres::Client) -> Result<Vec<OrderSummaryRow>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT order_id::text, customer_id, total::text, status, coalesce(paid_amount::text, ''), coalesce(carrier, ''), version
               FROM order_summary ORDER BY order_id",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| OrderSummaryRow {
            order_id: row.get(0),
            customer_id: row.get(1),
            total: row.get(2),
            status: row.get(3),
            paid: row.get(4),
            carrier: row.get(5),
            version: row.get(6),
        })
        .collect())
}

/// Every row of `customer_totals`, by customer id.
pub async fn customer_totals(client: &tokio_postgres::Client) -> Result<Vec<CustomerTotalsRow>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT customer_id, orders_placed, orders_cancelled, total_placed::text, total_paid::text
               FROM customer_totals ORDER BY customer_id",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| CustomerTotalsRow {
            customer_id: row.get(0),
            placed: row.get(1),
            cancelled: row.get(2),
            total_placed: row.get(3),
            total_paid: row.get(4),
        })
        .collect())
}
