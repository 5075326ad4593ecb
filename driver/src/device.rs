//! An opened device: identity check, reset and enable, the DMA pool, the admin queue used for
//! key-table operations, data queue pairs, key slots, counters and recovery.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tlsaccel_abi::regs::{self, Counter, RegisterBound};
use tlsaccel_abi::{
    AeadAlgorithm, Capabilities, DeviceControl, DeviceStatus, FatalCode, KeyBlock, KeyDirection,
    PrivateKeyType, RecordProtocol, Status, DEVICE_MAGIC, KEY_BLOCK_SIZE, NONCE_LEN, VERSION_MAJOR,
};
use zerocopy::FromBytes;
use zeroize::Zeroizing;

use crate::dma::{DmaError, DmaPool};
use crate::events::DeviceEvents;
use crate::queue::{Job, JobError, JobOp, JobOutput, QueueConfig, QueueError, QueuePair};
use crate::transport::{DeviceAddress, Transport, TransportError};

/// Errors of opening and managing a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("{name}: not a tlsaccel device (magic {magic:#010x})")]
    NotOurDevice { name: String, magic: u32 },
    #[error("{name}: device speaks contract version {major}.{minor}; this driver speaks {VERSION_MAJOR}.x")]
    Version {
        name: String,
        major: u16,
        minor: u16,
    },
    #[error("{name}: identity register {register} reads {value}; the contract allows {bound}, so the device is refused")]
    IdentityOutOfBounds {
        name: String,
        register: &'static str,
        value: u32,
        bound: RegisterBound,
    },
    #[error("{name}: device did not become ready within {waited:?} after reset")]
    ResetTimeout { name: String, waited: Duration },
    #[error("{name}: device is in the fatal state ({code:?})")]
    Fatal { name: String, code: FatalCode },
    #[error("{name}: device did not start running")]
    NotRunning { name: String },
    #[error("every data queue of the device is in use")]
    NoFreeQueue,
    #[error("{name}: the device is lost; it must be recovered first")]
    Lost { name: String },
    #[error("every key slot of the device is in use")]
    NoFreeSlot,
    #[error("the device does not support {0}")]
    Unsupported(&'static str),
    #[error("key material is invalid: {0}")]
    BadKey(&'static str),
    #[error("the key slot belongs to a device incarnation that was reset")]
    StaleSlot,
    #[error("{name}: the device came back from reset with a different identity; open it again")]
    Changed { name: String },
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Dma(#[from] DmaError),
    #[error("admin job failed")]
    Job(#[from] JobError),
    #[error("could not start the health-watch thread")]
    Thread(#[source] std::io::Error),
}

/// What a device says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub name: String,
    pub version: (u16, u16),
    pub capabilities: Capabilities,
    pub queues: u32,
    pub max_queue_entries: u32,
    pub key_slots: u32,
    pub max_data_len: u32,
}

/// Settings of an opened device.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    /// Bytes per DMA region.
    pub dma_region_size: usize,
    /// Most DMA memory the driver maps for this device.
    pub dma_limit: usize,
    /// How long an admin (key-table) job may take.
    pub admin_timeout: Duration,
    /// How long the device may take to come out of reset.
    pub reset_timeout: Duration,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        Self {
            dma_region_size: 4 << 20,
            dma_limit: 1 << 30,
            admin_timeout: Duration::from_secs(2),
            reset_timeout: Duration::from_secs(2),
        }
    }
}

/// The admin queue is queue 0; data queues are 1.. .
const ADMIN_QUEUE: u32 = 0;
const ADMIN_QUEUE_SIZE: u32 = 64;

/// An opened device. Shared by everything that uses it.
pub struct Device {
    transport: Arc<dyn Transport>,
    info: DeviceInfo,
    options: DeviceOptions,
    pool: DmaPool,
    admin: Mutex<Option<QueuePair>>,
    data_queues: Arc<Mutex<Vec<QueueIndex>>>,
    free_slots: Arc<Mutex<Vec<u32>>>,
    epoch: Arc<AtomicU64>,
    /// Set by the health watch when the device is gone or fatal; cleared by `recover`.
    lost: Arc<AtomicBool>,
    /// What the driver caught the device doing wrong, over its whole life.
    events: Arc<DeviceEvents>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Device {
    /// Opens the device at `address` (see [`DeviceAddress`]) with default options.
    pub fn open(address: &str) -> Result<Arc<Self>, DeviceError> {
        let address: DeviceAddress = address.parse()?;
        Self::with_transport(address.connect()?, DeviceOptions::default())
    }

    /// Identifies, resets and enables the device behind `transport`.
    pub fn with_transport(
        transport: Arc<dyn Transport>,
        options: DeviceOptions,
    ) -> Result<Arc<Self>, DeviceError> {
        let info = identify(transport.as_ref())?;
        let pool = match transport.region_source() {
            Some(source) => {
                DmaPool::with_source(source, options.dma_region_size, options.dma_limit)
            }
            None => DmaPool::new(
                Arc::clone(&transport) as Arc<dyn crate::dma::DmaMapper>,
                options.dma_region_size,
                options.dma_limit,
            ),
        };
        let slots = (0..info.key_slots).rev().collect();
        let device = Arc::new(Self {
            data_queues: Arc::new(Mutex::new(vec![QueueIndex::Free; info.queues as usize])),
            transport,
            info,
            options,
            pool,
            admin: Mutex::new(None),
            free_slots: Arc::new(Mutex::new(slots)),
            epoch: Arc::new(AtomicU64::new(0)),
            lost: Arc::new(AtomicBool::new(false)),
            events: Arc::default(),
        });
        device.start()?;
        spawn_health_watch(Arc::downgrade(&device))?;
        Ok(device)
    }

    /// Resets the device, enables it and creates the admin queue.
    fn start(&self) -> Result<(), DeviceError> {
        self.reset_and_wait()?;
        self.enable()
    }

    /// Writes RESET and waits for READY: the device has dropped every job and its engines
    /// have let go of all host memory (device-spec §8).
    fn reset_and_wait(&self) -> Result<(), DeviceError> {
        self.transport
            .write32(regs::DEVICE_CONTROL, DeviceControl::RESET.bits());
        let start = Instant::now();
        while !self.status().contains(DeviceStatus::READY) {
            if start.elapsed() > self.options.reset_timeout {
                return Err(DeviceError::ResetTimeout {
                    name: self.info.name.clone(),
                    waited: self.options.reset_timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Enables a device that is READY and creates the admin queue.
    fn enable(&self) -> Result<(), DeviceError> {
        let t = self.transport.as_ref();
        let name = self.info.name.clone();
        t.write32(regs::DEVICE_CONTROL, DeviceControl::ENABLE.bits());
        let status = self.status();
        if status.contains(DeviceStatus::FATAL) {
            let code = FatalCode(t.read32(regs::FATAL_CODE));
            return Err(DeviceError::Fatal { name, code });
        }
        if !status.contains(DeviceStatus::RUNNING) {
            return Err(DeviceError::NotRunning { name });
        }
        let admin = QueuePair::create(
            Arc::clone(&self.transport),
            &self.pool,
            ADMIN_QUEUE,
            QueueConfig {
                size: ADMIN_QUEUE_SIZE,
                interrupts: false,
                ..QueueConfig::default()
            },
            self.info.max_queue_entries,
        )?
        .with_epoch(Arc::clone(&self.epoch))
        .with_lost_flag(Arc::clone(&self.lost))
        .with_events(Arc::clone(&self.events));
        *self.admin_queue() = Some(admin);
        Ok(())
    }

    /// Resets the device and brings it back: every queue pair and key slot of the previous
    /// incarnation is dead (their jobs fail with `DeviceLost`), new ones can be created.
    ///
    /// The new incarnation begins (and the memory and slots that old queues held for the
    /// device are released) only once the device has reported READY after the reset, that
    /// is once it has let go of everything; if it never does, the old queues keep holding.
    pub fn recover(&self) -> Result<(), DeviceError> {
        tracing::warn!(device = %self.info.name, "resetting device");
        // The admin queue lock is held throughout, so no key-table job runs meanwhile.
        let mut admin = self.admin_queue();
        self.transport.reset()?;
        // A device that came back as something else (another contract, other limits) cannot
        // take over this driver's pool and queues: that needs a fresh open.
        let now = identify(self.transport.as_ref())?;
        if now != self.info {
            return Err(DeviceError::Changed {
                name: self.info.name.clone(),
            });
        }
        self.reset_and_wait()?;
        self.epoch.fetch_add(1, Ordering::AcqRel);
        // The old admin queue sees the new epoch and hands its rings back without waiting.
        admin.take();
        drop(admin);
        self.enable()?;
        self.lost.store(false, Ordering::Release);
        Ok(())
    }

    fn admin_queue(&self) -> MutexGuard<'_, Option<QueuePair>> {
        self.admin.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the device said about itself when it was opened.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The transport the device is reached through.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    /// The device's DMA memory pool.
    pub fn pool(&self) -> &DmaPool {
        &self.pool
    }

    /// True when the health watch found the device gone (its transport lost, the device
    /// fatal, or its heartbeat stopped). Jobs in flight then fail with `DeviceLost`;
    /// `recover()` brings the device back if it can be reached.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// What the driver caught the device doing wrong (unknown cookies, impossible
    /// completions, timeouts, quarantined jobs), counted over its whole life.
    pub fn events(&self) -> &DeviceEvents {
        &self.events
    }

    /// The `DEVICE_STATUS` register.
    pub fn status(&self) -> DeviceStatus {
        DeviceStatus::from_bits_retain(self.transport.read32(regs::DEVICE_STATUS))
    }

    /// A device counter.
    pub fn counter(&self, counter: Counter) -> u64 {
        self.transport.read64(counter.offset())
    }

    /// The `HEARTBEAT` register.
    pub fn heartbeat(&self) -> u32 {
        self.transport.read32(regs::HEARTBEAT)
    }

    /// Takes a free data queue and enables it with `config`. The queue goes back to the
    /// device when the returned pair is dropped.
    pub fn queue(&self, config: QueueConfig) -> Result<QueuePair, DeviceError> {
        if self.is_lost() || self.transport.is_lost() {
            return Err(DeviceError::Lost {
                name: self.info.name.clone(),
            });
        }
        let index = {
            let epoch = self.epoch.load(Ordering::Acquire);
            let mut indices = self.data_queues.lock().unwrap_or_else(|e| e.into_inner());
            let index = (1..indices.len())
                .find(|&i| indices[i].is_free(epoch))
                .ok_or(DeviceError::NoFreeQueue)?;
            indices[index] = QueueIndex::Taken;
            index as u32
        };
        let lease = QueueLease {
            indices: Arc::clone(&self.data_queues),
            index,
            quarantined_in: None,
        };
        let pair = QueuePair::create(
            Arc::clone(&self.transport),
            &self.pool,
            index,
            config,
            self.info.max_queue_entries,
        )?;
        Ok(pair
            .with_epoch(Arc::clone(&self.epoch))
            .with_lost_flag(Arc::clone(&self.lost))
            .with_events(Arc::clone(&self.events))
            .with_lease(lease))
    }

    /// Runs one job on the admin queue and waits for it.
    fn admin(&self, op: JobOp) -> Result<JobOutput, DeviceError> {
        let mut guard = self.admin_queue();
        let admin = guard.as_mut().ok_or(DeviceError::StaleSlot)?;
        let mut result = Err(JobError::DeviceLost);
        let ran = admin.run(
            &[Job { user_data: 0, op }],
            self.options.admin_timeout,
            |done| result = done.result,
        );
        if admin.is_broken() && !self.lost.swap(true, Ordering::AcqRel) {
            // Key-table jobs only run on the admin queue: without it the device is no use.
            // Like an NVMe admin command timeout, this calls for a reset (`recover`).
            tracing::error!(device = %self.info.name, "admin queue stopped (timeout or reset); device marked lost");
        }
        ran?;
        Ok(result?)
    }

    /// Loads `material` into a free key slot. The host copy of the key is zeroized once the
    /// device has it; the slot is destroyed on the device when the returned handle is dropped.
    pub fn load_key(self: &Arc<Self>, material: &KeyMaterial) -> Result<KeySlot, DeviceError> {
        let needed = material
            .algorithm
            .capability()
            .ok_or(DeviceError::Unsupported("this AEAD algorithm"))?;
        if !self.info.capabilities.contains(needed) {
            return Err(DeviceError::Unsupported("this AEAD algorithm"));
        }
        let mut slot = self.new_slot(self.take_slot_index()?, material.algorithm);
        slot.loaded = false;
        self.load_into(slot, material)
    }

    fn load_into(&self, mut slot: KeySlot, material: &KeyMaterial) -> Result<KeySlot, DeviceError> {
        let mut bytes = Zeroizing::new([0u8; KEY_BLOCK_SIZE]);
        {
            let block = KeyBlock::mut_from_bytes(&mut bytes[..])
                .expect("a KEY_BLOCK_SIZE array is exactly one KeyBlock");
            block.algorithm = material.algorithm.0;
            block.protocol = material.protocol.0;
            block.direction = material.direction.0;
            block.sequence = material.sequence.into();
            block.key[..material.key.len()].copy_from_slice(&material.key);
            block.iv = *material.iv;
        }
        let buffer = self.pool.alloc(KEY_BLOCK_SIZE)?;
        buffer.write(0, &bytes[..])?;
        let result = self.admin(JobOp::KeyLoad {
            slot: slot.slot_ref(),
            block: buffer.whole(),
        });
        buffer.zeroize()?;
        result?;
        slot.loaded = true;
        Ok(slot)
    }

    /// A free slot index, held until every job naming it is gone (see [`SlotRef`]).
    fn take_slot_index(&self) -> Result<SlotRef, DeviceError> {
        let index = self
            .free_slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .ok_or(DeviceError::NoFreeSlot)?;
        Ok(SlotRef(Arc::new(SlotIndex {
            index,
            free: Some(Arc::clone(&self.free_slots)),
            quarantined: AtomicBool::new(false),
        })))
    }

    fn new_slot(self: &Arc<Self>, slot: SlotRef, algorithm: AeadAlgorithm) -> KeySlot {
        KeySlot {
            device: Arc::clone(self),
            slot,
            epoch: self.epoch.load(Ordering::Acquire),
            algorithm,
            loaded: true,
        }
    }

    /// Key slot indices free for a new key (held ones, by live keys or by jobs the device
    /// may still fetch, are not).
    pub fn free_key_slots(&self) -> usize {
        self.free_slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Loads a private key (`kind` says which and how `material` is encoded: PKCS#8 DER for
    /// ECDSA and RSA, the raw private key for X25519 and P-256 ECDH) into a free slot. The
    /// DMA copy of the key is zeroized once the device has it; the slot is destroyed when the
    /// handle is dropped.
    pub fn load_private_key(
        self: &Arc<Self>,
        kind: PrivateKeyType,
        material: &[u8],
    ) -> Result<KeySlot, DeviceError> {
        let needed = match kind {
            PrivateKeyType::ECDSA_P256 => Capabilities::ECDSA_P256,
            PrivateKeyType::ECDSA_P384 => Capabilities::ECDSA_P384,
            PrivateKeyType::RSA => Capabilities::RSA,
            PrivateKeyType::X25519 => Capabilities::X25519,
            PrivateKeyType::ECDH_P256 => Capabilities::ECDH_P256,
            _ => return Err(DeviceError::Unsupported("this private key type")),
        };
        if !self.info.capabilities.contains(needed) {
            return Err(DeviceError::Unsupported("this private key type"));
        }
        let mut slot = self.new_slot(self.take_slot_index()?, AeadAlgorithm(0));
        slot.loaded = false;
        let buffer = self.pool.alloc(material.len().max(1))?;
        buffer.write(0, material)?;
        let result = self.admin(JobOp::PkeKeyLoad {
            slot: slot.slot_ref(),
            kind,
            src: buffer.span(0, material.len())?,
        });
        buffer.zeroize()?;
        result?;
        slot.loaded = true;
        Ok(slot)
    }

    /// A free slot for `KX_GENERATE` to fill. Mark it filled once a generation was accepted
    /// (or its outcome is unknown); a filled slot still loaded when dropped is destroyed.
    pub fn reserve_key_slot(self: &Arc<Self>) -> Result<KeySlot, DeviceError> {
        let mut slot = self.new_slot(self.take_slot_index()?, AeadAlgorithm(0));
        slot.loaded = false;
        Ok(slot)
    }

    fn destroy_slot(&self, slot: SlotRef) -> Result<(), DeviceError> {
        match self.admin(JobOp::KeyDestroy { slot }) {
            Ok(_) => Ok(()),
            Err(DeviceError::Job(JobError::Device { status, .. }))
                if status == Status::SLOT_EMPTY =>
            {
                Ok(())
            }
            Err(error) => Err(error),
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.admin_queue().take();
        // Leave the device reset: no key material survives the driver.
        self.transport
            .write32(regs::DEVICE_CONTROL, DeviceControl::RESET.bits());
    }
}

impl DeviceInfo {
    /// Reads and checks a device's identity registers without resetting or enabling it (for
    /// `tlsaccel devices`).
    pub fn probe(transport: &dyn Transport) -> Result<Self, DeviceError> {
        identify(transport)
    }
}

/// How often the health watch looks at the device, and how long a heartbeat may stand still.
const HEALTH_PERIOD: Duration = Duration::from_millis(100);
const HEARTBEAT_STALL: Duration = Duration::from_secs(3);

/// Watches a device until it is dropped: transport lost, FATAL set, or a heartbeat that stands
/// still for `HEARTBEAT_STALL` marks it lost, once, with an error in the log.
fn spawn_health_watch(device: std::sync::Weak<Device>) -> Result<(), DeviceError> {
    std::thread::Builder::new()
        .name("tlsaccel-health".into())
        .spawn(move || {
            let mut last_beat = None;
            let mut beat_changed = Instant::now();
            let mut stopped_checks = 0u32;
            loop {
                std::thread::sleep(HEALTH_PERIOD);
                let Some(device) = device.upgrade() else {
                    return;
                };
                if device.lost.load(Ordering::Acquire) {
                    last_beat = None;
                    stopped_checks = 0;
                    continue;
                }
                let name = &device.info.name;
                let status = device.status();
                // A device that left the running state without being told (it reset itself,
                // or a function-level reset came from outside) has dropped every job and
                // key. Two checks in a row, so the driver's own recovery is not mistaken
                // for it.
                stopped_checks = if status.contains(DeviceStatus::RUNNING) {
                    0
                } else {
                    stopped_checks + 1
                };
                let reason = if device.transport.is_lost() {
                    Some("the transport lost the device".to_string())
                } else if status.contains(DeviceStatus::FATAL) {
                    let code = FatalCode(device.transport.read32(regs::FATAL_CODE));
                    Some(format!("the device is fatal ({code:?})"))
                } else if stopped_checks >= 2 {
                    Some("the device stopped running (it was reset)".to_string())
                } else {
                    let beat = device.heartbeat();
                    if last_beat != Some(beat) {
                        last_beat = Some(beat);
                        beat_changed = Instant::now();
                        None
                    } else if beat_changed.elapsed() > HEARTBEAT_STALL {
                        Some(format!("the heartbeat stood still for {HEARTBEAT_STALL:?}"))
                    } else {
                        None
                    }
                };
                if let Some(reason) = reason {
                    tracing::error!(device = %name, %reason, "device lost");
                    device.lost.store(true, Ordering::Release);
                }
            }
        })
        .map(|_| ())
        .map_err(DeviceError::Thread)
}

/// Reads and checks the identity registers.
fn identify(t: &dyn Transport) -> Result<DeviceInfo, DeviceError> {
    let name = t.name();
    let magic = t.read32(regs::MAGIC);
    if magic != DEVICE_MAGIC {
        return Err(DeviceError::NotOurDevice { name, magic });
    }
    let version = t.read32(regs::VERSION);
    let (major, minor) = ((version >> 16) as u16, version as u16);
    if major != VERSION_MAJOR {
        return Err(DeviceError::Version { name, major, minor });
    }
    // The driver sizes its queue and key-slot tables from these registers: a value outside
    // the contract refuses the device (a clamp would hide a device that breaks the contract).
    let bounded = |bound: RegisterBound| {
        let value = t.read32(bound.offset);
        if bound.admits(value) {
            Ok(value)
        } else {
            Err(DeviceError::IdentityOutOfBounds {
                name: name.clone(),
                register: bound.name,
                value,
                bound,
            })
        }
    };
    let queues = bounded(regs::NUM_QUEUES_BOUND)?;
    let max_queue_entries = bounded(regs::MAX_QUEUE_ENTRIES_BOUND)?;
    let key_slots = bounded(regs::NUM_KEY_SLOTS_BOUND)?;
    let max_data_len = bounded(regs::MAX_DATA_LEN_BOUND)?;
    Ok(DeviceInfo {
        name,
        version: (major, minor),
        capabilities: Capabilities::from_bits_retain(t.read32(regs::CAPABILITIES)),
        queues,
        max_queue_entries,
        key_slots,
        max_data_len,
    })
}

/// Where a data queue index stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QueueIndex {
    Free,
    Taken,
    /// Its last queue was dropped while the device still held it (device incarnation
    /// `epoch`): it stays out of use until a reset, or the device would refuse the enable (or
    /// worse, still be using the old rings).
    Quarantined {
        epoch: u64,
    },
}

impl QueueIndex {
    fn is_free(self, epoch: u64) -> bool {
        match self {
            QueueIndex::Free => true,
            QueueIndex::Taken => false,
            QueueIndex::Quarantined { epoch: then } => then != epoch,
        }
    }
}

/// Returns a data queue index to the device when its queue pair is dropped.
#[derive(Debug)]
pub(crate) struct QueueLease {
    indices: Arc<Mutex<Vec<QueueIndex>>>,
    index: u32,
    /// Set when the queue is quarantined: the index waits for a reset.
    quarantined_in: Option<u64>,
}

impl QueueLease {
    /// The queue was dropped while the device of incarnation `epoch` still held it.
    pub(crate) fn quarantine(&mut self, epoch: u64) {
        self.quarantined_in = Some(epoch);
    }
}

impl Drop for QueueLease {
    fn drop(&mut self) {
        if let Some(slot) = self
            .indices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(self.index as usize)
        {
            *slot = match self.quarantined_in {
                Some(epoch) => QueueIndex::Quarantined { epoch },
                None => QueueIndex::Free,
            };
        }
    }
}

/// Key material for one slot. Zeroized on drop.
pub struct KeyMaterial {
    pub algorithm: AeadAlgorithm,
    pub protocol: RecordProtocol,
    pub direction: KeyDirection,
    /// The next record sequence number (TLS slots).
    pub sequence: u64,
    key: Zeroizing<Vec<u8>>,
    iv: Zeroizing<[u8; NONCE_LEN]>,
}

impl std::fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyMaterial")
            .field("algorithm", &self.algorithm)
            .field("protocol", &self.protocol)
            .field("direction", &self.direction)
            .field("sequence", &self.sequence)
            .finish_non_exhaustive()
    }
}

impl KeyMaterial {
    /// The key bytes, for the host's own copy of the key (a CPU context made from it).
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// The static IV.
    pub fn iv(&self) -> [u8; NONCE_LEN] {
        *self.iv
    }

    /// Key material for a TLS record slot (or a raw AEAD slot with `RecordProtocol::RAW`,
    /// `KeyDirection::ANY` and any IV).
    pub fn new(
        algorithm: AeadAlgorithm,
        protocol: RecordProtocol,
        direction: KeyDirection,
        key: &[u8],
        iv: [u8; NONCE_LEN],
        sequence: u64,
    ) -> Result<Self, DeviceError> {
        if algorithm.key_len() != Some(key.len()) {
            return Err(DeviceError::BadKey(
                "key length does not match the algorithm",
            ));
        }
        let raw = protocol == RecordProtocol::RAW;
        if raw != (direction == KeyDirection::ANY) {
            return Err(DeviceError::BadKey(
                "raw slots take direction ANY; record slots SEAL or OPEN",
            ));
        }
        Ok(Self {
            algorithm,
            protocol,
            direction,
            sequence,
            key: Zeroizing::new(key.to_vec()),
            iv: Zeroizing::new(iv),
        })
    }

    /// Key material for raw AEAD jobs.
    pub fn raw(algorithm: AeadAlgorithm, key: &[u8]) -> Result<Self, DeviceError> {
        Self::new(
            algorithm,
            RecordProtocol::RAW,
            KeyDirection::ANY,
            key,
            [0; NONCE_LEN],
            0,
        )
    }
}

/// A loaded key slot. Dropping it destroys (zeroizes) the slot on the device at once; its
/// index is reused only once every job naming it has completed or its queue was quiesced
/// (each job holds a [`SlotRef`]), so a descriptor the device fetches late can never run
/// under another connection's key. A job accepted after the destroy fails with `SLOT_EMPTY`.
pub struct KeySlot {
    device: Arc<Device>,
    slot: SlotRef,
    epoch: u64,
    algorithm: AeadAlgorithm,
    loaded: bool,
}

impl std::fmt::Debug for KeySlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySlot")
            .field("index", &self.slot.index())
            .field("algorithm", &self.algorithm)
            .finish()
    }
}

impl KeySlot {
    /// The slot number descriptors name.
    pub fn index(&self) -> u32 {
        self.slot.index()
    }

    /// A hold on the slot's index for a job that names it.
    pub fn slot_ref(&self) -> SlotRef {
        self.slot.clone()
    }

    /// The slot's algorithm.
    pub fn algorithm(&self) -> AeadAlgorithm {
        self.algorithm
    }

    /// Records that the device emptied the slot itself (a `KX_DERIVE` was accepted), so
    /// dropping the handle needs no `KEY_DESTROY` round trip.
    pub fn mark_emptied(&mut self) {
        self.loaded = false;
    }

    /// Records that the device may hold a key in this slot (a `KX_GENERATE` was sent), so
    /// dropping the handle destroys it.
    pub fn mark_filled(&mut self) {
        self.loaded = true;
    }

    /// True while the device incarnation that holds this slot is alive.
    pub fn is_live(&self) -> bool {
        self.epoch == self.device.epoch.load(Ordering::Acquire)
    }
}

impl Drop for KeySlot {
    fn drop(&mut self) {
        // A device known to be lost cannot be reached; whatever the slot held goes with it,
        // and the reset that brings the device back zeroizes every slot.
        if self.loaded && self.is_live() && !self.device.is_lost() {
            if let Err(error) = self.device.destroy_slot(self.slot.clone()) {
                // The slot may still hold a key: the device must be reset before the index
                // is reused or the key could outlive its owner.
                let index = self.slot.index();
                tracing::error!(slot = index, %error, "key slot destroy failed; resetting device");
                if let Err(error) = self.device.recover() {
                    tracing::error!(%error, "device reset after failed key destroy failed");
                }
            }
        }
        // The index goes back to the free list when the last job holding it is gone.
    }
}

/// A hold on a key slot index, carried by every job that names the slot. The index returns
/// to the device's free list only when its [`KeySlot`] and every job holding it are gone;
/// a queue that never gets the device's word that it let go quarantines it for good.
#[derive(Clone)]
pub struct SlotRef(Arc<SlotIndex>);

struct SlotIndex {
    index: u32,
    free: Option<Arc<Mutex<Vec<u32>>>>,
    quarantined: AtomicBool,
}

impl SlotRef {
    /// Names slot `index` without holding it: for tests of empty or invalid slots only.
    /// A job with an unheld slot must not name a slot someone else may load.
    pub fn unheld(index: u32) -> Self {
        SlotRef(Arc::new(SlotIndex {
            index,
            free: None,
            quarantined: AtomicBool::new(false),
        }))
    }

    /// The slot number.
    pub fn index(&self) -> u32 {
        self.0.index
    }

    /// Keeps the index from ever being reused.
    pub(crate) fn quarantine(&self) {
        self.0.quarantined.store(true, Ordering::Release);
    }
}

impl PartialEq for SlotRef {
    fn eq(&self, other: &Self) -> bool {
        self.index() == other.index()
    }
}

impl Eq for SlotRef {}

impl std::fmt::Debug for SlotRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SlotRef({})", self.index())
    }
}

impl Drop for SlotIndex {
    fn drop(&mut self) {
        if *self.quarantined.get_mut() {
            tracing::warn!(slot = self.index, "key slot index quarantined");
            return;
        }
        if let Some(free) = &self.free {
            free.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(self.index);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tlsaccel_abi::DEVICE_VERSION;

    use super::*;
    use crate::dma::{DmaRegion, Iova};
    use crate::transport::EventFd;

    /// A device that answers identity reads from a table and records every write: a stand-in
    /// for a hostile or broken card.
    #[derive(Debug)]
    struct FakeDevice {
        registers: HashMap<u64, u32>,
        writes: Mutex<Vec<(u64, u64)>>,
    }

    impl FakeDevice {
        /// A device whose identity is within the contract, with `register` set to `value`.
        fn with(register: u64, value: u32) -> Arc<Self> {
            let mut registers = HashMap::from([
                (regs::MAGIC, DEVICE_MAGIC),
                (regs::VERSION, DEVICE_VERSION),
                (regs::NUM_QUEUES, 8),
                (regs::MAX_QUEUE_ENTRIES, 4096),
                (regs::NUM_KEY_SLOTS, 1024),
                (regs::MAX_DATA_LEN, tlsaccel_abi::MAX_DATA_LEN),
            ]);
            registers.insert(register, value);
            Arc::new(Self {
                registers,
                writes: Mutex::new(Vec::new()),
            })
        }
    }

    impl crate::dma::DmaMapper for FakeDevice {
        fn map(&self, _: &Arc<DmaRegion>, _: Iova) -> Result<(), DmaError> {
            Ok(())
        }
        fn unmap(&self, _: Iova, _: usize) -> Result<(), DmaError> {
            Ok(())
        }
    }

    impl Transport for FakeDevice {
        fn name(&self) -> String {
            "fake".into()
        }
        fn read32(&self, offset: u64) -> u32 {
            self.registers.get(&offset).copied().unwrap_or(0)
        }
        fn write32(&self, offset: u64, value: u32) {
            self.write64(offset, value.into());
        }
        fn read64(&self, offset: u64) -> u64 {
            self.read32(offset).into()
        }
        fn write64(&self, offset: u64, value: u64) {
            self.writes.lock().unwrap().push((offset, value));
        }
        fn interrupt(&self, vector: u32) -> Result<Arc<EventFd>, TransportError> {
            Err(TransportError::NoSuchVector(vector))
        }
        fn reset(&self) -> Result<(), TransportError> {
            Ok(())
        }
    }

    #[test]
    fn an_identity_within_the_contract_is_accepted() {
        let device = FakeDevice::with(regs::NUM_KEY_SLOTS, tlsaccel_abi::MAX_KEY_SLOTS);
        let info = DeviceInfo::probe(device.as_ref()).unwrap();
        assert_eq!(
            (info.queues, info.max_queue_entries, info.key_slots),
            (8, 4096, tlsaccel_abi::MAX_KEY_SLOTS)
        );
    }

    #[test]
    fn identity_registers_outside_the_contract_refuse_the_device_before_it_is_touched() {
        let hostile = [
            (regs::NUM_KEY_SLOTS, u32::MAX, "NUM_KEY_SLOTS", "1..=65536"),
            (regs::NUM_KEY_SLOTS, 65_537, "NUM_KEY_SLOTS", "1..=65536"),
            (regs::NUM_KEY_SLOTS, 0, "NUM_KEY_SLOTS", "1..=65536"),
            (regs::NUM_QUEUES, 0, "NUM_QUEUES", "1..=64"),
            (regs::NUM_QUEUES, 65, "NUM_QUEUES", "1..=64"),
            (
                regs::MAX_QUEUE_ENTRIES,
                8192,
                "MAX_QUEUE_ENTRIES",
                "a power of two in 2..=4096",
            ),
            (
                regs::MAX_QUEUE_ENTRIES,
                1000,
                "MAX_QUEUE_ENTRIES",
                "a power of two in 2..=4096",
            ),
            (regs::MAX_DATA_LEN, 0, "MAX_DATA_LEN", "16645..=66048"),
            (
                regs::MAX_DATA_LEN,
                u32::MAX,
                "MAX_DATA_LEN",
                "16645..=66048",
            ),
        ];
        for (offset, value, register, bound) in hostile {
            let device = FakeDevice::with(offset, value);
            let error = Device::with_transport(
                Arc::clone(&device) as Arc<dyn Transport>,
                DeviceOptions::default(),
            )
            .unwrap_err();
            let DeviceError::IdentityOutOfBounds {
                register: named,
                value: read,
                ..
            } = &error
            else {
                panic!("{register} = {value}: unexpected error {error}");
            };
            assert_eq!((*named, *read), (register, value));
            assert_eq!(
                error.to_string(),
                format!(
                    "fake: identity register {register} reads {value}; the contract allows \
                     {bound}, so the device is refused"
                )
            );
            // Refused at identification: never reset, enabled or given a queue.
            assert!(device.writes.lock().unwrap().is_empty(), "{register}");
            assert!(matches!(
                DeviceInfo::probe(device.as_ref()),
                Err(DeviceError::IdentityOutOfBounds { .. })
            ));
        }
    }

    #[cfg(feature = "sim")]
    #[test]
    fn the_simulator_cannot_be_configured_outside_the_contract() {
        let error = Device::open("sim:key-slots=65537").unwrap_err();
        assert!(
            matches!(
                &error,
                DeviceError::Transport(TransportError::Simulator(
                    tlsaccel_sim::ConfigError::KeySlots(65_537)
                ))
            ),
            "{error}"
        );
    }
}
