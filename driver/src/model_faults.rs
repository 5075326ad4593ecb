//! The reference model's fault injection (device-spec §9), reached through BAR0 like any
//! other register, so it works on every transport that forwards BAR0 accesses: in-process,
//! vfio-user, and the shared-memory mailbox in a guest. Only for tests of the host side: a
//! device without `CAPABILITIES.MODEL_FAULTS` (hardware, the RTL) is refused up front.

use std::sync::Arc;

use tlsaccel_abi::regs::model_faults;
use tlsaccel_abi::{Capabilities, ModelFault};

use crate::device::Device;
use crate::transport::Transport;

/// Why fault injection is not available.
#[derive(Debug, thiserror::Error)]
pub enum ModelFaultsError {
    #[error(
        "{name}: the device has no fault-injection window (CAPABILITIES.MODEL_FAULTS is clear); \
         only the reference model has one"
    )]
    NotAvailable { name: String },
}

/// The fault-injection window of a device that has one.
///
/// A fault with arguments takes several register writes; use one `ModelFaults` (and one
/// thread) per device at a time.
pub struct ModelFaults {
    transport: Arc<dyn Transport>,
}

impl std::fmt::Debug for ModelFaults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelFaults")
            .field("device", &self.transport.name())
            .finish()
    }
}

impl ModelFaults {
    /// The window of `device`, or an error when its `CAPABILITIES` register does not offer
    /// one.
    pub fn new(device: &Device) -> Result<Self, ModelFaultsError> {
        Self::with_transport(Arc::clone(device.transport()), device.info().capabilities)
    }

    /// The window of the device behind `transport`, which reported `capabilities`.
    pub fn with_transport(
        transport: Arc<dyn Transport>,
        capabilities: Capabilities,
    ) -> Result<Self, ModelFaultsError> {
        if !capabilities.contains(Capabilities::MODEL_FAULTS) {
            return Err(ModelFaultsError::NotAvailable {
                name: transport.name(),
            });
        }
        Ok(Self { transport })
    }

    /// Makes the device show `fault`: the arguments of a bogus completion first, then the
    /// fault's code into `FAULT_INJECT`, which acts at once.
    pub fn inject(&self, fault: ModelFault) {
        if let ModelFault::BogusCompletion {
            queue,
            cookie,
            result_len,
        } = fault
        {
            self.transport.write32(model_faults::QUEUE, queue);
            self.transport.write64(model_faults::COOKIE, cookie);
            self.transport.write32(model_faults::RESULT_LEN, result_len);
        }
        self.transport.write32(model_faults::INJECT, fault.code().0);
    }

    /// Jobs the device's engines hold under [`ModelFault::Stall`]: fetched and accepted,
    /// neither run nor completed.
    pub fn held_jobs(&self) -> u32 {
        self.transport.read32(model_faults::HELD_JOBS)
    }
}

#[cfg(all(test, feature = "sim"))]
mod tests {
    use super::*;
    use crate::in_process::InProcess;
    use crate::DeviceOptions;
    use tlsaccel_sim::DeviceConfig;

    fn device(capabilities: Capabilities) -> Arc<Device> {
        let transport = InProcess::new(DeviceConfig {
            queues: 2,
            key_slots: 8,
            capabilities,
            ..DeviceConfig::default()
        })
        .expect("simulator");
        Device::with_transport(Arc::new(transport), DeviceOptions::default()).expect("open")
    }

    #[test]
    fn a_device_without_the_capability_is_refused_with_a_reason() {
        let device = device(Capabilities::NOP | Capabilities::AES_128_GCM);
        let error = ModelFaults::new(&device).unwrap_err();
        assert!(error.to_string().contains("MODEL_FAULTS"), "{error}");
    }

    #[test]
    fn faults_reach_the_simulator_through_registers() {
        let device = device(DeviceConfig::default().capabilities);
        let faults = ModelFaults::new(&device).expect("the simulator has the window");
        assert_eq!(faults.held_jobs(), 0);
        faults.inject(ModelFault::Fatal);
        assert!(device.status().contains(tlsaccel_abi::DeviceStatus::FATAL));
    }
}
