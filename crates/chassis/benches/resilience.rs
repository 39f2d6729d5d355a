//! What a closed circuit breaker and a bulkhead cost per call.
//!
//! Groups:
//! - `permits`: the bare operations, one call's worth: breaker acquire and
//!   record; bulkhead acquire and release; tower's `ConcurrencyLimit`
//!   semaphore acquire and release for comparison;
//! - `layers`: one call through a ready service wrapped in breaker +
//!   bulkhead, in tower's `ConcurrencyLimit`, in the `tower-resilience`
//!   crates' breaker + bulkhead (fail-fast, same window), and bare;
//! - `contended`: breaker + bulkhead permits taken by 2 threads at once.
//!
//! Run with `cargo bench -p chassis --bench resilience`.

use std::{hint::black_box, sync::Arc, time::Duration};

use chassis::{
    BoxError,
    bulkhead::{Bulkhead, BulkheadLayer},
    circuit_breaker::{CircuitBreaker, CircuitBreakerLayer, Config, Outcome},
};
use criterion::{Criterion, criterion_group, criterion_main};
use tower::{Layer, ServiceExt, limit::ConcurrencyLimitLayer, service_fn};

fn permits(c: &mut Criterion) {
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

fn layers(c: &mut Criterion) {
    let mut g = c.benchmark_group("layers");
    g.measurement_time(Duration::from_secs(3)).sample_size(50);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let handler = service_fn(|x: u64| async move { Ok::<_, BoxError>(x + 1) });
    let (guarded, limited, peer) = {
        let _guard = rt.enter();
        let breaker = CircuitBreaker::new("bench-layer", Config::count(100));
        let guarded = CircuitBreakerLayer::with_classifier(breaker, |r: &Result<u64, BoxError>| {
            if r.is_ok() {
                Outcome::Success
            } else {
                Outcome::Failure
            }
        })
        .layer(BulkheadLayer::new(Bulkhead::new("bench-layer", 64)).layer(handler));
        let limited = ConcurrencyLimitLayer::new(64).layer(handler);
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
        let peer = peer_breaker.layer(peer_bulkhead.layer(handler));
        (guarded, limited, peer)
    };
    g.bench_function("bare", |b| {
        b.to_async(&rt).iter(|| handler.oneshot(black_box(1)))
    });
    g.bench_function("breaker_and_bulkhead", |b| {
        b.to_async(&rt)
            .iter(|| guarded.clone().oneshot(black_box(1)))
    });
    g.bench_function("tower_concurrency_limit", |b| {
        b.to_async(&rt)
            .iter(|| limited.clone().oneshot(black_box(1)))
    });
    g.bench_function("tower_resilience_breaker_and_bulkhead", |b| {
        b.to_async(&rt).iter(|| peer.clone().oneshot(black_box(1)))
    });
    g.finish();
}

fn contended(c: &mut Criterion) {
    let mut g = c.benchmark_group("contended");
    g.measurement_time(Duration::from_secs(3)).sample_size(30);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let breaker = CircuitBreaker::new("bench-2", Config::count(100));
    let bulkhead = Bulkhead::new("bench-2", 64);
    g.bench_function("breaker_and_bulkhead_2_threads", |b| {
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
    g.finish();
}

criterion_group!(benches, permits, layers, contended);
criterion_main!(benches);
