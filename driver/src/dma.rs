//! DMA memory: large shared mappings the device can reach, carved into buffers.
//!
//! Memory the device also writes is never reached through a Rust reference. Every access is a
//! volatile copy or an atomic load/store on a raw pointer, bounds-checked against the mapping
//! first. Regions are backed by a memfd so that another process (a vfio-user device) can map
//! the same pages; 2 MiB huge pages are used when the system has them.

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use memmap2::{MmapOptions, MmapRaw};
use rustix::fs::{
    fcntl_add_seals, fcntl_get_seals, fstat, ftruncate, memfd_create, MemfdFlags, SealFlags,
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
    #[error("could not create DMA memory of {size} bytes")]
    Create {
        size: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("shared memory of {size} bytes cannot hold {len} bytes at offset {offset}")]
    SharedMemoryTooSmall { size: u64, offset: u64, len: usize },
    #[error("shared memory is not sealed against shrinking (seals {seals:#x}), so its owner could truncate it under the mapping")]
    SharedMemoryNotSealed { seals: u32 },
    #[error("cannot read the size of shared memory")]
    SharedMemoryStat(#[source] std::io::Error),
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

/// A window of memory the device can reach: all of a memfd-backed mapping this driver made,
/// or part of another mapping (a device BAR, or memory another process shared). The mapping
/// is unmapped when the last region using it goes.
pub struct DmaRegion {
    map: Arc<MmapRaw>,
    fd: Option<Arc<OwnedFd>>,
    offset: usize,
    len: usize,
    huge_pages: bool,
}

impl fmt::Debug for DmaRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaRegion")
            .field("len", &self.len)
            .field("offset", &self.offset)
            .field("huge_pages", &self.huge_pages)
            .finish()
    }
}

const HUGE_PAGE: usize = 2 << 20;

/// Copies at least this long are payloads and use `memcpy` (see [`DmaRegion::read`]).
pub const BULK_COPY: usize = 256;

impl DmaRegion {
    /// Creates a zero-filled shared region of `len` bytes (rounded up to the page size).
    pub fn new(len: usize) -> Result<Self, DmaError> {
        if len % HUGE_PAGE == 0 {
            if let Ok(region) = Self::create(len, true) {
                return Ok(region);
            }
        }
        Self::create(len, false).map_err(|source| DmaError::Create { size: len, source })
    }

    fn create(len: usize, huge_pages: bool) -> std::io::Result<Self> {
        let mut flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
        if huge_pages {
            flags |= MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB;
        }
        let fd = memfd_create("tlsaccel-dma", flags)?;
        ftruncate(&fd, len as u64)?;
        // The memfd is shared with another process (a vfio-user peer): sealed, its size is
        // fixed, so neither side can truncate it under the other's mapping (an access past the
        // end of the file is SIGBUS), and the seals themselves cannot change. Peers that map
        // it check for F_SEAL_SHRINK ([`check_shared_memory`]). hugetlbfs memfds take these
        // seals since Linux 4.16 (checked on 6.18); an older kernel refuses them, and then
        // this fails and `new` falls back to ordinary pages, which have taken them since
        // 3.17: a region is never shared unsealed.
        fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
        let map = MmapOptions::new().len(len).populate().map_raw(&fd)?;
        Ok(Self {
            map: Arc::new(map),
            fd: Some(Arc::new(fd)),
            offset: 0,
            len,
            huge_pages,
        })
    }

    /// Maps `len` bytes of a shared-memory file another process created (a memfd received
    /// over a socket), read-write and shared. Refused unless the file is sealed against
    /// shrinking and holds the range ([`check_shared_memory`]).
    pub fn from_fd(fd: OwnedFd, len: usize) -> Result<Self, DmaError> {
        Self::from_fd_at(fd, 0, len)
    }

    /// Maps `len` bytes at `offset` (a multiple of the page size) of a shared-memory file.
    /// Refused unless the file is sealed against shrinking and holds the range
    /// ([`check_shared_memory`]).
    pub fn from_fd_at(fd: OwnedFd, offset: u64, len: usize) -> Result<Self, DmaError> {
        check_shared_memory(fd.as_fd(), offset, len)?;
        let map = MmapOptions::new()
            .offset(offset)
            .len(len)
            .map_raw(&fd)
            .map_err(|source| DmaError::Create { size: len, source })?;
        Ok(Self {
            map: Arc::new(map),
            fd: Some(Arc::new(fd)),
            offset: 0,
            len,
            huge_pages: false,
        })
    }

    /// A window of `len` bytes at `offset` in an existing mapping (for example a BAR).
    pub fn window(map: Arc<MmapRaw>, offset: usize, len: usize) -> Result<Self, DmaError> {
        match offset.checked_add(len) {
            Some(end) if end <= map.len() => Ok(Self {
                map,
                fd: None,
                offset,
                len,
                huge_pages: false,
            }),
            _ => Err(DmaError::OutOfBounds {
                offset,
                len,
                size: map.len(),
            }),
        }
    }

    /// True when this region is the window at `offset` of the mapping `map`.
    pub fn is_window_of(&self, map: &Arc<MmapRaw>, offset: usize) -> bool {
        Arc::ptr_eq(&self.map, map) && self.offset == offset
    }

    /// A window of `len` bytes at `offset` inside this region, sharing its mapping.
    pub fn subregion(&self, offset: usize, len: usize) -> Result<Self, DmaError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(Self {
                map: Arc::clone(&self.map),
                fd: self.fd.clone(),
                offset: self.offset + offset,
                len,
                huge_pages: self.huge_pages,
            }),
            _ => Err(DmaError::OutOfBounds {
                offset,
                len,
                size: self.len,
            }),
        }
    }

    /// Bytes in the region.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the region is empty (never, for a region that was created).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True when the region is backed by huge pages.
    pub fn huge_pages(&self) -> bool {
        self.huge_pages
    }

    /// The shared-memory file behind the region and the region's offset in it, for
    /// transports that share it with another process. `None` for windows of a BAR.
    pub fn fd(&self) -> Option<(BorrowedFd<'_>, u64)> {
        self.fd.as_ref().map(|fd| (fd.as_fd(), self.offset as u64))
    }

    /// The host virtual address of the region, for transports that map it for the device
    /// (kernel VFIO). Not for access: use the checked methods.
    pub fn host_address(&self) -> NonNull<u8> {
        NonNull::new(self.map.as_mut_ptr().wrapping_add(self.offset)).unwrap_or(NonNull::dangling())
    }

    fn check(&self, offset: usize, len: usize) -> Result<*mut u8, DmaError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => {
                // The pointer arithmetic stays inside the mapping: the window lies inside it
                // (checked at construction) and end <= self.len.
                Ok(self.map.as_mut_ptr().wrapping_add(self.offset + offset))
            }
            _ => Err(DmaError::OutOfBounds {
                offset,
                len,
                size: self.len,
            }),
        }
    }

    /// Copies bytes at `offset` into `buf`.
    ///
    /// Short copies (ring entries, key blocks) use volatile loads. Payloads of
    /// [`BULK_COPY`] bytes or more use `memcpy` on raw pointers: the ring protocol gives a
    /// payload buffer to the device at the doorbell (release) and back at the completion
    /// (acquire), so the two sides never access it at the same time and the copy cannot be
    /// torn by the protocol's rules; a peer that breaks them gets garbage in the bytes it
    /// raced on, and nothing here reads those bytes twice or trusts them.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), DmaError> {
        let src = self.check(offset, buf.len())?;
        if buf.len() >= BULK_COPY {
            // SAFETY: `check` proved [src, src + buf.len()) lies inside the live mapping owned
            // by `self.map`; `buf` is a distinct Rust allocation, so the ranges do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
        } else {
            // SAFETY: as above.
            unsafe { volatile_copy_from(src, buf) };
        }
        Ok(())
    }

    /// Copies `data` to `offset`; volatile for short copies, `memcpy` for payloads (see
    /// [`DmaRegion::read`]).
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), DmaError> {
        let dst = self.check(offset, data.len())?;
        if data.len() >= BULK_COPY {
            // SAFETY: the destination is inside the mapping (`check`) and does not overlap
            // `data`, which is ordinary Rust memory.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        } else {
            // SAFETY: as above.
            unsafe { volatile_copy_to(dst, data) };
        }
        Ok(())
    }

    /// Fills `len` bytes at `offset` with zeros. Short ranges use volatile stores (eight
    /// bytes each where aligned); payload-sized ones `memset`, for the same reason as
    /// [`DmaRegion::write`]: the memory is the driver's alone when it is cleared (a freed
    /// buffer the device has let go of), and it stays mapped and is read again through other
    /// pointers, so the stores cannot be dropped as dead.
    pub fn zero(&self, offset: usize, len: usize) -> Result<(), DmaError> {
        let dst = self.check(offset, len)?;
        if len >= BULK_COPY {
            // SAFETY: `check` proved [dst, dst + len) lies inside the live mapping owned by
            // `self.map`; u8 has no alignment requirement.
            unsafe { std::ptr::write_bytes(dst, 0, len) };
            std::sync::atomic::compiler_fence(Ordering::Release);
            return Ok(());
        }
        let head = dst.align_offset(8).min(len);
        let words = (len - head) / 8;
        for i in 0..head {
            // SAFETY: `check` proved dst + i is inside the mapping for every i < len.
            unsafe { dst.add(i).write_volatile(0) };
        }
        let aligned = dst.wrapping_add(head).cast::<u64>();
        for i in 0..words {
            // SAFETY: `aligned` is 8-byte aligned and aligned + i covers bytes
            // head + 8i .. head + 8i + 8, all below len, so inside the checked range.
            unsafe { aligned.add(i).write_volatile(0) };
        }
        for i in head + 8 * words..len {
            // SAFETY: i < len, inside the checked range.
            unsafe { dst.add(i).write_volatile(0) };
        }
        Ok(())
    }

    /// Writes `data` at `offset` with non-temporal stores: whole lines go to memory without
    /// first fetching them for ownership from the cache of the device (or the core running
    /// it), which read them last. Callers must issue [`store_fence`] before telling the
    /// device to look. `offset` and `data.len()` must be multiples of 8.
    pub fn write_streaming(&self, offset: usize, data: &[u8]) -> Result<(), DmaError> {
        let dst = self.check(offset, data.len())?;
        if dst.align_offset(8) != 0 || data.len() % 8 != 0 {
            return self.write(offset, data);
        }
        for (i, chunk) in data.chunks_exact(8).enumerate() {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            let word = i64::from_ne_bytes(word);
            let at = dst.wrapping_add(i * 8).cast::<i64>();
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `at` is 8-byte aligned and inside the mapping (`check` covered
            // [dst, dst + data.len())); movnti has no other requirement.
            unsafe {
                core::arch::x86_64::_mm_stream_si64(at, word)
            };
            #[cfg(not(target_arch = "x86_64"))]
            // SAFETY: as above, an aligned in-bounds pointer into the mapping.
            unsafe {
                at.write_volatile(word)
            };
        }
        Ok(())
    }

    fn atomic_u32(&self, offset: usize) -> Result<&AtomicU32, DmaError> {
        let ptr = self.check(offset, 4)?;
        if ptr.align_offset(4) != 0 {
            return Err(DmaError::OutOfBounds {
                offset,
                len: 4,
                size: self.len,
            });
        }
        // SAFETY: the pointer is inside the mapping, 4-byte aligned, and valid for the
        // lifetime of `&self` (the mapping lives as long as the region). Every access to
        // these words by either side is atomic, which is what `AtomicU32::from_ptr` needs.
        Ok(unsafe { AtomicU32::from_ptr(ptr.cast::<u32>()) })
    }

    /// Loads a little-endian 32-bit word with acquire ordering.
    pub fn load_u32_acquire(&self, offset: usize) -> Result<u32, DmaError> {
        Ok(u32::from_le(
            self.atomic_u32(offset)?.load(Ordering::Acquire),
        ))
    }

    /// Stores a little-endian 32-bit word with release ordering.
    pub fn store_u32_release(&self, offset: usize, value: u32) -> Result<(), DmaError> {
        self.atomic_u32(offset)?
            .store(value.to_le(), Ordering::Release);
        Ok(())
    }
}

/// The DMA write barrier (device-spec §3.2): orders every earlier store to DMA memory,
/// ordinary or non-temporal, before every later store, the doorbell write in particular.
///
/// * x86-64: stores to write-back memory are already ordered; `sfence` orders the
///   non-temporal ones of [`DmaRegion::write_streaming`], and the release fence stops the
///   compiler from moving stores across.
/// * aarch64: `dmb oshst`, what Linux's `dma_wmb()` is there. Rust's release fence is a
///   `dmb ish`, which orders stores only for the inner-shareable domain (other cores), not
///   for a device observing the outer-shareable one.
/// * any other architecture: a sequentially consistent fence, which orders stores for other
///   CPUs but is not promised to order them for a device. Give the architecture its own DMA
///   write barrier here before running the driver on it.
pub fn store_fence() {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: sfence has no preconditions.
        unsafe { core::arch::x86_64::_mm_sfence() };
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: `dmb oshst` only orders this CPU's stores: it reads and writes no memory and no
    // register, needs no stack, leaves the flags alone, and is allowed at EL0 on every
    // AArch64 implementation. Without `nomem` the compiler treats the block as touching
    // memory, so it moves no load or store across it either: the block is a compiler
    // barrier as well as a hardware one.
    unsafe {
        core::arch::asm!("dmb oshst", options(nostack, preserves_flags))
    };
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

/// Checks that `len` bytes at `offset` of a shared-memory file another process sent can be
/// mapped without that process being able to take them away: the file is sealed against
/// shrinking (`F_SEAL_SHRINK`, which cannot be removed again) and is at least
/// `offset + len` bytes long. Without the seal the sender could truncate the file under the
/// mapping and turn the next access into SIGBUS.
///
/// The seal is read before the size: once the seal is seen the size can no longer go down,
/// so the size read after it holds for the life of the mapping.
pub fn check_shared_memory(fd: BorrowedFd<'_>, offset: u64, len: usize) -> Result<(), DmaError> {
    // Files that cannot carry seals (anything but memfds) answer EINVAL: not sealed.
    let seals = fcntl_get_seals(fd).unwrap_or(SealFlags::empty());
    if !seals.contains(SealFlags::SHRINK) {
        return Err(DmaError::SharedMemoryNotSealed {
            seals: seals.bits(),
        });
    }
    let stat = fstat(fd).map_err(|e| DmaError::SharedMemoryStat(e.into()))?;
    let size = u64::try_from(stat.st_size).unwrap_or(0);
    let fits = u64::try_from(len)
        .ok()
        .and_then(|len| offset.checked_add(len))
        .is_some_and(|end| end <= size);
    if !fits {
        return Err(DmaError::SharedMemoryTooSmall { size, offset, len });
    }
    Ok(())
}

#[cfg(test)]
mod shared_memory_tests {
    use super::*;

    use super::test_support::memfd;

    #[test]
    fn regions_are_sealed_so_no_peer_can_resize_them() {
        let region = DmaRegion::new(1 << 20).unwrap();
        let (fd, _) = region.fd().unwrap();
        let seals = fcntl_get_seals(fd).unwrap();
        assert!(seals.contains(SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL));
        // What a hostile peer holding the fd would try: all refused.
        assert!(ftruncate(fd, 4096).is_err());
        assert!(ftruncate(fd, 0).is_err());
        assert!(ftruncate(fd, 2 << 20).is_err());
        assert!(fcntl_add_seals(fd, SealFlags::WRITE).is_err());
        // The memory still works, and a peer may map it.
        region.write(0, b"sealed").unwrap();
        check_shared_memory(fd, 0, 1 << 20).unwrap();
    }

    #[test]
    fn huge_page_regions_are_sealed_too_when_the_system_has_them() {
        // Without reserved huge pages `create(_, true)` fails and `new` uses ordinary pages;
        // both paths must end sealed.
        let region = DmaRegion::new(HUGE_PAGE).unwrap();
        let (fd, _) = region.fd().unwrap();
        assert!(fcntl_get_seals(fd).unwrap().contains(SealFlags::SHRINK));
        assert!(ftruncate(fd, 0).is_err());
    }

    #[test]
    fn unsealed_shared_memory_is_refused() {
        let fd = memfd(1 << 16, SealFlags::empty());
        let error = DmaRegion::from_fd(fd, 1 << 16).unwrap_err();
        assert!(
            matches!(error, DmaError::SharedMemoryNotSealed { seals: 0 }),
            "{error}"
        );
        assert!(error.to_string().contains("not sealed against shrinking"));
        // Sealed against growing only is not enough.
        let fd = memfd(1 << 16, SealFlags::GROW | SealFlags::SEAL);
        assert!(matches!(
            DmaRegion::from_fd(fd, 1 << 16),
            Err(DmaError::SharedMemoryNotSealed { .. })
        ));
        // A memfd made without ALLOW_SEALING carries F_SEAL_SEAL only.
        let fd = memfd_create("tlsaccel-test", MemfdFlags::CLOEXEC).unwrap();
        ftruncate(&fd, 1 << 16).unwrap();
        assert!(matches!(
            DmaRegion::from_fd(fd, 1 << 16),
            Err(DmaError::SharedMemoryNotSealed { .. })
        ));
    }

    #[test]
    fn a_file_that_cannot_be_sealed_is_refused() {
        let path = std::env::temp_dir().join(format!("tlsaccel-unsealable-{}", std::process::id()));
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file.set_len(1 << 16).unwrap();
        assert!(matches!(
            DmaRegion::from_fd(file.into(), 1 << 16),
            Err(DmaError::SharedMemoryNotSealed { .. })
        ));
    }

    #[test]
    fn shared_memory_smaller_than_the_mapping_is_refused() {
        let seals = SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL;
        let error = DmaRegion::from_fd_at(memfd(1 << 16, seals), 0, 1 << 17).unwrap_err();
        assert!(
            matches!(
                error,
                DmaError::SharedMemoryTooSmall {
                    size: 65536,
                    offset: 0,
                    len: 131072
                }
            ),
            "{error}"
        );
        assert_eq!(
            error.to_string(),
            "shared memory of 65536 bytes cannot hold 131072 bytes at offset 0"
        );
        assert!(matches!(
            DmaRegion::from_fd_at(memfd(1 << 16, seals), 1 << 12, 1 << 16),
            Err(DmaError::SharedMemoryTooSmall { .. })
        ));
        assert!(matches!(
            DmaRegion::from_fd_at(memfd(1 << 16, seals), u64::MAX - 4095, 1 << 12),
            Err(DmaError::SharedMemoryTooSmall { .. })
        ));
        // The same file, asked for what it holds, maps and works.
        let region = DmaRegion::from_fd_at(memfd(1 << 16, seals), 1 << 12, 1 << 15).unwrap();
        region.write(0, &[7; 64]).unwrap();
    }
}

/// Copies from device-shared memory into `dst` using aligned 8-byte volatile loads.
///
/// # Safety
/// `src` must be valid for reads of `dst.len()` bytes and must not overlap `dst`.
unsafe fn volatile_copy_from(src: *const u8, dst: &mut [u8]) {
    let len = dst.len();
    let mut i = 0;
    // Head bytes until `src + i` is 8-byte aligned.
    while i < len && (src as usize + i) % 8 != 0 {
        // SAFETY: i < len and the caller guarantees src is readable for len bytes.
        dst[i] = unsafe { src.add(i).read_volatile() };
        i += 1;
    }
    while i + 8 <= len {
        // SAFETY: src + i is 8-byte aligned (loop above) and i + 8 <= len keeps the read
        // inside the caller's range.
        let word = unsafe { src.add(i).cast::<u64>().read_volatile() };
        dst[i..i + 8].copy_from_slice(&word.to_ne_bytes());
        i += 8;
    }
    while i < len {
        // SAFETY: i < len.
        dst[i] = unsafe { src.add(i).read_volatile() };
        i += 1;
    }
}

/// Copies `src` into device-shared memory using aligned 8-byte volatile stores.
///
/// # Safety
/// `dst` must be valid for writes of `src.len()` bytes and must not overlap `src`.
unsafe fn volatile_copy_to(dst: *mut u8, src: &[u8]) {
    let len = src.len();
    let mut i = 0;
    while i < len && (dst as usize + i) % 8 != 0 {
        // SAFETY: i < len and the caller guarantees dst is writable for len bytes.
        unsafe { dst.add(i).write_volatile(src[i]) };
        i += 1;
    }
    while i + 8 <= len {
        let mut word = [0u8; 8];
        word.copy_from_slice(&src[i..i + 8]);
        // SAFETY: dst + i is 8-byte aligned and i + 8 <= len.
        unsafe {
            dst.add(i)
                .cast::<u64>()
                .write_volatile(u64::from_ne_bytes(word))
        };
        i += 8;
    }
    while i < len {
        // SAFETY: i < len.
        unsafe { dst.add(i).write_volatile(src[i]) };
        i += 1;
    }
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
                    // instance used): zero it once, so every buffer starts zeroed.
                    region.zero(0, region.len())?;
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
        self.allocation.region.read(at, buf)
    }

    /// Copies `data` into the buffer at `offset`.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), DmaError> {
        let at = self.bounds(offset, data.len())?;
        self.allocation.mark_dirty(offset + data.len());
        self.allocation.region.write(at, data)
    }

    /// Reads `len` bytes from `offset` into a new vector.
    pub fn to_vec(&self, offset: usize, len: usize) -> Result<Vec<u8>, DmaError> {
        let mut out = vec![0; len];
        self.read(offset, &mut out)?;
        Ok(out)
    }

    /// Zeroes the whole buffer now (the pool zeroes it anyway when it is freed).
    pub fn zeroize(&self) -> Result<(), DmaError> {
        self.allocation
            .region
            .zero(self.allocation.offset, self.allocation.len)
    }

    /// Writes `data` with non-temporal stores; see [`DmaRegion::write_streaming`].
    pub fn write_streaming(&self, offset: usize, data: &[u8]) -> Result<(), DmaError> {
        let at = self.bounds(offset, data.len())?;
        self.allocation.mark_dirty(offset + data.len());
        self.allocation.region.write_streaming(at, data)
    }

    /// Loads a 32-bit word at a 4-byte aligned offset with acquire ordering.
    pub fn load_u32_acquire(&self, offset: usize) -> Result<u32, DmaError> {
        let at = self.bounds(offset, 4)?;
        self.allocation.region.load_u32_acquire(at)
    }

    /// The host address of `len` bytes at `offset`, checked against the buffer and its
    /// mapping (`DmaRegion::check`), for a syscall to read or write.
    fn host_range(&self, offset: usize, len: usize) -> std::io::Result<*mut u8> {
        let at = self.bounds(offset, len).map_err(std::io::Error::other)?;
        self.allocation
            .region
            .check(at, len)
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
    pub(crate) fn memfd(len: u64, seals: SealFlags) -> OwnedFd {
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
