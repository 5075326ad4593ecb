//! Kernel VFIO: a PCI function bound to vfio-pci, reached from userspace.
//!
//! [`VfioPci`] does what every VFIO user does — container with the type1 IOMMU, group,
//! device, config space, BAR mappings, MSI-X eventfds, DMA mappings, reset, teardown — and
//! checks every result (the `vfio-ioctls` crate swallows some, reset among them). Two
//! transports sit on it:
//!
//! * [`VfioTransport`]: a tlsaccel card. BAR0 is the register map; DMA memory is host memory
//!   mapped through the IOMMU; one MSI-X vector per queue.
//! * [`IvshmemTransport`]: the simulator behind QEMU's `ivshmem-doorbell` device (shared-memory
//!   mode, `abi::ivshmem`): registers through a mailbox in BAR2, rings and buffers in BAR2,
//!   completions signalled as MSI-X. This is how CI proves the VFIO code on a real kernel.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use memmap2::MmapOptions;
use tlsaccel_abi::ivshmem as shm;
use vfio_bindings::bindings::vfio::{
    VFIO_BASE, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_REGION_INFO_FLAG_MMAP,
    VFIO_TYPE,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps};

use crate::dma::{DmaError, DmaMapper, DmaRegion, Iova, RegionSource};
use crate::mmio::Bar;
use crate::transport::{EventFd, Transport, TransportError};

vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_RESET, VFIO_TYPE as u32, VFIO_BASE + 11);

/// PCI command register offset and the bits the driver sets.
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;

/// Errors of kernel VFIO.
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    #[error("{0:?} is not a PCI address (expected domain:bus:device.function, e.g. 0000:03:00.0)")]
    BadAddress(String),
    #[error("no PCI function {0} (no {1})")]
    NoSuchDevice(String, PathBuf),
    #[error("{address} is bound to {driver}, not vfio-pci (bind it: echo vfio-pci > /sys/bus/pci/devices/{address}/driver_override, then write the address to drivers_probe)")]
    NotBound { address: String, driver: String },
    #[error("{0} has no IOMMU group (is the IOMMU enabled, e.g. intel_iommu=on?)")]
    NoIommuGroup(String),
    #[error("cannot open /dev/vfio/{group} (group permissions, or another user holds it)")]
    GroupAccess {
        group: String,
        #[source]
        source: std::io::Error,
    },
    #[error("VFIO refused the container or device")]
    Vfio(#[source] vfio_ioctls::VfioError),
    #[error("config space access at {offset:#x} failed")]
    Config {
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("the device did not accept Memory Space and Bus Master Enable (command register reads {0:#06x})")]
    CommandRegister(u16),
    #[error("BAR{0} cannot be mapped (absent or not mmap-able)")]
    BarNotMappable(u32),
    #[error("mapping BAR{index} failed")]
    BarMap {
        index: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("the device has {available} MSI-X vectors; {wanted} are needed")]
    TooFewVectors { available: u32, wanted: u32 },
    #[error("VFIO_DEVICE_RESET failed")]
    Reset(#[source] std::io::Error),
    #[error("IOVA range [{iova:#x}, +{len:#x}) overlaps the reserved region {start:#x}-{end:#x} ({kind})")]
    ReservedIova {
        iova: u64,
        len: u64,
        start: u64,
        end: u64,
        kind: String,
    },
    #[error("{0}")]
    NotOurs(String),
}

impl From<VfioError> for TransportError {
    fn from(error: VfioError) -> Self {
        TransportError::Vfio(Box::new(error))
    }
}

/// A reserved IOVA range of an IOMMU group (MSI window, RMRR, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservedRegion {
    pub start: u64,
    pub end: u64,
    pub kind: String,
}

/// Parses `/sys/kernel/iommu_groups/N/reserved_regions` ("start end kind" per line, hex).
pub fn parse_reserved_regions(text: &str) -> Vec<ReservedRegion> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
            let start = hex(parts.next()?)?;
            let end = hex(parts.next()?)?;
            let kind = parts.next().unwrap_or("").to_string();
            Some(ReservedRegion { start, end, kind })
        })
        .collect()
}

/// Checks a PCI address's shape: `dddd:bb:dd.f` in hex.
pub fn valid_pci_address(address: &str) -> bool {
    let bytes = address.as_bytes();
    bytes.len() == 12
        && bytes[4] == b':'
        && bytes[7] == b':'
        && bytes[10] == b'.'
        && address
            .char_indices()
            .all(|(i, c)| matches!(i, 4 | 7 | 10) || c.is_ascii_hexdigit())
}

/// A PCI function opened through kernel VFIO.
pub struct VfioPci {
    address: String,
    group: String,
    container: Arc<VfioContainer>,
    device: VfioDevice,
    config_offset: u64,
    reserved: Vec<ReservedRegion>,
    msix_enabled: AtomicBool,
    /// Regions mapped for DMA, kept alive until unmapped.
    mapped: Mutex<HashMap<u64, Arc<DmaRegion>>>,
}

impl std::fmt::Debug for VfioPci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioPci")
            .field("address", &self.address)
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl VfioPci {
    /// Opens the function at `address` (which must be bound to vfio-pci), and enables Memory
    /// Space and Bus Master.
    pub fn open(address: &str) -> Result<Self, VfioError> {
        Self::open_in(address, Path::new("/sys"))
    }

    fn open_in(address: &str, sys: &Path) -> Result<Self, VfioError> {
        if !valid_pci_address(address) {
            return Err(VfioError::BadAddress(address.to_owned()));
        }
        let sysfs = sys.join("bus/pci/devices").join(address);
        if !sysfs.exists() {
            return Err(VfioError::NoSuchDevice(address.to_owned(), sysfs));
        }
        let link_name = |link: &str| {
            std::fs::read_link(sysfs.join(link))
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        };
        let driver = link_name("driver").unwrap_or_else(|| "no driver".into());
        if driver != "vfio-pci" {
            return Err(VfioError::NotBound {
                address: address.to_owned(),
                driver,
            });
        }
        let group =
            link_name("iommu_group").ok_or_else(|| VfioError::NoIommuGroup(address.to_owned()))?;
        // A group file opens exclusively: one that is busy may just be on its way out of
        // another user (a process exiting, a handle being dropped), so wait a little.
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(Path::new("/dev/vfio").join(&group))
            {
                Ok(_) => break,
                Err(e)
                    if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error())
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(source) => {
                    return Err(VfioError::GroupAccess {
                        group: group.clone(),
                        source,
                    })
                }
            }
        }
        let reserved = std::fs::read_to_string(
            sys.join("kernel/iommu_groups")
                .join(&group)
                .join("reserved_regions"),
        )
        .map(|text| parse_reserved_regions(&text))
        .unwrap_or_default();
        let container = Arc::new(VfioContainer::new(None).map_err(VfioError::Vfio)?);
        let device = VfioDevice::new(&sysfs, Arc::clone(&container) as Arc<dyn VfioOps>, false)
            .map_err(VfioError::Vfio)?;
        let config_offset = device.get_region_offset(VFIO_PCI_CONFIG_REGION_INDEX);
        let pci = Self {
            address: address.to_owned(),
            group,
            container,
            device,
            config_offset,
            reserved,
            msix_enabled: AtomicBool::new(false),
            mapped: Mutex::new(HashMap::new()),
        };
        pci.set_command(PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER, true)?;
        Ok(pci)
    }

    /// The PCI address.
    pub fn address(&self) -> &str {
        &self.address
    }

    fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: `self.device` owns the device descriptor and keeps it open for as long as
        // `self` lives, which bounds the borrow.
        unsafe { BorrowedFd::borrow_raw(self.device.as_raw_fd()) }
    }

    /// Reads config space at `offset`; every byte must arrive.
    pub fn config_read(&self, offset: u64, buf: &mut [u8]) -> Result<(), VfioError> {
        let at = self.config_offset + offset;
        match rustix::io::pread(self.fd(), &mut *buf, at) {
            Ok(n) if n == buf.len() => Ok(()),
            Ok(_) => Err(VfioError::Config {
                offset,
                source: std::io::ErrorKind::UnexpectedEof.into(),
            }),
            Err(e) => Err(VfioError::Config {
                offset,
                source: e.into(),
            }),
        }
    }

    /// Writes config space at `offset`; every byte must be taken.
    pub fn config_write(&self, offset: u64, data: &[u8]) -> Result<(), VfioError> {
        let at = self.config_offset + offset;
        match rustix::io::pwrite(self.fd(), data, at) {
            Ok(n) if n == data.len() => Ok(()),
            Ok(_) => Err(VfioError::Config {
                offset,
                source: std::io::ErrorKind::WriteZero.into(),
            }),
            Err(e) => Err(VfioError::Config {
                offset,
                source: e.into(),
            }),
        }
    }

    fn config_u16(&self, offset: u64) -> Result<u16, VfioError> {
        let mut raw = [0u8; 2];
        self.config_read(offset, &mut raw)?;
        Ok(u16::from_le_bytes(raw))
    }

    /// Vendor and device id.
    pub fn ids(&self) -> Result<(u16, u16), VfioError> {
        Ok((self.config_u16(0)?, self.config_u16(2)?))
    }

    /// Sets (`on`) or clears bits of the command register and checks they took.
    fn set_command(&self, bits: u16, on: bool) -> Result<(), VfioError> {
        let old = self.config_u16(PCI_COMMAND)?;
        let new = if on { old | bits } else { old & !bits };
        self.config_write(PCI_COMMAND, &new.to_le_bytes())?;
        let now = self.config_u16(PCI_COMMAND)?;
        if (now & bits == bits) != on {
            return Err(VfioError::CommandRegister(now));
        }
        Ok(())
    }

    /// Maps BAR `index` through the device descriptor.
    pub fn map_bar(&self, index: u32) -> Result<Bar, VfioError> {
        let flags = self.device.get_region_flags(index);
        let size = self.device.get_region_size(index);
        if flags & VFIO_REGION_INFO_FLAG_MMAP == 0 || size == 0 {
            return Err(VfioError::BarNotMappable(index));
        }
        let len = usize::try_from(size).map_err(|_| VfioError::BarNotMappable(index))?;
        let file = File::from(rustix::io::fcntl_dupfd_cloexec(self.fd(), 0).map_err(|e| {
            VfioError::BarMap {
                index,
                source: e.into(),
            }
        })?);
        let map = MmapOptions::new()
            .offset(self.device.get_region_offset(index))
            .len(len)
            .map_raw(&file)
            .map_err(|source| VfioError::BarMap { index, source })?;
        Ok(Bar::new(map))
    }

    /// MSI-X vectors the function offers.
    pub fn msix_vectors(&self) -> u32 {
        self.device
            .get_irq_info(VFIO_PCI_MSIX_IRQ_INDEX)
            .map_or(0, |irq| irq.count)
    }

    /// Enables MSI-X vectors 0..n, each signalling its eventfd (all in one call, as VFIO needs).
    pub fn enable_msix(&self, eventfds: &[Arc<EventFd>]) -> Result<(), VfioError> {
        let available = self.msix_vectors();
        let wanted = u32::try_from(eventfds.len()).unwrap_or(u32::MAX);
        if available < wanted {
            return Err(VfioError::TooFewVectors { available, wanted });
        }
        self.device
            .enable_msix(eventfds.iter().map(|fd| fd.as_vmm()).collect())
            .map_err(VfioError::Vfio)?;
        self.msix_enabled.store(true, Ordering::Release);
        Ok(())
    }

    /// Maps `region` at `iova` in the container's IOMMU, refusing reserved ranges.
    pub fn dma_map(&self, region: &Arc<DmaRegion>, iova: Iova) -> Result<(), VfioError> {
        let len = region.len() as u64;
        for r in &self.reserved {
            if iova.0 <= r.end && r.start < iova.0.saturating_add(len) {
                return Err(VfioError::ReservedIova {
                    iova: iova.0,
                    len,
                    start: r.start,
                    end: r.end,
                    kind: r.kind.clone(),
                });
            }
        }
        // SAFETY: the mapping covers `region.len()` bytes of memory this process mapped; the
        // region is kept alive in `self.mapped` until `dma_unmap` (or drop) removes the IOMMU
        // mapping, so the device never reaches memory that was given back.
        unsafe {
            self.container
                .vfio_dma_map(iova.0, region.len(), region.host_address().as_ptr())
        }
        .map_err(VfioError::Vfio)?;
        self.mapped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(iova.0, Arc::clone(region));
        Ok(())
    }

    /// Removes the IOMMU mapping at `iova`.
    pub fn dma_unmap(&self, iova: Iova, len: usize) -> Result<(), VfioError> {
        self.container
            .vfio_dma_unmap(iova.0, len)
            .map_err(VfioError::Vfio)?;
        self.mapped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&iova.0);
        Ok(())
    }

    /// Function-level reset (VFIO_DEVICE_RESET), checked, then Memory Space and Bus Master
    /// enabled again (reset clears the command register).
    pub fn reset(&self) -> Result<(), VfioError> {
        // SAFETY: VFIO_DEVICE_RESET takes no argument; the descriptor is a VFIO device fd.
        let rc = unsafe { vmm_sys_util::ioctl::ioctl(&self.device, VFIO_DEVICE_RESET()) };
        if rc < 0 {
            return Err(VfioError::Reset(std::io::Error::last_os_error()));
        }
        self.set_command(PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER, true)
    }
}

impl Drop for VfioPci {
    fn drop(&mut self) {
        // Interrupts off, bus master off, then the IOMMU mappings; the device and container
        // descriptors close after this.
        if self.msix_enabled.load(Ordering::Acquire) {
            if let Err(error) = self.device.disable_msix() {
                tracing::warn!(address = %self.address, %error, "disabling MSI-X failed");
            }
        }
        if let Err(error) = self.set_command(PCI_COMMAND_MASTER, false) {
            tracing::warn!(address = %self.address, %error, "clearing Bus Master failed");
        }
        let mapped: Vec<(u64, Arc<DmaRegion>)> = self
            .mapped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        for (iova, region) in mapped {
            if let Err(error) = self.container.vfio_dma_unmap(iova, region.len()) {
                tracing::warn!(address = %self.address, iova, %error, "DMA unmap failed");
            }
        }
    }
}

/// Opens the function at `address` and picks its transport by PCI id: a tlsaccel card, or
/// the simulator behind an ivshmem device.
pub fn open(address: &str) -> Result<Arc<dyn Transport>, TransportError> {
    let pci = VfioPci::open(address)?;
    let (vendor, device) = pci.ids()?;
    if (vendor, device) == (shm::IVSHMEM_VENDOR_ID, shm::IVSHMEM_DEVICE_ID) {
        return Ok(Arc::new(IvshmemTransport::new(pci)?));
    }
    Ok(Arc::new(VfioTransport::new(pci)?))
}

/// A tlsaccel card through kernel VFIO.
#[derive(Debug)]
pub struct VfioTransport {
    pci: VfioPci,
    bar0: Bar,
    vectors: Vec<Arc<EventFd>>,
}

impl VfioTransport {
    /// Takes over an opened function: maps BAR0 and enables one MSI-X vector per queue.
    pub fn new(pci: VfioPci) -> Result<Self, TransportError> {
        let (vendor, device) = pci.ids()?;
        if (vendor, device) != (tlsaccel_abi::PCI_VENDOR_ID, tlsaccel_abi::PCI_DEVICE_ID) {
            tracing::warn!(
                address = pci.address(),
                "PCI id {vendor:04x}:{device:04x} is not tlsaccel's; trusting the registers"
            );
        }
        let bar0 = pci.map_bar(0)?;
        let queues = bar0
            .read32(tlsaccel_abi::regs::NUM_QUEUES)
            .min(tlsaccel_abi::regs::MAX_QUEUES);
        let vectors = make_vectors(queues.min(pci.msix_vectors()))?;
        pci.enable_msix(&vectors)?;
        Ok(Self { pci, bar0, vectors })
    }
}

fn make_vectors(count: u32) -> Result<Vec<Arc<EventFd>>, TransportError> {
    (0..count).map(|_| EventFd::new().map(Arc::new)).collect()
}

impl DmaMapper for VfioTransport {
    fn map(&self, region: &Arc<DmaRegion>, iova: Iova) -> Result<(), DmaError> {
        self.pci
            .dma_map(region, iova)
            .map_err(|e| DmaError::Map(Box::new(e)))
    }

    fn unmap(&self, iova: Iova, len: usize) -> Result<(), DmaError> {
        self.pci
            .dma_unmap(iova, len)
            .map_err(|e| DmaError::Map(Box::new(e)))
    }
}

impl Transport for VfioTransport {
    fn name(&self) -> String {
        format!("vfio:{}", self.pci.address())
    }
    fn read32(&self, offset: u64) -> u32 {
        self.bar0.read32(offset)
    }
    fn write32(&self, offset: u64, value: u32) {
        self.bar0.write32(offset, value)
    }
    fn read64(&self, offset: u64) -> u64 {
        self.bar0.read64(offset)
    }
    fn write64(&self, offset: u64, value: u64) {
        self.bar0.write64(offset, value)
    }
    fn interrupt(&self, vector: u32) -> Result<Arc<EventFd>, TransportError> {
        self.vectors
            .get(vector as usize)
            .cloned()
            .ok_or(TransportError::NoSuchVector(vector))
    }
    fn reset(&self) -> Result<(), TransportError> {
        Ok(self.pci.reset()?)
    }
}

/// How long a mailbox request may take before the device is declared lost.
const MAILBOX_TIMEOUT: Duration = Duration::from_secs(5);

/// The simulator behind QEMU's ivshmem-doorbell device (shared-memory mode).
#[derive(Debug)]
pub struct IvshmemTransport {
    /// Held open: the BAR mappings and interrupts live as long as the function is open.
    _pci: VfioPci,
    memory: Bar,
    mailbox: Arc<Mailbox>,
    data: (u64, u64),
    iova_base: u64,
    vectors: Vec<Arc<EventFd>>,
}

impl IvshmemTransport {
    /// Takes over an opened ivshmem function: maps its registers and shared memory, checks
    /// the simulator's header, and enables its MSI-X vectors.
    pub fn new(pci: VfioPci) -> Result<Self, TransportError> {
        let regs = pci.map_bar(0)?;
        let memory = pci.map_bar(2)?;
        let not_ours = |why: &str| -> TransportError {
            VfioError::NotOurs(format!("{}: {why}", pci.address())).into()
        };
        let header = DmaRegion::window(Arc::clone(memory.mapping()), 0, shm::DATA_OFFSET as usize)
            .map_err(|_| not_ours("shared memory is smaller than the tlsaccel header"))?;
        let word = |at: usize| header.load_u32_acquire(at).unwrap_or(0);
        let quad = |at: usize| {
            let mut raw = [0u8; 8];
            header
                .read(at, &mut raw)
                .map(|()| u64::from_le_bytes(raw))
                .unwrap_or(0)
        };
        if word(shm::HDR_MAGIC) != shm::MAGIC {
            return Err(not_ours(
                "no tlsaccel simulator behind this ivshmem device (bad magic)",
            ));
        }
        if word(shm::HDR_VERSION) != shm::VERSION {
            return Err(not_ours("unsupported shared-memory layout version"));
        }
        let (data_offset, data_size) = (quad(shm::HDR_DATA_OFFSET), quad(shm::HDR_DATA_SIZE));
        if data_offset < shm::DATA_OFFSET
            || data_offset
                .checked_add(data_size)
                .is_none_or(|end| end > memory.len() as u64)
        {
            return Err(not_ours(
                "the header's data area does not fit the shared memory",
            ));
        }
        let wanted = word(shm::HDR_VECTORS).min(pci.msix_vectors());
        let vectors = make_vectors(wanted)?;
        pci.enable_msix(&vectors)?;
        regs.write32(shm::IVSHMEM_INTR_MASK, 0xffff_ffff);
        let (device_peer, answered) = (word(shm::HDR_DEVICE_PEER), word(shm::MBOX_RESPONSE_SEQ));
        let iova_base = quad(shm::HDR_IOVA_BASE);
        let mailbox = Arc::new(Mailbox {
            name: format!("vfio:{}", pci.address()),
            device_peer,
            sequence: Mutex::new(answered),
            regs,
            header,
            lost: AtomicBool::new(false),
        });
        Ok(Self {
            data: (data_offset, data_size),
            iova_base,
            _pci: pci,
            memory,
            mailbox,
            vectors,
        })
    }
}

/// The register mailbox of shared-memory mode: every BAR0 access, and the IOMMU's map and
/// unmap, go through it one request at a time.
#[derive(Debug)]
struct Mailbox {
    name: String,
    regs: Bar,
    header: DmaRegion,
    device_peer: u32,
    sequence: Mutex<u32>,
    lost: AtomicBool,
}

impl Mailbox {
    /// One request. A device that does not answer is lost: this and every later request
    /// returns all-ones, as a PCIe read of a missing device does.
    fn request(&self, op: u32, offset: u64, value: u64) -> u64 {
        if self.lost.load(Ordering::Acquire) {
            return u64::MAX;
        }
        let mut sequence = self.sequence.lock().unwrap_or_else(|e| e.into_inner());
        let next = sequence.wrapping_add(1);
        let h = &self.header;
        let posted = h
            .write(shm::MBOX_OP, &op.to_le_bytes())
            .and_then(|()| h.write(shm::MBOX_OFFSET, &offset.to_le_bytes()))
            .and_then(|()| h.write(shm::MBOX_VALUE, &value.to_le_bytes()))
            .and_then(|()| h.store_u32_release(shm::MBOX_REQUEST_SEQ, next));
        if posted.is_err() {
            self.lost.store(true, Ordering::Release);
            return u64::MAX;
        }
        *sequence = next;
        self.regs.write32(
            shm::IVSHMEM_DOORBELL,
            self.device_peer << 16 | u32::from(shm::MAILBOX_VECTOR),
        );
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            if h.load_u32_acquire(shm::MBOX_RESPONSE_SEQ).ok() == Some(next) {
                let mut raw = [0u8; 8];
                return match h.read(shm::MBOX_RESULT, &mut raw) {
                    Ok(()) => u64::from_le_bytes(raw),
                    Err(_) => u64::MAX,
                };
            }
            spins += 1;
            if spins.is_multiple_of(256) {
                if start.elapsed() > MAILBOX_TIMEOUT {
                    tracing::error!(device = %self.name, "register mailbox timed out; device lost");
                    self.lost.store(true, Ordering::Release);
                    return u64::MAX;
                }
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Lets the device reach `len` bytes at `iova` (which the caller checked lie in the data
    /// area).
    fn map(&self, iova: Iova, len: usize) -> Result<(), DmaError> {
        self.window(shm::OP_MAP, "map", iova, len)
    }

    /// Takes the window at `iova` back; returns once the device has let go of it.
    fn unmap(&self, iova: Iova, len: usize) -> Result<(), DmaError> {
        self.window(shm::OP_UNMAP, "unmap", iova, len)
    }

    fn window(&self, op: u32, what: &str, iova: Iova, len: usize) -> Result<(), DmaError> {
        match self.request(op, iova.0, len as u64) {
            0 => Ok(()),
            _ => Err(DmaError::Map(
                format!(
                    "{}: the device refused to {what} {len} bytes at {iova} (or is lost)",
                    self.name
                )
                .into(),
            )),
        }
    }
}

/// Where `len` bytes at `iova` lie in the data area `(offset, size)` of shared memory seen at
/// `iova_base`, or `None` outside it.
fn data_window(data: (u64, u64), iova_base: u64, iova: Iova, len: usize) -> Option<u64> {
    let offset = iova.0.checked_sub(iova_base)?;
    let end = offset.checked_add(len as u64)?;
    (len > 0 && offset >= data.0 && end <= data.0 + data.1).then_some(offset)
}

/// DMA regions carved from the shared BAR's data area, each mapped for the device through
/// the mailbox while the pool has it.
#[derive(Debug)]
struct BarWindows {
    memory: Bar,
    mailbox: Arc<Mailbox>,
    data: (u64, u64),
    iova_base: u64,
}

impl RegionSource for BarWindows {
    fn region(&self, index: usize, size: usize) -> Result<(Arc<DmaRegion>, Iova), DmaError> {
        let (start, len) = self.data;
        let offset = (index as u64)
            .checked_mul(size as u64)
            .and_then(|o| o.checked_add(start))
            .filter(|o| o + size as u64 <= start + len)
            .ok_or(DmaError::Exhausted {
                limit: len as usize,
            })?;
        let region = DmaRegion::window(Arc::clone(self.memory.mapping()), offset as usize, size)?;
        let iova = Iova(self.iova_base + offset);
        self.mailbox.map(iova, size)?;
        Ok((Arc::new(region), iova))
    }

    fn release(&self, _index: usize, region: &Arc<DmaRegion>, iova: Iova) {
        if let Err(error) = self.mailbox.unmap(iova, region.len()) {
            tracing::warn!(%iova, %error, "could not unmap a shared-memory window");
        }
    }

    fn capacity(&self, size: usize) -> Option<usize> {
        Some((self.data.1 / size.max(1) as u64) as usize)
    }
}

impl DmaMapper for IvshmemTransport {
    // The device reaches only windows of the BAR's data area: `region` must be the window of
    // shared memory that the device sees at `iova`.
    fn map(&self, region: &Arc<DmaRegion>, iova: Iova) -> Result<(), DmaError> {
        let offset =
            data_window(self.data, self.iova_base, iova, region.len()).ok_or_else(|| {
                DmaError::Map(
                    format!(
                        "{iova} is outside the shared memory's data area; in shared-memory mode \
                     the device reaches nothing else"
                    )
                    .into(),
                )
            })?;
        if !region.is_window_of(self.memory.mapping(), offset as usize) {
            return Err(DmaError::Map(
                "in shared-memory mode only windows of the shared memory can be mapped".into(),
            ));
        }
        self.mailbox.map(iova, region.len())
    }
    fn unmap(&self, iova: Iova, len: usize) -> Result<(), DmaError> {
        self.mailbox.unmap(iova, len)
    }
}

impl Transport for IvshmemTransport {
    fn name(&self) -> String {
        self.mailbox.name.clone()
    }
    fn read32(&self, offset: u64) -> u32 {
        self.mailbox.request(shm::OP_READ32, offset, 0) as u32
    }
    fn write32(&self, offset: u64, value: u32) {
        self.mailbox
            .request(shm::OP_WRITE32, offset, u64::from(value));
    }
    fn read64(&self, offset: u64) -> u64 {
        self.mailbox.request(shm::OP_READ64, offset, 0)
    }
    fn write64(&self, offset: u64, value: u64) {
        self.mailbox.request(shm::OP_WRITE64, offset, value);
    }
    fn interrupt(&self, vector: u32) -> Result<Arc<EventFd>, TransportError> {
        self.vectors
            .get(vector as usize)
            .cloned()
            .ok_or(TransportError::NoSuchVector(vector))
    }
    fn is_lost(&self) -> bool {
        self.mailbox.lost.load(Ordering::Acquire)
    }
    fn region_source(&self) -> Option<Arc<dyn RegionSource>> {
        Some(Arc::new(BarWindows {
            memory: self.memory.clone(),
            mailbox: Arc::clone(&self.mailbox),
            data: self.data,
            iova_base: self.iova_base,
        }))
    }
    fn reset(&self) -> Result<(), TransportError> {
        self.write32(
            tlsaccel_abi::regs::DEVICE_CONTROL,
            tlsaccel_abi::DeviceControl::RESET.bits(),
        );
        if self.is_lost() {
            return Err(TransportError::Lost(self.name()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_windows_must_lie_in_the_data_area() {
        // Data area at offset 0x10000, 1 MiB, seen at IOVA 0x1_0000_0000 + offset.
        let (data, base) = ((0x10000, 1 << 20), 0x1_0000_0000);
        let at = |iova: u64, len| data_window(data, base, Iova(iova), len);
        assert_eq!(at(base + 0x10000, 4096), Some(0x10000));
        assert_eq!(
            at(base + 0x10000 + (1 << 20) - 4096, 4096),
            Some(0x10000 + (1 << 20) - 4096)
        );
        assert_eq!(at(base, 4096), None, "the header");
        assert_eq!(
            at(base + 0x10000 + (1 << 20) - 4096, 8192),
            None,
            "past the end"
        );
        assert_eq!(at(base + 0x10000, 0), None, "empty");
        assert_eq!(at(base - 4096, 4096), None, "below the shared memory");
        assert_eq!(at(u64::MAX - 10, 100), None, "overflow");
    }

    #[test]
    fn pci_addresses_are_checked() {
        assert!(valid_pci_address("0000:03:00.0"));
        assert!(valid_pci_address("abcd:ef:1f.7"));
        assert!(!valid_pci_address("0000:03:00"));
        assert!(!valid_pci_address("0000-03:00.0"));
        assert!(!valid_pci_address("0000:0g:00.0"));
        assert!(!valid_pci_address("../../etc/x"));
    }

    #[test]
    fn reserved_regions_parse() {
        let text = "0x00000000fee00000 0x00000000feefffff msi\n0x00000000000a0000 0x00000000000bffff direct-relaxable\nnonsense\n";
        let regions = parse_reserved_regions(text);
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[0].start, 0xfee0_0000);
        assert_eq!(regions[0].end, 0xfeef_ffff);
        assert_eq!(regions[0].kind, "msi");
    }

    #[test]
    fn opening_a_missing_or_unbound_function_says_why() {
        let error = VfioPci::open_in("0000:99:00.0", Path::new("/nonexistent")).unwrap_err();
        assert!(matches!(error, VfioError::NoSuchDevice(..)), "{error}");
        assert!(matches!(
            VfioPci::open_in("nonsense", Path::new("/sys")).unwrap_err(),
            VfioError::BadAddress(_)
        ));
    }
}
