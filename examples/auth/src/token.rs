//! `POST /auth/v1/token`: the OAuth 2.0 token endpoint (RFC 6749).
//!
//! Requests are `application/x-www-form-urlencoded`. A parameter sent
//! without a value counts as absent, and a repeated parameter is an
//! `invalid_request` (RFC 6749 §3.1, §3.2). Every answer carries
//! `Cache-Control: no-store`.
//!
//! The password and refresh-token grants are for the first-party login of
//! users and need no client authentication; the client-credentials and
//! token-exchange grants authenticate the client with HTTP Basic (RFC 6749
//! §2.3.1: id and secret each form-urlencoded) or with
//! `client_id`/`client_secret` form fields, never both.
//!
//! # Scope
//!
//! An optional `scope` (space-separated grants) narrows the token to those
//! grants; asking for a grant the subject does not have is `invalid_scope`.
//! On a refresh, the scope may only narrow the login's scope further.
//! Narrowing never drops a deny: every deny grant of the subject (`!…`) is
//! carried into the token whatever the scope, since a token without it
//! would allow what the subject is denied.
//!
//! # Audience
//!
//! Every grant takes an optional `audience` (RFC 8693 §2.1): the service
//! the token is for, one of `AUTH_AUDIENCES` or `AUTH_DEFAULT_AUDIENCE`;
//! any other is `invalid_target` (RFC 8707 §2). Without it the token is for
//! `AUTH_DEFAULT_AUDIENCE`. Resource indicators (`resource`, RFC 8707) are
//! not supported and answered `invalid_target` rather than ignored.
//!
//! # Token exchange
//!
//! `grant_type=urn:ietf:params:oauth:grant-type:token-exchange` (RFC 8693)
//! lets a service that received a caller's token get one for another
//! service, to call it on the caller's behalf. The service authenticates as
//! a client, and sends `subject_token` (an access token that this service
//! issued), `subject_token_type=urn:ietf:params:oauth:token-type:access_token`
//! and `audience` (required here). It needs the grant
//! `auth:<audience>:exchange:token` (or a wildcard such as
//! `auth:*:exchange:token`), else `unauthorized_client`. The subject token
//! must verify: this service's signature by a published key, its issuer, an
//! audience it knows, not expired, else `invalid_request` (RFC 8693
//! §2.2.2). The new token has the subject token's `sub` and `kind`, its
//! `perms` (or the `scope` asked for, never more, every deny kept),
//! `aud` the requested audience, `act: {"sub": <client id>}` (with the
//! subject token's own `act` nested inside, RFC 8693 §4.1), and expires no
//! later than the subject token. Actor tokens are not supported.
//!
//! # Brute-force protection
//!
//! Each login (password grant) and client authentication is first
//! admitted by the [throttle]: over a limit it is answered
//! 429 `slow_down` with `Retry-After`, without computing any hash, and
//! counted in `auth_login_throttled_total{limit="name"|"address"|"global"}`
//! (the address is the TCP peer's; `X-Forwarded-For` is not trusted). A check
//! that cannot get a hashing slot within `AUTH_HASH_QUEUE_MS` is answered
//! 503 with `Retry-After` (the chassis' generic problem), counted in
//! `auth_hash_busy_total`. User names and client ids longer than 256 bytes
//! and secrets longer than 1024 bytes are `invalid_request`.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use axum::{
    Extension, Json,
    body::Bytes,
    extract::{ConnectInfo, State, rejection::BytesRejection},
    response::{IntoResponse, Response},
};
use base64::Engine as _;
use chassis::{context::TraceContext, otel::Span};
use http::{HeaderMap, header};
use serde::Serialize;

use crate::{
    AuthState,
    client::TokenResponse,
    error::{AppError, OAuthError, internal, no_store},
    exchange,
    password::HashError,
    store::{self, Refresh, Subject},
    throttle::{self, MAX_NAME_LEN, Throttled},
};

pub(crate) use crate::client::TOKEN_EXCHANGE_GRANT as GRANT_TOKEN_EXCHANGE;

/// The counter of refused logins (wrong password, unknown user, bad client).
pub(crate) const FAILED_LOGINS: &str = "auth_failed_logins_total";
/// The counter of attempts refused by the throttle, by `limit`.
pub(crate) const THROTTLED_LOGINS: &str = "auth_login_throttled_total";
/// The counter of checks refused because every hashing slot was busy.
pub(crate) const HASH_BUSY: &str = "auth_hash_busy_total";

/// The grant types besides the token exchange.
pub(crate) const SUPPORTED_GRANTS: [&str; 3] = ["password", "client_credentials", "refresh_token"];

/// Longest `scope` accepted, in bytes.
const MAX_SCOPE_LEN: usize = 4096;
/// Longest password or client secret accepted, in bytes.
const MAX_SECRET_LEN: usize = 1024;

/// Seconds since the Unix epoch.
pub(crate) fn now() -> u64 {
    chassis::auth::Clock::now(&chassis::auth::SystemClock)
}

/// The claims of an access token.
#[derive(Debug, Serialize)]
struct Claims<'a> {
    iss: &'a str,
    aud: &'a str,
    sub: &'a str,
    iat: u64,
    nbf: u64,
    exp: u64,
    jti: String,
    kind: &'static str,
    perms: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    act: Option<&'a serde_json::Value>,
}

/// Whether the token is for a person or a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    User,
    Service,
}

impl Kind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Service => "service",
        }
    }
}

/// What a new access token says, besides what every token says.
#[derive(Debug)]
pub(crate) struct NewToken<'a> {
    pub(crate) subject: &'a str,
    pub(crate) kind: Kind,
    pub(crate) perms: &'a [String],
    pub(crate) audience: &'a str,
    pub(crate) now: u64,
    /// Expiry when earlier than `now` + the token lifetime.
    pub(crate) not_after: Option<u64>,
    pub(crate) act: Option<&'a serde_json::Value>,
}

/// Why a request got no token.
#[derive(Debug)]
pub(crate) enum Failure {
    OAuth(OAuthError),
    Internal(AppError),
}

impl From<OAuthError> for Failure {
    fn from(e: OAuthError) -> Self {
        Self::OAuth(e)
    }
}

impl From<AppError> for Failure {
    fn from(e: AppError) -> Self {
        Self::Internal(e)
    }
}

impl From<HashError> for Failure {
    fn from(e: HashError) -> Self {
        match e {
            HashError::Busy => {
                metrics::counter!(HASH_BUSY).increment(1);
                tracing::warn!("every password hashing slot is busy; a login is refused");
                Self::OAuth(OAuthError::busy())
            }
            e => Self::Internal(e.into()),
        }
    }
}

impl From<Throttled> for Failure {
    fn from(t: Throttled) -> Self {
        metrics::counter!(THROTTLED_LOGINS, "limit" => t.limit.as_str()).increment(1);
        tracing::info!(
            limit = t.limit.as_str(),
            retry_after = t.retry_after,
            "login throttled"
        );
        Self::OAuth(OAuthError::throttled(t.retry_after))
    }
}

/// The handler.
///
/// `peer` is the client's address when the server gives it (always, when
/// served; never, in-process through the router alone).
pub(crate) async fn token(
    State(state): State<Arc<AuthState>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    trace: TraceContext,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let peer = peer.map(|Extension(ConnectInfo(addr))| addr.ip());
    let answer = match body {
        Ok(body) => grant(&state, peer, &trace, &headers, &body).await,
        Err(_) => Err(OAuthError::invalid_request("the request body could not be read").into()),
    };
    match answer {
        Ok(tokens) => no_store(Json(tokens).into_response()),
        Err(Failure::OAuth(e)) => e.into_response(),
        Err(Failure::Internal(e)) => no_store(internal("token request failed", &e).into_response()),
    }
}

/// What every grant reads from the form, and where the request came from.
#[derive(Debug)]
pub(crate) struct Common<'a> {
    /// The client's address, when known: the throttle counts failures per
    /// address.
    pub(crate) peer: Option<IpAddr>,
    pub(crate) scope: Option<&'a [String]>,
    /// The audience asked for, known; `None`: none asked for.
    pub(crate) audience: Option<&'a str>,
    /// The request's trace, for the spans of its transactions.
    pub(crate) trace: &'a TraceContext,
}

async fn grant(
    state: &AuthState,
    peer: Option<IpAddr>,
    trace: &TraceContext,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<TokenResponse, Failure> {
    let form = parse_form(headers, body)?;
    let scope = requested_scope(&form)?;
    let audience = requested_audience(state, &form)?;
    let common = Common {
        peer,
        scope: scope.as_deref(),
        audience,
        trace,
    };
    match form.get("grant_type").map(String::as_str) {
        None => Err(OAuthError::invalid_request("grant_type is required").into()),
        Some("password") => password(state, &form, &common).await,
        Some("client_credentials") => client_credentials(state, headers, &form, &common).await,
        Some("refresh_token") => refresh(state, &form, &common).await,
        Some(GRANT_TOKEN_EXCHANGE) => exchange::exchange(state, headers, &form, &common).await,
        Some(_) => Err(OAuthError::unsupported_grant_type().into()),
    }
}

/// The form's parameters; values are never empty.
fn parse_form(headers: &HeaderMap, body: &[u8]) -> Result<HashMap<String, String>, OAuthError> {
    let form_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !form_type {
        return Err(OAuthError::invalid_request(
            "the body must be application/x-www-form-urlencoded",
        ));
    }
    let mut form = HashMap::new();
    for (name, value) in form_urlencoded::parse(body) {
        if value.is_empty() {
            continue;
        }
        if form.insert(name.into_owned(), value.into_owned()).is_some() {
            return Err(OAuthError::invalid_request(
                "a parameter is repeated; each may appear once",
            ));
        }
    }
    Ok(form)
}

pub(crate) fn required<'a>(
    form: &'a HashMap<String, String>,
    name: &str,
    description: &'static str,
) -> Result<&'a str, OAuthError> {
    form.get(name)
        .map(String::as_str)
        .ok_or(OAuthError::invalid_request(description))
}

/// The grants asked for with `scope`, if any.
fn requested_scope(form: &HashMap<String, String>) -> Result<Option<Vec<String>>, OAuthError> {
    let Some(scope) = form.get("scope") else {
        return Ok(None);
    };
    if scope.len() > MAX_SCOPE_LEN {
        return Err(OAuthError::invalid_scope("the scope is too long"));
    }
    let mut grants: Vec<String> = scope.split_ascii_whitespace().map(str::to_owned).collect();
    grants.sort();
    grants.dedup();
    if grants.is_empty() {
        return Ok(None);
    }
    Ok(Some(grants))
}

/// The audience asked for, when it is a known one.
fn requested_audience<'s>(
    state: &'s AuthState,
    form: &HashMap<String, String>,
) -> Result<Option<&'s str>, OAuthError> {
    if form.contains_key("resource") {
        return Err(OAuthError::invalid_target(
            "resource indicators are not supported; name the service with audience",
        ));
    }
    let Some(asked) = form.get("audience") else {
        return Ok(None);
    };
    state
        .audiences
        .iter()
        .find(|a| *a == asked)
        .map(|a| Some(a.as_str()))
        .ok_or(OAuthError::invalid_target(
            "the audience is not a known service",
        ))
}

/// The grants a token carries: all of `grants`, or the `requested` ones
/// when each is one of them, with every deny of `grants` in any case.
pub(crate) fn narrow(
    grants: &[String],
    requested: Option<&[String]>,
) -> Result<Vec<String>, OAuthError> {
    match requested {
        None => Ok(grants.to_vec()),
        Some(requested) if requested.iter().all(|r| grants.contains(r)) => {
            Ok(with_denies(requested.to_vec(), grants))
        }
        Some(_) => Err(OAuthError::invalid_scope(
            "the scope asks for a grant the subject does not have",
        )),
    }
}

/// `perms` with every deny grant of `grants` added.
fn with_denies(mut perms: Vec<String>, grants: &[String]) -> Vec<String> {
    for deny in grants.iter().filter(|g| g.starts_with('!')) {
        if !perms.contains(deny) {
            perms.push(deny.clone());
        }
    }
    perms
}

/// `scope` for the answer: only when the token's grants differ from the
/// scope asked for (RFC 6749 §5.1).
pub(crate) fn answered_scope(requested: Option<&[String]>, perms: &[String]) -> Option<String> {
    requested.filter(|r| *r != perms).map(|_| perms.join(" "))
}

fn refused_login(kind: Kind) {
    metrics::counter!(FAILED_LOGINS, "kind" => kind.as_str()).increment(1);
}

fn check_lengths(name: &str, secret: &str, what: &'static str) -> Result<(), OAuthError> {
    if name.len() > MAX_NAME_LEN || secret.len() > MAX_SECRET_LEN {
        return Err(OAuthError::invalid_request(what));
    }
    Ok(())
}

async fn password(
    state: &AuthState,
    form: &HashMap<String, String>,
    common: &Common<'_>,
) -> Result<TokenResponse, Failure> {
    let username = required(form, "username", "username is required")?;
    let password = required(form, "password", "password is required")?;
    check_lengths(username, password, "the username or password is too long")?;
    let attempt = state
        .throttle
        .begin(throttle::Subject::User, username, common.peer)?;
    let user = store::user(&state.db, username).await?;
    // The same work whether or not the user exists: an unknown user is
    // checked against the dummy hash.
    let matched = state
        .hasher
        .verify(user.as_ref().map(|u| u.hash.as_str()), password)
        .await?;
    let Some(user) = user.filter(|_| matched) else {
        attempt.failed();
        refused_login(Kind::User);
        tracing::info!(grant = "password", "login refused");
        return Err(OAuthError::invalid_grant("invalid username or password").into());
    };
    attempt.succeeded();
    let perms = narrow(&user.grants, common.scope)?;
    let now = state.clock.now();
    let scope_text = common.scope.map(|s| s.join(" "));
    let refresh_token = store::start_family(
        &state.db,
        &user.name,
        scope_text.as_deref(),
        state.refresh_ttl,
        now,
    )
    .await?;
    let (access_token, expires_in) = state.sign(&NewToken {
        subject: &user.name,
        kind: Kind::User,
        perms: &perms,
        audience: state.audience(common),
        now,
        not_after: None,
        act: None,
    })?;
    tracing::info!(subject = %user.name, grant = "password", "token issued");
    Ok(TokenResponse {
        access_token,
        token_type: "Bearer".to_owned(),
        expires_in,
        refresh_token: Some(refresh_token),
        scope: answered_scope(common.scope, &perms),
        issued_token_type: None,
    })
}

/// Authenticates the client of a request (client-credentials and token
/// exchange) from `peer`, throttled like a login.
pub(crate) async fn authenticate_client(
    state: &AuthState,
    peer: Option<IpAddr>,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
    grant: &'static str,
) -> Result<Subject, Failure> {
    let (client_id, secret) = client_authentication(headers, form)?;
    check_lengths(&client_id, &secret, "the client id or secret is too long")?;
    let attempt = state
        .throttle
        .begin(throttle::Subject::Client, &client_id, peer)?;
    let client = store::client(&state.db, &client_id).await?;
    let matched = state
        .hasher
        .verify(client.as_ref().map(|c| c.hash.as_str()), &secret)
        .await?;
    let Some(client) = client.filter(|_| matched) else {
        attempt.failed();
        refused_login(Kind::Service);
        tracing::info!(grant, "client authentication refused");
        return Err(OAuthError::invalid_client().into());
    };
    attempt.succeeded();
    Ok(client)
}

async fn client_credentials(
    state: &AuthState,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
    common: &Common<'_>,
) -> Result<TokenResponse, Failure> {
    let client =
        authenticate_client(state, common.peer, headers, form, "client_credentials").await?;
    let perms = narrow(&client.grants, common.scope)?;
    let (access_token, expires_in) = state.sign(&NewToken {
        subject: &client.name,
        kind: Kind::Service,
        perms: &perms,
        audience: state.audience(common),
        now: state.clock.now(),
        not_after: None,
        act: None,
    })?;
    tracing::info!(subject = %client.name, grant = "client_credentials", "token issued");
    Ok(TokenResponse {
        access_token,
        token_type: "Bearer".to_owned(),
        expires_in,
        refresh_token: None,
        scope: answered_scope(common.scope, &perms),
        issued_token_type: None,
    })
}

/// The client's id and secret, from HTTP Basic or the form (one of them).
pub(crate) fn client_authentication(
    headers: &HeaderMap,
    form: &HashMap<String, String>,
) -> Result<(String, String), OAuthError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let basic = match (values.next(), values.next()) {
        (None, _) => None,
        (Some(v), None) => {
            Some(basic_credentials(v.as_bytes()).ok_or(OAuthError::invalid_client())?)
        }
        (Some(_), Some(_)) => return Err(OAuthError::invalid_client()),
    };
    let form_id = form.get("client_id");
    let form_secret = form.get("client_secret");
    match (basic, form_id, form_secret) {
        (Some(_), _, Some(_)) => Err(OAuthError::invalid_request(
            "use one client authentication method, not both",
        )),
        (Some((id, _)), Some(form_id), None) if *form_id != id => Err(OAuthError::invalid_request(
            "client_id does not match the authenticated client",
        )),
        (Some(credentials), _, None) => Ok(credentials),
        (None, Some(id), Some(secret)) => Ok((id.clone(), secret.clone())),
        (None, ..) => Err(OAuthError::invalid_client()),
    }
}

/// `Basic base64(urlencode(id) ":" urlencode(secret))`.
fn basic_credentials(value: &[u8]) -> Option<(String, String)> {
    let (scheme, encoded) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"basic ") {
        return None;
    }
    let encoded = std::str::from_utf8(encoded).ok()?.trim();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(encoded))
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    let (id, secret) = (form_decode(id)?, form_decode(secret)?);
    (!id.is_empty() && !secret.is_empty()).then_some((id, secret))
}

/// Decodes one `application/x-www-form-urlencoded` value: `+` is a space,
/// `%XX` a byte; `None` for a broken escape or bytes that are not UTF-8.
fn form_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = char::from(bytes.next()?).to_digit(16)?;
                let lo = char::from(bytes.next()?).to_digit(16)?;
                out.push(u8::try_from(hi * 16 + lo).ok()?);
            }
            _ => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

async fn refresh(
    state: &AuthState,
    form: &HashMap<String, String>,
    common: &Common<'_>,
) -> Result<TokenResponse, Failure> {
    let requested = common.scope;
    let presented = required(form, "refresh_token", "refresh_token is required")?;
    let now = state.clock.now();
    // The rotation is one transaction: a span of the request's trace.
    let system = state.db.backend().system_name();
    let mut rotation = Span::storage(common.trace, system, "rotate refresh token");
    let outcome = store::refresh(
        &state.db,
        presented,
        state.refresh_ttl,
        now,
        |grants, family_scope| {
            let Some(requested) = requested else {
                return true;
            };
            // Denies are in every token anyway: asking for one the user has
            // is never a widening.
            let (denies, allows): (Vec<&String>, Vec<&String>) =
                requested.iter().partition(|r| r.starts_with('!'));
            denies.iter().all(|d| grants.contains(d))
                && match family_scope {
                    Some(family) => {
                        let family: Vec<&str> = family.split(' ').collect();
                        allows.iter().all(|r| family.contains(&r.as_str()))
                    }
                    None => allows.iter().all(|r| grants.contains(r)),
                }
        },
    )
    .await;
    if outcome.is_err() {
        rotation.set_error(system);
    }
    rotation.end();
    let outcome = outcome?;
    match outcome {
        Refresh::Rotated {
            username,
            grants,
            scope,
            token,
        } => {
            // The login's scope, narrowed further by this request; grants
            // removed since the login are gone from the token too, and
            // every current deny is in it.
            let wanted: Option<Vec<String>> = requested
                .map(<[String]>::to_vec)
                .or_else(|| scope.map(|s| s.split(' ').map(str::to_owned).collect()));
            let perms: Vec<String> = match &wanted {
                None => grants,
                Some(w) => with_denies(
                    w.iter().filter(|g| grants.contains(g)).cloned().collect(),
                    &grants,
                ),
            };
            let (access_token, expires_in) = state.sign(&NewToken {
                subject: &username,
                kind: Kind::User,
                perms: &perms,
                audience: state.audience(common),
                now,
                not_after: None,
                act: None,
            })?;
            tracing::info!(subject = %username, grant = "refresh_token", "token issued");
            Ok(TokenResponse {
                access_token,
                token_type: "Bearer".to_owned(),
                expires_in,
                refresh_token: Some(token),
                scope: answered_scope(requested, &perms),
                issued_token_type: None,
            })
        }
        Refresh::Reused { family } => {
            tracing::warn!(
                family,
                "a used refresh token was presented again; its whole family is revoked"
            );
            Err(OAuthError::invalid_grant("the refresh token is not valid").into())
        }
        Refresh::Invalid => Err(OAuthError::invalid_grant("the refresh token is not valid").into()),
        Refresh::ScopeRefused => {
            Err(OAuthError::invalid_scope("the scope asks for more than the login granted").into())
        }
    }
}

impl AuthState {
    /// The audience of a new token: the one asked for, or the default.
    pub(crate) fn audience<'a>(&'a self, common: &Common<'a>) -> &'a str {
        common.audience.unwrap_or(&self.default_audience)
    }

    /// Signs an access token with the current key: the token and the
    /// seconds it is valid for.
    pub(crate) fn sign(&self, t: &NewToken<'_>) -> Result<(String, u64), AppError> {
        let mut exp = t.now.saturating_add(self.token_ttl);
        if let Some(not_after) = t.not_after {
            exp = exp.min(not_after);
        }
        let claims = Claims {
            iss: &self.issuer,
            aud: t.audience,
            sub: t.subject,
            iat: t.now,
            nbf: t.now,
            exp,
            jti: store::random_id()?,
            kind: t.kind.as_str(),
            perms: t.perms,
            act: t.act,
        };
        let token = self.keys.current().sign(&claims)?;
        Ok((token, exp.saturating_sub(t.now)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn form(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn basic(id: &str, secret: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
        )
    }

    #[test]
    fn forms_are_parsed_strictly() {
        let ct = headers(&[(
            "content-type",
            "application/x-www-form-urlencoded; charset=utf-8",
        )]);
        let f = parse_form(&ct, b"grant_type=password&username=a%20b&password=&x=1").unwrap();
        assert_eq!(f["username"], "a b");
        assert!(!f.contains_key("password"), "empty values count as absent");
        let e = parse_form(&ct, b"grant_type=password&grant_type=password").unwrap_err();
        assert_eq!(e.code(), "invalid_request");
        let json = headers(&[("content-type", "application/json")]);
        assert_eq!(
            parse_form(&json, b"{}").unwrap_err().code(),
            "invalid_request"
        );
        assert_eq!(
            parse_form(&HeaderMap::new(), b"grant_type=x")
                .unwrap_err()
                .code(),
            "invalid_request"
        );
    }

    #[test]
    fn basic_credentials_are_form_decoded() {
        assert_eq!(
            basic_credentials(basic("orders", "s%3Ac+r%25t").as_bytes()),
            Some(("orders".to_owned(), "s:c r%t".to_owned()))
        );
        assert_eq!(
            basic_credentials(basic("orders", "plain:colon").as_bytes()),
            Some(("orders".to_owned(), "plain:colon".to_owned()))
        );
        for bad in [
            "Bearer abc".to_owned(),
            "Basic !!!".to_owned(),
            basic("orders", "bad%zz"),
            basic("orders", ""),
            basic("", "x"),
            "Basic".to_owned(),
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("no-colon")
            ),
        ] {
            assert_eq!(basic_credentials(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn one_client_authentication_method() {
        let h = headers(&[("authorization", &basic("orders", "s"))]);
        assert_eq!(
            client_authentication(&h, &form(&[])).unwrap(),
            ("orders".to_owned(), "s".to_owned())
        );
        assert!(client_authentication(&h, &form(&[("client_id", "orders")])).is_ok());
        assert_eq!(
            client_authentication(&h, &form(&[("client_id", "mail")]))
                .unwrap_err()
                .code(),
            "invalid_request"
        );
        assert_eq!(
            client_authentication(&h, &form(&[("client_secret", "s")]))
                .unwrap_err()
                .code(),
            "invalid_request"
        );
        assert_eq!(
            client_authentication(
                &HeaderMap::new(),
                &form(&[("client_id", "orders"), ("client_secret", "s")])
            )
            .unwrap(),
            ("orders".to_owned(), "s".to_owned())
        );
        for (h, f) in [
            (HeaderMap::new(), form(&[])),
            (HeaderMap::new(), form(&[("client_id", "orders")])),
            (headers(&[("authorization", "Bearer x.y.z")]), form(&[])),
            (
                headers(&[
                    ("authorization", &basic("orders", "s")),
                    ("authorization", &basic("orders", "s")),
                ]),
                form(&[]),
            ),
        ] {
            assert_eq!(
                client_authentication(&h, &f).unwrap_err().code(),
                "invalid_client"
            );
        }
    }

    #[test]
    fn scopes_narrow_and_never_widen() {
        let grants = vec!["a:b:c:d".to_owned(), "e:f:g:h".to_owned()];
        let f = form(&[("scope", "e:f:g:h  e:f:g:h")]);
        let requested = requested_scope(&f).unwrap().unwrap();
        assert_eq!(requested, ["e:f:g:h"]);
        assert_eq!(narrow(&grants, Some(&requested)).unwrap(), ["e:f:g:h"]);
        assert_eq!(narrow(&grants, None).unwrap(), grants);
        assert_eq!(
            narrow(&grants, Some(&["x:y:z:w".to_owned()]))
                .unwrap_err()
                .code(),
            "invalid_scope"
        );
        assert_eq!(answered_scope(Some(&requested), &requested), None);
        assert_eq!(answered_scope(None, &grants), None);
        assert_eq!(answered_scope(Some(&requested), &[]), Some(String::new()));
    }

    #[test]
    fn narrowing_keeps_every_deny() {
        let grants = vec![
            "a:b:*:*".to_owned(),
            "!a:b:delete:*".to_owned(),
            "e:f:g:h".to_owned(),
            "!e:f:g:x".to_owned(),
        ];
        assert_eq!(
            narrow(&grants, Some(&["e:f:g:h".to_owned()])).unwrap(),
            ["e:f:g:h", "!a:b:delete:*", "!e:f:g:x"]
        );
        // Asking for a deny is asking for what the token has anyway.
        assert_eq!(
            narrow(&grants, Some(&["!a:b:delete:*".to_owned()])).unwrap(),
            ["!a:b:delete:*", "!e:f:g:x"]
        );
        assert_eq!(narrow(&grants, None).unwrap(), grants);
    }
}
