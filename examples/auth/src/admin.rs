//! The admin API of grants: see a user's or client's grants, replace them,
//! register a client. Each route requires its own permission and is
//! audited by the chassis like every other route.
//!
//! | route | permission |
//! |---|---|
//! | `GET /auth/v1/clients/{client_id}/grants`, `GET /auth/v1/users/{username}/grants` | `auth::view:grant` |
//! | `PUT /auth/v1/clients/{client_id}/grants`, `PUT /auth/v1/users/{username}/grants` | `auth::manage:grant` |
//! | `POST /auth/v1/clients` | `auth::register:client` |
//!
//! Subjects declared in the grants file are managed there: replacing their
//! grants is refused (409 `managed_by_file`). A change reaches the subject's
//! next token.

use std::sync::Arc;

use axum::{
    Json,
    extract::{Path, State},
    response::IntoResponse,
};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64URL};
use chassis::{
    Problem,
    auth::Principal,
    validation::{FieldError, Invalid},
};
use http::StatusCode;
use serde_json::Value;

use crate::{
    AuthState,
    client::{RegisteredClient, SubjectGrants},
    error::{self, AppError},
    grants::{NAME_GRAMMAR, grant_problems, is_subject_name},
    keys::to_i64,
    store::Kind,
};

/// 404, the same whether the name is malformed or unknown.
fn not_found(kind: Kind) -> Problem {
    Problem::not_found().with_detail(match kind {
        Kind::User => "No such user.",
        Kind::Client => "No such client.",
    })
}

fn database(e: sqlx::Error) -> Problem {
    error::internal("grants query failed", &AppError::Query(e))
}

/// The `grants` of a body: a list of valid grant strings; each problem is
/// added to `errors`.
fn grants_of(body: &Value, errors: &mut Invalid) -> Vec<String> {
    let Some(list) = body.get("grants").and_then(Value::as_array) else {
        errors.push(FieldError::field(
            "grants",
            "required: a list of permission grants",
        ));
        return Vec::new();
    };
    let Some(grants) = list
        .iter()
        .map(|g| g.as_str().map(str::to_owned))
        .collect::<Option<Vec<_>>>()
    else {
        errors.push(FieldError::field("grants", "every grant is a string"));
        return Vec::new();
    };
    for (i, problem) in grant_problems(&grants) {
        errors.push(FieldError::at(&["grants", &i.to_string()], problem));
    }
    grants
}

/// A subject's grants and manager.
async fn read(state: &AuthState, kind: Kind, name: &str) -> Result<SubjectGrants, Problem> {
    if !is_subject_name(name) {
        return Err(not_found(kind));
    }
    let sql = match kind {
        Kind::User => "SELECT grants, managed_by FROM users WHERE username = $1",
        Kind::Client => "SELECT grants, managed_by FROM clients WHERE client_id = $1",
    };
    let row: Option<(String, String)> = sqlx::query_as(sql)
        .bind(name)
        .fetch_optional(state.db.pool())
        .await
        .map_err(database)?;
    let (grants, managed_by) = row.ok_or_else(|| not_found(kind))?;
    let grants = serde_json::from_str(&grants)
        .map_err(|e| error::internal("stored grants unusable", &AppError::Data(e.to_string())))?;
    Ok(SubjectGrants {
        kind: kind.as_str().to_owned(),
        name: name.to_owned(),
        grants,
        managed_by,
    })
}

pub(crate) async fn view_client(
    State(state): State<Arc<AuthState>>,
    Path(name): Path<String>,
) -> Result<Json<SubjectGrants>, Problem> {
    Ok(Json(read(&state, Kind::Client, &name).await?))
}

pub(crate) async fn view_user(
    State(state): State<Arc<AuthState>>,
    Path(name): Path<String>,
) -> Result<Json<SubjectGrants>, Problem> {
    Ok(Json(read(&state, Kind::User, &name).await?))
}

/// Replaces the grants of an API-managed subject.
async fn replace(
    state: &AuthState,
    kind: Kind,
    name: &str,
    by: &Principal,
    body: &Value,
) -> Result<Json<SubjectGrants>, Problem> {
    if !is_subject_name(name) {
        return Err(not_found(kind));
    }
    let mut errors = Invalid::new();
    let grants = grants_of(body, &mut errors);
    if !errors.is_empty() {
        return Err(errors.into());
    }
    let sql = match kind {
        Kind::User => "UPDATE users SET grants = $1 WHERE username = $2 AND managed_by = 'api'",
        Kind::Client => {
            "UPDATE clients SET grants = $1 WHERE client_id = $2 AND managed_by = 'api'"
        }
    };
    let stored = serde_json::to_string(&grants).unwrap_or_else(|_| "[]".to_owned());
    let changed = sqlx::query(sql)
        .bind(stored)
        .bind(name)
        .execute(&mut *state.db.writer().await.map_err(database)?)
        .await
        .map_err(database)?
        .rows_affected();
    if changed == 0 {
        // Unknown (404) or declared by the grants file (409).
        let current = read(state, kind, name).await?;
        return Err(Problem::new(StatusCode::CONFLICT)
            .with_detail(format!(
                "The grants file declares this {}; change its grants there.",
                kind.as_str()
            ))
            .with_member("reason", "managed_by_file")
            .with_member("managed_by", current.managed_by));
    }
    tracing::info!(
        subject = name,
        kind = kind.as_str(),
        grants = grants.len(),
        by = by.subject(),
        "grants replaced"
    );
    Ok(Json(SubjectGrants {
        kind: kind.as_str().to_owned(),
        name: name.to_owned(),
        grants,
        managed_by: "api".to_owned(),
    }))
}

pub(crate) async fn replace_client(
    State(state): State<Arc<AuthState>>,
    principal: Principal,
    Path(name): Path<String>,
    Json(body): Json<Value>,
) -> Result<Json<SubjectGrants>, Problem> {
    replace(&state, Kind::Client, &name, &principal, &body).await
}

pub(crate) async fn replace_user(
    State(state): State<Arc<AuthState>>,
    principal: Principal,
    Path(name): Path<String>,
    Json(body): Json<Value>,
) -> Result<Json<SubjectGrants>, Problem> {
    replace(&state, Kind::User, &name, &principal, &body).await
}

/// `POST /auth/v1/clients`: a new client with a secret made here, shown
/// once in the answer.
pub(crate) async fn register(
    State(state): State<Arc<AuthState>>,
    principal: Principal,
    Json(body): Json<Value>,
) -> Result<axum::response::Response, Problem> {
    let mut errors = Invalid::new();
    let client_id = body.get("client_id").and_then(Value::as_str).unwrap_or("");
    if !is_subject_name(client_id) {
        errors.push(FieldError::field("client_id", NAME_GRAMMAR));
    }
    let grants = grants_of(&body, &mut errors);
    if !errors.is_empty() {
        return Err(errors.into());
    }
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| {
        error::internal(
            "no randomness for a client secret",
            &AppError::Crypto("rand".to_owned()),
        )
    })?;
    let secret = B64URL.encode(bytes);
    let hash = state
        .hasher
        .hash(&secret)
        .await
        .map_err(|e| error::internal("client secret not hashed", &e.into()))?;
    let inserted = sqlx::query(
        "INSERT INTO clients (client_id, secret_hash, grants, created_at, managed_by) \
         VALUES ($1, $2, $3, $4, 'api') ON CONFLICT (client_id) DO NOTHING",
    )
    .bind(client_id)
    .bind(hash)
    .bind(serde_json::to_string(&grants).unwrap_or_else(|_| "[]".to_owned()))
    .bind(to_i64(crate::token::now()))
    .execute(&mut *state.db.writer().await.map_err(database)?)
    .await
    .map_err(database)?
    .rows_affected();
    if inserted == 0 {
        return Err(Problem::new(StatusCode::CONFLICT)
            .with_detail("A client with this id exists.")
            .with_member("reason", "exists"));
    }
    tracing::info!(
        client_id,
        grants = grants.len(),
        by = principal.subject(),
        "client registered"
    );
    let answer = RegisteredClient {
        client_id: client_id.to_owned(),
        client_secret: secret,
        grants,
    };
    Ok(error::no_store(
        (StatusCode::CREATED, Json(answer)).into_response(),
    ))
}
