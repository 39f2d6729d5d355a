//! Brute-force protection of the token endpoint: failed logins are counted
//! per subject name (a user name or a client id) and in total, and an
//! attempt over a limit is answered 429 *before* any password hash is
//! computed, so a flood of guesses costs the service almost nothing.
//!
//! * **Per name.** After [`LoginLimits::max_failures`] failures the name is
//!   locked for [`LoginLimits::lockout`]; every further failure (once the
//!   lock is over) doubles the lock, up to [`LoginLimits::max_lockout`].
//!   Failures are forgotten [`LoginLimits::window`] after the last one, and
//!   at once after a successful login. Attempts still being checked count
//!   as failures-to-be, so a burst of concurrent guesses for one name gets
//!   at most `max_failures` hashes, not one per request.
//! * **In total.** More than [`LoginLimits::global_max_failures`] failures
//!   within [`LoginLimits::global_window`], whatever the names, and every
//!   attempt waits for the window to end. The chassis server does not give
//!   handlers the client's address, so this budget stands in for a limit
//!   per address: it bounds guessing spread over many names.
//! * **Bounded memory.** At most [`LoginLimits::tracked_names`] names are
//!   tracked; when full, the one whose last attempt is oldest is forgotten.
//!   Names are at most [`MAX_NAME_LEN`] bytes (longer ones are refused
//!   before they get here). Since new names can only be added by failing,
//!   which the total budget limits, an attacker cannot quickly push a
//!   locked name out of the table.
//!
//! Locking by name lets anyone lock a user out for a while by guessing
//! wrong on purpose; the lock is short at first and bounded, which is the
//! usual trade-off (OWASP "Blocking Brute Force Attacks").
//!
//! Time comes from a [`Clock`] (seconds), so tests move it by hand.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, MutexGuard},
};

use chassis::auth::Clock;

use crate::LoginLimits;

/// Longest user name or client id accepted by the token endpoint, in bytes.
pub(crate) const MAX_NAME_LEN: usize = 256;

/// Which limit refused an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    /// The name's own failures.
    Name,
    /// The failures of every name together.
    Global,
}

impl Limit {
    /// The metric label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Name => "name",
            Self::Global => "global",
        }
    }
}

/// An attempt refused: retry after `retry_after` seconds (at least 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Throttled {
    pub(crate) retry_after: u64,
    pub(crate) limit: Limit,
}

/// Whose name: users and clients never share an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Subject {
    User,
    Client,
}

#[derive(Debug)]
struct Entry {
    failures: u32,
    last_failure: u64,
    locked_until: u64,
    /// Attempts admitted and not finished yet.
    pending: u32,
    /// Its key in `Tables::order`.
    seq: u64,
}

#[derive(Debug, Default)]
struct Tables {
    names: HashMap<String, Entry>,
    /// Names by their last attempt, oldest first.
    order: BTreeMap<u64, String>,
    next_seq: u64,
    global_start: u64,
    global_failures: u32,
    global_pending: u32,
}

/// The failed-login tables; see the [module docs](self).
pub(crate) struct Throttle {
    limits: LoginLimits,
    clock: Arc<dyn Clock>,
    tables: Mutex<Tables>,
}

impl std::fmt::Debug for Throttle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Throttle")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Throttle {
    pub(crate) fn new(limits: LoginLimits, clock: Arc<dyn Clock>) -> Self {
        Self {
            limits,
            clock,
            tables: Mutex::new(Tables::default()),
        }
    }

    fn tables(&self) -> MutexGuard<'_, Tables> {
        self.tables
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Admits an attempt for `name`, or says how long to wait. The attempt
    /// must end with [`Attempt::failed`] or [`Attempt::succeeded`]; dropped
    /// without either (an internal error, a cancelled request), it counts
    /// as neither.
    pub(crate) fn begin(&self, subject: Subject, name: &str) -> Result<Attempt<'_>, Throttled> {
        let now = self.clock.now();
        let key = key(subject, name);
        let l = &self.limits;
        let mut t = self.tables();
        let global_end = t.global_start.saturating_add(l.global_window.as_secs());
        if now >= global_end {
            t.global_start = now;
            t.global_failures = 0;
        }
        if t.global_failures.saturating_add(t.global_pending) >= l.global_max_failures {
            let end = t.global_start.saturating_add(l.global_window.as_secs());
            return Err(Throttled {
                retry_after: end.saturating_sub(now).max(1),
                limit: Limit::Global,
            });
        }
        if let Some(e) = t.names.get_mut(&key) {
            if now < e.locked_until {
                return Err(Throttled {
                    retry_after: e.locked_until - now,
                    limit: Limit::Name,
                });
            }
            if e.pending == 0 && now >= e.last_failure.saturating_add(l.window.as_secs()) {
                e.failures = 0;
            }
            // Guesses left before the lock; once a lock is over, one at a
            // time (its failure locks again, for twice as long).
            let room = l.max_failures.saturating_sub(e.failures).max(1);
            if e.pending >= room {
                // Enough guesses for this name are being checked already.
                return Err(Throttled {
                    retry_after: 1,
                    limit: Limit::Name,
                });
            }
        }
        t.global_pending += 1;
        let seq = t.next_seq;
        t.next_seq += 1;
        let entry = match t.names.get_mut(&key) {
            Some(e) => {
                let old = std::mem::replace(&mut e.seq, seq);
                e.pending += 1;
                t.order.remove(&old);
                t.order.insert(seq, key.clone());
                return Ok(Attempt {
                    throttle: self,
                    key,
                    done: false,
                });
            }
            None => Entry {
                failures: 0,
                last_failure: 0,
                locked_until: 0,
                pending: 1,
                seq,
            },
        };
        while t.names.len() >= l.tracked_names.max(1) {
            let Some((_, oldest)) = t.order.pop_first() else {
                break;
            };
            t.names.remove(&oldest);
        }
        t.order.insert(seq, key.clone());
        t.names.insert(key.clone(), entry);
        Ok(Attempt {
            throttle: self,
            key,
            done: false,
        })
    }

    /// How many names are tracked.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.tables().names.len()
    }
}

fn key(subject: Subject, name: &str) -> String {
    let prefix = match subject {
        Subject::User => "u:",
        Subject::Client => "c:",
    };
    let mut key = String::with_capacity(prefix.len() + name.len());
    key.push_str(prefix);
    key.push_str(name);
    key
}

/// An admitted attempt; see [`Throttle::begin`].
#[derive(Debug)]
pub(crate) struct Attempt<'a> {
    throttle: &'a Throttle,
    key: String,
    done: bool,
}

impl Attempt<'_> {
    /// The credentials were wrong: count a failure, and lock the name when
    /// it has too many.
    pub(crate) fn failed(mut self) {
        self.done = true;
        let now = self.throttle.clock.now();
        let l = &self.throttle.limits;
        let mut t = self.throttle.tables();
        t.global_pending = t.global_pending.saturating_sub(1);
        if now >= t.global_start.saturating_add(l.global_window.as_secs()) {
            t.global_start = now;
            t.global_failures = 0;
        }
        t.global_failures = t.global_failures.saturating_add(1);
        // Evicted meanwhile: it starts again from this failure.
        if !t.names.contains_key(&self.key) {
            let seq = t.next_seq;
            t.next_seq += 1;
            t.order.insert(seq, self.key.clone());
            t.names.insert(
                self.key.clone(),
                Entry {
                    failures: 0,
                    last_failure: now,
                    locked_until: 0,
                    pending: 1,
                    seq,
                },
            );
        }
        let Some(e) = t.names.get_mut(&self.key) else {
            return;
        };
        e.pending = e.pending.saturating_sub(1);
        e.failures = e.failures.saturating_add(1);
        e.last_failure = now;
        if e.failures >= l.max_failures {
            let doublings = (e.failures - l.max_failures).min(32);
            let lock = l
                .lockout
                .as_secs()
                .saturating_mul(1 << doublings)
                .min(l.max_lockout.as_secs());
            e.locked_until = now.saturating_add(lock);
        }
    }

    /// The credentials were right: the name's failures are forgotten.
    pub(crate) fn succeeded(mut self) {
        self.done = true;
        let mut t = self.throttle.tables();
        t.global_pending = t.global_pending.saturating_sub(1);
        if let Some(e) = t.names.remove(&self.key) {
            t.order.remove(&e.seq);
        }
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut t = self.throttle.tables();
        t.global_pending = t.global_pending.saturating_sub(1);
        if let Some(e) = t.names.get_mut(&self.key) {
            e.pending = e.pending.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chassis::auth::ManualClock;
    use std::time::Duration;

    fn limits() -> LoginLimits {
        LoginLimits {
            max_failures: 3,
            window: Duration::from_secs(900),
            lockout: Duration::from_secs(60),
            max_lockout: Duration::from_secs(300),
            global_max_failures: 1000,
            global_window: Duration::from_secs(60),
            tracked_names: 100,
        }
    }

    fn throttle(limits: LoginLimits) -> (Throttle, ManualClock) {
        let clock = ManualClock::new(1_000_000);
        (Throttle::new(limits, Arc::new(clock.clone())), clock)
    }

    fn fail(t: &Throttle, name: &str) {
        t.begin(Subject::User, name).unwrap().failed();
    }

    #[test]
    fn a_name_is_locked_after_its_failures_and_the_lock_doubles() {
        let (t, clock) = throttle(limits());
        for _ in 0..3 {
            fail(&t, "alice");
        }
        let refused = t.begin(Subject::User, "alice").unwrap_err();
        assert_eq!(
            refused,
            Throttled {
                retry_after: 60,
                limit: Limit::Name
            }
        );
        // Others are not affected; nor is a client of the same name.
        t.begin(Subject::User, "bob").unwrap().succeeded();
        t.begin(Subject::Client, "alice").unwrap().succeeded();

        clock.advance(59);
        assert_eq!(t.begin(Subject::User, "alice").unwrap_err().retry_after, 1);
        clock.advance(1);
        fail(&t, "alice");
        assert_eq!(
            t.begin(Subject::User, "alice").unwrap_err().retry_after,
            120
        );
        clock.advance(120);
        fail(&t, "alice");
        assert_eq!(
            t.begin(Subject::User, "alice").unwrap_err().retry_after,
            240
        );
        clock.advance(240);
        fail(&t, "alice");
        assert_eq!(
            t.begin(Subject::User, "alice").unwrap_err().retry_after,
            300,
            "capped"
        );

        // A success forgets every failure.
        clock.advance(300);
        t.begin(Subject::User, "alice").unwrap().succeeded();
        fail(&t, "alice");
        fail(&t, "alice");
        t.begin(Subject::User, "alice").unwrap().succeeded();
    }

    #[test]
    fn failures_are_forgotten_after_the_window() {
        let (t, clock) = throttle(limits());
        fail(&t, "alice");
        fail(&t, "alice");
        clock.advance(900);
        fail(&t, "alice");
        fail(&t, "alice");
        t.begin(Subject::User, "alice").unwrap().failed();
        assert!(t.begin(Subject::User, "alice").is_err());
    }

    #[test]
    fn concurrent_attempts_count_before_they_finish() {
        let (t, _clock) = throttle(limits());
        let a = t.begin(Subject::User, "alice").unwrap();
        let b = t.begin(Subject::User, "alice").unwrap();
        let c = t.begin(Subject::User, "alice").unwrap();
        assert_eq!(
            t.begin(Subject::User, "alice").unwrap_err(),
            Throttled {
                retry_after: 1,
                limit: Limit::Name
            }
        );
        // An attempt dropped unfinished frees its place without counting.
        drop(c);
        let c = t.begin(Subject::User, "alice").unwrap();
        a.succeeded();
        b.failed();
        c.failed();
        t.begin(Subject::User, "alice").unwrap().succeeded();
    }

    #[test]
    fn the_global_budget_bounds_failures_over_many_names() {
        let (t, clock) = throttle(LoginLimits {
            global_max_failures: 5,
            ..limits()
        });
        for i in 0..5 {
            fail(&t, &format!("user-{i}"));
        }
        let refused = t.begin(Subject::User, "alice").unwrap_err();
        assert_eq!(refused.limit, Limit::Global);
        assert_eq!(refused.retry_after, 60);
        clock.advance(30);
        assert_eq!(
            t.begin(Subject::Client, "orders").unwrap_err().retry_after,
            30
        );
        clock.advance(30);
        t.begin(Subject::User, "alice").unwrap().succeeded();
    }

    #[test]
    fn the_tables_are_bounded_and_forget_the_oldest() {
        let (t, clock) = throttle(LoginLimits {
            tracked_names: 10,
            ..limits()
        });
        for _ in 0..3 {
            fail(&t, "first");
        }
        assert!(t.begin(Subject::User, "first").is_err());
        for i in 0..10 {
            clock.advance(1);
            fail(&t, &format!("user-{i}"));
            assert!(t.tracked() <= 10);
        }
        assert_eq!(t.tracked(), 10);
        // The oldest entry was forgotten; the newest are kept.
        t.begin(Subject::User, "first").unwrap().succeeded();
        for _ in 0..2 {
            fail(&t, "user-9");
        }
        assert!(t.begin(Subject::User, "user-9").is_err());
    }
}
