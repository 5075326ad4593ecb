//! Property tests of the ring protocol between the driver and the simulator: whatever the ring
//! size, burst sizes and job mix, every job completes exactly once with the status its
//! descriptor calls for, and the queue stays usable.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use tlsaccel_driver::abi::{Descriptor, Status};
use tlsaccel_driver::{Device, Job, JobOp, QueueConfig, SlotRef};

fn device() -> &'static Arc<Device> {
    static DEVICE: OnceLock<Arc<Device>> = OnceLock::new();
    DEVICE.get_or_init(|| Device::open("sim:queues=2,engines=2,key-slots=16").expect("sim opens"))
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Nop,
    BadOpcode,
    EmptySlot,
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![4 => Just(Kind::Nop), 1 => Just(Kind::BadOpcode), 1 => Just(Kind::EmptySlot)]
}

fn op(kind: Kind) -> (JobOp, Status) {
    match kind {
        Kind::Nop => (JobOp::Nop, Status::OK),
        Kind::BadOpcode => {
            let d = Descriptor {
                opcode: 0x66,
                ..Descriptor::default()
            };
            (JobOp::Raw(d), Status::BAD_OPCODE)
        }
        Kind::EmptySlot => {
            // Slot 15 is never loaded here; a destroy of an empty slot says so.
            (
                JobOp::KeyDestroy {
                    slot: SlotRef::unheld(15),
                },
                Status::SLOT_EMPTY,
            )
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn every_job_completes_exactly_once(
        ring_log2 in 1u32..7,
        bursts in prop::collection::vec(1usize..40, 1..30),
        kinds in prop::collection::vec(kind(), 1..400),
    ) {
        let size = 1u32 << ring_log2;
        let mut pair = device().queue(QueueConfig { size, ..QueueConfig::default() }).unwrap();
        let jobs: Vec<(Job, Status)> = kinds
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let (op, status) = op(*k);
                (Job { user_data: i as u64, op }, status)
            })
            .collect();
        let expected: HashMap<u64, Status> = jobs.iter().map(|(j, s)| (j.user_data, *s)).collect();
        let plain: Vec<Job> = jobs.iter().map(|(j, _)| j.clone()).collect();
        let mut seen: HashMap<u64, Status> = HashMap::new();
        let mut next = 0;
        let mut burst = bursts.iter().cycle();
        let deadline = Instant::now() + Duration::from_secs(20);
        while seen.len() < plain.len() {
            prop_assert!(Instant::now() < deadline, "stuck with {} of {} done", seen.len(), plain.len());
            if next < plain.len() {
                let end = (next + burst.next().copied().unwrap_or(1)).min(plain.len());
                let taken = pair.submit(&plain[next..end]).unwrap();
                prop_assert!(taken <= (size - 1) as usize);
                next += taken;
            }
            pair.poll(|done| {
                let status = match done.result {
                    Ok(_) => Status::OK,
                    Err(e) => e.status().unwrap_or(Status(0xffff)),
                };
                let first = seen.insert(done.user_data, status);
                assert!(first.is_none(), "job {} completed twice", done.user_data);
            });
            prop_assert!(pair.outstanding() < size);
        }
        prop_assert_eq!(seen, expected);
        let stats = pair.stats();
        prop_assert_eq!(stats.unknown_cookies, 0);
        prop_assert_eq!(stats.bad_completions, 0);
        prop_assert_eq!(stats.completed, plain.len() as u64);
    }
}
