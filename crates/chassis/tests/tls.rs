//! Outbound TLS against real HTTPS servers on loopback, with certificates
//! made at test time: downstream calls, the token source, key sets and
//! OpenID discovery.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{Request, State},
    http::header,
    response::IntoResponse,
    routing::{get, post},
};
use chassis::{
    auth::{JwksOptions, Verifier},
    client::{CallContext, ClientError, Downstream, TokenError, TokenSource},
    config::{Config, Env, Secret},
    testing::{TestIssuer, TestPki},
    tls::ClientTls,
};
use serde_json::json;

/// Answers with the HTTP version the request arrived in.
fn version_router() -> Router {
    Router::new().route(
        "/version",
        get(|req: Request| async move { format!("{:?}", req.version()) }),
    )
}

fn downstream(url: &str, tls: ClientTls) -> Downstream {
    Downstream::builder("tls-peer", url)
        .max_attempts(1)
        .attempt_timeout(Duration::from_secs(5))
        .tls(tls)
        .build()
        .unwrap()
}

async fn version_over(d: &Downstream) -> Result<String, ClientError> {
    let res = d
        .anonymous(&CallContext::background())
        .get("/version")
        .send()
        .await?;
    Ok(String::from_utf8(res.body().to_vec()).unwrap())
}

/// The message of a connection failure, which must name the TLS cause.
async fn refusal(d: &Downstream) -> String {
    match version_over(d).await {
        Err(e @ ClientError::Connection { .. }) => e.to_string(),
        other => panic!("expected a connection error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_private_ca_is_trusted_and_http2_is_negotiated() {
    let pki = TestPki::new("private CA");
    let cert = pki.server_cert(&["localhost", "127.0.0.1"]);
    let h2 = cert.serve(version_router(), true).await;
    let h1 = cert.serve(version_router(), false).await;

    let d = downstream(
        &format!("https://localhost:{}", h2.port()),
        pki.client_tls(),
    );
    assert_eq!(version_over(&d).await.unwrap(), "HTTP/2.0", "h2 by ALPN");
    let d = downstream(
        &format!("https://127.0.0.1:{}", h2.port()),
        pki.client_tls(),
    );
    assert_eq!(
        version_over(&d).await.unwrap(),
        "HTTP/2.0",
        "IP address names"
    );
    let d = downstream(
        &format!("https://localhost:{}", h1.port()),
        pki.client_tls(),
    );
    assert_eq!(
        version_over(&d).await.unwrap(),
        "HTTP/1.1",
        "HTTP/1.1 when the server does not take h2"
    );
}

#[tokio::test]
async fn the_ca_file_setting_is_what_is_trusted() {
    let pki = TestPki::new("file CA");
    let addr = pki
        .server_cert(&["localhost"])
        .serve(version_router(), true)
        .await;
    let dir = std::env::temp_dir().join(format!("chassis-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("ca.pem");
    std::fs::write(&file, pki.ca_pem()).unwrap();
    let env = Env::from_pairs([("CHASSIS_TLS_CA_FILE", file.to_str().unwrap())]);
    let config = Config::from_env(&env).unwrap();
    let tls = ClientTls::from_ca_file(config.tls_ca_file.as_deref()).unwrap();
    let d = downstream(&format!("https://localhost:{}", addr.port()), tls);
    assert_eq!(version_over(&d).await.unwrap(), "HTTP/2.0");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn an_unknown_ca_is_refused() {
    let trusted = TestPki::new("trusted CA");
    let other = TestPki::new("someone else's CA");
    let addr = other
        .server_cert(&["localhost"])
        .serve(version_router(), true)
        .await;
    let d = downstream(
        &format!("https://localhost:{}", addr.port()),
        trusted.client_tls(),
    );
    let message = refusal(&d).await;
    assert!(message.contains("UnknownIssuer"), "{message}");
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let pki = TestPki::new("CA");
    let addr = pki
        .expired_server_cert(&["localhost"])
        .serve(version_router(), true)
        .await;
    let d = downstream(
        &format!("https://localhost:{}", addr.port()),
        pki.client_tls(),
    );
    let message = refusal(&d).await;
    assert!(message.contains("certificate expired"), "{message}");
}

#[tokio::test]
async fn a_wrong_host_name_is_refused() {
    let pki = TestPki::new("CA");
    let addr = pki
        .server_cert(&["ticketing.internal"])
        .serve(version_router(), true)
        .await;
    let d = downstream(
        &format!("https://localhost:{}", addr.port()),
        pki.client_tls(),
    );
    let message = refusal(&d).await;
    assert!(
        message.contains("not valid for name \"localhost\""),
        "{message}"
    );
}

/// A `dns+https://` downstream connects to the addresses of its name but
/// verifies the certificate for the name (the certificate has no IP in it).
#[tokio::test]
async fn a_dns_name_is_verified_as_the_name_not_its_address() {
    let pki = TestPki::new("CA");
    let addr = pki
        .server_cert(&["localhost"])
        .serve(version_router(), true)
        .await;
    let d = downstream(
        &format!("dns+https://localhost:{}", addr.port()),
        pki.client_tls(),
    );
    assert_eq!(version_over(&d).await.unwrap(), "HTTP/2.0");
    assert!(
        d.endpoints()
            .iter()
            .any(|e| e.address == format!("127.0.0.1:{}", addr.port()))
    );

    let other = pki
        .server_cert(&["ticketing.internal"])
        .serve(version_router(), true)
        .await;
    let d = downstream(
        &format!("dns+https://localhost:{}", other.port()),
        pki.client_tls(),
    );
    let message = refusal(&d).await;
    assert!(
        message.contains("not valid for name \"localhost\""),
        "{message}"
    );
}

#[tokio::test]
async fn plain_http_and_other_schemes() {
    assert!(
        Downstream::builder("x", "ftp://127.0.0.1:1")
            .build()
            .is_err()
    );
    assert!(
        Downstream::builder("x", "https://127.0.0.1:1")
            .build()
            .is_ok()
    );
    assert!(
        Downstream::builder("x", "http://127.0.0.1:1")
            .build()
            .is_ok()
    );
}

#[tokio::test]
async fn the_token_source_fetches_over_https() {
    let pki = TestPki::new("CA");
    let fetches = Arc::new(AtomicUsize::new(0));
    let router = Router::new()
        .route(
            "/token",
            post(|State(n): State<Arc<AtomicUsize>>| async move {
                n.fetch_add(1, Ordering::SeqCst);
                Json(json!({"access_token": "t-1", "token_type": "Bearer", "expires_in": 300}))
            }),
        )
        .with_state(fetches.clone());
    let addr = pki.server_cert(&["localhost"]).serve(router, true).await;
    let url = format!("https://localhost:{}/token", addr.port());

    let tokens = TokenSource::client_credentials(&url, "orders", Secret::new("s".to_owned()))
        .unwrap()
        .tls(&pki.client_tls());
    assert_eq!(tokens.authorization().await.unwrap(), "Bearer t-1");

    // Without the CA the secret is never sent, and the error says why.
    let untrusting = TokenSource::client_credentials(&url, "orders", Secret::new("s".to_owned()))
        .unwrap()
        .tls(&ClientTls::new(None).unwrap());
    match untrusting.authorization().await {
        Err(TokenError::Unreachable { reason, .. }) => {
            assert!(reason.contains("UnknownIssuer"), "{reason}");
        }
        other => panic!("expected unreachable, got {other:?}"),
    }
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
}

/// An identity provider over HTTPS: a discovery document naming `claimed`
/// as its issuer and a key set at a path only the document tells.
struct Provider {
    issuer: String,
    document_hits: Arc<AtomicUsize>,
    jwks_hits: Arc<AtomicUsize>,
}

async fn provider(pki: &TestPki, claimed: Option<&str>, test_issuer: &TestIssuer) -> Provider {
    let document_hits = Arc::new(AtomicUsize::new(0));
    let jwks_hits = Arc::new(AtomicUsize::new(0));
    // The issuer names the port, known once the server is up.
    let cell: Arc<std::sync::OnceLock<String>> = Arc::default();
    let jwks = test_issuer.jwks();
    let router = Router::new()
        .route(
            "/realms/acme/.well-known/openid-configuration",
            get({
                let (hits, cell) = (document_hits.clone(), cell.clone());
                let claimed = claimed.map(str::to_owned);
                move || async move {
                    hits.fetch_add(1, Ordering::SeqCst);
                    let issuer = cell.get().cloned().unwrap_or_default();
                    Json(json!({
                        "issuer": claimed.unwrap_or_else(|| issuer.clone()),
                        "jwks_uri": format!("{issuer}/protocol/certs/v7"),
                        "token_endpoint": format!("{issuer}/protocol/token"),
                    }))
                }
            }),
        )
        .route(
            "/realms/acme/protocol/certs/v7",
            get({
                let hits = jwks_hits.clone();
                move || async move {
                    hits.fetch_add(1, Ordering::SeqCst);
                    (
                        [(header::CONTENT_TYPE, "application/json")],
                        jwks.to_string(),
                    )
                        .into_response()
                }
            }),
        );
    let addr = pki.server_cert(&["localhost"]).serve(router, true).await;
    let issuer = format!("https://localhost:{}/realms/acme", addr.port());
    cell.set(issuer.clone()).unwrap();
    Provider {
        issuer,
        document_hits,
        jwks_hits,
    }
}

fn quick() -> JwksOptions {
    JwksOptions {
        cold_retry: Duration::ZERO,
        ..JwksOptions::default()
    }
}

#[tokio::test]
async fn discovery_finds_the_key_set_from_the_issuer_alone() {
    let pki = TestPki::new("IdP CA");
    let signer = TestIssuer::new();
    let p = provider(&pki, None, &signer).await;
    let issuer = TestIssuer::with(&p.issuer, "ticketing");
    let verifier = Verifier::builder()
        .discover(&p.issuer, "ticketing")
        .tls(pki.client_tls())
        .jwks_options(quick())
        .build()
        .unwrap();
    let token = issuer.user_token("ann", &["ticketing:acme:view:ticket"]);
    let principal = verifier.verify_token(&token).await.unwrap();
    assert_eq!(principal.subject(), "ann");
    assert_eq!(p.document_hits.load(Ordering::SeqCst), 1);
    assert_eq!(
        p.jwks_hits.load(Ordering::SeqCst),
        1,
        "keys come from the discovered jwks_uri"
    );
    // Readiness is up.
    for (name, check, _) in verifier.health_checks() {
        use chassis::health::Check as _;
        assert!(check.check().await.is_ok(), "{name}");
    }
}

#[tokio::test]
async fn an_issuer_mismatch_keeps_the_service_unready() {
    let pki = TestPki::new("IdP CA");
    let signer = TestIssuer::new();
    let p = provider(&pki, Some("https://evil.example/realms/acme"), &signer).await;
    let issuer = TestIssuer::with(&p.issuer, "ticketing");
    let verifier = Verifier::builder()
        .discover(&p.issuer, "ticketing")
        .tls(pki.client_tls())
        .jwks_options(quick())
        .build()
        .unwrap();
    let token = issuer.user_token("ann", &[]);
    assert_eq!(
        verifier.verify_token(&token).await.unwrap_err().code(),
        "jwks_unavailable"
    );
    for (_, check, _) in verifier.health_checks() {
        use chassis::health::Check as _;
        assert!(check.check().await.is_err(), "not ready");
    }
    assert_eq!(
        p.jwks_hits.load(Ordering::SeqCst),
        0,
        "no key is fetched from a document naming another issuer"
    );
}

#[tokio::test]
async fn discovery_over_an_untrusted_certificate_loads_nothing() {
    let pki = TestPki::new("IdP CA");
    let signer = TestIssuer::new();
    let p = provider(&pki, None, &signer).await;
    let issuer = TestIssuer::with(&p.issuer, "ticketing");
    let verifier = Verifier::builder()
        .discover(&p.issuer, "ticketing")
        .tls(ClientTls::new(None).unwrap())
        .jwks_options(quick())
        .build()
        .unwrap();
    let token = issuer.user_token("ann", &[]);
    assert_eq!(
        verifier.verify_token(&token).await.unwrap_err().code(),
        "jwks_unavailable"
    );
    assert_eq!(
        p.document_hits.load(Ordering::SeqCst),
        0,
        "no handshake, no request"
    );
}
