//! `auth`'s API over real sockets, with a real SQLite file in a fresh
//! directory per test: the token endpoint, deny grants under narrowing,
//! audiences, the key set and its rotation, discovery, restarts, and the
//! driver client.

mod support;

use std::time::Duration;

use auth::Settings;
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64URL};
use chassis::auth::{PrincipalKind, Verifier};
use http::{Method, StatusCode};
use jsonwebtoken::Algorithm;
use support::{
    ALICE_GRANTS, DORA_GRANTS, Data, FORM, ORDERS_GRANTS, basic, decode, eventually, futures_join,
    perms_of, send, start, start_with,
};

// === the token endpoint ===

#[tokio::test]
async fn password_grant_issues_an_access_and_a_refresh_token() {
    let dir = Data::new("password");
    let auth = start(&dir).await;
    let res = auth.login("alice", "alice-password").await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(res.header("cache-control"), "no-store");
    assert!(res.header("content-type").starts_with("application/json"));
    let body = res.json();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 900);
    let refresh = body["refresh_token"].as_str().unwrap();
    assert_eq!(B64URL.decode(refresh).unwrap().len(), 32);

    let (header, claims) = decode(body["access_token"].as_str().unwrap());
    assert_eq!(header["alg"], "EdDSA");
    assert_eq!(header["typ"], "at+jwt");
    assert_eq!(header["kid"].as_str(), Some(auth.kids().await[0].as_str()));
    assert_eq!(claims["iss"], "http://127.0.0.1:8081");
    assert_eq!(claims["aud"], "chassis-demo");
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["kind"], "user");
    assert_eq!(claims["perms"], serde_json::json!(ALICE_GRANTS));
    let iat = claims["iat"].as_u64().unwrap();
    assert_eq!(claims["nbf"].as_u64(), Some(iat));
    assert_eq!(claims["exp"].as_u64(), Some(iat + 900));
    assert!(!claims["jti"].as_str().unwrap().is_empty());

    // Two logins, two token ids.
    let (_, again) = decode(&auth.access_token("alice").await);
    assert_ne!(again["jti"], claims["jti"]);
    auth.stop().await;
}

#[tokio::test]
async fn wrong_password_and_unknown_user_answer_alike_and_are_counted() {
    let dir = Data::new("refused");
    let auth = start(&dir).await;
    let before = auth.failed_logins("user").await;
    let wrong = auth.login("alice", "not-her-password").await;
    let unknown = auth.login("mallory", "alice-password").await;
    for res in [&wrong, &unknown] {
        assert_eq!(res.status, 400, "{res:?}");
        assert_eq!(res.header("cache-control"), "no-store");
        assert!(res.header("content-type").starts_with("application/json"));
    }
    assert_eq!(wrong.body, unknown.body, "the same answer for both");
    assert_eq!(
        wrong.json(),
        serde_json::json!({"error": "invalid_grant", "error_description": "invalid username or password"})
    );
    // Other tests in this process may count too: at least these two.
    let after = auth.failed_logins("user").await;
    assert!(after >= before + 2, "{before} -> {after}");
    auth.stop().await;
}

#[tokio::test]
async fn client_credentials_via_basic_and_via_form() {
    let dir = Data::new("clients");
    let auth = start(&dir).await;
    let orders = basic("orders", "orders-secret");
    let via_basic = auth
        .post_form(
            "grant_type=client_credentials",
            &[("authorization", &orders)],
        )
        .await;
    let via_form = auth
        .post_form(
            "grant_type=client_credentials&client_id=orders&client_secret=orders-secret",
            &[],
        )
        .await;
    for res in [via_basic, via_form] {
        assert_eq!(res.status, 200, "{res:?}");
        assert_eq!(res.header("cache-control"), "no-store");
        let body = res.json();
        assert!(body.get("refresh_token").is_none(), "{body}");
        assert_eq!(body["expires_in"], 900);
        let (_, claims) = decode(body["access_token"].as_str().unwrap());
        assert_eq!(claims["sub"], "orders");
        assert_eq!(claims["kind"], "service");
        assert_eq!(claims["perms"], serde_json::json!(ORDERS_GRANTS));
    }

    // A client without grants gets a token without grants.
    let res = auth
        .post_form(
            "grant_type=client_credentials",
            &[("authorization", &basic("mail", "mail-secret"))],
        )
        .await;
    assert_eq!(res.status, 200, "{res:?}");
    let (_, claims) = decode(res.json()["access_token"].as_str().unwrap());
    assert_eq!(claims["perms"], serde_json::json!([]));

    // A scope narrows the token; one beyond the grants is refused.
    let res = auth
        .post_form(
            "grant_type=client_credentials&scope=mail%3A%3Asend%3Amessage",
            &[("authorization", &basic("orders", "orders-secret"))],
        )
        .await;
    assert_eq!(res.status, 200, "{res:?}");
    let (_, claims) = decode(res.json()["access_token"].as_str().unwrap());
    assert_eq!(claims["perms"], serde_json::json!(["mail::send:message"]));
    let res = auth
        .post_form(
            "grant_type=client_credentials&scope=orders%3A%2A%3A%2A%3A%2A",
            &[("authorization", &basic("orders", "orders-secret"))],
        )
        .await;
    assert_eq!(res.status, 400);
    assert_eq!(res.json()["error"], "invalid_scope");
    auth.stop().await;
}

#[tokio::test]
async fn a_client_that_fails_authentication_is_401_invalid_client() {
    let dir = Data::new("badclient");
    let auth = start(&dir).await;
    let before = auth.failed_logins("service").await;
    let wrong_secret = basic("orders", "guess");
    let wrong_scheme = "Bearer a.b.c".to_owned();
    let cases: [(&str, Vec<(&str, &str)>); 4] = [
        (
            "grant_type=client_credentials",
            vec![("authorization", wrong_secret.as_str())],
        ),
        (
            "grant_type=client_credentials&client_id=nobody&client_secret=orders-secret",
            vec![],
        ),
        ("grant_type=client_credentials", vec![]),
        (
            "grant_type=client_credentials",
            vec![("authorization", wrong_scheme.as_str())],
        ),
    ];
    for (form, headers) in cases {
        let res = auth.post_form(form, &headers).await;
        assert_eq!(res.status, 401, "{form}: {res:?}");
        assert_eq!(res.header("www-authenticate"), "Basic realm=\"auth\"");
        assert_eq!(res.header("cache-control"), "no-store");
        assert_eq!(res.json(), serde_json::json!({"error": "invalid_client"}));
    }
    let after = auth.failed_logins("service").await;
    assert!(after >= before + 2, "{before} -> {after}");
    auth.stop().await;
}

#[tokio::test]
async fn malformed_requests_are_oauth_errors() {
    let dir = Data::new("malformed");
    let auth = start(&dir).await;
    let cases = [
        (
            "grant_type=authorization_code&code=x",
            "unsupported_grant_type",
        ),
        ("grant_type=implicit", "unsupported_grant_type"),
        ("username=alice&password=alice-password", "invalid_request"),
        ("grant_type=password&username=alice", "invalid_request"),
        ("grant_type=refresh_token", "invalid_request"),
        (
            "grant_type=password&grant_type=password&username=alice&password=alice-password",
            "invalid_request",
        ),
        (
            "grant_type=refresh_token&refresh_token=made-up",
            "invalid_grant",
        ),
    ];
    for (form, error) in cases {
        let res = auth.post_form(form, &[]).await;
        assert_eq!(res.status, 400, "{form}: {res:?}");
        assert_eq!(res.header("cache-control"), "no-store", "{form}");
        let body = res.json();
        assert_eq!(body["error"], error, "{form}: {body}");
        assert!(body["error_description"].is_string(), "{form}: {body}");
    }
    // Not a form.
    let res = send(
        Method::POST,
        &auth.url("/auth/v1/token"),
        &[("content-type", "application/json")],
        r#"{"grant_type":"password"}"#,
    )
    .await;
    assert_eq!(res.status, 400);
    assert_eq!(res.json()["error"], "invalid_request");
    assert_eq!(res.header("cache-control"), "no-store");
    // Bytes that are not UTF-8 are refused, not a panic.
    let res = auth
        .post_form("grant_type=password&username=%FF%FE&password=%C3", &[])
        .await;
    assert_eq!(res.status, 400);
    assert_eq!(res.json()["error"], "invalid_grant");
    auth.stop().await;
}

#[tokio::test]
async fn refresh_tokens_rotate() {
    let dir = Data::new("rotation");
    let auth = start(&dir).await;
    let first = auth.login("alice", "alice-password").await.json();
    let r1 = first["refresh_token"].as_str().unwrap().to_owned();

    let res = auth.refresh(&r1).await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(res.header("cache-control"), "no-store");
    let second = res.json();
    let r2 = second["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(r1, r2);
    let (_, claims) = decode(second["access_token"].as_str().unwrap());
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["perms"], serde_json::json!(ALICE_GRANTS));
    let principal = auth
        .verifier()
        .verify_token(second["access_token"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(principal.subject(), "alice");

    // The newest token goes on working, once each.
    let third = auth.refresh(&r2).await;
    assert_eq!(third.status, 200, "{third:?}");
    let r3 = third.json()["refresh_token"].as_str().unwrap().to_owned();
    let fourth = auth.refresh(&r3).await;
    assert_eq!(fourth.status, 200, "{fourth:?}");

    // A refresh may narrow the login's grants, never widen them.
    let narrowed = auth
        .post_form(
            &format!(
                "grant_type=refresh_token&refresh_token={}&scope=orders%3Aacme%3A%2A%3A%2A",
                fourth.json()["refresh_token"].as_str().unwrap()
            ),
            &[],
        )
        .await;
    assert_eq!(narrowed.status, 200, "{narrowed:?}");
    let (_, claims) = decode(narrowed.json()["access_token"].as_str().unwrap());
    assert_eq!(claims["perms"], serde_json::json!(["orders:acme:*:*"]));
    let widened = auth
        .post_form(
            &format!(
                "grant_type=refresh_token&refresh_token={}&scope=auth%3A%3Arotate%3Akey",
                narrowed.json()["refresh_token"].as_str().unwrap()
            ),
            &[],
        )
        .await;
    assert_eq!(widened.status, 400);
    assert_eq!(widened.json()["error"], "invalid_scope");
    // A refused scope does not use the token up.
    let still = auth
        .refresh(narrowed.json()["refresh_token"].as_str().unwrap())
        .await;
    assert_eq!(still.status, 200, "{still:?}");
    auth.stop().await;
}

#[tokio::test]
async fn reusing_a_refresh_token_revokes_its_family() {
    let dir = Data::new("reuse");
    let auth = start(&dir).await;
    let r1 = auth.login("alice", "alice-password").await.json()["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    // Another login: another family, untouched by the reuse below.
    let other = auth.login("alice", "alice-password").await.json()["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let r2 = auth.refresh(&r1).await.json()["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();

    let reused = auth.refresh(&r1).await;
    assert_eq!(reused.status, 400);
    assert_eq!(reused.header("cache-control"), "no-store");
    assert_eq!(reused.json()["error"], "invalid_grant");

    // The newer token of the family stops working too.
    let newer = auth.refresh(&r2).await;
    assert_eq!(newer.status, 400, "{newer:?}");
    assert_eq!(newer.json()["error"], "invalid_grant");

    let unrelated = auth.refresh(&other).await;
    assert_eq!(unrelated.status, 200, "{unrelated:?}");
    auth.stop().await;
}

#[tokio::test]
async fn concurrent_uses_of_one_refresh_token_let_one_through() {
    let dir = Data::new("race");
    let auth = start(&dir).await;
    let token = auth.login("bob", "bob-password").await.json()["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let answers = futures_join(
        (0..4)
            .map(|_| {
                let url = auth.url("/auth/v1/token");
                let form = format!("grant_type=refresh_token&refresh_token={token}");
                tokio::spawn(async move {
                    send(Method::POST, &url, &[("content-type", FORM)], &form)
                        .await
                        .status
                })
            })
            .collect(),
    )
    .await;
    let ok = answers.iter().filter(|s| **s == StatusCode::OK).count();
    assert_eq!(ok, 1, "{answers:?}");
    assert!(
        answers
            .iter()
            .all(|s| *s == StatusCode::OK || *s == StatusCode::BAD_REQUEST),
        "{answers:?}"
    );
    auth.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_refresh_token_used_on_two_instances_at_once_succeeds_once() {
    let dir = Data::new("race-replicas");
    // Two instances on one database (the same SQLite file, or the same
    // Postgres database), as replicas behind a load balancer.
    let first = start(&dir).await;
    let second = start(&dir).await;
    for round in 0..5 {
        let token = first.login("bob", "bob-password").await.json()["refresh_token"]
            .as_str()
            .unwrap()
            .to_owned();
        let form = format!("grant_type=refresh_token&refresh_token={token}");
        let start = std::sync::Arc::new(tokio::sync::Barrier::new(4));
        let answers = futures_join(
            (0..4)
                .map(|i| {
                    let url = [&first, &second][i % 2].url("/auth/v1/token");
                    let (form, start) = (form.clone(), start.clone());
                    tokio::spawn(async move {
                        start.wait().await;
                        send(Method::POST, &url, &[("content-type", FORM)], &form).await
                    })
                })
                .collect(),
        )
        .await;
        let statuses: Vec<_> = answers.iter().map(|a| a.status).collect();
        let won: Vec<_> = answers
            .iter()
            .filter(|a| a.status == StatusCode::OK)
            .collect();
        assert_eq!(won.len(), 1, "round {round}: {statuses:?}");
        assert!(
            statuses
                .iter()
                .all(|s| *s == StatusCode::OK || *s == StatusCode::BAD_REQUEST),
            "round {round}: {statuses:?}"
        );
        // The others were reuses: the family is revoked, the winner's new
        // token with it, on either instance.
        let next = won[0].json()["refresh_token"].as_str().unwrap().to_owned();
        for auth in [&second, &first] {
            let res = auth.refresh(&next).await;
            assert_eq!(res.status, 400, "round {round}: {res:?}");
            assert_eq!(res.json()["error"], "invalid_grant");
        }
    }
    first.stop().await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_starting_together_share_one_signing_key() {
    let dir = Data::new("keys-replicas");
    dir.migrate().await;
    // Three instances on one database without a key start at once: each
    // may find no key and make one, and only one may become current.
    let (a, b, c) = tokio::join!(start(&dir), start(&dir), start(&dir));
    let kids = a.kids().await;
    assert_eq!(kids.len(), 1, "{kids:?}");
    assert_eq!(b.kids().await, kids);
    assert_eq!(c.kids().await, kids);
    // Each signs with it: a token of one verifies against another's key set.
    for (signer, checker) in [(&a, &b), (&b, &c), (&c, &a)] {
        let token = signer.access_token("alice").await;
        assert_eq!(decode(&token).0["kid"], kids[0].as_str());
        let claims = checker.verifier().verify_token(&token).await.unwrap();
        assert_eq!(claims.subject(), "alice");
    }
    for auth in [a, b, c] {
        auth.stop().await;
    }
}

// === deny grants survive narrowing ===

#[tokio::test]
async fn a_narrower_scope_keeps_every_deny_grant() {
    let dir = Data::new("denies");
    let auth = start(&dir).await;
    auth.add_subject(&dir, false, "dora", &DORA_GRANTS).await;
    auth.add_subject(
        &dir,
        true,
        "gate",
        &["mail::send:message", "!mail::send:newsletter"],
    )
    .await;

    // Without a scope: every grant, the deny included.
    let res = auth.login("dora", "password").await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(perms_of(&res), serde_json::json!(DORA_GRANTS));

    // Password grant with a narrower scope.
    let res = auth
        .login_with("dora", "password", "&scope=ticketing%3Aacme%3A%2A%3A%2A")
        .await;
    assert_eq!(res.status, 200, "{res:?}");
    let expected = serde_json::json!(["ticketing:acme:*:*", "!ticketing:acme:delete:*"]);
    assert_eq!(perms_of(&res), expected);
    // The answer says which grants the token has, since they differ.
    assert_eq!(
        res.json()["scope"],
        "ticketing:acme:*:* !ticketing:acme:delete:*"
    );

    // Refresh: the login's scope, and a narrower one still.
    let refresh = res.json()["refresh_token"].as_str().unwrap().to_owned();
    let res = auth.refresh(&refresh).await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(perms_of(&res), expected);
    let login = auth.login("dora", "password").await;
    let res = auth
        .post_form(
            &format!(
                "grant_type=refresh_token&refresh_token={}&scope=orders%3Aacme%3A%2A%3A%2A",
                login.json()["refresh_token"].as_str().unwrap()
            ),
            &[],
        )
        .await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(
        perms_of(&res),
        serde_json::json!(["orders:acme:*:*", "!ticketing:acme:delete:*"])
    );
    // Asking for the deny itself is no widening.
    let res = auth
        .post_form(
            &format!(
                "grant_type=refresh_token&refresh_token={}\
                 &scope=orders%3Aacme%3A%2A%3A%2A+%21ticketing%3Aacme%3Adelete%3A%2A",
                res.json()["refresh_token"].as_str().unwrap()
            ),
            &[],
        )
        .await;
    assert_eq!(res.status, 200, "{res:?}");

    // Client credentials.
    let res = auth
        .post_form(
            "grant_type=client_credentials&scope=mail%3A%3Asend%3Amessage",
            &[("authorization", &basic("gate", "password"))],
        )
        .await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(
        perms_of(&res),
        serde_json::json!(["mail::send:message", "!mail::send:newsletter"])
    );

    // And the chassis enforces it: the narrowed token still denies.
    let token = auth
        .login_with("dora", "password", "&scope=ticketing%3Aacme%3A%2A%3A%2A")
        .await
        .json()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let principal = auth.verifier().verify_token(&token).await.unwrap();
    let delete: chassis::permission::Permission = "ticketing:acme:delete:ticket".parse().unwrap();
    assert!(!principal.grants().decide(&delete).is_allowed());
    auth.stop().await;
}

// === audiences ===

#[tokio::test]
async fn a_token_asked_for_one_service_is_for_that_service_only() {
    let dir = Data::new("audience");
    let auth = start(&dir).await;
    let res = auth
        .login_with("alice", "alice-password", "&audience=ticketing")
        .await;
    assert_eq!(res.status, 200, "{res:?}");
    let token = res.json()["access_token"].as_str().unwrap().to_owned();
    assert_eq!(decode(&token).1["aud"], "ticketing");
    let principal = auth.verifier_for("ticketing").verify_token(&token).await;
    assert_eq!(principal.unwrap().subject(), "alice");
    for other in ["orders", "chassis-demo"] {
        assert_eq!(
            auth.verifier_for(other)
                .verify_token(&token)
                .await
                .unwrap_err()
                .code(),
            "bad_audience",
            "{other}"
        );
    }

    // Without one: the default audience.
    let (_, claims) = decode(&auth.access_token("alice").await);
    assert_eq!(claims["aud"], "chassis-demo");

    // The refresh and client-credentials grants take one too.
    let refresh = res.json()["refresh_token"].as_str().unwrap().to_owned();
    let res = auth
        .post_form(
            &format!("grant_type=refresh_token&refresh_token={refresh}&audience=orders"),
            &[],
        )
        .await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(
        decode(res.json()["access_token"].as_str().unwrap()).1["aud"],
        "orders"
    );
    let res = auth
        .post_form(
            "grant_type=client_credentials&audience=mail",
            &[("authorization", &basic("orders", "orders-secret"))],
        )
        .await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(
        decode(res.json()["access_token"].as_str().unwrap()).1["aud"],
        "mail"
    );

    // An audience that is not a known service, or a resource indicator.
    for extra in [
        "&audience=billing",
        "&audience=ticketing%2Corders",
        "&resource=http%3A%2F%2F127.0.0.1%3A8082%2Fticketing%2Fv1",
    ] {
        let res = auth.login_with("alice", "alice-password", extra).await;
        assert_eq!(res.status, 400, "{extra}: {res:?}");
        assert_eq!(res.header("cache-control"), "no-store");
        assert_eq!(res.json()["error"], "invalid_target", "{extra}");
    }
    auth.stop().await;
}

// === keys ===

#[tokio::test]
async fn the_key_set_serves_the_current_key_and_tokens_verify_with_the_chassis_verifier() {
    let dir = Data::new("jwks");
    let auth = start(&dir).await;
    let res = send(Method::GET, &auth.url("/auth/v1/jwks"), &[], "").await;
    assert_eq!(res.status, 200);
    assert!(res.header("cache-control").contains("max-age="));
    let jwks = res.json();
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "{jwks}");
    let key = &keys[0];
    assert_eq!(key["kty"], "OKP");
    assert_eq!(key["crv"], "Ed25519");
    assert_eq!(key["alg"], "EdDSA");
    assert_eq!(key["use"], "sig");
    assert_eq!(B64URL.decode(key["x"].as_str().unwrap()).unwrap().len(), 32);
    assert!(key.get("d").is_none(), "no private part: {key}");

    let verifier = auth.verifier();
    let token = auth.access_token("alice").await;
    let principal = verifier.verify_token(&token).await.unwrap();
    assert_eq!(principal.subject(), "alice");
    assert_eq!(principal.kind(), PrincipalKind::User);
    assert_eq!(principal.grants().len(), 2);

    let service = auth
        .post_form(
            "grant_type=client_credentials",
            &[("authorization", &basic("orders", "orders-secret"))],
        )
        .await
        .json();
    let principal = verifier
        .verify_token(service["access_token"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(principal.kind(), PrincipalKind::Service);
    assert_eq!(principal.subject(), "orders");

    // A verifier for another audience refuses them.
    let other = Verifier::builder()
        .jwks(
            "http://127.0.0.1:8081",
            "someone-else",
            &auth.url("/auth/v1/jwks"),
        )
        .algorithms(&[Algorithm::EdDSA])
        .build()
        .unwrap();
    assert_eq!(
        other.verify_token(&token).await.unwrap_err().code(),
        "bad_audience"
    );
    auth.stop().await;
}

#[tokio::test]
async fn rotation_needs_the_permission() {
    let dir = Data::new("rotate-authz");
    let auth = start(&dir).await;
    let res = auth.rotate(None).await;
    assert_eq!(res.status, 401, "{res:?}");
    assert_eq!(res.header("content-type"), "application/problem+json");

    let alice = auth.access_token("alice").await;
    let res = auth.rotate(Some(&alice)).await;
    assert_eq!(res.status, 403, "{res:?}");
    assert_eq!(res.header("content-type"), "application/problem+json");

    let admin = auth.access_token("admin").await;
    let res = auth.rotate(Some(&admin)).await;
    assert_eq!(res.status, 200, "{res:?}");
    auth.stop().await;
}

#[tokio::test]
async fn rotation_keeps_the_previous_key_published() {
    let dir = Data::new("rotate");
    let auth = start(&dir).await;
    let first_kid = auth.kids().await[0].clone();
    let before = auth.access_token("alice").await;
    assert_eq!(decode(&before).0["kid"].as_str(), Some(first_kid.as_str()));

    let admin = auth.access_token("admin").await;
    let res = auth.rotate(Some(&admin)).await;
    assert_eq!(res.status, 200, "{res:?}");
    let rotated = res.json();
    let new_kid = rotated["kid"].as_str().unwrap().to_owned();
    assert_ne!(new_kid, first_kid);
    assert_eq!(rotated["previous_kid"].as_str(), Some(first_kid.as_str()));
    assert_eq!(auth.kids().await, [new_kid.clone(), first_kid.clone()]);

    let after = auth.access_token("alice").await;
    assert_eq!(decode(&after).0["kid"].as_str(), Some(new_kid.as_str()));
    let verifier = auth.verifier();
    for token in [&before, &after] {
        assert_eq!(
            verifier.verify_token(token).await.unwrap().subject(),
            "alice"
        );
    }
    // The service accepts tokens signed with the new key on its own route.
    let admin_after = auth.access_token("admin").await;
    let mut answer = auth.rotate(Some(&admin_after)).await;
    // Its own verifier fetches the key set again after an unknown kid
    // within a second; allow for that.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while answer.status == 401 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        answer = auth.rotate(Some(&admin_after)).await;
    }
    assert_eq!(answer.status, 200, "{answer:?}");
    auth.stop().await;
}

#[tokio::test]
async fn keys_rotate_when_due_and_retired_keys_leave_after_the_token_lifetime() {
    let dir = Data::new("due");
    let auth = start_with(&dir, |s| {
        s.key_rotate = Duration::from_secs(1);
        s.key_check = Duration::from_secs(1);
        s.token_ttl = Duration::from_secs(3600);
    })
    .await;
    let first = auth.kids().await[0].clone();
    eventually("a rotation", || async {
        let kids = auth.kids().await;
        kids[0] != first && kids.contains(&first)
    })
    .await;
    auth.stop().await;

    let dir = Data::new("expiry");
    let auth = start_with(&dir, |s| s.token_ttl = Duration::from_secs(1)).await;
    let admin = auth.access_token("admin").await;
    assert_eq!(auth.rotate(Some(&admin)).await.status, 200);
    eventually("the retired key to leave the key set", || async {
        auth.kids().await.len() == 1
    })
    .await;
    auth.stop().await;
}

// === discovery ===

#[tokio::test]
async fn the_discovery_document_lives_under_the_issuer_and_names_the_key_set() {
    let dir = Data::new("discovery");
    let auth = start_with(&dir, |s| {
        s.issuer = format!("{}/auth/v1", s.public_url.as_deref().unwrap());
    })
    .await;
    let issuer = auth.url("/auth/v1");
    let res = send(
        Method::GET,
        &format!("{issuer}/.well-known/openid-configuration"),
        &[],
        "",
    )
    .await;
    assert_eq!(res.status, 200, "{res:?}");
    assert!(res.header("content-type").starts_with("application/json"));
    let doc = res.json();
    assert_eq!(doc["issuer"].as_str(), Some(issuer.as_str()));
    assert_eq!(
        doc["token_endpoint"].as_str(),
        Some(format!("{issuer}/token").as_str())
    );
    for field in [
        "grant_types_supported",
        "token_endpoint_auth_methods_supported",
        "response_types_supported",
        "subject_types_supported",
        "id_token_signing_alg_values_supported",
    ] {
        assert!(doc[field].is_array(), "{field}: {doc}");
    }
    assert!(
        doc["grant_types_supported"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!(
                "urn:ietf:params:oauth:grant-type:token-exchange"
            )),
        "{doc}"
    );
    assert_eq!(
        doc["id_token_signing_alg_values_supported"],
        serde_json::json!(["EdDSA"])
    );

    // The key set it names verifies the tokens of that issuer.
    let jwks = send(Method::GET, doc["jwks_uri"].as_str().unwrap(), &[], "").await;
    assert_eq!(jwks.status, 200, "{jwks:?}");
    assert_eq!(jwks.json(), auth.jwks().await);
    let token = auth.access_token("alice").await;
    assert_eq!(decode(&token).1["iss"].as_str(), Some(issuer.as_str()));
    let verifier = Verifier::builder()
        .jwks(&issuer, "chassis-demo", doc["jwks_uri"].as_str().unwrap())
        .algorithms(&[Algorithm::EdDSA])
        .build()
        .unwrap();
    assert_eq!(
        verifier.verify_token(&token).await.unwrap().subject(),
        "alice"
    );

    // The driver client reads it, and the service's own protected route
    // still takes its tokens.
    use auth::client::AuthClient;
    use chassis::client::{CallContext, Downstream};
    let client = AuthClient::new(Downstream::builder("auth", &auth.url("")).build().unwrap());
    let read = client.discovery(&CallContext::background()).await.unwrap();
    assert_eq!(read.issuer, issuer);
    let admin = auth.access_token("admin").await;
    assert_eq!(auth.rotate(Some(&admin)).await.status, 200);
    auth.stop().await;
}

// === restarts ===

#[tokio::test]
async fn keys_and_users_survive_a_restart_and_the_demo_grants_change_nothing() {
    let dir = Data::new("restart");
    let auth = start(&dir).await;
    let kids = auth.kids().await;
    let before = auth.access_token("alice").await;
    auth.stop().await;

    let hashes = || async {
        let db = dir.open().await;
        let users: Vec<(String, String)> =
            sqlx::query_as("SELECT username, password_hash FROM users ORDER BY username")
                .fetch_all(db.pool())
                .await
                .unwrap();
        let clients: Vec<(String, String)> =
            sqlx::query_as("SELECT client_id, secret_hash FROM clients ORDER BY client_id")
                .fetch_all(db.pool())
                .await
                .unwrap();
        db.close().await;
        (users, clients)
    };
    let seeded = hashes().await;
    let names = |rows: &[(String, String)]| rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(&seeded.0), ["admin", "alice", "bob"]);
    assert_eq!(names(&seeded.1), ["mail", "orders", "ticketing"]);

    // Same data directory: the demo grants, applied again, change nothing.
    let auth = start(&dir).await;
    assert_eq!(auth.kids().await, kids, "the same key after a restart");
    let after = auth.access_token("alice").await;
    assert_eq!(decode(&after).0["kid"], decode(&before).0["kid"]);
    assert_eq!(
        auth.verifier()
            .verify_token(&before)
            .await
            .unwrap()
            .subject(),
        "alice"
    );
    let res = auth
        .post_form(
            "grant_type=client_credentials",
            &[("authorization", &basic("orders", "orders-secret"))],
        )
        .await;
    assert_eq!(res.status, 200, "{res:?}");
    auth.stop().await;
    assert_eq!(
        hashes().await,
        seeded,
        "no row added, no secret hashed again"
    );
}

#[tokio::test]
async fn without_the_seed_nobody_can_log_in() {
    let dir = Data::new("noseed");
    // The default: no demo users with their well-known passwords.
    let auth = start_with(&dir, |s| {
        s.seed_demo = Settings::with_data_dir("/unused").seed_demo;
    })
    .await;
    let res = auth.login("alice", "alice-password").await;
    assert_eq!(res.status, 400);
    assert_eq!(res.json()["error"], "invalid_grant");
    assert_eq!(auth.kids().await.len(), 1, "a key all the same");
    auth.stop().await;
}

// === the driver client ===

#[tokio::test]
async fn the_driver_client_speaks_the_api() {
    use auth::client::{AuthClient, token_source};
    use chassis::client::{CallContext, Downstream};

    let dir = Data::new("client");
    let auth = start(&dir).await;
    let client = AuthClient::new(Downstream::builder("auth", &auth.url("")).build().unwrap());
    let cx = CallContext::background();

    let tokens = client
        .password_login(&cx, "alice", "alice-password")
        .await
        .unwrap();
    assert_eq!(tokens.token_type, "Bearer");
    let refresh = tokens.refresh_token.clone().unwrap();
    let renewed = client.refresh(&cx, &refresh).await.unwrap();
    assert_ne!(renewed.refresh_token.as_deref(), Some(refresh.as_str()));
    let err = client.refresh(&cx, &refresh).await.unwrap_err();
    assert_eq!(err.oauth_error(), Some("invalid_grant"));
    let err = client
        .password_login(&cx, "alice", "wrong")
        .await
        .unwrap_err();
    assert_eq!(err.oauth_error(), Some("invalid_grant"));

    let jwks = client.jwks(&cx).await.unwrap();
    assert_eq!(jwks.keys.len(), 1);
    assert_eq!(jwks.keys[0].key_use, "sig");

    // Rotation on behalf of a caller, who must hold the grant.
    let verifier = auth.verifier();
    let admin = client
        .password_login(&cx, "admin", "admin-password")
        .await
        .unwrap();
    let principal = verifier.verify_token(&admin.access_token).await.unwrap();
    let rotated = client
        .rotate_key(&cx.clone().with_principal(principal))
        .await
        .unwrap();
    assert_eq!(
        rotated.previous_kid.as_deref(),
        Some(jwks.keys[0].kid.as_str())
    );

    // A service's own tokens, signed with the new key: a fresh verifier
    // (one that fetched the set within its 30 s cooldown would answer
    // unknown_kid until it may fetch again).
    let verifier = auth.verifier();
    let tokens = token_source(
        &auth.url(""),
        "orders",
        chassis::config::Secret::new("orders-secret".to_owned()),
    )
    .unwrap();
    let header = tokens.authorization().await.unwrap();
    let bearer = header.to_str().unwrap().strip_prefix("Bearer ").unwrap();
    let principal = verifier.verify_token(bearer).await.unwrap();
    assert_eq!(principal.subject(), "orders");
    let refused = token_source(
        &auth.url(""),
        "orders",
        chassis::config::Secret::new("nope".to_owned()),
    )
    .unwrap()
    .authorization()
    .await
    .unwrap_err();
    assert!(refused.to_string().contains("invalid_client"), "{refused}");
    assert!(!refused.to_string().contains("nope"));

    // The admin API, on behalf of admin (who holds its permissions).
    let admin_cx = cx
        .clone()
        .with_principal(verifier.verify_token(&admin.access_token).await.unwrap());
    let registered = client
        .register_client(&admin_cx, "lessons", &["ticketing:*:view:ticket"])
        .await
        .unwrap();
    assert_eq!(registered.grants, ["ticketing:*:view:ticket"]);
    assert!(!format!("{registered:?}").contains(&registered.client_secret));
    let replaced = client
        .replace_client_grants(&admin_cx, "lessons", &["mail::send:message"])
        .await
        .unwrap();
    assert_eq!(replaced.managed_by, "api");
    let read = client.client_grants(&admin_cx, "lessons").await.unwrap();
    assert_eq!(read.grants, ["mail::send:message"]);
    let header = token_source(
        &auth.url(""),
        "lessons",
        chassis::config::Secret::new(registered.client_secret.clone()),
    )
    .unwrap()
    .authorization()
    .await
    .unwrap();
    let bearer = header.to_str().unwrap().strip_prefix("Bearer ").unwrap();
    let principal = verifier.verify_token(bearer).await.unwrap();
    assert_eq!(principal.subject(), "lessons");
    assert_eq!(
        decode(bearer).1["perms"],
        serde_json::json!(["mail::send:message"])
    );
    let err = client
        .replace_client_grants(&admin_cx, "orders", &[])
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            auth::client::AuthClientError::Call(chassis::client::ClientError::Status { status, .. })
                if *status == 409
        ),
        "{err:?}"
    );
    auth.stop().await;
}
