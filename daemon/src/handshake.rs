//! Handshake offload: a rustls `CryptoProvider` whose signatures and key exchanges run on the
//! device's public-key engines, with the CPU provider as fallback.
//!
//! rustls calls signing and key exchange synchronously from whichever thread drives the
//! handshake. [`PkeEngine`] lets many such threads share one public-key queue: each request
//! is queued, one submitter thread moves everything queued into the ring with a single
//! doorbell, takes completions and wakes each requester, so concurrent handshakes reach the
//! device as batches rather than one job at a time. The submitter sleeps in `poll(2)` on two
//! eventfds, one written by requesters and one by the device's completion interrupt: it
//! costs the host nothing while the device works.
//!
//! Fallback: a request the device cannot serve (device lost or fatal, timeout, a scheme or
//! group it lacks, a key it cannot load) is done on the CPU, and counted. A key exchange whose
//! private half was generated on the device cannot move to the CPU midway; if its device fails
//! between `start` and `complete`, that handshake fails (and is counted) while new handshakes
//! start on the CPU.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_lc_rs::digest;
use rustls::crypto::{
    ActiveKeyExchange, CryptoProvider, KeyProvider, SharedSecret, SupportedKxGroup,
};
use rustls::pki_types::{PrivateKeyDer, SubjectPublicKeyInfoDer};
use rustls::sign::{Signer, SigningKey};
use rustls::{NamedGroup, SignatureAlgorithm, SignatureScheme};
use tlsaccel_driver::abi::{HashAlgorithm, PrivateKeyType, RsaPadding};
use tlsaccel_driver::{
    AsyncQueue, Device, DmaBuffer, Job, JobError, JobOp, KeySlot, QueueConfig, QueuePair, SlotRef,
};

/// How long a handshake thread waits for the device before doing the work on the CPU.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Most jobs the submitter keeps in flight.
const RING_SIZE: u32 = 256;

/// Counters of the handshake offload.
#[derive(Debug, Default)]
pub struct HandshakeStats {
    /// Signatures made by the device.
    pub device_signatures: AtomicU64,
    /// Key exchanges (both halves) done by the device.
    pub device_key_exchanges: AtomicU64,
    /// Operations done on the CPU because the device could not (failure, timeout, lost).
    pub cpu_fallbacks: AtomicU64,
    /// Operations done on the CPU because the device does not offer them (scheme, group,
    /// key format).
    pub cpu_by_choice: AtomicU64,
    /// Handshakes that failed because their device failed midway through a key exchange.
    pub failed_midway: AtomicU64,
    /// Certificate keys loaded into the device again after it was reset.
    pub key_reloads: AtomicU64,
    /// Handshakes paused on their fiber until the device answers.
    pub waiting: AtomicU64,
}

/// One public-key job and where its answer goes.
struct Request {
    op: PkeOp,
    reply: mpsc::SyncSender<Result<Vec<u8>, JobError>>,
}

enum PkeOp {
    Sign {
        slot: SlotRef,
        rsa: Option<(RsaPadding, HashAlgorithm)>,
        digest: Vec<u8>,
        out_len: usize,
    },
    Generate {
        slot: SlotRef,
        kind: PrivateKeyType,
    },
    Derive {
        slot: SlotRef,
        peer: Vec<u8>,
    },
}

struct Shared {
    queue: Mutex<VecDeque<Request>>,
    /// An eventfd requesters write after queueing work.
    wake: OwnedFd,
    stop: AtomicBool,
}

impl Shared {
    fn wake(&self) {
        // A full counter still reads as readable: a failed add loses nothing.
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }
}

/// Reads and clears an eventfd's counter.
fn drain(fd: impl AsFd) {
    let mut counter = [0u8; 8];
    let _ = rustix::io::read(fd, &mut counter);
}

/// Sleeps until a requester or the device's interrupt signals, or `timeout` passes.
fn sleep_until_signalled(
    wake: &OwnedFd,
    interrupt: Option<&tlsaccel_driver::EventFd>,
    timeout: Duration,
) {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let timeout = Timespec {
        tv_sec: timeout.as_secs() as i64,
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    let mut fds = vec![PollFd::new(wake, PollFlags::IN)];
    if let Some(interrupt) = interrupt {
        fds.push(PollFd::new(interrupt, PollFlags::IN));
    }
    let _ = rustix::event::poll(&mut fds, Some(&timeout));
    drain(wake);
    if let Some(interrupt) = interrupt {
        interrupt.drain();
    }
}

/// The public-key queue's settings: an interrupt for every completion (each job is long).
fn pke_queue_config() -> QueueConfig {
    QueueConfig {
        size: RING_SIZE,
        public_key: true,
        interrupts: true,
        coalesce_count: 1,
        coalesce_usecs: 0,
    }
}

/// Longest the submitter sleeps while jobs are in flight (it expires them when the device
/// stops answering) or while idle (it notices a stop).
const SUBMITTER_TICK: Duration = Duration::from_millis(20);

/// The device's public-key queue, shared by every handshake thread.
pub struct PkeEngine {
    device: Arc<Device>,
    /// Cleared by the recovery manager while the device is lost or not yet checked after a
    /// reset: everything then runs on the CPU.
    in_service: AtomicBool,
    shared: Arc<Shared>,
    submitter: Option<std::thread::JoinHandle<()>>,
    /// The public-key queue of handshakes that run on a fiber (`tls::handshake`): their
    /// operations are awaited by the connection's task, so no thread waits for the device.
    /// Made on first use inside the runtime, replaced when broken.
    fiber_queue: Mutex<Option<Arc<AsyncQueue>>>,
    stats: Arc<HandshakeStats>,
}

impl std::fmt::Debug for PkeEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PkeEngine")
            .field("device", &self.device.info().name)
            .finish_non_exhaustive()
    }
}

impl PkeEngine {
    /// Takes a public-key queue of `device` and starts the submitter thread.
    pub fn new(device: Arc<Device>) -> Result<Arc<Self>, tlsaccel_driver::DeviceError> {
        let pair = device.queue(pke_queue_config())?;
        let wake = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::NONBLOCK | rustix::event::EventfdFlags::CLOEXEC,
        )
        .map_err(|e| tlsaccel_driver::DeviceError::Thread(e.into()))?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            wake,
            stop: AtomicBool::new(false),
        });
        let submitter = {
            let shared = Arc::clone(&shared);
            let device = Arc::clone(&device);
            std::thread::Builder::new()
                .name("tlsaccel-pke".into())
                .spawn(move || submitter(device, pair, shared))
                .map_err(tlsaccel_driver::DeviceError::Thread)?
        };
        Ok(Arc::new(Self {
            device,
            in_service: AtomicBool::new(true),
            shared,
            submitter: Some(submitter),
            fiber_queue: Mutex::new(None),
            stats: Arc::new(HandshakeStats::default()),
        }))
    }

    /// The device.
    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }

    /// The offload counters.
    pub fn stats(&self) -> &Arc<HandshakeStats> {
        &self.stats
    }

    /// Takes the device out of (or back into) service for handshakes.
    pub fn set_in_service(&self, in_service: bool) {
        self.in_service.store(in_service, Ordering::Release);
    }

    /// True while handshake operations may go to the device.
    pub fn in_service(&self) -> bool {
        self.in_service.load(Ordering::Acquire) && !self.device.is_lost()
    }

    /// Runs one operation on the device and waits for it (bounded by `REQUEST_TIMEOUT`).
    fn run(&self, op: PkeOp) -> Result<Vec<u8>, JobError> {
        let mut results = self.run_in_order(vec![op]);
        results.pop().unwrap_or(Err(JobError::DeviceLost))
    }

    /// Queues `ops` together, so they reach the ring in this order (usually under one
    /// doorbell), and waits for all of them: on a fiber by pausing it (no thread waits),
    /// elsewhere by blocking this thread.
    fn run_in_order(&self, ops: Vec<PkeOp>) -> Vec<Result<Vec<u8>, JobError>> {
        if !self.in_service() {
            return ops.iter().map(|_| Err(JobError::DeviceLost)).collect();
        }
        if tlsaccel_fiber::in_fiber() {
            if let Some(queue) = self.fiber_queue() {
                return self.run_on_fiber(&queue, ops);
            }
        }
        let mut answers = Vec::with_capacity(ops.len());
        {
            let mut queue = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            for op in ops {
                let (reply, answer) = mpsc::sync_channel(1);
                queue.push_back(Request { op, reply });
                answers.push(answer);
            }
        }
        self.shared.wake();
        // A runtime worker waiting here gives its other tasks to another thread meanwhile.
        crate::tls::blocking(|| {
            answers
                .into_iter()
                .map(|answer| {
                    answer
                        .recv_timeout(REQUEST_TIMEOUT)
                        .unwrap_or(Err(JobError::TimedOut))
                })
                .collect()
        })
    }
}

impl PkeEngine {
    /// The fiber queue, made (in the runtime of the calling task) when there is none or the
    /// last one broke. `None` when no queue can be had: the thread then blocks as elsewhere.
    fn fiber_queue(&self) -> Option<Arc<AsyncQueue>> {
        let mut slot = self.fiber_queue.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(queue) = slot.as_ref().filter(|queue| !queue.is_broken()) {
            return Some(Arc::clone(queue));
        }
        // The queue's completions are reaped by a task of the current runtime.
        tokio::runtime::Handle::try_current().ok()?;
        let pair = match self.device.queue(pke_queue_config()) {
            Ok(pair) => pair,
            Err(error) => {
                tracing::debug!(%error, "no public-key queue for fibers; handshakes block");
                return None;
            }
        };
        let queue = Arc::new(AsyncQueue::new(pair, REQUEST_TIMEOUT).ok()?);
        *slot = Some(Arc::clone(&queue));
        Some(queue)
    }

    /// Runs `ops` in order on `queue` while the calling fiber is paused.
    fn run_on_fiber(
        &self,
        queue: &Arc<AsyncQueue>,
        ops: Vec<PkeOp>,
    ) -> Vec<Result<Vec<u8>, JobError>> {
        let count = ops.len();
        let mut jobs = Vec::with_capacity(count);
        let mut outputs = Vec::with_capacity(count);
        for op in ops {
            match prepare(&self.device, op, 0) {
                // The job's spans hold its input and output memory until the device is done.
                Ok((job, _input, output)) => {
                    jobs.push(job.op);
                    outputs.push(output);
                }
                Err(error) => return (0..count).map(|_| Err(error)).collect(),
            }
        }
        let queue = Arc::clone(queue);
        let work = async move {
            let results = queue.run_batch(&jobs).await;
            results
                .into_iter()
                .zip(outputs)
                .map(|(result, output)| {
                    let answer = result.and_then(|out| {
                        output
                            .to_vec(0, out.len as usize)
                            .map_err(|_| JobError::BadCompletion("output outside its buffer"))
                    });
                    let _ = output.zeroize();
                    answer
                })
                .collect::<Vec<_>>()
        };
        self.stats.waiting.fetch_add(1, Ordering::Relaxed);
        let _waited = Decrement(&self.stats.waiting);
        #[allow(unsafe_code)]
        // SAFETY: called from rustls' signer or key exchange (through `run` / `run_in_order`),
        // which hold nothing bound to the thread across this call: this function's locals are
        // moved into `work` or are `Send` (the gauge guard's `&AtomicU64`), and rustls'
        // handshake keeps only its own `Send` state on the fiber's stack.
        let waited = unsafe { tlsaccel_fiber::suspend_until(work) };
        match waited {
            Ok(results) => results,
            // Not on a fiber after all (checked by the caller): the work is dropped unrun.
            Err(_) => (0..count).map(|_| Err(JobError::DeviceLost)).collect(),
        }
    }
}

/// Takes one off a gauge when dropped (also when a paused handshake is dropped).
struct Decrement<'a>(&'a AtomicU64);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for PkeEngine {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake();
        if let Some(handle) = self.submitter.take() {
            let _ = handle.join();
        }
    }
}

/// A request on its way through the ring: its buffers and its requester.
struct InFlight {
    reply: mpsc::SyncSender<Result<Vec<u8>, JobError>>,
    _input: Option<DmaBuffer>,
    output: DmaBuffer,
}

fn submitter(device: Arc<Device>, mut pair: QueuePair, shared: Arc<Shared>) {
    let mut in_flight: std::collections::HashMap<u64, InFlight> = std::collections::HashMap::new();
    let mut next_tag = 0u64;
    let mut jobs = Vec::new();
    loop {
        // Take everything queued that fits the ring: one doorbell for the lot.
        {
            let mut queue = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            if queue.is_empty() && in_flight.is_empty() {
                if shared.stop.load(Ordering::Acquire) {
                    return;
                }
                drop(queue);
                sleep_until_signalled(&shared.wake, None, SUBMITTER_TICK);
                continue;
            }
            let room = pair.free_slots() as usize;
            jobs.clear();
            while jobs.len() < room {
                let Some(request) = queue.pop_front() else {
                    break;
                };
                next_tag += 1;
                match prepare(&device, request.op, next_tag) {
                    Ok((job, input, output)) => {
                        jobs.push(job);
                        in_flight.insert(
                            next_tag,
                            InFlight {
                                reply: request.reply,
                                _input: input,
                                output,
                            },
                        );
                    }
                    Err(error) => {
                        let _ = request.reply.send(Err(error));
                    }
                }
            }
        }
        if !jobs.is_empty() {
            if let Err(error) = pair.submit(&jobs) {
                tracing::warn!(%error, "public-key queue refused jobs");
                for job in &jobs {
                    if let Some(done) = in_flight.remove(&job.user_data) {
                        let _ = done.reply.send(Err(JobError::DeviceLost));
                    }
                }
            }
        }
        let mut finished = Vec::new();
        pair.poll(|c| finished.push(c));
        pair.expire(REQUEST_TIMEOUT, |c| finished.push(c));
        for completion in finished {
            if let Some(done) = in_flight.remove(&completion.user_data) {
                let answer = completion.result.and_then(|out| {
                    done.output
                        .to_vec(0, out.len as usize)
                        .map_err(|_| JobError::BadCompletion("output outside its buffer"))
                });
                let _ = done.output.zeroize();
                let _ = done.reply.send(answer);
            }
        }
        if pair.is_broken() {
            // The device was reset or timed out: fail everything and take a fresh queue.
            for (_, done) in in_flight.drain() {
                let _ = done.reply.send(Err(JobError::DeviceLost));
            }
            match device.queue(pke_queue_config()) {
                Ok(fresh) => pair = fresh,
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        if !in_flight.is_empty() {
            // The completion interrupt (or a new request) wakes the submitter; the tick
            // bounds how late a job of a silent device expires.
            sleep_until_signalled(&shared.wake, pair.interrupt().map(|i| &**i), SUBMITTER_TICK);
        }
    }
}

/// DMA buffers and a job for one request.
fn prepare(
    device: &Arc<Device>,
    op: PkeOp,
    tag: u64,
) -> Result<(Job, Option<DmaBuffer>, DmaBuffer), JobError> {
    let pool = device.pool();
    let buffer = |len: usize| pool.alloc(len.max(1)).map_err(|_| JobError::DeviceLost);
    let with = |bytes: &[u8]| -> Result<DmaBuffer, JobError> {
        let b = buffer(bytes.len())?;
        b.write(0, bytes).map_err(|_| JobError::DeviceLost)?;
        Ok(b)
    };
    let span = |b: &DmaBuffer, len: usize| b.span(0, len).map_err(|_| JobError::DeviceLost);
    let (op, input, output) = match op {
        PkeOp::Sign {
            slot,
            rsa,
            digest,
            out_len,
        } => {
            let input = with(&digest)?;
            let output = buffer(out_len)?;
            let digest_span = span(&input, digest.len())?;
            let op = match rsa {
                None => JobOp::EcdsaSign {
                    slot,
                    digest: digest_span,
                    dst: output.whole(),
                },
                Some((padding, hash)) => JobOp::RsaSign {
                    slot,
                    padding,
                    hash,
                    digest: digest_span,
                    dst: output.whole(),
                },
            };
            (op, Some(input), output)
        }
        PkeOp::Generate { slot, kind } => {
            let output = buffer(kind.key_share_len().unwrap_or(65))?;
            (
                JobOp::KxGenerate {
                    slot,
                    kind,
                    dst: output.whole(),
                },
                None,
                output,
            )
        }
        PkeOp::Derive { slot, peer } => {
            let input = with(&peer)?;
            let output = buffer(32)?;
            (
                JobOp::KxDerive {
                    slot,
                    peer: span(&input, peer.len())?,
                    dst: output.whole(),
                },
                Some(input),
                output,
            )
        }
    };
    Ok((Job { user_data: tag, op }, input, output))
}

/// A signing key held in a device slot, with a CPU copy for fallback.
///
/// A device reset empties every slot: the key is then loaded into a new one (at most once per
/// `KEY_RELOAD_INTERVAL`) as soon as the device is back in service, so certificate signing
/// returns to the device without a reload of the configuration.
struct DeviceSigningKey {
    engine: Arc<PkeEngine>,
    slot: Mutex<Arc<KeySlot>>,
    /// The PKCS#8 key, for loading it again after a reset (zeroized on drop; the CPU copy
    /// holds the same secret for as long).
    der: zeroize::Zeroizing<Vec<u8>>,
    last_reload: Mutex<Option<Instant>>,
    kind: PrivateKeyType,
    max_signature_len: usize,
    cpu: Arc<dyn SigningKey>,
}

impl std::fmt::Debug for DeviceSigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself.
        f.debug_struct("DeviceSigningKey")
            .field("kind", &self.kind)
            .field("algorithm", &self.cpu.algorithm())
            .finish_non_exhaustive()
    }
}

/// Least time between two attempts to load a certificate key into a device again.
const KEY_RELOAD_INTERVAL: Duration = Duration::from_secs(1);

impl DeviceSigningKey {
    /// The key's slot on the live device incarnation, loading it again if a reset emptied the
    /// old one. `None`: sign on the CPU this time.
    fn live_slot(&self) -> Option<Arc<KeySlot>> {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_live() {
            return Some(Arc::clone(&slot));
        }
        if !self.engine.in_service() {
            return None;
        }
        {
            let mut last = self.last_reload.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|at| at.elapsed() < KEY_RELOAD_INTERVAL) {
                return None;
            }
            *last = Some(Instant::now());
        }
        match self.engine.device.load_private_key(self.kind, &self.der) {
            Ok(fresh) => {
                *slot = Arc::new(fresh);
                self.engine
                    .stats
                    .key_reloads
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!("certificate key loaded into the device again after a reset");
                Some(Arc::clone(&slot))
            }
            Err(error) => {
                tracing::warn!(%error, "could not load the certificate key into the device again");
                None
            }
        }
    }
}

impl SigningKey for DeviceSigningKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let cpu = self.cpu.choose_scheme(offered)?;
        let scheme = cpu.scheme();
        let device = device_scheme(self.kind, scheme);
        if device.is_none() {
            self.engine
                .stats
                .cpu_by_choice
                .fetch_add(1, Ordering::Relaxed);
        }
        let slot = device.and_then(|_| self.live_slot());
        Some(Box::new(DeviceSigner {
            engine: Arc::clone(&self.engine),
            slot,
            device,
            max_signature_len: self.max_signature_len,
            cpu,
        }))
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        self.cpu.public_key()
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        self.cpu.algorithm()
    }
}

/// How the device makes a signature scheme with a key of `kind`: the digest, and for RSA the
/// padding. `None`: the device does not offer it (SHA-1, Ed25519, P-521, ...).
fn device_scheme(
    kind: PrivateKeyType,
    scheme: SignatureScheme,
) -> Option<(
    &'static digest::Algorithm,
    Option<(RsaPadding, HashAlgorithm)>,
)> {
    use SignatureScheme as S;
    let rsa = |padding, hash| Some((padding, hash));
    match (kind, scheme) {
        (PrivateKeyType::ECDSA_P256, S::ECDSA_NISTP256_SHA256) => Some((&digest::SHA256, None)),
        (PrivateKeyType::ECDSA_P384, S::ECDSA_NISTP384_SHA384) => Some((&digest::SHA384, None)),
        (PrivateKeyType::RSA, S::RSA_PKCS1_SHA256) => Some((
            &digest::SHA256,
            rsa(RsaPadding::PKCS1_V15, HashAlgorithm::SHA256),
        )),
        (PrivateKeyType::RSA, S::RSA_PKCS1_SHA384) => Some((
            &digest::SHA384,
            rsa(RsaPadding::PKCS1_V15, HashAlgorithm::SHA384),
        )),
        (PrivateKeyType::RSA, S::RSA_PKCS1_SHA512) => Some((
            &digest::SHA512,
            rsa(RsaPadding::PKCS1_V15, HashAlgorithm::SHA512),
        )),
        (PrivateKeyType::RSA, S::RSA_PSS_SHA256) => {
            Some((&digest::SHA256, rsa(RsaPadding::PSS, HashAlgorithm::SHA256)))
        }
        (PrivateKeyType::RSA, S::RSA_PSS_SHA384) => {
            Some((&digest::SHA384, rsa(RsaPadding::PSS, HashAlgorithm::SHA384)))
        }
        (PrivateKeyType::RSA, S::RSA_PSS_SHA512) => {
            Some((&digest::SHA512, rsa(RsaPadding::PSS, HashAlgorithm::SHA512)))
        }
        _ => None,
    }
}

struct DeviceSigner {
    engine: Arc<PkeEngine>,
    /// The key's slot, when the device can sign this time.
    slot: Option<Arc<KeySlot>>,
    device: Option<(
        &'static digest::Algorithm,
        Option<(RsaPadding, HashAlgorithm)>,
    )>,
    max_signature_len: usize,
    cpu: Box<dyn Signer>,
}

impl std::fmt::Debug for DeviceSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceSigner")
            .field("scheme", &self.cpu.scheme())
            .field("on_device", &self.device.is_some())
            .finish()
    }
}

impl Signer for DeviceSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let Some((hash, rsa)) = self.device else {
            return self.cpu.sign(message);
        };
        let stats = &self.engine.stats;
        if let Some(slot) = self.slot.as_ref().filter(|slot| slot.is_live()) {
            let digest = digest::digest(hash, message).as_ref().to_vec();
            match self.engine.run(PkeOp::Sign {
                slot: slot.slot_ref(),
                rsa,
                digest,
                out_len: self.max_signature_len,
            }) {
                Ok(signature) => {
                    stats.device_signatures.fetch_add(1, Ordering::Relaxed);
                    return Ok(signature);
                }
                Err(error) => tracing::warn!(%error, "device signature failed; signing on the CPU"),
            }
        }
        stats.cpu_fallbacks.fetch_add(1, Ordering::Relaxed);
        self.cpu.sign(message)
    }

    fn scheme(&self) -> SignatureScheme {
        self.cpu.scheme()
    }
}

/// Loads certificate keys into the device (PKCS#8 ECDSA P-256/P-384 and RSA), keeping a CPU
/// copy for fallback; anything else stays on the CPU.
#[derive(Debug)]
struct DeviceKeyProvider {
    engine: Arc<PkeEngine>,
    cpu: &'static dyn KeyProvider,
}

impl KeyProvider for DeviceKeyProvider {
    fn load_private_key(
        &self,
        key_der: PrivateKeyDer<'static>,
    ) -> Result<Arc<dyn SigningKey>, rustls::Error> {
        let cpu = self.cpu.load_private_key(key_der.clone_key())?;
        let PrivateKeyDer::Pkcs8(pkcs8) = &key_der else {
            self.engine
                .stats
                .cpu_by_choice
                .fetch_add(1, Ordering::Relaxed);
            return Ok(cpu);
        };
        let der = pkcs8.secret_pkcs8_der();
        let (kind, max_signature_len) = match cpu.algorithm() {
            SignatureAlgorithm::ECDSA => {
                use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
                if EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, der).is_ok() {
                    (PrivateKeyType::ECDSA_P256, 72)
                } else {
                    (PrivateKeyType::ECDSA_P384, 104)
                }
            }
            SignatureAlgorithm::RSA => match aws_lc_rs::signature::RsaKeyPair::from_pkcs8(der) {
                Ok(key) => (PrivateKeyType::RSA, key.public_modulus_len()),
                Err(_) => return Ok(cpu),
            },
            _ => {
                self.engine
                    .stats
                    .cpu_by_choice
                    .fetch_add(1, Ordering::Relaxed);
                return Ok(cpu);
            }
        };
        match self.engine.device.load_private_key(kind, der) {
            Ok(slot) => Ok(Arc::new(DeviceSigningKey {
                engine: Arc::clone(&self.engine),
                slot: Mutex::new(Arc::new(slot)),
                der: zeroize::Zeroizing::new(der.to_vec()),
                last_reload: Mutex::new(None),
                kind,
                max_signature_len,
                cpu,
            })),
            Err(error) => {
                tracing::warn!(%error, "could not load the key into the device; signing on the CPU");
                self.engine
                    .stats
                    .cpu_fallbacks
                    .fetch_add(1, Ordering::Relaxed);
                Ok(cpu)
            }
        }
    }
}

/// X25519 or secp256r1 with the private half generated and used on the device.
#[derive(Debug)]
struct DeviceKxGroup {
    engine: Arc<PkeEngine>,
    kind: PrivateKeyType,
    cpu: &'static dyn SupportedKxGroup,
}

impl SupportedKxGroup for DeviceKxGroup {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, rustls::Error> {
        let stats = &self.engine.stats;
        match self.engine.device.reserve_key_slot() {
            Ok(mut slot) => match self.engine.run(PkeOp::Generate {
                slot: slot.slot_ref(),
                kind: self.kind,
            }) {
                Ok(public) => {
                    slot.mark_filled();
                    return Ok(Box::new(DeviceKeyExchange {
                        engine: Arc::clone(&self.engine),
                        slot,
                        public,
                        group: self.cpu.name(),
                    }));
                }
                Err(error) => {
                    // A refusal left the slot empty; any other failure may not have.
                    if error.status().is_none() {
                        slot.mark_filled();
                    }
                    tracing::warn!(%error, "device key generation failed; using the CPU")
                }
            },
            Err(error) => tracing::warn!(%error, "no device key slot; using the CPU"),
        }
        stats.cpu_fallbacks.fetch_add(1, Ordering::Relaxed);
        self.cpu.start()
    }

    /// A TLS 1.3 server knows the peer's share up front: generation and derivation go to the
    /// device together, one round trip instead of two. The queue accepts them in order, so
    /// the derivation finds the key the generation just made, and empties the slot.
    fn start_and_complete(
        &self,
        peer_pub_key: &[u8],
    ) -> Result<rustls::crypto::CompletedKeyExchange, rustls::Error> {
        let stats = &self.engine.stats;
        let Ok(mut slot) = self.engine.device.reserve_key_slot() else {
            stats.cpu_fallbacks.fetch_add(1, Ordering::Relaxed);
            return self.cpu.start_and_complete(peer_pub_key);
        };
        let mut results = self.engine.run_in_order(vec![
            PkeOp::Generate {
                slot: slot.slot_ref(),
                kind: self.kind,
            },
            PkeOp::Derive {
                slot: slot.slot_ref(),
                peer: peer_pub_key.to_vec(),
            },
        ]);
        let derived = results.pop().unwrap_or(Err(JobError::DeviceLost));
        let generated = results.pop().unwrap_or(Err(JobError::DeviceLost));
        match (generated, derived) {
            (Ok(public), Ok(secret)) => {
                stats.device_key_exchanges.fetch_add(1, Ordering::Relaxed);
                Ok(rustls::crypto::CompletedKeyExchange {
                    group: self.cpu.name(),
                    pub_key: public,
                    secret: SharedSecret::from(secret),
                })
            }
            (Ok(_), Err(JobError::Device { status, .. })) => {
                // The peer's share was refused; the device emptied the slot.
                Err(rustls::Error::General(format!(
                    "key exchange refused: {status}"
                )))
            }
            (generated, derived) => {
                // The device failed: the slot may hold a key, so let the handle destroy it,
                // and do this exchange on the CPU (nothing was sent to the peer yet).
                if generated.is_ok() || derived.as_ref().err().is_some_and(|e| e.status().is_none())
                {
                    slot.mark_filled();
                }
                tracing::warn!("device key exchange failed; using the CPU");
                stats.cpu_fallbacks.fetch_add(1, Ordering::Relaxed);
                self.cpu.start_and_complete(peer_pub_key)
            }
        }
    }

    fn name(&self) -> NamedGroup {
        self.cpu.name()
    }
}

struct DeviceKeyExchange {
    engine: Arc<PkeEngine>,
    slot: KeySlot,
    public: Vec<u8>,
    group: NamedGroup,
}

impl ActiveKeyExchange for DeviceKeyExchange {
    fn complete(mut self: Box<Self>, peer_pub_key: &[u8]) -> Result<SharedSecret, rustls::Error> {
        let result = self.engine.run(PkeOp::Derive {
            slot: self.slot.slot_ref(),
            peer: peer_pub_key.to_vec(),
        });
        let stats = &self.engine.stats;
        match result {
            Ok(secret) => {
                self.slot.mark_emptied();
                stats.device_key_exchanges.fetch_add(1, Ordering::Relaxed);
                Ok(SharedSecret::from(secret))
            }
            Err(JobError::Device { status, .. }) => {
                // The device took the key out of the slot when it accepted the job.
                self.slot.mark_emptied();
                Err(rustls::Error::General(format!(
                    "key exchange refused: {status}"
                )))
            }
            Err(error) => {
                stats.failed_midway.fetch_add(1, Ordering::Relaxed);
                Err(rustls::Error::General(format!(
                    "device key exchange failed: {error}"
                )))
            }
        }
    }

    fn pub_key(&self) -> &[u8] {
        &self.public
    }

    fn group(&self) -> NamedGroup {
        self.group
    }
}

/// A provider like aws-lc-rs' default one, with X25519 and secp256r1 key exchange and
/// certificate keys (ECDSA P-256/P-384, RSA) on the device, ordered first. Its key provider
/// and groups are leaked once (rustls wants `'static` references): build one provider per
/// device and keep it.
pub fn device_provider(engine: &Arc<PkeEngine>) -> CryptoProvider {
    let cpu = rustls::crypto::aws_lc_rs::default_provider();
    let mut device_groups: Vec<&'static dyn SupportedKxGroup> = Vec::new();
    let mut others: Vec<&'static dyn SupportedKxGroup> = Vec::new();
    for group in &cpu.kx_groups {
        let kind = match group.name() {
            NamedGroup::X25519 => Some(PrivateKeyType::X25519),
            NamedGroup::secp256r1 => Some(PrivateKeyType::ECDH_P256),
            _ => None,
        };
        match kind {
            Some(kind) => device_groups.push(Box::leak(Box::new(DeviceKxGroup {
                engine: Arc::clone(engine),
                kind,
                cpu: *group,
            }))),
            None => others.push(*group),
        }
    }
    device_groups.extend(others);
    CryptoProvider {
        kx_groups: device_groups,
        key_provider: Box::leak(Box::new(DeviceKeyProvider {
            engine: Arc::clone(engine),
            cpu: cpu.key_provider,
        })),
        ..cpu
    }
}
