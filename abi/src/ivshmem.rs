//! Shared-memory mode: the device reached through QEMU's `ivshmem-doorbell` PCI device.
//!
//! There the device's registers are not in a BAR of their own. The ivshmem device offers
//! BAR0 (four small registers, among them a doorbell that signals another peer), BAR1
//! (MSI-X) and BAR2 (memory shared with the simulator process). The simulator lays BAR2 out
//! as follows, like an NVMe controller memory buffer:
//!
//! * `0x0000`: a header (magic, version, the device's ivshmem peer id, vectors, where the
//!   data area starts and which IOVA it has);
//! * `0x0040`: the register mailbox: the host writes a request (op, offset, value), then
//!   its sequence number, then rings [`MAILBOX_VECTOR`] of the device peer; the device performs
//!   the BAR0 access of the ordinary register map and writes the result, then the sequence
//!   number into the response;
//! * from [`DATA_OFFSET`]: rings and buffers. The device sees shared-memory offset `o` at IOVA
//!   `iova_base + o`, but only inside windows the host has mapped through the mailbox
//!   ([`OP_MAP`], [`OP_UNMAP`]): the mailbox is this mode's IOMMU, so a window the host
//!   unmaps faults the device's next access to it, as it would behind a real IOMMU.
//!
//! Interrupt vector *q* of the ivshmem device is queue *q*'s completion interrupt.

/// `"TLSI"` as a little-endian `u32`: the header's magic.
pub const MAGIC: u32 = u32::from_le_bytes(*b"TLSI");
/// Version of this layout.
pub const VERSION: u32 = 2;

/// Header: magic (u32).
pub const HDR_MAGIC: usize = 0x00;
/// Header: layout version (u32).
pub const HDR_VERSION: usize = 0x04;
/// Header: the device's ivshmem peer id (u32); the host rings this peer.
pub const HDR_DEVICE_PEER: usize = 0x08;
/// Header: interrupt vectors (u32).
pub const HDR_VECTORS: usize = 0x0c;
/// Header: IOVA of shared-memory offset 0 (u64).
pub const HDR_IOVA_BASE: usize = 0x10;
/// Header: first byte of the data area (u64).
pub const HDR_DATA_OFFSET: usize = 0x18;
/// Header: bytes in the data area (u64).
pub const HDR_DATA_SIZE: usize = 0x20;

/// Mailbox request: sequence number (u32), written last by the host.
pub const MBOX_REQUEST_SEQ: usize = 0x40;
/// Mailbox request: operation (u32), one of the `OP_*` values.
pub const MBOX_OP: usize = 0x44;
/// Mailbox request: register offset (u64).
pub const MBOX_OFFSET: usize = 0x48;
/// Mailbox request: value to write (u64).
pub const MBOX_VALUE: usize = 0x50;
/// Mailbox response: sequence number of the request it answers (u32), written last.
pub const MBOX_RESPONSE_SEQ: usize = 0x80;
/// Mailbox response: value read (u64).
pub const MBOX_RESULT: usize = 0x88;

/// Read a 32-bit register.
pub const OP_READ32: u32 = 1;
/// Write a 32-bit register.
pub const OP_WRITE32: u32 = 2;
/// Read a 64-bit register.
pub const OP_READ64: u32 = 3;
/// Write a 64-bit register.
pub const OP_WRITE64: u32 = 4;
/// Let the device reach a window of the data area: offset = its IOVA, value = its length.
/// The result is 0, or all-ones when refused (outside the data area, empty, or overlapping a
/// window already mapped).
pub const OP_MAP: u32 = 5;
/// Take a window back: offset = its IOVA, value = its length, exactly as mapped. The device
/// answers once the accesses to it that were under way are done; later ones are DMA faults.
/// The result is 0, or all-ones when no such window is mapped.
pub const OP_UNMAP: u32 = 6;
/// The result of a mailbox request the device refused.
pub const REFUSED: u64 = u64::MAX;

/// The device-peer vector the host rings after posting a mailbox request.
pub const MAILBOX_VECTOR: u16 = 0;
/// Where rings and buffers start in shared memory.
pub const DATA_OFFSET: u64 = 0x10000;
/// IOVA the device gives shared-memory offset 0.
pub const IOVA_BASE: u64 = 0x1_0000_0000;

/// PCI vendor id of QEMU's ivshmem device.
pub const IVSHMEM_VENDOR_ID: u16 = 0x1af4;
/// PCI device id of QEMU's ivshmem device.
pub const IVSHMEM_DEVICE_ID: u16 = 0x1110;
/// ivshmem BAR0: interrupt mask register.
pub const IVSHMEM_INTR_MASK: u64 = 0x0;
/// ivshmem BAR0: this peer's id (read-only).
pub const IVSHMEM_IV_POSITION: u64 = 0x8;
/// ivshmem BAR0: doorbell; write `peer << 16 | vector` to signal a peer's vector.
pub const IVSHMEM_DOORBELL: u64 = 0xc;
