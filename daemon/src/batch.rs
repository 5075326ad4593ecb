//! Record jobs from many connections gathered into one doorbell.
//!
//! Each connection hands its records for one direction to a [`RecordQueue`]; a batcher task
//! per device queue collects what is waiting (up to `batch_max` jobs, waiting at most
//! `batch_latency` for more) and submits it as one burst. The burst runs on a task of its
//! own that owns the jobs' DMA buffers and key slots until the device has answered, so a
//! connection that goes away mid-batch cannot free memory the device is still writing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tlsaccel_driver::{AsyncQueue, DmaBuffer, JobError, JobOp, JobOutput, KeySlot};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Histogram;

/// Results of a batch in the order of its jobs, and the buffers back for reading.
pub type BatchResult = (Vec<Result<JobOutput, JobError>>, Vec<DmaBuffer>);

struct Request {
    ops: Vec<JobOp>,
    buffers: Vec<DmaBuffer>,
    slot: Arc<KeySlot>,
    queued: Instant,
    reply: oneshot::Sender<BatchResult>,
}

/// Counters of one batcher.
#[derive(Debug, Default)]
pub struct BatchStats {
    /// Doorbell bursts submitted.
    pub batches: AtomicU64,
    /// Jobs submitted.
    pub jobs: AtomicU64,
    /// Jobs submitted but not yet answered.
    pub in_flight: AtomicU64,
    /// Time from a connection handing over its jobs to their answers, in seconds.
    pub latency: Histogram,
}

/// A device queue shared by connections. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RecordQueue {
    requests: mpsc::Sender<Request>,
    stats: Arc<BatchStats>,
    queue: AsyncQueue,
}

impl Request {
    /// A request for the batcher and the receiving end of its answer.
    fn new(
        ops: Vec<JobOp>,
        buffers: Vec<DmaBuffer>,
        slot: Arc<KeySlot>,
    ) -> (Self, oneshot::Receiver<BatchResult>) {
        let (reply, answer) = oneshot::channel();
        let request = Request {
            ops,
            buffers,
            slot,
            queued: Instant::now(),
            reply,
        };
        (request, answer)
    }
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("jobs", &self.ops.len())
            .finish_non_exhaustive()
    }
}

impl RecordQueue {
    /// Starts the batcher for `queue` on the current runtime.
    pub fn start(queue: AsyncQueue, batch_max: usize, batch_latency: Duration) -> Self {
        Self::start_with_stats(queue, batch_max, batch_latency, Arc::default())
    }

    /// Starts the batcher for `queue`, counting into `stats` (those of the queue it replaces,
    /// so counters never go backwards).
    pub fn start_with_stats(
        queue: AsyncQueue,
        batch_max: usize,
        batch_latency: Duration,
        stats: Arc<BatchStats>,
    ) -> Self {
        let (requests, incoming) = mpsc::channel(1024);
        tokio::spawn(batcher(
            queue.clone(),
            incoming,
            batch_max.max(1),
            batch_latency,
            Arc::clone(&stats),
        ));
        Self {
            requests,
            stats,
            queue,
        }
    }

    /// True once the device queue behind this batcher has stopped (a job timed out, the
    /// device was reset or lost): its jobs fail, and it must be replaced.
    pub fn is_broken(&self) -> bool {
        self.queue.is_broken()
    }

    /// True when `other` hands its jobs to the same batcher (jobs handed to one batcher
    /// reach the device in order).
    pub fn same_as(&self, other: &RecordQueue) -> bool {
        self.requests.same_channel(&other.requests)
    }

    /// The batcher's counters.
    pub fn stats(&self) -> &Arc<BatchStats> {
        &self.stats
    }

    /// Hands `ops` (as [`RecordQueue::run`]) to the batcher now, behind everything this
    /// connection handed over before, and returns the wait for their results. `None` when
    /// the batcher's queue is full or gone: nothing was handed over, and the caller waits
    /// for what it has in flight and uses [`RecordQueue::run`].
    pub fn enqueue(
        &self,
        ops: Vec<JobOp>,
        buffers: Vec<DmaBuffer>,
        slot: Arc<KeySlot>,
    ) -> Option<impl std::future::Future<Output = BatchResult> + Send + 'static> {
        let count = ops.len();
        let (request, answer) = Request::new(ops, buffers, slot);
        self.requests.try_send(request).ok()?;
        Some(async move {
            answer
                .await
                .unwrap_or_else(|_| (vec![Err(JobError::DeviceLost); count], Vec::new()))
        })
    }

    /// Runs `ops` (whose spans lie in `buffers`, naming `slot`) in submission order within
    /// some batch; returns their results and the buffers.
    pub async fn run(
        &self,
        ops: Vec<JobOp>,
        buffers: Vec<DmaBuffer>,
        slot: Arc<KeySlot>,
    ) -> BatchResult {
        let count = ops.len();
        let (request, answer) = Request::new(ops, buffers, slot);
        match self.requests.send(request).await {
            Ok(()) => match answer.await {
                Ok(result) => result,
                Err(_) => (vec![Err(JobError::DeviceLost); count], Vec::new()),
            },
            Err(mpsc::error::SendError(request)) => {
                (vec![Err(JobError::DeviceLost); count], request.buffers)
            }
        }
    }
}

async fn batcher(
    queue: AsyncQueue,
    mut incoming: mpsc::Receiver<Request>,
    batch_max: usize,
    batch_latency: Duration,
    stats: Arc<BatchStats>,
) {
    while let Some(first) = incoming.recv().await {
        let started = Instant::now();
        let mut jobs = first.ops.len();
        let mut batch = vec![first];
        loop {
            while jobs < batch_max {
                match incoming.try_recv() {
                    Ok(request) => {
                        jobs += request.ops.len();
                        batch.push(request);
                    }
                    Err(_) => break,
                }
            }
            if jobs >= batch_max || started.elapsed() >= batch_latency {
                break;
            }
            // Timers are too coarse for microseconds: let other connections run and hand
            // over their records instead.
            tokio::task::yield_now().await;
        }
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.jobs.fetch_add(jobs as u64, Ordering::Relaxed);
        stats.in_flight.fetch_add(jobs as u64, Ordering::Relaxed);
        // Submitted here, in the order the requests came: a connection may have several
        // batches for one key slot in flight, and the device numbers its records in the
        // order it finds them on the ring. Only the wait for the answers runs apart.
        let ops: Vec<JobOp> = batch.iter().flat_map(|r| r.ops.iter().cloned()).collect();
        let submitted = queue.submit_batch(&ops).await;
        drop(ops);
        let stats = Arc::clone(&stats);
        tokio::spawn(async move {
            let mut results = submitted.results().await.into_iter();
            stats.in_flight.fetch_sub(jobs as u64, Ordering::Relaxed);
            for request in batch {
                let mine: Vec<_> = results.by_ref().take(request.ops.len()).collect();
                stats
                    .latency
                    .observe(request.queued.elapsed().as_secs_f64());
                // The slot outlives its jobs; dropped here at the earliest.
                drop(request.slot);
                let _ = request.reply.send((mine, request.buffers));
            }
        });
    }
}
