//! Jobs own their memory and key slots until the device lets go of them.
//!
//! The device here is the in-process simulator behind a transport that can pretend the device
//! has not yet released a disabled queue (Q_STATUS.ENABLED stays 1, as a device still
//! finishing a job's DMA reports it, device-spec §3.1). A job that timed out must then keep
//! its buffers and its slot index from everyone else, give them back (zeroed) once the device
//! lets go, and quarantine them for good if the queue is dropped while the device still holds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tlsaccel_driver::abi::regs::{self, queue as qreg};
use tlsaccel_driver::abi::{AeadAlgorithm, QueueStatus};
use tlsaccel_driver::dma::{DmaError, DmaMapper, DmaRegion};
use tlsaccel_driver::transport::EventFd;
use tlsaccel_driver::{
    Device, DeviceAddress, DeviceOptions, Iova, Job, JobError, JobOp, KeyMaterial, QueueConfig,
    Transport, TransportError,
};

/// Forwards everything to a real transport, except that while `holding` is set every queue
/// reads as still enabled.
#[derive(Debug)]
struct SlowToRelease {
    inner: Arc<dyn Transport>,
    holding: AtomicBool,
}

fn is_queue_status(offset: u64) -> bool {
    (0..regs::MAX_QUEUES).any(|q| offset == regs::queue_reg(q, qreg::STATUS))
}

impl DmaMapper for SlowToRelease {
    fn map(&self, region: &Arc<DmaRegion>, iova: Iova) -> Result<(), DmaError> {
        self.inner.map(region, iova)
    }
    fn unmap(&self, iova: Iova, len: usize) -> Result<(), DmaError> {
        self.inner.unmap(iova, len)
    }
}

impl Transport for SlowToRelease {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn read32(&self, offset: u64) -> u32 {
        let value = self.inner.read32(offset);
        if is_queue_status(offset) && self.holding.load(Ordering::SeqCst) {
            value | QueueStatus::ENABLED.bits()
        } else {
            value
        }
    }
    fn write32(&self, offset: u64, value: u32) {
        self.inner.write32(offset, value)
    }
    fn read64(&self, offset: u64) -> u64 {
        self.inner.read64(offset)
    }
    fn write64(&self, offset: u64, value: u64) {
        self.inner.write64(offset, value)
    }
    fn interrupt(&self, vector: u32) -> Result<Arc<EventFd>, TransportError> {
        self.inner.interrupt(vector)
    }
    fn reset(&self) -> Result<(), TransportError> {
        self.inner.reset()
    }
    fn simulator(&self) -> Option<&tlsaccel_sim::Device> {
        self.inner.simulator()
    }
}

fn device() -> (Arc<Device>, Arc<SlowToRelease>) {
    let inner = "sim:queues=4,key-slots=16"
        .parse::<DeviceAddress>()
        .unwrap()
        .connect()
        .unwrap();
    let transport = Arc::new(SlowToRelease {
        inner,
        holding: AtomicBool::new(false),
    });
    let device = Device::with_transport(
        Arc::clone(&transport) as Arc<dyn Transport>,
        DeviceOptions::default(),
    )
    .unwrap();
    (device, transport)
}

const LEN: usize = 3000;

/// One raw AES-GCM seal whose completion the device drops, so it times out after the device
/// wrote its `dst`. Returns the dst IOVA and the slot index the job named.
fn timed_out_seal(device: &Arc<Device>, pair: &mut tlsaccel_driver::QueuePair) -> (Iova, u32) {
    let slot = device
        .load_key(&KeyMaterial::raw(AeadAlgorithm::AES_128_GCM, &[7; 16]).unwrap())
        .unwrap();
    let src = device.pool().alloc(LEN).unwrap();
    src.write(0, &[0x42; LEN]).unwrap();
    let dst = device.pool().alloc(LEN + 16).unwrap();
    let job = Job {
        user_data: 1,
        op: JobOp::AeadSeal {
            slot: slot.slot_ref(),
            nonce: [1; 12],
            aad: None,
            src: src.whole(),
            dst: dst.whole(),
        },
    };
    device
        .transport()
        .simulator()
        .unwrap()
        .inject(tlsaccel_sim::Fault::DropNextCompletion);
    let mut result = None;
    pair.run(&[job], Duration::from_millis(200), |done| {
        result = Some(done.result)
    })
    .unwrap();
    assert_eq!(result, Some(Err(JobError::TimedOut)));
    assert!(pair.is_broken());
    let (iova, index) = (dst.iova(), slot.index());
    // The caller gives everything up at once, as a connection falling back to the CPU does.
    drop((src, dst, slot));
    (iova, index)
}

/// Loads keys until the device has no free slot; returns the indices handed out.
fn every_free_slot(device: &Arc<Device>) -> Vec<u32> {
    let mut slots = Vec::new();
    while let Ok(slot) =
        device.load_key(&KeyMaterial::raw(AeadAlgorithm::AES_128_GCM, &[9; 16]).unwrap())
    {
        slots.push(slot);
    }
    slots.iter().map(|s| s.index()).collect()
}

#[test]
fn a_timed_out_job_keeps_its_memory_and_slot_until_the_device_lets_go() {
    let (device, transport) = device();
    let mut pair = device.queue(QueueConfig::default()).unwrap();
    transport.holding.store(true, Ordering::SeqCst);
    let (dst_iova, slot_index) = timed_out_seal(&device, &mut pair);
    assert_eq!(
        pair.held(),
        1,
        "the failed job is held while the device holds the queue"
    );

    // Nobody else gets the memory or the slot index meanwhile.
    let others: Vec<_> = (0..64)
        .map(|_| device.pool().alloc(LEN + 16).unwrap())
        .collect();
    assert!(others.iter().all(|b| b.iova() != dst_iova));
    let indices = every_free_slot(&device);
    assert!(!indices.is_empty());
    assert!(
        !indices.contains(&slot_index),
        "a held slot index was reused"
    );
    drop(others);
    assert!(
        !pair.release_held(),
        "released while the device still holds the queue"
    );

    // The device lets go: memory and slot come back, and the memory comes back zeroed
    // although the device wrote ciphertext into it.
    transport.holding.store(false, Ordering::SeqCst);
    pair.poll(|_| panic!("a disabled queue completed a job"));
    assert_eq!(pair.held(), 0);
    let again: Vec<_> = (0..64)
        .map(|_| device.pool().alloc(LEN + 16).unwrap())
        .collect();
    let back = again
        .iter()
        .find(|b| b.iova() == dst_iova)
        .expect("released memory is reused");
    assert_eq!(back.to_vec(0, LEN + 16).unwrap(), vec![0; LEN + 16]);
    assert!(every_free_slot(&device).contains(&slot_index));
}

#[test]
fn a_queue_dropped_while_the_device_holds_it_quarantines_its_jobs() {
    let (device, transport) = device();
    let mut pair = device.queue(QueueConfig::default()).unwrap();
    transport.holding.store(true, Ordering::SeqCst);
    let (dst_iova, slot_index) = timed_out_seal(&device, &mut pair);
    let free_before = device.free_key_slots();
    let index = pair.index();
    drop(pair); // waits for the device, which never confirms
    transport.holding.store(false, Ordering::SeqCst);

    // The queue index waits for a reset too: a new queue never lands on it meanwhile.
    let mut queues = Vec::new();
    while let Ok(queue) = device.queue(QueueConfig::default()) {
        queues.push(queue);
    }
    assert!(!queues.is_empty());
    assert!(
        queues.iter().all(|q| q.index() != index),
        "a quarantined queue index was reused"
    );
    drop(queues);

    let others: Vec<_> = (0..256)
        .map(|_| device.pool().alloc(LEN + 16).unwrap())
        .collect();
    assert!(
        others.iter().all(|b| b.iova() != dst_iova),
        "quarantined memory came back"
    );
    assert_eq!(
        device.free_key_slots(),
        free_before,
        "a quarantined slot came back"
    );
    assert!(!every_free_slot(&device).contains(&slot_index));
}

#[test]
fn a_device_reset_releases_what_its_old_queues_held() {
    let (device, transport) = device();
    let mut pair = device.queue(QueueConfig::default()).unwrap();
    transport.holding.store(true, Ordering::SeqCst);
    let (dst_iova, slot_index) = timed_out_seal(&device, &mut pair);
    // A reset drops every job; READY after it means the device let go of all memory.
    device.recover().unwrap();
    transport.holding.store(false, Ordering::SeqCst);
    let mut failed = 0;
    pair.poll(|_| failed += 1);
    assert_eq!(pair.held(), 0);
    drop(pair);
    let again: Vec<_> = (0..64)
        .map(|_| device.pool().alloc(LEN + 16).unwrap())
        .collect();
    assert!(again.iter().any(|b| b.iova() == dst_iova));
    assert!(every_free_slot(&device).contains(&slot_index));
}

/// The real model, no pretending: a job the engine accepted and holds (STALL) outlives its
/// timeout; meanwhile its memory and slot index stay with the queue, and when the device
/// finally lets go it has written nothing that anyone else holds, and the slot's next owner
/// starts from sequence number 0.
#[test]
fn a_device_that_answers_after_a_timeout_writes_nothing_anyone_else_holds() {
    use tlsaccel_driver::abi::{KeyDirection, ModelFault, RecordProtocol};
    use tlsaccel_driver::ModelFaults;

    let device = Device::open("sim:queues=4,key-slots=16").unwrap();
    let faults = ModelFaults::new(&device).unwrap();
    let tls13 = |key: u8| {
        KeyMaterial::new(
            AeadAlgorithm::AES_128_GCM,
            RecordProtocol::TLS13,
            KeyDirection::SEAL,
            &[key; 16],
            [3; 12],
            0,
        )
        .unwrap()
    };
    let seal = |pair: &mut tlsaccel_driver::QueuePair,
                slot: &tlsaccel_driver::KeySlot,
                src: &tlsaccel_driver::DmaBuffer,
                dst: &tlsaccel_driver::DmaBuffer,
                timeout: Duration| {
        let mut result = None;
        pair.run(
            &[Job {
                user_data: 7,
                op: JobOp::Tls13Seal {
                    slot: slot.slot_ref(),
                    content_type: 23,
                    padding: 0,
                    src: src.whole(),
                    dst: dst.whole(),
                },
            }],
            timeout,
            |done| result = Some(done.result),
        )
        .unwrap();
        result.unwrap()
    };
    let plain = device.pool().alloc(LEN).unwrap();
    plain.write(0, &[0x42; LEN]).unwrap();
    let record_len = LEN + 5 + 1 + 16;

    let mut stalled = device.queue(QueueConfig::default()).unwrap();
    let slot = device.load_key(&tls13(1)).unwrap();
    let slot_index = slot.index();
    let dst = device.pool().alloc(record_len).unwrap();
    let dst_iova = dst.iova();
    faults.inject(ModelFault::Stall).unwrap();
    let result = seal(
        &mut stalled,
        &slot,
        &plain,
        &dst,
        Duration::from_millis(200),
    );
    assert_eq!(result, Err(JobError::TimedOut));
    assert_eq!(faults.held_jobs(), 1, "the engine holds the accepted job");
    drop(dst);
    assert!(
        !stalled.release_held(),
        "released while the engine holds the job"
    );

    // Everyone else's memory meanwhile, marked.
    let others: Vec<_> = (0..128)
        .map(|_| {
            let b = device.pool().alloc(record_len).unwrap();
            b.write(0, &[0x77; 64]).unwrap();
            b
        })
        .collect();
    assert!(others.iter().all(|b| b.iova() != dst_iova));

    // The device lets go: the held job is dropped (its queue was disabled), nothing written.
    faults.inject(ModelFault::Resume).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !stalled.release_held() {
        assert!(
            std::time::Instant::now() < deadline,
            "the device never let go"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    for b in &others {
        assert_eq!(
            b.to_vec(0, 64).unwrap(),
            vec![0x77; 64],
            "a late write landed"
        );
        assert_eq!(
            b.to_vec(64, record_len - 64).unwrap(),
            vec![0; record_len - 64],
            "a late write landed"
        );
    }
    drop(stalled);

    // The slot goes to a new key; its first record is numbered 0, exactly like a fresh slot's.
    drop(slot);
    let mut pair = device.queue(QueueConfig::default()).unwrap();
    let mut reused = None;
    let mut spare = Vec::new();
    while reused.is_none() {
        let s = device.load_key(&tls13(2)).unwrap();
        if s.index() == slot_index {
            reused = Some(s);
        } else {
            spare.push(s);
        }
    }
    let reused = reused.unwrap();
    let fresh = match spare.pop() {
        Some(slot) => slot,
        None => device.load_key(&tls13(2)).unwrap(),
    };
    let (a, b) = (
        device.pool().alloc(record_len).unwrap(),
        device.pool().alloc(record_len).unwrap(),
    );
    seal(&mut pair, &reused, &plain, &a, Duration::from_secs(5)).unwrap();
    seal(&mut pair, &fresh, &plain, &b, Duration::from_secs(5)).unwrap();
    assert_eq!(
        a.to_vec(0, record_len).unwrap(),
        b.to_vec(0, record_len).unwrap(),
        "the reused slot's first record is not sequence 0: a stale job ran under its key"
    );
}
