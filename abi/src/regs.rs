//! BAR0 register map.
//!
//! BAR0 has three areas:
//!
//! * the **global page** at 0x0000: identity, capabilities, sizes, device control and status,
//!   heartbeat, 64-bit counters from 0x100, and (reference model only) the fault-injection
//!   window at [`model_faults::BASE`];
//! * **queue configuration** blocks of [`QUEUE_REGS_STRIDE`] bytes from [`QUEUE_REGS_BASE`]:
//!   ring addresses, size, control, status, interrupt coalescing;
//! * **doorbell pages**, one 4 KiB page per queue from [`DOORBELL_BASE`], so that a queue can
//!   be handed to one thread or process by mapping just its page.
//!
//! 32-bit registers are read and written with 32-bit accesses; 64-bit registers (ring bases and
//! counters) with one 64-bit access, or low half then high half.

/// `MAGIC` (RO, u32): [`crate::DEVICE_MAGIC`].
pub const MAGIC: u64 = 0x000;
/// `VERSION` (RO, u32): major in bits 31:16, minor in bits 15:0.
pub const VERSION: u64 = 0x004;
/// `CAPABILITIES` (RO, u32): [`crate::Capabilities`].
pub const CAPABILITIES: u64 = 0x008;
/// `NUM_QUEUES` (RO, u32): queue pairs this device has.
pub const NUM_QUEUES: u64 = 0x00c;
/// `MAX_QUEUE_ENTRIES` (RO, u32): the largest ring size accepted.
pub const MAX_QUEUE_ENTRIES: u64 = 0x010;
/// `NUM_KEY_SLOTS` (RO, u32): entries in the key table.
pub const NUM_KEY_SLOTS: u64 = 0x014;
/// `MAX_DATA_LEN` (RO, u32): the largest `src_len` or `dst_len` of one job.
pub const MAX_DATA_LEN: u64 = 0x018;
/// `DOORBELL_STRIDE` (RO, u32): bytes between two queues' doorbell pages.
pub const DOORBELL_STRIDE_REG: u64 = 0x01c;
/// `DEVICE_CONTROL` (RW, u32): [`crate::DeviceControl`].
pub const DEVICE_CONTROL: u64 = 0x020;
/// `DEVICE_STATUS` (RO, u32): [`crate::DeviceStatus`].
pub const DEVICE_STATUS: u64 = 0x024;
/// `FATAL_CODE` (RO, u32): [`crate::FatalCode`], valid while `DEVICE_STATUS.FATAL` is set.
pub const FATAL_CODE: u64 = 0x028;
/// `HEARTBEAT` (RO, u32): increments at least every 10 ms while the device is alive.
pub const HEARTBEAT: u64 = 0x02c;

/// The values an identity register may hold: `min..=max`, and a power of two when
/// `power_of_two` is set. The driver sizes its own state (queue and key-slot tables) from
/// these registers, so it refuses a device that reports a value outside its bound rather than
/// trusting or clamping it (device-spec §2.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RegisterBound {
    /// The register's offset.
    pub offset: u64,
    /// The register's name, as the specification spells it.
    pub name: &'static str,
    /// Smallest value allowed.
    pub min: u32,
    /// Largest value allowed.
    pub max: u32,
    /// The value must also be a power of two.
    pub power_of_two: bool,
}

impl RegisterBound {
    /// True when `value` is allowed.
    pub const fn admits(&self, value: u32) -> bool {
        value >= self.min && value <= self.max && (!self.power_of_two || value.is_power_of_two())
    }
}

impl core::fmt::Display for RegisterBound {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if self.power_of_two {
            write!(f, "a power of two in {}..={}", self.min, self.max)
        } else {
            write!(f, "{}..={}", self.min, self.max)
        }
    }
}

/// `NUM_QUEUES`: 1 to [`MAX_QUEUES`].
pub const NUM_QUEUES_BOUND: RegisterBound = RegisterBound {
    offset: NUM_QUEUES,
    name: "NUM_QUEUES",
    min: 1,
    max: MAX_QUEUES,
    power_of_two: false,
};
/// `MAX_QUEUE_ENTRIES`: a ring size, so a power of two from [`crate::MIN_QUEUE_ENTRIES`] to
/// [`crate::MAX_QUEUE_ENTRIES`].
pub const MAX_QUEUE_ENTRIES_BOUND: RegisterBound = RegisterBound {
    offset: MAX_QUEUE_ENTRIES,
    name: "MAX_QUEUE_ENTRIES",
    min: crate::MIN_QUEUE_ENTRIES,
    max: crate::MAX_QUEUE_ENTRIES,
    power_of_two: true,
};
/// `NUM_KEY_SLOTS`: 1 to [`crate::MAX_KEY_SLOTS`].
pub const NUM_KEY_SLOTS_BOUND: RegisterBound = RegisterBound {
    offset: NUM_KEY_SLOTS,
    name: "NUM_KEY_SLOTS",
    min: 1,
    max: crate::MAX_KEY_SLOTS,
    power_of_two: false,
};
/// `MAX_DATA_LEN`: [`crate::MIN_MAX_DATA_LEN`] (one whole TLS record) to
/// [`crate::MAX_DATA_LEN`].
pub const MAX_DATA_LEN_BOUND: RegisterBound = RegisterBound {
    offset: MAX_DATA_LEN,
    name: "MAX_DATA_LEN",
    min: crate::MIN_MAX_DATA_LEN,
    max: crate::MAX_DATA_LEN,
    power_of_two: false,
};

/// First 64-bit counter register; counters follow each other 8 bytes apart.
pub const COUNTERS_BASE: u64 = 0x100;

/// Device counters (RO, u64 each), at `COUNTERS_BASE + 8 * index`. Reset clears them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Counter {
    /// Jobs completed with `OK`.
    JobsOk = 0,
    /// Jobs completed with any other status.
    JobsFailed = 1,
    /// Payload bytes read by record and AEAD jobs.
    BytesIn = 2,
    /// Payload bytes written by record and AEAD jobs.
    BytesOut = 3,
    /// Open jobs that failed authentication.
    AuthFailures = 4,
    /// Jobs that failed with `DMA_FAULT`, and ring accesses that faulted.
    DmaFaults = 5,
    /// Descriptors rejected before execution (bad opcode, slot, lengths, reserved fields).
    Rejected = 6,
    /// Interrupt messages sent.
    Interrupts = 7,
    /// Key slots currently loaded (a gauge, not a running count).
    KeySlotsLoaded = 8,
    /// TLS records sealed.
    RecordsSealed = 9,
    /// TLS records opened.
    RecordsOpened = 10,
    /// Descriptors fetched from submission rings.
    DescriptorsFetched = 11,
    /// Signatures made (ECDSA and RSA).
    Signatures = 12,
    /// Key-exchange operations (generations and derivations).
    KeyExchanges = 13,
}

impl Counter {
    /// Every counter, in register order.
    pub const ALL: [Counter; 14] = [
        Counter::JobsOk,
        Counter::JobsFailed,
        Counter::BytesIn,
        Counter::BytesOut,
        Counter::AuthFailures,
        Counter::DmaFaults,
        Counter::Rejected,
        Counter::Interrupts,
        Counter::KeySlotsLoaded,
        Counter::RecordsSealed,
        Counter::RecordsOpened,
        Counter::DescriptorsFetched,
        Counter::Signatures,
        Counter::KeyExchanges,
    ];

    /// The counter's register offset.
    pub const fn offset(self) -> u64 {
        COUNTERS_BASE + 8 * self as u64
    }

    /// The counter's name in metrics and tool output.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::JobsOk => "jobs_ok",
            Counter::JobsFailed => "jobs_failed",
            Counter::BytesIn => "bytes_in",
            Counter::BytesOut => "bytes_out",
            Counter::AuthFailures => "auth_failures",
            Counter::DmaFaults => "dma_faults",
            Counter::Rejected => "rejected",
            Counter::Interrupts => "interrupts",
            Counter::KeySlotsLoaded => "key_slots_loaded",
            Counter::RecordsSealed => "records_sealed",
            Counter::RecordsOpened => "records_opened",
            Counter::DescriptorsFetched => "descriptors_fetched",
            Counter::Signatures => "signatures",
            Counter::KeyExchanges => "key_exchanges",
        }
    }
}

/// One past the last counter register.
pub const COUNTERS_END: u64 = COUNTERS_BASE + 8 * Counter::ALL.len() as u64;

/// The reference model's fault-injection window (device-spec §9), at the top of the global
/// page. Present only when `CAPABILITIES` has [`crate::Capabilities::MODEL_FAULTS`]; a device
/// without it reads 0 there and ignores writes, as for any unknown offset.
pub mod model_faults {
    /// First register of the window.
    pub const BASE: u64 = 0xf00;
    /// `FAULT_INJECT` (WO, u32): a [`crate::FaultCode`]. The device shows the fault at once,
    /// taking a bogus completion's fields from the argument registers below. Unknown codes
    /// are ignored.
    pub const INJECT: u64 = 0xf00;
    /// `FAULT_QUEUE` (RW, u32): the queue of a bogus completion.
    pub const QUEUE: u64 = 0xf04;
    /// `FAULT_COOKIE` (RW, u64): the cookie of a bogus completion.
    pub const COOKIE: u64 = 0xf08;
    /// `FAULT_RESULT_LEN` (RW, u32): the `result_len` of a bogus completion.
    pub const RESULT_LEN: u64 = 0xf10;
    /// `FAULT_HELD_JOBS` (RO, u32): jobs the engines hold under a stall — fetched and
    /// accepted, not yet run.
    pub const HELD_JOBS: u64 = 0xf14;
    /// One past the last register of the window.
    pub const END: u64 = 0xf18;
}

/// Start of the queue configuration blocks.
pub const QUEUE_REGS_BASE: u64 = 0x1000;
/// Bytes between two queues' configuration blocks.
pub const QUEUE_REGS_STRIDE: u64 = 0x80;
/// Most queue pairs a device may have (the configuration area ends below `DOORBELL_BASE`).
pub const MAX_QUEUES: u32 = 64;

/// Offsets inside one queue configuration block.
pub mod queue {
    /// `Q_SQ_BASE` (RW, u64): IOVA of the submission ring, [`crate::RING_ALIGN`]-aligned.
    pub const SQ_BASE: u64 = 0x00;
    /// `Q_CQ_BASE` (RW, u64): IOVA of the completion ring, [`crate::RING_ALIGN`]-aligned.
    pub const CQ_BASE: u64 = 0x08;
    /// `Q_SIZE` (RW, u32): entries in each ring, a power of two.
    pub const SIZE: u64 = 0x10;
    /// `Q_CONTROL` (RW, u32): [`crate::QueueControl`].
    pub const CONTROL: u64 = 0x14;
    /// `Q_STATUS` (RO, u32): [`crate::QueueStatus`].
    pub const STATUS: u64 = 0x18;
    /// `Q_ERROR` (RO, u32): [`crate::QueueErrorCode`].
    pub const ERROR: u64 = 0x1c;
    /// `Q_IRQ_COALESCE_COUNT` (RW, u32): completions that trigger an interrupt at once
    /// (0 and 1 both mean every posting).
    pub const IRQ_COALESCE_COUNT: u64 = 0x20;
    /// `Q_IRQ_COALESCE_USECS` (RW, u32): the longest a posted completion waits for its
    /// interrupt (0: no waiting).
    pub const IRQ_COALESCE_USECS: u64 = 0x24;
    /// `Q_SQ_HEAD` (RO, u32): the device's fetch position. Diagnostic only.
    pub const SQ_HEAD: u64 = 0x28;
    /// `Q_CQ_TAIL` (RO, u32): the device's completion write position. Diagnostic only.
    pub const CQ_TAIL: u64 = 0x2c;
}

/// Start of the doorbell pages.
pub const DOORBELL_BASE: u64 = 0x10000;
/// Bytes between two queues' doorbell pages.
pub const DOORBELL_STRIDE: u64 = 0x1000;
/// Offset in a doorbell page of the submission tail doorbell (WO, u32).
pub const DB_SQ_TAIL: u64 = 0x0;
/// Offset in a doorbell page of the completion head doorbell (WO, u32).
pub const DB_CQ_HEAD: u64 = 0x4;

/// Offset of a register in queue `queue`'s configuration block.
pub const fn queue_reg(queue: u32, reg: u64) -> u64 {
    QUEUE_REGS_BASE + queue as u64 * QUEUE_REGS_STRIDE + reg
}

/// Offset of a doorbell in queue `queue`'s doorbell page.
pub const fn doorbell(queue: u32, which: u64) -> u64 {
    DOORBELL_BASE + queue as u64 * DOORBELL_STRIDE + which
}

/// BAR0 size of a device with `num_queues` queue pairs, rounded up to a power of two.
pub const fn bar0_size(num_queues: u32) -> u64 {
    (DOORBELL_BASE + num_queues as u64 * DOORBELL_STRIDE).next_power_of_two()
}

// The three areas of BAR0 never overlap.
const _: () = assert!(queue_reg(MAX_QUEUES - 1, 0) + QUEUE_REGS_STRIDE <= DOORBELL_BASE);
const _: () = assert!(Counter::ALL[Counter::ALL.len() - 1].offset() + 8 <= QUEUE_REGS_BASE);
const _: () = assert!(queue::CQ_TAIL + 4 <= QUEUE_REGS_STRIDE);
const _: () = assert!(COUNTERS_END <= model_faults::BASE);
const _: () = assert!(model_faults::END <= QUEUE_REGS_BASE);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_listed_in_register_order() {
        for (index, counter) in Counter::ALL.iter().enumerate() {
            assert_eq!(*counter as usize, index);
        }
    }

    #[test]
    fn identity_bounds_admit_their_ends_and_nothing_outside() {
        for bound in [
            NUM_QUEUES_BOUND,
            MAX_QUEUE_ENTRIES_BOUND,
            NUM_KEY_SLOTS_BOUND,
            MAX_DATA_LEN_BOUND,
        ] {
            assert!(
                bound.min >= 1,
                "{}: zero is never a usable value",
                bound.name
            );
            assert!(
                bound.admits(bound.min) && bound.admits(bound.max),
                "{}",
                bound.name
            );
            assert!(
                !bound.admits(0) && !bound.admits(bound.min - 1),
                "{}",
                bound.name
            );
            assert!(
                !bound.admits(bound.max + 1) && !bound.admits(u32::MAX),
                "{}",
                bound.name
            );
        }
        assert!(!MAX_QUEUE_ENTRIES_BOUND.admits(3000));
        assert!(NUM_QUEUES_BOUND.admits(3));
        assert_eq!(NUM_KEY_SLOTS_BOUND.max, 65_536);
        assert_eq!(MAX_DATA_LEN_BOUND.min, 5 + 16384 + 256);
    }

    #[test]
    fn doorbells_sit_on_their_own_pages() {
        assert_eq!(doorbell(0, DB_SQ_TAIL), 0x10000);
        assert_eq!(doorbell(3, DB_CQ_HEAD), 0x13004);
        assert_eq!(bar0_size(8), 0x20000);
        assert_eq!(bar0_size(64), 0x80000);
    }
}
