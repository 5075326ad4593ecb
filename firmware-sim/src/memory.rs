//! Host memory as the device sees it: regions the host mapped, reached through an IOMMU-like
//! translation table. An address outside every mapping is a DMA fault, never a crash, and
//! so is an access through a translation whose mapping the host has removed since.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// A contiguous piece of host memory the device can read and write.
///
/// The implementation owns the access discipline (volatile copies for memory the host also
/// touches); the device model only ever calls these methods with ranges that lie inside
/// `size()`, after translation through [`Iommu`].
pub trait HostMemory: Send + Sync + std::fmt::Debug {
    /// Bytes in the region.
    fn size(&self) -> u64;
    /// Copies `buf.len()` bytes starting at `offset` into `buf`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), HostMemoryError>;
    /// Copies `data` into the region starting at `offset`.
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), HostMemoryError>;
    /// Stores a little-endian 32-bit word at a 4-byte aligned `offset` with release ordering:
    /// a reader that sees the word also sees every earlier `write`.
    fn write_u32_release(&self, offset: u64, value: u32) -> Result<(), HostMemoryError>;
    /// Loads a little-endian 32-bit word at a 4-byte aligned `offset` with acquire ordering
    /// (doorbells that live in shared memory).
    fn read_u32_acquire(&self, offset: u64) -> Result<u32, HostMemoryError> {
        let mut raw = [0u8; 4];
        self.read(offset, &mut raw)?;
        Ok(u32::from_le_bytes(raw))
    }
}

/// The backing memory refused an access (for example a shared file that was truncated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("host memory access failed")]
pub struct HostMemoryError;

/// Errors of the IOMMU table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IommuError {
    #[error("mapping [{iova:#x}, +{len:#x}) overlaps an existing mapping")]
    Overlap { iova: u64, len: u64 },
    #[error(
        "mapping [{iova:#x}, +{len:#x}) is empty, wraps around, or exceeds its backing memory"
    )]
    BadRange { iova: u64, len: u64 },
    #[error("no mapping starts at {iova:#x} with length {len:#x}")]
    NotMapped { iova: u64, len: u64 },
}

/// A device access outside the memory the host mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("DMA fault at iova {iova:#x} length {len:#x}")]
pub struct DmaFault {
    pub iova: u64,
    pub len: u64,
}

/// One mapping as the device reaches it. `state` packs a revoked flag with the number of
/// device accesses under way, so that "is it still mapped?" and "I am accessing it" are one
/// atomic step, and an unmap can wait for the accesses that began before it.
#[derive(Debug)]
struct Window {
    memory: Arc<dyn HostMemory>,
    /// On a cache line of its own, away from the reference count that translations touch.
    state: crate::queue::OwnLine<AtomicU32>,
}

/// `Window::state` bit: the mapping was removed; new accesses fault.
const REVOKED: u32 = 1 << 31;

impl Window {
    /// Starts an access; `false` when the mapping is gone.
    fn begin(&self) -> bool {
        let before = self.state.fetch_add(1, Ordering::Acquire);
        if before & REVOKED != 0 {
            self.state.fetch_sub(1, Ordering::Release);
            return false;
        }
        true
    }

    fn end(&self) {
        self.state.fetch_sub(1, Ordering::Release);
    }

    /// Stops new accesses and returns once the accesses under way have finished: after
    /// this, the device does not touch the memory through this mapping again.
    fn revoke(&self) {
        self.state.fetch_or(REVOKED, Ordering::AcqRel);
        let mut spins = 0u32;
        while self.state.load(Ordering::Acquire) & !REVOKED != 0 {
            // An access is one bounded copy; wait it out.
            spins = spins.saturating_add(1);
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Mapping {
    iova: u64,
    len: u64,
    offset: u64,
    window: Arc<Window>,
}

/// The translation table from device addresses (IOVAs) to host memory.
///
/// The table is an immutable snapshot replaced on every map and unmap, with a generation
/// number: an engine keeps the snapshot it last saw in an [`IommuView`] and translates
/// without a lock until the generation moves. A stale snapshot is safe, because translation
/// only names a mapping: every access through a [`DmaRange`] checks, at that moment, that
/// its mapping still exists, so an unmap (or [`Iommu::clear`]) makes later accesses through
/// ranges translated earlier fail with a [`DmaFault`].
#[derive(Debug, Default)]
pub struct Iommu {
    table: RwLock<Arc<Vec<Mapping>>>,
    generation: AtomicU64,
}

/// An engine's cached copy of the translation table (see [`Iommu::translate_cached`]).
#[derive(Debug, Default)]
pub struct IommuView {
    generation: u64,
    table: Option<Arc<Vec<Mapping>>>,
}

/// A translated, bounds-checked range of host memory. Every access checks that the mapping
/// it was translated through still exists.
#[derive(Debug, Clone)]
pub struct DmaRange {
    window: Arc<Window>,
    offset: u64,
    len: u64,
    iova: u64,
}

/// Access to a [`DmaRange`] with its mapping held for several transfers in a row (see
/// [`DmaRange::with_access`]).
#[derive(Debug)]
pub struct DmaAccess<'a> {
    range: &'a DmaRange,
}

impl DmaAccess<'_> {
    /// Reads `buf.len()` bytes at `at` inside the range.
    pub fn read(&self, at: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
        let r = self.range;
        let offset = r.checked(at, buf.len())?;
        r.window
            .memory
            .read(offset, buf)
            .map_err(|_| r.fault(at, buf.len()))
    }

    /// Writes `data` at `at` inside the range.
    pub fn write(&self, at: u64, data: &[u8]) -> Result<(), DmaFault> {
        let r = self.range;
        let offset = r.checked(at, data.len())?;
        r.window
            .memory
            .write(offset, data)
            .map_err(|_| r.fault(at, data.len()))
    }

    /// Stores a 32-bit word at `at` with release ordering.
    pub fn write_u32_release(&self, at: u64, value: u32) -> Result<(), DmaFault> {
        let r = self.range;
        let offset = r.checked(at, 4)?;
        r.window
            .memory
            .write_u32_release(offset, value)
            .map_err(|_| r.fault(at, 4))
    }
}

impl DmaRange {
    /// Length of the range in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the range is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Runs `f` with the range's mapping held, so that several transfers pay for one
    /// mapping check. Fails without calling `f` when the mapping is gone. An unmap waits for
    /// `f` to return: keep it short (no waiting inside).
    pub fn with_access<R>(
        &self,
        f: impl FnOnce(&DmaAccess<'_>) -> Result<R, DmaFault>,
    ) -> Result<R, DmaFault> {
        if !self.window.begin() {
            return Err(DmaFault {
                iova: self.iova,
                len: self.len,
            });
        }
        let result = f(&DmaAccess { range: self });
        self.window.end();
        result
    }

    /// Reads `buf.len()` bytes at `at` inside the range.
    pub fn read(&self, at: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
        self.with_access(|a| a.read(at, buf))
    }

    /// Writes `data` at `at` inside the range.
    pub fn write(&self, at: u64, data: &[u8]) -> Result<(), DmaFault> {
        self.with_access(|a| a.write(at, data))
    }

    /// Stores a 32-bit word at `at` with release ordering.
    pub fn write_u32_release(&self, at: u64, value: u32) -> Result<(), DmaFault> {
        self.with_access(|a| a.write_u32_release(at, value))
    }

    fn checked(&self, at: u64, len: usize) -> Result<u64, DmaFault> {
        let len64 = len as u64;
        match at.checked_add(len64) {
            Some(end) if end <= self.len => Ok(self.offset + at),
            _ => Err(self.fault(at, len)),
        }
    }

    fn fault(&self, at: u64, len: usize) -> DmaFault {
        DmaFault {
            iova: self.iova.wrapping_add(at),
            len: len as u64,
        }
    }
}

impl Iommu {
    fn table(&self) -> Arc<Vec<Mapping>> {
        Arc::clone(&self.table.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Replaces the table with `change` applied to a copy of it.
    fn update<R>(
        &self,
        change: impl FnOnce(&mut Vec<Mapping>) -> Result<R, IommuError>,
    ) -> Result<R, IommuError> {
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        let mut next = Vec::clone(&table);
        let result = change(&mut next)?;
        *table = Arc::new(next);
        self.generation.fetch_add(1, Ordering::Release);
        Ok(result)
    }

    /// Maps `len` bytes of `memory`, starting at `offset` in it, at device address `iova`.
    pub fn map(
        &self,
        iova: u64,
        len: u64,
        memory: Arc<dyn HostMemory>,
        offset: u64,
    ) -> Result<(), IommuError> {
        let fits = iova.checked_add(len).is_some()
            && offset
                .checked_add(len)
                .is_some_and(|end| end <= memory.size());
        if len == 0 || !fits {
            return Err(IommuError::BadRange { iova, len });
        }
        let end = iova + len;
        self.update(|mappings| {
            if mappings
                .iter()
                .any(|m| iova < m.iova + m.len && m.iova < end)
            {
                return Err(IommuError::Overlap { iova, len });
            }
            let at = mappings.partition_point(|m| m.iova < iova);
            mappings.insert(
                at,
                Mapping {
                    iova,
                    len,
                    offset,
                    window: Arc::new(Window {
                        memory,
                        state: crate::queue::OwnLine(AtomicU32::new(0)),
                    }),
                },
            );
            Ok(())
        })
    }

    /// Removes the mapping that starts at `iova` with length `len`. Returns once the device
    /// has finished the accesses to it that were under way; later ones fault.
    pub fn unmap(&self, iova: u64, len: u64) -> Result<(), IommuError> {
        let removed = self.update(|mappings| {
            let at = mappings
                .iter()
                .position(|m| m.iova == iova && m.len == len)
                .ok_or(IommuError::NotMapped { iova, len })?;
            Ok(mappings.remove(at))
        })?;
        removed.window.revoke();
        Ok(())
    }

    /// Removes every mapping, as [`Iommu::unmap`] does each.
    pub fn clear(&self) {
        let removed = self
            .update(|mappings| Ok(std::mem::take(mappings)))
            .unwrap_or_default();
        for mapping in removed {
            mapping.window.revoke();
        }
    }

    /// Translates `[iova, iova + len)`, which must lie inside one mapping.
    pub fn translate(&self, iova: u64, len: u64) -> Result<DmaRange, DmaFault> {
        lookup(&self.table(), iova, len)
    }

    /// [`Iommu::translate`] through `view`, an engine's own copy of the table, refreshed
    /// only when a map or unmap has happened since: no lock on the hot path.
    pub fn translate_cached(
        &self,
        view: &mut IommuView,
        iova: u64,
        len: u64,
    ) -> Result<DmaRange, DmaFault> {
        let generation = self.generation.load(Ordering::Acquire);
        let table = match &view.table {
            Some(table) if view.generation == generation => table,
            _ => {
                view.generation = generation;
                view.table.insert(self.table())
            }
        };
        lookup(table, iova, len)
    }
}

fn lookup(mappings: &[Mapping], iova: u64, len: u64) -> Result<DmaRange, DmaFault> {
    let fault = DmaFault { iova, len };
    let end = iova.checked_add(len).ok_or(fault)?;
    let at = mappings.partition_point(|m| m.iova <= iova);
    let mapping = at
        .checked_sub(1)
        .and_then(|i| mappings.get(i))
        .ok_or(fault)?;
    if end > mapping.iova + mapping.len {
        return Err(fault);
    }
    Ok(DmaRange {
        window: Arc::clone(&mapping.window),
        offset: mapping.offset + (iova - mapping.iova),
        len,
        iova,
    })
}

/// Host memory backed by an ordinary heap buffer. For tests of the device model on its own;
/// the driver provides the real implementations.
#[derive(Debug)]
pub struct HeapMemory {
    bytes: std::sync::Mutex<Vec<u8>>,
}

impl HeapMemory {
    /// A zero-filled region of `size` bytes.
    pub fn new(size: usize) -> Self {
        Self {
            bytes: std::sync::Mutex::new(vec![0; size]),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
        f(&mut self.bytes.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Memory another process shares with the device (a vfio-user client's DMA regions, an
/// ivshmem guest's shared memory), or the host's own DMA pool in-process.
impl HostMemory for tlsaccel_shm::SharedRegion {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), HostMemoryError> {
        let offset = usize::try_from(offset).map_err(|_| HostMemoryError)?;
        tlsaccel_shm::SharedRegion::read(self, offset, buf).map_err(|_| HostMemoryError)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), HostMemoryError> {
        let offset = usize::try_from(offset).map_err(|_| HostMemoryError)?;
        tlsaccel_shm::SharedRegion::write(self, offset, data).map_err(|_| HostMemoryError)
    }

    fn read_u32_acquire(&self, offset: u64) -> Result<u32, HostMemoryError> {
        let offset = usize::try_from(offset).map_err(|_| HostMemoryError)?;
        self.load_u32_acquire(offset).map_err(|_| HostMemoryError)
    }

    fn write_u32_release(&self, offset: u64, value: u32) -> Result<(), HostMemoryError> {
        let offset = usize::try_from(offset).map_err(|_| HostMemoryError)?;
        self.store_u32_release(offset, value)
            .map_err(|_| HostMemoryError)
    }
}

impl HostMemory for HeapMemory {
    fn size(&self) -> u64 {
        self.with(|b| b.len() as u64)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), HostMemoryError> {
        self.with(|b| {
            let start = usize::try_from(offset).map_err(|_| HostMemoryError)?;
            let src = b.get(start..start + buf.len()).ok_or(HostMemoryError)?;
            buf.copy_from_slice(src);
            Ok(())
        })
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), HostMemoryError> {
        self.with(|b| {
            let start = usize::try_from(offset).map_err(|_| HostMemoryError)?;
            let dst = b
                .get_mut(start..start + data.len())
                .ok_or(HostMemoryError)?;
            dst.copy_from_slice(data);
            Ok(())
        })
    }

    fn write_u32_release(&self, offset: u64, value: u32) -> Result<(), HostMemoryError> {
        self.write(offset, &value.to_le_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(size: usize) -> Arc<dyn HostMemory> {
        Arc::new(HeapMemory::new(size))
    }

    #[test]
    fn translation_stays_inside_one_mapping() {
        let iommu = Iommu::default();
        iommu.map(0x1000, 0x1000, memory(0x1000), 0).unwrap();
        iommu.map(0x4000, 0x800, memory(0x1000), 0x800).unwrap();
        assert!(iommu.translate(0x1000, 0x1000).is_ok());
        assert!(iommu.translate(0x1fff, 1).is_ok());
        assert_eq!(
            iommu.translate(0x1fff, 2).unwrap_err(),
            DmaFault {
                iova: 0x1fff,
                len: 2
            }
        );
        assert!(iommu.translate(0x0fff, 1).is_err());
        assert!(iommu.translate(0x3000, 1).is_err());
        assert!(iommu.translate(u64::MAX, 2).is_err());
        let range = iommu.translate(0x4010, 4).unwrap();
        range.write(0, &[1, 2, 3, 4]).unwrap();
        assert!(range.write(1, &[1, 2, 3, 4]).is_err());
    }

    #[test]
    fn overlapping_or_oversized_mappings_are_refused() {
        let iommu = Iommu::default();
        iommu.map(0x1000, 0x1000, memory(0x1000), 0).unwrap();
        assert!(matches!(
            iommu.map(0x1800, 0x1000, memory(0x1000), 0),
            Err(IommuError::Overlap { .. })
        ));
        assert!(matches!(
            iommu.map(0x8000, 0x2000, memory(0x1000), 0),
            Err(IommuError::BadRange { .. })
        ));
        assert!(matches!(
            iommu.map(u64::MAX - 1, 0x10, memory(0x1000), 0),
            Err(IommuError::BadRange { .. })
        ));
        iommu.unmap(0x1000, 0x1000).unwrap();
        assert!(iommu.translate(0x1000, 1).is_err());
        assert!(iommu.unmap(0x1000, 0x1000).is_err());
    }

    #[test]
    fn an_unmap_faults_later_accesses_through_earlier_translations() {
        let iommu = Iommu::default();
        let backing = Arc::new(HeapMemory::new(0x2000));
        iommu.map(0x1000, 0x2000, backing.clone(), 0).unwrap();
        let range = iommu.translate(0x1800, 0x100).unwrap();
        range.write(0, &[0xaa; 4]).unwrap();
        iommu.unmap(0x1000, 0x2000).unwrap();
        // The memory is still alive (the range holds it), but the device may not reach it.
        assert_eq!(
            range.write(0, &[0x55; 4]),
            Err(DmaFault {
                iova: 0x1800,
                len: 0x100
            })
        );
        let mut read_back = [0u8; 4];
        assert!(range.read(0, &mut read_back).is_err());
        assert!(range.write_u32_release(4, 1).is_err());
        let mut host_view = [0u8; 8];
        backing.read(0x800, &mut host_view).unwrap();
        assert_eq!(host_view, [0xaa, 0xaa, 0xaa, 0xaa, 0, 0, 0, 0]);
        // Mapping the same memory again does not bring the old translation back.
        iommu.map(0x1000, 0x2000, backing, 0).unwrap();
        assert!(range.write(0, &[1]).is_err());
        assert!(iommu
            .translate(0x1800, 0x100)
            .unwrap()
            .write(0, &[1])
            .is_ok());
    }

    #[test]
    fn clearing_the_table_faults_every_earlier_translation() {
        let iommu = Iommu::default();
        iommu.map(0x1000, 0x1000, memory(0x1000), 0).unwrap();
        iommu.map(0x8000, 0x1000, memory(0x1000), 0).unwrap();
        let a = iommu.translate(0x1000, 16).unwrap();
        let b = iommu.translate(0x8000, 16).unwrap();
        iommu.clear();
        assert!(a.write(0, &[1]).is_err());
        assert!(b.read(0, &mut [0]).is_err());
        assert!(iommu.translate(0x1000, 16).is_err());
    }

    #[test]
    fn a_cached_view_follows_maps_and_unmaps() {
        let iommu = Iommu::default();
        let mut view = IommuView::default();
        assert!(iommu.translate_cached(&mut view, 0x1000, 1).is_err());
        iommu.map(0x1000, 0x1000, memory(0x1000), 0).unwrap();
        let range = iommu.translate_cached(&mut view, 0x1000, 16).unwrap();
        range.write(0, &[1; 16]).unwrap();
        iommu.unmap(0x1000, 0x1000).unwrap();
        assert!(iommu.translate_cached(&mut view, 0x1000, 16).is_err());
        assert!(range.write(0, &[2]).is_err());
    }

    /// Host memory whose writes wait for a go-ahead, to catch an unmap in the middle of one.
    #[derive(Debug)]
    struct SlowMemory {
        inner: HeapMemory,
        entered: std::sync::mpsc::SyncSender<()>,
        proceed: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl HostMemory for SlowMemory {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), HostMemoryError> {
            self.inner.read(offset, buf)
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), HostMemoryError> {
            let _ = self.entered.send(());
            let _ = self
                .proceed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .recv();
            self.inner.write(offset, data)
        }
        fn write_u32_release(&self, offset: u64, value: u32) -> Result<(), HostMemoryError> {
            self.write(offset, &value.to_le_bytes())
        }
    }

    #[test]
    fn an_unmap_returns_only_after_the_access_under_way_has_finished() {
        use std::sync::atomic::AtomicBool;
        use std::sync::mpsc::sync_channel;
        let (entered_tx, entered) = sync_channel(1);
        let (proceed, proceed_rx) = sync_channel(1);
        let slow = Arc::new(SlowMemory {
            inner: HeapMemory::new(0x1000),
            entered: entered_tx,
            proceed: std::sync::Mutex::new(proceed_rx),
        });
        let iommu = Arc::new(Iommu::default());
        iommu.map(0x1000, 0x1000, slow, 0).unwrap();
        let range = iommu.translate(0x1000, 8).unwrap();
        let writer = std::thread::spawn(move || range.write(0, &[7; 8]));
        entered.recv().unwrap();
        let unmapped = Arc::new(AtomicBool::new(false));
        let unmapper = {
            let (iommu, unmapped) = (Arc::clone(&iommu), Arc::clone(&unmapped));
            std::thread::spawn(move || {
                iommu.unmap(0x1000, 0x1000).unwrap();
                unmapped.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            !unmapped.load(Ordering::SeqCst),
            "the unmap returned while a device write to the mapping was under way"
        );
        proceed.send(()).unwrap();
        assert!(
            writer.join().unwrap().is_ok(),
            "the write began before the unmap"
        );
        unmapper.join().unwrap();
        assert!(unmapped.load(Ordering::SeqCst));
    }
}
