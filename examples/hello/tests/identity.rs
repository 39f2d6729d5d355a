//! The `hello` binary behind a private identity provider over HTTPS: it is
//! configured with the issuer alone, finds the keys by OpenID discovery, and
//! trusts the provider's CA only through `CHASSIS_TLS_CA_FILE`.

use std::{process::Command, time::Duration};

use axum::{Json, Router, routing::get};
use chassis::testing::{ServiceProcess, TestIssuer, TestPki};
use serde_json::json;

/// An identity provider on loopback HTTPS with a discovery document and a
/// key set; returns its issuer URL.
async fn provider(pki: &TestPki) -> String {
    let cert = pki.server_cert(&["localhost"]);
    // Bound first, so the documents can name the port.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let issuer = format!("https://localhost:{port}/realms/demo");
    let jwks = TestIssuer::new().jwks();
    let doc = json!({
        "issuer": issuer,
        "jwks_uri": format!("{issuer}/certs"),
    });
    let app = Router::new()
        .route(
            "/realms/demo/.well-known/openid-configuration",
            get(move || {
                let doc = doc.clone();
                async move { Json(doc) }
            }),
        )
        .route(
            "/realms/demo/certs",
            get(move || {
                let jwks = jwks.clone();
                async move { Json(jwks) }
            }),
        );
    cert.serve_on(listener, app, true);
    issuer
}

async fn ready(addr: &str) -> u16 {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let uri: http::Uri = format!("http://{addr}/health/ready").parse().unwrap();
    client.get(uri).await.map_or(0, |r| r.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_issuer_alone_and_a_private_ca_make_the_service_ready() {
    let pki = TestPki::new("corporate CA");
    let issuer = provider(&pki).await;
    let dir = std::env::temp_dir().join(format!("hello-idp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, pki.ca_pem()).unwrap();
    let env = |with_ca: bool| {
        let mut env = vec![
            ("CHASSIS_AUTH_ISSUER", issuer.clone()),
            ("CHASSIS_AUTH_AUDIENCE", "hello".to_owned()),
            ("CHASSIS_SHUTDOWN_GRACE_SECS", "5".to_owned()),
        ];
        if with_ca {
            env.push(("CHASSIS_TLS_CA_FILE", ca.display().to_string()));
        }
        env
    };
    let spawn = |env: Vec<(&'static str, String)>| {
        tokio::task::spawn_blocking(move || {
            let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            ServiceProcess::spawn(env!("CARGO_BIN_EXE_hello"), &pairs)
        })
    };

    // With the CA: discovery, then the key set, then ready.
    let trusting = spawn(env(true)).await.unwrap();
    let mut up = false;
    for _ in 0..200 {
        if ready(trusting.addr()).await == 200 {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lines = tokio::task::spawn_blocking(move || trusting.stop(Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(up, "never ready: {lines:#?}");
    assert!(
        lines.iter().any(|l| l.contains("issuer discovered")),
        "{lines:#?}"
    );

    // Without it: the provider's certificate is not trusted, the service
    // stays unready, and the log says why.
    let untrusting = spawn(env(false)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(ready(untrusting.addr()).await, 503);
    let lines = tokio::task::spawn_blocking(move || untrusting.stop(Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("key set fetch failed") && l.contains("UnknownIssuer")),
        "{lines:#?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unreadable_ca_file_stops_start_up() {
    let out = Command::new(env!("CARGO_BIN_EXE_hello"))
        .env("CHASSIS_TLS_CA_FILE", "/nonexistent/ca.pem")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("CHASSIS_TLS_CA_FILE") && stderr.contains("cannot read CA file"),
        "{stderr}"
    );
}
