//! A downstream with several addresses against real HTTP servers on
//! loopback: calls spread over the replicas, a stopped replica is ejected
//! while every call still succeeds, and it gets traffic again once it is
//! back and its ejection has ended.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::State, http::HeaderMap, routing::any};
use chassis::{
    client::{CallContext, Downstream, DownstreamBuilder, OutlierDetection},
    config::{Env, Reader},
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

/// A replica on a fixed loopback port that counts the requests it serves
/// and keeps the last `Host` it saw; it can be stopped and started again on
/// the same port.
struct Replica {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    host: Arc<std::sync::Mutex<String>>,
    running: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

async fn count(
    State((hits, host)): State<(Arc<AtomicUsize>, Arc<std::sync::Mutex<String>>)>,
    headers: HeaderMap,
) -> &'static str {
    hits.fetch_add(1, Ordering::SeqCst);
    if let Some(h) = headers.get("host").and_then(|h| h.to_str().ok()) {
        h.clone_into(&mut host.lock().unwrap());
    }
    "{}"
}

impl Replica {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut replica = Self {
            addr: listener.local_addr().unwrap(),
            hits: Arc::default(),
            host: Arc::default(),
            running: None,
        };
        replica.serve(listener);
        replica
    }

    fn serve(&mut self, listener: TcpListener) {
        let router = Router::new()
            .route("/{*path}", any(count))
            .with_state((self.hits.clone(), self.host.clone()));
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        self.running = Some((tx, task));
    }

    /// Stops accepting and closes its connections: the port refuses.
    async fn stop(&mut self) {
        let (tx, task) = self.running.take().expect("running");
        let _ = tx.send(());
        task.await.unwrap();
    }

    /// Serves again on the same port.
    async fn restart(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn balanced(name: &str, replicas: &[&Replica]) -> DownstreamBuilder {
    Downstream::builder(name, &replicas[0].url())
        .base_urls(replicas.iter().map(|r| r.url()))
        .backoff(Duration::from_millis(1), Duration::from_millis(2))
}

#[tokio::test]
async fn calls_spread_over_every_replica() {
    let replicas = [
        Replica::start().await,
        Replica::start().await,
        Replica::start().await,
    ];
    let d = balanced("lb-spread", &replicas.iter().collect::<Vec<_>>())
        .build()
        .unwrap();
    assert_eq!(d.endpoints().len(), 3);

    // 300 calls, 10 at a time.
    let cx = CallContext::background();
    for _ in 0..30 {
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..10 {
            let d = d.clone();
            let cx = cx.clone();
            batch.spawn(async move { d.anonymous(&cx).get("/x").send().await });
        }
        while let Some(res) = batch.join_next().await {
            res.unwrap().unwrap();
        }
    }
    let hits: Vec<usize> = replicas.iter().map(Replica::hits).collect();
    assert_eq!(hits.iter().sum::<usize>(), 300, "{hits:?}");
    // Uniform choice would give 100 each; 40 is far in the tail.
    assert!(hits.iter().all(|&h| h >= 40), "{hits:?}");
    assert!(d.endpoints().iter().all(|e| !e.ejected && e.in_flight == 0));
}

#[tokio::test]
async fn a_stopped_replica_is_ejected_without_an_error_and_comes_back() {
    let handle = chassis::metrics::install_recorder();
    let mut replicas = [
        Replica::start().await,
        Replica::start().await,
        Replica::start().await,
    ];
    let mut outlier = OutlierDetection::default();
    outlier.consecutive_failures = 1;
    outlier.base_ejection = Duration::from_millis(300);
    let d = balanced("lb-eject", &replicas.iter().collect::<Vec<_>>())
        .outlier_detection(outlier)
        .build()
        .unwrap();
    let cx = CallContext::background();
    for _ in 0..30 {
        d.anonymous(&cx).get("/x").send().await.unwrap();
    }

    replicas[1].stop().await;
    let stopped = replicas[1].addr.to_string();
    let before = replicas[1].hits();
    // Every call succeeds: an attempt on the stopped replica fails to
    // connect, ejects it, and the retry goes to another.
    for n in 0..100 {
        let res = d.anonymous(&cx).get("/x").send().await;
        assert!(res.is_ok(), "call {n}: {res:?}");
    }
    assert_eq!(replicas[1].hits(), before);
    let ejected: Vec<_> = d.endpoints().into_iter().filter(|e| e.ejected).collect();
    assert_eq!(ejected.len(), 1, "{ejected:?}");
    assert_eq!(ejected[0].address, stopped);
    let text = chassis::metrics::render(&handle);
    for series in [
        "http_client_ejections_total{service=\"\",downstream=\"lb-eject\"} 1",
        "http_client_endpoints{service=\"\",downstream=\"lb-eject\",state=\"ejected\"} 1",
        "http_client_endpoints{service=\"\",downstream=\"lb-eject\",state=\"healthy\"} 2",
    ] {
        assert!(text.contains(series), "{series} in\n{text}");
    }

    // Back on the same port: once its ejection is over it is called again.
    replicas[1].restart().await;
    let mut calls = 0;
    while replicas[1].hits() == before {
        d.anonymous(&cx).get("/x").send().await.unwrap();
        calls += 1;
        assert!(calls < 2_000, "the restarted replica got no call");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(d.endpoints().iter().all(|e| !e.ejected));
}

/// A replica that refuses connections costs a `POST` without an
/// `Idempotency-Key` nothing either: a request that never left is sent to
/// another address. With one address it is not retried, as before.
#[tokio::test]
async fn a_request_refused_a_connection_goes_to_another_replica_whatever_its_method() {
    let replica = Replica::start().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let d = Downstream::builder("lb-post", &refused)
        .base_urls([refused.clone(), replica.url()])
        .backoff(Duration::from_millis(1), Duration::from_millis(2))
        .build()
        .unwrap();
    let cx = CallContext::background();
    for n in 0..50 {
        let res = d.anonymous(&cx).post("/orders").send().await;
        assert!(res.is_ok(), "call {n}: {res:?}");
    }
    assert_eq!(replica.hits(), 50);

    let alone = Downstream::builder("lb-post-alone", &refused)
        .backoff(Duration::from_millis(1), Duration::from_millis(2))
        .build()
        .unwrap();
    let err = alone
        .anonymous(&cx)
        .post("/orders")
        .send()
        .await
        .unwrap_err();
    assert!(
        matches!(err, chassis::client::ClientError::Connection { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_dns_name_is_resolved_and_the_host_header_keeps_it() {
    let replica = Replica::start().await;
    let port = replica.addr.port();
    let d = Downstream::builder("lb-dns", &format!("dns+http://localhost:{port}/api"))
        .dns_refresh(Duration::from_millis(20))
        .backoff(Duration::from_millis(1), Duration::from_millis(2))
        .build()
        .unwrap();
    // Nothing is looked up before the first call.
    assert!(d.endpoints().is_empty());
    let cx = CallContext::background();
    // Looked up again every 20 ms while the calls go on; the answer stays
    // the same, and so do the addresses and their state. (Where `localhost`
    // also resolves to ::1, that address refuses, is ejected, and the
    // calls still succeed.)
    for _ in 0..20 {
        d.anonymous(&cx).get("/x").send().await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(replica.hits(), 20);
    assert_eq!(*replica.host.lock().unwrap(), format!("localhost:{port}"));
    let endpoints = d.endpoints();
    assert!(
        endpoints
            .iter()
            .any(|e| e.address == replica.addr.to_string() && !e.ejected),
        "{endpoints:?}"
    );
}

#[tokio::test]
async fn one_base_url_has_one_endpoint() {
    let replica = Replica::start().await;
    let d = Downstream::builder("lb-one", &replica.url())
        .build()
        .unwrap();
    let endpoints = d.endpoints();
    assert_eq!(endpoints.len(), 1);
    assert_eq!(endpoints[0].address, replica.addr.to_string());
    d.anonymous(&CallContext::background())
        .get("/x")
        .send()
        .await
        .unwrap();
    assert_eq!(replica.hits(), 1);
}

#[test]
fn every_problem_of_a_url_list_is_listed() {
    let env = Env::from_pairs([(
        "CHASSIS_DOWNSTREAM_LB_BAD_URL",
        "http://127.0.0.1:1, ,https://127.0.0.1:2,ftp://127.0.0.1:3,not a url,http://127.0.0.1:1",
    )]);
    let mut r = Reader::new(&env);
    let _ = Downstream::builder("lb-bad", "http://127.0.0.1:1").read(&mut r);
    let message = r.finish().unwrap_err().to_string();
    for part in [
        "CHASSIS_DOWNSTREAM_LB_BAD_URL",
        "entry 2 of the list is empty",
        "ftp://127.0.0.1:3",
        "\"not a url\" is not a URL",
        "mix http:// and https://",
        "127.0.0.1:1 is listed twice",
    ] {
        assert!(message.contains(part), "{part:?} missing from {message}");
    }
}

#[test]
fn lists_need_one_path_and_dns_stands_alone() {
    let err = Downstream::builder("lb-paths", "http://127.0.0.1:1/a,http://127.0.0.1:2/b")
        .build()
        .unwrap_err()
        .to_string();
    assert!(err.contains("different paths"), "{err}");
    let err = Downstream::builder("lb-dns-list", "dns+http://localhost:1,http://127.0.0.1:2")
        .build()
        .unwrap_err()
        .to_string();
    assert!(err.contains("give it alone"), "{err}");
    let env = Env::from_pairs([
        (
            "CHASSIS_DOWNSTREAM_LB_TUNED_OUTLIER_CONSECUTIVE_FAILURES",
            "0",
        ),
        (
            "CHASSIS_DOWNSTREAM_LB_TUNED_OUTLIER_MAX_EJECT_PERCENT",
            "101",
        ),
        ("CHASSIS_DOWNSTREAM_LB_TUNED_DNS_REFRESH_MS", "0"),
    ]);
    let mut r = Reader::new(&env);
    let _ = Downstream::builder("lb-tuned", "http://127.0.0.1:1").read(&mut r);
    let message = r.finish().unwrap_err().to_string();
    for var in [
        "OUTLIER_CONSECUTIVE_FAILURES",
        "OUTLIER_MAX_EJECT_PERCENT",
        "DNS_REFRESH_MS",
    ] {
        assert!(message.contains(var), "{var} missing from {message}");
    }
}
