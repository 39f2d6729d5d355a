//! Circuit breaker: stop calling a downstream that is failing.
//!
//! # The standard
//!
//! Every synchronous call to another service goes through a breaker. While
//! the downstream is healthy the breaker is **closed** and only watches: it
//! keeps the outcomes of the last N calls (or of the last N seconds) and,
//! once at least `minimum_calls` are known, compares the failure rate and
//! the slow-call rate with their thresholds (a rate *at* the threshold
//! trips). When one is reached the breaker **opens**: calls fail at once with
//! [`CircuitOpen`] (503 with `Retry-After` at a server boundary) without
//! touching the downstream, which gets time to recover. After
//! `wait_in_open` the breaker goes **half-open** and lets `half_open_calls`
//! probes through (default 1, as Polly and Hystrix do); everyone else is
//! still refused. If the probes succeed it closes with an empty window; if
//! one fails it opens again.
//!
//! The rules that keep a breaker from wedging, learnt from production
//! incidents in other stacks:
//!
//! * a permit is a guard: a call that is dropped (cancelled), panics or
//!   returns early releases its place and is recorded as *ignored*, never as
//!   a success;
//! * a half-open probe has a deadline (`max_wait_in_half_open`): a probe that
//!   hangs past it counts as a failure, so the breaker reopens and later
//!   probes are possible;
//! * every permit carries the generation of the state it was admitted in,
//!   and an outcome from an older generation is ignored (a slow call admitted
//!   while closed cannot decide a half-open test);
//! * permits are taken when the call starts, not in `poll_ready`, so idle
//!   connections hold nothing.
//!
//! While closed with a count window (the default) a call takes no lock: it
//! reads one atomic word on the way in and swaps its outcome into a ring of
//! atomics on the way out; the lock is taken only to change state. A success
//! arriving when the window holds only successes changes nothing in it and
//! is not written at all, so a healthy downstream's calls write no shared
//! memory (successes are counted per thread). A time window and the open
//! and half-open states use a short critical section.
//!
//! `circuit_breaker_state` is set on each change of state; the outcome
//! counts behind `circuit_breaker_calls_total` are kept by the breaker and
//! copied to the metric when the metrics are rendered: each breaker
//! registers a [refresher](crate::metrics::register_refresher) that
//! [`metrics::render`](crate::metrics::render) runs.
//!
//! A breaker lives for the whole process, as its metric series do: create
//! one per downstream at start-up and clone the handle, which copies a
//! reference. Creating breakers per request would grow memory without
//! bound. In exchange a call holds no reference count on it.
//!
//! What counts as a failure is the caller's choice (see
//! [`CircuitBreakerLayer::with_classifier`]); by default errors (transport
//! errors, timeouts) and 5xx responses are failures and 4xx are not (the
//! caller's fault, not the downstream's).
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use chassis::circuit_breaker::{CircuitBreaker, Config, State};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let breaker = CircuitBreaker::new("ticketing", Config::count(4).minimum_calls(4).failure_rate(0.5));
//! for ok in [true, false, true, false] {
//!     let permit = breaker.try_acquire().unwrap();
//!     if ok { permit.success() } else { permit.failure() }
//! }
//! assert_eq!(breaker.state(), State::Open);
//! assert!(breaker.try_acquire().is_err());
//! tokio::time::advance(Duration::from_secs(30)).await;
//! let probe = breaker.try_acquire().unwrap();
//! assert_eq!(breaker.state(), State::HalfOpen);
//! probe.success();
//! assert_eq!(breaker.state(), State::Closed);
//! # }
//! ```

mod config;
mod layer;
mod state;
mod window;

pub use config::Config;
pub use layer::{
    CircuitBreakerLayer, CircuitBreakerService, ClassifyFn, ResponseFuture, http_outcome,
};
pub use state::{CircuitBreaker, CircuitOpen, Outcome, Permit, State};
pub use window::Window;

#[cfg(test)]
mod tests;
