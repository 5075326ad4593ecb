//! Hostile HTTP against `tlsaccel serve` in HTTP mode, sent as raw bytes over TLS by a
//! client of the test's own: request smuggling attempts (RFC 9112 §6.1, §6.3: conflicting
//! `Content-Length` / `Transfer-Encoding`, obsolete line folding, bad lengths) and HTTP/2
//! floods (rapid reset, SETTINGS, PING). Each gets a clean error or a closed connection,
//! nothing smuggled reaches the backend, memory stays bounded, and another client is
//! served meanwhile.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use support::{runtime, Daemon, Scratch};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A backend that logs `METHOD target body-length` for each request it gets.
async fn logging_backend() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let log = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&log);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                        let seen = Arc::clone(&seen);
                        async move {
                            let line = format!("{} {}", request.method(), request.uri());
                            let both = request.headers().contains_key("content-length")
                                && request.headers().contains_key("transfer-encoding");
                            let body = request.into_body().collect().await;
                            let len = body.map(|b| b.to_bytes().len()).unwrap_or(usize::MAX);
                            seen.lock()
                                .unwrap()
                                .push(format!("{line} {len}{}", if both { " BOTH" } else { "" }));
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                                b"ok\n",
                            ))))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (address, log)
}

fn config(backend: SocketAddr) -> String {
    format!(
        r#"[[listener]]
name = "web"
address = "127.0.0.1:0"
mode = "http"
alpn = ["h2", "http/1.1"]
default_pool = "app"
idle_timeout_ms = 3000
[[listener.certificate]]
chain = "cert.pem"
key = "key.pem"

[[pool]]
name = "app"
servers = ["{backend}"]

[admin]
address = "127.0.0.1:0"
"#
    )
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn connect(
    daemon: &Daemon,
    cert: &rustls::pki_types::CertificateDer<'static>,
    alpn: &[u8],
) -> Tls {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).expect("root");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(daemon.listen)
        .await
        .expect("connect");
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("handshake")
}

/// Sends `request` as it is and reads until the daemon closes (or 5 s pass); returns what
/// came back and whether the daemon closed the connection.
async fn exchange_and_close(
    daemon: &Daemon,
    cert: &rustls::pki_types::CertificateDer<'static>,
    request: &[u8],
) -> (String, bool) {
    let mut tls = connect(daemon, cert, b"http/1.1").await;
    tls.write_all(request).await.expect("send");
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut answer))
        .await
        .is_ok();
    (String::from_utf8_lossy(&answer).into_owned(), closed)
}

async fn exchange(
    daemon: &Daemon,
    cert: &rustls::pki_types::CertificateDer<'static>,
    request: &[u8],
) -> String {
    exchange_and_close(daemon, cert, request).await.0
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn smuggling_attempts_get_400_or_a_closed_connection_and_nothing_smuggled_reaches_the_backend() {
    let rt = runtime();
    let dir = Scratch::new("http-smuggling");
    let cert = support::write_identity(&dir.0);
    let (backend, log) = rt.block_on(logging_backend());
    let daemon = Daemon::start(&dir.0, &config(backend));
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let cases: Vec<(&str, String)> = vec![
        (
            "CL and TE together (TE.CL desync)",
            format!(
                "POST /a HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\n\
                 Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{smuggled}\r\n0\r\n\r\n",
                smuggled.len()
            ),
        ),
        (
            "two different Content-Lengths",
            format!(
                "POST /b HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\
                 Content-Length: {}\r\n\r\n{smuggled}",
                smuggled.len()
            ),
        ),
        (
            "chunked not last",
            format!(
                "POST /c HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked, identity\r\n\r\n\
                 0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "obsolete line folding",
            format!(
                "POST /d HTTP/1.1\r\nHost: localhost\r\nX-A: 1\r\n Transfer-Encoding: chunked\r\n\
                 Content-Length: 0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "space before the colon",
            format!(
                "POST /e HTTP/1.1\r\nHost: localhost\r\nContent-Length : {}\r\n\r\n{smuggled}",
                smuggled.len()
            ),
        ),
        (
            "a signed length",
            format!(
                "POST /f HTTP/1.1\r\nHost: localhost\r\nContent-Length: +{}\r\n\r\n{smuggled}",
                smuggled.len()
            ),
        ),
        (
            "a chunk size past 64 bits",
            format!(
                "POST /g HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n\
                 1ffffffffffffffff\r\nx\r\n0\r\n\r\n{smuggled}"
            ),
        ),
    ];
    for (what, request) in &cases {
        let (answer, closed) = rt.block_on(exchange_and_close(&daemon, &cert, request.as_bytes()));
        let status = answer.lines().next().unwrap_or("");
        println!("{what}: {status} (closed: {closed})");
        assert!(closed, "{what}: the connection is closed after the answer");
        // Refused (400), or handled by Transfer-Encoding alone and the connection closed
        // after one answer (RFC 9112 §6.3): never two answers.
        assert!(
            status.starts_with("HTTP/1.1 400") || status.starts_with("HTTP/1.1 200"),
            "{what}: {answer:?}"
        );
        assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{what}: {answer:?}");
    }
    // A well-formed pipelined pair still works, as two requests.
    let answer = rt.block_on(exchange(
        &daemon,
        &cert,
        b"GET /one HTTP/1.1\r\nHost: localhost\r\n\r\nGET /two HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    ));
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 2, "{answer:?}");
    let log = log.lock().unwrap().clone();
    println!("backend saw: {log:?}");
    assert!(
        log.iter()
            .all(|l| !l.contains("/smuggled") && !l.ends_with("BOTH")),
        "{log:?}"
    );
    // What reached the backend is at most the one request of each case the daemon took,
    // with the body it framed, and the pipelined pair.
    assert!(log.len() <= cases.len() + 2, "{log:?}");
    assert!(log.contains(&"GET /one 0".to_owned()) && log.contains(&"GET /two 0".to_owned()));
}

/// One HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Floods one HTTP/2 connection with `frames` (after the preface and an empty SETTINGS),
/// reading nothing, for at most `for_at_most`; returns whether the daemon ended it.
async fn flood(
    daemon: &Daemon,
    cert: &rustls::pki_types::CertificateDer<'static>,
    mut frames: impl FnMut(u32) -> Vec<u8>,
    for_at_most: Duration,
) -> bool {
    let mut tls = connect(daemon, cert, b"h2").await;
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "h2 by ALPN"
    );
    let mut start = PREFACE.to_vec();
    start.extend(frame(4, 0, 0, &[]));
    tls.write_all(&start).await.expect("preface");
    let deadline = tokio::time::Instant::now() + for_at_most;
    let mut i = 0u32;
    loop {
        let mut batch = Vec::new();
        for _ in 0..64 {
            batch.extend(frames(i));
            i += 1;
        }
        match tokio::time::timeout_at(deadline, tls.write_all(&batch)).await {
            Ok(Ok(())) => {}
            // Closed (GOAWAY and close, or reset): the daemon ended it.
            Ok(Err(_)) => return true,
            Err(_) => break,
        }
    }
    // Still open after the flood: it must end within the idle timeout (the daemon's
    // answers are not read).
    let mut sink = vec![0u8; 1 << 16];
    let end = tokio::time::Instant::now() + Duration::from_secs(15);
    // Reading now drains what was queued; the connection must end regardless.
    loop {
        match tokio::time::timeout_at(end, tls.read(&mut sink)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

#[test]
fn http2_floods_end_their_connection_with_bounded_memory_and_others_are_served() {
    let rt = runtime();
    let dir = Scratch::new("http2-floods");
    let cert = support::write_identity(&dir.0);
    let (backend, log) = rt.block_on(logging_backend());
    let daemon = Daemon::start(&dir.0, &config(backend));
    let pid = daemon.child.id();
    let rss_before = rss_kib(pid);
    let get = |daemon: &Daemon| {
        rt.block_on(exchange(
            daemon,
            &cert,
            b"GET /fine HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        ))
    };
    // Rapid reset (CVE-2023-44487): HEADERS for a new stream, then RST_STREAM(CANCEL), over
    // and over. Header block: :method GET, :scheme https, :path /, :authority localhost.
    let mut block = vec![0x82, 0x87, 0x84, 0x41, 9];
    block.extend_from_slice(b"localhost");
    let rapid_reset = |i: u32| {
        let stream = 2 * i + 1;
        let mut out = frame(1, 0x5, stream, &block);
        out.extend(frame(3, 0, stream, &8u32.to_be_bytes()));
        out
    };
    let ended = rt.block_on(flood(&daemon, &cert, rapid_reset, Duration::from_secs(10)));
    assert!(ended, "a rapid-reset flood ends its connection");
    assert!(get(&daemon).starts_with("HTTP/1.1 200"));
    // SETTINGS (each needing an ACK) and PING floods, answers never read.
    let settings = |_| frame(4, 0, 0, &[0, 3, 0, 0, 0, 100]);
    let ended = rt.block_on(flood(&daemon, &cert, settings, Duration::from_secs(5)));
    assert!(ended, "a SETTINGS flood ends its connection");
    assert!(get(&daemon).starts_with("HTTP/1.1 200"));
    let ping = |i: u32| frame(6, 0, 0, &u64::from(i).to_be_bytes());
    let ended = rt.block_on(flood(&daemon, &cert, ping, Duration::from_secs(5)));
    assert!(ended, "a PING flood ends its connection");
    assert!(get(&daemon).starts_with("HTTP/1.1 200"));
    let rss_after = rss_kib(pid);
    println!(
        "daemon RSS {rss_before} KiB before, {rss_after} KiB after the floods; backend saw {} requests",
        log.lock().unwrap().len()
    );
    assert!(
        rss_after < rss_before + 64 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
    assert_eq!(
        daemon.metric_until(
            "tlsaccel_connections_active",
            Duration::from_secs(10),
            |v| v == 0
        ),
        0
    );
}
