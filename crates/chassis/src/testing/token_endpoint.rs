//! The token endpoint behind [`TestIssuer::token_source`].

use std::{collections::HashMap, sync::Arc};

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use base64::Engine as _;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Value, json};

use super::{TestIssuer, now};
use crate::{client::TokenSource, config::Secret};

/// The client secret of every test client.
const SECRET: &str = "test-secret";
const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";

struct Endpoint {
    issuer: TestIssuer,
    client_id: String,
    perms: Vec<String>,
}

pub(super) async fn serve(issuer: TestIssuer, client_id: &str, perms: &[&str]) -> TokenSource {
    let state = Arc::new(Endpoint {
        issuer,
        client_id: client_id.to_owned(),
        perms: perms.iter().map(|p| (*p).to_owned()).collect(),
    });
    let app = Router::new().route("/token", post(token)).with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let addr = listener.local_addr().expect("bound");
    tokio::spawn(async move { axum::serve(listener, app).await });
    TokenSource::client_credentials(
        &format!("http://{addr}/token"),
        client_id,
        Secret::new(SECRET.to_owned()),
    )
    .expect("a loopback URL")
}

fn oauth_error(status: StatusCode, error: &str) -> Response {
    (status, Json(json!({ "error": error }))).into_response()
}

async fn token(State(e): State<Arc<Endpoint>>, headers: HeaderMap, body: String) -> Response {
    let expected = format!("{}:{SECRET}", e.client_id);
    let basic = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok());
    if basic.as_deref() != Some(expected.as_bytes()) {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client");
    }
    let form: HashMap<String, String> = form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let audience = form
        .get("audience")
        .cloned()
        .unwrap_or_else(|| e.issuer.audience.clone());
    let now = now();
    let claims = match form.get("grant_type").map(String::as_str) {
        Some("client_credentials") => json!({
            "iss": e.issuer.issuer, "aud": audience, "sub": e.client_id,
            "iat": now, "nbf": now, "exp": now + 900,
            "kind": "service", "perms": e.perms,
        }),
        Some(TOKEN_EXCHANGE) => {
            let Some(subject) = form.get("subject_token") else {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
            };
            let mut validation = Validation::new(Algorithm::EdDSA);
            validation.validate_aud = false;
            validation.set_issuer(&[&e.issuer.issuer]);
            let Ok(data) =
                jsonwebtoken::decode::<Value>(subject, &e.issuer.public_key(), &validation)
            else {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant");
            };
            let c = data.claims;
            json!({
                "iss": e.issuer.issuer, "aud": audience, "sub": c["sub"],
                "iat": now, "nbf": now, "exp": c["exp"].as_u64().unwrap_or(now).min(now + 900),
                "kind": c["kind"], "perms": c["perms"], "act": { "sub": e.client_id },
            })
        }
        _ => return oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type"),
    };
    Json(json!({
        "access_token": e.issuer.sign(&claims),
        "token_type": "Bearer",
        "expires_in": 900,
    }))
    .into_response()
}
