use std::time::Duration;

use axum::response::IntoResponse;

use super::*;
use crate::config::Env;

fn configured(
    pairs: &[(&str, &str)],
) -> (Result<Downstream, ConfigError>, Result<(), ConfigError>) {
    let env = Env::from_pairs(pairs.iter().copied());
    let mut r = Reader::new(&env);
    let built = Downstream::builder("ticket-store", "http://127.0.0.1:1/base/")
        .configure(&mut r)
        .build();
    (built, r.finish())
}

#[test]
fn the_prefix_carries_the_name() {
    assert_eq!(
        env_prefix("ticket-store"),
        "CHASSIS_DOWNSTREAM_TICKET_STORE_"
    );
}

#[tokio::test]
async fn defaults_hold_without_variables() {
    let (d, r) = configured(&[]);
    r.unwrap();
    assert_eq!(d.unwrap().settings(), &Settings::default());
}

#[tokio::test]
async fn every_setting_has_a_variable() {
    let p = "CHASSIS_DOWNSTREAM_TICKET_STORE_";
    let vars: Vec<(String, &str)> = [
        ("URL", "http://10.0.0.1:8080"),
        ("TIMEOUT_MS", "250"),
        ("DEADLINE_MS", "900"),
        ("RETRY_MAX_ATTEMPTS", "2"),
        ("RETRY_BACKOFF_MS", "10"),
        ("RETRY_BACKOFF_MAX_MS", "200"),
        ("RETRY_BUDGET_PERCENT", "10"),
        ("BREAKER_WINDOW", "50"),
        ("BREAKER_MINIMUM_CALLS", "5"),
        ("BREAKER_FAILURE_RATE", "25"),
        ("BREAKER_SLOW_CALL_MS", "100"),
        ("BREAKER_SLOW_CALL_RATE", "80"),
        ("BREAKER_WAIT_OPEN_MS", "3000"),
        ("BREAKER_HALF_OPEN_CALLS", "2"),
        ("BULKHEAD_MAX", "8"),
        ("BULKHEAD_QUEUE", "4"),
        ("BULKHEAD_WAIT_MS", "20"),
        ("MAX_RESPONSE_BYTES", "1024"),
        ("POOL_MAX_IDLE", "4"),
        ("POOL_IDLE_TIMEOUT_MS", "1000"),
        ("FAULT_ABORT_PERCENT", "5"),
        ("OUTLIER_CONSECUTIVE_FAILURES", "2"),
        ("OUTLIER_EJECT_MS", "500"),
        ("OUTLIER_EJECT_MAX_MS", "4000"),
        ("OUTLIER_MAX_EJECT_PERCENT", "30"),
        ("DNS_REFRESH_MS", "700"),
    ]
    .into_iter()
    .map(|(k, v)| (format!("{p}{k}"), v))
    .collect();
    let pairs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    let (d, r) = configured(&pairs);
    r.unwrap();
    let d = d.unwrap();
    let s = d.settings();
    assert_eq!(d.inner.authority.as_str(), "10.0.0.1:8080");
    assert_eq!(d.inner.prefix, "");
    assert_eq!(s.attempt_timeout, Duration::from_millis(250));
    assert_eq!(s.deadline, Duration::from_millis(900));
    assert_eq!(s.max_attempts, 2);
    assert_eq!(s.backoff, Duration::from_millis(10));
    assert_eq!(s.backoff_max, Duration::from_millis(200));
    assert!((s.retry_budget - 0.1).abs() < 1e-6);
    assert_eq!(s.breaker.window, circuit_breaker::Window::Count(50));
    assert_eq!(s.breaker.minimum_calls, 5);
    assert!((s.breaker.failure_rate - 0.25).abs() < 1e-9);
    assert_eq!(s.breaker.slow_call, Some(Duration::from_millis(100)));
    assert!((s.breaker.slow_call_rate - 0.8).abs() < 1e-9);
    assert_eq!(s.breaker.wait_in_open, Duration::from_secs(3));
    assert_eq!(s.breaker.half_open_calls, 2);
    assert_eq!((s.bulkhead_max, s.bulkhead_queue), (8, 4));
    assert_eq!(s.bulkhead_wait, Duration::from_millis(20));
    assert_eq!(s.max_response_bytes, 1024);
    assert_eq!(s.pool_max_idle, 4);
    assert_eq!(s.pool_idle_timeout, Duration::from_secs(1));
    assert_eq!(s.fault.as_ref().map(|f| f.abort_percent), Some(5.0));
    assert_eq!(s.outlier.consecutive_failures, 2);
    assert_eq!(s.outlier.base_ejection, Duration::from_millis(500));
    assert_eq!(s.outlier.max_ejection, Duration::from_secs(4));
    assert!((s.outlier.max_ejected_percent - 30.0).abs() < 1e-9);
    assert_eq!(s.dns_refresh, Duration::from_millis(700));
}

#[tokio::test]
async fn a_url_list_or_a_dns_name_makes_a_balanced_downstream() {
    let (d, r) = configured(&[(
        "CHASSIS_DOWNSTREAM_TICKET_STORE_URL",
        " http://127.0.0.1:1/api/ , http://127.0.0.1:2/api",
    )]);
    r.unwrap();
    let d = d.unwrap();
    assert_eq!(d.inner.prefix, "/api");
    let addresses: Vec<String> = d.endpoints().into_iter().map(|e| e.address).collect();
    assert_eq!(addresses, ["127.0.0.1:1", "127.0.0.1:2"]);

    let (d, r) = configured(&[(
        "CHASSIS_DOWNSTREAM_TICKET_STORE_URL",
        "dns+https://ticketing.internal/api",
    )]);
    r.unwrap();
    let d = d.unwrap();
    assert_eq!(d.inner.scheme, http::uri::Scheme::HTTPS);
    assert_eq!(d.inner.authority.as_str(), "ticketing.internal");
    assert!(d.endpoints().is_empty());
}

/// A `dns+` downstream calls the addresses its name resolves to, sends the
/// name as `Host`, and follows the name when its addresses change.
#[tokio::test]
async fn a_dns_downstream_follows_its_name() {
    use std::sync::Mutex;

    let hosts: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut addrs = Vec::new();
    for n in 0..2 {
        let hosts = hosts.clone();
        let router = axum::Router::new().route(
            "/api/x",
            axum::routing::get(move |headers: http::HeaderMap| async move {
                let host = headers[header::HOST].to_str().unwrap().to_owned();
                hosts.lock().unwrap().push(host);
                format!("replica {n}")
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await });
    }
    // The name points at the first replica, then at the second.
    let answer = Arc::new(Mutex::new(vec![addrs[0]]));
    let lookup = answer.clone();
    let d = Downstream::builder("t", "dns+http://ticketing.internal:8080/api")
        .dns_refresh(Duration::from_millis(10))
        .resolver(balance::Resolve(Arc::new(move |host, port| {
            assert_eq!((host.as_str(), port), ("ticketing.internal", 8080));
            let addrs = lookup.lock().unwrap().clone();
            Box::pin(async move { Ok(addrs) })
        })))
        .build()
        .unwrap();
    let cx = CallContext::background();
    let body = |res: ClientResponse| String::from_utf8(res.body().to_vec()).unwrap();
    let res = d.anonymous(&cx).get("/x").send().await.unwrap();
    assert_eq!(body(res), "replica 0");

    *answer.lock().unwrap() = vec![addrs[1]];
    let mut n = 0;
    loop {
        let res = d.anonymous(&cx).get("/x").send().await.unwrap();
        if body(res) == "replica 1" {
            break;
        }
        n += 1;
        assert!(n < 2_000, "the new address was never called");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        d.endpoints()
            .into_iter()
            .map(|e| e.address)
            .collect::<Vec<_>>(),
        [addrs[1].to_string()]
    );
    assert!(
        hosts
            .lock()
            .unwrap()
            .iter()
            .all(|h| h == "ticketing.internal:8080")
    );
}

#[tokio::test]
async fn every_bad_variable_is_reported_at_once() {
    let (_, r) = configured(&[
        ("CHASSIS_DOWNSTREAM_TICKET_STORE_URL", "ftp://files:21"),
        ("CHASSIS_DOWNSTREAM_TICKET_STORE_TIMEOUT_MS", "soon"),
        ("CHASSIS_DOWNSTREAM_TICKET_STORE_DEADLINE_MS", "0"),
        (
            "CHASSIS_DOWNSTREAM_TICKET_STORE_BREAKER_FAILURE_RATE",
            "150",
        ),
        ("CHASSIS_DOWNSTREAM_TICKET_STORE_BULKHEAD_MAX", "0"),
    ]);
    let err = r.unwrap_err();
    let names: Vec<&str> = err.problems().iter().map(|p| p.name.as_str()).collect();
    for suffix in [
        "URL",
        "TIMEOUT_MS",
        "DEADLINE_MS",
        "BREAKER_FAILURE_RATE",
        "BULKHEAD_MAX",
    ] {
        let name = format!("CHASSIS_DOWNSTREAM_TICKET_STORE_{suffix}");
        assert!(
            names.contains(&name.as_str()),
            "{name} missing from {names:?}"
        );
    }
}

#[tokio::test]
async fn bad_base_urls_are_refused() {
    for url in [
        "ticketing:8080",
        "/relative",
        "ftp://ticketing",
        "http://t/?q=1",
    ] {
        let err = Downstream::builder("t", url).build().unwrap_err();
        assert_eq!(err.problems().len(), 1, "{url}");
        assert_eq!(err.problems()[0].name, "downstream t");
    }
}

#[tokio::test]
async fn paths_join_the_base_prefix() {
    let d = Downstream::builder("t", "http://127.0.0.1:1/api/")
        .build()
        .unwrap();
    assert_eq!(
        d.uri("/x/1?y=2").unwrap().to_string(),
        "http://127.0.0.1:1/api/x/1?y=2"
    );
    assert!(matches!(
        d.uri("x"),
        Err(ClientError::InvalidRequest { .. })
    ));
    assert!(matches!(
        d.uri("/a b"),
        Err(ClientError::InvalidRequest { .. })
    ));
}

#[test]
fn errors_become_problems_that_reveal_nothing() {
    let name: Arc<str> = "ticketing".into();
    let status = |s: u16| ClientError::Status {
        downstream: name.clone(),
        status: StatusCode::from_u16(s).unwrap(),
        problem: None,
        body: Bytes::from_static(b"{\"detail\":\"SELECT * FROM secrets\"}"),
    };
    let cases = [
        (
            ClientError::Timeout {
                downstream: name.clone(),
                after: Duration::from_secs(1),
            },
            504,
            None,
        ),
        (
            ClientError::CircuitOpen {
                downstream: name.clone(),
                retry_after: Duration::from_millis(2500),
            },
            503,
            Some("3"),
        ),
        (
            ClientError::BulkheadFull {
                downstream: name.clone(),
            },
            503,
            Some("1"),
        ),
        (
            ClientError::Connection {
                downstream: name.clone(),
                message: "refused".into(),
            },
            503,
            Some("1"),
        ),
        (status(500), 502, None),
        (status(404), 502, None),
        (status(503), 503, Some("1")),
        (
            ClientError::Token {
                downstream: name.clone(),
                source: TokenError::NotConfigured,
            },
            503,
            Some("1"),
        ),
        (
            ClientError::NoCallerToken {
                downstream: name.clone(),
            },
            500,
            None,
        ),
    ];
    for (err, want, retry_after) in cases {
        let text = err.to_string();
        let res = err.into_response();
        assert_eq!(res.status().as_u16(), want, "{text}");
        assert_eq!(
            res.headers()
                .get(header::RETRY_AFTER)
                .map(|v| v.to_str().unwrap()),
            retry_after,
            "{text}"
        );
    }
}

/// Calls on behalf of the caller forward its token; without a caller they
/// fail before anything is sent.
#[tokio::test]
async fn on_behalf_of_forwards_the_callers_token() {
    use std::sync::Mutex;

    use crate::auth::PrincipalKind;

    let seen: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let router = axum::Router::new().route(
        "/x",
        axum::routing::get({
            let seen = seen.clone();
            move |headers: http::HeaderMap| async move {
                let auth = headers
                    .get(header::AUTHORIZATION)
                    .map(|v| v.to_str().unwrap().to_owned());
                seen.lock().unwrap().push(auth);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    let d = Downstream::builder("t", &format!("http://{addr}"))
        .build()
        .unwrap();

    let alice = Principal::new(
        "alice",
        "https://issuer.test",
        PrincipalKind::User,
        crate::permission::Grants::default(),
        0,
        "header.payload.signature",
    );
    let cx = CallContext::background().with_principal(alice);
    d.on_behalf_of(&cx).get("/x").send().await.unwrap();
    assert_eq!(
        seen.lock().unwrap().as_slice(),
        [Some("Bearer header.payload.signature".to_owned())]
    );

    let err = d
        .on_behalf_of(&CallContext::background())
        .get("/x")
        .send()
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::NoCallerToken { .. }), "{err:?}");
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn pages_follow_next_links_and_refuse_one_that_leaves_the_list() {
    use crate::page::{Page, PageRequest};

    // Items 0..7, in order, the key being the item itself.
    async fn numbers(page: PageRequest<(u32,)>) -> Page<u32> {
        let start = page.after().map_or(0, |(n,)| n + 1);
        let fetch = u32::try_from(page.fetch()).unwrap();
        page.page(
            (start..7).take(usize::try_from(fetch).unwrap()).collect(),
            |n| (*n,),
        )
    }
    async fn escaping() -> Page<u32> {
        Page {
            items: vec![1],
            next: Some("http://elsewhere.test/steal?limit=1".to_owned()),
        }
    }
    let router = axum::Router::new()
        .route("/n", axum::routing::get(numbers))
        .route("/escape", axum::routing::get(escaping));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    let d = Downstream::builder("t", &format!("http://{addr}"))
        .build()
        .unwrap();
    let cx = CallContext::background();
    let calls = Calls::new(&d, d.anonymous(&cx));

    let mut pages = calls.pages::<u32>("/n", Some(3));
    let mut sizes = Vec::new();
    while let Some(page) = pages.next().await.unwrap() {
        sizes.push(page.items.len());
    }
    assert_eq!(sizes, [3, 3, 1]);
    assert!(pages.next().await.unwrap().is_none());
    assert_eq!(
        calls.pages::<u32>("/n", None).all().await.unwrap(),
        (0..7).collect::<Vec<_>>()
    );

    let err = calls.pages::<u32>("/n", Some(0)).all().await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::UNPROCESSABLE_ENTITY));
    let err = calls.pages::<u32>("/escape", None).all().await.unwrap_err();
    assert!(matches!(err, ClientError::Decode { .. }), "{err}");
}
