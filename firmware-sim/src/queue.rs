//! One enabled queue pair as the device sees it: the two rings in host memory, the doorbell
//! values the host wrote, the fetch position, and the completion writer with its phase and
//! interrupt-coalescing state.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tlsaccel_abi::{
    Completion, CompletionFlags, Status, COMPLETION_SIZE, COMPLETION_STATUS_WORD, DESCRIPTOR_SIZE,
};
use zerocopy::IntoBytes;

use crate::memory::{DmaFault, DmaRange, HostMemory};
use tlsaccel_abi::regs;

/// A completion the device is about to post.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Posting {
    pub(crate) cookie: u64,
    pub(crate) status: Status,
    pub(crate) result_len: u32,
    pub(crate) info: u8,
    pub(crate) sequence_advanced: bool,
}

#[derive(Debug)]
pub(crate) struct CompletionState {
    tail: u32,
    phase: bool,
    /// Entries promised to jobs fetched but not yet posted.
    reserved: u32,
    irq_pending: u32,
    irq_deadline: Option<Instant>,
    stopped: bool,
}

/// What posting asks of the interrupt logic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IrqAction {
    None,
    SignalNow,
    /// A coalescing window opened; the timer must look again at this instant.
    ArmTimer(Instant),
}

/// A queue's doorbell page and what engines check before touching the queue: plain atomics,
/// so an MMIO doorbell write is a bounds check and a store, with no lock. When the doorbell
/// pages are memory the host maps and writes directly (vfio-user with an mmap-able BAR0), the
/// tail and head words live there instead and engines poll them.
#[derive(Debug, Default)]
pub(crate) struct Doorbells {
    sq_tail: AtomicU32,
    cq_head: AtomicU32,
    /// The device's fetch position (also the `Q_SQ_HEAD` register).
    pub(crate) sq_head: AtomicU32,
    /// Ring size while the queue is enabled, 0 otherwise.
    pub(crate) size: AtomicU32,
    /// An engine found the completion ring full and waits for a head doorbell.
    pub(crate) cq_stalled: AtomicBool,
    /// This queue's doorbell page in host-mapped memory, when doorbells live there.
    external: std::sync::OnceLock<(Arc<dyn HostMemory>, u64)>,
}

impl Doorbells {
    fn load(&self, word: &AtomicU32, which: u64) -> u32 {
        match self.external.get() {
            Some((memory, page)) => memory.read_u32_acquire(page + which).unwrap_or(u32::MAX),
            None => word.load(Ordering::Acquire),
        }
    }

    fn store(&self, word: &AtomicU32, which: u64, value: u32) {
        match self.external.get() {
            Some((memory, page)) => {
                let _ = memory.write_u32_release(page + which, value);
            }
            None => word.store(value, Ordering::SeqCst),
        }
    }

    /// The host's submission tail (unchecked: may be out of range).
    pub(crate) fn sq_tail(&self) -> u32 {
        self.load(&self.sq_tail, regs::DB_SQ_TAIL)
    }

    /// The host's completion head (unchecked: may be out of range).
    pub(crate) fn cq_head(&self) -> u32 {
        self.load(&self.cq_head, regs::DB_CQ_HEAD)
    }

    pub(crate) fn set_sq_tail(&self, value: u32) {
        self.store(&self.sq_tail, regs::DB_SQ_TAIL, value)
    }

    pub(crate) fn set_cq_head(&self, value: u32) {
        self.store(&self.cq_head, regs::DB_CQ_HEAD, value)
    }

    /// Moves this queue's doorbells into host-mapped memory at `page`.
    pub(crate) fn place_in(&self, memory: Arc<dyn HostMemory>, page: u64) -> bool {
        self.external.set((memory, page)).is_ok()
    }

    /// True when the host has submitted descriptors the device has not fetched.
    pub(crate) fn has_pending(&self) -> bool {
        self.size.load(Ordering::Relaxed) != 0
            && self.sq_tail() != self.sq_head.load(Ordering::Relaxed)
    }
}

/// One enabled incarnation of a queue pair. Engines reach its rings and its jobs' buffers
/// only inside [`ActiveQueue::enter`]; a stopped queue is *released* once no engine is
/// inside any more, and from then on nothing of it is touched (`Q_STATUS.ENABLED` reads 0,
/// device-spec §3.1).
#[derive(Debug)]
pub(crate) struct ActiveQueue {
    pub(crate) index: u32,
    pub(crate) size: u32,
    sq: DmaRange,
    cq: DmaRange,
    pub(crate) doorbells: Arc<Doorbells>,
    pub(crate) sq_head: Mutex<u32>,
    /// Served by the public-key engines (latched from `Q_CONTROL` at enable).
    pub(crate) public_key: bool,
    completion: Mutex<CompletionState>,
    /// [`STOPPED`] and the number of engines inside, in one word: entering and checking
    /// for a stop are one atomic step, so a stop cannot slip between them. On a cache line
    /// of its own, away from the reference count every engine round touches.
    users: OwnLine<AtomicU32>,
}

/// A value on a cache line of its own (128 bytes: adjacent-line prefetch pairs lines), so
/// that writes to it do not slow readers of its neighbours, nor the reverse.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct OwnLine<T>(pub(crate) T);

impl<T> std::ops::Deref for OwnLine<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// `ActiveQueue::users` bit: the queue was stopped; engines may not enter any more.
const STOPPED: u32 = 1 << 31;

/// An engine's licence to touch a queue's rings and its jobs' buffers; the queue is not
/// released while one exists.
#[derive(Debug)]
pub(crate) struct QueueUse<'a> {
    queue: &'a ActiveQueue,
}

impl Drop for QueueUse<'_> {
    fn drop(&mut self) {
        self.queue.users.fetch_sub(1, Ordering::Release);
    }
}

impl ActiveQueue {
    pub(crate) fn new(
        index: u32,
        size: u32,
        sq: DmaRange,
        cq: DmaRange,
        doorbells: Arc<Doorbells>,
        public_key: bool,
    ) -> Self {
        Self {
            index,
            size,
            sq,
            cq,
            doorbells,
            sq_head: Mutex::new(0),
            public_key,
            completion: Mutex::new(CompletionState {
                tail: 0,
                phase: true,
                reserved: 0,
                irq_pending: 0,
                irq_deadline: None,
                stopped: false,
            }),
            users: OwnLine(AtomicU32::new(0)),
        }
    }

    /// Enters the queue to work on it; `None` once it is stopped.
    pub(crate) fn enter(&self) -> Option<QueueUse<'_>> {
        let before = self.users.fetch_add(1, Ordering::Acquire);
        if before & STOPPED != 0 {
            self.users.fetch_sub(1, Ordering::Release);
            return None;
        }
        Some(QueueUse { queue: self })
    }

    /// True once the queue was stopped (engines inside drop what they have not started).
    pub(crate) fn is_stopped(&self) -> bool {
        self.users.load(Ordering::Acquire) & STOPPED != 0
    }

    /// True once the queue was stopped and every engine has left it: nothing of the queue
    /// is touched any more.
    pub(crate) fn is_released(&self) -> bool {
        self.users.load(Ordering::Acquire) == STOPPED
    }

    pub(crate) fn mask(&self) -> u32 {
        self.size - 1
    }

    fn completion(&self) -> MutexGuard<'_, CompletionState> {
        self.completion.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops the queue: nothing more is fetched or posted, and engines drop the jobs they
    /// have not started. The queue is released once the engines inside have left.
    pub(crate) fn stop(&self) {
        let mut state = self.completion();
        state.stopped = true;
        self.users.fetch_or(STOPPED, Ordering::AcqRel);
    }

    pub(crate) fn cq_tail(&self) -> u32 {
        self.completion().tail
    }

    /// Reads `out.len()` (at most the ring size) descriptors of the submission ring from slot
    /// `first` on, wrapping: one mapping check and at most two copies for all of them.
    pub(crate) fn read_descriptors(
        &self,
        first: u32,
        out: &mut [[u8; DESCRIPTOR_SIZE]],
    ) -> Result<(), DmaFault> {
        let first = (first & self.mask()) as usize;
        let before_wrap = out.len().min(self.size as usize - first);
        let (head, wrapped) = out.split_at_mut(before_wrap);
        self.sq.with_access(|sq| {
            sq.read((first * DESCRIPTOR_SIZE) as u64, head.as_flattened_mut())?;
            if !wrapped.is_empty() {
                sq.read(0, wrapped.as_flattened_mut())?;
            }
            Ok(())
        })
    }

    /// Reserves up to `wanted` completion entries; returns how many were reserved. The device
    /// fetches no descriptor it has no completion entry for, so posting never waits.
    pub(crate) fn reserve(&self, wanted: u32) -> u32 {
        let mut state = self.completion();
        if state.stopped {
            return 0;
        }
        let head = self.doorbells.cq_head();
        let used = state.tail.wrapping_sub(head) & self.mask();
        let free = (self.size - 1).saturating_sub(used + state.reserved);
        let granted = free.min(wanted);
        state.reserved += granted;
        if granted == 0 {
            // Ask the next head doorbell to wake the engines. The flag is set under the lock
            // and the head read again after it, so a doorbell in between is not missed.
            self.doorbells.cq_stalled.store(true, Ordering::SeqCst);
            let head = self.doorbells.cq_head();
            let used = state.tail.wrapping_sub(head) & self.mask();
            let free = (self.size - 1).saturating_sub(used + state.reserved);
            let granted = free.min(wanted);
            state.reserved += granted;
            return granted;
        }
        granted
    }

    /// Gives back reserved entries that will not be posted.
    pub(crate) fn unreserve(&self, count: u32) {
        let mut state = self.completion();
        state.reserved = state.reserved.saturating_sub(count);
    }

    /// Free completion entries not promised to anyone (for injected bogus entries).
    pub(crate) fn unclaimed_entries(&self) -> u32 {
        let state = self.completion();
        let head = self.doorbells.cq_head();
        let used = state.tail.wrapping_sub(head) & self.mask();
        (self.size - 1).saturating_sub(used + state.reserved)
    }

    /// Writes completions in order, each with the current phase tag written last. `reserved`
    /// says how many of them had entries reserved at fetch time.
    pub(crate) fn post(
        &self,
        postings: &[Posting],
        reserved: u32,
        coalesce_count: u32,
        coalesce_usecs: u32,
        irq_enabled: bool,
    ) -> Result<IrqAction, DmaFault> {
        let mut state = self.completion();
        state.reserved = state.reserved.saturating_sub(reserved);
        if state.stopped || postings.is_empty() {
            return Ok(IrqAction::None);
        }
        let mask = self.mask();
        let state = &mut *state;
        self.cq.with_access(|cq| {
            for posting in postings {
                let at = u64::from(state.tail) * COMPLETION_SIZE as u64;
                let mut flags = CompletionFlags::empty();
                flags.set(CompletionFlags::PHASE, state.phase);
                flags.set(
                    CompletionFlags::SEQUENCE_ADVANCED,
                    posting.sequence_advanced,
                );
                let entry = Completion {
                    cookie: posting.cookie.into(),
                    result_len: posting.result_len.into(),
                    ..Completion::default()
                };
                cq.write(at, &entry.as_bytes()[..COMPLETION_STATUS_WORD])?;
                let word = Completion::status_word(posting.status, posting.info, flags);
                cq.write_u32_release(at + COMPLETION_STATUS_WORD as u64, word)?;
                state.tail = (state.tail + 1) & mask;
                if state.tail == 0 {
                    state.phase = !state.phase;
                }
            }
            Ok(())
        })?;
        if !irq_enabled {
            return Ok(IrqAction::None);
        }
        state.irq_pending = state
            .irq_pending
            .saturating_add(u32::try_from(postings.len()).unwrap_or(u32::MAX));
        if coalesce_usecs == 0 || state.irq_pending >= coalesce_count.max(1) {
            state.irq_pending = 0;
            state.irq_deadline = None;
            return Ok(IrqAction::SignalNow);
        }
        if state.irq_deadline.is_none() {
            let deadline = Instant::now() + Duration::from_micros(u64::from(coalesce_usecs));
            state.irq_deadline = Some(deadline);
            return Ok(IrqAction::ArmTimer(deadline));
        }
        Ok(IrqAction::None)
    }

    /// The coalescing timer: signals when the window has closed, else says when to look again.
    pub(crate) fn irq_due(&self, now: Instant) -> (bool, Option<Instant>) {
        let mut state = self.completion();
        match state.irq_deadline {
            Some(deadline) if deadline <= now => {
                state.irq_deadline = None;
                state.irq_pending = 0;
                (!state.stopped, None)
            }
            other => (false, other),
        }
    }
}
