//! Host memory as the device sees it: regions the host mapped, reached through an IOMMU-like
//! translation table. An address outside every mapping is a DMA fault, never a crash.

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

#[derive(Debug, Clone)]
struct Mapping {
    iova: u64,
    len: u64,
    memory: Arc<dyn HostMemory>,
    offset: u64,
}

/// The translation table from device addresses (IOVAs) to host memory.
#[derive(Debug, Default)]
pub struct Iommu {
    mappings: RwLock<Vec<Mapping>>,
}

/// A translated, bounds-checked range of host memory.
#[derive(Debug, Clone)]
pub struct DmaRange {
    memory: Arc<dyn HostMemory>,
    offset: u64,
    len: u64,
    iova: u64,
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

    /// Reads `buf.len()` bytes at `at` inside the range.
    pub fn read(&self, at: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
        let offset = self.checked(at, buf.len())?;
        self.memory
            .read(offset, buf)
            .map_err(|_| self.fault(at, buf.len()))
    }

    /// Writes `data` at `at` inside the range.
    pub fn write(&self, at: u64, data: &[u8]) -> Result<(), DmaFault> {
        let offset = self.checked(at, data.len())?;
        self.memory
            .write(offset, data)
            .map_err(|_| self.fault(at, data.len()))
    }

    /// Stores a 32-bit word at `at` with release ordering.
    pub fn write_u32_release(&self, at: u64, value: u32) -> Result<(), DmaFault> {
        let offset = self.checked(at, 4)?;
        self.memory
            .write_u32_release(offset, value)
            .map_err(|_| self.fault(at, 4))
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
        let mut mappings = self.mappings.write().unwrap_or_else(|e| e.into_inner());
        let end = iova + len;
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
                memory,
                offset,
            },
        );
        Ok(())
    }

    /// Removes the mapping that starts at `iova` with length `len`.
    pub fn unmap(&self, iova: u64, len: u64) -> Result<(), IommuError> {
        let mut mappings = self.mappings.write().unwrap_or_else(|e| e.into_inner());
        let at = mappings
            .iter()
            .position(|m| m.iova == iova && m.len == len)
            .ok_or(IommuError::NotMapped { iova, len })?;
        mappings.remove(at);
        Ok(())
    }

    /// Removes every mapping.
    pub fn clear(&self) {
        self.mappings
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Translates `[iova, iova + len)`, which must lie inside one mapping.
    pub fn translate(&self, iova: u64, len: u64) -> Result<DmaRange, DmaFault> {
        let fault = DmaFault { iova, len };
        let end = iova.checked_add(len).ok_or(fault)?;
        let mappings = self.mappings.read().unwrap_or_else(|e| e.into_inner());
        let at = mappings.partition_point(|m| m.iova <= iova);
        let mapping = at
            .checked_sub(1)
            .and_then(|i| mappings.get(i))
            .ok_or(fault)?;
        if end > mapping.iova + mapping.len {
            return Err(fault);
        }
        Ok(DmaRange {
            memory: Arc::clone(&mapping.memory),
            offset: mapping.offset + (iova - mapping.iova),
            len,
            iova,
        })
    }
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
}
