//! The record layer of one established connection: framing, protection on the device or the
//! CPU, and the control messages (alerts, KeyUpdate) TLS carries after its handshake.
//!
//! After the handshake rustls hands over the traffic secrets (`dangerous_into_kernel_connection`)
//! and this module does what rustls would have done with them. Each direction keeps a host
//! copy of its key; it moves onto a device key slot the first time it sees a record of at
//! least [`Policy::cpu_below`] bytes, so interactive connections never pay for a key load and
//! bulk ones pay once. The device numbers a slot's records itself (spec §4.4); the host
//! mirrors the number, so a direction whose device fails carries on on the CPU at the right
//! sequence number without the peer noticing. A KeyUpdate gives the direction a new key and
//! destroys its slot.
//!
//! Device jobs run on a spawned task that owns their DMA buffers and key slot until the
//! device has answered, so a connection dropped mid-batch never frees memory the device may
//! still write.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rustls::{AlertDescription, ConnectionTrafficSecrets};
use tlsaccel_driver::abi::{
    tls12_record_len, tls13_record_len, AeadAlgorithm, KeyDirection, RecordProtocol, Status,
    TAG_LEN, TLS_HEADER_LEN, TLS_LEGACY_VERSION, TLS_MAX_PLAINTEXT,
};
use tlsaccel_driver::{Device, DmaBuffer, JobError, JobOp, KeyMaterial, KeySlot};
use tlsaccel_record::RecordKey;

use crate::batch::{BatchResult, RecordQueue};

/// TLS content types.
pub mod content {
    pub const CHANGE_CIPHER_SPEC: u8 = 20;
    pub const ALERT: u8 = 21;
    pub const HANDSHAKE: u8 = 22;
    pub const APPLICATION_DATA: u8 = 23;
}

/// Alert levels (RFC 8446 §6).
const ALERT_WARNING: u8 = 1;
const ALERT_FATAL: u8 = 2;
/// Handshake message type of KeyUpdate (RFC 8446 §4.6.3).
const KEY_UPDATE: u8 = 24;
/// Longest record body TLS 1.3 allows (RFC 8446 §5.2).
const TLS13_MAX_BODY: usize = TLS_MAX_PLAINTEXT + 256;
/// Longest record body TLS 1.2 allows (RFC 5246 §6.2.3).
const TLS12_MAX_BODY: usize = TLS_MAX_PLAINTEXT + 2048;
/// Longest post-handshake handshake message we hold while it arrives in pieces.
const MAX_HANDSHAKE_BUFFER: usize = 64;

/// The negotiated protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Tls12,
    Tls13,
}

impl Version {
    fn protocol(self) -> RecordProtocol {
        match self {
            Version::Tls12 => RecordProtocol::TLS12,
            Version::Tls13 => RecordProtocol::TLS13,
        }
    }

    fn max_body(self) -> usize {
        match self {
            Version::Tls12 => TLS12_MAX_BODY,
            Version::Tls13 => TLS13_MAX_BODY,
        }
    }
}

/// Why the record layer ends a connection; [`RecordError::alert`] is what the peer is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("a record failed authentication")]
    BadRecordMac,
    #[error("a record is longer than TLS allows")]
    RecordOverflow,
    #[error("unexpected message: {0}")]
    UnexpectedMessage(&'static str),
    #[error("malformed record: {0}")]
    Decode(&'static str),
    #[error("illegal parameter: {0}")]
    IllegalParameter(&'static str),
    #[error("peer over a limit: {0}")]
    Limit(&'static str),
    #[error("the peer sent a fatal alert ({0:?})")]
    PeerAlert(AlertDescription),
    #[error("unusable traffic secrets: {0}")]
    Secrets(String),
}

impl RecordError {
    /// The fatal alert to send, if any (none when the peer already sent one).
    pub fn alert(&self) -> Option<AlertDescription> {
        match self {
            RecordError::BadRecordMac => Some(AlertDescription::BadRecordMac),
            RecordError::RecordOverflow => Some(AlertDescription::RecordOverflow),
            RecordError::UnexpectedMessage(_) => Some(AlertDescription::UnexpectedMessage),
            RecordError::Decode(_) => Some(AlertDescription::DecodeError),
            RecordError::IllegalParameter(_) => Some(AlertDescription::IllegalParameter),
            RecordError::Limit(_) => Some(AlertDescription::UnexpectedMessage),
            RecordError::Secrets(_) => Some(AlertDescription::InternalError),
            RecordError::PeerAlert(_) => None,
        }
    }
}

/// Counters of the record layer, shared by every connection.
#[derive(Debug, Default)]
pub struct RecordStats {
    pub device_sealed_records: AtomicU64,
    pub device_sealed_bytes: AtomicU64,
    pub cpu_sealed_records: AtomicU64,
    pub cpu_sealed_bytes: AtomicU64,
    pub device_opened_records: AtomicU64,
    pub device_opened_bytes: AtomicU64,
    pub cpu_opened_records: AtomicU64,
    pub cpu_opened_bytes: AtomicU64,
    /// Key loads into device slots.
    pub key_loads: AtomicU64,
    /// Directions that moved to the CPU because the device failed them.
    pub device_fallbacks: AtomicU64,
    /// Records the device refused (bad tag, malformed) that the CPU then opened: device
    /// faults, not the client's.
    pub device_refused_good_records: AtomicU64,
    /// Plaintext bytes the device sealed straight from DMA memory the backend was read
    /// into, the records going to the client from DMA memory: no copy by the host.
    pub zero_copy_sealed_bytes: AtomicU64,
    /// Plaintext bytes the device opened from DMA memory the client was read into, going to
    /// the backend from DMA memory: no copy by the host.
    pub zero_copy_opened_bytes: AtomicU64,
    /// Batches done on the CPU because DMA memory or key slots ran out.
    pub device_saturated: AtomicU64,
    pub key_updates_received: AtomicU64,
    pub key_updates_sent: AtomicU64,
    /// Connections ended because the client went over a limit, by limit.
    pub peer_limits: crate::metrics::LabelledCounter,
    /// TLS 1.2 connections closed at their key's record limit.
    pub key_exhausted: AtomicU64,
}

/// When records go to the device.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// A direction moves to the device at its first record of at least this many bytes.
    pub cpu_below: usize,
}

/// The device side of the record layer: where a connection's jobs go.
#[derive(Debug, Clone)]
pub struct RecordDevice {
    pub device: Arc<Device>,
    pub queue: RecordQueue,
}

/// One direction's key and sequence number, on the CPU and perhaps on a device slot.
pub struct Direction {
    version: Version,
    seal: bool,
    material: KeyMaterial,
    /// The CPU's key context (some 600 bytes in aws-lc), made from `material` when a
    /// record needs it and dropped while the connection is quiet ([`Direction::release_idle`]).
    cpu: Option<RecordKey>,
    sequence: u64,
    slot: Option<Arc<KeySlot>>,
    /// The device failed this direction once; it stays on the CPU.
    device_off: bool,
    /// Records handed to the device and not yet answered (pipelined batches).
    in_flight: u64,
    /// Tells this direction's batches from those of the key it replaced.
    id: u64,
}

/// Numbers each [`Direction`] made.
static DIRECTIONS: AtomicU64 = AtomicU64::new(0);

impl std::fmt::Debug for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Direction")
            .field("version", &self.version)
            .field("seal", &self.seal)
            .field("sequence", &self.sequence)
            .field("on_device", &self.slot.is_some())
            .finish_non_exhaustive()
    }
}

impl Direction {
    /// A direction protected with `secrets`, whose next record has number `sequence`.
    pub fn new(
        version: Version,
        seal: bool,
        secrets: &ConnectionTrafficSecrets,
        sequence: u64,
    ) -> Result<Self, RecordError> {
        let (algorithm, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
                (AeadAlgorithm::AES_128_GCM, key.as_ref(), iv.as_ref())
            }
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
                (AeadAlgorithm::AES_256_GCM, key.as_ref(), iv.as_ref())
            }
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (AeadAlgorithm::CHACHA20_POLY1305, key.as_ref(), iv.as_ref())
            }
            _ => return Err(RecordError::Secrets("unsupported cipher suite".into())),
        };
        let iv: [u8; 12] = iv
            .try_into()
            .map_err(|_| RecordError::Secrets("IV is not 12 bytes".into()))?;
        let direction = if seal {
            KeyDirection::SEAL
        } else {
            KeyDirection::OPEN
        };
        let material =
            KeyMaterial::new(algorithm, version.protocol(), direction, key, iv, sequence)
                .map_err(|e| RecordError::Secrets(e.to_string()))?;
        // Checked now; the context itself is made when the first record needs it: an idle
        // connection holds none.
        RecordKey::new(algorithm, version.protocol(), direction, key, iv)
            .map_err(|s| RecordError::Secrets(format!("key refused: {s}")))?;
        Ok(Self {
            version,
            seal,
            material,
            cpu: None,
            sequence,
            slot: None,
            device_off: false,
            in_flight: 0,
            id: DIRECTIONS.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// Drops the CPU's key context while the connection is quiet; the next record on the
    /// CPU makes it again from the key material.
    pub fn release_idle(&mut self) {
        self.cpu = None;
    }

    /// The CPU's key context, made again if it was released.
    fn cpu_key(&mut self) -> &RecordKey {
        let material = &self.material;
        self.cpu.get_or_insert_with(|| {
            RecordKey::new(
                material.algorithm,
                material.protocol,
                material.direction,
                material.key(),
                material.iv(),
            )
            // The same material made a context when the direction was created.
            .expect("key material accepted before")
        })
    }

    /// The number of the next record.
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// True while this direction's key is in a device slot.
    pub fn on_device(&self) -> bool {
        self.slot.is_some()
    }

    /// Moves the key onto the device if the policy says so and it is not there yet; returns
    /// true when the batch should go to the device.
    fn wants_device(
        &mut self,
        device: Option<&RecordDevice>,
        policy: Policy,
        largest: usize,
        stats: &RecordStats,
    ) -> bool {
        let Some(device) = device else {
            // The device went out of service (or its queue is being replaced) while this
            // direction was on it: the slot would fall out of step, so the direction moves
            // to the CPU for good.
            if self.slot.is_some() {
                tracing::info!("the device queue went out of service; direction moves to the CPU");
                self.fall_back(stats);
            }
            return false;
        };
        if self.slot.is_some() {
            return true;
        }
        if self.device_off || largest < policy.cpu_below || device.device.is_lost() {
            return false;
        }
        self.material.sequence = self.sequence;
        // A key load is one admin round trip; block this worker, not the runtime.
        let loaded = crate::tls::blocking(|| device.device.load_key(&self.material));
        match loaded {
            Ok(slot) => {
                stats.key_loads.fetch_add(1, Ordering::Relaxed);
                self.slot = Some(Arc::new(slot));
                true
            }
            Err(tlsaccel_driver::DeviceError::NoFreeSlot) => {
                stats.device_saturated.fetch_add(1, Ordering::Relaxed);
                false
            }
            Err(error) => {
                tracing::warn!(%error, "key load failed; direction stays on the CPU");
                self.fall_back(stats);
                false
            }
        }
    }

    fn fall_back(&mut self, stats: &RecordStats) {
        self.slot = None;
        self.device_off = true;
        stats.device_fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    /// Seals each `(content type, plaintext)` (at most 2^14 bytes each) into one record and
    /// appends the records to `out`, in order.
    pub async fn seal(
        &mut self,
        items: &[(u8, &[u8])],
        out: &mut Vec<u8>,
        device: Option<&RecordDevice>,
        policy: Policy,
        stats: &RecordStats,
    ) {
        debug_assert!(self.seal);
        let largest = items.iter().map(|(_, p)| p.len()).max().unwrap_or(0);
        let mut done = 0;
        if !items.is_empty() && self.wants_device(device, policy, largest, stats) {
            if let Some(device) = device {
                done = self.seal_on_device(items, out, device, stats).await;
            }
        }
        for &(content_type, plaintext) in &items[done..] {
            self.seal_on_cpu(content_type, plaintext, out);
            stats.cpu_sealed_records.fetch_add(1, Ordering::Relaxed);
            stats
                .cpu_sealed_bytes
                .fetch_add(plaintext.len() as u64, Ordering::Relaxed);
        }
    }

    /// Seals application data that lies in DMA memory (each source a buffer and a range of
    /// it), in records of at most 2^14 bytes, in order. On the device every record goes in
    /// one submission, sealed from the sources into one DMA buffer, never passing through
    /// host memory; what the device does not seal (it failed, or the direction is on the
    /// CPU) is copied out and sealed on the CPU. Returns the records and the sources' buffers.
    pub async fn seal_dma(
        &mut self,
        sources: Vec<(DmaBuffer, Range<usize>)>,
        device: Option<&RecordDevice>,
        policy: Policy,
        stats: &RecordStats,
    ) -> (Vec<Chunk>, Vec<DmaBuffer>) {
        debug_assert!(self.seal && self.in_flight == 0);
        let work = DmaSeal::new(sources);
        let largest = work.pieces.iter().map(|(_, r)| r.len()).max().unwrap_or(0);
        if !work.pieces.is_empty() && self.wants_device(device, policy, largest, stats) {
            if let Some(device) = device {
                match self.submit_dma_seal(work, device, stats, false) {
                    Ok(pending) => {
                        let results = pending.answer.await.0;
                        return self.finish_dma_seal(pending.work, results, stats);
                    }
                    Err(work) => return self.finish_dma_seal(work, Vec::new(), stats),
                }
            }
        }
        self.finish_dma_seal(work, Vec::new(), stats)
    }

    /// Records of application data in DMA memory, handed to the device without waiting for
    /// the answer, behind the direction's batches already in flight: the device numbers a
    /// slot's records in the order it finds them. Only for a direction on the device with
    /// `device` the queue of its batches in flight. The answer goes to
    /// [`Direction::finish_dma_seal`], in the order of submission. Gives the sources back
    /// when nothing was submitted (no slot, no DMA memory, or the batcher is full).
    pub fn pipeline_dma_seal(
        &mut self,
        sources: Vec<(DmaBuffer, Range<usize>)>,
        device: &RecordDevice,
        stats: &RecordStats,
    ) -> Result<PendingSeal, Vec<(DmaBuffer, Range<usize>)>> {
        debug_assert!(self.seal);
        self.submit_dma_seal(DmaSeal::new(sources), device, stats, true)
            .map_err(|work| work.sources)
    }

    /// Records this direction has on the device, not yet answered.
    pub fn in_flight(&self) -> u64 {
        self.in_flight
    }

    fn submit_dma_seal(
        &mut self,
        work: DmaSeal,
        device: &RecordDevice,
        stats: &RecordStats,
        pipelined: bool,
    ) -> Result<PendingSeal, DmaSeal> {
        let Some(slot) = self.slot.clone() else {
            return Err(work);
        };
        let algorithm = self.material.algorithm;
        let lens: Vec<usize> = work
            .pieces
            .iter()
            .map(|(_, p)| match self.version {
                Version::Tls13 => tls13_record_len(p.len(), 0),
                Version::Tls12 => tls12_record_len(algorithm, p.len()),
            })
            .collect();
        let total: usize = lens.iter().sum();
        let Ok(dst) = device.device.pool().alloc_for_output(total) else {
            stats.device_saturated.fetch_add(1, Ordering::Relaxed);
            return Err(work);
        };
        let mut ops = Vec::with_capacity(work.pieces.len());
        let mut at = 0;
        for ((source, piece), &record_len) in work.pieces.iter().zip(&lens) {
            let (Ok(src_span), Ok(dst_span)) = (
                work.sources[*source].0.span(piece.start, piece.len()),
                dst.span(at, record_len),
            ) else {
                return Err(work);
            };
            at += record_len;
            ops.push(match self.version {
                Version::Tls13 => JobOp::Tls13Seal {
                    slot: slot.slot_ref(),
                    content_type: content::APPLICATION_DATA,
                    padding: 0,
                    src: src_span,
                    dst: dst_span,
                },
                Version::Tls12 => JobOp::Tls12Seal {
                    slot: slot.slot_ref(),
                    algorithm,
                    content_type: content::APPLICATION_DATA,
                    src: src_span,
                    dst: dst_span,
                },
            });
        }
        // The spans hold both buffers for as long as the device may use them; the batch
        // needs no buffers of its own.
        let answer: Answer = if pipelined {
            match device.queue.enqueue(ops, Vec::new(), slot) {
                Some(answer) => Box::pin(answer),
                None => return Err(work),
            }
        } else {
            let queue = device.queue.clone();
            Box::pin(async move { queue.run(ops, Vec::new(), slot).await })
        };
        self.in_flight += work.pieces.len() as u64;
        Ok(PendingSeal {
            answer,
            work: DmaWork {
                seal: work,
                dst: Some(dst),
                lens,
            },
        })
    }

    /// Takes the device's answer for a batch from [`Direction::pipeline_dma_seal`] (or none,
    /// for work that never reached it) and gives the records, in order, with the sources'
    /// buffers. What the device did not seal is sealed on the CPU at the right numbers: a
    /// failed record moves the direction to the CPU, and every batch still in flight behind
    /// it is then sealed again on the CPU, whatever the device answers for it, so no
    /// number is used twice on the wire.
    pub fn finish_dma_seal(
        &mut self,
        work: impl Into<DmaWork>,
        results: Vec<Result<tlsaccel_driver::JobOutput, JobError>>,
        stats: &RecordStats,
    ) -> (Vec<Chunk>, Vec<DmaBuffer>) {
        let DmaWork { seal, dst, lens } = work.into();
        let DmaSeal { sources, pieces } = seal;
        let mut chunks = Vec::new();
        let mut done = 0;
        if let Some(dst) = dst {
            self.in_flight -= pieces.len() as u64;
            // After a fall-back the device's answers for batches behind it count for nothing.
            let answered = if self.slot.is_some() {
                results.as_slice()
            } else {
                &[]
            };
            let mut bytes = 0;
            for (i, result) in answered.iter().enumerate().take(pieces.len()) {
                match result {
                    Ok(output) if output.len as usize == lens[i] => {
                        self.sequence += 1;
                        done += 1;
                        bytes += lens[i];
                        stats.device_sealed_records.fetch_add(1, Ordering::Relaxed);
                        stats
                            .device_sealed_bytes
                            .fetch_add(pieces[i].1.len() as u64, Ordering::Relaxed);
                    }
                    Ok(_) | Err(_) => {
                        tracing::warn!("device seal failed; direction moves to the CPU");
                        self.fall_back(stats);
                        break;
                    }
                }
            }
            if done == pieces.len() {
                // Nothing but sealed records: what goes on the wire needs no zeroing.
                dst.mark_public();
            }
            stats.zero_copy_sealed_bytes.fetch_add(
                pieces[..done].iter().map(|(_, r)| r.len()).sum::<usize>() as u64,
                Ordering::Relaxed,
            );
            if bytes > 0 {
                chunks.push(Chunk::Dma(dst, 0..bytes));
            }
        }
        if done < pieces.len() {
            let mut out = Vec::new();
            for (source, range) in &pieces[done..] {
                let mut plain = vec![0; range.len()];
                if sources[*source].0.read(range.start, &mut plain).is_err() {
                    break;
                }
                self.seal_on_cpu(content::APPLICATION_DATA, &plain, &mut out);
                stats.cpu_sealed_records.fetch_add(1, Ordering::Relaxed);
                stats
                    .cpu_sealed_bytes
                    .fetch_add(plain.len() as u64, Ordering::Relaxed);
                tlsaccel_record::scrub(&mut plain);
            }
            chunks.push(Chunk::Heap(out));
        }
        (chunks, sources.into_iter().map(|(b, _)| b).collect())
    }

    /// Seals on the device; returns how many items it sealed (the rest are the CPU's).
    async fn seal_on_device(
        &mut self,
        items: &[(u8, &[u8])],
        out: &mut Vec<u8>,
        device: &RecordDevice,
        stats: &RecordStats,
    ) -> usize {
        let Some(slot) = self.slot.clone() else {
            return 0;
        };
        let algorithm = self.material.algorithm;
        let mut buffers = Vec::with_capacity(items.len() * 2);
        let mut ops = Vec::with_capacity(items.len());
        for &(content_type, plaintext) in items {
            let record_len = match self.version {
                Version::Tls13 => tls13_record_len(plaintext.len(), 0),
                Version::Tls12 => tls12_record_len(algorithm, plaintext.len()),
            };
            let pool = device.device.pool();
            let (Ok(src), Ok(dst)) = (pool.alloc(plaintext.len().max(1)), pool.alloc(record_len))
            else {
                stats.device_saturated.fetch_add(1, Ordering::Relaxed);
                return 0;
            };
            if src.write(0, plaintext).is_err() {
                return 0;
            }
            let (Ok(src_span), dst_span) = (src.span(0, plaintext.len()), dst.whole()) else {
                return 0;
            };
            ops.push(match self.version {
                Version::Tls13 => JobOp::Tls13Seal {
                    slot: slot.slot_ref(),
                    content_type,
                    padding: 0,
                    src: src_span,
                    dst: dst_span,
                },
                Version::Tls12 => JobOp::Tls12Seal {
                    slot: slot.slot_ref(),
                    algorithm,
                    content_type,
                    src: src_span,
                    dst: dst_span,
                },
            });
            buffers.push(src);
            buffers.push(dst);
        }
        let (results, buffers) = device.queue.run(ops, buffers, Arc::clone(&slot)).await;
        for (i, result) in results.iter().enumerate() {
            let dst = &buffers[2 * i + 1];
            match result {
                Ok(output) => {
                    let at = out.len();
                    out.resize(at + output.len as usize, 0);
                    if dst.read(0, &mut out[at..]).is_err() {
                        out.truncate(at);
                        self.fall_back(stats);
                        return i;
                    }
                    self.sequence += 1;
                    stats.device_sealed_records.fetch_add(1, Ordering::Relaxed);
                    stats
                        .device_sealed_bytes
                        .fetch_add(items[i].1.len() as u64, Ordering::Relaxed);
                }
                Err(error) => {
                    // Records after a failed one may have been numbered differently from
                    // the host's count: they are sealed again on the CPU, and the slot,
                    // now out of step, is destroyed.
                    tracing::warn!(%error, "device seal failed; direction moves to the CPU");
                    self.fall_back(stats);
                    return i;
                }
            }
        }
        results.len()
    }

    fn seal_on_cpu(&mut self, content_type: u8, plaintext: &[u8], out: &mut Vec<u8>) {
        let at = out.len();
        let (prefix, record_len) = match self.version {
            Version::Tls13 => (TLS_HEADER_LEN, tls13_record_len(plaintext.len(), 0)),
            Version::Tls12 => (
                TLS_HEADER_LEN + self.material.algorithm.tls12_explicit_nonce_len(),
                tls12_record_len(self.material.algorithm, plaintext.len()),
            ),
        };
        out.resize(at + record_len, 0);
        let buf = &mut out[at..];
        buf[prefix..prefix + plaintext.len()].copy_from_slice(plaintext);
        let sequence = self.sequence;
        let version = self.version;
        let key = self.cpu_key();
        let sealed = match version {
            Version::Tls13 => {
                tlsaccel_record::tls13_seal(key, sequence, content_type, 0, buf, plaintext.len())
            }
            Version::Tls12 => {
                tlsaccel_record::tls12_seal(key, sequence, content_type, buf, plaintext.len())
            }
        };
        // The buffer was sized for exactly this record, so sealing cannot fail.
        debug_assert!(matches!(sealed, Ok(o) if o.len == record_len));
        self.sequence += 1;
    }

    /// Opens whole records in place: each range of `buf` holds one record as framed by
    /// [`frame`], in order. On success a record's plaintext is left in `buf` at the range
    /// [`Opened::plain`] names, inside the record's own range.
    ///
    /// Stops at the first failure, which is then the last result. On the CPU it also stops
    /// after the first record that is not application data (a KeyUpdate changes the key of
    /// the records after it), leaving later records untouched for the caller to frame again.
    /// On the device every record of the batch is attempted; results after a control record
    /// are the caller's to discard.
    pub async fn open(
        &mut self,
        buf: &mut [u8],
        records: &[Range<usize>],
        device: Option<&RecordDevice>,
        policy: Policy,
        stats: &RecordStats,
    ) -> Vec<Result<Opened, RecordError>> {
        debug_assert!(!self.seal);
        let largest = records.iter().map(|r| r.len()).max().unwrap_or(0);
        let mut results = Vec::with_capacity(records.len());
        if !records.is_empty() && self.wants_device(device, policy, largest, stats) {
            if let Some(device) = device {
                self.open_on_device(buf, records, device, stats, &mut results)
                    .await;
            }
        }
        if results.len() < records.len() && !results.is_empty() {
            // The device stopped part-way (it failed, or refused a record): whatever it did
            // open before a control record stands; the CPU goes on only after data.
            let last_data = matches!(
                results.last(),
                Some(Ok(Opened {
                    content_type: content::APPLICATION_DATA,
                    ..
                }))
            );
            if !last_data {
                return results;
            }
        }
        while results.len() < records.len() {
            let record = records[results.len()].clone();
            let opened = self.open_on_cpu(buf, record);
            let go_on = matches!(
                &opened,
                Ok(Opened {
                    content_type: content::APPLICATION_DATA,
                    ..
                })
            );
            if let Ok(o) = &opened {
                stats.cpu_opened_records.fetch_add(1, Ordering::Relaxed);
                stats
                    .cpu_opened_bytes
                    .fetch_add(o.plain.len() as u64, Ordering::Relaxed);
            }
            results.push(opened);
            if !go_on {
                break;
            }
        }
        results
    }

    async fn open_on_device(
        &mut self,
        buf: &mut [u8],
        records: &[Range<usize>],
        device: &RecordDevice,
        stats: &RecordStats,
        results: &mut Vec<Result<Opened, RecordError>>,
    ) {
        let Some(slot) = self.slot.clone() else {
            return;
        };
        let algorithm = self.material.algorithm;
        let mut buffers = Vec::with_capacity(records.len() * 2);
        let mut ops = Vec::with_capacity(records.len());
        for record in records {
            let record = &buf[record.clone()];
            let pool = device.device.pool();
            let (Ok(src), Ok(dst)) = (pool.alloc(record.len()), pool.alloc(record.len())) else {
                stats.device_saturated.fetch_add(1, Ordering::Relaxed);
                return;
            };
            if src.write(0, record).is_err() {
                return;
            }
            let (Ok(src_span), dst_span) = (src.span(0, record.len()), dst.whole()) else {
                return;
            };
            ops.push(match self.version {
                Version::Tls13 => JobOp::Tls13Open {
                    slot: slot.slot_ref(),
                    src: src_span,
                    dst: dst_span,
                },
                Version::Tls12 => JobOp::Tls12Open {
                    slot: slot.slot_ref(),
                    algorithm,
                    src: src_span,
                    dst: dst_span,
                },
            });
            buffers.push(src);
            buffers.push(dst);
        }
        let (outcomes, buffers) = device.queue.run(ops, buffers, Arc::clone(&slot)).await;
        for (i, outcome) in outcomes.into_iter().enumerate() {
            let record = records[i].clone();
            match outcome {
                Ok(output) => {
                    let len = output.len as usize;
                    // The device checked the length against the record's (driver); the
                    // plaintext always fits where its record was.
                    let Some(place) = buf.get_mut(record.start..record.start + len) else {
                        self.fall_back(stats);
                        return;
                    };
                    if len > record.len() || buffers[2 * i + 1].read(0, place).is_err() {
                        self.fall_back(stats);
                        return;
                    }
                    self.sequence += 1;
                    stats.device_opened_records.fetch_add(1, Ordering::Relaxed);
                    stats
                        .device_opened_bytes
                        .fetch_add(len as u64, Ordering::Relaxed);
                    results.push(Ok(Opened {
                        content_type: output.content_type,
                        plain: record.start..record.start + len,
                    }));
                }
                Err(JobError::Device { status, .. }) if record_status(status).is_some() => {
                    let checked = self
                        .recheck_refused(buf[record.clone()].to_vec(), status, stats)
                        .map(|(content_type, plain)| {
                            // The plaintext goes where its record was, as on the device.
                            let at = record.start;
                            buf[at..at + plain.len()].copy_from_slice(&plain);
                            Opened {
                                content_type,
                                plain: at..at + plain.len(),
                            }
                        });
                    results.push(checked);
                    return;
                }
                Err(error) => {
                    // Not the record's fault: open it (and the rest) on the CPU.
                    tracing::warn!(%error, "device open failed; direction moves to the CPU");
                    self.fall_back(stats);
                    return;
                }
            }
        }
    }

    /// Opens whole records that lie in DMA memory (`src` at `records`, framed by [`frame`]),
    /// in order. On the device each record is opened from `src` into a DMA buffer of its
    /// own, and its plaintext stays there ([`Chunk::Dma`]) on its way to the backend; on the
    /// CPU (the direction is not on the device, or the device failed) a record is copied out
    /// and opened in host memory. Stops at the first failure, and on the CPU after the first
    /// record that is not application data, like [`Direction::open`].
    pub async fn open_dma(
        &mut self,
        src: &DmaBuffer,
        records: &[Range<usize>],
        device: Option<&RecordDevice>,
        policy: Policy,
        stats: &RecordStats,
    ) -> Vec<Result<(u8, Chunk), RecordError>> {
        debug_assert!(!self.seal && self.in_flight == 0);
        let largest = records.iter().map(Range::len).max().unwrap_or(0);
        if !records.is_empty() && self.wants_device(device, policy, largest, stats) {
            if let Some(device) = device {
                if let Some(pending) = self.submit_dma_open(src, records, device, stats, false) {
                    let results = pending.answer.await.0;
                    return self.finish_dma_open(src, pending.work, results, stats);
                }
            }
        }
        self.finish_dma_open(src, DmaOpen::cpu(records), Vec::new(), stats)
    }

    /// Records in DMA memory handed to the device to open without waiting for the answer,
    /// behind the direction's batches in flight (see [`Direction::pipeline_dma_seal`]).
    /// `None` when nothing was submitted (no slot, no DMA memory, the batcher is full).
    pub fn pipeline_dma_open(
        &mut self,
        src: &DmaBuffer,
        records: &[Range<usize>],
        device: &RecordDevice,
        stats: &RecordStats,
    ) -> Option<PendingOpen> {
        debug_assert!(!self.seal);
        self.submit_dma_open(src, records, device, stats, true)
    }

    fn submit_dma_open(
        &mut self,
        src: &DmaBuffer,
        records: &[Range<usize>],
        device: &RecordDevice,
        stats: &RecordStats,
        pipelined: bool,
    ) -> Option<PendingOpen> {
        let slot = self.slot.clone()?;
        let algorithm = self.material.algorithm;
        let mut outputs = Vec::with_capacity(records.len());
        let mut ops = Vec::with_capacity(records.len());
        for record in records {
            let Ok(dst) = device.device.pool().alloc(record.len()) else {
                stats.device_saturated.fetch_add(1, Ordering::Relaxed);
                return None;
            };
            let src_span = src.span(record.start, record.len()).ok()?;
            ops.push(match self.version {
                Version::Tls13 => JobOp::Tls13Open {
                    slot: slot.slot_ref(),
                    src: src_span,
                    dst: dst.whole(),
                },
                Version::Tls12 => JobOp::Tls12Open {
                    slot: slot.slot_ref(),
                    algorithm,
                    src: src_span,
                    dst: dst.whole(),
                },
            });
            outputs.push(dst);
        }
        let answer: Answer = if pipelined {
            Box::pin(device.queue.enqueue(ops, Vec::new(), slot)?)
        } else {
            let queue = device.queue.clone();
            Box::pin(async move { queue.run(ops, Vec::new(), slot).await })
        };
        self.in_flight += records.len() as u64;
        Some(PendingOpen {
            answer,
            work: DmaOpen {
                records: records.to_vec(),
                outputs: Some(outputs),
                direction: self.id,
            },
        })
    }

    /// Takes the device's answer for a batch of opens (or none, for work that never reached
    /// it) and gives each record's content type and plaintext, in order, stopping at the
    /// first failure and, on the CPU, after the first record that is not application data.
    /// A device failure moves the direction to the CPU, which opens that record and the rest
    /// of the batch; batches in flight behind it are then opened on the CPU too, whatever
    /// the device answers for them.
    pub fn finish_dma_open(
        &mut self,
        src: &DmaBuffer,
        work: DmaOpen,
        results: Vec<Result<tlsaccel_driver::JobOutput, JobError>>,
        stats: &RecordStats,
    ) -> Vec<Result<(u8, Chunk), RecordError>> {
        let DmaOpen {
            records,
            outputs,
            direction,
        } = work;
        debug_assert!(outputs.is_none() || direction == self.id);
        let mut opened = Vec::with_capacity(records.len());
        if let Some(outputs) = outputs {
            self.in_flight -= records.len() as u64;
            let answered = if self.slot.is_some() {
                results
            } else {
                Vec::new()
            };
            self.take_device_opens(src, &records, outputs, answered, stats, &mut opened);
            if opened.len() < records.len() && !opened.is_empty() {
                // The device stopped part-way: what it opened before a control record
                // stands; the CPU goes on only after data.
                let last_data = matches!(opened.last(), Some(Ok((content::APPLICATION_DATA, _))));
                if !last_data {
                    return opened;
                }
            }
        }
        while opened.len() < records.len() {
            let record = records[opened.len()].clone();
            let mut copy = vec![0; record.len()];
            if src.read(record.start, &mut copy).is_err() {
                opened.push(Err(RecordError::Decode("record outside its buffer")));
                break;
            }
            let result = self.open_on_cpu(&mut copy, 0..record.len()).map(|o| {
                copy.truncate(o.plain.end);
                copy.drain(..o.plain.start);
                (o.content_type, Chunk::Heap(std::mem::take(&mut copy)))
            });
            let go_on = matches!(&result, Ok((content::APPLICATION_DATA, _)));
            if let Ok((_, plain)) = &result {
                stats.cpu_opened_records.fetch_add(1, Ordering::Relaxed);
                stats
                    .cpu_opened_bytes
                    .fetch_add(plain.len() as u64, Ordering::Relaxed);
            }
            opened.push(result);
            if !go_on {
                break;
            }
        }
        opened
    }

    /// Drops a batch of opens whose answer no longer counts (its records are framed and
    /// opened again): only the count of records in flight changes.
    pub fn forget_dma_open(&mut self, work: DmaOpen) {
        // A batch of the key this one replaced (a KeyUpdate) was never counted here.
        if work.outputs.is_some() && work.direction == self.id {
            self.in_flight -= work.records.len() as u64;
        }
    }

    /// The device's answers, in order, up to the first that is not a good record.
    fn take_device_opens(
        &mut self,
        src: &DmaBuffer,
        records: &[Range<usize>],
        outputs: Vec<DmaBuffer>,
        results: Vec<Result<tlsaccel_driver::JobOutput, JobError>>,
        stats: &RecordStats,
        opened: &mut Vec<Result<(u8, Chunk), RecordError>>,
    ) {
        for ((outcome, dst), record) in results.into_iter().zip(outputs).zip(records) {
            match outcome {
                Ok(output) => {
                    let len = output.len as usize;
                    if len > record.len() {
                        self.fall_back(stats);
                        return;
                    }
                    self.sequence += 1;
                    stats.device_opened_records.fetch_add(1, Ordering::Relaxed);
                    stats
                        .device_opened_bytes
                        .fetch_add(len as u64, Ordering::Relaxed);
                    stats
                        .zero_copy_opened_bytes
                        .fetch_add(len as u64, Ordering::Relaxed);
                    opened.push(Ok((output.content_type, Chunk::Dma(dst, 0..len))));
                }
                Err(JobError::Device { status, .. }) if record_status(status).is_some() => {
                    let mut copy = vec![0; record.len()];
                    let checked = match src.read(record.start, &mut copy) {
                        Ok(()) => self
                            .recheck_refused(copy, status, stats)
                            .map(|(content_type, plain)| (content_type, Chunk::Heap(plain))),
                        Err(_) => Err(RecordError::Decode("record outside its buffer")),
                    };
                    opened.push(checked);
                    return;
                }
                Err(error) => {
                    tracing::warn!(%error, "device open failed; direction moves to the CPU");
                    self.fall_back(stats);
                    return;
                }
            }
        }
    }

    /// A record the device refused (bad tag, malformed): a device error is not a client
    /// error, so the CPU has the last word on it, at the same sequence number, before the
    /// connection is failed. `record` is a copy, scrubbed here. When the CPU opens it, the
    /// device fault is counted and the direction moves to the CPU.
    fn recheck_refused(
        &mut self,
        mut record: Vec<u8>,
        status: Status,
        stats: &RecordStats,
    ) -> Result<(u8, Vec<u8>), RecordError> {
        let len = record.len();
        let checked = self
            .open_on_cpu(&mut record, 0..len)
            .map(|o| (o.content_type, record[o.plain].to_vec()));
        tlsaccel_record::scrub(&mut record);
        if let Ok((_, plain)) = &checked {
            stats
                .device_refused_good_records
                .fetch_add(1, Ordering::Relaxed);
            stats.cpu_opened_records.fetch_add(1, Ordering::Relaxed);
            stats
                .cpu_opened_bytes
                .fetch_add(plain.len() as u64, Ordering::Relaxed);
            tracing::warn!(
                ?status,
                "device refused a record the CPU opened; direction moves to the CPU"
            );
            self.fall_back(stats);
        }
        checked
    }

    /// Opens the record at `buf[record]` in place.
    fn open_on_cpu(&mut self, buf: &mut [u8], record: Range<usize>) -> Result<Opened, RecordError> {
        let base = record.start;
        let bytes = &mut buf[record];
        let len = bytes.len();
        let sequence = self.sequence;
        let version = self.version;
        let key = self.cpu_key();
        let opened = match version {
            Version::Tls13 => tlsaccel_record::tls13_open(key, sequence, bytes, len),
            Version::Tls12 => tlsaccel_record::tls12_open(key, sequence, bytes, len),
        };
        self.sequence += 1;
        match opened {
            Ok(output) => Ok(Opened {
                content_type: output.info,
                plain: base + output.start..base + output.start + output.len,
            }),
            Err(status) => Err(record_status(status)
                .unwrap_or(RecordError::Decode("record refused by the record layer"))),
        }
    }
}

/// The device's answer to a batch handed over without waiting.
pub type Answer = std::pin::Pin<Box<dyn std::future::Future<Output = BatchResult> + Send>>;

/// Application data in DMA memory to be sealed: the sources and every record's piece of
/// them (source index, range).
struct DmaSeal {
    sources: Vec<(DmaBuffer, Range<usize>)>,
    pieces: Vec<(usize, Range<usize>)>,
}

impl DmaSeal {
    fn new(sources: Vec<(DmaBuffer, Range<usize>)>) -> Self {
        let pieces = sources
            .iter()
            .enumerate()
            .flat_map(|(i, (_, range))| {
                let end = range.end;
                range
                    .clone()
                    .step_by(TLS_MAX_PLAINTEXT)
                    .map(move |at| (i, at..(at + TLS_MAX_PLAINTEXT).min(end)))
            })
            .collect();
        Self { sources, pieces }
    }
}

/// A seal handed to the device: the sources, where the records go, and their lengths.
pub struct DmaWork {
    seal: DmaSeal,
    /// `None` for work that never reached the device.
    dst: Option<DmaBuffer>,
    lens: Vec<usize>,
}

impl std::fmt::Debug for DmaWork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaWork")
            .field("records", &self.seal.pieces.len())
            .field("on_device", &self.dst.is_some())
            .finish_non_exhaustive()
    }
}

impl From<DmaSeal> for DmaWork {
    fn from(seal: DmaSeal) -> Self {
        // Never handed to the device: no output, every record for the CPU.
        Self {
            seal,
            dst: None,
            lens: Vec::new(),
        }
    }
}

/// A batch of records on the device ([`Direction::pipeline_dma_seal`]): await `answer`,
/// then give it to [`Direction::finish_dma_seal`] with `work`.
pub struct PendingSeal {
    pub answer: Answer,
    pub work: DmaWork,
}

impl PendingSeal {
    /// Plaintext bytes in the batch.
    pub fn bytes(&self) -> usize {
        self.work.seal.pieces.iter().map(|(_, r)| r.len()).sum()
    }
}

impl std::fmt::Debug for PendingSeal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingSeal")
            .field("records", &self.work.lens.len())
            .finish_non_exhaustive()
    }
}

/// Records in DMA memory to open, and the device's output buffer for each (`None` for
/// work that never reached the device).
pub struct DmaOpen {
    records: Vec<Range<usize>>,
    outputs: Option<Vec<DmaBuffer>>,
    /// The [`Direction`] that handed it over.
    direction: u64,
}

impl DmaOpen {
    fn cpu(records: &[Range<usize>]) -> Self {
        Self {
            records: records.to_vec(),
            outputs: None,
            direction: u64::MAX,
        }
    }

    /// Where the records lie in their buffer.
    pub fn records(&self) -> &[Range<usize>] {
        &self.records
    }

    /// The records' ciphertext bytes.
    pub fn bytes(&self) -> usize {
        self.records.iter().map(Range::len).sum()
    }

    /// Records in the batch.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True for a batch of no records.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

impl std::fmt::Debug for DmaOpen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaOpen")
            .field("records", &self.records.len())
            .field("on_device", &self.outputs.is_some())
            .finish()
    }
}

/// A batch of opens on the device ([`Direction::pipeline_dma_open`]): await `answer`, then
/// give it to [`Direction::finish_dma_open`] with `work`.
pub struct PendingOpen {
    pub answer: Answer,
    pub work: DmaOpen,
}

impl std::fmt::Debug for PendingOpen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingOpen")
            .field("work", &self.work)
            .finish_non_exhaustive()
    }
}

/// Bytes on their way to a peer: in host memory, or in DMA memory a device job wrote (sent
/// from there, without a copy).
#[derive(Debug)]
pub enum Chunk {
    Heap(Vec<u8>),
    Dma(DmaBuffer, Range<usize>),
}

impl Chunk {
    /// Its length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Chunk::Heap(bytes) => bytes.len(),
            Chunk::Dma(_, range) => range.len(),
        }
    }

    /// True when it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes in host memory (a copy for DMA memory).
    pub fn into_heap(self) -> Vec<u8> {
        match self {
            Chunk::Heap(bytes) => bytes,
            Chunk::Dma(buffer, range) => {
                let mut bytes = vec![0; range.len()];
                if buffer.read(range.start, &mut bytes).is_err() {
                    bytes.clear();
                }
                bytes
            }
        }
    }
}

/// One opened record: its content type and where its plaintext now lies in the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub content_type: u8,
    pub plain: Range<usize>,
}

/// What a device or CPU status on an open says about the record (None: not the record's
/// fault).
fn record_status(status: Status) -> Option<RecordError> {
    match status {
        Status::AUTH_FAILED => Some(RecordError::BadRecordMac),
        Status::RECORD_OVERFLOW => Some(RecordError::RecordOverflow),
        Status::RECORD_MALFORMED => Some(RecordError::UnexpectedMessage(
            "a TLS 1.3 record without a content type",
        )),
        _ => None,
    }
}

/// Finds the first whole record in `buf`: `Ok(Some(len))` with its length including the
/// header, `Ok(None)` when more bytes are needed, or the error to close with.
pub fn frame(buf: &[u8], version: Version) -> Result<Option<usize>, RecordError> {
    let Some(header) = buf.get(..TLS_HEADER_LEN) else {
        return Ok(None);
    };
    let content_type = header[0];
    let record_version = u16::from_be_bytes([header[1], header[2]]);
    let body = usize::from(u16::from_be_bytes([header[3], header[4]]));
    let allowed = match version {
        Version::Tls13 => content_type == content::APPLICATION_DATA,
        Version::Tls12 => matches!(
            content_type,
            content::ALERT | content::HANDSHAKE | content::APPLICATION_DATA
        ),
    };
    if !allowed {
        return Err(RecordError::UnexpectedMessage(
            "a record type not allowed after the handshake",
        ));
    }
    if record_version != TLS_LEGACY_VERSION {
        return Err(RecordError::Decode("record version is not 0x0303"));
    }
    if body > version.max_body() {
        return Err(RecordError::RecordOverflow);
    }
    let least = match version {
        Version::Tls13 => TAG_LEN + 1,
        // Without knowing the suite: the explicit nonce is the most a record can add.
        Version::Tls12 => TAG_LEN,
    };
    if body < least {
        return Err(RecordError::Decode("record shorter than its tag"));
    }
    let total = TLS_HEADER_LEN + body;
    Ok((buf.len() >= total).then_some(total))
}

/// A post-handshake control message found in the plaintext stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// The peer's KeyUpdate; `true` when it asks us to update ours too.
    KeyUpdate { update_requested: bool },
    /// A client's request to renegotiate (TLS 1.2): refused with a warning.
    Renegotiation,
    /// close_notify: the peer sends nothing more.
    CloseNotify,
    /// A warning alert that changes nothing.
    Ignored,
}

/// Collects post-handshake handshake messages, which may span records.
#[derive(Debug, Default)]
pub struct HandshakeReader {
    pending: Vec<u8>,
}

impl HandshakeReader {
    /// Takes one handshake record's plaintext. Returns the control message it completes, if
    /// any. In TLS 1.3 only KeyUpdate may arrive, and it must end its record (RFC 8446 §5.1).
    pub fn push(&mut self, version: Version, plain: &[u8]) -> Result<Option<Control>, RecordError> {
        if plain.is_empty() {
            return Err(RecordError::Decode("empty handshake record"));
        }
        if version == Version::Tls12 {
            // Any handshake message from a TLS 1.2 client now starts a renegotiation. The
            // record is dropped with the refusal.
            return Ok(Some(Control::Renegotiation));
        }
        if self.pending.len() + plain.len() > MAX_HANDSHAKE_BUFFER {
            return Err(RecordError::UnexpectedMessage(
                "post-handshake handshake message too long",
            ));
        }
        self.pending.extend_from_slice(plain);
        if self.pending.len() < 4 {
            return Ok(None);
        }
        let kind = self.pending[0];
        let len = u32::from_be_bytes([0, self.pending[1], self.pending[2], self.pending[3]]);
        if kind != KEY_UPDATE {
            return Err(RecordError::UnexpectedMessage(
                "a handshake message other than KeyUpdate",
            ));
        }
        if len != 1 {
            return Err(RecordError::Decode("KeyUpdate of the wrong length"));
        }
        if self.pending.len() < 5 {
            return Ok(None);
        }
        if self.pending.len() > 5 {
            return Err(RecordError::UnexpectedMessage(
                "data after a KeyUpdate in the same record",
            ));
        }
        let request = self.pending[4];
        self.pending.clear();
        match request {
            0 | 1 => Ok(Some(Control::KeyUpdate {
                update_requested: request == 1,
            })),
            // RFC 8446 §4.6.3.
            _ => Err(RecordError::IllegalParameter(
                "KeyUpdate request is neither 0 nor 1",
            )),
        }
    }

    /// True while part of a message waits for the rest.
    pub fn is_pending(&self) -> bool {
        !self.pending.is_empty()
    }
}

/// Reads one alert record's plaintext.
pub fn read_alert(version: Version, plain: &[u8]) -> Result<Control, RecordError> {
    let [level, description] = plain else {
        return Err(RecordError::Decode("alert record is not two bytes"));
    };
    let description = AlertDescription::from(*description);
    match description {
        AlertDescription::CloseNotify => Ok(Control::CloseNotify),
        AlertDescription::UserCanceled => Ok(Control::Ignored),
        _ if version == Version::Tls12 && *level == ALERT_WARNING => Ok(Control::Ignored),
        other => Err(RecordError::PeerAlert(other)),
    }
}

/// The plaintext of an alert record.
pub fn alert_message(description: AlertDescription, fatal: bool) -> [u8; 2] {
    let level = if fatal { ALERT_FATAL } else { ALERT_WARNING };
    [level, u8::from(description)]
}

/// The plaintext of a KeyUpdate handshake message.
pub fn key_update_message(update_requested: bool) -> [u8; 5] {
    [KEY_UPDATE, 0, 0, 1, u8::from(update_requested)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::cipher::{AeadKey, Iv};
    use tlsaccel_driver::abi::ModelFault;

    fn secrets(chacha: bool) -> ConnectionTrafficSecrets {
        let key = AeadKey::from([7u8; 32]);
        let iv = Iv::new([3u8; 12]);
        if chacha {
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv }
        } else {
            ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        }
    }

    #[test]
    fn framing_waits_for_whole_records_and_refuses_bad_headers() {
        let mut record = vec![23, 3, 3, 0, 40];
        record.extend([0u8; 40]);
        assert_eq!(frame(&record[..3], Version::Tls13), Ok(None));
        assert_eq!(frame(&record[..20], Version::Tls13), Ok(None));
        assert_eq!(frame(&record, Version::Tls13), Ok(Some(45)));
        let mut two = record.clone();
        two.extend_from_slice(&record);
        assert_eq!(frame(&two, Version::Tls13), Ok(Some(45)));

        let oversized = [23, 3, 3, 0x41, 0x01];
        assert_eq!(
            frame(&oversized, Version::Tls13),
            Err(RecordError::RecordOverflow)
        );
        // TLS 1.2 allows 2^14 + 2048.
        assert_eq!(frame(&oversized, Version::Tls12), Ok(None));
        assert_eq!(
            frame(&[23, 3, 3, 0x48, 0x01], Version::Tls12),
            Err(RecordError::RecordOverflow)
        );
        assert!(matches!(
            frame(&[22, 3, 3, 0, 40], Version::Tls13),
            Err(RecordError::UnexpectedMessage(_))
        ));
        assert!(matches!(
            frame(&[20, 3, 3, 0, 40], Version::Tls12),
            Err(RecordError::UnexpectedMessage(_))
        ));
        assert!(matches!(
            frame(&[23, 3, 1, 0, 40], Version::Tls13),
            Err(RecordError::Decode(_))
        ));
        assert!(matches!(
            frame(&[23, 3, 3, 0, 16], Version::Tls13),
            Err(RecordError::Decode(_))
        ));
    }

    #[test]
    fn key_update_may_span_records_but_must_end_one() {
        let mut reader = HandshakeReader::default();
        assert_eq!(reader.push(Version::Tls13, &[24, 0]), Ok(None));
        assert!(reader.is_pending());
        assert_eq!(
            reader.push(Version::Tls13, &[0, 1, 1]),
            Ok(Some(Control::KeyUpdate {
                update_requested: true
            }))
        );
        assert!(!reader.is_pending());
        assert_eq!(
            reader.push(Version::Tls13, &key_update_message(false)),
            Ok(Some(Control::KeyUpdate {
                update_requested: false
            }))
        );
        let mut reader = HandshakeReader::default();
        assert!(matches!(
            reader.push(Version::Tls13, &[24, 0, 0, 1, 0, 23]),
            Err(RecordError::UnexpectedMessage(_))
        ));
        let mut reader = HandshakeReader::default();
        assert!(matches!(
            reader.push(Version::Tls13, &[24, 0, 0, 1, 2]),
            Err(RecordError::IllegalParameter(_))
        ));
        let mut reader = HandshakeReader::default();
        assert!(matches!(
            reader.push(Version::Tls13, &[4, 0, 0, 8]),
            Err(RecordError::UnexpectedMessage(_))
        ));
        let mut reader = HandshakeReader::default();
        assert!(matches!(
            reader.push(Version::Tls13, &[0u8; 100]),
            Err(RecordError::UnexpectedMessage(_))
        ));
        let mut reader = HandshakeReader::default();
        assert_eq!(
            reader.push(Version::Tls12, &[1u8; 300]),
            Ok(Some(Control::Renegotiation))
        );
    }

    #[test]
    fn alerts_are_read_by_level_and_version() {
        assert_eq!(
            read_alert(Version::Tls13, &[1, 0]),
            Ok(Control::CloseNotify)
        );
        assert_eq!(read_alert(Version::Tls13, &[1, 90]), Ok(Control::Ignored));
        assert_eq!(
            read_alert(Version::Tls13, &[1, 20]),
            Err(RecordError::PeerAlert(AlertDescription::BadRecordMac))
        );
        assert_eq!(read_alert(Version::Tls12, &[1, 100]), Ok(Control::Ignored));
        assert_eq!(
            read_alert(Version::Tls12, &[2, 40]),
            Err(RecordError::PeerAlert(AlertDescription::HandshakeFailure))
        );
        assert!(matches!(
            read_alert(Version::Tls13, &[1, 0, 0]),
            Err(RecordError::Decode(_))
        ));
        assert_eq!(alert_message(AlertDescription::BadRecordMac, true), [2, 20]);
    }

    /// Frames every record of `wire` and opens them all (the CPU stops after each control
    /// record, so this calls `open` until every record has a result or one failed).
    async fn open_all(
        to: &mut Direction,
        mut wire: Vec<u8>,
        device: Option<&RecordDevice>,
        stats: &RecordStats,
    ) -> Vec<Result<(u8, Vec<u8>), RecordError>> {
        let mut ranges = Vec::new();
        let mut at = 0;
        while let Some(len) = frame(&wire[at..], to.version).expect("well-formed") {
            ranges.push(at..at + len);
            at += len;
        }
        assert_eq!(at, wire.len());
        let mut results = Vec::new();
        while results.len() < ranges.len() {
            let batch = to
                .open(
                    &mut wire,
                    &ranges[results.len()..],
                    device,
                    Policy { cpu_below: 0 },
                    stats,
                )
                .await;
            assert!(!batch.is_empty());
            let failed = batch.iter().any(Result::is_err);
            for result in batch {
                results.push(result.map(|o| (o.content_type, wire[o.plain].to_vec())));
                if matches!(results.last(), Some(Err(_))) {
                    break;
                }
            }
            if failed {
                break;
            }
        }
        results
    }

    /// Seals with `from`, opens with `to`, for several sizes and content types.
    async fn round_trip(
        from: &mut Direction,
        from_device: Option<&RecordDevice>,
        to: &mut Direction,
        to_device: Option<&RecordDevice>,
    ) {
        let stats = RecordStats::default();
        let policy = Policy { cpu_below: 0 };
        let payloads: Vec<Vec<u8>> = [0usize, 1, 100, 5000, 16384]
            .iter()
            .map(|&n| (0..n).map(|i| (i * 7) as u8).collect())
            .collect();
        let items: Vec<(u8, &[u8])> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| (if i == 2 { 22 } else { 23 }, p.as_slice()))
            .collect();
        let mut wire = Vec::new();
        from.seal(&items, &mut wire, from_device, policy, &stats)
            .await;
        let opened = open_all(to, wire, to_device, &stats).await;
        assert_eq!(opened.len(), items.len());
        for ((content_type, payload), result) in items.iter().zip(opened) {
            let (got_type, got) = result.expect("opens");
            assert_eq!(got_type, *content_type);
            assert_eq!(&got, payload);
        }
        assert_eq!(from.sequence(), to.sequence());
    }

    /// Runs `test` on a two-worker runtime with a record queue on the in-process simulator.
    fn on_the_simulator<F, Fut>(test: F)
    where
        F: FnOnce(Arc<Device>, RecordDevice) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let device = Device::open("sim").expect("simulator");
            let pair = device
                .queue(tlsaccel_driver::QueueConfig {
                    interrupts: true,
                    ..tlsaccel_driver::QueueConfig::default()
                })
                .expect("queue");
            let queue = tlsaccel_driver::AsyncQueue::new(pair, std::time::Duration::from_secs(2))
                .expect("async queue");
            let rd = RecordDevice {
                device: Arc::clone(&device),
                queue: RecordQueue::start(queue, 32, std::time::Duration::ZERO),
            };
            test(device, rd).await
        });
    }

    #[test]
    fn records_sealed_on_the_device_open_on_the_cpu_and_back() {
        on_the_simulator(|_device, rd| async move {
            for version in [Version::Tls13, Version::Tls12] {
                for chacha in [false, true] {
                    let s = secrets(chacha);
                    let mut seal = Direction::new(version, true, &s, 5).expect("seal");
                    let mut open = Direction::new(version, false, &s, 5).expect("open");
                    round_trip(&mut seal, Some(&rd), &mut open, None).await;
                    assert!(seal.on_device() && !open.on_device());
                    round_trip(&mut seal, None, &mut open, Some(&rd)).await;
                    assert!(open.on_device());
                    // A tampered record is a bad_record_mac on either engine.
                    let stats = RecordStats::default();
                    let mut wire = Vec::new();
                    seal.seal(
                        &[(23, b"x")],
                        &mut wire,
                        None,
                        Policy { cpu_below: 0 },
                        &stats,
                    )
                    .await;
                    let last = wire.len() - 1;
                    wire[last] ^= 0x80;
                    let result = open_all(&mut open, wire, Some(&rd), &stats).await;
                    assert_eq!(result, vec![Err(RecordError::BadRecordMac)]);
                }
            }
        });
    }

    #[test]
    fn a_record_the_device_refuses_but_the_cpu_opens_keeps_the_connection() {
        on_the_simulator(|device, rd| async move {
            let s = secrets(false);
            let mut seal = Direction::new(Version::Tls13, true, &s, 0).expect("seal");
            let mut open = Direction::new(Version::Tls13, false, &s, 0).expect("open");
            // A faulty device: its slot counts records from a different number, so it
            // fails every tag check of records that are perfectly good.
            let mut wrong = Direction::new(Version::Tls13, false, &s, 1000).expect("wrong");
            wrong.material.sequence = 1000;
            open.slot = Some(Arc::new(device.load_key(&wrong.material).expect("slot")));
            let stats = RecordStats::default();
            let mut wire = Vec::new();
            let items: [(u8, &[u8]); 2] = [(23, b"first"), (23, b"second")];
            seal.seal(&items, &mut wire, None, Policy { cpu_below: 0 }, &stats)
                .await;
            let opened = open_all(&mut open, wire, Some(&rd), &stats).await;
            assert_eq!(
                opened,
                vec![Ok((23, b"first".to_vec())), Ok((23, b"second".to_vec()))]
            );
            assert_eq!(stats.device_refused_good_records.load(Ordering::Relaxed), 1);
            assert_eq!(stats.device_fallbacks.load(Ordering::Relaxed), 1);
            assert!(!open.on_device(), "the direction moved to the CPU");
            assert_eq!(open.sequence(), 2);
            // A record that really is bad is still refused, by the CPU's word.
            let mut bad = Vec::new();
            seal.seal(
                &[(23, b"x")],
                &mut bad,
                None,
                Policy { cpu_below: 0 },
                &stats,
            )
            .await;
            let last = bad.len() - 1;
            bad[last] ^= 1;
            let result = open_all(&mut open, bad, Some(&rd), &stats).await;
            assert_eq!(result, vec![Err(RecordError::BadRecordMac)]);
        });
    }

    /// `count` sources of DMA memory, each `len` bytes of a pattern that differs per source.
    fn dma_sources(
        rd: &RecordDevice,
        count: usize,
        len: usize,
        first: u8,
    ) -> Vec<(DmaBuffer, Range<usize>)> {
        (0..count)
            .map(|i| {
                let buffer = rd.device.pool().alloc(len).expect("dma");
                let bytes: Vec<u8> = (0..len)
                    .map(|j| first.wrapping_add((i * 31 + j) as u8))
                    .collect();
                buffer.write(0, &bytes).expect("write");
                (buffer, 0..len)
            })
            .collect()
    }

    fn plaintext_of(sources: &[(DmaBuffer, Range<usize>)]) -> Vec<u8> {
        sources
            .iter()
            .flat_map(|(b, r)| b.to_vec(r.start, r.len()).expect("read"))
            .collect()
    }

    fn wire_of(chunks: Vec<Chunk>) -> Vec<u8> {
        chunks.into_iter().flat_map(Chunk::into_heap).collect()
    }

    /// Seals three batches with all of them on the device at once (held by a stalled
    /// device), with `fault` injected before the device runs them; the wire must open on
    /// the CPU to exactly the plaintext, in order, whatever the device did.
    fn pipelined_batches_with(fault: Option<ModelFault>) -> RecordStats {
        let all = RecordStats::default();
        let stats = &all;
        on_the_simulator(|device, rd| async move {
            let s = secrets(false);
            let mut seal = Direction::new(Version::Tls13, true, &s, 9).expect("seal");
            let mut open = Direction::new(Version::Tls13, false, &s, 9).expect("open");
            let policy = Policy { cpu_below: 0 };
            // The first batch moves the direction onto the device.
            let first = dma_sources(&rd, 1, 20_000, 1);
            let mut expected = plaintext_of(&first);
            let (chunks, _) = seal.seal_dma(first, Some(&rd), policy, stats).await;
            assert!(seal.on_device());
            let mut wire = wire_of(chunks);

            let faults = tlsaccel_driver::ModelFaults::new(&device).expect("faults");
            faults.inject(ModelFault::Stall).expect("stall");
            let mut pending = Vec::new();
            for (i, (count, len)) in [(2, 30_000), (1, 16_384), (3, 5_000)]
                .into_iter()
                .enumerate()
            {
                let sources = dma_sources(&rd, count, len, 50 * i as u8);
                expected.extend(plaintext_of(&sources));
                pending.push(
                    seal.pipeline_dma_seal(sources, &rd, stats)
                        .expect("handed over"),
                );
            }
            assert_eq!(seal.in_flight(), 4 + 1 + 3);
            if let Some(fault) = fault {
                faults.inject(fault).expect("fault");
            }
            faults.inject(ModelFault::Resume).expect("resume");
            for p in pending {
                let (results, _) = p.answer.await;
                let was_on_device = seal.on_device();
                let device_before = stats.device_sealed_records.load(Ordering::Relaxed);
                let (chunks, spent) = seal.finish_dma_seal(p.work, results, stats);
                assert!(!spent.is_empty());
                if !was_on_device {
                    // Behind a failure, the device's answers count for nothing.
                    assert_eq!(
                        stats.device_sealed_records.load(Ordering::Relaxed),
                        device_before,
                        "a device record used after the direction fell back"
                    );
                }
                wire.extend(wire_of(chunks));
            }
            assert_eq!(seal.in_flight(), 0);
            let opened = open_all(&mut open, wire, None, stats).await;
            let plain: Vec<u8> = opened
                .into_iter()
                .flat_map(|r| {
                    let (content_type, bytes) = r.expect("every record opens on the CPU");
                    assert_eq!(content_type, content::APPLICATION_DATA);
                    bytes
                })
                .collect();
            assert_eq!(plain, expected);
            assert_eq!(seal.sequence(), open.sequence());
        });
        all
    }

    #[test]
    fn pipelined_seals_reach_the_wire_in_order_with_their_numbers() {
        let stats = pipelined_batches_with(None);
        assert_eq!(stats.cpu_sealed_records.load(Ordering::Relaxed), 0);
        assert_eq!(stats.device_fallbacks.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_failure_in_a_pipelined_batch_reseals_it_and_everything_behind_it_on_the_cpu() {
        for fault in [
            ModelFault::DmaFaultNextJob,
            ModelFault::OversizeNextResultLength,
        ] {
            let stats = pipelined_batches_with(Some(fault));
            assert_eq!(
                stats.device_fallbacks.load(Ordering::Relaxed),
                1,
                "{fault:?}"
            );
            // Some record of the pipelined batches failed (which one the model's fault hits
            // depends on which engine finishes first): from there on everything went out
            // sealed by the CPU, which `pipelined_batches_with` checks batch by batch.
            let cpu = stats.cpu_sealed_records.load(Ordering::Relaxed);
            let device = stats.device_sealed_records.load(Ordering::Relaxed);
            assert!(cpu >= 1, "{fault:?}: {cpu} records resealed");
            assert_eq!(cpu + device, 2 + 8, "{fault:?}");
        }
    }

    /// Opens three batches of records in DMA memory with all of them on the device at once
    /// (held by a stalled device), `fault` injected before the device runs them; every
    /// record must come out with its plaintext, in order, whatever the device did.
    fn pipelined_opens_with(fault: Option<ModelFault>) -> RecordStats {
        let all = RecordStats::default();
        let stats = &all;
        on_the_simulator(|device, rd| async move {
            let s = secrets(false);
            let mut seal = Direction::new(Version::Tls13, true, &s, 3).expect("seal");
            let mut open = Direction::new(Version::Tls13, false, &s, 3).expect("open");
            let policy = Policy { cpu_below: 0 };
            let payloads: Vec<Vec<u8>> = (0..10usize)
                .map(|i| (0..(1000 + i * 1500)).map(|j| (i * 7 + j) as u8).collect())
                .collect();
            let items: Vec<(u8, &[u8])> = payloads.iter().map(|p| (23, p.as_slice())).collect();
            let mut wire = Vec::new();
            seal.seal(&items, &mut wire, None, policy, stats).await;
            let src = rd.device.pool().alloc(wire.len()).expect("dma");
            src.write(0, &wire).expect("write");
            let mut ranges = Vec::new();
            let mut at = 0;
            while let Some(len) = frame(&wire[at..], Version::Tls13).expect("framed") {
                ranges.push(at..at + len);
                at += len;
            }
            // The first record moves the direction onto the device.
            let mut plain = Vec::new();
            for result in open
                .open_dma(&src, &ranges[..1], Some(&rd), policy, stats)
                .await
            {
                plain.extend(result.expect("opens").1.into_heap());
            }
            assert!(open.on_device());
            let faults = tlsaccel_driver::ModelFaults::new(&device).expect("faults");
            faults.inject(ModelFault::Stall).expect("stall");
            let pending: Vec<PendingOpen> = [1..4, 4..5, 5..10]
                .into_iter()
                .map(|batch| {
                    open.pipeline_dma_open(&src, &ranges[batch], &rd, stats)
                        .expect("handed over")
                })
                .collect();
            assert_eq!(open.in_flight(), 9);
            if let Some(fault) = fault {
                faults.inject(fault).expect("fault");
            }
            faults.inject(ModelFault::Resume).expect("resume");
            for p in pending {
                let (results, _) = p.answer.await;
                let was_on_device = open.on_device();
                let device_before = stats.device_opened_records.load(Ordering::Relaxed);
                let count = p.work.len();
                let opened = open.finish_dma_open(&src, p.work, results, stats);
                assert_eq!(opened.len(), count, "every record of the batch");
                if !was_on_device {
                    assert_eq!(
                        stats.device_opened_records.load(Ordering::Relaxed),
                        device_before,
                        "a device record used after the direction fell back"
                    );
                }
                for result in opened {
                    let (content_type, chunk) = result.expect("every record opens");
                    assert_eq!(content_type, content::APPLICATION_DATA);
                    plain.extend(chunk.into_heap());
                }
            }
            assert_eq!(open.in_flight(), 0);
            assert_eq!(plain, payloads.concat());
            assert_eq!(open.sequence(), seal.sequence());
        });
        all
    }

    #[test]
    fn pipelined_opens_come_out_in_order() {
        let stats = pipelined_opens_with(None);
        assert_eq!(stats.cpu_opened_records.load(Ordering::Relaxed), 0);
        assert_eq!(stats.device_opened_records.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn a_failure_in_a_pipelined_open_reopens_it_and_everything_behind_it_on_the_cpu() {
        for fault in [
            ModelFault::DmaFaultNextJob,
            ModelFault::OversizeNextResultLength,
            ModelFault::CorruptNextOpenTag,
        ] {
            let stats = pipelined_opens_with(Some(fault));
            assert_eq!(
                stats.device_fallbacks.load(Ordering::Relaxed),
                1,
                "{fault:?}"
            );
            // Which record the fault hits depends on which engine finishes first; from it
            // on everything was opened on the CPU (`pipelined_opens_with` checks that).
            let cpu = stats.cpu_opened_records.load(Ordering::Relaxed);
            let device = stats.device_opened_records.load(Ordering::Relaxed);
            assert!(cpu >= 1, "{fault:?}: {cpu} records opened again");
            assert_eq!(cpu + device, 10, "{fault:?}");
        }
    }
}
