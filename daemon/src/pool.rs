//! Backend pools: choosing a server, connecting with retries, health.
//!
//! A server is out of rotation when its active health check fails, or (passive ejection)
//! after [`EJECT_AFTER`] connection failures in a row. With a health check it returns when
//! the check passes; without one, after [`EJECT_FOR`] it gets one trial connection, and a
//! trial that fails keeps it out for another [`EJECT_FOR`]. When every server is out, all
//! are tried anyway: a pool that might work beats one that surely does not.
//!
//! Health checks speak what the pool speaks: to a pool with `[pool.tls]` they make the TLS
//! handshake (verifying the server as connections do) and send their HTTP request inside
//! it. A pool's TLS roots are its `ca` file, or the operating system's trust store.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

use crate::config::{self, Balance};

/// Connection failures in a row that take a server out of rotation.
pub const EJECT_AFTER: u32 = 3;
/// How long a passively ejected server without a health check stays out.
pub const EJECT_FOR: Duration = Duration::from_secs(10);

/// A byte stream to a backend that is not plain TCP (TLS to the backend).
pub trait BackendIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> BackendIo for T {}

/// A connection to a backend. Plain TCP is kept as such, so the pump can move bytes between
/// its socket and DMA memory without a copy.
pub enum BackendStream {
    Tcp(TcpStream),
    Stream(Box<dyn BackendIo>),
}

impl std::fmt::Debug for BackendStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendStream::Tcp(_) => "BackendStream::Tcp",
            BackendStream::Stream(_) => "BackendStream::Stream",
        })
    }
}

/// Why no backend could be reached.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("pool {pool}: no server answered after {attempts} attempts (last: {last})")]
    Exhausted {
        pool: String,
        attempts: u32,
        last: String,
    },
}

/// One backend server.
#[derive(Debug)]
pub struct Backend {
    pub address: String,
    healthy: AtomicBool,
    failures: AtomicU32,
    ejected_at: Mutex<Option<Instant>>,
    active: AtomicU32,
    pub connections: AtomicU64,
    pub errors: AtomicU64,
    pub health_failures: AtomicU64,
    /// HTTP mode: requests sent to it and not yet answered.
    pub requests_in_flight: AtomicU32,
    /// HTTP mode: its response time (to the response head), peak EWMA.
    pub response_time: crate::admission::ResponseTime,
}

impl Backend {
    fn new(address: String) -> Self {
        Self {
            address,
            healthy: AtomicBool::new(true),
            failures: AtomicU32::new(0),
            ejected_at: Mutex::new(None),
            active: AtomicU32::new(0),
            connections: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            health_failures: AtomicU64::new(0),
            requests_in_flight: AtomicU32::new(0),
            response_time: crate::admission::ResponseTime::new(),
        }
    }

    /// True when the server is in rotation.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Connections open to it now.
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    fn available(&self, has_health_check: bool) -> bool {
        if self.is_healthy() {
            return true;
        }
        if has_health_check {
            return false;
        }
        let ejected = self.ejected_at.lock().unwrap_or_else(|e| e.into_inner());
        ejected.is_some_and(|at| at.elapsed() >= EJECT_FOR)
    }

    /// Marks a connection to a server out of rotation as its trial: the next trial is
    /// [`EJECT_FOR`] away whatever this one's outcome.
    fn begin_trial(&self) {
        if !self.is_healthy() {
            *self.ejected_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        }
    }

    fn succeeded(&self) {
        self.failures.store(0, Ordering::Relaxed);
        self.healthy.store(true, Ordering::Relaxed);
    }

    fn failed(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if self.failures.fetch_add(1, Ordering::Relaxed) + 1 >= EJECT_AFTER
            && self.healthy.swap(false, Ordering::Relaxed)
        {
            tracing::warn!(backend = %self.address, "backend ejected after repeated failures");
            *self.ejected_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        }
    }
}

/// A connection's hold on a backend; counts it as active until dropped.
#[derive(Debug)]
pub struct Lease(Arc<Backend>);

impl Lease {
    /// The server.
    pub fn backend(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A pool of backend servers.
pub struct Pool {
    pub name: String,
    pub backends: Vec<Arc<Backend>>,
    balance: Balance,
    connect_timeout: Duration,
    retries: u32,
    tls: Option<BackendTls>,
    /// Whether each connection starts with a PROXY v2 header.
    pub proxy_protocol: config::ProxyProtocol,
    has_health_check: bool,
    next: AtomicUsize,
    random: AtomicU64,
    checks: Vec<JoinHandle<()>>,
    /// HTTP mode's pooled client over these servers, made when first used.
    http: std::sync::OnceLock<crate::http::Client>,
    /// HTTP mode: when a request is sent on to another server.
    pub retry: RetryPolicy,
    /// HTTP mode: the pool's response time and its priority levels' admission queue.
    pub admission: Arc<crate::admission::Admission>,
    /// HTTP mode with `http_version = "2"`: one HTTP/2 connection per server.
    pub h2: Option<crate::upstream::H2Connections>,
}

/// HTTP mode's transparent failover for one pool.
pub struct RetryPolicy {
    /// Statuses that send an idempotent request on.
    pub on: Vec<u16>,
    /// Retries earned by requests (tower's token budget).
    pub budget: tower::retry::budget::TpsBudget,
    /// Body bytes held for a second sending.
    pub body_bytes: usize,
    pub retries: AtomicU64,
    /// Retries the budget refused.
    pub refused: AtomicU64,
}

impl std::fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("on", &self.on)
            .field("body_bytes", &self.body_bytes)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.name)
            .field("backends", &self.backends)
            .field("balance", &self.balance)
            .finish_non_exhaustive()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for check in &self.checks {
            check.abort();
        }
    }
}

impl Pool {
    /// Builds a pool from its configuration and starts its health checks on the current
    /// runtime. `base` resolves a relative CA path.
    pub fn new(
        config: &config::Pool,
        base: &std::path::Path,
        levels: Arc<crate::admission::Levels>,
    ) -> anyhow::Result<Arc<Self>> {
        let tls = match &config.tls {
            None => None,
            Some(tls) => {
                let mut roots = rustls::RootCertStore::empty();
                match &tls.ca {
                    Some(ca) => {
                        use rustls::pki_types::pem::PemObject;
                        let path = base.join(ca.get_ref());
                        for cert in rustls::pki_types::CertificateDer::pem_file_iter(&path)
                            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
                        {
                            roots.add(
                                cert.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
                            )?;
                        }
                    }
                    None => {
                        // The system's store (SSL_CERT_FILE / SSL_CERT_DIR when set, as
                        // for OpenSSL). Certificates it cannot parse are skipped.
                        let found = rustls_native_certs::load_native_certs();
                        let (added, _) = roots.add_parsable_certificates(found.certs);
                        anyhow::ensure!(
                            added > 0,
                            "pool {}: no `ca` given and no system trust roots found{} \
                             (install ca-certificates, or give the pool a `ca`)",
                            config.name.get_ref(),
                            found
                                .errors
                                .first()
                                .map(|e| format!(" ({e})"))
                                .unwrap_or_default()
                        );
                    }
                }
                let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::aws_lc_rs::default_provider(),
                ))
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
                if config.http_version.get_ref() == "2" {
                    client.alpn_protocols = vec![b"h2".to_vec()];
                }
                let name = ServerName::try_from(tls.server_name.get_ref().clone())?;
                Some((TlsConnector::from(Arc::new(client)), name))
            }
        };
        let backends: Vec<Arc<Backend>> = config
            .servers
            .get_ref()
            .iter()
            .map(|s| Arc::new(Backend::new(s.clone())))
            .collect();
        let connect_timeout = Duration::from_millis(*config.connect_timeout_ms.get_ref());
        let mut checks = Vec::new();
        if let Some(health) = &config.health_check {
            let interval = Duration::from_millis(*health.interval_ms.get_ref());
            let path = health.http_path.as_ref().map(|p| p.get_ref().clone());
            for backend in &backends {
                checks.push(tokio::spawn(health_check(
                    Arc::clone(backend),
                    interval,
                    connect_timeout,
                    tls.clone(),
                    // A backend that takes PROXY headers wants one on every connection: a
                    // check is a connection of the proxy's own (LOCAL).
                    (config.proxy_protocol == config::ProxyProtocol::V2)
                        .then(crate::proxy_protocol::v2_local),
                    path.clone(),
                )));
            }
        }
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        Ok(Arc::new(Self {
            name: config.name.get_ref().clone(),
            backends,
            balance: config.balance,
            connect_timeout,
            retries: *config.retries.get_ref(),
            tls,
            proxy_protocol: config.proxy_protocol,
            has_health_check: config.health_check.is_some(),
            next: AtomicUsize::new(0),
            random: AtomicU64::new(seed),
            checks,
            http: std::sync::OnceLock::new(),
            retry: RetryPolicy {
                on: config.retry_on.get_ref().clone(),
                // Deposits live 10 s; 10 retries a second are always allowed.
                budget: tower::retry::budget::TpsBudget::new(
                    Duration::from_secs(10),
                    10,
                    *config.retry_budget_percent.get_ref() as f32 / 100.0,
                ),
                body_bytes: *config.retry_body_bytes.get_ref() as usize,
                retries: AtomicU64::new(0),
                refused: AtomicU64::new(0),
            },
            admission: Arc::new(crate::admission::Admission::new(levels)),
            h2: (config.http_version.get_ref() == "2")
                .then(|| crate::upstream::H2Connections::new(config.servers.get_ref().len())),
        }))
    }

    /// True when its servers are reached over TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The pool's HTTP client (HTTP mode): requests go over kept-alive connections to its
    /// servers, new ones made by [`Self::connect`].
    pub fn http_client(self: &Arc<Self>) -> crate::http::Client {
        self.http
            .get_or_init(|| crate::http::client_for(self))
            .clone()
    }

    /// Chooses a server not in `tried` by the pool's algorithm (servers out of rotation
    /// only when every untried one is).
    pub fn pick(&self, tried: &[usize]) -> Option<usize> {
        let fresh = |i: &usize| !tried.contains(i);
        let mut candidates: Vec<usize> = (0..self.backends.len())
            .filter(fresh)
            .filter(|&i| self.backends[i].available(self.has_health_check))
            .collect();
        if candidates.is_empty() {
            // Every untried server is out of rotation: try them anyway.
            candidates = (0..self.backends.len()).filter(fresh).collect();
        }
        if candidates.is_empty() {
            return None;
        }
        let load = |i: &usize| self.backends[*i].active();
        Some(match self.balance {
            Balance::RoundRobin => {
                candidates[self.next.fetch_add(1, Ordering::Relaxed) % candidates.len()]
            }
            Balance::LeastConnections => {
                // Ties go round-robin so equal servers share the load.
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                let n = candidates.len();
                (0..n)
                    .map(|k| candidates[(start + k) % n])
                    .min_by_key(load)
                    .unwrap_or(candidates[0])
            }
            Balance::LeastResponseTime => {
                // Peak EWMA cost: response time × (requests in flight + 1); a server with
                // no answer yet costs nothing, so each gets tried. Ties go round-robin.
                let cost = |i: &usize| {
                    let b = &self.backends[*i];
                    let pending = b.requests_in_flight.load(Ordering::Relaxed) as f64 + 1.0;
                    b.response_time.get().as_secs_f64() * pending
                };
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                let n = candidates.len();
                (0..n)
                    .map(|k| candidates[(start + k) % n])
                    .min_by(|a, b| cost(a).total_cmp(&cost(b)))
                    .unwrap_or(candidates[0])
            }
            Balance::PowerOfTwoChoices => {
                let a = candidates[self.random() % candidates.len()];
                let b = candidates[self.random() % candidates.len()];
                if load(&b) < load(&a) {
                    b
                } else {
                    a
                }
            }
        })
    }

    /// xorshift64*: load balancing needs spread, not secrecy.
    fn random(&self) -> usize {
        let mut x = self.random.load(Ordering::Relaxed);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.random.store(x, Ordering::Relaxed);
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize
    }

    /// Connects to a server, retrying up to `retries` times when a connect fails: on servers
    /// not tried yet while there are any, then on the same ones again after a short pause.
    /// `proxy_header` goes to the server first (before TLS to a TLS pool).
    pub async fn connect(
        &self,
        proxy_header: Option<&[u8]>,
    ) -> Result<(Lease, BackendStream), PoolError> {
        let mut tried = Vec::new();
        let mut last = String::from("no server");
        let mut attempts = 0u32;
        while attempts <= self.retries {
            let i = match self.pick(&tried) {
                Some(i) => i,
                None => {
                    // Every server has been tried once: start over, after a pause.
                    tokio::time::sleep(Duration::from_millis(25 * u64::from(attempts))).await;
                    tried.clear();
                    match self.pick(&tried) {
                        Some(i) => i,
                        None => break,
                    }
                }
            };
            attempts += 1;
            tried.push(i);
            match self.connect_server(i, proxy_header).await {
                Ok(connected) => return Ok(connected),
                Err(error) => last = format!("{}: {error}", self.backends[i].address),
            }
        }
        Err(PoolError::Exhausted {
            pool: self.name.clone(),
            attempts,
            last,
        })
    }

    /// Connects to server `i` (one attempt), counting the outcome in its health.
    pub async fn connect_server(
        &self,
        i: usize,
        proxy_header: Option<&[u8]>,
    ) -> std::io::Result<(Lease, BackendStream)> {
        let backend = self
            .backends
            .get(i)
            .ok_or_else(|| std::io::Error::other("no such server"))?;
        backend.begin_trial();
        backend.active.fetch_add(1, Ordering::Relaxed);
        let lease = Lease(Arc::clone(backend));
        match connect_backend(
            &backend.address,
            self.connect_timeout,
            self.tls.as_ref(),
            proxy_header,
        )
        .await
        {
            Ok(io) => {
                backend.succeeded();
                backend.connections.fetch_add(1, Ordering::Relaxed);
                Ok((lease, io))
            }
            Err(error) => {
                tracing::warn!(backend = %backend.address, %error, "backend connect failed");
                backend.failed();
                Err(error)
            }
        }
    }
}

/// TLS to a pool's servers: the connector and the name they must prove.
type BackendTls = (TlsConnector, ServerName<'static>);

/// Connects to `address`, sends `proxy_header`, and makes the TLS handshake when the pool
/// speaks TLS.
async fn connect_backend(
    address: &str,
    timeout: Duration,
    tls: Option<&BackendTls>,
    proxy_header: Option<&[u8]>,
) -> std::io::Result<BackendStream> {
    let mut stream = connect_tcp(address, timeout).await?;
    if let Some(header) = proxy_header {
        tokio::time::timeout(timeout, stream.write_all(header))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "PROXY header not taken")
            })??;
    }
    match tls {
        None => Ok(BackendStream::Tcp(stream)),
        Some((connector, name)) => {
            let tls = tokio::time::timeout(timeout, connector.connect(name.clone(), stream))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
                })??;
            Ok(BackendStream::Stream(Box::new(tls)))
        }
    }
}

/// Resolves `address` and connects with a deadline; sets TCP_NODELAY.
pub async fn connect_tcp(address: &str, timeout: Duration) -> std::io::Result<TcpStream> {
    let attempt = async {
        // An IP address needs no resolver (whose lookups queue on the blocking pool).
        let addresses: Vec<SocketAddr> = match address.parse::<SocketAddr>() {
            Ok(addr) => vec![addr],
            Err(_) => tokio::net::lookup_host(address).await?.collect(),
        };
        let mut last = std::io::Error::other("address resolved to nothing");
        for addr in addresses {
            match TcpStream::connect(addr).await {
                Ok(stream) => return Ok((stream, addr)),
                Err(e) => last = e,
            }
        }
        Err(last)
    };
    let (stream, _addr): (TcpStream, SocketAddr) =
        tokio::time::timeout(timeout, attempt).await.map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
        })??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

async fn health_check(
    backend: Arc<Backend>,
    interval: Duration,
    timeout: Duration,
    tls: Option<BackendTls>,
    proxy_header: Option<Vec<u8>>,
    http_path: Option<String>,
) {
    let mut ticker = tokio::time::interval(interval);
    loop {
        ticker.tick().await;
        let result = probe(
            &backend.address,
            timeout,
            tls.as_ref(),
            proxy_header.as_deref(),
            http_path.as_deref(),
        )
        .await;
        match result {
            Ok(()) => {
                if !backend.healthy.swap(true, Ordering::Relaxed) {
                    tracing::info!(backend = %backend.address, "backend back in rotation");
                }
                backend.failures.store(0, Ordering::Relaxed);
            }
            Err(error) => {
                backend.health_failures.fetch_add(1, Ordering::Relaxed);
                if backend.healthy.swap(false, Ordering::Relaxed) {
                    tracing::warn!(backend = %backend.address, %error, "health check failed");
                }
            }
        }
    }
}

/// A connect (and the TLS handshake for a TLS pool), and with `http_path` a `GET` that must
/// answer 2xx.
async fn probe(
    address: &str,
    timeout: Duration,
    tls: Option<&BackendTls>,
    proxy_header: Option<&[u8]>,
    http_path: Option<&str>,
) -> std::io::Result<()> {
    let stream = connect_backend(address, timeout, tls, proxy_header).await?;
    let Some(path) = http_path else {
        return Ok(());
    };
    let mut stream: Box<dyn BackendIo> = match stream {
        BackendStream::Tcp(tcp) => Box::new(tcp),
        BackendStream::Stream(io) => io,
    };
    let host = match tls {
        Some((_, ServerName::DnsName(name))) => name.as_ref().to_owned(),
        _ => address.to_owned(),
    };
    let exchange = async {
        let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await?;
        Ok::<_, std::io::Error>(head)
    };
    let head = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "health check timed out")
        })??;
    if head.starts_with(b"HTTP/1.") && head[9] == b'2' {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "health check answered {:?}",
            String::from_utf8_lossy(&head)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(balance: &str, servers: usize) -> Arc<Pool> {
        let list: Vec<String> = (0..servers).map(|i| format!("\"10.0.0.{i}:80\"")).collect();
        let text = format!(
            "[[pool]]\nname = \"p\"\nservers = [{}]\nbalance = \"{balance}\"\n",
            list.join(", ")
        );
        let config =
            crate::config::Config::parse(&text, std::path::Path::new("t.toml")).expect("config");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let _guard = runtime.enter();
        Pool::new(
            &config.pools[0],
            std::path::Path::new("."),
            Arc::new(crate::admission::Levels::new(&[]).expect("levels")),
        )
        .expect("pool")
    }

    #[test]
    fn round_robin_takes_turns_and_skips_what_was_tried() {
        let p = pool("round_robin", 3);
        let picks: Vec<usize> = (0..6).filter_map(|_| p.pick(&[])).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        for _ in 0..5 {
            assert_ne!(p.pick(&[1]), Some(1));
        }
        assert_eq!(p.pick(&[0, 1, 2]), None);
    }

    #[test]
    fn least_connections_prefers_the_idlest_server() {
        let p = pool("least_connections", 3);
        p.backends[0].active.store(5, Ordering::Relaxed);
        p.backends[1].active.store(1, Ordering::Relaxed);
        p.backends[2].active.store(3, Ordering::Relaxed);
        for _ in 0..6 {
            assert_eq!(p.pick(&[]), Some(1));
        }
        assert_eq!(p.pick(&[1]), Some(2));
    }

    #[test]
    fn power_of_two_choices_mostly_avoids_the_busy_server() {
        let p = pool("power_of_two_choices", 2);
        p.backends[0].active.store(50, Ordering::Relaxed);
        let idle = (0..1000).filter(|_| p.pick(&[]) == Some(1)).count();
        // Two independent draws both land on the busy server a quarter of the time.
        assert!(
            (650..=850).contains(&idle),
            "{idle} of 1000 to the idle server"
        );
    }

    /// Runs `check` on a runtime with a pool of `servers` copies of an address nothing
    /// listens on, and `retries`.
    fn with_dead_pool<F: std::future::Future<Output = ()>>(
        servers: usize,
        retries: u32,
        check: impl FnOnce(Arc<Pool>) -> F,
    ) {
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        let list = vec![format!("\"{dead}\""); servers].join(", ");
        let text = format!("[[pool]]\nname = \"p\"\nservers = [{list}]\nretries = {retries}\n");
        let config =
            crate::config::Config::parse(&text, std::path::Path::new("t.toml")).expect("config");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let p = Pool::new(
                &config.pools[0],
                std::path::Path::new("."),
                Arc::new(crate::admission::Levels::new(&[]).expect("levels")),
            )
            .expect("pool");
            check(p).await;
        });
    }

    #[test]
    fn a_lone_server_is_retried_after_a_pause() {
        with_dead_pool(1, 2, |p| async move {
            let started = std::time::Instant::now();
            match p.connect(None).await {
                Err(PoolError::Exhausted { attempts, .. }) => assert_eq!(attempts, 3),
                Ok(_) => panic!("nothing listens there"),
            }
            assert_eq!(p.backends[0].errors.load(Ordering::Relaxed), 3);
            // Pauses of 25 and 50 ms between the attempts.
            assert!(started.elapsed() >= Duration::from_millis(75));
            assert_eq!(p.backends[0].active(), 0, "failed attempts hold no lease");
        });
    }

    #[test]
    fn a_failed_trial_keeps_an_ejected_server_out_for_another_pause() {
        with_dead_pool(2, 0, |p| async move {
            let down = &p.backends[0];
            for _ in 0..EJECT_AFTER {
                down.failed();
            }
            assert!(!down.available(false), "ejected");
            // The pause has passed: the server gets a trial connection.
            *down.ejected_at.lock().unwrap() = Some(Instant::now() - EJECT_FOR);
            assert!(down.available(false));
            while p.backends[0].errors.load(Ordering::Relaxed) == u64::from(EJECT_AFTER) {
                assert!(p.connect(None).await.is_err(), "nothing listens there");
            }
            // The trial failed: out for another pause, not back for good.
            assert!(!down.available(false), "a failed trial re-arms the pause");
            assert!(!down.is_healthy());
        });
    }

    #[test]
    fn ejected_servers_are_skipped_until_every_server_is_out() {
        let p = pool("round_robin", 2);
        for _ in 0..EJECT_AFTER {
            p.backends[0].failed();
        }
        assert!(!p.backends[0].is_healthy());
        for _ in 0..4 {
            assert_eq!(p.pick(&[]), Some(1));
        }
        for _ in 0..EJECT_AFTER {
            p.backends[1].failed();
        }
        // Every server is out: both are tried rather than none.
        let picks: Vec<_> = (0..4).filter_map(|_| p.pick(&[])).collect();
        assert!(picks.contains(&0) && picks.contains(&1), "{picks:?}");
        p.backends[0].succeeded();
        assert!(p.backends[0].is_healthy());
    }
}
