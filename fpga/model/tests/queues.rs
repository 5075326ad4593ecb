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
