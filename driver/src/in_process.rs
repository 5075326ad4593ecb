//! The simulator linked into this process (`sim` addresses), with the `sim` feature: a
//! [`Transport`] whose registers are the model's, whose DMA memory is the driver's own regions
//! seen through the model's IOMMU, and whose interrupts are eventfds the model signals. A
//! driver built without the feature carries no model at all.

use std::fmt;
use std::sync::Arc;

use tlsaccel_sim::{DeviceConfig, InterruptSink};

use crate::dma::{DmaError, DmaMapper, DmaRegion, Iova};
use crate::transport::{EventFd, SimOptions, Transport, TransportError};

impl InterruptSink for EventFd {
    fn signal(&self) {
        EventFd::signal(self);
    }
}

/// The simulator linked into this process.
pub struct InProcess {
    device: tlsaccel_sim::Device,
    vectors: std::sync::Mutex<Vec<Option<Arc<EventFd>>>>,
}

impl fmt::Debug for InProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InProcess")
            .field("config", self.device.config())
            .finish()
    }
}

impl InProcess {
    /// Starts a simulated device with `config`.
    pub fn new(config: DeviceConfig) -> Result<Self, TransportError> {
        let vectors = std::sync::Mutex::new(vec![None; config.queues as usize]);
        let device = tlsaccel_sim::Device::new(config).map_err(TransportError::Simulator)?;
        Ok(Self { device, vectors })
    }
}

impl DmaMapper for InProcess {
    fn map(&self, region: &Arc<DmaRegion>, iova: Iova) -> Result<(), DmaError> {
        let memory: Arc<dyn tlsaccel_sim::HostMemory> = region.clone();
        self.device
            .iommu()
            .map(iova.0, region.len() as u64, memory, 0)
            .map_err(|e| DmaError::Map(Box::new(e)))
    }

    fn unmap(&self, iova: Iova, len: usize) -> Result<(), DmaError> {
        self.device
            .iommu()
            .unmap(iova.0, len as u64)
            .map_err(|e| DmaError::Map(Box::new(e)))
    }
}

impl Transport for InProcess {
    fn name(&self) -> String {
        "sim".into()
    }
    fn read32(&self, offset: u64) -> u32 {
        self.device.bar_read32(offset)
    }
    fn write32(&self, offset: u64, value: u32) {
        self.device.bar_write32(offset, value)
    }
    fn read64(&self, offset: u64) -> u64 {
        self.device.bar_read64(offset)
    }
    fn write64(&self, offset: u64, value: u64) {
        self.device.bar_write64(offset, value)
    }
    fn interrupt(&self, vector: u32) -> Result<Arc<EventFd>, TransportError> {
        let mut vectors = self.vectors.lock().unwrap_or_else(|e| e.into_inner());
        let slot = vectors
            .get_mut(vector as usize)
            .ok_or(TransportError::NoSuchVector(vector))?;
        if let Some(fd) = slot {
            return Ok(Arc::clone(fd));
        }
        let fd = Arc::new(EventFd::new()?);
        self.device
            .set_interrupt(vector, Some(Arc::clone(&fd) as Arc<dyn InterruptSink>));
        *slot = Some(Arc::clone(&fd));
        Ok(fd)
    }
    fn reset(&self) -> Result<(), TransportError> {
        // The model has no separate function-level reset: its register reset is the whole
        // of it (READY follows once its engines have let go; the driver waits for that).
        self.device.bar_write32(
            tlsaccel_abi::regs::DEVICE_CONTROL,
            tlsaccel_abi::DeviceControl::RESET.bits(),
        );
        Ok(())
    }
    fn simulator(&self) -> Option<&tlsaccel_sim::Device> {
        Some(&self.device)
    }
}

impl SimOptions {
    /// The simulator configuration these options describe.
    pub fn config(&self) -> DeviceConfig {
        let mut config = DeviceConfig::default();
        if let Some(queues) = self.queues {
            config.queues = queues;
        }
        if let Some(engines) = self.engines {
            config.engines = engines;
        }
        if let Some(engines) = self.pke_engines {
            config.pke_engines = engines;
        }
        if let Some(slots) = self.key_slots {
            config.key_slots = slots;
        }
        config
    }
}
