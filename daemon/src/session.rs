//! One connection's record session after its handshake, without any socket (the rustls way):
//! bytes from the client go in, plaintext for the backend and what to tell the client come
//! out; plaintext from the backend goes in, records for the client come out.
//!
//! It has two halves, so the pump ([`crate::pump`]) can open the client's records while it
//! seals the backend's:
//! * [`Receiver`] frames the client's records, opens them in batches (on the device or the
//!   CPU, [`crate::record`]), acts on control messages (alerts, KeyUpdate, TLS 1.2
//!   renegotiation attempts) and holds the peer to its [`Limits`];
//! * [`Sender`] seals data, KeyUpdates and alerts, updates its key on schedule (TLS 1.3) and
//!   closes before a TLS 1.2 key reaches its suite's confidentiality limit.
//!
//! What one half asks of the other (answer a KeyUpdate, refuse a renegotiation, send the
//! alert for an error) comes out of [`Receiver::step`] as [`Inbound`] fields; the pump hands
//! it to the sender as [`Outgoing`] work. Crypto calls are `async` only because a device may
//! run them; without a device every call completes at its first poll.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::AlertDescription;

use crate::record::{
    self, content, Chunk, Control, Direction, HandshakeReader, Policy, RecordDevice, RecordError,
    RecordStats, Version,
};

/// Most records opened or sealed in one batch for one connection.
pub const RECORDS_PER_BATCH: usize = 32;
/// Most bytes the receiver reads from the client at a time.
pub const READ_CHUNK: usize = 64 * 1024;

/// What a peer may do without carrying data (see `config::PeerLimits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub key_updates_without_data: u32,
    pub warning_alerts: u32,
    pub empty_records: u32,
    pub renegotiation_requests: u32,
}

impl Default for Limits {
    /// rustls' own limits.
    fn default() -> Self {
        Self {
            key_updates_without_data: 32,
            warning_alerts: 4,
            empty_records: 32,
            renegotiation_requests: 1,
        }
    }
}

/// Where a batch's crypto runs and what it counts.
#[derive(Debug, Clone, Copy)]
pub struct Engines<'a> {
    /// The device queue now serving this connection, if any.
    pub device: Option<&'a RecordDevice>,
    pub policy: Policy,
    pub stats: &'a RecordStats,
}

/// The connection's rustls state after the handshake, kept for KeyUpdate. Held only for the
/// moment a new secret is derived, never across an await.
pub type Kernel = Arc<Mutex<KernelConnection<ServerConnectionData>>>;

/// How the client's side of the session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// close_notify: the client sends nothing more.
    PeerClosed,
    /// The session must end; the alert to send is [`RecordError::alert`].
    Error(RecordError),
    /// The peer reached the record limit of its TLS 1.2 key: the connection closes.
    KeyExhausted,
}

/// What one [`Receiver::step`] produced.
#[derive(Debug, Default)]
pub struct Inbound {
    /// Application data for the backend, in order, in host memory...
    pub plaintext: Vec<u8>,
    /// ...or, when the records were opened on the device from DMA memory, the plaintext
    /// where the device left it (one step gives one or the other).
    pub chunks: Vec<Chunk>,
    /// The client asked us to update our sending key (TLS 1.3).
    pub key_update_requested: bool,
    /// TLS 1.2 renegotiation attempts to refuse with a `no_renegotiation` warning.
    pub renegotiations: u32,
    /// The client's side is over; nothing more is read.
    pub end: Option<End>,
}

/// The client → backend half.
pub struct Receiver {
    version: Version,
    rx: Direction,
    kernel: Kernel,
    buffer: Vec<u8>,
    /// While the receiving direction is on the device: the client's bytes, read straight
    /// into DMA memory (the heap buffer is then empty).
    dma_in: Option<DmaInput>,
    conduct: Conduct,
    /// Records this key may open (TLS 1.2 confidentiality limit; u64::MAX when none).
    record_limit: u64,
    ended: bool,
    /// Bumped whenever pipelined batches in flight stop counting (a control record, a
    /// device failure, the end): their answers are dropped and their records framed again.
    epoch: u64,
}

/// Client bytes in DMA memory: `buffer[start..filled]` is not opened yet.
struct DmaInput {
    buffer: tlsaccel_driver::DmaBuffer,
    start: usize,
    filled: usize,
    /// `buffer[start..submitted]` is on the device in pipelined batches
    /// ([`Receiver::pipeline`]); equal to `start` when none is in flight.
    submitted: usize,
}

/// Size of a DMA input buffer: large, so the partial record carried over to the next one
/// is a small share of what passes through.
const DMA_INPUT: usize = 256 * 1024;
/// Least room worth reading into: a maximal TLS 1.2 record.
const DMA_INPUT_ROOM: usize = 5 + tlsaccel_driver::abi::TLS_MAX_PLAINTEXT + 2048;

impl DmaInput {
    /// The record starting `at` bytes into the unopened part: its length, `None` while
    /// it is incomplete, or the framing error.
    fn frame(&self, at: usize, version: Version) -> Result<Option<usize>, RecordError> {
        let from = self.start + at;
        let available = self.filled - from;
        let mut header = [0u8; 5];
        if available < header.len() || self.buffer.read(from, &mut header).is_err() {
            return Ok(None);
        }
        match record::frame(&header, version)? {
            Some(len) => Ok(Some(len)),
            None => {
                let total = 5 + usize::from(u16::from_be_bytes([header[3], header[4]]));
                Ok((available >= total).then_some(total))
            }
        }
    }

    fn unopened(&self) -> usize {
        self.filled - self.start
    }

    fn in_flight(&self) -> bool {
        self.submitted != self.start
    }
}

/// What the client has sent besides data, held against its [`Limits`].
#[derive(Debug)]
struct Conduct {
    version: Version,
    handshake: HandshakeReader,
    limits: Limits,
    key_updates_in_a_row: u32,
    empty_in_a_row: u32,
    warnings: u32,
    renegotiations: u32,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("version", &self.version)
            .field("rx", &self.rx)
            .field("buffered", &self.buffer.len())
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

/// Work for the [`Sender`], in order.
#[derive(Debug)]
pub enum Outgoing {
    /// Application data from the backend (in DMA memory when it was read straight into it).
    Data(Chunk),
    /// Answer the client's KeyUpdate (update_requested) with one of ours.
    KeyUpdate,
    /// An alert; a fatal one or close_notify ends sending.
    Alert(AlertDescription),
}

/// What one [`Sender::seal`] produced.
#[derive(Debug, Default)]
pub struct Sealed {
    /// Records for the client, in order.
    pub records: Vec<Chunk>,
    /// This direction's records now go to the device: the backend's bytes may be read
    /// straight into DMA memory.
    pub on_device: bool,
    /// Alerts sealed, for the metrics.
    pub alerts: Vec<AlertDescription>,
    /// Sending is over (close_notify or a fatal alert went out, or the key ran out).
    pub closed: bool,
    /// The TLS 1.2 key reached its limit: close_notify was sent in place of the rest.
    pub key_exhausted: bool,
    /// A new key could not be derived: the connection must end.
    pub failed: Option<String>,
    /// The DMA buffers the data was sealed from, done with: the pump may read the
    /// backend's next bytes into them ([`tlsaccel_driver::DmaBuffer::reusable`]).
    pub spent: Vec<tlsaccel_driver::DmaBuffer>,
}

/// Records being gathered, in order: host-memory records are appended to the last heap
/// chunk, DMA chunks are kept as they are.
#[derive(Default)]
struct Records {
    chunks: Vec<Chunk>,
}

impl Records {
    /// The heap chunk at the end, to append records to.
    fn heap(&mut self) -> &mut Vec<u8> {
        if !matches!(self.chunks.last(), Some(Chunk::Heap(_))) {
            self.chunks.push(Chunk::Heap(Vec::new()));
        }
        match self.chunks.last_mut() {
            Some(Chunk::Heap(bytes)) => bytes,
            _ => unreachable!("a heap chunk was just pushed"),
        }
    }

    fn push(&mut self, chunk: Chunk) {
        match chunk {
            Chunk::Heap(bytes) => self.heap().extend_from_slice(&bytes),
            dma => self.chunks.push(dma),
        }
    }

    fn finish(mut self) -> Vec<Chunk> {
        self.chunks.retain(|c| !c.is_empty());
        self.chunks
    }
}

/// A batch of the client's records on the device ([`Receiver::pipeline`]): await its
/// answer, then hand it to [`Receiver::finish`].
#[derive(Debug)]
pub struct PendingInbound {
    pending: record::PendingOpen,
    /// The receiver's epoch when it was handed over: a batch from before a rewind is stale.
    epoch: u64,
}

impl PendingInbound {
    /// The device's answer.
    pub fn answer(&mut self) -> &mut record::Answer {
        &mut self.pending.answer
    }

    /// Ciphertext bytes in the batch.
    pub fn bytes(&self) -> usize {
        self.pending.work.bytes()
    }
}

/// The backend → client half.
pub struct Sender {
    version: Version,
    tx: Direction,
    kernel: Kernel,
    /// TLS 1.3: update the key before its sequence reaches this.
    rekey_after: u64,
    /// TLS 1.2: close before the key's sequence reaches this.
    record_limit: u64,
    closed: bool,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("version", &self.version)
            .field("tx", &self.tx)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

/// Settings a session starts with.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub limits: Limits,
    /// Records after which a TLS 1.3 sending key is updated.
    pub rekey_after: u64,
}

/// The two halves of a session for a handshake's traffic secrets. `leftover` is what the
/// client sent past its Finished.
pub fn start(
    established: crate::tls::Established,
    settings: Settings,
) -> Result<(Receiver, Sender), RecordError> {
    let crate::tls::Established {
        secrets,
        kernel,
        version,
        leftover,
        ..
    } = established;
    let (tx_seq, tx_secrets) = secrets.tx;
    let (rx_seq, rx_secrets) = secrets.rx;
    let tx = Direction::new(version, true, &tx_secrets, tx_seq)?;
    let rx = Direction::new(version, false, &rx_secrets, rx_seq)?;
    drop((tx_secrets, rx_secrets));
    let confidentiality = match kernel.negotiated_cipher_suite() {
        rustls::SupportedCipherSuite::Tls13(suite) => suite.common.confidentiality_limit,
        rustls::SupportedCipherSuite::Tls12(suite) => suite.common.confidentiality_limit,
    };
    Ok(halves(
        version,
        tx,
        rx,
        Arc::new(Mutex::new(kernel)),
        leftover,
        confidentiality,
        settings,
    ))
}

/// Builds the halves (split out for tests, which have no rustls handshake).
fn halves(
    version: Version,
    tx: Direction,
    rx: Direction,
    kernel: Kernel,
    leftover: Vec<u8>,
    confidentiality: u64,
    settings: Settings,
) -> (Receiver, Sender) {
    // TLS 1.3 stays well inside the suite's limit by updating its key at half of it,
    // whatever the configuration says. TLS 1.2 cannot update a key: it closes at 7/8 of it.
    let (rekey_after, record_limit) = match version {
        Version::Tls13 => (settings.rekey_after.min(confidentiality / 2), u64::MAX),
        Version::Tls12 => (u64::MAX, confidentiality - confidentiality / 8),
    };
    // The handshake's read buffer is kept only if it holds the start of the record stream
    // (and then at its length): an idle connection holds no buffer.
    let buffer = if leftover.is_empty() {
        Vec::new()
    } else {
        let mut leftover = leftover;
        leftover.shrink_to_fit();
        leftover
    };
    let receiver = Receiver {
        version,
        rx,
        kernel: Arc::clone(&kernel),
        buffer,
        dma_in: None,
        conduct: Conduct {
            version,
            handshake: HandshakeReader::default(),
            limits: settings.limits,
            key_updates_in_a_row: 0,
            empty_in_a_row: 0,
            warnings: 0,
            renegotiations: 0,
        },
        record_limit,
        ended: false,
        epoch: 0,
    };
    let sender = Sender {
        version,
        tx,
        kernel,
        rekey_after: rekey_after.max(1),
        record_limit,
        closed: false,
    };
    (receiver, sender)
}

impl Receiver {
    /// The buffer the client's bytes are read into (append only). Empty, with no capacity,
    /// whenever no partial record is waiting.
    pub fn buffer(&mut self) -> &mut Vec<u8> {
        &mut self.buffer
    }

    /// Bytes held that are not yet opened.
    pub fn buffered(&self) -> usize {
        self.buffer.len() + self.dma_in.as_ref().map_or(0, DmaInput::unopened)
    }

    /// True when the buffer holds a whole record (or a header that is already an error):
    /// [`Receiver::step`] has work.
    pub fn has_work(&self) -> bool {
        if self.ended {
            return false;
        }
        match &self.dma_in {
            Some(input) => !matches!(
                input.frame(input.submitted - input.start, self.version),
                Ok(None)
            ),
            None => !matches!(record::frame(&self.buffer, self.version), Ok(None)),
        }
    }

    /// Reads what `socket` has (one non-blocking read): straight into DMA memory from `dma`
    /// while the receiving direction is on the device, else into the heap buffer. Returns
    /// the bytes read (0 at end of stream); `WouldBlock` when there were none after all.
    pub fn read_from(
        &mut self,
        socket: &tokio::net::TcpStream,
        dma: Option<&tlsaccel_driver::DmaPool>,
    ) -> std::io::Result<usize> {
        use std::os::fd::AsFd;
        if !self.can_read() {
            // Records in flight lie in the DMA input, which is full: it cannot move yet.
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        if let Some(pool) = dma.filter(|_| self.rx.on_device()) {
            if self.make_dma_room(pool) {
                let input = self.dma_in.as_mut().expect("made above");
                let room = DMA_INPUT - input.filled;
                let n = socket.try_io(tokio::io::Interest::READABLE, || {
                    input
                        .buffer
                        .read_from_fd(socket.as_fd(), input.filled, room)
                })?;
                input.filled += n;
                return Ok(n);
            }
        }
        if let Some(input) = self.dma_in.take() {
            // Back to host memory (the direction left the device): the unopened bytes move.
            let mut bytes = vec![0; input.unopened()];
            let _ = input.buffer.read(input.start, &mut bytes);
            input.buffer.mark_public();
            self.buffer = bytes;
        }
        self.buffer.reserve(READ_CHUNK);
        socket.try_read_buf(&mut self.buffer)
    }

    /// The connection has been quiet for a while: drops what is made again on demand (the
    /// CPU's key context, an empty buffer).
    pub fn quiet(&mut self) {
        self.rx.release_idle();
        self.release_idle();
    }

    /// False while the DMA input has no room for another record and records in it are on
    /// the device: nothing is read until their answers are in.
    pub fn can_read(&self) -> bool {
        self.dma_in
            .as_ref()
            .is_none_or(|input| !input.in_flight() || DMA_INPUT - input.filled >= DMA_INPUT_ROOM)
    }

    /// Drops an empty heap buffer's memory (the connection is going idle).
    pub fn release_idle(&mut self) {
        if self.buffer.is_empty() {
            self.buffer = Vec::new();
        }
    }

    /// Makes sure the DMA input has room for a maximal record, moving what is unopened
    /// (a partial record) into a fresh buffer when it has not. False when no DMA memory is
    /// to be had.
    fn make_dma_room(&mut self, pool: &tlsaccel_driver::DmaPool) -> bool {
        if self
            .dma_in
            .as_ref()
            .is_some_and(|input| DMA_INPUT - input.filled >= DMA_INPUT_ROOM)
        {
            return true;
        }
        let Ok(fresh) = pool.alloc(DMA_INPUT) else {
            return false;
        };
        let mut carried = match self.dma_in.take() {
            Some(old) => {
                let mut bytes = vec![0; old.unopened()];
                let _ = old.buffer.read(old.start, &mut bytes);
                // Bytes from the wire: nothing to zero.
                old.buffer.mark_public();
                bytes
            }
            None => std::mem::take(&mut self.buffer),
        };
        if fresh.write(0, &carried).is_err() {
            self.buffer = carried;
            return false;
        }
        let filled = carried.len();
        carried.clear();
        self.buffer = Vec::new();
        self.dma_in = Some(DmaInput {
            buffer: fresh,
            start: 0,
            filled,
            submitted: 0,
        });
        true
    }

    /// True once the client's side has ended (close_notify or an error).
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Frames, opens and interprets up to [`RECORDS_PER_BATCH`] whole records from the
    /// buffer. Bytes of an incomplete record stay for the next read.
    pub async fn step(&mut self, engines: Engines<'_>) -> Inbound {
        let mut inbound = Inbound::default();
        if self.ended {
            return inbound;
        }
        if self.dma_in.is_some() {
            self.step_dma(&mut inbound, engines).await;
            if self.ended {
                self.release();
            }
            return inbound;
        }
        let version = self.version;
        let buffer = &self.buffer;
        let Some((ranges, framing_error)) =
            self.frame_batch(|at| record::frame(&buffer[at..], version))
        else {
            self.end(&mut inbound, End::KeyExhausted);
            return inbound;
        };
        let results = if ranges.is_empty() {
            Vec::new()
        } else {
            self.rx
                .open(
                    &mut self.buffer,
                    &ranges,
                    engines.device,
                    engines.policy,
                    engines.stats,
                )
                .await
        };
        let opened_all = results.len() == ranges.len();
        let mut consumed = 0;
        for (range, result) in ranges.iter().zip(results) {
            consumed = range.end;
            let opened = match result {
                Ok(opened) => opened,
                Err(error) => {
                    self.end(&mut inbound, End::Error(error));
                    break;
                }
            };
            let plain = &self.buffer[opened.plain.clone()];
            match self
                .conduct
                .interpret(opened.content_type, plain, engines.stats)
            {
                Ok(None) => inbound.plaintext.extend_from_slice(plain),
                Ok(Some(Control::KeyUpdate { update_requested })) => {
                    if let Err(error) = self.update_key(engines.stats) {
                        self.end(&mut inbound, End::Error(error));
                        break;
                    }
                    inbound.key_update_requested |= update_requested;
                    // Records after this one were opened (if at all) under the old key:
                    // they are framed again under the new one.
                    break;
                }
                Ok(Some(Control::Renegotiation)) => inbound.renegotiations += 1,
                Ok(Some(Control::CloseNotify)) => {
                    self.end(&mut inbound, End::PeerClosed);
                    break;
                }
                Ok(Some(Control::Ignored)) => {}
                Err(error) => {
                    self.end(&mut inbound, End::Error(error));
                    break;
                }
            }
        }
        if inbound.end.is_none() && opened_all {
            if let Some(error) = framing_error {
                self.end(&mut inbound, End::Error(error));
            }
        }
        if self.ended {
            self.release();
        } else {
            self.buffer.drain(..consumed);
            if self.buffer.is_empty() {
                // Going idle: hold no buffer while waiting.
                self.buffer = Vec::new();
            }
        }
        inbound
    }

    /// Frames up to [`RECORDS_PER_BATCH`] whole records, `frame_at(offset)` giving the
    /// length of the one at `offset` from the first unopened byte. Returns their ranges and
    /// the framing error that stopped the batch, if any (it counts only after the records
    /// before it); `None` when the key has reached its record limit (TLS 1.2).
    fn frame_batch(
        &self,
        frame_at: impl Fn(usize) -> Result<Option<usize>, RecordError>,
    ) -> Option<(Vec<Range<usize>>, Option<RecordError>)> {
        let mut ranges = Vec::new();
        let mut at = 0;
        let mut framing_error = None;
        while ranges.len() < RECORDS_PER_BATCH {
            match frame_at(at) {
                Ok(Some(len)) => {
                    ranges.push(at..at + len);
                    at += len;
                }
                Ok(None) => break,
                Err(error) => {
                    framing_error = Some(error);
                    break;
                }
            }
        }
        // A key near its limit opens no more records.
        let room = self.record_limit.saturating_sub(self.rx.sequence());
        if (ranges.len() as u64) > room {
            if room == 0 {
                return None;
            }
            ranges.truncate(room as usize);
            framing_error = None;
        }
        Some((ranges, framing_error))
    }

    /// [`Receiver::step`] on records in DMA memory.
    async fn step_dma(&mut self, inbound: &mut Inbound, engines: Engines<'_>) {
        let Some(input) = self.dma_in.as_ref() else {
            return;
        };
        let version = self.version;
        let Some((ranges, framing_error)) = self.frame_batch(|at| input.frame(at, version)) else {
            self.end(inbound, End::KeyExhausted);
            return;
        };
        let ranges: Vec<Range<usize>> = ranges
            .into_iter()
            .map(|r| input.start + r.start..input.start + r.end)
            .collect();
        let results = if ranges.is_empty() {
            Vec::new()
        } else {
            self.rx
                .open_dma(
                    &input.buffer,
                    &ranges,
                    engines.device,
                    engines.policy,
                    engines.stats,
                )
                .await
        };
        let opened_all = results.len() == ranges.len();
        self.take_opened(&ranges, results, inbound, engines.stats);
        if inbound.end.is_none() && opened_all {
            if let Some(error) = framing_error {
                self.end(inbound, End::Error(error));
            }
        }
    }

    /// Interprets opened records (at `ranges` of the DMA input) in order and moves the
    /// input past them; returns true when every one of `ranges` was taken (no failure, no
    /// record that stops the batch).
    fn take_opened(
        &mut self,
        ranges: &[Range<usize>],
        results: Vec<Result<(u8, Chunk), RecordError>>,
        inbound: &mut Inbound,
        stats: &RecordStats,
    ) -> bool {
        let mut taken = 0;
        let mut consumed = None;
        for (range, result) in ranges.iter().zip(results) {
            consumed = Some(range.end);
            let (content_type, plain) = match result {
                Ok(opened) => opened,
                Err(error) => {
                    self.end(inbound, End::Error(error));
                    break;
                }
            };
            let (control, data) = if content_type == content::APPLICATION_DATA {
                let checked = self.conduct.data(plain.len(), stats).map(|()| None);
                (checked, Some(plain))
            } else {
                // A control message: a few bytes, read out of DMA memory.
                let bytes = plain.into_heap();
                (self.conduct.interpret(content_type, &bytes, stats), None)
            };
            match control {
                Ok(None) => {
                    if let Some(chunk) = data.filter(|c| !c.is_empty()) {
                        inbound.chunks.push(chunk);
                    }
                }
                Ok(Some(control)) => {
                    if !self.on_control(control, inbound, stats) {
                        break;
                    }
                }
                Err(error) => {
                    self.end(inbound, End::Error(error));
                    break;
                }
            }
            taken += 1;
        }
        if let (Some(end), Some(input)) = (consumed, self.dma_in.as_mut()) {
            input.start = end;
            input.submitted = input.submitted.max(end);
            if input.start == input.filled {
                // All opened: the buffer held only bytes from the wire.
                if let Some(done) = self.dma_in.take() {
                    done.buffer.mark_public();
                }
            }
        }
        taken == ranges.len()
    }

    /// Hands the client's next whole records in DMA memory (up to [`RECORDS_PER_BATCH`]) to
    /// the device without waiting, behind the batches already in flight, while the
    /// receiving direction is on the device. `None` when there is nothing to hand over or
    /// it cannot go now (a framing error or the TLS 1.2 record limit is next: the ordinary
    /// [`Receiver::step`] deals with those once nothing is in flight).
    pub fn pipeline(&mut self, engines: Engines<'_>) -> Option<PendingInbound> {
        if self.ended || !self.rx.on_device() {
            return None;
        }
        let device = engines.device?;
        let input = self.dma_in.as_ref()?;
        let version = self.version;
        let mut ranges = Vec::new();
        let mut at = input.submitted - input.start;
        while ranges.len() < RECORDS_PER_BATCH {
            match input.frame(at, version) {
                Ok(Some(len)) => {
                    ranges.push(input.start + at..input.start + at + len);
                    at += len;
                }
                Ok(None) | Err(_) => break,
            }
        }
        let room = self
            .record_limit
            .saturating_sub(self.rx.sequence() + self.rx.in_flight());
        ranges.truncate(usize::try_from(room).unwrap_or(usize::MAX));
        let end = ranges.last()?.end;
        let pending = self
            .rx
            .pipeline_dma_open(&input.buffer, &ranges, device, engines.stats)?;
        if let Some(input) = self.dma_in.as_mut() {
            input.submitted = end;
        }
        Some(PendingInbound {
            pending,
            epoch: self.epoch,
        })
    }

    /// Takes the device's answer to a [`Receiver::pipeline`] batch, in the order they were
    /// handed over, like [`Receiver::step`]. When a batch stops early (a KeyUpdate, the
    /// client's close_notify, a failure) or the device failed, the batches behind it no
    /// longer count: their answers are dropped when they come, and their records are framed
    /// and opened again.
    pub fn finish(
        &mut self,
        batch: PendingInbound,
        results: Vec<Result<tlsaccel_driver::JobOutput, tlsaccel_driver::JobError>>,
        stats: &RecordStats,
    ) -> Inbound {
        let mut inbound = Inbound::default();
        let PendingInbound { pending, epoch } = batch;
        let work = pending.work;
        let Some(input) = self
            .dma_in
            .as_ref()
            .filter(|_| epoch == self.epoch && !self.ended)
        else {
            self.rx.forget_dma_open(work);
            return inbound;
        };
        let ranges = work.records().to_vec();
        let opened = self.rx.finish_dma_open(&input.buffer, work, results, stats);
        let took_all = self.take_opened(&ranges, opened, &mut inbound, stats);
        if !took_all || !self.rx.on_device() || self.ended {
            self.epoch += 1;
            if let Some(input) = self.dma_in.as_mut() {
                input.submitted = input.start;
            }
        }
        if self.ended {
            self.release();
        }
        inbound
    }

    /// Acts on a control message; false when the batch stops here.
    fn on_control(&mut self, control: Control, inbound: &mut Inbound, stats: &RecordStats) -> bool {
        match control {
            Control::KeyUpdate { update_requested } => {
                if let Err(error) = self.update_key(stats) {
                    self.end(inbound, End::Error(error));
                    return false;
                }
                inbound.key_update_requested |= update_requested;
                // Records after this one were opened (if at all) under the old key: they
                // are framed again under the new one.
                false
            }
            Control::Renegotiation => {
                inbound.renegotiations += 1;
                true
            }
            Control::CloseNotify => {
                self.end(inbound, End::PeerClosed);
                false
            }
            Control::Ignored => true,
        }
    }

    fn end(&mut self, inbound: &mut Inbound, end: End) {
        self.ended = true;
        inbound.end = Some(end);
    }

    /// Frees the buffers (the heap one held plaintext in place: scrubbed first; the DMA one
    /// is zeroed by its pool).
    fn release(&mut self) {
        tlsaccel_record::scrub(&mut self.buffer);
        self.buffer = Vec::new();
        self.dma_in = None;
    }

    /// Moves to the client's next traffic secret (its KeyUpdate).
    fn update_key(&mut self, stats: &RecordStats) -> Result<(), RecordError> {
        let (sequence, secrets) = self
            .kernel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .update_rx_secret()
            .map_err(|e| RecordError::Secrets(e.to_string()))?;
        self.rx = Direction::new(self.version, false, &secrets, sequence)?;
        stats.key_updates_received.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl Conduct {
    /// An application-data record of `len` bytes: empty ones are limited.
    fn data(&mut self, len: usize, stats: &RecordStats) -> Result<(), RecordError> {
        if len == 0 {
            self.empty_in_a_row += 1;
            if self.empty_in_a_row > self.limits.empty_records {
                stats.peer_limits.inc("empty_records");
                return Err(RecordError::Limit("too many empty records in a row"));
            }
        } else {
            self.empty_in_a_row = 0;
            self.key_updates_in_a_row = 0;
        }
        Ok(())
    }

    /// Classifies one opened record and holds the peer to its limits: `None` for
    /// application data.
    fn interpret(
        &mut self,
        content_type: u8,
        plain: &[u8],
        stats: &RecordStats,
    ) -> Result<Option<Control>, RecordError> {
        if self.handshake.is_pending() && content_type != content::HANDSHAKE {
            return Err(RecordError::UnexpectedMessage(
                "a handshake message interrupted by another record type",
            ));
        }
        match content_type {
            content::APPLICATION_DATA => self.data(plain.len(), stats).map(|()| None),
            content::ALERT => {
                let control = record::read_alert(self.version, plain)?;
                if control == Control::Ignored {
                    self.warnings += 1;
                    if self.warnings > self.limits.warning_alerts {
                        stats.peer_limits.inc("warning_alerts");
                        return Err(RecordError::Limit("too many warning alerts"));
                    }
                }
                Ok(Some(control))
            }
            content::HANDSHAKE => {
                let control = self.handshake.push(self.version, plain)?;
                match control {
                    Some(Control::KeyUpdate { .. }) => {
                        self.key_updates_in_a_row += 1;
                        if self.key_updates_in_a_row > self.limits.key_updates_without_data {
                            stats.peer_limits.inc("key_updates");
                            return Err(RecordError::Limit("too many KeyUpdates without data"));
                        }
                    }
                    Some(Control::Renegotiation) => {
                        self.renegotiations += 1;
                        if self.renegotiations > self.limits.renegotiation_requests {
                            stats.peer_limits.inc("renegotiations");
                            return Err(RecordError::Limit("too many renegotiation requests"));
                        }
                    }
                    _ => {}
                }
                Ok(Some(control.unwrap_or(Control::Ignored)))
            }
            _ => Err(RecordError::UnexpectedMessage(
                "an unknown record content type",
            )),
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.release();
    }
}

impl Sender {
    /// True once close_notify or a fatal alert has gone out: nothing more is sent.
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// Seals `work` in order into records for the client. Work after the end of sending
    /// is dropped.
    pub async fn seal(&mut self, work: Vec<Outgoing>, engines: Engines<'_>) -> Sealed {
        let mut sealed = Sealed::default();
        let mut out = Records::default();
        // Data already in DMA memory is gathered, so it reaches the device in one submission.
        let mut dma: Vec<(tlsaccel_driver::DmaBuffer, std::ops::Range<usize>)> = Vec::new();
        for item in work {
            if self.closed {
                break;
            }
            if let Outgoing::Data(Chunk::Dma(buffer, range)) = item {
                dma.push((buffer, range));
                continue;
            }
            if !dma.is_empty() {
                let gathered = std::mem::take(&mut dma);
                if let Err(error) = self
                    .seal_dma(gathered, &mut out, &mut sealed, engines)
                    .await
                {
                    sealed.failed = Some(error);
                    self.closed = true;
                    break;
                }
            }
            match item {
                Outgoing::Data(Chunk::Heap(data)) => {
                    if let Err(error) = self.seal_data(&data, &mut out, &mut sealed, engines).await
                    {
                        sealed.failed = Some(error);
                    }
                }
                Outgoing::Data(Chunk::Dma(..)) => unreachable!("gathered above"),
                Outgoing::KeyUpdate => {
                    if self.version == Version::Tls13 {
                        if let Err(error) = self.update_key(false, out.heap(), engines).await {
                            sealed.failed = Some(error);
                        }
                    }
                }
                Outgoing::Alert(description) => {
                    self.seal_alert(description, &mut out, &mut sealed, engines)
                        .await;
                }
            }
            if sealed.failed.is_some() {
                self.closed = true;
            }
        }
        if !dma.is_empty() && !self.closed {
            if let Err(error) = self.seal_dma(dma, &mut out, &mut sealed, engines).await {
                sealed.failed = Some(error);
                self.closed = true;
            }
        }
        sealed.records = out.finish();
        sealed.closed = self.closed;
        sealed.on_device = self.tx.on_device();
        sealed
    }

    /// Checks the key's budget for `count` more records: false when the TLS 1.2 limit is
    /// reached (close_notify is then sealed); a TLS 1.3 key is updated first when due.
    async fn make_room(
        &mut self,
        count: u64,
        out: &mut Records,
        sealed: &mut Sealed,
        engines: Engines<'_>,
    ) -> Result<bool, String> {
        // One record of room is kept for close_notify.
        if self.tx.sequence() + count + 1 > self.record_limit {
            tracing::info!("the TLS 1.2 key reached its record limit: closing the connection");
            sealed.key_exhausted = true;
            self.seal_alert(AlertDescription::CloseNotify, out, sealed, engines)
                .await;
            return Ok(false);
        }
        if self.tx.sequence() + count >= self.rekey_after {
            self.update_key(false, out.heap(), engines).await?;
        }
        Ok(true)
    }

    async fn seal_data(
        &mut self,
        data: &[u8],
        out: &mut Records,
        sealed: &mut Sealed,
        engines: Engines<'_>,
    ) -> Result<(), String> {
        let chunks: Vec<(u8, &[u8])> = data
            .chunks(tlsaccel_driver::abi::TLS_MAX_PLAINTEXT)
            .map(|c| (content::APPLICATION_DATA, c))
            .collect();
        out.heap()
            .reserve(data.len() + chunks.len() * (tlsaccel_driver::abi::TAG_LEN + 30));
        for batch in chunks.chunks(RECORDS_PER_BATCH) {
            if !self
                .make_room(batch.len() as u64, out, sealed, engines)
                .await?
            {
                return Ok(());
            }
            self.tx
                .seal(
                    batch,
                    out.heap(),
                    engines.device,
                    engines.policy,
                    engines.stats,
                )
                .await;
        }
        Ok(())
    }

    /// Application data already in DMA memory: sealed from there (see
    /// [`Direction::seal_dma`]), at most a batch of records per submission.
    async fn seal_dma(
        &mut self,
        sources: Vec<(tlsaccel_driver::DmaBuffer, std::ops::Range<usize>)>,
        out: &mut Records,
        sealed: &mut Sealed,
        engines: Engines<'_>,
    ) -> Result<(), String> {
        let mut sources = sources.into_iter().peekable();
        while sources.peek().is_some() {
            // Sources up to a batch of records.
            let mut records = 0;
            let mut batch = Vec::new();
            while let Some((_, range)) = sources.peek() {
                let more = range
                    .len()
                    .div_ceil(tlsaccel_driver::abi::TLS_MAX_PLAINTEXT);
                if records > 0 && records + more > RECORDS_PER_BATCH {
                    break;
                }
                records += more;
                batch.extend(sources.next());
            }
            if !self.make_room(records as u64, out, sealed, engines).await? {
                sealed.spent.extend(batch.into_iter().map(|(b, _)| b));
                sealed.spent.extend(sources.map(|(b, _)| b));
                return Ok(());
            }
            let (chunks, spent) = self
                .tx
                .seal_dma(batch, engines.device, engines.policy, engines.stats)
                .await;
            for chunk in chunks {
                out.push(chunk);
            }
            sealed.spent.extend(spent);
        }
        Ok(())
    }

    /// Hands application data in DMA memory (at most [`RECORDS_PER_BATCH`] records) to the
    /// device without waiting for it, behind what is already in flight, when nothing else
    /// needs doing first: the direction is on the device and open, and neither a key update
    /// nor the TLS 1.2 record limit falls within these records. Otherwise gives the data
    /// back; the caller then waits for what is in flight and uses [`Sender::seal`].
    pub fn pipeline(
        &mut self,
        data: Vec<(tlsaccel_driver::DmaBuffer, std::ops::Range<usize>)>,
        engines: Engines<'_>,
    ) -> Result<record::PendingSeal, Vec<(tlsaccel_driver::DmaBuffer, std::ops::Range<usize>)>>
    {
        let records: u64 = data
            .iter()
            .map(|(_, r)| r.len().div_ceil(tlsaccel_driver::abi::TLS_MAX_PLAINTEXT) as u64)
            .sum();
        let next = self.tx.sequence() + self.tx.in_flight();
        let Some(device) = engines.device else {
            return Err(data);
        };
        if self.closed
            || !self.tx.on_device()
            || records == 0
            || records > RECORDS_PER_BATCH as u64
            || next + records + 1 > self.record_limit
            || next + records >= self.rekey_after
        {
            return Err(data);
        }
        self.tx.pipeline_dma_seal(data, device, engines.stats)
    }

    /// The connection has been quiet for a while: drops the CPU's key context (made again
    /// for the next record).
    pub fn quiet(&mut self) {
        self.tx.release_idle();
    }

    /// Records handed to the device by [`Sender::pipeline`] and not yet finished.
    pub fn in_flight(&self) -> u64 {
        self.tx.in_flight()
    }

    /// Takes the device's answer to a [`Sender::pipeline`] batch, in the order they were
    /// handed over: the records for the client (sealed on the CPU where the device failed,
    /// see [`Direction::finish_dma_seal`]) and the buffers they were sealed from.
    pub fn finish(
        &mut self,
        work: record::DmaWork,
        results: Vec<Result<tlsaccel_driver::JobOutput, tlsaccel_driver::JobError>>,
        stats: &RecordStats,
    ) -> Sealed {
        let (records, spent) = self.tx.finish_dma_seal(work, results, stats);
        let mut out = Records::default();
        for chunk in records {
            out.push(chunk);
        }
        Sealed {
            records: out.finish(),
            on_device: self.tx.on_device(),
            spent,
            ..Sealed::default()
        }
    }

    async fn seal_alert(
        &mut self,
        description: AlertDescription,
        out: &mut Records,
        sealed: &mut Sealed,
        engines: Engines<'_>,
    ) {
        let fatal = description != AlertDescription::CloseNotify
            && description != AlertDescription::NoRenegotiation;
        let message = record::alert_message(description, fatal);
        self.tx
            .seal(
                &[(content::ALERT, &message)],
                out.heap(),
                engines.device,
                engines.policy,
                engines.stats,
            )
            .await;
        sealed.alerts.push(description);
        if fatal || description == AlertDescription::CloseNotify {
            self.closed = true;
        }
    }

    /// Sends a KeyUpdate under the current key, then switches to the next one.
    async fn update_key(
        &mut self,
        update_requested: bool,
        out: &mut Vec<u8>,
        engines: Engines<'_>,
    ) -> Result<(), String> {
        let message = record::key_update_message(update_requested);
        self.tx
            .seal(
                &[(content::HANDSHAKE, &message)],
                out,
                engines.device,
                engines.policy,
                engines.stats,
            )
            .await;
        let (sequence, secrets) = self
            .kernel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .update_tx_secret()
            .map_err(|e| e.to_string())?;
        self.tx =
            Direction::new(self.version, true, &secrets, sequence).map_err(|e| e.to_string())?;
        engines
            .stats
            .key_updates_sent
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!("sending key updated");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::ClientConnection;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use rustls::server::UnbufferedServerConnection;
    use rustls::unbuffered::{ConnectionState, UnbufferedStatus};
    use tlsaccel_driver::abi::ModelFault;

    fn block<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(future)
    }

    fn cpu(stats: &RecordStats) -> Engines<'_> {
        Engines {
            device: None,
            policy: Policy {
                cpu_below: usize::MAX,
            },
            stats,
        }
    }

    /// A rustls client and our session after an in-memory handshake: the server side is
    /// rustls' unbuffered connection handed over as the daemon does it.
    struct Pair {
        receiver: Receiver,
        sender: Sender,
        client: ClientConnection,
        version: Version,
    }

    fn pair(
        version: &'static rustls::SupportedProtocolVersion,
        extract: bool,
        settings: Settings,
    ) -> Pair {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let issued =
            rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
        let cert = CertificateDer::from(issued.cert.der().to_vec());
        let key = PrivateKeyDer::try_from(issued.signing_key.serialize_der()).expect("key");
        let mut server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[version])
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .expect("server config");
        server_config.enable_secret_extraction = true;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).expect("root");
        let mut client_config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        client_config.enable_secret_extraction = extract;
        let mut server = UnbufferedServerConnection::new(Arc::new(server_config)).expect("server");
        let mut client = ClientConnection::new(
            Arc::new(client_config),
            ServerName::try_from("localhost").expect("name"),
        )
        .expect("client");
        let (mut to_server, mut to_client) = (Vec::new(), Vec::new());
        let mut done = false;
        while !done || client.is_handshaking() {
            while client.wants_write() {
                client.write_tls(&mut to_server).expect("client writes");
            }
            loop {
                let UnbufferedStatus { discard, state } =
                    server.process_tls_records(&mut to_server);
                let mut blocked = false;
                match state.expect("server handshake") {
                    ConnectionState::EncodeTlsData(mut encode) => {
                        let mut buf = vec![0; 16 * 1024];
                        let n = encode.encode(&mut buf).expect("encode");
                        to_client.extend_from_slice(&buf[..n]);
                    }
                    ConnectionState::TransmitTlsData(transmit) => transmit.done(),
                    ConnectionState::BlockedHandshake => blocked = true,
                    ConnectionState::WriteTraffic(_) => {
                        done = true;
                        blocked = true;
                    }
                    _ => panic!("unexpected server state"),
                }
                to_server.drain(..discard);
                if blocked {
                    break;
                }
            }
            client.read_tls(&mut &to_client[..]).expect("client reads");
            to_client.clear();
            client.process_new_packets().expect("client handshake");
        }
        let ours = if version == &rustls::version::TLS13 {
            Version::Tls13
        } else {
            Version::Tls12
        };
        let (secrets, kernel) = server.dangerous_into_kernel_connection().expect("kernel");
        let established = crate::tls::Established {
            secrets,
            kernel,
            version: ours,
            suite: String::new(),
            resumed: false,
            server_name: None,
            alpn: None,
            leftover: to_server,
            early_plaintext: Vec::new(),
            peer_chain: Vec::new(),
        };
        let (receiver, sender) = start(established, settings).expect("session");
        Pair {
            receiver,
            sender,
            client,
            version: ours,
        }
    }

    /// Sealed records as one byte string (the CPU path makes host-memory chunks only).
    fn heap(records: Vec<Chunk>) -> Vec<u8> {
        records.into_iter().flat_map(Chunk::into_heap).collect()
    }

    fn settings() -> Settings {
        Settings {
            limits: Limits::default(),
            rekey_after: 1 << 20,
        }
    }

    /// Hands `bytes` to the receiver in pieces cut at `cuts`, stepping whenever it has
    /// work; returns the plaintext and every step's outcome that was not plain data.
    fn feed(receiver: &mut Receiver, bytes: &[u8], cuts: &[usize]) -> (Vec<u8>, Vec<Inbound>) {
        let stats = RecordStats::default();
        let mut plaintext = Vec::new();
        let mut events = Vec::new();
        let mut at = 0;
        for &cut in cuts.iter().chain(std::iter::once(&bytes.len())) {
            let cut = cut.clamp(at, bytes.len());
            receiver.buffer().extend_from_slice(&bytes[at..cut]);
            at = cut;
            while receiver.has_work() {
                let mut inbound = block(receiver.step(cpu(&stats)));
                plaintext.append(&mut inbound.plaintext);
                if inbound.end.is_some()
                    || inbound.key_update_requested
                    || inbound.renegotiations > 0
                {
                    events.push(inbound);
                }
            }
        }
        (plaintext, events)
    }

    /// What the client sends after writing `messages` as application data.
    fn client_sends(client: &mut ClientConnection, messages: &[Vec<u8>]) -> Vec<u8> {
        let mut wire = Vec::new();
        for message in messages {
            for piece in message.chunks(16384) {
                client.writer().write_all(piece).expect("write");
                while client.wants_write() {
                    client.write_tls(&mut wire).expect("write_tls");
                }
            }
        }
        while client.wants_write() {
            client.write_tls(&mut wire).expect("write_tls");
        }
        wire
    }

    use std::io::{Read as _, Write as _};

    #[test]
    fn records_cut_anywhere_arrive_whole_and_in_order() {
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let mut p = pair(version, false, settings());
            let messages: Vec<Vec<u8>> = [1usize, 700, 16384, 20000, 3, 40000]
                .iter()
                .enumerate()
                .map(|(i, &n)| (0..n).map(|j| (i * 31 + j * 7) as u8).collect())
                .collect();
            let expected: Vec<u8> = messages.concat();
            for seed in 1..=8u64 {
                let wire = client_sends(&mut p.client, &messages);
                // Cut points from a small generator: single bytes, headers split, records
                // split, several records at once.
                let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                let mut cuts = Vec::new();
                let mut at = 0usize;
                while at < wire.len() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    at += match x % 4 {
                        0 => 1,
                        1 => 1 + (x >> 8) as usize % 8,
                        2 => 1 + (x >> 8) as usize % 5000,
                        _ => 1 + (x >> 8) as usize % 60000,
                    };
                    cuts.push(at);
                }
                let (plain, events) = feed(&mut p.receiver, &wire, &cuts);
                assert!(events.is_empty(), "{version:?} seed {seed}: {events:?}");
                assert_eq!(plain, expected, "{version:?} seed {seed}");
                assert_eq!(p.receiver.buffered(), 0);
            }
        }
    }

    #[test]
    fn key_updates_between_data_are_followed_and_answered() {
        let mut p = pair(&rustls::version::TLS13, false, settings());
        let stats = RecordStats::default();
        let mut wire = Vec::new();
        let mut expected = Vec::new();
        for round in 0..5u8 {
            let message = vec![round; 5000];
            wire.extend(client_sends(&mut p.client, std::slice::from_ref(&message)));
            expected.extend_from_slice(&message);
            p.client.refresh_traffic_keys().expect("key update");
        }
        wire.extend(client_sends(&mut p.client, &[b"last".to_vec()]));
        expected.extend_from_slice(b"last");
        let (plain, events) = feed(&mut p.receiver, &wire, &[]);
        assert_eq!(plain, expected);
        assert_eq!(events.len(), 5);
        assert!(events
            .iter()
            .all(|e| e.key_update_requested && e.end.is_none()));
        // Our answers, then data under the new key: rustls reads both.
        let sealed = block(p.sender.seal(
            vec![
                Outgoing::KeyUpdate,
                Outgoing::Data(Chunk::Heap(b"after the update".to_vec())),
            ],
            cpu(&stats),
        ));
        assert!(!sealed.closed);
        p.client
            .read_tls(&mut &heap(sealed.records)[..])
            .expect("client reads");
        p.client.process_new_packets().expect("client opens");
        let mut got = Vec::new();
        let _ = p.client.reader().read_to_end(&mut got);
        assert_eq!(got, b"after the update");
        assert_eq!(stats.key_updates_sent.load(Ordering::Relaxed), 1);
    }

    /// A client that seals its own records with the extracted secrets.
    fn raw_pair(
        version: &'static rustls::SupportedProtocolVersion,
        settings: Settings,
    ) -> (Receiver, Sender, Direction, Version) {
        let p = pair(version, true, settings);
        let secrets = p.client.dangerous_extract_secrets().expect("secrets");
        let (seq, tx) = secrets.tx;
        let tx = Direction::new(p.version, true, &tx, seq).expect("client key");
        (p.receiver, p.sender, tx, p.version)
    }

    fn seal(client: &mut Direction, records: &[(u8, &[u8])]) -> Vec<u8> {
        let stats = RecordStats::default();
        let mut wire = Vec::new();
        block(client.seal(records, &mut wire, None, cpu(&stats).policy, &stats));
        wire
    }

    fn ended_with(events: &[Inbound]) -> Option<&End> {
        events.last().and_then(|e| e.end.as_ref())
    }

    #[test]
    fn empty_records_warnings_and_renegotiations_are_limited_like_rustls() {
        // 32 empty records in a row pass, data resets the count, 33 in a row end it.
        let (mut receiver, _, mut client, _) = raw_pair(&rustls::version::TLS13, settings());
        let mut records = vec![(content::APPLICATION_DATA, &b""[..]); 32];
        records.push((content::APPLICATION_DATA, b"data"));
        records.extend(vec![(content::APPLICATION_DATA, &b""[..]); 33]);
        let (plain, events) = feed(&mut receiver, &seal(&mut client, &records), &[]);
        assert_eq!(plain, b"data");
        assert_eq!(
            ended_with(&events),
            Some(&End::Error(RecordError::Limit(
                "too many empty records in a row"
            )))
        );
        assert_eq!(
            End::Error(RecordError::Limit("")).alert_for_test(),
            Some(AlertDescription::UnexpectedMessage)
        );

        // TLS 1.2: four warnings are tolerated over the connection, the fifth is not.
        let (mut receiver, _, mut client, _) = raw_pair(&rustls::version::TLS12, settings());
        let warning = [1u8, 90];
        let mut records = vec![(content::ALERT, &warning[..]); 4];
        records.push((content::APPLICATION_DATA, b"x"));
        let (plain, events) = feed(&mut receiver, &seal(&mut client, &records), &[]);
        assert_eq!((plain.as_slice(), events.len()), (&b"x"[..], 0));
        let (_, events) = feed(
            &mut receiver,
            &seal(&mut client, &[(content::ALERT, &warning[..])]),
            &[],
        );
        assert_eq!(
            ended_with(&events),
            Some(&End::Error(RecordError::Limit("too many warning alerts")))
        );

        // TLS 1.2 renegotiation: one refused with a warning, the second is fatal.
        let (mut receiver, _, mut client, _) = raw_pair(&rustls::version::TLS12, settings());
        let hello = [1u8, 0, 0, 4, 3, 3, 0, 0];
        let (_, events) = feed(
            &mut receiver,
            &seal(&mut client, &[(content::HANDSHAKE, &hello[..])]),
            &[],
        );
        assert_eq!(events.len(), 1);
        assert_eq!((events[0].renegotiations, &events[0].end), (1, &None));
        let (_, events) = feed(
            &mut receiver,
            &seal(&mut client, &[(content::HANDSHAKE, &hello[..])]),
            &[],
        );
        assert_eq!(
            ended_with(&events),
            Some(&End::Error(RecordError::Limit(
                "too many renegotiation requests"
            )))
        );
    }

    #[test]
    fn key_update_limits_and_bad_values() {
        let limits = Limits {
            key_updates_without_data: 3,
            ..Limits::default()
        };
        let mut p = pair(
            &rustls::version::TLS13,
            false,
            Settings {
                limits,
                rekey_after: 1 << 20,
            },
        );
        let mut wire = Vec::new();
        for _ in 0..3 {
            p.client.refresh_traffic_keys().expect("key update");
        }
        wire.extend(client_sends(&mut p.client, &[b"data".to_vec()]));
        for _ in 0..4 {
            p.client.refresh_traffic_keys().expect("key update");
        }
        wire.extend(client_sends(&mut p.client, &[]));
        let (plain, events) = feed(&mut p.receiver, &wire, &[]);
        assert_eq!(plain, b"data");
        assert_eq!(events.len(), 7, "{events:?}");
        assert_eq!(
            ended_with(&events),
            Some(&End::Error(RecordError::Limit(
                "too many KeyUpdates without data"
            )))
        );

        let (mut receiver, _, mut client, _) = raw_pair(&rustls::version::TLS13, settings());
        let bad = [24u8, 0, 0, 1, 2];
        let (_, events) = feed(
            &mut receiver,
            &seal(&mut client, &[(content::HANDSHAKE, &bad[..])]),
            &[],
        );
        let end = ended_with(&events).expect("ended");
        assert_eq!(
            end.alert_for_test(),
            Some(AlertDescription::IllegalParameter)
        );
    }

    #[test]
    fn close_notify_ends_both_ways_and_nothing_follows_it() {
        let mut p = pair(&rustls::version::TLS13, false, settings());
        let stats = RecordStats::default();
        p.client.send_close_notify();
        let mut wire = client_sends(&mut p.client, &[]);
        // Whatever follows close_notify is never read.
        wire.extend_from_slice(&[0x99; 50]);
        let (_, events) = feed(&mut p.receiver, &wire, &[]);
        assert_eq!(ended_with(&events), Some(&End::PeerClosed));
        assert!(p.receiver.ended() && !p.receiver.has_work());
        // Our close_notify, then nothing: no KeyUpdate, no data after it.
        let sealed = block(p.sender.seal(
            vec![
                Outgoing::Alert(AlertDescription::CloseNotify),
                Outgoing::KeyUpdate,
                Outgoing::Data(Chunk::Heap(b"late".to_vec())),
            ],
            cpu(&stats),
        ));
        assert!(sealed.closed && p.sender.closed());
        assert_eq!(sealed.alerts, vec![AlertDescription::CloseNotify]);
        assert_eq!(stats.key_updates_sent.load(Ordering::Relaxed), 0);
        p.client
            .read_tls(&mut &heap(sealed.records)[..])
            .expect("client reads");
        let state = p.client.process_new_packets().expect("client opens");
        assert!(state.peer_has_closed());
        assert_eq!(state.plaintext_bytes_to_read(), 0);
        let later = block(p.sender.seal(vec![Outgoing::KeyUpdate], cpu(&stats)));
        assert!(later.records.is_empty());
    }

    #[test]
    fn a_tls12_key_closes_before_its_record_limit() {
        let p = pair(&rustls::version::TLS12, true, settings());
        let secrets = p.client.dangerous_extract_secrets().expect("secrets");
        let (client_seq, client_tx) = secrets.tx;
        let (client_rx_seq, client_rx) = secrets.rx;
        // Our halves again around a tiny confidentiality limit: 16 records, so a key
        // closes at 14.
        let rx = Direction::new(Version::Tls12, false, &client_tx, client_seq).expect("rx");
        let tx = Direction::new(Version::Tls12, true, &client_rx, client_rx_seq).expect("tx");
        let kernel = Arc::clone(&p.receiver.kernel);
        let (mut receiver, mut sender) =
            halves(Version::Tls12, tx, rx, kernel, Vec::new(), 16, settings());
        let stats = RecordStats::default();
        let data = vec![7u8; 20 * tlsaccel_driver::abi::TLS_MAX_PLAINTEXT];
        let sealed = block(sender.seal(vec![Outgoing::Data(Chunk::Heap(data))], cpu(&stats)));
        assert!(sealed.key_exhausted && sealed.closed);
        assert_eq!(sealed.alerts, vec![AlertDescription::CloseNotify]);
        let mut client = Direction::new(Version::Tls12, true, &client_tx, client_seq).expect("key");
        let records = vec![(content::APPLICATION_DATA, &b"r"[..]); 20];
        let (plain, events) = feed(&mut receiver, &seal(&mut client, &records), &[]);
        assert_eq!(plain.len(), 14 - client_seq as usize);
        assert_eq!(ended_with(&events), Some(&End::KeyExhausted));
    }

    impl End {
        fn alert_for_test(&self) -> Option<AlertDescription> {
            match self {
                End::Error(error) => error.alert(),
                _ => None,
            }
        }
    }

    /// Reads `len` bytes from `socket` into the receiver (DMA memory once its direction is
    /// on the device).
    async fn take_in(
        receiver: &mut Receiver,
        socket: &tokio::net::TcpStream,
        pool: &tlsaccel_driver::DmaPool,
        mut len: usize,
    ) {
        while len > 0 {
            socket.readable().await.expect("readable");
            match receiver.read_from(socket, Some(pool)) {
                Ok(0) => panic!("end of stream"),
                Ok(n) => len -= n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    fn plain_of(inbound: Inbound) -> Vec<u8> {
        let mut bytes = inbound.plaintext;
        for chunk in inbound.chunks {
            bytes.extend(chunk.into_heap());
        }
        bytes
    }

    #[test]
    fn pipelined_opens_behind_a_key_update_are_opened_again_under_the_new_key() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            use tokio::io::AsyncWriteExt;
            let device = tlsaccel_driver::Device::open("sim").expect("simulator");
            let pair_of_rings = device
                .queue(tlsaccel_driver::QueueConfig {
                    interrupts: true,
                    ..tlsaccel_driver::QueueConfig::default()
                })
                .expect("queue");
            let queue =
                tlsaccel_driver::AsyncQueue::new(pair_of_rings, std::time::Duration::from_secs(2))
                    .expect("async queue");
            let rd = RecordDevice {
                device: Arc::clone(&device),
                queue: crate::batch::RecordQueue::start(queue, 32, std::time::Duration::ZERO),
            };
            let stats = RecordStats::default();
            let engines = Engines {
                device: Some(&rd),
                policy: Policy { cpu_below: 0 },
                stats: &stats,
            };
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let mut client_socket = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
                .await
                .expect("connect");
            let (socket, _) = listener.accept().await.expect("accept");
            let pool = device.pool();
            let mut p = pair(&rustls::version::TLS13, false, settings());
            let mut expected = Vec::new();
            let mut got = Vec::new();

            // The first record moves the receiving direction onto the device.
            let message = vec![1u8; 2000];
            let wire = client_sends(&mut p.client, std::slice::from_ref(&message));
            expected.extend_from_slice(&message);
            client_socket.write_all(&wire).await.expect("send");
            take_in(&mut p.receiver, &socket, pool, wire.len()).await;
            got.extend(plain_of(p.receiver.step(engines).await));
            assert!(p.receiver.rx.on_device());

            // Two batches on a stalled device: data, a KeyUpdate and data under the new
            // key in the first; more under the new key in the second.
            let faults = tlsaccel_driver::ModelFaults::new(&device).expect("faults");
            faults.inject(ModelFault::Stall).expect("stall");
            let mut wire = client_sends(&mut p.client, &[vec![2u8; 3000]]);
            p.client.refresh_traffic_keys().expect("key update");
            wire.extend(client_sends(&mut p.client, &[vec![3u8; 4000]]));
            client_socket.write_all(&wire).await.expect("send");
            take_in(&mut p.receiver, &socket, pool, wire.len()).await;
            let first = p.receiver.pipeline(engines).expect("first batch");
            let wire = client_sends(&mut p.client, &[vec![4u8; 5000]]);
            client_socket.write_all(&wire).await.expect("send");
            take_in(&mut p.receiver, &socket, pool, wire.len()).await;
            let second = p.receiver.pipeline(engines).expect("second batch");
            for n in [2usize, 3, 4] {
                expected.extend(vec![n as u8; [0, 0, 3000, 4000, 5000][n]]);
            }
            faults.inject(ModelFault::Resume).expect("resume");

            let mut key_updates = 0;
            for mut batch in [first, second] {
                let (results, _) = batch.answer().as_mut().await;
                let inbound = p.receiver.finish(batch, results, &stats);
                assert!(inbound.end.is_none(), "{:?}", inbound.end);
                key_updates += usize::from(inbound.key_update_requested);
                got.extend(plain_of(inbound));
            }
            assert_eq!(key_updates, 1);
            // What was opened under the old key counts for nothing: framed again.
            assert!(p.receiver.has_work());
            while p.receiver.has_work() {
                match p.receiver.pipeline(engines) {
                    Some(mut batch) => {
                        let (results, _) = batch.answer().as_mut().await;
                        let inbound = p.receiver.finish(batch, results, &stats);
                        assert!(inbound.end.is_none());
                        got.extend(plain_of(inbound));
                    }
                    None => {
                        let inbound = p.receiver.step(engines).await;
                        assert!(inbound.end.is_none());
                        got.extend(plain_of(inbound));
                    }
                }
            }
            assert_eq!(got, expected);
            assert_eq!(p.receiver.rx.in_flight(), 0);
        });
    }
}
