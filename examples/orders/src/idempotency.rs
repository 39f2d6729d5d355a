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
//! again. Keys live in the database, so replays survive restarts.

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

/// What claiming a key found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The key is ours: run the request.
    Run,
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

/// Claims `scope` for a request with `fingerprint`, for `lease`.
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
    let mut tx = db.begin_write().await?;
    let now = chassis::time::now_millis();
    let lease_until = now + i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 2);
    let row: Option<KeyRow> = sqlx::query_as(
        "SELECT fingerprint, state, lease_until_ms, response_status, response_body
         FROM idempotency_keys WHERE account = ? AND principal = ? AND key = ?",
    )
    .bind(&scope.account)
    .bind(&scope.principal)
    .bind(&scope.key)
    .fetch_optional(&mut *tx)
    .await?;
    let claim = match row {
        None => {
            sqlx::query(
                "INSERT INTO idempotency_keys
                 (account, principal, key, fingerprint, state, lease_until_ms, created_at)
                 VALUES (?, ?, ?, ?, 'started', ?, ?)",
            )
            .bind(&scope.account)
            .bind(&scope.principal)
            .bind(&scope.key)
            .bind(fingerprint)
            .bind(lease_until)
            .bind(chassis::time::now_rfc3339())
            .execute(&mut *tx)
            .await?;
            Claim::Run
        }
        Some((stored, _, _, _, _)) if stored != fingerprint => Claim::Mismatch,
        Some((_, state, _, Some(status), Some(body))) if state == "completed" => Claim::Replay {
            status: u16::try_from(status).unwrap_or(500),
            body,
        },
        Some((_, _, until, _, _)) if until > now => Claim::InProgress {
            retry_after: Duration::from_millis(u64::try_from(until - now).unwrap_or(0)),
        },
        Some(_) => {
            // The lease ran out: whoever started died or gave up. Take over.
            sqlx::query(
                "UPDATE idempotency_keys SET lease_until_ms = ?
                 WHERE account = ? AND principal = ? AND key = ? AND state = 'started'",
            )
            .bind(lease_until)
            .bind(&scope.account)
            .bind(&scope.principal)
            .bind(&scope.key)
            .execute(&mut *tx)
            .await?;
            Claim::Run
        }
    };
    tx.commit().await?;
    Ok(claim)
}

/// Gives a started key back, after execution failed before anything was
/// committed, so a retry runs again.
///
/// # Errors
///
/// The database failed.
pub async fn release(db: &Database, scope: &Scope) -> Result<(), sqlx::Error> {
    sqlx::query(
        "DELETE FROM idempotency_keys
         WHERE account = ? AND principal = ? AND key = ? AND state = 'started'",
    )
    .bind(&scope.account)
    .bind(&scope.principal)
    .bind(&scope.key)
    .execute(&mut *db.writer().await?)
    .await?;
    Ok(())
}

/// Stores a final answer that created nothing (e.g. sold out), to replay it.
///
/// # Errors
///
/// The database failed.
pub async fn complete(
    db: &Database,
    scope: &Scope,
    status: u16,
    body: &str,
) -> Result<(), sqlx::Error> {
    let mut conn = db.writer().await?;
    complete_in(&mut conn, scope, status, body, None).await
}

/// Stores the answer within the transaction that did the work.
pub(crate) async fn complete_in(
    conn: &mut sqlx::SqliteConnection,
    scope: &Scope,
    status: u16,
    body: &str,
    order_id: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE idempotency_keys
         SET state = 'completed', response_status = ?, response_body = ?, order_id = ?
         WHERE account = ? AND principal = ? AND key = ?",
    )
    .bind(i64::from(status))
    .bind(body)
    .bind(order_id)
    .bind(&scope.account)
    .bind(&scope.principal)
    .bind(&scope.key)
    .execute(conn)
    .await?;
    Ok(())
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
