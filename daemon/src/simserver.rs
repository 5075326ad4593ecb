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
use tlsaccel_driver::dma::DmaRegion;
use tlsaccel_driver::transport::EventFd;
use tlsaccel_sim::{Device, DeviceConfig, HostMemory, InterruptSink};

/// Errors of the simulator server.
#[derive(Debug, thiserror::Error)]
pub enum SimServerError {
    #[error("shared memory size {0} must be a power of two of at least 1 MiB")]
    MemorySize(usize),
    #[error("cannot create the shared memory")]
    Memory(#[source] tlsaccel_driver::DmaError),
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
    memory: Arc<DmaRegion>,
    device: Device,
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
        let memory = Arc::new(DmaRegion::new(memory_size).map_err(SimServerError::Memory)?);
        let vectors = config.queues;
        let device = Device::new(config).map_err(SimServerError::Device)?;
        device
            .iommu()
            .map(
                shm::IOVA_BASE,
                memory_size as u64,
                Arc::clone(&memory) as Arc<dyn HostMemory>,
                0,
            )
            .map_err(|e| SimServerError::Memory(tlsaccel_driver::DmaError::Map(Box::new(e))))?;
        write_header(&memory, vectors).map_err(SimServerError::Memory)?;
        let doorbells = (0..vectors)
            .map(|_| EventFd::new().map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(SimServerError::EventFd)?;
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(|source| SimServerError::Listen {
            path: path.to_owned(),
            source,
        })?;
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
        let guest_vectors = (0..self.vectors)
            .map(|_| EventFd::new().map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(SimServerError::EventFd)?;
        for vector in &guest_vectors {
            send(&stream, i64::from(id), Some(vector.as_fd())).map_err(io)?;
        }
        for (queue, vector) in guest_vectors.iter().enumerate() {
            self.device.set_interrupt(
                queue as u32,
                Some(Arc::clone(vector) as Arc<dyn InterruptSink>),
            );
        }
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
            _ => u64::MAX,
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

fn write_header(memory: &DmaRegion, vectors: u32) -> Result<(), tlsaccel_driver::DmaError> {
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
