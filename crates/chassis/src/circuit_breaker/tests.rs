//! The scenarios C1-C14, C20 and C21 of the reference, with a paused clock.

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use http::{Response, StatusCode};
use tokio::sync::Notify;
use tower::{Layer, Service, ServiceExt, service_fn};

use super::{window::Ring, *};
use crate::BoxError;

fn breaker(config: Config) -> CircuitBreaker {
    CircuitBreaker::new("test", config)
}

fn outcomes(b: &CircuitBreaker, fails: &[bool]) {
    for f in fails {
        let p = b.try_acquire().expect("admitted");
        if *f { p.failure() } else { p.success() }
    }
}

fn ten() -> Config {
    Config::count(10)
        .minimum_calls(10)
        .failure_rate(0.5)
        .wait_in_open(Duration::from_secs(30))
}

/// A downstream counting its hits, answering `status`, or waiting for `gate`.
#[derive(Clone, Default)]
struct Downstream {
    hits: Arc<AtomicUsize>,
    gate: Option<Arc<Notify>>,
}

impl Downstream {
    fn layer(
        &self,
        b: &CircuitBreaker,
        status: StatusCode,
    ) -> impl Service<(), Response = Response<()>, Error = BoxError, Future: Send + 'static>
    + Clone
    + Send
    + 'static
    + use<> {
        let me = self.clone();
        let svc = service_fn(move |()| {
            let me = me.clone();
            async move {
                me.hits.fetch_add(1, Ordering::SeqCst);
                if let Some(g) = &me.gate {
                    g.notified().await;
                }
                let mut res = Response::new(());
                *res.status_mut() = status;
                Ok::<_, BoxError>(res)
            }
        });
        CircuitBreakerLayer::http(b.clone()).layer(svc)
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

// C1, C2
#[tokio::test(start_paused = true)]
async fn opens_only_after_minimum_calls() {
    let b = breaker(ten());
    outcomes(&b, &[true; 9]);
    assert_eq!(b.state(), State::Closed, "9 calls are below the minimum");
    outcomes(&b, &[false]);
    assert_eq!(b.state(), State::Open, "9 of 10 failed");
    let d = Downstream::default();
    let err = d.layer(&b, StatusCode::OK).oneshot(()).await.unwrap_err();
    let open = err
        .downcast_ref::<CircuitOpen>()
        .expect("a CircuitOpen error");
    assert_eq!(open.retry_after(), Duration::from_secs(30));
    assert_eq!(d.hits(), 0, "the downstream is not touched while open");
}

// C3
#[tokio::test(start_paused = true)]
async fn the_threshold_itself_trips() {
    let b = breaker(ten());
    outcomes(
        &b,
        &[
            true, false, true, false, true, false, true, false, true, false,
        ],
    );
    assert_eq!(b.state(), State::Open, "5/10 at 50% opens");
    let b = breaker(ten());
    outcomes(
        &b,
        &[
            true, false, true, false, true, false, true, false, false, false,
        ],
    );
    assert_eq!(b.state(), State::Closed, "4/10 does not");
}

// C4, C5
#[tokio::test(start_paused = true)]
async fn exactly_one_probe_after_the_wait() {
    let b = breaker(ten());
    outcomes(&b, &[true; 10]);
    tokio::time::advance(Duration::from_secs(30) - Duration::from_millis(1)).await;
    assert!(
        b.try_acquire().is_err(),
        "still open 1 ms before the end of the wait"
    );
    tokio::time::advance(Duration::from_millis(1)).await;

    let gate = Arc::new(Notify::new());
    let d = Downstream {
        gate: Some(gate.clone()),
        ..Downstream::default()
    };
    let svc = d.layer(&b, StatusCode::OK);
    let calls: Vec<_> = (0..50)
        .map(|_| tokio::spawn(svc.clone().oneshot(())))
        .collect();
    while d.hits() < 1 {
        tokio::task::yield_now().await;
    }
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(b.state(), State::HalfOpen);
    gate.notify_waiters();
    let mut ok = 0;
    let mut rejected = 0;
    for c in calls {
        match c.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) if e.is::<CircuitOpen>() => rejected += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!((ok, rejected, d.hits()), (1, 49, 1));
    // C6: the probe succeeded: closed, with an empty window.
    assert_eq!(b.state(), State::Closed);
    outcomes(&b, &[true; 9]);
    assert_eq!(b.state(), State::Closed, "the window started empty");
}

// C7
#[tokio::test(start_paused = true)]
async fn a_failed_probe_reopens_and_restarts_the_wait() {
    let b = breaker(ten());
    outcomes(&b, &[true; 10]);
    tokio::time::advance(Duration::from_secs(30)).await;
    b.try_acquire().unwrap().failure();
    assert_eq!(b.state(), State::Open);
    tokio::time::advance(Duration::from_secs(29)).await;
    assert!(
        b.try_acquire().is_err(),
        "the wait restarted at the failed probe"
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(b.try_acquire().is_ok());
}

// C8
#[tokio::test(start_paused = true)]
async fn a_dropped_probe_frees_its_place() {
    let b = breaker(ten());
    outcomes(&b, &[true; 10]);
    tokio::time::advance(Duration::from_secs(30)).await;
    let gate = Arc::new(Notify::new());
    let d = Downstream {
        gate: Some(gate),
        ..Downstream::default()
    };
    let svc = d.layer(&b, StatusCode::OK);
    let probe = tokio::spawn(svc.clone().oneshot(()));
    while d.hits() < 1 {
        tokio::task::yield_now().await;
    }
    assert!(b.try_acquire().is_err(), "the probe holds the only place");
    probe.abort();
    let _ = probe.await;
    let next = b.try_acquire().expect("the next call becomes the probe");
    next.success();
    assert_eq!(b.state(), State::Closed);
}

// C9
#[tokio::test(start_paused = true)]
async fn a_hung_probe_counts_as_failed_at_its_deadline() {
    let b = breaker(ten().max_wait_in_half_open(Duration::from_secs(5)));
    outcomes(&b, &[true; 10]);
    tokio::time::advance(Duration::from_secs(30)).await;
    let hung = b.try_acquire().unwrap();
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!(b.try_acquire().is_err());
    assert_eq!(
        b.state(),
        State::Open,
        "the hung probe reopened the breaker"
    );
    // Its late outcome belongs to an old generation and changes nothing.
    hung.success();
    assert_eq!(b.state(), State::Open);
    // The wait counts from the deadline; then a new probe is allowed.
    tokio::time::advance(Duration::from_secs(30)).await;
    b.try_acquire().expect("a new probe").success();
    assert_eq!(b.state(), State::Closed);
}

// C10
#[tokio::test(start_paused = true)]
async fn a_4xx_probe_is_a_success() {
    let b = breaker(ten());
    outcomes(&b, &[true; 10]);
    tokio::time::advance(Duration::from_secs(30)).await;
    let d = Downstream::default();
    let res = d
        .layer(&b, StatusCode::NOT_FOUND)
        .oneshot(())
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    assert_eq!(b.state(), State::Closed);
    // And 5xx are failures.
    let b = breaker(ten());
    for _ in 0..10 {
        let _ = d.layer(&b, StatusCode::BAD_GATEWAY).oneshot(()).await;
    }
    assert_eq!(b.state(), State::Open);
}

// C11
#[tokio::test(start_paused = true)]
async fn stale_outcomes_are_ignored() {
    let b = breaker(ten());
    let slow = b.try_acquire().unwrap();
    outcomes(&b, &[true; 10]);
    assert_eq!(b.state(), State::Open);
    tokio::time::advance(Duration::from_secs(30)).await;
    let probe = b.try_acquire().unwrap();
    slow.failure();
    assert_eq!(b.state(), State::HalfOpen, "the old call decides nothing");
    probe.success();
    assert_eq!(b.state(), State::Closed);
}

// C12
#[tokio::test(start_paused = true)]
async fn slow_calls_trip_at_their_rate() {
    let b = breaker(
        Config::count(5)
            .minimum_calls(5)
            .slow_calls(Duration::from_secs(1), 0.5),
    );
    for slow in [true, false, true, false, true] {
        let p = b.try_acquire().unwrap();
        if slow {
            tokio::time::advance(Duration::from_secs(2)).await;
        }
        p.success();
    }
    assert_eq!(b.state(), State::Open, "3 of 5 calls were slow");
}

// C13
#[tokio::test(start_paused = true)]
async fn time_window_forgets_old_calls() {
    let b = breaker(
        Config::time(Duration::from_secs(10))
            .minimum_calls(11)
            .failure_rate(0.5),
    );
    outcomes(&b, &[true; 10]);
    assert_eq!(b.state(), State::Closed, "below the minimum");
    tokio::time::advance(Duration::from_secs(11)).await;
    let mut calls = vec![false; 10];
    calls.push(true);
    outcomes(&b, &calls);
    assert_eq!(
        b.state(),
        State::Closed,
        "1 failure in the last 10 s, not 11 of 21"
    );
}

// C14
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exact_counts_under_concurrency() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let b = metrics::with_local_recorder(&recorder, || {
        breaker(
            Config::count(20_000)
                .minimum_calls(10_000)
                .failure_rate(0.5),
        )
    });
    let tasks: Vec<_> = (0..10_000)
        .map(|i| {
            let b = b.clone();
            tokio::spawn(async move {
                let p = b.try_acquire().expect("closed until the last outcome");
                tokio::task::yield_now().await;
                if i % 2 == 0 { p.failure() } else { p.success() }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(b.state(), State::Open);
    assert_eq!(b.lock().generation, 1, "exactly one transition");
    // The counters are read from the breaker when metrics are rendered.
    b.shared.refresh_counters();
    let counts: std::collections::HashMap<String, u64> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(k, _, _, v)| {
            let outcome = k
                .key()
                .labels()
                .find(|l| l.key() == "outcome")?
                .value()
                .to_owned();
            match v {
                metrics_util::debugging::DebugValue::Counter(n) => Some((outcome, n)),
                _ => None,
            }
        })
        .collect();
    assert_eq!(counts["success"] + counts["failure"], 10_000);
    assert_eq!(counts["failure"], 5_000);
}

// C20
#[tokio::test(start_paused = true)]
async fn forced_open_and_disabled() {
    let b = breaker(ten());
    b.force_open(true);
    tokio::time::advance(Duration::from_secs(3600)).await;
    assert!(b.try_acquire().is_err(), "forced open never probes");
    assert_eq!(b.state(), State::ForcedOpen);
    b.force_open(false);
    assert_eq!(b.state(), State::Closed);
    b.disable(true);
    outcomes(&b, &[true; 100]);
    assert_eq!(b.state(), State::Disabled, "disabled records nothing");
    b.disable(false);
    outcomes(&b, &[true; 9]);
    assert_eq!(b.state(), State::Closed, "re-enabled with an empty window");
}

// C21: retries outside an open breaker never reach the downstream.
#[tokio::test(start_paused = true)]
async fn retries_outside_an_open_breaker_do_not_hit_the_downstream() {
    let b = breaker(ten());
    outcomes(&b, &[true; 10]);
    let d = Downstream::default();
    let svc = d.layer(&b, StatusCode::OK);
    for _attempt in 0..3 {
        assert!(
            svc.clone()
                .oneshot(())
                .await
                .unwrap_err()
                .is::<CircuitOpen>()
        );
    }
    assert_eq!(d.hits(), 0);
}

// Permits taken in `call`, not `poll_ready`: readying holds nothing.
#[tokio::test(start_paused = true)]
async fn readiness_holds_no_permit() {
    let b = breaker(ten().half_open_calls(1));
    outcomes(&b, &[true; 10]);
    tokio::time::advance(Duration::from_secs(30)).await;
    let d = Downstream::default();
    let mut svc = d.layer(&b, StatusCode::OK);
    for _ in 0..5 {
        std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
    }
    b.try_acquire()
        .expect("readying services took no probe place")
        .success();
}

#[tokio::test(start_paused = true)]
async fn the_state_is_a_readiness_check() {
    use crate::health::Check;
    let b = breaker(ten());
    assert!(b.check().await.is_ok());
    outcomes(&b, &[true; 10]);
    assert_eq!(
        b.check().await.unwrap_err().message(),
        "circuit breaker `test` is open"
    );
}

// The wait in open counts from when the breaker opened, not from when it was
// created or last changed state, even on the clock-free closed path.
#[tokio::test(start_paused = true)]
async fn the_wait_counts_from_the_opening() {
    let b = breaker(ten());
    tokio::time::advance(Duration::from_secs(300)).await;
    outcomes(&b, &[true; 10]);
    assert_eq!(b.state(), State::Open);
    let refused = b.try_acquire().unwrap_err();
    assert_eq!(refused.retry_after(), ten().wait_in_open);
    tokio::time::advance(ten().wait_in_open - Duration::from_millis(1)).await;
    assert!(
        b.try_acquire().is_err(),
        "still open 1 ms before the wait ends"
    );
    tokio::time::advance(Duration::from_millis(1)).await;
    b.try_acquire()
        .expect("a probe once the wait is over")
        .success();
    assert_eq!(b.state(), State::Closed);
}

#[test]
fn ring_slots_follow_the_ticket_modulo_the_window() {
    for n in [1usize, 2, 3, 7, 10, 100, 1000, 4096, 65_537, 1 << 20] {
        let ring = Ring::new(n);
        let tickets = (0..3 * n as u32).chain([u32::MAX - 1, u32::MAX, u32::MAX / 3, 1 << 31]);
        for t in tickets {
            assert_eq!(ring.slot_of(t), t as usize % n, "ticket {t}, window {n}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn outcomes_are_counted_on_every_path() {
    // Count window: successes on the lock-free path are counted per thread.
    let b = CircuitBreaker::new("counted", ten());
    outcomes(&b, &[false, false, true, false]);
    drop(b.try_acquire().expect("admitted")); // ignored: not counted
    assert_eq!(b.shared.totals(), [3, 1, 0, 0]);
    outcomes(&b, &[true; 6]);
    assert_eq!(b.state(), State::Open);
    assert!(b.try_acquire().is_err());
    assert!(b.try_acquire().is_err());
    assert_eq!(b.shared.totals(), [3, 7, 0, 2]);
    // Half-open probes are counted under the lock.
    tokio::time::advance(Duration::from_secs(30)).await;
    b.try_acquire().expect("probe").success();
    assert_eq!(b.state(), State::Closed);
    outcomes(&b, &[false]);
    assert_eq!(b.shared.totals(), [5, 7, 0, 2]);

    // Slow calls on the ring path, and a time window (always locked).
    let slow = CircuitBreaker::new(
        "counted-slow",
        Config::count(100).slow_calls(Duration::from_secs(1), 1.0),
    );
    let p = slow.try_acquire().expect("admitted");
    tokio::time::advance(Duration::from_secs(2)).await;
    p.success();
    outcomes(&slow, &[false]);
    assert_eq!(slow.shared.totals(), [1, 0, 1, 0]);
    let timed = CircuitBreaker::new("counted-time", Config::time(Duration::from_secs(60)));
    outcomes(&timed, &[false, true, false]);
    assert_eq!(timed.shared.totals(), [2, 1, 0, 0]);
}

#[test]
fn successes_into_a_window_of_successes_keep_the_last_n_rule() {
    let b = CircuitBreaker::new(
        "steady",
        Config::count(10).minimum_calls(10).failure_rate(0.3),
    );
    let ring = b.shared.ring.as_ref().expect("count window");
    let counts = || {
        let read = |c: &AtomicI64| c.load(Ordering::SeqCst);
        (read(&ring.filled), read(&ring.failed))
    };
    outcomes(&b, &[false; 10]);
    assert!(ring.all_succeeded());
    // A long healthy stream leaves the window as it is.
    outcomes(&b, &[false; 1_000]);
    assert_eq!(counts(), (10, 0));
    // A failure stays in the window for exactly the next 9 calls ...
    outcomes(&b, &[true]);
    outcomes(&b, &[false; 9]);
    assert_eq!(counts(), (10, 1));
    // ... and the 10th call after it pushes it out.
    outcomes(&b, &[false]);
    assert_eq!(counts(), (10, 0));
    // Three failures among the last ten still trip it, however long the
    // healthy stream before them.
    outcomes(&b, &[false; 500]);
    outcomes(&b, &[true, false, true, false, true]);
    assert_eq!(b.state(), State::Open);
    assert_eq!(b.shared.totals(), [1_522, 4, 0, 0]);
}
