//! What a cluster shares through Redis: ticket keys per rotation epoch, and sessions for
//! session-ID (and TLS 1.3 stateful) resumption.
//!
//! **Ticket keys.** Time is cut into epochs of `rotate_every_s` (Unix time ÷ period), the
//! same on every node with synchronised clocks. The key of epoch `e` is a random key that
//! the first node to need it makes and offers with `SET NX` (so all nodes end up with the
//! winner's), sealed under a key derived from the cluster key; it expires from Redis
//! after two periods and the retired-key window. A node seals with the key of the current
//! epoch and already knows the next one, so a node whose clock runs ahead is understood.
//! A node that starts also fetches the keys of the past epochs still inside the retired-key
//! window (it must open the tickets other nodes sealed under them). Now and then (every
//! quarter period, at most 30 s) a node checks that Redis still holds the keys it uses: a
//! Redis that lost them (a restart without persistence) gets them back with `SET NX`, and a
//! key another node made meanwhile (it found none) replaces this node's, so the cluster
//! agrees again within one check.
//!
//! **Sessions.** `put` stores in the local cache at once and queues the write to Redis
//! (a bounded queue, written by a task; a full queue drops the write and counts it). `get`
//! and `take` look in the local cache, then in Redis: on a handshake fiber the fiber pauses
//! for at most the Redis timeout while the worker serves other connections; a miss, an
//! error or a timeout is a full handshake.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::redis::{RedisLink, Sealer, StoreError, Wait};
use super::ticket_keys::{TicketKey, KEY_ID_LEN};

/// Writes waiting for Redis at most.
const WRITE_QUEUE: usize = 4096;
/// Most writes in one pipeline.
const WRITE_BATCH: usize = 64;

/// Counters of the shared session store.
#[derive(Debug, Default)]
pub struct SessionStats {
    pub local_hits: AtomicU64,
    pub remote_hits: AtomicU64,
    pub misses: AtomicU64,
    /// Lookups that Redis did not answer in time or answered with an error.
    pub errors: AtomicU64,
    /// Lookups made off a fiber (they cannot wait, so they see the local cache only).
    pub local_only: AtomicU64,
    /// Lookups past a hello's allowance (more identities than the first): local cache only.
    pub over_allowance: AtomicU64,
    pub writes: AtomicU64,
    pub writes_dropped: AtomicU64,
}

/// The epoch that Unix time `unix` falls in.
pub fn epoch(unix: u64, period: u64) -> u64 {
    unix / period.max(1)
}

/// An epoch key this node holds: its id (not secret) and the value Redis holds for it
/// (sealed under the cluster key), to check that Redis still agrees.
#[derive(Debug, Clone)]
pub struct Held {
    pub id: [u8; KEY_ID_LEN],
    sealed: Vec<u8>,
}

/// What a check of a held epoch key found in Redis.
#[derive(Debug)]
pub enum Checked {
    /// Redis holds this node's key.
    Same,
    /// Redis had lost it; it holds this node's key again.
    Restored,
    /// Redis holds another key for the epoch (made by a node that found none): use it.
    Replaced(TicketKey, Held),
}

/// A Redis-shared cluster's parts.
#[derive(Debug)]
pub struct SharedState {
    pub link: Arc<RedisLink>,
    key_sealer: Sealer,
    session_sealer: Sealer,
    writes: mpsc::Sender<(String, Vec<u8>, Duration)>,
    /// Epochs whose keys this node has.
    pub known: Mutex<BTreeMap<u64, Held>>,
    pub sessions: SessionStats,
    /// Epoch keys this node made and offered first.
    pub keys_made: AtomicU64,
    pub keys_fetched: AtomicU64,
    /// Epoch keys Redis had lost and this node wrote back.
    pub keys_restored: AtomicU64,
    /// Epoch keys this node replaced with the one Redis held.
    pub keys_replaced: AtomicU64,
    /// The past epochs' keys have been asked for (once, when Redis first answers).
    pub past_loaded: AtomicBool,
    /// When the held keys were last checked against Redis.
    pub last_check: Mutex<Option<Instant>>,
    /// The epoch for which this node made a key of its own (no shared key to be had).
    pub own_key_epoch: Mutex<Option<u64>>,
}

impl SharedState {
    /// Derives the sealers from `cluster_key` and starts the session writer on the current
    /// runtime.
    pub fn start(link: RedisLink, cluster_key: &[u8]) -> anyhow::Result<Arc<Self>> {
        let (writes, mut queue) = mpsc::channel::<(String, Vec<u8>, Duration)>(WRITE_QUEUE);
        let link = Arc::new(link);
        let this = Arc::new(Self {
            key_sealer: Sealer::new(cluster_key, b"ticket keys")?,
            session_sealer: Sealer::new(cluster_key, b"sessions")?,
            link: Arc::clone(&link),
            writes,
            known: Mutex::new(BTreeMap::new()),
            sessions: SessionStats::default(),
            keys_made: AtomicU64::new(0),
            keys_fetched: AtomicU64::new(0),
            keys_restored: AtomicU64::new(0),
            keys_replaced: AtomicU64::new(0),
            past_loaded: AtomicBool::new(false),
            last_check: Mutex::new(None),
            own_key_epoch: Mutex::new(None),
        });
        // The writer ends when the last sender (this state) is dropped. What queued while
        // it waited goes to Redis in one pipeline.
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(WRITE_BATCH);
            while queue.recv_many(&mut batch, WRITE_BATCH).await > 0 {
                let _ = link.set_many(&batch).await;
                batch.clear();
            }
        });
        Ok(this)
    }

    fn key_name(&self, period: u64, epoch: u64) -> String {
        self.link.key(&format!("ticket-key:{period}:{epoch}"))
    }

    /// The key of `epoch`, from Redis, or made here and offered (the first offer wins).
    pub async fn epoch_key(
        &self,
        period: u64,
        epoch: u64,
        ttl: Duration,
    ) -> Result<(TicketKey, Held), SharedError> {
        let name = self.key_name(period, epoch);
        if let Some(sealed) = self.link.get(&name, Wait::Background).await? {
            self.keys_fetched.fetch_add(1, Ordering::Relaxed);
            return self.unwrap_key(&name, sealed);
        }
        let mut material = zeroize::Zeroizing::new([0u8; KEY_ID_LEN + 32]);
        aws_lc_rs::rand::fill(material.as_mut_slice()).map_err(|_| SharedError::Random)?;
        let sealed = self
            .key_sealer
            .seal(&name, material.as_slice())
            .ok_or(SharedError::Random)?;
        if self.link.set(&name, &sealed, ttl, true).await? {
            self.keys_made.fetch_add(1, Ordering::Relaxed);
            let key = key_of(material.as_slice())?;
            let held = Held {
                id: key.id(),
                sealed,
            };
            return Ok((key, held));
        }
        // Another node offered first: take its key.
        let sealed = self
            .link
            .get(&name, Wait::Background)
            .await?
            .ok_or(SharedError::Vanished)?;
        self.keys_fetched.fetch_add(1, Ordering::Relaxed);
        self.unwrap_key(&name, sealed)
    }

    /// The key of a past `epoch` if Redis still holds it (never made here: no node seals
    /// with a past epoch's key).
    pub async fn past_key(
        &self,
        period: u64,
        epoch: u64,
    ) -> Result<Option<(TicketKey, Held)>, SharedError> {
        let name = self.key_name(period, epoch);
        match self.link.get(&name, Wait::Background).await? {
            None => Ok(None),
            Some(sealed) => {
                self.keys_fetched.fetch_add(1, Ordering::Relaxed);
                self.unwrap_key(&name, sealed).map(Some)
            }
        }
    }

    /// Checks that Redis still holds `held` for `epoch`: writes it back if Redis lost it,
    /// or hands over the key Redis holds instead.
    pub async fn check_key(
        &self,
        period: u64,
        epoch: u64,
        held: &Held,
        ttl: Duration,
    ) -> Result<Checked, SharedError> {
        let name = self.key_name(period, epoch);
        let sealed = match self.link.get(&name, Wait::Background).await? {
            Some(sealed) => sealed,
            None => {
                if self.link.set(&name, &held.sealed, ttl, true).await? {
                    self.keys_restored.fetch_add(1, Ordering::Relaxed);
                    return Ok(Checked::Restored);
                }
                self.link
                    .get(&name, Wait::Background)
                    .await?
                    .ok_or(SharedError::Vanished)?
            }
        };
        if sealed == held.sealed {
            return Ok(Checked::Same);
        }
        let (key, held) = self.unwrap_key(&name, sealed)?;
        self.keys_replaced.fetch_add(1, Ordering::Relaxed);
        Ok(Checked::Replaced(key, held))
    }

    fn unwrap_key(&self, name: &str, sealed: Vec<u8>) -> Result<(TicketKey, Held), SharedError> {
        let material = self
            .key_sealer
            .open(name, &sealed)
            .ok_or(SharedError::Sealed)?;
        if material.len() != KEY_ID_LEN + 32 {
            return Err(SharedError::Sealed);
        }
        let key = key_of(&material)?;
        let held = Held {
            id: key.id(),
            sealed,
        };
        Ok((key, held))
    }

    fn session_name(&self, id: &[u8]) -> String {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, id);
        self.link
            .key(&format!("session:{}", hex::encode(digest.as_ref())))
    }

    /// Queues `value` for Redis under session `id`.
    pub fn put_session(&self, id: &[u8], value: &[u8], ttl: Duration) {
        let name = self.session_name(id);
        let Some(sealed) = self.session_sealer.seal(&name, value) else {
            return;
        };
        match self.writes.try_send((name, sealed, ttl)) {
            Ok(()) => self.sessions.writes.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.sessions.writes_dropped.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// Session `id` from Redis; `take`: deleted as it is read (single use).
    pub async fn fetch_session(
        self: Arc<Self>,
        id: Vec<u8>,
        take: bool,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let name = self.session_name(&id);
        let sealed = if take {
            self.link.get_del(&name, Wait::Handshake).await?
        } else {
            self.link.get(&name, Wait::Handshake).await?
        };
        // A value that does not open (another cluster key, tampering) is a miss.
        Ok(sealed.and_then(|s| self.session_sealer.open(&name, &s).map(|v| v.to_vec())))
    }
}

fn key_of(material: &[u8]) -> Result<TicketKey, SharedError> {
    let (name, secret) = material.split_at(KEY_ID_LEN);
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(name);
    TicketKey::from_material(id, secret).map_err(|_| SharedError::Sealed)
}

/// Why an epoch key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("the key in Redis does not open under this node's cluster key (a different cluster_key_file?)")]
    Sealed,
    #[error("the key offered by another node vanished from Redis")]
    Vanished,
    #[error("the system's random generator failed")]
    Random,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_cut_time_into_periods() {
        assert_eq!(epoch(0, 3600), 0);
        assert_eq!(epoch(3599, 3600), 0);
        assert_eq!(epoch(3600, 3600), 1);
        assert_eq!(epoch(10, 0), 10);
    }
}
