//! The sliding windows the rates are computed over: a lock-free ring of
//! the last N outcomes for the closed state's hot path, and a list of
//! timed samples for a time window (and anything else under the lock).

use std::{
    collections::VecDeque,
    sync::atomic::{AtomicI64, AtomicU8, AtomicU32, Ordering},
    time::Duration,
};

use tokio::time::Instant;

/// The sliding window the rates are computed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// The last N calls.
    Count(usize),
    /// The calls of the last duration.
    Time(Duration),
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    failed: bool,
    slow: bool,
}

/// The outcomes recorded under the breaker's lock, with their time, and the
/// failed and slow calls among them, kept as they change so that a decision
/// never walks the window.
#[derive(Debug, Default)]
pub(super) struct Samples {
    samples: VecDeque<Sample>,
    failed: usize,
    slow: usize,
}

impl Samples {
    /// Records one outcome at `now` and forgets what `window` no longer
    /// holds; returns the calls, failures and slow calls in the window.
    pub(super) fn push(
        &mut self,
        window: Window,
        now: Instant,
        failed: bool,
        slow: bool,
    ) -> (usize, usize, usize) {
        self.samples.push_back(Sample {
            at: now,
            failed,
            slow,
        });
        self.failed += usize::from(failed);
        self.slow += usize::from(slow);
        while let Some(oldest) = self.samples.front().copied() {
            let evict = match window {
                Window::Count(n) => self.samples.len() > n,
                Window::Time(d) => now.saturating_duration_since(oldest.at) > d,
            };
            if !evict {
                break;
            }
            self.samples.pop_front();
            self.failed -= usize::from(oldest.failed);
            self.slow -= usize::from(oldest.slow);
        }
        (self.samples.len(), self.failed, self.slow)
    }

    /// Empties the window.
    pub(super) fn clear(&mut self) {
        self.samples.clear();
        self.failed = 0;
        self.slow = 0;
    }
}

/// The last N outcomes, recorded without a lock: each call takes the next
/// slot and swaps its outcome in; the running counts change by what the
/// swap replaced, so they always agree with the slots once writers finish.
/// A success into a full window of successes is not pushed: it would
/// replace a success with a success, and which one is oldest cannot
/// matter while they are all alike.
pub(super) struct Ring {
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
    pub(super) filled: AtomicI64,
    pub(super) failed: AtomicI64,
    pub(super) slow: AtomicI64,
}

const PRESENT: u8 = 1;
const FAILED: u8 = 2;
const SLOWED: u8 = 4;

impl Ring {
    pub(super) fn new(n: usize) -> Self {
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
    pub(super) fn push(&self, failed: bool, slow: bool) -> (usize, usize, usize) {
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
    pub(super) fn all_succeeded(&self) -> bool {
        self.failed.load(Ordering::Acquire) == 0
            && self.slow.load(Ordering::Acquire) == 0
            && usize::try_from(self.filled.load(Ordering::Acquire)).ok() == Some(self.slots.len())
    }

    /// `ticket % slots.len()`.
    #[inline]
    pub(super) fn slot_of(&self, ticket: u32) -> usize {
        let low = self.magic.wrapping_mul(u64::from(ticket));
        ((u128::from(low) * self.slots.len() as u128) >> 64) as usize
    }

    /// Empties the window.
    pub(super) fn clear(&self) {
        for slot in &self.slots {
            let old = slot.swap(0, Ordering::AcqRel);
            if old != 0 {
                self.account(old, 0);
            }
        }
    }
}
