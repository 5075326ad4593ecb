//! The RTL against the simulator, job for job: the same stream of key loads, AES-GCM seals
//! and opens (raw AEAD and TLS 1.3 records, unaligned buffers, random lengths, AAD and
//! padding), tampered inputs and hostile descriptors goes to both, and every completion
//! (status, result length, content type, SEQUENCE_ADVANCED), every destination buffer and,
//! at the end, every counter must be the same. Then the interrupt messages a coalesced queue
//! raises for the same bursts.
//!
//! The stream is pseudo-random from a fixed seed, so a failure names a job that can be
//! replayed; `TLSACCEL_DIFF_SEED` and `TLSACCEL_DIFF_JOBS` change it.

use std::sync::Arc;
use std::time::Duration;

use tlsaccel_driver::abi::regs::Counter;
use tlsaccel_driver::abi::{
    AeadAlgorithm, Descriptor, KeyDirection, Opcode, RecordProtocol, SealParams,
};
use tlsaccel_driver::{
    Device, DeviceOptions, DmaBuffer, Job, JobError, JobOp, JobOutput, KeyMaterial, KeySlot,
    QueueConfig, QueuePair, Transport,
};
use tlsaccel_rtl::RtlTransport;

/// xorshift64*: small, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

const BUF: usize = 72 * 1024;
const TIMEOUT: Duration = Duration::from_secs(30);

/// One device and what the stream uses on it.
struct Side {
    name: &'static str,
    device: Arc<Device>,
    pair: QueuePair,
    src: DmaBuffer,
    dst: DmaBuffer,
    aad: DmaBuffer,
    slots: Vec<KeySlot>,
}

impl Side {
    fn new(name: &'static str, device: Arc<Device>) -> Self {
        let pair = device
            .queue(QueueConfig {
                size: 16,
                interrupts: false,
                ..QueueConfig::default()
            })
            .expect("queue");
        let alloc = |len| device.pool().alloc(len).expect("dma");
        Self {
            name,
            pair,
            src: alloc(BUF),
            dst: alloc(BUF),
            aad: alloc(8192),
            slots: Vec::new(),
            device,
        }
    }

    fn run(&mut self, descriptor: Descriptor) -> Result<JobOutput, JobError> {
        let mut result = None;
        self.pair
            .run(
                &[Job {
                    user_data: 1,
                    op: JobOp::Raw(descriptor),
                }],
                TIMEOUT,
                |done| result = Some(done.result),
            )
            .expect("the queue runs");
        result.expect("one completion")
    }
}

/// A job in terms both sides share: offsets into their buffers, not addresses.
#[derive(Debug, Clone, Copy, Default)]
struct Spec {
    opcode: u8,
    flags: u8,
    slot: u32,
    src_off: usize,
    src_len: u32,
    dst_off: usize,
    dst_len: u32,
    aad_off: usize,
    aad_len: u32,
    param: [u8; 12],
    /// Use this address for src instead of the buffer (unmapped, wrapping).
    src_iova: Option<u64>,
}

impl Spec {
    fn descriptor(&self, side: &Side) -> Descriptor {
        let mut d = Descriptor {
            opcode: self.opcode,
            flags: self.flags,
            ..Descriptor::default()
        };
        d.key_slot = self.slot.into();
        let src = side.src.iova().0 + self.src_off as u64;
        d.src_iova = self.src_iova.unwrap_or(src).into();
        d.src_len = self.src_len.into();
        d.dst_iova = (side.dst.iova().0 + self.dst_off as u64).into();
        d.dst_len = self.dst_len.into();
        if self.aad_len != 0 {
            d.aad_iova = (side.aad.iova().0 + self.aad_off as u64).into();
        }
        d.aad_len = self.aad_len.into();
        d.param = self.param;
        d
    }
}

/// A key loaded on both sides, at the same slot index.
#[derive(Debug, Clone, Copy)]
struct Key {
    slot: u32,
}

struct Pair {
    rtl: Side,
    sim: Side,
    rng: Rng,
    jobs: u64,
    /// How often each status came back (`None`: OK).
    seen: std::collections::BTreeMap<String, u64>,
}

impl Pair {
    fn load(
        &mut self,
        algorithm: AeadAlgorithm,
        protocol: RecordProtocol,
        direction: KeyDirection,
        key: &[u8],
        iv: [u8; 12],
        sequence: u64,
    ) -> Key {
        let material =
            KeyMaterial::new(algorithm, protocol, direction, key, iv, sequence).expect("material");
        let mut index = None;
        for side in [&mut self.rtl, &mut self.sim] {
            let slot = side.device.load_key(&material).expect("load");
            if let Some(other) = index {
                assert_eq!(
                    slot.index(),
                    other,
                    "the driver hands out the same slots on both"
                );
            }
            index = Some(slot.index());
            side.slots.push(slot);
        }
        Key {
            slot: index.expect("two sides"),
        }
    }

    /// Writes the same bytes at the same offset of both sides' `which` buffer.
    fn put(&mut self, which: fn(&Side) -> &DmaBuffer, offset: usize, data: &[u8]) {
        for side in [&self.rtl, &self.sim] {
            which(side).write(offset, data).expect("write");
        }
    }

    /// Runs `spec` on both sides and compares everything; returns the (common) result and
    /// the output bytes.
    fn run(&mut self, spec: Spec, what: &str) -> (Result<JobOutput, JobError>, Vec<u8>) {
        self.jobs += 1;
        // Fill dst with the same noise on both sides, so "wrote nothing" is checked too.
        let window = (spec.dst_len as usize + 64).min(BUF - spec.dst_off);
        let noise = self.rng.bytes(window);
        self.put(|s| &s.dst, spec.dst_off, &noise);
        let mut outcomes = Vec::new();
        for side in [&mut self.rtl, &mut self.sim] {
            let descriptor = spec.descriptor(side);
            let result = side.run(descriptor);
            let after = side.dst.to_vec(spec.dst_off, window).expect("read");
            outcomes.push((side.name, result, after));
        }
        let (rtl, sim) = (&outcomes[0], &outcomes[1]);
        assert_eq!(
            rtl.1, sim.1,
            "job {} ({what}, {spec:?}): the RTL and the simulator complete differently",
            self.jobs
        );
        assert!(
            rtl.2 == sim.2,
            "job {} ({what}, {spec:?}): dst differs (first at byte {:?})",
            self.jobs,
            rtl.2.iter().zip(&sim.2).position(|(a, b)| a != b)
        );
        let status = match &sim.1 {
            Ok(_) => "OK".to_string(),
            Err(e) => e
                .status()
                .map_or_else(|| e.to_string(), |s| format!("{s:?}")),
        };
        *self.seen.entry(status).or_default() += 1;
        let output = match &sim.1 {
            Ok(out) => sim.2[..out.len as usize].to_vec(),
            Err(_) => Vec::new(),
        };
        (sim.1, output)
    }
}

fn open_pair(seed: u64) -> Pair {
    let transport: Arc<dyn Transport> =
        Arc::new(RtlTransport::new().expect("the RTL model is built (verilator installed)"));
    let rtl = Device::with_transport(transport, DeviceOptions::default()).expect("rtl");
    let sim = Device::open("sim").expect("simulator");
    Pair {
        rtl: Side::new("rtl", rtl),
        sim: Side::new("sim", sim),
        rng: Rng(seed | 1),
        jobs: 0,
        seen: Default::default(),
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn aead_round(p: &mut Pair, key: Key) {
    let len = match p.rng.below(10) {
        0 => 0,
        1..=5 => p.rng.below(200),
        6..=8 => p.rng.below(5000),
        _ => p.rng.below(66_100),
    } as usize;
    let aad_max = if p.rng.chance(5) { 4200 } else { 300 };
    let aad_len = if p.rng.chance(40) {
        0
    } else {
        p.rng.below(aad_max) as usize
    };
    let (src_off, dst_off, aad_off) = (
        p.rng.below(48) as usize,
        p.rng.below(48) as usize,
        p.rng.below(32) as usize,
    );
    let plain = p.rng.bytes(len.min(BUF - 64));
    let aad = p.rng.bytes(aad_len.min(4200));
    p.put(|s| &s.src, src_off, &plain);
    p.put(|s| &s.aad, aad_off, &aad);
    let nonce: [u8; 12] = p.rng.bytes(12).try_into().expect("12");
    let dst_len = if p.rng.chance(5) {
        len as u32 + 15
    } else {
        len as u32 + 16 + p.rng.below(3) as u32
    };
    let seal = Spec {
        opcode: Opcode::AEAD_SEAL.0,
        slot: key.slot,
        src_off,
        src_len: len as u32,
        dst_off,
        dst_len,
        aad_off,
        aad_len: aad_len as u32,
        param: nonce,
        ..Spec::default()
    };
    let (result, sealed) = p.run(seal, "aead seal");
    if result.is_err() || !p.rng.chance(80) {
        return;
    }
    // Open it again, now and then with a byte flipped (tag, ciphertext or AAD).
    let mut sealed = sealed;
    let mut aad = aad;
    match p.rng.below(8) {
        0 if !sealed.is_empty() => {
            let at = p.rng.below(sealed.len() as u64) as usize;
            sealed[at] ^= 1 << p.rng.below(8);
        }
        1 if !aad.is_empty() => {
            let at = p.rng.below(aad.len() as u64) as usize;
            aad[at] ^= 0x40;
        }
        _ => {}
    }
    let src_off = p.rng.below(48) as usize;
    p.put(|s| &s.src, src_off, &sealed);
    p.put(|s| &s.aad, aad_off, &aad);
    let open = Spec {
        opcode: Opcode::AEAD_OPEN.0,
        src_off,
        src_len: sealed.len() as u32,
        dst_len: len as u32 + p.rng.below(2) as u32,
        ..seal
    };
    let _ = p.run(open, "aead open");
}

fn record_round(p: &mut Pair, seal_key: Key, open_key: Key) {
    let len = match p.rng.below(10) {
        0 => 0,
        1..=6 => p.rng.below(2000),
        7..=8 => p.rng.below(16_385),
        _ => 16_380 + p.rng.below(10),
    } as usize;
    let padding: u16 = if p.rng.chance(70) {
        0
    } else {
        p.rng.below(300) as u16
    };
    let content_type = if p.rng.chance(10) {
        0
    } else {
        [23u8, 22, 21][p.rng.below(3) as usize]
    };
    let (src_off, dst_off) = (p.rng.below(48) as usize, p.rng.below(48) as usize);
    let plain = p.rng.bytes(len);
    p.put(|s| &s.src, src_off, &plain);
    let mut param = [0u8; 12];
    param[0] = content_type;
    param[1..3].copy_from_slice(&padding.to_le_bytes());
    let record_len = 5 + len as u32 + 1 + u32::from(padding) + 16;
    let seal = Spec {
        opcode: Opcode::TLS13_SEAL.0,
        slot: seal_key.slot,
        src_off,
        src_len: len as u32,
        dst_off,
        dst_len: if p.rng.chance(5) {
            record_len - 1
        } else {
            record_len + p.rng.below(4) as u32
        },
        param,
        ..Spec::default()
    };
    let (result, record) = p.run(seal, "tls13 seal");
    if result.is_err() {
        return;
    }
    assert_eq!(SealParams::decode(&param).map(|s| s.padding), Some(padding));
    // Open it on the other direction's slot (same key, same sequence), sometimes tampered:
    // the header's type, version or length, or a byte of the body.
    let mut record = record;
    match p.rng.below(10) {
        0 => record[0] = 22,
        1 => record[2] = 1,
        2 => record[4] ^= 1,
        3 => {
            let at = 5 + p.rng.below(record.len() as u64 - 5) as usize;
            record[at] ^= 0x10;
        }
        _ => {}
    }
    let src_off = p.rng.below(48) as usize;
    p.put(|s| &s.src, src_off, &record);
    let open = Spec {
        opcode: Opcode::TLS13_OPEN.0,
        slot: open_key.slot,
        src_off,
        src_len: record.len() as u32,
        dst_off: p.rng.below(48) as usize,
        dst_len: (record.len() as u32 - 22).min(16_384) + p.rng.below(3) as u32,
        ..Spec::default()
    };
    let _ = p.run(open, "tls13 open");
}

fn hostile_round(p: &mut Pair, raw: Key, record: Key) {
    let mut spec = Spec {
        opcode: Opcode::AEAD_SEAL.0,
        slot: raw.slot,
        src_len: 64,
        dst_len: 80,
        ..Spec::default()
    };
    let what = match p.rng.below(12) {
        0 => {
            spec.flags = 1;
            "flags"
        }
        1 => {
            // Past the larger key table of the two (the simulator has more slots).
            let slots = p
                .rtl
                .device
                .info()
                .key_slots
                .max(p.sim.device.info().key_slots);
            spec.slot = slots + p.rng.below(1 << 20) as u32;
            "slot out of range"
        }
        2 => {
            spec.opcode = Opcode::TLS13_SEAL.0;
            spec.dst_len = 200;
            "record job on a raw slot"
        }
        3 => {
            spec.slot = record.slot;
            "raw job on a record slot"
        }
        4 => {
            spec.src_len = u32::MAX - p.rng.below(100) as u32;
            "huge src"
        }
        5 => {
            spec.aad_len = 4097;
            "aad too long"
        }
        6 => {
            spec.src_iova = Some(0x10);
            "unmapped src"
        }
        7 => {
            spec.src_iova = Some(u64::MAX - 20);
            "src wraps"
        }
        8 => {
            spec.opcode = Opcode::TLS13_OPEN.0;
            spec.slot = record.slot;
            spec.src_len = 21;
            "record too short"
        }
        9 => {
            spec.opcode = Opcode::TLS13_SEAL.0;
            spec.slot = record.slot;
            spec.aad_len = 3;
            spec.dst_len = 200;
            "aad on a record job"
        }
        10 => {
            spec.opcode = Opcode::KEY_LOAD.0;
            spec.slot = 1;
            spec.src_len = 64;
            spec.src_iova = Some(0x40);
            "key block unmapped"
        }
        _ => {
            spec.opcode = Opcode::KEY_DESTROY.0;
            spec.slot = 900 + p.rng.below(100) as u32;
            "destroy an empty slot"
        }
    };
    let _ = p.run(spec, what);
}

#[test]
fn rtl_and_simulator_agree_job_for_job() {
    let mut p = open_pair(env_or("TLSACCEL_DIFF_SEED", 0x7a51_5eed));
    let jobs = env_or("TLSACCEL_DIFF_JOBS", 500);
    let key128 = p.rng.bytes(16);
    let key256 = p.rng.bytes(32);
    let iv: [u8; 12] = p.rng.bytes(12).try_into().expect("12");
    let raw128 = p.load(
        AeadAlgorithm::AES_128_GCM,
        RecordProtocol::RAW,
        KeyDirection::ANY,
        &key128,
        [0; 12],
        0,
    );
    let raw256 = p.load(
        AeadAlgorithm::AES_256_GCM,
        RecordProtocol::RAW,
        KeyDirection::ANY,
        &key256,
        [0; 12],
        0,
    );
    let mut records = Vec::new();
    for (algorithm, key) in [
        (AeadAlgorithm::AES_128_GCM, &key128),
        (AeadAlgorithm::AES_256_GCM, &key256),
    ] {
        // Start near the end of the sequence space on one pair, to meet SEQUENCE_EXHAUSTED.
        let start = if algorithm == AeadAlgorithm::AES_128_GCM {
            u64::MAX - 40
        } else {
            7
        };
        let seal = p.load(
            algorithm,
            RecordProtocol::TLS13,
            KeyDirection::SEAL,
            key,
            iv,
            start,
        );
        let open = p.load(
            algorithm,
            RecordProtocol::TLS13,
            KeyDirection::OPEN,
            key,
            iv,
            start,
        );
        records.push((seal, open));
    }
    while p.jobs < jobs {
        match p.rng.below(10) {
            0..=3 => {
                let key = if p.rng.chance(50) { raw128 } else { raw256 };
                aead_round(&mut p, key);
            }
            4..=7 => {
                let (seal, open) = records[p.rng.below(2) as usize];
                record_round(&mut p, seal, open);
            }
            _ => hostile_round(&mut p, raw128, records[0].0),
        }
    }
    // A destroyed slot is empty on both, and its index is used again by the next load.
    let gone = p.rtl.slots.remove(0).index();
    p.sim.slots.remove(0);
    let (result, _) = p.run(
        Spec {
            opcode: Opcode::AEAD_SEAL.0,
            slot: gone,
            src_len: 16,
            dst_len: 32,
            ..Spec::default()
        },
        "job on a destroyed slot",
    );
    assert!(result.is_err());
    for counter in Counter::ALL {
        assert_eq!(
            p.rtl.device.counter(counter),
            p.sim.device.counter(counter),
            "counter {counter:?} differs after {} jobs",
            p.jobs
        );
    }
    println!(
        "{} jobs: completions, dst buffers and counters agree; statuses {:?}",
        p.jobs, p.seen
    );
    // The stream reached every outcome an AES-GCM job can have here.
    for status in [
        "OK",
        "AUTH_FAILED",
        "BAD_DESCRIPTOR",
        "BAD_SLOT",
        "SLOT_EMPTY",
        "SLOT_MISMATCH",
        "LENGTH_ERROR",
        "DMA_FAULT",
        "SEQUENCE_EXHAUSTED",
        "RECORD_MALFORMED",
    ] {
        assert!(
            p.seen.contains_key(status),
            "no job ended {status}: {:?}",
            p.seen
        );
    }
    let _ = (records[1], p.rtl.name, p.sim.name);
}

/// The interrupt messages a queue raises for bursts of completions, with count coalescing
/// (and a time limit far away), on both. §7 counts completions per *posting*: the RTL posts
/// one completion at a time, so a burst of n raises exactly n / count messages; the
/// simulator posts what an engine pass finished together, so it may raise fewer. Both must
/// raise at least one message per burst and never more than the RTL's per-completion count.
#[test]
fn interrupt_counts_fit_the_coalescing_rules_on_both() {
    const SETTINGS: [(u32, u64); 4] = [(1, 10), (4, 32), (8, 20), (16, 16)];
    let mut counts = Vec::new();
    for device in [
        Device::with_transport(
            Arc::new(RtlTransport::new().expect("rtl")) as Arc<dyn Transport>,
            DeviceOptions::default(),
        )
        .expect("rtl"),
        Device::open("sim").expect("sim"),
    ] {
        let mut per_setting = Vec::new();
        for (coalesce_count, batch) in SETTINGS {
            let mut pair = device
                .queue(QueueConfig {
                    size: 64,
                    interrupts: true,
                    coalesce_count,
                    coalesce_usecs: 1_000_000,
                    public_key: false,
                })
                .expect("queue");
            let before = device.counter(Counter::Interrupts);
            let jobs: Vec<Job> = (0..batch)
                .map(|i| Job {
                    user_data: i,
                    op: JobOp::Nop,
                })
                .collect();
            let mut done = 0;
            pair.run(&jobs, TIMEOUT, |_| done += 1).expect("runs");
            assert_eq!(done, batch);
            // A completion is visible before its message is counted: wait for the count to
            // reach what the rules require (at least one; on the RTL, one per `count`).
            let least = if device.info().name == "rtl" {
                batch / u64::from(coalesce_count)
            } else {
                1
            };
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while device.counter(Counter::Interrupts) - before < least
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            per_setting.push(device.counter(Counter::Interrupts) - before);
        }
        counts.push(per_setting);
    }
    println!(
        "interrupt messages per burst: rtl {:?}, sim {:?}",
        counts[0], counts[1]
    );
    for (i, (count, batch)) in SETTINGS.into_iter().enumerate() {
        let per_completion = batch / u64::from(count);
        assert_eq!(
            counts[0][i], per_completion,
            "RTL, count {count}, burst {batch}"
        );
        assert!(
            (1..=per_completion).contains(&counts[1][i]),
            "simulator, count {count}, burst {batch}: {} messages",
            counts[1][i]
        );
    }
}
