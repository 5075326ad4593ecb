//! Clock cycles per 16 KiB TLS 1.3 record on the RTL, sealed and opened, for the line rate
//! in fpga/README.md. Cycles are the model's own count (deterministic, whatever the host
//! is doing), taken over a batch of records in flight back to back: descriptor fetch,
//! probes, key table, DMA in, AES-GCM, DMA out and the completion, per record.
//!
//! The bound asserted is the design's: the engine overlaps its passes, so a record must not
//! take more than `PASSES` cycles per 16-byte block plus a fixed overhead. The measured
//! figures are printed (`cargo test -p tlsaccel-rtl --test record_cycles -- --nocapture`).

use std::sync::Arc;
use std::time::Duration;

use tlsaccel_driver::abi::{AeadAlgorithm, KeyDirection, RecordProtocol};
use tlsaccel_driver::{Device, DeviceOptions, Job, JobOp, KeyMaterial, QueueConfig, Transport};
use tlsaccel_rtl::RtlTransport;

const RECORD: usize = 16384;
const BATCH: usize = 16;
const BLOCKS: u64 = (RECORD / 16) as u64;
/// Fixed cycles per record beyond the per-block passes: descriptor fetch, probes, key table,
/// H and E(J0) through the pipeline, tag, completion.
const OVERHEAD: u64 = 300;

struct Rig {
    transport: Arc<RtlTransport>,
    device: Arc<Device>,
}

fn rig() -> Rig {
    let transport = Arc::new(RtlTransport::new().expect("the RTL model is built"));
    let dyn_transport: Arc<dyn Transport> = Arc::clone(&transport) as Arc<dyn Transport>;
    let device = Device::with_transport(dyn_transport, DeviceOptions::default()).expect("open");
    Rig { transport, device }
}

/// Runs `jobs` as one batch and returns the model cycles they took, per job.
fn cycles_per_job(rig: &Rig, pair: &mut tlsaccel_driver::QueuePair, jobs: &[Job]) -> u64 {
    let before = rig.transport.model().cycles();
    let mut ok = 0;
    pair.run(jobs, Duration::from_secs(60), |done| {
        assert!(
            done.result.is_ok(),
            "job {}: {:?}",
            done.user_data,
            done.result
        );
        ok += 1;
    })
    .expect("batch runs");
    assert_eq!(ok, jobs.len());
    (rig.transport.model().cycles() - before) / jobs.len() as u64
}

#[test]
fn a_16_kib_record_takes_a_bounded_number_of_cycles() {
    let rig = rig();
    let device = &rig.device;
    let mut pair = device
        .queue(QueueConfig {
            size: 64,
            interrupts: false,
            ..QueueConfig::default()
        })
        .expect("queue");
    let key = [0x5a; 32];
    let iv = [0x0c; 12];
    let material = |direction| {
        KeyMaterial::new(
            AeadAlgorithm::AES_256_GCM,
            RecordProtocol::TLS13,
            direction,
            &key,
            iv,
            0,
        )
        .expect("material")
    };
    let seal = device
        .load_key(&material(KeyDirection::SEAL))
        .expect("seal slot");
    let open = device
        .load_key(&material(KeyDirection::OPEN))
        .expect("open slot");
    let plain = device.pool().alloc(RECORD).expect("dma");
    plain
        .write(0, &(0..RECORD).map(|i| i as u8).collect::<Vec<_>>())
        .expect("write");
    let record_len = RECORD + 5 + 1 + 16;
    let records: Vec<_> = (0..BATCH)
        .map(|_| device.pool().alloc(record_len).expect("dma"))
        .collect();
    let opened: Vec<_> = (0..BATCH)
        .map(|_| device.pool().alloc(RECORD).expect("dma"))
        .collect();

    let seals: Vec<Job> = records
        .iter()
        .enumerate()
        .map(|(i, out)| Job {
            user_data: i as u64,
            op: JobOp::Tls13Seal {
                slot: seal.slot_ref(),
                content_type: 23,
                padding: 0,
                src: plain.whole(),
                dst: out.whole(),
            },
        })
        .collect();
    let opens: Vec<Job> = records
        .iter()
        .zip(&opened)
        .enumerate()
        .map(|(i, (record, out))| Job {
            user_data: i as u64,
            op: JobOp::Tls13Open {
                slot: open.slot_ref(),
                src: record.whole(),
                dst: out.whole(),
            },
        })
        .collect();
    let seal_cycles = cycles_per_job(&rig, &mut pair, &seals);
    let open_cycles = cycles_per_job(&rig, &mut pair, &opens);
    for out in &opened {
        assert_eq!(
            out.to_vec(0, RECORD).expect("read"),
            plain.to_vec(0, RECORD).expect("read"),
            "a record opened to other bytes"
        );
    }
    let line_rate = |cycles: u64| RECORD as f64 * 8.0 * 250e6 / cycles as f64 / 1e9;
    println!(
        "16 KiB TLS 1.3 record, AES-256-GCM: seal {seal_cycles} cycles ({:.2}/block, {:.1} Gbit/s \
         at 250 MHz), open {open_cycles} cycles ({:.2}/block, {:.1} Gbit/s)",
        seal_cycles as f64 / BLOCKS as f64,
        line_rate(seal_cycles),
        open_cycles as f64 / BLOCKS as f64,
        line_rate(open_cycles),
    );
    for (what, cycles, passes) in [
        ("seal", seal_cycles, SEAL_PASSES),
        ("open", open_cycles, OPEN_PASSES),
    ] {
        assert!(
            cycles <= passes * BLOCKS + OVERHEAD,
            "a {what} took {cycles} cycles: more than {passes} passes over the record"
        );
    }

    // The same behind PCIe-like read latency (1 µs at 250 MHz from read request to data):
    // one job at a time waits out each read's round trip — the descriptor, the probes, the
    // header, each 4 KiB burst of data, an open's tag.
    rig.transport.model().set_read_latency(LATENCY);
    let seal_slow = cycles_per_job(&rig, &mut pair, &seals);
    let open_slow = cycles_per_job(&rig, &mut pair, &opens);
    println!(
        "with {LATENCY}-cycle reads: seal {seal_slow} cycles ({:.1} Gbit/s), open {open_slow} \
         cycles ({:.1} Gbit/s): {:.1} and {:.1} round trips per record",
        line_rate(seal_slow),
        line_rate(open_slow),
        (seal_slow - seal_cycles) as f64 / f64::from(LATENCY),
        (open_slow - open_cycles) as f64 / f64::from(LATENCY),
    );
    for (what, slow, fast) in [
        ("seal", seal_slow, seal_cycles),
        ("open", open_slow, open_cycles),
    ] {
        assert!(
            slow > fast + 8 * u64::from(LATENCY) && slow <= fast + ROUND_TRIPS * u64::from(LATENCY),
            "a {what} behind {LATENCY}-cycle reads took {slow} cycles ({fast} without): not the \
             expected 8 to {ROUND_TRIPS} serial round trips"
        );
    }
}

/// Host read latency for the second measurement, in cycles (1 µs at 250 MHz).
const LATENCY: u32 = 250;
/// Serial read round trips one record can wait for: descriptor, 6 probes, header, 4 KiB
/// data bursts (5 for 16 KiB when unaligned), tag.
const ROUND_TRIPS: u64 = 14;

/// Passes over the record's blocks: DMA in (with the cipher behind it), then DMA out.
const SEAL_PASSES: u64 = 1;
const OPEN_PASSES: u64 = 2;
