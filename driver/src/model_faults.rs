//! The reference model's fault injection (device-spec §9), for tests of the host side, by
//! one of two ways in:
//!
//! * the model's register window, reached through BAR0 like any other register, so it works
//!   on every transport that forwards BAR0 accesses: in-process, vfio-user, and the
//!   shared-memory mailbox in a guest (a device with `CAPABILITIES.MODEL_FAULTS`);
//! * else the test bench around a device without the window ([`TestbenchFaults`], from
//!   [`Transport::testbench_faults`]): the RTL's Verilator bench shows a subset of the faults
//!   from outside the device, and refuses the others with an error rather than ignoring them.
//!
//! Hardware has neither and is refused up front.

use std::sync::Arc;

use tlsaccel_abi::regs::model_faults;
use tlsaccel_abi::{Capabilities, FaultCode, ModelFault};

use crate::device::Device;
use crate::transport::Transport;

/// Why fault injection is not available.
#[derive(Debug, thiserror::Error)]
pub enum ModelFaultsError {
    #[error(
        "{name}: the device has no fault-injection window (CAPABILITIES.MODEL_FAULTS is clear; \
         only the reference model has one) and no test bench that injects faults"
    )]
    NotAvailable { name: String },
    #[error(
        "{name}: the device has no fault-injection window (CAPABILITIES.MODEL_FAULTS is clear) \
         and its test bench cannot inject {code}"
    )]
    Unsupported { name: String, code: FaultCode },
}

/// Faults a test bench injects into a device that has no fault-injection window of its own
/// (the RTL under Verilator): the [`ModelFault`]s it can show, with the model's meaning
/// (device-spec §9) as far as the bench can give it, driven from outside the device.
pub trait TestbenchFaults: Send + Sync {
    /// Whether the bench can show the fault with this code.
    fn supports(&self, code: FaultCode) -> bool;
    /// Shows `fault` at once; `false` (and nothing happens) for a fault the bench cannot
    /// show, which [`supports`](Self::supports) refuses.
    fn inject(&self, fault: &ModelFault) -> bool;
    /// Jobs held under [`ModelFault::Stall`]: fetched, neither run nor completed.
    fn held_jobs(&self) -> u32;
}

/// Which way faults reach the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// The register window of a device with `CAPABILITIES.MODEL_FAULTS`.
    Window,
    /// The transport's [`TestbenchFaults`].
    Testbench,
}

/// The fault injection of a device that has it: its register window, or its test bench.
///
/// A fault with arguments takes several register writes; use one `ModelFaults` (and one
/// thread) per device at a time.
pub struct ModelFaults {
    transport: Arc<dyn Transport>,
    route: Route,
}

impl std::fmt::Debug for ModelFaults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelFaults")
            .field("device", &self.transport.name())
            .field("route", &self.route)
            .finish()
    }
}

impl ModelFaults {
    /// The fault injection of `device`: its window when its `CAPABILITIES` register offers
    /// one, else its transport's test bench, else an error.
    pub fn new(device: &Device) -> Result<Self, ModelFaultsError> {
        Self::with_transport(Arc::clone(device.transport()), device.info().capabilities)
    }

    /// The fault injection of the device behind `transport`, which reported `capabilities`.
    pub fn with_transport(
        transport: Arc<dyn Transport>,
        capabilities: Capabilities,
    ) -> Result<Self, ModelFaultsError> {
        let route = if capabilities.contains(Capabilities::MODEL_FAULTS) {
            Route::Window
        } else if transport.testbench_faults().is_some() {
            Route::Testbench
        } else {
            return Err(ModelFaultsError::NotAvailable {
                name: transport.name(),
            });
        };
        Ok(Self { transport, route })
    }

    /// Checks that every fault in `codes` can be injected, so a test that needs them can say
    /// why it cannot run before it starts. The window takes every fault.
    pub fn require(&self, codes: &[FaultCode]) -> Result<(), ModelFaultsError> {
        match codes.iter().find(|code| !self.supports(**code)) {
            Some(&code) => Err(ModelFaultsError::Unsupported {
                name: self.transport.name(),
                code,
            }),
            None => Ok(()),
        }
    }

    fn supports(&self, code: FaultCode) -> bool {
        match self.route {
            Route::Window => true,
            Route::Testbench => self
                .transport
                .testbench_faults()
                .is_some_and(|bench| bench.supports(code)),
        }
    }

    /// Makes the device show `fault` at once. Through the window: the arguments of a bogus
    /// completion first, then the fault's code into `FAULT_INJECT`. Through a test bench: an
    /// error for a fault it cannot show.
    pub fn inject(&self, fault: ModelFault) -> Result<(), ModelFaultsError> {
        match self.route {
            Route::Window => {
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
            Route::Testbench => {
                let shown = self
                    .transport
                    .testbench_faults()
                    .is_some_and(|bench| bench.inject(&fault));
                if !shown {
                    return Err(ModelFaultsError::Unsupported {
                        name: self.transport.name(),
                        code: fault.code(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Jobs the device's engines hold under [`ModelFault::Stall`]: fetched and accepted,
    /// neither run nor completed.
    pub fn held_jobs(&self) -> u32 {
        match self.route {
            Route::Window => self.transport.read32(model_faults::HELD_JOBS),
            Route::Testbench => self
                .transport
                .testbench_faults()
                .map_or(0, |bench| bench.held_jobs()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::dma::{DmaError, DmaMapper, DmaRegion};
    use crate::transport::{EventFd, TransportError};
    use crate::Iova;

    /// A bench that can stall and nothing else, and remembers what it was told.
    #[derive(Debug, Default)]
    struct StallOnlyBench {
        injected: Mutex<Vec<ModelFault>>,
    }

    impl TestbenchFaults for StallOnlyBench {
        fn supports(&self, code: FaultCode) -> bool {
            code == FaultCode::STALL || code == FaultCode::RESUME
        }
        fn inject(&self, fault: &ModelFault) -> bool {
            if !self.supports(fault.code()) {
                return false;
            }
            self.injected.lock().unwrap().push(*fault);
            true
        }
        fn held_jobs(&self) -> u32 {
            self.injected
                .lock()
                .unwrap()
                .iter()
                .filter(|f| **f == ModelFault::Stall)
                .count() as u32
        }
    }

    /// A transport whose registers only record writes, with or without a bench.
    #[derive(Debug, Default)]
    struct Recorder {
        writes: Mutex<Vec<(u64, u32)>>,
        bench: Option<StallOnlyBench>,
    }

    impl DmaMapper for Recorder {
        fn map(&self, _: &Arc<DmaRegion>, _: Iova) -> Result<(), DmaError> {
            Ok(())
        }
        fn unmap(&self, _: Iova, _: usize) -> Result<(), DmaError> {
            Ok(())
        }
    }

    impl Transport for Recorder {
        fn name(&self) -> String {
            "recorder".into()
        }
        fn read32(&self, _: u64) -> u32 {
            0
        }
        fn write32(&self, offset: u64, value: u32) {
            self.writes.lock().unwrap().push((offset, value));
        }
        fn read64(&self, _: u64) -> u64 {
            0
        }
        fn write64(&self, offset: u64, value: u64) {
            self.write32(offset, value as u32);
            self.write32(offset + 4, (value >> 32) as u32);
        }
        fn interrupt(&self, vector: u32) -> Result<Arc<EventFd>, TransportError> {
            Err(TransportError::NoSuchVector(vector))
        }
        fn reset(&self) -> Result<(), TransportError> {
            Ok(())
        }
        fn testbench_faults(&self) -> Option<&dyn TestbenchFaults> {
            self.bench.as_ref().map(|b| b as &dyn TestbenchFaults)
        }
    }

    fn with_bench() -> Arc<Recorder> {
        Arc::new(Recorder {
            bench: Some(StallOnlyBench::default()),
            ..Recorder::default()
        })
    }

    #[test]
    fn a_device_with_neither_window_nor_bench_is_refused_with_a_reason() {
        let error = ModelFaults::with_transport(Arc::new(Recorder::default()), Capabilities::NOP)
            .unwrap_err();
        assert!(matches!(error, ModelFaultsError::NotAvailable { .. }));
        assert!(error.to_string().contains("MODEL_FAULTS"), "{error}");
    }

    #[test]
    fn without_the_window_faults_go_to_the_bench_and_what_it_cannot_do_is_an_error() {
        let transport = with_bench();
        let faults = ModelFaults::with_transport(transport.clone(), Capabilities::NOP)
            .expect("the bench offers faults");
        faults
            .require(&[FaultCode::STALL, FaultCode::RESUME])
            .expect("the bench stalls");
        let error = faults
            .require(&[FaultCode::STALL, FaultCode::CORRUPT_NEXT_TAG])
            .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("test bench cannot inject CORRUPT_NEXT_TAG"),
            "{error}"
        );
        faults.inject(ModelFault::Stall).expect("supported");
        assert_eq!(faults.held_jobs(), 1, "held jobs come from the bench");
        let error = faults.inject(ModelFault::CorruptNextTag).unwrap_err();
        assert!(matches!(
            error,
            ModelFaultsError::Unsupported {
                code: FaultCode::CORRUPT_NEXT_TAG,
                ..
            }
        ));
        let bench = transport.bench.as_ref().unwrap();
        assert_eq!(*bench.injected.lock().unwrap(), vec![ModelFault::Stall]);
        assert!(
            transport.writes.lock().unwrap().is_empty(),
            "nothing was written to a window the device does not have"
        );
    }

    #[test]
    fn the_window_wins_over_a_bench_and_takes_every_fault() {
        let transport = with_bench();
        let faults = ModelFaults::with_transport(
            transport.clone(),
            Capabilities::NOP | Capabilities::MODEL_FAULTS,
        )
        .expect("window");
        faults
            .require(&[FaultCode::CORRUPT_NEXT_TAG, FaultCode::BOGUS_COMPLETION])
            .expect("the window takes every fault");
        faults
            .inject(ModelFault::BogusCompletion {
                queue: 2,
                cookie: 0x1_0000_0005,
                result_len: 9,
            })
            .expect("window");
        assert_eq!(
            *transport.writes.lock().unwrap(),
            vec![
                (model_faults::QUEUE, 2),
                (model_faults::COOKIE, 5),
                (model_faults::COOKIE + 4, 1),
                (model_faults::RESULT_LEN, 9),
                (model_faults::INJECT, FaultCode::BOGUS_COMPLETION.0),
            ]
        );
        assert!(transport
            .bench
            .as_ref()
            .unwrap()
            .injected
            .lock()
            .unwrap()
            .is_empty());
    }

    /// The simulator's window, through registers.
    #[cfg(feature = "sim")]
    mod simulator {
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
            faults
                .inject(ModelFault::Fatal)
                .expect("the window takes every fault");
            assert!(device.status().contains(tlsaccel_abi::DeviceStatus::FATAL));
        }
    }
}
