//! Brute-force protection of the token endpoint: failed logins are counted
//! per subject name (a user name or a client id), per client address and
//! in total, and an attempt over a limit is answered 429 *before* any
//! password hash is computed, so a flood of guesses costs the service
//! almost nothing.
//!
//! * **Per name.** After [`LoginLimits::max_failures`] failures the name is
//!   locked for [`LoginLimits::lockout`]; every further failure (once the
//!   lock is over) doubles the lock, up to [`LoginLimits::max_lockout`].
//!   Failures are forgotten [`LoginLimits::window`] after the last one, and
//!   at once after a successful login. Attempts still being checked count
//!   as failures-to-be, so a burst of concurrent guesses for one name gets
//!   at most `max_failures` hashes, not one per request.
//! * **Per address.** The failures from one client address, whatever the
//!   names, are counted the same way with
//!   [`LoginLimits::address_max_failures`] (the same window and locks): it
//!   bounds guessing spread over many names from one place. An IPv4
//!   address counts alone; an IPv6 address counts with its whole /64 (what
//!   one subscriber or host usually gets, and can pick addresses from at
//!   will); an IPv4-mapped IPv6 address counts as the IPv4 address. A
//!   success does *not* forget its address's failures, only its name's:
//!   otherwise one account of one's own would let one guess at every other
//!   account without end, a success between each few failures.
//! * **In total.** More than [`LoginLimits::global_max_failures`] failures
//!   within [`LoginLimits::global_window`], whatever the names and
//!   addresses, and every attempt waits for the window to end: it bounds
//!   guessing spread over many addresses too.
//! * **Bounded memory.** At most [`LoginLimits::tracked_names`] names, and
//!   as many addresses, are tracked; when a table is full, the entry whose
//!   last attempt is oldest is forgotten. Names are at most
//!   [`MAX_NAME_LEN`] bytes (longer ones are refused before they get
//!   here). Since new entries can only be added by failing, which the
//!   total budget limits, an attacker cannot quickly push a locked name or
//!   address out of its table.
//!
//! The address is the TCP peer's (the chassis' `peer_addresses()`). Behind
//! a proxy or load balancer every request has the proxy's address, so the
//! per-address limit counts every client's failures together, like a
//! second, stricter total: raise `AUTH_LOGIN_ADDRESS_MAX_FAILURES` there
//! (1000000 in effect turns it off); the per-name and total limits hold
//! whatever the address. `X-Forwarded-For` is deliberately not trusted:
//! any client can send it, so reading it would let an attacker pick a new
//! address for every guess, unless the service knew which proxies to
//! believe (which it does not). Requests that reach the router without a
//! socket (in-process tests) have no address, and only the other limits
//! apply to them.
//!
//! Locking by name lets anyone lock a user out for a while by guessing
//! wrong on purpose, and locking by address lets the users behind one NAT
//! lock each other out; each lock is short at first and bounded, which is
//! the usual trade-off (OWASP "Blocking Brute Force Attacks").
//!
//! Time comes from a [`Clock`] (seconds), so tests move it by hand.

use std::{
    collections::{BTreeMap, HashMap},
    hash::Hash,
    net::{IpAddr, Ipv6Addr},
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
    /// The failures from the client's address.
    Address,
    /// The failures of every name together.
    Global,
}

impl Limit {
    /// The metric label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Name => "name",
            Self::Address => "address",
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

/// The key under which the failures from `ip` are counted: an IPv4 address
/// as it is, an IPv6 address as its /64 network, an IPv4-mapped IPv6
/// address as the IPv4 address.
pub(crate) fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & (u128::MAX << 64))),
        v4 @ IpAddr::V4(_) => v4,
    }
}

/// How a table counts failures and locks its keys, in seconds.
#[derive(Debug, Clone, Copy)]
struct Policy {
    limit: Limit,
    max_failures: u32,
    window: u64,
    lockout: u64,
    max_lockout: u64,
    capacity: usize,
}

#[derive(Debug)]
struct Entry {
    failures: u32,
    last_failure: u64,
    locked_until: u64,
    /// Attempts admitted and not finished yet.
    pending: u32,
    /// Its key in `Table::order`.
    seq: u64,
}

/// The failures per key (a name, an address), bounded, forgetting the key
/// seen least recently first.
#[derive(Debug)]
struct Table<K> {
    policy: Policy,
    entries: HashMap<K, Entry>,
    /// Keys by their last attempt, oldest first.
    order: BTreeMap<u64, K>,
    next_seq: u64,
}

impl<K: Eq + Hash + Clone> Table<K> {
    fn new(policy: Policy) -> Self {
        Self {
            policy,
            entries: HashMap::new(),
            order: BTreeMap::new(),
            next_seq: 0,
        }
    }

    /// Whether one more attempt for `key` may begin at `now`.
    fn check(&mut self, key: &K, now: u64) -> Result<(), Throttled> {
        let p = self.policy;
        let Some(e) = self.entries.get_mut(key) else {
            return Ok(());
        };
        if now < e.locked_until {
            return Err(Throttled {
                retry_after: e.locked_until - now,
                limit: p.limit,
            });
        }
        if e.pending == 0 && now >= e.last_failure.saturating_add(p.window) {
            e.failures = 0;
        }
        // Guesses left before the lock; once a lock is over, one at a
        // time (its failure locks again, for twice as long).
        let room = p.max_failures.saturating_sub(e.failures).max(1);
        if e.pending >= room {
            // Enough guesses for this key are being checked already.
            return Err(Throttled {
                retry_after: 1,
                limit: p.limit,
            });
        }
        Ok(())
    }

    fn next_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Counts an attempt for `key` (already [checked](Self::check)) as
    /// begun.
    fn admit(&mut self, key: &K) {
        let seq = self.next_seq();
        if let Some(e) = self.entries.get_mut(key) {
            let old = std::mem::replace(&mut e.seq, seq);
            e.pending += 1;
            self.order.remove(&old);
            self.order.insert(seq, key.clone());
            return;
        }
        self.insert(
            key,
            Entry {
                failures: 0,
                last_failure: 0,
                locked_until: 0,
                pending: 1,
                seq,
            },
        );
    }

    /// Adds the entry of a key not in the table, forgetting the oldest
    /// ones when it is full.
    fn insert(&mut self, key: &K, entry: Entry) {
        while self.entries.len() >= self.policy.capacity.max(1) {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.entries.remove(&oldest);
        }
        self.order.insert(entry.seq, key.clone());
        self.entries.insert(key.clone(), entry);
    }

    /// An attempt for `key` failed at `now`: count it, and lock the key
    /// when it has too many.
    fn failed(&mut self, key: &K, now: u64) {
        let p = self.policy;
        // Forgotten meanwhile: it starts again from this failure.
        if !self.entries.contains_key(key) {
            let seq = self.next_seq();
            self.insert(
                key,
                Entry {
                    failures: 0,
                    last_failure: now,
                    locked_until: 0,
                    pending: 1,
                    seq,
                },
            );
        }
        let Some(e) = self.entries.get_mut(key) else {
            return;
        };
        e.pending = e.pending.saturating_sub(1);
        e.failures = e.failures.saturating_add(1);
        e.last_failure = now;
        if e.failures >= p.max_failures {
            let doublings = (e.failures - p.max_failures).min(32);
            let lock = p.lockout.saturating_mul(1 << doublings).min(p.max_lockout);
            e.locked_until = now.saturating_add(lock);
        }
    }

    /// An attempt for `key` ended without counting.
    fn ended(&mut self, key: &K) {
        if let Some(e) = self.entries.get_mut(key) {
            e.pending = e.pending.saturating_sub(1);
        }
    }

    /// Forgets every failure of `key`.
    fn forget(&mut self, key: &K) {
        if let Some(e) = self.entries.remove(key) {
            self.order.remove(&e.seq);
        }
    }
}

#[derive(Debug)]
struct Tables {
    names: Table<String>,
    addresses: Table<IpAddr>,
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
        let policy = |limit, max_failures| Policy {
            limit,
            max_failures,
            window: limits.window.as_secs(),
            lockout: limits.lockout.as_secs(),
            max_lockout: limits.max_lockout.as_secs(),
            capacity: limits.tracked_names,
        };
        Self {
            limits,
            clock,
            tables: Mutex::new(Tables {
                names: Table::new(policy(Limit::Name, limits.max_failures)),
                addresses: Table::new(policy(Limit::Address, limits.address_max_failures)),
                global_start: 0,
                global_failures: 0,
                global_pending: 0,
            }),
        }
    }

    fn tables(&self) -> MutexGuard<'_, Tables> {
        self.tables
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Admits an attempt for `name` from the client address `peer` (when
    /// known), or says how long to wait. The attempt must end with
    /// [`Attempt::failed`] or [`Attempt::succeeded`]; dropped without
    /// either (an internal error, a cancelled request), it counts as
    /// neither.
    pub(crate) fn begin(
        &self,
        subject: Subject,
        name: &str,
        peer: Option<IpAddr>,
    ) -> Result<Attempt<'_>, Throttled> {
        let now = self.clock.now();
        let key = key(subject, name);
        let address = peer.map(address_key);
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
        if let Some(address) = &address {
            t.addresses.check(address, now)?;
        }
        t.names.check(&key, now)?;
        t.global_pending += 1;
        if let Some(address) = &address {
            t.addresses.admit(address);
        }
        t.names.admit(&key);
        Ok(Attempt {
            throttle: self,
            key,
            address,
            done: false,
        })
    }

    /// How many names are tracked.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.tables().names.entries.len()
    }

    /// How many addresses are tracked.
    #[cfg(test)]
    fn tracked_addresses(&self) -> usize {
        self.tables().addresses.entries.len()
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
    address: Option<IpAddr>,
    done: bool,
}

impl Attempt<'_> {
    /// The credentials were wrong: count a failure of the name, the address
    /// and in total, and lock the name or address when it has too many.
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
        if let Some(address) = &self.address {
            t.addresses.failed(address, now);
        }
        t.names.failed(&self.key, now);
    }

    /// The credentials were right: the name's failures are forgotten (not
    /// the address's; see the [module docs](self)).
    pub(crate) fn succeeded(mut self) {
        self.done = true;
        let mut t = self.throttle.tables();
        t.global_pending = t.global_pending.saturating_sub(1);
        if let Some(address) = &self.address {
            t.addresses.ended(address);
        }
        t.names.forget(&self.key);
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut t = self.throttle.tables();
        t.global_pending = t.global_pending.saturating_sub(1);
        if let Some(address) = &self.address {
            t.addresses.ended(address);
        }
        t.names.ended(&self.key);
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
            address_max_failures: 1000,
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
        t.begin(Subject::User, name, None).unwrap().failed();
    }

    fn ip(text: &str) -> Option<IpAddr> {
        Some(text.parse().unwrap())
    }

    fn fail_from(t: &Throttle, name: &str, from: &str) {
        t.begin(Subject::User, name, ip(from)).unwrap().failed();
    }

    #[test]
    fn a_name_is_locked_after_its_failures_and_the_lock_doubles() {
        let (t, clock) = throttle(limits());
        for _ in 0..3 {
            fail(&t, "alice");
        }
        let refused = t.begin(Subject::User, "alice", None).unwrap_err();
        assert_eq!(
            refused,
            Throttled {
                retry_after: 60,
                limit: Limit::Name
            }
        );
        // Others are not affected; nor is a client of the same name.
        t.begin(Subject::User, "bob", None).unwrap().succeeded();
        t.begin(Subject::Client, "alice", None).unwrap().succeeded();

        clock.advance(59);
        assert_eq!(
            t.begin(Subject::User, "alice", None)
                .unwrap_err()
                .retry_after,
            1
        );
        clock.advance(1);
        fail(&t, "alice");
        assert_eq!(
            t.begin(Subject::User, "alice", None)
                .unwrap_err()
                .retry_after,
            120
        );
        clock.advance(120);
        fail(&t, "alice");
        assert_eq!(
            t.begin(Subject::User, "alice", None)
                .unwrap_err()
                .retry_after,
            240
        );
        clock.advance(240);
        fail(&t, "alice");
        assert_eq!(
            t.begin(Subject::User, "alice", None)
                .unwrap_err()
                .retry_after,
            300,
            "capped"
        );

        // A success forgets every failure.
        clock.advance(300);
        t.begin(Subject::User, "alice", None).unwrap().succeeded();
        fail(&t, "alice");
        fail(&t, "alice");
        t.begin(Subject::User, "alice", None).unwrap().succeeded();
    }

    #[test]
    fn failures_are_forgotten_after_the_window() {
        let (t, clock) = throttle(limits());
        fail(&t, "alice");
        fail(&t, "alice");
        clock.advance(900);
        fail(&t, "alice");
        fail(&t, "alice");
        t.begin(Subject::User, "alice", None).unwrap().failed();
        assert!(t.begin(Subject::User, "alice", None).is_err());
    }

    #[test]
    fn concurrent_attempts_count_before_they_finish() {
        let (t, _clock) = throttle(limits());
        let a = t.begin(Subject::User, "alice", None).unwrap();
        let b = t.begin(Subject::User, "alice", None).unwrap();
        let c = t.begin(Subject::User, "alice", None).unwrap();
        assert_eq!(
            t.begin(Subject::User, "alice", None).unwrap_err(),
            Throttled {
                retry_after: 1,
                limit: Limit::Name
            }
        );
        // An attempt dropped unfinished frees its place without counting.
        drop(c);
        let c = t.begin(Subject::User, "alice", None).unwrap();
        a.succeeded();
        b.failed();
        c.failed();
        t.begin(Subject::User, "alice", None).unwrap().succeeded();
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
        let refused = t.begin(Subject::User, "alice", None).unwrap_err();
        assert_eq!(refused.limit, Limit::Global);
        assert_eq!(refused.retry_after, 60);
        clock.advance(30);
        assert_eq!(
            t.begin(Subject::Client, "orders", None)
                .unwrap_err()
                .retry_after,
            30
        );
        clock.advance(30);
        t.begin(Subject::User, "alice", None).unwrap().succeeded();
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
        assert!(t.begin(Subject::User, "first", None).is_err());
        for i in 0..10 {
            clock.advance(1);
            fail(&t, &format!("user-{i}"));
            assert!(t.tracked() <= 10);
        }
        assert_eq!(t.tracked(), 10);
        // The oldest entry was forgotten; the newest are kept.
        t.begin(Subject::User, "first", None).unwrap().succeeded();
        for _ in 0..2 {
            fail(&t, "user-9");
        }
        assert!(t.begin(Subject::User, "user-9", None).is_err());
    }

    #[test]
    fn addresses_are_keyed_by_ipv4_address_and_ipv6_64() {
        let key = |s: &str| address_key(s.parse().unwrap()).to_string();
        assert_eq!(key("192.0.2.7"), "192.0.2.7");
        assert_eq!(key("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2::1"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:3::1"), "2001:db8:1:3::");
        // A mapped IPv4 address (a dual-stack listener) is its own IPv4
        // address, not the /64 that every mapped address shares.
        assert_eq!(key("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(key("::ffff:192.0.2.8"), "192.0.2.8");
    }

    #[test]
    fn an_address_is_locked_after_failures_over_many_names() {
        let (t, clock) = throttle(LoginLimits {
            address_max_failures: 4,
            ..limits()
        });
        for i in 0..4 {
            fail_from(&t, &format!("user-{i}"), "192.0.2.1");
        }
        let refused = t
            .begin(Subject::User, "someone-else", ip("192.0.2.1"))
            .unwrap_err();
        assert_eq!(
            refused,
            Throttled {
                retry_after: 60,
                limit: Limit::Address
            }
        );
        // Clients of that name from the same address too.
        assert_eq!(
            t.begin(Subject::Client, "orders", ip("192.0.2.1"))
                .unwrap_err()
                .limit,
            Limit::Address
        );
        // The next IPv4 address, an unknown address, and the names
        // themselves from elsewhere are not affected.
        t.begin(Subject::User, "user-0", ip("192.0.2.2"))
            .unwrap()
            .succeeded();
        t.begin(Subject::User, "user-1", None).unwrap().succeeded();

        // An IPv6 /64 counts as one address.
        for i in 0..4 {
            fail_from(&t, &format!("v6-{i}"), &format!("2001:db8::{i}"));
        }
        assert_eq!(
            t.begin(Subject::User, "x", ip("2001:db8::ffff:1"))
                .unwrap_err()
                .limit,
            Limit::Address
        );
        t.begin(Subject::User, "x", ip("2001:db8:0:1::1"))
            .unwrap()
            .succeeded();

        // The same lock shape as names: doubled by a failure after a lock.
        clock.advance(60);
        fail_from(&t, "user-9", "192.0.2.1");
        assert_eq!(
            t.begin(Subject::User, "user-10", ip("192.0.2.1"))
                .unwrap_err()
                .retry_after,
            120
        );
        assert_eq!(t.tracked_addresses(), 4);
    }

    #[test]
    fn a_success_forgets_the_name_but_not_the_address() {
        let (t, clock) = throttle(LoginLimits {
            address_max_failures: 4,
            ..limits()
        });
        for name in ["a", "b", "c"] {
            fail_from(&t, name, "192.0.2.1");
        }
        t.begin(Subject::User, "mine", ip("192.0.2.1"))
            .unwrap()
            .succeeded();
        fail_from(&t, "d", "192.0.2.1");
        assert_eq!(
            t.begin(Subject::User, "mine", ip("192.0.2.1"))
                .unwrap_err()
                .limit,
            Limit::Address
        );
        // The address's failures are forgotten after the window.
        clock.advance(900);
        t.begin(Subject::User, "mine", ip("192.0.2.1"))
            .unwrap()
            .succeeded();
        for name in ["a", "b", "c"] {
            fail_from(&t, name, "192.0.2.1");
        }
        t.begin(Subject::User, "e", ip("192.0.2.1"))
            .unwrap()
            .failed();
        assert!(t.begin(Subject::User, "f", ip("192.0.2.1")).is_err());
    }

    #[test]
    fn concurrent_attempts_from_one_address_count_before_they_finish() {
        let (t, _clock) = throttle(LoginLimits {
            address_max_failures: 2,
            ..limits()
        });
        let a = t.begin(Subject::User, "a", ip("192.0.2.1")).unwrap();
        let b = t.begin(Subject::User, "b", ip("192.0.2.1")).unwrap();
        assert_eq!(
            t.begin(Subject::User, "c", ip("192.0.2.1")).unwrap_err(),
            Throttled {
                retry_after: 1,
                limit: Limit::Address
            }
        );
        // Refused by the address, the attempt left no trace on the name.
        drop(b);
        t.begin(Subject::User, "c", ip("192.0.2.1"))
            .unwrap()
            .succeeded();
        a.succeeded();
    }
}
