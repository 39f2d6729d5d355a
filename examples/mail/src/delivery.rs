//! Delivery: the workers that lease queued messages, send them and record
//! the outcome, and the retry schedule of failed sends.
//!
//! # Guarantees
//!
//! * **Nothing is lost.** A message leaves the queue only as `sent` or
//!   `dead`. A worker that dies (or is stopped mid-send) leaves its message
//!   `sending` with a lease that expires; any worker then takes it again.
//! * **One worker per message, across instances.** Leasing is one
//!   conditional `UPDATE … RETURNING` that re-checks the message is still
//!   due on the row it changes (on Postgres it picks its candidate
//!   `FOR UPDATE SKIP LOCKED`), so two workers, of one instance or of
//!   several sharing a Postgres database, never hold the same message; and
//!   a worker marks a message sent, failed or released only while the
//!   lease is still its own (`lease_owner`, unique per worker).
//! * **Exactly one mail out, as far as the transport allows.** The only
//!   window for a second copy is a crash (or a stop) after the transport
//!   took the mail and before the row says `sent`. The copy has the same
//!   `Message-ID` (derived from `message_id`); the file transport writes it
//!   over the same `<message_id>.eml`, so there is still one file, while an
//!   SMTP relay delivers it again unless it deduplicates by `Message-ID`.
//! * **Failures back off.** A failed send is retried after a delay drawn
//!   uniformly from `[0, min(max, base × 2^(attempt-1))]` ("full jitter"),
//!   so retries of many messages spread out instead of arriving together;
//!   after the last attempt the message is `dead` with its last error.

use std::{sync::Arc, time::Duration};

use chassis::{correlation::TraceContext, otel::Span, shutdown::CancellationToken};
use lettre::Address;
use tokio::sync::Notify;
use tracing::Instrument as _;

use crate::{
    format::{self, Email, Headers, parse_address},
    meters,
    store::{Leased, Store},
    template,
    transport::Transport,
};

/// When failed sends are tried again, and how often.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; after the last failure the
    /// message is dead.
    pub max_attempts: u32,
    /// The longest wait after the first failure.
    pub base: Duration,
    /// The longest wait after any failure.
    pub max: Duration,
}

impl RetryPolicy {
    /// The longest wait after `failures` failed attempts (at least 1):
    /// `base × 2^(failures-1)`, capped at `max`.
    pub fn ceiling(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(63);
        let factor = 1u64 << doublings;
        let base = u64::try_from(self.base.as_millis()).unwrap_or(u64::MAX);
        let max = u64::try_from(self.max.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(base.saturating_mul(factor).min(max))
    }

    /// The wait after `failures` failed attempts, for `unit` in `[0, 1)`:
    /// `unit × ceiling(failures)`. Pure, so the schedule can be checked
    /// without a clock or a random source.
    pub fn delay_with(&self, failures: u32, unit: f64) -> Duration {
        self.ceiling(failures).mul_f64(unit.clamp(0.0, 1.0))
    }

    /// The wait after `failures` failed attempts, with full jitter.
    pub fn delay(&self, failures: u32) -> Duration {
        self.delay_with(failures, fastrand::f64())
    }

    /// The wait before the next attempt after `failures` failed ones, or
    /// `None` when that was the last attempt.
    pub fn next(&self, failures: u32) -> Option<Duration> {
        (failures < self.max_attempts).then(|| self.delay(failures))
    }
}

/// One worker; see the [module docs](self).
#[derive(Debug)]
pub(crate) struct Worker {
    pub(crate) store: Store,
    pub(crate) transport: Arc<Transport>,
    pub(crate) from: Address,
    pub(crate) policy: RetryPolicy,
    pub(crate) lease: Duration,
    pub(crate) poll: Duration,
    /// Longest a send may take: well inside the lease, so that nobody else
    /// takes the message while it is still being sent.
    pub(crate) send_timeout: Duration,
    /// How long a send in flight may still take once shutdown starts.
    pub(crate) finish: Duration,
    pub(crate) wake: Arc<Notify>,
    /// This worker's name in `lease_owner`, unique among all workers.
    pub(crate) owner: String,
}

/// How an attempt ended.
enum Outcome {
    Sent,
    Failed(String),
    /// Cut by shutdown: the lease runs out and another worker sends it.
    Abandoned,
}

impl Worker {
    /// Delivers until `stop` is cancelled; then finishes (or abandons) the
    /// message in hand and returns.
    pub(crate) async fn run(self, stop: CancellationToken) {
        tracing::info!(
            worker = %self.owner,
            transport = self.transport.kind(),
            "mail worker started"
        );
        let mut db_failures = 0u32;
        while !stop.is_cancelled() {
            // Registered before looking, so a job stored meanwhile wakes us.
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = chassis::time::now_millis();
            let until = now.saturating_add(millis(self.lease));
            let wait = match self.store.lease(&self.owner, now, until).await {
                Ok(Some(message)) => {
                    db_failures = 0;
                    self.deliver(message, &stop).await;
                    continue;
                }
                Ok(None) => {
                    db_failures = 0;
                    self.poll
                }
                Err(e) => {
                    db_failures = db_failures.saturating_add(1);
                    tracing::warn!(worker = %self.owner, error = %e, "cannot lease a message");
                    (self.poll * db_failures.min(25)).min(Duration::from_secs(5))
                }
            };
            tokio::select! {
                () = stop.cancelled() => break,
                () = &mut notified => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
        tracing::info!(worker = %self.owner, "mail worker stopped");
    }

    async fn deliver(&self, message: Leased, stop: &CancellationToken) {
        // The send continues the trace of the request that queued the
        // message, as a child of its span.
        let queued = message
            .traceparent
            .as_deref()
            .and_then(|parent| {
                TraceContext::from_traceparent(parent, message.tracestate.as_deref())
            })
            .unwrap_or_else(TraceContext::new_unrecorded_root);
        let mut work = Span::consumer(&queued, format!("mail deliver {}", message.template));
        work.set_attribute("messaging.system", "mail-queue");
        work.set_attribute("messaging.operation.type", "process");
        work.set_attribute("messaging.message.id", message.message_id.clone());
        work.set_attribute("messaging.message.delivery_attempt", message.attempts + 1);
        // The chassis' log format lifts `correlation_id`, `trace_id` and
        // `span_id` from spans with the request target onto every line
        // inside them.
        let (trace_id, span_id) = (work.trace().trace_id(), work.trace().span_id());
        let span = tracing::info_span!(
            target: chassis::telemetry::REQUEST_TARGET,
            "mail.deliver",
            correlation_id = %message.correlation_id,
            trace_id = trace_id.as_str(),
            span_id = span_id.as_str(),
        );
        let trace = work.trace().clone();
        if let Some(error) = self.attempt(message, &trace, stop).instrument(span).await {
            work.set_error(error);
        }
        work.end();
    }

    /// One attempt at `m`; the kind of failure, if it failed.
    async fn attempt(
        &self,
        m: Leased,
        trace: &TraceContext,
        stop: &CancellationToken,
    ) -> Option<&'static str> {
        let failures = u32::try_from(m.attempts).unwrap_or(u32::MAX);
        let attempt = failures.saturating_add(1);
        if stop.is_cancelled() {
            // Shutdown came while the message was being leased: give it
            // back rather than start a send that may be cut.
            match self.store.release(&m.message_id, &self.owner).await {
                Ok(_) => {
                    tracing::info!(message_id = %m.message_id, "shutting down: message given back untried")
                }
                Err(e) => tracing::warn!(
                    message_id = %m.message_id,
                    error = %e,
                    "shutting down: cannot give the message back; it is sent when its lease expires"
                ),
            }
            return Some("shutdown");
        }
        let email = match self.build(&m) {
            Ok(email) => email,
            Err(reason) => {
                // Rendering is deterministic: trying again cannot help.
                self.give_up(&m, attempt, &format!("cannot render: {reason}"))
                    .await;
                return Some("render");
            }
        };
        // The hand-over to the mail relay: a client span of its own.
        let mut relay = Span::client(trace, format!("{} send", self.transport.kind()));
        relay.set_attribute("mail.transport", self.transport.kind());
        let outcome = self.send(&email, stop).await;
        match outcome {
            Outcome::Sent => {
                relay.end();
                self.sent(&m, attempt).await;
                None
            }
            Outcome::Failed(error) => {
                relay.set_error("send");
                relay.end();
                self.failed(&m, attempt, &error).await;
                Some("send")
            }
            Outcome::Abandoned => {
                relay.set_error("abandoned");
                relay.end();
                tracing::warn!(
                    message_id = %m.message_id,
                    attempt,
                    lease_secs = self.lease.as_secs(),
                    "shutting down mid-send: the message is left to be sent again when its lease expires"
                );
                Some("abandoned")
            }
        }
    }

    fn build(&self, m: &Leased) -> Result<Email, String> {
        let data: serde_json::Value =
            serde_json::from_str(&m.data).map_err(|e| format!("stored data: {e}"))?;
        let rendered = template::render(&m.template, &data)?;
        let to = parse_address(&m.recipient).map_err(|e| format!("recipient {e}"))?;
        let bytes = format::message(
            &Headers {
                from: &self.from,
                to: &to,
                message_id: &m.message_id,
                correlation_id: &m.correlation_id,
                date: std::time::SystemTime::now(),
            },
            &rendered,
        );
        Ok(Email {
            message_id: m.message_id.clone(),
            from: self.from.clone(),
            to,
            bytes,
        })
    }

    async fn send(&self, email: &Email, stop: &CancellationToken) -> Outcome {
        let send = tokio::time::timeout(self.send_timeout, self.transport.send(email));
        tokio::pin!(send);
        let first = tokio::select! {
            r = &mut send => Some(r),
            () = stop.cancelled() => None,
        };
        let result = match first {
            Some(r) => r,
            None => match tokio::time::timeout(self.finish, &mut send).await {
                Ok(r) => r,
                Err(_) => return Outcome::Abandoned,
            },
        };
        match result {
            Ok(Ok(())) => Outcome::Sent,
            Ok(Err(e)) => Outcome::Failed(e),
            Err(_) => Outcome::Failed(format!(
                "{} transport: no answer within {} ms",
                self.transport.kind(),
                self.send_timeout.as_millis()
            )),
        }
    }

    async fn sent(&self, m: &Leased, attempt: u32) {
        // The mail is out: recording it matters, so a busy database gets a
        // few tries before the message is left to be sent again.
        for round in 1..=3u32 {
            let now = chassis::time::now_millis();
            match self.store.mark_sent(&m.message_id, &self.owner, now).await {
                Ok(true) => {
                    meters::message("sent");
                    tracing::info!(
                        message_id = %m.message_id,
                        attempt,
                        transport = self.transport.kind(),
                        "message sent"
                    );
                    return;
                }
                Ok(false) => {
                    tracing::warn!(
                        message_id = %m.message_id,
                        attempt,
                        "message sent after its lease was lost; the new holder sends it again (same Message-ID)"
                    );
                    return;
                }
                Err(e) if round < 3 => {
                    tracing::warn!(message_id = %m.message_id, error = %e, "cannot mark the message sent; trying again");
                    tokio::time::sleep(Duration::from_millis(100) * round).await;
                }
                Err(e) => {
                    tracing::error!(
                        message_id = %m.message_id,
                        error = %e,
                        "message sent but not marked; it is sent again when its lease expires"
                    );
                }
            }
        }
    }

    async fn failed(&self, m: &Leased, attempt: u32, error: &str) {
        meters::message("failed");
        let Some(delay) = self.policy.next(attempt) else {
            self.give_up(m, attempt, error).await;
            return;
        };
        let now = chassis::time::now_millis();
        let next = now.saturating_add(millis(delay));
        match self
            .store
            .mark_failed(
                &m.message_id,
                &self.owner,
                i64::from(attempt),
                Some(next),
                error,
            )
            .await
        {
            Ok(true) => tracing::warn!(
                message_id = %m.message_id,
                attempt,
                max_attempts = self.policy.max_attempts,
                retry_in_ms = millis(delay),
                error,
                "sending failed; will retry"
            ),
            Ok(false) => {
                tracing::warn!(message_id = %m.message_id, attempt, error, "sending failed after the lease was lost")
            }
            Err(e) => tracing::error!(
                message_id = %m.message_id,
                attempt,
                error = %e,
                "cannot record a failed attempt; the message is tried again when its lease expires"
            ),
        }
    }

    async fn give_up(&self, m: &Leased, attempt: u32, error: &str) {
        match self
            .store
            .mark_failed(&m.message_id, &self.owner, i64::from(attempt), None, error)
            .await
        {
            Ok(true) => {
                meters::message("dead");
                tracing::error!(
                    message_id = %m.message_id,
                    attempts = attempt,
                    error,
                    "message is dead: no more attempts"
                );
            }
            Ok(false) => {
                tracing::warn!(message_id = %m.message_id, attempt, error, "giving up after the lease was lost")
            }
            Err(e) => tracing::error!(
                message_id = %m.message_id,
                error = %e,
                "cannot mark the message dead; it is tried again when its lease expires"
            ),
        }
    }
}

/// Whole milliseconds of `d`, as stored.
fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 8,
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
    }

    #[test]
    fn the_ceiling_doubles_up_to_the_cap() {
        let p = policy();
        let secs: Vec<u64> = (1..=9).map(|n| p.ceiling(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(p.ceiling(0), Duration::from_secs(1));
        assert_eq!(p.ceiling(u32::MAX), Duration::from_secs(60));
    }

    #[test]
    fn delays_are_drawn_from_zero_to_the_ceiling() {
        let p = policy();
        assert_eq!(p.delay_with(3, 0.0), Duration::ZERO);
        assert_eq!(p.delay_with(3, 0.5), Duration::from_secs(2));
        assert_eq!(p.delay_with(3, 2.0), Duration::from_secs(4));
        assert_eq!(p.next(8), None);
        assert!(p.next(7).is_some());
    }
}
