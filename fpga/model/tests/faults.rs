//! The test bench's faults on the RTL (`RtlTransport::testbench_faults`), through the
//! driver's `ModelFaults` as a test of the host side uses them: what the bench refuses, the
//! injected DMA fault (which no conformance case uses), and what a reset lifts. The stall and
//! the dropped completion are exercised by the conformance cases (`conformance.rs`).

use std::sync::Arc;
use std::time::Duration;

use tlsaccel_driver::abi::regs::{self, Counter};
use tlsaccel_driver::abi::{
    AeadAlgorithm, Capabilities, DeviceStatus, FatalCode, FaultCode, ModelFault, Status, TAG_LEN,
};
use tlsaccel_driver::{
    Device, DeviceOptions, Job, JobOp, KeyMaterial, ModelFaults, ModelFaultsError, QueueConfig,
    Transport,
};
use tlsaccel_rtl::RtlTransport;

const TIMEOUT: Duration = Duration::from_secs(10);

fn open_rtl() -> Arc<Device> {
    let transport: Arc<dyn Transport> =
        Arc::new(RtlTransport::new().expect("the RTL model is built (verilator installed)"));
    Device::with_transport(transport, DeviceOptions::default()).expect("the driver opens the RTL")
}

fn run_one(pair: &mut tlsaccel_driver::QueuePair, op: JobOp) -> Option<Status> {
    let mut status = None;
    pair.run(&[Job { user_data: 1, op }], TIMEOUT, |done| {
        status = Some(match done.result {
            Ok(_) => Status::OK,
            Err(error) => error.status().expect("a device status, not a driver error"),
        })
    })
    .expect("the queue runs");
    status
}

#[test]
fn the_bench_injects_without_a_window_and_refuses_what_it_cannot_show() {
    let device = open_rtl();
    assert!(!device
        .info()
        .capabilities
        .contains(Capabilities::MODEL_FAULTS));
    let faults = ModelFaults::new(&device).expect("the RTL's test bench injects faults");
    faults
        .require(&[
            FaultCode::STALL,
            FaultCode::RESUME,
            FaultCode::DROP_NEXT_COMPLETION,
            FaultCode::DMA_FAULT_NEXT_JOB,
            FaultCode::FATAL,
        ])
        .expect("the bench shows these");
    for fault in [
        ModelFault::CorruptNextTag,
        ModelFault::CorruptNextOpenTag,
        ModelFault::OversizeNextResultLength,
        ModelFault::BogusCompletion {
            queue: 0,
            cookie: 1,
            result_len: 2,
        },
    ] {
        let error = faults.inject(fault).unwrap_err();
        assert!(
            matches!(error, ModelFaultsError::Unsupported { code, .. } if code == fault.code()),
            "{fault:?}: {error}"
        );
        assert!(faults.require(&[fault.code()]).is_err(), "{fault:?}");
    }
    // Nothing happened meanwhile: jobs still run.
    let mut pair = device.queue(QueueConfig::default()).expect("queue");
    assert_eq!(run_one(&mut pair, JobOp::Nop), Some(Status::OK));
}

#[test]
fn an_injected_dma_fault_fails_the_next_job_that_reads_memory_and_only_it() {
    let device = open_rtl();
    let faults = ModelFaults::new(&device).expect("bench");
    let mut pair = device.queue(QueueConfig::default()).expect("queue");
    let slot = device
        .load_key(&KeyMaterial::raw(AeadAlgorithm::AES_128_GCM, &[0x42; 16]).expect("key"))
        .expect("slot");
    let src = device.pool().alloc(64).expect("src");
    src.write(0, &[0x33; 64]).expect("src");
    let dst = device.pool().alloc(64 + TAG_LEN).expect("dst");
    let seal = || JobOp::AeadSeal {
        slot: slot.slot_ref(),
        nonce: [6; 12],
        aad: None,
        src: src.whole(),
        dst: dst.whole(),
    };
    let faults_before = device.counter(Counter::DmaFaults);

    faults.inject(ModelFault::DmaFaultNextJob).expect("bench");
    // A NOP reads no job memory: it completes, and the fault waits for the seal.
    assert_eq!(run_one(&mut pair, JobOp::Nop), Some(Status::OK));
    assert_eq!(run_one(&mut pair, seal()), Some(Status::DMA_FAULT));
    assert_eq!(device.counter(Counter::DmaFaults), faults_before + 1);
    assert_eq!(
        dst.to_vec(0, 64 + TAG_LEN).expect("dst"),
        vec![0; 64 + TAG_LEN],
        "a job refused at its first read wrote dst"
    );
    // One job only.
    assert_eq!(run_one(&mut pair, seal()), Some(Status::OK));
    assert_ne!(
        dst.to_vec(0, 64 + TAG_LEN).expect("dst"),
        vec![0; 64 + TAG_LEN]
    );
}

#[test]
fn a_reset_lifts_the_stall_and_an_injected_fatal() {
    let device = open_rtl();
    let faults = ModelFaults::new(&device).expect("bench");
    let mut pair = device.queue(QueueConfig::default()).expect("queue");
    faults.inject(ModelFault::Stall).expect("bench");
    let nops: Vec<Job> = (0..3)
        .map(|i| Job {
            user_data: i,
            op: JobOp::Nop,
        })
        .collect();
    assert_eq!(pair.submit(&nops).expect("submit"), 3);
    tlsaccel_tests::conformance::wait_until("the queue engine never held the job", || {
        faults.held_jobs() == 1
    })
    .expect("held");
    // The queue engine takes one job at a time: the others wait in the ring.
    assert_eq!(faults.held_jobs(), 1);
    faults.inject(ModelFault::Fatal).expect("bench");
    assert!(device.status().contains(DeviceStatus::FATAL));
    assert_eq!(
        FatalCode(device.transport().read32(regs::FATAL_CODE)),
        FatalCode::INJECTED
    );
    faults
        .inject(ModelFault::DropNextCompletion)
        .expect("bench");

    device.recover().expect("the device comes back");
    assert!(!device.status().contains(DeviceStatus::FATAL));
    assert_eq!(faults.held_jobs(), 0, "the reset dropped the held job");
    drop(pair);
    // No RESUME: the reset lifted the stall, and the pending dropped completion with it.
    let mut fresh = device.queue(QueueConfig::default()).expect("queue");
    assert_eq!(run_one(&mut fresh, JobOp::Nop), Some(Status::OK));
}
