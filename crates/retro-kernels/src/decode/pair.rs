//! Two halves of one step at once, the second on a helper thread that spins between steps.
//!
//! At batch 1 a token's work splits into a few dozen halves of some ten microseconds each (a
//! projection's output panels, an attention's heads). Between them rayon's idle worker goes to
//! sleep, and waking it (a futex call, then a context switch) costs about as long as the half it
//! would run: measured on `retro bench generate`, the caller ended up running most second halves
//! itself. The helper here instead spins for a while after each half, so the next one starts at
//! once; it parks after [`PARK_AFTER`] without work, so it costs nothing outside generation.
//!
//! [`join`] never waits on a half that has not started: if the helper has not taken it by the time
//! the caller's own half is done (it is parked, busy with another caller's, or descheduled), the
//! caller takes it back and runs it itself.

use std::cell::{Cell, UnsafeCell};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering::*};
use std::sync::OnceLock;
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

/// How long the helper spins without work before it parks: longer than the gaps between a
/// token's halves (the norms, the cache appends, a chunk's encoding), short enough that a
/// finished generation gives its core back at once.
pub const PARK_AFTER: Duration = Duration::from_millis(2);

/// How long the helper busy-waits before it yields between polls, so that other threads (rayon's
/// workers at larger batches) get the core.
const SPIN_BEFORE_YIELD: Duration = Duration::from_micros(100);

/// The half posted to the helper, on the caller's stack; the helper calls `run` on it.
struct Job {
    run: unsafe fn(*const Job),
    done: AtomicBool,
}

/// A [`Job`] with its closure and its result. `repr(C)` keeps `header` first, so a pointer to it
/// is a pointer to the whole.
#[repr(C)]
struct StackJob<F, R> {
    header: Job,
    f: UnsafeCell<Option<F>>,
    result: UnsafeCell<Option<thread::Result<R>>>,
}

impl<F: FnOnce() -> R, R> StackJob<F, R> {
    fn new(f: F) -> Self {
        Self {
            header: Job {
                run: Self::run,
                done: AtomicBool::new(false),
            },
            f: UnsafeCell::new(Some(f)),
            result: UnsafeCell::new(None),
        }
    }

    /// Runs the closure and stores its result; `done` is the job's last access.
    ///
    /// # Safety
    /// `job` points to a live `StackJob<F, R>` whose closure nobody else takes.
    unsafe fn run(job: *const Job) {
        let job = &*(job as *const Self);
        let f = (*job.f.get()).take().expect("a job runs once");
        *job.result.get() = Some(catch_unwind(AssertUnwindSafe(f)));
        job.header.done.store(true, Release);
    }

    /// The closure, when the helper never took it.
    fn take(&self) -> F {
        // SAFETY: called only after the job was taken back from the slot (or never posted), so
        // no other thread can reach it.
        unsafe { (*self.f.get()).take().expect("a job runs once") }
    }
}

/// The helper thread and its one-job mailbox.
struct Helper {
    /// The posted job, or null.
    slot: AtomicPtr<Job>,
    /// Set while the helper is (about to be) parked.
    parked: AtomicBool,
    thread: Thread,
}

thread_local! {
    /// Set on the helper thread: a join there runs both halves in place.
    static ON_HELPER: Cell<bool> = const { Cell::new(false) };
}

fn helper() -> &'static Helper {
    static HELPER: OnceLock<Helper> = OnceLock::new();
    HELPER.get_or_init(|| {
        let spawned = thread::Builder::new()
            .name("retro-decode-pair".into())
            .spawn(|| {
                ON_HELPER.set(true);
                // Returns once the initialisation below is done.
                serve(HELPER.wait())
            })
            .expect("spawning the decode helper thread");
        Helper {
            slot: AtomicPtr::new(null_mut()),
            parked: AtomicBool::new(false),
            thread: spawned.thread().clone(),
        }
    })
}

/// The helper's loop: take a job, run it, spin for the next; park when none comes.
fn serve(h: &Helper) -> ! {
    let mut idle_since = Instant::now();
    let mut polls = 0u32;
    loop {
        let job = h.slot.load(Acquire);
        if !job.is_null()
            && h.slot
                .compare_exchange(job, null_mut(), AcqRel, Acquire)
                .is_ok()
        {
            // SAFETY: taking the job out of the slot makes it ours alone; its owner waits for
            // `done` before the job leaves its stack.
            unsafe { ((*job).run)(job) };
            idle_since = Instant::now();
            polls = 0;
            continue;
        }
        polls = polls.wrapping_add(1);
        if !polls.is_multiple_of(64) {
            std::hint::spin_loop();
            continue;
        }
        let idle = idle_since.elapsed();
        if idle < SPIN_BEFORE_YIELD {
            continue;
        }
        if idle < PARK_AFTER {
            thread::yield_now();
            continue;
        }
        // Announce the park before the last look at the slot: a poster either sees `parked`
        // and unparks, or its job is seen here (both sides use SeqCst).
        h.parked.store(true, SeqCst);
        if h.slot.load(SeqCst).is_null() {
            thread::park();
        }
        h.parked.store(false, SeqCst);
        idle_since = Instant::now();
    }
}

/// Runs `a` here and `b` on the helper thread at the same time, and returns both results. A panic
/// in either is resumed here once both halves are over.
///
/// With rayon's pool at one thread, on the helper itself, or while another caller's half holds
/// the helper, both run here, `b` after `a`.
pub fn join<A, B, RA, RB>(a: A, b: B) -> (RA, RB)
where
    A: FnOnce() -> RA,
    B: FnOnce() -> RB + Send,
    RB: Send,
{
    if rayon::current_num_threads() < 2 || ON_HELPER.get() {
        return both_here(a, b);
    }
    let h = helper();
    let job = StackJob::new(b);
    let ptr = &job.header as *const Job as *mut Job;
    if h.slot
        .compare_exchange(null_mut(), ptr, SeqCst, Relaxed)
        .is_err()
    {
        return both_here(a, job.take());
    }
    if h.parked.load(SeqCst) {
        h.thread.unpark();
    }
    // `a` must not unwind past the wait below: `b` may borrow what lives in this frame.
    let ra = catch_unwind(AssertUnwindSafe(a));
    let rb = if h
        .slot
        .compare_exchange(ptr, null_mut(), AcqRel, Acquire)
        .is_ok()
    {
        // Not started: taken back.
        catch_unwind(AssertUnwindSafe(job.take()))
    } else {
        let started = Instant::now();
        while !job.header.done.load(Acquire) {
            if started.elapsed() < SPIN_BEFORE_YIELD {
                std::hint::spin_loop();
            } else {
                thread::yield_now();
            }
        }
        // SAFETY: `done` is set after the result was written, and the helper no longer
        // touches the job.
        unsafe { (*job.result.get()).take() }.expect("a finished job holds its result")
    };
    match (ra, rb) {
        (Ok(ra), Ok(rb)) => (ra, rb),
        (Err(p), _) | (_, Err(p)) => resume_unwind(p),
    }
}

/// `a` then `b` on this thread; a panic in `a` still lets `b` run, as [`join`] promises.
fn both_here<RA, RB>(a: impl FnOnce() -> RA, b: impl FnOnce() -> RB) -> (RA, RB) {
    let ra = catch_unwind(AssertUnwindSafe(a));
    let rb = catch_unwind(AssertUnwindSafe(b));
    match (ra, rb) {
        (Ok(ra), Ok(rb)) => (ra, rb),
        (Err(p), _) | (_, Err(p)) => resume_unwind(p),
    }
}

/// `f(r0, a, b)` on each half of the `rows` rows of `a` and `b` (rows of equal width in each),
/// `r0` the half's first row: the first half here, the second on the helper ([`join`]).
pub fn halves<A: Sync, B: Send>(
    a: &[A],
    b: &mut [B],
    rows: usize,
    f: impl Fn(usize, &[A], &mut [B]) + Sync,
) {
    let half = rows.div_ceil(2);
    let (wa, wb) = (a.len() / rows.max(1), b.len() / rows.max(1));
    let (a0, a1) = a.split_at(half * wa);
    let (b0, b1) = b.split_at_mut(half * wb);
    join(|| f(0, a0, b0), || f(half, a1, b1));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }

    #[test]
    fn both_halves_run_on_two_threads_and_return_their_results() {
        pool(2).install(|| {
            let here = thread::current().id();
            let mut helped = 0;
            let mut out = [0u64; 2];
            for i in 0..500u64 {
                let (lo, hi) = out.split_at_mut(1);
                let b_started = AtomicBool::new(false);
                let (a, b) = join(
                    || {
                        // Wait a little for the helper to take `b`, as a real half would.
                        let t = Instant::now();
                        while !b_started.load(SeqCst) && t.elapsed() < Duration::from_millis(20) {
                            std::hint::spin_loop();
                        }
                        lo[0] += i;
                        thread::current().id()
                    },
                    || {
                        b_started.store(true, SeqCst);
                        hi[0] += 2 * i;
                        thread::current().id()
                    },
                );
                assert_eq!(a, here);
                helped += usize::from(b != here);
            }
            assert_eq!(out, [499 * 250, 2 * 499 * 250]);
            // A half is taken back only when the helper has not started it within 20 ms
            // (parked, or kept off the cores by other work).
            assert!(helped >= 250, "the helper ran {helped} of 500 halves");
        });
    }

    #[test]
    fn one_thread_runs_both_halves_in_place() {
        pool(1).install(|| {
            let here = thread::current().id();
            let (a, b) = join(|| thread::current().id(), || thread::current().id());
            assert_eq!((a, b), (here, here));
        });
    }

    #[test]
    fn a_panic_in_either_half_reaches_the_caller_after_both_ended() {
        pool(2).install(|| {
            for first in [true, false] {
                let other_ran = AtomicBool::new(false);
                let r = catch_unwind(AssertUnwindSafe(|| {
                    join(
                        || {
                            if first {
                                panic!("a");
                            }
                            other_ran.store(true, SeqCst);
                        },
                        || {
                            if !first {
                                panic!("b");
                            }
                            thread::sleep(Duration::from_millis(5));
                            other_ran.store(true, SeqCst);
                        },
                    )
                }));
                let msg = *r.unwrap_err().downcast::<&str>().unwrap();
                assert_eq!(msg, if first { "a" } else { "b" });
                assert!(other_ran.load(SeqCst), "the other half was cut short");
            }
            // The helper still serves after a panic.
            assert_eq!(join(|| 1, || 2), (1, 2));
        });
    }

    #[test]
    fn callers_on_several_threads_and_nested_joins_all_finish() {
        let sums: Vec<u64> = (0..4u64)
            .map(|t| {
                thread::spawn(move || {
                    pool(2).install(|| {
                        (0..500u64)
                            .map(|i| {
                                let (a, (b, c)) = join(|| i + t, || join(|| 2 * i, || 3 * i));
                                a + b + c
                            })
                            .sum()
                    })
                })
            })
            .map(|h| h.join().unwrap())
            .collect();
        for (t, s) in sums.iter().enumerate() {
            assert_eq!(*s, 6 * 499 * 250 + 500 * t as u64);
        }
    }
}
