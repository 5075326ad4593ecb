//! `tlsaccel serve`: listeners, the per-connection pipeline, reload and drain.
//!
//! A connection goes through: accept (listener limit, TCP options) → handshake
//! ([`crate::tls`]) → route to a pool and connect ([`crate::pool`]) → the record layer
//! ([`crate::record`]) proxying bytes both ways until both sides have closed.
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
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::AlertDescription;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, Semaphore};
use tracing::Instrument as _;

use crate::config::{self, Config};
use crate::handshake::{device_provider, PkeEngine};
use crate::metrics::LabelledCounter;
use crate::offload::{Offload, QueueSettings};
use crate::pool::Pool;
use crate::record::{
    self, content, Control, Direction, HandshakeReader, Policy, RecordDevice, RecordError,
    RecordStats, Version,
};
use crate::tls::{self, ListenerTls};
use tlsaccel_driver::Device;

/// Bytes read from a socket at a time.
const READ_CHUNK: usize = 64 * 1024;
/// Most records opened or sealed in one batch for one connection.
const RECORDS_PER_BATCH: usize = 32;
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
    /// Connections closed because no backend could be reached.
    pub backend_unavailable: AtomicU64,
    /// Connections with no route and no default pool.
    pub unrouted: AtomicU64,
    pub idle_timeouts: AtomicU64,
    pub renegotiations_refused: AtomicU64,
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
    pub bytes_client_to_backend: AtomicU64,
    pub bytes_backend_to_client: AtomicU64,
}

/// A listener's settings that a reload may change.
#[derive(Debug)]
pub struct ListenerState {
    pub name: String,
    pub tls: ListenerTls,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub default_pool: Option<String>,
    pub keepalive: Option<Duration>,
}

#[derive(Debug)]
struct RouteRule {
    listener: String,
    sni: Option<String>,
    alpn: Option<String>,
    pool: String,
}

/// Everything a reload replaces.
#[derive(Debug)]
pub struct State {
    pub listeners: HashMap<String, Arc<ListenerState>>,
    pub pools: HashMap<String, Arc<Pool>>,
    routes: Vec<RouteRule>,
    pub policy: Policy,
    pub rekey_after: u64,
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
    pub records: RecordStats,
    pub stats: ServerStats,
    state: RwLock<Arc<State>>,
    draining: AtomicBool,
    drained: tokio::sync::Notify,
    next_id: AtomicU64,
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
    fn record_device(&self, number: usize) -> Option<RecordDevice> {
        self.offload.as_ref()?.queue(number)
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
        let state = build_state(&config, &base, &provider)?;
        let shared = Arc::new(Shared {
            device: device.map(|(d, _)| d),
            pke,
            provider,
            offload,
            records: RecordStats::default(),
            stats: ServerStats::default(),
            state: RwLock::new(Arc::new(state)),
            draining: AtomicBool::new(false),
            drained: tokio::sync::Notify::new(),
            next_id: AtomicU64::new(1),
            config_file,
            started: Instant::now(),
        });
        let mut listeners = Vec::new();
        let mut accept_tasks = Vec::new();
        for listener in &config.listeners {
            let socket = bind(listener).with_context(|| {
                format!(
                    "listener {}: binding {}",
                    listener.name.get_ref(),
                    listener.address.get_ref()
                )
            })?;
            let local = socket.local_addr()?;
            listeners.push((listener.name.get_ref().clone(), local));
            accept_tasks.push(tokio::spawn(accept_loop(
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
            build_state(&config, base, &self.shared.provider)
        })();
        match result {
            Ok(state) => {
                *self.shared.state.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(state);
                self.shared.stats.reloads.fetch_add(1, Ordering::Relaxed);
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
) -> anyhow::Result<State> {
    let mut pools = HashMap::new();
    for pool in &config.pools {
        pools.insert(pool.name.get_ref().clone(), Pool::new(pool, base)?);
    }
    let mut listeners = HashMap::new();
    for listener in &config.listeners {
        let tls = ListenerTls::new(listener, base, provider)
            .with_context(|| format!("listener {}", listener.name.get_ref()))?;
        let keepalive = *listener.tcp_keepalive_s.get_ref();
        listeners.insert(
            listener.name.get_ref().clone(),
            Arc::new(ListenerState {
                name: listener.name.get_ref().clone(),
                tls,
                handshake_timeout: Duration::from_millis(*listener.handshake_timeout_ms.get_ref()),
                idle_timeout: Duration::from_millis(*listener.idle_timeout_ms.get_ref()),
                default_pool: listener.default_pool.as_ref().map(|p| p.get_ref().clone()),
                keepalive: (keepalive > 0).then(|| Duration::from_secs(u64::from(keepalive))),
            }),
        );
    }
    let routes = config
        .routes
        .iter()
        .map(|r| RouteRule {
            listener: r.listener.get_ref().clone(),
            sni: r.sni.clone(),
            alpn: r.alpn.clone(),
            pool: r.pool.get_ref().clone(),
        })
        .collect();
    Ok(State {
        listeners,
        pools,
        routes,
        policy: Policy {
            cpu_below: *config.offload.cpu_below_bytes.get_ref() as usize,
        },
        rekey_after: *config.offload.rekey_after_records.get_ref(),
        drain_timeout: Duration::from_millis(*config.drain_timeout_ms.get_ref()),
    })
}

fn bind(listener: &config::Listener) -> anyhow::Result<TcpListener> {
    let address: SocketAddr = listener.address.get_ref().parse()?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(address),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if let Some(mss) = &listener.tcp_mss {
        socket.set_tcp_mss(*mss.get_ref())?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(1024)?;
    Ok(TcpListener::from_std(socket.into())?)
}

async fn accept_loop(
    socket: TcpListener,
    name: String,
    limit: Arc<Semaphore>,
    shared: Arc<Shared>,
) {
    loop {
        // At the limit, further connections wait in the kernel's accept queue.
        let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
            return;
        };
        let (stream, peer) = match socket.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::error!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = shared.state();
        let Some(listener) = state.listeners.get(&name).cloned() else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        if let Some(idle) = listener.keepalive {
            let keepalive = socket2::TcpKeepalive::new().with_time(idle);
            let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        }
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        shared
            .stats
            .connections_accepted
            .fetch_add(1, Ordering::Relaxed);
        shared
            .stats
            .connections_active
            .fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("conn", id, %peer, listener = %name);
        let shared = Arc::clone(&shared);
        tokio::spawn(
            async move {
                connection(stream, listener, state, &shared).await;
                drop(permit);
                shared
                    .stats
                    .connections_closed
                    .fetch_add(1, Ordering::Relaxed);
                if shared
                    .stats
                    .connections_active
                    .fetch_sub(1, Ordering::Relaxed)
                    == 1
                {
                    shared.drained.notify_waiters();
                }
            }
            .instrument(span),
        );
    }
}

async fn connection(
    mut stream: TcpStream,
    listener: Arc<ListenerState>,
    state: Arc<State>,
    shared: &Arc<Shared>,
) {
    let established = match tokio::time::timeout(
        listener.handshake_timeout,
        tls::handshake(&mut stream, &listener.tls),
    )
    .await
    {
        Ok(Ok(established)) => established,
        Ok(Err(error)) => {
            shared.stats.handshake_failures.inc(error.kind());
            tracing::info!(%error, "handshake failed");
            return;
        }
        Err(_) => {
            shared.stats.handshake_failures.inc("timeout");
            tracing::info!("handshake timed out");
            return;
        }
    };
    let kind = if established.resumed {
        "resumed"
    } else {
        "full"
    };
    let version = match established.version {
        Version::Tls12 => "TLSv1_2",
        Version::Tls13 => "TLSv1_3",
    };
    shared
        .stats
        .handshakes
        .inc(&format!("{kind} {version} {}", established.suite));
    tracing::debug!(
        sni = established.server_name.as_deref().unwrap_or(""),
        suite = %established.suite,
        kind,
        "handshake complete"
    );
    let alpn = established
        .alpn
        .as_deref()
        .map(|a| String::from_utf8_lossy(a).into_owned());
    let pool = route(
        &state,
        &listener,
        established.server_name.as_deref(),
        alpn.as_deref(),
    );
    let mut layer = match Protection::new(established, &state, shared) {
        Ok(layer) => layer,
        Err(error) => {
            tracing::error!(%error, "record layer set-up failed");
            return;
        }
    };
    let (client_read, client_write) = stream.into_split();
    let mut tx = Tx {
        dir: layer.tx.take().expect("set by Protection::new"),
        writer: client_write,
        closed: false,
    };
    let Some(pool) = pool else {
        shared.stats.unrouted.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("no route and no default pool");
        let _ = layer
            .send_alert(&mut tx, AlertDescription::InternalError)
            .await;
        return;
    };
    let (lease, backend) = match pool.connect().await {
        Ok(connected) => connected,
        Err(error) => {
            shared
                .stats
                .backend_unavailable
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%error, "no backend");
            let _ = layer
                .send_alert(&mut tx, AlertDescription::InternalError)
                .await;
            return;
        }
    };
    tracing::debug!(backend = %lease.backend().address, "backend connected");
    let outcome = layer
        .proxy(client_read, tx, backend, listener.idle_timeout)
        .await;
    if let Err(error) = &outcome {
        tracing::info!(%error, "connection ended with an error");
    }
    drop(lease);
}

/// Picks the pool: the first route matching listener, SNI and ALPN, else the default.
fn route(
    state: &State,
    listener: &ListenerState,
    sni: Option<&str>,
    alpn: Option<&str>,
) -> Option<Arc<Pool>> {
    let rule = state.routes.iter().find(|r| {
        r.listener == listener.name
            && r.sni
                .as_deref()
                .is_none_or(|s| sni.is_some_and(|n| n.eq_ignore_ascii_case(s)))
            && r.alpn.as_deref().is_none_or(|a| alpn == Some(a))
    });
    let name = rule
        .map(|r| r.pool.as_str())
        .or(listener.default_pool.as_deref())?;
    state.pools.get(name).cloned()
}

/// Why the proxy loop ended early.
#[derive(Debug, thiserror::Error)]
enum ProxyError {
    #[error("record layer: {0}")]
    Record(#[from] RecordError),
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("idle for longer than the idle timeout")]
    Idle,
    #[error("key update: {0}")]
    KeyUpdate(rustls::Error),
}

/// The sending side: its key and the client socket's write half.
struct Tx {
    dir: Direction,
    writer: tokio::net::tcp::OwnedWriteHalf,
    closed: bool,
}

/// One connection's record layer.
struct Protection<'s> {
    version: Version,
    tx: Option<Direction>,
    rx: Option<Direction>,
    kernel: std::sync::Mutex<KernelConnection<ServerConnectionData>>,
    leftover: Vec<u8>,
    early_plaintext: Vec<u8>,
    /// Which of the device's record queues this connection uses (see [`Offload::queue`]).
    queue_number: usize,
    policy: Policy,
    rekey_after: u64,
    shared: &'s Shared,
    last_activity: AtomicU64,
}

impl<'s> Protection<'s> {
    fn new(
        established: tls::Established,
        state: &State,
        shared: &'s Shared,
    ) -> Result<Self, RecordError> {
        let tls::Established {
            secrets,
            kernel,
            version,
            leftover,
            early_plaintext,
            ..
        } = established;
        let (tx_seq, tx_secrets) = secrets.tx;
        let (rx_seq, rx_secrets) = secrets.rx;
        let tx = Direction::new(version, true, &tx_secrets, tx_seq)?;
        let rx = Direction::new(version, false, &rx_secrets, rx_seq)?;
        drop((tx_secrets, rx_secrets));
        // Stay well inside the suite's own confidentiality limit, whatever the config says.
        let limit = match kernel.negotiated_cipher_suite() {
            rustls::SupportedCipherSuite::Tls13(suite) => suite.common.confidentiality_limit / 2,
            _ => u64::MAX,
        };
        Ok(Self {
            version,
            tx: Some(tx),
            rx: Some(rx),
            kernel: std::sync::Mutex::new(kernel),
            leftover,
            early_plaintext,
            queue_number: shared.offload.as_ref().map_or(0, |o| o.assign()),
            policy: state.policy,
            rekey_after: state.rekey_after.min(limit),
            shared,
            last_activity: AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        let now = self.shared.started.elapsed().as_millis() as u64;
        self.last_activity.store(now, Ordering::Relaxed);
    }

    /// Seals and writes records of one content type, updating the sending key first when
    /// its record budget is spent.
    async fn send(&self, tx: &mut Tx, content_type: u8, data: &[u8]) -> Result<(), ProxyError> {
        let mut out = Vec::with_capacity(data.len() + data.len() / 512 + 64);
        let chunks: Vec<(u8, &[u8])> = if data.is_empty() {
            vec![(content_type, data)]
        } else {
            data.chunks(tlsaccel_driver::abi::TLS_MAX_PLAINTEXT)
                .map(|c| (content_type, c))
                .collect()
        };
        for batch in chunks.chunks(RECORDS_PER_BATCH) {
            if self.version == Version::Tls13
                && tx.dir.sequence() + batch.len() as u64 >= self.rekey_after
            {
                self.update_tx_key(tx, false, &mut out).await?;
            }
            tx.dir
                .seal(
                    batch,
                    &mut out,
                    self.shared.record_device(self.queue_number).as_ref(),
                    self.policy,
                    &self.shared.records,
                )
                .await;
        }
        tx.writer.write_all(&out).await?;
        Ok(())
    }

    /// Sends a KeyUpdate under the current key, then switches to the next one.
    async fn update_tx_key(
        &self,
        tx: &mut Tx,
        update_requested: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), ProxyError> {
        let message = record::key_update_message(update_requested);
        tx.dir
            .seal(
                &[(content::HANDSHAKE, &message)],
                out,
                self.shared.record_device(self.queue_number).as_ref(),
                self.policy,
                &self.shared.records,
            )
            .await;
        let (sequence, secrets) = self
            .kernel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .update_tx_secret()
            .map_err(ProxyError::KeyUpdate)?;
        tx.dir = Direction::new(self.version, true, &secrets, sequence)?;
        self.shared
            .records
            .key_updates_sent
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!("sending key updated");
        Ok(())
    }

    async fn send_alert(
        &self,
        tx: &mut Tx,
        description: AlertDescription,
    ) -> Result<(), ProxyError> {
        if tx.closed {
            return Ok(());
        }
        let fatal = description != AlertDescription::CloseNotify
            && description != AlertDescription::NoRenegotiation;
        self.shared
            .stats
            .alerts_sent
            .inc(&format!("{description:?}"));
        let message = record::alert_message(description, fatal);
        self.send(tx, content::ALERT, &message).await?;
        if fatal || description == AlertDescription::CloseNotify {
            tx.closed = true;
            let _ = tx.writer.shutdown().await;
        }
        Ok(())
    }

    /// Proxies until both directions have closed, a fatal error, or the idle timeout.
    async fn proxy(
        &mut self,
        client: tokio::net::tcp::OwnedReadHalf,
        tx: Tx,
        backend: Box<dyn crate::pool::BackendIo>,
        idle_timeout: Duration,
    ) -> Result<(), ProxyError> {
        let (backend_read, mut backend_write) = tokio::io::split(backend);
        let early = std::mem::take(&mut self.early_plaintext);
        if !early.is_empty() {
            backend_write.write_all(&early).await?;
        }
        let rx = self.rx.take().expect("set by Protection::new");
        let leftover = std::mem::take(&mut self.leftover);
        let tx = Mutex::new(tx);
        self.touch();
        let this = &*self;
        let inbound = this.inbound(client, leftover, rx, backend_write, &tx);
        let outbound = this.outbound(backend_read, &tx);
        let idle = async {
            let period = (idle_timeout / 4).max(Duration::from_millis(50));
            loop {
                tokio::time::sleep(period).await;
                let now = this.shared.started.elapsed().as_millis() as u64;
                let last = this.last_activity.load(Ordering::Relaxed);
                if Duration::from_millis(now.saturating_sub(last)) >= idle_timeout {
                    return;
                }
            }
        };
        tokio::pin!(inbound, outbound, idle);
        let (mut inbound_done, mut outbound_done) = (false, false);
        let result = loop {
            tokio::select! {
                r = &mut inbound, if !inbound_done => match r {
                    Ok(()) => inbound_done = true,
                    Err(e) => break Err(e),
                },
                r = &mut outbound, if !outbound_done => match r {
                    Ok(()) => outbound_done = true,
                    Err(e) => break Err(e),
                },
                () = &mut idle => {
                    this.shared.stats.idle_timeouts.fetch_add(1, Ordering::Relaxed);
                    break Err(ProxyError::Idle);
                }
            }
            if inbound_done && outbound_done {
                break Ok(());
            }
        };
        if let Err(ProxyError::Record(error)) = &result {
            if let Some(alert) = error.alert() {
                let mut tx = tx.lock().await;
                let _ = this.send_alert(&mut tx, alert).await;
            }
        }
        if let Err(ProxyError::Idle) = &result {
            let mut tx = tx.lock().await;
            let _ = this
                .send_alert(&mut tx, AlertDescription::CloseNotify)
                .await;
        }
        result
    }

    /// Client → backend: frame, open in batches, act on control messages, forward data.
    async fn inbound<W: AsyncWrite + Unpin>(
        &self,
        client: tokio::net::tcp::OwnedReadHalf,
        mut buffer: Vec<u8>,
        mut rx: Direction,
        mut backend: W,
        tx: &Mutex<Tx>,
    ) -> Result<(), ProxyError> {
        let mut handshake = HandshakeReader::default();
        loop {
            let mut ends = Vec::new();
            let mut at = 0;
            while ends.len() < RECORDS_PER_BATCH {
                match record::frame(&buffer[at..], self.version)? {
                    Some(len) => {
                        at += len;
                        ends.push(at);
                    }
                    None => break,
                }
            }
            if ends.is_empty() {
                let n = loop {
                    buffer.reserve(READ_CHUNK);
                    match client.try_read_buf(&mut buffer) {
                        Ok(n) => break n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            if buffer.is_empty() {
                                // Going idle: hold no read buffer while waiting.
                                buffer = Vec::new();
                            }
                            client.readable().await?;
                        }
                        Err(e) => return Err(e.into()),
                    }
                };
                if n == 0 {
                    // End of stream without close_notify: pass the end on, but the data
                    // may have been truncated.
                    tracing::debug!("client closed without close_notify");
                    let _ = backend.shutdown().await;
                    return Ok(());
                }
                self.touch();
                continue;
            }
            let mut starts = vec![0];
            starts.extend_from_slice(&ends[..ends.len() - 1]);
            let records: Vec<&[u8]> = starts
                .iter()
                .zip(&ends)
                .map(|(&s, &e)| &buffer[s..e])
                .collect();
            let results = rx
                .open(
                    &records,
                    self.shared.record_device(self.queue_number).as_ref(),
                    self.policy,
                    &self.shared.records,
                )
                .await;
            let mut consumed = 0;
            let mut plaintext = Vec::new();
            let mut closed = false;
            let mut failure = None;
            for (i, result) in results.into_iter().enumerate() {
                let (content_type, plain) = match result {
                    Ok(opened) => opened,
                    Err(error) => {
                        failure = Some(error);
                        break;
                    }
                };
                consumed = ends[i];
                match self.control(content_type, &plain, &mut handshake) {
                    Ok(None) => plaintext.extend_from_slice(&plain),
                    Ok(Some(Control::KeyUpdate { update_requested })) => {
                        let (sequence, secrets) = self
                            .kernel
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .update_rx_secret()
                            .map_err(ProxyError::KeyUpdate)?;
                        rx = Direction::new(self.version, false, &secrets, sequence)?;
                        self.shared
                            .records
                            .key_updates_received
                            .fetch_add(1, Ordering::Relaxed);
                        if update_requested {
                            let mut tx = tx.lock().await;
                            let mut out = Vec::new();
                            self.update_tx_key(&mut tx, false, &mut out).await?;
                            tx.writer.write_all(&out).await?;
                        }
                        // Records after this one were opened with the old key: frame
                        // them again.
                        break;
                    }
                    Ok(Some(Control::Renegotiation)) => {
                        self.shared
                            .stats
                            .renegotiations_refused
                            .fetch_add(1, Ordering::Relaxed);
                        let mut tx = tx.lock().await;
                        self.send_alert(&mut tx, AlertDescription::NoRenegotiation)
                            .await?;
                    }
                    Ok(Some(Control::CloseNotify)) => {
                        closed = true;
                        break;
                    }
                    Ok(Some(Control::Ignored)) => {}
                    Err(error) => {
                        failure = Some(error);
                        break;
                    }
                }
            }
            if !plaintext.is_empty() {
                self.shared
                    .stats
                    .bytes_client_to_backend
                    .fetch_add(plaintext.len() as u64, Ordering::Relaxed);
                backend.write_all(&plaintext).await?;
            }
            buffer.drain(..consumed);
            if let Some(error) = failure {
                return Err(error.into());
            }
            if closed {
                backend.flush().await?;
                let _ = backend.shutdown().await;
                return Ok(());
            }
        }
    }

    /// Classifies one opened record: `None` for application data.
    fn control(
        &self,
        content_type: u8,
        plain: &[u8],
        handshake: &mut HandshakeReader,
    ) -> Result<Option<Control>, RecordError> {
        if handshake.is_pending() && content_type != content::HANDSHAKE {
            return Err(RecordError::UnexpectedMessage(
                "a handshake message interrupted by another record type",
            ));
        }
        match content_type {
            content::APPLICATION_DATA => Ok(None),
            content::ALERT => record::read_alert(self.version, plain).map(Some),
            content::HANDSHAKE => Ok(Some(match handshake.push(self.version, plain)? {
                Some(control) => control,
                None => Control::Ignored,
            })),
            _ => Err(RecordError::UnexpectedMessage(
                "an unknown record content type",
            )),
        }
    }

    /// Backend → client: read, seal, write; close_notify at the backend's end of stream.
    async fn outbound<R: AsyncRead + Unpin>(
        &self,
        mut backend: R,
        tx: &Mutex<Tx>,
    ) -> Result<(), ProxyError> {
        // Never zeroed: pages of an idle connection's buffer that no read touched stay
        // unmapped.
        let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
        loop {
            buf.clear();
            let n = backend.read_buf(&mut buf).await?;
            let mut tx = tx.lock().await;
            if n == 0 {
                self.send_alert(&mut tx, AlertDescription::CloseNotify)
                    .await?;
                return Ok(());
            }
            self.touch();
            if tx.closed {
                // A fatal alert went out: nothing more may be sent.
                return Ok(());
            }
            self.shared
                .stats
                .bytes_backend_to_client
                .fetch_add(n as u64, Ordering::Relaxed);
            self.send(&mut tx, content::APPLICATION_DATA, &buf[..n])
                .await?;
        }
    }
}
