//! HTTP mode's shared buffer pool: the memory that holds request bodies while a server is
//! chosen, connected and answers (so the request can be sent again), in chunks of
//! [`CHUNK`] bytes kept for reuse.
//!
//! * Its size follows its use: when a request would take it past 95 % in use it doubles,
//!   when a release leaves less than 40 % in use it halves (never below `min`, never above
//!   `max`). The chunks beyond the size are freed, not kept.
//! * At `max`, a request that does not fit waits up to `wait` for chunks to come back, in
//!   arrival order, then gets 503.
//!
//! The accounting ([`Sizing`]) is plain data and tested on its own; [`BufferPool`] adds the
//! chunks and the waiting.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::Notify;

/// The pool's unit.
pub const CHUNK: usize = 16 * 1024;

/// The pool's size and use, in chunks, and its rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sizing {
    pub size: usize,
    pub used: usize,
    pub min: usize,
    pub max: usize,
}

impl Sizing {
    pub fn new(min: usize, max: usize) -> Self {
        let min = min.max(1);
        Self {
            size: min,
            used: 0,
            min,
            max: max.max(min),
        }
    }

    /// Takes `n` chunks if they fit, doubling first while taking them would pass 95 % of the
    /// size; false when they do not fit even at `max`.
    pub fn take(&mut self, n: usize) -> bool {
        while (self.used + n) * 100 > self.size * 95 && self.size < self.max {
            self.size = (self.size * 2).min(self.max);
        }
        if self.used + n > self.size {
            return false;
        }
        self.used += n;
        true
    }

    /// Gives `n` chunks back, halving while less than 40 % is in use.
    pub fn give(&mut self, n: usize) {
        self.used = self.used.saturating_sub(n);
        while self.used * 100 < self.size * 40 && self.size / 2 >= self.min {
            self.size /= 2;
        }
    }
}

/// Counters of the pool's life.
#[derive(Debug, Default)]
pub struct PoolStats {
    pub grown: AtomicU64,
    pub shrunk: AtomicU64,
    /// Requests that waited for room at the cap.
    pub waited: AtomicU64,
    /// Requests answered 503 because the pool stayed full.
    pub refused: AtomicU64,
}

#[derive(Debug)]
struct Inner {
    sizing: Sizing,
    /// Chunks not in use, kept for the next request (at most `size - used`).
    free: Vec<BytesMut>,
}

/// The shared pool.
#[derive(Debug)]
pub struct BufferPool {
    inner: Mutex<Inner>,
    room: Notify,
    /// Requests waiting for room, oldest first (each wakes the next as it gets its chunks).
    queue: Mutex<VecDeque<u64>>,
    next: AtomicU64,
    wait: Duration,
    pub stats: PoolStats,
}

/// Chunks a request holds, with its bytes in them; they go back to the pool when dropped.
#[derive(Debug)]
pub struct Held {
    pool: Arc<BufferPool>,
    chunks: Vec<BytesMut>,
    len: usize,
}

impl BufferPool {
    /// A pool of `min_bytes` growing up to `max_bytes` (rounded up to whole chunks).
    pub fn new(min_bytes: usize, max_bytes: usize, wait: Duration) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                sizing: Sizing::new(min_bytes.div_ceil(CHUNK), max_bytes.div_ceil(CHUNK)),
                free: Vec::new(),
            }),
            room: Notify::new(),
            queue: Mutex::new(VecDeque::new()),
            next: AtomicU64::new(0),
            wait,
            stats: PoolStats::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Size and use, in bytes.
    pub fn size_and_use(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.sizing.size * CHUNK, inner.sizing.used * CHUNK)
    }

    /// The bytes of chunks kept free (allocated, not in use).
    pub fn kept_free(&self) -> usize {
        self.lock().free.len() * CHUNK
    }

    fn try_take(&self, n: usize) -> Option<Vec<BytesMut>> {
        let mut inner = self.lock();
        let before = inner.sizing.size;
        if !inner.sizing.take(n) {
            return None;
        }
        if inner.sizing.size > before {
            self.stats.grown.fetch_add(1, Ordering::Relaxed);
        }
        let reuse = inner.free.len().min(n);
        let at = inner.free.len() - reuse;
        let mut chunks: Vec<BytesMut> = inner.free.split_off(at);
        drop(inner);
        chunks.resize_with(n, || BytesMut::with_capacity(CHUNK));
        Some(chunks)
    }

    /// Chunks for `bytes` bytes: at once, or after waiting (in turn) for others to give
    /// theirs back; `None` when the pool stays full for the pool's wait.
    pub async fn take(self: &Arc<Self>, bytes: usize) -> Option<Held> {
        let n = bytes.div_ceil(CHUNK).max(1);
        let held = |chunks| Held {
            pool: Arc::clone(self),
            chunks,
            len: 0,
        };
        let queued = self
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty();
        if queued {
            if let Some(chunks) = self.try_take(n) {
                return Some(held(chunks));
            }
        }
        // Full: wait in turn.
        let ticket = self.next.fetch_add(1, Ordering::Relaxed);
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(ticket);
        self.stats.waited.fetch_add(1, Ordering::Relaxed);
        let _leave = QueueSlot { pool: self, ticket };
        let deadline = tokio::time::Instant::now() + self.wait;
        loop {
            let notified = self.room.notified();
            let first =
                self.queue.lock().unwrap_or_else(|e| e.into_inner()).front() == Some(&ticket);
            if first {
                if let Some(chunks) = self.try_take(n) {
                    return Some(held(chunks));
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        }
    }

    fn give(&self, chunks: Vec<BytesMut>) {
        let mut inner = self.lock();
        let before = inner.sizing.size;
        inner.sizing.give(chunks.len());
        if inner.sizing.size < before {
            self.stats.shrunk.fetch_add(1, Ordering::Relaxed);
        }
        let room = inner.sizing.size - inner.sizing.used;
        for mut chunk in chunks {
            if inner.free.len() >= room {
                break;
            }
            chunk.clear();
            inner.free.push(chunk);
        }
        // Shrunk: what is kept free beyond the size is freed.
        inner.free.truncate(room);
        drop(inner);
        self.room.notify_waiters();
    }
}

/// A waiter's place in the queue, left when it is done (or gone).
struct QueueSlot<'a> {
    pool: &'a BufferPool,
    ticket: u64,
}

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        let mut queue = self.pool.queue.lock().unwrap_or_else(|e| e.into_inner());
        queue.retain(|&t| t != self.ticket);
        drop(queue);
        // The next in line may fit now.
        self.pool.room.notify_waiters();
    }
}

impl Held {
    /// Appends `data`; false (and nothing appended) when it would pass the chunks taken.
    pub fn push(&mut self, mut data: &[u8]) -> bool {
        if self.len + data.len() > self.chunks.len() * CHUNK {
            return false;
        }
        self.len += data.len();
        for chunk in &mut self.chunks {
            if data.is_empty() {
                break;
            }
            let room = CHUNK - chunk.len();
            if room == 0 {
                continue;
            }
            let n = room.min(data.len());
            chunk.extend_from_slice(&data[..n]);
            data = &data[n..];
        }
        true
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The held bytes as a body to send (copies out of the chunks, which stay held).
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.len);
        for chunk in &self.chunks {
            out.extend_from_slice(chunk);
        }
        out.freeze()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.chunks));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_doubles_past_95_percent_halves_under_40_and_holds_at_its_cap() {
        let mut s = Sizing::new(8, 64);
        // A load ramp: 4, 8, 16, 32, 64 chunks in use.
        let mut sizes = Vec::new();
        let mut held = 0;
        for target in [4, 8, 16, 32, 64] {
            while held < target {
                assert!(s.take(1));
                held += 1;
            }
            sizes.push(s.size);
        }
        assert_eq!(sizes, vec![8, 16, 32, 64, 64]);
        // At the cap nothing more fits.
        assert!(!s.take(1));
        assert_eq!(s.used, 64);
        // Falling use: halves each time less than 40 % is in use.
        let mut sizes = Vec::new();
        for target in [32, 25, 12, 6, 0] {
            s.give(held - target);
            held = target;
            sizes.push(s.size);
        }
        // 32 of 64 is 50 %: kept; 25 of 64 is 39 %: 32; 12 of 32 is 37.5 %: 16 (12 of 16 is
        // 75 %); 6 of 16: 8 (75 %); 0: the minimum.
        assert_eq!(sizes, vec![64, 32, 16, 8, 8]);
        assert_eq!(s.used, 0);
    }

    #[test]
    fn exactly_95_percent_does_not_grow() {
        let mut s = Sizing::new(20, 100);
        assert!(s.take(19));
        assert_eq!(s.size, 20, "19 of 20 is 95 %");
        assert!(s.take(1));
        assert_eq!(s.size, 40);
    }

    #[tokio::test]
    async fn held_bytes_come_back_and_a_full_pool_makes_requests_wait_then_refuses() {
        let pool = BufferPool::new(2 * CHUNK, 4 * CHUNK, Duration::from_millis(200));
        let mut a = pool.take(3 * CHUNK).await.expect("fits");
        assert!(a.push(&vec![1u8; 3 * CHUNK - 10]));
        assert!(a.push(&[2u8; 10]));
        assert!(!a.push(&[3u8; 1]), "no more than it took");
        let bytes = a.to_bytes();
        assert_eq!(bytes.len(), 3 * CHUNK);
        assert_eq!(bytes[3 * CHUNK - 1], 2);
        assert_eq!(pool.size_and_use(), (4 * CHUNK, 3 * CHUNK));
        // Two more chunks do not fit at the cap: the request waits, and gets them once `a`
        // gives its back.
        let waiter = tokio::spawn({
            let pool = Arc::clone(&pool);
            async move { pool.take(2 * CHUNK).await.map(|h| h.chunks.len()) }
        });
        // Until the request is waiting (with a deadline).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while pool.stats.waited.load(Ordering::Relaxed) == 0 && std::time::Instant::now() < deadline
        {
            tokio::task::yield_now().await;
        }
        assert_eq!(pool.stats.waited.load(Ordering::Relaxed), 1);
        drop(a);
        assert_eq!(waiter.await.unwrap(), Some(2));
        // Everything back: the pool halves to its minimum and keeps only that much free.
        assert_eq!(pool.size_and_use(), (2 * CHUNK, 0));
        assert!(pool.kept_free() <= 2 * CHUNK);
        // Held past the wait: refused.
        let hog = pool.take(4 * CHUNK).await.expect("fits at the cap");
        assert!(pool.take(CHUNK).await.is_none());
        assert_eq!(pool.stats.refused.load(Ordering::Relaxed), 1);
        drop(hog);
        assert!(pool.take(CHUNK).await.is_some());
    }
}
