//! TLS record protection exactly as the tlsaccel device does it: AEAD through aws-lc-rs and
//! the record constructions of RFC 8446 (TLS 1.3), RFC 5288 (TLS 1.2 AES-GCM) and RFC 7905
//! (TLS 1.2 ChaCha20-Poly1305) around it. Nothing here implements a primitive.
//!
//! The simulated device's engines and the daemon's CPU record path both use this crate, so
//! a record sealed on either opens on the other, byte for byte. Every function works in place
//! on one buffer and reports errors as the device's [`Status`] codes.

#![forbid(unsafe_code)]

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use tlsaccel_abi::{
    record_nonce, AeadAlgorithm, KeyBlock, KeyDirection, RecordProtocol, Status, NONCE_LEN,
    TAG_LEN, TLS12_EXPLICIT_NONCE_LEN, TLS13_MAX_CIPHERTEXT, TLS_HEADER_LEN, TLS_LEGACY_VERSION,
    TLS_MAX_PLAINTEXT,
};
use zeroize::{Zeroize, Zeroizing};

/// TLS content type of application data, the outer type of every TLS 1.3 record.
const APPLICATION_DATA: u8 = 23;

/// The material of one loaded key slot.
pub struct RecordKey {
    pub algorithm: AeadAlgorithm,
    pub protocol: RecordProtocol,
    pub direction: KeyDirection,
    key: LessSafeKey,
    iv: Zeroizing<[u8; NONCE_LEN]>,
}

impl std::fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordKey")
            .field("algorithm", &self.algorithm)
            .field("protocol", &self.protocol)
            .field("direction", &self.direction)
            .finish_non_exhaustive()
    }
}

impl RecordKey {
    /// A key for records of `protocol` in `direction`, from a traffic key and static IV.
    pub fn new(
        algorithm: AeadAlgorithm,
        protocol: RecordProtocol,
        direction: KeyDirection,
        key: &[u8],
        iv: [u8; NONCE_LEN],
    ) -> Result<Self, Status> {
        let mut block = KeyBlock {
            algorithm: algorithm.0,
            protocol: protocol.0,
            direction: direction.0,
            iv,
            ..KeyBlock::default()
        };
        let result = match block.key.get_mut(..key.len()) {
            Some(room) => {
                room.copy_from_slice(key);
                Self::from_block(&block)
            }
            None => Err(Status::BAD_DESCRIPTOR),
        };
        block.key.zeroize();
        block.iv.zeroize();
        result
    }

    /// Validates a key block and expands its key. The caller zeroizes the block.
    pub fn from_block(block: &KeyBlock) -> Result<Self, Status> {
        let algorithm = AeadAlgorithm(block.algorithm);
        let protocol = RecordProtocol(block.protocol);
        let direction = KeyDirection(block.direction);
        if block.reserved0 != [0; 5] || block.reserved1.get() != 0 {
            return Err(Status::BAD_DESCRIPTOR);
        }
        let (aead_alg, key_len) = match algorithm {
            AeadAlgorithm::AES_128_GCM => (&aead::AES_128_GCM, 16),
            AeadAlgorithm::AES_256_GCM => (&aead::AES_256_GCM, 32),
            AeadAlgorithm::CHACHA20_POLY1305 => (&aead::CHACHA20_POLY1305, 32),
            _ => return Err(Status::UNSUPPORTED),
        };
        match (protocol, direction) {
            (RecordProtocol::RAW, KeyDirection::ANY) => {}
            (RecordProtocol::TLS12 | RecordProtocol::TLS13, KeyDirection::SEAL)
            | (RecordProtocol::TLS12 | RecordProtocol::TLS13, KeyDirection::OPEN) => {}
            (RecordProtocol::RAW | RecordProtocol::TLS12 | RecordProtocol::TLS13, _) => {
                return Err(Status::BAD_DESCRIPTOR)
            }
            _ => return Err(Status::UNSUPPORTED),
        }
        if block.key[key_len..].iter().any(|&b| b != 0) {
            return Err(Status::BAD_DESCRIPTOR);
        }
        let unbound =
            UnboundKey::new(aead_alg, &block.key[..key_len]).map_err(|_| Status::UNSUPPORTED)?;
        Ok(Self {
            algorithm,
            protocol,
            direction,
            key: LessSafeKey::new(unbound),
            iv: Zeroizing::new(block.iv),
        })
    }

    /// Seals `buf[start..end]` in place and writes the tag right after it; returns the end
    /// of the tag.
    fn seal_range(
        &self,
        nonce: [u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
        start: usize,
        end: usize,
    ) -> Result<usize, Status> {
        let tag_end = end + TAG_LEN;
        if tag_end > buf.len() || start > end {
            return Err(Status::LENGTH_ERROR);
        }
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut buf[start..end],
            )
            .map_err(|_| Status::LENGTH_ERROR)?;
        buf[end..tag_end].copy_from_slice(tag.as_ref());
        Ok(tag_end)
    }

    /// Opens `buf[start..end]` (ciphertext then tag) in place; returns the plaintext length.
    fn open_range(
        &self,
        nonce: [u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
        start: usize,
        end: usize,
    ) -> Result<usize, Status> {
        let range = buf.get_mut(start..end).ok_or(Status::LENGTH_ERROR)?;
        self.key
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), range)
            .map(|plain| plain.len())
            .map_err(|_| Status::AUTH_FAILED)
    }
}

/// What an engine job produced: bytes `buf[start..start + len]` go to `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Output {
    pub start: usize,
    pub len: usize,
    pub info: u8,
}

/// Room a seal needs in the engine buffer beyond its input: content type, padding and tag.
pub const fn seal_headroom(padding: usize) -> usize {
    1 + padding + TAG_LEN
}

/// `AEAD_SEAL`: `buf[..len]` holds the plaintext; ciphertext then tag replace it.
pub fn aead_seal(
    key: &RecordKey,
    nonce: [u8; NONCE_LEN],
    aad: &[u8],
    buf: &mut [u8],
    len: usize,
) -> Result<Output, Status> {
    let end = key.seal_range(nonce, aad, buf, 0, len)?;
    Ok(Output {
        start: 0,
        len: end,
        info: 0,
    })
}

/// `AEAD_OPEN`: `buf[..len]` holds ciphertext then tag; on success its head holds the
/// plaintext.
pub fn aead_open(
    key: &RecordKey,
    nonce: [u8; NONCE_LEN],
    aad: &[u8],
    buf: &mut [u8],
    len: usize,
) -> Result<Output, Status> {
    if len < TAG_LEN {
        return Err(Status::LENGTH_ERROR);
    }
    let plain = key.open_range(nonce, aad, buf, 0, len)?;
    Ok(Output {
        start: 0,
        len: plain,
        info: 0,
    })
}

/// `TLS13_SEAL`: the caller has placed `plain_len` plaintext bytes at `buf[TLS_HEADER_LEN..]`.
/// Writes header, inner content type and padding, seals, appends the tag.
pub fn tls13_seal(
    key: &RecordKey,
    sequence: u64,
    content_type: u8,
    padding: usize,
    buf: &mut [u8],
    plain_len: usize,
) -> Result<Output, Status> {
    let type_at = TLS_HEADER_LEN + plain_len;
    let inner_end = type_at + 1 + padding;
    if inner_end + TAG_LEN > buf.len() {
        return Err(Status::LENGTH_ERROR);
    }
    buf[type_at] = content_type;
    buf[type_at + 1..inner_end].fill(0);
    let length =
        u16::try_from(inner_end - TLS_HEADER_LEN + TAG_LEN).map_err(|_| Status::LENGTH_ERROR)?;
    let header = record_header(APPLICATION_DATA, length);
    buf[..TLS_HEADER_LEN].copy_from_slice(&header);
    let end = key.seal_range(
        record_nonce(&key.iv, sequence),
        &header,
        buf,
        TLS_HEADER_LEN,
        inner_end,
    )?;
    Ok(Output {
        start: 0,
        len: end,
        info: APPLICATION_DATA,
    })
}

/// `TLS13_OPEN`: `buf[..len]` holds one whole record. Reports the inner content type in
/// `info`.
pub fn tls13_open(
    key: &RecordKey,
    sequence: u64,
    buf: &mut [u8],
    len: usize,
) -> Result<Output, Status> {
    let record = buf.get(..len).ok_or(Status::LENGTH_ERROR)?;
    let header = parse_header(record)?;
    if header[0] != APPLICATION_DATA {
        return Err(Status::RECORD_MALFORMED);
    }
    let body = len - TLS_HEADER_LEN;
    if body > TLS13_MAX_CIPHERTEXT {
        return Err(Status::RECORD_OVERFLOW);
    }
    if body < TAG_LEN + 1 {
        return Err(Status::RECORD_MALFORMED);
    }
    let inner = key.open_range(
        record_nonce(&key.iv, sequence),
        &header,
        buf,
        TLS_HEADER_LEN,
        len,
    )?;
    let inner_bytes = &buf[TLS_HEADER_LEN..TLS_HEADER_LEN + inner];
    let type_at = inner_bytes
        .iter()
        .rposition(|&b| b != 0)
        .ok_or(Status::RECORD_MALFORMED)?;
    if type_at > TLS_MAX_PLAINTEXT {
        return Err(Status::RECORD_OVERFLOW);
    }
    Ok(Output {
        start: TLS_HEADER_LEN,
        len: type_at,
        info: inner_bytes[type_at],
    })
}

/// `TLS12_SEAL`: the caller has placed `plain_len` plaintext bytes at `buf[prefix..]`, where
/// `prefix` is the header plus the explicit nonce of the slot's algorithm.
pub fn tls12_seal(
    key: &RecordKey,
    sequence: u64,
    content_type: u8,
    buf: &mut [u8],
    plain_len: usize,
) -> Result<Output, Status> {
    let explicit = key.algorithm.tls12_explicit_nonce_len();
    let prefix = TLS_HEADER_LEN + explicit;
    let nonce = record_nonce(&key.iv, sequence);
    let aad = tls12_aad(sequence, content_type, plain_len)?;
    let length = u16::try_from(explicit + plain_len + TAG_LEN).map_err(|_| Status::LENGTH_ERROR)?;
    if prefix > buf.len() {
        return Err(Status::LENGTH_ERROR);
    }
    buf[..TLS_HEADER_LEN].copy_from_slice(&record_header(content_type, length));
    buf[TLS_HEADER_LEN..prefix].copy_from_slice(&nonce[NONCE_LEN - explicit..]);
    let end = key.seal_range(nonce, &aad, buf, prefix, prefix + plain_len)?;
    Ok(Output {
        start: 0,
        len: end,
        info: content_type,
    })
}

/// `TLS12_OPEN`: `buf[..len]` holds one whole record. Reports the header's content type in
/// `info`.
pub fn tls12_open(
    key: &RecordKey,
    sequence: u64,
    buf: &mut [u8],
    len: usize,
) -> Result<Output, Status> {
    let record = buf.get(..len).ok_or(Status::LENGTH_ERROR)?;
    let header = parse_header(record)?;
    let explicit = key.algorithm.tls12_explicit_nonce_len();
    let prefix = TLS_HEADER_LEN + explicit;
    let plain_len = len
        .checked_sub(prefix + TAG_LEN)
        .ok_or(Status::RECORD_MALFORMED)?;
    if plain_len > TLS_MAX_PLAINTEXT + 1024 {
        return Err(Status::RECORD_OVERFLOW);
    }
    let mut nonce = record_nonce(&key.iv, sequence);
    if explicit == TLS12_EXPLICIT_NONCE_LEN {
        nonce[NONCE_LEN - explicit..].copy_from_slice(&buf[TLS_HEADER_LEN..prefix]);
    }
    let aad = tls12_aad(sequence, header[0], plain_len)?;
    let plain = key.open_range(nonce, &aad, buf, prefix, len)?;
    if plain > TLS_MAX_PLAINTEXT {
        return Err(Status::RECORD_OVERFLOW);
    }
    Ok(Output {
        start: prefix,
        len: plain,
        info: header[0],
    })
}

fn record_header(content_type: u8, length: u16) -> [u8; TLS_HEADER_LEN] {
    let [v0, v1] = TLS_LEGACY_VERSION.to_be_bytes();
    let [l0, l1] = length.to_be_bytes();
    [content_type, v0, v1, l0, l1]
}

/// Checks a record header against the record's actual length and returns it.
fn parse_header(record: &[u8]) -> Result<[u8; TLS_HEADER_LEN], Status> {
    let header: [u8; TLS_HEADER_LEN] = record
        .get(..TLS_HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(Status::RECORD_MALFORMED)?;
    let version = u16::from_be_bytes([header[1], header[2]]);
    let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
    if version != TLS_LEGACY_VERSION || length != record.len() - TLS_HEADER_LEN {
        return Err(Status::RECORD_MALFORMED);
    }
    Ok(header)
}

/// The TLS 1.2 additional data: sequence, type, version, plaintext length (RFC 5246 6.2.3.3).
fn tls12_aad(sequence: u64, content_type: u8, plain_len: usize) -> Result<[u8; 13], Status> {
    let mut aad = [0u8; 13];
    aad[..8].copy_from_slice(&sequence.to_be_bytes());
    aad[8] = content_type;
    aad[9..11].copy_from_slice(&TLS_LEGACY_VERSION.to_be_bytes());
    let len = u16::try_from(plain_len).map_err(|_| Status::RECORD_OVERFLOW)?;
    aad[11..].copy_from_slice(&len.to_be_bytes());
    Ok(aad)
}

/// Zeroizes a scratch buffer that held key material or plaintext.
pub fn scrub(buf: &mut [u8]) {
    buf.zeroize();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(
        algorithm: AeadAlgorithm,
        protocol: RecordProtocol,
        direction: KeyDirection,
    ) -> RecordKey {
        let block = KeyBlock {
            algorithm: algorithm.0,
            protocol: protocol.0,
            direction: direction.0,
            key: [7; 32],
            iv: [9; 12],
            ..KeyBlock::default()
        };
        let mut block = block;
        if algorithm == AeadAlgorithm::AES_128_GCM {
            block.key[16..].fill(0);
        }
        RecordKey::from_block(&block).unwrap()
    }

    #[test]
    fn key_blocks_with_bad_fields_are_refused() {
        let good = KeyBlock {
            algorithm: AeadAlgorithm::AES_256_GCM.0,
            protocol: RecordProtocol::TLS13.0,
            direction: KeyDirection::SEAL.0,
            ..KeyBlock::default()
        };
        assert!(RecordKey::from_block(&good).is_ok());
        let mut bad = good.clone();
        bad.algorithm = 9;
        assert_eq!(
            RecordKey::from_block(&bad).unwrap_err(),
            Status::UNSUPPORTED
        );
        let mut bad = good.clone();
        bad.direction = KeyDirection::ANY.0;
        assert_eq!(
            RecordKey::from_block(&bad).unwrap_err(),
            Status::BAD_DESCRIPTOR
        );
        let mut bad = good.clone();
        bad.reserved0[2] = 1;
        assert_eq!(
            RecordKey::from_block(&bad).unwrap_err(),
            Status::BAD_DESCRIPTOR
        );
        let mut bad = good;
        bad.algorithm = AeadAlgorithm::AES_128_GCM.0;
        bad.key[20] = 1;
        assert_eq!(
            RecordKey::from_block(&bad).unwrap_err(),
            Status::BAD_DESCRIPTOR
        );
    }

    #[test]
    fn tls13_seal_then_open_recovers_type_and_payload() {
        for algorithm in [
            AeadAlgorithm::AES_128_GCM,
            AeadAlgorithm::AES_256_GCM,
            AeadAlgorithm::CHACHA20_POLY1305,
        ] {
            let seal = key(algorithm, RecordProtocol::TLS13, KeyDirection::SEAL);
            let open = key(algorithm, RecordProtocol::TLS13, KeyDirection::OPEN);
            let mut buf = vec![0u8; 64];
            buf[TLS_HEADER_LEN..TLS_HEADER_LEN + 5].copy_from_slice(b"hello");
            let out = tls13_seal(&seal, 5, 22, 3, &mut buf, 5).unwrap();
            assert_eq!(out.len, tlsaccel_abi::tls13_record_len(5, 3));
            let opened = tls13_open(&open, 5, &mut buf, out.len).unwrap();
            assert_eq!(opened.info, 22);
            assert_eq!(&buf[opened.start..opened.start + opened.len], b"hello");
        }
    }

    #[test]
    fn tls13_open_rejects_wrong_sequence_and_bad_headers() {
        let k = key(
            AeadAlgorithm::AES_128_GCM,
            RecordProtocol::TLS13,
            KeyDirection::SEAL,
        );
        let mut buf = vec![0u8; 64];
        buf[TLS_HEADER_LEN..TLS_HEADER_LEN + 4].copy_from_slice(b"data");
        let len = tls13_seal(&k, 1, 23, 0, &mut buf, 4).unwrap().len;
        assert_eq!(
            tls13_open(&k, 2, &mut buf.clone(), len).unwrap_err(),
            Status::AUTH_FAILED
        );
        let mut bad_version = buf.clone();
        bad_version[2] = 1;
        assert_eq!(
            tls13_open(&k, 1, &mut bad_version, len).unwrap_err(),
            Status::RECORD_MALFORMED
        );
        assert_eq!(
            tls13_open(&k, 1, &mut buf.clone(), len - 1).unwrap_err(),
            Status::RECORD_MALFORMED
        );
        assert_eq!(
            tls13_open(&k, 1, &mut buf, 200).unwrap_err(),
            Status::LENGTH_ERROR
        );
    }

    #[test]
    fn tls13_inner_plaintext_of_only_zeros_is_malformed() {
        let k = key(
            AeadAlgorithm::AES_128_GCM,
            RecordProtocol::TLS13,
            KeyDirection::SEAL,
        );
        let mut buf = vec![0u8; 64];
        // content type 0 followed by padding: no non-zero byte survives.
        let len = tls13_seal(&k, 0, 0, 4, &mut buf, 0).unwrap().len;
        assert_eq!(
            tls13_open(&k, 0, &mut buf, len).unwrap_err(),
            Status::RECORD_MALFORMED
        );
    }

    #[test]
    fn tls12_records_round_trip_with_and_without_explicit_nonce() {
        for algorithm in [AeadAlgorithm::AES_256_GCM, AeadAlgorithm::CHACHA20_POLY1305] {
            let k = key(algorithm, RecordProtocol::TLS12, KeyDirection::SEAL);
            let prefix = TLS_HEADER_LEN + algorithm.tls12_explicit_nonce_len();
            let mut buf = vec![0u8; 64];
            buf[prefix..prefix + 7].copy_from_slice(b"payload");
            let out = tls12_seal(&k, 77, 23, &mut buf, 7).unwrap();
            assert_eq!(out.len, tlsaccel_abi::tls12_record_len(algorithm, 7));
            let opened = tls12_open(&k, 77, &mut buf, out.len).unwrap();
            assert_eq!(&buf[opened.start..opened.start + opened.len], b"payload");
            assert_eq!(opened.info, 23);
        }
    }
}
