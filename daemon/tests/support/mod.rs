//! Shared by the daemon's end-to-end tests: the `tlsaccel serve` process, a certificate,
//! backends (echo and HTTP) and a rustls client.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "tlsaccel-test-{tag}-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `cert.pem` and `key.pem` (ECDSA P-256, for localhost) into `dir`; returns the
/// certificate.
pub fn write_identity(dir: &Path) -> CertificateDer<'static> {
    let issued = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    std::fs::write(dir.join("cert.pem"), issued.cert.pem()).expect("write cert");
    std::fs::write(dir.join("key.pem"), issued.signing_key.serialize_pem()).expect("write key");
    CertificateDer::from(issued.cert.der().to_vec())
}

/// A `tlsaccel serve` process.
pub struct Daemon {
    pub child: Child,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    /// Every listener's name and address.
    pub listeners: Vec<(String, SocketAddr)>,
    pub config: PathBuf,
    lines: mpsc::Receiver<String>,
}

impl Daemon {
    /// Writes `config` to `dir/tlsaccel.toml` and starts the daemon on it; waits until it
    /// reports its listener and admin addresses.
    pub fn start(dir: &Path, config: &str) -> Self {
        Self::start_with_env(dir, config, &[])
    }

    /// [`Self::start`] with more environment variables for the daemon.
    pub fn start_with_env(dir: &Path, config: &str, env: &[(&str, &std::ffi::OsStr)]) -> Self {
        let file = dir.join("tlsaccel.toml");
        std::fs::write(&file, config).expect("write config");
        let mut child = Command::new(env!("CARGO_BIN_EXE_tlsaccel"))
            .args(["serve", "--config"])
            .arg(&file)
            .envs(env.iter().copied())
            .env(
                "TLSACCEL_LOG",
                std::env::var("TEST_DAEMON_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tlsaccel serve");
        let stdout = child.stdout.take().expect("stdout");
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        let mut daemon = Self {
            child,
            listen: "0.0.0.0:0".parse().expect("addr"),
            admin: "0.0.0.0:0".parse().expect("addr"),
            listeners: Vec::new(),
            config: file,
            lines,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let (mut listen, mut admin) = (None, None);
        // Every listener is reported before the admin endpoint.
        while admin.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = daemon
                .lines
                .recv_timeout(left)
                .expect("the daemon reports its addresses");
            if let Some(rest) = line.strip_prefix("tlsaccel: listener ") {
                let (name, url) = rest.split_once(" on ").expect("name and address");
                let (scheme, address) = url.split_once("://").expect("url");
                let address: SocketAddr = address
                    .trim_end_matches('/')
                    .parse()
                    .expect("socket address");
                daemon.listeners.push((name.to_owned(), address));
                // The first TLS listener is the one most tests use.
                if scheme == "https" && listen.is_none() {
                    listen = Some(address);
                }
            } else if let Some(rest) = line.strip_prefix("tlsaccel: admin on http://") {
                admin = Some(
                    rest.split('/')
                        .next()
                        .expect("address")
                        .parse()
                        .expect("socket address"),
                );
            }
        }
        daemon.listen = listen
            .or(daemon.listeners.first().map(|(_, a)| *a))
            .expect("listener");
        daemon.admin = admin.expect("admin");
        daemon
    }

    /// The address of listener `name`.
    pub fn listener(&self, name: &str) -> SocketAddr {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no listener {name}"))
    }

    /// Waits for a stdout line containing `text`.
    pub fn wait_for_line(&self, text: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no line with {text:?} from the daemon"));
            if line.contains(text) {
                return line;
            }
        }
    }

    /// Sends a signal to the daemon.
    pub fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("pid");
        rustix::process::kill_process(pid, signal).expect("signal");
    }

    /// GETs `path` from the admin endpoint.
    pub fn admin_get(&self, path: &str) -> String {
        let mut stream = TcpStream::connect(self.admin).expect("admin connect");
        write!(stream, "GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n").expect("request");
        let mut text = String::new();
        stream.read_to_string(&mut text).expect("response");
        text.split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default()
    }

    /// The value of the sample whose name-and-labels is exactly `series`, or 0.
    pub fn metric(&self, series: &str) -> u64 {
        let text = self.admin_get("/metrics");
        text.lines()
            .find_map(|line| {
                let (name, value) = line.rsplit_once(' ')?;
                (name == series).then(|| value.parse::<f64>().ok())?
            })
            .map_or(0, |v| v as u64)
    }

    /// Polls `series` until `check` accepts it or the timeout passes; returns the last value.
    pub fn metric_until(
        &self,
        series: &str,
        timeout: Duration,
        check: impl Fn(u64) -> bool,
    ) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.metric(series);
            if check(value) || Instant::now() > deadline {
                return value;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A configuration for one listener on loopback, one pool and the admin endpoint.
pub fn config(servers: &[SocketAddr], extra_pool: &str, extra: &str) -> String {
    let servers: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    // Records of 1 KiB and more go to the device, so the tests exercise that path.
    let offload = if extra.contains("[offload]") {
        ""
    } else {
        "[offload]\ncpu_below_bytes = 1024\n"
    };
    format!(
        r#"drain_timeout_ms = 5000
[[listener]]
name = "test"
address = "127.0.0.1:0"
default_pool = "backends"
idle_timeout_ms = 30000

[[listener.certificate]]
chain = "cert.pem"
key = "key.pem"

[[device]]
address = "sim"
queues = 2

[[pool]]
name = "backends"
servers = [{}]
{extra_pool}

[admin]
address = "127.0.0.1:0"
{offload}{extra}
"#,
        servers.join(", ")
    )
}

/// A runtime for the test's own servers and clients.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// An echo server: every byte back, then end of stream when the client ends its side. With
/// a `name`, the first line sent is `name\n`.
pub async fn echo_server(name: Option<&'static str>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    echo_on(listener, name)
}

/// [`echo_server`] on an existing listener.
pub fn echo_on(
    listener: TcpListener,
    name: Option<&'static str>,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let address = listener.local_addr().expect("address");
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            connections.spawn(async move {
                let (mut read, mut write) = stream.into_split();
                if let Some(name) = name {
                    let _ = write.write_all(format!("{name}\n").as_bytes()).await;
                }
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = write.shutdown().await;
            });
        }
    });
    (address, task)
}

/// A rustls client config trusting `cert`.
pub fn client_config(
    cert: &CertificateDer<'static>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).expect("root");
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// A TLS connection from a tokio-rustls client.
pub async fn connect(
    address: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    tokio_rustls::TlsConnector::from(Arc::clone(config))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("handshake")
}

/// Deterministic bytes for integrity checks.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `total` bytes through an echo connection while reading them back; returns the
/// SHA-256 of what was sent and of what came back.
pub async fn echo_transfer<S>(stream: S, total: usize, seed: u64) -> ([u8; 32], [u8; 32])
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    use aws_lc_rs::digest::{Context, SHA256};
    let (mut read, mut write) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        let mut hash = Context::new(&SHA256);
        let mut sent = 0;
        let mut seed = seed;
        while sent < total {
            let len = (total - sent).min(256 * 1024);
            let chunk = pattern(seed, len);
            seed = seed.wrapping_add(1);
            hash.update(&chunk);
            write.write_all(&chunk).await.expect("send");
            sent += len;
        }
        write.shutdown().await.expect("close_notify");
        hash.finish()
    });
    let mut hash = Context::new(&SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut received = 0;
    loop {
        let n = read.read(&mut buf).await.expect("receive");
        if n == 0 {
            break;
        }
        received += n;
        hash.update(&buf[..n]);
    }
    assert_eq!(received, total, "bytes echoed");
    let sent = writer.await.expect("writer");
    let digest = |d: aws_lc_rs::digest::Digest| <[u8; 32]>::try_from(d.as_ref()).expect("32");
    (digest(sent), digest(hash.finish()))
}

/// An `openssl s_client` session driven line by line: its stdout and stderr lines arrive on
/// one channel, so a test waits for what it expects instead of sleeping.
pub struct OpensslClient {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl OpensslClient {
    /// `openssl s_client` with `args`, trusting `ca`, connected to `address` (SNI localhost).
    pub fn start(args: &[&str], ca: &Path, address: SocketAddr) -> Self {
        let mut child = Command::new("openssl")
            .arg("s_client")
            .args(args)
            .args(["-servername", "localhost", "-CAfile"])
            .arg(ca)
            .args(["-connect", &address.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("openssl runs");
        let (send, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        for stream in [Box::new(stdout) as Box<dyn Read + Send>, Box::new(stderr)] {
            let send = send.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if send.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let stdin = child.stdin.take();
        Self {
            child,
            stdin,
            lines,
        }
    }

    /// Types a line.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("openssl stdin");
    }

    /// Waits until a line that is exactly `text` (trimmed) appears on stdout or stderr.
    pub fn wait_for(&self, text: &str, timeout: Duration) {
        assert!(self.saw(text, timeout), "openssl never printed {text:?}");
    }

    /// True when a line that is exactly `text` (trimmed) appears within `timeout`.
    pub fn saw(&self, text: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.trim() == text => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    }

    /// Types a line; false when openssl has gone (its handshake failed).
    pub fn try_send(&mut self, line: &str) -> bool {
        self.stdin
            .as_mut()
            .is_some_and(|stdin| writeln!(stdin, "{line}").is_ok())
    }
}

impl Drop for OpensslClient {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `tlsaccel sim` serving vfio-user at `socket`, with its control socket at `control`.
pub fn start_simulator(socket: &Path, control: &Path) -> Child {
    let _ = std::fs::remove_file(socket);
    let _ = std::fs::remove_file(control);
    let child = Command::new(env!("CARGO_BIN_EXE_tlsaccel"))
        .args(["sim", "--exit-with-parent", "--vfio-user"])
        .arg(socket)
        .arg("--control")
        .arg(control)
        .stderr(Stdio::null())
        .spawn()
        .expect("simulator");
    wait_until("the simulator's sockets", Duration::from_secs(10), || {
        socket.exists() && control.exists()
    });
    child
}

/// Polls `check` until it holds; fails the test after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends a command to the simulator's control socket; it must reach the device functions.
pub fn control(path: &Path, command: &str) {
    let answer = tlsaccel::simcontrol::send(path, command).expect("control socket");
    // Every device function the server holds, the daemon's among them (idle ones wait for
    // their client).
    assert!(
        answer.starts_with("ok ") && answer != "ok 0",
        "{command}: {answer}"
    );
}
