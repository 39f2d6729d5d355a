//! The timing and choice rules of balancing, on paused time, with an inner
//! step that answers by address instead of a network.

use std::{
    collections::{HashSet, VecDeque},
    sync::Mutex,
};

use http::StatusCode;
use tower::{ServiceExt, service_fn};

use super::*;

const A: &str = "127.0.0.1:1";
const B: &str = "127.0.0.1:2";
const C: &str = "127.0.0.1:3";
const D: &str = "127.0.0.1:4";

/// Addresses that answer 503; every address called, in order.
#[derive(Clone, Default)]
struct Replicas {
    failing: Arc<Mutex<HashSet<String>>>,
    called: Arc<Mutex<Vec<String>>>,
}

impl Replicas {
    fn fail(&self, address: &str, failing: bool) {
        let mut set = self.failing.lock().unwrap();
        if failing {
            set.insert(address.to_owned());
        } else {
            set.remove(address);
        }
    }

    fn calls_to(&self, address: &str) -> usize {
        self.called
            .lock()
            .unwrap()
            .iter()
            .filter(|a| *a == address)
            .count()
    }

    fn service(
        &self,
        balancer: &Balancer,
    ) -> impl Service<
        Request<()>,
        Response = Response<Bytes>,
        Error = BoxError,
        Future = BoxFuture<Result<Response<Bytes>, BoxError>>,
    > + Clone
    + use<> {
        let this = self.clone();
        balancer.layer(service_fn(move |req: Request<()>| {
            let address = req.uri().authority().unwrap().to_string();
            let status = if this.failing.lock().unwrap().contains(&address) {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            };
            this.called.lock().unwrap().push(address);
            async move {
                Ok::<_, BoxError>(
                    Response::builder()
                        .status(status)
                        .body(Bytes::new())
                        .unwrap(),
                )
            }
        }))
    }
}

fn list(addresses: &[&str], outlier: OutlierDetection) -> Balancer {
    Balancer::new(
        &Arc::from("balance-test"),
        Targets::List(addresses.iter().map(|a| a.parse().unwrap()).collect()),
        outlier,
    )
}

fn outlier(consecutive_failures: u32, percent: f64) -> OutlierDetection {
    OutlierDetection {
        consecutive_failures,
        base_ejection: Duration::from_secs(10),
        max_ejection: Duration::from_secs(300),
        max_ejected_percent: percent,
    }
}

fn request() -> Request<()> {
    Request::get("http://placeholder/x").body(()).unwrap()
}

fn ejected(balancer: &Balancer) -> Vec<String> {
    balancer
        .status()
        .into_iter()
        .filter(|e| e.ejected)
        .map(|e| e.address)
        .collect()
}

/// Calls until `address` has been called `n` more times.
async fn call_until<S>(svc: &S, replicas: &Replicas, address: &str, n: usize)
where
    S: Service<Request<()>, Response = Response<Bytes>, Error = BoxError> + Clone,
{
    let target = replicas.calls_to(address) + n;
    for _ in 0..10_000 {
        if replicas.calls_to(address) >= target {
            return;
        }
        let _ = svc.clone().oneshot(request()).await;
    }
    panic!("{address} was not called {n} more times");
}

#[tokio::test(start_paused = true)]
async fn a_failing_address_is_ejected_for_a_doubling_time_and_comes_back_on_probation() {
    let replicas = Replicas::default();
    let balancer = list(&[A, B, C], outlier(3, 50.0));
    let svc = replicas.service(&balancer);
    replicas.fail(B, true);

    call_until(&svc, &replicas, B, 3).await;
    assert_eq!(ejected(&balancer), [B]);
    let calls = replicas.calls_to(B);
    for _ in 0..100 {
        svc.clone().oneshot(request()).await.unwrap();
    }
    assert_eq!(
        replicas.calls_to(B),
        calls,
        "an ejected address is not called"
    );

    // Out for 10 s; then back on probation: one failure ejects it for 20 s.
    tokio::time::advance(Duration::from_millis(9_990)).await;
    assert_eq!(ejected(&balancer), [B]);
    tokio::time::advance(Duration::from_millis(10)).await;
    assert!(ejected(&balancer).is_empty());
    call_until(&svc, &replicas, B, 1).await;
    assert_eq!(ejected(&balancer), [B]);
    tokio::time::advance(Duration::from_millis(19_990)).await;
    assert_eq!(ejected(&balancer), [B]);
    tokio::time::advance(Duration::from_millis(10)).await;
    assert!(ejected(&balancer).is_empty());

    // Healthy again, and for as long as it was last out: the next
    // ejection takes 3 failures and lasts 10 s again.
    replicas.fail(B, false);
    call_until(&svc, &replicas, B, 1).await;
    tokio::time::advance(Duration::from_secs(20)).await;
    call_until(&svc, &replicas, B, 1).await;
    replicas.fail(B, true);
    call_until(&svc, &replicas, B, 2).await;
    assert!(ejected(&balancer).is_empty(), "2 failures do not eject");
    call_until(&svc, &replicas, B, 1).await;
    assert_eq!(ejected(&balancer), [B]);
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(ejected(&balancer).is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_ejection_time_is_capped() {
    let replicas = Replicas::default();
    let mut o = outlier(1, 50.0);
    o.max_ejection = Duration::from_secs(25);
    let balancer = list(&[A, B], o);
    let svc = replicas.service(&balancer);
    replicas.fail(B, true);
    // 10 s, 20 s, then 25 s instead of 40 s.
    for out in [10, 20, 25, 25] {
        call_until(&svc, &replicas, B, 1).await;
        assert_eq!(ejected(&balancer), [B]);
        tokio::time::advance(Duration::from_secs(out) - Duration::from_millis(1)).await;
        assert_eq!(ejected(&balancer), [B], "{out} s");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(ejected(&balancer).is_empty(), "{out} s");
    }
}

#[tokio::test(start_paused = true)]
async fn never_more_than_the_share_is_ejected() {
    for (addresses, percent, most) in [
        (&[A, B][..], 50.0, 1),
        (&[A, B, C, D][..], 50.0, 2),
        (&[A, B, C][..], 10.0, 1),
        (&[A, B, C][..], 100.0, 3),
        (&[A, B, C][..], 0.0, 0),
        (&[A][..], 100.0, 0),
    ] {
        let replicas = Replicas::default();
        let balancer = list(addresses, outlier(1, percent));
        let svc = replicas.service(&balancer);
        for a in addresses {
            replicas.fail(a, true);
        }
        for _ in 0..200 {
            let _ = svc.clone().oneshot(request()).await;
        }
        assert_eq!(
            ejected(&balancer).len(),
            most,
            "{addresses:?} at {percent} %"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn with_every_address_ejected_calls_still_go_out() {
    let replicas = Replicas::default();
    let balancer = list(&[A, B], outlier(1, 100.0));
    let svc = replicas.service(&balancer);
    replicas.fail(A, true);
    replicas.fail(B, true);
    for _ in 0..50 {
        let _ = svc.clone().oneshot(request()).await;
    }
    assert_eq!(ejected(&balancer).len(), 2);
    let before = replicas.called.lock().unwrap().len();
    let res = svc.clone().oneshot(request()).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(replicas.called.lock().unwrap().len(), before + 1);
}

#[tokio::test(start_paused = true)]
async fn a_retry_goes_to_another_address() {
    let balancer = list(&[A, B, C], outlier(3, 50.0));
    let now = Instant::now();
    for _ in 0..100 {
        let first = balancer.shared.pick(0, now).unwrap();
        let again = balancer.shared.pick(first.id, now).unwrap();
        assert_ne!(first.authority, again.authority);
    }
    // With one address left, the retry goes to it anyway.
    let single = list(&[A], outlier(3, 50.0));
    let only = single.shared.pick(0, now).unwrap();
    assert_eq!(single.shared.pick(only.id, now).unwrap().id, only.id);
}

#[tokio::test(start_paused = true)]
async fn the_less_loaded_of_two_is_chosen() {
    let balancer = list(&[A, B, C], outlier(3, 50.0));
    let set = balancer.shared.snapshot();
    let busy = InFlight::new(&set[0]);
    let now = Instant::now();
    for _ in 0..200 {
        // Every draw of two includes an idle address.
        assert_ne!(balancer.shared.pick(0, now).unwrap().authority, A);
    }
    drop(busy);
    let picked: HashSet<String> = (0..200)
        .map(|_| balancer.shared.pick(0, now).unwrap().authority.to_string())
        .collect();
    assert_eq!(picked.len(), 3);
}

/// A resolver answering from a script, one answer per lookup (the last
/// one again when the script runs out).
fn scripted(answers: Vec<io::Result<Vec<SocketAddr>>>) -> (Resolve, Arc<AtomicUsize>) {
    let answers = Arc::new(Mutex::new(VecDeque::from(answers)));
    let lookups = Arc::new(AtomicUsize::new(0));
    let counter = lookups.clone();
    let resolve = Resolve(Arc::new(move |host: String, port: u16| {
        assert_eq!((host.as_str(), port), ("ticketing.internal", 8080));
        counter.fetch_add(1, Ordering::SeqCst);
        let mut answers = answers.lock().unwrap();
        let answer = if answers.len() > 1 {
            answers.pop_front().unwrap()
        } else {
            match answers.front().unwrap() {
                Ok(a) => Ok(a.clone()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            }
        };
        Box::pin(async move { answer })
    }));
    (resolve, lookups)
}

fn addrs(list: &[&str]) -> Vec<SocketAddr> {
    list.iter().map(|a| a.parse().unwrap()).collect()
}

fn addresses(balancer: &Balancer) -> Vec<String> {
    let mut a: Vec<String> = balancer.status().into_iter().map(|e| e.address).collect();
    a.sort();
    a
}

#[tokio::test(start_paused = true)]
async fn a_name_is_looked_up_again_and_known_addresses_keep_their_state() {
    let (resolve, lookups) = scripted(vec![
        Ok(addrs(&[A, B, B])),
        Ok(addrs(&[B, C])),
        Err(io::Error::other("SERVFAIL")),
        Ok(Vec::new()),
        Ok(addrs(&[C, B])),
    ]);
    let balancer = Balancer::new(
        &Arc::from("balance-dns"),
        Targets::Dns {
            host: "ticketing.internal".to_owned(),
            port: 8080,
            host_header: HeaderValue::from_static("ticketing.internal:8080"),
            refresh: Duration::from_secs(5),
            resolve,
        },
        outlier(1, 50.0),
    );
    let replicas = Replicas::default();
    let svc = replicas.service(&balancer);
    assert!(balancer.status().is_empty());

    // The first call waits for the lookup; duplicates are dropped.
    replicas.fail(B, true);
    call_until(&svc, &replicas, B, 1).await;
    assert_eq!(addresses(&balancer), [A, B]);
    assert_eq!(ejected(&balancer), [B]);
    assert_eq!(lookups.load(Ordering::SeqCst), 1);

    // Within the interval, no lookup.
    svc.clone().oneshot(request()).await.unwrap();
    assert_eq!(lookups.load(Ordering::SeqCst), 1);

    // After it, one lookup in the background: A is gone, B keeps its
    // ejection, C is new.
    let step = |lookups: Arc<AtomicUsize>, svc, want: usize| async move {
        tokio::time::advance(Duration::from_secs(5)).await;
        let _ = ServiceExt::<Request<()>>::oneshot(svc, request()).await;
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(lookups.load(Ordering::SeqCst), want);
    };
    step(lookups.clone(), svc.clone(), 2).await;
    assert_eq!(addresses(&balancer), [B, C]);
    assert_eq!(ejected(&balancer), [B]);

    // A failed lookup and an empty answer keep the addresses known.
    step(lookups.clone(), svc.clone(), 3).await;
    assert_eq!(addresses(&balancer), [B, C]);
    step(lookups.clone(), svc.clone(), 4).await;
    assert_eq!(addresses(&balancer), [B, C]);

    // The same addresses in another order change nothing.
    let before: Vec<u64> = balancer.shared.snapshot().iter().map(|e| e.id).collect();
    step(lookups.clone(), svc.clone(), 5).await;
    let after: Vec<u64> = balancer.shared.snapshot().iter().map(|e| e.id).collect();
    assert_eq!(before, after);

    // Every call carried the name as `Host`... checked where the request
    // leaves the step:
    let seen = Arc::new(Mutex::new(None));
    let out = seen.clone();
    let probe = balancer.layer(service_fn(move |req: Request<()>| {
        *out.lock().unwrap() = req.headers().get(header::HOST).cloned();
        async { Ok::<_, BoxError>(Response::new(Bytes::new())) }
    }));
    probe.oneshot(request()).await.unwrap();
    assert_eq!(
        seen.lock().unwrap().as_ref().unwrap(),
        "ticketing.internal:8080"
    );
}

#[tokio::test(start_paused = true)]
async fn a_name_that_never_resolved_fails_the_call_as_a_connection_error() {
    let (resolve, _) = scripted(vec![Err(io::Error::other("NXDOMAIN"))]);
    let balancer = Balancer::new(
        &Arc::from("balance-nxdomain"),
        Targets::Dns {
            host: "ticketing.internal".to_owned(),
            port: 8080,
            host_header: HeaderValue::from_static("ticketing.internal:8080"),
            refresh: Duration::from_secs(5),
            resolve,
        },
        outlier(1, 50.0),
    );
    let svc = Replicas::default().service(&balancer);
    let err = svc.oneshot(request()).await.unwrap_err();
    assert!(
        matches!(err.downcast_ref::<TransportError>(), Some(TransportError::Connection(m)) if m.contains("ticketing.internal")),
        "{err}"
    );
}

#[test]
fn the_share_rounds_down_but_allows_one() {
    assert_eq!(max_ejected(1, 50.0), 0);
    assert_eq!(max_ejected(2, 10.0), 1);
    assert_eq!(max_ejected(3, 50.0), 1);
    assert_eq!(max_ejected(10, 35.0), 3);
    assert_eq!(max_ejected(10, 0.0), 0);
    assert_eq!(max_ejected(3, 100.0), 3);
}

#[tokio::test(start_paused = true)]
async fn a_lookup_that_hangs_is_cut_and_only_one_runs_at_a_time() {
    let lookups = Arc::new(AtomicUsize::new(0));
    let counter = lookups.clone();
    let resolve = Resolve(Arc::new(move |_host: String, _port: u16| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            if n == 0 {
                Ok(addrs(&[A]))
            } else {
                std::future::pending().await
            }
        })
    }));
    let balancer = Balancer::new(
        &Arc::from("balance-hang"),
        Targets::Dns {
            host: "ticketing.internal".to_owned(),
            port: 8080,
            host_header: HeaderValue::from_static("ticketing.internal:8080"),
            refresh: Duration::from_secs(1),
            resolve,
        },
        outlier(1, 50.0),
    );
    let svc = Replicas::default().service(&balancer);
    svc.clone().oneshot(request()).await.unwrap();
    // The second lookup hangs; calls go on with the address known, and no
    // other lookup starts while it hangs.
    for _ in 0..9 {
        tokio::time::advance(Duration::from_secs(1)).await;
        svc.clone().oneshot(request()).await.unwrap();
        tokio::task::yield_now().await;
    }
    assert_eq!(lookups.load(Ordering::SeqCst), 2);
    // Cut after 10 s; the next due call starts another.
    tokio::time::advance(Duration::from_secs(2)).await;
    tokio::task::yield_now().await;
    tokio::time::advance(Duration::from_secs(1)).await;
    svc.clone().oneshot(request()).await.unwrap();
    tokio::task::yield_now().await;
    assert_eq!(lookups.load(Ordering::SeqCst), 3);
    assert_eq!(addresses(&balancer), [A]);
}
