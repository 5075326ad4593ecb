//! How the driver reaches a device: BAR0 access, DMA mapping, interrupts, reset.
//!
//! Backends: kernel VFIO ([`crate::vfio`]), vfio-user ([`crate::vfio_user`]) and, with the
//! `sim` feature, the simulator linked in (`in_process`); a driver built for a card carries no
//! model. A device address string selects one: `sim`, `sim:queues=4,engines=1`.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::str::FromStr;
use std::sync::Arc;

use crate::dma::DmaMapper;

/// Errors of a transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("device address {0:?} is not understood (expected `sim`, `sim:key=value,...`, `vfio:0000:03:00.0` or `vfio-user:/path/to.sock`)")]
    BadAddress(String),
    #[cfg(feature = "sim")]
    #[error("could not start the simulated device")]
    Simulator(#[source] tlsaccel_sim::ConfigError),
    #[error(
        "this driver was built without the simulator (the `sim` feature): {0:?} cannot be opened"
    )]
    NoSimulator(String),
    #[error("could not create an interrupt eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("interrupt vector {0} does not exist")]
    NoSuchVector(u32),
    #[error("kernel VFIO")]
    Vfio(#[source] Box<crate::vfio::VfioError>),
    #[error("device {0} stopped answering and is considered lost")]
    Lost(String),
    #[error("vfio-user protocol")]
    VfioUser(#[source] Box<vfio_user::Error>),
    #[error("{0}")]
    NotOurs(String),
    #[error("cannot map the device's doorbell pages")]
    DoorbellMap(#[source] std::io::Error),
    #[error("the doorbell memory the vfio-user server sent is unsafe to map")]
    DoorbellMemory(#[source] crate::dma::ShmError),
}

/// A way to reach one device.
pub trait Transport: DmaMapper {
    /// A short name of the device, e.g. `sim` or `vfio:0000:03:00.0`.
    fn name(&self) -> String;
    /// Reads a 32-bit BAR0 register.
    fn read32(&self, offset: u64) -> u32;
    /// Writes a 32-bit BAR0 register.
    fn write32(&self, offset: u64, value: u32);
    /// Reads a 64-bit BAR0 register.
    fn read64(&self, offset: u64) -> u64;
    /// Writes a 64-bit BAR0 register.
    fn write64(&self, offset: u64, value: u64);
    /// The eventfd that interrupt vector `vector` (queue `vector`'s) signals. The transport
    /// owns the eventfds: kernel VFIO must enable every MSI-X vector in one call.
    fn interrupt(&self, vector: u32) -> Result<Arc<EventFd>, TransportError>;
    /// Where DMA memory comes from when it is not host memory mapped through
    /// [`DmaMapper`] (for example a window of a device BAR). `None`: memfd regions mapped
    /// with this transport's `DmaMapper`.
    fn region_source(&self) -> Option<Arc<dyn crate::dma::RegionSource>> {
        None
    }
    /// Resets the whole function (a PCI function-level reset or its equivalent) and returns
    /// when it is done. All device state is lost; the driver starts the device afresh after.
    fn reset(&self) -> Result<(), TransportError>;
    /// True once the transport knows the device is gone (its process died, it stopped
    /// answering). Every later register read returns all-ones.
    fn is_lost(&self) -> bool {
        false
    }
    /// The test bench's fault injection, for a device that has no fault-injection window of
    /// its own (the RTL under Verilator). `None` (the default) for hardware, and for the
    /// simulator, whose faults go through its registers. [`ModelFaults`] uses it when the
    /// device lacks `CAPABILITIES.MODEL_FAULTS`.
    ///
    /// [`ModelFaults`]: crate::ModelFaults
    fn testbench_faults(&self) -> Option<&dyn crate::model_faults::TestbenchFaults> {
        None
    }
    /// The simulator behind this transport, when it is in-process (for `tlsaccel devices`
    /// and tests that look at the model itself; fault injection goes through registers,
    /// `ModelFaults`, on every transport). Only with the `sim` feature.
    #[cfg(feature = "sim")]
    fn simulator(&self) -> Option<&tlsaccel_sim::Device> {
        None
    }
}

/// An eventfd: the interrupt the device signals and the driver waits on.
#[derive(Debug)]
pub struct EventFd {
    inner: vmm_sys_util::eventfd::EventFd,
}

impl EventFd {
    /// A non-blocking eventfd with counter 0.
    pub fn new() -> Result<Self, TransportError> {
        let inner = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)
            .map_err(TransportError::EventFd)?;
        Ok(Self { inner })
    }

    /// Adds one to the counter (what an interrupt does).
    pub fn signal(&self) {
        // A full counter (2^64 - 2) cannot happen with one add per interrupt; a failed write
        // means the reader is behind, which it notices anyway.
        let _ = self.inner.write(1);
    }

    /// Reads and clears the counter; returns how many signals arrived (0 if none).
    pub fn drain(&self) -> u64 {
        self.inner.read().unwrap_or(0)
    }

    /// The eventfd as the VFIO crates want it.
    pub fn as_vmm(&self) -> &vmm_sys_util::eventfd::EventFd {
        &self.inner
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the descriptor is owned by `self.inner` and stays open for as long as
        // `self`, and so the returned borrow, lives.
        unsafe { BorrowedFd::borrow_raw(self.as_raw_fd()) }
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.inner.as_raw_fd()
    }
}

/// A parsed device address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceAddress {
    /// `sim` or `sim:queues=N,engines=N,key-slots=N`: an in-process simulator.
    Simulator(SimOptions),
    /// `vfio:0000:03:00.0`: a PCI function bound to vfio-pci (a tlsaccel card, or the
    /// simulator behind QEMU's ivshmem device).
    Vfio(String),
    /// `vfio-user:/run/tlsaccel/sim.sock`: a device served over vfio-user by another process.
    VfioUser(std::path::PathBuf),
}

/// Options of an in-process simulator address.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SimOptions {
    pub queues: Option<u32>,
    pub engines: Option<usize>,
    pub pke_engines: Option<usize>,
    pub key_slots: Option<u32>,
}

impl FromStr for DeviceAddress {
    type Err = TransportError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || TransportError::BadAddress(s.to_owned());
        let (kind, rest) = s.split_once(':').unwrap_or((s, ""));
        match kind {
            "sim" => {
                let mut options = SimOptions::default();
                for pair in rest.split(',').filter(|p| !p.is_empty()) {
                    let (key, value) = pair.split_once('=').ok_or_else(bad)?;
                    match key {
                        "queues" => options.queues = Some(value.parse().map_err(|_| bad())?),
                        "engines" => options.engines = Some(value.parse().map_err(|_| bad())?),
                        "pke-engines" => {
                            options.pke_engines = Some(value.parse().map_err(|_| bad())?)
                        }
                        "key-slots" => options.key_slots = Some(value.parse().map_err(|_| bad())?),
                        _ => return Err(bad()),
                    }
                }
                Ok(DeviceAddress::Simulator(options))
            }
            "vfio" if crate::vfio::valid_pci_address(rest) => Ok(DeviceAddress::Vfio(rest.into())),
            "vfio-user" if !rest.is_empty() => Ok(DeviceAddress::VfioUser(rest.into())),
            _ => Err(bad()),
        }
    }
}

impl DeviceAddress {
    /// Connects to the device at this address.
    pub fn connect(&self) -> Result<Arc<dyn Transport>, TransportError> {
        match self {
            #[cfg(feature = "sim")]
            DeviceAddress::Simulator(options) => Ok(Arc::new(crate::in_process::InProcess::new(
                options.config(),
            )?)),
            #[cfg(not(feature = "sim"))]
            DeviceAddress::Simulator(_) => Err(TransportError::NoSimulator(format!("{self:?}"))),
            DeviceAddress::Vfio(address) => crate::vfio::open(address),
            DeviceAddress::VfioUser(path) => Ok(Arc::new(
                crate::vfio_user::VfioUserTransport::connect(path)?,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_or_say_why_not() {
        assert_eq!(
            "sim".parse::<DeviceAddress>().unwrap(),
            DeviceAddress::Simulator(SimOptions::default())
        );
        assert_eq!(
            "sim:queues=4,engines=1".parse::<DeviceAddress>().unwrap(),
            DeviceAddress::Simulator(SimOptions {
                queues: Some(4),
                engines: Some(1),
                pke_engines: None,
                key_slots: None
            })
        );
        let error = "sim:queues=lots".parse::<DeviceAddress>().unwrap_err();
        assert!(error.to_string().contains("sim:queues=lots"));
        assert!("pci:1".parse::<DeviceAddress>().is_err());
        assert_eq!(
            "vfio:0000:03:00.0".parse::<DeviceAddress>().unwrap(),
            DeviceAddress::Vfio("0000:03:00.0".into())
        );
        assert!("vfio:03:00.0".parse::<DeviceAddress>().is_err());
        assert_eq!(
            "vfio-user:/run/sim.sock".parse::<DeviceAddress>().unwrap(),
            DeviceAddress::VfioUser("/run/sim.sock".into())
        );
        assert!("vfio-user:".parse::<DeviceAddress>().is_err());
    }

    #[test]
    fn eventfd_counts_signals() {
        let fd = EventFd::new().unwrap();
        assert_eq!(fd.drain(), 0);
        fd.signal();
        fd.signal();
        assert_eq!(fd.drain(), 2);
        assert_eq!(fd.drain(), 0);
    }
}
