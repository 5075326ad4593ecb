//! The vfio-user backend: the device in another process (`tlsaccel sim --vfio-user PATH`),
//! reached over a Unix socket with the vfio-user protocol (the one QEMU 10.1 and later speak),
//! through the `vfio_user` crate's client.
//!
//! Register accesses are messages, except doorbells: when the server offers BAR0's doorbell
//! pages as a sparse mmap area, they are mapped and a doorbell is a store. DMA memory is
//! shared by passing each region's memfd with `DMA_MAP`; interrupts are eventfds handed over
//! with `SET_IRQS`. The crate's client has known
//! defects, worked around here: `resettable()` answers the opposite, so its value is inverted;
//! error replies are not checked, so the simulator's server never answers a register access
//! with an error (reads outside BAR0 return all-ones) and a broken connection is what marks the
//! device lost.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_PCI_BAR0_REGION_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX,
};

use tlsaccel_abi::regs::DOORBELL_BASE;

use crate::dma::{check_shared_memory, DmaError, DmaMapper, DmaRegion, Iova};
use crate::mmio::Bar;
use crate::transport::{EventFd, Transport, TransportError};

/// A device served over vfio-user.
///
/// When the connection breaks (the server process died) the device is lost; [`reset`]
/// then connects again at the same path, hands the new device function the same interrupt
/// eventfds and every DMA mapping the driver still has, so the driver's recovery brings the
/// device back without a new pool or new queues' memory.
///
/// [`reset`]: Transport::reset
pub struct VfioUserTransport {
    path: PathBuf,
    client: Mutex<vfio_user::Client>,
    /// BAR0's doorbell pages, mapped when the server offers them (a sparse mmap area); then a
    /// doorbell is a store into shared memory instead of a message. Replaced on reconnect.
    doorbells: RwLock<Option<Bar>>,
    vectors: Vec<Arc<EventFd>>,
    resettable: AtomicBool,
    lost: AtomicBool,
    /// Every DMA mapping made through this transport, by IOVA: replayed on reconnect.
    mappings: Mutex<BTreeMap<u64, Arc<DmaRegion>>>,
}

impl std::fmt::Debug for VfioUserTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioUserTransport")
            .field("path", &self.path)
            .field("vectors", &self.vectors.len())
            .field("lost", &self.lost)
            .finish()
    }
}

fn protocol(error: vfio_user::Error) -> TransportError {
    TransportError::VfioUser(Box::new(error))
}

impl VfioUserTransport {
    /// Connects to the server at `path`, checks it offers BAR0, and hands it one interrupt
    /// eventfd per MSI-X vector.
    pub fn connect(path: &Path) -> Result<Self, TransportError> {
        let mut client = vfio_user::Client::new(path).map_err(protocol)?;
        let irqs = check_device(&mut client, path)?;
        let vectors = (0..irqs)
            .map(|_| EventFd::new().map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        hand_over_interrupts(&mut client, &vectors)?;
        // The crate reports the reset flag inverted (see the module docs).
        let resettable = !client.resettable();
        let doorbells = map_doorbells(&client)?;
        Ok(Self {
            path: path.to_owned(),
            client: Mutex::new(client),
            doorbells: RwLock::new(doorbells),
            vectors,
            resettable: AtomicBool::new(resettable),
            lost: AtomicBool::new(false),
            mappings: Mutex::new(BTreeMap::new()),
        })
    }

    /// Connects again to the server at the same path after the connection broke: the same
    /// interrupt eventfds, every DMA mapping still in use, fresh doorbell pages. The device
    /// function behind the new connection is a fresh one (device-spec §12).
    fn reconnect(&self) -> Result<(), TransportError> {
        let mut client = vfio_user::Client::new(&self.path).map_err(protocol)?;
        let irqs = check_device(&mut client, &self.path)?;
        if irqs as usize != self.vectors.len() {
            return Err(TransportError::NotOurs(format!(
                "{}: the device came back with {irqs} interrupt vectors instead of {}",
                self.path.display(),
                self.vectors.len()
            )));
        }
        hand_over_interrupts(&mut client, &self.vectors)?;
        let mappings = self.mappings.lock().unwrap_or_else(|e| e.into_inner());
        for (iova, region) in mappings.iter() {
            let (fd, offset) = region
                .fd()
                .ok_or_else(|| TransportError::NotOurs("a DMA region lost its memfd".into()))?;
            client
                .dma_map(offset, *iova, region.len() as u64, fd.as_raw_fd())
                .map_err(protocol)?;
        }
        let doorbells = map_doorbells(&client)?;
        // Register accesses, doorbells and mappings go to the new connection from here on.
        let mut current = self.client.lock().unwrap_or_else(|e| e.into_inner());
        let old = std::mem::replace(&mut *current, client);
        let _ = old.shutdown();
        *self.doorbells.write().unwrap_or_else(|e| e.into_inner()) = doorbells;
        self.resettable
            .store(!current.resettable(), Ordering::Release);
        drop(mappings);
        self.lost.store(false, Ordering::Release);
        tracing::info!(path = %self.path.display(), "vfio-user device connected again");
        Ok(())
    }

    /// True when doorbells are stores into the server's mapped doorbell pages.
    pub fn doorbells_mapped(&self) -> bool {
        self.doorbells
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Whether the server can reset the device (the corrected value of the crate's flag).
    pub fn resettable(&self) -> bool {
        self.resettable.load(Ordering::Acquire)
    }

    fn client(&self) -> Option<MutexGuard<'_, vfio_user::Client>> {
        if self.lost.load(Ordering::Acquire) {
            return None;
        }
        Some(self.client.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn gone(&self, what: &str, error: &vfio_user::Error) {
        if !self.lost.swap(true, Ordering::AcqRel) {
            tracing::error!(path = %self.path.display(), %error, "vfio-user {what} failed; device lost");
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> bool {
        let Some(mut client) = self.client() else {
            return false;
        };
        match client.region_read(VFIO_PCI_BAR0_REGION_INDEX, offset, buf) {
            Ok(()) => true,
            Err(error) => {
                self.gone("register read", &error);
                false
            }
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if let Ok(word) = <[u8; 4]>::try_from(data) {
            let doorbells = self.doorbells.read().unwrap_or_else(|e| e.into_inner());
            if let Some(bar) = doorbells.as_ref() {
                let inside = offset
                    .checked_sub(DOORBELL_BASE)
                    .filter(|at| at + 4 <= bar.len() as u64);
                if let Some(at) = inside {
                    if !self.lost.load(Ordering::Acquire) {
                        bar.write32(at, u32::from_le_bytes(word));
                    }
                    return;
                }
            }
        }
        let Some(mut client) = self.client() else {
            return;
        };
        if let Err(error) = client.region_write(VFIO_PCI_BAR0_REGION_INDEX, offset, data) {
            self.gone("register write", &error);
        }
    }
}

/// Checks that the server offers BAR0; returns its count of MSI-X vectors.
fn check_device(client: &mut vfio_user::Client, path: &Path) -> Result<u32, TransportError> {
    if client
        .region(VFIO_PCI_BAR0_REGION_INDEX)
        .is_none_or(|region| region.size == 0)
    {
        return Err(TransportError::NotOurs(format!(
            "{}: the vfio-user server offers no BAR0",
            path.display()
        )));
    }
    Ok(client
        .get_irq_info(VFIO_PCI_MSIX_IRQ_INDEX)
        .map_err(protocol)?
        .count)
}

/// Hands the server one eventfd per MSI-X vector.
fn hand_over_interrupts(
    client: &mut vfio_user::Client,
    vectors: &[Arc<EventFd>],
) -> Result<(), TransportError> {
    let fds: Vec<_> = vectors.iter().map(|fd| fd.as_raw_fd()).collect();
    if fds.is_empty() {
        return Ok(());
    }
    client
        .set_irqs(
            VFIO_PCI_MSIX_IRQ_INDEX,
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            0,
            fds.len() as u32,
            &fds,
        )
        .map_err(protocol)
}

/// Maps BAR0's doorbell pages if the server offers them as a sparse mmap area.
fn map_doorbells(client: &vfio_user::Client) -> Result<Option<Bar>, TransportError> {
    let Some(region) = client.region(VFIO_PCI_BAR0_REGION_INDEX) else {
        return Ok(None);
    };
    let Some(file) = region.file_offset.as_ref() else {
        return Ok(None);
    };
    let Some(area) = region
        .sparse_areas
        .iter()
        .find(|area| area.offset == DOORBELL_BASE && area.size > 0)
    else {
        return Ok(None);
    };
    let len = usize::try_from(area.size)
        .map_err(|_| TransportError::NotOurs("doorbell area too large".into()))?;
    let offset = file
        .start()
        .checked_add(area.offset)
        .ok_or_else(|| TransportError::NotOurs("doorbell area offset overflows".into()))?;
    // The server could otherwise truncate the file under the mapping and turn the next
    // doorbell store into SIGBUS.
    check_shared_memory(file.file().as_fd(), offset, len)
        .map_err(TransportError::DoorbellMemory)?;
    let map = memmap2::MmapOptions::new()
        .offset(offset)
        .len(len)
        .map_raw(file.file())
        .map_err(TransportError::DoorbellMap)?;
    Ok(Some(Bar::new(map)))
}

impl DmaMapper for VfioUserTransport {
    fn map(&self, region: &Arc<DmaRegion>, iova: Iova) -> Result<(), DmaError> {
        let lost =
            || DmaError::Map(format!("vfio-user device {} is lost", self.path.display()).into());
        let (fd, offset) = region
            .fd()
            .ok_or_else(|| DmaError::Map("a vfio-user DMA region must be a shared memfd".into()))?;
        // Lock order: `mappings` before `client` (as in `reconnect`), so a reconnect
        // replays either all of this mapping or none of it.
        let mut mappings = self.mappings.lock().unwrap_or_else(|e| e.into_inner());
        let mut client = self.client().ok_or_else(lost)?;
        client
            .dma_map(offset, iova.0, region.len() as u64, fd.as_raw_fd())
            .map_err(|e| {
                self.gone("DMA map", &e);
                DmaError::Map(Box::new(e))
            })?;
        mappings.insert(iova.0, Arc::clone(region));
        Ok(())
    }

    fn unmap(&self, iova: Iova, len: usize) -> Result<(), DmaError> {
        self.mappings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&iova.0);
        let Some(mut client) = self.client() else {
            // The server is gone and its mappings with it.
            return Ok(());
        };
        client.dma_unmap(iova.0, len as u64).map_err(|e| {
            self.gone("DMA unmap", &e);
            DmaError::Map(Box::new(e))
        })
    }
}

impl Transport for VfioUserTransport {
    fn name(&self) -> String {
        format!("vfio-user:{}", self.path.display())
    }
    fn read32(&self, offset: u64) -> u32 {
        let mut raw = [0u8; 4];
        if self.read(offset, &mut raw) {
            u32::from_le_bytes(raw)
        } else {
            u32::MAX
        }
    }
    fn write32(&self, offset: u64, value: u32) {
        self.write(offset, &value.to_le_bytes())
    }
    fn read64(&self, offset: u64) -> u64 {
        let mut raw = [0u8; 8];
        if self.read(offset, &mut raw) {
            u64::from_le_bytes(raw)
        } else {
            u64::MAX
        }
    }
    fn write64(&self, offset: u64, value: u64) {
        self.write(offset, &value.to_le_bytes())
    }
    fn interrupt(&self, vector: u32) -> Result<Arc<EventFd>, TransportError> {
        self.vectors
            .get(vector as usize)
            .cloned()
            .ok_or(TransportError::NoSuchVector(vector))
    }
    fn reset(&self) -> Result<(), TransportError> {
        if self.is_lost() {
            // The server went away; a new one at the same path is a fresh device function.
            return self.reconnect();
        }
        let mut client = self
            .client()
            .ok_or_else(|| TransportError::Lost(self.name()))?;
        if self.resettable() {
            client.reset().map_err(|e| {
                self.gone("reset", &e);
                protocol(e)
            })?;
        }
        drop(client);
        self.write32(
            tlsaccel_abi::regs::DEVICE_CONTROL,
            tlsaccel_abi::DeviceControl::RESET.bits(),
        );
        if self.is_lost() {
            return Err(TransportError::Lost(self.name()));
        }
        Ok(())
    }
    fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }
}

impl Drop for VfioUserTransport {
    fn drop(&mut self) {
        if let Some(client) = self.client() {
            let _ = client.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;

    use rustix::fs::SealFlags;
    use vfio_bindings::bindings::vfio::{
        vfio_region_info, vfio_region_sparse_mmap_area, VFIO_IRQ_INFO_EVENTFD,
        VFIO_PCI_NUM_REGIONS, VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ,
        VFIO_REGION_INFO_FLAG_WRITE,
    };

    use super::*;

    /// A server that answers every access; the file behind its BAR0 doorbell page is the
    /// test's choice.
    struct DoorbellServer;

    impl vfio_user::ServerBackend for DoorbellServer {
        fn region_read(&mut self, _: u32, _: u64, data: &mut [u8]) -> std::io::Result<()> {
            data.fill(0xff);
            Ok(())
        }
        fn region_write(&mut self, _: u32, _: u64, _: &[u8]) -> std::io::Result<()> {
            Ok(())
        }
        fn dma_map(
            &mut self,
            _: vfio_user::DmaMapFlags,
            _: u64,
            _: u64,
            _: u64,
            _: Option<std::fs::File>,
        ) -> std::io::Result<()> {
            Ok(())
        }
        fn dma_unmap(
            &mut self,
            _: vfio_user::DmaUnmapFlags,
            _: u64,
            _: u64,
        ) -> std::io::Result<()> {
            Ok(())
        }
        fn reset(&mut self) -> std::io::Result<()> {
            Ok(())
        }
        fn set_irqs(
            &mut self,
            _: u32,
            _: u32,
            _: u32,
            _: u32,
            _: Vec<std::fs::File>,
        ) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Connects to a server whose BAR0 doorbell page is backed by `memory`.
    fn connect_with_doorbell_memory(memory: OwnedFd) -> Result<VfioUserTransport, TransportError> {
        let path = std::env::temp_dir().join(format!(
            "tlsaccel-doorbell-{}-{}.sock",
            std::process::id(),
            memory.as_raw_fd()
        ));
        let _ = std::fs::remove_file(&path);
        let bar0_size = tlsaccel_abi::regs::bar0_size(1);
        let regions = (0..VFIO_PCI_NUM_REGIONS)
            .map(|index| {
                let bar0 = index == VFIO_PCI_BAR0_REGION_INDEX;
                vfio_user::ServerRegion {
                    region_info: vfio_region_info {
                        argsz: std::mem::size_of::<vfio_region_info>() as u32,
                        flags: if bar0 {
                            VFIO_REGION_INFO_FLAG_READ
                                | VFIO_REGION_INFO_FLAG_WRITE
                                | VFIO_REGION_INFO_FLAG_MMAP
                        } else {
                            0
                        },
                        index,
                        cap_offset: 0,
                        size: if bar0 { bar0_size } else { 0 },
                        offset: 0,
                    },
                    sparse_areas: if bar0 {
                        vec![vfio_user::SparseArea {
                            area: vfio_region_sparse_mmap_area {
                                offset: DOORBELL_BASE,
                                size: 4096,
                            },
                        }]
                    } else {
                        Vec::new()
                    },
                    mmap_fd: bar0.then(|| memory.as_raw_fd()),
                }
            })
            .collect();
        let irqs = (0..5)
            .map(|index| vfio_user::IrqInfo {
                index,
                flags: VFIO_IRQ_INFO_EVENTFD,
                count: 0,
            })
            .collect();
        let server = vfio_user::Server::new(&path, true, irqs, regions).unwrap();
        let serving = std::thread::spawn(move || {
            let _ = server.run(&mut DoorbellServer);
            drop(memory);
        });
        let result = VfioUserTransport::connect(&path);
        if let Ok(transport) = &result {
            if let Some(client) = transport.client() {
                let _ = client.shutdown();
            }
        }
        serving.join().unwrap();
        result
    }

    use crate::dma::test_support::memfd;

    #[test]
    fn doorbell_memory_the_server_could_truncate_is_refused() {
        let bar0_size = tlsaccel_abi::regs::bar0_size(1);
        let error = connect_with_doorbell_memory(memfd(bar0_size, SealFlags::empty()))
            .expect_err("an unsealed doorbell file is refused");
        assert!(
            matches!(
                &error,
                TransportError::DoorbellMemory(crate::dma::ShmError::SharedMemoryNotSealed { .. })
            ),
            "{error}"
        );
        assert_eq!(
            error.to_string(),
            "the doorbell memory the vfio-user server sent is unsafe to map"
        );

        // Sealed, but ending before the doorbell page.
        let sealed = SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL;
        let error = connect_with_doorbell_memory(memfd(DOORBELL_BASE, sealed))
            .expect_err("a doorbell file too small for its page is refused");
        assert!(
            matches!(
                &error,
                TransportError::DoorbellMemory(crate::dma::ShmError::SharedMemoryTooSmall { .. })
            ),
            "{error}"
        );

        // Sealed and large enough: the doorbell page is mapped.
        let transport = connect_with_doorbell_memory(memfd(bar0_size, sealed)).unwrap();
        assert!(transport.doorbells_mapped());
    }
}
