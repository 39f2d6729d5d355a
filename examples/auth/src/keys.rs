//! Signing keys: Ed25519, generated here, stored in the database, rotated.
//!
//! One key is *current* and signs every new token. It stays current for
//! `AUTH_KEY_ROTATE_SECS`; then a new key is generated and becomes current
//! (checked at start-up and every `AUTH_KEY_CHECK_SECS`), or at once on
//! `POST /auth/v1/keys/rotate`. A key that no longer signs stays in the
//! JWKS until every token it signed has expired (`AUTH_TOKEN_TTL_SECS`
//! after it stopped signing), then it is deleted. Rotation runs in one
//! `BEGIN IMMEDIATE` transaction, so two instances on one database cannot
//! both make a key current.
//!
//! The key id is the key's RFC 7638 thumbprint, so it names the key itself
//! and never collides by accident.

use std::sync::{Arc, RwLock};

use aws_lc_rs::{
    digest,
    signature::{Ed25519KeyPair, KeyPair},
};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64URL};
use chassis::db::{Database, Failure, retry};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use crate::{
    client::{Jwk, Jwks},
    error::AppError,
};

/// The key that signs new tokens.
pub(crate) struct SigningKey {
    pub(crate) kid: String,
    encoding: EncodingKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    fn from_pkcs8(kid: String, pkcs8: &[u8]) -> Result<Self, AppError> {
        // Parsed once here so a corrupt key fails at start-up, not when signing.
        Ed25519KeyPair::from_pkcs8(pkcs8)
            .map_err(|e| AppError::Data(format!("signing key {kid}: {e}")))?;
        Ok(Self {
            kid,
            encoding: EncodingKey::from_ed_der(pkcs8),
        })
    }

    /// Signs `claims` as an access token: `{"alg":"EdDSA","typ":"at+jwt","kid":..}`.
    pub(crate) fn sign(&self, claims: &impl serde::Serialize) -> Result<String, AppError> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.typ = Some("at+jwt".to_owned());
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding)
            .map_err(|e| AppError::Crypto(format!("signing: {e}")))
    }
}

/// The RFC 7638 thumbprint of an Ed25519 public key.
fn thumbprint(public_key: &[u8]) -> String {
    // Members in lexicographic order, no white space (RFC 7638 §3).
    let canonical = format!(
        r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
        B64URL.encode(public_key)
    );
    B64URL.encode(digest::digest(&digest::SHA256, canonical.as_bytes()))
}

/// A new key: its id, PKCS#8 document and public key.
fn generate() -> Result<(String, Vec<u8>, Vec<u8>), AppError> {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| AppError::Crypto("cannot generate an Ed25519 key".to_owned()))?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|e| AppError::Crypto(format!("generated key unreadable: {e}")))?;
    let public = pair.public_key().as_ref().to_vec();
    Ok((thumbprint(&public), pkcs8.as_ref().to_vec(), public))
}

/// The signing keys of the service. Cheap to share (`Arc`).
#[derive(Debug)]
pub(crate) struct Keys {
    db: Database,
    rotate_after: u64,
    publish_for: u64,
    current: RwLock<Arc<SigningKey>>,
    /// One check at a time, so a slower check cannot put back the key that
    /// a faster rotation has just retired.
    checking: tokio::sync::Mutex<()>,
}

/// What a check of the keys did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Checked {
    /// The current key.
    pub(crate) kid: String,
    /// The key it replaced, when this check rotated.
    pub(crate) retired: Option<String>,
    /// Keys deleted because their tokens have all expired.
    pub(crate) deleted: u64,
}

impl Keys {
    /// Loads the current key, generating one when there is none or it is
    /// due for rotation. `rotate_after` and `publish_for` are seconds.
    pub(crate) async fn open(
        db: Database,
        rotate_after: u64,
        publish_for: u64,
        now: u64,
    ) -> Result<(Self, Checked), AppError> {
        let (checked, key) = Self::check_in(&db, rotate_after, publish_for, now, false).await?;
        let keys = Self {
            db,
            rotate_after,
            publish_for,
            current: RwLock::new(Arc::new(key)),
            checking: tokio::sync::Mutex::new(()),
        };
        Ok((keys, checked))
    }

    /// The key signing new tokens.
    pub(crate) fn current(&self) -> Arc<SigningKey> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Rotates when the current key is due (or at once with `force`) and
    /// deletes keys whose tokens have all expired.
    pub(crate) async fn check(&self, now: u64, force: bool) -> Result<Checked, AppError> {
        let _one_at_a_time = self.checking.lock().await;
        let (checked, key) =
            Self::check_in(&self.db, self.rotate_after, self.publish_for, now, force).await?;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(key);
        Ok(checked)
    }

    /// Rotates (when due) and deletes expired keys. Instances sharing the
    /// database may run it at the same moment: the current key's row is
    /// locked before it is judged, so one of them rotates and the others
    /// then find the new key current; and when there was no current key to
    /// lock, the partial unique index on the current key lets one insert
    /// win, and the others read the winner's key.
    async fn check_in(
        db: &Database,
        rotate_after: u64,
        publish_for: u64,
        now: u64,
        force: bool,
    ) -> Result<(Checked, SigningKey), AppError> {
        let rotated = retry(|| async {
            match Self::rotate(db, rotate_after, publish_for, now, force).await {
                Err(AppError::Query(e)) => Err(e),
                answer => Ok(answer),
            }
        })
        .await;
        match rotated.map_err(AppError::Query).and_then(|answer| answer) {
            Err(AppError::Query(e)) if Failure::of(&e) == Failure::Conflict => {
                // Another instance made a key current meanwhile: use it.
                let current: Option<(String, Vec<u8>)> =
                    sqlx::query_as("SELECT kid, pkcs8 FROM signing_keys WHERE retired_at IS NULL")
                        .fetch_optional(db.pool())
                        .await?;
                let (kid, pkcs8) = current.ok_or(AppError::Query(e))?;
                let key = SigningKey::from_pkcs8(kid.clone(), &pkcs8)?;
                Ok((
                    Checked {
                        kid,
                        retired: None,
                        deleted: 0,
                    },
                    key,
                ))
            }
            other => other,
        }
    }

    /// One transaction of [`check_in`](Self::check_in).
    async fn rotate(
        db: &Database,
        rotate_after: u64,
        publish_for: u64,
        now: u64,
        force: bool,
    ) -> Result<(Checked, SigningKey), AppError> {
        let now_i = to_i64(now);
        let mut tx = db.begin_write().await?;
        // Reading the current key by writing its row locks it (on Postgres;
        // on SQLite the writer excludes every other write already): another
        // instance checking at the same time waits here, then sees the key
        // this check makes current.
        let current: Option<(String, Vec<u8>, i64)> = sqlx::query_as(
            "UPDATE signing_keys SET kid = kid WHERE retired_at IS NULL \
             RETURNING kid, pkcs8, created_at",
        )
        .fetch_optional(&mut *tx)
        .await?;
        let due = match &current {
            None => true,
            Some((_, _, created)) => {
                force || now.saturating_sub(u64::try_from(*created).unwrap_or(0)) >= rotate_after
            }
        };
        let (kid, pkcs8, retired) = if due {
            let retired = current.map(|(kid, ..)| kid);
            // Only the key locked above: a key another instance made
            // current since is not this check's to retire.
            if let Some(kid) = &retired {
                sqlx::query("UPDATE signing_keys SET retired_at = $1 WHERE kid = $2")
                    .bind(now_i)
                    .bind(kid)
                    .execute(&mut *tx)
                    .await?;
            }
            let (kid, pkcs8, public) = generate()?;
            // A key made current by another instance since the lock above
            // found none breaks the unique index: see `check_in`.
            sqlx::query(
                "INSERT INTO signing_keys (kid, pkcs8, public_key, created_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(&kid)
            .bind(&pkcs8)
            .bind(&public)
            .bind(now_i)
            .execute(&mut *tx)
            .await?;
            (kid, pkcs8, retired)
        } else {
            let (kid, pkcs8, _) = current.unwrap_or_default();
            (kid, pkcs8, None)
        };
        let deleted = sqlx::query(
            "DELETE FROM signing_keys WHERE retired_at IS NOT NULL AND retired_at + $1 <= $2",
        )
        .bind(to_i64(publish_for))
        .bind(now_i)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        let key = SigningKey::from_pkcs8(kid.clone(), &pkcs8)?;
        Ok((
            Checked {
                kid,
                retired,
                deleted,
            },
            key,
        ))
    }

    /// The public key `kid` when it is published at `now` (current, or
    /// retired and still in the key set): what verifies a token that this
    /// service signed.
    pub(crate) async fn published(&self, kid: &str, now: u64) -> Result<Option<Vec<u8>>, AppError> {
        let row: Option<(Vec<u8>,)> = sqlx::query_as(
            "SELECT public_key FROM signing_keys \
             WHERE kid = $1 AND (retired_at IS NULL OR retired_at + $2 > $3)",
        )
        .bind(kid)
        .bind(to_i64(self.publish_for))
        .bind(to_i64(now))
        .fetch_optional(self.db.pool())
        .await?;
        Ok(row.map(|(public,)| public))
    }

    /// The published keys at `now`: the current one first, then the
    /// retired ones whose tokens may still be valid, newest first.
    pub(crate) async fn jwks(&self, now: u64) -> Result<Jwks, AppError> {
        let rows: Vec<(String, Vec<u8>)> = sqlx::query_as(
            "SELECT kid, public_key FROM signing_keys \
             WHERE retired_at IS NULL OR retired_at + $1 > $2 \
             ORDER BY retired_at IS NOT NULL, created_at DESC, kid",
        )
        .bind(to_i64(self.publish_for))
        .bind(to_i64(now))
        .fetch_all(self.db.pool())
        .await?;
        Ok(Jwks {
            keys: rows
                .into_iter()
                .map(|(kid, public)| Jwk {
                    kty: "OKP".to_owned(),
                    crv: "Ed25519".to_owned(),
                    x: B64URL.encode(public),
                    kid,
                    alg: "EdDSA".to_owned(),
                    key_use: "sig".to_owned(),
                })
                .collect(),
        })
    }
}

/// Seconds as the database's integer (`BIGINT`); times beyond `i64` do not occur.
pub(crate) fn to_i64(secs: u64) -> i64 {
    i64::try_from(secs).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbprints_follow_rfc_7638() {
        // RFC 8037 Appendix A.3: the thumbprint of its example Ed25519 key.
        let x = B64URL
            .decode("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo")
            .unwrap();
        assert_eq!(
            thumbprint(&x),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
    }

    #[test]
    fn generated_keys_sign_tokens_that_verify() {
        let (kid, pkcs8, public) = generate().unwrap();
        assert_eq!(kid, thumbprint(&public));
        let key = SigningKey::from_pkcs8(kid.clone(), &pkcs8).unwrap();
        let token = key.sign(&serde_json::json!({"sub": "x"})).unwrap();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.kid.as_deref(), Some(kid.as_str()));
        assert_eq!(header.typ.as_deref(), Some("at+jwt"));
        assert_eq!(header.alg, Algorithm::EdDSA);
        let (message, signature) = token.rsplit_once('.').unwrap();
        let signature = B64URL.decode(signature).unwrap();
        aws_lc_rs::signature::UnparsedPublicKey::new(&aws_lc_rs::signature::ED25519, &public)
            .verify(message.as_bytes(), &signature)
            .unwrap();
        assert!(!format!("{key:?}").contains("encoding"));
    }

    #[test]
    fn corrupt_keys_are_refused() {
        assert!(SigningKey::from_pkcs8("k".to_owned(), b"not a key").is_err());
    }
}
