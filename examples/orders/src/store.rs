//! The database: orders and the outbox.

use chassis::{
    context::TraceContext,
    db::{Backend, Database},
};

use crate::{
    client::{
        Order, OrderPlaced, OrderStatus, ReservationConfirm,
        events::{ORDER_PLACED, RESERVATION_CONFIRM},
    },
    idempotency::{self, Lease, Scope},
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
/// transaction: all of it, or none of it. `false`, with nothing written,
/// when `lease` no longer holds the key (another request took it over).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn place(
    db: &Database,
    scope: &Scope,
    lease: Lease,
    order: &Order,
    correlation_id: &str,
    trace: &TraceContext,
    response: &str,
    crash: Option<crate::CrashPoint>,
) -> Result<bool, sqlx::Error> {
    chassis::db::retry(|| {
        place_once(
            db,
            scope,
            lease,
            order,
            correlation_id,
            trace,
            response,
            crash,
        )
    })
    .await
}

#[allow(clippy::too_many_arguments)]
async fn place_once(
    db: &Database,
    scope: &Scope,
    lease: Lease,
    order: &Order,
    correlation_id: &str,
    trace: &TraceContext,
    response: &str,
    crash: Option<crate::CrashPoint>,
) -> Result<bool, sqlx::Error> {
    let mut tx = db.begin_write().await?;
    sqlx::query(
        "INSERT INTO orders (id, account, ticket_id, quantity, email, reservation_id, status, correlation_id, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, 'placed', $7, $8)",
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
    // The versioned payloads of `client::events`, as the relay sends them.
    let confirm = ReservationConfirm {
        account: order.account.clone(),
        order_id: order.id.clone(),
        reservation_id: order.reservation_id.clone(),
    };
    let placed = OrderPlaced {
        account: order.account.clone(),
        email: order.email.clone(),
        order_id: order.id.clone(),
        quantity: order.quantity,
        reservation_id: order.reservation_id.clone(),
        ticket_id: order.ticket_id.clone(),
    };
    let events = [
        (RESERVATION_CONFIRM, serde_json::to_string(&confirm)),
        (ORDER_PLACED, serde_json::to_string(&placed)),
    ];
    for (kind, payload) in events {
        sqlx::query(
            "INSERT INTO outbox (id, kind, order_id, payload, correlation_id, traceparent, tracestate, next_attempt_ms, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(chassis::id::prefixed("evt"))
        .bind(kind)
        .bind(&order.id)
        .bind(payload.map_err(|e| sqlx::Error::Encode(Box::new(e)))?)
        .bind(correlation_id)
        .bind(trace.traceparent().to_str().ok())
        .bind(trace.tracestate().and_then(|v| v.to_str().ok()))
        .bind(now)
        .bind(&order.created_at)
        .execute(&mut *tx)
        .await?;
    }
    if !idempotency::complete_in(&mut tx, scope, lease, 201, response, Some(&order.id)).await? {
        // Ended now, not when the writer is next used: on SQLite another
        // instance may be waiting for the file's lock.
        tx.rollback().await?;
        return Ok(false);
    }
    crate::CrashPoint::reached(crash, crate::CrashPoint::BeforeCommit);
    tx.commit().await?;
    Ok(true)
}

/// An account's order.
pub(crate) async fn get(
    db: &Database,
    account: &str,
    id: &str,
) -> Result<Option<Order>, sqlx::Error> {
    let row: Option<OrderRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {ORDER_COLUMNS} FROM orders WHERE account = $1 AND id = $2"
    )))
    .bind(account)
    .bind(id)
    .fetch_optional(db.pool())
    .await?;
    Ok(row.map(order))
}

/// An account's orders, newest first (`created_at`, then `id`, both
/// descending), from strictly after `after` (the sort key of the previous
/// page's last order), at most `limit`.
pub(crate) async fn list(
    db: &Database,
    account: &str,
    after: Option<&(String, String)>,
    limit: i64,
) -> Result<Vec<Order>, sqlx::Error> {
    // Row values compare alike on SQLite and Postgres.
    let keyset = if after.is_some() {
        "AND (created_at, id) < ($3, $4)"
    } else {
        ""
    };
    let sql = format!(
        "SELECT {ORDER_COLUMNS} FROM orders WHERE account = $1 {keyset}
         ORDER BY created_at DESC, id DESC LIMIT $2"
    );
    let mut query = sqlx::query_as::<_, OrderRow>(sqlx::AssertSqlSafe(sql))
        .bind(account)
        .bind(limit);
    if let Some((created_at, id)) = after {
        query = query.bind(created_at).bind(id);
    }
    let rows = query.fetch_all(db.pool()).await?;
    Ok(rows.into_iter().map(order).collect())
}

/// The outbox columns of an [`OutboxEvent`], with its due time and age for
/// ordering.
type EventRow = (
    String,
    String,
    String,
    String,
    String,
    i64,
    Option<String>,
    Option<String>,
    i64,
    String,
);

/// Claims up to `limit` events due at `now` for the relay `owner`, until
/// `lease_until`, oldest first: events not yet delivered nor parked whose
/// time has come and that no relay holds (never claimed, or the claim
/// expired). Another relay claims none of them until the lease expires.
///
/// One conditional `UPDATE … RETURNING`: a subquery picks candidates,
/// and the update re-checks on each row it changes that it is still due
/// and unclaimed, so on Postgres at read committed a relay that finds a row
/// just claimed by another leaves it. On Postgres the candidates are picked
/// `FOR UPDATE SKIP LOCKED`, so relays claiming at once take different
/// events instead of waiting for each other, and once (`MATERIALIZED`: a
/// subquery that skips locked rows may give other rows each time it runs,
/// and the update could then claim more than `limit`); SQLite's one writer
/// runs one claim at a time.
pub(crate) async fn claim_due(
    db: &Database,
    owner: &str,
    now: i64,
    lease_until: i64,
    limit: u32,
) -> Result<Vec<OutboxEvent>, sqlx::Error> {
    // The one place the engines differ.
    let (materialized, skip_locked) = match db.backend() {
        Backend::Postgres => ("MATERIALIZED", "FOR UPDATE SKIP LOCKED"),
        _ => ("", ""),
    };
    let due = "delivered_at IS NULL AND parked_at IS NULL AND next_attempt_ms <= $3
               AND (lease_until IS NULL OR lease_until < $3)";
    let mut rows: Vec<EventRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "WITH candidates AS {materialized} (
             SELECT id FROM outbox WHERE {due}
             ORDER BY next_attempt_ms, created_at LIMIT $4
             {skip_locked}
         )
         UPDATE outbox SET lease_owner = $1, lease_until = $2
         WHERE id IN (SELECT id FROM candidates)
         AND {due}
         RETURNING id, kind, order_id, payload, correlation_id, attempts, traceparent, tracestate,
                   next_attempt_ms, created_at"
    )))
    .bind(owner)
    .bind(lease_until)
    .bind(now)
    .bind(i64::from(limit))
    .fetch_all(&mut *db.writer().await?)
    .await?;
    // RETURNING follows no order.
    rows.sort_by(|a, b| (a.8, &a.9).cmp(&(b.8, &b.9)));
    Ok(rows
        .into_iter()
        .map(
            |(
                id,
                kind,
                order_id,
                payload,
                correlation_id,
                attempts,
                traceparent,
                tracestate,
                _,
                _,
            )| {
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
/// reservation's confirmation, if `owner` still holds its lease. `false`
/// when it does not (the lease expired and another relay claimed the
/// event): nothing changed, the other relay records its own delivery.
pub(crate) async fn delivered(
    db: &Database,
    owner: &str,
    event: &OutboxEvent,
) -> Result<bool, sqlx::Error> {
    chassis::db::retry(|| async {
        let mut tx = db.begin_write().await?;
        let done = sqlx::query(
            "UPDATE outbox SET delivered_at = $1, last_error = NULL, lease_owner = NULL, lease_until = NULL
             WHERE id = $2 AND lease_owner = $3 AND delivered_at IS NULL",
        )
        .bind(chassis::time::now_rfc3339())
        .bind(&event.id)
        .bind(owner)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            // Ended now, not when the writer is next used: on SQLite another
            // instance may be waiting for the file's lock.
            tx.rollback().await?;
            return Ok(false);
        }
        if event.kind == "reservation.confirm" {
            sqlx::query("UPDATE orders SET status = 'confirmed' WHERE id = $1 AND status = 'placed'")
                .bind(&event.order_id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(true)
    })
    .await
}

/// Schedules another attempt and gives the event's lease up, if `owner`
/// still holds it; `false` when it does not.
pub(crate) async fn retry_later(
    db: &Database,
    owner: &str,
    event: &OutboxEvent,
    counted: bool,
    next_attempt_ms: i64,
    error: &str,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE outbox
         SET attempts = attempts + $1, next_attempt_ms = $2, last_error = $3,
             lease_owner = NULL, lease_until = NULL
         WHERE id = $4 AND lease_owner = $5",
    )
    .bind(i64::from(counted))
    .bind(next_attempt_ms)
    .bind(error)
    .bind(&event.id)
    .bind(owner)
    .execute(&mut *db.writer().await?)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Parks an event that cannot be delivered, if `owner` still holds its
/// lease; its order needs attention. `false` when the lease was lost.
pub(crate) async fn park(
    db: &Database,
    owner: &str,
    event: &OutboxEvent,
    error: &str,
) -> Result<bool, sqlx::Error> {
    chassis::db::retry(|| async {
        let mut tx = db.begin_write().await?;
        let done = sqlx::query(
            "UPDATE outbox
             SET parked_at = $1, attempts = attempts + 1, last_error = $2,
                 lease_owner = NULL, lease_until = NULL
             WHERE id = $3 AND lease_owner = $4",
        )
        .bind(chassis::time::now_rfc3339())
        .bind(error)
        .bind(&event.id)
        .bind(owner)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            // Ended now, not when the writer is next used: on SQLite another
            // instance may be waiting for the file's lock.
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query("UPDATE orders SET status = 'attention' WHERE id = $1")
            .bind(&event.order_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    })
    .await
}

/// Gives back every event `owner` holds and has not finished (the relay
/// stops, or its lease is running out before it got to them), so that any
/// relay may claim them at once rather than after the lease.
pub(crate) async fn release(db: &Database, owner: &str) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE outbox SET lease_owner = NULL, lease_until = NULL
         WHERE lease_owner = $1 AND delivered_at IS NULL AND parked_at IS NULL",
    )
    .bind(owner)
    .execute(&mut *db.writer().await?)
    .await?;
    Ok(done.rows_affected())
}

/// Events waiting for delivery, and events parked.
pub(crate) async fn outbox_counts(db: &Database) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as(
        "SELECT
           CAST(COALESCE(SUM(CASE WHEN delivered_at IS NULL AND parked_at IS NULL THEN 1 ELSE 0 END), 0) AS BIGINT),
           CAST(COALESCE(SUM(CASE WHEN parked_at IS NOT NULL THEN 1 ELSE 0 END), 0) AS BIGINT)
         FROM outbox",
    )
    .fetch_one(db.pool())
    .await
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chassis::{
        db::DbConfig,
        testing::{TempDir, TestDatabase},
    };

    use super::*;

    /// Two handles on one database, as two instances of the service have:
    /// on SQLite two writers on one file, on Postgres two pools.
    async fn two_instances(dir: &TempDir, db: &TestDatabase) -> (Database, Database) {
        let config = db.configure(DbConfig::new(dir.path(), "orders.db"));
        let a = Database::open_migrated(&config, crate::migrations())
            .await
            .unwrap();
        let b = Database::open_migrated(&config, crate::migrations())
            .await
            .unwrap();
        (a, b)
    }

    /// An order with `n` events due at `due`.
    async fn events(db: &Database, n: usize, due: i64) {
        let mut tx = db.begin_write().await.unwrap();
        sqlx::query(
            "INSERT INTO orders (id, account, ticket_id, quantity, email, reservation_id, status, correlation_id, created_at)
             VALUES ('ord-1', 'acme', 'tkt-1', 1, 'a@example.com', 'res-1', 'placed', 'corr', '2026-01-01T00:00:00Z')",
        )
        .execute(&mut *tx)
        .await
        .unwrap();
        for i in 0..n {
            sqlx::query(
                "INSERT INTO outbox (id, kind, order_id, payload, correlation_id, next_attempt_ms, created_at)
                 VALUES ($1, 'order.placed', 'ord-1', '{}', 'corr', $2, $3)",
            )
            .bind(format!("evt-{i:03}"))
            .bind(due)
            .bind(format!("2026-01-01T00:00:{:02}Z", i % 60))
            .execute(&mut *tx)
            .await
            .unwrap();
        }
        tx.commit().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn relays_of_two_instances_never_claim_one_event_at_the_same_time() {
        let dir = TempDir::new("orders-claim-race");
        let test_db = TestDatabase::new();
        let (a, b) = two_instances(&dir, &test_db).await;
        let now = chassis::time::now_millis();
        let n = 120;
        events(&a, n, now).await;

        // Six relays, three per instance, claim small batches until nothing
        // is left; none records anything, so an event claimed twice would
        // be claimed while its first lease holds.
        let mut relays = Vec::new();
        for r in 0..6 {
            let db = if r % 2 == 0 { a.clone() } else { b.clone() };
            relays.push(tokio::spawn(async move {
                let owner = format!("relay-{r}");
                let mut got = Vec::new();
                let mut empty = 0;
                // Bounded: a relay stops after a few empty claims in a row.
                while empty < 3 {
                    let batch = claim_due(&db, &owner, now, now + 60_000, 4).await.unwrap();
                    if batch.is_empty() {
                        empty += 1;
                    } else {
                        empty = 0;
                    }
                    got.extend(batch.into_iter().map(|e| e.id));
                }
                (owner, got)
            }));
        }
        let mut holders: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for r in relays {
            let (owner, got) = r.await.unwrap();
            for id in got {
                holders.entry(id).or_default().push(owner.clone());
            }
        }
        let twice: Vec<_> = holders.iter().filter(|(_, o)| o.len() > 1).collect();
        assert!(twice.is_empty(), "claimed by two relays: {twice:?}");
        assert_eq!(holders.len(), n, "every event claimed");

        // Only the owner records the outcome.
        for (id, owners) in &holders {
            let event = OutboxEvent {
                id: id.clone(),
                kind: "order.placed".to_owned(),
                order_id: "ord-1".to_owned(),
                payload: serde_json::Value::Null,
                correlation_id: "corr".to_owned(),
                attempts: 0,
                trace: None,
            };
            let other = if owners[0] == "relay-0" {
                "relay-1"
            } else {
                "relay-0"
            };
            assert!(!delivered(&b, other, &event).await.unwrap(), "{id}");
            assert!(
                !retry_later(&b, other, &event, true, now, "x")
                    .await
                    .unwrap(),
                "{id}"
            );
            assert!(!park(&b, other, &event, "x").await.unwrap(), "{id}");
            assert!(delivered(&a, &owners[0], &event).await.unwrap(), "{id}");
        }
        assert_eq!(outbox_counts(&b).await.unwrap(), (0, 0));
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_over_and_the_first_relay_cannot_record() {
        let dir = TempDir::new("orders-claim-expiry");
        let test_db = TestDatabase::new();
        let (a, b) = two_instances(&dir, &test_db).await;
        let now = 1_000_000;
        events(&a, 2, now).await;

        let first = claim_due(&a, "stalled", now, now + 1000, 1).await.unwrap();
        assert_eq!(first.len(), 1);
        // The other event is still free; the claimed one is not, up to the
        // last millisecond of its lease.
        let other = claim_due(&b, "live", now + 1000, now + 2000, 10)
            .await
            .unwrap();
        assert_eq!(other.len(), 1);
        assert_ne!(other[0].id, first[0].id);
        assert!(
            claim_due(&b, "live", now + 1000, now + 2000, 10)
                .await
                .unwrap()
                .is_empty()
        );

        // Expired: the live relay takes it over, and the stalled one can
        // record nothing.
        let again = claim_due(&b, "live", now + 1001, now + 3000, 10)
            .await
            .unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].id, first[0].id);
        assert!(!delivered(&a, "stalled", &first[0]).await.unwrap());
        assert!(!park(&a, "stalled", &first[0], "late").await.unwrap());
        assert!(delivered(&b, "live", &again[0]).await.unwrap());

        // A retry gives the lease up: the event is due again at its time,
        // for any relay.
        assert!(
            retry_later(&b, "live", &other[0], true, now + 5000, "down")
                .await
                .unwrap()
        );
        assert!(
            claim_due(&a, "stalled", now + 4999, now + 9000, 10)
                .await
                .unwrap()
                .is_empty()
        );
        let retried = claim_due(&a, "stalled", now + 5000, now + 9000, 10)
            .await
            .unwrap();
        assert_eq!((retried.len(), retried[0].attempts), (1, 1));
        // Given back (the relay stops): claimable at once.
        assert_eq!(release(&a, "stalled").await.unwrap(), 1);
        assert_eq!(
            claim_due(&b, "live", now + 5001, now + 9000, 10)
                .await
                .unwrap()
                .len(),
            1
        );
        assert_eq!(outbox_counts(&a).await.unwrap(), (1, 0));
    }
}
