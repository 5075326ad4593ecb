//! The RTL of `fpga/rtl` as a Verilator model, driven from Rust one clock at a time, and a
//! driver [`Transport`] over it: BAR0 accesses become AXI4-Lite transactions on the
//! register block, so the driver's own code talks to the hardware design.
//!
//! The model is `tlsaccel_top`: the register block, the queue engine and the record engine.
//! Their two AXI4 masters (descriptors and completions; key blocks and job data) reach host
//! memory through callbacks that look addresses up in the DMA regions the driver mapped
//! through this transport (an IOMMU: an address outside them is a bus error); reads can be
//! delayed as PCIe would ([`RtlDevice::set_read_latency`]). A clock thread keeps the model
//! running while the transport lives, so the driver's queue pairs see completions appear by
//! themselves. Interrupt messages from the queue engine signal the eventfd of their vector.
//! ChaCha20-Poly1305, TLS 1.2 records and the public-key engines are not in the RTL (its
//! CAPABILITIES register says so; fpga/README.md).
//!
//! The RTL has no fault-injection window (CAPABILITIES.MODEL_FAULTS is clear, as on a card);
//! the test bench injects some of the reference model's faults (device-spec §9) from outside
//! the device instead, through [`Transport::testbench_faults`], so `ModelFaults` works here:
//! STALL and RESUME (the queue engine's test-bench hold input, built into the model only),
//! DROP_NEXT_COMPLETION (the next completion write is answered OKAY and not written),
//! DMA_FAULT_NEXT_JOB (the record engine's next read burst answers SLVERR: the next job that
//! reads host memory fails with `DMA_FAULT`) and FATAL (the fatal input, with FATAL_CODE
//! INJECTED). A reset lifts them all. The others (a corrupted tag, an oversize result length,
//! a bogus completion) would need the device itself to misbehave and are refused.
//!
//! This crate's `unsafe` is the FFI to the C++ shim (`csrc/shim.cpp`) and its callbacks,
//! each with a SAFETY comment; the model handle is only touched under a mutex.

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tlsaccel_driver::abi::{FatalCode, FaultCode, ModelFault};
use tlsaccel_driver::dma::{DmaError, DmaMapper, DmaRegion};
use tlsaccel_driver::transport::{EventFd, Transport, TransportError};
use tlsaccel_driver::{Iova, TestbenchFaults};

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

    pub(crate) type ReadFn =
        unsafe extern "C" fn(context: *mut c_void, address: u64, buf: *mut u8, len: u32) -> i32;
    pub(crate) type WriteFn =
        unsafe extern "C" fn(context: *mut c_void, address: u64, buf: *const u8, len: u32) -> i32;
    pub(crate) type IrqFn = unsafe extern "C" fn(context: *mut c_void, vector: u32);

    extern "C" {
        pub(crate) fn tlsa_rtl_new(
            memory: *mut c_void,
            read: ReadFn,
            write: WriteFn,
            irq: IrqFn,
        ) -> *mut c_void;
        pub(crate) fn tlsa_rtl_free(handle: *mut c_void);
        pub(crate) fn tlsa_rtl_reset(handle: *mut c_void);
        pub(crate) fn tlsa_rtl_tick(handle: *mut c_void, n: u32);
        pub(crate) fn tlsa_rtl_cycles(handle: *mut c_void) -> u64;
        pub(crate) fn tlsa_rtl_idle(handle: *mut c_void) -> i32;
        pub(crate) fn tlsa_rtl_write(handle: *mut c_void, address: u32, data: u32) -> i32;
        pub(crate) fn tlsa_rtl_read(handle: *mut c_void, address: u32, data: *mut u32) -> i32;
        pub(crate) fn tlsa_rtl_set_fatal(handle: *mut c_void, fatal: u32, code: u32);
        pub(crate) fn tlsa_rtl_set_read_latency(handle: *mut c_void, cycles: u32);
        pub(crate) fn tlsa_rtl_set_hold(handle: *mut c_void, hold: u32);
        pub(crate) fn tlsa_rtl_held(handle: *mut c_void) -> u32;
        pub(crate) fn tlsa_rtl_drop_next_completion(handle: *mut c_void);
        pub(crate) fn tlsa_rtl_fail_next_engine_read(handle: *mut c_void);
        pub(crate) fn tlsa_rtl_inject_fatal(handle: *mut c_void, code: u32);
    }
}

/// The host as the device sees it: the DMA regions mapped at their IOVAs, and the
/// eventfds its interrupt vectors signal.
#[derive(Debug, Default)]
pub struct HostMemory {
    regions: Mutex<Vec<(u64, Arc<DmaRegion>)>>,
    vectors: Mutex<std::collections::HashMap<u32, Arc<EventFd>>>,
}

impl HostMemory {
    /// The eventfd of interrupt `vector`, made on first use.
    pub fn vector(&self, vector: u32) -> Result<Arc<EventFd>, TransportError> {
        let mut vectors = self.vectors.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(fd) = vectors.get(&vector) {
            return Ok(Arc::clone(fd));
        }
        let fd = Arc::new(EventFd::new()?);
        vectors.insert(vector, Arc::clone(&fd));
        Ok(fd)
    }

    /// Delivers an interrupt message for `vector` (dropped when nobody asked for it).
    pub fn raise(&self, vector: u32) {
        let vectors = self.vectors.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(fd) = vectors.get(&vector) {
            fd.signal();
        }
    }

    fn find(&self, address: u64, len: usize) -> Option<(Arc<DmaRegion>, usize)> {
        let regions = self.regions.lock().unwrap_or_else(|e| e.into_inner());
        regions.iter().find_map(|(base, region)| {
            let offset = address.checked_sub(*base)? as usize;
            (offset.checked_add(len)? <= region.len()).then(|| (Arc::clone(region), offset))
        })
    }

    /// Maps `region` at device address `iova` (what the transport's `DmaMapper` does), for
    /// tests that drive an [`RtlDevice`] by hand.
    pub fn map(&self, iova: u64, region: Arc<DmaRegion>) {
        let mut regions = self.regions.lock().unwrap_or_else(|e| e.into_inner());
        regions.push((iova, region));
    }

    /// Reads host memory at a device address; `false` outside every mapping.
    pub fn read(&self, address: u64, buf: &mut [u8]) -> bool {
        match self.find(address, buf.len()) {
            Some((region, offset)) => region.read(offset, buf).is_ok(),
            None => false,
        }
    }

    /// Writes host memory at a device address; `false` outside every mapping.
    pub fn write(&self, address: u64, data: &[u8]) -> bool {
        match self.find(address, data.len()) {
            Some((region, offset)) => region.write(offset, data).is_ok(),
            None => false,
        }
    }
}

#[cfg(rtl_model)]
/// # Safety
/// `context` is the `HostMemory` the model was created with (alive as long as the model);
/// `buf` is valid for `len` writable bytes.
unsafe extern "C" fn read_memory(
    context: *mut c_void,
    address: u64,
    buf: *mut u8,
    len: u32,
) -> i32 {
    // SAFETY: see the function's contract; the shim passes its own stack buffer of one
    // beat (8 or 16 bytes).
    let (memory, buf) = unsafe {
        (
            &*(context as *const HostMemory),
            std::slice::from_raw_parts_mut(buf, len as usize),
        )
    };
    if memory.read(address, buf) {
        0
    } else {
        -1
    }
}

#[cfg(rtl_model)]
/// # Safety
/// `context` is the `HostMemory` the model was created with (alive as long as the model).
unsafe extern "C" fn raise_interrupt(context: *mut c_void, vector: u32) {
    // SAFETY: see the function's contract.
    let memory = unsafe { &*(context as *const HostMemory) };
    memory.raise(vector);
}

#[cfg(rtl_model)]
/// # Safety
/// As [`read_memory`], with `buf` valid for `len` readable bytes.
unsafe extern "C" fn write_memory(
    context: *mut c_void,
    address: u64,
    buf: *const u8,
    len: u32,
) -> i32 {
    // SAFETY: see the function's contract.
    let (memory, data) = unsafe {
        (
            &*(context as *const HostMemory),
            std::slice::from_raw_parts(buf, len as usize),
        )
    };
    if memory.write(address, data) {
        0
    } else {
        -1
    }
}

/// The model's handle. Every call goes through `&mut`, under [`RtlDevice`]'s mutex.
#[derive(Debug)]
struct Handle(NonNull<c_void>);

// SAFETY: the C++ model has no thread affinity; it is used by one thread at a time (the
// mutex in `RtlDevice`), and moving the pointer between threads is fine.
unsafe impl Send for Handle {}

/// The RTL model: the device behind AXI4-Lite, its DMA served from [`HostMemory`].
#[derive(Debug)]
pub struct RtlDevice {
    handle: Mutex<Handle>,
    memory: Arc<HostMemory>,
}

impl RtlDevice {
    /// Elaborates and resets a model with no host memory mapped.
    pub fn new() -> Result<Self, RtlError> {
        Self::with_memory(Arc::new(HostMemory::default()))
    }

    /// Elaborates and resets a model whose DMA reaches `memory`.
    pub fn with_memory(memory: Arc<HostMemory>) -> Result<Self, RtlError> {
        #[cfg(rtl_model)]
        {
            let context = Arc::as_ptr(&memory) as *mut c_void;
            // SAFETY: `context` points to a `HostMemory` that `self.memory` keeps alive for
            // as long as the model exists (the model is freed in Drop, before the Arc); the
            // callbacks match the shim's types and uphold their contracts.
            let raw =
                unsafe { ffi::tlsa_rtl_new(context, read_memory, write_memory, raise_interrupt) };
            let handle = NonNull::new(raw).ok_or(RtlError::NotBuilt)?;
            Ok(Self {
                handle: Mutex::new(Handle(handle)),
                memory,
            })
        }
        #[cfg(not(rtl_model))]
        {
            let _ = memory;
            Err(RtlError::NotBuilt)
        }
    }

    /// The host memory the model's DMA reaches.
    pub fn memory(&self) -> &Arc<HostMemory> {
        &self.memory
    }

    /// True when the queue engine has nothing in progress.
    pub fn idle(&self) -> bool {
        let handle = self.lock();
        #[cfg(rtl_model)]
        // SAFETY: as in `read`.
        return unsafe { ffi::tlsa_rtl_idle(handle.0.as_ptr()) } != 0;
        #[cfg(not(rtl_model))]
        {
            let _ = &handle;
            true
        }
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

    /// Delays every host-memory read by `cycles` from request to first data beat, as PCIe
    /// does (about 250 cycles, 1 µs at 250 MHz); 0 (the default) answers the next cycle.
    pub fn set_read_latency(&self, cycles: u32) {
        let handle = self.lock();
        #[cfg(rtl_model)]
        // SAFETY: as in `read`.
        unsafe {
            ffi::tlsa_rtl_set_read_latency(handle.0.as_ptr(), cycles)
        };
        let _ = (&handle, cycles);
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

    /// Drives the queue engine's test-bench hold (the model's STALL while set): a fetched
    /// descriptor waits before it completes or reaches the record engine. A reset clears it.
    pub fn set_hold(&self, hold: bool) {
        let handle = self.lock();
        #[cfg(rtl_model)]
        // SAFETY: as in `read`.
        unsafe {
            ffi::tlsa_rtl_set_hold(handle.0.as_ptr(), u32::from(hold))
        };
        let _ = (&handle, hold);
    }

    /// Jobs the queue engine holds under [`set_hold`](Self::set_hold): 0 or 1 (it takes one
    /// job at a time).
    pub fn held_jobs(&self) -> u32 {
        let handle = self.lock();
        #[cfg(rtl_model)]
        // SAFETY: as in `read`.
        return unsafe { ffi::tlsa_rtl_held(handle.0.as_ptr()) };
        #[cfg(not(rtl_model))]
        {
            let _ = &handle;
            0
        }
    }

    /// Swallows the queue engine's next completion write: answered OKAY, never written to
    /// host memory (until a reset).
    pub fn drop_next_completion(&self) {
        let handle = self.lock();
        #[cfg(rtl_model)]
        // SAFETY: as in `read`.
        unsafe {
            ffi::tlsa_rtl_drop_next_completion(handle.0.as_ptr())
        };
        let _ = &handle;
    }

    /// Answers the record engine's next read burst with SLVERR, as an IOMMU refusal would
    /// be (until a reset).
    pub fn fail_next_engine_read(&self) {
        let handle = self.lock();
        #[cfg(rtl_model)]
        // SAFETY: as in `read`.
        unsafe {
            ffi::tlsa_rtl_fail_next_engine_read(handle.0.as_ptr())
        };
        let _ = &handle;
    }

    /// Drives the fatal input with `code` until the next reset (the engines' reset input or
    /// RESET in DEVICE_CONTROL), over what [`set_fatal`](Self::set_fatal) drives.
    pub fn inject_fatal(&self, code: u32) {
        let handle = self.lock();
        #[cfg(rtl_model)]
        // SAFETY: as in `read`.
        unsafe {
            ffi::tlsa_rtl_inject_fatal(handle.0.as_ptr(), code)
        };
        let _ = (&handle, code);
    }
}

/// The faults the test bench shows from outside the device (this crate's docs).
impl TestbenchFaults for RtlDevice {
    fn supports(&self, code: FaultCode) -> bool {
        [
            FaultCode::STALL,
            FaultCode::RESUME,
            FaultCode::DROP_NEXT_COMPLETION,
            FaultCode::DMA_FAULT_NEXT_JOB,
            FaultCode::FATAL,
        ]
        .contains(&code)
    }

    fn inject(&self, fault: &ModelFault) -> bool {
        match fault {
            ModelFault::Stall => self.set_hold(true),
            ModelFault::Resume => self.set_hold(false),
            ModelFault::DropNextCompletion => self.drop_next_completion(),
            ModelFault::DmaFaultNextJob => self.fail_next_engine_read(),
            ModelFault::Fatal => self.inject_fatal(FatalCode::INJECTED.0),
            ModelFault::CorruptNextTag
            | ModelFault::OversizeNextResultLength
            | ModelFault::BogusCompletion { .. }
            | ModelFault::CorruptNextOpenTag => return false,
        }
        true
    }

    fn held_jobs(&self) -> u32 {
        RtlDevice::held_jobs(self)
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
    lost: AtomicBool,
    clock: Option<std::thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

/// Cycles the clock thread runs per turn of the model's lock.
const CYCLES_PER_TURN: u32 = 64;

impl RtlTransport {
    /// A transport over a fresh model, with its clock running.
    pub fn new() -> Result<Self, RtlError> {
        let device = Arc::new(RtlDevice::new()?);
        let stop = Arc::new(AtomicBool::new(false));
        let clock = {
            let device: Weak<RtlDevice> = Arc::downgrade(&device);
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("tlsaccel-rtl-clock".into())
                .spawn(move || run_clock(device, stop))
                .ok()
        };
        Ok(Self {
            device,
            lost: AtomicBool::new(false),
            clock,
            stop,
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
        if !self.lost.swap(true, Ordering::Relaxed) {
            eprintln!("tlsaccel-rtl: {error}; the device is lost");
        }
    }
}

impl Drop for RtlTransport {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(clock) = self.clock.take() {
            let _ = clock.join();
        }
    }
}

/// Runs the model's clock until the transport goes away: busy, in turns of
/// [`CYCLES_PER_TURN`] cycles (register accesses take the lock between them); idle, a turn
/// every 100 µs, so the heartbeat keeps moving.
fn run_clock(device: Weak<RtlDevice>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let Some(device) = device.upgrade() else {
            return;
        };
        device.tick(CYCLES_PER_TURN);
        let idle = device.idle();
        drop(device);
        if idle {
            std::thread::sleep(Duration::from_micros(100));
        } else {
            std::thread::yield_now();
        }
    }
}

impl DmaMapper for RtlTransport {
    fn map(&self, region: &Arc<DmaRegion>, iova: Iova) -> Result<(), DmaError> {
        let mut regions = self
            .device
            .memory()
            .regions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        regions.push((iova.0, Arc::clone(region)));
        Ok(())
    }

    fn unmap(&self, iova: Iova, _len: usize) -> Result<(), DmaError> {
        let mut regions = self
            .device
            .memory()
            .regions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        regions.retain(|(base, _)| *base != iova.0);
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
        // One vector per queue, as the shell's MSI-X table would have.
        if vector >= tlsaccel_driver::abi::regs::MAX_QUEUES {
            return Err(TransportError::NoSuchVector(vector));
        }
        self.device.memory().vector(vector)
    }

    fn reset(&self) -> Result<(), TransportError> {
        self.device.reset();
        Ok(())
    }

    fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    fn testbench_faults(&self) -> Option<&dyn TestbenchFaults> {
        Some(self.device.as_ref())
    }
}
