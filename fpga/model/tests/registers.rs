//! The RTL register block, through the driver's own probe and register accesses: identity,
//! reset and enable, heartbeat, counters, queue configuration checks and doorbells — each
//! compared with what the simulator answers where the two should agree; and the model-only
//! fault-injection window absent.

use std::sync::Arc;

use tlsaccel_driver::abi::regs::{self, queue, Counter};
use tlsaccel_driver::abi::{
    Capabilities, DeviceControl, DeviceStatus, QueueControl, QueueErrorCode, QueueStatus,
    DEVICE_MAGIC, DEVICE_VERSION,
};
use tlsaccel_driver::{DeviceInfo, Transport};
use tlsaccel_rtl::{RtlDevice, RtlTransport};

fn rtl() -> RtlTransport {
    RtlTransport::new().expect("the RTL model is built (verilator installed)")
}

fn simulator() -> Arc<dyn Transport> {
    "sim"
        .parse::<tlsaccel_driver::DeviceAddress>()
        .expect("address")
        .connect()
        .expect("simulator")
}

#[test]
fn the_driver_probes_the_rtl_as_a_tlsaccel_device() {
    let t = rtl();
    let info = DeviceInfo::probe(&t).expect("probe");
    assert_eq!(info.version, (1, 0));
    assert_eq!(info.queues, 8);
    assert_eq!(info.key_slots, 1024);
    assert_eq!(
        info.max_queue_entries,
        tlsaccel_driver::abi::MAX_QUEUE_ENTRIES
    );
    // What this build has, and only that: no ChaCha20-Poly1305, TLS 1.2 records or
    // public-key engines (simulator-only), so the driver refuses keys and jobs for them.
    assert_eq!(
        info.capabilities,
        Capabilities::NOP
            | Capabilities::AES_128_GCM
            | Capabilities::AES_256_GCM
            | Capabilities::RAW_AEAD
            | Capabilities::TLS13_RECORD
            | Capabilities::INTERRUPT_COALESCING
    );
    // Identity registers agree with the simulator's.
    let sim = simulator();
    for reg in [
        regs::MAGIC,
        regs::VERSION,
        regs::MAX_QUEUE_ENTRIES,
        regs::DOORBELL_STRIDE_REG,
    ] {
        assert_eq!(t.read32(reg), sim.read32(reg), "register {reg:#x}");
    }
    assert_eq!(t.read32(regs::MAGIC), DEVICE_MAGIC);
    assert_eq!(t.read32(regs::VERSION), DEVICE_VERSION);
}

#[test]
fn reset_then_enable_brings_the_device_to_running() {
    let t = rtl();
    let status = |t: &RtlTransport| DeviceStatus::from_bits_retain(t.read32(regs::DEVICE_STATUS));
    t.write32(regs::DEVICE_CONTROL, DeviceControl::RESET.bits());
    // READY comes back within a few cycles of the reset.
    let mut ready = false;
    for _ in 0..10 {
        if status(&t).contains(DeviceStatus::READY) {
            ready = true;
            break;
        }
    }
    assert!(ready);
    assert!(!status(&t).contains(DeviceStatus::RUNNING));
    t.write32(regs::DEVICE_CONTROL, DeviceControl::ENABLE.bits());
    assert!(status(&t).contains(DeviceStatus::READY | DeviceStatus::RUNNING));
    assert_eq!(t.read32(regs::DEVICE_CONTROL), DeviceControl::ENABLE.bits());
    // FATAL from the engines stops RUNNING and shows its code.
    t.model().set_fatal(true, 7);
    assert!(status(&t).contains(DeviceStatus::FATAL));
    assert!(!status(&t).contains(DeviceStatus::RUNNING));
    assert_eq!(t.read32(regs::FATAL_CODE), 7);
}

#[test]
fn the_heartbeat_moves_with_the_clock() {
    let t = rtl();
    let before = t.read32(regs::HEARTBEAT);
    t.model().tick(64 * 10);
    let after = t.read32(regs::HEARTBEAT);
    assert!(after >= before + 10, "{before} -> {after}");
    assert_eq!(t.read64(Counter::JobsOk.offset()), 0);
}

/// Configures queue `q` on `t` and enables it; returns Q_STATUS and Q_ERROR.
fn enable(t: &dyn Transport, q: u32, size: u32, sq: u64, cq: u64) -> (QueueStatus, QueueErrorCode) {
    t.write64(regs::queue_reg(q, queue::SQ_BASE), sq);
    t.write64(regs::queue_reg(q, queue::CQ_BASE), cq);
    t.write32(regs::queue_reg(q, queue::SIZE), size);
    t.write32(
        regs::queue_reg(q, queue::CONTROL),
        QueueControl::ENABLE.bits(),
    );
    (
        QueueStatus::from_bits_retain(t.read32(regs::queue_reg(q, queue::STATUS))),
        QueueErrorCode(t.read32(regs::queue_reg(q, queue::ERROR))),
    )
}

#[test]
fn bad_ring_configurations_are_refused_like_the_simulator_refuses_them() {
    let t = rtl();
    t.write32(regs::DEVICE_CONTROL, DeviceControl::ENABLE.bits());
    let sim = simulator();
    sim.write32(regs::DEVICE_CONTROL, DeviceControl::RESET.bits());
    while sim.read32(regs::DEVICE_STATUS) & DeviceStatus::READY.bits() == 0 {}
    sim.write32(regs::DEVICE_CONTROL, DeviceControl::ENABLE.bits());
    for (size, sq, cq, why) in [
        (3, 0x10000, 0x20000, "size not a power of two"),
        (1, 0x10000, 0x20000, "size below the minimum"),
        (8192, 0x10000, 0x20000, "size above the maximum"),
        (64, 0x10040, 0x20000, "misaligned submission ring"),
        (64, 0x10000, 0x20010, "misaligned completion ring"),
    ] {
        let got = enable(&t, 2, size, sq, cq);
        let expected = enable(sim.as_ref(), 2, size, sq, cq);
        assert_eq!(got.0, QueueStatus::ERROR, "{why}");
        assert_eq!(got.1, QueueErrorCode::BAD_CONFIG, "{why}");
        assert_eq!(got, expected, "{why}: RTL and simulator disagree");
    }
    // A good configuration is enabled and reads back.
    let (status, code) = enable(&t, 3, 256, 0x40000, 0x80000);
    assert_eq!(status, QueueStatus::ENABLED);
    assert_eq!(code, QueueErrorCode(0));
    assert_eq!(t.read64(regs::queue_reg(3, queue::SQ_BASE)), 0x40000);
    assert_eq!(t.read32(regs::queue_reg(3, queue::SIZE)), 256);
    // A tail doorbell outside the ring stops the queue with BAD_DOORBELL.
    t.write32(regs::doorbell(3, regs::DB_SQ_TAIL), 300);
    let stopped =
        (0..100).any(|_| t.read32(regs::queue_reg(3, queue::STATUS)) == QueueStatus::ERROR.bits());
    assert!(stopped, "the queue engine stops the queue");
    assert_eq!(
        QueueErrorCode(t.read32(regs::queue_reg(3, queue::ERROR))),
        QueueErrorCode::BAD_DOORBELL
    );
    // A reset forgets the configuration.
    t.write32(regs::DEVICE_CONTROL, DeviceControl::RESET.bits());
    assert_eq!(t.read32(regs::queue_reg(3, queue::SIZE)), 0);
    assert_eq!(t.read32(regs::queue_reg(3, queue::STATUS)), 0);
}

#[test]
fn unmapped_addresses_read_zero_and_the_bus_never_hangs() {
    let device = RtlDevice::new().expect("model");
    let start = device.cycles();
    // Among them the reference model's fault-injection window (CAPABILITIES.MODEL_FAULTS
    // is clear on the RTL): a fault code written there does nothing.
    for address in [
        0x30u32,
        0xfc,
        regs::model_faults::INJECT as u32,
        regs::model_faults::HELD_JOBS as u32,
        0x1000 + 8 * 0x80,
        0x10000 + 8 * 0x1000,
        0xfff_fffc,
    ] {
        assert_eq!(device.read(address), Ok(0), "{address:#x}");
        assert_eq!(device.write(address, 0xdead_beef), Ok(()), "{address:#x}");
    }
    // Each transaction completes in a handful of cycles (this model has no clock thread).
    let per = (device.cycles() - start) / 14;
    assert!(per <= 6, "{per} cycles per access");
    let fatal = tlsaccel_driver::abi::FaultCode::FATAL.0;
    assert_eq!(
        device.write(regs::model_faults::INJECT as u32, fatal),
        Ok(())
    );
    let status = device.read(regs::DEVICE_STATUS as u32).expect("status");
    assert_eq!(
        status & DeviceStatus::FATAL.bits(),
        0,
        "the RTL took a fault code"
    );
}
