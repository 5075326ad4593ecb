//! A faithful software model of the tlsaccel device.
//!
//! The model does what the hardware does and nothing more: it reads descriptors from host
//! memory through an IOMMU-like table, validates everything it reads (the host is untrusted
//! from the device's side), runs AEAD and TLS record jobs on engine threads, writes
//! completions with phase tags, raises interrupts with count/time coalescing, keeps counters,
//! and can be told to misbehave ([`Fault`]) so the host side's error handling can be tested.
//!
//! It is independent of how it is reached: the in-process transport calls the `bar_*`
//! methods directly; other transports forward MMIO to them. See `docs/device-spec.md`.

#![forbid(unsafe_code)]

mod device;
mod engine;
mod keys;
pub mod memory;
mod pke;
mod queue;

pub use device::{ConfigError, Device, DeviceConfig, Fault, InterruptSink};
pub use memory::{DmaFault, HeapMemory, HostMemory, HostMemoryError, Iommu, IommuError};
