//! The tlsaccel device contract.
//!
//! Everything the host driver, the device model and the RTL must agree on lives here and
//! nowhere else: the BAR0 register map, the layouts of submission descriptors, completion
//! entries and key blocks in DMA memory, opcodes, status codes and capability bits.
//! `docs/device-spec.md` is the prose version of this crate; the two change together.
//!
//! Wire enums are *open* newtypes (`Opcode(u8)`, `Status(u16)`): a value this build does not
//! know is still representable, so a parser never has to invent one, and `name()` tells known
//! values apart. Bit sets are `bitflags` types that keep unknown bits.
//!
//! All multi-byte fields are little-endian, whatever the host's byte order.

#![no_std]
#![forbid(unsafe_code)]

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

pub mod ivshmem;
pub mod regs;

/// Value of the `MAGIC` register: the bytes `"TLSA"` read as a little-endian `u32`.
pub const DEVICE_MAGIC: u32 = u32::from_le_bytes(*b"TLSA");
/// Major version of this contract. A driver refuses a device with another major version.
pub const VERSION_MAJOR: u16 = 1;
/// Minor version of this contract: additions that an older driver may ignore.
pub const VERSION_MINOR: u16 = 0;
/// Value of the `VERSION` register for this contract.
pub const DEVICE_VERSION: u32 = ((VERSION_MAJOR as u32) << 16) | VERSION_MINOR as u32;

/// PCI vendor id the device presents (a placeholder from the experimental range).
pub const PCI_VENDOR_ID: u16 = 0x1de5;
/// PCI device id of the tlsaccel function.
pub const PCI_DEVICE_ID: u16 = 0x7a51;

/// Size of one submission descriptor in bytes.
pub const DESCRIPTOR_SIZE: usize = 64;
/// Size of one completion entry in bytes.
pub const COMPLETION_SIZE: usize = 16;
/// Size of a key block (the input of `KEY_LOAD`) in bytes.
pub const KEY_BLOCK_SIZE: usize = 64;
/// Required alignment of ring base addresses (both rings of a queue pair).
pub const RING_ALIGN: u64 = 4096;
/// Smallest number of entries a ring may have.
pub const MIN_QUEUE_ENTRIES: u32 = 2;
/// Largest number of entries a ring may have. Ring sizes are powers of two.
pub const MAX_QUEUE_ENTRIES: u32 = 4096;
/// Most entries a device's key table may have (`NUM_KEY_SLOTS`). The reference model has this
/// many by default, the RTL 1024.
pub const MAX_KEY_SLOTS: u32 = 65_536;
/// Largest `MAX_DATA_LEN` a device may report, and the value the reference model and the RTL
/// report: 64 KiB of payload plus room for a record's header, nonce and tag.
pub const MAX_DATA_LEN: u32 = 64 * 1024 + 512;
/// Smallest `MAX_DATA_LEN` a device may report: one whole TLS record of the largest size an
/// AEAD suite produces (a TLS 1.3 header and `TLSCiphertext`), so that every record fits one
/// job.
pub const MIN_MAX_DATA_LEN: u32 = (TLS_HEADER_LEN + TLS13_MAX_CIPHERTEXT) as u32;
/// Largest additional-authenticated-data length of a raw AEAD job.
pub const MAX_AAD_LEN: u32 = 4096;

/// AEAD nonce length: every supported algorithm takes a 96-bit nonce.
pub const NONCE_LEN: usize = 12;
/// AEAD tag length: every supported algorithm produces a 128-bit tag.
pub const TAG_LEN: usize = 16;
/// Length of a TLS record header.
pub const TLS_HEADER_LEN: usize = 5;
/// Largest TLS plaintext fragment (RFC 8446 section 5.1, RFC 5246 section 6.2.1).
pub const TLS_MAX_PLAINTEXT: usize = 16384;
/// Largest TLS 1.3 `TLSCiphertext.length` (RFC 8446 section 5.2).
pub const TLS13_MAX_CIPHERTEXT: usize = TLS_MAX_PLAINTEXT + 256;
/// Length of the explicit nonce of a TLS 1.2 AES-GCM record (RFC 5288).
pub const TLS12_EXPLICIT_NONCE_LEN: usize = 8;
/// The record-layer version every TLS 1.2 and 1.3 record carries.
pub const TLS_LEGACY_VERSION: u16 = 0x0303;

macro_rules! open_enum {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident($repr:ty) {
            $( $(#[$vmeta:meta])* $variant:ident = $value:expr, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        $vis struct $name(pub $repr);

        impl $name {
            $( $(#[$vmeta])* pub const $variant: Self = Self($value); )*

            /// Every value this build knows, in declaration order.
            pub const KNOWN: &'static [Self] = &[$(Self::$variant),*];

            /// The value's name, or `None` for a value this build does not know.
            pub const fn name(self) -> Option<&'static str> {
                match self.0 {
                    $( v if v == $value => Some(stringify!($variant)), )*
                    _ => None,
                }
            }

            /// True for a value this build knows.
            pub const fn is_known(self) -> bool {
                self.name().is_some()
            }
        }

        impl core::fmt::Debug for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                match self.name() {
                    Some(name) => f.write_str(name),
                    None => write!(f, "{}({:#x})", stringify!($name), self.0),
                }
            }
        }

        impl core::fmt::Display for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                core::fmt::Debug::fmt(self, f)
            }
        }
    };
}

open_enum! {
    /// The operation a descriptor asks for.
    pub struct Opcode(u8) {
        /// Do nothing; complete with `OK`. Measures the rings themselves.
        NOP = 0x00,
        /// Load the key block at `src_iova` into `key_slot`, replacing what it held.
        KEY_LOAD = 0x01,
        /// Zeroize `key_slot` and mark it empty.
        KEY_DESTROY = 0x02,
        /// AEAD-encrypt `src`, authenticating `aad`; write ciphertext then tag to `dst`.
        AEAD_SEAL = 0x10,
        /// AEAD-decrypt `src` (ciphertext then tag); write plaintext to `dst`.
        AEAD_OPEN = 0x11,
        /// Build one TLS 1.3 record from the plaintext at `src`.
        TLS13_SEAL = 0x20,
        /// Open one TLS 1.3 record (header included) at `src`.
        TLS13_OPEN = 0x21,
        /// Build one TLS 1.2 record from the plaintext at `src`.
        TLS12_SEAL = 0x22,
        /// Open one TLS 1.2 record (header included) at `src`.
        TLS12_OPEN = 0x23,
        /// Load the private key at `src` (type in `param[0]`, [`PrivateKeyType`]) into
        /// `key_slot`.
        PKE_KEY_LOAD = 0x30,
        /// ECDSA-sign the digest at `src` with the slot's key; write the DER signature.
        ECDSA_SIGN = 0x31,
        /// RSA-sign the digest at `src` (padding in `param[0]`, [`RsaPadding`]; hash in
        /// `param[1]`, [`HashAlgorithm`]); write the signature.
        RSA_SIGN = 0x32,
        /// Generate a key-exchange key pair (group in `param[0]`, [`PrivateKeyType`]) into
        /// `key_slot`; write its public key.
        KX_GENERATE = 0x33,
        /// Derive the shared secret of the slot's key-exchange key and the peer public key at
        /// `src`; write it. The slot is emptied whatever the outcome.
        KX_DERIVE = 0x34,
    }
}

impl Opcode {
    /// True for the public-key operations, which run on the public-key engines.
    pub const fn is_public_key(self) -> bool {
        matches!(
            self,
            Self::PKE_KEY_LOAD
                | Self::ECDSA_SIGN
                | Self::RSA_SIGN
                | Self::KX_GENERATE
                | Self::KX_DERIVE
        )
    }
}

open_enum! {
    /// What a public-key slot holds, and the format of its key material.
    pub struct PrivateKeyType(u8) {
        /// ECDSA P-256 (signing with SHA-256 digests); PKCS#8 DER.
        ECDSA_P256 = 0x01,
        /// ECDSA P-384 (signing with SHA-384 digests); PKCS#8 DER.
        ECDSA_P384 = 0x02,
        /// RSA, 2048 to 4096 bits, with CRT parameters; PKCS#8 DER.
        RSA = 0x03,
        /// X25519 key exchange; the 32-byte private key.
        X25519 = 0x04,
        /// P-256 ECDH; the 32-byte big-endian private scalar.
        ECDH_P256 = 0x05,
    }
}

impl PrivateKeyType {
    /// Length of the public key `KX_GENERATE` writes: X25519 32 bytes, P-256 65 bytes
    /// (uncompressed point); `None` for signing keys.
    pub const fn key_share_len(self) -> Option<usize> {
        match self {
            Self::X25519 => Some(32),
            Self::ECDH_P256 => Some(65),
            _ => None,
        }
    }
}

open_enum! {
    /// RSA signature padding.
    pub struct RsaPadding(u8) {
        /// RSASSA-PKCS1-v1_5.
        PKCS1_V15 = 0x01,
        /// RSASSA-PSS with MGF1 over the same hash and a salt as long as the digest (TLS 1.3).
        PSS = 0x02,
    }
}

open_enum! {
    /// The hash a digest was made with.
    pub struct HashAlgorithm(u8) {
        SHA256 = 0x01,
        SHA384 = 0x02,
        SHA512 = 0x03,
    }
}

impl HashAlgorithm {
    /// Digest length in bytes.
    pub const fn digest_len(self) -> Option<usize> {
        match self {
            Self::SHA256 => Some(32),
            Self::SHA384 => Some(48),
            Self::SHA512 => Some(64),
            _ => None,
        }
    }
}

impl Opcode {
    /// True for the four TLS record operations, which use and advance a slot's sequence number.
    pub const fn is_tls_record(self) -> bool {
        matches!(
            self,
            Self::TLS13_SEAL | Self::TLS13_OPEN | Self::TLS12_SEAL | Self::TLS12_OPEN
        )
    }

    /// True for operations that read a key slot.
    pub const fn uses_key_slot(self) -> bool {
        self.is_tls_record() || matches!(self, Self::AEAD_SEAL | Self::AEAD_OPEN)
    }

    /// True for operations that encrypt (their output is longer than their input).
    pub const fn is_seal(self) -> bool {
        matches!(self, Self::AEAD_SEAL | Self::TLS13_SEAL | Self::TLS12_SEAL)
    }
}

open_enum! {
    /// The outcome of a job, in its completion entry.
    pub struct Status(u16) {
        /// The job succeeded; `result_len` bytes were written to `dst`.
        OK = 0x00,
        /// Authentication failed on open; nothing meaningful was written.
        AUTH_FAILED = 0x01,
        /// The opcode is not one the device knows.
        BAD_OPCODE = 0x02,
        /// A reserved field or flag is non-zero, or fields contradict each other.
        BAD_DESCRIPTOR = 0x03,
        /// `key_slot` is outside the device's key table.
        BAD_SLOT = 0x04,
        /// `key_slot` holds no key (never loaded, or destroyed).
        SLOT_EMPTY = 0x05,
        /// The slot's algorithm, protocol or direction does not fit the opcode.
        SLOT_MISMATCH = 0x06,
        /// A length is out of range: too long, too short, or `dst` too small for the result.
        LENGTH_ERROR = 0x07,
        /// An address is outside the memory the host mapped for the device.
        DMA_FAULT = 0x08,
        /// The algorithm or protocol in a key block is one the device does not implement.
        UNSUPPORTED = 0x09,
        /// The slot's record sequence number is exhausted; the connection must re-key.
        SEQUENCE_EXHAUSTED = 0x0a,
        /// A TLS record is malformed: header type or version, or no content type after padding.
        RECORD_MALFORMED = 0x0b,
        /// A TLS record's plaintext is longer than 2^14 bytes.
        RECORD_OVERFLOW = 0x0c,
        /// A peer's key-exchange public key is malformed, not on the curve, or yields a
        /// degenerate shared secret.
        INVALID_PUBLIC_KEY = 0x0d,
        /// Private key material that does not parse or is not of the stated type.
        INVALID_KEY = 0x0e,
    }
}

impl Status {
    /// True when the status reports success.
    pub const fn is_ok(self) -> bool {
        self.0 == Self::OK.0
    }
}

open_enum! {
    /// The AEAD algorithm a key slot holds.
    pub struct AeadAlgorithm(u8) {
        AES_128_GCM = 0x01,
        AES_256_GCM = 0x02,
        CHACHA20_POLY1305 = 0x03,
    }
}

impl AeadAlgorithm {
    /// Key length in bytes, or `None` for an unknown algorithm.
    pub const fn key_len(self) -> Option<usize> {
        match self {
            Self::AES_128_GCM => Some(16),
            Self::AES_256_GCM | Self::CHACHA20_POLY1305 => Some(32),
            _ => None,
        }
    }

    /// The CAPABILITIES bit a device sets when it has this algorithm, or `None` for an
    /// unknown one.
    pub const fn capability(self) -> Option<Capabilities> {
        match self {
            Self::AES_128_GCM => Some(Capabilities::AES_128_GCM),
            Self::AES_256_GCM => Some(Capabilities::AES_256_GCM),
            Self::CHACHA20_POLY1305 => Some(Capabilities::CHACHA20_POLY1305),
            _ => None,
        }
    }

    /// Bytes a TLS 1.2 record of this algorithm carries before the ciphertext besides the
    /// header: the explicit nonce for AES-GCM (RFC 5288), nothing for ChaCha20-Poly1305
    /// (RFC 7905).
    pub const fn tls12_explicit_nonce_len(self) -> usize {
        match self {
            Self::AES_128_GCM | Self::AES_256_GCM => TLS12_EXPLICIT_NONCE_LEN,
            _ => 0,
        }
    }
}

open_enum! {
    /// Which record protocol a key slot serves; raw slots serve `AEAD_SEAL`/`AEAD_OPEN`.
    pub struct RecordProtocol(u8) {
        RAW = 0x00,
        TLS12 = 0x01,
        TLS13 = 0x02,
    }
}

open_enum! {
    /// Which way a TLS key slot works. Raw slots must say `ANY`.
    pub struct KeyDirection(u8) {
        ANY = 0x00,
        SEAL = 0x01,
        OPEN = 0x02,
    }
}

open_enum! {
    /// Why a queue stopped (the `Q_ERROR` register).
    pub struct QueueErrorCode(u32) {
        NONE = 0x00,
        /// Ring size is not a power of two in range, or a base address is misaligned.
        BAD_CONFIG = 0x01,
        /// A ring is not wholly inside memory the host mapped for the device.
        RING_NOT_MAPPED = 0x02,
        /// The host wrote a doorbell value outside the ring.
        BAD_DOORBELL = 0x03,
    }
}

open_enum! {
    /// Why the device entered the fatal state (the `FATAL_CODE` register).
    pub struct FatalCode(u32) {
        NONE = 0x00,
        /// An internal consistency check failed.
        INTERNAL = 0x01,
        /// A fault was injected by a test harness (device model only).
        INJECTED = 0xf0,
    }
}

bitflags::bitflags! {
    /// What a device implements (the `CAPABILITIES` register).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Capabilities: u32 {
        const NOP = 1 << 0;
        const AES_128_GCM = 1 << 1;
        const AES_256_GCM = 1 << 2;
        const CHACHA20_POLY1305 = 1 << 3;
        const RAW_AEAD = 1 << 4;
        const TLS13_RECORD = 1 << 5;
        const TLS12_RECORD = 1 << 6;
        const INTERRUPT_COALESCING = 1 << 7;
        const ECDSA_P256 = 1 << 8;
        const ECDSA_P384 = 1 << 9;
        /// RSA 2048 to 4096 bits, PKCS#1 v1.5 and PSS signatures.
        const RSA = 1 << 10;
        const X25519 = 1 << 11;
        const ECDH_P256 = 1 << 12;
        /// The reference model's fault-injection window ([`regs::model_faults`], device-spec
        /// §9). A model feature for tests of the host side: hardware and the RTL never set it.
        const MODEL_FAULTS = 1 << 31;
        const _ = !0;
    }
}

open_enum! {
    /// A fault the reference model can be told to show: the value written to
    /// [`regs::model_faults::INJECT`] (device-spec §9).
    pub struct FaultCode(u32) {
        /// Engines hold the jobs they fetch: accepted, but not run and not completed.
        STALL = 0x01,
        /// Undo `STALL`: held jobs run.
        RESUME = 0x02,
        /// The next completion is never written.
        DROP_NEXT_COMPLETION = 0x03,
        /// The next seal writes a tag with one bit flipped.
        CORRUPT_NEXT_TAG = 0x04,
        /// The next job to run fails with `DMA_FAULT`.
        DMA_FAULT_NEXT_JOB = 0x05,
        /// The next completion reports a `result_len` larger than any job can produce.
        OVERSIZE_NEXT_RESULT_LENGTH = 0x06,
        /// Enter the fatal state (`FATAL_CODE` `INJECTED`).
        FATAL = 0x07,
        /// Write a completion nobody asked for: queue, cookie and result length from the
        /// argument registers.
        BOGUS_COMPLETION = 0x08,
        /// The next open checks the record against a tag with one bit flipped: a good record
        /// fails with `AUTH_FAILED` (a device fault the host must not blame on its peer).
        CORRUPT_NEXT_OPEN_TAG = 0x09,
    }
}

/// A fault with its arguments, as a test asks the reference model for it (device-spec §9).
/// [`ModelFault::code`] is what goes into the `INJECT` register; a bogus completion's fields
/// go into the argument registers first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFault {
    /// Engines hold every job they fetch before running it — no DMA to its buffers, no
    /// completion — until [`ModelFault::Resume`] (or a reset).
    Stall,
    /// Undo [`ModelFault::Stall`].
    Resume,
    /// The next completion is never written.
    DropNextCompletion,
    /// The next seal writes a tag with one bit flipped.
    CorruptNextTag,
    /// The next job to run fails with `DMA_FAULT`.
    DmaFaultNextJob,
    /// The next completion reports a `result_len` larger than any job can produce.
    OversizeNextResultLength,
    /// Enter the fatal state.
    Fatal,
    /// Write a completion nobody asked for into a queue's completion ring.
    BogusCompletion {
        queue: u32,
        cookie: u64,
        result_len: u32,
    },
    /// The next open checks against a tag with one bit flipped: a good record fails.
    CorruptNextOpenTag,
}

impl ModelFault {
    /// The fault's `INJECT` register value.
    pub const fn code(&self) -> FaultCode {
        match self {
            Self::Stall => FaultCode::STALL,
            Self::Resume => FaultCode::RESUME,
            Self::DropNextCompletion => FaultCode::DROP_NEXT_COMPLETION,
            Self::CorruptNextTag => FaultCode::CORRUPT_NEXT_TAG,
            Self::DmaFaultNextJob => FaultCode::DMA_FAULT_NEXT_JOB,
            Self::OversizeNextResultLength => FaultCode::OVERSIZE_NEXT_RESULT_LENGTH,
            Self::Fatal => FaultCode::FATAL,
            Self::BogusCompletion { .. } => FaultCode::BOGUS_COMPLETION,
            Self::CorruptNextOpenTag => FaultCode::CORRUPT_NEXT_OPEN_TAG,
        }
    }

    /// The fault a code and the argument registers describe; `None` for an unknown code.
    pub const fn from_registers(
        code: FaultCode,
        queue: u32,
        cookie: u64,
        result_len: u32,
    ) -> Option<Self> {
        Some(match code {
            FaultCode::STALL => Self::Stall,
            FaultCode::RESUME => Self::Resume,
            FaultCode::DROP_NEXT_COMPLETION => Self::DropNextCompletion,
            FaultCode::CORRUPT_NEXT_TAG => Self::CorruptNextTag,
            FaultCode::DMA_FAULT_NEXT_JOB => Self::DmaFaultNextJob,
            FaultCode::OVERSIZE_NEXT_RESULT_LENGTH => Self::OversizeNextResultLength,
            FaultCode::FATAL => Self::Fatal,
            FaultCode::BOGUS_COMPLETION => Self::BogusCompletion {
                queue,
                cookie,
                result_len,
            },
            FaultCode::CORRUPT_NEXT_OPEN_TAG => Self::CorruptNextOpenTag,
            _ => return None,
        })
    }
}

bitflags::bitflags! {
    /// The `DEVICE_CONTROL` register.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct DeviceControl: u32 {
        /// Process queues. Cleared by reset.
        const ENABLE = 1 << 0;
        /// Write 1 to reset the device; reads back 0 once the reset is done.
        const RESET = 1 << 1;
        const _ = !0;
    }
}

bitflags::bitflags! {
    /// The `DEVICE_STATUS` register.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct DeviceStatus: u32 {
        /// Registers may be programmed; set when no reset is in progress.
        const READY = 1 << 0;
        /// `ENABLE` is set and the device is processing queues.
        const RUNNING = 1 << 1;
        /// An unrecoverable error happened; see `FATAL_CODE`. Only a reset clears it.
        const FATAL = 1 << 2;
        const _ = !0;
    }
}

bitflags::bitflags! {
    /// A queue's `Q_CONTROL` register.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct QueueControl: u32 {
        /// Enable the queue pair (its base and size registers are latched at this write).
        const ENABLE = 1 << 0;
        /// Signal the queue's interrupt vector when completions are posted.
        const IRQ_ENABLE = 1 << 1;
        /// A public-key queue: served by the public-key engines, apart from record crypto
        /// (latched at enable).
        const PUBLIC_KEY = 1 << 2;
        const _ = !0;
    }
}

bitflags::bitflags! {
    /// A queue's `Q_STATUS` register.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct QueueStatus: u32 {
        /// The queue is enabled and being served.
        const ENABLED = 1 << 0;
        /// The queue stopped on an error; see `Q_ERROR`. Disable and re-enable to recover.
        const ERROR = 1 << 1;
        const _ = !0;
    }
}

bitflags::bitflags! {
    /// The `flags` byte of a completion entry.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct CompletionFlags: u8 {
        /// The phase tag: the device writes the ring's current phase here, last.
        const PHASE = 1 << 0;
        /// The job consumed a record sequence number of its slot.
        const SEQUENCE_ADVANCED = 1 << 1;
        const _ = !0;
    }
}

/// A submission descriptor: one job, 64 bytes, in the submission ring.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 1 | opcode |
/// | 1 | 1 | flags (must be 0) |
/// | 2 | 2 | reserved (must be 0) |
/// | 4 | 4 | key_slot |
/// | 8 | 8 | cookie (returned unchanged in the completion) |
/// | 16 | 8 | src_iova |
/// | 24 | 8 | dst_iova |
/// | 32 | 4 | src_len |
/// | 36 | 4 | dst_len (capacity of `dst`) |
/// | 40 | 8 | aad_iova |
/// | 48 | 4 | aad_len |
/// | 52 | 12 | param (opcode specific) |
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct Descriptor {
    pub opcode: u8,
    pub flags: u8,
    pub reserved: U16,
    pub key_slot: U32,
    pub cookie: U64,
    pub src_iova: U64,
    pub dst_iova: U64,
    pub src_len: U32,
    pub dst_len: U32,
    pub aad_iova: U64,
    pub aad_len: U32,
    pub param: [u8; 12],
}

/// A completion entry: 16 bytes in the completion ring.
///
/// The device writes bytes 0..12 first and the 32-bit word at 12 (status, info, flags) last,
/// so a host that sees the new phase in `flags` sees the whole entry.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct Completion {
    pub cookie: U64,
    pub result_len: U32,
    pub status: U16,
    /// Opcode-specific: the record content type for `TLS13_OPEN` and `TLS12_OPEN`.
    pub info: u8,
    pub flags: u8,
}

/// Byte offset in a completion entry of the word holding status, info and flags.
pub const COMPLETION_STATUS_WORD: usize = 12;

impl Completion {
    /// Packs status, info and flags as the little-endian word at offset 12.
    pub const fn status_word(status: Status, info: u8, flags: CompletionFlags) -> u32 {
        status.0 as u32 | (info as u32) << 16 | (flags.bits() as u32) << 24
    }

    /// The flags byte of a status word.
    pub const fn flags_of_status_word(word: u32) -> CompletionFlags {
        CompletionFlags::from_bits_retain((word >> 24) as u8)
    }
}

/// The input of `KEY_LOAD`: 64 bytes in DMA memory.
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 1 | algorithm ([`AeadAlgorithm`]) |
/// | 1 | 1 | protocol ([`RecordProtocol`]) |
/// | 2 | 1 | direction ([`KeyDirection`]) |
/// | 3 | 5 | reserved (must be 0) |
/// | 8 | 8 | sequence: the next record sequence number |
/// | 16 | 32 | key (AES-128 uses the first 16 bytes; the rest must be 0) |
/// | 48 | 12 | iv: TLS static IV (TLS 1.2 AES-GCM: 4-byte salt, then the explicit-nonce seed) |
/// | 60 | 4 | reserved (must be 0) |
#[derive(Clone, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct KeyBlock {
    pub algorithm: u8,
    pub protocol: u8,
    pub direction: u8,
    pub reserved0: [u8; 5],
    pub sequence: U64,
    pub key: [u8; 32],
    pub iv: [u8; 12],
    pub reserved1: U32,
}

/// Parameters of `TLS13_SEAL` and `TLS12_SEAL`, carried in the descriptor's `param` bytes.
///
/// `param[0]` is the content type; `param[1..3]` the little-endian number of zero padding
/// bytes (TLS 1.3 only; must be 0 for TLS 1.2); the rest must be 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SealParams {
    pub content_type: u8,
    pub padding: u16,
}

impl SealParams {
    /// Encodes the parameters into descriptor `param` bytes.
    pub fn encode(self) -> [u8; 12] {
        let mut param = [0u8; 12];
        param[0] = self.content_type;
        param[1..3].copy_from_slice(&self.padding.to_le_bytes());
        param
    }

    /// Decodes descriptor `param` bytes; `None` when a reserved byte is set.
    pub fn decode(param: &[u8; 12]) -> Option<Self> {
        if param[3..].iter().any(|&b| b != 0) {
            return None;
        }
        Some(Self {
            content_type: param[0],
            padding: u16::from_le_bytes([param[1], param[2]]),
        })
    }
}

/// Length of the TLS 1.3 record `TLS13_SEAL` writes for `plaintext_len` bytes and `padding`
/// zero bytes: header, encrypted inner plaintext (content, type byte, padding), tag.
pub const fn tls13_record_len(plaintext_len: usize, padding: usize) -> usize {
    TLS_HEADER_LEN + plaintext_len + 1 + padding + TAG_LEN
}

/// Length of the TLS 1.2 record `TLS12_SEAL` writes for `plaintext_len` bytes.
pub const fn tls12_record_len(algorithm: AeadAlgorithm, plaintext_len: usize) -> usize {
    TLS_HEADER_LEN + algorithm.tls12_explicit_nonce_len() + plaintext_len + TAG_LEN
}

/// The nonce of record `sequence`: the static IV with the big-endian sequence number
/// XORed into its last eight bytes (RFC 8446 section 5.3; RFC 7905; for TLS 1.2 AES-GCM the
/// same construction yields salt followed by the explicit nonce).
pub fn record_nonce(iv: &[u8; NONCE_LEN], sequence: u64) -> [u8; NONCE_LEN] {
    let mut nonce = *iv;
    for (n, s) in nonce[4..].iter_mut().zip(sequence.to_be_bytes()) {
        *n ^= s;
    }
    nonce
}

const _: () = assert!(core::mem::size_of::<Descriptor>() == DESCRIPTOR_SIZE);
const _: () = assert!(core::mem::size_of::<Completion>() == COMPLETION_SIZE);
const _: () = assert!(core::mem::size_of::<KeyBlock>() == KEY_BLOCK_SIZE);

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn each_algorithm_names_its_capability_bit() {
        assert_eq!(
            AeadAlgorithm::AES_128_GCM.capability(),
            Some(Capabilities::AES_128_GCM)
        );
        assert_eq!(
            AeadAlgorithm::AES_256_GCM.capability(),
            Some(Capabilities::AES_256_GCM)
        );
        assert_eq!(
            AeadAlgorithm::CHACHA20_POLY1305.capability(),
            Some(Capabilities::CHACHA20_POLY1305)
        );
        assert_eq!(AeadAlgorithm(0x7f).capability(), None);
    }

    #[test]
    fn layouts_have_the_documented_sizes_and_offsets() {
        assert_eq!(size_of::<Descriptor>(), DESCRIPTOR_SIZE);
        assert_eq!(offset_of!(Descriptor, opcode), 0);
        assert_eq!(offset_of!(Descriptor, flags), 1);
        assert_eq!(offset_of!(Descriptor, reserved), 2);
        assert_eq!(offset_of!(Descriptor, key_slot), 4);
        assert_eq!(offset_of!(Descriptor, cookie), 8);
        assert_eq!(offset_of!(Descriptor, src_iova), 16);
        assert_eq!(offset_of!(Descriptor, dst_iova), 24);
        assert_eq!(offset_of!(Descriptor, src_len), 32);
        assert_eq!(offset_of!(Descriptor, dst_len), 36);
        assert_eq!(offset_of!(Descriptor, aad_iova), 40);
        assert_eq!(offset_of!(Descriptor, aad_len), 48);
        assert_eq!(offset_of!(Descriptor, param), 52);

        assert_eq!(size_of::<Completion>(), COMPLETION_SIZE);
        assert_eq!(offset_of!(Completion, cookie), 0);
        assert_eq!(offset_of!(Completion, result_len), 8);
        assert_eq!(offset_of!(Completion, status), COMPLETION_STATUS_WORD);
        assert_eq!(offset_of!(Completion, info), 14);
        assert_eq!(offset_of!(Completion, flags), 15);

        assert_eq!(size_of::<KeyBlock>(), KEY_BLOCK_SIZE);
        assert_eq!(offset_of!(KeyBlock, sequence), 8);
        assert_eq!(offset_of!(KeyBlock, key), 16);
        assert_eq!(offset_of!(KeyBlock, iv), 48);
        assert_eq!(offset_of!(KeyBlock, reserved1), 60);
    }

    #[test]
    fn status_word_matches_the_little_endian_entry_bytes() {
        let entry = Completion {
            cookie: 7.into(),
            result_len: 9.into(),
            status: Status::AUTH_FAILED.0.into(),
            info: 0x17,
            flags: (CompletionFlags::PHASE | CompletionFlags::SEQUENCE_ADVANCED).bits(),
        };
        let bytes = entry.as_bytes();
        let word = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
        assert_eq!(
            word,
            Completion::status_word(
                Status::AUTH_FAILED,
                0x17,
                CompletionFlags::PHASE | CompletionFlags::SEQUENCE_ADVANCED
            )
        );
        assert!(Completion::flags_of_status_word(word).contains(CompletionFlags::PHASE));
    }

    #[test]
    fn open_enums_name_known_values_and_keep_unknown_ones() {
        assert_eq!(Opcode::TLS13_SEAL.name(), Some("TLS13_SEAL"));
        assert_eq!(Opcode(0x7f).name(), None);
        let mut text = [0u8; 32];
        let mut cursor = Cursor(&mut text, 0);
        core::fmt::write(&mut cursor, format_args!("{:?}", Status(0x1234))).unwrap();
        let len = cursor.1;
        assert_eq!(&text[..len], b"Status(0x1234)");
        assert!(Opcode::KNOWN.iter().all(|op| op.is_known()));
    }

    struct Cursor<'a>(&'a mut [u8], usize);
    impl core::fmt::Write for Cursor<'_> {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            let end = self.1 + s.len();
            self.0
                .get_mut(self.1..end)
                .ok_or(core::fmt::Error)?
                .copy_from_slice(s.as_bytes());
            self.1 = end;
            Ok(())
        }
    }

    #[test]
    fn every_fault_code_decodes_to_the_fault_that_encodes_it() {
        let bogus = ModelFault::BogusCompletion {
            queue: 3,
            cookie: 0xdead_beef_0000_0001,
            result_len: 9,
        };
        for fault in [
            ModelFault::Stall,
            ModelFault::Resume,
            ModelFault::DropNextCompletion,
            ModelFault::CorruptNextTag,
            ModelFault::DmaFaultNextJob,
            ModelFault::OversizeNextResultLength,
            ModelFault::Fatal,
            bogus,
            ModelFault::CorruptNextOpenTag,
        ] {
            assert!(fault.code().is_known());
            assert_eq!(
                ModelFault::from_registers(fault.code(), 3, 0xdead_beef_0000_0001, 9),
                Some(fault)
            );
        }
        assert_eq!(FaultCode::KNOWN.len(), 9);
        assert_eq!(ModelFault::from_registers(FaultCode(0), 0, 0, 0), None);
        assert_eq!(ModelFault::from_registers(FaultCode(0x99), 0, 0, 0), None);
    }

    #[test]
    fn seal_params_round_trip_and_reject_reserved_bytes() {
        let params = SealParams {
            content_type: 23,
            padding: 300,
        };
        assert_eq!(SealParams::decode(&params.encode()), Some(params));
        let mut raw = params.encode();
        raw[11] = 1;
        assert_eq!(SealParams::decode(&raw), None);
    }

    #[test]
    fn record_nonce_xors_the_big_endian_sequence_into_the_tail() {
        let iv = [0u8; 12];
        let nonce = record_nonce(&iv, 0x0102);
        assert_eq!(nonce, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2]);
        let iv = [0xff; 12];
        assert_eq!(record_nonce(&iv, 1)[11], 0xfe);
        assert_eq!(record_nonce(&iv, 1)[..4], [0xff; 4]);
    }

    #[test]
    fn record_lengths_follow_the_rfcs() {
        assert_eq!(tls13_record_len(0, 0), 5 + 1 + 16);
        assert_eq!(
            tls12_record_len(AeadAlgorithm::AES_128_GCM, 10),
            5 + 8 + 10 + 16
        );
        assert_eq!(
            tls12_record_len(AeadAlgorithm::CHACHA20_POLY1305, 10),
            5 + 10 + 16
        );
    }
}
