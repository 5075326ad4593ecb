//! The PROXY protocol through `tlsaccel serve`: v2 headers with the TLS values to backends
//! (read by a backend of the test's own, and by Debian's HAProxy with `accept-proxy`), and
//! v1/v2 headers taken from trusted load balancers only.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{client_config, config, runtime, Daemon, Scratch};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What a backend was told in the PROXY headers it received.
#[derive(Debug, Clone, PartialEq)]
struct Told {
    source: Option<SocketAddr>,
    authority: Option<String>,
    alpn: Option<Vec<u8>>,
    /// The SSL TLV: client flags, then the version and cipher sub-TLVs.
    ssl: Option<(u8, String, String)>,
    local: bool,
}

/// An echo backend that requires a PROXY v2 header on every connection and records it.
async fn proxy_backend() -> (SocketAddr, Arc<Mutex<Vec<Told>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let told = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&told);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                let mut input = Vec::new();
                let (told, len) = loop {
                    let mut chunk = [0u8; 1024];
                    match tcp.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => input.extend_from_slice(&chunk[..n]),
                    }
                    match ppp::v2::Header::try_from(&input[..]) {
                        Ok(header) => break (read_header(&header), header.len()),
                        Err(
                            ppp::v2::ParseError::Incomplete(_) | ppp::v2::ParseError::Partial(..),
                        ) => {}
                        Err(_) => return,
                    }
                };
                log.lock().unwrap().push(told);
                let rest = input.split_off(len);
                if tcp.write_all(&rest).await.is_err() {
                    return;
                }
                let (mut read, mut write) = tcp.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = write.shutdown().await;
            });
        }
    });
    (address, told)
}

fn read_header(header: &ppp::v2::Header<'_>) -> Told {
    let source = match header.addresses {
        ppp::v2::Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v2::Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        _ => None,
    };
    let mut told = Told {
        source,
        authority: None,
        alpn: None,
        ssl: None,
        local: header.command == ppp::v2::Command::Local,
    };
    for tlv in header.tlvs().flatten() {
        match tlv.kind {
            0x01 => told.alpn = Some(tlv.value.to_vec()),
            0x02 => told.authority = Some(String::from_utf8_lossy(&tlv.value).into_owned()),
            0x20 => {
                let v = &tlv.value;
                let (mut version, mut cipher) = (String::new(), String::new());
                let mut at = 5;
                while at + 3 <= v.len() {
                    let len = usize::from(u16::from_be_bytes([v[at + 1], v[at + 2]]));
                    let value = String::from_utf8_lossy(&v[at + 3..at + 3 + len]).into_owned();
                    match v[at] {
                        0x21 => version = value,
                        0x23 => cipher = value,
                        _ => {}
                    }
                    at += 3 + len;
                }
                told.ssl = Some((v[0], version, cipher));
            }
            _ => {}
        }
    }
    told
}

/// A connection that sends `preface` before its TLS handshake; one line echoed, or `None`
/// when the daemon refused it.
async fn exchange(
    address: SocketAddr,
    client: &Arc<rustls::ClientConfig>,
    preface: &[u8],
) -> Option<String> {
    let mut tcp = tokio::net::TcpStream::connect(address).await.ok()?;
    tcp.write_all(preface).await.ok()?;
    let name = rustls::pki_types::ServerName::try_from("localhost").ok()?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::clone(client))
        .connect(name, tcp)
        .await
        .ok()?;
    tls.write_all(b"hello\n").await.ok()?;
    let mut line = [0u8; 6];
    tls.read_exact(&mut line).await.ok()?;
    Some(String::from_utf8_lossy(&line).into_owned())
}

/// The support configuration with `accept_proxy_from` on its listener.
fn config_trusting(servers: &[SocketAddr], pool: &str, trusted: &str) -> String {
    let text = config(servers, pool, "");
    let listener_key = "idle_timeout_ms = 30000\n";
    assert!(text.contains(listener_key));
    text.replacen(
        listener_key,
        &format!("{listener_key}accept_proxy_from = [{trusted}]\n"),
        1,
    )
}

#[test]
fn backends_get_a_v2_header_with_the_client_and_the_tls_values() {
    let rt = runtime();
    let dir = Scratch::new("proxy-out");
    let cert = support::write_identity(&dir.0);
    let (backend, told) = rt.block_on(proxy_backend());
    let pool = "proxy_protocol = \"v2\"\n[pool.health_check]\ninterval_ms = 100\n";
    let daemon = Daemon::start(&dir.0, &config(&[backend], pool, ""));
    let client = client_config(&cert, &[&rustls::version::TLS13]);
    let (line, client_address) = rt.block_on(async {
        let mut tls = support::connect(daemon.listen, &client).await;
        let client_address = tls.get_ref().0.local_addr().expect("address");
        tls.write_all(b"hello\n").await.expect("send");
        let mut line = [0u8; 6];
        tls.read_exact(&mut line).await.expect("echo");
        (line, client_address)
    });
    assert_eq!(
        &line, b"hello\n",
        "what followed the header reached the backend"
    );
    let told = told.lock().unwrap().clone();
    let proxied: Vec<_> = told.iter().filter(|t| !t.local).collect();
    assert_eq!(proxied.len(), 1, "{told:?}");
    assert_eq!(proxied[0].source, Some(client_address));
    assert_eq!(proxied[0].authority.as_deref(), Some("localhost"));
    let (flags, version, cipher) = proxied[0].ssl.clone().expect("an SSL TLV");
    assert_eq!((flags, version.as_str()), (0x01, "TLSv1.3"));
    // The IANA name of what was negotiated (not rustls' `TLS13_` one).
    assert!(
        [
            "TLS_AES_256_GCM_SHA384",
            "TLS_AES_128_GCM_SHA256",
            "TLS_CHACHA20_POLY1305_SHA256"
        ]
        .contains(&cipher.as_str()),
        "{cipher}"
    );
    // Health checks are connections of the proxy's own: LOCAL headers, and they pass.
    assert!(told.iter().any(|t| t.local), "{told:?}");
    assert_eq!(
        daemon.metric(&format!(
            "tlsaccel_backend_health_check_failures_total{{pool=\"backends\",server=\"{backend}\"}}"
        )),
        0
    );
}

#[test]
fn headers_from_trusted_sources_name_the_client_and_others_are_refused() {
    let rt = runtime();
    let dir = Scratch::new("proxy-in");
    let cert = support::write_identity(&dir.0);
    let (backend, told) = rt.block_on(proxy_backend());
    let pool = "proxy_protocol = \"v2\"\n";
    let client = client_config(&cert, &[&rustls::version::TLS13]);
    let v1 = b"PROXY TCP4 192.0.2.9 198.51.100.1 40000 443\r\n".to_vec();
    let v2 = {
        let header = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (
                "[2001:db8::9]:40001".parse::<SocketAddr>().unwrap(),
                "[2001:db8::1]:443".parse::<SocketAddr>().unwrap(),
            ),
        );
        header.build().expect("header")
    };

    // 127.0.0.1 is trusted: its headers say who the client is, and it must send one.
    let daemon = Daemon::start(
        &dir.0,
        &config_trusting(&[backend], pool, "\"127.0.0.0/8\""),
    );
    rt.block_on(async {
        assert_eq!(
            exchange(daemon.listen, &client, &v1).await.as_deref(),
            Some("hello\n")
        );
        assert_eq!(
            exchange(daemon.listen, &client, &v2).await.as_deref(),
            Some("hello\n")
        );
        assert_eq!(
            exchange(daemon.listen, &client, b"").await,
            None,
            "no header"
        );
        let broken = b"PROXY TCP4 192.0.2.9 nonsense\r\n";
        assert_eq!(exchange(daemon.listen, &client, broken).await, None);
    });
    let sources: Vec<_> = told.lock().unwrap().iter().map(|t| t.source).collect();
    assert_eq!(
        sources,
        [
            Some("192.0.2.9:40000".parse().unwrap()),
            Some("[2001:db8::9]:40001".parse().unwrap())
        ]
    );
    assert_eq!(
        daemon.metric("tlsaccel_proxy_headers_total{result=\"accepted\"}"),
        2
    );
    assert_eq!(
        daemon.metric("tlsaccel_proxy_headers_total{result=\"missing\"}"),
        1
    );
    assert_eq!(
        daemon.metric("tlsaccel_proxy_headers_total{result=\"invalid\"}"),
        1
    );
    drop(daemon);

    // Only 192.0.2.0/24 is trusted: a header from 127.0.0.1 is refused, plain TLS served.
    let daemon = Daemon::start(
        &dir.0,
        &config_trusting(&[backend], pool, "\"192.0.2.0/24\""),
    );
    rt.block_on(async {
        assert_eq!(exchange(daemon.listen, &client, &v1).await, None);
        assert_eq!(exchange(daemon.listen, &client, &v2).await, None);
        assert_eq!(
            exchange(daemon.listen, &client, b"").await.as_deref(),
            Some("hello\n")
        );
    });
    assert_eq!(
        daemon.metric("tlsaccel_proxy_headers_total{result=\"untrusted\"}"),
        2
    );
    let last = told.lock().unwrap().last().cloned().expect("told");
    assert_eq!(
        last.source.map(|s| s.ip()),
        Some("127.0.0.1".parse().unwrap())
    );
}

#[test]
fn haproxy_with_accept_proxy_logs_the_client_and_the_server_name() {
    let rt = runtime();
    let dir = Scratch::new("proxy-haproxy");
    let cert = support::write_identity(&dir.0);
    let (echo, _echo) = rt.block_on(support::echo_server(None));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let haproxy_config = format!(
        "global\n  log stdout format raw local0\n\
         defaults\n  mode tcp\n  log global\n  timeout connect 2s\n  timeout client 10s\n  timeout server 10s\n\
         frontend fe\n  bind 127.0.0.1:{port} accept-proxy\n\
         \x20 log-format \"proxied client=%ci:%cp authority=%[fc_pp_authority]\"\n\
         \x20 default_backend be\n\
         backend be\n  server echo {echo}\n"
    );
    std::fs::write(dir.0.join("haproxy.cfg"), haproxy_config).expect("config");
    let mut haproxy = Command::new("haproxy")
        .args(["-db", "-f"])
        .arg(dir.0.join("haproxy.cfg"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start haproxy (the test command installs it)");
    support::wait_until("haproxy to listen", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let backend: SocketAddr = ([127, 0, 0, 1], port).into();
    let daemon = Daemon::start(&dir.0, &config(&[backend], "proxy_protocol = \"v2\"\n", ""));
    let client = client_config(&cert, &[&rustls::version::TLS13]);
    let client_address = rt.block_on(async {
        let mut tls = support::connect(daemon.listen, &client).await;
        let address = tls.get_ref().0.local_addr().expect("address");
        tls.write_all(b"ping\n").await.expect("send");
        let mut line = [0u8; 5];
        tls.read_exact(&mut line)
            .await
            .expect("echo through haproxy");
        let _ = tls.shutdown().await;
        address
    });
    // HAProxy logs a TCP session when it ends.
    let stdout = haproxy.stdout.take().expect("stdout");
    let (send, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if send.send(line).is_err() {
                break;
            }
        }
    });
    let wanted = format!("proxied client={client_address} authority=localhost");
    let mut seen = Vec::new();
    let found = loop {
        match lines.recv_timeout(Duration::from_secs(10)) {
            Ok(line) if line.contains(&wanted) => break true,
            Ok(line) => seen.push(line),
            Err(_) => break false,
        }
    };
    let _ = haproxy.kill();
    let _ = haproxy.wait();
    assert!(found, "haproxy logged {seen:?}, not {wanted:?}");
}
