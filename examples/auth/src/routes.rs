//! The API: each route, the permission it requires, and the handlers that
//! live nowhere else (the key set and key rotation). The token endpoint is
//! in [`token`](crate::token), discovery in
//! [`discovery`](crate::discovery), grants administration in
//! [`admin`](crate::admin).

use std::sync::Arc;

use axum::{Json, extract::State, response::IntoResponse};
use chassis::{
    Problem,
    api::{Api, get, post, put},
    auth::Principal,
};
use http::{HeaderValue, header};

use crate::{AuthState, admin, client, discovery, error, token};

/// The routes, under `/auth/v1`.
pub(crate) fn api() -> Api<Arc<AuthState>> {
    Api::new()
        .route(post("/token", token::token).public())
        .route(get("/jwks", jwks).public())
        .route(get(discovery::ROUTE, discovery::openid_configuration).public())
        .route(post("/keys/rotate", rotate).requires("auth::rotate:key"))
        .route(get("/clients/{name}/grants", admin::view_client).requires("auth::view:grant"))
        .route(get("/users/{name}/grants", admin::view_user).requires("auth::view:grant"))
        .route(put("/clients/{name}/grants", admin::replace_client).requires("auth::manage:grant"))
        .route(put("/users/{name}/grants", admin::replace_user).requires("auth::manage:grant"))
        .route(post("/clients", admin::register).requires("auth::register:client"))
}

/// `GET /auth/v1/jwks`.
async fn jwks(State(state): State<Arc<AuthState>>) -> Result<axum::response::Response, Problem> {
    let set = state
        .keys
        .jwks(token::now())
        .await
        .map_err(|e| error::internal("key set unavailable", &e))?;
    let mut res = Json(set).into_response();
    // Verifiers cache the set this long; a token with a new kid makes them
    // fetch it again sooner.
    res.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    Ok(res)
}

/// `POST /auth/v1/keys/rotate`.
async fn rotate(
    State(state): State<Arc<AuthState>>,
    principal: Principal,
) -> Result<Json<client::RotatedKey>, Problem> {
    let checked = state
        .keys
        .check(token::now(), true)
        .await
        .map_err(|e| error::internal("key rotation failed", &e))?;
    tracing::info!(
        kid = %checked.kid,
        retired = ?checked.retired,
        by = principal.subject(),
        "signing key rotated on request"
    );
    Ok(Json(client::RotatedKey {
        kid: checked.kid,
        previous_kid: checked.retired,
    }))
}
