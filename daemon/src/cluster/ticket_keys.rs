//! The session-ticket key ring, without I/O: one key seals new tickets; keys that stopped
//! sealing still open tickets for a window (the ticket lifetime), then are dropped. Time is
//! passed in, so rotation and expiry are tested without waiting.
//!
//! A ticket is `version (1) ‖ key id (16) ‖ nonce (12) ‖ AES-256-GCM(origin ‖ state) ‖ tag
//! (16)`, the first three parts authenticated as associated data. `origin` is the name of
//! the node that sealed it (one length byte, then the name), so a node can tell a session
//! made elsewhere in its cluster; `state` is rustls' encoded session.
//!
//! Key bytes live only inside aws-lc's AEAD contexts, which aws-lc cleanses when it frees
//! them: dropping a [`TicketKey`] erases its key. Material read from a file or derived on
//! the way is held in [`Zeroizing`] buffers.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::hkdf;
use zeroize::Zeroizing;

/// Length of a key id (the "key name" of nginx and HAProxy key files).
pub const KEY_ID_LEN: usize = 16;
/// The ticket layout version this code writes and reads.
const VERSION: u8 = 1;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 1 + KEY_ID_LEN + NONCE_LEN;
/// Longest node name a ticket carries.
pub const MAX_ORIGIN_LEN: usize = 64;
/// HKDF salt for keys derived from operator key material (fixed, public: it separates this
/// use of the material from any other).
const SALT: &[u8] = b"tlsaccel session ticket key v1";

/// One ticket key. Prints its id only.
pub struct TicketKey {
    id: [u8; KEY_ID_LEN],
    aead: LessSafeKey,
}

impl fmt::Debug for TicketKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TicketKey")
            .field("id", &hex::encode(self.id))
            .finish_non_exhaustive()
    }
}

/// Why a key could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the system's random generator failed")]
    Random,
    #[error("key material of {0} bytes is too short (at least 16 after the key name)")]
    TooShort(usize),
    #[error("the AES-256-GCM key could not be set up")]
    Aead,
}

impl TicketKey {
    /// A key from an operator's key material: `id` names it in tickets, and the AEAD key is
    /// HKDF-SHA256 of `secret` (salted and labelled for this use), so every node given the
    /// same material makes the same key.
    pub fn from_material(id: [u8; KEY_ID_LEN], secret: &[u8]) -> Result<Self, KeyError> {
        if secret.len() < 16 {
            return Err(KeyError::TooShort(secret.len()));
        }
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(secret);
        let info = [id.as_slice()];
        let okm = prk
            .expand(&info, &AES_256_GCM)
            .map_err(|_| KeyError::Aead)?;
        let aead = LessSafeKey::new(UnboundKey::from(okm));
        Ok(Self { id, aead })
    }

    /// A fresh random key with a random id.
    pub fn random() -> Result<Self, KeyError> {
        let mut id = [0u8; KEY_ID_LEN];
        aws_lc_rs::rand::fill(&mut id).map_err(|_| KeyError::Random)?;
        let mut secret = Zeroizing::new([0u8; 32]);
        aws_lc_rs::rand::fill(secret.as_mut_slice()).map_err(|_| KeyError::Random)?;
        let unbound =
            UnboundKey::new(&AES_256_GCM, secret.as_slice()).map_err(|_| KeyError::Aead)?;
        Ok(Self {
            id,
            aead: LessSafeKey::new(unbound),
        })
    }

    /// The key's id, as it appears in tickets (not secret).
    pub fn id(&self) -> [u8; KEY_ID_LEN] {
        self.id
    }

    fn seal(&self, origin: &[u8], state: &[u8]) -> Option<Vec<u8>> {
        let origin_len = u8::try_from(origin.len()).ok()?;
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).ok()?;
        let mut ticket = Vec::with_capacity(HEADER_LEN + 1 + origin.len() + state.len() + TAG_LEN);
        ticket.push(VERSION);
        ticket.extend_from_slice(&self.id);
        ticket.extend_from_slice(&nonce);
        ticket.push(origin_len);
        ticket.extend_from_slice(origin);
        ticket.extend_from_slice(state);
        let (header, body) = ticket.split_at_mut(HEADER_LEN);
        let tag = self
            .aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&header[..]),
                body,
            )
            .ok()?;
        ticket.extend_from_slice(tag.as_ref());
        Some(ticket)
    }

    fn open(&self, ticket: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
        let (header, sealed) = ticket.split_at_checked(HEADER_LEN)?;
        let nonce = Nonce::try_assume_unique_for_key(&header[1 + KEY_ID_LEN..]).ok()?;
        // Zeroed if it is not handed on (a bad tag leaves nothing secret, but a malformed
        // inside would).
        let mut body = Zeroizing::new(sealed.to_vec());
        let plain_len = self
            .aead
            .open_in_place(nonce, Aad::from(header), &mut body)
            .ok()?
            .len();
        body.truncate(plain_len);
        let (&origin_len, rest) = body.split_first()?;
        let origin_len = usize::from(origin_len);
        if rest.len() < origin_len {
            return None;
        }
        let origin = rest[..origin_len].to_vec();
        // The state goes to rustls in the buffer it was opened in: no copy left behind.
        let mut state = std::mem::take(&mut *body);
        state.drain(..1 + origin_len);
        Some((origin, state))
    }
}

/// How old the key that opened a ticket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAge {
    /// The key sealing new tickets now.
    Current,
    /// A key that sealed earlier, or one an operator's file still lists for decryption.
    Previous,
}

impl KeyAge {
    pub fn label(self) -> &'static str {
        match self {
            KeyAge::Current => "current",
            KeyAge::Previous => "previous",
        }
    }
}

/// Why a ticket was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// Too short, or a layout version this code does not know.
    Malformed,
    /// No key in the ring has its id (never known here, or retired past the window).
    UnknownKey,
    /// The key is known but the ticket does not authenticate under it.
    BadTag,
}

impl Rejected {
    pub fn label(self) -> &'static str {
        match self {
            Rejected::Malformed => "malformed",
            Rejected::UnknownKey => "unknown_key",
            Rejected::BadTag => "bad_tag",
        }
    }
}

/// A ticket that opened.
#[derive(Debug)]
pub struct Opened {
    /// rustls' session state.
    pub state: Vec<u8>,
    /// The node that sealed it.
    pub origin: Vec<u8>,
    pub age: KeyAge,
}

#[derive(Debug)]
struct Listed {
    key: Arc<TicketKey>,
    /// `None`: kept while the key source lists it; otherwise dropped at this time.
    until: Option<Instant>,
}

/// The keys of one process: a current key and the keys that still open tickets.
#[derive(Debug, Default)]
pub struct KeyRing {
    current: Option<(Arc<TicketKey>, Instant)>,
    others: Vec<Listed>,
}

/// What a ring shows of itself (for `/status`): ids and ages, never key bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub id: String,
    pub current: bool,
    /// Seconds since it became current (the current key), or until it is dropped (a
    /// retired key); `None` for a key kept while its file lists it.
    pub seconds: Option<u64>,
}

impl KeyRing {
    /// Makes `key` the sealing key from `now`. The key it replaces keeps opening tickets
    /// until `now + window`. Installing the current key again changes nothing.
    pub fn install(&mut self, key: TicketKey, now: Instant, window: std::time::Duration) {
        if self
            .current
            .as_ref()
            .is_some_and(|(current, _)| current.id == key.id)
        {
            return;
        }
        // A listed key that becomes current is no longer "other".
        self.others.retain(|listed| listed.key.id != key.id);
        if let Some((old, _)) = self.current.take() {
            self.others.push(Listed {
                key: old,
                until: Some(now + window),
            });
        }
        self.current = Some((Arc::new(key), now));
    }

    /// Replaces the keys a source lists for opening only (HAProxy's and nginx's other
    /// keys). Keys that were listed and are not any more keep opening until `now + window`.
    pub fn set_listed(&mut self, keys: Vec<TicketKey>, now: Instant, window: std::time::Duration) {
        let current = self.current.as_ref().map(|(k, _)| k.id);
        for listed in &mut self.others {
            if listed.until.is_none() && !keys.iter().any(|k| k.id == listed.key.id) {
                listed.until = Some(now + window);
            }
        }
        for key in keys {
            if Some(key.id) == current {
                continue;
            }
            match self.others.iter_mut().find(|l| l.key.id == key.id) {
                Some(listed) => listed.until = None,
                None => self.others.push(Listed {
                    key: Arc::new(key),
                    until: None,
                }),
            }
        }
    }

    /// Makes the listed key `id` the sealing key (the next epoch's key when its epoch
    /// begins); the key it replaces keeps opening until `now + window`. False when no
    /// listed key has that id.
    pub fn promote(
        &mut self,
        id: [u8; KEY_ID_LEN],
        now: Instant,
        window: std::time::Duration,
    ) -> bool {
        let Some(at) = self.others.iter().position(|l| l.key.id == id) else {
            return false;
        };
        let listed = self.others.remove(at);
        if let Some((old, _)) = self.current.take() {
            self.others.push(Listed {
                key: old,
                until: Some(now + window),
            });
        }
        self.current = Some((listed.key, now));
        true
    }

    /// Adds `key` for opening only, until `until` (a past epoch's key, learnt after the
    /// fact). A key the ring already has is left as it is.
    pub fn keep_until(&mut self, key: TicketKey, until: Instant) {
        let known = self.current.as_ref().is_some_and(|(k, _)| k.id == key.id)
            || self.others.iter().any(|l| l.key.id == key.id);
        if !known {
            self.others.push(Listed {
                key: Arc::new(key),
                until: Some(until),
            });
        }
    }

    /// Drops the keys whose window has passed (their tickets then get full handshakes).
    pub fn expire(&mut self, now: Instant) {
        self.others
            .retain(|listed| listed.until.is_none_or(|until| now < until));
    }

    /// When the current key became current.
    pub fn current_since(&self) -> Option<Instant> {
        self.current.as_ref().map(|(_, since)| *since)
    }

    /// The current key's id.
    pub fn current_id(&self) -> Option<[u8; KEY_ID_LEN]> {
        self.current.as_ref().map(|(key, _)| key.id)
    }

    /// Seals `state` under the current key, naming `origin` as its node.
    pub fn seal(&self, origin: &[u8], state: &[u8]) -> Option<Vec<u8>> {
        let (key, _) = self.current.as_ref()?;
        key.seal(origin, state)
    }

    /// Opens `ticket` with the key its id names, if the ring still has it.
    pub fn open(&self, ticket: &[u8], now: Instant) -> Result<Opened, Rejected> {
        if ticket.len() < HEADER_LEN + 1 + TAG_LEN || ticket[0] != VERSION {
            return Err(Rejected::Malformed);
        }
        let id = &ticket[1..1 + KEY_ID_LEN];
        let (key, age) = match &self.current {
            Some((key, _)) if key.id == id => (key, KeyAge::Current),
            _ => {
                let listed = self
                    .others
                    .iter()
                    .find(|l| l.key.id == id && l.until.is_none_or(|until| now < until))
                    .ok_or(Rejected::UnknownKey)?;
                (&listed.key, KeyAge::Previous)
            }
        };
        let (origin, state) = key.open(ticket).ok_or(Rejected::BadTag)?;
        Ok(Opened { state, origin, age })
    }

    /// The keys, current first.
    pub fn info(&self, now: Instant) -> Vec<KeyInfo> {
        let mut out = Vec::new();
        if let Some((key, since)) = &self.current {
            out.push(KeyInfo {
                id: hex::encode(key.id),
                current: true,
                seconds: Some(now.saturating_duration_since(*since).as_secs()),
            });
        }
        for listed in &self.others {
            out.push(KeyInfo {
                id: hex::encode(listed.key.id),
                current: false,
                seconds: listed
                    .until
                    .map(|until| until.saturating_duration_since(now).as_secs()),
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const HOUR: Duration = Duration::from_secs(3600);

    fn material(byte: u8) -> ([u8; KEY_ID_LEN], Vec<u8>) {
        ([byte; KEY_ID_LEN], vec![byte ^ 0x5a; 64])
    }

    fn key(byte: u8) -> TicketKey {
        let (id, secret) = material(byte);
        TicketKey::from_material(id, &secret).unwrap()
    }

    #[test]
    fn a_ticket_opens_with_its_origin_and_state() {
        let now = Instant::now();
        let mut ring = KeyRing::default();
        ring.install(key(1), now, HOUR);
        let ticket = ring.seal(b"node-a", b"session state").unwrap();
        let opened = ring.open(&ticket, now).unwrap();
        assert_eq!(opened.state, b"session state");
        assert_eq!(opened.origin, b"node-a");
        assert_eq!(opened.age, KeyAge::Current);
        // Two seals of the same state differ (fresh nonces).
        assert_ne!(ring.seal(b"node-a", b"session state").unwrap(), ticket);
    }

    #[test]
    fn the_same_material_makes_the_same_key_on_every_node() {
        let now = Instant::now();
        let (mut a, mut b) = (KeyRing::default(), KeyRing::default());
        a.install(key(7), now, HOUR);
        b.install(key(7), now, HOUR);
        let ticket = a.seal(b"a", b"x").unwrap();
        assert_eq!(b.open(&ticket, now).unwrap().origin, b"a");
        // Different material: a different key, even under the same id.
        let mut c = KeyRing::default();
        c.install(
            TicketKey::from_material([7; KEY_ID_LEN], &[0u8; 64]).unwrap(),
            now,
            HOUR,
        );
        assert_eq!(c.open(&ticket, now).unwrap_err(), Rejected::BadTag);
    }

    #[test]
    fn a_retired_key_opens_until_its_window_ends() {
        let start = Instant::now();
        let mut ring = KeyRing::default();
        ring.install(key(1), start, HOUR);
        let old = ring.seal(b"n", b"old").unwrap();
        ring.install(key(2), start + HOUR, HOUR);
        let new = ring.seal(b"n", b"new").unwrap();
        let opened = ring.open(&old, start + HOUR).unwrap();
        assert_eq!(
            (opened.state.as_slice(), opened.age),
            (&b"old"[..], KeyAge::Previous)
        );
        assert_eq!(ring.open(&new, start + HOUR).unwrap().age, KeyAge::Current);
        // Past the window the key is gone, whether or not `expire` ran yet.
        let later = start + 2 * HOUR + Duration::from_secs(1);
        assert_eq!(ring.open(&old, later).unwrap_err(), Rejected::UnknownKey);
        ring.expire(later);
        assert_eq!(ring.info(later).len(), 1);
        assert_eq!(ring.open(&old, later).unwrap_err(), Rejected::UnknownKey);
    }

    #[test]
    fn installing_the_current_key_again_changes_nothing() {
        let now = Instant::now();
        let mut ring = KeyRing::default();
        ring.install(key(1), now, HOUR);
        ring.install(key(1), now + HOUR, HOUR);
        assert_eq!(ring.info(now).len(), 1);
        assert_eq!(ring.current_since(), Some(now));
    }

    #[test]
    fn listed_keys_open_while_listed_and_for_the_window_after() {
        let now = Instant::now();
        let mut ring = KeyRing::default();
        let mut other = KeyRing::default();
        other.install(key(3), now, HOUR);
        let ticket = other.seal(b"o", b"s").unwrap();
        ring.install(key(1), now, HOUR);
        assert_eq!(ring.open(&ticket, now).unwrap_err(), Rejected::UnknownKey);
        ring.set_listed(vec![key(3)], now, HOUR);
        let far = now + 100 * HOUR;
        assert_eq!(ring.open(&ticket, far).unwrap().age, KeyAge::Previous);
        // No longer listed: one more window.
        ring.set_listed(vec![], far, HOUR);
        assert!(ring.open(&ticket, far + HOUR / 2).is_ok());
        assert_eq!(
            ring.open(&ticket, far + HOUR).unwrap_err(),
            Rejected::UnknownKey
        );
    }

    #[test]
    fn a_listed_key_is_promoted_when_its_epoch_begins() {
        let now = Instant::now();
        let mut ring = KeyRing::default();
        ring.install(key(1), now, HOUR);
        let old = ring.seal(b"n", b"old").unwrap();
        ring.set_listed(vec![key(2)], now, HOUR);
        assert!(!ring.promote([9; KEY_ID_LEN], now, HOUR));
        assert!(ring.promote([2; KEY_ID_LEN], now + HOUR, HOUR));
        assert_eq!(ring.current_id(), Some([2; KEY_ID_LEN]));
        assert_eq!(ring.open(&old, now + HOUR).unwrap().age, KeyAge::Previous);
        assert!(ring.open(&old, now + 2 * HOUR).is_err());
    }

    #[test]
    fn tampering_and_garbage_are_refused_without_panics() {
        let now = Instant::now();
        let mut ring = KeyRing::default();
        ring.install(key(1), now, HOUR);
        let ticket = ring.seal(b"n", b"state").unwrap();
        for i in 0..ticket.len() {
            let mut bad = ticket.clone();
            bad[i] ^= 1;
            assert!(ring.open(&bad, now).is_err(), "flipped byte {i} accepted");
        }
        for len in 0..ticket.len() {
            assert!(ring.open(&ticket[..len], now).is_err());
        }
        assert_eq!(ring.open(&[], now).unwrap_err(), Rejected::Malformed);
        // Garbage that looks like a ticket of ours.
        assert!(ring.open(&[VERSION; 200], now).is_err());
    }

    #[test]
    fn short_material_is_refused_and_keys_print_only_their_id() {
        assert_eq!(
            TicketKey::from_material([0; KEY_ID_LEN], &[1; 15]).unwrap_err(),
            KeyError::TooShort(15)
        );
        let text = format!("{:?}", key(0xab));
        assert!(text.contains(&"ab".repeat(KEY_ID_LEN)), "{text}");
        assert!(!text.contains("aead"), "{text}");
    }

    #[test]
    fn random_keys_differ() {
        let (a, b) = (TicketKey::random().unwrap(), TicketKey::random().unwrap());
        assert_ne!(a.id(), b.id());
        let now = Instant::now();
        let mut ring = KeyRing::default();
        ring.install(a, now, HOUR);
        let ticket = ring.seal(b"", b"s").unwrap();
        let mut other = KeyRing::default();
        other.install(b, now, HOUR);
        assert!(other.open(&ticket, now).is_err());
    }
}
