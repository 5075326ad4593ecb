//! The process's session cache: a bounded LRU map from session id to rustls' encoded
//! session, with O(1) `take`. (rustls' own `ServerSessionMemoryCache` scans its whole
//! eviction queue on every `take`, which TLS 1.3 stateful resumption does once per
//! resumption: with 20,000 sessions that scan was the largest item in the profile.)
//! Sessions hold resumption secrets: each value is zeroed when it leaves the cache
//! (evicted, replaced or taken; a copy handed to rustls is rustls' to drop).

use std::num::NonZeroUsize;
use std::sync::Mutex;

use lru::LruCache;
use rustls::server::StoresServerSessions;
use zeroize::Zeroizing;

/// A bounded session cache.
pub struct SessionCache {
    entries: Mutex<LruCache<Vec<u8>, Zeroizing<Vec<u8>>>>,
}

impl std::fmt::Debug for SessionCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionCache")
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

impl SessionCache {
    /// A cache of at most `size` sessions (at least one).
    pub fn new(size: NonZeroUsize) -> Self {
        Self {
            entries: Mutex::new(LruCache::new(size)),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, LruCache<Vec<u8>, Zeroizing<Vec<u8>>>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sessions held now.
    pub fn len(&self) -> usize {
        self.entries().len()
    }

    /// True when it holds no session.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl StoresServerSessions for SessionCache {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        // The evicted or replaced value is zeroed as it drops.
        let _ = self.entries().push(key, Zeroizing::new(value));
        true
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.entries().get(key).map(|v| v.to_vec())
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        let taken = self.entries().pop(key)?;
        Some(taken.to_vec())
    }

    fn can_cache(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_bounded_least_recently_used_first_and_taken_once() {
        let cache = SessionCache::new(NonZeroUsize::new(2).unwrap());
        assert!(cache.put(b"a".to_vec(), b"1".to_vec()));
        assert!(cache.put(b"b".to_vec(), b"2".to_vec()));
        // Reading `a` makes `b` the oldest, so `c` evicts `b`.
        assert_eq!(cache.get(b"a").as_deref(), Some(&b"1"[..]));
        assert!(cache.put(b"c".to_vec(), b"3".to_vec()));
        assert_eq!(cache.get(b"b"), None);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.take(b"a").as_deref(), Some(&b"1"[..]));
        assert_eq!(cache.take(b"a"), None);
        assert_eq!(cache.get(b"a"), None);
        // A new value for a known id replaces it.
        assert!(cache.put(b"c".to_vec(), b"4".to_vec()));
        assert_eq!(cache.get(b"c").as_deref(), Some(&b"4"[..]));
    }
}
