//! The device's key table: one entry per key slot, each holding an expanded AEAD key, its
//! static IV and the next record sequence number.
//!
//! Destroying a slot drops the table's reference to its key; jobs accepted earlier keep theirs
//! until they finish. When the last reference goes, the IV is zeroized (`Zeroizing`) and the
//! expanded key is freed by aws-lc, whose `OPENSSL_free` cleanses every allocation it frees.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tlsaccel_abi::{KeyBlock, KeyDirection, Opcode, RecordProtocol, Status};

use crate::pke::PrivateKey;
use tlsaccel_record::RecordKey;

enum SlotKey {
    Aead(Arc<RecordKey>),
    Private(Arc<PrivateKey>),
}

struct SlotEntry {
    key: SlotKey,
    next_sequence: u64,
}

/// What a record or AEAD job takes from its slot when it is accepted.
#[derive(Debug, Clone)]
pub(crate) struct SlotGrant {
    pub(crate) key: Arc<RecordKey>,
    /// The record sequence number assigned to the job (TLS operations only).
    pub(crate) sequence: Option<u64>,
}

pub(crate) struct KeyTable {
    slots: Box<[Mutex<Option<SlotEntry>>]>,
    loaded: AtomicU64,
}

impl std::fmt::Debug for KeyTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyTable")
            .field("slots", &self.slots.len())
            .field("loaded", &self.loaded())
            .finish()
    }
}

impl KeyTable {
    pub(crate) fn new(slots: u32) -> Self {
        Self {
            slots: (0..slots).map(|_| Mutex::new(None)).collect(),
            loaded: AtomicU64::new(0),
        }
    }

    pub(crate) fn loaded(&self) -> u64 {
        self.loaded.load(Ordering::Relaxed)
    }

    fn slot(&self, index: u32) -> Result<std::sync::MutexGuard<'_, Option<SlotEntry>>, Status> {
        let slot = self
            .slots
            .get(usize::try_from(index).map_err(|_| Status::BAD_SLOT)?)
            .ok_or(Status::BAD_SLOT)?;
        Ok(slot.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Loads a key block into slot `index`, replacing (and dropping) what it held.
    pub(crate) fn load(&self, index: u32, block: &KeyBlock) -> Result<(), Status> {
        let mut slot = self.slot(index)?;
        let key = RecordKey::from_block(block)?;
        self.store(
            &mut slot,
            SlotEntry {
                key: SlotKey::Aead(Arc::new(key)),
                next_sequence: block.sequence.get(),
            },
        );
        Ok(())
    }

    fn store(&self, slot: &mut Option<SlotEntry>, entry: SlotEntry) {
        if slot.replace(entry).is_none() {
            self.loaded.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Puts a private key into slot `index`, replacing what it held.
    pub(crate) fn load_private(&self, index: u32, key: PrivateKey) -> Result<(), Status> {
        let mut slot = self.slot(index)?;
        self.store(
            &mut slot,
            SlotEntry {
                key: SlotKey::Private(Arc::new(key)),
                next_sequence: 0,
            },
        );
        Ok(())
    }

    /// The private key in slot `index`, for signing.
    pub(crate) fn private(&self, index: u32) -> Result<Arc<PrivateKey>, Status> {
        let slot = self.slot(index)?;
        match slot.as_ref().map(|entry| &entry.key) {
            Some(SlotKey::Private(key)) => Ok(Arc::clone(key)),
            Some(SlotKey::Aead(_)) => Err(Status::SLOT_MISMATCH),
            None => Err(Status::SLOT_EMPTY),
        }
    }

    /// Takes the private key out of slot `index`, leaving it empty (key-exchange keys are
    /// used once).
    pub(crate) fn take_private(&self, index: u32) -> Result<Arc<PrivateKey>, Status> {
        let mut slot = self.slot(index)?;
        match slot.as_ref().map(|entry| &entry.key) {
            Some(SlotKey::Private(_)) => {}
            Some(SlotKey::Aead(_)) => return Err(Status::SLOT_MISMATCH),
            None => return Err(Status::SLOT_EMPTY),
        }
        let entry = slot.take();
        self.loaded.fetch_sub(1, Ordering::Relaxed);
        match entry.map(|e| e.key) {
            Some(SlotKey::Private(key)) => Ok(key),
            _ => Err(Status::SLOT_EMPTY),
        }
    }

    /// Empties slot `index`. Jobs accepted earlier keep their reference until they finish.
    pub(crate) fn destroy(&self, index: u32) -> Result<(), Status> {
        let mut slot = self.slot(index)?;
        match slot.take() {
            Some(_) => {
                self.loaded.fetch_sub(1, Ordering::Relaxed);
                Ok(())
            }
            None => Err(Status::SLOT_EMPTY),
        }
    }

    /// Empties every slot (device reset).
    pub(crate) fn clear(&self) {
        for slot in self.slots.iter() {
            slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
        self.loaded.store(0, Ordering::Relaxed);
    }

    /// The algorithm of the key in slot `index`.
    pub(crate) fn algorithm_of(&self, index: u32) -> Result<tlsaccel_abi::AeadAlgorithm, Status> {
        let slot = self.slot(index)?;
        match slot.as_ref().map(|entry| &entry.key) {
            Some(SlotKey::Aead(key)) => Ok(key.algorithm),
            Some(SlotKey::Private(_)) => Err(Status::SLOT_MISMATCH),
            None => Err(Status::SLOT_EMPTY),
        }
    }

    /// Checks that slot `index` fits `opcode` and, for record operations, assigns the next
    /// sequence number. Called in submission order, at acceptance.
    pub(crate) fn grant(&self, index: u32, opcode: Opcode) -> Result<SlotGrant, Status> {
        let mut slot = self.slot(index)?;
        let entry = slot.as_mut().ok_or(Status::SLOT_EMPTY)?;
        let SlotKey::Aead(key) = &entry.key else {
            return Err(Status::SLOT_MISMATCH);
        };
        let key = Arc::clone(key);
        let (protocol, direction) = match opcode {
            Opcode::AEAD_SEAL | Opcode::AEAD_OPEN => (RecordProtocol::RAW, KeyDirection::ANY),
            Opcode::TLS13_SEAL => (RecordProtocol::TLS13, KeyDirection::SEAL),
            Opcode::TLS13_OPEN => (RecordProtocol::TLS13, KeyDirection::OPEN),
            Opcode::TLS12_SEAL => (RecordProtocol::TLS12, KeyDirection::SEAL),
            Opcode::TLS12_OPEN => (RecordProtocol::TLS12, KeyDirection::OPEN),
            _ => return Err(Status::BAD_OPCODE),
        };
        if key.protocol != protocol || key.direction != direction {
            return Err(Status::SLOT_MISMATCH);
        }
        let sequence = if opcode.is_tls_record() {
            let sequence = entry.next_sequence;
            entry.next_sequence = sequence.checked_add(1).ok_or(Status::SEQUENCE_EXHAUSTED)?;
            Some(sequence)
        } else {
            None
        };
        Ok(SlotGrant { key, sequence })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tlsaccel_abi::AeadAlgorithm;

    fn block(protocol: RecordProtocol, direction: KeyDirection, sequence: u64) -> KeyBlock {
        KeyBlock {
            algorithm: AeadAlgorithm::AES_256_GCM.0,
            protocol: protocol.0,
            direction: direction.0,
            sequence: sequence.into(),
            ..KeyBlock::default()
        }
    }

    #[test]
    fn grants_assign_consecutive_sequence_numbers() {
        let table = KeyTable::new(4);
        table
            .load(1, &block(RecordProtocol::TLS13, KeyDirection::SEAL, 10))
            .unwrap();
        assert_eq!(
            table.grant(1, Opcode::TLS13_SEAL).unwrap().sequence,
            Some(10)
        );
        assert_eq!(
            table.grant(1, Opcode::TLS13_SEAL).unwrap().sequence,
            Some(11)
        );
        assert_eq!(
            table.grant(1, Opcode::TLS13_OPEN).unwrap_err(),
            Status::SLOT_MISMATCH
        );
        assert_eq!(
            table.grant(1, Opcode::AEAD_SEAL).unwrap_err(),
            Status::SLOT_MISMATCH
        );
        assert_eq!(
            table.grant(4, Opcode::TLS13_SEAL).unwrap_err(),
            Status::BAD_SLOT
        );
        assert_eq!(
            table.grant(2, Opcode::TLS13_SEAL).unwrap_err(),
            Status::SLOT_EMPTY
        );
    }

    #[test]
    fn exhausted_sequence_is_reported_and_not_wrapped() {
        let table = KeyTable::new(1);
        table
            .load(
                0,
                &block(RecordProtocol::TLS12, KeyDirection::OPEN, u64::MAX),
            )
            .unwrap();
        assert_eq!(
            table.grant(0, Opcode::TLS12_OPEN).unwrap_err(),
            Status::SEQUENCE_EXHAUSTED
        );
    }

    #[test]
    fn destroy_empties_the_slot_and_counts() {
        let table = KeyTable::new(2);
        table
            .load(0, &block(RecordProtocol::RAW, KeyDirection::ANY, 0))
            .unwrap();
        table
            .load(0, &block(RecordProtocol::RAW, KeyDirection::ANY, 0))
            .unwrap();
        assert_eq!(table.loaded(), 1);
        table.destroy(0).unwrap();
        assert_eq!(table.loaded(), 0);
        assert_eq!(table.destroy(0).unwrap_err(), Status::SLOT_EMPTY);
        assert_eq!(
            table.grant(0, Opcode::AEAD_SEAL).unwrap_err(),
            Status::SLOT_EMPTY
        );
    }
}
