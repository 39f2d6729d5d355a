//! The tuning of a breaker.

use std::time::Duration;

use super::Window;

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
