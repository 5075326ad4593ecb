//! The RTL of `fpga/rtl` as a Verilator model, driven from Rust one clock at a time, and a
//! driver [`Transport`] over it: BAR0 accesses become AXI4-Lite transactions on the
//! register block, so the driver's own code talks to the hardware design.
//!
//! What the RTL has so far is the register file (`tlsaccel_csr`): identity, device control
//! and status, heartbeat, counters, queue configuration with its enable-time checks, and
//! doorbells. The queue engine and the record engine come next (fpga/README.md); until
//! then this transport has no interrupts and the device processes no descriptors.
//!
//! This crate's `unsafe` is the FFI to the C++ shim (`csrc/shim.cpp`), each call with a
//! SAFETY comment; the model handle is only touched under a mutex.

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard};

use tlsaccel_driver::dma::{DmaError, DmaMapper, DmaRegion};
use tlsaccel_driver::transport::{EventFd, Transport, TransportError};
use tlsaccel_driver::Iova;

/// Why the model cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RtlError {
    #[error("the RTL model was not built (install verilator and rebuild)")]
    NotBuilt,
    #[error("AXI4-Lite {op} at {address:#x} got no answer from the RTL")]
    NoAnswer { op: &'static str, address: u32 },
    #[error("AXI4-Lite {op} at {address:#x} answered {resp}")]
    ErrorResponse {
        op: &'static str,
        address: u32,
        resp: i32,
    },
}

#[cfg(rtl_model)]
mod ffi {
    use std::ffi::c_void;

    extern "C" {
        pub(crate) fn tlsa_rtl_new() -> *mut c_void;
        pub(crate) fn tlsa_rtl_free(handle: *mut c_void);
        pub(crate) fn tlsa_rtl_reset(handle: *mut c_void);
        pub(crate) fn tlsa_rtl_tick(handle: *mut c_void, n: u32);
        pub(crate) fn tlsa_rtl_cycles(handle: *mut c_void) -> u64;
        pub(crate) fn tlsa_rtl_write(handle: *mut c_void, address: u32, data: u32) -> i32;
        pub(crate) fn tlsa_rtl_read(handle: *mut c_void, address: u32, data: *mut u32) -> i32;
        pub(crate) fn tlsa_rtl_set_counter(handle: *mut c_void, index: u32, value: u64);
        pub(crate) fn tlsa_rtl_set_fatal(handle: *mut c_void, fatal: u32, code: u32);
        pub(crate) fn tlsa_rtl_queue(
            handle: *mut c_void,
            q: u32,
            enabled: *mut u32,
            sq_tail: *mut u32,
            cq_head: *mut u32,
        );
    }
}

/// The model's handle. Every call goes through `&mut`, under [`RtlDevice`]'s mutex.
#[derive(Debug)]
struct Handle(NonNull<c_void>);

// SAFETY: the C++ model has no thread affinity; it is used by one thread at a time (the
// mutex in `RtlDevice`), and moving the pointer between threads is fine.
unsafe impl Send for Handle {}

/// What the queue engine sees of one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueView {
    pub enabled: bool,
    pub sq_tail: u32,
    pub cq_head: u32,
}

/// The RTL model: a clocked register block behind AXI4-Lite.
#[derive(Debug)]
pub struct RtlDevice {
    handle: Mutex<Handle>,
}

impl RtlDevice {
    /// Elaborates and resets a model.
    pub fn new() -> Result<Self, RtlError> {
        #[cfg(rtl_model)]
        {
            // SAFETY: `tlsa_rtl_new` has no preconditions and returns an owned handle.
            let raw = unsafe { ffi::tlsa_rtl_new() };
            let handle = NonNull::new(raw).ok_or(RtlError::NotBuilt)?;
            Ok(Self {
                handle: Mutex::new(Handle(handle)),
            })
        }
        #[cfg(not(rtl_model))]
        Err(RtlError::NotBuilt)
    }

    fn lock(&self) -> MutexGuard<'_, Handle> {
        self.handle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads a 32-bit register.
    pub fn read(&self, address: u32) -> Result<u32, RtlError> {
        let handle = self.lock();
        let mut data = 0u32;
        // SAFETY: the handle is live (owned by `self`, freed only in Drop) and exclusively
        // ours under the lock; `data` is a valid u32 for the shim to write.
        let resp = unsafe { call_read(&handle, address, &mut data) };
        match resp {
            0 => Ok(data),
            -1 => Err(RtlError::NoAnswer {
                op: "read",
                address,
            }),
            resp => Err(RtlError::ErrorResponse {
                op: "read",
                address,
                resp,
            }),
        }
    }

    /// Writes a 32-bit register.
    pub fn write(&self, address: u32, data: u32) -> Result<(), RtlError> {
        let handle = self.lock();
        // SAFETY: as in `read`.
        let resp = unsafe { call_write(&handle, address, data) };
        match resp {
            0 => Ok(()),
            -1 => Err(RtlError::NoAnswer {
                op: "write",
                address,
            }),
            resp => Err(RtlError::ErrorResponse {
                op: "write",
                address,
                resp,
            }),
        }
    }

    /// Runs `n` clock cycles.
    pub fn tick(&self, n: u32) {
        let handle = self.lock();
        #[cfg(rtl_model)]
        // SAFETY: as in `read`.
        unsafe {
            ffi::tlsa_rtl_tick(handle.0.as_ptr(), n)
        };
        let _ = (&handle, n);
    }

    /// Clock cycles run so far.
    pub fn cycles(&self) -> u64 {
        let handle = self.lock();
        #[cfg(rtl_model)]
        // SAFETY: as in `read`.
        return unsafe { ffi::tlsa_rtl_cycles(handle.0.as_ptr()) };
        #[cfg(not(rtl_model))]
        {
            let _ = &handle;
            0
        }
    }

    /// Holds the reset input for two cycles.
    pub fn reset(&self) {
        let handle = self.lock();
        #[cfg(rtl_model)]
        // SAFETY: as in `read`.
        unsafe {
            ffi::tlsa_rtl_reset(handle.0.as_ptr())
        };
        let _ = &handle;
    }

    /// Drives counter input `index` (what the engines would count).
    pub fn set_counter(&self, index: u32, value: u64) {
        let handle = self.lock();
        #[cfg(rtl_model)]
        // SAFETY: as in `read`; the shim ignores indices out of range.
        unsafe {
            ffi::tlsa_rtl_set_counter(handle.0.as_ptr(), index, value)
        };
        let _ = (&handle, index, value);
    }

    /// Drives the fatal input and its code.
    pub fn set_fatal(&self, fatal: bool, code: u32) {
        let handle = self.lock();
        #[cfg(rtl_model)]
        // SAFETY: as in `read`.
        unsafe {
            ffi::tlsa_rtl_set_fatal(handle.0.as_ptr(), u32::from(fatal), code)
        };
        let _ = (&handle, fatal, code);
    }

    /// Queue `q`'s configuration outputs.
    pub fn queue(&self, q: u32) -> QueueView {
        let handle = self.lock();
        let (mut enabled, mut sq_tail, mut cq_head) = (0u32, 0u32, 0u32);
        #[cfg(rtl_model)]
        // SAFETY: as in `read`; the three pointers are valid u32s; the shim ignores q >= 8.
        unsafe {
            ffi::tlsa_rtl_queue(
                handle.0.as_ptr(),
                q,
                &mut enabled,
                &mut sq_tail,
                &mut cq_head,
            )
        };
        let _ = (&handle, q);
        QueueView {
            enabled: enabled != 0,
            sq_tail,
            cq_head,
        }
    }
}

/// # Safety
/// `handle` must be a live model handle used by no one else during the call.
unsafe fn call_read(handle: &Handle, address: u32, data: &mut u32) -> i32 {
    #[cfg(rtl_model)]
    // SAFETY: the caller guarantees the handle; `data` is a valid, exclusive u32.
    return unsafe { ffi::tlsa_rtl_read(handle.0.as_ptr(), address, data) };
    #[cfg(not(rtl_model))]
    {
        let _ = (handle, address, data);
        -1
    }
}

/// # Safety
/// As [`call_read`].
unsafe fn call_write(handle: &Handle, address: u32, data: u32) -> i32 {
    #[cfg(rtl_model)]
    // SAFETY: the caller guarantees the handle.
    return unsafe { ffi::tlsa_rtl_write(handle.0.as_ptr(), address, data) };
    #[cfg(not(rtl_model))]
    {
        let _ = (handle, address, data);
        -1
    }
}

impl Drop for RtlDevice {
    fn drop(&mut self) {
        let handle = self.lock();
        #[cfg(rtl_model)]
        // SAFETY: the handle came from `tlsa_rtl_new`, is freed exactly once, here, and
        // nothing uses it afterwards (`self` is going away).
        unsafe {
            ffi::tlsa_rtl_free(handle.0.as_ptr())
        };
        let _ = &handle;
    }
}

/// The RTL as a driver transport (`Device::with_transport`, `DeviceInfo::probe`).
/// A register access that the RTL does not answer reads as all-ones and marks the
/// transport lost, as a surprise-removed PCI function would.
#[derive(Debug)]
pub struct RtlTransport {
    device: Arc<RtlDevice>,
    lost: std::sync::atomic::AtomicBool,
}

impl RtlTransport {
    /// A transport over a fresh model.
    pub fn new() -> Result<Self, RtlError> {
        Ok(Self {
            device: Arc::new(RtlDevice::new()?),
            lost: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The model, for driving its side inputs in tests.
    pub fn model(&self) -> &Arc<RtlDevice> {
        &self.device
    }

    fn address(offset: u64) -> u32 {
        u32::try_from(offset).unwrap_or(u32::MAX)
    }

    fn mark_lost(&self, error: &RtlError) {
        if !self.lost.swap(true, std::sync::atomic::Ordering::Relaxed) {
            eprintln!("tlsaccel-rtl: {error}; the device is lost");
        }
    }
}

impl DmaMapper for RtlTransport {
    fn map(&self, _region: &Arc<DmaRegion>, _iova: Iova) -> Result<(), DmaError> {
        // The register block does no DMA yet: there is nothing to map into.
        Ok(())
    }

    fn unmap(&self, _iova: Iova, _len: usize) -> Result<(), DmaError> {
        Ok(())
    }
}

impl Transport for RtlTransport {
    fn name(&self) -> String {
        "rtl".into()
    }

    fn read32(&self, offset: u64) -> u32 {
        match self.device.read(Self::address(offset)) {
            Ok(value) => value,
            Err(error) => {
                self.mark_lost(&error);
                u32::MAX
            }
        }
    }

    fn write32(&self, offset: u64, value: u32) {
        if let Err(error) = self.device.write(Self::address(offset), value) {
            self.mark_lost(&error);
        }
    }

    fn read64(&self, offset: u64) -> u64 {
        let low = u64::from(self.read32(offset));
        let high = u64::from(self.read32(offset + 4));
        low | high << 32
    }

    fn write64(&self, offset: u64, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }

    fn interrupt(&self, vector: u32) -> Result<Arc<EventFd>, TransportError> {
        // The RTL has no interrupt controller yet (fpga/README.md, "Next").
        Err(TransportError::NoSuchVector(vector))
    }

    fn reset(&self) -> Result<(), TransportError> {
        self.device.reset();
        Ok(())
    }

    fn is_lost(&self) -> bool {
        self.lost.load(std::sync::atomic::Ordering::Relaxed)
    }
}
