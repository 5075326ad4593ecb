//! Device-wide counts of what the driver caught a device doing wrong, and a limit on how
//! often such events are logged: a device (or a peer driving it) must not be able to flood
//! the log, while the counters keep every event.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Counters shared by every queue of one device, monotonic over its whole life (queues come
/// and go; these do not reset).
#[derive(Debug, Default)]
pub struct DeviceEvents {
    /// Completions whose cookie matched no job in flight (ignored).
    pub unknown_cookies: AtomicU64,
    /// Completions with an impossible length, status or flag (the job failed).
    pub bad_completions: AtomicU64,
    /// Queues stopped because a job outlived its timeout.
    pub timeouts: AtomicU64,
    /// Jobs whose memory and key slot were quarantined for good because the device never
    /// confirmed it let go of their queue.
    pub quarantined_jobs: AtomicU64,
}

impl DeviceEvents {
    pub(crate) fn count(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }
}

/// Lets through the first `burst` events of each `period`, and says how many it held back.
#[derive(Debug)]
pub(crate) struct LogLimit {
    period: Duration,
    burst: u32,
    window: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl LogLimit {
    pub(crate) const fn new(period: Duration, burst: u32) -> Self {
        Self {
            period,
            burst,
            window: None,
            logged: 0,
            suppressed: 0,
        }
    }

    /// `Some(n)` when this event may be logged, `n` being how many were held back since the
    /// last one that was; `None` when it must not be.
    pub(crate) fn admit(&mut self, now: Instant) -> Option<u64> {
        let fresh = self
            .window
            .is_none_or(|start| now.duration_since(start) >= self.period);
        if fresh {
            self.window = Some(now);
            self.logged = 0;
        }
        if self.logged < self.burst {
            self.logged += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rest_of_the_period_is_held_back_and_counted() {
        let mut limit = LogLimit::new(Duration::from_secs(10), 3);
        let start = Instant::now();
        assert_eq!(limit.admit(start), Some(0));
        assert_eq!(limit.admit(start), Some(0));
        assert_eq!(limit.admit(start), Some(0));
        for _ in 0..1000 {
            assert_eq!(limit.admit(start + Duration::from_secs(1)), None);
        }
        // A new period: the first line says how many were held back.
        assert_eq!(limit.admit(start + Duration::from_secs(11)), Some(1000));
        assert_eq!(limit.admit(start + Duration::from_secs(11)), Some(0));
    }
}
