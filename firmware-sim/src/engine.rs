//! The engines: descriptor acceptance (validation, slot grants, key-table operations, in
//! submission order) and job execution (DMA in, crypto, DMA out, in any order).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tlsaccel_abi::regs::Counter;
use tlsaccel_abi::{
    tls12_record_len, tls13_record_len, Descriptor, HashAlgorithm, KeyBlock, Opcode,
    PrivateKeyType, RsaPadding, SealParams, Status, DESCRIPTOR_SIZE, KEY_BLOCK_SIZE, MAX_AAD_LEN,
    NONCE_LEN, TAG_LEN, TLS13_MAX_CIPHERTEXT, TLS_HEADER_LEN, TLS_MAX_PLAINTEXT,
};
use zerocopy::FromBytes;
use zeroize::Zeroize;

use crate::device::Shared;
use crate::memory::{DmaRange, IommuView};
use crate::pke::PrivateKey;
use crate::queue::{ActiveQueue, IrqAction, Posting};
use tlsaccel_record::{self as crypto, Output, RecordKey};

/// A public-key descriptor that passed acceptance.
enum Accepted {
    /// To run on an engine.
    Job(PkeJob),
    /// Finished at acceptance, with this many bytes written to `dst`.
    Done(u32),
}

/// Descriptors one engine fetches from a queue at a time.
pub(crate) const FETCH_BURST: u32 = 32;

/// One fetched descriptor, in fetch order: small, so a burst of NOPs moves little. The jobs
/// themselves wait in [`EngineScratch::jobs`] and [`EngineScratch::pke_jobs`].
#[derive(Debug, Clone, Copy)]
enum Work {
    /// Finished at acceptance (NOP, key operations, and every rejection).
    Done(Posting),
    /// `jobs[i]`.
    Job(usize),
    /// `pke_jobs[i]`.
    PublicKey(usize),
}

/// What acceptance made of a descriptor.
#[derive(Debug)]
enum Acceptance {
    Done(Posting),
    Job(Job),
    PublicKey(PkeJob),
}

/// An accepted public-key job.
#[derive(Debug)]
struct PkeJob {
    cookie: u64,
    key: Arc<PrivateKey>,
    input: DmaRange,
    dst: DmaRange,
    /// `None`: a key-exchange derivation; `Some(None)`: ECDSA; `Some(Some(..))`: RSA.
    sign: Option<Option<(RsaPadding, HashAlgorithm)>>,
}

#[derive(Debug)]
struct Job {
    cookie: u64,
    opcode: Opcode,
    key: Arc<RecordKey>,
    sequence: u64,
    src: DmaRange,
    dst: DmaRange,
    aad: Option<DmaRange>,
    nonce: [u8; NONCE_LEN],
    seal: SealParams,
}

/// Counter increments an engine collects during a burst and adds to the device's counters
/// once at its end (one atomic add per counter per burst, not per job).
#[derive(Debug, Default)]
pub(crate) struct Tally([u64; Counter::ALL.len()]);

impl Tally {
    fn add(&mut self, counter: Counter, by: u64) {
        self.0[counter as usize] += by;
    }
}

/// One engine thread's reusable buffers.
#[derive(Debug)]
pub(crate) struct EngineScratch {
    data: Vec<u8>,
    aad: Vec<u8>,
    descriptors: [[u8; DESCRIPTOR_SIZE]; FETCH_BURST as usize],
    work: Vec<Work>,
    jobs: Vec<Job>,
    pke_jobs: Vec<PkeJob>,
    postings: Vec<Posting>,
    tally: Tally,
    /// This engine's copy of the IOMMU table.
    view: IommuView,
}

impl Default for EngineScratch {
    fn default() -> Self {
        Self {
            data: Vec::new(),
            aad: Vec::new(),
            descriptors: [[0; DESCRIPTOR_SIZE]; FETCH_BURST as usize],
            work: Vec::new(),
            jobs: Vec::new(),
            pke_jobs: Vec::new(),
            postings: Vec::new(),
            tally: Tally::default(),
            view: IommuView::default(),
        }
    }
}

impl Drop for EngineScratch {
    fn drop(&mut self) {
        crypto::scrub(&mut self.data);
    }
}

impl Shared {
    /// Serves one burst from `queue`. Returns true when it did any work.
    ///
    /// The whole burst runs inside the queue ([`ActiveQueue::enter`]): a disable or reset
    /// that comes meanwhile leaves `Q_STATUS.ENABLED` at 1 until the engine has made its last
    /// access to the rings and the jobs' buffers. Jobs not yet started when the queue stops
    /// are dropped without completions.
    pub(crate) fn serve(&self, queue: &ActiveQueue, scratch: &mut EngineScratch) -> bool {
        let Some(_inside) = queue.enter() else {
            return false;
        };
        let Ok(mut head) = queue.sq_head.try_lock() else {
            return false;
        };
        let tail = queue.doorbells.sq_tail();
        if tail >= queue.size {
            // Only possible with doorbells in host memory: MMIO writes are checked on arrival.
            drop(head);
            self.queue_bad_doorbell(queue);
            return true;
        }
        let pending = tail.wrapping_sub(*head) & queue.mask();
        if pending == 0 {
            return false;
        }
        let granted = queue.reserve(pending.min(FETCH_BURST));
        if granted == 0 {
            return false;
        }
        let fetched = &mut scratch.descriptors[..granted as usize];
        if queue.read_descriptors(*head, fetched).is_err() {
            self.count(Counter::DmaFaults, 1);
            self.queue_ring_fault(queue);
            queue.unreserve(granted);
            return true;
        }
        *head = (*head + granted) & queue.mask();
        queue.doorbells.sq_head.store(*head, Ordering::Relaxed);
        scratch
            .tally
            .add(Counter::DescriptorsFetched, u64::from(granted));
        scratch.work.clear();
        scratch.jobs.clear();
        scratch.pke_jobs.clear();
        for raw in &scratch.descriptors[..granted as usize] {
            let descriptor = Descriptor::read_from_bytes(raw).unwrap_or_default();
            let work = match self.accept(&descriptor, &mut scratch.view, &mut scratch.tally) {
                Acceptance::Done(posting) => Work::Done(posting),
                Acceptance::Job(job) => {
                    scratch.jobs.push(job);
                    Work::Job(scratch.jobs.len() - 1)
                }
                Acceptance::PublicKey(job) => {
                    scratch.pke_jobs.push(job);
                    Work::PublicKey(scratch.pke_jobs.len() - 1)
                }
            };
            scratch.work.push(work);
        }
        // Acceptance (key grants and their sequence numbers, key-table operations) happens
        // in submission order (§4.4): the next burst of this queue is not accepted by another
        // engine until this one's is. Running the jobs is concurrent.
        drop(head);
        if pending > granted {
            self.work.notify();
        }

        self.hold_while_stalled(scratch.work.len());
        scratch.postings.clear();
        // Taken out so the jobs can be run by reference while the scratch is lent out.
        let work = std::mem::take(&mut scratch.work);
        let mut jobs = std::mem::take(&mut scratch.jobs);
        let mut pke_jobs = std::mem::take(&mut scratch.pke_jobs);
        for item in &work {
            // A job of a queue stopped meanwhile is dropped, not run: no DMA to its buffers
            // and no completion (posting checks for itself).
            let posting = match *item {
                Work::Done(posting) => posting,
                Work::Job(_) | Work::PublicKey(_) if queue.is_stopped() => continue,
                Work::Job(i) => match jobs.get(i) {
                    Some(job) => self.execute(job, scratch),
                    None => continue,
                },
                Work::PublicKey(i) => match pke_jobs.get(i) {
                    Some(job) => self.execute_public_key(job, &mut scratch.tally),
                    None => continue,
                },
            };
            self.account(&posting, &mut scratch.tally);
            if self.faults.take_drop_completion() {
                continue;
            }
            scratch
                .postings
                .push(self.faults.apply_length_fault(posting));
        }
        // Dropping the jobs lets go of their key grants and translations.
        jobs.clear();
        pke_jobs.clear();
        scratch.work = work;
        scratch.jobs = jobs;
        scratch.pke_jobs = pke_jobs;
        self.flush(&mut scratch.tally);
        if self.is_fatal() {
            queue.unreserve(granted);
            return true;
        }
        let registers = self.queue_registers(queue.index);
        match queue.post(
            &scratch.postings,
            granted,
            registers.coalesce_count(),
            registers.coalesce_usecs(),
            registers.irq_enabled(),
        ) {
            Ok(IrqAction::None) => {}
            Ok(IrqAction::SignalNow) => self.signal(queue.index),
            Ok(IrqAction::ArmTimer(deadline)) => self.timer.arm(deadline),
            Err(_) => {
                self.count(Counter::DmaFaults, 1);
                self.queue_ring_fault(queue);
            }
        }
        true
    }

    /// Under an injected stall, holds the `jobs` this engine has accepted — before their DMA
    /// and completions — until the stall is lifted (a resume, a reset) or the device shuts
    /// down. The engine stays inside its queue meanwhile.
    fn hold_while_stalled(&self, jobs: usize) {
        if !self.faults.is_stalled() {
            return;
        }
        let jobs = u32::try_from(jobs).unwrap_or(u32::MAX);
        self.faults.held.fetch_add(jobs, Ordering::SeqCst);
        while self.faults.is_stalled() && !self.is_shutting_down() {
            let seen = self.work.epoch();
            if !self.faults.is_stalled() {
                break;
            }
            self.work.wait(
                seen,
                std::time::Duration::ZERO,
                std::time::Duration::from_millis(1),
            );
        }
        self.faults.held.fetch_sub(jobs, Ordering::SeqCst);
    }

    fn account(&self, posting: &Posting, tally: &mut Tally) {
        if posting.status.is_ok() {
            tally.add(Counter::JobsOk, 1);
        } else {
            tally.add(Counter::JobsFailed, 1);
        }
        match posting.status {
            Status::AUTH_FAILED => tally.add(Counter::AuthFailures, 1),
            Status::DMA_FAULT => tally.add(Counter::DmaFaults, 1),
            _ => {}
        }
    }

    fn flush(&self, tally: &mut Tally) {
        for (counter, value) in Counter::ALL.iter().zip(tally.0.iter_mut()) {
            if *value != 0 {
                self.count(*counter, std::mem::take(value));
            }
        }
    }

    /// Validates a descriptor and, for key operations, performs it. Runs in submission order.
    fn accept(&self, d: &Descriptor, view: &mut IommuView, tally: &mut Tally) -> Acceptance {
        let cookie = d.cookie.get();
        let done = |status: Status| {
            Acceptance::Done(Posting {
                cookie,
                status,
                result_len: 0,
                info: 0,
                sequence_advanced: false,
            })
        };
        if Opcode(d.opcode).is_public_key() {
            return match self.accept_public_key(d, view, tally) {
                Ok(Accepted::Job(job)) => Acceptance::PublicKey(job),
                Ok(Accepted::Done(len)) => Acceptance::Done(Posting {
                    cookie,
                    status: Status::OK,
                    result_len: len,
                    info: 0,
                    sequence_advanced: false,
                }),
                Err(status) => {
                    tally.add(Counter::Rejected, 1);
                    done(status)
                }
            };
        }
        match self.accept_job(d, view) {
            Ok(Some(job)) => Acceptance::Job(job),
            Ok(None) => done(Status::OK),
            Err(status) => {
                tally.add(Counter::Rejected, 1);
                done(status)
            }
        }
    }

    fn accept_job(&self, d: &Descriptor, view: &mut IommuView) -> Result<Option<Job>, Status> {
        let opcode = Opcode(d.opcode);
        if d.flags != 0 || d.reserved.get() != 0 {
            return Err(Status::BAD_DESCRIPTOR);
        }
        let slot = d.key_slot.get();
        match opcode {
            Opcode::NOP => return Ok(None),
            Opcode::KEY_LOAD => {
                if d.src_len.get() as usize != KEY_BLOCK_SIZE {
                    return Err(Status::LENGTH_ERROR);
                }
                let range = self.translate(view, d.src_iova.get(), KEY_BLOCK_SIZE as u32)?;
                let mut raw = [0u8; KEY_BLOCK_SIZE];
                let read = range.read(0, &mut raw);
                let mut block = KeyBlock::read_from_bytes(&raw).unwrap_or_default();
                raw.zeroize();
                let loaded = read
                    .map_err(|_| Status::DMA_FAULT)
                    .and_then(|()| self.keys.load(slot, &block));
                block.key.zeroize();
                block.iv.zeroize();
                loaded?;
                self.sync_key_gauge();
                return Ok(None);
            }
            Opcode::KEY_DESTROY => {
                let destroyed = self.keys.destroy(slot);
                self.sync_key_gauge();
                return destroyed.map(|()| None);
            }
            op if op.uses_key_slot() => {}
            _ => return Err(Status::BAD_OPCODE),
        }

        let src_len = d.src_len.get();
        let dst_len = d.dst_len.get();
        if src_len > self.config.max_data_len || dst_len > self.config.max_data_len {
            return Err(Status::LENGTH_ERROR);
        }
        let grant_opcode_checks = |needed_dst: usize| -> Result<(), Status> {
            if (dst_len as usize) < needed_dst {
                Err(Status::LENGTH_ERROR)
            } else {
                Ok(())
            }
        };
        let src = src_len as usize;
        let mut seal = SealParams::default();
        let mut nonce = [0u8; NONCE_LEN];
        match opcode {
            Opcode::AEAD_SEAL | Opcode::AEAD_OPEN => {
                if d.aad_len.get() > MAX_AAD_LEN {
                    return Err(Status::LENGTH_ERROR);
                }
                nonce = d.param;
                if opcode == Opcode::AEAD_SEAL {
                    grant_opcode_checks(src + TAG_LEN)?;
                } else {
                    let plain = src.checked_sub(TAG_LEN).ok_or(Status::LENGTH_ERROR)?;
                    grant_opcode_checks(plain)?;
                }
            }
            Opcode::TLS13_SEAL => {
                seal = SealParams::decode(&d.param).ok_or(Status::BAD_DESCRIPTOR)?;
                if src + 1 + usize::from(seal.padding) > TLS_MAX_PLAINTEXT + 1 {
                    return Err(Status::LENGTH_ERROR);
                }
                grant_opcode_checks(tls13_record_len(src, usize::from(seal.padding)))?;
            }
            Opcode::TLS13_OPEN => {
                if !(TLS_HEADER_LEN + TAG_LEN + 1..=TLS_HEADER_LEN + TLS13_MAX_CIPHERTEXT)
                    .contains(&src)
                {
                    return Err(Status::LENGTH_ERROR);
                }
                grant_opcode_checks((src - TLS_HEADER_LEN - TAG_LEN - 1).min(TLS_MAX_PLAINTEXT))?;
            }
            Opcode::TLS12_SEAL | Opcode::TLS12_OPEN => {
                seal = SealParams::decode(&d.param).ok_or(Status::BAD_DESCRIPTOR)?;
                if seal.padding != 0 {
                    return Err(Status::BAD_DESCRIPTOR);
                }
            }
            _ => return Err(Status::BAD_OPCODE),
        }
        if opcode != Opcode::AEAD_SEAL && opcode != Opcode::AEAD_OPEN && d.aad_len.get() != 0 {
            return Err(Status::BAD_DESCRIPTOR);
        }
        let src_range = self.translate(view, d.src_iova.get(), src_len)?;
        let dst_range = self.translate(view, d.dst_iova.get(), dst_len)?;
        let aad = match d.aad_len.get() {
            0 => None,
            len => Some(self.translate(view, d.aad_iova.get(), len)?),
        };
        // TLS 1.2 lengths depend on the slot's algorithm: check them against the slot before
        // the grant consumes a sequence number.
        if matches!(opcode, Opcode::TLS12_SEAL | Opcode::TLS12_OPEN) {
            let algorithm = self.keys.algorithm_of(d.key_slot.get())?;
            let prefix = TLS_HEADER_LEN + algorithm.tls12_explicit_nonce_len();
            if opcode == Opcode::TLS12_SEAL {
                if src > TLS_MAX_PLAINTEXT {
                    return Err(Status::LENGTH_ERROR);
                }
                grant_opcode_checks(tls12_record_len(algorithm, src))?;
            } else {
                let plain = src
                    .checked_sub(prefix + TAG_LEN)
                    .filter(|&p| p <= TLS_MAX_PLAINTEXT + 1024)
                    .ok_or(Status::LENGTH_ERROR)?;
                grant_opcode_checks(plain.min(TLS_MAX_PLAINTEXT))?;
            }
        }
        let grant = self.keys.grant(d.key_slot.get(), opcode)?;
        Ok(Some(Job {
            cookie: d.cookie.get(),
            opcode,
            key: grant.key,
            sequence: grant.sequence.unwrap_or(0),
            src: src_range,
            dst: dst_range,
            aad,
            nonce,
            seal,
        }))
    }

    /// Validates a public-key descriptor. Key loads and key-pair generation happen here, in
    /// submission order, as key-table operations do; signatures and derivations run later.
    fn accept_public_key(
        &self,
        d: &Descriptor,
        view: &mut IommuView,
        tally: &mut Tally,
    ) -> Result<Accepted, Status> {
        if d.flags != 0 || d.reserved.get() != 0 || d.aad_len.get() != 0 {
            return Err(Status::BAD_DESCRIPTOR);
        }
        let slot = d.key_slot.get();
        let (src_len, dst_len) = (d.src_len.get(), d.dst_len.get());
        if src_len > self.config.max_data_len || dst_len > self.config.max_data_len {
            return Err(Status::LENGTH_ERROR);
        }
        let reserved_params = |from: usize| d.param[from..].iter().any(|&b| b != 0);
        match Opcode(d.opcode) {
            Opcode::PKE_KEY_LOAD => {
                if reserved_params(1) || src_len == 0 {
                    return Err(Status::BAD_DESCRIPTOR);
                }
                let src = self.translate(view, d.src_iova.get(), src_len)?;
                let mut material = zeroize::Zeroizing::new(vec![0u8; src_len as usize]);
                src.read(0, &mut material).map_err(|_| Status::DMA_FAULT)?;
                let key = PrivateKey::parse(PrivateKeyType(d.param[0]), &material)?;
                self.keys.load_private(slot, key)?;
                self.sync_key_gauge();
                Ok(Accepted::Done(0))
            }
            Opcode::KX_GENERATE => {
                let kind = PrivateKeyType(d.param[0]);
                if reserved_params(1) || src_len != 0 {
                    return Err(Status::BAD_DESCRIPTOR);
                }
                let share_len = kind.key_share_len().ok_or(Status::UNSUPPORTED)?;
                if (dst_len as usize) < share_len {
                    return Err(Status::LENGTH_ERROR);
                }
                let dst = self.translate(view, d.dst_iova.get(), dst_len)?;
                let key = PrivateKey::generate(kind)?;
                let share = key.key_share()?;
                dst.write(0, &share).map_err(|_| Status::DMA_FAULT)?;
                self.keys.load_private(slot, key)?;
                self.sync_key_gauge();
                tally.add(Counter::KeyExchanges, 1);
                Ok(Accepted::Done(share.len() as u32))
            }
            Opcode::ECDSA_SIGN | Opcode::RSA_SIGN => {
                let key = self.keys.private(slot)?;
                let sign = if d.opcode == Opcode::ECDSA_SIGN.0 {
                    if reserved_params(0) {
                        return Err(Status::BAD_DESCRIPTOR);
                    }
                    let digest_len = key.ecdsa_digest_len().ok_or(Status::SLOT_MISMATCH)?;
                    if src_len as usize != digest_len {
                        return Err(Status::LENGTH_ERROR);
                    }
                    None
                } else {
                    if key.kind() != PrivateKeyType::RSA {
                        return Err(Status::SLOT_MISMATCH);
                    }
                    let (padding, hash) = (RsaPadding(d.param[0]), HashAlgorithm(d.param[1]));
                    if reserved_params(2) || !padding.is_known() {
                        return Err(Status::BAD_DESCRIPTOR);
                    }
                    let digest_len = hash.digest_len().ok_or(Status::UNSUPPORTED)?;
                    if src_len as usize != digest_len {
                        return Err(Status::LENGTH_ERROR);
                    }
                    Some((padding, hash))
                };
                if (dst_len as usize) < key.max_signature_len() {
                    return Err(Status::LENGTH_ERROR);
                }
                Ok(Accepted::Job(PkeJob {
                    cookie: d.cookie.get(),
                    input: self.translate(view, d.src_iova.get(), src_len)?,
                    dst: self.translate(view, d.dst_iova.get(), dst_len)?,
                    key,
                    sign: Some(sign),
                }))
            }
            Opcode::KX_DERIVE => {
                if reserved_params(0) {
                    return Err(Status::BAD_DESCRIPTOR);
                }
                let kind = self.keys.private(slot)?.kind();
                let share_len = kind.key_share_len().ok_or(Status::SLOT_MISMATCH)?;
                // The slot is emptied now, in submission order, whatever happens next: a
                // key-exchange key is used once.
                let key = self.keys.take_private(slot)?;
                self.sync_key_gauge();
                if src_len as usize != share_len {
                    return Err(Status::INVALID_PUBLIC_KEY);
                }
                if dst_len < 32 {
                    return Err(Status::LENGTH_ERROR);
                }
                let input = self.translate(view, d.src_iova.get(), src_len)?;
                let dst = self.translate(view, d.dst_iova.get(), dst_len)?;
                Ok(Accepted::Job(PkeJob {
                    cookie: d.cookie.get(),
                    key,
                    input,
                    dst,
                    sign: None,
                }))
            }
            _ => Err(Status::BAD_OPCODE),
        }
    }

    fn execute_public_key(&self, job: &PkeJob, tally: &mut Tally) -> Posting {
        let mut posting = Posting {
            cookie: job.cookie,
            status: Status::OK,
            result_len: 0,
            info: 0,
            sequence_advanced: false,
        };
        let result = (|| {
            let len = usize::try_from(job.input.len()).map_err(|_| Status::LENGTH_ERROR)?;
            let mut input = zeroize::Zeroizing::new(vec![0u8; len]);
            job.input
                .read(0, &mut input)
                .map_err(|_| Status::DMA_FAULT)?;
            let output = match job.sign {
                Some(rsa) => {
                    tally.add(Counter::Signatures, 1);
                    job.key.sign(&input, rsa)?
                }
                None => {
                    tally.add(Counter::KeyExchanges, 1);
                    zeroize::Zeroizing::new(job.key.derive(&input)?).to_vec()
                }
            };
            let output = zeroize::Zeroizing::new(output);
            job.dst.write(0, &output).map_err(|_| Status::DMA_FAULT)?;
            Ok(output.len())
        })();
        match result {
            Ok(len) => posting.result_len = u32::try_from(len).unwrap_or(u32::MAX),
            Err(status) => posting.status = status,
        }
        posting
    }

    fn translate(&self, view: &mut IommuView, iova: u64, len: u32) -> Result<DmaRange, Status> {
        self.iommu
            .translate_cached(view, iova, u64::from(len))
            .map_err(|_| Status::DMA_FAULT)
    }

    /// Runs an accepted job: DMA the input in, transform it, DMA the output out.
    fn execute(&self, job: &Job, scratch: &mut EngineScratch) -> Posting {
        let sequence_advanced = job.opcode.is_tls_record();
        let mut posting = Posting {
            cookie: job.cookie,
            status: Status::OK,
            result_len: 0,
            info: 0,
            sequence_advanced,
        };
        match self.run(job, scratch) {
            Ok(output) => {
                posting.result_len = u32::try_from(output.len).unwrap_or(u32::MAX);
                posting.info = output.info;
                let tally = &mut scratch.tally;
                tally.add(Counter::BytesIn, job.src.len());
                tally.add(Counter::BytesOut, output.len as u64);
                match job.opcode {
                    Opcode::TLS13_SEAL | Opcode::TLS12_SEAL => tally.add(Counter::RecordsSealed, 1),
                    Opcode::TLS13_OPEN | Opcode::TLS12_OPEN => tally.add(Counter::RecordsOpened, 1),
                    _ => {}
                }
            }
            Err(status) => posting.status = status,
        }
        posting
    }

    fn run(&self, job: &Job, scratch: &mut EngineScratch) -> Result<Output, Status> {
        if self.faults.take_dma_fault() {
            return Err(Status::DMA_FAULT);
        }
        let src_len = usize::try_from(job.src.len()).map_err(|_| Status::LENGTH_ERROR)?;
        let key = &job.key;
        let prefix = match job.opcode {
            Opcode::TLS13_SEAL => TLS_HEADER_LEN,
            Opcode::TLS12_SEAL => TLS_HEADER_LEN + key.algorithm.tls12_explicit_nonce_len(),
            _ => 0,
        };
        // The buffer only grows (never zero-filled per job); every byte a job reads back was
        // written by that job's DMA read or by the record construction.
        let needed = prefix + src_len + crypto::seal_headroom(usize::from(job.seal.padding));
        if scratch.data.len() < needed {
            scratch.data.resize(needed, 0);
        }
        let buf = &mut scratch.data[..];
        job.src
            .read(0, &mut buf[prefix..prefix + src_len])
            .map_err(|_| Status::DMA_FAULT)?;
        if !job.opcode.is_seal() && src_len > 0 && self.faults.take_corrupt_open_tag() {
            // The tag is the last byte of what an open reads.
            buf[prefix + src_len - 1] ^= 0x01;
        }
        let output = match job.opcode {
            Opcode::AEAD_SEAL | Opcode::AEAD_OPEN => {
                scratch.aad.clear();
                if let Some(aad) = &job.aad {
                    let len = usize::try_from(aad.len()).map_err(|_| Status::LENGTH_ERROR)?;
                    scratch.aad.resize(len, 0);
                    aad.read(0, &mut scratch.aad)
                        .map_err(|_| Status::DMA_FAULT)?;
                }
                if job.opcode == Opcode::AEAD_SEAL {
                    crypto::aead_seal(key, job.nonce, &scratch.aad, buf, src_len)?
                } else {
                    crypto::aead_open(key, job.nonce, &scratch.aad, buf, src_len)?
                }
            }
            Opcode::TLS13_SEAL => crypto::tls13_seal(
                key,
                job.sequence,
                job.seal.content_type,
                usize::from(job.seal.padding),
                buf,
                src_len,
            )?,
            Opcode::TLS13_OPEN => crypto::tls13_open(key, job.sequence, buf, src_len)?,
            Opcode::TLS12_SEAL => {
                crypto::tls12_seal(key, job.sequence, job.seal.content_type, buf, src_len)?
            }
            Opcode::TLS12_OPEN => crypto::tls12_open(key, job.sequence, buf, src_len)?,
            _ => return Err(Status::BAD_OPCODE),
        };
        if job.opcode.is_seal() && self.faults.take_corrupt_tag() {
            if let Some(last) = buf.get_mut(output.start + output.len - 1) {
                *last ^= 0x01;
            }
        }
        if output.len as u64 > job.dst.len() {
            return Err(Status::LENGTH_ERROR);
        }
        job.dst
            .write(0, &buf[output.start..output.start + output.len])
            .map_err(|_| Status::DMA_FAULT)?;
        Ok(output)
    }
}
