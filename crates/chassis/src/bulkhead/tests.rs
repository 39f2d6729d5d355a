//! The scenarios C15-C19 of the reference, and a stress test.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use tokio::sync::Notify;
use tower::{ServiceExt, service_fn};

use super::*;

/// A downstream that holds every call until released, tracking how many
/// run at once and the most that ever did.
#[derive(Clone, Default)]
struct Held {
    gate: Arc<Notify>,
    now: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    hold: bool,
}

impl Held {
    fn svc(
        &self,
        b: &Bulkhead,
    ) -> BulkheadService<
        impl Service<u32, Response = u32, Error = BoxError, Future: Send> + Clone + Send + use<>,
    > {
        let me = self.clone();
        BulkheadLayer::new(b.clone()).layer(service_fn(move |x: u32| {
            let me = me.clone();
            async move {
                let n = me.now.fetch_add(1, Ordering::SeqCst) + 1;
                me.peak.fetch_max(n, Ordering::SeqCst);
                if me.hold {
                    me.gate.notified().await;
                } else {
                    tokio::task::yield_now().await;
                }
                me.now.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, BoxError>(x)
            }
        }))
    }
}

async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

// C15
#[tokio::test(start_paused = true)]
async fn the_call_over_the_limit_is_refused_at_once() {
    let b = Bulkhead::new("t", 10);
    let held = Held {
        hold: true,
        ..Held::default()
    };
    let svc = held.svc(&b);
    let running: Vec<_> = (0..10)
        .map(|i| tokio::spawn(svc.clone().oneshot(i)))
        .collect();
    settle().await;
    assert_eq!(b.in_use(), 10);
    let start = tokio::time::Instant::now();
    let err = svc.clone().oneshot(99).await.unwrap_err();
    assert!(err.is::<BulkheadFull>());
    assert_eq!(start.elapsed(), Duration::ZERO, "refused without waiting");
    assert_eq!(
        b.in_use(),
        10,
        "a refusal takes nothing and gives nothing back"
    );
    assert_eq!(b.try_acquire().unwrap_err().name(), "t");
    assert_eq!(b.shared.used.load(Ordering::SeqCst), 10);
    held.gate.notify_waiters();
    for r in running {
        r.await.unwrap().unwrap();
    }
    assert_eq!(b.shared.used.load(Ordering::SeqCst), 0);
}

// C16
#[tokio::test(start_paused = true)]
async fn dropped_calls_give_their_places_back() {
    let b = Bulkhead::new("t", 10);
    let held = Held {
        hold: true,
        ..Held::default()
    };
    let svc = held.svc(&b);
    let running: Vec<_> = (0..10)
        .map(|i| tokio::spawn(svc.clone().oneshot(i)))
        .collect();
    settle().await;
    assert_eq!(b.in_use(), 10);
    for r in &running {
        r.abort();
    }
    for r in running {
        let _ = r.await;
    }
    assert_eq!(b.in_use(), 0);
}

// C17
#[tokio::test(start_paused = true)]
async fn a_panicking_call_gives_its_place_back() {
    let b = Bulkhead::new("t", 1);
    let svc = BulkheadLayer::new(b.clone()).layer(service_fn(|_: u32| async {
        if true {
            panic!("boom");
        }
        Ok::<u32, BoxError>(0)
    }));
    let joined = tokio::spawn(svc.oneshot(1)).await;
    assert!(joined.unwrap_err().is_panic(), "the panic surfaces");
    assert_eq!(b.in_use(), 0);
}

// C18
#[tokio::test(start_paused = true)]
async fn readiness_and_clones_hold_nothing() {
    let b = Bulkhead::new("t", 2);
    let held = Held::default();
    let mut svc = held.svc(&b);
    for _ in 0..10 {
        std::future::poll_fn(|cx| svc.poll_ready(cx)).await.unwrap();
        let mut clone = svc.clone();
        std::future::poll_fn(|cx| clone.poll_ready(cx))
            .await
            .unwrap();
        drop(clone);
    }
    assert_eq!(b.in_use(), 0);
    assert_eq!(svc.oneshot(7).await.unwrap(), 7);
    assert_eq!(b.in_use(), 0);
}

// C19
#[tokio::test(start_paused = true)]
async fn a_bounded_wait_then_refusal() {
    let b = Bulkhead::with_queue("t", 10, 5, Duration::from_millis(100));
    let held = Held {
        hold: true,
        ..Held::default()
    };
    let svc = held.svc(&b);
    let running: Vec<_> = (0..10)
        .map(|i| tokio::spawn(svc.clone().oneshot(i)))
        .collect();
    settle().await;
    let waiting: Vec<_> = (0..5)
        .map(|i| tokio::spawn(svc.clone().oneshot(100 + i)))
        .collect();
    settle().await;
    // The queue is full: the 16th is refused at once.
    assert!(
        svc.clone()
            .oneshot(999)
            .await
            .unwrap_err()
            .is::<BulkheadFull>()
    );
    let start = tokio::time::Instant::now();
    for w in waiting {
        assert!(w.await.unwrap().unwrap_err().is::<BulkheadFull>());
    }
    assert_eq!(
        start.elapsed(),
        Duration::from_millis(100),
        "waited exactly the bound"
    );
    // A waiter gets a place freed within the bound.
    let w = tokio::spawn(svc.clone().oneshot(7));
    settle().await;
    assert_eq!(b.shared.waiting.load(Ordering::SeqCst), 1);
    held.gate.notify_one();
    settle().await;
    assert_eq!(
        b.shared.waiting.load(Ordering::SeqCst),
        0,
        "the waiter took the freed place"
    );
    assert_eq!(b.in_use(), 10);
    held.gate.notify_waiters();
    assert_eq!(w.await.unwrap().unwrap(), 7);
    for r in running {
        let _ = r.await;
    }
    assert_eq!(b.in_use(), 0);
    assert_eq!(b.shared.waiting.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn never_more_than_the_limit_in_flight() {
    let b = Bulkhead::with_queue("t", 8, 10_000, Duration::from_secs(60));
    let held = Held::default();
    let svc = held.svc(&b);
    let tasks: Vec<_> = (0..2_000)
        .map(|i| tokio::spawn(svc.clone().oneshot(i)))
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let peak = held.peak.load(Ordering::SeqCst);
    assert!(peak <= 8, "peak {peak}");
    assert_eq!(b.in_use(), 0);
}
