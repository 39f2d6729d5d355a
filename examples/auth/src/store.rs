//! Users, clients and refresh tokens in the service's database.

use aws_lc_rs::digest;
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64URL};
use chassis::db::{Database, retry};

use crate::{error::AppError, keys::to_i64};

/// A user or a client: its name, stored hash and grants.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Subject {
    pub(crate) name: String,
    pub(crate) hash: String,
    pub(crate) grants: Vec<String>,
}

impl std::fmt::Debug for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subject")
            .field("name", &self.name)
            .field("grants", &self.grants)
            .finish_non_exhaustive()
    }
}

fn grants_of(name: &str, json: &str) -> Result<Vec<String>, AppError> {
    serde_json::from_str(json).map_err(|e| AppError::Data(format!("grants of {name}: {e}")))
}

/// The user called `username`.
pub(crate) async fn user(db: &Database, username: &str) -> Result<Option<Subject>, AppError> {
    let row: Option<(String, String)> =
        sqlx::query_as("SELECT password_hash, grants FROM users WHERE username = $1")
            .bind(username)
            .fetch_optional(db.pool())
            .await?;
    row.map(|(hash, grants)| {
        Ok(Subject {
            name: username.to_owned(),
            hash,
            grants: grants_of(username, &grants)?,
        })
    })
    .transpose()
}

/// The client `client_id`.
pub(crate) async fn client(db: &Database, client_id: &str) -> Result<Option<Subject>, AppError> {
    let row: Option<(String, String)> =
        sqlx::query_as("SELECT secret_hash, grants FROM clients WHERE client_id = $1")
            .bind(client_id)
            .fetch_optional(db.pool())
            .await?;
    row.map(|(hash, grants)| {
        Ok(Subject {
            name: client_id.to_owned(),
            hash,
            grants: grants_of(client_id, &grants)?,
        })
    })
    .transpose()
}

/// Which table a subject is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    /// `users`: logs in with the password grant.
    User,
    /// `clients`: a service, with the client-credentials grant.
    Client,
}

impl Kind {
    /// `user` or `client`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Client => "client",
        }
    }
}

/// A fresh refresh token (32 random bytes, base64url) and its SHA-256.
fn new_refresh_token() -> Result<(String, Vec<u8>), AppError> {
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes)
        .map_err(|_| AppError::Crypto("no randomness for a refresh token".to_owned()))?;
    let token = B64URL.encode(bytes);
    let hash = hash_token(&token);
    Ok((token, hash))
}

fn hash_token(token: &str) -> Vec<u8> {
    digest::digest(&digest::SHA256, token.as_bytes())
        .as_ref()
        .to_vec()
}

/// A random identifier (a UUID v4) for token families and token ids.
pub(crate) fn random_id() -> Result<String, AppError> {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut bytes)
        .map_err(|_| AppError::Crypto("no randomness for an id".to_owned()))?;
    Ok(uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .to_string())
}

/// Starts a new family (a login) for `username`: its first refresh token.
pub(crate) async fn start_family(
    db: &Database,
    username: &str,
    scope: Option<&str>,
    ttl: u64,
    now: u64,
) -> Result<String, AppError> {
    let (token, hash) = new_refresh_token()?;
    sqlx::query(
        "INSERT INTO refresh_tokens (token_hash, family_id, username, scope, issued_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(hash)
    .bind(random_id()?)
    .bind(username)
    .bind(scope)
    .bind(to_i64(now))
    .bind(to_i64(now.saturating_add(ttl)))
    .execute(&mut *db.writer().await?)
    .await?;
    Ok(token)
}

/// What presenting a refresh token did.
#[derive(Debug)]
pub(crate) enum Refresh {
    /// It was valid: it is now used, and `token` replaces it.
    Rotated {
        /// The user.
        username: String,
        /// The user's current grants.
        grants: Vec<String>,
        /// The family's scope (`None`: every grant).
        scope: Option<String>,
        /// The new refresh token.
        token: String,
    },
    /// It had been used before: its whole family is now revoked.
    Reused {
        /// The family revoked.
        family: String,
    },
    /// Unknown, expired or revoked.
    Invalid,
    /// Valid, but `allowed` refused the family's scope; nothing changed.
    ScopeRefused,
}

/// Presents a refresh token: rotates it when valid (single use), revokes
/// its family when it was already used. `allowed` decides, from the user's
/// grants and the family's scope, whether the request may go on.
///
/// A transaction undone by a deadlock (two uses of one family at once, on
/// Postgres) runs again.
pub(crate) async fn refresh(
    db: &Database,
    presented: &str,
    ttl: u64,
    now: u64,
    allowed: impl Fn(&[String], Option<&str>) -> bool,
) -> Result<Refresh, AppError> {
    let hash = hash_token(presented);
    retry(|| async {
        match try_refresh(db, &hash, ttl, now, &allowed).await {
            Err(AppError::Query(e)) => Err(e),
            answer => Ok(answer),
        }
    })
    .await?
}

/// One attempt at [`refresh`].
async fn try_refresh(
    db: &Database,
    hash: &[u8],
    ttl: u64,
    now: u64,
    allowed: &impl Fn(&[String], Option<&str>) -> bool,
) -> Result<Refresh, AppError> {
    let now_i = to_i64(now);
    // The claim is one conditional update: it marks the token used only if
    // no one has, and says whether it did. Two uses of one token at once,
    // on any instances, cannot both win: on SQLite the writer runs one
    // write transaction at a time; on Postgres the second update waits for
    // the first's row lock, then finds `used_at` set and changes nothing.
    let mut tx = db.begin_write().await?;
    let claimed: Option<(String, String, Option<String>)> = sqlx::query_as(
        "UPDATE refresh_tokens SET used_at = $1 \
         WHERE token_hash = $2 AND used_at IS NULL AND revoked_at IS NULL AND expires_at > $3 \
         RETURNING family_id, username, scope",
    )
    .bind(now_i)
    .bind(hash)
    .bind(now_i)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((family, username, scope)) = claimed else {
        let row: Option<(String, Option<i64>, Option<i64>)> = sqlx::query_as(
            "SELECT family_id, used_at, revoked_at FROM refresh_tokens WHERE token_hash = $1",
        )
        .bind(hash)
        .fetch_optional(&mut *tx)
        .await?;
        return match row {
            Some((family, Some(_), None)) => {
                sqlx::query(
                    "UPDATE refresh_tokens SET revoked_at = $1 WHERE family_id = $2 AND revoked_at IS NULL",
                )
                .bind(now_i)
                .bind(&family)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(Refresh::Reused { family })
            }
            _ => {
                // Ended rather than dropped: on SQLite a dropped transaction
                // keeps the file's write lock until the writer's next use.
                tx.rollback().await?;
                Ok(Refresh::Invalid)
            }
        };
    };
    let grants: Option<(String,)> = sqlx::query_as("SELECT grants FROM users WHERE username = $1")
        .bind(&username)
        .fetch_optional(&mut *tx)
        .await?;
    let Some((grants,)) = grants else {
        tx.rollback().await?;
        return Ok(Refresh::Invalid);
    };
    let grants = grants_of(&username, &grants)?;
    if !allowed(&grants, scope.as_deref()) {
        // The claim is undone: the token stays usable.
        tx.rollback().await?;
        return Ok(Refresh::ScopeRefused);
    }
    let (token, new_hash) = new_refresh_token()?;
    sqlx::query(
        "INSERT INTO refresh_tokens (token_hash, family_id, username, scope, issued_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(new_hash)
    .bind(&family)
    .bind(&username)
    .bind(scope.as_deref())
    .bind(now_i)
    .bind(to_i64(now.saturating_add(ttl)))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Refresh::Rotated {
        username,
        grants,
        scope,
        token,
    })
}

/// Deletes refresh tokens that have expired: once expired they cannot be
/// used, and a reuse can no longer do harm.
pub(crate) async fn purge_expired(db: &Database, now: u64) -> Result<u64, AppError> {
    Ok(
        sqlx::query("DELETE FROM refresh_tokens WHERE expires_at <= $1")
            .bind(to_i64(now))
            .execute(&mut *db.writer().await?)
            .await?
            .rows_affected(),
    )
}
