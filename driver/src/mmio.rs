//! Register access to a mapped BAR: volatile, naturally aligned, bounds-checked loads and
//! stores. Never a Rust reference into device memory.

use std::fmt;
use std::sync::Arc;

use memmap2::MmapRaw;

/// A BAR mapped into this process. Unmapped when the last reference goes.
#[derive(Clone)]
pub struct Bar {
    map: Arc<MmapRaw>,
}

impl fmt::Debug for Bar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bar").field("len", &self.map.len()).finish()
    }
}

impl Bar {
    /// Wraps a mapping of a BAR.
    pub fn new(map: MmapRaw) -> Self {
        Self { map: Arc::new(map) }
    }

    /// The mapping, for carving DMA windows out of BAR memory.
    pub fn mapping(&self) -> &Arc<MmapRaw> {
        &self.map
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True for an empty mapping.
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    fn pointer(&self, offset: u64, width: usize) -> Option<*mut u8> {
        let offset = usize::try_from(offset).ok()?;
        let end = offset.checked_add(width)?;
        (end <= self.map.len() && offset % width == 0)
            .then(|| self.map.as_mut_ptr().wrapping_add(offset))
    }

    /// Reads a 32-bit register; all-ones (what a PCIe read of a missing device returns) when
    /// the offset is out of range or misaligned.
    pub fn read32(&self, offset: u64) -> u32 {
        match self.pointer(offset, 4) {
            // SAFETY: `pointer` checked that [ptr, ptr + 4) lies inside the live mapping and is
            // 4-byte aligned; volatile keeps the access a single load the device sees.
            Some(ptr) => u32::from_le(unsafe { ptr.cast::<u32>().read_volatile() }),
            None => u32::MAX,
        }
    }

    /// Writes a 32-bit register; ignored when the offset is out of range or misaligned.
    pub fn write32(&self, offset: u64, value: u32) {
        if let Some(ptr) = self.pointer(offset, 4) {
            // SAFETY: as in `read32`.
            unsafe { ptr.cast::<u32>().write_volatile(value.to_le()) };
        }
    }

    /// Reads a 64-bit register as one access.
    pub fn read64(&self, offset: u64) -> u64 {
        match self.pointer(offset, 8) {
            // SAFETY: as in `read32`, for 8 bytes and 8-byte alignment.
            Some(ptr) => u64::from_le(unsafe { ptr.cast::<u64>().read_volatile() }),
            None => u64::MAX,
        }
    }

    /// Writes a 64-bit register as one access.
    pub fn write64(&self, offset: u64, value: u64) {
        if let Some(ptr) = self.pointer(offset, 8) {
            // SAFETY: as in `read64`.
            unsafe { ptr.cast::<u64>().write_volatile(value.to_le()) };
        }
    }
}
