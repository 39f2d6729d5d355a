//! Bulkhead: bound the calls in flight to one downstream.
//!
//! # The standard
//!
//! One slow downstream must not take every connection, task and byte of
//! memory a service has. Each downstream (or, on the server side, each
//! expensive route) gets a bulkhead: at most `max_concurrent` calls in
//! flight. A call over the limit is refused **at once** with
//! [`BulkheadFull`] (503 with `Retry-After` at a server boundary), or, when a
//! bounded wait is configured, waits at most `max_wait` among at most
//! `max_queue` others. A permit is taken when the call starts (never held
//! from `poll_ready`, so idle clones and connections hold nothing) and given
//! back when the call ends, fails, panics or is dropped.
//!
//! `bulkhead_in_use{name}` shows the calls in flight and
//! `bulkhead_rejected_total{name}` the refusals. The gauge is read from the
//! bulkhead's own counter when the metrics are rendered (each bulkhead
//! registers a [refresher](crate::metrics::register_refresher) that
//! [`metrics::render`](crate::metrics::render) runs), so a call pays nothing
//! for it; bulkheads sharing a name add up.
//!
//! A bulkhead lives for the whole process, as its metric series do: create
//! one per downstream (or route) at start-up and clone the handle, which
//! copies a reference. Creating bulkheads per request would grow memory
//! without bound. In exchange the permit of a call holds no reference count,
//! so a call through the layer costs two atomic additions.
//!
//! # Example
//!
//! ```
//! use chassis::bulkhead::{Bulkhead, BulkheadLayer};
//! use tower::{ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let bulkhead = Bulkhead::new("ticketing", 2);
//! let svc = BulkheadLayer::new(bulkhead.clone())
//!     .layer(service_fn(|x: u32| async move { Ok::<_, std::convert::Infallible>(x * 2) }));
//! assert_eq!(svc.oneshot(21).await.unwrap(), 42);
//! assert_eq!(bulkhead.in_use(), 0);
//! # use tower::Layer;
//! # }
//! ```

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::atomic::{AtomicUsize, Ordering},
    task::{Context, Poll, ready},
    time::Duration,
};

use pin_project_lite::pin_project;
use tokio::sync::Notify;
use tower::{Layer, Service};

use crate::BoxError;

/// The error of a call refused because the bulkhead is full.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bulkhead `{name}` is full")]
pub struct BulkheadFull {
    name: &'static str,
}

impl BulkheadFull {
    /// The bulkhead's name.
    pub fn name(&self) -> &str {
        self.name
    }
}

/// A concurrency bound shared by every clone of its layer, living for the
/// whole process; see the [module docs](self).
#[derive(Clone)]
pub struct Bulkhead {
    shared: &'static Shared,
}

struct Shared {
    name: Box<str>,
    max: usize,
    /// Places taken; the fast path is one compare-and-swap.
    used: AtomicUsize,
    /// Wakes a waiting call when a place is given back.
    freed: Notify,
    max_wait: Option<Duration>,
    max_queue: usize,
    waiting: AtomicUsize,
    /// What `in_use` has been told so far.
    reported: AtomicUsize,
    in_use: metrics::Gauge,
    rejected: metrics::Counter,
}

impl fmt::Debug for Bulkhead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bulkhead")
            .field("name", &self.shared.name)
            .field("max", &self.shared.max)
            .field("in_use", &self.in_use())
            .finish_non_exhaustive()
    }
}

impl Bulkhead {
    /// At most `max_concurrent` calls (at least 1), refusing the rest at once.
    pub fn new(name: &str, max_concurrent: usize) -> Self {
        Self::with_queue(name, max_concurrent, 0, Duration::ZERO)
    }

    /// At most `max_concurrent` calls; up to `max_queue` more wait at most
    /// `max_wait` for a place.
    pub fn with_queue(
        name: &str,
        max_concurrent: usize,
        max_queue: usize,
        max_wait: Duration,
    ) -> Self {
        let max = max_concurrent.max(1);
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            name: name.into(),
            max,
            used: AtomicUsize::new(0),
            freed: Notify::new(),
            max_wait: (max_queue > 0 && !max_wait.is_zero()).then_some(max_wait),
            max_queue,
            waiting: AtomicUsize::new(0),
            reported: AtomicUsize::new(0),
            in_use: metrics::gauge!("bulkhead_in_use", "service" => crate::metrics::service_label(), "name" => name.to_owned()),
            rejected: metrics::counter!("bulkhead_rejected_total", "service" => crate::metrics::service_label(), "name" => name.to_owned()),
        }));
        crate::metrics::register_refresher(move || shared.refresh_gauge());
        Self { shared }
    }

    /// Calls in flight now.
    pub fn in_use(&self) -> usize {
        // A refused try counts itself for an instant (see `try_take`).
        self.shared.used.load(Ordering::SeqCst).min(self.shared.max)
    }

    /// The limit.
    pub fn max_concurrent(&self) -> usize {
        self.shared.max
    }

    /// A place for one call, if one is free now.
    ///
    /// # Errors
    ///
    /// [`BulkheadFull`] when every place is taken.
    #[inline]
    pub fn try_acquire(&self) -> Result<BulkheadPermit, BulkheadFull> {
        self.try_take().ok_or_else(|| self.reject())
    }

    #[inline]
    fn try_take(&self) -> Option<BulkheadPermit> {
        // Lazily: a permit made and dropped would give back a place.
        self.shared.try_take().then(|| BulkheadPermit {
            shared: self.shared,
        })
    }

    /// Waits at most `wait` for a place, taking a queue slot meanwhile.
    async fn wait_for_place(
        self,
        wait: Duration,
        _slot: WaitSlot,
    ) -> Result<BulkheadPermit, BulkheadFull> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let freed = self.shared.freed.notified();
            tokio::pin!(freed);
            // Registered before trying, so a place given back in between
            // is not missed.
            freed.as_mut().enable();
            if let Some(permit) = self.try_take() {
                return Ok(permit);
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return self.try_take().ok_or_else(|| self.reject());
            }
        }
    }

    fn reject(&self) -> BulkheadFull {
        self.shared.rejected.increment(1);
        BulkheadFull {
            name: &self.shared.name,
        }
    }
}

impl Shared {
    /// Brings `bulkhead_in_use` to the calls in flight now, by the change
    /// since the last time, so that bulkheads sharing a name add up in the
    /// series they share. Run by [`metrics::render`](crate::metrics::render).
    fn refresh_gauge(&self) {
        let now = self.used.load(Ordering::SeqCst).min(self.max);
        let before = self.reported.swap(now, Ordering::Relaxed);
        if now > before {
            self.in_use.increment((now - before) as f64);
        } else if now < before {
            self.in_use.decrement((before - now) as f64);
        }
    }

    /// Takes a place by adding one and giving it back if that went over
    /// the limit: one atomic add on the way in, cheaper than a load and a
    /// compare-and-swap, and a refused call (the rare case) pays the second.
    /// A count briefly over the limit can only refuse, never admit, another
    /// call: admission looks at its own add's result.
    #[inline]
    fn try_take(&self) -> bool {
        if self.used.fetch_add(1, Ordering::SeqCst) < self.max {
            return true;
        }
        // Undoing the add wakes a waiter only if it leaves a place free: a
        // place given back while this add stood in the way was refused to
        // whoever tried then. A waiter's own refused try does not wake
        // itself again, so waiting never spins.
        let before = self.used.fetch_sub(1, Ordering::SeqCst);
        if before <= self.max {
            self.wake_waiter();
        }
        false
    }

    /// Gives a taken place back.
    #[inline]
    fn give_back(&self) {
        self.used.fetch_sub(1, Ordering::SeqCst);
        self.wake_waiter();
    }

    fn wake_waiter(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.freed.notify_one();
        }
    }
}

/// A place in a bulkhead, given back on drop.
pub struct BulkheadPermit {
    shared: &'static Shared,
}

impl fmt::Debug for BulkheadPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BulkheadPermit")
            .field("name", &self.shared.name)
            .finish()
    }
}

impl Drop for BulkheadPermit {
    #[inline]
    fn drop(&mut self) {
        self.shared.give_back();
    }
}

/// A place in the wait queue, given back on drop (also when the waiting
/// call is dropped).
struct WaitSlot(&'static Shared);

impl Drop for WaitSlot {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Layer putting a [`Bulkhead`] in front of a service.
#[derive(Debug, Clone)]
pub struct BulkheadLayer {
    bulkhead: Bulkhead,
}

impl BulkheadLayer {
    /// Bounds calls with `bulkhead`.
    pub fn new(bulkhead: Bulkhead) -> Self {
        Self { bulkhead }
    }
}

impl<S> Layer<S> for BulkheadLayer {
    type Service = BulkheadService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BulkheadService {
            inner,
            bulkhead: self.bulkhead.clone(),
        }
    }
}

/// Service built by [`BulkheadLayer`]. Cloning it carries no permit.
#[derive(Debug, Clone)]
pub struct BulkheadService<S> {
    inner: S,
    bulkhead: Bulkhead,
}

impl<S> BulkheadService<S> {
    define_inner_service_accessors!();
}

impl<S, Req> Service<Req> for BulkheadService<S>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, Req>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        if let Some(permit) = self.bulkhead.try_take() {
            return ResponseFuture {
                state: Phase::Running {
                    fut: self.inner.call(req),
                    _permit: permit,
                },
            };
        }
        self.call_when_full(req)
    }
}

impl<S> BulkheadService<S> {
    /// `call` when no place is free: refuse, or wait in the queue.
    #[inline(never)]
    fn call_when_full<Req>(&mut self, req: Req) -> ResponseFuture<S, Req>
    where
        S: Service<Req> + Clone,
    {
        let shared = &self.bulkhead.shared;
        let Some(wait) = shared.max_wait else {
            return ResponseFuture {
                state: Phase::Refused {
                    error: Some(self.bulkhead.reject()),
                },
            };
        };
        let slot = WaitSlot(shared);
        if shared.waiting.fetch_add(1, Ordering::SeqCst) >= shared.max_queue {
            drop(slot);
            return ResponseFuture {
                state: Phase::Refused {
                    error: Some(self.bulkhead.reject()),
                },
            };
        }
        // The readied service goes with the request (tower's contract:
        // `call` follows `poll_ready`); a fresh clone stays for the next
        // call, which readies it first.
        let fresh = self.inner.clone();
        let readied = std::mem::replace(&mut self.inner, fresh);
        ResponseFuture {
            state: Phase::Waiting {
                place: Box::pin(self.bulkhead.clone().wait_for_place(wait, slot)),
                request: Some(Box::new((readied, req))),
            },
        }
    }
}

pin_project! {
    /// Response future of [`BulkheadService`].
    pub struct ResponseFuture<S: Service<Req>, Req> {
        #[pin]
        state: Phase<S, Req>,
    }
}

pin_project! {
    #[project = PhaseProj]
    enum Phase<S: Service<Req>, Req> {
        Running { #[pin] fut: S::Future, _permit: BulkheadPermit },
        Waiting {
            place: Pin<Box<dyn Future<Output = Result<BulkheadPermit, BulkheadFull>> + Send>>,
            // Boxed: the rare path must not make every call's future
            // larger by a whole service.
            request: Option<Box<(S, Req)>>,
        },
        Refused { error: Option<BulkheadFull> },
    }
}

impl<S: Service<Req>, Req> fmt::Debug for ResponseFuture<S, Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S, Req> Future for ResponseFuture<S, Req>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                PhaseProj::Running { fut, .. } => return fut.poll(cx).map_err(Into::into),
                PhaseProj::Refused { error } => {
                    return Poll::Ready(Err(Box::new(
                        error.take().expect("polled after completion"),
                    )));
                }
                PhaseProj::Waiting { place, request } => match ready!(place.as_mut().poll(cx)) {
                    Ok(permit) => {
                        let (mut inner, req) = *request.take().expect("polled after completion");
                        let fut = inner.call(req);
                        this.state.set(Phase::Running {
                            fut,
                            _permit: permit,
                        });
                    }
                    Err(error) => this.state.set(Phase::Refused { error: Some(error) }),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests;
