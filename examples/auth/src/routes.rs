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
    let name = "The user name or client id.";
    Api::new()
        .route(
            post("/token", token::token)
                .public()
                .summary("Issue tokens (OAuth 2.0 token endpoint)")
                .header(
                    "Authorization",
                    false,
                    "HTTP Basic with the client id and secret (or give them in the form).",
                )
                .body_as::<client::TokenRequest>("application/x-www-form-urlencoded")
                .response::<client::TokenResponse>(200)
                .response::<client::TokenErrorResponse>(400)
                .response::<client::TokenErrorResponse>(401)
                .response::<client::TokenErrorResponse>(429),
        )
        .route(
            get("/jwks", jwks)
                .public()
                .summary("The public signing keys (JWK Set)")
                .response::<client::Jwks>(200),
        )
        .route(
            get(discovery::ROUTE, discovery::openid_configuration)
                .public()
                .summary("OpenID Connect discovery")
                .response::<client::OpenIdConfiguration>(200),
        )
        .route(
            post("/keys/rotate", rotate)
                .requires("auth::rotate:key")
                .summary("Rotate the signing key now")
                .response::<client::RotatedKey>(200),
        )
        .route(
            get("/clients/{name}/grants", admin::view_client)
                .requires("auth::view:grant")
                .summary("A client's grants")
                .param("name", name)
                .response::<client::SubjectGrants>(200),
        )
        .route(
            get("/users/{name}/grants", admin::view_user)
                .requires("auth::view:grant")
                .summary("A user's grants")
                .param("name", name)
                .response::<client::SubjectGrants>(200),
        )
        .route(
            put("/clients/{name}/grants", admin::replace_client)
                .requires("auth::manage:grant")
                .summary("Replace a client's grants")
                .param("name", name)
                .body::<client::NewGrants>()
                .response::<client::SubjectGrants>(200)
                .problem(
                    409,
                    "`managed_by_file`: the grants file manages this client.",
                ),
        )
        .route(
            put("/users/{name}/grants", admin::replace_user)
                .requires("auth::manage:grant")
                .summary("Replace a user's grants")
                .param("name", name)
                .body::<client::NewGrants>()
                .response::<client::SubjectGrants>(200)
                .problem(409, "`managed_by_file`: the grants file manages this user."),
        )
        .route(
            post("/clients", admin::register)
                .requires("auth::register:client")
                .summary("Register a client; its secret is shown once")
                .body::<client::NewClient>()
                .response::<client::RegisteredClient>(201)
                .problem(409, "`exists`: a client with this id exists."),
        )
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
