//! `Idempotency-Key`: one order per key, the same answer for every retry.
//!
//! The semantics of the IETF draft (draft-ietf-httpapi-idempotency-key-header)
//! and of Stripe's API:
//!
//! | request | answer |
//! |---|---|
//! | no key, or a key that is empty, longer than 255 or outside `[A-Za-z0-9._~:-]` | 400, nothing stored |
//! | first request with a key | processed; its answer stored with the order, in the same transaction |
//! | same key, same request, first one finished | the stored status and body again, with `Idempotent-Replayed: true` |
//! | same key, same request, first one still running | 409 with `Retry-After` |
//! | same key, different request | 422 |
//! | same key from another account or caller | a different key: keys are scoped by (account, caller, key) |
//!
//! "Same request" means the same fingerprint: SHA-256 over the method, the
//! route template, the account and the canonical JSON body (keys sorted).
//! Validation errors, found before any work starts, are not stored.
//!
//! Execution that fails **before anything was committed** (ticketing
//! unavailable, a timeout) gives the key back, so a retry runs again: the
//! reservation call carries an idempotency key derived from this one, so
//! running again cannot reserve twice. Answers that are final (created,
//! sold out, unknown ticket) are stored and replayed.
//!
//! A started request holds its key for a lease (15 s by default, longer
//! than the downstream deadline). If the process dies mid-request, the key
//! is taken over by the first retry after the lease, which runs the request
//! again; the request that lost its lease can then neither store its
//! answer nor give the key back ([`Lease`]). Keys live in the database, so
//! replays survive restarts, and every instance of the service sharing a
//! Postgres database sees the same keys: claims race only on conditional
//! writes ([`claim`]).

use std::time::Duration;

use aws_lc_rs::digest;
use chassis::db::Database;
use http::{HeaderMap, HeaderValue};

/// `Idempotent-Replayed`, set on replayed answers.
pub const REPLAYED: http::HeaderName = http::HeaderName::from_static("idempotent-replayed");

/// Longest accepted key.
pub const MAX_KEY_LEN: usize = 255;

/// The key of a request, if it is valid.
///
/// # Errors
///
/// What is wrong with it, for a 400.
pub fn key_of(headers: &HeaderMap) -> Result<String, &'static str> {
    let mut values = headers.get_all(chassis::retry::IDEMPOTENCY_KEY).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err("the Idempotency-Key header is required, exactly once");
    };
    let key = value
        .to_str()
        .map_err(|_| "the Idempotency-Key must be 1-255 characters of [A-Za-z0-9._~:-]")?;
    if key.is_empty()
        || key.len() > MAX_KEY_LEN
        || !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_~:".contains(&b))
    {
        return Err("the Idempotency-Key must be 1-255 characters of [A-Za-z0-9._~:-]");
    }
    Ok(key.to_owned())
}

/// The scope a key is unique in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// The account in the path.
    pub account: String,
    /// The caller's subject.
    pub principal: String,
    /// The key.
    pub key: String,
}

impl Scope {
    /// A stable, header-safe name for this scope, for the idempotency key of
    /// calls made while executing the request.
    pub fn derived_key(&self, purpose: &str) -> String {
        let text = format!(
            "{purpose}\n{}\n{}\n{}",
            self.account, self.principal, self.key
        );
        format!(
            "{purpose}:{}",
            hex(digest::digest(&digest::SHA256, text.as_bytes()).as_ref())
        )
    }
}

/// The fingerprint of a request: method, route template, account and the
/// canonical JSON body.
pub fn fingerprint(method: &str, route: &str, account: &str, body: &serde_json::Value) -> String {
    // serde_json's maps are ordered by key, so this is canonical.
    let canonical = body.to_string();
    let text = format!("{method}\n{route}\n{account}\n{canonical}");
    hex(digest::digest(&digest::SHA256, text.as_bytes()).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// fingerprint, state, lease end, stored status and body.
type KeyRow = (String, String, i64, Option<i64>, Option<String>);

/// A started request's hold on its key: the end of its lease, which no
/// other hold on the same key shares (a take-over happens only after the
/// lease ended, and sets a later one). Storing the answer or giving the key
/// back needs it, so a request whose lease was taken over can neither
/// overwrite nor drop the key of the request that took over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease(i64);

/// What claiming a key found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The key is ours, under this lease: run the request.
    Run(Lease),
    /// The request already finished: answer this again.
    Replay {
        /// Its status.
        status: u16,
        /// Its body.
        body: String,
    },
    /// The same request is running now.
    InProgress {
        /// When its lease ends.
        retry_after: Duration,
    },
    /// The key was used for a different request.
    Mismatch,
}

/// How often a claim looks again when the key it found was given back
/// between two of its statements.
const CLAIM_ROUNDS: usize = 3;

/// Claims `scope` for a request with `fingerprint`, for `lease`.
///
/// Correct with any number of instances on one database: the key is taken
/// by an `INSERT … ON CONFLICT DO NOTHING` (the primary key settles a race:
/// one insert wins), or, when its lease has ended, by an update that
/// re-checks on the row that it is still started, for the same request,
/// and expired (one take-over wins). Only when neither took it is the row
/// read, to answer with what it holds.
///
/// # Errors
///
/// The database failed.
pub async fn claim(
    db: &Database,
    scope: &Scope,
    fingerprint: &str,
    lease: Duration,
) -> Result<Claim, sqlx::Error> {
    let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 4);
    for _ in 0..CLAIM_ROUNDS {
        let now = chassis::time::now_millis();
        let until = now.saturating_add(lease_ms);
        let inserted = sqlx::query(
            "INSERT INTO idempotency_keys
             (account, principal, key, fingerprint, state, lease_until_ms, created_at)
             VALUES ($1, $2, $3, $4, 'started', $5, $6)
             ON CONFLICT (account, principal, key) DO NOTHING",
        )
        .bind(&scope.account)
        .bind(&scope.principal)
        .bind(&scope.key)
        .bind(fingerprint)
        .bind(until)
        .bind(chassis::time::now_rfc3339())
        .execute(&mut *db.writer().await?)
        .await?;
        if inserted.rows_affected() == 1 {
            return Ok(Claim::Run(Lease(until)));
        }
        // The lease ran out: whoever started died or gave up. Take over.
        let taken = sqlx::query(
            "UPDATE idempotency_keys SET lease_until_ms = $1
             WHERE account = $2 AND principal = $3 AND key = $4
               AND state = 'started' AND fingerprint = $5 AND lease_until_ms <= $6",
        )
        .bind(until)
        .bind(&scope.account)
        .bind(&scope.principal)
        .bind(&scope.key)
        .bind(fingerprint)
        .bind(now)
        .execute(&mut *db.writer().await?)
        .await?;
        if taken.rows_affected() == 1 {
            return Ok(Claim::Run(Lease(until)));
        }
        let row: Option<KeyRow> = sqlx::query_as(
            "SELECT fingerprint, state, lease_until_ms, response_status, response_body
             FROM idempotency_keys WHERE account = $1 AND principal = $2 AND key = $3",
        )
        .bind(&scope.account)
        .bind(&scope.principal)
        .bind(&scope.key)
        .fetch_optional(db.pool())
        .await?;
        let now = chassis::time::now_millis();
        match row {
            // Given back since the insert: claim again.
            None => {}
            Some((stored, _, _, _, _)) if stored != fingerprint => return Ok(Claim::Mismatch),
            Some((_, state, _, Some(status), Some(body))) if state == "completed" => {
                return Ok(Claim::Replay {
                    status: u16::try_from(status).unwrap_or(500),
                    body,
                });
            }
            // Held by another request (or taken over by one just now).
            Some((_, _, until, _, _)) => {
                return Ok(Claim::InProgress {
                    retry_after: Duration::from_millis(u64::try_from(until - now).unwrap_or(0)),
                });
            }
        }
    }
    // Claimed and given back again and again: busy, try later.
    Ok(Claim::InProgress {
        retry_after: Duration::from_secs(1),
    })
}

/// Gives a started key back, after execution failed before anything was
/// committed, so a retry runs again; nothing when `lease` no longer holds
/// it.
///
/// # Errors
///
/// The database failed.
pub async fn release(db: &Database, scope: &Scope, lease: Lease) -> Result<(), sqlx::Error> {
    sqlx::query(
        "DELETE FROM idempotency_keys
         WHERE account = $1 AND principal = $2 AND key = $3
           AND state = 'started' AND lease_until_ms = $4",
    )
    .bind(&scope.account)
    .bind(&scope.principal)
    .bind(&scope.key)
    .bind(lease.0)
    .execute(&mut *db.writer().await?)
    .await?;
    Ok(())
}

/// Stores a final answer that created nothing (e.g. sold out), to replay
/// it. `false` when `lease` no longer holds the key (another request took
/// it over): nothing is stored.
///
/// # Errors
///
/// The database failed.
pub async fn complete(
    db: &Database,
    scope: &Scope,
    lease: Lease,
    status: u16,
    body: &str,
) -> Result<bool, sqlx::Error> {
    let mut conn = db.writer().await?;
    complete_in(&mut conn, scope, lease, status, body, None).await
}

/// Stores the answer within the transaction that did the work, if `lease`
/// still holds the key; `false` when it does not, and the caller must not
/// commit.
pub(crate) async fn complete_in(
    conn: &mut sqlx::AnyConnection,
    scope: &Scope,
    lease: Lease,
    status: u16,
    body: &str,
    order_id: Option<&str>,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE idempotency_keys
         SET state = 'completed', response_status = $1, response_body = $2, order_id = $3
         WHERE account = $4 AND principal = $5 AND key = $6
           AND state = 'started' AND lease_until_ms = $7",
    )
    .bind(i64::from(status))
    .bind(body)
    .bind(order_id)
    .bind(&scope.account)
    .bind(&scope.principal)
    .bind(&scope.key)
    .bind(lease.0)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The `Retry-After` value for `d`, in whole seconds, at least 1.
pub fn retry_after(d: Duration) -> HeaderValue {
    HeaderValue::from(d.as_secs_f64().ceil().max(1.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("idempotency-key", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn keys_are_validated() {
        assert_eq!(
            key_of(&headers(&["order-1:a.b_c~d"])).unwrap(),
            "order-1:a.b_c~d"
        );
        let long = "k".repeat(256);
        for bad in [
            &[][..],
            &[""],
            &["a b"],
            &["a/b"],
            &[long.as_str()],
            &["a", "b"],
        ] {
            assert!(key_of(&headers(bad)).is_err(), "{bad:?}");
        }
        assert!(key_of(&headers(&[&"k".repeat(255)])).is_ok());
    }

    #[test]
    fn fingerprints_ignore_key_order_but_not_values() {
        let a = serde_json::json!({"ticket_id": "t", "quantity": 1});
        let b: serde_json::Value =
            serde_json::from_str(r#"{"quantity":1,"ticket_id":"t"}"#).unwrap();
        let c = serde_json::json!({"ticket_id": "t", "quantity": 2});
        let f = |v| fingerprint("POST", "/orders/v1/{account}/orders", "acme", v);
        assert_eq!(f(&a), f(&b));
        assert_ne!(f(&a), f(&c));
        assert_ne!(
            f(&a),
            fingerprint("POST", "/orders/v1/{account}/orders", "globex", &a)
        );
        assert_eq!(f(&a).len(), 64);
    }

    /// Two handles on one database, as two instances of the service have.
    async fn two_instances(
        dir: &chassis::testing::TempDir,
        db: &chassis::testing::TestDatabase,
    ) -> (Database, Database) {
        let config = db.configure(chassis::db::DbConfig::new(dir.path(), "orders.db"));
        let a = Database::open_migrated(&config, crate::migrations())
            .await
            .unwrap();
        let b = Database::open_migrated(&config, crate::migrations())
            .await
            .unwrap();
        (a, b)
    }

    fn scope() -> Scope {
        Scope {
            account: "acme".into(),
            principal: "alice".into(),
            key: "k-1".into(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_claims_of_one_key_on_two_instances_run_once() {
        let dir = chassis::testing::TempDir::new("orders-key-race");
        let test_db = chassis::testing::TestDatabase::new();
        let (a, b) = two_instances(&dir, &test_db).await;
        let claims = (0..16).map(|i| {
            let db = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                claim(&db, &scope(), "fp", Duration::from_secs(60))
                    .await
                    .unwrap()
            })
        });
        let mut runs = 0;
        for c in claims.collect::<Vec<_>>() {
            match c.await.unwrap() {
                Claim::Run(_) => runs += 1,
                Claim::InProgress { retry_after } => {
                    assert!(retry_after > Duration::from_secs(50), "{retry_after:?}");
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(runs, 1);
        assert_eq!(
            claim(&b, &scope(), "other", Duration::from_secs(60))
                .await
                .unwrap(),
            Claim::Mismatch
        );
    }

    #[tokio::test]
    async fn a_request_whose_lease_was_taken_over_can_neither_store_nor_give_back() {
        let dir = chassis::testing::TempDir::new("orders-key-takeover");
        let test_db = chassis::testing::TestDatabase::new();
        let (a, b) = two_instances(&dir, &test_db).await;
        let Claim::Run(first) = claim(&a, &scope(), "fp", Duration::from_millis(1))
            .await
            .unwrap()
        else {
            panic!("the first claim runs");
        };
        // The lease of 1 ms has ended once the clock moved on.
        let now = chassis::time::now_millis();
        while chassis::time::now_millis() <= now + 1 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let Claim::Run(second) = claim(&b, &scope(), "fp", Duration::from_secs(60))
            .await
            .unwrap()
        else {
            panic!("the expired key is taken over");
        };
        assert_ne!(first, second);
        // The first request, late, changes nothing.
        assert!(!complete(&a, &scope(), first, 409, "late").await.unwrap());
        release(&a, &scope(), first).await.unwrap();
        assert!(matches!(
            claim(&a, &scope(), "fp", Duration::from_secs(60))
                .await
                .unwrap(),
            Claim::InProgress { .. }
        ));
        // The second one stores its answer, replayed from then on.
        assert!(complete(&b, &scope(), second, 201, "{}").await.unwrap());
        assert_eq!(
            claim(&a, &scope(), "fp", Duration::from_secs(60))
                .await
                .unwrap(),
            Claim::Replay {
                status: 201,
                body: "{}".to_owned()
            }
        );
        // A key given back is claimed afresh.
        let other = Scope {
            key: "k-2".into(),
            ..scope()
        };
        let Claim::Run(lease) = claim(&a, &other, "fp", Duration::from_secs(60))
            .await
            .unwrap()
        else {
            panic!("a new key runs");
        };
        release(&a, &other, lease).await.unwrap();
        assert!(matches!(
            claim(&b, &other, "fp", Duration::from_secs(60))
                .await
                .unwrap(),
            Claim::Run(_)
        ));
    }

    #[test]
    fn derived_keys_differ_by_scope_and_are_header_safe() {
        let s = Scope {
            account: "acme".into(),
            principal: "alice".into(),
            key: "k1".into(),
        };
        let other = Scope {
            principal: "bob".into(),
            ..s.clone()
        };
        let k = s.derived_key("reserve");
        assert!(k.starts_with("reserve:") && k.len() == 8 + 64);
        assert_ne!(k, other.derived_key("reserve"));
        assert!(HeaderValue::from_str(&k).is_ok());
    }
}
