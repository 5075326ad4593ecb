//! The I/O around one connection's record session ([`crate::session`]): one task, one loop,
//! no locks. Each turn it starts the crypto that has work (opening the client's records,
//! sealing the backend's bytes) and waits for whichever comes first: a socket readable or
//! writable, a batch done, or the timer.
//!
//! * Nothing waits on a peer while holding anything another part needs: reads and writes are
//!   single, cancel-safe calls inside one `select!`, so a client that stops reading blocks
//!   only its own writes, and the timer still runs.
//! * Backpressure: neither side is read while the bytes for the other side exceed
//!   [`WINDOW`].
//! * Time: the connection ends after `idle_timeout` without a byte moving either way
//!   (close_notify first), and when a peer has taken none of the bytes waiting for it for
//!   `idle_timeout` even while the other side is busy. After an error or a timeout the
//!   connection gets [`LINGER`] at most to flush its last alert.
//! * Memory while idle: the client's bytes are read into the receiver's buffer only once
//!   the socket is readable (and the buffer is dropped when empty); the backend's are read
//!   into a per-thread scratch buffer and copied out at their exact length.
//! * No copies on the device path: once a connection's sending direction is on the device,
//!   a plain-TCP backend is read straight into DMA memory, the device seals from there into
//!   DMA memory, and the records are written to the client from there.
//! * No waiting on the device path: each such read is handed to the device as it comes
//!   ([`Sender::pipeline`]), up to `MAX_PIPELINE` batches in flight, and their answers are
//!   taken oldest first; anything else the sender must do waits until none is in flight.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::{Duration, Instant};

use rustls::AlertDescription;
use tokio::io::Interest;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::pool::{BackendIo, BackendStream};
use crate::record::{Chunk, PendingSeal, Policy, RecordError};
use crate::serve::Shared;
use crate::session::{
    End, Engines, Inbound, Outgoing, PendingInbound, Receiver, Sealed, Sender, READ_CHUNK,
};

/// Most bytes waiting for one side before the other side is no longer read.
pub const WINDOW: usize = 256 * 1024;
/// Most DMA chunks written with one `writev(2)`.
const MAX_WRITEV: usize = 64;
/// Most batches of one connection's sending direction on the device at once.
const MAX_PIPELINE: usize = 8;
/// Most DMA buffers a busy connection keeps for its next backend reads.
const SPARE_BUFFERS: usize = WINDOW / READ_CHUNK;
/// Longest a failing connection may take to deliver its last alert.
pub const LINGER: Duration = Duration::from_secs(2);

/// Why a connection ended other than by both sides closing.
#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    #[error("client socket: {0}")]
    Client(io::Error),
    #[error("backend socket: {0}")]
    Backend(io::Error),
    #[error("record layer: {0}")]
    Record(RecordError),
    #[error("idle for longer than the idle timeout")]
    Idle,
    #[error("the {0} took no bytes for the idle timeout")]
    WriteStalled(&'static str),
    #[error("sending key update failed: {0}")]
    KeyUpdate(String),
}

/// What the pump needs besides the sockets.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub shared: &'a Shared,
    /// Which of the device's record queues this connection uses.
    pub queue_number: usize,
    pub policy: Policy,
    pub idle_timeout: Duration,
}

type Job<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Bytes waiting for one peer, as chunks in order, and since when that peer has taken none
/// of them.
struct Outbox {
    chunks: VecDeque<Chunk>,
    /// Bytes of the first chunk already written.
    at: usize,
    len: usize,
    since: Instant,
}

impl Outbox {
    fn new(data: Vec<u8>) -> Self {
        let mut outbox = Self {
            chunks: VecDeque::new(),
            at: 0,
            len: 0,
            since: Instant::now(),
        };
        outbox.push(Chunk::Heap(data));
        outbox
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn push(&mut self, chunk: Chunk) {
        if chunk.is_empty() {
            return;
        }
        if self.is_empty() {
            self.since = Instant::now();
        }
        self.len += chunk.len();
        match (self.chunks.back_mut(), chunk) {
            // Small host-memory pieces (alerts, KeyUpdates, CPU records) go out together.
            (Some(Chunk::Heap(last)), Chunk::Heap(more)) => last.extend_from_slice(&more),
            (_, chunk) => self.chunks.push_back(chunk),
        }
    }

    /// The first chunk and how much of it is already written.
    fn front(&self) -> Option<(&Chunk, usize)> {
        self.chunks.front().map(|c| (c, self.at))
    }

    fn advance(&mut self, n: usize) {
        self.len -= n;
        self.at += n;
        self.since = Instant::now();
        while let Some(front) = self.chunks.front() {
            if self.at < front.len() {
                break;
            }
            // Written: a DMA chunk goes back to its pool here.
            self.at -= front.len();
            self.chunks.pop_front();
        }
    }

    /// Drops everything waiting (its DMA chunks go back to their pool); returns how many
    /// bytes that was.
    fn clear(&mut self) -> usize {
        let dropped = self.len;
        self.chunks.clear();
        self.at = 0;
        self.len = 0;
        dropped
    }

    /// True when bytes have waited for their peer for `limit` without it taking any.
    fn stalled(&self, now: Instant, limit: Duration) -> bool {
        !self.is_empty() && now.duration_since(self.since) >= limit
    }
}

/// Writes (part of) the first chunk of `outbox` to a TCP socket: from host memory, or
/// straight from DMA memory. Cancel-safe: nothing is written unless it returns.
async fn write_front(socket: &TcpStream, outbox: &Outbox) -> io::Result<usize> {
    let Some((chunk, at)) = outbox.front() else {
        return Ok(0);
    };
    loop {
        // The socket's own waker slot, not a waiter list: cheap to poll and drop each turn.
        std::future::poll_fn(|cx| socket.poll_write_ready(cx)).await?;
        let written = match chunk {
            Chunk::Heap(bytes) => socket.try_write(&bytes[at..]),
            Chunk::Dma(..) => socket.try_io(Interest::WRITABLE, || {
                // Every DMA chunk in a row, in one writev.
                let parts: Vec<(&tlsaccel_driver::DmaBuffer, std::ops::Range<usize>)> = outbox
                    .chunks
                    .iter()
                    .take(MAX_WRITEV)
                    .map_while(|c| match c {
                        Chunk::Dma(buffer, range) => Some((buffer, range.clone())),
                        Chunk::Heap(_) => None,
                    })
                    .enumerate()
                    .map(|(i, (buffer, range))| {
                        if i == 0 {
                            (buffer, range.start + at..range.end)
                        } else {
                            (buffer, range)
                        }
                    })
                    .collect();
                tlsaccel_driver::DmaBuffer::write_all_to_fd(socket.as_fd(), &parts)
            }),
        };
        match written {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

/// The backend's sending side, as the pump reads it.
enum BackendReader {
    Tcp(OwnedReadHalf),
    Stream(ReadHalf<Box<dyn BackendIo>>),
}

/// The backend's receiving side.
enum BackendWriter {
    Tcp(OwnedWriteHalf),
    Stream(WriteHalf<Box<dyn BackendIo>>),
}

fn split_backend(backend: BackendStream) -> (BackendReader, BackendWriter) {
    match backend {
        BackendStream::Tcp(stream) => {
            let (r, w) = stream.into_split();
            (BackendReader::Tcp(r), BackendWriter::Tcp(w))
        }
        BackendStream::Stream(stream) => {
            let (r, w) = tokio::io::split(stream);
            (BackendReader::Stream(r), BackendWriter::Stream(w))
        }
    }
}

impl BackendReader {
    /// Reads what the backend has: into a fresh DMA buffer from `dma` when given (and the
    /// backend is plain TCP), else through the thread's scratch buffer into host memory. An
    /// empty chunk is the end of stream. Allocates only once the socket is readable; cancel-
    /// safe.
    ///
    /// A DMA read takes a buffer from `spare` (this connection's own, done with) before it
    /// allocates, and puts it back when the read finds nothing after all.
    async fn read(
        &mut self,
        dma: Option<&tlsaccel_driver::DmaPool>,
        spare: &mut Vec<tlsaccel_driver::DmaBuffer>,
    ) -> io::Result<Chunk> {
        match self {
            BackendReader::Tcp(half) => loop {
                std::future::poll_fn(|cx| half.as_ref().poll_read_ready(cx)).await?;
                let socket: &TcpStream = half.as_ref();
                let buffer =
                    dma.and_then(|pool| spare.pop().map(Ok).or(Some(pool.alloc(READ_CHUNK))));
                if let Some(Ok(buffer)) = buffer {
                    match socket.try_io(Interest::READABLE, || {
                        buffer.read_from_fd(socket.as_fd(), 0, READ_CHUNK)
                    }) {
                        Ok(0) => return Ok(Chunk::Heap(Vec::new())),
                        Ok(n) => return Ok(Chunk::Dma(buffer, 0..n)),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            spare.push(buffer);
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                }
                let read = SCRATCH.with(|scratch| {
                    let mut scratch = scratch.borrow_mut();
                    half.try_read(&mut scratch[..])
                        .map(|n| scratch[..n].to_vec())
                });
                match read {
                    Ok(bytes) => return Ok(Chunk::Heap(bytes)),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            },
            BackendReader::Stream(half) => read_backend(half).await.map(Chunk::Heap),
        }
    }
}

/// What a turn did on the backend's write side.
enum BackendOp {
    Wrote(usize),
    Flushed,
    Shut,
}

impl BackendWriter {
    /// Plain TCP takes DMA chunks as they are.
    fn takes_dma(&self) -> bool {
        matches!(self, BackendWriter::Tcp(_))
    }

    /// Writes from `outbox`, else flushes, else shuts the sending side. Cancel-safe.
    async fn step(&mut self, outbox: &Outbox, unflushed: bool) -> io::Result<BackendOp> {
        match self {
            BackendWriter::Tcp(half) => {
                if !outbox.is_empty() {
                    write_front(half.as_ref(), outbox)
                        .await
                        .map(BackendOp::Wrote)
                } else if unflushed {
                    // A TCP socket has nothing to flush.
                    Ok(BackendOp::Flushed)
                } else {
                    half.shutdown().await.map(|()| BackendOp::Shut)
                }
            }
            BackendWriter::Stream(half) => {
                if let Some((chunk, at)) = outbox.front() {
                    let Chunk::Heap(bytes) = chunk else {
                        return Err(io::Error::other("DMA bytes for a TLS backend"));
                    };
                    half.write(&bytes[at..]).await.map(BackendOp::Wrote)
                } else if unflushed {
                    half.flush().await.map(|()| BackendOp::Flushed)
                } else {
                    half.shutdown().await.map(|()| BackendOp::Shut)
                }
            }
        }
    }
}

thread_local! {
    /// Where backend bytes land first: one buffer per worker thread, not per connection.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; READ_CHUNK].into_boxed_slice());
}

/// Reads what the backend has into the thread's scratch buffer and returns it at its exact
/// length (empty at end of stream). Holds no memory while it waits. Cancel-safe.
fn read_backend<'a, R: AsyncRead + Unpin + ?Sized>(
    reader: &'a mut R,
) -> impl Future<Output = io::Result<Vec<u8>>> + 'a {
    std::future::poll_fn(move |cx| {
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let mut buf = ReadBuf::new(&mut scratch[..]);
            match Pin::new(&mut *reader).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) => Poll::Ready(Ok(buf.filled().to_vec())),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
    })
}

/// True when batches are in flight on a queue other than `device`'s (it was replaced): they
/// finish before anything goes to the new one, so a slot's records stay in order.
/// A write error that means the peer no longer reads (rather than a local failure).
fn refused(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

fn queue_replaced(
    in_flight_on: Option<&crate::batch::RecordQueue>,
    in_flight: bool,
    device: &crate::record::RecordDevice,
) -> bool {
    in_flight && in_flight_on.is_some_and(|q| !q.same_as(&device.queue))
}

/// Proxies between the client (through the session) and the backend until both sides have
/// closed, an error, or a timeout. `early` is plaintext the handshake already decrypted.
///
/// Everything the loop keeps is set up here, outside the future, and moved into it as it
/// is: an `async fn` would store its arguments and the locals made from them side by side
/// for the connection's whole life.
pub fn run<'a>(
    ctx: Context<'a>,
    receiver: Receiver,
    sender: Sender,
    client: TcpStream,
    backend: BackendStream,
    early: Vec<u8>,
) -> impl Future<Output = Result<(), PumpError>> + Send + 'a {
    let shared = ctx.shared;
    let stats = &shared.stats;
    let (mut backend_r, mut backend_w) = split_backend(backend);
    // The sending direction's records go to the device: read the backend into DMA memory.
    let mut sending_on_device = false;
    let mut receiver = Some(receiver);
    let mut sender = Some(sender);
    let mut rx_job: Option<Job<'a, (Receiver, Inbound)>> = None;
    let mut tx_job: Option<Job<'a, (Sender, Sealed)>> = None;
    // Batches of the backend's bytes on the device, oldest first, and the queue they went
    // to: while the sending direction is on the device, each read is handed over as it
    // comes, without waiting for the batches before it.
    let mut tx_pipe: VecDeque<PendingSeal> = VecDeque::new();
    // The same for the client's records (opens).
    let mut rx_pipe: VecDeque<PendingInbound> = VecDeque::new();
    let mut rx_pipe_bytes = 0usize;
    let mut rx_queue: Option<crate::batch::RecordQueue> = None;
    let mut tx_pipe_bytes = 0usize;
    let mut pipe_queue: Option<crate::batch::RecordQueue> = None;
    let mut outgoing: Vec<Outgoing> = Vec::new();
    // DMA buffers the backend's bytes were sealed from, kept for its next reads while the
    // connection is busy: reusing its own buffer spares zeroing one per read.
    let mut spare: Vec<tlsaccel_driver::DmaBuffer> = Vec::new();
    let mut outgoing_bytes = 0usize;
    stats
        .bytes_client_to_backend
        .fetch_add(early.len() as u64, Ordering::Relaxed);
    let mut to_backend = Outbox::new(early);
    let mut to_client = Outbox::new(Vec::new());
    let mut backend_unflushed = !to_backend.is_empty();
    // Nothing more is read from the client (close_notify, end of stream, or its side ended).
    let mut client_done = false;
    // The backend's end of stream was seen.
    let mut backend_done = false;
    let mut backend_shut = false;
    // The backend stopped taking bytes (its side closed or reset) while it may still be
    // answering: what the client sends from then on is read and dropped, so that its
    // answer reaches the client instead of a reset (RFC 9112 §9.6, lingering close).
    let mut backend_refused = false;
    let mut client_shut = false;
    let mut failure: Option<PumpError> = None;
    let mut linger_until: Option<Instant> = None;
    let mut last_progress = Instant::now();
    let idle = ctx.idle_timeout;
    let mut tick = tokio::time::interval((idle / 4).clamp(Duration::from_millis(20), LINGER));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    // Ends sending with `alert` (if any) after what is already sealed; the connection then
    // ends once that is flushed, or after LINGER.
    let fail = |error: PumpError,
                alert: Option<AlertDescription>,
                failure: &mut Option<PumpError>,
                outgoing: &mut Vec<Outgoing>,
                linger_until: &mut Option<Instant>| {
        if failure.is_some() {
            return;
        }
        *failure = Some(error);
        outgoing.clear();
        if let Some(alert) = alert {
            outgoing.push(Outgoing::Alert(alert));
        }
        *linger_until = Some(Instant::now() + LINGER);
    };

    async move {
        // What the sender produced: records for the client, buffers to reuse, the end.
        macro_rules! absorb {
            ($sealed:expr) => {{
                let sealed: Sealed = $sealed;
                for alert in &sealed.alerts {
                    stats.alerts_sent.inc(&format!("{alert:?}"));
                }
                if sealed.key_exhausted {
                    shared.records.key_exhausted.fetch_add(1, Ordering::Relaxed);
                }
                sending_on_device = sealed.on_device;
                for buffer in sealed.spent {
                    if spare.len() < SPARE_BUFFERS && buffer.len() == READ_CHUNK {
                        spare.extend(buffer.reusable());
                    }
                }
                for chunk in sealed.records {
                    to_client.push(chunk);
                }
                if let Some(error) = sealed.failed {
                    fail(
                        PumpError::KeyUpdate(error),
                        None,
                        &mut failure,
                        &mut outgoing,
                        &mut linger_until,
                    );
                }
            }};
        }

        // What the receiver produced: plaintext for the backend, answers, the end.
        macro_rules! absorb_inbound {
            ($inbound:expr) => {{
                let inbound: Inbound = $inbound;
                let Inbound {
                    plaintext,
                    chunks,
                    key_update_requested,
                    renegotiations,
                    end,
                } = inbound;
                let bytes = plaintext.len() + chunks.iter().map(Chunk::len).sum::<usize>();
                if !backend_refused {
                    stats
                        .bytes_client_to_backend
                        .fetch_add(bytes as u64, Ordering::Relaxed);
                }
                if backend_refused {
                    stats
                        .client_bytes_dropped
                        .fetch_add(bytes as u64, Ordering::Relaxed);
                } else if bytes > 0 {
                    backend_unflushed = true;
                }
                if !backend_refused {
                    to_backend.push(Chunk::Heap(plaintext));
                }
                for chunk in chunks.into_iter().filter(|_| !backend_refused) {
                    if backend_w.takes_dma() {
                        to_backend.push(chunk);
                    } else {
                        to_backend.push(Chunk::Heap(chunk.into_heap()));
                    }
                }
                if key_update_requested {
                    outgoing.push(Outgoing::KeyUpdate);
                }
                for _ in 0..renegotiations {
                    stats.renegotiations_refused.fetch_add(1, Ordering::Relaxed);
                    outgoing.push(Outgoing::Alert(AlertDescription::NoRenegotiation));
                }
                match end {
                    None => {}
                    Some(End::PeerClosed) => client_done = true,
                    Some(End::KeyExhausted) => {
                        shared.records.key_exhausted.fetch_add(1, Ordering::Relaxed);
                        client_done = true;
                        outgoing.push(Outgoing::Alert(AlertDescription::CloseNotify));
                    }
                    Some(End::Error(error)) => {
                        let alert = error.alert();
                        fail(
                            PumpError::Record(error),
                            alert,
                            &mut failure,
                            &mut outgoing,
                            &mut linger_until,
                        );
                    }
                }
            }};
        }

        loop {
            // Start the crypto that has work. The client's records in DMA memory go to the
            // device as they come, while the receiving direction is on it.
            while rx_job.is_none()
                && failure.is_none()
                && rx_pipe.len() < MAX_PIPELINE
                && to_backend.len() + rx_pipe_bytes < WINDOW
            {
                let Some((r, device)) = receiver
                    .as_mut()
                    .zip(shared.record_device(ctx.queue_number))
                else {
                    break;
                };
                if queue_replaced(rx_queue.as_ref(), !rx_pipe.is_empty(), &device) {
                    break;
                }
                let engines = Engines {
                    device: Some(&device),
                    policy: ctx.policy,
                    stats: &shared.records,
                };
                let Some(batch) = r.pipeline(engines) else {
                    break;
                };
                rx_pipe_bytes += batch.bytes();
                rx_pipe.push_back(batch);
                rx_queue = Some(device.queue.clone());
            }
            if rx_job.is_none()
                && rx_pipe.is_empty()
                && failure.is_none()
                && to_backend.len() < WINDOW
            {
                if let Some(mut r) = receiver.take_if(|r| r.has_work()) {
                    let device = shared.record_device(ctx.queue_number);
                    let policy = ctx.policy;
                    let records = &shared.records;
                    rx_job = Some(Box::pin(async move {
                        let engines = Engines {
                            device: device.as_ref(),
                            policy,
                            stats: records,
                        };
                        let inbound = r.step(engines).await;
                        (r, inbound)
                    }));
                }
            }
            // The fast path: data already in DMA memory goes to the device as it comes.
            while tx_job.is_none()
                && failure.is_none()
                && sending_on_device
                && tx_pipe.len() < MAX_PIPELINE
                && to_client.len() + tx_pipe_bytes < WINDOW
                && matches!(outgoing.first(), Some(Outgoing::Data(Chunk::Dma(..))))
            {
                let Some((s, device)) = sender.as_mut().zip(shared.record_device(ctx.queue_number))
                else {
                    break;
                };
                if queue_replaced(pipe_queue.as_ref(), !tx_pipe.is_empty(), &device) {
                    break;
                }
                let mut batch = Vec::new();
                let mut records = 0;
                let mut bytes = 0;
                while let Some(Outgoing::Data(Chunk::Dma(_, range))) = outgoing.first() {
                    let more = range
                        .len()
                        .div_ceil(tlsaccel_driver::abi::TLS_MAX_PLAINTEXT);
                    if records > 0 && records + more > crate::session::RECORDS_PER_BATCH {
                        break;
                    }
                    records += more;
                    bytes += range.len();
                    if let Outgoing::Data(Chunk::Dma(buffer, range)) = outgoing.remove(0) {
                        batch.push((buffer, range));
                    }
                }
                let engines = Engines {
                    device: Some(&device),
                    policy: ctx.policy,
                    stats: &shared.records,
                };
                match s.pipeline(batch, engines) {
                    Ok(pending) => {
                        outgoing_bytes -= bytes;
                        tx_pipe_bytes += bytes;
                        tx_pipe.push_back(pending);
                        pipe_queue = Some(device.queue.clone());
                    }
                    Err(batch) => {
                        // Not now (a key update is due, the batcher is full...): the general
                        // path takes it once the pipeline is empty.
                        for (i, (buffer, range)) in batch.into_iter().enumerate() {
                            outgoing.insert(i, Outgoing::Data(Chunk::Dma(buffer, range)));
                        }
                        break;
                    }
                }
            }
            if tx_job.is_none()
                && tx_pipe.is_empty()
                && !outgoing.is_empty()
                && to_client.len() < WINDOW
            {
                if let Some(mut s) = sender.take() {
                    let work = std::mem::take(&mut outgoing);
                    outgoing_bytes = 0;
                    let device = shared.record_device(ctx.queue_number);
                    let policy = ctx.policy;
                    let records = &shared.records;
                    tx_job = Some(Box::pin(async move {
                        let engines = Engines {
                            device: device.as_ref(),
                            policy,
                            stats: records,
                        };
                        let sealed = s.seal(work, engines).await;
                        (s, sealed)
                    }));
                }
            }
            let sending_closed = sender.as_ref().is_some_and(Sender::closed);
            if sending_closed && to_client.is_empty() && !client_shut {
                client_shut = true;
                let _ = socket2::SockRef::from(&client).shutdown(std::net::Shutdown::Write);
            }
            if backend_refused && client_shut && linger_until.is_none() {
                // Everything the backend said is delivered; the client gets LINGER to close
                // its side while what it still sends is dropped.
                linger_until = Some(Instant::now() + LINGER);
            }
            if failure.is_some()
                && tx_job.is_none()
                && tx_pipe.is_empty()
                && rx_pipe.is_empty()
                && outgoing.is_empty()
                && to_client.is_empty()
            {
                break;
            }
            if failure.is_none()
                && client_done
                && backend_shut
                && sending_closed
                && to_client.is_empty()
                && rx_job.is_none()
                && rx_pipe.is_empty()
                && tx_job.is_none()
                && tx_pipe.is_empty()
            {
                return Ok(());
            }

            let read_client = failure.is_none()
                && !client_done
                && to_backend.len() < WINDOW
                && receiver
                    .as_ref()
                    .is_some_and(|r| !r.has_work() && r.can_read());
            let read_backend_now = failure.is_none()
                && !backend_done
                && !sending_closed
                && to_client.len() + outgoing_bytes + tx_pipe_bytes < WINDOW;
            // The client's end reaches the backend only after everything it sent before:
            // its FIN can be read while its last records are still on the device.
            let shut_backend = failure.is_none()
                && client_done
                && to_backend.is_empty()
                && !backend_shut
                && rx_job.is_none()
                && rx_pipe.is_empty()
                && receiver.as_ref().is_none_or(|r| !r.has_work());
            let dma = if read_backend_now && sending_on_device && backend_w.takes_dma() {
                shared.device.as_ref().map(|d| d.pool())
            } else {
                None
            };

            tokio::select! {
                r = std::future::poll_fn(|cx| client.poll_read_ready(cx)), if read_client => {
                    if let Err(e) = r {
                        return Err(PumpError::Client(e));
                    }
                    let Some(r) = receiver.as_mut() else { continue };
                    // Straight into DMA memory while the receiving direction is on the device.
                    let dma = shared.device.as_ref().map(|d| d.pool());
                    match r.read_from(&client, dma) {
                        Ok(0) => {
                            // End of stream without close_notify: pass the end on, but the data
                            // may have been truncated.
                            tracing::debug!("client closed without close_notify");
                            client_done = true;
                        }
                        Ok(_) => last_progress = Instant::now(),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(PumpError::Client(e)),
                    }
                    if r.buffered() == 0 {
                        r.release_idle();
                    }
                }
                (r, inbound) = async { rx_job.as_mut().expect("checked").await }, if rx_job.is_some() => {
                    rx_job = None;
                    receiver = Some(r);
                    absorb_inbound!(inbound);
                }
                (results, _) = async { rx_pipe.front_mut().expect("checked").answer().as_mut().await },
                    if !rx_pipe.is_empty() => {
                    let Some(batch) = rx_pipe.pop_front() else { continue };
                    rx_pipe_bytes = rx_pipe.iter().map(PendingInbound::bytes).sum();
                    if rx_pipe.is_empty() {
                        // Hold no queue between batches: a replaced one must be free to go.
                        rx_queue = None;
                    }
                    let Some(r) = receiver.as_mut() else { continue };
                    let inbound = r.finish(batch, results, &shared.records);
                    absorb_inbound!(inbound);
                }
                (s, sealed) = async { tx_job.as_mut().expect("checked").await }, if tx_job.is_some() => {
                    tx_job = None;
                    sender = Some(s);
                    absorb!(sealed);
                }
                (results, _) = async { tx_pipe.front_mut().expect("checked").answer.as_mut().await },
                    if !tx_pipe.is_empty() => {
                    let Some(pending) = tx_pipe.pop_front() else { continue };
                    let Some(s) = sender.as_mut() else { continue };
                    let sealed = s.finish(pending.work, results, &shared.records);
                    tx_pipe_bytes = tx_pipe.iter().map(|p| p.bytes()).sum();
                if tx_pipe.is_empty() {
                    pipe_queue = None;
                }
                    absorb!(sealed);
                }
                r = backend_r.read(dma, &mut spare), if read_backend_now => match r {
                    Ok(data) if data.is_empty() => {
                        backend_done = true;
                        outgoing.push(Outgoing::Alert(AlertDescription::CloseNotify));
                    }
                    Ok(data) => {
                        last_progress = Instant::now();
                        stats
                            .bytes_backend_to_client
                            .fetch_add(data.len() as u64, Ordering::Relaxed);
                        outgoing_bytes += data.len();
                        match (outgoing.last_mut(), data) {
                            (Some(Outgoing::Data(Chunk::Heap(last))), Chunk::Heap(more)) => {
                                last.extend_from_slice(&more)
                            }
                            (_, data) => outgoing.push(Outgoing::Data(data)),
                        }
                    }
                    Err(e) => return Err(PumpError::Backend(e)),
                },
                r = backend_w.step(&to_backend, backend_unflushed),
                    if !to_backend.is_empty() || backend_unflushed || shut_backend => match r {
                    Ok(BackendOp::Wrote(0)) => {
                        return Err(PumpError::Backend(io::ErrorKind::WriteZero.into()))
                    }
                    Ok(BackendOp::Wrote(n)) => {
                        to_backend.advance(n);
                        last_progress = Instant::now();
                    }
                    Ok(BackendOp::Flushed) => backend_unflushed = false,
                    Ok(BackendOp::Shut) => backend_shut = true,
                    Err(e) if shut_backend && to_backend.is_empty() && !backend_unflushed => {
                        tracing::debug!(error = %e, "backend shutdown failed");
                        backend_shut = true;
                    }
                    Err(e) if refused(&e) => {
                        // It closed (or reset) its side; what it sent before is still read
                        // and delivered, and a reset shows up on that read.
                        tracing::debug!(error = %e, "backend stopped reading");
                        let dropped = to_backend.clear();
                        stats
                            .client_bytes_dropped
                            .fetch_add(dropped as u64, Ordering::Relaxed);
                        backend_refused = true;
                        backend_unflushed = false;
                        backend_shut = true;
                    }
                    Err(e) => return Err(PumpError::Backend(e)),
                },
                r = write_front(&client, &to_client), if !to_client.is_empty() => match r {
                    Ok(0) => return Err(PumpError::Client(io::ErrorKind::WriteZero.into())),
                    Ok(n) => {
                        to_client.advance(n);
                        last_progress = Instant::now();
                    }
                    Err(e) => return Err(PumpError::Client(e)),
                },
                _ = tick.tick() => {
                    let now = Instant::now();
                    if now.duration_since(last_progress) >= tick.period() {
                        // Quiet for a tick: this connection keeps no DMA memory and no key
                        // contexts while idle.
                        spare.clear();
                        if let Some(r) = receiver.as_mut() {
                            r.quiet();
                        }
                        if let Some(s) = sender.as_mut() {
                            s.quiet();
                        }
                    }
                    if linger_until.is_some_and(|t| now >= t) {
                        if failure.is_none() && backend_refused && client_shut {
                            // The backend's answer went out whole; the client just did
                            // not close within LINGER.
                            return Ok(());
                        }
                        break;
                    }
                    if to_client.stalled(now, idle) {
                        stats.client_write_stalls.fetch_add(1, Ordering::Relaxed);
                        return Err(PumpError::WriteStalled("client"));
                    }
                    if to_backend.stalled(now, idle) {
                        stats.backend_write_stalls.fetch_add(1, Ordering::Relaxed);
                        return Err(PumpError::WriteStalled("backend"));
                    }
                    if failure.is_none() && now.duration_since(last_progress) >= idle {
                        stats.idle_timeouts.fetch_add(1, Ordering::Relaxed);
                        fail(PumpError::Idle, Some(AlertDescription::CloseNotify), &mut failure, &mut outgoing, &mut linger_until);
                    }
                }
            }
        }
        // Flushed what there was to say (or ran out of time): the connection ends.
        if !client_shut {
            let _ = socket2::SockRef::from(&client).shutdown(std::net::Shutdown::Write);
        }
        Err(failure.unwrap_or(PumpError::Idle))
    }
}
