//! Userspace driver for the tlsaccel crypto accelerator.
//!
//! * [`Transport`] reaches a device: BAR0 access, DMA mapping, interrupts. Backends: kernel
//!   VFIO ([`vfio`]: a tlsaccel card, or the simulator behind QEMU's ivshmem device),
//!   vfio-user ([`vfio_user`]: the simulator in another process) and, with the `sim` feature,
//!   the simulator linked in (`in_process`). A device address string picks one
//!   ([`DeviceAddress`]). Without the feature the driver carries no model.
//! * [`DmaPool`] hands out [`DmaBuffer`]s in memory the device can reach, named by [`Iova`].
//! * [`Device`] checks the device's identity, resets and enables it, and owns the admin queue
//!   that loads and destroys [`KeySlot`]s.
//! * [`QueuePair`] is the synchronous ring API: fill descriptors, ring the doorbell once per
//!   burst, find completions by phase tag in memory. [`AsyncQueue`] puts it behind tokio.
//! * [`ModelFaults`] tells the reference model to misbehave, for tests of the host side,
//!   through its BAR0 fault-injection window (any transport), or a test bench's
//!   [`TestbenchFaults`] (the RTL's); refused on hardware.
//!
//! Its `unsafe` is in [`dma`] (socket I/O straight into DMA buffers), [`mmio`], [`vfio`] and
//! the eventfd/`AsyncFd` glue; the shared mappings themselves are `tlsaccel-shm`'s, re-exported
//! as [`dma::DmaRegion`]. Elsewhere in the workspace only `tlsaccel-shm` and the RTL model's
//! FFI have `unsafe`.

mod asynchronous;
mod device;
pub mod dma;
mod events;
#[cfg(feature = "sim")]
pub mod in_process;
pub mod mmio;
mod model_faults;
mod queue;
pub mod transport;
pub mod vfio;
pub mod vfio_user;

pub use asynchronous::{AsyncQueue, AsyncQueueError, Submitted};
pub use device::{Device, DeviceError, DeviceInfo, DeviceOptions, KeyMaterial, KeySlot, SlotRef};
pub use dma::{DmaBuffer, DmaError, DmaPool, DmaSpan, Iova};
pub use events::DeviceEvents;
pub use model_faults::{ModelFaults, ModelFaultsError, TestbenchFaults};
pub use queue::{
    Job, JobCompletion, JobError, JobOp, JobOutput, QueueConfig, QueueError, QueuePair, QueueStats,
};
pub use tlsaccel_abi as abi;
pub use transport::{DeviceAddress, EventFd, Transport, TransportError};
