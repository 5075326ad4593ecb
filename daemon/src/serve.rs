//! `tlsaccel serve`: the server's lifecycle — start (devices, listeners, admin endpoint),
//! reload and drain — and the state connections share.
//!
//! A connection goes through: accept ([`crate::listen`]: listener limit, TCP options) →
//! handshake ([`crate::tls`]) → route ([`crate::route`]) and connect ([`crate::pool`]) → the
//! record session ([`crate::session`]) driven by the pump ([`crate::pump`]) until both sides
//! have closed; [`crate::connection`] strings these together.
//!
//! What a reload can change: certificates, TLS settings, pools, routes, timeouts and the
//! offload policy. Listener addresses, devices and the admin address are fixed at start.
//! Connections keep the settings they started with.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::sync::Semaphore;

use crate::cluster::Resumption;
use crate::config::Config;
use crate::handshake::{device_provider, PkeEngine};
use crate::metrics::LabelledCounter;
use crate::offload::{Offload, QueueSettings};
use crate::pool::Pool;
use crate::record::{Policy, RecordDevice, RecordStats};
use crate::route::RouteRule;
use crate::session::Limits;
use crate::tls::ListenerTls;
use tlsaccel_driver::Device;

/// How long a device job may take before the record layer gives up on it.
const JOB_TIMEOUT: Duration = Duration::from_secs(2);

/// Counters of the daemon as a whole.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub connections_accepted: AtomicU64,
    pub connections_active: AtomicU64,
    pub connections_closed: AtomicU64,
    /// Handshakes by `full|resumed`, version and suite (`full TLSv1_3 TLS13_AES_128_GCM_SHA256`).
    pub handshakes: LabelledCounter,
    /// Failed handshakes by reason.
    pub handshake_failures: LabelledCounter,
    /// Alerts sent, by description.
    pub alerts_sent: LabelledCounter,
    /// PROXY protocol headers from clients: `accepted`, or why one was refused (`untrusted`
    /// source, `invalid` header, `missing` from a trusted source, `timeout`).
    pub proxy_headers: LabelledCounter,
    /// Client certificates on listeners that ask for them: `verified`, `none` (optional),
    /// or the alert that refused the client (`certificate_required`, `certificate_revoked`,
    /// `unknown_ca`, ...; during the handshake, when it is also a handshake failure, or
    /// after it, for a resumed session).
    pub client_certificates: LabelledCounter,
    /// Access-rule decisions (`allow`, `deny`): per connection in L4 mode, per request in
    /// HTTP mode.
    pub acl_decisions: LabelledCounter,
    /// Rebuilds of a listener's client-certificate verifier after its CA or CRL files
    /// changed: `ok`, or `failed` (the old one stays).
    pub client_auth_reloads: LabelledCounter,
    /// HTTP mode: responses by status class (`2xx`...), the proxy's own included.
    pub http_responses: LabelledCounter,
    /// HTTP mode: requests a backend did not answer (`connect`, `exchange`).
    pub http_backend_errors: LabelledCounter,
    /// HTTP mode: requests an inspection rule refused, by rule.
    pub http_refused: LabelledCounter,
    /// Connections closed because no backend could be reached.
    pub backend_unavailable: AtomicU64,
    /// Connections with no route and no default pool.
    pub unrouted: AtomicU64,
    pub idle_timeouts: AtomicU64,
    /// Connections ended because the client took none of our bytes for the idle timeout.
    pub client_write_stalls: AtomicU64,
    /// The same for the backend.
    pub backend_write_stalls: AtomicU64,
    pub renegotiations_refused: AtomicU64,
    /// Client bytes dropped because the backend had stopped reading (it closed its side,
    /// e.g. after refusing a request, and its answer was still delivered).
    pub client_bytes_dropped: AtomicU64,
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
    pub bytes_client_to_backend: AtomicU64,
    pub bytes_backend_to_client: AtomicU64,
}

/// A listener's settings that a reload may change.
#[derive(Debug)]
pub struct ListenerState {
    pub name: String,
    /// `None`: a plain-HTTP listener.
    pub tls: Option<ListenerTls>,
    /// HTTP mode: the priority level every request here has (an index into
    /// [`State::levels`]), whoever the client.
    pub priority: Option<usize>,
    /// HTTP mode: the inspection rules.
    pub inspect: Option<crate::inspect::Rules>,
    /// HTTP mode: the response cache (emptied by a reload).
    pub cache: Option<crate::cache::ResponseCache>,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub default_pool: Option<String>,
    pub keepalive: Option<Duration>,
    /// HTTP mode: requests are served here and routed one by one.
    pub http: bool,
    /// Sources whose connections start with a PROXY header.
    pub proxy_from: crate::proxy_protocol::Trusted,
    /// Who may use the default pool.
    pub acl: Option<Arc<crate::acl::Acl>>,
}

/// Everything a reload replaces.
#[derive(Debug)]
pub struct State {
    pub listeners: HashMap<String, Arc<ListenerState>>,
    pub pools: HashMap<String, Arc<Pool>>,
    /// HTTP mode's priority levels.
    pub levels: Arc<crate::admission::Levels>,
    /// HTTP mode's buffers for held request bodies.
    pub buffers: Arc<crate::buffers::BufferPool>,
    pub routes: Vec<RouteRule>,
    pub policy: Policy,
    pub rekey_after: u64,
    /// What a client may send without data.
    pub limits: Limits,
    pub drain_timeout: Duration,
}

/// The parts that live as long as the daemon.
#[derive(Debug)]
pub struct Shared {
    pub device: Option<Arc<Device>>,
    pub pke: Option<Arc<PkeEngine>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// The device's record queues and its recovery manager.
    pub offload: Option<Arc<Offload>>,
    /// Ticket keys and the session cache, kept across reloads.
    pub resumption: Arc<Resumption>,
    /// The audit log (`[audit]`; its settings need a restart, SIGHUP reopens its file).
    pub audit: Option<crate::audit::Audit>,
    pub records: RecordStats,
    pub stats: ServerStats,
    state: RwLock<Arc<State>>,
    draining: AtomicBool,
    pub(crate) drained: tokio::sync::Notify,
    pub(crate) next_id: AtomicU64,
    config_file: Option<PathBuf>,
    pub started: Instant,
}

impl Shared {
    /// The settings now in force.
    pub fn state(&self) -> Arc<State> {
        Arc::clone(&self.state.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// True once a drain has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The record queue for connection queue number `number` now (see [`Offload::queue`]).
    pub fn record_device(&self, number: usize) -> Option<RecordDevice> {
        self.offload.as_ref()?.queue(number)
    }
}

/// How often listeners' client CA and CRL files are looked at for changes.
const CLIENT_AUTH_CHECK: Duration = Duration::from_secs(1);

/// Gives each listener that asks for client certificates a new verifier when its CA or CRL
/// files change (connections already made keep theirs); ends with the daemon.
async fn watch_client_auth(shared: std::sync::Weak<Shared>) {
    let mut tick = tokio::time::interval(CLIENT_AUTH_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let state = shared.state();
        for (name, listener) in &state.listeners {
            let Some(tls) = &listener.tls else {
                continue;
            };
            match tls.reload_client_auth() {
                None => {}
                Some(Ok(())) => {
                    shared.stats.client_auth_reloads.inc("ok");
                    tracing::info!(listener = %name, "client CA/CRL files read again");
                }
                Some(Err(error)) => {
                    shared.stats.client_auth_reloads.inc("failed");
                    tracing::error!(
                        listener = %name,
                        error = %format!("{error:#}"),
                        "client CA/CRL files unusable; the verifier in use stays"
                    );
                }
            }
        }
    }
}

/// A running daemon.
#[derive(Debug)]
pub struct Server {
    pub shared: Arc<Shared>,
    /// Bound listener addresses, by listener name.
    pub listeners: Vec<(String, SocketAddr)>,
    /// The admin endpoint's address.
    pub admin: Option<SocketAddr>,
    accept_tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// Opens the devices, binds the listeners and the admin endpoint and starts serving on
    /// the current (multi-threaded) runtime. `config_file` is what SIGHUP reloads.
    pub async fn start(config: Config, config_file: Option<PathBuf>) -> anyhow::Result<Self> {
        let base = config_file
            .as_deref()
            .and_then(Path::parent)
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let mut device = None;
        for section in &config.devices {
            match Device::open(section.address.get_ref()) {
                Ok(d) => {
                    tracing::info!(device = %d.info().name, "device opened");
                    device = Some((d, *section.queues.get_ref()));
                    break;
                }
                Err(error) => tracing::error!(
                    address = %section.address.get_ref(),
                    %error,
                    "device unavailable; trying the next"
                ),
            }
        }
        if device.is_none() && !config.devices.is_empty() {
            tracing::warn!("no configured device could be opened: all crypto runs on the CPU");
        }
        let mut pke = None;
        let mut offload = None;
        let provider = match &device {
            Some((d, queues)) => {
                let engine = PkeEngine::new(Arc::clone(d))?;
                let provider = device_provider(&engine);
                pke = Some(Arc::clone(&engine));
                let settings = QueueSettings {
                    count: *queues as usize,
                    batch_max: *config.offload.batch_max.get_ref() as usize,
                    batch_latency: Duration::from_micros(u64::from(
                        *config.offload.batch_latency_us.get_ref(),
                    )),
                    job_timeout: JOB_TIMEOUT,
                };
                let made = Offload::new(Arc::clone(d), Some(engine), settings);
                made.spawn_manager();
                offload = Some(made);
                provider
            }
            None => rustls::crypto::aws_lc_rs::default_provider(),
        };
        let provider = Arc::new(provider);
        let resumption = Resumption::new(crate::cluster::Settings::from_config(
            &config.resumption,
            &base,
        ))
        .context("session resumption")?;
        // The cluster's keys before the first handshake, if Redis answers within 3 s.
        resumption.first_shared_keys(Duration::from_secs(3)).await;
        resumption.spawn_maintenance();
        let state = build_state(
            &config,
            &base,
            &provider,
            pke.is_some(),
            &resumption,
            resumption.shares_sessions(),
        )?;
        let shared = Arc::new(Shared {
            device: device.map(|(d, _)| d),
            pke,
            provider,
            offload,
            resumption,
            audit: config
                .audit
                .as_ref()
                .map(|settings| crate::audit::Audit::start(settings, &base)),
            records: RecordStats::default(),
            stats: ServerStats::default(),
            state: RwLock::new(Arc::new(state)),
            draining: AtomicBool::new(false),
            drained: tokio::sync::Notify::new(),
            next_id: AtomicU64::new(1),
            config_file,
            started: Instant::now(),
        });
        tokio::spawn(watch_client_auth(Arc::downgrade(&shared)));
        let mut listeners = Vec::new();
        let mut accept_tasks = Vec::new();
        for listener in &config.listeners {
            let socket = crate::listen::bind(listener).with_context(|| {
                format!(
                    "listener {}: binding {}",
                    listener.name.get_ref(),
                    listener.address.get_ref()
                )
            })?;
            let local = socket.local_addr()?;
            listeners.push((listener.name.get_ref().clone(), local));
            accept_tasks.push(tokio::spawn(crate::listen::accept_loop(
                socket,
                listener.name.get_ref().clone(),
                Arc::new(Semaphore::new(*listener.max_connections.get_ref() as usize)),
                Arc::clone(&shared),
            )));
        }
        let admin = match &config.admin {
            Some(admin) => {
                let address: SocketAddr = admin.address.get_ref().parse()?;
                Some(crate::admin::start(address, Arc::clone(&shared)).await?)
            }
            None => None,
        };
        Ok(Self {
            shared,
            listeners,
            admin,
            accept_tasks,
        })
    }

    /// Re-reads the configuration file and swaps in its settings; on any error the old
    /// settings stay. Returns what went wrong.
    pub fn reload(&self) -> anyhow::Result<()> {
        let result = (|| {
            let file = self
                .shared
                .config_file
                .as_deref()
                .context("started without a configuration file: nothing to reload")?;
            let config = Config::load(file)?;
            let base = file.parent().unwrap_or(Path::new("."));
            let current = self.shared.state();
            for listener in &config.listeners {
                anyhow::ensure!(
                    current.listeners.contains_key(listener.name.get_ref()),
                    "listener {} is new: adding listeners needs a restart",
                    listener.name.get_ref()
                );
            }
            // Checked first, put in use last: the listeners are built for the new
            // settings, and a reload that fails anywhere changes nothing.
            let resumption = self
                .shared
                .resumption
                .prepare(crate::cluster::Settings::from_config(
                    &config.resumption,
                    base,
                ))
                .context("session resumption")?;
            let state = build_state(
                &config,
                base,
                &self.shared.provider,
                self.shared.pke.is_some(),
                &self.shared.resumption,
                resumption.shares_sessions,
            )?;
            Ok((state, resumption))
        })();
        match result {
            Ok((state, resumption)) => {
                self.shared.resumption.commit(resumption);
                *self.shared.state.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(state);
                self.shared.stats.reloads.fetch_add(1, Ordering::Relaxed);
                if let Some(audit) = &self.shared.audit {
                    audit.reopen();
                }
                tracing::info!("configuration reloaded");
                Ok(())
            }
            Err(error) => {
                self.shared
                    .stats
                    .reload_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %format!("{error:#}"), "reload refused; the old configuration stays");
                Err(error)
            }
        }
    }

    /// Stops accepting, lets open connections finish for up to the drain timeout, and
    /// returns how many were still open at the end.
    pub async fn drain(&self) -> u64 {
        self.shared.draining.store(true, Ordering::Relaxed);
        for task in &self.accept_tasks {
            task.abort();
        }
        let deadline = Instant::now() + self.shared.state().drain_timeout;
        loop {
            let active = self.shared.stats.connections_active.load(Ordering::Relaxed);
            if active == 0 {
                return 0;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return active;
            }
            let _ = tokio::time::timeout(
                left.min(Duration::from_millis(100)),
                self.shared.drained.notified(),
            )
            .await;
        }
    }
}

/// Builds the reloadable settings: loads certificates, starts pools' health checks.
fn build_state(
    config: &Config,
    base: &Path,
    provider: &Arc<rustls::crypto::CryptoProvider>,
    offloaded: bool,
    resumption: &Arc<Resumption>,
    shares_sessions: bool,
) -> anyhow::Result<State> {
    let mut pools = HashMap::new();
    let levels = Arc::new(crate::admission::Levels::new(&config.priorities)?);
    for pool in &config.pools {
        pools.insert(
            pool.name.get_ref().clone(),
            Pool::new(pool, base, Arc::clone(&levels))?,
        );
    }
    let mut listeners = HashMap::new();
    for listener in &config.listeners {
        let tls = if *listener.tls.get_ref() {
            Some(
                ListenerTls::new(
                    listener,
                    base,
                    provider,
                    offloaded,
                    resumption,
                    shares_sessions,
                )
                .with_context(|| format!("listener {}", listener.name.get_ref()))?,
            )
        } else {
            None
        };
        let keepalive = *listener.tcp_keepalive_s.get_ref();
        listeners.insert(
            listener.name.get_ref().clone(),
            Arc::new(ListenerState {
                name: listener.name.get_ref().clone(),
                tls,
                priority: listener
                    .priority
                    .as_ref()
                    .and_then(|p| levels.index_of(p.get_ref())),
                inspect: listener
                    .inspect
                    .as_ref()
                    .map(crate::inspect::Rules::new)
                    .transpose()
                    .with_context(|| format!("listener {}", listener.name.get_ref()))?,
                cache: listener.cache.as_ref().map(|c| {
                    crate::cache::ResponseCache::new(
                        *c.max_bytes.get_ref(),
                        *c.max_object_bytes.get_ref(),
                    )
                }),
                handshake_timeout: Duration::from_millis(*listener.handshake_timeout_ms.get_ref()),
                idle_timeout: Duration::from_millis(*listener.idle_timeout_ms.get_ref()),
                default_pool: listener.default_pool.as_ref().map(|p| p.get_ref().clone()),
                keepalive: (keepalive > 0).then(|| Duration::from_secs(u64::from(keepalive))),
                http: *listener.mode.get_ref() == crate::config::ListenerMode::Http,
                proxy_from: crate::proxy_protocol::Trusted::parse(
                    listener.accept_proxy_from.get_ref(),
                )
                .with_context(|| format!("listener {}", listener.name.get_ref()))?,
                acl: crate::acl::Acl::new(&listener.acl)
                    .with_context(|| format!("listener {} acl", listener.name.get_ref()))?
                    .map(Arc::new),
            }),
        );
    }
    let routes = config
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| {
            Ok(RouteRule {
                listener: r.listener.get_ref().clone(),
                sni: r.sni.clone(),
                alpn: r.alpn.clone(),
                host: r.host.as_ref().map(|h| h.get_ref().to_ascii_lowercase()),
                path_prefix: r.path_prefix.as_ref().map(|p| p.get_ref().clone()),
                pool: r.pool.get_ref().clone(),
                acl: crate::acl::Acl::new(&r.acl)
                    .with_context(|| format!("route[{i}] acl"))?
                    .map(Arc::new),
            })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(State {
        listeners,
        pools,
        levels,
        buffers: crate::buffers::BufferPool::new(
            *config.http.buffer_pool_min_kib.get_ref() as usize * 1024,
            *config.http.buffer_pool_max_kib.get_ref() as usize * 1024,
            Duration::from_millis(*config.http.buffer_wait_ms.get_ref()),
        ),
        routes,
        policy: Policy {
            cpu_below: *config.offload.cpu_below_bytes.get_ref() as usize,
        },
        rekey_after: *config.offload.rekey_after_records.get_ref(),
        limits: Limits {
            key_updates_without_data: *config.peer_limits.key_updates_without_data.get_ref(),
            warning_alerts: *config.peer_limits.warning_alerts.get_ref(),
            empty_records: *config.peer_limits.empty_records.get_ref(),
            renegotiation_requests: *config.peer_limits.renegotiation_requests.get_ref(),
        },
        drain_timeout: Duration::from_millis(*config.drain_timeout_ms.get_ref()),
    })
}
