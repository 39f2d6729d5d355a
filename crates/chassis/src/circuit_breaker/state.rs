//! The state machine: closed, open, half-open (and the operator's forced
//! open and disabled), the permits calls hold, and the outcome counts
//! behind the breaker's metrics.

use std::{
    fmt,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use thread_local::ThreadLocal;
use tokio::time::Instant;

use super::{
    Config, Window,
    window::{Ring, Samples},
};

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

#[derive(Debug)]
pub(super) struct Inner {
    state: State,
    pub(super) generation: u64,
    /// The window when it is kept under the lock.
    samples: Samples,
    opened_at: Instant,
    half_open_started: Instant,
    probes_out: usize,
    probes_ok: usize,
    probes_failed: usize,
    probes_slow: usize,
}

/// A circuit breaker shared by every clone of its layer, living for the
/// whole process; see the [module docs](super).
#[derive(Clone)]
pub struct CircuitBreaker {
    pub(super) shared: &'static Shared,
}

pub(super) struct Shared {
    name: Box<str>,
    config: Config,
    /// `generation << 1 | 1` while closed with a count window (calls then
    /// go through [`Ring`] without the lock), `generation << 1` otherwise.
    gate: AtomicU64,
    /// The closed-state window when it counts calls.
    pub(super) ring: Option<Ring>,
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

impl Shared {
    /// Brings `circuit_breaker_calls_total` up to the breaker's counts. It
    /// adds what was counted since the last time, so that breakers sharing
    /// a name add up in the series they share. Run by
    /// [`metrics::render`](crate::metrics::render), never two at once.
    pub(super) fn refresh_counters(&self) {
        for ((counter, reported), total) in self.calls.iter().zip(&self.reported).zip(self.totals())
        {
            // A reading may lag behind an outcome in flight, never run
            // ahead of it, so the series only ever grows.
            let before = reported.load(Ordering::Relaxed);
            if total > before {
                counter.increment(total - before);
                reported.store(total, Ordering::Relaxed);
            }
        }
    }

    /// The outcomes so far: success, failure, slow, rejected.
    pub(super) fn totals(&self) -> [u64; 4] {
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
                samples: Samples::default(),
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
        let shared: &'static Shared = Box::leak(Box::new(shared));
        crate::metrics::register_refresher(move || shared.refresh_counters());
        Self { shared }
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
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
        g.samples.clear();
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
                let (n, failures, slows) = g.samples.push(c.window, now, failed, slow);
                if n >= c.minimum_calls {
                    let tripped = failures as f64 / n as f64 >= c.failure_rate
                        || (c.slow_call.is_some() && slows as f64 / n as f64 >= c.slow_call_rate);
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
