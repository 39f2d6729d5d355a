//! The downstream client against real HTTP servers on loopback: a
//! downstream that can be told to answer, fail or hang, and a token
//! endpoint.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{any, post},
};
use base64::Engine as _;
use chassis::{
    circuit_breaker::{self, State as BreakerState},
    client::{CallContext, ClientError, Downstream, TokenError, TokenSource},
    config::Secret,
    correlation::{Correlation, CorrelationId, TraceContext},
    protect::Deadline,
};
use tokio::{net::TcpListener, time::Instant};

const OK: u8 = 0;
const UNAVAILABLE: u8 = 1;
const HANG: u8 = 2;
const NOT_FOUND: u8 = 3;

/// A downstream whose behaviour the test sets, counting the requests that
/// reach it and keeping their headers.
#[derive(Default)]
struct Flaky {
    mode: AtomicU8,
    hits: AtomicUsize,
    seen: Mutex<Vec<HeaderMap>>,
}

impl Flaky {
    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn last_headers(&self) -> HeaderMap {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("no request arrived")
    }
}

async fn flaky_handler(State(flaky): State<Arc<Flaky>>, headers: HeaderMap) -> Response {
    flaky.hits.fetch_add(1, Ordering::SeqCst);
    flaky.seen.lock().unwrap().push(headers);
    match flaky.mode.load(Ordering::SeqCst) {
        OK => (StatusCode::OK, [("content-type", "application/json")], r#"{"id":1,"name":"day pass"}"#).into_response(),
        UNAVAILABLE => StatusCode::SERVICE_UNAVAILABLE.into_response(),
        HANG => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::OK.into_response()
        }
        _ => (
            StatusCode::NOT_FOUND,
            [("content-type", "application/problem+json")],
            r#"{"type":"about:blank","title":"Not Found","status":404,"detail":"no ticket 7","correlation_id":"c-1","reason":"missing"}"#,
        )
            .into_response(),
    }
}

async fn serve(router: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

async fn flaky() -> (Arc<Flaky>, String) {
    let state = Arc::new(Flaky::default());
    let router = Router::new()
        .route("/{*path}", any(flaky_handler))
        .with_state(state.clone());
    let addr = serve(router).await;
    (state, format!("http://{addr}"))
}

/// A port nothing listens on.
async fn closed_port() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

/// A `GET /x` that must fail.
async fn fail(caller: chassis::client::Caller<'_>) -> ClientError {
    caller.get("/x").send().await.unwrap_err()
}

fn quick(name: &str, url: &str) -> chassis::client::DownstreamBuilder {
    Downstream::builder(name, url).backoff(Duration::from_millis(1), Duration::from_millis(2))
}

#[tokio::test]
async fn correlation_trace_and_remaining_time_arrive_downstream() {
    let (flaky, url) = flaky().await;
    let ticketing = quick("ticketing", &url)
        .deadline(Duration::from_secs(3))
        .build()
        .unwrap();

    // The context of a request that arrived with an id, a traceparent and
    // `x-timeout-ms`, as a handler extracts it.
    let mut incoming = HeaderMap::new();
    incoming.insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap(),
    );
    incoming.insert("tracestate", "vendor=x".parse().unwrap());
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.extensions.insert(Correlation::new(
        CorrelationId::parse("order-42").unwrap(),
        TraceContext::from_headers(&incoming),
    ));
    parts
        .extensions
        .insert(Deadline(Instant::now() + Duration::from_millis(1500)));
    let cx = CallContext::from_parts(&parts);

    let res = ticketing
        .anonymous(&cx)
        .get("/ticketing/v1/acme/tickets/1")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    #[derive(serde::Deserialize)]
    struct Ticket {
        id: u32,
        name: String,
    }
    let t: Ticket = res.json().unwrap();
    assert_eq!((t.id, t.name.as_str()), (1, "day pass"));

    let seen = flaky.last_headers();
    assert_eq!(seen["x-correlation-id"], "order-42");
    let tp = seen["traceparent"].to_str().unwrap();
    assert!(
        tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{tp}"
    );
    assert!(!tp.contains("00f067aa0ba902b7"), "a new parent id: {tp}");
    assert!(tp.ends_with("-01"));
    assert_eq!(seen["tracestate"], "vendor=x");
    // The caller's 1.5 s is less than the downstream's 3 s deadline and the
    // 2 s attempt timeout.
    let ms: u64 = seen["x-timeout-ms"].to_str().unwrap().parse().unwrap();
    assert!((1..=1500).contains(&ms), "x-timeout-ms {ms}");
    assert!(!seen.contains_key("authorization"));
}

#[tokio::test]
async fn a_background_context_starts_a_new_correlation() {
    let (flaky, url) = flaky().await;
    let d = quick("ticketing", &url).build().unwrap();
    d.anonymous(&CallContext::background())
        .get("/x")
        .send()
        .await
        .unwrap();
    let seen = flaky.last_headers();
    let id = seen["x-correlation-id"].to_str().unwrap();
    assert!(CorrelationId::parse(id).is_some());
    assert_eq!(seen["x-timeout-ms"], "2000");
}

#[tokio::test]
async fn client_metrics_carry_the_contract_labels() {
    let handle = chassis::metrics::install_recorder();
    chassis::metrics::set_service_label("caller");
    let (_flaky, url) = flaky().await;
    let cx = CallContext::background();
    let up = quick("metrics-up", &url).build().unwrap();
    up.anonymous(&cx).get("/x").send().await.unwrap();
    let down = quick("metrics-down", &closed_port().await)
        .max_attempts(1)
        .build()
        .unwrap();
    let err = down.anonymous(&cx).post("/x").send().await.unwrap_err();
    assert!(matches!(err, ClientError::Connection { .. }), "{err:?}");

    let text = chassis::metrics::render(&handle);
    let line = |downstream: &str| {
        text.lines()
            .find(|l| {
                l.starts_with("http_client_request_duration_seconds_count{")
                    && l.contains(&format!("downstream=\"{downstream}\""))
            })
            .unwrap_or_else(|| panic!("no client metric for {downstream} in\n{text}"))
            .to_owned()
    };
    let ok = line("metrics-up");
    for label in [
        "service=\"caller\"",
        "http_request_method=\"GET\"",
        "http_response_status_code=\"200\"",
    ] {
        assert!(ok.contains(label), "{label} missing from {ok}");
    }
    assert!(ok.ends_with(" 1"), "{ok}");
    let failed = line("metrics-down");
    assert!(failed.contains("http_request_method=\"POST\""), "{failed}");
    assert!(
        failed.contains("http_response_status_code=\"error\""),
        "{failed}"
    );
    assert!(
        text.contains("circuit_breaker_state{service=\"caller\",name=\"metrics-up\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("bulkhead_in_use{service=\"caller\",name=\"metrics-up\"} 0"),
        "{text}"
    );
    for (name, outcome) in [("metrics-up", "success"), ("metrics-down", "failure")] {
        let series = format!(
            "circuit_breaker_calls_total{{service=\"caller\",name=\"{name}\",outcome=\"{outcome}\"}} 1"
        );
        assert!(text.contains(&series), "{series} in {text}");
    }
}

#[tokio::test]
async fn a_hanging_downstream_is_cut_opens_the_breaker_and_recovers() {
    let (flaky, url) = flaky().await;
    flaky.set(HANG);
    let d = quick("hanging", &url)
        .attempt_timeout(Duration::from_millis(150))
        .max_attempts(1)
        .breaker(
            circuit_breaker::Config::count(4)
                .minimum_calls(4)
                .wait_in_open(Duration::from_millis(300)),
        )
        .build()
        .unwrap();
    let cx = CallContext::background();
    for _ in 0..4 {
        let start = Instant::now();
        let err = d.anonymous(&cx).get("/slow").send().await.unwrap_err();
        assert!(
            matches!(err, ClientError::Timeout { after, .. } if after == Duration::from_millis(150)),
            "{err:?}"
        );
        assert!(start.elapsed() < Duration::from_secs(2));
        eprintln!(
            "state {:?} elapsed {:?}",
            d.breaker().state(),
            start.elapsed()
        );
    }
    assert_eq!(d.breaker().state(), BreakerState::Open);
    let err = d.anonymous(&cx).get("/slow").send().await.unwrap_err();
    assert!(matches!(err, ClientError::CircuitOpen { .. }), "{err:?}");
    assert!(err.is_unavailable());
    assert_eq!(
        flaky.hits(),
        4,
        "an open breaker does not touch the downstream"
    );

    flaky.set(OK);
    tokio::time::sleep(Duration::from_millis(350)).await;
    let res = d.anonymous(&cx).get("/slow").send().await;
    let res = res.unwrap_or_else(|e| panic!("{e:?} after {} hits", flaky.hits()));
    assert_eq!(res.status(), 200);
    assert_eq!(d.breaker().state(), BreakerState::Closed);
    assert_eq!(flaky.hits(), 5);
}

#[tokio::test]
async fn only_safe_calls_are_retried() {
    let (flaky, url) = flaky().await;
    flaky.set(UNAVAILABLE);
    let d = quick("retrying", &url).build().unwrap();
    let cx = CallContext::background();

    let err = d.anonymous(&cx).get("/x").send().await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
    assert_eq!(flaky.hits(), 3, "GET: three attempts");

    let _ = d.anonymous(&cx).post("/x").send().await.unwrap_err();
    assert_eq!(flaky.hits(), 4, "POST without a key: one attempt");

    let _ = d
        .anonymous(&cx)
        .post("/x")
        .idempotency_key("order-1")
        .json(&serde_json::json!({"qty": 1}))
        .send()
        .await
        .unwrap_err();
    assert_eq!(flaky.hits(), 7, "POST with a key: three attempts");
    let seen = flaky.last_headers();
    assert_eq!(seen["idempotency-key"], "order-1");
    assert_eq!(seen["content-type"], "application/json");

    let _ = d
        .anonymous(&cx)
        .post("/reservations/r-1/confirm")
        .retry_safe()
        .send()
        .await
        .unwrap_err();
    assert_eq!(flaky.hits(), 10, "POST marked retry-safe: three attempts");
    assert!(
        !flaky.last_headers().contains_key("idempotency-key"),
        "the mark is not sent"
    );
}

#[tokio::test]
async fn an_error_status_carries_the_downstream_problem() {
    let (flaky, url) = flaky().await;
    flaky.set(NOT_FOUND);
    let d = quick("problems", &url).build().unwrap();
    let err = d
        .anonymous(&CallContext::background())
        .get("/tickets/7")
        .send()
        .await
        .unwrap_err();
    let ClientError::Status {
        status, problem, ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(*status, StatusCode::NOT_FOUND);
    let problem = problem.as_ref().unwrap();
    assert_eq!(problem.detail.as_deref(), Some("no ticket 7"));
    assert_eq!(problem.correlation_id.as_deref(), Some("c-1"));
    assert_eq!(problem.members["reason"], "missing");
    assert_eq!(flaky.hits(), 1, "a 404 is not retried");
    assert_eq!(d.breaker().state(), BreakerState::Closed);
}

#[tokio::test]
async fn a_full_bulkhead_refuses_without_calling() {
    let handle = chassis::metrics::install_recorder();
    let in_use = || {
        chassis::metrics::render(&handle)
            .lines()
            .find(|l| l.starts_with("bulkhead_in_use{") && l.contains("name=\"narrow\""))
            .map(|l| l.rsplit(' ').next().unwrap().to_owned())
    };
    let (flaky, url) = flaky().await;
    flaky.set(HANG);
    let d = quick("narrow", &url)
        .bulkhead(1, 0, Duration::ZERO)
        .attempt_timeout(Duration::from_secs(10))
        .deadline(Duration::from_secs(10))
        .build()
        .unwrap();
    let first = tokio::spawn({
        let d = d.clone();
        async move {
            d.anonymous(&CallContext::background())
                .get("/x")
                .send()
                .await
        }
    });
    let start = Instant::now();
    while flaky.hits() == 0 {
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(d.bulkhead().in_use(), 1);
    assert_eq!(in_use().as_deref(), Some("1"), "the gauge shows the call");
    let err = fail(d.anonymous(&CallContext::background())).await;
    assert!(matches!(err, ClientError::BulkheadFull { .. }), "{err:?}");
    assert_eq!(flaky.hits(), 1);
    first.abort();
    let _ = first.await;
    assert_eq!(d.bulkhead().in_use(), 0, "a cancelled call frees its place");
    assert_eq!(in_use().as_deref(), Some("0"));
}

#[tokio::test]
async fn the_callers_deadline_bounds_the_call() {
    let (flaky, url) = flaky().await;
    flaky.set(HANG);
    let d = quick("bounded", &url).build().unwrap();
    let cx = CallContext::background().with_deadline(Instant::now() + Duration::from_millis(200));
    let start = Instant::now();
    let err = d.anonymous(&cx).get("/x").send().await.unwrap_err();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(2));
    let ms: u64 = flaky.last_headers()["x-timeout-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(ms <= 200, "x-timeout-ms {ms}");

    // Time already up: the downstream is not called at all.
    let hits = flaky.hits();
    let spent = CallContext::background().with_deadline(Instant::now());
    let err = d.anonymous(&spent).get("/x").send().await.unwrap_err();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err:?}");
    assert_eq!(flaky.hits(), hits);
}

#[tokio::test]
async fn a_refused_connection_is_a_connection_error() {
    let d = quick("nowhere", &closed_port().await).build().unwrap();
    let err = fail(d.anonymous(&CallContext::background())).await;
    assert!(matches!(err, ClientError::Connection { .. }), "{err:?}");
    assert_eq!(err.problem().status(), StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn a_large_body_is_refused() {
    let (_flaky, url) = flaky().await;
    let d = quick("small", &url).max_response_bytes(8).build().unwrap();
    let err = fail(d.anonymous(&CallContext::background())).await;
    assert!(matches!(err, ClientError::Decode { .. }), "{err:?}");
}

#[tokio::test]
async fn injected_faults_reach_the_caller() {
    let (flaky, url) = flaky().await;
    let d = quick("faulty", &url)
        .max_attempts(1)
        .fault(chassis::fault::FaultConfig {
            abort_percent: 100.0,
            ..Default::default()
        })
        .build()
        .unwrap();
    let err = fail(d.anonymous(&CallContext::background())).await;
    assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
    assert_eq!(flaky.hits(), 0, "an aborted call never leaves the caller");
}

// === token source ===

/// A token endpoint: counts fetches, checks the client's credentials, can be
/// made slow or failing.
struct Issuer {
    fetches: AtomicUsize,
    expires_in: u64,
    delay: Duration,
    failing: AtomicU8,
}

async fn token_endpoint(
    State(issuer): State<Arc<Issuer>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let n = issuer.fetches.fetch_add(1, Ordering::SeqCst) + 1;
    tokio::time::sleep(issuer.delay).await;
    if issuer.failing.load(Ordering::SeqCst) == 1 {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let basic = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok());
    // "s:cret" form-encoded is "s%3Acret".
    if basic.as_deref() != Some(b"orders:s%3Acret".as_slice())
        || body != "grant_type=client_credentials"
    {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(serde_json::json!({"error": "invalid_client"})),
        )
            .into_response();
    }
    axum::Json(serde_json::json!({
        "access_token": format!("tok-{n}"),
        "token_type": "Bearer",
        "expires_in": issuer.expires_in,
    }))
    .into_response()
}

async fn issuer(expires_in: u64, delay: Duration) -> (Arc<Issuer>, String) {
    let state = Arc::new(Issuer {
        fetches: AtomicUsize::new(0),
        expires_in,
        delay,
        failing: AtomicU8::new(0),
    });
    let addr = serve(
        Router::new()
            .route("/auth/v1/token", post(token_endpoint))
            .with_state(state.clone()),
    )
    .await;
    (state, format!("http://{addr}/auth/v1/token"))
}

fn source(url: &str, secret: &str) -> TokenSource {
    TokenSource::client_credentials(url, "orders", Secret::new(secret.to_owned())).unwrap()
}

#[tokio::test]
async fn calls_as_the_service_present_its_token() {
    let (issuer, token_url) = issuer(300, Duration::ZERO).await;
    let (flaky, url) = flaky().await;
    let d = quick("ticketing", &url)
        .token_source(source(&token_url, "s:cret"))
        .build()
        .unwrap();
    let cx = CallContext::background();
    for _ in 0..3 {
        d.as_service(&cx).get("/x").send().await.unwrap();
    }
    assert_eq!(flaky.last_headers()["authorization"], "Bearer tok-1");
    assert_eq!(
        issuer.fetches.load(Ordering::SeqCst),
        1,
        "the token is cached"
    );
}

#[tokio::test]
async fn many_concurrent_callers_share_one_fetch() {
    let (issuer, token_url) = issuer(300, Duration::from_millis(100)).await;
    let tokens = source(&token_url, "s:cret");
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let tokens = tokens.clone();
            tokio::spawn(async move { tokens.authorization().await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), "Bearer tok-1");
    }
    assert_eq!(issuer.fetches.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_token_is_refreshed_before_it_expires() {
    // Lifetime 1 s: refreshed after half of it, while still valid.
    let (issuer, token_url) = issuer(1, Duration::ZERO).await;
    let tokens = source(&token_url, "s:cret");
    assert_eq!(tokens.authorization().await.unwrap(), "Bearer tok-1");
    assert_eq!(tokens.authorization().await.unwrap(), "Bearer tok-1");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(tokens.authorization().await.unwrap(), "Bearer tok-2");
    assert_eq!(issuer.fetches.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_failed_refresh_keeps_the_valid_token() {
    // Lifetime 4 s: due for refresh after 2 s, valid until 4 s.
    let (issuer, token_url) = issuer(4, Duration::ZERO).await;
    let tokens = source(&token_url, "s:cret");
    assert_eq!(tokens.authorization().await.unwrap(), "Bearer tok-1");
    issuer.failing.store(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(tokens.authorization().await.unwrap(), "Bearer tok-1");
    assert_eq!(
        issuer.fetches.load(Ordering::SeqCst),
        2,
        "the refresh was tried"
    );
    // Within the second after a failure, no new attempt.
    assert_eq!(tokens.authorization().await.unwrap(), "Bearer tok-1");
    assert_eq!(issuer.fetches.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn auth_service_down_gives_a_clear_error() {
    let (flaky, url) = flaky().await;
    let token_url = format!("{}/auth/v1/token", closed_port().await);
    let d = quick("ticketing", &url)
        .token_source(source(&token_url, "s:cret"))
        .build()
        .unwrap();
    let err = fail(d.as_service(&CallContext::background())).await;
    let ClientError::Token { source, .. } = &err else {
        panic!("{err:?}")
    };
    assert!(
        matches!(source, TokenError::Unreachable { .. }),
        "{source:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains(&token_url) && text.contains("unreachable"),
        "{text}"
    );
    assert!(err.is_unavailable());
    assert_eq!(flaky.hits(), 0, "no call without a token");
}

#[tokio::test]
async fn refused_credentials_name_the_oauth_error_not_the_secret() {
    let (_issuer, token_url) = issuer(300, Duration::ZERO).await;
    let err = source(&token_url, "wrong-secret")
        .authorization()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, TokenError::Rejected { status: 401, error, .. } if error == "invalid_client"),
        "{err:?}"
    );
    assert!(!err.to_string().contains("wrong-secret"));
}

#[tokio::test]
async fn as_service_without_a_token_source_is_an_error() {
    let (flaky, url) = flaky().await;
    let d = quick("ticketing", &url).build().unwrap();
    let err = fail(d.as_service(&CallContext::background())).await;
    assert!(
        matches!(
            &err,
            ClientError::Token {
                source: TokenError::NotConfigured,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(flaky.hits(), 0);
}

#[tokio::test]
async fn any_expires_in_is_handled_without_a_panic() {
    for expires_in in [u64::MAX, u64::MAX / 1000, 1 << 62, 0] {
        let (issuer, token_url) = issuer(expires_in, Duration::ZERO).await;
        let tokens = source(&token_url, "s:cret");
        let got = tokens.authorization().await;
        assert_eq!(got.unwrap(), "Bearer tok-1", "expires_in {expires_in}");
        assert_eq!(issuer.fetches.load(Ordering::SeqCst), 1);
    }
}

// === audiences and token exchange ===

/// The forms a token endpoint received, in order.
type Forms = Arc<Mutex<Vec<Vec<(String, String)>>>>;

/// A token endpoint answering client credentials with `svc-<audience>` and
/// token exchanges with `x<n>-<audience>`, keeping each request's form.
async fn audience_endpoint() -> (Forms, String) {
    let forms: Forms = Arc::default();
    let router = Router::new()
        .route(
            "/token",
            post(|State(forms): State<Forms>, body: String| async move {
                let form: Vec<(String, String)> = form_urlencoded::parse(body.as_bytes())
                    .into_owned()
                    .collect();
                let get = |k: &str| {
                    form.iter()
                        .find(|(n, _)| n == k)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()
                };
                let audience = get("audience");
                let token = match get("grant_type").as_str() {
                    "client_credentials" => format!("svc-{audience}"),
                    "urn:ietf:params:oauth:grant-type:token-exchange" => {
                        let n = forms.lock().unwrap().len();
                        format!("x{n}-{audience}")
                    }
                    _ => return StatusCode::BAD_REQUEST.into_response(),
                };
                forms.lock().unwrap().push(form);
                axum::Json(serde_json::json!({
                    "access_token": token, "token_type": "Bearer", "expires_in": 300,
                }))
                .into_response()
            }),
        )
        .with_state(forms.clone());
    let addr = serve(router).await;
    (forms, format!("http://{addr}/token"))
}

#[cfg(feature = "testing")]
#[tokio::test]
async fn a_downstream_with_an_audience_gets_tokens_minted_for_it() {
    let (forms, token_url) = audience_endpoint().await;
    let (flaky, url) = flaky().await;
    let env =
        chassis::config::Env::from_pairs([("CHASSIS_DOWNSTREAM_TICKETING_AUDIENCE", "ticketing")]);
    let mut r = chassis::config::Reader::new(&env);
    let ticketing = quick("ticketing", &url)
        .token_source(source(&token_url, "s"))
        .configure(&mut r)
        .build()
        .unwrap();
    r.finish().unwrap();
    assert_eq!(ticketing.settings().audience.as_deref(), Some("ticketing"));

    // As the service: a token asked for the downstream's audience.
    let background = CallContext::background();
    ticketing
        .as_service(&background)
        .get("/x")
        .send()
        .await
        .unwrap();
    assert_eq!(
        flaky.last_headers()["authorization"],
        "Bearer svc-ticketing"
    );

    // On behalf of a user: the user's token, exchanged for one addressed to
    // the downstream, once per user token while it lasts.
    let issuer = chassis::testing::TestIssuer::new();
    let user = issuer.user_token("ann", &["ticketing:acme:view:ticket"]);
    let principal = issuer.verifier().verify_token(&user).await.unwrap();
    let cx = CallContext::background().with_principal(principal);
    for _ in 0..3 {
        ticketing.on_behalf_of(&cx).get("/x").send().await.unwrap();
    }
    assert_eq!(flaky.last_headers()["authorization"], "Bearer x1-ticketing");
    let forms = forms.lock().unwrap().clone();
    assert_eq!(
        forms.len(),
        2,
        "one client-credentials grant, one exchange: {forms:?}"
    );
    let exchange = &forms[1];
    for (name, value) in [
        (
            "grant_type",
            "urn:ietf:params:oauth:grant-type:token-exchange",
        ),
        ("subject_token", user.as_str()),
        (
            "subject_token_type",
            "urn:ietf:params:oauth:token-type:access_token",
        ),
        ("audience", "ticketing"),
    ] {
        assert!(
            exchange.iter().any(|(n, v)| n == name && v == value),
            "{name} missing from {exchange:?}"
        );
    }
}

#[cfg(feature = "testing")]
#[tokio::test]
async fn without_an_audience_the_callers_token_is_forwarded() {
    let (forms, token_url) = audience_endpoint().await;
    let (flaky, url) = flaky().await;
    let d = quick("plain", &url)
        .token_source(source(&token_url, "s"))
        .build()
        .unwrap();
    let issuer = chassis::testing::TestIssuer::new();
    let user = issuer.user_token("ann", &[]);
    let principal = issuer.verifier().verify_token(&user).await.unwrap();
    let cx = CallContext::background().with_principal(principal);
    d.on_behalf_of(&cx).get("/x").send().await.unwrap();
    assert_eq!(
        flaky.last_headers()["authorization"],
        format!("Bearer {user}")
    );
    assert!(forms.lock().unwrap().is_empty());
}

#[cfg(feature = "testing")]
#[tokio::test]
async fn an_audience_without_a_token_source_is_a_clear_error() {
    let (_flaky, url) = flaky().await;
    let d = quick("lonely", &url).audience("lonely").build().unwrap();
    let issuer = chassis::testing::TestIssuer::new();
    let principal = issuer
        .verifier()
        .verify_token(&issuer.user_token("ann", &[]))
        .await
        .unwrap();
    let cx = CallContext::background().with_principal(principal);
    let err = fail(d.on_behalf_of(&cx)).await;
    assert!(
        matches!(
            &err,
            ClientError::Token {
                source: TokenError::NotConfigured,
                ..
            }
        ),
        "{err:?}"
    );
}

/// Service-identity and on-behalf-of calls tested in-process: the test
/// issuer's token endpoint, the real client, a real service verifying the
/// tokens it mints.
#[cfg(feature = "testing")]
#[tokio::test]
async fn the_test_issuers_token_source_serves_both_identities() {
    use chassis::{
        ServiceBuilder,
        api::{self, Api},
        testing::TestIssuer,
    };
    let ticketing_tokens = TestIssuer::with("https://issuer.test", "ticketing");
    let svc = ServiceBuilder::new("ticketing", 1)
        .api(
            Api::new().route(
                api::post("/{account}/reservations", || async { "reserved" })
                    .requires("ticketing:{account}:reserve:ticket")
                    .undocumented("a test route"),
            ),
        )
        .verifier(ticketing_tokens.verifier())
        .config(chassis::Config::default())
        .build()
        .unwrap();
    let addr = serve(svc.router()).await;

    let issuer = TestIssuer::new();
    let tokens = issuer
        .token_source("orders", &["ticketing:*:reserve:ticket"])
        .await;
    let d = quick("ticketing", &format!("http://{addr}"))
        .audience("ticketing")
        .token_source(tokens)
        .build()
        .unwrap();
    let path = "/ticketing/v1/acme/reservations";

    // As the service: its own grant.
    let background = CallContext::background();
    let res = d.as_service(&background).post(path).send().await.unwrap();
    assert_eq!(res.body().as_ref(), b"reserved");

    // On behalf of a user: the user's grants, exchanged for ticketing.
    for (perms, allowed) in [
        (&["ticketing:acme:reserve:ticket"][..], true),
        (&[][..], false),
    ] {
        let user = issuer.user_token("ann", perms);
        let principal = issuer.verifier().verify_token(&user).await.unwrap();
        let cx = CallContext::background().with_principal(principal);
        let result = d.on_behalf_of(&cx).post(path).send().await;
        match (result, allowed) {
            (Ok(res), true) => assert_eq!(res.body().as_ref(), b"reserved"),
            (Err(ClientError::Status { status, .. }), false) => assert_eq!(status, 403),
            (other, _) => panic!("{perms:?}: {other:?}"),
        }
    }
}
