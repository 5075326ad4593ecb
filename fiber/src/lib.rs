//! Stackful fibers: synchronous code that waits for asynchronous work without blocking its
//! thread.
//!
//! rustls calls a signer and a key exchange synchronously, in the middle of its handshake
//! state machine. When the work is a device job, blocking the thread for the answer costs
//! more host CPU than the device saves: the thread sleeps, another is woken to run the
//! runtime's other tasks, and the answer wakes the first again. OpenSSL solves this for
//! QAT with `ASYNC_JOB`: the handshake runs on a stack of its own and is paused while the
//! device works. [`run`] does the same for a tokio task: it runs a closure on a fiber (a
//! [corosensei] coroutine with a pooled stack); code inside calls [`suspend_until`] with a
//! future, the fiber pauses, the task awaits the future as any other, and the fiber resumes
//! with its output. No thread blocks and none is woken besides the runtime's own.
//!
//! Outside a fiber [`suspend_until`] hands the future back, so the same callback can wait
//! its own way when it is called elsewhere (a blocking thread, a test).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use corosensei::stack::DefaultStack;
use corosensei::{Coroutine, CoroutineResult, Yielder};

/// Work a fiber waits for. The task running the fiber polls it to completion, then resumes.
type Pending = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Bytes of stack per fiber. A rustls handshake, signing on the CPU when the device cannot
/// (RSA-4096 in aws-lc included), stays well under 64 KiB; the rest is margin. Pages that are
/// never touched cost no memory, and a guard page below the stack turns an overflow into a
/// fault, not corruption.
pub const STACK_SIZE: usize = 256 * 1024;

/// Stacks a thread keeps for the next fiber (a stack is an mmap and its page faults).
const POOLED_STACKS: usize = 16;

/// What a running fiber keeps at the bottom of its own stack: its yielder, and the uses of
/// its allowance ([`within_allowance`]).
struct Frame {
    yielder: *const Yielder<(), Pending>,
    used: Cell<u32>,
}

thread_local! {
    /// The frame of the fiber this thread is running, or null outside fibers.
    static CURRENT: Cell<*const Frame> = const { Cell::new(std::ptr::null()) };
    static STACKS: RefCell<Vec<DefaultStack>> = const { RefCell::new(Vec::new()) };
}

/// A coroutine the task may move between threads.
struct Fiber<R>(Coroutine<(), Pending, R, DefaultStack>);

// SAFETY: a suspended fiber's stack holds the closure (`Send` by `run`'s bound), the frames
// of the code that called `suspend_until`, and nothing else. `suspend_until`'s contract is
// that those frames hold nothing bound to the thread across the call (no thread-local
// borrow, no `!Send` guard), so moving the fiber moves only `Send` data; a fiber is resumed
// by one thread at a time (`&mut`), and `CURRENT` is set again on whichever thread resumes
// it. The return value is `Send` by `run`'s bound.
unsafe impl<R: Send> Send for Fiber<R> {}

/// Runs `f` on a fiber of the calling task. Each [`suspend_until`] inside it pauses the fiber
/// while this future awaits the work; `f`'s result is this future's output. If the future is
/// dropped while the fiber waits, the fiber's stack is unwound (its values dropped) and the
/// work it waited for is dropped. A panic in `f` reaches the caller.
///
/// When no stack can be had (out of memory), `f` runs on the caller's stack instead, and its
/// waits happen in whatever way the callback uses outside fibers.
pub async fn run<R, F>(f: F) -> R
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let stack = match take_stack() {
        Ok(stack) => stack,
        Err(_) => return f(),
    };
    let mut fiber = Fiber(Coroutine::with_stack(
        stack,
        move |yielder: &Yielder<(), Pending>, ()| {
            let frame = Frame {
                yielder,
                used: Cell::new(0),
            };
            let _inside = Inside::enter(&frame);
            f()
        },
    ));
    loop {
        match fiber.0.resume(()) {
            CoroutineResult::Yield(pending) => pending.await,
            CoroutineResult::Return(result) => {
                give_back(fiber.0.into_stack());
                return result;
            }
        }
    }
}

// A fiber may resume on another thread than the one it paused on. Within one function
// activation the compiler may compute a thread-local's address once and reuse it, so code
// that spans a pause must not touch a thread-local directly: it would reach the old thread's.
// Every access to `CURRENT` therefore goes through these two functions, which are never
// inlined, so each call finds the thread-local of the thread that makes it.

#[inline(never)]
fn current() -> *const Frame {
    CURRENT.with(Cell::get)
}

#[inline(never)]
fn set_current(frame: *const Frame) {
    CURRENT.with(|current| current.set(frame));
}

/// Marks this thread as running a fiber until dropped (also when the fiber unwinds).
struct Inside;

impl Inside {
    fn enter(frame: &Frame) -> Self {
        set_current(frame);
        Inside
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        set_current(std::ptr::null());
    }
}

/// True when the calling code runs on a fiber (inside [`run`]).
pub fn in_fiber() -> bool {
    !current().is_null()
}

/// Counts one use of the running fiber's allowance and tells whether it stayed within
/// `limit` uses. Code that a peer can make run many times in one step (a lookup per
/// identity a client offers) waits only within its allowance and answers without waiting
/// beyond it. Each [`run`] starts with a fresh allowance; outside a fiber nothing can wait,
/// and this is false.
pub fn within_allowance(limit: u32) -> bool {
    let frame = current();
    if frame.is_null() {
        return false;
    }
    // SAFETY: CURRENT is non-null only while this thread runs the body of the fiber whose
    // frame it names (see `suspend_until`), and the frame lives at the bottom of that
    // fiber's stack for as long as the body runs.
    let used = unsafe { &(*frame).used };
    let n = used.get().saturating_add(1);
    used.set(n);
    n <= limit
}

/// Pauses the calling fiber until `work` completes and returns its output; outside a fiber,
/// gives `work` back (`Err`) for the caller to wait for its own way.
///
/// # Safety
/// The caller, and every function on the fiber's stack above it, must hold nothing bound to
/// the current thread across this call: no `MutexGuard` or other `!Send` value, no reference
/// into a thread-local, and no thread-local access in the same function activation on both
/// sides of the call (the compiler may reuse the first access's address). The fiber may
/// resume on another thread of the runtime. (rustls,
/// which calls the signer and key exchange that use this, keeps only its own `Send` state on
/// the stack.)
pub unsafe fn suspend_until<F>(work: F) -> Result<F::Output, F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let frame = current();
    if frame.is_null() {
        return Err(work);
    }
    let slot = Arc::new(Mutex::new(None));
    let out = Arc::clone(&slot);
    let pending: Pending = Box::pin(async move {
        let output = work.await;
        *out.lock().unwrap_or_else(|e| e.into_inner()) = Some(output);
    });
    set_current(std::ptr::null());
    // SAFETY: CURRENT is non-null only while this thread runs the body of the fiber whose
    // frame it names: `Inside` sets it when the body starts and clears it when the body
    // ends or unwinds, and this function clears it before suspending and sets it again after
    // resuming. So the frame and its yielder are alive, and this code runs on its
    // coroutine's stack, which `suspend` requires.
    unsafe { (*(*frame).yielder).suspend(pending) };
    // Resumed, perhaps on another thread: it runs this fiber now.
    set_current(frame);
    let output = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
    // `run` resumes a fiber only after polling its work to completion; a fiber dropped while
    // waiting is unwound from inside `suspend` and never gets here.
    Ok(output.expect("a fiber resumes only once its work is done"))
}

fn take_stack() -> std::io::Result<DefaultStack> {
    match STACKS.with(|stacks| stacks.borrow_mut().pop()) {
        Some(stack) => Ok(stack),
        None => DefaultStack::new(STACK_SIZE),
    }
}

fn give_back(stack: DefaultStack) {
    STACKS.with(|stacks| {
        let mut stacks = stacks.borrow_mut();
        if stacks.len() < POOLED_STACKS {
            stacks.push(stack);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// A synchronous callback that waits for a future when it can, and blocks otherwise.
    fn callback(value: u32) -> u32 {
        // SAFETY: nothing thread-bound is held across the call.
        match unsafe {
            suspend_until(async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                value * 2
            })
        } {
            Ok(doubled) => doubled,
            Err(_) => value * 3,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fiber_waits_for_futures_and_returns_its_result() {
        let result = run(|| {
            assert!(in_fiber());
            callback(1) + callback(10)
        })
        .await;
        assert_eq!(result, 22);
        assert!(!in_fiber(), "the thread left the fiber");
        // Outside a fiber the callback gets its work back.
        assert_eq!(callback(5), 15);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn paused_fibers_do_not_block_their_thread() {
        // Two fibers on one thread, each waiting twice: they interleave, so the thread was
        // free while each waited.
        let order = Arc::new(Mutex::new(Vec::new()));
        let fiber = |name: &'static str| {
            let order = Arc::clone(&order);
            run(move || {
                for step in 0..2 {
                    order.lock().unwrap().push((name, step));
                    callback(step);
                }
            })
        };
        tokio::join!(fiber("a"), fiber("b"));
        let order = order.lock().unwrap().clone();
        assert_eq!(order.len(), 4);
        // Both started before either went on: each waited while the other ran.
        assert_eq!(&order[..2], [("a", 0), ("b", 0)], "{order:?}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn dropping_a_waiting_fiber_unwinds_its_stack() {
        struct Counted(Arc<AtomicUsize>);
        impl Drop for Counted {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let dropped = Arc::new(AtomicUsize::new(0));
        let on_stack = Counted(Arc::clone(&dropped));
        let waiting = run(move || {
            let _held = on_stack;
            // SAFETY: nothing thread-bound is held across the call.
            let _ = unsafe { suspend_until(std::future::pending::<()>()) };
            unreachable!("never resumed");
        });
        let timed_out = tokio::time::timeout(Duration::from_millis(10), waiting).await;
        assert!(timed_out.is_err());
        assert_eq!(
            dropped.load(Ordering::SeqCst),
            1,
            "the fiber's values were dropped"
        );
        assert!(!in_fiber());
        // The thread runs fibers as before.
        assert_eq!(run(|| callback(2)).await, 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_fiber_run_has_its_own_allowance() {
        assert!(!within_allowance(1), "no allowance outside a fiber");
        let uses = || {
            let first = within_allowance(2);
            callback(1);
            // Resumed, perhaps on another thread: the same fiber's count goes on.
            let second = within_allowance(2);
            let third = within_allowance(2);
            [first, second, third]
        };
        assert_eq!(run(uses).await, [true, true, false]);
        assert_eq!(
            run(uses).await,
            [true, true, false],
            "a new run, a new allowance"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_panic_in_a_fiber_reaches_the_task() {
        let task = tokio::spawn(run(|| -> u32 { panic!("inside") }));
        let error = task.await.unwrap_err();
        assert!(error.is_panic());
        assert!(!in_fiber());
    }
}
