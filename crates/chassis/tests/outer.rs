//! A service's own outer layers (tower-http's CORS and compression) over a
//! real socket: outside the guard and the audit, inside correlation and
//! observation.

mod support;

use std::{sync::Arc, time::Duration};

use axum::Json;
use chassis::{
    Config, ServiceBuilder,
    api::{self, Api},
    audit::{AuditEvent, AuditSink},
    testing::TestIssuer,
};
use http::{HeaderValue, Method};
use support::{send, start};
use tower_http::{compression::CompressionLayer, cors::CorsLayer};

#[derive(Clone, Default)]
struct Memory(Arc<std::sync::Mutex<Vec<AuditEvent>>>);

impl AuditSink for Memory {
    fn write(&self, events: &[AuditEvent]) -> std::io::Result<()> {
        self.0.lock().unwrap().extend_from_slice(events);
        Ok(())
    }
}

fn config() -> Config {
    let mut c = Config::default();
    c.shutdown_grace = Duration::from_secs(5);
    c
}

fn api() -> Api {
    Api::new().route(
        api::post(
            "/{account}/orders",
            |Json(v): Json<serde_json::Value>| async move { Json(v) },
        )
        .requires("shop:{account}:create:order")
        .undocumented("a test route"),
    )
}

#[tokio::test]
async fn a_cors_preflight_is_answered_before_authentication() {
    let issuer = TestIssuer::new();
    let audit = Memory::default();
    let cors = CorsLayer::new()
        .allow_origin(HeaderValue::from_static("https://shop.example"))
        .allow_methods([Method::POST])
        .allow_headers([http::header::AUTHORIZATION, http::header::CONTENT_TYPE]);
    let svc = ServiceBuilder::new("shop", 1)
        .api(api())
        .outer_layer(cors)
        .verifier(issuer.verifier())
        .audit_sink(audit.clone())
        .config(config())
        .build()
        .unwrap();
    let running = start(svc).await;
    let url = running.url("/shop/v1/acme/orders");

    // The preflight carries no token: answered by CORS, not refused.
    let pre = send(
        Method::OPTIONS,
        &url,
        &[
            ("origin", "https://shop.example"),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "authorization,content-type",
            ),
            ("x-correlation-id", "preflight-1"),
        ],
        "",
    )
    .await
    .unwrap();
    assert_eq!(pre.status, 200, "{}", pre.text());
    assert_eq!(
        pre.headers["access-control-allow-origin"],
        "https://shop.example"
    );
    assert_eq!(
        pre.headers["x-correlation-id"], "preflight-1",
        "still correlated"
    );

    // The call itself still needs a token and the permission, and carries
    // the CORS headers either way.
    let refused = send(
        Method::POST,
        &url,
        &[
            ("origin", "https://shop.example"),
            ("content-type", "application/json"),
        ],
        "{}",
    )
    .await
    .unwrap();
    assert_eq!(refused.status, 401, "{:?}", refused.headers);
    assert_eq!(
        refused
            .headers
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap()),
        Some("https://shop.example"),
        "{:?}",
        refused.headers
    );
    let token = issuer.user_token("ann", &["shop:acme:create:order"]);
    let bearer = format!("Bearer {token}");
    let allowed = send(
        Method::POST,
        &url,
        &[
            ("origin", "https://shop.example"),
            ("content-type", "application/json"),
            ("authorization", &bearer),
        ],
        r#"{"qty":2}"#,
    )
    .await
    .unwrap();
    assert_eq!(allowed.status, 200, "{}", allowed.text());
    assert_eq!(allowed.json()["qty"], 2);
    assert_eq!(
        allowed.headers["access-control-allow-origin"],
        "https://shop.example"
    );

    // The preflight was not an API call: only the two calls are audited.
    support::eventually("two audit events", || {
        let audit = audit.clone();
        async move { audit.0.lock().unwrap().len() == 2 }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(audit.0.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn responses_are_compressed_by_an_outer_layer() {
    let issuer = TestIssuer::new();
    let svc = ServiceBuilder::new("zip", 1)
        .api(
            Api::new().route(
                api::get("/big", || async { "chassis ".repeat(1000) })
                    .public()
                    .undocumented("a test route"),
            ),
        )
        .outer_layer(CompressionLayer::new())
        .verifier(issuer.verifier())
        .config(config())
        .build()
        .unwrap();
    let running = start(svc).await;
    let url = running.url("/zip/v1/big");
    let zipped = send(Method::GET, &url, &[("accept-encoding", "gzip")], "")
        .await
        .unwrap();
    assert_eq!(zipped.status, 200);
    assert_eq!(zipped.headers["content-encoding"], "gzip");
    assert_eq!(&zipped.body[..2], [0x1f, 0x8b], "a gzip stream");
    assert!(zipped.body.len() < 1000, "{} bytes", zipped.body.len());
    assert!(zipped.headers.contains_key("x-correlation-id"));

    let plain = send(Method::GET, &url, &[], "").await.unwrap();
    assert!(!plain.headers.contains_key("content-encoding"));
    assert_eq!(plain.text(), "chassis ".repeat(1000));
}

/// What a service audits outside its API (a message consumer's decisions)
/// goes to the same `CHASSIS_AUDIT_FILE` as its API calls, through the one
/// auditor `shared_auditor` hands out before the build.
#[tokio::test]
async fn the_shared_auditor_writes_where_the_api_calls_are_audited() {
    let dir = chassis::testing::TempDir::new("shared-auditor");
    let file = dir.path().join("audit.jsonl");
    let mut c = config();
    c.audit_file = Some(file.clone());
    let issuer = TestIssuer::new();
    let mut builder = ServiceBuilder::new("shop", 1)
        .api(api())
        .verifier(issuer.verifier())
        .config(c);
    let auditor = builder.shared_auditor().unwrap();
    auditor.record(AuditEvent {
        service: "shop".into(),
        ..AuditEvent::example()
    });
    let svc = builder.build().unwrap();
    let running = start(svc).await;
    let answer = send(
        Method::POST,
        &running.url("/shop/v1/acme/orders"),
        &[("x-correlation-id", "shared-1")],
        "{}",
    )
    .await
    .unwrap();
    assert_eq!(answer.status, 401, "{}", answer.text());
    let lines = || {
        std::fs::read_to_string(&file)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    chassis::testing::eventually("both events in the file", || async {
        auditor.flush();
        lines().len() == 2
    })
    .await;
    let lines = lines();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"correlation_id\":\"example\"")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"correlation_id\":\"shared-1\"")),
        "{lines:?}"
    );

    // A file that cannot be opened is an error naming it.
    let mut c = config();
    c.audit_file = Some(dir.path().join("missing").join("audit.jsonl"));
    let e = ServiceBuilder::new("shop", 1)
        .config(c)
        .shared_auditor()
        .unwrap_err();
    assert!(
        e.contains("CHASSIS_AUDIT_FILE") && e.contains("missing"),
        "{e}"
    );
}
