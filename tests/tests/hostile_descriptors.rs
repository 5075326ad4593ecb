//! Random descriptors against the in-process device: whatever the host writes into the ring,
//! every job comes back exactly once with a status this build knows, never reports writing
//! more than its `dst_len`, and the device goes on serving. Buffer contents are random too,
//! so record and AEAD opens see garbage records.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use proptest::prelude::*;
use tlsaccel_driver::abi::{AeadAlgorithm, Descriptor, KeyDirection, Opcode, RecordProtocol};
use tlsaccel_driver::{Device, DmaBuffer, Job, JobError, JobOp, KeyMaterial, KeySlot, QueueConfig};

struct Fixture {
    device: Arc<Device>,
    buffer: DmaBuffer,
    slots: Vec<KeySlot>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let device = Device::open("sim:queues=3,engines=2,key-slots=64").expect("sim");
        let buffer = device.pool().alloc(128 * 1024).expect("dma");
        let key = [3u8; 32];
        let mut slots = vec![device
            .load_key(&KeyMaterial::raw(AeadAlgorithm::AES_256_GCM, &key).expect("key"))
            .expect("raw slot")];
        for (protocol, direction) in [
            (RecordProtocol::TLS13, KeyDirection::SEAL),
            (RecordProtocol::TLS13, KeyDirection::OPEN),
            (RecordProtocol::TLS12, KeyDirection::SEAL),
            (RecordProtocol::TLS12, KeyDirection::OPEN),
        ] {
            let material = KeyMaterial::new(
                AeadAlgorithm::AES_256_GCM,
                protocol,
                direction,
                &key,
                [4; 12],
                0,
            )
            .expect("material");
            slots.push(device.load_key(&material).expect("record slot"));
        }
        Fixture {
            device,
            buffer,
            slots,
        }
    })
}

fn opcode() -> impl Strategy<Value = u8> {
    prop_oneof![
        4 => prop::sample::select(
            Opcode::KNOWN.iter().map(|op| op.0).filter(|&op| op != Opcode::KEY_DESTROY.0 && op != Opcode::KEY_LOAD.0 && op != Opcode::PKE_KEY_LOAD.0).collect::<Vec<_>>()
        ),
        1 => any::<u8>(),
    ]
}

/// A length: small, at a boundary the device checks, or anything.
fn length() -> impl Strategy<Value = u32> {
    prop_oneof![
        4 => 0u32..20_000,
        1 => prop::sample::select(vec![0, 1, 15, 16, 17, 21, 22, 16_384, 16_401, 16_645, 65_536 + 512, u32::MAX]),
        1 => any::<u32>(),
    ]
}

/// An address and length together: wholly inside the buffer (anywhere in it, up to its last
/// byte), or wild (almost surely unmapped). Ranges that run from the buffer into other memory
/// of the same mapping (the rings) are not generated: the device would rightly write there,
/// and corrupting its own rings is the host's bug, not the device's.
fn span(base: u64, len: u64) -> impl Strategy<Value = (u64, u32)> {
    prop_oneof![
        5 => (length(), any::<u64>()).prop_map(move |(l, r)| {
            if u64::from(l) <= len {
                (base + r % (len - u64::from(l) + 1), l)
            } else {
                (r | (1 << 63), l)
            }
        }),
        1 => (any::<u64>(), length()).prop_map(|(iova, l)| (iova | (1 << 63), l)),
    ]
}

prop_compose! {
    fn descriptor(base: u64, len: u64, slots: Vec<u32>)(
        opcode in opcode(),
        flags in prop_oneof![8 => Just(0u8), 1 => any::<u8>()],
        slot in prop_oneof![4 => prop::sample::select(slots), 1 => any::<u32>()],
        src in span(base, len),
        dst in span(base, len),
        aad in prop_oneof![4 => Just((0u64, 0u32)), 1 => span(base, len)],
        param in prop_oneof![2 => Just([0u8; 12]), 1 => any::<[u8; 12]>()],
    ) -> Descriptor {
        Descriptor {
            opcode,
            flags,
            key_slot: slot.into(),
            src_iova: src.0.into(),
            src_len: src.1.into(),
            dst_iova: dst.0.into(),
            dst_len: dst.1.into(),
            aad_iova: aad.0.into(),
            aad_len: aad.1.into(),
            param,
            ..Descriptor::default()
        }
    }
}

fn descriptors() -> impl Strategy<Value = Vec<Descriptor>> {
    let f = fixture();
    let slots: Vec<u32> = f.slots.iter().map(KeySlot::index).collect();
    prop::collection::vec(
        descriptor(f.buffer.iova().0, f.buffer.len() as u64, slots),
        1..24,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn random_descriptors_get_a_known_status_and_the_device_keeps_serving(
        noise in prop::collection::vec(any::<u8>(), 4096),
        descriptors in descriptors(),
    ) {
        let f = fixture();
        // Fresh random bytes in the buffer for this case.
        for chunk in 0..(f.buffer.len() / noise.len()) {
            f.buffer.write(chunk * noise.len(), &noise).expect("in bounds");
        }
        let jobs: Vec<Job> = descriptors
            .iter()
            .enumerate()
            .map(|(i, d)| Job { user_data: i as u64, op: JobOp::Raw(*d) })
            .collect();
        let mut pair = f.device.queue(QueueConfig { size: 32, ..QueueConfig::default() }).expect("queue");
        let mut seen = Vec::new();
        pair.run(&jobs, Duration::from_secs(5), |c| seen.push(c)).expect("ring");
        prop_assert_eq!(seen.len(), jobs.len(), "every job completes once");
        for completion in &seen {
            match completion.result {
                Ok(_) => {}
                Err(JobError::Device { status, .. }) => prop_assert!(status.is_known(), "unknown status {status:?}"),
                Err(other) => prop_assert!(false, "job {}: {other} for {:?}", completion.user_data, descriptors[completion.user_data as usize]),
            }
        }
        let mut nop = None;
        pair.run(&[Job { user_data: 0, op: JobOp::Nop }], Duration::from_secs(5), |c| nop = Some(c.result)).expect("ring");
        prop_assert!(matches!(nop, Some(Ok(_))), "the device stopped serving: {nop:?}");
        prop_assert!(!f.device.is_lost());
    }
}
