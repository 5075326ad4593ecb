//! HTTP mode's priority groups: which level a request belongs to, how fast a pool answers
//! (a peak EWMA of its response times), and each pool's admission queue.
//!
//! * A request's level comes from its listener (a listener may pin one, as a plain-HTTP
//!   listener is given a low one) or else from the client's address: the first level whose
//!   `clients` contain it or that names no clients (a catch-all); the last level when none
//!   does.
//! * Each level may have a response-time threshold. A level's *effective* threshold is the
//!   lowest of its own and those of the levels above it: when a pool is slower than a level's
//!   threshold, that level and every level below it are held back.
//! * Holding back is an AIMD concurrency limit per level and pool: while the pool's response
//!   time is over the level's effective threshold, the level's limit shrinks by a quarter at
//!   most once per response time; while under it, the limit grows by about one per limit's
//!   worth of answers. A level without a threshold is never limited.
//! * A request over its level's limit waits in the pool's queue, ordered by level and then
//!   by arrival, for at most its level's `max_wait`; one whose estimated wait is longer, or
//!   that waits that long, or that finds the queue full, is refused (503 with
//!   `Retry-After`).
//!
//! The decisions ([`Queue`]) are plain data and tested on their own; [`Admission`] puts them
//! behind a lock and wakes waiters.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// How fast a response-time estimate forgets: a sample's weight halves about every 1.4 s.
const DECAY: Duration = Duration::from_secs(2);
/// A limited level's limit when it is not being held back (in effect, none).
const UNLIMITED: f64 = 100_000.0;
/// Waiting requests a pool's queue holds at most; more are refused at once.
pub const MAX_WAITING: usize = 4096;

/// A peak-EWMA estimate of a response time: a sample above the estimate replaces it at
/// once, one below pulls it down with a weight that grows with the time since the last
/// sample (as Finagle's and tower's peak EWMA do).
#[derive(Debug)]
pub struct ResponseTime {
    inner: Mutex<Option<(f64, Instant)>>,
}

impl Default for ResponseTime {
    fn default() -> Self {
        Self::new()
    }
}

impl ResponseTime {
    pub fn new() -> Self {
        Self {
            inner: Mutex::new(None),
        }
    }

    /// Adds one sample taken at `now`; returns the new estimate.
    pub fn observe(&self, sample: Duration, now: Instant) -> Duration {
        let sample = sample.as_secs_f64();
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let estimate = match *inner {
            None => sample,
            Some((estimate, _)) if sample > estimate => sample,
            Some((estimate, at)) => {
                let elapsed = now.saturating_duration_since(at).as_secs_f64();
                let keep = (-elapsed / DECAY.as_secs_f64()).exp();
                estimate * keep + sample * (1.0 - keep)
            }
        };
        *inner = Some((estimate, now));
        Duration::from_secs_f64(estimate)
    }

    /// The estimate (zero before any sample).
    pub fn get(&self) -> Duration {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.map_or(Duration::ZERO, |(e, _)| Duration::from_secs_f64(e))
    }
}

/// One priority level as configured.
#[derive(Debug, Clone)]
pub struct Level {
    pub name: String,
    clients: Vec<ipnet::IpNet>,
    /// The lowest threshold of this level and the ones above it.
    effective_threshold: Option<Duration>,
    pub max_wait: Duration,
}

/// The configured levels, highest first. Without any, every request is of one unlimited
/// level.
#[derive(Debug, Clone)]
pub struct Levels(Vec<Level>);

impl Levels {
    /// From the configuration (checked there).
    pub fn new(config: &[crate::config::Priority]) -> anyhow::Result<Self> {
        let mut levels = Vec::new();
        let mut lowest: Option<Duration> = None;
        for priority in config {
            let own = priority
                .response_time_ms
                .as_ref()
                .map(|ms| Duration::from_millis(*ms.get_ref()));
            lowest = match (lowest, own) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            levels.push(Level {
                name: priority.name.get_ref().clone(),
                clients: crate::proxy_protocol::parse_ranges(priority.clients.get_ref())?,
                effective_threshold: lowest,
                max_wait: Duration::from_millis(*priority.max_wait_ms.get_ref()),
            });
        }
        if levels.is_empty() {
            levels.push(Level {
                name: "default".into(),
                clients: Vec::new(),
                effective_threshold: None,
                max_wait: Duration::ZERO,
            });
        }
        Ok(Self(levels))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, index: usize) -> &Level {
        &self.0[index.min(self.0.len() - 1)]
    }

    pub fn iter(&self) -> impl Iterator<Item = &Level> {
        self.0.iter()
    }

    /// The level of `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.0.iter().position(|l| l.name == name)
    }

    /// The level of a request from `client` on a listener that pins `pinned` (if any).
    pub fn classify(&self, client: IpAddr, pinned: Option<usize>) -> usize {
        if let Some(level) = pinned {
            return level.min(self.0.len() - 1);
        }
        let client = match client {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(client, IpAddr::V4),
            v4 => v4,
        };
        self.0
            .iter()
            .position(|l| l.clients.is_empty() || l.clients.iter().any(|r| r.contains(&client)))
            .unwrap_or(self.0.len() - 1)
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The estimated wait passes the level's bound.
    TooLong,
    /// The queue holds [`MAX_WAITING`] requests.
    Full,
    /// It waited its level's bound.
    TimedOut,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::TooLong => "refused",
            Refusal::Full => "queue_full",
            Refusal::TimedOut => "timed_out",
        }
    }
}

/// What [`Queue::arrive`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Arrival {
    /// In flight now.
    Admitted,
    /// Waiting under this key.
    Waiting((usize, u64)),
    Refused(Refusal),
}

/// One pool's admission state: per level, its limit and requests in flight, and the
/// requests waiting, by (level, arrival).
#[derive(Debug)]
pub struct Queue {
    limits: Vec<f64>,
    in_flight: Vec<usize>,
    /// When each level's limit last shrank.
    shrunk_at: Vec<Option<Instant>>,
    waiting: BTreeMap<(usize, u64), ()>,
    next: u64,
}

impl Queue {
    pub fn new(levels: usize) -> Self {
        Self {
            limits: vec![UNLIMITED; levels],
            in_flight: vec![0; levels],
            shrunk_at: vec![None; levels],
            waiting: BTreeMap::new(),
            next: 0,
        }
    }

    fn has_room(&self, level: usize) -> bool {
        (self.in_flight[level] as f64) < self.limits[level].floor().max(1.0)
    }

    /// A request of `level` arrives; `response_time` is the pool's estimate.
    pub fn arrive(&mut self, level: usize, response_time: Duration, max_wait: Duration) -> Arrival {
        let ahead = self.waiting.range(..(level + 1, 0)).count();
        if ahead == 0 && self.has_room(level) {
            self.in_flight[level] += 1;
            return Arrival::Admitted;
        }
        if self.waiting.len() >= MAX_WAITING {
            return Arrival::Refused(Refusal::Full);
        }
        // Each response frees a place; the level gets `limit` places per response time.
        let per_response = self.limits[level].floor().max(1.0);
        let estimate = response_time.mul_f64((ahead as f64 + 1.0) / per_response);
        if estimate > max_wait {
            return Arrival::Refused(Refusal::TooLong);
        }
        let key = (level, self.next);
        self.next += 1;
        self.waiting.insert(key, ());
        Arrival::Waiting(key)
    }

    /// A waiter gave up; false when it had been admitted meanwhile (it is in flight).
    pub fn leave(&mut self, key: (usize, u64)) -> bool {
        self.waiting.remove(&key).is_some()
    }

    /// A request of `level` is answered (or failed); the pool's response time is now
    /// `estimate`. Adjusts every limited level's limit and returns the waiters admitted now.
    pub fn done(
        &mut self,
        level: usize,
        estimate: Duration,
        levels: &Levels,
        now: Instant,
    ) -> Vec<(usize, u64)> {
        self.in_flight[level] = self.in_flight[level].saturating_sub(1);
        for (i, l) in levels.iter().enumerate().take(self.limits.len()) {
            let Some(threshold) = l.effective_threshold else {
                continue;
            };
            let limit = &mut self.limits[i];
            if estimate > threshold {
                let due = self.shrunk_at[i].is_none_or(|at| now.duration_since(at) >= estimate);
                if due {
                    // From unlimited, start from what is in flight.
                    let from = limit.min(self.in_flight[i].max(1) as f64 * 2.0);
                    *limit = (from * 0.75).max(1.0);
                    self.shrunk_at[i] = Some(now);
                }
            } else if *limit < UNLIMITED {
                *limit += 1.0 / *limit;
                if *limit > UNLIMITED / 2.0 {
                    *limit = UNLIMITED;
                }
            }
        }
        let mut admitted = Vec::new();
        let keys: Vec<(usize, u64)> = self.waiting.keys().copied().collect();
        for key in keys {
            if self.has_room(key.0) {
                self.waiting.remove(&key);
                self.in_flight[key.0] += 1;
                admitted.push(key);
            }
        }
        admitted
    }

    /// The limit of `level` (`None`: not limited now).
    pub fn limit(&self, level: usize) -> Option<f64> {
        self.limits.get(level).copied().filter(|&l| l < UNLIMITED)
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }
}

/// Results per level: admitted at once, admitted after waiting, refused (by reason).
#[derive(Debug, Default)]
pub struct LevelStats {
    pub immediate: AtomicU64,
    pub waited: AtomicU64,
    pub refused: AtomicU64,
    pub queue_full: AtomicU64,
    pub timed_out: AtomicU64,
}

/// One pool's admission: the queue and its waiters' wake-ups behind one lock, and the
/// pool's response time.
#[derive(Debug)]
pub struct Admission {
    inner: Mutex<Inner>,
    levels: Arc<Levels>,
    pub response_time: ResponseTime,
    pub stats: Vec<LevelStats>,
}

#[derive(Debug)]
struct Inner {
    queue: Queue,
    wakers: BTreeMap<(usize, u64), oneshot::Sender<()>>,
}

/// A request in flight; dropping it frees its place.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    level: usize,
}

impl Admission {
    pub fn new(levels: Arc<Levels>) -> Self {
        Self {
            inner: Mutex::new(Inner {
                queue: Queue::new(levels.len()),
                wakers: BTreeMap::new(),
            }),
            stats: (0..levels.len()).map(|_| LevelStats::default()).collect(),
            levels,
            response_time: ResponseTime::new(),
        }
    }

    pub fn levels(&self) -> &Levels {
        &self.levels
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The queue's state, for metrics.
    pub fn with_queue<R>(&self, f: impl FnOnce(&Queue) -> R) -> R {
        f(&self.lock().queue)
    }

    /// Admits a request of `level` now, after a wait, or not; every outcome is counted.
    pub async fn admit(self: &Arc<Self>, level: usize) -> Result<Ticket, Refusal> {
        let level = level.min(self.levels.len() - 1);
        let max_wait = self.levels.get(level).max_wait;
        let stats = &self.stats[level];
        let ticket = || Ticket {
            admission: Arc::clone(self),
            level,
        };
        let rx = {
            let mut inner = self.lock();
            match inner
                .queue
                .arrive(level, self.response_time.get(), max_wait)
            {
                Arrival::Admitted => {
                    stats.immediate.fetch_add(1, Ordering::Relaxed);
                    return Ok(ticket());
                }
                Arrival::Refused(why) => return Err(self.refused(level, why)),
                Arrival::Waiting(key) => {
                    let (tx, rx) = oneshot::channel();
                    inner.wakers.insert(key, tx);
                    (key, rx)
                }
            }
        };
        let (key, rx) = rx;
        // Cancelled while waiting (the client went away): the guard takes the place back.
        let mut guard = Waiter {
            admission: self,
            key,
            armed: true,
        };
        let woken = tokio::time::timeout(max_wait, rx).await;
        if !matches!(woken, Ok(Ok(()))) {
            // Out of time, unless it was admitted just now (under the same lock).
            let mut inner = self.lock();
            inner.wakers.remove(&key);
            if inner.queue.leave(key) {
                guard.armed = false;
                drop(inner);
                return Err(self.refused(level, Refusal::TimedOut));
            }
        }
        guard.armed = false;
        stats.waited.fetch_add(1, Ordering::Relaxed);
        Ok(ticket())
    }

    fn refused(&self, level: usize, why: Refusal) -> Refusal {
        let stats = &self.stats[level];
        match why {
            Refusal::TooLong => &stats.refused,
            Refusal::Full => &stats.queue_full,
            Refusal::TimedOut => &stats.timed_out,
        }
        .fetch_add(1, Ordering::Relaxed);
        why
    }

    fn finish(&self, level: usize) {
        let mut inner = self.lock();
        let admitted = inner.queue.done(
            level,
            self.response_time.get(),
            &self.levels,
            Instant::now(),
        );
        for key in admitted {
            if let Some(tx) = inner.wakers.remove(&key) {
                // A waiter that is already giving up finds itself admitted under the lock.
                let _ = tx.send(());
            }
        }
    }
}

/// A request waiting in [`Admission::admit`]; if that future is dropped, it leaves the
/// queue, or gives back the place it was just given.
struct Waiter<'a> {
    admission: &'a Admission,
    key: (usize, u64),
    armed: bool,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let admitted = {
            let mut inner = self.admission.lock();
            inner.wakers.remove(&self.key);
            !inner.queue.leave(self.key)
        };
        if admitted {
            self.admission.finish(self.key.0);
        }
    }
}

impl Ticket {
    /// The level the request was admitted at.
    pub fn level(&self) -> usize {
        self.level
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission.finish(self.level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn levels(spec: &[(&str, Option<u64>)]) -> Levels {
        let mut text = String::new();
        for (name, ms) in spec {
            text.push_str(&format!("[[priority]]\nname = \"{name}\"\n"));
            if let Some(ms) = ms {
                text.push_str(&format!("response_time_ms = {ms}\n"));
            }
        }
        let config: crate::config::Config = toml::from_str(&text).expect("config");
        Levels::new(&config.priorities).expect("levels")
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let rt = ResponseTime::new();
        let t0 = Instant::now();
        assert_eq!(rt.observe(10 * MS, t0), 10 * MS);
        assert_eq!(rt.observe(100 * MS, t0 + 10 * MS), 100 * MS);
        // A low sample right after barely moves it; one much later nearly replaces it.
        let soon = rt.observe(10 * MS, t0 + 20 * MS);
        assert!(soon > 98 * MS && soon < 100 * MS, "{soon:?}");
        let later = rt.observe(10 * MS, t0 + Duration::from_secs(20));
        assert!(later < 11 * MS, "{later:?}");
    }

    #[test]
    fn a_level_and_those_below_it_are_held_by_the_lowest_threshold_above() {
        let l = levels(&[("high", None), ("mid", Some(200)), ("low", Some(500))]);
        assert_eq!(l.get(0).effective_threshold, None);
        assert_eq!(l.get(1).effective_threshold, Some(200 * MS));
        assert_eq!(l.get(2).effective_threshold, Some(200 * MS));
    }

    #[test]
    fn clients_map_to_the_first_level_that_names_them_else_the_last() {
        let config: crate::config::Config = toml::from_str(
            "[[priority]]\nname = \"a\"\nclients = [\"10.0.0.0/8\", \"192.0.2.7\"]\n\
             [[priority]]\nname = \"b\"\nclients = [\"10.1.0.0/16\"]\n\
             [[priority]]\nname = \"rest\"\n",
        )
        .unwrap();
        let l = Levels::new(&config.priorities).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(l.classify(ip("10.1.2.3"), None), 0);
        assert_eq!(l.classify(ip("192.0.2.7"), None), 0);
        assert_eq!(l.classify(ip("::ffff:192.0.2.7"), None), 0);
        assert_eq!(l.classify(ip("192.0.2.8"), None), 2);
        assert_eq!(l.classify(ip("10.1.2.3"), Some(1)), 1);
        // A catch-all in the middle takes everyone not named above it; a level below it
        // is for listeners that pin it.
        let config: crate::config::Config = toml::from_str(
            "[[priority]]\nname = \"a\"\nclients = [\"10.0.0.0/8\"]\n\
             [[priority]]\nname = \"everyone\"\n\
             [[priority]]\nname = \"plain\"\n",
        )
        .unwrap();
        let l = Levels::new(&config.priorities).unwrap();
        assert_eq!(l.classify(ip("192.0.2.8"), None), 1);
        assert_eq!(l.classify(ip("192.0.2.8"), Some(2)), 2);
        // With no catch-all, the last level.
        let config: crate::config::Config = toml::from_str(
            "[[priority]]\nname = \"a\"\nclients = [\"10.0.0.0/8\"]\n\
             [[priority]]\nname = \"b\"\nclients = [\"10.1.0.0/16\"]\n",
        )
        .unwrap();
        let l = Levels::new(&config.priorities).unwrap();
        assert_eq!(l.classify(ip("192.0.2.8"), None), 1);
    }

    #[test]
    fn a_slow_pool_limits_the_low_level_and_never_the_high_one() {
        let l = levels(&[("high", None), ("low", Some(50))]);
        let mut q = Queue::new(2);
        let now = Instant::now();
        for _ in 0..20 {
            assert_eq!(q.arrive(1, 10 * MS, 1000 * MS), Arrival::Admitted);
        }
        // Slow answers: the low level's limit falls to what is in flight and below, once
        // per response time.
        q.done(1, 100 * MS, &l, now);
        let first = q.limit(1).expect("limited");
        assert!(first <= 19.0 * 2.0 * 0.75 + 0.01, "{first}");
        q.done(1, 100 * MS, &l, now + MS);
        assert_eq!(q.limit(1), Some(first), "at most once per response time");
        for i in 0..10 {
            q.done(1, 100 * MS, &l, now + (200 + 100 * i) * MS);
        }
        let low = q.limit(1).expect("limited");
        assert!(low < 8.0, "{low}");
        assert_eq!(q.limit(0), None, "the high level is never limited");
        for _ in 0..50 {
            assert_eq!(q.arrive(0, 100 * MS, 1000 * MS), Arrival::Admitted);
        }
        // Low requests now wait (the 8 still in flight are over the limit).
        assert!(matches!(
            q.arrive(1, 100 * MS, 1000 * MS),
            Arrival::Waiting(_)
        ));
    }

    #[test]
    fn waiters_are_admitted_by_level_then_arrival_as_places_free() {
        let l = levels(&[("a", Some(10)), ("b", Some(10))]);
        let mut q = Queue::new(2);
        let now = Instant::now();
        // Force both limits to 1.
        q.limits = vec![1.0, 1.0];
        q.shrunk_at = vec![Some(now), Some(now)];
        assert_eq!(q.arrive(1, 5 * MS, 1000 * MS), Arrival::Admitted);
        let b1 = q.arrive(1, 5 * MS, 1000 * MS);
        assert_eq!(q.arrive(0, 5 * MS, 1000 * MS), Arrival::Admitted);
        let a1 = q.arrive(0, 5 * MS, 1000 * MS);
        let (Arrival::Waiting(a1), Arrival::Waiting(b1)) = (a1, b1) else {
            panic!("both wait");
        };
        // Level a's place frees (the pool still slow, the limits stay): its waiter goes,
        // b's stays.
        assert_eq!(q.done(0, 50 * MS, &l, now + MS), vec![a1]);
        assert_eq!(q.done(1, 50 * MS, &l, now + 2 * MS), vec![b1]);
        assert_eq!(q.waiting(), 0);
        // Under the threshold the limits grow back.
        for i in 0..1000 {
            q.done(0, 5 * MS, &l, now + (3 + i) * MS);
            q.in_flight[0] += 1;
        }
        assert!(q.limit(0).unwrap_or(UNLIMITED) > 40.0);
    }

    #[test]
    fn a_wait_longer_than_the_bound_is_refused_at_once() {
        let mut q = Queue::new(1);
        q.limits = vec![2.0];
        assert_eq!(q.arrive(0, 100 * MS, 1000 * MS), Arrival::Admitted);
        assert_eq!(q.arrive(0, 100 * MS, 1000 * MS), Arrival::Admitted);
        // Two per response time: the 20th waiter's wait is 1 s, the 21st's more.
        for _ in 0..20 {
            assert!(matches!(
                q.arrive(0, 100 * MS, 1000 * MS),
                Arrival::Waiting(_)
            ));
        }
        assert_eq!(
            q.arrive(0, 100 * MS, 1000 * MS),
            Arrival::Refused(Refusal::TooLong)
        );
        assert!(matches!(
            q.arrive(0, 100 * MS, 10_000 * MS),
            Arrival::Waiting(_)
        ));
    }

    #[tokio::test]
    async fn a_waiter_is_woken_when_a_place_frees_and_refused_after_its_bound() {
        let config: crate::config::Config = toml::from_str(
            "[[priority]]\nname = \"low\"\nresponse_time_ms = 10\nmax_wait_ms = 300\n",
        )
        .unwrap();
        let admission = Arc::new(Admission::new(Arc::new(
            Levels::new(&config.priorities).unwrap(),
        )));
        admission.lock().queue.limits = vec![1.0];
        admission.lock().queue.shrunk_at = vec![Some(Instant::now())];
        // Slower than the threshold: the limit stays at one.
        admission
            .response_time
            .observe(Duration::from_millis(100), Instant::now());
        let first = admission.admit(0).await.expect("admitted");
        let waiter = tokio::spawn({
            let admission = Arc::clone(&admission);
            async move { admission.admit(0).await.map(|t| t.level()) }
        });
        // Until the waiter is queued (with a deadline).
        let deadline = Instant::now() + Duration::from_secs(5);
        while admission.with_queue(Queue::waiting) == 0 && Instant::now() < deadline {
            tokio::task::yield_now().await;
        }
        assert_eq!(admission.with_queue(Queue::waiting), 1);
        drop(first);
        assert_eq!(waiter.await.unwrap(), Ok(0));
        assert_eq!(admission.stats[0].waited.load(Ordering::Relaxed), 1);
        // Hold the place; the next one waits its 300 ms and is refused.
        let held = admission.admit(0).await.expect("admitted");
        assert_eq!(admission.admit(0).await.err(), Some(Refusal::TimedOut));
        assert_eq!(admission.with_queue(Queue::waiting), 0);
        drop(held);
        assert!(admission.admit(0).await.is_ok(), "the place came back");
    }
}
