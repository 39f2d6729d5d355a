//! Several addresses for one downstream: the address of each attempt is
//! chosen by the power of two choices, and an address that keeps failing is
//! ejected for a while (outlier detection). See the
//! [module docs](super#several-addresses).

use std::{
    fmt,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri, header, uri::Authority};
use tokio::time::Instant;
use tower::{Layer, Service};

use super::transport::{AttemptTimedOut, TransportError};
use crate::BoxError;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Looks a host name up: `tokio::net::lookup_host` in service, another
/// function in the tests of re-resolution.
#[derive(Clone)]
pub(super) struct Resolve(pub(super) Arc<dyn Fn(String, u16) -> Lookup + Send + Sync>);

/// One lookup's answer.
pub(super) type Lookup = BoxFuture<io::Result<Vec<SocketAddr>>>;

impl fmt::Debug for Resolve {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Resolve")
    }
}

/// The system's resolver, as `tokio::net::lookup_host` reaches it.
pub(super) fn system_resolver() -> Resolve {
    Resolve(Arc::new(|host: String, port: u16| {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host.as_str(), port))
                .await?
                .collect())
        })
    }))
}

/// Outlier detection: when an address of a downstream with several is
/// ejected, and for how long. See the [module docs](super#several-addresses).
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct OutlierDetection {
    /// Failures in a row (a connection failure, an attempt timeout, or a
    /// 502, 503 or 504 answer) that eject an address.
    pub consecutive_failures: u32,
    /// How long the first ejection of an address lasts; each ejection of the
    /// same address in a row doubles it.
    pub base_ejection: Duration,
    /// The longest ejection.
    pub max_ejection: Duration,
    /// The largest share of the addresses ejected at once, 0 to 100 (0
    /// turns ejection off). At least one address of two or more may always
    /// be ejected when it is above 0.
    pub max_ejected_percent: f64,
}

impl Default for OutlierDetection {
    /// 3 failures in a row eject for 10 s, doubling up to 300 s, at most
    /// half of the addresses at once.
    fn default() -> Self {
        Self {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 50.0,
        }
    }
}

/// One address of a downstream, as [`Downstream::endpoints`] reports it.
///
/// [`Downstream::endpoints`]: super::Downstream::endpoints
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EndpointStatus {
    /// The address called: `host:port` as listed, or the resolved
    /// `ip:port` of a `dns+` base URL.
    pub address: String,
    /// Whether it is ejected now.
    pub ejected: bool,
    /// Attempts in flight to it now.
    pub in_flight: usize,
}

/// Where the addresses of a balanced downstream come from.
#[derive(Debug)]
pub(super) enum Targets {
    /// A fixed list.
    List(Vec<Authority>),
    /// A name, resolved again every `refresh` while calls are made.
    Dns {
        host: String,
        port: u16,
        /// The name and port as written, sent as `Host`.
        host_header: HeaderValue,
        refresh: Duration,
        resolve: Resolve,
    },
}

/// The attempt that chose last for a call (a request extension shared by
/// the call's attempts), so that a retry goes elsewhere when it can.
#[derive(Debug, Clone, Default)]
pub(super) struct LastPick(Arc<AtomicU64>);

/// The addresses of one downstream with their load and health; cheap to
/// clone.
#[derive(Clone)]
pub(super) struct Balancer {
    shared: Arc<Shared>,
}

struct Shared {
    downstream: Arc<str>,
    outlier: OutlierDetection,
    endpoints: RwLock<Arc<[Arc<Endpoint>]>>,
    /// Ejection decisions one at a time, so that the cap holds.
    eject: Mutex<()>,
    dns: Option<Dns>,
}

struct Dns {
    host: String,
    port: u16,
    host_header: HeaderValue,
    refresh: Duration,
    resolve: Resolve,
    /// When the next lookup is due; `None` before the first.
    next: Mutex<Option<Instant>>,
    /// A lookup in the background is under way.
    looking_up: AtomicBool,
    /// Calls that find no address wait for one lookup together.
    first: tokio::sync::Mutex<()>,
}

struct Endpoint {
    id: u64,
    authority: Authority,
    in_flight: AtomicUsize,
    health: Mutex<Health>,
}

#[derive(Debug, Default)]
struct Health {
    failures: u32,
    ejected_until: Option<Instant>,
    /// Ejections in a row (each doubles the next).
    ejections: u32,
    /// When it came back, and how long it had been out.
    returned: Option<(Instant, Duration)>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The longest a lookup may take; a resolver that does not answer by then
/// counts as failed, and the addresses known are kept.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// === impl Balancer ===

impl Balancer {
    pub(super) fn new(downstream: &Arc<str>, targets: Targets, outlier: OutlierDetection) -> Self {
        let (endpoints, dns): (Vec<_>, _) = match targets {
            Targets::List(list) => (list.into_iter().map(Endpoint::new).collect(), None),
            Targets::Dns {
                host,
                port,
                host_header,
                refresh,
                resolve,
            } => (
                Vec::new(),
                Some(Dns {
                    host,
                    port,
                    host_header,
                    refresh,
                    resolve,
                    next: Mutex::new(None),
                    looking_up: AtomicBool::new(false),
                    first: tokio::sync::Mutex::new(()),
                }),
            ),
        };
        let balancer = Self {
            shared: Arc::new(Shared {
                downstream: downstream.clone(),
                outlier,
                endpoints: RwLock::new(endpoints.into()),
                eject: Mutex::new(()),
                dns,
            }),
        };
        balancer.shared.publish(Instant::now());
        balancer
    }

    /// The name certificates are verified for: the `dns+` name, whose
    /// calls go to its addresses.
    pub(super) fn server_name(&self) -> Option<&str> {
        self.shared.dns.as_ref().map(|d| d.host.as_str())
    }

    /// The addresses and their state now.
    pub(super) fn status(&self) -> Vec<EndpointStatus> {
        let now = Instant::now();
        self.shared
            .snapshot()
            .iter()
            .map(|e| EndpointStatus {
                address: e.authority.to_string(),
                ejected: e.is_out(now),
                in_flight: e.in_flight.load(Ordering::Relaxed),
            })
            .collect()
    }
}

impl fmt::Debug for Balancer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balancer")
            .field("endpoints", &self.status())
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for Balancer {
    type Service = Balance<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Balance {
            inner,
            shared: self.shared.clone(),
        }
    }
}

// === impl Shared ===

impl Shared {
    fn snapshot(&self) -> Arc<[Arc<Endpoint>]> {
        self.endpoints
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Makes sure a `dns+` downstream has addresses (waiting for the first
    /// lookup) and looks the name up again, in the background, when the
    /// last lookup is older than the refresh interval.
    async fn ensure_resolved(self: &Arc<Self>, dns: &Dns) {
        if self.snapshot().is_empty() {
            let _one = dns.first.lock().await;
            if self.snapshot().is_empty() {
                self.resolve(dns).await;
            }
            return;
        }
        let now = Instant::now();
        if lock(&dns.next).is_some_and(|due| due > now)
            || dns.looking_up.swap(true, Ordering::AcqRel)
        {
            return;
        }
        // This call takes the lookup on; the others go on with the
        // addresses they have.
        let shared = self.clone();
        tokio::spawn(async move {
            if let Some(dns) = &shared.dns {
                shared.resolve(dns).await;
                dns.looking_up.store(false, Ordering::Release);
            }
        });
    }

    async fn resolve(&self, dns: &Dns) {
        let lookup = (dns.resolve.0)(dns.host.clone(), dns.port);
        let result = match tokio::time::timeout(LOOKUP_TIMEOUT, lookup).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {LOOKUP_TIMEOUT:?}"),
            )),
        };
        let now = Instant::now();
        *lock(&dns.next) = Some(now + dns.refresh);
        match result {
            Ok(addrs) if !addrs.is_empty() => self.replace(&addrs, now),
            // A failed lookup keeps the addresses known: a DNS hiccup must
            // not empty a healthy downstream.
            Ok(_) => tracing::warn!(
                downstream = &*self.downstream,
                host = dns.host,
                "the downstream's name resolved to no address; keeping the last ones"
            ),
            Err(error) => tracing::warn!(
                downstream = &*self.downstream,
                host = dns.host,
                %error,
                "the downstream's name could not be resolved; keeping the last addresses"
            ),
        }
    }

    /// Replaces the addresses with `addrs`, keeping the load and health of
    /// those already known.
    fn replace(&self, addrs: &[SocketAddr], now: Instant) {
        let old = self.snapshot();
        let mut next: Vec<Arc<Endpoint>> = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let Ok(authority) = Authority::try_from(addr.to_string()) else {
                continue;
            };
            if next.iter().any(|e| e.authority == authority) {
                continue;
            }
            let known = old.iter().find(|e| e.authority == authority);
            next.push(known.map_or_else(|| Endpoint::new(authority), Arc::clone));
        }
        let same =
            next.len() == old.len() && next.iter().all(|e| old.iter().any(|o| Arc::ptr_eq(e, o)));
        if same || next.is_empty() {
            return;
        }
        tracing::info!(
            downstream = &*self.downstream,
            addresses = next.len(),
            "the downstream's addresses changed"
        );
        *self
            .endpoints
            .write()
            .unwrap_or_else(PoisonError::into_inner) = next.into();
        self.publish(now);
    }

    /// The address of the next attempt: of two addresses drawn at random
    /// among those not ejected (and, when there is a choice, not the one the
    /// call's last attempt went to), the one with fewer attempts in flight.
    fn pick(&self, avoid: u64, now: Instant) -> Option<Arc<Endpoint>> {
        let set = self.snapshot();
        match set.len() {
            0 => return None,
            1 => return Some(set[0].clone()),
            _ => {}
        }
        let mut returned = false;
        let mut live: Vec<&Arc<Endpoint>> = Vec::with_capacity(set.len());
        for e in set.iter() {
            if e.available(now, &self.outlier, &mut returned) {
                live.push(e);
            }
        }
        if returned {
            self.publish(now);
        }
        if live.len() > 1
            && let Some(i) = live.iter().position(|e| e.id == avoid)
        {
            live.swap_remove(i);
        }
        // With every address ejected (the cap at 100 %), all are tried
        // rather than none.
        let candidates: Vec<&Arc<Endpoint>> = if live.is_empty() {
            set.iter().collect()
        } else {
            live
        };
        let n = candidates.len();
        if n == 1 {
            return Some(candidates[0].clone());
        }
        let a = fastrand::usize(..n);
        let mut b = fastrand::usize(..n - 1);
        if b >= a {
            b += 1;
        }
        let (a, b) = (candidates[a], candidates[b]);
        let chosen = if b.in_flight.load(Ordering::Relaxed) < a.in_flight.load(Ordering::Relaxed) {
            b
        } else {
            a
        };
        Some(chosen.clone())
    }

    /// Counts an attempt's outcome against its address, and ejects the
    /// address when it has failed too often in a row and the cap allows.
    fn record(&self, endpoint: &Arc<Endpoint>, failed: bool, now: Instant) {
        {
            let mut h = lock(&endpoint.health);
            if !failed {
                h.failures = 0;
                // Healthy for as long as it was last out: the next ejection
                // starts from the base time again.
                if let Some((at, out)) = h.returned
                    && now >= at + out
                {
                    h.ejections = 0;
                    h.returned = None;
                }
                return;
            }
            if h.ejected_until.is_some() {
                return;
            }
            h.failures = h.failures.saturating_add(1);
            if h.failures < self.outlier.consecutive_failures {
                return;
            }
        }
        let _one = lock(&self.eject);
        let set = self.snapshot();
        if !set.iter().any(|e| Arc::ptr_eq(e, endpoint)) {
            return;
        }
        let out = set.iter().filter(|e| e.is_out(now)).count();
        if out + 1 > max_ejected(set.len(), self.outlier.max_ejected_percent) {
            return;
        }
        let ejection = {
            let mut h = lock(&endpoint.health);
            if h.ejected_until.is_some() {
                return;
            }
            h.ejections = h.ejections.saturating_add(1);
            let d = ejection_of(h.ejections, &self.outlier);
            h.ejected_until = Some(now + d);
            h.failures = 0;
            h.returned = None;
            d
        };
        drop(_one);
        tracing::warn!(
            downstream = &*self.downstream,
            address = %endpoint.authority,
            ejection_ms = u64::try_from(ejection.as_millis()).unwrap_or(u64::MAX),
            "downstream address ejected after failing in a row"
        );
        metrics::counter!(
            crate::metrics::HTTP_CLIENT_EJECTIONS,
            "service" => crate::metrics::service_label(),
            "downstream" => self.downstream.to_string(),
        )
        .increment(1);
        self.publish(now);
    }

    /// Sets the endpoint gauges.
    fn publish(&self, now: Instant) {
        let set = self.snapshot();
        let out = set.iter().filter(|e| e.is_out(now)).count();
        for (state, n) in [("healthy", set.len() - out), ("ejected", out)] {
            metrics::gauge!(
                crate::metrics::HTTP_CLIENT_ENDPOINTS,
                "service" => crate::metrics::service_label(),
                "downstream" => self.downstream.to_string(),
                "state" => state,
            )
            .set(n as f64);
        }
    }
}

/// How many of `n` addresses may be out at once.
fn max_ejected(n: usize, percent: f64) -> usize {
    if n < 2 || percent <= 0.0 {
        return 0;
    }
    let share = (n as f64 * percent / 100.0).floor() as usize;
    share.clamp(1, n)
}

// === impl Endpoint ===

impl Endpoint {
    fn new(authority: Authority) -> Arc<Self> {
        Arc::new(Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            authority,
            in_flight: AtomicUsize::new(0),
            health: Mutex::new(Health::default()),
        })
    }

    fn is_out(&self, now: Instant) -> bool {
        lock(&self.health).ejected_until.is_some_and(|t| t > now)
    }

    /// Whether it may be chosen now. An address whose ejection has ended
    /// comes back on probation: one more failure ejects it again, for
    /// twice as long.
    fn available(&self, now: Instant, outlier: &OutlierDetection, returned: &mut bool) -> bool {
        let mut h = lock(&self.health);
        match h.ejected_until {
            Some(t) if t > now => false,
            Some(_) => {
                h.ejected_until = None;
                h.failures = outlier.consecutive_failures.saturating_sub(1);
                h.returned = Some((now, ejection_of(h.ejections, outlier)));
                *returned = true;
                true
            }
            None => true,
        }
    }
}

/// The length of the `n`th ejection in a row (`n` from 1).
fn ejection_of(n: u32, outlier: &OutlierDetection) -> Duration {
    outlier
        .base_ejection
        .saturating_mul(1u32 << n.saturating_sub(1).min(16))
        .min(outlier.max_ejection)
}

/// The balancing step of a downstream with several addresses; see
/// [`Balancer`].
#[derive(Clone)]
pub(super) struct Balance<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> fmt::Debug for Balance<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balance").finish_non_exhaustive()
    }
}

/// Decrements an address's in-flight count when the attempt ends, however
/// it ends.
struct InFlight(Arc<Endpoint>);

impl InFlight {
    fn new(endpoint: &Arc<Endpoint>) -> Self {
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(endpoint.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether an attempt's outcome says something about its address: `Some(true)`
/// for a failure of the address, `Some(false)` for an answer, `None` for
/// what says nothing (an injected fault, a body too large).
fn failed(result: &Result<Response<Bytes>, BoxError>) -> Option<bool> {
    match result {
        Ok(res) if res.headers().contains_key("x-fault-injected") => None,
        Ok(res) => Some(matches!(res.status().as_u16(), 502..=504)),
        Err(e) if e.is::<AttemptTimedOut>() => Some(true),
        Err(e) => match e.downcast_ref::<TransportError>() {
            Some(TransportError::Connect(_) | TransportError::Connection(_)) => Some(true),
            _ => None,
        },
    }
}

impl<S, B> Service<Request<B>> for Balance<S>
where
    S: Service<Request<B>, Response = Response<Bytes>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Bytes>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<Bytes>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // The service made ready goes with the call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        Box::pin(async move {
            if let Some(dns) = &shared.dns {
                shared.ensure_resolved(dns).await;
            }
            let last = req.extensions().get::<LastPick>().cloned();
            let avoid = last.as_ref().map_or(0, |l| l.0.load(Ordering::Relaxed));
            let Some(endpoint) = shared.pick(avoid, Instant::now()) else {
                let host = shared.dns.as_ref().map_or("", |d| d.host.as_str());
                return Err(
                    TransportError::Connection(format!("no address known for {host}")).into(),
                );
            };
            if let Some(last) = &last {
                last.0.store(endpoint.id, Ordering::Relaxed);
            }
            let mut parts = std::mem::take(req.uri_mut()).into_parts();
            parts.authority = Some(endpoint.authority.clone());
            *req.uri_mut() = Uri::from_parts(parts)?;
            if let Some(dns) = &shared.dns {
                req.headers_mut()
                    .insert(header::HOST, dns.host_header.clone());
            }
            let guard = InFlight::new(&endpoint);
            let result = inner.call(req).await;
            drop(guard);
            if let Some(failed) = failed(&result) {
                shared.record(&endpoint, failed, Instant::now());
            }
            // Another address may take a request that never left, whatever
            // its method.
            result.map_err(|e| {
                if matches!(e.downcast_ref(), Some(TransportError::Connect(_))) {
                    Box::new(crate::retry::NotSent::new(e)) as BoxError
                } else {
                    e
                }
            })
        })
    }
}

#[cfg(test)]
mod tests;
