//! The queue engine in RTL, through the driver's `Device` and `QueuePair`: NOP jobs around
//! the ring many times (phase tags flipping), and descriptors the device must refuse, with
//! the statuses and counters compared with the simulator's.

use std::sync::Arc;
use std::time::Duration;

use tlsaccel_driver::abi::regs::Counter;
use tlsaccel_driver::abi::{Descriptor, Opcode, Status};
use tlsaccel_driver::{Device, DeviceOptions, Job, JobError, JobOp, QueueConfig, Transport};
use tlsaccel_rtl::RtlTransport;

fn open_rtl() -> Arc<Device> {
    let transport: Arc<dyn Transport> =
        Arc::new(RtlTransport::new().expect("the RTL model is built (verilator installed)"));
    Device::with_transport(transport, DeviceOptions::default()).expect("the driver opens the RTL")
}

fn polled_queue(device: &Arc<Device>, size: u32) -> tlsaccel_driver::QueuePair {
    device
        .queue(QueueConfig {
            size,
            interrupts: false,
            ..QueueConfig::default()
        })
        .expect("queue")
}

#[test]
fn nop_jobs_go_round_an_eight_entry_ring_many_times() {
    let device = open_rtl();
    let mut pair = polled_queue(&device, 8);
    let mut completed = Vec::new();
    // 7 per batch (a ring of 8 holds 7), 301 jobs: the ring wraps 37 times and the phase
    // tag flips each time.
    for batch in 0..43u64 {
        let jobs: Vec<Job> = (0..7)
            .map(|i| Job {
                user_data: batch * 7 + i,
                op: JobOp::Nop,
            })
            .collect();
        pair.run(&jobs, Duration::from_secs(10), |done| completed.push(done))
            .expect("queue runs");
    }
    assert_eq!(completed.len(), 301);
    let mut ids: Vec<u64> = completed
        .iter()
        .map(|c| {
            assert_eq!(c.result.map(|o| o.len), Ok(0), "job {}", c.user_data);
            c.user_data
        })
        .collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        (0..301).collect::<Vec<_>>(),
        "each job completed exactly once"
    );
    assert_eq!(device.counter(Counter::JobsOk), 301);
    assert_eq!(device.counter(Counter::DescriptorsFetched), 301);
}

/// Runs raw descriptors on `device` and returns their statuses.
fn statuses(device: &Arc<Device>, descriptors: &[Descriptor]) -> Vec<Option<Status>> {
    let mut pair = polled_queue(device, 16);
    let jobs: Vec<Job> = descriptors
        .iter()
        .enumerate()
        .map(|(i, d)| Job {
            user_data: i as u64,
            op: JobOp::Raw(*d),
        })
        .collect();
    let mut results = vec![None; jobs.len()];
    pair.run(&jobs, Duration::from_secs(10), |done| {
        results[done.user_data as usize] = Some(match done.result {
            Ok(_) => Status::OK,
            Err(JobError::Device { status, .. }) => status,
            Err(other) => panic!("job {}: {other}", done.user_data),
        });
    })
    .expect("queue runs");
    results
}

#[test]
fn descriptors_the_device_must_refuse_get_the_simulators_statuses() {
    let nop = Descriptor {
        opcode: Opcode::NOP.0,
        ..Descriptor::default()
    };
    let flags = Descriptor { flags: 1, ..nop };
    let reserved = Descriptor {
        reserved: 7.into(),
        ..nop
    };
    let unknown = Descriptor {
        opcode: 0x7f,
        ..nop
    };
    let cases = [nop, flags, reserved, unknown];
    let rtl = statuses(&open_rtl(), &cases);
    let simulator = statuses(&Device::open("sim").expect("simulator"), &cases);
    assert_eq!(
        rtl,
        vec![
            Some(Status::OK),
            Some(Status::BAD_DESCRIPTOR),
            Some(Status::BAD_DESCRIPTOR),
            Some(Status::BAD_OPCODE),
        ]
    );
    assert_eq!(rtl, simulator, "RTL and simulator disagree");
}

#[test]
fn jobs_for_engines_this_build_lacks_complete_unsupported() {
    // TLS 1.2 records and the public-key engines are simulator-only (device-spec §2.2).
    let device = open_rtl();
    let tls12 = Descriptor {
        opcode: Opcode::TLS12_SEAL.0,
        ..Descriptor::default()
    };
    let sign = Descriptor {
        opcode: Opcode::ECDSA_SIGN.0,
        ..Descriptor::default()
    };
    assert_eq!(
        statuses(&device, &[tls12, sign]),
        vec![Some(Status::UNSUPPORTED), Some(Status::UNSUPPORTED)]
    );
    assert_eq!(device.counter(Counter::JobsFailed), 2);
    assert_eq!(device.counter(Counter::Rejected), 2);
}

/// A queue disabled while the record engine runs one of its jobs: Q_STATUS.ENABLED holds
/// until the engine lets go, the ring registers and a new ENABLE are refused meanwhile, the
/// job is dropped without a completion, and afterwards the queue can be set up afresh
/// (device-spec §3.1). Driven cycle by cycle, without the transport's clock thread.
#[test]
fn a_queue_disabled_mid_job_is_released_only_when_the_engine_is_done() {
    use tlsaccel_driver::abi::regs::{self, queue};
    use tlsaccel_driver::abi::{
        DeviceControl, KeyBlock, QueueControl, QueueErrorCode, QueueStatus,
    };
    use tlsaccel_driver::dma::DmaRegion;
    use tlsaccel_rtl::RtlDevice;
    use zerocopy::IntoBytes;

    const BASE: u64 = 0x4000_0000;
    let device = RtlDevice::new().expect("model");
    let memory = Arc::new(DmaRegion::new(256 * 1024).expect("memory"));
    device.memory().map(BASE, Arc::clone(&memory));
    let (sq, cq, block, data) = (BASE, BASE + 0x1000, BASE + 0x2000, BASE + 0x4000);
    let bytes = |offset: usize, len: usize| {
        let mut buf = vec![0u8; len];
        memory.read(offset, &mut buf).expect("read");
        buf
    };
    let reg = |q: u32, r: u64| regs::queue_reg(q, r) as u32;
    let status =
        |q: u32| QueueStatus::from_bits_retain(device.read(reg(q, queue::STATUS)).expect("read"));
    device
        .write(regs::DEVICE_CONTROL as u32, DeviceControl::RESET.bits())
        .expect("reset");
    device.tick(2000); // the key table's zeroizing sweep
    device
        .write(regs::DEVICE_CONTROL as u32, DeviceControl::ENABLE.bits())
        .expect("enable");
    let setup = |q: u32| {
        device.write(reg(q, queue::SQ_BASE), sq as u32).expect("sq");
        device
            .write(reg(q, queue::SQ_BASE) + 4, (sq >> 32) as u32)
            .expect("sq");
        device.write(reg(q, queue::CQ_BASE), cq as u32).expect("cq");
        device
            .write(reg(q, queue::CQ_BASE) + 4, (cq >> 32) as u32)
            .expect("cq");
        device.write(reg(q, queue::SIZE), 4).expect("size");
        device
            .write(reg(q, queue::CONTROL), QueueControl::ENABLE.bits())
            .expect("control");
    };
    setup(1);
    assert!(status(1).contains(QueueStatus::ENABLED));
    let doorbell = |q: u32, tail: u32| {
        device
            .write(
                (regs::DOORBELL_BASE + u64::from(q) * regs::DOORBELL_STRIDE) as u32,
                tail,
            )
            .expect("doorbell")
    };
    // A key, then a 64 KiB seal that keeps the engine busy for thousands of cycles.
    let key = KeyBlock {
        algorithm: 2,
        key: [7; 32],
        ..KeyBlock::default()
    };
    memory.write(0x2000, key.as_bytes()).expect("block");
    let mut load = Descriptor {
        opcode: Opcode::KEY_LOAD.0,
        ..Descriptor::default()
    };
    load.key_slot = 3.into();
    load.src_iova = block.into();
    load.src_len = 64.into();
    load.cookie = 1.into();
    let mut seal = Descriptor {
        opcode: Opcode::AEAD_SEAL.0,
        ..Descriptor::default()
    };
    seal.key_slot = 3.into();
    seal.cookie = 2.into();
    seal.src_iova = data.into();
    seal.src_len = 65_536.into();
    seal.dst_iova = data.into();
    seal.dst_len = 65_552.into();
    memory.write(0, load.as_bytes()).expect("sq");
    memory.write(64, seal.as_bytes()).expect("sq");
    doorbell(1, 1);
    device.tick(400);
    assert_eq!(
        bytes(0x1000 + 12, 2),
        [0, 0],
        "the key load completed OK (status 0)"
    );
    doorbell(1, 2);
    device.tick(300); // the seal is under way
    device.write(reg(1, queue::CONTROL), 0).expect("disable");
    assert!(
        status(1).contains(QueueStatus::ENABLED),
        "ENABLED holds while the engine still works for the queue"
    );
    device.write(reg(1, queue::SIZE), 8).expect("size");
    device
        .write(reg(1, queue::CONTROL), QueueControl::ENABLE.bits())
        .expect("enable");
    assert_eq!(
        QueueErrorCode(device.read(reg(1, queue::ERROR)).expect("read")),
        QueueErrorCode::BAD_CONFIG,
        "a queue the engine has not let go of cannot be enabled again"
    );
    device.write(reg(1, queue::CONTROL), 0).expect("disable");
    let mut waited = 0;
    while status(1).contains(QueueStatus::ENABLED) {
        device.tick(256);
        waited += 256;
        assert!(waited < 200_000, "the engine never let go of the queue");
    }
    assert!(
        waited > 0,
        "released at once: the test did not catch the engine busy"
    );
    assert_eq!(
        bytes(0x1000 + 16, 16),
        [0; 16],
        "the dropped job left no completion"
    );
    assert_eq!(
        device.read(reg(1, queue::SIZE)).expect("read"),
        4,
        "SIZE held still"
    );
    // Set up afresh, the queue serves again from slot 0.
    memory.write(0x1000, &[0; 64]).expect("cq");
    let nop = Descriptor {
        opcode: Opcode::NOP.0,
        cookie: 9.into(),
        ..Descriptor::default()
    };
    memory.write(0, nop.as_bytes()).expect("sq");
    setup(1);
    assert!(status(1).contains(QueueStatus::ENABLED));
    doorbell(1, 1);
    device.tick(200);
    assert_eq!(bytes(0x1000, 8), 9u64.to_le_bytes(), "NOP completed");
}
