//! The simulator as a separate process behind QEMU's `ivshmem-doorbell` device
//! (`tlsaccel sim --ivshmem PATH`).
//!
//! It is the ivshmem server (the small protocol of QEMU's `docs/specs/ivshmem-spec`: protocol
//! version, peer id, the shared-memory fd, then every peer's interrupt eventfds) and at the
//! same time the device peer (id 0): it lays out the shared memory (`abi::ivshmem`), maps it
//! into the simulated device's IOMMU, serves register requests from the mailbox when the
//! guest rings its vector 0, and signals the guest's vector *q* for queue *q*'s completions.
//! One guest at a time; when it disconnects the device is reset for the next.

use std::io::{IoSlice, Read};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use tlsaccel_driver::abi::ivshmem as shm;
use tlsaccel_driver::transport::EventFd;
use tlsaccel_shm::{SharedRegion, ShmError};
use tlsaccel_sim::{Device, DeviceConfig, HostMemory, InterruptSink};

/// Errors of the simulator server.
#[derive(Debug, thiserror::Error)]
pub enum SimServerError {
    #[error("shared memory size {0} must be a power of two of at least 1 MiB")]
    MemorySize(usize),
    #[error("cannot create the shared memory")]
    Memory(#[source] ShmError),
    #[error("cannot start the simulated device")]
    Device(#[source] tlsaccel_sim::ConfigError),
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ivshmem client connection failed")]
    Client(#[source] std::io::Error),
    #[error("cannot create an eventfd")]
    EventFd(#[source] tlsaccel_driver::TransportError),
}

/// The ivshmem protocol version QEMU speaks.
const PROTOCOL_VERSION: i64 = 0;
/// The device's own peer id; guests get ids from 1.
const DEVICE_PEER: u16 = 0;

/// The simulator behind an ivshmem server socket.
#[derive(Debug)]
pub struct IvshmemServer {
    listener: UnixListener,
    path: PathBuf,
    memory: Arc<SharedRegion>,
    device: Arc<Device>,
    vectors: u32,
    doorbells: Vec<Arc<EventFd>>,
}

impl IvshmemServer {
    /// Creates the shared memory and the device and listens on `path` (replacing a stale
    /// socket file).
    pub fn bind(
        path: &Path,
        memory_size: usize,
        config: DeviceConfig,
    ) -> Result<Self, SimServerError> {
        if !memory_size.is_power_of_two() || memory_size < (1 << 20) {
            return Err(SimServerError::MemorySize(memory_size));
        }
        let memory = Arc::new(SharedRegion::new(memory_size).map_err(SimServerError::Memory)?);
        let vectors = config.queues;
        // The device reaches no shared memory until a guest maps windows of the data area
        // through the mailbox (device-spec §11).
        let device = Arc::new(Device::new(config).map_err(SimServerError::Device)?);
        write_header(&memory, vectors).map_err(SimServerError::Memory)?;
        let doorbells = eventfds(vectors)?;
        let listener = listen(path)?;
        Ok(Self {
            listener,
            path: path.to_owned(),
            memory,
            device,
            vectors,
            doorbells,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The simulated device (for tests and fault injection).
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The device function, for the control socket.
    pub fn functions(&self) -> crate::simcontrol::Functions {
        let functions = crate::simcontrol::Functions::default();
        functions.register(&self.device);
        functions
    }

    /// Serves guests one after another until `stop` is set or accepting fails.
    pub fn run(&self, stop: &AtomicBool) -> Result<(), SimServerError> {
        let mut next_id: u16 = 1;
        self.listener
            .set_nonblocking(true)
            .map_err(SimServerError::Client)?;
        while !stop.load(Ordering::Acquire) {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    stream
                        .set_nonblocking(false)
                        .map_err(SimServerError::Client)?;
                    if let Err(error) = self.serve(stream, next_id, stop) {
                        tracing::warn!(%error, "ivshmem guest session ended with an error");
                    }
                    next_id = next_id.checked_add(1).unwrap_or(1);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(SimServerError::Client(e)),
            }
        }
        Ok(())
    }

    /// One guest: hand it the memory and eventfds, serve its mailbox until it disconnects.
    fn serve(
        &self,
        mut stream: UnixStream,
        id: u16,
        stop: &AtomicBool,
    ) -> Result<(), SimServerError> {
        let io = SimServerError::Client;
        send(&stream, PROTOCOL_VERSION, None).map_err(io)?;
        send(&stream, i64::from(id), None).map_err(io)?;
        let (memory_fd, _) = self
            .memory
            .fd()
            .ok_or_else(|| io(std::io::ErrorKind::Unsupported.into()))?;
        send(&stream, -1, Some(memory_fd)).map_err(io)?;
        for doorbell in &self.doorbells {
            send(&stream, i64::from(DEVICE_PEER), Some(doorbell.as_fd())).map_err(io)?;
        }
        let guest_vectors = eventfds(self.vectors)?;
        for vector in &guest_vectors {
            send(&stream, i64::from(id), Some(vector.as_fd())).map_err(io)?;
        }
        for (queue, vector) in guest_vectors.iter().enumerate() {
            self.device.set_interrupt(
                queue as u32,
                Some(Arc::clone(vector) as Arc<dyn InterruptSink>),
            );
        }
        // Windows an earlier guest mapped are not this guest's.
        self.device.iommu().clear();
        tracing::info!(id, "ivshmem guest connected");

        let done = AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| self.serve_mailbox(&done, stop));
            // The guest never sends anything; a read returns when it goes away.
            let mut byte = [0u8; 1];
            let _ = stream.read(&mut byte);
            done.store(true, Ordering::Release);
        });
        tracing::info!(id, "ivshmem guest disconnected; resetting the device");
        for queue in 0..self.vectors {
            self.device.set_interrupt(queue, None);
        }
        self.device.bar_write32(
            tlsaccel_driver::abi::regs::DEVICE_CONTROL,
            tlsaccel_driver::abi::DeviceControl::RESET.bits(),
        );
        self.device.iommu().clear();
        Ok(())
    }

    /// Answers register requests whenever the guest rings vector 0.
    fn serve_mailbox(&self, done: &AtomicBool, stop: &AtomicBool) {
        let doorbell = &self.doorbells[usize::from(shm::MAILBOX_VECTOR)];
        let mut answered = self
            .memory
            .load_u32_acquire(shm::MBOX_RESPONSE_SEQ)
            .unwrap_or(0);
        while !done.load(Ordering::Acquire) && !stop.load(Ordering::Acquire) {
            let mut fds = [PollFd::new(doorbell.as_ref(), PollFlags::IN)];
            let timeout = Timespec {
                tv_sec: 0,
                tv_nsec: 100_000_000,
            };
            if poll(&mut fds, Some(&timeout)).is_err() {
                continue;
            }
            doorbell.drain();
            // Answer whatever request is pending, even without a ring (a ring may have been
            // coalesced with an earlier one).
            if let Some(sequence) = self.answer(answered) {
                answered = sequence;
            }
        }
    }

    /// Lets the device reach `len` bytes of the data area at `iova` (mailbox `OP_MAP`).
    fn map_window(&self, iova: u64, len: u64) -> u64 {
        let data = shm::IOVA_BASE + shm::DATA_OFFSET..shm::IOVA_BASE + self.memory.len() as u64;
        let inside = iova >= data.start && iova.checked_add(len).is_some_and(|end| end <= data.end);
        if !inside {
            tracing::warn!(
                iova,
                len,
                "ivshmem guest mapped a window outside the data area"
            );
            return shm::REFUSED;
        }
        let memory = Arc::clone(&self.memory) as Arc<dyn HostMemory>;
        match self
            .device
            .iommu()
            .map(iova, len, memory, iova - shm::IOVA_BASE)
        {
            Ok(()) => 0,
            Err(error) => {
                tracing::warn!(%error, "ivshmem guest mapped a window the device refused");
                shm::REFUSED
            }
        }
    }

    fn answer(&self, answered: u32) -> Option<u32> {
        let m = &self.memory;
        let sequence = m.load_u32_acquire(shm::MBOX_REQUEST_SEQ).ok()?;
        if sequence == answered {
            return None;
        }
        let word = |at| m.load_u32_acquire(at).unwrap_or(0);
        let quad = |at| {
            let mut raw = [0u8; 8];
            m.read(at, &mut raw)
                .map(|()| u64::from_le_bytes(raw))
                .unwrap_or(0)
        };
        let (op, offset, value) = (
            word(shm::MBOX_OP),
            quad(shm::MBOX_OFFSET),
            quad(shm::MBOX_VALUE),
        );
        let d = &self.device;
        let result = match op {
            shm::OP_READ32 => u64::from(d.bar_read32(offset)),
            shm::OP_WRITE32 => {
                d.bar_write32(offset, value as u32);
                0
            }
            shm::OP_READ64 => d.bar_read64(offset),
            shm::OP_WRITE64 => {
                d.bar_write64(offset, value);
                0
            }
            shm::OP_MAP => self.map_window(offset, value),
            shm::OP_UNMAP => match d.iommu().unmap(offset, value) {
                Ok(()) => 0,
                Err(error) => {
                    tracing::warn!(%error, "ivshmem guest unmapped a window it had not mapped");
                    shm::REFUSED
                }
            },
            _ => shm::REFUSED,
        };
        m.write(shm::MBOX_RESULT, &result.to_le_bytes()).ok()?;
        m.store_u32_release(shm::MBOX_RESPONSE_SEQ, sequence).ok()?;
        Some(sequence)
    }
}

impl Drop for IvshmemServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `count` interrupt eventfds.
fn eventfds(count: u32) -> Result<Vec<Arc<EventFd>>, SimServerError> {
    (0..count)
        .map(|_| EventFd::new().map(Arc::new))
        .collect::<Result<Vec<_>, _>>()
        .map_err(SimServerError::EventFd)
}

/// Listens on `path`, replacing a stale socket file.
fn listen(path: &Path) -> Result<UnixListener, SimServerError> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(|source| SimServerError::Listen {
        path: path.to_owned(),
        source,
    })
}

fn write_header(memory: &SharedRegion, vectors: u32) -> Result<(), ShmError> {
    let size = memory.len() as u64;
    memory.write(shm::HDR_VERSION, &shm::VERSION.to_le_bytes())?;
    memory.write(shm::HDR_DEVICE_PEER, &u32::from(DEVICE_PEER).to_le_bytes())?;
    memory.write(shm::HDR_VECTORS, &vectors.to_le_bytes())?;
    memory.write(shm::HDR_IOVA_BASE, &shm::IOVA_BASE.to_le_bytes())?;
    memory.write(shm::HDR_DATA_OFFSET, &shm::DATA_OFFSET.to_le_bytes())?;
    memory.write(shm::HDR_DATA_SIZE, &(size - shm::DATA_OFFSET).to_le_bytes())?;
    // The magic last: a guest that sees it sees the rest.
    memory.store_u32_release(shm::HDR_MAGIC, shm::MAGIC)
}

/// Sends one ivshmem protocol message: a little-endian 64-bit value, optionally with a file
/// descriptor.
fn send(stream: &UnixStream, value: i64, fd: Option<BorrowedFd<'_>>) -> std::io::Result<()> {
    let bytes = value.to_le_bytes();
    let payload = [IoSlice::new(&bytes)];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut ancillary = SendAncillaryBuffer::new(&mut space);
    let fds;
    if let Some(fd) = fd {
        fds = [fd];
        if !ancillary.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(std::io::ErrorKind::OutOfMemory.into());
        }
    }
    let sent = sendmsg(stream, &payload, &mut ancillary, SendFlags::empty())?;
    if sent != bytes.len() {
        return Err(std::io::ErrorKind::WriteZero.into());
    }
    Ok(())
}

/// The simulator served over vfio-user (`tlsaccel sim --vfio-user PATH`).
///
/// Each connection gets a device function of its own (like an SR-IOV virtual function): a
/// fresh simulated device with the configured queues and key slots, reset when the connection
/// closes. `clients` connections are served at once; more wait in the listen queue.
#[derive(Debug)]
pub struct VfioUserServer {
    listener: UnixListener,
    path: PathBuf,
    config: DeviceConfig,
    clients: usize,
    functions: crate::simcontrol::Functions,
}

impl VfioUserServer {
    /// Listens on `path` (replacing a stale socket file).
    pub fn bind(path: &Path, config: DeviceConfig, clients: usize) -> Result<Self, SimServerError> {
        let listener = listen(path)?;
        Ok(Self {
            listener,
            path: path.to_owned(),
            config,
            clients: clients.max(1),
            functions: crate::simcontrol::Functions::default(),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The live device functions, for the control socket.
    pub fn functions(&self) -> crate::simcontrol::Functions {
        self.functions.clone()
    }

    /// Serves connections until the process ends.
    pub fn run(&self) -> Result<(), SimServerError> {
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..self.clients)
                .map(|_| scope.spawn(|| self.worker()))
                .collect();
            for worker in workers {
                worker.join().unwrap_or(Ok(()))?;
            }
            Ok(())
        })
    }

    fn worker(&self) -> Result<(), SimServerError> {
        loop {
            let listener = self.listener.try_clone().map_err(SimServerError::Client)?;
            let device =
                Arc::new(Device::new(self.config.clone()).map_err(SimServerError::Device)?);
            self.functions.register(&device);
            // BAR0's doorbell pages are memory the client maps and writes directly; the
            // device polls them there. The rest of BAR0 goes through messages.
            let bar0_size = regs_bar0_size(self.config.queues);
            let bar0 = SharedRegion::new(bar0_size as usize).map_err(SimServerError::Memory)?;
            let doorbell_bytes =
                u64::from(self.config.queues) * tlsaccel_driver::abi::regs::DOORBELL_STRIDE;
            let doorbells = bar0
                .subregion(
                    tlsaccel_driver::abi::regs::DOORBELL_BASE as usize,
                    doorbell_bytes as usize,
                )
                .map_err(SimServerError::Memory)?;
            device.place_doorbells(Arc::new(doorbells));
            let mmap_fd = bar0
                .fd()
                .map(|(fd, _)| std::os::fd::AsRawFd::as_raw_fd(&fd));
            let server = vfio_user::Server::from_owned_fd(
                std::os::fd::OwnedFd::from(listener),
                true,
                vfio_user_irqs(self.config.queues),
                vfio_user_regions(bar0_size, doorbell_bytes, mmap_fd),
            );
            let mut backend = VfioUserBackend {
                device,
                config_space: config_space(),
            };
            match server.run(&mut backend) {
                Ok(()) => tracing::info!("vfio-user client disconnected"),
                Err(error) => tracing::warn!(%error, "vfio-user client session failed"),
            }
            // The device (and the memory its doorbells live in) go with the connection.
            drop(backend);
            drop(bar0);
        }
    }
}

impl Drop for VfioUserServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn regs_bar0_size(queues: u32) -> u64 {
    tlsaccel_driver::abi::regs::bar0_size(queues)
}

/// The nine regions of a vfio PCI device, by position: BAR0 with the register map (its
/// doorbell pages mmap-able from `mmap_fd`), config space, the rest empty.
fn vfio_user_regions(
    bar0_size: u64,
    doorbell_bytes: u64,
    mmap_fd: Option<std::os::fd::RawFd>,
) -> Vec<vfio_user::ServerRegion> {
    use vfio_bindings::bindings::vfio::{
        vfio_region_info, vfio_region_sparse_mmap_area, VFIO_PCI_BAR0_REGION_INDEX,
        VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_NUM_REGIONS, VFIO_REGION_INFO_FLAG_MMAP,
        VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
    };
    (0..VFIO_PCI_NUM_REGIONS)
        .map(|index| {
            let size = match index {
                VFIO_PCI_BAR0_REGION_INDEX => bar0_size,
                VFIO_PCI_CONFIG_REGION_INDEX => CONFIG_SPACE_SIZE as u64,
                _ => 0,
            };
            let mut flags = if size > 0 {
                VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE
            } else {
                0
            };
            let bar0 = index == VFIO_PCI_BAR0_REGION_INDEX && mmap_fd.is_some();
            if bar0 {
                flags |= VFIO_REGION_INFO_FLAG_MMAP;
            }
            vfio_user::ServerRegion {
                region_info: vfio_region_info {
                    argsz: std::mem::size_of::<vfio_region_info>() as u32,
                    flags,
                    index,
                    cap_offset: 0,
                    size,
                    offset: 0,
                },
                sparse_areas: if bar0 {
                    vec![vfio_user::SparseArea {
                        area: vfio_region_sparse_mmap_area {
                            offset: tlsaccel_driver::abi::regs::DOORBELL_BASE,
                            size: doorbell_bytes,
                        },
                    }]
                } else {
                    Vec::new()
                },
                mmap_fd: if bar0 { mmap_fd } else { None },
            }
        })
        .collect()
}

/// INTx, MSI, MSI-X, ERR, REQ by position; only MSI-X has vectors, one per queue.
fn vfio_user_irqs(queues: u32) -> Vec<vfio_user::IrqInfo> {
    use vfio_bindings::bindings::vfio::{VFIO_IRQ_INFO_EVENTFD, VFIO_PCI_MSIX_IRQ_INDEX};
    (0..5)
        .map(|index| vfio_user::IrqInfo {
            index,
            flags: VFIO_IRQ_INFO_EVENTFD,
            count: if index == VFIO_PCI_MSIX_IRQ_INDEX {
                queues
            } else {
                0
            },
        })
        .collect()
}

const CONFIG_SPACE_SIZE: usize = 256;

/// A minimal type-0 config header: tlsaccel's ids, class "other encryption controller".
fn config_space() -> [u8; CONFIG_SPACE_SIZE] {
    let mut config = [0u8; CONFIG_SPACE_SIZE];
    config[0..2].copy_from_slice(&tlsaccel_driver::abi::PCI_VENDOR_ID.to_le_bytes());
    config[2..4].copy_from_slice(&tlsaccel_driver::abi::PCI_DEVICE_ID.to_le_bytes());
    config[0x0a] = 0x80; // subclass: other
    config[0x0b] = 0x10; // class: encryption controller
    config
}

/// One connection's device function.
struct VfioUserBackend {
    device: Arc<Device>,
    config_space: [u8; CONFIG_SPACE_SIZE],
}

/// An interrupt eventfd the client sent.
#[derive(Debug)]
struct EventFile(std::fs::File);

impl InterruptSink for EventFile {
    fn signal(&self) {
        let _ = rustix::io::write(&self.0, &1u64.to_ne_bytes());
    }
}

impl vfio_user::ServerBackend for VfioUserBackend {
    // Register accesses never fail: the crate's client does not read error replies, so an
    // error here would desynchronise it. Bytes outside a region read as all-ones.
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> std::io::Result<()> {
        use vfio_bindings::bindings::vfio::{
            VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX,
        };
        data.fill(0xff);
        let inside_bar0 = offset
            .checked_add(data.len() as u64)
            .is_some_and(|end| end <= self.device.bar0_size());
        match (region, data.len()) {
            (VFIO_PCI_BAR0_REGION_INDEX, _) if !inside_bar0 => {}
            (VFIO_PCI_BAR0_REGION_INDEX, 4) => {
                data.copy_from_slice(&self.device.bar_read32(offset).to_le_bytes())
            }
            (VFIO_PCI_BAR0_REGION_INDEX, 8) => {
                data.copy_from_slice(&self.device.bar_read64(offset).to_le_bytes())
            }
            (VFIO_PCI_CONFIG_REGION_INDEX, len) => {
                let start = usize::try_from(offset).unwrap_or(usize::MAX);
                if let Some(bytes) = self.config_space.get(start..start.saturating_add(len)) {
                    data.copy_from_slice(bytes);
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> std::io::Result<()> {
        use vfio_bindings::bindings::vfio::VFIO_PCI_BAR0_REGION_INDEX;
        let inside_bar0 = offset
            .checked_add(data.len() as u64)
            .is_some_and(|end| end <= self.device.bar0_size());
        if region == VFIO_PCI_BAR0_REGION_INDEX && inside_bar0 {
            match <[u8; 4]>::try_from(data) {
                Ok(word) => self.device.bar_write32(offset, u32::from_le_bytes(word)),
                Err(_) => {
                    if let Ok(quad) = <[u8; 8]>::try_from(data) {
                        self.device.bar_write64(offset, u64::from_le_bytes(quad));
                    }
                }
            }
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        _flags: vfio_user::DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<std::fs::File>,
    ) -> std::io::Result<()> {
        let invalid =
            |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, why.to_owned());
        let fd = fd.ok_or_else(|| invalid("DMA map without a file descriptor"))?;
        let len = usize::try_from(size).map_err(|_| invalid("DMA map too large"))?;
        // `from_fd_at` refuses memory the client could truncate under the device's mapping
        // (not sealed against shrinking) or that is smaller than the range: either would let
        // the client crash this process with SIGBUS. The refusal is the error reply.
        let region = SharedRegion::from_fd_at(fd.into(), offset, len)
            .map_err(|e| invalid(&format!("DMA map refused: {e}")))?;
        self.device
            .iommu()
            .map(address, size, Arc::new(region) as Arc<dyn HostMemory>, 0)
            .map_err(|e| {
                tracing::warn!(%e, "vfio-user DMA map refused");
                std::io::Error::other(e.to_string())
            })
    }

    fn dma_unmap(
        &mut self,
        _flags: vfio_user::DmaUnmapFlags,
        address: u64,
        size: u64,
    ) -> std::io::Result<()> {
        // Unmapping what is not mapped succeeds and unmaps nothing, as kernel VFIO's type1
        // answers it. An error here would get no reply at all from the vfio_user crate's
        // server loop, and its client would wait for one forever.
        if let Err(error) = self.device.iommu().unmap(address, size) {
            tracing::warn!(%error, "vfio-user client unmapped a range it had not mapped");
        }
        Ok(())
    }

    fn reset(&mut self) -> std::io::Result<()> {
        // A function reset leaves the IOMMU alone: the client's mappings stay.
        self.device.bar_write32(
            tlsaccel_driver::abi::regs::DEVICE_CONTROL,
            tlsaccel_driver::abi::DeviceControl::RESET.bits(),
        );
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        _flags: u32,
        start: u32,
        count: u32,
        fds: Vec<std::fs::File>,
    ) -> std::io::Result<()> {
        if index != vfio_bindings::bindings::vfio::VFIO_PCI_MSIX_IRQ_INDEX {
            return Ok(());
        }
        if fds.is_empty() {
            for vector in start..start.saturating_add(count) {
                self.device.set_interrupt(vector, None);
            }
            return Ok(());
        }
        for (i, file) in fds.into_iter().enumerate() {
            let vector = start.saturating_add(i as u32);
            self.device.set_interrupt(
                vector,
                Some(Arc::new(EventFile(file)) as Arc<dyn InterruptSink>),
            );
        }
        Ok(())
    }
}

impl Drop for VfioUserBackend {
    fn drop(&mut self) {
        // The device and its key table go with the connection; zeroize first.
        self.device.bar_write32(
            tlsaccel_driver::abi::regs::DEVICE_CONTROL,
            tlsaccel_driver::abi::DeviceControl::RESET.bits(),
        );
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;

    use rustix::fs::{fcntl_add_seals, ftruncate, memfd_create, MemfdFlags, SealFlags};
    use vfio_user::ServerBackend;

    use super::*;

    fn backend() -> VfioUserBackend {
        VfioUserBackend {
            device: Arc::new(Device::new(DeviceConfig::default()).unwrap()),
            config_space: config_space(),
        }
    }

    fn memfd(len: u64, seals: SealFlags) -> std::fs::File {
        let fd = memfd_create(
            "tlsaccel-test",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .unwrap();
        ftruncate(&fd, len).unwrap();
        fcntl_add_seals(&fd, seals).unwrap();
        std::fs::File::from(fd)
    }

    fn dma_map(
        backend: &mut VfioUserBackend,
        fd: std::fs::File,
        offset: u64,
        size: u64,
    ) -> std::io::Result<()> {
        backend.dma_map(
            vfio_user::DmaMapFlags::READ_WRITE,
            offset,
            0x1_0000_0000,
            size,
            Some(fd),
        )
    }

    #[test]
    fn dma_map_refuses_memory_the_client_could_truncate() {
        let mut backend = backend();
        let error = dma_map(&mut backend, memfd(1 << 16, SealFlags::empty()), 0, 1 << 16)
            .expect_err("unsealed memory is refused");
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
        assert!(
            error.to_string().contains("not sealed against shrinking"),
            "{error}"
        );
        // Nothing was mapped: the device cannot reach the range.
        assert!(backend
            .device
            .iommu()
            .translate(0x1_0000_0000, 1 << 16)
            .is_err());
        // And unmapping it answers (with nothing unmapped) rather than leave the client
        // waiting for a reply.
        backend
            .dma_unmap(vfio_user::DmaUnmapFlags::empty(), 0x1_0000_0000, 1 << 16)
            .expect("an unmap of nothing succeeds");
    }

    #[test]
    fn dma_map_refuses_a_range_past_the_end_of_the_memory() {
        let mut backend = backend();
        let sealed = SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL;
        let error = dma_map(&mut backend, memfd(1 << 16, sealed), 1 << 12, 1 << 16)
            .expect_err("a range past the end is refused");
        assert!(
            error
                .to_string()
                .contains("shared memory of 65536 bytes cannot hold 65536 bytes at offset 4096"),
            "{error}"
        );
        // The same memory, asked for what it holds, is mapped.
        dma_map(&mut backend, memfd(1 << 16, sealed), 1 << 12, 1 << 15).unwrap();
        backend
            .device
            .iommu()
            .unmap(0x1_0000_0000, 1 << 15)
            .unwrap();
        // And memory from the driver's own regions (sealed memfds) is accepted as it is.
        let region = SharedRegion::new(1 << 20).unwrap();
        let (fd, _) = region.fd().unwrap();
        let fd: OwnedFd = fd.try_clone_to_owned().unwrap();
        backend
            .dma_map(
                vfio_user::DmaMapFlags::READ_WRITE,
                0,
                0x2_0000_0000,
                1 << 20,
                Some(fd.into()),
            )
            .unwrap();
    }

    /// Posts one mailbox request into the server's shared memory and has it answered, as a
    /// guest's request and doorbell would.
    fn request(server: &IvshmemServer, op: u32, offset: u64, value: u64) -> u64 {
        let m = &server.memory;
        let answered = m.load_u32_acquire(shm::MBOX_RESPONSE_SEQ).unwrap();
        m.write(shm::MBOX_OP, &op.to_le_bytes()).unwrap();
        m.write(shm::MBOX_OFFSET, &offset.to_le_bytes()).unwrap();
        m.write(shm::MBOX_VALUE, &value.to_le_bytes()).unwrap();
        m.store_u32_release(shm::MBOX_REQUEST_SEQ, answered + 1)
            .unwrap();
        assert_eq!(server.answer(answered), Some(answered + 1));
        let mut raw = [0u8; 8];
        m.read(shm::MBOX_RESULT, &mut raw).unwrap();
        u64::from_le_bytes(raw)
    }

    #[test]
    fn shared_memory_is_reachable_only_through_windows_the_guest_mapped() {
        let dir = std::env::temp_dir().join(format!("tlsaccel-ivshmem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let server = IvshmemServer::bind(&dir.join("sock"), 1 << 20, DeviceConfig::default())
            .expect("server");
        let data = shm::IOVA_BASE + shm::DATA_OFFSET;
        let iommu = server.device().iommu();
        // Nothing is reachable before a map: not the data area, not the header and mailbox.
        assert!(iommu.translate(data, 4096).is_err());
        assert!(iommu.translate(shm::IOVA_BASE, 64).is_err());

        assert_eq!(request(&server, shm::OP_MAP, data, 8192), 0);
        assert!(iommu.translate(data, 8192).is_ok());
        assert!(iommu.translate(data + 8192, 1).is_err(), "only the window");
        // Refused: the header, past the end, empty, overlapping, overflowing.
        for (iova, len) in [
            (shm::IOVA_BASE, 4096),
            (shm::IOVA_BASE + (1 << 20) - 4096, 8192),
            (data + 16384, 0),
            (data + 4096, 8192),
            (u64::MAX - 10, 100),
        ] {
            assert_eq!(
                request(&server, shm::OP_MAP, iova, len),
                shm::REFUSED,
                "map {iova:#x}+{len}"
            );
        }
        // Unmapping takes exactly what was mapped; the device then faults on it.
        assert_eq!(request(&server, shm::OP_UNMAP, data, 4096), shm::REFUSED);
        assert_eq!(request(&server, shm::OP_UNMAP, data, 8192), 0);
        assert!(iommu.translate(data, 4096).is_err());
        assert_eq!(request(&server, shm::OP_UNMAP, data, 8192), shm::REFUSED);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
