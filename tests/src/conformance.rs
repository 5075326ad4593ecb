//! The device conformance suite: one set of cases every backend must pass. Each case takes an
//! opened [`Device`]; [`conformance_suite!`](crate::conformance_suite) turns the list into
//! `#[test]` functions for one backend, and [`CASES`] lets a non-test runner (the guest test)
//! iterate them.
//!
//! Cases that need the device to misbehave on command use [`ModelFaults`] (device-spec §9):
//! the reference model's fault-injection registers, which reach the simulator over every
//! transport, or on the RTL its test bench, which shows some of the faults. A case whose
//! faults the device cannot show (hardware; the RTL, for some) says so with
//! [`Outcome::Skipped`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use tlsaccel_driver::abi::regs::{self, Counter};
use tlsaccel_driver::abi::{
    AeadAlgorithm, Capabilities, Descriptor, FaultCode, KeyDirection, ModelFault as Fault, Opcode,
    QueueStatus, RecordProtocol, Status, NONCE_LEN, TAG_LEN,
};
use tlsaccel_driver::dma::DmaRegion;
use tlsaccel_driver::{
    AsyncQueue, Device, DmaBuffer, Iova, Job, JobError, JobOp, JobOutput, KeyMaterial, KeySlot,
    ModelFaults, QueueConfig, QueuePair,
};

use crate::peer::{self, TlsVersion, TrafficKey};
use crate::wycheproof;

/// How a case ended when it did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Passed(String),
    Skipped(String),
}

/// A conformance case.
pub type CaseFn = fn(&Arc<Device>) -> Result<Outcome>;

/// Every case, by name.
pub const CASES: &[(&str, CaseFn)] = &[
    ("identity_and_capabilities", identity_and_capabilities),
    (
        "nop_jobs_complete_with_their_cookies",
        nop_jobs_complete_with_their_cookies,
    ),
    ("wycheproof_aes_gcm", wycheproof_aes_gcm),
    ("wycheproof_chacha20_poly1305", wycheproof_chacha20_poly1305),
    (
        "tls13_records_interoperate_with_rustls",
        tls13_records_interoperate_with_rustls,
    ),
    (
        "tls12_records_interoperate_with_rustls",
        tls12_records_interoperate_with_rustls,
    ),
    ("ring_wraps_many_times", ring_wraps_many_times),
    (
        "records_of_one_key_keep_submission_order",
        records_of_one_key_keep_submission_order,
    ),
    (
        "full_ring_applies_backpressure",
        full_ring_applies_backpressure,
    ),
    (
        "concurrent_submitters_on_several_queues",
        concurrent_submitters_on_several_queues,
    ),
    (
        "out_of_order_completions_reach_their_callers",
        out_of_order_completions_reach_their_callers,
    ),
    (
        "hostile_descriptors_get_error_completions",
        hostile_descriptors_get_error_completions,
    ),
    (
        "bogus_completions_are_detected",
        bogus_completions_are_detected,
    ),
    (
        "corrupted_tag_fails_authentication",
        corrupted_tag_fails_authentication,
    ),
    ("key_slots_are_released", key_slots_are_released),
    (
        "async_queue_with_coalesced_interrupts",
        async_queue_with_coalesced_interrupts,
    ),
    ("lost_completion_times_out", lost_completion_times_out),
    ("reset_fails_jobs_in_flight", reset_fails_jobs_in_flight),
    (
        "disabled_queue_is_held_until_the_engine_lets_go",
        disabled_queue_is_held_until_the_engine_lets_go,
    ),
    (
        "unmap_under_a_held_job_faults_it",
        unmap_under_a_held_job_faults_it,
    ),
    (
        "wycheproof_rsa_pkcs1_signatures",
        crate::public_key::wycheproof_rsa_pkcs1_signatures,
    ),
    ("wycheproof_x25519", crate::public_key::wycheproof_x25519),
    (
        "wycheproof_ecdh_p256",
        crate::public_key::wycheproof_ecdh_p256,
    ),
    (
        "device_signatures_verify_independently",
        crate::public_key::device_signatures_verify_independently,
    ),
    (
        "device_key_exchange_agrees_with_the_host",
        crate::public_key::device_key_exchange_agrees_with_the_host,
    ),
    (
        "public_key_bursts_do_not_hold_up_records",
        crate::public_key::public_key_bursts_do_not_hold_up_records,
    ),
    ("rsa_key_sizes", crate::public_key::rsa_key_sizes),
];

/// Instantiates every conformance case as a `#[test]` for a backend. `$open` is an expression
/// that returns `anyhow::Result<Arc<Device>>`.
#[macro_export]
macro_rules! conformance_suite {
    ($open:expr) => {
        $crate::conformance_suite!(@cases $open;
            identity_and_capabilities,
            nop_jobs_complete_with_their_cookies,
            wycheproof_aes_gcm,
            wycheproof_chacha20_poly1305,
            tls13_records_interoperate_with_rustls,
            tls12_records_interoperate_with_rustls,
            ring_wraps_many_times,
            records_of_one_key_keep_submission_order,
            full_ring_applies_backpressure,
            concurrent_submitters_on_several_queues,
            out_of_order_completions_reach_their_callers,
            hostile_descriptors_get_error_completions,
            bogus_completions_are_detected,
            corrupted_tag_fails_authentication,
            key_slots_are_released,
            async_queue_with_coalesced_interrupts,
            lost_completion_times_out,
            reset_fails_jobs_in_flight,
            disabled_queue_is_held_until_the_engine_lets_go,
            unmap_under_a_held_job_faults_it);
        $crate::conformance_suite!(@public_key $open;
            wycheproof_rsa_pkcs1_signatures,
            wycheproof_x25519,
            wycheproof_ecdh_p256,
            device_signatures_verify_independently,
            device_key_exchange_agrees_with_the_host,
            public_key_bursts_do_not_hold_up_records,
            rsa_key_sizes);
    };
    (@public_key $open:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                let device = $open.expect("the backend opens");
                match $crate::public_key::$case(&device) {
                    Ok(outcome) => println!("{}: {:?}", stringify!($case), outcome),
                    Err(error) => panic!("{}: {:#}", stringify!($case), error),
                }
            }
        )*
    };
    (@cases $open:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                let device = $open.expect("the backend opens");
                match $crate::conformance::$case(&device) {
                    Ok(outcome) => println!("{}: {:?}", stringify!($case), outcome),
                    Err(error) => panic!("{}: {:#}", stringify!($case), error),
                }
            }
        )*
    };
}

const TIMEOUT: Duration = Duration::from_secs(10);

fn queue(device: &Arc<Device>, size: u32) -> Result<QueuePair> {
    Ok(device.queue(QueueConfig {
        size,
        ..QueueConfig::default()
    })?)
}

/// Runs one job and returns its result.
pub fn run_one(pair: &mut QueuePair, op: JobOp) -> Result<Result<JobOutput, JobError>> {
    let mut result = None;
    pair.run(&[Job { user_data: 7, op }], TIMEOUT, |done| {
        result = Some(done.result)
    })?;
    result.ok_or_else(|| anyhow!("job vanished"))
}

fn buffer_with(device: &Arc<Device>, data: &[u8], capacity: usize) -> Result<DmaBuffer> {
    let buf = device.pool().alloc(capacity.max(data.len()).max(1))?;
    buf.write(0, data)?;
    Ok(buf)
}

fn status_of(result: Result<JobOutput, JobError>) -> Option<Status> {
    match result {
        Ok(_) => Some(Status::OK),
        Err(e) => e.status(),
    }
}

fn simulator(device: &Arc<Device>) -> Option<&tlsaccel_sim::Device> {
    device.transport().simulator()
}

/// The device's fault injection with every fault in `needs`, or the skip a case reports on
/// a device without it.
fn model_faults(
    device: &Arc<Device>,
    needs: &[FaultCode],
) -> std::result::Result<ModelFaults, Outcome> {
    ModelFaults::new(device)
        .and_then(|faults| faults.require(needs).map(|()| faults))
        .map_err(|error| Outcome::Skipped(format!("needs fault injection: {error}")))
}

/// Lifts an injected stall when dropped, so that a case that fails half-way does not leave
/// the device holding jobs. Needs STALL and RESUME.
struct StallGuard<'a>(&'a ModelFaults);

impl<'a> StallGuard<'a> {
    fn stall(faults: &'a ModelFaults) -> Result<Self> {
        faults.inject(Fault::Stall)?;
        Ok(Self(faults))
    }
}

impl Drop for StallGuard<'_> {
    fn drop(&mut self) {
        // The case checked RESUME was available; a drop cannot fail the case, so say it.
        if let Err(error) = self.0.inject(Fault::Resume) {
            eprintln!("the stall was not lifted: {error}");
        }
    }
}

/// What a case that holds jobs with a stall needs.
const STALL: &[FaultCode] = &[FaultCode::STALL, FaultCode::RESUME];

/// Waits until `done` holds (polled every 200 µs, for up to 10 s), or fails with `what`.
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) -> Result<()> {
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !done() {
        ensure!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(())
}

/// Whether the device says it has `algorithm` (a driver must not use one it lacks, §2.2).
fn has_algorithm(device: &Arc<Device>, algorithm: AeadAlgorithm) -> bool {
    algorithm
        .capability()
        .is_some_and(|needed| device.info().capabilities.contains(needed))
}

/// The device reports a matching identity and the capabilities the suite needs.
pub fn identity_and_capabilities(device: &Arc<Device>) -> Result<Outcome> {
    let info = device.info();
    ensure!(info.version.0 == tlsaccel_driver::abi::VERSION_MAJOR);
    ensure!(
        info.queues >= 2,
        "a device needs an admin queue and a data queue"
    );
    ensure!(info.key_slots >= 1);
    let heartbeat = device.heartbeat();
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while device.heartbeat() == heartbeat {
        ensure!(
            std::time::Instant::now() < deadline,
            "heartbeat does not move"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(Outcome::Passed(format!("{info:?}")))
}

/// NOPs complete, each with the caller's tag, and the device counts them.
pub fn nop_jobs_complete_with_their_cookies(device: &Arc<Device>) -> Result<Outcome> {
    let mut pair = queue(device, 256)?;
    let before = device.counter(Counter::JobsOk);
    let jobs: Vec<Job> = (0..1000)
        .map(|i| Job {
            user_data: 10_000 + i,
            op: JobOp::Nop,
        })
        .collect();
    let mut seen = Vec::new();
    pair.run(&jobs, TIMEOUT, |done| seen.push(done))?;
    ensure!(
        seen.len() == 1000,
        "{} completions for 1000 jobs",
        seen.len()
    );
    let mut tags: Vec<u64> = seen.iter().map(|c| c.user_data).collect();
    tags.sort_unstable();
    ensure!(
        tags == (10_000..11_000).collect::<Vec<_>>(),
        "tags do not match the jobs"
    );
    ensure!(seen.iter().all(|c| c.result
        == Ok(JobOutput {
            len: 0,
            content_type: 0,
            sequence_advanced: false
        })));
    ensure!(device.counter(Counter::JobsOk) - before >= 1000);
    Ok(Outcome::Passed("1000 NOPs".into()))
}

fn algorithm_for(vector: &wycheproof::AeadVector, chacha: bool) -> Option<AeadAlgorithm> {
    if vector.iv_bits != 96 || vector.tag_bits != 128 {
        return None;
    }
    match (chacha, vector.key_bits) {
        (true, 256) => Some(AeadAlgorithm::CHACHA20_POLY1305),
        (false, 128) => Some(AeadAlgorithm::AES_128_GCM),
        (false, 256) => Some(AeadAlgorithm::AES_256_GCM),
        _ => None,
    }
}

/// Runs an AEAD vector file through the device: valid vectors seal to the expected bytes and
/// open to the message; invalid ones fail to open with `AUTH_FAILED`.
fn wycheproof_file(device: &Arc<Device>, file: &str, chacha: bool) -> Result<Outcome> {
    let algorithms = if chacha {
        vec![AeadAlgorithm::CHACHA20_POLY1305]
    } else {
        vec![AeadAlgorithm::AES_128_GCM, AeadAlgorithm::AES_256_GCM]
    };
    if !algorithms.iter().any(|&a| has_algorithm(device, a))
        || !device.info().capabilities.contains(Capabilities::RAW_AEAD)
    {
        return Ok(Outcome::Skipped(format!(
            "the device lacks the AEAD of {file}"
        )));
    }
    let vectors = wycheproof::load_aead(file)?;
    let mut pair = queue(device, 64)?;
    let mut slots: HashMap<Vec<u8>, KeySlot> = HashMap::new();
    let (mut valid, mut invalid, mut skipped) = (0, 0, 0);
    for v in &vectors {
        let Some(algorithm) = algorithm_for(v, chacha).filter(|&a| has_algorithm(device, a)) else {
            skipped += 1;
            continue;
        };
        if !slots.contains_key(&v.key) {
            let material = KeyMaterial::raw(algorithm, &v.key)?;
            slots.insert(v.key.clone(), device.load_key(&material)?);
        }
        let slot = slots[&v.key].slot_ref();
        let nonce: [u8; NONCE_LEN] = v.iv.as_slice().try_into()?;
        let aad = buffer_with(device, &v.aad, 1)?;
        let aad_span = (!v.aad.is_empty()).then(|| aad.whole());
        let sealed_len = v.msg.len() + TAG_LEN;
        let plain = buffer_with(device, &v.msg, 1)?;
        let mut sealed_expected = v.ct.clone();
        sealed_expected.extend_from_slice(&v.tag);
        let sealed_in = buffer_with(device, &sealed_expected, 1)?;
        let out = device.pool().alloc(sealed_len.max(1))?;
        let context = || format!("{file} tcId {}", v.id);

        let open = run_one(
            &mut pair,
            JobOp::AeadOpen {
                slot: slot.clone(),
                nonce,
                aad: aad_span.clone(),
                src: sealed_in.span(0, sealed_expected.len())?,
                dst: out.span(0, v.msg.len())?,
            },
        )?;
        if v.result == "invalid" {
            ensure!(
                status_of(open) == Some(Status::AUTH_FAILED),
                "{}: invalid vector opened with {open:?}",
                context()
            );
            invalid += 1;
            continue;
        }
        let output = open.map_err(|e| anyhow!("{}: open failed: {e}", context()))?;
        ensure!(
            output.len as usize == v.msg.len(),
            "{}: open length",
            context()
        );
        ensure!(
            out.to_vec(0, v.msg.len())? == v.msg,
            "{}: open plaintext",
            context()
        );

        let sealed = run_one(
            &mut pair,
            JobOp::AeadSeal {
                slot,
                nonce,
                aad: aad_span,
                src: plain.span(0, v.msg.len())?,
                dst: out.span(0, sealed_len)?,
            },
        )?
        .map_err(|e| anyhow!("{}: seal failed: {e}", context()))?;
        ensure!(
            sealed.len as usize == sealed_len,
            "{}: seal length",
            context()
        );
        ensure!(
            out.to_vec(0, sealed_len)? == sealed_expected,
            "{}: ciphertext or tag differs",
            context()
        );
        valid += 1;
    }
    ensure!(valid > 0, "no vector ran");
    Ok(Outcome::Passed(format!(
        "{file}: {valid} valid, {invalid} invalid, {skipped} skipped (nonce not 96 bits or key size unsupported)"
    )))
}

/// Every AES-GCM vector the device supports (96-bit nonce, 128/256-bit key).
pub fn wycheproof_aes_gcm(device: &Arc<Device>) -> Result<Outcome> {
    wycheproof_file(device, "aes_gcm_test.json", false)
}

/// Every ChaCha20-Poly1305 vector with a 96-bit nonce.
pub fn wycheproof_chacha20_poly1305(device: &Arc<Device>) -> Result<Outcome> {
    wycheproof_file(device, "chacha20_poly1305_test.json", true)
}

fn load_record_key(
    device: &Arc<Device>,
    protocol: RecordProtocol,
    direction: KeyDirection,
    key: &TrafficKey,
) -> Result<KeySlot> {
    let material = KeyMaterial::new(
        key.algorithm,
        protocol,
        direction,
        &key.key,
        key.iv,
        key.sequence,
    )?;
    Ok(device.load_key(&material)?)
}

/// Seals `data` as records of at most `chunk` bytes on the device; returns the record bytes.
fn device_seal_records(
    device: &Arc<Device>,
    pair: &mut QueuePair,
    slot: &KeySlot,
    version: TlsVersion,
    data: &[u8],
    chunk: usize,
    padding: u16,
) -> Result<Vec<u8>> {
    let mut wire = Vec::new();
    let pieces: Vec<&[u8]> = if data.is_empty() {
        vec![data]
    } else {
        data.chunks(chunk).collect()
    };
    for piece in pieces {
        let src = buffer_with(device, piece, 1)?;
        let dst = device.pool().alloc(piece.len() + 512)?;
        let op = match version {
            TlsVersion::Tls13 => JobOp::Tls13Seal {
                slot: slot.slot_ref(),
                content_type: 23,
                padding,
                src: src.span(0, piece.len())?,
                dst: dst.whole(),
            },
            TlsVersion::Tls12 => JobOp::Tls12Seal {
                slot: slot.slot_ref(),
                algorithm: slot.algorithm(),
                content_type: 23,
                src: src.span(0, piece.len())?,
                dst: dst.whole(),
            },
        };
        let output = run_one(pair, op)?.map_err(|e| anyhow!("device seal failed: {e}"))?;
        ensure!(
            output.sequence_advanced,
            "a record seal must advance the sequence"
        );
        wire.extend_from_slice(&dst.to_vec(0, output.len as usize)?);
    }
    Ok(wire)
}

/// Opens one record on the device; returns the content type and plaintext.
fn device_open_record(
    device: &Arc<Device>,
    pair: &mut QueuePair,
    slot: &KeySlot,
    version: TlsVersion,
    record: &[u8],
) -> Result<Result<(u8, Vec<u8>), JobError>> {
    let src = buffer_with(device, record, 1)?;
    let dst = device.pool().alloc(record.len())?;
    let op = match version {
        TlsVersion::Tls13 => JobOp::Tls13Open {
            slot: slot.slot_ref(),
            src: src.whole(),
            dst: dst.whole(),
        },
        TlsVersion::Tls12 => JobOp::Tls12Open {
            slot: slot.slot_ref(),
            algorithm: slot.algorithm(),
            src: src.whole(),
            dst: dst.whole(),
        },
    };
    Ok(match run_one(pair, op)? {
        Ok(output) => Ok((output.content_type, dst.to_vec(0, output.len as usize)?)),
        Err(e) => Err(e),
    })
}

fn records_interoperate(device: &Arc<Device>, version: TlsVersion) -> Result<Outcome> {
    let (protocol, capability) = match version {
        TlsVersion::Tls12 => (RecordProtocol::TLS12, Capabilities::TLS12_RECORD),
        TlsVersion::Tls13 => (RecordProtocol::TLS13, Capabilities::TLS13_RECORD),
    };
    if !device.info().capabilities.contains(capability) {
        return Ok(Outcome::Skipped(format!(
            "the device lacks {version:?} records"
        )));
    }
    let mut pair = queue(device, 64)?;
    let mut checked = 0;
    let suites: Vec<AeadAlgorithm> = peer::SUITES
        .into_iter()
        .filter(|&a| has_algorithm(device, a))
        .collect();
    for &algorithm in &suites {
        let mut peer = peer::connect(version, algorithm)?;
        let seal = load_record_key(device, protocol, KeyDirection::SEAL, &peer.server_tx)?;
        let open = load_record_key(device, protocol, KeyDirection::OPEN, &peer.server_rx)?;
        let context = format!("{version:?} {algorithm:?}");

        // Device -> rustls client, sizes from empty to a full 16 KiB fragment.
        for (size, padding) in [
            (0usize, 0u16),
            (1, 0),
            (100, 7),
            (1500, 0),
            (16384, 0),
            (40_000, 0),
        ] {
            let data: Vec<u8> = (0..size).map(|i| (i * 31 + size) as u8).collect();
            let padding = if version == TlsVersion::Tls13 {
                padding
            } else {
                0
            };
            let wire =
                device_seal_records(device, &mut pair, &seal, version, &data, 16384, padding)?;
            let got = peer
                .client_receive(&wire)
                .with_context(|| context.clone())?;
            ensure!(
                got == data,
                "{context}: client read other bytes for size {size}"
            );
            checked += 1;
        }

        // rustls client -> device.
        for size in [1usize, 5000, 16384, 30_000] {
            let data: Vec<u8> = (0..size).map(|i| (i * 7 + 3) as u8).collect();
            let mut received = Vec::new();
            for record in peer.client_send(&data)? {
                let (content_type, plain) =
                    device_open_record(device, &mut pair, &open, version, &record)?
                        .map_err(|e| anyhow!("{context}: device open failed: {e}"))?;
                ensure!(content_type == 23, "{context}: content type {content_type}");
                received.extend_from_slice(&plain);
            }
            ensure!(
                received == data,
                "{context}: device opened other bytes for size {size}"
            );
            checked += 1;
        }

        // A record with one flipped byte fails, and the sequence it burned is gone: the next
        // genuine record (sequence n+1) cannot be opened either, as in TLS.
        let mut records = peer.client_send(b"tamper me")?;
        let last = records[0].len() - 1;
        records[0][last] ^= 0x80;
        let tampered = device_open_record(device, &mut pair, &open, version, &records[0])?;
        ensure!(
            tampered.as_ref().err().and_then(|e| e.status()) == Some(Status::AUTH_FAILED),
            "{context}: tampered record gave {tampered:?}"
        );
        checked += 1;
    }
    Ok(Outcome::Passed(format!(
        "{checked} exchanges across {} suites",
        suites.len()
    )))
}

/// TLS 1.3 records sealed by the device are read by a rustls client and the client's records
/// open on the device, for all three suites.
pub fn tls13_records_interoperate_with_rustls(device: &Arc<Device>) -> Result<Outcome> {
    records_interoperate(device, TlsVersion::Tls13)
}

/// The same for TLS 1.2 (explicit nonces for AES-GCM, none for ChaCha20-Poly1305).
pub fn tls12_records_interoperate_with_rustls(device: &Arc<Device>) -> Result<Outcome> {
    records_interoperate(device, TlsVersion::Tls12)
}

fn raw_slot(device: &Arc<Device>, algorithm: AeadAlgorithm) -> Result<KeySlot> {
    let key = vec![0x42; algorithm.key_len().unwrap_or(32)];
    Ok(device.load_key(&KeyMaterial::raw(algorithm, &key)?)?)
}

/// Many times the ring size of seal jobs through an 8-entry ring: every job completes once,
/// with the right output.
pub fn ring_wraps_many_times(device: &Arc<Device>) -> Result<Outcome> {
    let mut pair = queue(device, 8)?;
    let slot = raw_slot(device, AeadAlgorithm::AES_128_GCM)?;
    let total = 8 * 500;
    let input = buffer_with(device, &[0u8; 64], 64)?;
    let out = device.pool().alloc(80 * 8)?;
    let mut completed = 0u64;
    let mut outputs: HashMap<Vec<u8>, u64> = HashMap::new();
    for batch in 0..(total / 7) {
        let jobs: Vec<Job> = (0..7u64)
            .map(|i| {
                let id = batch as u64 * 7 + i;
                let mut nonce = [0u8; 12];
                nonce[..8].copy_from_slice(&id.to_le_bytes());
                Ok(Job {
                    user_data: id,
                    op: JobOp::AeadSeal {
                        slot: slot.slot_ref(),
                        nonce,
                        aad: None,
                        src: input.span(0, 64)?,
                        dst: out.span(i as usize * 80, 80)?,
                    },
                })
            })
            .collect::<Result<_>>()?;
        let mut results = Vec::new();
        pair.run(&jobs, TIMEOUT, |done| results.push(done))?;
        ensure!(results.len() == 7);
        for done in results {
            let output = done
                .result
                .map_err(|e| anyhow!("job {}: {e}", done.user_data))?;
            ensure!(output.len == 80);
            let slot_in_batch = (done.user_data % 7) as usize;
            let bytes = out.to_vec(slot_in_batch * 80, 80)?;
            ensure!(
                outputs.insert(bytes, done.user_data).is_none(),
                "two jobs produced the same ciphertext: nonces were mixed up"
            );
            completed += 1;
        }
    }
    let stats = pair.stats();
    ensure!(stats.unknown_cookies == 0 && stats.bad_completions == 0);
    Ok(Outcome::Passed(format!(
        "{completed} jobs through an 8-entry ring"
    )))
}

/// A key slot numbers its records in submission order (§4.4), however many engines fetch
/// the queue's bursts: long runs of TLS 1.3 seals under one key, each opened on the CPU at
/// the sequence number of its place in the submission.
pub fn records_of_one_key_keep_submission_order(device: &Arc<Device>) -> Result<Outcome> {
    if !device
        .info()
        .capabilities
        .contains(Capabilities::TLS13_RECORD)
    {
        return Ok(Outcome::Skipped("the device lacks TLS 1.3 records".into()));
    }
    const JOBS: usize = 240;
    const ROUNDS: usize = 8;
    let (key, iv) = ([0x42u8; 16], [7u8; 12]);
    let algorithm = AeadAlgorithm::AES_128_GCM;
    let material = KeyMaterial::new(
        algorithm,
        RecordProtocol::TLS13,
        KeyDirection::SEAL,
        &key,
        iv,
        0,
    )?;
    let slot = device.load_key(&material)?;
    let cpu = tlsaccel_record::RecordKey::new(
        algorithm,
        RecordProtocol::TLS13,
        KeyDirection::OPEN,
        &key,
        iv,
    )
    .map_err(|s| anyhow!("CPU key: {s}"))?;
    let record_len = tlsaccel_driver::abi::tls13_record_len(8, 0);
    let mut pair = queue(device, 256)?;
    let mut out_of_order = 0;
    for round in 0..ROUNDS {
        let src = device.pool().alloc(JOBS * 8)?;
        let dst = device.pool().alloc(JOBS * record_len)?;
        let mut jobs = Vec::with_capacity(JOBS);
        for i in 0..JOBS {
            let number = (round * JOBS + i) as u64;
            src.write(i * 8, &number.to_le_bytes())?;
            jobs.push(Job {
                user_data: number,
                op: JobOp::Tls13Seal {
                    slot: slot.slot_ref(),
                    content_type: 23,
                    padding: 0,
                    src: src.span(i * 8, 8)?,
                    dst: dst.span(i * record_len, record_len)?,
                },
            });
        }
        let mut failed = Vec::new();
        pair.run(&jobs, TIMEOUT, |done| {
            if done.result.is_err() {
                failed.push(done.user_data);
            }
        })?;
        ensure!(failed.is_empty(), "seals failed: {failed:?}");
        for i in 0..JOBS {
            let number = (round * JOBS + i) as u64;
            let mut record = dst.to_vec(i * record_len, record_len)?;
            match tlsaccel_record::tls13_open(&cpu, number, &mut record, record_len) {
                Ok(o) if record[o.start..o.start + o.len] == number.to_le_bytes() => {}
                _ => out_of_order += 1,
            }
        }
    }
    ensure!(
        out_of_order == 0,
        "{out_of_order} of {} records were numbered out of submission order",
        JOBS * ROUNDS
    );
    Ok(Outcome::Passed(format!(
        "{} records under one key, each at its submission's sequence number",
        JOBS * ROUNDS
    )))
}

/// A full ring takes no more jobs (and drops none); once completions are taken, the rest go
/// through.
pub fn full_ring_applies_backpressure(device: &Arc<Device>) -> Result<Outcome> {
    let faults = match model_faults(device, STALL) {
        Ok(faults) => faults,
        Err(skip) => return Ok(skip),
    };
    let mut pair = queue(device, 4)?;
    let jobs: Vec<Job> = (0..100)
        .map(|i| Job {
            user_data: i,
            op: JobOp::Nop,
        })
        .collect();
    let stall = StallGuard::stall(&faults)?;
    let first = pair.submit(&jobs)?;
    let second = pair.submit(&jobs[first..])?;
    drop(stall);
    ensure!(first == 3, "a 4-entry ring took {first} jobs");
    ensure!(second == 0, "a full ring took {second} more jobs");
    let mut seen = Vec::new();
    let mut next = first;
    let deadline = std::time::Instant::now() + TIMEOUT;
    while seen.len() < jobs.len() {
        ensure!(
            std::time::Instant::now() < deadline,
            "jobs lost: {} of 100 completed",
            seen.len()
        );
        pair.poll(|c| seen.push(c.user_data));
        if next < jobs.len() {
            next += pair.submit(&jobs[next..])?;
        }
    }
    seen.sort_unstable();
    ensure!(
        seen == (0..100).collect::<Vec<_>>(),
        "every job completes exactly once"
    );
    Ok(Outcome::Passed(
        "100 jobs through a 4-entry ring under backpressure".into(),
    ))
}

/// Several threads, each with its own queue, seal concurrently; every output is right.
pub fn concurrent_submitters_on_several_queues(device: &Arc<Device>) -> Result<Outcome> {
    let threads = (device.info().queues - 1).clamp(1, 4);
    let per_thread = 2000u64;
    std::thread::scope(|scope| -> Result<()> {
        let mut handles = Vec::new();
        for t in 0..threads {
            let device = Arc::clone(device);
            handles.push(scope.spawn(move || -> Result<()> {
                let mut pair = queue(&device, 64)?;
                // ChaCha20-Poly1305 where the device has it (another engine than the
                // AES of the other cases), else AES-128-GCM.
                let algorithm = if has_algorithm(&device, AeadAlgorithm::CHACHA20_POLY1305) {
                    AeadAlgorithm::CHACHA20_POLY1305
                } else {
                    AeadAlgorithm::AES_128_GCM
                };
                let slot = raw_slot(&device, algorithm)?;
                let input = buffer_with(&device, &[t as u8; 32], 32)?;
                let out = device.pool().alloc(48 * 32)?;
                let mut expected: Option<Vec<u8>> = None;
                for round in 0..per_thread / 32 {
                    let jobs: Vec<Job> = (0..32)
                        .map(|i| {
                            Ok(Job {
                                user_data: round * 32 + i,
                                op: JobOp::AeadSeal {
                                    slot: slot.slot_ref(),
                                    nonce: [0; 12],
                                    aad: None,
                                    src: input.span(0, 32)?,
                                    dst: out.span(i as usize * 48, 48)?,
                                },
                            })
                        })
                        .collect::<Result<_>>()?;
                    let mut ok = 0;
                    pair.run(&jobs, TIMEOUT, |done| {
                        ok += usize::from(done.result.is_ok())
                    })?;
                    ensure!(ok == 32, "thread {t}: {ok}/32 jobs succeeded");
                    for i in 0..32 {
                        let got = out.to_vec(i * 48, 48)?;
                        match &expected {
                            None => expected = Some(got),
                            Some(e) => ensure!(&got == e, "thread {t}: outputs differ"),
                        }
                    }
                }
                Ok(())
            }));
        }
        for handle in handles {
            handle.join().map_err(|_| anyhow!("submitter panicked"))??;
        }
        Ok(())
    })?;
    Ok(Outcome::Passed(format!(
        "{threads} threads x {per_thread} jobs"
    )))
}

/// With several engines, a long job submitted first completes after short ones submitted
/// later; each completion still reaches the job it belongs to.
pub fn out_of_order_completions_reach_their_callers(device: &Arc<Device>) -> Result<Outcome> {
    let mut pair = queue(device, 256)?;
    let slot = raw_slot(device, AeadAlgorithm::AES_256_GCM)?;
    let big = 64 * 1024;
    let big_in = buffer_with(device, &vec![1u8; big], big)?;
    let big_out = device.pool().alloc(big + TAG_LEN)?;
    let small_in = buffer_with(device, &[2u8; 16], 16)?;
    let small_out = device.pool().alloc(32 * 32)?;
    let mut reordered = 0;
    // Reordering must be seen on the in-process simulator with several engines; elsewhere
    // (another process, a guest) it is only checked that every completion is matched.
    let must_reorder =
        device.info().name == "sim" && simulator(device).is_some_and(|s| s.config().engines > 1);
    // Whether the second engine runs while the first seals depends on the scheduler (tests
    // share two cores); keep trying for a while rather than a fixed number of times.
    let patience = Duration::from_secs(if must_reorder { 20 } else { 2 });
    let give_up = std::time::Instant::now() + patience;
    for attempt in 0..u64::MAX {
        if std::time::Instant::now() > give_up {
            break;
        }
        let base = attempt * 1000;
        let big_job = Job {
            user_data: base,
            op: JobOp::AeadSeal {
                slot: slot.slot_ref(),
                nonce: [9; 12],
                aad: None,
                src: big_in.whole(),
                dst: big_out.whole(),
            },
        };
        let small: Vec<Job> = (1..=16u64)
            .map(|i| {
                Ok(Job {
                    user_data: base + i,
                    op: JobOp::AeadSeal {
                        slot: slot.slot_ref(),
                        nonce: [i as u8; 12],
                        aad: None,
                        src: small_in.whole(),
                        dst: small_out.span(i as usize * 32, 32)?,
                    },
                })
            })
            .collect::<Result<_>>()?;
        ensure!(pair.submit(&[big_job])? == 1);
        ensure!(pair.submit(&small)? == small.len());
        let mut order = Vec::new();
        let deadline = std::time::Instant::now() + TIMEOUT;
        while order.len() < 17 {
            ensure!(
                std::time::Instant::now() < deadline,
                "jobs did not complete"
            );
            pair.poll(|done| order.push((done.user_data, done.result)));
        }
        for (tag, result) in &order {
            let output = result.map_err(|e| anyhow!("job {tag}: {e}"))?;
            let expected = if *tag == base {
                big + TAG_LEN
            } else {
                16 + TAG_LEN
            };
            ensure!(
                output.len as usize == expected,
                "job {tag} got another job's result"
            );
        }
        if order[0].0 != base {
            reordered += 1;
            if reordered >= 3 {
                break;
            }
        }
    }
    if must_reorder {
        ensure!(
            reordered > 0,
            "never saw a short job overtake a long one with several engines"
        );
    }
    Ok(Outcome::Passed(format!(
        "{reordered} reordered batches, all matched"
    )))
}

/// Each hostile descriptor gets an error completion, and the next job still succeeds.
pub fn hostile_descriptors_get_error_completions(device: &Arc<Device>) -> Result<Outcome> {
    let mut pair = queue(device, 16)?;
    let slot = raw_slot(device, AeadAlgorithm::AES_128_GCM)?;
    let buf = device.pool().alloc(4096)?;
    let good = buf.span(0, 64)?;
    let out = buf.span(1024, 1024)?;
    let seal = |d: &mut Descriptor| {
        d.opcode = Opcode::AEAD_SEAL.0;
        d.key_slot = slot.index().into();
        d.src_iova = good.iova().0.into();
        d.src_len = 64.into();
        d.dst_iova = out.iova().0.into();
        d.dst_len = out.len().into();
    };
    let destroyed = raw_slot(device, AeadAlgorithm::AES_128_GCM)?;
    let destroyed_index = destroyed.index();
    drop(destroyed);
    type Mutator<'a> = Box<dyn Fn(&mut Descriptor) + 'a>;
    let cases: Vec<(&str, Mutator<'_>, Status)> = vec![
        (
            "unknown opcode",
            Box::new(|d| d.opcode = 0x7e),
            Status::BAD_OPCODE,
        ),
        (
            "reserved flags",
            Box::new(|d| {
                seal(d);
                d.flags = 1
            }),
            Status::BAD_DESCRIPTOR,
        ),
        (
            "slot out of range",
            Box::new(|d| {
                seal(d);
                d.key_slot = u32::MAX.into()
            }),
            Status::BAD_SLOT,
        ),
        (
            "destroyed slot",
            Box::new(|d| {
                seal(d);
                d.key_slot = destroyed_index.into()
            }),
            Status::SLOT_EMPTY,
        ),
        (
            "record opcode on a raw slot",
            Box::new(|d| {
                seal(d);
                d.opcode = Opcode::TLS13_SEAL.0
            }),
            Status::SLOT_MISMATCH,
        ),
        (
            "src length overflow",
            Box::new(|d| {
                seal(d);
                d.src_len = u32::MAX.into()
            }),
            Status::LENGTH_ERROR,
        ),
        (
            "dst too small",
            Box::new(|d| {
                seal(d);
                d.dst_len = 70.into()
            }),
            Status::LENGTH_ERROR,
        ),
        (
            "iova wraps around",
            Box::new(|d| {
                seal(d);
                d.src_iova = (u64::MAX - 8).into()
            }),
            Status::DMA_FAULT,
        ),
        (
            "unmapped iova 0",
            Box::new(|d| {
                seal(d);
                d.src_iova = 0.into()
            }),
            Status::DMA_FAULT,
        ),
        (
            "dst past the mapping",
            Box::new(|d| {
                seal(d);
                d.dst_iova = (good.iova().0 + (64 << 30)).into()
            }),
            Status::DMA_FAULT,
        ),
        (
            "key load from unmapped memory",
            Box::new(|d| {
                d.opcode = Opcode::KEY_LOAD.0;
                d.key_slot = 1.into();
                d.src_iova = 0x10.into();
                d.src_len = 64.into();
            }),
            Status::DMA_FAULT,
        ),
        (
            "key load with short block",
            Box::new(|d| {
                d.opcode = Opcode::KEY_LOAD.0;
                d.src_iova = good.iova().0.into();
                d.src_len = 63.into();
            }),
            Status::LENGTH_ERROR,
        ),
        (
            "aad on a record job",
            Box::new(|d| {
                seal(d);
                d.aad_len = 1.into();
                d.opcode = Opcode::TLS13_OPEN.0
            }),
            Status::BAD_DESCRIPTOR,
        ),
    ];
    let mut checked = 0;
    for (name, mutate, expected) in &cases {
        let mut descriptor = Descriptor::default();
        mutate(&mut descriptor);
        let mut results = Vec::new();
        pair.run(
            &[
                Job {
                    user_data: 1,
                    op: JobOp::Raw(descriptor),
                },
                Job {
                    user_data: 2,
                    op: JobOp::Nop,
                },
            ],
            TIMEOUT,
            |done| results.push(done),
        )?;
        results.sort_by_key(|c| c.user_data);
        ensure!(results.len() == 2, "{name}: {} completions", results.len());
        ensure!(
            status_of(results[0].result) == Some(*expected),
            "{name}: expected {expected:?}, got {:?}",
            results[0].result
        );
        ensure!(
            results[1].result.is_ok(),
            "{name}: the device stopped serving"
        );
        checked += 1;
    }
    // The good descriptor itself still works.
    let mut descriptor = Descriptor::default();
    seal(&mut descriptor);
    ensure!(run_one(&mut pair, JobOp::Raw(descriptor))?.is_ok());
    Ok(Outcome::Passed(format!(
        "{checked} hostile descriptors rejected"
    )))
}

/// Completions the driver did not ask for, or with impossible lengths, are caught.
pub fn bogus_completions_are_detected(device: &Arc<Device>) -> Result<Outcome> {
    let faults = match model_faults(
        device,
        &[
            FaultCode::BOGUS_COMPLETION,
            FaultCode::OVERSIZE_NEXT_RESULT_LENGTH,
        ],
    ) {
        Ok(faults) => faults,
        Err(skip) => return Ok(skip),
    };
    let mut pair = queue(device, 16)?;
    faults.inject(Fault::BogusCompletion {
        queue: pair.index(),
        cookie: 0xdead_beef_0000_0003,
        result_len: 5,
    })?;
    faults.inject(Fault::OversizeNextResultLength)?;
    let mut results = Vec::new();
    pair.run(
        &[
            Job {
                user_data: 1,
                op: JobOp::Nop,
            },
            Job {
                user_data: 2,
                op: JobOp::Nop,
            },
        ],
        TIMEOUT,
        |c| results.push(c),
    )?;
    results.sort_by_key(|c| c.user_data);
    ensure!(
        results.len() == 2,
        "the invented completion must not count as a job's"
    );
    let stats = pair.stats();
    ensure!(
        stats.unknown_cookies == 1,
        "unknown cookie not counted: {stats:?}"
    );
    ensure!(
        matches!(results[0].result, Err(JobError::BadCompletion(_))),
        "impossible length accepted: {:?}",
        results[0].result
    );
    ensure!(results[1].result.is_ok());
    ensure!(stats.bad_completions == 1);
    Ok(Outcome::Passed(
        "unknown cookie ignored, impossible length rejected".into(),
    ))
}

/// A seal with a corrupted tag (injected) fails to open on the device.
pub fn corrupted_tag_fails_authentication(device: &Arc<Device>) -> Result<Outcome> {
    let faults = match model_faults(device, &[FaultCode::CORRUPT_NEXT_TAG]) {
        Ok(faults) => faults,
        Err(skip) => return Ok(skip),
    };
    let mut pair = queue(device, 16)?;
    let slot = raw_slot(device, AeadAlgorithm::AES_256_GCM)?;
    let plain = buffer_with(device, b"attack at dawn", 14)?;
    let sealed = device.pool().alloc(30)?;
    let reopened = device.pool().alloc(14)?;
    let seal = JobOp::AeadSeal {
        slot: slot.slot_ref(),
        nonce: [3; 12],
        aad: None,
        src: plain.whole(),
        dst: sealed.whole(),
    };
    let open = JobOp::AeadOpen {
        slot: slot.slot_ref(),
        nonce: [3; 12],
        aad: None,
        src: sealed.whole(),
        dst: reopened.whole(),
    };
    run_one(&mut pair, seal.clone())?.map_err(|e| anyhow!("clean seal: {e}"))?;
    run_one(&mut pair, open.clone())?.map_err(|e| anyhow!("clean open: {e}"))?;
    ensure!(reopened.to_vec(0, 14)? == b"attack at dawn");
    faults.inject(Fault::CorruptNextTag)?;
    run_one(&mut pair, seal)?.map_err(|e| anyhow!("seal: {e}"))?;
    ensure!(status_of(run_one(&mut pair, open)?) == Some(Status::AUTH_FAILED));
    Ok(Outcome::Passed("corrupted tag caught".into()))
}

/// Loading and dropping many slots leaves none loaded on the device.
pub fn key_slots_are_released(device: &Arc<Device>) -> Result<Outcome> {
    let base = device.counter(Counter::KeySlotsLoaded);
    let slots: Vec<KeySlot> = (0..200)
        .map(|_| raw_slot(device, AeadAlgorithm::AES_128_GCM))
        .collect::<Result<_>>()?;
    ensure!(device.counter(Counter::KeySlotsLoaded) == base + 200);
    let mut indices: Vec<u32> = slots.iter().map(KeySlot::index).collect();
    indices.sort_unstable();
    indices.dedup();
    ensure!(indices.len() == 200, "slot indices handed out twice");
    drop(slots);
    let loaded = device.counter(Counter::KeySlotsLoaded);
    ensure!(
        loaded == base,
        "{} slots still loaded after their owners were dropped",
        loaded - base
    );
    Ok(Outcome::Passed("200 slots loaded and released".into()))
}

/// The async API completes jobs through interrupts, with fewer interrupts than jobs.
pub fn async_queue_with_coalesced_interrupts(device: &Arc<Device>) -> Result<Outcome> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let pair = device.queue(QueueConfig {
        size: 128,
        interrupts: true,
        coalesce_count: 16,
        coalesce_usecs: 50,
        public_key: false,
    })?;
    let interrupts_before = device.counter(Counter::Interrupts);
    let done = runtime.block_on(async {
        let queue = AsyncQueue::new(pair, TIMEOUT)?;
        let mut ok = 0;
        for _ in 0..50 {
            let results = queue.run_batch(&vec![JobOp::Nop; 40]).await;
            ok += results.iter().filter(|r| r.is_ok()).count();
        }
        // One completion never reaches the count threshold: only the coalescing timer can
        // raise its interrupt (the reactor's slow safety tick would hide a broken timer, so
        // check the device's interrupt counter rather than just the result). The reactor may
        // reap the job early, woken by a late interrupt of the previous batch, so wait for
        // the counter to move: a working timer moves it within the 50 us window.
        let before_single = device.counter(Counter::Interrupts);
        let single = queue.run(JobOp::Nop).await;
        ensure!(single.is_ok(), "single job: {single:?}");
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while device.counter(Counter::Interrupts) == before_single {
            ensure!(
                std::time::Instant::now() < deadline,
                "the coalescing timer did not raise an interrupt for a lone completion"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        anyhow::Ok(ok + 1)
    })?;
    ensure!(done == 2001, "{done} of 2001 jobs succeeded");
    let interrupts = device.counter(Counter::Interrupts) - interrupts_before;
    ensure!(interrupts > 0, "no interrupt was raised");
    ensure!(
        interrupts < 2001,
        "coalescing did not reduce interrupts ({interrupts})"
    );
    Ok(Outcome::Passed(format!(
        "2001 jobs, {interrupts} interrupts"
    )))
}

/// A completion the device never writes fails its job with `TimedOut`; the queue is then
/// marked broken rather than trusted.
pub fn lost_completion_times_out(device: &Arc<Device>) -> Result<Outcome> {
    let faults = match model_faults(device, &[FaultCode::DROP_NEXT_COMPLETION]) {
        Ok(faults) => faults,
        Err(skip) => return Ok(skip),
    };
    let mut pair = queue(device, 16)?;
    faults.inject(Fault::DropNextCompletion)?;
    let mut result = None;
    pair.run(
        &[Job {
            user_data: 5,
            op: JobOp::Nop,
        }],
        Duration::from_millis(200),
        |c| result = Some(c.result),
    )?;
    ensure!(result == Some(Err(JobError::TimedOut)), "got {result:?}");
    ensure!(pair.is_broken());
    ensure!(pair
        .submit(&[Job {
            user_data: 6,
            op: JobOp::Nop
        }])
        .is_err());
    drop(pair);
    let mut fresh = queue(device, 16)?;
    ensure!(
        run_one(&mut fresh, JobOp::Nop)?.is_ok(),
        "a new queue works"
    );
    Ok(Outcome::Passed("lost completion timed out".into()))
}

/// A device reset fails the jobs in flight with `DeviceLost`, invalidates key slots, and the
/// device serves new queues afterwards.
pub fn reset_fails_jobs_in_flight(device: &Arc<Device>) -> Result<Outcome> {
    let faults = match model_faults(device, &[FaultCode::STALL, FaultCode::FATAL]) {
        Ok(faults) => faults,
        Err(skip) => return Ok(skip),
    };
    let mut pair = queue(device, 16)?;
    let slot = raw_slot(device, AeadAlgorithm::AES_128_GCM)?;
    // The reset lifts the stall; no guard, which would resume the next incarnation.
    faults.inject(Fault::Stall)?;
    ensure!(
        pair.submit(&[
            Job {
                user_data: 1,
                op: JobOp::Nop
            },
            Job {
                user_data: 2,
                op: JobOp::Nop
            }
        ])? == 2
    );
    faults.inject(Fault::Fatal)?;
    ensure!(device
        .status()
        .contains(tlsaccel_driver::abi::DeviceStatus::FATAL));
    device.recover()?;
    let mut failed = Vec::new();
    pair.poll(|c| failed.push(c));
    ensure!(
        failed.len() == 2 && failed.iter().all(|c| c.result == Err(JobError::DeviceLost)),
        "got {failed:?}"
    );
    ensure!(!slot.is_live(), "a slot survived the reset");
    ensure!(
        device.counter(Counter::KeySlotsLoaded) == 0,
        "reset must empty the key table"
    );
    drop(slot);
    drop(pair);
    let mut fresh = queue(device, 16)?;
    ensure!(run_one(&mut fresh, JobOp::Nop)?.is_ok());
    let slot = raw_slot(device, AeadAlgorithm::AES_128_GCM)?;
    drop(slot);
    ensure!(device.counter(Counter::KeySlotsLoaded) == 0);
    Ok(Outcome::Passed(
        "reset failed 2 jobs, device serves again".into(),
    ))
}

/// A queue disabled while an engine holds one of its jobs (stalled between acceptance and its
/// DMA) stays ENABLED until the engine lets go, and the job then writes nothing to its `dst`
/// and posts no completion (device-spec §3.1): the host may reuse the memory once ENABLED
/// reads 0, and not before.
pub fn disabled_queue_is_held_until_the_engine_lets_go(device: &Arc<Device>) -> Result<Outcome> {
    let faults = match model_faults(device, STALL) {
        Ok(faults) => faults,
        Err(skip) => return Ok(skip),
    };
    let mut pair = queue(device, 16)?;
    let slot = raw_slot(device, AeadAlgorithm::AES_128_GCM)?;
    let src = buffer_with(device, &[0x11; 64], 64)?;
    let dst = device.pool().alloc(64 + TAG_LEN)?;
    let seal = || JobOp::AeadSeal {
        slot: slot.slot_ref(),
        nonce: [4; 12],
        aad: None,
        src: src.whole(),
        dst: dst.whole(),
    };
    let completed_before = device.counter(Counter::JobsOk) + device.counter(Counter::JobsFailed);

    let stall = StallGuard::stall(&faults)?;
    ensure!(
        pair.submit(&[Job {
            user_data: 1,
            op: seal()
        }])? == 1
    );
    wait_until("the device never took the job", || faults.held_jobs() >= 1)?;
    let transport = device.transport();
    let status = || {
        QueueStatus::from_bits_retain(
            transport.read32(regs::queue_reg(pair.index(), regs::queue::STATUS)),
        )
    };
    // Disable the queue as a driver does before reusing its memory.
    transport.write32(regs::queue_reg(pair.index(), regs::queue::CONTROL), 0);
    for _ in 0..2 {
        ensure!(
            status().contains(QueueStatus::ENABLED),
            "Q_STATUS.ENABLED cleared while an engine still held a job of the queue"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(stall);
    wait_until("the queue stayed ENABLED after the engine let go", || {
        !status().contains(QueueStatus::ENABLED)
    })?;
    // ENABLED reads 0: whatever the device was going to do to this memory is done.
    ensure!(
        dst.to_vec(0, 64 + TAG_LEN)? == vec![0; 64 + TAG_LEN],
        "the job wrote dst after its queue was disabled"
    );
    let mut late = Vec::new();
    pair.poll(|done| late.push(done));
    ensure!(
        late.is_empty(),
        "a completion was posted after the queue was disabled: {late:?}"
    );
    ensure!(
        device.counter(Counter::JobsOk) + device.counter(Counter::JobsFailed) == completed_before,
        "the dropped job was run"
    );
    drop(pair);
    let mut fresh = queue(device, 16)?;
    run_one(&mut fresh, seal())?.map_err(|e| anyhow!("a seal on a fresh queue: {e}"))?;
    ensure!(dst.to_vec(0, 64 + TAG_LEN)? != vec![0; 64 + TAG_LEN]);
    Ok(Outcome::Passed(
        "held job dropped, ENABLED cleared only after the engine let go".into(),
    ))
}

/// Where [`unmap_under_a_held_job_faults_it`] maps its page: far above the DMA pool
/// (`POOL_IOVA_BASE` plus its 1 GiB default limit).
const UNMAP_TEST_IOVA: u64 = 0x2_0000_0000;

/// The host unmaps a job's `dst` while an engine holds the job (accepted, so translated, but
/// not yet run): the job fails with `DMA_FAULT` and the memory is never written, because the
/// device's IOMMU checks the mapping at every access, not only at translation.
pub fn unmap_under_a_held_job_faults_it(device: &Arc<Device>) -> Result<Outcome> {
    let faults = match model_faults(device, STALL) {
        Ok(faults) => faults,
        Err(skip) => return Ok(skip),
    };
    let transport = device.transport();
    let mut pair = queue(device, 16)?;
    let slot = raw_slot(device, AeadAlgorithm::AES_128_GCM)?;
    let src = buffer_with(device, &[0x22; 64], 64)?;
    // A page in a mapping of its own, which the test removes under the job. A device that
    // reaches only its own memory (shared-memory mode, device-spec §11) gets the last page
    // of it, which the DMA pool fills last; any other gets a fresh page at a far IOVA.
    let (page, iova) = match transport.region_source() {
        Some(source) => {
            let last = source
                .capacity(4096)
                .and_then(|pages| pages.checked_sub(1))
                .ok_or_else(|| anyhow!("the device's own memory has no page to spare"))?;
            source.region(last, 4096)?
        }
        None => {
            let page = Arc::new(DmaRegion::new(4096)?);
            let iova = Iova(UNMAP_TEST_IOVA);
            transport.map(&page, iova)?;
            (page, iova)
        }
    };
    page.write(0, &[0; 64 + TAG_LEN])?;
    let mut descriptor = Descriptor {
        opcode: Opcode::AEAD_SEAL.0,
        key_slot: slot.index().into(),
        src_iova: src.iova().0.into(),
        src_len: 64.into(),
        dst_iova: iova.0.into(),
        dst_len: ((64 + TAG_LEN) as u32).into(),
        ..Descriptor::default()
    };
    descriptor.param = [5; 12];
    let stall = StallGuard::stall(&faults)?;
    ensure!(
        pair.submit(&[Job {
            user_data: 1,
            op: JobOp::Raw(descriptor),
        }])? == 1
    );
    wait_until("the device never took the job", || faults.held_jobs() >= 1)?;
    transport.unmap(iova, page.len())?;
    drop(stall);
    let mut results = Vec::new();
    wait_until("the job never completed", || {
        pair.poll(|done| results.push(done.result));
        !results.is_empty()
    })?;
    let mut written = vec![0u8; 64 + TAG_LEN];
    page.read(0, &mut written)?;
    ensure!(
        written == vec![0; 64 + TAG_LEN],
        "the device wrote memory the host had unmapped (job result {:?})",
        results[0]
    );
    ensure!(
        status_of(results[0]) == Some(Status::DMA_FAULT),
        "a job whose dst was unmapped under it ended with {:?}",
        results[0]
    );
    ensure!(
        run_one(&mut pair, JobOp::Nop)?.is_ok(),
        "the queue stopped serving"
    );
    Ok(Outcome::Passed(
        "dst unmapped under a held job: DMA_FAULT, memory untouched".into(),
    ))
}
