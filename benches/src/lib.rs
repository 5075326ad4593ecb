//! Workloads shared by the criterion benchmarks — the device path and its CPU baseline, each
//! shaped the way the daemon will use it (records already in DMA memory, batches across
//! connections, the ring kept busy) — and [`compare`], the harness that sets tlsaccel next
//! to nginx and HAProxy.

pub mod compare;

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
use tlsaccel_driver::abi::{
    record_nonce, tls13_record_len, AeadAlgorithm, KeyDirection, RecordProtocol, TAG_LEN,
};
use tlsaccel_driver::{
    Device, DmaBuffer, Job, JobOp, KeyMaterial, KeySlot, QueueConfig, QueuePair,
};

/// True when criterion runs each benchmark once as a smoke test (`cargo bench -- --test`);
/// the summaries after the criterion groups are then skipped.
pub fn smoke_mode() -> bool {
    std::env::args().any(|arg| arg == "--test")
}

/// Opens the in-process simulator for benchmarks. `TLSACCEL_BENCH_DEVICE` overrides the
/// address; the default gives the simulator one engine thread per core not used by the
/// benchmark's own (driver) thread, so the two do not preempt each other on a small machine.
pub fn open_device() -> Arc<Device> {
    let address = std::env::var("TLSACCEL_BENCH_DEVICE").unwrap_or_else(|_| {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        format!("sim:engines={}", cores.saturating_sub(1).max(1))
    });
    Device::open(&address).expect("the benchmark device opens")
}

/// Time split of a run: wall clock, and the part the driver thread spent doing work
/// (submitting, and polls that found completions) rather than waiting for the device, with
/// the cost of the timer calls themselves subtracted.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunTime {
    pub wall: Duration,
    pub driver: Duration,
}

/// Runs `jobs.len() * rounds` jobs, `batch` per doorbell, keeping up to the ring's capacity in
/// flight. Panics if a job fails: a benchmark of failing jobs measures nothing.
pub fn pipeline(pair: &mut QueuePair, jobs: &[Job], batch: usize, rounds: u64) -> RunTime {
    let total = jobs.len() as u64 * rounds;
    let mut submitted = 0u64;
    let mut completed = 0u64;
    let mut driver = Duration::ZERO;
    let mut intervals = 0u32;
    let start = Instant::now();
    while completed < total {
        // Never more jobs in flight than there are distinct jobs: each names its own buffers.
        let in_flight = (submitted - completed) as usize;
        if submitted < total
            && pair.free_slots() as usize >= batch
            && in_flight + batch <= jobs.len()
        {
            let at = (submitted % jobs.len() as u64) as usize;
            let end = (at + batch).min(jobs.len());
            let t = Instant::now();
            let n = pair.submit(&jobs[at..end]).expect("queue accepts jobs");
            driver += t.elapsed();
            intervals += 1;
            submitted += n as u64;
            continue;
        }
        if !pair.has_completion() {
            std::hint::spin_loop();
            continue;
        }
        let t = Instant::now();
        let mut failed = None;
        let found = pair.poll(|done| {
            if let Err(e) = done.result {
                failed = Some(e);
            }
        });
        driver += t.elapsed();
        intervals += 1;
        completed += found as u64;
        if let Some(error) = failed {
            panic!("benchmark job failed: {error}");
        }
    }
    RunTime {
        wall: start.elapsed(),
        driver: driver.saturating_sub(timer_cost() * intervals),
    }
}

/// What one `Instant::now()` pair costs on this machine, measured once.
pub fn timer_cost() -> Duration {
    static COST: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *COST.get_or_init(|| {
        let n = 1_000_000u32;
        let start = Instant::now();
        for _ in 0..n {
            std::hint::black_box(Instant::now().elapsed());
        }
        start.elapsed() / n
    })
}

/// 1024 NOP jobs.
pub fn nop_jobs() -> Vec<Job> {
    (0..1024)
        .map(|i| Job {
            user_data: i,
            op: JobOp::Nop,
        })
        .collect()
}

/// A data queue for benchmarks.
pub fn bench_queue(device: &Arc<Device>, size: u32) -> QueuePair {
    device
        .queue(QueueConfig {
            size,
            ..QueueConfig::default()
        })
        .expect("a data queue is free")
}

const BENCH_KEY: [u8; 16] = [0x11; 16];
const BENCH_IV: [u8; 12] = [0x22; 12];

/// TLS 1.3 AES-128-GCM record sealing on the device: `count` plaintexts of `size` bytes in
/// DMA memory, each with its own output buffer.
#[derive(Debug)]
pub struct DeviceSeal {
    pub pair: QueuePair,
    pub jobs: Vec<Job>,
    _slot: KeySlot,
    _buffers: Vec<DmaBuffer>,
}

impl DeviceSeal {
    pub fn new(device: &Arc<Device>, size: usize, count: usize) -> Self {
        let material = KeyMaterial::new(
            AeadAlgorithm::AES_128_GCM,
            RecordProtocol::TLS13,
            KeyDirection::SEAL,
            &BENCH_KEY,
            BENCH_IV,
            0,
        )
        .expect("valid key material");
        let slot = device.load_key(&material).expect("key loads");
        let pair = bench_queue(device, 1024);
        let mut buffers = Vec::new();
        let mut jobs = Vec::new();
        for i in 0..count {
            let src = device.pool().alloc(size.max(1)).expect("DMA memory");
            src.write(0, &vec![i as u8; size]).expect("in bounds");
            let dst = device
                .pool()
                .alloc(tls13_record_len(size, 0))
                .expect("DMA memory");
            jobs.push(Job {
                user_data: i as u64,
                op: JobOp::Tls13Seal {
                    slot: slot.slot_ref(),
                    content_type: 23,
                    padding: 0,
                    src: src.span(0, size).expect("in bounds"),
                    dst: dst.whole(),
                },
            });
            buffers.push(src);
            buffers.push(dst);
        }
        Self {
            pair,
            jobs,
            _slot: slot,
            _buffers: buffers,
        }
    }

    /// Seals `rounds * count` records, up to 32 per doorbell.
    pub fn run(&mut self, rounds: u64) -> RunTime {
        pipeline(&mut self.pair, &self.jobs, 32, rounds)
    }
}

/// The same record construction on the CPU with aws-lc-rs, over the same data flow as
/// [`DeviceSeal`]: `count` distinct plaintext buffers, each record built in its own output
/// buffer (header, plaintext, content type, seal in place, tag).
#[derive(Debug)]
pub struct CpuSeal {
    key: LessSafeKey,
    sequence: u64,
    inputs: Vec<Vec<u8>>,
    records: Vec<Vec<u8>>,
    next: usize,
}

impl CpuSeal {
    pub fn new(size: usize, count: usize) -> Self {
        let key = UnboundKey::new(&AES_128_GCM, &BENCH_KEY).expect("valid key");
        Self {
            key: LessSafeKey::new(key),
            sequence: 0,
            inputs: (0..count).map(|i| vec![i as u8; size]).collect(),
            records: (0..count)
                .map(|_| Vec::with_capacity(tls13_record_len(size, 0)))
                .collect(),
            next: 0,
        }
    }

    /// Builds the next record; returns its length.
    pub fn seal_next(&mut self) -> usize {
        let at = self.next;
        self.next = (self.next + 1) % self.inputs.len();
        let plaintext = &self.inputs[at];
        let record = &mut self.records[at];
        let length = (plaintext.len() + 1 + TAG_LEN) as u16;
        record.clear();
        record.extend_from_slice(&[23, 3, 3]);
        record.extend_from_slice(&length.to_be_bytes());
        record.extend_from_slice(plaintext);
        record.push(23);
        let header: [u8; 5] = record[..5].try_into().expect("5-byte header");
        let nonce = Nonce::assume_unique_for_key(record_nonce(&BENCH_IV, self.sequence));
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut record[5..])
            .expect("record fits");
        record.extend_from_slice(tag.as_ref());
        self.sequence += 1;
        record.len()
    }
}
