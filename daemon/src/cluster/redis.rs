//! The link to the cluster's Redis: every call bounded by a timeout, counted, and never
//! fatal. Connections are made lazily and remade in the background by the `redis` crate's
//! `ConnectionManager`, so a Redis that goes away and comes back needs nothing from the
//! daemon. What goes into Redis is sealed under keys derived from the cluster key
//! ([`Sealer`]): reading Redis reveals no ticket key and no session.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::hkdf;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::IntoConnectionInfo;
use zeroize::Zeroizing;

/// HKDF salt separating the cluster key's uses (public).
const SALT: &[u8] = b"tlsaccel cluster key v1";

/// Settings of `[resumption.redis]`, paths made absolute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSettings {
    /// `redis://[user:password@]host:port[/db]` or `rediss://` for TLS.
    pub url: String,
    pub password_file: Option<PathBuf>,
    /// PEM roots for `rediss://` (default: the web PKI roots).
    pub ca: Option<PathBuf>,
    pub cluster_key_file: PathBuf,
    pub prefix: String,
    pub timeout: Duration,
}

/// The least a background call (ticket keys, session writes) waits for Redis: nothing waits
/// on it, so a slow Redis should still be heard. Handshake lookups wait `timeout_ms` only.
const BACKGROUND_TIMEOUT: Duration = Duration::from_secs(2);

/// Who waits for a Redis call, which sets how long it may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// A handshake is paused for the answer: `timeout_ms`.
    Handshake,
    /// A background task (key refresh, session writes): `timeout_ms`, at least 2 s.
    Background,
}

/// Counters of the Redis link.
#[derive(Debug, Default)]
pub struct RedisStats {
    pub ok: AtomicU64,
    pub errors: AtomicU64,
    pub timeouts: AtomicU64,
}

/// Why a Redis call gave nothing.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Seals values for Redis under a key derived from the cluster key, with the Redis key
/// name as associated data (a value moved to another name does not open).
pub struct Sealer(LessSafeKey);

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

impl Sealer {
    /// The sealer for `purpose` (`b"ticket keys"`, `b"sessions"`) from the cluster key.
    pub fn new(cluster_key: &[u8], purpose: &[u8]) -> anyhow::Result<Self> {
        anyhow::ensure!(
            cluster_key.len() >= 32,
            "the cluster key has {} bytes; it needs at least 32 (openssl rand 32 > cluster.key)",
            cluster_key.len()
        );
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(cluster_key);
        let info = [purpose];
        let okm = prk
            .expand(&info, &AES_256_GCM)
            .map_err(|_| anyhow::anyhow!("cluster key derivation failed"))?;
        Ok(Self(LessSafeKey::new(UnboundKey::from(okm))))
    }

    pub fn seal(&self, name: &str, plain: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let (_, body) = out.split_at_mut(NONCE_LEN);
        let tag = self
            .0
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                body,
            )
            .ok()?;
        out.extend_from_slice(tag.as_ref());
        Some(out)
    }

    pub fn open(&self, name: &str, sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        let (nonce, body) = sealed.split_at_checked(NONCE_LEN)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = Zeroizing::new(body.to_vec());
        let len = self
            .0
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut body)
            .ok()?
            .len();
        body.truncate(len);
        Some(body)
    }
}

/// Reads the cluster key file (kept only as long as the derivations take).
pub fn read_cluster_key(path: &Path) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let key = Zeroizing::new(
        std::fs::read(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?,
    );
    anyhow::ensure!(
        key.len() >= 32,
        "cluster key file {}: {} bytes; it needs at least 32 (openssl rand 32 > cluster.key)",
        path.display(),
        key.len()
    );
    Ok(key)
}

/// A bounded, counted connection to Redis.
pub struct RedisLink {
    manager: ConnectionManager,
    timeout: Duration,
    prefix: String,
    up: AtomicBool,
    pub stats: RedisStats,
}

impl std::fmt::Debug for RedisLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLink")
            .field("prefix", &self.prefix)
            .field("up", &self.is_up())
            .finish_non_exhaustive()
    }
}

impl RedisLink {
    /// Sets up the link without connecting (the first call connects). Must run inside the
    /// tokio runtime. Fails on a bad URL or an unreadable password or CA file.
    pub fn new(settings: &RedisSettings) -> anyhow::Result<Self> {
        let mut info = settings
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| anyhow::anyhow!("Redis url: {e}"))?;
        if let Some(file) = &settings.password_file {
            let password = Zeroizing::new(
                std::fs::read_to_string(file)
                    .map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?,
            );
            let redis = info
                .redis_settings()
                .clone()
                .set_password(password.trim_end_matches(['\r', '\n']));
            info = info.set_redis_settings(redis);
        }
        let client = match &settings.ca {
            Some(ca) => {
                let root_cert = std::fs::read(ca)
                    .map_err(|e| anyhow::anyhow!("reading {}: {e}", ca.display()))?;
                redis::Client::build_with_tls(
                    info,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(root_cert),
                    },
                )
            }
            None => redis::Client::open(info),
        }
        .map_err(|e| anyhow::anyhow!("Redis client: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout.max(Duration::from_millis(200))))
            .set_response_timeout(Some(settings.timeout.max(BACKGROUND_TIMEOUT)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let manager = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| anyhow::anyhow!("Redis connection manager: {e}"))?;
        Ok(Self {
            manager,
            timeout: settings.timeout,
            prefix: settings.prefix.clone(),
            up: AtomicBool::new(false),
            stats: RedisStats::default(),
        })
    }

    /// The full Redis key for `name`.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// True when the last call got an answer.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// The longest a call made for `wait` waits.
    pub fn timeout(&self, wait: Wait) -> Duration {
        match wait {
            Wait::Handshake => self.timeout,
            Wait::Background => self.timeout.max(BACKGROUND_TIMEOUT),
        }
    }

    async fn call<T>(
        &self,
        wait: Wait,
        work: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        let limit = self.timeout(wait);
        let result = match tokio::time::timeout(limit, work).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(StoreError::Redis(error)),
            Err(_) => Err(StoreError::Timeout(limit)),
        };
        let counter = match &result {
            Ok(_) => &self.stats.ok,
            Err(StoreError::Timeout(_)) => &self.stats.timeouts,
            Err(StoreError::Redis(_)) => &self.stats.errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let was_up = self.up.swap(result.is_ok(), Ordering::Relaxed);
        match (&result, was_up) {
            (Err(error), true) => {
                tracing::warn!(%error, "Redis unreachable; sessions are not shared until it is back")
            }
            (Ok(_), false) => tracing::info!("Redis reachable"),
            _ => {}
        }
        result
    }

    async fn query<T: redis::FromRedisValue>(
        &self,
        wait: Wait,
        cmd: &redis::Cmd,
    ) -> Result<T, StoreError> {
        let mut c = self.manager.clone();
        self.call(wait, async move { cmd.query_async::<T>(&mut c).await })
            .await
    }

    pub async fn get(&self, key: &str, wait: Wait) -> Result<Option<Vec<u8>>, StoreError> {
        self.query(wait, redis::cmd("GET").arg(key)).await
    }

    pub async fn get_del(&self, key: &str, wait: Wait) -> Result<Option<Vec<u8>>, StoreError> {
        self.query(wait, redis::cmd("GETDEL").arg(key)).await
    }

    /// Sets `key` with an expiry; `only_new`: only when it does not exist (returns whether
    /// it was set). A background call.
    pub async fn set(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        only_new: bool,
    ) -> Result<bool, StoreError> {
        let mut c = self.manager.clone();
        let millis = ttl.as_millis().max(1) as u64;
        self.call(Wait::Background, async move {
            let mut cmd = redis::cmd("SET");
            cmd.arg(key).arg(value).arg("PX").arg(millis);
            if only_new {
                cmd.arg("NX");
            }
            let reply: Option<String> = cmd.query_async(&mut c).await?;
            Ok(reply.is_some())
        })
        .await
    }

    /// Sets each `(key, value, ttl)` in one pipeline. A background call.
    pub async fn set_many(&self, items: &[(String, Vec<u8>, Duration)]) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        for (key, value, ttl) in items {
            let millis = ttl.as_millis().max(1) as u64;
            pipe.cmd("SET")
                .arg(key)
                .arg(value)
                .arg("PX")
                .arg(millis)
                .ignore();
        }
        let mut c = self.manager.clone();
        self.call(Wait::Background, async move {
            pipe.query_async::<()>(&mut c).await
        })
        .await
    }

    pub async fn del(&self, key: &str) -> Result<(), StoreError> {
        self.query::<i64>(Wait::Background, redis::cmd("DEL").arg(key))
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_under_their_name_and_cluster_key() {
        let sealer = Sealer::new(&[7; 32], b"sessions").unwrap();
        let sealed = sealer.seal("a", b"value").unwrap();
        assert_eq!(sealer.open("a", &sealed).unwrap().as_slice(), b"value");
        assert!(sealer.open("b", &sealed).is_none());
        let other_purpose = Sealer::new(&[7; 32], b"ticket keys").unwrap();
        assert!(other_purpose.open("a", &sealed).is_none());
        let other_key = Sealer::new(&[8; 32], b"sessions").unwrap();
        assert!(other_key.open("a", &sealed).is_none());
        for len in 0..sealed.len() {
            assert!(sealer.open("a", &sealed[..len]).is_none());
        }
        assert!(Sealer::new(&[7; 31], b"x").is_err());
    }
}
