//! The token-exchange grant (RFC 8693); the rules are in the
//! [token endpoint's docs](crate::token#token-exchange).

use std::collections::HashMap;

use chassis::permission::{AccountId, Grants, Permission};
use http::HeaderMap;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;

use crate::{
    AuthState,
    client::{ACCESS_TOKEN_TYPE, TokenResponse},
    error::OAuthError,
    token::{self, Common, Failure, Kind, NewToken},
};

/// Longest subject token accepted, in bytes (as the chassis verifier's
/// limit on an `Authorization` header).
const MAX_SUBJECT_TOKEN_LEN: usize = 8 * 1024;
/// Deepest chain of actors (`act` inside `act`) accepted.
const MAX_ACT_DEPTH: usize = 8;

/// The one answer for every subject token that does not verify: which
/// check failed is logged, never told.
const INVALID_SUBJECT: OAuthError = OAuthError::invalid_request("the subject token is not valid");

/// A verified subject token: what the new token inherits.
#[derive(Debug)]
pub(crate) struct SubjectToken {
    pub(crate) sub: String,
    pub(crate) kind: Kind,
    pub(crate) perms: Vec<String>,
    pub(crate) exp: u64,
    pub(crate) act: Option<Value>,
}

#[derive(Deserialize)]
struct SubjectClaims {
    sub: String,
    exp: u64,
    #[serde(default)]
    nbf: Option<u64>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    perms: Vec<String>,
    #[serde(default)]
    act: Option<Value>,
}

/// Whether a client holding `grants` may exchange tokens for `audience`:
/// `auth:<audience>:exchange:token`, deny winning as everywhere.
pub(crate) fn may_exchange(grants: &[String], audience: &str) -> bool {
    let Ok(account) = AccountId::parse(audience) else {
        return false;
    };
    let Ok(wanted) = Permission::new("auth", Some(&account), "exchange", "token") else {
        return false;
    };
    // An unreadable deny refuses the whole set; unreadable allows are left out.
    Grants::from_claim(grants.iter().map(String::as_str))
        .is_ok_and(|(grants, _)| grants.decide(&wanted).is_allowed())
}

fn depth(v: &Value) -> usize {
    match v.get("act") {
        Some(inner) => 1 + depth(inner),
        None => 1,
    }
}

/// Verifies a token this service issued: a published key's signature, the
/// issuer, a known audience, `exp` and `nbf` at `now` (no leeway: the
/// clock is this service's own).
pub(crate) async fn verify_subject(
    state: &AuthState,
    token: &str,
    now: u64,
) -> Result<SubjectToken, Failure> {
    let refuse = |why: &'static str| {
        tracing::info!(reason = why, "subject token refused");
        Failure::OAuth(INVALID_SUBJECT)
    };
    if token.len() > MAX_SUBJECT_TOKEN_LEN {
        return Err(refuse("too large"));
    }
    let header = jsonwebtoken::decode_header(token).map_err(|_| refuse("malformed"))?;
    if header.alg != Algorithm::EdDSA {
        return Err(refuse("algorithm"));
    }
    if header.typ.as_deref() != Some("at+jwt") {
        return Err(refuse("not an access token"));
    }
    let kid = header.kid.ok_or_else(|| refuse("no kid"))?;
    let Some(public) = state.keys.published(&kid, now).await? else {
        return Err(refuse("unknown kid"));
    };
    let mut validation = Validation::new(Algorithm::EdDSA);
    validation.set_issuer(&[&state.issuer]);
    validation.set_audience(&state.audiences);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    // Checked below against this service's clock.
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.leeway = 0;
    let data = jsonwebtoken::decode::<SubjectClaims>(
        token,
        &DecodingKey::from_ed_der(&public),
        &validation,
    )
    .map_err(|e| {
        tracing::info!(error = %e, "subject token refused");
        Failure::OAuth(INVALID_SUBJECT)
    })?;
    let c = data.claims;
    if now >= c.exp {
        return Err(refuse("expired"));
    }
    if c.nbf.is_some_and(|nbf| nbf > now) {
        return Err(refuse("not yet valid"));
    }
    let kind = match c.kind.as_deref() {
        None | Some("user") => Kind::User,
        Some("service") => Kind::Service,
        Some(_) => return Err(refuse("kind")),
    };
    if c.sub.is_empty() {
        return Err(refuse("empty sub"));
    }
    if let Some(act) = &c.act
        && (!act.is_object() || depth(act) > MAX_ACT_DEPTH)
    {
        return Err(refuse("act"));
    }
    Ok(SubjectToken {
        sub: c.sub,
        kind,
        perms: c.perms,
        exp: c.exp,
        act: c.act,
    })
}

/// The grant.
pub(crate) async fn exchange(
    state: &AuthState,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
    common: &Common<'_>,
) -> Result<TokenResponse, Failure> {
    // Everything that needs no hashing first.
    let audience = common
        .audience
        .ok_or(OAuthError::invalid_request("audience is required"))?;
    let subject_token = token::required(form, "subject_token", "subject_token is required")?;
    match form.get("subject_token_type").map(String::as_str) {
        Some(ACCESS_TOKEN_TYPE) => {}
        None => return Err(OAuthError::invalid_request("subject_token_type is required").into()),
        Some(_) => {
            return Err(OAuthError::invalid_request(
                "subject_token_type must be urn:ietf:params:oauth:token-type:access_token",
            )
            .into());
        }
    }
    if form.contains_key("actor_token") || form.contains_key("actor_token_type") {
        return Err(OAuthError::invalid_request("actor tokens are not supported").into());
    }
    if form
        .get("requested_token_type")
        .is_some_and(|t| t != ACCESS_TOKEN_TYPE)
    {
        return Err(OAuthError::invalid_request(
            "requested_token_type must be urn:ietf:params:oauth:token-type:access_token",
        )
        .into());
    }
    let client =
        token::authenticate_client(state, common.peer, headers, form, "token_exchange").await?;
    if !may_exchange(&client.grants, audience) {
        tracing::info!(
            client = %client.name,
            audience,
            "token exchange refused: the client lacks the grant"
        );
        return Err(OAuthError::unauthorized_client(
            "the client may not exchange tokens for this audience",
        )
        .into());
    }
    let now = state.clock.now();
    let subject = verify_subject(state, subject_token, now).await?;
    let perms = token::narrow(&subject.perms, common.scope)?;
    let mut act = serde_json::Map::new();
    act.insert("sub".to_owned(), Value::String(client.name.clone()));
    if let Some(prior) = subject.act {
        act.insert("act".to_owned(), prior);
    }
    let act = Value::Object(act);
    let (access_token, expires_in) = state.sign(&NewToken {
        subject: &subject.sub,
        kind: subject.kind,
        perms: &perms,
        audience,
        now,
        not_after: Some(subject.exp),
        act: Some(&act),
    })?;
    tracing::info!(
        subject = %subject.sub,
        actor = %client.name,
        audience,
        grant = "token_exchange",
        "token issued"
    );
    Ok(TokenResponse {
        access_token,
        token_type: "Bearer".to_owned(),
        expires_in,
        refresh_token: None,
        scope: token::answered_scope(common.scope, &perms),
        issued_token_type: Some(ACCESS_TOKEN_TYPE.to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(g: &[&str]) -> Vec<String> {
        g.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn exchanging_needs_the_grant_for_the_audience() {
        let one = grants(&["auth:ticketing:exchange:token"]);
        assert!(may_exchange(&one, "ticketing"));
        assert!(!may_exchange(&one, "mail"));
        let any = grants(&["auth:*:exchange:token", "!auth:auth:exchange:token"]);
        assert!(may_exchange(&any, "mail"));
        assert!(!may_exchange(&any, "auth"), "deny wins");
        assert!(!may_exchange(&grants(&[]), "mail"));
        assert!(!may_exchange(&grants(&["ticketing:*:*:*"]), "ticketing"));
        assert!(!may_exchange(&one, "not an audience"));
        // An unreadable deny refuses everything.
        assert!(!may_exchange(
            &grants(&["auth:*:exchange:token", "!bad"]),
            "ticketing"
        ));
    }

    #[test]
    fn actor_chains_are_bounded() {
        let mut act = serde_json::json!({"sub": "a"});
        for _ in 0..MAX_ACT_DEPTH - 1 {
            act = serde_json::json!({"sub": "b", "act": act});
        }
        assert_eq!(depth(&act), MAX_ACT_DEPTH);
    }
}
