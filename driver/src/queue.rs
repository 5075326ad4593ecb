//! A queue pair: the submission ring the driver fills and the completion ring the device
//! fills, with one doorbell per burst and completions found by phase tag in memory.
//!
//! The device is not trusted: every completion is checked against the table of jobs in
//! flight (cookie with a generation, so a stale or invented cookie is caught) and against the
//! result lengths the job can produce.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tlsaccel_abi::regs::{self, queue as qreg};
use tlsaccel_abi::{
    tls12_record_len, tls13_record_len, AeadAlgorithm, Completion, CompletionFlags, Descriptor,
    HashAlgorithm, Opcode, PrivateKeyType, QueueControl, QueueErrorCode, QueueStatus, RsaPadding,
    SealParams, Status, COMPLETION_SIZE, COMPLETION_STATUS_WORD, DESCRIPTOR_SIZE, KEY_BLOCK_SIZE,
    NONCE_LEN, TAG_LEN, TLS_HEADER_LEN, TLS_MAX_PLAINTEXT,
};
use zerocopy::{FromBytes, IntoBytes};

use crate::device::{QueueLease, SlotRef};
use crate::dma::{DmaBuffer, DmaError, DmaPool, DmaSpan};
use crate::events::{DeviceEvents, LogLimit};
use crate::transport::{EventFd, Transport, TransportError};

/// Errors of a queue pair.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("ring size {0} is not a power of two between 2 and the device maximum")]
    BadSize(u32),
    #[error("could not allocate ring memory")]
    Memory(#[from] DmaError),
    #[error("the device refused to enable queue {queue}: {code:?}")]
    EnableFailed { queue: u32, code: QueueErrorCode },
    #[error("queue {0} has stopped and must be recreated (device reset or timeout)")]
    Broken(u32),
    #[error("could not set up the queue's interrupt")]
    Interrupt(#[from] TransportError),
}

/// A job for the device. Its spans and slot reference are holds: the queue keeps a copy of the
/// job until the device has answered it or has let go of the queue, so neither the memory nor
/// the slot index can be handed to anyone else while the device may still use them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOp {
    Nop,
    KeyLoad {
        slot: SlotRef,
        block: DmaSpan,
    },
    KeyDestroy {
        slot: SlotRef,
    },
    AeadSeal {
        slot: SlotRef,
        nonce: [u8; NONCE_LEN],
        aad: Option<DmaSpan>,
        src: DmaSpan,
        dst: DmaSpan,
    },
    AeadOpen {
        slot: SlotRef,
        nonce: [u8; NONCE_LEN],
        aad: Option<DmaSpan>,
        src: DmaSpan,
        dst: DmaSpan,
    },
    Tls13Seal {
        slot: SlotRef,
        content_type: u8,
        padding: u16,
        src: DmaSpan,
        dst: DmaSpan,
    },
    Tls13Open {
        slot: SlotRef,
        src: DmaSpan,
        dst: DmaSpan,
    },
    Tls12Seal {
        slot: SlotRef,
        algorithm: AeadAlgorithm,
        content_type: u8,
        src: DmaSpan,
        dst: DmaSpan,
    },
    Tls12Open {
        slot: SlotRef,
        algorithm: AeadAlgorithm,
        src: DmaSpan,
        dst: DmaSpan,
    },
    /// Load a private key (PKCS#8 DER for signing keys, raw for key exchange).
    PkeKeyLoad {
        slot: SlotRef,
        kind: PrivateKeyType,
        src: DmaSpan,
    },
    /// ECDSA-sign a digest (of the curve's hash); the DER signature goes to `dst`.
    EcdsaSign {
        slot: SlotRef,
        digest: DmaSpan,
        dst: DmaSpan,
    },
    /// RSA-sign a digest with the given padding.
    RsaSign {
        slot: SlotRef,
        padding: RsaPadding,
        hash: HashAlgorithm,
        digest: DmaSpan,
        dst: DmaSpan,
    },
    /// Generate a key-exchange key pair into `slot`; its public key goes to `dst`.
    KxGenerate {
        slot: SlotRef,
        kind: PrivateKeyType,
        dst: DmaSpan,
    },
    /// Derive the shared secret with `peer`'s public key; empties `slot`.
    KxDerive {
        slot: SlotRef,
        peer: DmaSpan,
        dst: DmaSpan,
    },
    /// A descriptor exactly as given (its cookie is replaced). For conformance tests of
    /// hostile descriptors: it holds no memory and no slot, so it must name only addresses
    /// and slots no one else owns.
    Raw(Descriptor),
}

/// A job and the caller's tag for it, returned with its completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub user_data: u64,
    pub op: JobOp,
}

/// What a successful job produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobOutput {
    /// Bytes written to the job's `dst`.
    pub len: u32,
    /// The record content type, for TLS opens.
    pub content_type: u8,
    /// The job consumed a record sequence number of its slot.
    pub sequence_advanced: bool,
}

/// Why a job did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    #[error("the device reported {status}")]
    Device {
        status: Status,
        sequence_advanced: bool,
    },
    #[error("the device wrote an impossible completion ({0})")]
    BadCompletion(&'static str),
    #[error("the job did not complete within its timeout")]
    TimedOut,
    #[error("the device was reset or lost before the job completed")]
    DeviceLost,
}

impl JobError {
    /// The device status, when the device reported one.
    pub fn status(&self) -> Option<Status> {
        match self {
            JobError::Device { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A finished job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobCompletion {
    pub user_data: u64,
    pub result: Result<JobOutput, JobError>,
}

/// What the driver expects a job's completion to say, checked when it arrives.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// `result_len` must be exactly this.
    Exact(u32),
    /// `result_len` must be at most this; a TLS open must also report a content type.
    AtMost { max: u32, content_type: bool },
}

/// Whether a job's completion may say it consumed a record sequence number (device-spec §4.4
/// and §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sequence {
    /// Not a record job: never.
    Never,
    /// A TLS record job: exactly when the status says the job was accepted.
    Record,
    /// A raw descriptor: whatever it is, the flag is not checked.
    Unchecked,
}

impl Sequence {
    fn of(op: &JobOp) -> Self {
        match op {
            JobOp::Tls13Seal { .. }
            | JobOp::Tls13Open { .. }
            | JobOp::Tls12Seal { .. }
            | JobOp::Tls12Open { .. } => Sequence::Record,
            JobOp::Raw(_) => Sequence::Unchecked,
            _ => Sequence::Never,
        }
    }

    /// True when `advanced` fits `status` for a job of this kind.
    fn allows(self, status: Status, advanced: bool) -> bool {
        match self {
            Sequence::Unchecked => true,
            Sequence::Never => !advanced,
            Sequence::Record => match status {
                Status::OK
                | Status::AUTH_FAILED
                | Status::RECORD_MALFORMED
                | Status::RECORD_OVERFLOW => advanced,
                // At validation (no number taken) or during execution (one taken).
                Status::DMA_FAULT => true,
                _ => !advanced,
            },
        }
    }
}

#[derive(Debug)]
struct InFlight {
    generation: u32,
    user_data: u64,
    expect: Expect,
    /// The most bytes the job's `dst` can take: no result may claim more.
    dst_len: u32,
    sequence: Sequence,
    submitted: Instant,
    /// The job itself: its spans and slot reference hold memory and a slot index for the
    /// device until the job completes or the device lets go of the queue.
    op: JobOp,
}

/// Counters of one queue pair.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub submitted: u64,
    pub completed: u64,
    pub doorbells: u64,
    /// Completions whose cookie matched no job in flight (ignored).
    pub unknown_cookies: u64,
    /// Completions with an impossible length or status (the job failed).
    pub bad_completions: u64,
    pub timeouts: u64,
}

/// One queue pair, driven by one thread at a time (`&mut self`).
pub struct QueuePair {
    index: u32,
    transport: Arc<dyn Transport>,
    sq: DmaBuffer,
    cq: DmaBuffer,
    size: u32,
    sq_tail: u32,
    cq_head: u32,
    phase: bool,
    slots: Vec<Option<InFlight>>,
    free: Vec<u32>,
    /// Jobs already failed to their callers (timeout, lost device) whose descriptors the
    /// device may still act on: held until the device lets go of the queue (disable
    /// acknowledged, or a reset), and quarantined if it never does.
    held: Vec<JobOp>,
    /// Set once the queue has been disabled to let go of `held`.
    disabled: bool,
    generation: u32,
    outstanding: u32,
    broken: bool,
    interrupt: Option<Arc<EventFd>>,
    stats: QueueStats,
    /// The device incarnation this queue belongs to, and the counter that says which is live.
    epoch: Option<(Arc<AtomicU64>, u64)>,
    /// Set by the device's health watch when the device is gone.
    lost: Option<Arc<AtomicBool>>,
    /// The device's event counters, shared by all its queues.
    events: Arc<DeviceEvents>,
    /// How often device-triggered warnings reach the log.
    log_limit: LogLimit,
    lease: Option<QueueLease>,
}

impl std::fmt::Debug for QueuePair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuePair")
            .field("index", &self.index)
            .field("size", &self.size)
            .field("outstanding", &self.outstanding)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

/// Settings of a queue pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// Entries per ring (a power of two).
    pub size: u32,
    /// Use an interrupt eventfd (needed by the async API); polling works either way.
    pub interrupts: bool,
    /// Interrupt after this many completions...
    pub coalesce_count: u32,
    /// ...or this long after the first pending one.
    pub coalesce_usecs: u32,
    /// A public-key queue, served by the device's public-key engines.
    pub public_key: bool,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            size: 1024,
            interrupts: false,
            coalesce_count: 16,
            coalesce_usecs: 20,
            public_key: false,
        }
    }
}

impl QueuePair {
    /// Allocates the rings and enables queue `index` on the device.
    pub(crate) fn create(
        transport: Arc<dyn Transport>,
        pool: &DmaPool,
        index: u32,
        config: QueueConfig,
        max_entries: u32,
    ) -> Result<Self, QueueError> {
        let size = config.size;
        if !size.is_power_of_two() || !(2..=max_entries).contains(&size) {
            return Err(QueueError::BadSize(size));
        }
        let sq = pool.alloc((size as usize * DESCRIPTOR_SIZE).max(4096))?;
        let cq = pool.alloc((size as usize * COMPLETION_SIZE).max(4096))?;
        let reg = |r| regs::queue_reg(index, r);
        transport.write32(reg(qreg::CONTROL), 0);
        transport.write64(reg(qreg::SQ_BASE), sq.iova().0);
        transport.write64(reg(qreg::CQ_BASE), cq.iova().0);
        transport.write32(reg(qreg::SIZE), size);
        transport.write32(reg(qreg::IRQ_COALESCE_COUNT), config.coalesce_count);
        transport.write32(reg(qreg::IRQ_COALESCE_USECS), config.coalesce_usecs);
        let interrupt = if config.interrupts {
            let fd = transport.interrupt(index)?;
            // Signals left from an earlier user of this vector mean nothing now.
            fd.drain();
            Some(fd)
        } else {
            None
        };
        let mut control = QueueControl::ENABLE;
        control.set(QueueControl::IRQ_ENABLE, config.interrupts);
        control.set(QueueControl::PUBLIC_KEY, config.public_key);
        transport.write32(reg(qreg::CONTROL), control.bits());
        let raw = transport.read32(reg(qreg::STATUS));
        if raw == u32::MAX || transport.is_lost() {
            // All-ones is what a device that is gone reads as, not an enabled queue.
            return Err(QueueError::Broken(index));
        }
        let status = QueueStatus::from_bits_retain(raw);
        // ENABLED with ERROR is a refusal too: the device still holds an earlier incarnation
        // of the queue (BAD_CONFIG, device-spec §3.1).
        if !status.contains(QueueStatus::ENABLED) || status.contains(QueueStatus::ERROR) {
            let code = QueueErrorCode(transport.read32(reg(qreg::ERROR)));
            return Err(QueueError::EnableFailed { queue: index, code });
        }
        Ok(Self {
            index,
            transport,
            sq,
            cq,
            size,
            sq_tail: 0,
            cq_head: 0,
            phase: true,
            slots: std::iter::repeat_with(|| None)
                .take(size as usize)
                .collect(),
            free: (0..size).rev().collect(),
            held: Vec::new(),
            disabled: false,
            generation: 0,
            outstanding: 0,
            broken: false,
            interrupt,
            stats: QueueStats::default(),
            epoch: None,
            lost: None,
            events: Arc::default(),
            log_limit: LogLimit::new(DEVICE_LOG_PERIOD, DEVICE_LOG_BURST),
            lease: None,
        })
    }

    pub(crate) fn with_epoch(mut self, epoch: Arc<AtomicU64>) -> Self {
        let current = epoch.load(Ordering::Acquire);
        self.epoch = Some((epoch, current));
        self
    }

    pub(crate) fn with_lost_flag(mut self, lost: Arc<AtomicBool>) -> Self {
        self.lost = Some(lost);
        self
    }

    pub(crate) fn with_events(mut self, events: Arc<DeviceEvents>) -> Self {
        self.events = events;
        self
    }

    pub(crate) fn with_lease(mut self, lease: QueueLease) -> Self {
        self.lease = Some(lease);
        self
    }

    /// True when the device was reset after this queue was created.
    fn device_was_reset(&self) -> bool {
        self.epoch
            .as_ref()
            .is_some_and(|(live, mine)| live.load(Ordering::Acquire) != *mine)
    }

    /// The queue's index on the device.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Entries per ring.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Jobs submitted and not yet completed.
    pub fn outstanding(&self) -> u32 {
        self.outstanding
    }

    /// Jobs that can be submitted before the ring is full.
    pub fn free_slots(&self) -> u32 {
        self.size - 1 - self.outstanding
    }

    /// The queue's counters.
    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    /// The interrupt eventfd, when the queue was created with interrupts.
    pub fn interrupt(&self) -> Option<&Arc<EventFd>> {
        self.interrupt.as_ref()
    }

    /// True once the queue has stopped (device reset, timeout, queue error).
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Writes as many of `jobs` as fit into the submission ring and rings the doorbell once.
    /// Returns how many were taken; the rest must be submitted again after completions have
    /// been polled (nothing is dropped).
    pub fn submit(&mut self, jobs: &[Job]) -> Result<usize, QueueError> {
        if self.broken || self.device_was_reset() {
            self.broken = true;
            return Err(QueueError::Broken(self.index));
        }
        let count = jobs.len().min(self.free_slots() as usize);
        if count == 0 {
            return Ok(0);
        }
        let now = Instant::now();
        for job in &jobs[..count] {
            let slot = self
                .free
                .pop()
                .expect("free_slots() counted a free cookie slot for every job taken");
            self.generation = self.generation.wrapping_add(1);
            let cookie = u64::from(self.generation) << 32 | u64::from(slot);
            let (descriptor, expect) = encode(&job.op, cookie);
            self.slots[slot as usize] = Some(InFlight {
                generation: self.generation,
                user_data: job.user_data,
                expect,
                dst_len: dst_len(&job.op),
                sequence: Sequence::of(&job.op),
                submitted: now,
                op: job.op.clone(),
            });
            self.sq.write_streaming(
                self.sq_tail as usize * DESCRIPTOR_SIZE,
                descriptor.as_bytes(),
            )?;
            self.sq_tail = (self.sq_tail + 1) & (self.size - 1);
        }
        self.outstanding += count as u32;
        self.stats.submitted += count as u64;
        // The descriptor stores above must be visible to the device before it sees the new
        // tail. They are non-temporal, which x86-64 does not order with later stores, so an
        // sfence (plus a release fence for the compiler) comes before the doorbell write.
        crate::dma::store_fence();
        self.transport
            .write32(regs::doorbell(self.index, regs::DB_SQ_TAIL), self.sq_tail);
        self.stats.doorbells += 1;
        Ok(count)
    }

    /// True when the device has posted a completion that `poll` would take: one acquire load
    /// of the next entry's phase, no MMIO.
    pub fn has_completion(&self) -> bool {
        let at = self.cq_head as usize * COMPLETION_SIZE + COMPLETION_STATUS_WORD;
        self.cq.load_u32_acquire(at).is_ok_and(|word| {
            Completion::flags_of_status_word(word).contains(CompletionFlags::PHASE) == self.phase
        })
    }

    /// Takes the completions the device has posted (at most one ring's worth), checks each,
    /// and hands it to `sink`. Rings the completion-head doorbell once if anything was taken.
    /// Returns the count.
    pub fn poll(&mut self, mut sink: impl FnMut(JobCompletion)) -> usize {
        if self.device_was_reset() {
            return self.fail_all(JobError::DeviceLost, sink);
        }
        if self.disabled {
            // Disabled to let go of failed jobs: nothing more will complete.
            self.release_held();
            return 0;
        }
        let mut taken = 0;
        // At most one ring's worth per call: a device that keeps writing entries cannot keep
        // the caller here forever.
        for _ in 0..self.size {
            let at = self.cq_head as usize * COMPLETION_SIZE;
            let Ok(word) = self.cq.load_u32_acquire(at + COMPLETION_STATUS_WORD) else {
                break;
            };
            let flags = Completion::flags_of_status_word(word);
            if flags.contains(CompletionFlags::PHASE) != self.phase {
                break;
            }
            let mut raw = [0u8; COMPLETION_SIZE];
            if self
                .cq
                .read(at, &mut raw[..COMPLETION_STATUS_WORD])
                .is_err()
            {
                break;
            }
            raw[COMPLETION_STATUS_WORD..].copy_from_slice(&word.to_le_bytes());
            let entry = Completion::read_from_bytes(&raw).unwrap_or_default();
            self.cq_head = (self.cq_head + 1) & (self.size - 1);
            if self.cq_head == 0 {
                self.phase = !self.phase;
            }
            taken += 1;
            if let Some(done) = self.check(&entry) {
                self.stats.completed += 1;
                sink(done);
            }
        }
        if taken > 0 {
            self.transport
                .write32(regs::doorbell(self.index, regs::DB_CQ_HEAD), self.cq_head);
        } else if self.outstanding > 0
            && self
                .lost
                .as_ref()
                .is_some_and(|l| l.load(Ordering::Acquire))
        {
            // Nothing will ever complete: fail what is in flight now rather than at timeout.
            return self.fail_all(JobError::DeviceLost, sink);
        }
        taken
    }

    /// Matches a completion entry to its job and checks what it claims.
    fn check(&mut self, entry: &Completion) -> Option<JobCompletion> {
        let cookie = entry.cookie.get();
        let slot = (cookie & 0xffff_ffff) as u32;
        let generation = (cookie >> 32) as u32;
        let known = self
            .slots
            .get(slot as usize)
            .and_then(Option::as_ref)
            .is_some_and(|job| job.generation == generation);
        let Some(job) = known.then(|| self.slots[slot as usize].take()).flatten() else {
            self.stats.unknown_cookies += 1;
            DeviceEvents::count(&self.events.unknown_cookies, 1);
            if let Some(suppressed) = self.log_limit.admit(Instant::now()) {
                tracing::warn!(
                    queue = self.index,
                    cookie,
                    suppressed,
                    "completion with unknown cookie ignored"
                );
            }
            return None;
        };
        self.free.push(slot);
        self.outstanding -= 1;
        let status = Status(entry.status.get());
        let flags = CompletionFlags::from_bits_retain(entry.flags);
        let sequence_advanced = flags.contains(CompletionFlags::SEQUENCE_ADVANCED);
        let len = entry.result_len.get();
        let result = if !status.is_known() {
            Err(JobError::BadCompletion("unknown status"))
        } else if !job.sequence.allows(status, sequence_advanced) {
            Err(JobError::BadCompletion(
                "sequence flag inconsistent with the status",
            ))
        } else if len > job.dst_len {
            Err(JobError::BadCompletion(
                "result length larger than the job's destination",
            ))
        } else if !status.is_ok() {
            if len != 0 {
                Err(JobError::BadCompletion(
                    "failed job reports a result length",
                ))
            } else {
                Err(JobError::Device {
                    status,
                    sequence_advanced,
                })
            }
        } else {
            let fits = match job.expect {
                Expect::Exact(n) => len == n,
                Expect::AtMost { max, content_type } => {
                    len <= max && (!content_type || entry.info != 0)
                }
            };
            if fits {
                Ok(JobOutput {
                    len,
                    content_type: entry.info,
                    sequence_advanced,
                })
            } else {
                Err(JobError::BadCompletion(
                    "result length the job cannot produce",
                ))
            }
        };
        if matches!(result, Err(JobError::BadCompletion(_))) {
            self.stats.bad_completions += 1;
            DeviceEvents::count(&self.events.bad_completions, 1);
            if let Some(suppressed) = self.log_limit.admit(Instant::now()) {
                tracing::warn!(
                    queue = self.index,
                    cookie,
                    len,
                    ?status,
                    suppressed,
                    "impossible completion"
                );
            }
        }
        Some(JobCompletion {
            user_data: job.user_data,
            result,
        })
    }

    /// Fails every job submitted longer than `timeout` ago and stops the queue: the device
    /// may still hold those descriptors, so the ring cannot be trusted until it is recreated.
    pub fn expire(&mut self, timeout: Duration, mut sink: impl FnMut(JobCompletion)) -> usize {
        let now = Instant::now();
        let late = self
            .slots
            .iter()
            .flatten()
            .any(|job| now.duration_since(job.submitted) >= timeout);
        if !late {
            return 0;
        }
        self.stats.timeouts += 1;
        DeviceEvents::count(&self.events.timeouts, 1);
        self.fail_all(JobError::TimedOut, &mut sink)
    }

    /// Fails every job in flight with `error` and marks the queue broken. The jobs' memory
    /// and key slots stay held until the device lets go of the queue: this disables the
    /// queue, and [`QueuePair::release_held`] (called by `poll`) gives them back once the
    /// device confirms (Q_STATUS.ENABLED reads 0, device-spec §3.1) or was reset.
    pub fn fail_all(&mut self, error: JobError, mut sink: impl FnMut(JobCompletion)) -> usize {
        self.broken = true;
        let mut failed = 0;
        for (index, slot) in self.slots.iter_mut().enumerate() {
            if let Some(job) = slot.take() {
                self.free.push(index as u32);
                self.held.push(job.op);
                failed += 1;
                sink(JobCompletion {
                    user_data: job.user_data,
                    result: Err(error),
                });
            }
        }
        self.outstanding = 0;
        self.release_held();
        failed
    }

    /// Jobs failed to their callers whose memory and slots the queue still holds because
    /// the device has not let go of the queue yet.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Gives back the memory and slots of failed jobs once the device has let go of the
    /// queue; disables the queue first if that has not been done. Never waits. Returns true
    /// when nothing is held any more.
    pub fn release_held(&mut self) -> bool {
        if self.held.is_empty() {
            return true;
        }
        if self.device_was_reset() {
            // A reset drops every job without a completion and the device reported READY
            // only after its engines let go (device-spec §8).
            self.held.clear();
            return true;
        }
        if !self.disabled {
            self.transport
                .write32(regs::queue_reg(self.index, qreg::CONTROL), 0);
            self.disabled = true;
        }
        if self.device_released_queue() {
            self.held.clear();
            return true;
        }
        false
    }

    /// True when the device says it has made its last access to this queue: Q_STATUS.ENABLED
    /// reads 0 after a disable. A lost device's registers say nothing (a device marked lost
    /// may still be writing memory), so never for a lost transport.
    fn device_released_queue(&self) -> bool {
        if self.transport.is_lost()
            || self
                .lost
                .as_ref()
                .is_some_and(|l| l.load(Ordering::Acquire))
        {
            return false;
        }
        let status = self
            .transport
            .read32(regs::queue_reg(self.index, qreg::STATUS));
        // A missing device reads all-ones, which must not look like "released".
        status != u32::MAX && !QueueStatus::from_bits_retain(status).contains(QueueStatus::ENABLED)
    }

    /// Submits `jobs` and polls until every one of them has completed, or `timeout` passes
    /// (then the rest fail with `TimedOut` and the queue is stopped). Completions arrive in
    /// `sink` in device order.
    pub fn run(
        &mut self,
        jobs: &[Job],
        timeout: Duration,
        mut sink: impl FnMut(JobCompletion),
    ) -> Result<(), QueueError> {
        let start = Instant::now();
        let target = self.stats.completed + jobs.len() as u64;
        let mut next = 0;
        let mut spins = 0u32;
        while next < jobs.len() || self.stats.completed < target {
            if next < jobs.len() {
                next += self.submit(&jobs[next..])?;
            }
            if self.poll(&mut sink) == 0 {
                spins += 1;
                if spins.is_multiple_of(64) {
                    if start.elapsed() >= timeout {
                        self.stats.timeouts += 1;
                        DeviceEvents::count(&self.events.timeouts, 1);
                        self.fail_all(JobError::TimedOut, &mut sink);
                        return Ok(());
                    }
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            } else {
                spins = 0;
            }
            if self.broken {
                return Err(QueueError::Broken(self.index));
            }
        }
        Ok(())
    }
}

/// At most `DEVICE_LOG_BURST` device-triggered warnings per queue every `DEVICE_LOG_PERIOD`.
const DEVICE_LOG_PERIOD: Duration = Duration::from_secs(10);
const DEVICE_LOG_BURST: u32 = 5;

/// How long a disabled queue may take to release its rings.
const QUIESCE_TIMEOUT: Duration = Duration::from_millis(100);

impl Drop for QueuePair {
    fn drop(&mut self) {
        // Whatever is still in flight is held like failed jobs: only the device's word (or a
        // reset) gives its memory and slots back.
        for slot in &mut self.slots {
            if let Some(job) = slot.take() {
                self.held.push(job.op);
            }
        }
        if self.device_was_reset() {
            return;
        }
        // Disable the queue, and wait for the device to let go of its rings and job buffers
        // (Q_STATUS ENABLED clears once no access is under way, device-spec §3.1) before they
        // go back to the pool. A device that does not confirm in time, or is lost (a device
        // marked lost may still write memory), keeps them: rings, buffers and slot indices
        // are quarantined, never reused.
        self.transport
            .write32(regs::queue_reg(self.index, qreg::CONTROL), 0);
        self.disabled = true;
        let deadline = Instant::now() + QUIESCE_TIMEOUT;
        loop {
            if self.device_released_queue() {
                return;
            }
            let lost = self.transport.is_lost()
                || self
                    .lost
                    .as_ref()
                    .is_some_and(|l| l.load(Ordering::Acquire));
            if lost || Instant::now() > deadline {
                tracing::error!(
                    queue = self.index,
                    held = self.held.len(),
                    lost,
                    "device did not release a disabled queue; its rings, job buffers and key slots are quarantined"
                );
                self.sq.quarantine();
                self.cq.quarantine();
                if let (Some(lease), Some((_, epoch))) = (self.lease.as_mut(), self.epoch.as_ref())
                {
                    lease.quarantine(*epoch);
                }
                DeviceEvents::count(&self.events.quarantined_jobs, self.held.len() as u64);
                for op in self.held.drain(..) {
                    quarantine(&op);
                }
                return;
            }
            std::thread::sleep(Duration::from_micros(20));
        }
    }
}

/// The length of a job's destination: the most a completion may say it wrote.
fn dst_len(op: &JobOp) -> u32 {
    match op {
        JobOp::Nop
        | JobOp::KeyLoad { .. }
        | JobOp::KeyDestroy { .. }
        | JobOp::PkeKeyLoad { .. } => 0,
        JobOp::AeadSeal { dst, .. }
        | JobOp::AeadOpen { dst, .. }
        | JobOp::Tls13Seal { dst, .. }
        | JobOp::Tls13Open { dst, .. }
        | JobOp::Tls12Seal { dst, .. }
        | JobOp::Tls12Open { dst, .. }
        | JobOp::EcdsaSign { dst, .. }
        | JobOp::RsaSign { dst, .. }
        | JobOp::KxGenerate { dst, .. }
        | JobOp::KxDerive { dst, .. } => dst.len(),
        JobOp::Raw(raw) => raw.dst_len.get(),
    }
}

/// Keeps the memory and the slot a job names from ever being reused.
fn quarantine(op: &JobOp) {
    let (slot, spans) = op.holds();
    if let Some(slot) = slot {
        slot.quarantine();
    }
    for span in spans.into_iter().flatten() {
        span.quarantine();
    }
}

impl JobOp {
    /// The slot and the spans the job holds.
    fn holds(&self) -> (Option<&SlotRef>, [Option<&DmaSpan>; 3]) {
        match self {
            JobOp::Nop | JobOp::Raw(_) => (None, [None; 3]),
            JobOp::KeyLoad { slot, block } => (Some(slot), [Some(block), None, None]),
            JobOp::KeyDestroy { slot } => (Some(slot), [None; 3]),
            JobOp::AeadSeal {
                slot,
                aad,
                src,
                dst,
                ..
            }
            | JobOp::AeadOpen {
                slot,
                aad,
                src,
                dst,
                ..
            } => (Some(slot), [aad.as_ref(), Some(src), Some(dst)]),
            JobOp::Tls13Seal { slot, src, dst, .. }
            | JobOp::Tls13Open { slot, src, dst }
            | JobOp::Tls12Seal { slot, src, dst, .. }
            | JobOp::Tls12Open { slot, src, dst, .. } => (Some(slot), [Some(src), Some(dst), None]),
            JobOp::PkeKeyLoad { slot, src, .. } => (Some(slot), [Some(src), None, None]),
            JobOp::EcdsaSign { slot, digest, dst }
            | JobOp::RsaSign {
                slot, digest, dst, ..
            } => (Some(slot), [Some(digest), Some(dst), None]),
            JobOp::KxGenerate { slot, dst, .. } => (Some(slot), [Some(dst), None, None]),
            JobOp::KxDerive { slot, peer, dst } => (Some(slot), [Some(peer), Some(dst), None]),
        }
    }
}

/// Builds the descriptor for `op` and what its completion must look like.
fn encode(op: &JobOp, cookie: u64) -> (Descriptor, Expect) {
    let mut d = Descriptor {
        cookie: cookie.into(),
        ..Descriptor::default()
    };
    let set_io = |d: &mut Descriptor, slot: &SlotRef, src: &DmaSpan, dst: &DmaSpan| {
        d.key_slot = slot.index().into();
        d.src_iova = src.iova().0.into();
        d.src_len = src.len().into();
        d.dst_iova = dst.iova().0.into();
        d.dst_len = dst.len().into();
    };
    let src_minus = |src: &DmaSpan, n: usize| src.len().saturating_sub(n as u32);
    let expect = match op {
        JobOp::Nop => {
            d.opcode = Opcode::NOP.0;
            Expect::Exact(0)
        }
        JobOp::KeyLoad { slot, block } => {
            d.opcode = Opcode::KEY_LOAD.0;
            d.key_slot = slot.index().into();
            d.src_iova = block.iova().0.into();
            d.src_len = (KEY_BLOCK_SIZE as u32).into();
            Expect::Exact(0)
        }
        JobOp::KeyDestroy { slot } => {
            d.opcode = Opcode::KEY_DESTROY.0;
            d.key_slot = slot.index().into();
            Expect::Exact(0)
        }
        JobOp::AeadSeal {
            slot,
            nonce,
            aad,
            src,
            dst,
        }
        | JobOp::AeadOpen {
            slot,
            nonce,
            aad,
            src,
            dst,
        } => {
            let seal = matches!(op, JobOp::AeadSeal { .. });
            d.opcode = if seal {
                Opcode::AEAD_SEAL.0
            } else {
                Opcode::AEAD_OPEN.0
            };
            set_io(&mut d, slot, src, dst);
            d.param = *nonce;
            if let Some(aad) = aad {
                d.aad_iova = aad.iova().0.into();
                d.aad_len = aad.len().into();
            }
            if seal {
                Expect::Exact(src.len().saturating_add(TAG_LEN as u32))
            } else {
                Expect::Exact(src_minus(src, TAG_LEN))
            }
        }
        JobOp::Tls13Seal {
            slot,
            content_type,
            padding,
            src,
            dst,
        } => {
            d.opcode = Opcode::TLS13_SEAL.0;
            set_io(&mut d, slot, src, dst);
            d.param = SealParams {
                content_type: *content_type,
                padding: *padding,
            }
            .encode();
            Expect::Exact(tls13_record_len(src.len() as usize, usize::from(*padding)) as u32)
        }
        JobOp::Tls13Open { slot, src, dst } => {
            d.opcode = Opcode::TLS13_OPEN.0;
            set_io(&mut d, slot, src, dst);
            Expect::AtMost {
                max: src_minus(src, TLS_HEADER_LEN + TAG_LEN + 1).min(TLS_MAX_PLAINTEXT as u32),
                content_type: true,
            }
        }
        JobOp::Tls12Seal {
            slot,
            algorithm,
            content_type,
            src,
            dst,
        } => {
            d.opcode = Opcode::TLS12_SEAL.0;
            set_io(&mut d, slot, src, dst);
            d.param = SealParams {
                content_type: *content_type,
                padding: 0,
            }
            .encode();
            Expect::Exact(tls12_record_len(*algorithm, src.len() as usize) as u32)
        }
        JobOp::Tls12Open {
            slot,
            algorithm,
            src,
            dst,
        } => {
            d.opcode = Opcode::TLS12_OPEN.0;
            set_io(&mut d, slot, src, dst);
            let overhead = TLS_HEADER_LEN + algorithm.tls12_explicit_nonce_len() + TAG_LEN;
            Expect::AtMost {
                max: src_minus(src, overhead).min(TLS_MAX_PLAINTEXT as u32),
                content_type: true,
            }
        }
        JobOp::PkeKeyLoad { slot, kind, src } => {
            d.opcode = Opcode::PKE_KEY_LOAD.0;
            d.key_slot = slot.index().into();
            d.src_iova = src.iova().0.into();
            d.src_len = src.len().into();
            d.param[0] = kind.0;
            Expect::Exact(0)
        }
        JobOp::EcdsaSign { slot, digest, dst } => {
            d.opcode = Opcode::ECDSA_SIGN.0;
            set_io(&mut d, slot, digest, dst);
            Expect::AtMost {
                max: dst.len(),
                content_type: false,
            }
        }
        JobOp::RsaSign {
            slot,
            padding,
            hash,
            digest,
            dst,
        } => {
            d.opcode = Opcode::RSA_SIGN.0;
            set_io(&mut d, slot, digest, dst);
            d.param[0] = padding.0;
            d.param[1] = hash.0;
            Expect::AtMost {
                max: dst.len(),
                content_type: false,
            }
        }
        JobOp::KxGenerate { slot, kind, dst } => {
            d.opcode = Opcode::KX_GENERATE.0;
            d.key_slot = slot.index().into();
            d.dst_iova = dst.iova().0.into();
            d.dst_len = dst.len().into();
            d.param[0] = kind.0;
            Expect::Exact(kind.key_share_len().unwrap_or(0) as u32)
        }
        JobOp::KxDerive { slot, peer, dst } => {
            d.opcode = Opcode::KX_DERIVE.0;
            set_io(&mut d, slot, peer, dst);
            Expect::Exact(32)
        }
        JobOp::Raw(raw) => {
            d = *raw;
            d.cookie = cookie.into();
            Expect::AtMost {
                max: raw.dst_len.get(),
                content_type: false,
            }
        }
    };
    (d, expect)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::{DmaMapper, DmaRegion};
    use crate::Iova;

    fn pool() -> DmaPool {
        crate::dma::test_support::pool(4 << 20)
    }

    #[test]
    fn encoded_descriptors_carry_the_job() {
        let pool = pool();
        let (a, b) = (pool.alloc(100).unwrap(), pool.alloc(200).unwrap());
        let (src, dst) = (a.whole(), b.whole());
        let (d, expect) = encode(
            &JobOp::Tls13Seal {
                slot: SlotRef::unheld(9),
                content_type: 23,
                padding: 2,
                src,
                dst,
            },
            0xabc,
        );
        assert_eq!(d.opcode, Opcode::TLS13_SEAL.0);
        assert_eq!(d.key_slot.get(), 9);
        assert_eq!(d.cookie.get(), 0xabc);
        assert_eq!(d.src_len.get(), 100);
        assert_eq!(d.src_iova.get(), a.iova().0);
        assert_eq!(d.dst_iova.get(), b.iova().0);
        assert_eq!(
            SealParams::decode(&d.param),
            Some(SealParams {
                content_type: 23,
                padding: 2
            })
        );
        assert!(matches!(expect, Expect::Exact(n) if n as usize == tls13_record_len(100, 2)));
    }

    #[test]
    fn open_expectations_never_underflow() {
        let pool = pool();
        let tiny = pool.alloc(3).unwrap();
        let (_, expect) = encode(
            &JobOp::Tls13Open {
                slot: SlotRef::unheld(0),
                src: tiny.whole(),
                dst: tiny.whole(),
            },
            1,
        );
        assert!(matches!(expect, Expect::AtMost { max: 0, .. }));
    }

    /// A device that accepts every queue and never completes anything by itself: the tests
    /// write its completions into the ring by hand.
    #[derive(Debug)]
    struct Scripted;
    impl DmaMapper for Scripted {
        fn map(&self, _: &Arc<DmaRegion>, _: Iova) -> Result<(), DmaError> {
            Ok(())
        }
        fn unmap(&self, _: Iova, _: usize) -> Result<(), DmaError> {
            Ok(())
        }
    }
    impl Transport for Scripted {
        fn name(&self) -> String {
            "scripted".into()
        }
        fn read32(&self, _: u64) -> u32 {
            QueueStatus::ENABLED.bits()
        }
        fn write32(&self, _: u64, _: u32) {}
        fn read64(&self, _: u64) -> u64 {
            0
        }
        fn write64(&self, _: u64, _: u64) {}
        fn interrupt(&self, vector: u32) -> Result<Arc<EventFd>, TransportError> {
            Err(TransportError::NoSuchVector(vector))
        }
        fn reset(&self) -> Result<(), TransportError> {
            Ok(())
        }
    }

    /// Submits `op` on a fresh queue, has the "device" post `status`, `result_len` and
    /// `flags` for it, and returns what the driver made of that.
    fn answer(op: JobOp, status: Status, result_len: u32, flags: CompletionFlags) -> JobCompletion {
        let pool = pool();
        let mut pair = QueuePair::create(
            Arc::new(Scripted),
            &pool,
            1,
            QueueConfig {
                size: 4,
                ..QueueConfig::default()
            },
            4,
        )
        .unwrap();
        assert_eq!(pair.submit(&[Job { user_data: 5, op }]).unwrap(), 1);
        // First job on a fresh queue: generation 1, cookie slot 0.
        let entry = Completion {
            cookie: (1u64 << 32).into(),
            result_len: result_len.into(),
            status: status.0.into(),
            info: 23,
            flags: (flags | CompletionFlags::PHASE).bits(),
        };
        pair.cq.write(0, entry.as_bytes()).unwrap();
        let mut got = None;
        assert_eq!(pair.poll(|done| got = Some(done)), 1);
        got.unwrap()
    }

    fn record_open(pool: &DmaPool, dst_len: usize) -> (JobOp, DmaBuffer, DmaBuffer) {
        let (src, dst) = (pool.alloc(100).unwrap(), pool.alloc(dst_len).unwrap());
        let op = JobOp::Tls13Open {
            slot: SlotRef::unheld(3),
            src: src.whole(),
            dst: dst.whole(),
        };
        (op, src, dst)
    }

    #[test]
    fn a_result_longer_than_the_destination_is_refused() {
        let pool = pool();
        let (op, _src, _dst) = record_open(&pool, 10);
        let done = answer(op, Status::OK, 50, CompletionFlags::SEQUENCE_ADVANCED);
        assert_eq!(
            done.result,
            Err(JobError::BadCompletion(
                "result length larger than the job's destination"
            ))
        );
        let (op, _src, _dst) = record_open(&pool, 100);
        let done = answer(op, Status::OK, 50, CompletionFlags::SEQUENCE_ADVANCED);
        assert_eq!(done.result.unwrap().len, 50);
    }

    #[test]
    fn a_sequence_flag_that_contradicts_the_status_is_refused() {
        let pool = pool();
        let inconsistent = Err(JobError::BadCompletion(
            "sequence flag inconsistent with the status",
        ));
        // An accepted record job always consumes a number...
        let (op, _src, _dst) = record_open(&pool, 100);
        assert_eq!(
            answer(op, Status::OK, 50, CompletionFlags::empty()).result,
            inconsistent
        );
        let (op, _src, _dst) = record_open(&pool, 100);
        let done = answer(op, Status::AUTH_FAILED, 0, CompletionFlags::empty());
        assert_eq!(done.result, inconsistent);
        // ...a job refused at validation never does...
        let (op, _src, _dst) = record_open(&pool, 100);
        let done = answer(
            op,
            Status::SLOT_EMPTY,
            0,
            CompletionFlags::SEQUENCE_ADVANCED,
        );
        assert_eq!(done.result, inconsistent);
        // ...and a job without a sequence never does.
        let done = answer(
            JobOp::Nop,
            Status::OK,
            0,
            CompletionFlags::SEQUENCE_ADVANCED,
        );
        assert_eq!(done.result, inconsistent);
        // Consistent answers pass.
        let (op, _src, _dst) = record_open(&pool, 100);
        let done = answer(
            op,
            Status::AUTH_FAILED,
            0,
            CompletionFlags::SEQUENCE_ADVANCED,
        );
        assert_eq!(
            done.result,
            Err(JobError::Device {
                status: Status::AUTH_FAILED,
                sequence_advanced: true
            })
        );
        for advanced in [CompletionFlags::empty(), CompletionFlags::SEQUENCE_ADVANCED] {
            let (op, _src, _dst) = record_open(&pool, 100);
            let done = answer(op, Status::DMA_FAULT, 0, advanced);
            assert_eq!(done.result.unwrap_err().status(), Some(Status::DMA_FAULT));
        }
    }

    #[test]
    fn a_job_names_exactly_the_memory_and_slot_it_holds() {
        let pool = pool();
        let (src, dst) = (pool.alloc(64).unwrap(), pool.alloc(128).unwrap());
        let op = JobOp::Tls12Open {
            slot: SlotRef::unheld(7),
            algorithm: AeadAlgorithm::AES_128_GCM,
            src: src.whole(),
            dst: dst.span(0, 100).unwrap(),
        };
        let (slot, spans) = op.holds();
        assert_eq!(slot.map(SlotRef::index), Some(7));
        let held: Vec<_> = spans
            .into_iter()
            .flatten()
            .map(|s| (s.iova(), s.len()))
            .collect();
        assert_eq!(held, vec![(src.iova(), 64), (dst.iova(), 100)]);
    }
}
