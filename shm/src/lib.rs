//! Shared memory both sides of the device boundary use: memfd-backed mappings sealed
//! against resizing, windows of other mappings (a BAR), and the accessors that touch memory
//! the other side also writes (volatile or `memcpy` copies, atomic words), with the DMA write
//! barrier. The driver carves its DMA buffers from these regions; the simulator's servers
//! (vfio-user, ivshmem) map what a client shares with them through the same type, so neither
//! depends on the other.
//!
//! Memory the other side also writes is never reached through a Rust reference. Every access
//! is a volatile copy or an atomic load/store on a raw pointer, bounds-checked against the
//! mapping first. Regions are backed by a memfd so that another process can map the same
//! pages; 2 MiB huge pages are used when the system has them.

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use memmap2::MmapOptions;
pub use memmap2::MmapRaw;
use rustix::fs::{
    fcntl_add_seals, fcntl_get_seals, fstat, ftruncate, memfd_create, MemfdFlags, SealFlags,
};

/// Errors of shared memory.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    #[error("could not create shared memory of {size} bytes")]
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
    #[error("access of {len} bytes at offset {offset} is outside a {size}-byte region")]
    OutOfBounds {
        offset: usize,
        len: usize,
        size: usize,
    },
}

/// A window of memory the device can reach: all of a memfd-backed mapping this driver made,
/// or part of another mapping (a device BAR, or memory another process shared). The mapping
/// is unmapped when the last region using it goes.
pub struct SharedRegion {
    map: Arc<MmapRaw>,
    fd: Option<Arc<OwnedFd>>,
    offset: usize,
    len: usize,
    huge_pages: bool,
}

impl fmt::Debug for SharedRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedRegion")
            .field("len", &self.len)
            .field("offset", &self.offset)
            .field("huge_pages", &self.huge_pages)
            .finish()
    }
}

const HUGE_PAGE: usize = 2 << 20;

/// Copies at least this long are payloads and use `memcpy` (see [`SharedRegion::read`]).
pub const BULK_COPY: usize = 256;

impl SharedRegion {
    /// Creates a zero-filled shared region of `len` bytes (rounded up to the page size).
    pub fn new(len: usize) -> Result<Self, ShmError> {
        if len.is_multiple_of(HUGE_PAGE) {
            if let Ok(region) = Self::create(len, true) {
                return Ok(region);
            }
        }
        Self::create(len, false).map_err(|source| ShmError::Create { size: len, source })
    }

    fn create(len: usize, huge_pages: bool) -> std::io::Result<Self> {
        let mut flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
        if huge_pages {
            flags |= MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB;
        }
        let fd = memfd_create("tlsaccel-shm", flags)?;
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
    pub fn from_fd(fd: OwnedFd, len: usize) -> Result<Self, ShmError> {
        Self::from_fd_at(fd, 0, len)
    }

    /// Maps `len` bytes at `offset` (a multiple of the page size) of a shared-memory file.
    /// Refused unless the file is sealed against shrinking and holds the range
    /// ([`check_shared_memory`]).
    pub fn from_fd_at(fd: OwnedFd, offset: u64, len: usize) -> Result<Self, ShmError> {
        check_shared_memory(fd.as_fd(), offset, len)?;
        let map = MmapOptions::new()
            .offset(offset)
            .len(len)
            .map_raw(&fd)
            .map_err(|source| ShmError::Create { size: len, source })?;
        Ok(Self {
            map: Arc::new(map),
            fd: Some(Arc::new(fd)),
            offset: 0,
            len,
            huge_pages: false,
        })
    }

    /// A window of `len` bytes at `offset` in an existing mapping (for example a BAR).
    pub fn window(map: Arc<MmapRaw>, offset: usize, len: usize) -> Result<Self, ShmError> {
        match offset.checked_add(len) {
            Some(end) if end <= map.len() => Ok(Self {
                map,
                fd: None,
                offset,
                len,
                huge_pages: false,
            }),
            _ => Err(ShmError::OutOfBounds {
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
    pub fn subregion(&self, offset: usize, len: usize) -> Result<Self, ShmError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(Self {
                map: Arc::clone(&self.map),
                fd: self.fd.clone(),
                offset: self.offset + offset,
                len,
                huge_pages: self.huge_pages,
            }),
            _ => Err(ShmError::OutOfBounds {
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

    /// The host address of `len` bytes at `offset`, checked against the region, for a
    /// syscall that reads or writes the memory (`readv`, `writev`). Never turn it into a Rust
    /// reference: the other side may write the memory at any time.
    pub fn host_range(&self, offset: usize, len: usize) -> Result<*mut u8, ShmError> {
        self.check(offset, len)
    }

    fn check(&self, offset: usize, len: usize) -> Result<*mut u8, ShmError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => {
                // The pointer arithmetic stays inside the mapping: the window lies inside it
                // (checked at construction) and end <= self.len.
                Ok(self.map.as_mut_ptr().wrapping_add(self.offset + offset))
            }
            _ => Err(ShmError::OutOfBounds {
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
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), ShmError> {
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
    /// [`SharedRegion::read`]).
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), ShmError> {
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
    /// [`SharedRegion::write`]: the memory is the driver's alone when it is cleared (a freed
    /// buffer the device has let go of), and it stays mapped and is read again through other
    /// pointers, so the stores cannot be dropped as dead.
    pub fn zero(&self, offset: usize, len: usize) -> Result<(), ShmError> {
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
    pub fn write_streaming(&self, offset: usize, data: &[u8]) -> Result<(), ShmError> {
        let dst = self.check(offset, data.len())?;
        if dst.align_offset(8) != 0 || !data.len().is_multiple_of(8) {
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

    fn atomic_u32(&self, offset: usize) -> Result<&AtomicU32, ShmError> {
        let ptr = self.check(offset, 4)?;
        if ptr.align_offset(4) != 0 {
            return Err(ShmError::OutOfBounds {
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
    pub fn load_u32_acquire(&self, offset: usize) -> Result<u32, ShmError> {
        Ok(u32::from_le(
            self.atomic_u32(offset)?.load(Ordering::Acquire),
        ))
    }

    /// Stores a little-endian 32-bit word with release ordering.
    pub fn store_u32_release(&self, offset: usize, value: u32) -> Result<(), ShmError> {
        self.atomic_u32(offset)?
            .store(value.to_le(), Ordering::Release);
        Ok(())
    }
}

/// The DMA write barrier (device-spec §3.2): orders every earlier store to DMA memory,
/// ordinary or non-temporal, before every later store, the doorbell write in particular.
///
/// * x86-64: stores to write-back memory are already ordered; `sfence` orders the
///   non-temporal ones of [`SharedRegion::write_streaming`], and the release fence stops the
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
pub fn check_shared_memory(fd: BorrowedFd<'_>, offset: u64, len: usize) -> Result<(), ShmError> {
    // Files that cannot carry seals (anything but memfds) answer EINVAL: not sealed.
    let seals = fcntl_get_seals(fd).unwrap_or(SealFlags::empty());
    if !seals.contains(SealFlags::SHRINK) {
        return Err(ShmError::SharedMemoryNotSealed {
            seals: seals.bits(),
        });
    }
    let stat = fstat(fd).map_err(|e| ShmError::SharedMemoryStat(e.into()))?;
    let size = u64::try_from(stat.st_size).unwrap_or(0);
    let fits = u64::try_from(len)
        .ok()
        .and_then(|len| offset.checked_add(len))
        .is_some_and(|end| end <= size);
    if !fits {
        return Err(ShmError::SharedMemoryTooSmall { size, offset, len });
    }
    Ok(())
}

/// Copies from device-shared memory into `dst` using aligned 8-byte volatile loads.
///
/// # Safety
/// `src` must be valid for reads of `dst.len()` bytes and must not overlap `dst`.
unsafe fn volatile_copy_from(src: *const u8, dst: &mut [u8]) {
    let len = dst.len();
    let mut i = 0;
    // Head bytes until `src + i` is 8-byte aligned.
    while i < len && !(src as usize + i).is_multiple_of(8) {
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
    while i < len && !(dst as usize + i).is_multiple_of(8) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A memfd of `len` bytes with `seals` added.
    fn memfd(len: u64, seals: SealFlags) -> OwnedFd {
        let fd = memfd_create(
            "tlsaccel-test",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .unwrap();
        ftruncate(&fd, len).unwrap();
        fcntl_add_seals(&fd, seals).unwrap();
        fd
    }

    #[test]
    fn regions_are_sealed_so_no_peer_can_resize_them() {
        let region = SharedRegion::new(1 << 20).unwrap();
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
        let region = SharedRegion::new(HUGE_PAGE).unwrap();
        let (fd, _) = region.fd().unwrap();
        assert!(fcntl_get_seals(fd).unwrap().contains(SealFlags::SHRINK));
        assert!(ftruncate(fd, 0).is_err());
    }

    #[test]
    fn unsealed_shared_memory_is_refused() {
        let fd = memfd(1 << 16, SealFlags::empty());
        let error = SharedRegion::from_fd(fd, 1 << 16).unwrap_err();
        assert!(
            matches!(error, ShmError::SharedMemoryNotSealed { seals: 0 }),
            "{error}"
        );
        assert!(error.to_string().contains("not sealed against shrinking"));
        // Sealed against growing only is not enough.
        let fd = memfd(1 << 16, SealFlags::GROW | SealFlags::SEAL);
        assert!(matches!(
            SharedRegion::from_fd(fd, 1 << 16),
            Err(ShmError::SharedMemoryNotSealed { .. })
        ));
        // A memfd made without ALLOW_SEALING carries F_SEAL_SEAL only.
        let fd = memfd_create("tlsaccel-test", MemfdFlags::CLOEXEC).unwrap();
        ftruncate(&fd, 1 << 16).unwrap();
        assert!(matches!(
            SharedRegion::from_fd(fd, 1 << 16),
            Err(ShmError::SharedMemoryNotSealed { .. })
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
            SharedRegion::from_fd(file.into(), 1 << 16),
            Err(ShmError::SharedMemoryNotSealed { .. })
        ));
    }

    #[test]
    fn shared_memory_smaller_than_the_mapping_is_refused() {
        let seals = SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL;
        let error = SharedRegion::from_fd_at(memfd(1 << 16, seals), 0, 1 << 17).unwrap_err();
        assert!(
            matches!(
                error,
                ShmError::SharedMemoryTooSmall {
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
            SharedRegion::from_fd_at(memfd(1 << 16, seals), 1 << 12, 1 << 16),
            Err(ShmError::SharedMemoryTooSmall { .. })
        ));
        assert!(matches!(
            SharedRegion::from_fd_at(memfd(1 << 16, seals), u64::MAX - 4095, 1 << 12),
            Err(ShmError::SharedMemoryTooSmall { .. })
        ));
        // The same file, asked for what it holds, maps and works.
        let region = SharedRegion::from_fd_at(memfd(1 << 16, seals), 1 << 12, 1 << 15).unwrap();
        region.write(0, &[7; 64]).unwrap();
    }
}
