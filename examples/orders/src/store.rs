//! The database: orders and the outbox.

use chassis::{context::TraceContext, db::Database};

use crate::{
    client::{Order, OrderStatus},
    idempotency::{self, Scope},
};

type OrderRow = (String, String, String, i64, String, String, String, String);

const ORDER_COLUMNS: &str =
    "id, account, ticket_id, quantity, email, reservation_id, status, created_at";

fn order(row: OrderRow) -> Order {
    let (id, account, ticket_id, quantity, email, reservation_id, status, created_at) = row;
    Order {
        id,
        account,
        ticket_id,
        quantity: u32::try_from(quantity).unwrap_or(0),
        email,
        reservation_id,
        status: match status.as_str() {
            "confirmed" => OrderStatus::Confirmed,
            "attention" => OrderStatus::Attention,
            _ => OrderStatus::Placed,
        },
        created_at,
    }
}

/// One event to deliver.
#[derive(Debug, Clone)]
pub(crate) struct OutboxEvent {
    pub(crate) id: String,
    pub(crate) kind: String,
    pub(crate) order_id: String,
    pub(crate) payload: serde_json::Value,
    pub(crate) correlation_id: String,
    pub(crate) attempts: u32,
    /// The span that stored the event, as a `traceparent`, with its
    /// `tracestate`.
    pub(crate) trace: Option<(String, Option<String>)>,
}

/// Writes the order, its outbox events and the key's stored answer in one
/// transaction: all of it, or none of it.
pub(crate) async fn place(
    db: &Database,
    scope: &Scope,
    order: &Order,
    correlation_id: &str,
    trace: &TraceContext,
    response: &str,
    crash: Option<crate::CrashPoint>,
) -> Result<(), sqlx::Error> {
    let mut tx = db.begin_write().await?;
    sqlx::query(
        "INSERT INTO orders (id, account, ticket_id, quantity, email, reservation_id, status, correlation_id, created_at)
         VALUES (?, ?, ?, ?, ?, ?, 'placed', ?, ?)",
    )
    .bind(&order.id)
    .bind(&order.account)
    .bind(&order.ticket_id)
    .bind(i64::from(order.quantity))
    .bind(&order.email)
    .bind(&order.reservation_id)
    .bind(correlation_id)
    .bind(&order.created_at)
    .execute(&mut *tx)
    .await?;
    let now = chassis::time::now_millis();
    let events = [
        (
            "reservation.confirm",
            serde_json::json!({
                "account": order.account,
                "reservation_id": order.reservation_id,
                "order_id": order.id,
            }),
        ),
        (
            "order.placed",
            serde_json::json!({
                "account": order.account,
                "order_id": order.id,
                "reservation_id": order.reservation_id,
                "ticket_id": order.ticket_id,
                "quantity": order.quantity,
                "email": order.email,
            }),
        ),
    ];
    for (kind, payload) in events {
        sqlx::query(
            "INSERT INTO outbox (id, kind, order_id, payload, correlation_id, traceparent, tracestate, next_attempt_ms, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(chassis::id::prefixed("evt"))
        .bind(kind)
        .bind(&order.id)
        .bind(payload.to_string())
        .bind(correlation_id)
        .bind(trace.traceparent().to_str().ok())
        .bind(trace.tracestate().and_then(|v| v.to_str().ok()))
        .bind(now)
        .bind(&order.created_at)
        .execute(&mut *tx)
        .await?;
    }
    idempotency::complete_in(&mut tx, scope, 201, response, Some(&order.id)).await?;
    crate::CrashPoint::reached(crash, crate::CrashPoint::BeforeCommit);
    tx.commit().await
}

/// An account's order.
pub(crate) async fn get(
    db: &Database,
    account: &str,
    id: &str,
) -> Result<Option<Order>, sqlx::Error> {
    let row: Option<OrderRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {ORDER_COLUMNS} FROM orders WHERE account = ? AND id = ?"
    )))
    .bind(account)
    .bind(id)
    .fetch_optional(db.pool())
    .await?;
    Ok(row.map(order))
}

/// An account's orders, newest first, at most `limit`.
pub(crate) async fn list(
    db: &Database,
    account: &str,
    limit: u32,
) -> Result<Vec<Order>, sqlx::Error> {
    let rows: Vec<OrderRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {ORDER_COLUMNS} FROM orders WHERE account = ? ORDER BY created_at DESC, id DESC LIMIT ?"
    )))
    .bind(account)
    .bind(i64::from(limit))
    .fetch_all(db.pool())
    .await?;
    Ok(rows.into_iter().map(order).collect())
}

/// Events due for delivery, oldest first.
pub(crate) async fn due_events(db: &Database, limit: u32) -> Result<Vec<OutboxEvent>, sqlx::Error> {
    #[allow(clippy::type_complexity)]
    let rows: Vec<(String, String, String, String, String, i64, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT id, kind, order_id, payload, correlation_id, attempts, traceparent, tracestate FROM outbox
         WHERE delivered_at IS NULL AND parked_at IS NULL AND next_attempt_ms <= ?
         ORDER BY next_attempt_ms, created_at LIMIT ?",
    )
    .bind(chassis::time::now_millis())
    .bind(i64::from(limit))
    .fetch_all(db.pool())
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(id, kind, order_id, payload, correlation_id, attempts, traceparent, tracestate)| {
                OutboxEvent {
                    id,
                    kind,
                    order_id,
                    payload: serde_json::from_str(&payload).unwrap_or(serde_json::Value::Null),
                    correlation_id,
                    attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                    trace: traceparent.map(|t| (t, tracestate)),
                }
            },
        )
        .collect())
}

/// Marks an event delivered, and moves its order on when it was the
/// reservation's confirmation.
pub(crate) async fn delivered(db: &Database, event: &OutboxEvent) -> Result<(), sqlx::Error> {
    let mut tx = db.begin_write().await?;
    sqlx::query("UPDATE outbox SET delivered_at = ?, last_error = NULL WHERE id = ? AND delivered_at IS NULL")
        .bind(chassis::time::now_rfc3339())
        .bind(&event.id)
        .execute(&mut *tx)
        .await?;
    if event.kind == "reservation.confirm" {
        sqlx::query("UPDATE orders SET status = 'confirmed' WHERE id = ? AND status = 'placed'")
            .bind(&event.order_id)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}

/// Schedules another attempt.
pub(crate) async fn retry_later(
    db: &Database,
    event: &OutboxEvent,
    counted: bool,
    next_attempt_ms: i64,
    error: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE outbox SET attempts = attempts + ?, next_attempt_ms = ?, last_error = ? WHERE id = ?")
        .bind(i64::from(counted))
        .bind(next_attempt_ms)
        .bind(error)
        .bind(&event.id)
        .execute(&mut *db.writer().await?)
        .await?;
    Ok(())
}

/// Parks an event that cannot be delivered; its order needs attention.
pub(crate) async fn park(
    db: &Database,
    event: &OutboxEvent,
    error: &str,
) -> Result<(), sqlx::Error> {
    let mut tx = db.begin_write().await?;
    sqlx::query(
        "UPDATE outbox SET parked_at = ?, attempts = attempts + 1, last_error = ? WHERE id = ?",
    )
    .bind(chassis::time::now_rfc3339())
    .bind(error)
    .bind(&event.id)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE orders SET status = 'attention' WHERE id = ?")
        .bind(&event.order_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Events waiting for delivery, and events parked.
pub(crate) async fn outbox_counts(db: &Database) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as(
        "SELECT
           COALESCE(SUM(CASE WHEN delivered_at IS NULL AND parked_at IS NULL THEN 1 ELSE 0 END), 0),
           COALESCE(SUM(CASE WHEN parked_at IS NOT NULL THEN 1 ELSE 0 END), 0)
         FROM outbox",
    )
    .fetch_one(db.pool())
    .await
}
