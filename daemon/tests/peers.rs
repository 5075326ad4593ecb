//! Slow, vanishing and misbehaving clients through `tlsaccel serve`: every such connection
//! ends on time with the right alert, gives back its backend connection, and leaves the
//! gauges at zero.

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::AlertDescription;
use support::{client_config, config, runtime, Daemon, Scratch};
use tlsaccel::record::{self, Direction, Policy, RecordStats, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// A backend that answers any request line with `size` bytes and reports, for each
/// connection, how long after it started sending its peer went away.
async fn big_response_backend(size: usize) -> (SocketAddr, mpsc::UnboundedReceiver<Duration>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let (report, closed) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let report = report.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 64];
                if stream.read(&mut request).await.unwrap_or(0) == 0 {
                    return;
                }
                let started = Instant::now();
                let chunk = vec![b'x'; 64 * 1024];
                let mut sent = 0;
                while sent < size {
                    if stream.write_all(&chunk).await.is_err() {
                        break;
                    }
                    sent += chunk.len();
                }
                if sent >= size {
                    // Everything went out: wait for the daemon to close its side.
                    let mut rest = [0u8; 64];
                    while stream.read(&mut rest).await.unwrap_or(0) > 0 {}
                }
                let _ = report.send(started.elapsed());
            });
        }
    });
    (address, closed)
}

fn tls_client(
    daemon: &Daemon,
    config: &Arc<rustls::ClientConfig>,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    let tcp = std::net::TcpStream::connect(daemon.listen).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let conn = rustls::ClientConnection::new(
        Arc::clone(config),
        ServerName::try_from("localhost").expect("name"),
    )
    .expect("client");
    rustls::StreamOwned::new(conn, tcp)
}

#[test]
fn a_client_that_stops_reading_is_ended_within_the_idle_timeout() {
    let rt = runtime();
    let (backend, mut closed) = rt.block_on(big_response_backend(64 << 20));
    let dir = Scratch::new("slowreader");
    let cert = support::write_identity(&dir.0);
    let extra = "[offload]\ncpu_below_bytes = 0\n";
    let text =
        config(&[backend], "", extra).replace("idle_timeout_ms = 30000", "idle_timeout_ms = 2000");
    let daemon = Daemon::start(&dir.0, &text);
    let client = client_config(&cert, &[&rustls::version::TLS13]);

    let mut tls = tls_client(&daemon, &client);
    tls.write_all(b"GET /\r\n").expect("request");
    let mut first = [0u8; 1000];
    tls.read_exact(&mut first).expect("first bytes");
    assert_eq!(first, [b'x'; 1000]);
    // The client now reads nothing more but keeps its socket open.
    let stopped = Instant::now();
    let gone = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(15), closed.recv()).await })
        .expect("the backend connection is closed")
        .expect("report");
    let waited = stopped.elapsed();
    assert!(
        waited < Duration::from_secs(8),
        "backend connection closed {waited:?} after the client stopped reading ({gone:?} after the response began)"
    );
    assert_eq!(
        daemon.metric_until("tlsaccel_connections_active", Duration::from_secs(5), |v| v
            == 0),
        0
    );
    assert_eq!(
        daemon.metric("tlsaccel_write_stalls_total{peer=\"client\"}"),
        1
    );
    drop(tls);
}

#[test]
fn a_client_that_disconnects_mid_response_frees_everything() {
    let rt = runtime();
    let (backend, mut closed) = rt.block_on(big_response_backend(64 << 20));
    let dir = Scratch::new("vanish");
    let cert = support::write_identity(&dir.0);
    let daemon = Daemon::start(&dir.0, &config(&[backend], "", ""));
    let client = client_config(&cert, &[&rustls::version::TLS13]);
    for round in 0..3 {
        let mut tls = tls_client(&daemon, &client);
        tls.write_all(b"GET /\r\n").expect("request");
        let mut first = [0u8; 1000];
        tls.read_exact(&mut first).expect("first bytes");
        drop(tls);
        let dropped = Instant::now();
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), closed.recv()).await })
            .expect("the backend connection is closed")
            .expect("report");
        assert!(
            dropped.elapsed() < Duration::from_secs(3),
            "round {round}: backend closed {:?} after the client left",
            dropped.elapsed()
        );
    }
    assert_eq!(
        daemon.metric_until("tlsaccel_connections_active", Duration::from_secs(5), |v| v
            == 0),
        0
    );
    // Not an idle timeout: the daemon saw the client go.
    assert_eq!(daemon.metric("tlsaccel_idle_timeouts_total"), 0);
}

/// A client that completed a real handshake with rustls, then speaks records it seals itself
/// with the extracted traffic secrets, so it can send what rustls never would.
struct RawClient {
    tcp: std::net::TcpStream,
    version: Version,
    tx: Direction,
    rx: Direction,
    rt: tokio::runtime::Runtime,
    incoming: Vec<u8>,
}

impl RawClient {
    fn connect(
        daemon: &Daemon,
        cert: &rustls::pki_types::CertificateDer<'static>,
        version: &'static rustls::SupportedProtocolVersion,
    ) -> Self {
        let mut config = (*client_config(cert, &[version])).clone();
        config.enable_secret_extraction = true;
        let mut tcp = std::net::TcpStream::connect(daemon.listen).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut conn = rustls::ClientConnection::new(
            Arc::new(config),
            ServerName::try_from("localhost").expect("name"),
        )
        .expect("client");
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp).expect("handshake");
        }
        let ours = if version == &rustls::version::TLS13 {
            Version::Tls13
        } else {
            Version::Tls12
        };
        let secrets = conn.dangerous_extract_secrets().expect("secrets");
        let (tx_seq, tx) = secrets.tx;
        let (rx_seq, rx) = secrets.rx;
        Self {
            tcp,
            version: ours,
            tx: Direction::new(ours, true, &tx, tx_seq).expect("tx"),
            rx: Direction::new(ours, false, &rx, rx_seq).expect("rx"),
            rt: tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime"),
            incoming: Vec::new(),
        }
    }

    /// Seals and sends `count` records of `content_type`, each holding `plain`.
    fn send(&mut self, content_type: u8, plain: &[u8], count: usize) {
        let stats = RecordStats::default();
        let items: Vec<(u8, &[u8])> = vec![(content_type, plain); count];
        let mut out = Vec::new();
        self.rt.block_on(self.tx.seal(
            &items,
            &mut out,
            None,
            Policy {
                cpu_below: usize::MAX,
            },
            &stats,
        ));
        // The daemon may already have closed: what matters is what it answered.
        let _ = self.tcp.write_all(&out);
    }

    /// Reads until the daemon's first alert (skipping tickets and data); None at end of
    /// stream without one.
    fn alert(&mut self) -> Option<AlertDescription> {
        let stats = RecordStats::default();
        loop {
            while let Some(len) = record::frame(&self.incoming, self.version).expect("framing") {
                let ranges = std::slice::from_ref(&(0..len)).to_vec();
                let opened = self.rt.block_on(self.rx.open(
                    &mut self.incoming,
                    &ranges,
                    None,
                    Policy {
                        cpu_below: usize::MAX,
                    },
                    &stats,
                ));
                let opened = opened
                    .into_iter()
                    .next()
                    .expect("a result")
                    .expect("the daemon's records open");
                if opened.content_type == record::content::ALERT {
                    return Some(AlertDescription::from(self.incoming[opened.plain][1]));
                }
                self.incoming.drain(..len);
            }
            let mut buf = [0u8; 4096];
            match self.tcp.read(&mut buf) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.incoming.extend_from_slice(&buf[..n]),
            }
        }
    }
}

#[test]
fn floods_and_bad_values_end_with_the_alert_rfc_8446_names() {
    let rt = runtime();
    let (backend, _echo) = rt.block_on(support::echo_server(None));
    let dir = Scratch::new("floods");
    let cert = support::write_identity(&dir.0);
    let daemon = Daemon::start(&dir.0, &config(&[backend], "", ""));
    let tls13 = &rustls::version::TLS13;
    let tls12 = &rustls::version::TLS12;

    // Empty records: 32 in a row are allowed, the 33rd is one too many.
    let mut raw = RawClient::connect(&daemon, &cert, tls13);
    raw.send(record::content::APPLICATION_DATA, b"", 32);
    raw.send(record::content::APPLICATION_DATA, b"ping", 1);
    raw.send(record::content::APPLICATION_DATA, b"", 33);
    assert_eq!(raw.alert(), Some(AlertDescription::UnexpectedMessage));

    // Warning alerts in TLS 1.2: four are tolerated, the fifth is not.
    let mut raw = RawClient::connect(&daemon, &cert, tls12);
    raw.send(record::content::ALERT, &[1, 90], 5);
    assert_eq!(raw.alert(), Some(AlertDescription::UnexpectedMessage));

    // A KeyUpdate whose request is neither 0 nor 1 (RFC 8446 §4.6.3).
    let mut raw = RawClient::connect(&daemon, &cert, tls13);
    raw.send(record::content::HANDSHAKE, &[24, 0, 0, 1, 7], 1);
    assert_eq!(raw.alert(), Some(AlertDescription::IllegalParameter));

    // KeyUpdates without data, from rustls itself: the 33rd in a row is refused.
    let client = client_config(&cert, &[tls13]);
    let mut tls = tls_client(&daemon, &client);
    tls.write_all(b"hello").expect("data");
    let mut back = [0u8; 5];
    tls.read_exact(&mut back).expect("echo");
    for _ in 0..33 {
        tls.conn.refresh_traffic_keys().expect("key update");
    }
    tls.conn.write_tls(&mut tls.sock).expect("send");
    while tls.conn.wants_write() {
        tls.conn.write_tls(&mut tls.sock).expect("send");
    }
    let mut rest = Vec::new();
    let alert = tls
        .read_to_end(&mut rest)
        .err()
        .and_then(|e| e.into_inner())
        .and_then(|e| e.downcast::<rustls::Error>().ok())
        .map(|e| *e);
    assert_eq!(
        alert,
        Some(rustls::Error::AlertReceived(
            AlertDescription::UnexpectedMessage
        ))
    );

    for limit in ["key_updates", "warning_alerts", "empty_records"] {
        assert_eq!(
            daemon.metric(&format!("tlsaccel_peer_limits_total{{limit=\"{limit}\"}}")),
            1,
            "{limit}"
        );
    }
    assert_eq!(
        daemon.metric("tlsaccel_alerts_sent_total{alert=\"IllegalParameter\"}"),
        1
    );
    assert_eq!(
        daemon.metric_until("tlsaccel_connections_active", Duration::from_secs(5), |v| v
            == 0),
        0
    );
}

#[test]
fn a_failed_handshake_sends_the_alert_rustls_chose() {
    let rt = runtime();
    let (backend, _echo) = rt.block_on(support::echo_server(None));
    let dir = Scratch::new("hsalert");
    support::write_identity(&dir.0);
    let daemon = Daemon::start(&dir.0, &config(&[backend], "", ""));
    // A TLS 1.2 client whose only suite rustls does not implement (CBC).
    let output = std::process::Command::new("openssl")
        .args(["s_client", "-connect"])
        .arg(daemon.listen.to_string())
        .args(["-tls1_2", "-cipher", "AES128-SHA"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl s_client runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("alert handshake failure"),
        "openssl saw: {stderr}"
    );
    assert_eq!(
        daemon.metric("tlsaccel_alerts_sent_total{alert=\"HandshakeFailure\"}"),
        1
    );
    assert_eq!(
        daemon.metric("tlsaccel_handshake_failures_total{reason=\"tls\"}"),
        1
    );
}
