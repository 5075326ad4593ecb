//! The async API: a queue pair shared by tokio tasks. Completions are found by a reactor task
//! that waits on the queue's interrupt eventfd through `AsyncFd`, drains the completion ring
//! and wakes each job's waiter. A full ring makes submitters wait for room; nothing is
//! dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

use crate::queue::{Job, JobCompletion, JobError, JobOp, JobOutput, QueueError, QueuePair};
use crate::transport::EventFd;

/// Errors of the async API.
#[derive(Debug, thiserror::Error)]
pub enum AsyncQueueError {
    #[error("the queue was created without interrupts")]
    NoInterrupt,
    #[error("could not register the interrupt eventfd with the runtime")]
    Register(#[source] std::io::Error),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

type Waiters = HashMap<u64, oneshot::Sender<Result<JobOutput, JobError>>>;

#[derive(Debug)]
struct Shared {
    pair: Mutex<QueuePair>,
    waiters: Mutex<Waiters>,
    room: Notify,
    next_id: AtomicU64,
    timeout: Duration,
}

impl Shared {
    fn pair(&self) -> MutexGuard<'_, QueuePair> {
        self.pair.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn waiters(&self) -> MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn deliver(&self, done: JobCompletion) {
        if let Some(waiter) = self.waiters().remove(&done.user_data) {
            // The waiter may have been cancelled; its job still completed, nothing to do.
            let _ = waiter.send(done.result);
        }
    }

    /// Drains completions and expired jobs; returns true when anything was delivered.
    fn reap(&self) -> bool {
        let mut done = Vec::new();
        {
            let mut pair = self.pair();
            pair.poll(|c| done.push(c));
            pair.expire(self.timeout, |c| done.push(c));
        }
        let any = !done.is_empty();
        for completion in done {
            self.deliver(completion);
        }
        if any {
            self.room.notify_waiters();
        }
        any
    }
}

/// A queue pair used from async code. Cheap to clone; the reactor task stops when the last
/// clone is dropped.
#[derive(Debug, Clone)]
pub struct AsyncQueue {
    shared: Arc<Shared>,
    _reactor: Arc<ReactorHandle>,
}

#[derive(Debug)]
struct ReactorHandle(JoinHandle<()>);

impl Drop for ReactorHandle {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl AsyncQueue {
    /// Wraps `pair`, which must have been created with interrupts, and starts its reactor on
    /// the current tokio runtime. Jobs not completed within `timeout` fail with `TimedOut`.
    pub fn new(pair: QueuePair, timeout: Duration) -> Result<Self, AsyncQueueError> {
        let eventfd = Arc::clone(pair.interrupt().ok_or(AsyncQueueError::NoInterrupt)?);
        // SAFETY: the `AsyncFd` owns a clone of the `Arc<EventFd>`, and `EventFd` owns its
        // descriptor (`OwnedFd`) for its whole lifetime and never replaces it, so the raw fd
        // stays open and names the same eventfd for as long as the `AsyncFd` exists.
        let fd = unsafe { AsyncFd::register_with_interest(eventfd, Interest::READABLE) }
            .map_err(|e| AsyncQueueError::Register(e.into()))?;
        let shared = Arc::new(Shared {
            pair: Mutex::new(pair),
            waiters: Mutex::new(HashMap::new()),
            room: Notify::new(),
            next_id: AtomicU64::new(1),
            timeout,
        });
        let reactor = tokio::spawn(reactor(Arc::downgrade(&shared), fd, timeout));
        Ok(Self {
            shared,
            _reactor: Arc::new(ReactorHandle(reactor)),
        })
    }

    /// Runs one job and waits for its completion.
    pub async fn run(&self, op: JobOp) -> Result<JobOutput, JobError> {
        let mut results = self.run_batch(&[op]).await;
        results.pop().unwrap_or(Err(JobError::DeviceLost))
    }

    /// Submits `ops` with as few doorbells as ring space allows and waits for all of them.
    /// Results come back in the order of `ops`.
    pub async fn run_batch(&self, ops: &[JobOp]) -> Vec<Result<JobOutput, JobError>> {
        self.submit_batch(ops).await.results().await
    }

    /// Submits `ops` (waiting for ring room when it is full) and returns once all of them
    /// are on the ring, without waiting for their results. Jobs that one caller submits
    /// through successive calls reach the device in the order of the calls, so a caller
    /// can keep several batches for one key slot in flight; the device numbers records in
    /// that order.
    ///
    /// Cancel safety: if this future is dropped part-way, the jobs already submitted stay
    /// with the queue (it holds their memory and slots until the device answers or lets
    /// go), and their waiters are forgotten.
    pub async fn submit_batch(&self, ops: &[JobOp]) -> Submitted {
        let mut receivers = Vec::with_capacity(ops.len());
        let mut jobs = Vec::with_capacity(ops.len());
        {
            let mut waiters = self.shared.waiters();
            for op in ops {
                let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
                let (tx, rx) = oneshot::channel();
                waiters.insert(id, tx);
                receivers.push(rx);
                jobs.push(Job {
                    user_data: id,
                    op: op.clone(),
                });
            }
        }
        let forget = ForgetWaiters {
            shared: Arc::clone(&self.shared),
            ids: jobs.iter().map(|j| j.user_data).collect(),
        };
        let mut next = 0;
        while next < jobs.len() {
            let room = self.shared.room.notified();
            let submitted = self.shared.pair().submit(&jobs[next..]);
            match submitted {
                Ok(0) => {
                    // Ring full: completions make room. Reap in case the interrupt for them
                    // is still being coalesced, then wait.
                    if !self.shared.reap() {
                        let _ = tokio::time::timeout(Duration::from_millis(1), room).await;
                    }
                }
                Ok(n) => next += n,
                Err(_) => {
                    let mut waiters = self.shared.waiters();
                    for job in &jobs[next..] {
                        if let Some(tx) = waiters.remove(&job.user_data) {
                            let _ = tx.send(Err(JobError::DeviceLost));
                        }
                    }
                    break;
                }
            }
        }
        Submitted {
            receivers,
            _forget: forget,
        }
    }

    /// The queue pair's counters.
    pub fn stats(&self) -> crate::queue::QueueStats {
        self.shared.pair().stats()
    }

    /// True once the queue has stopped (timeout, device reset or loss): it takes no more
    /// jobs and must be replaced by a new queue.
    pub fn is_broken(&self) -> bool {
        self.shared.pair().is_broken()
    }
}

/// A batch on the ring: its results, in the order of its jobs, once the device answers.
#[derive(Debug)]
pub struct Submitted {
    receivers: Vec<oneshot::Receiver<Result<JobOutput, JobError>>>,
    _forget: ForgetWaiters,
}

impl Submitted {
    /// Waits for every job's result (a job the queue gave up on fails; nothing hangs past
    /// the queue's timeout).
    pub async fn results(self) -> Vec<Result<JobOutput, JobError>> {
        let mut results = Vec::with_capacity(self.receivers.len());
        for rx in self.receivers {
            results.push(rx.await.unwrap_or(Err(JobError::DeviceLost)));
        }
        results
    }
}

/// Removes a batch's waiters when its results are in or it is dropped.
#[derive(Debug)]
struct ForgetWaiters {
    shared: Arc<Shared>,
    ids: Vec<u64>,
}

impl Drop for ForgetWaiters {
    fn drop(&mut self) {
        let mut waiters = self.shared.waiters();
        for id in &self.ids {
            waiters.remove(id);
        }
    }
}

async fn reactor(shared: std::sync::Weak<Shared>, fd: AsyncFd<Arc<EventFd>>, timeout: Duration) {
    // Wake at least this often to expire jobs a dead device will never complete.
    let tick = (timeout / 4).max(Duration::from_millis(1));
    loop {
        let ready = tokio::time::timeout(tick, fd.readable()).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        match ready {
            Ok(Ok(mut guard)) => {
                fd.get_ref().drain();
                guard.clear_ready();
            }
            Ok(Err(error)) => {
                tracing::error!(%error, "interrupt eventfd failed; failing queue");
                let mut failed = Vec::new();
                shared
                    .pair()
                    .fail_all(JobError::DeviceLost, |c| failed.push(c));
                for c in failed {
                    shared.deliver(c);
                }
                return;
            }
            Err(_elapsed) => {}
        }
        shared.reap();
    }
}
