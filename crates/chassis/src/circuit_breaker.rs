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
//! copied to the metric when the metrics are rendered
//! ([`metrics::render`](crate::metrics::render)).
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

use std::{
    collections::VecDeque,
    fmt,
    future::Future,
    pin::Pin,
    sync::{
        Mutex,
        atomic::{AtomicI64, AtomicU8, AtomicU32, AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use pin_project_lite::pin_project;
use thread_local::ThreadLocal;
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::BoxError;

/// The sliding window the rates are computed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// The last N calls.
    Count(usize),
    /// The calls of the last duration.
    Time(Duration),
}

/// Tuning of a breaker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    /// The window.
    pub window: Window,
    /// Calls needed in the window before rates are judged (default 10).
    pub minimum_calls: usize,
    /// Failure rate that opens the breaker, 0 to 1 (default 0.5).
    pub failure_rate: f64,
    /// Calls slower than this are slow (default none).
    pub slow_call: Option<Duration>,
    /// Slow-call rate that opens the breaker, 0 to 1 (default 1.0).
    pub slow_call_rate: f64,
    /// How long the breaker stays open (default 30 s).
    pub wait_in_open: Duration,
    /// Probes let through when half-open (default 1).
    pub half_open_calls: usize,
    /// Longest a half-open probe may take before it counts as failed (default 10 s).
    pub max_wait_in_half_open: Duration,
}

impl Config {
    /// A count-based window of the last `n` calls, other settings default.
    pub fn count(n: usize) -> Self {
        Self {
            window: Window::Count(n.max(1)),
            minimum_calls: 10.min(n.max(1)),
            failure_rate: 0.5,
            slow_call: None,
            slow_call_rate: 1.0,
            wait_in_open: Duration::from_secs(30),
            half_open_calls: 1,
            max_wait_in_half_open: Duration::from_secs(10),
        }
    }

    /// A time-based window of the last `d`, other settings default.
    pub fn time(d: Duration) -> Self {
        Self {
            window: Window::Time(d),
            ..Self::count(100)
        }
    }

    /// Sets the minimum number of calls.
    #[must_use]
    pub fn minimum_calls(mut self, n: usize) -> Self {
        self.minimum_calls = n.max(1);
        self
    }

    /// Sets the failure-rate threshold.
    #[must_use]
    pub fn failure_rate(mut self, rate: f64) -> Self {
        self.failure_rate = rate.clamp(0.0, 1.0);
        self
    }

    /// Counts calls slower than `d` as slow and opens at `rate` of them.
    #[must_use]
    pub fn slow_calls(mut self, d: Duration, rate: f64) -> Self {
        self.slow_call = Some(d);
        self.slow_call_rate = rate.clamp(0.0, 1.0);
        self
    }

    /// Sets the time spent open.
    #[must_use]
    pub fn wait_in_open(mut self, d: Duration) -> Self {
        self.wait_in_open = d;
        self
    }

    /// Sets the number of half-open probes.
    #[must_use]
    pub fn half_open_calls(mut self, n: usize) -> Self {
        self.half_open_calls = n.max(1);
        self
    }

    /// Sets the probe deadline.
    #[must_use]
    pub fn max_wait_in_half_open(mut self, d: Duration) -> Self {
        self.max_wait_in_half_open = d;
        self
    }
}

impl Default for Config {
    fn default() -> Self {
        Self::count(100)
    }
}

/// The state of a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Calls go through and are watched.
    Closed,
    /// Calls are refused.
    Open,
    /// A few probes go through.
    HalfOpen,
    /// Forced open by an operator: refuses everything, never probes.
    ForcedOpen,
    /// Disabled by an operator: lets everything through, records nothing.
    Disabled,
}

impl State {
    /// The value of the `circuit_breaker_state` gauge: 0 closed, 1 open,
    /// 2 half-open (forced open counts as open, disabled as closed).
    pub fn gauge(self) -> f64 {
        match self {
            Self::Closed | Self::Disabled => 0.0,
            Self::Open | Self::ForcedOpen => 1.0,
            Self::HalfOpen => 2.0,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
            Self::ForcedOpen => "forced_open",
            Self::Disabled => "disabled",
        }
    }
}

/// The error of a call refused because the breaker is open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("circuit breaker `{name}` is open")]
pub struct CircuitOpen {
    name: &'static str,
    retry_after: Duration,
}

impl CircuitOpen {
    /// The breaker's name.
    pub fn name(&self) -> &str {
        self.name
    }

    /// When a call may be tried again.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }
}

/// How a call ended, for the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The downstream did its job.
    Success,
    /// The downstream failed.
    Failure,
    /// Not the downstream's doing (e.g. the caller went away): not recorded.
    Ignored,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    failed: bool,
    slow: bool,
}

#[derive(Debug)]
struct Inner {
    state: State,
    generation: u64,
    window: VecDeque<Sample>,
    /// Failed and slow calls in `window`, kept as it changes so a decision
    /// never walks the window.
    failed: usize,
    slow: usize,
    opened_at: Instant,
    half_open_started: Instant,
    probes_out: usize,
    probes_ok: usize,
    probes_failed: usize,
    probes_slow: usize,
}

/// The last N outcomes, recorded without a lock: each call takes the next
/// slot and swaps its outcome in; the running counts change by what the
/// swap replaced, so they always agree with the slots once writers finish.
/// A success into a full window of successes is not pushed: it would
/// replace a success with a success, and which one is oldest cannot
/// matter while they are all alike.
struct Ring {
    /// 0 empty, else `1 | failed << 1 | slow << 2`.
    slots: Box<[AtomicU8]>,
    /// `u64::MAX / slots.len() + 1`, so that the slot of a ticket is found
    /// by two multiplications instead of a division (Lemire's fastmod), the
    /// division being the dearest step of a push after the ticket itself.
    magic: u64,
    /// The ticket of the next outcome. It wraps at 2^32: once in four
    /// billion pushes the walk round the ring jumps back to slot 0, which
    /// only leaves a few older outcomes in the window for one lap.
    next: AtomicU32,
    filled: AtomicI64,
    failed: AtomicI64,
    slow: AtomicI64,
}

const PRESENT: u8 = 1;
const FAILED: u8 = 2;
const SLOWED: u8 = 4;

impl Ring {
    fn new(n: usize) -> Self {
        let n = n.clamp(1, u32::MAX as usize);
        Self {
            slots: (0..n).map(|_| AtomicU8::new(0)).collect(),
            magic: (u64::MAX / n as u64).wrapping_add(1),
            next: AtomicU32::new(0),
            filled: AtomicI64::new(0),
            failed: AtomicI64::new(0),
            slow: AtomicI64::new(0),
        }
    }

    /// Applies the change from slot value `old` to `new` to the counts.
    fn account(&self, old: u8, new: u8) {
        for (bit, count) in [
            (PRESENT, &self.filled),
            (FAILED, &self.failed),
            (SLOWED, &self.slow),
        ] {
            match (old & bit != 0, new & bit != 0) {
                (false, true) => {
                    count.fetch_add(1, Ordering::AcqRel);
                }
                (true, false) => {
                    count.fetch_sub(1, Ordering::AcqRel);
                }
                _ => {}
            }
        }
    }

    /// Records one outcome; returns the calls, failures and slow calls in
    /// the window.
    #[inline]
    fn push(&self, failed: bool, slow: bool) -> (usize, usize, usize) {
        let code = PRESENT | if failed { FAILED } else { 0 } | if slow { SLOWED } else { 0 };
        let i = self.slot_of(self.next.fetch_add(1, Ordering::Relaxed));
        // In a steady state the slot already holds this outcome: a load,
        // not a write, keeps the cache line shared between threads.
        if self.slots[i].load(Ordering::Acquire) != code {
            let old = self.slots[i].swap(code, Ordering::AcqRel);
            if old != code {
                self.account(old, code);
            }
        }
        let read = |c: &AtomicI64| usize::try_from(c.load(Ordering::Acquire)).unwrap_or(0);
        (read(&self.filled), read(&self.failed), read(&self.slow))
    }

    /// The window is full and holds only successes.
    #[inline]
    fn all_succeeded(&self) -> bool {
        self.failed.load(Ordering::Acquire) == 0
            && self.slow.load(Ordering::Acquire) == 0
            && usize::try_from(self.filled.load(Ordering::Acquire)).ok() == Some(self.slots.len())
    }

    /// `ticket % slots.len()`.
    #[inline]
    fn slot_of(&self, ticket: u32) -> usize {
        let low = self.magic.wrapping_mul(u64::from(ticket));
        ((u128::from(low) * self.slots.len() as u128) >> 64) as usize
    }

    /// Empties the window.
    fn clear(&self) {
        for slot in &self.slots {
            let old = slot.swap(0, Ordering::AcqRel);
            if old != 0 {
                self.account(old, 0);
            }
        }
    }
}

/// A circuit breaker shared by every clone of its layer, living for the
/// whole process; see the [module docs](self).
#[derive(Clone)]
pub struct CircuitBreaker {
    shared: &'static Shared,
}

struct Shared {
    name: Box<str>,
    config: Config,
    /// `generation << 1 | 1` while closed with a count window (calls then
    /// go through [`Ring`] without the lock), `generation << 1` otherwise.
    gate: AtomicU64,
    /// The closed-state window when it counts calls.
    ring: Option<Ring>,
    inner: Mutex<Inner>,
    gauge: metrics::Gauge,
    /// Outcomes counted as they happen, by index (`SUCCESS`...): all but
    /// the successes of the lock-free closed path, which are in
    /// `successes`. The metric is brought up to these when the metrics are
    /// rendered, so a call pays no metric update of its own.
    counted: [AtomicU64; 4],
    /// The successes of the lock-free closed path, one count per thread,
    /// each written only by its thread: counting them takes no atomic
    /// read-modify-write, whose cost would dominate the call.
    successes: ThreadLocal<AtomicU64>,
    /// What `calls` has been told so far.
    reported: [AtomicU64; 4],
    calls: [metrics::Counter; 4],
}

/// Every breaker made, for the counters.
static LIVE: crate::metrics::Live<Shared> = crate::metrics::Live::new();

/// Brings `circuit_breaker_calls_total` of every breaker up to its counts.
/// Each breaker adds what it counted since the last time, so breakers that
/// share a name add up as the series they share. Called by
/// [`metrics::render`](crate::metrics::render).
pub(crate) fn refresh_counters() {
    LIVE.each(|b| {
        for ((counter, reported), total) in b.calls.iter().zip(&b.reported).zip(b.totals()) {
            // A reading may lag behind an outcome in flight, never run
            // ahead of it, so the series only ever grows.
            let before = reported.load(Ordering::Relaxed);
            if total > before {
                counter.increment(total - before);
                reported.store(total, Ordering::Relaxed);
            }
        }
    });
}

impl Shared {
    /// The outcomes so far: success, failure, slow, rejected.
    fn totals(&self) -> [u64; 4] {
        let mut totals = self.counted.each_ref().map(|c| c.load(Ordering::SeqCst));
        totals[SUCCESS] += self
            .successes
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .sum::<u64>();
        totals
    }
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("name", &self.shared.name)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

const SUCCESS: usize = 0;
const FAILURE: usize = 1;
const SLOW: usize = 2;
const REJECTED: usize = 3;

impl CircuitBreaker {
    /// A closed breaker called `name` (the `name` label of its metrics).
    pub fn new(name: &str, config: Config) -> Self {
        let now = Instant::now();
        let service = crate::metrics::service_label();
        let counter = |outcome: &'static str| metrics::counter!("circuit_breaker_calls_total", "service" => service.clone(), "name" => name.to_owned(), "outcome" => outcome);
        let ring = match config.window {
            Window::Count(n) => Some(Ring::new(n)),
            Window::Time(_) => None,
        };
        let shared = Shared {
            name: name.into(),
            gate: AtomicU64::new(u64::from(ring.is_some())),
            ring,
            config,
            inner: Mutex::new(Inner {
                state: State::Closed,
                generation: 0,
                window: VecDeque::new(),
                failed: 0,
                slow: 0,
                opened_at: now,
                half_open_started: now,
                probes_out: 0,
                probes_ok: 0,
                probes_failed: 0,
                probes_slow: 0,
            }),
            gauge: metrics::gauge!("circuit_breaker_state", "service" => service.clone(), "name" => name.to_owned()),
            counted: Default::default(),
            successes: ThreadLocal::new(),
            reported: Default::default(),
            calls: [
                counter("success"),
                counter("failure"),
                counter("slow"),
                counter("rejected"),
            ],
        };
        shared.gauge.set(0.0);
        Self {
            shared: LIVE.add(shared),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.shared
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The current state (an open breaker whose wait is over reports open
    /// until the next call makes it half-open).
    pub fn state(&self) -> State {
        self.lock().state
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Forces the breaker open (`true`) or back to closed (`false`).
    pub fn force_open(&self, open: bool) {
        let mut g = self.lock();
        let to = if open {
            State::ForcedOpen
        } else {
            State::Closed
        };
        self.transition(&mut g, to, Instant::now());
    }

    /// Disables the breaker (`true`: everything passes, nothing is recorded)
    /// or enables it again, closed.
    pub fn disable(&self, disabled: bool) {
        let mut g = self.lock();
        let to = if disabled {
            State::Disabled
        } else {
            State::Closed
        };
        self.transition(&mut g, to, Instant::now());
    }

    fn transition(&self, g: &mut Inner, to: State, now: Instant) {
        if g.state == to {
            return;
        }
        let from = g.state;
        g.state = to;
        g.generation += 1;
        g.window.clear();
        g.failed = 0;
        g.slow = 0;
        g.probes_out = 0;
        g.probes_ok = 0;
        g.probes_failed = 0;
        g.probes_slow = 0;
        if let Some(ring) = &self.shared.ring {
            ring.clear();
        }
        let lock_free = to == State::Closed && self.shared.ring.is_some();
        self.shared
            .gate
            .store(g.generation << 1 | u64::from(lock_free), Ordering::SeqCst);
        match to {
            State::Open => g.opened_at = now,
            State::HalfOpen => g.half_open_started = now,
            _ => {}
        }
        self.shared.gauge.set(to.gauge());
        tracing::warn!(breaker = %self.shared.name, from = from.name(), to = to.name(), "circuit breaker state changed");
    }

    /// Asks to make a call.
    ///
    /// # Errors
    ///
    /// [`CircuitOpen`] when the call must not be made.
    #[inline]
    pub fn try_acquire(&self) -> Result<Permit, CircuitOpen> {
        let c = &self.shared.config;
        let gate = self.shared.gate.load(Ordering::Acquire);
        if gate & 1 == 1 {
            // Closed with a count window: no lock, no clock unless slow
            // calls are judged.
            return Ok(Permit {
                breaker: Some(self.clone()),
                generation: gate >> 1,
                start: c.slow_call.map(|_| Instant::now()),
            });
        }
        self.try_acquire_locked()
    }

    /// [`try_acquire`](Self::try_acquire) when the gate is shut: a time
    /// window, or a state other than closed.
    #[inline(never)]
    fn try_acquire_locked(&self) -> Result<Permit, CircuitOpen> {
        let c = &self.shared.config;
        let mut g = self.lock();
        // The closed hot path reads no clock unless slow calls are judged.
        if g.state == State::Closed || g.state == State::Disabled {
            let start = c.slow_call.map(|_| Instant::now());
            return Ok(Permit {
                breaker: Some(self.clone()),
                generation: g.generation,
                start,
            });
        }
        let now = Instant::now();
        let probe_deadline = g.half_open_started + c.max_wait_in_half_open;
        if g.state == State::HalfOpen && g.probes_out > 0 && now >= probe_deadline {
            // A probe hung past its deadline: it counts as a failure, and the
            // wait in open counts from that deadline.
            self.shared.counted[FAILURE].fetch_add(1, Ordering::SeqCst);
            self.transition(&mut g, State::Open, probe_deadline);
        }
        if g.state == State::Open && now >= g.opened_at + c.wait_in_open {
            self.transition(&mut g, State::HalfOpen, now);
        }
        let refuse = |g: &Inner| {
            let retry_after = match g.state {
                State::Open => (g.opened_at + c.wait_in_open).saturating_duration_since(now),
                _ => c.wait_in_open,
            };
            CircuitOpen {
                name: &self.shared.name,
                retry_after,
            }
        };
        match g.state {
            State::Closed | State::Disabled => {}
            State::Open | State::ForcedOpen => {
                self.shared.counted[REJECTED].fetch_add(1, Ordering::SeqCst);
                return Err(refuse(&g));
            }
            State::HalfOpen => {
                if g.probes_out + g.probes_ok + g.probes_failed >= c.half_open_calls {
                    self.shared.counted[REJECTED].fetch_add(1, Ordering::SeqCst);
                    return Err(refuse(&g));
                }
                g.probes_out += 1;
            }
        }
        Ok(Permit {
            breaker: Some(self.clone()),
            generation: g.generation,
            start: Some(now),
        })
    }

    /// Counts one recorded call by its outcome.
    fn count(&self, failed: bool, slow: bool) {
        self.shared.counted[Self::outcome_index(failed, slow)].fetch_add(1, Ordering::SeqCst);
    }

    fn outcome_index(failed: bool, slow: bool) -> usize {
        if failed {
            FAILURE
        } else if slow {
            SLOW
        } else {
            SUCCESS
        }
    }

    #[inline]
    fn record(&self, generation: u64, start: Option<Instant>, outcome: Outcome) {
        let c = &self.shared.config;
        if let Some(ring) = &self.shared.ring {
            let gate = self.shared.gate.load(Ordering::Acquire);
            if gate & 1 == 1 {
                if gate >> 1 != generation || outcome == Outcome::Ignored {
                    return;
                }
                let failed = outcome == Outcome::Failure;
                let slow = match (c.slow_call, start) {
                    (Some(d), Some(start)) => start.elapsed() >= d,
                    _ => false,
                };
                if failed || slow {
                    self.count(failed, slow);
                } else {
                    let mine = self.shared.successes.get_or_default();
                    // Only this thread writes its count: no read-modify-write.
                    mine.store(mine.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
                    if ring.all_succeeded() {
                        // A success replacing the oldest of a window of
                        // successes changes nothing: the window stays as it
                        // is, and a steady healthy stream writes no shared
                        // memory at all.
                        return;
                    }
                }
                let (n, failures, slows) = ring.push(failed, slow);
                // Rates compared by multiplying, not dividing.
                if n >= c.minimum_calls
                    && (failures as f64 >= c.failure_rate * n as f64
                        || (c.slow_call.is_some() && slows as f64 >= c.slow_call_rate * n as f64))
                {
                    self.trip(generation);
                }
                return;
            }
        }
        self.record_locked(generation, start, outcome);
    }

    /// Opens the breaker if it is still closed in `generation`.
    #[cold]
    fn trip(&self, generation: u64) {
        let mut g = self.lock();
        if g.state == State::Closed && g.generation == generation {
            self.transition(&mut g, State::Open, Instant::now());
        }
    }

    /// Records an outcome under the lock: a time window, a state other than
    /// closed, or a permit of an older generation.
    #[inline(never)]
    fn record_locked(&self, generation: u64, start: Option<Instant>, outcome: Outcome) {
        let c = &self.shared.config;
        let needs_clock = c.slow_call.is_some() || matches!(c.window, Window::Time(_));
        let mut g = self.lock();
        if g.generation != generation || g.state == State::Disabled {
            return;
        }
        // A count window without slow-call rules needs no clock when closed.
        let now = if needs_clock || g.state != State::Closed {
            Instant::now()
        } else {
            g.opened_at
        };
        let slow = match (c.slow_call, start) {
            (Some(d), Some(start)) => now.saturating_duration_since(start) >= d,
            _ => false,
        };
        match (g.state, outcome) {
            (State::HalfOpen, Outcome::Ignored) => g.probes_out = g.probes_out.saturating_sub(1),
            (State::HalfOpen, Outcome::Success | Outcome::Failure) => {
                let failed = outcome == Outcome::Failure;
                self.count(failed, slow);
                g.probes_out = g.probes_out.saturating_sub(1);
                if failed {
                    g.probes_failed += 1;
                } else {
                    g.probes_ok += 1;
                    g.probes_slow += usize::from(slow);
                }
                let done = g.probes_ok + g.probes_failed;
                if done >= c.half_open_calls {
                    let n = done as f64;
                    let reopen = g.probes_failed as f64 / n >= c.failure_rate
                        || (c.slow_call.is_some() && g.probes_slow as f64 / n >= c.slow_call_rate);
                    let to = if reopen { State::Open } else { State::Closed };
                    self.transition(&mut g, to, now);
                }
            }
            (State::Closed, Outcome::Success | Outcome::Failure) => {
                let failed = outcome == Outcome::Failure;
                self.count(failed, slow);
                g.window.push_back(Sample {
                    at: now,
                    failed,
                    slow,
                });
                g.failed += usize::from(failed);
                g.slow += usize::from(slow);
                while let Some(oldest) = g.window.front().copied() {
                    let evict = match c.window {
                        Window::Count(n) => g.window.len() > n,
                        Window::Time(d) => now.saturating_duration_since(oldest.at) > d,
                    };
                    if !evict {
                        break;
                    }
                    g.window.pop_front();
                    g.failed -= usize::from(oldest.failed);
                    g.slow -= usize::from(oldest.slow);
                }
                let n = g.window.len();
                if n >= c.minimum_calls {
                    let failures = g.failed as f64;
                    let slows = g.slow as f64;
                    let tripped = failures / n as f64 >= c.failure_rate
                        || (c.slow_call.is_some() && slows / n as f64 >= c.slow_call_rate);
                    if tripped {
                        // `now` may be a stale stand-in on the clock-free
                        // path; the wait in open counts from the real time.
                        self.transition(&mut g, State::Open, Instant::now());
                    }
                }
            }
            _ => {}
        }
    }
}

/// A breaker is a health check: down while open, so `/health/ready` shows
/// it. Register it as non-critical: an open breaker to one downstream
/// should not take this service out of rotation.
impl crate::health::Check for CircuitBreaker {
    async fn check(&self) -> Result<(), crate::health::CheckError> {
        match self.state() {
            State::Open | State::ForcedOpen => Err(crate::health::CheckError::new(format!(
                "circuit breaker `{}` is open",
                self.name()
            ))),
            _ => Ok(()),
        }
    }
}

/// Permission to make one call. Record how it went with
/// [`success`](Self::success), [`failure`](Self::failure) or
/// [`record`](Self::record); dropped without that, it is ignored.
#[must_use = "a permit records nothing unless told how the call went"]
pub struct Permit {
    breaker: Option<CircuitBreaker>,
    generation: u64,
    /// When the call started, if anything needs it (slow calls, half-open).
    start: Option<Instant>,
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl Permit {
    /// Records `outcome`.
    #[inline]
    pub fn record(mut self, outcome: Outcome) {
        if let Some(b) = self.breaker.take() {
            b.record(self.generation, self.start, outcome);
        }
    }

    /// The call succeeded.
    #[inline]
    pub fn success(self) {
        self.record(Outcome::Success);
    }

    /// The call failed.
    #[inline]
    pub fn failure(self) {
        self.record(Outcome::Failure);
    }
}

impl Drop for Permit {
    #[inline]
    fn drop(&mut self) {
        if let Some(b) = self.breaker.take() {
            b.record(self.generation, self.start, Outcome::Ignored);
        }
    }
}

/// The default rule for HTTP: errors and 5xx are failures, the rest success.
pub fn http_outcome<B>(result: &Result<http::Response<B>, BoxError>) -> Outcome {
    match result {
        Ok(res) if res.status().is_server_error() => Outcome::Failure,
        Ok(_) => Outcome::Success,
        Err(_) => Outcome::Failure,
    }
}

/// A classifier that is a plain function, the type of [`http_outcome`].
pub type ClassifyFn<R> = fn(&Result<R, BoxError>) -> Outcome;

/// Layer putting a [`CircuitBreaker`] in front of a service. `C` decides the
/// outcome of each call from its result (see
/// [`with_classifier`](Self::with_classifier)); it is cloned per call, so a
/// function or a closure over cheap values costs nothing.
#[derive(Clone)]
pub struct CircuitBreakerLayer<C> {
    breaker: CircuitBreaker,
    classify: C,
}

impl<C> fmt::Debug for CircuitBreakerLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerLayer")
            .field("breaker", &self.breaker)
            .finish_non_exhaustive()
    }
}

impl<B> CircuitBreakerLayer<ClassifyFn<http::Response<B>>> {
    /// A layer with the HTTP classifier ([`http_outcome`]).
    pub fn http(breaker: CircuitBreaker) -> Self {
        Self {
            breaker,
            classify: http_outcome::<B>,
        }
    }
}

impl<C> CircuitBreakerLayer<C> {
    /// A layer deciding outcomes with `classify`, a
    /// `Fn(&Result<Response, BoxError>) -> Outcome`.
    pub fn with_classifier(breaker: CircuitBreaker, classify: C) -> Self {
        Self { breaker, classify }
    }
}

impl<S, C: Clone> Layer<S> for CircuitBreakerLayer<C> {
    type Service = CircuitBreakerService<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreakerService {
            inner,
            breaker: self.breaker.clone(),
            classify: self.classify.clone(),
        }
    }
}

/// Service built by [`CircuitBreakerLayer`].
#[derive(Clone)]
pub struct CircuitBreakerService<S, C> {
    inner: S,
    breaker: CircuitBreaker,
    classify: C,
}

impl<S, C> fmt::Debug for CircuitBreakerService<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerService")
            .field("breaker", &self.breaker)
            .finish_non_exhaustive()
    }
}

impl<S, C, Req> Service<Req> for CircuitBreakerService<S, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Fn(&Result<S::Response, BoxError>) -> Outcome + Clone,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        let phase = match self.breaker.try_acquire() {
            Ok(permit) => Phase::Running {
                fut: self.inner.call(req),
                permit: Some(permit),
                classify: self.classify.clone(),
            },
            Err(open) => Phase::Refused {
                error: Some(Box::new(open)),
            },
        };
        ResponseFuture { phase }
    }
}

pin_project! {
    /// Response future of [`CircuitBreakerService`].
    pub struct ResponseFuture<F, C> {
        #[pin]
        phase: Phase<F, C>,
    }
}

pin_project! {
    #[project = PhaseProj]
    enum Phase<F, C> {
        Running { #[pin] fut: F, permit: Option<Permit>, classify: C },
        Refused { error: Option<Box<CircuitOpen>> },
    }
}

impl<F, C> fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, C, R, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<R, E>>,
    E: Into<BoxError>,
    C: Fn(&Result<R, BoxError>) -> Outcome,
{
    type Output = Result<R, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().phase.project() {
            PhaseProj::Running {
                fut,
                permit,
                classify,
            } => {
                let result = ready!(fut.poll(cx)).map_err(Into::into);
                if let Some(permit) = permit.take() {
                    permit.record(classify(&result));
                }
                Poll::Ready(result)
            }
            PhaseProj::Refused { error } => {
                Poll::Ready(Err(error.take().expect("polled after completion")))
            }
        }
    }
}

#[cfg(test)]
mod tests;
