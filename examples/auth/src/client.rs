//! The driver client of `auth`, and the types of its API.
//!
//! Other services and tests talk to `auth` through [`AuthClient`], a thin
//! typed layer over a [`chassis::client::Downstream`] (so every call gets the
//! chassis' deadline, breaker, bulkhead, correlation and metrics). A service
//! that calls others *as itself* does not need the client at all: it needs
//! a [`TokenSource`], built by [`token_source`].
//!
//! Calls to the token endpoint are `POST`s and never retried by the
//! downstream stack: a refresh token is single-use, and presenting it twice
//! revokes its whole family.
//!
//! # Example
//!
//! ```no_run
//! use auth::client::AuthClient;
//! use chassis::client::{CallContext, Downstream};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let auth = AuthClient::new(Downstream::builder("auth", "http://127.0.0.1:8081").build()?);
//! let cx = CallContext::background();
//! let tokens = auth.password_login(&cx, "alice", "alice-password").await?;
//! let renewed = auth
//!     .refresh(&cx, tokens.refresh_token.as_deref().unwrap_or_default())
//!     .await?;
//! assert_eq!(renewed.token_type, "Bearer");
//! # Ok(()) }
//! ```

use chassis::{
    client::{CallContext, ClientError, Downstream, TokenSource},
    config::Secret,
};
use http::{HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};

/// The path of the token endpoint.
pub const TOKEN_PATH: &str = "/auth/v1/token";
/// The path of the key set.
pub const JWKS_PATH: &str = "/auth/v1/jwks";
/// The path of the key rotation.
pub const ROTATE_PATH: &str = "/auth/v1/keys/rotate";
/// The path of the OpenID Connect discovery document.
pub const DISCOVERY_PATH: &str = "/auth/v1/.well-known/openid-configuration";
/// The path of the admin API's clients (`POST`: register one); a client's
/// grants are at `{CLIENTS_PATH}/{client_id}/grants`.
pub const CLIENTS_PATH: &str = "/auth/v1/clients";
/// The path of the admin API's users; a user's grants are at
/// `{USERS_PATH}/{username}/grants`.
pub const USERS_PATH: &str = "/auth/v1/users";
/// The `grant_type` of the token exchange (RFC 8693).
pub const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// The token type of an access token (RFC 8693 §3): the only
/// `subject_token_type` accepted and the `issued_token_type` of an exchange.
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

/// A successful token answer (RFC 6749 §5.1).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenResponse {
    /// The access token: an EdDSA JWT.
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Seconds the access token is valid for.
    pub expires_in: u64,
    /// A refresh token (password and refresh grants only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    /// The grants of the access token, space-separated, when they differ
    /// from the scope asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// [`ACCESS_TOKEN_TYPE`], on the answer of a token exchange
    /// (RFC 8693 §2.2.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_token_type: Option<String>,
}

impl std::fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenResponse")
            .field("access_token", &"[redacted]")
            .field("token_type", &self.token_type)
            .field("expires_in", &self.expires_in)
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "[redacted]"),
            )
            .field("scope", &self.scope)
            .field("issued_token_type", &self.issued_token_type)
            .finish()
    }
}

/// An error answer of the token endpoint (RFC 6749 §5.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenErrorResponse {
    /// `invalid_request`, `invalid_client`, `invalid_grant`,
    /// `invalid_scope`, `invalid_target`, `unauthorized_client`,
    /// `unsupported_grant_type`, `slow_down` (429: too many failed logins)
    /// or a 503 problem with `Retry-After` when every hashing slot is busy.
    pub error: String,
    /// A human-readable explanation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_description: Option<String>,
}

/// The form of `POST /auth/v1/token` (`application/x-www-form-urlencoded`):
/// which members a grant needs is RFC 6749's (§4.3 `password`, §4.4
/// `client_credentials`, §6 `refresh_token`) and RFC 8693's (token
/// exchange). The client authenticates with HTTP Basic or with
/// `client_id`/`client_secret` in the form.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenRequest {
    /// `password`, `client_credentials`, `refresh_token` or
    /// [`TOKEN_EXCHANGE_GRANT`].
    #[schema(
        pattern = "^(password|client_credentials|refresh_token|urn:ietf:params:oauth:grant-type:token-exchange)$"
    )]
    pub grant_type: String,
    /// The user (password grant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// The user's password (password grant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// The client, when not given by HTTP Basic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The client's secret, when not given by HTTP Basic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
    /// The refresh token (refresh grant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    /// Grants asked for, space-separated: a subset of the subject's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// The service the token is for (its `aud`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// The token exchanged (token exchange).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_token: Option<String>,
    /// [`ACCESS_TOKEN_TYPE`] (token exchange).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_token_type: Option<String>,
    /// [`ACCESS_TOKEN_TYPE`] when given (token exchange).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_token_type: Option<String>,
}

/// A grant as the permission grammar has it: four segments, each a name or
/// `*` (the account may be empty), with `!` before a deny.
const GRANT_PATTERN: &str = "^!?(\\*|[a-z][a-z0-9_-]{0,63}):(\\*|[A-Za-z0-9_-]{0,64}):(\\*|[a-z][a-z0-9_-]{0,63}):(\\*|[a-z][a-z0-9_-]{0,63})$";

/// The schema of a list of grants: each a [`GRANT_PATTERN`], at most
/// [`MAX_GRANTS`](chassis::permission::MAX_GRANTS) of them.
fn grant_list() -> utoipa::openapi::schema::Array {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Type};
    ArrayBuilder::new()
        .items(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(GRANT_PATTERN)),
        )
        .max_items(Some(chassis::permission::MAX_GRANTS))
        .description(Some(
            "Permission grants (`service:account:operation:object`, `*` segments, `!` to deny).",
        ))
        .build()
}

/// The body of `PUT /auth/v1/{clients,users}/{name}/grants`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NewGrants {
    /// Permission grants (`service:account:operation:object`, `*`
    /// segments, `!` to deny), replacing the subject's.
    #[schema(schema_with = grant_list)]
    pub grants: Vec<String>,
}

/// The body of `POST /auth/v1/clients`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NewClient {
    /// The client id: 1 to 128 of `A-Z a-z 0-9 . _ @ -`.
    #[schema(pattern = "^[A-Za-z0-9._@-]{1,128}$")]
    pub client_id: String,
    /// Its grants.
    #[schema(schema_with = grant_list)]
    pub grants: Vec<String>,
}

/// The public signing keys (RFC 7517 JWK Set).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Jwks {
    /// The current key first, then the retired ones still published.
    pub keys: Vec<Jwk>,
}

/// One public Ed25519 signing key (RFC 8037).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Jwk {
    /// Always `OKP`.
    pub kty: String,
    /// Always `Ed25519`.
    pub crv: String,
    /// The public key, base64url without padding.
    pub x: String,
    /// The key id: the RFC 7638 thumbprint of the key.
    pub kid: String,
    /// Always `EdDSA`.
    pub alg: String,
    /// Always `sig`.
    #[serde(rename = "use")]
    pub key_use: String,
}

/// The OpenID Connect discovery document (OpenID Connect Discovery 1.0
/// §3, RFC 8414 §2), at [`DISCOVERY_PATH`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OpenIdConfiguration {
    /// Exactly `AUTH_ISSUER`: the `iss` of every token.
    pub issuer: String,
    /// The key set.
    pub jwks_uri: String,
    /// The token endpoint.
    pub token_endpoint: String,
    /// `password`, `client_credentials`, `refresh_token` and
    /// [`TOKEN_EXCHANGE_GRANT`].
    pub grant_types_supported: Vec<String>,
    /// `client_secret_basic`, `client_secret_post` and `none`.
    pub token_endpoint_auth_methods_supported: Vec<String>,
    /// `token`: tokens come from the token endpoint only.
    pub response_types_supported: Vec<String>,
    /// `public`: `sub` is the user name or client id.
    pub subject_types_supported: Vec<String>,
    /// `EdDSA`, the algorithm of every token signed here.
    pub id_token_signing_alg_values_supported: Vec<String>,
}

/// The answer of `POST /auth/v1/keys/rotate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RotatedKey {
    /// The new current key.
    pub kid: String,
    /// The key it replaced, still published until its tokens expire.
    pub previous_kid: Option<String>,
}

/// A user's or client's grants, as the admin API shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SubjectGrants {
    /// `user` or `client`.
    pub kind: String,
    /// The user name or client id.
    pub name: String,
    /// Its grants: the `perms` of its next token.
    pub grants: Vec<String>,
    /// `file` (the grants file declares it, and only the file changes it)
    /// or `api`.
    pub managed_by: String,
}

/// The answer of `POST /auth/v1/clients`: the new client, with its secret,
/// which is shown this once and stored only as a hash.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RegisteredClient {
    /// The client id.
    pub client_id: String,
    /// The secret of the client-credentials grant.
    pub client_secret: String,
    /// Its grants.
    pub grants: Vec<String>,
}

impl std::fmt::Debug for RegisteredClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisteredClient")
            .field("client_id", &self.client_id)
            .field("client_secret", &"[redacted]")
            .field("grants", &self.grants)
            .finish()
    }
}

/// Why a call to `auth` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthClientError {
    /// The token endpoint refused the request with an OAuth error.
    #[error("auth refused the request: {status} {error}")]
    Refused {
        /// The status (400 or 401).
        status: StatusCode,
        /// The OAuth error code, e.g. `invalid_grant`.
        error: String,
        /// Its description.
        description: Option<String>,
    },
    /// The call failed (no answer, a breaker open, a problem answer, ...).
    #[error(transparent)]
    Call(#[from] ClientError),
}

impl AuthClientError {
    /// The OAuth error code, when the token endpoint refused the request.
    pub fn oauth_error(&self) -> Option<&str> {
        match self {
            Self::Refused { error, .. } => Some(error),
            Self::Call(_) => None,
        }
    }
}

/// A typed client of `auth`'s API; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct AuthClient {
    downstream: Downstream,
}

impl AuthClient {
    /// A client over `downstream`, whose base URL is auth's (e.g.
    /// `http://127.0.0.1:8081`).
    pub fn new(downstream: Downstream) -> Self {
        Self { downstream }
    }

    /// The downstream it calls.
    pub fn downstream(&self) -> &Downstream {
        &self.downstream
    }

    /// The password grant: an access token and a refresh token for a user.
    ///
    /// # Errors
    ///
    /// [`AuthClientError::Refused`] with `invalid_grant` for a wrong
    /// username or password; [`AuthClientError::Call`] when the call fails.
    pub async fn password_login(
        &self,
        cx: &CallContext,
        username: &str,
        password: &str,
    ) -> Result<TokenResponse, AuthClientError> {
        self.password(cx, username, password, None).await
    }

    /// [`password_login`](Self::password_login) for a token addressed to
    /// `audience` (one of auth's `AUTH_AUDIENCES`): each service accepts
    /// only tokens minted for it.
    ///
    /// # Errors
    ///
    /// As [`password_login`](Self::password_login); `invalid_target` for an
    /// unknown audience.
    pub async fn password_login_for(
        &self,
        cx: &CallContext,
        username: &str,
        password: &str,
        audience: &str,
    ) -> Result<TokenResponse, AuthClientError> {
        self.password(cx, username, password, Some(audience)).await
    }

    async fn password(
        &self,
        cx: &CallContext,
        username: &str,
        password: &str,
        audience: Option<&str>,
    ) -> Result<TokenResponse, AuthClientError> {
        let mut form = vec![
            ("grant_type", "password"),
            ("username", username),
            ("password", password),
        ];
        if let Some(audience) = audience {
            form.push(("audience", audience));
        }
        self.token(cx, &form).await
    }

    /// The refresh grant: a new access token and a new refresh token; the
    /// one presented stops working.
    ///
    /// # Errors
    ///
    /// [`AuthClientError::Refused`] with `invalid_grant` for an unknown,
    /// expired, revoked or already used refresh token.
    pub async fn refresh(
        &self,
        cx: &CallContext,
        refresh_token: &str,
    ) -> Result<TokenResponse, AuthClientError> {
        self.token(
            cx,
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token),
            ],
        )
        .await
    }

    /// The client-credentials grant, with the credentials as form fields.
    /// Services should prefer a [`TokenSource`] (see [`token_source`]),
    /// which caches and refreshes the token.
    ///
    /// # Errors
    ///
    /// [`AuthClientError::Refused`] with `invalid_client` for bad
    /// credentials.
    pub async fn client_credentials(
        &self,
        cx: &CallContext,
        client_id: &str,
        client_secret: &Secret<String>,
    ) -> Result<TokenResponse, AuthClientError> {
        self.token(
            cx,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", client_id),
                ("client_secret", client_secret.expose()),
            ],
        )
        .await
    }

    /// The token exchange (RFC 8693): a token for `audience` with the
    /// subject and grants (or the `scope` asked for, never more) of
    /// `subject_token`, acting as the client `client_id`, which needs the
    /// grant `auth:<audience>:exchange:token`.
    ///
    /// # Errors
    ///
    /// [`AuthClientError::Refused`] with `invalid_client` for bad
    /// credentials, `unauthorized_client` without the grant,
    /// `invalid_target` for an unknown audience, `invalid_request` for a
    /// subject token that is not valid.
    pub async fn token_exchange(
        &self,
        cx: &CallContext,
        client_id: &str,
        client_secret: &Secret<String>,
        subject_token: &str,
        audience: &str,
        scope: Option<&str>,
    ) -> Result<TokenResponse, AuthClientError> {
        let mut form = vec![
            ("grant_type", TOKEN_EXCHANGE_GRANT),
            ("client_id", client_id),
            ("client_secret", client_secret.expose()),
            ("subject_token", subject_token),
            ("subject_token_type", ACCESS_TOKEN_TYPE),
            ("audience", audience),
        ];
        if let Some(scope) = scope {
            form.push(("scope", scope));
        }
        self.token(cx, &form).await
    }

    /// The OpenID Connect discovery document.
    ///
    /// # Errors
    ///
    /// When the call fails or the answer is not a discovery document.
    pub async fn discovery(
        &self,
        cx: &CallContext,
    ) -> Result<OpenIdConfiguration, AuthClientError> {
        let res = self
            .downstream
            .anonymous(cx)
            .get(DISCOVERY_PATH)
            .send()
            .await?;
        Ok(res.json()?)
    }

    /// The public signing keys.
    ///
    /// # Errors
    ///
    /// When the call fails or the answer is not a key set.
    pub async fn jwks(&self, cx: &CallContext) -> Result<Jwks, AuthClientError> {
        let res = self.downstream.anonymous(cx).get(JWKS_PATH).send().await?;
        Ok(res.json()?)
    }

    /// Makes a new signing key current, on behalf of the caller of `cx`
    /// (who needs `auth::rotate:key`).
    ///
    /// # Errors
    ///
    /// When the call fails: 401 without a caller, 403 without the grant.
    pub async fn rotate_key(&self, cx: &CallContext) -> Result<RotatedKey, AuthClientError> {
        let res = self
            .downstream
            .on_behalf_of(cx)
            .post(ROTATE_PATH)
            .send()
            .await?;
        Ok(res.json()?)
    }

    /// The grants of the client `client_id`, on behalf of the caller of
    /// `cx` (who needs `auth::view:grant`).
    ///
    /// # Errors
    ///
    /// When the call fails: 403 without the grant, 404 for an unknown
    /// client.
    pub async fn client_grants(
        &self,
        cx: &CallContext,
        client_id: &str,
    ) -> Result<SubjectGrants, AuthClientError> {
        let path = format!("{CLIENTS_PATH}/{client_id}/grants");
        let res = self.downstream.on_behalf_of(cx).get(&path).send().await?;
        Ok(res.json()?)
    }

    /// Replaces the grants of the client `client_id`, on behalf of the
    /// caller of `cx` (who needs `auth::manage:grant`). Its next token has
    /// them.
    ///
    /// # Errors
    ///
    /// When the call fails: 403 without the grant, 404 for an unknown
    /// client, 409 for one the grants file declares, 422 for an invalid
    /// grant.
    pub async fn replace_client_grants(
        &self,
        cx: &CallContext,
        client_id: &str,
        grants: &[&str],
    ) -> Result<SubjectGrants, AuthClientError> {
        let path = format!("{CLIENTS_PATH}/{client_id}/grants");
        let res = self
            .downstream
            .on_behalf_of(cx)
            .put(&path)
            .json(&serde_json::json!({ "grants": grants }))
            .send()
            .await?;
        Ok(res.json()?)
    }

    /// Registers the client `client_id` with `grants`, on behalf of the
    /// caller of `cx` (who needs `auth::register:client`); the answer holds
    /// its secret.
    ///
    /// # Errors
    ///
    /// When the call fails: 403 without the grant, 409 when the id is
    /// taken, 422 for an invalid id or grant.
    pub async fn register_client(
        &self,
        cx: &CallContext,
        client_id: &str,
        grants: &[&str],
    ) -> Result<RegisteredClient, AuthClientError> {
        let res = self
            .downstream
            .on_behalf_of(cx)
            .post(CLIENTS_PATH)
            .json(&serde_json::json!({ "client_id": client_id, "grants": grants }))
            .send()
            .await?;
        Ok(res.json()?)
    }

    async fn token(
        &self,
        cx: &CallContext,
        form: &[(&str, &str)],
    ) -> Result<TokenResponse, AuthClientError> {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let sent = self
            .downstream
            .anonymous(cx)
            .post(TOKEN_PATH)
            .body(
                body,
                HeaderValue::from_static("application/x-www-form-urlencoded"),
            )
            .send()
            .await;
        match sent {
            Ok(res) => Ok(res.json()?),
            Err(ClientError::Status { status, body, .. }) => {
                match serde_json::from_slice::<TokenErrorResponse>(&body) {
                    Ok(e) => Err(AuthClientError::Refused {
                        status,
                        error: e.error,
                        description: e.error_description,
                    }),
                    Err(_) => Err(AuthClientError::Call(ClientError::Status {
                        downstream: self.downstream.name().into(),
                        status,
                        problem: None,
                        body,
                    })),
                }
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// A [`TokenSource`] for the service `client_id`, fetching its tokens from
/// the token endpoint of the `auth` at `auth_base_url` (e.g.
/// `http://127.0.0.1:8081`) with the client-credentials grant.
///
/// # Errors
///
/// When `auth_base_url` is not an absolute `http://` URL.
pub fn token_source(
    auth_base_url: &str,
    client_id: &str,
    client_secret: Secret<String>,
) -> Result<TokenSource, String> {
    let base = auth_base_url.trim_end_matches('/');
    TokenSource::client_credentials(&format!("{base}{TOKEN_PATH}"), client_id, client_secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_responses_never_print_tokens() {
        let t = TokenResponse {
            access_token: "eyJ.secret.sig".to_owned(),
            token_type: "Bearer".to_owned(),
            expires_in: 900,
            refresh_token: Some("refresh-secret".to_owned()),
            scope: None,
            issued_token_type: None,
        };
        let shown = format!("{t:?}");
        assert!(!shown.contains("secret"), "{shown}");
        let json = serde_json::to_value(&t).unwrap();
        assert_eq!(json["token_type"], "Bearer");
        assert!(json.get("scope").is_none());
    }

    #[test]
    fn token_sources_point_at_the_token_endpoint() {
        let s = token_source(
            "http://127.0.0.1:8081/",
            "orders",
            Secret::new("x".to_owned()),
        )
        .unwrap();
        assert_eq!(s.client_id(), "orders");
        assert!(format!("{s:?}").contains("http://127.0.0.1:8081/auth/v1/token"));
        assert!(token_source("ftp://x", "orders", Secret::new("x".to_owned())).is_err());
    }
}
