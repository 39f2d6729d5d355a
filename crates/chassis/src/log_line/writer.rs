//! The background log writer: lines are appended to a shared buffer and a
//! thread writes the buffer out in bursts.
//!
//! A request's line costs a short critical section and a copy; no
//! allocation, no channel message, no wake-up of another thread and no
//! system call. The writer thread is woken when a line lands in an empty
//! buffer, waits [`GATHER`] for more, then writes everything gathered
//! with one `write` and sleeps until the next line. Under load that makes
//! a few hundred writes a second whatever the request rate; an idle
//! service's writer does not wake at all. The same line written through a
//! channel and flushed when the queue is empty (the usual non-blocking
//! writer) costs a wake-up, two context switches and a `write` per line
//! when the writer shares a core with the requests.
//!
//! A buffer that grows past [`LIMIT`] (stdout blocked) drops further lines
//! rather than stall requests or grow without bound; the writer says how
//! many it dropped in the stream itself once it catches up.

use std::{
    io::Write,
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

/// How long the writer gathers lines after the first of a burst.
pub(crate) const GATHER: Duration = Duration::from_millis(5);
/// Bytes held before lines are dropped.
pub(crate) const LIMIT: usize = 16 << 20;
/// The capacity kept between bursts; a larger buffer left by a burst is
/// given back.
const KEEP: usize = 256 << 10;

/// A handle that appends lines; cheap to clone.
#[derive(Clone)]
pub(crate) struct LogWriter {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// The writer waits here for a first line.
    wake: Condvar,
    /// [`WriterGuard`] waits here for the writer to finish.
    done: Condvar,
}

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    /// Writes dropped since the writer last reported.
    dropped: u64,
    closed: bool,
    finished: bool,
}

/// Stops the writer when dropped, after it has written what was appended.
#[must_use = "dropping the guard stops the log writer"]
pub(crate) struct WriterGuard {
    shared: Arc<Shared>,
}

impl LogWriter {
    /// Starts a writer thread writing to `out`. `dropped_line` renders the
    /// line that reports dropped lines.
    pub(crate) fn spawn<W>(
        out: W,
        dropped_line: impl Fn(u64) -> Vec<u8> + Send + 'static,
    ) -> (Self, WriterGuard)
    where
        W: Write + Send + 'static,
    {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                buf: Vec::with_capacity(KEEP),
                ..State::default()
            }),
            wake: Condvar::new(),
            done: Condvar::new(),
        });
        let thread = shared.clone();
        std::thread::Builder::new()
            .name("chassis-log".to_owned())
            .spawn(move || thread.run(out, dropped_line))
            .expect("the log writer thread can be spawned");
        (
            Self {
                shared: shared.clone(),
            },
            WriterGuard { shared },
        )
    }

    /// Appends `bytes` (whole lines).
    pub(crate) fn write(&self, bytes: &[u8]) {
        let mut s = self.shared.lock();
        if s.closed {
            return;
        }
        if s.buf.len() + bytes.len() > LIMIT {
            s.dropped += 1;
            return;
        }
        let first = s.buf.is_empty();
        s.buf.extend_from_slice(bytes);
        drop(s);
        if first {
            self.shared.wake.notify_one();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn run<W: Write>(&self, mut out: W, dropped_line: impl Fn(u64) -> Vec<u8>) {
        let mut spare: Vec<u8> = Vec::with_capacity(KEEP);
        loop {
            let mut s = self.lock();
            while s.buf.is_empty() && s.dropped == 0 && !s.closed {
                s = self.wake.wait(s).unwrap_or_else(PoisonError::into_inner);
            }
            if !s.closed {
                // Let the burst gather.
                drop(s);
                std::thread::sleep(GATHER);
                s = self.lock();
            }
            std::mem::swap(&mut s.buf, &mut spare);
            let dropped = std::mem::take(&mut s.dropped);
            let closed = s.closed;
            drop(s);
            if dropped > 0 {
                spare.extend_from_slice(&dropped_line(dropped));
            }
            if !spare.is_empty() {
                // Nowhere to report a failing stdout; the lines are lost.
                let _ = out.write_all(&spare).and_then(|()| out.flush());
            }
            spare.clear();
            spare.shrink_to(KEEP);
            if closed {
                let mut s = self.lock();
                if s.buf.is_empty() {
                    s.finished = true;
                    self.done.notify_all();
                    return;
                }
            }
        }
    }
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        let mut s = self.shared.lock();
        s.closed = true;
        self.shared.wake.notify_one();
        // At most 2 s for stdout to take the rest, in steps, so no clock is
        // read here.
        for _ in 0..20 {
            if s.finished {
                return;
            }
            s = self
                .shared
                .done
                .wait_timeout(s, Duration::from_millis(100))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// What `tracing-subscriber` writes through: each `write` is a whole
/// formatted event.
pub(crate) struct Appender<'a>(&'a LogWriter);

impl Write for Appender<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = Appender<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        Appender(self)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    /// An output that records each `write_all` it gets.
    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn dropped(n: u64) -> Vec<u8> {
        format!("dropped {n}\n").into_bytes()
    }

    #[test]
    fn lines_arrive_whole_in_order_and_in_few_writes() {
        let out = Writes::default();
        let (writer, guard) = LogWriter::spawn(out.clone(), dropped);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let writer = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..1_000 {
                        writer.write(format!("{{\"t\":{t},\"i\":{i}}}\n").as_bytes());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let writes = out.0.lock().unwrap().clone();
        let text = String::from_utf8(writes.concat()).unwrap();
        let mut next = [0; 4];
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).expect("a whole line");
            let t = v["t"].as_u64().unwrap() as usize;
            assert_eq!(v["i"], next[t], "each thread's lines in order");
            next[t] += 1;
        }
        assert_eq!(next, [1_000; 4], "every line written");
        assert!(
            writes.len() < 1_000,
            "4,000 lines in {} writes: lines are written in bursts",
            writes.len()
        );
    }

    #[test]
    fn a_line_alone_is_written_soon() {
        let out = Writes::default();
        let (writer, _guard) = LogWriter::spawn(out.clone(), dropped);
        writer.write(b"one\n");
        for _ in 0..500 {
            if !out.0.lock().unwrap().is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(out.0.lock().unwrap().concat(), b"one\n");
    }

    /// An output that blocks until opened, and tells when a write is in.
    #[derive(Clone)]
    struct Blocked(Arc<(Mutex<bool>, Condvar)>, Writes, Arc<AtomicBool>);

    impl Write for Blocked {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.2.store(true, Ordering::SeqCst);
            let (lock, cvar) = &*self.0;
            let mut open = lock.lock().unwrap();
            while !*open {
                open = cvar.wait(open).unwrap();
            }
            self.1.write(buf)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_blocked_output_drops_lines_past_the_limit_and_says_so() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let out = Writes::default();
        let entered = Arc::new(AtomicBool::new(false));
        let (writer, guard) =
            LogWriter::spawn(Blocked(gate.clone(), out.clone(), entered.clone()), dropped);
        let line = vec![b'x'; 1 << 20];
        // The first burst is taken by the blocked writer; then the buffer
        // fills to the limit and the rest are dropped.
        writer.write(&line);
        for _ in 0..1_000 {
            if entered.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            entered.load(Ordering::SeqCst),
            "the writer took the first burst"
        );
        for _ in 0..(LIMIT >> 20) + 3 {
            writer.write(&line);
        }
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        drop(guard);
        let text = out.0.lock().unwrap().concat();
        let kept = text.iter().filter(|b| **b == b'x').count() >> 20;
        assert_eq!(kept, 1 + (LIMIT >> 20), "the first burst and a full buffer");
        assert!(text.ends_with(b"dropped 3\n"), "the drop is reported");
    }

    #[test]
    fn lines_after_the_guard_is_dropped_are_ignored() {
        let out = Writes::default();
        let (writer, guard) = LogWriter::spawn(out.clone(), dropped);
        writer.write(b"kept\n");
        drop(guard);
        writer.write(b"late\n");
        assert_eq!(out.0.lock().unwrap().concat(), b"kept\n");
    }
}
