//! The load generator: tokio and rustls clients driving full and resumed handshakes, bulk
//! transfers both ways, small keep-alive requests, a fresh connection per request and idle
//! connections. Every TLS client offers TLS 1.3 with TLS_AES_128_GCM_SHA256 and X25519 only,
//! so every system negotiates the same. The rows that need no TLS (bulk and keep-alive
//! requests) also speak plain TCP, to measure the plaintext floor.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A client configuration trusting `cert`; `resumption` keeps session tickets.
pub fn client_config(
    cert: &CertificateDer<'static>,
    resumption: bool,
) -> Arc<rustls::ClientConfig> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider
        .cipher_suites
        .retain(|s| s.suite() == rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    provider
        .kx_groups
        .retain(|g| g.name() == rustls::NamedGroup::X25519);
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(cert.clone())
        .expect("the certificate is a valid root");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    if !resumption {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Arc::new(config)
}

/// How the load generator speaks to a system.
#[derive(Debug, Clone)]
pub enum Client {
    /// TLS with this configuration.
    Tls(Arc<rustls::ClientConfig>),
    /// Plain TCP, to the plaintext floor.
    Plain,
}

/// A TCP connection to `address`, without Nagle's delay (requests are small).
async fn tcp(address: SocketAddr) -> std::io::Result<TcpStream> {
    let tcp = TcpStream::connect(address).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// A TLS connection to `address`.
pub async fn connect(
    address: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = tcp(address).await?;
    let name = ServerName::try_from("localhost").expect("valid name");
    tokio_rustls::TlsConnector::from(Arc::clone(config))
        .connect(name, tcp)
        .await
}

/// What one run of a workload did.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Handshakes or requests completed.
    pub operations: u64,
    /// Payload bytes moved.
    pub bytes: u64,
    pub errors: u64,
    pub elapsed: Duration,
    /// Per-request latencies (request workloads only).
    pub latencies: Vec<Duration>,
    /// Resumed handshakes among the operations (resumption workload).
    pub resumed: u64,
}

impl Outcome {
    /// Operations per second.
    pub fn rate(&self) -> f64 {
        self.operations as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Payload megabytes per second.
    pub fn megabytes_per_second(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The latency at `quantile` (0..=1).
    pub fn latency(&self, quantile: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let at = ((sorted.len() - 1) as f64 * quantile).round() as usize;
        sorted[at]
    }
}

#[derive(Debug, Default)]
struct Counters {
    operations: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    resumed: AtomicU64,
}

/// Runs `task` on `concurrency` tasks until `duration` has passed.
async fn run<F, Fut>(concurrency: usize, duration: Duration, task: F) -> (Outcome, Vec<Duration>)
where
    F: Fn(Arc<Counters>, Instant) -> Fut + Send + Sync + 'static + Clone,
    Fut: std::future::Future<Output = Vec<Duration>> + Send + 'static,
{
    let counters = Arc::new(Counters::default());
    let start = Instant::now();
    let deadline = start + duration;
    let handles: Vec<_> = (0..concurrency)
        .map(|_| tokio::spawn(task.clone()(Arc::clone(&counters), deadline)))
        .collect();
    let mut latencies = Vec::new();
    for handle in handles {
        if let Ok(mut l) = handle.await {
            latencies.append(&mut l);
        }
    }
    let outcome = Outcome {
        operations: counters.operations.load(Ordering::Relaxed),
        bytes: counters.bytes.load(Ordering::Relaxed),
        errors: counters.errors.load(Ordering::Relaxed),
        elapsed: start.elapsed(),
        latencies: Vec::new(),
        resumed: counters.resumed.load(Ordering::Relaxed),
    };
    (outcome, latencies)
}

async fn failed(counters: &Counters) {
    counters.errors.fetch_add(1, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// Full handshakes: connect, handshake, close, again.
pub async fn full_handshakes(
    address: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    concurrency: usize,
    duration: Duration,
) -> Outcome {
    run(concurrency, duration, move |counters, deadline| {
        let config = Arc::clone(&config);
        async move {
            while Instant::now() < deadline {
                match connect(address, &config).await {
                    Ok(mut stream) => {
                        counters.operations.fetch_add(1, Ordering::Relaxed);
                        let _ = stream.shutdown().await;
                    }
                    Err(_) => failed(&counters).await,
                }
            }
            Vec::new()
        }
    })
    .await
    .0
}

/// HTTP/1.1 over one TLS or plain TCP connection.
#[derive(Debug)]
pub struct Http {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    /// The task driving the connection; it ends once the connection is closed.
    connection: tokio::task::JoinHandle<hyper::Result<()>>,
}

impl Http {
    /// Connects as `client` says and starts HTTP/1.1 on the connection; true when the TLS
    /// handshake resumed a session.
    pub async fn open(address: SocketAddr, client: &Client) -> anyhow::Result<(Self, bool)> {
        match client {
            Client::Tls(config) => {
                let stream = connect(address, config).await?;
                let kind = stream.get_ref().1.handshake_kind();
                let resumed = kind == Some(rustls::HandshakeKind::Resumed);
                Ok((Self::start(stream).await?, resumed))
            }
            Client::Plain => Ok((Self::start(tcp(address).await?).await?, false)),
        }
    }

    /// Starts HTTP/1.1 on a connected stream, driven by a task of its own.
    async fn start<S>(stream: S) -> anyhow::Result<Self>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        Ok(Self {
            sender,
            connection: tokio::spawn(connection),
        })
    }

    /// Closes the connection (TLS `close_notify`, then the TCP shutdown) and waits until it
    /// is closed.
    pub async fn close(self) {
        drop(self.sender);
        let _ = self.connection.await;
    }

    /// Sends a request; returns the response body's length.
    pub async fn request(&mut self, method: &str, path: &str, body: Bytes) -> anyhow::Result<u64> {
        self.sender.ready().await?;
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .body(Full::new(body))?;
        let response = self.sender.send_request(request).await?;
        anyhow::ensure!(
            response.status().is_success(),
            "status {}",
            response.status()
        );
        let mut body = response.into_body();
        let mut received = 0u64;
        while let Some(frame) = body.frame().await {
            received += frame?.data_ref().map_or(0, |d| d.len() as u64);
        }
        Ok(received)
    }
}

/// Resumed handshakes, each followed by one small request (which also delivers the
/// session ticket for the next connection).
pub async fn resumed_handshakes(
    address: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    concurrency: usize,
    duration: Duration,
) -> Outcome {
    run(concurrency, duration, move |counters, deadline| {
        // A session cache per loop, so loops do not take each other's tickets.
        let mut own = (*config).clone();
        own.resumption = rustls::client::Resumption::in_memory_sessions(16);
        let client = Client::Tls(Arc::new(own));
        async move {
            while Instant::now() < deadline {
                match Http::open(address, &client).await {
                    Ok((mut http, resumed)) => {
                        if http.request("GET", "/small", Bytes::new()).await.is_ok() {
                            counters.operations.fetch_add(1, Ordering::Relaxed);
                            counters
                                .resumed
                                .fetch_add(u64::from(resumed), Ordering::Relaxed);
                        } else {
                            failed(&counters).await;
                        }
                    }
                    Err(_) => failed(&counters).await,
                }
            }
            Vec::new()
        }
    })
    .await
    .0
}

/// Direction of a bulk transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// 1 MiB responses.
    Download,
    /// 1 MiB request bodies.
    Upload,
}

/// Bulk transfer on `connections` keep-alive connections, 1 MiB per request.
pub async fn bulk(
    address: SocketAddr,
    client: Client,
    connections: usize,
    duration: Duration,
    direction: Direction,
) -> Outcome {
    const SIZE: usize = 1 << 20;
    let upload = Bytes::from(vec![b'u'; SIZE]);
    run(connections, duration, move |counters, deadline| {
        let client = client.clone();
        let upload = upload.clone();
        async move {
            let Ok((mut http, _)) = Http::open(address, &client).await else {
                failed(&counters).await;
                return Vec::new();
            };
            while Instant::now() < deadline {
                let result = match direction {
                    Direction::Download => {
                        http.request("GET", "/bytes/1048576", Bytes::new()).await
                    }
                    Direction::Upload => http.request("POST", "/upload", upload.clone()).await,
                };
                match result {
                    Ok(_) => {
                        counters.operations.fetch_add(1, Ordering::Relaxed);
                        counters.bytes.fetch_add(SIZE as u64, Ordering::Relaxed);
                    }
                    Err(_) => {
                        failed(&counters).await;
                        break;
                    }
                }
            }
            Vec::new()
        }
    })
    .await
    .0
}

/// Small keep-alive requests (`GET /small`, 100 bytes) on `connections` connections, with
/// each request's latency.
pub async fn small_requests(
    address: SocketAddr,
    client: Client,
    connections: usize,
    duration: Duration,
) -> Outcome {
    let (mut outcome, latencies) = run(connections, duration, move |counters, deadline| {
        let client = client.clone();
        async move {
            let mut latencies = Vec::new();
            let Ok((mut http, _)) = Http::open(address, &client).await else {
                failed(&counters).await;
                return latencies;
            };
            while Instant::now() < deadline {
                let start = Instant::now();
                match http.request("GET", "/small", Bytes::new()).await {
                    Ok(n) => {
                        latencies.push(start.elapsed());
                        counters.operations.fetch_add(1, Ordering::Relaxed);
                        counters.bytes.fetch_add(n, Ordering::Relaxed);
                    }
                    Err(_) => {
                        failed(&counters).await;
                        break;
                    }
                }
            }
            latencies
        }
    })
    .await;
    outcome.latencies = latencies;
    outcome
}

/// Small requests (`GET /small`) over HTTP/2: `connections` TLS connections (ALPN `h2`),
/// each with `streams` requests in flight at once, with each request's latency.
pub async fn small_requests_h2(
    address: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    connections: usize,
    streams: usize,
    duration: Duration,
) -> Outcome {
    let mut h2 = (*config).clone();
    h2.alpn_protocols = vec![b"h2".to_vec()];
    let h2 = Arc::new(h2);
    let counters = Arc::new(Counters::default());
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (h2, counters) = (Arc::clone(&h2), Arc::clone(&counters));
        tasks.push(tokio::spawn(async move {
            let opened = async {
                let stream = connect(address, &h2).await?;
                anyhow::ensure!(
                    stream.get_ref().1.alpn_protocol() == Some(b"h2"),
                    "no h2 by ALPN"
                );
                let (sender, connection) =
                    hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
                        hyper_util::rt::TokioExecutor::new(),
                        TokioIo::new(stream),
                    )
                    .await?;
                tokio::spawn(connection);
                anyhow::Ok(sender)
            };
            let Ok(sender) = opened.await else {
                failed(&counters).await;
                return Vec::new();
            };
            let mut streams_done = Vec::new();
            for _ in 0..streams {
                let (mut sender, counters) = (sender.clone(), Arc::clone(&counters));
                streams_done.push(tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    while Instant::now() < deadline {
                        let begin = Instant::now();
                        let request = Request::builder()
                            .uri(format!("https://localhost:{}/small", address.port()))
                            .body(Full::new(Bytes::new()))
                            .expect("request");
                        let answered = async {
                            sender.ready().await?;
                            let response = sender.send_request(request).await?;
                            anyhow::ensure!(response.status().is_success(), "status");
                            let body = response.into_body().collect().await?;
                            anyhow::Ok(body.to_bytes().len() as u64)
                        };
                        match answered.await {
                            Ok(n) => {
                                latencies.push(begin.elapsed());
                                counters.operations.fetch_add(1, Ordering::Relaxed);
                                counters.bytes.fetch_add(n, Ordering::Relaxed);
                            }
                            Err(_) => {
                                failed(&counters).await;
                                break;
                            }
                        }
                    }
                    latencies
                }));
            }
            let mut latencies = Vec::new();
            for stream in streams_done {
                if let Ok(mut l) = stream.await {
                    latencies.append(&mut l);
                }
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        if let Ok(mut l) = task.await {
            latencies.append(&mut l);
        }
    }
    Outcome {
        operations: counters.operations.load(Ordering::Relaxed),
        bytes: counters.bytes.load(Ordering::Relaxed),
        errors: counters.errors.load(Ordering::Relaxed),
        elapsed: start.elapsed(),
        latencies,
        resumed: 0,
    }
}

/// A fresh connection per request on `concurrency` loops: connect with a full handshake
/// (`config` should not resume), one `GET /small` over HTTP/1.1, the whole response read,
/// close, again. Each request's latency runs from the connect to the response's last byte.
pub async fn connection_per_request(
    address: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    concurrency: usize,
    duration: Duration,
) -> Outcome {
    let (mut outcome, latencies) = run(concurrency, duration, move |counters, deadline| {
        let client = Client::Tls(Arc::clone(&config));
        async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let start = Instant::now();
                match one_request(address, &client).await {
                    Ok((received, http)) => {
                        latencies.push(start.elapsed());
                        http.close().await;
                        counters.operations.fetch_add(1, Ordering::Relaxed);
                        counters.bytes.fetch_add(received, Ordering::Relaxed);
                    }
                    Err(_) => failed(&counters).await,
                }
            }
            latencies
        }
    })
    .await;
    outcome.latencies = latencies;
    outcome
}

/// Opens a connection and makes one `GET /small` on it; the response's length and the
/// connection, still open.
async fn one_request(address: SocketAddr, client: &Client) -> anyhow::Result<(u64, Http)> {
    let (mut http, _) = Http::open(address, client).await?;
    let received = http.request("GET", "/small", Bytes::new()).await?;
    Ok((received, http))
}

/// Opens `count` TLS connections (64 at a time) and returns them, open and idle.
pub async fn idle_connections(
    address: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    count: usize,
) -> Vec<TlsStream<TcpStream>> {
    let mut open = Vec::with_capacity(count);
    let mut pending = tokio::task::JoinSet::new();
    let mut started = 0;
    while open.len() < count {
        while started < count && pending.len() < 64 {
            let config = Arc::clone(&config);
            pending.spawn(async move { connect(address, &config).await });
            started += 1;
        }
        match pending.join_next().await {
            Some(Ok(Ok(stream))) => open.push(stream),
            Some(_) => {
                // Count it as opened-and-failed: stop trying for this one.
                if started >= count && pending.is_empty() {
                    break;
                }
            }
            None => break,
        }
    }
    open
}
