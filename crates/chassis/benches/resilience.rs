//! What a closed circuit breaker and a bulkhead cost per call.
//!
//! Groups:
//! - `permits`: the bare operations, one call's worth: breaker acquire and
//!   record; bulkhead acquire and release; tower's `ConcurrencyLimit`
//!   semaphore acquire and release for comparison;
//! - `layers`: one call through a ready service wrapped in breaker +
//!   bulkhead, in tower's `ConcurrencyLimit`, in the `tower-resilience`
//!   crates' breaker + bulkhead (fail-fast, same window), and bare;
//! - `contended`: breaker + bulkhead permits taken by 2 threads at once, and
//!   calls through each of the layered services above from 2 threads at
//!   once (each thread on its own runtime, as two workers would be).
//!
//! The chassis' Prometheus recorder is installed first, as in a service, so
//! the figures include what the metrics cost a call (the breaker's call
//! counters and the bulkhead's gauge are read when the metrics are
//! rendered, so they cost nothing per call).
//!
//! Run with `cargo bench -p service-chassis --bench resilience`.

use std::{hint::black_box, sync::Arc, time::Duration};

use chassis::{
    BoxError,
    bulkhead::{Bulkhead, BulkheadLayer},
    circuit_breaker::{CircuitBreaker, CircuitBreakerLayer, Config, Outcome},
};
use criterion::{Criterion, criterion_group, criterion_main};
use tower::{Layer, ServiceExt, limit::ConcurrencyLimitLayer, service_fn};

fn permits(c: &mut Criterion) {
    chassis::metrics::install_recorder();
    let mut g = c.benchmark_group("permits");
    g.measurement_time(Duration::from_secs(3)).sample_size(50);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let breaker = CircuitBreaker::new("bench", Config::count(100));
    g.bench_function("breaker_acquire_record", |b| {
        b.iter(|| {
            breaker
                .try_acquire()
                .expect("closed")
                .record(black_box(Outcome::Success))
        });
    });
    let bulkhead = Bulkhead::new("bench", 64);
    g.bench_function("bulkhead_acquire_release", |b| {
        b.iter(|| drop(black_box(bulkhead.try_acquire().expect("room"))));
    });
    let semaphore = Arc::new(tokio::sync::Semaphore::new(64));
    g.bench_function("tower_semaphore_acquire_release", |b| {
        b.iter(|| {
            drop(black_box(
                semaphore.clone().try_acquire_owned().expect("room"),
            ))
        });
    });
    g.finish();
}

type Call = Result<u64, BoxError>;

/// The handler every variant wraps: ready at once.
fn handler() -> impl tower::Service<u64, Response = u64, Error = BoxError, Future: Send>
+ Clone
+ Send
+ Sync
+ 'static {
    service_fn(|x: u64| async move { Ok::<_, BoxError>(x + 1) })
}

/// The layered variants: chassis breaker + bulkhead, tower's
/// `ConcurrencyLimit`, and `tower-resilience`'s breaker + bulkhead (fail-fast,
/// same window). Built inside a runtime, as the peers need one.
fn variants() -> Vec<(
    &'static str,
    tower::util::BoxCloneSyncService<u64, u64, BoxError>,
)> {
    use tower::util::BoxCloneSyncService as Boxed;
    let breaker = CircuitBreaker::new("bench-layer", Config::count(100));
    let guarded = CircuitBreakerLayer::with_classifier(breaker, |r: &Call| {
        if r.is_ok() {
            Outcome::Success
        } else {
            Outcome::Failure
        }
    })
    .layer(BulkheadLayer::new(Bulkhead::new("bench-layer", 64)).layer(handler()));
    let limited = ConcurrencyLimitLayer::new(64).layer(handler());
    let peer_breaker = tower_resilience_circuitbreaker::CircuitBreakerLayer::builder()
        .failure_rate_threshold(0.5)
        .sliding_window_size(100)
        .build()
        .expect("valid breaker");
    let peer_bulkhead = tower_resilience_bulkhead::BulkheadLayer::builder()
        .max_concurrent_calls(64)
        .reject_when_full()
        .build()
        .expect("valid bulkhead");
    let peer = peer_breaker.layer(peer_bulkhead.layer(handler()));
    vec![
        (
            "breaker_and_bulkhead",
            Boxed::new(guarded.map_err(Into::into)),
        ),
        (
            "tower_concurrency_limit",
            Boxed::new(limited.map_err(Into::into)),
        ),
        (
            "tower_resilience_breaker_and_bulkhead",
            Boxed::new(peer.map_err(Into::into)),
        ),
    ]
}

fn layers(c: &mut Criterion) {
    chassis::metrics::install_recorder();
    let mut g = c.benchmark_group("layers");
    g.measurement_time(Duration::from_secs(3)).sample_size(50);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let handler = handler();
    g.bench_function("bare", |b| {
        b.to_async(&rt)
            .iter(|| handler.clone().oneshot(black_box(1)))
    });
    // Unboxed, as a client stack is built: the chassis layers around the
    // handler.
    let guarded = {
        let _guard = rt.enter();
        let breaker = CircuitBreaker::new("bench-layer", Config::count(100));
        CircuitBreakerLayer::with_classifier(breaker, |r: &Call| {
            if r.is_ok() {
                Outcome::Success
            } else {
                Outcome::Failure
            }
        })
        .layer(BulkheadLayer::new(Bulkhead::new("bench-layer", 64)).layer(handler.clone()))
    };
    g.bench_function("breaker_and_bulkhead", |b| {
        b.to_async(&rt)
            .iter(|| guarded.clone().oneshot(black_box(1)))
    });
    let limited = ConcurrencyLimitLayer::new(64).layer(handler.clone());
    g.bench_function("tower_concurrency_limit", |b| {
        b.to_async(&rt)
            .iter(|| limited.clone().oneshot(black_box(1)))
    });
    let peer = {
        let _guard = rt.enter();
        variants().pop().expect("the peer").1
    };
    g.bench_function("tower_resilience_breaker_and_bulkhead", |b| {
        b.to_async(&rt).iter(|| peer.clone().oneshot(black_box(1)))
    });
    g.finish();
}

fn contended(c: &mut Criterion) {
    chassis::metrics::install_recorder();
    let mut g = c.benchmark_group("contended");
    g.measurement_time(Duration::from_secs(3)).sample_size(30);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let breaker = CircuitBreaker::new("bench-2", Config::count(100));
    let bulkhead = Bulkhead::new("bench-2", 64);
    g.bench_function("breaker_and_bulkhead_permits_2_threads", |b| {
        b.iter_custom(|iters| {
            let start = tokio::time::Instant::now();
            std::thread::scope(|s| {
                for _ in 0..2 {
                    s.spawn(|| {
                        for _ in 0..iters {
                            let p = bulkhead.try_acquire().expect("room");
                            breaker.try_acquire().expect("closed").success();
                            drop(p);
                        }
                    });
                }
            });
            // Each thread made `iters` calls in this time, side by side.
            start.elapsed()
        });
    });
    // Through the layers (boxed alike, so the three pay the same box), one
    // runtime per thread sharing the service, as two workers would.
    for (name, svc) in variants() {
        g.bench_function(format!("{name}_2_threads"), |b| {
            b.iter_custom(|iters| {
                let start = tokio::time::Instant::now();
                std::thread::scope(|s| {
                    for _ in 0..2 {
                        let svc = svc.clone();
                        s.spawn(move || {
                            let rt = tokio::runtime::Builder::new_current_thread()
                                .enable_all()
                                .build()
                                .expect("runtime");
                            rt.block_on(async {
                                for i in 0..iters {
                                    black_box(svc.clone().oneshot(i).await.expect("admitted"));
                                }
                            });
                        });
                    }
                });
                start.elapsed()
            });
        });
    }
    g.finish();
}

criterion_group!(benches, permits, layers, contended);
criterion_main!(benches);
