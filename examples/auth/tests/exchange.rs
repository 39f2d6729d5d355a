//! Token exchange (RFC 8693) over real sockets: a service client trades a
//! user's token for one to another audience, never with more grants.

mod support;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64URL};
use chassis::auth::PrincipalKind;
use jsonwebtoken::Algorithm;
use support::{
    ACCESS_TOKEN_TYPE, ALICE_GRANTS, DORA_GRANTS, Data, TOKEN_EXCHANGE, basic, decode,
    manual_clock, perms_of, start, start_clocked,
};

#[tokio::test]
async fn an_authorised_client_exchanges_a_users_token_for_another_audience() {
    let dir = Data::new("exchange");
    let clock = manual_clock();
    let auth = start_clocked(&dir, clock.clone(), |_| {}).await;
    let login = auth
        .login_with("alice", "alice-password", "&audience=orders")
        .await;
    let subject = login.json()["access_token"].as_str().unwrap().to_owned();
    let (_, subject_claims) = decode(&subject);

    let res = auth
        .exchange(("orders", "orders-secret"), &subject, "&audience=ticketing")
        .await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(res.header("cache-control"), "no-store");
    let body = res.json();
    assert_eq!(
        body["issued_token_type"],
        "urn:ietf:params:oauth:token-type:access_token"
    );
    assert_eq!(body["token_type"], "Bearer");
    assert!(body.get("refresh_token").is_none(), "{body}");
    let exchanged = body["access_token"].as_str().unwrap();
    let (header, claims) = decode(exchanged);
    assert_eq!(header["typ"], "at+jwt");
    assert_eq!(claims["aud"], "ticketing");
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["kind"], "user");
    assert_eq!(claims["iss"], subject_claims["iss"]);
    assert_eq!(claims["perms"], serde_json::json!(ALICE_GRANTS));
    assert_eq!(claims["act"], serde_json::json!({"sub": "orders"}));
    assert_ne!(claims["jti"], subject_claims["jti"]);
    let principal = auth
        .verifier_for("ticketing")
        .verify_token(exchanged)
        .await
        .unwrap();
    assert_eq!(principal.subject(), "alice");
    assert_eq!(principal.kind(), PrincipalKind::User);

    // Never outliving the subject token: 600 s later, 300 s are left.
    clock.advance(600);
    let res = auth
        .exchange(("orders", "orders-secret"), &subject, "&audience=mail")
        .await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(res.json()["expires_in"], 300);
    let (_, claims) = decode(res.json()["access_token"].as_str().unwrap());
    assert_eq!(claims["exp"], subject_claims["exp"]);

    // An exchanged token exchanged again names both actors.
    let again = auth
        .exchange(("orders", "orders-secret"), exchanged, "&audience=mail")
        .await;
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(
        perms_of(&again),
        serde_json::json!(ALICE_GRANTS),
        "never more than the subject token"
    );
    let (_, claims) = decode(again.json()["access_token"].as_str().unwrap());
    assert_eq!(
        claims["act"],
        serde_json::json!({"sub": "orders", "act": {"sub": "orders"}})
    );

    // Past the subject token's expiry: refused.
    clock.advance(300);
    let res = auth
        .exchange(("orders", "orders-secret"), &subject, "&audience=ticketing")
        .await;
    assert_eq!(res.status, 400, "{res:?}");
    assert_eq!(
        res.json(),
        serde_json::json!({"error": "invalid_request", "error_description": "the subject token is not valid"})
    );
    auth.stop().await;
}

#[tokio::test]
async fn exchanged_tokens_never_have_more_than_the_subject_token_and_keep_its_denies() {
    let dir = Data::new("exchange-perms");
    let auth = start(&dir).await;
    auth.add_subject(&dir, false, "dora", &DORA_GRANTS).await;
    let exchange = |subject: String, extra: &'static str| {
        let auth = &auth;
        async move {
            auth.exchange(("orders", "orders-secret"), &subject, extra)
                .await
        }
    };

    // A subject token narrowed at login: the exchange cannot widen it, and
    // the deny goes with it.
    let narrowed = auth
        .login_with("dora", "password", "&scope=ticketing%3Aacme%3A%2A%3A%2A")
        .await;
    let subject = narrowed.json()["access_token"].as_str().unwrap().to_owned();
    let res = exchange(subject.clone(), "&audience=ticketing").await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(
        perms_of(&res),
        serde_json::json!(["ticketing:acme:*:*", "!ticketing:acme:delete:*"])
    );
    let res = exchange(
        subject.clone(),
        "&audience=ticketing&scope=orders%3Aacme%3A%2A%3A%2A",
    )
    .await;
    assert_eq!(res.status, 400, "{res:?}");
    assert_eq!(res.json()["error"], "invalid_scope");

    // A narrower scope on the exchange keeps the deny too.
    let full = auth.access_token_of("dora", "password").await;
    let res = exchange(full, "&audience=mail&scope=orders%3Aacme%3A%2A%3A%2A").await;
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(
        perms_of(&res),
        serde_json::json!(["orders:acme:*:*", "!ticketing:acme:delete:*"])
    );
    auth.stop().await;
}

#[tokio::test]
async fn token_exchange_refuses_bad_clients_audiences_and_subject_tokens() {
    let dir = Data::new("exchange-refused");
    let auth = start(&dir).await;
    let subject = auth.access_token("alice").await;

    // A client without the grant, or without it for that audience.
    for (client, audience) in [
        (("mail", "mail-secret"), "ticketing"),
        (("orders", "orders-secret"), "orders"),
        (("orders", "orders-secret"), "auth"),
    ] {
        let res = auth
            .exchange(client, &subject, &format!("&audience={audience}"))
            .await;
        assert_eq!(res.status, 400, "{client:?} {audience}: {res:?}");
        assert_eq!(res.json()["error"], "unauthorized_client");
    }
    // A client that fails authentication.
    let res = auth
        .exchange(("orders", "guess"), &subject, "&audience=ticketing")
        .await;
    assert_eq!(res.status, 401, "{res:?}");
    assert_eq!(res.json()["error"], "invalid_client");
    // An unknown audience; none at all.
    let res = auth
        .exchange(("orders", "orders-secret"), &subject, "&audience=billing")
        .await;
    assert_eq!(res.status, 400);
    assert_eq!(res.json()["error"], "invalid_target");
    let res = auth
        .exchange(("orders", "orders-secret"), &subject, "")
        .await;
    assert_eq!(res.status, 400);
    assert_eq!(res.json()["error"], "invalid_request");

    // Forged subject tokens: changed claims, another key, no signature,
    // not a token at all.
    let (h, rest) = subject.split_once('.').unwrap();
    let (_, sig) = rest.split_once('.').unwrap();
    let (_, mut claims) = decode(&subject);
    claims["perms"] = serde_json::json!(["*:*:*:*"]);
    let widened = format!(
        "{h}.{}.{sig}",
        B64URL.encode(serde_json::to_vec(&claims).unwrap())
    );
    let other_key = {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pkcs8 = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let mut header = jsonwebtoken::Header::new(Algorithm::EdDSA);
        header.typ = Some("at+jwt".to_owned());
        header.kid = decode(&subject).0["kid"].as_str().map(str::to_owned);
        let (_, claims) = decode(&subject);
        jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_ed_der(pkcs8.as_ref()),
        )
        .unwrap()
    };
    let unsigned = format!("{h}.{}.", rest.split_once('.').unwrap().0);
    for (what, forged) in [
        ("changed claims", widened.as_str()),
        ("another key", other_key.as_str()),
        ("no signature", unsigned.as_str()),
        ("not a token", "not-a-token"),
    ] {
        let res = auth
            .exchange(("orders", "orders-secret"), forged, "&audience=ticketing")
            .await;
        assert_eq!(res.status, 400, "{what}: {res:?}");
        assert_eq!(
            res.json(),
            serde_json::json!({"error": "invalid_request", "error_description": "the subject token is not valid"}),
            "{what}"
        );
    }
    // A subject token type this service does not take; an actor token.
    let res = auth
        .post_form(
            &format!(
                "grant_type={TOKEN_EXCHANGE}&subject_token={subject}&audience=ticketing\
                 &subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Aid_token"
            ),
            &[("authorization", &basic("orders", "orders-secret"))],
        )
        .await;
    assert_eq!(res.json()["error"], "invalid_request", "{res:?}");
    let res = auth
        .exchange(
            ("orders", "orders-secret"),
            &subject,
            &format!(
                "&audience=ticketing&actor_token={subject}&actor_token_type={ACCESS_TOKEN_TYPE}"
            ),
        )
        .await;
    assert_eq!(res.json()["error"], "invalid_request", "{res:?}");
    auth.stop().await;
}
