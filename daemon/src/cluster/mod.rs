//! Session resumption that outlives a reload and reaches across nodes: the ticket key ring
//! ([`ticket_keys`]), key files in nginx's and HAProxy's formats ([`key_file`]), keys and
//! sessions shared through Redis ([`shared`] over [`redis`]), and the session cache. One [`Resumption`] serves every listener of the process and survives
//! reloads; a reload changes its settings, not its keys.
//!
//! Key sources (`[resumption] ticket_keys`):
//! * `random` (the default): a random key per `rotate_every_s`, made in this process;
//! * `file`: keys from the operator's files, checked every `key_file_check_ms` and taken
//!   when their contents change, with no reload. A file that stops parsing is logged and
//!   counted, and the keys already loaded stay;
//! * `redis`: one key per rotation epoch for the whole cluster ([`shared`]).
//!
//! A key that stops sealing (rotation, a new file) keeps opening tickets for
//! `ticket_lifetime_s`, then is dropped. docs/cluster.md has the threat model.

pub mod cache;
pub mod key_file;
pub mod redis;
pub mod shared;
pub mod ticket_keys;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use rustls::server::{ProducesTickets, StoresServerSessions};
use zeroize::Zeroizing;

use crate::config::{self, SessionStore, TicketKeySource};
pub use key_file::KeyFileFormat;
use key_file::KeySet;
use redis::{RedisLink, RedisSettings};
use shared::SharedState;
pub use ticket_keys::{KeyAge, KeyInfo, KeyRing, Rejected, TicketKey, MAX_ORIGIN_LEN};

/// Resumption settings, from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub tickets: bool,
    pub source: TicketKeySource,
    /// Absolute paths.
    pub files: Vec<PathBuf>,
    pub format: KeyFileFormat,
    pub check_every: Duration,
    pub lifetime_s: u32,
    /// How long a key that stopped sealing still opens tickets.
    pub window: Duration,
    pub rotate_every: Duration,
    pub cache_size: usize,
    pub node: String,
    pub session_store: SessionStore,
    pub redis: Option<RedisSettings>,
}

impl Settings {
    /// The settings of `[resumption]`; relative key file paths are taken from `base`.
    pub fn from_config(r: &config::Resumption, base: &Path) -> Self {
        Self {
            tickets: *r.tickets.get_ref(),
            source: *r.ticket_keys.get_ref(),
            files: r.key_files.get_ref().iter().map(|f| base.join(f)).collect(),
            format: *r.key_file_format.get_ref(),
            check_every: Duration::from_millis(*r.key_file_check_ms.get_ref()),
            lifetime_s: *r.ticket_lifetime_s.get_ref(),
            window: Duration::from_secs(u64::from(
                *r.retired_key_window_s
                    .as_ref()
                    .unwrap_or(&r.ticket_lifetime_s)
                    .get_ref(),
            )),
            rotate_every: Duration::from_secs(u64::from(*r.rotate_every_s.get_ref())),
            cache_size: *r.cache_size.get_ref() as usize,
            node: r
                .node
                .as_ref()
                .map(|n| n.get_ref().clone())
                .unwrap_or_else(host_name),
            session_store: *r.session_store.get_ref(),
            redis: r.redis.as_ref().map(|redis| RedisSettings {
                url: redis.url.get_ref().clone(),
                password_file: redis.password_file.as_ref().map(|f| base.join(f.get_ref())),
                ca: redis.ca.as_ref().map(|f| base.join(f.get_ref())),
                cluster_key_file: base.join(redis.cluster_key_file.get_ref()),
                prefix: redis.key_prefix.get_ref().clone(),
                timeout: Duration::from_millis(*redis.timeout_ms.get_ref()),
            }),
        }
    }

    fn uses_redis(&self) -> bool {
        self.source == TicketKeySource::Redis || self.session_store == SessionStore::Redis
    }
}

/// Seconds since the Unix epoch (what shared key epochs are cut from).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The host name (what `[resumption] node` defaults to), cut to what a ticket carries.
fn host_name() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = name
        .trim()
        .chars()
        .filter(char::is_ascii_graphic)
        .take(MAX_ORIGIN_LEN)
        .collect();
    if name.is_empty() {
        "tlsaccel".into()
    } else {
        name
    }
}

/// Counters of ticket use.
#[derive(Debug, Default)]
pub struct TicketStats {
    pub issued: AtomicU64,
    pub seal_failures: AtomicU64,
    /// By key age (current, previous) and origin (this node, another node).
    accepted: [[AtomicU64; 2]; 2],
    /// By [`Rejected`] reason.
    rejected: [AtomicU64; 3],
    pub rotations: AtomicU64,
    pub key_file_errors: AtomicU64,
    /// Refreshes of Redis-shared keys that failed (the keys already held stay in use).
    pub shared_key_errors: AtomicU64,
    /// Times a node with no shared key made a key of its own (Redis unreachable at start).
    pub local_fallbacks: AtomicU64,
}

impl TicketStats {
    /// `(key age, from another node, count)` of accepted tickets.
    pub fn accepted(&self) -> Vec<(KeyAge, bool, u64)> {
        let mut out = Vec::new();
        for (a, age) in [KeyAge::Current, KeyAge::Previous].into_iter().enumerate() {
            for (o, other) in [false, true].into_iter().enumerate() {
                out.push((age, other, self.accepted[a][o].load(Ordering::Relaxed)));
            }
        }
        out
    }

    /// `(reason, count)` of refused tickets.
    pub fn rejected(&self) -> Vec<(Rejected, u64)> {
        [Rejected::Malformed, Rejected::UnknownKey, Rejected::BadTag]
            .into_iter()
            .enumerate()
            .map(|(i, r)| (r, self.rejected[i].load(Ordering::Relaxed)))
            .collect()
    }

    fn count_open(&self, result: &Result<ticket_keys::Opened, Rejected>, node: &[u8]) {
        match result {
            Ok(opened) => {
                let a = usize::from(opened.age == KeyAge::Previous);
                let o = usize::from(opened.origin != node);
                self.accepted[a][o].fetch_add(1, Ordering::Relaxed);
            }
            Err(reason) => {
                let i = match reason {
                    Rejected::Malformed => 0,
                    Rejected::UnknownKey => 1,
                    Rejected::BadTag => 2,
                };
                self.rejected[i].fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The process's resumption state: key ring, session cache, counters.
#[derive(Debug)]
pub struct Resumption {
    settings: RwLock<Arc<Settings>>,
    ring: RwLock<KeyRing>,
    /// SHA-256 of the key files' contents last loaded.
    loaded_files: Mutex<Option<Vec<u8>>>,
    cache: RwLock<(usize, Arc<dyn StoresServerSessions>)>,
    /// Redis and what goes through it, when the settings use it (fixed at start).
    pub shared: Option<Arc<SharedState>>,
    pub stats: TicketStats,
}

fn cache_of(size: usize) -> Arc<dyn StoresServerSessions> {
    match std::num::NonZeroUsize::new(size) {
        None => Arc::new(rustls::server::NoServerSessionStorage {}),
        Some(size) => Arc::new(cache::SessionCache::new(size)),
    }
}

/// A reload's resumption settings, checked and with their key files read, not yet in use
/// ([`Resumption::prepare`]).
#[derive(Debug)]
pub struct Prepared {
    settings: Settings,
    files: Option<(Vec<u8>, KeySet)>,
    /// Whether handshakes will look sessions up in Redis (and so must run on fibers).
    pub shares_sessions: bool,
}

/// Reads and parses the key files of `settings`; returns their digest and keys.
fn read_keys(settings: &Settings) -> anyhow::Result<(Vec<u8>, KeySet)> {
    use anyhow::Context as _;
    let mut contents = Vec::with_capacity(settings.files.len());
    let mut digest = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for file in &settings.files {
        let bytes = Zeroizing::new(
            std::fs::read(file).with_context(|| format!("reading {}", file.display()))?,
        );
        digest.update(&(bytes.len() as u64).to_be_bytes());
        digest.update(&bytes);
        contents.push(bytes);
    }
    let set = match settings.format {
        KeyFileFormat::Nginx => key_file::nginx_set(&contents).map_err(|(i, e)| {
            anyhow::anyhow!("ticket key file {}: {e}", settings.files[i].display())
        })?,
        KeyFileFormat::Haproxy => key_file::parse_haproxy(&contents[0])
            .map_err(|e| anyhow::anyhow!("ticket key file {}: {e}", settings.files[0].display()))?,
    };
    Ok((digest.finish().as_ref().to_vec(), set))
}

impl Resumption {
    /// Sets up resumption with its first keys. Fails when a key file cannot be used. With
    /// Redis in the settings, it must run in the tokio runtime, and the first shared keys
    /// come from [`Self::refresh_shared`].
    pub fn new(settings: Settings) -> anyhow::Result<Arc<Self>> {
        let cache = cache_of(settings.cache_size);
        let shared = match &settings.redis {
            Some(redis) if settings.uses_redis() => {
                let cluster_key = redis::read_cluster_key(&redis.cluster_key_file)?;
                Some(SharedState::start(RedisLink::new(redis)?, &cluster_key)?)
            }
            _ => None,
        };
        let this = Arc::new(Self {
            shared,
            cache: RwLock::new((settings.cache_size, cache)),
            settings: RwLock::new(Arc::new(settings)),
            ring: RwLock::new(KeyRing::default()),
            loaded_files: Mutex::new(None),
            stats: TicketStats::default(),
        });
        this.refresh(Instant::now(), true)?;
        Ok(this)
    }

    /// Takes new settings (a reload): [`Self::prepare`], then [`Self::commit`].
    pub fn reconfigure(&self, settings: Settings) -> anyhow::Result<()> {
        let prepared = self.prepare(settings)?;
        self.commit(prepared);
        Ok(())
    }

    /// Checks a reload's settings and reads their key files, changing nothing: a reload
    /// that fails later (another section) leaves resumption as it was.
    pub fn prepare(&self, settings: Settings) -> anyhow::Result<Prepared> {
        let old = self.settings();
        let redis_of = |s: &Settings| s.uses_redis().then(|| s.redis.clone());
        anyhow::ensure!(
            redis_of(&old) == redis_of(&settings)
                && (old.source == TicketKeySource::Redis)
                    == (settings.source == TicketKeySource::Redis),
            "changing what goes through Redis, or the Redis settings, needs a restart"
        );
        let files = if settings.source == TicketKeySource::File {
            Some(read_keys(&settings)?)
        } else {
            None
        };
        Ok(Prepared {
            shares_sessions: self.shared.is_some() && settings.session_store == SessionStore::Redis,
            settings,
            files,
        })
    }

    /// Puts prepared settings in use; it cannot fail. The keys already in the ring stay (a
    /// source that changes retires them as rotation does), and the session cache stays
    /// unless its size changed.
    pub fn commit(&self, prepared: Prepared) {
        let Prepared {
            settings, files, ..
        } = prepared;
        {
            let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
            if cache.0 != settings.cache_size {
                *cache = (settings.cache_size, cache_of(settings.cache_size));
            }
        }
        let changed_source = self.settings().source != settings.source;
        let window = settings.window;
        *self.settings.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(settings);
        let now = Instant::now();
        match files {
            Some((digest, set)) => self.take_key_set(digest, set, now, window),
            None => {
                *self.loaded_files.lock().unwrap_or_else(|e| e.into_inner()) = None;
                if let Err(error) = self.refresh(now, changed_source) {
                    tracing::error!(
                        error = format!("{error:#}"),
                        "ticket keys not refreshed; the keys loaded before stay in use"
                    );
                }
            }
        }
    }

    fn settings(&self) -> Arc<Settings> {
        Arc::clone(&self.settings.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn ring(&self) -> std::sync::RwLockReadGuard<'_, KeyRing> {
        self.ring.read().unwrap_or_else(|e| e.into_inner())
    }

    fn ring_mut(&self) -> std::sync::RwLockWriteGuard<'_, KeyRing> {
        self.ring.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Brings the ring up to date at `now`: rotates a random key that is due (or when
    /// `new_random` asks), takes key files that changed, drops keys past their window. A
    /// key file that fails is an error (logged and counted by [`Self::maintain`]).
    fn refresh(&self, now: Instant, new_random: bool) -> anyhow::Result<()> {
        let settings = self.settings();
        let window = settings.window;
        let result = match settings.source {
            TicketKeySource::Random => {
                let due = self.ring().current_since().is_none_or(|since| {
                    now.saturating_duration_since(since) >= settings.rotate_every
                });
                if due || new_random {
                    let key = TicketKey::random()?;
                    let mut ring = self.ring_mut();
                    ring.install(key, now, window);
                    ring.set_listed(Vec::new(), now, window);
                    self.stats.rotations.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
            TicketKeySource::File => self.take_files(&settings, now, window),
            // Refreshed by `refresh_shared`.
            TicketKeySource::Redis => Ok(()),
        };
        self.ring_mut().expire(now);
        result
    }

    fn take_files(
        &self,
        settings: &Settings,
        now: Instant,
        window: Duration,
    ) -> anyhow::Result<()> {
        let (digest, set) = read_keys(settings)?;
        self.take_key_set(digest, set, now, window);
        Ok(())
    }

    /// Puts the keys of files whose contents hash to `digest` in the ring, unless those
    /// are the contents loaded last.
    fn take_key_set(&self, digest: Vec<u8>, set: KeySet, now: Instant, window: Duration) {
        let mut loaded = self.loaded_files.lock().unwrap_or_else(|e| e.into_inner());
        if loaded.as_deref() == Some(digest.as_slice()) {
            return;
        }
        let mut ring = self.ring_mut();
        let before = ring.current_id();
        ring.install(set.sealing, now, window);
        ring.set_listed(set.others, now, window);
        if ring.current_id() != before {
            self.stats.rotations.fetch_add(1, Ordering::Relaxed);
        }
        drop(ring);
        tracing::info!("session ticket keys loaded from their files");
        *loaded = Some(digest);
    }

    /// One maintenance pass (what the background task runs).
    pub fn maintain(&self, now: Instant) {
        if let Err(error) = self.refresh(now, false) {
            self.stats.key_file_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                error = format!("{error:#}"),
                "ticket keys not refreshed; the keys loaded before stay in use"
            );
        }
    }

    /// Brings Redis-shared keys up to date at Unix time `unix`: fetches (or makes) the keys
    /// of the current and the next epoch that this node does not have, seals with the
    /// current epoch's key, drops keys past their window. When Redis cannot be reached the
    /// keys already held stay in use; a node that holds none makes a key of its own so its
    /// own tickets still resume.
    pub async fn refresh_shared(&self, unix: u64, now: Instant) {
        self.refresh_shared_keys(unix, now, true).await;
    }

    /// At start: the cluster's keys before the first handshake, asking Redis again for up
    /// to `patience` (a node that started while Redis was slow would otherwise seal with a
    /// key of its own until its next refresh, and not open other nodes' tickets).
    pub async fn first_shared_keys(&self, patience: Duration) {
        if self.shared.is_none() || self.settings().source != TicketKeySource::Redis {
            return;
        }
        let deadline = Instant::now() + patience;
        while Instant::now() < deadline {
            if self
                .refresh_shared_keys(unix_now(), Instant::now(), false)
                .await
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.refresh_shared(unix_now(), Instant::now()).await;
    }

    /// Returns true when the current epoch's key is the sealing key afterwards.
    async fn refresh_shared_keys(&self, unix: u64, now: Instant, fallback: bool) -> bool {
        let Some(shared) = &self.shared else {
            return false;
        };
        let settings = self.settings();
        if settings.source != TicketKeySource::Redis {
            return false;
        }
        let window = settings.window;
        let period = settings.rotate_every.as_secs().max(1);
        let ttl = Duration::from_secs(2 * period + 60) + window;
        let current = shared::epoch(unix, period);
        let held = |e: u64| {
            shared
                .known
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&e)
                .cloned()
        };
        let mut answered = true;
        for want in [current, current + 1] {
            if held(want).is_some() {
                continue;
            }
            match shared.epoch_key(period, want, ttl).await {
                Ok((key, h)) => self.take_epoch_key(shared, current, want, key, h, now),
                Err(error) => {
                    self.shared_key_error(&error, want);
                    answered = false;
                    break;
                }
            }
        }
        if answered && !shared.past_loaded.load(Ordering::Relaxed) {
            answered = self.load_past_keys(shared, unix, period, now).await;
            shared.past_loaded.store(answered, Ordering::Relaxed);
        }
        let every = Duration::from_secs((period / 4).clamp(1, 30));
        let check_due = shared
            .last_check
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none_or(|at| now.saturating_duration_since(at) >= every);
        if answered && check_due {
            self.check_held_keys(shared, current, period, ttl, now)
                .await;
        }
        let mut ring = self.ring_mut();
        if let Some(h) = held(current) {
            if ring.current_id() != Some(h.id) && ring.promote(h.id, now, window) {
                self.stats.rotations.fetch_add(1, Ordering::Relaxed);
            }
        }
        let sealing_shared = held(current).is_some_and(|h| ring.current_id() == Some(h.id));
        // No shared key for this epoch a grace period into it (Redis down or spoilt): a key
        // of this node's own, so rotation goes on and no key seals for longer than a period
        // and the grace.
        let grace = (period / 4).clamp(1, 60);
        let mut own = shared
            .own_key_epoch
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let stale = !sealing_shared
            && *own != Some(current)
            && unix.saturating_sub(current * period) >= grace;
        if fallback && (ring.current_id().is_none() || stale) {
            match TicketKey::random() {
                Ok(key) => {
                    ring.install(key, now, window);
                    *own = Some(current);
                    self.stats.local_fallbacks.fetch_add(1, Ordering::Relaxed);
                    self.stats.rotations.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        epoch = current,
                        "no shared ticket key for this epoch: sealing with a key of this node's own until Redis answers"
                    );
                }
                Err(error) => tracing::error!(%error, "no ticket key"),
            }
        }
        drop(own);
        ring.expire(now);
        drop(ring);
        shared
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|&e, _| e + 2 >= current);
        sealing_shared
    }

    fn shared_key_error(&self, error: &shared::SharedError, epoch: u64) {
        self.stats.shared_key_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%error, epoch, "shared ticket key not refreshed; the keys held stay in use");
    }

    /// Puts the key of epoch `want` in the ring: it seals when `want` is the current epoch,
    /// it is listed when it is the next one.
    fn take_epoch_key(
        &self,
        shared: &SharedState,
        current: u64,
        want: u64,
        key: TicketKey,
        held: shared::Held,
        now: Instant,
    ) {
        let window = self.settings().window;
        shared
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(want, held);
        let mut ring = self.ring_mut();
        if want == current {
            ring.install(key, now, window);
            self.stats.rotations.fetch_add(1, Ordering::Relaxed);
        } else {
            ring.set_listed(vec![key], now, window);
        }
    }

    /// The keys of the past epochs whose tickets still resume (within the window after
    /// their epoch ended), for opening only. Returns false when Redis did not answer.
    async fn load_past_keys(
        &self,
        shared: &SharedState,
        unix: u64,
        period: u64,
        now: Instant,
    ) -> bool {
        /// Past epochs asked for at most (a window of many short periods).
        const MOST: u64 = 16;
        let window_s = self.settings().window.as_secs();
        let current = shared::epoch(unix, period);
        let back = (window_s.div_ceil(period) + 1).min(MOST).min(current);
        for past in current - back..current {
            let open_for = ((past + 1) * period + window_s).saturating_sub(unix);
            if open_for == 0 {
                continue;
            }
            match shared.past_key(period, past).await {
                Ok(Some((key, _))) => self
                    .ring_mut()
                    .keep_until(key, now + Duration::from_secs(open_for)),
                Ok(None) => {}
                Err(error) => {
                    self.shared_key_error(&error, past);
                    return false;
                }
            }
        }
        true
    }

    /// Checks the current and next epochs' keys against Redis (see [`shared`]).
    async fn check_held_keys(
        &self,
        shared: &SharedState,
        current: u64,
        period: u64,
        ttl: Duration,
        now: Instant,
    ) {
        for epoch in [current, current + 1] {
            let Some(held) = shared
                .known
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&epoch)
                .cloned()
            else {
                continue;
            };
            match shared.check_key(period, epoch, &held, ttl).await {
                Ok(shared::Checked::Same) => {}
                Ok(shared::Checked::Restored) => {
                    tracing::info!(epoch, "Redis had lost a shared ticket key; written back")
                }
                Ok(shared::Checked::Replaced(key, h)) => {
                    tracing::warn!(
                        epoch,
                        "Redis holds another ticket key for this epoch (made while it had lost this one); taking it"
                    );
                    self.take_epoch_key(shared, current, epoch, key, h, now);
                }
                Err(error) => {
                    self.shared_key_error(&error, epoch);
                    return;
                }
            }
        }
        *shared.last_check.lock().unwrap_or_else(|e| e.into_inner()) = Some(now);
    }

    /// Runs [`Self::maintain`] in the background until `self` is dropped.
    pub fn spawn_maintenance(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let every = match weak.upgrade() {
                    Some(this) => {
                        let s = this.settings();
                        match s.source {
                            TicketKeySource::File => s.check_every,
                            TicketKeySource::Random | TicketKeySource::Redis => {
                                Duration::from_secs(1)
                            }
                        }
                    }
                    None => return,
                };
                tokio::time::sleep(every).await;
                let Some(this) = weak.upgrade() else { return };
                if this.settings().source == TicketKeySource::File {
                    // Reading files may block (a slow or network disk): not on a worker.
                    let files = Arc::clone(&this);
                    let _ =
                        tokio::task::spawn_blocking(move || files.maintain(Instant::now())).await;
                } else {
                    this.maintain(Instant::now());
                }
                this.refresh_shared(unix_now(), Instant::now()).await;
            }
        })
    }

    /// The ticketer every listener's `ServerConfig` uses.
    pub fn ticketer(self: &Arc<Self>) -> Arc<dyn ProducesTickets> {
        Arc::new(Ticketer(Arc::clone(self)))
    }

    /// The session cache every listener's `ServerConfig` uses: it follows the cache a
    /// reload installs.
    pub fn session_storage(self: &Arc<Self>) -> Arc<dyn StoresServerSessions> {
        Arc::new(Sessions(Arc::clone(self)))
    }

    fn cache(&self) -> Arc<dyn StoresServerSessions> {
        Arc::clone(&self.cache.read().unwrap_or_else(|e| e.into_inner()).1)
    }

    /// The keys in the ring (ids and ages only).
    pub fn key_info(&self) -> Vec<KeyInfo> {
        self.ring().info(Instant::now())
    }

    /// True when sessions are looked up in Redis (handshakes then run on fibers, which can
    /// wait for it).
    pub fn shares_sessions(&self) -> bool {
        self.shared.is_some() && self.settings().session_store == SessionStore::Redis
    }

    /// This node's name in its tickets.
    pub fn node(&self) -> String {
        self.settings().node.clone()
    }
}

/// Length of the session ids and stateful tickets rustls makes (random bytes).
const SESSION_ID_LEN: usize = 32;

/// Redis lookups one handshake step (one ClientHello) may wait for. A TLS 1.3 client may
/// offer many identities, and rustls takes each from the store in turn: past the first, only
/// this node's cache is looked at, so a hostile hello costs one round trip, not hundreds.
const REMOTE_LOOKUPS_PER_HELLO: u32 = 1;

/// rustls' view of the session cache.
#[derive(Debug)]
struct Sessions(Arc<Resumption>);

impl Sessions {
    /// The store in Redis, when sessions are shared.
    fn shared(&self) -> Option<&Arc<SharedState>> {
        let shared = self.0.shared.as_ref()?;
        (self.0.settings().session_store == SessionStore::Redis).then_some(shared)
    }

    /// Looks `key` up in Redis, pausing the handshake's fiber for at most the Redis timeout.
    /// Off a fiber (nothing can wait there) it is a miss.
    fn remote(
        &self,
        shared: &Arc<SharedState>,
        key: &[u8],
        take: bool,
    ) -> Result<Option<Vec<u8>>, ()> {
        let stats = &shared.sessions;
        if key.len() != SESSION_ID_LEN {
            // Not an id this cluster makes: nothing to ask Redis for.
            return Ok(None);
        }
        if !tlsaccel_fiber::in_fiber() {
            stats.local_only.fetch_add(1, Ordering::Relaxed);
            return Err(());
        }
        if !tlsaccel_fiber::within_allowance(REMOTE_LOOKUPS_PER_HELLO) {
            // A ClientHello offering many identities: Redis is asked for the first only.
            stats.over_allowance.fetch_add(1, Ordering::Relaxed);
            return Err(());
        }
        let work = Arc::clone(shared).fetch_session(key.to_vec(), take);
        #[allow(unsafe_code)]
        // SAFETY: called from rustls' session lookup inside the handshake (see
        // `handshake::PkeEngine::run_on_fiber` for the same argument): this function holds
        // no guard or thread-bound value across the call (`work` owns its inputs), and
        // rustls keeps only its own `Send` state on the fiber's stack.
        let result = unsafe { tlsaccel_fiber::suspend_until(work) };
        match result {
            Ok(Ok(Some(value))) => {
                stats.remote_hits.fetch_add(1, Ordering::Relaxed);
                Ok(Some(value))
            }
            Ok(Ok(None)) => Ok(None),
            Ok(Err(_)) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                Err(())
            }
            Err(_) => {
                stats.local_only.fetch_add(1, Ordering::Relaxed);
                Err(())
            }
        }
    }
}

impl StoresServerSessions for Sessions {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        if let Some(shared) = self.shared() {
            let ttl = Duration::from_secs(u64::from(self.0.settings().lifetime_s));
            shared.put_session(&key, &value, ttl);
        }
        self.0.cache().put(key, value)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let local = self.0.cache().get(key);
        let Some(shared) = self.shared() else {
            return local;
        };
        if local.is_some() {
            shared.sessions.local_hits.fetch_add(1, Ordering::Relaxed);
            return local;
        }
        let found = self.remote(shared, key, false).ok().flatten();
        if found.is_none() {
            shared.sessions.misses.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    /// Single use: taken from this node's cache and from Redis. A session Redis no longer
    /// has (another node took it, or its write is still queued) resumes here only if this
    /// node's cache still held it.
    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        let local = self.0.cache().take(key);
        let Some(shared) = self.shared() else {
            return local;
        };
        let found = match self.remote(shared, key, true) {
            Ok(Some(value)) => Some(value),
            Ok(None) | Err(()) => {
                if local.is_some() {
                    shared.sessions.local_hits.fetch_add(1, Ordering::Relaxed);
                }
                local
            }
        };
        if found.is_none() {
            shared.sessions.misses.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    fn can_cache(&self) -> bool {
        self.0.cache().can_cache()
    }
}

/// rustls' view of the ring.
#[derive(Debug)]
struct Ticketer(Arc<Resumption>);

impl ProducesTickets for Ticketer {
    fn enabled(&self) -> bool {
        self.0.settings().tickets
    }

    fn lifetime(&self) -> u32 {
        self.0.settings().lifetime_s
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let node = self.0.settings();
        let ticket = self.0.ring().seal(node.node.as_bytes(), plain);
        let counter = if ticket.is_some() {
            &self.0.stats.issued
        } else {
            &self.0.stats.seal_failures
        };
        counter.fetch_add(1, Ordering::Relaxed);
        ticket
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let settings = self.0.settings();
        let opened = self.0.ring().open(cipher, Instant::now());
        self.0.stats.count_open(&opened, settings.node.as_bytes());
        opened.ok().map(|o| o.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(source: TicketKeySource, files: Vec<PathBuf>) -> Settings {
        Settings {
            tickets: true,
            source,
            files,
            format: KeyFileFormat::Nginx,
            check_every: Duration::from_millis(100),
            lifetime_s: 60,
            window: Duration::from_secs(60),
            rotate_every: Duration::from_secs(30),
            cache_size: 16,
            node: "a".into(),
            session_store: SessionStore::Memory,
            redis: None,
        }
    }

    fn scratch(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("tlsaccel-cluster-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn random_keys_rotate_when_due_and_old_tickets_open_for_the_lifetime() {
        let r = Resumption::new(settings(TicketKeySource::Random, vec![])).unwrap();
        let t = Ticketer(Arc::clone(&r));
        let ticket = t.encrypt(b"state").unwrap();
        let start = r.ring().current_since().unwrap();
        r.maintain(start + Duration::from_secs(29));
        assert_eq!(r.stats.rotations.load(Ordering::Relaxed), 1);
        r.maintain(start + Duration::from_secs(30));
        assert_eq!(r.stats.rotations.load(Ordering::Relaxed), 2);
        assert_eq!(r.key_info().len(), 2);
        // Sealed under the previous key, opened within its window: counted as such.
        assert_eq!(t.decrypt(&ticket).as_deref(), Some(&b"state"[..]));
        assert!(r.stats.accepted().contains(&(KeyAge::Previous, false, 1)));
        // The window (60 s) after the rotation has passed: a full handshake.
        r.maintain(start + Duration::from_secs(91));
        assert_eq!(t.decrypt(&ticket), None);
        assert!(r.stats.rejected().contains(&(Rejected::UnknownKey, 1)));
    }

    #[test]
    fn a_changed_key_file_is_taken_without_a_reload_and_a_broken_one_is_ignored() {
        let dir = scratch("files");
        let file = dir.join("ticket.key");
        std::fs::write(&file, [1u8; 80]).unwrap();
        let r = Resumption::new(settings(TicketKeySource::File, vec![file.clone()])).unwrap();
        let t = Ticketer(Arc::clone(&r));
        let old = t.encrypt(b"old").unwrap();
        std::fs::write(&file, [2u8; 80]).unwrap();
        r.maintain(Instant::now());
        assert_eq!(r.ring().current_id(), Some([2u8; 16]));
        assert_eq!(t.decrypt(&old).as_deref(), Some(&b"old"[..]));
        // A truncated file: counted, logged, and the keys stay.
        std::fs::write(&file, [3u8; 20]).unwrap();
        r.maintain(Instant::now());
        assert_eq!(r.stats.key_file_errors.load(Ordering::Relaxed), 1);
        assert_eq!(r.ring().current_id(), Some([2u8; 16]));
        // A node given the same file opens this node's tickets and says where they came from.
        std::fs::write(&file, [2u8; 80]).unwrap();
        let mut other = settings(TicketKeySource::File, vec![file]);
        other.node = "b".into();
        let b = Resumption::new(other).unwrap();
        let tb = Ticketer(Arc::clone(&b));
        let from_a = t.encrypt(b"from a").unwrap();
        assert_eq!(tb.decrypt(&from_a).as_deref(), Some(&b"from a"[..]));
        assert!(b.stats.accepted().contains(&(KeyAge::Current, true, 1)));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_reload_keeps_the_keys_and_refuses_a_broken_file() {
        let dir = scratch("reload");
        let file = dir.join("ticket.key");
        std::fs::write(&file, [4u8; 48]).unwrap();
        let r = Resumption::new(settings(TicketKeySource::Random, vec![])).unwrap();
        let t = Ticketer(Arc::clone(&r));
        let ticket = t.encrypt(b"s").unwrap();
        let storage = r.session_storage();
        assert!(storage.put(b"id".to_vec(), b"session".to_vec()));
        // Same settings again: same key, same cache.
        r.reconfigure(settings(TicketKeySource::Random, vec![]))
            .unwrap();
        assert_eq!(r.key_info().len(), 1);
        assert_eq!(storage.get(b"id").as_deref(), Some(&b"session"[..]));
        // Another size: a new cache, which the same handle now reaches.
        let mut smaller = settings(TicketKeySource::Random, vec![]);
        smaller.cache_size = 8;
        r.reconfigure(smaller).unwrap();
        assert_eq!(storage.get(b"id"), None);
        // A broken file fails the reload and changes nothing.
        std::fs::write(dir.join("bad.key"), b"short").unwrap();
        assert!(r
            .reconfigure(settings(TicketKeySource::File, vec![dir.join("bad.key")]))
            .is_err());
        assert_eq!(r.settings().source, TicketKeySource::Random);
        // Moving to a file: its key seals, the random key still opens.
        r.reconfigure(settings(TicketKeySource::File, vec![file]))
            .unwrap();
        assert_eq!(r.ring().current_id(), Some([4u8; 16]));
        assert_eq!(t.decrypt(&ticket).as_deref(), Some(&b"s"[..]));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn with_no_shared_key_a_node_rotates_keys_of_its_own_after_a_grace() {
        let dir = scratch("grace");
        std::fs::write(dir.join("cluster.key"), [9u8; 32]).unwrap();
        let mut s = settings(TicketKeySource::Redis, vec![]);
        s.rotate_every = Duration::from_secs(40);
        // Nothing listens on port 1: every Redis call fails at once.
        s.redis = Some(RedisSettings {
            url: "redis://127.0.0.1:1".into(),
            password_file: None,
            ca: None,
            cluster_key_file: dir.join("cluster.key"),
            prefix: "t:".into(),
            timeout: Duration::from_millis(100),
        });
        let r = Resumption::new(s).unwrap();
        let t = Ticketer(Arc::clone(&r));
        let now = Instant::now();
        let epoch = 1_000u64 * 40;
        r.refresh_shared(epoch, now).await;
        let first = r.ring().current_id().expect("a key of its own at once");
        let ticket = t.encrypt(b"s").unwrap();
        // Still the same epoch, then the next one within its grace (a quarter period):
        // the key stays.
        r.refresh_shared(epoch + 39, now).await;
        r.refresh_shared(epoch + 40 + 9, now).await;
        assert_eq!(r.ring().current_id(), Some(first));
        // Past the grace: a new key of its own; the old one still opens.
        r.refresh_shared(epoch + 40 + 10, now).await;
        assert_ne!(r.ring().current_id(), Some(first));
        assert_eq!(r.stats.local_fallbacks.load(Ordering::Relaxed), 2);
        assert!(r.stats.shared_key_errors.load(Ordering::Relaxed) >= 4);
        assert_eq!(t.decrypt(&ticket).as_deref(), Some(&b"s"[..]));
        // Once per epoch only.
        r.refresh_shared(epoch + 40 + 30, now).await;
        assert_eq!(r.stats.local_fallbacks.load(Ordering::Relaxed), 2);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_missing_key_file_fails_the_start() {
        let error = Resumption::new(settings(
            TicketKeySource::File,
            vec![PathBuf::from("/nonexistent/ticket.key")],
        ))
        .unwrap_err();
        assert!(
            format!("{error:#}").contains("/nonexistent/ticket.key"),
            "{error:#}"
        );
    }
}
