//! `POST /auth/v1/token`: the OAuth 2.0 token endpoint (RFC 6749).
//!
//! Requests are `application/x-www-form-urlencoded`. A parameter sent
//! without a value counts as absent, and a repeated parameter is an
//! `invalid_request` (RFC 6749 §3.1, §3.2). Every answer carries
//! `Cache-Control: no-store`.
//!
//! The password and refresh-token grants are for the first-party login of
//! users and need no client authentication; the client-credentials grant
//! authenticates the client with HTTP Basic (RFC 6749 §2.3.1: id and secret
//! each form-urlencoded) or with `client_id`/`client_secret` form fields,
//! never both.
//!
//! An optional `scope` (space-separated grants) narrows the token to those
//! grants; asking for a grant the subject does not have is `invalid_scope`.
//! On a refresh, the scope may only narrow the login's scope further.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{
    Extension, Json,
    body::Bytes,
    extract::rejection::BytesRejection,
    response::{IntoResponse, Response},
};
use base64::Engine as _;
use http::{HeaderMap, header};
use serde::Serialize;

use crate::{
    State,
    client::TokenResponse,
    error::{AppError, OAuthError, internal, no_store},
    store::{self, Refresh},
};

/// The counter of refused logins (wrong password, unknown user, bad client).
pub(crate) const FAILED_LOGINS: &str = "auth_failed_logins_total";

/// Longest `scope` accepted, in bytes.
const MAX_SCOPE_LEN: usize = 4096;

/// Seconds since the Unix epoch.
pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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
}

/// Whether the token is for a person or a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    User,
    Service,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Service => "service",
        }
    }
}

/// Why a request got no token.
#[derive(Debug)]
enum Failure {
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

impl From<crate::password::HashError> for Failure {
    fn from(e: crate::password::HashError) -> Self {
        Self::Internal(e.into())
    }
}

/// The handler.
pub(crate) async fn token(
    Extension(state): Extension<Arc<State>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let answer = match body {
        Ok(body) => grant(&state, &headers, &body).await,
        Err(_) => Err(OAuthError::invalid_request("the request body could not be read").into()),
    };
    match answer {
        Ok(tokens) => no_store(Json(tokens).into_response()),
        Err(Failure::OAuth(e)) => e.into_response(),
        Err(Failure::Internal(e)) => no_store(internal("token request failed", &e).into_response()),
    }
}

async fn grant(state: &State, headers: &HeaderMap, body: &[u8]) -> Result<TokenResponse, Failure> {
    let form = parse_form(headers, body)?;
    let scope = requested_scope(&form)?;
    match form.get("grant_type").map(String::as_str) {
        None => Err(OAuthError::invalid_request("grant_type is required").into()),
        Some("password") => password(state, &form, scope.as_deref()).await,
        Some("client_credentials") => {
            client_credentials(state, headers, &form, scope.as_deref()).await
        }
        Some("refresh_token") => refresh(state, &form, scope.as_deref()).await,
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

fn required<'a>(
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

/// The grants a token carries: all of `grants`, or the `requested` ones
/// when each is one of them.
fn narrow(grants: &[String], requested: Option<&[String]>) -> Result<Vec<String>, OAuthError> {
    match requested {
        None => Ok(grants.to_vec()),
        Some(requested) if requested.iter().all(|r| grants.contains(r)) => Ok(requested.to_vec()),
        Some(_) => Err(OAuthError::invalid_scope(
            "the scope asks for a grant the subject does not have",
        )),
    }
}

/// `scope` for the answer: only when the token's grants differ from the
/// scope asked for (RFC 6749 §5.1).
fn answered_scope(requested: Option<&[String]>, perms: &[String]) -> Option<String> {
    requested.filter(|r| *r != perms).map(|_| perms.join(" "))
}

fn refused_login(kind: Kind) {
    metrics::counter!(FAILED_LOGINS, "kind" => kind.as_str()).increment(1);
}

async fn password(
    state: &State,
    form: &HashMap<String, String>,
    scope: Option<&[String]>,
) -> Result<TokenResponse, Failure> {
    let username = required(form, "username", "username is required")?;
    let password = required(form, "password", "password is required")?;
    let user = store::user(&state.pool, username).await?;
    // The same work whether or not the user exists: an unknown user is
    // checked against the dummy hash.
    let matched = state
        .hasher
        .verify(user.as_ref().map(|u| u.hash.as_str()), password)
        .await?;
    let Some(user) = user.filter(|_| matched) else {
        refused_login(Kind::User);
        tracing::info!(grant = "password", "login refused");
        return Err(OAuthError::invalid_grant("invalid username or password").into());
    };
    let perms = narrow(&user.grants, scope)?;
    let now = now();
    let scope_text = scope.map(|s| s.join(" "));
    let refresh_token = store::start_family(
        &state.pool,
        &user.name,
        scope_text.as_deref(),
        state.refresh_ttl,
        now,
    )
    .await?;
    let access_token = state.sign(&user.name, Kind::User, &perms, now)?;
    tracing::info!(subject = %user.name, grant = "password", "token issued");
    Ok(TokenResponse {
        access_token,
        token_type: "Bearer".to_owned(),
        expires_in: state.token_ttl,
        refresh_token: Some(refresh_token),
        scope: answered_scope(scope, &perms),
    })
}

async fn client_credentials(
    state: &State,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
    scope: Option<&[String]>,
) -> Result<TokenResponse, Failure> {
    let (client_id, secret) = client_authentication(headers, form)?;
    let client = store::client(&state.pool, &client_id).await?;
    let matched = state
        .hasher
        .verify(client.as_ref().map(|c| c.hash.as_str()), &secret)
        .await?;
    let Some(client) = client.filter(|_| matched) else {
        refused_login(Kind::Service);
        tracing::info!(
            grant = "client_credentials",
            "client authentication refused"
        );
        return Err(OAuthError::invalid_client().into());
    };
    let perms = narrow(&client.grants, scope)?;
    let access_token = state.sign(&client.name, Kind::Service, &perms, now())?;
    tracing::info!(subject = %client.name, grant = "client_credentials", "token issued");
    Ok(TokenResponse {
        access_token,
        token_type: "Bearer".to_owned(),
        expires_in: state.token_ttl,
        refresh_token: None,
        scope: answered_scope(scope, &perms),
    })
}

/// The client's id and secret, from HTTP Basic or the form (one of them).
fn client_authentication(
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
    state: &State,
    form: &HashMap<String, String>,
    requested: Option<&[String]>,
) -> Result<TokenResponse, Failure> {
    let presented = required(form, "refresh_token", "refresh_token is required")?;
    let now = now();
    let outcome = store::refresh(
        &state.pool,
        presented,
        state.refresh_ttl,
        now,
        |grants, family_scope| {
            let Some(requested) = requested else {
                return true;
            };
            match family_scope {
                Some(family) => {
                    let family: Vec<&str> = family.split(' ').collect();
                    requested.iter().all(|r| family.contains(&r.as_str()))
                }
                None => requested.iter().all(|r| grants.contains(r)),
            }
        },
    )
    .await?;
    match outcome {
        Refresh::Rotated {
            username,
            grants,
            scope,
            token,
        } => {
            // The login's scope, narrowed further by this request; grants
            // removed since the login are gone from the token too.
            let wanted: Option<Vec<String>> = requested
                .map(<[String]>::to_vec)
                .or_else(|| scope.map(|s| s.split(' ').map(str::to_owned).collect()));
            let perms: Vec<String> = match &wanted {
                None => grants,
                Some(w) => w.iter().filter(|g| grants.contains(g)).cloned().collect(),
            };
            let access_token = state.sign(&username, Kind::User, &perms, now)?;
            tracing::info!(subject = %username, grant = "refresh_token", "token issued");
            Ok(TokenResponse {
                access_token,
                token_type: "Bearer".to_owned(),
                expires_in: state.token_ttl,
                refresh_token: Some(token),
                scope: answered_scope(requested, &perms),
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

impl State {
    /// Signs an access token for `subject` with the current key.
    fn sign(
        &self,
        subject: &str,
        kind: Kind,
        perms: &[String],
        now: u64,
    ) -> Result<String, AppError> {
        let claims = Claims {
            iss: &self.issuer,
            aud: &self.audience,
            sub: subject,
            iat: now,
            nbf: now,
            exp: now.saturating_add(self.token_ttl),
            jti: store::random_id()?,
            kind: kind.as_str(),
            perms,
        };
        self.keys.current().sign(&claims)
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
}
