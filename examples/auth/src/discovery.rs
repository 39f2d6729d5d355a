//! `GET /auth/v1/.well-known/openid-configuration` (public): the OpenID
//! Connect discovery document (OpenID Connect Discovery 1.0 §3, with the
//! OAuth 2.0 metadata of RFC 8414), so that a verifier configured with the
//! issuer alone finds the key set.
//!
//! A client fetches `<issuer>/.well-known/openid-configuration`, and checks
//! that the document's `issuer` is exactly the issuer it asked (§4.3). The
//! chassis mounts every route under `/auth/v1`, so that works when
//! `AUTH_ISSUER` is `<origin>/auth/v1`, e.g. `http://127.0.0.1:8081/auth/v1`;
//! with another issuer the document is still served here, and a warning at
//! start-up says that discovery from the issuer will not find it.
//!
//! The endpoints it names are on the issuer's origin: `jwks_uri` is
//! `<origin>/auth/v1/jwks`, `token_endpoint` `<origin>/auth/v1/token`.
//! There is no authorization endpoint and no ID token: this service issues
//! access tokens only, from the token endpoint; the fields that OpenID
//! Connect requires all the same (`response_types_supported`,
//! `subject_types_supported`, `id_token_signing_alg_values_supported`) say
//! so as well as they can (`token`, `public`, `EdDSA`).

use std::sync::Arc;

use axum::{Json, extract::State, response::IntoResponse};
use http::{HeaderValue, header};

use crate::{
    AuthState,
    client::{JWKS_PATH, OpenIdConfiguration, TOKEN_PATH},
    token::{GRANT_TOKEN_EXCHANGE, SUPPORTED_GRANTS},
};

/// Where the document is served, under the API prefix.
pub(crate) const ROUTE: &str = "/.well-known/openid-configuration";

/// The `scheme://authority` of `issuer`, which must be an absolute
/// `http://` or `https://` URL without query or fragment.
pub(crate) fn origin(issuer: &str) -> Result<String, &'static str> {
    const WHAT: &str = "expected an absolute http:// or https:// URL without query or fragment";
    if issuer.contains(['#', '?']) || issuer.chars().any(char::is_whitespace) {
        return Err(WHAT);
    }
    let uri: http::Uri = issuer.parse().map_err(|_| WHAT)?;
    match (uri.scheme_str(), uri.authority()) {
        (Some(scheme @ ("http" | "https")), Some(authority)) => {
            Ok(format!("{scheme}://{authority}"))
        }
        _ => Err(WHAT),
    }
}

/// Whether the discovery document is found from `issuer`, i.e. the
/// issuer's path is the API prefix.
pub(crate) fn found_from_issuer(issuer: &str) -> bool {
    issuer
        .parse::<http::Uri>()
        .is_ok_and(|u| u.path().trim_end_matches('/') == "/auth/v1")
}

/// The document for `issuer`.
pub(crate) fn document(issuer: &str) -> OpenIdConfiguration {
    let origin = origin(issuer).unwrap_or_default();
    let mut grants: Vec<String> = SUPPORTED_GRANTS.iter().map(|g| (*g).to_owned()).collect();
    grants.push(GRANT_TOKEN_EXCHANGE.to_owned());
    OpenIdConfiguration {
        issuer: issuer.to_owned(),
        jwks_uri: format!("{origin}{JWKS_PATH}"),
        token_endpoint: format!("{origin}{TOKEN_PATH}"),
        grant_types_supported: grants,
        token_endpoint_auth_methods_supported: vec![
            "client_secret_basic".to_owned(),
            "client_secret_post".to_owned(),
            // The password and refresh grants authenticate no client.
            "none".to_owned(),
        ],
        response_types_supported: vec!["token".to_owned()],
        subject_types_supported: vec!["public".to_owned()],
        id_token_signing_alg_values_supported: vec!["EdDSA".to_owned()],
    }
}

/// The handler.
pub(crate) async fn openid_configuration(
    State(state): State<Arc<AuthState>>,
) -> axum::response::Response {
    let mut res = Json(&state.discovery).into_response();
    res.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issuers_must_be_urls() {
        assert_eq!(
            origin("http://127.0.0.1:8081/auth/v1").unwrap(),
            "http://127.0.0.1:8081"
        );
        assert_eq!(
            origin("https://id.example.com").unwrap(),
            "https://id.example.com"
        );
        for bad in [
            "",
            "chassis",
            "/auth/v1",
            "ftp://x.example",
            "http://x.example/?a=1",
            "http://x.example/#f",
            "http://x .example",
        ] {
            assert!(origin(bad).is_err(), "{bad}");
        }
        assert!(found_from_issuer("http://127.0.0.1:8081/auth/v1"));
        assert!(found_from_issuer("http://127.0.0.1:8081/auth/v1/"));
        assert!(!found_from_issuer("http://127.0.0.1:8081"));
    }

    #[test]
    fn the_document_names_the_endpoints_on_the_issuers_origin() {
        let d = document("http://127.0.0.1:8081/auth/v1");
        assert_eq!(d.issuer, "http://127.0.0.1:8081/auth/v1");
        assert_eq!(d.jwks_uri, "http://127.0.0.1:8081/auth/v1/jwks");
        assert_eq!(d.token_endpoint, "http://127.0.0.1:8081/auth/v1/token");
        assert!(
            d.grant_types_supported
                .iter()
                .any(|g| g == GRANT_TOKEN_EXCHANGE)
        );
    }
}
