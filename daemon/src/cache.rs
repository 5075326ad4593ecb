//! HTTP mode's response cache (`[listener.cache]`): GET responses kept in memory, bounded in
//! bytes (moka), and reused for GET and HEAD by RFC 9111's rules as a shared cache
//! (`http-cache-semantics`: `Cache-Control`, `Expires`, `Vary`, `Authorization`, `Age`).
//!
//! * A fresh entry answers without reaching a backend.
//! * A stale one is revalidated: the request goes to the backend with the entry's
//!   validators (`If-None-Match`, `If-Modified-Since`); a 304 refreshes the entry and the
//!   client gets the stored body, anything else replaces it.
//! * A request with an unsafe method that succeeds drops the entry of its target (RFC 9111
//!   §4.4).
//! * Entries are keyed by host and target; one variant per key (a request whose `Vary`
//!   fields differ from the stored one's goes to the backend, and its answer replaces it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http_cache_semantics::{AfterResponse, BeforeRequest, CachePolicy};
use hyper::header::HeaderMap;
use hyper::{Method, StatusCode};

/// A stored response.
#[derive(Debug)]
pub struct Entry {
    policy: CachePolicy,
    body: Bytes,
    /// The stored head's size, for the weigher.
    head_bytes: usize,
}

fn head_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 32)
        .sum()
}

/// Counters, by outcome.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Stale entries a backend confirmed (304).
    pub revalidated: AtomicU64,
    pub stored: AtomicU64,
    /// Dropped by an unsafe request to their target.
    pub invalidated: AtomicU64,
}

/// One listener's cache.
#[derive(Debug)]
pub struct ResponseCache {
    entries: moka::sync::Cache<String, Arc<Entry>>,
    max_object: u64,
    pub stats: CacheStats,
}

/// What the cache says about a request.
#[derive(Debug)]
pub enum Lookup {
    /// Answer with this (the body is empty for HEAD).
    Fresh(http::response::Parts, Bytes),
    /// Send the request with these extra headers (the validators) and give the answer to
    /// [`ResponseCache::revalidated`].
    Stale(Arc<Entry>, HeaderMap),
    Miss,
}

/// The request as the cache sees it: method, `https://host/target` (so HTTP/1.1 and
/// HTTP/2 requests share entries), and the client's fields with `Host: host`.
pub fn view(
    method: &Method,
    host: &str,
    target: &str,
    headers: &HeaderMap,
) -> http::request::Parts {
    let mut request = http::Request::builder()
        .method(method.clone())
        .uri(format!("https://{host}{target}"))
        .body(())
        .unwrap_or_else(|_| http::Request::new(()));
    *request.headers_mut() = headers.clone();
    // HTTP/2 carries no Host field and HTTP/1.1's may have a port: one value for both.
    if let Ok(value) = http::HeaderValue::from_str(host) {
        request.headers_mut().insert(http::header::HOST, value);
    }
    request.into_parts().0
}

fn key(request: &http::request::Parts) -> String {
    request.uri.to_string()
}

impl ResponseCache {
    pub fn new(max_bytes: u64, max_object: u64) -> Self {
        Self {
            entries: moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|key: &String, entry: &Arc<Entry>| {
                    u32::try_from(key.len() + entry.head_bytes + entry.body.len() + 256)
                        .unwrap_or(u32::MAX)
                })
                .build(),
            max_object,
            stats: CacheStats::default(),
        }
    }

    /// Bytes held (as weighed), for metrics.
    pub fn weighted_size(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.weighted_size()
    }

    /// Looks `request` up (GET and HEAD only; anything else is a miss).
    pub fn lookup(&self, request: &http::request::Parts) -> Lookup {
        if request.method != Method::GET && request.method != Method::HEAD {
            return Lookup::Miss;
        }
        let Some(entry) = self.entries.get(&key(request)) else {
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            return Lookup::Miss;
        };
        // A stored GET answer answers HEAD too (RFC 9111 §4), without its body.
        let mut probe = view(
            &Method::GET,
            request.uri.authority().map_or("", |a| a.as_str()),
            request.uri.path_and_query().map_or("/", |pq| pq.as_str()),
            &request.headers,
        );
        probe.method = Method::GET;
        match entry.policy.before_request(&probe, SystemTime::now()) {
            BeforeRequest::Fresh(parts) => {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                let body = if request.method == Method::HEAD {
                    Bytes::new()
                } else {
                    entry.body.clone()
                };
                Lookup::Fresh(parts, body)
            }
            BeforeRequest::Stale {
                request: revalidation,
                matches: true,
            } => {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                let mut validators = HeaderMap::new();
                for name in [http::header::IF_NONE_MATCH, http::header::IF_MODIFIED_SINCE] {
                    if let Some(value) = revalidation.headers.get(&name) {
                        validators.insert(name, value.clone());
                    }
                }
                Lookup::Stale(entry, validators)
            }
            BeforeRequest::Stale { matches: false, .. } => {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                Lookup::Miss
            }
        }
    }

    /// A backend's 304 (or other answer) to a revalidation of `entry`: the refreshed head
    /// and stored body when the entry still holds, else `None` (the answer goes to the
    /// client as it is).
    pub fn revalidated(
        &self,
        request: &http::request::Parts,
        entry: &Entry,
        status: StatusCode,
        headers: &HeaderMap,
    ) -> Option<(http::response::Parts, Bytes)> {
        if status != StatusCode::NOT_MODIFIED {
            return None;
        }
        let mut response = http::Response::new(());
        *response.status_mut() = status;
        *response.headers_mut() = headers.clone();
        let (answer, _) = response.into_parts();
        match entry
            .policy
            .after_response(request, &answer, SystemTime::now())
        {
            AfterResponse::NotModified(policy, parts) => {
                self.stats.revalidated.fetch_add(1, Ordering::Relaxed);
                let body = entry.body.clone();
                self.entries.insert(
                    key(request),
                    Arc::new(Entry {
                        policy,
                        body: body.clone(),
                        head_bytes: head_bytes(&parts.headers),
                    }),
                );
                let body = if request.method == Method::HEAD {
                    Bytes::new()
                } else {
                    body
                };
                Some((parts, body))
            }
            AfterResponse::Modified(..) => {
                // The validators did not match: the stored response is no good.
                self.entries.invalidate(&key(request));
                None
            }
        }
    }

    /// Whether a GET answer with this head may be stored, and its body is short enough to
    /// collect (`declared`: its exact length, when known).
    pub fn wants(
        &self,
        request: &http::request::Parts,
        response: &http::response::Parts,
        declared: Option<u64>,
    ) -> bool {
        request.method == Method::GET
            && declared.is_some_and(|n| n <= self.max_object)
            && CachePolicy::new(request, response).is_storable()
    }

    /// Stores a GET answer [`Self::wants`] accepted, with its whole body.
    pub fn store(
        &self,
        request: &http::request::Parts,
        response: &http::response::Parts,
        body: Bytes,
    ) {
        let policy = CachePolicy::new(request, response);
        if policy.is_storable() && body.len() as u64 <= self.max_object {
            self.stats.stored.fetch_add(1, Ordering::Relaxed);
            let head_bytes = head_bytes(&response.headers);
            self.entries.insert(
                key(request),
                Arc::new(Entry {
                    policy,
                    body,
                    head_bytes,
                }),
            );
        }
    }

    /// An unsafe request to `request`'s target was answered with `status`.
    pub fn after_unsafe(&self, request: &http::request::Parts, status: StatusCode) {
        if !request.method.is_safe() && (status.is_success() || status.is_redirection()) {
            let key = key(request);
            if self.entries.contains_key(&key) {
                self.entries.invalidate(&key);
                self.stats.invalidated.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn response(status: u16, fields: &[(&str, &str)]) -> http::response::Parts {
        let mut r = http::Response::builder().status(status);
        for (n, v) in fields {
            r = r.header(*n, *v);
        }
        r.body(()).unwrap().into_parts().0
    }

    fn get(fields: &[(&str, &str)]) -> http::request::Parts {
        let mut headers = HeaderMap::new();
        for (n, v) in fields {
            headers.insert(
                hyper::header::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        view(&Method::GET, "app.test", "/a?x=1", &headers)
    }

    #[test]
    fn fresh_answers_are_reused_and_private_or_no_store_ones_are_not() {
        let cache = ResponseCache::new(1 << 20, 1 << 16);
        let req = get(&[]);
        assert!(matches!(cache.lookup(&req), Lookup::Miss));
        let res = response(200, &[("cache-control", "max-age=60"), ("etag", "\"v1\"")]);
        assert!(cache.wants(&req, &res, Some(5)));
        cache.store(&req, &res, Bytes::from_static(b"hello"));
        let Lookup::Fresh(parts, body) = cache.lookup(&req) else {
            panic!("fresh");
        };
        assert_eq!(parts.status, 200);
        assert_eq!(body, "hello");
        assert!(parts.headers.contains_key("age"));
        // HEAD from the GET's entry, without the body.
        let head = view(&Method::HEAD, "app.test", "/a?x=1", &HeaderMap::new());
        assert!(matches!(cache.lookup(&head), Lookup::Fresh(_, b) if b.is_empty()));
        // Another target, or a request with credentials: not from the entry.
        assert!(matches!(
            cache.lookup(&view(&Method::GET, "app.test", "/a?x=2", &HeaderMap::new())),
            Lookup::Miss
        ));
        for refused in [
            response(200, &[("cache-control", "no-store")]),
            response(200, &[("cache-control", "private, max-age=60")]),
        ] {
            assert!(!cache.wants(&req, &refused, Some(5)));
        }
        assert!(!cache.wants(&req, &res, Some(1 << 17)), "too long");
        assert!(!cache.wants(&req, &res, None), "unknown length");
        let with_auth = get(&[("authorization", "Bearer x")]);
        assert!(!cache.wants(&with_auth, &res, Some(5)));
    }

    #[test]
    fn a_stale_entry_is_revalidated_with_its_validators_and_a_304_refreshes_it() {
        let cache = ResponseCache::new(1 << 20, 1 << 16);
        let req = get(&[]);
        let res = response(200, &[("cache-control", "max-age=0"), ("etag", "\"v1\"")]);
        cache.store(&req, &res, Bytes::from_static(b"hello"));
        let Lookup::Stale(entry, validators) = cache.lookup(&req) else {
            panic!("stale");
        };
        assert_eq!(validators.get("if-none-match").unwrap(), "\"v1\"");
        let not_modified = response(304, &[("etag", "\"v1\""), ("cache-control", "max-age=60")]);
        let (parts, body) = cache
            .revalidated(&req, &entry, not_modified.status, &not_modified.headers)
            .expect("still good");
        assert_eq!((parts.status.as_u16(), body.as_ref()), (200, &b"hello"[..]));
        assert!(matches!(cache.lookup(&req), Lookup::Fresh(..)));
        assert_eq!(cache.stats.revalidated.load(Ordering::Relaxed), 1);
        // A 200 to a revalidation goes to the client as it is.
        assert!(cache
            .revalidated(&req, &entry, StatusCode::OK, &HeaderMap::new())
            .is_none());
    }

    #[test]
    fn vary_and_unsafe_requests() {
        let cache = ResponseCache::new(1 << 20, 1 << 16);
        let gzip = get(&[("accept-encoding", "gzip")]);
        let res = response(
            200,
            &[("cache-control", "max-age=60"), ("vary", "accept-encoding")],
        );
        cache.store(&gzip, &res, Bytes::from_static(b"z"));
        assert!(matches!(cache.lookup(&gzip), Lookup::Fresh(..)));
        assert!(matches!(
            cache.lookup(&get(&[("accept-encoding", "br")])),
            Lookup::Miss
        ));
        // A successful POST to the target drops it; a failed one does not.
        let post = view(&Method::POST, "app.test", "/a?x=1", &HeaderMap::new());
        cache.after_unsafe(&post, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(matches!(cache.lookup(&gzip), Lookup::Fresh(..)));
        cache.after_unsafe(&post, StatusCode::NO_CONTENT);
        assert!(matches!(cache.lookup(&gzip), Lookup::Miss));
        assert_eq!(cache.stats.invalidated.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn the_cache_stays_within_its_bytes() {
        let cache = ResponseCache::new(64 * 1024, 16 * 1024);
        let res = response(200, &[("cache-control", "max-age=60")]);
        for i in 0..100 {
            let req = view(
                &Method::GET,
                "app.test",
                &format!("/{i}"),
                &HeaderMap::new(),
            );
            cache.store(&req, &res, Bytes::from(vec![0u8; 8 * 1024]));
        }
        assert!(
            cache.weighted_size() <= 64 * 1024,
            "{}",
            cache.weighted_size()
        );
    }
}
