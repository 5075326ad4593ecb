//! The device: BAR0 register file, queue pairs, engine and housekeeping threads, interrupts,
//! reset and fault injection. Independent of how it is reached: a transport calls the
//! `bar_*` methods for MMIO, maps host memory through [`Device::iommu`], and hands in one
//! [`InterruptSink`] per vector.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tlsaccel_abi::regs::{self, model_faults, Counter};
use tlsaccel_abi::{
    Capabilities, DeviceControl, DeviceStatus, FatalCode, FaultCode, QueueControl, QueueErrorCode,
    QueueStatus, Status, COMPLETION_SIZE, DESCRIPTOR_SIZE, DEVICE_MAGIC, DEVICE_VERSION,
    MIN_QUEUE_ENTRIES, RING_ALIGN,
};

use crate::engine::EngineScratch;
use crate::keys::KeyTable;
use crate::memory::{HostMemory, Iommu};
use crate::queue::{ActiveQueue, Doorbells, OwnLine, Posting};

/// Where the device sends a queue's interrupt message (an eventfd, an MSI-X write, ...).
pub trait InterruptSink: Send + Sync + std::fmt::Debug {
    /// Delivers one interrupt message.
    fn signal(&self);
}

/// The shape of a simulated device.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// Queue pairs (1 to 64).
    pub queues: u32,
    /// Entries in the key table (1 to `tlsaccel_abi::MAX_KEY_SLOTS`).
    pub key_slots: u32,
    /// Record-crypto engine threads; each serves any ordinary queue.
    pub engines: usize,
    /// Public-key engine threads; each serves any public-key queue (`Q_CONTROL.PUBLIC_KEY`),
    /// so handshakes and record crypto do not hold each other up.
    pub pke_engines: usize,
    /// Largest ring the device accepts (a power of two, at most 4096).
    pub max_queue_entries: u32,
    /// Largest `src_len`/`dst_len` of one job (`tlsaccel_abi::MIN_MAX_DATA_LEN` to
    /// `tlsaccel_abi::MAX_DATA_LEN`).
    pub max_data_len: u32,
    /// How long an idle engine polls for new doorbells before it sleeps.
    pub idle_spin: Duration,
    /// What the device reports it can do.
    pub capabilities: Capabilities,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            queues: 8,
            key_slots: 65_536,
            engines: 2,
            pke_engines: 1,
            max_queue_entries: tlsaccel_abi::MAX_QUEUE_ENTRIES,
            max_data_len: tlsaccel_abi::MAX_DATA_LEN,
            idle_spin: Duration::from_micros(50),
            capabilities: Capabilities::NOP
                | Capabilities::AES_128_GCM
                | Capabilities::AES_256_GCM
                | Capabilities::CHACHA20_POLY1305
                | Capabilities::RAW_AEAD
                | Capabilities::TLS13_RECORD
                | Capabilities::TLS12_RECORD
                | Capabilities::INTERRUPT_COALESCING
                | Capabilities::ECDSA_P256
                | Capabilities::ECDSA_P384
                | Capabilities::RSA
                | Capabilities::X25519
                | Capabilities::ECDH_P256
                | Capabilities::MODEL_FAULTS,
        }
    }
}

/// A configuration the model cannot be built with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConfigError {
    #[error("queue count {0} is outside {bound}", bound = regs::NUM_QUEUES_BOUND)]
    Queues(u32),
    #[error("key slot count {0} is outside {bound}", bound = regs::NUM_KEY_SLOTS_BOUND)]
    KeySlots(u32),
    #[error("maximum job length {0} is outside {bound}", bound = regs::MAX_DATA_LEN_BOUND)]
    DataLen(u32),
    #[error("engine count {0} is outside 1..=64")]
    Engines(usize),
    #[error("maximum ring size {0} is not {bound}", bound = regs::MAX_QUEUE_ENTRIES_BOUND)]
    RingSize(u32),
    #[error("could not start a device thread")]
    Thread(#[source] std::sync::Arc<std::io::Error>),
}

/// A fault the model can be told to show, for tests of the host side: [`Device::inject`]
/// in-process, or the `FAULT_*` registers of BAR0 (device-spec §9) from any transport.
pub use tlsaccel_abi::ModelFault as Fault;

#[derive(Debug, Default)]
pub(crate) struct Faults {
    stalled: AtomicBool,
    drop_completion: AtomicU32,
    corrupt_tag: AtomicU32,
    corrupt_open_tag: AtomicU32,
    dma_fault: AtomicU32,
    oversize_length: AtomicU32,
    /// Jobs engines hold under a stall (the `FAULT_HELD_JOBS` register).
    pub(crate) held: AtomicU32,
    /// The argument registers of the fault window: queue, cookie, result length.
    argument_queue: AtomicU32,
    argument_cookie: AtomicU64,
    argument_result_len: AtomicU32,
}

fn take_one(counter: &AtomicU32) -> bool {
    counter.load(Ordering::Relaxed) != 0
        && counter
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
}

impl Faults {
    pub(crate) fn is_stalled(&self) -> bool {
        self.stalled.load(Ordering::Acquire)
    }
    pub(crate) fn take_drop_completion(&self) -> bool {
        take_one(&self.drop_completion)
    }
    pub(crate) fn take_corrupt_tag(&self) -> bool {
        take_one(&self.corrupt_tag)
    }
    pub(crate) fn take_corrupt_open_tag(&self) -> bool {
        take_one(&self.corrupt_open_tag)
    }
    pub(crate) fn take_dma_fault(&self) -> bool {
        take_one(&self.dma_fault)
    }
    pub(crate) fn apply_length_fault(&self, mut posting: Posting) -> Posting {
        if take_one(&self.oversize_length) {
            posting.result_len = u32::MAX;
        }
        posting
    }
    fn clear(&self) {
        self.stalled.store(false, Ordering::Release);
        for counter in [
            &self.drop_completion,
            &self.corrupt_tag,
            &self.corrupt_open_tag,
            &self.dma_fault,
            &self.oversize_length,
            &self.argument_queue,
            &self.argument_result_len,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
        self.argument_cookie.store(0, Ordering::Relaxed);
    }
}

/// Wakes idle engines when a doorbell rings.
#[derive(Debug, Default)]
pub(crate) struct WorkSignal {
    /// Bumped by every doorbell and read by spinning engines: on a cache line of its own.
    epoch: OwnLine<AtomicU64>,
    sleepers: AtomicU32,
    lock: Mutex<()>,
    wake: Condvar,
}

impl WorkSignal {
    pub(crate) fn notify(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) != 0 {
            // Wake them all: an engine of the other class (record or public-key) would look,
            // find nothing it serves, and sleep again while the right one slept on.
            let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.wake.notify_all();
        }
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    pub(crate) fn wait(&self, seen: u64, spin: Duration, timeout: Duration) {
        let spin_until = Instant::now() + spin;
        while Instant::now() < spin_until {
            if self.epoch() != seen {
                return;
            }
            for _ in 0..64 {
                std::hint::spin_loop();
            }
        }
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        let guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.epoch() == seen {
            let _ = self.wake.wait_timeout(guard, timeout);
        }
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Wakes the housekeeping thread for an interrupt-coalescing deadline.
#[derive(Debug, Default)]
pub(crate) struct TimerSignal {
    lock: Mutex<Option<Instant>>,
    wake: Condvar,
}

impl TimerSignal {
    pub(crate) fn arm(&self, deadline: Instant) {
        let mut next = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if next.is_none_or(|at| deadline < at) {
            *next = Some(deadline);
            self.wake.notify_one();
        }
    }
}

/// The registers of one queue, as the host programs them.
#[derive(Debug, Default)]
pub(crate) struct QueueRegisters {
    sq_base: AtomicU64,
    cq_base: AtomicU64,
    size: AtomicU32,
    control: AtomicU32,
    /// `Q_ERROR`; `Q_STATUS.ERROR` is set while it is not `NONE`.
    error: AtomicU32,
    coalesce_count: AtomicU32,
    coalesce_usecs: AtomicU32,
    /// The queue while it is enabled and served.
    active: RwLock<Option<Arc<ActiveQueue>>>,
    /// The queue after a disable, an error or a reset stopped it, until its engines have let
    /// go of it (`Q_STATUS.ENABLED` reads 1 until then, device-spec §3.1).
    stopping: Mutex<Option<Arc<ActiveQueue>>>,
    doorbells: Arc<Doorbells>,
    config: Mutex<()>,
}

impl QueueRegisters {
    pub(crate) fn coalesce_count(&self) -> u32 {
        self.coalesce_count.load(Ordering::Relaxed)
    }
    pub(crate) fn coalesce_usecs(&self) -> u32 {
        self.coalesce_usecs.load(Ordering::Relaxed)
    }
    pub(crate) fn irq_enabled(&self) -> bool {
        QueueControl::from_bits_retain(self.control.load(Ordering::Relaxed))
            .contains(QueueControl::IRQ_ENABLE)
    }
    fn active(&self) -> Option<Arc<ActiveQueue>> {
        self.active
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
    /// Stops the queue: engines finish or drop what they hold, and it is released once they
    /// have let go.
    fn deactivate(&self) {
        self.doorbells.size.store(0, Ordering::Release);
        // Under the `stopping` lock, so that `in_use` never sees the queue in neither place.
        let mut stopping = self.stopping.lock().unwrap_or_else(|e| e.into_inner());
        let taken = self
            .active
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(active) = taken {
            active.stop();
            *stopping = Some(active);
        }
    }

    /// True while an engine may still touch a stopped incarnation of the queue. Forgets the
    /// incarnation once it is released.
    fn is_held(&self) -> bool {
        Self::held(&mut self.stopping.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn held(stopping: &mut Option<Arc<ActiveQueue>>) -> bool {
        match stopping {
            Some(queue) if queue.is_released() => {
                *stopping = None;
                false
            }
            Some(_) => true,
            None => false,
        }
    }

    /// True while the queue is enabled, or stopped and still held by an engine: its ring
    /// registers hold still, and `Q_STATUS.ENABLED` reads 1.
    fn in_use(&self) -> bool {
        let mut stopping = self.stopping.lock().unwrap_or_else(|e| e.into_inner());
        self.active().is_some() || Self::held(&mut stopping)
    }

    fn status(&self) -> QueueStatus {
        let mut status = QueueStatus::empty();
        status.set(QueueStatus::ENABLED, self.in_use());
        status.set(
            QueueStatus::ERROR,
            self.error.load(Ordering::Acquire) != QueueErrorCode::NONE.0,
        );
        status
    }
}

/// Where one interrupt vector goes, if anywhere.
type InterruptVector = RwLock<Option<Arc<dyn InterruptSink>>>;

/// State shared by the register file and the device's threads.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: DeviceConfig,
    control: AtomicU32,
    resetting: AtomicBool,
    /// Serializes the two halves of a reset.
    reset_lock: Mutex<()>,
    fatal_code: AtomicU32,
    heartbeat: AtomicU32,
    counters: [AtomicU64; Counter::ALL.len()],
    queues: Box<[QueueRegisters]>,
    pub(crate) keys: KeyTable,
    pub(crate) iommu: Iommu,
    interrupts: Box<[InterruptVector]>,
    pub(crate) work: WorkSignal,
    pub(crate) timer: TimerSignal,
    pub(crate) faults: Faults,
    shutdown: AtomicBool,
    memory_doorbells: AtomicBool,
}

impl Shared {
    pub(crate) fn count(&self, counter: Counter, by: u64) {
        self.counters[counter as usize].fetch_add(by, Ordering::Relaxed);
    }

    pub(crate) fn sync_key_gauge(&self) {
        self.counters[Counter::KeySlotsLoaded as usize]
            .store(self.keys.loaded(), Ordering::Relaxed);
    }

    pub(crate) fn is_fatal(&self) -> bool {
        self.fatal_code.load(Ordering::Acquire) != FatalCode::NONE.0
    }

    fn is_running(&self) -> bool {
        DeviceControl::from_bits_retain(self.control.load(Ordering::Acquire))
            .contains(DeviceControl::ENABLE)
            && !self.is_fatal()
            && !self.resetting.load(Ordering::Acquire)
    }

    pub(crate) fn queue_registers(&self, index: u32) -> &QueueRegisters {
        &self.queues[index as usize]
    }

    pub(crate) fn signal(&self, queue: u32) {
        let sink = self.interrupts[queue as usize]
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(sink) = sink {
            sink.signal();
            self.count(Counter::Interrupts, 1);
        }
    }

    /// A doorbell value read from host memory is outside the ring.
    pub(crate) fn queue_bad_doorbell(&self, queue: &ActiveQueue) {
        let registers = self.queue_registers(queue.index);
        let _config = registers.config.lock().unwrap_or_else(|e| e.into_inner());
        self.queue_error(registers, QueueErrorCode::BAD_DOORBELL);
    }

    /// A ring access faulted: the queue stops with an error, as hardware would.
    pub(crate) fn queue_ring_fault(&self, queue: &ActiveQueue) {
        let registers = self.queue_registers(queue.index);
        self.queue_error(registers, QueueErrorCode::RING_NOT_MAPPED);
    }

    fn queue_error(&self, registers: &QueueRegisters, code: QueueErrorCode) {
        registers.deactivate();
        registers.error.store(code.0, Ordering::Release);
        tracing::debug!(?code, "queue stopped on error");
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }

    /// Finishes a reset once every engine has let go of every queue (device-spec §8): only
    /// then are the registers, key table and counters cleared and READY set, so nothing an
    /// engine still did for the old incarnation survives it. Returns true when no reset is
    /// pending any more.
    fn finish_reset(&self) -> bool {
        if !self.resetting.load(Ordering::Acquire) {
            return true;
        }
        let _reset = self.reset_lock.lock().unwrap_or_else(|e| e.into_inner());
        if !self.resetting.load(Ordering::Acquire) {
            return true;
        }
        if self.queues.iter().any(QueueRegisters::is_held) {
            return false;
        }
        for registers in self.queues.iter() {
            let _config = registers.config.lock().unwrap_or_else(|e| e.into_inner());
            for reg in [&registers.sq_base, &registers.cq_base] {
                reg.store(0, Ordering::Relaxed);
            }
            for reg in [
                &registers.size,
                &registers.control,
                &registers.error,
                &registers.coalesce_count,
                &registers.coalesce_usecs,
            ] {
                reg.store(0, Ordering::Relaxed);
            }
        }
        self.keys.clear();
        for counter in &self.counters {
            counter.store(0, Ordering::Relaxed);
        }
        self.faults.clear();
        self.fatal_code.store(FatalCode::NONE.0, Ordering::Release);
        self.resetting.store(false, Ordering::Release);
        true
    }

    fn engine_main(self: Arc<Self>, id: usize) {
        let public_key_engine = id >= self.config.engines;
        let mut scratch = EngineScratch::default();
        let queues = self.queues.len();
        let mut start = id % queues;
        let mut idle_rounds = 0u32;
        while !self.shutdown.load(Ordering::Acquire) {
            let seen = self.work.epoch();
            let mut worked = false;
            if self.is_running() {
                for i in 0..queues {
                    let registers = &self.queues[(start + i) % queues];
                    if !registers.doorbells.has_pending() {
                        continue;
                    }
                    if let Some(active) = registers.active() {
                        if active.public_key == public_key_engine {
                            worked |= self.serve(&active, &mut scratch);
                        }
                    }
                }
                start = (start + 1) % queues;
            }
            if worked {
                idle_rounds = 0;
                continue;
            }
            idle_rounds = idle_rounds.saturating_add(1);
            // Spin only right after work; a long-idle engine just sleeps.
            let spin = if idle_rounds <= 2 {
                self.config.idle_spin
            } else {
                Duration::ZERO
            };
            // Doorbells in host memory ring no bell, so they are polled: often right after
            // work, backing off to every millisecond while idle.
            let nap = if self.memory_doorbells.load(Ordering::Relaxed) {
                Duration::from_micros(50 << idle_rounds.min(5)).min(Duration::from_millis(1))
            } else {
                Duration::from_millis(10)
            };
            self.work.wait(seen, spin, nap);
        }
    }

    fn housekeeping_main(self: Arc<Self>) {
        const HEARTBEAT: Duration = Duration::from_millis(5);
        let mut next_beat = Instant::now() + HEARTBEAT;
        while !self.shutdown.load(Ordering::Acquire) {
            let reset_pending = !self.finish_reset();
            let now = Instant::now();
            if now >= next_beat {
                if !self.is_fatal() {
                    self.heartbeat.fetch_add(1, Ordering::Relaxed);
                }
                next_beat = now + HEARTBEAT;
            }
            let mut wake_at = next_beat;
            if reset_pending {
                // Engines are letting go of the queues: look again soon.
                wake_at = wake_at.min(now + Duration::from_micros(200));
            }
            for registers in self.queues.iter() {
                if let Some(active) = registers.active() {
                    let (due, later) = active.irq_due(now);
                    if due && registers.irq_enabled() && !self.is_fatal() {
                        self.signal(active.index);
                    }
                    if let Some(later) = later {
                        wake_at = wake_at.min(later);
                    }
                }
            }
            let mut armed = self.timer.lock.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(at) = armed.take() {
                wake_at = wake_at.min(at);
            }
            let timeout = wake_at.saturating_duration_since(Instant::now());
            if !timeout.is_zero() {
                let (mut guard, _) = self
                    .timer
                    .wake
                    .wait_timeout(armed, timeout)
                    .unwrap_or_else(|e| e.into_inner());
                guard.take();
            }
        }
    }
}

/// A simulated tlsaccel device. Dropping it stops its threads.
#[derive(Debug)]
pub struct Device {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Device {
    /// Builds a device and starts its engine and housekeeping threads. The device starts
    /// ready but disabled, as after a reset.
    pub fn new(config: DeviceConfig) -> Result<Self, ConfigError> {
        if !regs::NUM_QUEUES_BOUND.admits(config.queues) {
            return Err(ConfigError::Queues(config.queues));
        }
        if !regs::NUM_KEY_SLOTS_BOUND.admits(config.key_slots) {
            return Err(ConfigError::KeySlots(config.key_slots));
        }
        if !regs::MAX_DATA_LEN_BOUND.admits(config.max_data_len) {
            return Err(ConfigError::DataLen(config.max_data_len));
        }
        if !(1..=64).contains(&config.engines) {
            return Err(ConfigError::Engines(config.engines));
        }
        if !(1..=64).contains(&config.pke_engines) {
            return Err(ConfigError::Engines(config.pke_engines));
        }
        if !regs::MAX_QUEUE_ENTRIES_BOUND.admits(config.max_queue_entries) {
            return Err(ConfigError::RingSize(config.max_queue_entries));
        }
        let shared = Arc::new(Shared {
            control: AtomicU32::new(0),
            resetting: AtomicBool::new(false),
            reset_lock: Mutex::new(()),
            fatal_code: AtomicU32::new(FatalCode::NONE.0),
            heartbeat: AtomicU32::new(0),
            counters: Default::default(),
            queues: (0..config.queues)
                .map(|_| QueueRegisters::default())
                .collect(),
            keys: KeyTable::new(config.key_slots),
            iommu: Iommu::default(),
            interrupts: (0..config.queues).map(|_| RwLock::new(None)).collect(),
            work: WorkSignal::default(),
            timer: TimerSignal::default(),
            faults: Faults::default(),
            shutdown: AtomicBool::new(false),
            memory_doorbells: AtomicBool::new(false),
            config,
        });
        let mut device = Self {
            shared: Arc::clone(&shared),
            threads: Vec::new(),
        };
        for id in 0..shared.config.engines + shared.config.pke_engines {
            let engine = Arc::clone(&shared);
            let handle = std::thread::Builder::new()
                .name(format!("sim-engine-{id}"))
                .spawn(move || engine.engine_main(id))
                .map_err(|e| ConfigError::Thread(Arc::new(e)))?;
            device.threads.push(handle);
        }
        let housekeeper = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("sim-housekeeping".into())
            .spawn(move || housekeeper.housekeeping_main())
            .map_err(|e| ConfigError::Thread(Arc::new(e)))?;
        device.threads.push(handle);
        Ok(device)
    }

    /// The device's configuration.
    pub fn config(&self) -> &DeviceConfig {
        &self.shared.config
    }

    /// The IOMMU through which every device access to host memory is translated.
    pub fn iommu(&self) -> &Iommu {
        &self.shared.iommu
    }

    /// Connects (or with `None` disconnects) the interrupt vector of queue `vector`.
    pub fn set_interrupt(&self, vector: u32, sink: Option<Arc<dyn InterruptSink>>) {
        if let Some(slot) = self.shared.interrupts.get(vector as usize) {
            *slot.write().unwrap_or_else(|e| e.into_inner()) = sink;
        }
    }

    /// BAR0 size of this device.
    pub fn bar0_size(&self) -> u64 {
        regs::bar0_size(self.shared.config.queues)
    }

    /// Reads a 32-bit BAR0 register. Unknown offsets read as 0.
    pub fn bar_read32(&self, offset: u64) -> u32 {
        let s = &*self.shared;
        let config = &s.config;
        match offset {
            regs::MAGIC => DEVICE_MAGIC,
            regs::VERSION => DEVICE_VERSION,
            regs::CAPABILITIES => config.capabilities.bits(),
            regs::NUM_QUEUES => config.queues,
            regs::MAX_QUEUE_ENTRIES => config.max_queue_entries,
            regs::NUM_KEY_SLOTS => config.key_slots,
            regs::MAX_DATA_LEN => config.max_data_len,
            regs::DOORBELL_STRIDE_REG => regs::DOORBELL_STRIDE as u32,
            regs::DEVICE_CONTROL => s.control.load(Ordering::Acquire),
            regs::DEVICE_STATUS => self.status().bits(),
            regs::FATAL_CODE => s.fatal_code.load(Ordering::Acquire),
            regs::HEARTBEAT => s.heartbeat.load(Ordering::Relaxed),
            o if (regs::COUNTERS_BASE..regs::COUNTERS_END).contains(&o) => {
                let value = self.bar_read64(o & !7);
                if o & 4 == 0 {
                    value as u32
                } else {
                    (value >> 32) as u32
                }
            }
            o if (regs::QUEUE_REGS_BASE..regs::DOORBELL_BASE).contains(&o) => {
                self.read_queue_register(o)
            }
            o if (model_faults::BASE..model_faults::END).contains(&o) => self.read_fault_window(o),
            _ => 0,
        }
    }

    fn has_fault_window(&self) -> bool {
        self.shared
            .config
            .capabilities
            .contains(Capabilities::MODEL_FAULTS)
    }

    fn read_fault_window(&self, offset: u64) -> u32 {
        let faults = &self.shared.faults;
        if !self.has_fault_window() {
            return 0;
        }
        match offset {
            model_faults::QUEUE => faults.argument_queue.load(Ordering::Relaxed),
            model_faults::COOKIE => faults.argument_cookie.load(Ordering::Relaxed) as u32,
            o if o == model_faults::COOKIE + 4 => {
                (faults.argument_cookie.load(Ordering::Relaxed) >> 32) as u32
            }
            model_faults::RESULT_LEN => faults.argument_result_len.load(Ordering::Relaxed),
            model_faults::HELD_JOBS => faults.held.load(Ordering::SeqCst),
            _ => 0,
        }
    }

    /// A write to the fault-injection window (device-spec §9): argument registers, and
    /// `FAULT_INJECT`, which performs the fault. Ignored without `MODEL_FAULTS`, and during
    /// a reset.
    fn write_fault_window(&self, offset: u64, value: u32) {
        let faults = &self.shared.faults;
        if !self.has_fault_window() || self.shared.resetting.load(Ordering::Acquire) {
            return;
        }
        let set_cookie_half = |high: bool| {
            let _ =
                faults
                    .argument_cookie
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                        Some(if high {
                            (old & 0xffff_ffff) | u64::from(value) << 32
                        } else {
                            (old & !0xffff_ffff) | u64::from(value)
                        })
                    });
        };
        match offset {
            model_faults::INJECT => {
                let fault = Fault::from_registers(
                    FaultCode(value),
                    faults.argument_queue.load(Ordering::Relaxed),
                    faults.argument_cookie.load(Ordering::Relaxed),
                    faults.argument_result_len.load(Ordering::Relaxed),
                );
                if let Some(fault) = fault {
                    self.inject(fault);
                }
            }
            model_faults::QUEUE => faults.argument_queue.store(value, Ordering::Relaxed),
            model_faults::COOKIE => set_cookie_half(false),
            o if o == model_faults::COOKIE + 4 => set_cookie_half(true),
            model_faults::RESULT_LEN => faults.argument_result_len.store(value, Ordering::Relaxed),
            _ => {}
        }
    }

    /// Reads a 64-bit BAR0 register (counters, ring bases).
    pub fn bar_read64(&self, offset: u64) -> u64 {
        if (regs::COUNTERS_BASE..regs::COUNTERS_END).contains(&offset) && offset.is_multiple_of(8) {
            let index = ((offset - regs::COUNTERS_BASE) / 8) as usize;
            return self
                .shared
                .counters
                .get(index)
                .map_or(0, |c| c.load(Ordering::Relaxed));
        }
        u64::from(self.bar_read32(offset)) | u64::from(self.bar_read32(offset + 4)) << 32
    }

    /// Writes a 32-bit BAR0 register. Writes to read-only or unknown offsets are ignored.
    pub fn bar_write32(&self, offset: u64, value: u32) {
        match offset {
            regs::DEVICE_CONTROL => self.write_control(value),
            o if (model_faults::BASE..model_faults::END).contains(&o) => {
                self.write_fault_window(o, value)
            }
            o if (regs::QUEUE_REGS_BASE..regs::DOORBELL_BASE).contains(&o) => {
                self.write_queue_register(o, value)
            }
            o if o >= regs::DOORBELL_BASE => self.write_doorbell(o, value),
            _ => {}
        }
    }

    /// Writes a 64-bit BAR0 register as two 32-bit writes, low half first.
    pub fn bar_write64(&self, offset: u64, value: u64) {
        self.bar_write32(offset, value as u32);
        self.bar_write32(offset + 4, (value >> 32) as u32);
    }

    /// Makes the device show `fault` (what a write to the `FAULT_INJECT` register does).
    pub fn inject(&self, fault: Fault) {
        let s = &*self.shared;
        match fault {
            Fault::Stall => s.faults.stalled.store(true, Ordering::Release),
            Fault::Resume => {
                s.faults.stalled.store(false, Ordering::Release);
                s.work.notify();
            }
            Fault::DropNextCompletion => {
                s.faults.drop_completion.fetch_add(1, Ordering::Relaxed);
            }
            Fault::CorruptNextTag => {
                s.faults.corrupt_tag.fetch_add(1, Ordering::Relaxed);
            }
            Fault::CorruptNextOpenTag => {
                s.faults.corrupt_open_tag.fetch_add(1, Ordering::Relaxed);
            }
            Fault::DmaFaultNextJob => {
                s.faults.dma_fault.fetch_add(1, Ordering::Relaxed);
            }
            Fault::OversizeNextResultLength => {
                s.faults.oversize_length.fetch_add(1, Ordering::Relaxed);
            }
            Fault::Fatal => s.fatal_code.store(FatalCode::INJECTED.0, Ordering::Release),
            Fault::BogusCompletion {
                queue,
                cookie,
                result_len,
            } => {
                let Some(active) = s.queues.get(queue as usize).and_then(|q| q.active()) else {
                    return;
                };
                let Some(_inside) = active.enter() else {
                    return;
                };
                if active.unclaimed_entries() == 0 || active.reserve(1) == 0 {
                    return;
                }
                let posting = Posting {
                    cookie,
                    status: Status::OK,
                    result_len,
                    info: 0,
                    sequence_advanced: false,
                };
                let registers = s.queue_registers(queue);
                if let Ok(crate::queue::IrqAction::SignalNow) =
                    active.post(&[posting], 1, 1, 0, registers.irq_enabled())
                {
                    s.signal(queue);
                }
            }
        }
    }

    /// Moves the doorbell pages into `memory`, which the host maps and writes directly:
    /// queue *q*'s page is at `q * DOORBELL_STRIDE` in it. Engines then poll the doorbell words
    /// there; MMIO doorbell writes that still arrive are stored there too. Call before any
    /// queue is enabled; returns false when the doorbells were already placed or `memory` is
    /// too small.
    pub fn place_doorbells(&self, memory: Arc<dyn HostMemory>) -> bool {
        let needed = u64::from(self.shared.config.queues) * regs::DOORBELL_STRIDE;
        if memory.size() < needed {
            return false;
        }
        let placed = self.shared.queues.iter().enumerate().all(|(q, registers)| {
            registers
                .doorbells
                .place_in(Arc::clone(&memory), q as u64 * regs::DOORBELL_STRIDE)
        });
        self.shared
            .memory_doorbells
            .store(placed, Ordering::Release);
        self.shared.work.notify();
        placed
    }

    /// Key slots currently loaded.
    pub fn key_slots_loaded(&self) -> u64 {
        self.shared.keys.loaded()
    }

    fn status(&self) -> DeviceStatus {
        let s = &*self.shared;
        let mut status = DeviceStatus::empty();
        status.set(DeviceStatus::READY, s.finish_reset());
        status.set(DeviceStatus::RUNNING, s.is_running());
        status.set(DeviceStatus::FATAL, s.is_fatal());
        status
    }

    fn write_control(&self, value: u32) {
        let s = &*self.shared;
        let control = DeviceControl::from_bits_retain(value);
        if control.contains(DeviceControl::RESET) {
            self.reset();
            return;
        }
        if s.resetting.load(Ordering::Acquire) {
            // Not READY: registers are not to be programmed yet (§8).
            return;
        }
        s.control
            .store((control & DeviceControl::ENABLE).bits(), Ordering::Release);
        s.work.notify();
    }

    /// Returns the device to its power-on state: queues disabled and their registers cleared,
    /// key table zeroized, counters cleared, fatal state and injected faults cleared. Jobs in
    /// flight are dropped without completions. READY stays clear until every engine has let
    /// go of the queues it was working on ([`Shared::finish_reset`]); the register write
    /// itself does not wait.
    fn reset(&self) {
        let s = &*self.shared;
        {
            let _reset = s.reset_lock.lock().unwrap_or_else(|e| e.into_inner());
            s.resetting.store(true, Ordering::Release);
            s.control.store(0, Ordering::Release);
            for registers in s.queues.iter() {
                let _config = registers.config.lock().unwrap_or_else(|e| e.into_inner());
                registers.deactivate();
            }
            // Lifts a stall, so that held engines see their queues stopped and let go.
            s.faults.clear();
        }
        s.work.notify();
        s.finish_reset();
    }

    fn read_queue_register(&self, offset: u64) -> u32 {
        let relative = offset - regs::QUEUE_REGS_BASE;
        let Some(registers) = self
            .shared
            .queues
            .get((relative / regs::QUEUE_REGS_STRIDE) as usize)
        else {
            return 0;
        };
        let active = || registers.active();
        match relative % regs::QUEUE_REGS_STRIDE {
            regs::queue::SQ_BASE => registers.sq_base.load(Ordering::Relaxed) as u32,
            r if r == regs::queue::SQ_BASE + 4 => {
                (registers.sq_base.load(Ordering::Relaxed) >> 32) as u32
            }
            regs::queue::CQ_BASE => registers.cq_base.load(Ordering::Relaxed) as u32,
            r if r == regs::queue::CQ_BASE + 4 => {
                (registers.cq_base.load(Ordering::Relaxed) >> 32) as u32
            }
            regs::queue::SIZE => registers.size.load(Ordering::Relaxed),
            regs::queue::CONTROL => registers.control.load(Ordering::Relaxed),
            regs::queue::STATUS => registers.status().bits(),
            regs::queue::ERROR => registers.error.load(Ordering::Relaxed),
            regs::queue::IRQ_COALESCE_COUNT => registers.coalesce_count(),
            regs::queue::IRQ_COALESCE_USECS => registers.coalesce_usecs(),
            regs::queue::SQ_HEAD => registers.doorbells.sq_head.load(Ordering::Relaxed),
            regs::queue::CQ_TAIL => active().map_or(0, |a| a.cq_tail()),
            _ => 0,
        }
    }

    fn write_queue_register(&self, offset: u64, value: u32) {
        let relative = offset - regs::QUEUE_REGS_BASE;
        let index = (relative / regs::QUEUE_REGS_STRIDE) as u32;
        let Some(registers) = self.shared.queues.get(index as usize) else {
            return;
        };
        if self.shared.resetting.load(Ordering::Acquire) {
            // Not READY: registers are not to be programmed yet (§8).
            return;
        }
        let _config = registers.config.lock().unwrap_or_else(|e| e.into_inner());
        let enabled = registers.active().is_some();
        // Ring registers hold still while the queue is enabled or still held (§2.4).
        let in_use = registers.in_use();
        let set_half = |reg: &AtomicU64, high: bool| {
            if in_use {
                return;
            }
            let old = reg.load(Ordering::Relaxed);
            let new = if high {
                (old & 0xffff_ffff) | u64::from(value) << 32
            } else {
                (old & !0xffff_ffff) | u64::from(value)
            };
            reg.store(new, Ordering::Relaxed);
        };
        match relative % regs::QUEUE_REGS_STRIDE {
            regs::queue::SQ_BASE => set_half(&registers.sq_base, false),
            r if r == regs::queue::SQ_BASE + 4 => set_half(&registers.sq_base, true),
            regs::queue::CQ_BASE => set_half(&registers.cq_base, false),
            r if r == regs::queue::CQ_BASE + 4 => set_half(&registers.cq_base, true),
            regs::queue::SIZE if !in_use => registers.size.store(value, Ordering::Relaxed),
            regs::queue::IRQ_COALESCE_COUNT => {
                registers.coalesce_count.store(value, Ordering::Relaxed)
            }
            regs::queue::IRQ_COALESCE_USECS => {
                registers.coalesce_usecs.store(value, Ordering::Relaxed)
            }
            regs::queue::CONTROL => {
                let control = QueueControl::from_bits_retain(value);
                registers.control.store(value, Ordering::Relaxed);
                match (enabled, control.contains(QueueControl::ENABLE)) {
                    (false, true) => self.enable_queue(index, registers),
                    (_, false) => {
                        // Disable (or acknowledge an error): stop fetching and posting;
                        // ENABLED reads 1 until the engines have let go (§3.1).
                        registers.deactivate();
                        registers
                            .error
                            .store(QueueErrorCode::NONE.0, Ordering::Release);
                    }
                    (true, true) => {}
                }
            }
            _ => {}
        }
    }

    fn enable_queue(&self, index: u32, registers: &QueueRegisters) {
        let s = &*self.shared;
        let size = registers.size.load(Ordering::Relaxed);
        let sq_base = registers.sq_base.load(Ordering::Relaxed);
        let cq_base = registers.cq_base.load(Ordering::Relaxed);
        registers.error.store(0, Ordering::Relaxed);
        if registers.is_held() {
            // An engine still works on the previous incarnation (§3.1).
            s.queue_error(registers, QueueErrorCode::BAD_CONFIG);
            return;
        }
        if !size.is_power_of_two()
            || !(MIN_QUEUE_ENTRIES..=s.config.max_queue_entries).contains(&size)
            || !sq_base.is_multiple_of(RING_ALIGN)
            || !cq_base.is_multiple_of(RING_ALIGN)
        {
            s.queue_error(registers, QueueErrorCode::BAD_CONFIG);
            return;
        }
        let sq = s
            .iommu
            .translate(sq_base, u64::from(size) * DESCRIPTOR_SIZE as u64);
        let cq = s
            .iommu
            .translate(cq_base, u64::from(size) * COMPLETION_SIZE as u64);
        let (Ok(sq), Ok(cq)) = (sq, cq) else {
            s.count(Counter::DmaFaults, 1);
            s.queue_error(registers, QueueErrorCode::RING_NOT_MAPPED);
            return;
        };
        let doorbells = &registers.doorbells;
        doorbells.set_sq_tail(0);
        doorbells.set_cq_head(0);
        doorbells.sq_head.store(0, Ordering::Relaxed);
        doorbells.cq_stalled.store(false, Ordering::Relaxed);
        *registers.active.write().unwrap_or_else(|e| e.into_inner()) =
            Some(Arc::new(ActiveQueue::new(
                index,
                size,
                sq,
                cq,
                Arc::clone(doorbells),
                QueueControl::from_bits_retain(registers.control.load(Ordering::Relaxed))
                    .contains(QueueControl::PUBLIC_KEY),
            )));
        doorbells.size.store(size, Ordering::Release);
    }

    /// A doorbell write: a bounds check and a store, no lock (this is the hot path).
    fn write_doorbell(&self, offset: u64, value: u32) {
        let relative = offset - regs::DOORBELL_BASE;
        let index = (relative / regs::DOORBELL_STRIDE) as usize;
        let Some(registers) = self.shared.queues.get(index) else {
            return;
        };
        let doorbells = &registers.doorbells;
        let size = doorbells.size.load(Ordering::Acquire);
        if size == 0 {
            return;
        }
        if value >= size {
            let _config = registers.config.lock().unwrap_or_else(|e| e.into_inner());
            self.shared
                .queue_error(registers, QueueErrorCode::BAD_DOORBELL);
            return;
        }
        match relative % regs::DOORBELL_STRIDE {
            regs::DB_SQ_TAIL => {
                doorbells.set_sq_tail(value);
                self.shared.work.notify();
            }
            regs::DB_CQ_HEAD => {
                doorbells.set_cq_head(value);
                // Room in the completion ring lets a stalled queue go on.
                if doorbells.cq_stalled.swap(false, Ordering::SeqCst) {
                    self.shared.work.notify();
                }
            }
            _ => {}
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        for _ in 0..self.threads.len() {
            self.shared.work.notify();
        }
        {
            let _guard = self
                .shared
                .timer
                .lock
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.shared.timer.wake.notify_all();
        }
        {
            let _guard = self
                .shared
                .work
                .lock
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.shared.work.wake.notify_all();
        }
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
        self.shared.keys.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

    use tlsaccel_abi::{AeadAlgorithm, Completion, Descriptor, KeyBlock, Opcode, KEY_BLOCK_SIZE};
    use zerocopy::{FromBytes, IntoBytes};

    use super::*;
    use crate::memory::{HeapMemory, HostMemoryError};

    /// Host memory at `BASE`: rings, key block and job buffers.
    const BASE: u64 = 0x10_0000;
    const SQ: u64 = BASE;
    const CQ: u64 = BASE + 0x1000;
    const KEY: u64 = BASE + 0x2000;
    const SRC: u64 = BASE + 0x3000;
    const DST: u64 = BASE + 0x4000;
    const SIZE: u64 = 0x8000;
    /// A separate mapping for destinations the tests unmap or slow down.
    const OTHER: u64 = 0x40_0000;
    const QUEUE: u32 = 1;
    const SLOT: u32 = 5;
    const TIMEOUT: Duration = Duration::from_secs(10);

    struct Rig {
        device: Device,
        memory: Arc<HeapMemory>,
        submitted: u32,
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting: {what}");
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    impl Rig {
        fn new() -> Self {
            Self::with(DeviceConfig {
                queues: 4,
                key_slots: 16,
                ..DeviceConfig::default()
            })
        }

        fn with(config: DeviceConfig) -> Self {
            let device = Device::new(config).expect("device");
            let memory = Arc::new(HeapMemory::new(SIZE as usize));
            device
                .iommu()
                .map(BASE, SIZE, Arc::clone(&memory) as Arc<dyn HostMemory>, 0)
                .expect("map");
            let rig = Self {
                device,
                memory,
                submitted: 0,
            };
            rig.reset();
            rig.write(regs::DEVICE_CONTROL, DeviceControl::ENABLE.bits());
            rig
        }

        fn read(&self, offset: u64) -> u32 {
            self.device.bar_read32(offset)
        }

        fn write(&self, offset: u64, value: u32) {
            self.device.bar_write32(offset, value)
        }

        fn reset(&self) {
            self.write(regs::DEVICE_CONTROL, DeviceControl::RESET.bits());
            wait_for("READY after reset", || self.ready());
        }

        fn ready(&self) -> bool {
            DeviceStatus::from_bits_retain(self.read(regs::DEVICE_STATUS))
                .contains(DeviceStatus::READY)
        }

        fn queue_status(&self) -> QueueStatus {
            QueueStatus::from_bits_retain(self.read(regs::queue_reg(QUEUE, regs::queue::STATUS)))
        }

        fn queue_error(&self) -> QueueErrorCode {
            QueueErrorCode(self.read(regs::queue_reg(QUEUE, regs::queue::ERROR)))
        }

        /// Clears the rings and enables the queue with 8 entries.
        fn enable_queue(&mut self) -> QueueStatus {
            self.memory.write(0, &[0; 0x2000]).expect("rings");
            self.submitted = 0;
            let reg = |r| regs::queue_reg(QUEUE, r);
            self.device.bar_write64(reg(regs::queue::SQ_BASE), SQ);
            self.device.bar_write64(reg(regs::queue::CQ_BASE), CQ);
            self.write(reg(regs::queue::SIZE), 8);
            self.write(reg(regs::queue::CONTROL), QueueControl::ENABLE.bits());
            self.queue_status()
        }

        fn disable_queue(&self) {
            self.write(regs::queue_reg(QUEUE, regs::queue::CONTROL), 0);
        }

        fn submit(&mut self, mut descriptor: Descriptor) {
            descriptor.cookie = u64::from(self.submitted + 1).into();
            let slot = u64::from(self.submitted % 8);
            self.memory
                .write(SQ - BASE + slot * 64, descriptor.as_bytes())
                .expect("sq");
            self.submitted += 1;
            self.write(regs::doorbell(QUEUE, regs::DB_SQ_TAIL), self.submitted % 8);
        }

        fn completion(&self, index: u32) -> Completion {
            let mut raw = [0u8; 16];
            self.memory
                .read(CQ - BASE + u64::from(index) * 16, &mut raw)
                .expect("cq");
            Completion::read_from_bytes(&raw).expect("16 bytes")
        }

        fn completed(&self, index: u32) -> bool {
            self.completion(index).flags & 1 != 0
        }

        fn wait_completion(&self, index: u32) -> Completion {
            wait_for("a completion", || self.completed(index));
            self.completion(index)
        }

        fn load_key(&mut self) {
            let block = KeyBlock {
                algorithm: AeadAlgorithm::AES_128_GCM.0,
                key: [7; 32],
                ..KeyBlock::default()
            };
            let mut block = block;
            block.key[16..].fill(0);
            self.memory
                .write(KEY - BASE, block.as_bytes())
                .expect("key block");
            let index = self.submitted;
            self.submit(Descriptor {
                opcode: Opcode::KEY_LOAD.0,
                key_slot: SLOT.into(),
                src_iova: KEY.into(),
                src_len: (KEY_BLOCK_SIZE as u32).into(),
                ..Descriptor::default()
            });
            let done = self.wait_completion(index);
            assert_eq!(Status(done.status.get()), Status::OK, "key load");
        }

        fn seal(&mut self, dst: u64) {
            self.submit(Descriptor {
                opcode: Opcode::AEAD_SEAL.0,
                key_slot: SLOT.into(),
                src_iova: SRC.into(),
                src_len: 64.into(),
                dst_iova: dst.into(),
                dst_len: 80.into(),
                ..Descriptor::default()
            });
        }

        fn held_jobs(&self) -> u32 {
            self.read(model_faults::HELD_JOBS)
        }

        fn inject(&self, code: FaultCode) {
            self.write(model_faults::INJECT, code.0);
        }
    }

    fn heap(memory: &HeapMemory, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        memory.read(offset, &mut out).expect("read");
        out
    }

    #[test]
    fn a_disabled_queue_stays_enabled_until_the_engine_lets_go_of_its_job() {
        let mut rig = Rig::new();
        assert_eq!(rig.enable_queue(), QueueStatus::ENABLED);
        rig.load_key();
        rig.inject(FaultCode::STALL);
        rig.seal(DST);
        wait_for("the engine holds the seal", || rig.held_jobs() == 1);
        rig.disable_queue();
        // The engine still holds the job: the rings and buffers are not the host's yet.
        assert_eq!(rig.queue_status(), QueueStatus::ENABLED);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(rig.queue_status(), QueueStatus::ENABLED);
        // Ring registers hold still meanwhile, and the queue cannot be enabled again.
        let size = regs::queue_reg(QUEUE, regs::queue::SIZE);
        rig.write(size, 4);
        assert_eq!(rig.read(size), 8, "SIZE held still");
        assert_eq!(
            rig.enable_queue(),
            QueueStatus::ENABLED | QueueStatus::ERROR,
            "a queue not yet released is refused"
        );
        assert_eq!(rig.queue_error(), QueueErrorCode::BAD_CONFIG);
        rig.disable_queue();
        assert_eq!(rig.queue_error(), QueueErrorCode::NONE);
        rig.inject(FaultCode::RESUME);
        wait_for("the engine lets go", || rig.queue_status().is_empty());
        assert_eq!(rig.held_jobs(), 0);
        // The dropped job wrote nothing and posted nothing, and nothing comes later.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            heap(&rig.memory, DST - BASE, 80),
            vec![0; 80],
            "dst untouched"
        );
        assert!(!rig.completed(1), "no completion for the dropped job");
        assert_eq!(
            rig.device.bar_read64(Counter::JobsOk.offset()),
            1,
            "only the key load"
        );
        // Released, the queue comes back afresh and serves.
        assert_eq!(rig.enable_queue(), QueueStatus::ENABLED);
        rig.seal(DST);
        assert_eq!(Status(rig.wait_completion(0).status.get()), Status::OK);
        assert_ne!(heap(&rig.memory, DST - BASE, 80), vec![0; 80]);
    }

    #[test]
    fn an_unmap_under_a_held_job_makes_it_fault_without_writing_the_memory() {
        let mut rig = Rig::new();
        rig.enable_queue();
        rig.load_key();
        let other = Arc::new(HeapMemory::new(0x1000));
        rig.device
            .iommu()
            .map(OTHER, 0x1000, Arc::clone(&other) as Arc<dyn HostMemory>, 0)
            .expect("map");
        rig.inject(FaultCode::STALL);
        rig.seal(OTHER);
        wait_for("the engine holds the seal", || rig.held_jobs() == 1);
        // Translated at acceptance, unmapped before the job runs.
        rig.device.iommu().unmap(OTHER, 0x1000).expect("unmap");
        rig.inject(FaultCode::RESUME);
        let done = rig.wait_completion(1);
        assert_eq!(Status(done.status.get()), Status::DMA_FAULT);
        assert_eq!(done.result_len.get(), 0);
        assert_eq!(
            heap(&other, 0, 80),
            vec![0; 80],
            "the unmapped memory was written"
        );
        assert_eq!(rig.device.bar_read64(Counter::DmaFaults.offset()), 1);
    }

    /// Host memory whose writes wait for the test, to keep an engine in the middle of a job.
    #[derive(Debug)]
    struct GatedMemory {
        inner: HeapMemory,
        entered: SyncSender<()>,
        proceed: Mutex<Receiver<()>>,
    }

    impl HostMemory for GatedMemory {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), HostMemoryError> {
            self.inner.read(offset, buf)
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), HostMemoryError> {
            let _ = self.entered.try_send(());
            let _ = self
                .proceed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .recv_timeout(TIMEOUT);
            self.inner.write(offset, data)
        }
        fn write_u32_release(&self, offset: u64, value: u32) -> Result<(), HostMemoryError> {
            self.write(offset, &value.to_le_bytes())
        }
    }

    /// A rig whose seals write `dst` into gated memory at `OTHER`: the engine stays inside
    /// the job until the test sends on the returned channel.
    fn gated_rig() -> (Rig, Receiver<()>, SyncSender<()>, Arc<GatedMemory>) {
        let mut rig = Rig::new();
        rig.enable_queue();
        rig.load_key();
        let (entered_tx, entered) = sync_channel(1);
        let (proceed, proceed_rx) = sync_channel(1);
        let gated = Arc::new(GatedMemory {
            inner: HeapMemory::new(0x1000),
            entered: entered_tx,
            proceed: Mutex::new(proceed_rx),
        });
        rig.device
            .iommu()
            .map(OTHER, 0x1000, Arc::clone(&gated) as Arc<dyn HostMemory>, 0)
            .expect("map");
        (rig, entered, proceed, gated)
    }

    #[test]
    fn reset_reports_ready_only_once_every_engine_has_let_go() {
        let (mut rig, entered, proceed, _gated) = gated_rig();
        rig.seal(OTHER);
        entered
            .recv_timeout(TIMEOUT)
            .expect("the engine writes dst");
        rig.write(regs::DEVICE_CONTROL, DeviceControl::RESET.bits());
        std::thread::sleep(Duration::from_millis(20));
        assert!(!rig.ready(), "READY while an engine is inside a job");
        // Nothing is cleared before the engine has let go, so nothing it does survives.
        assert_eq!(rig.device.key_slots_loaded(), 1);
        // Registers are not programmable meanwhile.
        rig.write(regs::DEVICE_CONTROL, DeviceControl::ENABLE.bits());
        proceed.send(()).expect("release the engine");
        wait_for("READY once the engine let go", || rig.ready());
        assert_eq!(rig.read(regs::DEVICE_CONTROL), 0, "ENABLE was ignored");
        assert_eq!(
            rig.device.key_slots_loaded(),
            0,
            "the key table is zeroized"
        );
        for counter in Counter::ALL {
            assert_eq!(rig.device.bar_read64(counter.offset()), 0, "{counter:?}");
        }
        assert!(!rig.completed(1), "the dropped job posted no completion");
        assert_eq!(rig.queue_status(), QueueStatus::empty());
    }

    #[test]
    fn a_job_under_way_at_a_disable_finishes_its_dma_but_posts_nothing() {
        let (mut rig, entered, proceed, gated) = gated_rig();
        rig.seal(OTHER);
        entered
            .recv_timeout(TIMEOUT)
            .expect("the engine writes dst");
        rig.disable_queue();
        assert_eq!(
            rig.queue_status(),
            QueueStatus::ENABLED,
            "held by the engine"
        );
        assert_eq!(
            rig.enable_queue(),
            QueueStatus::ENABLED | QueueStatus::ERROR
        );
        assert_eq!(rig.queue_error(), QueueErrorCode::BAD_CONFIG);
        proceed.send(()).expect("release the engine");
        wait_for("the engine lets go", || {
            !rig.queue_status().contains(QueueStatus::ENABLED)
        });
        // The write under way finished (allowed, §3.1) and nothing else happened after it.
        assert_ne!(heap(&gated.inner, 0, 80), vec![0; 80]);
        assert!(!rig.completed(1));
    }

    #[test]
    fn faults_reach_the_model_through_its_register_window() {
        let mut rig = Rig::new();
        assert!(Capabilities::from_bits_retain(rig.read(regs::CAPABILITIES))
            .contains(Capabilities::MODEL_FAULTS));
        rig.enable_queue();
        // A bogus completion from the argument registers, with a 64-bit cookie.
        rig.write(model_faults::QUEUE, QUEUE);
        rig.device
            .bar_write64(model_faults::COOKIE, 0xdead_beef_0000_0003);
        rig.write(model_faults::RESULT_LEN, 5);
        assert_eq!(
            rig.device.bar_read64(model_faults::COOKIE),
            0xdead_beef_0000_0003
        );
        rig.inject(FaultCode::BOGUS_COMPLETION);
        let bogus = rig.wait_completion(0);
        assert_eq!(bogus.cookie.get(), 0xdead_beef_0000_0003);
        assert_eq!(bogus.result_len.get(), 5);
        // Stall holds fetched jobs and counts them; resume lets them complete (into
        // completion entries 1 and 2: the bogus one took entry 0, but no submission slot).
        rig.inject(FaultCode::STALL);
        rig.submit(Descriptor::default());
        rig.submit(Descriptor::default());
        wait_for("two held NOPs", || rig.held_jobs() == 2);
        assert!(!rig.completed(1));
        rig.inject(FaultCode::RESUME);
        rig.wait_completion(2);
        assert_eq!(rig.held_jobs(), 0);
        // Unknown codes do nothing; FATAL sets the fatal state; a reset clears faults.
        rig.inject(FaultCode(0x77));
        rig.inject(FaultCode::FATAL);
        assert_eq!(rig.read(regs::FATAL_CODE), FatalCode::INJECTED.0);
        rig.reset();
        assert_eq!(rig.read(regs::FATAL_CODE), FatalCode::NONE.0);
        assert_eq!(rig.read(model_faults::QUEUE), 0);
    }

    #[test]
    fn without_the_capability_the_window_reads_zero_and_ignores_writes() {
        let config = DeviceConfig {
            queues: 4,
            key_slots: 16,
            capabilities: DeviceConfig::default().capabilities - Capabilities::MODEL_FAULTS,
            ..DeviceConfig::default()
        };
        let rig = Rig::with(config);
        rig.write(model_faults::QUEUE, 3);
        assert_eq!(rig.read(model_faults::QUEUE), 0);
        rig.inject(FaultCode::FATAL);
        assert_eq!(rig.read(regs::FATAL_CODE), FatalCode::NONE.0);
    }

    #[test]
    fn a_ring_unmapped_under_an_enabled_queue_stops_it_with_an_error() {
        let mut rig = Rig::new();
        rig.enable_queue();
        rig.device.iommu().unmap(BASE, SIZE).expect("unmap");
        rig.submit(Descriptor::default());
        wait_for("the queue stops", || {
            rig.queue_status().contains(QueueStatus::ERROR)
        });
        assert_eq!(rig.queue_error(), QueueErrorCode::RING_NOT_MAPPED);
    }
}
