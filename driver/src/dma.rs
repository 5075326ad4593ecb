//! DMA memory: large shared mappings the device can reach, carved into buffers.
//!
//! The mappings are `tlsaccel-shm` regions ([`DmaRegion`]): memfd-backed, sealed, and
//! reached only through volatile copies and atomic words, never through a Rust reference.
//! This module makes them reachable by the device (a [`DmaMapper`], a [`RegionSource`]) and
//! carves them into buffers whose memory stays out of the pool while any span of them may be
//! in the device's hands.

use std::fmt;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

pub use tlsaccel_shm::{
    check_shared_memory, store_fence, SharedRegion as DmaRegion, ShmError, BULK_COPY,
};

/// A device-visible address (I/O virtual address).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Iova(pub u64);

impl Iova {
    /// `self + offset`, or `None` on overflow.
    pub fn checked_add(self, offset: u64) -> Option<Iova> {
        self.0.checked_add(offset).map(Iova)
    }
}

impl fmt::Debug for Iova {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Iova({:#x})", self.0)
    }
}

impl fmt::Display for Iova {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// Errors of DMA memory.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    #[error(transparent)]
    Memory(#[from] ShmError),
    #[error("DMA allocation of {requested} bytes exceeds the largest buffer ({max} bytes)")]
    TooLarge { requested: usize, max: usize },
    #[error("DMA pool limit of {limit} bytes reached")]
    Exhausted { limit: usize },
    #[error("access of {len} bytes at offset {offset} is outside a {size}-byte buffer")]
    OutOfBounds {
        offset: usize,
        len: usize,
        size: usize,
    },
    #[error("the device transport refused to map DMA memory")]
    Map(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Where the pool puts its regions in device address space by default. IOVA 0 stays
/// unmapped, so a zeroed descriptor faults instead of reading memory.
pub const POOL_IOVA_BASE: u64 = 0x1_0000_0000;

/// Something that makes regions reachable by a device: a transport.
pub trait DmaMapper: Send + Sync + fmt::Debug {
    /// Maps `region` at `iova`.
    fn map(&self, region: &Arc<DmaRegion>, iova: Iova) -> Result<(), DmaError>;
    /// Removes the mapping of `len` bytes at `iova`.
    fn unmap(&self, iova: Iova, len: usize) -> Result<(), DmaError>;
}

/// Where a pool gets its regions from.
pub trait RegionSource: Send + Sync + fmt::Debug {
    /// Region number `index`, of `size` bytes, reachable by the device, and its IOVA.
    fn region(&self, index: usize, size: usize) -> Result<(Arc<DmaRegion>, Iova), DmaError>;
    /// Region `index` is no longer used (the pool is going away).
    fn release(&self, index: usize, region: &Arc<DmaRegion>, iova: Iova);
    /// How many regions of `size` bytes the source can give, or `None` when it has no fixed
    /// bound (fresh memory).
    fn capacity(&self, _size: usize) -> Option<usize> {
        None
    }
    /// True when every region is new memory the kernel gave zero-filled (a fresh memfd):
    /// the pool then need not zero it, and its pages count towards the process's memory
    /// only once used.
    fn fresh(&self) -> bool {
        false
    }
}

/// The usual source: fresh memfd regions mapped for the device at
/// `POOL_IOVA_BASE + index * size`.
#[derive(Debug)]
pub struct MappedMemfd {
    mapper: Arc<dyn DmaMapper>,
}

impl MappedMemfd {
    pub fn new(mapper: Arc<dyn DmaMapper>) -> Self {
        Self { mapper }
    }
}

impl RegionSource for MappedMemfd {
    fn region(&self, index: usize, size: usize) -> Result<(Arc<DmaRegion>, Iova), DmaError> {
        let region = Arc::new(DmaRegion::new(size)?);
        let iova = Iova(POOL_IOVA_BASE + (index * size) as u64);
        self.mapper.map(&region, iova)?;
        Ok((region, iova))
    }

    fn release(&self, _index: usize, region: &Arc<DmaRegion>, iova: Iova) {
        if let Err(error) = self.mapper.unmap(iova, region.len()) {
            tracing::warn!(%iova, %error, "could not unmap DMA region");
        }
    }

    fn fresh(&self) -> bool {
        true
    }
}

const SMALLEST_CLASS: usize = 64;

#[derive(Debug)]
struct PoolState {
    regions: Vec<(Arc<DmaRegion>, Iova)>,
    /// Bump pointer in the newest region.
    next_offset: usize,
    /// Free buffers per size class (index = log2(size / SMALLEST_CLASS)): region, offset,
    /// and how many bytes from the start still hold public bytes (sealed records) that
    /// were not zeroed when freed.
    free: Vec<Vec<(usize, usize, usize)>>,
}

#[derive(Debug)]
struct PoolInner {
    source: Arc<dyn RegionSource>,
    region_size: usize,
    limit: usize,
    state: Mutex<PoolState>,
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        for (index, (region, iova)) in state.regions.iter().enumerate() {
            self.source.release(index, region, *iova);
        }
    }
}

/// A pool of DMA buffers in power-of-two size classes, carved from large regions reachable by
/// one device. Buffers of 4 KiB and more are 4 KiB aligned (ring bases need that).
#[derive(Debug, Clone)]
pub struct DmaPool {
    inner: Arc<PoolInner>,
}

impl DmaPool {
    /// A pool of memfd regions of `region_size` bytes mapped through `mapper`, holding at most
    /// `limit` bytes.
    pub fn new(mapper: Arc<dyn DmaMapper>, region_size: usize, limit: usize) -> Self {
        Self::with_source(Arc::new(MappedMemfd::new(mapper)), region_size, limit)
    }

    /// A pool whose regions come from `source`.
    pub fn with_source(source: Arc<dyn RegionSource>, region_size: usize, limit: usize) -> Self {
        let classes = (region_size / SMALLEST_CLASS).trailing_zeros() as usize + 1;
        Self {
            inner: Arc::new(PoolInner {
                source,
                region_size,
                limit,
                state: Mutex::new(PoolState {
                    regions: Vec::new(),
                    next_offset: region_size,
                    free: vec![Vec::new(); classes],
                }),
            }),
        }
    }

    /// Bytes of DMA memory the pool holds.
    pub fn mapped_bytes(&self) -> usize {
        let state = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        state.regions.len() * self.inner.region_size
    }

    /// A zero-filled buffer of at least `len` bytes (its `len()` is exactly `len`).
    ///
    /// Buffers come back zeroed because the pool zeroes what a buffer's owner or the device
    /// may have written when the buffer is freed, not when it is handed out: plaintext or key
    /// material never waits in free memory, and a device that reports success without
    /// writing `dst` returns zeros, never an earlier owner's bytes.
    pub fn alloc(&self, len: usize) -> Result<DmaBuffer, DmaError> {
        self.take(len, false)
    }

    /// A buffer the device overwrites whole before anyone reads it (the output of a seal):
    /// it may hold an earlier buffer's public bytes (sealed records, which went on the wire
    /// as they are), never anything else. Saves zeroing memory that is about to be
    /// overwritten; whatever it still holds is zeroed when it is freed, unless marked public
    /// again.
    pub fn alloc_for_output(&self, len: usize) -> Result<DmaBuffer, DmaError> {
        self.take(len, true)
    }

    fn take(&self, len: usize, public_ok: bool) -> Result<DmaBuffer, DmaError> {
        let inner = &self.inner;
        let class_size = len.max(SMALLEST_CLASS).next_power_of_two();
        if class_size > inner.region_size {
            return Err(DmaError::TooLarge {
                requested: len,
                max: inner.region_size,
            });
        }
        let class = (class_size / SMALLEST_CLASS).trailing_zeros() as usize;
        let mut state = inner.state.lock().unwrap_or_else(|e| e.into_inner());
        let (region_index, offset, stale) = match state.free[class].pop() {
            Some(found) => found,
            None => {
                let align = class_size.min(4096);
                let mut offset = state.next_offset.next_multiple_of(align);
                if offset + class_size > inner.region_size {
                    if (state.regions.len() + 1) * inner.region_size > inner.limit {
                        return Err(DmaError::Exhausted { limit: inner.limit });
                    }
                    let index = state.regions.len();
                    let (region, iova) = inner.source.region(index, inner.region_size)?;
                    // A region may be a window of memory with a past (a BAR another driver
                    // instance used): zero it once, so every buffer starts zeroed. A fresh
                    // memfd is zero already, and touching it would make all of it resident.
                    if !inner.source.fresh() {
                        region.zero(0, region.len())?;
                    }
                    state.regions.push((region, iova));
                    offset = 0;
                }
                state.next_offset = offset + class_size;
                (state.regions.len() - 1, offset, 0)
            }
        };
        let (region, region_iova) = state.regions[region_index].clone();
        drop(state);
        if stale > 0 && !public_ok {
            // Public bytes of an earlier owner: zero before anyone relies on zeros (a
            // completion ring's phase bits, say).
            region.zero(offset, stale)?;
        }
        let stale = if public_ok { stale } else { 0 };
        Ok(DmaBuffer {
            allocation: Arc::new(Allocation {
                pool: Arc::clone(inner),
                region,
                region_iova,
                region_index,
                offset,
                len,
                class,
                // Stale public bytes count as written: zeroed on free unless public again.
                dirty: AtomicUsize::new(stale),
                quarantined: AtomicBool::new(false),
                public: AtomicBool::new(false),
            }),
        })
    }
}

/// One allocation from a pool: the memory behind a [`DmaBuffer`] and every [`DmaSpan`] made
/// from it. It goes back to the pool (zeroed) only when the buffer and all its spans are
/// gone, so memory a queue still holds for the device is never handed to anyone else.
///
/// Aligned to its own cache lines: the ring buffers' allocations are touched on every
/// submission, and must not share a line with something another core writes (the model's
/// engine state, say).
#[repr(align(128))]
struct Allocation {
    pool: Arc<PoolInner>,
    region: Arc<DmaRegion>,
    region_iova: Iova,
    region_index: usize,
    offset: usize,
    len: usize,
    class: usize,
    /// Bytes from the start that the host or the device may have written: what the pool
    /// zeroes on free. A span given to the device counts as written.
    dirty: AtomicUsize,
    /// Never handed out again: a device may still write it (see [`DmaBuffer::quarantine`]).
    quarantined: AtomicBool,
    /// Its contents are public (see [`DmaBuffer::mark_public`]): freed without zeroing.
    public: AtomicBool,
}

impl Allocation {
    fn iova(&self) -> Iova {
        Iova(self.region_iova.0 + self.offset as u64)
    }

    fn mark_dirty(&self, end: usize) {
        let end = end.min(self.len);
        // A load first: on the hot path (descriptors into a ring already marked whole) the
        // mark is already there, and no read-modify-write is needed.
        if self.dirty.load(Ordering::Relaxed) < end {
            self.dirty.fetch_max(end, Ordering::Relaxed);
        }
    }
}

impl Drop for Allocation {
    fn drop(&mut self) {
        if self.quarantined.load(Ordering::Acquire) {
            return;
        }
        let written = *self.dirty.get_mut();
        let public = *self.public.get_mut();
        let dirty = if public { 0 } else { written };
        if dirty > 0 && self.region.zero(self.offset, dirty).is_err() {
            // Cannot happen (the range was checked at allocation); if it did, the memory
            // stays out of the pool rather than going back with its contents.
            return;
        }
        let mut state = self.pool.state.lock().unwrap_or_else(|e| e.into_inner());
        let stale = if public { written } else { 0 };
        state.free[self.class].push((self.region_index, self.offset, stale));
    }
}

/// A buffer of DMA memory. Returned to its pool, zeroed, once it and every [`DmaSpan`] made
/// from it are dropped.
///
/// Spans hold the memory they name: a job submitted to a queue keeps its spans until the
/// device has answered or has provably let go of the queue, so dropping the buffer while a
/// job is in flight (after a timeout, or a cancelled future) does not free the memory. The
/// buffer's owner can still read and write it meanwhile; what a late device write puts there
/// reaches no one else.
pub struct DmaBuffer {
    allocation: Arc<Allocation>,
}

impl fmt::Debug for DmaBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaBuffer")
            .field("iova", &self.allocation.iova())
            .field("len", &self.len())
            .finish()
    }
}

impl DmaBuffer {
    /// Keeps this memory out of the pool for good once the buffer and its spans are dropped
    /// (it stays mapped, and is not reused): for memory a device did not confirm it has
    /// stopped writing, so its late writes cannot land in someone else's buffer.
    pub fn quarantine(&self) {
        self.allocation.quarantined.store(true, Ordering::Release);
    }

    /// The buffer back for another use by its owner, contents as they are, when nothing but
    /// this handle names its memory: no [`DmaSpan`] of it exists (no job holds it, and none
    /// can be made without this handle) and it was never quarantined. Otherwise the buffer
    /// is dropped (and its memory goes back to the pool once the device lets go of it).
    ///
    /// For an owner that reuses its own buffers (a connection reading its next bytes into
    /// the buffer its last ones were sealed from) instead of paying for zeroing on every
    /// free; what the buffer holds is still zeroed when it is finally dropped.
    pub fn reusable(self) -> Option<Self> {
        let sole =
            Arc::strong_count(&self.allocation) == 1 && Arc::weak_count(&self.allocation) == 0;
        (sole && !self.allocation.quarantined.load(Ordering::Acquire)).then_some(self)
    }

    /// The buffer's device address. Whoever learns it may hand it to the device (a ring
    /// base, a raw descriptor), so the whole buffer counts as written from then on and is
    /// zeroed when freed.
    pub fn iova(&self) -> Iova {
        self.allocation.mark_dirty(self.allocation.len);
        self.allocation.iova()
    }

    /// Usable bytes.
    pub fn len(&self) -> usize {
        self.allocation.len
    }

    /// True for a zero-length buffer.
    pub fn is_empty(&self) -> bool {
        self.allocation.len == 0
    }

    /// A span of this buffer for a descriptor: `len` bytes from `offset`. The span keeps the
    /// buffer's memory out of the pool for as long as it exists.
    pub fn span(&self, offset: usize, len: usize) -> Result<DmaSpan, DmaError> {
        self.bounds(offset, len)?;
        let iova =
            self.allocation
                .iova()
                .checked_add(offset as u64)
                .ok_or(DmaError::OutOfBounds {
                    offset,
                    len,
                    size: self.len(),
                })?;
        let len = u32::try_from(len).map_err(|_| DmaError::TooLarge {
            requested: len,
            max: u32::MAX as usize,
        })?;
        self.allocation.mark_dirty(offset + len as usize);
        Ok(DmaSpan {
            iova,
            len,
            allocation: Arc::clone(&self.allocation),
        })
    }

    /// The whole buffer as a span.
    pub fn whole(&self) -> DmaSpan {
        self.allocation.mark_dirty(self.len());
        DmaSpan {
            iova: self.allocation.iova(),
            len: u32::try_from(self.len()).unwrap_or(u32::MAX),
            allocation: Arc::clone(&self.allocation),
        }
    }

    fn bounds(&self, offset: usize, len: usize) -> Result<usize, DmaError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.allocation.len => Ok(self.allocation.offset + offset),
            _ => Err(DmaError::OutOfBounds {
                offset,
                len,
                size: self.allocation.len,
            }),
        }
    }

    /// Copies `buf.len()` bytes from `offset` out of the buffer.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), DmaError> {
        let at = self.bounds(offset, buf.len())?;
        Ok(self.allocation.region.read(at, buf)?)
    }

    /// Copies `data` into the buffer at `offset`.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), DmaError> {
        let at = self.bounds(offset, data.len())?;
        self.allocation.mark_dirty(offset + data.len());
        Ok(self.allocation.region.write(at, data)?)
    }

    /// Reads `len` bytes from `offset` into a new vector.
    pub fn to_vec(&self, offset: usize, len: usize) -> Result<Vec<u8>, DmaError> {
        let mut out = vec![0; len];
        self.read(offset, &mut out)?;
        Ok(out)
    }

    /// Zeroes the whole buffer now (the pool zeroes it anyway when it is freed).
    pub fn zeroize(&self) -> Result<(), DmaError> {
        Ok(self
            .allocation
            .region
            .zero(self.allocation.offset, self.allocation.len)?)
    }

    /// Writes `data` with non-temporal stores; see [`DmaRegion::write_streaming`].
    pub fn write_streaming(&self, offset: usize, data: &[u8]) -> Result<(), DmaError> {
        let at = self.bounds(offset, data.len())?;
        self.allocation.mark_dirty(offset + data.len());
        Ok(self.allocation.region.write_streaming(at, data)?)
    }

    /// Loads a 32-bit word at a 4-byte aligned offset with acquire ordering.
    pub fn load_u32_acquire(&self, offset: usize) -> Result<u32, DmaError> {
        let at = self.bounds(offset, 4)?;
        Ok(self.allocation.region.load_u32_acquire(at)?)
    }

    /// The host address of `len` bytes at `offset`, checked against the buffer and its
    /// mapping ([`DmaRegion::host_range`]), for a syscall to read or write.
    fn host_range(&self, offset: usize, len: usize) -> std::io::Result<*mut u8> {
        let at = self.bounds(offset, len).map_err(std::io::Error::other)?;
        self.allocation
            .region
            .host_range(at, len)
            .map_err(std::io::Error::other)
    }

    /// Reads from `fd` (a socket, say) straight into `len` bytes at `offset`: one `read(2)`,
    /// no copy through host memory. Returns what the kernel returned (0 at end of stream;
    /// `WouldBlock` on a non-blocking descriptor with nothing to read).
    ///
    /// Like [`DmaBuffer::write`], this is for memory the host holds: a buffer not named by a
    /// job in flight. The kernel writes the bytes; no Rust reference to them is made.
    pub fn read_from_fd(
        &self,
        fd: BorrowedFd<'_>,
        offset: usize,
        len: usize,
    ) -> std::io::Result<usize> {
        let ptr = self.host_range(offset, len)?;
        // SAFETY: `check` proved [ptr, ptr + len) lies inside the live mapping this
        // allocation holds (kept alive by `self`). The slice is of `MaybeUninit`, so no
        // validity is assumed of the bytes, and it lives only for the syscall, in which only
        // the kernel writes it.
        let target =
            unsafe { std::slice::from_raw_parts_mut(ptr.cast::<std::mem::MaybeUninit<u8>>(), len) };
        let (filled, _) = rustix::io::read(fd, target)?;
        // The kernel wrote exactly what it reported: that much is zeroed when freed.
        self.allocation.mark_dirty(offset + filled.len());
        Ok(filled.len())
    }

    /// Writes several ranges of DMA buffers to `fd` with one `writev(2)`, in order; returns
    /// how many bytes the kernel took. Same rules as [`DmaBuffer::write_to_fd`].
    pub fn write_all_to_fd(
        fd: BorrowedFd<'_>,
        parts: &[(&DmaBuffer, std::ops::Range<usize>)],
    ) -> std::io::Result<usize> {
        let mut slices = Vec::with_capacity(parts.len());
        for (buffer, range) in parts {
            let ptr = buffer.host_range(range.start, range.len())?;
            // SAFETY: as in `write_to_fd`: each range is inside its buffer's live mapping
            // (the buffers are borrowed for the call), read by the kernel during the syscall.
            slices.push(std::io::IoSlice::new(unsafe {
                std::slice::from_raw_parts(ptr.cast_const(), range.len())
            }));
        }
        Ok(rustix::io::writev(fd, &slices)?)
    }

    /// Declares the contents public: bytes that go to the network as they are (sealed
    /// records). The pool then takes the memory back without zeroing it: only
    /// [`DmaPool::alloc_for_output`] hands it out as it is; [`DmaPool::alloc`] zeroes it first.
    pub fn mark_public(&self) {
        self.allocation.public.store(true, Ordering::Relaxed);
    }

    /// Writes `len` bytes at `offset` straight to `fd`: one `write(2)` from DMA memory.
    /// Returns how many bytes the kernel took.
    ///
    /// For memory the device is done with (its job completed): the bytes are what it wrote,
    /// and the kernel reads them once.
    pub fn write_to_fd(
        &self,
        fd: BorrowedFd<'_>,
        offset: usize,
        len: usize,
    ) -> std::io::Result<usize> {
        let ptr = self.host_range(offset, len)?;
        // SAFETY: as in `read_from_fd`: inside the live mapping, for the syscall only; the
        // protocol gives the memory back to the host at the job's completion, so no one
        // writes it meanwhile (a device that breaks that rule races only on its own output).
        let source = unsafe { std::slice::from_raw_parts(ptr.cast_const(), len) };
        Ok(rustix::io::write(fd, source)?)
    }
}

/// A piece of DMA memory named in a descriptor: device address and length, and a hold on the
/// buffer it lies in. Made only from a [`DmaBuffer`], so it always lies inside memory the
/// holder owns, and that memory cannot go back to the pool while the span exists.
#[derive(Clone)]
pub struct DmaSpan {
    iova: Iova,
    len: u32,
    allocation: Arc<Allocation>,
}

impl DmaSpan {
    /// The device address of the first byte.
    pub fn iova(&self) -> Iova {
        self.iova
    }

    /// Bytes in the span.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// True for an empty span.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Marks the buffer behind this span as never to be reused (see
    /// [`DmaBuffer::quarantine`]).
    pub(crate) fn quarantine(&self) {
        self.allocation.quarantined.store(true, Ordering::Release);
    }
}

impl PartialEq for DmaSpan {
    fn eq(&self, other: &Self) -> bool {
        self.iova == other.iova && self.len == other.len
    }
}

impl Eq for DmaSpan {}

impl fmt::Debug for DmaSpan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaSpan")
            .field("iova", &self.iova)
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::pool;
    use super::*;

    #[test]
    fn buffers_round_trip_bytes_at_any_alignment() {
        let pool = pool(4 << 20);
        let buf = pool.alloc(1000).unwrap();
        let data: Vec<u8> = (0..777u32).map(|i| i as u8).collect();
        for offset in [0, 1, 3, 7, 8, 13] {
            buf.write(offset, &data).unwrap();
            assert_eq!(buf.to_vec(offset, data.len()).unwrap(), data);
        }
        assert!(buf.write(999, &[1, 2]).is_err());
        assert!(buf.read(usize::MAX, &mut [0]).is_err());
    }

    #[test]
    fn freed_buffers_are_reused_and_come_back_zeroed() {
        let pool = pool(4 << 20);
        let first = pool.alloc(100).unwrap();
        first.write(0, &[0xaa; 100]).unwrap();
        let iova = first.iova();
        drop(first);
        let second = pool.alloc(90).unwrap();
        assert_eq!(second.iova(), iova);
        assert_eq!(second.to_vec(0, 90).unwrap(), vec![0; 90]);
    }

    #[test]
    fn only_a_buffer_nothing_else_names_is_reusable() {
        let pool = pool(4 << 20);
        let buffer = pool.alloc(100).unwrap();
        buffer.write(0, &[0xaa; 100]).unwrap();
        let iova = buffer.iova();
        // A span (a job) still names it: not reusable, and its memory is not freed either.
        let span = buffer.span(0, 10).unwrap();
        assert!(buffer.reusable().is_none());
        assert_ne!(pool.alloc(100).unwrap().iova(), iova, "held by the span");
        drop(span);
        // Nothing else names it: back with its contents, for the same owner.
        let buffer = pool.alloc(100).unwrap();
        buffer.write(0, &[0xbb; 100]).unwrap();
        let iova = buffer.iova();
        let buffer = buffer.reusable().expect("sole owner");
        assert_eq!(buffer.iova(), iova);
        assert_eq!(buffer.to_vec(0, 100).unwrap(), vec![0xbb; 100]);
        // Quarantined memory is never reused, not even by its owner.
        buffer.quarantine();
        assert!(buffer.reusable().is_none());
        // A reused buffer's contents are still zeroed when it is finally freed.
        let buffer = pool.alloc(100).unwrap();
        buffer.write(0, &[0xcc; 100]).unwrap();
        let iova = buffer.iova();
        drop(buffer.reusable().expect("sole owner"));
        let next = pool.alloc(100).unwrap();
        assert_eq!(next.iova(), iova);
        assert_eq!(next.to_vec(0, 100).unwrap(), vec![0; 100]);
    }

    #[test]
    fn sockets_read_into_and_write_from_dma_memory_without_a_host_copy() {
        use std::io::{Read, Write};
        use std::os::fd::AsFd;
        let pool = pool(4 << 20);
        let (mut near, far) = std::os::unix::net::UnixStream::pair().unwrap();
        near.write_all(b"from the peer").unwrap();
        let buffer = pool.alloc(4096).unwrap();
        assert_eq!(buffer.read_from_fd(far.as_fd(), 10, 4000).unwrap(), 13);
        assert_eq!(buffer.to_vec(10, 13).unwrap(), b"from the peer");
        assert_eq!(buffer.write_to_fd(far.as_fd(), 10, 13).unwrap(), 13);
        let mut back = [0u8; 13];
        near.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"from the peer");
        assert!(
            buffer.read_from_fd(far.as_fd(), 4000, 200).is_err(),
            "out of bounds"
        );
        // What the kernel wrote counts as written: it is zeroed when freed.
        let iova = buffer.iova();
        drop(buffer);
        let again = pool.alloc(4096).unwrap();
        assert_eq!(again.iova(), iova);
        assert_eq!(again.to_vec(0, 4096).unwrap(), vec![0; 4096]);
    }

    #[test]
    fn public_contents_are_reused_only_as_output_and_zeroed_for_anyone_else() {
        let pool = pool(4 << 20);
        let sealed = pool.alloc_for_output(100).unwrap();
        sealed.write(0, &[0x5a; 100]).unwrap();
        sealed.mark_public();
        let iova = sealed.iova();
        drop(sealed);
        // Another seal's output may start from the old records...
        let output = pool.alloc_for_output(100).unwrap();
        assert_eq!(output.iova(), iova);
        assert_eq!(output.to_vec(0, 4).unwrap(), vec![0x5a; 4], "not zeroed");
        // ...and when it is not marked public, everything it held is zeroed on free.
        drop(output);
        let plain = pool.alloc(100).unwrap();
        assert_eq!(plain.iova(), iova);
        assert_eq!(plain.to_vec(0, 100).unwrap(), vec![0; 100]);
        // An ordinary buffer never sees public bytes either.
        plain.write(0, &[0x77; 100]).unwrap();
        plain.mark_public();
        drop(plain);
        let ring = pool.alloc(100).unwrap();
        assert_eq!(
            ring.to_vec(0, 100).unwrap(),
            vec![0; 100],
            "zeroed before reuse"
        );
    }

    #[test]
    fn a_span_keeps_its_memory_out_of_the_pool() {
        let pool = pool(4 << 20);
        let buffer = pool.alloc(100).unwrap();
        let iova = buffer.iova();
        let span = buffer.span(10, 50).unwrap();
        drop(buffer);
        for _ in 0..4 {
            assert_ne!(
                pool.alloc(90).unwrap().iova(),
                iova,
                "memory a span holds came back"
            );
        }
        drop(span);
        assert_eq!(pool.alloc(90).unwrap().iova(), iova);
    }

    #[test]
    fn memory_a_device_may_have_written_is_zeroed_when_freed() {
        let pool = pool(4 << 20);
        let buffer = pool.alloc(4000).unwrap();
        let iova = buffer.iova();
        let span = buffer.span(0, 3000).unwrap();
        // The device writes through the span; the host never touched these bytes.
        buffer
            .allocation
            .region
            .write(buffer.allocation.offset + 2000, &[0x5a; 1000])
            .unwrap();
        drop((buffer, span));
        let next = pool.alloc(4000).unwrap();
        assert_eq!(next.iova(), iova);
        assert_eq!(next.to_vec(0, 4000).unwrap(), vec![0; 4000]);
    }

    #[test]
    fn quarantined_buffers_are_never_handed_out_again() {
        let pool = pool(4 << 20);
        let ring = pool.alloc(100).unwrap();
        let iova = ring.iova();
        ring.quarantine();
        drop(ring);
        for _ in 0..4 {
            let next = pool.alloc(90).unwrap();
            assert_ne!(next.iova(), iova, "a quarantined buffer came back");
        }
    }

    #[test]
    fn large_buffers_are_page_aligned_and_the_limit_holds() {
        let pool = pool(2 << 20);
        let ring = pool.alloc(8192).unwrap();
        assert_eq!(ring.iova().0 % 4096, 0);
        assert!(matches!(
            pool.alloc(2 << 20),
            Err(DmaError::TooLarge { .. })
        ));
        let _a = pool.alloc(1 << 20).unwrap();
        assert!(matches!(
            pool.alloc(1 << 20),
            Err(DmaError::Exhausted { .. })
        ));
    }

    #[test]
    fn atomic_words_need_alignment() {
        let pool = pool(4 << 20);
        let buf = pool.alloc(64).unwrap();
        buf.write(4, &7u32.to_le_bytes()).unwrap();
        assert_eq!(buf.load_u32_acquire(4).unwrap(), 7);
        assert!(buf.load_u32_acquire(2).is_err());
    }
}

/// What the driver's unit tests share: a pool with no device behind it, and memfds with
/// chosen seals.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    #[derive(Debug, Default)]
    pub(crate) struct NoDevice;
    impl DmaMapper for NoDevice {
        fn map(&self, _: &Arc<DmaRegion>, _: Iova) -> Result<(), DmaError> {
            Ok(())
        }
        fn unmap(&self, _: Iova, _: usize) -> Result<(), DmaError> {
            Ok(())
        }
    }

    /// A pool of 1 MiB regions holding at most `limit` bytes, mapped for no device.
    pub(crate) fn pool(limit: usize) -> DmaPool {
        DmaPool::new(Arc::new(NoDevice), 1 << 20, limit)
    }

    /// A memfd of `len` bytes with `seals` added.
    pub(crate) fn memfd(len: u64, seals: rustix::fs::SealFlags) -> std::os::fd::OwnedFd {
        use rustix::fs::{fcntl_add_seals, ftruncate, memfd_create, MemfdFlags};
        let fd = memfd_create(
            "tlsaccel-test",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .unwrap();
        ftruncate(&fd, len).unwrap();
        fcntl_add_seals(&fd, seals).unwrap();
        fd
    }
}
