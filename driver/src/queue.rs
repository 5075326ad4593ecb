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

use crate::device::QueueLease;
use crate::dma::{DmaBuffer, DmaError, DmaPool, DmaSpan};
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

/// A job for the device. Spans name DMA memory that must stay valid until the job completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOp {
    Nop,
    KeyLoad {
        slot: u32,
        block: DmaSpan,
    },
    KeyDestroy {
        slot: u32,
    },
    AeadSeal {
        slot: u32,
        nonce: [u8; NONCE_LEN],
        aad: Option<DmaSpan>,
        src: DmaSpan,
        dst: DmaSpan,
    },
    AeadOpen {
        slot: u32,
        nonce: [u8; NONCE_LEN],
        aad: Option<DmaSpan>,
        src: DmaSpan,
        dst: DmaSpan,
    },
    Tls13Seal {
        slot: u32,
        content_type: u8,
        padding: u16,
        src: DmaSpan,
        dst: DmaSpan,
    },
    Tls13Open {
        slot: u32,
        src: DmaSpan,
        dst: DmaSpan,
    },
    Tls12Seal {
        slot: u32,
        algorithm: AeadAlgorithm,
        content_type: u8,
        src: DmaSpan,
        dst: DmaSpan,
    },
    Tls12Open {
        slot: u32,
        algorithm: AeadAlgorithm,
        src: DmaSpan,
        dst: DmaSpan,
    },
    /// Load a private key (PKCS#8 DER for signing keys, raw for key exchange).
    PkeKeyLoad {
        slot: u32,
        kind: PrivateKeyType,
        src: DmaSpan,
    },
    /// ECDSA-sign a digest (of the curve's hash); the DER signature goes to `dst`.
    EcdsaSign {
        slot: u32,
        digest: DmaSpan,
        dst: DmaSpan,
    },
    /// RSA-sign a digest with the given padding.
    RsaSign {
        slot: u32,
        padding: RsaPadding,
        hash: HashAlgorithm,
        digest: DmaSpan,
        dst: DmaSpan,
    },
    /// Generate a key-exchange key pair into `slot`; its public key goes to `dst`.
    KxGenerate {
        slot: u32,
        kind: PrivateKeyType,
        dst: DmaSpan,
    },
    /// Derive the shared secret with `peer`'s public key; empties `slot`.
    KxDerive {
        slot: u32,
        peer: DmaSpan,
        dst: DmaSpan,
    },
    /// A descriptor exactly as given (its cookie is replaced). For conformance tests.
    Raw(Descriptor),
}

/// A job and the caller's tag for it, returned with its completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

#[derive(Debug, Clone, Copy)]
struct InFlight {
    generation: u32,
    user_data: u64,
    expect: Expect,
    submitted: Instant,
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
    generation: u32,
    outstanding: u32,
    broken: bool,
    interrupt: Option<Arc<EventFd>>,
    stats: QueueStats,
    /// The device incarnation this queue belongs to, and the counter that says which is live.
    epoch: Option<(Arc<AtomicU64>, u64)>,
    /// Set by the device's health watch when the device is gone.
    lost: Option<Arc<AtomicBool>>,
    _lease: Option<QueueLease>,
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
        let status = QueueStatus::from_bits_retain(transport.read32(reg(qreg::STATUS)));
        if !status.contains(QueueStatus::ENABLED) {
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
            slots: vec![None; size as usize],
            free: (0..size).rev().collect(),
            generation: 0,
            outstanding: 0,
            broken: false,
            interrupt,
            stats: QueueStats::default(),
            epoch: None,
            lost: None,
            _lease: None,
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

    pub(crate) fn with_lease(mut self, lease: QueueLease) -> Self {
        self._lease = Some(lease);
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
            let (descriptor, expect) = encode(job.op, cookie);
            self.slots[slot as usize] = Some(InFlight {
                generation: self.generation,
                user_data: job.user_data,
                expect,
                submitted: now,
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
            .copied()
            .flatten()
            .filter(|job| job.generation == generation);
        let Some(job) = known else {
            self.stats.unknown_cookies += 1;
            tracing::warn!(
                queue = self.index,
                cookie,
                "completion with unknown cookie ignored"
            );
            return None;
        };
        self.slots[slot as usize] = None;
        self.free.push(slot);
        self.outstanding -= 1;
        let status = Status(entry.status.get());
        let flags = CompletionFlags::from_bits_retain(entry.flags);
        let sequence_advanced = flags.contains(CompletionFlags::SEQUENCE_ADVANCED);
        let len = entry.result_len.get();
        let result = if !status.is_known() {
            Err(JobError::BadCompletion("unknown status"))
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
            tracing::warn!(
                queue = self.index,
                cookie,
                len,
                ?status,
                "impossible completion"
            );
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
        self.fail_all(JobError::TimedOut, &mut sink)
    }

    /// Fails every job in flight with `error` and marks the queue broken.
    pub fn fail_all(&mut self, error: JobError, mut sink: impl FnMut(JobCompletion)) -> usize {
        self.broken = true;
        let mut failed = 0;
        for (index, slot) in self.slots.iter_mut().enumerate() {
            if let Some(job) = slot.take() {
                self.free.push(index as u32);
                failed += 1;
                sink(JobCompletion {
                    user_data: job.user_data,
                    result: Err(error),
                });
            }
        }
        self.outstanding = 0;
        failed
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
                if spins % 64 == 0 {
                    if start.elapsed() >= timeout {
                        self.stats.timeouts += 1;
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

/// How long a disabled queue may take to release its rings.
const QUIESCE_TIMEOUT: Duration = Duration::from_millis(100);

impl Drop for QueuePair {
    fn drop(&mut self) {
        if self.device_was_reset() {
            return;
        }
        // Disable the queue, and wait for the device to let go of its rings (Q_STATUS
        // ENABLED clears once no ring access is under way, device-spec §3.1) before they go
        // back to the pool. A device that does not confirm in time keeps the rings: they
        // are quarantined, never reused.
        self.transport
            .write32(regs::queue_reg(self.index, qreg::CONTROL), 0);
        let status = regs::queue_reg(self.index, qreg::STATUS);
        let deadline = Instant::now() + QUIESCE_TIMEOUT;
        loop {
            let enabled = QueueStatus::from_bits_retain(self.transport.read32(status))
                .contains(QueueStatus::ENABLED);
            if !enabled || self.transport.is_lost() {
                return;
            }
            if Instant::now() > deadline {
                tracing::error!(
                    queue = self.index,
                    "device did not release a disabled queue; its rings are quarantined"
                );
                self.sq.quarantine();
                self.cq.quarantine();
                return;
            }
            std::thread::sleep(Duration::from_micros(20));
        }
    }
}

/// Builds the descriptor for `op` and what its completion must look like.
fn encode(op: JobOp, cookie: u64) -> (Descriptor, Expect) {
    let mut d = Descriptor {
        cookie: cookie.into(),
        ..Descriptor::default()
    };
    let set_io = |d: &mut Descriptor, slot: u32, src: DmaSpan, dst: DmaSpan| {
        d.key_slot = slot.into();
        d.src_iova = src.iova.0.into();
        d.src_len = src.len.into();
        d.dst_iova = dst.iova.0.into();
        d.dst_len = dst.len.into();
    };
    let src_minus = |src: DmaSpan, n: usize| src.len.saturating_sub(n as u32);
    let expect = match op {
        JobOp::Nop => {
            d.opcode = Opcode::NOP.0;
            Expect::Exact(0)
        }
        JobOp::KeyLoad { slot, block } => {
            d.opcode = Opcode::KEY_LOAD.0;
            d.key_slot = slot.into();
            d.src_iova = block.iova.0.into();
            d.src_len = (KEY_BLOCK_SIZE as u32).into();
            Expect::Exact(0)
        }
        JobOp::KeyDestroy { slot } => {
            d.opcode = Opcode::KEY_DESTROY.0;
            d.key_slot = slot.into();
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
            d.param = nonce;
            if let Some(aad) = aad {
                d.aad_iova = aad.iova.0.into();
                d.aad_len = aad.len.into();
            }
            if seal {
                Expect::Exact(src.len.saturating_add(TAG_LEN as u32))
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
                content_type,
                padding,
            }
            .encode();
            Expect::Exact(tls13_record_len(src.len as usize, usize::from(padding)) as u32)
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
                content_type,
                padding: 0,
            }
            .encode();
            Expect::Exact(tls12_record_len(algorithm, src.len as usize) as u32)
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
            d.key_slot = slot.into();
            d.src_iova = src.iova.0.into();
            d.src_len = src.len.into();
            d.param[0] = kind.0;
            Expect::Exact(0)
        }
        JobOp::EcdsaSign { slot, digest, dst } => {
            d.opcode = Opcode::ECDSA_SIGN.0;
            set_io(&mut d, slot, digest, dst);
            Expect::AtMost {
                max: dst.len,
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
                max: dst.len,
                content_type: false,
            }
        }
        JobOp::KxGenerate { slot, kind, dst } => {
            d.opcode = Opcode::KX_GENERATE.0;
            d.key_slot = slot.into();
            d.dst_iova = dst.iova.0.into();
            d.dst_len = dst.len.into();
            d.param[0] = kind.0;
            Expect::Exact(kind.key_share_len().unwrap_or(0) as u32)
        }
        JobOp::KxDerive { slot, peer, dst } => {
            d.opcode = Opcode::KX_DERIVE.0;
            set_io(&mut d, slot, peer, dst);
            Expect::Exact(32)
        }
        JobOp::Raw(raw) => {
            d = raw;
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

    #[test]
    fn encoded_descriptors_carry_the_job() {
        let src = DmaSpan {
            iova: crate::Iova(0x1_0000_0040),
            len: 100,
        };
        let dst = DmaSpan {
            iova: crate::Iova(0x1_0000_1000),
            len: 200,
        };
        let (d, expect) = encode(
            JobOp::Tls13Seal {
                slot: 9,
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
        assert_eq!(d.dst_iova.get(), 0x1_0000_1000);
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
        let tiny = DmaSpan {
            iova: crate::Iova(0),
            len: 3,
        };
        let (_, expect) = encode(
            JobOp::Tls13Open {
                slot: 0,
                src: tiny,
                dst: tiny,
            },
            1,
        );
        assert!(matches!(expect, Expect::AtMost { max: 0, .. }));
    }
}
