//! The device: BAR0 register file, queue pairs, engine and housekeeping threads, interrupts,
//! reset and fault injection. Independent of how it is reached: a transport calls the
//! `bar_*` methods for MMIO, maps host memory through [`Device::iommu`], and hands in one
//! [`InterruptSink`] per vector.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tlsaccel_abi::regs::{self, Counter};
use tlsaccel_abi::{
    Capabilities, DeviceControl, DeviceStatus, FatalCode, QueueControl, QueueErrorCode,
    QueueStatus, Status, COMPLETION_SIZE, DESCRIPTOR_SIZE, DEVICE_MAGIC, DEVICE_VERSION,
    MIN_QUEUE_ENTRIES, RING_ALIGN,
};

use crate::engine::EngineScratch;
use crate::keys::KeyTable;
use crate::memory::{HostMemory, Iommu};
use crate::queue::{ActiveQueue, Doorbells, Posting};

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
                | Capabilities::ECDH_P256,
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

/// A fault the model can be told to show, for tests of the host side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Engines stop fetching descriptors until [`Fault::Resume`].
    Stall,
    /// Undo [`Fault::Stall`].
    Resume,
    /// The next completion is never written.
    DropNextCompletion,
    /// The next seal writes a tag with one bit flipped.
    CorruptNextTag,
    /// The next accepted job fails with `DMA_FAULT`.
    DmaFaultNextJob,
    /// The next completion reports a `result_len` larger than any job can produce.
    OversizeNextResultLength,
    /// Enter the fatal state.
    Fatal,
    /// Write a completion nobody asked for into a queue's completion ring.
    BogusCompletion {
        queue: u32,
        cookie: u64,
        result_len: u32,
    },
}

#[derive(Debug, Default)]
pub(crate) struct Faults {
    stalled: AtomicBool,
    drop_completion: AtomicU32,
    corrupt_tag: AtomicU32,
    dma_fault: AtomicU32,
    oversize_length: AtomicU32,
}

fn take_one(counter: &AtomicU32) -> bool {
    counter.load(Ordering::Relaxed) != 0
        && counter
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
}

impl Faults {
    pub(crate) fn take_drop_completion(&self) -> bool {
        take_one(&self.drop_completion)
    }
    pub(crate) fn take_corrupt_tag(&self) -> bool {
        take_one(&self.corrupt_tag)
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
        self.stalled.store(false, Ordering::Relaxed);
        for counter in [
            &self.drop_completion,
            &self.corrupt_tag,
            &self.dma_fault,
            &self.oversize_length,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
    }
}

/// Wakes idle engines when a doorbell rings.
#[derive(Debug, Default)]
pub(crate) struct WorkSignal {
    epoch: AtomicU64,
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

    fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    fn wait(&self, seen: u64, spin: Duration, timeout: Duration) {
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
    status: AtomicU32,
    error: AtomicU32,
    coalesce_count: AtomicU32,
    coalesce_usecs: AtomicU32,
    active: RwLock<Option<Arc<ActiveQueue>>>,
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
    fn deactivate(&self) {
        self.doorbells.size.store(0, Ordering::Release);
        if let Some(active) = self
            .active
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            active.stop();
        }
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
        registers.error.store(code.0, Ordering::Relaxed);
        registers
            .status
            .store(QueueStatus::ERROR.bits(), Ordering::Release);
        tracing::debug!(?code, "queue stopped on error");
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
            if self.is_running() && !self.faults.stalled.load(Ordering::Relaxed) {
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
            let now = Instant::now();
            if now >= next_beat {
                if !self.is_fatal() {
                    self.heartbeat.fetch_add(1, Ordering::Relaxed);
                }
                next_beat = now + HEARTBEAT;
            }
            let mut wake_at = next_beat;
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
            o if (regs::COUNTERS_BASE..regs::QUEUE_REGS_BASE).contains(&o) => {
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
            _ => 0,
        }
    }

    /// Reads a 64-bit BAR0 register (counters, ring bases).
    pub fn bar_read64(&self, offset: u64) -> u64 {
        if (regs::COUNTERS_BASE..regs::QUEUE_REGS_BASE).contains(&offset) && offset % 8 == 0 {
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

    /// Makes the device show `fault`.
    pub fn inject(&self, fault: Fault) {
        let s = &*self.shared;
        match fault {
            Fault::Stall => s.faults.stalled.store(true, Ordering::Relaxed),
            Fault::Resume => {
                s.faults.stalled.store(false, Ordering::Relaxed);
                s.work.notify();
            }
            Fault::DropNextCompletion => {
                s.faults.drop_completion.fetch_add(1, Ordering::Relaxed);
            }
            Fault::CorruptNextTag => {
                s.faults.corrupt_tag.fetch_add(1, Ordering::Relaxed);
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
        status.set(DeviceStatus::READY, !s.resetting.load(Ordering::Acquire));
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
        s.control
            .store((control & DeviceControl::ENABLE).bits(), Ordering::Release);
        s.work.notify();
    }

    /// Returns the device to its power-on state: queues disabled and their registers cleared,
    /// key table zeroized, counters cleared, fatal state cleared. Jobs in flight are dropped
    /// without completions.
    fn reset(&self) {
        let s = &*self.shared;
        s.resetting.store(true, Ordering::Release);
        s.control.store(0, Ordering::Release);
        for registers in s.queues.iter() {
            let _config = registers.config.lock().unwrap_or_else(|e| e.into_inner());
            registers.deactivate();
            for reg in [&registers.sq_base, &registers.cq_base] {
                reg.store(0, Ordering::Relaxed);
            }
            for reg in [
                &registers.size,
                &registers.control,
                &registers.status,
                &registers.error,
                &registers.coalesce_count,
                &registers.coalesce_usecs,
            ] {
                reg.store(0, Ordering::Relaxed);
            }
        }
        s.keys.clear();
        for counter in &s.counters {
            counter.store(0, Ordering::Relaxed);
        }
        s.faults.clear();
        s.fatal_code.store(FatalCode::NONE.0, Ordering::Release);
        s.resetting.store(false, Ordering::Release);
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
            regs::queue::STATUS => registers.status.load(Ordering::Acquire),
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
        let _config = registers.config.lock().unwrap_or_else(|e| e.into_inner());
        let enabled = registers.active().is_some();
        let set_half = |reg: &AtomicU64, high: bool| {
            if enabled {
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
            regs::queue::SIZE if !enabled => registers.size.store(value, Ordering::Relaxed),
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
                    (true, false) => {
                        registers.deactivate();
                        registers.status.store(0, Ordering::Release);
                    }
                    _ => {}
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
        if !size.is_power_of_two()
            || !(MIN_QUEUE_ENTRIES..=s.config.max_queue_entries).contains(&size)
            || sq_base % RING_ALIGN != 0
            || cq_base % RING_ALIGN != 0
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
        registers
            .status
            .store(QueueStatus::ENABLED.bits(), Ordering::Release);
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
