//! The device side of the daemon: its record queues, and the recovery manager that keeps
//! them working.
//!
//! Connections do not own a device queue: each has a queue number and asks [`Offload::queue`]
//! for the current queue under that number at every batch, so a queue that broke can be
//! replaced under running connections, and a device that is out of service sends every batch
//! to the CPU.
//!
//! The recovery manager ([`Offload::spawn_manager`]) looks at the device every
//! [`CHECK_PERIOD`]:
//!
//! * **in service, a record queue broken** (a job timed out, or the device was reset under
//!   it): the queue is taken out of the list and a new one takes its place. The old one lets
//!   go of its memory once the device confirms (device spec §8.1).
//! * **lost** (its transport gone, FATAL, heartbeat stopped): the device is taken out of
//!   service at once (records and handshakes go to the CPU), then reset and started again
//!   with exponential back-off ([`FIRST_RETRY`] doubling up to [`LAST_RETRY`]); a vfio-user
//!   device whose process was killed is reached again when a new process serves the same
//!   socket. A device that comes back must pass the self-check (every known-answer test of
//!   `tlsaccel selftest`) before new work goes to it; its record queues are all new.
//!
//! Connections that moved to the CPU stay there; new connections, and directions not yet on
//! the device, use it again. Every transition is logged once, counted
//! (`tlsaccel_device_*`) and shown in `/status`.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use tlsaccel_driver::{AsyncQueue, Device, DeviceError, QueueConfig};

use crate::batch::{BatchStats, RecordQueue};
use crate::handshake::PkeEngine;
use crate::record::RecordDevice;

/// How often the recovery manager looks at the device.
pub const CHECK_PERIOD: Duration = Duration::from_millis(100);
/// The first wait before trying to reset a lost device again...
pub const FIRST_RETRY: Duration = Duration::from_millis(200);
/// ...doubling after each failure up to this.
pub const LAST_RETRY: Duration = Duration::from_secs(30);

/// How record queues are made.
#[derive(Debug, Clone, Copy)]
pub struct QueueSettings {
    /// Record queues wanted.
    pub count: usize,
    pub batch_max: usize,
    pub batch_latency: Duration,
    /// How long a device job may take before its queue is declared broken.
    pub job_timeout: Duration,
}

/// Where the device stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    /// New work goes to the device.
    InService,
    /// The device is gone; the manager is trying to bring it back.
    Lost,
    /// It came back but failed the self-check; the manager will reset it again.
    FailedSelfCheck,
}

impl DeviceState {
    /// The name `/status` shows.
    pub fn name(self) -> &'static str {
        match self {
            DeviceState::InService => "in_service",
            DeviceState::Lost => "lost",
            DeviceState::FailedSelfCheck => "failed_self_check",
        }
    }
}

/// Counters of the recovery manager.
#[derive(Debug, Default)]
pub struct RecoveryStats {
    /// Times the device was found lost.
    pub device_lost: AtomicU64,
    /// Resets that brought the device back into service.
    pub recoveries: AtomicU64,
    /// Attempts that failed (reset, reconnect or self-check).
    pub recovery_failures: AtomicU64,
    /// Record queues replaced because they broke.
    pub queues_replaced: AtomicU64,
    /// How long the last recovery took, from the device found lost to back in service, in
    /// milliseconds.
    pub last_recovery_ms: AtomicU64,
}

/// What `/status` says about the device's health.
#[derive(Debug, Clone)]
pub struct Health {
    pub state: DeviceState,
    /// When the device entered this state.
    pub since: Instant,
    /// Why the last attempt to bring it back failed.
    pub last_error: Option<String>,
    /// Failed attempts since the device was lost.
    pub attempts: u32,
}

/// A device, its record queues and its recovery.
#[derive(Debug)]
pub struct Offload {
    pub device: Arc<Device>,
    pub pke: Option<Arc<PkeEngine>>,
    settings: QueueSettings,
    /// The record queues by number; `None` while one is being replaced.
    queues: RwLock<Vec<Option<RecordDevice>>>,
    /// Counters per queue number, kept across replacements.
    batch_stats: Vec<Arc<BatchStats>>,
    next: AtomicUsize,
    in_service: AtomicBool,
    pub stats: RecoveryStats,
    health: Mutex<Health>,
}

impl Offload {
    /// Creates the record queues of `device` (on the current runtime) and puts it in service.
    pub fn new(
        device: Arc<Device>,
        pke: Option<Arc<PkeEngine>>,
        settings: QueueSettings,
    ) -> Arc<Self> {
        let batch_stats: Vec<_> = (0..settings.count).map(|_| Arc::default()).collect();
        let offload = Arc::new(Self {
            device,
            pke,
            settings,
            queues: RwLock::new(vec![None; settings.count]),
            batch_stats,
            next: AtomicUsize::new(0),
            in_service: AtomicBool::new(true),
            stats: RecoveryStats::default(),
            health: Mutex::new(Health {
                state: DeviceState::InService,
                since: Instant::now(),
                last_error: None,
                attempts: 0,
            }),
        });
        let made = offload.fill_queues();
        if made < settings.count {
            tracing::warn!(
                wanted = settings.count,
                made,
                "fewer record queues than configured"
            );
        }
        offload
    }

    /// A queue number for a new connection (round-robin).
    pub fn assign(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// The queue connection queue number `number` uses now; `None` (the CPU) while the device
    /// is out of service or that queue is being replaced.
    pub fn queue(&self, number: usize) -> Option<RecordDevice> {
        if !self.in_service() {
            return None;
        }
        let queues = self.queues.read().unwrap_or_else(|e| e.into_inner());
        if queues.is_empty() {
            return None;
        }
        queues[number % queues.len()].clone()
    }

    /// True while new work goes to the device.
    pub fn in_service(&self) -> bool {
        self.in_service.load(Ordering::Acquire) && !self.device.is_lost()
    }

    /// The device's health, for `/status`.
    pub fn health(&self) -> Health {
        self.health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The record queues in service now, with their numbers.
    pub fn queues(&self) -> Vec<(usize, RecordDevice)> {
        let queues = self.queues.read().unwrap_or_else(|e| e.into_inner());
        queues
            .iter()
            .enumerate()
            .filter_map(|(i, q)| q.clone().map(|q| (i, q)))
            .collect()
    }

    /// Counters per queue number (stable across replacements).
    pub fn batch_stats(&self) -> &[Arc<BatchStats>] {
        &self.batch_stats
    }

    /// Starts the recovery manager on the current runtime; it stops when the offload is
    /// dropped.
    pub fn spawn_manager(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(manage(Arc::downgrade(self)))
    }

    /// Makes a queue for every empty number; returns how many numbers have one.
    fn fill_queues(&self) -> usize {
        let mut queues = self.queues.write().unwrap_or_else(|e| e.into_inner());
        for (number, place) in queues.iter_mut().enumerate() {
            if place.is_some() {
                continue;
            }
            match self.new_queue(number) {
                Ok(queue) => *place = Some(queue),
                // Indices still leased by queues on their way out: try again next round.
                Err(DeviceError::NoFreeQueue) => {}
                Err(error) => {
                    tracing::warn!(queue = number, %error, "could not create a record queue");
                }
            }
        }
        queues.iter().filter(|q| q.is_some()).count()
    }

    fn new_queue(&self, number: usize) -> Result<RecordDevice, DeviceError> {
        // A connection waits for its batch before it writes: interrupt at once rather than
        // coalescing behind the timer.
        let pair = self.device.queue(QueueConfig {
            size: 1024,
            interrupts: true,
            coalesce_count: 1,
            coalesce_usecs: 0,
            ..QueueConfig::default()
        })?;
        let queue = AsyncQueue::new(pair, self.settings.job_timeout)
            .map_err(|e| DeviceError::Unsupported(async_error(&e)))?;
        Ok(RecordDevice {
            device: Arc::clone(&self.device),
            queue: RecordQueue::start_with_stats(
                queue,
                self.settings.batch_max,
                self.settings.batch_latency,
                Arc::clone(&self.batch_stats[number]),
            ),
        })
    }

    /// Takes broken queues out of the list (their batchers end, and their device queues let
    /// go, once the last connection holding them has finished its batch) and refills.
    fn replace_broken_queues(&self) {
        let broken: Vec<usize> = {
            let mut queues = self.queues.write().unwrap_or_else(|e| e.into_inner());
            queues
                .iter_mut()
                .enumerate()
                .filter(|(_, q)| q.as_ref().is_some_and(|q| q.queue.is_broken()))
                .map(|(i, q)| {
                    *q = None;
                    i
                })
                .collect()
        };
        for number in &broken {
            self.stats.queues_replaced.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                queue = number,
                "record queue broke (job timeout or device reset); replacing it"
            );
        }
        let wanted = self.settings.count;
        let empty = self
            .queues
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(Option::is_none);
        if empty && self.fill_queues() == wanted && !broken.is_empty() {
            tracing::info!("record queues complete again");
        }
    }

    /// Takes every record queue out (the device was reset: they are all dead).
    fn drop_all_queues(&self) {
        let mut queues = self.queues.write().unwrap_or_else(|e| e.into_inner());
        for place in queues.iter_mut() {
            *place = None;
        }
    }

    fn set_state(&self, state: DeviceState, error: Option<String>) {
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        if health.state != state {
            health.state = state;
            health.since = Instant::now();
        }
        if error.is_some() {
            health.attempts += 1;
        } else if state == DeviceState::InService {
            health.attempts = 0;
        }
        health.last_error = error;
    }

    fn take_out_of_service(&self) {
        self.in_service.store(false, Ordering::Release);
        if let Some(pke) = &self.pke {
            pke.set_in_service(false);
        }
    }

    fn put_in_service(&self) {
        if let Some(pke) = &self.pke {
            pke.set_in_service(true);
        }
        self.in_service.store(true, Ordering::Release);
    }
}

fn async_error(error: &tlsaccel_driver::AsyncQueueError) -> &'static str {
    match error {
        tlsaccel_driver::AsyncQueueError::NoInterrupt => "a record queue without interrupts",
        tlsaccel_driver::AsyncQueueError::Register(_) => "registering a queue's interrupt",
        _ => "an asynchronous record queue",
    }
}

/// Resets the device and runs the self-check; the error says which step failed.
fn reset_and_check(device: &Arc<Device>) -> Result<(), String> {
    device.recover().map_err(|e| format!("reset: {e}"))?;
    let checks = crate::selftest::run(device).map_err(|e| format!("self-check: {e}"))?;
    match checks.iter().find(|c| c.result.is_err()) {
        None => Ok(()),
        Some(failed) => Err(format!(
            "self-check: {} {} failed: {}",
            failed.algorithm,
            failed.mode,
            failed.result.as_ref().err().map_or("", String::as_str)
        )),
    }
}

async fn manage(offload: Weak<Offload>) {
    let mut retry = FIRST_RETRY;
    let mut next_attempt = Instant::now();
    let mut lost_at: Option<Instant> = None;
    loop {
        tokio::time::sleep(CHECK_PERIOD).await;
        let Some(o) = offload.upgrade() else {
            return;
        };
        let lost = o.device.is_lost();
        if lost && lost_at.is_none() {
            lost_at = Some(Instant::now());
            o.take_out_of_service();
            // Their jobs fail now; their queue indices come back (for the self-check and the
            // new queues) once the last batch on each has ended.
            o.drop_all_queues();
            o.stats.device_lost.fetch_add(1, Ordering::Relaxed);
            o.set_state(DeviceState::Lost, None);
            tracing::error!(device = %o.device.info().name, "device lost: all crypto moves to the CPU; recovering");
            retry = FIRST_RETRY;
            next_attempt = Instant::now();
        }
        if lost_at.is_none() {
            o.replace_broken_queues();
            continue;
        }
        if Instant::now() < next_attempt {
            continue;
        }
        // Reset, reconnect and self-check block: off the runtime's workers.
        let device = Arc::clone(&o.device);
        let checked = tokio::task::spawn_blocking(move || reset_and_check(&device))
            .await
            .unwrap_or_else(|e| Err(format!("recovery task failed: {e}")));
        match checked {
            Ok(()) => {
                o.fill_queues();
                o.put_in_service();
                let took = lost_at.take().map_or(Duration::ZERO, |at| at.elapsed());
                o.stats.recoveries.fetch_add(1, Ordering::Relaxed);
                o.stats
                    .last_recovery_ms
                    .store(took.as_millis() as u64, Ordering::Relaxed);
                o.set_state(DeviceState::InService, None);
                tracing::warn!(device = %o.device.info().name, took_ms = took.as_millis() as u64, "device back in service");
            }
            Err(error) => {
                o.stats.recovery_failures.fetch_add(1, Ordering::Relaxed);
                let state = if error.starts_with("self-check") {
                    DeviceState::FailedSelfCheck
                } else {
                    DeviceState::Lost
                };
                tracing::warn!(device = %o.device.info().name, %error, retry_in_ms = retry.as_millis() as u64, "device recovery failed");
                o.set_state(state, Some(error));
                next_attempt = Instant::now() + retry;
                retry = (retry * 2).min(LAST_RETRY);
            }
        }
    }
}
